"""new_plugin: a generated plugin installs with pip, is found by name, and passes its own tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sparsity_core._scaffold import new_plugin


def test_writes_a_distribution_named_after_the_plugin(tmp_path: Path) -> None:
    root = new_plugin("sparsity-plugin-my_pruner", tmp_path)
    assert root == tmp_path / "sparsity-plugin-my-pruner"
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == [".gitignore", "README.md", "pyproject.toml", "src/sparsity_plugin_my_pruner/__init__.py", "tests/test_my_pruner.py"]
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points.sparsity_core]\nmy_pruner = "sparsity_plugin_my_pruner"' in pyproject
    assert 'name = "sparsity-plugin-my-pruner"' in pyproject
    module = (root / "src/sparsity_plugin_my_pruner/__init__.py").read_text()
    assert 'name = "my_pruner"' in module and "class MyPruner(ScoreSparsifier)" in module
    compile(module, "generated", "exec")


def test_refuses_bad_names_and_existing_folders_unless_forced(tmp_path: Path) -> None:
    for bad in ("", "My Pruner", "9lives", "a--b", "x:y"):
        with pytest.raises(ValueError, match="is not valid"):
            new_plugin(bad, tmp_path)
    root = new_plugin("mine", tmp_path)
    (root / "NOTES.md").write_text("keep me")
    (root / "README.md").write_text("edited")
    with pytest.raises(FileExistsError, match="--force"):
        new_plugin("mine", tmp_path)
    assert new_plugin("mine", tmp_path, force=True) == root
    assert (root / "NOTES.md").read_text() == "keep me" and "sparsity-plugin-mine" in (root / "README.md").read_text()


@pytest.mark.slow
def test_generated_plugin_installs_is_found_by_name_and_passes_its_tests(tmp_path: Path) -> None:
    root = new_plugin("kitgen-demo", tmp_path / "src")
    site = tmp_path / "site"
    # A real pip install (wheel build, .dist-info, entry points) into a private folder: the shared
    # environment is never touched, so nothing needs uninstalling and parallel runs do not see it.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "--no-index", "--target", str(site), str(root)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    env = {k: v for k, v in env.items() if not k.startswith("SPARSITY_")}
    probe = (
        "from sparsity_core._registry import Registry\n"
        "r = Registry()\n"
        "impl = r.get('sparsifier', 'kitgen-demo')\n"
        "print(impl.qualified_name, impl.plugin.distribution, impl.plugin.status)\n"
    )
    found = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert found.stdout.split() == ["kitgen-demo:kitgen-demo", "sparsity-plugin-kitgen-demo", "loaded"], found.stderr
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    # every check of the kit ran as its own test: passed, or skipped with its reason; none failed
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|skipped|failed|error)", tests.stdout)}
    assert "failed" not in counts and "error" not in counts, tests.stdout
    assert counts.get("passed", 0) >= 20, tests.stdout
