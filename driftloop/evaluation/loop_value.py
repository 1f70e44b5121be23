"""What the loop is worth, measured on a model's own time-ordered labelled data.

The same replayed rows (by default everything after the first model's ``training.until``) are
served four ways, and each is scored with the model's promotion metric:

- **frozen**: the first champion, trained as ``driftloop.training.bootstrap`` trains it (its
  rows and its holdout), left alone;
- **scheduled**: retrained at fixed moments (``monthly_moments``: the first of every month) on
  the history labelled so far, swapped in without a gate: the cron job the loop must beat;
- **drift loop**: the platform's own loop replayed offline, by its own code: windows of the
  declared span judged against each version's reference with the drift baseline's distances
  and calibrated thresholds (``driftloop.drift.baseline``), episodes
  (``driftloop.drift.episodes``), the retrain trigger's cooldown in prediction time
  (``driftloop.orchestration.ledger.decide``), the DAG's holdout cut and promotion rule
  (``driftloop.training.retrain.split_recent``, ``driftloop.training.policy``);
- **realised**: the predictions a live run actually served (the demo's), fed in.

Every retraining trains with ``driftloop.training.trainer.train_booster`` on the rows the
declared data policy chooses (``driftloop.training.history``), so a policy measured here is the
policy the DAG applies. A row's label is known ``label_delay`` after its time (the demo sends it
once the hour has passed); a retraining at moment *m* sees only the labels known by then.

The lift of one way over another is ``driftloop.training.policy.relative_improvement``, the
promotion rule's own measure: 0.10 is a 10 % lower RMSE (or log loss).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

import lightgbm as lgb
import numpy as np
import numpy.typing as npt
import pandas as pd

from driftloop.drift import episodes
from driftloop.drift.baseline import PreparedBaseline, calibrate, prepare, reference_arrays
from driftloop.drift.monitor import feature_drifts
from driftloop.drift.policy import DriftPolicy
from driftloop.drift.sketch import WindowSketch
from driftloop.orchestration.ledger import (
    Decision,
    LedgerEntry,
    PriorTrigger,
    TriggerState,
    dag_run_id_for,
    decide,
)
from driftloop.training import trainer
from driftloop.training.bootstrap import split_holdout
from driftloop.training.history import select_history
from driftloop.training.metrics import metric_value
from driftloop.training.policy import (
    HoldoutMetric,
    RetrainPolicy,
    TooFewLabelsError,
    holdout_metric,
    judge_challenger,
    relative_improvement,
)
from driftloop.training.retrain import (
    PREDICTED_AT_COLUMN,
    REQUEST_ID_COLUMN,
    WEIGHT_COLUMN,
    choose_history,
    split_recent,
)
from schemas.events import DriftDetected
from schemas.features import FeatureSpec, TrainingData

DEFAULT_LABEL_DELAY: Final = timedelta(hours=1)
"""When a label is known after its row: the demo sends an hour's count once the hour passed."""
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Served:
    """One way of serving the replayed rows: its predictions and what it took."""

    name: str
    predictions: npt.NDArray[np.float64]
    """One per replayed row, in their order."""
    retrains: int = 0
    """Challengers trained (a scheduled retrain is always swapped in)."""
    promotions: int = 0
    """New versions that served."""
    swaps: tuple[datetime, ...] = ()
    """When each new version started serving (prediction time)."""
    notes: tuple[str, ...] = field(default=())
    """What happened on the way (triggers, decisions), for people."""


@dataclass(frozen=True, slots=True)
class Comparison:
    """The realised error against the frozen and the scheduled baselines, on the same rows."""

    metric: HoldoutMetric
    rows: int
    realised: float
    frozen: float
    scheduled: float

    @property
    def lift_over_frozen(self) -> float:
        """Relative improvement of the realised error over the frozen champion's."""
        return relative_improvement(self.metric, self.realised, self.frozen)

    @property
    def lift_over_scheduled(self) -> float:
        """Relative improvement over the scheduled retrain's (negative: the cron job wins)."""
        return relative_improvement(self.metric, self.realised, self.scheduled)


