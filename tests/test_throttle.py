"""The dual throttle: sound on every sliding window, as fast as the windows allow, paused by
429s, seeded across restarts.

Time is never slept for real: async tests run under ``looptime`` (the loop clock fast-forwards
to the next timer), and the side-by-side comparison with stacked ``aiolimiter`` limiters runs
on a small virtual-clock loop defined here (aiolimiter cannot run under looptime, see
:func:`test_aiolimiter_pacer_spins_forever_under_a_frozen_clock`).

Window checks are exact and closed on both ends: ``max_in_closed_window`` counts, for every
``t``, the grants in ``[t, t + period]`` (the maximum is always reached with ``t`` on a grant).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import random
import selectors
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import structlog
import structlog.testing
from aiolimiter import AsyncLimiter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkoffboard import throttle as throttle_module
from bulkoffboard.throttle import (
    DEFAULT_LIMITS,
    Limit,
    SlidingLog,
    Throttle,
    ideal_duration_s,
)

T = TypeVar("T")

REAL = (Limit(100, 60.0), Limit(1500, 3600.0))
SMALL = (Limit(5, 1.0), Limit(20, 10.0))
SCALED = (Limit(100, 0.6), Limit(1500, 36.0))

#: Fast-forwarded loop time. looptime idles 42 loop cycles before each jump of its clock (to let
#: chained coroutines set their timers); 10 are plenty here and make the long runs 3x faster.
fast_loop_time = pytest.mark.looptime(noop_cycles=10)

#: Float slack for comparisons of loop times (looptime's clock ticks in microseconds).
EPS = 1e-9
#: A grant may come up to one shortest sleep late when a float residue leaves "a hair" to wait.
LATE = 0.002


# ------------------------------------------------------------------------------------ helpers


def max_in_closed_window(times: Sequence[float], period: float) -> int:
    """The most of ``times`` that any closed window ``[t, t + period]`` holds."""
    ordered = sorted(times)
    return max(
        (bisect.bisect_right(ordered, start + period) - i for i, start in enumerate(ordered)),
        default=0,
    )


def assert_within(times: Sequence[float], limits: Sequence[Limit]) -> None:
    for limit in limits:
        most = max_in_closed_window(times, limit.period_s)
        assert most <= limit.calls, f"{most} calls in one closed {limit.period_s:g} s window"


@contextlib.contextmanager
def failing_on_frozen_spin(max_polls: int = 20_000) -> Iterator[Callable[[], bool]]:
    """Cancel the current task if the loop polls ``max_polls`` times without its clock moving.

    Under looptime a callback that keeps rescheduling itself at "now" never lets the clock
    move: the loop spins forever and the test run hangs (a pytest-timeout raised inside a
    callback is swallowed by asyncio). This turns that hang into a quick, named failure.
    Wraps the loop's selector (private but stable asyncio attribute; looptime wraps it too).
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    selector: Any = getattr(loop, "_selector")  # noqa: B009 - private, hence getattr
    original = selector.select
    last = loop.time()
    polls = 0
    spun = False

    def select(timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        nonlocal last, polls, spun
        now = loop.time()
        if timeout == 0 and now == last:
            polls += 1
            if polls > max_polls and not spun:
                spun = True
                task.cancel("the loop spun with a frozen clock")
        else:
            last, polls = now, 0
        result: list[tuple[selectors.SelectorKey, int]] = original(timeout)
        return result

    selector.select = select
    try:
        yield lambda: spun
    finally:
        selector.select = original


async def without_frozen_spin(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; fail (rather than hang) if the loop spins with a frozen clock."""
    with failing_on_frozen_spin() as spun:
        try:
            return await awaitable
        except asyncio.CancelledError:
            if not spun():
                raise
            task = asyncio.current_task()
            assert task is not None
            task.uncancel()
    pytest.fail("the loop spun with its clock frozen (a wake-up at 'now' rescheduled forever)")


async def take(throttle: Throttle) -> float:
    """One grant whose call is answered at once (the round trip is 0). Returns its time."""
    async with throttle.slot() as granted:
        return granted


async def grant_all(throttle: Throttle, calls: int, workers: int) -> list[float]:
    """``workers`` callers take ``calls`` grants between them, back to back; grant times.

    Fails (rather than hangs) if the loop spins with a frozen clock meanwhile."""
    claimed = 0
    times: list[float] = []

    async def worker() -> None:
        nonlocal claimed
        while claimed < calls:
            claimed += 1
            times.append(await take(throttle))

    await without_frozen_spin(asyncio.gather(*(worker() for _ in range(workers))))
    assert len(times) == calls
    return times


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock: a wait jumps the clock, and every poll moves it by
    at least 1 us, as real time would. Unlike looptime's clock, it never freezes, so
    aiolimiter (which can reschedule itself at "now") runs on it."""

    def __init__(self) -> None:
        super().__init__()
        self.virtual_now = 0.0
        selector: Any = getattr(self, "_selector")  # noqa: B009
        poll = selector.select

        def select(timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
            if timeout is None:
                raise RuntimeError("the virtual-clock loop would wait forever")
            self.virtual_now += max(timeout, 1e-6)
            result: list[tuple[selectors.SelectorKey, int]] = poll(0)
            return result

        selector.select = select

    def time(self) -> float:
        return self.virtual_now


def run_on_virtual_clock(make: Callable[[], Awaitable[T]]) -> T:
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(make())
    finally:
        loop.close()


# ------------------------------------------------------------------------------ Limit parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100/60", Limit(100, 60.0)),
        ("100/0.6", Limit(100, 0.6)),
        ("1500/3600", Limit(1500, 3600.0)),
        (" 5/1 ", Limit(5, 1.0)),
    ],
)
def test_limit_parse_accepts_calls_per_seconds(text: str, expected: Limit) -> None:
    assert Limit.parse(text) == expected
    assert Limit.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["0/60", "100/0", "abc", "100", "-1/5", "100/-60", "1.5/60", ""])
