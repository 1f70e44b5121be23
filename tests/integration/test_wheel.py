"""The built wheel, installed in a clean venv outside the checkout, runs the platform.

This is what the Docker image holds (docker/Dockerfile installs the same wheel with the same
locked dependencies), tested where no Docker engine exists: the wheel is built, installed with
the pins of uv.lock into a fresh venv in a temporary folder, and every command below runs from
that venv with the temporary folder as working directory, so nothing can be imported from the
checkout. Against the real native stack it registers the first model with the data inside the
wheel (the compose bootstrap job's command), answers the CLI, imports the DAG folder from
site-packages with Airflow's DagBag, starts the gateway (``python -m gateway``) and the
feature-logger, and sees one prediction land in Postgres.

A pytest test rather than a CI script: it runs inside ``make test`` while the stack that
``make test`` started is up, and it reuses the suite's settings, polling and process helpers.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from driftloop.events import kafka
from driftloop.settings import KafkaSettings, PostgresSettings
from gateway.contract import example_row
from schemas.features import load_feature_spec
from schemas.topics import Topic
from tests.integration.consumer_support import REPOSITORY, eventually, free_port

pytestmark = pytest.mark.integration

# Every deployable the image runs, imported by the compose and Helm commands.
RUNTIME_MODULES = (
    "driftloop_tools.cli.app",
    "gateway.__main__",
    "consumers.feature_logger",
    "consumers.batch_scorer",
    "consumers.drift_monitor",
    "consumers.retrain_trigger",
    "schemas.events",
    "dags.retrain_model",
)
DAGBAG_PROBE = """
import json, pathlib
import dags
from airflow.dag_processing.dagbag import DagBag

