"""The HTTP contract of the gateway: response and feedback models, and the OpenAPI additions.

The /predict request body is the feature declaration's row model (one row or a list of them);
it is checked by ``gateway.scoring`` and described here in the OpenAPI document, with an
example built from the declaration.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.features import Feature, FeatureKind, FeatureSpec
from schemas.fields import FiniteFloat, ModelName, ModelVersion, RequestId, RunId, UtcDatetime


class ProblemDetail(BaseModel):
    """One thing wrong with a request."""

    field: str = Field(description="Where: a body path such as `[3].temp`, or a header name.")
    reason: str = Field(description="Why it was refused.")


class ProblemResponse(BaseModel):
    """Every 4xx (and the 503 without a model) carries the list of problems."""

    detail: list[ProblemDetail]


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
    label: FiniteFloat = Field(description="The observed target value.")
    observed_at: UtcDatetime | None = Field(
        default=None, description="When it was observed (ISO 8601 with zone); default now."
    )


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
                "schema": {
                    "oneOf": [
                        row_ref,
                        {"type": "array", "items": row_ref, "minItems": 1, "maxItems": max_rows},
                    ]
                },
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


def row_schemas(spec: FeatureSpec) -> dict[str, Any]:
    """Component schemas of the declaration's row model, for the OpenAPI document."""
    schema = spec.row_model.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions = schema.pop("$defs", {})
    return {spec.row_model.__name__: schema, **definitions}
