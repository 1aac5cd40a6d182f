"""The callbacks under contract v2, in real ``Trainer.fit`` runs on tiny models: gradients (with
accumulation, two optimizers in manual optimization, from training_step's loss after training),
dict batches and ``calibration_inputs``, sequential blocks, misconfigurations failing before any
training step, no hooks left behind, and lottery-ticket rewinding (with an exact resume)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from sparsity_core import Capabilities, Scheduler, ScoreSparsifier, sparsify
from sparsity_core.lightning import PostTrainingSparsity, TrainingAwareSparsity
from test_lightning import trainer
from _grad_probe import GradProbe  # tests/_grad_probe.py: a sparsifier that records gradients

WANDA = {"sparsity_level": 0.5}


# -- tiny models and data -----------------------------------------------------------------------
def xy(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, x @ torch.randn(8, 2, generator=g) + 0.1 * torch.randn(n, 2, generator=g)


def tuples(batch_size: int = 4) -> DataLoader:
    return DataLoader(TensorDataset(*xy()), batch_size=batch_size, shuffle=False)


class Net(pl.LightningModule):
    """``self.model`` (the network the callbacks sparsify); counts training_step calls."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        self.steps = 0
        self.optimizers_made: list[torch.optim.Optimizer] = []

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.model(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.steps += 1
        return self.loss(batch)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        self.optimizers_made = [opt]
        return opt


class TwoOptimizers(Net):
    """Manual optimization, one optimizer per Linear; records each batch's gradients after backward."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.automatic_optimization = False
        self.after_backward: list[dict[str, torch.Tensor]] = []

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.steps += 1
        first, second = self.optimizers()
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(self.loss(batch))
        self.after_backward.append(grads(self.model))
        first.step()
        second.step()

    def configure_optimizers(self) -> Any:
        self.optimizers_made = [
            torch.optim.SGD(self.model[0].parameters(), lr=0.05),
            torch.optim.Adam(self.model[2].parameters(), lr=0.01),
        ]
        return self.optimizers_made


class Features(nn.Module):
    """A network called with keyword inputs, ``model(**batch)``; ``target`` rides along, unused."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 2)

    def forward(self, features: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(features)))


class DictNet(Net):
    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        torch.manual_seed(seed)
        self.model = Features()  # type: ignore[assignment]

    def loss(self, batch: Any) -> torch.Tensor:
        return F.mse_loss(self.model(**batch), batch["target"])


class Dicts(Dataset):
    def __init__(self) -> None:
        self.x, self.y = xy()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "target": self.y[i]}


def dicts() -> DataLoader:
    return DataLoader(Dicts(), batch_size=4, shuffle=False)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if n.endswith("weight") and p.grad is not None}


def no_hooks(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> bool:
    modules = all(
        not (m._forward_pre_hooks or m._forward_hooks or m._forward_pre_hooks_with_kwargs or m._backward_hooks)
        for m in model.modules()
    )
    return modules and all(not o._optimizer_step_pre_hooks and not o._optimizer_step_post_hooks for o in optimizers)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}


# -- a sparsifier that needs gradients ----------------------------------------------------------


LATER = ("linear", {"start": 1, "end": 2})  # level 0 at train start: gradients come first


class AfterBackward(Callback):
    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.grads.append(grads(pl_module.model))


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "copy"])
def test_training_aware_delivers_accumulated_gradients_once_per_optimizer_step(inplace: bool) -> None:
    # inplace=False: the network trains dense and a copy is sparsified; the gradients are still
    # the trained network's, on its live parameters
    model = Net()
    cb = TrainingAwareSparsity(GradProbe, {"sparsity_level": 0.5}, *LATER, inplace=inplace, verbose=False)
    backward = AfterBackward()
    t = trainer(callbacks=[cb, backward], max_epochs=2, accumulate_grad_batches=2)
    t.fit(model, tuples())  # 8 batches an epoch: 4 optimizer steps
    assert cb.controller is not None
    probe: GradProbe = cb.controller.sparsifier  # type: ignore[assignment]
    assert t.global_step == 8 and len(backward.grads) == 16
    assert len(probe.seen) == 2 * t.global_step  # each covered weight once per step, not per backward
    live = dict(model.model.named_parameters())
    for k in range(t.global_step):
        for name, tensor, _, grad in probe.seen[2 * k : 2 * k + 2]:
            assert tensor is live[name]
            assert torch.equal(grad, backward.grads[2 * k + 1][name])  # both micro-batches
            assert not torch.equal(grad, backward.grads[2 * k][name])
    assert sorted(n for n, *_ in probe.seen[:2]) == ["0.weight", "2.weight"]
    assert cb.sparsified is not None and cb.report is not None and cb.report.overall == 0.5
    assert (cb.sparsified is model.model) == inplace
    assert no_hooks(model, model.optimizers_made)


