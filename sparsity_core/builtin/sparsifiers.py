"""Built-in sparsifiers."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._base import ScoreSparsifier

if TYPE_CHECKING:
    import torch


class Magnitude(ScoreSparsifier):
    """Prune the weights of smallest absolute value (|w|)."""

    name = "magnitude"

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.abs()


BUILTIN_SPARSIFIERS = [Magnitude]
