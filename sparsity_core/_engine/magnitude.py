"""Magnitude selection on the weights' own bits: exact, no float scores, in fp32, bf16 and fp16.

For a sparsifier whose score ranks exactly like ``|w|`` (it declares
``ScoreSparsifier.ranks_like_magnitude``), the order of the scores is the order of each weight's
bit pattern with the sign cleared, read as an unsigned integer (IEEE floats store exponent, then
mantissa): a *key*. ``-0.0`` and ``0.0`` are both key 0, as ``|-0.0| == 0.0``; NaN and inf are the
keys at or above the all-ones exponent. So the selection runs on integer views of the weights
themselves (bf16 included, which NumPy cannot read as floats) and never makes a float32 score:
the general path's score, finiteness check and compare passes become two passes over the bits.

How, for one group (a tensor in layer scope, every tensor of a global group):

1. *Bracket*: the keys at about one position in 1024 (stratified, a fixed seed; at least 2**14,
   at most :data:`~.kernels.SAMPLE`), sorted, bracket the cut ``[lo, hi]`` at ``Z`` standard
   errors of the sampled quantile, as :mod:`.selection` does.
2. *Census* (reads every weight once, writes nothing): per tensor, how many keys are below
   ``lo``, and the keys inside the bracket (1-3 % of them); a mass of ties at either edge (the
   zeros of an earlier mask, say) is counted rather than kept. Any key of NaN or inf is refused
   here, naming the tensor, before anything is written.
3. *Cut*, on those counts alone: per tensor a key ``t`` and how many of its elements of key ``t``
   it prunes (its earliest: ties go by position, tensor order first). A global group's per-tensor
   bounds are the rounds of :func:`~sparsity_core._bounds.rounds` run on the counts; a
   tensor held at a bound far from the group's cut gets a census of its own.
4. *Apply* (reads and writes every weight once): ``keep = key > t`` (``key >= t`` once the
   tensor's share of the ties is spent, counted piece by piece) goes into the mask, and the
   weights are multiplied by it in the same pass while the piece is in cache.

No float32 score, no finiteness pass, no candidate positions: where the general path scores,
checks, compares and applies, this path reads the weights twice and writes them once. Nothing is
written before step 4, so when the bracket misses the cut (odds well under one in a million) or
holds too many keys, the general path runs instead, with the same result. The masks are the
general path's: ``round(level * n)`` lowest pruned, earlier positions first on ties, currently
pruned weights (nested masks) pruned first. The pruned weights are written as ``+0.0`` (an
integer multiply; the general path's float multiply leaves ``-0.0`` for negative weights, which
compares equal).

N:M (:func:`nm_keep`) ranks the keys of each group the way :func:`~.kernels.rank_keep` ranks
float32 scores, piece by piece, masking each piece as it goes.

Unstructured selection takes this path where the masks are applied as they are chosen (the
controller's step, one-shot ``sparsify``: ``score_masks`` given ``applied``) on CPU with the NumPy
kernels; ``compute_masks`` alone keeps the general path, which stays the reference this one is
tested against (``tests/test_engine_magnitude.py``). float64 stays on the general path: its
float32 scores round, so their order is not ``|w|``'s.

Each pass runs in one of two ways with the same results: one compiled loop per tensor
(:mod:`.native`: ``_bitkernels.c``, AVX2 where the CPU has it; the census then stores the
bracket's keys branch-free, and the apply pass writes the mask packed and the weights in the same
vector step), or NumPy operations on pieces of :data:`_CHUNK` elements where the package was
installed without a C compiler (or :data:`~.kernels.NATIVE_KERNELS` is off). The compiled passes
run at about one pass over the weights each; the NumPy census costs 4-7 passes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Final

import numpy as np
import torch

from . import kernels, native
from .._bits import PackedMask, packed_size
from .kernels import Tensor, _numpy_kernels

#: dtype -> (integer view, unsigned NumPy type, magnitude bits, first key of inf/NaN)
_KEYS: Final = {
    torch.float32: (torch.int32, np.uint32, 0x7FFFFFFF, 0x7F800000),
    torch.bfloat16: (torch.int16, np.uint16, 0x7FFF, 0x7F80),
    torch.float16: (torch.int16, np.uint16, 0x7FFF, 0x7C00),
}


def ranks_like_magnitude(sparsifier: object) -> bool:
    """Whether ``sparsifier`` declares that its score ranks exactly like ``|w|``, for the ``score``
    it runs: the declaration must come from the class that defines ``score`` or a subclass of it,
    so that a subclass overriding ``score`` without declaring it again is never taken at its
    parent's word."""
    mro = type(sparsifier).__mro__
    declared = next((i for i, c in enumerate(mro) if "ranks_like_magnitude" in vars(c)), None)
    scored = next((i for i, c in enumerate(mro) if "score" in vars(c)), None)
    if declared is None or scored is None or declared > scored:
        return False
    return bool(vars(mro[declared])["ranks_like_magnitude"])


