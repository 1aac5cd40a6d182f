"""Wanda for sparsity-core: pruning by weights and activations (Sun, Liu, Bair & Kolter, 2023).

The importance of weight ``W[i, j]`` is ``|W[i, j]| * ||X_j||``, where ``X_j`` is input feature
``j`` of the layer over the calibration batches. Weights that multiply features which are
always small (or dead) go first, however large the weight itself is.

``score`` uses the root-mean-square of each feature, ``||X_j|| / sqrt(rows)``: per layer this is a
constant factor (the same masks as the plain norm), and with ``scope='global'`` it keeps layers
that see more rows (convolutions: one row per output position) comparable.

Comparison group: the paper compares each weight with the others of its *output row* (each row
of the layer reaches the level) and finds this better than comparing over the whole layer. Here
that is ``per_output=True`` (default) with ``pattern='unstructured'`` and ``scope='layer'``:
Wanda then takes over mask selection for those tensors. ``per_output=False`` compares over the
whole tensor (the core's layer scope); ``scope='global'``, block and N:M patterns go to the
core's engine as for any score (N:M groups lie within a row already, as in the paper).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import Field

from sparsity_core import ScoreSparsifier, ScoreSpec, hookimpl

if TYPE_CHECKING:
    # torch is imported where it is used: discovery (`sparsity list`) must not pay for it.
    import torch
    from torch import nn

SPARSITY_CORE_API = 1

__all__ = ["Wanda", "WandaSpec", "register_sparsifiers"]


class WandaSpec(ScoreSpec):
    per_output: bool = Field(
        True,
        description=(
            "With pattern='unstructured' and scope='layer': compare each weight only with the others "
            "of its output row, so every row reaches the level (the paper's default). False: one "
            "threshold over the whole tensor. No effect on scope='global', blocks or N:M."
        ),
    )


class Wanda(ScoreSparsifier):
    """Wanda (Sun et al. 2023): prune by |weight| x the L2 norm of its input feature's activations."""

    name = "wanda"
    Spec = WandaSpec
    spec: WandaSpec
    needs_calibration = True

    def __init__(self, spec: Any = None, /, **fields: Any) -> None:
        super().__init__(spec, **fields)
        self._sum_sq: dict[str, torch.Tensor] = {}
        self._rows: dict[str, int] = {}
        self._layout: dict[str, tuple[str, torch.Size]] = {}
        self._synced = True

    # -- calibration -------------------------------------------------------------------------
    def reset_calibration(self) -> None:
        self._sum_sq.clear()
        self._rows.clear()
        self._layout.clear()
        self._synced = True

    def observe(self, name: str, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        import torch

        attr = name.rpartition(".")[2]
        weight = getattr(module, attr)
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                f"wanda cannot score {name!r}: its module {type(module).__name__} takes "
                f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype} inputs, not activations; "
                f"exclude it (e.g. exclude=['{name}'])"
            )
        layout, rows = _features(name, module, attr, weight, x.detach())
        sum_sq = rows.float().pow(2).sum(0)
        if name in self._sum_sq:
            self._sum_sq[name] += sum_sq
            self._rows[name] += rows.shape[0]
        else:
            self._sum_sq[name], self._rows[name] = sum_sq, rows.shape[0]
            self._layout[name] = (layout, weight.shape)
        self._synced = False

    def _sync(self) -> None:
        """Sum statistics over ranks, so that every rank of a DDP run chooses the same masks."""
        import torch

        self._synced = True
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for name in sorted(self._sum_sq):
            total = torch.cat([self._sum_sq[name], torch.tensor([float(self._rows[name])], device=self._sum_sq[name].device)])
            torch.distributed.all_reduce(total)
            self._sum_sq[name], self._rows[name] = total[:-1], int(total[-1].item())

    # -- scores and masks --------------------------------------------------------------------
    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name not in self._sum_sq:
            raise RuntimeError(
                f"wanda has no calibration activations for {name!r}: it needs calibration. Pass "
                f"calibration=batches to sparsify(), call SparsityController.calibrate(batches) before "
                f"step(), or give the Lightning callback calibration_batches > 0"
            )
        if not self._synced:
            self._sync()
        layout, shape = self._layout[name]
        if tensor.shape != shape:
            raise ValueError(f"wanda: {name!r} has shape {tuple(tensor.shape)}, but was calibrated with {tuple(shape)}")
        rms = (self._sum_sq[name] / max(self._rows[name], 1)).sqrt().to(tensor.device)
        if layout == "unfold":  # one feature per (in_channel, kernel position)
            norm = rms.view(tensor.shape[1:])
        elif layout == "channel":  # one feature per input channel, shared by kernel positions
            norm = rms.view(1, -1, *([1] * (tensor.dim() - 2)))
        else:  # one feature per element of the last dim
            norm = rms
        return tensor.detach().abs().float() * norm

    def compute_masks(
        self, tensors: Mapping[str, torch.Tensor], levels: Mapping[str, float]
    ) -> dict[str, torch.Tensor]:
        per_row = {n for n in tensors if _per_output(self.spec_for(n))}
        rest = {n: t for n, t in tensors.items() if n not in per_row}
        masks = super().compute_masks(rest, levels) if rest else {}
        for name in per_row:
            masks[name] = _keep_top_per_row(name, self.score(name, tensors[name]), levels[name])
        return {n: masks[n] for n in tensors}


