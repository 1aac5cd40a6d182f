"""The conformance kit: correct implementations pass every check, wrong ones fail the named check."""

from __future__ import annotations

import math
import random
import sys
import types

import pytest
import torch
from pydantic import Field

from sparsity_core import Capabilities, Reconstruction, Scheduler, ScoreSparsifier, ScoreSpec, Sparsifier, hookimpl
from sparsity_core._layers import generic_layout
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


#: The checks a plain ScoreSparsifier (no capabilities) skips: those of other kinds of class.
NOT_FOR_A_PLAIN_SCORE = {
    "level_reached", "level_overall", "reconstruction_result", "reconstruction_error",
    "calibration_required", "gradients_required", "calibration_reset",
}


# -- correct implementations pass ----------------------------------------------------------------
def test_magnitude_passes_every_check() -> None:
    report = check_sparsifier("magnitude")
    assert report.ok, str(report)
    assert [r.check for r in report.results] == check_names("sparsifier", "magnitude")
    assert {"pattern_block_1x4", "pattern_nm_2_4", "pattern_channel", "importance_order_global", "bfloat16", "state_roundtrip"} <= set(report.passed)
    # what does not apply is reported, with the reason, never dropped
    assert set(report.skipped) == NOT_FOR_A_PLAIN_SCORE
    assert report.skips["calibration_required"] == "magnitude needs no calibration (capabilities.calibration is False)"
    assert report.skips["reconstruction_error"] == "magnitude does not update kept weights (capabilities.reconstruction is False)"
    assert "skip gradients_required: magnitude needs no gradients" in str(report)


@pytest.mark.parametrize("name", ["constant", "linear", "cubic", "step"])
def test_builtin_schedulers_pass_every_check(name: str) -> None:
    report = check_scheduler(name, raise_on_failure=True)
    assert len(report.passed) == len(report.results) >= 10


