"""Settings of the native stack (``STACK_*``): where it lives, its ports and pinned versions."""

from __future__ import annotations

import hashlib
import os
import pwd
import stat
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, SecretStr, StringConstraints, model_validator
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
# Prometheus' and Alertmanager's duration syntax: 30s, 5m, 1h30m.
PrometheusDuration = Annotated[str, StringConstraints(pattern=r"^([0-9]+(ms|s|m|h|d|w|y))+$")]


def _unset_when_empty(value: object) -> object:
    return None if value == "" else value


# A secret that may be left empty in .env (``NAME=``): empty means not configured.
OptionalSecret = Annotated[SecretStr | None, BeforeValidator(_unset_when_empty)]
Replicas = Annotated[int, Field(ge=1, le=32)]


class ReplicaPortError(ValueError):
    """Two processes of the stack were given the same port."""


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
    alertmanager_port: Port = Field(
        default=9095,
        description="STACK_ALERTMANAGER_PORT (default 9095; Alertmanager's own 9093 is Kafka's "
        "controller here). Alertmanager's cluster (gossip) listener is switched off.",
    )
    alert_receiver_port: Port = Field(
        default=9099,
        description="STACK_ALERT_RECEIVER_PORT: the webhook receiver Alertmanager notifies "
        "(default 9099).",
    )
    alertmanager_group_wait: PrometheusDuration = Field(
        default="30s",
        description="STACK_ALERTMANAGER_GROUP_WAIT: how long a new group of alerts waits for "
        "others before its first notification (default 30s).",
    )
    alertmanager_group_interval: PrometheusDuration = Field(
        default="5m",
        description="STACK_ALERTMANAGER_GROUP_INTERVAL: how long before a group that changed "
        "(a new alert, a resolved one) is notified again (default 5m).",
    )
    alertmanager_repeat_interval: PrometheusDuration = Field(
        default="4h",
        description="STACK_ALERTMANAGER_REPEAT_INTERVAL: how often a group still firing, "
        "unchanged, is notified again (default 4h).",
    )
    alert_for_overrides: dict[str, PrometheusDuration] = Field(
        default_factory=dict,
        description="STACK_ALERT_FOR_OVERRIDES: JSON object alert name -> `for:` duration "
        'replacing the one in prometheus/rules, e.g. {"ServiceDown": "15s"} (default {}: the '
        "rules as written). An unknown alert name stops `stack up`.",
    )
    alertmanager_slack_webhook_url: OptionalSecret = Field(
        default=None,
        description="STACK_ALERTMANAGER_SLACK_WEBHOOK_URL: a Slack incoming-webhook URL; when "
        "set, every notification also goes to Slack (default unset).",
    )
    alertmanager_pagerduty_routing_key: OptionalSecret = Field(
        default=None,
        description="STACK_ALERTMANAGER_PAGERDUTY_ROUTING_KEY: a PagerDuty Events API v2 "
        "integration key; when set, every notification also goes to PagerDuty (default unset).",
    )
    airflow_parallelism: Annotated[int, Field(ge=1, le=32)] = Field(
        default=4,
        description="STACK_AIRFLOW_PARALLELISM: LocalExecutor worker processes (default 4; "
        "Airflow's 32 would swamp 2 cores).",
    )
    airflow_worker_log_server_port: Port = Field(
        default=8793,
        description="STACK_AIRFLOW_WORKER_LOG_SERVER_PORT: Airflow's task-log server "
        "(AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT; default 8793, Airflow's).",
    )
    airflow_trigger_log_server_port: Port = Field(
        default=8794,
        description="STACK_AIRFLOW_TRIGGER_LOG_SERVER_PORT: the triggerer's log server "
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
    shadow_scorer_metrics_port: Port = Field(
        default=9105, description="STACK_SHADOW_SCORER_METRICS_PORT (default 9105)."
    )
    gateway_replicas: Replicas = Field(
        default=1,
        description="STACK_GATEWAY_REPLICAS: gateway processes behind nginx (default 1).",
    )
    gateway_replica_port: Port = Field(
        default=8001,
        description="STACK_GATEWAY_REPLICA_PORT: the first gateway replica's HTTP port; nginx "
        "listens on STACK_GATEWAY_PORT and spreads requests over the replicas (default 8001).",
    )
    feature_logger_replicas: Replicas = Field(
        default=1,
        description="STACK_FEATURE_LOGGER_REPLICAS: feature-logger processes of one consumer "
        "group, at most the partitions of its topics (default 1).",
    )
    batch_scorer_replicas: Replicas = Field(
        default=1,
        description="STACK_BATCH_SCORER_REPLICAS: batch-scorer processes of one consumer group, "
        "at most the partitions of scoring.requests (default 1).",
    )
    replica_port_step: Annotated[int, Field(ge=1)] = Field(
        default=100,
        description="STACK_REPLICA_PORT_STEP: replica k listens on its service's port plus "
        "(k-1) times this step (default 100: 9101, 9201, 9301 for the feature-logger).",
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

    @model_validator(mode="after")
    def _ports_are_distinct(self) -> StackSettings:
        owners: dict[int, str] = {}
        for name, port in self.listening_ports().items():
            if port in owners:
                raise ReplicaPortError(
                    f"{name} and {owners[port]} would both listen on port {port}; change "
                    "STACK_REPLICA_PORT_STEP or the services' ports"
                )
            owners[port] = name
        return self

    def replica_ports(self, first_port: int, replicas: int) -> list[int]:
        """The ports of a service's replicas: the first one's, then one step further each."""
        ports = [first_port + index * self.replica_port_step for index in range(replicas)]
        if ports[-1] >= 65536:
            raise ReplicaPortError(f"replica port {ports[-1]} is beyond 65535")
        return ports

    @property
    def gateway_replica_ports(self) -> list[int]:
        return self.replica_ports(self.gateway_replica_port, self.gateway_replicas)

    @property
    def feature_logger_metrics_ports(self) -> list[int]:
        return self.replica_ports(self.feature_logger_metrics_port, self.feature_logger_replicas)

    @property
    def batch_scorer_metrics_ports(self) -> list[int]:
        return self.replica_ports(self.batch_scorer_metrics_port, self.batch_scorer_replicas)

    def listening_ports(self) -> dict[str, int]:
        """Every localhost port the platform's processes and Prometheus listen on, by owner."""
        ports = {
            "prometheus": self.prometheus_port,
            "kafka controller": self.kafka_controller_port,
            "airflow worker log server": self.airflow_worker_log_server_port,
            "airflow trigger log server": self.airflow_trigger_log_server_port,
            "nginx (STACK_GATEWAY_PORT)": self.gateway_port,
            "drift-monitor metrics": self.drift_monitor_metrics_port,
            "retrain-trigger metrics": self.retrain_trigger_metrics_port,
            "shadow-scorer metrics": self.shadow_scorer_metrics_port,
        }
        replicated = {
            "gateway": self.gateway_replica_ports,
            "feature-logger metrics": self.feature_logger_metrics_ports,
            "batch-scorer metrics": self.batch_scorer_metrics_ports,
        }
        for service, service_ports in replicated.items():
            for index, port in enumerate(service_ports, start=1):
                ports[f"{service} replica {index}"] = port
        return ports

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
