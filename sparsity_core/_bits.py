"""1-bit masks: a bool keep mask held packed, 8 elements per byte, and applied in pieces.

A bool mask costs one byte per weight: a quarter of an fp32 model, half of a bf16 one. A
:class:`PackedMask` holds the same mask in one bit per weight (the flattened mask in C order,
bit ``i % 8`` of byte ``i // 8``, NumPy's ``bitorder="little"``; the pad bits of the last byte are
zero) and never unpacks it whole to apply it: :meth:`PackedMask.apply_` unpacks :data:`CHUNK`
elements at a time and zeroes that piece of the tensor while both are in cache.

On CPU the kernels are NumPy's (``packbits``/``unpackbits`` on a uint8 view; torch has no
packbits); elsewhere plain torch shifts and masks. bf16 and fp16 weights are zeroed through
their 16-bit integer view (NumPy has no bf16, and its fp16 arithmetic is slow): multiplying the
bits by 0 or 1 keeps them or makes ``+0.0``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Final

import numpy as np
import torch

Tensor = torch.Tensor

#: Elements unpacked at a time when a mask is applied: the unpacked piece (64 KiB) and the piece
#: of weights stay in cache, and the per-piece overhead is a few microseconds (measured best
#: between 2^16 and 2^17 on 2^25 fp32 weights; benchmarks/engine.py --apply).
CHUNK: Final = 1 << 16

#: Elements unpacked at a time by the torch kernels (accelerators): each piece is a few kernel
#: launches, so pieces are large there; memory is not the constraint it is on the host.
TORCH_CHUNK: Final = 1 << 24

#: Set bits in each byte value.
_POPCOUNT: Final = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1).astype(np.uint8)
#: Bytes counted at a time by :meth:`PackedMask.kept` (its temporaries stay small).
_COUNT_BYTES: Final = 1 << 16
#: dtypes zeroed through an integer view of the same width: (NumPy has no bf16; its fp16 is slow).
_INT_VIEWS: Final = {torch.bfloat16: torch.int16, torch.float16: torch.int16}
_NUMPY_FLOATS: Final = (torch.float32, torch.float64)
#: dtypes the compiled kernels mask through their bits (``_engine/native.py``)
_BIT_VIEWS: Final = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def packed_size(numel: int) -> int:
    """Bytes of a packed mask of ``numel`` elements."""
    return (numel + 7) // 8


def _numpy(t: Tensor) -> bool:
    """NumPy or torch: the engine's one switch (``engine.kernels.NUMPY_KERNELS``), so that the
    torch paths that run on accelerators are tested on CPU with the engine's."""
    from ._engine import kernels  # the engine imports this module: bound at call time

    return t.is_cpu and kernels.NUMPY_KERNELS


def _shifts(device: torch.device) -> Tensor:
    return torch.arange(8, dtype=torch.uint8, device=device)


