"""The torch kernels (what runs on an accelerator), exercised on CPU with ``NUMPY_KERNELS = False``.

On CPU the engine runs its small kernels through NumPy; on any other device through torch. With
the switch off every tensor takes the torch kernels, so this file checks them here: above all that
they give the very masks (and weights, and counts) the NumPy kernels give on the same inputs, and
that the selection paths (exact, sampled bracket, mass of ties) keep their invariants.

A guard makes sure the switch really routes everything: while it is off, a ``Tensor.numpy()``
call from anywhere but the one place that reads the (always host-side) sample fails the test.
What CPU cannot show is a device mismatch (a CPU tensor mixed with a CUDA one).
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
import torch
from torch import nn

import sparsity_core._engine as engine
from sparsity_core import SparsityController, SparsityReport, create_sparsifier

T = TypeVar("T")

_NUMPY = torch.Tensor.numpy
#: Callers allowed ``Tensor.numpy()`` with the switch off: the bracket's sample is gathered to the
#: host on every device and sorted there with NumPy.
_HOST_SIDE = {"_select_bracketed"}


def _guarded_numpy(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    frame = sys._getframe(1)
    if frame.f_code.co_name == "_np":
        frame = frame.f_back  # type: ignore[assignment]
    assert frame.f_code.co_name in _HOST_SIDE, f"a NumPy kernel ran in {frame.f_code.co_name}() with NUMPY_KERNELS off"
    return _NUMPY(self, *args, **kwargs)


def _set_kernels(monkeypatch: pytest.MonkeyPatch, numpy: bool) -> None:
    monkeypatch.setattr(engine.kernels, "NUMPY_KERNELS", numpy)
    if numpy:
        monkeypatch.setattr(torch.Tensor, "numpy", _NUMPY)
    else:
        monkeypatch.setattr(torch.Tensor, "numpy", _guarded_numpy)


@pytest.fixture
def torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every CPU tensor takes the torch (accelerator) kernels for the whole test."""
    _set_kernels(monkeypatch, False)


