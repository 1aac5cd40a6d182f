"""Lightning callbacks: post-training and training-aware sparsity, resolved by name.

They replace torch's experimental ``PostTrainingDataSparsity`` and ``TrainingAwareDataSparsity``
(torch/ao/pruning/_experimental/data_sparsifier/lightning/callbacks/) and keep their semantics: the
network is ``pl_module.model`` when there is one, the result is ``callback.sparsified``. All the
tensor work is done by :class:`~sparsity_core.SparsityController`; the callbacks only decide *when*
(Lightning's hooks), *what* (which module) and keep the state in checkpoints.

This is the only module of ``sparsity_core`` that imports Lightning.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal, Union, get_type_hints

import pytorch_lightning as pl
import torch
from pydantic import BaseModel, BeforeValidator
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from torch import nn

from ._api import resolve_class
from ._calibration import Sequential, find_blocks
from ._base import Scheduler, Sparsifier, validate_spec
from ._bits import PackedMask
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


def default_calibration_inputs(batch: Any) -> Any:
    """Model inputs from a training batch: a dict as is (``model(**batch)``, what Hugging Face
    collators yield), the first element of a tuple or list (``(inputs, targets)`` pairs), else the
    batch itself."""
    if isinstance(batch, dict):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    return batch


def _model_inputs(
    batches: Any, limit: int, device: torch.device, inputs: Callable[[Any], Any] | None = None
) -> Iterator[Any]:
    """Up to ``limit`` model inputs from a dataloader's batches, moved to ``device``."""
    to_inputs = inputs or default_calibration_inputs
    for i, batch in enumerate(batches):
        if i >= limit:
            return
        x = to_inputs(batch)
        if not isinstance(x, (torch.Tensor, dict, tuple)):
            raise TypeError(
                f"calibration needs model inputs (a tensor, a tuple of inputs, or a dict of keyword inputs), but "
                f"{'calibration_inputs' if inputs else 'the default calibration_inputs'} made a {type(x).__name__} "
                f"of a training batch; pass calibration_inputs=lambda batch: ... to the callback"
            )
        yield move_data_to_device(x, device)


@contextlib.contextmanager
def _in_place_of(pl_module: pl.LightningModule, submodule: str | None, network: nn.Module) -> Iterator[None]:
    """Inside the block, ``network`` stands where ``pl_module.<submodule>`` is (a sparsified copy
    of it, say), so that the LightningModule's own forward runs through it."""
    if not submodule:
        yield
        return
    parent_path, _, attr = submodule.rpartition(".")
    parent = pl_module.get_submodule(parent_path) if parent_path else pl_module
    original = getattr(parent, attr)
    if original is network:
        yield
        return
    setattr(parent, attr, network)
    try:
        yield
    finally:
        setattr(parent, attr, original)


def _unsharded_masks(controller: SparsityController) -> list[str]:
    """The masked tensors every rank holds whole. A sharded (FSDP2) tensor's mask is this rank's
    rows, made exact across the ranks by the selection itself: nothing to broadcast."""
    return [n for n in controller.masks if n not in controller.shards]


def _sync_masks(trainer: pl.Trainer, controller: SparsityController) -> None:
    """Make every rank hold rank 0's masks (and, if any rank disagreed, rank 0's covered tensors;
    always rank 0's covered tensors for a sparsifier that reconstructs weights). Sharded tensors
    are left out: each rank holds different rows (see :func:`_unsharded_masks`).

    Under DDP the weights agree on every rank, so deterministic sparsifiers agree too and this is
    one small broadcast; it guards against sparsifiers that are not bit-reproducible.
    """
    names = _unsharded_masks(controller)
    if trainer.world_size <= 1 or not names:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    device = trainer.strategy.root_device if dist.get_backend() == "nccl" else torch.device("cpu")
    packed = controller.masks.packed()  # the bits as held: a byte per 8 weights on the wire
    local = torch.cat([packed[n].data for n in names]).to(device=device)
    synced = local.clone()
    dist.broadcast(synced, src=0)
    differs = torch.tensor([int(not torch.equal(local, synced))], device=device)
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    if not differs.item() and not controller.sparsifier.capabilities.reconstruction:
        return
    # Some rank's own masks already zeroed weights that rank 0 keeps: take rank 0's values too.
    masks, offset = dict(packed), 0
    for name in names:
        tensor = controller.tensors[name]
        size = packed[name].data.numel()
        masks[name] = PackedMask(synced[offset : offset + size].to(packed[name].device, copy=True), packed[name].shape)
        offset += size
        buffer = tensor.detach().to(device).contiguous()
        dist.broadcast(buffer, src=0)
        with torch.no_grad():
            tensor.copy_(buffer)
    controller.masks = masks  # replaced, never changed in place (state_dict shares them)
    controller.apply_masks()


