"""The dual throttle: no sliding window of send times ever holds more calls than its limit.

Why not two stacked ``AsyncLimiter``s: a leaky bucket admits its whole capacity at once and then
drains, so ``AsyncLimiter(100, 60)`` lets about 200 calls into one 60 s window, and time spent
waiting on the second limiter moves the send past the first one's grant (LIBRARY-NOTES.md).
The MDE limits are "100 per minute and 1,500 per hour" and the server's counting rule is not
published, so the only safe reading is a sliding window on every span of that length.

The rule here is a sliding log per window: keep the send times of the last N grants and grant
only when the oldest of them is more than ``period + margin`` ago (the margin below). Greedy
grants under that rule are never later than any schedule that respects both windows, so the
rule is both sound and as fast as the limits allow.

The margin covers network jitter (a call sent later can arrive sooner) and makes the window
closed on both ends. A request arrives somewhere between its grant and its answer, so a grant
holds its place in a window for the period plus the larger of a floor (1% of the window, at most
1 s) and its own round trip, which the caller reports through :meth:`Throttle.observe`. If two
grants are that far apart, their arrivals are at least a period apart, however slow the first
call was; and as grants are FIFO (each one no earlier than every grant before it), that holds
for any N + 1 calls of the window, not only for consecutive ones. A call not answered yet may
still be on its way: its place is held until the answer comes, at most ``answer_timeout_s``
after the grant (the HTTP client's total timeout, by which it is answered or abandoned). Capping
the held lag instead (a quarter of the window, as an earlier version did) lets a 101st call into
the window whenever one call is slower than the cap: a loaded machine running 0.6 s windows
showed exactly that.

A resumed run seeds the log with the send times of the process before (:meth:`Throttle.seed`),
each with a bound on its arrival taken from the journal: the next line about the same machine,
or the start of the process after, or now.

A pace sets a minimum gap between consecutive grants, so a minute's budget goes out as a
short, smooth stream rather than as one burst of simultaneous connections. ``aiolimiter`` does
the pacing: an ``AsyncLimiter(1, pace)`` bucket, whose capacity is checked without blocking and
filled at the grant, after the log's wait (so two grants can never leave at the same instant
after a long wait or a pause). Its own waiting is not used: under a frozen loop clock (looptime)
with the default 60 ms pace, a float residue left its level a hair above zero and it
rescheduled its wake-up at "now" forever. The gap is also one more "earliest free time" next to
the windows' (the last grant plus the pace), which estimates use.

A 429 pauses every caller until its Retry-After has passed (:meth:`Throttle.pause`).

Shared budgets: the limits belong to an app registration in a tenant, not to a process. With
a ``shared`` budget (:mod:`bulkoffboard.budget`: a ledger on this host), every grant is also
the same rule applied atomically to the grants of every process on that budget, recorded
there in one FIFO order; answers and 429 pauses are recorded there too. This process's own
log still paces it and feeds its estimates; the shared one decides.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from aiolimiter import AsyncLimiter

from bulkoffboard.budget import SharedBudget, Window

log = structlog.get_logger("bulkoffboard.throttle")

#: Sleeps computed here are never shorter than this: a float residue that makes the next
#: wake-up equal "now" would spin forever under a frozen loop clock (LIBRARY-NOTES.md).
_MIN_SLEEP_S = 0.001


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``calls`` in any ``period_s`` seconds."""

    calls: int
    period_s: float

    def __post_init__(self) -> None:
        if self.calls < 1 or not self.period_s > 0:
            raise ValueError(f"a limit needs calls >= 1 and a positive period, not {self}")

    @classmethod
    def parse(cls, text: str) -> Limit:
        """``"100/60"`` -> Limit(100, 60.0). Raises ValueError with the culprit named."""
        calls, _, period = text.partition("/")
        try:
            return cls(int(calls), float(period))
        except ValueError:
            raise ValueError(
                f"--limit {text!r}: expected CALLS/SECONDS with CALLS >= 1 and SECONDS > 0, "
                "e.g. 100/60"
            ) from None

    def __str__(self) -> str:
        return f"{self.calls}/{self.period_s:g}"

    @property
    def default_margin_s(self) -> float:
        """Margin for jitter: 1% of the window, at most 1 s (0.6 s on the minute window)."""
        return min(1.0, self.period_s / 100)


