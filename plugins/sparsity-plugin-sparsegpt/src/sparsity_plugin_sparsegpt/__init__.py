"""SparseGPT for sparsity-core: one-shot pruning with reconstruction (Frantar & Alistarh, 2023).

For each layer, calibration inputs ``X`` give the Hessian of the layer-wise squared error,
``H = 2/n X^T X``. The sweep then walks the columns (inputs) of ``W`` left to right: it prunes the
weights whose removal costs least, ``w^2 / [H^-1]_jj^2``, and moves every weight not yet swept
by the optimal brain surgeon update, so that ``W'X`` stays close to ``WX``. Kept weights change:
``compute_masks`` returns :class:`sparsity_core.Reconstruction` (masks and new weights).

The sweep follows the reference ``fasterprune`` (IST-DASLab/sparsegpt): lazy batches of
``block_size`` columns, an unstructured mask chosen per block, N:M groups chosen when the sweep
reaches them, dampening ``percdamp * mean(diag(H))``, dead inputs handled as there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from sparsity_core import Capabilities, MaskContext, Reconstruction, ScoreSpec, Sparsifier, hookimpl
from sparsity_core._specs import parse_pattern  # not exported; the validator runs before parsed_pattern exists

if TYPE_CHECKING:
    # torch is imported where it is used: discovery (`sparsity list`) must not pay for it.
    import torch
    from torch import nn

    from sparsity_core import TensorLayout

SPARSITY_CORE_API = 2

__all__ = ["SparseGPT", "SparseGPTSpec", "register_sparsifiers"]


class SparseGPTSpec(ScoreSpec):
    pattern: str = Field(
        "unstructured",
        description=(
            "'unstructured' (each block of block_size columns prunes the level of its weights) or 'N:M' "
            "(keep N of every M consecutive weights along the input axis, e.g. '2:4', which fixes "
            "sparsity_level at 1 - N/M). Blocks 'HxW' and 'channel' are not supported."
        ),
    )
    scope: Literal["layer", "global"] = Field(
        "layer",
        description="'layer' only: SparseGPT prunes each tensor to its level on its own ('global' is refused).",
    )
    block_size: int = Field(
        128,
        ge=1,
        description=(
            "Columns per lazy batch of the sweep (the reference's blocksize). Unstructured masks are "
            "chosen per block; with N:M it must be a multiple of M and changes only the speed."
        ),
    )
    dampening: float = Field(
        0.01,
        ge=0.0,
        description=(
            "Fraction of the mean diagonal of the Hessian added to its diagonal before inverting it "
            "(the reference's percdamp)."
        ),
    )

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:  # replaces ScoreSpec's: other choices, other words
        try:
            kind = parse_pattern(value).kind
        except ValueError:
            kind = None
        if kind not in ("unstructured", "n:m"):
            why = {"channel": ": it prunes single weights, not whole output channels", "block": ": it prunes single weights, not blocks"}
            raise ValueError(
                f"sparsegpt supports pattern 'unstructured' or 'N:M' with 0 < N <= M (e.g. '2:4'); "
                f"got {value.strip()!r}{why.get(kind or '', '')}"
            )
        return value.strip()

    @field_validator("scope")
    @classmethod
    def _only_layer_scope(cls, value: str) -> str:
        if value != "layer":
            raise ValueError(
                "sparsegpt supports scope='layer' only: each tensor's sweep reaches its own level, and its "
                "scores are comparable only within the tensor"
            )
        return value

    @model_validator(mode="after")
    def _block_holds_whole_groups(self) -> SparseGPTSpec:
        pattern = self.parsed_pattern
        if pattern.kind == "n:m" and self.block_size % pattern.b:
            raise ValueError(
                f"block_size={self.block_size} must be a multiple of M={pattern.b} for pattern {self.pattern!r}: "
                f"an N:M group must not straddle two blocks of the sweep"
            )
        return self


class _Statistics:
    """One tensor's calibration: the running mean ``H = 2/n sum x x^T`` (float32) and ``n``."""

    __slots__ = ("hessian", "samples", "layout", "shape")

    def __init__(self, hessian: torch.Tensor, layout: TensorLayout, shape: torch.Size) -> None:
        self.hessian, self.samples, self.layout, self.shape = hessian, 0, layout, shape


