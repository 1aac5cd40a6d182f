"""The conformance kit for plugin authors.

Run every contract check on an implementation and get a report by check name::

    from sparsity_core.testing import check_sparsifier
    report = check_sparsifier("wanda")        # or a class; raise_on_failure=True to assert
    print(report)                             # ok/FAIL per named check, with messages

or, under pytest, each check as its own test in an isolated registry (the pytest plugin
``sparsity_core.testing.pytest_plugin`` is loaded automatically where sparsity-core is installed)::

    from sparsity_core.testing import parametrize_with_checks

    @parametrize_with_checks(["wanda"], plugin="wanda")
    def test_conformance(check):
        check()

Importing this package is cheap (no torch); the checks load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "Check": "._parametrize",
    "CheckResult": "._checks",
    "KitReport": "._kit",
    "RankFailed": "._ranks",
    "SimulatedCommunicator": "._ranks",
    "SimulatedRanks": "._ranks",
    "assert_conforms": "._kit",
    "check_names": "._kit",
    "check_scheduler": "._kit",
    "check_sparsifier": "._kit",
    "chunk_rows": "._ranks",
    "isolated_registry": "._isolation",
    "masks_on_shards": "._ranks",
    "parametrize_with_checks": "._parametrize",
    "shard_rows": "._ranks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparsity_core.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover
    from ._checks import CheckResult
    from ._isolation import isolated_registry
    from ._kit import KitReport, assert_conforms, check_names, check_scheduler, check_sparsifier
    from ._parametrize import Check, parametrize_with_checks
    from ._ranks import RankFailed, SimulatedCommunicator, SimulatedRanks, chunk_rows, masks_on_shards, shard_rows