def _refuse_sharded(network: nn.Module, who: str, what: str) -> None:
    """``what`` (a feature) does not work on sharded (FSDP2) parameters: a ValueError naming one."""
    from ._sharding import is_dtensor

    name = next((n for n, p in network.named_parameters() if is_dtensor(p)), None)
    if name is not None:
        raise ValueError(
            f"{who}: {what} is not supported with sharded parameters (FSDP2, ModelParallelStrategy; e.g. "
            f"{name!r}); sparsify the model being trained (inplace=True, no rewind_to)"
        )


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
        sequential: Sequential | None = None,
        calibration_inputs: Callable[[Any], Any] | None = None,
        training_gradients: bool = False,
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
        self._check_data_needs(calibration_batches, sequential, calibration_inputs, training_gradients)
        self.sparsifier = sparsifier
        self.sparsifier_args = sparsifier_args
        self.submodule = submodule
        self.sequential = sequential
        self.calibration_inputs = calibration_inputs
        self.calibration_batches = calibration_batches
        self.log_sparsity = log_sparsity
        self.verbose = verbose
        #: The controller doing the work (bound at train start).
        self.controller: SparsityController | None = None
        self._pl_module: pl.LightningModule | None = None
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

    def _check_data_needs(
        self,
        calibration_batches: int,
        sequential: Sequential | None,
        calibration_inputs: Callable[[Any], Any] | None,
        training_gradients: bool,
    ) -> None:
        """Every calibration misconfiguration the class's capabilities reveal, before any training."""
        caps = self._sparsifier_cls.capabilities
        who = f"{type(self).__name__}: sparsifier {getattr(self._sparsifier_cls, 'name', '?')!r}"
        if caps.calibration and calibration_batches == 0:
            raise ValueError(f"{who} needs activations (capabilities.calibration), but calibration_batches=0; give it > 0")
        if caps.gradients and not training_gradients and calibration_batches == 0:
            raise ValueError(
                f"{who} needs gradients (capabilities.gradients): it takes them from calibration_batches training "
                f"batches through training_step's loss, but calibration_batches=0; give it > 0"
            )
        if calibration_inputs is not None and not callable(calibration_inputs):
            raise TypeError(f"{who}: calibration_inputs must be a callable (batch -> model inputs), got {type(calibration_inputs).__name__}")
        if sequential is not None:
            if not (isinstance(sequential, str) and sequential) and not (
                isinstance(sequential, Sequence) and sequential and all(isinstance(p, str) and p for p in sequential)
            ):
                raise TypeError(f"{who}: sequential must be a glob or a list of block module names, got {sequential!r}")
            if caps.gradients:
                raise ValueError(f"{who} needs gradients of the model's loss: sequential= (forward-only, block by block) does not apply")

    def _controller(self, target: nn.Module, scheduler: tuple[type, BaseModel] | None = None) -> SparsityController:
        # Resolve the name again: implementations are bound at train start, so a registry that
        # changed since construction (a plugin installed, a test registry) is honoured.
        sparsifier = self._sparsifier_cls if isinstance(self.sparsifier, type) else self.sparsifier
        sched = () if scheduler is None else scheduler
        controller = SparsityController(target, sparsifier, self._sparsifier_spec, *sched, sequential=self.sequential)
        if self.submodule and self._pl_module is not None and type(self._pl_module).forward is not pl.LightningModule.forward:
            # calibration runs the LightningModule's own forward: the submodule may not be fed
            # the batches directly (an encoder behind a tokenizer step, say)
            controller.calibration_model = self._pl_module
        return controller

    def _check_network(self, network: nn.Module) -> None:
        """At fit start, once the model is known: the sequential blocks exist."""
        if self.sequential is not None and self._sparsifier_cls.capabilities.calibration:
            find_blocks(network, self.sequential)

    def _batches(self, trainer: pl.Trainer) -> Any:
        loader = trainer.train_dataloader
        if loader is None:
            trainer.fit_loop.setup_data()
            loader = trainer.train_dataloader
        return loader or []

    def _calibrate(self, trainer: pl.Trainer, controller: SparsityController, network: nn.Module) -> None:
        """Activations for a sparsifier that needs them: ``calibration_batches`` training batches
        through ``calibration_inputs`` (dict, tuple and tensor batches work as they are)."""
        if not controller.sparsifier.capabilities.calibration:
            return
        device = next(network.parameters()).device
        batches = _model_inputs(self._batches(trainer), self.calibration_batches, device, self.calibration_inputs)
        seen = controller.calibrate(batches)
        if seen == 0:
            raise ValueError(f"sparsifier {controller.sparsifier.name!r} needs activations, but the trainer has no training batches")

    def _gradients_from_loss(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, controller: SparsityController, network: nn.Module
    ) -> None:
        """Gradients for a sparsifier that needs them, outside training: ``training_step``'s loss
        on ``calibration_batches`` training batches, differentiated with ``torch.autograd.grad``
        (nothing is stepped, ``.grad`` is not touched; ``self.log`` calls are ignored meanwhile).
        ``network`` is the trained network; the sparsifier sees the gradients under its names."""
        sparsifier = controller.sparsifier
        if not sparsifier.capabilities.gradients:
            return
        params = dict(network.named_parameters())
        names = [n for n in controller.tensors if n in params and params[n].requires_grad]
        sparsifier.reset_calibration()
        quiet = {"log": lambda *a, **k: None, "log_dict": lambda *a, **k: None}
        pl_module.__dict__.update(quiet)
        seen = 0
        try:
            for i, batch in enumerate(self._batches(trainer)):
                if i >= self.calibration_batches:
                    break
                batch = move_data_to_device(batch, pl_module.device)
                with torch.enable_grad():
                    out = pl_module.training_step(batch, i)
                loss = out.get("loss") if isinstance(out, Mapping) else out
                if not isinstance(loss, torch.Tensor):
                    raise ValueError(
                        f"sparsifier {sparsifier.name!r} needs gradients, taken from training_step's loss, but "
                        f"training_step returned {type(out).__name__} (manual optimization?); use "
                        f"TrainingAwareSparsity, or sparsify(..., loss_fn=...) on the network"
                    )
                grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
                for name, grad in zip(names, grads):
                    if grad is not None:
                        sparsifier.observe_gradient(name, controller.tensors[name], grad)
                seen += 1
        finally:
            for key in quiet:
                pl_module.__dict__.pop(key, None)
        if seen == 0:
            raise ValueError(f"sparsifier {sparsifier.name!r} needs gradients, but the trainer has no training batches")

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
        calibration_batches: Training batches used by sparsifiers that need data (ignored by the
            others): run through the network for activations, or through ``training_step`` for
            gradients of its loss.
        calibration_inputs: ``batch -> model inputs`` for activation calibration. Default: a dict
            batch as is (``model(**batch)``), the first element of a tuple/list, else the batch.
        sequential: A glob or list of block module names (``"transformer.h.*"``): calibrate and
            prune block by block on the outputs of the blocks already pruned, holding one block's
            statistics at a time (see :func:`~sparsity_core.sparsify`).
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
        calibration_inputs: Callable[[Any], Any] | None = None,
        sequential: str | list[str] | None = None,
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
            sequential=sequential,
            calibration_inputs=calibration_inputs,
        )
        self.inplace = inplace

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Fail before training on what only the model can tell (a sequential pattern that names no
        # block, a copy of sharded parameters).
        network = _network(pl_module, self.submodule, type(self).__name__)
        self._check_network(network)
        if not self.inplace:
            _refuse_sharded(network, type(self).__name__, "inplace=False (a copy of the network)")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        network = _network(pl_module, self.submodule, type(self).__name__)
        self._bind_names(pl_module, network)
        self._pl_module = pl_module
        target = network if self.inplace else copy.deepcopy(network).eval()
        controller = self.controller = self._controller(target)
        self._gradients_from_loss(trainer, pl_module, controller, network)
        with _in_place_of(pl_module, self.submodule, target):
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
            sparsifiers that need activations. (A sparsifier that needs gradients gets them from
            training itself: every optimizer step's gradients, before the update.)
        calibration_inputs: ``batch -> model inputs`` for activation calibration (default: a dict
            batch as is, the first element of a tuple/list, else the batch).
        sequential: A glob or list of block module names: calibrate and prune block by block at
            each mask update (see :func:`~sparsity_core.sparsify`).
        rewind_to: Lottery-ticket rewinding (Frankle & Carbin 2019): after each mask update the
            kept weights are reset to their values at ``"init"`` (train start) or at progress
            ``k`` (in the scheduler's unit; updates before ``k`` do not rewind). The saved weights
            ride in the checkpoint. Default: no rewinding.
        upkeep: How pruned weights stay zero between mask updates (see
            :meth:`~sparsity_core.SparsityController.attach`): ``"weights"`` re-applies the masks
            after every optimizer step (any optimizer); ``"gradients"`` masks the gradients and the
            optimizer state instead (SGD, Adam, AdamW; cheaper-or-equal without gradient
            accumulation, and clipping then sees the kept weights' gradients only); ``"auto"``
            picks per optimizer.
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
        calibration_inputs: Callable[[Any], Any] | None = None,
        sequential: str | list[str] | None = None,
        rewind_to: Union[Literal["init"], int, None] = None,
        upkeep: Literal["auto", "weights", "gradients"] = "weights",
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
            sequential=sequential,
            calibration_inputs=calibration_inputs,
            training_gradients=True,
        )
        self._scheduler_cls, self._scheduler_spec = _validated("scheduler", scheduler, scheduler_args)
        if rewind_to is not None and rewind_to != "init" and not (isinstance(rewind_to, int) and not isinstance(rewind_to, bool) and rewind_to >= 0):
            raise ValueError(f"{type(self).__name__}: rewind_to must be 'init', a non-negative int (epoch or step) or None, got {rewind_to!r}")
        if self._sparsifier_cls.capabilities.gradients:
            first = self._scheduler_cls(self._scheduler_spec)(0.0, self._sparsifier_spec.sparsity_level)  # type: ignore[attr-defined]
            if first > 0:
                raise ValueError(
                    f"{type(self).__name__}: sparsifier {self._sparsifier_cls.name!r} needs gradients from training "
                    f"before its first mask update, but the {self._scheduler_cls.name!r} schedule asks for level "
                    f"{first:g} at train start; start it later (scheduler_args={{'start': 1, ...}})"
                )
        if upkeep not in ("auto", "weights", "gradients"):
            raise ValueError(f"{type(self).__name__}: upkeep must be 'auto', 'weights' or 'gradients', got {upkeep!r}")
        self.rewind_to = rewind_to
        self.upkeep = upkeep
        #: The weights kept weights are rewound to (``rewind_to``), once taken.
        self._rewind_weights: dict[str, torch.Tensor] | None = None
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
        self._pl_module = pl_module
        self._check_network(network)
        if not self.inplace:
            _refuse_sharded(network, type(self).__name__, "inplace=False (a copy of the network)")
        if self.rewind_to is not None:
            # the weights to rewind to would be each rank's rows, and a checkpoint keeps rank 0's
            _refuse_sharded(network, type(self).__name__, "rewind_to")
        if self.inplace:
            if self.controller is None or not self._same_parameters(network):
                self.controller = self._controller(network, self._scheduler())
            # under DDP the masks are final only once rank 0's are everywhere (see _update)
            self.controller.mask_optimizer_state_on_update = False
            self.sparsified = network
            self.controller.detach()
            for optimizer in trainer.optimizers:
                # gradients are delivered from on_before_optimizer_step: after the closure's backward
                self.controller.attach(optimizer, gradients=False, upkeep=self.upkeep)
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

    # -- gradients -------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # After backward (the closure has run; accumulated micro-batches included), before the update.
        controller = self.controller
        if controller is None or not controller.sparsifier.capabilities.gradients:
            return
        live = None
        if not self.inplace and self._network_ref is not None:
            params = dict(self._network_ref.named_parameters())
            live = {n: params[n] for n in controller.tensors if n in params}
        controller.observe_gradients(getattr(optimizer, "optimizer", optimizer), live)

    # -- schedule --------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        controller = self._require_controller()
        if self._pending_state is not None:
            # From a checkpoint: weights were restored before, so the saved masks match them.
            controller.load_state_dict(self._pending_state["controller"])
            rewind = self._pending_state.get("rewind")
            self._rewind_weights = {n: w.to(controller.tensors[n].device) for n, w in rewind.items()} if rewind else None
            self._pending_state = None
        elif self.rewind_to == "init" and self._rewind_weights is None:
            self._rewind_weights = controller.snapshot()
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
        if isinstance(self.rewind_to, int) and self._rewind_weights is None and t >= self.rewind_to:
            self._rewind_weights = controller.snapshot()
        if self.inplace:
            if self._levels_change(controller, t):
                self._calibrate(trainer, controller, controller.target)  # type: ignore[arg-type]
            if controller.step(t):
                if self._rewind_weights is not None:
                    controller.rewind(self._rewind_weights)
                _sync_masks(trainer, controller)
                controller.mask_optimizer_state()
            return
        # The seed's semantics: the copy takes the current dense weights and fresh masks.
        assert self._network_ref is not None
        self._refresh_copy(self._network_ref)
        levels = controller.levels_at(t)
        controller.t = float(t)
        if any(levels.values()):
            with _in_place_of(pl_module, self.submodule, controller.target):  # type: ignore[arg-type]
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
        state: dict[str, Any] = {"version": CALLBACK_STATE_VERSION, "controller": self.controller.state_dict()}
        if self._rewind_weights is not None:
            state["rewind"] = dict(self._rewind_weights)
        return state

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
