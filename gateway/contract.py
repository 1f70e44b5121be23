"""The HTTP contract of the gateway: response and feedback models, and the OpenAPI additions.

The /predict request body is the feature declaration's row model (one row or a list of them);
it is checked by ``driftloop.serving.scoring`` and described here in the OpenAPI document, with an
example built from the declaration.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, field_validator

from schemas.features import Feature, FeatureKind, FeatureSpec, Target, TargetType
from schemas.fields import FiniteFloat, ModelName, ModelVersion, RequestId, RunId, UtcDatetime

# RFC 3339 section 5.6 date-time, the JSON Schema "date-time" format.
_RFC3339_DATE_TIME: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})",
    re.ASCII,
)


API_KEY: Final = "ApiKey"
ADMIN_BEARER: Final = "AdminBearer"
SECURITY_SCHEMES: Final[dict[str, Any]] = {
    API_KEY: {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "One of GATEWAY_API_KEYS, on /predict and /feedback when any is set.",
    },
    ADMIN_BEARER: {
        "type": "http",
        "scheme": "bearer",
        "description": "GATEWAY_ADMIN_TOKEN, on the /admin endpoints.",
    },
}


class ProblemItem(BaseModel):
    """One thing wrong with a request."""

    field: str = Field(description="Where: a body path such as `[3].temp`, or a header name.")
    reason: str = Field(description="Why it was refused.")


class ProblemDetails(BaseModel):
    """An RFC 9457 problem: every refusal (4xx, and 503 without a model) carries one."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="`about:blank`: the status says what kind of problem it is.")
    title: str = Field(description="The status's reason phrase.")
    status: int = Field(description="The HTTP status code.")
    detail: str = Field(description="Every problem in one line.")
    errors: list[ProblemItem] = Field(description="Every field and why it was refused.")


class Liveness(BaseModel):
    """The process answers."""

    status: Literal["ok"]


class RowPrediction(BaseModel):
    """The prediction of one row of a list request."""

    request_id: RequestId = Field(description="`<request id>:<row index>`, the row's log key.")
    prediction: float


class PredictionResponse(BaseModel):
    """Answer to a one-row request."""

    request_id: RequestId
    model_name: ModelName
    model_version: ModelVersion
    prediction: float


class BatchPredictionResponse(BaseModel):
    """Answer to a list request, predictions in the order of the rows."""

    request_id: RequestId
    model_name: ModelName
    model_version: ModelVersion
    predictions: list[RowPrediction]


class CurrentModel(BaseModel):
    """The model serving now."""

    name: ModelName
    version: ModelVersion
    run_id: RunId
    alias: str
    loaded_at: datetime


class ServedModelState(BaseModel):
    """One model this gateway serves, and its champion (null until one is loaded)."""

    name: ModelName
    task: str = Field(description="regression or classification, from its declaration.")
    predict_path: str
    champion: CurrentModel | None


class ServedModels(BaseModel):
    """Every model this gateway serves; ``default`` is the one of /predict and /feedback."""

    default: ModelName
    models: list[ServedModelState]


class Readiness(BaseModel):
    """Whether the gateway can answer /predict, and the state of its dependencies."""

    ready: bool
    reason: str | None
    model: CurrentModel | None
    kafka: str = Field(description="direct, spooling (Kafka unreachable), stopped or off.")
    spool_depth: int
    spool_full: bool
    model_events: str = Field(description="following, connecting or off.")