#: How long a call can stay unanswered: the HTTP client's total timeout (the CLI's sessions use
#: it). An unanswered call holds its place in a window at most this long after its grant.
ANSWER_TIMEOUT_S = 90.0

#: The documented offboard limits: 100 per minute and 1,500 per hour (mde-api.md section 2).
DEFAULT_LIMITS = (Limit(100, 60.0), Limit(1500, 3600.0))


class SlidingLog:
    """The exact rule for one window: remembers the last ``limit.calls`` grants and, for each,
    how long after its grant it may have arrived (NaN while its call is unanswered)."""

    __slots__ = ("_lags", "_times", "limit", "margin_s")

    def __init__(self, limit: Limit, margin_s: float | None = None) -> None:
        self.limit = limit
        self.margin_s = limit.default_margin_s if margin_s is None else margin_s
        if self.margin_s <= 0:
            raise ValueError("the margin must be above zero (windows are closed)")
        self._times: collections.deque[float] = collections.deque(maxlen=limit.calls)
        #: The arrival lag bound of each grant held: its round trip, NaN until answered.
        self._lags: collections.deque[float] = collections.deque(maxlen=limit.calls)

    def __repr__(self) -> str:
        return f"SlidingLog({self.limit}, margin_s={self.margin_s}, held={len(self._times)})"

    def times(self) -> tuple[float, ...]:
        """The grant times held, oldest first."""
        return tuple(self._times)

    def reach_s(self, lag_s: float = 0.0) -> float:
        """How long a grant that arrived at most ``lag_s`` after it holds its place: the
        window plus the larger of the margin and that lag."""
        return self.limit.period_s + max(self.margin_s, lag_s)

    def next_free(self, unanswered_s: float = ANSWER_TIMEOUT_S) -> float:
        """The earliest clock time at which one more grant keeps the window within limit.

        The grant about to leave the window holds it for its own lag; while its call is
        unanswered, for ``unanswered_s`` (an answer moves this earlier).
        """
        if len(self._times) < self.limit.calls:
            return float("-inf")
        own = self._lags[0]
        return self._times[0] + self.reach_s(unanswered_s if math.isnan(own) else own)

    def unanswered_oldest(self) -> float | None:
        """The grant time of the oldest grant when the window is full and its call is still
        unanswered (the next grant waits on its answer, or on the answer timeout)."""
        if len(self._times) < self.limit.calls or not math.isnan(self._lags[0]):
            return None
        return self._times[0]

    def record(self, at: float, lag_s: float = math.nan) -> None:
        """Count a grant at clock time ``at``; ``lag_s``: how long after ``at`` it arrived at
        the latest, when already known (NaN: unanswered)."""
        self._times.append(at)
        self._lags.append(lag_s)

    def observe(self, granted_at: float, round_trip_s: float) -> bool:
        """Note the round trip of the grant made at ``granted_at`` (searched from the newest);
        True when that grant is the one a full window waits on (the answer may free it)."""
        for index in range(len(self._times) - 1, -1, -1):
            if self._times[index] == granted_at and math.isnan(self._lags[index]):
                self._lags[index] = round_trip_s
                return index == 0 and len(self._times) == self.limit.calls
            if self._times[index] < granted_at:
                break
        return False


