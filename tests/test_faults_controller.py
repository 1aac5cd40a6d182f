"""Faults around the controller's state and the tensors it masks (issue 10, points 1-3, 7, 8, 10).

Each test failed on the v1 controller: damaged states were applied, a changed configuration was
silently kept, replaced parameters stayed dense, writes through ``.data`` survived ``squash`` and an
Adam step after ``squash`` revived every pruned weight.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import nn

import sparsity_core as sc


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def saved_state(**args: Any) -> dict[str, Any]:
    c = sc.SparsityController(mlp(), "magnitude", {"sparsity_level": 0.5, **args})
    c.step()
    buffer = io.BytesIO()
    torch.save(c.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def damaged(change: str) -> dict[str, Any]:
    state = saved_state()
    masks, levels = dict(state["masks"]), dict(state["levels"])
    if change == "all-False mask":
        masks["0.weight"] = torch.zeros_like(masks["0.weight"])
    elif change == "missing mask":
        del masks["2.weight"]
    elif change == "mask as list":
        masks["0.weight"] = masks["0.weight"].tolist()
    elif change == "mask None":
        masks["0.weight"] = None
    elif change == "level not a number":
        levels["0.weight"] = "half"
    elif change == "level a bool":
        levels["0.weight"] = True
    elif change == "no levels":
        return {k: v for k, v in state.items() if k != "levels"}
    elif change == "float mask":
        masks["0.weight"] = masks["0.weight"].float()
    return {**state, "masks": masks, "levels": levels}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("all-False mask", r"mask of '0.weight' prunes 2048 elements, but 1024 were pruned"),
        ("missing mask", r"no mask for covered tensor '2.weight', whose saved level is 0.5"),
        ("mask as list", r"mask of '0.weight' is a list, not a packed uint8 tensor"),
        ("mask None", r"mask of '0.weight' is None"),
        ("level not a number", r"level of '0.weight' must be a number in \[0, 1\], got 'half'"),
        ("level a bool", r"level of '0.weight' must be a number in \[0, 1\], got True"),
        ("no levels", r"missing \['levels'\]"),
        ("float mask", r"mask of '0.weight' has dtype torch.float32, not torch.uint8 \(packed, 8 elements a byte\) or torch.bool"),
    ],
)
def test_a_damaged_state_is_refused_whole_before_anything_is_applied(change: str, message: str) -> None:
    model = mlp(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = sc.SparsityController(model, "magnitude", {"sparsity_level": 0.5})
    with pytest.raises(ValueError, match=message) as exc:
        c.load_state_dict(damaged(change))
    assert "sparsity state" in str(exc.value)
    assert c.masks == {} and c.t is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a refused state changed weights"


@pytest.mark.parametrize(
    ("saved", "now", "changed"),
    [
        ({}, {"pattern": "2:4"}, "pattern: 'unstructured' -> '2:4'"),
        ({}, {"scope": "global"}, "scope: 'layer' -> 'global'"),
        ({}, {"exclude": ["2.*"]}, "covered tensors"),
        ({}, {"overrides": {"2.*": {"sparsity_level": 0.1}}}, "overrides"),
    ],
)
def test_resume_under_another_configuration_says_which_field_changed(saved: dict, now: dict, changed: str) -> None:
    state = saved_state(**saved)
    level = {} if now.get("pattern") == "2:4" else {"sparsity_level": 0.5}
    c = sc.SparsityController(mlp(), "magnitude", {**level, **now})
    with pytest.raises(ValueError, match="saved under another configuration") as exc:
        c.load_state_dict(state)
    assert changed in str(exc.value)


def test_a_level_change_alone_resumes() -> None:
    state = saved_state()
    c = sc.SparsityController(mlp(), "magnitude", {"sparsity_level": 0.8})
    c.load_state_dict(state)  # the schedule brings the new level at the next update
    c.step()
    assert c.report().overall == pytest.approx(0.8, abs=1e-3)


def test_masks_follow_a_parameter_replaced_by_a_new_object() -> None:
    model = mlp()
    c = sc.SparsityController(model, "magnitude", {"sparsity_level": 0.5})
    c.step()
    # load_state_dict(assign=True) and attribute assignment both put new objects in place
    model.load_state_dict({k: v.clone() + 1.0 for k, v in model.state_dict().items()}, assign=True)
    model[2].weight = nn.Parameter(torch.randn(10, 64))
    c.apply_masks()
    report = c.report()
    for name in ("0.weight", "2.weight"):
        live = model.get_parameter(name)
        assert c.tensors[name] is live
        assert report[name] == pytest.approx(0.5)
        assert bool((live[~c.masks[name]] == 0).all())


def test_a_replacement_of_another_shape_is_an_error_naming_it() -> None:
    model = mlp()
    c = sc.SparsityController(model, "magnitude", {"sparsity_level": 0.5})
    c.step()
    model[2].weight = nn.Parameter(torch.randn(12, 64))
    with pytest.raises(ValueError, match=r"'2.weight' was replaced by a tensor of shape \(12, 64\)"):
        c.apply_masks()


def test_squash_zeroes_pruned_positions_written_through_data() -> None:
    model = nn.Linear(512, 512)
    c = sc.SparsityController(model, "magnitude", {"sparsity_level": 0.5})
    c.step()
    pruned = (~c.masks["weight"]).nonzero()[:3]
    for i, j in pruned.tolist():
        model.weight.data[i, j] = 1.0  # .data writes bump no version counter
    mask = c.masks["weight"]
    c.squash()
    assert bool((model.weight[~mask] == 0).all())


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam", "adamw"])
def test_optimizer_state_of_pruned_entries_is_zeroed(optimizer: str) -> None:
    model = mlp()
    opt = {
        "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        "adam": lambda p: torch.optim.Adam(p, lr=0.01),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
    }[optimizer](model.parameters())
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    for _ in range(3):  # build up momentum while dense
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    c = sc.SparsityController(model, "magnitude", {"sparsity_level": 0.5})
    c.attach(opt)
    c.step()
    mask = c.masks["0.weight"]
    c.squash()
    # a step with a zero gradient: nothing but the optimizer's state moves the weights
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert bool((model[0].weight[~mask] == 0).all()), "the optimizer's state revived pruned weights"


def test_load_state_dict_zeroes_the_optimizer_state_too() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    nn.functional.mse_loss(model(torch.randn(4, 32)), torch.randn(4, 10)).backward()
    opt.step()
    c = sc.SparsityController(model, "magnitude", {"sparsity_level": 0.5})
    c.attach(opt)
    c.load_state_dict(saved_state())
    exp_avg = opt.state[model[0].weight]["exp_avg"]
    assert bool((exp_avg[~c.masks["0.weight"]] == 0).all())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: nn.Sequential(nn.LazyLinear(4)), r"'0.weight' is a lazy parameter that is not initialised yet: run one forward"),
        (lambda: nn.Sequential(nn.Linear(4, 4, device="meta")), r"'0.weight' is on the meta device .* materialise"),
        (lambda: {"w": torch.ones(4, 4, dtype=torch.bool)}, r"'w' has dtype torch.bool: masks are made for floating-point"),
        (lambda: {"w": torch.ones(4, 4, dtype=torch.int64)}, r"'w' has dtype torch.int64"),
    ],
)
def test_tensors_no_mask_can_be_made_for_are_refused_with_what_to_do(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sc.SparsityController(make(), "magnitude", {"sparsity_level": 0.5})


def test_a_replicated_dtensor_is_refused_naming_the_tensor_and_the_rule() -> None:
    # rows split by FSDP2 (Shard(0)) are supported: tests/test_sharded.py
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29581", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        replicated = distribute_tensor(torch.randn(8, 8), mesh, [Replicate()])
        with pytest.raises(ValueError, match=r"'w' is a DTensor with placements \(Replicate\(\),\).*only rows split"):
            sc.SparsityController({"w": replicated}, "magnitude", {"sparsity_level": 0.5})
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("_fsdp_flattened", r"'0.weight' is managed by FSDP1 \(FullyShardedDataParallel\): each rank holds a flat fragment"),
        ("_is_flat_param", r"'0.weight' is managed by FSDP1"),
        ("ds_id", r"'0.weight' is a DeepSpeed ZeRO partition"),
    ],
)
def test_fragments_of_fsdp1_and_deepspeed_are_refused_naming_the_strategy(marker: str, message: str) -> None:
    # FSDP1 and DeepSpeed cannot run on this CPU machine: their parameters are marked as they mark them
    model = mlp()
    setattr(model[0].weight, marker, True)
    with pytest.raises(ValueError, match=message):
        sc.SparsityController(model, "magnitude", {"sparsity_level": 0.5})
