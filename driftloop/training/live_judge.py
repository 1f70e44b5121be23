"""The live judge: moves a model's aliases on labelled live rows, and measures what each move won.

Run by the shadow-scorer's leader replica (``consumers.shadow_scorer``) every few seconds per
model, on the rows ``driftloop.storage.shadow_log`` joins (served predictions, shadow
predictions and labels of the same requests), with the rules of
``driftloop.training.live_evidence`` and the model's declaration (``training.live``):

- **rollback**: a champion the DAG (or this judge) promoted is judged once, over its first
  ``rows`` labelled rows, against the version it replaced (scored in shadow meanwhile). When
  that version beats it by ``margin``, the ``champion`` alias moves back and
  ``ModelRolledBack`` is published; otherwise it is tagged kept. The restored version is
  tagged ``driftloop.restored_from`` and never judged again for that promotion.
- **shadow promotion**: a challenger under the alias ``challenger`` (put there by the DAG for a
  model declared ``training.live.promotion: shadow``) is judged over the first ``rows``
  labelled rows the champion served while it was scored beside it: it becomes champion
  (``ModelPromoted``) when it beats the champion by ``margin``, else its alias is removed
  (``ModelRejected``).
- **counterfactual**: in the latest window of prediction time, the served predictions' error on
  the labelled rows against the previous champion's and the first champion's on the same rows.

The alias moves follow the DAG's safety rules (``driftloop.training.retrain``): the alias must
still be on the version judged, checked just before it moves (MLflow has no compare-and-set;
another judge or a person moving it in between is logged and left alone); the versions are
tagged after the move; the event is published last, waiting for the broker. So that a failure
between the move and the acknowledgement loses no event, the event is written first as the tag
``driftloop.pending_event`` of the version about to become champion, published again by the
next round while that tag is there, and the tag removed once acknowledged (the event id is
derived from model, version and outcome, so a repeat is recognisable). A challenger's
rejection is kept the same way on the champion, which stays.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from mlflow.tracking import MlflowClient

from driftloop.serving.champion import ChampionRef
from driftloop.serving.shadow import (
    RESTORED_FROM_TAG,
    ShadowPlan,
    resolve_plan,
)
from driftloop.storage.shadow_log import ShadowLog
from driftloop.training.live_evidence import (
    Counterfactual,
    LiveAction,
    LiveVerdict,
    counterfactuals,
    judge_live,
    window_score,
)
from driftloop.training.policy import HoldoutMetric, holdout_metric
from driftloop.training.retrain import (
    CHAMPION_VERSION_TAG,
    DECISION_REASON_TAG,
    DECISION_TAG,
    EPISODE_TAG,
    Outcome,
)
from driftloop.training.trainer import CHALLENGER_ALIAS, CHAMPION_ALIAS
from schemas.events import (
    ModelDecision,
    ModelPromoted,
    ModelRejected,
    ModelRolledBack,
    decode_model_event,
)
from schemas.features import FeatureSpec
from schemas.fields import utc_now

log = logging.getLogger(__name__)

# Version tags of the live verdicts.
LIVE_VERDICT_TAG: Final = "driftloop.live_verdict"
LIVE_REASON_TAG: Final = "driftloop.live_reason"
PENDING_EVENT_TAG: Final = "driftloop.pending_event"
KEPT: Final = "kept"
ROLLED_BACK: Final = "rolled_back"
RESTORED: Final = "restored"
SHADOW: Final = "shadow"

# Namespace of the live decisions' event ids: uuid5(namespace, "<model>:<version>:<outcome>").
_LIVE_NAMESPACE: Final = uuid.UUID("0c6d2b1e-5a7f-4f3b-8e0d-9b1f6a2c4d71")

Publish = Callable[[ModelDecision], Awaitable[None]]
EXPIRY_INTERVAL_SECONDS: Final = 600.0
# The counterfactual of a window is computed on its newest labelled rows, at most this many:
# the judge runs every few seconds, and a week of a busy model's rows would be millions.
WINDOW_ROWS_LIMIT: Final = 20_000


@dataclass(frozen=True, slots=True)
class WindowFigures:
    """The counterfactual accounting of one model's latest window."""

    start: datetime
    end: datetime
    metric: HoldoutMetric
    labelled_rows: int
    served_score: float
    """The served predictions' metric on every labelled row of the window (NaN: none)."""
    baselines: Mapping[str, Counterfactual]
    """``previous_champion`` / ``first_champion`` -> the comparison on the same rows."""


