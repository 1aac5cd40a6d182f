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
@pytest.mark.parametrize(("shape", "pattern"), [((4, 4), "8x8"), ((4, 16), "8x1"), ((16, 2), "1x4")])
@pytest.mark.parametrize("level", [0.5, 0.6])
def test_a_block_larger_than_its_tensor_is_an_error_naming_both(shape, pattern, scope, level):
    # level 0.5 pruned nothing and 0.6 zeroed the whole tensor: one ragged block was all of it
    weights = {"big": torch.randn(64, 64), "small.weight": torch.randn(*shape)}
    before = {n: t.clone() for n, t in weights.items()}
    with pytest.raises(ValueError) as exc:
        sc.sparsify(weights, "magnitude", {"sparsity_level": level, "pattern": pattern, "scope": scope})
    text = str(exc.value)
    assert "'small.weight'" in text and pattern in text and "[%d, %d]" % shape in text
    assert torch.equal(weights["small.weight"], before["small.weight"])  # neither all nor nothing pruned


def test_a_block_that_fits_once_with_ragged_edges_still_works():
    weights = {"w": torch.arange(1.0, 61.0).view(6, 10)}
    report = sc.sparsify(weights, "magnitude", {"sparsity_level": 0.5, "pattern": "4x4"})
    assert 0.0 < report["w"] < 1.0


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
