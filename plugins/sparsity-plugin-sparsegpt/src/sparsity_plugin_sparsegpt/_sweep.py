"""The blocked OBS sweep of SparseGPT on one ``[outputs, reduction]`` matrix (pure torch).

This is the reference ``fasterprune`` (IST-DASLab/sparsegpt) with the same arithmetic and choices,
arranged to cost fewer passes over memory:

- it works on ``W.t()`` (a copy), so that column ``i`` of ``W``, which the sweep reads, prunes and
  updates one at a time, is one contiguous row;
- each column costs four in-place kernels (the error in two, a fused rank-1 update ``addr_`` of
  the rest of its run, the pruned positions zeroed by a multiply), where the reference allocates the rank-1
  product, indexes by a boolean mask and records per-weight losses it never returns;
- the reference's lazy batching is applied once more inside each block: columns are updated one
  by one only within runs of :data:`INNER`, and each run's effect on the rest of the block is one
  fused ``addmm_`` (as is the effect of a block on the columns after it);
- the unstructured selection of a block is a ``kthvalue`` selection, not a full sort.

Two deliberate differences from the reference, both in what is pruned, not how:

- unstructured: the reference prunes every weight of a block whose score is ``<=`` the score at
  index ``int(level * numel)``, one (or more, on ties) above the level. Here each block prunes an
  exact count (the lowest scores, ties to the lower index), apportioned so the whole matrix
  prunes exactly ``round(level * numel)``;
- forced positions (pruned by the mask in force; the nested policy) are pruned whatever their
  score and count towards the level, in unstructured blocks and in N:M groups alike.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch


#: Columns per run of one-by-one updates inside a block (see :func:`sweep`).
INNER = 16


class SweepResult(NamedTuple):
    """The pruned-and-updated matrix and its mask (True = pruned), both ``[outputs, reduction]``."""

    weight: torch.Tensor
    pruned: torch.Tensor


class NotPositiveDefiniteError(RuntimeError):
    """The damped Hessian is not positive definite: its Cholesky factorisation failed."""


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, dead)``: the upper Cholesky factor of ``(H + damp * I)^-1`` and the dead columns.

    ``hessian`` (float32, ``[cols, cols]``) is consumed (modified in place). A dead input (never
    nonzero, ``H[j, j] == 0``) gets ``H[j, j] = 1`` as in the reference; its weights are set to 0
    by :func:`sweep`. ``damp = dampening * mean(diag(H))`` (the reference's ``percdamp``).
    """
    import torch

    diag = hessian.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    diag += dampening * diag.mean()
    factor, info = torch.linalg.cholesky_ex(hessian)
    if int(info) != 0:
        raise NotPositiveDefiniteError(
            f"the damped Hessian ({hessian.shape[0]} inputs) is not positive definite (Cholesky failed at "
            f"column {int(info)}); raise dampening or calibrate with more batches"
        )
    inverse = torch.cholesky_inverse(factor)
    del factor
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0:
        raise NotPositiveDefiniteError(
            f"the inverse of the damped Hessian ({hessian.shape[0]} inputs) lost positive definiteness in "
            f"float32 (Cholesky failed at column {int(info)}); raise dampening"
        )
    return upper, dead


def block_quotas(total: int, forced: list[int], sizes: list[int]) -> list[int]:
    """How many weights each column block prunes so the matrix prunes exactly ``total``.

    A block prunes its forced weights plus its share of the rest, the share proportional to its
    free weights (cumulative rounding, so the shares add up). With no forced weights a block of
    ``c`` of the matrix's ``C`` columns prunes ``round(total * c / C)`` cumulatively: the level of
    each block. When more is forced than ``total``, only the forced weights are pruned (nested
    masks never revive)."""
    extra = max(total - sum(forced), 0)
    free = [s - f for s, f in zip(sizes, forced)]
    free_total = sum(free)
    quotas, done, seen = [], 0, 0
    for f, fr in zip(forced, free):
        seen += fr
        upto = math.floor(extra * seen / free_total + 0.5) if free_total else 0
        quotas.append(f + upto - done)
        done = upto
    return quotas


