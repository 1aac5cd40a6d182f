"""SparseGPT through the Lightning post-training callback: calibrated on the first training
batches, it reconstructs the kept weights exactly as one-shot sparsify() does."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsity_core import sparsify
from sparsity_core.lightning import PostTrainingSparsity


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_post_training_sparsegpt_equals_one_shot_on_the_first_training_batches() -> None:
    g = torch.Generator().manual_seed(0)
    mixing = torch.randn(16, 4, generator=g) @ torch.randn(4, 16, generator=g) + 0.1 * torch.eye(16)
    x = torch.randn(160, 16, generator=g) @ mixing
    data = DataLoader(TensorDataset(x, x[:, :4].argmax(1)), batch_size=16, shuffle=False)
    module = Classifier()
    callback = PostTrainingSparsity("sparsegpt", {"pattern": "2:4"}, calibration_batches=3, verbose=False)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
    )
    trainer.fit(module, data)

    expected = copy.deepcopy(module.model).eval()
    sparsify(expected, "sparsegpt", {"pattern": "2:4"}, calibration=[b for b, _ in list(data)[:3]])
    got = dict(callback.sparsified.named_parameters())
    for name, want in expected.named_parameters():
        assert torch.equal(got[name] == 0, want == 0), name
        torch.testing.assert_close(got[name], want)
    assert callback.report.overall == 0.5
