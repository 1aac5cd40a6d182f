"""Contract v2 through the public API: v1 sparsifiers unchanged, nested masks and regrowth,
reconstruction, and gradients (delivered by ``attach`` in training, by ``loss_fn`` one-shot)."""

from __future__ import annotations

import copy
import zlib
from collections.abc import Mapping
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sparsity_core import (
    Capabilities,
    MaskContext,
    Reconstruction,
    ScoreSparsifier,
    Sparsifier,
    SparsityController,
    list_sparsifiers,
    sparsify,
)
from _grad_probe import GradProbe  # tests/_grad_probe.py: a sparsifier that records gradients


# -- helpers ------------------------------------------------------------------------------------
def net(seed: int = 0) -> nn.Sequential:
    """Two Linear weights of 200 elements each: 0.3, 0.5 and 0.6 of each (and of both) are whole."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 10))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith("weight")}


def zeros(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(int((t == 0).sum()) for t in tensors.values())


def batches(n: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)) for _ in range(n)]


def random_keep(shape: torch.Size, level: float, seed: int) -> torch.Tensor:
    """A bool mask pruning exactly round(level * numel) random elements."""
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(seed)).reshape(-1)
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[scores.argsort()[: round(level * scores.numel())]] = False
    return keep.view(shape)


def magnitude_keep(tensor: torch.Tensor, level: float) -> torch.Tensor:
    flat = tensor.detach().abs().reshape(-1)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[flat.argsort()[: round(level * flat.numel())]] = False
    return keep.view(tensor.shape)


# -- 1. v1 compatibility ------------------------------------------------------------------------
class V1Random(Sparsifier):
    """A v1 override: a fresh random mask at every call, no context parameter, no capabilities."""

    name = "v1_random_test"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.raw: list[dict[str, torch.Tensor]] = []

    def compute_masks(self, tensors, levels):  # type: ignore[override]  # the v1 signature, on purpose
        call = len(self.raw)
        masks = {n: random_keep(t.shape, levels[n], seed=100 * call + i) for i, (n, t) in enumerate(tensors.items())}
        self.raw.append({n: m.clone() for n, m in masks.items()})
        return masks


def test_a_v1_override_without_context_runs_and_is_held_to_nested_masks() -> None:
    model = net()
    before = {n: t.detach().clone() for n, t in weights(model).items()}
    c = SparsityController(model, V1Random, {"sparsity_level": 0.5})
    assert c.sparsifier.capabilities == Capabilities()
    assert c.step() is True
    first = dict(c.masks)
    for name, mask in first.items():
        assert torch.equal(mask, c.sparsifier.raw[0][name])
        assert (c.tensors[name][~mask] == 0).all()
        assert torch.equal(c.tensors[name][mask], before[name][mask])  # kept weights untouched
    c.update_masks()  # same level, other random masks: the v1 class knows nothing of the first ones
    raw = c.sparsifier.raw[1]
    assert any((raw[n] & ~first[n]).any() for n in raw), "the second raw mask revives nothing: the test proves nothing"
    for name, mask in c.masks.items():
        assert torch.equal(mask, raw[name] & first[name]), name  # intersected with the masks in force
        assert not (mask & ~first[name]).any()
        assert (c.tensors[name][~mask] == 0).all()


def test_the_example_plugin_runs_unchanged() -> None:
    assert "row_relative" in list_sparsifiers()
    model = net()
    before = {n: t.detach().clone() for n, t in weights(model).items()}
    report = sparsify(model, "row_relative", {"sparsity_level": 0.5})
    assert list(report) == ["0.weight", "2.weight"] and report.overall == 0.5
    for name, w in weights(model).items():
        a = before[name].abs()
        expected = magnitude_keep(a / (a.mean(dim=1, keepdim=True) + 1e-12), 0.5)
        assert torch.equal(w != 0, expected), name

    # gradual, through the controller: nested and exact at every level
    model = net(1)
    c = SparsityController(model, "row_relative", {"sparsity_level": 0.6}, "linear", {"end": 2})
    c.step(1)
    first = dict(c.masks)
    assert zeros(c.tensors) == 120
    c.step(2)
    assert zeros(c.tensors) == 240
    assert all(not (c.masks[n] & ~first[n]).any() for n in first)


# -- 2. nested masks ----------------------------------------------------------------------------
class Shifting(ScoreSparsifier):
    """Random scores that change at every update (the test bumps ``round``): without the nested
    policy, the weights pruned earlier would be 'revived' by the new masks while staying zero."""

    name = "shifting_test"
    capabilities = Capabilities()

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.round = 0

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7919 * self.round)
        return torch.rand(tensor.shape, generator=g)


class Regrowing(Shifting):
    """Shifting scores, and it declares regrowth (RigL-style): a pruned weight may come back."""

    name = "regrowing_test"
    capabilities = Capabilities(regrowth=True)


def unforced_keep(sparsifier: Shifting, name: str, tensor: torch.Tensor, level: float) -> torch.Tensor:
    scores = sparsifier.score(name, tensor).reshape(-1)
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[scores.argsort()[: round(level * scores.numel())]] = False
    return keep.view(tensor.shape)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_two_updates_at_the_same_level_end_at_that_level_of_actual_zeros(scope: str) -> None:
    model = net()
    c = SparsityController(model, Shifting, {"sparsity_level": 0.5, "scope": scope})
    c.step()
    first = dict(c.masks)
    c.sparsifier.round = 1
    if scope == "layer":  # the new scores alone would choose other weights
        assert any(not torch.equal(unforced_keep(c.sparsifier, n, t, 0.5), first[n]) for n, t in c.tensors.items())
    c.update_masks()
    assert zeros(c.tensors) == 200  # counted from the tensors: 0.5 of 400, not more
    assert c.report().overall == 0.5
    for name, mask in c.masks.items():
        assert not (mask & ~first[name]).any(), f"{name}: a pruned weight was revived"
        assert (c.tensors[name][~mask] == 0).all() and (c.tensors[name][mask] != 0).all()
        if scope == "layer":
            assert c.report()[name] == 0.5


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_gradual_schedule_is_nested_and_exact(scope: str) -> None:
    model = net()
    c = SparsityController(model, Shifting, {"sparsity_level": 0.6, "scope": scope}, "linear", {"end": 2})
    c.step(1)
    first = dict(c.masks)
    assert zeros(c.tensors) == 120
    c.sparsifier.round = 1
    c.step(2)
    assert zeros(c.tensors) == 240
    assert c.report().overall == pytest.approx(0.6, abs=1e-12)
    for name, mask in c.masks.items():
        assert not (mask & ~first[name]).any(), f"{name}: a pruned weight was revived"
        assert int((~mask).sum()) == int((c.tensors[name] == 0).sum())
        if scope == "layer":
            assert int((~mask).sum()) == 120


def test_with_regrowth_a_revived_weight_restarts_from_zero_and_trains_again() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    c = SparsityController(model, Regrowing, {"sparsity_level": 0.5})
    c.attach(opt)
    c.step()
    first = dict(c.masks)
    c.sparsifier.round = 1
    c.update_masks()
    revived = {n: c.masks[n] & ~first[n] for n in first}
    assert any(r.any() for r in revived.values()), "regrowth revived nothing"
    for name, mask in c.masks.items():
        assert torch.equal(mask, unforced_keep(c.sparsifier, name, c.tensors[name], 0.5)), name  # the scores alone
        assert (c.tensors[name][revived[name]] == 0).all(), f"{name}: a revived weight did not restart from zero"
    x, y = batches(1)[0]
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    opt.step()
    moved = sum(int((c.tensors[n][revived[n]] != 0).sum()) for n in revived)
    assert moved > 0, "no revived weight trained again"
    for name, mask in c.masks.items():
        assert (c.tensors[name][~mask] == 0).all()


class ContextProbe(Sparsifier):
    """A v2 override: magnitude masks that keep the pruned pruned, recording what it is told."""

    name = "context_probe_test"
    capabilities = Capabilities()

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.contexts: list[MaskContext | None] = []

    def compute_masks(self, tensors, levels, context=None):  # type: ignore[no-untyped-def]
        self.contexts.append(context)
        return {n: magnitude_keep(t, levels[n]) for n, t in tensors.items()}


def test_a_v2_override_is_told_the_masks_in_force_and_the_layouts() -> None:
    c = SparsityController(net(), ContextProbe, {"sparsity_level": 0.6}, "linear", {"end": 2})
    c.step(1)
    first = dict(c.masks)
    c.step(2)
    one, two = c.sparsifier.contexts
    assert one is not None and two is not None
    assert dict(one.current) == {}
    assert two.current.keys() == first.keys()
    assert all(torch.equal(two.current[n], first[n]) for n in first)
    assert {n: layout.kind for n, layout in two.layouts.items()} == {"0.weight": "linear", "2.weight": "linear"}


# -- 3. reconstruction ---------------------------------------------------------------------------
class Rescale(Sparsifier):
    """Magnitude masks, and the kept weights doubled (a reconstruction test sparsifier)."""

    name = "rescale_test"
    capabilities = Capabilities(reconstruction=True)
    factor = 2.0

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.inputs: dict[str, torch.Tensor] = {}

    def new_weights(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: t * self.factor for n, t in tensors.items()}

    def compute_masks(self, tensors, levels, context=None):  # type: ignore[no-untyped-def]
        self.inputs = {n: t.detach().clone() for n, t in tensors.items()}
        masks = {n: magnitude_keep(t, levels[n]) for n, t in tensors.items()}
        return Reconstruction(masks, self.new_weights(tensors))


class Undeclared(Rescale):
    """Returns Reconstruction without declaring the capability."""

    name = "undeclared_test"
    capabilities = Capabilities()


class WrongShape(Rescale):
    """Returns the second tensor's new weights transposed."""

    name = "wrong_shape_test"

    def new_weights(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = super().new_weights(tensors)
        out["2.weight"] = out["2.weight"].t()
        return out


def test_reconstruction_writes_kept_weights_and_zeroes_pruned_ones() -> None:
    model = net()
    before = {n: t.detach().clone() for n, t in weights(model).items()}
    sparsifier = Rescale({"sparsity_level": 0.5})
    report = sparsify(model, sparsifier)
    assert report.overall == 0.5
    for name, w in weights(model).items():
        assert torch.equal(sparsifier.inputs[name], before[name])  # masks chosen on the weights as they were
        keep = magnitude_keep(before[name], 0.5)
        assert (w[~keep] == 0).all()
        assert torch.equal(w[keep], before[name][keep] * 2), name


def test_reconstruction_of_some_tensors_only_leaves_the_others_alone() -> None:
    class OnlyFirst(Rescale):
        """Reconstructs only the first Linear."""

        name = "only_first_test"

        def new_weights(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {n: w for n, w in super().new_weights(tensors).items() if n == "0.weight"}

    model = net()
    before = {n: t.detach().clone() for n, t in weights(model).items()}
    c = SparsityController(model, OnlyFirst, {"sparsity_level": 0.5})
    c.step()
    keep = {n: magnitude_keep(t, 0.5) for n, t in before.items()}
    assert torch.equal(c.tensors["0.weight"], torch.where(keep["0.weight"], before["0.weight"] * 2, 0.0))
    assert torch.equal(c.tensors["2.weight"], torch.where(keep["2.weight"], before["2.weight"], 0.0))


def test_returning_reconstruction_without_the_capability_is_a_type_error_naming_the_sparsifier() -> None:
    model = net()
    before = {n: t.detach().clone() for n, t in weights(model).items()}
    with pytest.raises(TypeError, match=r"undeclared_test.*capabilities\.reconstruction"):
        sparsify(model, Undeclared, {"sparsity_level": 0.5})
    assert all(torch.equal(w, before[n]) for n, w in weights(model).items())


def test_wrong_shaped_new_weights_are_a_value_error() -> None:
    model = net()
    with pytest.raises(ValueError, match=r"wrong_shape_test.*'2\.weight'.*\(10, 20\)"):
        sparsify(model, WrongShape, {"sparsity_level": 0.5})


def test_a_refused_reconstruction_leaves_weights_and_masks_as_they_were() -> None:
    # '0.weight' comes back well formed and '2.weight' does not: nothing may be half written
    model = net()
    before = {n: t.detach().clone() for n, t in weights(model).items()}
    c = SparsityController(model, WrongShape, {"sparsity_level": 0.5})
    with pytest.raises(ValueError, match="wrong_shape_test"):
        c.step()
    assert c.masks == {}
    for name, w in weights(model).items():
        assert torch.equal(w, before[name]), f"{name} was written although the update was refused"


# -- 5. gradients ---------------------------------------------------------------------------------


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in weights(model).items() if p.grad is not None}


def test_attach_delivers_each_gradient_once_per_step_with_accumulation() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    c = SparsityController(model, GradProbe, {"sparsity_level": 0.5})
    c.attach(opt)
    probe: GradProbe = c.sparsifier  # type: ignore[assignment]
    live = weights(model)
    for step, ((x1, y1), (x2, y2)) in enumerate(zip(batches(3, seed=1), batches(3, seed=2))):
        opt.zero_grad()
        F.mse_loss(model(x1), y1).backward()
        half = grads(model)
        F.mse_loss(model(x2), y2).backward()
        assert len(probe.seen) == 2 * step  # nothing on backward: only at the step
        accumulated = grads(model)
        values = {n: t.detach().clone() for n, t in live.items()}
        opt.step()
        got = probe.seen[2 * step :]
        assert sorted(n for n, *_ in got) == ["0.weight", "2.weight"]  # each covered parameter once
        for name, tensor, value, grad in got:
            assert tensor is live[name]  # the live parameter, not a copy
            assert torch.equal(value, values[name])  # before the update
            assert torch.equal(grad, accumulated[name])  # both micro-batches
            assert not torch.equal(grad, half[name])


def test_two_optimizers_each_deliver_their_own_parameters() -> None:
    model = net()
    opt_a = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt_b = torch.optim.Adam(model[2].parameters(), lr=0.01)
    c = SparsityController(model, GradProbe, {"sparsity_level": 0.5})
    c.attach(opt_a)
    c.attach(opt_b)
    probe: GradProbe = c.sparsifier  # type: ignore[assignment]
    for x, y in batches(2):
        probe.seen.clear()
        opt_a.zero_grad()
        opt_b.zero_grad()
        F.mse_loss(model(x), y).backward()
        expected = grads(model)
        opt_a.step()
        assert [n for n, *_ in probe.seen] == ["0.weight"]
        opt_b.step()
        assert [n for n, *_ in probe.seen] == ["0.weight", "2.weight"]
        for name, tensor, _, grad in probe.seen:
            assert tensor is weights(model)[name] and torch.equal(grad, expected[name])


def step_hooks(opt: torch.optim.Optimizer) -> int:
    return len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


@pytest.mark.parametrize("end", ["detach", "squash"])
def test_detach_and_squash_remove_every_optimizer_hook(end: str) -> None:
    model = net()
    opts = [torch.optim.SGD(model[0].parameters(), lr=0.1), torch.optim.SGD(model[2].parameters(), lr=0.1)]
    c = SparsityController(model, GradProbe, {"sparsity_level": 0.5})
    for opt in opts:
        c.attach(opt)
    assert [step_hooks(o) for o in opts] == [2, 2]  # gradients before, masks after
    c.step()
    getattr(c, end)()
    assert [step_hooks(o) for o in opts] == [0, 0]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_one_shot_gradient_calibration_matches_autograd_and_leaves_grad_alone() -> None:
    model = net()
    data = batches(3)
    ref = copy.deepcopy(model)
    ref_params = [ref[0].weight, ref[2].weight]
    expected = [torch.autograd.grad(F.mse_loss(ref(x), y), ref_params) for x, y in data]
    probe = GradProbe({"sparsity_level": 0.5})
    report = sparsify(model, probe, calibration=data, loss_fn=F.mse_loss)
    assert report.overall == 0.5
    assert [n for n, *_ in probe.seen] == ["0.weight", "2.weight"] * 3  # once per batch
    for i, (name, tensor, _, grad) in enumerate(probe.seen):
        assert tensor is dict(model.named_parameters())[name]
        torch.testing.assert_close(grad, expected[i // 2][i % 2], rtol=0, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_one_shot_gradient_calibration_misuse_fails_clearly() -> None:
    data = batches(2)
    with pytest.raises(ValueError, match=r"grad_probe_test.*needs gradients.*loss_fn"):
        sparsify(net(), GradProbe, {"sparsity_level": 0.5})
    with pytest.raises(ValueError, match=r"grad_probe_test.*loss_fn"):
        sparsify(net(), GradProbe, {"sparsity_level": 0.5}, calibration=data)
    with pytest.raises(ValueError, match=r"grad_probe_test.*calibration="):
        sparsify(net(), GradProbe, {"sparsity_level": 0.5}, loss_fn=F.mse_loss)
    with pytest.raises(TypeError, match=r"\(inputs, targets\)"):
        sparsify(net(), GradProbe, {"sparsity_level": 0.5}, calibration=[x for x, _ in data], loss_fn=F.mse_loss)


def test_a_loss_fn_for_a_sparsifier_that_takes_no_gradients_is_refused() -> None:
    # a loss the sparsifier would silently ignore is a mistake worth naming (magnitude, or an
    # activation sparsifier such as wanda)
    model = net()
    before = {n: t.detach().clone() for n, t in weights(model).items()}
    with pytest.raises(ValueError, match=r"magnitude.*does not use gradients"):
        sparsify(model, "magnitude", {"sparsity_level": 0.5}, calibration=batches(2), loss_fn=F.mse_loss)
    assert all(torch.equal(w, before[n]) for n, w in weights(model).items())


def test_first_party_wanda_reaches_the_level_exactly_when_its_scores_change() -> None:
    # In training, wanda recalibrates before each update on activations that have changed. Its
    # compute_masks is a v1 override (no context), so the controller intersects the new masks
    # with the current ones; the level still holds because a pruned weight (zero) scores zero and
    # is chosen again first. Were that to change, the weights would end sparser than asked.
    pytest.importorskip("sparsity_plugin_wanda")
    model = net()
    g = torch.Generator().manual_seed(5)
    early = [torch.randn(16, 10, generator=g) for _ in range(2)]
    late = [torch.randn(16, 10, generator=g) * torch.linspace(0.1, 3.0, 10) for _ in range(2)]
    c = SparsityController(model, "wanda", {"sparsity_level": 0.6}, "linear", {"end": 2})
    c.calibrate(early)
    c.step(1)
    first = dict(c.masks)
    assert zeros(c.tensors) == 120
    c.calibrate(late)
    c.step(2)
    assert all(not (c.masks[n] & ~first[n]).any() for n in first)  # nested
    assert zeros(c.tensors) == 240, f"{zeros(c.tensors) / 400:.3f} of the weights are zero at level 0.6"
