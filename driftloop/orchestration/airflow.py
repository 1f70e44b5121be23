"""Async client of the Airflow 3 REST API: JWT from ``/auth/token``, trigger and read DAG runs.

Errors are typed by what the caller should do: ``AirflowUnavailableError`` (unreachable, a
timeout, 5xx or 429, credentials refused) means "retry later"; ``AirflowRejectedError`` (any
other 4xx, e.g. a missing DAG or a refused run id or conf) means "this request will never
succeed, record it as failed". A 409 on trigger is not an error: the run id already exists,
which is how a caller makes triggering idempotent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final, TypeVar
from urllib.parse import quote

import httpx
import orjson
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from driftloop.settings import AirflowApiSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

# A token whose expiry cannot be read is kept this long (Airflow's default lifetime is 24 h).
FALLBACK_TOKEN_LIFETIME_SECONDS: Final = 300.0
# Refresh this long before expiry, so a request never leaves with a token about to lapse.
REFRESH_MARGIN_SECONDS: Final = 60.0
TERMINAL_DAG_RUN_STATES: Final = frozenset({"success", "failed"})


class AirflowError(RuntimeError):
    """Base of the Airflow client's errors."""


class AirflowUnavailableError(AirflowError):
    """Airflow is unreachable, overloaded (5xx/429) or refuses our credentials: retry later."""


class AirflowAuthError(AirflowUnavailableError):
    """``/auth/token`` refused the credentials; an operator must fix them, the event is fine."""


class AirflowRejectedError(AirflowError):
    """Airflow refused the request itself (4xx other than 409): retrying will not help."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(f"Airflow answered {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail


class TriggerOutcome(StrEnum):
    """What a trigger request achieved."""

    CREATED = "created"
    ALREADY_EXISTS = "already_exists"


@dataclass(frozen=True, slots=True)
class DagRun:
    """The state of one DAG run as the REST API reports it."""

    dag_id: str
    run_id: str
    state: str
    queued_at: datetime | None
    start_date: datetime | None
    end_date: datetime | None

    @property
    def finished(self) -> bool:
        """Whether the run reached a terminal state."""
        return self.state in TERMINAL_DAG_RUN_STATES


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (Unix seconds), read without verifying; None if unreadable."""
    # The signature is Airflow's business; we only need to know when to ask for a new token.
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    expiry = claims.get("exp") if isinstance(claims, dict) else None
    if isinstance(expiry, bool) or not isinstance(expiry, int | float):
        return None
    return float(expiry)


@dataclass(slots=True)
class _Token:
    value: str
    refresh_at: float


def _refresh_at(token: str, issued_at: float) -> float:
    expiry = token_expiry(token)
    if expiry is None:
        return issued_at + FALLBACK_TOKEN_LIFETIME_SECONDS
    lifetime = max(expiry - issued_at, 0.0)
    # Short-lived tokens (tests, strict deployments) refresh at 80 % of their life instead.
    return expiry - min(REFRESH_MARGIN_SECONDS, lifetime * 0.2)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:500]
    return str(body)[:500]


def _parse_time(value: object) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


