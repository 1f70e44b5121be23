"""JSON Schema files: in sync with the models, and backward compatible with the committed ones."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from schemas.compatibility import breaking_changes
from schemas.events import EVENT_CLASSES, Event, PredictionEvent
from schemas.generate import (
    JSON_SCHEMA_DIR,
    event_json_schema,
    json_schema_documents,
    main,
    schema_file_name,
    stale_json_schemas,
    write_json_schemas,
)

pytestmark = pytest.mark.unit

REGENERATE = "run `uv run python -m schemas.generate` and commit schemas/jsonschema"
EVENT_IDS = [cls.__name__ for cls in EVENT_CLASSES]


def committed_schema(path: Path, revision: str = "HEAD") -> dict[str, Any] | None:
    """The file as committed at ``revision``; None outside git or when it is not committed."""
    git = shutil.which("git")
    if git is None:
        return None
    top = subprocess.run(
        [git, "rev-parse", "--show-toplevel"],
        cwd=path.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    if top.returncode != 0:
        return None
    relative = path.resolve().relative_to(Path(top.stdout.strip()).resolve()).as_posix()
    shown = subprocess.run(
        [git, "show", f"{revision}:{relative}"],
        cwd=path.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    if shown.returncode != 0:
        return None
    document: dict[str, Any] = json.loads(shown.stdout)
    return document


@pytest.mark.parametrize("event_class", EVENT_CLASSES, ids=EVENT_IDS)
def test_committed_schema_matches_the_model(event_class: type[Event]) -> None:
    path = JSON_SCHEMA_DIR / schema_file_name(event_class)
    assert path.is_file(), f"{path} is missing: {REGENERATE}"
    expected = json_schema_documents()[path.name]
    assert path.read_text(encoding="utf-8") == expected, f"{path} is stale: {REGENERATE}"


@pytest.mark.parametrize("event_class", EVENT_CLASSES, ids=EVENT_IDS)
def test_schema_is_compatible_with_git_head(event_class: type[Event]) -> None:
    path = JSON_SCHEMA_DIR / schema_file_name(event_class)
    previous = committed_schema(path)
    if previous is None:
        pytest.skip(f"{path.name} is not in git HEAD yet (a new event or schema version)")
    problems = breaking_changes(previous, event_json_schema(event_class))
    assert not problems, (
        f"{event_class.__name__} v{event_class.SCHEMA_VERSION} breaks its committed schema; "
        f"make the change compatible or raise schema_version: {problems}"
    )


@pytest.mark.parametrize("event_class", EVENT_CLASSES, ids=EVENT_IDS)
def test_schema_requires_the_envelope(event_class: type[Event]) -> None:
    schema = event_json_schema(event_class)
    assert schema["required"][:4] == ["event_type", "schema_version", "event_id", "occurred_at"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["schema_version"]["const"] == event_class.SCHEMA_VERSION


def test_generator_writes_only_what_changed(tmp_path: Path) -> None:
    written = write_json_schemas(tmp_path)
    assert sorted(path.name for path in written) == sorted(json_schema_documents())
    assert all(path.read_text(encoding="utf-8").endswith("}\n") for path in written)
    assert write_json_schemas(tmp_path) == []
    assert stale_json_schemas(tmp_path) == []


def test_generator_check_mode(tmp_path: Path) -> None:
    assert main(["--check", "--output", str(tmp_path)]) == 1
    assert main(["--output", str(tmp_path)]) == 0
    assert main(["--check", "--output", str(tmp_path)]) == 0
    stale = tmp_path / schema_file_name(PredictionEvent)
    stale.write_text("{}\n", encoding="utf-8")
    assert main(["--check", "--output", str(tmp_path)]) == 1
    assert stale_json_schemas(tmp_path) == [stale.name]


def test_generated_text_is_stable() -> None:
    text = json_schema_documents()[schema_file_name(PredictionEvent)]
    document = json.loads(text)
    assert text == json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"


# The checker on hand-made schemas: one property of each shape, referenced through $defs.
BASE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "count": {"type": "integer", "minimum": 0},
        "name": {"type": "string", "maxLength": 20, "pattern": "^[a-z]+$"},
        "kind": {"enum": ["a", "b"], "type": "string"},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
        "tags": {"type": "array", "items": {"type": "string"}},
        "values": {"type": "object", "additionalProperties": {"type": "number"}},
        "inner": {"$ref": "#/$defs/Inner"},
    },
    "required": ["count", "name", "inner"],
    "$defs": {
        "Inner": {
            "type": "object",
            "properties": {"x": {"type": "number"}, "mode": {"$ref": "#/$defs/Mode"}},
            "required": ["x"],
        },
        "Mode": {"enum": ["fast", "slow"], "type": "string"},
    },
}


def changed(**edits: Any) -> dict[str, Any]:
    """A deep copy of BASE with ``path=value`` edits (path parts split on ``__``; ... deletes)."""
    schema = copy.deepcopy(BASE)
    for path, value in edits.items():
        *parents, last = path.split("__")
        node = schema
        for part in parents:
            node = node[part]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return schema


def test_identical_schemas_are_compatible() -> None:
    assert breaking_changes(BASE, copy.deepcopy(BASE)) == []


@pytest.mark.parametrize(
    "edits",
    [
        {"properties__extra": {"type": "string", "default": ""}},
        {"properties__count": {"type": "number", "minimum": 0}},
        {"properties__count": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
        {"properties__name": {"type": "string", "maxLength": 40, "pattern": "^[a-z]+$"}},
        {"properties__kind": {"enum": ["a", "b", "c"], "type": "string"}},
        {"properties__kind": {"type": "string"}},
        {"properties__note": {"type": ["string", "null"]}},
        {"properties__inner__description": "documented"},
        {"required": ["count", "inner"]},
        {"$defs__Inner__properties__y": {"type": "string"}},
        {"$defs__Mode__enum": ["fast", "slow", "turbo"]},
        {"additionalProperties": True},
        {"properties__values__additionalProperties": {"type": ["number", "string"]}},
    ],
    ids=[
        "new-optional-property",
        "integer-to-number",
        "made-nullable",
        "longer-max-length",
        "new-enum-value",
        "enum-to-string",
        "anyof-to-type-list",
        "description-beside-ref",
        "no-longer-required",
        "new-optional-nested-property",
        "new-enum-value-in-defs",
        "opened-object",
        "wider-map-values",
    ],
)
def test_compatible_changes(edits: dict[str, Any]) -> None:
    assert breaking_changes(BASE, changed(**edits)) == []


@pytest.mark.parametrize(
    ("edits", "reported"),
    [
        ({"properties__name": ...}, "$.name: property removed"),
        ({"properties__count": {"type": "string"}}, "$.count: type integer is no longer"),
        ({"properties__count": {"type": "boolean"}}, "$.count: type integer is no longer"),
        ({"properties__note": {"type": "string"}}, "$.note: type null is no longer"),
        ({"properties__values__additionalProperties": {"type": "integer"}}, "$.values.*: type"),
        ({"properties__tags__items": {"type": "integer"}}, "$.tags[]: type string"),
        (
            {
                "properties__extra": {"type": "string"},
                "required": ["count", "name", "inner", "extra"],
            },
            "$.extra: new required property",
        ),
        ({"required": ["count", "name", "inner", "kind"]}, "$.kind: became required"),
        ({"properties__kind": {"enum": ["a"], "type": "string"}}, "value(s) 'b' are no longer"),
        ({"properties__kind": {"const": "a"}}, "value(s) 'b' are no longer"),
        ({"properties__count": {"type": "integer", "minimum": 1}}, "$.count: minimum tightened"),
        (
            {"properties__name": {"type": "string", "maxLength": 10, "pattern": "^[a-z]+$"}},
            "$.name: maxLength tightened",
        ),
        (
            {"properties__name": {"type": "string", "maxLength": 20, "pattern": "^[a-c]+$"}},
            "$.name: pattern changed",
        ),
        ({"$defs__Inner__properties__x": {"type": "string"}}, "$.inner.x: type number"),
        ({"$defs__Inner__properties__x": ...}, "$.inner.x: property removed"),
        ({"$defs__Inner__required": ["x", "mode"]}, "$.inner.mode: became required"),
        ({"$defs__Mode__enum": ["fast"]}, "$.inner.mode: value(s) 'slow'"),
        ({"$defs__Inner__additionalProperties": False}, "$.inner: additional properties are no"),
        ({"properties__tags": {"type": "string"}}, "$.tags: type array is no longer"),
    ],
    ids=[
        "removed",
        "retyped",
        "retyped-to-boolean",
        "no-longer-nullable",
        "map-values-retyped",
        "array-items-retyped",
        "new-required",
        "optional-became-required",
        "enum-value-removed",
        "enum-narrowed-to-const",
        "minimum-raised",
        "max-length-lowered",
        "pattern-changed",
        "retyped-through-ref",
        "removed-through-ref",
        "required-through-ref",
        "enum-value-removed-through-ref",
        "closed-object",
        "array-to-string",
    ],
)
def test_breaking_changes(edits: dict[str, Any], reported: str) -> None:
    problems = breaking_changes(BASE, changed(**edits))
    assert any(reported in problem for problem in problems), problems


def test_every_problem_is_reported() -> None:
    problems = breaking_changes(
        BASE,
        changed(
            properties__name=...,
            properties__count={"type": "string"},
            required=["count", "inner", "kind"],
        ),
    )
    assert len(problems) == 3, problems


def test_only_local_references_are_followed() -> None:
    remote = changed(properties__inner={"$ref": "https://example.com/inner.json"})
    with pytest.raises(ValueError, match="local references"):
        breaking_changes(remote, remote)


@pytest.mark.parametrize("event_class", EVENT_CLASSES, ids=EVENT_IDS)
def test_checker_catches_breaks_of_every_real_event(event_class: type[Event]) -> None:
    schema = event_json_schema(event_class)
    assert breaking_changes(schema, event_json_schema(event_class)) == []
    name = schema["required"][-1]

    removed = copy.deepcopy(schema)
    del removed["properties"][name]
    assert f"$.{name}: property removed" in breaking_changes(schema, removed)

    retyped = copy.deepcopy(schema)
    retyped["properties"]["event_id"] = {"type": "integer"}
    assert any(p.startswith("$.event_id: type string") for p in breaking_changes(schema, retyped))

    required = copy.deepcopy(schema)
    required["properties"]["tenant"] = {"type": "string"}
    required["required"].append("tenant")
    assert "$.tenant: new required property" in breaking_changes(schema, required)
