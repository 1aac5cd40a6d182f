"""The hooks a plugin implements. Each hook receives ``register`` and calls it once per class (or layer kind)."""

from __future__ import annotations

from typing import Any, Callable, Final

import pluggy

PROJECT_NAME: Final = "sparsity_core"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def register_sparsifiers(register: Callable[[type[Any]], None]) -> None:
    """Call ``register(cls)`` for each :class:`~sparsity_core.Sparsifier` subclass you provide."""


@hookspec
def register_schedulers(register: Callable[[type[Any]], None]) -> None:
    """Call ``register(cls)`` for each :class:`~sparsity_core.Scheduler` subclass you provide."""


@hookspec
def register_layer_kinds(register: Callable[[Any], None]) -> None:
    """Call ``register(LayerKind(...))`` for each kind of layer you teach the core: its module classes, weights and their orientation."""
