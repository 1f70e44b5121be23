"""Settings shared by every driftloop service.

Each deployable has one settings class with its own env prefix (``GATEWAY_``,
``FEATURE_LOGGER_``, ``STACK_`` …). The connections they share (Kafka, Postgres, the
object store, MLflow, Airflow) are separate classes with their own prefixes, nested into
the service settings, so ``POSTGRES_PASSWORD`` is set once for every service.

Required secrets have no default and are ``SecretStr``; outside development a placeholder
value (``changethis``) is refused at start with the variable's name.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, ClassVar, Self, TypeVar

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

S = TypeVar("S", bound="BaseSettings")

# The Fernet key shipped in .env.example: valid (Airflow needs one to start), public, dev only.
DEVELOPMENT_FERNET_KEY = "8Ls4RHNnSm5kHQ0PkQAdT8vZCbnSMn5-2rRVrR4i1bY="
PLACEHOLDER_SECRETS = frozenset(
    {"changethis", "changeme", "secret", "password", "", DEVELOPMENT_FERNET_KEY}
)


class Environment(StrEnum):
    DEVELOPMENT = "development"
    STAGING = "staging"
    PRODUCTION = "production"


class DriftloopSettings(BaseSettings):
    """Base of every settings class: reads the environment, then ``.env``."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    environment: Environment = Field(
        default=Environment.DEVELOPMENT,
        validation_alias="DRIFTLOOP_ENVIRONMENT",
        description="DRIFTLOOP_ENVIRONMENT: development, staging or production "
        "(default development).",
    )

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Self:
        if self.environment is Environment.DEVELOPMENT:
            return self
        prefix = self.model_config.get("env_prefix", "")
        for name, value in self:
            if isinstance(value, SecretStr) and value.get_secret_value() in PLACEHOLDER_SECRETS:
                variable = f"{prefix}{name}".upper()
                raise ValueError(
                    f"{variable} is a placeholder secret; set a real value "
                    f"when DRIFTLOOP_ENVIRONMENT={self.environment.value}"
                )
        return self


def _comma_separated(value: object) -> object:
    if isinstance(value, str):
        return tuple(name.strip() for name in value.split(",") if name.strip())
    return value


ModelNames = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_separated)]
"""Registered model names from a comma-separated variable; empty means every declared one."""


def chosen_models(configured: tuple[str, ...]) -> list[str]:
    """The configured models in order without repeats, else every declared registered model."""
    if configured:
        return list(dict.fromkeys(configured))
    from schemas.features import declared_specs

    return sorted({spec.registered_model_name for spec in declared_specs()})


class ServiceSettings(DriftloopSettings):
    """Base of a background service's settings: it serves Prometheus metrics on a port."""

    metrics_port: Annotated[int, Field(ge=0, lt=65536)] = Field(
        description="Prometheus /metrics port (0 picks a free port); each service sets its own "
        "default and variable."
    )


class ServedModelSettings(DriftloopSettings):
    """Base of a service that scores with a registered model: which one, and how it follows it.

    Each subclass reads these under its own prefix (``GATEWAY_MODEL_NAME``,
    ``BATCH_SCORER_MODEL_NAME``, ...) and names its cache folder.
    """

    cache_folder: ClassVar[str] = "models"

    feature_spec: str = Field(
        default="bikeshare",
        description="Feature declaration scored: a name in schemas/models or a YAML path "
        "(default bikeshare).",
    )
    model_name: str | None = Field(
        default=None,
        description="Registered model scored (default: the declaration's registered_model_name).",
    )
    model_alias: str = Field(
        default="champion", description="Registry alias scored (default champion)."
    )
    models: ModelNames = Field(
        default=(),
        description="Registered names of the declared models served beside the default one "
        "(comma-separated); empty serves every declaration, also one added while the service "
        "runs (default empty).",
    )
    model_cache_dir: Path | None = Field(
        default=None,
        description="Downloaded model versions, scored after a restart while MLflow is down "
        "(default .cache/<service>/models).",
    )
    model_poll_seconds: Annotated[float, Field(gt=0)] = Field(
        default=15.0,
        description="How often the alias is checked: the safety net behind model.events "
        "(default 15).",
    )

    def model_cache(self) -> Path:
        """The folder of downloaded model versions."""
        return self.model_cache_dir or Path(".cache") / self.cache_folder / "models"


class KafkaSettings(DriftloopSettings):
    """Kafka connection (``KAFKA_*``)."""

    model_config = SettingsConfigDict(env_prefix="KAFKA_")

    bootstrap_servers: str = Field(
        default="localhost:9092", description="KAFKA_BOOTSTRAP_SERVERS (default localhost:9092)."
    )
    client_id_prefix: str = Field(
        default="driftloop", description="KAFKA_CLIENT_ID_PREFIX (default driftloop)."
    )
    topic_prefix: str = Field(
        default="",
        description="KAFKA_TOPIC_PREFIX: prepended to every topic name (default empty; tests "
        "use a unique one).",
    )

    def topic(self, name: str) -> str:
        """Full topic name for a logical topic such as ``predictions``."""
        return f"{self.topic_prefix}{name}"


