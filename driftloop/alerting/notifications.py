"""The webhook payload Alertmanager POSTs (and Grafana's webhook contact point, which sends the
same fields plus a few of its own), as pydantic models.

Alertmanager's format is documented with its ``webhook_config``: ``version`` "4", a group of
alerts that share ``groupLabels``, each alert with its labels, annotations, status and times.
Grafana sends ``version`` "1" with the same fields; extra fields are kept in the stored body
and ignored here.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

Labels = dict[str, str]


class AlertStatus(StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


class NotifiedAlert(BaseModel):
    """One alert of a notification."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    status: AlertStatus
    labels: Labels
    annotations: Labels = Field(default_factory=dict)
    starts_at: AwareDatetime = Field(alias="startsAt")
    # Alertmanager sends 0001-01-01T00:00:00Z while an alert fires.
    ends_at: AwareDatetime | None = Field(default=None, alias="endsAt")
    generator_url: str = Field(default="", alias="generatorURL")
    fingerprint: str = ""

    @field_validator("labels")
    @classmethod
    def _named(cls, labels: Labels) -> Labels:
        if not labels.get("alertname"):
            raise ValueError("an alert's labels must include a non-empty alertname")
        return labels

    @property
    def name(self) -> str:
        return self.labels["alertname"]

    @property
    def severity(self) -> str:
        return self.labels.get("severity", "")


class AlertNotification(BaseModel):
    """One webhook POST: a group of alerts sent together by a receiver."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    version: Annotated[str, Field(min_length=1)]
    group_key: str = Field(alias="groupKey")
    status: AlertStatus
    receiver: Annotated[str, Field(min_length=1)]
    group_labels: Labels = Field(default_factory=dict, alias="groupLabels")
    common_labels: Labels = Field(default_factory=dict, alias="commonLabels")
    common_annotations: Labels = Field(default_factory=dict, alias="commonAnnotations")
    external_url: str = Field(default="", alias="externalURL")
    truncated_alerts: Annotated[int, Field(ge=0)] = Field(default=0, alias="truncatedAlerts")
    alerts: Annotated[list[NotifiedAlert], Field(min_length=1)]


class StoredAlert(BaseModel):
    """An alert as read back from the log, with the notification that carried it."""

    model_config = ConfigDict(frozen=True)

    notification_id: int
    received_at: datetime
    receiver: str
    group_key: str
    status: AlertStatus
    alertname: str
    severity: str
    labels: Labels
    annotations: Labels
    starts_at: datetime
    ends_at: datetime | None
    fingerprint: str
