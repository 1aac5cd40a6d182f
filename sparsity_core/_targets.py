"""What can be sparsified: an ``nn.Module``'s parameters or a mapping of named tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._layers import TensorLayout, layout_of

# Layers whose ``weight`` is covered when the spec sets no ``include``.
DEFAULT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.modules.conv._ConvNd,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.Bilinear,
)


def named_tensors(target: Any) -> tuple[dict[str, torch.Tensor], Callable[[str], bool] | None]:
    """The tensors of ``target`` by name, and the default-coverage rule (None: every tensor)."""
    if isinstance(target, nn.Module):
        tensors = dict(target.named_parameters())
        default = {
            f"{prefix}.weight" if prefix else "weight"
            for prefix, module in target.named_modules()
            if isinstance(module, DEFAULT_LAYERS) and isinstance(getattr(module, "weight", None), torch.Tensor)
        }
        return tensors, default.__contains__
    if isinstance(target, Mapping):
        bad = [k for k, v in target.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"a mapping target must map str names to tensors; bad entries: {bad[:5]}")
        return dict(target), None
    raise TypeError(
        f"target must be an nn.Module or a mapping of names to tensors, got {type(target).__name__}"
    )


@dataclass
class Selection:
    """The tensors a sparsifier covers in a target, one entry per tensor (canonical name), with
    what the controller needs to know of each: its layout (layer kind and orientation), its owner
    module and attribute (for calibration hooks), and every name it answers to (tied weights)."""

    tensors: dict[str, torch.Tensor]
    layouts: dict[str, TensorLayout] = field(default_factory=dict)
    owners: dict[str, tuple[nn.Module, str]] = field(default_factory=dict)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)


def select_tensors(target: Any, sparsifier: Any) -> Selection:
    """The tensors of ``target`` that ``sparsifier`` covers, with their layouts and owners.

    Raises ValueError naming the rule when nothing is covered."""
    tensors, default = named_tensors(target)
    names = sparsifier.covers(tensors, default)
    if not names:
        spec = sparsifier.spec
        rule = f"include={spec.include}" if spec.include is not None else "the default (Linear/Conv/Embedding weights)"
        raise ValueError(
            f"sparsifier {sparsifier.name!r} covers no tensor: {rule} with exclude={spec.exclude} "
            f"matched nothing among {len(tensors)} names (e.g. {list(tensors)[:5]})"
        )
    selection = Selection({n: tensors[n] for n in names})
    if isinstance(target, nn.Module):
        for name in names:
            prefix, _, attr = name.rpartition(".")
            module = target.get_submodule(prefix) if prefix else target
            selection.owners[name] = (module, attr)
            selection.layouts[name] = layout_of(module, attr)
    selection.aliases = {n: (n,) for n in names}
    return selection


def owner_modules(target: Any, names: list[str]) -> dict[str, nn.Module]:
    """For a module target: the submodule that owns each named parameter (for calibration hooks)."""
    if not isinstance(target, nn.Module):
        return {}
    owners = {}
    for name in names:
        prefix, _, _ = name.rpartition(".")
        owners[name] = target.get_submodule(prefix) if prefix else target
    return owners