class Feedback(BaseModel):
    """The true value of an earlier prediction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: RequestId = Field(description="The prediction's request id (row id of a list).")
    label: StrictInt | FiniteFloat | StrictStr = Field(
        description="The observed target value: a number for a regression; a classifier's class "
        "(as declared), or 0/1 for a classifier whose classes are strings."
    )
    observed_at: UtcDatetime | None = Field(
        default=None, description="When it was observed (RFC 3339 date-time); default now."
    )

    @field_validator("observed_at", mode="before")
    @classmethod
    def _a_date_time_string(cls, value: object) -> object:
        # The contract says a date-time string: pydantic alone would also read a number (or a
        # numeric string) as Unix time, and a date alone as midnight.
        if value is None or isinstance(value, datetime):
            return value
        if not isinstance(value, str) or not _RFC3339_DATE_TIME.fullmatch(value):
            raise ValueError("must be an RFC 3339 date-time string, e.g. 2011-05-01T13:00:00Z")
        return value


def code_label(target: Target, value: int | float | str) -> float:
    """A label as the model learns it (``label_schema`` says what is taken), else ValueError.

    A classifier with string classes also takes 0 and 1 (already coded); one with integer
    classes takes only its classes, where 0 or 1 could be a class of either meaning.
    """
    if target.type is TargetType.NUMERIC:
        return target.encode(value)
    string_classes = isinstance(target.positive, str)
    if string_classes and not isinstance(value, str) and value in (0, 1):
        return float(value)
    if isinstance(value, str) == string_classes and not isinstance(value, float):
        return target.encode(value)
    taken = "one of its classes or 0/1" if string_classes else "one of its (integer) classes"
    raise ValueError(f"target {target.name}: {value!r} is not {taken}")


def label_schema(target: Target) -> dict[str, Any]:
    """JSON Schema of the labels ``code_label`` takes for ``target``."""
    if target.type is TargetType.NUMERIC:
        return {"type": "number", "description": f"The observed {target.name}."}
    description = f"The observed {target.name}: {target.positive!r} is the positive class."
    if isinstance(target.positive, str):
        classes: dict[str, Any] = (
            {"type": "string", "enum": list(target.categories)}
            if target.categories is not None
            else {"type": "string"}
        )
        coded = {"type": "number", "enum": [0, 1]}
        return {"anyOf": [classes, coded], "description": description + " Or 0/1."}
    if target.categories is not None:
        return {"type": "integer", "enum": list(target.categories), "description": description}
    return {"type": "integer", "description": description}


def feedback_schema_name(spec: FeatureSpec) -> str:
    """Component name of a model's feedback schema (beside its row schema)."""
    return spec.row_model.__name__.removesuffix("FeatureRow") + "Feedback"


def feedback_schemas(spec: FeatureSpec) -> dict[str, Any]:
    """The component schema of one label of ``spec``'s model: ``Feedback`` with its label typed
    by the declared target."""
    schema = Feedback.model_json_schema()
    schema["title"] = feedback_schema_name(spec)
    schema["properties"]["label"] = label_schema(spec.target)
    return {feedback_schema_name(spec): schema}


class FeedbackAccepted(BaseModel):
    """Labels accepted for publication."""

    accepted: int


def example_row(spec: FeatureSpec) -> dict[str, Any]:
    """A valid row made from the declaration: first category, middle of declared ranges."""
    return {feature.name: _example_value(feature) for feature in spec.features}


def _example_value(feature: Feature) -> Any:
    if feature.kind is FeatureKind.CATEGORICAL:
        return (feature.categories or (None,))[0]
    low = feature.minimum if feature.minimum is not None else 0
    high = feature.maximum if feature.maximum is not None else low + 1
    middle = (low + high) / 2
    return int(middle) if feature.dtype == "int" else round(float(middle), 3)


def predict_request_body(spec: FeatureSpec, max_rows: int) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of /predict: one row or a list, with examples."""
    row_ref = {"$ref": f"#/components/schemas/{spec.row_model.__name__}"}
    row = example_row(spec)
    partial = {
        name: value
        for name, value in row.items()
        if not spec.feature(name).nullable or name == spec.features[0].name
    }
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": _one_or_many(row_ref, max_rows),
                "examples": {
                    "one row": {"value": row},
                    "missing values": {
                        "summary": "nullable features omitted (scored as missing)",
                        "value": partial,
                    },
                    "list": {"value": [row, partial]},
                },
            }
        },
    }


def feedback_request_body(spec: FeatureSpec, max_items: int) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of a model's feedback: one label or a list, with an example."""
    label_ref = {"$ref": f"#/components/schemas/{feedback_schema_name(spec)}"}
    target = spec.target
    example = 42.0 if target.positive is None else target.positive
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": _one_or_many(label_ref, max_items),
                "example": {"request_id": "3f2a9c", "label": example},
            }
        },
    }


def _one_or_many(item: dict[str, Any], max_items: int) -> dict[str, Any]:
    # The bodies of /predict and /feedback: one object, or a list of 1 to max_items of them.
    list_of_items = {"type": "array", "items": item, "minItems": 1, "maxItems": max_items}
    return {"oneOf": [item, list_of_items]}


def row_schemas(spec: FeatureSpec) -> dict[str, Any]:
    """Component schemas of the declaration's row model, for the OpenAPI document."""
    schema = spec.row_model.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions = schema.pop("$defs", {})
    return {spec.row_model.__name__: schema, **definitions}
