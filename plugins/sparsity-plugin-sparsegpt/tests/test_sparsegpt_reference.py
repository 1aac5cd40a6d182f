"""SparseGPT against a plain port of the reference ``fasterprune`` (IST-DASLab/sparsegpt), and its
Hessian against ``2/n X^T X`` built from the layer's inputs by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sparsity_core import MaskContext, Reconstruction
from sparsity_core._layers import layout_of
from sparsity_plugin_sparsegpt import SparseGPT


class Conv1D(nn.Module):
    """transformers' GPT-2 ``Conv1D`` (weight ``[in, out]``, ``y = x @ W + b``), known to the core by
    its class path, so transformers need not be installed."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features) * 0.1)
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


Conv1D.__module__ = "transformers.pytorch_utils"


def reference_fasterprune(
    W: torch.Tensor, H: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0, blocksize: int = 128, percdamp: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference ``SparseGPT.fasterprune`` on a matrix ``W`` ``[rows, columns]`` (no quantizer,
    no losses), returning (new W, pruned mask). One change, the plugin's documented one: an
    unstructured block prunes an exact count, the lowest scores (stable order), so that the whole
    matrix prunes round(sparsity * numel), where the reference prunes every score <= the one at
    int(numel * sparsity) of each block."""
    W = W.clone().float()
    H = H.clone()
    rows, columns = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    pruned = torch.zeros(rows, columns, dtype=torch.bool)
    total, done = math.floor(sparsity * rows * columns + 0.5), 0
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            upto = math.floor(total * i2 / columns + 0.5)
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            mask1 = torch.zeros(W1.shape, dtype=torch.bool)
            mask1.view(-1)[torch.argsort(tmp.flatten(), stable=True)[: upto - done]] = True
            done = upto
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, pruned


def correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=gen) / math.sqrt(features)
    scale = torch.logspace(-1, 0.5, features)
    return (torch.randn(n, features, generator=gen) @ mixing) * scale + 0.1 * torch.randn(n, features, generator=gen)


def calibrated(layer: nn.Module, batches: list[torch.Tensor], **spec: object) -> SparseGPT:
    sparsegpt = SparseGPT(spec)
    sparsegpt.reset_calibration()
    for x in batches:
        sparsegpt.observe("weight", layer, (x,))
    return sparsegpt


def matrix_of(layer: nn.Module) -> torch.Tensor:
    return layout_of(layer, "weight").matrix(layer.weight.detach())


CASES = [
    pytest.param(nn.Linear, 24, 96, "unstructured", 0, 0, 32, id="linear-unstructured"),
    pytest.param(nn.Linear, 20, 72, "2:4", 2, 4, 32, id="linear-2:4"),
    pytest.param(Conv1D, 24, 96, "unstructured", 0, 0, 32, id="conv1d-unstructured"),
    pytest.param(Conv1D, 17, 64, "2:4", 2, 4, 16, id="conv1d-2:4"),
    pytest.param(nn.Linear, 33, 100, "unstructured", 0, 0, 128, id="linear-one-ragged-block"),
]


@pytest.mark.parametrize(("cls", "outputs", "inputs", "pattern", "prunen", "prunem", "block"), CASES)
def test_masks_and_weights_equal_the_reference_sweep(cls: type, outputs: int, inputs: int, pattern: str, prunen: int, prunem: int, block: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(inputs, outputs) if cls is nn.Linear else Conv1D(outputs, inputs)
    x = correlated_inputs(300, inputs, seed=1)
    sparsegpt = calibrated(layer, [x[:100], x[100:].view(20, 10, inputs)], pattern=pattern, block_size=block, sparsity_level=0.5)
    result = sparsegpt.compute_masks({"weight": layer.weight}, {"weight": 0.5})
    assert isinstance(result, Reconstruction)

    expected_w, expected_pruned = reference_fasterprune(
        matrix_of(layer), sparsegpt._stats["weight"].hessian, 0.5, prunen, prunem, block
    )
    layout = layout_of(layer, "weight")
    mask, weight = result.masks["weight"], result.weights["weight"]
    assert mask.dtype == torch.bool and mask.shape == weight.shape == layer.weight.shape
    assert torch.equal(layout.matrix(mask), ~expected_pruned)
    torch.testing.assert_close(layout.matrix(weight), expected_w, rtol=1e-5, atol=1e-6)
    assert int((~mask).sum()) == round(0.5 * mask.numel())
    assert bool((weight[~mask] == 0).all())


def test_hessian_is_the_running_mean_of_2_xxT_over_every_row() -> None:
    layer = nn.Linear(12, 5)
    batches = [torch.randn(7, 12), torch.randn(3, 4, 12), torch.randn(1, 12)]
    sparsegpt = calibrated(layer, batches)
    x = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    stats = sparsegpt._stats["weight"]
    assert stats.samples == x.shape[0]
    torch.testing.assert_close(stats.hessian.double(), 2 / x.shape[0] * x.t() @ x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "padding",
    [1, 0, pytest.param("same", marks=pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel"))],
)
def test_conv2d_features_follow_the_matrix_view_columns(padding: object) -> None:
    """The Hessian's columns are (kh, kw, in), the columns of ``layout.matrix(W)``: the unfolded
    features times the matrix view of the weight give the convolution's output ('same' with an
    even kernel pads one side more, as torch does)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, (3, 2), padding=padding, dilation=(1, 2) if padding != "same" else 1, stride=1 if padding == "same" else (2, 1), bias=False)
    x = torch.randn(2, 3, 7, 6)
    from sparsity_plugin_sparsegpt._features import feature_rows

    rows = feature_rows("weight", conv, layout_of(conv, "weight"), conv.weight, x)
    out = conv(x)  # [N, out, H', W']
    expected = out.permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(rows @ matrix_of(conv).t(), expected, rtol=1e-5, atol=1e-5)
    sparsegpt = calibrated(conv, [x])
    torch.testing.assert_close(sparsegpt._stats["weight"].hessian, 2 / rows.shape[0] * rows.t() @ rows, rtol=1e-5, atol=1e-5)


