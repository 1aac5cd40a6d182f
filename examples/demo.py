"""The main job (`make demo`): gradual magnitude pruning of a digits classifier to 90% sparsity.

1. Train a small MLP (64 -> 256 -> 256 -> 10, at ``.model``) densely on scikit-learn's bundled
   digits (no download) and measure its test accuracy.
2. Keep training it with ``TrainingAwareSparsity("magnitude", cubic schedule)``: the masks tighten
   at each epoch end until 90% of every weight matrix is zero, the network adapts in between, and
   the masks are squashed at the end.
3. Print dense vs sparse test accuracy (and, for contrast, the same level applied in one shot by
   ``PostTrainingSparsity`` without fine-tuning) and the per-layer table; plot sparsity and
   validation accuracy per epoch to out/demo.png.
4. Deployment: save the sparse network compressed (``save_sparse``: nonzero values + a 1-bit
   mask per weight), print dense vs compressed file size, reload it (``load_sparse``) into a fresh
   network and check that its test accuracy is unchanged.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import DigitsClassifier, DigitsDataModule  # noqa: E402

from sparsity_core import SparsityReport, load_sparse, save_sparse  # noqa: E402
from sparsity_core.lightning import PostTrainingSparsity, TrainingAwareSparsity  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "out"
LEVEL = 0.9


class History(pl.Callback):
    """Validation accuracy and measured weight sparsity of the model that was validated."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset
        self.rows: list[tuple[int, float, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        weights = {n: m.weight for n, m in pl_module.model.named_modules() if isinstance(m, nn.Linear)}
        sparsity = SparsityReport.measure(weights).overall
        acc = float(trainer.callback_metrics["val_acc"])
        self.rows.append((self.offset + trainer.current_epoch + 1, acc, sparsity))


def make_trainer(max_epochs: int, callbacks: list[Any]) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


@torch.no_grad()
def test_accuracy(network: nn.Module, data: DigitsDataModule) -> float:
    x, y = data.test.tensors
    was_training = network.training
    try:  # Lightning does not switch a module back to train mode at fit start: restore it
        return float((network.eval()(x).argmax(-1) == y).float().mean())
    finally:
        network.train(was_training)


def plot(
    rows: list[tuple[int, float, float]], path: Path, dense_acc: float, sparse_acc: float, dense_epochs: int, sparse_epochs: int
) -> None:
    epochs = [r[0] for r in rows]
    fig, ax_acc = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax_sp = ax_acc.twinx()
    ax_acc.axvspan(0.5, dense_epochs + 0.5, color="0.93", zorder=0)
    top = ax_acc.get_xaxis_transform()  # x in data, y in axes fraction
    ax_acc.text(dense_epochs / 2 + 0.5, 0.96, "dense training", ha="center", color="0.35", transform=top)
    ax_acc.text(dense_epochs + sparse_epochs / 2 + 0.5, 0.96, "TrainingAwareSparsity (magnitude, cubic)",
                ha="center", color="0.35", transform=top)
    acc_line = ax_acc.plot(epochs, [r[1] for r in rows], "o-", color="tab:blue", label="validation accuracy")
    sp_line = ax_sp.plot(epochs, [r[2] for r in rows], "s--", color="tab:red", label="weight sparsity")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy", color="tab:blue")
    ax_sp.set_ylabel("fraction of zero weights", color="tab:red")
    low = min(r[1] for r in rows)
    ax_acc.set_ylim(min(0.9, (low - 0.01) // 0.05 * 0.05), 1.0)
    ax_sp.set_ylim(0.0, 1.0)
    ax_acc.set_xlim(0.5, epochs[-1] + 0.5)
    ax_acc.grid(alpha=0.3)
    ax_acc.legend(acc_line + sp_line, [line.get_label() for line in acc_line + sp_line], loc="lower right")
    ax_acc.set_title(f"digits MLP: test accuracy {dense_acc:.1%} dense -> {sparse_acc:.1%} at {LEVEL:.0%} sparsity")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Gradual magnitude pruning of a digits MLP to 90% sparsity.")
    parser.add_argument("--dense-epochs", type=int, default=10, help="dense training epochs (default 10)")
    parser.add_argument("--sparse-epochs", type=int, default=15, help="epochs with TrainingAwareSparsity (default 15)")
    parser.add_argument("--out", type=Path, default=OUT / "demo.png", help="where to write the plot (default out/demo.png)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    DENSE_EPOCHS, SPARSE_EPOCHS = args.dense_epochs, args.sparse_epochs  # noqa: N806
    # the level rises over the first two thirds of the sparse phase; the rest fine-tunes
    SCHEDULE = {"start": 0, "end": max(1, round(SPARSE_EPOCHS * 2 / 3))}  # noqa: N806
    started = time.perf_counter()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # keep the output to the point
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated")  # inside Lightning, not ours
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=32)
    model = DigitsClassifier(hidden=256, lr=2e-3)

    print(f"1/2 dense training, {DENSE_EPOCHS} epochs")
    dense_history = History()
    # For contrast: the same level in one shot at the end of dense training, on a copy.
    one_shot = PostTrainingSparsity("magnitude", {"sparsity_level": LEVEL}, verbose=False)
    trainer = make_trainer(DENSE_EPOCHS, [dense_history, one_shot])
    trainer.fit(model, datamodule=data)
    dense_acc = test_accuracy(model.model, data)
    assert one_shot.sparsified is not None
    one_shot_acc = test_accuracy(one_shot.sparsified, data)

    print(f"2/2 gradual pruning to {LEVEL:.0%} (cubic over epochs {SCHEDULE['start']}-{SCHEDULE['end']}), "
          f"{SPARSE_EPOCHS} epochs")
    sparsity = TrainingAwareSparsity(
        "magnitude", {"sparsity_level": LEVEL}, "cubic", SCHEDULE, verbose=False
    )
    sparse_history = History(offset=DENSE_EPOCHS)
    trainer = make_trainer(SPARSE_EPOCHS, [sparsity, sparse_history])
    trainer.fit(model, datamodule=data)
    sparse_acc = test_accuracy(model.model, data)

    assert sparsity.report is not None
    print()
    print(sparsity.report.table(title="Per-layer sparsity of the trained network (weights of the Linear layers)"))
    print()
    rows = [
        (f"dense, after {DENSE_EPOCHS} epochs", dense_acc),
        (f"{LEVEL:.0%} sparse in one shot, no fine-tuning (PostTrainingSparsity)", one_shot_acc),
        (f"{sparsity.report.overall:.0%} sparse, {SPARSE_EPOCHS} more epochs of gradual pruning "
         f"(TrainingAwareSparsity)", sparse_acc),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"Test accuracy on {len(data.test)} held-out digits:")
    for label, acc in rows:
        print(f"  {label:<{width}}  {acc:.2%}")
    print(f"nonzero weights: {sparsity.report.numel - sum(r.zeros for r in sparsity.report.rows):,} "
          f"of {sparsity.report.numel:,}")
    path = args.out
    plot(dense_history.rows + sparse_history.rows, path, dense_acc, sparse_acc, DENSE_EPOCHS, SPARSE_EPOCHS)
    print(f"plot of sparsity and validation accuracy per epoch: {path}")

    # deployment: the zeros leave the file, the network comes back the same
    from safetensors.torch import save_file

    dense_file, sparse_file = path.with_name("digits_dense.safetensors"), path.with_name("digits_sparse.safetensors")
    save_file(model.model.state_dict(), dense_file)
    saved = save_sparse(model.model, sparse_file)
    reloaded = DigitsClassifier(hidden=256).model
    reloaded.load_state_dict(load_sparse(sparse_file))
    reloaded_acc = test_accuracy(reloaded, data)
    dense_bytes = dense_file.stat().st_size
    print(f"\ndeployment: {dense_file.name} {dense_bytes / 1024:.0f} KiB dense, {sparse_file.name} "
          f"{saved.file_bytes / 1024:.0f} KiB compressed ({saved.file_bytes / dense_bytes:.2f}x; "
          f"{len(saved.compressed)} of {len(saved.storage)} tensors stored as values + bitmask)")
    print(f"reloaded from {sparse_file}: test accuracy {reloaded_acc:.2%} "
          f"({'unchanged' if reloaded_acc == sparse_acc else f'CHANGED from {sparse_acc:.2%}'})")
    print(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
