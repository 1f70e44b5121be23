"""Request bodies of /predict and /feedback: JSON (by content type and by parse), one object or
a list of them. Each refusal is a ``RequestProblemError`` naming what was sent."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

import orjson
from pydantic import ValidationError

from gateway.contract import Feedback, code_label
from gateway.problems import RequestProblemError
from schemas.features import Target
from schemas.validation import Problem, field_path, problems_of

_JSON: Final = "application/json"
# application/json, or a structured syntax suffix such as application/merge-patch+json.
_JSON_MEDIA_TYPE: Final = re.compile(r"application/(?:[\w.+-]+\+)?json", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class CodedFeedback:
    """A label as sent, and its value coded for the model (what ``GroundTruth`` carries)."""

    feedback: Feedback
    coded: float


def require_json(content_type: str | None) -> None:
    """Refuse (415) a body that does not say it is JSON, naming the content type it says."""
    if content_type == _JSON:
        return  # what clients send, checked without parsing
    media_type = (content_type or "").partition(";")[0].strip()
    if _JSON_MEDIA_TYPE.fullmatch(media_type):
        return
    sent = f"got {media_type}" if media_type else "no Content-Type was sent"
    raise RequestProblemError(415, [Problem("Content-Type", f"expected {_JSON}; {sent}")])


def parse_json(body: bytes) -> Any:
    """The body as JSON, or a 400 problem naming the parse error."""
    if not body:
        raise RequestProblemError(400, [Problem("body", "empty body; expected JSON")])
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise RequestProblemError(400, [Problem("body", f"not valid JSON: {error}")]) from None


def one_or_many(payload: object, *, max_items: int, what: str) -> tuple[list[Any], bool]:
    """A JSON object or a non-empty list of at most ``max_items``: (items, was_single)."""
    if isinstance(payload, dict):
        return [payload], True
    if not isinstance(payload, list):
        reason = f"expected one {what} (object) or a list of them, got {type(payload).__name__}"
        raise RequestProblemError(422, [Problem("body", reason)])
    if not payload:
        raise RequestProblemError(422, [Problem("body", f"empty list; send at least one {what}")])
    if len(payload) > max_items:
        # The schema's maxItems: a list the contract refuses (422), not a body too large (413).
        reason = f"{len(payload)} {what}s; at most {max_items} per request"
        raise RequestProblemError(422, [Problem("body", reason)])
    return payload, False


def item_prefix(position: int, single: bool) -> str:
    """Where an item of the body is: nowhere for a single object, ``[3]`` in a list."""
    return "" if single else f"[{position}]"


def read_feedback(
    body: bytes, content_type: str | None, *, max_items: int, target: Target
) -> list[CodedFeedback]:
    """The checked labels of a /feedback body (one object or a list), each coded as the model
    learns it (``Target.encode``: a categorical target's class names become 1.0 or 0.0)."""
    require_json(content_type)
    items, single = one_or_many(parse_json(body), max_items=max_items, what="label")
    labels: list[CodedFeedback] = []
    problems: list[Problem] = []
    for position, item in enumerate(items):
        prefix = item_prefix(position, single)
        try:
            feedback = Feedback.model_validate(item)
        except ValidationError as error:
            problems += problems_of(error.errors(include_url=False), prefix)
            continue
        try:
            labels.append(CodedFeedback(feedback, code_label(target, feedback.label)))
        except ValueError as error:
            problems.append(Problem(field_path(("label",), prefix), str(error)))
    if problems:
        raise RequestProblemError(422, problems)
    return labels
