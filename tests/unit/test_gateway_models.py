"""One gateway, several models: each declared model is served at /models/{name}/predict with
its own champion, and a model declared while the gateway runs is served without a restart."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from driftloop.serving.champion import ChampionLoadError, ChampionRef
from driftloop.settings import KafkaSettings, MlflowSettings
from driftloop.training import trainer
from gateway.app import create_app
from gateway.contract import ProblemDetails, example_row
from gateway.settings import GatewaySettings
from schemas.events import PredictionEvent
from schemas.features import MODELS_DIRS_VARIABLE, FeatureSpec, load_feature_spec
from tests.unit.churn_declaration import CHURN_YAML
from tests.unit.fake_kafka import FakeRecordProducer

ADMIN = "admin-token-for-tests"
CHURN = "churn-classifier"
CHURN_ROW: dict[str, Any] = {"tenure_months": 3, "plan": "plus", "monthly_spend": 12.5}


class NamedRegistry:
    """A registry double: one local folder per registered model, each at version 1."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders

    def resolve(self, name: str, alias: str = "champion") -> ChampionRef:
        if name not in self.folders:
            raise ChampionLoadError(f"no {name}@{alias}")
        return ChampionRef(name, 1, "1" * 32)

    def download(self, ref: ChampionRef, destination: Path) -> None:
        shutil.copytree(self.folders[ref.name], destination, dirs_exist_ok=True)


@pytest.fixture(scope="module")
def churn_spec(tmp_path_factory: pytest.TempPathFactory) -> FeatureSpec:
    path = tmp_path_factory.mktemp("declaration") / "churn.yaml"
    path.write_text(CHURN_YAML, encoding="utf-8")
    return load_feature_spec(path)


@pytest.fixture(scope="module")
def churn_booster() -> list[lgb.Booster]:
    return []


