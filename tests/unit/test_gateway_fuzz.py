"""Fuzzing the gateway's HTTP contract: whatever the body, the answer is never a 5xx.

A seeded mutation fuzzer built from the feature declaration, needing nothing beyond the
standard library; test_gateway_schemathesis.py adds schemathesis on the OpenAPI document.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr

from driftloop.serving.champion import ChampionRef
from driftloop.settings import KafkaSettings, MlflowSettings
from driftloop.training import trainer
from gateway.app import create_app
from gateway.contract import example_row
from gateway.settings import GatewaySettings
from schemas.features import FeatureSpec, load_feature_spec

RUN_ID = "a" * 32
ITERATIONS = 400
STRANGE_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**63, -(2**63), 2**64, 0.5, -0.0, 1e308, -1e308, 5e-324,
    "", "Jan", "clear", "0", "1e3", "NaN", "\u0000", "\ud7ff", "\ud800", "é" * 300,
    float("nan"), float("inf"), [], [1], {}, {"a": 1},
]  # fmt: skip


class LocalRegistry:
    """One model version from a local folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def resolve(self, name: str, alias: str = "champion") -> ChampionRef:
        return ChampionRef(name, 1, RUN_ID)

    def download(self, ref: ChampionRef, destination: Path) -> None:
        import shutil

        shutil.copytree(self.folder, destination, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def spec() -> FeatureSpec:
    return load_feature_spec("bikeshare")


@pytest.fixture(scope="module")
def app(spec: FeatureSpec, tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    root = tmp_path_factory.mktemp("fuzz")
    booster = trainer.train_booster(
        spec, trainer.read_dataset(spec, since="2011-01-01", until="2011-02-01"), num_boost_round=5
    )
    settings = GatewaySettings(
        admin_token=SecretStr("fuzz-admin-token"),
        model_cache_dir=root / "models",
        spool_path=root / "spool.sqlite3",
        model_events=False,
        publish=False,
        max_rows=20,
        max_body_bytes=64 * 1024,
        model_poll_seconds=3600,
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9"),
        mlflow=MlflowSettings(tracking_uri="http://127.0.0.1:9"),
    )
    return create_app(
        settings, registry=LocalRegistry(trainer.save_model(booster, spec, root / "model"))
    )


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def _dumps(value: Any) -> bytes:
    # The standard library writes what orjson refuses to: NaN, Infinity, integers past 64 bits.
    return json.dumps(value).encode()


def _mutated_row(spec: FeatureSpec, rng: random.Random) -> Any:
    row: dict[str, Any] = example_row(spec)
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(spec.feature_names)
        action = rng.random()
        if action < 0.5:
            row[name] = rng.choice(STRANGE_VALUES)
        elif action < 0.7:
            row.pop(name, None)
        elif action < 0.85:
            row[rng.choice(["extra", "Season", "", "a" * 500, "__class__"])] = 1
        else:
            row[name] = rng.uniform(-1e6, 1e6)
    return row


def _body(spec: FeatureSpec, rng: random.Random) -> bytes:
    shape = rng.random()
    if shape < 0.55:
        return _dumps(_mutated_row(spec, rng))
    if shape < 0.75:
        return _dumps([_mutated_row(spec, rng) for _ in range(rng.randint(0, 25))])
    if shape < 0.85:
        return _dumps(rng.choice(STRANGE_VALUES))
    if shape < 0.92:
        text = _dumps(_mutated_row(spec, rng))
        return text[: rng.randint(0, len(text))]
    if shape < 0.96:
        depth = rng.randint(100, 3000)
        return b"[" * depth + b"]" * depth
    return rng.randbytes(rng.randint(0, 200))


@pytest.mark.parametrize("path", ["/predict", "/feedback"])
def test_mutated_bodies_never_get_a_5xx(client: TestClient, spec: FeatureSpec, path: str) -> None:
    rng = random.Random(20260101)
    statuses: set[int] = set()

    for _ in range(ITERATIONS):
        body = _body(spec, rng)
        response = client.post(path, content=body, headers={"content-type": "application/json"})
        assert response.status_code < 500, (body[:300], response.text)
        statuses.add(response.status_code)

    assert statuses & {400, 422}


def test_mutated_headers_never_get_a_5xx(client: TestClient, spec: FeatureSpec) -> None:
    rng = random.Random(7)
    body = _dumps(example_row(spec))
    values = [b"", b" ", b"a" * 101, "é".encode(), b"../x", b"a:b", b"ok-id", b"\xff\xfe"]
    for value in values + [rng.randbytes(8) for _ in range(5)]:
        response = client.post("/predict", content=body, headers={"X-Request-ID": value})
        assert response.status_code < 500, (value, response.text)
