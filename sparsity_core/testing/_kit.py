"""Running the checks: ``check_sparsifier``, ``check_scheduler`` and ``assert_conforms``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .._api import resolve_class
from .._base import Scheduler, Sparsifier
from .._registry import Kind
from ._checks import CheckResult, Subject, checks_for, run_check


@dataclass(frozen=True)
class KitReport:
    """Every check's outcome for one implementation; ``ok`` when none failed."""

    kind: Kind
    label: str
    results: tuple[CheckResult, ...]

    @property
    def passed(self) -> list[str]:
        return [r.check for r in self.results if r.status == "passed"]

    @property
    def failed(self) -> list[str]:
        return [r.check for r in self.results if r.status == "failed"]

    @property
    def skipped(self) -> list[str]:
        return [r.check for r in self.results if r.status == "skipped"]

    @property
    def skips(self) -> dict[str, str]:
        """Skipped check name -> the reason it does not apply."""
        return {r.check: r.message for r in self.results if r.status == "skipped"}

    @property
    def failures(self) -> dict[str, str]:
        """Failed check name -> message."""
        return {r.check: r.message for r in self.results if r.status == "failed"}

    @property
    def ok(self) -> bool:
        return not self.failed

    def __getitem__(self, check: str) -> CheckResult:
        for r in self.results:
            if r.check == check:
                return r
        raise KeyError(f"no check named {check!r}; ran: {[r.check for r in self.results]}")

    def __str__(self) -> str:
        head = f"{self.kind} {self.label!r}: {len(self.passed)} passed, {len(self.failed)} failed"
        if self.skipped:
            head += f", {len(self.skipped)} skipped"
        lines = [head]
        for r in self.results:
            mark = {"passed": "ok  ", "failed": "FAIL", "skipped": "skip"}[r.status]
            lines.append(f"  {mark} {r.check}" + (f": {r.message}" if r.message else ""))
        return "\n".join(lines)

    def raise_for_failures(self) -> None:
        """Raise AssertionError listing every failed check with its message."""
        if self.failed:
            lines = [f"{self.kind} {self.label!r} failed {len(self.failed)} conformance check(s):"]
            lines += [f"  - {name}: {message}" for name, message in self.failures.items()]
            raise AssertionError("\n".join(lines))


def _run(
    kind: Kind,
    name_or_class: str | type,
    args: Mapping[str, Any] | None,
    checks: Iterable[str] | None,
    seed: int,
    raise_on_failure: bool,
) -> KitReport:
    cls = resolve_class(kind, name_or_class)
    subject = Subject(kind, name_or_class, dict(args or {}), seed)
    specs = checks_for(kind, cls, by_name=isinstance(name_or_class, str))
    if checks is not None:
        wanted = list(checks)
        known = {s.name for s in specs}
        unknown = [c for c in wanted if c not in known]
        if unknown:
            raise ValueError(f"unknown {kind} checks {unknown}; the {kind} checks are: {sorted(known)}")
        specs = [s for s in specs if s.name in wanted]
    report = KitReport(kind, subject.label, tuple(run_check(s, subject) for s in specs))
    if raise_on_failure:
        report.raise_for_failures()
    return report


def check_sparsifier(
    name_or_class: str | type[Sparsifier],
    args: Mapping[str, Any] | None = None,
    *,
    checks: Iterable[str] | None = None,
    seed: int = 0,
    raise_on_failure: bool = False,
) -> KitReport:
    """Run every sparsifier contract check (or only ``checks``) and report each by name.

    Whether a check applies is read from the class (its ``capabilities``, whether it is a
    ``ScoreSparsifier``): one that does not is reported as skipped with the reason, as is a probe
    model outside the class's ``layer_kinds`` / ``tensor_ranks``. Nothing is left out silently.

    ``name_or_class``: a registered name (resolved through the current registry, which is also
    checked) or a class. ``args``: spec fields every check starts from (the kit sets the level,
    pattern, scope and coverage itself). With ``raise_on_failure`` an AssertionError lists the
    failed checks.
    """
    return _run("sparsifier", name_or_class, args, checks, seed, raise_on_failure)


def check_scheduler(
    name_or_class: str | type[Scheduler],
    args: Mapping[str, Any] | None = None,
    *,
    checks: Iterable[str] | None = None,
    seed: int = 0,
    raise_on_failure: bool = False,
) -> KitReport:
    """Run every scheduler contract check (or only ``checks``); see :func:`check_sparsifier`."""
    return _run("scheduler", name_or_class, args, checks, seed, raise_on_failure)


def kind_of(name_or_class: str | type) -> Kind:
    """Whether a class or registered name is a sparsifier or a scheduler."""
    if isinstance(name_or_class, type):
        if issubclass(name_or_class, Sparsifier):
            return "sparsifier"
        if issubclass(name_or_class, Scheduler):
            return "scheduler"
        raise TypeError(f"{name_or_class.__qualname__} is neither a Sparsifier nor a Scheduler subclass")
    from .._errors import UnknownNameError
    from .._registry import get_registry

    registry = get_registry()
    try:
        registry.get("sparsifier", name_or_class)
        return "sparsifier"
    except UnknownNameError as first:
        try:
            registry.get("scheduler", name_or_class)
            return "scheduler"
        except UnknownNameError:
            raise first from None


def assert_conforms(name_or_class: str | type, args: Mapping[str, Any] | None = None, *, seed: int = 0) -> KitReport:
    """Run every check for a sparsifier or scheduler; raise AssertionError naming each failure."""
    kind = kind_of(name_or_class)
    return _run(kind, name_or_class, args, None, seed, True)


def check_names(kind: Kind, name_or_class: str | type) -> list[str]:
    """The names of every check of this implementation's kind, in the order they run (those that
    do not apply to it are run as skipped, with the reason)."""
    return [s.name for s in checks_for(kind, resolve_class(kind, name_or_class), by_name=isinstance(name_or_class, str))]