class AirflowClient:
    """One authenticated HTTP client on Airflow's REST API; share it, close it with ``aclose``."""

    def __init__(
        self,
        settings: AirflowApiSettings,
        *,
        timeout_seconds: float = 10.0,
        attempts: int = 3,
        backoff_initial_seconds: float = 0.5,
        backoff_max_seconds: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.attempts = attempts
        self.backoff_initial_seconds = backoff_initial_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self._clock = clock
        self._http = httpx.AsyncClient(
            base_url=settings.url.rstrip("/"), timeout=timeout_seconds, transport=transport
        )
        self._token: _Token | None = None
        self._token_lock = asyncio.Lock()
        self.tokens_issued = 0

    async def __aenter__(self) -> AirflowClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()

    async def trigger_dag_run(
        self, dag_id: str, run_id: str, conf: Mapping[str, Any], *, note: str | None = None
    ) -> TriggerOutcome:
        """Create the run ``run_id`` of ``dag_id``; ``ALREADY_EXISTS`` when that id is taken."""
        body: dict[str, Any] = {"dag_run_id": run_id, "logical_date": None, "conf": dict(conf)}
        if note is not None:
            body["note"] = note
        # Retrying a POST is safe here: if a timed-out attempt did create the run, the retry
        # gets 409 for the same run id instead of a second run.
        response = await self._with_retries(
            lambda: self._request("POST", f"/api/v2/dags/{quote(dag_id, safe='')}/dagRuns", body)
        )
        if response.status_code == httpx.codes.CONFLICT:
            return TriggerOutcome.ALREADY_EXISTS
        return TriggerOutcome.CREATED

    async def get_dag_run(self, dag_id: str, run_id: str) -> DagRun:
        """The current state of one DAG run; ``AirflowRejectedError`` (404) when it is unknown."""
        path = f"/api/v2/dags/{quote(dag_id, safe='')}/dagRuns/{quote(run_id, safe='')}"
        response = await self._with_retries(lambda: self._request("GET", path, None))
        run = response.json()
        return DagRun(
            dag_id=str(run["dag_id"]),
            run_id=str(run["dag_run_id"]),
            state=str(run["state"]),
            queued_at=_parse_time(run.get("queued_at")),
            start_date=_parse_time(run.get("start_date")),
            end_date=_parse_time(run.get("end_date")),
        )

    async def _with_retries(self, operation: Callable[[], Awaitable[T]]) -> T:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(AirflowUnavailableError),
            wait=wait_exponential_jitter(
                multiplier=self.backoff_initial_seconds,
                max=self.backoff_max_seconds,
                jitter=self.backoff_initial_seconds,
            ),
            stop=stop_after_attempt(self.attempts),
            before_sleep=self._log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await operation()
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "Airflow at %s: %s; attempt %d, retry in %.1fs",
            self.settings.url,
            error,
            state.attempt_number,
            wait,
        )

    async def _request(self, method: str, path: str, body: object) -> httpx.Response:
        token = await self._valid_token()
        response = await self._send(method, path, body, token)
        if response.status_code in {httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN}:
            # Airflow answers an expired or revoked token with 401 (403 for an invalid one):
            # one fresh token, one more try; a refusal after that is a real permission problem.
            token = await self._valid_token(stale=token)
            response = await self._send(method, path, body, token)
        if response.status_code == httpx.codes.CONFLICT or response.is_success:
            return response
        if response.status_code == httpx.codes.TOO_MANY_REQUESTS or response.is_server_error:
            raise AirflowUnavailableError(
                f"{method} {path} answered {response.status_code}: {_detail(response)}"
            )
        raise AirflowRejectedError(response.status_code, _detail(response))

    async def _send(self, method: str, path: str, body: object, token: str) -> httpx.Response:
        try:
            return await self._http.request(
                method, path, json=body, headers={"Authorization": f"Bearer {token}"}
            )
        except httpx.TransportError as error:
            raise AirflowUnavailableError(
                f"{method} {path}: {type(error).__name__}: {error}"
            ) from error

    async def _valid_token(self, *, stale: str | None = None) -> str:
        async with self._token_lock:
            current = self._token
            if (
                current is not None
                and current.value != stale
                and self._clock() < current.refresh_at
            ):
                return current.value
            issued_at = self._clock()
            value = await self._fetch_token()
            self._token = _Token(value, _refresh_at(value, issued_at))
            self.tokens_issued += 1
            return value

    async def _fetch_token(self) -> str:
        credentials = {
            "username": self.settings.username,
            "password": self.settings.password.get_secret_value(),
        }
        try:
            response = await self._http.post("/auth/token", json=credentials)
        except httpx.TransportError as error:
            raise AirflowUnavailableError(
                f"POST /auth/token: {type(error).__name__}: {error}"
            ) from error
        if response.is_server_error or response.status_code == httpx.codes.TOO_MANY_REQUESTS:
            raise AirflowUnavailableError(
                f"POST /auth/token answered {response.status_code}: {_detail(response)}"
            )
        if not response.is_success:
            raise AirflowAuthError(
                f"POST /auth/token refused user {self.settings.username!r} "
                f"({response.status_code}: {_detail(response)}); check AIRFLOW_API_USERNAME and "
                "AIRFLOW_API_PASSWORD"
            )
        token = response.json().get("access_token")
        if not isinstance(token, str) or not token:
            raise AirflowUnavailableError("POST /auth/token answered without an access_token")
        return token
