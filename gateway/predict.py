"""POST /predict and /models/{name}/predict, the gateway's hot path: one body in, one answer out.

``answer`` is the HTTP transport of the one scoring service (``driftloop.serving.scoring``): it
reads the body, asks the service for scores, records and publishes them (``Gateway.record``) and
writes the JSON answer. ``PredictEndpoint`` serves it as a bare ASGI endpoint:
``GatewayMiddleware`` hands every ``POST /predict`` straight to it, past Starlette's router and
FastAPI's per-route machinery (exception middleware, exit stack, route matching, dependency
solving, four wrapped ``send`` callables), which cost more CPU than the scoring itself in a
profile under load. The FastAPI route of the same path (``gateway.routes``) calls the same
``answer``; it documents the endpoint in the OpenAPI document and serves it if the app is run
without the middleware.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from driftloop.serving.catalog import ServedModel
from gateway.bodies import item_prefix, one_or_many, parse_json, require_json
from gateway.problems import (
    PROBLEM_MEDIA_TYPE,
    RequestProblemError,
    ScoringFailedError,
    problem_answer,
)
from gateway.service import Gateway
from schemas.validation import Problem

_JSON = b"application/json"
_PROBLEM = PROBLEM_MEDIA_TYPE.encode()


def answer(
    service: Gateway,
    model: ServedModel,
    body: bytes,
    content_type: str | None,
    request_id: str,
    started: float,
) -> bytes:
    """The JSON answer of ``model`` to a predict body (raises a refusal ``problem_answer``
    answers)."""
    require_json(content_type)
    rows, single = one_or_many(parse_json(body), max_items=service.settings.max_rows, what="row")
    scores = model.scoring.score(rows)
    if scores.refused:
        raise RequestProblemError(
            422,
            [
                problem.under(item_prefix(position, single))
                for position, problems in scores.refused
                for problem in problems
            ],
        )
    if scores.failed:
        failed = scores.failed
        raise ScoringFailedError(
            [Problem(item_prefix(position, single) or "body", why) for position, why in failed]
        )
    champion = scores.champion
    row_ids = [request_id] if single else [f"{request_id}:{i}" for i in range(len(rows))]
    latency_ms = (time.perf_counter() - started) * 1000.0
    service.record(champion, scores.rows, row_ids, scores.predictions, latency_ms)
    answer: dict[str, Any] = {
        "request_id": request_id,
        "model_name": champion.name,
        "model_version": champion.version,
    }
    if single:
        answer["prediction"] = scores.predictions[0]
    else:
        answer["predictions"] = [
            {"request_id": row_id, "prediction": prediction}
            for row_id, prediction in zip(row_ids, scores.predictions, strict=True)
        ]
    return orjson.dumps(answer)


class PredictEndpoint:
    """A model's predict path (``/predict``, ``/models/{name}/predict``) as a bare ASGI
    endpoint (see the module docstring).

    Expects what ``GatewayMiddleware`` puts in the scope's state (``request_id``, ``started``)
    and a ``receive`` that enforces the body limit.
    """

    def __init__(self, service: Gateway, model: ServedModel) -> None:
        self.service = service
        self.model = model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self.service
        state = scope["state"]
        api_key: str | None = None
        content_type: str | None = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = bytes(value).decode("latin-1")
            elif name == b"x-api-key":
                api_key = bytes(value).decode("latin-1")
        try:
            if service.requires_api_key:
                service.check_api_key(api_key)
            body = await _body(receive)
            if body is None:
                return  # the client went away; there is no one to answer
            status, media_type = 200, _JSON
            payload = answer(
                service, self.model, body, content_type, state["request_id"], state["started"]
            )
        except Exception as error:
            problem = problem_answer(error)
            if problem is None:
                raise  # a bug: the server error middleware answers 500 and logs it
            (status, payload), media_type = problem, _PROBLEM
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", media_type),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


async def _body(receive: Receive) -> bytes | None:
    """The whole request body, or None when the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
