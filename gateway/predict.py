"""POST /predict, the gateway's hot path: one request body in, one answer out.

``answer`` turns a request into the JSON answer with the one scoring core
(``gateway.scoring.Scorer``). ``PredictEndpoint`` serves it as a bare ASGI endpoint:
``GatewayMiddleware`` hands every ``POST /predict`` straight to it, past Starlette's router and
FastAPI's per-route machinery (exception middleware, exit stack, route matching, dependency
solving, four wrapped ``send`` callables), which cost more CPU than the scoring itself in a
profile under load. The FastAPI route of the same path (``gateway.routes``) calls the same
``answer``; it documents the endpoint in the OpenAPI document and serves it if the app is run
without the middleware.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from gateway.responses import problem_answer
from gateway.service import Gateway

_CONTENT_TYPE = (b"content-type", b"application/json")


def answer(service: Gateway, body: bytes, request_id: str, started: float) -> bytes:
    """The JSON answer to a /predict body (raises ``RequestProblemError`` or ``NoModelError``)."""
    rows, single = service.scorer.rows(body)
    scores = service.scorer.score(rows, request_id, single=single, started=started)
    champion = scores.champion
    answer: dict[str, Any] = {
        "request_id": request_id,
        "model_name": champion.name,
        "model_version": champion.version,
    }
    if scores.single:
        answer["prediction"] = scores.predictions[0]
    else:
        answer["predictions"] = [
            {"request_id": row_id, "prediction": prediction}
            for row_id, prediction in zip(scores.row_ids, scores.predictions, strict=True)
        ]
    return orjson.dumps(answer)


class PredictEndpoint:
    """``POST /predict`` as a bare ASGI endpoint (see the module docstring).

    Expects what ``GatewayMiddleware`` puts in the scope's state (``request_id``, ``started``)
    and a ``receive`` that enforces the body limit.
    """

    def __init__(self, service: Gateway) -> None:
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service = self.service
        state = scope["state"]
        try:
            if service.requires_api_key:
                service.check_api_key(_header(scope, b"x-api-key"))
            body = await _body(receive)
            if body is None:
                return  # the client went away; there is no one to answer
            status = 200
            payload = answer(service, body, state["request_id"], state["started"])
        except Exception as error:
            problem = problem_answer(error)
            if problem is None:
                raise  # a bug: the server error middleware answers 500 and logs it
            status, payload = problem
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [_CONTENT_TYPE, (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


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
