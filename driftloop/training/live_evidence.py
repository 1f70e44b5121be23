"""Judging versions on live labelled rows: the pure rules, with no registry and no database.

Every comparison is on the same requests: the rows one version served and another scored in
shadow (``driftloop.storage.shadow_log``), scored with the model's promotion metric
(``driftloop.training.metrics``). The rule is the promotion rule of
``driftloop.training.policy.judge_challenger``, applied to live rows instead of a holdout:

- **rollback**: over the first ``rows`` labelled rows a newly promoted champion served, the
  version it replaced (scored in shadow) is the challenger: when it beats the champion by the
  margin, the alias moves back;
- **shadow promotion**: over the first ``rows`` labelled rows served while a challenger waits
  in shadow, it is promoted when it beats the champion by the margin, and dropped otherwise;
- **counterfactual**: in a window, the error of what was served against the error a baseline
  version (the previous champion, the frozen first one) had on the same labelled rows.

Fewer rows than asked for is no verdict (``WAIT``): a verdict on the first ten rows of an
hourly model would follow the hour of day, not the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from driftloop.storage.shadow_log import PairedRow, WindowRow
from driftloop.training.metrics import metric_value
from driftloop.training.policy import HoldoutMetric, judge_challenger, relative_improvement


class LiveAction(StrEnum):
    """What the live rows say about a pair of versions."""

    WAIT = "wait"
    """Fewer labelled rows than the comparison needs."""
    KEEP = "keep"
    """The serving version stays (a new champion held, a challenger lost)."""
    SWAP = "swap"
    """The shadow version takes the alias (a rollback, a challenger's promotion)."""


@dataclass(frozen=True, slots=True)
class LiveVerdict:
    """The verdict on one pair of versions over the same labelled rows."""

    action: LiveAction
    rows: int
    """Labelled rows compared."""
    served_score: float
    """The serving version's metric on them (NaN while waiting)."""
    shadow_score: float
    """The shadow version's metric on the same rows (NaN while waiting)."""
    reason: str


def paired_scores(metric: HoldoutMetric, rows: Sequence[PairedRow]) -> tuple[float, float]:
    """The served predictions' and the shadow predictions' metric on the same rows."""
    truth = np.array([row.label for row in rows], dtype=np.float64)
    served = np.array([row.served for row in rows], dtype=np.float64)
    shadow = np.array([row.shadow for row in rows], dtype=np.float64)
    return metric_value(metric.name, truth, served), metric_value(metric.name, truth, shadow)


def judge_live(
    metric: HoldoutMetric,
    rows: Sequence[PairedRow],
    *,
    needed: int,
    margin: float,
    served: str,
    shadow: str,
) -> LiveVerdict:
    """Swap when the shadow version beats the serving one by ``margin`` on the first
    ``needed`` rows; keep otherwise; wait while fewer rows are labelled.

    ``served`` and ``shadow`` name the two versions in the reason (``v4``, ``v3``).
    """
    if needed < 1:
        raise ValueError("a live comparison needs at least one row")
    if len(rows) < needed:
        return LiveVerdict(
            LiveAction.WAIT,
            len(rows),
            math.nan,
            math.nan,
            f"{len(rows)} of {needed} labelled rows served by {served} and scored by {shadow}",
        )
    first = rows[:needed]
    served_score, shadow_score = paired_scores(metric, first)
    # The shadow version stands where a challenger stands in the holdout rule.
    verdict = judge_challenger(metric, shadow_score, served_score, margin)
    reason = (
        f"{metric.name} on the first {needed} labelled rows served by {served}: {served} "
        f"{served_score:.4g} served, {shadow} {shadow_score:.4g} in shadow; "
        f"{shadow} {verdict.improvement:+.1%} against a margin of {margin:.1%}"
    )
    action = LiveAction.SWAP if verdict.promote else LiveAction.KEEP
    return LiveVerdict(action, needed, served_score, shadow_score, reason)


@dataclass(frozen=True, slots=True)
class Counterfactual:
    """What was served in a window against what a baseline version would have served."""

    baseline_version: int
    rows: int
    """Labelled rows of the window the baseline has a prediction for (served or shadow)."""
    served_score: float
    """The served predictions' metric on those rows."""
    baseline_score: float
    """The baseline version's metric on the same rows."""
    lift: float
    """Relative improvement of the served predictions over the baseline (0.1: 10 % better)."""


def window_score(metric: HoldoutMetric, rows: Sequence[WindowRow]) -> float:
    """The served predictions' metric on every labelled row of a window (NaN: none)."""
    if not rows:
        return math.nan
    truth = np.array([row.label for row in rows], dtype=np.float64)
    served = np.array([row.predictions[row.served_version] for row in rows], dtype=np.float64)
    return metric_value(metric.name, truth, served)


def counterfactuals(
    metric: HoldoutMetric, rows: Sequence[WindowRow], baselines: Mapping[str, int]
) -> dict[str, Counterfactual]:
    """Per baseline (name -> version), the served predictions against the baseline's on the
    window's rows the baseline has a prediction for; a baseline with none is left out.

    A row the baseline itself served counts with its served prediction (lift 0 on it): before
    the first promotion the first champion is what was served.
    """
    found: dict[str, Counterfactual] = {}
    for name, version in baselines.items():
        paired = [row for row in rows if version in row.predictions]
        if not paired:
            continue
        truth = np.array([row.label for row in paired], dtype=np.float64)
        served = np.array([row.predictions[row.served_version] for row in paired])
        baseline = np.array([row.predictions[version] for row in paired])
        served_score = metric_value(metric.name, truth, served)
        baseline_score = metric_value(metric.name, truth, baseline)
        lift = relative_improvement(metric, served_score, baseline_score)
        found[name] = Counterfactual(version, len(paired), served_score, baseline_score, lift)
    return found
