"""The Airflow REST client against httpx.MockTransport: tokens, idempotent triggers, errors."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import orjson
import pytest
from pydantic import SecretStr

from driftloop.orchestration.airflow import (
    FALLBACK_TOKEN_LIFETIME_SECONDS,
    AirflowAuthError,
    AirflowClient,
    AirflowRejectedError,
    AirflowUnavailableError,
    TriggerOutcome,
    token_expiry,
)
from driftloop.settings import AirflowApiSettings

SETTINGS = AirflowApiSettings(
    url="http://airflow.test", username="driftloop", password=SecretStr("pw")
)


def jwt(claims: dict[str, object]) -> str:
    def part(data: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(data)).rstrip(b"=").decode()

    return f"{part({'alg': 'HS512', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


@dataclass
class FakeClock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeAirflow:
    """A scripted Airflow: issues tokens valid for ``lifetime`` and answers dagRuns."""

    clock: FakeClock
    lifetime: float = 3600.0
    with_exp: bool = True
    dag_runs: dict[str, int] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    api_calls: int = 0
    answer: Callable[[httpx.Request], httpx.Response | None] | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/token":
            body = json.loads(request.content)
            if body != {"username": "driftloop", "password": "pw"}:
                return httpx.Response(401, json={"detail": "Invalid credentials"})
            claims: dict[str, object] = {"sub": "driftloop", "n": len(self.tokens)}
            if self.with_exp:
                claims["exp"] = int(self.clock.now + self.lifetime)
            token = jwt(claims)
            self.tokens.append(token)
            return httpx.Response(201, json={"access_token": token})
        self.api_calls += 1
        token = request.headers["Authorization"].removeprefix("Bearer ")
        if token not in self.tokens or token in self.revoked:
            return httpx.Response(401, json={"detail": "Token expired"})
        if self.answer is not None and (scripted := self.answer(request)) is not None:
            return scripted
        if request.method == "POST":
            run_id = json.loads(request.content)["dag_run_id"]
            if run_id in self.dag_runs:
                return httpx.Response(409, json={"detail": "exists"})
            self.dag_runs[run_id] = 1
            return httpx.Response(200, json={"dag_run_id": run_id, "state": "queued"})
        return httpx.Response(
            200,
            json={
                "dag_id": "retrain_model",
                "dag_run_id": request.url.path.rsplit("/", 1)[-1],
                "state": "running",
                "queued_at": "2026-11-28T10:00:00Z",
                "start_date": "2026-11-28T10:00:01.5Z",
                "end_date": None,
            },
        )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def airflow(clock: FakeClock) -> FakeAirflow:
    return FakeAirflow(clock)


def client_for(airflow: FakeAirflow, clock: FakeClock, **options: float) -> AirflowClient:
    return AirflowClient(
        SETTINGS,
        transport=httpx.MockTransport(airflow),
        clock=clock,
        backoff_initial_seconds=0.001,
        backoff_max_seconds=0.001,
        **options,  # type: ignore[arg-type]
    )


def test_token_expiry_reads_exp_without_verifying() -> None:
    assert token_expiry(jwt({"exp": 1234})) == 1234.0
    assert token_expiry(jwt({"sub": "x"})) is None
    assert token_expiry("not-a-jwt") is None
    assert token_expiry("a.!!!.c") is None
    assert token_expiry(jwt({"exp": True})) is None


async def test_trigger_is_created_then_already_exists(
    airflow: FakeAirflow, clock: FakeClock
) -> None:
    async with client_for(airflow, clock) as client:
        first = await client.trigger_dag_run("retrain_model", "drift-e1", {"a": 1})
        second = await client.trigger_dag_run("retrain_model", "drift-e1", {"a": 1})
    assert (first, second) == (TriggerOutcome.CREATED, TriggerOutcome.ALREADY_EXISTS)
    assert len(airflow.tokens) == 1


async def test_token_is_reused_until_shortly_before_expiry(
    airflow: FakeAirflow, clock: FakeClock
) -> None:
    async with client_for(airflow, clock) as client:
        await client.get_dag_run("retrain_model", "r1")
        clock.now += 3600 - 61  # still more than the 60 s margin left
        await client.get_dag_run("retrain_model", "r1")
        assert len(airflow.tokens) == 1
        clock.now += 2  # inside the margin: refreshed before it lapses
        await client.get_dag_run("retrain_model", "r1")
        assert len(airflow.tokens) == 2
    assert airflow.api_calls == 3  # no request was ever refused


async def test_short_lived_token_refreshes_at_four_fifths_of_its_life(
    clock: FakeClock,
) -> None:
    airflow = FakeAirflow(clock, lifetime=100)
    async with client_for(airflow, clock) as client:
        await client.get_dag_run("d", "r")
        clock.now += 79
        await client.get_dag_run("d", "r")
        assert len(airflow.tokens) == 1
        clock.now += 2
        await client.get_dag_run("d", "r")
        assert len(airflow.tokens) == 2


async def test_token_without_exp_lives_the_fallback_lifetime(clock: FakeClock) -> None:
    airflow = FakeAirflow(clock, with_exp=False)
    async with client_for(airflow, clock) as client:
        await client.get_dag_run("d", "r")
        clock.now += FALLBACK_TOKEN_LIFETIME_SECONDS + 1
        await client.get_dag_run("d", "r")
    assert len(airflow.tokens) == 2


async def test_a_revoked_token_is_replaced_once_and_the_call_repeated(
    airflow: FakeAirflow, clock: FakeClock
) -> None:
    async with client_for(airflow, clock) as client:
        await client.get_dag_run("d", "r")
        airflow.revoked.add(airflow.tokens[0])
        run = await client.get_dag_run("d", "r")
    assert run.state == "running"
    assert run.start_date is not None
    assert run.start_date.microsecond == 500_000
    assert len(airflow.tokens) == 2
    assert airflow.api_calls == 3


async def test_refused_credentials_are_an_auth_error(clock: FakeClock) -> None:
    airflow = FakeAirflow(clock)
    settings = SETTINGS.model_copy(update={"password": SecretStr("wrong")})
    client = AirflowClient(
        settings, transport=httpx.MockTransport(airflow), clock=clock, attempts=1
    )
    async with client:
        with pytest.raises(AirflowAuthError, match="AIRFLOW_API_PASSWORD"):
            await client.trigger_dag_run("d", "r", {})
    assert airflow.api_calls == 0


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_other_4xx_is_rejected_at_once(
    airflow: FakeAirflow, clock: FakeClock, status: int
) -> None:
    airflow.answer = lambda _: httpx.Response(status, json={"detail": "Dag not found"})
    async with client_for(airflow, clock, attempts=3) as client:
        with pytest.raises(AirflowRejectedError) as raised:
            await client.trigger_dag_run("missing", "r", {})
    assert raised.value.status_code == status
    assert raised.value.detail == "Dag not found"
    assert airflow.api_calls == 1


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_5xx_and_429_are_retried_then_unavailable(
    airflow: FakeAirflow, clock: FakeClock, status: int
) -> None:
    airflow.answer = lambda _: httpx.Response(status, text="busy")
    async with client_for(airflow, clock, attempts=3) as client:
        with pytest.raises(AirflowUnavailableError, match=str(status)):
            await client.trigger_dag_run("d", "r", {})
    assert airflow.api_calls == 3


async def test_a_5xx_then_success_is_retried_transparently(
    airflow: FakeAirflow, clock: FakeClock
) -> None:
    answers = iter([httpx.Response(502, text="bad gateway")])
    airflow.answer = lambda _: next(answers, None)
    async with client_for(airflow, clock, attempts=3) as client:
        assert await client.trigger_dag_run("d", "r", {}) is TriggerOutcome.CREATED
    assert airflow.api_calls == 2


async def test_unreachable_airflow_is_unavailable(clock: FakeClock) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    client = AirflowClient(
        SETTINGS,
        transport=httpx.MockTransport(refuse),
        clock=clock,
        attempts=2,
        backoff_initial_seconds=0.001,
        backoff_max_seconds=0.001,
    )
    async with client:
        with pytest.raises(AirflowUnavailableError, match="ConnectError"):
            await client.trigger_dag_run("d", "r", {})
    assert client.tokens_issued == 0


async def test_trigger_sends_run_id_null_logical_date_and_conf(
    airflow: FakeAirflow, clock: FakeClock
) -> None:
    seen: list[dict[str, object]] = []

    def capture(request: httpx.Request) -> None:
        seen.append(json.loads(request.content))
        return None

    airflow.answer = capture
    async with client_for(airflow, clock) as client:
        await client.trigger_dag_run("retrain_model", "drift-e:1", {"k": "v"}, note="n")
    assert seen == [
        {"dag_run_id": "drift-e:1", "logical_date": None, "conf": {"k": "v"}, "note": "n"}
    ]