class SparseGPT(Sparsifier):
    """SparseGPT (Frantar & Alistarh 2023): prune by the OBS sweep over columns, updating kept weights."""

    name = "sparsegpt"
    Spec = SparseGPTSpec
    spec: SparseGPTSpec
    capabilities = Capabilities(
        calibration=True,
        reconstruction=True,
        layer_kinds=frozenset({"linear", "conv1d", "conv"}),
        tensor_ranks=frozenset({2, 4}),
    )

    def __init__(self, spec: Any = None, /, **fields: Any) -> None:
        super().__init__(spec, **fields)
        self._stats: dict[str, _Statistics] = {}
        self._synced = True

    # -- calibration -------------------------------------------------------------------------
    def reset_calibration(self) -> None:
        self._stats.clear()  # the Hessians are the only large state: drop them
        self._synced = True

    def observe(self, name: str, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        import torch

        from sparsity_core._layers import layout_of

        from ._features import feature_rows

        attr = name.rpartition(".")[2]
        weight = getattr(module, attr)
        layout = layout_of(module, attr)
        rows = feature_rows(name, module, layout, weight, inputs[0] if inputs else None)
        stats = self._stats.get(name)
        if stats is None:
            columns = rows.shape[1]
            hessian = torch.zeros(columns, columns, dtype=torch.float32, device=rows.device)
            stats = self._stats[name] = _Statistics(hessian, layout, weight.shape)
        new = rows.shape[0]
        if new == 0:
            return
        total = stats.samples + new
        # the reference's running mean: H <- H * n / (n + k) + 2/(n + k) * X^T X, in float32
        x = rows.float()
        stats.hessian.addmm_(x.t(), x, beta=stats.samples / total, alpha=2.0 / total)
        stats.samples = total
        self._synced = False

    def _sync(self) -> None:
        """Sum the Hessians over ranks, so that every rank of a DDP run prunes alike."""
        import torch

        self._synced = True
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for name in sorted(self._stats):
            stats = self._stats[name]
            h = stats.hessian
            flat = torch.cat([(h * stats.samples).view(-1), torch.tensor([float(stats.samples)], device=h.device)])
            torch.distributed.all_reduce(flat)
            total = int(flat[-1].item())
            stats.hessian = (flat[:-1].view_as(h) / max(total, 1)).contiguous()
            stats.samples = total

    # -- masks and weights ---------------------------------------------------------------------
    def compute_masks(
        self,
        tensors: Mapping[str, torch.Tensor],
        levels: Mapping[str, float],
        context: MaskContext | None = None,
    ) -> Reconstruction:
        import torch

        from ._sweep import NotPositiveDefiniteError, inverse_hessian_factor, sweep

        missing = [n for n in tensors if n not in self._stats or self._stats[n].samples == 0]
        if missing:
            raise RuntimeError(
                f"sparsegpt has no calibration statistics for {missing}: it needs calibration. Pass "
                f"calibration=batches to sparsify(), call SparsityController.calibrate(batches) before "
                f"step(), or give the Lightning callback calibration batches"
            )
        if not self._synced:
            self._sync()
        current = context.current if context is not None and not self.capabilities.regrowth else {}
        masks: dict[str, torch.Tensor] = {}
        weights: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, tensor in tensors.items():
                stats = self._stats[name]
                if tensor.shape != stats.shape:
                    raise ValueError(
                        f"sparsegpt: {name!r} has shape {tuple(tensor.shape)}, but was calibrated with {tuple(stats.shape)}"
                    )
                level = float(levels[name])
                if not 0.0 <= level <= 1.0:
                    raise ValueError(f"level for {name!r} must be in [0, 1], got {level}")
                spec = self.spec_for(name)
                pattern = spec.parsed_pattern  # type: ignore[attr-defined]
                layout = stats.layout  # the order H's columns were gathered in
                keep_now = current.get(name)
                forced = None if keep_now is None else ~layout.matrix(keep_now.to(device=tensor.device, dtype=torch.bool))
                if level == 0.0 and (forced is None or not bool(forced.any())):
                    masks[name] = torch.ones(tensor.shape, dtype=torch.bool, device=tensor.device)
                    continue  # nothing to prune: the weights stay as they are
                w = layout.matrix(tensor.detach()).to(torch.float32)  # the sweep copies it
                hessian = stats.hessian.to(device=w.device, dtype=torch.float32, copy=True)
                try:
                    hinv, dead = inverse_hessian_factor(hessian, spec.dampening)  # type: ignore[attr-defined]
                except NotPositiveDefiniteError as exc:
                    raise RuntimeError(f"sparsegpt cannot prune {name!r}: {exc}") from None
                del hessian
                result = sweep(
                    w,
                    hinv,
                    dead,
                    level=level,
                    nm=(pattern.a, pattern.b) if pattern.kind == "n:m" else None,
                    block_size=spec.block_size,  # type: ignore[attr-defined]
                    forced=forced,
                )
                masks[name] = layout.from_matrix(~result.pruned, tensor.shape)
                weights[name] = layout.from_matrix(result.weight, tensor.shape).to(tensor.dtype)
        return Reconstruction({n: masks[n] for n in tensors}, weights)


@hookimpl
def register_sparsifiers(register: Callable[[type[Any]], None]) -> None:
    register(SparseGPT)
