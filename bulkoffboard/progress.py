"""Progress: a live bar on a terminal, periodic ``progress`` log events everywhere else.

On a terminal (and unless the logs are JSON), a ``rich`` progress bar on stderr shows done /
total, the rate and an ETA; log lines must then go through :meth:`Progress.log_stream`, or the
bar and the logs garble each other (LIBRARY-NOTES.md, "Progress display"). Anywhere else
(cron, systemd, a pipe) it emits a structlog event ``progress`` with ``done``, ``total``,
``rate`` (results a minute), ``eta_s`` and ``counts`` every ``interval_s`` and once at the end.

The ETA comes from the throttle's schedule, not from the recent rate: a run that spent its
1,500 calls of the hour in 14 minutes has just gone fast and is about to wait 46 minutes.
:func:`schedule_eta_s` replays the sliding-window rule of :mod:`bulkoffboard.throttle` over
plain inputs (the limits, the recent grant times, now, the calls remaining), so it can be fed
from any throttle and tested without one.
"""

from __future__ import annotations

import collections
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TextIO

import structlog

from bulkoffboard.throttle import Limit

log = structlog.get_logger("bulkoffboard.progress")

Mode = Literal["auto", "rich", "log", "off"]


# -- the ETA -----------------------------------------------------------------------------------


def schedule_eta_s(
    remaining: int,
    limits: Sequence[Limit],
    recent_grants: Iterable[float],
    now: float,
    *,
    margins_s: Sequence[float] | None = None,
    pace_s: float = 0.0,
    paused_until: float = float("-inf"),
    exact_steps: int = 20_000,
) -> float:
    """Seconds from ``now`` until the last of ``remaining`` calls may be granted.

    The greedy schedule of the sliding-log rule (:class:`bulkoffboard.throttle.SlidingLog`):
    a grant is due when, in every window, the grant ``calls`` places back is more than
    ``period + margin`` ago; it also waits for a pause (``paused_until``) and keeps ``pace_s``
    after the grant before it. ``recent_grants`` are the throttle's latest grant times on the
    same clock as ``now`` (any order; older ones than a window are ignored), so a run that has
    just spent its hour waits for it. ``margins_s`` is the margin of each limit (default: each
    limit's :attr:`~bulkoffboard.throttle.Limit.default_margin_s`); zero margins give the ideal
    schedule of :func:`bulkoffboard.throttle.ideal_duration_s`.

    The first ``exact_steps`` grants are simulated one by one; beyond that the schedule is
    periodic (the slowest window repeats: every ``calls`` grants take ``period + margin``), so
    a very long run costs no more than a short one.
    """
    if remaining <= 0:
        return 0.0
    if not limits:
        raise ValueError("an ETA needs at least one limit")
    margins = [limit.default_margin_s for limit in limits] if margins_s is None else list(margins_s)
    if len(margins) != len(limits):
        raise ValueError("margins_s needs one margin per limit")
    reaches = [limit.period_s + margin for limit, margin in zip(limits, margins, strict=True)]
    grants = sorted(recent_grants)
    logs: list[collections.deque[float]] = []
    for limit, reach in zip(limits, reaches, strict=True):
        recent = [g for g in grants if g > now - reach]
        logs.append(collections.deque(recent[-limit.calls :], maxlen=limit.calls))
    # The slowest constraint sets the steady state: fewest calls per second of reach.
    periods = [(limit.calls, reach) for limit, reach in zip(limits, reaches, strict=True)]
    if pace_s > 0:
        periods.append((1, pace_s))
    cycle_calls, cycle_s = min(periods, key=lambda p: p[0] / p[1])
    steps = min(remaining, max(exact_steps, 3 * cycle_calls))
    history: collections.deque[float] = collections.deque(maxlen=max(cycle_calls, 1))
    moment = max(now, paused_until)
    last = grants[-1] if grants else float("-inf")
    for _ in range(steps):
        if pace_s > 0:
            moment = max(moment, last + pace_s)
        for limit, reach, held in zip(limits, reaches, logs, strict=True):
            if len(held) == limit.calls:
                moment = max(moment, held[0] + reach)
        for held in logs:
            held.append(moment)
        history.append(moment)
        last = moment
    if remaining > steps:
        # Grant k of the steady state is grant k - cycle_calls plus cycle_s: count the whole
        # cycles from the last simulated grants to the last one wanted.
        beyond = remaining - steps
        cycles = math.ceil(beyond / cycle_calls)
        back = cycles * cycle_calls - beyond  # places back from the newest simulated grant
        moment = history[-1 - back] + cycles * cycle_s
    return max(0.0, moment - now)


