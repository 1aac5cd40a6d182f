"""The entry point: masks for a ``ScoreSparsifier`` over every pattern and scope, and the checks
of masks any sparsifier returns."""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .._bounds import select_bounded
from . import kernels, magnitude
from .kernels import _all_finite, _count, apply_mask_, Tensor
from .._bits import MaskView, PackedMask
from .units import _Blocks, _Elements, _PackedElements, _Units, Scorer
from .selection import select
from .patterns import nm_mask

if TYPE_CHECKING:
    from .._base import ScoreSparsifier, Sparsifier
    from .._contract import MaskContext


def score_masks(
    sparsifier: ScoreSparsifier,
    tensors: Mapping[str, Tensor],
    levels: Mapping[str, float],
    applied: MutableMapping[str, Tensor | PackedMask] | None = None,
    *,
    context: MaskContext | None = None,
) -> MutableMapping[str, Tensor | PackedMask]:
    """Bool keep masks for a ``ScoreSparsifier``: names are grouped by their resolved spec
    (overrides may change level, pattern and scope per name); ``global`` groups share one
    threshold, everything else is selected tensor by tensor.

    With ``applied`` (a mutable mapping), each tensor is also masked in place as soon as its mask
    is final (N:M: piece by piece, while the piece is in cache) and its mask is handed over there
    at once, so that a caller interrupted by an error knows which tensors already carry their new
    mask. The masks are then not kept here, and unstructured ones are made packed (a
    :class:`~sparsity_core._bits.PackedMask`, 1 bit per element, even during a global selection):
    the caller keeps or drops each one, so no bool mask of every tensor ever exists at once, and
    ``applied`` itself is returned.

    ``context`` orients each tensor (N:M and blocks along its reduction axis) and, unless the
    sparsifier declares regrowth, keeps its currently pruned elements pruned (nested masks): they
    score ``-inf``, and a level below what is already pruned is raised to it.
    """
    if context is not None and context.shards is not None and any(n in context.shards.tensors for n in tensors):
        from .distributed import shard_masks  # row shards (FSDP2): exact masks from local rows

        return shard_masks(sparsifier, tensors, levels, applied, context)
    masks: dict[str, Tensor] = {}
    groups: dict[int, list[str]] = {}
    apply = applied is not None
    layouts = context.layouts if context is not None else {}
    nested = context is not None and not sparsifier.capabilities.regrowth
    current = context.current if nested else {}  # type: ignore[union-attr]
    # the controller's masks in force, packed: read a piece at a time instead of unpacked whole
    packed_current = current.packed() if isinstance(current, MaskView) else {}
    # the bits path selects over this process's tensors; sharded ones are selected across ranks
    bits = apply and (context is None or context.shards is None)

    def done(name: str, mask: Tensor | PackedMask, fused: bool = False) -> None:
        if applied is None:
            masks[name] = mask.to_bool() if isinstance(mask, PackedMask) else mask
            return
        if isinstance(mask, PackedMask):
            if not fused:
                mask.apply_(tensors[name])
        elif not fused:
            apply_mask_(tensors[name], mask)
        applied[name] = mask  # handed over, not kept

    def scorer(name: str) -> Scorer:
        keep = packed_current.get(name) if name in packed_current else current.get(name)
        return Scorer(sparsifier, name, tensors[name], layouts.get(name), keep.to(tensors[name].device) if keep is not None else None)

    def pruned_now(name: str, units: _Units | None = None) -> float:
        if name in packed_current and not isinstance(units, _Blocks):
            return packed_current[name].pruned()
        return _pruned_now(current.get(name), units)

    small: list[tuple[str, float]] = []  # unstructured, layer scope, few elements: selected together
    with torch.no_grad():
        for name, tensor in tensors.items():
            spec = sparsifier.spec_for(name)
            pattern = spec.parsed_pattern  # type: ignore[attr-defined]
            level = _check_level(name, levels[name])
            if pattern.kind == "n:m":
                done(name, nm_mask(scorer(name), pattern.a, pattern.b, level, apply), fused=True)
            elif spec.scope == "global":  # type: ignore[attr-defined]
                groups.setdefault(id(spec), []).append(name)
            elif pattern.kind == "unstructured" and tensor.numel() <= kernels.SMALL:
                small.append((name, max(level * tensor.numel(), pruned_now(name))))
            else:
                if bits and pattern.kind == "unstructured" and magnitude.eligible(sparsifier, tensor):
                    fast = magnitude.select_group(
                        sparsifier, [name], [tensor], [current.get(name)], max(level * tensor.numel(), pruned_now(name)), apply, packed=True
                    )
                    if fast is not None:
                        done(name, next(fast), fused=True)
                        continue
                units = _units(scorer(name), pattern, apply)
                select([units], max(level * tensor.numel(), pruned_now(name, units)))
                done(name, units.element_mask())
        if small:
            small_names = [n for n, _ in small]
            small_masks = _select_small(
                sparsifier, [tensors[n] for n in small_names], small_names, [current.get(n) for n in small_names], [t for _, t in small]
            )
            if applied is None:
                masks.update(zip(small_names, small_masks))
            else:
                _mask_many([tensors[n] for n in small_names], small_masks)
                applied.update(zip(small_names, small_masks))
        for names in groups.values():
            target = sum(levels[n] * tensors[n].numel() for n in names)
            spec = sparsifier.spec_for(names[0])
            if bits and spec.parsed_pattern.kind == "unstructured" and all(magnitude.eligible(sparsifier, tensors[n]) for n in names):  # type: ignore[attr-defined]
                floors = [int(pruned_now(n)) for n in names]
                fast = magnitude.select_group(
                    sparsifier, names, [tensors[n] for n in names], [current.get(n) for n in names], max(target, sum(floors)), apply, spec, floors,
                    packed=True,
                )
                if fast is not None:
                    for n, mask in zip(names, fast):
                        done(n, mask, fused=True)  # packed piece by piece: no bool mask of a whole tensor
                    continue
            group = [_units(scorer(n), sparsifier.spec_for(n).parsed_pattern, apply) for n in names]  # type: ignore[attr-defined]
            floors = [int(pruned_now(n, u)) for n, u in zip(names, group)]  # per-tensor bounds (no layer emptied): _bounds.py
            select_bounded(group, max(target, sum(floors)), sparsifier.spec_for(names[0]), floors)
            for i, n in enumerate(names):
                done(n, group[i].element_mask())
                group[i] = None  # type: ignore[call-overload]  # its mask is handed over: let it go
    return {n: masks[n] for n in tensors} if applied is None else applied


