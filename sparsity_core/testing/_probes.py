"""The small models and calibration batches the conformance checks run implementations on.

Shapes are chosen so that every pattern the core offers applies cleanly: input dimensions are
multiples of 4 (for ``1x4`` blocks and ``2:4``), and calibration inputs have a different scale per
feature (so that activation-aware scores differ from plain magnitude).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Probe:
    """A model, the calibration batches for it, and which parameters to cover (None: default)."""

    model: nn.Module
    batches: list[torch.Tensor]
    include: list[str] | None = None


def _init(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            # Distinct magnitudes everywhere: ties would make ordering checks vacuous.
            p.copy_(torch.randn(p.shape, generator=gen))


def _inputs(shape: tuple[int, ...], seed: int, n: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1)
    features = shape[1]
    # Per-feature scales spanning two orders of magnitude, and one dead feature.
    scale = torch.logspace(-1, 1, features)
    scale[0] = 0.0
    view = (1, features) + (1,) * (len(shape) - 2)
    return [torch.randn(shape, generator=gen) * scale.view(view) for _ in range(n)]


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> Probe:
    """Two Linear layers: weights 16x32 and 8x16."""
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    _init(model, seed)
    return Probe(model.to(dtype), [b.to(dtype) for b in _inputs((6, 32), seed)])


def conv(seed: int = 0, dtype: torch.dtype = torch.float32) -> Probe:
    """A 4-D weight: Conv2d (8x4x3x3), then a Linear head."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    _init(model, seed)
    return Probe(model.to(dtype), [b.to(dtype) for b in _inputs((2, 4, 4, 4), seed)])


def with_vector(seed: int = 0, dtype: torch.dtype = torch.float32) -> Probe:
    """A 1-D weight: Linear (16x32) followed by LayerNorm (16), both weights covered."""
    model = nn.Sequential(nn.Linear(32, 16), nn.LayerNorm(16))
    _init(model, seed)
    return Probe(model.to(dtype), [b.to(dtype) for b in _inputs((6, 32), seed)], include=["*.weight"])


ProbeFactory = Callable[..., Probe]
