"""Discovery and names, against real ``.dist-info`` distributions on sys.path."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import sparsity_core as sc
from sparsity_core import AmbiguousNameError, PluginLoadError, PluginWarning, UnknownNameError
from sparsity_core._registry import Registry, normalize


def by_name(registry: Registry, name: str):
    return next(p for p in registry.plugins() if p.name == name)


def test_third_party_plugin_is_found_and_used_by_name(fake_site, plugin_source):
    fake_site().add(
        "sparsity-plugin-inverse",
        version="2.3",
        entry_points={"inverse": "sp_inverse_a"},
        modules={"sp_inverse_a": plugin_source("inverse")},
    )
    assert "inverse" in sc.list_sparsifiers()
    assert "inverse_half" in sc.list_schedulers()
    info = next(p for p in sc.plugins() if p.name == "inverse")
    assert (info.distribution, info.version, info.status) == ("sparsity-plugin-inverse", "2.3", "loaded")
    assert info.provides == ["sparsifier:inverse", "scheduler:inverse_half"]

    weights = {"w": torch.tensor([1.0, -4.0, 2.0, 3.0])}
    report = sc.sparsify(weights, "inverse", {"sparsity_level": 0.5})
    # the plugin's score prunes the largest magnitudes: -4 and 3 go
    assert weights["w"].tolist() == [1.0, 0.0, 2.0, 0.0]
    assert report.overall == 0.5
    assert type(sc.create_sparsifier("inverse:inverse")).__name__ == "Inverse"
    assert sc.create_scheduler("inverse_half")(5, 0.8) == pytest.approx(0.4)


def test_builtins_are_a_plugin_registered_through_the_hooks(fake_site):
    fake_site()
    info = next(p for p in sc.plugins() if p.name == "builtin")
    assert info.distribution == "sparsity-core" and info.status == "loaded"
    assert "sparsifier:magnitude" in info.provides
    assert sc.create_sparsifier("builtin:magnitude").name == "magnitude"


@pytest.mark.parametrize(
    ("source", "stage", "original"),
    [
        ("raise ImportError('needs libfoo >= 3')", "failed to import", "ImportError: needs libfoo >= 3"),
        (
            "from sparsity_core import hookimpl\n@hookimpl\ndef register_sparsifiers(register):\n"
            "    raise RuntimeError('boom in register')\n",
            "failed to register",
            "RuntimeError: boom in register",
        ),
        (
            "from sparsity_core import hookimpl\n@hookimpl\ndef register_sparsifiers(register):\n"
            "    register(dict)\n",
            "failed to register",
            "not a subclass of sparsity_core.Sparsifier",
        ),
        (
            "from sparsity_core import hookimpl\n@hookimpl\ndef register_sparsifers(register):\n    pass\n",
            "failed to register",
            "unknown hook 'register_sparsifers'",
        ),
    ],
    ids=["import", "register-raises", "register-non-class", "misspelt-hook"],
)
def test_broken_plugin_is_isolated_and_named(fake_site, plugin_source, source, stage, original):
    site = fake_site()
    site.add("sparsity-plugin-good", entry_points={"good": "sp_good_b"}, modules={"sp_good_b": plugin_source("good")})
    site.add("sparsity-plugin-broken", version="0.1", entry_points={"broken": "sp_broken_b"}, modules={"sp_broken_b": source})

    with pytest.warns(PluginWarning, match="broken") as caught:
        names = sc.list_sparsifiers()
    assert len([w for w in caught if issubclass(w.category, PluginWarning)]) == 1
    assert "good" in names and "magnitude" in names

    info = next(p for p in sc.plugins() if p.name == "broken")
    assert info.status == "failed"
    assert info.distribution == "sparsity-plugin-broken" and info.version == "0.1"
    assert stage in info.error and original in info.error

    with pytest.raises(UnknownNameError) as exc:
        sc.create_sparsifier("fancy")
    message = str(exc.value)
    assert "broken (sparsity-plugin-broken 0.1) [failed]" in message and original in message
    # warned once: later uses are silent (filterwarnings=error would fail the test otherwise)
    sc.list_sparsifiers()


def test_failed_registration_keeps_none_of_that_plugins_names(fake_site, plugin_source):
    source = plugin_source("half_done") + "\n@hookimpl\ndef register_schedulers(register):\n    raise ValueError('late')\n"
    # the second register_schedulers shadows the first; its failure must drop the sparsifier too
    fake_site().add("sparsity-plugin-half", entry_points={"half": "sp_half_c"}, modules={"sp_half_c": source})
    with pytest.warns(PluginWarning, match="late"):
        assert "half_done" not in sc.list_sparsifiers()
    info = next(p for p in sc.plugins() if p.name == "half")
    assert info.status == "failed" and info.sparsifiers == [] and info.schedulers == []


def test_strict_mode_turns_a_broken_plugin_into_an_error(fake_site):
    fake_site().add("sparsity-plugin-broken", entry_points={"broken": "sp_broken_d"}, modules={"sp_broken_d": "1/0"})
    registry = Registry(environ={"SPARSITY_STRICT_PLUGINS": "1"})
    with pytest.warns(PluginWarning), pytest.raises(PluginLoadError, match="ZeroDivisionError") as exc:
        registry.names("sparsifier")
    assert exc.value.plugin == "broken"
    with pytest.raises(PluginLoadError):  # stays an error, not a half-working registry
        registry.get("sparsifier", "magnitude")


def test_same_short_name_from_two_plugins_is_ambiguous_in_any_install_order(fake_site, plugin_source, monkeypatch):
    first, second = fake_site("one"), fake_site("two")
    first.add("sparsity-plugin-alpha", entry_points={"alpha": "sp_alpha_e"}, modules={"sp_alpha_e": plugin_source("shared", "A")})
    second.add("sparsity-plugin-beta", entry_points={"beta": "sp_beta_e"}, modules={"sp_beta_e": plugin_source("shared", "B")})
    rest = [p for p in sys.path if p not in (str(first.root), str(second.root))]
    for ordered in ([first, second], [second, first]):
        monkeypatch.setattr(sys, "path", [str(s.root) for s in ordered] + rest)
        registry = Registry()
        with pytest.raises(AmbiguousNameError) as exc:
            registry.get("sparsifier", "shared")
        message = str(exc.value)
        for text in ("alpha:shared", "beta:shared", "sparsity-plugin-alpha", "sparsity-plugin-beta"):
            assert text in message
        assert exc.value.candidates == ["alpha:shared", "beta:shared"]
        assert registry.get("sparsifier", "alpha:shared").cls.__name__ == "A"
        assert registry.get("sparsifier", "beta:shared").cls.__name__ == "B"
        names = registry.names("sparsifier")
        assert "alpha:shared" in names and "beta:shared" in names and "shared" not in names


def test_a_plugin_that_reuses_a_builtin_name_leaves_the_short_name_to_the_builtin(fake_site, plugin_source, monkeypatch):
    # Installing such a plugin made 'magnitude' ambiguous: every existing script and config broke.
    monkeypatch.setenv("SPARSITY_PLUGINS", "mag")  # this test's plugin, whatever else is installed
    fake_site().add("sparsity-plugin-mag", entry_points={"mag": "sp_mag_f"}, modules={"sp_mag_f": plugin_source("magnitude", "Shadow")})
    with pytest.warns(PluginWarning, match="mag:magnitude") as caught:
        assert type(sc.create_sparsifier("magnitude")).__module__ == "sparsity_core.builtin.sparsifiers"
    assert len(caught) == 1 and "built-in" in str(caught[0].message)
    assert type(sc.create_sparsifier("mag:magnitude")).__name__ == "Shadow"
    assert sc.create_sparsifier("builtin:magnitude").name == "magnitude"
    names = set(sc.list_sparsifiers())
    assert {"magnitude", "mag:magnitude"} <= names and "builtin:magnitude" not in names
    assert "magnitude_half" in sc.list_schedulers()  # its other names are unaffected
    info = next(p for p in sc.plugins() if p.name == "mag")
    assert info.status == "loaded" and info.sparsifiers == ["magnitude"]


def test_two_distributions_with_one_entry_point_name(fake_site, plugin_source):
    site = fake_site()
    site.add("sparsity-plugin-x1", entry_points={"samename": "sp_x1_g"}, modules={"sp_x1_g": plugin_source("x1")})
    site.add("sparsity-plugin-x2", entry_points={"samename": "sp_x2_g"}, modules={"sp_x2_g": plugin_source("x2")})
    with pytest.warns(PluginWarning, match="already taken"):
        plugins = sc.plugins()
    statuses = sorted(p.status for p in plugins if p.name.startswith("samename"))
    assert statuses == ["failed", "loaded"]


def test_unknown_name_suggests_close_matches_and_lists_what_exists(fake_site):
    fake_site()
    with pytest.raises(UnknownNameError) as exc:
        sc.create_sparsifier("magnitud")
    assert "Did you mean 'magnitude'" in str(exc.value)
    assert "Available sparsifiers:" in str(exc.value) and "magnitude" in exc.value.suggestions
    assert isinstance(exc.value, LookupError)
    with pytest.raises(UnknownNameError, match="unknown scheduler 'nope:cubic'"):
        sc.create_scheduler("nope:cubic")


def test_api_version_mismatch_refuses_only_that_plugin(fake_site, plugin_source):
    site = fake_site()
    site.add("sparsity-plugin-future", entry_points={"future": "sp_future_h"},
             modules={"sp_future_h": "SPARSITY_CORE_API = 99\n" + plugin_source("future")})
    site.add("sparsity-plugin-now", entry_points={"now": "sp_now_h"},
             modules={"sp_now_h": f"SPARSITY_CORE_API = {sc.API_VERSION}\n" + plugin_source("now")})
    with pytest.warns(PluginWarning, match="API 99"):
        names = sc.list_sparsifiers()
    assert "now" in names and "future" not in names
    info = next(p for p in sc.plugins() if p.name == "future")
    assert info.status == "incompatible" and f"provides API {sc.API_VERSION}" in info.error


def test_a_v1_plugin_still_loads_under_api_2(fake_site, plugin_source):
    site = fake_site()
    site.add("sparsity-plugin-old", entry_points={"old": "sp_old_h"},
             modules={"sp_old_h": "SPARSITY_CORE_API = 1\n" + plugin_source("old")})
    assert sc.API_VERSION == 2
    assert "old" in sc.list_sparsifiers()
    assert next(p for p in sc.plugins() if p.name == "old").status == "loaded"


@pytest.fixture
def two_plugins(fake_site, plugin_source):
    site = fake_site()
    site.add("sparsity-plugin-red", entry_points={"red_one": "sp_red_i"}, modules={"sp_red_i": plugin_source("red")})
    site.add("sparsity_plugin_blue", entry_points={"blue": "sp_blue_i"}, modules={"sp_blue_i": plugin_source("blue")})
    return site


@pytest.mark.parametrize(
    ("environ", "present", "absent"),
    [
        ({}, {"red", "blue"}, set()),
        ({"SPARSITY_DISABLE_PLUGIN_AUTOLOAD": "1"}, set(), {"red", "blue"}),
        ({"SPARSITY_PLUGINS": "red-one"}, {"red"}, {"blue"}),  # entry-point name, - and _ alike
        ({"SPARSITY_PLUGINS": "Sparsity-Plugin-Blue"}, {"blue"}, {"red"}),  # distribution name
        ({"SPARSITY_DISABLE_PLUGINS": "sparsity_plugin_red"}, {"blue"}, {"red"}),
        ({"SPARSITY_PLUGINS": "red_one,blue", "SPARSITY_DISABLE_PLUGINS": "blue"}, {"red"}, {"blue"}),
    ],
    ids=["default", "autoload-off", "allow-by-entry-point", "allow-by-dist", "deny", "allow-and-deny"],
)
def test_environment_switches(two_plugins, environ, present, absent):
    registry = Registry(environ=environ)
    names = set(registry.names("sparsifier"))
    assert present <= names and not absent & names
    assert "magnitude" in names  # built-ins are always there
    status = {p.name: p for p in registry.plugins()}
    for plugin_name, provided in (("red_one", "red"), ("blue", "blue")):
        info = status[plugin_name]
        if provided in absent:
            assert info.status == "disabled" and "SPARSITY_" in info.error and info.sparsifiers == []
        else:
            assert info.status == "loaded" and info.sparsifiers == [provided]
    if absent:
        with pytest.raises(UnknownNameError, match=r"\[disabled\]"):
            registry.get("sparsifier", sorted(absent)[0])


def test_environment_is_read_from_the_process(two_plugins, monkeypatch):
    monkeypatch.setenv("SPARSITY_DISABLE_PLUGINS", "blue")
    assert "blue" not in sc.list_sparsifiers() and "red" in sc.list_sparsifiers()


def test_isolated_registry_with_in_process_plugin():
    class Local(sc.ScoreSparsifier):
        """A local plugin class."""

        name = "local"

        def score(self, name, tensor):
            return tensor.abs()

    class Plugin:
        @sc.hookimpl
        def register_sparsifiers(self, register):
            register(Local)

    registry = Registry(autoload=False, plugins=[("mine", Plugin())])
    assert registry.get("sparsifier", "mine:local").cls is Local
    assert [p.name for p in registry.plugins()] == ["builtin", "mine"]


def test_a_local_class_works_without_registration():
    class Keep(sc.ScoreSparsifier):
        name = "keep_first"

        def score(self, name, tensor):
            return -torch.arange(tensor.numel(), dtype=torch.float32).view(tensor.shape)

    layer = nn.Linear(4, 2)
    report = sc.sparsify(layer, Keep, {"sparsity_level": 0.25})
    assert report["weight"] == 0.25
    assert layer.weight.detach().flatten()[-2:].eq(0).all()


def test_normalize_treats_dash_underscore_and_case_alike():
    assert normalize("Sparsity_Plugin-X") == normalize("sparsity-plugin.x") == "sparsity-plugin-x"


@pytest.mark.parametrize(
    ("environ", "typo", "hint"),
    [
        ({"SPARSITY_PLUGINS": "red_oen"}, "red_oen", "red_one"),
        ({"SPARSITY_PLUGINS": "red_one,bleu"}, "bleu", "blue"),
        (
            {"SPARSITY_PLUGINS": "red_one", "SPARSITY_DISABLE_PLUGINS": "sparsity-plugin-bleu"},
            "sparsity-plugin-bleu",
            "sparsity_plugin_blue",
        ),
    ],
)
def test_a_plugin_list_naming_no_installed_plugin_warns(two_plugins, environ, typo, hint):
    # a typo in SPARSITY_PLUGINS silently disabled every plugin
    registry = Registry(environ=environ)
    with pytest.warns(PluginWarning, match=typo) as caught:
        registry.names("sparsifier")
    message = str(caught[0].message)
    assert f"did you mean {hint!r}" in message and "red_one" in message and "blue" in message
    registry.names("sparsifier")  # once, not at every use


def test_a_plugin_list_naming_installed_plugins_or_builtin_is_silent(two_plugins):
    registry = Registry(environ={"SPARSITY_PLUGINS": "builtin, Red-One , sparsity-plugin-blue"})
    assert {"red", "blue", "magnitude"} <= set(registry.names("sparsifier"))


KEYBOARD_PLUGIN = """
import os
if os.path.exists({marker!r}):
    os.remove({marker!r})
    raise {exc}
