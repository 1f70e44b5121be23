"""The processes of the native stack, as supervisord programs, and their configuration files."""

from __future__ import annotations

import base64
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import orjson

from driftloop_tools.stack.settings import StackSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class Program:
    """One long-running process under supervisord."""

    name: str
    command: list[str]
    environment: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    directory: Path | None = None
    stop_signal: str = "TERM"
    stop_wait_seconds: int = 30


def host_port(address: str, default_port: int) -> tuple[str, int]:
    """Host and port of ``host:port`` or of a URL."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    return parts.hostname or "localhost", parts.port or default_port


def venv_bin(name: str) -> str:
    """A console script of this virtualenv (airflow, mlflow), falling back to PATH."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed in this environment; run `uv sync`")
    return found


def postgres_bindir() -> Path:
    """Folder of the Debian PostgreSQL server binaries (the newest major version installed)."""
    majors = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda path: int(path.parent.parent.name),
    )
    if not majors:
        raise FileNotFoundError("PostgreSQL server is not installed (Debian package postgresql)")
    return majors[-1].parent


def runs_as_root() -> bool:
    return os.geteuid() == 0


def _java_options(heap: str) -> list[str]:
    return [f"-Xmx{heap}", "-Xms128m", "-XX:+UseG1GC", "-XX:+ExitOnOutOfMemoryError"]


def postgres_program(settings: StackSettings) -> Program:
    data = settings.postgres_data
    return Program(
        name="postgres",
        command=[
            str(postgres_bindir() / "postgres"),
            "-D",
            str(data),
            "-c",
            f"port={settings.postgres.port}",
            "-c",
            "listen_addresses=localhost",
            "-c",
            f"unix_socket_directories={settings.postgres_socket_dir}",
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=256MB",
        ],
        # PostgreSQL refuses to run as root; the Debian package creates the postgres user.
        user=settings.postgres_superuser if runs_as_root() else None,
        # SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions, then stop.
        stop_signal="INT",
        stop_wait_seconds=60,
    )


def kafka_home(settings: StackSettings) -> Path:
    return settings.runtimes / f"kafka-{settings.kafka_version}"