class Throttle:
    """Grants permission to send, under every :class:`Limit` at once, for any number of callers.

    ``clock`` is the time source the grants are measured in (the running loop's clock by
    default, so ``looptime`` can fast-forward it). Grants are FIFO. Every grant must be answered
    with :meth:`observe` (``granted_at`` included) once its call has its answer, or it holds
    its place in the windows for ``answer_timeout_s``: :meth:`slot` does both.
    """

    def __init__(
        self,
        limits: Iterable[Limit] = DEFAULT_LIMITS,
        *,
        margin_s: float | None = None,
        pace_s: float | None = None,
        clock: Callable[[], float] | None = None,
        name: str = "offboard",
        answer_timeout_s: float = ANSWER_TIMEOUT_S,
        shared: SharedBudget | None = None,
    ) -> None:
        self.limits = tuple(limits)
        if not self.limits:
            raise ValueError("a throttle needs at least one limit")
        self.name = name
        self._logs = [SlidingLog(limit, margin_s) for limit in self.limits]
        self.answer_timeout_s = answer_timeout_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._paused_until = float("-inf")
        self._changed = asyncio.Event()
        if pace_s is None:
            # Spread each window's budget over a tenth of it: 100/60 gives a 60 ms gap, so a
            # minute's 100 calls leave in 6 s instead of all at once.
            pace_s = min(limit.period_s / limit.calls for limit in self.limits) / 10
        self.pace_s = pace_s
        # A gap below the shortest sleep cannot be kept anyway: no pace then.
        self._gap_s = pace_s if pace_s > _MIN_SLEEP_S else 0.0
        # aiolimiter paces: a bucket of one that drains in ``pace_s``. Its capacity is checked
        # without blocking and the waiting is done here, because its own wake-up can land on
        # "now" forever under a fast-forwarded clock (LIBRARY-NOTES.md).
        self._pacer = AsyncLimiter(1, self._gap_s) if self._gap_s else None
        self._last_grant = float("-inf")
        self.granted = 0
        self.pauses = 0
        self._round_trips: collections.deque[float] = collections.deque(maxlen=256)
        self._max_round_trip_s = 0.0
        #: The grant whose unanswered call was last logged as holding the others back.
        self._stuck_logged = float("nan")
        #: The budget shared with other processes (None: this process's alone), the ids of
        #: this process's grants recorded there by grant time, and how often to look again
        #: while it says wait (other processes' answers can free it earlier than it says).
        self.shared = shared
        self._shared_ids: dict[float, str] = {}
        #: Answers, pauses and seeds on their way to the shared budget.
        self._sending: set[asyncio.Task[Any]] = set()
        self._seeding: asyncio.Task[Any] | None = None
        self._send_failed = False
        self._grant_prefix = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._poll_s = min(1.0, max(_MIN_SLEEP_S, min(lim.period_s for lim in self.limits) / 20))

    def __repr__(self) -> str:
        where = f", shared={self.shared.describe()!r}" if self.shared is not None else ""
        return (
            f"Throttle({self.name!r}, limits=[{', '.join(map(str, self.limits))}], "
            f"granted={self.granted}, paused_until={self._paused_until:.3f}{where})"
        )

    def _windows(self) -> list[Window]:
        return [
            Window(window.limit.calls, window.limit.period_s, window.margin_s)
            for window in self._logs
        ]

    def now(self) -> float:
        """The throttle's clock."""
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def next_free(self) -> float:
        """The earliest time the next grant could happen (pauses and the pace included)."""
        return max(
            self._paused_until,
            self._last_grant + self._gap_s,
            *(window.next_free(self.answer_timeout_s) for window in self._logs),
        )

    @property
    def paused_until(self) -> float:
        """Until when a 429 holds every caller (``-inf`` when not paused)."""
        return self._paused_until

    def recent_grants(self) -> list[float]:
        """The latest grant times (those of the window log that holds the most)."""
        return list(max(self._logs, key=lambda window: window.limit.calls).times())

    def margins_s(self) -> list[float]:
        """Each window's expected margin, in the order of :attr:`limits`: the floor, or the
        longest recent round trip up to a quarter of the window (an estimate, for ETAs: the
        grants themselves are held for their own round trips)."""
        return [
            window.reach_s(min(self._max_round_trip_s, window.limit.period_s / 4))
            - window.limit.period_s
            for window in self._logs
        ]

    def margin_hint_s(self) -> float:
        """The longest recent round trip observed."""
        return self._max_round_trip_s

    def observe(self, round_trip_s: float, granted_at: float | None = None) -> None:
        """Report how long a granted call took from grant to answer.

        With ``granted_at`` (what :meth:`acquire` returned), the round trip becomes that
        grant's lag: it holds its windows for exactly that long past their periods, and a
        caller waiting on it is woken. Every round trip also feeds the estimate of
        :meth:`margins_s` (a negative one only answers its grant).
        """
        if math.isnan(round_trip_s):
            return
        if granted_at is not None:
            # A grant is answered whatever the figure: a hair below zero is clock noise.
            freed = [window.observe(granted_at, max(round_trip_s, 0.0)) for window in self._logs]
            if any(freed):
                self._changed.set()
            shared_id = self._shared_ids.pop(granted_at, None)
            if shared_id is not None and self.shared is not None:
                self._send(self.shared.answer(shared_id, max(round_trip_s, 0.0)))
        if round_trip_s < 0:
            return
        if len(self._round_trips) == self._round_trips.maxlen:
            dropped = self._round_trips[0]
            self._round_trips.append(round_trip_s)
            if dropped >= self._max_round_trip_s:
                self._max_round_trip_s = max(self._round_trips)
        else:
            self._round_trips.append(round_trip_s)
        self._max_round_trip_s = max(self._max_round_trip_s, round_trip_s)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[float]:
        """``async with throttle.slot() as granted:`` acquire, send inside, and the round trip
        is observed on the way out, whatever happens (an error, a cancellation)."""
        granted = await self.acquire()
        try:
            yield granted
        finally:
            self.observe(self.now() - granted, granted)

    async def acquire(self) -> float:
        """Wait until a call may be sent and count it. Returns the grant time.

        Call it right before sending: the window is kept on grant times, so the caller must
        not wait between this and the send.
        """
        if self._seeding is not None:
            await self._seeding  # a resumed run's sends are in the shared budget first
        async with self._lock:
            while True:
                now = self.now()
                wait = self.next_free() - now
                shared_id = None
                if wait <= 0:
                    if self._pacer is None or self._pacer.has_capacity():
                        if self.shared is None:
                            break
                        shared_id = f"{self._grant_prefix}-{self.granted}"
                        # The grant is dated before the store is asked: the round trip
                        # then reported covers the store's own time, so the lag it gives
                        # the shared grant never falls short of the call's arrival.
                        held = await self.shared.try_grant(
                            self._windows(), self.answer_timeout_s, shared_id
                        )
                        if held is None:
                            break
                        wait = min(held, self._poll_s)  # an answer elsewhere frees it sooner
                    else:
                        wait = _MIN_SLEEP_S  # the bucket's float residue: drains in a moment
                self._note_stuck(now, wait)
                self._changed.clear()
                # Wake at the free time, or early when a pause changes the picture.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), max(wait, _MIN_SLEEP_S))
            if self._pacer is not None:
                await self._pacer.acquire()  # has capacity: returns at once, fills the bucket
            # Grant times are distinct (a frozen or coarse clock can repeat one): each is the
            # key its caller's answer is filed under (:meth:`observe`).
            now = max(now, math.nextafter(self._last_grant, math.inf))
            for window in self._logs:
                window.record(now)
            if shared_id is not None:
                self._shared_ids[now] = shared_id
            self._last_grant = now
            self.granted += 1
            return now

    def _note_stuck(self, now: float, wait: float) -> None:
        """Log once, at info, a call still unanswered that holds every other send back: the
        reason sends pause for up to the answer timeout when a window is full."""
        next_free = now + wait
        for window in self._logs:
            granted = window.unanswered_oldest()
            if granted is None or granted == self._stuck_logged:
                continue
            if window.next_free(self.answer_timeout_s) >= next_free:
                self._stuck_logged = granted
                log.info(
                    "throttle.waiting_on_unanswered_call",
                    throttle=self.name,
                    window=str(window.limit),
                    sent_s_ago=round(now - granted, 3),
                    holds_until_s=round(wait, 3),
                    answer_timeout_s=self.answer_timeout_s,
                )
                return

    def pause(self, seconds: float) -> None:
        """Hold every caller for ``seconds`` from now (a 429's Retry-After)."""
        until = self.now() + max(seconds, 0.0)
        if until > self._paused_until:
            self._paused_until = until
            self.pauses += 1
            self._changed.set()
        if self.shared is not None:
            self._send(self.shared.pause(seconds))

    def seed(self, sends: Iterable[float | tuple[float, float]], *, shared: bool = True) -> int:
        """Count earlier sends so a restart cannot overshoot. Returns how many were counted.

        Each send is a clock time, or (clock time, lag): how long after it the call had
        arrived at the latest (a bare time: at once). Sends whose window has passed for good
        (older than the longest window plus their lag and the margin) are ignored. The rest
        are sorted first: they come from the journal's wall-clock stamps, which a clock stepped
        back leaves out of order, and each window keeps only its most recent sends. With a
        shared budget they are recorded there too, unless ``shared`` is False (they are in
        it already).
        """
        now = self.now()
        longest = max(self._logs, key=lambda window: window.limit.period_s)
        kept: list[tuple[float, float]] = []
        for send in sends:
            at, lag = send if isinstance(send, tuple) else (send, 0.0)
            lag = max(lag, 0.0)
            if at + longest.reach_s(lag) >= now:
                kept.append((at, lag))
        kept.sort()
        for at, lag in kept:
            for window in self._logs:
                window.record(at, lag)
        if self.shared is not None and kept and shared:
            self._seeding = self._send(self.shared.seed([(now - at, lag) for at, lag in kept]))
        return len(kept)

    def _send(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Send ``work`` to the shared budget in the background (an answer or a pause must
        not wait in the caller's ``finally``); a failure is logged once: the grant then holds
        its place until the answer timeout, which is the careful side."""
        task = asyncio.ensure_future(work)
        self._sending.add(task)

        def done(finished: asyncio.Task[Any]) -> None:
            self._sending.discard(finished)
            if finished.cancelled() or finished.exception() is None or self._send_failed:
                return
            self._send_failed = True
            log.warning(
                "budget.update_failed",
                throttle=self.name,
                error=str(finished.exception()),
                effect="grants stay held until the answer timeout",
            )

        task.add_done_callback(done)
        return task

    async def drain(self) -> None:
        """Wait for the answers and pauses still on their way to the shared budget."""
        while self._sending:
            await asyncio.gather(*list(self._sending), return_exceptions=True)

    async def aclose(self) -> None:
        """Drain, then release the shared budget's connection (if any)."""
        await self.drain()
        if self.shared is not None:
            await self.shared.close()

    def ideal_duration_s(self, calls: int) -> float:
        """The fastest possible time to send ``calls`` calls under the limits, from empty.

        Greedy on the exact windows with no margin and no latency: what a perfect client could
        do. Benchmarks divide real durations by this.
        """
        return ideal_duration_s(calls, self.limits)

    @staticmethod
    def wall_to_clock(wall_times: Iterable[float], clock_now: float) -> list[float]:
        """Convert wall-clock send times (journal) to this throttle's clock."""
        offset = time.time() - clock_now
        return [t - offset for t in wall_times]


def ideal_duration_s(calls: int, limits: Iterable[Limit]) -> float:
    """Time of the last grant of the greedy schedule that respects every window exactly.

    Windows are taken as half-open on the server's side: a call at ``t + period`` no longer
    shares a window with one at ``t``.
    """
    if calls <= 0:
        return 0.0
    logs: list[tuple[Limit, collections.deque[float]]] = [
        (limit, collections.deque(maxlen=limit.calls)) for limit in limits
    ]
    now = 0.0
    for _ in range(calls):
        for limit, log in logs:
            if len(log) == limit.calls:
                now = max(now, log[0] + limit.period_s)
        for _, log in logs:
            log.append(now)
    return now
