"""A sparsity report: per-name and overall fraction of zeros, printable as a table."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ._engine.kernels import _numpy_kernels


#: float dtypes counted through an integer view of their bits (bf16 too: NumPy has no bf16, but
#: its 16-bit integer view is an ordinary int16 array)
_FLOAT_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}
_NUMPY_DTYPES = (*_FLOAT_BITS, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
_PIECE = 1 << 18


def _count_nonzero(t: torch.Tensor) -> int:
    """Nonzero elements of ``t``, at about the speed of one read on CPU.

    A contiguous float tensor is counted through its bits, in cache-sized pieces: shifting out
    the sign bit leaves zero exactly for +0.0 and -0.0 (masking a negative weight gives -0.0),
    and NumPy counts nonzero integers several times faster than floats; ``torch.count_nonzero``
    is slower still (about 8x one read in bf16). Other CPU dtypes NumPy has:
    ``np.count_nonzero``; the rest (GPU, complex): torch.
    """
    if not _numpy_kernels(t) or t.dtype not in _NUMPY_DTYPES or t.is_conj() or t.is_neg():
        return int(torch.count_nonzero(t))
    bits = _FLOAT_BITS.get(t.dtype)
    if bits is None or not t.is_contiguous():
        if t.dtype == torch.bfloat16:  # no NumPy view of a strided bf16 tensor
            return int(torch.count_nonzero(t))
        return int(np.count_nonzero(t.numpy()))
    flat = t.reshape(-1).view(bits).numpy()
    buf = np.empty(min(_PIECE, flat.size), dtype=flat.dtype)
    count = 0
    for start in range(0, flat.size, _PIECE):
        piece = flat[start : start + _PIECE]
        out = buf[: piece.size]
        np.left_shift(piece, 1, out=out)
        count += int(np.count_nonzero(out))
    return count


@dataclass(frozen=True)
class Row:
    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    #: The tensor's other names (tied weights), besides ``name``.
    aliases: tuple[str, ...] = ()

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


class SparsityReport(Mapping[str, float]):
    """Maps each covered name to its sparsity; ``.overall`` is zeros / elements over all of them.

    A tied tensor is one row (counted once), listed under its first name with its other names in
    ``aliases``; ``report[alias]`` works for any of them, iteration gives the first names."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self._by_name = {r.name: r for r in rows}
        self._by_alias = {a: r for r in rows for a in r.aliases if a not in self._by_name}

    @classmethod
    def measure(
        cls, tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, tuple[str, ...]] | None = None
    ) -> SparsityReport:
        """``aliases``: name -> every name of its tensor (the name itself may be among them)."""
        rows = []
        for name, t in tensors.items():
            others = tuple(a for a in (aliases or {}).get(name, ()) if a != name)
            rows.append(Row(name, tuple(t.shape), t.numel(), t.numel() - _count_nonzero(t.detach()), others))
        return cls(rows)

    def row(self, name: str) -> Row:
        """The row of ``name`` (any of a tied tensor's names)."""
        found = self._by_name.get(name) or self._by_alias.get(name)
        if found is None:
            raise KeyError(name)
        return found

    def __getitem__(self, name: str) -> float:
        return self.row(name).sparsity

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def overall(self) -> float:
        numel = sum(r.numel for r in self.rows)
        return sum(r.zeros for r in self.rows) / numel if numel else 0.0

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.rows)

    def to_dict(self) -> dict[str, object]:
        return {
            "overall": self.overall,
            "layers": [
                {
                    "name": r.name,
                    "aliases": list(r.aliases),
                    "shape": list(r.shape),
                    "numel": r.numel,
                    "zeros": r.zeros,
                    "sparsity": r.sparsity,
                }
                for r in self.rows
            ],
        }

    def table(self, title: str = "Sparsity") -> str:
        """A plain-text table (what ``str(report)`` prints)."""
        header = ("name", "shape", "params", "zeros", "sparsity")
        body = [
            (r.name, "x".join(map(str, r.shape)) or "scalar", f"{r.numel:,}", f"{r.zeros:,}", f"{r.sparsity:7.2%}")
            for r in self.rows
        ]
        body.append(("overall", "", f"{self.numel:,}", f"{sum(r.zeros for r in self.rows):,}", f"{self.overall:7.2%}"))
        if any(r.aliases for r in self.rows):  # tied weights: a column of their other names
            header = (*header, "aliases")
            body = [(*row, ", ".join(r.aliases)) for row, r in zip(body, self.rows)] + [(*body[-1], "")]
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]

        def fmt(row: tuple[str, ...]) -> str:
            cells = (c.ljust(w) if i < 2 or i > 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            return "  ".join(cells).rstrip()

        rule = "-" * len(fmt(header))
        return "\n".join([title, fmt(header), rule, *map(fmt, body[:-1]), rule, fmt(body[-1])])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"SparsityReport(overall={self.overall:.4f}, tensors={len(self.rows)})"
