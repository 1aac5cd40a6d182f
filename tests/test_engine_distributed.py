"""Exact masks from row shards (issue 11, FSDP2 ``Shard(0)``), with simulated ranks: every pattern
and scope gives the local slices of the masks one process computes on the gathered tensors."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence

import pytest
import torch

from sparsity_core import create_sparsifier
from sparsity_core._contract import MaskContext
from sparsity_core._engine import score_masks
from sparsity_core._layers import TensorLayout
from sparsity_core._shards import Shard, Shards
from sparsity_core.testing import RankFailed, SimulatedRanks, chunk_rows, shard_rows
from sparsity_core.testing._ranks import rank_view

CONV1D = TensorLayout("conv1d", output_axis=1, input_axis=0)  # transformers' Conv1D: [in, out]


def uneven(n: int, world: int, align: int = 1) -> list[int]:
    """Uneven rows with an empty shard (rank 1 when there are 3 or more ranks), aligned to ``align``."""
    units = n // align
    cuts = [0] * world
    if world == 2:
        cuts = [units // 3, units - units // 3]
    else:
        cuts[0] = units // 5
        cuts[2] = units // 2
        for r in range(3, world):
            cuts[r] = (units - cuts[0] - cuts[2]) // (world - 2)
        cuts[-1] += units - sum(cuts)
    rows = [c * align for c in cuts]
    rows[-1] += n - sum(rows)
    return rows


def run_sharded(
    sp,
    tensors: Mapping[str, torch.Tensor],
    rows: Mapping[str, Sequence[int]],
    *,
    current: Mapping[str, torch.Tensor] | None = None,
    layouts: Mapping[str, TensorLayout] | None = None,
    levels: Mapping[str, float] | None = None,
    applied: bool = False,
    packed: bool = False,
) -> tuple[dict[str, torch.Tensor], SimulatedRanks, list[dict[str, torch.Tensor]]]:
    """Each rank's masks for its rows of the tensors in ``rows`` (the others replicated),
    reassembled; the ranks (for their collectives) and every rank's local tensors after."""
    world = len(next(iter(rows.values())))
    levels = dict(levels or sp.final_levels(tensors))
    current = current or {}
    ranks = SimulatedRanks(world, timeout=30)
    locals_: list[dict[str, torch.Tensor]] = [{} for _ in range(world)]

    def update(comm) -> dict[str, torch.Tensor]:
        local, cur, shards = rank_view(tensors, rows, current, comm.rank)
        locals_[comm.rank] = local
        if packed:  # the controller's masks in force, 1 bit per weight
            from sparsity_core._bits import MaskView, PackedMask

            cur = MaskView({n: PackedMask.pack(m) for n, m in cur.items()})
        context = MaskContext(current=cur, layouts=layouts or {}, shards=Shards(comm, shards))
        return score_masks(sp, local, levels, {} if applied else None, context=context)

    out = ranks.run(update)
    # with applied, masks are handed over as made: bool here, packed for replicated unstructured
    out = [{n: m.to_bool() if hasattr(m, "to_bool") else m for n, m in o.items()} for o in out]
    gathered = {}
    for n in tensors:
        if n in rows:
            assert all(o[n].shape == loc[n].shape for o, loc in zip(out, locals_))
            gathered[n] = torch.cat([o[n] for o in out])
        else:
            assert all(torch.equal(o[n], out[0][n]) for o in out), f"replicated {n!r} differs across ranks"
            gathered[n] = out[0][n]
    return gathered, ranks, locals_


def assert_same_as_one_process(sp, tensors, rows, *, current=None, layouts=None, levels=None, packed=False):
    levels = dict(levels or sp.final_levels(tensors))
    single = score_masks(sp, tensors, levels, context=MaskContext(current=current or {}, layouts=layouts or {}))
    got, ranks, _ = run_sharded(sp, tensors, rows, current=current, layouts=layouts, levels=levels, packed=packed)
    for n in tensors:
        assert torch.equal(got[n], single[n]), f"{n!r}: {int((~got[n]).sum())} pruned on shards, {int((~single[n]).sum())} in one process"
    return ranks


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fc.weight": torch.randn(48, 40, generator=g),
        "conv.weight": torch.randn(48, 3, 2, 2, generator=g),
        "emb.weight": torch.randn(96, 8, generator=g) * 3,
        "fc.bias": torch.randn(48, generator=g),
        "head.weight": torch.randn(10, 48, generator=g),  # replicated
    }


