"""The gateway's FastAPI application: ``create_app(settings)``, or ``gateway.app:app``."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from driftloop.events.producer import RecordProducer
from driftloop.serving.catalog import ServedModel
from driftloop.serving.champion import ChampionSource
from driftloop.serving.scoring import NoModelError
from driftloop.settings import load_settings
from gateway.contract import (
    ADMIN_BEARER,
    API_KEY,
    SECURITY_SCHEMES,
    ProblemDetails,
    feedback_request_body,
    feedback_schemas,
    predict_request_body,
    row_schemas,
)
from gateway.metrics import GatewayMetrics
from gateway.middleware import GatewayMiddleware
from gateway.predict import PredictEndpoint
from gateway.problems import (
    PROBLEM_MEDIA_TYPE,
    BodyTooLargeError,
    RequestProblemError,
    ScoringFailedError,
    problem_answer,
)
from gateway.responses import JSONBytesResponse
from gateway.routes import model_predict_path, problem_responses, router
from gateway.service import Gateway
from gateway.settings import GatewaySettings
from schemas.features import load_feature_spec
from schemas.validation import Problem, problems_of

_REF_TEMPLATE = "#/components/schemas/{model}"
MODEL_PREDICT_TEMPLATE = "/models/{name}/predict"


class _GatewayApp(FastAPI):
    """FastAPI with ``GatewayMiddleware`` in front of Starlette's own middleware.

    ``add_middleware`` would put it inside Starlette's server-error middleware, whose wrapped
    ``send`` every /predict answer then crossed; in front, /predict skips it. A failure there
    is answered 500 by uvicorn instead (and still counted, and logged).
    """

    front: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        """Starlette's stack, behind ``front`` when one is set."""
        stack = super().build_middleware_stack()
        return stack if self.front is None else self.front(stack)


def create_app(
    settings: GatewaySettings | None = None,
    *,
    registry: ChampionSource | None = None,
    producer_factory: Callable[[], RecordProducer] | None = None,
) -> FastAPI:
    """The gateway app; its lifespan loads the model and connects Kafka.

    ``registry`` and ``producer_factory`` replace the MLflow registry and the Kafka producer
    (tests); by default they come from the settings.
    """
    settings = settings or load_settings(GatewaySettings)
    spec = load_feature_spec(settings.feature_spec)
    metrics = GatewayMetrics()
    service = Gateway(settings, spec, metrics, registry=registry, producer_factory=producer_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = _GatewayApp(
        title="driftloop gateway",
        summary=f"Predictions of every declared model; /predict serves {spec.name}: "
        f"{spec.description}",
        version="1",
        lifespan=lifespan,
        default_response_class=JSONBytesResponse,
    )
    app.state.gateway = service
    app.include_router(router)
    # Each model's predict path is served past the router (gateway.predict); a model the
    # gateway starts serving while it runs gets its path here, and the document is redone.
    direct: dict[tuple[str, str], tuple[str, ASGIApp]] = {
        ("POST", "/predict"): ("/predict", PredictEndpoint(service, service.default))
    }

    def model_added(model: ServedModel) -> None:
        endpoint = PredictEndpoint(service, model)
        direct[("POST", model_predict_path(model.name))] = (MODEL_PREDICT_TEMPLATE, endpoint)
        app.openapi_schema = None

    service.catalog.on_added.append(model_added)
    app.front = partial(
        GatewayMiddleware,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        direct=direct,
    )

    async def refused(request: Request, error: Exception) -> Response:
        status, body = problem_answer(error) or (500, b"")
        return Response(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE)

    for refusal in (RequestProblemError, NoModelError, BodyTooLargeError, ScoringFailedError):
        app.add_exception_handler(refusal, refused)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> Response:
        # FastAPI's own request validation (no route of this app declares a parameter it
        # validates today), worded like every other refusal.
        return await refused(request, RequestProblemError(422, problems_of(error.errors())))

    @app.exception_handler(HTTPException)
    async def http_problem(request: Request, error: HTTPException) -> Response:
        # Starlette's 404 and 405 (with its Allow header).
        problems = [Problem("request", str(error.detail))]
        response = await refused(request, RequestProblemError(error.status_code, problems))
        response.headers.update(error.headers or {})
        return response

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        components = document.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        for served in service.models.values():
            schemas.update(row_schemas(served.spec))
            schemas.update(feedback_schemas(served.spec))
        problem = ProblemDetails.model_json_schema(ref_template=_REF_TEMPLATE)
        schemas.update(problem.pop("$defs", {}))
        schemas["ProblemDetails"] = problem
        components["securitySchemes"] = SECURITY_SCHEMES
        paths = document["paths"]
        paths["/predict"]["post"]["requestBody"] = predict_request_body(spec, settings.max_rows)
        paths["/feedback"]["post"]["requestBody"] = feedback_request_body(spec, settings.max_rows)
        paths["/admin/reload"]["post"]["security"] = [{ADMIN_BEARER: []}]
        # The API key is asked for only when the gateway is configured with keys: the document
        # describes this gateway, and a client of a keyless one needs none.
        if service.requires_api_key:
            for path in ("/predict", "/feedback"):
                paths[path]["post"]["security"] = [{API_KEY: []}]
        # One documented path per served model, each with its own declaration's rows.
        # The per-model paths also answer 404 (a model this gateway does not serve).
        not_served = {str(status): body for status, body in problem_responses(404).items()}
        for name, served in sorted(service.models.items()):
            predict = copy.deepcopy(paths["/predict"]["post"])
            predict["summary"] = f"Score rows with the {name} model"
            predict["operationId"] = f"predict_{name}"
            predict["requestBody"] = predict_request_body(served.spec, settings.max_rows)
            predict["responses"].update(not_served)
            feedback = copy.deepcopy(paths["/feedback"]["post"])
            feedback["summary"] = f"Send the true values of earlier {name} predictions"
            feedback["operationId"] = f"feedback_{name}"
            feedback["requestBody"] = feedback_request_body(served.spec, settings.max_rows)
            feedback["responses"].update(not_served)
            paths[model_predict_path(name)] = {"post": predict}
            paths[f"/models/{name}/feedback"] = {"post": feedback}
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def __getattr__(name: str) -> FastAPI:
    # ``uvicorn gateway.app:app`` builds the app from the environment on first access, so
    # importing this module (tests, create_app) needs no configuration.
    if name == "app":
        return create_app()
    raise AttributeError(name)


__all__ = ["create_app"]