"""


@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "SystemExit(3)"])
def test_an_interrupt_while_a_plugin_imports_propagates_and_the_next_use_starts_clean(fake_site, plugin_source, tmp_path, exc):
    marker = tmp_path / "interrupt-once"
    marker.write_text("")
    site = fake_site()
    site.add("sparsity-plugin-kbd", entry_points={"kbd": "sp_kbd_j"},
             modules={"sp_kbd_j": KEYBOARD_PLUGIN.format(marker=str(marker), exc=exc) + plugin_source("kbd")})
    site.add("sparsity-plugin-other", entry_points={"other": "sp_other_j"}, modules={"sp_other_j": plugin_source("other")})
    registry = Registry(environ={"SPARSITY_PLUGINS": "kbd,other", "SPARSITY_STRICT_PLUGINS": "1"})
    with pytest.raises(BaseException) as caught:
        registry.names("sparsifier")
    assert type(caught.value).__name__ == exc.split("(")[0]
    # the retry found builtin, kbd and other 'already taken' and, strict, nothing worked again
    assert {"magnitude", "kbd", "other"} <= set(registry.names("sparsifier"))
    enabled = {p.name: p.status for p in registry.plugins() if p.status != "disabled"}
    assert enabled == {"builtin": "loaded", "kbd": "loaded", "other": "loaded"}


REENTRANT_AT_IMPORT = """
import sparsity_core
sparsity_core.create_sparsifier("magnitude")
"""

REENTRANT_IN_HOOK = """
import sparsity_core
from sparsity_core import hookimpl

