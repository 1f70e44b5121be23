"""Kafka events: wire round trips, strict decoding, dead-letter reasons, invariants."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import RFC_4122, UUID

import orjson
import pytest
from pydantic import ValidationError

from schemas.events import (
    ENVELOPE_FIELDS,
    EVENT_CLASSES,
    TOPIC_EVENTS,
    ChallengerShadowed,
    DeadLetter,
    DriftDetected,
    Event,
    EventDecodeError,
    FailureKind,
    GroundTruth,
    ModelPromoted,
    ModelRejected,
    ModelRolledBack,
    PredictionEvent,
    ScoringRequest,
    ScoringResult,
    decode_event,
    decode_model_event,
    uuid4_text,
)
from schemas.generate import JSON_SCHEMA_DIR, schema_file_name
from schemas.topics import Topic

pytestmark = pytest.mark.unit

HOUR = datetime(2011, 7, 1, 13, tzinfo=UTC)
RUN_ID = "5c1f0e6b2a9d4c8e9f7a1b2c3d4e5f60"
FEATURES: dict[str, int | float | str | None] = {
    "season": 3,
    "mnth": "July",
    "hr": 13,
    "weathersit": "clear",
    "temp": 0.8,
    "hum": None,
}


def sample_events() -> dict[type[Event], Event]:
    """One valid instance of every event."""
    events: list[Event] = [
        PredictionEvent(
            request_id="req-1",
            model_name="bikeshare",
            model_version=3,
            run_id=RUN_ID,
            features=FEATURES,
            prediction=187.5,
            latency_ms=1.25,
            source="http",
            occurred_at=HOUR,
        ),
        ScoringRequest(request_id="req-2", features=FEATURES, batch_id="batch-7"),
        ScoringResult(
            request_id="req-2",
            batch_id="batch-7",
            model_name="bikeshare",
            model_version=3,
            prediction=12.0,
        ),
        GroundTruth(request_id="req-1", label=190, observed_at=HOUR + timedelta(hours=1)),
        DriftDetected(
            model_name="bikeshare",
            model_version=3,
            episode_id="bikeshare-3-20110701T1200",
            window_start=HOUR - timedelta(hours=6),
            window_end=HOUR,
            window_rows=360,
            drift_share=0.75,
            drifted_features=("temp", "atemp", "hum"),
            prediction_drifted=True,
            report_uri="s3://driftloop-data/reports/bikeshare/20110701T1300.json",
        ),
        ModelPromoted(
            model_name="bikeshare",
            model_version=4,
            run_id=RUN_ID,
            champion_version=3,
            metric_name="rmse",
            greater_is_better=False,
            challenger_score=41.2,
            champion_score=63.9,
            episode_id="bikeshare-3-20110701T1200",
        ),
        ModelRejected(
            model_name="bikeshare",
            model_version=5,
            run_id=RUN_ID,
            champion_version=4,
            metric_name="rmse",
            greater_is_better=False,
            challenger_score=44.0,
            champion_score=41.2,
            reason="challenger rmse 44.0 is not below champion rmse 41.2",
        ),
        ChallengerShadowed(
            model_name="bikeshare",
            model_version=6,
            run_id=RUN_ID,
            champion_version=4,
            metric_name="rmse",
            greater_is_better=False,
            challenger_score=39.0,
            champion_score=41.2,
        ),
        ModelRolledBack(
            model_name="bikeshare",
            model_version=3,
            run_id=RUN_ID,
            champion_version=4,
            metric_name="rmse",
            greater_is_better=False,
            challenger_score=40.1,
            champion_score=52.7,
            reason="v4 served rmse 52.7 on its first 200 labelled rows, v3 in shadow 40.1",
            live_rows=200,
        ),
        DeadLetter(
            original_value=b"\xff\xfe not json",
            original_key=b"req-9",
            failure=FailureKind.INVALID_JSON,
            reason="not valid JSON: unexpected character",
            source_topic="predictions",
            source_partition=2,
            source_offset=41,
            consumer_group="feature-logger",
        ),
    ]
    return {type(event): event for event in events}


SAMPLES = sample_events()


def wire(event: Event, **changes: Any) -> bytes:
    """The event's JSON with some keys replaced (or removed when the value is ...)."""
    payload = orjson.loads(event.to_bytes())
    for key, value in changes.items():
        if value is ...:
            del payload[key]
        else:
            payload[key] = value
    return orjson.dumps(payload)


