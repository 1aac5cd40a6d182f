"""A Lightning ``ModelParallelStrategy`` fit (FSDP2, ``fully_shard`` in ``configure_model``) on 2
CPU processes with TrainingAwareSparsity, then the same fit stopped at a checkpoint and resumed.
Each rank writes OUT_DIR/rank<N>.json. Run: python fsdp2_fit.py OUT_DIR (Lightning relaunches it).

Two callbacks: N:M 2:4 on ``model.0`` (exact from each rank's rows) and unstructured magnitude on
``model.2`` (7 rows: 4 + 3, so per-rank rounding would miss the global count by one)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsity_core._bits import PackedMask
from sparsity_core.lightning import PostTrainingSparsity, TrainingAwareSparsity

EPOCHS = 4


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 1))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g)
    return DataLoader(TensorDataset(x, x @ torch.randn(16, 1, generator=g)), batch_size=8)


def callbacks() -> list[Any]:
    common: dict[str, Any] = {"scheduler": "linear", "scheduler_args": {"end": 3}, "keep_masks": True, "verbose": False}
    return [
        TrainingAwareSparsity("magnitude", {"sparsity_level": 0.5, "pattern": "2:4"}, submodule="model.0", **common),
        TrainingAwareSparsity("magnitude", {"sparsity_level": 0.6}, submodule="model.2", **common),
        # at fit end, in place: model.4 is one row (rank 1 holds none) of 7 inputs (a ragged 2:4 tail)
        PostTrainingSparsity("magnitude", {"sparsity_level": 0.5, "pattern": "2:4"}, submodule="model.4", inplace=True, verbose=False),
    ]


def fit(out: Path, epochs: int, checkpoint: ModelCheckpoint | None = None, resume: str | None = None) -> tuple[pl.Trainer, Net, list[Any]]:
    model, cbs = Net(), callbacks()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), max_epochs=epochs, logger=False,
        callbacks=[*cbs, *([checkpoint] if checkpoint else [])], enable_checkpointing=checkpoint is not None,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
    )
    trainer.fit(model, data(), ckpt_path=resume)
    return trainer, model, cbs


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def summary(model: Net, cbs: list[Any]) -> dict[str, Any]:
    """Collectives (every rank calls them): the whole masks and weights."""
    masks: dict[str, torch.Tensor] = {}
    *cbs, post = cbs
    for cb in cbs:
        assert cb.controller is not None
        state = cb.controller.state_dict()  # whole masks, packed
        masks.update({f"{cb.submodule}.{n}": PackedMask(m, state["shapes"][n]).to_bool() for n, m in state["masks"].items()})
    weights = {n: p.full_tensor() for n, p in model.named_parameters()}
    nm = masks["model.0.weight"]
    return {
        "masks": digest(masks),
        "weights": digest(weights),
        "sharded": sorted(f"{cb.submodule}.{n}" for cb in cbs for n in cb.controller.shards),  # type: ignore[union-attr]
        "local_rows": {f"{cb.submodule}.{n}": s.rows for cb in cbs for n, s in cb.controller.shards.items()},  # type: ignore[union-attr]
        "nm_groups_2_of_4": bool(((~nm).view(-1, 4).sum(dim=1) == 2).all()),
        "pruned_are_zero": all(bool((weights[n][~m] == 0).all()) for n, m in masks.items()),
        "unstructured_pruned": int((~masks["model.2.weight"]).sum()),
        "reported": [cb.controller.report().overall for cb in cbs],  # type: ignore[union-attr]
        # post-training: squashed; 3 of the 7 inputs of the one row pruned (2 of the first 4, 1 of the 3 left)
        "post_training": [post.report.overall, int((weights["model.4.weight"] == 0).sum())],
    }


def main(out: Path) -> None:
    trainer, model, cbs = fit(out, EPOCHS)
    result: dict[str, Any] = {"rank": trainer.global_rank, "world_size": trainer.world_size}
    result["uninterrupted"] = summary(model, cbs)
    checkpoint = ModelCheckpoint(dirpath=out / "ckpt", save_last=True, save_top_k=0)
    fit(out, 2, checkpoint)
    trainer, model, cbs = fit(out, EPOCHS, resume=str(out / "ckpt" / "last.ckpt"))
    result["resumed"] = summary(model, cbs)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
