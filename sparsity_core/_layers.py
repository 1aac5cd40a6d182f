"""Layer kinds: the one place that knows which tensors of a module are matmul/conv weights, and
which of their axes is the output and which the reduction (input).

Patterns run on the *matrix view* of a tensor, ``[outputs, reduction]``: the output axis first,
then the other axes in order (kernel positions), the input axis last. So N:M groups and ``1xW``
blocks run along the input of the matmul, where sparse tensor cores need them: for ``nn.Linear``
(``[out, in]``) that is the last dim; for transformers' ``Conv1D`` (``[in, out]``) dim 0; for a
``k x k`` convolution the input channels at each kernel position (the layout of NVIDIA's ASP and
TensorRT), not the flattened ``in*kh*kw``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass(frozen=True)
class LayerKind:
    """A kind of layer: which module classes, which of their tensors are weights, and how those are
    oriented. ``module_types`` holds classes or qualified class names (``"transformers.pytorch_utils.Conv1D"``),
    matched against a module's class and its bases, so a library need not be imported to be known."""

    name: str
    module_types: tuple[type | str, ...]
    weights: tuple[str, ...] = ("weight",)
    output_axis: int = 0
    input_axis: int | None = 1
    #: False for lookups (embeddings): not a matmul, never covered by default.
    matmul: bool = True

    def matches(self, module: Any) -> bool:
        for cls in type(module).__mro__:
            for t in self.module_types:
                if cls is t or (isinstance(t, str) and f"{cls.__module__}.{cls.__qualname__}" == t):
                    return True
        return False


@dataclass(frozen=True)
class TensorLayout:
    """One tensor's kind and orientation. ``input_axis=None``: the generic view (dim 0 = outputs,
    the rest flattened in order, v1's 2-D view), used where nothing is known (mapping targets)."""

    kind: str | None
    output_axis: int = 0
    input_axis: int | None = None
    matmul: bool = False

    def permutation(self, ndim: int) -> tuple[int, ...]:
        if ndim <= 1:
            return tuple(range(ndim))
        out = self.output_axis % ndim
        if self.input_axis is None:
            return (out, *[d for d in range(ndim) if d != out])
        inp = self.input_axis % ndim
        return (out, *[d for d in range(ndim) if d not in (out, inp)], inp)

    def matrix(self, t: torch.Tensor) -> torch.Tensor:
        """The ``[outputs, reduction]`` view of ``t`` (a view: no copy, maybe not contiguous)."""
        if t.dim() <= 1:
            return t.reshape(1, -1)
        perm = self.permutation(t.dim())
        moved = t.permute(perm) if perm != tuple(range(t.dim())) else t
        try:
            return moved.view(moved.shape[0], -1)
        except RuntimeError:  # not expressible as a view: a copy (only for odd layouts)
            return moved.reshape(moved.shape[0], -1)

    def from_matrix(self, m: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Inverse of :meth:`matrix`: a tensor shaped ``shape`` (contiguous) from its matrix view."""
        ndim = len(shape)
        if ndim <= 1:
            return m.reshape(shape)
        perm = self.permutation(ndim)
        permuted_shape = [shape[d] for d in perm]
        inverse = [0] * ndim
        for i, d in enumerate(perm):
            inverse[d] = i
        return m.reshape(permuted_shape).permute(inverse).contiguous()

    def is_identity(self, ndim: int) -> bool:
        """Whether the matrix view of an ``ndim`` tensor is the plain row-major ``[shape[0], rest]`` view."""
        return self.permutation(ndim) == tuple(range(ndim))


_GENERIC = TensorLayout(None)


def generic_layout(tensor: Any = None) -> TensorLayout:
    """Dim 0 = outputs, the rest flattened in order (v1's 2-D view)."""
    return _GENERIC


def _builtin_kinds() -> list[LayerKind]:
    from torch import nn

    return [
        LayerKind("linear", (nn.Linear,), ("weight",), 0, 1),
        LayerKind("bilinear", (nn.Bilinear,), ("weight",), 0, -1),
        LayerKind("conv", (nn.Conv1d, nn.Conv2d, nn.Conv3d), ("weight",), 0, 1),
        LayerKind("conv_transpose", (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), ("weight",), 1, 0),
        LayerKind(
            "attention",
            (nn.MultiheadAttention,),
            ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
            0,
            1,
        ),
        LayerKind("embedding", (nn.Embedding, nn.EmbeddingBag), ("weight",), 0, 1, matmul=False),
        # transformers' GPT-2 style Conv1D: weight [in, out], y = x @ W + b
        LayerKind("conv1d", ("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D"), ("weight",), 1, 0),
    ]


def layer_kinds() -> list[LayerKind]:
    """Every known layer kind: the built-ins, then those plugins register (first match wins)."""
    return _builtin_kinds()


def kind_of(module: nn.Module, kinds: Iterable[LayerKind] | None = None) -> LayerKind | None:
    for kind in kinds if kinds is not None else layer_kinds():
        if kind.matches(module):
            return kind
    return None


def layout_of(module: nn.Module, attr: str, kinds: Iterable[LayerKind] | None = None) -> TensorLayout:
    """The layout of ``module.<attr>`` (generic when the module's kind does not list ``attr``)."""
    kind = kind_of(module, kinds)
    if kind is None or attr not in kind.weights:
        return _GENERIC
    return TensorLayout(kind.name, kind.output_axis, kind.input_axis, kind.matmul)