def test_limit_parse_rejects_bad_values_naming_them(text: str) -> None:
    with pytest.raises(ValueError, match=f"--limit {text!r}"):
        Limit.parse(text)


@pytest.mark.parametrize("margin", [0.0, -0.5])
def test_sliding_log_rejects_a_margin_that_is_not_above_zero(margin: float) -> None:
    with pytest.raises(ValueError, match="margin must be above zero"):
        SlidingLog(Limit(100, 60), margin_s=margin)
    with pytest.raises(ValueError, match="margin must be above zero"):
        Throttle(REAL, margin_s=margin)


def test_limit_rejects_a_limit_that_admits_nothing() -> None:
    with pytest.raises(ValueError, match="calls >= 1"):
        Limit(0, 60)
    with pytest.raises(ValueError, match="positive period"):
        Limit(1, 0)
    with pytest.raises(ValueError, match="at least one limit"):
        Throttle(())


def test_default_margins_are_one_percent_of_the_window_capped_at_one_second() -> None:
    assert Limit(100, 60).default_margin_s == pytest.approx(0.6)
    assert Limit(1500, 3600).default_margin_s == 1.0
    assert DEFAULT_LIMITS == REAL


# ------------------------------------------------------------------ ideal schedule (reference)


@pytest.mark.parametrize(
    ("calls", "limits", "expected"),
    [
        (0, (Limit(2, 10),), 0.0),
        (1, (Limit(2, 10),), 0.0),
        (2, (Limit(2, 10),), 0.0),
        (3, (Limit(2, 10),), 10.0),
        (5, (Limit(2, 10),), 20.0),
        (100, REAL, 0.0),
        (101, REAL, 60.0),
        (1500, REAL, 14 * 60.0),
        (1501, REAL, 3600.0),
        (3000, REAL, 3600.0 + 14 * 60),
        (4500, REAL, 7200.0 + 14 * 60),
        # 5/1 + 20/10: four bursts of 5 at 0, 1, 2, 3; the 21st waits for 10.
        (20, SMALL, 3.0),
        (21, SMALL, 10.0),
    ],
)
def test_ideal_duration_is_the_greedy_exact_schedule(
    calls: int, limits: tuple[Limit, ...], expected: float
) -> None:
    assert ideal_duration_s(calls, limits) == pytest.approx(expected)
    assert Throttle(limits).ideal_duration_s(calls) == pytest.approx(expected)


# ------------------------------------------------------------------- soundness (property test)


@dataclass
class Step:
    """One call of one caller: wait ``gap_s`` (an arrival pattern), acquire, then take
    ``round_trip_s`` and report it (None: never answered), and maybe get a 429 with
    Retry-After ``pause_s``."""

    gap_s: float
    round_trip_s: float | None
    pause_s: float | None


