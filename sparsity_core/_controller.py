"""``SparsityController``: masks, schedule and state for a module or named tensors.

The callbacks are thin wrappers on it; plain PyTorch loops use it directly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, Literal

import torch
from torch import nn

from . import _calibration, _sharding
from ._api import Args, create_scheduler, create_sparsifier
from ._base import Scheduler, Sparsifier
from ._bits import MaskView, PackedMask, packed_size
from ._contract import MaskContext, Reconstruction, accepts_context
from ._engine import apply_mask_, check_masks, kernels, native
from ._report import Row, SparsityReport
from ._shards import Communicator, Shards
from ._targets import select_tensors

#: 3: masks saved packed (uint8, 1 bit per element, with their shapes); 1 and 2 (bool masks) still load.
STATE_VERSION = 3
#: Elements of each tensor looked at by squash() before it trusts that the tensor is still masked.
SPOT_CHECK = 1024
#: Tensors of at most this many elements are re-masked together, one foreach multiply per dtype.
SMALL_TENSOR = 4096
#: While an optimizer is attached (masks applied to the weights after every step, or to the
#: gradients at every backward), the masks of these tensors are also held unpacked (one byte per
#: weight, as before 1-bit masks) where a multiply by a bool mask measured faster than applying
#: the packed bits: fp32 on CPU without the engine's compiled kernels (NumPy: packed 1.06-1.45x
#: the bool multiply, 100M parameters, benchmarks/masks.py), and accelerators (torch unpacks in
#: several kernels: on an H200, 1.07B bf16 weights, packed 2.48x the bool multiply;
#: benchmarks/gpu.py). Everywhere else the packed masks are applied directly and no
#: byte-per-weight copy exists: CPU bf16/fp16 (zeroed through a 16-bit integer view, 5.6-7x faster
#: than torch's bool multiply) and CPU fp32 with the compiled kernels (one pass over the bits,
#: 0.81x the bool multiply).
def _unpacked_while_training(tensor: torch.Tensor) -> bool:
    if not tensor.is_cpu:
        return True
    if tensor.dtype in (torch.bfloat16, torch.float16):
        return False
    return not (tensor.dtype == torch.float32 and native.enabled() and kernels.NUMPY_KERNELS)


#: ``attach(upkeep=...)``: how pruned weights are kept at zero through optimizer steps.
Upkeep = Literal["auto", "weights", "gradients"]
#: Optimizer classes (exactly these, not subclasses) for which masking gradients and zeroing the
#: state once per mask update was verified to keep pruned weights exactly zero (tests/test_upkeep.py).
GRADIENT_UPKEEP: frozenset[type] = frozenset({torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW})
#: The verified classes for which ``upkeep="auto"`` picks ``"gradients"`` because it measured
#: cheaper (benchmarks/upkeep.py, docs/upkeep.md): SGD, where masking gradients took 0.80-0.94 of
#: re-applying the masks on 100M-parameter stacks. Adam and AdamW measured even (0.88-1.34) and
#: keep "weights", which pays its pass once per step where "gradients" pays it once per backward
#: (each accumulated micro-batch).
AUTO_GRADIENTS: frozenset[type] = frozenset({torch.optim.SGD})

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


def _call(method: Callable[..., Any], *args: Any, context: MaskContext) -> Any:
    return method(*args, context=context) if accepts_context(method) else method(*args)


def _check_tensor(name: str, tensor: torch.Tensor) -> None:
    """Tensors no mask can be made for, refused with what to do (never a raw ``.item()`` error)."""
    if isinstance(tensor, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"covered tensor {name!r} is a lazy parameter that is not initialised yet: run one forward pass "
            f"(or call the module once) before sparsifying"
        )
    if tensor.is_meta:
        raise ValueError(
            f"covered tensor {name!r} is on the meta device (no values): materialise the model first, e.g. "
            f"model.to_empty(device='cpu') and load its weights"
        )
    if not _sharding.is_dtensor(tensor) and hasattr(tensor, "_local_tensor"):
        raise ValueError(
            f"covered tensor {name!r} is a {type(tensor).__name__}, a tensor subclass holding a local part: only "
            f"torch.distributed.tensor.DTensor sharded by rows (FSDP2's fully_shard) is supported"
        )
    if getattr(tensor, "_is_flat_param", False) or getattr(tensor, "_fsdp_flattened", False):
        raise ValueError(
            f"covered tensor {name!r} is managed by FSDP1 (FullyShardedDataParallel): each rank holds a flat "
            f"fragment, and masks made from fragments would be wrong (per-fragment levels, N:M groups across "
            f"rows); use FSDP2 (torch.distributed.fsdp.fully_shard, Lightning's ModelParallelStrategy), which is "
            f"supported, or sparsify before wrapping the model"
        )
    if hasattr(tensor, "ds_id") or hasattr(tensor, "ds_numel"):
        raise ValueError(
            f"covered tensor {name!r} is a DeepSpeed ZeRO partition: each rank holds a fragment, and masks made "
            f"from fragments would be wrong; use FSDP2 (torch.distributed.fsdp.fully_shard, Lightning's "
            f"ModelParallelStrategy), which is supported, or sparsify before deepspeed.initialize, or with ZeRO stage 0-2"
        )
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise ValueError(
            f"covered tensor {name!r} has dtype {tensor.dtype}: masks are made for floating-point weights; "
            f"exclude it (exclude=['{name}'])"
        )


def _still_masked(tensor: torch.Tensor, mask: PackedMask) -> bool:
    """A spot check: no pruned element among :data:`SPOT_CHECK` fixed positions is nonzero."""
    n = tensor.numel()
    if not tensor.is_contiguous() or n == 0:
        return n == 0
    gen = torch.Generator().manual_seed(n)
    index = torch.randint(n, (min(n, SPOT_CHECK),), generator=gen).to(tensor.device)
    values = tensor.detach().reshape(-1)[index]
    pruned = ~mask.at(index).to(tensor.device)
    return not bool(values[pruned].any())


def _apply(mask: PackedMask | torch.Tensor, tensor: torch.Tensor) -> None:
    """Zero ``tensor``'s pruned elements with a packed mask (in pieces) or a bool one (a caller's)."""
    if isinstance(mask, PackedMask):
        mask.apply_(tensor)
    else:
        apply_mask_(tensor, mask.to(tensor.device))


class _Sink(MutableMapping[str, torch.Tensor]):
    """The ``applied`` mapping of the fused path: the engine hands over each bool mask as soon as
    it is final and keeps no reference to it; the sink packs it at once (``hold``) or, for a
    one-shot prune that needs no masks afterwards, only notes that the tensor is masked. So at
    most one tensor's bool mask exists at a time."""

    def __init__(self, sparsifier: str, tensors: Mapping[str, torch.Tensor], hold: bool) -> None:
        self.sparsifier, self.tensors, self.hold = sparsifier, tensors, hold
        self.packed: dict[str, PackedMask] = {}
        self.done: list[str] = []

    def __setitem__(self, name: str, mask: torch.Tensor | PackedMask) -> None:
        tensor = self.tensors.get(name)
        if tensor is None or not isinstance(mask, (torch.Tensor, PackedMask)) or mask.shape != tensor.shape:
            got = tuple(mask.shape) if isinstance(mask, (torch.Tensor, PackedMask)) else type(mask).__name__
            raise ValueError(
                f"sparsifier {self.sparsifier!r} recorded a mask for {name!r} shaped {got}; "
                + (f"the tensor is {tuple(tensor.shape)}" if tensor is not None else "it is not among the tensors asked for")
            )
        self.done.append(name)
        if self.hold:
            self.packed[name] = mask if isinstance(mask, PackedMask) else PackedMask.pack(mask.to(torch.bool))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.packed[name].to_bool()

    def __delitem__(self, name: str) -> None:
        del self.packed[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.packed)

    def __len__(self) -> int:
        return len(self.packed)


