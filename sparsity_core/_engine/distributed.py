"""Exact masks from row shards (FSDP2 ``Shard(0)``): each rank holds rows of every sharded tensor
and gets the local slice of the masks one process computes on the gathered tensors, with no
weight gathered and a handful of small collectives per mask update, whatever the number of
tensors.

What is exact, and how
- Units (elements, blocks) are numbered as one process numbers them: tensor order, then the flat
  unit index. Under ``Shard(0)`` a rank's units are a contiguous range of that index whenever
  they are whole on the rank and dim 0 runs along the outputs (always for elements and for
  blocks one row high; ``HxW`` when the shard's rows are aligned to H), so among equal scores the
  earlier tensor, then the earlier rank, then the earlier position is pruned first.
- A selection prunes, over the units of a tensor (layer scope) or of a group (global scope), the
  lowest scores until ``round(level * n)`` units over the GLOBAL ``n`` (ragged blocks: the prefix
  whose element count is closest to the target). It is found as a threshold ``t`` and a number of
  ties at ``t`` to prune, then every rank decides its own units:
  1. *Sample* (problems larger than twice the sample): a stratified sample of
     ``kernels.SAMPLE // 4`` units over the global numbering whose draw in each stride is a hash
     of the stride's number, so a rank draws and scores only the strides over its own units; one
     ``all_reduce(max)`` assembles it on every rank, so every rank brackets the cut ``[lo, hi)``
     alike. A mass of equal scores at the sampled quantile (zeros after gradual pruning,
     quantised weights) takes the *ties* pass instead: ``> v`` kept, ``< v`` and ``== v`` counted
     by tensor and rank, and the mass split by an exclusive prefix of those counts (no positions
     kept, no pass at all when the whole mass goes one way).
  2. *One pass*: units ``>= hi`` are kept, those ``< lo`` counted, those in the bracket kept
     aside (a few percent). Small problems skip the sample: all their units are candidates.
  3. *One all_gather of counts* (every problem's at once): the weight below the bracket, in it,
     whether a rank overflowed, the candidates' range and the tie counts; the bracket is checked
     globally, so every rank takes the same branch. A miss or an overflow takes the exact
     fallback: the same search over all units, re-read from the scores each round.
  4. *Radix search*: rounds of histograms of the candidates' order-preserving integer keys
     (``all_reduce(sum)``, every problem's at once) narrow ``t`` to one float value (2 rounds
     typically, 3 at most); no score is gathered.
  5. *One all_gather of tie weights* by tensor and rank: an exclusive prefix over (tensor, rank)
     tells each rank how many ties precede its own, so ties split in global order.
- Collectives per update: one all_gather to start (refusals, what the current masks prune,
  where the shards are), then per selection round at most 1 + 1 + 3 + 1 as above, all tensors
  batched; ``scope="global"`` adds one all_reduce of per-tensor counts per round of its bounds
  (``_bounds.py``; usually one round, the tensors fixed at a bound selected with the next).
- N:M groups and blocks are computed locally when every group is whole on its rank (N:M along
  rows; along dim 0, as for transformers' Conv1D ``[in, out]`` or a 1-D tensor, when the shards
  are aligned to M; ``HxW`` when they are aligned to H), and refused on every rank together
  otherwise, with the tensor, the shards and the rule named. Blocks whose columns run along
  dim 0 (``1xW`` on a Conv1D ``[in, out]``) are whole on a rank when its shard is aligned to W;
  a rank then holds a run of block columns in every block row, so their order interleaves the
  ranks: ties are counted by block row and split row by row, then rank by rank. A ``channel``
  there spans every shard and is refused.
- Replicated tensors (no entry in ``shards.tensors``) are whole on every rank: selected locally
  unless they share a global group with sharded tensors, where every rank holds them alike (their
  counts are taken from rank 0 only).
- An error on one rank (NaN scores, say) is held until the next collective, which tells every
  rank: all raise (the failing one its own error) and none waits for a rank that stopped. Local
  work that needs no collective (N:M, replicated tensors) runs after the last collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._bits import MaskView
from .._bounds import bounds, rounds, unbounded
from .._shards import Communicator, Shard
from . import kernels
from .kernels import _count, _ge_into, _in_bracket, _np, _numpy_kernels, apply_mask_, Tensor
from .patterns import nm_mask
from .units import _Blocks, _Elements, _Units, Scorer

if TYPE_CHECKING:
    from .._base import ScoreSparsifier
    from .._contract import MaskContext
    from .._layers import TensorLayout

#: Histogram bins of one radix round, shared by the problems searched at once (each gets at
#: least :data:`MIN_BINS`): a float32 key range of 2**32 is narrowed to one value in 2 rounds for
#: one problem, in 3 for many; a bracket's range is far narrower.
BINS = 1 << 16
MIN_BINS = 1 << 11
#: The sample of a distributed selection is ``kernels.SAMPLE // SAMPLE_SHARE`` (see _sample_size),
#: and the samples of one update (assembled by one all_reduce) hold at most SAMPLE_TOTAL scores
#: (many large tensors in layer scope: each sample is smaller, its bracket wider).
SAMPLE_SHARE = 4
SAMPLE_TOTAL = 1 << 21

_KEY_MASK = 0x7FFFFFFF


def _keys(s: Tensor) -> Tensor:
    """Order-preserving int64 keys of float32 scores: ``a < b`` iff ``key(a) < key(b)``, and
    ``-0.0`` keyed as ``+0.0`` (they compare equal, so they must tie)."""
    i = (s.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(i < 0, i ^ _KEY_MASK, i)


def _key_of(value: float) -> int:
    return int(_keys(torch.tensor([value], dtype=torch.float32))[0])


def _value_of(key: int) -> float:
    i = key ^ _KEY_MASK if key < 0 else key
    return float(torch.tensor([i], dtype=torch.int32).view(torch.float32)[0])


_KEY_MIN = _key_of(-math.inf)
_KEY_MAX = _key_of(math.inf)


# -- what is selected --------------------------------------------------------------------------
@dataclass(eq=False)
class _Part:
    """One tensor's units in a selection: the local units and where they sit globally."""

    units: _Units
    sharded: bool
    n: int  # units of the global tensor
    size: int  # elements per unit, globally (0: ragged blocks)
    numel: int  # elements of the global tensor
    start: int  # global index of this rank's first unit in the tensor
    offset: int  # shard row offset: orders the ranks among equal scores
    # blocks along dim 0 (a Conv1D [in, out]): this rank holds block columns c0..c0+cb_local of
    # each of the rb block rows of cb: its units interleave with the other ranks' (rb, cb, c0, cb_local)
    grid: tuple[int, int, int, int] | None = None
    # filled by the selection
    cand_pos: Tensor | None = None
    cand_val: Tensor | None = None
    cand_w: Tensor | None = None
    tie_pos: Tensor | None = None
    tie_w: Tensor | None = None