folder = pathlib.Path(next(iter(dags.__path__)))
bag = DagBag(dag_folder=str(folder))
print(json.dumps({"folder": str(folder), "errors": bag.import_errors, "dags": sorted(bag.dag_ids)}))
"""
EXPORT = ("export", "--frozen", "--no-dev", "--no-emit-project", "--no-hashes", "-o")
IMPORT_PROBE = """
import importlib, json, sys
found = {name: importlib.import_module(name).__file__ for name in sys.argv[1:]}
print(json.dumps(found))
"""


def _run(command: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 600) -> str:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n{result.stderr[-4000:]}"
    return result.stdout


class InstalledWheel:
    """The venv holding the wheel, and the folder its processes run in."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.venv = root / "venv"
        self.workdir = root / "run"
        self.bin = self.venv / "bin"

    def environment(self, **overrides: str) -> dict[str, str]:
        # Only the venv on PATH and nothing that points back at the checkout.
        inherited = {
            key: value
            for key, value in os.environ.items()
            if key not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTEST_CURRENT_TEST"}
        }
        return {
            **inherited,
            "PATH": f"{self.bin}{os.pathsep}{inherited.get('PATH', '')}",
            "VIRTUAL_ENV": str(self.venv),
            "AIRFLOW_HOME": str(self.root / "airflow"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            **overrides,
        }

    def run(self, *command: str, **overrides: str) -> str:
        return _run(list(command), cwd=self.workdir, env=self.environment(**overrides))

    def start(self, module: str, log: Path, **overrides: str) -> subprocess.Popen[bytes]:
        """``python -m module`` from the venv, in its own process group, logging to ``log``."""
        with log.open("wb") as output:
            return subprocess.Popen(
                [str(self.bin / "python"), "-m", module],
                cwd=self.workdir,
                env=self.environment(**overrides),
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> InstalledWheel:
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("uv is not on PATH (make bootstrap installs it)")
    wheel = InstalledWheel(tmp_path_factory.mktemp("wheel"))
    dist = wheel.root / "dist"
    env = {key: value for key, value in os.environ.items() if key != "VIRTUAL_ENV"}
    _run([uv, "build", "--wheel", "--out-dir", str(dist)], cwd=REPOSITORY, env=env)
    built = sorted(dist.glob("driftloop-*.whl"))
    assert len(built) == 1, built
    # The Dockerfile's dependency set: uv.lock without the dev group, exactly pinned.
    requirements = wheel.root / "requirements.txt"
    _run(
        [uv, *EXPORT, str(requirements)],
        cwd=REPOSITORY,
        env=env,
    )
    _run([uv, "venv", "--python", sys.executable, str(wheel.venv)], cwd=wheel.root, env=env)
    python = str(wheel.bin / "python")
    _run(
        [uv, "pip", "install", "--python", python, "-r", str(requirements), str(built[0])],
        cwd=wheel.root,
        env=env,
    )
    wheel.workdir.mkdir()
    # The settings a deployment passes as env_file: the checkout's .env (`make env`).
    if (REPOSITORY / ".env").is_file():
        shutil.copy(REPOSITORY / ".env", wheel.workdir / ".env")
    return wheel


def test_modules_come_from_site_packages(installed_wheel: InstalledWheel) -> None:
    found = json.loads(
        installed_wheel.run(
            str(installed_wheel.bin / "python"), "-c", IMPORT_PROBE, *RUNTIME_MODULES
        )
    )
    site_packages = str(installed_wheel.venv / "lib")
    outside = {name: path for name, path in found.items() if not path.startswith(site_packages)}
    assert not outside, outside


def test_cli_answers(installed_wheel: InstalledWheel) -> None:
    output = installed_wheel.run("driftloop", "--help", COLUMNS="200")
    for command in ("stack", "model", "demo", "drift", "dlq", "batch"):
        assert command in output


def test_dag_folder_imports_from_site_packages(installed_wheel: InstalledWheel) -> None:
    output = installed_wheel.run(str(installed_wheel.bin / "python"), "-c", DAGBAG_PROBE)
    # Airflow logs to stdout while it fills the bag; the report is the last line.
    report = json.loads(output.strip().splitlines()[-1])
    assert report["folder"].startswith(str(installed_wheel.venv)), report["folder"]
    assert report["errors"] == {}
    assert {"retrain_model", "platform_healthcheck"} <= set(report["dags"])


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    _stop(started)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each (they drain and commit), SIGKILL what is still there after a minute."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


async def test_first_model_then_a_prediction_is_logged(
    installed_wheel: InstalledWheel,
    processes: list[subprocess.Popen[bytes]],
    kafka_settings: KafkaSettings,
    postgres_settings: PostgresSettings,
    unique: str,
) -> None:
    # Own topics, schema and model name: the stack's own services never see this traffic.
    topics = kafka_settings.model_copy(update={"topic_prefix": f"{unique}."})
    await kafka.create_topics(topics, [Topic.PREDICTIONS, Topic.LABELS, Topic.MODEL_EVENTS])
    model_name = f"wheel-{unique}"
    gateway_port = free_port()
    service_env = {
        "KAFKA_TOPIC_PREFIX": topics.topic_prefix,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(gateway_port),
        "GATEWAY_MODEL_NAME": model_name,
        "FEATURE_LOGGER_GROUP": f"feature-logger-{unique}",
        # Its own schema: migrated by this wheel's code, whatever the shared one is at.
        "FEATURE_LOGGER_DB_SCHEMA": unique,
        "FEATURE_LOGGER_METRICS_PORT": str(free_port()),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    }

    # The compose bootstrap job's command: trains on the seed data shipped in the wheel.
    output = installed_wheel.run(
        "driftloop", "model", "bootstrap", "--model-name", model_name, COLUMNS="300", **service_env
    )
    assert f"model {model_name} version 1 " in output, output

    logs = installed_wheel.root / f"logs-{unique}"
    logs.mkdir()
    for module in ("gateway", "consumers.feature_logger"):
        processes.append(installed_wheel.start(module, logs / f"{module}.log", **service_env))

    base = f"http://127.0.0.1:{gateway_port}"
    request_id = f"wheel-{unique}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:

        async def ready() -> bool:
            assert all(p.poll() is None for p in processes), _tails(logs)
            try:
                response = await client.get("/health/ready")
            except httpx.TransportError:
                return False
            return response.status_code == 200

        await eventually(ready, within=180, what="the wheel's gateway to be ready")
        spec = load_feature_spec("bikeshare")
        response = await client.post(
            "/predict", json=example_row(spec), headers={"X-Request-ID": request_id}
        )
        assert response.status_code == 200, response.text

    connection = await asyncpg.connect(postgres_settings.dsn())
    try:

        async def logged() -> bool:
            assert all(p.poll() is None for p in processes), _tails(logs)
            found = await connection.fetchval(
                f"SELECT model_name FROM {unique}.prediction_log WHERE request_id = $1",  # noqa: S608
                request_id,
            )
            return bool(found == model_name)

        await eventually(logged, within=120, what="the prediction in prediction_log")
    finally:
        await asyncio.to_thread(_stop, processes)
        await connection.execute(f"DROP SCHEMA IF EXISTS {unique} CASCADE")
        await connection.close()


def _tails(logs: Path) -> str:
    return "\n".join(
        f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
        for path in sorted(logs.glob("*.log"))
    )
