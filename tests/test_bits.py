"""1-bit masks: packing, applying in pieces, the controller's packed storage and state, one-shot drops."""

from __future__ import annotations

import copy
import io
import math
from typing import Any

import pytest
import torch
from torch import nn

import sparsity_core as sc
import sparsity_core._engine as engine
from sparsity_core import SparsityController, _bits
from sparsity_core._bits import MaskView, PackedMask
from sparsity_core._engine import native


@pytest.fixture(params=["native", "numpy", "torch"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every kernel of _bits: the compiled ones (``engine.native``) and NumPy's on CPU, and the
    torch ones accelerators run. True for the CPU ones."""
    if request.param == "native" and not native.AVAILABLE:
        pytest.skip("the compiled kernels were not built (no C compiler at install)")
    monkeypatch.setattr(engine.kernels, "NUMPY_KERNELS", request.param != "torch")
    monkeypatch.setattr(engine.kernels, "NATIVE_KERNELS", request.param == "native")
    return request.param != "torch"


def random_mask(shape: tuple[int, ...], seed: int = 0, keep: float = 0.3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) < keep


# -- PackedMask ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (1,), (7,), (8,), (9,), (63,), (5, 13), (3, 4, 5, 7), (1000,)])
def test_pack_round_trip_odd_and_empty_sizes(kernels: bool, shape: tuple[int, ...]) -> None:
    mask = random_mask(shape)
    packed = PackedMask.pack(mask)
    assert packed.data.dtype == torch.uint8 and packed.nbytes == math.ceil(mask.numel() / 8)
    assert packed.shape == mask.shape
    back = packed.to_bool()
    assert back.dtype == torch.bool and back.shape == mask.shape and torch.equal(back, mask)
    assert packed.kept() == int(mask.sum()) and packed.pruned() == mask.numel() - int(mask.sum())
    assert packed.pad_bits_clear()
    assert packed.prunes() is (not bool(mask.all()))


def test_pack_of_non_contiguous_masks(kernels: bool) -> None:
    base = random_mask((13, 22), seed=1)
    for mask in (base.t(), base[:, ::3], base[2:9, 5:17], base.t()[::2]):
        assert not mask.is_contiguous()
        assert torch.equal(PackedMask.pack(mask).to_bool(), mask)


def test_the_bit_layout_is_numpy_little_endian_in_c_order() -> None:
    # element i is bit i % 8 of byte i // 8: a saved state is readable without this package
    mask = torch.tensor([True, False, False, False, False, False, False, False, False, True])
    assert PackedMask.pack(mask).data.tolist() == [1, 2]
    assert PackedMask.pack(mask.view(2, 5).t()).data.tolist() == PackedMask.pack(mask.view(2, 5).t().contiguous()).data.tolist()


def test_unpacking_a_piece_and_reading_positions(kernels: bool) -> None:
    mask = random_mask((1001,), seed=2)
    packed = PackedMask.pack(mask)
    assert torch.equal(packed.unpack(16, 803), mask[16:803])
    assert torch.equal(packed.unpack(3, 10), mask[3:10]) and torch.equal(packed.unpack(997), mask[997:])
    assert packed.unpack(5, 5).numel() == 0
    index = torch.tensor([0, 7, 8, 500, 1000, 999])
    assert torch.equal(packed.at(index), mask[index])
    with pytest.raises(ValueError, match="elements 990:1002 are outside the mask's 1001"):
        packed.unpack(990, 1002)


def test_only_bool_masks_pack_and_data_must_fit_the_shape() -> None:
    with pytest.raises(TypeError, match="only a bool mask can be packed, got torch.float32"):
        PackedMask.pack(torch.ones(3))
    with pytest.raises(ValueError, match="1-D uint8 tensor of 2 bytes for shape \\(3, 3\\)"):
        PackedMask(torch.zeros(3, dtype=torch.uint8), (3, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64])
@pytest.mark.parametrize("shape", [(37, 29), (1,), (0, 4), (4, 5, 6)])
def test_apply_in_pieces_equals_the_bool_multiply(kernels: bool, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    monkeypatch.setattr(_bits, "CHUNK", 64)  # many pieces, and a ragged last one
    monkeypatch.setattr(_bits, "TORCH_CHUNK", 64)
    gen = torch.Generator().manual_seed(3)
    tensor = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    mask = random_mask(shape, seed=4)
    expected = tensor * mask
    PackedMask.pack(mask).apply_(tensor)
    assert torch.equal(tensor, expected)


def test_apply_to_a_non_contiguous_tensor_and_across_devices_of_the_same_kind() -> None:
    weight = torch.randn(20, 30)
    view = weight.t()
    mask = random_mask((30, 20), seed=5)
    expected = view * mask
    PackedMask.pack(mask).apply_(view)
    assert torch.equal(view, expected)
    with pytest.raises(ValueError, match="mask of shape \\(30, 20\\) cannot be applied to a tensor of shape \\(20, 30\\)"):
        PackedMask.pack(mask).apply_(weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_apply_through_the_bits_zeroes_pruned_nan_and_keeps_bits(kernels: bool, dtype: torch.dtype) -> None:
    if not kernels:
        pytest.skip("the torch kernels (accelerators) multiply: a pruned NaN stays NaN there")
    if dtype == torch.float32 and not native.enabled():
        pytest.skip("fp32 goes through the bits only on the compiled kernels (NumPy multiplies)")
    tensor = torch.tensor([float("nan"), -1.5, 2.0, -0.0, 3.0] * 9, dtype=dtype)  # 45: a vector and a tail
    before = tensor.clone()
    mask = torch.tensor([False, True, False, True, False] * 9)
    PackedMask.pack(mask).apply_(tensor)
    view = torch.int32 if dtype == torch.float32 else torch.int16
    assert tensor.view(view)[mask].tolist() == before.view(view)[mask].tolist()  # kept: bit-identical
    assert (tensor.view(view)[~mask] == 0).all()  # pruned: +0.0, a NaN included


def test_mask_view_unpacks_on_each_read_and_is_read_only() -> None:
    masks = {"a": PackedMask.pack(random_mask((4, 4))), "b": PackedMask.pack(random_mask((9,), seed=1))}
    view = MaskView(masks)
    assert list(view) == ["a", "b"] and len(view) == 2 and "a" in view and "z" not in view
    first = view["a"]
    first.fill_(False)  # a fresh tensor: the stored mask is untouched
    assert torch.equal(view["a"], masks["a"].to_bool()) and view["a"].any()
    assert view.get("z") is None
    with pytest.raises(TypeError):
        view["a"] = first  # type: ignore[index]


# -- the controller ------------------------------------------------------------------------------
def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(33, 65), nn.ReLU(), nn.Linear(65, 11)).to(dtype)


def test_a_controller_holds_an_eighth_of_the_bool_masks_bytes() -> None:
    c = SparsityController(mlp(), "magnitude", {"sparsity_level": 0.5})
    c.step()
    packed = c.masks.packed()
    stored = sum(m.data.numel() * m.data.element_size() for m in packed.values())
    as_bool = sum(t.numel() for t in c.tensors.values())
    assert stored == sum(math.ceil(t.numel() / 8) for t in c.tensors.values())
    assert stored <= as_bool / 8 + len(packed)
    # what readers get is still one bool mask per tensor
    assert all(m.dtype == torch.bool and m.shape == c.tensors[n].shape for n, m in c.masks.items())
    state = c.state_dict()
    assert sum(m.numel() for m in state["masks"].values()) == stored
    assert all(m.dtype == torch.uint8 for m in state["masks"].values())


def test_assigning_bool_masks_packs_them_and_checks_names_and_shapes() -> None:
    c = SparsityController(mlp(), "magnitude", {"sparsity_level": 0.5})
    masks = {n: random_mask(tuple(t.shape), seed=i) for i, (n, t) in enumerate(c.tensors.items())}
    c.masks = masks
    assert all(isinstance(m, PackedMask) for m in c.masks.packed().values())
    assert all(torch.equal(c.masks[n], m) for n, m in masks.items())
    with pytest.raises(ValueError, match="masks: 'nope' is not a covered tensor"):
        c.masks = {"nope": torch.ones(3, dtype=torch.bool)}
    with pytest.raises(ValueError, match="masks: '0.weight' is not a covered tensor of shape \\(3,\\)"):
        c.masks = {"0.weight": torch.ones(3, dtype=torch.bool)}


def saved(c: SparsityController) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save(c.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_round_trips_packed_through_weights_only_load() -> None:
    c = SparsityController(mlp(), "random", {"sparsity_level": 0.6, "seed": 2}, "linear", {"end": 4})
    c.step(2)
    state = saved(c)
    assert state["version"] == 3 and state["shapes"] == {n: list(t.shape) for n, t in c.tensors.items()}
    fresh = SparsityController(mlp(1), "random", {"sparsity_level": 0.6, "seed": 2}, "linear", {"end": 4})
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.masks[n], c.masks[n]) for n in c.masks)
    assert all(not fresh.tensors[n][~m].any() for n, m in fresh.masks.items())
    assert fresh.step(2) is False


@pytest.mark.parametrize("version", [1, 2])
def test_an_old_state_with_bool_masks_still_loads(version: int) -> None:
    c = SparsityController(mlp(), "magnitude", {"sparsity_level": 0.5})
    c.step()
    bools = {n: m.clone() for n, m in c.masks.items()}
    old = {"version": version, "sparsifier": "magnitude", "t": c.t, "levels": dict(c.levels), "masks": bools}
    if version == 2:
        old["pruned"] = {n: int((~m).sum()) for n, m in bools.items()}
        old["fingerprint"] = c.fingerprint()
    buffer = io.BytesIO()
    torch.save(old, buffer)
    buffer.seek(0)
    fresh = SparsityController(mlp(3), "magnitude", {"sparsity_level": 0.5})
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(fresh.masks[n], m) for n, m in bools.items())
    assert all(isinstance(m, PackedMask) for m in fresh.masks.packed().values())
    assert all(not fresh.tensors[n][~m].any() for n, m in bools.items())


def damaged_packed(change: str) -> dict[str, Any]:
    c = SparsityController(mlp(), "magnitude", {"sparsity_level": 0.5})
    c.step()
    state = saved(c)
    masks, shapes = dict(state["masks"]), dict(state["shapes"])
    data = masks["2.weight"]  # 11 x 65 = 715 elements: 90 bytes, the last one with 5 pad bits
    if change == "short":
        masks["2.weight"] = data[:-1]
    elif change == "2-D":
        masks["2.weight"] = data.view(2, 45)
    elif change == "int16":
        masks["2.weight"] = data.to(torch.int16)
    elif change == "pad bits":
        data = data.clone()
        data[-1] |= 0b1110_0000
        masks["2.weight"] = data
    elif change == "shape":
        shapes["2.weight"] = [65, 11]
    elif change == "shape not ints":
        shapes["2.weight"] = "65x11"
    elif change == "no shapes":
        return {k: v for k, v in state.items() if k != "shapes"}
    elif change == "bit flipped":
        data = data.clone()
        data[0] ^= 1
        masks["2.weight"] = data
    return {**state, "masks": masks, "shapes": shapes}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("short", r"mask of '2.weight' holds \(89,\) bytes; a packed mask of shape \(11, 65\) is 1-D with 90"),
        ("2-D", r"mask of '2.weight' holds \(2, 45\) bytes"),
        ("int16", r"mask of '2.weight' has dtype torch.int16, not torch.uint8 \(packed, 8 elements a byte\) or torch.bool"),
        ("pad bits", r"mask of '2.weight' has bits set past its 715 elements: the mask is damaged"),
        ("shape", r"mask of '2.weight' has shape \(65, 11\), the tensor \(11, 65\)"),
        ("shape not ints", r"the shape of the mask of '2.weight' must be a list of ints, got '65x11'"),
        ("no shapes", r"'shapes' \(the shape of each packed mask\) must be a mapping of names, got NoneType"),
        ("bit flipped", r"mask of '2.weight' prunes \d+ elements, but \d+ were pruned when it was saved"),
    ],
)
def test_a_damaged_packed_state_is_refused_naming_the_mask(change: str, message: str) -> None:
    model = mlp(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.5})
    with pytest.raises(ValueError, match=message) as exc:
        c.load_state_dict(damaged_packed(change))
    assert str(exc.value).startswith("sparsity state")
    assert c.masks == {} and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("compiled", [False, True])
def test_attached_fp32_masks_are_held_unpacked_only_without_the_compiled_kernels(monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    """Without the compiled kernels an fp32 mask is held unpacked while attached (the bool multiply
    is faster than NumPy's unpacking); with them it stays packed (their pass over the bits is)."""
    if compiled and not native.AVAILABLE:
        pytest.skip("the compiled kernels were not built (no C compiler at install)")
    monkeypatch.setattr(engine.kernels, "NATIVE_KERNELS", compiled)
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 100).to(torch.bfloat16))
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.7})
    c.step()
    c.apply_masks()
    assert all(isinstance(mask, PackedMask) for _, mask in c._plan[1])  # type: ignore[index]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    c.attach(opt)
    c.apply_masks()
    kinds = {t.dtype: type(mask) for t, mask in c._plan[1]}  # type: ignore[index]
    fp32 = PackedMask if compiled else torch.Tensor
    assert kinds == {torch.float32: fp32, torch.bfloat16: PackedMask}  # bf16: packed measured faster
    model[0].weight.grad = torch.ones(100, 100)
    model[1].weight.grad = torch.ones(100, 100, dtype=torch.bfloat16)
    opt.step()
    assert all(not c.tensors[n][~m].any() for n, m in c.masks.items())
    c.detach()
    assert c._plan is None and c._unpacked == {}
    c.apply_masks()
    assert all(isinstance(mask, PackedMask) for _, mask in c._plan[1])  # type: ignore[index]


