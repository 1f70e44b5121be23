"""The gateway app end to end in-process: real lifespan, real model, Kafka replaced by a double."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from driftloop.serving.champion import ChampionLoadError, ChampionRef, model_files
from driftloop.settings import KafkaSettings, MlflowSettings
from driftloop.training import trainer
from gateway.app import create_app
from gateway.contract import ProblemDetails, example_row
from gateway.settings import GatewaySettings
from schemas.events import GroundTruth, PredictionEvent
from schemas.features import FeatureSpec, load_feature_spec
from tests.unit.fake_kafka import FakeRecordProducer

RUNS = {1: "1" * 32, 2: "2" * 32}
ADMIN = "admin-token-for-tests"
ROW: dict[str, Any] = example_row(load_feature_spec("bikeshare"))
# The temperature as it appears in ROW's JSON body, where the bad-body cases rewrite it.
TEMP = orjson.dumps({"temp": ROW["temp"]})[1:-1]


class FolderRegistry:
    """A registry double: versions are local folders, the alias a settable attribute."""

    def __init__(self, versions: dict[int, Path]) -> None:
        self.versions = versions
        self.champion: int | None = 1

    def resolve(self, name: str, alias: str = "champion") -> ChampionRef:
        if self.champion is None:
            raise ChampionLoadError(f"no {name}@{alias}")
        return ChampionRef(name, self.champion, RUNS[self.champion])

    def download(self, ref: ChampionRef, destination: Path) -> None:
        shutil.copytree(self.versions[ref.version], destination, dirs_exist_ok=True)


def assert_sent_in_order(producer: FakeRecordProducer, ids: list[str]) -> None:
    """Every id sent once, in the order given (the spool replays in arrival order)."""
    assert [key for _, key, _ in producer.sent] == [rid.encode() for rid in ids]


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_feature_spec("bikeshare")


@pytest.fixture(scope="module")
def model_dirs(spec: FeatureSpec, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    frame = trainer.read_dataset(spec, since="2011-01-01", until="2011-03-01")
    root = tmp_path_factory.mktemp("models")
    return {
        version: trainer.save_model(
            trainer.train_booster(spec, frame, num_boost_round=rounds), spec, root / str(version)
        )
        for version, rounds in ((1, 5), (2, 30))
    }


def gateway_settings(tmp_path: Path, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "admin_token": SecretStr(ADMIN),
        "model_cache_dir": tmp_path / "models",
        "spool_path": tmp_path / "spool.sqlite3",
        "publisher_process": False,
        "model_events": False,
        "model_poll_seconds": 3600,
        "kafka_timeout_seconds": 0.5,
        "kafka": KafkaSettings(bootstrap_servers="127.0.0.1:9", topic_prefix="unit."),
        "mlflow": MlflowSettings(tracking_uri="http://127.0.0.1:9"),
        **overrides,
    }
    return GatewaySettings(**values)


@pytest.fixture
def registry(model_dirs: dict[int, Path]) -> FolderRegistry:
    return FolderRegistry(model_dirs)


@pytest.fixture
def producer() -> FakeRecordProducer:
    return FakeRecordProducer()


@pytest.fixture
def make_client(
    tmp_path: Path, registry: FolderRegistry, producer: FakeRecordProducer
) -> Iterator[Callable[..., TestClient]]:
    clients: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        app = create_app(
            gateway_settings(tmp_path, **overrides),
            registry=registry,
            producer_factory=lambda: producer,
        )
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_predicts_one_row_and_publishes_its_event(
    client: TestClient, producer: FakeRecordProducer, model_dirs: dict[int, Path], spec: FeatureSpec
) -> None:
    response = client.post("/predict", json=ROW, headers={"X-Request-ID": "req-1"})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == "req-1"
    assert response.headers["x-request-id"] == "req-1"
    assert (body["model_name"], body["model_version"]) == ("bikeshare", 1)
    booster = lgb.Booster(model_file=str(model_files(model_dirs[1])[0]))
    expected = booster.predict(np.array([spec.encode_row(spec.validate_row(ROW))]))[0]
    assert body["prediction"] == pytest.approx(expected)
    wait_for(lambda: len(producer.sent) == 1)
    topic, key, value = producer.sent[0]
    event = PredictionEvent.from_bytes(value)
    assert (topic, key) == ("unit.predictions", b"req-1")
    assert event.request_id == "req-1"
    assert (event.model_version, event.run_id, event.source) == (1, RUNS[1], "http")
    assert event.prediction == pytest.approx(body["prediction"])
    assert event.features == ROW
    assert event.latency_ms >= 0


def test_list_of_rows_gets_one_id_and_one_event_per_row(
    client: TestClient, producer: FakeRecordProducer
) -> None:
    rows = [ROW, {**ROW, "hr": 17}, {"season": 3, "mnth": "July", "hr": 3, "holiday": 0,
                                     "weekday": 6, "workingday": 0}]  # fmt: skip

    response = client.post("/predict", json=rows, headers={"X-Request-ID": "batch-7"})

    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [item["request_id"] for item in predictions] == ["batch-7:0", "batch-7:1", "batch-7:2"]
    wait_for(lambda: len(producer.sent) == 3)
    events = {
        event.request_id: event
        for event in (PredictionEvent.from_bytes(value) for _, _, value in producer.sent)
    }
    assert sorted(events) == ["batch-7:0", "batch-7:1", "batch-7:2"]
    assert events["batch-7:2"].features["temp"] is None
    assert [events[item["request_id"]].prediction for item in predictions] == pytest.approx(
        [item["prediction"] for item in predictions]
    )


def test_generates_a_request_id_when_none_is_given(client: TestClient) -> None:
    response = client.post("/predict", json=ROW)

    assert response.status_code == 200
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert len(response.headers["x-request-id"]) == 32


def test_missing_nullable_features_are_scored_as_missing(
    client: TestClient, model_dirs: dict[int, Path], spec: FeatureSpec
) -> None:
    row = {name: ROW[name] for name in ("season", "mnth", "hr", "holiday", "weekday")}
    row["workingday"] = 1

    response = client.post("/predict", json=row)

    assert response.status_code == 200, response.text
    booster = lgb.Booster(model_file=str(model_files(model_dirs[1])[0]))
    matrix = np.array([spec.encode_row(spec.validate_row(row))])
    assert np.isnan(matrix[0, spec.feature_names.index("temp")])
    assert response.json()["prediction"] == pytest.approx(booster.predict(matrix)[0])


BAD_BODIES: list[tuple[str, bytes, int, str]] = [
    ("wrong type", orjson.dumps({**ROW, "hr": "eight"}), 422, "hr"),
    ("bool for an int", orjson.dumps({**ROW, "holiday": True}), 422, "holiday"),
    ("unknown category", orjson.dumps({**ROW, "mnth": "Smarch"}), 422, "mnth"),
    ("out of range", orjson.dumps({**ROW, "hr": 24}), 422, "hr"),
    ("missing required", orjson.dumps({k: v for k, v in ROW.items() if k != "season"}), 422,
     "season"),
    ("unknown feature", orjson.dumps({**ROW, "colour": "red"}), 422, "colour"),
    ("infinite", orjson.dumps(ROW).replace(TEMP, b'"temp":1e999'), 400, "body"),
    ("NaN literal", orjson.dumps(ROW).replace(TEMP, b'"temp":NaN'), 400, "body"),
    ("not JSON", b"season=1", 400, "body"),
    ("empty body", b"", 400, "body"),
    ("a number", b"42", 422, "body"),
    ("empty list", b"[]", 422, "body"),
    ("list of non-objects", b"[1, 2]", 422, "[0]"),
    ("bad row in a list", orjson.dumps([ROW, {**ROW, "temp": "warm"}]), 422, "[1].temp"),
    ("too many rows", orjson.dumps([ROW] * 6), 422, "body"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [case[1:] for case in BAD_BODIES],
    ids=[case[0] for case in BAD_BODIES],
)
def test_bad_input_gets_a_4xx_naming_the_field(
    make_client: Callable[..., TestClient], body: bytes, status: int, field: str
) -> None:
    client = make_client(max_rows=5)

    response = client.post("/predict", content=body, headers={"content-type": "application/json"})

    assert response.status_code == status, response.text
    problems = response.json()["errors"]
    assert field in [problem["field"] for problem in problems]
    assert all(problem["reason"] for problem in problems)


def test_oversized_body_is_refused_before_it_is_read(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_body_bytes=2048)

    response = client.post("/predict", content=b"[" + b" " * 4096 + b"]")

    assert response.status_code == 413
    assert response.json()["errors"][0]["field"] == "body"


def test_oversized_streamed_body_is_refused(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=2048)

    def chunks() -> Iterator[bytes]:
        for _ in range(8):
            yield b" " * 1024

    response = client.post("/predict", content=chunks())

    assert response.status_code == 413


def test_invalid_request_id_header_is_refused(client: TestClient) -> None:
    response = client.post("/predict", json=ROW, headers={"X-Request-ID": "no spaces/please"})

    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "X-Request-ID"


def test_without_a_model_predict_answers_503_with_the_reason(
    make_client: Callable[..., TestClient], registry: FolderRegistry
) -> None:
    registry.champion = None
    client = make_client()

    response = client.post("/predict", json=ROW)
    ready = client.get("/health/ready")

    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert "no model loaded" in response.json()["errors"][0]["reason"]
    assert ready.status_code == 503
    assert ready.json()["ready"] is False
    assert client.get("/health/live").status_code == 200
    assert client.get("/models/current").status_code == 503


def test_current_model_and_readiness(client: TestClient) -> None:
    current = client.get("/models/current").json()
    ready = client.get("/health/ready")

    assert (current["name"], current["version"], current["run_id"]) == ("bikeshare", 1, RUNS[1])
    assert current["alias"] == "champion"
    assert current["loaded_at"]
    assert ready.status_code == 200
    assert ready.json()["kafka"] == "direct"
    assert ready.json()["model"]["version"] == 1


def test_admin_reload_needs_the_token_and_swaps_the_model(
    client: TestClient, registry: FolderRegistry
) -> None:
    registry.champion = 2

    assert client.post("/admin/reload").status_code == 401
    assert client.post("/admin/reload", headers={"Authorization": "Bearer nope"}).status_code == 403
    reloaded = client.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})

    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["version"] == 2
    assert client.post("/predict", json=ROW).json()["model_version"] == 2


def test_api_keys_protect_predict_when_configured(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_keys="first-key,second-key")

    missing = client.post("/predict", json=ROW)
    wrong = client.post("/predict", json=ROW, headers={"X-API-Key": "guess"})
    right = client.post("/predict", json=ROW, headers={"X-API-Key": "second-key"})

    assert (missing.status_code, wrong.status_code, right.status_code) == (401, 401, 200)
    assert missing.json()["errors"][0]["field"] == "X-API-Key"


def test_feedback_publishes_ground_truth(client: TestClient, producer: FakeRecordProducer) -> None:
    response = client.post(
        "/feedback",
        json=[
            {"request_id": "req-1", "label": 40},
            {"request_id": "req-2", "label": 7.5, "observed_at": "2026-01-02T03:00:00+01:00"},
        ],
    )

    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 2}
    wait_for(lambda: len(producer.sent) == 2)
    labels = [GroundTruth.from_bytes(value) for _, _, value in producer.sent]
    assert {topic for topic, _, _ in producer.sent} == {"unit.labels"}
    assert [(label.request_id, label.label) for label in labels] == [
        ("req-1", 40.0),
        ("req-2", 7.5),
    ]
    assert labels[1].observed_at.isoformat() == "2026-01-02T02:00:00+00:00"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"request_id": "req 1", "label": 1.0}, "request_id"),
        ({"request_id": "req-1"}, "label"),
        ({"request_id": "req-1", "label": "many"}, "label"),
        (
            {"request_id": "req-1", "label": 1.0, "observed_at": "2026-01-02T03:00:00"},
            "observed_at",
        ),
        ({"request_id": "req-1", "label": 1.0, "extra": 1}, "extra"),
        # A date-time is a string (the schema's format): not Unix time, as a number or text.
        ({"request_id": "req-1", "label": 1.0, "observed_at": "1767322800"}, "observed_at"),
        (
            [
                {"request_id": "req-1", "label": 1.0},
                {"request_id": "req-2", "label": 1.0, "observed_at": 1767322800},
            ],
            "[1].observed_at",
        ),
    ],
)
def test_bad_feedback_is_refused_with_the_field(client: TestClient, body: Any, field: str) -> None:
    response = client.post("/feedback", json=body)

    assert response.status_code == 422, response.text
    assert field in [problem["field"] for problem in response.json()["errors"]]


def test_kafka_outage_spools_and_replays_in_order(
    make_client: Callable[..., TestClient], producer: FakeRecordProducer
) -> None:
    producer.broker_down = True
    client = make_client()
    ids = [f"r{i}" for i in range(20)]

    statuses = [
        client.post("/predict", json=ROW, headers={"X-Request-ID": rid}).status_code for rid in ids
    ]
    wait_for(lambda: client.get("/health/ready").json()["spool_depth"] == len(ids))
    assert client.get("/health/ready").json()["kafka"] == "spooling"
    producer.broker_down = False

    assert statuses == [200] * len(ids)
    wait_for(lambda: client.get("/health/ready").json()["spool_depth"] == 0, timeout=15)
    assert_sent_in_order(producer, ids)
    assert client.get("/health/ready").json()["kafka"] == "direct"
    assert client.post("/predict", json=ROW, headers={"X-Request-ID": "back"}).status_code == 200
    wait_for(lambda: len(producer.sent) == len(ids) + 1)


def test_spool_survives_a_restart(
    make_client: Callable[..., TestClient], producer: FakeRecordProducer
) -> None:
    producer.broker_down = True
    first = make_client()
    for rid in ("a1", "a2", "a3"):
        assert first.post("/predict", json=ROW, headers={"X-Request-ID": rid}).status_code == 200
    wait_for(lambda: first.get("/health/ready").json()["spool_depth"] == 3)
    first.__exit__(None, None, None)
    producer.broker_down = False

    second = make_client()

    wait_for(lambda: second.get("/health/ready").json()["spool_depth"] == 0, timeout=15)
    assert_sent_in_order(producer, ["a1", "a2", "a3"])


def test_full_spool_counts_dropped_events(
    make_client: Callable[..., TestClient], producer: FakeRecordProducer
) -> None:
    producer.broker_down = True
    client = make_client(spool_max_records=2)

    for _ in range(4):
        assert client.post("/predict", json=ROW).status_code == 200

    wait_for(lambda: "gateway_spool_dropped_events_total 2.0" in client.get("/metrics").text)
    assert client.get("/health/ready").json()["spool_full"] is True


def test_many_rows_get_one_event_each_keyed_by_row(
    client: TestClient, producer: FakeRecordProducer
) -> None:
    response = client.post("/predict", json=[ROW] * 5, headers={"X-Request-ID": "many"})

    assert response.status_code == 200
    wait_for(lambda: len(producer.sent) == 5)
    assert sorted(key or b"" for _, key, _ in producer.sent) == [
        f"many:{i}".encode() for i in range(5)
    ]


def test_publishing_off_still_serves(
    make_client: Callable[..., TestClient], producer: FakeRecordProducer
) -> None:
    client = make_client(publish=False)

    assert client.post("/predict", json=ROW).status_code == 200
    assert client.get("/health/ready").json()["kafka"] == "off"
    assert client.post("/feedback", json={"request_id": "x", "label": 1}).status_code == 409
    assert producer.sent == []


def test_metrics_cover_requests_predictions_and_the_model(client: TestClient) -> None:
    client.post("/predict", json=[ROW, ROW])
    client.post("/predict", json={})

    text = client.get("/metrics").text

    assert 'gateway_requests_total{method="POST",route="/predict",status="200"} 1.0' in text
    assert 'gateway_requests_total{method="POST",route="/predict",status="422"} 1.0' in text
    assert "gateway_request_duration_seconds_bucket" in text
    assert 'gateway_predictions_total{model_name="bikeshare",model_version="1"} 2.0' in text
    # The declaration's buckets (bikes per hour), each row in one of them.
    assert 'gateway_prediction_value_bucket{le="1000.0",model_name="bikeshare"} 2.0' in text
    assert 'gateway_prediction_value_count{model_name="bikeshare"} 2.0' in text
    assert (
        f'gateway_model_info{{model_name="bikeshare",model_version="1",run_id="{RUNS[1]}"}}' in text
    )
    assert 'gateway_model_loads_total{outcome="loaded",reason="start",source="registry"}' in text
    assert "gateway_spool_depth 0.0" in text
    assert "gateway_kafka_publish_errors" in text


def test_unknown_paths_share_one_metrics_label(client: TestClient) -> None:
    assert client.get("/no/such/path").status_code == 404

    assert 'route="unmatched"' in client.get("/metrics").text


def test_openapi_documents_the_declared_rows_with_valid_examples(
    client: TestClient, spec: FeatureSpec
) -> None:
    document = client.get("/openapi.json").json()

    body = document["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert "BikeshareFeatureRow" in document["components"]["schemas"]
    row_schema = document["components"]["schemas"]["BikeshareFeatureRow"]
    assert set(row_schema["properties"]) == set(spec.feature_names)
    for example in body["examples"].values():
        response = client.post("/predict", json=example["value"])
        assert response.status_code == 200, (example, response.text)


@pytest.mark.parametrize("path", ["/predict", "/feedback"])
def test_a_body_that_is_not_json_gets_415_naming_its_content_type(
    client: TestClient, path: str
) -> None:
    form = client.post(path, data={"season": "1"})
    unsaid = client.post(path, content=orjson.dumps(ROW))

    assert form.status_code == 415, form.text
    assert form.headers["content-type"] == "application/problem+json"
    assert "application/x-www-form-urlencoded" in form.json()["detail"]
    assert [problem["field"] for problem in form.json()["errors"]] == ["Content-Type"]
    assert unsaid.status_code == 415, unsaid.text
    assert "no Content-Type" in unsaid.json()["detail"]
    with_charset = {"content-type": "application/json; charset=utf-8"}
    assert client.post("/predict", content=orjson.dumps(ROW), headers=with_charset).is_success


def test_whole_numbers_for_int_features_are_read_as_ints(
    client: TestClient, producer: FakeRecordProducer
) -> None:
    response = client.post("/predict", json={**ROW, "hr": 14.0}, headers={"X-Request-ID": "whole"})

    assert response.status_code == 200, response.text
    wait_for(lambda: len(producer.sent) == 1)
    event = PredictionEvent.from_bytes(producer.sent[0][2])
    assert event.features["hr"] == 14
    assert type(event.features["hr"]) is int
    assert client.post("/predict", json={**ROW, "hr": 14.5}).status_code == 422


def test_every_refusal_is_one_rfc9457_problem(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=2048)
    refusals = {
        "header (middleware)": client.post("/predict", json=ROW, headers={"X-Request-ID": "a b"}),
        "size (middleware)": client.post("/predict", content=b"[" + b" " * 4096 + b"]"),
        "rows (/predict)": client.post("/predict", json={**ROW, "hr": 99}),
        "labels (route)": client.post("/feedback", json={"request_id": "r"}),
        "admin (route)": client.post("/admin/reload"),
        "unknown path (router)": client.get("/nowhere"),
        "unknown method (router)": client.delete("/predict"),
    }
    for origin, response in refusals.items():
        assert response.headers["content-type"] == "application/problem+json", origin
        problem = ProblemDetails.model_validate(response.json())
        assert problem.status == response.status_code, origin
        assert problem.errors, origin
        assert problem.detail.startswith(problem.errors[0].field), origin
    assert refusals["unknown method (router)"].status_code == 405
    assert "POST" in refusals["unknown method (router)"].headers["allow"]


def test_openapi_document_describes_bodies_media_types_and_security(
    make_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    document = make_client(api_keys="k1").get("/openapi.json").json()
    paths = document["paths"]

    def ok_schema(path: str, method: str) -> dict[str, Any]:
        responses = paths[path][method]["responses"]
        success = next(status for status in responses if status.startswith("2"))
        return dict(responses[success]["content"]["application/json"]["schema"])

    assert ok_schema("/predict", "post") == {
        "anyOf": [
            {"$ref": "#/components/schemas/PredictionResponse"},
            {"$ref": "#/components/schemas/BatchPredictionResponse"},
        ],
        "title": "Response Predict Predict Post",
    }
    assert ok_schema("/feedback", "post") == {"$ref": "#/components/schemas/FeedbackAccepted"}
    assert ok_schema("/models/current", "get") == {"$ref": "#/components/schemas/CurrentModel"}
    assert ok_schema("/admin/reload", "post") == {"$ref": "#/components/schemas/CurrentModel"}
    assert ok_schema("/health/live", "get") == {"$ref": "#/components/schemas/Liveness"}
    assert ok_schema("/health/ready", "get") == {"$ref": "#/components/schemas/Readiness"}
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    refused = paths["/predict"]["post"]["responses"]["415"]["content"]
    assert refused == {
        "application/problem+json": {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}
    }
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "name": "X-API-Key"}
    assert schemes["AdminBearer"] == {**schemes["AdminBearer"], "type": "http", "scheme": "bearer"}
    assert paths["/predict"]["post"]["security"] == [{"ApiKey": []}]
    assert paths["/feedback"]["post"]["security"] == [{"ApiKey": []}]
    assert paths["/admin/reload"]["post"]["security"] == [{"AdminBearer": []}]
    # A second gateway beside the first needs a spool of its own (one writer per spool).
    keyless = make_client(spool_path=tmp_path / "keyless-spool.sqlite3")
    keyless_paths = keyless.get("/openapi.json").json()["paths"]
    assert "security" not in keyless_paths["/predict"]["post"]