class ScheduleSource(Protocol):
    """What :func:`throttle_eta` reads from a throttle (read-only; a
    :class:`~bulkoffboard.throttle.Throttle` with three small accessors fits)."""

    @property
    def limits(self) -> tuple[Limit, ...]:
        """The windows, in the order of :meth:`margins_s`."""
        ...

    @property
    def pace_s(self) -> float:
        """The least gap between two grants."""
        ...

    def now(self) -> float:
        """The throttle's clock."""
        ...

    def recent_grants(self) -> list[float]:
        """The latest grant times on that clock (the window log that holds the most)."""
        ...

    def margins_s(self) -> list[float]:
        """Each window's margin now, in the order of ``limits``."""
        ...

    @property
    def paused_until(self) -> float:
        """Until when a 429 holds every caller (``-inf`` when not paused)."""
        ...


def throttle_eta(source: ScheduleSource) -> Callable[[int], float]:
    """An ``eta`` for :class:`Progress`: :func:`schedule_eta_s` over the throttle's state now."""

    def eta(remaining: int) -> float:
        return schedule_eta_s(
            remaining,
            source.limits,
            source.recent_grants(),
            source.now(),
            margins_s=source.margins_s(),
            pace_s=source.pace_s,
            paused_until=source.paused_until,
        )

    return eta


# -- the display -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    """Where a run stands."""

    done: int
    total: int | None
    #: Results a second, over the recent window.
    rate_per_s: float
    #: Seconds to the end (None when unknown).
    eta_s: float | None
    counts: dict[str, int]

    @property
    def remaining(self) -> int | None:
        """Results still to come (None when the total is unknown)."""
        return None if self.total is None else max(self.total - self.done, 0)

    def as_fields(self) -> dict[str, Any]:
        """The fields of a ``progress`` log event."""
        return {
            "done": self.done,
            "total": self.total,
            "rate": round(self.rate_per_s * 60, 1),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "counts": dict(self.counts),
        }