def test_every_event_has_a_sample() -> None:
    assert set(SAMPLES) == set(EVENT_CLASSES)


@pytest.mark.parametrize("event_class", EVENT_CLASSES, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("microsecond", [0, 1, 250_000])
def test_fast_encoding_is_pydantics_json(event_class: type[Event], microsecond: int) -> None:
    event = SAMPLES[event_class].model_copy(
        update={"occurred_at": datetime(2011, 7, 1, 13, 5, 7, microsecond, tzinfo=UTC)}
    )
    assert event.to_bytes() == orjson.dumps(event.model_dump(mode="json"))


@pytest.mark.parametrize("event_class", [PredictionEvent, ScoringResult], ids=lambda c: c.__name__)
def test_trusted_encoding_decodes_strictly(event_class: type[Event]) -> None:
    sample = SAMPLES[event_class]
    body = {name: value for name, value in sample.__dict__.items() if name not in ENVELOPE_FIELDS}
    decoded = event_class.from_bytes(
        event_class.encode_trusted(occurred_at=sample.occurred_at, **body)
    )
    assert decoded.model_dump(exclude={"event_id"}) == sample.model_dump(exclude={"event_id"})
    assert decoded.event_id != sample.event_id
    unset = event_class.from_bytes(event_class.encode_trusted(**body))
    assert unset.occurred_at > sample.occurred_at  # stamped now


@pytest.mark.parametrize("event_class", [PredictionEvent, ScoringResult], ids=lambda c: c.__name__)
def test_an_encoder_with_fixed_fields_encodes_what_encode_trusted_does(
    event_class: type[Event],
) -> None:
    sample = SAMPLES[event_class]
    body = {name: value for name, value in sample.__dict__.items() if name not in ENVELOPE_FIELDS}
    fixed = dict(list(body.items())[:2])
    encode = event_class.trusted_encoder(**fixed)
    rest = {name: value for name, value in body.items() if name not in fixed}
    spliced = orjson.loads(encode(occurred_at=sample.occurred_at, **rest))
    whole = orjson.loads(event_class.encode_trusted(occurred_at=sample.occurred_at, **body))
    assert spliced.pop("event_id") != whole.pop("event_id")
    assert spliced == whole
    decoded = event_class.from_bytes(encode(occurred_at=sample.occurred_at, **rest))
    assert decoded.model_dump(exclude={"event_id"}) == sample.model_dump(exclude={"event_id"})


@pytest.mark.parametrize("event_class", EVENT_CLASSES, ids=lambda cls: cls.__name__)
def test_round_trip(event_class: type[Event]) -> None:
    event = SAMPLES[event_class]
    raw = event.to_bytes()
    assert event_class.from_bytes(raw) == event
    assert decode_event(raw, EVENT_CLASSES) == event
    assert event_class.from_bytes(event_class.from_bytes(raw).to_bytes()) == event


@pytest.mark.parametrize("event_class", EVENT_CLASSES, ids=lambda cls: cls.__name__)
def test_wire_carries_the_envelope(event_class: type[Event]) -> None:
    payload = orjson.loads(SAMPLES[event_class].to_bytes())
    assert payload["event_type"] == event_class.EVENT_TYPE
    assert payload["schema_version"] == event_class.SCHEMA_VERSION == 1
    assert payload["occurred_at"].endswith("Z")
    assert list(payload)[:4] == ["event_type", "schema_version", "event_id", "occurred_at"]


@pytest.mark.parametrize("event_class", EVENT_CLASSES, ids=lambda cls: cls.__name__)
def test_wire_matches_the_committed_json_schema(event_class: type[Event]) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((JSON_SCHEMA_DIR / schema_file_name(event_class)).read_text())
    jsonschema.validate(orjson.loads(SAMPLES[event_class].to_bytes()), schema)


def test_event_types_are_unique() -> None:
    assert len({cls.EVENT_TYPE for cls in EVENT_CLASSES}) == len(EVENT_CLASSES)


def test_every_topic_has_its_events() -> None:
    assert set(TOPIC_EVENTS) == set(Topic)
    assert TOPIC_EVENTS[Topic.MODEL_EVENTS] == (
        ModelPromoted,
        ModelRejected,
        ChallengerShadowed,
        ModelRolledBack,
    )


def test_defaults_fill_the_envelope() -> None:
    first = ScoringRequest(request_id="a", features={})
    second = ScoringRequest(request_id="a", features={})
    assert first.event_id != second.event_id
    assert first.occurred_at.tzinfo is UTC
    assert abs(datetime.now(UTC) - first.occurred_at) < timedelta(minutes=1)


def test_events_are_frozen() -> None:
    event = GroundTruth(request_id="a", label=1.0, observed_at=HOUR)
    with pytest.raises(ValidationError, match="frozen"):
        event.label = 3.0  # type: ignore[misc]


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        GroundTruth(request_id="a", label=1.0, observed_at=HOUR, note="x")  # type: ignore[call-arg]


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        GroundTruth(request_id="a", label=1.0, observed_at=datetime(2011, 7, 1, 13))  # noqa: DTZ001


def test_aware_datetimes_are_stored_in_utc() -> None:
    eastern = timezone(timedelta(hours=-4))
    event = GroundTruth(
        request_id="a", label=1.0, observed_at=datetime(2011, 7, 1, 9, tzinfo=eastern)
    )
    assert event.observed_at == HOUR
    assert event.observed_at.utcoffset() == timedelta(0)
    assert orjson.loads(event.to_bytes())["observed_at"] == "2011-07-01T13:00:00Z"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model_version", 0),
        ("run_id", "not-a-run-id"),
        ("model_name", "has space"),
        ("request_id", ""),
        ("latency_ms", -0.5),
        ("prediction", float("nan")),
        ("prediction", float("inf")),
        ("source", "kafka"),
        ("features", {"temp": True}),
        ("features", {"temp": float("nan")}),
        ("features", {"Temp": 0.5}),
    ],
)
def test_prediction_fields_are_constrained(field: str, value: object) -> None:
    fields = SAMPLES[PredictionEvent].model_dump()
    fields[field] = value
    with pytest.raises(ValidationError):
        PredictionEvent.model_validate(fields)


