"""Lightning callbacks: post-training and training-aware sparsity, resolved by name.

They replace torch's experimental ``PostTrainingDataSparsity`` and ``TrainingAwareDataSparsity``
(torch/ao/pruning/_experimental/data_sparsifier/lightning/callbacks/) and keep their semantics: the
network is ``pl_module.model`` when there is one, the result is ``callback.sparsified``. All the
tensor work is done by :class:`~sparsity_core.SparsityController`; the callbacks only decide *when*
(Lightning's hooks), *what* (which module) and keep the state in checkpoints.

This is the only module of ``sparsity_core`` that imports Lightning.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Union, get_type_hints

import pytorch_lightning as pl
import torch
from pydantic import BaseModel, BeforeValidator
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ._api import resolve_class
from ._base import Scheduler, Sparsifier, validate_spec
from ._controller import SparsityController
from ._report import SparsityReport
from ._specs import SchedulerSpec, SparsifierSpec

__all__ = ["PostTrainingSparsity", "TrainingAwareSparsity"]

#: Version of the callback state stored in checkpoints (the controller's state rides inside it).
CALLBACK_STATE_VERSION = 1



def _base60_patterns(args: Any) -> Any:
    """Give back the ``pattern`` strings that YAML 1.1 read as numbers: an unquoted ``2:4`` is
    the base-60 integer 124 (2 * 60 + 4). No pattern is a number, and a base-60 reading is at
    least 60, so such an integer is turned back into its base-60 digits; anything else is left
    for the spec to judge."""
    if not isinstance(args, dict):
        return args
    out = dict(args)
    pattern = out.get("pattern")
    if type(pattern) is int and pattern >= 60:
        digits = []
        while pattern:
            pattern, digit = divmod(pattern, 60)
            digits.append(str(digit))
        out["pattern"] = ":".join(reversed(digits))
    if isinstance(out.get("overrides"), dict):
        out["overrides"] = {k: _base60_patterns(v) for k, v in out["overrides"].items()}
    return out


# Plain dict first: jsonargparse (LightningCLI) tries union members in order, and a YAML mapping
# must reach our own validation whole, not be coerced into the base spec. Annotated with a
# pydantic validator, jsonargparse validates the mapping with pydantic instead of adapting each
# `Any` value, which re-parsed every string as YAML (a quoted "2:4" became 124); `str` before
# `Any` keeps the strings as strings when jsonargparse writes the config back (print, save).
_ArgsDict = Annotated[dict[str, Union[str, Any]], BeforeValidator(_base60_patterns)]
SparsifierArgs = Union[_ArgsDict, SparsifierSpec, None]
SchedulerArgs = Union[_ArgsDict, SchedulerSpec, None]


def _validated(kind: str, impl: str | type, args: Any) -> tuple[type, BaseModel]:
    """Resolve ``impl`` and validate ``args`` against its spec now, so that a misspelt name or
    argument fails when the callback is built rather than hours into training."""
    if not isinstance(impl, (str, type)):
        raise TypeError(
            f"{kind} must be a name (e.g. 'magnitude', 'builtin:magnitude') or an implementation "
            f"class, not a {type(impl).__name__} instance: pass the name or class and its arguments "
            f"separately, so that it is created at train start"
        )
    cls = resolve_class(kind, impl)  # type: ignore[arg-type]
    return cls, validate_spec(cls, args, {})


def _label(impl: str | type) -> str:
    return impl if isinstance(impl, str) else f"{impl.__module__}.{impl.__qualname__}"


def _network(pl_module: pl.LightningModule, submodule: str | None, owner: str) -> nn.Module:
    """``pl_module.<submodule>`` when named, else ``pl_module.model`` (the seed's convention) when
    it is a module, else the LightningModule itself."""
    if submodule:
        try:
            return pl_module.get_submodule(submodule)
        except AttributeError:
            children = [name for name, _ in pl_module.named_children()]
            raise AttributeError(
                f"{owner}(submodule={submodule!r}): {type(pl_module).__name__} has no such submodule; "
                f"its children are {children}"
            ) from None
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def _model_inputs(batches: Any, limit: int, device: torch.device) -> Iterator[Any]:
    """Model inputs from a dataloader's batches: the batch itself when it is a tensor, else its
    first element ((x, y) pairs, the common case)."""
    for i, batch in enumerate(batches):
        if i >= limit:
            return
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise TypeError(
                f"calibration needs model inputs, but a training batch is a {type(batch).__name__}; "
                f"use batches that are tensors or (inputs, targets) pairs"
            )
        yield batch.to(device)


def _sync_masks(trainer: pl.Trainer, controller: SparsityController) -> None:
    """Make every rank hold rank 0's masks (and, if any rank disagreed, rank 0's covered tensors).

    Under DDP the weights agree on every rank, so deterministic sparsifiers agree too and this is
    one small broadcast; it guards against sparsifiers that are not bit-reproducible.
    """
    if trainer.world_size <= 1 or not controller.masks:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    device = trainer.strategy.root_device if dist.get_backend() == "nccl" else torch.device("cpu")
    names = list(controller.masks)
    local = torch.cat([controller.masks[n].reshape(-1) for n in names]).to(device=device, dtype=torch.uint8)
    synced = local.clone()
    dist.broadcast(synced, src=0)
    differs = torch.tensor([int(not torch.equal(local, synced))], device=device)
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    if not differs.item():
        return
    # Some rank's own masks already zeroed weights that rank 0 keeps: take rank 0's values too.
    masks, offset = {}, 0
    for name in names:
        tensor = controller.tensors[name]
        masks[name] = synced[offset : offset + tensor.numel()].view(tensor.shape).to(device=tensor.device, dtype=torch.bool)
        offset += tensor.numel()
        buffer = tensor.detach().to(device).contiguous()
        dist.broadcast(buffer, src=0)
        with torch.no_grad():
            tensor.copy_(buffer)
    controller.masks = masks  # replaced, never changed in place (state_dict shares the tensors)
    controller.apply_masks()


class _SparsityCallback(Callback):
    """What both callbacks share: validated arguments, the network, reporting and logging."""

    def __init__(
        self,
        sparsifier: str | type[Sparsifier],
        sparsifier_args: SparsifierArgs,
        *,
        submodule: str | None,
        calibration_batches: int,
        log_sparsity: bool,
        verbose: bool,
    ) -> None:
        super().__init__()
        self._sparsifier_cls, self._sparsifier_spec = _validated("sparsifier", sparsifier, sparsifier_args)
        # bool is an int subclass; "8" and 2.5 are not ints (a raw TypeError, or 2.5 accepted)
        if not isinstance(calibration_batches, int) or isinstance(calibration_batches, bool):
            raise TypeError(
                f"{type(self).__name__}: calibration_batches must be a non-negative int, "
                f"got {calibration_batches!r} ({type(calibration_batches).__name__})"
            )
        if calibration_batches < 0:
            raise ValueError(f"{type(self).__name__}: calibration_batches must be a non-negative int, got {calibration_batches!r}")
        self.sparsifier = sparsifier
        self.sparsifier_args = sparsifier_args
        self.submodule = submodule
        self.calibration_batches = calibration_batches
        self.log_sparsity = log_sparsity
        self.verbose = verbose
        #: The controller doing the work (bound at train start).
        self.controller: SparsityController | None = None
        #: The sparse result: a copy of the network, or the network itself when sparsified in place.
        self.sparsified: nn.Module | None = None
        #: Per-parameter and overall sparsity of :attr:`sparsified`, measured at the end.
        self.report: SparsityReport | None = None

    @property
    def state_key(self) -> str:
        # Lightning reads it at every hook call (profiler names): build it once.
        key: str | None = self.__dict__.get("_state_key")
        if key is None:
            key = self._state_key = self._generate_state_key(**self._state_key_fields())
        return key

    def _state_key_fields(self) -> dict[str, Any]:
        return {"sparsifier": _label(self.sparsifier), "submodule": self.submodule}

    def _controller(self, target: nn.Module, scheduler: tuple[type, BaseModel] | None = None) -> SparsityController:
        # Resolve the name again: implementations are bound at train start, so a registry that
        # changed since construction (a plugin installed, a test registry) is honoured.
        sparsifier = self._sparsifier_cls if isinstance(self.sparsifier, type) else self.sparsifier
        if scheduler is None:
            return SparsityController(target, sparsifier, self._sparsifier_spec)
        return SparsityController(target, sparsifier, self._sparsifier_spec, *scheduler)

    def _calibrate(self, trainer: pl.Trainer, controller: SparsityController, network: nn.Module) -> None:
        if not controller.sparsifier.needs_calibration:
            return
        if self.calibration_batches == 0:
            raise ValueError(
                f"sparsifier {controller.sparsifier.name!r} needs activations, but calibration_batches=0"
            )
        device = next(network.parameters()).device
        seen = controller.calibrate(_model_inputs(trainer.train_dataloader or [], self.calibration_batches, device))
        if seen == 0:
            raise ValueError(f"sparsifier {controller.sparsifier.name!r} needs activations, but the trainer has no training batches")

    def _bind_names(self, pl_module: pl.LightningModule, network: nn.Module) -> None:
        # Logged names are relative to the LightningModule (as in its state_dict), so that two
        # callbacks on different submodules never write the same name.
        path = self.submodule or ("" if network is pl_module else "model")
        self._layer_prefix = f"sparsity/{path}." if path else "sparsity/"
        self._overall_name = f"sparsity/{self.submodule}/overall" if self.submodule else "sparsity/overall"

    def _layer_metrics(self, report: SparsityReport) -> dict[str, float]:
        return {f"{self._layer_prefix}{name}": value for name, value in report.items()}

    def _summarise(self, controller: SparsityController) -> SparsityReport:
        report = controller.report()
        self.report = report
        if self.verbose:
            title = f"{type(self).__name__}: {controller.sparsifier.name} {report.overall:.2%} sparse"
            rank_zero_info(report.table(title=title))
        return report


class PostTrainingSparsity(_SparsityCallback):
    """Sparsify the trained network once, at fit end.

    Like torch's ``PostTrainingDataSparsity``, a copy of the network is sparsified (in eval mode)
    and the trained model is left untouched; ``inplace=True`` sparsifies the model itself. The
    masks are squashed and the result is :attr:`sparsified`, with its :attr:`report`.

    Args:
        sparsifier: A registered name (``"magnitude"``, ``"builtin:magnitude"``) or a
            :class:`~sparsity_core.Sparsifier` subclass.
        sparsifier_args: Its arguments, a dict or a spec instance (validated here).
        submodule: Dotted name of the submodule to sparsify. Default: ``pl_module.model`` when
            the LightningModule has one, else the LightningModule itself.
        inplace: Sparsify the trained network itself instead of a copy.
        calibration_batches: Training batches run through the network for sparsifiers that need
            activations (ignored by the others).
        log_sparsity: Log ``sparsity/<parameter name in the LightningModule>`` and
            ``sparsity/overall`` (``sparsity/<submodule>/overall`` when one is named) to the
            trainer's loggers, from rank zero.
        verbose: Print the per-parameter table at the end (rank zero).
    """

    def __init__(
        self,
        sparsifier: str | type[Sparsifier],
        sparsifier_args: SparsifierArgs = None,
        *,
        submodule: str | None = None,
        inplace: bool = False,
        calibration_batches: int = 8,
        log_sparsity: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__(
            sparsifier,
            sparsifier_args,
            submodule=submodule,
            calibration_batches=calibration_batches,
            log_sparsity=log_sparsity,
            verbose=verbose,
        )
        self.inplace = inplace

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        network = _network(pl_module, self.submodule, type(self).__name__)
        self._bind_names(pl_module, network)
        target = network if self.inplace else copy.deepcopy(network).eval()
        controller = self.controller = self._controller(target)
        self._calibrate(trainer, controller, target)
        controller.step()
        _sync_masks(trainer, controller)
        controller.squash()
        self.sparsified = target
        report = self._summarise(controller)
        # pl_module.log is not allowed after training ends; write to the loggers directly.
        if self.log_sparsity and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({**self._layer_metrics(report), self._overall_name: report.overall}, step=trainer.global_step)
                logger.save()


class TrainingAwareSparsity(_SparsityCallback):
    """Gradual sparsity during training: masks follow a schedule and the network adapts to them.

    By default the model being trained is sparsified: masks are recomputed at the scheduler's
    boundaries (``unit="epoch"``: progress is the number of completed epochs, evaluated at train
    start and at each epoch end; ``unit="step"``: ``trainer.global_step``, checked after each
    optimizer step), pruned weights are zeroed again after every optimizer step (gradient
    accumulation, manual optimization and several optimizers included), and the masks are squashed
    at train end. :attr:`sparsified` is the network.

    ``inplace=False`` reproduces torch's ``TrainingAwareDataSparsity``: the model trains dense, and
    a sparsified copy (kept, refreshed in place rather than deep-copied every epoch) is updated at
    each epoch end with masks recomputed from the current weights at the scheduled level.

    Masks and schedule position are saved in checkpoints; resuming ends with exactly the masks and
    weights of an uninterrupted run. Under DDP every rank holds rank 0's masks.

    Args:
        sparsifier: A registered name or a :class:`~sparsity_core.Sparsifier` subclass.
        sparsifier_args: Its arguments (dict or spec instance; validated here).
        scheduler: A registered name (``"constant"``, ``"linear"``, ``"cubic"``, ``"step"``) or a
            :class:`~sparsity_core.Scheduler` subclass.
        scheduler_args: Its arguments: ``start``, ``end``, ``unit`` and its own fields.
        submodule: Dotted name of the submodule to sparsify (default: ``pl_module.model`` when
            there is one, else the LightningModule).
        inplace: Sparsify the model being trained (default) or, as the seed did, a copy of it.
        keep_masks: Keep the masks live at train end instead of squashing them (e.g. to fit again).
        calibration_batches: Training batches run through the network before each mask update, for
            sparsifiers that need activations.
        log_sparsity: At each epoch end, log ``sparsity/overall`` (``sparsity/<submodule>/overall``
            when one is named) through ``pl_module.log`` (so it can be monitored) and
            ``sparsity/<parameter name in the LightningModule>`` to the loggers, from rank zero.
        verbose: Print the per-parameter table at train end (rank zero).
    """

    def __init__(
        self,
        sparsifier: str | type[Sparsifier],
        sparsifier_args: SparsifierArgs = None,
        scheduler: str | type[Scheduler] = "constant",
        scheduler_args: SchedulerArgs = None,
        *,
        submodule: str | None = None,
        inplace: bool = True,
        keep_masks: bool = False,
        calibration_batches: int = 8,
        log_sparsity: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__(
            sparsifier,
            sparsifier_args,
            submodule=submodule,
            calibration_batches=calibration_batches,
            log_sparsity=log_sparsity,
            verbose=verbose,
        )
        self._scheduler_cls, self._scheduler_spec = _validated("scheduler", scheduler, scheduler_args)
        self.scheduler = scheduler
        self.scheduler_args = scheduler_args
        self.inplace = inplace
        self.keep_masks = keep_masks
        self._network_ref: nn.Module | None = None
        self._pending_state: dict[str, Any] | None = None
        self._last_step = -1

    @property
    def unit(self) -> str:
        return self._scheduler_spec.unit  # type: ignore[attr-defined,no-any-return]

    def _state_key_fields(self) -> dict[str, Any]:
        return {**super()._state_key_fields(), "inplace": self.inplace}

    # -- binding ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After strategy setup: the parameters are on their device and in their final dtype, and
        # the optimizers exist. Loops (epoch, step) are restored later, so the schedule is
        # evaluated at on_train_start.
        network = _network(pl_module, self.submodule, type(self).__name__)
        self._bind_names(pl_module, network)
        if self.inplace:
            if self.controller is None or not self._same_parameters(network):
                self.controller = self._controller(network, self._scheduler())
            self.sparsified = network
            self.controller.detach()
            for optimizer in trainer.optimizers:
                self.controller.attach(optimizer)
        else:
            if self.controller is None or self._network_ref is not network:
                # One copy for the whole fit, refreshed in place at each epoch end.
                self.sparsified = copy.deepcopy(network)
                self.controller = self._controller(self.sparsified, self._scheduler())
            else:
                self._refresh_copy(network)
        self._network_ref = network
        self._last_step = -1

    def _scheduler(self) -> tuple[type, BaseModel]:
        scheduler = self._scheduler_cls if isinstance(self.scheduler, type) else self.scheduler
        return scheduler, self._scheduler_spec  # type: ignore[return-value]

    def _same_parameters(self, network: nn.Module) -> bool:
        assert self.controller is not None
        params = dict(network.named_parameters())
        return self.controller.target is network and all(params.get(n) is t for n, t in self.controller.tensors.items())

    def _refresh_copy(self, network: nn.Module) -> None:
        assert self.sparsified is not None
        with torch.no_grad():
            self.sparsified.load_state_dict(network.state_dict())

    # -- schedule --------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        controller = self._require_controller()
        if self._pending_state is not None:
            # From a checkpoint: weights were restored before, so the saved masks match them.
            controller.load_state_dict(self._pending_state["controller"])
            self._pending_state = None
        t = trainer.global_step if self.unit == "step" else trainer.current_epoch
        self._last_step = trainer.global_step
        self._update(trainer, pl_module, t)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # global_step counts optimizer steps, so this runs once per step (not per accumulated
        # micro-batch); the seed's epoch-end semantics (inplace=False) ignore steps.
        if self.unit != "step" or not self.inplace or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        self._update(trainer, pl_module, trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # current_epoch is incremented after this hook: the epoch just finished is completed.
        if self.unit == "epoch":
            self._update(trainer, pl_module, trainer.current_epoch + 1)
        elif not self.inplace:
            self._update(trainer, pl_module, trainer.global_step)
        if self.log_sparsity:
            report = self._require_controller().report()
            # The overall level through pl_module.log on every rank, so that it is in each rank's
            # callback_metrics (ModelCheckpoint or EarlyStopping can monitor it; the loggers write
            # on rank zero only; the ranks agree, so the sync is exact). The per-layer values go
            # straight to the loggers in one call from rank zero: pl_module.log costs about a
            # millisecond per name.
            pl_module.log(self._overall_name, report.overall, on_step=False, on_epoch=True, sync_dist=True)
            if trainer.is_global_zero:
                layers = self._layer_metrics(report)
                for logger in trainer.loggers:
                    logger.log_metrics(layers, step=trainer.global_step)

    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: float) -> None:
        controller = self._require_controller()
        if self.inplace:
            if self._levels_change(controller, t):
                self._calibrate(trainer, controller, controller.target)  # type: ignore[arg-type]
            if controller.step(t):
                _sync_masks(trainer, controller)
            return
        # The seed's semantics: the copy takes the current dense weights and fresh masks.
        assert self._network_ref is not None
        self._refresh_copy(self._network_ref)
        levels = controller.levels_at(t)
        controller.t = float(t)
        if any(levels.values()):
            self._calibrate(trainer, controller, controller.target)  # type: ignore[arg-type]
            controller.update_masks(levels)
            _sync_masks(trainer, controller)
        else:
            controller.levels, controller.masks = levels, {}

    @staticmethod
    def _levels_change(controller: SparsityController, t: float) -> bool:
        return controller.sparsifier.needs_calibration and controller.levels_at(t) != controller.levels

    # -- the end ---------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        controller = self._require_controller()
        short = {n: (controller.levels[n], final) for n, final in controller.final_levels.items() if controller.levels[n] < final - 1e-9}
        if short:
            name, (reached, final) = next(iter(short.items()))
            spec = self._scheduler_spec
            rank_zero_warn(
                f"{type(self).__name__}: training ended at {self.unit} {controller.t:g} before the "
                f"{controller.scheduler.name!r} schedule reached its final level (end={spec.end:g}): "  # type: ignore[attr-defined]
                f"{len(short)} of {len(controller.final_levels)} tensors are short, e.g. {name!r} at "
                f"{reached:.4g} of {final:.4g}. Train longer or end the schedule earlier."
            )
        if self.keep_masks:
            controller.detach()
        else:
            controller.squash()
        self._summarise(controller)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.controller is not None:
            self.controller.detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.controller is not None:
            self.controller.detach()

    def _require_controller(self) -> SparsityController:
        if self.controller is None:
            raise RuntimeError(f"{type(self).__name__} is used outside fit(): no network is bound yet")
        return self.controller

    # -- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Masks and schedule position (the controller's state); loads with weights_only=True."""
        if self.controller is None:
            return dict(self._pending_state or {})
        return {"version": CALLBACK_STATE_VERSION, "controller": self.controller.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("version") != CALLBACK_STATE_VERSION:
            raise ValueError(
                f"{type(self).__name__}: unsupported checkpoint state version {state_dict.get('version')!r} "
                f"(this version reads {CALLBACK_STATE_VERSION})"
            )
        # Applied at train start, once the network is bound and its weights are restored.
        self._pending_state = dict(state_dict)


# jsonargparse (LightningCLI) evaluates postponed annotations with typing.get_type_hints, which
# drops `Annotated` and with it the validator of SparsifierArgs/SchedulerArgs; evaluated here
# (keeping it), the signatures reach it as written.
for _callback in (PostTrainingSparsity, TrainingAwareSparsity):
    _callback.__init__.__annotations__ = get_type_hints(_callback.__init__, include_extras=True)
