"""Training upkeep: ``attach(optimizer, upkeep=...)`` keeps pruned weights exactly zero.

``"weights"`` re-applies the masks after every step; ``"gradients"`` masks each gradient as it is
accumulated and zeroes the optimizer's state of pruned entries once per mask update. Each claim is
checked after every step of a run that trains dense first (so momentum and Adam's moments are
nonzero where weights get pruned), prunes, trains, prunes further, and trains again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from sparsity_core import Capabilities, ScoreSparsifier, SparsityController
from sparsity_core import _controller

Factory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]

# every optimizer configuration "gradients" upkeep is claimed for (weight decay and momentum
# included: a decayed or momentum term of a zero weight with zero state is zero)
VERIFIED: dict[str, Factory] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd-nesterov-dampening": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd-dampening-foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, foreach=True),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "adam-foreach-maximize": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=True, maximize=True),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=1e-2, fused=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adamw-amsgrad-foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=True),
    "adamw-fused": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, fused=True),
}


class NoisySGD(torch.optim.SGD):
    """SGD that adds Gaussian noise to every weight (Langevin-style): masking gradients cannot
    keep a weight at zero under it, only re-applying the mask can."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn_like(p), alpha=1e-3)
        return loss


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls: on a shared machine, extra intra-op threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 20, generator=gen), torch.randn(16, 5, generator=gen)) for _ in range(n)]


def pruned_nonzero(c: SparsityController) -> int:
    return sum(int((c.tensors[n].detach()[~m] != 0).sum()) for n, m in c.masks.items())


def run(
    factory: Factory, upkeep: str, check_each_step: bool = True, accumulate: int = 1
) -> tuple[nn.Module, SparsityController, list[int]]:
    """Dense steps, prune to 50%, steps, prune to 80%, steps; pruned nonzeros after each masked step."""
    model = mlp()
    opt = factory(list(model.parameters()))
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.8})
    c.attach(opt, upkeep=upkeep)
    seen: list[int] = []
    data = batches(40)
    for i, (x, y) in enumerate(data):
        if i == 10:
            c.update_masks(dict.fromkeys(c.tensors, 0.5))
        if i == 25:
            c.update_masks(dict.fromkeys(c.tensors, 0.8))
        opt.zero_grad()
        for _ in range(accumulate):
            (model(x) - y).square().mean().backward()
        opt.step()
        if c.masks and check_each_step:
            seen.append(pruned_nonzero(c))
    return model, c, seen


@pytest.mark.parametrize("name", sorted(VERIFIED))
@pytest.mark.parametrize("upkeep", ["weights", "gradients"])
def test_pruned_weights_stay_exactly_zero(name: str, upkeep: str) -> None:
    model, c, seen = run(VERIFIED[name], upkeep)
    assert len(seen) == 30 and seen == [0] * 30
    assert c.report().overall == pytest.approx(0.8, abs=0.01)
    # the kept weights did train (the run is not vacuous)
    assert all(bool(c.tensors[n].detach()[m].ne(0).all()) for n, m in c.masks.items())


@pytest.mark.parametrize("name", sorted(VERIFIED))
def test_gradient_upkeep_trains_the_kept_weights_as_weight_upkeep_does(name: str) -> None:
    """Element-wise optimizers: pruned entries never influence kept ones, so both paths give the
    very same network (bit for bit), and "gradients" never reads or writes a pruned weight."""
    a, _, _ = run(VERIFIED[name], "weights")
    b, _, _ = run(VERIFIED[name], "gradients")
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_gradient_accumulation_keeps_pruned_weights_zero() -> None:
    _, _, seen = run(VERIFIED["adamw"], "gradients", accumulate=3)
    assert seen == [0] * 30


