"""HTTP routes: thin, each hands the request to the gateway's one scoring core or its state."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Header, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from driftloop.champion import Champion
from gateway.contract import (
    BatchPredictionResponse,
    CurrentModel,
    FeedbackAccepted,
    PredictionResponse,
    ProblemResponse,
    Readiness,
)
from gateway.predict import answer
from gateway.responses import JSONBytesResponse
from gateway.scoring import NoModelError, read_feedback
from gateway.service import Gateway
from schemas.events import GroundTruth
from schemas.fields import utc_now

router = APIRouter()

_PROBLEMS: dict[int | str, dict[str, Any]] = {
    status: {"model": ProblemResponse, "description": description}
    for status, description in {
        400: "Not JSON, or an invalid X-Request-ID.",
        401: "API key (or bearer token) missing or unknown.",
        413: "Body larger than the limit, or too many rows.",
        422: "Rows or labels that do not match the declaration: every field and reason.",
    }.items()
}
_API_KEY: dict[str, Any] = {
    "name": "X-API-Key",
    "in": "header",
    "required": False,
    "description": "One of GATEWAY_API_KEYS, when the gateway is configured with any.",
    "schema": {"type": "string"},
}
_REQUEST_ID: dict[str, Any] = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "description": "Id of the request (letters, digits, '.', '_', '-'; at most 100); generated "
    "when absent. A list request's rows get `<id>:<index>`.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"},
}
_NO_MODEL: dict[int | str, dict[str, Any]] = {
    503: {"model": ProblemResponse, "description": "No model loaded yet."}
}


def gateway(request: Request) -> Gateway:
    """The running gateway of the app serving ``request``."""
    service: Gateway = request.app.state.gateway
    return service


def _current_model(service: Gateway, champion: Champion) -> dict[str, Any]:
    return {
        "name": champion.name,
        "version": champion.version,
        "run_id": champion.run_id,
        "alias": service.holder.alias,
        "loaded_at": champion.loaded_at.isoformat(),
    }


@router.post(
    "/predict",
    summary="Score one row or a list of rows with the champion model",
    response_model=PredictionResponse | BatchPredictionResponse,
    responses={**_PROBLEMS, **_NO_MODEL},
    tags=["predictions"],
    openapi_extra={"parameters": [_API_KEY, _REQUEST_ID]},
)
async def predict(request: Request) -> Response:
    """Score one row (object) or a list of rows; every row is published as a PredictionEvent.

    ``GatewayMiddleware`` serves this path with ``gateway.predict.PredictEndpoint``, which
    calls the same ``answer``; this route documents it (and serves it without the middleware).
    """
    service = gateway(request)
    service.check_api_key(request.headers.get("x-api-key"))
    state = request.scope["state"]
    body = answer(service, await request.body(), state["request_id"], state["started"])
    return Response(body, media_type="application/json")


@router.post(
    "/feedback",
    summary="Send the true values of earlier predictions",
    status_code=202,
    response_model=FeedbackAccepted,
    responses=_PROBLEMS,
    tags=["predictions"],
    openapi_extra={
        "parameters": [_API_KEY],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            {"$ref": "#/components/schemas/Feedback"},
                            {
                                "type": "array",
                                "items": {"$ref": "#/components/schemas/Feedback"},
                                "minItems": 1,
                            },
                        ]
                    },
                    "example": {"request_id": "3f2a9c", "label": 42.0},
                }
            },
        },
    },
)
async def feedback(request: Request) -> Response:
    """Publish each label as a GroundTruth event to the labels topic."""
    service = gateway(request)
    service.check_api_key(request.headers.get("x-api-key"))
    labels = read_feedback(await request.body(), max_items=service.settings.max_rows)
    now = utc_now()
    for label in labels:
        service.publish_label(
            GroundTruth(
                request_id=label.request_id,
                label=label.label,
                observed_at=label.observed_at or now,
            )
        )
    return JSONBytesResponse({"accepted": len(labels)}, status_code=202)


@router.get(
    "/models/current",
    summary="The model serving now",
    response_model=CurrentModel,
    responses=_NO_MODEL,
    tags=["models"],
)
async def current_model(request: Request) -> Response:
    """Name, version, run id and load time of the champion serving now."""
    service = gateway(request)
    champion = service.holder.current
    if champion is None:
        raise NoModelError(f"no model loaded yet for {service.model_name}@{service.holder.alias}")
    return JSONBytesResponse(_current_model(service, champion))


@router.post(
    "/admin/reload",
    summary="Reload the champion from the registry now",
    response_model=CurrentModel,
    responses={**_PROBLEMS, 403: {"model": ProblemResponse}, **_NO_MODEL},
    tags=["admin"],
)
async def reload_model(
    request: Request, authorization: str | None = Header(default=None)
) -> Response:
    """Resolve the alias and load its version if it is not the one serving (bearer token)."""
    service = gateway(request)
    service.check_admin(authorization)
    champion = await service.holder.refresh("admin")
    if champion is None:
        raise NoModelError(f"no model could be loaded for {service.model_name}")
    return JSONBytesResponse(_current_model(service, champion))


@router.get("/health/live", summary="The process answers", tags=["operations"])
async def live() -> Response:
    """Always 200 while the event loop runs."""
    return JSONBytesResponse({"status": "ok"})


@router.get(
    "/health/ready",
    summary="Ready to serve predictions",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "No model loaded yet."}},
    tags=["operations"],
)
async def ready(request: Request) -> Response:
    """200 once a model is loaded; Kafka's state is reported but does not block serving."""
    service = gateway(request)
    champion = service.holder.current
    publishing = service.publisher.status() if service.publisher is not None else None
    body = {
        "ready": champion is not None,
        "reason": None if champion else "no model loaded yet",
        "model": _current_model(service, champion) if champion else None,
        "kafka": publishing.state.value if publishing else "off",
        "spool_depth": publishing.spool_depth if publishing else 0,
        "spool_full": publishing.spool_full if publishing else False,
        "model_events": service.model_events_state,
    }
    return JSONBytesResponse(body, status_code=200 if champion else 503)


@router.get("/metrics", summary="Prometheus metrics", tags=["operations"])
async def metrics(request: Request) -> Response:
    """Metrics in the Prometheus text format."""
    output = generate_latest(gateway(request).metrics.registry)
    return Response(output, media_type=CONTENT_TYPE_LATEST)