@pytest.fixture
def both(monkeypatch: pytest.MonkeyPatch) -> Callable[[Callable[[], T]], tuple[T, T]]:
    """``both(fn)``: ``fn()`` with the NumPy kernels, then with the torch ones (``fn`` must make
    its own inputs, so that an in-place step sees the same ones twice)."""

    def run(fn: Callable[[], T]) -> tuple[T, T]:
        _set_kernels(monkeypatch, True)
        ref = fn()
        _set_kernels(monkeypatch, False)
        try:
            got = fn()
        finally:
            _set_kernels(monkeypatch, True)
        return ref, got

    return run


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], list[Any]]:
    """``calls(name)``: a list that records the results of every call to ``engine.selection.<name>``."""

    def spy(name: str) -> list[Any]:
        seen: list[Any] = []
        real = getattr(engine.selection, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = real(*args, **kwargs)
            seen.append(out)
            return out

        monkeypatch.setattr(engine.selection, name, wrapper)
        return seen

    return spy


def masks(name: str, args: dict, tensors: dict[str, torch.Tensor], levels: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
    sp = create_sparsifier(name, args)
    return sp.compute_masks(tensors, levels if levels is not None else sp.final_levels(tensors))


def assert_same(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert list(ref) == list(got)
    for n in ref:
        assert got[n].dtype == torch.bool and got[n].shape == ref[n].shape
        assert torch.equal(ref[n], got[n]), f"{n}: {int((ref[n] != got[n]).sum())} elements differ"


def pruned(mask: torch.Tensor) -> int:
    return int((~mask).sum())


def randn(*shape: int, seed: int = 0, zeros: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    if zeros:
        t[torch.rand(shape, generator=g) < zeros] = 0.0
    return t.to(dtype)


def model_tensors(zeros: float = 0.0) -> dict[str, torch.Tensor]:
    return {
        "fc.weight": randn(300, 500, seed=1, zeros=zeros),
        "conv.weight": randn(16, 8, 3, 3, seed=2, zeros=zeros),
        "bias": randn(77, seed=3, zeros=zeros),
        "emb.weight": randn(1000, 33, seed=4, zeros=zeros) * 3,
    }


# -- the switch --------------------------------------------------------------------------------
def test_the_switch_is_on_by_default_and_only_cpu_tensors_take_numpy():
    assert engine.kernels.NUMPY_KERNELS is True
    assert engine.kernels._numpy_kernels(torch.zeros(3))
    assert not engine.kernels._numpy_kernels(torch.zeros(3, device="meta"))


def test_the_guard_catches_a_numpy_kernel(torch_kernels):
    with pytest.raises(AssertionError, match="NumPy kernel ran in"):
        torch.zeros(3).numpy()
    assert not engine.kernels._numpy_kernels(torch.zeros(3))


# -- small kernels, one by one -----------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8, 9, 16])
def test_rank_keep_is_the_same_in_both_kernels(both, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randint(0, 4, (500, k), generator=g).float()  # many ties within a group

    def run() -> list[torch.Tensor]:
        outs = []
        for n_prune in range(k + 1):
            out = torch.empty(500, k, dtype=torch.bool)
            engine.rank_keep(x, n_prune, out)
            outs.append(out)
            strided = torch.empty(k, 500, dtype=torch.bool).t()  # a strided output too
            engine.rank_keep(x, n_prune, strided)
            assert torch.equal(strided, out)
        return outs

    ref, got = both(run)
    for n_prune, (a, b) in enumerate(zip(ref, got)):
        assert torch.equal(a, b), n_prune
        assert (b.sum(1) == k - n_prune).all()


@pytest.mark.parametrize("zeros", [0.0, 0.5, 0.99])
def test_kth_and_keep_above_kth_are_the_same_in_both_kernels(both, zeros):
    v = randn(10_000, seed=5, zeros=zeros).abs()

    def run() -> list[Any]:
        return [(engine.kernels._kth(v, k), engine.kernels._keep_above_kth(v, k)) for k in (1, 7, 5000, 9_900, 9_999)]

    ref, got = both(run)
    for (kr, mr), (kg, mg) in zip(ref, got):
        assert kr == kg and torch.equal(mr, mg)


@pytest.mark.parametrize("shape", [(16, 32), (7, 10), (33, 45), (1, 13), (5, 3)])
@pytest.mark.parametrize("block", [(1, 4), (2, 2), (3, 5), (4, 4)])
def test_block_means_are_bit_for_bit_the_same_in_both_kernels(both, shape, block):
    n = randn(*shape, seed=6).abs()
    rb, cb = -(-shape[0] // block[0]), -(-shape[1] // block[1])

    def run() -> torch.Tensor:
        out = torch.empty(rb, cb)
        engine.block_means_into(n, block, out)
        return out

    ref, got = both(run)
    assert torch.equal(ref, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_apply_mask_is_the_same_in_both_kernels(both, dtype):
    w = randn(64, 48, seed=7, dtype=dtype)
    mask = randn(64, 48, seed=8) > 0

    def run() -> torch.Tensor:
        t = w.clone()
        engine.apply_mask_(t, mask)
        return t

    ref, got = both(run)
    assert torch.equal(ref, got)
    assert torch.equal(torch.signbit(ref), torch.signbit(got))  # -w * 0 is -0.0 in both
    assert (got[~mask] == 0).all() and torch.equal(got[mask], w[mask])


# -- unstructured ------------------------------------------------------------------------------
@pytest.mark.parametrize("zeros", [0.0, 0.5])
@pytest.mark.parametrize("level", [0.0, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_layer_unstructured_is_the_same_in_both_kernels(both, path, level, zeros):
    tensors = model_tensors(zeros)
    ref, got = both(lambda: masks("magnitude", {"sparsity_level": level, "include": ["*"]}, tensors))
    assert_same(ref, got)
    for name, t in tensors.items():
        m = got[name]
        assert pruned(m) == round(level * t.numel())
        if 0 < pruned(m) < t.numel():
            assert t.abs()[~m].max() <= t.abs()[m].min()


@pytest.mark.parametrize("zeros", [0.0, 0.5])
@pytest.mark.parametrize("level", [0.3, 0.9])
def test_global_unstructured_is_the_same_in_both_kernels(both, path, level, zeros):
    tensors = model_tensors(zeros)
    ref, got = both(lambda: masks("magnitude", {"sparsity_level": level, "scope": "global", "include": ["*"]}, tensors))
    assert_same(ref, got)
    total = sum(t.numel() for t in tensors.values())
    assert sum(pruned(m) for m in got.values()) == round(level * total)
    scores = torch.cat([t.abs().view(-1) for t in tensors.values()])
    keep = torch.cat([m.view(-1) for m in got.values()])
    assert scores[~keep].max() <= scores[keep].min()


def test_ties_are_broken_by_position_with_torch_kernels(torch_kernels, path):
    t = {"a": torch.zeros(1000), "b": torch.ones(3000)}
    a = masks("magnitude", {"sparsity_level": 0.1, "scope": "global"}, t)
    assert pruned(a["a"]) == 400 and pruned(a["b"]) == 0
    assert not a["a"][:400].any() and a["a"][400:].all()
    b = masks("magnitude", {"sparsity_level": 0.5}, {"x": torch.ones(10)})
    assert b["x"].tolist() == [False] * 5 + [True] * 5


@pytest.mark.parametrize("level", [0.5, 0.9])
def test_a_large_tensor_takes_the_sampled_bracket_in_both_kernels(both, calls, level):
    w = randn(600, 1000, seed=9)  # 600K elements > EXACT
    assert w.numel() > engine.kernels.EXACT
    bracketed = calls("_select_bracketed")
    ref, got = both(lambda: masks("magnitude", {"sparsity_level": level}, {"w": w}))
    assert bracketed == [True, True]  # both kernels decided it in the bracket
    assert_same(ref, got)
    assert pruned(got["w"]) == round(level * w.numel())
    assert w.abs()[~got["w"]].max() <= w.abs()[got["w"]].min()


@pytest.mark.parametrize("level", [0.3, 0.5, 0.7])
def test_a_large_tensor_with_a_mass_of_zeros_takes_the_ties_path_in_both_kernels(both, calls, level):
    w = randn(600, 1000, seed=10)
    w.view(-1)[::2] = 0.0  # half already pruned: the cut falls in (or next to) the zeros
    ties = calls("_select_ties")
    ref, got = both(lambda: masks("magnitude", {"sparsity_level": level}, {"w": w}))
    assert_same(ref, got)
    m = got["w"]
    assert pruned(m) == round(level * w.numel())
    assert w.abs()[~m].max() <= w.abs()[m].min()
    if level < 0.5:  # the cut is inside the zeros: the earliest are pruned
        assert ties == [True, True]
        zeros = torch.nonzero(w.view(-1) == 0).view(-1)
        k = round(level * w.numel())
        assert not m.view(-1)[zeros[:k]].any() and m.view(-1)[zeros[k:]].all()


def test_a_global_group_of_large_tensors_is_the_same_in_both_kernels(both, calls):
    tensors = {"a": randn(400, 700, seed=11), "b": randn(300, 500, seed=12, zeros=0.3) * 2, "c": randn(50, seed=13)}
    bracketed = calls("_select_bracketed")
    ref, got = both(lambda: masks("magnitude", {"sparsity_level": 0.6, "scope": "global", "include": ["*"]}, tensors))
    assert bracketed == [True, True]
    assert_same(ref, got)
    assert sum(pruned(m) for m in got.values()) == round(0.6 * sum(t.numel() for t in tensors.values()))


# -- blocks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 12), (7, 10), (3, 3, 5, 5), (50,), (33, 70)])
@pytest.mark.parametrize("pattern", ["1x4", "2x2", "2x4"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_blocks_are_the_same_in_both_kernels(both, path, shape, pattern, scope):
    w = randn(*shape, seed=14, zeros=0.3)
    tensors = {"w": w, "v": randn(20, 24, seed=15)}
    ref, got = both(lambda: masks("magnitude", {"pattern": pattern, "sparsity_level": 0.5, "scope": scope, "include": ["*"]}, tensors))
    assert_same(ref, got)
    h, wd = map(int, pattern.split("x"))
    m2 = engine.view2d(got["w"])
    for r in range(0, m2.shape[0], h):
        for c in range(0, m2.shape[1], wd):
            block = m2[r : r + h, c : c + wd]
            assert block.all() or not block.any()
    if scope == "layer":
        assert abs(pruned(got["w"]) - 0.5 * w.numel()) <= h * wd / 2


# -- N:M ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(12, 40), (4, 3, 3, 3), (5, 30), (64, 1026)])
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8", "2:16"])
@pytest.mark.parametrize("level", [0.25, 0.5, 0.75, 1.0])
def test_nm_is_the_same_in_both_kernels(both, monkeypatch, shape, pattern, level):
    monkeypatch.setattr(engine.kernels, "CHUNK", 4096)  # several pieces / bands
    w = randn(*shape, seed=16, zeros=0.2)
    ref, got = both(lambda: masks("magnitude", {"pattern": pattern}, {"w": w}, {"w": level}))
    assert_same(ref, got)
    n, m = map(int, pattern.split(":"))
    prune = min(round(level * m), m - n)
    m2, s2 = engine.view2d(got["w"]), engine.view2d(w).abs()
    full = m2.shape[1] // m * m
    groups, scores = m2[:, :full].reshape(-1, m), s2[:, :full].reshape(-1, m)
    assert (groups.sum(-1) == m - prune).all()
    assert (scores.masked_fill(groups, -1.0).amax(-1) <= scores.masked_fill(~groups, float("inf")).amin(-1)).all()
    if full < m2.shape[1]:
        tail = m2.shape[1] - full
        assert (m2[:, full:].sum(-1) == tail - min(prune, max(tail - n, 0))).all()


def test_nm_ties_with_torch_kernels(torch_kernels):
    w = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 2.0]])
    mask = masks("magnitude", {"pattern": "2:4"}, {"w": w})["w"]
    assert mask.tolist() == [[False, False, True, True, False, False, True, True]]


# -- data_norm ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(16, 32), (7, 10), (33, 45), (1, 1, 13), (4, 3, 5)])
@pytest.mark.parametrize("block", [(1, 4), (2, 2), (3, 5), (8, 8)])
@pytest.mark.parametrize("zeros", [None, 0, 1, 2])
@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_data_norm_is_the_same_in_both_kernels(both, shape, block, zeros, norm):
    t = randn(*shape, seed=17, zeros=0.2)
    args = {"sparsity_level": 0.5, "sparse_block_shape": block, "zeros_per_block": zeros, "norm": norm}
    ref, got = both(lambda: masks("data_norm", args, {"x": t}))
    assert_same(ref, got)


@pytest.mark.parametrize("block", [(1, 4), (2, 2), (3, 5), (8, 8)])
@pytest.mark.parametrize("level", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(203, 157), (203, 160)])
def test_data_norm_through_the_bracket_is_the_same_in_both_kernels(both, monkeypatch, block, level, dtype, shape):
    monkeypatch.setattr(engine.kernels, "EXACT", 100)
    monkeypatch.setattr(engine.kernels, "SAMPLE", 2000)
    monkeypatch.setattr(engine.kernels, "CHUNK", 4096)
    t = randn(*shape, seed=18, zeros=0.3, dtype=dtype)
    args = {"sparsity_level": level, "sparse_block_shape": block, "zeros_per_block": 1, "norm": "L2"}
    ref, got = both(lambda: masks("data_norm", args, {"x": t}))
    assert_same(ref, got)


def test_data_norm_tied_means_take_the_ties_path_in_both_kernels(both, calls, monkeypatch):
    monkeypatch.setattr(engine.kernels, "EXACT", 10_000)
    monkeypatch.setattr(engine.kernels, "CHUNK", 1 << 16)
    t = torch.ones(700, 800)  # 140K 2x2 blocks, most of mean 1
    t[::7] = 0.5
    ties = calls("_select_ties")
    args = {"sparsity_level": 0.6, "sparse_block_shape": (2, 2), "norm": "L2"}
    ref, got = both(lambda: masks("data_norm", args, {"x": t}))
    assert ties == [True, True]
    assert_same(ref, got)
    assert pruned(got["x"]) == 4 * round(0.6 * 350 * 400)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "name,args",
    [
        ("magnitude", {"sparsity_level": 0.5}),
        ("magnitude", {"sparsity_level": 0.5, "scope": "global"}),
        ("magnitude", {"pattern": "2:4"}),
        ("magnitude", {"sparsity_level": 0.5, "pattern": "1x4"}),
        ("data_norm", {"sparsity_level": 0.5}),
        ("data_norm", {"sparsity_level": 1.0}),
    ],
)
def test_nan_or_inf_names_the_tensor_with_torch_kernels(torch_kernels, path, bad, name, args):
    w = torch.randn(64, 64)
    w[5, 7] = bad
    with pytest.raises(ValueError, match="'layer.weight' has NaN or inf"):
        masks(name, args, {"ok": torch.randn(8, 8), "layer.weight": w})


# -- random, bf16 ------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [{"sparsity_level": 0.7}, {"sparsity_level": 0.4, "scope": "global"}, {"pattern": "2x2"}, {"pattern": "2:4"}])
def test_random_is_the_same_in_both_kernels(both, path, args):
    tensors = {"a": torch.zeros(64, 48), "b": torch.zeros(10, 64)}
    ref, got = both(lambda: masks("random", {"seed": 3, **args}, tensors))
    assert_same(ref, got)


@pytest.mark.parametrize("args", [{"sparsity_level": 0.7}, {"sparsity_level": 0.6, "scope": "global"}, {"pattern": "2:4"}, {"pattern": "1x4", "sparsity_level": 0.5}])
def test_bf16_tensors_are_the_same_in_both_kernels(both, path, args):
    tensors = {"a": randn(200, 300, seed=19, dtype=torch.bfloat16), "b": randn(64, 40, seed=20, zeros=0.3, dtype=torch.bfloat16)}
    ref, got = both(lambda: masks("magnitude", {"include": ["*"], **args}, tensors))
    assert_same(ref, got)
    if "pattern" not in args and "scope" not in args:
        for n, t in tensors.items():
            assert pruned(got[n]) == round(0.7 * t.numel())


# -- the controller ----------------------------------------------------------------------------
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 8))


def _train(model: nn.Module, opt: torch.optim.Optimizer, n: int = 3) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(16, 20)).square().mean().backward()
        opt.step()


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "sparsifier,args",
    [
        ("magnitude", {"sparsity_level": 0.7}),
        ("magnitude", {"sparsity_level": 0.6, "scope": "global", "pattern": "2x2"}),
        ("magnitude", {"pattern": "2:4"}),
        ("data_norm", {"sparsity_level": 0.5, "sparse_block_shape": (2, 2), "zeros_per_block": 2}),
    ],
)
def test_a_gradual_run_with_attach_and_squash_is_the_same_in_both_kernels(both, sparsifier, args):
    def run() -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]], list[dict[str, float]]]:
        model = _mlp()
        c = SparsityController(model, sparsifier, args, "linear", {"start": 0, "end": 3})
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        c.attach(opt)
        weights, masks_at, reports = [], [], []
        for t in range(4):
            c.step(t)
            _train(model, opt)
            for name, mask in c.masks.items():  # the hook re-zeroed the pruned weights
                assert (c.tensors[name][~mask] == 0).all()
            weights.append(_weights(model))
            masks_at.append(dict(c.masks))
            reports.append(dict(c.report()))
        c.squash()
        assert c.masks == {}
        weights.append(_weights(model))
        reports.append(dict(c.report()))
        return weights, masks_at, reports

    (w_ref, m_ref, r_ref), (w_got, m_got, r_got) = both(run)
    for a, b in zip(m_ref, m_got):
        assert_same(a, b)
    for a, b in zip(w_ref, w_got):
        assert all(torch.equal(a[n], b[n]) for n in a)
    assert r_ref == r_got


