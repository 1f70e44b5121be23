"""The alert receiver: Alertmanager's (and Grafana's) webhook notifications are validated,
stored durably before the answer, read back with filters and counted; bad input is refused
with 4xx, counted, and stores nothing."""

from __future__ import annotations

import copy
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from driftloop.alerting.notifications import AlertNotification, AlertStatus
from driftloop.alerting.receiver import create_app
from driftloop.alerting.settings import AlertReceiverSettings
from driftloop.alerting.store import AlertLog

pytestmark = pytest.mark.unit

# What Alertmanager 0.25 posts for the stack's ServiceDown rule (webhook_config, version 4).
FIRING: dict[str, Any] = {
    "receiver": "driftloop-oncall",
    "status": "firing",
    "alerts": [
        {
            "status": "firing",
            "labels": {
                "alertname": "ServiceDown",
                "instance": "localhost:9101",
                "job": "feature-logger",
                "severity": "critical",
            },
            "annotations": {
                "summary": "feature-logger is down",
                "description": "Prometheus has failed to scrape feature-logger.",
                "runbook_url": "docs/runbooks.md#servicedown",
            },
            "startsAt": "2026-12-06T02:40:15.123Z",
            "endsAt": "0001-01-01T00:00:00Z",
            "generatorURL": "http://127.0.0.1:9090/graph?g0.expr=up+%3D%3D+0",
            "fingerprint": "3f8a2c6b1d0e9f74",
        }
    ],
    "groupLabels": {"alertname": "ServiceDown", "job": "feature-logger"},
    "commonLabels": {"alertname": "ServiceDown", "job": "feature-logger"},
    "commonAnnotations": {"summary": "feature-logger is down"},
    "externalURL": "http://127.0.0.1:9095",
    "version": "4",
    "groupKey": '{}:{alertname="ServiceDown", job="feature-logger"}',
    "truncatedAlerts": 0,
}


def _resolved() -> dict[str, Any]:
    body = copy.deepcopy(FIRING)
    body["status"] = "resolved"
    body["alerts"][0]["status"] = "resolved"
    body["alerts"][0]["endsAt"] = "2026-12-06T02:42:00Z"
    return body


def _grafana() -> dict[str, Any]:
    """Grafana's webhook contact point: version 1, Alertmanager's fields and its own."""
    body = copy.deepcopy(FIRING)
    body.update(
        version="1",
        receiver="driftloop-oncall",
        orgId=1,
        state="alerting",
        title="[FIRING:1] ServiceDown",
        message="feature-logger is down",
    )
    body["alerts"][0].update(
        labels={**FIRING["alerts"][0]["labels"], "grafana_folder": "driftloop"},
        values={"query": 0},
        silenceURL="http://grafana:3000/alerting/silence/new",
    )
    return body


@pytest.fixture
def settings(tmp_path: Path) -> AlertReceiverSettings:
    return AlertReceiverSettings(
        store_path=tmp_path / "alerts" / "notifications.sqlite3", max_body_bytes=64 * 1024
    )