PATTERNS = ["unstructured", "channel", "1x4", "1x3", "2x2", "2:4"]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("pattern,scope", [(p, s) for p in PATTERNS for s in ("layer", "global") if not (":" in p and s == "global")])
@pytest.mark.parametrize("split", ["chunk", "uneven"])
def test_every_pattern_and_scope_equals_one_process(path, world, scope, pattern, split):
    tensors = model(world)
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.5 if pattern == "2:4" else 0.7, "scope": scope, "pattern": pattern})
    cut = chunk_rows if split == "chunk" else (lambda n, w: uneven(n, w, 2))
    rows = {n: cut(t.shape[0], world) for n, t in tensors.items() if n != "head.weight"}
    # a 1-D tensor's groups and blocks run along dim 0: its shards are aligned to them (12 rows)
    rows["fc.bias"] = uneven(48, world, 12)
    if pattern == "channel":
        del rows["fc.bias"]  # a 1-D tensor is one channel: it cannot be cut (see the refusals)
    assert_same_as_one_process(sp, tensors, rows)


@pytest.mark.parametrize("pattern", ["unstructured", "channel", "1x4", "2x2"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_rows_cut_anywhere_for_units_inside_a_row(path, pattern, scope):
    tensors = model(5)
    del tensors["fc.bias"]
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.6, "scope": scope, "pattern": pattern})
    # rows at odd offsets: fine for elements, channels and 1xW (units inside a row); 2x2 needs even rows
    rows = {"fc.weight": [7, 0, 30, 11], "conv.weight": [1, 46, 1, 0], "emb.weight": [0, 0, 95, 1]}
    if pattern == "2x2":
        rows = {"fc.weight": [8, 0, 30, 10], "conv.weight": [2, 44, 2, 0], "emb.weight": [0, 0, 94, 2]}
    assert_same_as_one_process(sp, tensors, rows)


