"""The registry's stand-alone model: an MLflow pyfunc that takes the declared raw row.

Every registered version is logged from this file as an MLflow "model from code"
(``mlflow.pyfunc.log_model(python_model=<this file>)``): MLflow copies the file into the
model and runs it at load time, so any MLflow tool (``mlflow models serve``,
``mlflow.pyfunc.load_model``, a batch job) scores the version with LightGBM, NumPy, pandas and
PyYAML alone, without driftloop installed. Rows come as the declaration states them
(categories as their strings or ints, missing values as null); out comes the prediction, the
positive class's probability for a classifier.

The artifacts are the LightGBM model in text form (``booster``), the feature declaration
(``declaration``) and, when the version has one, its reference dataset (``reference``). The
gateway's native path (``driftloop.serving.champion``) loads the same booster file and
declaration and encodes rows with ``schemas.features``; a unit test checks both encodings
agree, an integration test that ``mlflow models serve`` answers as the gateway does.

This module must stay importable on its own: it imports nothing from driftloop or schemas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import lightgbm as lgb
import mlflow.models
import numpy as np
import numpy.typing as npt
import pandas as pd
import yaml
from mlflow.pyfunc.model import PythonModel, PythonModelContext

BOOSTER_ARTIFACT: Final = "booster"
DECLARATION_ARTIFACT: Final = "declaration"
REFERENCE_ARTIFACT: Final = "reference"


def column_encoder(feature: Mapping[str, Any]) -> Callable[[pd.Series], npt.NDArray[np.float64]]:
    """Raw values of one declared feature -> the model's input: category codes (a category's
    position in ``categories``), numbers as floats, NaN for missing values."""
    name = str(feature["name"])
    if feature["kind"] == "categorical":
        categories = list(feature["categories"])
        codes = {category: float(code) for code, category in enumerate(categories)}
        as_int = feature["dtype"] == "int"

        def encode_categories(values: pd.Series) -> npt.NDArray[np.float64]:
            encoded = np.empty(len(values), dtype=np.float64)
            for position, value in enumerate(values.tolist()):
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    encoded[position] = math.nan
                    continue
                # A column of int categories with a null in it reaches pandas as floats.
                if as_int and isinstance(value, float) and value.is_integer():
                    value = int(value)
                code = codes.get(value) if isinstance(value, int | str) else None
                if code is None or isinstance(value, bool):
                    raise ValueError(f"{name}: {value!r} is not one of the categories {categories}")
                encoded[position] = code
            return encoded

        return encode_categories

    def encode_numbers(values: pd.Series) -> npt.NDArray[np.float64]:
        if values.dtype == object and values.map(lambda value: isinstance(value, str)).any():
            raise ValueError(f"{name}: numeric feature got a string")
        numbers: npt.NDArray[np.float64] = pd.to_numeric(values, errors="raise").to_numpy(
            dtype=np.float64, na_value=np.nan
        )
        return numbers

    return encode_numbers


class DeclaredModel(PythonModel):
    """A LightGBM booster behind its feature declaration: raw rows in, predictions out."""

    def __init__(self) -> None:
        self.booster: lgb.Booster | None = None
        self.features: list[str] = []
        self.nullable: set[str] = set()
        self.encoders: list[Callable[[pd.Series], npt.NDArray[np.float64]]] = []

    def load_context(self, context: PythonModelContext) -> None:
        """Load the booster and build each feature's encoder from the declaration."""
        declaration = yaml.safe_load(
            Path(context.artifacts[DECLARATION_ARTIFACT]).read_text(encoding="utf-8")
        )
        self.load(context.artifacts[BOOSTER_ARTIFACT], declaration)

    def load(self, booster_path: str, declaration: Mapping[str, Any]) -> None:
        """Load from a booster file and a parsed declaration (``load_context`` without MLflow)."""
        features = list(declaration["features"])
        self.booster = lgb.Booster(model_file=booster_path)
        self.features = [str(feature["name"]) for feature in features]
        self.nullable = {str(f["name"]) for f in features if f.get("nullable", False)}
        self.encoders = [column_encoder(feature) for feature in features]

    def encode(self, rows: pd.DataFrame) -> npt.NDArray[np.float64]:
        """The rows as the booster's input matrix, in declared feature order."""
        missing = [
            name for name in self.features if name not in rows.columns and name not in self.nullable
        ]
        if missing:
            raise ValueError(f"rows lack the declared features {missing}")
        unknown = sorted(set(rows.columns) - set(self.features))
        if unknown:
            raise ValueError(f"rows carry undeclared columns {unknown}")
        columns = [
            encode(rows[name])
            if name in rows.columns
            else np.full(len(rows), np.nan, dtype=np.float64)
            for name, encode in zip(self.features, self.encoders, strict=True)
        ]
        if not columns or len(rows) == 0:
            return np.empty((len(rows), len(self.features)), dtype=np.float64)
        return np.ascontiguousarray(np.column_stack(columns), dtype=np.float64)

    def predict(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> npt.NDArray[np.float64]:
        """Predictions of raw declared rows (a classifier's: the positive class's probability)."""
        if self.booster is None:
            raise RuntimeError("the model is not loaded")
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        matrix = self.encode(frame)
        if len(matrix) == 0:
            return np.empty(0, dtype=np.float64)
        return np.asarray(self.booster.predict(matrix, num_threads=1), dtype=np.float64)


mlflow.models.set_model(DeclaredModel())
