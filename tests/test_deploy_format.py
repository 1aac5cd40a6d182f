"""save_sparse / load_sparse: bit-exact round trips, file sizes, malformed files refused."""

from __future__ import annotations

import json
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sparsity_core import load_sparse, save_sparse
from sparsity_core.deploy import SparseFormatError
from sparsity_core.deploy._format import META_TENSORS, pack

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float64: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT_OF[t.dtype])


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Every bit pattern of the dtype is possible: NaNs with payloads, infinities, subnormals, -0.0."""
    itype = INT_OF[dtype]
    info = torch.iinfo(itype)
    return torch.randint(info.min, info.max, shape, dtype=itype, generator=gen).view(dtype)


def pruned(t: torch.Tensor, pattern: str, gen: torch.Generator) -> torch.Tensor:
    """``t`` with pruned positions zeroed by multiplication (so negatives become -0.0, as masking does)."""
    if pattern == "2:4":
        scores = torch.rand(t.shape[0], t.shape[1] // 4, 4, generator=gen)
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(2, -1).indices, True)
        keep = keep.reshape(t.shape)
    else:
        keep = torch.rand(t.shape, generator=gen) >= float(pattern)
    # what masking by multiplication leaves (w * 0 = -0.0 for negative w), without NaN * 0 = NaN
    zeros = torch.where(torch.signbit(t), -0.0, 0.0).to(t.dtype)
    out = torch.where(keep, t, zeros)
    return out


def canonical_zeros(t: torch.Tensor) -> torch.Tensor:
    """The documented round trip: -0.0 comes back as +0.0, everything else as it was."""
    out = t.clone()
    out[out == 0] = 0
    return out


@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("pattern", ["0.5", "0.9", "2:4"])
def test_round_trip_is_bit_exact_for_every_float_dtype_and_pattern(tmp_path, dtype, pattern):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{pattern}".encode()))
    weight = pruned(random_bits((64, 96), dtype, gen), pattern, gen)
    conv = pruned(random_bits((8, 6, 3, 4), dtype, gen).reshape(48, 12), pattern, gen).reshape(8, 6, 3, 4)
    vector = pruned(random_bits((1, 200), dtype, gen), pattern, gen).reshape(200)
    state = {"fc.weight": weight, "conv.weight": conv, "scale": vector, "fc.bias": random_bits((64,), dtype, gen),
             "steps": torch.tensor(3)}
    assert bool((bits(weight) == bits(torch.tensor(-0.0, dtype=dtype))).any())  # -0.0 present

    saved = save_sparse(state, tmp_path / "m.safetensors")
    loaded = load_sparse(tmp_path / "m.safetensors")

    assert list(loaded) == list(state)  # the saved order
    # the payload is exactly values + 1 bit per element (rows padded to bytes) + row offsets + shape
    expected_payload = 0
    for name, t in state.items():
        if saved.storage[name] == "sparse-bitmask":
            rows, cols = t.numel() // t.shape[-1], t.shape[-1]
            expected_payload += int((t != 0).sum()) * t.element_size() + rows * -(-cols // 8) + rows * 8 + t.dim() * 8
        else:
            expected_payload += t.numel() * t.element_size()
    (header,) = struct.unpack("<Q", (tmp_path / "m.safetensors").read_bytes()[:8])
    assert saved.file_bytes - 8 - header == expected_payload
    assert saved.storage["fc.weight"] == "sparse-bitmask" and saved.storage["fc.bias"] == "dense"
    for name, t in state.items():
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape, name
        expected = canonical_zeros(t) if saved.storage[name] == "sparse-bitmask" else t
        if t.is_floating_point():
            assert torch.equal(bits(loaded[name]), bits(expected)), name
        else:
            assert torch.equal(loaded[name], expected)


def test_negative_zero_is_a_zero_and_comes_back_as_positive_zero(tmp_path):
    w = torch.tensor([[1.5, -0.0, 0.0, -2.0] * 16] * 8)
    saved = save_sparse({"w.weight": w}, tmp_path / "z.safetensors")
    assert saved.storage["w.weight"] == "sparse-bitmask"
    raw = load_file(tmp_path / "z.safetensors")
    assert raw["w.compressed"].numel() == w.count_nonzero() == 8 * 32  # -0.0 not stored
    back = load_sparse(tmp_path / "z.safetensors")["w.weight"]
    assert torch.equal(back, w) and not torch.signbit(back[:, 1]).any()
    # a tensor kept dense keeps its -0.0 bit for bit
    dense = torch.tensor([-0.0, 1.0, 2.0, 3.0])
    save_sparse({"d": dense}, tmp_path / "d.safetensors")
    assert torch.signbit(load_sparse(tmp_path / "d.safetensors")["d"][0])


@pytest.mark.parametrize(
    "dtype,pattern,bound",
    [
        (torch.float32, "0.9", 0.14),  # the bound: 0.1 + 1/32 + row offsets and header
        (torch.bfloat16, "0.9", 0.175),  # 0.1 + 1/16 + ...
        (torch.float32, "2:4", 0.54),
        (torch.bfloat16, "2:4", 0.57),
        (torch.float32, "0.5", 0.54),
    ],
)
def test_file_size_is_within_the_bound(tmp_path, dtype, pattern, bound):
    gen = torch.Generator().manual_seed(0)
    state = {f"h.{i}.weight": pruned(torch.randn(512, 1024, generator=gen), pattern, gen).to(dtype) for i in range(2)}
    save_file(state, tmp_path / "dense.safetensors")
    saved = save_sparse(state, tmp_path / "sparse.safetensors")
    ratio = saved.file_bytes / (tmp_path / "dense.safetensors").stat().st_size
    assert ratio <= bound, ratio
    kept = 0.5 if pattern == "2:4" else 1 - float(pattern)
    assert ratio > kept * 0.95 + 1 / torch.finfo(dtype).bits  # nothing was lost to make it small


def test_each_tensor_takes_the_smaller_storage(tmp_path):
    gen = torch.Generator().manual_seed(1)
    dense = torch.randn(64, 64, generator=gen)
    half = dense * (torch.rand(64, 64, generator=gen) >= 0.5)
    saved = save_sparse({"a.weight": dense, "b.weight": half, "c.weight": torch.zeros(64, 64)}, tmp_path / "x.st")
    assert saved.storage == {"a.weight": "dense", "b.weight": "sparse-bitmask", "c.weight": "sparse-bitmask"}
    assert torch.equal(load_sparse(tmp_path / "x.st")["c.weight"], torch.zeros(64, 64))


def test_a_module_loads_back_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.mul_(torch.rand_like(m.weight) >= 0.8)
    save_sparse(model, tmp_path / "m.safetensors")
    clone = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    clone.load_state_dict(load_sparse(tmp_path / "m.safetensors"))
    x = torch.randn(5, 32)
    assert torch.equal(clone(x), model(x))


def test_tied_and_non_contiguous_tensors_are_saved(tmp_path):
    shared = torch.randn(16, 8)
    state = {"enc.weight": shared, "dec.weight": shared, "t.weight": torch.randn(8, 16).t()}
    save_sparse(state, tmp_path / "t.safetensors")
    back = load_sparse(tmp_path / "t.safetensors")
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_a_generated_key_never_shadows_a_real_name(tmp_path):
    sparse = torch.zeros(32, 32)
    sparse[0, 0] = 1.0
    state = {"a.weight": sparse, "a.bitmask": torch.ones(3)}  # 'a.bitmask' is a real tensor here
    saved = save_sparse(state, tmp_path / "c.safetensors")
    assert saved.storage["a.weight"] == "dense"
    back = load_sparse(tmp_path / "c.safetensors")
    assert torch.equal(back["a.weight"], sparse) and torch.equal(back["a.bitmask"], torch.ones(3))


def test_save_refuses_non_tensor_entries(tmp_path):
    with pytest.raises(TypeError, match="'epoch'.*int"):
        save_sparse({"w": torch.ones(2), "epoch": 3}, tmp_path / "x.safetensors")


# -- malformed files ------------------------------------------------------------------------------
def sparse_file(tmp_path) -> tuple:
    w = torch.zeros(16, 32)
    w[::3, ::5] = torch.arange(1.0, 1.0 + w[::3, ::5].numel()).reshape(w[::3, ::5].shape)
    path = tmp_path / "ok.safetensors"
    save_sparse({"fc.weight": w, "fc.bias": torch.ones(16)}, path)
    raw = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return path, raw, meta


def rewrite(tmp_path, raw, meta, **changes) -> str:
    tensors = {**raw, **{k.replace("__", "."): v for k, v in changes.items() if v is not None}}
    for k, v in changes.items():
        if v is None:
            tensors.pop(k.replace("__", "."))
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path, metadata=meta)
    return str(path)


def test_truncated_file_is_refused(tmp_path):
    path, _, _ = sparse_file(tmp_path)
    data = path.read_bytes()
    for cut in (4, len(data) // 2, len(data) - 3):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(SparseFormatError, match="not a readable safetensors file"):
            load_sparse(bad)


def test_bitmask_and_value_count_mismatch_is_refused(tmp_path):
    path, raw, meta = sparse_file(tmp_path)
    fewer = raw["fc.compressed"][:-1].clone()
    with pytest.raises(SparseFormatError, match=r"'fc.weight'.*set bits but 'compressed' holds"):
        load_sparse(rewrite(tmp_path, raw, meta, fc__compressed=fewer))
    flipped = raw["fc.bitmask"].clone()
    flipped[1, 1] ^= 1
    with pytest.raises(SparseFormatError, match="set bits"):
        load_sparse(rewrite(tmp_path, raw, meta, fc__bitmask=flipped))


def test_wrong_shapes_are_refused(tmp_path):
    path, raw, meta = sparse_file(tmp_path)
    with pytest.raises(SparseFormatError, match=r"'fc.weight'.*'shape' is \[16, 31\]"):
        load_sparse(rewrite(tmp_path, raw, meta, fc__shape=torch.tensor([16, 31])))
    with pytest.raises(SparseFormatError, match=r"'bitmask' must be uint8 of shape \[16, 4\]"):
        load_sparse(rewrite(tmp_path, raw, meta, fc__bitmask=raw["fc.bitmask"][:8].clone()))
    with pytest.raises(SparseFormatError, match="'compressed' must be a 1-D float32"):
        load_sparse(rewrite(tmp_path, raw, meta, fc__compressed=raw["fc.compressed"].double()))
    with pytest.raises(SparseFormatError, match="row_offsets"):
        load_sparse(rewrite(tmp_path, raw, meta, fc__row_offsets=raw["fc.row_offsets"].flip(0).clone()))
    # padding bits: a 30-wide row leaves 2 unused bits in its last byte
    shape_30 = torch.zeros(4, 30)
    shape_30[0, 0] = 1.0
    save_sparse({"p.weight": shape_30}, tmp_path / "p.safetensors")
    raw30 = load_file(tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        meta30 = f.metadata()
    bitmask = raw30["p.bitmask"].clone()
    bitmask[0, -1] |= 0x80  # bit 31 of a 30-wide row: padding
    with pytest.raises(SparseFormatError, match="padding must be zero"):
        load_sparse(rewrite(tmp_path, raw30, meta30, p__bitmask=bitmask))


def test_missing_or_unexpected_keys_are_refused(tmp_path):
    path, raw, meta = sparse_file(tmp_path)
    with pytest.raises(SparseFormatError, match=r"'fc.weight': missing \['fc.row_offsets'\]"):
        load_sparse(rewrite(tmp_path, raw, meta, fc__row_offsets=None))
    with pytest.raises(SparseFormatError, match=r"keys not described by the metadata: \['extra'\]"):
        load_sparse(rewrite(tmp_path, raw, meta, extra=torch.ones(1)))
    with pytest.raises(SparseFormatError, match="'fc.bias': listed as dense but absent"):
        load_sparse(rewrite(tmp_path, raw, meta, fc__bias=None))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update({META_TENSORS: "[{not json"}), "is not JSON"),
        (lambda m: m.update({"sparsity_core.version": "99"}), "this version reads '1'"),
        (lambda m: m.update({"sparsity_core.layout": "csr"}), "expected 'sparse-bitmask'"),
        (lambda m: m.update({META_TENSORS: json.dumps([{"name": "fc.weight", "storage": "sparse-bitmask",
                                                          "prefix": "fc", "shape": [16, 32], "dtype": "int8"}])}),
         "dtype 'int8' is not one of"),
        (lambda m: m.update({META_TENSORS: json.dumps([{"name": "fc.weight", "storage": "sparse-bitmask",
                                                          "prefix": "fc", "shape": [32, 16], "dtype": "float32"},
                                                         {"name": "fc.bias", "storage": "dense"}])}),
         r"'fc.weight'.*the metadata says \[32, 16\]"),
        (lambda m: m.update({META_TENSORS: json.dumps([{"name": "fc.weight", "storage": "zip"}])}), "unknown storage 'zip'"),
    ],
)
def test_wrong_metadata_is_refused(tmp_path, edit, message):
    path, raw, meta = sparse_file(tmp_path)
    edit(meta)
    with pytest.raises(SparseFormatError, match=message):
        load_sparse(rewrite(tmp_path, raw, meta))


def test_loading_never_unpickles(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled')",))

    import pickle

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"w": Boom()}))
    with pytest.raises(SparseFormatError, match="not a readable safetensors file"):
        load_sparse(path)
    torch.save({"w": torch.ones(2)}, tmp_path / "torch.pt")
    with pytest.raises(SparseFormatError):
        load_sparse(tmp_path / "torch.pt")


def test_a_safetensors_header_claiming_more_than_the_file_is_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    path = tmp_path / "lie.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(SparseFormatError, match="lie.safetensors: not a readable safetensors file"):
        load_sparse(path)


def test_compressed_tensors_groups_without_our_metadata_are_decompressed(tmp_path):
    """A file written by compressed-tensors' own bitmask compressor (same four keys, no metadata)."""
    w = torch.randn(8, 20)
    w[w.abs() < 1] = 0
    parts = pack(w)
    save_file({**{f"layer.{s}": t for s, t in parts.items()}, "layer.bias": torch.ones(8)}, tmp_path / "ct.safetensors")
    back = load_sparse(tmp_path / "ct.safetensors")
    assert set(back) == {"layer.weight", "layer.bias"} and torch.equal(back["layer.weight"], w)


