"""Built-in sparsifiers: ``magnitude``, ``random`` and ``data_norm``."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from .._base import ScoreSparsifier, Sparsifier
from .._contract import Capabilities
from .._specs import ScoreSpec, SparsifierSpec

if TYPE_CHECKING:
    import torch


class Magnitude(ScoreSparsifier):
    """Prune the weights of smallest absolute value (|w|)."""

    name = "magnitude"
    elementwise = True
    # |w| orders like the sign-cleared bits of w: the engine may select on the bits (_engine/magnitude.py)
    ranks_like_magnitude = True
    # |w| depends on the element alone: on row shards the engine's selection makes the masks exact
    capabilities = Capabilities(shard_safe=True)

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.abs()


class RandomSpec(ScoreSpec):
    seed: int = Field(
        0, ge=0, description="Seed of the random scores; with the name and shape it fixes every mask."
    )


#: Elements hashed at a time by :func:`uniform_at` (its int64 temporaries stay cache-sized).
_HASH_PIECE = 1 << 18


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x < 2**32``, in halves so that no product overflows int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (Wellons' "lowbias32"), on int64 tensors < 2**32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_at(key: int, start: int, n: int, device: torch.device | None = None) -> torch.Tensor:
    """Float32 draws in [0, 1) for flat indices ``start .. start + n`` of a stream fixed by ``key``
    (32 bits): each draw depends on its index alone, so any slice of a tensor (a rank's rows under
    FSDP2) gets exactly its part of the whole tensor's draws, on any device."""
    import torch

    from .._engine.kernels import _numpy_kernels

    out = torch.empty(n, dtype=torch.float32, device=device)
    if _numpy_kernels(out):
        _uniform_numpy(key, start, out.numpy())
        return out
    for at in range(0, n, _HASH_PIECE):
        index = torch.arange(start + at, start + min(n, at + _HASH_PIECE), dtype=torch.int64, device=device)
        high = _mix32((index >> 32) ^ (key & 0xFFFFFFFF))  # indices past 2**32 take another stream
        bits = _mix32((index & 0xFFFFFFFF) ^ high)
        out[at : at + index.numel()] = (bits >> 8).to(torch.float32) * 2.0**-24  # 24 bits: exact in float32
    return out


def _uniform_numpy(key: int, start: int, out: Any) -> None:
    """:func:`uniform_at` into a float32 NumPy array: the same function in uint32 arithmetic,
    whose multiplications wrap mod 2**32 by themselves (several times faster than int64 halves)."""
    import numpy as np

    c1, c2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)

    def mix(x: Any) -> None:
        np.bitwise_xor(x, x >> np.uint32(16), out=x)
        np.multiply(x, c1, out=x)
        np.bitwise_xor(x, x >> np.uint32(15), out=x)
        np.multiply(x, c2, out=x)
        np.bitwise_xor(x, x >> np.uint32(16), out=x)

    x = np.empty(min(out.size, _HASH_PIECE), dtype=np.uint32)
    for at in range(0, out.size, _HASH_PIECE):
        first, count = start + at, min(out.size - at, _HASH_PIECE)
        piece = x[:count]
        # pieces never straddle 2**32: split them where the high half of the index changes
        split = min(count, (1 << 32) - (first & 0xFFFFFFFF))
        for lo, hi_index, m in ((0, first, split), (split, first + split, count - split)):
            if m <= 0:
                continue
            high = np.array([((hi_index >> 32) ^ key) & 0xFFFFFFFF], dtype=np.uint32)
            mix(high)
            seg = piece[lo : lo + m]
            seg[:] = np.arange(hi_index & 0xFFFFFFFF, (hi_index & 0xFFFFFFFF) + m, dtype=np.uint64).astype(np.uint32)
            np.bitwise_xor(seg, high[0], out=seg)
            mix(seg)
        np.multiply((piece >> np.uint32(8)).astype(np.float32), np.float32(2.0**-24), out=out[at : at + count])


class Random(ScoreSparsifier):
    """Prune at random: masks depend only on the seed, the tensor's name and its shape (same on every rank, and the same on row shards as on the whole tensor)."""

    name = "random"
    Spec = RandomSpec
    spec: RandomSpec
    capabilities = Capabilities(shard_safe=True)

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        # crc32, not hash(): Python salts str hashes per process, and every DDP rank must agree.
        key = zlib.crc32(f"{self.spec.seed}\0{name}".encode())
        return uniform_at(key, self.first_index(name), tensor.numel(), tensor.device).view(tensor.shape)


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
            mask = data_norm_mask(name, tensor, float(levels[name]), block, zeros, spec.norm, apply=applied is not None)
            if applied is None:
                masks[name] = mask
            else:
                applied[name] = mask  # handed over (the controller packs it), not kept here
        return masks if applied is None else applied


BUILTIN_SPARSIFIERS = [Magnitude, Random, DataNorm]
