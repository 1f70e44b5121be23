"""The champion as the drift monitor needs it, from the MLflow registry: version, reference, spec.

Every model version carries its own reference dataset (``reference/reference.parquet``, named
by the version tag ``reference_artifact``), its drift baseline (``drift/baseline.json``) and
the feature declaration it was trained with (``feature_spec.yaml`` in its run), so after a
promotion the monitor compares windows with what the new champion learned from, on the columns
it reads, against thresholds calibrated on that reference.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import mlflow.artifacts
import pandas as pd
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from driftloop.drift.baseline import DriftBaseline
from driftloop.training.trainer import (
    FEATURE_SPEC_FILE,
    current_champion,
    load_baseline,
    load_reference,
)
from schemas.features import FeatureSpec, load_feature_spec

log = logging.getLogger(__name__)


class RegistryChampions:
    """Reads champions from the MLflow registry (blocking calls: run them in a thread)."""

    def __init__(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def champion_version(self, model_name: str) -> int | None:
        """The version behind the ``champion`` alias, or None when there is none."""
        return current_champion(self.tracking_uri, model_name)

    def reference(self, model_name: str, version: int) -> pd.DataFrame:
        """The reference dataset logged with the version."""
        return load_reference(self.tracking_uri, model_name, version)

    def baseline(self, model_name: str, version: int) -> DriftBaseline | None:
        """The drift baseline logged with the version, None when it has none or it cannot be
        read (the monitor then calibrates on the reference itself)."""
        try:
            return load_baseline(self.tracking_uri, model_name, version)
        except ValidationError:
            log.warning(
                "%s v%d: its stored drift baseline is unreadable; calibrating again",
                model_name,
                version,
                exc_info=True,
            )
            return None

    def newest_version(self, model_name: str) -> int | None:
        """The highest registered version (a challenger about to be promoted), if any."""
        found = self._client.search_model_versions(
            f"name = '{model_name}'", max_results=1, order_by=["version_number DESC"]
        )
        return int(found[0].version) if found else None

    def feature_spec(self, model_name: str, version: int) -> FeatureSpec:
        """The declaration stored in the version's run."""
        run_id = self._client.get_model_version(model_name, str(version)).run_id
        if not run_id:
            raise LookupError(f"{model_name} version {version} has no run")
        with tempfile.TemporaryDirectory(prefix="driftloop-spec-") as work:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=FEATURE_SPEC_FILE,
                dst_path=work,
                tracking_uri=self.tracking_uri,
            )
            return load_feature_spec(Path(local))
