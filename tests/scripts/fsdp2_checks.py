"""Raw FSDP2 (``fully_shard``) on 2 CPU processes (gloo): many checks in one launch. Each rank
writes OUT_DIR/rank<N>.json mapping each check to True or to what went wrong.
Run: python fsdp2_checks.py OUT_DIR

Every check compares a controller on the sharded model with one process on the gathered weights
(``full_tensor()``): the local masks must be that process's masks' rows of this rank."""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2


def model(seed: int = 0) -> nn.Sequential:
    # 7 rows: 4 and 3 per rank (uneven); 1 row: rank 1 holds none (an empty shard); in=7: a ragged N:M
    # tail; two 12 x 12 layers: same-shaped DTensors are separate tensors, not tied ones
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 7), nn.ReLU(), nn.Linear(7, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12),
        nn.ReLU(), nn.Linear(12, 1),
    )


def sharded(seed: int = 0) -> nn.Sequential:
    from torch.distributed.fsdp import fully_shard

    m = model(seed)
    for layer in m:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(m)
    return m


def gathered(m: nn.Module) -> nn.Sequential:
    """One process's copy of the sharded model, from the gathered weights."""
    plain = model()
    with torch.no_grad():
        for (name, p), (_, q) in zip(m.named_parameters(), plain.named_parameters()):
            q.copy_(p.full_tensor())
    return plain


def rows_match(c: Any, plain: Any) -> bool | str:
    """Whether each local mask is this rank's rows of the one-process mask."""
    for name, mask in plain.masks.items():
        s = c.shards[name]
        mine = c.masks[name]
        whole_rows = mask[s.shard.offset : s.shard.offset + s.rows]
        if not torch.equal(mine, whole_rows):
            return f"{name}: {int((mine != whole_rows).sum())} of {mine.numel()} local mask elements differ"
    return True


def same_masks_as_one_process(sparsifier: str, args: dict[str, Any]) -> Callable[[], bool | str]:
    def check() -> bool | str:
        import sparsity_core as sc

        m = sharded()
        c = sc.SparsityController(m, sparsifier, args, "linear", {"end": 2})
        plain = sc.SparsityController(gathered(m), sparsifier, args, "linear", {"end": 2})
        for t in (1, 2):  # gradual: the second update keeps the first one's pruned weights pruned
            c.step(t)
            plain.step(t)
            ok = rows_match(c, plain)
            if ok is not True:
                return f"t={t}: {ok}"
        if dict(c.report()) != dict(plain.report()):
            return f"report {dict(c.report())} != one process {dict(plain.report())}"
        return True

    return check