def test_training_aware_delivers_gradients_for_two_optimizers_in_manual_optimization() -> None:
    model = TwoOptimizers()
    cb = TrainingAwareSparsity(GradProbe, {"sparsity_level": 0.5}, *LATER, verbose=False)
    trainer(callbacks=[cb], max_epochs=2).fit(model, tuples())
    assert cb.controller is not None
    probe: GradProbe = cb.controller.sparsifier  # type: ignore[assignment]
    assert model.steps == 16
    # each optimizer hands over its own parameter, once per opt.step()
    assert [n for n, *_ in probe.seen] == ["0.weight", "2.weight"] * model.steps
    live = dict(model.model.named_parameters())
    for i, (name, tensor, _, grad) in enumerate(probe.seen):
        assert tensor is live[name]
        assert torch.equal(grad, model.after_backward[i // 2][name])
    for name, mask in cb.controller.masks.items():
        assert (live[name][~mask] == 0).all()
    assert no_hooks(model, model.optimizers_made)


def test_post_training_takes_gradients_of_training_steps_loss() -> None:
    model = Net()
    cb = PostTrainingSparsity(GradProbe, {"sparsity_level": 0.5}, calibration_batches=2, verbose=False)
    trained: dict[str, Any] = {}

    class Snapshot(Callback):
        def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            trained["grads"] = grads(pl_module.model)
            trained["steps"] = pl_module.steps

    trainer(callbacks=[cb, Snapshot()], max_epochs=1).fit(model, tuples())
    assert cb.controller is not None and cb.sparsified is not None
    probe: GradProbe = cb.controller.sparsifier  # type: ignore[assignment]
    params = [model.model[0].weight, model.model[2].weight]
    expected = [torch.autograd.grad(model.loss(batch), params) for batch in list(tuples())[:2]]
    assert [n for n, *_ in probe.seen] == ["0.weight", "2.weight"] * 2
    for i, (name, _, value, grad) in enumerate(probe.seen):
        assert torch.equal(value, dict(model.model.named_parameters())[name])  # the trained weights
        torch.testing.assert_close(grad, expected[i // 2][i % 2], rtol=0, atol=1e-7)
    assert grads(model.model).keys() == trained["grads"].keys()
    assert all(torch.equal(g, trained["grads"][n]) for n, g in grads(model.model).items())  # .grad untouched
    assert cb.report is not None and cb.report.overall == 0.5


# -- dict batches and calibration_inputs ----------------------------------------------------------
def test_dict_batches_calibrate_wanda_after_training() -> None:
    model = DictNet()
    cb = PostTrainingSparsity("wanda", WANDA, calibration_batches=2, verbose=False)
    trainer(callbacks=[cb], max_epochs=1).fit(model, dicts())
    reference = copy.deepcopy(model.model)
    sparsify(reference, "wanda", WANDA, calibration=list(dicts())[:2])
    assert cb.sparsified is not None
    assert (reference.fc1.weight == 0).any()
    for name, w in weights(cb.sparsified).items():
        assert torch.equal(w, dict(reference.named_parameters())[name]), name


def test_dict_batches_calibrate_wanda_in_training() -> None:
    model = DictNet()
    initial = copy.deepcopy(model.model)
    cb = TrainingAwareSparsity("wanda", WANDA, calibration_batches=2, keep_masks=True, verbose=False)
    trainer(callbacks=[cb], max_epochs=1).fit(model, dicts())
    sparsify(initial, "wanda", WANDA, calibration=list(dicts())[:2])  # masks chosen at train start
    assert cb.controller is not None
    for name, mask in cb.controller.masks.items():
        assert torch.equal(mask, dict(initial.named_parameters())[name] != 0), name


def test_calibration_inputs_is_used() -> None:
    # batches are (targets, inputs): the default (first element) would feed the targets to the model
    x, y = xy()
    swapped = DataLoader(TensorDataset(y, x), batch_size=4, shuffle=False)

    class Swapped(Net):
        def loss(self, batch: Any) -> torch.Tensor:
            y, x = batch
            return F.mse_loss(self.model(x), y)

    model = Swapped()
    called: list[Any] = []
    cb = PostTrainingSparsity(
        "wanda", WANDA, calibration_batches=3, verbose=False, calibration_inputs=lambda b: called.append(b) or b[1]
    )
    trainer(callbacks=[cb], max_epochs=1).fit(model, swapped)
    assert len(called) == 3
    reference = copy.deepcopy(model.model)
    sparsify(reference, "wanda", WANDA, calibration=[x[i * 4 : i * 4 + 4] for i in range(3)])
    assert cb.sparsified is not None
    assert all(torch.equal(w, dict(reference.named_parameters())[n]) for n, w in weights(cb.sparsified).items())


# -- sequential through a callback ----------------------------------------------------------------
class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class BlockNet(Net):
    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        torch.manual_seed(seed)
        self.model = Blocks()  # type: ignore[assignment]


def test_post_training_sequential_equals_one_shot_sequential() -> None:
    model = BlockNet()
    cb = PostTrainingSparsity("wanda", WANDA, calibration_batches=2, sequential="blocks.*", verbose=False)
    trainer(callbacks=[cb], max_epochs=1).fit(model, tuples())
    reference, dense = copy.deepcopy(model.model), copy.deepcopy(model.model)
    xs = [x for x, _ in list(tuples())[:2]]
    sparsify(reference, "wanda", WANDA, calibration=xs, sequential="blocks.*")
    sparsify(dense, "wanda", WANDA, calibration=xs)
    assert cb.sparsified is not None
    assert all(torch.equal(w, dict(reference.named_parameters())[n]) for n, w in weights(cb.sparsified).items())
    assert not torch.equal(reference.blocks[2][0].weight, dense.blocks[2][0].weight)  # sequential did matter


# -- misconfigurations fail before any training step ----------------------------------------------
def test_post_training_wanda_without_calibration_batches_fails_in_init() -> None:
    with pytest.raises(ValueError, match=r"'wanda'.*calibration_batches=0"):
        PostTrainingSparsity("wanda", calibration_batches=0)
    with pytest.raises(ValueError, match=r"grad_probe_test.*calibration_batches=0"):
        PostTrainingSparsity(GradProbe, calibration_batches=0)


def test_a_gradient_sparsifier_with_a_level_at_train_start_fails_in_init() -> None:
    with pytest.raises(ValueError, match=r"grad_probe_test.*needs gradients.*train start"):
        TrainingAwareSparsity(GradProbe, {"sparsity_level": 0.5})  # constant: the level from t=0
    with pytest.raises(ValueError, match=r"grad_probe_test.*sequential"):
        TrainingAwareSparsity(GradProbe, {"sparsity_level": 0.5}, *LATER, sequential="blocks.*")


@pytest.mark.parametrize("callback", [TrainingAwareSparsity, PostTrainingSparsity])
def test_a_sequential_pattern_naming_no_module_fails_at_fit_start(callback: type) -> None:
    model = BlockNet()
    cb = callback("wanda", WANDA, sequential="layers.*", verbose=False)
    with pytest.raises(ValueError, match=r"sequential='layers\.\*' matches no module"):
        trainer(callbacks=[cb], max_epochs=1).fit(model, tuples())
    assert model.steps == 0
    assert no_hooks(model, model.optimizers_made)


# -- no hooks left ------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_masks", [False, True])
def test_no_hooks_are_left_on_modules_or_optimizers_after_train_end(keep_masks: bool) -> None:
    model = BlockNet()
    cbs = [
        TrainingAwareSparsity("wanda", {**WANDA, "include": ["blocks.*.weight"]}, "linear", {"end": 2},
                              sequential="blocks.*", calibration_batches=2, keep_masks=keep_masks, verbose=False),
        TrainingAwareSparsity(GradProbe, {"sparsity_level": 0.5}, *LATER, submodule="model.head",
                              keep_masks=keep_masks, verbose=False),
        PostTrainingSparsity("wanda", WANDA, calibration_batches=2, verbose=False),
    ]
    trainer(callbacks=cbs, max_epochs=2).fit(model, tuples())
    assert cbs[1].controller is not None and cbs[1].controller.sparsifier.seen  # type: ignore[attr-defined]
    assert (model.model.blocks[0][0].weight == 0).any() and (model.model.head.weight == 0).any()
    assert model.optimizers_made and no_hooks(model, model.optimizers_made)


# -- lottery-ticket rewinding ---------------------------------------------------------------------
class Weights(Callback):
    """Records the network's weights at train start and at each epoch end (placed before the
    sparsity callback: the weights before its update; after it: after the update, with masks)."""

    def __init__(self, cb: TrainingAwareSparsity | None = None) -> None:
        self.cb = cb
        self.start: dict[str, torch.Tensor] = {}
        self.epochs: dict[int, dict[str, torch.Tensor]] = {}
        self.masks: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = weights(pl_module.model)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs[trainer.current_epoch] = weights(pl_module.model)
        if self.cb is not None and self.cb.controller is not None:
            self.masks[trainer.current_epoch] = dict(self.cb.controller.masks)


class TwoSteps(Scheduler):
    """Half the final level from t=1, all of it from t=3: an epoch of training (t=2) between."""

    name = "two_steps_test"

    def level_at(self, t: float, final_level: float) -> float:
        return 0.0 if t < 1 else final_level / 2 if t < 3 else final_level


def rewind_run(tmp: Path, rewind_to: Any, *, ckpt_path: Path | None = None) -> tuple[Net, TrainingAwareSparsity, Weights, Weights]:
    pl.seed_everything(0, verbose=False)
    model = Net()
    # masks change at the ends of epochs 0 (t=1) and 2 (t=3); epochs 1 and 3 only train
    cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.75}, TwoSteps, rewind_to=rewind_to, keep_masks=True, verbose=False)
    before, after = Weights(), Weights(cb)
    ckpt = ModelCheckpoint(dirpath=tmp, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    t = trainer(callbacks=[before, cb, after, ckpt], max_epochs=4, enable_checkpointing=True)
    t.fit(model, tuples(), ckpt_path=ckpt_path)
    return model, cb, before, after


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
@pytest.mark.parametrize("rewind_to", ["init", 1])
def test_lottery_ticket_rewinding_and_an_exact_resume(tmp_path: Path, rewind_to: Any) -> None:
    model, cb, before, after = rewind_run(tmp_path, rewind_to)
    saved = before.start if rewind_to == "init" else before.epochs[0]  # weights at t=rewind_to
    for epoch in (0, 2):  # after each mask update: the kept weights are the saved ones, the pruned zero
        masks = after.masks[epoch]
        assert masks.keys() == {"0.weight", "2.weight"}
        for name, mask in masks.items():
            expected = torch.where(mask, saved[name], torch.zeros_like(saved[name]))
            assert torch.equal(after.epochs[epoch][name], expected), (epoch, name)
    assert not torch.equal(before.epochs[2]["0.weight"], after.epochs[2]["0.weight"])  # training had moved them
    assert not torch.equal(after.epochs[3]["0.weight"], after.epochs[2]["0.weight"])  # and trains again after

    # resumed from the checkpoint of epoch 1: trained since the first update, before the second;
    # the second update must rewind to the weights saved in the first run, not to the resumed ones
    resumed, resumed_cb, _, resumed_after = rewind_run(tmp_path, rewind_to, ckpt_path=tmp_path / "epoch=1.ckpt")
    assert sorted(resumed_after.epochs) == [2, 3]
    assert cb.controller is not None and resumed_cb.controller is not None
    a, b = cb.controller, resumed_cb.controller
    assert a.masks.keys() == b.masks.keys() == {"0.weight", "2.weight"}
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    for (name, p), (_, q) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), name