def eligible(sparsifier: object, tensor: Tensor) -> bool:
    """Whether ``tensor``'s unstructured (or N:M) selection may run on its bits."""
    return (
        tensor.dtype in _KEYS
        and _numpy_kernels(tensor)
        and tensor.is_contiguous()
        and tensor.numel() > 0
        and ranks_like_magnitude(sparsifier)
    )


class _Bits:
    """One tensor seen as keys: its integer view, its current keep mask (nested policy) if any."""

    __slots__ = ("at", "at_hi", "at_lo", "band", "below", "bits", "hi", "inf", "keep", "lo", "mag", "n", "name", "shift", "slab", "ukind")

    def __init__(self, name: str, tensor: Tensor, keep: Tensor | None, shift: bool) -> None:
        view, self.ukind, self.mag, self.inf = _KEYS[tensor.dtype]
        self.name = name
        self.bits = tensor.detach().view(view).numpy().reshape(-1)
        self.n = self.bits.size
        # nested: a currently pruned weight is key 0 and every other key moves up by one, so it
        # is pruned first (the general path scores it -inf)
        # (every tensor of a group alike, with a current mask or not: ``shift``)
        self.shift = shift
        self.keep = None if keep is None or not shift else keep.reshape(-1).numpy()
        # after the census: the keys below the bracket [lo, hi] (a count), those inside it (the
        # keys themselves, but a mass of ties at either edge only counted: at_lo, at_hi)
        self.below = self.lo = self.hi = self.at_lo = self.at_hi = 0
        self.band: np.ndarray = np.empty(0, self.ukind)
        # where the band lies when the compiled census wrote it: slab[at : at + band.size]
        self.slab: np.ndarray | None = None
        self.at = 0

    def inside(self) -> int:
        return self.at_lo + self.band.size + self.at_hi

    def lt(self, t: int) -> int:
        """Keys in the bracket below ``t``."""
        return (self.at_lo if t > self.lo else 0) + int(np.count_nonzero(self.band < t)) + (self.at_hi if t > self.hi else 0)

    def eq(self, t: int) -> int:
        return (self.at_lo if t == self.lo else 0) + int(np.count_nonzero(self.band == t)) + (self.at_hi if t == self.hi else 0)

    def keys(self, start: int, end: int, out: np.ndarray, check: bool = False, sparsifier: str = "") -> np.ndarray:
        k = out[: end - start]
        np.bitwise_and(self.bits[start:end].view(self.ukind), self.mag, out=k)
        if check and k.size and int(k.max()) >= self.inf:
            raise _not_finite(self.name, sparsifier)
        if self.shift:
            k += 1
            if self.keep is not None:
                np.multiply(k, self.keep[start:end], out=k, casting="unsafe")
        return k

    def sample(self, index: np.ndarray) -> np.ndarray:
        k = self.bits[index].view(self.ukind) & self.ukind(self.mag)
        if self.shift:
            k = k + 1
            if self.keep is not None:
                k = (k * self.keep[index]).astype(self.ukind)
        return k