def seed_history(spec: FeatureSpec) -> pd.DataFrame:
    """The declaration's seed data in time order with each row's time as ``predicted_at``."""
    if spec.dataset is None or spec.dataset.time is None:
        raise ValueError(
            f"{spec.name} declares no time column: its rows cannot be replayed in time order"
        )
    frame = trainer.read_dataset(spec)
    frame[PREDICTED_AT_COLUMN] = trainer.dataset_times(spec, frame).to_numpy()
    return frame


def replay_rows(
    spec: FeatureSpec, history: pd.DataFrame, start: datetime | None = None
) -> pd.DataFrame:
    """The rows replayed: from ``start`` (default: the first model's ``training.until``) on."""
    since = start or spec.training.until
    if since is None:
        raise ValueError(f"{spec.name} declares no training.until: say where the replay starts")
    chosen = history[history[PREDICTED_AT_COLUMN] >= pd.Timestamp(since)]
    return chosen.reset_index(drop=True)


def first_champion(
    spec: FeatureSpec, history: pd.DataFrame, *, num_boost_round: int = 200
) -> lgb.Booster:
    """The first model as bootstrap trains it: the declared span less its holdout."""
    train, _ = first_split(spec, history)
    return trainer.train_booster(spec, train, num_boost_round=num_boost_round)


