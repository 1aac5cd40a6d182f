"""The conformance kit: correct implementations pass every check, wrong ones fail the named check."""

from __future__ import annotations

import math
import random
import sys
import types

import pytest
import torch
from pydantic import Field

from sparsity_core import Scheduler, ScoreSparsifier, ScoreSpec, Sparsifier, hookimpl
from sparsity_core.builtin.sparsifiers import Magnitude
from sparsity_core.testing import (
    KitReport,
    assert_conforms,
    check_names,
    check_scheduler,
    check_sparsifier,
    isolated_registry,
    parametrize_with_checks,
)


# -- deliberately wrong sparsifiers, each with one defect ------------------------------------
class KeepsTheLeastImportant(ScoreSparsifier):
    """Selects its own masks, and inverts the order."""

    name = "inverted"

    def score(self, name, tensor):
        return tensor.abs()

    def compute_masks(self, tensors, levels):
        return {n: ~m for n, m in super().compute_masks(tensors, {n: 1 - v for n, v in levels.items()}).items()}


class ModifiesItsInput(ScoreSparsifier):
    """Scores in place."""

    name = "in_place"

    def score(self, name, tensor):
        return tensor.abs_()


class FloatMasks(Sparsifier):
    """Returns 0/1 floats, not booleans."""

    name = "float_masks"

    def compute_masks(self, tensors, levels):
        return {n: (t.abs() >= t.abs().median()).float() for n, t in tensors.items()}


class HalfTheLevel(Sparsifier):
    """Prunes half of what is asked."""

    name = "half_level"

    def compute_masks(self, tensors, levels):
        out = {}
        for n, t in tensors.items():
            k = int(levels[n] / 2 * t.numel())
            flat = torch.ones(t.numel(), dtype=torch.bool)
            flat[t.abs().reshape(-1).argsort()[:k]] = False
            out[n] = flat.view(t.shape)
        return out


class Unseeded(ScoreSparsifier):
    """Draws from Python's own RNG, which the seed does not reach."""

    name = "unseeded"

    def score(self, name, tensor):
        return torch.rand(tensor.shape, generator=torch.Generator().manual_seed(random.getrandbits(32)))


class NumpyScore(ScoreSparsifier):
    """Goes through NumPy, which has no bfloat16."""

    name = "numpy_score"

    def score(self, name, tensor):
        return torch.from_numpy(abs(tensor.detach().numpy()))


class MatrixOnly(ScoreSparsifier):
    """Assumes 2-D weights."""

    name = "matrix_only"

    def score(self, name, tensor):
        rows, cols = tensor.shape
        return tensor.abs() / tensor.abs().sum(1, keepdim=True)


class BadSpecSpec(ScoreSpec):
    cap: float = Field(math.inf, description="No limit by default: inf has no JSON form.")
    strength: float = Field(1.0)  # no description
    required_thing: int = Field(description="Has no default.")


class BadSpec(ScoreSparsifier):
    """Spec defects only; the scoring is fine."""

    name = "bad_spec"
    Spec = BadSpecSpec

    def score(self, name, tensor):
        return tensor.abs()


class SilentWithoutCalibration(ScoreSparsifier):
    """Needs calibration but computes masks without it, and never forgets what it saw."""

    name = "sticky"
    needs_calibration = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: dict[str, torch.Tensor] = {}

    def observe(self, name, module, inputs):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float().abs().mean(0)
        self.seen[name] = self.seen[name] + x if name in self.seen else x

    def score(self, name, tensor):
        return tensor.abs().float() * self.seen.get(name, torch.ones(tensor.shape[-1]))


# -- deliberately wrong schedulers -------------------------------------------------------------
class Overshoots(Scheduler):
    """Goes 20% past the final level mid-way."""

    name = "overshoots"

    def level_at(self, t, final_level):
        return final_level * 1.2 * self.progress(t) if t < self.spec.end else final_level


class FallsShort(Scheduler):
    """Never quite reaches the final level."""

    name = "falls_short"

    def level_at(self, t, final_level):
        return 0.9 * final_level * self.progress(t)


