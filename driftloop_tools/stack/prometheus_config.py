"""Prometheus of the native stack: its configuration rendered from ``StackSettings``.

The scrape targets follow the ports the stack gives its services (``STACK_*``), so a stack
moved to other ports is still scraped; alerts go to the stack's Alertmanager. The rules are
the repository's own files (``prometheus/rules/*.yml``), the same ones docker-compose mounts
beside ``prometheus/prometheus.compose.yml``; when ``STACK_ALERT_FOR_OVERRIDES`` shortens
some alerts' ``for:`` (a test stack), copies with those durations replaced are rendered into
the run folder and loaded instead. ``driftloop stack up`` writes the files into the stack's
run folder before Prometheus starts and asks a running Prometheus to reload them when they
changed.
"""

from __future__ import annotations

import logging
import os
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


def scrape_ports(settings: StackSettings) -> dict[str, list[int]]:
    """Job name -> the localhost ports Prometheus scrapes for it, one per replica.

    The gateway's are its replicas' own ports, not nginx's: through nginx each scrape would
    reach whichever replica is next, and the job's counters would jump between processes.
    """
    return {
        "prometheus": [settings.prometheus_port],
        "gateway": settings.gateway_replica_ports,
        "feature-logger": settings.feature_logger_metrics_ports,
        "batch-scorer": settings.batch_scorer_metrics_ports,
        "drift-monitor": [settings.drift_monitor_metrics_port],
        "retrain-trigger": [settings.retrain_trigger_metrics_port],
        "shadow-scorer": [settings.shadow_scorer_metrics_port],
        "alertmanager": [settings.alertmanager_port],
        "alert-receiver": [settings.alert_receiver_port],
    }


def rendered_rules(settings: StackSettings) -> dict[str, str]:
    """Rule file name -> its text with ``STACK_ALERT_FOR_OVERRIDES`` applied; empty without
    overrides (the repository's files are loaded as they are)."""
    overrides = settings.alert_for_overrides
    if not overrides:
        return {}
    unknown = set(overrides)
    files: dict[str, str] = {}
    for path in sorted(RULES_DIR.glob("*.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for group in document["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") in overrides:
                    rule["for"] = overrides[rule["alert"]]
                    unknown.discard(rule["alert"])
        files[path.name] = (
            f"# {path.relative_to(REPO_ROOT)} with STACK_ALERT_FOR_OVERRIDES applied; "
            "written by `driftloop stack up`.\n" + yaml.safe_dump(document, sort_keys=False)
        )
    if unknown:
        raise ValueError(
            "STACK_ALERT_FOR_OVERRIDES names alerts no file of prometheus/rules defines: "
            + ", ".join(sorted(unknown))
        )
    return files


def rules_dir(settings: StackSettings) -> Path:
    """Where the rendered rule files go (used only with overrides)."""
    return settings.run / "rules"


def render_prometheus_config(settings: StackSettings) -> str:
    """prometheus.yml for the native stack: every job on localhost, the repository's rules."""
    document: dict[str, Any] = {
        "global": {
            "scrape_interval": SCRAPE_INTERVAL,
            "scrape_timeout": "10s",
            "evaluation_interval": SCRAPE_INTERVAL,
        },
        "rule_files": [
            str((rules_dir(settings) if settings.alert_for_overrides else RULES_DIR) / "*.yml")
        ],
        "alerting": {
            "alertmanagers": [
                {"static_configs": [{"targets": [f"localhost:{settings.alertmanager_port}"]}]}
            ]
        },
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [{"targets": [f"localhost:{port}" for port in ports]}],
            }
            for job, ports in scrape_ports(settings).items()
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


def write_if_changed(path: Path, text: str, *, mode: int = 0o644) -> bool:
    """Write ``text`` to ``path`` unless it holds it already; whether it changed."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.unlink(missing_ok=True)
    # Created with its final mode, so a file holding secrets is never readable by others.
    with os.fdopen(os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w") as file:
        file.write(text)
    # A rename is atomic: a server reloading meanwhile reads the old file or the new one.
    staging.replace(path)
    return True


def write_prometheus_config(settings: StackSettings) -> bool:
    """Write the rendered configuration (and rule files); whether any content changed."""
    rules = rendered_rules(settings)
    changed = False
    folder = rules_dir(settings)
    for name, text in rules.items():
        changed |= write_if_changed(folder / name, text)
    if folder.exists():
        for stale in folder.glob("*.yml"):
            if stale.name not in rules:
                stale.unlink()
                changed = True
    config = render_prometheus_config(settings)
    changed |= write_if_changed(prometheus_config_path(settings), config)
    return changed


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