@dataclass
class Scenario:
    limits: tuple[Limit, ...]
    callers: list[list[Step]]
    seeded: int
    seed_lag_s: float
    pace_s: float | None = None
    history_lag_s: float = 0.0  # how long after its send each seeded call may have arrived
    answer_timeout_s: float = 1.0


@dataclass
class Outcome:
    history: list[float]  # the earlier process's sends, seeded
    grants: list[float]  # in the order acquire() returned them
    events: list[tuple[str, float, float]] = field(default_factory=list)  # grants and pauses
    pace_s: float = 0.0
    #: (send, latest arrival) of every call, the seeded ones included.
    spans: list[tuple[float, float]] = field(default_factory=list)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    limits = draw(
        st.one_of(
            st.just(REAL),
            st.just(SMALL),
            st.lists(
                st.builds(
                    Limit,
                    st.integers(1, 12),
                    st.floats(0.05, 30, allow_nan=False, allow_infinity=False),
                ),
                min_size=1,
                max_size=3,
            ).map(tuple),
        )
    )
    shortest = min(limit.period_s for limit in limits)
    gaps = st.one_of(
        st.just(0.0),  # bursts
        st.floats(0, 0.1 * shortest),  # a trickle
        st.floats(0, 3 * shortest),  # gaps that let windows drain
    )
    round_trips = st.one_of(
        st.floats(0, 0.05 * shortest),  # fast answers
        st.floats(0, 1.5 * shortest),  # slow ones, some slower than a whole window
        st.none(),  # never answered: held for the answer timeout
    )
    steps = st.builds(Step, gaps, round_trips, st.none() | st.none() | st.floats(0, 2 * shortest))
    callers = draw(st.lists(st.lists(steps, max_size=30), min_size=1, max_size=8))
    longest = max(limits, key=lambda limit: limit.period_s)
    seeded = draw(st.integers(0, longest.calls + 3))
    seed_lag_s = draw(st.floats(0, 1.2 * longest.period_s))
    pace_s = draw(st.none() | st.floats(0, 0.2 * shortest))
    history_lag_s = draw(st.floats(0, 1.5 * shortest))
    answer_timeout_s = draw(st.floats(0, 2 * shortest))
    # The HTTP client's timeout: every call has its answer (or is abandoned) by then.
    for step in itertools.chain.from_iterable(callers):
        if step.round_trip_s is not None:
            step.round_trip_s = min(step.round_trip_s, answer_timeout_s)
    return Scenario(limits, callers, seeded, seed_lag_s, pace_s, history_lag_s, answer_timeout_s)


def lawful_history(
    limits: Sequence[Limit], count: int, last: float, lag_s: float = 0.0
) -> list[float]:
    """``count`` evenly spaced past sends ending at ``last`` that respect every window even
    when each arrived ``lag_s`` after its send."""
    spacing = max(
        (limit.period_s + max(limit.default_margin_s, lag_s)) / limit.calls for limit in limits
    )
    spacing *= 1.0001
    return [last - (count - 1 - i) * spacing for i in range(count)]


def max_in_window_at_worst(spans: Sequence[tuple[float, float]], period: float) -> int:
    """The most calls one closed window ``[t, t + period]`` can hold when each call arrives
    anywhere from its send to (just before) its latest arrival: the worst the server can see."""
    worst = 0
    for _, first_end in spans:
        start = first_end - 1e-9
        worst = max(
            worst,
            sum(1 for sent, end in spans if end - 1e-9 >= start and sent <= start + period),
        )
    return worst


