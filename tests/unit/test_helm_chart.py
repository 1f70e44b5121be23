"""deploy/helm/driftloop: lints, renders manifests valid for Kubernetes, bounds replicas.

Renders with the real helm (``make tools`` installs it from the Go module proxy) and validates
every rendered object with kubernetes-validate's schemas of the oldest Kubernetes the chart
supports and of the newest one it ships.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from driftloop_tools.stack.programs import MLFLOW_CLIENT_ENVIRONMENT
from schemas.topics import Topic, topic_specs

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "driftloop"
THREE_REPLICAS = CHART / "ci" / "three-replicas-values.yaml"
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
ENV_EXAMPLE = ROOT / ".env.example"
SECRET_KEYS = {
    "POSTGRES_PASSWORD",
    "S3_SECRET_ACCESS_KEY",
    "AIRFLOW_API_PASSWORD",
    "GATEWAY_ADMIN_TOKEN",
    "GATEWAY_API_KEYS",
}


def _helm() -> str:
    found = os.environ.get("HELM") or shutil.which("helm")
    if found is None:
        installed = sorted(ROOT.glob(".tools/helm-*/helm"))
        found = str(installed[-1]) if installed else None
    if found is None:
        message = "helm is not installed: `make tools` installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _helm_run(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_helm(), *arguments], capture_output=True, text=True, check=False, timeout=120
    )


def _render(*arguments: str) -> list[dict[str, Any]]:
    result = _helm_run("template", "ci", str(CHART), "-f", str(THREE_REPLICAS), *arguments)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def _values() -> dict[str, Any]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert isinstance(values, dict)
    return values


def _env_example() -> dict[str, str]:
    pairs = re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.M)
    return dict(pairs)


@pytest.fixture(scope="module")
def three_replicas() -> list[dict[str, Any]]:
    return _render()


def _objects(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == kind}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def test_chart_lints() -> None:
    result = _helm_run("lint", "--strict", str(CHART), "-f", str(THREE_REPLICAS))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_object_is_valid_kubernetes(
    three_replicas: list[dict[str, Any]], version: str
) -> None:
    kinds = {doc["kind"] for doc in three_replicas}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret"} <= kinds
    for document in three_replicas:
        kubernetes_validate.validate(document, version, strict=True)


def test_three_replicas_of_everything(three_replicas: list[dict[str, Any]]) -> None:
    deployments = _objects(three_replicas, "Deployment")
    consumers = {name: doc for name, doc in deployments.items() if not name.endswith("-gateway")}
    assert {name.removeprefix("ci-driftloop-") for name in consumers} == set(_values()["consumers"])
    for name, deployment in consumers.items():
        assert deployment["spec"]["replicas"] == 3, name
    # The HPA owns the gateway's replica count; the Deployment leaves it alone.
    assert "replicas" not in deployments["ci-driftloop-gateway"]["spec"]
    (hpa,) = _objects(three_replicas, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["minReplicas"] == 3
    assert hpa["spec"]["scaleTargetRef"]["name"] == "ci-driftloop-gateway"


def test_gateway_runs_python_m_gateway_and_is_ready_only_with_a_model(
    three_replicas: list[dict[str, Any]],
) -> None:
    gateway = _objects(three_replicas, "Deployment")["ci-driftloop-gateway"]
    container = _container(gateway)
    assert container["command"] == ["python", "-m", "gateway"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["GATEWAY_HOST"] == "0.0.0.0"  # noqa: S104 - inside its pod
    (service,) = _objects(three_replicas, "Service").values()
    assert service["spec"]["selector"] == gateway["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_settings_come_from_the_configmap_and_the_secret(
    three_replicas: list[dict[str, Any]],
) -> None:
    (configmap,) = _objects(three_replicas, "ConfigMap").values()
    (secret,) = _objects(three_replicas, "Secret").values()
    known = set(_env_example()) | set(MLFLOW_CLIENT_ENVIRONMENT)
    assert set(configmap["data"]) <= known, sorted(set(configmap["data"]) - known)
    assert set(secret["stringData"]) == SECRET_KEYS
    assert not SECRET_KEYS & set(configmap["data"])
    for name, deployment in _objects(three_replicas, "Deployment").items():
        sources = _container(deployment)["envFrom"]
        assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in sources, name
        assert {"secretRef": {"name": secret["metadata"]["name"]}} in sources, name


def test_consumers_run_their_modules_on_their_metrics_ports(
    three_replicas: list[dict[str, Any]],
) -> None:
    env_example = _env_example()
    deployments = _objects(three_replicas, "Deployment")
    for name, consumer in _values()["consumers"].items():
        container = _container(deployments[f"ci-driftloop-{name}"])
        assert container["command"] == ["python", "-m", consumer["module"]]
        # The variable is the service's own setting, and the port its documented default.
        assert env_example[consumer["metricsPortVariable"]] == str(consumer["metricsPort"])
        assert container["env"] == [
            {"name": consumer["metricsPortVariable"], "value": str(consumer["metricsPort"])}
        ]
        assert container["readinessProbe"]["httpGet"]["port"] == "metrics"


def test_topic_partitions_match_the_schema() -> None:
    consumed = {topic.value for topic in Topic}  # dead-letter topics have no consumer group
    partitions = {spec.name: spec.partitions for spec in topic_specs() if spec.name in consumed}
    assert _values()["topics"] == partitions


@pytest.mark.parametrize(
    "name",
    sorted(name for name, consumer in _values()["consumers"].items() if not consumer["leaderLock"]),
)
def test_consumer_replicas_beyond_partitions_fail_the_render(name: str) -> None:
    consumer = _values()["consumers"][name]
    partitions = min(_values()["topics"][topic] for topic in consumer["topics"])
    result = _helm_run(
        "template",
        "ci",
        str(CHART),
        "-f",
        str(THREE_REPLICAS),
        "--set",
        f"consumers.{name}.replicas={partitions + 1}",
    )
    assert result.returncode != 0
    assert f"consumers.{name}.replicas is {partitions + 1}, more than the {partitions}" in (
        result.stderr
    )


@pytest.mark.parametrize(
    "name",
    sorted(name for name, consumer in _values()["consumers"].items() if consumer["leaderLock"]),
)
def test_leader_locked_services_take_any_replicas(name: str) -> None:
    rendered = _render("--set", f"consumers.{name}.replicas=5")
    assert _objects(rendered, "Deployment")[f"ci-driftloop-{name}"]["spec"]["replicas"] == 5


def test_secrets_are_required_unless_an_existing_secret_is_named() -> None:
    missing = _helm_run("template", "ci", str(CHART))
    assert missing.returncode != 0
    assert "secrets.postgresPassword is required" in missing.stderr
    existing = _helm_run("template", "ci", str(CHART), "--set", "secrets.existingSecret=mine")
    assert existing.returncode == 0, existing.stderr
    documents = [doc for doc in yaml.safe_load_all(existing.stdout) if doc]
    assert not _objects(documents, "Secret")
    for deployment in _objects(documents, "Deployment").values():
        assert {"secretRef": {"name": "mine"}} in _container(deployment)["envFrom"]


def test_first_model_job_runs_the_bootstrap_command(three_replicas: list[dict[str, Any]]) -> None:
    (job,) = _objects(three_replicas, "Job").values()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["driftloop", "model", "bootstrap"]
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
