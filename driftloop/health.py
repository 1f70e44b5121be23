"""Health checks that platform jobs (Airflow tasks, the CLI) run against their dependencies."""

from __future__ import annotations

import platform as python_platform

import httpx

from driftloop.settings import MlflowSettings


def check_mlflow(settings: MlflowSettings | None = None) -> dict[str, str]:
    """Ask the MLflow server for its health and version; raises when it does not answer."""
    settings = settings or MlflowSettings()
    base = settings.tracking_uri.rstrip("/")
    with httpx.Client(timeout=10) as client:
        client.get(f"{base}/health").raise_for_status()
        version = client.get(f"{base}/version")
        version.raise_for_status()
    return {
        "mlflow_server": version.text.strip(),
        "python": python_platform.python_version(),
        "tracking_uri": base,
    }
