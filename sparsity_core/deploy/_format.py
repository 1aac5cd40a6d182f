"""Compressed sparse checkpoints: ``save_sparse`` and ``load_sparse``.

A file is a plain safetensors file. Each tensor that is smaller so (a floating tensor with enough
zeros) is stored in the "sparse-bitmask" layout of compressed-tensors (llm-compressor's format):
for a tensor named ``<prefix>.weight`` (any other name: ``<prefix>`` = the name itself)

    <prefix>.shape        int64 [ndim]            the dense shape
    <prefix>.compressed   dtype [nnz]             the nonzero values, row-major order
    <prefix>.bitmask      uint8 [*shape[:-1], ceil(shape[-1] / 8)]
                                                  1 bit per element (1 = stored), numpy.packbits
                                                  along the last dim, little bit order
    <prefix>.row_offsets  int64 [prod(shape[:-1])] where each row starts in ``compressed``

and every other tensor is stored dense under its own name. The file's ``__metadata__`` records,
under ``sparsity_core.*``, every tensor's name in the original order with its storage, shape and
dtype, so that loading is exact and every key of the file is accounted for.

Zeros: an element is stored when it is not equal to zero, so -0.0 counts as a zero (masking a
negative weight by multiplication leaves -0.0: half the zeros of a pruned network) and comes
back as +0.0. Every other bit pattern (NaNs with their payloads, infinities, subnormals) comes
back bit for bit. A tensor stored dense comes back bit for bit, -0.0 included.

Loading reads safetensors only (no pickle), checks every compressed tensor (shape, dtypes, bitmask
size, set bits against the number of values, padding bits, row offsets) and refuses a file that
does not add up with a :class:`SparseFormatError` naming the file, the tensor and the problem.
A safetensors file without our metadata loads too: its compressed-tensors groups (the four keys
above) are decompressed to ``<prefix>.weight``, as compressed-tensors names them, and the rest
is returned as it is.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor, nn

LAYOUT: Final = "sparse-bitmask"
VERSION: Final = "1"
#: safetensors metadata keys (the values are strings, as safetensors requires)
META_LAYOUT: Final = "sparsity_core.layout"
META_VERSION: Final = "sparsity_core.version"
META_TENSORS: Final = "sparsity_core.tensors"

SUFFIXES: Final = ("shape", "compressed", "bitmask", "row_offsets")
DTYPES: Final[dict[str, torch.dtype]] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_DTYPE_NAMES: Final = {v: k for k, v in DTYPES.items()}
# about what one more entry costs in the safetensors JSON header; counts when choosing the storage
_HEADER_BYTES_PER_KEY: Final = 96


class SparseFormatError(ValueError):
    """A compressed sparse file that cannot be loaded: names the file, the tensor and the problem."""

    def __init__(self, message: str, *, path: str | os.PathLike[str], tensor: str | None = None) -> None:
        where = f"{os.fspath(path)}" + (f": tensor {tensor!r}" if tensor is not None else "")
        super().__init__(f"{where}: {message}")
        self.path = os.fspath(path)
        self.tensor = tensor


@dataclass(frozen=True)
class SavedFile:
    """What :func:`save_sparse` wrote: each tensor's storage (``"sparse-bitmask"`` or ``"dense"``),
    the bytes the tensors take dense (the payload of a dense safetensors file) and the file's size."""

    path: Path
    storage: dict[str, str] = field(repr=False)
    dense_bytes: int
    file_bytes: int

    @property
    def ratio(self) -> float:
        return self.file_bytes / self.dense_bytes if self.dense_bytes else 1.0

    @property
    def compressed(self) -> list[str]:
        return [n for n, s in self.storage.items() if s == LAYOUT]


