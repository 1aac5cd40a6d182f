"""The compiled magnitude kernels (``_engine/_bitkernels.c`` through ``_engine/native.py``), called
directly and compared with NumPy references written here.

``tests/test_engine_magnitude.py`` checks the masks end to end, on tensors whose lengths and keys
rarely reach a kernel's scalar tail, the top key values or the edges of its contract. Here every
wrapper runs on its AVX2 loops and on its portable C loops (``kernels.NATIVE_SIMD``), for 16-bit
and 32-bit keys, over lengths 0..70 and around the vector widths (so the tails run), keys at the
top of the range (0x7FFF and 0x7FFFFFFF, which the nested shift moves to 0x8000 and 0x80000000:
a signed compare in place of an unsigned one shows there), ties, and the band's ``cap``.
"""

from __future__ import annotations

import platform
import shutil
from collections.abc import Iterator

import numpy as np
import pytest

import sparsity_core._engine as engine
from sparsity_core._engine import native

#: Lengths that run every loop's scalar tail: all of 0..70, and odd ones around the vector widths.
LENGTHS = sorted(set(range(71)) | {1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1000, 4099})

UKINDS = [np.uint16, np.uint32]

#: How a key is made: the raw key, the nested shift (+1) without a current mask, and with one.
MODES = ["raw", "shift", "shift+keep"]


def _width(ukind: type) -> int:
    return np.dtype(ukind).itemsize * 8


def _mag(ukind: type) -> int:
    """The sign-cleared magnitude bits: 0x7FFF or 0x7FFFFFFF."""
    return (1 << (_width(ukind) - 1)) - 1


