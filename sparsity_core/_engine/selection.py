"""Exact selection of the lowest-scoring units over one tensor or a global group: exact for
small selections, a sampled bracket and one pass for large ones, ties broken by position."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch

from . import kernels
from .kernels import _count, _ge_into, _in_bracket, _keep_above_kth, _np, _numpy_kernels, Tensor
from .units import _Units


def select(units: Sequence[_Units], target: float) -> None:
    """Prune the lowest-scoring units over ``units`` (in order) so that about ``target`` elements
    are pruned (exactly ``round(target / size)`` units when all units have one size); writes each
    ``units[i].mask``."""
    total = sum(u.n for u in units)
    sizes = {u.size for u in units}
    size = sizes.pop() if len(sizes) == 1 else 0
    if size:
        k = min(max(round(target / size), 0), total)
        if k == 0 or k == total:
            for u in units:
                u.fill(k == 0)
            return
    if total <= kernels.EXACT or not _select_bracketed(units, target, size):
        _select_exact(units, target, size)
    for u in units:
        u.release()


def _select_exact(units: Sequence[_Units], target: float, size: int) -> None:
    scores = torch.cat([s.to(units[0].device) for u in units for _, s in u.pieces()])
    if size:
        keep = _keep_above_kth(scores, min(max(round(target / size), 0), scores.numel()))
    else:
        weights = torch.cat([u.sizes(0, u.n) if not u.size else torch.full((u.n,), u.size, device=u.device) for u in units])
        order = torch.argsort(scores, stable=True)
        cum = torch.cat([weights.new_zeros(1), torch.cumsum(weights[order], 0)])
        n_prune = int(torch.argmin((cum.double() - target).abs()))
        keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
        keep[order[:n_prune]] = False
    offset = 0
    for u in units:
        u.set_mask(keep[offset : offset + u.n])
        offset += u.n


def _select_bracketed(units: Sequence[_Units], target: float, size: int) -> bool:
    """The sampled-bracket selection; returns False (nothing decided) when the bracket misses."""
    total = sum(u.n for u in units)
    # stratified: one random unit in each of kernels.SAMPLE equal strides (sorted, so gathers stream)
    # (made a slice at a time, the same values as in one go: float64 temporaries of the whole
    # sample would be several times its final size, and the sample phase is a peak of its own)
    gen = torch.Generator().manual_seed(0)
    n_sample = min(kernels.SAMPLE, total)
    stride = total / n_sample
    index = torch.empty(n_sample, dtype=torch.int64)
    for i0 in range(0, n_sample, 1 << 14):
        i1 = min(n_sample, i0 + (1 << 14))
        part = index[i0:i1]
        part.copy_(torch.arange(i0, i1, dtype=torch.float64).mul_(stride))
        part += torch.rand(i1 - i0, generator=gen, dtype=torch.float64).mul_(stride).long()
    index.clamp_(max=total - 1)
    bounds = [0, *itertools.accumulate(u.n for u in units)]
    parts = []
    for i, u in enumerate(units):
        lo_i, hi_i = torch.searchsorted(index, torch.tensor(bounds[i : i + 2])).tolist()
        if hi_i > lo_i:
            parts.append(u.at(index[lo_i:hi_i] - bounds[i] if i else index[lo_i:hi_i]))
        if len(units) > 1:
            u.release()
    sample = torch.cat(parts) if len(parts) > 1 else parts[0]
    n_sample = sample.numel()
    if size:
        q = min(max(round(target / size), 0), total) / total
    else:
        q = target / sum(int(u.sizes(0, u.n).sum()) if not u.size else u.n * u.size for u in units)
    spread = kernels.Z * math.sqrt(n_sample * q * (1 - q))
    lo_rank, hi_rank = math.floor(q * n_sample - spread) - 1, math.ceil(q * n_sample + spread) + 1
    ordered = _np(sample)  # a fresh tensor: sorted in place, once, it serves lo, hi and the tie check
    ordered.sort()
    lo = float(ordered[lo_rank]) if lo_rank >= 0 else -math.inf
    if lo == -math.inf and ordered.size and ordered[-1] > -math.inf:
        # a mass of -inf (weights kept pruned by the nested policy) below the cut: count it as
        # certainly pruned rather than as candidates (the count check below verifies the cut)
        lo = float(ordered[np.searchsorted(ordered, -math.inf, "right")])
    hi = float(ordered[hi_rank]) if hi_rank < n_sample else math.inf
    if size:
        at_q = float(ordered[min(max(round(q * n_sample), 1), n_sample) - 1])
        ties = np.searchsorted(ordered, at_q, "right") - np.searchsorted(ordered, at_q, "left")
        if ties > 2 * spread:  # a tie mass (zeros, say) straddles the cut
            return _select_ties(units, at_q, min(max(round(target / size), 0), total))
    del index, parts, sample, ordered  # the pass is the peak: nothing of the sample outlives it

    # Candidates go to buffers allocated once, sized for the expected count plus a margin of
    # about five standard deviations (grown in the rare case it is not enough): small
    # long-lived allocations between the pieces' temporaries would keep the allocator from
    # reusing their memory (the heap then grows by about the size of every score ever made).
    cap = max(1 << 16, 9 * (hi_rank - lo_rank) * total // (8 * n_sample))
    pos_buf = torch.empty(cap, dtype=torch.int32 if max(u.n for u in units) < 2**31 else torch.int64)
    val_buf = torch.empty(cap, dtype=torch.float32)
    size_buf = torch.empty(cap if not size else 0, dtype=torch.int64)
    spans: list[tuple[int, int, int]] = []
    below = 0.0  # elements (or units, when uniform) certainly pruned: score < lo
    n_cand = 0
    for i, u in enumerate(units):
        first = n_cand
        for start, s in u.pieces():
            m = u.piece_mask(start, s.numel())
            _ge_into(s, hi, m)
            pos = _in_bracket(s, m, lo)
            c = pos.numel()
            if n_cand + c > cap:
                cap = max(cap * 3 // 2, n_cand + c)
                if cap > total // 8:  # the bracket is far too wide (ties): the exact path
                    return False
                pos_buf, val_buf = _grown(pos_buf, cap, n_cand), _grown(val_buf, cap, n_cand)
                size_buf = size_buf if size else _grown(size_buf, cap, n_cand)
            if size:
                below += s.numel() - _count(m) - c
            else:
                w = u.sizes(start, start + s.numel())
                below += float(w.sum() - w[m].sum() - w[pos].sum())
                size_buf[n_cand : n_cand + c] = w[pos]
            if c:
                val_buf[n_cand : n_cand + c] = s[pos.to(s.device)]
                pos_buf[n_cand : n_cand + c] = pos
                pos_buf[n_cand : n_cand + c] += start
                n_cand += c
            u.piece_written(start, m)
        spans.append((i, first, n_cand))
        if len(units) > 1:
            u.release()
    values = val_buf[:n_cand]
    if size:
        k = min(max(round(target / size), 0), total)
        if not below <= k <= below + n_cand:
            return False
        keep = _keep_above_kth(values, int(k - below))
    else:
        weights = size_buf[:n_cand]
        if not below <= target <= below + float(weights.sum()):
            return False
        order = torch.argsort(values, stable=True)
        cum = below + torch.cat([weights.new_zeros(1), torch.cumsum(weights[order], 0)]).double()
        n_prune = int(torch.argmin((cum - target).abs()))
        keep = torch.ones(n_cand, dtype=torch.bool)
        keep[order[:n_prune]] = False
    for i, first, last in spans:
        units[i].keep_units(pos_buf[first:last][keep[first:last]].long())
    return True


def _grown(buf: Tensor, cap: int, used: int) -> Tensor:
    out = torch.empty(cap, dtype=buf.dtype, device=buf.device)
    out[:used] = buf[:used]
    return out


def _select_ties(units: Sequence[_Units], value: float, k: int) -> bool:
    """Select ``k`` units when a large mass of units scores exactly ``value`` at the cut: keep
    ``> value``, prune ``< value``, and among the ties prune the first ones in order. Two passes,
    no candidates kept. Returns False when the cut is not inside the ties."""
    below = 0
    for u in units:
        for start, s in u.pieces():
            m = u.piece_mask(start, s.numel())
            _ge_into(s, value, m)
            below += s.numel() - _count(m)
            np.greater(_np(s), value, out=_np(m)) if _numpy_kernels(s) else m.logical_and_(s != value)
            u.piece_written(start, m)
        if len(units) > 1:
            u.release()
    remaining = k - below
    if remaining < 0:
        return False
    for u in units:
        for start, s in u.pieces():
            ties = torch.from_numpy(np.flatnonzero(_np(s) == value)) if _numpy_kernels(s) else torch.nonzero(s == value).view(-1)
            if remaining >= ties.numel():
                remaining -= ties.numel()
                continue
            u.keep_units(ties[remaining:] + start)
            remaining = 0
        if len(units) > 1:
            u.release()
    return remaining == 0
