"""Versioned Kafka events: one frozen model per message type, with its wire encoding.

Every message value is UTF-8 JSON of one event. The envelope (``event_type``,
``schema_version``, ``event_id``, ``occurred_at``) is always on the wire; producers may leave
it to its defaults. A consumer decodes with ``<Event>.from_bytes`` or ``decode_event`` and
turns an ``EventDecodeError`` into a ``DeadLetter``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from enum import StrEnum
from random import getrandbits
from types import MappingProxyType
from typing import (
    Annotated,
    Any,
    ClassVar,
    Final,
    Literal,
    Protocol,
    Self,
    TypeAlias,
    TypeVar,
    cast,
)
from uuid import UUID, uuid4

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict
from pydantic_core import PydanticUndefined

from schemas.fields import (
    EpisodeId,
    FeatureName,
    FeatureValue,
    FiniteFloat,
    Fraction,
    Identifier,
    KafkaTopicName,
    MetricName,
    ModelName,
    ModelVersion,
    NonEmptyText,
    NonNegativeFiniteFloat,
    RequestId,
    RunId,
    Uri,
    UtcDatetime,
    utc_now,
)
from schemas.topics import Topic
from schemas.validation import describe, problems_of

ENVELOPE_FIELDS: Final = ("event_type", "schema_version", "event_id", "occurred_at")
_ENVELOPE: Final = frozenset(ENVELOPE_FIELDS)
# A validation report names at most this many errors, so a dead letter's reason stays readable.
_MAX_REPORTED_ERRORS: Final = 10

NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
PositiveInt = Annotated[int, Field(strict=True, ge=1)]
ConsumerGroup = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=255)]
PredictionSource: TypeAlias = Literal["http", "batch"]


class FailureKind(StrEnum):
    """Why a message could not be handled: the class of a dead letter (a metrics label)."""

    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    UNEXPECTED_EVENT_TYPE = "unexpected_event_type"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    INVALID_EVENT = "invalid_event"
    PROCESSING_ERROR = "processing_error"


class EventDecodeError(ValueError):
    """Bytes that are not a valid event; consumers dead-letter them with ``kind`` and ``reason``."""

    def __init__(self, kind: FailureKind, reason: str) -> None:
        super().__init__(f"{kind.value}: {reason}")
        self.kind = kind
        self.reason = reason


def _require_envelope(schema: JsonDict) -> None:
    # The envelope has defaults for producers' convenience only: it is always serialised and
    # decoding refuses a message without it, so the published contract requires it.
    required = schema.get("required")
    body = (
        [name for name in required if name not in ENVELOPE_FIELDS]
        if isinstance(required, list)
        else []
    )
    schema["required"] = [*ENVELOPE_FIELDS, *body]


def uuid4_text() -> str:
    """A random (version 4) UUID in its canonical text, without building a ``UUID`` object.

    The hot encoders write one per event. Its 122 random bits come from the ``random``
    module's generator, seeded from the operating system and again in every forked child:
    an event id must be unique, not unguessable, and this skips ``os.urandom``'s system call;
    ``uuid.uuid4()`` and its serialisation cost about twice as much.
    """
    digits = "%032x" % ((getrandbits(128) & _UUID4_KEEP) | _UUID4_SET)
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


# The version (4) and the RFC 4122 variant (binary 10) of a 128-bit UUID, as bits to clear
# and to set.
_UUID4_KEEP: Final = ~((0xF << 76) | (0x3 << 62))
_UUID4_SET: Final = (0x4 << 76) | (0x2 << 62)


class Event(BaseModel):
    """Base of every Kafka event: the envelope and the wire encoding."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        use_attribute_docstrings=True,
        json_schema_extra=_require_envelope,
    )

    EVENT_TYPE: ClassVar[str]
    SCHEMA_VERSION: ClassVar[int]

    event_type: str
    """Discriminator: which event this message is."""
    schema_version: int
    """Version of this event's schema; consumers refuse versions they do not read."""
    event_id: UUID = Field(default_factory=uuid4)
    """Unique id of this message (not of the request or model it is about)."""
    occurred_at: UtcDatetime = Field(default_factory=utc_now)
    """When the event happened, timezone-aware UTC."""

    @field_validator("schema_version", mode="before")
    @classmethod
    def _version_is_an_integer(cls, version: object) -> object:
        # pydantic's strict Literal[1] still takes JSON `true`; a version is a number.
        if type(version) is not int:
            raise ValueError(f"schema_version must be an integer, not {version!r}")
        return version

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        event_type = cls.model_fields["event_type"].default
        schema_version = cls.model_fields["schema_version"].default
        if event_type is PydanticUndefined:
            return  # an intermediate base such as ModelDecision
        if not isinstance(event_type, str) or type(schema_version) is not int:
            raise TypeError(
                f"{cls.__name__} must give event_type and schema_version Literal defaults"
            )
        cls.EVENT_TYPE = event_type
        cls.SCHEMA_VERSION = schema_version

    @abstractmethod
    def partition_key(self) -> bytes:
        """Kafka message key: events with the same key keep their relative order."""

    def to_bytes(self) -> bytes:
        """The message value: UTF-8 JSON as described by ``schemas/jsonschema``."""
        try:
            # A flat event (strings, numbers, UUIDs, UTC datetimes, enums, dicts and lists of
            # those) is written by orjson straight from its fields, byte for byte what
            # pydantic's JSON mode gives (a unit test compares both for every event type) at a
            # fifth of the cost; nested models and bytes take pydantic's path.
            return orjson.dumps(self.__dict__, option=orjson.OPT_UTC_Z)
        except TypeError:
            return orjson.dumps(self.model_dump(mode="json"))

    @classmethod
    def encode_trusted(cls, *, occurred_at: datetime | None = None, **fields: Any) -> bytes:
        """The message value of an event built from values the caller has already checked.

        The hot paths (the gateway and the batch scorer, one event per answered row) hold
        values validated by the feature declaration or taken from the loaded model: building
        and validating the model again cost ~35 us a row, this ~7 us. Nothing is checked
        here, so each caller's unit tests decode its output with ``from_bytes`` (strict).
        """
        return orjson.dumps(
            {
                "event_type": cls.EVENT_TYPE,
                "schema_version": cls.SCHEMA_VERSION,
                "event_id": uuid4_text(),
                "occurred_at": occurred_at or utc_now(),
                **fields,
            },
            option=orjson.OPT_UTC_Z,
        )

    @classmethod
    def trusted_encoder(cls, **constant: Any) -> Callable[..., bytes]:
        """``encode_trusted`` with some fields fixed (the model that answers, the source).

        The fixed fields are encoded once, here; each call encodes only the rest and the
        envelope, and gives what ``encode_trusted`` gives with all of them (key order aside).
        The fields of a call must not repeat a fixed one.
        """
        head = (
            orjson.dumps(
                {"event_type": cls.EVENT_TYPE, "schema_version": cls.SCHEMA_VERSION, **constant}
            )[:-1]
            + b","
        )

        def encode(*, occurred_at: datetime | None = None, **fields: Any) -> bytes:
            # The call's own keyword dict takes the envelope: one dict built per event.
            fields["event_id"] = uuid4_text()
            fields["occurred_at"] = occurred_at or utc_now()
            return head + orjson.dumps(fields, option=orjson.OPT_UTC_Z)[1:]

        return encode

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        """Decode a message value of this event type, or raise ``EventDecodeError``."""
        if "EVENT_TYPE" not in vars(cls):
            raise TypeError(f"{cls.__name__} is not a concrete event; use decode_event")
        # One parse on the hot path: pydantic validates the bytes in strict JSON mode. Only a
        # message it refuses, or one that leaves an envelope field to its default, is parsed
        # again to tell which failure it is (the envelope defaults are for producers only).
        try:
            event = cls.model_validate_json(raw, strict=True)
        except ValidationError:
            pass
        else:
            if event.model_fields_set >= _ENVELOPE:
                return event
        return cls._from_payload(raw, _parse_object(raw))

    @classmethod
    def _from_payload(cls, raw: bytes, payload: Mapping[str, Any]) -> Self:
        # The envelope is checked on orjson's parse first, so a foreign event type or an
        # unreadable version gets its own failure kind (and decode_event can dispatch on it);
        # pydantic then validates the same bytes in strict JSON mode.
        event_type = payload.get("event_type")
        if event_type != cls.EVENT_TYPE:
            raise EventDecodeError(
                FailureKind.UNEXPECTED_EVENT_TYPE,
                f"event_type {event_type!r} is not {cls.EVENT_TYPE!r}",
            )
        _check_schema_version(payload, (cls.SCHEMA_VERSION,))
        missing = [name for name in ENVELOPE_FIELDS if name not in payload]
        if missing:
            raise EventDecodeError(
                FailureKind.INVALID_EVENT,
                f"{cls.EVENT_TYPE} lacks envelope field(s): {', '.join(missing)}",
            )
        try:
            # Strict JSON validation: numbers must be JSON numbers, strings JSON strings;
            # only UUIDs, datetimes and base64 bytes are read from strings.
            return cls.model_validate_json(raw, strict=True)
        except ValidationError as error:
            raise EventDecodeError(FailureKind.INVALID_EVENT, _describe(error)) from error


