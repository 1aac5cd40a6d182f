"""movement and snip through the core's public API: the core computes and delivers the gradients.

One shot, ``sparsify(..., calibration=[(x, y), ...], loss_fn=...)``; in plain PyTorch,
``SparsityController.attach(optimizer)``; in Lightning, ``TrainingAwareSparsity``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsity_core import SparsityController, sparsify

# The regression of test_movement.py: two large weights the loss pulls to zero, two small ones it
# pushes away from zero, two medium ones already right.
START = torch.tensor([[3.0, -3.0, 0.5, -0.5, 1.5, -1.5]])
TRUTH = torch.tensor([[0.0, 0.0, 2.0, -2.0, 1.5, -1.5]])


def _classifier_and_batches() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        x = torch.randn(10, 8, generator=gen) * torch.linspace(0.1, 3.0, 8)
        batches.append((x, (x[:, -3:] * torch.tensor([1.0, -1.0, 0.5])).argmax(1)))
    return model, batches


def _summed_products(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """By hand: g * w, g the gradient of the loss summed over the batches, for both weights."""
    names = ["0.weight", "2.weight"]
    params = dict(model.named_parameters())
    total = sum(nn.functional.cross_entropy(model(x), y) for x, y in batches)
    grads = torch.autograd.grad(total, [params[n] for n in names])
    return {n: (g * params[n]).detach() for n, g in zip(names, grads)}


def _keep_top(scores: torch.Tensor, level: float) -> torch.Tensor:
    return scores > scores.reshape(-1).kthvalue(round(level * scores.numel())).values


@pytest.mark.parametrize(("name", "sign"), [("snip", None), ("movement", -1.0)])
def test_one_shot_sparsify_with_a_loss(name: str, sign: float | None) -> None:
    model, batches = _classifier_and_batches()
    products = _summed_products(model, batches)
    report = sparsify(model, name, {"sparsity_level": 0.7}, calibration=batches, loss_fn=nn.functional.cross_entropy)
    assert report["0.weight"] == pytest.approx(0.7, abs=1e-2) and report["2.weight"] == pytest.approx(0.7, abs=1e-2)
    params = dict(model.named_parameters())
    for param_name, product in products.items():
        expected = product.abs() if sign is None else sign * product
        assert torch.equal(params[param_name] != 0, _keep_top(expected, 0.7)), param_name


def test_one_shot_without_a_loss_says_gradients_are_needed() -> None:
    model, batches = _classifier_and_batches()
    with pytest.raises((RuntimeError, ValueError, TypeError), match="gradient"):
        sparsify(model, "snip", {"sparsity_level": 0.5})


def test_a_frozen_layer_is_named_in_the_error_and_can_be_excluded() -> None:
    model, batches = _classifier_and_batches()
    model[0].weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"(?s)snip has no gradients for '0.weight'.*frozen parameter.*exclude it"):
        sparsify(model, "snip", {"sparsity_level": 0.5}, calibration=batches, loss_fn=nn.functional.cross_entropy)
    report = sparsify(model, "snip", {"sparsity_level": 0.5, "exclude": ["0.*"]}, calibration=batches, loss_fn=nn.functional.cross_entropy)
    assert list(report) == ["2.weight"] and report["2.weight"] == 0.5


def test_plain_pytorch_training_loop_with_attach() -> None:
    layer = nn.Linear(6, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(START)
    controller = SparsityController(layer, "movement", {"sparsity_level": 2 / 6}, "linear", {"start": 3, "end": 5, "unit": "step"})
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    controller.attach(optimizer)
    gen = torch.Generator().manual_seed(0)
    for step in range(8):
        x = torch.randn(32, 6, generator=gen)
        optimizer.zero_grad()
        nn.functional.mse_loss(layer(x), x @ TRUTH.T).backward()
        optimizer.step()  # the controller's pre-hook hands the gradient over, its post-hook re-masks
        controller.step(step + 1)
    assert controller.sparsifier.observed == {"weight": 8}  # once per optimizer step
    assert controller.levels == {"weight": pytest.approx(2 / 6)}
    # The two largest weights, pulled to zero, are the ones pruned; the small growing ones live.
    assert controller.masks["weight"].tolist() == [[False, False, True, True, True, True]]
    assert layer.weight[0, :2].eq(0).all() and layer.weight[0, 2:].ne(0).all()


@pytest.mark.slow
def test_lightning_training_aware_movement_reaches_the_level() -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from sparsity_core.lightning import TrainingAwareSparsity

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(160, 16, generator=gen)
    y = x[:, :4].argmax(1)
    data = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    callback = TrainingAwareSparsity("movement", {"sparsity_level": 0.75}, "cubic", {"start": 0, "end": 3}, verbose=False)
    trainer = pl.Trainer(
        max_epochs=4, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
    )
    module = Classifier()
    trainer.fit(module, data)

    assert callback.controller.sparsifier.observed == {"0.weight": trainer.global_step, "2.weight": trainer.global_step}
    assert callback.report["0.weight"] == 0.75 and callback.report["2.weight"] == 0.75
    with torch.no_grad():
        accuracy = (module(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5  # far above chance (0.25) with 3 of 4 weights gone: it trained through its masks
