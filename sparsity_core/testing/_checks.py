"""The conformance checks: each one a function of a :class:`Subject` that raises on failure.

A check builds fresh instances and fresh probe models (see :mod:`._probes`), so checks are
independent and can run in any order, alone or as separate pytest tests. The global RNG state is
saved and restored around every check; the kit never perturbs the caller's random numbers.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import ValidationError

from .._api import resolve_class
from .._base import Scheduler, ScoreSparsifier, Sparsifier
from .._controller import SparsityController
from .._registry import Kind, _check_class, get_registry
from . import _probes

SELECTION_ARGS = frozenset({"include", "exclude", "overrides"})


class CheckSkipped(Exception):
    """Raised by a check that does not apply to this implementation."""


@dataclass(frozen=True)
class Subject:
    """What is checked: a class (resolved from ``target``), with the arguments to configure it."""

    kind: Kind
    target: str | type
    args: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    @property
    def cls(self) -> type:
        return resolve_class(self.kind, self.target)

    @property
    def label(self) -> str:
        return self.target if isinstance(self.target, str) else getattr(self.target, "name", "") or self.target.__qualname__

    def make(self, **overrides: Any) -> Any:
        """A configured instance: the subject's args (minus name selection) with ``overrides``."""
        args = {k: v for k, v in self.args.items() if k not in SELECTION_ARGS}
        return self.cls({**args, **overrides})


@dataclass(frozen=True)
class CheckSpec:
    name: str
    kind: Kind
    func: Callable[[Subject], None]
    applies: Callable[[type], bool]
    doc: str


_CHECKS: list[CheckSpec] = []


def _check(
    kinds: Iterable[Kind], applies: Callable[[type], bool] = lambda cls: True, *, name: str | None = None
) -> Callable[[Callable[[Subject], None]], Callable[[Subject], None]]:
    def decorate(func: Callable[[Subject], None]) -> Callable[[Subject], None]:
        check_name = name or func.__name__.removeprefix("check_")
        doc = (func.__doc__ or "").strip().splitlines()[0]
        for kind in kinds:
            _CHECKS.append(CheckSpec(check_name, kind, func, applies, doc))
        return func

    return decorate


def checks_for(kind: Kind, cls: type, *, by_name: bool) -> list[CheckSpec]:
    """The checks that apply to ``cls`` (``registered_name`` only when it was given by name)."""
    return [c for c in _CHECKS if c.kind == kind and c.applies(cls) and (by_name or c.name != "registered_name")]


def _is_score(cls: type) -> bool:
    return issubclass(cls, ScoreSparsifier)


def _calibrates(cls: type) -> bool:
    return bool(getattr(cls, "needs_calibration", False))


# -- helpers ---------------------------------------------------------------------------------
@dataclass
class Run:
    probe: _probes.Probe
    sparsifier: Sparsifier
    controller: SparsityController
    levels: dict[str, float]
    masks: dict[str, torch.Tensor]


def _prepare(subject: Subject, probe: _probes.Probe, **spec: Any) -> tuple[Sparsifier, SparsityController]:
    sparsifier = subject.make(**({"include": probe.include} if probe.include else {}), **spec)
    controller = SparsityController(probe.model, sparsifier)
    if sparsifier.needs_calibration:
        controller.calibrate(probe.batches)
    return sparsifier, controller


def _run(
    subject: Subject,
    factory: _probes.ProbeFactory = _probes.mlp,
    *,
    level: float = 0.5,
    dtype: torch.dtype = torch.float32,
    **spec: Any,
) -> Run:
    """Configure, calibrate (when asked for) and compute masks on a fresh probe, at ``level``."""
    probe = factory(subject.seed, dtype)
    sparsifier, controller = _prepare(subject, probe, **spec)
    levels = dict.fromkeys(controller.tensors, level)
    with torch.no_grad():
        masks = sparsifier.compute_masks(controller.tensors, levels)
    _assert_masks_valid(masks, controller.tensors)
    return Run(probe, sparsifier, controller, levels, masks)


