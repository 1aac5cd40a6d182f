"""Sharded parameters (FSDP2, issue 11 points 3-4) in one process: where each rank's rows sit,
packed masks gathered over simulated ranks, refusals, and the controller on DTensors of a
one-process mesh (every code path but the split itself, which tests/test_sharded_2proc.py runs
on two real processes)."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
import torch.distributed as dist
from torch import nn

import sparsity_core as sc
from sparsity_core import _sharding
from sparsity_core._shards import Shard
from sparsity_core.builtin.sparsifiers import uniform_at

T = TypeVar("T")


# -- where the rows sit ------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_row_ranges_are_torch_chunk_and_dtensor_own_split(world: int) -> None:
    from torch.distributed.tensor import Shard as Placement
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

    for rows in range(0, 14):
        chunks = torch.arange(rows).chunk(world) if rows else ()
        ranges = [_sharding.row_range(rows, world, r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in rank order
        for rank, (start, end) in enumerate(ranges):
            piece = chunks[rank].tolist() if rank < len(chunks) else []
            assert list(range(start, end)) == piece, (rows, world, rank)
            shape, offset = _compute_local_shape_and_global_offset((rows, 3), (world,), [rank], [Placement(0)])
            assert shape == (end - start, 3) and offset[0] == start, (rows, world, rank)
    # uneven and empty shards occur: 5 rows over 4 ranks are 2, 2, 1, 0
    assert [_sharding.row_range(5, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 64, 1001])
def test_packed_bits_round_trip(n: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = _sharding.pack(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 8)
    assert torch.equal(_sharding.unpack(packed, n), mask)
    import numpy as np

    assert packed.numpy().tobytes() == np.packbits(mask.numpy()).tobytes()


# -- simulated ranks ---------------------------------------------------------------------------
class ThreadComm:
    """A Communicator over threads, one per simulated rank."""

    def __init__(self, rank: int, shared: dict[str, Any]) -> None:
        self.rank, self.world_size, self.shared = rank, shared["world"], shared

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = tensor.clone()
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        return self._exchange(tensor)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        parts = torch.stack(self._exchange(tensor))
        tensor.copy_({"sum": parts.sum(0), "min": parts.min(0).values, "max": parts.max(0).values}[op])
        return tensor


def on_ranks(world: int, work: Callable[[ThreadComm], T]) -> list[T]:
    shared: dict[str, Any] = {"world": world, "slots": [None] * world, "barrier": threading.Barrier(world, timeout=30)}
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = work(ThreadComm(rank, shared))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("world", [2, 3, 4])
def test_local_masks_are_gathered_whole_and_sliced_back_with_uneven_and_empty_shards(world: int) -> None:
    g = torch.Generator().manual_seed(world)
    shapes = [(5, 3), (1, 7), (9,), (4, 2, 3), (0, 4)]  # 5 rows over 4 ranks: 2, 2, 1, 0; (1, 7): empty shards
    whole = [torch.rand(s, generator=g) > 0.4 for s in shapes]

    def work(comm: ThreadComm) -> list[torch.Tensor]:
        parts = []
        for mask in whole:
            start, end = _sharding.row_range(mask.shape[0], world, comm.rank)
            sharded = _sharding.Sharded(Shard(mask.shape, start), end - start, mesh=None)
            parts.append((mask[start:end].clone(), sharded))
        gathered = _sharding.gather_rows(comm, parts, torch.device("cpu"))
        for got, (piece, sharded) in zip(gathered, parts):
            assert torch.equal(_sharding.rows_of(got, sharded), piece)
        return gathered

    for gathered in on_ranks(world, work):
        assert all(torch.equal(g_, w) for g_, w in zip(gathered, whole))


def test_random_scores_of_rows_are_the_slice_of_the_whole_draw() -> None:
    whole = uniform_at(1234, 0, 5 * 7)
    assert torch.equal(uniform_at(1234, 2 * 7, 3 * 7), whole[14:35])
    assert 0.0 <= float(whole.min()) and float(whole.max()) < 1.0
    big = uniform_at(99, 0, 1 << 20)
    assert abs(float(big.mean()) - 0.5) < 0.002 and big.unique().numel() > 0.95 * big.numel()
    # past 2**32 the stream goes on, different from its start
    assert not torch.equal(uniform_at(99, 1 << 32, 64), big[:64])
    # the NumPy kernel (CPU) and the torch one (accelerators) draw the same, across 2**32 too
    from sparsity_core._engine import kernels

    numpy_draws = [uniform_at(99, start, n) for start, n in ((0, 1000), ((1 << 32) - 100, 300), ((3 << 32) + 5, 50))]
    try:
        kernels.NUMPY_KERNELS = False
        torch_draws = [uniform_at(99, start, n) for start, n in ((0, 1000), ((1 << 32) - 100, 300), ((3 << 32) + 5, 50))]
    finally:
        kernels.NUMPY_KERNELS = True
    assert all(torch.equal(a, b) for a, b in zip(numpy_draws, torch_draws))
    assert torch.equal(numpy_draws[1][:100], uniform_at(99, (1 << 32) - 100, 100))

    sp = sc.create_sparsifier("random", {"seed": 5, "sparsity_level": 0.5})
    t = torch.randn(10, 6)
    full = sp.compute_masks({"w": t}, {"w": 0.5})["w"]
    assert int((~full).sum()) == 30
    rows = sp.score("w", t)
    from sparsity_core._contract import MaskContext
    from sparsity_core._shards import Shards

    # on 3 simulated ranks (rows 0:4, 4:8, 8:10), the scores each sees are its rows of the whole tensor's
    original = type(sp).score

    class Spy(type(sp)):  # type: ignore[misc]
        def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
            self.seen = original(self, name, tensor)
            return self.seen

    def work(comm: ThreadComm) -> tuple[int, int, Spy]:
        spy = Spy({"seed": 5, "sparsity_level": 0.5})
        start, end = _sharding.row_range(10, 3, comm.rank)
        context = MaskContext(shards=Shards(comm, {"w": Shard(torch.Size((10, 6)), start)}))
        spy.compute_masks({"w": t[start:end]}, {"w": 0.5}, context)
        return start, end, spy

    for start, end, spy in on_ranks(3, work):
        assert torch.equal(spy.seen, rows[start:end])
        assert spy.first_index("w") == 0  # the shards are forgotten after the call


# -- DTensors on a one-process mesh ------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    from torch.distributed.device_mesh import init_device_mesh

    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def sharded_mlp(mesh: Any, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The same MLP twice: plain, and with every parameter a DTensor sharded by rows."""
    from torch.distributed.tensor import Shard as Placement
    from torch.distributed.tensor import distribute_tensor

    torch.manual_seed(seed)
    plain = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    sharded = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    sharded.load_state_dict(plain.state_dict())
    for module in sharded:
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Placement(0)])))
    return plain, sharded


