"""snip: connection sensitivity |g * w| with g the gradient of the loss over the calibration batches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsity_core import SparsityController
from sparsity_plugin_movement import Snip


def _classifier_and_batches() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        x = torch.randn(10, 8, generator=gen) * torch.linspace(0.1, 3.0, 8)
        batches.append((x, (x[:, -3:] * torch.tensor([1.0, -1.0, 0.5])).argmax(1)))
    return model, batches


def _observe(controller: SparsityController, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """What one-shot gradient calibration does: one autograd.grad per batch, handed over per tensor."""
    names = list(controller.tensors)
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, [controller.tensors[n] for n in names])
        for name, grad in zip(names, grads):
            controller.sparsifier.observe_gradient(name, controller.tensors[name], grad)


def _reference(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """By hand: the gradient of the loss summed over all batches, times the weight, in absolute value."""
    params = dict(model.named_parameters())
    total = sum(nn.functional.cross_entropy(model(x), y) for x, y in batches)
    grads = torch.autograd.grad(total, [params[n] for n in names])
    return {n: (g * params[n]).abs().detach() for n, g in zip(names, grads)}


def _keep_top(scores: torch.Tensor, level: float) -> torch.Tensor:
    prune = round(level * scores.numel())
    threshold = scores.reshape(-1).kthvalue(prune).values
    return scores > threshold


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_snip_keeps_the_connections_of_largest_gradient_times_weight(scope: str) -> None:
    model, batches = _classifier_and_batches()
    controller = SparsityController(model, Snip, {"sparsity_level": 0.7, "scope": scope})
    assert list(controller.tensors) == ["0.weight", "2.weight"]
    reference = _reference(model, batches, list(controller.tensors))
    weights_before = {n: t.detach().clone() for n, t in controller.tensors.items()}
    _observe(controller, model, batches)

    for name, expected in reference.items():
        torch.testing.assert_close(controller.sparsifier.score(name, controller.tensors[name]), expected)
    controller.step()

    if scope == "layer":
        expected_masks = {n: _keep_top(s, 0.7) for n, s in reference.items()}
    else:
        flat = torch.cat([s.reshape(-1) for s in reference.values()])
        threshold = flat.kthvalue(round(0.7 * flat.numel())).values
        expected_masks = {n: s > threshold for n, s in reference.items()}
    for name, mask in controller.masks.items():
        assert torch.equal(mask, expected_masks[name]), name
        # Not magnitude in disguise: |w| alone would choose otherwise.
        magnitude = weights_before[name].abs()
        if scope == "layer":
            assert not torch.equal(mask, _keep_top(magnitude, 0.7)), name
    assert controller.report().overall == pytest.approx(0.7, abs=1 / 176)


def test_over_several_batches_gradients_are_summed_before_the_absolute_value() -> None:
    # The paper's g is the gradient over all of D: batch gradients that cancel leave a connection
    # insensitive (|sum_b g_b| * |w|), although each batch alone found it sensitive.
    snip = Snip({"sparsity_level": 0.5})
    w = torch.tensor([1.0, 1.0])
    snip.observe_gradient("w", w, torch.tensor([1.0, 1.0]))
    snip.observe_gradient("w", w, torch.tensor([-1.0, 0.2]))
    torch.testing.assert_close(snip.score("w", w), torch.tensor([0.0, 1.2]))
    assert snip.compute_masks({"w": w}, {"w": 0.5})["w"].tolist() == [False, True]  # sum_b |g_b w| would keep the first


def test_snip_without_gradients_says_how_to_give_them() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)snip has no gradients for 'w'.*sparsify\(model, 'snip', args, calibration=\[\(x, y\)"):
        Snip().score("w", torch.ones(3))


def test_weights_changing_between_observations_keep_their_own_products() -> None:
    snip = Snip()
    snip.observe_gradient("w", torch.tensor([2.0, 1.0]), torch.tensor([1.0, -1.0]))
    snip.observe_gradient("w", torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(snip.score("w", torch.ones(2)), torch.tensor([1.0, 2.0]))