def choose_mode(stream: TextIO, log_format: str = "auto") -> Literal["rich", "log"]:
    """``rich`` on a terminal unless the logs are JSON; ``log`` otherwise."""
    isatty = getattr(stream, "isatty", None)
    on_terminal = bool(isatty()) if callable(isatty) else False
    return "rich" if on_terminal and log_format != "json" else "log"


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``4m05s``, ``12s``; ``-`` when unknown."""
    if seconds is None or math.isnan(seconds):
        return "-"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class Progress:
    """Shows a run's progress; call :meth:`start`, :meth:`advance` per result, :meth:`stop`.

    Wire it to a runner with ``Runner(on_result=progress.on_result)``. ``eta`` maps the calls
    remaining to seconds (a closure over :func:`schedule_eta_s` and the throttle); without it
    the ETA is the remaining count over the recent rate. ``mode`` ``auto`` picks ``rich`` on a
    terminal and ``log`` elsewhere (:func:`choose_mode`); ``off`` shows nothing.
    """

    def __init__(
        self,
        *,
        stream: TextIO | None = None,
        mode: Mode = "auto",
        log_format: str = "auto",
        interval_s: float = 30.0,
        eta: Callable[[int], float | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rate_window_s: float = 60.0,
        description: str = "offboarding",
        log_level: str = "info",
        fields: Mapping[str, Any] | None = None,
        board: TenantBoard | None = None,
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self.mode: Literal["rich", "log", "off"] = (
            choose_mode(self._stream, log_format) if mode == "auto" else mode
        )
        self.interval_s = interval_s
        self._eta = eta
        self._clock = clock
        self._rate_window_s = rate_window_s
        self._description = description
        self._log_level = log_level
        #: Added to every event (a tenant's name).
        self._fields = dict(fields or {})
        #: The shared display of a tenants run (rich mode: this is one line of it).
        self._board = board
        self._eta_s: float | None = None
        self.total: int | None = None
        self.done = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self._started: float | None = None
        self._recent: collections.deque[float] = collections.deque()
        self._last_emit = float("-inf")
        self._bar: Any = None  # rich.progress.Progress in rich mode
        self._task: Any = None
        self._console: Any = None
        self._eta_at = float("-inf")
        self._eta_text = "-"

    def __repr__(self) -> str:
        return (
            f"Progress(mode={self.mode!r}, done={self.done}, total={self.total}, "
            f"running={self._started is not None})"
        )

    @property
    def eta_s(self) -> float | None:
        """The ETA last shown on the bar (rich mode), in seconds."""
        return self._eta_s

    # -- the runner's side ---------------------------------------------------------------------

    def start(self, total: int | None) -> None:
        """Begin showing progress towards ``total`` results (None when not known yet)."""
        self.total = total
        self._started = self._clock()
        if self.mode == "rich":
            self._start_rich()
        elif self.mode == "log":
            self._emit("progress", force=True)

    def set_total(self, total: int | None) -> None:
        """Change the total (a streamed source whose size becomes known)."""
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def advance(self, outcome: str) -> None:
        """Count one result with its outcome."""
        now = self._clock()
        self.done += 1
        self.counts[outcome] += 1
        self._recent.append(now)
        self._trim(now)
        if self.mode == "rich":
            self._refresh_rich()
        elif self.mode == "log" and now - self._last_emit >= self.interval_s:
            self._emit("progress")

    def on_result(self, record: dict[str, Any]) -> None:
        """A ``Runner(on_result=...)`` callback: one journaled result."""
        self.advance(str(record.get("outcome") or "unknown"))

    def stop(self) -> None:
        """Stop the display; the log mode emits a last ``progress`` event with ``final``."""
        if self._started is None:
            return
        if self._bar is not None and self._board is not None:
            self._refresh_rich(force_eta=True)
            self._bar.remove_task(self._task)  # a line a tenant while it runs
            self._board.detach(self)
            self._bar = None
            self._console = None
        elif self._bar is not None:
            self._refresh_rich(force_eta=True)
            self._bar.stop()
            self._bar = None
            self._console = None  # a proxy handed out before keeps working: it just prints
        elif self.mode == "log":
            self._emit("progress", force=True, final=True)
        self._started = None

    def log_stream(self) -> TextIO:
        """Where log lines should go while the bar is shown (above it, not through it)."""
        if self._console is not None:
            from rich.file_proxy import FileProxy  # noqa: PLC0415 - only with a terminal

            return FileProxy(self._console, self._stream)  # type: ignore[return-value]
        return self._stream

    # -- numbers -------------------------------------------------------------------------------

    def _trim(self, now: float) -> None:
        horizon = now - self._rate_window_s
        while self._recent and self._recent[0] < horizon:
            self._recent.popleft()

    def snapshot(self) -> ProgressSnapshot:
        """Done, total, recent rate and ETA, now."""
        now = self._clock()
        self._trim(now)
        elapsed = now - self._started if self._started is not None else 0.0
        window = min(self._rate_window_s, elapsed)
        rate = len(self._recent) / window if window > 0 else 0.0
        eta: float | None = None
        if self.total is not None:
            remaining = max(self.total - self.done, 0)
            if remaining == 0:
                eta = 0.0
            elif self._eta is not None:
                eta = self._eta(remaining)
            elif rate > 0:
                eta = remaining / rate
        return ProgressSnapshot(self.done, self.total, rate, eta, dict(self.counts))

    # -- log mode ------------------------------------------------------------------------------

    def _emit(self, event: str, *, force: bool = False, final: bool = False) -> None:
        now = self._clock()
        if not force and now - self._last_emit < self.interval_s:
            return
        self._last_emit = now
        fields = self._fields | self.snapshot().as_fields()
        if final:
            fields["final"] = True
        log.log(_LEVELS[self._log_level], event, **fields)

    # -- rich mode -----------------------------------------------------------------------------

    def _start_rich(self) -> None:
        if self._board is not None:
            self._bar, self._console = self._board.attach(self)
            self._task = self._bar.add_task(
                self._description, total=self.total, rate="-", eta="-", counts=""
            )
            return
        self._bar, self._console = _rich_bar(self._stream)
        self._task = self._bar.add_task(
            self._description, total=self.total, rate="-", eta="-", counts=""
        )
        self._bar.start()

    def _refresh_rich(self, *, force_eta: bool = False) -> None:
        now = self._clock()
        if force_eta or now - self._eta_at >= 1.0:  # the ETA simulation at most once a second
            self._eta_at = now
            snap = self.snapshot()
            self._eta_s = snap.eta_s
            self._eta_text = format_duration(snap.eta_s)
            rate = f"{snap.rate_per_s * 60:.0f}/min"
        else:
            rate = None
        counts = " ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
        fields: dict[str, Any] = {"eta": self._eta_text, "counts": counts}
        if rate is not None:
            fields["rate"] = rate
        self._bar.update(self._task, completed=self.done, total=self.total, **fields)
        if self._board is not None:
            self._board.refresh()


def _rich_bar(stream: TextIO) -> tuple[Any, Any]:
    """A rich progress display on ``stream`` (a terminal) and its console."""
    from rich.console import Console  # noqa: PLC0415 - rich loads only on a terminal
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.progress import Progress as RichProgress  # noqa: PLC0415

    console = Console(file=stream, force_terminal=True)
    bar = RichProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TextColumn("ETA {task.fields[eta]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[counts]}"),
        console=console,
        refresh_per_second=2,
        transient=False,
    )
    return bar, console


class TenantBoard:
    """One terminal display for a tenants run: a line a tenant while it runs (a
    :class:`Progress` made with ``board=``), and the total of every tenant, whose ETA is the
    longest of theirs (they run side by side)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._bar: Any = None
        self._console: Any = None
        self._task: Any = None
        self._members: list[Progress] = []
        #: Done and total of the tenants that finished already.
        self._done = 0
        self._total = 0

    def __repr__(self) -> str:
        return f"TenantBoard(active={len(self._members)}, done={self._done})"

    @property
    def active(self) -> int:
        """Tenants shown now."""
        return len(self._members)

    def attach(self, member: Progress) -> tuple[Any, Any]:
        """A tenant starts: the shared bar (started with the first) and its console."""
        if self._bar is None:
            self._bar, self._console = _rich_bar(self._stream)
            self._task = self._bar.add_task("total", total=0, rate="", eta="-", counts="")
            self._bar.start()
        self._members.append(member)
        return self._bar, self._console

    def detach(self, member: Progress) -> None:
        """A tenant ended: its numbers stay in the total; the last one stops the display."""
        self._members.remove(member)
        self._done += member.done
        self._total += member.total or member.done
        self.refresh()
        if not self._members and self._bar is not None:
            self._bar.stop()
            self._bar = None

    def refresh(self) -> None:
        """Update the total line."""
        if self._bar is None:
            return
        done = self._done + sum(m.done for m in self._members)
        total = self._total + sum(m.total or m.done for m in self._members)
        etas = [m.eta_s for m in self._members if m.eta_s is not None]
        eta = format_duration(max(etas)) if etas else "-"
        running = f"{len(self._members)} tenants running" if self._members else "done"
        self._bar.update(self._task, completed=done, total=total, eta=eta, counts=running)


_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


__all__ = [
    "Progress",
    "ProgressSnapshot",
    "ScheduleSource",
    "TenantBoard",
    "choose_mode",
    "format_duration",
    "schedule_eta_s",
    "throttle_eta",
]
