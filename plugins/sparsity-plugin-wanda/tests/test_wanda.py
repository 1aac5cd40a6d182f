"""Wanda: found through its installed entry point, conforming to the kit, and scoring as the paper says."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsity_core import SparsityController, sparsify
from sparsity_core._registry import Registry
from sparsity_core.testing import parametrize_with_checks
from sparsity_plugin_wanda import Wanda


def test_found_through_its_installed_entry_point() -> None:
    registry = Registry(environ={})  # the real environment's entry points, no SPARSITY_* switches
    info = next(p for p in registry.plugins() if p.name == "wanda")
    assert (info.distribution, info.status, info.sparsifiers) == ("sparsity-plugin-wanda", "loaded", ["wanda"])
    assert registry.get("sparsifier", "wanda").cls is Wanda
    assert registry.get("sparsifier", "wanda:wanda").cls is Wanda


@parametrize_with_checks(["wanda", ("wanda", {"per_output": False})], plugin="wanda")
def test_conformance(check) -> None:
    check()


def _linear_with(batches: list[torch.Tensor], out_features: int = 3) -> tuple[nn.Linear, Wanda, SparsityController]:
    torch.manual_seed(0)
    layer = nn.Linear(batches[0].shape[-1], out_features)
    wanda = Wanda({"sparsity_level": 0.5})
    controller = SparsityController(layer, wanda)
    controller.calibrate(batches)
    return layer, wanda, controller


def test_score_is_weight_times_rms_of_each_input_feature() -> None:
    batches = [torch.randn(5, 4) * torch.tensor([0.0, 1.0, 2.0, 3.0]) for _ in range(3)]
    layer, wanda, _ = _linear_with(batches)
    x = torch.cat(batches)
    expected = layer.weight.detach().abs() * x.pow(2).mean(0).sqrt()
    torch.testing.assert_close(wanda.score("weight", layer.weight), expected)


def test_a_dead_input_feature_is_pruned_first_however_large_its_weights() -> None:
    batches = [torch.randn(8, 4) * torch.tensor([0.0, 1.0, 1.0, 1.0]) for _ in range(2)]
    layer, _, controller = _linear_with(batches)
    with torch.no_grad():
        layer.weight[:, 0] = 100.0  # huge weights on a feature that is always zero
    controller.step()
    assert not controller.masks["weight"][:, 0].any()
    assert controller.masks["weight"][:, 1:].any()


def test_per_output_prunes_each_row_to_the_level_and_layer_scope_does_not() -> None:
    torch.manual_seed(1)
    layer = nn.Linear(8, 6)
    with torch.no_grad():
        layer.weight.copy_(torch.logspace(0, 5, 6).unsqueeze(1) * (1 + torch.rand(6, 8)))  # rows of very different size
    batches = [torch.randn(16, 8)]
    per_row = sparsify(nn.Sequential(layer), "wanda", {"sparsity_level": 0.5}, calibration=batches)
    assert per_row.overall == 0.5
    assert ((layer.weight == 0).sum(1) == 4).all()

    torch.manual_seed(1)
    layer2 = nn.Linear(8, 6)
    with torch.no_grad():
        layer2.weight.copy_(torch.logspace(0, 5, 6).unsqueeze(1) * (1 + torch.rand(6, 8)))
    sparsify(layer2, "wanda", {"sparsity_level": 0.5, "per_output": False}, calibration=batches)
    assert (layer2.weight == 0).sum(1).tolist() == [8, 8, 8, 0, 0, 0]


def test_conv_1x1_scores_like_the_equivalent_linear() -> None:
    torch.manual_seed(2)
    conv, linear = nn.Conv2d(4, 3, 1), nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.view(3, 4))
    images = [torch.randn(2, 4, 5, 5) * torch.tensor([0.1, 1.0, 3.0, 10.0]).view(1, 4, 1, 1)]
    rows = [x.permute(0, 2, 3, 1).reshape(-1, 4) for x in images]
    conv_wanda, linear_wanda = Wanda(), Wanda()
    SparsityController(conv, conv_wanda).calibrate(images)
    SparsityController(linear, linear_wanda).calibrate(rows)
    torch.testing.assert_close(conv_wanda.score("weight", conv.weight).view(3, 4), linear_wanda.score("weight", linear.weight))


def test_conv3x3_uses_each_kernel_position_of_the_unfolded_input() -> None:
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    wanda = Wanda()
    SparsityController(conv, wanda).calibrate([torch.ones(1, 1, 3, 3)])
    # With zero padding, the corner kernel positions see the 3x3 input's ones at 4 of 9 places.
    rms = wanda.score("weight", torch.ones_like(conv.weight)).view(3, 3)
    expected = torch.tensor([[4, 6, 4], [6, 9, 6], [4, 6, 4]]).float().div(9).sqrt()
    torch.testing.assert_close(rms, expected)


def test_sparsify_with_calibration_reaches_the_level_and_needs_it() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    batches = [torch.randn(8, 16) for _ in range(4)]
    report = sparsify(model, "wanda", {"sparsity_level": 0.75}, calibration=batches)
    assert report["0.weight"] == 0.75 and report["2.weight"] == 0.75
    with pytest.raises(ValueError, match="needs activations: pass calibration="):
        sparsify(nn.Linear(4, 4), "wanda", {"sparsity_level": 0.5})
    with pytest.raises(RuntimeError, match="needs calibration"):  # a controller stepped without calibrate()
        SparsityController(nn.Linear(4, 4), "wanda", {"sparsity_level": 0.5}).step()


def test_an_embedding_is_not_covered_and_refused_when_included() -> None:
    # contract v2: wanda declares its layer kinds; the default leaves the embedding (token ids) out
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    report = sparsify(model, "wanda", calibration=[torch.tensor([[1, 2, 3]])])
    assert list(report) == ["1.weight"]
    with pytest.raises(ValueError, match=r"cannot sparsify '0.weight' \(Embedding, layer kind 'embedding'.*layer kinds \['attention', 'conv', 'conv1d', 'linear'\]"):
        sparsify(model, "wanda", {"include": ["*.weight"]}, calibration=[torch.tensor([[1, 2, 3]])])


def test_calibration_accumulates_over_batches() -> None:
    batches = [torch.full((2, 3), 1.0), torch.full((6, 3), 3.0)]
    layer, wanda, _ = _linear_with(batches, out_features=1)
    expected_rms = ((2 * 1.0 + 6 * 9.0) / 8) ** 0.5
    torch.testing.assert_close(wanda.score("weight", torch.ones(1, 3)), torch.full((1, 3), expected_rms))
