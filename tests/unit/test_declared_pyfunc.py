"""The registry's stand-alone pyfunc: raw declared rows in, the gateway's predictions out; and
the gateway's native path loads both the pyfunc layout and the older LightGBM-flavour one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.lightgbm
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest

from driftloop.serving import declared_pyfunc
from driftloop.serving.champion import ChampionRef, load_champion
from driftloop.training import trainer
from schemas.features import FeatureSpec, load_feature_spec

pytestmark = pytest.mark.unit

REF = ChampionRef("unit", 1, "0" * 32)


def _rows(spec: FeatureSpec, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as a client sends them: plain Python values, declared features only."""
    records = frame[list(spec.feature_names)].to_dict(orient="records")
    return [{str(name): _plain(value) for name, value in record.items()} for record in records]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


@pytest.mark.parametrize(
    ("declaration", "since", "until"),
    [("bikeshare", "2011-01-01", "2011-03-01"), ("breast_cancer", None, None)],
)
def test_the_pyfunc_answers_raw_rows_as_the_gateway_does(
    tmp_path: Path, declaration: str, since: str | None, until: str | None
) -> None:
    spec = load_feature_spec(declaration)
    frame = trainer.read_dataset(spec, since=since, until=until)
    booster = trainer.train_booster(spec, frame, num_boost_round=20)
    directory = trainer.save_model(booster, spec, tmp_path / "model")
    rows = _rows(spec, frame.sample(200, random_state=3))
    if declaration == "bikeshare":
        rows[0]["weathersit"] = None  # nullable: the model reads NaN
        rows[1]["temp"] = None
        del rows[2]["hum"]  # a nullable feature may be left out

    served = mlflow.pyfunc.load_model(str(directory)).predict(pd.DataFrame(rows))
    champion = load_champion(directory, REF)
    encoded = spec.encode_rows(rows)
    expected = champion.predict(encoded.matrix)

    assert encoded.accepted == list(range(len(rows)))
    np.testing.assert_allclose(np.asarray(served, dtype=np.float64), expected, rtol=0, atol=1e-12)
    if declaration == "breast_cancer":
        assert ((expected > 0) & (expected < 1)).all()


def test_the_pyfunc_refuses_what_the_declaration_refuses(tmp_path: Path) -> None:
    spec = load_feature_spec("bikeshare")
    frame = trainer.read_dataset(spec, since="2011-01-01", until="2011-02-01")
    model = declared_pyfunc.DeclaredModel()
    booster_file = tmp_path / "model.lgb"
    trainer.train_booster(spec, frame, num_boost_round=3).save_model(str(booster_file))
    model.load(str(booster_file), spec.model_dump(mode="json"))
    row = _rows(spec, frame.head(1))[0]

    with pytest.raises(ValueError, match="not one of the categories"):
        model.predict(None, pd.DataFrame([{**row, "mnth": "Smarch"}]))
    with pytest.raises(ValueError, match="lack the declared features"):
        model.predict(None, pd.DataFrame([{k: v for k, v in row.items() if k != "mnth"}]))
    with pytest.raises(ValueError, match="undeclared columns"):
        model.predict(None, pd.DataFrame([{**row, "bikers": 3}]))
    with pytest.raises(ValueError, match="numeric feature got a string"):
        model.predict(None, pd.DataFrame([{**row, "temp": "warm"}]))


def test_int_categories_read_through_a_null_are_still_categories() -> None:
    encode = declared_pyfunc.column_encoder(
        {"name": "season", "kind": "categorical", "dtype": "int", "categories": [1, 2, 3, 4]}
    )

    # pandas holds an int column with a null as floats.
    encoded = encode(pd.Series([4.0, None, 1.0]))

    np.testing.assert_array_equal(encoded, [3.0, np.nan, 0.0])


def test_artifact_names_are_the_trainers() -> None:
    assert declared_pyfunc.BOOSTER_ARTIFACT == trainer.BOOSTER_ARTIFACT
    assert declared_pyfunc.DECLARATION_ARTIFACT == trainer.DECLARATION_ARTIFACT
    assert declared_pyfunc.REFERENCE_ARTIFACT == trainer.PYFUNC_REFERENCE_ARTIFACT
    assert Path(declared_pyfunc.__file__).resolve() == trainer.PYFUNC_CODE


def test_versions_of_the_older_lightgbm_layout_still_load(tmp_path: Path) -> None:
    spec = load_feature_spec("bikeshare")
    frame = trainer.read_dataset(spec, since="2011-01-01", until="2011-02-01")
    booster = trainer.train_booster(spec, frame, num_boost_round=3)
    spec_file = tmp_path / trainer.FEATURE_SPEC_FILE
    spec_file.write_text(trainer.feature_spec_document(spec), encoding="utf-8")
    mlflow.lightgbm.save_model(booster, str(tmp_path / "old"), extra_files=[str(spec_file)])

    champion = load_champion(tmp_path / "old", REF)

    matrix = trainer.feature_matrix(spec, frame.head(5))
    np.testing.assert_allclose(champion.predict(matrix), booster.predict(matrix), atol=1e-12)
    assert champion.spec == spec
