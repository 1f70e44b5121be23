"""Settings of the gateway (``GATEWAY_*``), with the Kafka and MLflow connections nested."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from driftloop.settings import KafkaSettings, MlflowSettings, ServedModelSettings

Port = Annotated[int, Field(gt=0, lt=65536)]


class GatewaySettings(ServedModelSettings):
    """The serving gateway."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_")
    cache_folder: ClassVar[str] = "gateway"

    host: str = Field(default="127.0.0.1", description="GATEWAY_HOST (default 127.0.0.1).")
    port: Port = Field(default=8000, description="GATEWAY_PORT (default 8000).")
    model_events: bool = Field(
        default=True,
        description="GATEWAY_MODEL_EVENTS: reload on ModelPromoted from model.events "
        "(default true).",
    )
    max_rows: Annotated[int, Field(ge=1, le=100_000)] = Field(
        default=1000, description="GATEWAY_MAX_ROWS: rows in one /predict request (default 1000)."
    )
    max_body_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=1_048_576,
        description="GATEWAY_MAX_BODY_BYTES: larger request bodies get 413 (default 1048576).",
    )
    keep_alive_seconds: Annotated[int, Field(ge=1)] = Field(
        default=75,
        description="GATEWAY_KEEP_ALIVE_SECONDS: idle time before the gateway closes a kept-alive "
        "connection (default 75). Longer than clients' and load balancers' own idle timeouts "
        "(httpx 5 s, AWS ALB 60 s), so a client never sends on a connection being closed.",
    )
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        default=(),
        description="GATEWAY_API_KEYS: comma-separated keys accepted in X-API-Key on /predict "
        "and /feedback; empty turns the check off (default empty).",
    )
    admin_token: SecretStr = Field(
        description="GATEWAY_ADMIN_TOKEN (required): bearer token of the /admin endpoints."
    )
    publish: bool = Field(
        default=True,
        description="GATEWAY_PUBLISH: publish predictions to Kafka; off only for benchmarks "
        "(default true).",
    )
    publisher_process: bool = Field(
        default=True,
        description="GATEWAY_PUBLISHER_PROCESS: publish from a relay process of its own, so "
        "Kafka's client work runs beside the gateway's event loop instead of in it; false "
        "publishes from the event loop (default true).",
    )
    spool_path: Path = Field(
        default=Path(".cache/gateway/spool.sqlite3"),
        description="GATEWAY_SPOOL_PATH: on-disk spool of events while Kafka is unreachable "
        "(default .cache/gateway/spool.sqlite3).",
    )
    spool_max_records: Annotated[int, Field(ge=1)] = Field(
        default=1_000_000,
        description="GATEWAY_SPOOL_MAX_RECORDS: spool bound; beyond it events are counted as "
        "dropped (default 1000000).",
    )
    kafka_timeout_seconds: Annotated[float, Field(gt=0)] = Field(
        default=10.0,
        description="GATEWAY_KAFKA_TIMEOUT_SECONDS: an event not acknowledged by then is "
        "spooled; also how long start waits for Kafka before serving anyway (default 10).",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(key.strip() for key in value.split(",") if key.strip())
        return value