@pytest.fixture(scope="module")
def folders(
    churn_spec: FeatureSpec,
    churn_booster: list[lgb.Booster],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    bikeshare = load_feature_spec("bikeshare")
    bikes = trainer.read_dataset(bikeshare, since="2011-01-01", until="2011-02-01")
    random = np.random.default_rng(7)
    churn = pd.DataFrame(
        {
            "tenure_months": random.integers(0, 60, 400),
            "plan": random.choice(["basic", "plus", "family"], 400),
            "monthly_spend": random.uniform(0, 50, 400),
        }
    )
    churn["churned"] = (churn["tenure_months"] < 12).astype(int)
    churn_booster.append(trainer.train_booster(churn_spec, churn, num_boost_round=10))
    return {
        "bikeshare": trainer.save_model(
            trainer.train_booster(bikeshare, bikes, num_boost_round=5), bikeshare, root / "bikes"
        ),
        CHURN: trainer.save_model(churn_booster[0], churn_spec, root / "churn"),
    }


@pytest.fixture
def declarations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "declarations"
    folder.mkdir()
    monkeypatch.setenv(MODELS_DIRS_VARIABLE, str(folder))
    return folder


@pytest.fixture
def producer() -> FakeRecordProducer:
    return FakeRecordProducer()


@pytest.fixture
def client(
    tmp_path: Path, folders: dict[str, Path], producer: FakeRecordProducer, declarations: Path
) -> Iterator[TestClient]:
    settings = GatewaySettings(
        admin_token=SecretStr(ADMIN),
        model_cache_dir=tmp_path / "cache",
        spool_path=tmp_path / "spool.sqlite3",
        model_events=False,
        model_poll_seconds=3600,
        kafka_timeout_seconds=0.5,
        publisher_process=False,  # the fake producer replaces the in-process publisher's
        kafka=KafkaSettings(bootstrap_servers="127.0.0.1:9", topic_prefix="unit."),
        mlflow=MlflowSettings(tracking_uri="http://127.0.0.1:9"),
        # GATEWAY_MODELS: the shipped breast-cancer declaration is left out.
        models=("bikeshare", CHURN),
    )
    app = create_app(settings, registry=NamedRegistry(folders), producer_factory=lambda: producer)
    with TestClient(app) as client:
        yield client


def _add_churn(declarations: Path, client: TestClient) -> None:
    (declarations / "churn.yaml").write_text(CHURN_YAML, encoding="utf-8")
    reload = client.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
    assert reload.status_code == 200, reload.text


def test_a_model_declared_while_running_is_served_after_a_reload(
    client: TestClient,
    declarations: Path,
    churn_spec: FeatureSpec,
    churn_booster: list[lgb.Booster],
) -> None:
    assert [model["name"] for model in client.get("/models").json()["models"]] == ["bikeshare"]
    assert client.post(f"/models/{CHURN}/predict", json=CHURN_ROW).status_code == 404

    _add_churn(declarations, client)

    listed = {model["name"]: model for model in client.get("/models").json()["models"]}
    assert set(listed) == {"bikeshare", CHURN}
    assert listed[CHURN]["task"] == "classification"
    assert listed[CHURN]["champion"]["version"] == 1
    answer = client.post(f"/models/{CHURN}/predict", json=CHURN_ROW)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_name"] == CHURN
    expected = churn_booster[0].predict(churn_spec.encode_rows([CHURN_ROW]).matrix)[0]
    assert body["prediction"] == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= body["prediction"] <= 1.0


def test_each_model_scores_and_publishes_under_its_own_name(
    client: TestClient, declarations: Path, producer: FakeRecordProducer
) -> None:
    _add_churn(declarations, client)
    bikes = client.post("/predict", json=example_row(load_feature_spec("bikeshare")))
    same = client.post(
        "/models/bikeshare/predict", json=example_row(load_feature_spec("bikeshare"))
    )
    churn = client.post(f"/models/{CHURN}/predict", json=[CHURN_ROW, CHURN_ROW])
    assert [bikes.status_code, same.status_code, churn.status_code] == [200, 200, 200]
    assert bikes.json()["prediction"] == same.json()["prediction"]
    deadline = time.monotonic() + 5
    while len(producer.sent) < 4:
        assert time.monotonic() < deadline, "events not published in time"
        time.sleep(0.01)
    events = [PredictionEvent.from_bytes(value) for _, _, value in producer.sent]
    assert [event.model_name for event in events] == ["bikeshare", "bikeshare", CHURN, CHURN]
    assert events[2].features == CHURN_ROW


def test_rows_are_checked_against_the_named_models_declaration(
    client: TestClient, declarations: Path
) -> None:
    _add_churn(declarations, client)
    refused = client.post(f"/models/{CHURN}/predict", json={**CHURN_ROW, "plan": "gold"})
    assert refused.status_code == 422
    problem = ProblemDetails.model_validate(refused.json())
    assert [error.field for error in problem.errors] == ["plan"]
    bikes_row = client.post(
        f"/models/{CHURN}/predict", json=example_row(load_feature_spec("bikeshare"))
    )
    assert bikes_row.status_code == 422


def test_an_unknown_model_gets_404_naming_the_served_ones(client: TestClient) -> None:
    for path in ("/models/nope/predict", "/models/nope/feedback"):
        answer = client.post(path, json=CHURN_ROW)
        assert answer.status_code == 404
        assert answer.headers["content-type"] == "application/problem+json"
        problem = ProblemDetails.model_validate(answer.json())
        assert problem.errors[0].field == "name"
        assert "'nope'" in problem.errors[0].reason
        assert "bikeshare" in problem.errors[0].reason


def test_the_document_has_each_models_own_paths_and_rows(
    client: TestClient, declarations: Path
) -> None:
    _add_churn(declarations, client)
    document = client.get("/openapi.json").json()
    paths = document["paths"]
    assert {
        f"/models/{CHURN}/predict",
        f"/models/{CHURN}/feedback",
        "/models/bikeshare/predict",
    } <= set(paths)
    body = paths[f"/models/{CHURN}/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["examples"]["one row"]["value"].keys() == CHURN_ROW.keys()
    assert "404" in paths[f"/models/{CHURN}/predict"]["post"]["responses"]
