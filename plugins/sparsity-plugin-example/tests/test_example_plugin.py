"""The example plugin: found through its installed entry point, and passing the conformance kit."""

from __future__ import annotations

import pytest
import torch

from sparsity_core import create_scheduler, list_schedulers, list_sparsifiers, sparsify
from sparsity_core.testing import parametrize_with_checks

# The plugin that the `sparsity_registry` fixture registers alone (with the built-ins).
pytestmark = pytest.mark.sparsity_plugin("example")


# Each check of each implementation is its own test, in a registry holding this plugin alone.
@parametrize_with_checks(["row_relative", "exponential"], plugin="example")
def test_conformance(check) -> None:
    check()


def test_registered_alone_through_its_entry_point(sparsity_registry) -> None:
    info = next(p for p in sparsity_registry.plugins() if p.name == "example")
    assert (info.distribution, info.status) == ("sparsity-plugin-example", "loaded")
    assert "row_relative" in list_sparsifiers() and "exponential" in list_schedulers()
    assert {p.name for p in sparsity_registry.plugins() if p.status == "loaded"} == {"builtin", "example"}


def test_every_row_keeps_its_largest_weights() -> None:
    # One row of huge weights and one of tiny ones: magnitude would prune the tiny row whole.
    w = torch.stack([torch.arange(1.0, 9.0) * 1000, torch.arange(1.0, 9.0) / 1000])
    sparsify({"w": w}, "row_relative", {"sparsity_level": 0.5})
    assert (w != 0).sum(1).tolist() == [4, 4]
    assert bool((w[:, 4:] != 0).all())


def test_exponential_is_front_loaded_and_ends_at_final() -> None:
    schedule = create_scheduler("exponential", {"start": 0, "end": 10})
    assert schedule(5, 0.8) > 0.4  # past half the final level at half way
    assert schedule(10, 0.8) == 0.8
