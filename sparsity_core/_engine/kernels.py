"""Small kernels (NumPy on CPU, torch elsewhere) and the tunables of the engine (:data:`CHUNK`,
:data:`EXACT`, :data:`SAMPLE`, ...): other modules read them as ``kernels.NAME`` so that a test can
change one in one place."""

from __future__ import annotations

import functools
from typing import Final

import numpy as np
import torch


#: Elements scored at a time: large enough to amortise per-call overhead, small enough for cache.
CHUNK: Final = 1 << 18
#: Elements per piece on an accelerator (:func:`chunk`): there each piece costs kernel launches
#: and a synchronisation or two, so pieces are large (64M: 256 MiB of float32 scores), and memory
#: is not the constraint it is on the host. Measured on an H200 (benchmarks/gpu.py): with the
#: host's 2^18, one-shot magnitude on 1.07B bf16 weights took 1.5 s, 1400x one pass.
DEVICE_CHUNK: Final = 1 << 26
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


#: Whether the magnitude path (:mod:`.magnitude`) takes the compiled kernels (:mod:`.native`)
#: where they were built; off, its NumPy kernels (the same masks). Tests run both.
NATIVE_KERNELS: bool = True
#: Whether the compiled kernels may take their AVX2 loops (off: their portable C loops).
NATIVE_SIMD: bool = True


def _numpy_kernels(t: Tensor) -> bool:
    """Whether ``t`` takes the NumPy kernels (the one "NumPy or torch?" decision, see :data:`NUMPY_KERNELS`)."""
    return t.is_cpu and NUMPY_KERNELS


def chunk(t: Tensor) -> int:
    """Elements per piece for ``t``: :data:`CHUNK` on the host (cache-sized), :data:`DEVICE_CHUNK`
    on an accelerator (few launches). Tests on CPU shrink ``CHUNK`` to exercise the pieces."""
    return CHUNK if t.is_cpu else DEVICE_CHUNK


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
        if values.is_cpu:
            return float(torch.kthvalue(values, k).values)
        # on CUDA a radix sort of the whole band measured several times faster than kthvalue
        return float(torch.sort(values).values[k - 1])
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