def test_more_ranks_than_rows_and_an_empty_tensor_shard(path):
    g = torch.Generator().manual_seed(3)
    tensors = {"tiny": torch.randn(3, 5, generator=g), "w": torch.randn(40, 30, generator=g), "v": torch.randn(2, generator=g)}
    for scope in ("layer", "global"):
        sp = create_sparsifier("magnitude", {"sparsity_level": 0.5, "scope": scope})
        assert_same_as_one_process(sp, tensors, {n: chunk_rows(t.shape[0], 4) for n, t in tensors.items()})


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("level", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("zeros", [0.6, 0.95])
def test_tie_masses_of_exact_zeros(path, scope, level, zeros):
    # after gradual pruning most scores are exact zeros: the cut falls inside them or above them
    g = torch.Generator().manual_seed(11)
    tensors = {"a": torch.randn(120, 50, generator=g), "b": torch.randn(60, 40, generator=g)}
    for t in tensors.values():
        t[torch.rand(t.shape, generator=g) < zeros] = 0.0
    tensors["a"][5, :7] = -0.0  # compares equal to +0.0: ties with it
    sp = create_sparsifier("magnitude", {"sparsity_level": level, "scope": scope})
    for world in (2, 3):
        assert_same_as_one_process(sp, tensors, {"a": uneven(120, world), "b": chunk_rows(60, world)})


@pytest.mark.parametrize("pattern", ["unstructured", "1x4"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_quantised_weights_few_distinct_values(path, pattern, scope):
    g = torch.Generator().manual_seed(12)
    tensors = {"a": torch.randint(-3, 4, (96, 64), generator=g).float(), "b": torch.randint(-2, 3, (48, 32), generator=g).float()}
    for level in (0.2, 0.55, 0.9):
        sp = create_sparsifier("magnitude", {"sparsity_level": level, "scope": scope, "pattern": pattern})
        assert_same_as_one_process(sp, tensors, {"a": chunk_rows(96, 3), "b": uneven(48, 3, 4)})


@pytest.mark.parametrize("pattern", ["unstructured", "channel", "2x2"])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("level,packed", [(0.5, False), (0.9, False), (0.9, True)])
def test_nested_update_over_mostly_pruned_weights(path, pattern, scope, level, packed):
    # the current masks prune 80 %: they stay pruned (-inf), a lower level is raised to them
    tensors = model(13)
    del tensors["fc.bias"]
    first = create_sparsifier("magnitude", {"sparsity_level": 0.8, "scope": scope, "pattern": pattern})
    current = score_masks(first, tensors, first.final_levels(tensors))
    g = torch.Generator().manual_seed(14)
    moved = {n: t + 0.5 * torch.randn(t.shape, generator=g) for n, t in tensors.items()}  # weights moved since
    sp = create_sparsifier("magnitude", {"sparsity_level": level, "scope": scope, "pattern": pattern})
    rows = {n: uneven(t.shape[0], 3, 2) for n, t in tensors.items() if n != "head.weight"}
    assert_same_as_one_process(sp, moved, rows, current=current, packed=packed)


def test_bounds_use_global_sizes(path):
    g = torch.Generator().manual_seed(15)
    tensors = {
        "big": torch.randn(96, 40, generator=g),
        "small": torch.randn(48, 10, generator=g) * 1e-3,  # one threshold would empty it
        "rep": torch.randn(12, 12, generator=g) * 1e-2,
    }
    for args in ({"max_level_per_tensor": 0.6}, {"min_level_per_tensor": 0.3}, {}):
        sp = create_sparsifier("magnitude", {"sparsity_level": 0.55, "scope": "global", **args})
        assert_same_as_one_process(sp, tensors, {"big": uneven(96, 3), "small": chunk_rows(48, 3)})
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.55, "scope": "global", "pattern": "channel", "max_level_per_tensor": 0.6})
    assert_same_as_one_process(sp, tensors, {"big": uneven(96, 3), "small": chunk_rows(48, 3)})


def test_overrides_mix_scopes_and_patterns_in_one_update(path):
    tensors = model(16)
    sp = create_sparsifier(
        "magnitude",
        {
            "sparsity_level": 0.6,
            "scope": "global",
            "overrides": {"emb.*": {"pattern": "2:4", "scope": "layer", "sparsity_level": 0.5}, "fc.bias": {"scope": "layer", "sparsity_level": 0.3}},
        },
    )
    rows = {n: chunk_rows(t.shape[0], 3) for n, t in tensors.items() if n != "head.weight"}
    assert_same_as_one_process(sp, tensors, rows)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "unstructured"])
def test_nm_along_dim_0_when_groups_are_whole(path, pattern):
    # transformers' Conv1D [in, out]: dim 0 is the reduction axis, so N:M groups run across rows
    g = torch.Generator().manual_seed(17)
    tensors = {"c_attn.weight": torch.randn(64, 24, generator=g), "bias": torch.randn(32, generator=g)}
    layouts = {"c_attn.weight": CONV1D}
    sp = create_sparsifier("magnitude", {"pattern": pattern} | ({"sparsity_level": 0.5} if pattern == "unstructured" else {}))
    assert_same_as_one_process(sp, tensors, {"c_attn.weight": [16, 0, 28, 20], "bias": [8, 8, 16, 0]}, layouts=layouts)


