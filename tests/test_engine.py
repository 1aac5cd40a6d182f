"""Mask selection: levels, ordering, patterns, scopes, overrides, errors, dtypes."""

from __future__ import annotations

import pytest
import torch

import sparsity_core._engine as engine
from sparsity_core import ScoreSparsifier, create_sparsifier
from sparsity_core._engine import score_masks


def masks_for(args: dict, tensors: dict[str, torch.Tensor], name: str = "magnitude") -> dict[str, torch.Tensor]:
    sp = create_sparsifier(name, args)
    return score_masks(sp, tensors, sp.final_levels(tensors))


def pruned(mask: torch.Tensor) -> int:
    return int((~mask).sum())


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "fc.weight": torch.randn(300, 500, generator=g),
        "conv.weight": torch.randn(16, 8, 3, 3, generator=g),
        "bias": torch.randn(77, generator=g),
        "emb.weight": torch.randn(1000, 33, generator=g) * 3,
    }


@pytest.mark.parametrize("level", [0.0, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_layer_scope_reaches_each_level_exactly_and_keeps_the_largest(tensors, path, level):
    masks = masks_for({"sparsity_level": level, "include": ["*"]}, tensors)
    for name, t in tensors.items():
        m = masks[name]
        assert m.dtype == torch.bool and m.shape == t.shape
        assert pruned(m) == round(level * t.numel())
        if 0 < pruned(m) < t.numel():
            assert t.abs()[~m].max() <= t.abs()[m].min()


@pytest.mark.parametrize("level", [0.3, 0.9])
def test_global_scope_one_threshold_exact_total(tensors, path, level):
    masks = masks_for({"sparsity_level": level, "scope": "global"}, tensors)
    total = sum(t.numel() for t in tensors.values())
    assert sum(pruned(m) for m in masks.values()) == round(level * total)
    scores = torch.cat([t.abs().view(-1) for t in tensors.values()])
    keep = torch.cat([m.view(-1) for m in masks.values()])
    assert scores[~keep].max() <= scores[keep].min()
    # global differs from layer: the scaled embedding keeps more
    assert pruned(masks["emb.weight"]) < round(level * tensors["emb.weight"].numel())


def test_ties_are_broken_deterministically_by_position(path):
    t = {"a": torch.zeros(1000), "b": torch.ones(3000)}
    a = masks_for({"sparsity_level": 0.1, "scope": "global"}, t)
    assert pruned(a["a"]) == 400 and pruned(a["b"]) == 0
    assert not a["a"][:400].any() and a["a"][400:].all()  # earlier positions go first
    b = masks_for({"sparsity_level": 0.5}, {"x": torch.ones(10)})
    assert b["x"].tolist() == [False] * 5 + [True] * 5


def test_sample_bracket_agrees_with_exact_on_a_large_tensor(monkeypatch):
    t = {"w": torch.randn(2_000_000, generator=torch.Generator().manual_seed(1))}
    fast = masks_for({"sparsity_level": 0.9}, t)["w"]
    monkeypatch.setattr(engine.kernels, "EXACT", 10**9)
    assert torch.equal(fast, masks_for({"sparsity_level": 0.9}, t)["w"])


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("1:4", 1, 4), ("3:8", 3, 8), ("2:16", 2, 16)])
def test_nm_keeps_the_n_largest_of_every_m_along_the_input_dim(pattern, n, m):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(12, 5 * m, generator=g)
    mask = masks_for({"pattern": pattern}, {"w": w})["w"]
    groups, scores = mask.view(12, 5, m), w.abs().view(12, 5, m)
    assert (groups.sum(-1) == n).all()
    kept_min = scores.masked_fill(~groups, float("inf")).amin(-1)
    pruned_max = scores.masked_fill(groups, -1.0).amax(-1)
    assert (pruned_max <= kept_min).all()


def test_nm_conv_ragged_tail_and_gradual_levels():
    conv = torch.randn(4, 3, 3, 3)  # 2-D view 4 x 27: six groups of 4 and a tail of 3
    sp = create_sparsifier("magnitude", {"pattern": "2:4"})
    full = score_masks(sp, {"c": conv}, {"c": 0.5})["c"].view(4, 27)
    assert (full[:, :24].reshape(4, 6, 4).sum(-1) == 2).all()
    assert (full[:, 24:].sum(-1) == 2).all()  # keep N of the tail of 3
    quarter = score_masks(sp, {"c": conv}, {"c": 0.25})["c"].view(4, 27)
    assert (quarter[:, :24].reshape(4, 6, 4).sum(-1) == 3).all()
    over = score_masks(sp, {"c": conv}, {"c": 0.9})["c"].view(4, 27)
    assert torch.equal(over, full)  # capped at M - N


def test_nm_ties_prune_exactly_m_minus_n():
    w = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 2.0]])
    mask = masks_for({"pattern": "2:4"}, {"w": w})["w"]
    assert mask.tolist() == [[False, False, True, True, False, False, True, True]]


@pytest.mark.parametrize("shape", [(8, 12), (7, 10), (3, 3, 5, 5), (50,)])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_blocks_are_pruned_whole_and_aligned(shape, scope, path):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g)
    mask = masks_for({"pattern": "2x4", "sparsity_level": 0.5, "scope": scope}, {"w": w})["w"]
    m2 = engine.view2d(mask)
    rows, cols = m2.shape
    for r in range(0, rows, 2):
        for c in range(0, cols, 4):
            block = m2[r : r + 2, c : c + 4]
            assert block.all() or not block.any()
    assert abs(pruned(mask) - 0.5 * w.numel()) <= 4  # within half a block
    # kept blocks have higher mean |w| than pruned ones
    means = torch.nn.functional.avg_pool2d(engine.view2d(w).abs()[None, None], (2, 4), (2, 4), ceil_mode=True)[0, 0]
    keep = m2[::2, ::4]
    if keep.any() and (~keep).any():
        assert means[~keep].max() <= means[keep].min()


