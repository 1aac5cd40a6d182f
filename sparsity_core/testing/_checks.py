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
from .._contract import Capabilities, MaskContext, Reconstruction, accepts_context
from .._controller import SparsityController
from .._layers import TensorLayout, generic_layout, layout_of
from .._registry import Kind, _check_class, get_registry
from .._targets import Selection, named_tensors, select_tensors
from . import _probes

SELECTION_ARGS = frozenset({"include", "exclude", "overrides"})


class CheckSkipped(Exception):
    """Raised by a check that does not apply to this implementation; its message says why."""


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

    @property
    def capabilities(self) -> Capabilities:
        return getattr(self.cls, "capabilities", Capabilities())

    def make(self, **overrides: Any) -> Any:
        """A configured instance: the subject's args (minus name selection) with ``overrides``."""
        args = {k: v for k, v in self.args.items() if k not in SELECTION_ARGS}
        return self.cls({**args, **overrides})


#: Why a check does not apply to a subject (None: it applies). Read from the class alone (its
#: capabilities, whether it is a ScoreSparsifier), like scikit-learn's estimator tags.
Reason = Callable[[Subject], "str | None"]
#: A check returns nothing, or a note for the report (e.g. a probe it skipped, and why).
CheckFunc = Callable[[Subject], "str | None"]


@dataclass(frozen=True)
class CheckSpec:
    name: str
    kind: Kind
    func: CheckFunc
    skip_reason: Reason
    doc: str


_CHECKS: list[CheckSpec] = []


def _applies(subject: Subject) -> str | None:
    return None


def _check(kinds: Iterable[Kind], skip: Reason = _applies, *, name: str | None = None) -> Callable[[CheckFunc], CheckFunc]:
    def decorate(func: CheckFunc) -> CheckFunc:
        check_name = name or func.__name__.removeprefix("check_")
        doc = (func.__doc__ or "").strip().splitlines()[0]
        for kind in kinds:
            _CHECKS.append(CheckSpec(check_name, kind, func, skip, doc))
        return func

    return decorate


def checks_for(kind: Kind, cls: type | None = None, *, by_name: bool = True) -> list[CheckSpec]:
    """Every check of ``kind``, in the order they run. A check that does not apply to a class is
    still listed: running it reports it as skipped, with the reason (``CheckSpec.skip_reason``)."""
    return [c for c in _CHECKS if c.kind == kind]


def _is_score(cls: type) -> bool:
    return issubclass(cls, ScoreSparsifier)


# -- why a check does not apply (from the class) -----------------------------------------------
def _needs_score(subject: Subject) -> str | None:
    if _is_score(subject.cls):
        return None
    return f"{subject.label} selects its own masks (not a ScoreSparsifier): it has no pattern or scope"


def _allocates_reason(subject: Subject) -> str:
    return (
        f"{subject.label} allocates levels itself (capabilities.allocates_levels): only the overall level "
        f"is promised, not each tensor's (checked by level_overall)"
    )


def _per_tensor_levels(subject: Subject) -> str | None:
    if _is_score(subject.cls):
        return f"{subject.label} is a ScoreSparsifier: its levels are checked per pattern and scope (level_unstructured_layer, level_unstructured_global)"
    return _allocates_reason(subject) if subject.capabilities.allocates_levels else None


def _per_tensor_levels_score(subject: Subject) -> str | None:
    return _needs_score(subject) or (_allocates_reason(subject) if subject.capabilities.allocates_levels else None)


def _allocates(subject: Subject) -> str | None:
    if subject.capabilities.allocates_levels:
        return None
    where = "level_unstructured_layer" if _is_score(subject.cls) else "level_reached"
    return f"{subject.label} does not allocate levels (capabilities.allocates_levels is False): each tensor's level is checked by {where}"


def _reconstructs(subject: Subject) -> str | None:
    if subject.capabilities.reconstruction:
        return None
    return f"{subject.label} does not update kept weights (capabilities.reconstruction is False)"


def _calibrates(subject: Subject) -> str | None:
    if subject.capabilities.calibration:
        return None
    return f"{subject.label} needs no calibration (capabilities.calibration is False)"


def _gradients(subject: Subject) -> str | None:
    if subject.capabilities.gradients:
        return None
    return f"{subject.label} needs no gradients (capabilities.gradients is False)"


def _gathers_statistics(subject: Subject) -> str | None:
    caps = subject.capabilities
    if caps.calibration or caps.gradients:
        return None
    return f"{subject.label} gathers no statistics (capabilities.calibration and capabilities.gradients are False)"


def _by_name(subject: Subject) -> str | None:
    if isinstance(subject.target, str):
        return None
    return "given as a class, not a registered name: there is no name to resolve through the registry"


def _mapping_applies(subject: Subject) -> str | None:
    caps = subject.capabilities
    if caps.calibration:
        return f"{subject.label} needs calibration (activations), a mapping of tensors has none"
    if caps.gradients:
        return f"{subject.label} needs gradients (a loss), a mapping of tensors has none"
    if caps.layer_kinds is not None:
        return f"{subject.label} supports layer kinds {sorted(caps.layer_kinds)} only, the tensors of a mapping have no layer kind"
    return None


