"""The Lightning callbacks, exercised through real ``Trainer.fit`` runs on tiny models."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pydantic import ValidationError
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsity_core import ScoreSparsifier, UnknownNameError
from sparsity_core.lightning import PostTrainingSparsity, TrainingAwareSparsity


# -- tiny models and data -------------------------------------------------------------------
def loader(x: torch.Tensor, y: torch.Tensor, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def regression_data(n: int = 64, features: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, features, generator=g)
    return x, x @ torch.randn(features, 1, generator=g)


class Module(pl.LightningModule):
    """A LightningModule around any network: ``.model`` (the seed's convention) or its own layers."""

    def __init__(self, lr: float = 0.05, optimizer: str = "sgd") -> None:
        super().__init__()
        self.lr = lr
        self.optimizer = optimizer

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        out = self(x)
        if y.dtype == torch.long:
            return nn.functional.cross_entropy(out, y)
        return nn.functional.mse_loss(out.float(), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class BiasedMLP(Module):
    """The seed's convention: the network is ``self.model`` (biases crashed the seed)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class SmallCNN(Module):
    """No ``.model``: the LightningModule is the network (conv weights crashed the seed)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Linear(8 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


class EmbeddingModel(Module):
    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.model = nn.Sequential(nn.Embedding(40, 16), nn.Flatten(), nn.Linear(16 * 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def trainer(**kw: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=3,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    return pl.Trainer(**{**defaults, **kw})


def mlp_data() -> DataLoader:
    return loader(*regression_data())


def zeros(t: torch.Tensor) -> float:
    return float((t == 0).float().mean())


def covered(model: nn.Module) -> dict[str, torch.Tensor]:
    """The default coverage: the weights of Linear/Conv layers (contract v2: not embeddings)."""
    kinds = (nn.Linear, nn.Conv2d)
    return {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, kinds)}


# -- construction ---------------------------------------------------------------------------
def test_unknown_sparsifier_name_fails_at_construction() -> None:
    with pytest.raises(UnknownNameError, match="magnitude"):
        TrainingAwareSparsity("magnitud")


def test_unknown_scheduler_name_fails_at_construction() -> None:
    with pytest.raises(UnknownNameError, match="cubic"):
        TrainingAwareSparsity("magnitude", scheduler="cubc")


def test_misspelt_argument_fails_at_construction() -> None:
    with pytest.raises(ValidationError, match="sparsity_levl"):
        PostTrainingSparsity("magnitude", {"sparsity_levl": 0.9})


def test_out_of_range_argument_fails_at_construction() -> None:
    with pytest.raises(ValidationError, match="sparsity_level"):
        TrainingAwareSparsity("magnitude", {"sparsity_level": 1.5})
    with pytest.raises(ValidationError, match="end must be >= start"):
        TrainingAwareSparsity("magnitude", scheduler="linear", scheduler_args={"start": 3, "end": 1})


def test_instance_instead_of_name_is_refused() -> None:
    from sparsity_core import create_sparsifier

    with pytest.raises(TypeError, match="name or class"):
        TrainingAwareSparsity(create_sparsifier("magnitude"))  # type: ignore[arg-type]


def test_spec_instances_and_qualified_names_are_accepted() -> None:
    from sparsity_core import create_scheduler, create_sparsifier

    spec = create_sparsifier("magnitude", {"sparsity_level": 0.7}).spec
    sched = create_scheduler("linear", {"end": 2}).spec
    cb = TrainingAwareSparsity("builtin:magnitude", spec, "builtin:linear", sched)
    assert cb._sparsifier_spec.sparsity_level == 0.7
    assert cb._scheduler_spec.end == 2


# -- post-training ----------------------------------------------------------------------------
def test_post_training_sparsifies_a_copy_of_a_biased_mlp_and_leaves_the_model_untouched() -> None:
    model = BiasedMLP()
    cb = PostTrainingSparsity("magnitude", {"sparsity_level": 0.8}, verbose=False)
    trained: dict[str, torch.Tensor] = {}

    class Snapshot(Callback):  # the weights as training left them, before on_fit_end
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trained.update({n: p.detach().clone() for n, p in model.model.named_parameters()})

    trainer(callbacks=[cb, Snapshot()], max_epochs=2).fit(model, mlp_data())
    assert all(zeros(w) == 0 for w in covered(model.model).values())
    assert cb.sparsified is not None and cb.sparsified is not model.model
    assert not cb.sparsified.training
    for name, weight in covered(cb.sparsified).items():
        assert zeros(weight) == pytest.approx(0.8, abs=0.02), name
        kept = weight != 0
        assert torch.equal(weight[kept], trained[name][kept])  # kept values are the trained ones
    # biases are not covered by default, and the trained model is as training left it
    assert zeros(cb.sparsified[0].bias) == 0
    for name, p in model.model.named_parameters():
        assert torch.equal(p, trained[name])
    assert cb.report is not None and cb.report.overall == pytest.approx(0.8, abs=0.02)


def test_post_training_inplace_sparsifies_the_model_itself() -> None:
    model = BiasedMLP()
    cb = PostTrainingSparsity("magnitude", {"sparsity_level": 0.5}, inplace=True, verbose=False)
    trainer(callbacks=[cb], max_epochs=1).fit(model, mlp_data())
    assert cb.sparsified is model.model
    assert zeros(model.model[0].weight) == pytest.approx(0.5, abs=0.02)


def test_post_training_on_a_cnn_without_model_attribute() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 6, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    model = SmallCNN()
    cb = PostTrainingSparsity("magnitude", {"sparsity_level": 0.75}, verbose=False)
    trainer(callbacks=[cb], max_epochs=1).fit(model, loader(x, y))
    assert isinstance(cb.sparsified, SmallCNN)
    assert zeros(cb.sparsified.conv.weight) == pytest.approx(0.75, abs=0.03)
    assert zeros(cb.sparsified.head.weight) == pytest.approx(0.75, abs=0.01)
    assert zeros(model.conv.weight) == 0


def test_submodule_argument_names_the_network() -> None:
    model = BiasedMLP()
    cb = PostTrainingSparsity("magnitude", {"sparsity_level": 0.5}, submodule="model.2", inplace=True, verbose=False)
    trainer(callbacks=[cb], max_epochs=1).fit(model, mlp_data())
    assert zeros(model.model[2].weight) == pytest.approx(0.5, abs=0.01)
    assert zeros(model.model[0].weight) == 0


def test_unknown_submodule_names_the_children() -> None:
    cb = PostTrainingSparsity("magnitude", submodule="backbone", verbose=False)
    with pytest.raises(AttributeError, match=r"backbone.*\['model'\]"):
        trainer(callbacks=[cb], max_epochs=1).fit(BiasedMLP(), mlp_data())


# -- training-aware ---------------------------------------------------------------------------
class MaskProbe(Callback):
    """After every training batch (so after every optimizer step), check that each pruned weight is
    zero and record the controller's level."""

    def __init__(self, cb: TrainingAwareSparsity) -> None:
        self.cb = cb
        self.levels: list[float] = []
        self.checked = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        controller = self.cb.controller
        assert controller is not None
        for name, mask in controller.masks.items():
            assert not controller.tensors[name][~mask].any(), f"{name}: a pruned weight came back"
            self.checked += 1
        self.levels.append(max(controller.levels.values()))


def test_training_aware_reaches_the_final_level_in_place_with_masks_holding() -> None:
    model = BiasedMLP()
    cb = TrainingAwareSparsity(
        "magnitude", {"sparsity_level": 0.9}, "linear", {"start": 0, "end": 3}, verbose=False
    )
    probe = MaskProbe(cb)
    trainer(callbacks=[cb, probe], max_epochs=5).fit(model, mlp_data())
    assert cb.sparsified is model.model
    for name, weight in covered(model.model).items():
        assert zeros(weight) == pytest.approx(0.9, abs=0.01), name
    assert probe.checked > 0
    # 4 batches per epoch; the level moves only at epoch ends: 0, 0.3, 0.6, 0.9, 0.9
    per_epoch = [probe.levels[i] for i in range(0, 20, 4)]
    assert per_epoch == pytest.approx([0.0, 0.3, 0.6, 0.9, 0.9])
    assert all(probe.levels[i] == probe.levels[i - i % 4] for i in range(20))
    assert cb.controller is not None and cb.controller.masks == {}  # squashed at train end


def test_training_aware_on_a_cnn_without_model_attribute_with_adam_and_accumulation() -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 1, 6, 6, generator=g), torch.randint(0, 3, (48,), generator=g)
    model = SmallCNN(optimizer="adam", lr=0.01)
    cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.5}, "constant", verbose=False)
    probe = MaskProbe(cb)
    trainer(callbacks=[cb, probe], max_epochs=2, accumulate_grad_batches=2).fit(model, loader(x, y))
    assert zeros(model.conv.weight) == pytest.approx(0.5, abs=0.03)
    assert zeros(model.head.weight) == pytest.approx(0.5, abs=0.01)
    assert probe.checked > 0


def test_step_unit_updates_after_optimizer_steps() -> None:
    model = BiasedMLP()
    cb = TrainingAwareSparsity(
        "magnitude", {"sparsity_level": 0.8}, "linear", {"start": 0, "end": 8, "unit": "step"}, verbose=False
    )
    probe = MaskProbe(cb)
    # 4 batches per epoch, 2 micro-batches per step: global_step goes 0..4 over 2 epochs
    trainer(callbacks=[cb, probe], max_epochs=4, accumulate_grad_batches=2).fit(model, mlp_data())
    expected = [0.1 * ((i + 1) // 2) for i in range(16)]
    assert probe.levels == pytest.approx(expected)
    assert zeros(model.model[0].weight) == pytest.approx(0.8, abs=0.01)


def test_seed_semantics_keep_the_model_dense_and_update_a_copy_each_epoch() -> None:
    model = BiasedMLP()
    cb = TrainingAwareSparsity(
        "magnitude", {"sparsity_level": 0.6}, "linear", {"start": 0, "end": 2}, inplace=False, verbose=False
    )
    seen: list[tuple[float, float]] = []

    class Watch(Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            seen.append((zeros(model.model[0].weight), zeros(cb.sparsified[0].weight)))

    copies = []

    class CopyIdentity(Callback):
        def on_train_epoch_end(self, *args: Any) -> None:
            copies.append(id(cb.sparsified))

    trainer(callbacks=[cb, Watch(), CopyIdentity()], max_epochs=3).fit(model, mlp_data())
    assert [dense for dense, _ in seen] == [0, 0, 0]
    assert [sparse for _, sparse in seen] == pytest.approx([0.3, 0.6, 0.6], abs=0.01)
    assert len(set(copies)) == 1  # refreshed in place, not deep-copied each epoch
    assert cb.sparsified is not model.model
    # the copy holds the final dense weights, masked
    w, s = model.model[0].weight, cb.sparsified[0].weight
    assert torch.equal(s[s != 0], w[s != 0])


def test_keep_masks_leaves_them_live() -> None:
    model = BiasedMLP()
    cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.5}, keep_masks=True, verbose=False)
    trainer(callbacks=[cb], max_epochs=1).fit(model, mlp_data())
    assert cb.controller is not None and set(cb.controller.masks) == set(covered(model.model))


def test_multiple_fits_with_the_same_callback() -> None:
    model = BiasedMLP()
    cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.7}, "linear", {"end": 2}, verbose=False)
    trainer(callbacks=[cb], max_epochs=2).fit(model, mlp_data())
    first = cb.report
    trainer(callbacks=[cb], max_epochs=3).fit(model, mlp_data())
    assert first is not None and cb.report is not None and cb.report is not first
    assert zeros(model.model[0].weight) == pytest.approx(0.7, abs=0.01)
    # the same trainer fitted again continues its epochs
    t = trainer(callbacks=[cb], max_epochs=3)
    t.fit(model, mlp_data())
    t.fit_loop.max_epochs = 4
    t.fit(model, mlp_data())
    assert zeros(model.model[0].weight) == pytest.approx(0.7, abs=0.01)


class ValidatedMLP(BiasedMLP):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))


