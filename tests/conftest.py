from __future__ import annotations

import importlib
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sparsity_core import _registry


class FakeSite:
    """A folder on sys.path holding real ``.dist-info`` distributions, as pip would leave them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def add(
        self,
        dist: str,
        *,
        version: str = "1.0",
        entry_points: dict[str, str] | None = None,
        modules: dict[str, str] | None = None,
    ) -> FakeSite:
        """Install distribution ``dist`` with ``entry_points`` (name -> module) in the
        ``sparsity_core`` group and the given module sources."""
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = ["[sparsity_core]", *(f"{k} = {v}" for k, v in (entry_points or {}).items())]
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        for module, source in (modules or {}).items():
            (self.root / f"{module}.py").write_text(textwrap.dedent(source))
            self.modules.append(module)
        (info / "RECORD").write_text("")
        importlib.invalidate_caches()
        return self


@pytest.fixture
def fake_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., FakeSite]]:
    """Make fresh site folders on sys.path; the process-wide registry is reset around the test."""
    sites: list[FakeSite] = []

    def make(name: str = "site") -> FakeSite:
        root = tmp_path / name
        root.mkdir()
        monkeypatch.syspath_prepend(str(root))
        site = FakeSite(root)
        sites.append(site)
        return site

    _registry.reset_registry()
    yield make
    _registry.reset_registry()
    for site in sites:
        for module in site.modules:
            sys.modules.pop(module, None)


@pytest.fixture(params=["exact", "bracketed"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through the engine's exact selection and through its sampled bracket over
    several pieces (thresholds made small so that small tensors take that path)."""
    from sparsity_core import _engine as engine

    if request.param == "bracketed":
        monkeypatch.setattr(engine.kernels, "EXACT", 100)
        monkeypatch.setattr(engine.kernels, "SAMPLE", 2000)
        monkeypatch.setattr(engine.kernels, "CHUNK", 4096)
    return request.param


# A plugin module with one score sparsifier and one scheduler; {name} is filled per test.
PLUGIN_SOURCE = """
import sparsity_core
from sparsity_core import hookimpl, ScoreSparsifier, Scheduler

class {cls}(ScoreSparsifier):
    \"\"\"Prune the largest weights first (a test plugin).\"\"\"
    name = "{name}"
    def score(self, name, tensor):
        return -tensor.abs()

class {cls}Schedule(Scheduler):
    \"\"\"Half the final level from start on.\"\"\"
    name = "{name}_half"
    def level_at(self, t, final_level):
        return final_level / 2

@hookimpl
def register_sparsifiers(register):
    register({cls})

@hookimpl
def register_schedulers(register):
    register({cls}Schedule)
"""


def _plugin_source(name: str, cls: str = "Inverse") -> str:
    return PLUGIN_SOURCE.format(name=name, cls=cls)


@pytest.fixture(scope="session")
def plugin_source() -> Callable[..., str]:
    """``plugin_source(name, cls="Inverse")``: source of a working plugin module."""
    return _plugin_source
