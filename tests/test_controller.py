"""SparsityController: schedule, masks that hold through training, exact state round-trip."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from sparsity_core import SparsityController


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int = 3) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(16, 20)).square().mean().backward()
        opt.step()


def test_step_follows_the_schedule_and_recomputes_only_on_change():
    model = mlp()
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.8}, "linear", {"start": 0, "end": 4})
    assert list(c.tensors) == ["0.weight", "2.weight"]
    assert c.step(0) is False  # level 0: nothing to do
    assert c.step(2) is True and c.levels["0.weight"] == pytest.approx(0.4)
    assert c.step(2) is False
    assert c.report()["0.weight"] == pytest.approx(0.4, abs=1e-3)
    assert c.step() is True and c.t == 4.0  # default: the end of the schedule
    assert c.report()["0.weight"] == pytest.approx(0.8, abs=1e-3)


def test_masks_are_bool_views_free_and_weights_are_not_copied():
    model = mlp()
    weight = model[0].weight
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.5})
    c.step()
    assert c.tensors["0.weight"] is weight
    assert all(m.dtype == torch.bool and m.shape == c.tensors[n].shape for n, m in c.masks.items())


def test_masks_hold_after_optimizer_steps_when_attached():
    model = mlp()
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.7})
    c.step()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    handle = c.attach(opt)
    train_steps(model, opt)
    for name, mask in c.masks.items():
        assert (c.tensors[name][~mask] == 0).all()
    handle.remove()
    train_steps(model, opt)
    assert (c.tensors["0.weight"][~c.masks["0.weight"]] != 0).any()  # detached: Adam revives them
    c.apply_masks()  # the explicit call
    assert (c.tensors["0.weight"][~c.masks["0.weight"]] == 0).all()


def test_bf16_weights_and_non_cpu_fallback_path_apply():
    model = mlp().to(torch.bfloat16)
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.5})
    c.step()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    c.apply_masks()
    assert (model[0].weight[~c.masks["0.weight"]] == 0).all()


def test_squash_keeps_zeros_and_drops_masks_and_hooks():
    model = mlp()
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.6})
    c.step()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    c.attach(opt)
    c.squash()
    assert c.masks == {} and c._hooks == []
    assert c.report()["0.weight"] == pytest.approx(0.6, abs=1e-3)


def test_state_round_trips_through_torch_save_weights_only():
    model = mlp()
    c = SparsityController(model, "random", {"sparsity_level": 0.5, "seed": 1}, "cubic", {"end": 10})
    c.step(5)
    buf = io.BytesIO()
    torch.save(c.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh_model = mlp()
    fresh = SparsityController(fresh_model, "random", {"sparsity_level": 0.5, "seed": 1}, "cubic", {"end": 10})
    fresh.load_state_dict(state)
    assert fresh.t == 5.0 and fresh.levels == c.levels
    assert fresh.masks.keys() == c.masks.keys()
    assert all(torch.equal(fresh.masks[n], c.masks[n]) for n in c.masks)
    assert all((fresh.tensors[n][~m] == 0).all() for n, m in fresh.masks.items())  # applied
    assert fresh.step(5) is False  # resumed exactly: no recompute at the same position


def test_load_state_rejects_foreign_names_and_shapes():
    c = SparsityController(mlp(), "magnitude")
    c.step()
    state = c.state_dict()
    with pytest.raises(ValueError, match="does not cover"):
        c.load_state_dict({**state, "masks": {"nope": torch.ones(2, dtype=torch.bool)}})
    with pytest.raises(ValueError, match="has shape"):
        c.load_state_dict({**state, "masks": {"0.weight": torch.ones(2, dtype=torch.bool)}})


def test_a_mapping_of_tensors_is_a_target():
    tensors = {"a": torch.randn(40, 40), "b": torch.randn(100)}
    c = SparsityController(tensors, "data_norm", {"sparsity_level": 0.5})
    c.step()
    assert c.report().overall == pytest.approx(0.5, abs=0.02)


def test_squash_after_step_skips_only_tensors_still_masked():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.5})
    c.step()
    masks = dict(c.masks)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # a tracked write: the version counter moves
        model[1].weight.detach().numpy()[...] += 1.0  # an untracked write: the spot check sees it
    c.squash()
    for layer, mask in zip(model, masks.values()):
        assert not layer.weight[~mask].any()


def test_fused_update_matches_compute_then_apply():
    torch.manual_seed(0)
    for args in ({"pattern": "2:4"}, {"sparsity_level": 0.7, "scope": "global"}, {"sparsity_level": 0.6, "pattern": "2x2"}):
        a = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.Linear(40, 30))
        b = copy.deepcopy(a)
        c = SparsityController(a, "magnitude", args)
        c.step()
        expected = c.sparsifier.compute_masks({n: p for n, p in b.named_parameters() if n in c.tensors}, c.levels)
        for (name, mask), pb in zip(c.masks.items(), (b[0].weight, b[1].weight)):
            assert torch.equal(mask, expected[name])
            assert torch.equal(c.tensors[name], pb * expected[name])
    dn = torch.nn.Sequential(torch.nn.Linear(30, 22))
    ref = copy.deepcopy(dn)
    c = SparsityController(dn, "data_norm", {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "zeros_per_block": 2})
    c.step()
    mask = c.masks["0.weight"]
    assert torch.equal(dn[0].weight, ref[0].weight * mask)


def test_all_true_masks_cost_no_pass():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.0})
    c.update_masks()
    assert c.masks["0.weight"].all()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    c.apply_masks()
    assert (model[0].weight == 1.0).all()
