"""The gateway's JSON responses: orjson-encoded bytes, and the answers to refused requests."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from gateway.middleware import BodyTooLargeError, problem_body
from gateway.scoring import NoModelError, RequestProblemError


class JSONBytesResponse(Response):
    """JSON encoded by orjson (several times faster than the standard library on our payloads)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        """The content as UTF-8 JSON."""
        return orjson.dumps(content)


def problem_answer(error: BaseException) -> tuple[int, bytes] | None:
    """Status and body answering a refused request, or None for an error that is not one."""
    if isinstance(error, RequestProblemError):
        problems = [
            {"field": problem.field, "reason": problem.reason} for problem in error.problems
        ]
        return error.status, orjson.dumps({"detail": problems})
    if isinstance(error, NoModelError):
        return 503, problem_body("model", str(error))
    if isinstance(error, BodyTooLargeError):
        return 413, problem_body("body", f"larger than {error.limit} bytes")
    return None