def _assert_masks_valid(masks: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    assert isinstance(masks, Mapping), f"compute_masks must return a dict of masks, got {type(masks).__name__}"
    missing, extra = set(tensors) - set(masks), set(masks) - set(tensors)
    assert not missing and not extra, f"masks must have one entry per tensor; missing {sorted(missing)}, unexpected {sorted(extra)}"
    for name, tensor in tensors.items():
        mask = masks[name]
        assert isinstance(mask, torch.Tensor), f"mask for {name!r} is a {type(mask).__name__}, not a tensor"
        assert mask.dtype == torch.bool, f"mask for {name!r} has dtype {mask.dtype}; masks must be torch.bool (True = keep)"
        assert mask.shape == tensor.shape, f"mask for {name!r} has shape {tuple(mask.shape)}, its tensor {tuple(tensor.shape)}"
        assert mask.device == tensor.device, f"mask for {name!r} is on {mask.device}, its tensor on {tensor.device}"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The 2-D view the patterns are defined on: (output rows, everything else)."""
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def _achieved(mask: torch.Tensor) -> float:
    return 1.0 - mask.float().mean().item() if mask.numel() else 0.0


def _assert_level(masks: Mapping[str, torch.Tensor], level: float, what: str, unit: int = 1) -> None:
    """Each mask prunes ``level`` of its tensor, to within one selection unit per row."""
    for name, mask in masks.items():
        cols = _rows(mask).shape[1]
        tolerance = unit / cols + 1e-9
        got = _achieved(mask)
        assert abs(got - level) <= tolerance, (
            f"{what}: {name!r} {tuple(mask.shape)} reached sparsity {got:.4f}, asked for {level:g} "
            f"(tolerance {tolerance:.4f})"
        )


def _scores(run: Run) -> dict[str, torch.Tensor]:
    assert isinstance(run.sparsifier, ScoreSparsifier)
    with torch.no_grad():
        return {n: run.sparsifier.score(n, t).float() for n, t in run.controller.tensors.items()}


def _order_violation(score: torch.Tensor, mask: torch.Tensor) -> tuple[float, float] | None:
    """Rows of (score, mask): the worst (highest pruned, lowest kept) pair where pruned > kept."""
    inf = torch.tensor(math.inf)
    top_pruned = torch.where(~mask, score, -inf).amax(dim=-1)
    low_kept = torch.where(mask, score, inf).amin(dim=-1)
    bad = top_pruned > low_kept
    if not bool(bad.any()):
        return None
    i = int((top_pruned - low_kept).argmax())
    return float(top_pruned.reshape(-1)[i]), float(low_kept.reshape(-1)[i])


def _selects_whole_masks(cls: type) -> bool:
    return cls.compute_masks is not ScoreSparsifier.compute_masks


# -- checks shared by sparsifiers and schedulers ----------------------------------------------
@_check(["sparsifier", "scheduler"])
def check_class_attributes(subject: Subject) -> None:
    """The class has a valid `name`, a Spec subclass, a docstring, and keeps its spec at `.spec`."""
    cls = subject.cls
    try:
        _check_class(subject.kind, cls, "kit")
    except TypeError as exc:
        raise AssertionError(str(exc)) from None
    assert cls.summary(), f"{cls.__qualname__} has no docstring; its first line is the summary `sparsity list` shows"
    instance = subject.make()
    assert isinstance(instance.spec, cls.Spec), f"instance.spec is a {type(instance.spec).__name__}, not {cls.Spec.__name__}"
    repr(instance)


@_check(["sparsifier", "scheduler"])
def check_registered_name(subject: Subject) -> None:
    """The name resolves through the registry to this class (the plugin's entry point works)."""
    assert isinstance(subject.target, str)
    impl = get_registry().get(subject.kind, subject.target)
    assert impl.plugin.status == "loaded", f"plugin {impl.plugin.label} is {impl.plugin.status}: {impl.plugin.error}"


@_check(["sparsifier", "scheduler"])
def check_spec_has_descriptions(subject: Subject) -> None:
    """Every spec field has a description (the CLI, the docs and the JSON schema show it)."""
    undocumented = [n for n, f in subject.cls.Spec.model_fields.items() if not (f.description or "").strip()]
    assert not undocumented, f"spec fields without a description: {undocumented}; use Field(..., description=...)"


@_check(["sparsifier", "scheduler"])
def check_spec_has_defaults(subject: Subject) -> None:
    """Every spec field has a default (or is given in the kit's args) and the defaults validate."""
    required = [n for n, f in subject.cls.Spec.model_fields.items() if f.is_required() and n not in subject.args]
    assert not required, f"spec fields without a default: {required}; give each a default, or pass it in the kit's args"
    subject.make()


@_check(["sparsifier", "scheduler"])
def check_spec_forbids_extra(subject: Subject) -> None:
    """The spec refuses unknown arguments (a misspelt argument is an error, not ignored)."""
    spec_cls = subject.cls.Spec
    assert spec_cls.model_config.get("extra") == "forbid", (
        f"{spec_cls.__name__}.model_config['extra'] is {spec_cls.model_config.get('extra')!r}; it must be 'forbid' "
        f"(subclass the core's spec without changing model_config)"
    )
    try:
        subject.make(not_a_field_of_any_spec=1)
    except ValidationError as exc:
        assert "not_a_field_of_any_spec" in str(exc), f"the error does not name the unknown field: {exc}"
    else:
        raise AssertionError("an unknown argument was accepted")


@_check(["sparsifier", "scheduler"])
def check_spec_json_roundtrip(subject: Subject) -> None:
    """The configured spec survives model_dump_json -> model_validate_json, and dict JSON mode."""
    spec = subject.make().spec
    text = spec.model_dump_json()
    try:
        again = type(spec).model_validate_json(text)
    except ValidationError as exc:
        raise AssertionError(f"model_validate_json(model_dump_json()) failed for {text}: {exc}") from None
    assert again == spec, f"JSON round trip changed the spec: {spec!r} -> {again!r}"
    via_dict = subject.cls(json.loads(text)).spec  # the YAML/CLI path: plain JSON values
    assert via_dict == spec, f"re-creating from JSON values changed the spec: {spec!r} -> {via_dict!r}"


@_check(["sparsifier", "scheduler"])
def check_spec_json_schema(subject: Subject) -> None:
    """The JSON schema is valid JSON, lists every field with its description, and its defaults validate."""
    spec_cls = subject.cls.Spec
    schema = spec_cls.model_json_schema()
    try:
        json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise AssertionError(f"the JSON schema is not valid JSON: {exc}") from None
    props = schema.get("properties", {})
    missing = [n for n in spec_cls.model_fields if n not in props]
    assert not missing, f"fields missing from the JSON schema: {missing}"
    no_doc = [n for n, p in props.items() if not p.get("description")]
    assert not no_doc, f"schema properties without a description: {no_doc}"
    defaults = {n: p["default"] for n, p in props.items() if "default" in p}
    try:
        from_schema = spec_cls.model_validate({**defaults, **{k: v for k, v in subject.args.items() if k not in defaults}})
    except ValidationError as exc:
        raise AssertionError(f"the defaults the schema advertises do not validate: {exc}") from None
    direct = spec_cls.model_validate(dict(subject.args))
    for name in defaults:
        if name not in subject.args:
            assert getattr(from_schema, name) == getattr(direct, name), (
                f"schema default of {name!r} ({defaults[name]!r}) is not the model's default ({getattr(direct, name)!r})"
            )


# -- sparsifier checks ---------------------------------------------------------------------------
@_check(["sparsifier"])
def check_masks_boolean_and_shaped(subject: Subject) -> None:
    """compute_masks returns one torch.bool mask per tensor, shaped like it, on its device."""
    _run(subject)


@_check(["sparsifier"], applies=lambda cls: not _is_score(cls))
def check_level_reached(subject: Subject) -> None:
    """Each tensor reaches the requested level (0.3, 0.5, 0.9)."""
    for level in (0.3, 0.5, 0.9):
        _assert_level(_run(subject, level=level).masks, level, f"level {level:g}")


@_check(["sparsifier"], applies=_is_score)
def check_level_unstructured_layer(subject: Subject) -> None:
    """pattern='unstructured', scope='layer': each tensor reaches the level (0.3, 0.5, 0.9)."""
    for level in (0.3, 0.5, 0.9):
        run = _run(subject, level=level, pattern="unstructured", scope="layer", sparsity_level=level)
        _assert_level(run.masks, level, f"unstructured/layer at {level:g}")


@_check(["sparsifier"], applies=_is_score)
def check_level_unstructured_global(subject: Subject) -> None:
    """pattern='unstructured', scope='global': all covered tensors together reach the level."""
    for level in (0.3, 0.7):
        run = _run(subject, level=level, pattern="unstructured", scope="global", sparsity_level=level)
        total = sum(m.numel() for m in run.masks.values())
        pruned = sum(int((~m).sum()) for m in run.masks.values())
        assert abs(pruned - round(level * total)) <= 1, (
            f"unstructured/global at {level:g}: pruned {pruned} of {total} elements, expected {round(level * total)}"
        )


@_check(["sparsifier"], applies=_is_score)
def check_pattern_block_1x4(subject: Subject) -> None:
    """pattern='1x4': masks are constant over aligned 1x4 blocks and reach the level."""
    run = _run(subject, level=0.5, pattern="1x4", scope="layer", sparsity_level=0.5)
    for name, mask in run.masks.items():
        blocks = _rows(mask).reshape(mask.shape[0], -1, 4)
        mixed = int((blocks.any(-1) & ~blocks.all(-1)).sum())
        assert not mixed, f"1x4: {name!r} has {mixed} blocks that are partly kept"
    _assert_level(run.masks, 0.5, "1x4 at 0.5", unit=4)


@_check(["sparsifier"], applies=_is_score)
def check_pattern_nm_2_4(subject: Subject) -> None:
    """pattern='2:4': exactly 2 of every 4 consecutive inputs kept, the 2 highest scores of each group."""
    run = _run(subject, level=0.5, pattern="2:4")
    scores = _scores(run)
    for name, mask in run.masks.items():
        groups = _rows(mask).reshape(mask.shape[0], -1, 4)
        kept = groups.sum(-1)
        assert bool((kept == 2).all()), f"2:4: {name!r} keeps {sorted(set(kept.reshape(-1).tolist()))} of some groups of 4, not 2"
        bad = _order_violation(_rows(scores[name]).reshape(groups.shape), groups)
        assert bad is None, f"2:4: in {name!r} a pruned element scores {bad[0]:.6g} > a kept one of its group, {bad[1]:.6g}"


@_check(["sparsifier"], applies=_is_score)
def check_importance_order_layer(subject: Subject) -> None:
    """scope='layer': no pruned element scores higher than a kept one (of its tensor; of its row
    when the class overrides compute_masks, e.g. a per-output comparison)."""
    run = _run(subject, level=0.5, pattern="unstructured", scope="layer", sparsity_level=0.5)
    scores = _scores(run)
    whole = not _selects_whole_masks(subject.cls)
    for name, mask in run.masks.items():
        assert scores[name].shape == mask.shape, f"score({name!r}) has shape {tuple(scores[name].shape)}, tensor {tuple(mask.shape)}"
        s, m = (scores[name].reshape(-1), mask.reshape(-1)) if whole else (_rows(scores[name]), _rows(mask))
        bad = _order_violation(s, m)
        assert bad is None, (
            f"{name!r}: a pruned element scores {bad[0]:.6g} > a kept one, {bad[1]:.6g} "
            f"({'over the tensor' if whole else 'within a row'})"
        )


@_check(["sparsifier"], applies=_is_score)
def check_importance_order_global(subject: Subject) -> None:
    """scope='global': no pruned element (of any tensor) scores higher than a kept one (of any)."""
    run = _run(subject, level=0.5, pattern="unstructured", scope="global", sparsity_level=0.5)
    scores = _scores(run)
    s = torch.cat([scores[n].reshape(-1) for n in run.masks])
    m = torch.cat([run.masks[n].reshape(-1) for n in run.masks])
    bad = _order_violation(s, m)
    assert bad is None, f"global: a pruned element scores {bad[0]:.6g} > a kept one, {bad[1]:.6g}"


@_check(["sparsifier"])
def check_levels_zero_and_one(subject: Subject) -> None:
    """Level 0 keeps every element; level 1 prunes every element (layer and, if scored, global)."""
    scopes: list[dict[str, Any]] = [{}]
    if _is_score(subject.cls):
        scopes = [{"pattern": "unstructured", "scope": "layer"}, {"pattern": "unstructured", "scope": "global"}]
    for extra in scopes:
        where = f" ({extra['scope']})" if extra else ""
        for level in (0.0, 1.0):
            masks = _run(subject, level=level, sparsity_level=level, **extra).masks
            for name, mask in masks.items():
                wrong = int((mask != (level == 0.0)).sum())
                assert not wrong, f"level {level:g}{where}: {name!r} has {wrong} elements {'pruned' if level == 0 else 'kept'}"


@_check(["sparsifier"])
def check_inputs_not_modified(subject: Subject) -> None:
    """Calibration and compute_masks modify nothing; a step changes only the pruned elements of covered weights."""
    probe = _probes.mlp(subject.seed)
    before = {k: v.detach().clone() for k, v in probe.model.state_dict().items()}
    batches_before = [b.clone() for b in probe.batches]
    sparsifier, controller = _prepare(subject, probe)
    levels = dict.fromkeys(controller.tensors, 0.5)
    with torch.no_grad():
        sparsifier.compute_masks(controller.tensors, levels)
    after = probe.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"calibration or compute_masks modified {changed}"
    assert all(torch.equal(a, b) for a, b in zip(batches_before, probe.batches)), "calibration modified its input batches"
    controller.step()
    after = probe.model.state_dict()
    for key, old in before.items():
        new = after[key]
        mask = controller.masks.get(key)
        if mask is None:
            assert torch.equal(old, new), f"{key!r} is not covered but changed"
        else:
            assert torch.equal(new[mask], old[mask]), f"{key!r}: kept elements changed"
            assert bool((new[~mask] == 0).all()), f"{key!r}: pruned elements are not zero"


@_check(["sparsifier"])
def check_deterministic(subject: Subject) -> None:
    """The same seed gives the same masks (construct, calibrate and compute twice)."""
    runs = []
    for _ in range(2):
        torch.manual_seed(subject.seed)
        runs.append(_run(subject, level=0.5).masks)
    differ = [n for n in runs[0] if not torch.equal(runs[0][n], runs[1][n])]
    assert not differ, f"two runs with torch.manual_seed({subject.seed}) gave different masks for {differ}"


@_check(["sparsifier"])
def check_state_roundtrip(subject: Subject) -> None:
    """SparsityController.state_dict survives torch.save/torch.load(weights_only=True) and restores the masks."""
    probe = _probes.mlp(subject.seed)
    _, controller = _prepare(subject, probe)
    controller.step()
    buffer = io.BytesIO()
    torch.save(controller.state_dict(), buffer)
    buffer.seek(0)
    try:
        state = torch.load(buffer, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report whatever weights_only refuses
        raise AssertionError(f"torch.load(weights_only=True) refused the state: {type(exc).__name__}: {exc}") from None
    fresh = _probes.mlp(subject.seed)
    restored = SparsityController(fresh.model, subject.make())
    restored.load_state_dict(state)
    for name, mask in controller.masks.items():
        assert torch.equal(restored.masks[name], mask), f"restored mask of {name!r} differs"
        assert torch.equal(restored.tensors[name], controller.tensors[name]), f"restored {name!r} differs"
    assert restored.levels == controller.levels and restored.t == controller.t, "restored schedule position differs"


def _score_spec(cls: type) -> dict[str, Any]:
    return {"pattern": "unstructured", "scope": "layer"} if _is_score(cls) else {}


@_check(["sparsifier"])
def check_bfloat16(subject: Subject) -> None:
    """A bf16 model (weights and calibration inputs) gets valid masks at the requested level."""
    run = _run(subject, dtype=torch.bfloat16, level=0.5, sparsity_level=0.5, **_score_spec(subject.cls))
    _assert_level(run.masks, 0.5, "bf16 at 0.5")


@_check(["sparsifier"])
def check_tensor_ranks_1d_4d(subject: Subject) -> None:
    """A 4-D (Conv2d) and a 1-D (LayerNorm) weight get valid masks at the requested level."""
    for factory in (_probes.conv, _probes.with_vector):
        run = _run(subject, factory, level=0.5, sparsity_level=0.5, **_score_spec(subject.cls))
        ranks = sorted({t.dim() for t in run.controller.tensors.values()})
        _assert_level(run.masks, 0.5, f"{factory.__name__} probe (ranks {ranks}) at 0.5")


@_check(["sparsifier"], applies=lambda cls: not _calibrates(cls))
def check_mapping_target(subject: Subject) -> None:
    """sparsify() on a mapping of named 1-D, 2-D and 4-D tensors reaches the level in place."""
    from .._api import sparsify

    gen = torch.Generator().manual_seed(subject.seed)
    tensors = {
        "vector": torch.randn(32, generator=gen),
        "matrix": torch.randn(16, 32, generator=gen),
        "kernel": torch.randn(8, 4, 3, 3, generator=gen),
    }
    args = {k: v for k, v in subject.args.items() if k not in SELECTION_ARGS}
    report = sparsify(tensors, subject.cls, {**args, "sparsity_level": 0.5, **_score_spec(subject.cls)})
    for name, tensor in tensors.items():
        zeros = 1.0 - torch.count_nonzero(tensor).item() / tensor.numel()
        assert abs(zeros - report[name]) < 1e-9, f"the report says {report[name]:.4f} for {name!r}, the tensor has {zeros:.4f}"
        tolerance = 1 / _rows(tensor).shape[1] + 1e-9
        assert abs(zeros - 0.5) <= tolerance, f"{name!r} {tuple(tensor.shape)} reached {zeros:.4f}, asked for 0.5"


@_check(["sparsifier"], applies=_calibrates)
def check_calibration_required(subject: Subject) -> None:
    """needs_calibration: computing masks without calibration raises an error that says so."""
    probe = _probes.mlp(subject.seed)
    sparsifier = subject.make()
    controller = SparsityController(probe.model, sparsifier)
    try:
        controller.step()
    except Exception as exc:  # noqa: BLE001 - any clear error will do
        assert "calibrat" in str(exc).lower(), f"the error does not mention calibration: {type(exc).__name__}: {exc}"
    else:
        raise AssertionError("masks were computed without calibration; raise an error that asks for calibration batches")


@_check(["sparsifier"], applies=_calibrates)
def check_calibration_reset(subject: Subject) -> None:
    """reset_calibration forgets: calibrating on A then on B gives B's masks."""
    def masks_after(*batch_sets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        probe = _probes.mlp(subject.seed)
        sparsifier = subject.make()
        controller = SparsityController(probe.model, sparsifier)
        for batches in batch_sets:
            controller.calibrate(batches)
        with torch.no_grad():
            return sparsifier.compute_masks(controller.tensors, dict.fromkeys(controller.tensors, 0.5))

    b = _probes.mlp(subject.seed).batches
    a = [x.flip(-1) * 10 for x in b]
    only_b, a_then_b, only_a = masks_after(b), masks_after(a, b), masks_after(a)
    assert any(not torch.equal(only_a[n], only_b[n]) for n in only_b), (
        "calibration batches had no effect on the masks (A and B give the same masks)"
    )
    differ = [n for n in only_b if not torch.equal(only_b[n], a_then_b[n])]
    assert not differ, f"statistics from an earlier calibration leaked into {differ}; reset_calibration must forget them"


# -- scheduler checks ----------------------------------------------------------------------------
_FINALS = (0.0, 0.25, 0.8, 1.0)


def _windows(subject: Subject) -> list[Scheduler]:
    return [subject.make(), subject.make(start=2, end=10), subject.make(start=3, end=3)]


@_check(["scheduler"])
def check_values_within_zero_and_final(subject: Subject) -> None:
    """level_at(t, final) stays within [0, final] for every t and final (before the core clamps it)."""
    for scheduler in _windows(subject):
        end = scheduler.spec.end
        for t in [x / 2 for x in range(0, int(4 * end) + 8)] + [1e6]:
            for final in _FINALS:
                value = scheduler.level_at(t, final)
                assert isinstance(value, (int, float)) and math.isfinite(value), f"level_at({t}, {final}) = {value!r}"
                assert -1e-9 <= value <= final + 1e-9, (
                    f"level_at({t:g}, {final:g}) = {value:.6g} with start={scheduler.spec.start:g}, "
                    f"end={end:g}: outside [0, {final:g}]"
                )


@_check(["scheduler"])
def check_ends_at_final(subject: Subject) -> None:
    """At t >= end the level is the final level."""
    for scheduler in _windows(subject):
        end = scheduler.spec.end
        for t in (end, end + 0.5, end + 1, 2 * end + 7, 1e6):
            for final in _FINALS:
                value = scheduler(t, final)
                assert abs(value - final) <= 1e-9, (
                    f"at t={t:g} >= end={end:g} (start={scheduler.spec.start:g}) the level is {value:.6g}, not the final {final:g}"
                )


@_check(["scheduler"])
def check_zero_before_start(subject: Subject) -> None:
    """Before `start` the level is 0."""
    scheduler = subject.make(start=2, end=10)
    for t in (0.0, 0.5, 1.0, 1.99):
        value = scheduler(t, 0.8)
        assert value == 0.0, f"at t={t:g} < start=2 the level is {value:.6g}, not 0"


@_check(["scheduler"])
def check_pure_function_of_progress(subject: Subject) -> None:
    """The level depends only on t and the spec: any call order and a fresh instance agree (exact resume)."""
    ts = [x / 2 for x in range(0, 30)]
    first = subject.make(start=2, end=10)
    forward = [first(t, 0.8) for t in ts]
    backward = [first(t, 0.8) for t in reversed(ts)][::-1]
    fresh = subject.make(start=2, end=10)
    resumed = [fresh(t, 0.8) for t in ts[15:]]
    assert forward == backward, "levels depend on the order of the calls (hidden state)"
    assert forward[15:] == resumed, "a fresh instance started mid-way gives other levels (resuming would not be exact)"


@_check(["scheduler"], name="state_roundtrip")
def check_scheduler_state_roundtrip(subject: Subject) -> None:
    """With a controller: state_dict at t survives torch.save/load(weights_only=True) and resumes exactly."""
    from ..builtin.sparsifiers import Magnitude

    args = {k: v for k, v in subject.args.items() if k not in ("start", "end")}
    controller = SparsityController(_probes.mlp(subject.seed).model, Magnitude, {"sparsity_level": 0.8}, subject.cls, {**args, "start": 2, "end": 10})
    controller.step(5)
    buffer = io.BytesIO()
    torch.save(controller.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored = SparsityController(_probes.mlp(subject.seed).model, Magnitude, {"sparsity_level": 0.8}, subject.cls, {**args, "start": 2, "end": 10})
    restored.load_state_dict(state)
    assert restored.t == controller.t and restored.levels == controller.levels, "restored schedule position differs"
    for t in (6, 9, 12):
        controller.step(t)
        restored.step(t)
        assert restored.levels == controller.levels, f"after resuming, the levels at t={t} differ"
        for n in controller.masks:
            assert torch.equal(restored.masks[n], controller.masks[n]), f"after resuming, the mask of {n!r} at t={t} differs"


# -- running -------------------------------------------------------------------------------------
Status = Literal["passed", "failed", "skipped"]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one named check."""

    check: str
    status: Status
    message: str = ""
    doc: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_check(spec: CheckSpec, subject: Subject) -> CheckResult:
    """Run one check with the global RNG state saved and restored; never raises for a failure."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(subject.seed)
        try:
            spec.func(subject)
        except CheckSkipped as exc:
            return CheckResult(spec.name, "skipped", str(exc), spec.doc)
        except AssertionError as exc:
            return CheckResult(spec.name, "failed", str(exc) or "assertion failed", spec.doc)
        except Exception as exc:  # noqa: BLE001 - an implementation that raises fails the check
            return CheckResult(spec.name, "failed", f"raised {type(exc).__name__}: {exc}", spec.doc)
    return CheckResult(spec.name, "passed", "", spec.doc)

