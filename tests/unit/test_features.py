"""Feature declarations: loading, consistency checks, the row model and the input vector."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from schemas.features import (
    MODELS_DIR,
    FeatureKind,
    FeatureSpec,
    FeatureSpecError,
    Metric,
    Target,
    TargetType,
    Task,
    declared_feature_specs,
    load_feature_spec,
)
from tests.unit.churn_declaration import CHURN_YAML

pytestmark = pytest.mark.unit

# A second model, declared only in configuration: nothing in schemas/ knows about it.

BIKESHARE_ROW: dict[str, Any] = {
    "season": 1,
    "mnth": "Jan",
    "hr": 0,
    "holiday": 0,
    "weekday": 6,
    "workingday": 0,
    "weathersit": "clear",
    "temp": 0.24,
    "atemp": 0.2879,
    "hum": 0.81,
    "windspeed": 0,
}


@pytest.fixture(scope="module")
def bikeshare() -> FeatureSpec:
    return load_feature_spec("bikeshare")


@pytest.fixture
def churn(tmp_path: Path) -> FeatureSpec:
    path = tmp_path / "churn.yaml"
    path.write_text(CHURN_YAML, encoding="utf-8")
    return load_feature_spec(path)


def declaration(**changes: Any) -> dict[str, Any]:
    """The churn declaration as a mapping, with top-level keys replaced."""
    document: dict[str, Any] = yaml.safe_load(CHURN_YAML)
    document.update(changes)
    return document


def test_bikeshare_is_declared(bikeshare: FeatureSpec) -> None:
    assert "bikeshare" in declared_feature_specs()
    assert bikeshare.task is Task.REGRESSION
    assert bikeshare.target.name == "bikers"
    assert bikeshare.registered_model_name == "bikeshare"
    assert bikeshare.feature_names == (
        "season",
        "mnth",
        "hr",
        "holiday",
        "weekday",
        "workingday",
        "weathersit",
        "temp",
        "atemp",
        "hum",
        "windspeed",
    )
    assert bikeshare.numeric_features == ("hr", "temp", "atemp", "hum", "windspeed")
    assert bikeshare.monitored_numeric_features == ("temp", "atemp", "hum", "windspeed")
    assert bikeshare.monitored_categorical_features == ("weathersit",)
    assert bikeshare.categorical_positions == (0, 1, 3, 4, 5, 6)


def test_bikeshare_leaves_out_the_leaking_columns(bikeshare: FeatureSpec) -> None:
    assert bikeshare.dataset is not None
    assert {"casual", "registered"} <= set(bikeshare.dataset.excluded_columns)
    assert not {"casual", "registered", "bikers"} & set(bikeshare.feature_names)


def test_load_by_path_equals_load_by_name(bikeshare: FeatureSpec) -> None:
    assert load_feature_spec(MODELS_DIR / "bikeshare.yaml") == bikeshare
    assert load_feature_spec(str(MODELS_DIR / "bikeshare.yaml")) == bikeshare


def test_another_model_is_configuration_only(churn: FeatureSpec) -> None:
    assert churn.task is Task.CLASSIFICATION
    assert churn.feature_names == ("tenure_months", "plan", "monthly_spend")
    assert churn.numeric_features == ("tenure_months", "monthly_spend")
    assert churn.categorical_features == ("plan",)
    assert churn.monitored_features == ("tenure_months", "plan")
    assert churn.row_model.__name__ == "ChurnFeatureRow"
    assert churn.validate_row({"tenure_months": 4, "plan": "plus"}) == {
        "tenure_months": 4,
        "plan": "plus",
        "monthly_spend": None,
    }
    vector = churn.encode_row({"tenure_months": 4, "plan": "family", "monthly_spend": None})
    assert vector[:2] == [4.0, 2.0]
    assert math.isnan(vector[2])


def test_unknown_name_lists_the_declared_ones() -> None:
    with pytest.raises(FeatureSpecError, match=r"no feature declaration named 'nope'.*bikeshare"):
        load_feature_spec("nope")


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(FeatureSpecError, match="cannot read"):
        load_feature_spec(tmp_path / "absent.yaml")


def test_broken_yaml_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n", encoding="utf-8")
    with pytest.raises(FeatureSpecError, match="not valid YAML"):
        load_feature_spec(path)


def test_invalid_declaration_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(declaration(task="ranking")), encoding="utf-8")
    with pytest.raises(FeatureSpecError, match=r"bad\.yaml: invalid feature declaration"):
        load_feature_spec(path)


def feature(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "x", "kind": "numeric", "dtype": "float", "description": "x"}
    base.update(changes)
    return {key: value for key, value in base.items() if value is not ...}


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ([feature(kind="categorical", dtype="str")], "needs categories"),
        ([feature(kind="categorical", dtype="float", categories=[1])], "int or str"),
        ([feature(categories=[1, 2])], "cannot declare categories"),
        ([feature(dtype="str")], "cannot have dtype str"),
        ([feature(kind="categorical", dtype="int", categories=[1, "a"])], "must all be int"),
        ([feature(kind="categorical", dtype="str", categories=["a", "a"])], "must not repeat"),
        # YAML reads an unquoted yes as a boolean, which is no category.
        ([feature(kind="categorical", dtype="str", categories=[True])], "categories"),
        ([feature(kind="categorical", dtype="int", categories=[1], minimum=0)], "minimum"),
        ([feature(minimum=2, maximum=1)], "minimum is above maximum"),
        ([feature(dtype="int", minimum=0.5)], "needs int bounds"),
        ([feature(kind="ordinal")], "kind"),
        ([feature(name="Temp")], "name"),
        ([feature(), feature()], "declared twice"),
        ([feature(name="copy")], "reserved by pydantic"),
        ([feature(name="churned")], "also declared as a feature"),
        ([feature(description=...)], "description"),
        ([feature(unit="C")], "Extra inputs"),
        ([], "at least 1"),
    ],
)
def test_inconsistent_declarations_are_refused(features: list[Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        FeatureSpec.model_validate(declaration(features=features))


def test_excluded_columns_must_not_be_used() -> None:
    dataset = {"path": "x.csv", "order_by": ["t"], "excluded_columns": {"plan": "leaks"}}
    with pytest.raises(ValidationError, match="excluded columns are used"):
        FeatureSpec.model_validate(declaration(dataset=dataset))


def test_an_old_declaration_gets_the_defaults(churn: FeatureSpec) -> None:
    assert churn.target.type is TargetType.NUMERIC
    assert churn.promotion_metric is Metric.LOG_LOSS
    assert churn.metrics == (Metric.LOG_LOSS, Metric.ROC_AUC, Metric.BRIER)
    assert churn.training.holdout_fraction == 0.2


def test_bikeshare_declares_its_time_and_training_rows(bikeshare: FeatureSpec) -> None:
    assert bikeshare.dataset is not None
    assert bikeshare.dataset.time is not None
    assert bikeshare.dataset.time.columns == ("day", "hr")
    assert bikeshare.promotion_metric is Metric.RMSE
    assert bikeshare.metrics == (Metric.RMSE, Metric.MAE)
    assert bikeshare.training.since == datetime(2011, 1, 1, tzinfo=UTC)
    assert bikeshare.training.until == datetime(2011, 4, 1, tzinfo=UTC)


def test_a_categorical_target_codes_its_positive_class_as_one() -> None:
    target = Target(
        name="diagnosis",
        description="x",
        type=TargetType.CATEGORICAL,
        positive="malignant",
        categories=("benign", "malignant"),
    )

    assert [target.encode(value) for value in ("malignant", "benign", 1.0, 0.0, 1, 0)] == [
        1.0,
        0.0,
        1.0,
        0.0,
        1.0,
        0.0,
    ]
    for wrong in ("Malignant", 0.5, 2, None, True):
        with pytest.raises(ValueError, match="not one of its classes"):
            target.encode(wrong)


def test_without_categories_every_other_class_is_negative() -> None:
    target = Target(name="answer", description="x", type=TargetType.CATEGORICAL, positive="Yes")

    assert target.encode("Yes") == 1.0
    assert target.encode("No") == 0.0
    assert target.encode("maybe") == 0.0


def test_int_classes_are_classes_not_codes() -> None:
    target = Target(
        name="grade",
        description="x",
        type=TargetType.CATEGORICAL,
        positive=3,
        categories=(3, 1),
    )

    assert target.encode(3) == 1.0
    assert target.encode(1) == 0.0  # the class 1, not the code for "positive"
    assert target.encode(1.0) == 1.0  # a float is a code: a label sent back as ground truth
    with pytest.raises(ValueError, match="not one of its classes"):
        target.encode(0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"target": {"name": "y", "description": "x", "positive": "a"}}, "cannot declare"),
        ({"target": {"name": "y", "description": "x", "type": "categorical"}}, "positive"),
        (
            {
                "target": {
                    "name": "y",
                    "description": "x",
                    "type": "categorical",
                    "positive": "c",
                    "categories": ["a", "b"],
                }
            },
            "not one of",
        ),
        (
            {
                "target": {
                    "name": "y",
                    "description": "x",
                    "type": "categorical",
                    "positive": "a",
                    "categories": ["a", "b", "c"],
                }
            },
            "two distinct",
        ),
        (
            {
                "task": "regression",
                "target": {"name": "y", "description": "x", "type": "categorical", "positive": 1},
            },
            "needs task classification",
        ),
        ({"training": {"promotion_metric": "rmse"}}, "not a classification metric"),
        ({"training": {"promotion_metric": "accuracy"}}, "promotion_metric"),
        ({"training": {"since": "2011-01-01T00:00:00Z"}}, "need a dataset with a time column"),
        (
            {
                "dataset": {"path": "x.csv", "time": {"column": "at"}},
                "training": {"since": "2011-02-01T00:00:00Z", "until": "2011-01-01T00:00:00Z"},
            },
            "before",
        ),
        ({"dataset": {"path": "x.csv", "time": {}}}, "either a time column"),
        (
            {"dataset": {"path": "x.csv", "time": {"column": "at", "offsets": {"d": "P1D"}}}},
            "either a time column|cannot also",
        ),
        ({"training": {"holdout_fraction": 1}}, "holdout_fraction"),
        ({"monitoring": {"prediction_buckets": [0, 10, 5]}}, "must increase"),
        ({"monitoring": {"prediction_buckets": []}}, "prediction_buckets"),
    ],
)
def test_inconsistent_training_declarations_are_refused(
    changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        FeatureSpec.model_validate(declaration(**changes))


def test_a_declared_promotion_metric_of_the_task_is_kept() -> None:
    spec = FeatureSpec.model_validate(declaration(training={"promotion_metric": "roc_auc"}))

    assert spec.promotion_metric is Metric.ROC_AUC
    assert spec.promotion_metric.greater_is_better


def test_a_named_declaration_must_carry_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("schemas.features.MODELS_DIR", tmp_path)
    (tmp_path / "churn.yaml").write_text(CHURN_YAML, encoding="utf-8")
    assert load_feature_spec("churn").name == "churn"
    assert declared_feature_specs() == ["churn"]
    (tmp_path / "other.yaml").write_text(CHURN_YAML, encoding="utf-8")
    with pytest.raises(FeatureSpecError, match="declares name 'churn', expected 'other'"):
        load_feature_spec("other")


def test_valid_row(bikeshare: FeatureSpec) -> None:
    row = bikeshare.validate_row(BIKESHARE_ROW)
    assert row == {**BIKESHARE_ROW, "windspeed": 0.0}
    assert isinstance(row["windspeed"], float)
    assert list(row) == list(bikeshare.feature_names)


def test_nullable_features_may_be_missing_or_null(bikeshare: FeatureSpec) -> None:
    row = {**BIKESHARE_ROW, "temp": None}
    del row["hum"]
    validated = bikeshare.validate_row(row)
    assert validated["temp"] is None
    assert validated["hum"] is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hr": ...}, "hr\n  Field required"),
        ({"season": None}, "season\n  Input should be a valid integer"),
        ({"humidity": 0.5}, "humidity\n  Extra inputs are not permitted"),
        ({"hr": "13"}, "hr\n  Input should be a valid integer"),
        ({"hr": 13.5}, "hr\n  Input should be a valid integer"),
        ({"hr": 24}, "less than or equal to 23"),
        ({"holiday": True}, "holiday\n  Input should be a valid integer"),
        ({"holiday": 2}, "2 is not one of the categories [0, 1]"),
        ({"mnth": "january"}, "'january' is not one of the categories"),
        ({"temp": "0.5"}, "temp\n  Input should be a valid number"),
        ({"temp": float("nan")}, "finite number"),
        ({"hum": 1.2}, "less than or equal to 1"),
        ({"windspeed": -0.1}, "greater than or equal to 0"),
    ],
)
def test_invalid_rows_are_refused(
    bikeshare: FeatureSpec, changes: dict[str, Any], message: str
) -> None:
    row = {**BIKESHARE_ROW, **changes}
    row = {name: value for name, value in row.items() if value is not ...}
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        bikeshare.validate_row(row)


def test_row_model_accepts_json(bikeshare: FeatureSpec) -> None:
    parsed = bikeshare.row_model.model_validate_json(
        '{"season": 3, "mnth": "July", "hr": 13, "holiday": 0, "weekday": 5, '
        '"workingday": 1, "weathersit": null, "temp": 1, "atemp": 0.7}'
    )
    assert parsed.model_dump()["temp"] == 1.0


def test_temperatures_outside_2011_are_still_valid(bikeshare: FeatureSpec) -> None:
    assert bikeshare.validate_row({**BIKESHARE_ROW, "temp": 1.05})["temp"] == 1.05


def test_row_model_documents_the_features(bikeshare: FeatureSpec) -> None:
    schema = bikeshare.row_model.model_json_schema()
    assert schema["title"] == "BikeshareFeatureRow"
    assert schema["additionalProperties"] is False
    assert schema["properties"]["mnth"]["enum"][:2] == ["Jan", "Feb"]
    assert schema["properties"]["hr"]["maximum"] == 23
    assert "Hour of the day" in schema["properties"]["hr"]["description"]
    assert set(schema["required"]) == {
        "season",
        "mnth",
        "hr",
        "holiday",
        "weekday",
        "workingday",
    }


def test_row_model_is_built_once(bikeshare: FeatureSpec) -> None:
    assert bikeshare.row_model is bikeshare.row_model


def test_input_vector(bikeshare: FeatureSpec) -> None:
    row = bikeshare.validate_row({**BIKESHARE_ROW, "mnth": "July", "weathersit": None})
    vector = bikeshare.encode_row(row)
    assert len(vector) == len(bikeshare.feature_names)
    assert vector[:6] == [0.0, 6.0, 0.0, 0.0, 6.0, 0.0]
    assert math.isnan(vector[6])
    assert vector[7:] == [0.24, 0.2879, 0.81, 0.0]


def test_unknown_category_cannot_be_encoded(bikeshare: FeatureSpec) -> None:
    weathersit = bikeshare.feature("weathersit")
    assert weathersit.kind is FeatureKind.CATEGORICAL
    assert weathersit.category_codes["heavy rain/snow"] == 3
    with pytest.raises(ValueError, match="not a category of weathersit"):
        weathersit.encode("fog")
    with pytest.raises(ValueError, match="not a category"):
        weathersit.encode(1.0)
    with pytest.raises(TypeError, match="got a string"):
        bikeshare.feature("temp").encode("warm")


def test_unknown_feature_lookup(bikeshare: FeatureSpec) -> None:
    with pytest.raises(KeyError, match="no feature 'casual'"):
        bikeshare.feature("casual")


def test_specs_are_frozen_and_compare_by_value(bikeshare: FeatureSpec) -> None:
    assert bikeshare == load_feature_spec("bikeshare")
    with pytest.raises(ValidationError):
        bikeshare.task = Task.CLASSIFICATION  # type: ignore[misc]