def test_scoring_result_carries_a_prediction_or_an_error() -> None:
    common: dict[str, Any] = {"request_id": "r", "model_name": "bikeshare", "model_version": 1}
    assert ScoringResult(**common, error="temp: Input should be a valid number").prediction is None
    with pytest.raises(ValidationError, match="exactly one"):
        ScoringResult(**common)
    with pytest.raises(ValidationError, match="exactly one"):
        ScoringResult(**common, prediction=1.0, error="boom")


def test_scoring_result_keeps_a_batch_together() -> None:
    result = SAMPLES[ScoringResult]
    assert isinstance(result, ScoringResult)
    assert result.partition_key() == b"batch-7"
    assert result.model_copy(update={"batch_id": None}).partition_key() == b"req-2"


def test_label_follows_its_prediction_to_the_same_partition() -> None:
    assert SAMPLES[GroundTruth].partition_key() == SAMPLES[PredictionEvent].partition_key()


def test_drift_window_must_be_ordered() -> None:
    fields = SAMPLES[DriftDetected].model_dump()
    fields["window_end"] = fields["window_start"]
    with pytest.raises(ValidationError, match="window_start must be before"):
        DriftDetected.model_validate(fields)


def test_drift_share_is_a_fraction() -> None:
    fields = SAMPLES[DriftDetected].model_dump()
    fields["drift_share"] = 1.5
    with pytest.raises(ValidationError):
        DriftDetected.model_validate(fields)