@pytest.mark.parametrize(
    "name,args",
    [
        ("magnitude", {"sparsity_level": 0.6}),
        ("magnitude", {"pattern": "2:4"}),
        ("magnitude", {"pattern": "2x2", "sparsity_level": 0.5, "scope": "global"}),
        ("data_norm", {"sparsity_level": 0.5, "sparse_block_shape": (1, 4), "zeros_per_block": 4}),
        ("data_norm", {"sparsity_level": 0.5, "sparse_block_shape": (2, 2), "zeros_per_block": 1}),
    ],
)
def test_masks_applied_in_place_are_the_same_in_both_kernels(both, monkeypatch, name, args):
    """The fused compute-and-apply path, on contiguous tensors (piece by piece) and strided ones
    (applied once at the end), in several pieces."""
    monkeypatch.setattr(engine.kernels, "CHUNK", 1024)

    def run() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        tensors = {
            "flat": randn(40, 64, seed=24),
            "ragged": randn(30, 3, 3, 3, seed=25),
            "strided": randn(64, 40, seed=26).t(),
            "strided_ragged": randn(27, 30, seed=27).t(),
        }
        c = SparsityController(tensors, name, {"include": ["*"], **args})
        c.step()
        return dict(c.masks), {n: t.clone() for n, t in tensors.items()}

    (m_ref, w_ref), (m_got, w_got) = both(run)
    assert_same(m_ref, m_got)
    for n in w_ref:
        assert torch.equal(w_ref[n], w_got[n])
        assert (w_got[n][~m_got[n]] == 0).all() and (w_got[n][m_got[n]] != 0).all()


