"""The live rules: rollback and shadow-promotion verdicts, counterfactual windows, shadow plans."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest

from driftloop.serving.shadow import RESTORED_FROM_TAG, previous_champion
from driftloop.storage.shadow_log import PairedRow, WindowRow
from driftloop.training.live_evidence import (
    LiveAction,
    counterfactuals,
    judge_live,
    window_score,
)
from driftloop.training.policy import RMSE, HoldoutMetric
from driftloop.training.retrain import CHAMPION_VERSION_TAG, DECISION_TAG
from schemas.features import LiveEvidence, PromotionEvidence, load_feature_spec

pytestmark = pytest.mark.unit

START = datetime(2011, 6, 1, tzinfo=UTC)
ROC_AUC = HoldoutMetric("roc_auc", greater_is_better=True)


def paired(errors: Sequence[tuple[float, float]]) -> list[PairedRow]:
    """Rows with label 100 whose served and shadow predictions miss it by the given amounts."""
    return [
        PairedRow(START + timedelta(hours=index), 100.0, 100.0 + served, 100.0 + shadow)
        for index, (served, shadow) in enumerate(errors)
    ]


def verdict(rows: list[PairedRow], *, needed: int = 4, margin: float = 0.02) -> LiveAction:
    return judge_live(RMSE, rows, needed=needed, margin=margin, served="v2", shadow="v1").action


def test_fewer_labelled_rows_than_needed_is_no_verdict() -> None:
    result = judge_live(
        RMSE, paired([(50, 1)] * 3), needed=4, margin=0.02, served="v2", shadow="v1"
    )
    assert result.action is LiveAction.WAIT
    assert result.rows == 3
    assert math.isnan(result.served_score)
    assert "3 of 4" in result.reason


def test_a_champion_worse_than_the_version_it_replaced_by_the_margin_is_swapped() -> None:
    result = judge_live(
        RMSE, paired([(50, 10)] * 4), needed=4, margin=0.02, served="v2", shadow="v1"
    )
    assert result.action is LiveAction.SWAP
    assert (result.served_score, result.shadow_score) == (50.0, 10.0)
    assert "v2 50 served, v1 10 in shadow" in result.reason


def test_a_shadow_version_within_the_margin_does_not_swap() -> None:
    # 1 % better in shadow against a 2 % margin: the serving version keeps the alias.
    assert verdict(paired([(100, 99)] * 4)) is LiveAction.KEEP
    assert verdict(paired([(100, 99)] * 4), margin=0.005) is LiveAction.SWAP


def test_a_tie_keeps_the_serving_version_even_without_a_margin() -> None:
    assert verdict(paired([(20, 20)] * 4), margin=0.0) is LiveAction.KEEP


def test_only_the_first_rows_count() -> None:
    # The first four rows say keep; what arrives after them does not reopen the verdict.
    rows = paired([(10, 30)] * 4 + [(90, 0)] * 40)
    result = judge_live(RMSE, rows, needed=4, margin=0.02, served="v2", shadow="v1")
    assert result.action is LiveAction.KEEP
    assert result.rows == 4


def test_a_greater_is_better_metric_swaps_the_other_way() -> None:
    # Served ranks the two positives below the negatives (AUC 0), the shadow version above (1).
    truth = [1.0, 1.0, 0.0, 0.0]
    served = [0.1, 0.2, 0.8, 0.9]
    shadow = [0.9, 0.8, 0.2, 0.1]
    rows = [
        PairedRow(START, label, s, w) for label, s, w in zip(truth, served, shadow, strict=True)
    ]
    result = judge_live(ROC_AUC, rows, needed=4, margin=0.02, served="v2", shadow="v1")
    assert result.action is LiveAction.SWAP
    reversed_rows = [PairedRow(START, r.label, r.shadow, r.served) for r in rows]
    again = judge_live(ROC_AUC, reversed_rows, needed=4, margin=0.02, served="v2", shadow="v1")
    assert again.action is LiveAction.KEEP


def test_a_comparison_needs_a_row() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        judge_live(RMSE, [], needed=0, margin=0.02, served="v2", shadow="v1")


def window(rows: list[tuple[int, float, dict[int, float]]]) -> list[WindowRow]:
    return [WindowRow(served, label, predictions) for served, label, predictions in rows]


def test_counterfactual_compares_the_served_and_the_baseline_on_the_same_rows() -> None:
    rows = window(
        [
            # v3 serves; v2 (previous) and v1 (first) scored in shadow.
            (3, 10.0, {3: 12.0, 2: 14.0, 1: 20.0}),
            (3, 10.0, {3: 8.0, 2: 6.0, 1: 0.0}),
            # A row v3 served that v2's shadow missed (it was loading): v1 only.
            (3, 10.0, {3: 10.0, 1: 10.0}),
        ]
    )
    found = counterfactuals(RMSE, rows, {"previous_champion": 2, "first_champion": 1})
    previous = found["previous_champion"]
    assert (previous.baseline_version, previous.rows) == (2, 2)
    assert previous.served_score == pytest.approx(2.0)
    assert previous.baseline_score == pytest.approx(4.0)
    assert previous.lift == pytest.approx(0.5)
    first = found["first_champion"]
    assert first.rows == 3
    assert first.served_score == pytest.approx(math.sqrt(8 / 3))
    assert first.baseline_score == pytest.approx(math.sqrt(200 / 3))
    assert window_score(RMSE, rows) == pytest.approx(math.sqrt(8 / 3))


def test_rows_the_baseline_served_itself_count_with_no_lift() -> None:
    # Before the first promotion, the first champion is what was served.
    rows = window([(1, 10.0, {1: 13.0}), (1, 10.0, {1: 7.0})])
    first = counterfactuals(RMSE, rows, {"first_champion": 1})["first_champion"]
    assert first.rows == 2
    assert first.served_score == first.baseline_score == pytest.approx(3.0)
    assert first.lift == 0.0


def test_a_baseline_without_predictions_in_the_window_is_left_out() -> None:
    rows = window([(1, 10.0, {1: 13.0})])
    assert counterfactuals(RMSE, rows, {"previous_champion": 7}) == {}
    assert math.isnan(window_score(RMSE, []))


def test_a_worse_served_model_has_a_negative_lift() -> None:
    rows = window([(2, 10.0, {2: 20.0, 1: 15.0})])
    assert counterfactuals(RMSE, rows, {"previous_champion": 1})[
        "previous_champion"
    ].lift == pytest.approx(-1.0)


def test_the_previous_champion_comes_from_the_champions_tags() -> None:
    promoted = {DECISION_TAG: "promoted", CHAMPION_VERSION_TAG: "3"}
    assert previous_champion(promoted) == 3
    # A bootstrapped first model replaced nothing; a rejected version was never champion.
    assert previous_champion({}) is None
    assert previous_champion({DECISION_TAG: "rejected", CHAMPION_VERSION_TAG: "3"}) is None
    # After a rollback the version it was restored from is the one it replaced.
    assert previous_champion({**promoted, RESTORED_FROM_TAG: "4"}) == 4


def test_the_live_policy_is_declared_per_model() -> None:
    assert load_feature_spec("bikeshare").training.live == LiveEvidence()
    shadow = LiveEvidence.model_validate({"promotion": "shadow", "rows": 50, "margin": 0.05})
    assert shadow.promotion is PromotionEvidence.SHADOW
    with pytest.raises(ValueError, match="greater than or equal to 10"):
        LiveEvidence.model_validate({"rows": 3})
