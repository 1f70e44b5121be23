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
from schemas.events import GroundTruth, PredictionEvent
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


def _published(producer: FakeRecordProducer, count: int) -> list[bytes]:
    """The values of the first ``count`` records, once the publisher has sent them."""
    deadline = time.monotonic() + 5
    while len(producer.sent) < count:
        assert time.monotonic() < deadline, "events not published in time"
        time.sleep(0.01)
    return [value for _, _, value in producer.sent[:count]]


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
    events = [PredictionEvent.from_bytes(value) for value in _published(producer, 4)]
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


# The churn declaration with its target declared by class name, as a user would write it.
CHURN_BY_CLASS_YAML = CHURN_YAML.replace(
    "target:\n  name: churned\n",
    "target:\n  name: churned\n  type: categorical\n"
    '  positive: "yes"\n  categories: ["yes", "no"]\n',
)


def test_a_classifiers_labels_are_taken_by_class_name_and_coded(
    client: TestClient, declarations: Path, producer: FakeRecordProducer
) -> None:
    assert CHURN_BY_CLASS_YAML != CHURN_YAML
    (declarations / "churn.yaml").write_text(CHURN_BY_CLASS_YAML, encoding="utf-8")
    reload = client.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
    assert reload.status_code == 200, reload.text
    labels = [
        {"request_id": "a", "label": "yes"},
        {"request_id": "b", "label": "no"},
        {"request_id": "c", "label": 1},
        {"request_id": "d", "label": 0.0},
    ]

    accepted = client.post(f"/models/{CHURN}/feedback", json=labels)

    assert accepted.status_code == 202, accepted.text
    coded = [GroundTruth.from_bytes(value) for value in _published(producer, 4)]
    assert [(label.request_id, label.label) for label in coded] == [
        ("a", 1.0),
        ("b", 0.0),
        ("c", 1.0),
        ("d", 0.0),
    ]


@pytest.mark.parametrize(
    ("path", "label", "reason"),
    [
        (f"/models/{CHURN}/feedback", "maybe", "is not one of its classes"),
        (f"/models/{CHURN}/feedback", 0.5, "is not one of its classes or 0/1"),
        ("/feedback", "yes", "is not a number"),
    ],
)
def test_a_label_the_models_target_does_not_take_is_refused_naming_it(
    client: TestClient, declarations: Path, path: str, label: object, reason: str
) -> None:
    (declarations / "churn.yaml").write_text(CHURN_BY_CLASS_YAML, encoding="utf-8")
    client.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})

    refused = client.post(
        path, json=[{"request_id": "a", "label": 1}, {"request_id": "b", "label": label}]
    )

    assert refused.status_code == 422, refused.text
    problem = ProblemDetails.model_validate(refused.json())
    assert [(error.field, reason in error.reason) for error in problem.errors] == [
        ("[1].label", True)
    ]


def test_the_document_types_each_models_labels_by_its_target(
    client: TestClient, declarations: Path
) -> None:
    (declarations / "churn.yaml").write_text(CHURN_BY_CLASS_YAML, encoding="utf-8")
    client.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"})
    document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]

    def label_of(path: str) -> dict[str, Any]:
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        reference = body["schema"]["oneOf"][0]["$ref"].rsplit("/", 1)[-1]
        label: dict[str, Any] = schemas[reference]["properties"]["label"]
        return label

    assert label_of("/feedback")["type"] == "number"
    assert label_of(f"/models/{CHURN}/feedback")["anyOf"] == [
        {"type": "string", "enum": ["yes", "no"]},
        {"type": "number", "enum": [0, 1]},
    ]


def test_each_models_predictions_have_the_buckets_of_its_task_or_declaration(
    client: TestClient, declarations: Path
) -> None:
    _add_churn(declarations, client)
    client.post("/predict", json=example_row(load_feature_spec("bikeshare")))
    client.post(f"/models/{CHURN}/predict", json=CHURN_ROW)

    text = client.get("/metrics").text
    bounds = {
        model: [
            line.split('le="')[1].split('"')[0]
            for line in text.splitlines()
            if line.startswith("gateway_prediction_value_bucket") and f'"{model}"' in line
        ]
        for model in ("bikeshare", CHURN)
    }

    # bikeshare declares bikes per hour; the churn declaration names none: probabilities.
    assert bounds["bikeshare"][:3] == ["0.0", "10.0", "25.0"]
    assert bounds[CHURN] == [str(round(0.05 * step, 2)) for step in range(1, 21)] + ["+Inf"]
    assert f'gateway_prediction_value_count{{model_name="{CHURN}"}} 1.0' in text