@pytest.mark.parametrize("compiled", [False, True])
def test_gradient_upkeep_and_optimizer_state_use_the_packed_masks(monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    if compiled and not native.AVAILABLE:
        pytest.skip("the compiled kernels were not built (no C compiler at install)")
    monkeypatch.setattr(engine.kernels, "NATIVE_KERNELS", compiled)
    model = mlp()
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.8})
    c.step()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    c.attach(opt, upkeep="gradients")
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 33)).pow(2).sum().backward()
        opt.step()
    # fp32: the gradient hooks multiply by bool copies, unless the compiled kernels mask the bits
    assert set(c._unpacked) == (set() if compiled else set(c.masks))
    assert all(held[0] is c.masks.packed()[n] for n, held in c._unpacked.items())
    for name, mask in c.masks.items():
        assert not c.tensors[name][~mask].any()
        assert not c.tensors[name].grad[~mask].any()
        assert not opt.state[c.tensors[name]]["exp_avg"][~mask].any()


# -- the selection hands packed masks over; one-shot keeps none ------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        {"sparsity_level": 0.9, "scope": "global"},
        {"sparsity_level": 0.75},
        {"sparsity_level": 0.5, "pattern": "2x2"},
    ],
)
def test_a_large_fused_selection_equals_the_bool_one(args: dict[str, Any]) -> None:
    # above engine.kernels.EXACT units, so the bracketed selection runs, writing packed bits piece by piece
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(600, 300), nn.Linear(300, 500))
    ref = copy.deepcopy(model)
    c = SparsityController(model, "magnitude", args)
    c.step()
    expected = c.sparsifier.compute_masks({n: p for n, p in ref.named_parameters() if n in c.tensors}, c.levels)
    for name, mask in expected.items():
        assert torch.equal(c.masks[name], mask), name
        assert torch.equal(c.tensors[name], ref.get_parameter(name) * mask)


