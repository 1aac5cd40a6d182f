"""A 2-process CPU (gloo) DDP fit with the sparsity callbacks; each rank writes hashes of its masks
and weights to OUT_DIR/rank<N>.json. Run: python ddp_fit.py OUT_DIR [reconstruction] (Lightning
relaunches it). ``reconstruction``: a sparsifier that rewrites kept weights differently on each rank,
through TrainingAwareSparsity and PostTrainingSparsity(inplace=True); every rank must end with rank 0's."""

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

from sparsity_core import Capabilities, Reconstruction, ScoreSparsifier, Sparsifier
from sparsity_core.lightning import PostTrainingSparsity, TrainingAwareSparsity


class RankNoise(ScoreSparsifier):
    """Scores that differ on every rank: without the broadcast from rank 0, ranks would disagree."""

    name = "rank_noise_test"

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        return torch.rand(tensor.shape, generator=torch.Generator().manual_seed(1000 + rank))


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


class RankRescale(Sparsifier):
    """Reconstruction that differs on every rank: random masks seeded by the rank (nested), kept
    weights scaled by 2 + rank. It also works out what rank 0 returns, to check the broadcast."""

    name = "rank_rescale_test"
    capabilities = Capabilities(reconstruction=True)

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        #: per update: (rank 0's masks, rank 0's resulting weights, whether this rank's masks differ)
        self.updates: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bool]] = []

    def masks_of(self, r: int, tensors, levels, context) -> dict[str, torch.Tensor]:
        masks = {}
        for i, (name, t) in enumerate(tensors.items()):
            scores = torch.rand(t.shape, generator=torch.Generator().manual_seed(1000 * (r + 1) + 10 * len(self.updates) + i))
            current = context.current.get(name) if context is not None else None
            if current is not None:
                scores[~current] = -1.0  # nested: the pruned stay pruned
            keep = torch.ones(t.numel(), dtype=torch.bool)
            keep[scores.reshape(-1).argsort()[: round(levels[name] * t.numel())]] = False
            masks[name] = keep.view(t.shape)
        return masks

    def compute_masks(self, tensors, levels, context=None):
        mine = self.masks_of(rank(), tensors, levels, context)
        zero = self.masks_of(0, tensors, levels, context)
        expected = {n: torch.where(zero[n], tensors[n] * 2.0, 0.0) for n in tensors}
        differs = any(not torch.equal(mine[n], zero[n]) for n in tensors)
        self.updates.append((zero, expected, differs))
        return Reconstruction(mine, {n: t * (2.0 + rank()) for n, t in tensors.items()})


class AfterUpdates(pl.Callback):
    """Placed after a TrainingAwareSparsity: at each epoch end that updated the masks, whether the
    live weights and masks are rank 0's."""

    def __init__(self, cb: TrainingAwareSparsity) -> None:
        self.cb = cb
        self.checked = 0
        self.matches: list[bool] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        controller = self.cb.controller
        updates = controller.sparsifier.updates
        for masks, expected, _ in updates[self.checked :]:
            self.matches.append(
                all(torch.equal(controller.masks[n], masks[n]) and torch.equal(controller.tensors[n], expected[n]) for n in masks)
            )
        self.checked = len(updates)


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


def main_reconstruction(out: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    data = DataLoader(TensorDataset(x, x @ torch.randn(8, 1, generator=g)), batch_size=8)
    torch.manual_seed(0)
    model = Net()
    training = TrainingAwareSparsity(RankRescale, {"sparsity_level": 0.5}, "linear", {"end": 2},
                                     submodule="model.0", keep_masks=True, verbose=False)
    checks = AfterUpdates(training)
    post = PostTrainingSparsity(RankRescale, {"sparsity_level": 0.6}, submodule="model.2", inplace=True, verbose=False)
    before_post: dict[str, torch.Tensor] = {}

    class Trained(pl.Callback):
        def on_train_end(self, trainer, pl_module) -> None:
            before_post.update({n: p.detach().clone() for n, p in pl_module.model[2].named_parameters()})

    trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=3, logger=False,
                         callbacks=[training, checks, post, Trained()], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    assert post.controller is not None
    (masks, expected, post_differs), = post.controller.sparsifier.updates
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "training_updates": len(training.controller.sparsifier.updates),
        "training_matches_rank0": checks.matches,
        "training_own_masks_differ": [d for _, _, d in training.controller.sparsifier.updates],
        "post_matches_rank0": torch.equal(model.model[2].weight, expected["weight"]),
        "post_own_masks_differ": post_differs,
        "post_pruned_zero_kept_doubled": bool(
            torch.equal(model.model[2].weight[~masks["weight"]], torch.zeros(int((~masks["weight"]).sum())))
            and torch.equal(model.model[2].weight[masks["weight"]], 2 * before_post["weight"][masks["weight"]])
        ),
        "masks": digest(training.controller.masks),
        "weights": digest(dict(model.named_parameters())),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


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
    if sys.argv[2:] == ["reconstruction"]:
        main_reconstruction(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