def _parse_object(raw: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise EventDecodeError(FailureKind.INVALID_JSON, f"not valid JSON: {error}") from error
    if not isinstance(payload, dict):
        raise EventDecodeError(
            FailureKind.NOT_AN_OBJECT, f"expected a JSON object, got {type(payload).__name__}"
        )
    return payload


def _check_schema_version(payload: Mapping[str, Any], supported: Iterable[int]) -> None:
    version = payload.get("schema_version")
    readable = sorted(supported)
    # bool is an int in Python, but `true` is not a version.
    if type(version) is not int or version not in readable:
        raise EventDecodeError(
            FailureKind.UNSUPPORTED_SCHEMA_VERSION,
            f"schema_version {version!r} of {payload.get('event_type')!r} is not readable "
            f"(this consumer reads {readable})",
        )


def _describe(error: ValidationError) -> str:
    problems = problems_of(error.errors(include_url=False), whole="<event>")
    return f"invalid {error.title}: {describe(problems, _MAX_REPORTED_ERRORS)}"


class PredictionEvent(Event):
    """One answered prediction, HTTP or batch: the lineage row of the prediction log."""

    event_type: Literal["prediction"] = "prediction"
    schema_version: Literal[1] = 1

    request_id: RequestId
    """Id of the request: the idempotency key of the prediction log and the join key of labels."""
    model_name: ModelName
    """Registered model that answered."""
    model_version: ModelVersion
    """Registry version of that model."""
    run_id: RunId
    """MLflow run that produced the model version."""
    features: dict[FeatureName, FeatureValue]
    """Feature values as accepted, missing values as null."""
    prediction: FiniteFloat
    """The model's output (the predicted value, or the positive-class probability)."""
    latency_ms: NonNegativeFiniteFloat
    """Time spent producing the answer, in milliseconds (batch: the row's share of its batch)."""
    source: PredictionSource
    """Where the request came from: the HTTP gateway or the batch scorer."""

    def partition_key(self) -> bytes:
        """Keyed by request id, like its label."""
        return self.request_id.encode()

    @classmethod
    def encoder(
        cls, *, model_name: str, model_version: int, run_id: str, source: PredictionSource
    ) -> PredictionEncoder:
        """The encoder of the events one model version answers from one source.

        Every producer of predictions (the gateway's publisher, the batch scorer) writes its
        events with it: the fields naming the model are encoded once, each row's from values
        already checked by the feature declaration (``trusted_encoder``, nothing validated).
        """
        return cast(
            "PredictionEncoder",
            cls.trusted_encoder(
                model_name=model_name, model_version=model_version, run_id=run_id, source=source
            ),
        )


class PredictionEncoder(Protocol):
    """Writes one ``PredictionEvent`` of a fixed model and source (``PredictionEvent.encoder``)."""

    def __call__(
        self,
        *,
        occurred_at: datetime | None = None,
        request_id: str,
        features: Mapping[str, FeatureValue] | orjson.Fragment,
        prediction: float,
        latency_ms: float,
    ) -> bytes:
        """The message value of the prediction of one row."""


class ScoringRequest(Event):
    """A row to score, sent to ``scoring.requests`` for the batch scorer."""

    event_type: Literal["scoring_request"] = "scoring_request"
    schema_version: Literal[1] = 1

    request_id: RequestId
    """Id of the request, echoed in its result and prediction."""
    features: dict[FeatureName, FeatureValue]
    """Feature values, missing values as null; validated against the model's declaration."""
    batch_id: Identifier | None = None
    """Correlation id echoed in the result, so a producer can collect the answers of its batch."""
    model_name: ModelName | None = None
    """Registered model to score with; null: the batch scorer's default model."""

    def partition_key(self) -> bytes:
        """Keyed by request id."""
        return self.request_id.encode()


class ScoringResult(Event):
    """The batch scorer's answer to one ``ScoringRequest``: a prediction or an error."""

    event_type: Literal["scoring_result"] = "scoring_result"
    schema_version: Literal[1] = 1

    request_id: RequestId
    """Id of the request answered."""
    batch_id: Identifier | None = None
    """The request's correlation id, echoed."""
    model_name: ModelName
    """Registered model that scored the request (the one it named, when it is not served)."""
    model_version: ModelVersion | None
    """Registry version of that model; null when no model of that name is served."""
    prediction: FiniteFloat | None = None
    """The model's output; null when ``error`` is set."""
    error: NonEmptyText | None = None
    """Why the request could not be scored; null when ``prediction`` is set."""

    @model_validator(mode="after")
    def _prediction_or_error(self) -> Self:
        if (self.prediction is None) == (self.error is None):
            raise ValueError("a scoring result carries exactly one of prediction and error")
        return self

    def partition_key(self) -> bytes:
        """Keyed by batch when there is one, so a batch's answers stay together and in order."""
        return self.key_of(self.request_id, self.batch_id)

    @staticmethod
    def key_of(request_id: str, batch_id: str | None) -> bytes:
        """The partition key of the result of ``request_id`` in ``batch_id``."""
        return (batch_id or request_id).encode()


class GroundTruth(Event):
    """The true label of an earlier prediction, joined to it by request id."""

    event_type: Literal["ground_truth"] = "ground_truth"
    schema_version: Literal[1] = 1

    request_id: RequestId
    """Id of the prediction request this label belongs to."""
    label: FiniteFloat
    """The observed target value (0/1 for a binary classification)."""
    observed_at: UtcDatetime
    """When the label was observed, timezone-aware UTC."""

    def partition_key(self) -> bytes:
        """Keyed by request id, like its prediction."""
        return self.request_id.encode()


class DriftDetected(Event):
    """The drift monitor found drift in a window of live data against the champion's reference."""

    event_type: Literal["drift_detected"] = "drift_detected"
    schema_version: Literal[1] = 1

    model_name: ModelName
    """Registered model whose traffic drifted."""
    model_version: ModelVersion
    """Champion version serving during the window."""
    episode_id: EpisodeId
    """Stable id of the drift episode: every event of one episode carries the same id."""
    window_start: UtcDatetime
    """Start of the analysed window (inclusive), UTC."""
    window_end: UtcDatetime
    """End of the analysed window (exclusive), UTC."""
    window_rows: PositiveInt
    """Number of predictions in the window."""
    drift_share: Fraction
    """Share of the monitored features that drifted, in [0, 1]."""
    drifted_features: tuple[FeatureName, ...]
    """Monitored features found drifted."""
    prediction_drifted: bool
    """Whether the distribution of the predictions drifted too."""
    quality_degraded: bool = False
    """Whether the model's error on the window's labelled rows was past what its own holdout
    allows (the window drifts then whatever ``drift_share`` says)."""
    report_uri: Uri
    """Object-store URI of the drift report (JSON for machines, HTML beside it for people)."""

    @model_validator(mode="after")
    def _window_is_ordered(self) -> Self:
        if self.window_start >= self.window_end:
            raise ValueError("window_start must be before window_end")
        if len(set(self.drifted_features)) != len(self.drifted_features):
            raise ValueError("drifted_features must not repeat a feature")
        return self

    def partition_key(self) -> bytes:
        """Keyed by model, so a model's drift events stay in order."""
        return self.model_name.encode()


class ModelDecision(Event):
    """What the retrain DAG decided about a challenger compared with the champion on one holdout."""

    model_name: ModelName
    """Registered model."""
    model_version: ModelVersion
    """Registry version of the challenger."""
    run_id: RunId
    """MLflow run that trained the challenger."""
    champion_version: ModelVersion | None
    """Champion compared with (the previous one once promoted); null when there was none."""
    metric_name: MetricName
    """Holdout metric of the comparison, e.g. ``rmse``."""
    greater_is_better: bool
    """Whether a higher metric value is better."""
    challenger_score: FiniteFloat
    """The challenger's metric on the holdout."""
    champion_score: FiniteFloat | None
    """The champion's metric on the same holdout; null when there was no champion."""
    episode_id: EpisodeId | None = None
    """Drift episode that caused the retraining; null for a manual run."""

    @model_validator(mode="after")
    def _champion_is_complete(self) -> Self:
        if (self.champion_version is None) != (self.champion_score is None):
            raise ValueError("champion_version and champion_score are both set or both null")
        return self

    def partition_key(self) -> bytes:
        """Keyed by model, so a model's decisions stay in order."""
        return self.model_name.encode()


class ModelPromoted(ModelDecision):
    """The challenger became the champion (the ``champion`` alias moved to it)."""

    event_type: Literal["model_promoted"] = "model_promoted"
    schema_version: Literal[1] = 1


class ModelRejected(ModelDecision):
    """The challenger was registered but not promoted; the champion stays."""

    event_type: Literal["model_rejected"] = "model_rejected"
    schema_version: Literal[1] = 1

    reason: NonEmptyText
    """Why the challenger was not promoted."""


class ChallengerShadowed(ModelDecision):
    """The challenger passed the holdout and waits under the alias ``challenger``, scored in
    shadow on live traffic, for live evidence (a model declared ``training.live.promotion:
    shadow``); the champion stays until the live judge promotes or rejects it."""

    event_type: Literal["challenger_shadowed"] = "challenger_shadowed"
    schema_version: Literal[1] = 1


class ModelRolledBack(ModelDecision):
    """A promotion lost on live traffic: the ``champion`` alias moved back to the version it
    replaced, whose shadow predictions beat the new champion's on the same labelled rows.

    ``model_version``/``run_id`` name the version champion again; ``champion_version`` the one
    demoted. Scores are the promotion metric on the first ``live_rows`` labelled rows the
    demoted version served: ``challenger_score`` the restored version's (scored in shadow),
    ``champion_score`` the demoted version's (served).
    """

    event_type: Literal["model_rolled_back"] = "model_rolled_back"
    schema_version: Literal[1] = 1

    reason: NonEmptyText
    """Why the promotion was undone."""
    live_rows: PositiveInt
    """Labelled rows both versions were compared on."""


class DeadLetter(Event):
    """A message a consumer could not handle, kept with its origin for inspection and replay."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    event_type: Literal["dead_letter"] = "dead_letter"
    schema_version: Literal[1] = 1

    original_value: bytes
    """The message value exactly as received (base64url in JSON)."""
    original_key: bytes | None = None
    """The message key as received (base64url in JSON), null for an unkeyed message."""
    failure: FailureKind
    """Class of the failure."""
    reason: NonEmptyText
    """What was wrong, for a person."""
    source_topic: KafkaTopicName
    """Topic the message was read from."""
    source_partition: NonNegativeInt
    """Partition the message was read from."""
    source_offset: NonNegativeInt
    """Offset of the message in that partition."""
    consumer_group: ConsumerGroup
    """Consumer group that failed to handle it."""

    @property
    def failed_at(self) -> datetime:
        """When handling failed: the dead letter's ``occurred_at``."""
        return self.occurred_at

    def partition_key(self) -> bytes:
        """Keyed by source partition, so dead letters of one partition stay in offset order."""
        return f"{self.source_topic}/{self.source_partition}".encode()


ModelEvent: TypeAlias = ModelPromoted | ModelRejected | ChallengerShadowed | ModelRolledBack
E = TypeVar("E", bound=Event)

EVENT_CLASSES: Final[tuple[type[Event], ...]] = (
    PredictionEvent,
    ScoringRequest,
    ScoringResult,
    GroundTruth,
    DriftDetected,
    ModelPromoted,
    ModelRejected,
    ChallengerShadowed,
    ModelRolledBack,
    DeadLetter,
)
MODEL_EVENTS: Final[tuple[type[ModelEvent], ...]] = (
    ModelPromoted,
    ModelRejected,
    ChallengerShadowed,
    ModelRolledBack,
)
TOPIC_EVENTS: Final[Mapping[Topic, tuple[type[Event], ...]]] = MappingProxyType(
    {
        Topic.PREDICTIONS: (PredictionEvent,),
        Topic.LABELS: (GroundTruth,),
        Topic.SCORING_REQUESTS: (ScoringRequest,),
        Topic.SCORING_RESULTS: (ScoringResult,),
        Topic.DRIFT_EVENTS: (DriftDetected,),
        Topic.MODEL_EVENTS: MODEL_EVENTS,
    }
)
"""The events each topic carries; every ``<topic>.dlq`` carries ``DeadLetter``."""


def decode_event(raw: bytes, accepted: Iterable[type[E]]) -> E:
    """Decode a message value into whichever of the ``accepted`` event classes it names."""
    candidates = tuple(accepted)
    if len(candidates) == 1:
        return candidates[0].from_bytes(raw)  # most topics carry one event type
    payload = _parse_object(raw)
    classes = {(cls.EVENT_TYPE, cls.SCHEMA_VERSION): cls for cls in candidates}
    event_type = payload.get("event_type")
    versions = [version for (name, version) in classes if name == event_type]
    if not versions:
        known = sorted({name for name, _ in classes})
        raise EventDecodeError(
            FailureKind.UNEXPECTED_EVENT_TYPE, f"event_type {event_type!r} is not one of {known}"
        )
    _check_schema_version(payload, versions)
    return classes[(payload["event_type"], payload["schema_version"])]._from_payload(raw, payload)


def decode_model_event(raw: bytes) -> ModelEvent:
    """Decode a ``model.events`` message: a promotion, a rejection, a challenger put in shadow or
    a rollback."""
    return decode_event(raw, MODEL_EVENTS)
