"""``data_norm`` (the seed's DataNormSparsifier): block norms of activations-free weights, in bands."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import kernels
from .kernels import _all_finite, _np, _NUMPY_FLOATS, _numpy_kernels, apply_mask_, rank_keep, Tensor, view2d
from .units import _Units, expand_blocks
from .selection import select


class _BandMeans(_Units):
    """The blocks of a data_norm tensor, scored by their mean norm, each one unit of weight (torch.ao
    counts blocks). The means are made band by band of rows whenever :func:`select` reads them and
    never exist whole: the selection's one pass recomputes them from the weights (no dearer than
    reading them back), and its sample gathers the few elements of each sampled block."""

    def __init__(self, x2: Tensor, block: tuple[int, int], band: int, norms: Callable[[int, int], Tensor], norm: str) -> None:
        self.x2, self.block, self.band, self.norms, self.norm = x2, block, band, norms, norm
        self.rows, self.cols = x2.shape
        h, w = block
        self.rb, self.cb = -(-self.rows // h), -(-self.cols // w)
        self.n = self.rb * self.cb
        self.size = 1
        self.mask = torch.empty(self.n, dtype=torch.bool, device=x2.device)

    def pieces(self) -> Iterator[tuple[int, Tensor]]:
        h = self.block[0]
        for r0 in range(0, self.rows, self.band):
            r1 = min(self.rows, r0 + self.band)
            out = torch.empty(-(-(r1 - r0) // h), self.cb, dtype=torch.float32, device=self.x2.device)
            block_means_into(self.norms(r0, r1), self.block, out)
            yield r0 // h * self.cb, out.view(-1)

    def at(self, index: Tensor) -> Tensor:
        """Means of the blocks at flat ``index``: on CPU for blocks of up to 16 elements, gathered
        and added in :func:`block_means_into`'s order (bit for bit its values); otherwise from
        the means of the bands that hold them. Either way the selection's cut is exact: the
        sample only places its bracket."""
        h, w = self.block
        if not _numpy_kernels(self.x2) or h * w > 16 or self.x2.dtype not in _NUMPY_FLOATS:
            return self._at_by_bands(index)
        a, rows, cols = _np(self.x2), self.rows, self.cols
        full = not (rows % h or cols % w)
        out = np.empty(index.numel(), dtype=np.float32)
        for i0 in range(0, index.numel(), 1 << 14):  # a slice at a time: small temporaries
            idx = _np(index[i0 : i0 + (1 << 14)])
            total = out[i0 : i0 + idx.size]
            if a.flags.c_contiguous and not cols % w:
                # each block row is w contiguous elements: one row of a (rows * cb) x w view,
                # the row of block (br, bc) at height i being (br * h + i) * cb + bc
                segs = a.reshape(rows * self.cb, w)
                r0 = idx // self.cb * h if h > 1 else idx
                first = idx + (r0 - idx // self.cb) * self.cb if h > 1 else idx
                for i in range(h):
                    seg = first + i * self.cb if i else first
                    if i and rows % h:  # a ragged last band: rows past the end read the last
                        np.minimum(seg, rows * self.cb - 1, out=seg)
                    v = np.take(segs, seg, axis=0).astype(np.float32, copy=False)
                    v = np.abs(v, out=v) if self.norm == "L1" else np.multiply(v, v, out=v)
                    if i and rows % h:  # norms are >= +0: adding +0 for a missing row is exact
                        v[r0 + i >= rows] = 0.0
                    if i == 0:
                        total[:] = v[:, 0]
                    for j in range(0 if i else 1, w):
                        np.add(total, v[:, j], out=total)
                count = np.minimum(rows - r0, h) * w if rows % h else h * w
                np.divide(total, np.asarray(count, dtype=np.float32), out=total)
                continue
            br, bc = np.divmod(idx, self.cb)
            r0, c0 = br * h, bc * w
            for i in range(h):
                r = r0 + i if full else np.minimum(r0 + i, rows - 1)
                for j in range(w):
                    c = c0 + j if full else np.minimum(c0 + j, cols - 1)
                    v = a[r, c].astype(np.float32, copy=False)
                    v = np.abs(v, out=v) if self.norm == "L1" else np.multiply(v, v, out=v)
                    if not full:  # norms are >= +0: adding +0 for a missing element is exact
                        v[(r0 + i >= rows) | (c0 + j >= cols)] = 0.0
                    if i == 0 and j == 0:
                        total[:] = v
                    else:
                        np.add(total, v, out=total)
            count = np.minimum(rows - r0, h) * np.minimum(cols - c0, w) if not full else h * w
            np.divide(total, np.asarray(count, dtype=np.float32), out=total)
        return torch.from_numpy(out)

    def _at_by_bands(self, index: Tensor) -> Tensor:
        out = torch.empty(index.numel(), dtype=torch.float32)
        for start, s in self.pieces():
            lo, hi = torch.searchsorted(index, torch.tensor([start, start + s.numel()])).tolist()
            if hi > lo:
                out[lo:hi] = s[(index[lo:hi] - start).to(s.device)].cpu()
        return out


def data_norm_view(tensor: Tensor) -> Tensor:
    """torch.ao's 2-D view: squeeze; 0-D/1-D -> 1 x n; beyond 2-D (where torch.ao raises) the
    usual out x rest view."""
    squeezed = tensor.squeeze()
    if squeezed.dim() <= 1:
        return tensor.reshape(1, -1)
    if squeezed.dim() == 2:
        return squeezed
    return view2d(tensor)


def block_means_into(n: Tensor, block: tuple[int, int], out: Tensor) -> None:
    """Mean of each aligned block of ``n`` (ragged edge blocks: over the elements they have) into
    ``out`` (blocks of rows x blocks of cols), bit for bit what ``avg_pool2d(ceil_mode=True)``
    gives: on CPU, for blocks of up to 16 elements, by adding the strided element planes in its
    order (row by row, left to right) and dividing by the count, with no padded copy."""
    h, w = block
    if not _numpy_kernels(n) or h * w > 16:
        out.copy_(F.avg_pool2d(n[None, None], block, stride=block, ceil_mode=True)[0, 0])
        return
    a, o = _np(n), _np(out)
    rows, cols = a.shape
    np.copyto(o, a[::h, ::w])
    for i in range(h):
        for j in range(w):
            if i or j:
                part = a[i::h, j::w]
                dst = o[: part.shape[0], : part.shape[1]]
                np.add(dst, part, out=dst)
    rf, cf = rows // h, cols // w  # blocks of full height / width
    np.divide(o[:rf, :cf], h * w, out=o[:rf, :cf])
    if cf < o.shape[1]:
        np.divide(o[:rf, cf:], h * (cols - cf * w), out=o[:rf, cf:])
    if rf < o.shape[0]:
        np.divide(o[rf:, :cf], (rows - rf * h) * w, out=o[rf:, :cf])
        if cf < o.shape[1]:
            np.divide(o[rf:, cf:], (rows - rf * h) * (cols - cf * w), out=o[rf:, cf:])


def _expand_into(blocks: Tensor, h: int, w: int, out: Tensor) -> None:
    """Write the element mask of per-block ``blocks`` into ``out`` (a contiguous band of rows)."""
    rows, cols = out.shape
    word = {2: np.uint16, 4: np.uint32, 8: np.uint64}.get(w) if np.little_endian else None
    if h == 1 and word is not None and cols == blocks.shape[1] * w and _numpy_kernels(out) and out.is_contiguous():
        # each block's bool byte times 0x0101..01 is its w element bytes at once
        ones = word(int.from_bytes(b"\x01" * w, "little"))
        np.multiply(_np(blocks).reshape(-1).view(np.uint8), ones, out=_np(out).reshape(-1).view(word))
        return
    out.copy_(expand_blocks(blocks, h, w, rows, cols))


def data_norm_mask(
    name: str,
    tensor: Tensor,
    level: float,
    block: tuple[int, int],
    zeros_per_block: int,
    norm: str,
    apply: bool = False,
) -> Tensor:
    """The seed's ``DataNormSparsifier.update_mask``, vectorised and band by band: prune the
    ``round(level * blocks)`` blocks of lowest mean norm (|x| or x*x), and inside each of them the
    ``zeros_per_block`` elements of lowest norm (a ragged block: at most all it has).

    Block means are made band by band as the selection reads them (see :class:`_BandMeans`) and
    the per-block keep mask is kept inside the element mask's own buffer, so nothing the size of
    the tensor is allocated beyond the element mask; that is then written band by band over the
    block mask and, with ``apply``, each band of the tensor is masked while it is in cache."""
    x2 = data_norm_view(tensor.detach())
    rows, cols = x2.shape
    h, w = block
    per_block = h * w
    band = h * max(1, kernels.chunk(tensor) // max(1, h * cols))
    rb, cb = -(-rows // h), -(-cols // w)

    # one buffer for the norms of every band (a fresh one per band would leave the heap in holes)
    buf = torch.empty(min(rows, band) * cols, dtype=torch.float32, device=tensor.device)

    def norms(r0: int, r1: int) -> Tensor:
        n = buf[: (r1 - r0) * cols].view(r1 - r0, cols)
        x = x2[r0:r1]
        if x.dtype != torch.float32:
            x = n.copy_(x)
        torch.abs(x, out=n) if norm == "L1" else torch.mul(x, x, out=n)
        # the sum is finite when every norm is (it is checked one by one only when it is not)
        if not (math.isfinite(float(n.sum())) or _all_finite(n)):
            raise ValueError(f"tensor {name!r} has NaN or inf values: cannot choose a data_norm mask for it")
        return n

    with torch.no_grad():
        mask = torch.empty(rows, cols, dtype=torch.bool, device=tensor.device)
        units = _BandMeans(x2, block, band, norms, norm)
        # The per-block keep mask lives in the last rb * cb bytes of the element mask: no
        # allocation of its own (that would leave a hole in the heap under each element mask).
        # Band by band, the element mask of rows r0:r1 ends at r1 * cols, at or before the start
        # of the blocks of the rows after r1 (as many blocks as elements remain, at most), and
        # each band reads its blocks whole before writing its rows.
        units.mask = mask.view(-1)[rows * cols - units.n :]
        if round(level * units.n) <= 0 or round(level * units.n) >= units.n:
            for r0 in range(0, rows, band):  # select reads no means here: still refuse NaN/inf
                norms(r0, min(rows, r0 + band))
        select([units], level * units.n)
        kept_blocks = units.mask.view(rb, cb)
        del units
        if zeros_per_block <= 0:
            return mask.fill_(True).view(tensor.shape)
        fused = apply and tensor.is_contiguous()  # then x2 is a view of the tensor
        for r0 in range(0, rows, band):
            r1 = min(rows, r0 + band)
            nb = -(-(r1 - r0) // h)
            blocks = kept_blocks[r0 // h : r0 // h + nb]
            if zeros_per_block >= per_block:
                _expand_into(blocks, h, w, mask[r0:r1])
            else:
                n = norms(r0, r1)
                if (r1 - r0) % h or cols % w:  # ragged: pad with +inf, which ranks after every norm
                    padded = torch.full((nb * h, cb * w), math.inf, device=n.device)
                    padded[: r1 - r0, :cols] = n
                    n = padded
                groups = n.view(nb, h, cb, w).permute(0, 2, 1, 3).reshape(nb * cb, per_block)
                inside = torch.empty(nb * cb, per_block, dtype=torch.bool, device=mask.device)
                rank_keep(groups, zeros_per_block, inside)
                if _numpy_kernels(inside):
                    np.logical_or(_np(inside), _np(blocks.reshape(-1, 1)), out=_np(inside))
                else:
                    inside |= blocks.reshape(-1, 1)
                full = inside.view(nb, cb, h, w).permute(0, 2, 1, 3).reshape(nb * h, cb * w)
                mask[r0:r1] = full[: r1 - r0, :cols]
            if fused:
                apply_mask_(x2[r0:r1], mask[r0:r1])
        if apply and not fused:
            apply_mask_(tensor, mask.view(tensor.shape))
    return mask.view(tensor.shape)
