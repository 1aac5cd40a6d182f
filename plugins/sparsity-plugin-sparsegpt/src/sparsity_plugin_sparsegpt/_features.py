"""The input features a weight multiplies, in the column order of its matrix view.

SparseGPT's Hessian ``H = 2/n * X^T X`` must index its rows and columns like the columns of
``layout.matrix(W)`` (see :mod:`sparsity_core._layers`): for ``nn.Linear`` and transformers'
``Conv1D`` the input's last dim; for ``nn.Conv2d`` the unfolded input patches, whose features
``F.unfold`` yields in ``(in, kh, kw)`` order and the matrix view wants in ``(kh, kw, in)`` order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from sparsity_core import TensorLayout

#: The layer kinds whose inputs we know how to turn into feature rows.
SUPPORTED_KINDS = frozenset({"linear", "conv1d", "conv"})


def feature_rows(name: str, module: nn.Module, layout: TensorLayout, weight: torch.Tensor, x: Any) -> torch.Tensor:
    """``[samples, reduction]`` rows of the features that ``weight`` (``module.<attr>``) multiplies."""
    import torch

    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(
            f"sparsegpt cannot calibrate {name!r}: its module {type(module).__name__} takes {got} inputs, "
            f"not activations; exclude it (e.g. exclude=['{name}'])"
        )
    if layout.kind not in SUPPORTED_KINDS or layout.input_axis is None:
        raise TypeError(
            f"sparsegpt supports the weights of Linear, transformers Conv1D and Conv2d layers (layer kinds "
            f"{sorted(SUPPORTED_KINDS)}); {name!r} belongs to {type(module).__name__} (kind {layout.kind!r}): "
            f"exclude it"
        )
    x = x.detach()
    if layout.kind == "conv":
        return _conv2d_rows(name, module, x)
    columns = layout.matrix(weight).shape[1]
    if x.shape[-1] != columns:
        raise TypeError(
            f"sparsegpt: the inputs of {name!r} ({type(module).__name__}) have {x.shape[-1]} features in their "
            f"last dim, but its weight {tuple(weight.shape)} reduces over {columns}"
        )
    return x.reshape(-1, columns)


def _conv2d_rows(name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from torch import nn
    from torch.nn import functional as F

    if not isinstance(module, nn.Conv2d):
        raise TypeError(
            f"sparsegpt supports 2-D convolutions (4-D weights) only; {name!r} is a {type(module).__name__}: exclude it"
        )
    if module.groups != 1 or module.transposed or module.padding_mode != "zeros":
        raise TypeError(
            f"sparsegpt supports Conv2d with groups=1 and padding_mode='zeros' (not transposed); {name!r} is "
            f"{module} (groups={module.groups}, padding_mode={module.padding_mode!r}): exclude it"
        )
    if x.dim() == 3:  # unbatched (C, H, W)
        x = x.unsqueeze(0)
    kh, kw = module.kernel_size
    dh, dw = module.dilation
    (top, bottom), (left, right) = _padding(module)
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom))
    cols = F.unfold(x, (kh, kw), dilation=(dh, dw), stride=module.stride)  # [N, in*kh*kw, L]
    batch, _, positions = cols.shape
    in_channels = module.in_channels
    # (in, kh, kw) -> (kh, kw, in): the column order of the matrix view [out, kh*kw*in]
    cols = cols.view(batch, in_channels, kh * kw, positions).permute(0, 3, 2, 1)
    return cols.reshape(batch * positions, kh * kw * in_channels)


def _padding(module: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int]]:
    """(before, after) zero padding of each spatial dim, 'same' and 'valid' included."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0), (0, 0)
        out = []
        for k, d in zip(module.kernel_size, module.dilation):  # 'same' (stride 1): as torch pads it
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out[0], out[1]
    ph, pw = module.padding
    return (ph, ph), (pw, pw)