@pytest.fixture
def client(settings: AlertReceiverSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def _metric(client: TestClient, name: str, **labels: str) -> float:
    families = text_string_to_metric_families(client.get("/metrics").text)
    for family in families:
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def test_a_notification_is_stored_and_read_back(client: TestClient) -> None:
    response = client.post("/alerts", json=FIRING)
    assert response.status_code == 200, response.text
    assert response.json()["alerts"] == 1
    (alert,) = client.get("/alerts").json()
    assert alert["notification_id"] == response.json()["notification_id"]
    assert alert["status"] == "firing"
    assert alert["alertname"] == "ServiceDown"
    assert alert["severity"] == "critical"
    assert alert["labels"]["job"] == "feature-logger"
    assert alert["annotations"]["summary"] == "feature-logger is down"
    assert alert["receiver"] == "driftloop-oncall"
    assert alert["starts_at"].startswith("2026-12-06T02:40:15.123")
    # Alertmanager's year-1 end time means "still firing".
    assert alert["ends_at"] is None


def test_read_back_is_newest_first_and_filtered(client: TestClient) -> None:
    assert client.post("/alerts", json=FIRING).status_code == 200
    other = copy.deepcopy(FIRING)
    other["alerts"][0]["labels"] = {**other["alerts"][0]["labels"], "job": "gateway"}
    assert client.post("/alerts", json=other).status_code == 200
    assert client.post("/alerts", json=_resolved()).status_code == 200

    everything = client.get("/alerts").json()
    assert [(a["status"], a["labels"]["job"]) for a in everything] == [
        ("resolved", "feature-logger"),
        ("firing", "gateway"),
        ("firing", "feature-logger"),
    ]
    assert everything[0]["ends_at"].startswith("2026-12-06T02:42:00")
    logger = client.get("/alerts", params={"label": "job=feature-logger"}).json()
    assert [a["status"] for a in logger] == ["resolved", "firing"]
    firing = client.get(
        "/alerts", params={"status": "firing", "alertname": "ServiceDown", "limit": 1}
    ).json()
    assert [a["labels"]["job"] for a in firing] == ["gateway"]
    assert client.get("/alerts", params={"alertname": "ModelStale"}).json() == []
    future = client.get("/alerts", params={"since": "2100-01-01T00:00:00Z"}).json()
    assert future == []


def test_grafana_notifications_share_the_receiver(client: TestClient) -> None:
    response = client.post("/alerts", json=_grafana())
    assert response.status_code == 200, response.text
    (alert,) = client.get("/alerts", params={"label": "grafana_folder=driftloop"}).json()
    assert alert["alertname"] == "ServiceDown"


def test_notifications_are_counted(client: TestClient) -> None:
    client.post("/alerts", json=FIRING)
    client.post("/alerts", json=FIRING)
    client.post("/alerts", json=_resolved())
    assert (
        _metric(
            client,
            "driftloop_alert_notifications_received_total",
            receiver="driftloop-oncall",
            status="firing",
        )
        == 2
    )
    assert (
        _metric(
            client,
            "driftloop_alerts_received_total",
            alertname="ServiceDown",
            severity="critical",
            status="resolved",
        )
        == 1
    )


def _without(path: tuple[str | int, ...]) -> dict[str, Any]:
    body = copy.deepcopy(FIRING)
    target: Any = body
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return body


def _with(path: tuple[str | int, ...], value: object) -> dict[str, Any]:
    body = copy.deepcopy(FIRING)
    target: Any = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_without(("alerts",)), "alerts"),
        (_with(("alerts",), []), "alerts"),
        (_with(("status",), "burning"), "status"),
        (_without(("receiver",)), "receiver"),
        (_without(("groupKey",)), "groupKey"),
        (_without(("version",)), "version"),
        (_with(("alerts", 0, "labels"), {"job": "gateway"}), "labels"),
        (_with(("alerts", 0, "labels", "severity"), 2), "severity"),
        (_with(("alerts", 0, "startsAt"), "yesterday"), "startsAt"),
        # A time without its zone is ambiguous.
        (_with(("alerts", 0, "startsAt"), "2026-12-06T02:40:15"), "startsAt"),
        (_with(("alerts", 0, "status"), "pending"), "status"),
    ],
)
def test_a_body_that_is_not_a_notification_is_refused_and_not_stored(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    response = client.post("/alerts", json=body)
    assert response.status_code == 422
    assert any(field in error["loc"] for error in response.json()["detail"]), response.text
    assert client.get("/alerts").json() == []
    assert _metric(client, "driftloop_alert_notifications_rejected_total", reason="invalid") == 1


@pytest.mark.parametrize("raw", [b"", b"not json", b"[]", b'{"alerts": '])
def test_bytes_that_are_not_json_objects_are_refused(client: TestClient, raw: bytes) -> None:
    response = client.post("/alerts", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert client.get("/alerts").json() == []


def test_a_body_over_the_limit_is_refused(
    client: TestClient, settings: AlertReceiverSettings
) -> None:
    body = copy.deepcopy(FIRING)
    body["commonAnnotations"]["description"] = "x" * settings.max_body_bytes
    response = client.post("/alerts", json=body)
    assert response.status_code == 413
    assert client.get("/alerts").json() == []
    assert _metric(client, "driftloop_alert_notifications_rejected_total", reason="too_large") == 1


@pytest.mark.parametrize("label", ["job", "=feature-logger", ""])
def test_a_malformed_label_filter_is_refused(client: TestClient, label: str) -> None:
    assert client.get("/alerts", params={"label": label}).status_code == 422


def test_what_was_acknowledged_survives_a_restart(settings: AlertReceiverSettings) -> None:
    with TestClient(create_app(settings)) as first:
        assert first.post("/alerts", json=FIRING).status_code == 200
        assert first.post("/alerts", json=_resolved()).status_code == 200
    with TestClient(create_app(settings)) as second:
        stored = second.get("/alerts").json()
    assert [alert["status"] for alert in stored] == ["resolved", "firing"]


def test_the_log_keeps_the_body_as_received(settings: AlertReceiverSettings) -> None:
    raw = orjson.dumps(_grafana())
    log = AlertLog(settings.store_path)
    try:
        notification_id = log.record(
            AlertNotification.model_validate_json(raw),
            raw,
            received_at=datetime.now(UTC),
        )
        (stored,) = log.alerts(status=AlertStatus.FIRING)
    finally:
        log.close()
    assert stored.notification_id == notification_id
    # Grafana's own fields are not in the model but are kept in the stored body.
    with sqlite3.connect(settings.store_path) as db:
        (body,) = db.execute("SELECT body FROM notification").fetchone()
    assert orjson.loads(body)["title"] == "[FIRING:1] ServiceDown"