def _per_output(spec: Any) -> bool:
    return bool(spec.per_output) and spec.scope == "layer" and spec.parsed_pattern.kind == "unstructured"


def _keep_top_per_row(name: str, score: torch.Tensor, level: float) -> torch.Tensor:
    import torch

    if not bool(torch.isfinite(score).all()):
        raise ValueError(f"tensor {name!r} has NaN or inf wanda scores; cannot choose a mask")
    rows = score.reshape(1, -1) if score.dim() < 2 else score.reshape(score.shape[0], -1)
    n_prune = round(level * rows.shape[1])
    mask = torch.ones_like(rows, dtype=torch.bool)
    if n_prune > 0:
        idx = torch.topk(rows, n_prune, dim=1, largest=False, sorted=False).indices
        mask.scatter_(1, idx, False)
    return mask.view(score.shape)


def _features(name: str, module: nn.Module, attr: str, weight: torch.Tensor, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The rows of input features that multiply ``weight``, as (layout, [rows, features])."""
    from torch import nn
    from torch.nn import functional as F

    if isinstance(module, nn.modules.conv._ConvNd) and attr == "weight":
        if module.groups != 1 or module.transposed:
            raise TypeError(f"wanda supports convolutions with groups=1 (not transposed); {name!r} is {module}")
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            cols = F.unfold(x if x.dim() == 4 else x.unsqueeze(0), module.kernel_size, module.dilation, module.padding, module.stride)
            return "unfold", cols.transpose(1, 2).reshape(-1, cols.shape[1])
        channels = x.movedim(-(weight.dim() - 1), -1)  # channel dim of (N, C, *spatial) or (C, *spatial)
        return "channel", channels.reshape(-1, channels.shape[-1])
    if isinstance(module, (nn.Linear, nn.Bilinear)) and attr != "weight":
        raise TypeError(f"wanda scores weights that multiply input features; {name!r} does not: exclude it")
    if weight.shape[-1] != x.shape[-1]:
        raise TypeError(
            f"wanda cannot score {name!r} ({type(module).__name__}, shape {tuple(weight.shape)}): its inputs' "
            f"last dim is {x.shape[-1]}, not the weight's {weight.shape[-1]}; exclude it"
        )
    return "last", x.reshape(-1, x.shape[-1])


@hookimpl
def register_sparsifiers(register: Callable[[type[Any]], None]) -> None:
    register(Wanda)