def prefix_of(name: str) -> str:
    """compressed-tensors' convention: ``a.b.weight`` is stored as ``a.b.compressed`` etc."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _count_nonzero(t: Tensor) -> int:
    return int(torch.count_nonzero(t))


def _compressed_bytes(t: Tensor, nnz: int) -> int:
    rows = t.numel() // t.shape[-1]
    return (
        nnz * t.element_size()
        + rows * math.ceil(t.shape[-1] / 8)
        + rows * 8
        + t.dim() * 8
        + 3 * _HEADER_BYTES_PER_KEY
    )


def _should_compress(t: Tensor) -> bool:
    if t.dtype not in _DTYPE_NAMES or t.dim() == 0 or t.numel() == 0:
        return False
    return _compressed_bytes(t, _count_nonzero(t)) < t.numel() * t.element_size()


def pack(t: Tensor) -> dict[str, Tensor]:
    """The four tensors of the sparse-bitmask layout for ``t`` (on CPU), keyed by suffix."""
    t = t.detach().cpu().contiguous()
    keep = t != 0  # -0.0 == 0: stored as a zero (see the module docstring)
    rows = keep.reshape(-1, t.shape[-1])
    counts = rows.sum(-1, dtype=torch.int64)
    return {
        "shape": torch.tensor(list(t.shape), dtype=torch.int64),
        "compressed": t[keep],
        "bitmask": torch.from_numpy(np.packbits(keep.numpy(), axis=-1, bitorder="little")),
        "row_offsets": torch.cumsum(counts, 0) - counts,
    }


def _state_dict(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    if not isinstance(model_or_state_dict, Mapping):
        raise TypeError(
            f"save_sparse takes an nn.Module or a state dict (a mapping of names to tensors), "
            f"not {type(model_or_state_dict).__name__}"
        )
    for name, value in model_or_state_dict.items():
        if not isinstance(name, str) or not isinstance(value, Tensor):
            raise TypeError(
                f"save_sparse: entry {name!r} of the state dict is a {type(value).__name__}; "
                "only str -> Tensor entries can be saved (no pickled objects)"
            )
    return model_or_state_dict


def save_sparse(model_or_state_dict: nn.Module | Mapping[str, Tensor], path: str | os.PathLike[str]) -> SavedFile:
    """Write the tensors of a module (its ``state_dict()``) or of a state dict to ``path`` as a
    safetensors file, each tensor in the sparse-bitmask layout where that is smaller, else dense.

    Returns a :class:`SavedFile` with each tensor's storage and the dense vs written sizes.
    """
    from safetensors.torch import save_file

    tensors = _state_dict(model_or_state_dict)
    names = set(tensors)
    out: dict[str, Tensor] = {}
    entries: list[dict[str, Any]] = []
    storage: dict[str, str] = {}
    seen_storage: set[int] = set()
    first_of: dict[tuple[Any, ...], str] = {}
    for name, t in tensors.items():
        # a tied tensor (GPT-2's lm_head.weight is transformer.wte.weight) is written once; its
        # other names are aliases in the metadata and load back as that one tensor
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype) if t.numel() else None
        if key is not None and key in first_of:
            entries.append({"name": name, "storage": "alias", "of": first_of[key]})
            storage[name] = "alias"
            continue
        if key is not None:
            first_of[key] = name
        keys = [f"{prefix_of(name)}.{s}" for s in SUFFIXES]
        # a generated key may not shadow a real name or another tensor's key: store that one dense
        if _should_compress(t) and not any(k in names or k in out for k in keys):
            packed = pack(t)
            out.update({k: packed[s] for k, s in zip(keys, SUFFIXES)})
            entries.append(
                {"name": name, "storage": LAYOUT, "prefix": prefix_of(name), "shape": list(t.shape),
                 "dtype": _DTYPE_NAMES[t.dtype]}
            )
            storage[name] = LAYOUT
            continue
        dense = t.detach().cpu()
        ptr = dense.untyped_storage().data_ptr()
        # safetensors refuses views and tensors that share memory (tied weights): write copies
        if (not dense.is_contiguous() or ptr in seen_storage
                or dense.untyped_storage().nbytes() != dense.numel() * dense.element_size()):
            dense = dense.contiguous().clone()
        seen_storage.add(ptr)
        out[name] = dense
        entries.append({"name": name, "storage": "dense"})
        storage[name] = "dense"
    metadata = {
        "format": "pt",
        META_LAYOUT: LAYOUT,
        META_VERSION: VERSION,
        META_TENSORS: json.dumps(entries, separators=(",", ":")),
    }
    path = Path(path)
    save_file(out, os.fspath(path), metadata=metadata)
    # what a dense file holds: each tensor once (tied names share one tensor, as in safetensors' own files)
    dense_bytes = sum(t.numel() * t.element_size() for n, t in tensors.items() if storage[n] != "alias")
    return SavedFile(path, storage, dense_bytes, path.stat().st_size)


# -- loading ------------------------------------------------------------------------------------
class _Reader:
    """One open safetensors file; every problem is raised as a SparseFormatError naming it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise SparseFormatError("no such file", path=self.path)
        try:
            self._file = safe_open(os.fspath(self.path), framework="pt", device="cpu")
        except Exception as exc:  # safetensors' own error type is not importable in every version
            raise SparseFormatError(
                f"not a readable safetensors file (truncated or not safetensors): {exc}", path=self.path
            ) from exc
        self.keys = list(self._file.keys())
        self.metadata: dict[str, str] = self._file.metadata() or {}

    def get(self, key: str, tensor: str) -> Tensor:
        try:
            return self._file.get_tensor(key)
        except Exception as exc:
            raise SparseFormatError(f"cannot read {key!r}: {exc}", path=self.path, tensor=tensor) from exc

    def fail(self, message: str, tensor: str | None = None) -> SparseFormatError:
        return SparseFormatError(message, path=self.path, tensor=tensor)


