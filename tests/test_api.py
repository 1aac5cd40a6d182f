"""The functional API: sparsify, its report, default coverage, listing and creation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsity_core as sc


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)


def test_sparsify_covers_linear_and_conv_weights_by_default():
    # contract v2: the matmul/conv weights; an embedding (a lookup) is left dense unless included
    torch.manual_seed(0)
    net = Net()
    dense = {n: p.detach().clone() for n, p in net.named_parameters() if not n.endswith("weight") or n.startswith(("norm", "embed"))}
    report = sc.sparsify(net, "magnitude", {"sparsity_level": 0.75})
    assert list(report) == ["conv.weight", "head.weight"]
    for name in report:
        assert report[name] == pytest.approx(0.75, abs=1 / dict(net.named_parameters())[name].numel())
    for name, before in dense.items():  # biases, norms and the embedding untouched
        assert torch.equal(dict(net.named_parameters())[name], before)
    assert report.overall == pytest.approx(0.75, abs=0.01)


def test_include_exclude_select_by_glob():
    net = Net()
    report = sc.sparsify(net, "magnitude", {"include": ["*.weight", "*.bias"], "exclude": ["norm.*", "embed.*"]})
    assert list(report) == ["conv.weight", "conv.bias", "head.weight", "head.bias"]


def test_a_selection_that_matches_nothing_names_the_patterns():
    with pytest.raises(ValueError, match=r"covers no tensor: include=\['decoder\.\*'\]"):
        sc.sparsify(Net(), "magnitude", {"include": ["decoder.*"]})


def test_sparsify_a_mapping_of_named_tensors():
    data = {"a": torch.randn(10, 10), "b": torch.randn(40)}
    report = sc.sparsify(data, "magnitude", {"sparsity_level": 0.5})
    assert report["a"] == 0.5 and report["b"] == 0.5
    assert int((data["a"] == 0).sum()) == 50


def test_report_prints_a_table_and_a_dict():
    report = sc.sparsify(nn.Linear(10, 10), "magnitude", {"sparsity_level": 0.3})
    text = str(report)
    assert "weight" in text and "30.00%" in text and "overall" in text
    as_dict = report.to_dict()
    assert as_dict["overall"] == pytest.approx(0.3)
    assert as_dict["layers"][0] == {"name": "weight", "aliases": [], "shape": [10, 10], "numel": 100, "zeros": 30, "sparsity": 0.3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.bool])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "large"])
def test_the_report_counts_zeros_as_torch_does(dtype, layout):
    """The report's count (through the weights' bits on CPU: -0.0 is a zero, NaN is not) equals
    torch.count_nonzero in every dtype and layout, bf16 included."""
    from sparsity_core._report import _count_nonzero

    g = torch.Generator().manual_seed(1)
    n = 700_001 if layout == "large" else 1000  # more than one piece of the counting loop
    t = torch.randn(n, generator=g)
    t[torch.rand(n, generator=g) < 0.3] = 0.0
    t[torch.rand(n, generator=g) < 0.1] = -0.0
    t[:3] = torch.tensor([float("nan"), float("inf"), 1e-30])  # 1e-30: a denormal or zero in 16 bits
    t = t.to(dtype)
    if layout == "strided":
        t = t.view(-1, 10)[:, ::2]
    assert _count_nonzero(t) == int(torch.count_nonzero(t))


def test_bad_target_is_named():
    with pytest.raises(TypeError, match="nn.Module or a mapping"):
        sc.sparsify([torch.ones(3)], "magnitude")


def test_listing_is_sorted():
    assert sc.list_sparsifiers() == sorted(sc.list_sparsifiers())
    assert "magnitude" in sc.list_sparsifiers()
    assert sc.list_schedulers() == sorted(sc.list_schedulers())


def test_create_accepts_a_configured_instance_but_not_instance_and_args():
    sparsifier = sc.create_sparsifier("magnitude", {"sparsity_level": 0.2})
    assert sc.create_sparsifier(sparsifier) is sparsifier
    with pytest.raises(TypeError, match="not both"):
        sc.create_sparsifier(sparsifier, {"sparsity_level": 0.3})
    with pytest.raises(TypeError, match="not a sparsity_core.Sparsifier subclass"):
        sc.create_sparsifier(nn.Linear)
