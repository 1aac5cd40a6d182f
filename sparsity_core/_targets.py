"""What can be sparsified: an ``nn.Module``'s parameters or a mapping of named tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

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


def owner_modules(target: Any, names: list[str]) -> dict[str, nn.Module]:
    """For a module target: the submodule that owns each named parameter (for calibration hooks)."""
    if not isinstance(target, nn.Module):
        return {}
    owners = {}
    for name in names:
        prefix, _, _ = name.rpartition(".")
        owners[name] = target.get_submodule(prefix) if prefix else target
    return owners
