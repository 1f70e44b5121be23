"""Grafana-managed alerting: the same rules as prometheus/rules, a contact point and a policy.

grafana/provisioning/alerting/rules.yml is generated from the Prometheus alert rules the way
Grafana converts Prometheus rules itself: the rule's expression as an instant query, a math
expression that is true for every series the query returns, a threshold on it. A series
returned is a firing alert in both. Regenerate the file after changing a Prometheus alert::

    uv run python -m tests.unit.test_alerting_grafana
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_RULES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
PROVISIONING = ROOT / "grafana" / "provisioning"
GRAFANA_RULES = PROVISIONING / "alerting" / "rules.yml"
NOTIFICATIONS = PROVISIONING / "alerting" / "notifications.yml"
DATASOURCES = PROVISIONING / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = PROVISIONING / "dashboards" / "driftloop.yml"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

FOLDER = "driftloop"
GROUP_INTERVAL = "1m"
EXPRESSION_DATASOURCE = "__expr__"
QUERY, MATH, THRESHOLD = "query", "prometheus_math", "threshold"
# Prometheus templates print $value; Grafana's holds every query's value by refId.
VALUE = re.compile(r"\$value\b")
UID = re.compile(r"^[a-zA-Z0-9_-]{1,40}$")
HEADER = """\
# Generated from prometheus/rules/*.yml by `uv run python -m tests.unit.test_alerting_grafana`;
# tests/unit/test_alerting_grafana.py fails when the two differ. Do not edit by hand.
#
# The same alert rules as Prometheus evaluates, as Grafana-managed rules (Grafana's own way
# of converting a Prometheus rule): the expression as an instant query, true for every series
# it returns. Notifications go to the contact point of notifications.yml.
"""


def _load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict), path
    return document


def _datasource_uid() -> str:
    (datasource,) = _load(DATASOURCES)["datasources"]
    return str(datasource["uid"])


def _expression_datasource() -> dict[str, str]:
    return {"type": EXPRESSION_DATASOURCE, "uid": EXPRESSION_DATASOURCE}


def _grafana_rule(rule: dict[str, Any], datasource_uid: str) -> dict[str, Any]:
    return {
        "uid": f"driftloop-{rule['alert'].lower()}"[:40],
        "title": rule["alert"],
        "condition": THRESHOLD,
        "data": [
            {
                "refId": QUERY,
                "relativeTimeRange": {"from": 600, "to": 0},
                "datasourceUid": datasource_uid,
                "model": {
                    "datasource": {"type": "prometheus", "uid": datasource_uid},
                    "expr": rule["expr"].strip(),
                    "instant": True,
                    "range": False,
                    "refId": QUERY,
                },
            },
            {
                "refId": MATH,
                "datasourceUid": EXPRESSION_DATASOURCE,
                "model": {
                    "datasource": _expression_datasource(),
                    "type": "math",
                    "expression": f"is_number(${QUERY}) || is_nan(${QUERY}) || is_inf(${QUERY})",
                    "refId": MATH,
                },
            },
            {
                "refId": THRESHOLD,
                "datasourceUid": EXPRESSION_DATASOURCE,
                "model": {
                    "datasource": _expression_datasource(),
                    "type": "threshold",
                    "expression": MATH,
                    "conditions": [{"evaluator": {"type": "gt", "params": [0]}}],
                    "refId": THRESHOLD,
                },
            },
        ],
        # No series is no alert, as in Prometheus; a failing query is shown as an error.
        "noDataState": "OK",
        "execErrState": "Error",
        "for": rule.get("for", "0s"),
        "labels": dict(rule.get("labels", {})),
        "annotations": {
            name: VALUE.sub(f"$values.{QUERY}.Value", text)
            for name, text in rule.get("annotations", {}).items()
        },
        "isPaused": False,
    }


def grafana_rules() -> dict[str, Any]:
    """The provisioning document of every Prometheus alert, grouped as in Prometheus."""
    datasource_uid = _datasource_uid()
    groups = []
    for path in PROMETHEUS_RULES:
        for group in _load(path)["groups"]:
            alerts = [rule for rule in group["rules"] if "alert" in rule]
            if alerts:
                groups.append(
                    {
                        "orgId": 1,
                        "name": group["name"],
                        "folder": FOLDER,
                        "interval": GROUP_INTERVAL,
                        "rules": [_grafana_rule(rule, datasource_uid) for rule in alerts],
                    }
                )
    return {"apiVersion": 1, "groups": groups}


def render_grafana_rules() -> str:
    """rules.yml as it is checked in."""
    return HEADER + yaml.safe_dump(grafana_rules(), sort_keys=False, width=100, allow_unicode=True)


def _prometheus_alerts() -> list[dict[str, Any]]:
    return [
        rule
        for path in PROMETHEUS_RULES
        for group in _load(path)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def _grafana_rule_list() -> list[dict[str, Any]]:
    return [rule for group in _load(GRAFANA_RULES)["groups"] for rule in group["rules"]]


def test_grafana_rules_are_generated_from_the_prometheus_rules() -> None:
    assert GRAFANA_RULES.read_text(encoding="utf-8") == render_grafana_rules(), (
        "regenerate with `uv run python -m tests.unit.test_alerting_grafana`"
    )


def test_every_prometheus_alert_is_a_grafana_rule_with_the_same_expression() -> None:
    prometheus = {rule["alert"]: rule for rule in _prometheus_alerts()}
    grafana = {rule["title"]: rule for rule in _grafana_rule_list()}
    assert set(grafana) == set(prometheus)
    for name, rule in grafana.items():
        (query,) = [item for item in rule["data"] if item["refId"] == QUERY]
        assert query["model"]["expr"] == prometheus[name]["expr"].strip(), name
        assert rule["for"] == prometheus[name].get("for", "0s"), name
        assert rule["labels"] == prometheus[name]["labels"], name
        assert rule["annotations"]["runbook_url"] == prometheus[name]["annotations"]["runbook_url"]


def test_rule_uids_and_titles_are_unique_and_valid() -> None:
    rules = _grafana_rule_list()
    uids = [rule["uid"] for rule in rules]
    assert len(set(uids)) == len(uids)
    assert all(UID.fullmatch(uid) for uid in uids), uids
    titles = [rule["title"] for rule in rules]
    assert len(set(titles)) == len(titles)


def test_rules_reference_existing_queries_and_datasources() -> None:
    known_datasources = {_datasource_uid(), EXPRESSION_DATASOURCE}
    for group in _load(GRAFANA_RULES)["groups"]:
        assert group["folder"] == FOLDER
        for rule in group["rules"]:
            ref_ids = [item["refId"] for item in rule["data"]]
            assert len(set(ref_ids)) == len(ref_ids), rule["title"]
            assert rule["condition"] in ref_ids, rule["title"]
            for item in rule["data"]:
                assert item["datasourceUid"] in known_datasources, rule["title"]
                assert item["model"]["refId"] == item["refId"], rule["title"]
                model = item["model"]
                if model.get("type") == "threshold":
                    assert model["expression"] in ref_ids, rule["title"]
                if model.get("type") == "math":
                    used = set(re.findall(r"\$(\w+)", model["expression"]))
                    assert used, rule["title"]
                    assert used <= set(ref_ids), rule["title"]


def test_annotations_use_grafana_template_variables() -> None:
    for rule in _grafana_rule_list():
        for text in rule["annotations"].values():
            assert not VALUE.search(text), rule["title"]
            # Grafana interpolates ${VAR} in provisioned annotations: none may look like one.
            assert "${" not in text, rule["title"]


def _environment_references(text: str) -> set[str]:
    return set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)\}?", text))


def test_contact_point_and_policy_come_from_the_environment() -> None:
    notifications = _load(NOTIFICATIONS)
    contact_points = {point["name"] for point in notifications["contactPoints"]}
    receivers = [
        receiver for point in notifications["contactPoints"] for receiver in point["receivers"]
    ]
    assert all(UID.fullmatch(receiver["uid"]) for receiver in receivers)
    (policy,) = notifications["policies"]
    routes = [policy, *policy.get("routes", [])]
    assert {route["receiver"] for route in routes} <= contact_points

    used = _environment_references(NOTIFICATIONS.read_text(encoding="utf-8"))
    assert used, "the contact point is configured from the environment"
    grafana = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]["grafana"]
    environment = grafana["environment"]
    assert used <= set(environment), "docker-compose.yml passes every variable to Grafana"
    documented = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    assert used <= documented


def test_alerting_provisioning_is_mounted_where_grafana_reads_it() -> None:
    grafana = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]["grafana"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert GRAFANA_RULES.parent == PROVISIONING / "alerting"
    provider = _load(DASHBOARD_PROVIDERS)["providers"][0]
    assert provider["folder"] == FOLDER  # alerts and dashboards share one folder


if __name__ == "__main__":
    GRAFANA_RULES.parent.mkdir(parents=True, exist_ok=True)
    GRAFANA_RULES.write_text(render_grafana_rules(), encoding="utf-8")
