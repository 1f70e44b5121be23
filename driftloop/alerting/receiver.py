"""The webhook receiver: ``POST /alerts`` takes a notification, ``GET /alerts`` reads them back.

Alertmanager (and Grafana's webhook contact point under compose) POST a JSON notification; it
is validated, written durably to the ``AlertLog`` and only then answered 200, so a
notification that was acknowledged is never lost and one that was not is retried by its
sender. A body that is not a notification is answered 4xx (senders do not retry those) and
counted. Everything else is the log's: this module only translates HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated

from fastapi import FastAPI, HTTPException, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import AwareDatetime, BaseModel, ValidationError

from driftloop.alerting.notifications import AlertNotification, AlertStatus, StoredAlert
from driftloop.alerting.settings import AlertReceiverSettings
from driftloop.alerting.store import AlertLog


class ReceiverMetrics:
    """What the receiver counts, on a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.notifications = Counter(
            "driftloop_alert_notifications_received",
            "Notifications stored, by the sender's receiver name and the group's status.",
            ("receiver", "status"),
            registry=self.registry,
        )
        self.alerts = Counter(
            "driftloop_alerts_received",
            "Alerts in the stored notifications, by alert name, severity and status.",
            ("alertname", "severity", "status"),
            registry=self.registry,
        )
        self.rejected = Counter(
            "driftloop_alert_notifications_rejected",
            "Requests refused with 4xx, by reason (invalid, too_large).",
            ("reason",),
            registry=self.registry,
        )
        for reason in ("invalid", "too_large"):
            self.rejected.labels(reason)


class Accepted(BaseModel):
    """What a stored notification is answered with."""

    notification_id: int
    alerts: int


def _label_filters(values: list[str]) -> dict[str, str]:
    filters: dict[str, str] = {}
    for value in values:
        key, separator, wanted = value.partition("=")
        if not separator or not key:
            raise HTTPException(422, f"label filter {value!r} is not name=value")
        filters[key] = wanted
    return filters


def create_app(settings: AlertReceiverSettings) -> FastAPI:
    """The receiver's ASGI app; the log opens and closes with its lifespan."""
    metrics = ReceiverMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.alert_log = AlertLog(settings.store_path)
        try:
            yield
        finally:
            app.state.alert_log.close()

    def alert_log(request: Request) -> AlertLog:
        log: AlertLog = request.app.state.alert_log
        return log

    app = FastAPI(
        title="driftloop alert receiver",
        summary="Stores the alert notifications Alertmanager and Grafana send.",
        lifespan=lifespan,
    )

    @app.post("/alerts", response_model=Accepted)
    async def receive(request: Request) -> Accepted:
        """Store one Alertmanager (or Grafana) webhook notification."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > settings.max_body_bytes:
            metrics.rejected.labels("too_large").inc()
            raise HTTPException(413, f"notification over {settings.max_body_bytes} bytes")
        body = await request.body()
        if len(body) > settings.max_body_bytes:
            metrics.rejected.labels("too_large").inc()
            raise HTTPException(413, f"notification over {settings.max_body_bytes} bytes")
        try:
            notification = AlertNotification.model_validate_json(body)
        except ValidationError as error:
            metrics.rejected.labels("invalid").inc()
            raise HTTPException(
                422, error.errors(include_url=False, include_context=False, include_input=False)
            ) from None
        # The write fsyncs: off the event loop. A failure here is a 500, which the sender retries.
        notification_id = await asyncio.to_thread(
            alert_log(request).record, notification, body, datetime.now(UTC)
        )
        metrics.notifications.labels(notification.receiver, notification.status.value).inc()
        for alert in notification.alerts:
            metrics.alerts.labels(alert.name, alert.severity, alert.status.value).inc()
        return Accepted(notification_id=notification_id, alerts=len(notification.alerts))

    @app.get("/alerts", response_model=list[StoredAlert])
    async def read_back(
        request: Request,
        alertname: str | None = None,
        status: AlertStatus | None = None,
        label: Annotated[list[str], Query(description="name=value, repeatable")] = [],  # noqa: B006 - FastAPI copies defaults
        since: AwareDatetime | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> list[StoredAlert]:
        """Received alerts, newest first."""
        filters = _label_filters(label)
        return await asyncio.to_thread(
            alert_log(request).alerts,
            alertname=alertname,
            status=status,
            labels=filters,
            since=since,
            limit=limit,
        )

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the process answers; its log was opened at start."""
        return {"status": "ok", "store": str(settings.store_path)}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
