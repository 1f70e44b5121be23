"""Fixtures several unit test modules share: the bundled Bike Sharing data, split by season."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import numpy as np
import pandas as pd
import pytest

from driftloop.settings import DEVELOPMENT_FERNET_KEY
from schemas.features import FeatureSpec, load_feature_spec

REPOSITORY: Final = Path(__file__).resolve().parents[2]
WINTER: Final = ("Jan", "Feb", "March")
"""The months the demo's first champion is trained on: its reference."""


@pytest.fixture(scope="session")
def spec() -> FeatureSpec:
    return load_feature_spec("bikeshare")


@pytest.fixture(scope="session")
def seed() -> pd.DataFrame:
    """The bundled data with a noisy oracle's predictions, as logged windows would carry them."""
    frame = pd.read_csv(REPOSITORY / "data/bikeshare/Bikeshare.csv")
    noise = np.random.default_rng(7).normal(1.0, 0.1, len(frame))
    return frame.assign(prediction=frame["bikers"] * noise)


@pytest.fixture(scope="session")
def winter(seed: pd.DataFrame) -> pd.DataFrame:
    """January to March, in time order."""
    return seed[seed["mnth"].isin(WINTER)].reset_index(drop=True)


@pytest.fixture(scope="session")
def later(seed: pd.DataFrame) -> pd.DataFrame:
    """April to December, in time order."""
    return seed[~seed["mnth"].isin(WINTER)].reset_index(drop=True)


@pytest.fixture
def stack_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean environment for StackSettings: no .env, no inherited STACK_* variables."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("KAFKA_", "POSTGRES_", "S3_", "MLFLOW_", "AIRFLOW_", "STACK_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("POSTGRES_PASSWORD", "pg-secret")
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "s3-secret")
    monkeypatch.setenv("AIRFLOW_API_PASSWORD", "af-secret")
    monkeypatch.setenv("AIRFLOW_JWT_SECRET", "jwt-secret")
    monkeypatch.setenv("AIRFLOW_FERNET_KEY", DEVELOPMENT_FERNET_KEY)
    monkeypatch.setenv("STACK_HOME", str(tmp_path / "stack"))
    return tmp_path
