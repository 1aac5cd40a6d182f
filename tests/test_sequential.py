"""Sequential (block-by-block) calibration: ``sparsify(..., calibration=batches, sequential=...)``
equals a hand-written loop that prunes block ``i`` on the outputs of the already-pruned blocks
before it, then the covered tensors outside every block on one forward pass of the pruned model."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch
from torch import nn

from sparsity_core import Capabilities, ScoreSparsifier, SparsityController, sparsify

WANDA = {"sparsity_level": 0.5}


# -- models -------------------------------------------------------------------------------------
class Block(nn.Module):
    """A pre-norm residual MLP block; ``mask`` (optional) gates its update."""

    def __init__(self, d: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.drop(self.fc2(torch.relu(self.fc1(self.norm(x)))))
        return x + (h if mask is None else h * mask)


class ResMLP(nn.Module):
    """stem -> blocks (an nn.ModuleList, a plain chain) -> head; stem and head outside the blocks."""

    def __init__(self, d: int = 16, n: int = 3, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Linear(8, d)
        self.blocks = nn.ModuleList(Block(d, dropout) for _ in range(n))
        self.head = nn.Linear(d, 4)

    def between(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """What the model does to block ``i``'s output before block ``i + 1`` sees it."""
        return h

    def block_kwargs(self, i: int, mask: torch.Tensor | None) -> dict[str, Any]:
        return {} if mask is None else {"mask": mask}

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = self.between(i, block(h, **self.block_kwargs(i, mask)))
        return self.head(h)


class Scaled(ResMLP):
    """Not a plain chain: the model scales (and shifts) x between blocks."""

    def between(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return 0.5 * h + 0.1 * (i + 1)


class PerBlockMask(ResMLP):
    """Not a plain chain either: each block gets its own keyword argument (a different mask)."""

    def block_kwargs(self, i: int, mask: torch.Tensor | None) -> dict[str, Any]:
        return {} if mask is None else {"mask": mask * (i + 1)}


class Named(ResMLP):
    """Dict batches: ``model(**batch)`` with keyword inputs, as a Hugging Face collator yields."""

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(features, mask)


def data(n: int = 3, rows: int = 12, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 8, generator=g) for _ in range(n)]


def gate(seed: int = 2) -> torch.Tensor:
    return (torch.rand(16, generator=torch.Generator().manual_seed(seed)) > 0.3).float()


# -- the hand-written reference -----------------------------------------------------------------
def prune(module: nn.Module, inputs: list[Any], sparsifier: Any = "wanda", args: Mapping[str, Any] = WANDA) -> None:
    """One dense calibration of ``module`` alone on ``inputs`` (the public one-shot API)."""
    sparsify(module, sparsifier, dict(args), calibration=inputs)


def hand_loop(model: ResMLP, xs: list[torch.Tensor], mask: torch.Tensor | None = None, **kw: Any) -> None:
    with torch.no_grad():
        hs = [model.stem(x) for x in xs]  # the stem (outside the blocks) is pruned last
        for i, block in enumerate(model.blocks):
            extra = model.block_kwargs(i, mask)
            prune(block, [{"x": h, **extra} for h in hs], **kw)
            hs = [model.between(i, block(h, **extra)) for h in hs]  # outputs of the pruned block
        prune(model.head, hs, **kw)  # on the outputs of the pruned blocks
        prune(model.stem, xs, **kw)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    pruned = [n for n, p in sa.items() if n.endswith("weight") and (p == 0).any()]
    assert pruned, "nothing was pruned: the comparison proves nothing"


def no_hooks(model: nn.Module) -> bool:
    return all(
        not (m._forward_pre_hooks or m._forward_hooks or m._forward_pre_hooks_with_kwargs or m._forward_hooks_with_kwargs)
        for m in model.modules()
    )


# -- equal to the hand loop ---------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ResMLP, Scaled], ids=["chain", "scaled-between-blocks"])
def test_sequential_wanda_equals_the_hand_written_block_loop(cls: type[ResMLP]) -> None:
    model, reference = cls(), cls()
    xs = data()
    report = sparsify(model, "wanda", WANDA, calibration=xs, sequential="blocks.*")
    hand_loop(reference, xs)
    assert_same_weights(model, reference)
    assert report.overall == 0.5 and len(report) == 2 + 2 * 3
    assert no_hooks(model)


