"""The hot store's rules: partition days and names, expiry at the horizon, declared retention."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from driftloop.storage.hot_store import (
    day_of_partition,
    days_ahead,
    expired_days,
    hot_retention,
    partition_day,
    partition_name,
)
from driftloop_tools.cli.app import app
from schemas.features import DEFAULT_HOT_RETENTION, FeatureSpec, load_feature_spec

pytestmark = pytest.mark.unit


def test_a_row_belongs_to_its_utc_day() -> None:
    assert partition_day(datetime(2026, 3, 10, 0, 0, tzinfo=UTC)) == date(2026, 3, 10)
    assert partition_day(datetime(2026, 3, 9, 23, 59, 59, 999999, tzinfo=UTC)) == date(2026, 3, 9)
    # 01:30 in UTC+2 is 23:30 the day before in UTC.
    plus_two = timezone(timedelta(hours=2))
    assert partition_day(datetime(2026, 3, 10, 1, 30, tzinfo=plus_two)) == date(2026, 3, 9)
    with pytest.raises(ValueError, match="no timezone"):
        partition_day(datetime(2026, 3, 10))  # noqa: DTZ001 - the refused case


def test_partition_names_round_trip_and_foreign_names_are_ignored() -> None:
    assert partition_name("prediction_log", date(2026, 3, 9)) == "prediction_log_p20260309"
    assert day_of_partition("labels_p20260309") == date(2026, 3, 9)
    assert day_of_partition("labels_archive") is None
    assert day_of_partition("other_p20260309") is None
    with pytest.raises(ValueError, match="not a partitioned table"):
        partition_name("drift_runs", date(2026, 3, 9))


def test_only_days_wholly_before_the_horizon_expire() -> None:
    now = datetime(2026, 3, 20, 15, 30, tzinfo=UTC)
    days = [date(2026, 3, day) for day in range(10, 22)]
    # Horizon 2026-03-13 15:30: the 13th holds rows after it and stays.
    assert expired_days(days, now=now, retention=timedelta(days=7)) == [
        date(2026, 3, 10),
        date(2026, 3, 11),
        date(2026, 3, 12),
    ]
    # A day ending exactly at the horizon has nothing inside the window.
    midnight = datetime(2026, 3, 20, tzinfo=UTC)
    assert date(2026, 3, 12) in expired_days(days, now=midnight, retention=timedelta(days=7))
    assert date(2026, 3, 13) not in expired_days(days, now=midnight, retention=timedelta(days=7))


def test_partitions_are_made_for_today_and_the_days_ahead() -> None:
    now = datetime(2026, 12, 30, 23, 0, tzinfo=UTC)
    assert days_ahead(now=now, ahead=2) == [
        date(2026, 12, 30),
        date(2026, 12, 31),
        date(2027, 1, 1),
    ]
    assert days_ahead(now=now, ahead=0) == [date(2026, 12, 30)]


def _spec(**retention: Any) -> FeatureSpec:
    document = load_feature_spec("bikeshare").model_dump(mode="json")
    document["retention"] = retention
    return FeatureSpec.model_validate(document)


def test_the_longest_declared_retention_keeps_the_shared_partitions() -> None:
    assert load_feature_spec("bikeshare").retention.hot == timedelta(days=14)
    assert _spec().retention.hot == DEFAULT_HOT_RETENTION
    specs = [_spec(hot="P3D"), _spec(hot="P30D"), _spec()]
    assert hot_retention(specs) == timedelta(days=30)
    assert hot_retention([]) == DEFAULT_HOT_RETENTION


def test_a_retention_shorter_than_a_partition_is_refused() -> None:
    with pytest.raises(ValidationError, match="retention"):
        _spec(hot="PT6H")


def test_the_cli_refuses_a_bad_retention_before_touching_the_database() -> None:
    result = CliRunner().invoke(app, ["storage", "maintain", "--retention", "two weeks"])
    assert result.exit_code == 2
    assert "ISO-8601 duration" in result.output
    result = CliRunner().invoke(app, ["storage", "maintain", "--retention", "PT1H"])
    assert result.exit_code == 2
    assert "at least one day" in result.output