async def play(scenario: Scenario) -> Outcome:
    """Run the scenario on the running loop."""
    throttle = Throttle(
        scenario.limits, pace_s=scenario.pace_s, answer_timeout_s=scenario.answer_timeout_s
    )
    start = throttle.now()
    lag = scenario.history_lag_s
    history = lawful_history(scenario.limits, scenario.seeded, start - scenario.seed_lag_s, lag)
    throttle.seed([(at, lag) for at in history])
    events: list[tuple[str, float, float]] = []
    spans = [(at, at + lag) for at in history]

    async def caller(steps: list[Step]) -> None:
        for step in steps:
            if step.gap_s:
                await asyncio.sleep(step.gap_s)
            granted = await throttle.acquire()
            events.append(("grant", granted, granted))
            if step.round_trip_s is None:
                spans.append((granted, granted + scenario.answer_timeout_s))
            else:
                await asyncio.sleep(step.round_trip_s)
                answered = throttle.now()
                spans.append((granted, answered))
                throttle.observe(answered - granted, granted)
            if step.pause_s is not None:
                now = throttle.now()
                throttle.pause(step.pause_s)
                events.append(("pause", now, now + step.pause_s))

    await asyncio.gather(*(caller(steps) for steps in scenario.callers))
    grants = [at for kind, at, _ in events if kind == "grant"]
    assert len(grants) == throttle.granted == sum(map(len, scenario.callers))
    return Outcome(history, grants, events, throttle.pace_s, spans)


