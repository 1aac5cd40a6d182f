"""The magnitude path on the weights' bits (``_engine/magnitude.py``) against the general path.

The fast path runs where masks are applied as they are chosen (``score_masks`` given ``applied``:
the controller's step, one-shot ``sparsify``); the general path (``compute_masks``, float32 scores)
is the reference: the very same masks in fp32, bf16 and fp16, ties by position (``-0.0`` ties
with ``0.0``), nested masks, global groups with per-tensor bounds, NaN and inf refused before
anything is written. Every test runs on each set of kernels: NumPy, the compiled ones (``native``:
AVX2 loops where the CPU has them) and the compiled portable C loops.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import sparsity_core._engine as engine
from sparsity_core import ScoreSparsifier, create_sparsifier
from sparsity_core._bits import PackedMask
from sparsity_core._contract import MaskContext
from sparsity_core._engine import magnitude, native, score_masks
from sparsity_core.builtin.sparsifiers import Magnitude

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weights(seed: int, dtype: torch.dtype, zeros: float = 0.0, levels: int = 0) -> dict[str, torch.Tensor]:
    """A small model's weights; ``levels`` > 0 draws them from that many magnitudes (mass ties),
    with both signs of zero among the zeros."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"fc.weight": (300, 500), "conv.weight": (16, 8, 3, 3), "bias": (77,), "emb.weight": (1000, 33), "big.weight": (700, 800)}
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        t = torch.randn(shape, generator=g) * (1 + i / 4)
        if levels:
            t = torch.randint(0, levels, shape, generator=g).float() * torch.sign(t)
        if zeros:
            z = torch.rand(shape, generator=g) < zeros
            t[z] = torch.where(torch.rand(shape, generator=g) < 0.5, -0.0, 0.0)[z]
        out[name] = t.to(dtype)
    return out