@pytest.mark.parametrize("pattern", ["1x4", "1x3", "2x4"])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("zeros", [0.0, 0.7])
def test_blocks_along_dim_0_interleave_ranks_in_order(path, pattern, scope, zeros):
    # Conv1D [in, out]: a block of the [out, in] view lies along dim 0, so a rank holds a run of
    # block columns in every block row; ties split by block row, then rank
    g = torch.Generator().manual_seed(26)
    tensors = {"c_attn.weight": torch.randn(48, 30, generator=g), "c_proj.weight": torch.randn(24, 48, generator=g), "fc.weight": torch.randn(36, 12, generator=g)}
    for t in tensors.values():
        t[torch.rand(t.shape, generator=g) < zeros] = 0.0
    tensors["c_proj.weight"][:, :5] = 0.25  # exact ties across rows and ranks
    layouts = {"c_attn.weight": CONV1D, "c_proj.weight": CONV1D}
    w = int(pattern.split("x")[1])
    rows = {"c_attn.weight": uneven(48, 3, w), "c_proj.weight": [0, 12, 12], "fc.weight": chunk_rows(36, 3)}
    for level in (0.3, 0.75):
        sp = create_sparsifier("magnitude", {"sparsity_level": level, "scope": scope, "pattern": pattern})
        assert_same_as_one_process(sp, tensors, rows, layouts=layouts)
        first = create_sparsifier("magnitude", {"sparsity_level": 0.5, "scope": scope, "pattern": pattern})
        current = score_masks(first, tensors, first.final_levels(tensors), context=MaskContext(layouts=layouts))
        assert_same_as_one_process(sp, tensors, rows, layouts=layouts, current=current)


def test_the_big_path_agrees(monkeypatch):
    # large tensors through the sampled bracket with many pieces, at default sample size
    from sparsity_core import _engine as engine

    monkeypatch.setattr(engine.kernels, "EXACT", 1000)
    monkeypatch.setattr(engine.kernels, "CHUNK", 1 << 14)
    g = torch.Generator().manual_seed(18)
    tensors = {"a": torch.randn(700, 300, generator=g), "b": torch.randn(500, 200, generator=g).abs() + 0.5}
    for scope in ("layer", "global"):
        sp = create_sparsifier("magnitude", {"sparsity_level": 0.9, "scope": scope})
        assert_same_as_one_process(sp, tensors, {"a": chunk_rows(700, 2), "b": [100, 400]})


def test_masks_are_applied_to_the_local_rows(path):
    tensors = model(19)
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.5})
    rows = {n: chunk_rows(t.shape[0], 2) for n, t in tensors.items() if n != "head.weight"}
    masks, _, locals_ = run_sharded(sp, tensors, rows, applied=True)
    for n in rows:
        local = torch.cat([loc[n] for loc in locals_])
        assert torch.equal(local, tensors[n] * masks[n])


# -- refusals ----------------------------------------------------------------------------------
def refusals(sp, tensors, rows, layouts=None) -> list[BaseException]:
    levels = sp.final_levels(tensors)

    def update(comm):
        local, shards = {}, {}
        for n, t in tensors.items():
            local[n], offset = shard_rows(t, rows[n])[comm.rank]
            shards[n] = Shard(t.shape, offset)
        try:
            score_masks(sp, local, levels, context=MaskContext(layouts=layouts or {}, shards=Shards(comm, shards)))
        except ValueError as e:
            return e
        return None

    return SimulatedRanks(len(next(iter(rows.values()))), timeout=30).run(update)


@pytest.mark.parametrize(
    "pattern,shape,rows,layout,words",
    [
        ("2:4", (30, 8), [14, 16], CONV1D, ["multiple of 4", "rank 0 holds rows 0..14", "rank 1 holds rows 14..30"]),
        ("2:4", (30,), [10, 10, 10], None, ["multiple of 4", "rank 0 holds rows 0..10"]),
        ("2x2", (30, 8), [15, 15], None, ["multiple of 2", "rank 0 holds rows 0..15"]),
        ("4x1", (32, 8), [8, 10, 14], None, ["multiple of 4", "rank 1 holds rows 8..18"]),
        ("channel", (48,), [24, 24], None, ["multiple of 48"]),
        ("1x4", (32, 8), [14, 18], CONV1D, ["4 columns wide along dim 0", "rank 0 holds rows 0..14", "multiple of 4"]),
        ("channel", (32, 8), [16, 16], CONV1D, ["a channel spans every shard", "unstructured"]),
    ],
)
def test_misaligned_groups_are_refused_on_every_rank(pattern, shape, rows, layout, words):
    tensors = {"ok": torch.randn(16, 16), "w": torch.randn(shape)}
    sp = create_sparsifier("magnitude", {"pattern": pattern} if ":" in pattern else {"pattern": pattern, "sparsity_level": 0.5})
    errors = refusals(sp, tensors, {"ok": [16] + [0] * (len(rows) - 1), "w": rows}, {"w": layout} if layout else None)
    assert all(isinstance(e, ValueError) for e in errors), errors
    assert len({str(e) for e in errors}) == 1  # the same message on every rank
    message = str(errors[0])
    for word in ["'w'", f"{shape}", "sharded by rows", *words]:
        assert word in message, message


