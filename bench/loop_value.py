"""What the loop is worth on the demo replay, and which training-data policy to default to.

Offline, by the platform's own code (``driftloop.evaluation.loop_value``): the declaration's
seed data after the first model's span (bikeshare: April to December 2011) is served

- by the frozen first champion (bootstrap's rows and holdout);
- by a monthly retrain on all history so far (the platform's trainer, no gate): the issue's
  scheduled baseline;
- by the drift loop replayed offline (windows, episodes, cooldown, the DAG's holdout and
  promotion rule), under each candidate training-data policy, and the monthly retrain under
  the same policy for reference;
- by the default loop with parts of its trigger left out: input drift alone (as before issue
  15's second part), with episodes renewed, with the labelled error judged, and both;
- by the default loop with the promoted version starting late (``--lags``): what a demo whose
  clock runs on while the DAG trains would give (30 simulated hours a second make a 60 s run
  75 days);
- by the default loop in the demo's time base: the gateway stamps logged rows with the wall
  clock (the whole replay is minutes), the seed rows keep their 2011 dates, so a span in days
  drops every seed row at the first retraining and keeps every logged row.

Prints each figure, its ratio to the anchors measured in issue 15 (frozen 105.8,
monthly-on-all-history 64.4, the demo loop 91.5), the loop's lifts over the frozen and the
monthly baselines, and its retrains and promotions against the monthly job's.

    uv run python bench/loop_value.py [--model bikeshare] [--policies all,90,hl30] [--lags 0,7,75]
"""

from __future__ import annotations

import argparse
import time
from datetime import timedelta

import pandas as pd

from driftloop.drift.policy import DriftPolicy
from driftloop.evaluation import loop_value as lv
from driftloop.training.policy import holdout_metric, relative_improvement
from driftloop.training.retrain import PREDICTED_AT_COLUMN
from schemas.features import TrainingData, load_feature_spec

# Issue 15, measured on a fresh clone's `make demo` and offline on the same data.
ANCHOR_FROZEN = 105.8
ANCHOR_MONTHLY = 64.4
ANCHOR_LOOP = 91.5
DEFAULT_POLICIES = "all,30,60,90,120,180,hl14,hl30,hl60"
# The trigger as it was before quality judgement and episode renewal, and each part added.
DRIFT_ONLY = DriftPolicy(judge_quality=False, renew_episode_windows=None)
RENEWED = {"renew_episode_windows": DriftPolicy().renew_episode_windows}
QUALITY = {"judge_quality": True}


