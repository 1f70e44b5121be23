"""Settings of the alert receiver (``ALERT_RECEIVER_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from driftloop.settings import DriftloopSettings


class AlertReceiverSettings(DriftloopSettings):
    """The webhook receiver Alertmanager (and Grafana, under compose) notify."""

    model_config = SettingsConfigDict(env_prefix="ALERT_RECEIVER_")

    host: str = Field(
        default="127.0.0.1", description="ALERT_RECEIVER_HOST: bind address (default 127.0.0.1)."
    )
    port: Annotated[int, Field(gt=0, lt=65536)] = Field(
        default=9099, description="ALERT_RECEIVER_PORT: HTTP port (default 9099)."
    )
    store_path: Path = Field(
        default=Path(".cache/alert-receiver/notifications.sqlite3"),
        description="ALERT_RECEIVER_STORE_PATH: the SQLite file every notification is written "
        "to before it is acknowledged (default .cache/alert-receiver/notifications.sqlite3; "
        "the native stack puts it in its data folder).",
    )
    max_body_bytes: Annotated[int, Field(ge=1024)] = Field(
        default=4 * 2**20,
        description="ALERT_RECEIVER_MAX_BODY_BYTES: larger notifications are refused with 413 "
        "(default 4 MiB; Alertmanager sends every alert of a group in one body).",
    )