@dataclass(eq=False)
class _Problem:
    """Prune the lowest-scoring units over ``parts`` (in order) to about ``target`` elements."""

    parts: list[_Part]
    target: float
    # filled by the selection
    uniform: bool = True
    goal: float = 0.0  # units (uniform) or elements (ragged) to prune
    mode: str = "bracket"  # bracket | ties | full | done
    lo: float = -math.inf
    hi: float = math.inf
    overflow: bool = False
    below: float = 0.0  # local, then global: weight certainly below the cut
    cand: float = 0.0
    cmin: float = math.inf  # the lowest and highest candidate scores (this rank's, then all)
    cmax: float = -math.inf
    small: bool = False  # no sample: every unit is a candidate
    klo: int = _KEY_MIN
    khi: int = _KEY_MAX
    ties_local: list[Tensor] = field(default_factory=list)  # by part (and block row: grid)
    ties_table: Tensor | None = None  # ranks x (parts, block rows): tie weight at the cut (ties mode)
    offsets: Tensor | None = None  # ranks x parts: shard row offsets


def _width(part: _Part) -> int:
    """Tie counts of a part in the collectives: one, or one per block row (``grid``)."""
    return part.grid[0] if part.grid is not None else 1


def _owned(part: _Part, rank: int) -> bool:
    """Whether this rank's counts of ``part`` enter a sum over ranks (a replicated tensor: rank 0's)."""
    return part.sharded or rank == 0


class _Stop:
    """An error on one rank, held until the next collective tells every rank of it: then every
    rank raises (the failing one its own error), so that none waits for a rank that stopped."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    def run(self, fn: Callable[..., object], *args: object) -> None:
        if self.error is None:
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - raised again after the next collective
                self.error = e

    def flag(self, rank: int) -> float:
        """What this rank tells the others: 0, or its rank + 1 when it failed."""
        return float(rank + 1) if self.error is not None else 0.0

    def check(self, flags: Tensor) -> None:
        """Raise when any rank failed (``flags``: the flags of every rank, or their max)."""
        failed = flags.reshape(-1)
        failed = failed[failed > 0]
        if self.error is not None:
            raise self.error
        if failed.numel():
            raise RuntimeError(
                f"rank {int(failed.min()) - 1} raised while computing its masks (its own error says why); "
                f"every rank stops here so that none waits for it"
            )


def _weights(part: _Part, start: int, end: int, uniform: bool) -> Tensor | None:
    return None if uniform else part.units.sizes(start, end)


def select_many(problems: Sequence[_Problem], comm: Communicator) -> None:
    """Every problem's selection at once (one set of collectives for all); writes each part's
    ``units.mask``. Every rank passes the same problems in the same order."""
    live: list[_Problem] = []
    for p in problems:
        total = sum(part.n for part in p.parts)
        sizes = {part.size for part in p.parts}
        size = sizes.pop() if len(sizes) == 1 else 0
        p.uniform = bool(size)
        if size:
            k = min(max(round(p.target / size), 0), total)
            if k == 0 or k == total:
                for part in p.parts:
                    part.units.mask.fill_(k == 0)
                p.mode = "done"
                continue
            p.goal = float(k)
        else:
            p.goal = float(p.target)
        live.append(p)
    if not live:
        return
    for p in live:  # small: no sample, every unit a candidate (cheaper than sampling a large share)
        total = sum(part.n for part in p.parts)
        p.small = total <= min(kernels.EXACT, 2 * _sample_size(total))
    stop = _Stop()
    _sample_brackets([p for p in live if not p.small], comm, stop)
    for p in live:
        stop.run(_first_pass, p, comm.rank)
    _gather_counts(live, comm, stop)
    _radix(live, comm)
    _split_ties(live, comm)
    for p in live:
        for part in p.parts:
            part.cand_pos = part.cand_val = part.cand_w = part.tie_pos = part.tie_w = None
            part.units.release()


def _sample_size(total: int, problems: int = 1) -> int:
    """Units sampled to bracket a selection over ``total`` among ``problems`` sampled at once: a
    quarter of one process's ``kernels.SAMPLE`` (every rank sorts the whole sample, a cost that
    does not shrink with its shard; a bracket twice as wide costs less, its candidates being a
    few percent of a pass), and a share of :data:`SAMPLE_TOTAL`, but never below 2**12."""
    share = max(SAMPLE_TOTAL // max(problems, 1), 1 << 12)
    return min(max(kernels.SAMPLE // SAMPLE_SHARE, 1), share, total)


def _strata(total: int, n_sample: int, g0: int, g1: int) -> tuple[np.ndarray, np.ndarray]:
    """The sampled units in ``[g0, g1)`` of a stratified sample of ``n_sample`` over
    ``total`` units: one in each of equal strides, at an offset drawn from a counter-based hash
    of the stride's number, so that a rank draws only the strides over its own
    units and every rank agrees on the whole sample. Returns the sampled global indices (sorted)
    and the numbers of their strides."""
    stride = total / n_sample
    first = max(0, math.floor(g0 / stride) - 1)
    last = min(n_sample, math.ceil(g1 / stride) + 1)
    x = np.arange(first, last, dtype=np.uint32)
    with np.errstate(over="ignore"):  # lowbias32 (a 32-bit integer hash): in place, cheap
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    pos = np.arange(first, last, dtype=np.float64)
    pos += x * 2.0**-32  # the stride's number plus an offset in [0, 1)
    pos *= stride
    index = np.minimum(pos.astype(np.int64), total - 1)
    mine = (index >= g0) & (index < g1)
    return index[mine], np.arange(first, last, dtype=np.int64)[mine]


def _sample_brackets(problems: Sequence[_Problem], comm: Communicator, stop: _Stop) -> None:
    """Step 1: a stratified sample of every problem's units, each rank scoring the sampled units
    it holds, assembled on every rank by one ``all_reduce(max)``; each problem's bracket (or
    ties) decided from it, alike on every rank."""
    if not problems:
        return
    sizes = [_sample_size(sum(part.n for part in p.parts), len(problems)) for p in problems]
    values = torch.full((sum(sizes) + 1,), -math.inf, dtype=torch.float32)  # the last: a failed rank

    def draw() -> None:
        at = 0
        for p, n_sample in zip(problems, sizes):
            total = sum(part.n for part in p.parts)
            base = 0
            for part in p.parts:
                if part.grid is not None:  # the tensor's strides, then the units this rank holds
                    _, cb, c0, cbl = part.grid
                    index, slots = _strata(total, n_sample, base, base + part.n)
                    col = (index - base) % cb
                    mine = (col >= c0) & (col < c0 + cbl)
                    index, slots = (index - base)[mine] // cb * cbl + col[mine] - c0, slots[mine]
                else:
                    g0 = base + (part.start if part.sharded else 0)
                    index, slots = _strata(total, n_sample, g0, g0 + part.units.n)
                    index = index - g0
                if index.size:  # a sampled unit's slot is the number of its stride
                    values[at + torch.from_numpy(slots)] = part.units.at(torch.from_numpy(index)).to(torch.float32)
                base += part.n
                if len(p.parts) > 1:
                    part.units.release()
            at += n_sample

    stop.run(draw)
    values[-1] = stop.flag(comm.rank)
    values = comm.all_reduce(values, "max")
    stop.check(values[-1:])
    at = 0
    for p, n_sample in zip(problems, sizes):
        _bracket(p, _np(values[at : at + n_sample]))
        at += n_sample


def _bracket(p: _Problem, sample: np.ndarray) -> None:
    """``selection._select_bracketed``'s bracket and tie check on the assembled sample."""
    n_sample = sample.size
    total = sum(part.n for part in p.parts)
    q = min(max(p.goal / total if p.uniform else p.goal / sum(part.numel for part in p.parts), 0.0), 1.0)
    spread = kernels.Z * math.sqrt(n_sample * q * (1 - q))
    lo_rank, hi_rank = math.floor(q * n_sample - spread) - 1, math.ceil(q * n_sample + spread) + 1
    q_rank = min(max(round(q * n_sample), 1), n_sample) - 1
    # sorted, not partitioned: NumPy's introselect degrades many times over masses of equal
    # values (zeros, quantised weights); the -inf of the nested policy are set apart first
    finite = sample[sample > -math.inf]
    finite.sort()
    n_inf = n_sample - finite.size
    ordered = np.concatenate([np.full(n_inf, -math.inf, dtype=np.float32), finite]) if n_inf else finite
    lo = float(ordered[lo_rank]) if lo_rank >= 0 else -math.inf
    if lo == -math.inf and finite.size:
        # a mass of -inf (weights kept pruned by the nested policy) below the cut: count it as
        # certainly pruned rather than as candidates, and every finite score from the lowest
        # float up as a candidate: the cut may be right above the mass (a tensor at its floor),
        # and the finite scores below hi are few (lo_rank fell inside the mass)
        lo = float(np.finfo(np.float32).min)
    hi = float(ordered[hi_rank]) if hi_rank < n_sample else math.inf
    p.lo, p.hi = lo, hi
    if p.uniform:
        at_q = float(ordered[q_rank])
        ties = np.searchsorted(ordered, at_q, "right") - np.searchsorted(ordered, at_q, "left")
        if ties > 2 * spread:  # a tie mass (zeros, say) straddles the cut
            p.mode, p.lo, p.hi = "ties", at_q, at_q


