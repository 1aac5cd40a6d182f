"""The built-in implementations: a plugin like any other, registered through the same hooks."""

from __future__ import annotations

from typing import Any, Callable

from ..hookspecs import hookimpl


@hookimpl
def register_sparsifiers(register: Callable[[type[Any]], None]) -> None:
    from .sparsifiers import BUILTIN_SPARSIFIERS

    for cls in BUILTIN_SPARSIFIERS:
        register(cls)


@hookimpl
def register_schedulers(register: Callable[[type[Any]], None]) -> None:
    from .schedulers import BUILTIN_SCHEDULERS

    for cls in BUILTIN_SCHEDULERS:
        register(cls)


@hookimpl
def register_layer_kinds(register: Callable[[Any], None]) -> None:
    from .._layers import BUILTIN_LAYER_KINDS

    for kind in BUILTIN_LAYER_KINDS:
        register(kind)
