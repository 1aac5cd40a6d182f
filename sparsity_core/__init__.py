"""sparsity-core: sparsifiers and sparsity schedulers as plugins, for PyTorch and Lightning.

``import sparsity_core`` is cheap: it imports neither torch, Lightning nor any plugin. Each public
name is loaded from its private module on first access, and plugins are discovered on first use
of the registry.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import API_VERSION, __version__

# public name -> private module that defines it
_EXPORTS: dict[str, str] = {
    "AmbiguousNameError": "._errors",
    "Capabilities": "._contract",
    "LayerKind": "._layers",
    "MaskContext": "._contract",
    "Reconstruction": "._contract",
    "TensorLayout": "._layers",
    "PluginLoadError": "._errors",
    "PluginWarning": "._errors",
    "UnknownNameError": "._errors",
    "SchedulerSpec": "._specs",
    "ScoreSpec": "._specs",
    "SparsifierSpec": "._specs",
    "Scheduler": "._base",
    "ScoreSparsifier": "._base",
    "Sparsifier": "._base",
    "hookimpl": ".hookspecs",
    "create_scheduler": "._api",
    "create_sparsifier": "._api",
    "list_schedulers": "._api",
    "list_sparsifiers": "._api",
    "plugins": "._api",
    "sparsify": "._api",
    "SparsityController": "._controller",
    "SparsityReport": "._report",
    "load_sparse": ".deploy",
    "save_sparse": ".deploy",
    "to_semi_structured": ".deploy",
}

__all__ = sorted([*_EXPORTS, "API_VERSION", "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparsity_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._api import (
        create_scheduler,
        create_sparsifier,
        list_schedulers,
        list_sparsifiers,
        plugins,
        sparsify,
    )
    from ._base import Scheduler, ScoreSparsifier, Sparsifier
    from ._contract import Capabilities, MaskContext, Reconstruction
    from ._controller import SparsityController
    from ._layers import LayerKind, TensorLayout
    from ._errors import AmbiguousNameError, PluginLoadError, PluginWarning, UnknownNameError
    from ._report import SparsityReport
    from ._specs import SchedulerSpec, ScoreSpec, SparsifierSpec
    from .deploy import load_sparse, save_sparse, to_semi_structured
    from .hookspecs import hookimpl
