"""One ASGI middleware for every request: request id, body size limit, request metrics.

Pure ASGI rather than ``BaseHTTPMiddleware``: it adds no task and no body copy per request.
It also hands the hot endpoints it is given (``direct``: each model's predict path) straight to
their ASGI handler, past the router and FastAPI's per-route machinery.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from typing import Final

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.metrics import GatewayMetrics
from gateway.problems import PROBLEM_MEDIA_TYPE, BodyTooLargeError, problem_body
from schemas.validation import Problem

# A client's request id becomes a Kafka key and the prediction log's key; the gateway appends
# ":<row>" for list requests, so it leaves room under the 128 characters of a RequestId.
REQUEST_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
UNMATCHED_ROUTE: Final = "unmatched"


class GatewayMiddleware:
    """Assigns the request id, enforces the body limit and records requests and latency."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: GatewayMetrics,
        max_body_bytes: int,
        direct: Mapping[tuple[str, str], tuple[str, ASGIApp]] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        # (method, path) -> (route template, endpoint) served without the router. Held, not
        # copied: the gateway adds the predict path of a model it starts serving at run time.
        self.direct: Mapping[tuple[str, str], tuple[str, ASGIApp]] = (
            direct if direct is not None else {}
        )
        # Labelled children resolved once per (route, method, status): labels() takes a lock.
        self._children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id: str | None = None
        declared_length: int | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"content-length":
                declared_length = int(value) if value.isdigit() else None
        state = scope.setdefault("state", {})
        state["started"] = started
        status = 500
        request_id_bytes = b""
        template: str | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            if message["type"] == "http.response.start" and request_id_bytes:
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", request_id_bytes),
                ]
            await send(message)

        try:
            if request_id is not None and not REQUEST_ID_PATTERN.fullmatch(request_id):
                await _reject(
                    send_with_id,
                    400,
                    "X-Request-ID",
                    "must be 1 to 100 characters of letters, digits, '.', '_' or '-', "
                    "starting with a letter or digit",
                )
                return
            # 128 random bits as 32 hex digits, the shape of a uuid4's hex at a third its cost.
            request_id = request_id or os.urandom(16).hex()
            request_id_bytes = request_id.encode()
            state["request_id"] = request_id
            if declared_length is not None and declared_length > self.max_body_bytes:
                await _reject(send_with_id, 413, "body", f"larger than {self.max_body_bytes} bytes")
                return
            direct = self.direct.get((scope["method"], scope["path"]))
            if direct is not None:
                template, endpoint = direct
                await endpoint(scope, self._limited(receive), send_with_id)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        finally:
            if template is None:
                template = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
            labels = (template, scope["method"], str(status))
            children = self._children.get(labels)
            if children is None:
                children = self._children[labels] = (
                    self.metrics.requests.labels(*labels),
                    self.metrics.request_seconds.labels(*labels),
                )
            children[0].inc()
            children[1].observe(time.perf_counter() - started)

    def _limited(self, receive: Receive) -> Receive:
        received = 0
        limit = self.max_body_bytes

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        return receive_limited


async def _reject(send: Send, status: int, field: str, reason: str) -> None:
    body = problem_body(status, [Problem(field, reason)])
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", PROBLEM_MEDIA_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