def unpack(parts: Mapping[str, Tensor], shape: list[int], dtype: torch.dtype, fail: Any) -> Tensor:
    """The dense tensor from the four parts of the sparse-bitmask layout, every part checked;
    ``fail(message)`` makes the exception to raise."""
    dims, values, bitmask, offsets = (parts[s] for s in SUFFIXES)
    if dims.dtype != torch.int64 or dims.dim() != 1 or dims.tolist() != list(shape):
        raise fail(f"'shape' is {dims.tolist()} ({dims.dtype}), the metadata says {list(shape)}")
    if not shape or any(d < 0 for d in shape):
        raise fail(f"'shape' {list(shape)} is not a non-empty list of sizes")
    if values.dtype != dtype or values.dim() != 1:
        raise fail(
            f"'compressed' must be a 1-D {_DTYPE_NAMES.get(dtype, dtype)} tensor, "
            f"got {values.dtype} with shape {list(values.shape)}"
        )
    width = math.ceil(shape[-1] / 8)
    if bitmask.dtype != torch.uint8 or list(bitmask.shape) != [*shape[:-1], width]:
        raise fail(
            f"'bitmask' must be uint8 of shape {[*shape[:-1], width]} (1 bit per element of {shape}), "
            f"got {bitmask.dtype} of shape {list(bitmask.shape)}"
        )
    bits = np.unpackbits(bitmask.numpy(), axis=-1, bitorder="little")
    keep = bits[..., : shape[-1]]
    if bits[..., shape[-1] :].any():
        raise fail("'bitmask' has bits set past the end of its rows (padding must be zero)")
    set_bits = int(np.count_nonzero(keep))
    if set_bits != values.numel():
        raise fail(f"the bitmask has {set_bits} set bits but 'compressed' holds {values.numel()} values")
    counts = torch.from_numpy(keep.reshape(-1, shape[-1]).sum(-1, dtype=np.int64))
    expected = torch.cumsum(counts, 0) - counts
    if offsets.dtype != torch.int64 or list(offsets.shape) != list(expected.shape) or not torch.equal(offsets, expected):
        raise fail(f"'row_offsets' ({offsets.dtype}, shape {list(offsets.shape)}) disagree with the bitmask's row counts")
    dense = torch.zeros(shape, dtype=dtype)
    dense[torch.from_numpy(keep.astype(bool))] = values
    return dense


