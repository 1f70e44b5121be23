"""The native stack's generated configuration: supervisord, Kafka, S3Proxy, Airflow."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest

from driftloop_tools.stack import lifecycle
from driftloop_tools.stack.programs import (
    Program,
    airflow_environment,
    host_port,
    kafka_cluster_id,
    write_kafka_config,
    write_s3proxy_config,
)
from driftloop_tools.stack.settings import StackSettings
from driftloop_tools.stack.supervisor import render_config


@pytest.fixture
def settings(stack_env: Path, monkeypatch: pytest.MonkeyPatch) -> StackSettings:
    # Only what stack_env and this fixture set counts: no .env, no inherited variables.
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "localhost:19092")
    stack = StackSettings()
    stack.run.mkdir(parents=True)
    return stack


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("localhost:9092", ("localhost", 9092)),
        ("http://localhost:5000", ("localhost", 5000)),
        ("http://mlflow", ("mlflow", 80)),
        ("broker", ("broker", 80)),
    ],
)
def test_host_port(address: str, expected: tuple[str, int]) -> None:
    assert host_port(address, 80) == expected


def test_supervisor_config_parses_and_keeps_every_program(settings: StackSettings) -> None:
    programs = [
        Program(name="alpha", command=["/bin/echo", "100%", "a b"], environment={"X": 'q"uote'}),
        Program(name="beta", command=["/bin/true"], user="postgres", stop_signal="INT"),
    ]
    parser = configparser.RawConfigParser()
    parser.read_string(render_config(settings, programs))
    assert {"program:alpha", "program:beta", "supervisord", "unix_http_server"} <= set(
        parser.sections()
    )
    alpha = parser["program:alpha"]
    # supervisord interpolates `%`; literal ones must be doubled, spaces quoted.
    assert alpha["command"] == '/bin/echo 100%% "a b"'
    assert alpha["environment"] == 'X="q\\"uote"'
    assert alpha["autostart"] == "false"
    assert alpha["stopasgroup"] == alpha["killasgroup"] == "true"
    assert parser["program:beta"]["user"] == "postgres"
    assert parser["program:beta"]["stopsignal"] == "INT"
    assert alpha["stdout_logfile"] == str(settings.logs / "alpha.log")


def test_every_stack_program_is_rendered(settings: StackSettings) -> None:
    names = {program.name for program in lifecycle.all_programs(settings)}
    assert names == {
        "postgres",
        "kafka",
        "s3proxy",
        "prometheus",
        "alert-receiver",
        "alertmanager",
        "mlflow",
        "airflow-api-server",
        "airflow-scheduler",
        "airflow-dag-processor",
        "airflow-triggerer",
        "nginx",
        "gateway",
        "feature-logger",
        "batch-scorer",
        "drift-monitor",
        "shadow-scorer",
        "retrain-trigger",
    }


def test_kafka_config_is_a_single_kraft_node(settings: StackSettings) -> None:
    config = write_kafka_config(settings)
    values = dict(line.split("=", 1) for line in config.read_text().splitlines() if "=" in line)
    assert values["process.roles"] == "broker,controller"
    assert values["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:9093"
    assert values["auto.create.topics.enable"] == "false"
    assert values["log.dirs"] == str(settings.data / "kafka")


def test_kafka_cluster_id_is_kraft_shaped() -> None:
    cluster_id = kafka_cluster_id()
    assert len(cluster_id) == 22
    assert "=" not in cluster_id
    assert cluster_id != kafka_cluster_id()


def test_kafka_cluster_id_never_reads_as_an_option() -> None:
    # About 1 id in 64 would start with "-" and fail the storage tool's format.
    assert not any(kafka_cluster_id().startswith("-") for _ in range(5000))


def test_s3proxy_config_keeps_the_secret_private(settings: StackSettings) -> None:
    config = write_s3proxy_config(settings)
    assert "s3proxy.credential=s3-secret" in config.read_text()
    assert config.stat().st_mode & 0o077 == 0


def test_airflow_tasks_call_back_to_the_real_api_port(settings: StackSettings) -> None:
    environment = airflow_environment(settings)
    assert environment["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == (
        "http://127.0.0.1:8080/execution/"
    )
    assert environment["AIRFLOW__CORE__PARALLELISM"] == "4"
    assert environment["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
    assert environment["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@localhost:5432/airflow")
    # Task processes run the platform's code: they need its connection settings.
    assert environment["MLFLOW_TRACKING_URI"] == "http://localhost:5000"


def test_postgres_cluster_stays_inside_a_traversable_stack(settings: StackSettings) -> None:
    root = settings.postgres_root
    if root.is_relative_to(settings.root):
        assert settings.postgres_data == root / "data"
    else:
        # A private parent folder: the cluster moves to the superuser's home, per checkout.
        assert root.name.startswith("driftloop-")


def test_down_stops_the_services_before_what_they_write_to(settings: StackSettings) -> None:
    stages = lifecycle.stop_stages(settings)
    alert_delivery, services, airflow, mlflow = stages
    # Alertmanager first: the services stopping next are not outages to announce.
    assert alert_delivery == ["alertmanager"]
    assert {"gateway", "drift-monitor", "retrain-trigger"} <= set(services)
    assert all(name.startswith("airflow-") for name in airflow)
    assert mlflow == ["mlflow"]
    staged = [name for stage in stages for name in stage]
    names = {program.name for program in lifecycle.all_programs(settings)}
    # Infrastructure is left to supervisord's shutdown, after every stage.
    assert set(staged) == names - set(lifecycle.INFRASTRUCTURE)