def _not_finite(name: str, sparsifier: str) -> ValueError:
    return ValueError(
        f"tensor {name!r} has NaN or inf values (or importance scores): cannot choose "
        f"a mask for it; check the weights (sparsifier {sparsifier!r})"
    )


class _Cut:
    """What one tensor prunes: keys below ``t``, and the first ``ties`` of its elements of key ``t``."""

    __slots__ = ("t", "ties", "all_ties")

    def __init__(self, t: int, ties: int, all_ties: int) -> None:
        self.t, self.ties, self.all_ties = t, ties, all_ties

    def pruned(self, bits: _Bits) -> int:
        if self.t < 0:
            return 0
        if self.t > _maxkey(bits):
            return bits.n
        return bits.below + bits.lt(self.t) + self.ties


def _maxkey(bits: _Bits) -> int:
    return bits.mag + bits.shift


class _Miss(Exception):
    """The bracket does not hold the cut: the general path decides."""


def _census(group: Sequence[_Bits], k: int, sparsifier: str) -> None:
    """Steps 1 and 2 for the whole group (``k`` keys to prune overall): sets each ``below``,
    ``lo`` and ``band``. Raises :class:`_Miss` when the bracket holds too many keys."""
    total = sum(b.n for b in group)
    # a sample of about one key in 1024 (at least 2**14): the bracket then holds 1-3 % of the
    # keys; a larger one narrows it but costs a cache miss per key, as much as a pass at 16M
    n_sample = min(kernels.SAMPLE, total, max(1 << 14, total >> 10))
    stride = total / n_sample
    index = (np.arange(n_sample) * stride + np.random.default_rng(0).random(n_sample) * stride).astype(np.int64)
    np.minimum(index, total - 1, out=index)
    edges = np.cumsum([0] + [b.n for b in group])
    cuts = np.searchsorted(index, edges)
    sample = np.concatenate([b.sample(index[cuts[i] : cuts[i + 1]] - edges[i]) for i, b in enumerate(group)])
    sample.sort(kind="stable" if sample.itemsize == 2 else "quicksort")  # 16-bit keys: NumPy's radix sort
    q = k / total
    spread = kernels.Z * math.sqrt(n_sample * q * (1 - q))
    lo_rank, hi_rank = math.floor(q * n_sample - spread) - 1, math.ceil(q * n_sample + spread) + 1
    lo = int(sample[lo_rank]) if lo_rank >= 0 else 0
    hi = int(sample[hi_rank]) if hi_rank < n_sample else max(_maxkey(b) for b in group)
    # a mass of ties at an edge (zeros of an earlier mask, say) is counted, not gathered
    mass = max(2.0, spread)
    mass_lo = lo < hi and np.searchsorted(sample, lo, "right") - np.searchsorted(sample, lo, "left") > mass
    mass_hi = lo < hi and np.searchsorted(sample, hi, "right") - np.searchsorted(sample, hi, "left") > mass
    cap = max(1 << 16, total // 8)
    if native.enabled():
        # room for twice the keys the sample puts inside (a larger band, odds far below one in a
        # million, takes a second census with room for all of ``cap``)
        inside = int(np.searchsorted(sample, hi, "right") - np.searchsorted(sample, lo, "left"))
        room = min(cap, 2 * inside * total // n_sample + (1 << 16))
        if not _census_native(group, lo, hi, mass_lo, mass_hi, room, sparsifier):
            if room == cap or not _census_native(group, lo, hi, mass_lo, mass_hi, cap, sparsifier):
                raise _Miss
        return
    held = 0
    chunk = min(kernels.CHUNK, _CHUNK)
    for b in group:
        size = min(chunk, b.n)
        keys, under, upto, edge = np.empty(size, b.ukind), np.empty(size, bool), np.empty(size, bool), np.empty(size, bool)
        below = at_lo = at_hi = 0
        parts: list[np.ndarray] = []
        for start in range(0, b.n, chunk):
            end = min(b.n, start + chunk)
            k_ = b.keys(start, end, keys, check=True, sparsifier=sparsifier)
            u, s, e = under[: end - start], upto[: end - start], edge[: end - start]
            np.less(k_, lo, out=u)
            n_u = int(np.count_nonzero(u))
            below += n_u
            if lo == hi:  # the bracket is one key: count it
                np.less_equal(k_, hi, out=s)
                at_lo += int(np.count_nonzero(s)) - n_u
                continue
            np.less_equal(k_, hi - 1 if mass_hi else hi, out=s)
            if mass_hi:
                np.less_equal(k_, hi, out=e)
                at_hi += int(np.count_nonzero(e)) - int(np.count_nonzero(s))
            if mass_lo:
                np.less_equal(k_, lo, out=e)
                at_lo += int(np.count_nonzero(e)) - n_u
                u = e
            np.logical_xor(s, u, out=s)  # inside the bracket, edges counted apart
            part = k_[np.flatnonzero(s)]  # faster than k_[s] (measured), and ~2 % of the keys
            held += part.size
            if held > cap:
                raise _Miss
            parts.append(part)
        b.below, b.lo, b.hi, b.at_lo, b.at_hi = below, lo, hi, at_lo, at_hi
        b.band = np.concatenate(parts) if parts else np.empty(0, b.ukind)


def _census_native(group: Sequence[_Bits], lo: int, hi: int, mass_lo: bool, mass_hi: bool, room: int, sparsifier: str) -> bool:
    """Step 2 in one compiled loop per tensor (:mod:`.native`): the same counts and bands as the
    NumPy loop; False when the bands hold more than ``room`` keys. The bands are consecutive
    slices of one buffer (see :func:`_joined`)."""
    # the keys kept are [blo, bhi]: the bracket less an edge whose mass is counted (a one-key
    # bracket is all counted: an empty band, blo > bhi)
    blo, bhi = (1, 0) if lo == hi else (lo + mass_lo, hi - mass_hi)
    buf = np.empty(room + 16, group[0].ukind)  # the compiled loop's stores run ahead of its checks
    counts = np.empty(4, np.int64)
    held = 0
    for b in group:
        counts.fill(0)
        keep = None if b.keep is None else b.keep.view(np.uint8)
        got = native.census(b.bits.view(b.ukind), keep, b.shift, b.mag, lo, blo, bhi, hi, buf[held:], room - held, counts)
        if got < 0:
            return False
        if int(counts[3]) >= b.inf:
            raise _not_finite(b.name, sparsifier)
        b.below, b.lo, b.hi = int(counts[0]), lo, hi
        b.at_lo = int(counts[1]) if lo == hi or mass_lo else 0
        b.at_hi = int(counts[2]) if lo != hi and mass_hi else 0
        b.band, b.slab, b.at = buf[held : held + got], buf, held
        held += got
    return True


#: Elements per piece of the census and the apply pass: a few arrays of it stay in L2.
_CHUNK: Final = 1 << 16


def _decide(group: Sequence[_Bits], k: int) -> list[_Cut]:
    """Step 3 for ``group``: prune its ``k`` lowest keys, ties by position (tensor order first)."""
    total = sum(b.n for b in group)
    k = min(max(k, 0), total)
    if k == 0:
        return [_Cut(-1, 0, 0) for _ in group]
    if k == total:
        return [_Cut(1 << 40, 0, 0) for _ in group]
    below = sum(b.below for b in group)
    if not below < k <= below + sum(b.inside() for b in group):
        if k == below:  # the cut is the bracket's lower edge: the keys below lo, no more
            lo = group[0].lo
            return [_Cut(lo, 0, b.eq(lo)) for b in group]
        raise _Miss
    r = k - below
    at_lo = sum(b.at_lo for b in group)
    band = _joined(group)
    if r <= at_lo:
        t = group[0].lo
    elif r - at_lo <= band.size:
        # 16-bit keys come in runs of equal keys, on which NumPy's introselect slows down several
        # times: they are counted instead; 32-bit ones are mostly distinct, where it is quickest
        t = native.select(band, r - at_lo - 1) if native.enabled() and band.itemsize == 2 else -1
        if t < 0:
            t = int(np.partition(band, r - at_lo - 1)[r - at_lo - 1])
    else:
        t = group[0].hi
    left = r - sum(b.lt(t) for b in group)  # ties of key t to prune, earliest first
    cuts = []
    for b in group:
        ties = b.eq(t)
        take = min(ties, left)
        left -= take
        cuts.append(_Cut(t, take, ties))
    return cuts


def _joined(group: Sequence[_Bits]) -> np.ndarray:
    """The keys of the group's bands as one array: a view where they lie one after another in one
    buffer (as the compiled census leaves them), else a copy."""
    if len(group) == 1:
        return group[0].band
    slab, at = group[0].slab, group[0].at
    for b in group:
        if slab is None or b.slab is not slab or b.at != at:
            return np.concatenate([b.band for b in group])
        at += b.band.size
    return slab[group[0].at : at]


def _decide_bounded(group: Sequence[_Bits], target: float, spec: Any, floors: Sequence[int], sparsifier: str) -> list[_Cut]:
    """:func:`_decide` with each tensor's pruned count inside its bounds: the rounds of
    :func:`~sparsity_core._bounds.rounds`, on counts. A tensor fixed at a bound far from the
    group's cut (a head of tiny weights held at its cap) gets a census of its own: one more read
    of that tensor, not of the group."""
    from .._bounds import bounds, rounds, unbounded

    numels = [b.n for b in group]
    lo, hi = bounds(spec, numels, floors, target)
    if unbounded(lo, hi, numels):
        return _decide(group, round(target))
    cuts: list[_Cut | None] = [None] * len(group)

    def choose(active: list[int], target: float) -> dict[int, float]:
        chosen = _decide([group[i] for i in active], round(target))
        for i, c in zip(active, chosen):
            cuts[i] = c
        return {i: c.pruned(group[i]) for i, c in zip(active, chosen)}

    def pin(fixed: dict[int, int], over: bool) -> float:
        pruned = 0
        for i, want in fixed.items():
            try:
                (c,) = _decide([group[i]], round(want))
            except _Miss:  # its bound is far from the group's cut: a census of this tensor alone
                _census([group[i]], round(want), sparsifier)
                (c,) = _decide([group[i]], round(want))
            cuts[i] = c
            pruned += c.pruned(group[i])
        return pruned

    rounds(lo, hi, target, choose, pin)
    return [c for c in cuts if c is not None]


def _apply(bits: _Bits, cut: _Cut, mask: np.ndarray, apply: bool, packed: np.ndarray | None = None) -> None:
    """Step 4 for one tensor: the keep mask into ``mask`` (flat bool), and the weights multiplied
    by it in the same pass when ``apply``. With ``packed`` (uint8, 1 bit per element, NumPy's
    little bit order), ``mask`` is a buffer of one piece and each piece is packed there as it is
    made: no bool mask of the whole tensor."""
    mode = "keep" if cut.t < 0 else "prune" if cut.t > _maxkey(bits) else "cut"
    if mode != "cut":
        if packed is None:
            mask.fill(mode == "keep")
        else:
            _fill_packed(packed, bits.n, mode == "keep")
        if mode == "prune" and apply:
            bits.bits.fill(0)
        return
    # keep > t while this tensor still prunes ties of key t, then keep >= t (i.e. > t - 1)
    left = cut.ties if cut.ties < cut.all_ties else 0
    t = cut.t if left or cut.ties == cut.all_ties else cut.t - 1
    if native.enabled():
        out = packed if packed is not None else np.empty(packed_size(bits.n), np.uint8)
        keep = None if bits.keep is None else bits.keep.view(np.uint8)
        native.apply(bits.bits.view(bits.ukind), keep, bits.shift, bits.mag, t + 1, cut.t, left, apply, out)
        if packed is None:
            mask[:] = np.unpackbits(out, count=bits.n, bitorder="little").view(bool)
        return
    chunk = max(8, min(kernels.CHUNK, _CHUNK) // 8 * 8)  # whole bytes of the packed mask
    keys = np.empty(min(chunk, bits.n), bits.ukind)
    for start in range(0, bits.n, chunk):
        end = min(bits.n, start + chunk)
        m = mask[start:end] if packed is None else mask[: end - start]
        k = bits.keys(start, end, keys)
        np.greater(k, t, out=m)
        if left:
            tied = np.flatnonzero(k == cut.t)
            if tied.size >= left:
                m[tied[left:]] = True
                left, t = 0, cut.t - 1
            else:
                left -= tied.size
        if apply:
            x = bits.bits[start:end]
            np.multiply(x, m.view(np.uint8), out=x, casting="unsafe")
        if packed is not None:
            packed[start >> 3 : (end + 7) >> 3] = np.packbits(m, bitorder="little")


def _fill_packed(packed: np.ndarray, n: int, value: bool) -> None:
    """All ``n`` bits of ``packed`` set to ``value`` (the pad bits of the last byte zero)."""
    packed.fill(0xFF if value else 0)
    if value and n % 8:
        packed[-1] = (1 << (n % 8)) - 1


def select_group(
    sparsifier: Any,
    names: Sequence[str],
    tensors: Sequence[Tensor],
    keeps: Sequence[Tensor | None],
    target: float,
    apply: bool,
    spec: Any = None,
    floors: Sequence[int] | None = None,
    packed: bool = False,
) -> Iterator[Tensor | PackedMask] | None:
    """Keep masks for ``tensors`` (one layer-scope tensor, or a global group with ``spec`` and
    ``floors`` for its per-tensor bounds) pruning ``target`` elements, the weights masked in the
    same pass when ``apply``; None when the bracket misses (nothing was written).

    The cut is decided here; the masks come one tensor at a time from the returned iterator, each
    made (and its tensor masked) when it is asked for, so a caller that hands each one over (or
    packs it) before asking for the next never holds every tensor's bool mask at once."""
    keeps = [_bool(k) for k in keeps]
    nested = any(_prunes(k) for k in keeps)
    group = [_Bits(n, t, k, nested) for n, t, k in zip(names, tensors, keeps)]
    total = sum(b.n for b in group)
    k = min(max(round(target), 0), total)
    try:
        if 0 < k < total:
            _census(group, k, sparsifier.name)
        else:  # nothing to bracket, but NaN and inf are refused as on the general path
            _check(group, sparsifier.name)
        if spec is None:
            cuts = _decide(group, k)
        else:
            cuts = _decide_bounded(group, target, spec, floors or [0] * len(group), sparsifier.name)
    except _Miss:
        return None
    return _masks(group, cuts, tensors, apply, packed)


def _masks(group: Sequence[_Bits], cuts: Sequence[_Cut], tensors: Sequence[Tensor], apply: bool, packed: bool) -> Iterator[Tensor | PackedMask]:
    piece = np.empty(min(max(b.n for b in group), _CHUNK), bool) if packed else None
    for b, c, t in zip(group, cuts, tensors):
        if piece is None:
            mask = torch.empty(t.shape, dtype=torch.bool)
            _apply(b, c, mask.view(-1).numpy(), apply)
            yield mask
        else:
            data = torch.empty(packed_size(b.n), dtype=torch.uint8)
            _apply(b, c, piece, apply, data.numpy())
            yield PackedMask(data, t.shape)


def _bool(keep: Any) -> Tensor | None:
    """A mask in force as bool: a packed one (``PackedMask``) is unpacked, one tensor's worth."""
    return keep.to_bool() if keep is not None and not isinstance(keep, torch.Tensor) else keep


def _prunes(keep: Tensor | None) -> bool:
    return keep is not None and not bool(keep.all())


def _check(group: Sequence[_Bits], sparsifier: str) -> None:
    for b in group:
        keys = np.empty(min(kernels.CHUNK, b.n), b.ukind)
        for start in range(0, b.n, kernels.CHUNK):
            b.keys(start, min(b.n, start + kernels.CHUNK), keys, check=True, sparsifier=sparsifier)


def nm_keep_rows(name: str, tensor: Tensor, keep: Tensor | None, m: int, prune: int, apply: bool, sparsifier: str) -> Tensor | PackedMask:
    """:func:`nm_keep` for a 2-D tensor whose reduction axis is dim 0 (``[in, out]``, as
    transformers' ``Conv1D``): the groups are ``m`` consecutive rows in each column, ties going
    to the earlier row. Compiled kernels only (:func:`~.native.enabled`)."""
    keep = _bool(keep)
    return _nm_native(_Bits(name, tensor, keep, _prunes(keep)), tensor.shape, m, prune, apply, sparsifier, cols=tensor.shape[1])


def _nm_native(bits: _Bits, shape: torch.Size, m: int, prune: int, apply: bool, sparsifier: str, cols: int | None = None) -> Tensor | PackedMask:
    """N:M by the compiled kernels, along flat runs, or down the rows of a ``(-1, cols)`` view:
    the mask packed with ``apply`` (written in the same pass), else as bool."""
    packed = torch.empty(packed_size(bits.n), dtype=torch.uint8)
    current = None if bits.keep is None else bits.keep.view(np.uint8)
    keys = bits.bits.view(bits.ukind)
    if cols is None:
        bad = native.nm(keys, current, bits.shift, bits.mag, bits.inf, m, prune, apply, packed.numpy())
    else:
        bad = native.nm_rows(keys, cols, current, bits.shift, bits.mag, bits.inf, m, prune, apply, packed.numpy())
    if bad >= 0:
        raise _not_finite(bits.name, sparsifier)
    mask = PackedMask(packed, shape)
    return mask if apply else mask.to_bool()


def nm_keep(name: str, tensor: Tensor, keep: Tensor | None, m: int, prune: int, apply: bool, sparsifier: str) -> Tensor | PackedMask:
    """N:M over flat runs of ``m`` (``m <= 8``): in each, keep all but the ``prune`` lowest keys
    (ties: the earlier is pruned first), the weights masked piece by piece when ``apply``. The
    ranks of :func:`~.kernels.rank_keep`, on keys. With ``apply`` and the compiled kernels, the
    mask comes packed (written 1 bit per weight in the same pass); otherwise as bool."""
    from .kernels import _rank_keep_flat

    keep = _bool(keep)
    bits = _Bits(name, tensor, keep, _prunes(keep))
    if native.enabled():
        return _nm_native(bits, tensor.shape, m, prune, apply, sparsifier)
    out = torch.empty(tensor.shape, dtype=torch.bool)
    flat = out.view(-1).numpy()
    step = max(m, min(kernels.CHUNK, _CHUNK) // m * m)
    keys = np.empty(min(step, bits.n), bits.ukind)
    for start in range(0, bits.n, step):
        end = min(bits.n, start + step)
        k = bits.keys(start, end, keys, check=True, sparsifier=sparsifier)
        piece = flat[start:end]
        _rank_keep_flat(k, m, prune, piece)
        if apply:
            x = bits.bits[start:end]
            np.multiply(x, piece.view(np.uint8), out=x, casting="unsafe")
    return out
