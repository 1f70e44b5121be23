"""Prometheus of the native stack: its configuration rendered from ``StackSettings``.

The scrape targets follow the ports the stack gives its services (``STACK_*``), so a stack
moved to other ports is still scraped; the rules are the repository's own files
(``prometheus/rules/*.yml``), the same ones docker-compose mounts beside
``prometheus/prometheus.compose.yml``. ``driftloop stack up`` writes the file into the stack's
run folder before Prometheus starts and asks a running Prometheus to reload it when it changed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final

import httpx
import yaml

from driftloop_tools.stack.settings import StackSettings

log = logging.getLogger(__name__)

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
RULES_DIR: Final = REPO_ROOT / "prometheus" / "rules"
CONFIG_FILE: Final = "prometheus.yml"
# Grafana's datasource declares the same interval (timeInterval), so $__rate_interval never
# spans less than four scrapes.
SCRAPE_INTERVAL: Final = "15s"


def scrape_ports(settings: StackSettings) -> dict[str, int]:
    """Job name -> the localhost port Prometheus scrapes for it."""
    return {
        "prometheus": settings.prometheus_port,
        "gateway": settings.gateway_port,
        "feature-logger": settings.feature_logger_metrics_port,
        "batch-scorer": settings.batch_scorer_metrics_port,
        "drift-monitor": settings.drift_monitor_metrics_port,
        "retrain-trigger": settings.retrain_trigger_metrics_port,
    }


def render_prometheus_config(settings: StackSettings) -> str:
    """prometheus.yml for the native stack: every job on localhost, the repository's rules."""
    document: dict[str, Any] = {
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": "10s",
            "evaluation_interval": SCRAPE_INTERVAL,
        },
        "rule_files": [str(RULES_DIR / "*.yml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [f"localhost:{port}"]}]}
            for job, port in scrape_ports(settings).items()
        ],
    }
    header = (
        "# Written by `driftloop stack up` from the stack's settings (STACK_*); edits are lost.\n"
        "# docker-compose uses prometheus/prometheus.compose.yml, with the same jobs and rules.\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False)


def prometheus_config_path(settings: StackSettings) -> Path:
    """Where the rendered configuration lives: the stack's run folder."""
    return settings.run / CONFIG_FILE


def write_prometheus_config(settings: StackSettings) -> bool:
    """Write the rendered configuration; whether its content changed."""
    path = prometheus_config_path(settings)
    text = render_prometheus_config(settings)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".tmp")
    staging.write_text(text, encoding="utf-8")
    # A rename is atomic: a Prometheus reloading meanwhile reads the old file or the new one.
    staging.replace(path)
    return True


def reload_prometheus(settings: StackSettings) -> bool:
    """Ask a running Prometheus to re-read its configuration; whether it accepted."""
    url = f"http://127.0.0.1:{settings.prometheus_port}/-/reload"
    try:
        response = httpx.post(url, timeout=10)
    except httpx.HTTPError as error:
        # Not running yet: it reads the new file when it starts.
        log.debug("Prometheus did not take the reload (%s)", error)
        return False
    return response.is_success