def test_a_class_is_checked_without_registration_and_without_the_registry_check() -> None:
    report = check_sparsifier(Magnitude)
    assert report.ok and "registered_name" not in report.passed and "class_attributes" in report.passed
    assert report.skips["registered_name"] == "given as a class, not a registered name: there is no name to resolve through the registry"


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

    import os
    from pathlib import Path

    import sparsity_core

    (directory / "test_generated_kit_use.py").write_text(textwrap.dedent(source))
    # the child imports the sparsity_core under test (this checkout), not whichever one is installed
    here = str(Path(sparsity_core.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "error", "-rA"],
        cwd=directory, capture_output=True, text=True, timeout=300, env=env,
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
    assert "22 passed, 8 skipped" in out, out  # an inverted *score* is consistent: the kit cannot know the intent
    assert "PASSED test_generated_kit_use.py::test_kit[inverted-pattern_channel]" in out
    # a check that does not apply is its own test too, skipped with the reason
    assert "inverted needs no gradients (capabilities.gradients is False)" in out, out
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


# -- the kit reads capabilities ------------------------------------------------------------------
# Inline sparsifiers, one per capability, correct ones and ones with one defect each; every
# report is asserted whole: which checks pass, which fail and which are skipped (with the reason).
SPEC_CHECKS = {"class_attributes", "spec_has_descriptions", "spec_has_defaults", "spec_forbids_extra", "spec_json_roundtrip", "spec_json_schema"}
SCORE_CHECKS = {
    "level_unstructured_layer", "level_unstructured_global", "pattern_block_1x4", "pattern_nm_2_4", "pattern_channel",
    "importance_order_layer", "importance_order_global",
}
COMMON_CHECKS = {"masks_boolean_and_shaped", "levels_zero_and_one", "inputs_not_modified", "nested_masks", "deterministic", "state_roundtrip", "bfloat16", "tensor_ranks_1d_4d", "mapping_target"}


def _outcomes(report: KitReport) -> tuple[set[str], set[str], set[str]]:
    return set(report.passed), set(report.failed), set(report.skipped)


class LeastSquares(Sparsifier):
    """Prune by |w| x input RMS (per tensor), then refit each row's kept weights by least squares on the calibration inputs."""

    name = "least_squares"
    capabilities = Capabilities(calibration=True, reconstruction=True, layer_kinds={"linear"}, tensor_ranks={2})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gram: dict[str, torch.Tensor] = {}

    def reset_calibration(self):
        self.gram.clear()

    def observe(self, name, module, inputs):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        self.gram[name] = self.gram[name] + x.T @ x if name in self.gram else x.T @ x

    def masks(self, name, tensor, level, context=None):
        if name not in self.gram:
            raise RuntimeError(f"least_squares has no inputs for {name!r}: it needs calibration batches")
        score = tensor.double().abs() * self.gram[name].diagonal().sqrt()
        k = round(level * tensor.numel())
        current = context.current.get(name) if context is not None else None
        if current is not None:  # nested: what is pruned stays pruned (and counts toward the level)
            score = score.masked_fill(~current, -float("inf"))
            k = max(k, int((~current).sum()))
        keep = torch.ones(tensor.numel(), dtype=torch.bool)
        keep[score.reshape(-1).argsort()[:k]] = False
        return keep.view(tensor.shape)

    def refit(self, name, tensor, keep):
        h = self.gram[name]
        h = h + 1e-8 * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
        w = tensor.double()
        new = torch.zeros_like(w)
        for i in range(w.shape[0]):
            k = keep[i].nonzero().view(-1)
            if k.numel():  # min ||(w - w') X||: w'_K = H_KK^-1 H_K: w
                new[i, k] = torch.linalg.solve(h[k][:, k], h[k] @ w[i])
        return new

    def compute_masks(self, tensors, levels, context=None):
        masks = {n: self.masks(n, t, levels[n], context) for n, t in tensors.items()}
        weights = {n: self.refit(n, t, masks[n]).to(t.dtype) for n, t in tensors.items()}
        return Reconstruction(masks, weights)


class WritesItsInputs(LeastSquares):
    """Writes the refit weights into the tensors itself."""

    name = "writes_inputs"

    def compute_masks(self, tensors, levels, context=None):
        result = super().compute_masks(tensors, levels, context)
        for n, t in tensors.items():
            t.copy_(result.weights[n])
        return result


class MakesErrorWorse(LeastSquares):
    """Scales the kept weights by 1.5: a valid result that makes every layer worse than the mask alone."""

    name = "makes_error_worse"

    def compute_masks(self, tensors, levels, context=None):
        masks = {n: self.masks(n, t, levels[n], context) for n, t in tensors.items()}
        return Reconstruction(masks, {n: t * masks[n] * 1.5 for n, t in tensors.items()})


class LeavesPrunedNonzero(LeastSquares):
    """Refits the kept weights but hands back the original values at the pruned positions."""

    name = "leaves_pruned"

    def compute_masks(self, tensors, levels, context=None):
        masks, weights = super().compute_masks(tensors, levels, context)
        return Reconstruction(masks, {n: torch.where(masks[n], w, tensors[n]) for n, w in weights.items()})


RECONSTRUCTION_SKIPS = {
    "registered_name": "given as a class, not a registered name: there is no name to resolve through the registry",
    "level_overall": "least_squares does not allocate levels (capabilities.allocates_levels is False): each tensor's level is checked by level_reached",
    "mapping_target": "least_squares needs calibration (activations), a mapping of tensors has none",
    "gradients_required": "least_squares needs no gradients (capabilities.gradients is False)",
    "tensor_ranks_1d_4d": (
        "the conv probe is outside what least_squares supports: '0.weight' (Conv2d, kind conv, rank 4): not one of its "
        "layer_kinds ['linear']; the with_vector probe is outside what least_squares supports: '1.weight' (LayerNorm, "
        "kind None, rank 1): not one of its layer_kinds ['linear']"
    ),
    **dict.fromkeys(SCORE_CHECKS, "least_squares selects its own masks (not a ScoreSparsifier): it has no pattern or scope"),
}


def test_a_correct_reconstruction_passes_its_own_rules() -> None:
    report = check_sparsifier(LeastSquares)
    passed, failed, skipped = _outcomes(report)
    assert not failed, str(report)
    assert passed == SPEC_CHECKS | {
        "masks_boolean_and_shaped", "level_reached", "levels_zero_and_one", "inputs_not_modified", "reconstruction_result",
        "reconstruction_error", "nested_masks", "deterministic", "state_roundtrip", "bfloat16", "calibration_required",
        "calibration_reset",
    }, str(report)
    assert report.skips == RECONSTRUCTION_SKIPS, str(report)
    # compute_masks still may not write its inputs; the step itself is the reconstruction checks' business
    assert "checked by reconstruction_result and reconstruction_error" in report["inputs_not_modified"].message


@pytest.mark.parametrize(
    ("cls", "check", "message"),
    [
        (WritesItsInputs, "inputs_not_modified", "calibration or compute_masks modified ['0.weight', '2.weight']"),
        (MakesErrorWorse, "reconstruction_error", "the update makes the layer output error ||WX - W'X|| worse than pruning alone: '0.weight': "),
        (LeavesPrunedNonzero, "reconstruction_result", "torch.float32: weights for '0.weight' are nonzero at 256 of its 256 pruned positions"),
    ],
    ids=["writes_inputs", "makes_error_worse", "leaves_pruned"],
)
def test_a_reconstruction_defect_fails_exactly_its_check(cls: type, check: str, message: str) -> None:
    report = check_sparsifier(cls)
    assert report.failed == [check], str(report)
    assert report.failures[check].startswith(message), report.failures[check]
    assert set(report.skipped) == set(RECONSTRUCTION_SKIPS)


def test_the_error_rule_compares_with_the_mask_alone() -> None:
    """The scaled kept weights are worse on every layer; the refit is better than the mask alone."""
    failure = check_sparsifier(MakesErrorWorse, checks=["reconstruction_error"]).failures["reconstruction_error"]
    assert "'0.weight'" in failure and "'2.weight'" in failure
    assert check_sparsifier(LeastSquares, checks=["reconstruction_error"]).ok


def test_a_reconstruction_that_is_not_declared_fails() -> None:
    class Undeclared(LeastSquares):
        """Returns a Reconstruction without declaring it."""

        name = "undeclared"
        capabilities = Capabilities(calibration=True, layer_kinds={"linear"}, tensor_ranks={2})

    report = check_sparsifier(Undeclared, checks=["masks_boolean_and_shaped", "reconstruction_result"])
    assert "capabilities.reconstruction is False" in report.failures["masks_boolean_and_shaped"]
    assert report.skips == {"reconstruction_result": "undeclared does not update kept weights (capabilities.reconstruction is False)"}


class Sensitivity(ScoreSparsifier):
    """SNIP-style: |w x dL/dw| summed over the observed gradients."""

    name = "sensitivity"
    capabilities = Capabilities(gradients=True)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saliency: dict[str, torch.Tensor] = {}
        self.calls: list[tuple[str, bool]] = []

    def reset_calibration(self):
        self.saliency.clear()

    def observe_gradient(self, name, tensor, grad):
        self.calls.append((name, isinstance(tensor, torch.nn.Parameter)))
        s = (tensor.detach() * grad).abs().float()
        self.saliency[name] = self.saliency[name] + s if name in self.saliency else s

    def score(self, name, tensor):
        if name not in self.saliency:
            raise RuntimeError(f"sensitivity has no gradients for {name!r}: pass a loss_fn, or use it in training")
        return self.saliency[name].to(tensor.device)


class RemembersGradients(Sensitivity):
    """Never forgets what it saw."""

    name = "remembers"

    def reset_calibration(self):
        pass


class FallsBackToMagnitude(Sensitivity):
    """Without gradients, silently scores by magnitude."""

    name = "falls_back"

    def score(self, name, tensor):
        return self.saliency[name] if name in self.saliency else tensor.abs().float()


def test_the_kit_feeds_gradients_to_a_gradient_sparsifier() -> None:
    report = check_sparsifier(Sensitivity)
    passed, failed, skipped = _outcomes(report)
    assert not failed, str(report)
    assert passed == SPEC_CHECKS | SCORE_CHECKS | (COMMON_CHECKS - {"mapping_target"}) | {"gradients_required", "calibration_reset"}
    assert report.skips == {
        "registered_name": "given as a class, not a registered name: there is no name to resolve through the registry",
        "level_reached": "sensitivity is a ScoreSparsifier: its levels are checked per pattern and scope (level_unstructured_layer, level_unstructured_global)",
        "level_overall": "sensitivity does not allocate levels (capabilities.allocates_levels is False): each tensor's level is checked by level_unstructured_layer",
        "reconstruction_result": "sensitivity does not update kept weights (capabilities.reconstruction is False)",
        "reconstruction_error": "sensitivity does not update kept weights (capabilities.reconstruction is False)",
        "mapping_target": "sensitivity needs gradients (a loss), a mapping of tensors has none",
        "calibration_required": "sensitivity needs no calibration (capabilities.calibration is False)",
    }


def test_gradients_come_from_the_probe_loss_on_the_live_parameters() -> None:
    from sparsity_core.testing import _checks, _probes

    probe = _probes.mlp(0)
    setup = _checks._prepare(_checks.Subject("sparsifier", Sensitivity), probe)
    sparsifier = setup.sparsifier
    # once per batch and covered parameter, with the parameter itself; nothing left in .grad
    assert sparsifier.calls == [(n, True) for _ in probe.batches for n in ("0.weight", "2.weight")]
    assert all(p.grad is None for p in probe.model.parameters())
    # the saliency is |w x grad| of MSE against the probe's targets, summed over its batches
    model = _probes.mlp(0).model
    expected = torch.zeros_like(model[2].weight)
    for x, y in zip(probe.batches, probe.targets):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        expected += (model[2].weight * model[2].weight.grad).abs().detach()
    torch.testing.assert_close(sparsifier.saliency["2.weight"], expected)


@pytest.mark.parametrize(
    ("cls", "check", "message"),
    [
        (RemembersGradients, "calibration_reset", "statistics from an earlier calibration leaked into ['0.weight', '2.weight']"),
        (FallsBackToMagnitude, "gradients_required", "masks were computed with no gradient observed; raise an error that asks for gradients"),
    ],
    ids=["remembers", "falls_back"],
)
def test_a_gradient_defect_fails_exactly_its_check(cls: type, check: str, message: str) -> None:
    report = check_sparsifier(cls)
    assert report.failed == [check], str(report)
    assert report.failures[check].startswith(message), report.failures[check]


def test_a_gradient_error_must_mention_gradients() -> None:
    class Vague(Sensitivity):
        """Fails without gradients, but does not say why."""

        name = "vague"

        def score(self, name, tensor):
            return self.saliency[name]

    failure = check_sparsifier(Vague, checks=["gradients_required"]).failures["gradients_required"]
    assert failure.startswith("the error does not mention gradients: KeyError: '0.weight'")


class LinearOnly(ScoreSparsifier):
    """Magnitude, for Linear layers only."""

    name = "linear_only"
    capabilities = Capabilities(layer_kinds={"linear"}, tensor_ranks={2})

    def score(self, name, tensor):
        return tensor.abs()


class NoVectors(LinearOnly):
    """Magnitude, for matrices and kernels (ranks 2 and 4)."""

    name = "no_vectors"
    capabilities = Capabilities(tensor_ranks={2, 4})


def test_probes_outside_the_layer_kinds_are_skipped_with_the_reason() -> None:
    report = check_sparsifier(LinearOnly)
    assert not report.failed, str(report)
    assert set(report.passed) == SPEC_CHECKS | SCORE_CHECKS | COMMON_CHECKS - {"tensor_ranks_1d_4d", "mapping_target"}
    assert report.skips["tensor_ranks_1d_4d"] == (
        "the conv probe is outside what linear_only supports: '0.weight' (Conv2d, kind conv, rank 4): not one of its "
        "layer_kinds ['linear']; the with_vector probe is outside what linear_only supports: '1.weight' (LayerNorm, "
        "kind None, rank 1): not one of its layer_kinds ['linear']"
    )
    assert report.skips["mapping_target"] == "linear_only supports layer kinds ['linear'] only, the tensors of a mapping have no layer kind"
    assert set(report.skipped) == NOT_FOR_A_PLAIN_SCORE | {"registered_name", "tensor_ranks_1d_4d", "mapping_target"}


def test_a_probe_outside_the_tensor_ranks_is_skipped_the_rest_checked() -> None:
    report = check_sparsifier(NoVectors)
    assert not report.failed and set(report.skipped) == NOT_FOR_A_PLAIN_SCORE | {"registered_name"}, str(report)
    # the check passes on the 4-D probe and says which probe it left out, and why
    assert report["tensor_ranks_1d_4d"].message == (
        "skipped: the with_vector probe is outside what no_vectors supports: '1.weight' (LayerNorm, kind None, rank 1): "
        "not one of its tensor_ranks [2, 4]"
    )
    assert report["mapping_target"].message == "left out 'vector' (rank 1): not one of its tensor_ranks [2, 4]"


def _global_channel_masks(tensors, levels, context):
    """Rank the rows (matrix view) of every tensor together by mean |w|; prune the lowest rows
    while that brings the pruned count closer to the overall target."""
    rows = []
    for name, t in tensors.items():
        layout = context.layout(name, t) if context is not None else generic_layout()
        m = layout.matrix(t)
        current = context.current.get(name) if context is not None else None
        hit = (~layout.matrix(current)).any(1) if current is not None else torch.zeros(m.shape[0], dtype=torch.bool)
        # nested: a row holding a pruned weight is pruned again first
        rows += [(-float("inf") if hit[i] else float(m[i].abs().mean()), m.shape[1], name, i) for i in range(m.shape[0])]
    target = sum(levels[n] * t.numel() for n, t in tensors.items())
    pruned, chosen = 0, set()
    for score, size, name, i in sorted(rows):
        if abs(pruned + size - target) > abs(pruned - target):
            break
        pruned += size
        chosen.add((name, i))
    masks = {}
    for name, t in tensors.items():
        layout = context.layout(name, t) if context is not None else generic_layout()
        keep = torch.ones(layout.matrix(t).shape, dtype=torch.bool)
        keep[[i for n, i in chosen if n == name]] = False
        masks[name] = layout.from_matrix(keep, t.shape)
    return masks


class GlobalChannels(Sparsifier):
    """Prunes whole rows ranked across all tensors: allocates each tensor's level itself."""

    name = "global_channels"
    capabilities = Capabilities(allocates_levels=True)

    def compute_masks(self, tensors, levels, context=None):
        return _global_channel_masks(tensors, levels, context)


class UndeclaredAllocation(GlobalChannels):
    """The same ranking, without declaring allocates_levels."""

    name = "undeclared_allocation"
    capabilities = Capabilities()


def test_allocates_levels_checks_the_overall_level_instead() -> None:
    report = check_sparsifier(GlobalChannels)
    passed, failed, skipped = _outcomes(report)
    assert not failed, str(report)
    assert passed == SPEC_CHECKS | COMMON_CHECKS | {"level_overall"}
    assert report.skips["level_reached"] == (
        "global_channels allocates levels itself (capabilities.allocates_levels): only the overall level is promised, "
        "not each tensor's (checked by level_overall)"
    )
    assert skipped == {"registered_name", "level_reached", "reconstruction_result", "reconstruction_error", "calibration_required", "gradients_required", "calibration_reset"} | SCORE_CHECKS
    # undeclared, the same masks fail every per-tensor level check (issue 8: "fails 4 kit checks")
    undeclared = check_sparsifier(UndeclaredAllocation)
    assert set(undeclared.failed) == {"level_reached", "bfloat16", "tensor_ranks_1d_4d", "mapping_target"}, str(undeclared)
    assert "level_overall" in undeclared.skipped


def test_the_overall_level_is_still_checked() -> None:
    class OverPrunes(GlobalChannels):
        """Asks for more than it was given."""

        name = "over_prunes"

        def compute_masks(self, tensors, levels, context=None):
            return super().compute_masks(tensors, {n: min(1.0, v * 1.5) for n, v in levels.items()}, context)

    failure = check_sparsifier(OverPrunes, checks=["level_overall"]).failures["level_overall"]
    assert failure.startswith("level 0.3 (overall: over_prunes allocates levels): pruned ")


class RowScoresUnstructured(ScoreSparsifier):
    """Emulates channels with one score per row but selects elements: the cut splits a row."""

    name = "row_scores"

    def score(self, name, tensor):
        rows = tensor.abs().reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.abs().reshape(1, -1)
        return rows.mean(1, keepdim=True).expand_as(rows).reshape(tensor.shape).contiguous()

    def spec_for(self, name):
        spec = super().spec_for(name)
        return spec.model_copy(update={"pattern": "unstructured"}) if spec.pattern == "channel" else spec


def test_partly_pruned_channels_fail_the_channel_check() -> None:
    report = check_sparsifier(RowScoresUnstructured)
    assert report.failed == ["pattern_channel"], str(report)
    assert report.failures["pattern_channel"].startswith("channel/layer at 0.3: '0.weight' has 1 of 16 rows partly kept")


class GenericNM(ScoreSparsifier):
    """Magnitude whose compute_masks takes a context but drops it (v1's generic view)."""

    name = "generic_nm"

    def score(self, name, tensor):
        return tensor.abs()

    def compute_masks(self, tensors, levels, context=None):
        return super().compute_masks(tensors, levels)


def test_nm_on_a_conv_weight_runs_along_its_input_channels() -> None:
    """2:4 on a Conv2d weight: groups are 4 input channels at one kernel position (the matrix view)."""
    assert check_sparsifier(Magnitude, checks=["tensor_ranks_1d_4d"]).ok
    failure = check_sparsifier(GenericNM, checks=["tensor_ranks_1d_4d"]).failures["tensor_ranks_1d_4d"]
    assert failure.startswith("conv probe, 2:4: '0.weight' keeps ")
    assert "along its reduction axis (conv layout, matrix view (8, 36))" in failure


class Reviver(Sparsifier):
    """Takes the context, ignores its current masks: weights pruned earlier come back."""

    name = "reviver"

    def compute_masks(self, tensors, levels, context=None):
        masks = {}
        for n, t in tensors.items():
            k = round(levels[n] * t.numel())
            keep = torch.ones(t.numel(), dtype=torch.bool)
            keep[t.detach().abs().reshape(-1).argsort()[:k]] = False
            masks[n] = keep.view(t.shape)
        return masks


def test_ignoring_the_current_masks_fails_exactly_nested_masks() -> None:
    report = check_sparsifier(Reviver)
    assert set(report.failed) == {"nested_masks"}, str(report)
    assert "pruned by the current mask are kept again" in report.failures["nested_masks"]


def test_a_regrowing_sparsifier_skips_nested_masks_with_the_reason() -> None:
    class Regrows(Reviver):
        """The same, declaring regrowth."""

        name = "regrows"
        capabilities = Capabilities(regrowth=True)

    report = check_sparsifier(Regrows)
    assert not report.failed, str(report)
    assert report.skips["nested_masks"] == "regrows declares regrowth: pruned weights may come back"
