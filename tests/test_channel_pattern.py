"""pattern='channel': whole rows of each tensor's matrix view (output channels / filters) are kept or
pruned, per layer and in global scope, as close to the level as whole channels allow, with the
built-in score sparsifiers, through ``sparsify()``, ``SparsityController`` and ``compute_masks``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsity_core import MaskContext, SparsityController, create_sparsifier, sparsify
from sparsity_core._layers import layout_of
from sparsity_core._targets import select_tensors


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 10), nn.ReLU(), nn.Linear(10, 6), nn.Unflatten(1, (1, 2, 3)), nn.Conv2d(1, 7, 3, padding=1))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.endswith("weight")}


def _zero_rows(t: torch.Tensor, output_axis: int = 0) -> list[int]:
    """Indices of the output channels of ``t`` that are entirely zero; asserts no channel is partly zero."""
    rows = t.detach().movedim(output_axis, 0).reshape(t.shape[output_axis], -1)
    zero = (rows == 0).all(1)
    partly = (rows == 0).any(1) & ~zero
    assert not bool(partly.any()), f"channels {partly.nonzero().view(-1).tolist()} are partly pruned"
    return zero.nonzero().view(-1).tolist()


def _lowest_rows(score: torch.Tensor, k: int) -> list[int]:
    """The ``k`` rows of lowest mean score (the engine's unit score for a channel)."""
    return sorted(score.reshape(score.shape[0], -1).float().mean(1).argsort()[:k].tolist())


def _score(sparsifier_name: str, name: str, tensor: torch.Tensor) -> torch.Tensor:
    return create_sparsifier(sparsifier_name).score(name, tensor.detach())


# -- per layer ----------------------------------------------------------------------------------
# 10, 6 and 7 output channels: at 0.33 -> 3.3, 1.98, 2.31 -> 3, 2, 2 channels;
# at 0.47 -> 4.7, 2.82, 3.29 -> 5, 3, 3 channels.
PER_LAYER = {0.33: {"0.weight": 3, "2.weight": 2, "4.weight": 2}, 0.47: {"0.weight": 5, "2.weight": 3, "4.weight": 3}}


@pytest.mark.parametrize("name", ["magnitude", "random"])
@pytest.mark.parametrize("level", sorted(PER_LAYER))
def test_layer_scope_prunes_the_closest_whole_number_of_channels(name: str, level: float) -> None:
    model = _model()
    dense = {n: t.detach().clone() for n, t in _weights(model).items()}
    report = sparsify(model, name, {"pattern": "channel", "scope": "layer", "sparsity_level": level})
    for tensor_name, tensor in _weights(model).items():
        expected = PER_LAYER[level][tensor_name]
        pruned = _zero_rows(tensor)
        assert len(pruned) == expected, (tensor_name, pruned)
        # the channels of lowest mean score (for magnitude: mean |w|) go, the others are untouched
        assert pruned == _lowest_rows(_score(name, tensor_name, dense[tensor_name]), expected)
        kept = [i for i in range(tensor.shape[0]) if i not in pruned]
        assert torch.equal(tensor.detach()[kept], dense[tensor_name][kept])
        rows = tensor.shape[0]
        assert report[tensor_name] == pytest.approx(expected / rows)
    # biases are not covered
    assert all(bool((p != 0).all()) for n, p in model.named_parameters() if n.endswith("bias"))


def test_conv_filters_are_pruned_whole() -> None:
    """A Conv2d's channel is a filter: weight[i] over (in, kh, kw), all zero or all kept."""
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 9, 3)
    dense = conv.weight.detach().clone()
    sparsify(conv, "magnitude", {"pattern": "channel", "sparsity_level": 0.5})
    # 9 filters at 0.5: 4.5 -> 4 (round half to even; 4 and 5 are equally close)
    pruned = _zero_rows(conv.weight)
    assert pruned == _lowest_rows(dense.abs(), 4)
    assert int((conv.weight == 0).sum()) == 4 * 4 * 3 * 3