def test_a_selection_through_ties_equals_the_bool_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine.kernels, "CHUNK", 1000)  # pieces off byte boundaries, too
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(600, 300), nn.Linear(300, 500))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape).float())  # masses of equal scores at the cut
    ref = copy.deepcopy(model)
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.5, "scope": "global"})
    c.step()
    expected = c.sparsifier.compute_masks({n: p for n, p in ref.named_parameters() if n in c.tensors}, c.levels)
    for name, mask in expected.items():
        assert torch.equal(c.masks[name], mask), name


def test_score_masks_hands_each_mask_over_and_keeps_none() -> None:
    torch.manual_seed(0)
    tensors = {"a": torch.randn(400, 400), "b": torch.randn(300, 500), "c": torch.randn(8, 8)}
    sparsifier = sc.create_sparsifier("magnitude", {"sparsity_level": 0.9, "scope": "global"})
    handed: dict[str, Any] = {}
    originals = {n: t.clone() for n, t in tensors.items()}
    out = engine.score_masks(sparsifier, tensors, dict.fromkeys(tensors, 0.9), handed)
    assert out is handed and list(handed) == ["a", "b", "c"]
    assert all(isinstance(m, PackedMask) for m in handed.values())  # a global group is held packed
    bools = engine.score_masks(sparsifier, originals, dict.fromkeys(tensors, 0.9))
    for name, mask in bools.items():
        assert torch.equal(handed[name].to_bool(), mask)
        assert torch.equal(tensors[name], originals[name] * mask)


