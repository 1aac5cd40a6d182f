"""Built-in sparsifiers: magnitude, random (same masks in every process) and data_norm (torch.ao parity)."""

from __future__ import annotations

import subprocess
import sys
import warnings
import zlib

import pytest
import torch

from sparsity_core import create_sparsifier
from sparsity_core.builtin.sparsifiers import BUILTIN_SPARSIFIERS


def compute(name: str, args: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sp = create_sparsifier(name, args)
    return sp.compute_masks(tensors, sp.final_levels(tensors))


@pytest.mark.parametrize("cls", BUILTIN_SPARSIFIERS, ids=lambda c: c.name)
def test_every_builtin_is_creatable_without_arguments_and_documents_its_fields(cls):
    sp = create_sparsifier(cls.name)
    assert sp.spec.sparsity_level == 0.5
    for field, info in cls.Spec.model_fields.items():
        assert info.description, f"{cls.name}.{field} has no description"


def test_random_masks_depend_on_seed_name_and_shape_only():
    t = {"a": torch.randn(30, 40), "b": torch.randn(30, 40)}
    one = compute("random", {"seed": 3}, t)
    again = compute("random", {"seed": 3}, {k: torch.randn(30, 40) for k in t})
    other = compute("random", {"seed": 4}, t)
    assert all(torch.equal(one[k], again[k]) for k in t)
    assert not torch.equal(one["a"], other["a"])
    assert not torch.equal(one["a"], one["b"])
    assert all(int((~m).sum()) == 600 for m in one.values())


SCRIPT = """
import torch, sys
from sparsity_core import create_sparsifier
sp = create_sparsifier("random", {"seed": 7, "sparsity_level": 0.3, "scope": "global"})
t = {"enc.weight": torch.zeros(64, 32), "dec.weight": torch.zeros(10, 64)}
masks = sp.compute_masks(t, sp.final_levels(t))
sys.stdout.write("".join("1" if b else "0" for m in masks.values() for b in m.view(-1).tolist()))
"""


def test_random_gives_the_same_masks_in_another_process():
    env_hashseed = {"PYTHONHASHSEED": "12345"}
    import os

    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, env={**os.environ, **env_hashseed}
    ).stdout
    sp = create_sparsifier("random", {"seed": 7, "sparsity_level": 0.3, "scope": "global"})
    t = {"enc.weight": torch.ones(64, 32), "dec.weight": torch.ones(10, 64)}
    masks = sp.compute_masks(t, sp.final_levels(t))
    here = "".join("1" if b else "0" for m in masks.values() for b in m.view(-1).tolist())
    assert out == here
    assert here.count("0") == round(0.3 * (64 * 32 + 10 * 64))


def ao_mask(t: torch.Tensor, level: float, block: tuple[int, int], zeros: int | None, norm: str) -> torch.Tensor:
    ao = pytest.importorskip("torch.ao.pruning._experimental.data_sparsifier")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ao.DataNormSparsifier(sparsity_level=level, sparse_block_shape=block, zeros_per_block=zeros, norm=norm)
        s.add_data("x", t.clone())
        s.step()
        return s.get_mask("x").bool()


def assert_data_norm_matches_ao(t: torch.Tensor, level: float, block: tuple[int, int], zeros: int | None, norm: str) -> None:
    args = {"sparsity_level": level, "sparse_block_shape": block, "zeros_per_block": zeros, "norm": norm}
    ours = compute("data_norm", args, {"x": t})["x"]
    assert torch.equal(ours, ao_mask(t, level, block, zeros, norm).view(ours.shape))


@pytest.mark.parametrize("shape", [(16, 32), (7, 10), (33, 45), (1, 13), (5, 3)])
@pytest.mark.parametrize("block", [(1, 4), (2, 2), (3, 5)])
@pytest.mark.parametrize("norm", ["L1", "L2"])
@pytest.mark.parametrize("zeros", [None, 1, "all"])
def test_data_norm_matches_torch_ao_on_2d_tensors(shape, block, norm, zeros):
    # crc32, not hash(): str hashes change from process to process, and inputs should not
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, block, norm, zeros)).encode()))
    zeros = block[0] * block[1] if zeros == "all" else zeros
    for level in (0.2, 0.5, 0.9):
        assert_data_norm_matches_ao(torch.randn(shape, generator=g), level, block, zeros, norm)


