"""Which tensors are covered, under faults (issue 10, points 4-6): compiled models, reparametrized
layers and patterns that match nothing. Each of these was silently wrong before."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

import sparsity_core as sc


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


# importing torch.compile's machinery warns about torch.jit internals: not ours
compile_warnings = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@compile_warnings
def test_a_compiled_model_answers_to_its_plain_names() -> None:
    compiled = torch.compile(mlp())  # no compilation happens until it is called
    assert any(n.startswith("_orig_mod.") for n, _ in compiled.named_parameters())
    report = sc.sparsify(compiled, "magnitude", {"sparsity_level": 0.9, "exclude": ["2.*"]})
    assert list(report) == ["0.weight"]
    assert float((compiled._orig_mod[2].weight == 0).float().mean()) == 0.0  # the head is left alone


@compile_warnings
def test_a_compiled_submodule_too() -> None:
    model = mlp()
    model[0] = torch.compile(model[0])
    report = sc.sparsify(model, "magnitude", {"sparsity_level": 0.5, "overrides": {"0.weight": {"sparsity_level": 0.25}}})
    assert report["0.weight"] == 0.25 and report["2.weight"] == 0.5


@pytest.mark.parametrize(
    ("reparametrize", "how"),
    [
        (lambda m: parametrizations.weight_norm(m), "parametrized"),
        (lambda m: parametrizations.spectral_norm(m), "parametrized"),
        (lambda m: prune.l1_unstructured(m, "weight", 0.3), "torch.nn.utils.prune"),
    ],
)
def test_a_reparametrized_layer_is_refused_by_name_not_skipped(reparametrize, how: str) -> None:
    model = mlp()
    reparametrize(model[0])
    with pytest.raises(ValueError, match=rf"layer '0' \((Parametrized)?Linear\) cannot be covered by default: .*{how}"):
        sc.sparsify(model, "magnitude", {"sparsity_level": 0.5})
    # excluding it, or naming the tensor that holds the values, works
    assert list(sc.sparsify(model, "magnitude", {"sparsity_level": 0.5, "exclude": ["0.*"]})) == ["2.weight"]


def test_including_the_tensor_that_holds_the_values_sparsifies_the_weight() -> None:
    model = mlp()
    prune.identity(model[0], "weight")  # weight = weight_orig * weight_mask
    sc.sparsify(model, "magnitude", {"sparsity_level": 0.5, "include": ["0.weight_orig"]})
    model(torch.randn(2, 16))  # prune's forward pre-hook recomputes weight
    assert float((model[0].weight == 0).float().mean()) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"exclude": ["3.*"]}, r"exclude pattern '3.\*' matches no tensor name"),
        ({"exclude": ["2.wieght"]}, r"exclude pattern '2.wieght' matches no tensor name of the target; did you mean '2.weight'"),
        ({"overrides": {"head.*": {"sparsity_level": 0.1}}}, r"overrides pattern 'head.\*' matches no tensor name"),
    ],
)
def test_exclude_and_override_patterns_that_match_nothing_are_errors(args: dict, message: str) -> None:
    model = mlp()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        sc.sparsify(model, "magnitude", {"sparsity_level": 0.5, **args})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "refused, yet weights changed"


def test_an_exclude_of_an_uncovered_but_existing_name_is_fine() -> None:
    # biases are never covered by default, but the pattern names real tensors: not a typo
    assert list(sc.sparsify(mlp(), "magnitude", {"exclude": ["*.bias"]})) == ["0.weight", "2.weight"]
