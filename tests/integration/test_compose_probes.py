"""docker-compose.yml's healthchecks of the platform's services, run verbatim against the native
stack's running services (same ports): each passes against a service that is ready."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from driftloop_tools.stack.settings import StackSettings
from tests.integration.consumer_support import eventually

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
async def test_compose_healthcheck_passes_against_the_ready_service(
    stack_settings: StackSettings, service: str, served_champion: str
) -> None:
    # A gateway is ready only with a model to serve: the fixture makes sure the stack has one.
    services: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    kind, python, flag, code = services[service]["healthcheck"]["test"]
    assert (kind, python, flag) == ("CMD", "python", "-c")
    # Compose and the native stack use the same ports by default; follow the stack's settings.
    code = re.sub(r"127\.0\.0\.1:\d+/", f"127.0.0.1:{_port(stack_settings, service)}/", code)

    async def healthy() -> bool:
        probe = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, stderr=asyncio.subprocess.DEVNULL
        )
        return await asyncio.wait_for(probe.wait(), timeout=30) == 0

    # Polled: an earlier test may have stopped the broker, and a consumer is not ready again
    # until it has rejoined its group.
    await eventually(healthy, within=120, what=f"{service}'s compose healthcheck to pass")