def test_squash_after_writes_that_bypass_the_masks_with_torch_kernels(torch_kernels):
    model = _mlp()
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.8})
    c.step()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _train(model, opt)  # not attached: Adam revives pruned weights
    kept = {n: m.clone() for n, m in c.masks.items()}
    assert any((c.tensors[n][~m] != 0).any() for n, m in kept.items())
    c.squash()
    for n, m in kept.items():
        assert (c.tensors[n][~m] == 0).all()
    assert c.report()["0.weight"] == pytest.approx(0.8, abs=1e-3)


def test_state_dict_round_trip_with_torch_kernels(torch_kernels):
    model = _mlp()
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.75, "pattern": "1x4"}, "linear", {"start": 0, "end": 2})
    c.step(1)
    buf = io.BytesIO()
    torch.save(c.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    other = _mlp()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)  # nothing pruned, so loading must zero the saved positions
    d = SparsityController(other, "magnitude", {"sparsity_level": 0.75, "pattern": "1x4"}, "linear", {"start": 0, "end": 2})
    d.load_state_dict(state)
    assert d.t == c.t and d.levels == c.levels
    assert_same(c.masks, d.masks)
    for n, m in d.masks.items():
        assert (d.tensors[n][~m] == 0).all() and (d.tensors[n][m] != 0).all()
    assert d.step(1) is False  # same level: nothing recomputed