@pytest.fixture(params=[True, False], ids=["avx2", "portable"])
def simd(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Each test on the AVX2 loops (where the CPU has them) and on the portable C loops."""
    if not native.AVAILABLE:
        pytest.skip("the compiled kernels were not built (no C compiler at install); test_kernels_built checks that")
    monkeypatch.setattr(engine.kernels, "NATIVE_SIMD", request.param)
    return bool(request.param)


def draw(rng: np.random.Generator, n: int, ukind: type, levels: int = 0) -> np.ndarray:
    """``n`` weights' bits (sign bits random): half drawn from a few keys (ties, and the top ones
    0, 1, mag - 1, mag), half at random; with ``levels`` all from keys 0..levels-1."""
    mag, sign = _mag(ukind), 1 << (_width(ukind) - 1)
    if levels:
        raw = rng.integers(0, levels, n, dtype=np.uint64)
    else:
        pool = np.array([0, 1, 2, mag // 2, mag - 1, mag, *rng.integers(0, mag + 1, 4)], np.uint64)
        raw = np.where(rng.random(n) < 0.5, pool[rng.integers(0, pool.size, n)], rng.integers(0, mag + 1, n, dtype=np.uint64))
    return (raw | np.where(rng.random(n) < 0.5, sign, 0).astype(np.uint64)).astype(ukind)


def current(rng: np.random.Generator, n: int, mode: str) -> tuple[bool, np.ndarray | None]:
    """(shift, keep) for ``mode``: keep is a current mask as uint8 (a bool array's bytes)."""
    if mode == "raw":
        return False, None
    if mode == "shift":
        return True, None
    return True, (rng.random(n) < 0.7).astype(np.uint8)


def same(got: np.ndarray, want: np.ndarray, err_msg: str = "") -> None:
    """np.testing.assert_array_equal, its report made only on a mismatch (thousands of calls)."""
    if got.shape != want.shape or not np.array_equal(got, want):
        np.testing.assert_array_equal(got, want, err_msg=err_msg)


def ref_keys(bits: np.ndarray, keep: np.ndarray | None, shift: bool, mag: int) -> np.ndarray:
    """The keys, as the C file defines them: bits & mag; under shift + 1, and 0 where pruned now."""
    k = bits & bits.dtype.type(mag)
    if shift:
        k = (k + bits.dtype.type(1)).astype(bits.dtype)
        if keep is not None:
            k = np.where(keep != 0, k, 0).astype(bits.dtype)
    return k


# ---------------------------------------------------------------------------------------------
# The build


def test_kernels_built_where_a_c_compiler_is() -> None:
    """A broken build must not hide behind the other tests' skips."""
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here: the NumPy kernels run instead")
    assert native.AVAILABLE, (
        "a C compiler is here but sparsity_core._engine._bitkernels did not load: build it "
        "(pip install -e ., or python setup.py build_ext --inplace)"
    )


def _cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx2" in line for line in f)
    except OSError:
        return False


def test_avx2_loops_run_where_the_cpu_has_them() -> None:
    """Else every "avx2" case below quietly runs the portable loops twice."""
    if not native.AVAILABLE:
        pytest.skip("the compiled kernels were not built")
    if platform.machine() not in ("x86_64", "AMD64") or not _cpu_has_avx2():
        pytest.skip("no AVX2 on this CPU: the portable loops run")
    assert native.simd()


# ---------------------------------------------------------------------------------------------
# census


def ref_census(
    bits: np.ndarray, keep: np.ndarray | None, shift: bool, mag: int, lo: int, blo: int, bhi: int, hi: int, cap: int, counts: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """(return value, band, counts after) per the C file's contract."""
    k = ref_keys(bits, keep, shift, mag)
    band = k[(k >= blo) & (k <= bhi)]
    raw = bits & bits.dtype.type(mag)
    out = counts.copy()
    out[0] += int(np.count_nonzero(k < lo))
    if lo == hi or blo != lo or bhi != hi:  # the ties at an edge are counted only where it is not kept
        out[1] += int(np.count_nonzero(k == lo))
        out[2] += int(np.count_nonzero(k == hi))
    out[3] = max(int(out[3]), int(raw.max()) if raw.size else 0)
    return (-1 if band.size > cap else band.size), band, out


def run_census(
    bits: np.ndarray, keep: np.ndarray | None, shift: bool, mag: int, lo: int, blo: int, bhi: int, hi: int, cap: int, counts: np.ndarray | None = None
) -> tuple[int, np.ndarray, np.ndarray]:
    """The compiled census, checked against the reference; its band buffer is the ``cap + 16``
    keys the contract asks for, followed by guards that must stay as they were."""
    counts = np.zeros(4, np.int64) if counts is None else counts
    want, want_band, want_counts = ref_census(bits, keep, shift, mag, lo, blo, bhi, hi, cap, counts)
    before = bits.copy()
    buf = np.full(cap + 16 + 8, np.iinfo(bits.dtype).max & 0xA5A5A5A5, bits.dtype)
    guard = buf[cap + 16 :].copy()
    got_counts = counts.copy()
    got = native.census(bits, keep, shift, mag, lo, blo, bhi, hi, buf, cap, got_counts)
    where = f"n={bits.size} lo={lo} blo={blo} bhi={bhi} hi={hi} cap={cap} shift={shift} keep={keep is not None}"
    assert got == want, where
    same(buf[cap + 16 :], guard, err_msg=f"band written past cap + 16: {where}")
    same(bits, before, err_msg=where)
    if got >= 0:
        same(buf[:got], want_band, err_msg=where)
        same(got_counts, want_counts, err_msg=where)
    return got, buf[: max(got, 0)], got_counts


def brackets(k: np.ndarray, rng: np.random.Generator, mag: int, shift: bool) -> Iterator[tuple[int, int, int, int]]:
    """(lo, blo, bhi, hi) brackets: around quantiles of the keys, with either edge counted
    (blo = lo + 1, bhi = hi - 1) or kept, a one-key bracket (blo > bhi), and the whole range."""
    top = mag + shift
    s = np.sort(k) if k.size else np.array([0, top])
    for qlo, qhi in ((0.0, 1.0), (0.2, 0.4), (0.5, 0.5), (0.9, 1.0), (rng.random() / 2, 0.5 + rng.random() / 2)):
        lo, hi = int(s[int(qlo * (s.size - 1))]), int(s[int(qhi * (s.size - 1))])
        if lo == hi:
            yield lo, 1, 0, hi  # one key: all counted, an empty band
            continue
        yield lo, lo, hi, hi
        yield lo, lo + 1, hi, hi
        yield lo, lo, hi - 1, hi
        yield lo, lo + 1, hi - 1, hi
    yield 0, 0, top, top
    yield top, top, top, top


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_census_every_length(simd: bool, ukind: type, mode: str) -> None:
    mag = _mag(ukind)
    rng = np.random.default_rng([1, _width(ukind), MODES.index(mode)])
    for n in LENGTHS:
        bits = draw(rng, n, ukind)
        shift, keep = current(rng, n, mode)
        k = ref_keys(bits, keep, shift, mag)
        for lo, blo, bhi, hi in brackets(k, rng, mag, shift):
            run_census(bits, keep, shift, mag, lo, blo, bhi, hi, cap=n)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_census_cap(simd: bool, ukind: type, mode: str) -> None:
    """-1 exactly when the band holds more than ``cap`` keys: cap = size - 1 and cap = size, for
    bands that fill up at every position of a vector and in the scalar tail."""
    mag = _mag(ukind)
    rng = np.random.default_rng([2, _width(ukind), MODES.index(mode)])
    for n in [*range(1, 70), 127, 128, 129, 1000, 4099]:
        bits = draw(rng, n, ukind, levels=4)
        shift, keep = current(rng, n, mode)
        k = ref_keys(bits, keep, shift, mag)
        for lo, hi in ((0, 3 + shift), (1, 2), (int(k.min()), int(k.max()))):
            for blo, bhi in ((lo, hi), (lo + 1, hi)):
                size = int(np.count_nonzero((k >= blo) & (k <= bhi)))
                if size:
                    assert run_census(bits, keep, shift, mag, lo, blo, bhi, hi, cap=size - 1)[0] == -1
                assert run_census(bits, keep, shift, mag, lo, blo, bhi, hi, cap=size)[0] == size
                run_census(bits, keep, shift, mag, lo, blo, bhi, hi, cap=max(size // 2, 0))
        assert run_census(bits, keep, shift, mag, 0, 0, mag + 1, mag + 1, cap=0)[0] == -1


@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_census_top_keys(simd: bool, ukind: type) -> None:
    """Keys 0x7FFF(FFFF) and, shifted, 0x8000(0000): below, equal and inside the band where an
    unsigned compare puts them (a signed one would put 0x8000 below everything)."""
    mag = _mag(ukind)
    rng = np.random.default_rng([3, _width(ukind)])
    for n in (1, 15, 16, 17, 33, 64, 65, 1000):
        bits = np.where(rng.random(n) < 0.5, mag, rng.integers(0, mag + 1, n)).astype(ukind)
        bits |= np.where(rng.random(n) < 0.5, mag + 1, 0).astype(ukind)  # sign bits: cleared by mag
        for shift, keep in ((False, None), (True, None), (True, (rng.random(n) < 0.5).astype(np.uint8))):
            top = mag + shift
            for lo, blo, bhi, hi in ((top, top, top, top), (top - 1, top, top, top), (1, 1, top, top), (top, 1, 0, top), (0, 0, top - 1, top)):
                run_census(bits, keep, shift, mag, lo, blo, bhi, hi, cap=n)


@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_census_counts_add_and_max_raw_key(simd: bool, ukind: type) -> None:
    """counts[0:3] are added to, counts[3] is the largest raw key (before the shift: a NaN or inf
    shows there even where the current mask prunes it, where its key is 0) or the value it held."""
    mag = _mag(ukind)
    inf = 0x7F80 if ukind is np.uint16 else 0x7F800000
    rng = np.random.default_rng([4, _width(ukind)])
    for n in (1, 8, 9, 31, 32, 33, 100, 4099):
        bits = rng.integers(0, inf, n).astype(ukind)
        keep = np.ones(n, np.uint8)
        at = int(rng.integers(0, n))
        bits[at] = (inf + 1) | (mag + 1)  # a NaN, negative, at a pruned position
        keep[at] = 0
        for shift, kp in ((False, None), (True, None), (True, keep)):
            _, _, counts = run_census(bits, kp, shift, mag, 100, 101, 5000, 5001, cap=n, counts=np.array([5, 6, 7, 3], np.int64))
            assert counts[3] == inf + 1
            counts = np.array([0, 0, 0, mag], np.int64)  # a larger key seen in an earlier tensor stays
            assert run_census(bits, kp, shift, mag, 100, 101, 5000, 5001, cap=n, counts=counts)[2][3] == mag
        assert ref_keys(bits, keep, True, mag)[at] == 0


@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_census_both_loops_same_counts(ukind: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no edge is counted (blo == lo, bhi == hi, lo < hi) the AVX2 loop skips the counts of
    keys == lo and == hi; the portable loop used to add them (and the AVX2 one added its scalar
    tail's), so the two disagreed: now counts[1:3] are left as they were in both."""
    if not native.AVAILABLE:
        pytest.skip("the compiled kernels were not built")
    mag = _mag(ukind)
    rng = np.random.default_rng([14, _width(ukind)])
    bits = draw(rng, 1000 + 13, ukind, levels=5)
    for shift in (False, True):
        got = []
        for simd in (True, False):
            monkeypatch.setattr(engine.kernels, "NATIVE_SIMD", simd)
            counts = np.array([1, 2, 3, 0], np.int64)
            band = np.empty(bits.size + 16, ukind)
            assert native.census(bits, None, shift, mag, 1, 1, 3, 3, band, bits.size, counts) >= 0
            got.append(counts)
        same(got[0], got[1])
        assert list(got[0][1:3]) == [2, 3]


@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_census_long(simd: bool, ukind: type) -> None:
    """Past the 16-bit loop's flush of its lane counters (every 4096 vectors)."""
    mag = _mag(ukind)
    rng = np.random.default_rng([5, _width(ukind)])
    n = 16 * 4096 * 2 + 37
    bits = draw(rng, n, ukind, levels=3)  # every lane counts in every vector
    for shift, keep in ((False, None), (True, (rng.random(n) < 0.9).astype(np.uint8))):
        run_census(bits, keep, shift, mag, 1 + shift, 1 + shift, 1 + shift, 2 + shift, cap=n)
        run_census(bits, keep, shift, mag, 1, 2, 1, 1, cap=n)


# ---------------------------------------------------------------------------------------------
# apply


def ref_apply(bits: np.ndarray, keep: np.ndarray | None, shift: bool, mag: int, t_keep: int, tcut: int, left: int) -> np.ndarray:
    """The keep mask: k >= t_keep, but the first ``left`` keys of tcut pruned and the rest kept
    (the contract's t_keep is tcut + 1 while ties are left)."""
    k = ref_keys(bits, keep, shift, mag)
    kept = k.astype(np.uint64) >= t_keep
    if left:
        assert t_keep == tcut + 1
        kept[np.flatnonzero(k == tcut)[left:]] = True
    return kept


def run_apply(bits: np.ndarray, keep: np.ndarray | None, shift: bool, mag: int, t_keep: int, tcut: int, left: int, write: bool) -> np.ndarray:
    """The compiled apply on a copy of ``bits``, checked against the reference: packed bits equal
    to np.packbits (pad bits zero), weights equal to bits * keep (pruned ones the bit pattern 0),
    or untouched without ``write``."""
    kept = ref_apply(bits, keep, shift, mag, t_keep, tcut, left)
    x = bits.copy()
    packed = np.full((bits.size + 7) // 8 + 1, 0xFF, np.uint8)  # one guard byte past the end
    native.apply(x, keep, shift, mag, t_keep, tcut, left, write, packed[:-1])
    where = f"n={bits.size} t_keep={t_keep} tcut={tcut} left={left} shift={shift} keep={keep is not None} write={write}"
    same(packed[:-1], np.packbits(kept, bitorder="little"), err_msg=where)
    assert packed[-1] == 0xFF, where
    same(x, np.where(kept, bits, 0).astype(bits.dtype) if write else bits, err_msg=where)
    return kept


@pytest.mark.parametrize("write", [True, False], ids=["write", "mask-only"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_apply_every_length(simd: bool, ukind: type, mode: str, write: bool) -> None:
    mag = _mag(ukind)
    rng = np.random.default_rng([6, _width(ukind), MODES.index(mode), write])
    for n in LENGTHS:
        bits = draw(rng, n, ukind)
        shift, keep = current(rng, n, mode)
        k = ref_keys(bits, keep, shift, mag)
        run_apply(bits, keep, shift, mag, 0, 0, 0, write)  # t_keep 0: keep all
        run_apply(bits, keep, shift, mag, mag + shift + 1, 0, 0, write)  # above every key: keep none
        for _ in range(3):
            t = int(k[rng.integers(0, n)]) if n else 0
            run_apply(bits, keep, shift, mag, t, t, 0, write)
            run_apply(bits, keep, shift, mag, t + 1, t, 0, write)
            ties = int(np.count_nonzero(k == t))
            for left in {1, ties // 2, ties - 1, ties, ties + 1} - {0}:
                run_apply(bits, keep, shift, mag, t + 1, t, left, write)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_apply_ties_run_out_anywhere(simd: bool, ukind: type, mode: str) -> None:
    """Ties of key tcut spread over many vectors (several in some, none in others), ``left`` running
    out at every one of them: in the middle of a vector, at its last lane, at a boundary, in the
    tail. The top key as tcut too, where a signed compare would go wrong."""
    mag = _mag(ukind)
    rng = np.random.default_rng([7, _width(ukind), MODES.index(mode)])
    for n in (300, 333):
        shift, keep = current(rng, n, mode)
        for tcut in (7 + shift, mag + shift):
            raw = rng.integers(0, mag + 1, n)
            # ties at random positions, and at both ends of some 32-element blocks
            tied = (rng.random(n) < 0.3) | np.isin(np.arange(n), [0, 31, 32, 63, 64, 95, 96, 128, 255, 256, 287, n - 1])
            tied[160:224] = False  # two blocks without a tie
            raw[tied] = tcut - shift
            bits = raw.astype(ukind) | np.where(rng.random(n) < 0.5, mag + 1, 0).astype(ukind)
            if keep is not None:
                keep[rng.random(n) < 0.1] = 0
            k = ref_keys(bits, keep, shift, mag)
            ties = int(np.count_nonzero(k == tcut))
            assert ties > 30
            for left in range(ties + 2):
                run_apply(bits, keep, shift, mag, tcut + 1 if left else tcut, tcut, left, write=True)


@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_apply_top_keys(simd: bool, ukind: type) -> None:
    """Thresholds at and around 0x7FFF(FFFF) and 0x8000(0000), with keys there."""
    mag = _mag(ukind)
    rng = np.random.default_rng([8, _width(ukind)])
    for n in (1, 17, 33, 64, 65, 1000):
        bits = np.where(rng.random(n) < 0.6, mag - rng.integers(0, 2, n), rng.integers(0, mag + 1, n)).astype(ukind)
        for shift, keep in ((False, None), (True, None), (True, (rng.random(n) < 0.5).astype(np.uint8))):
            top = mag + shift
            for t in (top - 2, top - 1, top, top + 1, 1, 0x7F80 if ukind is np.uint16 else 0x7F800000):
                run_apply(bits, keep, shift, mag, t, t, 0, write=True)
                k = ref_keys(bits, keep, shift, mag)
                ties = int(np.count_nonzero(k == t))
                if t <= top and ties:
                    run_apply(bits, keep, shift, mag, t + 1, t, max(1, ties // 3), write=True)


# ---------------------------------------------------------------------------------------------
# N:M


def ref_nm(bits: np.ndarray, keep: np.ndarray | None, shift: bool, mag: int, m: int, prune: int) -> np.ndarray:
    """In each run of m keep all but the ``prune`` lowest keys, ties: the earlier pruned first."""
    k = ref_keys(bits, keep, shift, mag).reshape(-1, m)
    order = np.argsort(k, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(m)[None, :].repeat(k.shape[0], 0), axis=1)
    return (rank >= prune).reshape(-1)


def run_nm(bits: np.ndarray, keep: np.ndarray | None, shift: bool, mag: int, inf: int, m: int, prune: int, write: bool) -> None:
    kept = ref_nm(bits, keep, shift, mag, m, prune)
    x = bits.copy()
    packed = np.full((bits.size + 7) // 8 + 1, 0xFF, np.uint8)
    got = native.nm(x, keep, shift, mag, inf, m, prune, write, packed[:-1])
    where = f"n={bits.size} m={m} prune={prune} shift={shift} keep={keep is not None} write={write}"
    assert got == -1, where
    same(packed[:-1], np.packbits(kept, bitorder="little"), err_msg=where)
    assert packed[-1] == 0xFF, where
    same(x, np.where(kept, bits, 0).astype(bits.dtype) if write else bits, err_msg=where)


#: m in 2, 4, 8 take the AVX2 loops; the others only the portable ones.
MS = [2, 4, 8, 3, 5]


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_nm(simd: bool, ukind: type, m: int) -> None:
    """Every prune count, runs counts around the vector widths, keys with many ties (0..3) and the
    top keys, with and without the nested shift; ``inf`` above every key (none refused)."""
    mag = _mag(ukind)
    rng = np.random.default_rng([9, _width(ukind), m])
    for groups in [*range(0, 20), 31, 32, 33, 64, 65, 300]:
        n = groups * m
        for mode in MODES:
            for levels in (4, 0):
                bits = draw(rng, n, ukind, levels=levels)
                shift, keep = current(rng, n, mode)
                for prune in range(0, m + 1):
                    run_nm(bits, keep, shift, mag, mag + 1, m, prune, write=prune % 2 == 0)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_nm_not_finite(simd: bool, ukind: type, m: int) -> None:
    """A NaN or inf returns the first element of its run; the runs before it are written (mask and
    weights), the weights after it untouched; a pruned position (key 0 under the shift) too."""
    mag = _mag(ukind)
    inf = 0x7F80 if ukind is np.uint16 else 0x7F800000
    rng = np.random.default_rng([10, _width(ukind), m])
    groups = 100
    n = groups * m
    for g in sorted({0, 1, 31 // m, 32 // m, 33 // m, 64 // m, 50, groups - 2, groups - 1}):
        for shift, mode in ((False, "raw"), (True, "shift+keep")):
            bits = (rng.integers(0, inf, n) | np.where(rng.random(n) < 0.5, mag + 1, 0)).astype(ukind)
            _, keep = current(rng, n, mode)
            at = g * m + int(rng.integers(0, m))
            bits[at] = (inf if rng.random() < 0.5 else inf + 3) | (mag + 1)
            if keep is not None:
                keep[at] = 0
            if g + 2 < groups:
                bits[(g + 2) * m] = inf  # a later one: the first is reported
            prune = int(rng.integers(1, m))
            kept = ref_nm(np.where((bits & mag) >= inf, 0, bits).astype(ukind), keep, shift, mag, m, prune)
            for write in (True, False):
                x = bits.copy()
                packed = np.full((n + 7) // 8, 0xFF, np.uint8)
                got = native.nm(x, keep, shift, mag, inf, m, prune, write, packed)
                where = f"g={g} m={m} shift={shift} write={write}"
                assert got == g * m, where
                before = g * m
                same(np.unpackbits(packed, count=n, bitorder="little")[:before], kept[:before], err_msg=where)
                done = np.where(kept[:before], bits[:before], 0).astype(ukind) if write else bits[:before]
                same(x[:before], done, err_msg=where)
                same(x[before:], bits[before:], err_msg=where)


@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_nm_top_keys(simd: bool, ukind: type) -> None:
    """Runs mixing 0x7FFF(FFFF), its neighbours and 0 (shifted: 0x8000(0000) against 1)."""
    mag = _mag(ukind)
    rng = np.random.default_rng([11, _width(ukind)])
    for m in MS:
        n = 40 * m
        bits = np.array([0, 1, mag - 1, mag], np.uint64)[rng.integers(0, 4, n)].astype(ukind)
        for shift, keep in ((False, None), (True, None), (True, (rng.random(n) < 0.5).astype(np.uint8))):
            for prune in range(1, m):
                run_nm(bits, keep, shift, mag, mag + 1, m, prune, write=True)


# ---------------------------------------------------------------------------------------------
# select16


def check_select(band: np.ndarray, r: int) -> None:
    before = band.copy()
    got = native.select(band, r)
    assert got == int(np.partition(band, r)[r]), f"size={band.size} r={r}"
    same(band, before)


@pytest.fixture
def compiled() -> None:
    if not native.AVAILABLE:
        pytest.skip("the compiled kernels were not built (no C compiler at install); test_kernels_built checks that")


def test_select_small_bands_every_rank(compiled: None) -> None:
    rng = np.random.default_rng(12)
    for size in [*range(1, 41), 64, 65]:
        for spread in ((0, 4), (0, 0x10000), (0x7FF0, 0x8010), (0xFFF0, 0x10000)):
            values = rng.integers(*spread, 6)  # heavy duplicates: a few values, and random ones
            band = np.where(rng.random(size) < 0.7, values[rng.integers(0, 6, size)], rng.integers(*spread, size)).astype(np.uint16)
            for r in range(size):
                check_select(band, r)


def test_select_large_bands(compiled: None) -> None:
    rng = np.random.default_rng(13)
    size = 100_003
    for spread in ((0, 8), (100, 0x10000), (0, 0x10000), (0x7F00, 0x8100)):
        values = rng.integers(*spread, 20)
        band = np.where(rng.random(size) < 0.8, values[rng.integers(0, 20, size)], rng.integers(*spread, size)).astype(np.uint16)
        for r in (0, 1, size // 3, size // 2, size - 2, size - 1, *rng.integers(0, size, 6)):
            check_select(band, int(r))
    band = np.full(size, 0xFFFF, np.uint16)
    band[-1] = 0
    check_select(band, 0)
    check_select(band, size - 1)


# -- mask: packed keep bits applied to the weights' bits --------------------------------------------
@pytest.mark.parametrize("keep_rate", [0.0, 0.3, 0.97, 1.0])
@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_mask_every_length(simd: bool, ukind: type, keep_rate: float) -> None:
    """Kept elements bit-identical, pruned ones +0 (bit pattern 0, a NaN's too); runs of 32 kept
    elements (skipped unwritten by the vector loop) and the tail alike; the bits left as they were."""
    rng = np.random.default_rng(14)
    for n in [*LENGTHS, 4096 + 77]:
        bits = draw(rng, n, ukind)
        keep = rng.random(n) < keep_rate
        keep[: min(n, 64)] = keep_rate > 0.5  # whole words of 32 kept (or pruned) at the start
        packed = np.packbits(keep, bitorder="little")
        before = packed.copy()
        got = bits.copy()
        native.mask(got, packed)
        same(got, np.where(keep, bits, 0).astype(ukind), f"n={n}")
        same(packed, before)


# -- N:M down the rows (a [in, out] weight: transformers' Conv1D) -----------------------------------
def ref_nm_rows(bits: np.ndarray, cols: int, keep: np.ndarray | None, shift: bool, mag: int, m: int, prune: int) -> np.ndarray:
    """:func:`ref_nm` on the transpose: groups are m consecutive rows of each column."""
    t = bits.reshape(-1, cols).T.reshape(-1)
    kt = None if keep is None else keep.reshape(-1, cols).T.reshape(-1)
    return ref_nm(t, kt, shift, mag, m, prune).reshape(cols, -1).T.reshape(-1)


@pytest.mark.parametrize("m", [2, 4, 8, 3])
@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_nm_rows(simd: bool, ukind: type, m: int) -> None:
    """Every prune count; widths that are whole vectors (the AVX2 loop) and not (portable), many
    ties, the top keys, with and without the nested shift; packed bits in C order, pad bits zero."""
    mag = _mag(ukind)
    rng = np.random.default_rng([15, _width(ukind), m])
    for cols in (8, 16, 32, 48, 5, 33, 1):
        for blocks in (0, 1, 3, 7):
            n = blocks * m * cols
            for mode in MODES:
                bits = draw(rng, n, ukind, levels=4 if cols % 2 else 0)
                shift, keep = current(rng, n, mode)
                for prune in range(0, m + 1):
                    kept = ref_nm_rows(bits, cols, keep, shift, mag, m, prune)
                    x = bits.copy()
                    packed = np.full((n + 7) // 8 + 1, 0xFF, np.uint8)
                    where = f"cols={cols} blocks={blocks} m={m} prune={prune} mode={mode}"
                    assert native.nm_rows(x, cols, keep, shift, mag, mag + 1, m, prune, prune % 2 == 0, packed[:-1]) == -1, where
                    same(packed[:-1], np.packbits(kept, bitorder="little"), err_msg=where)
                    assert packed[-1] == 0xFF, where
                    same(x, np.where(kept, bits, 0).astype(ukind) if prune % 2 == 0 else bits, err_msg=where)


@pytest.mark.parametrize("ukind", UKINDS, ids=["u16", "u32"])
def test_nm_rows_not_finite(simd: bool, ukind: type) -> None:
    """A NaN or inf anywhere in a block of m rows returns the block's first element: the blocks
    before it are written, it and the later ones untouched (a block is checked whole first)."""
    mag, m, cols = _mag(ukind), 4, 32
    inf = 0x7F80 if ukind is np.uint16 else 0x7F800000
    rng = np.random.default_rng([16, _width(ukind)])
    blocks = 6
    n = blocks * m * cols
    for block in range(blocks):
        bits = (rng.integers(0, inf, n) | np.where(rng.random(n) < 0.5, mag + 1, 0)).astype(ukind)
        at = (block * m + int(rng.integers(0, m))) * cols + int(rng.integers(0, cols))
        bits[at] = inf | (mag + 1)
        kept = ref_nm_rows(bits, cols, None, False, mag, m, 2)
        x = bits.copy()
        packed = np.zeros((n + 7) // 8, np.uint8)
        assert native.nm_rows(x, cols, None, False, mag, inf, m, 2, True, packed) == block * m * cols
        before = block * m * cols
        same(x[:before], np.where(kept[:before], bits[:before], 0).astype(ukind))
        same(x[before:], bits[before:])
