"""Mask selection for score-based sparsifiers (first version: unstructured, layer and global)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ._base import ScoreSparsifier


def _check_finite(name: str, score: torch.Tensor) -> None:
    if not bool(torch.isfinite(score).all()):
        raise ValueError(f"tensor {name!r} has NaN or inf importance scores; cannot choose a mask")


def _keep_top(score: torch.Tensor, n_prune: int) -> torch.Tensor:
    flat = score.reshape(-1)
    mask = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    if n_prune > 0:
        idx = torch.topk(flat, n_prune, largest=False, sorted=False).indices
        mask[idx] = False
    return mask.view(score.shape)


def score_masks(
    sparsifier: ScoreSparsifier, tensors: Mapping[str, torch.Tensor], levels: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    masks: dict[str, torch.Tensor] = {}
    global_names: list[str] = []
    for name, tensor in tensors.items():
        spec = sparsifier.spec_for(name)
        if spec.parsed_pattern.kind != "unstructured":
            raise NotImplementedError(f"pattern {spec.pattern!r} is not implemented yet")
        if spec.scope == "global":
            global_names.append(name)
            continue
        with torch.no_grad():
            score = sparsifier.score(name, tensor).float()
        _check_finite(name, score)
        masks[name] = _keep_top(score, round(levels[name] * score.numel()))
    if global_names:
        with torch.no_grad():
            scores = {n: sparsifier.score(n, tensors[n]).float() for n in global_names}
        for n, s in scores.items():
            _check_finite(n, s)
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        total = sum(levels[n] * s.numel() for n, s in scores.items())
        keep = _keep_top(flat, round(total))
        offset = 0
        for n, s in scores.items():
            masks[n] = keep[offset : offset + s.numel()].view(s.shape)
            offset += s.numel()
    return {n: masks[n] for n in tensors}
