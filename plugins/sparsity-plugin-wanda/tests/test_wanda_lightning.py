"""Wanda through the Lightning callbacks in real fits: calibrated on the training batches."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsity_core import sparsify
from sparsity_core.lightning import PostTrainingSparsity, TrainingAwareSparsity


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


def _data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    # Feature scales from 0 (dead) to 10: wanda's masks differ from magnitude's.
    x = torch.randn(160, 16, generator=g) * torch.linspace(0, 10, 16)
    y = (x[:, -4:].argmax(1)).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def _trainer(callback: pl.Callback, epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
    )


@pytest.mark.slow
def test_post_training_wanda_calibrates_on_the_first_training_batches() -> None:
    module, data = Classifier(), _data()
    callback = PostTrainingSparsity("wanda", {"sparsity_level": 0.5}, calibration_batches=3, verbose=False)
    _trainer(callback).fit(module, data)

    # The same as one-shot wanda on the trained network with the first 3 training inputs.
    expected = copy.deepcopy(module.model).eval()
    sparsify(expected, "wanda", {"sparsity_level": 0.5}, calibration=[x for x, _ in list(data)[:3]])
    for (name, got), want in zip(callback.sparsified.named_parameters(), expected.parameters()):
        assert torch.equal(got == 0, want == 0), name
    assert callback.report.overall == 0.5
    assert (callback.sparsified[0].weight[:, 0] == 0).all()  # the dead feature's weights go first
    assert not (module.model[0].weight == 0).any()  # the trained model is left dense

    magnitude = copy.deepcopy(module.model)
    sparsify(magnitude, "magnitude", {"sparsity_level": 0.5})
    assert not torch.equal(magnitude[0].weight == 0, callback.sparsified[0].weight == 0)


@pytest.mark.slow
def test_training_aware_wanda_recalibrates_at_each_level_change() -> None:
    calls: list[int] = []

    class Counting(TrainingAwareSparsity):
        def _calibrate(self, trainer, controller, network):
            calls.append(trainer.current_epoch)
            super()._calibrate(trainer, controller, network)

    callback = Counting("wanda", {"sparsity_level": 0.5}, "linear", {"start": 0, "end": 2}, calibration_batches=2, verbose=False)
    module = Classifier()
    _trainer(callback, epochs=3).fit(module, _data())
    # After epochs 1 and 2 (levels 0.25, 0.5); not at train start (level 0) nor after epoch 3 (unchanged).
    assert calls == [0, 1]
    assert callback.report["0.weight"] == 0.5 and callback.report["2.weight"] == 0.5


def test_wanda_without_calibration_batches_is_refused_before_training() -> None:
    # the capabilities say so at construction: no fit is run to find out
    with pytest.raises(ValueError, match=r"'wanda' needs activations \(capabilities.calibration\), but calibration_batches=0"):
        PostTrainingSparsity("wanda", calibration_batches=0, verbose=False)