def test_levels_zero_and_one() -> None:
    for level, expected in ((0.0, 0), (1.0, 10)):
        for scope in ("layer", "global"):
            model = _model()
            sparsify(model, "magnitude", {"pattern": "channel", "scope": scope, "sparsity_level": level})
            assert len(_zero_rows(model[0].weight)) == expected


# -- global scope --------------------------------------------------------------------------------
def _constant_rows() -> nn.ModuleDict:
    """Channels of known mean |w|: a (4 rows of 4: 1, 5, 9, 13), b (3 rows of 8: 2, 6, 10) and c
    (2 filters of 2x3x3 = 18: 3, 7)."""
    model = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(8, 3), "c": nn.Conv2d(2, 2, 3)})
    with torch.no_grad():
        for key, values in (("a", [1, 5, 9, 13]), ("b", [2, 6, 10]), ("c", [3, 7])):
            w = model[key].weight
            w.copy_(torch.tensor(values, dtype=w.dtype).view(-1, *[1] * (w.dim() - 1)).expand_as(w))
    return model


@pytest.mark.parametrize(
    ("level", "pruned"),
    [
        # total 16 + 24 + 36 = 76 elements; rows by mean |w|: a0 (1, 4), b0 (2, 8), c0 (3, 18), a1 (5, 4),
        # b1 (6, 8), c1 (7, 18), ...; cumulative 4, 12, 30, 34, 42, 60.
        (0.4, {"a.weight": [0], "b.weight": [0], "c.weight": [0]}),  # target 30.4: 30
        (0.6, {"a.weight": [0, 1], "b.weight": [0, 1], "c.weight": [0]}),  # target 45.6: 42 (60 is 14.4 away)
        (0.1, {"a.weight": [0], "b.weight": [], "c.weight": []}),  # target 7.6: 4 (12 is 4.4 away)
    ],
)
def test_global_scope_one_ranking_of_channels_across_layers(level: float, pruned: dict[str, list[int]]) -> None:
    model = _constant_rows()
    sizes = {n: t[0].numel() for n, t in _weights(model).items()}
    report = sparsify(model, "magnitude", {"pattern": "channel", "scope": "global", "sparsity_level": level})
    got = {n: _zero_rows(t) for n, t in _weights(model).items()}
    assert got == pruned
    assert round(report.overall * report.numel) == sum(len(rows) * sizes[n] for n, rows in pruned.items())


def _reference_global(tensors: dict[str, torch.Tensor], scores: dict[str, torch.Tensor], level: float) -> dict[str, list[int]]:
    """All rows of all tensors ranked by mean score; the prefix whose size is closest to the target."""
    rows = []
    for name, score in scores.items():
        means = score.reshape(score.shape[0], -1).float().mean(1)
        rows += [(float(means[i]), name, i, tensors[name][0].numel()) for i in range(score.shape[0])]
    rows.sort(key=lambda r: r[0])
    target = level * sum(t.numel() for t in tensors.values())
    cum, best, best_k = 0, abs(target), 0
    for k, row in enumerate(rows, 1):
        cum += row[3]
        if abs(cum - target) < best:
            best, best_k = abs(cum - target), k
    out: dict[str, list[int]] = {n: [] for n in tensors}
    for _, name, i, _ in rows[:best_k]:
        out[name].append(i)
    return {n: sorted(v) for n, v in out.items()}


@pytest.mark.parametrize("name", ["magnitude", "random"])
@pytest.mark.parametrize("level", [0.3, 0.55, 0.8])
def test_global_scope_matches_a_reference_ranking(name: str, level: float, path: str) -> None:
    """Many channels of three sizes (rows of 16, 24 and 36): exact and sampled-bracket selection
    (per-tensor caps off: the reference is one plain ranking)."""
    torch.manual_seed(2)
    model = nn.ModuleDict({"a": nn.Linear(16, 150), "b": nn.Linear(24, 120), "c": nn.Conv2d(4, 60, 3)})
    tensors = {n: t.detach().clone() for n, t in _weights(model).items()}
    expected = _reference_global(tensors, {n: _score(name, n, t) for n, t in tensors.items()}, level)
    sparsify(model, name, {"pattern": "channel", "scope": "global", "sparsity_level": level, "max_level_per_tensor": 1.0})
    assert {n: _zero_rows(t) for n, t in _weights(model).items()} == expected


