"""to_semi_structured: the CPU path validates 2:4 and the packing; the GPU path converts."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sparsity_core import to_semi_structured
from sparsity_core.deploy._semi import packing_round_trip, two_four_violations


def two_four(weight: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``weight`` ([out, in]) with the 2 smallest of every 4 consecutive inputs zeroed."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().float().topk(2, -1).indices, True)
    return (groups * keep).reshape(weight.shape)


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D, matched by class path: weight [in, out], y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


Conv1D.__module__ = "transformers.pytorch_utils"


def model(dtype: torch.dtype = torch.float16) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    net = nn.ModuleDict({
        "sparse": nn.Linear(128, 64),          # 2:4, fp16: valid
        "dense": nn.Linear(128, 64),           # not 2:4
        "small": nn.Linear(12, 8),             # 2:4 but too small for the kernels
        "odd": nn.Linear(10, 32),              # inputs not a multiple of 4
        "gpt2": Conv1D(64, 128),               # [in, out] = [128, 64]; 2:4 along in (dim 0)
        "gpt2_wrong_axis": Conv1D(64, 128),    # 2:4 along dim 1 (its outputs) only
        "emb": nn.Embedding(10, 16),           # not Linear-like: not listed
    }).to(dtype)
    with torch.no_grad():
        net["sparse"].weight.copy_(two_four(torch.randn(64, 128, generator=gen), gen))
        net["small"].weight.copy_(two_four(torch.randn(8, 12, generator=gen), gen))
        net["gpt2"].weight.copy_(two_four(torch.randn(64, 128, generator=gen), gen).t())
        net["gpt2_wrong_axis"].weight.copy_(two_four(torch.randn(128, 64, generator=gen), gen))
    return net


def test_cpu_path_validates_each_linear_and_says_why_not():
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = to_semi_structured(net)

    verdicts = {layer.name: layer for layer in report.layers}
    assert set(verdicts) == {"sparse", "dense", "small", "odd", "gpt2", "gpt2_wrong_axis"}
    assert report.converted == [] and report.valid == ["sparse"]
    assert "no speedup" in verdicts["sparse"].reason and "packing round trip exact" in verdicts["sparse"].reason
    assert "no speedup" in report.device_note
    assert "not 2:4 along the input dim" in verdicts["dense"].reason
    assert "need multiples of" in verdicts["small"].reason
    assert "not a multiple of 4" in verdicts["odd"].reason
    # Conv1D is judged on W.t(): 2:4 along its inputs packs, but only nn.Linear dispatches to the kernels
    assert verdicts["gpt2"].kind == "conv1d" and "2:4 and packs" in verdicts["gpt2"].reason
    assert "not 2:4 along the input dim" in verdicts["gpt2_wrong_axis"].reason
    # nothing changed on CPU
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert "1 valid but left dense" in report.table()
    as_json = json.loads(json.dumps(report.to_dict()))
    assert {layer["name"]: layer["status"] for layer in as_json["layers"]}["sparse"] == "valid"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_weights_are_not_converted(dtype):
    report = to_semi_structured(model(dtype))
    assert report.valid == []
    assert "float16/bfloat16" in {layer.name: layer for layer in report.layers}["sparse"].reason


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packing_round_trip_holds_for_2_4_and_fails_otherwise(dtype):
    gen = torch.Generator().manual_seed(3)
    weight = two_four(torch.randn(40, 72, generator=gen), gen).to(dtype)  # padded to the 32 x 64 blocks
    assert two_four_violations(weight) == 0 and packing_round_trip(weight)
    broken = weight.clone()
    broken[5, 8:12] = 1.0  # one group with 4 nonzeros
    assert two_four_violations(broken) == 1
    assert not packing_round_trip(broken)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_path_converts_and_matches_the_dense_output():
    net = model().cuda()
    x = torch.randn(64, 128, dtype=torch.float16, device="cuda")
    expected = net["sparse"](x)
    major, _ = torch.cuda.get_device_capability()
    report = to_semi_structured(net)
    if major < 8:
        assert report.converted == [] and "compute capability" in report.device_note
        return
    assert report.converted == ["sparse"]
    from torch.sparse import SparseSemiStructuredTensor

    assert isinstance(net["sparse"].weight, SparseSemiStructuredTensor)
    torch.testing.assert_close(net["sparse"](x), expected, rtol=1e-2, atol=1e-2)
    again = to_semi_structured(net)  # a second call leaves converted layers alone
    assert again.converted == ["sparse"] and "already" in again.layers[0].reason


@pytest.mark.parametrize(
    ("capability", "cutlass", "supported"),
    [((8, 0), True, True), ((8, 6), False, True), ((9, 0), False, True), ((9, 0), True, False), ((7, 5), False, False)],
)
def test_the_device_verdict_knows_cutlass_runs_on_8x_only(monkeypatch, capability, cutlass, supported):
    """torch's CUTLASS semi-structured matmul refuses compute capability 9.x (seen on an H200):
    with the CUTLASS backend forced, a Hopper device is told so instead of failing at the first
    forward; cuSPARSELt (the default) runs there."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    from sparsity_core.deploy._semi import _device_supports

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    backend = SparseSemiStructuredTensorCUTLASS if cutlass else SparseSemiStructuredTensorCUSPARSELT
    ok, note = _device_supports(torch.device("cuda"), backend)
    assert ok is supported, note
    if capability == (9, 0) and cutlass:
        assert "8.x only" in note and "cuSPARSELt" in note
