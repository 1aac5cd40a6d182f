"""N:M: a rule inside each group of M along the reduction axis, with its own (fused) path."""

from __future__ import annotations

import torch

from . import kernels, magnitude, native
from .._bits import PackedMask
from .kernels import apply_mask_, rank_keep, Tensor, view2d
from .units import Scorer


def nm_mask(scorer: Scorer, n: int, m: int, level: float, apply: bool = False) -> Tensor | PackedMask:
    """Keep ``n`` of every ``m`` consecutive weights along the reduction axis (the last dim of the
    matrix view, see :mod:`._layers`).

    At an intermediate ``level`` (gradual N:M) ``round(level * m)`` of each group are pruned, at
    most ``m - n``. A ragged tail of ``g < m`` columns prunes as many, at most ``g - n``.
    With ``apply``, each piece of the tensor is masked as soon as its mask is known, while it is
    still in cache (a contiguous tensor in its natural layout; otherwise once at the end); the
    magnitude path on the weights' bits then returns the mask packed (1 bit per weight).
    """
    tensor = scorer.tensor
    rows, cols = scorer.shape2d
    prune = min(round(level * m), m - n)
    natural = scorer.layout.is_identity(tensor.dim())
    if prune <= 0:
        return torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device)
    full = cols // m * m
    if full == cols and m <= 8 and magnitude.eligible(scorer.sparsifier, tensor):
        # ranks on the weights' bits (see .magnitude): no float32 scores, bf16 and fp16 alike
        if natural:
            return magnitude.nm_keep(scorer.name, tensor, scorer.keep, m, prune, apply, scorer.sparsifier.name)
        if tensor.dim() == 2 and scorer.layout.permutation(2) == (1, 0) and native.enabled():
            # a [in, out] weight (transformers' Conv1D): groups run down its rows
            return magnitude.nm_keep_rows(scorer.name, tensor, scorer.keep, m, prune, apply, scorer.sparsifier.name)
    mask = torch.empty(rows, cols, dtype=torch.bool, device=tensor.device)
    fused = apply and natural and tensor.is_contiguous()
    if full == cols and natural:  # groups are runs of m in the flat tensor: score it in flat pieces
        out = mask.view(-1)
        step = max(m, kernels.chunk(tensor) // m * m)
        for start in range(0, out.numel(), step):
            end = min(out.numel(), start + step)
            rank_keep(scorer.piece(start, end).view(-1, m), prune, out[start:end].view(-1, m))
            if fused:
                apply_mask_(tensor.view(-1)[start:end], out[start:end])
        scorer.release()
        if apply and not fused:
            apply_mask_(tensor, mask.view(tensor.shape))
        return mask.view(tensor.shape)
    tail_prune = min(prune, max(cols - full - n, 0))
    band = max(1, kernels.chunk(tensor) // max(1, cols))
    for r0 in range(0, rows, band):
        r1 = min(rows, r0 + band)
        s = scorer.rows(r0, r1)
        if full:
            out = mask[r0:r1, :full]
            groups = s[:, :full].reshape(-1, m)
            if out.is_contiguous():
                rank_keep(groups, prune, out.view(-1, m))
            else:
                tmp = torch.empty(groups.shape, dtype=torch.bool, device=mask.device)
                rank_keep(groups, prune, tmp)
                out.copy_(tmp.view(r1 - r0, full))
        if full < cols:
            tail = torch.empty(r1 - r0, cols - full, dtype=torch.bool, device=mask.device)
            rank_keep(s[:, full:].contiguous(), tail_prune, tail)
            mask[r0:r1, full:] = tail
        if fused:
            apply_mask_(view2d(tensor)[r0:r1], mask[r0:r1])
    scorer.release()
    result = mask.view(tensor.shape) if natural else scorer.layout.from_matrix(mask, tensor.shape)
    if apply and not fused:
        apply_mask_(tensor, result)
    return result