@pytest.mark.parametrize(
    ("sparsifier", "args"),
    [
        ("magnitude", {"sparsity_level": 0.5, "pattern": "2:4"}),
        ("magnitude", {"sparsity_level": 0.6}),
        ("magnitude", {"sparsity_level": 0.6, "scope": "global"}),
        ("magnitude", {"sparsity_level": 0.5, "pattern": "channel"}),
        ("random", {"sparsity_level": 0.7, "seed": 3}),
    ],
)
def test_masks_on_dtensors_are_those_of_the_plain_model(mesh: Any, sparsifier: str, args: dict[str, Any]) -> None:
    plain, sharded = sharded_mlp(mesh)
    a = sc.SparsityController(plain, sparsifier, args, "linear", {"end": 2})
    b = sc.SparsityController(sharded, sparsifier, args, "linear", {"end": 2})
    assert set(b.shards) == {"0.weight", "2.weight"} and b.comm is not None and b.comm.world_size == 1
    for t in (1, 2):
        a.step(t)
        b.step(t)
        for name, mask in a.masks.items():
            assert torch.equal(b.masks[name], mask), (t, name)
            assert torch.equal(b.tensors[name].full_tensor(), a.tensors[name].detach())
    ra, rb = a.report(), b.report()
    assert dict(rb) == dict(ra) and rb.overall == ra.overall
    assert [r.shape for r in rb.rows] == [r.shape for r in ra.rows]


def test_same_shaped_dtensors_are_separate_tensors_not_tied_ones(mesh: Any) -> None:
    # a DTensor's data_ptr() is 0: keyed by it, every layer of one shape was taken for one tied tensor
    from torch.distributed.tensor import Shard as Placement
    from torch.distributed.tensor import distribute_tensor

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])
    model[3].weight = model[1].weight  # one really tied pair: the same parameter object under two names
    for i in (0, 1, 2):
        model[i].weight = nn.Parameter(distribute_tensor(model[i].weight.detach(), mesh, [Placement(0)]))
    model[3].weight = model[1].weight
    c = sc.SparsityController(model, "magnitude", {"sparsity_level": 0.5, "include": ["*.weight"]})
    assert sorted(c.tensors) == ["0.weight", "1.weight", "2.weight"]
    assert c.aliases.get("1.weight", ("1.weight",)) == ("1.weight", "3.weight")
    c.step()
    assert c.report().overall == 0.5 and len(c.masks) == 3