def sweep(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    dead: torch.Tensor,
    *,
    level: float,
    nm: tuple[int, int] | None = None,
    block_size: int = 128,
    forced: torch.Tensor | None = None,
) -> SweepResult:
    """Prune ``weight`` (float32 ``[rows, cols]``, not modified) column block by column block,
    updating the columns not yet swept to compensate (the OBS update ``-err * Hinv[i, i:]``).

    ``hinv``: the upper factor from :func:`inverse_hessian_factor`. ``nm=(n, m)``: keep ``n`` of
    every ``m`` consecutive columns of each row, choosing each group when the sweep reaches it
    (from the updated weights, as the reference); ``round(level * m)`` pruned per group, at most
    ``m - n``; a ragged tail of ``g < m`` columns at most ``g - n``. ``block_size`` must then be a
    multiple of ``m``. ``forced`` (bool ``[rows, cols]``, True = must prune): the nested policy.
    """
    import torch

    rows, cols = weight.shape
    # [cols, rows], a copy even when weight.t() is already contiguous: column i of W is row i here
    wt = weight.t().clone(memory_format=torch.contiguous_format)
    wt[dead] = 0.0
    # 1.0 where pruned: floats, so that the per-column error and q_i are plain multiplies
    pruned_t = torch.zeros(cols, rows, dtype=wt.dtype, device=weight.device)
    forced_t = forced.t() if forced is not None else None
    diag = hinv.diagonal()
    err = torch.empty(min(block_size, cols), rows, dtype=wt.dtype, device=wt.device)
    quotas: list[int] = []
    if nm is None:
        starts = list(range(0, cols, block_size))
        sizes = [min(block_size, cols - s) * rows for s in starts]
        forced_counts = [int(forced_t[s : s + block_size].sum()) if forced_t is not None else 0 for s in starts]
        quotas = block_quotas(math.floor(level * rows * cols + 0.5), forced_counts, sizes)
    else:
        n, m = nm
        prune_per_group = min(math.floor(level * m + 0.5), m - n)
    # Columns updated one by one within runs of ``inner``, each run's effect on the rest of the
    # block applied in one product: the same sums, far fewer passes over the block. A run holds
    # whole N:M groups, so a group is chosen from fully updated weights as in the reference.
    inner = INNER if nm is None else max(1, INNER // m) * m

    for b, i1 in enumerate(range(0, cols, block_size)):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        w1, h1, d1, p1 = wt[i1:i2], hinv[i1:i2, i1:i2], diag[i1:i2], pruned_t[i1:i2]
        f1 = forced_t[i1:i2] if forced_t is not None else None
        e1 = err[:count]
        d2 = (d1 * d1).unsqueeze(1)
        if nm is None:
            _choose_block(w1, d2, f1, quotas[b], p1)
            k1 = 1.0 - p1
        else:  # filled group by group as the sweep reaches them
            k1 = torch.ones(count, rows, dtype=wt.dtype, device=wt.device)
        # one view per column, made once per block (indexing one by one costs more than the work)
        w_rows, e_rows, h_rows, d_vals = w1.unbind(0), e1.unbind(0), h1.unbind(0), d1.unbind(0)
        p_rows, k_rows = p1.unbind(0), k1.unbind(0)
        for s1 in range(0, count, inner):
            s2 = min(s1 + inner, count)
            for i in range(s1, s2):
                if nm is not None and i % m == 0:
                    g = min(m, count - i)
                    k = prune_per_group if g == m else min(prune_per_group, max(g - n, 0))
                    _choose_group(w1[i : i + g], d2[i : i + g], f1[i : i + g] if f1 is not None else None, k, p1[i : i + g])
                    torch.sub(1.0, p1[i : i + g], out=k1[i : i + g])
                row, e = w_rows[i], e_rows[i]
                # err_i = (w_i - q_i) / d_i, with q_i = w_i where kept and 0 where pruned
                torch.div(row, d_vals[i], out=e).mul_(p_rows[i])
                if i + 1 < s2:
                    w1[i + 1 : s2].addr_(h_rows[i][i + 1 : s2], e, alpha=-1.0)
                row.mul_(k_rows[i])  # q_i
            if s2 < count:  # the rest of the block, lazily (the reference's own trick, one level down)
                w1[s2:].addmm_(h1[s1:s2, s2:].t(), e1[s1:s2], alpha=-1.0)
        if i2 < cols:
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), e1, alpha=-1.0)
    return SweepResult(wt.t().contiguous(), pruned_t.t() > 0.5)


def _choose_block(w1: torch.Tensor, d2: torch.Tensor, forced: torch.Tensor | None, k: int, out: torch.Tensor) -> None:
    """Set to 1 in ``out`` the ``k`` lowest ``w^2 / d^2`` of a block (``[count, rows]``, transposed;
    ``d2``: ``d^2`` as a column), forced positions first; ties go to the lower index of the
    ``[rows, count]`` matrix."""
    import torch

    if k <= 0:
        return
    score = (w1 * w1).div_(d2)
    if forced is not None:
        score.masked_fill_(forced, -math.inf)
    flat = score.t().reshape(-1)  # the matrix's row-major order, for the tie rule
    if k >= flat.numel():
        out.fill_(1.0)
        return
    # the k lowest, ties to the lower index (what a stable sort gives), by selection, not sorting
    cut = flat.kthvalue(k).values
    chosen = flat < cut
    ties = torch.nonzero(flat == cut).view(-1)[: k - int(chosen.sum())]
    chosen[ties] = True
    out.copy_(chosen.view(score.shape[1], score.shape[0]).t())


def _choose_group(w: torch.Tensor, d2: torch.Tensor, forced: torch.Tensor | None, k: int, out: torch.Tensor) -> None:
    """Set to 1 in ``out`` the ``k`` lowest ``w^2 / d^2`` of each row within a group of columns
    (``[g, rows]``); forced positions first, and all of them even when more than ``k``."""
    import torch

    if k <= 0:
        return
    score = (w * w).div_(d2)
    if forced is not None:
        score.masked_fill_(forced, -math.inf)
    out.scatter_(0, torch.topk(score, k, dim=0, largest=False).indices, 1.0)
    if forced is not None:
        out.masked_fill_(forced, 1.0)