@fast_loop_time
@settings(
    max_examples=100,
    deadline=None,
    # The autouse environment-cleaning fixture is function-scoped and harmless per example.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios())
async def test_no_closed_window_ever_holds_more_than_its_limit(scenario: Scenario) -> None:
    outcome = await without_frozen_spin(play(scenario))
    history, grants = outcome.history, outcome.grants

    # Every window of every limit, closed on both ends, over the earlier process's sends and
    # this one's, wherever in its round trip each call arrived (however slow it was).
    for limit in scenario.limits:
        most = max_in_window_at_worst(outcome.spans, limit.period_s)
        assert most <= limit.calls, f"{most} arrivals can share one {limit.period_s:g} s window"

    # With the margin: the (N+1)-th send is at least period + margin after the first.
    everything = sorted(history + grants)
    fresh = set(grants)
    for limit in scenario.limits:
        for first, last in zip(everything, everything[limit.calls :], strict=False):
            if last in fresh:
                assert last - first >= limit.period_s + limit.default_margin_s - EPS

    # Every caller, not only the one that got the 429, holds until the Retry-After passed.
    held_until = float("-inf")
    for kind, at, until in outcome.events:
        if kind == "pause":
            held_until = max(held_until, until)
        else:
            assert at >= held_until - EPS, f"granted at {at} inside a pause until {held_until}"

    # Grants are FIFO in time and keep the pace.
    for before, after in itertools.pairwise(grants):
        assert after >= before
        if outcome.pace_s > throttle_module._MIN_SLEEP_S:
            assert after - before >= outcome.pace_s - EPS


# ----------------------------------------------------- the classic flaw: stacked leaky buckets


def test_stacked_aiolimiters_burst_past_the_minute_limit_where_the_throttle_does_not() -> None:
    """Side by side on one virtual clock, 10 workers each, 3200 calls each."""

    async def both() -> tuple[list[float], list[float], float]:
        loop = asyncio.get_running_loop()
        per_minute, per_hour = AsyncLimiter(100, 60), AsyncLimiter(1500, 3600)
        stacked: list[float] = []
        claimed = 0

        async def stacked_worker() -> None:
            nonlocal claimed
            while claimed < 3200:
                claimed += 1
                await per_minute.acquire()
                await per_hour.acquire()
                stacked.append(loop.time())

        throttle = Throttle()
        start = loop.time()
        ours, _ = await asyncio.gather(
            grant_all(throttle, 3200, workers=10),
            asyncio.gather(*(stacked_worker() for _ in range(10))),
        )
        return stacked, ours, start

    stacked, ours, start = run_on_virtual_clock(both)

    # The documented trap: a full bucket at once, then a bucket's worth of drain in the window.
    assert max_in_closed_window(stacked, 60) > 150
    assert max_in_closed_window(stacked, 3600) > 2500
    # The throttle, on the same clock and the same demand, never does...
    assert max_in_closed_window(ours, 60) == 100
    assert max_in_closed_window(ours, 3600) == 1500
    # ... and still finishes within 1% of the best schedule the windows allow.
    assert max(ours) - start <= 1.01 * ideal_duration_s(3200, REAL)


# ---------------------------------------------------------------------------------- throughput


@fast_loop_time
@pytest.mark.parametrize("calls", [3000, 4500])
async def test_a_long_run_finishes_within_one_percent_of_the_ideal_schedule(calls: int) -> None:
    throttle = Throttle()
    start = throttle.now()
    grants = await grant_all(throttle, calls, workers=10)
    took = max(grants) - start
    ideal = ideal_duration_s(calls, REAL)
    assert ideal <= took <= 1.01 * ideal, f"{calls} calls took {took:.2f} s, ideal {ideal} s"
    assert_within(grants, REAL)


@fast_loop_time
async def test_the_first_hour_budget_goes_out_in_minute_blocks_then_waits_for_the_hour() -> None:
    throttle = Throttle()
    start = throttle.now()
    grants = await grant_all(throttle, 1501, workers=5)
    offsets = [at - start for at in grants]
    # 15 blocks of 100, each 60 s + 0.6 s margin after the one before.
    assert offsets[100] == pytest.approx(60.6, abs=LATE)
    assert offsets[1400] == pytest.approx(14 * 60.6, abs=15 * LATE)
    # The 1501st waits for the first one's hour plus the 1 s margin.
    assert offsets[1500] == pytest.approx(3601, abs=LATE)


# ------------------------------------------------------------------------------- 429 and pause


@fast_loop_time
async def test_a_pause_holds_every_waiting_caller_until_the_retry_after_has_passed() -> None:
    throttle = Throttle((Limit(1, 10),), pace_s=0)
    start = await take(throttle)
    waiting = [asyncio.create_task(take(throttle)) for _ in range(3)]
    await asyncio.sleep(1)  # all three now wait for the window (start + 10.1)
    assert not any(task.done() for task in waiting)

    throttle.pause(30)  # as after a 429 with Retry-After: 30 that none of them received
    grants = sorted(await asyncio.gather(*waiting))

    assert grants[0] == pytest.approx(start + 31, abs=LATE)
    assert grants[0] >= start + 31 - EPS
    # After the pause the window rule holds again: one per 10 s + margin.
    assert grants[1] - grants[0] >= 10.1 - EPS
    assert grants[2] - grants[1] >= 10.1 - EPS
    assert throttle.pauses == 1


@fast_loop_time
async def test_a_later_longer_pause_extends_the_hold_and_a_shorter_one_does_not_cut_it() -> None:
    throttle = Throttle((Limit(100, 60),), pace_s=0)
    start = throttle.now()
    throttle.pause(30)
    waiting = [asyncio.create_task(take(throttle)) for _ in range(5)]
    await asyncio.sleep(5)
    throttle.pause(60)  # until start + 65
    await asyncio.sleep(5)
    throttle.pause(1)  # until start + 11: must not shorten the hold
    throttle.pause(-5)  # nonsense Retry-After: no effect
    grants = await asyncio.gather(*waiting)

    assert min(grants) == pytest.approx(start + 65, abs=LATE)
    assert min(grants) >= start + 65 - EPS
    assert throttle.pauses == 2


@fast_loop_time
async def test_a_pause_also_holds_callers_that_arrive_later() -> None:
    throttle = Throttle((Limit(100, 60),), pace_s=0)
    start = throttle.now()
    throttle.pause(7)
    await asyncio.sleep(3)
    assert await take(throttle) == pytest.approx(start + 7, abs=LATE)
    # Once it has passed, nothing waits.
    assert await take(throttle) == pytest.approx(start + 7, abs=LATE)


@fast_loop_time
async def test_every_attempt_counts_even_when_it_got_a_429() -> None:
    throttle = Throttle((Limit(2, 10),), pace_s=0)
    first = await take(throttle)
    await take(throttle)
    throttle.pause(1)  # both calls got 429s with Retry-After: 1
    retry = await take(throttle)
    # The retry waits for the window, not just the second: the 429s were sent, so they count.
    assert retry >= first + 10.1 - EPS
    assert throttle.granted == 3


# ----------------------------------------------------------------------------- restart / seed


@fast_loop_time
async def test_a_restart_counts_the_previous_process_sends_in_the_hour() -> None:
    # The process before sent 1400 calls at full speed, the last of them 10 minutes ago.
    before = Throttle()
    history = await grant_all(before, 1400, workers=4)
    await asyncio.sleep(600)

    after = Throttle()
    assert after.seed(history) == 1400
    resumed = await grant_all(after, 250, workers=4)

    # Only 100 more fit until the hour from the first of those sends has passed.
    hour_ends = history[0] + 3600
    assert sum(at <= hour_ends for at in resumed) == 100
    assert resumed[100] >= history[0] + 3601 - EPS
    assert_within(history + resumed, REAL)


@fast_loop_time
async def test_a_restart_counts_the_previous_process_sends_in_the_minute() -> None:
    before = Throttle()
    history = await grant_all(before, 80, workers=2)  # 80 sends in the last ~5 s
    after = Throttle()
    after.seed(history)
    resumed = await grant_all(after, 30, workers=2)
    assert sum(at <= history[0] + 60 for at in resumed) == 20
    assert resumed[20] >= history[0] + 60.6 - EPS
    assert_within(history + resumed, REAL)


@fast_loop_time
async def test_a_restarted_throttle_grants_exactly_when_an_uninterrupted_one_would() -> None:
    """Seeding equals continuity, whatever the margin (here wider than the default)."""
    limits = (Limit(3, 10), Limit(5, 40))
    uninterrupted = Throttle(limits, margin_s=5, pace_s=0)
    history = await grant_all(uninterrupted, 5, workers=1)  # at 0, 0, 0, 15, 15
    await asyncio.sleep(27)  # 42 s after the first: older than 40 + 1, younger than 40 + 5
    restarted = Throttle(limits, margin_s=5, pace_s=0)
    restarted.seed(history)
    assert restarted.next_free() == pytest.approx(history[0] + 45)

    # Side by side from the same moment on the same clock: the same grant times.
    expected, got = await asyncio.gather(
        grant_all(uninterrupted, 6, workers=1), grant_all(restarted, 6, workers=1)
    )
    assert got == pytest.approx(expected, abs=LATE)
    assert got[0] >= history[0] + 45 - EPS
    assert_within(history + got, limits)


@fast_loop_time
async def test_seed_ignores_sends_older_than_the_longest_window() -> None:
    throttle = Throttle()
    now = throttle.now()
    # Beyond an hour plus the 1 s margin: never in a window with a call sent from now on.
    stale = [now - 3601.5 - i for i in range(1500, 0, -1)]
    assert throttle.seed(stale) == 0
    assert throttle.next_free() < now
    assert await take(throttle) == now

    recent = Throttle()
    assert recent.seed([now - 4499, now - 3599, now - 10]) == 2
    # Counted, but an hour plus a 1 s margin is long past for the older one: no wait.
    assert recent.next_free() < now

    # A send that may have arrived long after it is kept for as long as it may count.
    late = Throttle((Limit(1, 3600),))
    assert late.seed([(now - 4499, 1000.0)]) == 1
    assert late.next_free() == pytest.approx(now - 4499 + 3600 + 1000)


@fast_loop_time
async def test_a_seeded_send_holds_its_windows_for_its_own_lag() -> None:
    """The journal bounds when each call of the process before arrived: one answered 2 s
    after its send, one that was in flight when its process died (lag up to now)."""
    throttle = Throttle((Limit(2, 10),), pace_s=0)  # default margin 0.1 s
    now = throttle.now()
    history = [(now - 11.5, 2.0), (now - 11.4, 11.4)]
    assert throttle.seed(history) == 2
    grants = [await take(throttle), await take(throttle)]
    assert grants[0] == pytest.approx(now - 11.5 + 12, abs=LATE)
    assert grants[1] == pytest.approx(now + 10, abs=LATE)
    # The old calls arrived at the latest at the end of their lags, the new ones at once.
    arrivals = [at + lag - 1e-6 for at, lag in history] + grants
    assert_within(arrivals, throttle.limits)


@fast_loop_time
async def test_seed_counts_the_most_recent_sends_even_out_of_order() -> None:
    """Journal times are wall-clock times: a clock stepped back leaves them out of order."""
    throttle = Throttle((Limit(2, 10),), pace_s=0)
    now = throttle.now()
    # In time: -10.05, -5, -0.02 (lawful: the first and last are more than 10 s apart).
    history = [now - 0.02, now - 10.05, now - 5]
    assert throttle.seed(history) == 3
    grants = [await take(throttle), await take(throttle)]
    assert_within(history + grants, throttle.limits)
    assert grants[0] >= now - 5 + 10.1 - EPS


def test_wall_to_clock_shifts_wall_times_onto_the_throttle_clock() -> None:
    wall_now = time.time()
    # Sent 10 minutes and 9.5 s ago by the wall clock; the throttle's clock reads 500 now.
    converted = Throttle.wall_to_clock([wall_now - 600, wall_now - 9.5], clock_now=500.0)
    assert converted == pytest.approx([-100.0, 490.5], abs=0.05)
    assert converted[1] - converted[0] == pytest.approx(590.5)
    assert Throttle.wall_to_clock([], clock_now=1.0) == []


def test_seed_and_pause_use_the_injected_clock() -> None:
    now = [1000.0]
    throttle = Throttle(REAL, clock=lambda: now[0])
    assert throttle.now() == 1000.0
    assert throttle.seed([400.0 + i * 2.5 for i in range(100)]) == 100
    # 100 sends from 400 to 647.5: the minute's (100 + margin) frees at 460.6, long past.
    assert throttle.next_free() == pytest.approx(460.6)
    throttle.pause(20)
    assert throttle.next_free() == 1020.0
    now[0] = 2000.0
    throttle.pause(5)
    assert throttle.next_free() == 2005.0


# ------------------------------------------------------------------ observed round trips


@fast_loop_time
async def test_a_grant_holds_its_windows_for_its_own_round_trip_however_long() -> None:
    throttle = Throttle((Limit(2, 10),), pace_s=0)  # default margin 0.1 s
    first = await throttle.acquire()
    second = await throttle.acquire()
    throttle.observe(7.5, first)  # slower than a quarter of the window: held all the same
    throttle.observe(0.05, second)
    throttle.observe(-1.0, second)  # nonsense: ignored
    third = await take(throttle)
    assert third == pytest.approx(first + 17.5, abs=LATE)
    fourth = await take(throttle)  # the second's own round trip is below the margin
    assert fourth == pytest.approx(max(third, second + 10.1), abs=LATE)


@fast_loop_time
async def test_an_unanswered_grant_holds_its_window_until_its_answer_comes() -> None:
    throttle = Throttle((Limit(1, 10),), pace_s=0, answer_timeout_s=90)
    first = await throttle.acquire()
    waiting = asyncio.create_task(take(throttle))
    await asyncio.sleep(30)  # far past the window: the first call may still be on its way
    assert not waiting.done()
    throttle.observe(throttle.now() - first, first)  # answered 30 s after its grant
    assert await waiting == pytest.approx(first + 40, abs=LATE)


@fast_loop_time
async def test_a_grant_never_answered_holds_its_window_for_the_answer_timeout() -> None:
    throttle = Throttle((Limit(1, 10),), pace_s=0, answer_timeout_s=25)
    first = await throttle.acquire()  # its caller never reports back
    assert await take(throttle) == pytest.approx(first + 35, abs=LATE)


@fast_loop_time
async def test_a_call_holding_the_others_back_until_its_answer_is_logged_once() -> None:
    """Issue 12: sends that pause on an unanswered call say why (once, at info)."""
    throttle = Throttle((Limit(1, 10),), pace_s=0, answer_timeout_s=25, name="offboard")
    with structlog.testing.capture_logs() as logs:
        first = await throttle.acquire()  # its caller never reports back
        waiters = [asyncio.create_task(take(throttle)) for _ in range(2)]
        await asyncio.sleep(1)
        await asyncio.gather(*waiters)
    held = [e for e in logs if e["event"] == "throttle.waiting_on_unanswered_call"]
    assert len(held) == 1, logs
    assert held[0]["log_level"] == "info"
    assert held[0]["throttle"] == "offboard" and held[0]["window"] == "1/10"
    assert held[0]["holds_until_s"] == pytest.approx(35 - (held[0]["sent_s_ago"]), abs=LATE)
    assert held[0]["answer_timeout_s"] == 25
    assert waiters[0].result() == pytest.approx(first + 35, abs=LATE)


@fast_loop_time
async def test_an_answered_call_that_fills_the_window_is_not_logged() -> None:
    throttle = Throttle((Limit(1, 10),), pace_s=0)
    with structlog.testing.capture_logs() as logs:
        async with throttle.slot():
            await asyncio.sleep(0.5)
        await take(throttle)
    assert [e for e in logs if e["event"].startswith("throttle.")] == []


@fast_loop_time
async def test_a_slot_answers_its_grant_even_when_the_call_fails() -> None:
    throttle = Throttle((Limit(1, 10),), pace_s=0)
    granted: list[float] = []

    async def failing_call() -> None:
        async with throttle.slot() as first:
            granted.append(first)
            await asyncio.sleep(3)
            raise RuntimeError("the journal could not be written")

    with pytest.raises(RuntimeError):
        await failing_call()
    assert await take(throttle) == pytest.approx(granted[0] + 13, abs=LATE)


@fast_loop_time
async def test_round_trips_without_a_grant_feed_the_margin_estimate_only() -> None:
    throttle = Throttle((Limit(2, 10),), pace_s=0)
    throttle.observe(2.0)
    assert throttle.margins_s() == [pytest.approx(2.0)]
    throttle.observe(100.0)  # the estimate stops at a quarter of the window
    assert throttle.margins_s() == [pytest.approx(2.5)]
    assert throttle.margin_hint_s() == 100.0
    first, second = await take(throttle), await take(throttle)
    assert await take(throttle) == pytest.approx(first + 10.1, abs=LATE)
    for _ in range(256):
        throttle.observe(0.05)
    assert throttle.margins_s() == [pytest.approx(0.1)]  # an old slow one is forgotten
    assert second == pytest.approx(first, abs=LATE)  # two fit the empty window at once


@fast_loop_time
async def test_grants_stay_period_plus_round_trip_apart_under_steady_latency() -> None:
    """Arrivals (anywhere within the round trip) never share a closed window beyond the limit."""
    limits = (Limit(5, 1.0),)
    throttle = Throttle(limits, pace_s=0)
    rng = random.Random(7)
    arrivals: list[float] = []
    grants: list[float] = []

    async def call() -> None:
        for _ in range(20):
            async with throttle.slot() as granted:
                grants.append(granted)
                arrivals.append(granted + rng.uniform(0, 0.2))  # on the server, in flight
                await asyncio.sleep(0.2)

    await asyncio.gather(*(call() for _ in range(4)))
    ordered = sorted(grants)
    for first, last in zip(ordered, ordered[5:], strict=False):
        assert last - first >= 1.0 + 0.2 - EPS
    assert_within(arrivals, limits)


# ---------------------------------------------------------------------------------- the pace


@fast_loop_time
async def test_the_default_pace_spreads_a_minute_budget_and_never_spins() -> None:
    throttle = Throttle()
    assert throttle.pace_s == pytest.approx(0.06)
    start = throttle.now()
    grants = await grant_all(throttle, 300, workers=10)
    gaps = [after - before for before, after in itertools.pairwise(grants)]
    assert min(gaps) >= 0.06 - EPS
    # The first minute's 100 leave over about 6 s, not at once.
    assert grants[99] - start == pytest.approx(99 * 0.06, abs=100 * LATE)
    assert_within(grants, REAL)


@fast_loop_time
async def test_the_pace_holds_right_after_a_pause_too() -> None:
    throttle = Throttle()
    first = await grant_all(throttle, 10, workers=3)
    throttle.pause(5)
    then = await grant_all(throttle, 10, workers=3)
    grants = first + then
    gaps = [after - before for before, after in itertools.pairwise(grants)]
    assert min(gaps) >= throttle.pace_s - EPS


@fast_loop_time
async def test_scaled_limits_run_under_looptime_without_spinning() -> None:
    throttle = Throttle(SCALED)
    assert throttle.pace_s < throttle_module._MIN_SLEEP_S  # too short to keep: no pace
    start = throttle.now()
    grants = await grant_all(throttle, 3000, workers=10)
    assert_within(grants, SCALED)
    # The 1 s margin cap does not scale down, so the ratio is a little worse than real-sized.
    assert max(grants) - start <= 1.02 * ideal_duration_s(3000, SCALED)


@fast_loop_time
async def test_aiolimiter_pacer_spins_forever_under_a_frozen_clock() -> None:
    """Why the throttle keeps its own pace: ``AsyncLimiter(1, 0.06)`` (the default pace) leaks
    to a level a hair above zero, reschedules its wake-up at exactly "now" and, with looptime's
    clock frozen while callbacks are ready, never gets out (LIBRARY-NOTES.md)."""
    pacer = AsyncLimiter(1, 0.06)

    async def hundred() -> None:
        for _ in range(100):
            await pacer.acquire()

    with pytest.raises(pytest.fail.Exception, match="clock frozen"):
        await without_frozen_spin(hundred())