def test_drifted_features_do_not_repeat() -> None:
    fields = SAMPLES[DriftDetected].model_dump()
    fields["drifted_features"] = ("temp", "temp")
    with pytest.raises(ValidationError, match="repeat"):
        DriftDetected.model_validate(fields)


def test_first_model_has_no_champion() -> None:
    fields = SAMPLES[ModelPromoted].model_dump()
    fields.update(champion_version=None, champion_score=None)
    assert ModelPromoted.model_validate(fields).champion_version is None
    fields["champion_score"] = 12.0
    with pytest.raises(ValidationError, match="both set or both null"):
        ModelPromoted.model_validate(fields)


def test_rejection_needs_a_reason() -> None:
    fields = SAMPLES[ModelRejected].model_dump()
    del fields["reason"]
    with pytest.raises(ValidationError, match="reason"):
        ModelRejected.model_validate(fields)


def test_dead_letter_keeps_any_bytes_as_base64() -> None:
    letter = SAMPLES[DeadLetter]
    assert isinstance(letter, DeadLetter)
    payload = orjson.loads(letter.to_bytes())
    assert isinstance(payload["original_value"], str)
    decoded = DeadLetter.from_bytes(letter.to_bytes())
    assert decoded.original_value == b"\xff\xfe not json"
    assert decoded.original_key == b"req-9"
    assert decoded.failed_at == letter.occurred_at
    assert decoded.partition_key() == b"predictions/2"


def test_decode_error_builds_a_dead_letter() -> None:
    raw = b"{oops"
    with pytest.raises(EventDecodeError) as caught:
        PredictionEvent.from_bytes(raw)
    letter = DeadLetter(
        original_value=raw,
        failure=caught.value.kind,
        reason=caught.value.reason,
        source_topic="predictions.dlq",
        source_partition=0,
        source_offset=0,
        consumer_group="feature-logger",
    )
    assert DeadLetter.from_bytes(letter.to_bytes()) == letter


def test_model_events_decode_to_their_type() -> None:
    promoted = decode_model_event(SAMPLES[ModelPromoted].to_bytes())
    rejected = decode_model_event(SAMPLES[ModelRejected].to_bytes())
    assert isinstance(promoted, ModelPromoted)
    assert isinstance(rejected, ModelRejected)
    assert rejected.reason.startswith("challenger")
    rolled_back = decode_model_event(SAMPLES[ModelRolledBack].to_bytes())
    assert isinstance(rolled_back, ModelRolledBack)
    assert (rolled_back.model_version, rolled_back.champion_version) == (3, 4)


def test_model_events_refuse_other_events() -> None:
    with pytest.raises(EventDecodeError) as caught:
        decode_model_event(SAMPLES[PredictionEvent].to_bytes())
    assert caught.value.kind is FailureKind.UNEXPECTED_EVENT_TYPE
    assert "model_promoted" in caught.value.reason


def test_a_concrete_class_refuses_another_event_type() -> None:
    with pytest.raises(EventDecodeError) as caught:
        GroundTruth.from_bytes(SAMPLES[PredictionEvent].to_bytes())
    assert caught.value.kind is FailureKind.UNEXPECTED_EVENT_TYPE


