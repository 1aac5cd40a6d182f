"""Per-tensor bounds of a global selection: no tensor emptied, none left dense, the total exact.

One global threshold can prune a whole tensor (a classifier head whose weights are all small) or
none of it. ``ScoreSpec.max_level_per_tensor`` (default 0.98, like Intel Neural Compressor's
``max_sparsity_ratio_per_op``) and ``min_level_per_tensor`` (default 0) bound each tensor's
level, and the overall level is still met exactly: the selection is redistributed over the
other tensors. A global level above the default cap raises it to that level (global 1.0 still
prunes everything); a cap set explicitly below the level is refused when the spec is validated.

How: select globally; if some tensors fall outside their bounds, fix the side with the larger
total violation at its bounds (each such tensor is selected on its own, at exactly its bound),
take what they pruned from the target, and select the rest again with what remains. Fixing the
larger side first is the usual rule for a box-constrained threshold (as in the projection onto a
capped simplex): a tensor fixed at its bound never needs to move again. At most one round per
tensor; in practice one or two.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._engine.units import _Units


def _numel(units: _Units) -> int:
    return int(units.scorer.tensor.numel())  # type: ignore[attr-defined]


def _pruned(units: _Units) -> int:
    """Elements ``units.mask`` prunes."""
    if units.size:
        return (units.n - units.kept()) * units.size
    return int(units.sizes(0, units.n)[~units.mask].sum())


def bounds(spec: Any, numels: Sequence[int], floors: Sequence[int], target: float) -> tuple[list[int], list[int]]:
    """Each tensor's least and most pruned elements. The least is ``min_level_per_tensor``, but
    never above the group's level now (early in a schedule the group is below it); the most is
    ``max_level_per_tensor``, but never below what is pruned already (nested masks), and, left at
    its default, never below the level asked for."""
    total = sum(numels)
    level_now = target / total if total else 0.0
    lo_level = min(float(getattr(spec, "min_level_per_tensor", 0.0)), level_now)
    hi_level = float(getattr(spec, "max_level_per_tensor", 1.0))
    if "max_level_per_tensor" not in getattr(spec, "model_fields_set", ()):
        # the default cap gives way to a higher level asked for (global 1.0 prunes everything)
        hi_level = max(hi_level, level_now, float(spec.sparsity_level))
    hi = [max(math.floor(hi_level * n + 1e-9), f) for n, f in zip(numels, floors)]
    lo = [min(max(math.ceil(lo_level * n - 1e-9), f), h) for n, f, h in zip(numels, floors, hi)]
    return lo, hi


def unbounded(lo: Sequence[int], hi: Sequence[int], numels: Sequence[int]) -> bool:
    """Whether bounds from :func:`bounds` bind nothing (one plain selection will do)."""
    return all(l_ == 0 for l_ in lo) and all(h >= n for h, n in zip(hi, numels))


def rounds(
    lo: Sequence[int],
    hi: Sequence[int],
    target: float,
    choose: Callable[[list[int], float], Mapping[int, float]],
    pin: Callable[[dict[int, int], bool], float],
) -> bool:
    """The rounds of the module docstring, for any selection: ``choose(active, target)`` selects
    ``target`` elements over the tensors ``active`` together and returns each one's pruned count;
    ``pin(fixed, over)`` fixes the tensors ``fixed`` (index -> bound; ``over``: at their caps) and
    returns what they prune in all. True when the last choice was within bounds; False when every
    tensor ended up pinned (the caller may still owe the last pins' selection)."""
    target = min(max(target, float(sum(lo))), float(sum(hi)))
    active = list(range(len(lo)))
    while active:
        counts = choose(active, target)
        over = {i: counts[i] - hi[i] for i in active if counts[i] > hi[i]}
        under = {i: lo[i] - counts[i] for i in active if counts[i] < lo[i]}
        if not over and not under:
            return True
        fix, bound = (over, hi) if sum(over.values()) >= sum(under.values()) else (under, lo)
        target -= pin({i: bound[i] for i in fix}, fix is over)
        active = [i for i in active if i not in fix]
        # after the fixed tensors took their share, the rest still need what remains (never below 0)
        target = max(target, 0.0)
    return False


def select_bounded(units: Sequence[_Units], target: float, spec: Any, floors: Sequence[int]) -> None:
    """:func:`~sparsity_core._engine.select` over ``units`` (one per tensor, a global group) with
    each tensor's pruned elements kept within :func:`bounds`; writes each ``units[i].mask``."""
    from ._engine import select

    numels = [_numel(u) for u in units]
    lo, hi = bounds(spec, numels, floors, target)
    if unbounded(lo, hi, numels):
        select(units, target)
        return

    def choose(active: list[int], target: float) -> dict[int, float]:
        select([units[i] for i in active], target)
        return {i: _pruned(units[i]) for i in active}

    def pin(fixed: dict[int, int], over: bool) -> float:
        pruned = 0
        for i, want in fixed.items():
            u = units[i]
            if u.size > 1:  # whole units only: stay inside the bound
                want = (want // u.size if over else -(-want // u.size)) * u.size
            select([u], want)
            pruned += _pruned(u)
        return pruned

    rounds(lo, hi, target, choose, pin)


def check_levels(spec: Any) -> None:
    """Refuse bounds that cannot hold (called by ScoreSpec's validator). The default cap (0.98)
    is not a rule the user stated: a global level above it raises it (see :func:`bounds`)."""
    lo, hi = spec.min_level_per_tensor, spec.max_level_per_tensor
    if lo > hi:
        raise ValueError(f"min_level_per_tensor={lo:g} is above max_level_per_tensor={hi:g}")
    if "max_level_per_tensor" not in spec.model_fields_set:
        hi = max(hi, spec.sparsity_level)
    if spec.scope == "global" and not lo <= spec.sparsity_level <= hi:
        side = "above max_level_per_tensor" if spec.sparsity_level > hi else "below min_level_per_tensor"
        raise ValueError(
            f"scope='global' with sparsity_level={spec.sparsity_level:g} {side} "
            f"(min_level_per_tensor={lo:g}, max_level_per_tensor={hi:g}): the overall level cannot be met "
            f"with every tensor inside its bounds; set sparsity_level in [{lo:g}, {hi:g}] or widen the bounds"
        )

