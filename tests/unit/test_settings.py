"""Settings: prefixes, required secrets, placeholder refusal, and errors that name the variable."""

from __future__ import annotations

import os

import pytest

from driftloop.settings import (
    DEVELOPMENT_FERNET_KEY,
    Environment,
    KafkaSettings,
    ObjectStoreSettings,
    PostgresSettings,
    SettingsError,
    load_settings,
)
from driftloop_tools.stack.settings import StackSettings


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    """No developer .env and no inherited variables leak into these tests."""
    monkeypatch.chdir(str(tmp_path))
    prefixes = ("DRIFTLOOP_", "KAFKA_", "POSTGRES_", "S3_", "MLFLOW_", "AIRFLOW_", "STACK_")
    for name in list(os.environ):
        if name.startswith(prefixes):
            monkeypatch.delenv(name)


def test_missing_secret_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="POSTGRES_PASSWORD is required but not set"):
        load_settings(PostgresSettings)


def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", "s3cret-value")
    monkeypatch.setenv("POSTGRES_PORT", "not-a-port")
    with pytest.raises(SettingsError, match="POSTGRES_PORT"):
        load_settings(PostgresSettings)


def test_nested_settings_error_names_the_nested_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_JWT_SECRET", "jwt")
    monkeypatch.setenv("AIRFLOW_FERNET_KEY", DEVELOPMENT_FERNET_KEY)
    with pytest.raises(SettingsError, match="POSTGRES_PASSWORD is required"):
        load_settings(StackSettings)


def test_alias_names_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="AIRFLOW_JWT_SECRET is required"):
        load_settings(StackSettings)


def test_placeholder_secret_accepted_in_development(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", "changethis")
    settings = load_settings(PostgresSettings)
    assert settings.environment is Environment.DEVELOPMENT


@pytest.mark.parametrize("environment", ["staging", "production"])
def test_placeholder_secret_refused_outside_development(
    monkeypatch: pytest.MonkeyPatch, environment: str
) -> None:
    monkeypatch.setenv("DRIFTLOOP_ENVIRONMENT", environment)
    monkeypatch.setenv("S3_SECRET_ACCESS_KEY", "changethis")
    with pytest.raises(SettingsError, match="S3_SECRET_ACCESS_KEY is a placeholder secret"):
        load_settings(ObjectStoreSettings)


def test_example_fernet_key_refused_in_production(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DRIFTLOOP_ENVIRONMENT", "production")
    for name in ("POSTGRES_PASSWORD", "S3_SECRET_ACCESS_KEY", "AIRFLOW_API_PASSWORD"):
        monkeypatch.setenv(name, "a-real-secret")
    monkeypatch.setenv("AIRFLOW_JWT_SECRET", "a-real-jwt-secret")
    monkeypatch.setenv("AIRFLOW_FERNET_KEY", DEVELOPMENT_FERNET_KEY)
    with pytest.raises(SettingsError, match="AIRFLOW_FERNET_KEY is a placeholder"):
        load_settings(StackSettings)


def test_secrets_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_PASSWORD", "hunter2-long")
    settings = load_settings(PostgresSettings)
    assert "hunter2-long" not in repr(settings)
    assert settings.dsn("mlflow").endswith("@localhost:5432/mlflow")


def test_env_file_is_read(tmp_path: object) -> None:
    from pathlib import Path

    Path(".env").write_text("KAFKA_BOOTSTRAP_SERVERS=broker:19092\nKAFKA_TOPIC_PREFIX=t1.\n")
    settings = load_settings(KafkaSettings)
    assert settings.bootstrap_servers == "broker:19092"
    assert settings.topic("predictions") == "t1.predictions"
