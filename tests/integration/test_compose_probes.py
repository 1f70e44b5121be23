"""docker-compose.yml's healthchecks of the platform's services, run verbatim against the native
stack's running services (same ports): each passes against a service that is ready."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from driftloop.stack.settings import StackSettings

pytestmark = pytest.mark.integration

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def _port(settings: StackSettings, service: str) -> int:
    ports = {
        "gateway": settings.gateway_port,
        "feature-logger": settings.feature_logger_metrics_port,
        "batch-scorer": settings.batch_scorer_metrics_port,
        "drift-monitor": settings.drift_monitor_metrics_port,
        "retrain-trigger": settings.retrain_trigger_metrics_port,
    }
    return ports[service]


@pytest.mark.parametrize(
    "service", ["gateway", "feature-logger", "batch-scorer", "drift-monitor", "retrain-trigger"]
)
def test_compose_healthcheck_passes_against_the_ready_service(
    stack_settings: StackSettings, service: str
) -> None:
    services: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    kind, python, flag, code = services[service]["healthcheck"]["test"]
    assert (kind, python, flag) == ("CMD", "python", "-c")
    # Compose and the native stack use the same ports by default; follow the stack's settings.
    code = re.sub(r"127\.0\.0\.1:\d+/", f"127.0.0.1:{_port(stack_settings, service)}/", code)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
