"""Checkpoints: the callback's state rides in Lightning checkpoints and resuming is exact."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from sparsity_core import ScoreSparsifier
from sparsity_core.lightning import TrainingAwareSparsity
from test_lightning import BiasedMLP, mlp_data, trainer


class ValidatedMLP(BiasedMLP):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))


class History(pl.Callback):
    """At each epoch start (after the sparsity callback's train-start update): t and masks."""

    def __init__(self, cb: TrainingAwareSparsity) -> None:
        self.cb = cb
        self.seen: dict[int, tuple[float | None, dict[str, torch.Tensor]]] = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        c = self.cb.controller
        assert c is not None
        self.seen[trainer.current_epoch] = (c.t, {n: m.clone() for n, m in c.masks.items()})


class LargestFirst(ScoreSparsifier):
    """Prunes the largest weights: recomputing at the same level picks other ones (the pruned are
    now zero, the least "important"), so a resumed run must take its masks from the checkpoint."""

    name = "largest_first_test"

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return -tensor.abs()


def run(
    tmp: Path,
    unit: str,
    *,
    validate: bool,
    save_on_train_epoch_end: bool | None,
    ckpt_path: Path | None = None,
    sparsifier: Any = "magnitude",
):
    pl.seed_everything(0, verbose=False)
    model = ValidatedMLP(optimizer="adam", lr=0.01) if validate else BiasedMLP(optimizer="adam", lr=0.01)
    end = 4 if unit == "epoch" else 16  # 4 steps per epoch
    cb = TrainingAwareSparsity(
        sparsifier, {"sparsity_level": 0.8}, "cubic", {"start": 1 if unit == "epoch" else 2, "end": end, "unit": unit},
        keep_masks=True, verbose=False,
    )
    ckpt = ModelCheckpoint(dirpath=tmp, filename="{epoch}", save_top_k=-1, every_n_epochs=1,
                           save_on_train_epoch_end=save_on_train_epoch_end)
    history = History(cb)
    t = trainer(callbacks=[cb, history, ckpt], max_epochs=6, enable_checkpointing=True,
                num_sanity_val_steps=2 if validate else 0)
    t.fit(model, mlp_data(), mlp_data() if validate else None, ckpt_path=ckpt_path)
    return model, cb, history.seen


# resuming into the directory that holds the checkpoint is the normal case
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize(
    ("unit", "validate", "save_on_train_epoch_end", "sparsifier"),
    [
        ("epoch", False, None, "magnitude"),  # saved at train epoch end, after the mask update
        ("epoch", True, False, "magnitude"),  # saved at validation end, before the mask update
        ("step", False, None, "magnitude"),
        ("epoch", False, None, LargestFirst),  # masks that the weights alone do not determine
        ("step", False, None, LargestFirst),
    ],
)
def test_resume_from_a_checkpoint_is_exact(
    tmp_path: Path, unit: str, validate: bool, save_on_train_epoch_end: bool | None, sparsifier: Any
) -> None:
    kw = dict(validate=validate, save_on_train_epoch_end=save_on_train_epoch_end, sparsifier=sparsifier)
    whole, whole_cb, whole_seen = run(tmp_path, unit, **kw)
    # the same dirpath, or ModelCheckpoint warns that it cannot restore its own state
    resumed, resumed_cb, resumed_seen = run(tmp_path, unit, ckpt_path=tmp_path / "epoch=2.ckpt", **kw)
    # the resumed run starts at epoch 3 with the schedule position and masks the whole run had
    assert sorted(resumed_seen) == [3, 4, 5]
    for epoch, (t, masks) in resumed_seen.items():
        assert t == whole_seen[epoch][0]
        assert masks.keys() == whole_seen[epoch][1].keys()
        assert all(torch.equal(m, whole_seen[epoch][1][n]) for n, m in masks.items())
    assert whole_cb.controller is not None and resumed_cb.controller is not None
    a, b = whole_cb.controller, resumed_cb.controller
    assert a.t == b.t and a.levels == b.levels
    assert a.masks.keys() == b.masks.keys() and a.masks
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
    for (name, p), (_, q) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), name
    assert max(a.levels.values()) == pytest.approx(0.8)


def test_checkpoint_holds_masks_and_loads_with_weights_only(tmp_path: Path) -> None:
    model = BiasedMLP()
    cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.5}, "linear", {"end": 2}, verbose=False)
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    t = trainer(callbacks=[cb, ckpt_cb], max_epochs=2, enable_checkpointing=True)
    t.fit(model, mlp_data())
    ckpt = torch.load(tmp_path / "epoch=0.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("TrainingAwareSparsity")]
    assert state["controller"]["t"] == 1.0
    assert state["controller"]["levels"]["0.weight"] == pytest.approx(0.25)
    packed, shape = state["controller"]["masks"]["0.weight"], state["controller"]["shapes"]["0.weight"]
    assert packed.dtype == torch.uint8  # 1 bit per weight, NumPy's little-endian bit order
    mask = torch.from_numpy(np.unpackbits(packed.numpy(), count=math.prod(shape), bitorder="little")).bool().view(shape)
    assert float((~mask).float().mean()) == pytest.approx(0.25, abs=0.01)


def test_two_callbacks_on_different_submodules_keep_separate_state() -> None:
    a = TrainingAwareSparsity("magnitude", submodule="model.0")
    b = TrainingAwareSparsity("magnitude", submodule="model.2")
    assert a.state_key != b.state_key


def test_a_state_from_another_version_is_refused() -> None:
    cb = TrainingAwareSparsity("magnitude")
    with pytest.raises(ValueError, match="unsupported checkpoint state version"):
        cb.load_state_dict({"version": 99, "controller": {}})