def test_global_channels_beside_a_dense_head() -> None:
    """exclude keeps the head dense; the others share one ranking."""
    model = _constant_rows()
    sparsify(model, "magnitude", {"pattern": "channel", "scope": "global", "sparsity_level": 0.5, "exclude": ["c.weight"]})
    # a (16) and b (24): target 20; rows a0 (4), b0 (8), a1 (4), b1 (8): cumulative 4, 12, 16, 24: 16 and 24 are
    # equally close (4): the first, 16, is taken
    assert {n: _zero_rows(t) for n, t in _weights(model).items()} == {"a.weight": [0, 1], "b.weight": [0], "c.weight": []}


def test_overrides_choose_channels_for_one_layer() -> None:
    model = _model()
    sparsify(model, "magnitude", {"sparsity_level": 0.5, "overrides": {"4.weight": {"pattern": "channel"}}})
    assert _zero_rows(model[4].weight) == _lowest_rows(_model()[4].weight.abs(), round(0.5 * 7))
    # the other layers stay unstructured: half of the elements, no whole channel
    assert int((model[0].weight == 0).sum()) == 160 and not bool((model[0].weight == 0).all(1).any())


# -- SparsityController ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["magnitude", "random"])
def test_gradual_channels_in_a_controller_are_nested_and_exact(name: str) -> None:
    model = _model()
    dense = {n: t.detach().clone() for n, t in _weights(model).items()}
    controller = SparsityController(
        model, name, {"pattern": "channel", "sparsity_level": 0.6}, "linear", {"start": 0, "end": 4}
    )
    before: dict[str, set[int]] = {n: set() for n in dense}
    for t in range(5):
        controller.step(t)
        level = controller.levels["0.weight"]
        for tensor_name, tensor in _weights(model).items():
            pruned = set(_zero_rows(tensor))
            rows = tensor.shape[0]
            # 0, 0.15, 0.3, 0.45, 0.6 of 10, 6 and 7 channels
            assert len(pruned) == round(level * rows), (t, tensor_name, level)
            assert pruned == set(_lowest_rows(_score(name, tensor_name, dense[tensor_name]), len(pruned)))
            assert before[tensor_name] <= pruned, "a pruned channel came back"
            # the mask agrees with the weights: every pruned position is zero, and no other
            mask = controller.masks.get(tensor_name)
            if mask is None:  # level 0: no mask yet
                assert t == 0 and not pruned
            else:
                assert set((~mask).reshape(rows, -1).all(1).nonzero().view(-1).tolist()) == pruned
                assert int((~mask).sum()) == len(pruned) * mask[0].numel()
            before[tensor_name] = pruned
    assert [len(before[n]) for n in ("0.weight", "2.weight", "4.weight")] == [6, 4, 4]
    controller.squash()
    report = controller.report()
    assert round(report.overall * report.numel) == 6 * 32 + 4 * 10 + 4 * 9


def test_controller_state_roundtrip_keeps_channels() -> None:
    model = _model()
    controller = SparsityController(model, "magnitude", {"pattern": "channel", "sparsity_level": 0.5})
    controller.step()
    fresh = _model()
    restored = SparsityController(fresh, "magnitude", {"pattern": "channel", "sparsity_level": 0.5})
    restored.load_state_dict(controller.state_dict())
    assert {n: _zero_rows(t) for n, t in _weights(fresh).items()} == {n: _zero_rows(t) for n, t in _weights(model).items()}