@pytest.fixture(autouse=True, params=["numpy", "native", "native-portable"])
def kernel_set(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The magnitude path's kernels under test (see the module docstring)."""
    if request.param != "numpy" and not native.AVAILABLE:
        pytest.skip("the compiled kernels were not built (no C compiler at install)")
    monkeypatch.setattr(engine.kernels, "NATIVE_KERNELS", request.param != "numpy")
    monkeypatch.setattr(engine.kernels, "NATIVE_SIMD", request.param == "native")
    return request.param


@pytest.fixture
def fast_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, for every fast-path selection, whether it decided (False: it fell back)."""
    seen: list[bool] = []
    real = magnitude.select_group

    def spy(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(magnitude, "select_group", spy)
    return seen


def reference(sp: ScoreSparsifier, tensors: dict[str, torch.Tensor], levels: dict[str, float], context: MaskContext | None = None) -> dict[str, torch.Tensor]:
    """The general path's masks (no ``applied``: float32 scores, the selection of selection.py)."""
    return score_masks(sp, tensors, levels, context=context)


def fast(sp: ScoreSparsifier, tensors: dict[str, torch.Tensor], levels: dict[str, float], context: MaskContext | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Masks and the masked weights through the fused path (on copies)."""
    copies = {n: t.clone() for n, t in tensors.items()}
    applied: dict[str, Any] = {}
    score_masks(sp, copies, levels, applied, context=context)
    assert set(applied) == set(copies)
    masks = {n: m.to_bool() if isinstance(m, PackedMask) else m for n, m in applied.items()}  # handed over packed
    return masks, copies


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def assert_same(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], masked: dict[str, torch.Tensor]) -> None:
    for n in ref:
        assert torch.equal(ref[n], got[n]), f"{n}: {int((ref[n] != got[n]).sum())} elements differ"
        assert torch.equal(masked[n], tensors[n] * ref[n]), n  # -0.0 == 0.0: the masked weights are equal


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("level", [0.0, 0.3, 0.9, 0.999, 1.0])
def test_the_same_masks_as_the_general_path(fast_calls, dtype, scope, level):
    tensors = weights(1, dtype)
    sp = create_sparsifier("magnitude", {"sparsity_level": level, "scope": scope, "include": ["*"]})
    levels = sp.final_levels(tensors)
    masks, masked = fast(sp, tensors, levels)
    assert fast_calls and all(fast_calls)  # decided on the bits, no fallback
    assert_same(reference(sp, tensors, levels), masks, tensors, masked)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("level", [0.2, 0.9])
@pytest.mark.parametrize("chunk", [1 << 18, 1000])
def test_ties_and_signed_zeros_are_pruned_earliest_first(fast_calls, monkeypatch, dtype, scope, level, chunk):
    """Weights of few magnitudes (every cut falls in a mass of ties) and zeros of both signs;
    with small pieces the ties of one tensor span many of them."""
    monkeypatch.setattr(engine.kernels, "CHUNK", chunk)
    tensors = weights(2, dtype, zeros=0.2, levels=40)
    sp = create_sparsifier("magnitude", {"sparsity_level": level, "scope": scope, "include": ["*"]})
    levels = sp.final_levels(tensors)
    masks, masked = fast(sp, tensors, levels)
    assert any(fast_calls)
    assert_same(reference(sp, tensors, levels), masks, tensors, masked)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", [0.55, 0.6, 0.601, 0.7, 0.95, 0.3, 0.35])
def test_a_mass_of_ties_at_either_edge_of_the_bracket_is_counted(fast_calls, dtype, level):
    """Distinct magnitudes, then a mass of one value above them (a cut below, at, or inside the
    mass), and a mass of zeros below them: masses at the bracket's edges are counted, not
    gathered, and ties still go earliest first."""
    g = torch.Generator().manual_seed(13)
    distinct = torch.linspace(0.01, 1.0, 30_000)
    w = torch.cat([torch.zeros(30_000), distinct, torch.full((40_000,), 2.0)])
    w = (w[torch.randperm(w.numel(), generator=g)] * torch.where(torch.rand(w.numel(), generator=g) < 0.5, -1.0, 1.0)).to(dtype)
    sp = create_sparsifier("magnitude", {"sparsity_level": level})
    masks, masked = fast(sp, {"w": w}, {"w": level})
    assert fast_calls == [True]
    assert_same(reference(sp, {"w": w}, {"w": level}), masks, {"w": w}, masked)


def test_minus_zero_ties_with_zero_by_position(fast_calls):
    w = torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, 2.0, -1.0, 0.0] * 1000)
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.3})
    masks, masked = fast(sp, {"w": w}, {"w": 0.3})
    assert fast_calls == [True]
    pruned = torch.nonzero(~masks["w"]).view(-1)
    assert pruned.numel() == 2400 and torch.equal(pruned, torch.nonzero(w == 0).view(-1)[:2400])
    assert torch.equal(masks["w"], reference(sp, {"w": w}, {"w": 0.3})["w"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:8"])
@pytest.mark.parametrize("ties", [0, 5])
def test_nm_is_the_same_as_the_float32_ranks(monkeypatch, dtype, pattern, ties):
    monkeypatch.setattr(engine.kernels, "CHUNK", 4096)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 96, generator=g)
    if ties:
        w = torch.randint(-ties, ties + 1, w.shape, generator=g).float()
    w = w.to(dtype)
    sp = create_sparsifier("magnitude", {"pattern": pattern})
    got, masked = fast(sp, {"w": w}, {"w": 1.0})
    monkeypatch.setattr(engine.kernels, "NUMPY_KERNELS", False)  # the torch kernels: float32 scores
    ref = reference(sp, {"w": w}, {"w": 1.0})
    assert torch.equal(ref["w"], got["w"])
    assert torch.equal(masked["w"], w * ref["w"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_are_refused_before_anything_is_written(dtype, scope, bad):
    tensors = weights(4, dtype)
    tensors["emb.weight"][3, 7] = bad
    before = {n: t.clone() for n, t in tensors.items()}
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.9, "scope": scope, "include": ["*"]})
    with pytest.raises(ValueError, match="'emb.weight' has NaN or inf"):
        score_masks(sp, tensors, sp.final_levels(tensors), {})
    later = list(tensors).index("emb.weight")
    for i, n in enumerate(tensors):
        if scope == "global" or i >= later:  # layer scope has masked the tensors before it, as the general path does
            assert torch.equal(bits(tensors[n]), bits(before[n])), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nan_among_pruned_weights_is_still_refused(dtype):
    """Nested masks: a weight already pruned still has to be a number (as on the general path)."""
    w = torch.randn(200, 300).to(dtype)
    keep = w.abs() > 0.5
    w[~keep] = 0.0
    idx = torch.nonzero(~keep)[0]
    w[idx[0], idx[1]] = float("nan")
    with pytest.raises(ValueError, match="'w' has NaN or inf"):
        score_masks(Magnitude({"sparsity_level": 0.8}), {"w": w}, {"w": 0.8}, {}, context=MaskContext(current={"w": keep}))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_nested_masks_prune_the_current_ones_first(fast_calls, dtype, scope):
    """Currently pruned weights (not zeroed here, so that only the mask can say so) are pruned
    again first, and the level is met exactly; the same masks as the general path."""
    tensors = weights(5, dtype, zeros=0.1)
    g = torch.Generator().manual_seed(6)
    current = {n: torch.rand(t.shape, generator=g) > 0.4 for n, t in tensors.items()}
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.7, "scope": scope, "include": ["*"]})
    levels = sp.final_levels(tensors)
    context = MaskContext(current=current)
    masks, masked = fast(sp, tensors, levels, context)
    assert any(fast_calls)
    ref = reference(sp, tensors, levels, context)
    assert_same(ref, masks, tensors, masked)
    for n, m in masks.items():
        assert not (m & ~current[n]).any()  # nothing pruned comes back


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_global_group_where_only_some_tensors_have_a_current_mask(fast_calls, dtype):
    """Keys of a nested group are moved up by one in every tensor alike, masked or not (a tensor
    with no current mask, or one that prunes nothing, still ranks against the others by |w|)."""
    tensors = weights(14, dtype)
    g = torch.Generator().manual_seed(15)
    current = {"fc.weight": torch.rand(300, 500, generator=g) > 0.5, "bias": torch.ones(77, dtype=torch.bool)}
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.6, "scope": "global", "include": ["*"]})
    levels = sp.final_levels(tensors)
    context = MaskContext(current=current)
    masks, masked = fast(sp, tensors, levels, context)
    assert fast_calls == [True]
    assert_same(reference(sp, tensors, levels, context), masks, tensors, masked)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bounds",
    [{}, {"max_level_per_tensor": 0.95}, {"min_level_per_tensor": 0.5}, {"min_level_per_tensor": 0.6, "max_level_per_tensor": 0.93}],
)
def test_global_with_per_tensor_bounds(fast_calls, dtype, bounds):
    """One tensor of tiny weights (the head) that a global cut would empty, one of huge ones it
    would leave dense: the bounds hold and the masks are the general path's."""
    tensors = weights(7, dtype)
    tensors["head.weight"] = (torch.randn(50, 400, generator=torch.Generator().manual_seed(8)) * 1e-3).to(dtype)
    tensors["huge.weight"] = (torch.randn(60, 300, generator=torch.Generator().manual_seed(9)) * 1e3).to(dtype)
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.9, "scope": "global", "include": ["*"], **bounds})
    levels = sp.final_levels(tensors)
    masks, masked = fast(sp, tensors, levels)
    assert fast_calls
    assert_same(reference(sp, tensors, levels), masks, tensors, masked)
    total = sum(t.numel() for t in tensors.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.9 * total)


