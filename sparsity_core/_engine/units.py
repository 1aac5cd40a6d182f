"""Scores in float32 pieces (:class:`Scorer`) and the units a selection keeps or prunes whole:
elements and aligned blocks."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .._bits import PackedMask, packed_size
from .._layers import TensorLayout, generic_layout
from . import kernels
from .kernels import _all_finite, _count, Tensor

if TYPE_CHECKING:
    from .._base import ScoreSparsifier


class Scorer:
    """Float32 importance of one tensor, whole or in pieces, checked for NaN/inf.

    ``layout`` orients the tensor: :meth:`rows` reads rows of its ``[outputs, reduction]`` matrix
    view (see :mod:`._layers`). ``keep``, the current mask (contract v2's nested policy), forces
    every currently pruned element to score ``-inf``: it is pruned again first, and the level is
    still met exactly by the selection. It may be packed (the controller's 1-bit masks): only the
    piece of it in hand is then unpacked."""

    __slots__ = ("_flat", "_full", "elementwise", "keep", "layout", "name", "sparsifier", "tensor")

    def __init__(
        self,
        sparsifier: ScoreSparsifier,
        name: str,
        tensor: Tensor,
        layout: TensorLayout | None = None,
        keep: Tensor | PackedMask | None = None,
    ) -> None:
        self.sparsifier = sparsifier
        self.name = name
        self.tensor = tensor.detach()
        self.layout = layout if layout is not None else generic_layout()
        prunes = keep is not None and (keep.prunes() if isinstance(keep, PackedMask) else not bool(keep.all()))
        self.keep = keep if prunes else None
        self.elementwise = bool(getattr(sparsifier, "elementwise", False))
        self._full: Tensor | None = None
        self._flat: Tensor | None = None

    def _score(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        s = self.sparsifier.score(self.name, x)
        if not isinstance(s, torch.Tensor) or s.shape != x.shape:
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(
                f"sparsifier {self.sparsifier.name!r}: score({self.name!r}, tensor) must return a "
                f"tensor shaped like its input {tuple(x.shape)}, got {got}"
            )
        s = s.detach().to(torch.float32)
        if not _all_finite(s):
            raise ValueError(
                f"tensor {self.name!r} has NaN or inf values (or importance scores): cannot choose "
                f"a mask for it; check the weights (sparsifier {self.sparsifier.name!r})"
            )
        if keep is not None:
            if s.data_ptr() == x.data_ptr() or s._base is not None:  # never write into the caller's tensor
                s = s.clone()
            s.masked_fill_(~keep.to(s.device), -math.inf)
        return s

    @property
    def flat(self) -> Tensor:
        if self._flat is None:
            self._flat = self.tensor.reshape(-1)
        return self._flat

    def full(self) -> Tensor:
        """The whole score tensor (kept until :meth:`release`)."""
        if self._full is None:
            keep = self.keep.to_bool() if isinstance(self.keep, PackedMask) else self.keep
            self._full = self._score(self.tensor, keep).contiguous()
        return self._full

    def piece(self, start: int, end: int) -> Tensor:
        if self.elementwise:
            keep = self.keep
            if keep is not None:
                keep = keep.unpack(start, end) if isinstance(keep, PackedMask) else keep.reshape(-1)[start:end]
            return self._score(self.flat[start:end], keep)
        return self.full().view(-1)[start:end]

    def rows(self, r0: int, r1: int) -> Tensor:
        """Scores of rows ``r0:r1`` of the matrix view."""
        if self.elementwise:
            keep = self.keep
            if isinstance(keep, PackedMask):
                if self.layout.is_identity(self.tensor.dim()):  # rows of the view are a flat range
                    cols = self.shape2d[1]
                    keep = keep.unpack(r0 * cols, r1 * cols).view(r1 - r0, cols)
                else:
                    keep = self.layout.matrix(keep.to_bool())[r0:r1]
            elif keep is not None:
                keep = self.layout.matrix(keep)[r0:r1]
            return self._score(self.layout.matrix(self.tensor)[r0:r1], keep)
        return self.layout.matrix(self.full())[r0:r1]

    def at(self, index: Tensor) -> Tensor:
        if isinstance(self.keep, PackedMask) and self.elementwise:
            return self._score(self.flat[index.to(self.flat.device)], self.keep.at(index)).cpu()
        if self.elementwise:
            keep = None if self.keep is None else self.keep.reshape(-1)[index.to(self.keep.device)]
            return self._score(self.flat[index.to(self.flat.device)], keep).cpu()
        return self.full().view(-1)[index.to(self._full.device)].cpu()  # type: ignore[union-attr]

    @property
    def shape2d(self) -> tuple[int, int]:
        m = self.layout.matrix(self.tensor)
        return m.shape[0], m.shape[1]

    def release(self) -> None:
        self._full = None


# -- units -------------------------------------------------------------------------------------
class _Units:
    """What is kept or pruned as a whole in one tensor, and a flat bool keep mask over them."""

    n: int
    size: int  # elements per unit when all are equal, else 0 (see sizes())
    mask: Tensor

    def pieces(self) -> Iterator[tuple[int, Tensor]]:
        raise NotImplementedError

    def at(self, index: Tensor) -> Tensor:
        raise NotImplementedError

    def sizes(self, start: int, end: int) -> Tensor:
        raise NotImplementedError

    def element_mask(self) -> Tensor | PackedMask:
        raise NotImplementedError

    def release(self) -> None:
        pass

    # How a selection writes the keep mask over the units (a bool tensor here; packed bits for
    # :class:`_PackedElements`, so that a global group never holds a byte per weight).
    @property
    def device(self) -> torch.device:
        return self.mask.device

    def piece_mask(self, start: int, count: int) -> Tensor:
        """Where the keep mask of units ``start:start+count`` is written (then :meth:`piece_written`)."""
        return self.mask[start : start + count]

    def piece_written(self, start: int, m: Tensor) -> None:
        pass

    def keep_units(self, index: Tensor) -> None:
        """Keep the units at flat positions ``index`` (ascending)."""
        self.mask[index.to(self.mask.device)] = True

    def fill(self, keep: bool) -> None:
        self.mask.fill_(keep)

    def set_mask(self, keep: Tensor) -> None:
        self.mask.copy_(keep)

    def kept(self) -> int:
        return _count(self.mask)


class _Elements(_Units):
    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.n = scorer.tensor.numel()
        self.size = 1
        self.mask = torch.empty(self.n, dtype=torch.bool, device=scorer.tensor.device)

    def pieces(self) -> Iterator[tuple[int, Tensor]]:
        step = kernels.chunk(self.scorer.tensor)
        for start in range(0, self.n, step):
            yield start, self.scorer.piece(start, min(self.n, start + step))

    def at(self, index: Tensor) -> Tensor:
        return self.scorer.at(index)

    def element_mask(self) -> Tensor | PackedMask:
        return self.mask.view(self.scorer.tensor.shape)

    def release(self) -> None:
        self.scorer.release()


class _PackedElements(_Elements):
    """Elements whose keep mask is held packed, 1 bit each (see :mod:`sparsity_core._bits`): a
    piece's mask is written to a reused bool buffer and packed as soon as the piece is done, so a
    global group of any size holds an eighth of a byte per weight, not a byte."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.n = scorer.tensor.numel()
        self.size = 1
        self.bits = torch.zeros(packed_size(self.n), dtype=torch.uint8, device=scorer.tensor.device)
        self._buffer: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.bits.device

    def piece_mask(self, start: int, count: int) -> Tensor:
        if self._buffer is None or self._buffer.numel() < count:
            self._buffer = torch.empty(count, dtype=torch.bool, device=self.bits.device)
        return self._buffer[:count]

    def piece_written(self, start: int, m: Tensor) -> None:
        end = start + m.numel()
        b0, b1 = start >> 3, (end + 7) >> 3
        if start % 8 == 0 and (end % 8 == 0 or end == self.n):
            self.bits[b0:b1] = PackedMask.pack(m).data
            return
        # a piece off byte boundaries (kernels.CHUNK not a multiple of 8): keep its neighbours' bits
        region = PackedMask(self.bits[b0:b1], ((b1 - b0) * 8,)).to_bool().clone()
        region[start - 8 * b0 : end - 8 * b0] = m.to(region.device)
        self.bits[b0:b1] = PackedMask.pack(region).data

    def keep_units(self, index: Tensor) -> None:
        index = index.to(self.bits.device).long()
        if index.numel() == 0:
            return
        # several kept units may share a byte: OR their bits within each byte first (index ascends)
        byte, bit = index >> 3, torch.ones_like(index) << (index & 7)
        starts = torch.ones_like(byte, dtype=torch.bool)
        starts[1:] = byte[1:] != byte[:-1]
        group = torch.cumsum(starts, 0) - 1
        ors = torch.zeros(int(group[-1]) + 1, dtype=torch.int64, device=index.device).index_add_(0, group, bit)
        self.bits[byte[starts]] |= ors.to(torch.uint8)

    def fill(self, keep: bool) -> None:
        self.bits.fill_(255 if keep else 0)
        tail = self.n % 8
        if keep and tail:
            self.bits[-1] = (1 << tail) - 1  # pad bits stay clear

    def set_mask(self, keep: Tensor) -> None:
        self.bits.copy_(PackedMask.pack(keep.to(self.bits.device)).data)

    def kept(self) -> int:
        return PackedMask(self.bits, (self.n,)).kept()

    def element_mask(self) -> PackedMask:
        return PackedMask(self.bits, self.scorer.tensor.shape)

    def release(self) -> None:
        self._buffer = None
        self.scorer.release()


class _Blocks(_Units):
    """Aligned ``h x w`` blocks of the 2-D view, scored by the mean score of their elements
    (ragged edge blocks: the mean over the elements they have)."""

    def __init__(self, scorer: Scorer, h: int, w: int) -> None:
        self.scorer = scorer
        self.h, self.w = h, w
        self.rows, self.cols = scorer.shape2d
        self.rb, self.cb = -(-self.rows // h), -(-self.cols // w)
        self.n = self.rb * self.cb
        ragged = self.rows % h or self.cols % w
        self.size = 0 if ragged else h * w
        self.mask = torch.empty(self.n, dtype=torch.bool, device=scorer.tensor.device)
        self._means: Tensor | None = None
        self._sizes: Tensor | None = None

    def means(self) -> Tensor:
        if self._means is None:
            self._means = block_means(self.scorer, self.h, self.w).view(-1)
        return self._means

    def pieces(self) -> Iterator[tuple[int, Tensor]]:
        means = self.means()
        step = kernels.chunk(means)
        for start in range(0, self.n, step):
            yield start, means[start : start + step]

    def at(self, index: Tensor) -> Tensor:
        return self.means()[index.to(self.means().device)].cpu()

    def sizes(self, start: int, end: int) -> Tensor:
        if self._sizes is None:
            dev = self.mask.device
            rs = torch.full((self.rb,), self.h, dtype=torch.int64, device=dev)
            rs[-1] = self.rows - (self.rb - 1) * self.h
            cs = torch.full((self.cb,), self.w, dtype=torch.int64, device=dev)
            cs[-1] = self.cols - (self.cb - 1) * self.w
            self._sizes = (rs[:, None] * cs[None, :]).view(-1)
        return self._sizes[start:end]

    def element_mask(self) -> Tensor:
        m = expand_blocks(self.mask.view(self.rb, self.cb), self.h, self.w, self.rows, self.cols)
        layout = self.scorer.layout
        return m.view(self.scorer.tensor.shape) if layout.is_identity(self.scorer.tensor.dim()) else layout.from_matrix(m, self.scorer.tensor.shape)

    def release(self) -> None:
        self._means = None
        self.scorer.release()


def block_means(scorer: Scorer, h: int, w: int) -> Tensor:
    """Mean score of each aligned ``h x w`` block of the 2-D view (rb x cb), computed band by band."""
    rows, cols = scorer.shape2d
    band = h * max(1, kernels.chunk(scorer.tensor) // max(1, h * cols))
    parts = []
    for r0 in range(0, rows, band):
        s = scorer.rows(r0, min(rows, r0 + band))
        # ceil_mode without padding averages a ragged edge window over the elements it has
        parts.append(F.avg_pool2d(s[None, None], (h, w), stride=(h, w), ceil_mode=True)[0, 0])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def expand_blocks(keep: Tensor, h: int, w: int, rows: int, cols: int) -> Tensor:
    """A (rows x cols) element mask from a per-block mask (rb x cb)."""
    dev = keep.device
    by_row = keep.index_select(0, torch.arange(rows, device=dev) // h)
    return by_row.index_select(1, torch.arange(cols, device=dev) // w)