class Counts(Scheduler):
    """Keeps a call counter: not a function of progress."""

    name = "counts"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def level_at(self, t, final_level):
        self.calls += 1
        return final_level * min(1.0, self.calls / 40) if t >= self.spec.start else 0.0


class EarlyStart(Scheduler):
    """Prunes before start."""

    name = "early_start"

    def level_at(self, t, final_level):
        return final_level * max(self.progress(t), 0.1)


# -- correct implementations pass ----------------------------------------------------------------
def test_magnitude_passes_every_check() -> None:
    report = check_sparsifier("magnitude")
    assert report.ok, str(report)
    assert set(report.passed) == set(check_names("sparsifier", "magnitude"))
    assert {"pattern_block_1x4", "pattern_nm_2_4", "importance_order_global", "bfloat16", "state_roundtrip"} <= set(report.passed)


@pytest.mark.parametrize("name", ["constant", "linear", "cubic", "step"])
def test_builtin_schedulers_pass_every_check(name: str) -> None:
    report = check_scheduler(name, raise_on_failure=True)
    assert len(report.passed) == len(report.results) >= 10


def test_a_class_is_checked_without_registration_and_without_the_registry_check() -> None:
    report = check_sparsifier(Magnitude)
    assert report.ok and "registered_name" not in report.passed and "class_attributes" in report.passed


# -- wrong implementations fail the named checks -----------------------------------------------
@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (KeepsTheLeastImportant, {"importance_order_layer", "importance_order_global", "pattern_nm_2_4"}),
        (ModifiesItsInput, {"inputs_not_modified", "state_roundtrip"}),
        (FloatMasks, {"masks_boolean_and_shaped", "levels_zero_and_one", "deterministic", "bfloat16", "tensor_ranks_1d_4d", "level_reached"}),
        (HalfTheLevel, {"level_reached", "levels_zero_and_one", "bfloat16", "tensor_ranks_1d_4d", "mapping_target"}),
        # scores that change between calls also break every ordering check
        (Unseeded, {"deterministic", "importance_order_layer", "importance_order_global", "pattern_nm_2_4"}),
        (NumpyScore, {"bfloat16"}),
        (MatrixOnly, {"tensor_ranks_1d_4d", "mapping_target"}),
        (SilentWithoutCalibration, {"calibration_required", "calibration_reset", "tensor_ranks_1d_4d"}),
    ],
    ids=lambda v: v.name if isinstance(v, type) else None,
)
def test_a_defect_fails_exactly_its_named_checks(cls: type, expected: set[str]) -> None:
    report = check_sparsifier(cls)
    assert set(report.failed) == expected, str(report)
    assert report.passed  # the rest still runs and passes


def test_failure_messages_name_the_culprit() -> None:
    failures = check_sparsifier(KeepsTheLeastImportant).failures
    assert "a pruned element scores" in failures["importance_order_layer"]
    assert "dtype torch.float32" in check_sparsifier(FloatMasks).failures["masks_boolean_and_shaped"]
    assert "modified ['0.weight'" in check_sparsifier(ModifiesItsInput).failures["inputs_not_modified"]
    assert "reached sparsity 0.1484, asked for 0.3" in check_sparsifier(HalfTheLevel, checks=["level_reached"]).failures["level_reached"]


def test_spec_defects_fail_the_spec_checks() -> None:
    report = check_sparsifier(BadSpec, {"required_thing": 3})
    assert set(report.failed) == {"spec_has_descriptions", "spec_json_roundtrip", "spec_json_schema"}, str(report)
    assert "['strength']" in report.failures["spec_has_descriptions"]
    without_args = check_sparsifier(BadSpec, checks=["spec_has_defaults"])
    assert "['required_thing']" in without_args.failures["spec_has_defaults"]


@pytest.mark.parametrize(
    ("cls", "expected"),
    [
        (Overshoots, {"values_within_zero_and_final"}),
        (FallsShort, {"ends_at_final"}),
        (Counts, {"pure_function_of_progress", "ends_at_final", "state_roundtrip"}),
        (EarlyStart, {"zero_before_start"}),
    ],
    ids=lambda v: v.name if isinstance(v, type) else None,
)
def test_a_wrong_scheduler_fails_its_named_checks(cls: type, expected: set[str]) -> None:
    report = check_scheduler(cls)
    assert set(report.failed) == expected, str(report)


