"""Every PromQL expression of the dashboards and the rules returns data from the real Prometheus.

Traffic goes through the stack's own services: the first champion when the stack has none,
rows of the reference months then summer rows (drift), bad requests (errors), their labels
(quality), scoring requests for the batch-scorer. Then the expressions are read from
grafana/dashboards/*.json and prometheus/rules/*.yml (no second list) and evaluated against
the stack's Prometheus until each returns at least one series, or the deadline passes.

Expressions that are conditions (alert rules, dashboard annotations) return nothing while
all is well, so they are checked on their operands: every comparison becomes a ``bool``
comparison and ``unless`` an ``and``; the result has data when every series the condition
reads exists, with matching labels.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from consumers.drift_monitor import DriftMonitorSettings
from driftloop.events.producer import EventProducer, event_record
from driftloop.settings import KafkaSettings, MlflowSettings, load_settings
from driftloop_tools.demo.replay import ReplayHour, load_replay_hours, wait_for_champion
from driftloop_tools.stack.prometheus_config import scrape_ports
from driftloop_tools.stack.settings import StackSettings
from gateway.settings import GatewaySettings
from schemas.events import ScoringRequest
from schemas.features import FeatureSpec, load_feature_spec
from schemas.topics import Topic
from tests.integration.consumer_support import ensure_champion

ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))

# Grafana's interval variables, as Grafana resolves them with a 15 s scrape interval.
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
VARIABLE = re.compile(r"\$\{?(\w+)\}?")
# What a condition is split into: label matchers and strings (kept), the rest (rewritten).
MATCHERS_AND_STRINGS = re.compile(r'(\{[^{}]*\}|"(?:[^"\\]|\\.)*")')
COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)")

# One week of hours per drift-monitor window (sent a window apart): one window of the
# reference months, then three of July, so drift holds in consecutive windows.
WINDOW_ROWS = 168
NORMAL_DAYS = (60, 90)  # March 2011: inside the bootstrap champion's training months
DRIFTED_DAYS = (182, 212)  # July 2011: temp 0.76 against 0.20 in January
SCORING_REQUESTS = 40
# On a fresh stack the slowest series are the retrain's: drift held in two windows, then one
# retrain DAG run to its end (1-2 minutes here) and the retrain-trigger's next status refresh.
DEADLINE_SECONDS = 180.0
POLL_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL expression of a file, ready to evaluate."""

    source: str
    expr: str


def as_operands(expression: str) -> str:
    """A condition rewritten to return its operands: comparisons as ``bool``, ``unless`` as
    ``and``. Label matchers and strings are left alone."""
    parts = MATCHERS_AND_STRINGS.split(expression)
    for index in range(0, len(parts), 2):
        rewritten = COMPARISON.sub(r"\1 bool", parts[index])
        parts[index] = re.sub(r"\bunless\b", "and", rewritten)
    return "".join(parts)


def substituted(expression: str, model: str) -> str:
    values = {**GRAFANA_VARIABLES, "model": model}
    return VARIABLE.sub(lambda match: values[match.group(1)], expression)


def rule_queries() -> Iterator[Query]:
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    yield Query(f"{path.name} record {rule['record']}", rule["expr"].strip())
                else:
                    yield Query(f"{path.name} alert {rule['alert']}", as_operands(rule["expr"]))


def dashboard_queries(model: str) -> Iterator[Query]:
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        panels = [
            inner for panel in dashboard["panels"] for inner in (panel, *panel.get("panels", []))
        ]
        for panel in panels:
            for target in panel.get("targets", []):
                yield Query(
                    f"{path.name} panel {panel['title']!r} {target['refId']}",
                    substituted(target["expr"], model),
                )
        for annotation in dashboard["annotations"]["list"]:
            if annotation["datasource"]["type"] == "prometheus":
                yield Query(
                    f"{path.name} annotation {annotation['name']!r}",
                    as_operands(substituted(annotation["expr"], model)),
                )


def test_conditions_are_rewritten_to_their_operands() -> None:
    assert (
        as_operands('(sum(rate(x{a!="b", c=~"d|e"}[5m])) > 0) unless on () (y == 1)')
        == '(sum(rate(x{a!="b", c=~"d|e"}[5m])) > bool 0) and on () (y == bool 1)'
    )
    assert as_operands("a > bool 1 and b <= on () group_left () c") == (
        "a > bool 1 and b <= bool on () group_left () c"
    )
    assert substituted('rate(x{m="$model"}[$__rate_interval])', "bikeshare") == (
        'rate(x{m="bikeshare"}[1m])'
    )


@dataclass(frozen=True, slots=True)
class Stack:
    settings: StackSettings
    gateway: GatewaySettings
    model: str

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.prometheus_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.gateway_port}"


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_feature_spec("bikeshare")


@pytest.fixture(scope="module")
def stack(stack_settings: StackSettings, spec: FeatureSpec) -> Stack:
    gateway = load_settings(GatewaySettings)
    return Stack(stack_settings, gateway, gateway.model_name or spec.registered_model_name)


@pytest.fixture
async def gateway_client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    headers = {}
    if stack.gateway.api_keys:
        headers["X-API-Key"] = stack.gateway.api_keys[0].get_secret_value()
    async with httpx.AsyncClient(base_url=stack.gateway_url, headers=headers, timeout=30) as client:
        yield client


async def predict_with_labels(client: httpx.AsyncClient, hours: list[ReplayHour], run: str) -> None:
    """The hours through /predict in requests of a day, then their true values to /feedback."""
    for start in range(0, len(hours), 24):
        day = hours[start : start + 24]
        response = await client.post(
            "/predict",
            json=[hour.row for hour in day],
            headers={"X-Request-ID": f"{run}-{start}"},
        )
        assert response.status_code == httpx.codes.OK, response.text
        answers = response.json()["predictions"]
        labels = [
            {"request_id": answer["request_id"], "label": hour.label}
            for answer, hour in zip(answers, day, strict=True)
        ]
        feedback = await client.post("/feedback", json=labels)
        assert feedback.status_code == httpx.codes.ACCEPTED, feedback.text