def _pruned_now(keep: Tensor | None, units: _Units | None = None) -> float:
    """Elements the current mask ``keep`` prunes; for blocks and channels, the elements of every
    unit holding a pruned element (the whole unit is pruned again, so it counts whole)."""
    if keep is None:
        return 0
    if not isinstance(units, _Blocks):
        return keep.numel() - _count(keep.contiguous())
    hit = units.scorer.layout.matrix(~keep.to(units.mask.device)).float()
    hit = F.max_pool2d(hit[None, None], (units.h, units.w), stride=(units.h, units.w), ceil_mode=True)[0, 0].reshape(-1) > 0
    return float(int(hit.sum()) * units.size) if units.size else float(units.sizes(0, units.n)[hit].sum())


def _select_small(
    sparsifier: ScoreSparsifier, tensors: Sequence[Tensor], names: Sequence[str], keeps: Sequence[Tensor | None], targets: Sequence[float]
) -> list[Tensor]:
    """Layer-scope unstructured selection for many small tensors at once: their scores are
    checked and sorted together (segment, then score, then position), so that the per-tensor
    cost is one ``score`` call, not a selection. The same masks as one :func:`select` per tensor:
    ``round(target)`` lowest pruned in each, earlier positions first among ties."""
    scores = []
    for name, tensor in zip(names, tensors):
        s = sparsifier.score(name, tensor.detach())
        if not isinstance(s, torch.Tensor) or s.shape != tensor.shape:
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(
                f"sparsifier {sparsifier.name!r}: score({name!r}, tensor) must return a tensor shaped like "
                f"its input {tuple(tensor.shape)}, got {got}"
            )
        scores.append(s.reshape(-1) if s.dim() != 1 else s)
    device = scores[0].device
    flat = torch.cat([s.to(device) for s in scores]).to(torch.float32)
    sizes = torch.tensor([s.numel() for s in scores], dtype=torch.int64)
    seg = torch.repeat_interleave(torch.arange(len(scores)), sizes).to(device)
    if not _all_finite(flat):
        bad = next(n for n, sc in zip(names, scores) if not bool(torch.isfinite(sc.float()).all()))
        raise ValueError(
            f"tensor {bad!r} has NaN or inf values (or importance scores): cannot choose a mask for it; "
            f"check the weights (sparsifier {sparsifier.name!r})"
        )
    if any(k is not None for k in keeps):
        forced = torch.cat([(torch.ones(n, dtype=torch.bool) if k is None else k.reshape(-1)).to(device) for k, n in zip(keeps, sizes.tolist())])
        flat.masked_fill_(~forced, -math.inf)
    order = torch.argsort(flat, stable=True)
    order = order[torch.argsort(seg[order], stable=True)]
    starts = torch.cumsum(sizes, 0) - sizes
    k = torch.tensor([min(max(round(t), 0), int(n)) for t, n in zip(targets, sizes.tolist())], dtype=torch.int64)
    rank = torch.arange(flat.numel(), device=device) - starts.to(device)[seg]
    keep = torch.empty(flat.numel(), dtype=torch.bool, device=device)
    keep[order] = rank >= k.to(device)[seg]
    return [m.view(t.shape) for m, t in zip(keep.split(sizes.tolist()), tensors)]


