"""Alerting of the native stack: Alertmanager's configuration rendered from the settings
(amtool accepts it, it notifies the alert receiver, timings and extra receivers follow the
settings), Prometheus pointed at it, and the rules' ``for:`` overrides."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from driftloop.settings import SettingsError, load_settings
from driftloop_tools.stack.alertmanager_config import (
    alertmanager_config_path,
    render_alertmanager_config,
    write_alertmanager_config,
)
from driftloop_tools.stack.lifecycle import (
    ALERT_DELIVERY,
    INFRASTRUCTURE,
    all_programs,
    stop_stages,
)
from driftloop_tools.stack.programs import alert_receiver_program, alertmanager_program
from driftloop_tools.stack.prometheus_config import (
    RULES_DIR,
    prometheus_config_path,
    render_prometheus_config,
    rendered_rules,
    rules_dir,
    write_prometheus_config,
)
from driftloop_tools.stack.readiness import PROBES
from driftloop_tools.stack.settings import StackSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_ALERTMANAGER = ROOT / "prometheus" / "alertmanager.compose.yml"


def _rendered(settings: StackSettings) -> dict[str, Any]:
    document = yaml.safe_load(render_alertmanager_config(settings))
    assert isinstance(document, dict)
    return document


def _amtool(*arguments: str) -> str:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.skip("amtool not installed (Debian package prometheus-alertmanager); CI installs it")
    result = subprocess.run([amtool, *arguments], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _promtool(*arguments: str) -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus); CI installs it")
    result = subprocess.run([promtool, *arguments], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_defaults_are_alertmanagers_own_timings_and_the_receiver(stack_env: Path) -> None:
    route = _rendered(StackSettings())["route"]
    assert (route["group_wait"], route["group_interval"], route["repeat_interval"]) == (
        "30s",
        "5m",
        "4h",
    )
    (receiver,) = _rendered(StackSettings())["receivers"]
    assert route["receiver"] == receiver["name"]
    assert receiver["webhook_configs"] == [
        {"url": "http://127.0.0.1:9099/alerts", "send_resolved": True}
    ]
    assert "slack_configs" not in receiver
    assert "pagerduty_configs" not in receiver


def test_timings_and_port_follow_the_settings(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACK_ALERTMANAGER_GROUP_WAIT", "5s")
    monkeypatch.setenv("STACK_ALERTMANAGER_GROUP_INTERVAL", "10s")
    monkeypatch.setenv("STACK_ALERTMANAGER_REPEAT_INTERVAL", "1h30m")
    monkeypatch.setenv("STACK_ALERT_RECEIVER_PORT", "19099")
    document = _rendered(StackSettings())
    route = document["route"]
    assert (route["group_wait"], route["group_interval"], route["repeat_interval"]) == (
        "5s",
        "10s",
        "1h30m",
    )
    assert document["receivers"][0]["webhook_configs"][0]["url"] == (
        "http://127.0.0.1:19099/alerts"
    )


@pytest.mark.parametrize("duration", ["30", "five minutes", "5 m", "-5m", ""])
def test_a_duration_alertmanager_would_refuse_stops_the_settings(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch, duration: str
) -> None:
    monkeypatch.setenv("STACK_ALERTMANAGER_GROUP_WAIT", duration)
    with pytest.raises(SettingsError, match="STACK_ALERTMANAGER_GROUP_WAIT"):
        load_settings(StackSettings)


def test_slack_and_pagerduty_join_the_receiver_when_set(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "STACK_ALERTMANAGER_SLACK_WEBHOOK_URL", "https://hooks.slack.com/services/T/B/X"
    )
    monkeypatch.setenv(
        "STACK_ALERTMANAGER_PAGERDUTY_ROUTING_KEY", "0123456789abcdef0123456789abcdef"
    )
    (receiver,) = _rendered(StackSettings())["receivers"]
    assert receiver["slack_configs"] == [
        {"api_url": "https://hooks.slack.com/services/T/B/X", "send_resolved": True}
    ]
    assert receiver["pagerduty_configs"] == [
        {"routing_key": "0123456789abcdef0123456789abcdef", "send_resolved": True}
    ]
    # The webhook stays: notifications are still stored and readable.
    assert receiver["webhook_configs"][0]["url"].endswith("/alerts")


def test_empty_slack_and_pagerduty_settings_mean_unset(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # .env.example documents them as `NAME=`.
    monkeypatch.setenv("STACK_ALERTMANAGER_SLACK_WEBHOOK_URL", "")
    monkeypatch.setenv("STACK_ALERTMANAGER_PAGERDUTY_ROUTING_KEY", "")
    (receiver,) = _rendered(StackSettings())["receivers"]
    assert set(receiver) == {"name", "webhook_configs"}


def test_amtool_accepts_the_rendered_config_with_every_receiver(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "STACK_ALERTMANAGER_SLACK_WEBHOOK_URL", "https://hooks.slack.com/services/T/B/X"
    )
    monkeypatch.setenv(
        "STACK_ALERTMANAGER_PAGERDUTY_ROUTING_KEY", "0123456789abcdef0123456789abcdef"
    )
    settings = StackSettings()
    assert write_alertmanager_config(settings)
    path = alertmanager_config_path(settings)
    output = _amtool("check-config", str(path))
    assert "1 receivers" in output
    assert "1 inhibit rules" in output
    # It may hold the Slack URL and the PagerDuty key: only its owner reads it.
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not write_alertmanager_config(settings)


def test_amtool_accepts_the_compose_config() -> None:
    _amtool("check-config", str(COMPOSE_ALERTMANAGER))


def test_native_and_compose_route_and_receive_alike(stack_env: Path) -> None:
    native = _rendered(StackSettings())
    compose = yaml.safe_load(COMPOSE_ALERTMANAGER.read_text(encoding="utf-8"))
    assert native["route"] == compose["route"]
    assert native["inhibit_rules"] == compose["inhibit_rules"]
    (native_receiver,) = native["receivers"]
    (compose_receiver,) = compose["receivers"]
    assert native_receiver["name"] == compose_receiver["name"]
    assert compose_receiver["webhook_configs"] == [
        {"url": "http://alert-receiver:9099/alerts", "send_resolved": True}
    ]


def test_prometheus_sends_alerts_to_the_stacks_alertmanager(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACK_ALERTMANAGER_PORT", "19095")
    document = yaml.safe_load(render_prometheus_config(StackSettings()))
    assert document["alerting"] == {
        "alertmanagers": [{"static_configs": [{"targets": ["localhost:19095"]}]}]
    }
    compose = yaml.safe_load((ROOT / "prometheus" / "prometheus.compose.yml").read_text())
    assert compose["alerting"] == {
        "alertmanagers": [{"static_configs": [{"targets": ["alertmanager:9095"]}]}]
    }


def test_alertmanager_program_listens_on_its_port_without_gossip(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACK_ALERTMANAGER_PORT", "19095")
    settings = StackSettings()
    command = alertmanager_program(settings).command
    assert f"--config.file={alertmanager_config_path(settings)}" in command
    assert "--web.listen-address=127.0.0.1:19095" in command
    # Its default gossip listener (0.0.0.0:9094) would collide with another stack's.
    assert "--cluster.listen-address=" in command


def test_alert_receiver_program_stores_in_the_stack_data(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACK_ALERT_RECEIVER_PORT", "19099")
    settings = StackSettings()
    program = alert_receiver_program(settings)
    assert program.command[1:] == ["-m", "driftloop.alerting"]
    assert program.environment["ALERT_RECEIVER_PORT"] == "19099"
    assert Path(program.environment["ALERT_RECEIVER_STORE_PATH"]).is_relative_to(settings.data)


def test_the_alert_path_is_started_probed_and_stopped_in_order(stack_env: Path) -> None:
    settings = StackSettings()
    settings.root.mkdir(parents=True)
    names = {program.name for program in all_programs(settings)}
    assert {"alertmanager", "alert-receiver"} <= names
    assert {"alertmanager", "alert-receiver"} <= set(PROBES)
    # The receiver with the infrastructure; Alertmanager after the platform's services, so
    # the stack's own start is not announced as outages, and stopped before them.
    assert "alert-receiver" in INFRASTRUCTURE
    assert ALERT_DELIVERY == ("alertmanager",)
    assert stop_stages(settings)[0] == ["alertmanager"]


def test_without_overrides_prometheus_loads_the_repository_rules(stack_env: Path) -> None:
    settings = StackSettings()
    assert rendered_rules(settings) == {}
    document = yaml.safe_load(render_prometheus_config(settings))
    assert document["rule_files"] == [str(RULES_DIR / "*.yml")]


def _for_of(text: str, alert: str) -> str | None:
    for group in yaml.safe_load(text)["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                duration = rule.get("for")
                return None if duration is None else str(duration)
    return None


def test_overrides_replace_only_the_named_alerts_for(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "STACK_ALERT_FOR_OVERRIDES", '{"ServiceDown": "15s", "GatewaySpoolDroppingEvents": "1m"}'
    )
    settings = StackSettings()
    rules = rendered_rules(settings)
    assert set(rules) == {path.name for path in RULES_DIR.glob("*.yml")}
    assert _for_of(rules["platform.yml"], "ServiceDown") == "15s"
    # An alert without `for:` gets the one named for it.
    assert _for_of(rules["gateway.yml"], "GatewaySpoolDroppingEvents") == "1m"
    # Every other rule is as written.
    original = (RULES_DIR / "gateway.yml").read_text(encoding="utf-8")
    assert _for_of(rules["gateway.yml"], "GatewayKafkaUnreachable") == _for_of(
        original, "GatewayKafkaUnreachable"
    )
    for name, text in rules.items():
        rendered = yaml.safe_load(text)
        expected = yaml.safe_load((RULES_DIR / name).read_text(encoding="utf-8"))
        for group, original_group in zip(rendered["groups"], expected["groups"], strict=True):
            for rule, original_rule in zip(group["rules"], original_group["rules"], strict=True):
                assert {k: v for k, v in rule.items() if k != "for"} == {
                    k: v for k, v in original_rule.items() if k != "for"
                }


def test_overridden_rules_are_written_loaded_and_pass_promtool(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACK_ALERT_FOR_OVERRIDES", '{"ServiceDown": "15s"}')
    settings = StackSettings()
    assert write_prometheus_config(settings)
    document = yaml.safe_load(prometheus_config_path(settings).read_text())
    assert document["rule_files"] == [str(rules_dir(settings) / "*.yml")]
    written = sorted(rules_dir(settings).glob("*.yml"))
    assert [path.name for path in written] == sorted(path.name for path in RULES_DIR.glob("*.yml"))
    _promtool("check", "rules", *(str(path) for path in written))
    _promtool("check", "config", str(prometheus_config_path(settings)))
    assert not write_prometheus_config(settings)
    # Taking the overrides away goes back to the repository's files and drops the copies.
    monkeypatch.delenv("STACK_ALERT_FOR_OVERRIDES")
    assert write_prometheus_config(StackSettings())
    assert not list(rules_dir(settings).glob("*.yml"))


def test_an_override_of_an_unknown_alert_is_refused(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACK_ALERT_FOR_OVERRIDES", '{"ServiceDwn": "15s"}')
    with pytest.raises(ValueError, match="ServiceDwn"):
        rendered_rules(StackSettings())


def test_an_override_with_a_bad_duration_stops_the_settings(
    stack_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACK_ALERT_FOR_OVERRIDES", '{"ServiceDown": "soon"}')
    with pytest.raises(SettingsError, match="STACK_ALERT_FOR_OVERRIDES"):
        load_settings(StackSettings)
