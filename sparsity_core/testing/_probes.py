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
    """A model, the calibration batches for it, fixed regression targets for those batches (the
    probe loss of gradient sparsifiers: MSE of the model's outputs against them), and which
    parameters to cover (None: the default coverage)."""

    name: str
    model: nn.Module
    batches: list[torch.Tensor]
    targets: list[torch.Tensor]
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
    return _probe("mlp", nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)), (6, 32), seed, dtype)


def conv(seed: int = 0, dtype: torch.dtype = torch.float32) -> Probe:
    """A 4-D weight: Conv2d (8x4x3x3), then a Linear head."""
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    return _probe("conv", model, (2, 4, 4, 4), seed, dtype)


def with_vector(seed: int = 0, dtype: torch.dtype = torch.float32) -> Probe:
    """A 1-D weight: Linear (16x32) followed by LayerNorm (16), both weights covered."""
    return _probe("with_vector", nn.Sequential(nn.Linear(32, 16), nn.LayerNorm(16)), (6, 32), seed, dtype, include=["*.weight"])


def _targets(model: nn.Module, batches: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Float32 targets shaped like the model's outputs, fixed by the seed (not the outputs
    themselves: the loss must not be zero at the start)."""
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        shapes = [model(b).shape for b in batches]
    return [torch.randn(shape, generator=gen) for shape in shapes]


def _probe(name: str, model: nn.Module, shape: tuple[int, ...], seed: int, dtype: torch.dtype, include: list[str] | None = None) -> Probe:
    _init(model, seed)
    model = model.to(dtype)
    batches = [b.to(dtype) for b in _inputs(shape, seed)]
    return Probe(name, model, batches, _targets(model, batches, seed), include)


ProbeFactory = Callable[..., Probe]
