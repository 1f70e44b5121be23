"""Alertmanager of the native stack: its configuration rendered from ``StackSettings``.

One route and one receiver, ``driftloop-oncall``: a webhook to the platform's alert receiver
(``python -m driftloop.alerting``), which stores every notification and lets them be read
back, plus Slack and PagerDuty when their settings are given. Grafana's contact point (under
compose) posts to the same receiver. Group timings come from the settings so a test stack can
use short ones; the defaults are Alertmanager's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import httpx
import yaml

from driftloop_tools.stack.prometheus_config import write_if_changed
from driftloop_tools.stack.settings import StackSettings

CONFIG_FILE: Final = "alertmanager.yml"
RECEIVER: Final = "driftloop-oncall"
# Every rule labels its alerts with the job it watches: one notification per alert and job,
# so a down feature-logger is not folded into a down gateway's message.
GROUP_BY: Final = ["alertname", "job"]


def webhook_url(settings: StackSettings) -> str:
    """The alert receiver's notification endpoint on this stack."""
    return f"http://127.0.0.1:{settings.alert_receiver_port}/alerts"


def render_alertmanager_config(settings: StackSettings) -> str:
    """alertmanager.yml for the native stack."""
    receiver: dict[str, Any] = {
        "name": RECEIVER,
        "webhook_configs": [{"url": webhook_url(settings), "send_resolved": True}],
    }
    if settings.alertmanager_slack_webhook_url is not None:
        receiver["slack_configs"] = [
            {
                "api_url": settings.alertmanager_slack_webhook_url.get_secret_value(),
                "send_resolved": True,
            }
        ]
    if settings.alertmanager_pagerduty_routing_key is not None:
        receiver["pagerduty_configs"] = [
            {
                "routing_key": settings.alertmanager_pagerduty_routing_key.get_secret_value(),
                "send_resolved": True,
            }
        ]
    document: dict[str, Any] = {
        "route": {
            "receiver": RECEIVER,
            "group_by": GROUP_BY,
            "group_wait": settings.alertmanager_group_wait,
            "group_interval": settings.alertmanager_group_interval,
            "repeat_interval": settings.alertmanager_repeat_interval,
        },
        "receivers": [receiver],
        # A critical alert silences the warnings of the same alert and job (GatewaySpoolFilling
        # is a warning, GatewaySpoolDroppingEvents the critical that follows it).
        "inhibit_rules": [
            {
                "source_matchers": ['severity="critical"'],
                "target_matchers": ['severity="warning"'],
                "equal": ["job", "instance"],
            }
        ],
    }
    header = (
        "# Written by `driftloop stack up` from the stack's settings (STACK_*); edits are lost.\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False)


def alertmanager_config_path(settings: StackSettings) -> Path:
    return settings.run / CONFIG_FILE


def write_alertmanager_config(settings: StackSettings) -> bool:
    """Write the rendered configuration (only its owner reads it: it may hold secrets);
    whether its content changed."""
    return write_if_changed(
        alertmanager_config_path(settings), render_alertmanager_config(settings), mode=0o600
    )


def reload_alertmanager(settings: StackSettings) -> bool:
    """Ask a running Alertmanager to re-read its configuration; whether it accepted."""
    try:
        response = httpx.post(f"http://127.0.0.1:{settings.alertmanager_port}/-/reload", timeout=10)
    except httpx.HTTPError:
        # Not running yet: it reads the new file when it starts.
        return False
    return response.is_success
