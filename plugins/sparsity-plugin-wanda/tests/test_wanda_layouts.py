"""Wanda follows each layer's layout: features are the inputs of the matmul, rows its outputs,
whatever the weight's storage (conv kernels in the ASP order, attention's query/key/value)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from sparsity_core import Capabilities, SparsityController, sparsify
from sparsity_core._contract import MaskContext
from sparsity_plugin_wanda import SPARSITY_CORE_API, Wanda


def test_declares_contract_v2_capabilities() -> None:
    assert SPARSITY_CORE_API == 2
    assert Wanda.capabilities == Capabilities(calibration=True, layer_kinds=frozenset({"linear", "conv", "conv1d", "attention"}))
    assert Wanda.needs_calibration  # v1's flag mirrors it


def test_conv_features_are_input_channels_at_each_kernel_position() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    scale = torch.tensor([0.1, 1.0, 10.0]).view(1, 3, 1, 1)
    images = [torch.randn(2, 3, 6, 6) * scale for _ in range(2)]
    wanda = Wanda()
    SparsityController(conv, wanda).calibrate(images)
    cols = torch.cat([F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27) for x in images])
    rms = cols.pow(2).mean(0).sqrt().view(3, 3, 3)  # unfold's order: (channel, kh, kw)
    expected = conv.weight.detach().abs() * rms  # broadcast over outputs: [out, in, kh, kw]
    torch.testing.assert_close(wanda.score("weight", conv.weight), expected)


def test_per_row_comparison_on_a_conv_prunes_each_output_channel_to_the_level() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.logspace(0, 4, 6).view(6, 1, 1, 1))  # filters of very different size
    sparsify(conv, "wanda", {"sparsity_level": 0.5}, calibration=[torch.randn(2, 4, 5, 5)])
    assert ((conv.weight == 0).flatten(1).sum(1) == 18).all()


def test_attention_in_proj_takes_query_key_and_value_statistics_for_its_row_blocks() -> None:
    torch.manual_seed(2)
    attn = nn.MultiheadAttention(8, 2, batch_first=True)

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attn

        def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            return self.attn(q, kv, kv * 10.0, need_weights=False)[0]

    q, kv = torch.randn(2, 5, 8), torch.randn(2, 7, 8) * 3.0
    wanda = Wanda({"include": ["attention:*"]})
    controller = SparsityController(Cross(), wanda)
    controller.calibrate([(q, kv)])
    rms = [x.reshape(-1, 8).pow(2).mean(0).sqrt() for x in (q, kv, kv * 10.0)]
    w = attn.in_proj_weight.detach().abs()
    expected = torch.cat([w[i * 8 : (i + 1) * 8] * rms[i] for i in range(3)])
    torch.testing.assert_close(wanda.score("attn.in_proj_weight", attn.in_proj_weight), expected)


def test_per_row_masks_keep_what_the_current_mask_prunes() -> None:
    torch.manual_seed(3)
    layer = nn.Linear(8, 4)
    wanda = Wanda({"sparsity_level": 0.25})
    SparsityController(layer, wanda).calibrate([torch.randn(16, 8)])
    current = torch.ones(4, 8, dtype=torch.bool)
    current[:, 0] = False  # pruned before, whatever its score now
    current[0, 1:4] = False  # row 0 has 4 pruned, more than the level asks
    with torch.no_grad():
        layer.weight[:, 0] = 100.0
    masks = wanda.compute_masks({"weight": layer.weight}, {"weight": 0.25}, MaskContext(current={"weight": current}))
    mask = masks["weight"]
    assert not mask[:, 0].any() and not mask[0, :4].any()
    assert (~mask).sum(1).tolist() == [4, 2, 2, 2]