def test_sequential_differs_from_one_dense_pass() -> None:
    # otherwise the tests above could pass with a dense calibration
    model, dense = ResMLP(), ResMLP()
    xs = data()
    sparsify(model, "wanda", WANDA, calibration=xs, sequential="blocks.*")
    sparsify(dense, "wanda", WANDA, calibration=xs)
    assert not torch.equal(model.blocks[2].fc1.weight, dense.blocks[2].fc1.weight)
    assert torch.equal(model.blocks[0].fc1.weight, dense.blocks[0].fc1.weight)  # block 0 sees dense inputs either way


@pytest.mark.parametrize("cls", [ResMLP, PerBlockMask], ids=["same-kwarg", "per-block-kwarg"])
def test_keyword_arguments_of_the_blocks_are_kept(cls: type[ResMLP]) -> None:
    model, reference = cls(), cls()
    xs, m = data(), gate()
    sparsify(model, "wanda", WANDA, calibration=[(x, m) for x in xs], sequential="blocks.*")
    hand_loop(reference, xs, m)
    assert_same_weights(model, reference)
    assert no_hooks(model)


def test_dict_batches_with_sequential() -> None:
    model, reference = Named(), Named()
    xs, m = data(), gate()
    sparsify(model, "wanda", WANDA, calibration=[{"features": x, "mask": m} for x in xs], sequential="blocks.*")
    hand_loop(reference, xs, m)
    assert_same_weights(model, reference)
    assert no_hooks(model)


def test_blocks_as_a_list_of_names() -> None:
    by_list, by_glob = ResMLP(), ResMLP()
    xs = data()
    sparsify(by_list, "wanda", WANDA, calibration=xs, sequential=["blocks.0", "blocks.1", "blocks.2"])
    sparsify(by_glob, "wanda", WANDA, calibration=xs, sequential="blocks.*")
    assert_same_weights(by_list, by_glob)


def test_sequential_calibration_runs_in_eval_mode_like_dense_calibration() -> None:
    # dropout inside the blocks, model left in train mode: calibration must not see dropped units
    model, reference = ResMLP(dropout=0.5), ResMLP(dropout=0.5)
    xs = data()
    torch.manual_seed(123)
    sparsify(model, "wanda", WANDA, calibration=xs, sequential="blocks.*")
    assert model.training and all(m.training for m in model.modules())  # mode restored
    reference.eval()
    hand_loop(reference, xs)
    assert_same_weights(model, reference)


