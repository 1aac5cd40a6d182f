"""``SparsityController``: masks, schedule and state for a module or named tensors.

The callbacks are thin wrappers on it; plain PyTorch loops use it directly.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from . import _calibration
from ._api import Args, create_scheduler, create_sparsifier
from ._base import Scheduler, Sparsifier
from ._contract import MaskContext, Reconstruction
from ._engine import apply_mask_, check_masks
from ._report import SparsityReport
from ._targets import select_tensors

STATE_VERSION = 1
#: Elements of each tensor looked at by squash() before it trusts that the tensor is still masked.
SPOT_CHECK = 1024

_Fused = Callable[[Mapping[str, torch.Tensor], Mapping[str, float], dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]


def _fused_masks(sparsifier: Sparsifier) -> _Fused | None:
    """The sparsifier's ``masks_applied`` (compute and apply each mask while the tensor is in
    cache) when the class that defines it also defines the ``compute_masks`` in use; a subclass
    that overrides ``compute_masks`` alone gets the plain path: compute, check, then apply."""

    def owner(attr: str) -> type:
        return next(c for c in type(sparsifier).__mro__ if attr in c.__dict__)

    fused_owner = owner("masks_applied")
    if fused_owner is Sparsifier or fused_owner is not owner("compute_masks"):
        return None
    return sparsifier.masks_applied  # type: ignore[return-value]


@functools.lru_cache(maxsize=256)
def _takes_context(func: Callable[..., Any]) -> bool:
    """Whether a ``compute_masks``/``masks_applied`` accepts contract v2's ``context``."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return "context" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _call(method: Callable[..., Any], *args: Any, context: MaskContext) -> Any:
    func = getattr(method, "__func__", method)
    return method(*args, context=context) if _takes_context(func) else method(*args)


def _still_masked(tensor: torch.Tensor, mask: torch.Tensor) -> bool:
    """A spot check: no pruned element among :data:`SPOT_CHECK` fixed positions is nonzero."""
    n = tensor.numel()
    if not tensor.is_contiguous() or n == 0:
        return n == 0
    gen = torch.Generator().manual_seed(n)
    index = torch.randint(n, (min(n, SPOT_CHECK),), generator=gen).to(tensor.device)
    values = tensor.detach().reshape(-1)[index]
    pruned = ~mask.reshape(-1)[index]
    return not bool(values[pruned].any())


