"""The distribution: found through its entry point, and conforming to the kit."""

from __future__ import annotations

import inspect

import pytest

import sparsity_plugin_movement
from sparsity_core.testing import parametrize_with_checks
from sparsity_plugin_movement import Movement, Snip



def _kit_feeds_gradients() -> bool:
    """Whether the conformance kit hands gradients to a capabilities.gradients sparsifier (v2)."""
    from sparsity_core.testing import _checks

    source = inspect.getsource(_checks)
    return "observe_gradient" in source or "loss_fn" in source


# Checks of the v1 kit that compute masks without ever delivering a gradient, so that our
# sparsifiers rightly raise "needs gradients". Expected to fail (not strictly) until the kit feeds
# gradients; the rest (spec and class attributes) must pass already.
V1_KIT_NEEDS_GRADIENTS = frozenset(
    {
        "masks_boolean_and_shaped",
        "level_unstructured_layer",
        "level_unstructured_global",
        "pattern_block_1x4",
        "pattern_nm_2_4",
        "importance_order_layer",
        "importance_order_global",
        "levels_zero_and_one",  # the core's selection scores even at levels 0 and 1 now (main e7c10c1)
        "inputs_not_modified",
        "deterministic",
        "state_roundtrip",
        "bfloat16",
        "tensor_ranks_1d_4d",
        "mapping_target",
    }
)


def test_found_through_its_installed_entry_point() -> None:
    from sparsity_core._registry import Registry

    registry = Registry(environ={})  # the real environment's entry points, no SPARSITY_* switches
    info = next(p for p in registry.plugins() if p.name == "movement")
    assert (info.distribution, info.status, sorted(info.sparsifiers)) == ("sparsity-plugin-movement", "loaded", ["movement", "snip"])
    assert registry.get("sparsifier", "movement").cls is Movement
    assert registry.get("sparsifier", "movement:snip").cls is Snip


def test_declares_api_2_and_gradients() -> None:
    assert sparsity_plugin_movement.SPARSITY_CORE_API == 2
    for cls in (Movement, Snip):
        assert cls.capabilities.gradients and not cls.capabilities.calibration
        assert not cls.needs_calibration  # no activations: no forward hooks, no calibration batches of inputs alone


@parametrize_with_checks(["movement", "snip"], plugin="movement")
def test_conformance(check, request: pytest.FixtureRequest) -> None:
    if check.check in V1_KIT_NEEDS_GRADIENTS and not _kit_feeds_gradients():
        request.applymarker(pytest.mark.xfail(reason="the v1 conformance kit computes masks without gradients", strict=False))
    check()