async def send_bad_requests(client: httpx.AsyncClient, row: dict[str, Any]) -> None:
    """Client errors the errors panels count: an invalid row, an unknown route."""
    invalid = await client.post("/predict", json={**row, "temp": "hot"})
    assert invalid.status_code == httpx.codes.UNPROCESSABLE_ENTITY, invalid.text
    unknown = await client.get(f"/no-such-route-{uuid.uuid4().hex[:6]}")
    assert unknown.status_code == httpx.codes.NOT_FOUND


async def send_scoring_requests(settings: KafkaSettings, hours: list[ReplayHour], run: str) -> None:
    producer = EventProducer(settings, "observability-test")
    await producer.start(give_up_after_seconds=30)
    try:
        await producer.send(
            event_record(
                settings.topic(Topic.SCORING_REQUESTS),
                ScoringRequest(request_id=f"{run}-batch-{index}", features=hour.row, batch_id=run),
            )
            for index, hour in enumerate(hours)
        )
    finally:
        await producer.close()


async def series(client: httpx.AsyncClient, expression: str) -> list[dict[str, Any]]:
    response = await client.get("/api/v1/query", params={"query": expression})
    body = response.json()
    assert response.status_code == httpx.codes.OK, f"{expression}: {body.get('error')}"
    assert body["status"] == "success", f"{expression}: {body.get('error')}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def without_data(client: httpx.AsyncClient, queries: list[Query]) -> list[Query]:
    empty = []
    for query in queries:
        if not await series(client, query.expr):
            empty.append(query)
    return empty


async def test_prometheus_serves_the_repository_rules_and_scrapes_every_service(
    stack: Stack,
) -> None:
    async with httpx.AsyncClient(base_url=stack.prometheus_url, timeout=30) as client:
        response = await client.get("/api/v1/rules")
        loaded = {
            rule["name"] for group in response.json()["data"]["groups"] for rule in group["rules"]
        }
        expected = {
            rule.get("alert") or rule["record"]
            for path in RULE_FILES
            for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
            for rule in group["rules"]
        }
        assert expected <= loaded, (
            "Prometheus has not loaded these rules of prometheus/rules (run `driftloop stack "
            f"up`, which renders its configuration and reloads it): {sorted(expected - loaded)}"
        )
        # Every job of the rendered configuration is scraped at the stack's ports: a service
        # that is down is an `up` series at 0, not a missing one.
        targets = (await client.get("/api/v1/targets")).json()["data"]["activeTargets"]
        scraped: dict[str, set[str]] = {}
        for target in targets:
            scraped.setdefault(target["labels"]["job"], set()).add(target["scrapeUrl"])
        for job, ports in scrape_ports(stack.settings).items():
            assert job in scraped, f"Prometheus does not scrape {job}"
            # Every replica of a service is a target of its own.
            expected_urls = {f"http://localhost:{port}/metrics" for port in ports}
            assert scraped[job] == expected_urls, f"{job} scraped at {scraped[job]}"


async def test_every_panel_and_rule_expression_returns_data_after_traffic(
    stack: Stack,
    spec: FeatureSpec,
    gateway_client: httpx.AsyncClient,
    mlflow_settings: MlflowSettings,
    kafka_settings: KafkaSettings,
) -> None:
    run = f"observability-{uuid.uuid4().hex[:8]}"
    await ensure_champion(spec, stack.model, mlflow_settings, kafka_settings)
    await wait_for_champion(gateway_client, timeout_seconds=120)

    normal = load_replay_hours(spec, first_day=NORMAL_DAYS[0], last_day=NORMAL_DAYS[1])
    drifted = load_replay_hours(spec, first_day=DRIFTED_DAYS[0], last_day=DRIFTED_DAYS[1])
    # Windows are spans of prediction time (DRIFT_MONITOR_WINDOW_SECONDS on this stack): sent
    # at once, every row would land in one window and drift could not hold in two. Each week
    # goes in a window of its own.
    window_seconds = load_settings(DriftMonitorSettings).window_seconds
    assert window_seconds is not None, (
        "the stack's drift-monitor needs DRIFT_MONITOR_WINDOW_SECONDS"
    )
    await predict_with_labels(gateway_client, normal[:WINDOW_ROWS], f"{run}-normal")
    for week in range(3):
        await asyncio.sleep(window_seconds)
        rows = drifted[week * WINDOW_ROWS : (week + 1) * WINDOW_ROWS]
        await predict_with_labels(gateway_client, rows, f"{run}-drifted-{week}")
    await send_bad_requests(gateway_client, normal[0].row)
    await send_scoring_requests(kafka_settings, normal[:SCORING_REQUESTS], run)

    queries = [*dashboard_queries(stack.model), *rule_queries()]
    assert len(queries) > 50, "expressions were not found in the files"
    async with httpx.AsyncClient(base_url=stack.prometheus_url, timeout=30) as client:
        deadline = time.monotonic() + DEADLINE_SECONDS
        empty = await without_data(client, queries)
        while empty and time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
            empty = await without_data(client, empty)
        variable = await client.get(
            "/api/v1/label/model_name/values", params={"match[]": "gateway_model_info"}
        )
    report = "\n".join(f"  {query.source}: {query.expr}" for query in empty)
    assert not empty, f"{len(empty)} of {len(queries)} expressions returned no data:\n{report}"
    # The dashboards' model variable (label_values(gateway_model_info, model_name)).
    assert stack.model in variable.json()["data"]