def test_pruned_dtensor_weights_stay_zero_through_adamw_and_the_state_round_trips(mesh: Any) -> None:
    plain, sharded = sharded_mlp(mesh)
    c = sc.SparsityController(sharded, "magnitude", {"sparsity_level": 0.5}, "linear", {"end": 2})
    opt = torch.optim.AdamW(sharded.parameters(), lr=0.1)
    c.attach(opt)
    x = torch.randn(4, 16)
    from torch.distributed.tensor import Replicate, distribute_tensor

    def train(steps: int) -> None:
        for _ in range(steps):
            opt.zero_grad()
            sharded(distribute_tensor(x, mesh, [Replicate()])).full_tensor().pow(2).sum().backward()
            opt.step()

    train(1)
    c.step(2)
    for name, mask in c.masks.items():
        # at the mask update AdamW's moments of pruned entries are zeroed (sharded like the parameter)
        state = opt.state[c.tensors[name]]
        assert int((state["exp_avg"].to_local()[~mask] != 0).sum()) == 0 and int((~mask).sum()) > 0
    train(3)
    # the apply plan (made once per set of masks) is kept across steps for the local rows too
    assert c._apply_plan() is c._apply_plan()
    for name, mask in c.masks.items():
        w = c.local(name)
        assert int((w[~mask] != 0).sum()) == 0 and bool((w[mask] != 0).all()), name
    buffer = io.BytesIO()
    torch.save(c.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["shapes"]["0.weight"] == [24, 16] and state["pruned"]["0.weight"] == 24 * 16 // 2
    # a sharded state restores a plain model, and a plain state a sharded one
    fresh_plain = sc.SparsityController(plain, "magnitude", {"sparsity_level": 0.5}, "linear", {"end": 2})
    fresh_plain.load_state_dict(state)
    _, other = sharded_mlp(mesh, seed=1)
    fresh_sharded = sc.SparsityController(other, "magnitude", {"sparsity_level": 0.5}, "linear", {"end": 2})
    fresh_sharded.load_state_dict(fresh_plain.state_dict())
    for name, mask in c.masks.items():
        assert torch.equal(fresh_plain.masks[name], mask) and torch.equal(fresh_sharded.masks[name], mask)
        assert int((fresh_sharded.local(name)[~mask] != 0).sum()) == 0
    assert fresh_sharded.t == 2.0


def test_refusals_name_the_tensor_the_placements_and_the_rule(mesh: Any) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor
    from torch.distributed.tensor import Shard as Placement

    w = torch.randn(8, 8)
    for placements, said in (([Replicate()], r"\(Replicate\(\),\)"), ([Placement(1)], r"\(Shard\(dim=1\),\)")):
        with pytest.raises(ValueError, match=rf"'w' is a DTensor with placements {said}: only rows split over a 1-D device mesh"):
            sc.SparsityController({"w": distribute_tensor(w, mesh, placements)}, "magnitude")
    mesh2 = init_device_mesh("cpu", (1, 1), mesh_dim_names=("replicate", "shard"))
    with pytest.raises(ValueError, match=r"'w' is a DTensor on a 2-D device mesh.*HSDP.*only rows split"):
        sc.SparsityController({"w": distribute_tensor(w, mesh2, [Replicate(), Placement(0)])}, "magnitude")
    # rows that are not torch.chunk's split (a DTensor built from an odd local part)
    from torch.distributed.tensor import DTensor

    odd = DTensor.from_local(torch.randn(3, 8), mesh, [Placement(0)], shape=torch.Size((8, 8)), stride=(8, 1))
    with pytest.raises(ValueError, match=r"'w' is a DTensor of global shape \(8, 8\) whose local part on rank 0 is shaped \(3, 8\), not rows 0:8"):
        sc.SparsityController({"w": odd}, "magnitude")
    rows = {"w": distribute_tensor(w, mesh, [Placement(0)])}
    with pytest.raises(ValueError, match=r"sparsifier 'data_norm' does not declare capabilities.shard_safe, and covered tensor 'w' is sharded"):
        sc.SparsityController(rows, "data_norm")
    c = sc.SparsityController(rows, "magnitude")
    with pytest.raises(ValueError, match=r"upkeep='gradients'\) is not supported for sharded parameters"):
        c.attach(torch.optim.SGD([rows["w"]], lr=0.1), upkeep="gradients")
    c.attach(torch.optim.SGD([rows["w"]], lr=0.1), upkeep="auto")  # auto picks "weights"
    assert c._hooks


def test_calibrated_sparsifiers_refuse_sharded_tensors(mesh: Any) -> None:
    pytest.importorskip("sparsity_plugin_wanda")
    _, sharded = sharded_mlp(mesh)
    with pytest.raises(ValueError, match=r"sparsifier 'wanda' does not declare capabilities.shard_safe.*calibrated ones"):
        sc.SparsityController(sharded, "wanda")


def test_builtins_declare_shard_safety() -> None:
    caps = {name: sc.create_sparsifier(name).capabilities.shard_safe for name in ("magnitude", "random", "data_norm")}
    # data_norm selects blocks over the whole tensor in its own path, which is not distributed
    assert caps == {"magnitude": True, "random": True, "data_norm": False}


def test_fsdp1_and_deepspeed_errors_name_the_supported_strategy() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    for marker in ("_fsdp_flattened", "ds_id"):
        w = nn.Parameter(torch.randn(4, 4))
        setattr(w, marker, True)
        model[0].weight = w
        with pytest.raises(ValueError, match=r"use FSDP2 \(torch.distributed.fsdp.fully_shard, Lightning's ModelParallelStrategy\), which is supported"):
            sc.SparsityController(model, "magnitude")


@pytest.mark.slow  # imports Lightning
def test_the_lightning_callback_skips_the_broadcast_of_sharded_masks(mesh: Any, tmp_path: Path) -> None:
    from sparsity_core.lightning import _unsharded_masks

    _, sharded = sharded_mlp(mesh)
    c = sc.SparsityController({"a": nn.Parameter(torch.randn(8, 8)), **dict(sharded.named_parameters())}, "magnitude",
                              {"sparsity_level": 0.5})
    c.step()
    assert set(c.masks) == {"a", "0.weight", "0.bias", "2.weight", "2.bias"}
    assert _unsharded_masks(c) == ["a"]


@pytest.mark.slow  # imports Lightning
def test_the_callbacks_refuse_a_copy_or_rewinding_of_sharded_parameters(mesh: Any) -> None:
    from sparsity_core.lightning import PostTrainingSparsity, TrainingAwareSparsity

    _, sharded = sharded_mlp(mesh)

    class Module:  # what on_fit_start reads of a LightningModule and a Trainer
        model = sharded

        def named_children(self) -> Iterator[tuple[str, nn.Module]]:
            yield "model", sharded

    for kwargs, what in (({"inplace": False}, r"inplace=False \(a copy of the network\)"), ({"rewind_to": "init"}, "rewind_to")):
        cb = TrainingAwareSparsity("magnitude", {"sparsity_level": 0.5}, verbose=False, **kwargs)
        with pytest.raises(ValueError, match=rf"TrainingAwareSparsity: {what} is not supported with sharded parameters .*'0.weight'"):
            cb.on_fit_start(None, Module())  # type: ignore[arg-type]
    # PostTrainingSparsity refuses at fit start, not after the training
    post = PostTrainingSparsity("magnitude", {"sparsity_level": 0.5}, verbose=False)
    with pytest.raises(ValueError, match=r"PostTrainingSparsity: inplace=False \(a copy of the network\) is not supported"):
        post.on_fit_start(None, Module())  # type: ignore[arg-type]


@pytest.mark.parametrize("args", [{}, {"scope": "global"}, {"pattern": "2:4"}])
def test_random_masks_on_simulated_ranks_are_the_whole_tensors_rows(args: dict[str, Any]) -> None:
    from sparsity_core._contract import MaskContext
    from sparsity_core._shards import Shards

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(10, 8, generator=g), "b": torch.randn(7, 12, generator=g)}
    level = 0.5 if "pattern" in args else 0.6
    spec = {"seed": 9, "sparsity_level": level, **args}
    levels = dict.fromkeys(tensors, level)
    whole = sc.create_sparsifier("random", spec).compute_masks(tensors, levels)

    def work(comm: ThreadComm) -> dict[str, tuple[int, torch.Tensor]]:
        local, shards = {}, {}
        for name, t in tensors.items():
            start, end = _sharding.row_range(t.shape[0], 3, comm.rank)
            local[name], shards[name] = t[start:end], Shard(t.shape, start)
        sp = sc.create_sparsifier("random", spec)
        masks = sp.compute_masks(local, levels, MaskContext(shards=Shards(comm, shards)))
        return {n: (shards[n].offset, m) for n, m in masks.items()}

    for result in on_ranks(3, work):
        for name, (start, mask) in result.items():
            assert torch.equal(mask, whole[name][start : start + mask.shape[0]]), name