class SparsityController:
    """Keeps one boolean mask per covered tensor, packed 1 bit per element, and applies it in place.

    ``step(t)`` moves the schedule to progress ``t`` and recomputes masks when the level changes;
    ``apply_masks()`` re-zeroes pruned weights (call it after each optimizer step, or let
    :meth:`attach` register an optimizer step hook that does); ``squash()`` makes the masks
    permanent and drops them.

    :attr:`masks` reads as a mapping of names to bool masks; they are stored packed
    (:class:`~sparsity_core._bits.PackedMask`, an eighth of a bool mask's bytes) and each read
    unpacks a fresh bool tensor. Assigning a mapping of bool masks to :attr:`masks` replaces them.

    Parameters sharded by rows (FSDP2's ``fully_shard``: DTensors placed ``Shard(0)`` on a 1-D
    mesh) are masked where each rank holds them: their masks are shaped like the local rows
    (:meth:`local`), the sparsifier gets the local rows and ``context.shards``, and
    :meth:`report` and :meth:`state_dict` reduce over the ranks (call them on every rank).
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
        #: What calibration batches run through: the target by default; a larger model holding it
        #: (the whole LightningModule around a submodule) when set.
        self.calibration_model: nn.Module | None = target if isinstance(target, nn.Module) else None
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
        for name, tensor in selection.tensors.items():
            _check_tensor(name, tensor)
        #: The covered tensors sharded by rows (FSDP2): where this rank's rows sit. Their masks
        #: are shaped like the local rows (``tensor.to_local()``), not like the global tensor.
        self.shards: dict[str, _sharding.Sharded] = {
            n: _sharding.describe(n, t) for n, t in selection.tensors.items() if _sharding.is_dtensor(t)
        }
        #: The communicator of the ranks holding :attr:`shards` (None when nothing is sharded).
        self.comm: Communicator | None = None
        if self.shards:
            if not caps.shard_safe:
                name = next(iter(self.shards))
                raise ValueError(
                    f"sparsifier {self.sparsifier.name!r} does not declare capabilities.shard_safe, and covered "
                    f"tensor {name!r} is sharded by rows (FSDP2): its masks would be made from each rank's rows "
                    f"alone. Shard-safe sparsifiers score each element from itself or its row (magnitude, random); "
                    f"calibrated ones (wanda, sparsegpt) need statistics made shard-aware first. Sparsify before "
                    f"sharding, or exclude the sharded tensors"
                )
            self.comm = _sharding.communicator(f"sparsifier {self.sparsifier.name!r}", self.shards)
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
        self._masks: dict[str, PackedMask] = {}
        #: Keep the masks after an update (off for a one-shot prune: each mask is dropped once applied).
        self._hold_masks = True
        #: Set while an optimizer is attached: the masks its steps apply are then also held
        #: unpacked where that is faster (:func:`_unpacked_while_training`), in ``_unpacked``.
        self._unpacked_for_steps = False
        self._unpacked: dict[str, tuple[PackedMask, torch.Tensor]] = {}  # name -> (mask, its bool copy)
        self.t: float | None = None
        self._hooks: list[Any] = []
        self._grad_hooked: set[int] = set()  # ids of the parameters whose gradients are masked
        self._optimizers: list[torch.optim.Optimizer] = []  # attached: their state follows the masks
        self._plan: tuple[dict[str, PackedMask], list[tuple[Any, Any]]] | None = None
        self._plan_locals: dict[str, torch.Tensor] = {}  # the local tensors of sharded parameters the plan holds
        #: Zero the attached optimizers' state of pruned entries at each mask update. A caller
        #: that replaces the masks after an update (DDP: rank 0's masks on every rank) turns
        #: it off and calls :meth:`mask_optimizer_state` once the masks are final.
        self.mask_optimizer_state_on_update = True
        # name -> (mask, tensor version, data pointer) when this controller last masked the tensor
        self._masked: dict[str, tuple[PackedMask, int, int]] = {}

    @property
    def masks(self) -> MaskView:
        """Name -> bool keep mask of every tensor that has one (a read-only view: each read unpacks
        the stored 1-bit mask into a new bool tensor)."""
        return MaskView(self._masks)

    @masks.setter
    def masks(self, masks: Mapping[str, torch.Tensor | PackedMask]) -> None:
        """Replace every mask (bool tensors shaped like their tensors, or packed masks)."""
        if isinstance(masks, MaskView):
            self._masks = dict(masks.packed())
            return
        packed = {}
        for name, mask in masks.items():
            if not isinstance(mask, PackedMask):
                mask = PackedMask.pack(mask)
            if name not in self.tensors or mask.shape != self.local(name).shape:
                raise ValueError(f"masks: {name!r} is not a covered tensor of shape {tuple(mask.shape)}")
            packed[name] = mask
        self._masks = packed

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
        if levels == self.levels and (self._masks or not any(levels.values())):
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
        self._follow_live_parameters()
        chosen = list(self.tensors) if names is None else list(names)
        tensors = {n: self.local(n) for n in chosen}
        levels_now = {n: self.levels[n] for n in chosen}
        sparsifier = self.sparsifier
        caps = sparsifier.capabilities
        sharded = {n: self.shards[n].shard for n in chosen if n in self.shards}
        context = MaskContext(
            # unpacked one tensor at a time, as the sparsifier reads them
            current=MaskView({n: self._masks[n] for n in chosen if n in self._masks}),
            layouts={n: self.layouts[n] for n in chosen if n in self.layouts},
            shards=Shards(self.comm, sharded) if sharded and self.comm is not None else None,
        )
        fused = None if caps.reconstruction else _fused_masks(sparsifier)
        sink = _Sink(sparsifier.name, tensors, self._hold_masks)
        try:
            with torch.no_grad():
                if fused is None:
                    result = _call(sparsifier.compute_masks, tensors, levels_now, context=context)
                else:
                    result = _call(fused, tensors, levels_now, sink, context=context)
        except BaseException:
            if sink.packed:
                self._masks = {**self._masks, **sink.packed}
                for name, mask in sink.packed.items():
                    self._note_masked(name, mask)
            raise
        if fused is not None:
            handed = set(sink.done)
            missing = [n for n in chosen if n not in handed]
            if missing:
                raise ValueError(f"sparsifier {sparsifier.name!r} recorded no mask for {missing} (masks_applied)")
            del result  # the engine hands its masks to the sink and keeps none
            self._take_masks(sink.packed, applied=True)
            return
        weights: Mapping[str, torch.Tensor] = {}
        if isinstance(result, Reconstruction):
            if not caps.reconstruction:
                raise TypeError(
                    f"sparsifier {sparsifier.name!r} returned new weights (Reconstruction) but does not declare "
                    f"capabilities.reconstruction; declare it, or return only the masks"
                )
            result, weights = result.masks, result.weights
        masks = check_masks(sparsifier, tensors, result)
        del result
        if context.current and not caps.regrowth and not accepts_context(sparsifier.compute_masks):
            # a v1 sparsifier does not know the current masks: keep what is pruned pruned
            masks = {n: m & context.current[n] if n in context.current else m for n, m in masks.items()}
        if weights:
            self._write_weights(weights)
        packed = {}
        for name in list(masks):  # each bool mask dropped once packed (the sparsifier may still hold them)
            packed[name] = PackedMask.pack(masks.pop(name))
        self._take_masks(packed, applied=False)

    def _take_masks(self, masks: dict[str, PackedMask], applied: bool) -> None:
        """Put new masks in force: kept (unless a one-shot prune drops them), the optimizers' state
        masked, and applied to their tensors unless the fused path already did."""
        if self._hold_masks:
            self._masks = {**self._masks, **masks}  # replaced, never changed in place (state_dict shares it)
        if self.mask_optimizer_state_on_update:
            self._mask_optimizer_state(masks)
        if applied:
            for name, mask in masks.items():
                self._note_masked(name, mask)
        else:
            self.apply_masks(masks)

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
                "sequential= calibrates and selects one block at a time; scope='global' needs every tensor's "
                "scores at once. Use scope='layer' with sequential, or drop sequential for a global selection"
            )

    @torch.no_grad()
    def _write_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Write a reconstruction's weights: all of them checked first, so a refused one leaves
        every tensor as it was."""
        unknown = set(weights) - set(self.tensors)
        if unknown:
            raise ValueError(f"sparsifier {self.sparsifier.name!r} returned weights for names it does not cover: {sorted(unknown)}")
        for name, value in weights.items():
            tensor = self.local(name)
            if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"sparsifier {self.sparsifier.name!r} returned new weights for {name!r} shaped {got}; "
                    f"the tensor is {tuple(tensor.shape)}"
                )
            if not torch.isfinite(value).all():
                raise ValueError(f"sparsifier {self.sparsifier.name!r} returned non-finite weights for {name!r}")
        for name, value in weights.items():
            self.local(name).detach().copy_(value)

    # -- masks -------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_masks(self, masks: Mapping[str, torch.Tensor | PackedMask] | None = None) -> None:
        """Zero every pruned element in place (runs after every optimizer step, so it is lean: each
        packed mask is unpacked a piece at a time into cache and multiplied in, through NumPy on
        CPU, see :meth:`PackedMask.apply_`; while attached for weight upkeep, fp32 masks are held
        unpacked too, see :func:`_unpacked_while_training`). Always a full pass: an optimizer may
        write the weights without telling autograd (fused optimizers do not bump the version
        counter). ``masks``: apply these (bool or packed) instead of the masks in force."""
        self._follow_live_parameters()
        if masks is None:  # every mask, after an optimizer step: the hot path
            for tensors, group in self._apply_plan():
                if isinstance(tensors, list):
                    torch._foreach_mul_(tensors, group)
                elif isinstance(group, PackedMask):
                    group.apply_(tensors)
                else:
                    apply_mask_(tensors, group)
            return
        for name, mask in masks.items():
            if self._prunes(mask):
                _apply(mask, self.local(name))
            if isinstance(mask, PackedMask):
                self._note_masked(name, mask)

    def _apply_plan(self) -> list[tuple[Any, Any]]:
        """How :meth:`apply_masks` applies the current masks, worked out once per set of masks:
        tensors with a mask that prunes something; the small ones grouped by dtype and device
        into one foreach multiply each (with many small tensors, per-tensor calls are the cost)."""
        plan = self._plan
        if plan is not None and plan[0] is self._masks and self._locals_unchanged():
            return plan[1]
        steps: list[tuple[Any, Any]] = []
        groups: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for name, mask in self._masks.items():
            if not mask.prunes():
                continue
            tensor = self.local(name)
            if tensor.numel() <= SMALL_TENSOR:
                # unpacked and kept for the plan: at most SMALL_TENSOR bytes each, and with many
                # small tensors the per-tensor calls, not the bytes, are the cost
                ts, ms = groups.setdefault((tensor.dtype, tensor.device), ([], []))
                ts.append(tensor.detach())
                ms.append(mask.to_bool().to(tensor.device))
            else:
                steps.append((tensor, self._for_steps(name, mask, tensor)))
        steps.extend(groups.values())
        self._plan = (self._masks, steps)
        self._plan_locals = {n: self.local(n) for n in self.shards}
        return steps

    def _locals_unchanged(self) -> bool:
        """Whether every sharded parameter still holds the local tensor the plan was made with
        (FSDP2 may give a parameter a new local tensor at its lazy initialisation)."""
        return all(self.local(n) is t for n, t in self._plan_locals.items())

    def local(self, name: str) -> torch.Tensor:
        """The covered tensor ``name`` as this rank holds it: the local rows of a sharded
        (FSDP2) parameter, a view of its storage, else the tensor itself. Masks are shaped like it."""
        tensor = self.tensors[name]
        return _sharding.local(tensor) if name in self.shards else tensor

    def _for_steps(self, name: str, mask: PackedMask, tensor: torch.Tensor) -> PackedMask | torch.Tensor:
        """The mask to apply to ``tensor`` at each step: its unpacked copy while an optimizer is
        attached and that is faster (made once per mask), else the packed mask."""
        if not (self._unpacked_for_steps and _unpacked_while_training(tensor)):
            return mask
        held = self._unpacked.get(name)
        if held is None or held[0] is not mask:
            held = self._unpacked[name] = (mask, mask.to_bool().to(tensor.device))
        return held[1]

    @staticmethod
    def _prunes(mask: PackedMask | torch.Tensor) -> bool:
        """Whether ``mask`` prunes anything: an all-True mask (a tensor at level 0, early in a
        schedule) costs no pass over its tensor (a packed mask counts its kept elements once)."""
        return mask.prunes() if isinstance(mask, PackedMask) else not bool(mask.all())

    def _note_masked(self, name: str, mask: PackedMask) -> None:
        if not self._hold_masks:
            return  # a one-shot prune keeps no mask, and nothing to trust
        tensor = self.local(name)
        self._masked[name] = (mask, tensor._version, tensor.data_ptr())

    def _is_masked(self, name: str, mask: PackedMask) -> bool:
        """True when this controller masked ``name`` with this very mask and the tensor has not
        been written since as far as torch can tell (same storage, same version counter), and a
        spot check of pruned positions finds only zeros (which catches writes that bypass the
        version counter, such as a fused optimizer step, whose updates move every pruned weight
        with a gradient)."""
        noted = self._masked.get(name)
        tensor = self.local(name)
        return (
            noted is not None
            and noted[0] is mask
            and noted[1] == tensor._version
            and noted[2] == tensor.data_ptr()
            and _still_masked(tensor, mask)
        )

    def attach(
        self, optimizer: torch.optim.Optimizer, *, gradients: bool = True, upkeep: Upkeep = "weights"
    ) -> Any:
        """Keep pruned weights at zero through ``optimizer``'s steps; returns the removable handle.

        ``upkeep`` says how: ``"weights"`` (default) re-applies the masks after every
        ``optimizer.step()`` (a step post-hook: one pass over the masked weights, whatever the
        optimizer does); ``"gradients"`` multiplies each covered parameter's gradient by its mask
        as it is accumulated (a post-accumulate-grad hook) and zeroes the optimizer's state of
        pruned entries at each mask update (and after ``optimizer.load_state_dict``), so an
        element-wise optimizer leaves pruned weights exactly zero without touching the weights
        each step (verified for SGD, Adam and AdamW: :data:`GRADIENT_UPKEEP`); ``"auto"`` picks
        ``"gradients"`` only for a verified class where it measured cheaper (:data:`AUTO_GRADIENTS`:
        SGD; both are one pass, within about 10% of each other) and never when the sparsifier
        needs gradients (it would see them masked), ``"weights"`` otherwise. With
        ``"gradients"``, weights written outside the optimizer (a manual ``.data`` write) are not
        re-zeroed until the next mask update; see docs/upkeep.md for the measurements.

        For a sparsifier that needs gradients (``capabilities.gradients``) and ``gradients=True``,
        a step pre-hook also hands it each covered parameter of this optimizer and its
        (accumulated) gradient before the update (see :meth:`observe_gradients`). Closure-based
        optimizers (LBFGS) compute gradients inside ``step``: call :meth:`observe_gradients` in the
        closure instead. Lightning's callbacks deliver gradients from ``on_before_optimizer_step``
        and pass ``gradients=False``."""
        mode = self._upkeep_for(optimizer, upkeep)
        if gradients and self.sparsifier.capabilities.gradients:

            def deliver(opt: torch.optim.Optimizer, *_: Any) -> None:  # a pre-hook must return None
                self.observe_gradients(opt)

            self._hooks.append(optimizer.register_step_pre_hook(deliver))
        self._unpacked_for_steps, self._plan = True, None
        if mode == "weights":
            handle = optimizer.register_step_post_hook(lambda *_: self.apply_masks())
        else:
            # the state is zeroed at each mask update; a state loaded later (a resume) is zeroed too
            handle = optimizer.register_load_state_dict_post_hook(lambda opt: self._mask_state_of(opt))
            self._hook_gradients(optimizer)
        self._hooks.append(handle)
        if not any(o is optimizer for o in self._optimizers):
            self._optimizers.append(optimizer)
        self._mask_optimizer_state(self._masks)
        return handle

    def _upkeep_for(self, optimizer: torch.optim.Optimizer, upkeep: str) -> str:
        caps = self.sparsifier.capabilities
        if upkeep == "auto":
            cheaper = type(optimizer) in AUTO_GRADIENTS and type(optimizer) in GRADIENT_UPKEEP and not self.shards
            return "gradients" if cheaper and not caps.gradients else "weights"
        if upkeep == "gradients" and self.shards:
            raise ValueError(
                f"attach(upkeep='gradients') is not supported for sharded parameters (FSDP2 writes the reduced "
                f"gradient of {next(iter(self.shards))!r} itself, past the hooks that would mask it); use "
                f"upkeep='weights', which masks each rank's rows after every optimizer step"
            )
        if upkeep == "gradients" and caps.gradients and caps.regrowth:
            raise ValueError(
                f"attach(upkeep='gradients') masks the gradients of pruned weights, but sparsifier "
                f"{self.sparsifier.name!r} regrows weights from gradients; use upkeep='weights'"
            )
        if upkeep not in ("weights", "gradients"):
            raise ValueError(f"attach: upkeep must be 'auto', 'weights' or 'gradients', got {upkeep!r}")
        return upkeep

    def _hook_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """One post-accumulate-grad hook per covered parameter of ``optimizer`` (once per parameter,
        however many optimizers hold it): the gradient is multiplied by the mask in force when the
        hook runs, so a mask update needs no new hooks."""
        self._follow_live_parameters()
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, tensor in self.tensors.items():
            if id(tensor) not in held or id(tensor) in self._grad_hooked or not tensor.requires_grad:
                continue
            self._grad_hooked.add(id(tensor))
            self._hooks.append(tensor.register_post_accumulate_grad_hook(functools.partial(self._mask_gradient, name)))

    def _mask_gradient(self, name: str, param: torch.Tensor) -> None:
        mask = self._masks.get(name)
        grad = param.grad
        if mask is not None and grad is not None and mask.prunes():
            with torch.no_grad():
                if name in self.shards:
                    local = _sharding.local(grad)
                    _apply(self._for_steps(name, mask, local), local)
                elif grad.layout is torch.strided:
                    _apply(self._for_steps(name, mask, grad), grad)
                else:  # a sparse gradient (nn.Embedding(sparse=True)) stays sparse
                    param.grad = grad * mask.to_bool().to(grad.device)

    def _mask_state_of(self, optimizer: torch.optim.Optimizer) -> None:
        self._mask_optimizer_state(self._masks, [optimizer])

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
                if name in self.shards:  # the sparsifier sees what compute_masks sees: this rank's rows
                    param, grad = _sharding.local(param), _sharding.local(grad)
                self.sparsifier.observe_gradient(name, param, grad)
                handed += 1
        return handed

    def detach(self) -> None:
        """Remove every hook this controller registered (optimizer hooks)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._unpacked_for_steps, self._plan, self._unpacked = False, None, {}  # the unpacked copies go with the hooks
        self._grad_hooked.clear()
        self._optimizers = []

    def squash(self) -> None:
        """Make the masks permanent (pruned weights stay zero) and drop them; the optimizers'
        state (momentum, Adam moments) of pruned entries is zeroed too, so a step with a zero
        gradient does not revive them. Every covered tensor is masked once more: anything may
        have written it since (a write through ``.data`` tells nobody)."""
        self._squash(trust_masked=False)

    def _squash(self, trust_masked: bool) -> None:
        """:meth:`squash`; with ``trust_masked`` (the one-shot path, where nothing runs between
        the mask update and this call) a tensor this controller masked and that torch reports
        unwritten since (same storage, same version; see :meth:`_is_masked`) is not passed over
        again, so a one-shot prune reads the weights once."""
        self._follow_live_parameters()
        with torch.no_grad():
            for name, mask in self._masks.items():
                if not (trust_masked and self._is_masked(name, mask)):
                    mask.apply_(self.local(name))
        self._mask_optimizer_state(self._masks)
        self._masks = {}
        self._masked = {}
        self.detach()

    def mask_optimizer_state(self) -> None:
        """Zero the attached optimizers' state (momentum, Adam's moments) of every pruned entry."""
        self._mask_optimizer_state(self._masks)

    @torch.no_grad()
    def _mask_optimizer_state(
        self, masks: Mapping[str, PackedMask | torch.Tensor], optimizers: list[torch.optim.Optimizer] | None = None
    ) -> None:
        """Zero the optimizer state of pruned entries (momentum buffers, Adam's moments: every
        state tensor shaped like its parameter) for the optimizers this controller is attached to."""
        optimizers = self._optimizers if optimizers is None else optimizers
        if not optimizers or not masks:
            return
        if isinstance(masks, MaskView):  # controller.masks passed back: its packed masks, not unpacked
            masks = masks.packed()
        by_param = {id(self.tensors[n]): m for n, m in masks.items()}
        for optimizer in optimizers:
            for param, state in optimizer.state.items():
                mask = by_param.get(id(param))
                if mask is None:
                    continue
                for value in state.values():
                    value = _sharding.local(value)  # FSDP2: the state of a sharded parameter is sharded like it
                    if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                        _apply(mask, value)

    def _follow_live_parameters(self) -> None:
        """Masks follow the live parameter when a module's parameter was replaced by a new object
        (``load_state_dict(assign=True)``, attribute assignment); a replacement of another shape
        is an error naming it."""
        for name, (module, attr) in self.owners.items():
            live = getattr(module, attr, None)
            old = self.tensors[name]
            if live is old or not isinstance(live, torch.Tensor):
                continue
            if name in self.shards and not _sharding.is_dtensor(live):
                continue  # FSDP2's gathered parameter, registered during forward and backward only
            if live.shape != old.shape:
                raise ValueError(
                    f"covered parameter {name!r} was replaced by a tensor of shape {tuple(live.shape)} "
                    f"(was {tuple(old.shape)}): its mask no longer fits; build a new controller for the new model"
                )
            if name in self.shards:
                self.shards[name] = _sharding.describe(name, live)
            self.tensors[name] = live
            self._masked.pop(name, None)
            self._plan = None

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
        if loss_fn is not None and not caps.gradients:
            raise ValueError(f"loss_fn was given, but sparsifier {self.sparsifier.name!r} does not use gradients")
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
        self.sparsifier.reset_calibration()
        model = self.calibration_model if self.calibration_model is not None else self.target
        was_training = model.training
        model.eval()
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
            model.train(was_training)

    # -- lottery-ticket rewinding ------------------------------------------------------------
    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of every covered tensor (to rewind to later, see :meth:`rewind`); of a sharded
        one, this rank's rows."""
        return {n: self.local(n).detach().clone() for n in self.tensors}

    @torch.no_grad()
    def rewind(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Reset the kept weights to ``weights`` (a :meth:`snapshot`), pruned ones stay zero:
        lottery-ticket rewinding (Frankle & Carbin 2019)."""
        for name, value in weights.items():
            if name not in self.tensors:
                raise KeyError(f"rewind: {name!r} is not a covered tensor")
            tensor = self.local(name)
            if value.shape != tensor.shape:
                raise ValueError(f"rewind: saved weights of {name!r} are shaped {tuple(value.shape)}, the tensor {tuple(tensor.shape)}")
            tensor.detach().copy_(value)
        self.apply_masks()

    # -- reporting and state -----------------------------------------------------------------
    def report(self) -> SparsityReport:
        """Per-tensor and overall sparsity, counted from the live tensors (a tied tensor once, with
        its aliases). With sharded tensors every rank's zeros are summed (one all-reduce: call it
        on every rank), so every rank reports the global figures."""
        self._follow_live_parameters()
        local = SparsityReport.measure({n: self.local(n) for n in self.tensors}, self.aliases)
        if self.comm is None:
            return local
        names = list(self.shards)
        zeros = torch.tensor([local.row(n).zeros for n in names], dtype=torch.int64, device=self._comm_device())
        zeros = self.comm.all_reduce(zeros, "sum").tolist()
        summed = dict(zip(names, zeros))
        rows = []
        for row in local.rows:
            if row.name in summed:
                shape = tuple(self.tensors[row.name].shape)
                row = Row(row.name, shape, self.tensors[row.name].numel(), int(summed[row.name]), row.aliases)
            rows.append(row)
        return SparsityReport(rows)

    def _comm_device(self) -> torch.device:
        """Where collectives' buffers live: the sharded parameters' device (NCCL needs CUDA tensors)."""
        return self.local(next(iter(self.shards))).device

    def fingerprint(self) -> dict[str, Any]:
        """What the masks were made with, besides the level: the sparsifier, its selection fields
        (pattern, scope, overrides, include/exclude, its own fields) and the covered names. Saved in
        the state so that a resume under another configuration is refused, not silently kept."""
        spec = self.sparsifier.spec.model_dump(mode="json", exclude={"sparsity_level"})
        return {"sparsifier": self.sparsifier.name, "spec": spec, "covered": sorted(self.tensors)}

    def state_dict(self) -> dict[str, Any]:
        """Masks (packed: a flat uint8 tensor per mask, bit ``i % 8`` of byte ``i // 8`` keeping
        element ``i`` in C order, and its shape), schedule position, each mask's pruned count and
        the configuration's fingerprint; loads with ``torch.load(weights_only=True)``.

        Masks are whole: those of sharded tensors are gathered from every rank (one all-gather of
        their packed bits; call it on every rank), so the state of any one rank restores every rank,
        under any row split (Lightning saves callback state from rank 0 only)."""
        masks = dict(self._masks)
        sharded = [n for n in masks if n in self.shards]
        if sharded and self.comm is not None:
            local = [(masks[n].to_bool(), self.shards[n]) for n in sharded]
            whole = _sharding.gather_rows(self.comm, local, self._comm_device())
            masks.update((n, PackedMask.pack(w)) for n, w in zip(sharded, whole))
        return {
            "version": STATE_VERSION,
            "sparsifier": self.sparsifier.name,
            "t": self.t,
            "levels": dict(self.levels),
            # the packed masks themselves, not copies: a checkpoint is written at once, and masks
            # are replaced, never changed in place
            "masks": {n: m.data for n, m in masks.items()},
            "shapes": {n: list(m.shape) for n, m in masks.items()},
            "pruned": {n: m.pruned() for n, m in masks.items()},
            "fingerprint": self.fingerprint(),
            # what a stateful sparsifier accumulated (movement scores, say), when it offers it
            **({"sparsifier_state": self.sparsifier.state_dict()} if callable(getattr(self.sparsifier, "state_dict", None)) else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks and schedule position. The whole state is checked before anything is
        applied; a problem raises ValueError naming the state, the tensor and what is wrong."""
        checked = self._checked_state(state)
        restore = getattr(self.sparsifier, "load_state_dict", None)
        if state.get("sparsifier_state") is not None and callable(restore):
            restore(state["sparsifier_state"])
        self.t = checked["t"]
        self.levels = checked["levels"]
        self._masks = checked["masks"]
        self._masked = {}
        self.apply_masks()
        self._mask_optimizer_state(self._masks)

    def _checked_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        where = "sparsity state"
        if not isinstance(state, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {type(state).__name__}")
        version = state.get("version")
        if version not in (1, 2, STATE_VERSION):
            raise ValueError(f"{where}: unsupported version {version!r} (this version reads 1 to {STATE_VERSION})")
        missing = [k for k in ("t", "levels", "masks") if k not in state]
        if missing:
            raise ValueError(f"{where}: missing {missing}; the state is incomplete (a checkpoint written by another program?)")
        t = state["t"]
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))):
            raise ValueError(f"{where}: 't' must be a number or None, got {t!r}")
        saved = state.get("fingerprint")
        if saved is not None:
            self._check_fingerprint(where, saved)
        levels_in, masks_in = state["levels"], state["masks"]
        if not isinstance(levels_in, Mapping) or not isinstance(masks_in, Mapping):
            raise ValueError(f"{where}: 'levels' and 'masks' must be mappings of names")
        unknown = sorted((set(masks_in) | set(levels_in)) - set(self.tensors))
        if unknown:
            raise ValueError(f"{where}: masks or levels for names this controller does not cover: {unknown}")
        levels: dict[str, float] = {}
        for name in self.tensors:
            level = levels_in.get(name, 0.0)
            if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 <= float(level) <= 1.0:
                raise ValueError(f"{where}: level of {name!r} must be a number in [0, 1], got {level!r}")
            levels[name] = float(level)
        pruned = state.get("pruned", {})
        packed_format = version == STATE_VERSION
        shapes = state.get("shapes")
        if packed_format and not isinstance(shapes, Mapping) and any(
            isinstance(m, torch.Tensor) and m.dtype != torch.bool for m in masks_in.values()
        ):
            raise ValueError(f"{where}: 'shapes' (the shape of each packed mask) must be a mapping of names, got {type(shapes).__name__}")
        kind = "packed uint8 tensor" if packed_format else "bool tensor"
        masks: dict[str, PackedMask] = {}
        for name, tensor in self.tensors.items():
            mask = masks_in.get(name)
            if mask is None:
                if name in masks_in:
                    raise ValueError(f"{where}: mask of {name!r} is None, not a {kind}")
                if levels[name] > 0.0 and masks_in:
                    raise ValueError(
                        f"{where}: no mask for covered tensor {name!r}, whose saved level is {levels[name]:g}; "
                        f"the state is incomplete"
                    )
                continue
            if not isinstance(mask, torch.Tensor):
                raise ValueError(f"{where}: mask of {name!r} is a {type(mask).__name__}, not a {kind}")
            if mask.dtype == torch.bool:  # versions 1 and 2, or a state written by hand
                if mask.shape != tensor.shape:
                    raise ValueError(f"{where}: mask of {name!r} has shape {tuple(mask.shape)}, the tensor {tuple(tensor.shape)}")
                packed = PackedMask.pack(mask)
            elif packed_format:
                packed = self._checked_packed(where, name, mask, shapes.get(name), tensor)  # type: ignore[union-attr]
            else:
                raise ValueError(f"{where}: mask of {name!r} has dtype {mask.dtype}, not torch.bool")
            if name in pruned and int(pruned[name]) != packed.pruned():
                raise ValueError(
                    f"{where}: mask of {name!r} prunes {packed.pruned()} elements, but {int(pruned[name])} were pruned "
                    f"when it was saved (level {levels[name]:g}): the mask is damaged"
                )
            if name in self.shards:  # a whole mask: this rank's rows of it
                packed = _sharding.rows_of_packed(packed, self.shards[name])
            masks[name] = packed.to(self.local(name).device)
        return {"t": None if t is None else float(t), "levels": levels, "masks": masks}

    @staticmethod
    def _checked_packed(where: str, name: str, data: torch.Tensor, shape: Any, tensor: torch.Tensor) -> PackedMask:
        """A saved packed mask, checked against its saved shape and the tensor it is for."""
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ValueError(f"{where}: the shape of the mask of {name!r} must be a list of ints, got {shape!r}")
        if tuple(shape) != tuple(tensor.shape):
            raise ValueError(f"{where}: mask of {name!r} has shape {tuple(shape)}, the tensor {tuple(tensor.shape)}")
        if data.dtype != torch.uint8:
            raise ValueError(f"{where}: mask of {name!r} has dtype {data.dtype}, not torch.uint8 (packed, 8 elements a byte) or torch.bool")
        size = packed_size(tensor.numel())
        if data.dim() != 1 or data.numel() != size:
            raise ValueError(
                f"{where}: mask of {name!r} holds {tuple(data.shape)} bytes; a packed mask of shape {tuple(shape)} "
                f"is 1-D with {size}"
            )
        packed = PackedMask(data.cpu(), tensor.shape)
        if not packed.pad_bits_clear():
            raise ValueError(f"{where}: mask of {name!r} has bits set past its {tensor.numel()} elements: the mask is damaged")
        return packed

    def _check_fingerprint(self, where: str, saved: Any) -> None:
        now = self.fingerprint()
        if not isinstance(saved, Mapping):
            raise ValueError(f"{where}: 'fingerprint' must be a mapping, got {type(saved).__name__}")
        changed = []
        if saved.get("sparsifier") != now["sparsifier"]:
            changed.append(f"sparsifier {saved.get('sparsifier')!r} -> {now['sparsifier']!r}")
        old_spec, new_spec = saved.get("spec") or {}, now["spec"]
        for key in sorted(set(old_spec) | set(new_spec)):
            if old_spec.get(key) != new_spec.get(key):
                changed.append(f"{key}: {old_spec.get(key)!r} -> {new_spec.get(key)!r}")
        if saved.get("covered") is not None and list(saved["covered"]) != now["covered"]:
            gone = sorted(set(saved["covered"]) - set(now["covered"]))
            new = sorted(set(now["covered"]) - set(saved["covered"]))
            changed.append(f"covered tensors (no longer: {gone[:5]}, new: {new[:5]})")
        if changed:
            raise ValueError(
                f"{where} was saved under another configuration; changed: " + "; ".join(changed) + ". Its masks do "
                "not follow the new one: restore the saved configuration to resume, or start a new fit from the "
                "weights (a level or schedule change alone is fine)"
            )
