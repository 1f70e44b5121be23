"""Backward compatibility of an event's JSON Schema: can the new reader read the old messages?

A change is compatible when every message valid under the previous schema is still valid
under the current one, as far as the structure shows: no property removed, no type, enum
value or bound narrowed, no property newly required, no closed object closing further.
Anything else needs a new ``schema_version``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

JsonSchema = Mapping[str, Any]

# Keywords whose larger value accepts less, and those whose smaller value accepts less.
_LOWER_BOUNDS = ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties")
_UPPER_BOUNDS = ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties")
# Keywords that any change may narrow; a changed value is reported rather than reasoned about.
_OPAQUE_KEYWORDS = ("pattern", "format", "multipleOf")
_ANY = "any"


@dataclass(frozen=True, slots=True)
class _Document:
    """One schema with its ``$defs``, to resolve local references."""

    root: JsonSchema

    def resolve(self, node: JsonSchema) -> JsonSchema:
        seen: set[str] = set()
        while "$ref" in node:
            reference = node["$ref"]
            if not isinstance(reference, str) or not reference.startswith("#/"):
                raise ValueError(f"only local references are supported, got {reference!r}")
            if reference in seen:
                raise ValueError(f"reference cycle at {reference}")
            seen.add(reference)
            target: Any = self.root
            for part in reference[2:].split("/"):
                target = target[part.replace("~1", "/").replace("~0", "~")]
            # Keywords beside a $ref (e.g. a description) do not change what is accepted.
            node = target
        return node

    def branches(self, node: JsonSchema) -> list[JsonSchema]:
        """The alternatives a node accepts, each with exactly one JSON type."""
        node = self.resolve(node)
        alternatives = node.get("anyOf") or node.get("oneOf")
        if alternatives is not None:
            return [branch for item in alternatives for branch in self.branches(item)]
        if "allOf" in node and len(node["allOf"]) == 1:
            return self.branches(node["allOf"][0])
        declared = node.get("type")
        if isinstance(declared, list):
            return [{**node, "type": name} for name in declared]
        if declared is None:
            values = _values(node)
            if values is None:
                return [{**node, "type": _ANY}]
            types = sorted({_json_type(value) for value in values})
            return [{**node, "type": name} for name in types]
        return [node]


def breaking_changes(previous: JsonSchema, current: JsonSchema) -> list[str]:
    """Why messages valid under ``previous`` may fail under ``current``; empty when compatible."""
    return list(_compare(_Document(previous), previous, _Document(current), current, "$"))


def _compare(
    old_doc: _Document, old: JsonSchema, new_doc: _Document, new: JsonSchema, path: str
) -> Iterator[str]:
    new_branches = new_doc.branches(new)
    for old_branch in old_doc.branches(old):
        candidates = [branch for branch in new_branches if _accepts_type(branch, old_branch)]
        if not candidates:
            accepted = sorted({branch["type"] for branch in new_branches})
            yield f"{path}: type {old_branch['type']} is no longer accepted (now {accepted})"
            continue
        reports = [
            list(_compare_branch(old_doc, old_branch, new_doc, branch, path))
            for branch in candidates
        ]
        if all(reports):
            yield from reports[0]


def _compare_branch(
    old_doc: _Document, old: JsonSchema, new_doc: _Document, new: JsonSchema, path: str
) -> Iterator[str]:
    yield from _compare_values(old, new, path)
    yield from _compare_bounds(old, new, path)
    if old["type"] == "object" and new["type"] == "object":
        yield from _compare_objects(old_doc, old, new_doc, new, path)
    if old["type"] == "array" and new["type"] == "array" and "items" in new:
        if "items" in old:
            yield from _compare(old_doc, old["items"], new_doc, new["items"], f"{path}[]")
        else:
            yield f"{path}[]: items are now constrained"


def _compare_values(old: JsonSchema, new: JsonSchema, path: str) -> Iterator[str]:
    new_values = _values(new)
    if new_values is None:
        return
    old_values = _values(old)
    if old_values is None:
        yield f"{path}: values are now restricted to {_show(new_values)}"
        return
    removed = [value for value in old_values if value not in new_values]
    if removed:
        yield f"{path}: value(s) {_show(removed)} are no longer accepted"


def _compare_bounds(old: JsonSchema, new: JsonSchema, path: str) -> Iterator[str]:
    for keyword in _LOWER_BOUNDS:
        if keyword in new and (keyword not in old or new[keyword] > old[keyword]):
            yield f"{path}: {keyword} tightened from {old.get(keyword)} to {new[keyword]}"
    for keyword in _UPPER_BOUNDS:
        if keyword in new and (keyword not in old or new[keyword] < old[keyword]):
            yield f"{path}: {keyword} tightened from {old.get(keyword)} to {new[keyword]}"
    for keyword in _OPAQUE_KEYWORDS:
        if keyword in new and new[keyword] != old.get(keyword):
            yield f"{path}: {keyword} changed from {old.get(keyword)!r} to {new[keyword]!r}"


def _compare_objects(
    old_doc: _Document, old: JsonSchema, new_doc: _Document, new: JsonSchema, path: str
) -> Iterator[str]:
    old_properties: JsonSchema = old.get("properties", {})
    new_properties: JsonSchema = new.get("properties", {})
    for name, old_property in old_properties.items():
        if name not in new_properties:
            yield f"{path}.{name}: property removed"
            continue
        yield from _compare(old_doc, old_property, new_doc, new_properties[name], f"{path}.{name}")
    old_required = set(old.get("required", ()))
    for name in new.get("required", ()):
        if name not in old_required:
            change = "became required" if name in old_properties else "new required property"
            yield f"{path}.{name}: {change}"
    yield from _compare_additional(old_doc, old, new_doc, new, path)
    old_patterns: JsonSchema = old.get("patternProperties", {})
    new_patterns: JsonSchema = new.get("patternProperties", {})
    for pattern, old_values in old_patterns.items():
        if pattern not in new_patterns:
            yield f"{path}: property pattern {pattern!r} removed"
            continue
        yield from _compare(
            old_doc, old_values, new_doc, new_patterns[pattern], f"{path}.<{pattern}>"
        )


def _compare_additional(
    old_doc: _Document, old: JsonSchema, new_doc: _Document, new: JsonSchema, path: str
) -> Iterator[str]:
    # JSON Schema: an absent additionalProperties is `true`, i.e. anything is accepted.
    old_extra = old.get("additionalProperties", True)
    new_extra = new.get("additionalProperties", True)
    if new_extra is True or old_extra is False:
        return
    if new_extra is False:
        yield f"{path}: additional properties are no longer accepted"
    elif old_extra is True:
        yield f"{path}: additional properties are now constrained"
    else:
        yield from _compare(old_doc, old_extra, new_doc, new_extra, f"{path}.*")


def _accepts_type(new: JsonSchema, old: JsonSchema) -> bool:
    # Every JSON integer is also a JSON number, so integer -> number widens.
    return new["type"] in (_ANY, old["type"]) or (old["type"], new["type"]) == ("integer", "number")


def _values(node: JsonSchema) -> list[Any] | None:
    if "const" in node:
        return [node["const"]]
    if "enum" in node:
        return list(node["enum"])
    if node.get("type") == "null":
        return [None]
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _show(values: list[Any]) -> str:
    return ", ".join(repr(value) for value in values)
