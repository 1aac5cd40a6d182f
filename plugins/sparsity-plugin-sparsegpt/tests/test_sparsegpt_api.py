"""SparseGPT through the public API: its entry point, sparsify() one-shot and sequential, the
layer-wise error against wanda and magnitude, and the conformance kit."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sparsity_core import SparsityController, sparsify
from sparsity_core._registry import Registry
from sparsity_core.testing import parametrize_with_checks
from sparsity_plugin_sparsegpt import SparseGPT


def test_found_through_its_installed_entry_point() -> None:
    registry = Registry(environ={})
    info = next(p for p in registry.plugins() if p.name == "sparsegpt")
    assert (info.distribution, info.status, info.sparsifiers) == ("sparsity-plugin-sparsegpt", "loaded", ["sparsegpt"])
    assert registry.get("sparsifier", "sparsegpt").cls is SparseGPT


@parametrize_with_checks(["sparsegpt"], plugin="sparsegpt")
def test_conformance(check) -> None:
    check()


# -- layer-wise error --------------------------------------------------------------------------
def correlated_inputs(n: int, features: int, gen: torch.Generator, mixing: torch.Tensor) -> torch.Tensor:
    scale = torch.logspace(-0.5, 0.5, features)
    return (torch.randn(n, features, generator=gen) @ mixing) * scale


@pytest.mark.parametrize("args", [{"sparsity_level": 0.5}, {"pattern": "2:4"}], ids=["unstructured-50%", "2:4"])
def test_layer_error_is_below_wanda_and_magnitude_on_correlated_inputs(args: dict[str, object]) -> None:
    """||WX - W'X|| on held-out inputs: the OBS update compensates for what is pruned, which a
    mask alone cannot when the inputs are strongly correlated (features near a rank-8 subspace)."""
    pytest.importorskip("sparsity_plugin_wanda")
    gen = torch.Generator().manual_seed(0)
    features = 64
    low_rank = torch.randn(features, 8, generator=gen) @ torch.randn(8, features, generator=gen) / math.sqrt(8)
    mixing = low_rank + 0.1 * torch.eye(features)
    calibration = correlated_inputs(512, features, gen, mixing)
    held_out = correlated_inputs(512, features, gen, mixing)
    torch.manual_seed(0)
    layer = nn.Linear(features, 32, bias=False)
    dense = held_out @ layer.weight.detach().t()

    errors = {}
    for name in ("sparsegpt", "wanda", "magnitude"):
        pruned = copy.deepcopy(layer)
        report = sparsify(pruned, name, args, calibration=None if name == "magnitude" else [calibration[:256], calibration[256:]])
        assert report["weight"] == pytest.approx(0.5)
        errors[name] = float((dense - held_out @ pruned.weight.detach().t()).norm() / dense.norm())
    assert errors["sparsegpt"] < 0.75 * min(errors["wanda"], errors["magnitude"]), errors


# -- sparsify ----------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(torch.relu(self.fc1(x))))


class Net(nn.Module):
    def __init__(self, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _net_and_batches(seed: int = 0) -> tuple[Net, list[torch.Tensor]]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    mixing = torch.randn(16, 4, generator=gen) @ torch.randn(4, 16, generator=gen) / 2 + 0.2 * torch.eye(16)
    return Net(), [torch.randn(4, 8, 16, generator=gen) @ mixing for _ in range(3)]  # correlated features


WEIGHTS = ["blocks.0.fc1.weight", "blocks.0.fc2.weight", "blocks.1.fc1.weight", "blocks.1.fc2.weight", "head.weight"]


@pytest.mark.parametrize("args", [{"sparsity_level": 0.6}, {"pattern": "2:4"}], ids=["unstructured-60%", "2:4"])
def test_sparsify_prunes_exactly_the_level_and_reconstructs_the_kept_weights(args: dict[str, object]) -> None:
    model, batches = _net_and_batches()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = sparsify(model, "sparsegpt", args, calibration=batches)
    level = 0.6 if "sparsity_level" in args else 0.5
    params = dict(model.named_parameters())
    for name in WEIGHTS:
        weight = params[name].detach()
        zeros = weight == 0
        assert int(zeros.sum()) == round(level * weight.numel()), name
        assert report[name] == round(level * weight.numel()) / weight.numel()
        kept = ~zeros
        # the OBS update moved the kept weights: not the dense values under a mask
        assert not torch.equal(weight[kept], before[name][kept]), f"{name}: kept weights unchanged"
    for name, value in before.items():
        if name not in WEIGHTS:
            assert torch.equal(params[name], value), f"{name} is not covered but changed"


def test_sparsify_without_calibration_is_refused() -> None:
    model, _ = _net_and_batches()
    with pytest.raises(ValueError, match="calibration"):
        sparsify(model, "sparsegpt", {"sparsity_level": 0.5})


def test_reconstruction_beats_the_same_mask_without_it() -> None:
    """The weights the sweep returns cost less output error than its mask on the dense weights."""
    model, batches = _net_and_batches()
    layer = model.blocks[0].fc1
    dense = layer.weight.detach().clone()
    controller = SparsityController(model, "sparsegpt", {"sparsity_level": 0.5, "include": ["blocks.0.fc1.weight"]})
    controller.calibrate(batches)
    controller.step()
    mask = controller.masks["blocks.0.fc1.weight"]
    x = torch.cat(batches).reshape(-1, 16)
    target = x @ dense.t()
    with_update = (target - x @ layer.weight.detach().t()).norm()
    mask_only = (target - x @ (dense * mask).t()).norm()
    assert with_update < 0.8 * mask_only


def _prune_block_by_hand(block: Block, inputs: list[torch.Tensor], level: float) -> list[torch.Tensor]:
    """The reference's sequential loop for one block: calibrate its layers on ``inputs``, prune
    them (new weights, then zeros), return the pruned block's outputs for the next block."""
    sparsegpt = SparseGPT({"sparsity_level": level})
    names = {"fc1.weight": block.fc1, "fc2.weight": block.fc2}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: sparsegpt.observe(n, mod, args)) for n, m in names.items()]
    with torch.no_grad():
        for x in inputs:
            block(x)
    for h in hooks:
        h.remove()
    tensors = {n: m.weight for n, m in names.items()}
    result = sparsegpt.compute_masks(tensors, dict.fromkeys(tensors, level))
    with torch.no_grad():
        for n, m in names.items():
            m.weight.copy_(result.weights[n] * result.masks[n])
        return [block(x) for x in inputs]