def _mask_many(tensors: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """Zero the pruned elements of many (small) tensors with one foreach multiply per dtype."""
    by_dtype: dict[tuple[torch.dtype, torch.device], tuple[list[Tensor], list[Tensor]]] = {}
    for t, m in zip(tensors, masks):
        ts, ms = by_dtype.setdefault((t.dtype, t.device), ([], []))
        ts.append(t.detach())
        ms.append(m)
    for ts, ms in by_dtype.values():
        torch._foreach_mul_(ts, ms)


def _units(scorer: Scorer, pattern: object, packed: bool = False) -> _Units:
    """The units of ``pattern`` over the scorer's tensor; elements held packed when ``packed``."""
    kind, a, b = pattern  # type: ignore[misc]
    elements = _PackedElements if packed else _Elements
    if scorer.tensor.numel() == 0:  # nothing to keep or prune, and no matrix view to cut in blocks
        return elements(scorer)
    if kind == "channel":
        return _Blocks(scorer, 1, max(1, scorer.shape2d[1]))
    if kind == "block" and (a, b) != (1, 1):
        rows, cols = scorer.shape2d
        if rows <= a and cols <= b and (rows, cols) != (a, b):  # one ragged block, all or nothing
            raise ValueError(
                f"pattern '{a}x{b}' is larger than tensor {scorer.name!r}: its [outputs, reduction] "
                f"matrix view is [{rows}, {cols}] (shape {tuple(scorer.tensor.shape)}), all inside one "
                f"block, so it could only be kept or pruned whole; use a smaller block for it "
                f"(overrides) or leave it out (exclude)"
            )
        return _Blocks(scorer, a, b)
    return elements(scorer)


def _check_level(name: str, level: float) -> float:
    level = float(level)
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"level for {name!r} must be in [0, 1], got {level}")
    return level


def check_masks(sparsifier: Sparsifier, tensors: Mapping[str, Tensor], masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Masks as bool, one per tensor and shaped like it (what a plugin's compute_masks returned)."""
    missing = set(tensors) - set(masks)
    if missing:
        raise ValueError(f"sparsifier {sparsifier.name!r} returned no mask for {sorted(missing)}")
    out = {}
    for name, tensor in tensors.items():
        mask = masks[name]
        if not isinstance(mask, torch.Tensor) or mask.shape != tensor.shape:
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"sparsifier {sparsifier.name!r} returned a mask for {name!r} shaped {got}; "
                f"the tensor is {tuple(tensor.shape)}"
            )
        out[name] = mask.to(device=tensor.device, dtype=torch.bool)
    return out