# -- compute_masks with a MaskContext (layouts and current masks) --------------------------------
def test_nested_policy_keeps_pruned_channels_and_meets_the_level() -> None:
    """A channel pruned earlier stays pruned, even the most important one, and the level is still
    met in whole channels: the rest of the budget goes to the lowest-scoring channels."""
    torch.manual_seed(3)
    layer = nn.Linear(32, 10)
    w = layer.weight.detach()
    sparsifier = create_sparsifier("magnitude", {"pattern": "channel"})
    layouts = select_tensors(layer, sparsifier).layouts
    ascending = w.abs().mean(1).argsort().tolist()
    top, second = ascending[-1], ascending[-2]
    current = torch.ones_like(w, dtype=torch.bool)
    current[top] = False  # the most important channel, pruned before
    current[second, :3] = False  # and a few elements of the next one (an earlier unstructured mask)
    masks = sparsifier.compute_masks({"weight": w}, {"weight": 0.3}, MaskContext({"weight": current}, layouts))
    pruned = set((~masks["weight"]).all(1).nonzero().view(-1).tolist())
    assert not bool(((~masks["weight"]).any(1) & masks["weight"].any(1)).any())
    # 3 channels: the two pruned (wholly or partly) before, then the lowest-scoring one
    assert pruned == {top, second, ascending[0]}
    # a level below what is already pruned keeps what is pruned (4 whole channels)
    current = torch.ones_like(w, dtype=torch.bool)
    current[[top, *ascending[:3]]] = False
    masks = sparsifier.compute_masks({"weight": w}, {"weight": 0.3}, MaskContext({"weight": current}, layouts))
    assert set((~masks["weight"]).all(1).nonzero().view(-1).tolist()) == {top, *ascending[:3]}


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("pattern", ["channel", "1x4"])
def test_nested_policy_never_revives_a_partly_pruned_unit(pattern: str, scope: str) -> None:
    """Units (channels, blocks) holding any currently pruned element are pruned whole, even when
    the elements pruned so far are fewer than one unit each: a level of 0 keeps what is pruned."""
    torch.manual_seed(3)
    w = torch.randn(10, 32)
    sparsifier = create_sparsifier("magnitude", {"pattern": pattern, "scope": scope})
    current = torch.ones_like(w, dtype=torch.bool)
    current[:4] = False  # 4 whole channels
    current[9, [0, 4, 8]] = False  # and 3 elements of a fifth (1 channel; 3 blocks of 1x4)
    masks = sparsifier.compute_masks({"w": w}, {"w": 0.0}, MaskContext({"w": current}, {}))
    revived = int((masks["w"] & ~current).sum())
    assert revived == 0, f"{revived} weights pruned before are kept again"


def test_conv_transpose_channels_are_its_outputs_given_its_layout() -> None:
    """ConvTranspose2d stores [in, out, kh, kw]: a channel is weight[:, j] (its output axis is 1)."""
    torch.manual_seed(4)
    layer = nn.ConvTranspose2d(3, 8, 2)
    w = layer.weight.detach()
    sparsifier = create_sparsifier("magnitude", {"pattern": "channel", "sparsity_level": 0.5})
    layouts = select_tensors(layer, sparsifier).layouts
    assert layouts["weight"] == layout_of(layer, "weight") and layouts["weight"].output_axis == 1
    masks = sparsifier.compute_masks({"weight": w}, {"weight": 0.5}, MaskContext({}, layouts))
    pruned = w.masked_fill(~masks["weight"], 0)
    assert _zero_rows(pruned, output_axis=1) == _lowest_rows(w.abs().movedim(1, 0), 4)


def test_sparsify_prunes_conv_transpose_output_channels() -> None:
    """Through sparsify(): the controller passes each tensor's layout (contract v2's MaskContext)."""
    torch.manual_seed(4)
    layer = nn.ConvTranspose2d(3, 8, 2)
    dense = layer.weight.detach().clone()
    sparsify(layer, "magnitude", {"pattern": "channel", "sparsity_level": 0.5})
    assert _zero_rows(layer.weight, output_axis=1) == _lowest_rows(dense.abs().movedim(1, 0), 4)


def test_a_deep_copy_of_the_model_gets_the_same_channels() -> None:
    """Masks depend only on the weights (magnitude) or on the seed, names and shapes (random)."""
    for name in ("magnitude", "random"):
        a, b = _model(), copy.deepcopy(_model())
        for model in (a, b):
            sparsify(model, name, {"pattern": "channel", "scope": "global", "sparsity_level": 0.4})
        assert {n: _zero_rows(t) for n, t in _weights(a).items()} == {n: _zero_rows(t) for n, t in _weights(b).items()}
