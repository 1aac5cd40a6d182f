"""The ``sparsity`` command, through a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).with_name("sparsity")


def run(*args: str, env: dict[str, str] | None = None, ok: bool = True) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=full_env)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_list_json_names_builtins_with_plugin_and_summary():
    rows = json.loads(run("list", "--json").stdout)
    magnitude = next(r for r in rows if r["name"] == "magnitude")
    assert magnitude["kind"] == "sparsifier" and magnitude["plugin"] == "builtin"
    assert magnitude["qualified_name"] == "builtin:magnitude" and magnitude["summary"]
    assert {"constant", "linear", "cubic", "step"} <= {r["name"] for r in rows if r["kind"] == "scheduler"}


def test_list_table():
    out = run("list", "--kind", "scheduler").stdout
    assert "cubic" in out and "Zhu & Gupta" in out and "magnitude" not in out


def test_show_json_has_fields_defaults_descriptions_and_schema():
    info = json.loads(run("show", "magnitude", "--json").stdout)
    assert info["qualified_name"] == "builtin:magnitude" and info["distribution"] == "sparsity-core"
    fields = {f["name"]: f for f in info["fields"]}
    assert fields["sparsity_level"]["default"] == 0.5 and fields["sparsity_level"]["description"]
    assert fields["scope"]["default"] == "layer"
    assert info["schema"]["properties"]["sparsity_level"]["maximum"] == 1.0


def test_show_table():
    out = run("show", "builtin:cubic").stdout
    assert "Zhu & Gupta" in out and "start" in out and "JSON schema" in out and "builtin:cubic" in out


def test_unknown_name_exits_non_zero_with_did_you_mean():
    proc = run("show", "magnitud", ok=False)
    assert proc.returncode == 2
    assert "Did you mean 'magnitude'" in proc.stderr


def test_plugins_json_shows_a_broken_plugin_and_honours_the_environment(tmp_path):
    info = tmp_path / "sparsity_plugin_broken-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sparsity-plugin-broken\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[sparsity_core]\nbroken = sp_cli_broken\n")
    (tmp_path / "sp_cli_broken.py").write_text("import does_not_exist_anywhere\n")
    env = {"PYTHONPATH": str(tmp_path), "PYTHONWARNINGS": "ignore"}

    plugins = {p["name"]: p for p in json.loads(run("plugins", "--json", env=env).stdout)}
    assert plugins["builtin"]["status"] == "loaded"
    broken = plugins["broken"]
    assert (broken["distribution"], broken["version"], broken["status"]) == ("sparsity-plugin-broken", "0.3", "failed")
    assert "ModuleNotFoundError" in broken["error"] and "does_not_exist_anywhere" in broken["error"]
    assert "magnitude" in {r["name"] for r in json.loads(run("list", "--json", env=env).stdout)}

    proc = run("plugins", "--json", env={**env, "SPARSITY_DISABLE_PLUGINS": "sparsity-plugin-broken"})
    assert {p["name"]: p for p in json.loads(proc.stdout)}["broken"]["status"] == "disabled"

    strict = run("list", env={**env, "SPARSITY_STRICT_PLUGINS": "1"}, ok=False)
    assert strict.returncode == 2 and "SPARSITY_STRICT_PLUGINS=1" in strict.stderr and "broken" in strict.stderr


@pytest.mark.parametrize("argv", [["--help"], ["show", "--help"]])
def test_help(argv):
    assert "sparsity" in run(*argv).stdout


def test_version():
    from sparsity_core import __version__
    from sparsity_core._engine import native

    proc = run("--version")
    assert __version__ in proc.stdout and "API" in proc.stdout
    # which kernels the engine runs, as the engine itself finds them (the CLI looks without torch)
    expected = ("compiled kernels, AVX2" if native.simd() else "compiled kernels, portable C") if native.AVAILABLE else "NumPy kernels"
    assert expected in proc.stdout, proc.stdout


def test_show_finds_schedulers_and_suggests_across_both_kinds():
    assert json.loads(run("show", "step", "--json").stdout)["kind"] == "scheduler"
    for typo, meant in (("cubc", "cubic"), ("magnitud", "magnitude")):
        proc = run("show", typo, ok=False)
        assert proc.returncode == 2 and f"Did you mean '{meant}'" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [["list", "--json"], ["show", "magnitude", "--json"], ["plugins", "--json"], ["list"]])
def test_a_closed_pipe_exits_quietly(argv):
    # `sparsity list --json | head -1`: the reader is gone before the output is written
    proc = subprocess.Popen(
        [str(SCRIPT), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "200"}
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) != 0  # the output did not all arrive: not a success
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


def test_show_prints_the_whole_json_schema_in_a_narrow_terminal():
    schema = json.loads(run("show", "magnitude", "--json").stdout)["schema"]
    out = run("show", "magnitude", env={"COLUMNS": "40"}).stdout
    assert json.loads(out.split("JSON schema:", 1)[1]) == schema


def test_show_says_what_a_sparsifier_declares():
    caps = json.loads(run("show", "movement", "--json").stdout)["capabilities"]
    assert caps["gradients"] is True and caps["calibration"] is False
    text = run("show", "sparsegpt").stdout
    assert "capabilities" in text and "reconstruction" in text and "layer kinds" in text
    assert "capabilities: shard_safe" in run("show", "magnitude").stdout
    assert "none (scores weights alone" in run("show", "data_norm").stdout