@pytest.mark.slow  # importing compressed-tensors imports transformers: tens of seconds
def test_files_load_with_the_compressed_tensors_library(tmp_path):
    """compressed-tensors' BitmaskCompressor (in versions <= 0.14.0.1; later ones dropped it)
    reads our files back. Optional: skipped when the library (or that compressor) is missing."""
    with warnings.catch_warnings():  # its imports (transformers, torch.jit) warn about deprecations
        warnings.simplefilter("ignore")
        ct = pytest.importorskip("compressed_tensors")
        compressors = pytest.importorskip("compressed_tensors.compressors")
        config = pytest.importorskip("compressed_tensors.config")
    if not hasattr(compressors, "BitmaskCompressor"):
        pytest.skip(f"compressed-tensors {ct.__version__} has no sparse-bitmask reader (removed after 0.14)")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16)).to(torch.bfloat16)
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.mul_(torch.rand_like(m.weight, dtype=torch.float32) >= 0.7)
    saved = save_sparse(model, tmp_path / "model.safetensors")
    assert saved.compressed == ["0.weight", "2.weight"]
    compressor = compressors.BitmaskCompressor(config=config.BitmaskConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dict(compressor.decompress(str(tmp_path / "model.safetensors")))
    ours = model.state_dict()
    assert sorted(theirs) == sorted(ours)
    for name, t in ours.items():
        assert torch.equal(theirs[name].view(torch.int16), canonical_zeros(t).view(torch.int16)), name


def test_numpy_bit_order_is_compressed_tensors(tmp_path):
    """Bit i of a row is element i, least significant bit first (numpy.packbits bitorder='little')."""
    w = torch.zeros(1, 16)
    w[0, [0, 9]] = 1.0
    assert pack(w)["bitmask"].tolist() == [[1, 2]]
    assert np.unpackbits(pack(w)["bitmask"].numpy(), bitorder="little").nonzero()[0].tolist() == [0, 9]


def test_a_tied_tensor_is_written_once_and_loads_under_every_name(tmp_path):
    import torch
    from torch import nn

    from sparsity_core import load_sparse, save_sparse, sparsify

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(256, 64)
            self.body = nn.Linear(64, 64)
            self.head = nn.Linear(64, 256, bias=False)
            self.head.weight = self.emb.weight  # GPT-2's lm_head = wte

    torch.manual_seed(0)
    model = Tied()
    sparsify(model, "magnitude", {"sparsity_level": 0.9, "include": ["emb.weight", "body.weight"]})
    saved = save_sparse(model, tmp_path / "tied.safetensors")
    assert saved.storage["head.weight"] == "alias"
    # the dense reference holds the tied tensor once, like a safetensors file of the model would
    assert saved.dense_bytes == sum(t.numel() * t.element_size() for t in model.parameters())
    assert saved.file_bytes < 0.2 * saved.dense_bytes
    loaded = load_sparse(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["head.weight"], model.head.weight) and loaded["head.weight"] is loaded["emb.weight"]
    fresh = Tied()
    fresh.load_state_dict(loaded)
    assert fresh.head.weight is fresh.emb.weight and torch.equal(fresh.emb.weight, model.emb.weight)
