"""Simulated ranks: a distributed mask update tested in one process.

``SimulatedRanks(world_size).run(fn)`` runs ``fn(comm)`` in one thread per rank, each with its own
:class:`~sparsity_core._shards.Communicator` (collectives meet at a barrier and reduce in rank
order, so results are deterministic), and returns every rank's result in rank order::

    from sparsity_core.testing import SimulatedRanks, shard_rows

    ranks = SimulatedRanks(2)
    masks = ranks.run(lambda comm: my_update(comm))   # [rank 0's, rank 1's]
    ranks.collectives                                  # collectives each rank made

:func:`masks_on_shards` runs a sparsifier's ``compute_masks`` on row shards of given tensors and
reassembles the masks, to compare with one process on the whole tensors (shard safety).

A rank that raises breaks the barrier, so the others stop at their next collective instead of
waiting forever; :meth:`SimulatedRanks.run` then raises the error of the lowest rank that raised
(not the broken barriers it caused). A rank that skips a collective the others make is reported
the same way after ``timeout`` seconds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from .._shards import Shard

T = TypeVar("T")


class RankFailed(RuntimeError):
    """A rank stopped at a collective because another rank raised (or never came)."""


class _Meeting:
    """The shared slots and barrier of one set of simulated ranks."""

    def __init__(self, world_size: int, timeout: float) -> None:
        self.world_size = world_size
        self.timeout = timeout
        self.barrier = threading.Barrier(world_size)
        self.slots: list[Any] = [None] * world_size

    def wait(self) -> None:
        try:
            self.barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            raise RankFailed("another rank raised or never reached this collective") from None


class SimulatedCommunicator:
    """One rank's :class:`~sparsity_core._shards.Communicator` among simulated ranks; it records
    each collective it makes (``calls``: the operation and the number of elements)."""

    def __init__(self, meeting: _Meeting, rank: int) -> None:
        self._meeting = meeting
        self.rank = rank
        self.world_size = meeting.world_size
        self.calls: list[tuple[str, int]] = []

    def _exchange(self, what: str, tensor: Tensor) -> list[Tensor]:
        meeting = self._meeting
        self.calls.append((what, tensor.numel()))
        meeting.slots[self.rank] = (what, tensor.detach().clone())
        meeting.wait()
        got = list(meeting.slots)
        meeting.wait()  # every rank has read the slots before any writes the next ones
        kinds = {(w, t.shape, t.dtype) for w, t in got}
        if len(kinds) != 1:
            raise ValueError(f"rank {self.rank}: the ranks made different collectives at once: {sorted(map(str, kinds))}")
        return [t for _, t in got]

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        parts = self._exchange(f"all_reduce({op})", tensor)
        out = parts[0].clone()
        for p in parts[1:]:  # in rank order: the same float result on every rank
            if op == "sum":
                out += p
            elif op == "min":
                torch.minimum(out, p, out=out)
            elif op == "max":
                torch.maximum(out, p, out=out)
            else:
                raise ValueError(f"all_reduce: op must be 'sum', 'min' or 'max', got {op!r}")
        tensor.copy_(out)
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        return self._exchange("all_gather", tensor)


class SimulatedRanks(Generic[T]):
    """``world_size`` ranks as threads of this process (see the module docstring)."""

    def __init__(self, world_size: int, timeout: float = 60.0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.world_size = world_size
        self.timeout = timeout
        self.comms: list[SimulatedCommunicator] = []

    @property
    def collectives(self) -> list[int]:
        """How many collectives each rank made in the last :meth:`run`."""
        return [len(c.calls) for c in self.comms]

    def run(self, fn: Callable[[SimulatedCommunicator], T]) -> list[T]:
        meeting = _Meeting(self.world_size, self.timeout)
        self.comms = [SimulatedCommunicator(meeting, r) for r in range(self.world_size)]
        results: list[Any] = [None] * self.world_size
        errors: list[BaseException | None] = [None] * self.world_size

        def body(rank: int) -> None:
            try:
                results[rank] = fn(self.comms[rank])
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                errors[rank] = e
                meeting.barrier.abort()  # the others stop at their next collective

        threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}", daemon=True) for r in range(self.world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        real = [e for e in errors if e is not None and not isinstance(e, RankFailed)]
        if real:
            raise real[0]
        failed = [e for e in errors if e is not None]
        if failed:
            raise failed[0]
        return results


def shard_rows(tensor: Tensor, rows: Sequence[int]) -> list[tuple[Tensor, int]]:
    """``tensor`` cut along dim 0 into pieces of ``rows`` rows (zeros allowed: empty shards):
    each rank's local tensor and row offset."""
    if sum(rows) != tensor.shape[0]:
        raise ValueError(f"rows {list(rows)} add up to {sum(rows)}, the tensor has {tensor.shape[0]}")
    out, offset = [], 0
    for r in rows:
        out.append((tensor[offset : offset + r].clone(), offset))
        offset += r
    return out