def kafka_cluster_id() -> str:
    """A KRaft cluster id: a UUID in unpadded URL-safe base64, as ``kafka-storage random-uuid``.

    Like Kafka's ``Uuid.randomUuid``, never one that starts with "-": the storage tool's
    argument parser reads ``--cluster-id -abc…`` as a missing value (1 start in 64 failed).
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def write_kafka_config(settings: StackSettings) -> Path:
    _, port = host_port(settings.kafka.bootstrap_servers, 9092)
    controller = settings.kafka_controller_port
    config = settings.run / "kafka-server.properties"
    lines = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
        "advertised.listeners": f"PLAINTEXT://localhost:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(settings.data / "kafka"),
        "num.partitions": "3",
        # Topics are created explicitly (partitions, retention); a typo must not make one.
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        # One broker: no reason to wait for more group members before the first rebalance.
        "group.initial.rebalance.delay.ms": "0",
        "log.retention.hours": "168",
    }
    config.write_text("".join(f"{key}={value}\n" for key, value in lines.items()))
    log4j = settings.run / "kafka-log4j2.properties"
    log4j.write_text(
        "status = warn\n"
        "appender.console.type = Console\n"
        "appender.console.name = STDOUT\n"
        "appender.console.layout.type = PatternLayout\n"
        "appender.console.layout.pattern = [%d] %p %m (%c)%n\n"
        "rootLogger.level = INFO\n"
        "rootLogger.appenderRef.stdout.ref = STDOUT\n"
        "logger.kafka.name = kafka\n"
        "logger.kafka.level = WARN\n"
        "logger.state.name = state.change.logger\n"
        "logger.state.level = WARN\n"
    )
    return config


def kafka_java_command(settings: StackSettings, main_class: str, *args: str) -> list[str]:
    libs = kafka_home(settings) / "libs"
    return [
        "java",
        *_java_options(settings.kafka_heap),
        f"-Dlog4j2.configurationFile={settings.run / 'kafka-log4j2.properties'}",
        "-cp",
        f"{libs}/*",
        main_class,
        *args,
    ]


def kafka_program(settings: StackSettings) -> Program:
    config = settings.run / "kafka-server.properties"
    return Program(
        name="kafka",
        command=kafka_java_command(settings, "kafka.Kafka", str(config)),
        stop_wait_seconds=60,
    )


def s3proxy_jar(settings: StackSettings) -> Path:
    return (
        settings.runtimes
        / f"s3proxy-{settings.s3proxy_version}"
        / f"s3proxy-{settings.s3proxy_version}-jar-with-dependencies.jar"
    )


def write_s3proxy_config(settings: StackSettings) -> Path:
    _, port = host_port(settings.s3.endpoint_url, 9000)
    secret = settings.s3.secret_access_key.get_secret_value()
    config = settings.run / "s3proxy.properties"
    values = {
        "s3proxy.endpoint": f"http://127.0.0.1:{port}",
        "s3proxy.authorization": "aws-v2-or-v4",
        "s3proxy.identity": settings.s3.access_key_id,
        "s3proxy.credential": secret,
        "jclouds.provider": "filesystem-nio2",
        "jclouds.identity": settings.s3.access_key_id,
        "jclouds.credential": secret,
        "jclouds.filesystem.basedir": str(settings.data / "s3"),
    }
    config.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    config.chmod(0o600)
    return config


def s3proxy_program(settings: StackSettings) -> Program:
    return Program(
        name="s3proxy",
        command=[
            "java",
            *_java_options("384m"),
            "-jar",
            str(s3proxy_jar(settings)),
            "--properties",
            str(settings.run / "s3proxy.properties"),
        ],
    )


def s3_client_environment(settings: StackSettings) -> dict[str, str]:
    """What boto3 inside MLflow needs to reach the object store."""
    return {
        "MLFLOW_S3_ENDPOINT_URL": settings.s3.endpoint_url,
        "AWS_ACCESS_KEY_ID": settings.s3.access_key_id,
        "AWS_SECRET_ACCESS_KEY": settings.s3.secret_access_key.get_secret_value(),
        "AWS_DEFAULT_REGION": settings.s3.region,
        # Recent botocore sends CRC trailers by default; S3-compatible servers (S3Proxy,
        # older MinIO) answer NotImplemented to them.
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    }


def mlflow_program(settings: StackSettings) -> Program:
    _, port = host_port(settings.mlflow.tracking_uri, 5000)
    return Program(
        name="mlflow",
        command=[
            venv_bin("mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            settings.postgres.dsn("mlflow", driver="postgresql+psycopg2"),
            "--artifacts-destination",
            f"s3://{settings.s3.mlflow_bucket}",
            "--serve-artifacts",
            "--workers",
            "2",
        ],
        environment={
            **s3_client_environment(settings),
            # The job runner serves MLflow's GenAI jobs with seven ~250 MB worker processes;
            # driftloop runs none of them.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        },
    )


# Every process that talks to MLflow as a client. The telemetry thread of MLflow 3.17 removes
# its session variable from the environment while requests read it (a KeyError failed a
# retrain task here); progress bars only clutter service and task logs.
MLFLOW_CLIENT_ENVIRONMENT: Final = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def platform_environment(settings: StackSettings) -> dict[str, str]:
    """Connection settings of the platform, for processes that run its code (Airflow tasks)."""
    return {
        **MLFLOW_CLIENT_ENVIRONMENT,
        "DRIFTLOOP_ENVIRONMENT": settings.environment.value,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "KAFKA_TOPIC_PREFIX": settings.kafka.topic_prefix,
        "POSTGRES_HOST": settings.postgres.host,
        "POSTGRES_PORT": str(settings.postgres.port),
        "POSTGRES_USER": settings.postgres.user,
        "POSTGRES_PASSWORD": settings.postgres.password.get_secret_value(),
        "POSTGRES_DB": settings.postgres.db,
        "S3_ENDPOINT_URL": settings.s3.endpoint_url,
        "S3_REGION": settings.s3.region,
        "S3_ACCESS_KEY_ID": settings.s3.access_key_id,
        "S3_SECRET_ACCESS_KEY": settings.s3.secret_access_key.get_secret_value(),
        "S3_DATA_BUCKET": settings.s3.data_bucket,
        "S3_MLFLOW_BUCKET": settings.s3.mlflow_bucket,
        "MLFLOW_TRACKING_URI": settings.mlflow.tracking_uri,
    }


def airflow_home(settings: StackSettings) -> Path:
    return settings.root / "airflow"


def airflow_environment(settings: StackSettings) -> dict[str, str]:
    _, api_port = host_port(settings.airflow.url, 8080)
    home = airflow_home(settings)
    return {
        **platform_environment(settings),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": str(settings.airflow_parallelism),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__FERNET_KEY": settings.airflow_fernet_key.get_secret_value(),
        # Task processes report back to the api-server; its real port, or every task fails.
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{settings.airflow.username}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        "AIRFLOW__API_AUTH__JWT_SECRET": settings.airflow_jwt_secret.get_secret_value(),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}/",
        # Workers give the api-server 5 s by default; on a loaded 2-core machine its first
        # execution-API call (lazy imports) has been seen to take far longer, failing the task.
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "60",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": settings.postgres.dsn(
            "airflow", driver="postgresql+psycopg2"
        ),
        # New DAG files are picked up within seconds instead of Airflow's default 5 minutes.
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "10",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(settings.logs / "airflow"),
        # Fixed by Airflow unless set: two stacks on one machine would fight over them.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(settings.airflow_worker_log_server_port),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(settings.airflow_trigger_log_server_port),
        "AIRFLOW__LOGGING__DAG_PROCESSOR_CHILD_PROCESS_LOG_DIRECTORY": str(
            settings.logs / "airflow" / "dag_processor"
        ),
        **s3_client_environment(settings),
    }


def write_airflow_passwords(settings: StackSettings) -> None:
    home = airflow_home(settings)
    home.mkdir(parents=True, exist_ok=True)
    passwords = home / "passwords.json"
    passwords.write_bytes(
        orjson.dumps({settings.airflow.username: settings.airflow.password.get_secret_value()})
    )
    passwords.chmod(0o600)


AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def airflow_programs(settings: StackSettings) -> list[Program]:
    environment = airflow_environment(settings)
    airflow = venv_bin("airflow")
    return [
        Program(
            name=f"airflow-{component}",
            command=[airflow, component],
            environment=environment,
            directory=airflow_home(settings),
            stop_wait_seconds=45,
        )
        for component in AIRFLOW_COMPONENTS
    ]


def prometheus_program(settings: StackSettings) -> Program:
    # The configuration is rendered from the settings (scrape ports) by `stack up`.
    from driftloop_tools.stack.prometheus_config import prometheus_config_path

    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    return Program(
        name="prometheus",
        command=[
            binary,
            f"--config.file={prometheus_config_path(settings)}",
            f"--storage.tsdb.path={settings.data / 'prometheus'}",
            f"--web.listen-address=127.0.0.1:{settings.prometheus_port}",
            "--web.enable-lifecycle",
            "--storage.tsdb.retention.time=15d",
        ],
    )


def alertmanager_program(settings: StackSettings) -> Program:
    # The configuration is rendered from the settings (receiver, group timings) by `stack up`.
    from driftloop_tools.stack.alertmanager_config import alertmanager_config_path

    binary = shutil.which("prometheus-alertmanager") or "/usr/bin/prometheus-alertmanager"
    address = f"127.0.0.1:{settings.alertmanager_port}"
    return Program(
        name="alertmanager",
        command=[
            binary,
            f"--config.file={alertmanager_config_path(settings)}",
            f"--storage.path={settings.data / 'alertmanager'}",
            f"--web.listen-address={address}",
            f"--web.external-url=http://{address}",
            # One Alertmanager: no gossip listener (its default, 0.0.0.0:9094, would collide
            # with a second stack on the machine).
            "--cluster.listen-address=",
        ],
    )


def alert_receiver_program(settings: StackSettings) -> Program:
    """The webhook receiver Alertmanager notifies; its log is a file of the stack's data."""
    return Program(
        name="alert-receiver",
        command=[sys.executable, "-m", "driftloop.alerting"],
        environment={
            "ALERT_RECEIVER_HOST": "127.0.0.1",
            "ALERT_RECEIVER_PORT": str(settings.alert_receiver_port),
            "ALERT_RECEIVER_STORE_PATH": str(settings.data / "alerts" / "notifications.sqlite3"),
        },
        directory=REPO_ROOT,
    )