@pytest.mark.parametrize(
    "shape, block, norm, zeros, kind",
    [
        ((600, 1800), (1, 4), "L1", None, "randn"),  # 270,000 blocks: the sampled-bracket path
        ((1025, 1030), (2, 2), "L2", 1, "randn"),  # ragged rows and columns of blocks
        ((1001, 1103), (1, 4), "L1", 2, "zeros"),  # ragged columns, 60% zeros (tied blocks below the cut)
    ],
)
def test_data_norm_matches_torch_ao_on_large_tensors(shape, block, norm, zeros, kind):
    # past EXACT blocks the means are made band by band and selected through a sampled bracket
    g = torch.Generator().manual_seed(5)
    t = torch.randn(shape, generator=g)
    if kind == "zeros":
        t[torch.rand(shape, generator=g) < 0.6] = 0.0
    for level in (0.3, 0.9):
        assert_data_norm_matches_ao(t, level, block, zeros, norm)


@pytest.mark.parametrize("level", [0.3, 0.9])
def test_data_norm_on_a_large_tensor_of_tied_means_prunes_the_earliest_tied_blocks(level):
    # (torch.ao's topk breaks such ties its own way; ours are broken by position, like every selection)
    g = torch.Generator().manual_seed(6)
    t = torch.randint(-2, 3, (1025, 1030), generator=g).float()
    mask = compute("data_norm", {"sparsity_level": level, "sparse_block_shape": (2, 2), "norm": "L2"}, {"x": t})["x"]
    means = torch.nn.functional.avg_pool2d((t * t)[None, None], (2, 2), stride=(2, 2), ceil_mode=True).view(-1)
    pruned = ~torch.nn.functional.max_pool2d(mask[None, None].float(), (2, 2), stride=(2, 2), ceil_mode=True).view(-1).bool()
    assert int(pruned.sum()) == round(level * means.numel())
    cut = float(means[pruned].max())
    assert cut <= float(means[~pruned].min())
    tied = torch.nonzero(means == cut).view(-1)
    n_tied_pruned = int(pruned[tied].sum())
    assert pruned[tied[:n_tied_pruned]].all() and not pruned[tied[n_tied_pruned:]].any()


def test_data_norm_handles_1d_and_nd_tensors_where_torch_ao_raises():
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(8, 4, 3, 3, generator=g)
    bias = torch.randn(50, generator=g)
    masks = compute("data_norm", {"sparsity_level": 0.5}, {"conv": conv, "bias": bias})
    # whole 1x4 blocks of the 2-D view go
    c2 = masks["conv"].view(8, 36).view(8, 9, 4)
    assert (c2.all(-1) | ~c2.any(-1)).all() and int((~c2.all(-1)).sum()) == 36
    assert masks["bias"].shape == (50,)
    assert int((~masks["bias"]).sum()) in (24, 26)  # 6 of 13 blocks (one of them ragged)
    # a 1-D tensor is viewed as 1 x n, exactly as torch.ao does for a (1, n) one
    assert torch.equal(masks["bias"], ao_mask(bias[None], 0.5, (1, 4), None, "L1").view(50))


def test_data_norm_rejects_too_many_zeros_per_block():
    with pytest.raises(ValueError, match="zeros_per_block=5 exceeds the 4 elements"):
        create_sparsifier("data_norm", {"zeros_per_block": 5})


def test_data_norm_names_a_tensor_with_nan():
    t = torch.randn(8, 8)
    t[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'bad' has NaN or inf"):
        compute("data_norm", {}, {"bad": t})


def test_magnitude_on_bfloat16_embedding():
    t = torch.randn(100, 16).to(torch.bfloat16)
    mask = compute("magnitude", {"sparsity_level": 0.25}, {"e": t})["e"]
    assert int((~mask).sum()) == 400