@dataclass(frozen=True, slots=True)
class Judgement:
    """What one round did for one model."""

    model_name: str
    champion_version: int
    rollback: LiveVerdict | None
    """The rollback verdict of this round (None: nothing to judge)."""
    challenger: LiveVerdict | None
    """The shadow challenger's verdict of this round (None: no challenger)."""
    window: WindowFigures | None
    published: tuple[ModelDecision, ...]


def _event_id(model_name: str, version: int, outcome: str) -> uuid.UUID:
    return uuid.uuid5(_LIVE_NAMESPACE, f"{model_name}:{version}:{outcome}")


class LiveJudge:
    """Judges every model it is asked about; one instance per leader replica."""

    def __init__(
        self,
        client: MlflowClient,
        shadow_log: ShadowLog,
        publish: Publish,
        declaration: Callable[[ChampionRef], Awaitable[FeatureSpec]],
        *,
        window: Callable[[FeatureSpec], timedelta] | None = None,
    ) -> None:
        self.client = client
        self.shadow_log = shadow_log
        self.publish = publish
        self.declaration = declaration
        self.window = window or (lambda spec: spec.monitoring.window)
        self._expired_at: dict[str, float] = {}

    async def judge(self, name: str) -> Judgement | None:
        """One round for one model: pending event, rollback, challenger, window figures.

        The rules are the champion's declaration's (``training.live``, the promotion metric,
        the hot retention), as registered with it. None when the model has no champion.
        """
        plan = await asyncio.to_thread(resolve_plan, self.client, name)
        if plan is None:
            return None
        spec = await self.declaration(plan.champion)
        published: list[ModelDecision] = []
        pending = plan.champion_tags.get(PENDING_EVENT_TAG)
        if pending is not None:
            # A move whose event was not acknowledged: send it again before anything else.
            published.append(await self._publish(plan.champion.version, pending))
        metric = holdout_metric(spec)
        live = spec.training.live
        rollback: LiveVerdict | None = None
        if live.rollback and self._awaits_rollback_verdict(plan):
            assert plan.previous is not None  # noqa: S101 - checked by _awaits_rollback_verdict
            rows = await self.shadow_log.first_paired_rows(
                name, plan.champion.version, plan.previous, live.rows
            )
            rollback = judge_live(
                metric,
                rows,
                needed=live.rows,
                margin=live.margin,
                served=f"v{plan.champion.version}",
                shadow=f"v{plan.previous}",
            )
            event = await self._apply_rollback(plan, metric, rollback)
            if event is not None:
                published.append(event)
        challenger: LiveVerdict | None = None
        if rollback is None or rollback.action is not LiveAction.SWAP:
            # After a rollback the plan is stale; the challenger waits for the next round.
            challenger, event = await self._judge_challenger(plan, spec, metric)
            if event is not None:
                published.append(event)
        now = time.monotonic()
        if now - self._expired_at.get(name, -math.inf) >= EXPIRY_INTERVAL_SECONDS:
            # Rows leave by the day (the hot retention is at least one): a sweep every few
            # minutes keeps the table bounded without a DELETE at every round.
            await self.shadow_log.expire(name, spec.retention.hot)
            self._expired_at[name] = now
        window = await self.window_figures(plan, metric, self.window(spec))
        return Judgement(
            name, plan.champion.version, rollback, challenger, window, tuple(published)
        )

    @staticmethod
    def _awaits_rollback_verdict(plan: ShadowPlan) -> bool:
        tags = plan.champion_tags
        return (
            plan.previous is not None
            and tags.get(DECISION_TAG) == Outcome.PROMOTED.value
            and RESTORED_FROM_TAG not in tags
            and LIVE_VERDICT_TAG not in tags
        )

    async def window_figures(
        self, plan: ShadowPlan, metric: HoldoutMetric, span: timedelta
    ) -> WindowFigures:
        """The served error of the latest ``span`` of prediction time against the previous and
        the first champion's on the same labelled rows."""
        end = utc_now()
        start = end - span
        rows = await self.shadow_log.window_rows(
            plan.model_name, start, end, limit=WINDOW_ROWS_LIMIT
        )
        baselines = {"first_champion": plan.first}
        if plan.previous is not None:
            baselines["previous_champion"] = plan.previous
        return WindowFigures(
            start=start,
            end=end,
            metric=metric,
            labelled_rows=len(rows),
            served_score=window_score(metric, rows),
            baselines=counterfactuals(metric, rows, baselines),
        )

    # --- rollback ----------------------------------------------------------------------------

    async def _apply_rollback(
        self, plan: ShadowPlan, metric: HoldoutMetric, verdict: LiveVerdict
    ) -> ModelDecision | None:
        name, demoted = plan.model_name, plan.champion.version
        if verdict.action is LiveAction.WAIT:
            return None
        if verdict.action is LiveAction.KEEP:
            await self._tag(
                name, demoted, {LIVE_VERDICT_TAG: KEPT, LIVE_REASON_TAG: verdict.reason}
            )
            log.info("%s v%d keeps the alias: %s", name, demoted, verdict.reason)
            return None
        assert plan.previous is not None  # noqa: S101 - a rollback verdict needs one
        restored = plan.previous
        restored_run = plan.shadows[restored].ref.run_id
        event = ModelRolledBack(
            event_id=_event_id(name, demoted, ROLLED_BACK),
            model_name=name,
            model_version=restored,
            run_id=restored_run,
            champion_version=demoted,
            metric_name=metric.name,
            greater_is_better=metric.greater_is_better,
            challenger_score=verdict.shadow_score,
            champion_score=verdict.served_score,
            episode_id=plan.champion_tags.get(EPISODE_TAG),
            reason=verdict.reason,
            live_rows=verdict.rows,
        )
        moved = await self._move_champion(
            plan,
            to_version=restored,
            event=event,
            new_champion_tags={
                RESTORED_FROM_TAG: str(demoted),
                LIVE_VERDICT_TAG: RESTORED,
                LIVE_REASON_TAG: verdict.reason,
            },
            old_champion_tags={LIVE_VERDICT_TAG: ROLLED_BACK, LIVE_REASON_TAG: verdict.reason},
        )
        if not moved:
            return None
        log.warning("ROLLED BACK %s v%d -> v%d: %s", name, demoted, restored, verdict.reason)
        return await self._publish(restored, event.to_bytes().decode())

    # --- shadow promotion --------------------------------------------------------------------

    async def _judge_challenger(
        self, plan: ShadowPlan, spec: FeatureSpec, metric: HoldoutMetric
    ) -> tuple[LiveVerdict | None, ModelDecision | None]:
        challenger = plan.challenger
        if challenger is None:
            return None, None
        name, champion = plan.model_name, plan.champion.version
        live = spec.training.live
        rows = await self.shadow_log.first_paired_rows(name, champion, challenger, live.rows)
        verdict = judge_live(
            metric,
            rows,
            needed=live.rows,
            margin=live.margin,
            served=f"v{champion}",
            shadow=f"v{challenger}",
        )
        if verdict.action is LiveAction.WAIT:
            return verdict, None
        tags = await asyncio.to_thread(
            lambda: self.client.get_model_version(name, str(challenger)).tags
        )
        run_id = plan.shadows[challenger].ref.run_id
        fields: dict[str, Any] = {
            "model_name": name,
            "model_version": challenger,
            "run_id": run_id,
            "champion_version": champion,
            "metric_name": metric.name,
            "greater_is_better": metric.greater_is_better,
            "challenger_score": verdict.shadow_score,
            "champion_score": verdict.served_score,
            "episode_id": tags.get(EPISODE_TAG),
        }
        if verdict.action is LiveAction.SWAP:
            promoted = ModelPromoted(
                event_id=_event_id(name, challenger, Outcome.PROMOTED.value), **fields
            )
            moved = await self._move_champion(
                plan,
                to_version=challenger,
                event=promoted,
                new_champion_tags={
                    DECISION_TAG: Outcome.PROMOTED.value,
                    DECISION_REASON_TAG: f"live evidence in shadow: {verdict.reason}",
                    CHAMPION_VERSION_TAG: str(champion),
                },
                old_champion_tags={},
            )
            if not moved:
                return verdict, None
            await asyncio.to_thread(
                self.client.delete_registered_model_alias, name, CHALLENGER_ALIAS
            )
            log.info("PROMOTED %s v%d from shadow: %s", name, challenger, verdict.reason)
            return verdict, await self._publish(challenger, promoted.to_bytes().decode())
        rejected = ModelRejected(
            event_id=_event_id(name, challenger, Outcome.REJECTED.value),
            reason=f"live evidence in shadow: {verdict.reason}",
            **fields,
        )
        document = rejected.to_bytes().decode()
        # Pending on the champion, which stays: once the alias is gone no later round would
        # find this challenger again to announce it.
        await self._tag(name, champion, {PENDING_EVENT_TAG: document})
        await asyncio.to_thread(self.client.delete_registered_model_alias, name, CHALLENGER_ALIAS)
        await self._tag(
            name,
            challenger,
            {DECISION_TAG: Outcome.REJECTED.value, DECISION_REASON_TAG: rejected.reason},
        )
        log.info("REJECTED %s v%d in shadow: %s", name, challenger, verdict.reason)
        return verdict, await self._publish(champion, document)

    # --- the alias move ----------------------------------------------------------------------

    async def _move_champion(
        self,
        plan: ShadowPlan,
        *,
        to_version: int,
        event: ModelDecision,
        new_champion_tags: Mapping[str, str],
        old_champion_tags: Mapping[str, str],
    ) -> bool:
        """Move ``champion`` from the plan's champion to ``to_version``; False when it moved
        meanwhile (left alone)."""
        name, judged = plan.model_name, plan.champion.version
        current = await asyncio.to_thread(
            lambda: int(self.client.get_model_version_by_alias(name, CHAMPION_ALIAS).version)
        )
        if current != judged:
            log.warning(
                "%s: champion moved to v%d since v%d was judged; %s not applied",
                name,
                current,
                judged,
                type(event).__name__,
            )
            return False
        # The event first, as a tag of the version about to serve: a crash after the move
        # leaves it there for the next round to publish.
        await self._tag(name, to_version, {PENDING_EVENT_TAG: event.to_bytes().decode()})
        await asyncio.to_thread(
            self.client.set_registered_model_alias, name, CHAMPION_ALIAS, str(to_version)
        )
        await self._tag(name, to_version, new_champion_tags)
        await self._tag(name, judged, old_champion_tags)
        return True

    async def _publish(self, version: int, document: str) -> ModelDecision:
        event = decode_model_event(document.encode())
        await self.publish(event)
        await asyncio.to_thread(
            self.client.delete_model_version_tag, event.model_name, str(version), PENDING_EVENT_TAG
        )
        log.info("%s %s published", type(event).__name__, event.event_id)
        return event

    async def _tag(self, name: str, version: int, tags: Mapping[str, str]) -> None:
        def write() -> None:
            for key, value in tags.items():
                self.client.set_model_version_tag(name, str(version), key, value)

        await asyncio.to_thread(write)
