"""Refused requests and their answer: one RFC 9457 ``application/problem+json`` body.

Every refusal of the gateway, wherever it is decided (the middleware's header and size checks,
the /predict endpoint, the routes, FastAPI's request validation, Starlette's 404 and 405), is
answered by ``problem_answer`` with a body from ``problem_body``;
``gateway.contract.ProblemDetails`` describes it in the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Final

import orjson

from driftloop.serving.scoring import NoModelError
from schemas.validation import Problem, capped, describe

PROBLEM_MEDIA_TYPE: Final = "application/problem+json"


class RequestProblemError(ValueError):
    """The request cannot be served as sent; answered with ``status`` and the problems."""

    def __init__(self, status: int, problems: Sequence[Problem]) -> None:
        super().__init__(describe(problems))
        self.status = status
        self.problems = capped(problems)


class BodyTooLargeError(Exception):
    """The request body passed the size limit while it was being read."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")
        self.limit = limit


class ScoringFailedError(RuntimeError):
    """The model gave no finite prediction for a valid row: a server failure, answered 500."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__(describe(problems))
        self.problems = list(problems)


def problem_body(status: int, problems: Sequence[Problem]) -> bytes:
    """The RFC 9457 body of a refusal: status, title, one-line detail and every problem."""
    return orjson.dumps(
        {
            "type": "about:blank",
            "title": HTTPStatus(status).phrase,
            "status": status,
            "detail": describe(problems),
            "errors": [{"field": problem.field, "reason": problem.reason} for problem in problems],
        }
    )


def problem_answer(error: BaseException) -> tuple[int, bytes] | None:
    """Status and problem body answering ``error``, or None for an error that is not a refusal."""
    if isinstance(error, RequestProblemError):
        return error.status, problem_body(error.status, error.problems)
    if isinstance(error, NoModelError):
        return 503, problem_body(503, [Problem("model", str(error))])
    if isinstance(error, BodyTooLargeError):
        return 413, problem_body(413, [Problem("body", f"larger than {error.limit} bytes")])
    if isinstance(error, ScoringFailedError):
        return 500, problem_body(500, error.problems)
    return None
