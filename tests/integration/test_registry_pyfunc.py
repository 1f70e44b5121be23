"""Registry versions stand alone: ``mlflow models serve`` on ``models:/<name>@champion`` answers
the declared raw rows (categories as strings) with the gateway's prediction, to 1e-9.

Each test registers a model of its own name in the stack's MLflow (never the ``bikeshare``
champion): a breast-cancer classifier bootstrapped by the CLI (``driftloop model bootstrap
--declaration breast_cancer``), and a bikeshare regressor with string categories and nulls.
The gateway's prediction is the native path's: the version's artifacts downloaded and loaded
by ``driftloop.serving.champion``, rows encoded by the declaration.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from driftloop.events.kafka import create_topics
from driftloop.serving.champion import ModelRegistry, load_champion
from driftloop.settings import KafkaSettings, MlflowSettings
from driftloop.training import trainer
from schemas.features import FeatureSpec, load_feature_spec
from schemas.topics import Topic
from tests.integration.consumer_support import free_port

pytestmark = pytest.mark.integration

SERVE_READY_SECONDS = 180


@contextmanager
def mlflow_serving(model_uri: str, tracking_uri: str, log_path: Path) -> Iterator[str]:
    """``mlflow models serve`` in the local environment on a free port; yields its URL once it
    answers /ping, stops its process group afterwards."""
    port = free_port()
    environment = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    command = [
        *(str(Path(sys.executable).with_name("mlflow")), "models", "serve"),
        *("-m", model_uri, "-h", "127.0.0.1", "-p", str(port), "-w", "1"),
        *("--env-manager", "local"),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVE_READY_SECONDS
        while True:
            if process.poll() is not None:
                raise AssertionError(f"mlflow models serve exited: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"mlflow models serve not ready: {log_path.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def gateway_predictions(
    tracking_uri: str, name: str, spec: FeatureSpec, rows: list[dict[str, Any]]
) -> np.ndarray:
    """What the gateway's native path predicts for the rows, from the champion's artifacts."""
    registry = ModelRegistry(tracking_uri)
    ref = registry.resolve(name)
    with tempfile.TemporaryDirectory(prefix="driftloop-gateway-") as work:
        registry.download(ref, Path(work))
        champion = load_champion(Path(work), ref, expected_spec=spec)
    encoded = spec.encode_rows(rows)
    assert encoded.accepted == list(range(len(rows)))
    return champion.predict(encoded.matrix)


def served_predictions(url: str, rows: list[dict[str, Any]]) -> np.ndarray:
    response = httpx.post(f"{url}/invocations", json={"dataframe_records": rows}, timeout=30)
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["predictions"], dtype=np.float64)


def plain_rows(spec: FeatureSpec, frame: Any) -> list[dict[str, Any]]:
    records = frame[list(spec.feature_names)].to_dict(orient="records")
    return [
        {str(key): value.item() if hasattr(value, "item") else value for key, value in row.items()}
        for row in records
    ]


def test_a_bootstrapped_classifier_is_served_by_mlflow_as_by_the_gateway(
    mlflow_settings: MlflowSettings, kafka_settings: KafkaSettings, unique: str, tmp_path: Path
) -> None:
    uri = mlflow_settings.tracking_uri
    name = f"breast-cancer-{unique}"
    spec = load_feature_spec("breast_cancer")
    # Its ModelPromoted goes to a model.events of this test's own, not the stack's.
    prefix = f"{unique}."
    asyncio.run(
        create_topics(
            kafka_settings.model_copy(update={"topic_prefix": prefix}), [Topic.MODEL_EVENTS]
        )
    )
    environment = {**os.environ, "KAFKA_TOPIC_PREFIX": prefix}
    try:
        bootstrap = subprocess.run(
            [
                str(Path(sys.executable).with_name("driftloop")),
                *("model", "bootstrap", "--declaration", "breast_cancer"),
                *("--model-name", name),
            ],
            env=environment,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        output = " ".join(bootstrap.stdout.split())
        assert bootstrap.returncode == 0, bootstrap.stdout + bootstrap.stderr
        for metric in ("log_loss", "roc_auc", "brier"):
            assert metric in output
        assert "promotion metric log_loss" in output
        assert f"ModelPromoted published to {Topic.MODEL_EVENTS}" in output
        assert trainer.current_champion(uri, name) == 1

        frame = trainer.read_dataset(spec)
        rows = plain_rows(spec, frame.sample(50, random_state=5))
        expected = gateway_predictions(uri, name, spec, rows)
        with mlflow_serving(f"models:/{name}@champion", uri, tmp_path / "serve.log") as url:
            served = served_predictions(url, rows)
            refused = httpx.post(
                f"{url}/invocations",
                json={"dataframe_records": [{**rows[0], "mean_radius": "large"}]},
                timeout=30,
            )

        np.testing.assert_allclose(served, expected, rtol=0, atol=1e-9)
        assert ((served > 0) & (served < 1)).all()
        assert refused.status_code == 400
    finally:
        MlflowClient(tracking_uri=uri, registry_uri=uri).delete_registered_model(name)


def test_raw_rows_with_string_categories_and_nulls_are_served_as_by_the_gateway(
    mlflow_settings: MlflowSettings, unique: str, tmp_path: Path
) -> None:
    uri = mlflow_settings.tracking_uri
    name = f"bikeshare-pyfunc-{unique}"
    spec = load_feature_spec("bikeshare")
    frame = trainer.read_dataset(spec, since="2011-01-01", until="2011-04-01")
    booster = trainer.train_booster(spec, frame, num_boost_round=30)
    try:
        model = trainer.log_and_register(
            booster, spec, tracking_uri=uri, model_name=name, work_dir=tmp_path
        )
        trainer.set_champion(model, tracking_uri=uri)
        rows = plain_rows(spec, frame.sample(50, random_state=8))
        assert isinstance(rows[0]["mnth"], str)  # the raw row: "Jan", not a code
        rows[0]["weathersit"] = None
        rows[1]["temp"] = None
        expected = gateway_predictions(uri, name, spec, rows)
        with mlflow_serving(f"models:/{name}@champion", uri, tmp_path / "serve.log") as url:
            served = served_predictions(url, rows)
            unknown = httpx.post(
                f"{url}/invocations",
                json={"dataframe_records": [{**rows[2], "mnth": "Smarch"}]},
                timeout=30,
            )

        np.testing.assert_allclose(served, expected, rtol=0, atol=1e-9)
        assert unknown.status_code == 400
    finally:
        MlflowClient(tracking_uri=uri, registry_uri=uri).delete_registered_model(name)