# -- the report --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.bool])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "large"])
def test_report_counts_are_the_same_in_both_kernels(both, dtype, layout):
    g = torch.Generator().manual_seed(21)
    n = (1 << 18) + 5 if layout == "large" else 1000
    x = torch.randn(n, generator=g)
    x[torch.rand(n, generator=g) < 0.4] = 0.0
    x[torch.rand(n, generator=g) < 0.2] = -0.0  # a masked negative weight is -0.0
    t = (x * 10).to(dtype) if dtype not in (torch.bool,) else x != 0
    if layout == "strided":
        t = t.view(40, 25).t()
    expected = int((t == 0).sum())
    ref, got = both(lambda: SparsityReport.measure({"t": t}))
    assert ref.rows[0].zeros == got.rows[0].zeros == expected
    assert got["t"] == pytest.approx(expected / t.numel())


@pytest.mark.parametrize("args", [{"sparsity_level": 0.8, "scope": "global"}, {"pattern": "2:4"}, {"pattern": "4x4", "sparsity_level": 0.8, "scope": "global"}])
def test_a_multi_million_element_model_is_the_same_in_both_kernels(both, args):
    tensors = {"a": randn(2048, 2048, seed=22, zeros=0.1), "b": randn(1024, 3000, seed=23)}
    ref, got = both(lambda: masks("magnitude", {"include": ["*"], **args}, tensors))
    assert_same(ref, got)