def test_early_stopping() -> None:
    model = ValidatedMLP()
    cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.5}, "constant", verbose=False)
    stop = EarlyStopping(monitor="val_loss", divergence_threshold=-1.0)  # stops at the first check
    t = trainer(callbacks=[cb, stop], max_epochs=5)
    t.fit(model, mlp_data(), mlp_data())
    assert t.current_epoch == 1
    assert zeros(model.model[0].weight) == pytest.approx(0.5, abs=0.01)


def test_a_schedule_cut_short_warns() -> None:
    model = BiasedMLP()
    cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.9}, "linear", {"end": 10}, verbose=False)
    with pytest.warns(UserWarning, match="before the 'linear' schedule reached its final level"):
        trainer(callbacks=[cb], max_epochs=2).fit(model, mlp_data())
    assert zeros(model.model[0].weight) == pytest.approx(0.18, abs=0.01)


def test_bf16_mixed_precision() -> None:
    model = BiasedMLP()
    cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.75}, "cubic", {"end": 2}, verbose=False)
    probe = MaskProbe(cb)
    trainer(callbacks=[cb, probe], max_epochs=3, precision="bf16-mixed").fit(model, mlp_data())
    assert zeros(model.model[0].weight) == pytest.approx(0.75, abs=0.01)
    assert probe.checked > 0