# -- one block's statistics at a time -----------------------------------------------------------
class InputRMS(ScoreSparsifier):
    """|W| x the RMS of the input feature each weight multiplies (Linear [out, in] and
    transformers' Conv1D [in, out]); counts how many tensors' statistics it holds at once."""

    name = "input_rms_test"
    capabilities = Capabilities(calibration=True)

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.sum_sq: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.transposed: dict[str, bool] = {}
        self.peak = 0
        self.asked: list[list[str]] = []

    def reset_calibration(self) -> None:
        self.sum_sq.clear()
        self.rows.clear()

    def observe(self, name: str, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        self.sum_sq[name] = self.sum_sq.get(name, 0) + x.pow(2).sum(0)
        self.rows[name] = self.rows.get(name, 0) + x.shape[0]
        self.transposed[name] = type(module).__name__ == "Conv1D"
        self.peak = max(self.peak, len(self.sum_sq))

    def compute_masks(self, tensors, levels, context=None):  # type: ignore[no-untyped-def]
        self.asked.append(list(tensors))
        return super().compute_masks(tensors, levels, context)

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        rms = (self.sum_sq[name] / self.rows[name]).sqrt().float()
        return tensor.abs() * (rms[:, None] if self.transposed[name] else rms)


def test_one_block_of_statistics_at_a_time_and_only_that_blocks_tensors() -> None:
    model = ResMLP()
    sparsifier = InputRMS({"sparsity_level": 0.5})
    sparsify(model, sparsifier, calibration=data(), sequential="blocks.*")
    assert sparsifier.asked == [
        ["blocks.0.fc1.weight", "blocks.0.fc2.weight"],
        ["blocks.1.fc1.weight", "blocks.1.fc2.weight"],
        ["blocks.2.fc1.weight", "blocks.2.fc2.weight"],
        ["stem.weight", "head.weight"],
    ]
    assert sparsifier.peak == 2 and sparsifier.sum_sq == {}  # freed after the last one

    dense = InputRMS({"sparsity_level": 0.5})
    sparsify(ResMLP(), dense, calibration=data())
    assert dense.peak == 8  # without sequential every tensor's statistics exist at once


# -- misuse -------------------------------------------------------------------------------------
def test_a_pattern_that_matches_nothing_is_a_value_error_naming_it() -> None:
    model = ResMLP()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"sequential='layers\.\*' matches no module of ResMLP"):
        sparsify(model, "wanda", WANDA, calibration=data(), sequential="layers.*")
    with pytest.raises(ValueError, match=r"blocks\.7"):
        SparsityController(model, "wanda", WANDA, sequential=["blocks.7"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_global_scope_with_sequential_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"scope='global'"):
        sparsify(ResMLP(), "wanda", {"sparsity_level": 0.5, "scope": "global"}, calibration=data(), sequential="blocks.*")
    with pytest.raises(ValueError, match=r"scope='global'"):
        SparsityController(ResMLP(), "wanda", {"sparsity_level": 0.5, "overrides": {"head.*": {"scope": "global"}}}, sequential="blocks.*")


# -- a real transformer -------------------------------------------------------------------------
class Call(nn.Module):
    """Calls a block with captured positional and keyword arguments (for the hand loop)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return self.block(*args, **kwargs)


def block_inputs(model: nn.Module, block: nn.Module, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The arguments ``block`` receives in a forward pass of ``model`` (as it is now) per batch."""
    seen: list[dict[str, Any]] = []
    handle = block.register_forward_pre_hook(lambda _m, a, k: seen.append({"args": a, "kwargs": k}), with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        handle.remove()
    return seen


GPT2_WEIGHTS = ["*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight"]


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


@pytest.mark.slow
@pytest.mark.parametrize("sparsifier", [InputRMS, "wanda"])
@pytest.mark.parametrize("use_cache", [False, None], ids=["use_cache=False", "default-cache"])
def test_tiny_gpt2_sequential_equals_its_hand_loop(sparsifier: Any, use_cache: bool | None) -> None:
    model, reference = tiny_gpt2(), tiny_gpt2()
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, 64, (2, 12), generator=g) for _ in range(3)]
    # input_ids dict batches, as a collator yields them (by default GPT-2 keeps a KV cache)
    batches = [{"input_ids": i} if use_cache is None else {"input_ids": i, "use_cache": use_cache} for i in ids]
    args = {"sparsity_level": 0.5, "include": GPT2_WEIGHTS}
    report = sparsify(model, sparsifier, args, calibration=batches, sequential="transformer.h.*")
    assert len(report) == 8 and report.overall == 0.5

    clean = [{"input_ids": i, "use_cache": False} for i in ids]
    for block in reference.transformer.h:  # block i calibrated on the outputs of the pruned blocks before it
        prune(Call(block), block_inputs(reference, block, clean), sparsifier, args)
    assert_same_weights(model, reference)
    assert no_hooks(model)


class Failing(InputRMS):
    """Fails while observing the second block (a module that cannot be calibrated, say)."""

    name = "failing_test"

    def observe(self, name: str, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if name.startswith("blocks.1."):
            raise RuntimeError(f"cannot observe {name}")
        super().observe(name, module, inputs)


def test_no_hook_is_left_when_a_block_fails() -> None:
    model = ResMLP()
    with pytest.raises(RuntimeError, match=r"cannot observe blocks\.1\.fc1\.weight"):
        sparsify(model, Failing, {"sparsity_level": 0.5}, calibration=data(), sequential="blocks.*")
    assert no_hooks(model)
    assert (model.blocks[0].fc1.weight == 0).any() and not (model.blocks[1].fc1.weight == 0).any()