def test_global_default_cap_decides_on_the_bits(fast_calls):
    """The default cap (0.98) is checked on the counts of the census: no second pass, no fallback."""
    tensors = weights(10, torch.bfloat16)
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.9, "scope": "global", "include": ["*"]})
    levels = sp.final_levels(tensors)
    masks, masked = fast(sp, tensors, levels)
    assert fast_calls == [True]
    assert_same(reference(sp, tensors, levels), masks, tensors, masked)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_bracket_that_misses_falls_back_to_the_same_masks(fast_calls, monkeypatch, scope):
    """A sample of a handful of keys (a bracket that misses, or holds too many) falls back to the
    general path before anything is written."""
    monkeypatch.setattr(engine.kernels, "SAMPLE", 4)
    monkeypatch.setattr(engine.kernels, "Z", 0.0)
    tensors = weights(11, torch.float32)
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.6, "scope": scope, "include": ["*"]})
    levels = sp.final_levels(tensors)
    masks, masked = fast(sp, tensors, levels)
    assert not all(fast_calls)
    monkeypatch.undo()
    assert_same(reference(sp, tensors, levels), masks, tensors, masked)


def test_the_declaration_belongs_to_the_class_that_defines_score(fast_calls):
    class Squared(Magnitude):  # overrides score without declaring: taken at its own word only
        name = "squared"

        def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
            return tensor.float() ** 2

    class Declared(ScoreSparsifier):
        name = "declared"
        ranks_like_magnitude = True

        def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
            return tensor.abs()

    class Revoked(Magnitude):
        name = "revoked"
        ranks_like_magnitude = False

    assert magnitude.ranks_like_magnitude(Magnitude()) and magnitude.ranks_like_magnitude(Declared())
    assert not magnitude.ranks_like_magnitude(Squared()) and not magnitude.ranks_like_magnitude(Revoked())
    w = {"w": torch.randn(100, 100)}
    for cls, used in ((Squared, False), (Revoked, False), (Declared, True)):
        fast_calls.clear()
        fast(cls({"sparsity_level": 0.5}), w, {"w": 0.5})
        assert bool(fast_calls) is used, cls.__name__


