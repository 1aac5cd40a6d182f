"""A sparsity report: per-name and overall fraction of zeros, printable as a table."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Row:
    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


class SparsityReport(Mapping[str, float]):
    """Maps each covered name to its sparsity; ``.overall`` is zeros / elements over all of them."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows
        self._by_name = {r.name: r for r in rows}

    @classmethod
    def measure(cls, tensors: Mapping[str, torch.Tensor]) -> SparsityReport:
        rows = []
        for name, t in tensors.items():
            zeros = int(t.numel() - torch.count_nonzero(t.detach()))
            rows.append(Row(name, tuple(t.shape), t.numel(), zeros))
        return cls(rows)

    def __getitem__(self, name: str) -> float:
        return self._by_name[name].sparsity

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
                {"name": r.name, "shape": list(r.shape), "numel": r.numel, "zeros": r.zeros, "sparsity": r.sparsity}
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
        widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]

        def fmt(row: tuple[str, ...]) -> str:
            return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        rule = "-" * len(fmt(header))
        return "\n".join([title, fmt(header), rule, *map(fmt, body[:-1]), rule, fmt(body[-1])])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"SparsityReport(overall={self.overall:.4f}, tensors={len(self.rows)})"