def test_conv2d_is_pruned_on_its_matrix_view_like_the_reference() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1)
    batches = [torch.randn(4, 8, 6, 6) for _ in range(2)]
    sparsegpt = calibrated(conv, batches, pattern="2:4", block_size=8)
    result = sparsegpt.compute_masks({"weight": conv.weight}, {"weight": 0.5})
    expected_w, expected_pruned = reference_fasterprune(matrix_of(conv), sparsegpt._stats["weight"].hessian, 0.5, 2, 4, 8)
    layout = layout_of(conv, "weight")
    assert torch.equal(layout.matrix(result.masks["weight"]), ~expected_pruned)
    torch.testing.assert_close(layout.matrix(result.weights["weight"]), expected_w, rtol=1e-5, atol=1e-6)
    # 2:4 along the input channels at each kernel position (the ASP / TensorRT layout)
    kept = result.masks["weight"].permute(0, 2, 3, 1).reshape(6, 3, 3, 2, 4).sum(-1)
    assert bool((kept == 2).all())


def test_nm_result_does_not_depend_on_the_block_size() -> None:
    """Blocks are lazy batching only: N:M groups are chosen from fully updated weights either way."""
    torch.manual_seed(3)
    layer = nn.Linear(64, 16)
    x = correlated_inputs(200, 64, seed=4)
    results = [calibrated(layer, [x], pattern="2:4", block_size=b).compute_masks({"weight": layer.weight}, {"weight": 0.5}) for b in (4, 16, 64)]
    for other in results[1:]:
        assert torch.equal(other.masks["weight"], results[0].masks["weight"])
        torch.testing.assert_close(other.weights["weight"], results[0].weights["weight"], rtol=1e-4, atol=1e-5)


def test_dead_inputs_are_zeroed_and_pruned_first() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 6)
    with torch.no_grad():
        layer.weight[:, :3] = 50.0  # huge weights on inputs that are always zero
    x = correlated_inputs(100, 16, seed=2)
    x[:, :3] = 0.0
    result = calibrated(layer, [x], block_size=16).compute_masks({"weight": layer.weight}, {"weight": 0.25})
    assert not result.masks["weight"][:, :3].any()
    assert bool((result.weights["weight"][:, :3] == 0).all())
    assert int((~result.masks["weight"]).sum()) == 24


def test_nested_forced_positions_stay_pruned_and_the_level_is_exact() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, 10)
    x = correlated_inputs(200, 48, seed=5)
    sparsegpt = calibrated(layer, [x], block_size=16)
    gen = torch.Generator().manual_seed(7)
    keep_now = torch.rand(layer.weight.shape, generator=gen) > 0.2  # prunes ~20%, some of them large weights
    context = MaskContext(current={"weight": keep_now})
    for level, expected in ((0.6, round(0.6 * 480)), (0.1, int((~keep_now).sum()))):
        result = sparsegpt.compute_masks({"weight": layer.weight}, {"weight": level}, context)
        mask = result.masks["weight"]
        assert not bool((mask & ~keep_now).any()), "a currently pruned weight was revived"
        assert int((~mask).sum()) == expected
        assert bool((result.weights["weight"][~mask] == 0).all())


