"""prometheus/: the native config rendered from the stack's settings and the compose config pass
promtool, scrape the same jobs and load the same rules; the rules pass promtool and their unit
tests cover every alert, firing and quiet."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from driftloop_tools.stack.programs import prometheus_program
from driftloop_tools.stack.prometheus_config import (
    prometheus_config_path,
    render_prometheus_config,
    write_prometheus_config,
)
from driftloop_tools.stack.settings import StackSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "prometheus"
COMPOSE_CONFIG = PROMETHEUS / "prometheus.compose.yml"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks.md"

# job -> default port: the platform's processes and Prometheus itself.
SCRAPE_PORTS = {
    "prometheus": 9090,
    # The gateway replicas' own ports; nginx listens on 8000 in front of them.
    "gateway": 8001,
    "feature-logger": 9101,
    "batch-scorer": 9102,
    "drift-monitor": 9103,
    "retrain-trigger": 9104,
    "shadow-scorer": 9105,
    "alertmanager": 9095,
    "alert-receiver": 9099,
}
# In compose the gateway container itself answers on 8000 (the Service does the spreading).
COMPOSE_PORTS = {**SCRAPE_PORTS, "gateway": 8000}
SHIFTED_PORTS = {
    "STACK_PROMETHEUS_PORT": ("prometheus", 19090),
    "STACK_GATEWAY_REPLICA_PORT": ("gateway", 18001),
    "STACK_FEATURE_LOGGER_METRICS_PORT": ("feature-logger", 19101),
    "STACK_BATCH_SCORER_METRICS_PORT": ("batch-scorer", 19102),
    "STACK_DRIFT_MONITOR_METRICS_PORT": ("drift-monitor", 19103),
    "STACK_RETRAIN_TRIGGER_METRICS_PORT": ("retrain-trigger", 19104),
    "STACK_SHADOW_SCORER_METRICS_PORT": ("shadow-scorer", 19105),
    "STACK_ALERTMANAGER_PORT": ("alertmanager", 19095),
    "STACK_ALERT_RECEIVER_PORT": ("alert-receiver", 19099),
}


def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus); CI installs it")
    return promtool


def _run_promtool(*arguments: str) -> str:
    result = subprocess.run(
        [_promtool(), *arguments], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def _load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def _targets(document: dict[str, Any]) -> dict[str, list[str]]:
    return {
        job["job_name"]: [
            target for static in job["static_configs"] for target in static["targets"]
        ]
        for job in document["scrape_configs"]
    }


def _rendered(settings: StackSettings) -> dict[str, Any]:
    document = yaml.safe_load(render_prometheus_config(settings))
    assert isinstance(document, dict)
    return document


def _alerts() -> list[dict[str, Any]]:
    return [
        rule
        for path in RULE_FILES
        for group in _load(path)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def test_promtool_accepts_the_rendered_native_config(stack_env: Path) -> None:
    settings = StackSettings()
    assert write_prometheus_config(settings)
    output = _run_promtool("check", "config", str(prometheus_config_path(settings)))
    # The rule files are found (an empty glob would check nothing).
    for path in RULE_FILES:
        assert str(path) in output


def test_promtool_accepts_the_compose_config() -> None:
    _run_promtool("check", "config", str(COMPOSE_CONFIG.relative_to(ROOT)))


def test_rendered_config_scrapes_the_default_ports(stack_env: Path) -> None:
    targets = _targets(_rendered(StackSettings()))
    assert targets == {job: [f"localhost:{port}"] for job, port in SCRAPE_PORTS.items()}


def test_rendered_config_follows_shifted_ports(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable, (_, port) in SHIFTED_PORTS.items():
        monkeypatch.setenv(variable, str(port))
    targets = _targets(_rendered(StackSettings()))
    assert targets == {job: [f"localhost:{port}"] for job, port in SHIFTED_PORTS.values()}


def test_rendered_config_is_rewritten_only_when_it_changes(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert write_prometheus_config(StackSettings())
    assert not write_prometheus_config(StackSettings())
    monkeypatch.setenv("STACK_GATEWAY_REPLICA_PORT", "18001")
    assert write_prometheus_config(StackSettings())
    assert "localhost:18001" in prometheus_config_path(StackSettings()).read_text()


def test_prometheus_program_reads_the_rendered_config(stack_env: Path) -> None:
    settings = StackSettings()
    command = prometheus_program(settings).command
    assert f"--config.file={prometheus_config_path(settings)}" in command
    assert f"--web.listen-address=127.0.0.1:{settings.prometheus_port}" in command


def test_native_and_compose_scrape_the_same_jobs_and_rules(stack_env: Path) -> None:
    native = _rendered(StackSettings())
    compose = _load(COMPOSE_CONFIG)
    assert set(_targets(native)) == set(_targets(compose)) == set(SCRAPE_PORTS)
    # Compose mounts prometheus/ at /etc/prometheus: rules/*.yml beside its config.
    assert compose["rule_files"] == ["rules/*.yml"]
    (native_rules,) = native["rule_files"]
    assert sorted(Path(native_rules).parent.glob(Path(native_rules).name)) == RULE_FILES
    assert native["global"] == compose["global"]


@pytest.mark.parametrize("job", sorted(SCRAPE_PORTS))
def test_compose_job_targets_its_service(job: str) -> None:
    # In compose each service is reached by its name; Prometheus scrapes itself locally.
    host = "localhost" if job == "prometheus" else job
    assert _targets(_load(COMPOSE_CONFIG))[job] == [f"{host}:{COMPOSE_PORTS[job]}"]


def test_promtool_accepts_rules() -> None:
    assert RULE_FILES
    _run_promtool("check", "rules", *(str(path.relative_to(ROOT)) for path in RULE_FILES))


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS
    _run_promtool("test", "rules", *(str(path.relative_to(ROOT)) for path in RULE_TESTS))


def test_rule_unit_tests_cover_every_alert_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for case in _load(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - firing == set(), "alerts no test sees firing"
    assert names - quiet == set(), "alerts no test sees quiet"


def test_every_rule_file_is_under_test() -> None:
    tested = {
        (path.parent / rule_file).resolve()
        for path in RULE_TESTS
        for rule_file in _load(path)["rule_files"]
    }
    assert tested == {path.resolve() for path in RULE_FILES}


def test_names_are_unique() -> None:
    alerts = [rule["alert"] for rule in _alerts()]
    assert len(set(alerts)) == len(alerts)
    records = [
        rule["record"]
        for path in RULE_FILES
        for group in _load(path)["groups"]
        for rule in group["rules"]
        if "record" in rule
    ]
    assert len(set(records)) == len(records)
    groups = [group["name"] for path in RULE_FILES for group in _load(path)["groups"]]
    assert len(set(groups)) == len(groups)


def test_every_alert_has_severity_and_a_runbook() -> None:
    runbooks = RUNBOOKS.read_text(encoding="utf-8")
    anchors = {
        re.sub(r"[^a-z0-9-]", "", title.strip().lower().replace(" ", "-"))
        for title in re.findall(r"^#+ (.+)$", runbooks, re.MULTILINE)
    }
    alerts = _alerts()
    assert alerts
    for rule in alerts:
        name = rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = rule["annotations"]
        assert annotations["summary"], name
        assert annotations["description"], name
        assert annotations["runbook_url"] == f"docs/runbooks.md#{name.lower()}", name
        assert name.lower() in anchors, f"docs/runbooks.md has no section for {name}"
