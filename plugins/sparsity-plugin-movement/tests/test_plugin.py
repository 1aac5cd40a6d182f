"""The distribution: found through its entry point, and conforming to the kit."""

from __future__ import annotations

import sparsity_plugin_movement
from sparsity_core.testing import parametrize_with_checks
from sparsity_plugin_movement import Movement, Snip


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
def test_conformance(check) -> None:
    check()
