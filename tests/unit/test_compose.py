"""docker-compose.yml and docker/: services, pinned images, secrets, start order, topics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from driftloop.settings import (
    AirflowApiSettings,
    DriftloopSettings,
    KafkaSettings,
    MlflowSettings,
    ObjectStoreSettings,
    PostgresSettings,
)
from driftloop_tools.stack.programs import MLFLOW_CLIENT_ENVIRONMENT
from schemas.topics import topic_specs

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
TOPICS_SCRIPT = ROOT / "docker" / "redpanda" / "create-topics.sh"
DATABASES_SCRIPT = ROOT / "docker" / "postgres" / "create-databases.sh"

# How each platform service starts (the leading arguments of its command).
PLATFORM_COMMANDS = {
    "gateway": ["python", "-m", "gateway"],
    "feature-logger": ["python", "-m", "consumers.feature_logger"],
    "batch-scorer": ["python", "-m", "consumers.batch_scorer"],
    "drift-monitor": ["python", "-m", "consumers.drift_monitor"],
    "retrain-trigger": ["python", "-m", "consumers.retrain_trigger"],
    "shadow-scorer": ["python", "-m", "consumers.shadow_scorer"],
    "alert-receiver": ["python", "-m", "driftloop.alerting"],
}
AIRFLOW_COMMANDS = {
    "airflow-init": ["db", "migrate"],
    "airflow-api-server": ["api-server", "--port", "8080"],
    "airflow-scheduler": ["scheduler"],
    "airflow-dag-processor": ["dag-processor"],
    "airflow-triggerer": ["triggerer"],
}
INFRA_SERVICES = {
    "redpanda",
    "postgres",
    "minio",
    "mlflow",
    "prometheus",
    "alertmanager",
    "grafana",
}
INIT_JOBS = {"redpanda-init", "minio-init", "airflow-init", "model-bootstrap"}
# One-shot jobs run from the project image, and their commands.
PROJECT_JOBS = {"model-bootstrap": ["driftloop", "model", "bootstrap"]}

# Every secret the stack needs; each must be set in .env before compose starts anything.
SECRETS = {
    "POSTGRES_PASSWORD",
    "S3_SECRET_ACCESS_KEY",
    "AIRFLOW_API_PASSWORD",
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_FERNET_KEY",
    "GRAFANA_ADMIN_PASSWORD",
    "GATEWAY_ADMIN_TOKEN",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|KEY")
# An access key id names an account, as a user name does; a *_FILE variable holds a path.
NOT_SECRET_SUFFIXES = ("_KEY_ID", "_FILE")
REQUIRED_SECRET = re.compile(r"^\$\{(?P<name>\w+):\?set (?P=name) in \.env\}$")
# `$$` is compose's escape for a literal `$`, left for the container's shell.
INTERPOLATION = re.compile(r"(?<!\$)\$\{(?P<name>\w+)(?P<modifier>[^}]*)\}")

# Where each connection setting points inside the compose network.
COMPOSE_CONNECTIONS = {
    "KAFKA_BOOTSTRAP_SERVERS": "redpanda:9092",
    "POSTGRES_HOST": "postgres",
    "POSTGRES_PORT": "5432",
    "S3_ENDPOINT_URL": "http://minio:9000",
    "S3_DATA_BUCKET": "driftloop-data",
    "S3_MLFLOW_BUCKET": "driftloop-mlflow",
    "MLFLOW_TRACKING_URI": "http://mlflow:5000",
    "AIRFLOW_API_URL": "http://airflow-api-server:8080",
}


def _is_secret(variable: str) -> bool:
    return bool(SECRET_NAME.search(variable)) and not variable.endswith(NOT_SECRET_SUFFIXES)


def _environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        return dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def _settings_variables(settings: type[DriftloopSettings]) -> set[str]:
    prefix = settings.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in settings.model_fields} - {f"{prefix}ENVIRONMENT"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def test_every_service_is_defined(services: dict[str, dict[str, Any]]) -> None:
    expected = set(PLATFORM_COMMANDS) | set(AIRFLOW_COMMANDS) | INFRA_SERVICES | INIT_JOBS
    assert expected <= set(services), sorted(expected - set(services))


@pytest.mark.parametrize("name", sorted(PLATFORM_COMMANDS))
def test_platform_service_runs_its_module_from_the_project_image(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    service = services[name]
    expected = PLATFORM_COMMANDS[name]
    assert service["command"][: len(expected)] == expected
    assert service["build"] == {"context": ".", "dockerfile": "docker/Dockerfile"}


def test_gateway_listens_on_its_scrape_port(services: dict[str, dict[str, Any]]) -> None:
    gateway = services["gateway"]
    environment = _environment(gateway)
    assert environment["GATEWAY_HOST"] == "0.0.0.0"  # noqa: S104 - inside its container
    assert environment["GATEWAY_PORT"] == "8000"
    assert "127.0.0.1:8000:8000" in gateway["ports"]


def test_gateway_is_healthy_only_when_ready(services: dict[str, dict[str, Any]]) -> None:
    """/metrics answers while /predict fails with 503; /health/ready does not."""
    probe = " ".join(services["gateway"]["healthcheck"]["test"])
    assert "http://127.0.0.1:8000/health/ready" in probe
    assert "/metrics" not in probe


@pytest.mark.parametrize(
    "name", ["feature-logger", "batch-scorer", "retrain-trigger", "shadow-scorer"]
)
def test_kafka_consumers_are_healthy_only_when_consuming(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    """Their /metrics answers before they join their group; the ready gauge does not."""
    probe = services[name]["healthcheck"]["test"][-1]
    assert f'driftloop_consumer_ready{{consumer="{name}"}} 1.0' in probe


def test_first_model_is_registered_before_the_gateway_starts(
    services: dict[str, dict[str, Any]],
) -> None:
    for name, command in PROJECT_JOBS.items():
        assert services[name]["command"] == command
        assert services[name]["image"] == services["gateway"]["image"]
    assert services["gateway"]["depends_on"]["model-bootstrap"] == {
        "condition": "service_completed_successfully"
    }
    needs = services["model-bootstrap"]["depends_on"]
    assert needs["mlflow"] == {"condition": "service_healthy"}
    assert needs["redpanda-init"] == {"condition": "service_completed_successfully"}


@pytest.mark.parametrize(
    "name", sorted(set(PLATFORM_COMMANDS) | set(AIRFLOW_COMMANDS) | set(PROJECT_JOBS))
)
def test_project_containers_get_every_setting_of_env_file(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    """env_file hands the containers all of .env; ``environment:`` only overrides."""
    assert services[name]["env_file"] == [{"path": ".env", "required": True}], name


def test_project_image_is_one_image(services: dict[str, dict[str, Any]]) -> None:
    built = {name: service["image"] for name, service in services.items() if "build" in service}
    assert set(built) >= set(PLATFORM_COMMANDS) | set(AIRFLOW_COMMANDS) | {"mlflow"}
    assert len(set(built.values())) == 1, built


@pytest.mark.parametrize(
    "name",
    sorted(set(PLATFORM_COMMANDS) | set(AIRFLOW_COMMANDS) | INFRA_SERVICES | INIT_JOBS),
)
def test_image_is_pinned(services: dict[str, dict[str, Any]], name: str) -> None:
    image = services[name]["image"]
    assert "$" not in image, f"{name}: image {image!r} must not depend on the environment"
    if "@sha256:" in image:
        return
    repository, _, tag = image.rpartition(":")
    assert repository, f"{name}: image {image!r} has no tag"
    assert "/" not in tag, f"{name}: image {image!r} has no tag"
    assert tag != "latest", f"{name}: image {image!r} uses latest"


def test_secret_variables_come_only_from_env_file(services: dict[str, dict[str, Any]]) -> None:
    offending = {
        f"{name}.{variable}": value
        for name, service in services.items()
        for variable, value in _environment(service).items()
        if _is_secret(variable) and not REQUIRED_SECRET.match(value)
    }
    assert not offending, offending


def test_every_interpolated_secret_is_required() -> None:
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    references = list(INTERPOLATION.finditer(text))
    secrets = {match["name"] for match in references if _is_secret(match["name"])}
    assert secrets == SECRETS
    loose = {
        match[0]
        for match in references
        if _is_secret(match["name"]) and match["modifier"] != f":?set {match['name']} in .env"
    }
    assert not loose, f"secrets with a default or without a message: {sorted(loose)}"


def test_depends_on_waits_for_health_or_completion(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on must name a condition"
        for target, spec in depends_on.items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec.get("condition")
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name}: {target} has no healthcheck"
            elif condition == "service_completed_successfully":
                assert target in INIT_JOBS, f"{name}: {target} is not a one-shot job"
            else:
                pytest.fail(f"{name} -> {target}: condition {condition!r}")


def test_every_long_running_service_has_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if name in INIT_JOBS:
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert service.get("restart") == "unless-stopped", f"{name} is not restarted"


@pytest.mark.parametrize("name", sorted(INIT_JOBS))
def test_init_job_runs_once(services: dict[str, dict[str, Any]], name: str) -> None:
    assert services[name]["restart"] == "no"
    assert "healthcheck" not in services[name]


def test_platform_env_uses_settings_names_and_compose_hosts(compose: dict[str, Any]) -> None:
    platform_env = compose["x-platform-env"]
    # MLflow's own client variables: the native stack sets the same ones.
    known = {"DRIFTLOOP_ENVIRONMENT", *MLFLOW_CLIENT_ENVIRONMENT}.union(
        *(
            _settings_variables(settings)
            for settings in (
                KafkaSettings,
                PostgresSettings,
                ObjectStoreSettings,
                MlflowSettings,
                AirflowApiSettings,
            )
        )
    )
    assert set(platform_env) <= known, sorted(set(platform_env) - known)
    for variable, value in COMPOSE_CONNECTIONS.items():
        assert platform_env[variable] == value, variable
    for variable, value in MLFLOW_CLIENT_ENVIRONMENT.items():
        assert platform_env[variable] == value, variable


@pytest.mark.parametrize("name", sorted(set(PLATFORM_COMMANDS) | set(AIRFLOW_COMMANDS)))
def test_service_gets_the_platform_env(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], name: str
) -> None:
    environment = _environment(services[name])
    for variable, value in compose["x-platform-env"].items():
        assert environment[variable] == str(value), f"{name}: {variable}"


def test_airflow_is_configured_for_compose(services: dict[str, dict[str, Any]]) -> None:
    for name, command in AIRFLOW_COMMANDS.items():
        service = services[name]
        environment = _environment(service)
        assert service["command"] == command
        assert service["entrypoint"] == ["airflow-entrypoint"]
        assert environment["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert environment["AIRFLOW__CORE__PARALLELISM"] == "4"
        assert (
            environment["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"]
            == "http://airflow-api-server:8080/execution/"
        )
        assert environment["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
        assert environment["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == (
            f"{environment['AIRFLOW_API_USERNAME']}:admin"
        )
        assert "./dags:/app/dags:ro" in service["volumes"]


def test_mlflow_serves_artifacts_from_the_object_store(
    services: dict[str, dict[str, Any]],
) -> None:
    command = services["mlflow"]["command"]
    assert command[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in command
    assert "--artifacts-destination=s3://driftloop-mlflow" in command
    backend = next(arg for arg in command if arg.startswith("--backend-store-uri="))
    assert backend.startswith("--backend-store-uri=postgresql+psycopg2://")
    assert backend.endswith("@postgres:5432/mlflow")
    assert _environment(services["mlflow"])["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"


def test_buckets_are_created(services: dict[str, dict[str, Any]]) -> None:
    script = "\n".join(services["minio-init"]["command"])
    for bucket in ("driftloop-data", "driftloop-mlflow"):
        assert f"mc mb --ignore-existing driftloop/{bucket}" in script


def test_postgres_creates_the_metadata_databases(services: dict[str, dict[str, Any]]) -> None:
    assert _environment(services["postgres"])["POSTGRES_DB"] == "driftloop"
    mounts = services["postgres"]["volumes"]
    assert any(
        mount.startswith("./docker/postgres/create-databases.sh:/docker-entrypoint-initdb.d/")
        for mount in mounts
    )
    assert re.search(r"^for database in mlflow airflow; do$", DATABASES_SCRIPT.read_text(), re.M)


def test_topic_script_creates_every_topic_of_the_schema() -> None:
    created = [
        (name, int(partitions), int(retention_ms))
        for name, partitions, retention_ms in re.findall(
            r"^create_topic (\S+) (\d+) (\d+)$", TOPICS_SCRIPT.read_text(), re.M
        )
    ]
    expected = [(spec.name, spec.partitions, spec.retention_ms) for spec in topic_specs()]
    assert sorted(created) == sorted(expected)


def test_bind_mounts_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def test_prometheus_and_grafana_read_the_repository_config(
    services: dict[str, dict[str, Any]],
) -> None:
    prometheus = services["prometheus"]
    assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.compose.yml" in prometheus["command"]

    grafana = services["grafana"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana["volumes"]
    assert _environment(grafana)["PROMETHEUS_URL"] == "http://prometheus:9090"

    datasources = yaml.safe_load(
        (ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert [(d["uid"], d["type"], d["url"]) for d in datasources] == [
        ("prometheus", "prometheus", "${PROMETHEUS_URL}")
    ]
    providers = yaml.safe_load(
        (ROOT / "grafana/provisioning/dashboards/driftloop.yml").read_text()
    )["providers"]
    assert [p["options"]["path"] for p in providers] == ["/var/lib/grafana/dashboards"]


def test_dockerfile_builds_the_locked_environment_as_non_root() -> None:
    dockerfile = DOCKERFILE.read_text()
    bases = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert bases, "no FROM line"
    for base in bases:
        assert ":" in base, base
        assert not base.endswith(":latest"), base
    assert "uv sync --frozen --no-dev" in dockerfile
    assert "libgomp1" in dockerfile
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user, "the image must switch to a service user"
    assert user[-1] not in {"root", "0"}


def test_dockerignore_keeps_state_and_secrets_out() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".env", ".venv/", ".stack/", ".git/", ".pytest_cache/", ".mypy_cache/"} <= ignored
    assert {".tools/", "dist/"} <= ignored  # helm's binary alone is ~100 MB


def _compose_command() -> list[str] | None:
    """`docker compose` (plugin) or a standalone v2 `docker-compose`, when one works here."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        version = subprocess.run([*command, "version"], capture_output=True, text=True, check=False)
        if version.returncode == 0:
            return command
    return None


