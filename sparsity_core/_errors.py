"""Exceptions and warnings. Each carries the culprit it names, for programs that catch it."""

from __future__ import annotations

from collections.abc import Sequence


class UnknownNameError(LookupError):
    """No registered implementation has this name."""

    def __init__(self, message: str, *, name: str, kind: str, suggestions: Sequence[str] = ()):
        super().__init__(message)
        self.name = name
        self.kind = kind
        self.suggestions = list(suggestions)

    def __str__(self) -> str:  # LookupError would repr() a single argument
        return str(self.args[0])


class AmbiguousNameError(LookupError):
    """A short name that more than one plugin provides; use a qualified ``plugin:name``."""

    def __init__(self, message: str, *, name: str, kind: str, candidates: Sequence[str]):
        super().__init__(message)
        self.name = name
        self.kind = kind
        self.candidates = list(candidates)

    def __str__(self) -> str:
        return str(self.args[0])


class PluginLoadError(RuntimeError):
    """A plugin failed to import or to register (raised in strict mode, or when it is asked for)."""

    def __init__(self, message: str, *, plugin: str):
        super().__init__(message)
        self.plugin = plugin


class PluginWarning(UserWarning):
    """A plugin was skipped because it is broken; everything else keeps working."""
