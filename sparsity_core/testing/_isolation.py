"""An isolated registry: the built-ins plus one plugin, nothing else that is installed."""

from __future__ import annotations

import os
import warnings
from types import ModuleType

from .._errors import PluginWarning
from .._registry import Registry, normalize


def isolated_registry(plugin: str | ModuleType | object | None = None, *, name: str | None = None) -> Registry:
    """A registry holding the built-ins and ``plugin`` alone.

    ``plugin`` is an installed plugin's entry-point or distribution name (found through its real
    entry point, loaded strictly: a broken plugin raises), or a module/object with hook
    implementations registered under ``name`` (default: its ``__name__``), or None for built-ins
    only. The ``SPARSITY_*`` variables of the environment are ignored.
    """
    if plugin is None:
        return Registry(autoload=False)
    if not isinstance(plugin, str):
        label = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        return Registry(autoload=False, plugins=[(label.rpartition(".")[2], plugin)])
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPARSITY_")}
    environ.update(SPARSITY_PLUGINS=plugin, SPARSITY_STRICT_PLUGINS="1")
    registry = Registry(environ=environ)
    with warnings.catch_warnings():
        # a name no plugin has: the LookupError below says so, with what to do
        warnings.filterwarnings("ignore", r"SPARSITY_PLUGINS=.* which no installed sparsity plugin has", PluginWarning)
        infos = registry.plugins()
    wanted = normalize(plugin)
    if not any(p.status == "loaded" and wanted in {normalize(p.name), normalize(p.distribution or "")} for p in infos):
        installed = sorted(p.name for p in infos if p.name != "builtin")
        raise LookupError(
            f"no installed sparsity plugin is named {plugin!r} (by entry point or distribution); "
            f"installed: {installed or 'none'}. Install it first, e.g. `pip install -e .` in the plugin's folder"
        )
    return registry
