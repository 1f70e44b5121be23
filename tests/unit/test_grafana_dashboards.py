"""grafana/: the dashboards and their provisioning are structurally valid.

Unique dashboard uids and panel ids, panels that fit the grid without overlapping, every
datasource reference resolves to a provisioned datasource, every template variable used is
defined, every PromQL expression parses (promtool), and a service that is down shows as down.
That each expression returns data from the real Prometheus is tests/integration/
test_observability.py's job.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
PROVISIONING = ROOT / "grafana" / "provisioning"
DATASOURCES = PROVISIONING / "datasources" / "prometheus.yml"
PROVIDERS = PROVISIONING / "dashboards" / "driftloop.yml"
COMPOSE_CONFIG = ROOT / "prometheus" / "prometheus.compose.yml"
COMPOSE = ROOT / "docker-compose.yml"

REQUIRED = {"driftloop-serving", "driftloop-pipeline", "driftloop-model-health"}
GRAFANA_DATASOURCE = "-- Grafana --"
GRID_COLUMNS = 24
# Grafana's own variables, and what an expression is checked with in their place.
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def _dashboard(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return found


def _queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) of every panel target and Prometheus annotation."""
    found = [
        (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
    ]
    found += [
        (f"annotation {annotation['name']!r}", annotation["expr"])
        for annotation in dashboard["annotations"]["list"]
        if annotation["datasource"]["type"] == "prometheus"
    ]
    return found


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def _substituted(expression: str, dashboard: dict[str, Any]) -> str:
    values = dict(BUILTIN_VARIABLES)
    values.update(dict.fromkeys(_variables(dashboard), "bikeshare"))
    return VARIABLE.sub(lambda match: values[match.group(1)], expression)


def _datasource_uids() -> set[str]:
    return {str(item["uid"]) for item in yaml.safe_load(DATASOURCES.read_text())["datasources"]}


@pytest.fixture(params=DASHBOARDS, ids=lambda path: path.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    path: Path = request.param
    return _dashboard(path)


def test_the_three_dashboards_exist_with_unique_uids_and_titles() -> None:
    documents = [_dashboard(path) for path in DASHBOARDS]
    uids = [document["uid"] for document in documents]
    titles = [document["title"] for document in documents]
    assert len(set(uids)) == len(uids)
    assert len(set(titles)) == len(titles)
    assert set(uids) >= REQUIRED


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(set(ids)) == len(ids)
    assert all(isinstance(panel_id, int) for panel_id in ids)


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["w"] >= 1, panel["title"]
        assert grid["h"] >= 1, panel["title"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_COLUMNS, panel["title"]
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"{panel['title']!r} overlaps another panel"
        taken |= cells


def test_datasource_references_resolve(dashboard: dict[str, Any]) -> None:
    known = _datasource_uids()
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] in known, panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids, panel["title"]
        assert len(set(ref_ids)) == len(ref_ids), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] in known, panel["title"]
            assert target["expr"].strip(), panel["title"]
    for annotation in dashboard["annotations"]["list"]:
        assert annotation["datasource"]["uid"] in known | {GRAFANA_DATASOURCE}, annotation["name"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] in known, variable["name"]


def test_templated_by_model(dashboard: dict[str, Any]) -> None:
    variables = _variables(dashboard)
    assert set(variables) == {"model"}
    model = variables["model"]
    assert model["type"] == "query"
    assert re.fullmatch(r"label_values\(\w+, ?\w+\)", model["query"]["query"])
    assert any("$model" in expression for _, expression in _queries(dashboard))


def test_every_variable_used_is_defined(dashboard: dict[str, Any]) -> None:
    defined = set(_variables(dashboard)) | set(BUILTIN_VARIABLES)
    for where, expression in _queries(dashboard):
        used = set(VARIABLE.findall(expression))
        assert used <= defined, f"{where}: {sorted(used - defined)}"


def test_every_expression_parses(dashboard: dict[str, Any], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus); CI installs it")
    queries = _queries(dashboard)
    # promtool parses rule files only: each expression becomes a recording rule.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query:{index}", "expr": _substituted(expr, dashboard)}
                    for index, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_platform_service_shows_up_or_down() -> None:
    """`up` panels show DOWN for a service that is down, for every scraped platform job."""
    jobs = {
        job["job_name"]
        for job in yaml.safe_load(COMPOSE_CONFIG.read_text())["scrape_configs"]
        if job["job_name"] != "prometheus"
    }
    shown: set[str] = set()
    for path in DASHBOARDS:
        for panel in _panels(_dashboard(path)):
            for target in panel.get("targets", []):
                matched = re.fullmatch(r'up\{job=~"([\w|-]+)"\}', target["expr"])
                if matched is None:
                    continue
                mapping = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
                assert mapping["0"]["text"] == "DOWN", panel["title"]
                shown |= set(matched.group(1).split("|"))
    assert jobs <= shown


def test_dashboards_are_provisioned_from_this_folder() -> None:
    (provider,) = yaml.safe_load(PROVIDERS.read_text())["providers"]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert provider["type"] == "file"


def test_recorded_series_used_by_panels_are_recorded() -> None:
    recorded = {
        rule["record"]
        for path in sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    for path in DASHBOARDS:
        for where, expression in _queries(_dashboard(path)):
            used = set(re.findall(r"\b([a-z_][a-z0-9_]*:[a-z0-9_:]+)", expression))
            assert used <= recorded, f"{path.name} {where}: {sorted(used - recorded)}"
