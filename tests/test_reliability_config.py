"""Configuration that reaches the spec intact or is refused by name (issue 10, points 11 and 13)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

from sparsity_core._registry import Registry, use_registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def builtins_only():
    """The built-ins alone: these tests are about configuration, not whichever plugins the
    environment has installed."""
    with use_registry(Registry(autoload=False)) as registry:
        yield registry


def _cli_callback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sparsifier_args: str):
    """The sparsity callback that a real LightningCLI builds from the example YAML, with its
    ``sparsifier_args`` block replaced by ``sparsifier_args`` (YAML text, indented 8)."""
    from pytorch_lightning.cli import LightningCLI

    from sparsity_core.lightning import TrainingAwareSparsity

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from digits import DigitsClassifier, DigitsDataModule
    finally:
        sys.path.remove(str(ROOT / "examples"))
    monkeypatch.setattr(sys, "argv", ["cli.py"])  # pytest's own arguments are not the CLI's
    config = (ROOT / "examples" / "digits_sparsity.yaml").read_text()
    original = "        sparsifier_args:\n          sparsity_level: 0.9\n"
    assert original in config  # the example still has the block this test replaces
    (tmp_path / "config.yaml").write_text(config.replace(original, f"        sparsifier_args:\n{sparsifier_args}"))
    with warnings.catch_warnings():
        # Lightning 2.6 calls a jsonargparse API that jsonargparse 4.5x deprecates: not ours.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"pytorch_lightning\.cli")
        cli = LightningCLI(
            DigitsClassifier,
            DigitsDataModule,
            run=False,
            save_config_callback=None,
            args=["--config", str(tmp_path / "config.yaml"), f"--trainer.default_root_dir={tmp_path}"],
        )
    return next(c for c in cli.trainer.callbacks if isinstance(c, TrainingAwareSparsity))


@pytest.mark.slow
@pytest.mark.parametrize("written", ['"2:4"', "2:4", "1:8", "'1x4'"])
def test_lightning_cli_yaml_pattern_reaches_the_spec_as_written(tmp_path, monkeypatch, written):
    # YAML 1.1 reads an unquoted 2:4 as the base-60 integer 124, and jsonargparse re-parsed the
    # quoted string "2:4" of a dict[str, Any] value the same way: the spec got 124.
    text = written.strip("'\"")
    callback = _cli_callback(tmp_path, monkeypatch, f"          pattern: {written}\n")
    assert callback.sparsifier_args == {"pattern": text}
    assert callback._sparsifier_spec.pattern == text


@pytest.mark.slow
def test_lightning_cli_yaml_strings_are_not_re_parsed_in_nested_overrides(tmp_path, monkeypatch):
    callback = _cli_callback(
        tmp_path,
        monkeypatch,
        "          sparsity_level: 0.5\n"
        "          overrides:\n"
        "            'model.4.*':\n"
        "              pattern: 2:4\n"
        "            'model.2.*':\n"
        "              pattern: \"1:2\"\n",
    )
    spec = callback._sparsifier_spec
    assert spec.sparsity_level == 0.5
    assert spec.overrides == {"model.4.*": {"pattern": "2:4"}, "model.2.*": {"pattern": "1:2"}}