class TwoOptimizers(BiasedMLP):
    """Manual optimization with an optimizer per layer group."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        first, second = self.optimizers()
        loss = self.loss(batch)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.model[0].parameters(), lr=0.05, momentum=0.9),
            torch.optim.Adam([*self.model[2].parameters(), *self.model[4].parameters()], lr=0.01),
        ]


def test_multiple_optimizers_keep_pruned_weights_zero() -> None:
    model = TwoOptimizers()
    cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.6}, "linear", {"end": 1}, verbose=False)
    probe = MaskProbe(cb)
    trainer(callbacks=[cb, probe], max_epochs=3).fit(model, mlp_data())
    assert probe.checked > 0
    for name, weight in covered(model.model).items():
        assert zeros(weight) == pytest.approx(0.6, abs=0.01), name


class ActivationNorm(ScoreSparsifier):
    """A local, unregistered sparsifier that needs activations: |w| * ||x|| per input feature."""

    name = "activation_norm_test"
    needs_calibration = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.norms: dict[str, torch.Tensor] = {}
        self.batches = 0

    def reset_calibration(self) -> None:
        self.norms.clear()

    def observe(self, name: str, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        self.norms[name] = self.norms.get(name, 0) + (x**2).sum(0)
        self.batches += 1

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.abs() * self.norms[name].sqrt()


def test_a_local_class_that_needs_calibration() -> None:
    model = BiasedMLP()
    cb = TrainingAwareSparsity(ActivationNorm, {"sparsity_level": 0.5}, "linear", {"end": 2}, calibration_batches=2, verbose=False)
    trainer(callbacks=[cb], max_epochs=3).fit(model, mlp_data())
    assert zeros(model.model[0].weight) == pytest.approx(0.5, abs=0.01)
    assert cb.controller is not None and cb.controller.sparsifier.batches == 2 * 3 * 2  # 2 updates x 3 layers x 2 batches

    post = PostTrainingSparsity(ActivationNorm, {"sparsity_level": 0.5}, verbose=False)
    trainer(callbacks=[post], max_epochs=1).fit(BiasedMLP(), mlp_data())
    assert post.sparsified is not None and zeros(post.sparsified[2].weight) == pytest.approx(0.5, abs=0.01)


# -- logging --------------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_sparsity_is_logged_to_a_csv_logger(tmp_path: Path) -> None:
    model = BiasedMLP()
    cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.8}, "linear", {"end": 2}, verbose=False)
    post = PostTrainingSparsity("magnitude", {"sparsity_level": 0.95}, verbose=False)
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer(callbacks=[cb, post], max_epochs=3, logger=logger).fit(model, mlp_data())
    rows = read_csv(tmp_path / "run" / "version_0" / "metrics.csv")
    overall = [float(r["sparsity/overall"]) for r in rows if r.get("sparsity/overall")]
    # three epoch ends of the training-aware callback, then the post-training copy
    assert overall == pytest.approx([0.4, 0.8, 0.8, 0.95], abs=0.01)
    # per-layer names as in the LightningModule's state_dict
    layer = [float(r["sparsity/model.0.weight"]) for r in rows if r.get("sparsity/model.0.weight")]
    assert layer == pytest.approx([0.4, 0.8, 0.8, 0.95], abs=0.01)
    assert {f"sparsity/model.{i}.weight" for i in (0, 2, 4)} <= set(rows[0])


def test_logged_names_of_a_module_without_model_and_of_named_submodules(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 1, 6, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    conv = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.5}, submodule="conv", verbose=False)
    head = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.7}, submodule="head", verbose=False)
    logger = CSVLogger(tmp_path, name="run", version=0)
    t = trainer(callbacks=[conv, head], max_epochs=1, logger=logger)
    t.fit(SmallCNN(), loader(x, y))
    assert float(t.callback_metrics["sparsity/conv/overall"]) == pytest.approx(0.5, abs=0.03)
    assert float(t.callback_metrics["sparsity/head/overall"]) == pytest.approx(0.7, abs=0.01)
    (row,) = [r for r in read_csv(tmp_path / "run" / "version_0" / "metrics.csv") if r.get("sparsity/head.weight")]
    assert float(row["sparsity/head.weight"]) == pytest.approx(0.7, abs=0.01)


def test_summary_table_is_printed(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.5})
    with caplog.at_level(logging.INFO):
        trainer(callbacks=[cb], max_epochs=1).fit(BiasedMLP(), mlp_data())
    text = caplog.text
    assert "TrainingAwareSparsity: magnitude" in text and "0.weight" in text and "overall" in text


# -- other built-in sparsifiers ---------------------------------------------------------------
def embedding_data() -> DataLoader:
    g = torch.Generator().manual_seed(2)
    return loader(torch.randint(0, 40, (48, 4), generator=g), torch.randint(0, 3, (48,), generator=g))


def test_embedding_model_with_data_norm_blocks() -> None:
    model = EmbeddingModel()
    # contract v2: an embedding is covered when asked for (the default takes matmul weights only)
    both = ["embedding:*", "linear:*"]
    cb = TrainingAwareSparsity(
        "data_norm", {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "include": both}, "linear", {"end": 1}, verbose=False
    )
    post = PostTrainingSparsity("data_norm", {"sparsity_level": 0.75, "sparse_block_shape": (1, 4), "include": both}, verbose=False)
    trainer(callbacks=[cb, post], max_epochs=2).fit(model, embedding_data())
    embedding = model.model[0].weight
    assert zeros(embedding) == pytest.approx(0.5, abs=0.02)
    # whole 1x4 blocks are zero or kept (the seed's DataNormSparsifier semantics)
    blocks = (embedding.detach().reshape(40, 4, 4) == 0).all(-1)
    assert float(blocks.float().mean()) == pytest.approx(zeros(embedding), abs=1e-6)
    assert post.sparsified is not None
    assert zeros(post.sparsified[0].weight) == pytest.approx(0.75, abs=0.02)


def test_random_sparsifier_masks_depend_on_seed_and_name_only() -> None:
    def fit(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)  # a different initialisation each time
        model = BiasedMLP()
        cb = TrainingAwareSparsity("random", {"sparsity_level": 0.6, "seed": 3}, verbose=False)
        trainer(callbacks=[cb], max_epochs=1).fit(model, mlp_data())
        return {n: w != 0 for n, w in covered(model.model).items()}

    a, b = fit(0), fit(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    for name, keep in a.items():
        assert float((~keep).float().mean()) == pytest.approx(0.6, abs=0.02), name
