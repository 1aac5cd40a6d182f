"""Specs: validation, defaults, descriptions, JSON schema, and errors that name the culprit."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

import sparsity_core as sc
from sparsity_core._registry import Registry


def all_implementations():
    registry = Registry(autoload=False)
    return registry.implementations("sparsifier") + registry.implementations("scheduler")


@pytest.mark.parametrize("impl", all_implementations(), ids=lambda i: i.qualified_name)
def test_every_builtin_has_a_complete_spec(impl):
    spec = impl.cls.Spec
    assert spec.model_config["extra"] == "forbid"
    for name, field in spec.model_fields.items():
        assert field.description, f"{impl.qualified_name}.{name} has no description"
        assert not field.is_required(), f"{impl.qualified_name}.{name} has no default"
    instance = impl.cls()  # every built-in works with no arguments at all
    assert isinstance(instance.spec, spec)
    assert spec.model_validate_json(instance.spec.model_dump_json()) == instance.spec
    schema = spec.model_json_schema()
    assert schema["title"] == impl.name and schema["additionalProperties"] is False
    json.dumps(schema)


def test_error_names_the_implementation_the_field_and_the_rule():
    with pytest.raises(ValidationError) as exc:
        sc.create_sparsifier("magnitude", {"sparsity_level": 1.5})
    text = str(exc.value)
    assert "validation error for magnitude" in text
    assert "sparsity_level" in text and "less than or equal to 1" in text
    assert isinstance(exc.value, ValueError)


def test_misspelt_argument_is_named():
    with pytest.raises(ValidationError, match=r"(?s)magnitude.*sparsity_levle.*Extra inputs are not permitted"):
        sc.create_sparsifier("magnitude", {"sparsity_levle": 0.5})


@pytest.mark.parametrize(
    ("pattern", "rule"),
    [
        *((p, r"'HxW'.*'N:M'") for p in ["2x", "x4", "0x4", "2:0", "blocks", "1x4x4"]),
        ("5:4", r"N:M needs 0 < N <= M"),
        ("0:4", r"N:M needs 0 < N <= M"),
    ],
)
def test_bad_pattern_states_the_form(pattern, rule):
    with pytest.raises(ValidationError, match=rf"(?s)ScoreSpec\npattern\n.*{rule}") as exc:
        sc.ScoreSpec(pattern=pattern)
    assert repr(pattern) in str(exc.value)


@pytest.mark.parametrize(("pattern", "kind"), [("unstructured", "unstructured"), ("1x4", "block"), (" 2:4 ", "n:m")])
def test_good_patterns_parse(pattern, kind):
    assert sc.ScoreSpec(pattern=pattern).parsed_pattern.kind == kind


def test_n_m_fixes_the_level_and_rejects_global_scope():
    assert sc.ScoreSpec(pattern="1:4").sparsity_level == 0.75
    assert sc.ScoreSpec(pattern="2:4", sparsity_level=0.5).sparsity_level == 0.5
    with pytest.raises(ValidationError, match=r"fixes sparsity_level at 0.5"):
        sc.ScoreSpec(pattern="2:4", sparsity_level=0.9)
    with pytest.raises(ValidationError, match=r"scope='global' does not apply to pattern '2:4'"):
        sc.ScoreSpec(pattern="2:4", scope="global")


def test_scheduler_end_defaults_to_start_and_must_not_precede_it():
    assert sc.SchedulerSpec(start=3).end == 3
    assert sc.SchedulerSpec().model_dump() == {"start": 0, "end": 0, "unit": "epoch"}
    with pytest.raises(ValidationError, match=r"end must be >= start"):
        sc.create_scheduler("cubic", {"start": 5, "end": 2})
    with pytest.raises(ValidationError, match=r"(?s)cubic.*unit.*'epoch' or 'step'"):
        sc.create_scheduler("cubic", {"unit": "batch"})


def test_overrides_are_validated_against_the_spec():
    spec = sc.ScoreSpec(sparsity_level=0.9, overrides={"head.*": {"sparsity_level": 0.3}})
    sparsifier = sc.create_sparsifier("magnitude", spec)
    assert sparsifier.spec_for("head.weight").sparsity_level == 0.3
    assert sparsifier.spec_for("body.weight").sparsity_level == 0.9
    with pytest.raises(ValidationError, match=r"overrides\['head\.\*'\]\.sparsity_level"):
        sc.create_sparsifier("magnitude", {"overrides": {"head.*": {"sparsity_level": 2}}})
    with pytest.raises(ValidationError, match=r"overrides\['head\.\*'\]\.colour: Extra inputs"):
        sc.create_sparsifier("magnitude", {"overrides": {"head.*": {"colour": 1}}})
    with pytest.raises(ValidationError, match=r"not which names are covered"):
        sc.create_sparsifier("magnitude", {"overrides": {"head.*": {"exclude": ["x"]}}})


def test_args_may_be_a_spec_instance_of_the_base_model():
    sparsifier = sc.create_sparsifier("magnitude", sc.ScoreSpec(sparsity_level=0.8, scope="global"))
    assert type(sparsifier.spec) is type(sparsifier).Spec
    assert (sparsifier.spec.sparsity_level, sparsifier.spec.scope) == (0.8, "global")
    assert issubclass(type(sparsifier).Spec, sc.ScoreSpec)
    with pytest.raises(TypeError, match="must be a dict or a"):
        sc.create_sparsifier("magnitude", [("sparsity_level", 0.8)])


def test_specs_are_immutable():
    spec = sc.create_sparsifier("magnitude").spec
    with pytest.raises(ValidationError, match="frozen"):
        spec.sparsity_level = 0.1