def _compose_env(tmp_path: Path, secrets: dict[str, str]) -> tuple[dict[str, str], Path]:
    # An empty --env-file stands in for a developer's .env, which must not decide the outcome.
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    env = {key: value for key, value in os.environ.items() if key not in SECRETS}
    return env | secrets, env_file


def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose plugin or docker-compose binary on this machine")
    env, env_file = _compose_env(tmp_path, dict.fromkeys(SECRETS, "dummy-value-1234"))
    result = subprocess.run(
        [*command, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_docker_compose_refuses_to_start_without_secrets(tmp_path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no docker compose plugin or docker-compose binary on this machine")
    env, env_file = _compose_env(tmp_path, {})
    result = subprocess.run(
        [*command, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "in .env" in result.stderr


# --- The image's wheel -------------------------------------------------------------------------
# The Dockerfile's builder stage COPYs sources, then `uv sync --no-editable` builds the project's
# wheel from them into the venv the runtime stage runs. Below, the same wheel is built from
# exactly those COPY lines, and every module a compose command starts must import from it alone.

COPY_LINE = re.compile(r"^COPY (?!--)(?P<sources>.+) (?P<target>\S+)$", re.M)
IMPORT_FROM_WHEEL = """
import importlib, json, pathlib, sys
root, checkout = pathlib.Path(sys.argv[1]).resolve(), pathlib.Path(sys.argv[2]).resolve()
# The editable install of the checkout would answer for a module missing from the wheel.
sys.path = [str(root)] + [p for p in sys.path if p and pathlib.Path(p).resolve() != checkout]
found = {name: importlib.import_module(name).__file__ for name in sys.argv[3:]}
print(json.dumps(found))
"""


def _builder_copies() -> list[tuple[str, str]]:
    stage = DOCKERFILE.read_text().split(" AS builder", 1)[1].split("\nFROM ", 1)[0]
    return [
        (source, match["target"])
        for match in COPY_LINE.finditer(stage)
        for source in match["sources"].split()
    ]


@pytest.fixture(scope="module")
def image_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project wheel built from the builder stage's COPY lines only, unpacked."""
    uv = shutil.which("uv")
    assert uv is not None, "uv is not on PATH"
    context = tmp_path_factory.mktemp("image-context")
    for source, target in _builder_copies():
        destination = context / target if target.endswith("/") or target == "./" else context
        if source.endswith("/"):
            shutil.copytree(ROOT / source, context / target, ignore=_ignored)
        else:
            shutil.copy(ROOT / source, destination)
    dist = context / "dist"
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    build = subprocess.run(
        [uv, "build", "--wheel", "--out-dir", str(dist)],
        cwd=context,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("driftloop-*.whl")
    unpacked = context / "unpacked"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    return unpacked


def _ignored(directory: str, names: list[str]) -> set[str]:
    return {name for name in names if name in {"__pycache__", ".mypy_cache"}}


def _command_modules(services: dict[str, dict[str, Any]]) -> set[str]:
    modules = {"driftloop_tools.cli.app"}  # the `driftloop` console script
    for service in services.values():
        if "build" not in service or not isinstance(service.get("command"), list):
            continue
        command = service["command"]
        if command[:2] == ["python", "-m"]:
            modules.add(command[2])
    return modules


def test_builder_stage_copies_every_wheel_source() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    copied = {source.rstrip("/") for source, _ in _builder_copies()}
    needed = set(wheel["packages"]) | set(wheel.get("force-include", {}))
    assert needed <= copied, sorted(needed - copied)


def test_image_wheel_holds_every_module_compose_starts(
    services: dict[str, dict[str, Any]], image_wheel: Path, tmp_path: Path
) -> None:
    modules = sorted(
        _command_modules(services) | {"dags.retrain_model", "dags.platform_healthcheck"}
    )
    assert {"gateway", "consumers.feature_logger", "consumers.drift_monitor"} <= set(modules)
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_FROM_WHEEL, str(image_wheel), str(ROOT), *modules],
        cwd=tmp_path,
        env={**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    outside = {name: path for name, path in found.items() if not path.startswith(str(image_wheel))}
    assert not outside, outside


def test_image_wheel_carries_contracts_and_seed_data(image_wheel: Path) -> None:
    for relative in (
        "schemas/models/bikeshare.yaml",
        "schemas/jsonschema/PredictionEvent.v1.json",
        "driftloop/storage/migrations/0001_prediction_log.sql",
        "driftloop/data/bikeshare/Bikeshare.csv",
        "driftloop/data/bikeshare/ATTRIBUTION.md",
    ):
        assert (image_wheel / relative).is_file(), relative
    assert not (image_wheel / "bench").exists(), "benchmarks run from a checkout, not the image"
    entry_points = next(image_wheel.glob("driftloop-*.dist-info/entry_points.txt")).read_text()
    assert "driftloop = driftloop_tools.cli.app:app" in entry_points


def test_image_dag_folder_is_the_wheel_one() -> None:
    dockerfile = DOCKERFILE.read_text()
    assert "AIRFLOW__CORE__DAGS_FOLDER=/app/.venv/lib/python3.11/site-packages/dags" in dockerfile