def _first_pass(p: _Problem, rank: int) -> None:
    """Step 2 on this rank: keep ``>= hi``, count ``< lo``, keep the candidates aside (bracket);
    or keep ``> v`` and count ``< v`` and ``== v`` (ties)."""
    # far too many candidates (ties the sample missed): counted, not kept; the fallback runs
    cap = math.inf if p.small else max(1 << 16, sum(part.units.n for part in p.parts) // 8)
    held = 0
    for part in p.parts:
        below, cand = 0.0, 0.0
        ties = torch.zeros(_width(part), dtype=torch.float64)
        pos_l: list[Tensor] = []
        val_l: list[Tensor] = []
        w_l: list[Tensor] = []
        for start, s in part.units.pieces():
            m = part.units.mask[start : start + s.numel()]
            if p.mode == "ties":  # uniform units only
                _ge_into(s, p.lo, m)
                at_or_above = _count(m)
                np.greater(_np(s), p.lo, out=_np(m)) if _numpy_kernels(s) else m.logical_and_(s != p.lo)
                below += s.numel() - at_or_above
                if part.grid is not None:  # by block row
                    idx = np.flatnonzero(_np(s) == p.lo) if _numpy_kernels(s) else torch.nonzero(s == p.lo).view(-1).cpu().numpy()
                    ties += torch.from_numpy(np.bincount((idx + start) // max(part.grid[3], 1), minlength=part.grid[0]).astype(np.float64))
                else:
                    ties += at_or_above - _count(m)
                continue
            w = _weights(part, start, start + s.numel(), p.uniform)
            _ge_into(s, p.hi, m)
            pos = _in_bracket(s, m, p.lo)
            c = pos.numel()
            if w is None:
                below += s.numel() - _count(m) - c
                cand += c
            else:
                wc = w[pos.to(w.device)]
                below += float(w.sum() - w[m].sum() - wc.sum())
                cand += float(wc.sum())
            if p.overflow or not c:
                continue
            held += c
            if held > cap:
                p.overflow = True
                continue
            pos_l.append(pos.to(torch.int64).cpu() + start)
            val_l.append(s[pos.to(s.device)].to(torch.float32).cpu())
            if w is not None:
                w_l.append(wc.cpu())
        if p.mode == "ties":
            p.ties_local.append(ties if _owned(part, rank) else torch.zeros_like(ties))
        elif not p.overflow:
            part.cand_pos = torch.cat(pos_l) if pos_l else torch.empty(0, dtype=torch.int64)
            part.cand_val = torch.cat(val_l) if val_l else torch.empty(0, dtype=torch.float32)
            part.cand_w = (torch.cat(w_l) if w_l else torch.empty(0, dtype=torch.int64)) if not p.uniform else None
        if _owned(part, rank):  # a replicated tensor is counted on rank 0 only
            p.below += below
            p.cand += cand
            if part.cand_val is not None and part.cand_val.numel():
                p.cmin = min(p.cmin, float(part.cand_val.min()))
                p.cmax = max(p.cmax, float(part.cand_val.max()))
        if len(p.parts) > 1:
            part.units.release()
    if p.overflow:
        for part in p.parts:
            part.cand_pos = part.cand_val = part.cand_w = None


def _gather_counts(problems: Sequence[_Problem], comm: Communicator, stop: _Stop) -> None:
    """Step 3: one all_gather of every problem's counts (below, candidates, overflow; ties by
    tensor), and the branch every rank then takes alike."""
    rows = [stop.flag(comm.rank)]
    for p in problems:
        rows += [p.below, p.cand, float(p.overflow), p.cmin, p.cmax]
        if p.mode == "ties":  # (a rank that failed may have counted fewer)
            done = len(p.ties_local)
            rows += [x for t in p.ties_local for x in t.tolist()] + [0.0] * sum(_width(q) for q in p.parts[done:])
        rows += [float(part.offset) for part in p.parts]
    table = torch.stack(comm.all_gather(torch.tensor(rows, dtype=torch.float64)))  # ranks x rows
    stop.check(table[:, 0])
    at = 1
    for p in problems:
        below, cand, overflow = (float(x) for x in table[:, at : at + 3].sum(0))
        cmin, cmax = float(table[:, at + 3].min()), float(table[:, at + 4].max())
        at += 5
        if p.mode == "ties":
            width = sum(_width(q) for q in p.parts)
            ties = table[:, at : at + width]
            at += width
        offsets = table[:, at : at + len(p.parts)]
        at += len(p.parts)
        p.offsets = offsets
        p.below = below
        if p.mode == "ties":
            if below <= p.goal <= below + float(ties.sum()):
                p.klo = p.khi = _key_of(p.lo)
                p.ties_table = ties
            else:
                p.mode, p.below = "full", 0.0
        elif overflow or not below <= p.goal <= below + cand:
            p.mode, p.below = "full", 0.0
        else:
            # the cut is among the candidates: between the lowest and the highest of them
            p.klo, p.khi = (_key_of(cmin), _key_of(cmax)) if cmin <= cmax else (_key_of(p.lo),) * 2


class _Keys:
    """The (key, weight) pairs this rank counts for a problem in the histogram rounds: its owned
    candidates, narrowed to the chosen bin after each round (so that rounds after the first are
    over a handful), or, in the fallback, every unit re-read from the scores each round."""

    def __init__(self, p: _Problem, rank: int) -> None:
        self.p, self.rank = p, rank
        self.keys: Tensor | None = None
        self.weights: Tensor | None = None
        if p.mode == "bracket":
            owned = [part for part in p.parts if _owned(part, rank) and part.cand_val is not None]
            self.keys = _keys(torch.cat([part.cand_val for part in owned])) if owned else torch.empty(0, dtype=torch.int64)  # type: ignore[misc]
            if not p.uniform:
                self.weights = torch.cat([part.cand_w for part in owned]) if owned else torch.empty(0, dtype=torch.int64)  # type: ignore[misc]

    def narrow(self) -> None:
        if self.keys is not None:
            inside = (self.keys >= self.p.klo) & (self.keys <= self.p.khi)
            self.keys = self.keys[inside]
            self.weights = None if self.weights is None else self.weights[inside]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        p = self.p
        if self.keys is not None:
            yield self.keys, self.weights
            return
        for part in p.parts:
            if _owned(part, self.rank):
                for start, s in part.units.pieces():
                    k = _keys(s)
                    inside = (k >= p.klo) & (k <= p.khi)
                    w = _weights(part, start, start + s.numel(), p.uniform)
                    yield k[inside], None if w is None else w[inside]
            if len(p.parts) > 1:
                part.units.release()


def _radix(problems: Sequence[_Problem], comm: Communicator) -> None:
    """Step 4: narrow each problem's key range ``[klo, khi]`` to the one key of its cut by
    histogram rounds (one ``all_reduce`` a round for all problems)."""
    sources = {id(p): _Keys(p, comm.rank) for p in problems if p.klo < p.khi}
    while True:
        open_ = [p for p in problems if p.klo < p.khi]
        if not open_:
            break
        bins = max(MIN_BINS, BINS // len(open_))
        hist = torch.zeros(len(open_), bins, dtype=torch.float64)
        widths = []
        for row, p in zip(hist, open_):
            width = p.khi - p.klo + 1
            nb = min(bins, width)
            widths.append((width, nb))
            for k, w in sources[id(p)]:
                b = torch.div((k - p.klo) * nb, width, rounding_mode="floor")
                row[:nb] += torch.bincount(b, weights=None if w is None else w.to(torch.float64), minlength=nb).to(torch.float64).cpu()
        hist = comm.all_reduce(hist, "sum")
        for row, p, (width, nb) in zip(hist, open_, widths):
            cum = torch.cumsum(row[:nb], 0) + p.below
            reached = torch.nonzero(cum >= p.goal).view(-1)
            b = int(reached[0]) if reached.numel() else nb - 1
            if b:
                p.below = float(cum[b - 1])
            p.klo, p.khi = p.klo + -(-b * width // nb), p.klo + -(-(b + 1) * width // nb) - 1
            sources[id(p)].narrow()


def _split_ties(problems: Sequence[_Problem], comm: Communicator) -> None:
    """Step 5: every unit below the cut pruned, above kept; the ties at the cut split in global
    order (tensor, then rank, then position) from one all_gather of tie weights."""
    rank = comm.rank
    rows: list[float] = []
    for p in problems:
        if p.mode == "ties":  # its tie counts came with the counts (step 3)
            continue
        t = _value_of(p.klo)
        for part in p.parts:
            if p.mode == "bracket":
                val = part.cand_val
                pos = part.cand_pos
                assert val is not None and pos is not None
                gt, eq = val > t, val == t
                part.units.mask[pos[gt].to(part.units.mask.device)] = True
                part.tie_pos = pos[eq]
                part.tie_w = None if p.uniform else part.cand_w[eq]  # type: ignore[index]
            else:  # full: one more pass, where the mask is decided
                ties_l, w_l = [], []
                for start, s in part.units.pieces():
                    m = part.units.mask[start : start + s.numel()]
                    if _numpy_kernels(s):
                        np.greater(_np(s), t, out=_np(m))
                        ties = torch.from_numpy(np.flatnonzero(_np(s) == t))
                    else:
                        torch.gt(s, t, out=m)
                        ties = torch.nonzero(s == t).view(-1)
                    if ties.numel():
                        ties_l.append(ties.cpu() + start)
                        if not p.uniform:
                            w_l.append(part.units.sizes(start, start + s.numel())[ties.to(part.units.mask.device)].cpu())
                part.tie_pos = torch.cat(ties_l) if ties_l else torch.empty(0, dtype=torch.int64)
                part.tie_w = None if p.uniform else (torch.cat(w_l) if w_l else torch.empty(0, dtype=torch.int64))
                if len(p.parts) > 1:
                    part.units.release()
            if part.grid is not None:  # by block row
                rb, _, _, cbl = part.grid
                w_rows = torch.bincount(part.tie_pos // max(cbl, 1), None if part.tie_w is None else part.tie_w.to(torch.float64), minlength=rb)
                rows += w_rows.to(torch.float64).tolist()
            else:
                w = float(part.tie_pos.numel()) if part.tie_w is None else float(part.tie_w.sum())
                rows.append(w if _owned(part, rank) else 0.0)
    table = None
    if rows:
        table = torch.stack(comm.all_gather(torch.tensor(rows, dtype=torch.float64)))
    at = 0
    for p in problems:
        offsets = p.offsets
        assert offsets is not None
        width = sum(_width(q) for q in p.parts)
        if p.mode == "ties":
            ties = p.ties_table
        else:
            assert table is not None
            ties = table[:, at : at + width]
            at += width
        assert ties is not None
        before = p.below
        col = 0
        for j, part in enumerate(p.parts):
            counts = ties[:, col : col + _width(part)]  # ranks x (1 or block rows)
            col += _width(part)
            if part.sharded:
                # ranks holding earlier rows (or the same rows, an empty shard, at a lower rank)
                earlier = (offsets[:, j] < offsets[rank, j]) | ((offsets[:, j] == offsets[rank, j]) & (torch.arange(len(offsets)) < rank))
                ahead = counts[earlier].sum(0)
            else:
                counts, ahead = counts[:1], torch.zeros(counts.shape[1], dtype=counts.dtype)
            if part.grid is not None:  # block row by block row: the rows before, then the ranks before
                by_row = counts.sum(0)
                row_base = before + torch.cumsum(by_row, 0) - by_row + ahead
                before += float(by_row.sum())
                if p.mode == "ties":
                    _prune_tie_mass_grid(part, p.lo, row_base, p.goal)
                else:
                    _prune_ties_grid(part, row_base, p.goal)
                continue
            mine = before + float(ahead.sum())
            before += float(counts.sum())
            if p.mode == "ties":
                _prune_tie_mass(part, p.lo, mine, float(counts[rank if part.sharded else 0, 0]), p.goal)
            else:
                _prune_ties(part, mine, p.goal)


def _pruned_by_order(prior: Tensor, w: Tensor, goal: float) -> Tensor:
    """Which of the sorted units after ``prior`` weight, each of weight ``w``, one process prunes:
    the prefix j of the sorted units minimising |cum_j - goal| (the first such j), so a unit is
    pruned when its prefix ends short of the goal, or when it crosses the goal and ending after
    it is strictly closer than ending before it (exactly ``goal`` units when all weigh 1)."""
    after = prior + w
    return (after < goal) | ((prior < goal) & (goal <= after) & (after - goal < goal - prior))


def _prune_ties_grid(part: _Part, row_base: Tensor, goal: float) -> None:
    """:func:`_prune_ties` for interleaved units: a tie's weight before it is its block row's base
    plus this rank's ties before it in that row."""
    pos = part.tie_pos
    assert pos is not None and part.grid is not None
    if not pos.numel():
        return
    w = torch.ones(pos.numel(), dtype=torch.float64) if part.tie_w is None else part.tie_w.to(torch.float64)
    row = pos // part.grid[3]
    cum = torch.cumsum(w, 0) - w
    prior = row_base[row] + cum - cum[torch.searchsorted(row, row)]
    keep = pos[~_pruned_by_order(prior, w, goal)]
    part.units.mask[keep.to(part.units.mask.device)] = True


def _prune_tie_mass_grid(part: _Part, value: float, row_base: Tensor, goal: float) -> None:
    """:func:`_prune_tie_mass` for interleaved units (one more pass, a tie count by block row)."""
    assert part.grid is not None
    rb, _, _, cbl = part.grid
    seen = torch.zeros(rb, dtype=torch.float64)  # this rank's ties so far, by block row
    for start, s in part.units.pieces():
        m = part.units.mask[start : start + s.numel()]
        idx = torch.from_numpy(np.flatnonzero(_np(s) == value)) if _numpy_kernels(s) else torch.nonzero(s == value).view(-1).cpu()
        if not idx.numel():
            continue
        row = (idx + start) // cbl
        ordinal = torch.arange(idx.numel(), dtype=torch.float64) - torch.searchsorted(row, row).to(torch.float64)
        prior = row_base[row] + seen[row] + ordinal
        keep = idx[~_pruned_by_order(prior, torch.ones_like(prior), goal)]
        m[keep.to(m.device)] = True
        seen += torch.bincount(row, minlength=rb).to(torch.float64)
    part.units.release()


def _prune_tie_mass(part: _Part, value: float, before: float, count: float, goal: float) -> None:
    """:func:`_prune_ties` for a mass of ``count`` equal units scoring ``value`` on this rank (the
    mask keeps ``> value`` since the first pass): the first ``goal - before`` of them stay
    pruned, the rest are kept, with no pass at all when they all go one way, and no positions
    kept otherwise (like ``selection._select_ties``)."""
    prune = int(min(max(goal - before, 0), count))
    if prune >= count:
        return
    for start, s in part.units.pieces():
        m = part.units.mask[start : start + s.numel()]
        if prune <= 0:
            _ge_into(s, value, m)
            continue
        ties = torch.from_numpy(np.flatnonzero(_np(s) == value)) if _numpy_kernels(s) else torch.nonzero(s == value).view(-1)
        if prune >= ties.numel():
            prune -= ties.numel()
            continue
        m[ties[prune:].to(m.device)] = True
        prune = 0
    part.units.release()


def _prune_ties(part: _Part, before: float, goal: float) -> None:
    """Keep or prune this rank's ties at the cut given the weight of the ties before them: the
    prefix of the sorted order whose weight is closest to ``goal`` is pruned (exactly ``goal``
    units when uniform)."""
    pos = part.tie_pos
    assert pos is not None
    if not pos.numel():
        return
    if part.tie_w is None:
        n_prune = int(min(max(goal - before, 0), pos.numel()))
        keep = pos[n_prune:]
    else:
        w = part.tie_w.to(torch.float64)
        keep = pos[~_pruned_by_order(before + torch.cumsum(w, 0) - w, w, goal)]
    part.units.mask[keep.to(part.units.mask.device)] = True


# -- the entry point ---------------------------------------------------------------------------
def _prod(xs: Sequence[int]) -> int:
    return math.prod(int(x) for x in xs)


def _matrix_shape(shape: Sequence[int], layout: TensorLayout) -> tuple[int, int]:
    """The ``[outputs, reduction]`` matrix shape of a tensor shaped ``shape`` (see ``_layers``)."""
    if len(shape) <= 1:
        return 1, _prod(shape)
    perm = layout.permutation(len(shape))
    return int(shape[perm[0]]), _prod([shape[d] for d in perm[1:]])


def _rows_along_outputs(ndim: int, layout: TensorLayout) -> bool:
    """Whether dim 0 (the sharded one) is the output axis: whole rows of the matrix view."""
    return ndim >= 2 and layout.permutation(ndim)[0] == 0


def _column_split(shape: Sequence[int], layout: TensorLayout) -> tuple[int, int]:
    """Where dim 0 sits among the matrix view's columns when it is not the output axis: the
    product of the column axes before it and after it (a column is ``(o * I + i) * inner + s``)."""
    perm = layout.permutation(len(shape))
    p0 = perm.index(0)
    return _prod([shape[d] for d in perm[1:p0]]), _prod([shape[d] for d in perm[p0 + 1 :]])


def _groups_whole(shape: Sequence[int], layout: TensorLayout, offset: int, rows: int, m: int) -> bool:
    """Whether the groups of ``m`` consecutive columns of the matrix view (the last one may be
    shorter) that hold this shard's elements are whole on it and grouped alike in its own matrix
    view, when dim 0 runs along the columns (a 1-D tensor; transformers' Conv1D ``[in, out]``)."""
    if rows == 0 or rows == shape[0]:
        return True
    ndim = len(shape)
    if ndim <= 1:
        outer, inner = 1, 1
    else:
        outer, inner = _column_split(shape, layout)
    total_rows, cols = int(shape[0]), outer * int(shape[0]) * inner
    o = torch.arange(outer).view(-1, 1, 1)
    i = torch.arange(offset, offset + rows).view(1, -1, 1)
    s = torch.arange(inner).view(1, 1, -1)
    global_col = ((o * total_rows + i) * inner + s).reshape(-1)  # this shard's columns, in its own order
    local_group = torch.arange(global_col.numel()) // m
    group = global_col // m
    same = bool((group == group[local_group * m]).all())
    local_size = torch.clamp(global_col.numel() - local_group * m, max=m)
    global_size = torch.clamp(cols - group * m, max=m)
    return same and bool((local_size == global_size).all())


@dataclass(frozen=True)
class _Plan:
    """How one sharded tensor is selected, and whether its shard can be."""

    name: str
    shard: Shard
    rows: int  # this rank's rows
    pattern: tuple[str, int, int]
    rule: str  # the alignment rule it breaks ("" when it does not)


def _plan(name: str, tensor: Tensor, shard: Shard, layout: TensorLayout, pattern: tuple[str, int, int]) -> _Plan:
    shape = tuple(int(x) for x in shard.global_shape)
    rows = int(tensor.shape[0]) if tensor.dim() else 0
    if tuple(tensor.shape[1:]) != shape[1:] or not 0 <= shard.offset <= shard.offset + rows <= shape[0]:
        rule = f"a shard is rows offset..offset+rows of the global shape {shape}, got a local shape {tuple(tensor.shape)} at offset {shard.offset}"
    else:
        rule = _rule(shape, layout, pattern, shard.offset, rows)
    return _Plan(name, shard, rows, pattern, rule)


def _rule(shape: tuple[int, ...], layout: TensorLayout, pattern: tuple[str, int, int], offset: int, rows: int) -> str:
    """The alignment rule that rows ``offset..offset+rows`` break for ``pattern`` ("" if none):
    every N:M group and block must be whole on one rank, numbered there as in one process."""
    kind, a, b = pattern
    end = offset + rows
    along = _rows_along_outputs(len(shape), layout)
    if kind == "n:m" and not along and not _groups_whole(shape, layout, offset, rows, b):
        return (
            f"N:M groups of {b} run along dim 0 here (the reduction axis of its [outputs, reduction] view), "
            f"so every shard's offset and row count must be a multiple of {b} (the last shard may end the tensor)"
        )
    if kind not in ("channel", "block") or rows == 0 or rows == shape[0]:
        return ""
    h, w = (1, _matrix_shape(shape, layout)[1]) if kind == "channel" else (a, b)
    if len(shape) <= 1:
        if offset % w == 0 and (rows % w == 0 or end == shape[0]):
            return ""
        return f"its blocks of {w} run along dim 0, so every shard's offset and row count must be a multiple of {w} (the last shard may end the tensor)"
    if not along:
        outer, inner = _column_split(shape, layout)
        if outer > 1 or kind == "channel":
            what = "a channel spans every shard" if kind == "channel" else "its block columns interleave dim 0 with other axes"
            return (
                f"its blocks run along dim 0 (the reduction axis of its [outputs, reduction] view) and {what}; "
                f"use pattern 'unstructured', '1xW' with aligned shards, or N:M for it (overrides), or leave it out (exclude)"
            )
        if (offset * inner) % w or ((rows * inner) % w and end != shape[0]):
            unit = "" if inner == 1 else f" times {inner} (the columns of one row of dim 0)"
            return (
                f"its blocks are {w} columns wide along dim 0 (the reduction axis of its [outputs, reduction] view), "
                f"so every shard's offset and row count{unit} must be a multiple of {w} (the last shard may end the tensor)"
            )
        return ""
    if h > 1 and not (offset % h == 0 and (rows % h == 0 or end == shape[0])):
        return f"blocks are {h} rows high, so every shard's offset and row count must be a multiple of {h} (the last shard may end the tensor)"
    return ""


def _part(scorer: Scorer, plan: _Plan, layout: TensorLayout) -> _Part:
    """The local units of a sharded tensor and where they sit in the global numbering."""
    kind, a, b = plan.pattern
    shape = tuple(int(x) for x in plan.shard.global_shape)
    numel = _prod(shape)
    if kind == "unstructured" or (kind == "block" and (a, b) == (1, 1)) or numel == 0:
        units: _Units = _Elements(scorer)
        return _Part(units, True, numel, 1, numel, plan.shard.offset * _prod(shape[1:]), plan.shard.offset)
    rows, cols = _matrix_shape(shape, layout)
    h, w = (1, max(1, cols)) if kind == "channel" else (a, b)
    if kind == "block" and rows <= h and cols <= w and (rows, cols) != (h, w):
        raise ValueError(
            f"pattern '{h}x{w}' is larger than tensor {plan.name!r}: its [outputs, reduction] "
            f"matrix view is [{rows}, {cols}] (shape {shape}), all inside one "
            f"block, so it could only be kept or pruned whole; use a smaller block for it "
            f"(overrides) or leave it out (exclude)"
        )
    rb, cb = -(-rows // h), -(-cols // w)
    size = 0 if rows % h or cols % w else h * w
    units = _Elements(scorer) if scorer.tensor.numel() == 0 else _Blocks(scorer, h, w)
    if len(shape) <= 1:
        start = plan.shard.offset // w
    elif _rows_along_outputs(len(shape), layout):
        start = plan.shard.offset // h * cb
    else:  # block columns along dim 0, aligned (checked): interleaved with the other ranks'
        _, inner = _column_split(shape, layout)
        grid = (rb, cb, plan.shard.offset * inner // w, units.cb if isinstance(units, _Blocks) else 0)
        return _Part(units, True, rb * cb, size, numel, 0, plan.shard.offset, grid)
    return _Part(units, True, rb * cb, size, numel, start, plan.shard.offset)


def _replicated_part(scorer: Scorer, pattern: tuple[str, int, int]) -> _Part:
    from .masks import _units

    units = _units(scorer, pattern)
    numel = scorer.tensor.numel()
    return _Part(units, False, units.n, units.size, numel, 0, 0)


def _pruned(part: _Part) -> float:
    u = part.units
    if u.size:
        return float((u.n - _count(u.mask)) * u.size)
    return float(u.sizes(0, u.n)[~u.mask].sum()) if u.n else 0.0


def _global_sums(parts: Sequence[_Part], values: Sequence[float], comm: Communicator) -> list[float]:
    """Per-part sums over the ranks (a replicated part: its one value)."""
    local = torch.tensor([v if _owned(p, comm.rank) else 0.0 for p, v in zip(parts, values)], dtype=torch.float64)
    summed = comm.all_reduce(local, "sum").tolist()
    return [s if p.sharded else v for p, s, v in zip(parts, summed, values)]


def _select_bounded(parts: list[_Part], target: float, spec: object, floors: Sequence[float], comm: Communicator) -> None:
    """``_bounds.select_bounded`` over global sizes and counts (see there)."""
    numels = [p.numel for p in parts]
    lo, hi = bounds(spec, numels, [int(f) for f in floors], target)
    if unbounded(lo, hi, numels):
        select_many([_Problem(parts, target)], comm)
        return
    fixing: list[_Problem] = []

    def choose(active: list[int], target: float) -> dict[int, float]:
        # the tensors fixed in the last round are selected with the rest (one set of collectives)
        select_many([*fixing, _Problem([parts[i] for i in active], target)], comm)
        fixing.clear()
        return dict(zip(active, _global_sums([parts[i] for i in active], [_pruned(parts[i]) for i in active], comm)))

    def pin(fixed: dict[int, int], over: bool) -> float:
        for i, want in fixed.items():
            size = parts[i].size
            if size > 1:  # whole units only: stay inside the bound
                want = (want // size if over else -(-want // size)) * size
            fixing.append(_Problem([parts[i]], want))
        if all(parts[i].size for i in fixed):  # equal units: exactly round(want / size) of them
            return sum(min(max(round(f.target / f.parts[0].size), 0), f.parts[0].n) * f.parts[0].size for f in fixing)
        # ragged blocks: what the selection pruned
        select_many(fixing, comm)
        fixing.clear()
        return sum(_global_sums([parts[i] for i in fixed], [_pruned(parts[i]) for i in fixed], comm))

    if not rounds(lo, hi, target, choose, pin):
        select_many(fixing, comm)


def shard_masks(
    sparsifier: ScoreSparsifier,
    tensors: Mapping[str, Tensor],
    levels: Mapping[str, float],
    applied: MutableMapping[str, Any] | None,
    context: MaskContext,
) -> MutableMapping[str, Any]:
    """:func:`~sparsity_core._engine.score_masks` on row shards (``context.shards``): each
    tensor in ``shards.tensors`` is this rank's rows; the masks are the local slices of the
    masks of one process on the gathered tensors. Every rank calls it with the same names.
    ``applied``: as for ``score_masks`` (each mask applied and handed over, not kept; the local
    bool masks here, the masks of replicated tensors as ``score_masks`` makes them)."""
    from .masks import _check_level, _pruned_now, score_masks

    shards = context.shards
    assert shards is not None
    comm = shards.comm
    nested = not sparsifier.capabilities.regrowth
    current = context.current if nested else {}
    layouts = context.layouts

    def layout(name: str) -> TensorLayout:
        return context.layout(name, tensors[name])

    # the controller's masks in force, packed: read a piece at a time instead of unpacked whole
    packed_current = current.packed() if isinstance(current, MaskView) else {}

    def scorer(name: str) -> Scorer:
        keep = packed_current.get(name) if name in packed_current else current.get(name)
        return Scorer(sparsifier, name, tensors[name], layouts.get(name), keep.to(tensors[name].device) if keep is not None else None)

    def pruned(name: str, units: _Units) -> float:
        if name in packed_current and not isinstance(units, _Blocks):
            return float(packed_current[name].pruned())
        return _pruned_now(current.get(name), units)

    specs = {n: sparsifier.spec_for(n) for n in tensors}
    patterns = {n: tuple(specs[n].parsed_pattern) for n in tensors}  # type: ignore[attr-defined]
    groups: dict[int, list[str]] = {}
    for n in tensors:
        if patterns[n][0] != "n:m" and specs[n].scope == "global":  # type: ignore[attr-defined]
            groups.setdefault(id(specs[n]), []).append(n)
    mixed = [names for names in groups.values() if any(n in shards.tensors for n in names)]
    in_mixed = {n for names in mixed for n in names}
    sharded = [n for n in tensors if n in shards.tensors and n not in in_mixed] + [n for names in mixed for n in names if n in shards.tensors]
    local = [n for n in tensors if n not in shards.tensors and n not in in_mixed]

    masks: dict[str, Tensor] = {}

    def done(name: str, mask: Tensor, fused: bool = False) -> None:
        if applied is None:
            masks[name] = mask
            return
        if not fused:
            apply_mask_(tensors[name], mask)
        applied[name] = mask  # handed over, not kept (see score_masks)

    with torch.no_grad():
        stop = _Stop()
        levels_: dict[str, float] = {}
        plans: dict[str, _Plan] = {}
        parts: dict[str, _Part] = {}
        pruned_now: dict[str, float] = {}

        def setup() -> None:
            levels_.update((n, _check_level(n, levels[n])) for n in tensors if n not in local)
            for n in sharded:
                plans[n] = _plan(n, tensors[n], shards.tensors[n], layout(n), patterns[n])  # type: ignore[arg-type]
                if patterns[n][0] != "n:m" and not plans[n].rule:
                    parts[n] = _part(scorer(n), plans[n], layout(n))
                    pruned_now[n] = pruned(n, parts[n].units)
            for n in in_mixed - set(sharded):
                parts[n] = _replicated_part(scorer(n), patterns[n])  # type: ignore[arg-type]
                pruned_now[n] = pruned(n, parts[n].units)

        stop.run(setup)
        # one collective for the whole update: a rank that failed, refusals, what is pruned now,
        # where the shards are
        row = [stop.flag(comm.rank)]
        for n in sharded:
            plan = plans.get(n)
            if plan is None:  # this rank failed before planning it
                row += [0.0] * 4
                continue
            row += [float(bool(plan.rule)), pruned_now.get(n, 0.0), float(plan.shard.offset), float(plan.rows)]
        table = torch.stack(comm.all_gather(torch.tensor(row, dtype=torch.float64)))
        stop.check(table[:, 0])
        table = table[:, 1:].reshape(comm.world_size, len(sharded), 4)
        _refuse(sharded, plans, table, comm.rank, layout)
        pruned_now.update((n, float(table[:, j, 1].sum())) for j, n in enumerate(sharded))

        problems = [
            _Problem([parts[n]], max(levels_[n] * parts[n].numel, pruned_now[n]))
            for n in sharded
            if n not in in_mixed and patterns[n][0] != "n:m"
        ]
        select_many(problems, comm)
        for names in mixed:
            group = [parts[n] for n in names]
            target = sum(levels_[n] * parts[n].numel for n in names)
            floors = [int(pruned_now[n]) for n in names]
            _select_bounded(group, max(target, float(sum(floors))), specs[names[0]], floors, comm)
        # the collectives are over: what is left is local (an error raised from here on leaves
        # no rank waiting)
        for n in list(parts):
            done(n, parts.pop(n).units.element_mask())  # handed over: let it go
        for n in sharded:
            if patterns[n][0] == "n:m":
                _, a, b = patterns[n]
                if not tensors[n].numel():  # an empty shard (no matrix view to group)
                    done(n, torch.ones(tensors[n].shape, dtype=torch.bool, device=tensors[n].device))
                else:
                    done(n, nm_mask(scorer(n), a, b, levels_[n], applied is not None), fused=True)
    if local:  # replicated tensors selected on their own: as in one process (no collective)
        alone = score_masks(sparsifier, {n: tensors[n] for n in local}, levels, applied, context=replace(context, shards=None))
        if applied is None:
            masks.update(alone)  # type: ignore[arg-type]
    return {n: masks[n] for n in tensors} if applied is None else applied


def _refuse(names: Sequence[str], plans: Mapping[str, _Plan], table: Tensor, comm_rank: int, layouts: Callable[[str], TensorLayout]) -> None:
    """Raise on every rank when a shard breaks its pattern's alignment on any rank."""
    bad = table[:, :, 0] > 0  # ranks x tensors
    if not bool(bad.any()):
        return
    j = int(torch.nonzero(bad.any(0)).view(-1)[0])
    name, plan = names[j], plans[names[j]]
    layout = layouts(name)
    ranks = torch.nonzero(bad[:, j]).view(-1).tolist()
    where = ", ".join(f"rank {r} holds rows {int(table[r, j, 2])}..{int(table[r, j, 2] + table[r, j, 3])}" for r in ranks)
    kind, a, b = plan.pattern
    pattern = {"n:m": f"{a}:{b}", "channel": "channel", "block": f"{a}x{b}"}.get(kind, kind)
    r = ranks[0]
    rule = plan.rule if bad[comm_rank, j] else ""
    if not rule:  # this rank's shard is fine: the rule broken elsewhere, from where that shard is
        shape = tuple(int(x) for x in plan.shard.global_shape)
        rule = _rule(shape, layout, plan.pattern, int(table[r, j, 2]), int(table[r, j, 3])) or f"rank {r}'s shard does not fit the global shape {shape}"
    raise ValueError(
        f"tensor {name!r} (global shape {tuple(plan.shard.global_shape)}, sharded by rows) cannot take pattern "
        f"{pattern!r} on its shards: {where}; {rule}"
    )
