"""Mask selection for every ``ScoreSparsifier``: each pattern and scope, written once.

Vocabulary
- A *unit* is what is kept or pruned as a whole: an element (``unstructured``) or an aligned block
  (``"HxW"`` over the 2-D view). ``N:M`` is a rule inside each group of M and has its own path.
- The *2-D view* of a tensor: a 0-D or 1-D tensor is ``1 x n``; anything else is
  ``shape[0] x (product of the rest)`` (a conv weight is ``out x (in*kh*kw)``).

How a selection stays near one pass over the weights
- Scores are produced in float32 pieces of :data:`CHUNK` elements; when the sparsifier declares
  ``elementwise = True`` a piece is scored on its own, so the scores of a whole tensor (let alone a
  model) never exist at once. Other sparsifiers are scored one tensor at a time.
- A small selection (at most :data:`EXACT` units) is done exactly with ``kthvalue``.
- A large one samples :data:`SAMPLE` unit scores (a fixed generator, so results are
  deterministic), brackets the threshold ``[lo, hi)`` at ``Z`` standard errors of the sampled
  quantile, and makes *one* pass: units scoring ``>= hi`` are kept, those in the bracket are kept
  aside (index and score, typically under 1 % of the units), and a ``kthvalue`` among them fixes
  the exact cut. If the bracket misses (odds well under one in a million) or holds too many units
  (massive ties), the exact path runs instead.
- Ties are broken by position: among equal scores, the earlier unit (tensor order, then flat
  index) is pruned first. A target is met exactly: ``round(level * n)`` units for equal-sized
  units; for ragged blocks, the prefix whose element count is closest to the target.
- On CPU the elementwise kernels run through NumPy views of the torch tensors (zero copy): its
  comparisons, counts and ``flatnonzero`` are many times faster than torch's for bool outputs.
  Every "NumPy or torch?" choice goes through :func:`_numpy_kernels` (see :data:`NUMPY_KERNELS`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Final

import numpy as np
import torch
import torch.nn.functional as F

from ._bounds import select_bounded
from ._layers import TensorLayout, generic_layout

if TYPE_CHECKING:
    from ._base import ScoreSparsifier, Sparsifier
    from ._contract import MaskContext

#: Elements scored at a time: large enough to amortise per-call overhead, small enough for cache.
CHUNK: Final = 1 << 18
#: Selections over at most this many units are done exactly in one go.
EXACT: Final = 1 << 18
#: Units sampled to bracket the threshold of a larger selection.
SAMPLE: Final = 1 << 18
#: Half-width of the bracket, in standard errors of the sampled quantile.
Z: Final = 5.0
#: Tensors of at most this many elements are selected together (one sort for all of them) in
#: layer scope: with many small tensors the per-tensor overhead, not the data, is the cost.
SMALL: Final = 4096

Tensor = torch.Tensor

#: Whether CPU tensors take the NumPy kernels. Off, every tensor takes the torch kernels that run
#: on accelerators: the switch exists so that those code paths can be tested on CPU.
NUMPY_KERNELS: bool = True


# -- small kernels (NumPy on CPU, torch elsewhere) ----------------------------------------------
def _numpy_kernels(t: Tensor) -> bool:
    """Whether ``t`` takes the NumPy kernels (the one "NumPy or torch?" decision, see :data:`NUMPY_KERNELS`)."""
    return t.is_cpu and NUMPY_KERNELS


def _np(t: Tensor) -> np.ndarray:
    return t.numpy()


def _all_finite(s: Tensor) -> bool:
    if _numpy_kernels(s):
        return bool(np.isfinite(_np(s)).all())
    return bool(torch.isfinite(s).all())


def _ge_into(s: Tensor, value: float, out: Tensor) -> None:
    if _numpy_kernels(s):
        np.greater_equal(_np(s), value, out=_np(out))
    else:
        torch.ge(s, value, out=out)


def _count(b: Tensor) -> int:
    return int(np.count_nonzero(_np(b))) if _numpy_kernels(b) else int(b.sum())


def _in_bracket(s: Tensor, kept: Tensor, lo: float) -> Tensor:
    """Flat indices of ``lo <= s`` among the units not already ``kept`` (``kept`` is ``s >= hi``)."""
    if _numpy_kernels(s):
        band = np.greater_equal(_np(s), lo)
        np.logical_xor(band, _np(kept), out=band)
        return torch.from_numpy(np.flatnonzero(band))
    return torch.nonzero((s >= lo) ^ kept).view(-1)


_NUMPY_FLOATS: Final = (torch.float32, torch.float64, torch.float16)


def apply_mask_(tensor: Tensor, mask: Tensor) -> None:
    """Zero the pruned elements of ``tensor`` in place (``mask``: bool, same shape, True = keep).

    On CPU one NumPy multiply by the bool mask, several times faster than torch's bool-to-float
    promotion; elsewhere (and for bf16) ``mul_``.
    """
    if _numpy_kernels(tensor) and mask.is_cpu and tensor.dtype in _NUMPY_FLOATS:
        array = tensor.detach().numpy()
        np.multiply(array, mask.numpy(), out=array)
    else:
        tensor.detach().mul_(mask)


def view2d(t: Tensor) -> Tensor:
    """The 2-D view described in the module docstring (a view when ``t`` is contiguous)."""
    if t.dim() <= 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def _kth(values: Tensor, k: int) -> float:
    """The k-th smallest (1-based) of 1-D ``values``."""
    if not _numpy_kernels(values):
        return float(torch.kthvalue(values, k).values)
    a = _np(values)
    # In gradual pruning most recomputes score weights that earlier masks zeroed: a mass of
    # equal minima, on which NumPy's introselect degrades about 25x. Step over that mass.
    low = a.min()
    n_low = int(np.count_nonzero(a == low))
    if n_low >= k:
        return float(low)
    if n_low > a.size >> 4:
        rest = a[a != low]
        return float(np.partition(rest, k - n_low - 1)[k - n_low - 1])
    return float(np.partition(a, k - 1)[k - 1])


def _keep_above_kth(values: Tensor, n_prune: int) -> Tensor:
    """Keep mask over 1-D ``values``: prune the ``n_prune`` lowest, earlier positions first on ties."""
    n = values.numel()
    if n_prune <= 0:
        return torch.ones(n, dtype=torch.bool, device=values.device)
    if n_prune >= n:
        return torch.zeros(n, dtype=torch.bool, device=values.device)
    thr = _kth(values, n_prune)
    if _numpy_kernels(values):  # NumPy's bool kernels are several times faster than torch's here
        a = _np(values)
        keep_np = a > thr
        ties_np = np.flatnonzero(a == thr)
        below = n - int(np.count_nonzero(keep_np)) - ties_np.size
        keep_np[ties_np[n_prune - below :]] = True
        return torch.from_numpy(keep_np)
    keep = values > thr
    ties = torch.nonzero(values == thr).view(-1)
    below = n - _count(keep) - ties.numel()
    keep[ties[n_prune - below :]] = True
    return keep


def rank_keep(x: Tensor, n_prune: int, out: Tensor) -> None:
    """Within each row of ``x`` (G x K scores) keep all but the ``n_prune`` lowest (ties: the
    earlier column is pruned first); writes the bool result into ``out`` (G x K, may be strided)."""
    g, k = x.shape
    if n_prune <= 0 or k == 0:
        out.fill_(True)
        return
    if n_prune >= k:
        out.fill_(False)
        return
    if k <= 8 and _numpy_kernels(x) and x.is_contiguous() and out.is_contiguous() and x.dtype == torch.float32:
        _rank_keep_flat(_np(x).reshape(-1), k, n_prune, _np(out).reshape(-1))
        return
    if k > 8:  # the pairwise rank costs O(K) per element; sort wins for wide groups
        order = torch.argsort(x, dim=1, stable=True)
        keep = torch.ones(g, k, dtype=torch.bool, device=x.device)
        keep.scatter_(1, order[:, :n_prune], False)
        out.copy_(keep)
        return
    # rank_i = #{j: x_j < x_i} + #{j < i: x_j == x_i}; prune rank < n_prune. Column by column, so
    # every operation is one contiguous vector of G.
    rank_keep_columns([x[:, i].contiguous() for i in range(k)], n_prune, out)


@functools.lru_cache(maxsize=64)
def _phase(k: int, s: int, n: int) -> np.ndarray:
    """uint8 over ``n`` flat positions of groups of ``k``: the column index (``s == 0``), else 1
    where the column plus ``s`` is still inside the group."""
    col = np.arange(n, dtype=np.int64) % k
    return (col if s == 0 else (col + s < k)).astype(np.uint8)


def _rank_keep_flat(x: np.ndarray, k: int, n_prune: int, out: np.ndarray) -> None:
    """:func:`rank_keep` on CPU over flat, contiguous groups of ``k``: the pair of columns
    ``(c, c + s)`` of every group is compared at once by comparing the flat scores with
    themselves shifted by ``s``, so every operation is one contiguous vector and the result is
    written in the tensor's own layout (no split into columns, no strided write-back)."""
    n = x.size
    ranks = _phase(k, 0, n).copy()
    less = np.empty(n, dtype=bool)
    for s in range(1, k):
        c = less[: n - s]
        np.less(x[s:], x[:-s], out=c)
        cu = c.view(np.uint8)
        np.bitwise_and(cu, _phase(k, s, n)[: n - s], out=cu)
        np.add(ranks[: n - s], cu, out=ranks[: n - s])
        np.subtract(ranks[s:], cu, out=ranks[s:])
    np.greater_equal(ranks, n_prune, out=out)


