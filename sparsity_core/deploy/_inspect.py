"""``sparsity inspect``: the per-tensor sparsity of a saved checkpoint, whatever its format.

Formats: a safetensors file (ours, compressed, or any other: read through :func:`load_sparse`,
which also decompresses compressed-tensors' sparse-bitmask groups), a Lightning checkpoint (its
``state_dict``) or a torch state dict, both read with ``torch.load(weights_only=True)``.
A file holds tensors, not modules, so N:M patterns are judged along the last dim of 2-D tensors
(the input axis of ``nn.Linear``'s ``[out, in]``), and, where none holds there, along dim 0 (the
input axis of a transformers ``Conv1D``, which stores ``[in, out]``), marked ``(dim 0)``; tensors
of other ranks get no verdict.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from torch import Tensor

from .._report import _count_nonzero
from ._format import load_sparse, storage_of

PATTERNS: Final = ((1, 2), (1, 4), (2, 4), (2, 8), (4, 8))
AXIS_NOTE: Final = (
    "N:M along the last dim of 2-D tensors (the reduction axis of nn.Linear's [out, in]) or, marked "
    "'(dim 0)', along dim 0 (that of a transformers Conv1D's [in, out]): a file carries no module types; "
    "other ranks get none"
)


@dataclass(frozen=True)
class TensorStats:
    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    zeros: int
    storage: str
    patterns: tuple[str, ...] | None  # N:M patterns met along the last dim; None: not judged

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


def _is_safetensors(path: Path) -> bool:
    """safetensors files start with a little-endian u64 header size, then a JSON object."""
    with path.open("rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    (size,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and size <= path.stat().st_size - 8


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[str, dict[str, Tensor], dict[str, str]]:
    """(format name, tensors, storage per tensor) of the file at ``path``; never unpickles objects."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    if _is_safetensors(path):
        storage = storage_of(path)
        tensors = load_sparse(path)
        if storage is not None:
            return "sparsity-core compressed safetensors (sparse-bitmask)", tensors, storage
        return "safetensors", tensors, {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for a pickled object, RuntimeError for other bytes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{path}: neither safetensors nor a torch file of tensors (loaded with weights_only=True): {first}"
        ) from exc
    fmt = "torch state dict"
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        fmt, obj = "Lightning checkpoint (state_dict)", obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{path}: no tensors in it")
    return fmt, tensors, {}


def _met(nonzero: Tensor) -> list[str]:
    rows, cols = nonzero.shape
    return [
        f"{n}:{m}" for n, m in PATTERNS
        if cols % m == 0 and nonzero.numel() and bool((nonzero.reshape(rows, -1, m).sum(-1) <= n).all())
    ]


def nm_patterns(t: Tensor) -> tuple[str, ...] | None:
    """The N:M patterns of :data:`PATTERNS` that ``t`` (2-D) meets along its last dim, or, where
    none does, along dim 0 (marked ``"(dim 0)"``: a transformers ``Conv1D`` weight is ``[in, out]``)."""
    if t.dim() != 2 or t.is_complex():
        return None
    nonzero = t != 0
    met = _met(nonzero)
    if not met:
        met = [f"{p} (dim 0)" for p in _met(nonzero.t().contiguous())]
    return tuple(met)


def _two_four(patterns: tuple[str, ...] | None) -> bool:
    return bool(patterns) and any(p.split()[0] == "2:4" for p in patterns)  # type: ignore[union-attr]


def inspect_checkpoint(path: str | os.PathLike[str]) -> tuple[str, list[TensorStats]]:
    fmt, tensors, storage = read_checkpoint(path)
    stats = []
    for name, t in tensors.items():
        t = t.detach()
        stats.append(TensorStats(
            name=name,
            shape=tuple(t.shape),
            dtype=str(t.dtype).removeprefix("torch."),
            numel=t.numel(),
            zeros=t.numel() - _count_nonzero(t),
            storage=storage.get(name, "-"),
            patterns=nm_patterns(t),
        ))
    return fmt, stats


def _overall(stats: list[TensorStats]) -> float:
    numel = sum(s.numel for s in stats)
    return sum(s.zeros for s in stats) / numel if numel else 0.0


def to_json(path: str | os.PathLike[str], fmt: str, stats: list[TensorStats]) -> dict[str, Any]:
    matrices = [s for s in stats if len(s.shape) >= 2]
    return {
        "path": os.fspath(path),
        "format": fmt,
        "overall": _overall(stats),
        "weights_overall": _overall(matrices),
        "nm_axis": AXIS_NOTE,
        "two_four": [s.name for s in stats if _two_four(s.patterns)],
        "tensors": [
            {
                "name": s.name,
                "shape": list(s.shape),
                "dtype": s.dtype,
                "numel": s.numel,
                "zeros": s.zeros,
                "sparsity": s.sparsity,
                "storage": s.storage,
                "nm": list(s.patterns) if s.patterns is not None else None,
                "two_four": None if s.patterns is None else _two_four(s.patterns),
            }
            for s in stats
        ],
    }


def plot(stats: list[TensorStats], out: str | os.PathLike[str], title: str) -> int:
    """A horizontal bar chart of the sparsity of each tensor of rank >= 2 (all tensors if none is)
    written to ``out`` (PNG); returns the number of bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in stats if len(s.shape) >= 2] or stats
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.3 * len(shown) + 1.2)), dpi=110)
    ax.barh(range(len(shown)), [100 * s.sparsity for s in shown], color="tab:red")
    ax.set_yticks(range(len(shown)), [s.name for s in shown], fontsize=8)
    for i, s in enumerate(shown):
        ax.text(min(100 * s.sparsity + 1, 88), i, f"{s.sparsity:.1%}", va="center", fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("zeros (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)
    return len(shown)
