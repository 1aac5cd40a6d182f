"""Base classes for implementations: ``Sparsifier``, ``ScoreSparsifier`` and ``Scheduler``.

This module imports no torch at import time, so that listing and showing implementations (the
CLI, ``list_sparsifiers()``) stays fast; the tensor work lives in :mod:`sparsity_core._engine`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

from ._contract import Capabilities, MaskContext, Reconstruction
from ._specs import SchedulerSpec, ScoreSpec, SparsifierSpec

if TYPE_CHECKING:
    import torch
    from torch import nn


def _titled_spec(cls: type, spec: type[BaseModel]) -> type[BaseModel]:
    """A subclass of ``spec`` titled with the implementation's name, so that a validation error
    reads "1 validation error for magnitude" rather than for the shared base model."""
    if spec.model_config.get("title") == cls.name:
        return spec
    return type(
        f"{cls.__name__}Spec",
        (spec,),
        {
            "model_config": ConfigDict(title=cls.name),
            "__module__": cls.__module__,
            "__qualname__": f"{cls.__qualname__}.Spec",
            "__doc__": spec.__doc__,
        },
    )


class _SpecSlot:
    """The class attribute ``Spec`` of a named implementation, titled on first access.

    Building a pydantic model costs about a millisecond; discovery of many plugins should not
    pay it for classes nobody uses. The first access replaces this slot with the built model.
    """

    def __init__(self, raw: type[BaseModel]) -> None:
        self.raw = raw

    def __get__(self, obj: object, owner: type) -> type[BaseModel]:
        titled = _titled_spec(owner, self.raw)
        type.__setattr__(owner, "Spec", titled)
        return titled


def validate_spec(cls: Any, spec: BaseModel | Mapping[str, Any] | None, fields: dict[str, Any]) -> Any:
    """``cls.Spec`` validated from a dict, a spec instance (of this model or a base) or None,
    with ``fields`` on top. Invalid values raise pydantic's ValidationError titled ``cls.name``."""
    if spec is None:
        data: dict[str, Any] = {}
    elif isinstance(spec, BaseModel):
        # A spec instance of this model or of a base (e.g. a plain ScoreSpec): keep what was set.
        data = spec.model_dump(exclude_unset=True)
    elif isinstance(spec, Mapping):
        data = dict(spec)
    else:
        raise TypeError(
            f"{cls.name}: arguments must be a dict or a {cls.Spec.__name__} instance, "
            f"got {type(spec).__name__}"
        )
    return cls.Spec.model_validate({**data, **fields})


