"""Configuration that reaches the spec intact or is refused by name (issue 10, points 11 and 13)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
from pydantic import ValidationError

import sparsity_core as sc
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


@pytest.mark.parametrize(
    ("kind", "name", "args", "field"),
    [
        ("sparsifier", "magnitude", {"sparsity_level": True}, "sparsity_level"),
        ("sparsifier", "magnitude", {"sparsity_level": False}, "sparsity_level"),
        ("sparsifier", "magnitude", {"overrides": {"*.bias": {"sparsity_level": True}}}, "sparsity_level"),
        ("scheduler", "cubic", {"start": True}, "start"),
        ("scheduler", "step", {"end": 5, "gamma": True}, "gamma"),
    ],
)
def test_a_bool_is_not_a_level_or_a_number(kind, name, args, field):
    # pydantic's lax float took True as 1.0: sparsity_level=True pruned everything
    create = sc.create_sparsifier if kind == "sparsifier" else sc.create_scheduler
    with pytest.raises(ValidationError) as exc:
        create(name, args)
    text = str(exc.value)
    assert field in text and "a number, not a bool" in text


def test_numbers_stay_numbers_ints_and_json_round_trips_included():
    sparsifier = sc.create_sparsifier("magnitude", {"sparsity_level": 1})
    assert sparsifier.spec.sparsity_level == 1.0 and type(sparsifier.spec.sparsity_level) is float
    assert sc.create_sparsifier("magnitude", {"sparsity_level": 0}).spec.sparsity_level == 0.0
    spec = sc.create_sparsifier("magnitude", {"sparsity_level": 0.75, "overrides": {"*.b": {"sparsity_level": 1}}}).spec
    assert type(spec).model_validate_json(spec.model_dump_json()) == spec
    step = sc.create_scheduler("step", {"start": 1, "end": 9, "gamma": 3, "step_size": 2}).spec
    assert type(step).model_validate_json(step.model_dump_json()) == step
    # strings from a command line still convert, as pydantic does for every number
    assert sc.create_sparsifier("magnitude", {"sparsity_level": "0.25"}).spec.sparsity_level == 0.25


@pytest.mark.parametrize("callback", ["PostTrainingSparsity", "TrainingAwareSparsity"])
@pytest.mark.parametrize("value", ["8", 2.5, True, None, -1])
def test_calibration_batches_must_be_a_non_negative_int(callback, value):
    from sparsity_core import lightning

    with pytest.raises((TypeError, ValueError)) as exc:
        getattr(lightning, callback)("magnitude", calibration_batches=value)
    text = str(exc.value)
    assert "calibration_batches" in text and "non-negative int" in text and repr(value) in text


@pytest.mark.parametrize("value", [0, 3])
def test_calibration_batches_accepts_non_negative_ints(value):
    from sparsity_core.lightning import TrainingAwareSparsity

    assert TrainingAwareSparsity("magnitude", calibration_batches=value).calibration_batches == value
