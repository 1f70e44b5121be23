"""Constrained field types shared by the events and the feature declarations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, Field, StrictInt, StringConstraints

# Identifiers end up in Kafka keys, SQL rows, object-store paths and Airflow run ids, so they
# are restricted to characters that are safe in all of them.
Identifier = Annotated[
    str, StringConstraints(strict=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
]
RequestId = Identifier
EpisodeId = Identifier
ModelName = Annotated[
    str, StringConstraints(strict=True, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
]
# MLflow registry versions start at 1.
ModelVersion = Annotated[int, Field(strict=True, ge=1)]
# MLflow run ids are uuid4 hex strings.
RunId = Annotated[str, StringConstraints(strict=True, pattern=r"^[0-9a-f]{32}$")]
MetricName = Annotated[
    str, StringConstraints(strict=True, pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
]
FeatureName = Annotated[str, StringConstraints(strict=True, pattern=r"^[a-z][a-z0-9_]{0,62}$")]
KafkaTopicName = Annotated[str, StringConstraints(strict=True, pattern=r"^[A-Za-z0-9._-]{1,249}$")]
Uri = Annotated[str, StringConstraints(strict=True, pattern=r"^[a-z][a-z0-9+.-]*://\S+$")]
NonEmptyText = Annotated[str, StringConstraints(strict=True, min_length=1)]

FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
NonNegativeFiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]
Fraction = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=1)]

# One value of one feature; None is a missing value (LightGBM treats it as NaN). Strict members
# keep booleans and numeric strings out of the feature rows.
FeatureValue = StrictInt | FiniteFloat | Annotated[str, StringConstraints(strict=True)] | None


def _as_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


# Naive datetimes are refused (their zone is a guess); aware ones are normalised to UTC.
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_as_utc)]


def utc_now() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)
