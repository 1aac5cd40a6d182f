"""``TorchCommunicator`` over a real (one-rank) gloo group: the collectives the engine makes, and
a sharded selection through it equal to the plain engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

from sparsity_core import create_sparsifier
from sparsity_core._contract import MaskContext
from sparsity_core._shards import Communicator, Shard, Shards, TorchCommunicator


@pytest.fixture
def group() -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_collectives_on_one_rank(group: None) -> None:
    comm = TorchCommunicator()
    assert isinstance(comm, Communicator)
    assert (comm.rank, comm.world_size, comm.device) == (0, 1, None)
    t = torch.tensor([3, 1, 2])
    assert comm.all_reduce(t, "max") is t and t.tolist() == [3, 1, 2]
    (only,) = comm.all_gather(torch.arange(4.0)[::2])  # non-contiguous input
    assert only.tolist() == [0.0, 2.0]


@pytest.mark.parametrize("args", [{"sparsity_level": 0.7}, {"sparsity_level": 0.7, "scope": "global"}, {"sparsity_level": 0.5, "pattern": "1x4"}])
def test_sharded_selection_through_torch_distributed(group: None, args: dict) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(64, 48, generator=gen), "b": torch.randn(30, 16, generator=gen)}
    sp = create_sparsifier("magnitude", args)
    levels = sp.final_levels(tensors)
    plain = sp.compute_masks({n: t.clone() for n, t in tensors.items()}, levels)
    shards = Shards(TorchCommunicator(), {n: Shard(t.shape, 0) for n, t in tensors.items()})
    got = sp.compute_masks(tensors, levels, context=MaskContext(shards=shards))
    for n in tensors:
        assert torch.equal(got[n], plain[n]), n