def replica_name(service: str, index: int) -> str:
    """Replica 1 keeps the service's own program name (``supervisorctl stop feature-logger``
    means what it meant with one replica); replica k is ``<service>-k``."""
    return service if index == 1 else f"{service}-{index}"


def service_of(program_name: str) -> str:
    """The service a program belongs to: ``feature-logger-3`` -> ``feature-logger``."""
    service, _, index = program_name.rpartition("-")
    return service if service and index.isdigit() else program_name


def gateway_programs(settings: StackSettings) -> list[Program]:
    """The gateway replicas nginx spreads requests over, each on its own port.

    Replica 1 keeps the gateway's configured spool and model cache (``GATEWAY_SPOOL_PATH``,
    ``GATEWAY_MODEL_CACHE_DIR``), so a spool left by a one-gateway stack is still drained;
    replica k has its own under the stack's data folder: two gateways never share a spool
    (the spool refuses a second writer anyway) and never race on one cache's pointer file.
    """
    programs = []
    for index, port in enumerate(settings.gateway_replica_ports, start=1):
        environment = {
            **MLFLOW_CLIENT_ENVIRONMENT,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
        }
        if index > 1:
            own = settings.data / f"gateway-{index}"
            environment["GATEWAY_SPOOL_PATH"] = str(own / "spool.sqlite3")
            environment["GATEWAY_MODEL_CACHE_DIR"] = str(own / "models")
        programs.append(
            Program(
                name=replica_name("gateway", index),
                command=[sys.executable, "-m", "gateway"],
                environment=environment,
                directory=REPO_ROOT,
            )
        )
    return programs