def policy_of(text: str) -> TrainingData:
    """``all``, ``<days>`` (last N days) or ``hl<days>`` (a half-life)."""
    if text == "all":
        return TrainingData()
    if text.startswith("hl"):
        return TrainingData(half_life_days=float(text[2:]))
    return TrainingData(last_days=float(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bikeshare", help="declaration in schemas/models")
    parser.add_argument("--policies", default=DEFAULT_POLICIES, help="candidate data policies")
    parser.add_argument("--lags", default="0,1,7,75", help="days before a promotion serves")
    arguments = parser.parse_args()
    spec = load_feature_spec(arguments.model)
    metric = holdout_metric(spec)
    started = time.perf_counter()
    history = lv.seed_history(spec)
    replay = lv.replay_rows(spec, history)
    times = replay[PREDICTED_AT_COLUMN]
    first = lv.first_champion(spec, history)
    moments = lv.monthly_moments(times.iloc[0].to_pydatetime(), times.iloc[-1].to_pydatetime())
    frozen = lv.serve_frozen(spec, replay, first)
    monthly = lv.serve_scheduled(
        spec, history, replay, first, moments, data=TrainingData(), name="monthly, all history"
    )
    frozen_score = lv.score(spec, replay, frozen.predictions)
    monthly_score = lv.score(spec, replay, monthly.predictions)
    default = spec.training_data
    print(
        f"{spec.name}: {len(replay)} replayed rows, {times.iloc[0]:%Y-%m-%d} to "
        f"{times.iloc[-1]:%Y-%m-%d}; {metric.name}; default data policy: {default.describe()}\n"
        f"  frozen first champion       {frozen_score:7.1f}   "
        f"(anchor {ANCHOR_FROZEN}: x{frozen_score / ANCHOR_FROZEN:.3f})\n"
        f"  monthly on all history      {monthly_score:7.1f}   "
        f"(anchor {ANCHOR_MONTHLY}: x{monthly_score / ANCHOR_MONTHLY:.3f}), "
        f"{monthly.retrains} retrains\n"
        f"  issue 15's demo loop        {ANCHOR_LOOP:7.1f}   "
        f"(x{ANCHOR_LOOP / ANCHOR_MONTHLY:.3f} the monthly anchor)"
    )

    def lifts(value: float) -> str:
        over_frozen = relative_improvement(metric, value, frozen_score)
        over_monthly = relative_improvement(metric, value, monthly_score)
        return f"lift {over_frozen:+6.1%} over frozen, {over_monthly:+6.1%} over monthly"

    print(
        "\ncandidate data policies: the drift loop offline, and a monthly retrain on the same "
        "policy\n"
        f"  {'policy':<22}{'loop':>7}{'retrains':>9}{'promoted':>9}  {'lifts':<48}"
        f"{'monthly':>9}{'ratio':>8}"
    )

    def loop_with(settings: lv.LoopSettings) -> tuple[lv.Served, float]:
        """The drift loop under ``settings`` on the replay, and its score."""
        loop = lv.serve_drift_loop(spec, history, replay, first, settings)
        return loop, lv.score(spec, replay, loop.predictions)

    for text in arguments.policies.split(","):
        data = policy_of(text.strip())
        loop, loop_score = loop_with(lv.LoopSettings(data=data))
        scheduled = lv.serve_scheduled(spec, history, replay, first, moments, data=data)
        scheduled_score = lv.score(spec, replay, scheduled.predictions)
        mark = " (default)" if data == default else ""
        print(
            f"  {data.describe() + mark:<22}{loop_score:7.1f}{loop.retrains:9d}"
            f"{loop.promotions:9d}  {lifts(loop_score):<48}{scheduled_score:9.1f}"
            f"{loop_score / monthly_score:8.3f}",
            flush=True,
        )
    print(
        f"\nwhat each part of the trigger adds (the default loop, {default.describe()})\n"
        f"  {'trigger':<44}{'loop':>7}{'retrains':>9}{'promoted':>9}  lifts"
    )
    for label, drift in (
        ("input drift only, one retraining an episode", DRIFT_ONLY),
        ("input drift, episodes renewed", DRIFT_ONLY.model_copy(update=RENEWED)),
        ("input drift and quality, one retraining", DRIFT_ONLY.model_copy(update=QUALITY)),
        ("input drift and quality, renewed (default)", DriftPolicy()),
    ):
        loop, loop_score = loop_with(lv.LoopSettings(data=default, drift=drift))
        print(
            f"  {label:<44}{loop_score:7.1f}{loop.retrains:9d}{loop.promotions:9d}  "
            f"{lifts(loop_score)}",
            flush=True,
        )
    print(
        f"\nthe default loop ({default.describe()}) when a promotion serves late "
        "(the DAG's run time in prediction time)"
    )
    for text in arguments.lags.split(","):
        lag = timedelta(days=float(text))
        loop, loop_score = loop_with(lv.LoopSettings(data=default, lag=lag))
        print(
            f"  lag {float(text):4g} days  {loop_score:7.1f}  {loop.retrains} retrains, "
            f"{loop.promotions} promoted  {lifts(loop_score)}",
            flush=True,
        )
    # The demo's time base: the logged rows 15 years after the seed rows, every logged row
    # inside the span (a replay of minutes).
    demo_base = history.copy()
    logged = demo_base[PREDICTED_AT_COLUMN] >= times.iloc[0]
    demo_base.loc[logged, PREDICTED_AT_COLUMN] += pd.Timedelta(days=365 * 15)
    demo_replay = lv.replay_rows(spec, demo_base)
    loop = lv.serve_drift_loop(
        spec, demo_base, demo_replay, first, lv.LoopSettings(data=TrainingData(last_days=3650))
    )
    loop_score = lv.score(spec, demo_replay, loop.predictions)
    print(
        f"\nthe default loop in the demo's time base (seed rows dropped, every logged row kept)\n"
        f"  {loop_score:7.1f}  {loop.retrains} retrains, {loop.promotions} promoted  "
        f"{lifts(loop_score)}"
    )
    print(f"\n{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