def rank_keep_columns(cols: list[Tensor], n_prune: int, out: Tensor) -> None:
    """:func:`rank_keep` given the K columns of the scores as contiguous vectors."""
    k, g = len(cols), cols[0].numel()
    if _numpy_kernels(cols[0]):
        arrays = [_np(c) for c in cols]
        ranks = [np.full(g, i, np.uint8) for i in range(k)]
        less = np.empty(g, dtype=bool)
        lu = less.view(np.uint8)
        for i in range(k):
            for j in range(i + 1, k):
                np.less(arrays[j], arrays[i], out=less)
                np.add(ranks[i], lu, out=ranks[i])
                np.subtract(ranks[j], lu, out=ranks[j])
        on = _np(out)
        for i in range(k):
            np.greater_equal(ranks[i], n_prune, out=on[:, i])
        return
    tranks = [torch.full((g,), i, dtype=torch.uint8, device=cols[0].device) for i in range(k)]
    for i in range(k):
        for j in range(i + 1, k):
            lt = (cols[j] < cols[i]).to(torch.uint8)
            tranks[i] += lt
            tranks[j] -= lt
    for i in range(k):
        out[:, i] = tranks[i] >= n_prune


# -- scores ------------------------------------------------------------------------------------
class Scorer:
    """Float32 importance of one tensor, whole or in pieces, checked for NaN/inf.

    ``layout`` orients the tensor: :meth:`rows` reads rows of its ``[outputs, reduction]`` matrix
    view (see :mod:`._layers`). ``keep``, the current mask (contract v2's nested policy), forces
    every currently pruned element to score ``-inf``: it is pruned again first, and the level is
    still met exactly by the selection."""

    __slots__ = ("_flat", "_full", "elementwise", "keep", "layout", "name", "sparsifier", "tensor")

    def __init__(
        self,
        sparsifier: ScoreSparsifier,
        name: str,
        tensor: Tensor,
        layout: TensorLayout | None = None,
        keep: Tensor | None = None,
    ) -> None:
        self.sparsifier = sparsifier
        self.name = name
        self.tensor = tensor.detach()
        self.layout = layout if layout is not None else generic_layout()
        self.keep = keep if keep is None or not bool(keep.all()) else None
        self.elementwise = bool(getattr(sparsifier, "elementwise", False))
        self._full: Tensor | None = None
        self._flat: Tensor | None = None

    def _score(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        s = self.sparsifier.score(self.name, x)
        if not isinstance(s, torch.Tensor) or s.shape != x.shape:
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(
                f"sparsifier {self.sparsifier.name!r}: score({self.name!r}, tensor) must return a "
                f"tensor shaped like its input {tuple(x.shape)}, got {got}"
            )
        s = s.detach().to(torch.float32)
        if not _all_finite(s):
            raise ValueError(
                f"tensor {self.name!r} has NaN or inf values (or importance scores): cannot choose "
                f"a mask for it; check the weights (sparsifier {self.sparsifier.name!r})"
            )
        if keep is not None:
            if s.data_ptr() == x.data_ptr() or s._base is not None:  # never write into the caller's tensor
                s = s.clone()
            s.masked_fill_(~keep.to(s.device), -math.inf)
        return s

    @property
    def flat(self) -> Tensor:
        if self._flat is None:
            self._flat = self.tensor.reshape(-1)
        return self._flat

    def full(self) -> Tensor:
        """The whole score tensor (kept until :meth:`release`)."""
        if self._full is None:
            self._full = self._score(self.tensor, self.keep).contiguous()
        return self._full

    def piece(self, start: int, end: int) -> Tensor:
        if self.elementwise:
            keep = None if self.keep is None else self.keep.reshape(-1)[start:end]
            return self._score(self.flat[start:end], keep)
        return self.full().view(-1)[start:end]

    def rows(self, r0: int, r1: int) -> Tensor:
        """Scores of rows ``r0:r1`` of the matrix view."""
        if self.elementwise:
            keep = None if self.keep is None else self.layout.matrix(self.keep)[r0:r1]
            return self._score(self.layout.matrix(self.tensor)[r0:r1], keep)
        return self.layout.matrix(self.full())[r0:r1]

    def at(self, index: Tensor) -> Tensor:
        if self.elementwise:
            keep = None if self.keep is None else self.keep.reshape(-1)[index.to(self.keep.device)]
            return self._score(self.flat[index.to(self.flat.device)], keep).cpu()
        return self.full().view(-1)[index.to(self._full.device)].cpu()  # type: ignore[union-attr]

    @property
    def shape2d(self) -> tuple[int, int]:
        m = self.layout.matrix(self.tensor)
        return m.shape[0], m.shape[1]

    def release(self) -> None:
        self._full = None


# -- units -------------------------------------------------------------------------------------
class _Units:
    """What is kept or pruned as a whole in one tensor, and a flat bool keep mask over them."""

    n: int
    size: int  # elements per unit when all are equal, else 0 (see sizes())
    mask: Tensor

    def pieces(self) -> Iterator[tuple[int, Tensor]]:
        raise NotImplementedError

    def at(self, index: Tensor) -> Tensor:
        raise NotImplementedError

    def sizes(self, start: int, end: int) -> Tensor:
        raise NotImplementedError

    def element_mask(self) -> Tensor:
        raise NotImplementedError

    def release(self) -> None:
        pass


class _Elements(_Units):
    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.n = scorer.tensor.numel()
        self.size = 1
        self.mask = torch.empty(self.n, dtype=torch.bool, device=scorer.tensor.device)

    def pieces(self) -> Iterator[tuple[int, Tensor]]:
        for start in range(0, self.n, CHUNK):
            yield start, self.scorer.piece(start, min(self.n, start + CHUNK))

    def at(self, index: Tensor) -> Tensor:
        return self.scorer.at(index)

    def element_mask(self) -> Tensor:
        return self.mask.view(self.scorer.tensor.shape)

    def release(self) -> None:
        self.scorer.release()


class _Blocks(_Units):
    """Aligned ``h x w`` blocks of the 2-D view, scored by the mean score of their elements
    (ragged edge blocks: the mean over the elements they have)."""

    def __init__(self, scorer: Scorer, h: int, w: int) -> None:
        self.scorer = scorer
        self.h, self.w = h, w
        self.rows, self.cols = scorer.shape2d
        self.rb, self.cb = -(-self.rows // h), -(-self.cols // w)
        self.n = self.rb * self.cb
        ragged = self.rows % h or self.cols % w
        self.size = 0 if ragged else h * w
        self.mask = torch.empty(self.n, dtype=torch.bool, device=scorer.tensor.device)
        self._means: Tensor | None = None
        self._sizes: Tensor | None = None

    def means(self) -> Tensor:
        if self._means is None:
            self._means = block_means(self.scorer, self.h, self.w).view(-1)
        return self._means

    def pieces(self) -> Iterator[tuple[int, Tensor]]:
        means = self.means()
        for start in range(0, self.n, CHUNK):
            yield start, means[start : start + CHUNK]

    def at(self, index: Tensor) -> Tensor:
        return self.means()[index.to(self.means().device)].cpu()

    def sizes(self, start: int, end: int) -> Tensor:
        if self._sizes is None:
            dev = self.mask.device
            rs = torch.full((self.rb,), self.h, dtype=torch.int64, device=dev)
            rs[-1] = self.rows - (self.rb - 1) * self.h
            cs = torch.full((self.cb,), self.w, dtype=torch.int64, device=dev)
            cs[-1] = self.cols - (self.cb - 1) * self.w
            self._sizes = (rs[:, None] * cs[None, :]).view(-1)
        return self._sizes[start:end]

    def element_mask(self) -> Tensor:
        m = expand_blocks(self.mask.view(self.rb, self.cb), self.h, self.w, self.rows, self.cols)
        layout = self.scorer.layout
        return m.view(self.scorer.tensor.shape) if layout.is_identity(self.scorer.tensor.dim()) else layout.from_matrix(m, self.scorer.tensor.shape)

    def release(self) -> None:
        self._means = None
        self.scorer.release()


def block_means(scorer: Scorer, h: int, w: int) -> Tensor:
    """Mean score of each aligned ``h x w`` block of the 2-D view (rb x cb), computed band by band."""
    rows, cols = scorer.shape2d
    band = h * max(1, CHUNK // max(1, h * cols))
    parts = []
    for r0 in range(0, rows, band):
        s = scorer.rows(r0, min(rows, r0 + band))
        # ceil_mode without padding averages a ragged edge window over the elements it has
        parts.append(F.avg_pool2d(s[None, None], (h, w), stride=(h, w), ceil_mode=True)[0, 0])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def expand_blocks(keep: Tensor, h: int, w: int, rows: int, cols: int) -> Tensor:
    """A (rows x cols) element mask from a per-block mask (rb x cb)."""
    dev = keep.device
    by_row = keep.index_select(0, torch.arange(rows, device=dev) // h)
    return by_row.index_select(1, torch.arange(cols, device=dev) // w)


# -- selection ---------------------------------------------------------------------------------
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
                u.mask.fill_(k == 0)
            return
    if total <= EXACT or not _select_bracketed(units, target, size):
        _select_exact(units, target, size)
    for u in units:
        u.release()


def _select_exact(units: Sequence[_Units], target: float, size: int) -> None:
    scores = torch.cat([s.to(units[0].mask.device) for u in units for _, s in u.pieces()])
    if size:
        keep = _keep_above_kth(scores, min(max(round(target / size), 0), scores.numel()))
    else:
        weights = torch.cat([u.sizes(0, u.n) if not u.size else torch.full((u.n,), u.size, device=u.mask.device) for u in units])
        order = torch.argsort(scores, stable=True)
        cum = torch.cat([weights.new_zeros(1), torch.cumsum(weights[order], 0)])
        n_prune = int(torch.argmin((cum.double() - target).abs()))
        keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
        keep[order[:n_prune]] = False
    offset = 0
    for u in units:
        u.mask.copy_(keep[offset : offset + u.n])
        offset += u.n


def _select_bracketed(units: Sequence[_Units], target: float, size: int) -> bool:
    """The sampled-bracket selection; returns False (nothing decided) when the bracket misses."""
    total = sum(u.n for u in units)
    # stratified: one random unit in each of SAMPLE equal strides (sorted, so gathers stream)
    # (made a slice at a time, the same values as in one go: float64 temporaries of the whole
    # sample would be several times its final size, and the sample phase is a peak of its own)
    gen = torch.Generator().manual_seed(0)
    n_sample = min(SAMPLE, total)
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
    spread = Z * math.sqrt(n_sample * q * (1 - q))
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
            m = u.mask[start : start + s.numel()]
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
        pos = pos_buf[first:last][keep[first:last]].long()
        units[i].mask[pos.to(units[i].mask.device)] = True
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
            m = u.mask[start : start + s.numel()]
            _ge_into(s, value, m)
            below += s.numel() - _count(m)
            np.greater(_np(s), value, out=_np(m)) if _numpy_kernels(s) else m.logical_and_(s != value)
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
            u.mask[ties[remaining:].to(u.mask.device) + start] = True
            remaining = 0
        if len(units) > 1:
            u.release()
    return remaining == 0


# -- N:M ---------------------------------------------------------------------------------------
def nm_mask(scorer: Scorer, n: int, m: int, level: float, apply: bool = False) -> Tensor:
    """Keep ``n`` of every ``m`` consecutive weights along the reduction axis (the last dim of the
    matrix view, see :mod:`._layers`).

    At an intermediate ``level`` (gradual N:M) ``round(level * m)`` of each group are pruned, at
    most ``m - n``. A ragged tail of ``g < m`` columns prunes as many, at most ``g - n``.
    With ``apply``, each piece of the tensor is masked as soon as its mask is known, while it is
    still in cache (a contiguous tensor in its natural layout; otherwise once at the end).
    """
    tensor = scorer.tensor
    rows, cols = scorer.shape2d
    prune = min(round(level * m), m - n)
    natural = scorer.layout.is_identity(tensor.dim())
    if prune <= 0:
        return torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device)
    mask = torch.empty(rows, cols, dtype=torch.bool, device=tensor.device)
    full = cols // m * m
    fused = apply and natural and tensor.is_contiguous()
    if full == cols and natural:  # groups are runs of m in the flat tensor: score it in flat pieces
        out = mask.view(-1)
        step = max(m, CHUNK // m * m)
        for start in range(0, out.numel(), step):
            end = min(out.numel(), start + step)
            rank_keep(scorer.piece(start, end).view(-1, m), prune, out[start:end].view(-1, m))
            if fused:
                apply_mask_(tensor.view(-1)[start:end], out[start:end])
        scorer.release()
        if apply and not fused:
            apply_mask_(tensor, mask.view(tensor.shape))
        return mask.view(tensor.shape)
    tail_prune = min(prune, max(cols - full - n, 0))
    band = max(1, CHUNK // max(1, cols))
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        s = scorer.rows(r0, r1)
        if full:
            out = mask[r0:r1, :full]
            groups = s[:, :full].reshape(-1, m)
            if out.is_contiguous():
                rank_keep(groups, prune, out.view(-1, m))
            else:
                tmp = torch.empty(groups.shape, dtype=torch.bool, device=mask.device)
                rank_keep(groups, prune, tmp)
                out.copy_(tmp.view(r1 - r0, full))
        if full < cols:
            tail = torch.empty(r1 - r0, cols - full, dtype=torch.bool, device=mask.device)
            rank_keep(s[:, full:].contiguous(), tail_prune, tail)
            mask[r0:r1, full:] = tail
        if fused:
            apply_mask_(view2d(tensor)[r0:r1], mask[r0:r1])
    scorer.release()
    result = mask.view(tensor.shape) if natural else scorer.layout.from_matrix(mask, tensor.shape)
    if apply and not fused:
        apply_mask_(tensor, result)
    return result


# -- entry point -------------------------------------------------------------------------------
def score_masks(
    sparsifier: ScoreSparsifier,
    tensors: Mapping[str, Tensor],
    levels: Mapping[str, float],
    applied: dict[str, Tensor] | None = None,
    *,
    context: MaskContext | None = None,
) -> dict[str, Tensor]:
    """Bool keep masks for a ``ScoreSparsifier``: names are grouped by their resolved spec
    (overrides may change level, pattern and scope per name); ``global`` groups share one
    threshold, everything else is selected tensor by tensor.

    With ``applied`` (a dict), each tensor is also masked in place as soon as its mask is final
    (N:M: piece by piece, while the piece is in cache) and its mask is recorded there at once, so
    that a caller interrupted by an error knows which tensors already carry their new mask.

    ``context`` orients each tensor (N:M and blocks along its reduction axis) and, unless the
    sparsifier declares regrowth, keeps its currently pruned elements pruned (nested masks): they
    score ``-inf``, and a level below what is already pruned is raised to it.
    """
    masks: dict[str, Tensor] = {}
    groups: dict[int, list[str]] = {}
    apply = applied is not None
    layouts = context.layouts if context is not None else {}
    nested = context is not None and not sparsifier.capabilities.regrowth
    current = context.current if nested else {}  # type: ignore[union-attr]

    def done(name: str, mask: Tensor, fused: bool = False) -> None:
        masks[name] = mask
        if applied is not None:
            if not fused:
                apply_mask_(tensors[name], mask)
            applied[name] = mask

    def scorer(name: str) -> Scorer:
        keep = current.get(name)
        return Scorer(sparsifier, name, tensors[name], layouts.get(name), keep.to(tensors[name].device) if keep is not None else None)

    def pruned_now(name: str, units: _Units | None = None) -> float:
        """Elements the current mask prunes; for blocks and channels, the elements of every unit
        holding a pruned element (the whole unit is pruned again, so it counts whole)."""
        keep = current.get(name)
        if keep is None:
            return 0
        if not isinstance(units, _Blocks):
            return keep.numel() - _count(keep.contiguous())
        hit = units.scorer.layout.matrix(~keep.to(units.mask.device)).float()
        hit = F.max_pool2d(hit[None, None], (units.h, units.w), stride=(units.h, units.w), ceil_mode=True)[0, 0].reshape(-1) > 0
        return float(int(hit.sum()) * units.size) if units.size else float(units.sizes(0, units.n)[hit].sum())

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
            elif pattern.kind == "unstructured" and tensor.numel() <= SMALL:
                small.append((name, max(level * tensor.numel(), pruned_now(name))))
            else:
                units = _units(scorer(name), pattern)
                select([units], max(level * tensor.numel(), pruned_now(name, units)))
                done(name, units.element_mask())
        if small:
            small_names = [n for n, _ in small]
            small_masks = _select_small(
                sparsifier, [tensors[n] for n in small_names], small_names, [current.get(n) for n in small_names], [t for _, t in small]
            )
            for (name, _), mask in zip(small, small_masks):
                masks[name] = mask
            if applied is not None:
                _mask_many([tensors[n] for n, _ in small], small_masks)
                applied.update((n, m) for (n, _), m in zip(small, small_masks))
        for names in groups.values():
            group = [_units(scorer(n), sparsifier.spec_for(n).parsed_pattern) for n in names]  # type: ignore[attr-defined]
            target = sum(levels[n] * tensors[n].numel() for n in names)
            floors = [int(pruned_now(n, u)) for n, u in zip(names, group)]  # per-tensor bounds (no layer emptied): _bounds.py
            select_bounded(group, max(target, sum(floors)), sparsifier.spec_for(names[0]), floors)
            for n, units in zip(names, group):
                done(n, units.element_mask())
    return {n: masks[n] for n in tensors}


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


def _units(scorer: Scorer, pattern: object) -> _Units:
    kind, a, b = pattern  # type: ignore[misc]
    if scorer.tensor.numel() == 0:  # nothing to keep or prune, and no matrix view to cut in blocks
        return _Elements(scorer)
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
    return _Elements(scorer)


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


# -- data_norm (the seed's DataNormSparsifier) -------------------------------------------------
class _BandMeans(_Units):
    """The blocks of a data_norm tensor, scored by their mean norm, each one unit of weight (torch.ao
    counts blocks). The means are made band by band of rows whenever :func:`select` reads them and
    never exist whole: the selection's one pass recomputes them from the weights (no dearer than
    reading them back), and its sample gathers the few elements of each sampled block."""

    def __init__(self, x2: Tensor, block: tuple[int, int], band: int, norms: Callable[[int, int], Tensor], norm: str) -> None:
        self.x2, self.block, self.band, self.norms, self.norm = x2, block, band, norms, norm
        self.rows, self.cols = x2.shape
        h, w = block
        self.rb, self.cb = -(-self.rows // h), -(-self.cols // w)
        self.n = self.rb * self.cb
        self.size = 1
        self.mask = torch.empty(self.n, dtype=torch.bool, device=x2.device)

    def pieces(self) -> Iterator[tuple[int, Tensor]]:
        h = self.block[0]
        for r0 in range(0, self.rows, self.band):
            r1 = min(self.rows, r0 + self.band)
            out = torch.empty(-(-(r1 - r0) // h), self.cb, dtype=torch.float32, device=self.x2.device)
            block_means_into(self.norms(r0, r1), self.block, out)
            yield r0 // h * self.cb, out.view(-1)

    def at(self, index: Tensor) -> Tensor:
        """Means of the blocks at flat ``index``: on CPU for blocks of up to 16 elements, gathered
        and added in :func:`block_means_into`'s order (bit for bit its values); otherwise from
        the means of the bands that hold them. Either way the selection's cut is exact: the
        sample only places its bracket."""
        h, w = self.block
        if not _numpy_kernels(self.x2) or h * w > 16 or self.x2.dtype not in _NUMPY_FLOATS:
            return self._at_by_bands(index)
        a, rows, cols = _np(self.x2), self.rows, self.cols
        full = not (rows % h or cols % w)
        out = np.empty(index.numel(), dtype=np.float32)
        for i0 in range(0, index.numel(), 1 << 14):  # a slice at a time: small temporaries
            idx = _np(index[i0 : i0 + (1 << 14)])
            total = out[i0 : i0 + idx.size]
            if a.flags.c_contiguous and not cols % w:
                # each block row is w contiguous elements: one row of a (rows * cb) x w view,
                # the row of block (br, bc) at height i being (br * h + i) * cb + bc
                segs = a.reshape(rows * self.cb, w)
                r0 = idx // self.cb * h if h > 1 else idx
                first = idx + (r0 - idx // self.cb) * self.cb if h > 1 else idx
                for i in range(h):
                    seg = first + i * self.cb if i else first
                    if i and rows % h:  # a ragged last band: rows past the end read the last
                        np.minimum(seg, rows * self.cb - 1, out=seg)
                    v = np.take(segs, seg, axis=0).astype(np.float32, copy=False)
                    v = np.abs(v, out=v) if self.norm == "L1" else np.multiply(v, v, out=v)
                    if i and rows % h:  # norms are >= +0: adding +0 for a missing row is exact
                        v[r0 + i >= rows] = 0.0
                    if i == 0:
                        total[:] = v[:, 0]
                    for j in range(0 if i else 1, w):
                        np.add(total, v[:, j], out=total)
                count = np.minimum(rows - r0, h) * w if rows % h else h * w
                np.divide(total, np.asarray(count, dtype=np.float32), out=total)
                continue
            br, bc = np.divmod(idx, self.cb)
            r0, c0 = br * h, bc * w
            for i in range(h):
                r = r0 + i if full else np.minimum(r0 + i, rows - 1)
                for j in range(w):
                    c = c0 + j if full else np.minimum(c0 + j, cols - 1)
                    v = a[r, c].astype(np.float32, copy=False)
                    v = np.abs(v, out=v) if self.norm == "L1" else np.multiply(v, v, out=v)
                    if not full:  # norms are >= +0: adding +0 for a missing element is exact
                        v[(r0 + i >= rows) | (c0 + j >= cols)] = 0.0
                    if i == 0 and j == 0:
                        total[:] = v
                    else:
                        np.add(total, v, out=total)
            count = np.minimum(rows - r0, h) * np.minimum(cols - c0, w) if not full else h * w
            np.divide(total, np.asarray(count, dtype=np.float32), out=total)
        return torch.from_numpy(out)

    def _at_by_bands(self, index: Tensor) -> Tensor:
        out = torch.empty(index.numel(), dtype=torch.float32)
        for start, s in self.pieces():
            lo, hi = torch.searchsorted(index, torch.tensor([start, start + s.numel()])).tolist()
            if hi > lo:
                out[lo:hi] = s[(index[lo:hi] - start).to(s.device)].cpu()
        return out


def data_norm_view(tensor: Tensor) -> Tensor:
    """torch.ao's 2-D view: squeeze; 0-D/1-D -> 1 x n; beyond 2-D (where torch.ao raises) the
    usual out x rest view."""
    squeezed = tensor.squeeze()
    if squeezed.dim() <= 1:
        return tensor.reshape(1, -1)
    if squeezed.dim() == 2:
        return squeezed
    return view2d(tensor)


def block_means_into(n: Tensor, block: tuple[int, int], out: Tensor) -> None:
    """Mean of each aligned block of ``n`` (ragged edge blocks: over the elements they have) into
    ``out`` (blocks of rows x blocks of cols), bit for bit what ``avg_pool2d(ceil_mode=True)``
    gives: on CPU, for blocks of up to 16 elements, by adding the strided element planes in its
    order (row by row, left to right) and dividing by the count, with no padded copy."""
    h, w = block
    if not _numpy_kernels(n) or h * w > 16:
        out.copy_(F.avg_pool2d(n[None, None], block, stride=block, ceil_mode=True)[0, 0])
        return
    a, o = _np(n), _np(out)
    rows, cols = a.shape
    np.copyto(o, a[::h, ::w])
    for i in range(h):
        for j in range(w):
            if i or j:
                part = a[i::h, j::w]
                dst = o[: part.shape[0], : part.shape[1]]
                np.add(dst, part, out=dst)
    rf, cf = rows // h, cols // w  # blocks of full height / width
    np.divide(o[:rf, :cf], h * w, out=o[:rf, :cf])
    if cf < o.shape[1]:
        np.divide(o[:rf, cf:], h * (cols - cf * w), out=o[:rf, cf:])
    if rf < o.shape[0]:
        np.divide(o[rf:, :cf], (rows - rf * h) * w, out=o[rf:, :cf])
        if cf < o.shape[1]:
            np.divide(o[rf:, cf:], (rows - rf * h) * (cols - cf * w), out=o[rf:, cf:])


def _expand_into(blocks: Tensor, h: int, w: int, out: Tensor) -> None:
    """Write the element mask of per-block ``blocks`` into ``out`` (a contiguous band of rows)."""
    rows, cols = out.shape
    word = {2: np.uint16, 4: np.uint32, 8: np.uint64}.get(w) if np.little_endian else None
    if h == 1 and word is not None and cols == blocks.shape[1] * w and _numpy_kernels(out) and out.is_contiguous():
        # each block's bool byte times 0x0101..01 is its w element bytes at once
        ones = word(int.from_bytes(b"\x01" * w, "little"))
        np.multiply(_np(blocks).reshape(-1).view(np.uint8), ones, out=_np(out).reshape(-1).view(word))
        return
    out.copy_(expand_blocks(blocks, h, w, rows, cols))


def data_norm_mask(
    name: str,
    tensor: Tensor,
    level: float,
    block: tuple[int, int],
    zeros_per_block: int,
    norm: str,
    apply: bool = False,
) -> Tensor:
    """The seed's ``DataNormSparsifier.update_mask``, vectorised and band by band: prune the
    ``round(level * blocks)`` blocks of lowest mean norm (|x| or x*x), and inside each of them the
    ``zeros_per_block`` elements of lowest norm (a ragged block: at most all it has).

    Block means are made band by band as the selection reads them (see :class:`_BandMeans`) and
    the per-block keep mask is kept inside the element mask's own buffer, so nothing the size of
    the tensor is allocated beyond the element mask; that is then written band by band over the
    block mask and, with ``apply``, each band of the tensor is masked while it is in cache."""
    x2 = data_norm_view(tensor.detach())
    rows, cols = x2.shape
    h, w = block
    per_block = h * w
    band = h * max(1, CHUNK // max(1, h * cols))
    rb, cb = -(-rows // h), -(-cols // w)

    # one buffer for the norms of every band (a fresh one per band would leave the heap in holes)
    buf = torch.empty(min(rows, band) * cols, dtype=torch.float32, device=tensor.device)

    def norms(r0: int, r1: int) -> Tensor:
        n = buf[: (r1 - r0) * cols].view(r1 - r0, cols)
        x = x2[r0:r1]
        if x.dtype != torch.float32:
            x = n.copy_(x)
        torch.abs(x, out=n) if norm == "L1" else torch.mul(x, x, out=n)
        # the sum is finite when every norm is (it is checked one by one only when it is not)
        if not (math.isfinite(float(n.sum())) or _all_finite(n)):
            raise ValueError(f"tensor {name!r} has NaN or inf values: cannot choose a data_norm mask for it")
        return n

    with torch.no_grad():
        mask = torch.empty(rows, cols, dtype=torch.bool, device=tensor.device)
        units = _BandMeans(x2, block, band, norms, norm)
        # The per-block keep mask lives in the last rb * cb bytes of the element mask: no
        # allocation of its own (that would leave a hole in the heap under each element mask).
        # Band by band, the element mask of rows r0:r1 ends at r1 * cols, at or before the start
        # of the blocks of the rows after r1 (as many blocks as elements remain, at most), and
        # each band reads its blocks whole before writing its rows.
        units.mask = mask.view(-1)[rows * cols - units.n :]
        if round(level * units.n) <= 0 or round(level * units.n) >= units.n:
            for r0 in range(0, rows, band):  # select reads no means here: still refuse NaN/inf
                norms(r0, min(rows, r0 + band))
        select([units], level * units.n)
        kept_blocks = units.mask.view(rb, cb)
        del units
        if zeros_per_block <= 0:
            return mask.fill_(True).view(tensor.shape)
        fused = apply and tensor.is_contiguous()  # then x2 is a view of the tensor
        for r0 in range(0, rows, band):
            r1 = min(rows, r0 + band)
            nb = -(-(r1 - r0) // h)
            blocks = kept_blocks[r0 // h : r0 // h + nb]
            if zeros_per_block >= per_block:
                _expand_into(blocks, h, w, mask[r0:r1])
            else:
                n = norms(r0, r1)
                if (r1 - r0) % h or cols % w:  # ragged: pad with +inf, which ranks after every norm
                    padded = torch.full((nb * h, cb * w), math.inf, device=n.device)
                    padded[: r1 - r0, :cols] = n
                    n = padded
                groups = n.view(nb, h, cb, w).permute(0, 2, 1, 3).reshape(nb * cb, per_block)
                inside = torch.empty(nb * cb, per_block, dtype=torch.bool, device=mask.device)
                rank_keep(groups, zeros_per_block, inside)
                if _numpy_kernels(inside):
                    np.logical_or(_np(inside), _np(blocks.reshape(-1, 1)), out=_np(inside))
                else:
                    inside |= blocks.reshape(-1, 1)
                full = inside.view(nb, cb, h, w).permute(0, 2, 1, 3).reshape(nb * h, cb * w)
                mask[r0:r1] = full[: r1 - r0, :cols]
            if fused:
                apply_mask_(x2[r0:r1], mask[r0:r1])
        if apply and not fused:
            apply_mask_(tensor, mask.view(tensor.shape))
    return mask.view(tensor.shape)