def test_sequential_calibrates_each_block_on_the_outputs_of_the_pruned_blocks_before_it() -> None:
    model, batches = _net_and_batches()
    by_hand, one_shot = copy.deepcopy(model), copy.deepcopy(model)
    sparsify(model, "sparsegpt", {"sparsity_level": 0.5, "include": ["blocks.*.weight"], "exclude": ["*.norm.weight"]}, calibration=batches, sequential="blocks.*")

    inputs = batches
    for block in by_hand.blocks:
        inputs = _prune_block_by_hand(block, inputs, 0.5)
    for name in WEIGHTS[:4]:
        got, expected = model.get_parameter(name), by_hand.get_parameter(name)
        assert torch.equal(got == 0, expected == 0), f"{name}: masks differ from the block-by-block loop"
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    sparsify(one_shot, "sparsegpt", {"sparsity_level": 0.5, "include": ["blocks.*.weight"], "exclude": ["*.norm.weight"]}, calibration=batches)
    torch.testing.assert_close(one_shot.blocks[0].fc1.weight, model.blocks[0].fc1.weight)  # block 0 sees the same inputs
    assert not torch.allclose(one_shot.blocks[1].fc1.weight, model.blocks[1].fc1.weight), (
        "block 1 was calibrated on dense outputs: sequential made no difference"
    )


def test_sequential_frees_each_blocks_statistics() -> None:
    """reset_calibration between blocks: after block i only block i's Hessians exist."""
    model, batches = _net_and_batches()
    seen: list[list[str]] = []

    class Watching(SparseGPT):
        name = "sparsegpt_watching"

        def compute_masks(self, tensors, levels, context=None):  # type: ignore[no-untyped-def]
            seen.append(sorted(self._stats))
            return super().compute_masks(tensors, levels, context)

    sparsify(model, Watching, {"sparsity_level": 0.5, "include": ["blocks.*.fc*.weight"]}, calibration=batches, sequential="blocks.*")
    assert seen == [["blocks.0.fc1.weight", "blocks.0.fc2.weight"], ["blocks.1.fc1.weight", "blocks.1.fc2.weight"]]


def test_conv_model_is_pruned_through_sparsify() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    batches = [torch.randn(2, 4, 6, 6) for _ in range(3)]
    report = sparsify(model, "sparsegpt", {"pattern": "2:4", "block_size": 32}, calibration=batches)
    assert report.overall == pytest.approx(0.5)
    kept = model[2].weight.detach().permute(0, 2, 3, 1).reshape(8, 9, 2, 4).ne(0).sum(-1)
    assert bool((kept <= 2).all())


@pytest.mark.slow
def test_ddp_ranks_sum_their_hessians_and_agree(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two gloo ranks, each calibrated on other batches, prune alike, and as one process would
    on all the batches."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("ddp_sparsegpt_ranks.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(ranks[0]["mask"], ranks[1]["mask"])
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])

    sys.path.insert(0, str(script.parent))
    try:
        from ddp_sparsegpt_ranks import layer_and_batches
    finally:
        sys.path.remove(str(script.parent))
    layer, batches = layer_and_batches()
    alone = SparseGPT({"sparsity_level": 0.5, "block_size": 8})
    for x in batches:
        alone.observe("weight", layer, (x,))
    expected = alone.compute_masks({"weight": layer.weight}, {"weight": 0.5})
    assert torch.equal(ranks[0]["mask"], expected.masks["weight"])
    torch.testing.assert_close(ranks[0]["weight"], expected.weights["weight"], rtol=1e-4, atol=1e-5)