def test_float64_and_strided_tensors_take_the_general_path(fast_calls):
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.5})
    fast(sp, {"w": torch.randn(100, 100, dtype=torch.float64)}, {"w": 0.5})  # float32 scores round: not |w|'s order
    fast(sp, {"w": torch.randn(100, 100).t()}, {"w": 0.5})
    assert fast_calls == []


def test_one_shot_sparsify_in_bf16_prunes_exactly(fast_calls):
    import sparsity_core as sc

    torch.manual_seed(12)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Linear(512, 128)).to(torch.bfloat16)
    ref = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    sc.sparsify(model, "magnitude", {"sparsity_level": 0.9, "scope": "global"})
    assert fast_calls == [True]
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.9, "scope": "global"})
    expected = reference(sp, ref, sp.final_levels(ref))
    for n, p in model.named_parameters():
        if n in ref:
            assert torch.equal(p.detach(), ref[n] * expected[n])



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
@pytest.mark.parametrize("nested", [False, True])
def test_nm_down_the_rows_of_a_conv1d_weight(kernel_set, monkeypatch, dtype, pattern, nested):
    """transformers' Conv1D ([in, out], reduction axis dim 0): N:M groups run down the rows; the
    fast path (compiled kernels) gives the general path's masks, ties by row, nested masks kept."""
    from sparsity_core._layers import TensorLayout

    g = torch.Generator().manual_seed(17)
    tensors = {
        "attn": torch.randint(-3, 4, (64, 48), generator=g).float().to(dtype),  # ties everywhere
        "mlp": torch.randn(96, 40, generator=g).to(dtype),  # 40 columns: not whole vectors
    }
    conv1d = TensorLayout("conv1d", output_axis=1, input_axis=0, matmul=True)
    current = {n: torch.rand(t.shape, generator=g) > 0.2 for n, t in tensors.items()} if nested else {}
    context = MaskContext(current=current, layouts={n: conv1d for n in tensors})
    sp = create_sparsifier("magnitude", {"pattern": pattern, "include": ["*"]})
    levels = sp.final_levels(tensors)
    rows_calls: list[str] = []
    real = magnitude.nm_keep_rows
    monkeypatch.setattr(magnitude, "nm_keep_rows", lambda name, *a: rows_calls.append(name) or real(name, *a))
    masks, masked = fast(sp, tensors, levels, context)
    assert rows_calls == ([] if kernel_set == "numpy" else list(tensors))  # NumPy: the general path
    ref = reference(sp, tensors, levels, context)
    assert_same(ref, masks, tensors, masked)
    n_keep, m_group = (int(x) for x in pattern.split(":"))
    for n, m in masks.items():
        kept = m.T.reshape(m.shape[1], -1, m_group).sum(-1)  # groups along dim 0
        assert (kept <= n_keep).all() if nested else (kept == n_keep).all()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_census_that_overflows_its_room_runs_again_with_all_of_the_cap(fast_calls, monkeypatch, kernel_set, scope):
    """The compiled census gets room for twice the keys the sample puts in the bracket; when a band
    holds more (simulated: the first census reports an overflow), the census runs again with the
    whole cap, and the masks are the same."""
    if kernel_set == "numpy":
        pytest.skip("the room is the compiled census's")
    rooms: list[int] = []
    real = magnitude._census_native

    def once_too_small(group, lo, hi, mass_lo, mass_hi, room, sparsifier):  # type: ignore[no-untyped-def]
        rooms.append(room)
        return False if len(rooms) == 1 else real(group, lo, hi, mass_lo, mass_hi, room, sparsifier)

    monkeypatch.setattr(magnitude, "_census_native", once_too_small)
    g = torch.Generator().manual_seed(18)
    # large enough that the room (twice the sampled band, plus 64K) is less than the cap (an eighth)
    tensors = {"a": torch.randn(1500, 1000, generator=g).to(torch.bfloat16), "b": torch.randn(900, 1000, generator=g).to(torch.bfloat16)}
    sp = create_sparsifier("magnitude", {"sparsity_level": 0.8, "scope": scope, "include": ["*"]})
    levels = sp.final_levels(tensors)
    masks, masked = fast(sp, tensors, levels)
    assert all(fast_calls) and rooms[1] > rooms[0]
    assert_same(reference(sp, tensors, levels), masks, tensors, masked)