def test_overrides_and_exclude_group_by_resolved_spec(tensors):
    args = {
        "sparsity_level": 0.8,
        "scope": "global",
        "include": ["*"],
        "exclude": ["bias"],
        "overrides": {"conv.*": {"sparsity_level": 0.25, "scope": "layer"}, "emb.*": {"pattern": "2:4", "sparsity_level": 0.5, "scope": "layer"}},
    }
    sp = create_sparsifier("magnitude", args)
    names = sp.covers(tensors)
    assert names == ["fc.weight", "conv.weight", "emb.weight"]
    chosen = {n: tensors[n] for n in names}
    masks = score_masks(sp, chosen, sp.final_levels(names))
    assert pruned(masks["conv.weight"]) == round(0.25 * tensors["conv.weight"].numel())
    assert pruned(masks["fc.weight"]) == round(0.8 * tensors["fc.weight"].numel())  # alone in its global group
    assert pruned(masks["emb.weight"]) == 1000 * 16  # 33 columns: eight groups of 4 and a tail of 1


def test_empty_selection_is_a_clear_error(tensors):
    from sparsity_core import SparsityController

    with pytest.raises(ValueError, match=r"covers no tensor.*include=\['nothing\*'\]"):
        SparsityController(tensors, "magnitude", {"include": ["nothing*"]})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("args", [{}, {"scope": "global"}, {"pattern": "2:4"}, {"pattern": "1x4"}])
def test_nan_or_inf_names_the_tensor(bad, args, path):
    w = torch.randn(64, 64)
    w[5, 7] = bad
    with pytest.raises(ValueError, match="'layer.weight' has NaN or inf"):
        masks_for({"sparsity_level": 0.5, **args} if "pattern" not in args or args["pattern"] != "2:4" else args, {"ok": torch.randn(8, 8), "layer.weight": w})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tensors(dtype, path):
    w = torch.randn(200, 300).to(dtype)
    mask = masks_for({"sparsity_level": 0.7}, {"w": w})["w"]
    assert pruned(mask) == round(0.7 * w.numel())
    assert w.float().abs()[~mask].max() <= w.float().abs()[mask].min()
    nm = masks_for({"pattern": "2:4"}, {"w": w})["w"]
    assert (nm.view(200, 75, 4).sum(-1) == 2).all()


def test_a_plain_score_plugin_works_without_the_elementwise_hook(path):
    class RowNorm(ScoreSparsifier):
        name = "row_norm"

        def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
            return tensor.norm(dim=-1, keepdim=True).expand_as(tensor)

    w = torch.randn(40, 50)
    sp = RowNorm({"sparsity_level": 0.5})
    mask = score_masks(sp, {"w": w}, {"w": 0.5})["w"]
    assert pruned(mask) == 1000
    assert (mask.all(1) | ~mask.any(1)).all()  # whole rows


def test_a_score_of_the_wrong_shape_is_reported():
    class Bad(ScoreSparsifier):
        name = "bad"

        def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
            return tensor.sum(0)

    with pytest.raises(ValueError, match=r"'bad'.*score\('w', tensor\) must return a tensor shaped like"):
        score_masks(Bad(), {"w": torch.randn(4, 4)}, {"w": 0.5})


def test_scores_do_not_modify_the_weights(tensors):
    before = {n: t.clone() for n, t in tensors.items()}
    masks_for({"sparsity_level": 0.6, "scope": "global", "include": ["*"]}, tensors)
    assert all(torch.equal(before[n], t) for n, t in tensors.items())


def test_a_mass_of_ties_at_the_cut_is_resolved_in_order(monkeypatch):
    monkeypatch.setattr(engine.kernels, "EXACT", 100)
    w = torch.randn(50_000, generator=torch.Generator().manual_seed(4))
    w[::2] = 0.0  # half the weights already pruned
    for level in (0.3, 0.5, 0.7):
        mask = masks_for({"sparsity_level": level}, {"w": w})["w"]
        assert pruned(mask) == round(level * w.numel())
        assert w.abs()[~mask].max() <= w.abs()[mask].min()
    mask = masks_for({"sparsity_level": 0.3}, {"w": w})["w"]
    zeros = torch.nonzero(w == 0).view(-1)
    assert not mask[zeros[:15000]].any() and mask[zeros[15000:]].all()



@pytest.mark.parametrize("zeros", [0.0, 0.5, 0.95])
@pytest.mark.parametrize("level", [0.3, 0.5, 0.9, 0.97])
def test_recompute_over_already_pruned_weights_is_exact(zeros, level):
    # Gradual pruning recomputes masks over weights that earlier masks zeroed: a mass of equal
    # minimal scores (the engine steps over it rather than partitioning through it).
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(300, 200, generator=gen)
    w[torch.rand(w.shape, generator=gen) < zeros] = 0.0
    mask = create_sparsifier("magnitude").compute_masks({"w": w}, {"w": level})["w"]
    n_prune = round(level * w.numel())
    assert int((~mask).sum()) == n_prune
    kept, pruned = w.abs()[mask], w.abs()[~mask]
    assert pruned.max() <= kept.min()
    # ties at the cut: the earlier positions are pruned first
    cut = pruned.max()
    tied = (w.abs() == cut).flatten().nonzero().flatten()
    tied_pruned = (~mask).flatten()[tied]
    assert torch.equal(tied_pruned, tied_pruned.sort(descending=True).values)
