"""A sparsifier that needs gradients and records every one it is handed (contract v2 tests)."""

from __future__ import annotations

from typing import Any

import torch

from sparsity_core import Capabilities, ScoreSparsifier


class GradProbe(ScoreSparsifier):
    """Magnitude scores; records every gradient it is handed (name, live tensor, its value, grad)."""

    name = "grad_probe_test"
    capabilities = Capabilities(gradients=True)

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.seen: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def observe_gradient(self, name: str, tensor: torch.Tensor, grad: torch.Tensor) -> None:
        self.seen.append((name, tensor, tensor.detach().clone(), grad.detach().clone()))

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.abs()
