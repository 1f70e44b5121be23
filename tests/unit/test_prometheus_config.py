"""prometheus/: both configs and the rules pass promtool, and both scrape the same jobs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "prometheus"
NATIVE_CONFIG = PROMETHEUS / "prometheus.yml"
COMPOSE_CONFIG = PROMETHEUS / "prometheus.compose.yml"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks.md"

# job -> port: the platform's processes and Prometheus itself.
SCRAPE_PORTS = {
    "prometheus": 9090,
    "gateway": 8000,
    "feature-logger": 9101,
    "batch-scorer": 9102,
    "drift-monitor": 9103,
    "retrain-trigger": 9104,
}


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus); CI installs it")
    return promtool


def _run_promtool(*arguments: str) -> None:
    result = subprocess.run(
        [_promtool(), *arguments], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def _targets(config: Path) -> dict[str, list[str]]:
    return {
        job["job_name"]: [
            target for static in job["static_configs"] for target in static["targets"]
        ]
        for job in _load(config)["scrape_configs"]
    }


@pytest.mark.parametrize("config", [NATIVE_CONFIG, COMPOSE_CONFIG], ids=lambda path: path.name)
def test_promtool_accepts_config(config: Path) -> None:
    _run_promtool("check", "config", str(config.relative_to(ROOT)))


def test_promtool_accepts_rules() -> None:
    assert RULE_FILES
    _run_promtool("check", "rules", *(str(path.relative_to(ROOT)) for path in RULE_FILES))


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS
    _run_promtool("test", "rules", *(str(path.relative_to(ROOT)) for path in RULE_TESTS))


def test_native_and_compose_scrape_the_same_jobs() -> None:
    native = _targets(NATIVE_CONFIG)
    compose = _targets(COMPOSE_CONFIG)
    assert set(native) == set(compose) == set(SCRAPE_PORTS)


@pytest.mark.parametrize("job", sorted(SCRAPE_PORTS))
def test_job_targets_its_port(job: str) -> None:
    port = SCRAPE_PORTS[job]
    assert _targets(NATIVE_CONFIG)[job] == [f"localhost:{port}"]
    # In compose each service is reached by its name; Prometheus scrapes itself locally.
    host = "localhost" if job == "prometheus" else job
    assert _targets(COMPOSE_CONFIG)[job] == [f"{host}:{port}"]


@pytest.mark.parametrize("config", [NATIVE_CONFIG, COMPOSE_CONFIG], ids=lambda path: path.name)
def test_config_loads_every_rule_file(config: Path) -> None:
    assert _load(config)["rule_files"] == ["rules/*.yml"]


def test_every_alert_has_severity_and_a_runbook() -> None:
    runbooks = RUNBOOKS.read_text(encoding="utf-8")
    anchors = {
        re.sub(r"[^a-z0-9-]", "", title.strip().lower().replace(" ", "-"))
        for title in re.findall(r"^#+ (.+)$", runbooks, re.MULTILINE)
    }
    alerts = [
        rule
        for path in RULE_FILES
        for group in _load(path)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    assert alerts
    for rule in alerts:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = rule["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        assert annotations["runbook_url"] == f"docs/runbooks.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/runbooks.md has no section for {name}"