def test_sparsify_drops_each_mask_once_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    held: list[int] = []
    packed: list[int] = []
    step = SparsityController.step

    def spying_step(self: SparsityController, t: float | None = None) -> bool:
        real_pack = PackedMask.pack

        def counting_pack(mask: torch.Tensor) -> PackedMask:
            packed.append(mask.numel())
            return real_pack(mask)

        monkeypatch.setattr(PackedMask, "pack", staticmethod(counting_pack))
        changed = step(self, t)
        held.append(len(self._masks) + len(self._masked))
        return changed

    monkeypatch.setattr(SparsityController, "step", spying_step)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(32, 3))
    report = sc.sparsify(model, "magnitude", {"sparsity_level": 0.8})
    assert held == [0]  # nothing held once the masks are applied
    assert packed == []  # and nothing even packed: each bool mask went as soon as it was applied
    assert report.overall == pytest.approx(0.8, abs=0.01)
    for layer in model:
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.8, abs=0.02)
    report = sc.sparsify(mlp(), "data_norm", {"sparsity_level": 0.5})  # the other fused path
    assert held == [0, 0] and report.overall == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize(
    "args",
    [
        {"sparsity_level": 0.9, "scope": "global"},
        {"sparsity_level": 0.8},
        {"sparsity_level": 0.6, "pattern": "2x2"},
        {"sparsity_level": 0.5, "pattern": "channel"},
    ],
)
def test_a_gradual_update_reads_the_packed_masks_in_force_as_the_bool_ones(args: dict[str, Any]) -> None:
    # the selection gets the controller's masks packed (unpacked a piece at a time): the same
    # nested masks as with the bool masks in a plain MaskContext
    from sparsity_core._contract import MaskContext

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(600, 300), nn.Linear(300, 500), nn.Conv2d(8, 16, 3))
    c = SparsityController(model, "magnitude", args, "linear", {"end": 2})
    c.step(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # training moved the weights (pruned ones too)
    weights = {n: t.detach().clone() for n, t in c.tensors.items()}
    context = MaskContext(current={n: c.masks[n] for n in c.masks}, layouts=dict(c.layouts))
    expected = engine.score_masks(c.sparsifier, weights, c.levels_at(2), context=context)
    c.step(2)
    for name, mask in expected.items():
        assert torch.equal(c.masks[name], mask), name
        assert not (c.masks[name] & ~context.current[name]).any()  # nested: nothing revived