# -- collectives -------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_collectives_per_update_do_not_grow_with_the_tensors(path, scope):
    # one round: the setup, the sample, the counts, at most 3 histograms and the ties (7);
    # global scope adds the per-tensor counts of its bounds (no bound is hit: tensors alike)
    g = torch.Generator().manual_seed(20)
    bound = 7 if scope == "layer" else 8
    for n_tensors in (2, 40, 150):
        tensors = {f"l{i}.weight": torch.randn(24, 20, generator=g) for i in range(n_tensors)}
        sp = create_sparsifier("magnitude", {"sparsity_level": 0.7, "scope": scope})
        ranks = assert_same_as_one_process(sp, tensors, {n: chunk_rows(24, 2) for n in tensors})
        assert len(set(ranks.collectives)) == 1  # every rank made the same collectives
        assert ranks.collectives[0] <= bound, (n_tensors, ranks.comms[0].calls)
        sizes = [size for _, size in ranks.comms[0].calls]
        assert max(sizes) <= max(1 << 16, 2048 * n_tensors) + 8 * n_tensors  # histograms and counts, never the weights


# -- the simulated ranks -----------------------------------------------------------------------
def test_simulated_collectives_reduce_and_gather_in_rank_order():
    ranks = SimulatedRanks(3)

    def body(comm):
        x = torch.tensor([float(comm.rank), 10.0 - comm.rank])
        return comm.all_reduce(x.clone(), "sum").tolist(), comm.all_reduce(x.clone(), "max").tolist(), [t.tolist() for t in comm.all_gather(x)]

    out = ranks.run(body)
    assert out[0] == out[1] == out[2]
    assert out[0] == ([3.0, 27.0], [2.0, 10.0], [[0.0, 10.0], [1.0, 9.0], [2.0, 8.0]])
    assert ranks.collectives == [3, 3, 3]


def test_a_rank_that_raises_does_not_leave_the_others_waiting():
    def body(comm):
        if comm.rank == 1:
            raise KeyError("rank 1 failed")
        comm.all_reduce(torch.ones(1))
        return comm.rank

    start = time.monotonic()
    with pytest.raises(KeyError, match="rank 1 failed"):
        SimulatedRanks(3, timeout=30).run(body)
    assert time.monotonic() - start < 10
    assert not [t for t in threading.enumerate() if t.name.startswith("rank")]


def test_mismatched_collectives_and_missing_ranks_are_reported():
    def mismatched(comm):
        comm.all_reduce(torch.ones(comm.rank + 1))

    with pytest.raises(ValueError, match="different collectives"):
        SimulatedRanks(2, timeout=30).run(mismatched)

    def missing(comm):
        if comm.rank == 0:
            comm.all_gather(torch.ones(1))

    with pytest.raises(RankFailed):
        SimulatedRanks(2, timeout=0.5).run(missing)


@pytest.mark.parametrize("pattern,scope", [("unstructured", "global"), ("1x3", "global"), ("2x2", "layer"), ("2:4", "layer"), ("unstructured", "layer")])
def test_the_torch_kernels_of_accelerators(path, monkeypatch, pattern, scope):
    from sparsity_core import _engine as engine

    monkeypatch.setattr(engine.kernels, "NUMPY_KERNELS", False)
    tensors = model(21)
    g = torch.Generator().manual_seed(22)
    tensors["fc.weight"][torch.rand(48, 40, generator=g) < 0.7] = 0.0  # a tie mass too
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.5 if ":" in pattern else 0.6, "scope": scope, "pattern": pattern})
    rows = {n: uneven(t.shape[0], 3, 12) for n, t in tensors.items() if n != "head.weight"}
    assert_same_as_one_process(sp, tensors, rows)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("nans", ["one", "rows"])  # rows: the sample sees them before the pass
