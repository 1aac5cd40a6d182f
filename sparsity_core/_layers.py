"""Layer kinds: the one place that knows which tensors of a module are matmul/conv weights, and
which of their axes is the output and which the reduction (input).

Patterns run on the *matrix view* of a tensor, ``[outputs, reduction]``: the output axis first,
then the other axes in order (kernel positions), the input axis last. So N:M groups and ``1xW``
blocks run along the input of the matmul, where sparse tensor cores need them: for ``nn.Linear``
(``[out, in]``) that is the last dim; for transformers' ``Conv1D`` (``[in, out]``) dim 0; for a
``k x k`` convolution the input channels at each kernel position (the layout of NVIDIA's ASP and
TensorRT), not the flattened ``in*kh*kw``.

The built-in kinds are registered by the ``builtin`` plugin; a plugin declares more through the
``register_layer_kinds`` hook (``register(LayerKind(...))``), e.g. for a third-party quantized Linear.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import torch
    from torch import nn


#: A layer kind's name: it is also the ``KIND`` of ``"KIND:GLOB"`` selectors in include/exclude.
_KIND_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class LayerKind:
    """A kind of layer: which module classes, which of their tensors are weights, and how those are
    oriented.

    ``module_types`` holds classes or qualified class names (``"transformers.pytorch_utils.Conv1D"``),
    matched against a module's class and its bases, so a library need not be imported to be known.
    The most specific class wins: a kind registered for a subclass of ``nn.Linear`` takes its
    modules from the built-in ``linear``. ``weights`` are the attribute names of the tensors the
    kind knows (a kind's other tensors, biases say, have no kind). ``output_axis`` and
    ``input_axis`` orient them (see :class:`TensorLayout`); ``matmul=False`` marks a lookup
    (embeddings), never covered by default."""

    name: str
    module_types: tuple[type | str, ...]
    weights: tuple[str, ...] = ("weight",)
    output_axis: int = 0
    input_axis: int | None = 1
    #: False for lookups (embeddings): not a matmul, never covered by default.
    matmul: bool = True

    def __post_init__(self) -> None:
        where = f"LayerKind({self.name!r})"
        if not isinstance(self.name, str) or not _KIND_NAME.match(self.name):
            raise ValueError(
                f"LayerKind name must be letters, digits, '_' or '-', starting with a letter (it is the KIND "
                f"of 'KIND:GLOB' selectors); got {self.name!r}"
            )
        types = (self.module_types,) if isinstance(self.module_types, (str, type)) else tuple(self.module_types)
        if not types or not all(isinstance(t, (str, type)) for t in types):
            raise TypeError(f"{where}.module_types must be classes or qualified class names, got {self.module_types!r}")
        weights = (self.weights,) if isinstance(self.weights, str) else tuple(self.weights)
        if not weights or not all(isinstance(w, str) and w and "." not in w for w in weights):
            raise TypeError(f"{where}.weights must be attribute names of the module's tensors, got {self.weights!r}")
        if not isinstance(self.output_axis, int) or not (self.input_axis is None or isinstance(self.input_axis, int)):
            raise TypeError(f"{where}: output_axis must be an int and input_axis an int or None")
        if self.input_axis is not None and self.input_axis == self.output_axis:
            raise ValueError(f"{where}: output_axis and input_axis are both {self.output_axis}")
        object.__setattr__(self, "module_types", types)
        object.__setattr__(self, "weights", weights)

    def matches(self, module: Any) -> bool:
        """Whether ``module``'s class or one of its bases is one of :attr:`module_types`."""
        return any(_lists(self, cls) for cls in type(module).__mro__)

    def layout(self) -> TensorLayout:
        return TensorLayout(self.name, self.output_axis, self.input_axis, self.matmul)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _lists(kind: LayerKind, cls: type) -> bool:
    path = None
    for t in kind.module_types:
        if t is cls:
            return True
        if isinstance(t, str):
            path = path or _class_path(cls)
            if t == path:
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
        # the width spelt out, not -1: a rank's shard of FSDP2 rows may hold no rows at all
        width = math.prod(moved.shape[1:])
        try:
            return moved.view(moved.shape[0], width)
        except RuntimeError:  # not expressible as a view: a copy (only for odd layouts)
            return moved.reshape(moved.shape[0], width)

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


#: The built-in kinds, registered by the ``builtin`` plugin through ``register_layer_kinds``
#: like any other. Classes are named by path, so that discovery imports no torch.
BUILTIN_LAYER_KINDS: Final[tuple[LayerKind, ...]] = (
    # nn.Linear and its subclasses (NonDynamicallyQuantizableLinear: MultiheadAttention.out_proj; LazyLinear)
    LayerKind("linear", ("torch.nn.modules.linear.Linear",)),
    # y = x1^T W x2: W [out, in1, in2]; the last input is the reduction axis of the inner product
    LayerKind("bilinear", ("torch.nn.modules.linear.Bilinear",), input_axis=-1),
    LayerKind("conv", tuple(f"torch.nn.modules.conv.Conv{d}d" for d in (1, 2, 3))),
    # weight [in, out / groups, *kernel]
    LayerKind("conv_transpose", tuple(f"torch.nn.modules.conv.ConvTranspose{d}d" for d in (1, 2, 3)), output_axis=1, input_axis=0),
    # in_proj_weight [3E, E] or q/k/v_proj_weight [E, qdim/kdim/vdim]; out_proj is an nn.Linear
    LayerKind(
        "attention",
        ("torch.nn.modules.activation.MultiheadAttention",),
        ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
    ),
    LayerKind("embedding", ("torch.nn.modules.sparse.Embedding", "torch.nn.modules.sparse.EmbeddingBag"), matmul=False),
    # transformers' GPT-2 style Conv1D: weight [in, out], y = x @ W + b (transformers < 4.31 kept it in modeling_utils)
    LayerKind("conv1d", ("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D"), output_axis=1, input_axis=0),
)


def layer_kinds() -> tuple[LayerKind, ...]:
    """Every known layer kind: the built-ins, then those plugins register through
    ``register_layer_kinds`` (in the process-wide registry; discovery runs on first use)."""
    from ._registry import get_registry

    return get_registry().layer_kinds()


def kind_of(module: nn.Module, kinds: Iterable[LayerKind] | None = None) -> LayerKind | None:
    """The kind of ``module``: the kind that lists its most specific class (its own, then its
    bases in method resolution order); among kinds listing the same class, the first registered."""
    return _kind_of_class(type(module), tuple(kinds) if kinds is not None else layer_kinds())


@functools.lru_cache(maxsize=1024)
def _kind_of_class(cls: type, kinds: tuple[LayerKind, ...]) -> LayerKind | None:
    for klass in cls.__mro__:
        for kind in kinds:
            if _lists(kind, klass):
                return kind
    return None


def layout_of(module: nn.Module, attr: str, kinds: Iterable[LayerKind] | None = None) -> TensorLayout:
    """The layout of ``module.<attr>`` (generic when the module's kind does not list ``attr``)."""
    kind = kind_of(module, kinds)
    if kind is None or attr not in kind.weights:
        return _GENERIC
    return kind.layout()


# -- selectors: "GLOB" or "KIND:GLOB" in include / exclude / overrides ----------------------------
_SELECTOR = re.compile(r"^([A-Za-z][A-Za-z0-9_\-]*):(.*)$")


@dataclass(frozen=True)
class Selector:
    """One include/exclude/overrides pattern: a glob over names, or ``"KIND:GLOB"``: the weights
    of layer kind ``KIND`` (case-insensitive) whose names match ``GLOB``."""

    text: str
    kind: str | None
    glob: str

    def matches(self, name: str, kind: str | None = None) -> bool:
        if self.kind is not None and (kind is None or kind.lower() != self.kind):
            return False
        return fnmatch.fnmatchcase(name, self.glob)


def parse_selector(text: str, where: str = "pattern") -> Selector:
    """``"KIND:GLOB"`` when the text before the first ':' is a name; else a plain glob. An unknown
    KIND is a ValueError listing the kinds (a name holding ':' is matched with ``[:]``)."""
    m = _SELECTOR.match(text)
    if m is None:
        return Selector(text, None, text)
    kind = m[1].lower()
    known = [k.name for k in layer_kinds()]
    if kind not in {k.lower() for k in known}:
        raise ValueError(
            f"{where} {text!r}: unknown layer kind {m[1]!r} in 'KIND:GLOB'; the layer kinds are: "
            f"{', '.join(known)}. (To match a name that holds ':', write it as '[:]', e.g. {text.replace(':', '[:]', 1)!r}.)"
        )
    return Selector(text, kind, m[2])
