"""Connecting to a dependency: say which one and where, retry with backoff, never crash-loop."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

T = TypeVar("T")

log = logging.getLogger(__name__)


class DependencyUnavailableError(RuntimeError):
    """A dependency stayed unreachable for the whole retry budget."""


def _log_attempt(dependency: str, address: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "%s at %s unavailable (%s); retry %d in %.1fs",
            dependency,
            address,
            error,
            state.attempt_number,
            wait,
        )

    return before_sleep


async def connect_with_retry(
    dependency: str,
    address: str,
    connect: Callable[[], Awaitable[T]],
    *,
    give_up_after_seconds: float = 300.0,
    retry_on: tuple[type[BaseException], ...] = (OSError, ConnectionError, TimeoutError),
) -> T:
    """Run ``connect`` until it succeeds, backing off exponentially (0.5 s doubling to 15 s)."""
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(retry_on),
        wait=wait_exponential_jitter(multiplier=0.5, max=15.0),
        stop=stop_after_delay(give_up_after_seconds),
        before_sleep=_log_attempt(dependency, address),
        reraise=False,
    )
    try:
        async for attempt in retrying:
            with attempt:
                return await connect()
    except Exception as error:
        raise DependencyUnavailableError(
            f"{dependency} at {address} still unreachable after {give_up_after_seconds:.0f}s"
        ) from error
    raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover
