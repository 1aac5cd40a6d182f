"""``to_semi_structured``: 2:4 Linear weights as torch's semi-structured sparse tensors.

Sparse tensor cores (NVIDIA compute capability 8.0+) multiply a matrix with 2 nonzeros in every
4 consecutive elements along the reduction (input) axis at up to twice the dense rate. torch
exposes them through ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, or CUTLASS when
forced), for 2-D fp16/bf16 (and int8) CUDA tensors whose shape is a multiple of the backend's
block. That function refuses CPU tensors; the CUTLASS packing it uses
(``torch.sparse._semi_structured_conversions``: dense -> packed values + metadata -> dense) is
plain torch and runs anywhere, so on CPU every 2:4 fp16/bf16 Linear is packed and unpacked
through it and checked to come back equal (the layout check), and left dense: no speedup.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Final

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._layers import kind_of, layout_of

HALF_DTYPES: Final = (torch.float16, torch.bfloat16)
# the CUTLASS packing used for the CPU layout check: its fp16/bf16 block (rows % 32, columns % 64)
_CUTLASS_ROWS: Final = 32
_CUTLASS_COLS: Final = 64


@dataclass(frozen=True)
class LayerConversion:
    """One Linear-like layer: ``status`` is "converted" (its weight is now semi-structured),
    "valid" (2:4 and the packing round trip checked; left dense, no sparse kernels on this device)
    or "skipped"; ``reason`` says why."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    status: str
    reason: str


class SemiStructuredReport:
    """What :func:`to_semi_structured` did with each Linear-like layer."""

    def __init__(self, layers: list[LayerConversion], backend: str, device_note: str) -> None:
        self.layers = layers
        self.backend = backend
        self.device_note = device_note

    @property
    def converted(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.status == "converted"]

    @property
    def valid(self) -> list[str]:
        """Layers whose weight satisfies 2:4 with a valid packing (converted or not)."""
        return [layer.name for layer in self.layers if layer.status in ("converted", "valid")]

    @property
    def skipped(self) -> dict[str, str]:
        return {layer.name: layer.reason for layer in self.layers if layer.status == "skipped"}

    def to_dict(self) -> dict[str, object]:
        return {
            "backend": self.backend,
            "device_note": self.device_note,
            "layers": [vars(layer) | {"shape": list(layer.shape)} for layer in self.layers],
        }

    def table(self) -> str:
        rows = [(lay.name, lay.kind, "x".join(map(str, lay.shape)), lay.dtype, lay.status, lay.reason)
                for lay in self.layers]
        header = ("layer", "kind", "shape", "dtype", "status", "reason")
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header[:-1])]
        lines = [f"2:4 semi-structured conversion ({self.backend}): {self.device_note}"]
        for row in [header, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1])
        lines.append(f"{len(self.converted)} converted, {len(self.valid) - len(self.converted)} valid but left dense, "
                     f"{len(self.skipped)} skipped")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return f"SemiStructuredReport(converted={len(self.converted)}, valid={len(self.valid)}, layers={len(self.layers)})"


def two_four_violations(matrix: Tensor) -> int:
    """Groups of 4 consecutive elements along the last dim of ``matrix`` with more than 2
    nonzeros (the last dim must be a multiple of 4)."""
    groups = (matrix != 0).reshape(matrix.shape[0], -1, 4).sum(-1)
    return int((groups > 2).sum())


def _backend() -> type:
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    # the class to_sparse_semi_structured picks
    if SparseSemiStructuredTensor._FORCE_CUTLASS:
        return SparseSemiStructuredTensorCUTLASS
    return SparseSemiStructuredTensorCUSPARSELT


def packing_round_trip(weight: Tensor) -> bool:
    """Pack ``weight`` (2-D fp16/bf16, 2:4 along its last dim) into CUTLASS's semi-structured
    layout (kept values + 2-bit indices) and back; True when it comes back equal. Zero rows and
    columns pad it to the packing's block (they are 2:4 and do not change the rest)."""
    from torch.sparse._semi_structured_conversions import (
        sparse_semi_structured_from_dense_cutlass,
        sparse_semi_structured_to_dense_cutlass,
    )

    rows, cols = weight.shape
    padded = F.pad(weight.detach(), (0, -cols % _CUTLASS_COLS, 0, -rows % _CUTLASS_ROWS)).contiguous()
    packed, meta = sparse_semi_structured_from_dense_cutlass(padded)
    if packed.numel() * 2 != padded.numel():  # it keeps exactly half the elements
        return False
    restored = sparse_semi_structured_to_dense_cutlass(packed, meta)[:rows, :cols]
    return bool(torch.equal(restored, weight.detach()))


