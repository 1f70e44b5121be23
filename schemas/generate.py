"""Write the JSON Schema of every event to ``schemas/jsonschema``: ``python -m schemas.generate``.

The files are the published contract for producers and consumers outside Python; a unit test
fails when they differ from the models. Files of retired schema versions are left in place.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from schemas.events import EVENT_CLASSES, Event

JSON_SCHEMA_DIR = Path(__file__).with_name("jsonschema")
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def schema_file_name(event: type[Event]) -> str:
    """File name of an event's schema, e.g. ``PredictionEvent.v1.json``."""
    return f"{event.__name__}.v{event.SCHEMA_VERSION}.json"


def event_json_schema(event: type[Event]) -> dict[str, Any]:
    """The JSON Schema of one event, as the decoder validates it."""
    return {"$schema": _DIALECT, **event.model_json_schema(mode="validation")}


def render_json_schema(schema: dict[str, Any]) -> str:
    """Stable text of a schema: sorted keys, two-space indent, trailing newline."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def json_schema_documents() -> dict[str, str]:
    """File name -> text of the current schema of every event."""
    return {
        schema_file_name(event): render_json_schema(event_json_schema(event))
        for event in EVENT_CLASSES
    }


def stale_json_schemas(directory: Path = JSON_SCHEMA_DIR) -> list[str]:
    """Names of the schema files that are missing or differ from the models."""
    return sorted(
        name
        for name, text in json_schema_documents().items()
        if not (directory / name).is_file()
        or (directory / name).read_text(encoding="utf-8") != text
    )


def write_json_schemas(directory: Path = JSON_SCHEMA_DIR) -> list[Path]:
    """Write every event's schema into ``directory``; returns the files whose content changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = [directory / name for name in stale_json_schemas(directory)]
    documents = json_schema_documents()
    for path in changed:
        path.write_text(documents[path.name], encoding="utf-8")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: write the schema files, or with ``--check`` only report stale ones."""
    parser = argparse.ArgumentParser(prog="python -m schemas.generate", description=__doc__)
    parser.add_argument("--output", type=Path, default=JSON_SCHEMA_DIR, help="target directory")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if a file is stale"
    )
    arguments = parser.parse_args(argv)
    if arguments.check:
        stale = stale_json_schemas(arguments.output)
        for name in stale:
            sys.stderr.write(f"stale: {arguments.output / name}\n")
        return 1 if stale else 0
    for path in write_json_schemas(arguments.output):
        sys.stderr.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