# -- helpers ---------------------------------------------------------------------------------
def _accepts_context(sparsifier: Sparsifier) -> bool:
    """Whether ``compute_masks`` takes contract v2's ``context`` (the controller's own rule)."""
    return accepts_context(sparsifier.compute_masks)


def _compute(
    sparsifier: Sparsifier,
    tensors: Mapping[str, torch.Tensor],
    levels: Mapping[str, float],
    layouts: Mapping[str, TensorLayout],
    current: Mapping[str, torch.Tensor] | None = None,
) -> Any:
    """``compute_masks`` as the controller calls it: with a :class:`MaskContext` (current masks,
    layouts) where the signature accepts one. The kit calls it itself, so that it does not depend
    on how a controller version routes the call."""
    with torch.no_grad():
        if _accepts_context(sparsifier):
            return sparsifier.compute_masks(tensors, levels, MaskContext(dict(current or {}), dict(layouts)))
        return sparsifier.compute_masks(tensors, levels)


def _split_result(sparsifier: Sparsifier, result: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(masks, weights) from what compute_masks returned (weights empty for plain masks)."""
    if isinstance(result, Reconstruction):
        assert type(sparsifier).capabilities.reconstruction, (
            f"compute_masks returned a Reconstruction, but {type(sparsifier).__qualname__}.capabilities.reconstruction "
            f"is False: declare capabilities = Capabilities(reconstruction=True) to update kept weights"
        )
        weights = result.weights
        assert isinstance(weights, Mapping), f"Reconstruction.weights must be a dict of tensors, got {type(weights).__name__}"
        return result.masks, dict(weights)
    return result, {}


@torch.no_grad()
def _apply(tensors: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor]) -> None:
    """What the controller does with a result: write the new weights, then zero the pruned positions."""
    for name, tensor in tensors.items():
        if name in weights:
            tensor.copy_(weights[name])
        tensor.masked_fill_(~masks[name], 0)


def _describe(name: str, module: Any, layout: TensorLayout, tensor: torch.Tensor) -> str:
    return f"{name!r} ({type(module).__name__}, kind {layout.kind}, rank {tensor.dim()})"


def _unsupported(subject: Subject, probe: _probes.Probe, names: Iterable[str]) -> str | None:
    """Why ``probe`` is outside the subject's layer kinds / tensor ranks (None: inside)."""
    caps = subject.capabilities
    if caps.layer_kinds is None and caps.tensor_ranks is None:
        return None
    outside = []
    for name in names:
        prefix, _, attr = name.rpartition(".")
        module = probe.model.get_submodule(prefix) if prefix else probe.model
        tensor = getattr(module, attr)
        layout = layout_of(module, attr)
        if caps.layer_kinds is not None and layout.kind not in caps.layer_kinds:
            outside.append(f"{_describe(name, module, layout, tensor)}: not one of its layer_kinds {sorted(caps.layer_kinds)}")
        elif caps.tensor_ranks is not None and tensor.dim() not in caps.tensor_ranks:
            outside.append(f"{_describe(name, module, layout, tensor)}: not one of its tensor_ranks {sorted(caps.tensor_ranks)}")
    if not outside:
        return None
    return f"the {probe.name} probe is outside what {subject.label} supports: " + "; ".join(outside)


def _make_for(subject: Subject, probe: _probes.Probe, **spec: Any) -> Sparsifier:
    """A configured instance covering the probe's tensors; CheckSkipped (with the reason) when any
    of them is outside the class's layer kinds or tensor ranks."""
    sparsifier = subject.make(**({"include": probe.include} if probe.include else {}), **spec)
    tensors, default = named_tensors(probe.model)
    reason = _unsupported(subject, probe, sparsifier.covers(tensors, default))
    if reason is not None:
        raise CheckSkipped(reason)
    return sparsifier


def _feed(sparsifier: Sparsifier, controller: SparsityController, probe: _probes.Probe, batches: list[torch.Tensor], targets: list[torch.Tensor]) -> None:
    """What the sparsifier needs before compute_masks: calibration batches (``observe``), and the
    gradients of the probe loss (``observe_gradient``), each after ``reset_calibration``."""
    caps = type(sparsifier).capabilities
    if caps.calibration:
        controller.calibrate(batches)  # resets first
    if caps.gradients:
        if not caps.calibration:
            sparsifier.reset_calibration()
        _feed_gradients(sparsifier, probe.model, controller.tensors, batches, targets)


def _feed_gradients(
    sparsifier: Sparsifier, model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], batches: list[torch.Tensor], targets: list[torch.Tensor]
) -> None:
    """One backward pass of the probe loss (MSE against fixed targets) per batch, then
    ``observe_gradient(name, parameter, grad)`` for every covered parameter, as in training."""
    try:
        for x, y in zip(batches, targets):
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = torch.nn.functional.mse_loss(model(x).float(), y)
                loss.backward()
            for name, param in tensors.items():
                assert param.grad is not None, f"the kit's probe loss gave no gradient for {name!r}"
                sparsifier.observe_gradient(name, param, param.grad)
    finally:
        model.zero_grad(set_to_none=True)


