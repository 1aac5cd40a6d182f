"""movement: the first-order movement score from real gradients, and where it parts from magnitude.

Gradients are delivered here by calling ``observe_gradient`` after each backward, as the core's
optimizer hook does in training (see test_public_api.py for the same through the core).
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from sparsity_core import SparsityController, sparsify
from sparsity_plugin_movement import Movement

# One output, six inputs: two large weights the loss pulls to zero, two small ones it pushes away
# from zero, two medium ones already right.
START = torch.tensor([[3.0, -3.0, 0.5, -0.5, 1.5, -1.5]])
TRUTH = torch.tensor([[0.0, 0.0, 2.0, -2.0, 1.5, -1.5]])


def _train(controller: SparsityController, layer: nn.Linear, steps: int, lr: float = 0.05) -> torch.Tensor:
    """SGD on a noiseless regression towards TRUTH, handing each step's gradient to the
    sparsifier before the update; returns the hand-computed -sum_t W_t * g_t."""
    gen = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    expected = torch.zeros_like(layer.weight)
    for _ in range(steps):
        x = torch.randn(32, START.shape[1], generator=gen)
        optimizer.zero_grad()
        nn.functional.mse_loss(layer(x), x @ TRUTH.T).backward()
        expected -= layer.weight.detach() * layer.weight.grad
        for name, tensor in controller.tensors.items():
            controller.sparsifier.observe_gradient(name, tensor, tensor.grad)
        optimizer.step()
    return expected


def _layer() -> nn.Linear:
    layer = nn.Linear(START.shape[1], 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(START)
    return layer


def test_large_weights_moving_to_zero_are_pruned_by_movement_and_kept_by_magnitude() -> None:
    layer = _layer()
    controller = SparsityController(layer, Movement, {"sparsity_level": 2 / 6})
    expected_score = _train(controller, layer, steps=5)

    # After 5 steps the shrinking weights are still the largest, the growing ones the smallest.
    w = layer.weight.detach().abs()[0]
    assert w[:2].min() > w[4:].max() > w[4:].min() > w[2:4].max()
    torch.testing.assert_close(controller.sparsifier.score("weight", layer.weight), expected_score)

    magnitude = nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        magnitude.weight.copy_(layer.weight)
    controller.step()
    sparsify(magnitude, "magnitude", {"sparsity_level": 2 / 6})
    assert controller.masks["weight"].tolist() == [[False, False, True, True, True, True]]
    assert (magnitude.weight != 0).tolist() == [[True, True, False, False, True, True]]
    assert layer.weight[0, :2].eq(0).all()  # the controller zeroed what movement pruned


def test_the_score_is_minus_the_running_sum_of_weight_times_gradient() -> None:
    movement = Movement()
    w1, w2 = torch.tensor([[1.0, -2.0, 3.0]]), torch.tensor([[0.5, -1.0, 4.0]])
    g1, g2 = torch.tensor([[0.5, 0.5, -1.0]]), torch.tensor([[-2.0, 1.0, 0.25]])
    movement.observe_gradient("w", w1, g1)
    movement.observe_gradient("w", w2, g2)
    torch.testing.assert_close(movement.score("w", w2), -(w1 * g1 + w2 * g2))
    assert movement.observed == {"w": 2}
    # Scores come from the gradients, not from the tensor handed to score() (beyond its shape).
    torch.testing.assert_close(movement.score("w", torch.zeros(1, 3)), -(w1 * g1 + w2 * g2))


def test_scoring_without_gradients_says_how_to_give_them() -> None:
    movement = Movement()
    with pytest.raises(RuntimeError, match=r"(?s)no gradients for 'w'.*needs gradients.*attach\(optimizer\).*loss_fn="):
        movement.score("w", torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="needs gradients.*TrainingAwareSparsity"):
        SparsityController(nn.Linear(4, 2), Movement).step()


def test_reset_calibration_forgets_the_scores() -> None:
    movement = Movement()
    movement.observe_gradient("w", torch.ones(2), torch.ones(2))
    movement.reset_calibration()
    assert movement.observed == {}
    with pytest.raises(RuntimeError, match="needs gradients"):
        movement.score("w", torch.ones(2))


def test_low_precision_weights_and_gradients_are_summed_in_float32() -> None:
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(64, generator=gen).bfloat16() for _ in range(20)]
    gs = [torch.randn(64, generator=gen).mul(1e-3).bfloat16() for _ in range(20)]
    movement = Movement()
    for w, g in zip(ws, gs):
        movement.observe_gradient("w", w, g)
    expected = -sum(w.float() * g.float() for w, g in zip(ws, gs))
    score = movement.score("w", ws[-1])
    assert score.dtype == torch.float32
    torch.testing.assert_close(score, expected, rtol=1e-6, atol=1e-9)


def test_non_finite_gradient_elements_are_not_summed() -> None:
    movement = Movement()
    movement.observe_gradient("w", torch.ones(3), torch.tensor([1.0, float("inf"), float("nan")]))
    movement.observe_gradient("w", torch.ones(3), torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(movement.score("w", torch.ones(3)), torch.tensor([-2.0, -2.0, -3.0]))


def test_a_parameter_without_gradient_has_not_moved() -> None:
    movement = Movement()
    movement.observe_gradient("unused", torch.ones(2, 2), None)
    torch.testing.assert_close(movement.score("unused", torch.ones(2, 2)), torch.zeros(2, 2))


def test_shape_mismatches_are_errors_that_name_the_tensor() -> None:
    movement = Movement()
    with pytest.raises(ValueError, match=r"gradient of 'w' has shape \(3,\).*tensor has \(2,\)"):
        movement.observe_gradient("w", torch.ones(2), torch.ones(3))
    movement.observe_gradient("w", torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match=r"'w' has shape \(4,\).*observed with shape \(2,\)"):
        movement.score("w", torch.ones(4))


def test_scores_are_not_written_by_the_core() -> None:
    # Nested masks make the core fill pruned positions' scores with -inf: never in our sums.
    movement = Movement({"sparsity_level": 0.5})
    movement.observe_gradient("w", torch.ones(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    current = torch.tensor([True, True, True, False])
    from sparsity_core import MaskContext

    masks = movement.compute_masks({"w": torch.ones(4)}, {"w": 0.5}, MaskContext(current={"w": current}))
    assert masks["w"].tolist() == [True, True, False, False]
    torch.testing.assert_close(movement.score("w", torch.ones(4)), torch.tensor([-1.0, -2.0, -3.0, -4.0]))


def test_patterns_come_from_the_core() -> None:
    movement = Movement({"pattern": "2:4"})
    score = torch.tensor([[4.0, -1.0, 3.0, 2.0, -5.0, 0.5, 0.25, 1.0]])
    movement.observe_gradient("w", torch.ones(1, 8), -score)  # so that S = score
    masks = movement.compute_masks({"w": torch.ones(1, 8)}, {"w": 0.5})
    assert masks["w"].tolist() == [[True, False, True, False, False, True, False, True]]


def test_state_dict_round_trips_through_torch_save() -> None:
    movement = Movement()
    movement.observe_gradient("w", torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5]))
    buffer = io.BytesIO()
    torch.save(movement.state_dict(), buffer)
    buffer.seek(0)
    restored = Movement()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(restored.score("w", torch.ones(2)), movement.score("w", torch.ones(2)))
    assert restored.observed == {"w": 1}
