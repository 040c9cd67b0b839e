"""Stopping: wait for work, a delay or a backoff unless a stop comes first.

A job stops when its ``stop`` event is set (SIGINT/SIGTERM on the command line, a caller's
event in the API): a wait in progress (a throttle grant, a backoff sleep, a read) ends at
once, and the caller raises :class:`Stopped` to leave what is left for the next session.
Sleeps use the event loop's clock, so a fast-forwarded clock (looptime) skips them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable
from typing import Any, TypeVar

_T = TypeVar("_T")


class Stopped(Exception):
    """A stop was requested while waiting."""


async def unless_stopped(awaitable: Awaitable[_T], stop: asyncio.Event) -> _T:
    """Await ``awaitable`` unless ``stop`` is set first: then it is cancelled and
    :class:`Stopped` is raised."""
    task: asyncio.Future[_T] = asyncio.ensure_future(awaitable)
    stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise Stopped


async def sleep_unless_stopped(seconds: float, stop: asyncio.Event) -> None:
    """Sleep ``seconds`` (at least a millisecond), waking early to raise :class:`Stopped`."""
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({stopper}, timeout=max(seconds, 0.001))
    finally:
        stopper.cancel()
    if stop.is_set():
        raise Stopped


def backoff_s(failures: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Capped exponential backoff with half jitter after ``failures`` failures in a row: a
    uniform pick between half and all of ``min(cap_s, base_s * 2 ** (failures - 1))``, never
    below a millisecond."""
    ceiling = min(cap_s, base_s * 2 ** (failures - 1))
    return max(0.001, rng.uniform(ceiling / 2, ceiling))


__all__ = ["Stopped", "backoff_s", "sleep_unless_stopped", "unless_stopped"]