@dataclass
class Setup:
    probe: _probes.Probe
    sparsifier: Sparsifier
    controller: SparsityController
    selection: Selection


def _prepare(subject: Subject, probe: _probes.Probe, **spec: Any) -> Setup:
    """A sparsifier on the probe (or CheckSkipped), fed what it needs (calibration, gradients)."""
    sparsifier = _make_for(subject, probe, **spec)
    controller = SparsityController(probe.model, sparsifier)
    selection = select_tensors(probe.model, sparsifier)
    _feed(sparsifier, controller, probe, probe.batches, probe.targets)
    return Setup(probe, sparsifier, controller, selection)


@dataclass
class Run:
    probe: _probes.Probe
    sparsifier: Sparsifier
    controller: SparsityController
    levels: dict[str, float]
    masks: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    result: Any
    layouts: dict[str, TensorLayout]

    def layout(self, name: str) -> TensorLayout:
        return self.layouts.get(name) or generic_layout()

    def matrix(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like tensor ``name``) in its ``[outputs, reduction]`` matrix view."""
        return self.layout(name).matrix(t)


def _run(
    subject: Subject,
    factory: _probes.ProbeFactory = _probes.mlp,
    *,
    level: float = 0.5,
    dtype: torch.dtype = torch.float32,
    **spec: Any,
) -> Run:
    """Configure, feed (calibration, gradients, when asked for) and compute masks on a fresh probe, at ``level``."""
    setup = _prepare(subject, factory(subject.seed, dtype), **spec)
    tensors = setup.controller.tensors
    levels = dict.fromkeys(tensors, level)
    result = _compute(setup.sparsifier, tensors, levels, setup.selection.layouts)
    masks, weights = _split_result(setup.sparsifier, result)
    _assert_masks_valid(masks, tensors)
    return Run(setup.probe, setup.sparsifier, setup.controller, levels, dict(masks), weights, result, dict(setup.selection.layouts))


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
    """The generic 2-D view (dim 0 = rows, the rest flattened), for tensors without a layout."""
    return t.reshape(1, -1) if t.dim() < 2 else t.reshape(t.shape[0], -1)


def _achieved(mask: torch.Tensor) -> float:
    return 1.0 - mask.float().mean().item() if mask.numel() else 0.0


def _assert_overall_level(masks: Mapping[str, torch.Tensor], level: float, what: str, widest: int) -> None:
    """All masks together prune ``level`` of their elements, to within one row of the widest tensor."""
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert abs(pruned - level * total) <= widest + 1e-9, (
        f"{what}: pruned {pruned} of {total} elements over all tensors ({pruned / max(total, 1):.4f}), "
        f"asked for {level:g} (tolerance {widest} elements, one row of the widest tensor)"
    )


def _assert_level(run: Run, level: float, what: str, unit: int = 1) -> None:
    """Each mask prunes ``level`` of its tensor, to within one selection unit per row of its matrix
    view; for a class that allocates levels itself, all masks together (see _assert_overall_level)."""
    if type(run.sparsifier).capabilities.allocates_levels:
        widest = max(max(run.matrix(n, m).shape[1], unit * run.matrix(n, m).shape[0]) for n, m in run.masks.items())
        _assert_overall_level(run.masks, level, f"{what} (overall: {run.sparsifier.name or 'it'} allocates levels)", widest)
        return
    for name, mask in run.masks.items():
        cols = run.matrix(name, mask).shape[1]
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


def _assert_nm(run: Run, n: int, m: int, what: str, scores: Mapping[str, torch.Tensor] | None = None) -> None:
    """Exactly ``n`` of every ``m`` consecutive weights along the reduction axis (matrix view) kept;
    with ``scores``, the ``n`` highest of each group."""
    for name, mask in run.masks.items():
        matrix = run.matrix(name, mask)
        groups = matrix.reshape(matrix.shape[0], -1, m)
        kept = groups.sum(-1)
        assert bool((kept == n).all()), (
            f"{what}: {name!r} keeps {sorted(set(kept.reshape(-1).tolist()))} of some groups of {m} consecutive "
            f"weights along its reduction axis ({run.layout(name).kind or 'generic'} layout, matrix view "
            f"{tuple(matrix.shape)}), not {n}"
        )
        if scores is not None:
            bad = _order_violation(run.matrix(name, scores[name]).reshape(groups.shape), groups)
            assert bad is None, f"{what}: in {name!r} a pruned element scores {bad[0]:.6g} > a kept one of its group, {bad[1]:.6g}"


def _assert_channels(run: Run, level: float, scope: str, what: str) -> None:
    """Masks are whole rows of the matrix view; per layer the pruned rows are the closest whole
    number to ``level * rows``, in global scope the pruned elements are within half a row of the
    widest tensor of ``level`` of them all (as close as whole rows allow)."""
    widest = 0
    for name, mask in run.masks.items():
        matrix = run.matrix(name, mask)
        widest = max(widest, matrix.shape[1])
        partial = int((matrix.any(1) & ~matrix.all(1)).sum())
        assert not partial, (
            f"{what}: {name!r} has {partial} of {matrix.shape[0]} rows partly kept (matrix view "
            f"{tuple(matrix.shape)}); a channel is kept or pruned whole"
        )
        if scope == "layer" and not type(run.sparsifier).capabilities.allocates_levels:
            rows = matrix.shape[0]
            pruned = int((~matrix.any(1)).sum())
            assert abs(pruned - level * rows) <= 0.5 + 1e-9, (
                f"{what}: {name!r} prunes {pruned} of its {rows} rows, asked for {level:g} ({level * rows:g} rows): "
                f"not the closest whole number of rows"
            )
    if scope == "global" or type(run.sparsifier).capabilities.allocates_levels:
        total = sum(m.numel() for m in run.masks.values())
        pruned = sum(int((~m).sum()) for m in run.masks.values())
        assert abs(pruned - level * total) <= widest / 2 + 1e-9, (
            f"{what}: pruned {pruned} of {total} elements in whole rows, asked for {level:g} ({level * total:g}); "
            f"whole rows allow within {widest / 2:g} (half the widest row)"
        )


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


@_check(["sparsifier", "scheduler"], _by_name)
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


@_check(["sparsifier"], _per_tensor_levels)
def check_level_reached(subject: Subject) -> None:
    """Each tensor reaches the requested level (0.3, 0.5, 0.9)."""
    for level in (0.3, 0.5, 0.9):
        _assert_level(_run(subject, level=level), level, f"level {level:g}")


@_check(["sparsifier"], _allocates)
def check_level_overall(subject: Subject) -> None:
    """allocates_levels: all covered tensors together reach the requested level (0.3, 0.5, 0.9)."""
    for level in (0.3, 0.5, 0.9):
        run = _run(subject, level=level, sparsity_level=level, **_score_spec(subject.cls))
        _assert_level(run, level, f"level {level:g}")


@_check(["sparsifier"], _per_tensor_levels_score)
def check_level_unstructured_layer(subject: Subject) -> None:
    """pattern='unstructured', scope='layer': each tensor reaches the level (0.3, 0.5, 0.9)."""
    for level in (0.3, 0.5, 0.9):
        run = _run(subject, level=level, pattern="unstructured", scope="layer", sparsity_level=level)
        _assert_level(run, level, f"unstructured/layer at {level:g}")


@_check(["sparsifier"], _needs_score)
def check_level_unstructured_global(subject: Subject) -> None:
    """pattern='unstructured', scope='global': all covered tensors together reach the level."""
    for level in (0.3, 0.7):
        run = _run(subject, level=level, pattern="unstructured", scope="global", sparsity_level=level)
        total = sum(m.numel() for m in run.masks.values())
        pruned = sum(int((~m).sum()) for m in run.masks.values())
        assert abs(pruned - round(level * total)) <= 1, (
            f"unstructured/global at {level:g}: pruned {pruned} of {total} elements, expected {round(level * total)}"
        )


@_check(["sparsifier"], _needs_score)
def check_pattern_block_1x4(subject: Subject) -> None:
    """pattern='1x4': masks are constant over aligned 1x4 blocks of the matrix view and reach the level."""
    run = _run(subject, level=0.5, pattern="1x4", scope="layer", sparsity_level=0.5)
    for name, mask in run.masks.items():
        matrix = run.matrix(name, mask)
        blocks = matrix.reshape(matrix.shape[0], -1, 4)
        mixed = int((blocks.any(-1) & ~blocks.all(-1)).sum())
        assert not mixed, f"1x4: {name!r} has {mixed} blocks that are partly kept"
    _assert_level(run, 0.5, "1x4 at 0.5", unit=4)


@_check(["sparsifier"], _needs_score)
def check_pattern_nm_2_4(subject: Subject) -> None:
    """pattern='2:4': exactly 2 of every 4 consecutive inputs kept, the 2 highest scores of each group."""
    run = _run(subject, level=0.5, pattern="2:4")
    _assert_nm(run, 2, 4, "2:4", _scores(run))


@_check(["sparsifier"], _needs_score)
def check_pattern_channel(subject: Subject) -> None:
    """pattern='channel': masks are whole rows of the matrix view, as close to the level as whole rows allow (layer and global)."""
    for scope in ("layer", "global"):
        for level in (0.3, 0.5):
            run = _run(subject, level=level, pattern="channel", scope=scope, sparsity_level=level)
            _assert_channels(run, level, scope, f"channel/{scope} at {level:g}")


@_check(["sparsifier"], _needs_score)
def check_importance_order_layer(subject: Subject) -> None:
    """scope='layer': no pruned element scores higher than a kept one (of its tensor; of its row
    when the class overrides compute_masks, e.g. a per-output comparison)."""
    run = _run(subject, level=0.5, pattern="unstructured", scope="layer", sparsity_level=0.5)
    scores = _scores(run)
    whole = not _selects_whole_masks(subject.cls)
    for name, mask in run.masks.items():
        assert scores[name].shape == mask.shape, f"score({name!r}) has shape {tuple(scores[name].shape)}, tensor {tuple(mask.shape)}"
        s, m = (scores[name].reshape(-1), mask.reshape(-1)) if whole else (run.matrix(name, scores[name]), run.matrix(name, mask))
        bad = _order_violation(s, m)
        assert bad is None, (
            f"{name!r}: a pruned element scores {bad[0]:.6g} > a kept one, {bad[1]:.6g} "
            f"({'over the tensor' if whole else 'within a row'})"
        )


@_check(["sparsifier"], _needs_score)
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
def check_inputs_not_modified(subject: Subject) -> str | None:
    """Calibration and compute_masks modify nothing; a step changes only the pruned elements of covered weights
    (with reconstruction, the kept ones change by the sparsifier's update: see reconstruction_result)."""
    probe = _probes.mlp(subject.seed)
    before = {k: v.detach().clone() for k, v in probe.model.state_dict().items()}
    batches_before = [b.clone() for b in probe.batches]
    setup = _prepare(subject, probe)
    controller = setup.controller
    levels = dict.fromkeys(controller.tensors, 0.5)
    _compute(setup.sparsifier, controller.tensors, levels, setup.selection.layouts)
    after = probe.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"calibration or compute_masks modified {changed}"
    assert all(torch.equal(a, b) for a, b in zip(batches_before, probe.batches)), "calibration modified its input batches"
    if subject.capabilities.reconstruction:
        return "reconstruction: what applying the result changes is checked by reconstruction_result and reconstruction_error"
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
    return None


@_check(["sparsifier"], _reconstructs)
def check_reconstruction_result(subject: Subject) -> None:
    """reconstruction: compute_masks returns Reconstruction(masks, weights), the weights shaped, typed and placed like
    their tensors, finite and zero where pruned; applied, pruned positions are exactly zero and the level is met."""
    for dtype in (torch.float32, torch.bfloat16):
        run = _run(subject, dtype=dtype, level=0.5, sparsity_level=0.5, **_score_spec(subject.cls))
        assert isinstance(run.result, Reconstruction), (
            f"{subject.label} declares capabilities.reconstruction but returned {type(run.result).__name__} at level 0.5, "
            f"not a Reconstruction(masks, weights)"
        )
        tensors = run.controller.tensors
        unknown = sorted(set(run.weights) - set(tensors))
        assert not unknown, f"Reconstruction.weights has names it was not given: {unknown}"
        for name, w in run.weights.items():
            t = tensors[name]
            assert isinstance(w, torch.Tensor), f"weights for {name!r} is a {type(w).__name__}, not a tensor"
            assert (w.shape, w.dtype, w.device) == (t.shape, t.dtype, t.device), (
                f"{dtype}: weights for {name!r} are {tuple(w.shape)} {w.dtype} on {w.device}; its tensor is "
                f"{tuple(t.shape)} {t.dtype} on {t.device}"
            )
            assert bool(torch.isfinite(w).all()), f"{dtype}: weights for {name!r} have NaN or inf values"
            nonzero = int((w[~run.masks[name]] != 0).sum())
            assert not nonzero, (
                f"{dtype}: weights for {name!r} are nonzero at {nonzero} of its {int((~run.masks[name]).sum())} pruned "
                f"positions: an update is made for the pruned weights being zero, so it must hold zeros there"
            )
        _apply(tensors, run.masks, run.weights)
        for name, t in tensors.items():
            assert bool((t[~run.masks[name]] == 0).all()), f"{dtype}: once applied, {name!r} is nonzero at pruned positions"
        _assert_level(run, 0.5, f"{dtype} reconstruction at 0.5")


def _layer_outputs(setup: Setup, weights: Mapping[str, torch.Tensor], inputs: Mapping[str, list[tuple[Any, ...]]]) -> dict[str, list[torch.Tensor]]:
    out = {}
    with torch.no_grad():
        for name, (module, attr) in setup.selection.owners.items():
            out[name] = [torch.func.functional_call(module, {attr: weights[name]}, args).float() for args in inputs[name]]
    return out


@_check(["sparsifier"], _reconstructs)
def check_reconstruction_error(subject: Subject) -> None:
    """reconstruction: each layer's output error ||WX - W'X|| on the probe's calibration inputs is no
    worse than with the same masks alone (the original weights, pruned positions zeroed)."""
    setup = _prepare(subject, _probes.mlp(subject.seed), **({"sparsity_level": 0.5, **_score_spec(subject.cls)}))
    tensors = setup.controller.tensors
    inputs: dict[str, list[tuple[Any, ...]]] = {name: [] for name in setup.selection.owners}
    handles = [
        module.register_forward_pre_hook(lambda mod, args, name=name: inputs[name].append(tuple(a.detach().clone() for a in args)))
        for name, (module, _) in setup.selection.owners.items()
    ]
    try:
        with torch.no_grad():
            for batch in setup.probe.batches:
                setup.probe.model(batch)
    finally:
        for h in handles:
            h.remove()
    original = {n: t.detach().clone() for n, t in tensors.items()}
    result = _compute(setup.sparsifier, tensors, dict.fromkeys(tensors, 0.5), setup.selection.layouts)
    masks, weights = _split_result(setup.sparsifier, result)
    _assert_masks_valid(masks, tensors)
    mask_only = {n: original[n].masked_fill(~masks[n], 0) for n in tensors}
    updated = {n: weights.get(n, original[n]).to(original[n].dtype).masked_fill(~masks[n], 0) for n in tensors}
    dense = _layer_outputs(setup, original, inputs)
    with_masks = _layer_outputs(setup, mask_only, inputs)
    with_update = _layer_outputs(setup, updated, inputs)
    worse = []
    for name in tensors:
        err_mask = math.sqrt(sum(float((d - m).pow(2).sum()) for d, m in zip(dense[name], with_masks[name])))
        err_update = math.sqrt(sum(float((d - u).pow(2).sum()) for d, u in zip(dense[name], with_update[name])))
        scale = math.sqrt(sum(float(d.pow(2).sum()) for d in dense[name]))
        if err_update > err_mask * (1 + 1e-3) + 1e-6 * scale:
            worse.append(f"{name!r}: {err_update:.6g} with the update, {err_mask:.6g} with the masks alone")
    assert not worse, "the update makes the layer output error ||WX - W'X|| worse than pruning alone: " + "; ".join(worse)


@_check(["sparsifier"])
def check_nested_masks(subject: Subject) -> None:
    """Told the current masks (context.current), a sparsifier that does not declare regrowth keeps
    every currently pruned weight pruned (the level checks check the level)."""
    caps = subject.cls.capabilities
    if caps.regrowth:
        raise CheckSkipped(f"{subject.label} declares regrowth: pruned weights may come back")
    setup = _prepare(subject, _probes.mlp(subject.seed))
    if not _accepts_context(setup.sparsifier):
        raise CheckSkipped(
            f"{subject.label}'s compute_masks takes no context (v1): the core keeps its pruned weights pruned "
            f"by intersecting masks"
        )
    tensors = setup.controller.tensors
    gen = torch.Generator().manual_seed(subject.seed + 7)
    # an earlier mask of its own that it would not choose now: made at 0.3 from randomly rescaled
    # weights (so it has the sparsifier's own structure: rows, blocks, groups)
    scaled = {n: (t.detach() * (torch.rand(t.shape, generator=gen) ** 3 + 0.01).to(t.dtype)).contiguous() for n, t in tensors.items()}
    current, _ = _split_result(setup.sparsifier, _compute(setup.sparsifier, scaled, dict.fromkeys(tensors, 0.3), setup.selection.layouts))
    current = dict(current)
    levels = dict.fromkeys(tensors, 0.5)
    masks, _ = _split_result(setup.sparsifier, _compute(setup.sparsifier, tensors, levels, setup.selection.layouts, current))
    _assert_masks_valid(masks, tensors)
    for name, keep in current.items():
        revived = int((masks[name] & ~keep).sum())
        assert not revived, (
            f"{name!r}: {revived} weights pruned by the current mask are kept again; keep context.current's pruned "
            f"weights pruned, or declare capabilities.regrowth"
        )


@_check(["sparsifier"])
def check_deterministic(subject: Subject) -> None:
    """The same seed gives the same masks (construct, calibrate and compute twice)."""
    runs = []
    for _ in range(2):
        torch.manual_seed(subject.seed)
        runs.append(_run(subject, level=0.5))
    differ = [n for n in runs[0].masks if not torch.equal(runs[0].masks[n], runs[1].masks[n])]
    assert not differ, f"two runs with torch.manual_seed({subject.seed}) gave different masks for {differ}"
    differ = [n for n in runs[0].weights if n not in runs[1].weights or not torch.equal(runs[0].weights[n], runs[1].weights[n])]
    assert not differ, f"two runs with torch.manual_seed({subject.seed}) gave different reconstructed weights for {differ}"


@_check(["sparsifier"])
def check_state_roundtrip(subject: Subject) -> None:
    """SparsityController.state_dict survives torch.save/torch.load(weights_only=True) and restores the masks
    (with reconstruction: the masks, and zeros at pruned positions; the kept weights are the sparsifier's)."""
    reconstruction = subject.capabilities.reconstruction
    setup = _prepare(subject, _probes.mlp(subject.seed))
    controller = setup.controller
    if reconstruction:
        # The kit applies the result itself (write the weights, zero the pruned), as the controller does.
        levels = setup.sparsifier.final_levels(controller.tensors)
        masks, weights = _split_result(setup.sparsifier, _compute(setup.sparsifier, controller.tensors, levels, setup.selection.layouts))
        _assert_masks_valid(masks, controller.tensors)
        _apply(controller.tensors, masks, weights)
        controller.masks, controller.levels = dict(masks), dict(levels)
    else:
        controller.step()
    buffer = io.BytesIO()
    torch.save(controller.state_dict(), buffer)
    buffer.seek(0)
    try:
        state = torch.load(buffer, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report whatever weights_only refuses
        raise AssertionError(f"torch.load(weights_only=True) refused the state: {type(exc).__name__}: {exc}") from None
    fresh = _probes.mlp(subject.seed)
    restored = SparsityController(fresh.model, _make_for(subject, fresh))
    restored.load_state_dict(state)
    for name, mask in controller.masks.items():
        assert torch.equal(restored.masks[name], mask), f"restored mask of {name!r} differs"
        if reconstruction:
            assert bool((restored.tensors[name][~mask] == 0).all()), f"restored {name!r} is nonzero at pruned positions"
        else:
            assert torch.equal(restored.tensors[name], controller.tensors[name]), f"restored {name!r} differs"
    assert restored.levels == controller.levels and restored.t == controller.t, "restored schedule position differs"


def _score_spec(cls: type) -> dict[str, Any]:
    return {"pattern": "unstructured", "scope": "layer"} if _is_score(cls) else {}


@_check(["sparsifier"])
def check_bfloat16(subject: Subject) -> None:
    """A bf16 model (weights and calibration inputs) gets valid masks at the requested level."""
    run = _run(subject, dtype=torch.bfloat16, level=0.5, sparsity_level=0.5, **_score_spec(subject.cls))
    _assert_level(run, 0.5, "bf16 at 0.5")


def _layout_patterns(subject: Subject) -> str | None:
    """On the conv probe: 2:4 groups and channels along the matrix view (input channels at each
    kernel position), given a context. None when checked, else why not."""
    run = _run(subject, _probes.conv, level=0.5, pattern="2:4")
    if not _accepts_context(run.sparsifier):
        return (
            f"N:M and channels on the 4-D weight not checked: {type(run.sparsifier).__qualname__}.compute_masks "
            f"takes no context (contract v1), so it cannot know the layer's layout"
        )
    _assert_nm(run, 2, 4, "conv probe, 2:4")
    run = _run(subject, _probes.conv, level=0.5, pattern="channel", scope="layer", sparsity_level=0.5)
    _assert_channels(run, 0.5, "layer", "conv probe, channel at 0.5")
    return None


@_check(["sparsifier"])
def check_tensor_ranks_1d_4d(subject: Subject) -> str | None:
    """A 4-D (Conv2d) and a 1-D (LayerNorm) weight get valid masks at the requested level (a ScoreSparsifier's
    2:4 groups and channels on the 4-D weight along its matrix view)."""
    notes = []
    for factory in (_probes.conv, _probes.with_vector):
        try:
            run = _run(subject, factory, level=0.5, sparsity_level=0.5, **_score_spec(subject.cls))
        except CheckSkipped as exc:
            notes.append(f"skipped: {exc}")
            continue
        ranks = sorted({t.dim() for t in run.controller.tensors.values()})
        _assert_level(run, 0.5, f"{factory.__name__} probe (ranks {ranks}) at 0.5")
        if factory is _probes.conv and _is_score(subject.cls):
            note = _layout_patterns(subject)
            if note:
                notes.append(note)
    if len([n for n in notes if n.startswith("skipped: ")]) == 2:
        raise CheckSkipped("; ".join(n.removeprefix("skipped: ") for n in notes))
    return "; ".join(notes) or None


@_check(["sparsifier"], _mapping_applies)
def check_mapping_target(subject: Subject) -> str | None:
    """sparsify() on a mapping of named 1-D, 2-D and 4-D tensors reaches the level in place."""
    from .._api import sparsify

    gen = torch.Generator().manual_seed(subject.seed)
    tensors = {
        "vector": torch.randn(32, generator=gen),
        "matrix": torch.randn(16, 32, generator=gen),
        "kernel": torch.randn(8, 4, 3, 3, generator=gen),
    }
    caps = subject.capabilities
    note = None
    if caps.tensor_ranks is not None:
        outside = [f"{n!r} (rank {t.dim()})" for n, t in tensors.items() if t.dim() not in caps.tensor_ranks]
        tensors = {n: t for n, t in tensors.items() if t.dim() in caps.tensor_ranks}
        if not tensors:
            raise CheckSkipped(f"none of the mapping's tensors has one of {subject.label}'s tensor_ranks {sorted(caps.tensor_ranks)}")
        if outside:
            note = f"left out {', '.join(outside)}: not one of its tensor_ranks {sorted(caps.tensor_ranks)}"
    args = {k: v for k, v in subject.args.items() if k not in SELECTION_ARGS}
    spec = {**args, "sparsity_level": 0.5, **_score_spec(subject.cls)}
    if caps.reconstruction:
        # the kit applies a Reconstruction itself (write the weights, zero the pruned), as the controller does
        sparsifier = subject.cls(spec)
        names = sparsifier.covers(tensors)
        covered = {n: tensors[n] for n in names}
        masks, weights = _split_result(sparsifier, _compute(sparsifier, covered, sparsifier.final_levels(names), {}))
        _assert_masks_valid(masks, covered)
        _apply(covered, masks, weights)
        report = {n: 1.0 - torch.count_nonzero(t).item() / t.numel() for n, t in tensors.items()}
    else:
        report = sparsify(tensors, subject.cls, spec)
    zeros = {n: 1.0 - torch.count_nonzero(t).item() / t.numel() for n, t in tensors.items()}
    for name in tensors:
        assert abs(zeros[name] - report[name]) < 1e-9, f"the report says {report[name]:.4f} for {name!r}, the tensor has {zeros[name]:.4f}"
    if caps.allocates_levels:
        total = sum(t.numel() for t in tensors.values())
        pruned = sum(zeros[n] * t.numel() for n, t in tensors.items())
        widest = max(_rows(t).shape[1] for t in tensors.values())
        assert abs(pruned - 0.5 * total) <= widest + 1e-6, f"the mapping's tensors together reached {pruned / total:.4f}, asked for 0.5"
        return note
    for name, tensor in tensors.items():
        tolerance = 1 / _rows(tensor).shape[1] + 1e-9
        assert abs(zeros[name] - 0.5) <= tolerance, f"{name!r} {tuple(tensor.shape)} reached {zeros[name]:.4f}, asked for 0.5"
    return note


@_check(["sparsifier"], _calibrates)
def check_calibration_required(subject: Subject) -> None:
    """needs_calibration: computing masks without calibration raises an error that says so."""
    probe = _probes.mlp(subject.seed)
    controller = SparsityController(probe.model, _make_for(subject, probe))
    try:
        controller.step()
    except Exception as exc:  # noqa: BLE001 - any clear error will do
        assert "calibrat" in str(exc).lower(), f"the error does not mention calibration: {type(exc).__name__}: {exc}"
    else:
        raise AssertionError("masks were computed without calibration; raise an error that asks for calibration batches")


@_check(["sparsifier"], _gradients)
def check_gradients_required(subject: Subject) -> None:
    """gradients: computing masks with no gradient observed raises an error that says so."""
    probe = _probes.mlp(subject.seed)
    sparsifier = _make_for(subject, probe)
    controller = SparsityController(probe.model, sparsifier)
    if subject.capabilities.calibration:
        controller.calibrate(probe.batches)  # everything but the gradients
    else:
        sparsifier.reset_calibration()
    try:
        _compute(sparsifier, controller.tensors, dict.fromkeys(controller.tensors, 0.5), select_tensors(probe.model, sparsifier).layouts)
    except Exception as exc:  # noqa: BLE001 - any clear error will do
        assert "gradient" in str(exc).lower(), f"the error does not mention gradients: {type(exc).__name__}: {exc}"
    else:
        raise AssertionError(
            "masks were computed with no gradient observed; raise an error that asks for gradients "
            "(a loss_fn for one-shot use, or training)"
        )


@_check(["sparsifier"], _gathers_statistics)
def check_calibration_reset(subject: Subject) -> None:
    """reset_calibration forgets: calibrating (or observing gradients) on A then on B gives B's masks."""

    def masks_after(*sets: tuple[list[torch.Tensor], list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        probe = _probes.mlp(subject.seed)
        sparsifier = _make_for(subject, probe)
        controller = SparsityController(probe.model, sparsifier)
        for batches, targets in sets:
            _feed(sparsifier, controller, probe, batches, targets)
        masks, _ = _split_result(sparsifier, _compute(sparsifier, controller.tensors, dict.fromkeys(controller.tensors, 0.5), select_tensors(probe.model, sparsifier).layouts))
        return masks

    probe = _probes.mlp(subject.seed)
    b = (probe.batches, probe.targets)
    a = ([x.flip(-1) * 10 for x in probe.batches], [-3 * y for y in probe.targets])
    only_b, a_then_b, only_a = masks_after(b), masks_after(a, b), masks_after(a)
    what = "calibration batches" if subject.capabilities.calibration else "gradients"
    assert any(not torch.equal(only_a[n], only_b[n]) for n in only_b), (
        f"{what} had no effect on the masks (A and B give the same masks)"
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
    """The outcome of one named check: its status, and a message (a failure's, a skip's reason, or
    a passed check's note, e.g. a probe it skipped)."""

    check: str
    status: Status
    message: str = ""
    doc: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_check(spec: CheckSpec, subject: Subject) -> CheckResult:
    """Run one check with the global RNG state saved and restored; never raises for a failure.
    A check that does not apply (by the class's capabilities, or a probe outside them) is skipped
    with the reason."""
    reason = spec.skip_reason(subject)
    if reason is not None:
        return CheckResult(spec.name, "skipped", reason, spec.doc)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(subject.seed)
        try:
            note = spec.func(subject)
        except CheckSkipped as exc:
            return CheckResult(spec.name, "skipped", str(exc), spec.doc)
        except AssertionError as exc:
            return CheckResult(spec.name, "failed", str(exc) or "assertion failed", spec.doc)
        except Exception as exc:  # noqa: BLE001 - an implementation that raises fails the check
            return CheckResult(spec.name, "failed", f"raised {type(exc).__name__}: {exc}", spec.doc)
    return CheckResult(spec.name, "passed", note or "", spec.doc)

