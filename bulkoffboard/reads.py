"""Read calls (machines, machine actions, hunting) under their own throttle, with retries.

Reads are not journaled: a 429 pauses the throttle for its Retry-After, a 401 is retried once
(the client has already refreshed the token), 5xx and transport errors are retried with capped
exponential backoff; anything else is raised to the caller.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from bulkoffboard.errors import RetryableError, ThrottledError, UnauthorizedError
from bulkoffboard.stopping import backoff_s
from bulkoffboard.throttle import Throttle

log = structlog.get_logger("bulkoffboard.reads")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ReadPolicy:
    """How hard reads try: attempts for 5xx/transport errors and the backoff between them."""

    attempts: int = 8
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0


async def read_with_retries(
    throttle: Throttle,
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    policy: ReadPolicy | None = None,
    rng: random.Random | None = None,
) -> T:
    """Run one read under ``throttle``; retry what is worth retrying."""
    policy = policy or ReadPolicy()
    attempts, backoff_base_s, backoff_cap_s = (
        policy.attempts,
        policy.backoff_base_s,
        policy.backoff_cap_s,
    )
    rng = rng or random.Random()
    failures = 0
    refreshed = False
    while True:
        try:
            async with throttle.slot():
                return await call()
        except ThrottledError as exc:
            throttle.pause(exc.retry_after_s)
            log.info("read.throttled", what=what, retry_after_s=exc.retry_after_s)
        except UnauthorizedError:
            if refreshed:
                raise
            refreshed = True
        except RetryableError as exc:
            failures += 1
            if failures >= attempts:
                raise
            log.info("read.retry", what=what, error=str(exc), failures=failures)
            await asyncio.sleep(backoff_s(failures, backoff_base_s, backoff_cap_s, rng))