def test_nan_on_one_rank_stops_every_rank(path, scope, nans):
    g = torch.Generator().manual_seed(23)
    tensors = {"a": torch.randn(60, 40, generator=g), "b": torch.randn(30, 20, generator=g)}
    if nans == "one":
        tensors["a"][50, 3] = float("nan")  # on the last rank only
    else:
        tensors["a"][41:] = float("nan")
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.5, "scope": scope})
    levels = sp.final_levels(tensors)
    rows = {"a": chunk_rows(60, 3), "b": chunk_rows(30, 3)}

    def update(comm):
        local = {n: shard_rows(t, rows[n])[comm.rank][0] for n, t in tensors.items()}
        shards = {n: Shard(t.shape, shard_rows(t, rows[n])[comm.rank][1]) for n, t in tensors.items()}
        try:
            score_masks(sp, local, levels, context=MaskContext(shards=Shards(comm, shards)))
        except (ValueError, RuntimeError) as e:
            return e
        return None

    errors = SimulatedRanks(3, timeout=30).run(update)
    assert isinstance(errors[2], ValueError) and "'a'" in str(errors[2]) and "NaN" in str(errors[2])
    for e in errors[:2]:
        assert isinstance(e, RuntimeError) and "rank 2 raised" in str(e), e


def test_the_kit_compares_a_plugin_on_shards_with_one_process():
    from sparsity_core import ScoreSparsifier
    from sparsity_core.testing import masks_on_shards

    class RowScaled(ScoreSparsifier):  # a score of the element and its row only: shard safe
        name = "row_scaled_test"

        def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
            rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 1 else tensor.reshape(-1, 1)
            return (tensor.abs().reshape(rows.shape) / (1 + rows.abs().sum(1, keepdim=True))).reshape(tensor.shape)

    tensors = model(24)
    for args in ({"sparsity_level": 0.6, "scope": "global"}, {"pattern": "2:4"}, {"sparsity_level": 0.4, "pattern": "1x4"}):
        sp = RowScaled(args)
        levels = sp.final_levels(tensors)
        rows = {n: chunk_rows(t.shape[0], 3) for n, t in tensors.items() if t.dim() > 1 and n != "head.weight"}
        sharded, ranks = masks_on_shards(sp, tensors, levels, rows)
        whole = sp.compute_masks(tensors, levels, MaskContext())
        assert all(torch.equal(sharded[n], whole[n]) for n in tensors)
        assert len(set(ranks.collectives)) == 1

    class WholeTensor(ScoreSparsifier):  # a score normalised by the whole tensor: not shard safe
        name = "whole_tensor_test"

        def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
            return tensor.abs() - tensor.abs().mean()

    sp = WholeTensor({"sparsity_level": 0.5, "scope": "global"})
    levels = sp.final_levels(tensors)
    sharded, _ = masks_on_shards(sp, tensors, levels, {"emb.weight": [90, 6]})
    whole = sp.compute_masks(tensors, levels, MaskContext())
    assert not torch.equal(sharded["emb.weight"], whole["emb.weight"])  # the kit shows it


def test_many_large_tensors_share_the_sample(monkeypatch):
    from sparsity_core import _engine as engine
    from sparsity_core._engine import distributed

    monkeypatch.setattr(engine.kernels, "EXACT", 100)
    monkeypatch.setattr(engine.kernels, "SAMPLE", 40000)
    monkeypatch.setattr(distributed, "SAMPLE_TOTAL", 1 << 14)
    g = torch.Generator().manual_seed(25)
    tensors = {f"l{i}.weight": torch.randn(120, 100, generator=g) for i in range(8)}
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.8})
    ranks = assert_same_as_one_process(sp, tensors, {n: uneven(120, 3) for n in tensors})
    sample = [size for op, size in ranks.comms[0].calls if op == "all_reduce(max)"]
    assert sample == [8 * 4096 + 1]  # each a share of the total (at least 2**12), not 40000 // 4
