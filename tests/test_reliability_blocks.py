"""Block patterns at the edges of tensor shapes (issue 10, point 14)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsity_core as sc
from sparsity_core._registry import Registry, use_registry


@pytest.fixture(autouse=True)
def builtins_only():
    with use_registry(Registry(autoload=False)) as registry:
        yield registry


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize(
    ("shape", "pattern", "matrix"),
    [((4, 4), "8x8", "[4, 4]"), ((4, 16), "8x16", "[4, 16]"), ((1, 3), "1x4", "[1, 3]"), ((3,), "2x4", "[1, 3]")],
)
@pytest.mark.parametrize("level", [0.5, 0.6])
def test_a_block_larger_than_its_tensor_is_an_error_naming_both(shape, pattern, matrix, scope, level):
    # level 0.5 pruned nothing and 0.6 zeroed the whole tensor: one ragged block was all of it
    weights = {"big": torch.randn(64, 64), "small.weight": torch.randn(*shape)}
    before = {n: t.clone() for n, t in weights.items()}
    with pytest.raises(ValueError) as exc:
        sc.sparsify(weights, "magnitude", {"sparsity_level": level, "pattern": pattern, "scope": scope})
    text = str(exc.value)
    assert "'small.weight'" in text and pattern in text and matrix in text and "larger than" in text
    assert torch.equal(weights["small.weight"], before["small.weight"])  # neither all nor nothing pruned


@pytest.mark.parametrize(("shape", "pattern"), [((6, 10), "4x4"), ((4, 16), "8x1"), ((16, 2), "1x4"), ((50,), "2x4"), ((4, 4), "4x4")])
def test_a_tensor_of_more_than_one_block_or_exactly_one_still_works(shape, pattern):
    # ragged edges are blocks too (a 1-D tensor takes 2x4 as its 1x4 edge blocks)
    weights = {"w": torch.arange(1.0, 1.0 + torch.Size(shape).numel()).view(shape)}
    sc.sparsify(weights, "magnitude", {"sparsity_level": 0.5, "pattern": pattern})


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("pattern", ["2x2", "1x4", "channel", "unstructured"])
def test_a_zero_size_tensor_with_a_block_pattern_is_a_no_op(scope, pattern):
    weights = {"empty": torch.empty(0, 8), "w": torch.randn(8, 8), "none": torch.empty(4, 0)}
    report = sc.sparsify(weights, "magnitude", {"sparsity_level": 0.5, "pattern": pattern, "scope": scope})
    assert weights["empty"].shape == (0, 8) and weights["none"].shape == (4, 0)
    assert report["w"] == pytest.approx(0.5)


def test_a_zero_width_layer_in_a_model_with_a_block_pattern():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
        model = nn.Sequential(nn.Linear(8, 0), nn.Linear(0, 8), nn.Linear(8, 8))
    report = sc.sparsify(model, "magnitude", {"sparsity_level": 0.5, "pattern": "2x2", "scope": "global"})
    assert report["2.weight"] > 0
