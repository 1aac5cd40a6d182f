"""Mask selection for every ``ScoreSparsifier``: each pattern and scope, written once.

Vocabulary
- A *unit* is what is kept or pruned as a whole: an element (``unstructured``) or an aligned block
  (``"HxW"`` over the 2-D view). ``N:M`` is a rule inside each group of M and has its own path.
- The *2-D view* of a tensor: a 0-D or 1-D tensor is ``1 x n``; anything else is
  ``shape[0] x (product of the rest)`` (a conv weight is ``out x (in*kh*kw)``).

How a selection stays near one pass over the weights
- Scores are produced in float32 pieces of :data:`CHUNK` elements; when the sparsifier declares
  ``elementwise = True`` a piece is scored on its own, so the scores of a whole tensor (let alone a
  model) never exist at once. Other sparsifiers are scored one tensor at a time.
- A small selection (at most :data:`EXACT` units) is done exactly with ``kthvalue``.
- A large one samples :data:`SAMPLE` unit scores (a fixed generator, so results are
  deterministic), brackets the threshold ``[lo, hi)`` at ``Z`` standard errors of the sampled
  quantile, and makes *one* pass: units scoring ``>= hi`` are kept, those in the bracket are kept
  aside (index and score, typically under 1 % of the units), and a ``kthvalue`` among them fixes
  the exact cut. If the bracket misses (odds well under one in a million) or holds too many units
  (massive ties), the exact path runs instead.
- Ties are broken by position: among equal scores, the earlier unit (tensor order, then flat
  index) is pruned first. A target is met exactly: ``round(level * n)`` units for equal-sized
  units; for ragged blocks, the prefix whose element count is closest to the target.
- On CPU the elementwise kernels run through NumPy views of the torch tensors (zero copy): its
  comparisons, counts and ``flatnonzero`` are many times faster than torch's for bool outputs.
  Every "NumPy or torch?" choice goes through :func:`_numpy_kernels` (see :data:`NUMPY_KERNELS`).

Modules
- :mod:`.kernels`: the tunables (``kernels.CHUNK`` ...) and the NumPy-or-torch kernels.
- :mod:`.units`: :class:`Scorer` (scores in float32 pieces) and the units (elements, blocks).
- :mod:`.selection`: :func:`select`, exact or bracketed, ties by position.
- :mod:`.patterns`: N:M.
- :mod:`.magnitude`: selection on the weights' bits for sparsifiers that rank like ``|w|``
  (``ScoreSparsifier.ranks_like_magnitude``): fp32, bf16 and fp16, two passes, no float scores;
  each pass one compiled loop (:mod:`.native`, ``_bitkernels.c``) where the package was built
  with a C compiler, NumPy otherwise.
- :mod:`.native`: the compiled kernels through ctypes (:data:`~.native.AVAILABLE`).
- :mod:`.data_norm`: the seed's ``data_norm`` sparsifier's masks.
- :mod:`.masks`: :func:`score_masks`, the entry point, and :func:`check_masks`.
- :mod:`.distributed`: the same masks from row shards (FSDP2 ``Shard(0)``, ``MaskContext.shards``),
  with a handful of collectives per update and no weight gathered.
"""

from __future__ import annotations

from . import kernels
from .data_norm import block_means_into, data_norm_mask, data_norm_view
from .kernels import apply_mask_, rank_keep, rank_keep_columns, view2d
from .masks import check_masks, score_masks
from .patterns import nm_mask
from .selection import select
from .units import Scorer, block_means, expand_blocks

__all__ = [
    "Scorer",
    "apply_mask_",
    "block_means",
    "block_means_into",
    "check_masks",
    "data_norm_mask",
    "data_norm_view",
    "expand_blocks",
    "kernels",
    "nm_mask",
    "rank_keep",
    "rank_keep_columns",
    "score_masks",
    "select",
    "view2d",
]
