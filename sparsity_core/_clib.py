"""The compiled library (``_engine/_bitkernels.c``) through ctypes, found without importing torch.

The engine's wrappers (``_engine/native.py``) and ``sparsity --version`` (which must not import
torch) both load it from here: one place that knows where the file is and what each function takes.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
from pathlib import Path

_V, _I64, _INT, _U64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint64


def path() -> Path | None:
    """The built library beside the engine's modules (editable install or wheel), if any."""
    folder = Path(__file__).parent / "_engine"
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = folder / f"_bitkernels{suffix}"
        if candidate.exists():
            return candidate
    return None


@functools.cache
def load() -> ctypes.CDLL | None:
    """The library with every function's argument types set, or None where it was not built (no C
    compiler at install) or does not load."""
    where = path()
    if where is None:
        return None
    try:
        lib = ctypes.CDLL(str(where))
    except OSError:
        return None
    for width, key in ((16, ctypes.c_uint16), (32, ctypes.c_uint32)):
        census = getattr(lib, f"sc_census{width}")
        census.argtypes = [_V, _I64, _V, _INT, key, key, key, key, key, _V, _I64, _V, _INT]
        census.restype = _I64
        apply = getattr(lib, f"sc_apply{width}")
        apply.argtypes = [_V, _I64, _V, _INT, key, _U64, key, _I64, _INT, _V, _INT]
        apply.restype = None
        nm = getattr(lib, f"sc_nm{width}")
        nm.argtypes = [_V, _I64, _V, _INT, key, key, _INT, _INT, _INT, _V, _INT]
        nm.restype = _I64
        rows = getattr(lib, f"sc_nm_rows{width}")
        rows.argtypes = [_V, _I64, _I64, _V, _INT, key, key, _INT, _INT, _INT, _V, _INT]
        rows.restype = _I64
        mask = getattr(lib, f"sc_mask{width}")
        mask.argtypes = [_V, _I64, _V, _INT]
        mask.restype = None
    lib.sc_select16.argtypes = [_V, _I64, _I64]
    lib.sc_select16.restype = _I64
    lib.sc_simd.argtypes = []
    lib.sc_simd.restype = _INT
    lib.sc_simd()  # the CPU check and its tables, once, here: ctypes calls run without the GIL
    return lib