def _entries(reader: _Reader) -> list[dict[str, Any]]:
    meta = reader.metadata
    if meta.get(META_LAYOUT) != LAYOUT:
        raise reader.fail(f"metadata {META_LAYOUT!r} is {meta.get(META_LAYOUT)!r}, expected {LAYOUT!r}")
    if meta.get(META_VERSION) != VERSION:
        raise reader.fail(f"metadata {META_VERSION!r} is {meta.get(META_VERSION)!r}; this version reads {VERSION!r}")
    try:
        entries = json.loads(meta.get(META_TENSORS, ""))
    except json.JSONDecodeError as exc:
        raise reader.fail(f"metadata {META_TENSORS!r} is not JSON: {exc}") from exc
    if not isinstance(entries, list):
        raise reader.fail(f"metadata {META_TENSORS!r} must be a list of tensor entries")
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise reader.fail(f"metadata {META_TENSORS!r} has an entry without a name: {entry!r}")
        if entry.get("storage") == "dense":
            continue
        if entry.get("storage") == "alias":
            if not isinstance(entry.get("of"), str):
                raise reader.fail(f"alias entry without the name it stands for: {entry!r}", name)
            continue
        if entry.get("storage") != LAYOUT:
            raise reader.fail(f"unknown storage {entry.get('storage')!r} (expected 'dense', 'alias' or {LAYOUT!r})", name)
        shape = entry.get("shape")
        if (not isinstance(shape, list) or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise reader.fail(f"metadata shape {shape!r} is not a non-empty list of sizes", name)
        if entry.get("dtype") not in DTYPES:
            raise reader.fail(f"metadata dtype {entry.get('dtype')!r} is not one of {sorted(DTYPES)}", name)
        if entry.get("prefix") != prefix_of(name):
            raise reader.fail(f"metadata prefix {entry.get('prefix')!r} should be {prefix_of(name)!r}", name)
    return entries


def _foreign_groups(keys: list[str]) -> dict[str, str]:
    """compressed-tensors groups in a file without our metadata: ``<prefix>.weight`` -> prefix."""
    present = set(keys)
    groups = {}
    for key in keys:
        if key.endswith(".compressed"):
            prefix = key[: -len(".compressed")]
            if all(f"{prefix}.{s}" in present for s in SUFFIXES):
                groups[f"{prefix}.weight"] = prefix
    return groups


def load_sparse(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state dict saved by :func:`save_sparse` (dense tensors, on CPU, in the saved order).

    ``model.load_state_dict(load_sparse(path))`` restores a module. Reads safetensors only, never
    pickle; a malformed file raises :class:`SparseFormatError`.
    """
    reader = _Reader(path)
    result: dict[str, Tensor] = {}
    if META_TENSORS not in reader.metadata and META_LAYOUT not in reader.metadata:
        groups = _foreign_groups(reader.keys)
        grouped = {f"{p}.{s}" for p in groups.values() for s in SUFFIXES}
        for key in reader.keys:
            if key not in grouped:
                result[key] = reader.get(key, key)
        for name, prefix in groups.items():
            parts = {s: reader.get(f"{prefix}.{s}", name) for s in SUFFIXES}
            if parts["compressed"].dtype not in _DTYPE_NAMES:
                raise reader.fail(f"values of dtype {parts['compressed'].dtype} are not supported", name)
            result[name] = unpack(
                parts, parts["shape"].tolist(), parts["compressed"].dtype, lambda m, n=name: reader.fail(m, n)
            )
        return result

    entries = _entries(reader)
    expected: set[str] = set()
    for entry in entries:
        name = entry["name"]
        if name in result:
            raise reader.fail("listed twice in the metadata", name)
        if entry["storage"] == "alias":
            if entry["of"] not in result:
                raise reader.fail(f"an alias of {entry['of']!r}, which is not listed before it", name)
            result[name] = result[entry["of"]]
            continue
        if entry["storage"] == "dense":
            if name not in reader.keys:
                raise reader.fail("listed as dense but absent from the file", name)
            expected.add(name)
            result[name] = reader.get(name, name)
            continue
        keys = {s: f"{entry['prefix']}.{s}" for s in SUFFIXES}
        missing = [k for k in keys.values() if k not in reader.keys]
        if missing:
            raise reader.fail(f"missing {missing} in the file", name)
        if expected & set(keys.values()):
            raise reader.fail(f"its keys {sorted(expected & set(keys.values()))} are claimed twice", name)
        expected.update(keys.values())
        parts = {s: reader.get(k, name) for s, k in keys.items()}
        result[name] = unpack(parts, entry["shape"], DTYPES[entry["dtype"]], lambda m, n=name: reader.fail(m, n))
    unexpected = sorted(set(reader.keys) - expected)
    if unexpected:
        raise reader.fail(f"keys not described by the metadata: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return result


def storage_of(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """Each tensor's storage in a file of ours (``None`` for another safetensors file)."""
    reader = _Reader(path)
    if META_TENSORS not in reader.metadata:
        return None
    return {e["name"]: e["storage"] for e in _entries(reader)}
