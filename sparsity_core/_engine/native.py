"""The compiled magnitude kernels (``_bitkernels.c``), through ctypes, where they were built.

The package builds them at install time when a C compiler is there (``setup.py``; the extension is
optional). Without them, or with :data:`~.kernels.NATIVE_KERNELS` off, :mod:`.magnitude` runs
its NumPy kernels, which give the same masks. :data:`AVAILABLE` says whether they loaded and
:func:`simd` whether their AVX2 loops run on this CPU (the portable C loops run otherwise).

Each wrapper takes NumPy arrays and plain integers and passes raw pointers: the arrays must be
contiguous and stay alive for the call (they do: the callers hold them).
"""

from __future__ import annotations

from typing import Final

import numpy as np

from .. import _clib
from . import kernels

_LIB: Final = _clib.load()

#: Whether the compiled kernels loaded.
AVAILABLE: Final = _LIB is not None


def enabled() -> bool:
    """Whether the magnitude path uses the compiled kernels now."""
    return AVAILABLE and kernels.NATIVE_KERNELS


def simd() -> bool:
    """Whether the compiled kernels run their AVX2 loops on this CPU."""
    return AVAILABLE and bool(_LIB.sc_simd())  # type: ignore[union-attr]


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _width(bits: np.ndarray) -> int:
    return bits.dtype.itemsize * 8


def census(
    bits: np.ndarray, keep: np.ndarray | None, shift: bool, mag: int, lo: int, blo: int, bhi: int, hi: int,
    band: np.ndarray, cap: int, counts: np.ndarray,
) -> int:
    """One read of ``bits`` (flat unsigned keys' source): adds keys ``< lo``, ``== lo``, ``== hi``
    to ``counts[0:3]`` (``== lo`` and ``== hi`` only where an edge is counted: ``lo == hi``,
    ``blo != lo`` or ``bhi != hi``), the largest sign-cleared key to ``counts[3]``; the keys in
    ``[blo, bhi]`` written to ``band`` (``cap + 16`` long). Returns how many, or -1 past ``cap``."""
    fn = _LIB.sc_census16 if _width(bits) == 16 else _LIB.sc_census32  # type: ignore[union-attr]
    return int(
        fn(_ptr(bits), bits.size, _ptr(keep), int(shift), mag, lo, blo, bhi, hi, _ptr(band), cap, _ptr(counts), int(kernels.NATIVE_SIMD))
    )


def apply(bits: np.ndarray, keep: np.ndarray | None, shift: bool, mag: int, t_keep: int, tcut: int, left: int, write: bool, packed: np.ndarray) -> None:
    """One read (and write, with ``write``) of ``bits``: keep keys ``>= t_keep``, but while
    ``left`` ties of key ``tcut`` are still to go, the earliest of them are pruned (and then keys
    ``>= tcut`` kept); the keep bits into ``packed``; pruned weights zeroed when ``write``."""
    fn = _LIB.sc_apply16 if _width(bits) == 16 else _LIB.sc_apply32  # type: ignore[union-attr]
    fn(_ptr(bits), bits.size, _ptr(keep), int(shift), mag, t_keep, tcut, left, int(write), _ptr(packed), int(kernels.NATIVE_SIMD))


def nm(bits: np.ndarray, keep: np.ndarray | None, shift: bool, mag: int, inf: int, m: int, prune: int, write: bool, packed: np.ndarray) -> int:
    """N:M over runs of ``m`` of ``bits``: the keep bits into ``packed``, pruned weights zeroed
    when ``write``. Returns -1, or the first element of a run holding NaN or inf (the runs before
    it are written)."""
    fn = _LIB.sc_nm16 if _width(bits) == 16 else _LIB.sc_nm32  # type: ignore[union-attr]
    return int(fn(_ptr(bits), bits.size, _ptr(keep), int(shift), mag, inf, m, prune, int(write), _ptr(packed), int(kernels.NATIVE_SIMD)))


def select(band: np.ndarray, r: int) -> int:
    """The key of rank ``r`` (0-based) in ``band`` (16-bit keys, left as they are):
    ``np.partition(band, r)[r]`` without the copy, in a few counting passes; -1 if its 256 KiB of
    counts cannot be had."""
    return int(_LIB.sc_select16(_ptr(band), band.size, r))  # type: ignore[union-attr]


def nm_rows(bits: np.ndarray, cols: int, keep: np.ndarray | None, shift: bool, mag: int, inf: int, m: int, prune: int, write: bool, packed: np.ndarray) -> int:
    """:func:`nm` down the rows of ``bits`` seen as ``(-1, cols)``: groups of ``m`` rows in each
    column (a ``[in, out]`` weight, transformers' ``Conv1D``). Returns -1, or the first element of
    the block of ``m`` rows holding NaN or inf (the blocks before it are written)."""
    fn = _LIB.sc_nm_rows16 if _width(bits) == 16 else _LIB.sc_nm_rows32  # type: ignore[union-attr]
    rows = bits.size // cols if cols else 0
    return int(fn(_ptr(bits), rows, cols, _ptr(keep), int(shift), mag, inf, m, prune, int(write), _ptr(packed), int(kernels.NATIVE_SIMD)))


def mask(bits: np.ndarray, packed: np.ndarray) -> None:
    """Zero the elements of ``bits`` (flat 16- or 32-bit view of the weights) whose bit in
    ``packed`` is clear, in one read+write pass (words of 32 kept elements are not written)."""
    fn = _LIB.sc_mask16 if _width(bits) == 16 else _LIB.sc_mask32  # type: ignore[union-attr]
    fn(_ptr(bits), bits.size, _ptr(packed), int(kernels.NATIVE_SIMD))
