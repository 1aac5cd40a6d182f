"""``parametrize_with_checks``: each conformance check of each implementation as its own test."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

from .._registry import Kind, use_registry

F = TypeVar("F", bound=Callable[..., Any])
Item = str | type | tuple[str | type, Mapping[str, Any]]


@dataclass(frozen=True)
class Check:
    """One named check bound to one implementation; call it to run it (AssertionError on failure)."""

    kind: Kind
    target: str | type
    check: str
    args: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def id(self) -> str:
        label = self.target if isinstance(self.target, str) else getattr(self.target, "name", "") or self.target.__qualname__
        return f"{label}-{self.check}"

    def __call__(self) -> None:
        from ._checks import CheckSkipped, Subject, checks_for

        import pytest

        subject = Subject(self.kind, self.target, dict(self.args), self.seed)
        spec = next(s for s in checks_for(self.kind, subject.cls, by_name=isinstance(self.target, str)) if s.name == self.check)
        reason = spec.skip_reason(subject)
        if reason is not None:
            pytest.skip(reason)
        try:
            spec.func(subject)
        except CheckSkipped as exc:
            pytest.skip(str(exc))

    def __repr__(self) -> str:
        return f"Check({self.id})"


def _split(item: Item) -> tuple[str | type, Mapping[str, Any]]:
    if isinstance(item, tuple):
        target, args = item
        return target, args
    return item, {}


def parametrize_with_checks(
    implementations: Iterable[Item], *, plugin: str | ModuleType | None = None, seed: int = 0
) -> Callable[[F], F]:
    """Decorate a test taking ``check`` so that every check of every implementation is its own test.

    ``implementations``: names, classes, or ``(name_or_class, args)`` pairs. With ``plugin`` (an
    installed plugin's name, or a module with hook implementations) names are resolved in an
    isolated registry holding that plugin alone plus the built-ins, both at collection and when
    each test runs (through the ``sparsity_registry`` fixture)::

        @parametrize_with_checks(["wanda"], plugin="wanda")
        def test_conformance(check):
            check()
    """
    import pytest

    from ._isolation import isolated_registry
    from ._kit import check_names, kind_of

    registry = isolated_registry(plugin) if plugin is not None else None
    params = []
    with use_registry(registry) if registry is not None else contextlib.nullcontext():
        for item in implementations:
            target, args = _split(item)
            kind = kind_of(target)
            for name in check_names(kind, target):
                check = Check(kind, target, name, dict(args), seed)
                params.append(pytest.param(check, id=check.id))

    def decorate(func: F) -> F:
        func = pytest.mark.parametrize("check", params)(func)
        if plugin is not None:
            func = pytest.mark.sparsity_plugin(plugin)(func)
            func = pytest.mark.usefixtures("sparsity_registry")(func)
        return func

    return decorate