def masks_survive_adamw() -> bool | str:
    import sparsity_core as sc

    m = sharded()
    opt = torch.optim.AdamW(m.parameters(), lr=0.05)
    c = sc.SparsityController(m, "magnitude", {"sparsity_level": 0.5, "pattern": "2:4"})
    c.attach(opt)
    c.step()
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(4):
        opt.zero_grad()
        m(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
        opt.step()
    for name, mask in c.masks.items():
        local = c.local(name)
        if int((local[~mask] != 0).sum()):
            return f"{name}: pruned weights revived by AdamW"
        if int(mask.numel()) and not bool((local[mask] != 0).any()):
            return f"{name}: kept weights did not train"
    # the parameter itself (what forward gathers) carries the zeros
    full = m[0].weight.full_tensor()
    if int((full == 0).sum()) != full.numel() // 2:
        return f"0.weight gathered has {int((full == 0).sum())} zeros, not {full.numel() // 2}"
    return True


def state_round_trips() -> bool | str:
    import sparsity_core as sc
    from sparsity_core._bits import PackedMask

    m = sharded()
    args = {"sparsity_level": 0.5, "pattern": "2:4"}
    c = sc.SparsityController(m, "magnitude", args)
    c.step()
    state = c.state_dict()  # a collective: every rank gets the whole masks
    plain = sc.SparsityController(gathered(m), "magnitude", args)
    plain.step()
    for name, mask in plain.masks.items():
        if not torch.equal(PackedMask(state["masks"][name], state["shapes"][name]).to_bool(), mask):
            return f"{name}: the gathered state is not the one-process mask"
        if state["pruned"][name] != int((~mask).sum()):
            return f"{name}: pruned count {state['pruned'][name]} is not the global one"
    # rank 0's state (what Lightning saves) restores every rank's rows
    obj = [state if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(obj, src=0)
    other = sharded(seed=1)
    fresh = sc.SparsityController(other, "magnitude", args)
    fresh.load_state_dict(obj[0])
    ok = rows_match(fresh, plain)
    if ok is not True:
        return ok
    for name, mask in fresh.masks.items():
        if int((fresh.local(name)[~mask] != 0).sum()):
            return f"{name}: restored mask not applied"
    return True


def fsdp1_refused() -> bool | str:
    import sparsity_core as sc

    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrapped = FSDP(model(), use_orig_params=True, device_id=torch.device("cpu"))
    except Exception as e:  # noqa: BLE001 - FSDP1 may not run on CPU
        return f"FSDP1 did not run on CPU: {type(e).__name__}: {e}"
    try:
        sc.SparsityController(wrapped, "magnitude", {"sparsity_level": 0.5})
    except ValueError as e:
        said = str(e)
        wanted = ("managed by FSDP1 (FullyShardedDataParallel)", "use FSDP2")
        return True if all(w in said for w in wanted) else f"unclear error: {said}"
    return "FSDP1 parameters were accepted"


def offsets_are_dtensors_own() -> bool | str:
    import sparsity_core as sc
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    m = sharded()
    c = sc.SparsityController(m, "magnitude", {"include": ["*"]})
    for name, s in c.shards.items():
        p = c.tensors[name]
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        if (s.rows, *p.shape[1:]) != tuple(shape) or s.shard.offset != offset[0]:
            return f"{name}: rows {s.rows} at {s.shard.offset}, DTensor says {shape} at {offset}"
    expected = {0: {"0.weight": 4, "8.weight": 1}, 1: {"0.weight": 3, "8.weight": 0}}[dist.get_rank()]
    if {n: c.shards[n].rows for n in expected} != expected:
        return f"rows {({n: c.shards[n].rows for n in expected})}, expected {expected}"
    if len(c.tensors) != 10 or any(len(a) > 1 for a in c.aliases.values()):
        return f"covered {sorted(c.tensors)} with aliases {c.aliases}: same-shaped layers taken as tied"
    return True


def random_scores_are_the_slice_of_the_whole_draw() -> bool | str:
    """Whatever the selection, the scores random gives a rank's rows are those rows of the scores
    of the whole tensor (drawn by global index)."""
    import sparsity_core as sc
    from sparsity_core._contract import MaskContext
    from sparsity_core._shards import Shards

    m = sharded()
    c = sc.SparsityController(m, "random", {"seed": 5, "include": ["*"]})
    plain = gathered(m)
    whole = dict(plain.named_parameters())
    for name, s in c.shards.items():
        with c.sparsifier._scoring(MaskContext(shards=Shards(c.comm, {name: s.shard}))):
            mine = c.sparsifier.score(name, c.local(name))
        rows = c.sparsifier.score(name, whole[name].detach())[s.shard.offset : s.shard.offset + s.rows]
        if not torch.equal(mine, rows):
            return f"{name}: random scores of this rank's rows differ from the whole draw's rows"
    return True


def one_shot_sparsify() -> bool | str:
    """``sparsify`` (one shot) on the sharded model: the masks squashed into each rank's rows, the
    report global."""
    import sparsity_core as sc

    m = sharded()
    args = {"sparsity_level": 0.5, "pattern": "2:4"}
    expected = sc.sparsify(gathered(m), "magnitude", args)
    report = sc.sparsify(m, "magnitude", args)
    if dict(report) != dict(expected) or [r.shape for r in report.rows] != [r.shape for r in expected.rows]:
        return f"report {dict(report)} != one process {dict(expected)}"
    full = m[0].weight.full_tensor()
    if int((full == 0).sum()) != full.numel() // 2:
        return f"0.weight gathered has {int((full == 0).sum())} zeros, not {full.numel() // 2}"
    return True


CHECKS: dict[str, Callable[[], bool | str]] = {
    "sparsify": one_shot_sparsify,
    "random_scores": random_scores_are_the_slice_of_the_whole_draw,
    "offsets": offsets_are_dtensors_own,
    "nm_2_4": same_masks_as_one_process("magnitude", {"sparsity_level": 0.5, "pattern": "2:4"}),
    "nm_2_4_random": same_masks_as_one_process("random", {"sparsity_level": 0.5, "pattern": "2:4", "seed": 3}),
    "unstructured_layer": same_masks_as_one_process("magnitude", {"sparsity_level": 0.6}),
    "unstructured_global": same_masks_as_one_process("magnitude", {"sparsity_level": 0.6, "scope": "global"}),
    "channel": same_masks_as_one_process("magnitude", {"sparsity_level": 0.5, "pattern": "channel"}),
    "random_layer": same_masks_as_one_process("random", {"sparsity_level": 0.7, "seed": 11}),
    "adamw": masks_survive_adamw,
    "state": state_round_trips,
    "fsdp1_refused": fsdp1_refused,
}


def work(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results: dict[str, Any] = {}
    try:
        for name, check in CHECKS.items():
            try:
                results[name] = check()
            except Exception:  # noqa: BLE001 - reported per check
                results[name] = traceback.format_exc(limit=4)
                print(rank, results[name], flush=True, file=sys.stderr)
            dist.barrier()  # a failed check must not leave the other rank inside a collective
    finally:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    mp.spawn(work, args=(free_port(), sys.argv[1]), nprocs=WORLD)