class _Implementation(ABC):
    name: ClassVar[str] = ""
    Spec: ClassVar[type[BaseModel]]
    spec: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.name:
            raw = inspect.getattr_static(cls, "Spec")
            cls.Spec = _SpecSlot(raw.raw if isinstance(raw, _SpecSlot) else raw)  # type: ignore[assignment]

    def __init__(self, spec: BaseModel | Mapping[str, Any] | None = None, /, **fields: Any) -> None:
        self.spec = validate_spec(type(self), spec, fields)

    @classmethod
    def summary(cls) -> str:
        """The first line of the class docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.spec.model_dump(exclude_unset=True).items())
        return f"{type(self).__name__}({args})"


class Sparsifier(_Implementation):
    """Turns named tensors and target levels into boolean masks (True = keep).

    Subclass this only to take over mask selection whole; most plugins subclass
    :class:`ScoreSparsifier` and write one ``score`` function.
    """

    Spec: ClassVar[type[SparsifierSpec]] = SparsifierSpec
    spec: SparsifierSpec

    #: What the sparsifier is and needs (contract v2); read by the controller, coverage, the kit
    #: and ``sparsity show``. A v1 class that sets only ``needs_calibration`` gets it mirrored here.
    capabilities: ClassVar[Capabilities] = Capabilities()

    #: v1's flag, kept in step with ``capabilities.calibration`` (set either one).
    needs_calibration: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "capabilities" in cls.__dict__:
            if not isinstance(cls.capabilities, Capabilities):
                raise TypeError(f"{cls.__qualname__}.capabilities must be a sparsity_core.Capabilities, got {type(cls.capabilities).__name__}")
            cls.needs_calibration = cls.capabilities.calibration
        elif "needs_calibration" in cls.__dict__ and cls.needs_calibration != cls.capabilities.calibration:
            cls.capabilities = dataclasses.replace(cls.capabilities, calibration=bool(cls.needs_calibration))

    # -- which names, with which arguments -------------------------------------------------
    def covers(
        self,
        names: Iterable[str],
        default: Callable[[str], bool] | None = None,
        *,
        kinds: Mapping[str, str | None] | None = None,
        aliases: Mapping[str, Sequence[str]] | None = None,
    ) -> list[str]:
        """The names this sparsifier covers, in order.

        ``default`` decides when ``include`` is unset (for a module: the matmul/conv weights of
        known layer kinds); with no default, every name. ``kinds`` maps each name to its layer
        kind (None: none), for ``"KIND:GLOB"`` patterns (without it they match nothing).
        ``aliases`` maps a name to every name of its tensor (tied weights, canonical first): the
        tensor is covered when one of its names is included and none excluded, and overrides
        match any of its names (the aliases are remembered for :meth:`spec_for`). An alias
        included while another is excluded, or two aliases under different overrides, is a
        ValueError naming both."""
        include, exclude = self._include_rules, self._exclude_rules
        kinds = kinds or {}
        aliases = aliases or {}

        def first(rules: list[Any], name: str) -> Any:
            return next((r for r in rules if r.matches(name, kinds.get(name))), None)

        chosen = []
        for name in names:
            every = tuple(aliases.get(name, (name,)))
            excluded = [(n, r) for n in every if (r := first(exclude, n)) is not None]
            if include is None:
                if (default is not None and not default(name)) or excluded:
                    continue
            else:
                out = {n for n, _ in excluded}
                taken = [(n, r) for n in every if n not in out and (r := first(include, n)) is not None]
                if not taken:
                    continue
                if excluded:
                    (a, ra), (b, rb) = taken[0], excluded[0]
                    raise ValueError(
                        f"conflicting rules for one tensor with several names {list(every)}: include pattern "
                        f"{ra.text!r} takes {a!r}, exclude pattern {rb.text!r} leaves {b!r} dense. Tied names are "
                        f"one tensor: exclude all of its names or none"
                    )
            self._kinds.update({n: kinds[n] for n in every if n in kinds})
            if len(every) > 1:
                self._aliases[name] = every
                self._override(every)  # refuse conflicting overrides now, not at the first mask
            chosen.append(name)
        return chosen

    def excludes(self, name: str, kinds: Mapping[str, str | None] | None = None) -> bool:
        """Whether an ``exclude`` pattern matches ``name``."""
        kind = (kinds or {}).get(name)
        return any(rule.matches(name, kind) for rule in self._exclude_rules)

    def spec_for(self, name: str) -> SparsifierSpec:
        """The spec that applies to ``name``: the first override matching it (or, for a tied
        tensor, any of its names), else the spec itself."""
        found = self._override(self._aliases.get(name, (name,)))
        return found[1] if found is not None else self.spec

    def _override(self, names: tuple[str, ...]) -> tuple[str, SparsifierSpec] | None:
        """The override for a tensor with these names: the first pattern matching each name; two
        names under different overrides is a ValueError naming both."""
        found: list[tuple[str, str, SparsifierSpec]] = []
        for n in names:
            kind = self._kinds.get(n)
            for selector, pattern, resolved in self._override_rules:
                if selector.matches(n, kind):
                    found.append((n, pattern, resolved))
                    break
        if not found:
            return None
        for n, pattern, resolved in found[1:]:
            if pattern != found[0][1] and self.spec.overrides[pattern] != self.spec.overrides[found[0][1]]:
                raise ValueError(
                    f"conflicting overrides for one tensor with several names {list(names)}: {found[0][0]!r} "
                    f"matches overrides[{found[0][1]!r}] = {self.spec.overrides[found[0][1]]}, {n!r} matches "
                    f"overrides[{pattern!r}] = {self.spec.overrides[pattern]}. Tied names are one tensor: give it one override"
                )
        return found[0][1], found[0][2]

    @cached_property
    def _resolved_overrides(self) -> list[tuple[str, SparsifierSpec]]:
        return [(p, self.spec.resolve(p, v)) for p, v in self.spec.overrides.items()]

    @cached_property
    def _include_rules(self) -> list[Any] | None:
        from ._layers import parse_selector

        return None if self.spec.include is None else [parse_selector(p, "include pattern") for p in self.spec.include]

    @cached_property
    def _exclude_rules(self) -> list[Any]:
        from ._layers import parse_selector

        return [parse_selector(p, "exclude pattern") for p in self.spec.exclude]

    @cached_property
    def _override_rules(self) -> list[tuple[Any, str, SparsifierSpec]]:
        from ._layers import parse_selector

        return [(parse_selector(p, "overrides pattern"), p, r) for p, r in self._resolved_overrides]

    @cached_property
    def _aliases(self) -> dict[str, tuple[str, ...]]:
        """Tied tensors seen by :meth:`covers`: canonical name -> every name."""
        return {}

    @cached_property
    def _kinds(self) -> dict[str, str | None]:
        """The layer kind of each name :meth:`covers` was told of (for "KIND:GLOB" overrides)."""
        return {}

    def final_levels(self, names: Iterable[str]) -> dict[str, float]:
        """Each name's target level, overrides applied."""
        return {n: self.spec_for(n).sparsity_level for n in names}

    # -- the work ----------------------------------------------------------------------------
    @abstractmethod
    def compute_masks(
        self,
        tensors: Mapping[str, torch.Tensor],
        levels: Mapping[str, float],
        context: MaskContext | None = None,
    ) -> dict[str, torch.Tensor] | Reconstruction:
        """Return a boolean mask (True = keep) shaped like each tensor, at the given levels.

        Must not modify the tensors. ``levels`` maps every name in ``tensors`` to its current
        level (the scheduler has already been applied). ``context`` (contract v2; a v1 override
        without this parameter is called without it) holds the current masks and each tensor's
        layer layout. A class with ``capabilities.reconstruction`` may return
        :class:`~sparsity_core.Reconstruction` (masks and new weights) instead of the masks.
        """

    def masks_applied(
        self,
        tensors: Mapping[str, torch.Tensor],
        levels: Mapping[str, float],
        applied: dict[str, torch.Tensor] | None,
        context: MaskContext | None = None,
    ) -> dict[str, torch.Tensor] | None:
        """Optional fast path: :meth:`compute_masks` that, given a dict ``applied``, also zeroes
        each tensor's pruned elements as soon as its mask is final (while the tensor is in cache)
        and records that mask in ``applied``. The default returns None: not provided.

        The controller uses it only when the class that defines it also defines the
        ``compute_masks`` in use, so a subclass overriding ``compute_masks`` is never bypassed.
        """
        return None

    # -- calibration (only when needs_calibration) -------------------------------------------
    def reset_calibration(self) -> None:
        """Forget statistics gathered by :meth:`observe`."""

    def observe(self, name: str, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        """Called with the inputs of the module that owns parameter ``name``, once per batch."""

    # -- gradients (only when capabilities.gradients) ----------------------------------------
    def observe_gradient(self, name: str, tensor: torch.Tensor, grad: torch.Tensor) -> None:
        """Called with a covered parameter (the live one, not a copy) and its gradient: in
        training once per optimizer step, after backward (accumulated micro-batches included)
        and before the update; in one-shot gradient calibration once per batch."""


class ScoreSparsifier(Sparsifier):
    """A sparsifier that only scores importance; the core selects masks by pattern and scope."""

    Spec: ClassVar[type[ScoreSpec]] = ScoreSpec
    spec: ScoreSpec

    #: Set to True when ``score`` treats each element on its own (``|w|``, not a per-row norm):
    #: the core may then score any piece or sample of a tensor, which keeps large selections
    #: near one memory pass and never holds a whole tensor's scores.
    elementwise: ClassVar[bool] = False

    #: Set to True when ``score`` ranks exactly like ``|w|``: a strictly increasing function of
    #: each element's absolute value alone (``|w|`` itself, ``w ** 2`` in float64, not ``w ** 2``
    #: in a dtype where distinct ``|w|`` may round to one score), so that equal ``|w|`` tie and
    #: nothing else does. The core may then select on the weights' bits without calling ``score``
    #: (see ``sparsity_core._engine.magnitude``). The declaration holds for the ``score`` of the
    #: class that makes it: a subclass overriding ``score`` must declare it again.
    ranks_like_magnitude: ClassVar[bool] = False

    @abstractmethod
    def score(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Importance of each element of ``tensor`` (same shape; higher = more important)."""

    def first_index(self, name: str) -> int:
        """The flat index, in the whole tensor ``name``, of the first element of the tensor
        :meth:`score` is given: 0, unless it is one rank's rows of a sharded tensor (FSDP2). A
        score drawn by position draws element ``i`` by ``first_index(name) + i`` to be shard-safe
        (see the built-in ``random``)."""
        shard = self.__dict__.get("_shards_now", {}).get(name)
        return 0 if shard is None else shard.offset * math.prod(shard.global_shape[1:])

    @contextlib.contextmanager
    def _scoring(self, context: MaskContext | None) -> Iterator[None]:
        """While masks are made: where each sharded tensor's rows start (:meth:`first_index`)."""
        self.__dict__["_shards_now"] = {} if context is None or context.shards is None else context.shards.tensors
        try:
            yield
        finally:
            self.__dict__.pop("_shards_now", None)

    def compute_masks(
        self,
        tensors: Mapping[str, torch.Tensor],
        levels: Mapping[str, float],
        context: MaskContext | None = None,
    ) -> dict[str, torch.Tensor]:
        from ._engine import score_masks

        with self._scoring(context):
            return score_masks(self, tensors, levels, context=context)

    def masks_applied(
        self,
        tensors: Mapping[str, torch.Tensor],
        levels: Mapping[str, float],
        applied: dict[str, torch.Tensor] | None,
        context: MaskContext | None = None,
    ) -> dict[str, torch.Tensor]:
        from ._engine import score_masks

        with self._scoring(context):
            return score_masks(self, tensors, levels, applied, context=context)


class Scheduler(_Implementation):
    """Maps training progress to the current level: a pure function of progress and its spec."""

    Spec: ClassVar[type[SchedulerSpec]] = SchedulerSpec
    spec: SchedulerSpec

    @abstractmethod
    def level_at(self, t: float, final_level: float) -> float:
        """The level at progress ``t`` (completed epochs or steps) for a group whose final level
        is ``final_level``. The core clamps the result to [0, final_level]."""

    def __call__(self, t: float, final_level: float) -> float:
        level = float(self.level_at(t, final_level))
        if not math.isfinite(level):
            raise ValueError(f"scheduler {self.name!r} returned {level} at t={t}, final_level={final_level}")
        return min(max(level, 0.0), final_level)

    def progress(self, t: float) -> float:
        """Fraction of the way from ``start`` to ``end`` at ``t``, in [0, 1]."""
        start, end = self.spec.start, self.spec.end
        if t < start:
            return 0.0
        if end is None or end <= start:
            return 1.0
        return min(1.0, (t - start) / (end - start))