class PackedMask:
    """A bool keep mask (True = keep) stored 1 bit per element; see the module docstring.

    Immutable by convention, like the bool masks it replaces: masks are replaced, never changed
    in place, so identity tells whether a mask is still the one in force.
    """

    __slots__ = ("data", "shape", "_kept")

    def __init__(self, data: Tensor, shape: torch.Size | tuple[int, ...], kept: int | None = None) -> None:
        shape = torch.Size(shape)
        if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != packed_size(shape.numel()):
            raise ValueError(
                f"packed mask data must be a 1-D uint8 tensor of {packed_size(shape.numel())} bytes for shape "
                f"{tuple(shape)}, got {data.dtype} {tuple(data.shape)}"
            )
        self.data = data
        self.shape = shape
        self._kept = kept

    @classmethod
    def pack(cls, mask: Tensor) -> PackedMask:
        """Pack a bool mask (any shape, any strides, any device; stays on its device)."""
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"only a bool mask can be packed, got {got}")
        flat = mask.detach().reshape(-1)
        if _numpy(flat):
            data = torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
        else:
            pad = (-flat.numel()) % 8
            bits = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
            data = (bits.view(-1, 8).to(torch.uint8) << _shifts(flat.device)).sum(1, dtype=torch.uint8)
        return cls(data, mask.shape)

    # -- what it is ----------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        """Bytes held (an eighth of the bool mask's, rounded up)."""
        return self.data.numel()

    def kept(self) -> int:
        """How many elements the mask keeps (counted once, then remembered)."""
        if self._kept is None:
            kept = 0
            count = getattr(np, "bitwise_count", None)  # NumPy >= 2
            host = _numpy(self.data)
            # on an accelerator each piece is a few launches and a synchronisation: large pieces
            step = _COUNT_BYTES if host else TORCH_CHUNK // 8
            shifts = None if host else _shifts(self.data.device)
            for s in range(0, self.data.numel(), step):
                piece = self.data[s : s + step]
                if host:
                    kept += int((count(piece.numpy()) if count else _POPCOUNT[piece.numpy()]).sum(dtype=np.int64))
                else:
                    kept += int(((piece.unsqueeze(-1) >> shifts) & 1).sum())
            self._kept = kept
        return self._kept

    def pruned(self) -> int:
        return self.numel - self.kept()

    def prunes(self) -> bool:
        """Whether the mask prunes anything (an all-True mask costs no pass to apply)."""
        return self.kept() != self.numel

    def pad_bits_clear(self) -> bool:
        """Whether the pad bits of the last byte are zero (a saved mask that was damaged may not be)."""
        tail = self.numel % 8
        return tail == 0 or int(self.data[-1]) >> tail == 0

    def __repr__(self) -> str:
        return f"PackedMask(shape={tuple(self.shape)}, kept={self.kept()}, device={self.device})"

    # -- unpacking -----------------------------------------------------------------------------
    def unpack(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Flat bool keep mask of elements ``start:stop`` (only their bytes are unpacked)."""
        stop = self.numel if stop is None else stop
        if not 0 <= start <= stop <= self.numel:
            raise ValueError(f"unpack: elements {start}:{stop} are outside the mask's {self.numel}")
        skip = start % 8  # a start inside a byte: unpack from the byte's first element
        piece = self.data[start >> 3 : (stop + 7) >> 3]
        if _numpy(piece):
            bits = np.unpackbits(piece.numpy(), count=stop - start + skip, bitorder="little").view(np.bool_)
            return torch.from_numpy(bits[skip:] if skip else bits)
        bits = (piece.unsqueeze(-1) >> _shifts(piece.device)) & 1
        return bits.view(-1)[skip : stop - start + skip].bool()

    def to_bool(self) -> Tensor:
        """The bool mask, unpacked whole (one byte per element)."""
        return self.unpack().view(self.shape)

    def at(self, index: Tensor) -> Tensor:
        """Bool keep values at flat positions ``index`` (only the bytes holding them are read)."""
        index = index.to(self.device)
        return ((self.data[index >> 3] >> (index & 7).to(torch.uint8)) & 1).bool()

    def to(self, device: torch.device | str) -> PackedMask:
        device = torch.device(device)
        if self.device == device:
            return self
        return PackedMask(self.data.to(device), self.shape, self._kept)

    # -- applying ------------------------------------------------------------------------------
    @torch.no_grad()
    def apply_(self, tensor: Tensor) -> None:
        """Zero the pruned elements of ``tensor`` (same shape) in place, :data:`CHUNK` at a time."""
        if tensor.shape != self.shape:
            raise ValueError(f"mask of shape {tuple(self.shape)} cannot be applied to a tensor of shape {tuple(tensor.shape)}")
        t = tensor.detach()
        n = self.numel
        if not t.is_contiguous() or t.layout is not torch.strided:
            t.mul_(self.to_bool().to(t.device))
            return
        data = self.data if self.device == t.device else self.data.to(t.device)
        from ._engine import native  # the engine imports this module: bound at call time

        if _numpy(t) and t.dtype in _BIT_VIEWS and native.enabled():
            # one compiled read+write pass over the weights' bits (pruned: +0): no unpacked piece
            native.mask(t.view(_BIT_VIEWS[t.dtype]).numpy().reshape(-1), data.numpy())
            return
        if _numpy(t) and (t.dtype in _NUMPY_FLOATS or t.dtype in _INT_VIEWS):
            view = t.view(_INT_VIEWS[t.dtype]) if t.dtype in _INT_VIEWS else t
            flat, bits = view.numpy().reshape(-1), data.numpy()
            for s in range(0, n, CHUNK):
                e = min(n, s + CHUNK)
                keep = np.unpackbits(bits[s >> 3 : (e + 7) >> 3], count=e - s, bitorder="little").view(np.bool_)
                np.multiply(flat[s:e], keep, out=flat[s:e])
            return
        flat = t.view(-1)
        mask = PackedMask(data, self.shape, self._kept) if data is not self.data else self
        for s in range(0, n, TORCH_CHUNK):
            e = min(n, s + TORCH_CHUNK)
            flat[s:e].mul_(mask.unpack(s, e))


class MaskView(Mapping[str, Tensor]):
    """A read-only mapping of names to bool masks, unpacked from packed storage on each access.

    ``controller.masks[name]`` stays a bool tensor for its readers while the controller holds one
    bit per weight; each access unpacks a fresh tensor (writing into it changes nothing)."""

    __slots__ = ("_packed",)

    def __init__(self, packed: Mapping[str, PackedMask]) -> None:
        self._packed = packed

    def __getitem__(self, name: str) -> Tensor:
        return self._packed[name].to_bool()

    def __iter__(self) -> Iterator[str]:
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def __contains__(self, name: object) -> bool:
        return name in self._packed

    def packed(self) -> Mapping[str, PackedMask]:
        """The packed masks themselves (read them, do not change them)."""
        return self._packed

    def __repr__(self) -> str:
        return f"MaskView({{{', '.join(f'{n!r}: {m!r}' for n, m in self._packed.items())}}})"