def test_raise_on_failure_lists_every_failed_check() -> None:
    with pytest.raises(AssertionError) as info:
        check_sparsifier(KeepsTheLeastImportant, raise_on_failure=True)
    text = str(info.value)
    assert "failed 3 conformance check(s)" in text
    assert "importance_order_layer:" in text and "importance_order_global:" in text
    with pytest.raises(AssertionError, match="ends_at_final"):
        assert_conforms(FallsShort)
    assert isinstance(assert_conforms(Magnitude), KitReport)


def test_selected_checks_and_unknown_names() -> None:
    report = check_sparsifier(Magnitude, checks=["deterministic", "bfloat16"])
    assert [r.check for r in report.results] == ["deterministic", "bfloat16"]
    with pytest.raises(ValueError, match="unknown sparsifier checks \\['nope'\\]"):
        check_sparsifier(Magnitude, checks=["nope"])


def test_the_kit_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    check_sparsifier(Magnitude, checks=["deterministic"])
    assert torch.equal(torch.rand(3), expected)


# -- isolation and the pytest plugin ------------------------------------------------------------
def _plugin_module(name: str, *classes: type) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def register_sparsifiers(register):
        for cls in classes:
            register(cls)

    module.register_sparsifiers = register_sparsifiers
    return module


def test_isolated_registry_holds_the_builtins_and_one_plugin() -> None:
    registry = isolated_registry(_plugin_module("mine", Unseeded))
    loaded = [p.name for p in registry.plugins() if p.status == "loaded"]
    assert loaded == ["builtin", "mine"]
    assert registry.get("sparsifier", "unseeded").cls is Unseeded
    assert registry.get("sparsifier", "magnitude").cls is Magnitude


def test_isolated_registry_by_name_finds_the_installed_plugin_alone() -> None:
    registry = isolated_registry("sparsity-plugin-wanda")
    assert [p.name for p in registry.plugins() if p.status == "loaded"] == ["builtin", "wanda"]
    with pytest.raises(LookupError, match="no installed sparsity plugin is named 'not-installed-anywhere'"):
        isolated_registry("not-installed-anywhere")


def test_pytest_plugin_imports_no_torch() -> None:
    import subprocess

    code = "import sys, sparsity_core.testing.pytest_plugin, sparsity_core.testing; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# parametrize_with_checks, as plugin authors use it, on a local class and a plugin module.
@parametrize_with_checks([Magnitude, ("linear", {"start": 1, "end": 4})])
def test_parametrize_with_checks(check) -> None:
    check()


def _run_pytest(directory, source: str) -> str:
    import subprocess
    import textwrap

    (directory / "test_generated_kit_use.py").write_text(textwrap.dedent(source))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", "-rA"],
        cwd=directory, capture_output=True, text=True, timeout=300,
    )
    return proc.stdout + proc.stderr


def test_parametrize_with_checks_makes_one_named_test_per_check(tmp_path) -> None:
    out = _run_pytest(
        tmp_path,
        """
        import pytest, torch
        from sparsity_core import ScoreSparsifier
        from sparsity_core.testing import parametrize_with_checks

        class Inverted(ScoreSparsifier):
            '''Wrong on purpose.'''
            name = "inverted"
            def score(self, name, tensor):
                return -tensor.abs()

        @parametrize_with_checks([Inverted])
        def test_kit(check):
            check()
        """,
    )
    assert "20 passed" in out, out  # an inverted *score* is consistent: the kit cannot know the intent
    assert "PASSED test_generated_kit_use.py::test_kit[inverted-importance_order_layer]" in out


def test_sparsity_plugin_marker_isolates_the_registry(tmp_path) -> None:
    out = _run_pytest(
        tmp_path,
        """
        import pytest
        from sparsity_core import list_sparsifiers

        @pytest.mark.sparsity_plugin("wanda")
        def test_only_wanda(sparsity_registry):
            names = list_sparsifiers()
            assert "wanda" in names and "row_relative" not in names and "magnitude" in names

        def test_builtins_only(sparsity_registry):
            assert "wanda" not in list_sparsifiers()
        """,
    )
    assert "2 passed" in out, out
