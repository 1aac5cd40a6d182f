"""The pydantic specs: the single source of every implementation's arguments.

Validation, defaults, JSON schema, CLI display and YAML config all come from these models. Every
field has a description; ``extra="forbid"`` turns a misspelt argument into an error naming it.
"""

from __future__ import annotations

import re
from types import UnionType
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

_BLOCK = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")
_NM = re.compile(r"^([0-9]+):([1-9][0-9]*)$")


class Pattern(NamedTuple):
    """A parsed ``pattern``: ``kind`` is "unstructured", "channel" (whole rows of the matrix view:
    output channels), "block" (a x b = rows x cols) or "n:m"."""

    kind: Literal["unstructured", "channel", "block", "n:m"]
    a: int = 1
    b: int = 1

    @property
    def nm_level(self) -> float:
        """The level an N:M pattern fixes: M - N pruned out of every M."""
        return 1.0 - self.a / self.b


def parse_pattern(text: str) -> Pattern:
    """Parse "unstructured", "channel", "HxW" (e.g. "1x4") or "N:M" (e.g. "2:4"); raise ValueError otherwise."""
    text = text.strip()
    if text in ("unstructured", "channel"):
        return Pattern(text)  # type: ignore[arg-type]
    if m := _BLOCK.match(text):
        return Pattern("block", int(m[1]), int(m[2]))
    if m := _NM.match(text):
        n, mm = int(m[1]), int(m[2])
        if not 0 < n <= mm:
            raise ValueError(f"N:M needs 0 < N <= M (keep N of every M), got {text!r}")
        return Pattern("n:m", n, mm)
    raise ValueError(
        f"pattern must be 'unstructured', 'channel', a block 'HxW' of positive integers such as "
        f"'1x4', or 'N:M' with 0 < N <= M such as '2:4'; got {text!r}"
    )


def _number_not_bool(annotation: Any) -> bool:
    """Whether a field takes numbers (int/float, optionally None) and not bools."""
    members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return bool({int, float}.intersection(members)) and bool not in members


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, defer_build=True)

    @field_validator("*", mode="before")
    @classmethod
    def _refuse_bools_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads True as 1 (sparsity_level=True pruned everything); ints,
        # floats and numeric strings still convert, so 1, JSON and command lines keep working.
        if isinstance(value, bool) and info.field_name and _number_not_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, not a bool ({value!r})")
        return value


#: Fields that select names; an override cannot change them (it is already a selection).
SELECTION_FIELDS = frozenset({"include", "exclude", "overrides"})


class SparsifierSpec(_Spec):
    """Arguments common to every sparsifier."""

    sparsity_level: float = Field(
        0.5, ge=0.0, le=1.0, description="Target fraction of zeros in each covered tensor (0..1)."
    )
    include: list[str] | None = Field(
        None,
        description=(
            "Tensors to cover: globs over parameter (or tensor) names, or 'KIND:GLOB' for one "
            "layer kind's weights, e.g. 'linear:*', 'conv1d:transformer.h.*' (kinds: linear, conv, "
            "conv_transpose, attention, conv1d (transformers' Conv1D), embedding, bilinear, and "
            "plugins' kinds). A tied tensor matches any of its names. Default: the matmul/conv "
            "weights, not embeddings, norms, biases or an output head; for a mapping of named "
            "tensors, every tensor; narrowed to the layer kinds the sparsifier supports."
        ),
    )
    exclude: list[str] = Field(
        default_factory=list, description="Glob patterns over names to leave dense, applied after include."
    )
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description=(
            "Glob pattern -> field values for the names it matches, e.g. "
            "{'*.head.weight': {'sparsity_level': 0.5}}. The first matching pattern wins."
        ),
    )

    @model_validator(mode="after")
    def _check_overrides(self) -> SparsifierSpec:
        for pattern, values in self.overrides.items():
            bad = SELECTION_FIELDS.intersection(values)
            if bad:
                raise ValueError(
                    f"overrides[{pattern!r}] sets {sorted(bad)}: an override changes how matching "
                    f"names are sparsified, not which names are covered (use include/exclude)"
                )
            try:
                self.resolve(pattern, values)
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"]) or "(spec)"
                raise ValueError(f"overrides[{pattern!r}].{field}: {first['msg']}") from None
        return self

    def resolve(self, pattern: str, values: dict[str, Any]) -> SparsifierSpec:
        """This spec with ``values`` applied (validated); used for an override group."""
        data = self.model_dump(exclude=set(SELECTION_FIELDS), exclude_unset=False)
        explicit = (self.model_fields_set - SELECTION_FIELDS) | set(values)
        data = {k: v for k, v in data.items() if k in explicit}
        return type(self).model_validate({**data, **values})