def test_the_base_class_does_not_decode() -> None:
    with pytest.raises(TypeError, match="decode_event"):
        Event.from_bytes(SAMPLES[GroundTruth].to_bytes())


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"{not json", FailureKind.INVALID_JSON),
        (b"", FailureKind.INVALID_JSON),
        (b'{"event_type": "ground_truth", "label": NaN}', FailureKind.INVALID_JSON),
        (b"\xff\xfe\x00", FailureKind.INVALID_JSON),
        (b"[1, 2]", FailureKind.NOT_AN_OBJECT),
        (b'"ground_truth"', FailureKind.NOT_AN_OBJECT),
    ],
)
def test_undecodable_bytes(raw: bytes, kind: FailureKind) -> None:
    with pytest.raises(EventDecodeError) as caught:
        GroundTruth.from_bytes(raw)
    assert caught.value.kind is kind
    assert str(caught.value).startswith(kind.value)


@pytest.mark.parametrize("version", [2, 0, "1", True, None, ...])
def test_unreadable_schema_version(version: object) -> None:
    raw = wire(SAMPLES[GroundTruth], schema_version=version)
    for decode in (GroundTruth.from_bytes, lambda raw: decode_event(raw, EVENT_CLASSES)):
        with pytest.raises(EventDecodeError) as caught:
            decode(raw)
        assert caught.value.kind is FailureKind.UNSUPPORTED_SCHEMA_VERSION
        assert "reads [1]" in caught.value.reason


@pytest.mark.parametrize("event_type", ["labels", None, ...])
def test_unknown_event_type(event_type: object) -> None:
    with pytest.raises(EventDecodeError) as caught:
        decode_event(wire(SAMPLES[GroundTruth], event_type=event_type), EVENT_CLASSES)
    assert caught.value.kind is FailureKind.UNEXPECTED_EVENT_TYPE


@pytest.mark.parametrize("field", ["event_id", "occurred_at"])
def test_missing_envelope_is_refused(field: str) -> None:
    with pytest.raises(EventDecodeError) as caught:
        GroundTruth.from_bytes(wire(SAMPLES[GroundTruth], **{field: ...}))
    assert caught.value.kind is FailureKind.INVALID_EVENT
    assert field in caught.value.reason


@pytest.mark.parametrize(
    ("changes", "mentioned"),
    [
        ({"request_id": ...}, "request_id: Field required"),
        ({"observed_at": "2011-07-01T13:00:00"}, "observed_at: Input should have timezone"),
        ({"occurred_at": "2011-07-01T13:00:00"}, "occurred_at: Input should have timezone"),
        ({"label": "190"}, "label: Input should be a valid number"),
        ({"event_id": "not-a-uuid"}, "event_id"),
        ({"extra": 1}, "extra: Extra inputs are not permitted"),
    ],
)
def test_invalid_events_name_the_problem(changes: dict[str, Any], mentioned: str) -> None:
    with pytest.raises(EventDecodeError) as caught:
        GroundTruth.from_bytes(wire(SAMPLES[GroundTruth], **changes))
    assert caught.value.kind is FailureKind.INVALID_EVENT
    assert mentioned in caught.value.reason


def test_strict_decoding_refuses_coercion() -> None:
    raw = wire(SAMPLES[PredictionEvent], model_version="3", features={"hr": True})
    with pytest.raises(EventDecodeError) as caught:
        PredictionEvent.from_bytes(raw)
    assert "model_version" in caught.value.reason
    assert "features.hr" in caught.value.reason


def test_long_validation_reports_are_cut() -> None:
    twelve_errors = {
        "event_id": "x",
        "occurred_at": "x",
        "request_id": 1,
        "model_name": 1,
        "model_version": "x",
        "run_id": 1,
        "features": 1,
        "prediction": "x",
        "latency_ms": "x",
        "source": 1,
        "surplus": 1,
        "another": 1,
    }
    with pytest.raises(EventDecodeError) as caught:
        PredictionEvent.from_bytes(wire(SAMPLES[PredictionEvent], **twelve_errors))
    assert caught.value.reason.startswith("invalid PredictionEvent: ")
    assert caught.value.reason.endswith("; and 2 more")


def test_uuid4_text_is_a_random_version_4_uuid() -> None:
    texts = {uuid4_text() for _ in range(1000)}
    assert len(texts) == 1000
    for text in texts:
        parsed = UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == RFC_4122