def test_compute_masks_modifies_nothing_and_level_zero_keeps_the_weights() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    before = layer.weight.detach().clone()
    sparsegpt = calibrated(layer, [torch.randn(40, 16)])
    hessian = sparsegpt._stats["weight"].hessian.clone()
    sparsegpt.compute_masks({"weight": layer.weight}, {"weight": 0.5})
    assert torch.equal(layer.weight, before)
    assert torch.equal(sparsegpt._stats["weight"].hessian, hessian)
    result = sparsegpt.compute_masks({"weight": layer.weight}, {"weight": 0.0})
    assert bool(result.masks["weight"].all()) and "weight" not in result.weights


def test_conv1d_weight_is_not_written_through_its_transposed_view() -> None:
    """matrix(W) of a Conv1D is W.t(), whose .t() is W itself: the sweep must copy it."""
    torch.manual_seed(0)
    layer = Conv1D(8, 16)
    before = layer.weight.detach().clone()
    calibrated(layer, [torch.randn(30, 16)]).compute_masks({"weight": layer.weight}, {"weight": 0.5})
    assert torch.equal(layer.weight, before)


def test_bfloat16_weights_get_bfloat16_reconstructions() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 8).to(torch.bfloat16)
    result = calibrated(layer, [torch.randn(40, 16, dtype=torch.bfloat16)]).compute_masks({"weight": layer.weight}, {"weight": 0.5})
    assert result.weights["weight"].dtype == torch.bfloat16
    assert int((~result.masks["weight"]).sum()) == 64


def test_no_statistics_is_an_error_that_asks_for_calibration() -> None:
    layer = nn.Linear(8, 4)
    with pytest.raises(RuntimeError, match="calibration"):
        SparseGPT().compute_masks({"weight": layer.weight}, {"weight": 0.5})
    sparsegpt = calibrated(layer, [torch.randn(10, 8)])
    sparsegpt.reset_calibration()
    assert not sparsegpt._stats
    with pytest.raises(RuntimeError, match="calibration"):
        sparsegpt.compute_masks({"weight": layer.weight}, {"weight": 0.5})


@pytest.mark.parametrize(
    ("module", "words"),
    [
        (nn.Conv2d(4, 4, 3, groups=2), "groups=1"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='zeros'"),
        (nn.ConvTranspose2d(4, 4, 3), "Linear, transformers Conv1D and Conv2d"),
        (nn.Conv1d(4, 4, 3), "2-D convolutions"),
        (nn.LayerNorm(4), "Linear, transformers Conv1D and Conv2d"),
    ],
)
def test_unsupported_layers_are_refused_by_name(module: nn.Module, words: str) -> None:
    x = torch.randn(2, 4, 8, 8) if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.Conv1d) else torch.randn(2, 4, 8)
    with pytest.raises(TypeError, match=words) as info:
        SparseGPT().observe("block.weight", module, (x,))
    assert "'block.weight'" in str(info.value)


def test_integer_inputs_are_refused() -> None:
    with pytest.raises(TypeError, match="not activations"):
        SparseGPT().observe("emb.weight", nn.Embedding(10, 4), (torch.tensor([1, 2]),))


@pytest.mark.parametrize(
    ("args", "field", "words"),
    [
        ({"pattern": "1x4"}, "pattern", "not blocks"),
        ({"pattern": "channel"}, "pattern", "not whole output channels"),
        ({"scope": "global"}, "scope", "scope='layer' only"),
        ({"pattern": "2:4", "block_size": 126}, "", "multiple of M=4"),
        ({"dampening": -0.1}, "dampening", "greater than or equal to 0"),
    ],
)
def test_spec_refuses_what_the_sweep_cannot_do(args: dict[str, object], field: str, words: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=words) as info:
        SparseGPT(args)
    assert "sparsegpt" in str(info.value)
    if field:
        assert info.value.errors()[0]["loc"] == (field,)


def test_nm_fixes_the_level() -> None:
    assert SparseGPT({"pattern": "2:4"}).spec.sparsity_level == 0.5
    assert SparseGPT({"pattern": "1:4"}).spec.sparsity_level == 0.75


def test_nested_nm_prunes_the_forced_weights_and_completes_each_group() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(32, 8)
    sparsegpt = calibrated(layer, [correlated_inputs(120, 32, seed=6)], pattern="2:4", block_size=8)
    gen = torch.Generator().manual_seed(8)
    keep_now = torch.rand(layer.weight.shape, generator=gen) > 0.4
    result = sparsegpt.compute_masks({"weight": layer.weight}, {"weight": 0.5}, MaskContext(current={"weight": keep_now}))
    mask = result.masks["weight"]
    assert not bool((mask & ~keep_now).any()), "a currently pruned weight was revived"
    forced_per_group = (~keep_now).view(8, 8, 4).sum(-1)
    pruned_per_group = (~mask).view(8, 8, 4).sum(-1)
    assert torch.equal(pruned_per_group, forced_per_group.clamp(min=2))
