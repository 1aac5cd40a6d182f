"""Sharded tensors as the engine sees them: each rank holds a contiguous slice of rows (dim 0,
FSDP2's ``Shard(0)`` placement) of a tensor whose global shape every rank knows, and a
:class:`Communicator` sums, bounds and gathers small tensors across the ranks.

The communicator is injectable so that the distributed selection is tested in one process with
simulated ranks (``sparsity_core.testing``) as well as over ``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

ReduceOp = Literal["sum", "min", "max"]


@runtime_checkable
class Communicator(Protocol):
    """The few collectives a distributed mask update needs; every rank calls them in the same
    order with tensors of the same shape and dtype."""

    rank: int
    world_size: int

    def all_reduce(self, tensor: Tensor, op: ReduceOp = "sum") -> Tensor:
        """The element-wise reduction of ``tensor`` over the ranks (``tensor`` may be reused)."""
        ...

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor``, in rank order."""
        ...


class TorchCommunicator:
    """:class:`Communicator` over ``torch.distributed`` (a process group, the default one if none).

    The engine reduces small CPU tensors (counts, samples, histograms); a backend that only
    takes accelerator tensors (NCCL) gets them moved to the current device and back."""

    _OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}

    def __init__(self, group: object | None = None) -> None:
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        self.device: torch.device | None = None
        if "nccl" in backend and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())

    def _to_backend(self, tensor: Tensor) -> Tensor:
        return tensor if self.device is None or tensor.device == self.device else tensor.to(self.device)

    def all_reduce(self, tensor: Tensor, op: ReduceOp = "sum") -> Tensor:
        import torch.distributed as dist

        moved = self._to_backend(tensor)
        dist.all_reduce(moved, op=getattr(dist.ReduceOp, self._OPS[op]), group=self.group)
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        import torch.distributed as dist

        moved = self._to_backend(tensor.contiguous())
        out = [torch.empty_like(moved) for _ in range(self.world_size)]
        dist.all_gather(out, moved, group=self.group)
        return [t.to(tensor.device) for t in out] if moved.device != tensor.device else out


@dataclass(frozen=True)
class Shard:
    """Where a rank's local tensor sits in the global one: rows ``offset`` to
    ``offset + local.shape[0]`` of dim 0 of a tensor shaped ``global_shape`` (possibly no rows)."""

    global_shape: torch.Size
    offset: int


@dataclass(frozen=True)
class Shards:
    """The sharded tensors of one mask update (by name) and the communicator of their ranks."""

    comm: Communicator
    tensors: Mapping[str, Shard] = field(default_factory=dict)