class SparsityController:
    """Keeps one boolean mask per covered tensor and applies it in place.

    ``step(t)`` moves the schedule to progress ``t`` and recomputes masks when the level changes;
    ``apply_masks()`` re-zeroes pruned weights (call it after each optimizer step, or let
    :meth:`attach` register an optimizer step hook that does); ``squash()`` makes the masks
    permanent and drops them.
    """

    def __init__(
        self,
        target: nn.Module | Mapping[str, torch.Tensor],
        sparsifier: str | type[Sparsifier] | Sparsifier = "magnitude",
        sparsifier_args: Args = None,
        scheduler: str | type[Scheduler] | Scheduler = "constant",
        scheduler_args: Args = None,
        *,
        sequential: _calibration.Sequential | None = None,
    ) -> None:
        self.target = target
        self.sparsifier = create_sparsifier(sparsifier, sparsifier_args)
        self.scheduler = create_scheduler(scheduler, scheduler_args)
        caps = self.sparsifier.capabilities
        #: The blocks of a sequential calibration (``sequential=``), in order.
        self._blocks: list[tuple[str, nn.Module]] | None = None
        self._pending: list[Any] | None = None  # batches kept for the next sequential update
        if sequential is not None:
            if not isinstance(target, nn.Module):
                raise TypeError("sequential= needs an nn.Module target, not a mapping of tensors")
            if caps.gradients:
                raise ValueError(
                    f"sequential= calibrates block by block with forward passes only; sparsifier "
                    f"{self.sparsifier.name!r} needs gradients of a loss at the model's output"
                )
            self._blocks = _calibration.find_blocks(target, sequential)
            self._check_sequential_scope()
        selection = select_tensors(target, self.sparsifier)
        names = list(selection.tensors)
        self.tensors: dict[str, torch.Tensor] = selection.tensors
        #: Each covered tensor's layer kind and orientation (empty for a mapping target).
        self.layouts = selection.layouts
        #: Each covered parameter's owner module and attribute (module targets).
        self.owners = selection.owners
        #: Every name each covered tensor answers to (tied weights), canonical name first.
        self.aliases = selection.aliases
        self.final_levels: dict[str, float] = self.sparsifier.final_levels(names)
        self.levels: dict[str, float] = dict.fromkeys(names, 0.0)
        self.masks: dict[str, torch.Tensor] = {}
        self.t: float | None = None
        self._hooks: list[Any] = []
        # name -> (mask, tensor version, data pointer) when this controller last masked the tensor
        self._masked: dict[str, tuple[torch.Tensor, int, int]] = {}
        # name -> (mask, whether it prunes anything)
        self._pruning: dict[str, tuple[torch.Tensor, bool]] = {}

    # -- schedule ----------------------------------------------------------------------------
    def levels_at(self, t: float) -> dict[str, float]:
        return {n: self.scheduler(t, final) for n, final in self.final_levels.items()}

    def step(self, t: float | None = None) -> bool:
        """Move to progress ``t`` (default: the end of the schedule). Returns True when the
        masks were recomputed."""
        if t is None:
            t = max(self.scheduler.spec.end or 0.0, self.scheduler.spec.start)
        self.t = float(t)
        levels = self.levels_at(self.t)
        if levels == self.levels and (self.masks or not any(levels.values())):
            return False
        self.update_masks(levels)
        return True

    def update_masks(self, levels: Mapping[str, float] | None = None, names: Iterable[str] | None = None) -> None:
        """Recompute the masks at ``levels`` (default: the current ones) and apply them; only the
        tensors in ``names`` when given (one block of a sequential calibration).

        The sparsifier is told the masks in force (``context.current``). Unless it declares
        regrowth, a weight pruned before stays pruned: a ``ScoreSparsifier`` (or any v2
        sparsifier taking ``context``) does this itself, meeting the level exactly; for a v1
        ``compute_masks`` the new masks are intersected with the current ones here. A
        sparsifier that declares reconstruction may return new weights: they are written, then
        the pruned positions are zeroed.

        With the built-in selection (any ``ScoreSparsifier`` or ``data_norm`` that does not
        override ``compute_masks``) each tensor is masked as its mask is made, piece by piece
        where the pattern allows, rather than in a second pass over all weights. Should that
        raise (NaN weights, say), :attr:`masks` holds the new masks of the tensors already
        masked and the previous ones of the rest."""
        if levels is not None:
            self.levels = {**self.levels, **levels}
        if names is None and self._blocks is not None and self.sparsifier.capabilities.calibration:
            batches, self._pending = self._pending, None
            if not batches:
                raise ValueError(
                    f"sparsifier {self.sparsifier.name!r} calibrates block by block (sequential=): call "
                    f"calibrate(batches) before each mask update"
                )
            _calibration.sequential(self, batches, self._blocks)
            return
        chosen = list(self.tensors) if names is None else list(names)
        tensors = {n: self.tensors[n] for n in chosen}
        levels_now = {n: self.levels[n] for n in chosen}
        sparsifier = self.sparsifier
        caps = sparsifier.capabilities
        context = MaskContext(
            current={n: self.masks[n] for n in chosen if n in self.masks},
            layouts={n: self.layouts[n] for n in chosen if n in self.layouts},
        )
        fused = None if caps.reconstruction else _fused_masks(sparsifier)
        applied: dict[str, torch.Tensor] = {}
        try:
            with torch.no_grad():
                if fused is None:
                    result = _call(sparsifier.compute_masks, tensors, levels_now, context=context)
                else:
                    result = _call(fused, tensors, levels_now, applied, context=context)
        except BaseException:
            if applied:
                self.masks = {**self.masks, **applied}
                for name, mask in applied.items():
                    self._note_masked(name, mask)
            raise
        weights: Mapping[str, torch.Tensor] = {}
        if isinstance(result, Reconstruction):
            if not caps.reconstruction:
                raise TypeError(
                    f"sparsifier {sparsifier.name!r} returned new weights (Reconstruction) but does not declare "
                    f"capabilities.reconstruction; declare it, or return only the masks"
                )
            result, weights = result.masks, result.weights
        masks = check_masks(sparsifier, tensors, result)
        if context.current and not caps.regrowth and not _takes_context(getattr(sparsifier.compute_masks, "__func__", sparsifier.compute_masks)):
            # a v1 sparsifier does not know the current masks: keep what is pruned pruned
            masks = {n: m & context.current[n] if n in context.current else m for n, m in masks.items()}
        if weights:
            self._write_weights(weights)
        self.masks = {**self.masks, **masks}  # replaced, never changed in place (state_dict shares it)
        if fused is None:
            self.apply_masks(masks)
        else:
            for name, mask in masks.items():
                self._note_masked(name, mask)

    def _check_sequential_scope(self) -> None:
        caps = self.sparsifier.capabilities
        if not caps.calibration:
            return  # nothing to calibrate: masks are computed as usual
        if caps.allocates_levels:
            raise ValueError(
                f"sequential= selects each block on its own, but sparsifier {self.sparsifier.name!r} allocates "
                f"levels across all tensors at once"
            )
        specs = [self.sparsifier.spec, *(spec for _, spec in self.sparsifier._resolved_overrides)]
        if any(getattr(spec, "scope", "layer") == "global" for spec in specs):
            raise ValueError(
                f"sequential= calibrates and selects one block at a time; scope='global' needs every tensor's "
                f"scores at once. Use scope='layer' with sequential, or drop sequential for a global selection"
            )

    @torch.no_grad()
    def _write_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        unknown = set(weights) - set(self.tensors)
        if unknown:
            raise ValueError(f"sparsifier {self.sparsifier.name!r} returned weights for names it does not cover: {sorted(unknown)}")
        for name, value in weights.items():
            tensor = self.tensors[name]
            if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"sparsifier {self.sparsifier.name!r} returned new weights for {name!r} shaped {got}; "
                    f"the tensor is {tuple(tensor.shape)}"
                )
            if not torch.isfinite(value).all():
                raise ValueError(f"sparsifier {self.sparsifier.name!r} returned non-finite weights for {name!r}")
            tensor.detach().copy_(value)

    # -- masks -------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_masks(self, masks: Mapping[str, torch.Tensor] | None = None) -> None:
        """Zero every pruned element in place (runs after every optimizer step, so it is lean:
        one multiply by the bool mask, through NumPy on CPU where it is several times faster
        than torch's bool-to-float promotion). Always a full pass: an optimizer may write the
        weights without telling autograd (fused optimizers do not bump the version counter)."""
        for name, mask in (self.masks if masks is None else masks).items():
            if self._prunes(name, mask):
                apply_mask_(self.tensors[name], mask)
            self._note_masked(name, mask)

    def _prunes(self, name: str, mask: torch.Tensor) -> bool:
        """Whether ``mask`` prunes anything (worked out once per mask object): an all-True mask
        (a tensor at level 0, early in a schedule) costs no pass over its tensor."""
        known = self._pruning.get(name)
        if known is None or known[0] is not mask:
            known = self._pruning[name] = (mask, not bool(mask.all()))
        return known[1]

    def _note_masked(self, name: str, mask: torch.Tensor) -> None:
        tensor = self.tensors[name]
        self._masked[name] = (mask, tensor._version, tensor.data_ptr())

    def _is_masked(self, name: str, mask: torch.Tensor) -> bool:
        """True when this controller masked ``name`` with this very mask and the tensor has not
        been written since as far as torch can tell (same storage, same version counter), and a
        spot check of pruned positions finds only zeros (which catches writes that bypass the
        version counter, such as a fused optimizer step, whose updates move every pruned weight
        with a gradient)."""
        noted = self._masked.get(name)
        tensor = self.tensors[name]
        return (
            noted is not None
            and noted[0] is mask
            and noted[1] == tensor._version
            and noted[2] == tensor.data_ptr()
            and _still_masked(tensor, mask)
        )

    def attach(self, optimizer: torch.optim.Optimizer, *, gradients: bool = True) -> Any:
        """Re-apply the masks after every ``optimizer.step()``; returns the removable handle.

        For a sparsifier that needs gradients (``capabilities.gradients``) and ``gradients=True``,
        a step pre-hook also hands it each covered parameter of this optimizer and its
        (accumulated) gradient before the update (see :meth:`observe_gradients`). Closure-based
        optimizers (LBFGS) compute gradients inside ``step``: call :meth:`observe_gradients` in the
        closure instead. Lightning's callbacks deliver gradients from ``on_before_optimizer_step``
        and pass ``gradients=False``."""
        if gradients and self.sparsifier.capabilities.gradients:
            self._hooks.append(optimizer.register_step_pre_hook(lambda opt, *_: self.observe_gradients(opt)))
        handle = optimizer.register_step_post_hook(lambda *_: self.apply_masks())
        self._hooks.append(handle)
        return handle

    def observe_gradients(
        self, optimizer: torch.optim.Optimizer | None = None, parameters: Mapping[str, torch.Tensor] | None = None
    ) -> int:
        """Hand the sparsifier (``capabilities.gradients``) each covered parameter that has a
        gradient, with the gradient: those of ``optimizer`` when given, else all. ``parameters``
        maps covered names to the live parameters when they are not the covered tensors
        themselves (a sparsified copy of a network trained dense). Returns how many were handed."""
        if not self.sparsifier.capabilities.gradients:
            return 0
        live = dict(parameters) if parameters is not None else self.tensors
        if optimizer is not None:
            wanted = {id(p) for group in optimizer.param_groups for p in group["params"]}
            live = {n: p for n, p in live.items() if id(p) in wanted}
        handed = 0
        for name, param in live.items():
            grad = param.grad
            if grad is not None and name in self.tensors:
                self.sparsifier.observe_gradient(name, param, grad)
                handed += 1
        return handed

    def detach(self) -> None:
        """Remove every hook this controller registered (optimizer hooks)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def squash(self) -> None:
        """Make the masks permanent (pruned weights stay zero) and drop them.

        A tensor this controller has masked and nothing has written since (see
        :meth:`_is_masked`) is not passed over again: ``step()`` then ``squash()``, the one-shot
        path, reads the weights once. Anything else is masked once more."""
        with torch.no_grad():
            for name, mask in self.masks.items():
                if not self._is_masked(name, mask):
                    apply_mask_(self.tensors[name], mask)
        self.masks = {}
        self._masked = {}
        self._pruning = {}
        self.detach()

    # -- calibration -------------------------------------------------------------------------
    def calibrate(self, batches: Iterable[Any], loss_fn: Callable[[Any, Any], torch.Tensor] | None = None) -> int:
        """Give a sparsifier that needs data what it needs; returns the number of batches (0 when
        it needs none).

        Activations (``capabilities.calibration``): each batch is model inputs (a tensor, a tuple
        of positional inputs or a dict of keyword inputs). Without ``sequential`` the batches run
        through the model now (in eval mode, without gradients); with it they are kept and the
        next mask update calibrates and prunes block by block. Gradients
        (``capabilities.gradients``): ``loss_fn`` is required and each batch is
        ``(inputs, targets)``; ``loss_fn(model(inputs), targets)`` is differentiated per batch."""
        caps = self.sparsifier.capabilities
        if not (caps.calibration or caps.gradients):
            return 0
        if not isinstance(self.target, nn.Module):
            raise TypeError(
                f"sparsifier {self.sparsifier.name!r} needs {'activations' if caps.calibration else 'gradients'}: "
                f"calibration needs an nn.Module target, not a mapping of tensors"
            )
        if caps.gradients and loss_fn is None:
            raise ValueError(
                f"sparsifier {self.sparsifier.name!r} needs gradients: pass loss_fn=... with (inputs, targets) "
                f"calibration batches (in training, attach(optimizer) hands it the gradients instead)"
            )
        if loss_fn is not None and not caps.gradients:
            raise ValueError(f"loss_fn was given, but sparsifier {self.sparsifier.name!r} does not use gradients")
        self.sparsifier.reset_calibration()
        was_training = self.target.training
        self.target.eval()
        try:
            if caps.gradients:
                assert loss_fn is not None
                batches = list(batches)
                seen = _calibration.gradients(self, batches, loss_fn)
                if caps.calibration:
                    _calibration.dense(self, [inputs for inputs, _ in batches])
                return seen
            if self._blocks is not None:
                self._pending = list(batches)
                return len(self._pending)
            return _calibration.dense(self, batches)
        finally:
            self.target.train(was_training)

    # -- lottery-ticket rewinding ------------------------------------------------------------
    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of every covered tensor (to rewind to later, see :meth:`rewind`)."""
        return {n: t.detach().clone() for n, t in self.tensors.items()}

    @torch.no_grad()
    def rewind(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Reset the kept weights to ``weights`` (a :meth:`snapshot`), pruned ones stay zero:
        lottery-ticket rewinding (Frankle & Carbin 2019)."""
        for name, value in weights.items():
            if name not in self.tensors:
                raise KeyError(f"rewind: {name!r} is not a covered tensor")
            tensor = self.tensors[name]
            if value.shape != tensor.shape:
                raise ValueError(f"rewind: saved weights of {name!r} are shaped {tuple(value.shape)}, the tensor {tuple(tensor.shape)}")
            tensor.detach().copy_(value)
        self.apply_masks()

    # -- reporting and state -----------------------------------------------------------------
    def report(self) -> SparsityReport:
        return SparsityReport.measure(self.tensors)

    def state_dict(self) -> dict[str, Any]:
        """Masks (bool) and schedule position; loads with ``torch.load(weights_only=True)``."""
        return {
            "version": STATE_VERSION,
            "sparsifier": self.sparsifier.name,
            "t": self.t,
            "levels": dict(self.levels),
            # the bool masks themselves, not copies: a checkpoint is written at once, and masks
            # are replaced, never changed in place
            "masks": dict(self.masks),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported sparsity state version {state.get('version')!r}")
        unknown = set(state["masks"]) - set(self.tensors)
        if unknown:
            raise KeyError(f"saved masks for names this controller does not cover: {sorted(unknown)}")
        for name, mask in state["masks"].items():
            if mask.shape != self.tensors[name].shape:
                raise ValueError(f"saved mask for {name!r} has shape {tuple(mask.shape)}, tensor has {tuple(self.tensors[name].shape)}")
        self.t = state["t"]
        self.levels = {n: float(state["levels"].get(n, 0.0)) for n in self.tensors}
        self.masks = {n: m.to(device=self.tensors[n].device, dtype=torch.bool) for n, m in state["masks"].items()}
        self.apply_masks()