def feature_logger_programs(settings: StackSettings) -> list[Program]:
    """One consumer group; Kafka gives each replica its share of the partitions."""
    return [
        Program(
            name=replica_name("feature-logger", index),
            command=[sys.executable, "-m", "consumers.feature_logger"],
            environment={"FEATURE_LOGGER_METRICS_PORT": str(port)},
            directory=REPO_ROOT,
            stop_wait_seconds=60,
        )
        for index, port in enumerate(settings.feature_logger_metrics_ports, start=1)
    ]


def batch_scorer_programs(settings: StackSettings) -> list[Program]:
    """One consumer group; replica k > 1 caches its models apart, as the gateways do."""
    programs = []
    for index, port in enumerate(settings.batch_scorer_metrics_ports, start=1):
        environment = {**MLFLOW_CLIENT_ENVIRONMENT, "BATCH_SCORER_METRICS_PORT": str(port)}
        if index > 1:
            environment["BATCH_SCORER_MODEL_CACHE_DIR"] = str(
                settings.data / f"batch-scorer-{index}" / "models"
            )
        programs.append(
            Program(
                name=replica_name("batch-scorer", index),
                command=[sys.executable, "-m", "consumers.batch_scorer"],
                environment=environment,
                directory=REPO_ROOT,
                stop_wait_seconds=60,
            )
        )
    return programs


def platform_programs(settings: StackSettings) -> list[Program]:
    """The platform's own services; the stack assigns their ports, as compose does."""
    # Imported here: nginx's module renders from these programs' ports.
    from driftloop_tools.stack.nginx import nginx_program

    python = sys.executable
    return [
        nginx_program(settings),
        *gateway_programs(settings),
        *feature_logger_programs(settings),
        *batch_scorer_programs(settings),
        Program(
            name="drift-monitor",
            command=[python, "-m", "consumers.drift_monitor"],
            environment={
                **MLFLOW_CLIENT_ENVIRONMENT,
                "DRIFT_MONITOR_METRICS_PORT": str(settings.drift_monitor_metrics_port),
            },
            directory=REPO_ROOT,
            stop_wait_seconds=60,
        ),
        Program(
            # One group; the live judge runs in one replica at a time (an advisory lock).
            name="shadow-scorer",
            command=[python, "-m", "consumers.shadow_scorer"],
            environment={
                **MLFLOW_CLIENT_ENVIRONMENT,
                "SHADOW_SCORER_METRICS_PORT": str(settings.shadow_scorer_metrics_port),
            },
            directory=REPO_ROOT,
            stop_wait_seconds=60,
        ),
        Program(
            name="retrain-trigger",
            command=[python, "-m", "consumers.retrain_trigger"],
            environment={
                "RETRAIN_TRIGGER_METRICS_PORT": str(settings.retrain_trigger_metrics_port)
            },
            directory=REPO_ROOT,
        ),
    ]