class PostgresSettings(DriftloopSettings):
    """PostgreSQL connection for the platform database (``POSTGRES_*``)."""

    model_config = SettingsConfigDict(env_prefix="POSTGRES_")

    host: str = Field(default="localhost", description="POSTGRES_HOST (default localhost).")
    port: Annotated[int, Field(gt=0, lt=65536)] = Field(
        default=5432, description="POSTGRES_PORT (default 5432)."
    )
    user: str = Field(default="driftloop", description="POSTGRES_USER (default driftloop).")
    password: SecretStr = Field(description="POSTGRES_PASSWORD (required).")
    db: str = Field(default="driftloop", description="POSTGRES_DB (default driftloop).")

    def dsn(self, database: str | None = None, *, driver: str = "postgresql") -> str:
        """Connection URL, for another database on the same server when ``database`` is given."""
        password = self.password.get_secret_value()
        return f"{driver}://{self.user}:{password}@{self.host}:{self.port}/{database or self.db}"


class ObjectStoreSettings(DriftloopSettings):
    """S3-compatible object store (``S3_*``): MinIO in compose, S3Proxy natively."""

    model_config = SettingsConfigDict(env_prefix="S3_")

    endpoint_url: str = Field(
        default="http://localhost:9000",
        description="S3_ENDPOINT_URL (default http://localhost:9000).",
    )
    region: str = Field(default="us-east-1", description="S3_REGION (default us-east-1).")
    access_key_id: str = Field(
        default="driftloop", description="S3_ACCESS_KEY_ID (default driftloop)."
    )
    secret_access_key: SecretStr = Field(description="S3_SECRET_ACCESS_KEY (required).")
    data_bucket: str = Field(
        default="driftloop-data",
        description="S3_DATA_BUCKET: feature partitions and drift reports "
        "(default driftloop-data).",
    )
    mlflow_bucket: str = Field(
        default="driftloop-mlflow",
        description="S3_MLFLOW_BUCKET: MLflow artifacts (default driftloop-mlflow).",
    )


class MlflowSettings(DriftloopSettings):
    """MLflow tracking server and registry (``MLFLOW_*``, the names MLflow itself reads)."""

    model_config = SettingsConfigDict(env_prefix="MLFLOW_")

    tracking_uri: str = Field(
        default="http://localhost:5000",
        description="MLFLOW_TRACKING_URI (default http://localhost:5000).",
    )


class AirflowApiSettings(DriftloopSettings):
    """Airflow REST API client (``AIRFLOW_API_*``)."""

    model_config = SettingsConfigDict(env_prefix="AIRFLOW_API_")

    url: str = Field(
        default="http://localhost:8080",
        description="AIRFLOW_API_URL (default http://localhost:8080).",
    )
    username: str = Field(
        default="driftloop", description="AIRFLOW_API_USERNAME (default driftloop)."
    )
    password: SecretStr = Field(description="AIRFLOW_API_PASSWORD (required).")


class SettingsError(RuntimeError):
    """A setting is missing or invalid; the message names the environment variables."""


def _env_name(settings_class: type[BaseSettings], field_name: str) -> str:
    field = settings_class.model_fields.get(field_name)
    if field is not None and isinstance(field.validation_alias, str):
        return field.validation_alias
    prefix = str(settings_class.model_config.get("env_prefix", ""))
    return f"{prefix}{field_name}".upper()


def _problems(settings_class: type[BaseSettings], error: ValidationError) -> list[str]:
    owner = _settings_classes(BaseSettings).get(error.title, settings_class)
    problems = []
    for item in error.errors():
        location = [str(part) for part in item["loc"]]
        variable = _env_name(owner, location[0]) if location else owner.__name__
        reason = "is required but not set" if item["type"] == "missing" else item["msg"]
        problems.append(f"{variable} {reason}")
    return problems


def _settings_classes(root: type[BaseSettings]) -> dict[str, type[BaseSettings]]:
    found: dict[str, type[BaseSettings]] = {}
    pending: list[type[BaseSettings]] = [root]
    while pending:
        current = pending.pop()
        found[current.__name__] = current
        pending.extend(current.__subclasses__())
    return found


def load_settings(settings_class: type[S]) -> S:
    """Instantiate settings, reporting every missing or invalid variable in one message."""
    problems: list[str] = []
    placeholders: dict[str, Any] = {}
    # Nested connection settings are validated on their own first, so one missing
    # POSTGRES_PASSWORD does not hide the service's own missing variables.
    for name, field in settings_class.model_fields.items():
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseSettings):
            try:
                nested()
            except ValidationError as error:
                problems += _problems(nested, error)
                placeholders[name] = nested.model_construct()
    try:
        settings = settings_class(**placeholders)
    except ValidationError as error:
        problems += _problems(settings_class, error)
    if problems:
        raise SettingsError(
            f"invalid configuration for {settings_class.__name__}: "
            + "; ".join(dict.fromkeys(problems))
        )
    return settings
