"""Progress: the ETA from the throttle's schedule, log events off a terminal, rich on one."""

from __future__ import annotations

import io
import random

import pytest
import structlog

from bulkoffboard.progress import (
    Progress,
    TenantBoard,
    choose_mode,
    format_duration,
    schedule_eta_s,
    throttle_eta,
)
from bulkoffboard.throttle import DEFAULT_LIMITS, Limit, ideal_duration_s

NO_MARGIN = (0.0, 0.0)


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


# -- the ETA -----------------------------------------------------------------------------------


def test_3000_calls_from_empty_take_an_hour_plus_the_14_minutes_of_the_first_1500() -> None:
    # 100 a minute spends the hour's 1,500 in 14 minutes (the 1,500th call starts minute 15);
    # then call 1,501 waits for the first call to leave the hour, and the pattern repeats.
    eta = schedule_eta_s(3000, DEFAULT_LIMITS, [], 0.0, margins_s=NO_MARGIN)
    assert eta == 3600 + 840 == ideal_duration_s(3000, DEFAULT_LIMITS)
    with_margins = schedule_eta_s(3000, DEFAULT_LIMITS, [], 0.0)  # 0.6 s and 1 s, as the throttle
    assert 3600 + 840 < with_margins < 3600 + 840 + 15


def test_the_first_1500_calls_are_only_minute_bound() -> None:
    assert schedule_eta_s(100, DEFAULT_LIMITS, [], 0.0, margins_s=NO_MARGIN) == 0.0
    assert schedule_eta_s(101, DEFAULT_LIMITS, [], 0.0, margins_s=NO_MARGIN) == 60.0
    assert schedule_eta_s(1500, DEFAULT_LIMITS, [], 0.0, margins_s=NO_MARGIN) == 840.0
    assert schedule_eta_s(1501, DEFAULT_LIMITS, [], 0.0, margins_s=NO_MARGIN) == 3600.0
    assert schedule_eta_s(0, DEFAULT_LIMITS, [], 0.0) == 0.0