def _device_supports(device: torch.device, backend: type | None = None) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"weights on {device.type}: no semi-structured sparse kernels there, no speedup (left dense)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return False, f"CUDA compute capability {major}.{minor} < 8.0: no sparse tensor cores (left dense)"
    if major >= 9 and backend is not None and "cutlass" in backend.__name__.lower():
        # torch converts, but its CUTLASS matmul then fails: "Supported only on GPUs with compute
        # capability 8.x" (seen on an H200, torch 2.11; benchmarks/gpu.py)
        return False, (
            f"CUDA compute capability {major}.{minor}: torch's CUTLASS semi-structured kernels run on 8.x only "
            "(SparseSemiStructuredTensor._FORCE_CUTLASS is set; cuSPARSELt, the default, runs here) (left dense)"
        )
    return True, f"CUDA compute capability {major}.{minor}: sparse tensor cores"


def _check(name: str, module: nn.Module, backend: type) -> tuple[LayerConversion, Tensor | None]:
    """The layer's verdict before conversion, and its [out, in] weight when it can be converted."""
    kind = kind_of(module)
    assert kind is not None
    from torch.sparse import SparseSemiStructuredTensor

    weight: Tensor = module.weight
    layout = layout_of(module, "weight")
    # [out, in]: the Linear-equivalent weight (a converted weight has no strided view: not needed)
    matrix = weight if isinstance(weight, SparseSemiStructuredTensor) else layout.matrix(weight.detach())
    base = dict(name=name, kind=kind.name, shape=tuple(weight.shape), dtype=str(weight.dtype).removeprefix("torch."),
                device=str(weight.device))

    def verdict(status: str, reason: str) -> tuple[LayerConversion, Tensor | None]:
        return LayerConversion(**base, status=status, reason=reason), (matrix if status == "valid" else None)

    if isinstance(weight, SparseSemiStructuredTensor):
        return verdict("converted", "already a semi-structured sparse tensor")

    if weight.dtype not in HALF_DTYPES:
        return verdict("skipped", f"dtype {base['dtype']}: semi-structured sparse kernels take float16/bfloat16 "
                                  "(cast the model, e.g. model.half(), first)")
    if matrix.shape[1] % 4:
        return verdict("skipped", f"{matrix.shape[1]} inputs: not a multiple of 4, no 2:4 groups")
    bad = two_four_violations(matrix)
    if bad:
        return verdict("skipped", f"not 2:4 along the input dim: {bad} of {matrix.numel() // 4} groups of 4 "
                                  "have more than 2 nonzeros")
    limits = backend._DTYPE_SHAPE_CONSTRAINTS[weight.dtype]
    rows, cols = matrix.shape
    if rows < limits.sparse_min_rows or rows % limits.sparse_min_rows or cols < limits.sparse_min_cols \
            or cols % limits.sparse_min_cols:
        return verdict("skipped", f"[out, in] = [{rows}, {cols}]: torch's {backend.BACKEND} kernels need multiples of "
                                  f"({limits.sparse_min_rows}, {limits.sparse_min_cols})")
    if not packing_round_trip(matrix):
        return verdict("skipped", "the semi-structured packing did not round-trip")
    if kind.name != "linear":
        return verdict("skipped", f"2:4 and packs, but a {kind.name} layer computes x @ W with W [in, out]; "
                                  "only nn.Linear's F.linear dispatches to semi-structured kernels")
    return verdict("valid", "2:4 along the input dim; packing round trip exact")


@torch.no_grad()
def to_semi_structured(model: nn.Module) -> SemiStructuredReport:
    """Convert every 2:4 fp16/bf16 ``nn.Linear`` weight of ``model`` to torch's semi-structured
    sparse tensor where its device has sparse tensor cores (CUDA, compute capability 8.0+), in
    place; elsewhere check the 2:4 pattern and the packing and leave the weights dense.

    Linear-like layers (``nn.Linear`` and transformers' ``Conv1D``, whose ``[in, out]`` weight is
    judged as its ``[out, in]`` transpose) are all listed in the returned report with their
    verdict and the reason. Converted layers run inference only (the weights no longer train).
    """
    backend = _backend()
    layers: list[LayerConversion] = []
    notes: set[str] = set()
    for name, module in model.named_modules():
        kind = kind_of(module)
        if kind is None or kind.name not in ("linear", "conv1d") or not isinstance(getattr(module, "weight", None), Tensor):
            continue
        verdict, matrix = _check(name, module, backend)
        if matrix is not None:
            supported, note = _device_supports(module.weight.device, backend)
            notes.add(note)
            if supported:
                from torch.sparse import to_sparse_semi_structured

                with warnings.catch_warnings():  # torch's "prototype stage" notice, once per process
                    warnings.filterwarnings("ignore", message=".*prototype.*", category=UserWarning)
                    module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach().contiguous()),
                                                 requires_grad=False)
                verdict = LayerConversion(**{**vars(verdict), "status": "converted",
                                             "reason": f"2:4 along the input dim; {note}"})
            else:
                verdict = LayerConversion(**{**vars(verdict), "reason": f"{verdict.reason}; {note}"})
        layers.append(verdict)
    if not notes:
        notes.add("no layer could be converted")
    return SemiStructuredReport(layers, backend.BACKEND, "; ".join(sorted(notes)))
