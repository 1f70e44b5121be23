"""``driftloop models list`` lists every declaration, even with the registry and database away."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from driftloop_tools.cli.app import app
from schemas.features import declared_feature_specs, load_feature_spec


def test_every_declared_model_is_listed_and_what_is_away_is_said(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Nothing listens on port 9: both lookups fail fast and are reported under the table.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("POSTGRES_PORT", "9")
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    for name in declared_feature_specs():
        spec = load_feature_spec(name)
        assert spec.registered_model_name in result.output
        assert spec.promotion_metric.value in result.output
    assert "MLflow not reached" in result.output
    assert "Postgres not reached" in result.output