def test_recent_grants_hold_back_the_next_calls() -> None:
    # The hour's 1,500 were spent over the last 14 minutes: the next call waits for the first
    # of them to leave the hour window, 46 minutes from now.
    now = 10_000.0
    grants = [now - 840 + (i // 100) * 60 for i in range(1500)]
    assert schedule_eta_s(1, DEFAULT_LIMITS, grants, now, margins_s=NO_MARGIN) == 3600 - 840
    # Grants older than every window change nothing; the order they come in does not matter.
    stale = [now - 7200.0] * 3000
    assert schedule_eta_s(1, DEFAULT_LIMITS, stale, now) == 0.0
    shuffled = grants[:]
    random.Random(4).shuffle(shuffled)
    assert schedule_eta_s(200, DEFAULT_LIMITS, shuffled, now) == schedule_eta_s(
        200, DEFAULT_LIMITS, grants, now
    )


def test_a_pause_and_the_pace_delay_the_schedule() -> None:
    assert schedule_eta_s(1, DEFAULT_LIMITS, [], 0.0, paused_until=42.0) == 42.0
    paced = schedule_eta_s(100, DEFAULT_LIMITS, [], 0.0, margins_s=NO_MARGIN, pace_s=0.06)
    assert paced == pytest.approx(99 * 0.06)


@pytest.mark.parametrize(
    ("limits", "pace_s"),
    [
        (DEFAULT_LIMITS, 0.0),
        (DEFAULT_LIMITS, 0.06),
        ((Limit(10, 1.0), Limit(100, 60.0), Limit(1500, 3600.0)), 0.0),
        ((Limit(100, 60.0), Limit(1_000_000, 3600.0)), 0.01),
        ((Limit(100, 0.6), Limit(1500, 36.0)), 0.0006),
    ],
)
def test_the_periodic_shortcut_for_long_runs_equals_the_step_by_step_schedule(
    limits: tuple[Limit, ...], pace_s: float
) -> None:
    rng = random.Random(9)
    now = 5000.0
    grants = sorted(now - rng.uniform(0, 3000) for _ in range(1200))
    for remaining in (4_999, 25_000, 47_123):
        quick = schedule_eta_s(remaining, limits, grants, now, pace_s=pace_s, exact_steps=2_000)
        exact = schedule_eta_s(remaining, limits, grants, now, pace_s=pace_s, exact_steps=10**9)
        assert quick == pytest.approx(exact, rel=1e-9, abs=1e-6), remaining


class FakeThrottle:
    """The read-only view :func:`throttle_eta` needs, as a Throttle would expose it."""

    limits = DEFAULT_LIMITS
    pace_s = 0.06

    def __init__(self, grants: list[float], now: float, paused_until: float) -> None:
        self._grants, self._now, self._paused_until = grants, now, paused_until

    def now(self) -> float:
        return self._now

    def recent_grants(self) -> list[float]:
        return list(self._grants)

    def margins_s(self) -> list[float]:
        return [0.6, 1.0]

    @property
    def paused_until(self) -> float:
        return self._paused_until


def test_throttle_eta_reads_the_throttles_state_at_each_call() -> None:
    grants = [100.0 + i * 0.06 for i in range(100)]  # the minute's budget, just spent
    throttle = FakeThrottle(grants, now=110.0, paused_until=float("-inf"))
    eta = throttle_eta(throttle)
    assert eta(1) == pytest.approx(100.0 + 60.6 - 110.0)
    assert eta(1) == schedule_eta_s(1, DEFAULT_LIMITS, grants, 110.0, pace_s=0.06)
    throttle._paused_until = 500.0  # a 429 came in
    assert eta(1) == pytest.approx(390.0)


def test_the_eta_refuses_inputs_it_cannot_use() -> None:
    with pytest.raises(ValueError, match="at least one limit"):
        schedule_eta_s(5, (), [], 0.0)
    with pytest.raises(ValueError, match="one margin per limit"):
        schedule_eta_s(5, DEFAULT_LIMITS, [], 0.0, margins_s=(1.0,))


def test_durations_read_like_a_clock() -> None:
    assert [format_duration(s) for s in (None, 7, 245, 3720, 4449.4)] == [
        "-",
        "7s",
        "4m05s",
        "1h02m",
        "1h14m",
    ]


# -- off a terminal: log events ----------------------------------------------------------------


def test_off_a_terminal_progress_is_a_periodic_structured_log_event() -> None:
    clock = FakeClock()
    eta_asked: list[int] = []

    def eta(remaining: int) -> float:
        eta_asked.append(remaining)
        return schedule_eta_s(remaining, DEFAULT_LIMITS, [], 0.0, margins_s=NO_MARGIN)

    progress = Progress(stream=io.StringIO(), interval_s=30, eta=eta, clock=clock)
    assert progress.mode == "log"
    with structlog.testing.capture_logs() as logs:
        progress.start(3010)
        for _ in range(10):
            clock.now += 1
            progress.advance("offboarded")  # within the interval: no event
        clock.now += 25
        progress.on_result({"type": "result", "outcome": "failed"})  # 35 s: an event
        progress.stop()
    events = [e for e in logs if e["event"] == "progress"]
    assert [e["done"] for e in events] == [0, 11, 11]
    assert all(e["total"] == 3010 and e["log_level"] == "info" for e in events)
    middle = events[1]
    assert middle["rate"] == pytest.approx(11 / 35 * 60, abs=0.1)  # results a minute
    assert middle["eta_s"] == 3600 + 840  # 2,999 left: from the throttle's schedule
    assert middle["counts"] == {"offboarded": 10, "failed": 1}
    assert events[-1]["final"] is True
    assert eta_asked[1] == 2999
    assert progress.snapshot().remaining == 2999


def test_without_a_schedule_the_eta_is_the_remaining_over_the_recent_rate() -> None:
    clock = FakeClock()
    progress = Progress(stream=io.StringIO(), clock=clock, rate_window_s=60)
    progress.start(100)
    for _ in range(20):
        clock.now += 0.5
        progress.advance("offboarded")
    snap = progress.snapshot()
    assert snap.rate_per_s == pytest.approx(2.0)
    assert snap.eta_s == pytest.approx(40.0)
    progress.set_total(None)
    assert progress.snapshot().eta_s is None


def test_mode_off_shows_nothing_and_stop_without_start_is_harmless() -> None:
    progress = Progress(stream=io.StringIO(), mode="off")
    with structlog.testing.capture_logs() as logs:
        progress.stop()
        progress.start(2)
        progress.advance("offboarded")
        progress.stop()
    assert logs == []


# -- on a terminal: rich -----------------------------------------------------------------------


def test_the_mode_follows_the_terminal_and_the_log_format() -> None:
    assert choose_mode(Terminal()) == "rich"
    assert choose_mode(Terminal(), "json") == "log"
    assert choose_mode(io.StringIO()) == "log"


def test_on_a_terminal_a_rich_bar_shows_done_total_and_logs_go_above_it() -> None:
    terminal = Terminal()
    clock = FakeClock()
    progress = Progress(stream=terminal, clock=clock)
    assert progress.mode == "rich"
    with structlog.testing.capture_logs() as logs:
        progress.start(10)
        logs_out = progress.log_stream()
        assert logs_out is not terminal
        for outcome in ("offboarded", "offboarded", "not_found"):
            clock.now += 1
            progress.advance(outcome)
        logs_out.write("a log line\n")
        logs_out.flush()
        progress.stop()
    shown = terminal.getvalue()
    assert "3/10" in shown
    assert "a log line" in shown
    assert "not_found 1" in shown and "offboarded 2" in shown
    assert not [e for e in logs if e["event"] == "progress"], "no log events on a terminal"
    assert progress.log_stream() is terminal  # after stop, logs go straight through


def test_a_tenants_board_shows_a_line_a_running_tenant_and_the_total() -> None:
    terminal = Terminal()
    clock = FakeClock()
    board = TenantBoard(stream=terminal)
    contoso = Progress(stream=terminal, clock=clock, description="contoso", board=board)
    fabrikam = Progress(stream=terminal, clock=clock, description="fabrikam", board=board)
    contoso.start(4)
    fabrikam.start(6)
    assert board.active == 2
    for _ in range(4):
        clock.now += 1
        contoso.advance("offboarded")
    fabrikam.advance("not_found")
    contoso.stop()  # its line leaves the board, its numbers stay in the total
    assert board.active == 1
    fabrikam.log_stream().write("a log line\n")
    fabrikam.stop()
    assert board.active == 0
    shown = terminal.getvalue()
    assert "contoso" in shown and "fabrikam" in shown and "total" in shown
    assert "5/10" in shown, "the total counts both tenants"
    assert "a log line" in shown
    assert fabrikam.log_stream() is terminal
