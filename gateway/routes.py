"""HTTP routes: thin, each hands the request to the gateway's one scoring core or its state."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from driftloop.serving.catalog import ServedModel
from driftloop.serving.champion import Champion
from driftloop.serving.scoring import NoModelError
from gateway.bodies import read_feedback
from gateway.contract import (
    BatchPredictionResponse,
    CurrentModel,
    FeedbackAccepted,
    Liveness,
    PredictionResponse,
    Readiness,
    ServedModels,
)
from gateway.predict import answer
from gateway.problems import PROBLEM_MEDIA_TYPE
from gateway.responses import JSONBytesResponse
from gateway.service import Gateway
from schemas.events import GroundTruth
from schemas.fields import utc_now

router = APIRouter()

_REFUSALS: dict[int, str] = {
    400: "Not JSON, or an invalid X-Request-ID.",
    401: "API key (or bearer token) missing or unknown.",
    403: "Wrong admin token.",
    404: "No model of that name is served here.",
    409: "Publishing is off on this gateway.",
    413: "Body larger than the limit (GATEWAY_MAX_BODY_BYTES).",
    415: "The body is not JSON (Content-Type): the problem names the type sent.",
    422: "Rows or labels that do not match the declaration, or too many of them: every "
    "field and reason.",
    500: "The model gave no finite prediction for a valid row.",
    503: "No model loaded yet.",
}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of the refusals ``statuses``: an RFC 9457 problem each."""
    content = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}}
    return {status: {"description": _REFUSALS[status], "content": content} for status in statuses}


_REQUEST_ID: dict[str, Any] = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "description": "Id of the request (letters, digits, '.', '_', '-'; at most 100); generated "
    "when absent. A list request's rows get `<id>:<index>`.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"},
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
        "alias": service.settings.model_alias,
        "loaded_at": champion.loaded_at.isoformat(),
    }


def model_predict_path(name: str) -> str:
    """Where model ``name`` answers predictions."""
    return f"/models/{name}/predict"


@router.post(
    "/predict",
    summary="Score one row or a list of rows with the champion model",
    response_model=PredictionResponse | BatchPredictionResponse,
    responses=problem_responses(400, 401, 413, 415, 422, 500, 503),
    tags=["predictions"],
    openapi_extra={"parameters": [_REQUEST_ID]},
)
async def predict(request: Request) -> Response:
    """Score one row (object) or a list of rows; every row is published as a PredictionEvent.

    ``GatewayMiddleware`` serves this path with ``gateway.predict.PredictEndpoint``, which
    calls the same ``answer``; this route documents it (and serves it without the middleware).
    """
    service = gateway(request)
    return await _predict(service, service.default, request)


@router.post("/models/{name}/predict", include_in_schema=False)
async def predict_model(name: str, request: Request) -> Response:
    """Score rows with model ``name`` (documented per model: see ``gateway.app``)."""
    service = gateway(request)
    return await _predict(service, service.model(name), request)


async def _predict(service: Gateway, model: ServedModel, request: Request) -> Response:
    service.check_api_key(request.headers.get("x-api-key"))
    state = request.scope["state"]
    body = await request.body()
    content_type = request.headers.get("content-type")
    payload = answer(service, model, body, content_type, state["request_id"], state["started"])
    return Response(payload, media_type="application/json")


@router.post(
    "/feedback",
    summary="Send the true values of earlier predictions",
    status_code=202,
    response_model=FeedbackAccepted,
    responses=problem_responses(400, 401, 409, 413, 415, 422),
    tags=["predictions"],
)
async def feedback(request: Request) -> Response:
    """Publish each label as a GroundTruth event to the labels topic."""
    service = gateway(request)
    return await _feedback(service, service.default, request)


@router.post("/models/{name}/feedback", include_in_schema=False, status_code=202)
async def feedback_model(name: str, request: Request) -> Response:
    """Labels of model ``name``'s predictions (documented per model: see ``gateway.app``)."""
    service = gateway(request)
    # A label names its prediction by request id; the feature-logger joins it to that
    # prediction's row whatever model made it, so every model's labels share one topic. The
    # route's model says how a label is coded (a classifier's class names).
    return await _feedback(service, service.model(name), request)


async def _feedback(service: Gateway, model: ServedModel, request: Request) -> Response:
    service.check_api_key(request.headers.get("x-api-key"))
    labels = read_feedback(
        await request.body(),
        request.headers.get("content-type"),
        max_items=service.settings.max_rows,
        target=model.spec.target,
    )
    now = utc_now()
    for label in labels:
        service.publish_label(
            GroundTruth(
                request_id=label.feedback.request_id,
                label=label.coded,
                observed_at=label.feedback.observed_at or now,
            )
        )
    return JSONBytesResponse({"accepted": len(labels)}, status_code=202)


@router.get(
    "/models/current",
    summary="The model serving now",
    response_model=CurrentModel,
    responses=problem_responses(400, 503),
    tags=["models"],
)
async def current_model(request: Request) -> Response:
    """Name, version, run id and load time of the champion serving now."""
    service = gateway(request)
    champion = service.holder.current
    if champion is None:
        raise NoModelError(f"no model loaded yet for {service.model_name}@{service.holder.alias}")
    return JSONBytesResponse(_current_model(service, champion))


@router.get(
    "/models",
    summary="Every model this gateway serves",
    response_model=ServedModels,
    responses=problem_responses(400),
    tags=["models"],
)
async def served_models(request: Request) -> Response:
    """Each served model's name, task, predict path and champion (null until loaded)."""
    service = gateway(request)
    models = []
    for name, served in sorted(service.models.items()):
        champion = served.holder.current
        models.append(
            {
                "name": name,
                "task": served.spec.task.value,
                "predict_path": model_predict_path(name),
                "champion": _current_model(service, champion) if champion else None,
            }
        )
    return JSONBytesResponse({"default": service.model_name, "models": models})


@router.post(
    "/admin/reload",
    summary="Reload the champion from the registry now",
    response_model=CurrentModel,
    responses=problem_responses(400, 401, 403, 413, 503),
    tags=["admin"],
)
async def reload_model(request: Request) -> Response:
    """Serve any model declared since the start, then resolve every served model's alias and
    load its version if it is not the one serving (bearer token); answers with the default
    model."""
    service = gateway(request)
    service.check_admin(request.headers.get("authorization"))
    await service.catalog.discover()
    champion = (await service.catalog.refresh_all("admin"))[service.model_name]
    if champion is None:
        raise NoModelError(f"no model could be loaded for {service.model_name}")
    return JSONBytesResponse(_current_model(service, champion))


@router.get(
    "/health/live",
    summary="The process answers",
    response_model=Liveness,
    responses=problem_responses(400),
    tags=["operations"],
)
async def live() -> Response:
    """Always 200 while the event loop runs."""
    return JSONBytesResponse({"status": "ok"})


@router.get(
    "/health/ready",
    summary="Ready to serve predictions",
    response_model=Readiness,
    responses={
        503: {"model": Readiness, "description": "No model loaded yet."},
        **problem_responses(400),
    },
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


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses=problem_responses(400),
    tags=["operations"],
)
async def metrics(request: Request) -> Response:
    """Metrics in the Prometheus text format."""
    output = generate_latest(gateway(request).metrics.registry)
    return Response(output, media_type=CONTENT_TYPE_LATEST)
