"""Settings of the native stack (``STACK_*``): where it lives, its ports and pinned versions."""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from driftloop.settings import (
    AirflowApiSettings,
    DriftloopSettings,
    KafkaSettings,
    MlflowSettings,
    ObjectStoreSettings,
    PostgresSettings,
)

Port = Annotated[int, Field(gt=0, lt=65536)]


class StackSettings(DriftloopSettings):
    """The native (no Docker) stack: one supervisord and the services it runs."""

    model_config = SettingsConfigDict(env_prefix="STACK_")

    home: Path = Field(
        default=Path(".stack"),
        description="STACK_HOME: state, data, logs and downloaded runtimes (default .stack).",
    )
    kafka_version: str = Field(default="4.1.1", description="STACK_KAFKA_VERSION (default 4.1.1).")
    kafka_controller_port: Port = Field(
        default=9093, description="STACK_KAFKA_CONTROLLER_PORT (default 9093)."
    )
    kafka_heap: str = Field(default="768m", description="STACK_KAFKA_HEAP: -Xmx (default 768m).")
    s3proxy_version: str = Field(
        default="2.6.0", description="STACK_S3PROXY_VERSION (default 2.6.0)."
    )
    prometheus_port: Port = Field(default=9090, description="STACK_PROMETHEUS_PORT (default 9090).")
    airflow_parallelism: Annotated[int, Field(ge=1, le=32)] = Field(
        default=4,
        description="STACK_AIRFLOW_PARALLELISM: LocalExecutor worker processes (default 4; "
        "Airflow's 32 would swamp 2 cores).",
    )
    airflow_worker_log_server_port: Port = Field(
        default=8793,
        description="STACK_AIRFLOW_WORKER_LOG_SERVER_PORT: the scheduler's task-log server "
        "(AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT; default 8793, Airflow's).",
    )
    airflow_triggerer_log_server_port: Port = Field(
        default=8794,
        description="STACK_AIRFLOW_TRIGGERER_LOG_SERVER_PORT: the triggerer's log server "
        "(AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT; default 8794, Airflow's).",
    )
    gateway_port: Port = Field(
        default=8000, description="STACK_GATEWAY_PORT: the gateway's HTTP port (default 8000)."
    )
    feature_logger_metrics_port: Port = Field(
        default=9101, description="STACK_FEATURE_LOGGER_METRICS_PORT (default 9101)."
    )
    batch_scorer_metrics_port: Port = Field(
        default=9102, description="STACK_BATCH_SCORER_METRICS_PORT (default 9102)."
    )
    drift_monitor_metrics_port: Port = Field(
        default=9103, description="STACK_DRIFT_MONITOR_METRICS_PORT (default 9103)."
    )
    retrain_trigger_metrics_port: Port = Field(
        default=9104, description="STACK_RETRAIN_TRIGGER_METRICS_PORT (default 9104)."
    )
    postgres_superuser: str = Field(
        default="postgres",
        description="STACK_POSTGRES_SUPERUSER: cluster owner, reached over the unix socket "
        "(default postgres).",
    )
    airflow_jwt_secret: SecretStr = Field(
        validation_alias="AIRFLOW_JWT_SECRET",
        description="AIRFLOW_JWT_SECRET (required): signs the tokens every Airflow component "
        "shares.",
    )
    airflow_fernet_key: SecretStr = Field(
        validation_alias="AIRFLOW_FERNET_KEY",
        description="AIRFLOW_FERNET_KEY (required): encrypts Airflow connections.",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    s3: ObjectStoreSettings = Field(default_factory=ObjectStoreSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    airflow: AirflowApiSettings = Field(default_factory=AirflowApiSettings)

    @property
    def root(self) -> Path:
        """Absolute state folder."""
        return self.home.resolve()

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def runtimes(self) -> Path:
        """Downloaded runtimes (Kafka and S3Proxy jars), kept apart from data."""
        return self.root / "opt"

    @property
    def run(self) -> Path:
        """Sockets, pid files and generated configuration."""
        return self.root / "run"

    @property
    def postgres_root(self) -> Path:
        """Where the PostgreSQL cluster and its socket live.

        PostgreSQL refuses to run as root, so as root it runs as ``postgres_superuser``, which
        must be able to reach its folders. Inside the stack folder when every parent folder
        lets it through; otherwise (a checkout under a private folder, as CI's may be) in a
        folder of that user's home named after this stack, so two checkouts never share one.
        """
        inside = self.data / "postgres-cluster"
        if os.geteuid() != 0 or _others_can_traverse(self.root):
            return inside
        home = Path(pwd.getpwnam(self.postgres_superuser).pw_dir)
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return home / f"driftloop-{digest}"

    @property
    def postgres_data(self) -> Path:
        return self.postgres_root / "data"

    @property
    def postgres_socket_dir(self) -> Path:
        return self.postgres_root / "run"


def _others_can_traverse(folder: Path) -> bool:
    return all(parent.stat().st_mode & stat.S_IXOTH for parent in (folder, *folder.parents))
