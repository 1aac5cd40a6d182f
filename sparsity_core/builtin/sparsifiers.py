"""Built-in sparsifiers: ``magnitude``, ``random`` and ``data_norm``."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from .._base import ScoreSparsifier, Sparsifier
from .._specs import ScoreSpec, SparsifierSpec

if TYPE_CHECKING:
    import torch


class Magnitude(ScoreSparsifier):
    """Prune the weights of smallest absolute value (|w|)."""

    name = "magnitude"
    elementwise = True
    ranks_like_magnitude = True

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.abs()


class RandomSpec(ScoreSpec):
    seed: int = Field(
        0, ge=0, description="Seed of the random scores; with the name and shape it fixes every mask."
    )


class Random(ScoreSparsifier):
    """Prune at random: masks depend only on the seed, the tensor's name and its shape (same on every rank)."""

    name = "random"
    Spec = RandomSpec
    spec: RandomSpec

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        import torch

        # crc32, not hash(): Python salts str hashes per process, and every DDP rank must agree.
        # (The CPU generator keeps only 32 bits of its seed, so seed and name are hashed together.)
        generator = torch.Generator().manual_seed(zlib.crc32(f"{self.spec.seed}\0{name}".encode()))
        return torch.rand(tensor.shape, generator=generator).to(tensor.device)


class DataNormSpec(SparsifierSpec):
    sparse_block_shape: tuple[int, int] = Field(
        (1, 4), description="Shape (rows, cols) of the blocks over the 2-D view; blocks start at index 0."
    )
    zeros_per_block: int | None = Field(
        None,
        ge=0,
        description=(
            "Zeros in each pruned block: its elements of lowest norm. Default: the whole block."
        ),
    )
    norm: Literal["L1", "L2"] = Field("L1", description="Block norm: 'L1' (mean |x|) or 'L2' (mean x^2).")

    @model_validator(mode="after")
    def _check_block(self) -> DataNormSpec:
        h, w = self.sparse_block_shape
        if h < 1 or w < 1:
            raise ValueError(f"sparse_block_shape must be positive, got {self.sparse_block_shape}")
        if self.zeros_per_block is not None and self.zeros_per_block > h * w:
            raise ValueError(
                f"zeros_per_block={self.zeros_per_block} exceeds the {h * w} elements of a "
                f"{h}x{w} block"
            )
        return self


class DataNorm(Sparsifier):
    """The seed's DataNormSparsifier: prune the blocks of lowest mean L1/L2 norm, then zeros_per_block inside each."""

    name = "data_norm"
    Spec = DataNormSpec
    spec: DataNormSpec

    def compute_masks(
        self, tensors: Mapping[str, torch.Tensor], levels: Mapping[str, float]
    ) -> dict[str, torch.Tensor]:
        return self.masks_applied(tensors, levels, None)

    def masks_applied(
        self,
        tensors: Mapping[str, torch.Tensor],
        levels: Mapping[str, float],
        applied: dict[str, torch.Tensor] | None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`compute_masks`; with ``applied`` (a dict) each tensor is also masked in place,
        band by band while in cache, and its mask recorded there as soon as it is done."""
        from .._engine import data_norm_mask

        masks = {}
        for name, tensor in tensors.items():
            spec = self.spec_for(name)
            assert isinstance(spec, DataNormSpec)
            block = spec.sparse_block_shape
            zeros = block[0] * block[1] if spec.zeros_per_block is None else spec.zeros_per_block
            masks[name] = data_norm_mask(
                name, tensor, float(levels[name]), block, zeros, spec.norm, apply=applied is not None
            )
            if applied is not None:
                applied[name] = masks[name]
        return masks


BUILTIN_SPARSIFIERS = [Magnitude, Random, DataNorm]