class ScoreSpec(SparsifierSpec):
    """A sparsifier that scores importance; the core selects the mask by pattern and scope."""

    pattern: str = Field(
        "unstructured",
        description=(
            "Sparsity pattern: 'unstructured'; 'channel' (whole output channels: rows of the "
            "[outputs, inputs] matrix view); aligned blocks 'HxW' over that matrix view (e.g. "
            "'1x4'); or 'N:M' (keep N of every M consecutive weights along the input (reduction) "
            "axis, e.g. '2:4', which fixes sparsity_level at 1 - N/M)."
        ),
    )
    scope: Literal["layer", "global"] = Field(
        "layer",
        description="'layer': each tensor reaches the level on its own; 'global': one importance threshold across all covered tensors.",
    )

    max_level_per_tensor: float = Field(
        0.98,
        ge=0.0,
        le=1.0,
        description=(
            "scope='global' only: the highest level any one tensor may reach (like Intel Neural "
            "Compressor's max_sparsity_ratio_per_op), so one threshold never empties a layer; the "
            "overall level is still met exactly by pruning more elsewhere. Left at its default, "
            "a higher sparsity_level raises it to that level."
        ),
    )
    min_level_per_tensor: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description=(
            "scope='global' only: the lowest level every tensor reaches (at most the group's "
            "current level during a schedule); the overall level is still met exactly."
        ),
    )

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        parse_pattern(value)
        return value.strip()

    @model_validator(mode="before")
    @classmethod
    def _nm_fixes_level(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("pattern"), str):
            try:
                pattern = parse_pattern(data["pattern"])
            except ValueError:
                return data  # the field validator reports it
            if pattern.kind == "n:m" and "sparsity_level" not in data:
                data = {**data, "sparsity_level": pattern.nm_level}
        return data

    @model_validator(mode="after")
    def _check_pattern_against_level_and_scope(self) -> ScoreSpec:
        pattern = self.parsed_pattern
        if pattern.kind == "n:m":
            if abs(self.sparsity_level - pattern.nm_level) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern!r} fixes sparsity_level at {pattern.nm_level:g} "
                    f"(prune {pattern.b - pattern.a} of every {pattern.b}); got "
                    f"sparsity_level={self.sparsity_level:g}: leave it out or set it to {pattern.nm_level:g}"
                )
            if self.scope == "global":
                raise ValueError(
                    f"scope='global' does not apply to pattern {self.pattern!r}: N:M keeps N of every "
                    f"group of M, a per-group rule with no global threshold; use scope='layer'"
                )
        from ._bounds import check_levels

        check_levels(self)
        return self

    @property
    def parsed_pattern(self) -> Pattern:
        return parse_pattern(self.pattern)


class SchedulerSpec(_Spec):
    """Arguments common to every scheduler: when the schedule starts and ends, and in what unit."""

    start: float = Field(0, ge=0, description="Progress (in `unit`) at which sparsification starts.")
    end: float | None = Field(
        None, ge=0, description="Progress at which the final level is reached. Default: equal to start."
    )
    unit: Literal["epoch", "step"] = Field(
        "epoch", description="What progress counts: completed epochs or optimizer steps."
    )

    @model_validator(mode="after")
    def _check_end(self) -> SchedulerSpec:
        if self.end is None:
            object.__setattr__(self, "end", self.start)
        elif self.end < self.start:
            raise ValueError(f"end must be >= start, got start={self.start:g}, end={self.end:g}")
        return self