def chunk_rows(n: int, world_size: int) -> list[int]:
    """The rows of each rank under FSDP2's ``Shard(0)`` (``torch.chunk`` on dim 0; trailing
    ranks may hold none)."""
    size = -(-n // world_size) if n else 0
    return [max(0, min(size, n - r * size)) for r in range(world_size)]


def rank_view(
    tensors: Mapping[str, Tensor], rows: Mapping[str, Sequence[int]], current: Mapping[str, Tensor], rank: int
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Shard]]:
    """What ``rank`` holds: its rows of the tensors (and current masks) named in ``rows`` (each
    rank's row count, see :func:`chunk_rows`), copies of the others, and where its rows sit."""
    local: dict[str, Tensor] = {}
    cur: dict[str, Tensor] = {}
    shards: dict[str, Shard] = {}
    for n, t in tensors.items():
        if n in rows:
            local[n], offset = shard_rows(t, rows[n])[rank]
            shards[n] = Shard(t.shape, offset)
            if n in current:
                cur[n] = shard_rows(current[n], rows[n])[rank][0]
        else:
            local[n] = t.clone()
            if n in current:
                cur[n] = current[n].clone()
    return local, cur, shards


def masks_on_shards(
    sparsifier: Any,
    tensors: Mapping[str, Tensor],
    levels: Mapping[str, float],
    rows: Mapping[str, Sequence[int]],
    *,
    current: Mapping[str, Tensor] | None = None,
    layouts: Mapping[str, Any] | None = None,
    timeout: float = 60.0,
) -> tuple[dict[str, Tensor], SimulatedRanks[dict[str, Tensor]]]:
    """The masks ``sparsifier`` computes on row shards, reassembled: the tensors named in
    ``rows`` are cut along dim 0 (``rows[name]``: each rank's row count, see :func:`chunk_rows`),
    the others are replicated; each rank calls ``compute_masks`` with its local tensors (and its
    local rows of ``current``) and ``MaskContext.shards``. A shard-safe sparsifier gives exactly
    the masks of ``compute_masks`` on the whole tensors::

        sharded, _ = masks_on_shards(sp, tensors, levels, {n: chunk_rows(t.shape[0], 2) for n, t in tensors.items()})
        whole = sp.compute_masks(tensors, levels, MaskContext())

    Also returns the ranks (``ranks.collectives``: the collectives each made)."""
    from .._contract import MaskContext
    from .._shards import Shards

    sizes = {len(r) for r in rows.values()}
    if len(sizes) != 1:
        raise ValueError(f"every tensor in rows must be cut for the same number of ranks, got {sorted(sizes)}")
    world = sizes.pop()
    current = current or {}
    ranks: SimulatedRanks[dict[str, Tensor]] = SimulatedRanks(world, timeout=timeout)

    def update(comm: SimulatedCommunicator) -> dict[str, Tensor]:
        local, cur, shards = rank_view(tensors, rows, current, comm.rank)
        context = MaskContext(current=cur, layouts=dict(layouts or {}), shards=Shards(comm, shards))
        masks = sparsifier.compute_masks(local, levels, context)
        return {n: m for n, m in masks.items()}

    out = ranks.run(update)
    gathered = {}
    for n in tensors:
        if n in rows:
            gathered[n] = torch.cat([o[n] for o in out])
        else:
            if not all(torch.equal(o[n], out[0][n]) for o in out):
                raise AssertionError(f"the mask of replicated tensor {n!r} differs across the ranks")
            gathered[n] = out[0][n]
    return gathered, ranks
