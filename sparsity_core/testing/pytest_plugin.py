"""pytest plugin of the conformance kit (registered under the ``pytest11`` entry point).

It is loaded in every pytest run where sparsity-core is installed, so it imports nothing heavy:
no torch, no plugin. It provides

- the marker ``@pytest.mark.sparsity_plugin(name_or_module)``: which plugin a test is about;
- the fixture ``sparsity_registry``: the process-wide registry replaced, for the test, by one that
  holds the built-ins and that plugin alone (from the marker, else the ``sparsity_plugin``
  fixture, which authors may override, else the ``sparsity_plugin`` ini option); no other
  installed plugin is visible;
- with ``parametrize_with_checks`` (in :mod:`sparsity_core.testing`), each check as its own test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from sparsity_core._registry import Registry


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "sparsity_plugin",
        "the sparsity plugin (entry-point or distribution name) the sparsity_registry fixture isolates",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "sparsity_plugin(name_or_module): the sparsity plugin that the sparsity_registry fixture registers alone",
    )


@pytest.fixture
def sparsity_plugin(request: pytest.FixtureRequest) -> Any:
    """The plugin under test; override this fixture, or use the marker or the ini option."""
    return request.config.getini("sparsity_plugin") or None


@pytest.fixture
def sparsity_registry(request: pytest.FixtureRequest, sparsity_plugin: Any) -> Iterator[Registry]:
    """A registry with the built-ins and the plugin under test alone, made current for the test."""
    from sparsity_core._registry import use_registry
    from sparsity_core.testing._isolation import isolated_registry

    marker = request.node.get_closest_marker("sparsity_plugin")
    plugin = marker.args[0] if marker is not None and marker.args else sparsity_plugin
    with use_registry(isolated_registry(plugin)) as registry:
        yield registry
