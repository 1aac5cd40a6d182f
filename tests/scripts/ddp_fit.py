"""A 2-process CPU (gloo) DDP fit with the sparsity callbacks; each rank writes hashes of its masks
and weights to OUT_DIR/rank<N>.json. Run: python ddp_fit.py OUT_DIR (Lightning relaunches it)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsity_core import ScoreSparsifier
from sparsity_core.lightning import PostTrainingSparsity, TrainingAwareSparsity


class RankNoise(ScoreSparsifier):
    """Scores that differ on every rank: without the broadcast from rank 0, ranks would disagree."""

    name = "rank_noise_test"

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        return torch.rand(tensor.shape, generator=torch.Generator().manual_seed(1000 + rank))


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def main(out: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    data = DataLoader(TensorDataset(x, x @ torch.randn(8, 1, generator=g)), batch_size=8)
    torch.manual_seed(0)
    model = Net()
    random_cb = TrainingAwareSparsity("random", {"sparsity_level": 0.5, "seed": 7}, "linear", {"end": 2},
                                      submodule="model.0", keep_masks=True, verbose=False)
    noise_cb = TrainingAwareSparsity(RankNoise, {"sparsity_level": 0.6}, "linear", {"end": 2},
                                     submodule="model.2", keep_masks=True, verbose=False)
    post = PostTrainingSparsity(RankNoise, {"sparsity_level": 0.8}, verbose=False)
    # every rank can monitor the logged level; only rank zero writes the CSV file
    best = ModelCheckpoint(dirpath=out / "ckpt", monitor="sparsity/model.0/overall", mode="max", filename="best")
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=3,
                         logger=CSVLogger(out, name="logs", version=0), callbacks=[random_cb, noise_cb, post, best],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    masks = {}
    for prefix, cb in (("random.", random_cb), ("noise.", noise_cb)):
        assert cb.controller is not None
        masks.update({prefix + n: m for n, m in cb.controller.masks.items()})
    assert post.sparsified is not None
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "masks": digest(masks),
        "mask_names": sorted(masks),
        "pruned": {n: float((~m).float().mean()) for n, m in masks.items()},
        "weights": digest(dict(model.named_parameters())),
        "post_training": digest(dict(post.sparsified.named_parameters())),
        "best_checkpoint": Path(best.best_model_path).name,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
