"""Faults of the callbacks (issue 10, points 9 and 10), through real ``Trainer.fit`` runs."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparsity_core as sc
from sparsity_core.lightning import PostTrainingSparsity, TrainingAwareSparsity


def trainer(epochs: int = 1, callbacks: list[Any] | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, callbacks=callbacks or [], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
    )


class Scaled(pl.LightningModule):
    """The LightningModule scales its inputs before the submodule: the submodule alone would see other activations."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 2)
        self.scale = torch.logspace(-2, 2, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x * self.scale))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights stay put: masks are comparable


def data() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 2, (64,), generator=g)), batch_size=16)


def test_calibration_with_submodule_runs_the_whole_lightning_module() -> None:
    module = Scaled()
    cb = PostTrainingSparsity("wanda", {"sparsity_level": 0.5}, submodule="encoder", calibration_batches=4, verbose=False)
    trainer(callbacks=[cb]).fit(module, data())
    # what the submodule sees inside the LightningModule's forward: scaled inputs
    expected = Scaled().encoder
    sc.sparsify(expected, "wanda", {"sparsity_level": 0.5}, calibration=[x * module.scale for x, _ in data()])
    got = cb.sparsified
    assert got is not None and got is not module.encoder
    for (name, p), q in zip(got.named_parameters(), expected.parameters()):
        assert torch.equal(p, q), f"{name}: masks from the submodule alone, not from the model's forward"
    # the copy was swapped in for calibration only
    assert module.encoder is not got and isinstance(module.encoder, nn.Sequential)


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_a_second_fit_with_keep_masks_continues_from_the_sparse_state() -> None:
    module = Net()
    cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.8}, "linear", {"start": 0, "end": 2},
                               keep_masks=True, verbose=False, log_sparsity=False)
    trainer(3, [cb]).fit(module, data())
    assert cb.controller is not None
    first = cb.controller.report().overall
    assert abs(first - 0.8) < 0.005
    pruned = {n: ~m for n, m in cb.controller.masks.items()}
    trainer(2, [cb]).fit(module, data())
    # the schedule restarts with the new fit, but a weight pruned once stays pruned (v1: 0.80 -> 0.09)
    assert cb.controller.report().overall >= first
    for name, was_pruned in pruned.items():
        assert bool((module.model.get_parameter(name)[was_pruned] == 0).all())


def test_gradient_upkeep_keeps_pruned_weights_zero_through_a_fit() -> None:
    module = Net()
    seen: list[float] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            c = cb.controller
            if c is not None and c.masks:
                w, m = pl_module.model[0].weight, c.masks["0.weight"]
                seen.append(float(w.detach()[~m].abs().max()))
                # the gradient path, not the weights one: no step post-hook, a hook on the gradient
                assert not trainer.optimizers[0]._optimizer_step_post_hooks
                assert w._post_accumulate_grad_hooks

    cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.7}, "linear", {"start": 0, "end": 2},
                               upkeep="gradients", keep_masks=True, verbose=False, log_sparsity=False)
    trainer(3, [cb, Watch()]).fit(module, data())
    assert seen and max(seen) == 0.0  # no step moved a pruned weight, with no pass over the weights
    # the gradient hooks are gone once training ends (keep_masks detaches them)
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in module.parameters())
