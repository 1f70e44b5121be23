"""An alert reaches someone on the native stack: the feature-logger is stopped through
supervisorctl, Prometheus' ServiceDown rule fires, Alertmanager notifies the alert receiver,
and the notification is read back (GET /alerts and `driftloop alerts list`); the logger is
started again and the resolved notification arrives the same way.

Nothing here is mocked: the stack's own Prometheus, Alertmanager and receiver. How long each
step takes follows the stack's settings (the rule's ``for:``, STACK_ALERT_FOR_OVERRIDES,
STACK_ALERTMANAGER_GROUP_WAIT / GROUP_INTERVAL): the deadlines are derived from them with a
wide margin, and nothing is asserted about how long it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from driftloop.alerting.notifications import AlertStatus, StoredAlert
from driftloop_tools.cli.app import app
from driftloop_tools.stack import readiness
from driftloop_tools.stack.prometheus_config import RULES_DIR, SCRAPE_INTERVAL
from driftloop_tools.stack.settings import StackSettings
from tests.integration.consumer_support import metric, supervisorctl

pytestmark = pytest.mark.integration

ALERT = "ServiceDown"
PROGRAM = "feature-logger"
# Prometheus' scrape and evaluation rounds, Alertmanager's dispatch, a loaded 2-core machine.
MARGIN_SECONDS = 120.0
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def seconds(duration: str) -> float:
    """A Prometheus duration (``1m30s``) in seconds."""
    parts = re.findall(r"([0-9]+)(ms|s|m|h|d|w|y)", duration)
    assert parts, duration
    return sum(int(amount) * UNITS[unit] for amount, unit in parts)


def rule_for(stack: StackSettings, alert: str) -> str:
    """The ``for:`` the stack's Prometheus evaluates ``alert`` with."""
    if alert in stack.alert_for_overrides:
        return stack.alert_for_overrides[alert]
    for path in sorted(RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(Path(path).read_text(encoding="utf-8"))["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == alert:
                    return str(rule.get("for", "0s"))
    raise AssertionError(f"no rule defines {alert}")


async def received(stack: StackSettings, status: AlertStatus, since: datetime) -> list[StoredAlert]:
    """The receiver's notifications of the feature-logger's ServiceDown since ``since``."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{stack.alert_receiver_port}", timeout=10
    ) as client:
        response = await client.get(
            "/alerts",
            params={
                "alertname": ALERT,
                "status": status.value,
                "label": f"job={PROGRAM}",
                "since": since.isoformat(),
            },
        )
    response.raise_for_status()
    return [StoredAlert.model_validate(item) for item in response.json()]


async def poll(
    check: Callable[[], Awaitable[list[StoredAlert]]], *, within: float, what: str
) -> list[StoredAlert]:
    deadline = time.monotonic() + within
    while not (found := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {within:.0f}s")
        await asyncio.sleep(1)
    return found


async def alerts_counted(stack: StackSettings, status: AlertStatus) -> float:
    value = await metric(
        stack.alert_receiver_port,
        "driftloop_alerts_received_total",
        alertname=ALERT,
        severity="critical",
        status=status.value,
    )
    return value or 0.0


async def test_a_stopped_feature_logger_reaches_the_receiver_and_so_does_its_recovery(
    stack_settings: StackSettings,
) -> None:
    stack = stack_settings
    scrape = seconds(SCRAPE_INTERVAL)
    # Down from the next scrape, firing after `for:` (checked once per evaluation), then
    # Alertmanager's group_wait, or its group_interval when the group was notified before.
    group_delay = max(
        seconds(stack.alertmanager_group_wait), seconds(stack.alertmanager_group_interval)
    )
    firing_within = seconds(rule_for(stack, ALERT)) + 3 * scrape + group_delay + MARGIN_SECONDS
    resolved_within = 3 * scrape + group_delay + MARGIN_SECONDS
    counted_before = await alerts_counted(stack, AlertStatus.FIRING)
    since = datetime.now(UTC)

    try:
        await asyncio.to_thread(supervisorctl, stack, "stop", PROGRAM)
        (firing, *_) = await poll(
            lambda: received(stack, AlertStatus.FIRING, since),
            within=firing_within,
            what=f"firing {ALERT} notification for {PROGRAM}",
        )
    finally:
        # "start" fails when the program runs already; the probe below is the check.
        with contextlib.suppress(subprocess.CalledProcessError):
            await asyncio.to_thread(supervisorctl, stack, "start", PROGRAM)
        await readiness.wait_ready(PROGRAM, stack, 120)

    assert firing.severity == "critical"
    assert firing.receiver == "driftloop-oncall"
    assert firing.labels["instance"] == f"localhost:{stack.feature_logger_metrics_port}"
    assert firing.annotations["summary"] == f"{PROGRAM} is down"
    assert firing.ends_at is None
    assert await alerts_counted(stack, AlertStatus.FIRING) > counted_before

    # The CLI reads the same notifications back.
    result = await asyncio.to_thread(
        CliRunner().invoke,
        app,
        ["alerts", "list", "--alertname", ALERT, "--label", f"job={PROGRAM}", "--limit", "5"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    assert ALERT in result.output
    assert f"{PROGRAM} is down" in result.output

    (resolved, *_) = await poll(
        lambda: received(stack, AlertStatus.RESOLVED, since),
        within=resolved_within,
        what=f"resolved {ALERT} notification for {PROGRAM}",
    )
    assert resolved.fingerprint == firing.fingerprint
    assert resolved.ends_at is not None
    assert resolved.ends_at >= resolved.starts_at