def test_without_state_zeroing_momentum_revives_pruned_weights() -> None:
    """Masking gradients alone is not enough: the momentum built before the prune moves the
    pruned weights. This is what the state zeroing at each mask update is for."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.8})
    for x, y in batches(5):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    c.step()  # not attached: the optimizer state is left as it is
    c._hook_gradients(opt)  # the gradient hooks of upkeep="gradients", without its state zeroing
    x, y = batches(1, seed=9)[0]
    opt.zero_grad()
    (model(x) - y).square().mean().backward()
    opt.step()
    assert pruned_nonzero(c) > 0
    c.detach()


def test_loaded_optimizer_state_is_zeroed_at_pruned_entries() -> None:
    """A resume loads optimizer state written dense: with "gradients" it is masked on load."""
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y in batches(5):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
    dense_state = opt.state_dict()
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.8})
    c.attach(opt, upkeep="gradients")
    c.step()
    opt.load_state_dict(dense_state)
    for x, y in batches(5, seed=3):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
        assert pruned_nonzero(c) == 0


def test_an_optimizer_that_adds_noise_defeats_gradient_upkeep_and_auto_avoids_it() -> None:
    noisy: Factory = lambda p: NoisySGD(p, lr=0.05)  # noqa: E731
    _, _, seen = run(noisy, "gradients")
    assert min(seen) > 0
    _, _, seen = run(noisy, "weights")
    assert seen == [0] * 30
    _, _, seen = run(noisy, "auto")  # auto never masks gradients for a class not verified
    assert seen == [0] * 30


@pytest.mark.parametrize(
    ("factory", "cheaper_by_gradients", "expected"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), False, "gradients"),  # the measured table
        (lambda p: torch.optim.Adam(p, lr=1e-2), False, "weights"),
        (lambda p: torch.optim.AdamW(p, lr=1e-2), False, "weights"),
        (lambda p: NoisySGD(p, lr=0.05), False, "weights"),
        (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), True, "gradients"),
        (lambda p: torch.optim.Adam(p, lr=1e-2), True, "gradients"),
        (lambda p: torch.optim.AdamW(p, lr=1e-2), True, "gradients"),
        (lambda p: torch.optim.RMSprop(p, lr=1e-3), True, "weights"),  # not verified
        (lambda p: NoisySGD(p, lr=0.05), True, "weights"),  # a subclass is not the verified class
    ],
)
def test_auto_masks_gradients_only_for_verified_classes_measured_cheaper(
    factory: Factory, cheaper_by_gradients: bool, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _controller.AUTO_GRADIENTS <= _controller.GRADIENT_UPKEEP  # auto picks only verified classes
    if cheaper_by_gradients:  # as if the measurements had found "gradients" cheaper for every class
        monkeypatch.setattr(_controller, "AUTO_GRADIENTS", frozenset({torch.optim.SGD, torch.optim.Adam,
                                                                      torch.optim.AdamW, torch.optim.RMSprop, NoisySGD}))
    model = mlp()
    opt = factory(list(model.parameters()))
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.8})
    c.step()
    c.attach(opt, upkeep="auto")
    x, y = batches(1)[0]
    (model(x) - y).square().mean().backward()
    grads_masked = all(not bool(c.tensors[n].grad[~m].any()) for n, m in c.masks.items())
    assert grads_masked is (expected == "gradients")
    opt.step()
    assert pruned_nonzero(c) == 0
    c.detach()


class GradientRegrowth(ScoreSparsifier):
    """Scores |w * grad| from training gradients and may regrow pruned weights (RigL-like)."""

    name = "test-gradient-regrowth"
    capabilities = Capabilities(gradients=True, regrowth=True)

    def observe_gradient(self, name: str, tensor: torch.Tensor, grad: torch.Tensor) -> None:
        self.seen = grad.detach().clone()

    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.abs()


def test_auto_keeps_weights_for_a_sparsifier_that_needs_gradients() -> None:
    """Such a sparsifier must see the gradients of pruned weights: auto leaves them unmasked, and
    asking for "gradients" with one that regrows from them is refused by name."""
    assert torch.optim.SGD in _controller.AUTO_GRADIENTS
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    c = SparsityController(model, GradientRegrowth, {"sparsity_level": 0.5})
    assert type(opt) in _controller.GRADIENT_UPKEEP
    c.step()
    c.attach(opt, upkeep="auto")
    x, y = batches(1)[0]
    (model(x) - y).square().mean().backward()
    assert all(bool(c.tensors[n].grad[~m].any()) for n, m in c.masks.items())
    opt.step()
    assert pruned_nonzero(c) == 0
    c.detach()
    with pytest.raises(ValueError, match="'test-gradient-regrowth' regrows weights from gradients"):
        c.attach(opt, upkeep="gradients")


@pytest.mark.parametrize("upkeep", ["weights", "gradients"])
def test_detach_leaves_no_hook_behind(upkeep: str) -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.8})
    c.step()
    c.attach(opt, upkeep=upkeep)
    c.attach(opt, upkeep=upkeep)  # twice: still one gradient hook per parameter
    c.detach()
    assert not opt._optimizer_step_post_hooks and not opt._optimizer_load_state_dict_post_hooks
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    x, y = batches(1)[0]
    (model(x) - y).square().mean().backward()
    assert all(bool(c.tensors[n].grad[~m].any()) for n, m in c.masks.items())  # gradients not masked
    opt.step()
    assert pruned_nonzero(c) > 0  # nor the weights


def test_squash_removes_gradient_hooks() -> None:
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.8})
    c.step()
    c.attach(opt, upkeep="gradients")
    c.squash()
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())


def test_sparse_embedding_gradients_are_masked_and_stay_sparse() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(50, 8, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    c = SparsityController({"weight": emb.weight}, "magnitude", {"sparsity_level": 0.7})
    c.step()
    c.attach(opt, upkeep="gradients")
    for i in range(5):
        opt.zero_grad()
        (emb(torch.arange(i, 50, 3)) - 1).square().sum().backward()
        assert emb.weight.grad is not None and emb.weight.grad.is_sparse
        opt.step()
        assert pruned_nonzero(c) == 0
    assert bool(emb.weight.detach()[c.masks["weight"]].ne(0).all())
    c.detach()


def test_unknown_upkeep_is_refused_by_name() -> None:
    model = mlp()
    c = SparsityController(model, "magnitude", {"sparsity_level": 0.8})
    with pytest.raises(ValueError, match="upkeep must be 'auto', 'weights' or 'gradients', got 'grads'"):
        c.attach(torch.optim.SGD(model.parameters(), lr=0.1), upkeep="grads")  # type: ignore[arg-type]
