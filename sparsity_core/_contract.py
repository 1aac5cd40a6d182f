"""Contract v2: what a sparsifier declares (``Capabilities``) and what it is given and may return
(``MaskContext``, ``Reconstruction``). No torch at import time.

A v1 sparsifier declares nothing and overrides ``compute_masks(tensors, levels)``: it keeps working
unchanged (the controller then enforces the nested policy itself). A v2 one declares
``capabilities = Capabilities(...)`` and may accept ``context`` in ``compute_masks``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import torch

    from ._layers import TensorLayout
    from ._shards import Shards


@dataclass(frozen=True)
class Capabilities:
    """What a sparsifier is and needs, declared once on the class and read by everything: the
    controller (what to run, what to refuse), default coverage, the conformance kit (which checks
    apply; the others are reported as skipped with the reason) and ``sparsity show``."""

    #: Needs activations: calibration batches run through the model and :meth:`Sparsifier.observe`
    #: sees the inputs of each covered tensor's module.
    calibration: bool = False
    #: Needs gradients: :meth:`Sparsifier.observe_gradient` receives each covered parameter's
    #: gradient once per optimizer step in training, or per batch of a one-shot ``loss_fn``.
    gradients: bool = False
    #: Updates the kept weights: ``compute_masks`` may return :class:`Reconstruction` (masks and new
    #: weights); the controller writes the weights, then zeroes the pruned positions.
    reconstruction: bool = False
    #: May keep a weight the current mask prunes (RigL-style regrowth). Default: nested, a weight
    #: pruned once stays pruned. A regrown weight restarts from zero.
    regrowth: bool = False
    #: Chooses each tensor's level itself: only the overall level is promised, not each tensor's.
    allocates_levels: bool = False
    #: Layer kinds it supports (e.g. ``{"linear", "conv"}``); None: any tensor. Default coverage
    #: narrows to them; an explicitly included tensor of another kind is an error.
    layer_kinds: frozenset[str] | None = None
    #: Tensor ranks it supports (e.g. ``{2, 4}``); None: any.
    tensor_ranks: frozenset[int] | None = None
    #: Gives exact masks on row shards (FSDP2 ``Shard(0)``): scores depend on an element or its row only.
    shard_safe: bool = False

    def __post_init__(self) -> None:
        for name in ("layer_kinds", "tensor_ranks"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, frozenset):
                object.__setattr__(self, name, frozenset(value))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = sorted(value) if isinstance(value, frozenset) else value
        return out

    def describe(self) -> list[str]:
        """Short phrases for listings (``sparsity show``)."""
        words = [name for name in ("calibration", "gradients", "reconstruction", "regrowth", "allocates_levels", "shard_safe") if getattr(self, name)]
        if self.layer_kinds is not None:
            words.append("layers: " + ", ".join(sorted(self.layer_kinds)))
        if self.tensor_ranks is not None:
            words.append("ranks: " + ", ".join(map(str, sorted(self.tensor_ranks))))
        return words


@dataclass(frozen=True)
class MaskContext:
    """What ``compute_masks(tensors, levels, context)`` is told besides the tensors and levels.

    ``current``: the masks in force (True = keep) for the tensors that have one; a name that is
    absent has nothing pruned yet. Unless the class declares ``regrowth``, the core keeps every
    currently pruned weight pruned (for a ``ScoreSparsifier`` it does so inside the selection,
    so the level is still met exactly).
    ``layouts``: each tensor's layer kind and orientation (``layout.matrix(t)`` is the
    ``[outputs, reduction]`` view on which N:M groups and blocks run); empty for a mapping target.
    ``shards``: set only for sharded parameters (FSDP2), and only for sparsifiers that declare
    ``shard_safe``: the tensors are then each rank's local rows (dim 0) of the global tensors
    described in ``shards.tensors``, and the masks must be the local slices of the masks one
    process would compute on the gathered tensors (``shards.comm`` reduces across the ranks).
    """

    current: Mapping[str, torch.Tensor] = field(default_factory=dict)
    layouts: Mapping[str, TensorLayout] = field(default_factory=dict)
    shards: Shards | None = None

    def layout(self, name: str, tensor: torch.Tensor) -> TensorLayout:
        """The layout of ``name`` (a generic one, dim 0 = outputs, when none is known)."""
        from ._layers import generic_layout

        found = self.layouts.get(name)
        return found if found is not None else generic_layout(tensor)


class Reconstruction(NamedTuple):
    """What a sparsifier with ``capabilities.reconstruction`` may return from ``compute_masks``:
    the masks, and new values for (some of) the tensors, each shaped like its tensor. The
    controller writes them, then zeroes the pruned positions: a pruned weight is always exactly
    zero, and a kept weight changes only by the sparsifier's update."""

    masks: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]


def accepts_context(method: Callable[..., Any]) -> bool:
    """Whether a ``compute_masks`` / ``masks_applied`` takes contract v2's ``context`` (a v1
    override does not, and is called without it)."""
    return _accepts(getattr(method, "__func__", method))


@functools.lru_cache(maxsize=256)
def _accepts(func: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    return "context" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
