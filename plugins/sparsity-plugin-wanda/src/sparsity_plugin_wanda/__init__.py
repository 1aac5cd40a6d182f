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

Orientation: a row is an output of the layer and the features are its inputs, whatever the
layer stores: the comparison and the statistics follow the tensor's layer layout (its
``[outputs, inputs]`` matrix view, see ``sparsity_core.TensorLayout``). So transformers' ``Conv1D``
(weight ``[in, out]``) is scored exactly as the equivalent ``nn.Linear``, a ``k x k`` convolution's
features are the input channels at each kernel position, and ``nn.MultiheadAttention``'s
``in_proj_weight`` takes the query, key and value statistics for its three blocks of rows.
Supported layer kinds: ``linear``, ``conv`` (groups=1), ``conv1d``, ``attention``; embeddings take
token ids, not activations, and are not covered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import Field

from sparsity_core import Capabilities, ScoreSparsifier, ScoreSpec, hookimpl

if TYPE_CHECKING:
    # torch is imported where it is used: discovery (`sparsity list`) must not pay for it.
    import torch
    from torch import nn

    from sparsity_core import MaskContext, TensorLayout

SPARSITY_CORE_API = 2

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
    capabilities = Capabilities(calibration=True, layer_kinds=frozenset({"linear", "conv", "conv1d", "attention"}))

    def __init__(self, spec: Any = None, /, **fields: Any) -> None:
        super().__init__(spec, **fields)
        # per name: sum of squares of each input feature, [parts, features] (parts: 3 for an
        # attention in_proj_weight, whose row blocks see query, key and value; else 1) ...
        self._sum_sq: dict[str, torch.Tensor] = {}
        # ... the rows (tokens, positions) each part has seen ...
        self._rows: dict[str, torch.Tensor] = {}
        # ... and how the features map onto the weight: (layout, feature order, weight shape)
        self._layout: dict[str, tuple[TensorLayout, str, torch.Size]] = {}
        self._synced = True

    # -- calibration -------------------------------------------------------------------------
    def reset_calibration(self) -> None:
        self._sum_sq.clear()
        self._rows.clear()
        self._layout.clear()
        self._synced = True

    def observe(self, name: str, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        import torch

        from sparsity_core._layers import layout_of

        attr = _attr(name, module)
        weight = getattr(module, attr)
        layout = layout_of(module, attr)
        parts = _inputs(name, module, attr, layout, inputs)
        order, rows = zip(*(_features(name, module, attr, layout, weight, x.detach()) for x in parts))
        sum_sq = torch.stack([r.float().pow(2).sum(0) for r in rows])
        count = torch.tensor([float(r.shape[0]) for r in rows], dtype=torch.float64, device=sum_sq.device)
        if name in self._sum_sq:
            self._sum_sq[name] += sum_sq
            self._rows[name] += count
        else:
            self._sum_sq[name], self._rows[name] = sum_sq, count
            self._layout[name] = (layout, order[0], weight.shape)
        self._synced = False

    def _sync(self) -> None:
        """Sum statistics over ranks, so that every rank of a DDP run chooses the same masks."""
        import torch

        self._synced = True
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        for name in sorted(self._sum_sq):
            sum_sq, rows = self._sum_sq[name], self._rows[name]
            total = torch.cat([sum_sq.reshape(-1).double(), rows.to(sum_sq.device)])
            torch.distributed.all_reduce(total)
            self._sum_sq[name] = total[: sum_sq.numel()].view(sum_sq.shape).float()
            self._rows[name] = total[sum_sq.numel() :]

    # -- scores and masks --------------------------------------------------------------------
    def _norms(self, name: str, tensor: torch.Tensor) -> tuple[TensorLayout, torch.Tensor]:
        """The layout of ``name`` and the rms of the input feature of each element of its matrix
        view, ``[outputs or 1, reduction]`` (broadcast along the outputs)."""
        if name not in self._sum_sq:
            raise RuntimeError(
                f"wanda has no calibration activations for {name!r}: it needs calibration. Pass "
                f"calibration=batches to sparsify(), call SparsityController.calibrate(batches) before "
                f"step(), or give the Lightning callback calibration_batches > 0"
            )
        if not self._synced:
            self._sync()
        layout, order, shape = self._layout[name]
        if tensor.shape != shape:
            raise ValueError(f"wanda: {name!r} has shape {tuple(tensor.shape)}, but was calibrated with {tuple(shape)}")
        rms = (self._sum_sq[name] / self._rows[name].clamp(min=1).to(self._sum_sq[name].dtype)[:, None]).sqrt()
        rms = rms.to(tensor.device)
        kernel = _kernel(layout, shape)
        if order == "unfold":  # F.unfold orders features (channel, *kernel); the matrix view (*kernel, channel)
            rms = rms.view(rms.shape[0], -1, kernel).transpose(1, 2).reshape(rms.shape[0], -1)
        elif order == "channel":  # one feature per input channel, shared by every kernel position
            rms = rms.repeat(1, kernel)
        if rms.shape[0] > 1:  # row blocks (in_proj: query, key, value), each with its own features
            outputs = layout.matrix(tensor).shape[0]
            rms = rms.repeat_interleave(outputs // rms.shape[0], dim=0)
        return layout, rms

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        layout, rms = self._norms(name, tensor)
        scores = layout.matrix(tensor.detach()).abs().float() * rms
        return layout.from_matrix(scores, tensor.shape)

    def compute_masks(
        self,
        tensors: Mapping[str, torch.Tensor],
        levels: Mapping[str, float],
        context: MaskContext | None = None,
    ) -> dict[str, torch.Tensor]:
        per_row = {n for n in tensors if _per_output(self.spec_for(n))}
        rest = {n: t for n, t in tensors.items() if n not in per_row}
        masks = super().compute_masks(rest, levels, context) if rest else {}
        current = context.current if context is not None else {}
        for name in per_row:
            layout, rms = self._norms(name, tensors[name])
            scores = layout.matrix(tensors[name].detach()).abs().float() * rms
            keep = _keep_top_per_row(name, scores, levels[name], current.get(name), layout)
            masks[name] = layout.from_matrix(keep, tensors[name].shape)
        return {n: masks[n] for n in tensors}


def _per_output(spec: Any) -> bool:
    return bool(spec.per_output) and spec.scope == "layer" and spec.parsed_pattern.kind == "unstructured"


def _keep_top_per_row(
    name: str, scores: torch.Tensor, level: float, current: torch.Tensor | None, layout: TensorLayout
) -> torch.Tensor:
    """Keep mask over the ``[outputs, inputs]`` matrix ``scores``: in each row the
    ``round(level * inputs)`` lowest are pruned (ties: the earlier first), and every weight the
    current mask prunes stays pruned (a row that has more pruned keeps them all pruned)."""
    import torch

    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"tensor {name!r} has NaN or inf wanda scores; cannot choose a mask")
    rows, cols = scores.shape
    n_prune = torch.full((rows, 1), round(level * cols), dtype=torch.int64, device=scores.device)
    if current is not None:
        kept = layout.matrix(current.to(scores.device))
        scores = scores.masked_fill(~kept, -torch.inf)
        n_prune = torch.maximum(n_prune, (~kept).sum(1, keepdim=True))
    order = torch.argsort(scores, dim=1, stable=True)
    rank = torch.arange(cols, device=scores.device).expand(rows, cols)
    return torch.empty(rows, cols, dtype=torch.bool, device=scores.device).scatter_(1, order, rank >= n_prune)


def _attr(name: str, module: nn.Module) -> str:
    """The attribute of ``module`` that holds ``name`` (for a tied weight, the owner's own name)."""
    import torch

    attr = name.rpartition(".")[2]
    if isinstance(getattr(module, attr, None), torch.Tensor):
        return attr
    from sparsity_core._layers import kind_of

    kind = kind_of(module)
    for candidate in kind.weights if kind is not None else ():
        if isinstance(getattr(module, candidate, None), torch.Tensor):
            return candidate
    raise TypeError(f"wanda cannot find the weight {name!r} on its module {type(module).__name__}")


def _kernel(layout: TensorLayout, shape: torch.Size) -> int:
    """Kernel positions per input feature: the axes of the weight besides output and input."""
    if layout.input_axis is None or len(shape) <= 2:
        return 1
    out, inp = layout.output_axis % len(shape), layout.input_axis % len(shape)
    kernel = 1
    for d, size in enumerate(shape):
        if d not in (out, inp):
            kernel *= size
    return kernel


def _inputs(name: str, module: nn.Module, attr: str, layout: TensorLayout, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    """The activations that multiply ``attr``: the first input; for attention's projections the
    query, key or value (``in_proj_weight``: all three, for its three blocks of rows)."""
    import torch

    wanted = {"in_proj_weight": (0, 1, 2), "q_proj_weight": (0,), "k_proj_weight": (1,), "v_proj_weight": (2,)}
    picks = wanted.get(attr, (0,)) if layout.kind == "attention" else (0,)
    if len(inputs) <= max(picks):
        raise TypeError(
            f"wanda cannot score {name!r}: its module {type(module).__name__} was called with "
            f"{len(inputs)} positional input(s); it needs input(s) {list(picks)} (keyword arguments are not seen)"
        )
    xs = [inputs[i] for i in picks]
    for x in xs:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(
                f"wanda cannot score {name!r}: its module {type(module).__name__} takes "
                f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype} inputs, not activations; "
                f"exclude it (e.g. exclude=['{name}'])"
            )
    return xs


def _features(
    name: str, module: nn.Module, attr: str, layout: TensorLayout, weight: torch.Tensor, x: torch.Tensor
) -> tuple[str, torch.Tensor]:
    """The rows of input features that multiply ``weight``, as (feature order, [rows, features]):
    "unfold" (a Conv2d's (channel, *kernel) patches), "channel" (one per input channel) or
    "input" (the input's last dim, which is the matrix view's reduction axis)."""
    from torch import nn
    from torch.nn import functional as F

    if layout.kind == "conv":
        assert isinstance(module, nn.modules.conv._ConvNd)
        if module.groups != 1:
            raise TypeError(f"wanda supports convolutions with groups=1; {name!r} is {module}: exclude it")
        if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
            cols = F.unfold(x if x.dim() == 4 else x.unsqueeze(0), module.kernel_size, module.dilation, module.padding, module.stride)
            return "unfold", cols.transpose(1, 2).reshape(-1, cols.shape[1])
        channels = x.movedim(-(weight.dim() - 1), -1)  # channel dim of (N, C, *spatial) or (C, *spatial)
        return "channel", channels.reshape(-1, channels.shape[-1])
    if layout.kind not in ("linear", "conv1d", "attention"):
        raise TypeError(
            f"wanda scores the weights of linear, conv, conv1d and attention layers; {name!r} "
            f"({type(module).__name__}, layer kind {layout.kind}) is not one: exclude it"
        )
    features = layout.matrix(weight).shape[1]
    if x.shape[-1] != features:
        raise TypeError(
            f"wanda cannot score {name!r} ({type(module).__name__}, shape {tuple(weight.shape)}): its inputs' "
            f"last dim is {x.shape[-1]}, not the weight's {features} input features; exclude it"
        )
    return "input", x.reshape(-1, x.shape[-1])


@hookimpl
def register_sparsifiers(register: Callable[[type[Any]], None]) -> None:
    register(Wanda)
