"""The controller's side of sharded parameters (FSDP2): recognising them, where each rank's rows
sit, and the few collectives that make reports and saved states global.

FSDP2 (``torch.distributed.fsdp.fully_shard``, Lightning's ``ModelParallelStrategy``) keeps each
parameter as a DTensor with the global shape, split by rows (``Shard(0)`` on a 1-D mesh) the way
``torch.chunk`` splits dim 0: every rank but the last ones holds ``ceil(rows / world)`` rows, and
the last ones may hold fewer or none. ``to_local()`` is a view of the rank's real storage, so a
mask applied to it is applied to the parameter. Any other layout is refused, naming the tensor,
its placements and the rule: a mask made from a fragment that is not whole rows would be wrong.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._bits import PackedMask
from ._shards import Communicator, Shard, TorchCommunicator


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor`` when this torch has it (None on builds without distributed)."""
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def is_dtensor(tensor: object) -> bool:
    # No DTensor exists unless its module was imported: do not pay for importing it here.
    if "torch.distributed.tensor" not in sys.modules:
        return False
    cls = dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def row_range(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of dim 0 that ``rank`` holds when ``rows`` are split as ``torch.chunk``
    splits them into ``world_size`` pieces (FSDP2's and DTensor's ``Shard(0)``): pieces of
    ``ceil(rows / world_size)``, the last ones short or empty."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    size = -(-rows // world_size)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


@dataclass(frozen=True)
class Sharded:
    """One sharded parameter as the controller sees it: where this rank's rows sit, and its mesh."""

    shard: Shard
    rows: int  # rows this rank holds
    mesh: Any  # the DeviceMesh (every sharded tensor of one controller must share it)

    def rows_of(self, rank: int, world_size: int) -> int:
        start, end = row_range(self.shard.global_shape[0], world_size, rank)
        return end - start


def describe(name: str, tensor: torch.Tensor) -> Sharded:
    """Where ``tensor`` (a DTensor) sits on this rank; anything but rows split over a 1-D mesh is a
    ValueError naming the tensor, its placements and the rule."""
    from torch.distributed.tensor import Shard as ShardPlacement

    placements = tuple(tensor.placements)  # type: ignore[attr-defined]
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    rule = (
        "only rows split over a 1-D device mesh are supported (placements (Shard(0),), as FSDP2's fully_shard "
        "makes by default): masks made from other fragments would be wrong"
    )
    if mesh.ndim != 1 or len(placements) != 1:
        raise ValueError(
            f"covered tensor {name!r} is a DTensor on a {mesh.ndim}-D device mesh with placements {placements} "
            f"(HSDP, or FSDP2 with tensor parallelism?): {rule}"
        )
    (placement,) = placements
    if type(placement) is not ShardPlacement or placement.dim != 0 or tensor.dim() == 0:
        raise ValueError(
            f"covered tensor {name!r} is a DTensor with placements {placements}: {rule}; replicated or "
            f"column-sharded tensors (Replicate(), Shard(1), a custom shard_placement_fn) are not"
        )
    global_shape = torch.Size(tensor.shape)
    start, end = row_range(global_shape[0], mesh.size(), mesh.get_local_rank())
    local = tensor.to_local()  # type: ignore[attr-defined]
    if tuple(local.shape) != (end - start, *global_shape[1:]):
        raise ValueError(
            f"covered tensor {name!r} is a DTensor of global shape {tuple(global_shape)} whose local part on rank "
            f"{mesh.get_local_rank()} is shaped {tuple(local.shape)}, not rows {start}:{end} as torch.chunk splits "
            f"them: {rule}"
        )
    return Sharded(Shard(global_shape, start), end - start, mesh)


def communicator(name: str, sharded: Mapping[str, Sharded]) -> Communicator:
    """The communicator of the ranks of ``sharded`` (every tensor must be on one mesh); ``name``
    names the controller's owner in the error."""
    meshes = {id(s.mesh): (n, s.mesh) for n, s in sharded.items()}
    (first, mesh), *others = meshes.values()
    for other, other_mesh in others:
        if other_mesh != mesh:
            raise ValueError(
                f"{name}: sharded tensors {first!r} and {other!r} are on different device meshes ({mesh} and "
                f"{other_mesh}): one mask update runs over one set of ranks; shard the model over one mesh"
            )
    return TorchCommunicator(mesh.get_group())


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (a view of its storage) when it is a DTensor, else itself."""
    if not is_dtensor(tensor):
        return tensor
    # The local tensor itself: to_local() of a Parameter wraps it in a new Parameter at each call
    # (so the apply plan, which keeps the tensors it masks, would never be reused), and under
    # autograd returns a differentiable alias.
    found = getattr(tensor, "_local_tensor", None)
    if isinstance(found, torch.Tensor):
        return found
    with torch.no_grad():
        return tensor.to_local()  # type: ignore[attr-defined,no-any-return]


# -- packed masks ------------------------------------------------------------------------------
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as ``ceil(numel / 8)`` bytes, first element in the high bit (as ``np.packbits``)."""
    flat = mask.reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = _BITS.to(flat.device)
    return (flat.view(-1, 8).to(torch.uint8) * bits).sum(dim=1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The first ``numel`` bools of :func:`pack`'s bytes."""
    bits = _BITS.to(packed.device)
    return ((packed.reshape(-1, 1) & bits) != 0).reshape(-1)[:numel]


def gather_rows(
    comm: Communicator, masks: Sequence[tuple[torch.Tensor, Sharded]], device: torch.device
) -> list[torch.Tensor]:
    """Each local bool mask (this rank's rows) made whole, on every rank, by one all-gather of the
    packed bits of all of them (each rank's part padded to the largest part)."""
    world = comm.world_size

    def sizes(rank: int) -> list[int]:
        return [s.rows_of(rank, world) * math.prod(s.shard.global_shape[1:]) for _, s in masks]

    per_rank = [sizes(r) for r in range(world)]
    width = max(sum(-(-n // 8) for n in ns) for ns in per_rank)
    mine = torch.zeros(width, dtype=torch.uint8, device=device)
    at = 0
    for mask, _ in masks:
        packed = pack(mask.to(device))
        mine[at : at + packed.numel()] = packed
        at += packed.numel()
    parts = comm.all_gather(mine)
    whole: list[list[torch.Tensor]] = [[] for _ in masks]
    for rank, part in enumerate(parts):
        at = 0
        for i, n in enumerate(per_rank[rank]):
            nbytes = -(-n // 8)
            whole[i].append(unpack(part[at : at + nbytes], n))
            at += nbytes
    return [torch.cat(pieces).view(s.shard.global_shape).cpu() for pieces, (_, s) in zip(whole, masks)]


def rows_of_packed(mask: PackedMask, sharded: Sharded) -> PackedMask:
    """This rank's rows of a whole packed mask (only their bytes are unpacked)."""
    width = math.prod(sharded.shard.global_shape[1:])
    start = sharded.shard.offset * width
    rows = mask.unpack(start, start + sharded.rows * width)
    return PackedMask.pack(rows.view(sharded.rows, *sharded.shard.global_shape[1:]))


def rows_of(mask: torch.Tensor, sharded: Sharded) -> torch.Tensor:
    """This rank's rows of a whole mask (a copy: the whole mask is not kept alive by them)."""
    start = sharded.shard.offset
    return mask[start : start + sharded.rows].clone()