@hookimpl
def register_schedulers(register):
    sparsity_core.list_sparsifiers()
"""


@pytest.mark.parametrize("source", [REENTRANT_AT_IMPORT, REENTRANT_IN_HOOK], ids=["at-import", "in-hook"])
def test_a_plugin_that_uses_the_registry_while_it_loads_gets_an_error_naming_it(fake_site, plugin_source, monkeypatch, source):
    monkeypatch.setenv("SPARSITY_PLUGINS", "reentrant,after")
    site = fake_site()
    site.add("sparsity-plugin-reentrant", entry_points={"reentrant": "sp_re_k"}, modules={"sp_re_k": source})
    site.add("sparsity-plugin-after", entry_points={"after": "sp_after_k"}, modules={"sp_after_k": plugin_source("after")})
    with pytest.warns(PluginWarning, match="reentrant") as caught:
        names = sc.list_sparsifiers()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "plugin 'reentrant'" in message and "while it was being loaded" in message
    # discovery was not re-entered: no plugin recorded twice, the others all work
    enabled = {p.name: p.status for p in sc.plugins() if p.status != "disabled"}
    assert enabled == {"after": "loaded", "builtin": "loaded", "reentrant": "failed"}
    assert {"magnitude", "after"} <= set(names)
    assert sc.create_sparsifier("magnitude").name == "magnitude"