def first_split(spec: FeatureSpec, history: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The first model's training rows and holdout: the declared span, cut as bootstrap cuts."""
    times = history[PREDICTED_AT_COLUMN]
    chosen = pd.Series(True, index=history.index)
    if spec.training.since is not None:
        chosen &= times >= pd.Timestamp(spec.training.since)
    if spec.training.until is not None:
        chosen &= times < pd.Timestamp(spec.training.until)
    return split_holdout(spec, history[chosen].reset_index(drop=True))


def predict(spec: FeatureSpec, booster: lgb.Booster, rows: pd.DataFrame) -> npt.NDArray[np.float64]:
    """The booster's predictions for ``rows`` (empty when there are none)."""
    if rows.empty:
        return np.empty(0, dtype=np.float64)
    return np.asarray(booster.predict(trainer.feature_matrix(spec, rows)), dtype=np.float64)


def score(spec: FeatureSpec, rows: pd.DataFrame, predictions: npt.NDArray[np.float64]) -> float:
    """The promotion metric of ``predictions`` on ``rows`` (non-finite predictions left out)."""
    kept = np.isfinite(predictions)
    truth = trainer.target_vector(spec, rows)
    return metric_value(spec.promotion_metric, truth[kept], predictions[kept])


def monthly_moments(start: datetime, end: datetime) -> list[datetime]:
    """The first of every month from ``start`` (included when it is one) to before ``end``."""
    moment = datetime(start.year, start.month, 1, tzinfo=UTC)
    if moment < start:
        moment = _next_month(moment)
    moments = []
    while moment < end:
        moments.append(moment)
        moment = _next_month(moment)
    return moments


def _next_month(moment: datetime) -> datetime:
    return moment.replace(year=moment.year + moment.month // 12, month=moment.month % 12 + 1)


def train_on_history(
    spec: FeatureSpec,
    history: pd.DataFrame,
    data: TrainingData,
    *,
    as_of: datetime | pd.Timestamp | None = None,
    num_boost_round: int = 200,
) -> lgb.Booster:
    """A version trained on the rows (and weights) the data policy chooses from ``history``."""
    chosen = select_history(history, history[PREDICTED_AT_COLUMN], data, as_of=as_of)
    return trainer.train_booster(
        spec, chosen.rows, num_boost_round=num_boost_round, weights=chosen.weights
    )


def serve_frozen(spec: FeatureSpec, replay: pd.DataFrame, first: lgb.Booster) -> Served:
    """The first champion on every replayed row."""
    return Served("frozen first champion", predict(spec, first, replay))


def serve_scheduled(
    spec: FeatureSpec,
    history: pd.DataFrame,
    replay: pd.DataFrame,
    first: lgb.Booster,
    moments: Sequence[datetime],
    *,
    data: TrainingData,
    label_delay: timedelta = DEFAULT_LABEL_DELAY,
    num_boost_round: int = 200,
    name: str = "scheduled",
) -> Served:
    """Retrained at each moment on the labels known by then, swapped in without a gate."""
    times = replay[PREDICTED_AT_COLUMN]
    predictions = predict(spec, first, replay)
    known_at = history[PREDICTED_AT_COLUMN] + label_delay
    for index, moment in enumerate(moments):
        stamp = pd.Timestamp(moment)
        booster = train_on_history(
            spec,
            history[known_at <= stamp].reset_index(drop=True),
            data,
            num_boost_round=num_boost_round,
        )
        until = pd.Timestamp(moments[index + 1]) if index + 1 < len(moments) else None
        served = (times >= stamp) & (times < until if until is not None else True)
        if served.any():
            predictions[served.to_numpy()] = predict(spec, booster, replay[served])
    return Served(
        name,
        predictions,
        retrains=len(moments),
        promotions=len(moments),
        swaps=tuple(moments),
    )


@dataclass(slots=True)
class _Version:
    number: int
    booster: lgb.Booster
    baseline: PreparedBaseline
    serving_since: pd.Timestamp


@dataclass(frozen=True, slots=True)
class LoopSettings:
    """The loop's knobs, as the platform's services and DAG have them."""

    data: TrainingData = field(default_factory=TrainingData)
    drift: DriftPolicy = field(default_factory=DriftPolicy)
    retrain: RetrainPolicy = field(default_factory=RetrainPolicy)
    cooldown: timedelta = timedelta(0)
    """Fixed cooldown in prediction time (``RETRAIN_TRIGGER_COOLDOWN_SECONDS``)."""
    cooldown_windows: float | None = 2.0
    """Cooldown in windows (``RETRAIN_TRIGGER_COOLDOWN_WINDOWS``); the longer applies."""
    window: timedelta | None = None
    """Span of a drift window; None: the declaration's ``monitoring.window``."""
    lag: timedelta = timedelta(0)
    """Prediction time between a drifted window's end and the promoted version serving (the
    DAG's run time; minutes in real time against windows of a week, hence 0)."""
    label_delay: timedelta = DEFAULT_LABEL_DELAY


def serve_drift_loop(
    spec: FeatureSpec,
    history: pd.DataFrame,
    replay: pd.DataFrame,
    first: lgb.Booster,
    settings: LoopSettings | None = None,
    *,
    progress: Callable[[str], None] | None = None,
) -> Served:
    """The platform's drift-triggered loop on the replayed rows (see the module docstring).

    Windows are aligned on multiples of the window since the Unix epoch, as the monitor's are;
    a promoted version serves from its run's end (the drifted window's end plus ``lag``).
    """
    settings = settings or LoopSettings()
    window = settings.window or spec.monitoring.window
    metric = holdout_metric(spec)
    model = spec.registered_model_name
    times = replay[PREDICTED_AT_COLUMN]
    all_times = history[PREDICTED_AT_COLUMN]
    known_at = all_times + settings.label_delay
    start = times.iloc[0].to_pydatetime()
    version = _Version(
        1, first, _baseline(spec, first, first_split(spec, history), settings), pd.Timestamp(start)
    )
    state = episodes.start(model, 1)
    ledger: dict[str, LedgerEntry] = {}
    last_trigger: PriorTrigger | None = None
    pending: _Version | None = None
    predictions = np.full(len(replay), np.nan, dtype=np.float64)
    retrains = 0
    swaps: list[datetime] = []
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        if progress is not None:
            progress(line)

    window_start = _EPOCH + (start - _EPOCH) // window * window
    end = times.iloc[-1].to_pydatetime()
    while window_start <= end:
        window_end = window_start + window
        inside = ((times >= window_start) & (times < window_end)).to_numpy()
        if pending is not None and pending.serving_since < pd.Timestamp(window_end):
            # The swap lands inside this window: the rows before it were the old version's,
            # and the monitor judges each version's rows apart; the old version's verdict no
            # longer matters, so only the new version's rows are judged.
            before = inside & (times < pending.serving_since).to_numpy()
            predictions[before] = predict(spec, version.booster, replay[before])
            inside &= ~before
            version, pending = pending, None
            state = episodes.follow(state, version.number)
            swaps.append(version.serving_since.to_pydatetime())
        rows = replay[inside]
        predictions[inside] = predict(spec, version.booster, rows)
        if len(rows) < settings.drift.min_rows:
            state = episodes.skip(state, window_end)
            window_start = window_end
            continue
        labelled = (known_at.reindex(rows.index) <= pd.Timestamp(window_end)).to_numpy()
        share, degraded = _judge(
            spec, version.baseline, rows, predictions[inside], labelled, settings.drift
        )
        step = episodes.advance(
            state,
            window_end,
            drifted=share >= settings.drift.drift_share_threshold or degraded,
            policy=settings.drift,
        )
        state = step.state
        # While a run is in flight (``lag``) no other starts: the DAG allows one active run.
        if step.drift_holds and step.episode_id is not None and pending is None:
            # A DriftDetected as the monitor publishes it; the report is not written offline.
            event = DriftDetected(
                model_name=model,
                model_version=version.number,
                episode_id=step.episode_id,
                window_start=window_start,
                window_end=window_end,
                window_rows=len(rows),
                drift_share=share,
                drifted_features=(),
                prediction_drifted=False,
                quality_degraded=degraded,
                report_uri="s3://offline/none.json",
            )
            # RetrainTrigger.cooldown_for: the longer of the fixed and the windows' cooldowns.
            cooldown = max(settings.cooldown, window * (settings.cooldown_windows or 0))
            verdict = decide(
                event,
                known_models=frozenset({model}),
                previous=ledger.get(step.episode_id),
                last_trigger=last_trigger,
                cooldown=cooldown,
            )
            if verdict.decision is Decision.SUPPRESS_COOLDOWN:
                note(f"{window_end:%Y-%m-%d} v{version.number} drift {share:.2f}: suppressed")
            elif verdict.decision is Decision.TRIGGER:
                ledger[step.episode_id] = LedgerEntry(
                    episode_id=step.episode_id,
                    model_name=model,
                    dag_id="retrain_model",
                    dag_run_id=dag_run_id_for(step.episode_id),
                    state=TriggerState.TRIGGERED,
                    reason=None,
                    triggered_at=window_end,
                    dag_run_state=None,
                )
                last_trigger = PriorTrigger(step.episode_id, window_end)
                retrains += 1
                challenger = _retrain(
                    spec,
                    history[known_at <= pd.Timestamp(window_end)].reset_index(drop=True),
                    version,
                    settings,
                    metric,
                    note=note,
                    at=window_end,
                )
                if challenger is not None:
                    challenger.serving_since = pd.Timestamp(window_end + settings.lag)
                    pending = challenger
        window_start = window_end
    return Served(
        "drift loop",
        predictions,
        retrains=retrains,
        promotions=len(swaps),
        swaps=tuple(swaps),
        notes=tuple(notes),
    )


def _baseline(
    spec: FeatureSpec,
    booster: lgb.Booster,
    parts: tuple[pd.DataFrame, pd.DataFrame],
    settings: LoopSettings,
) -> PreparedBaseline:
    # The version's reference is its own training rows and holdout with its own predictions,
    # as the DAG and bootstrap log it; calibrated on it as log_and_register does.
    train, holdout = parts
    reference = trainer.reference_frame(spec, [("train", train), ("holdout", holdout)], booster)
    return prepare(calibrate(spec, reference, settings.drift), reference)


def _judge(
    spec: FeatureSpec,
    prepared: PreparedBaseline,
    rows: pd.DataFrame,
    predictions: npt.NDArray[np.float64],
    labelled: npt.NDArray[np.bool_],
    policy: DriftPolicy,
) -> tuple[float, bool]:
    # The monitor's verdict (driftloop.drift.monitor.judge_window): the share, over the
    # monitored features (the predictions not counted), of those past their threshold; and
    # whether the promotion metric on the rows labelled by the window's end is past the
    # version's quality limit (quality_verdict).
    baseline = prepared.baseline
    frame = rows.assign(**{trainer.PREDICTION_COLUMN: predictions})
    sketch = WindowSketch.of(baseline.layout, reference_arrays(frame, baseline.layout))
    thresholds = {name: baseline.threshold(name, sketch.rows) for name in baseline.features}
    features = feature_drifts(spec, baseline.features, prepared.distances(sketch), thresholds)
    share = sum(feature.drifted for feature in features) / len(features)
    calibration = baseline.quality
    count = int(labelled.sum())
    if calibration is None or count < policy.min_labelled_rows:
        return share, False
    truth = trainer.target_vector(spec, rows[labelled])
    value = metric_value(calibration.metric, truth, predictions[labelled])
    return share, calibration.degraded(value, count)


def _retrain(
    spec: FeatureSpec,
    labelled: pd.DataFrame,
    champion: _Version,
    settings: LoopSettings,
    metric: HoldoutMetric,
    *,
    note: Callable[[str], None],
    at: datetime,
) -> _Version | None:
    # The DAG's extract: the labelled rows the champion served, the newest of them held out;
    # the challenger learns the data policy's choice of everything older than the holdout.
    served = labelled[labelled[PREDICTED_AT_COLUMN] >= champion.serving_since]
    served = served.assign(**{REQUEST_ID_COLUMN: served.index.astype(str).str.zfill(9)})
    served = served.tail(settings.retrain.max_recent_rows)
    try:
        _, holdout = split_recent(served, settings.retrain)
    except TooFewLabelsError:
        note(f"{at:%Y-%m-%d} v{champion.number}: too few labels ({len(served)}), run fails")
        return None
    holdout_start = holdout[PREDICTED_AT_COLUMN].iloc[0]
    older = labelled[labelled[PREDICTED_AT_COLUMN] < holdout_start].reset_index(drop=True)
    as_of = holdout[PREDICTED_AT_COLUMN].iloc[-1].to_pydatetime()
    try:
        rows, weighted = choose_history(
            older, settings.data, as_of, min_rows=settings.retrain.min_holdout_rows
        )
    except TooFewLabelsError as error:
        note(f"{at:%Y-%m-%d} v{champion.number}: {error}, run fails")
        return None
    weights = rows.pop(WEIGHT_COLUMN).to_numpy(dtype=np.float64) if weighted else None
    booster = trainer.train_booster(
        spec, rows, num_boost_round=settings.retrain.num_boost_round, weights=weights
    )
    truth = trainer.target_vector(spec, holdout)
    challenger_score = metric_value(metric.name, truth, predict(spec, booster, holdout))
    champion_score = metric_value(metric.name, truth, predict(spec, champion.booster, holdout))
    verdict = judge_challenger(
        metric, challenger_score, champion_score, settings.retrain.promotion_margin
    )
    outcome = "promoted" if verdict.promote else "rejected"
    note(f"{at:%Y-%m-%d} v{champion.number + 1} {outcome}: {verdict.reason}")
    if not verdict.promote:
        return None
    # The challenger's reference: its training rows and the holdout (retrain.py logs both).
    return _Version(
        champion.number + 1,
        booster,
        _baseline(spec, booster, (rows, holdout), settings),
        pd.Timestamp(at),
    )


def compare(
    spec: FeatureSpec,
    replay: pd.DataFrame,
    realised: npt.NDArray[np.float64],
    frozen: Served,
    scheduled: Served,
) -> Comparison:
    """The three errors on the rows the realised run served (non-finite: not served)."""
    if not len(realised) == len(frozen.predictions) == len(scheduled.predictions) == len(replay):
        raise ValueError("every way must give one prediction per replayed row")
    kept = np.isfinite(realised)
    if not kept.any():
        raise ValueError("the realised run served none of the replayed rows")
    rows = replay[kept]
    return Comparison(
        metric=holdout_metric(spec),
        rows=int(kept.sum()),
        realised=score(spec, rows, realised[kept]),
        frozen=score(spec, rows, frozen.predictions[kept]),
        scheduled=score(spec, rows, scheduled.predictions[kept]),
    )
