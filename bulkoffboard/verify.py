"""Verify: follow the offboard actions a journal recorded until MDE says they are final.

A run ends when MDE has *accepted* each offboard (a machine action, usually ``Pending``); whether
the device then went offboard is only known later. ``verify`` looks up every action the journal
recorded for an ``offboarded`` or ``already_pending`` machine whose latest known status is not
final, and appends a ``status`` record for what it sees::

    {"type": "status", "machine_id": ..., "action_id": ..., "action_status": ..., "at": ...}

Final statuses are Succeeded, Failed, TimeOut and Cancelled (mde-api.md section 3); an action
seen final is never looked up again, so running it every night on the same journal costs only
the actions still open. Records are appended to the journal it is handed (locked by
:meth:`Journal.resume`); a crash loses at most the last unsynced looks, which the next verify
repeats.

Many actions per call: lookups go through ``GET /api/machineactions`` with ``$filter`` and
``$top`` up to 10,000 (mde-api.md section 3), never one call per machine while a batched form
works. Each round tries these *strategies* in order, each one only for the actions the ones
before did not find:

``window``  ``type eq 'Offboard' and creationDateTimeUtc ge <T>``, paged with ``$top``/``$skip``,
            where T is the oldest result time of the actions wanted, less a slack: every action
            this journal created, whatever its status, in one call per 10,000 offboards in the
            tenant since then. (``creationDateTimeUtc`` is a documented filter field; the ``ge``
            syntax is copied from the alerts examples and UNCONFIRMED for this endpoint.)
``ids``     ``id eq 'a' or id eq 'b' ...`` in batches of ``ids_per_call`` (``or`` is UNCONFIRMED
            for this endpoint too; ids the answer lacks are counted ``missing``).
``open``    ``type eq 'Offboard' and status eq 'Pending'`` then ``'InProgress'``, paged: only
            documented syntax; it finds the actions still open, not the final status of the rest.
``single``  ``GET /api/machineactions/{id}`` for each action left: the documented fallback, one
            call per action, used only when the server refused the batched forms.

A strategy the server answers with 400 (an OData filter it does not take) is dropped for the
rest of the verify, with a warning, and the next one is tried.

Limits: every call acquires the read :class:`~bulkoffboard.throttle.Throttle` first (the
machine actions endpoint allows 100 calls a minute and 1,500 an hour, mde-api.md section 3); a
429 pauses that throttle for its Retry-After; 5xx and transport errors are retried with capped,
jittered exponential backoff; a 401 is retried once (the client refreshed the token); a 403
ends the verify with exit 3 (the app needs ``Machine.Read.All``).

``until_final`` keeps polling, with a growing delay, until every action is final or the
deadline passes. ``max_age_days`` leaves out actions created more than that many days ago
(counted as skipped, nothing recorded), so a nightly verify over old journals stays cheap.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog

from bulkoffboard.budget import BudgetLostError
from bulkoffboard.client import MdeClient
from bulkoffboard.errors import (
    ApiError,
    BadRequestError,
    ForbiddenError,
    JournalError,
    NotFoundError,
    RetryableError,
    ThrottledError,
    UnauthorizedError,
)
from bulkoffboard.journal import ActionSeen, Journal, Replay, iso, parse_iso, utc_now
from bulkoffboard.models import FINAL_ACTION_STATUSES, MachineAction, Outcome
from bulkoffboard.runner import ExitCode
from bulkoffboard.stopping import Stopped, backoff_s, sleep_unless_stopped, unless_stopped
from bulkoffboard.throttle import DEFAULT_LIMITS, Limit, Throttle

log = structlog.get_logger("bulkoffboard.verify")

_T = TypeVar("_T")

#: Outcomes whose machine has an offboard action to follow.
TRACKED_OUTCOMES = frozenset({Outcome.OFFBOARDED.value, Outcome.ALREADY_PENDING.value})
#: Statuses an action can still leave (mde-api.md section 3).
OPEN_STATUSES = ("Pending", "InProgress")
#: The machine actions endpoint's own limits: 100 calls a minute, 1,500 an hour (mde-api.md
#: section 3). Build the read throttle from these: ``Throttle(READ_LIMITS, name="reads")``.
READ_LIMITS: tuple[Limit, ...] = DEFAULT_LIMITS
#: The largest ``$top`` the machine actions list takes (mde-api.md section 3).
MAX_PAGE_SIZE = 10_000
STRATEGIES = ("window", "ids", "open", "single")
#: An action asked for by id and not returned this many rounds in a row is given up on (a new
#: action can take a moment to show in the list; a deleted one never comes back).
MISSING_ROUNDS = 3
_DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class VerifySettings:
    """How a verify behaves. Durations in seconds."""

    #: Keep polling until every action is final (or ``deadline_s`` passes).
    until_final: bool = False
    #: Leave out actions created more than this many days ago (None: no age limit).
    max_age_days: float | None = None
    #: With ``until_final``: stop polling this long after the start (None: no deadline).
    deadline_s: float | None = None
    #: Delay between polling rounds: doubles from the base up to the cap, with jitter.
    poll_base_s: float = 60.0
    poll_cap_s: float = 900.0
    #: Backoff for 5xx and transport errors, per call.
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    #: Tries per call for 5xx and transport errors (429s have their own budget).
    max_attempts: int = 6
    #: 429s tolerated per call before the call counts as failed.
    max_throttled: int = 50
    #: ``$top`` of the paged scans (at most 10,000, mde-api.md section 3).
    page_size: int = MAX_PAGE_SIZE
    #: Pages per scan at most (a server that never sends a short page cannot loop forever).
    max_pages: int = 100
    #: Ids per ``id eq ... or ...`` call: 25 GUIDs keep the query string near 1.5 KB.
    ids_per_call: int = 25
    #: How far before the oldest result time the ``window`` scan starts: an action is created
    #: between its attempt and its result, and a resumed run may record it much later.
    window_slack_s: float = _DAY_S
    #: Strategies to try, in order (see the module docstring).
    strategies: tuple[str, ...] = STRATEGIES
    #: Action statuses that make the exit code 1 (TimeOut is what an offline device does).
    fail_on_statuses: frozenset[str] = frozenset({"Failed"})

    def __post_init__(self) -> None:
        if not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be 1 to {MAX_PAGE_SIZE}, not {self.page_size}")
        if self.ids_per_call < 1 or self.max_pages < 1 or self.max_attempts < 1:
            raise ValueError("ids_per_call, max_pages and max_attempts must be at least 1")
        unknown = set(self.strategies) - set(STRATEGIES)
        if not self.strategies or unknown:
            raise ValueError(f"strategies must be some of {STRATEGIES}, not {self.strategies}")
        if self.max_age_days is not None and not self.max_age_days > 0:
            raise ValueError(f"max_age_days must be above zero, not {self.max_age_days}")


@dataclass(frozen=True, slots=True)
class Target:
    """An action to look up: its machine, its id, what is known of it."""

    machine_id: str
    action_id: str
    #: The latest status known before this verify (None when the result recorded none).
    status: str | None
    #: Epoch seconds of the machine's result: the action existed by then.
    since: float | None


@dataclass(frozen=True, slots=True)
class VerifyPlan:
    """What a journal asks of a verify (:func:`plan_targets`)."""

    targets: tuple[Target, ...]
    #: Final statuses already known, by status (these are not looked up).
    final: collections.Counter[str]
    #: Machines left out, by reason: ``too_old``, ``no_action_id``, ``in_doubt``.
    skipped: collections.Counter[str]


def _epoch(text: Any) -> float | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        moment = parse_iso(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def plan_targets(replay: Replay, *, now: float, max_age_days: float | None = None) -> VerifyPlan:
    """The actions of ``replay`` to look up (a pure function of the replay and ``now``).

    A machine is followed when its last result is ``offboarded`` or ``already_pending`` with
    an action id, and the latest status known of that action (a ``status`` record, else the
    result's) is not final. With ``max_age_days``, a machine whose result is older than that
    is skipped as ``too_old``: its action was created no later than its result.
    """
    targets: list[Target] = []
    final: collections.Counter[str] = collections.Counter()
    skipped: collections.Counter[str] = collections.Counter()
    oldest = None if max_age_days is None else now - max_age_days * _DAY_S
    for machine_id, state in replay.machines.items():
        if state.outcome not in TRACKED_OUTCOMES:
            continue  # decided without reading the result line
        if state.in_doubt:
            skipped["in_doubt"] += 1
            continue
        result = state.result
        if result is None:
            continue
        seen = replay.latest_action(machine_id, result)
        action_id = result.get("action_id") or (seen.action_id if seen else None)
        if not isinstance(action_id, str) or not action_id:
            skipped["no_action_id"] += 1
            continue
        status = seen.action_status if seen is not None else None
        if status in FINAL_ACTION_STATUSES:
            final[status] += 1
            continue
        since = _epoch(result.get("at"))
        if oldest is not None and since is not None and since < oldest:
            skipped["too_old"] += 1
            continue
        targets.append(Target(machine_id, action_id, status, since))
    return VerifyPlan(tuple(targets), final, skipped)


@dataclass(slots=True)
class VerifySummary:
    """What a verify saw. ``statuses`` covers every followed machine of the journal (final ones
    from earlier verifies too), by its latest action status; skipped ones are not in it."""

    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Actions looked up by this verify (each counted once).
    checked: int = 0
    #: ``status`` records written.
    recorded: int = 0
    #: Actions whose status differed from the one known before.
    changed: int = 0
    #: Actions the API did not return when asked for by id (deleted, or outside retention).
    missing: int = 0
    #: Actions no strategy could look up in the last round (calls failed or all refused).
    unresolved: int = 0
    calls: int = 0
    throttled: int = 0
    rounds: int = 0
    #: Strategies dropped because the server refused their filter.
    dropped_strategies: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    exit_code: ExitCode = ExitCode.OK
    reason: str = "completed"

    @property
    def open(self) -> int:
        """Followed actions still Pending or InProgress (or of an unknown status)."""
        return sum(n for s, n in self.statuses.items() if s not in FINAL_ACTION_STATUSES)

    @property
    def duration_s(self) -> float:
        """Seconds from start to finish (or to now)."""
        return (self.finished or time.monotonic()) - self.started

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (what ``--summary-json`` writes for ``verify``)."""
        return {
            "action_statuses": dict(sorted(self.statuses.items())),
            "followed": sum(self.statuses.values()),
            "open": self.open,
            "skipped": dict(sorted(self.skipped.items())),
            "checked": self.checked,
            "recorded": self.recorded,
            "changed": self.changed,
            "missing": self.missing,
            "unresolved": self.unresolved,
            "calls": self.calls,
            "throttled_429": self.throttled,
            "rounds": self.rounds,
            "dropped_strategies": list(self.dropped_strategies),
            "duration_s": round(self.duration_s, 3),
            "exit_code": int(self.exit_code),
            "reason": self.reason,
        }


class _Refused(Exception):
    """The server refused a strategy's filter (400): drop the strategy."""


class _CallFailed(Exception):
    """A lookup call kept failing (retries or 429 budget exhausted)."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(str(error))
        self.error = error


class _AuthFailure(Exception):
    """Reads are not allowed: stop with exit 3."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


#: A stop was requested (:class:`bulkoffboard.stopping.Stopped`).
_Stopped = Stopped


@dataclass(slots=True)
class _Round:
    """One round's findings."""

    seen: dict[str, MachineAction] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    #: The error of a call that kept failing (the round stopped there).
    failed: ApiError | None = None
    #: Why reads are refused (the verify stops with exit 3).
    auth_failure: str | None = None


class Verifier:
    """Follows the actions of one journal. :func:`verify` is the usual entry point.

    Dependencies come in through the constructor: the open journal and its replay, the client,
    the read throttle, the settings, and for tests the wall clock and the random source.
    """

    def __init__(
        self,
        *,
        journal: Journal,
        replay: Replay,
        client: MdeClient,
        throttle: Throttle,
        settings: VerifySettings | None = None,
        stop: asyncio.Event | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_status: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._journal = journal
        self._replay = replay
        self._client = client
        self._throttle = throttle
        self.settings = settings or VerifySettings()
        self._stop = stop or asyncio.Event()
        #: Why the run stopped when the shared budget went away.
        self._budget_lost: str | None = None
        self._wall = wall_clock
        self._rng = rng or random.Random()
        self._on_status = on_status
        self._strategies = list(self.settings.strategies)
        self.summary = VerifySummary()
        #: Actions still to look up, by action id.
        self._pending: dict[str, Target] = {}
        #: The latest status of every action followed and not final, by action id.
        self._latest: dict[str, str | None] = {}
        #: Final statuses, counted (known before or seen now).
        self._final: collections.Counter[str] = collections.Counter()
        #: Actions this verify has written a status record for.
        self._recorded: set[str] = set()
        #: Rounds in a row an action asked for by id was not returned.
        self._misses: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return (
            f"Verifier(journal={str(self._journal.path)!r}, open={len(self._pending)}, "
            f"calls={self.summary.calls}, strategies={self._strategies}, "
            f"stopping={self._stop.is_set()})"
        )

    def request_stop(self) -> None:
        """Stop after the call in flight (SIGINT / SIGTERM): what was seen is journaled."""
        self._stop.set()

    # -- the whole verify --------------------------------------------------------------------------

    async def run(self) -> VerifySummary:
        """Look up every open action of the journal; poll again with ``until_final``."""
        summary = self.summary
        plan = plan_targets(self._replay, now=self._wall(), max_age_days=self.settings.max_age_days)
        summary.skipped.update(plan.skipped)
        self._final.update(plan.final)
        self._latest = {t.action_id: t.status for t in plan.targets}
        self._pending = {t.action_id: t for t in plan.targets}
        log.info(
            "verify.start",
            journal=str(self._journal.path),
            open=len(self._pending),
            final=sum(self._final.values()),
            skipped=dict(plan.skipped),
        )
        auth_failure: str | None = None
        try:
            auth_failure = await self._rounds()
        except _Stopped:
            pass
        finally:
            with contextlib.suppress(JournalError):  # never hide the error on its way out
                self._journal.sync()
            summary.finished = time.monotonic()
        for status in self._latest.values():
            summary.statuses[status or "unknown"] += 1
        summary.statuses.update(self._final)
        if auth_failure is not None:
            summary.exit_code, summary.reason = ExitCode.AUTH, auth_failure
            log.error("verify.auth_failure", reason=auth_failure)
        else:
            self._finish()
        log.info("verify.end", **summary.as_dict())
        return summary

    async def _rounds(self) -> str | None:
        """Poll until done; returns why reads are refused, if they are."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        deadline = None if settings.deadline_s is None else loop.time() + settings.deadline_s
        while self._pending and not self._stop.is_set():
            self.summary.rounds += 1
            findings = await self._look(self._pending)
            self._absorb(findings)
            self._journal.sync()
            if findings.auth_failure is not None:
                return findings.auth_failure
            if not settings.until_final or not self._pending or self._stop.is_set():
                break
            now = loop.time()
            if deadline is not None and now >= deadline:
                break
            delay = self._poll_delay_s(self.summary.rounds)
            if deadline is not None:
                delay = min(delay, max(deadline - now, 0.001))
            log.info("verify.waiting", open=len(self._pending), delay_s=round(delay, 3))
            await self._sleep(delay)
        return None

    def _finish(self) -> None:
        summary = self.summary
        failing = sum(summary.statuses.get(s, 0) for s in self.settings.fail_on_statuses)
        if self._stop.is_set():
            summary.exit_code = ExitCode.INTERRUPTED
            summary.reason = self._budget_lost or "interrupted"
        elif summary.unresolved:
            summary.exit_code = ExitCode.SOME_FAILED
            summary.reason = f"{summary.unresolved} actions could not be looked up"
        elif self.settings.until_final and self._pending:
            summary.exit_code = ExitCode.SOME_FAILED
            summary.reason = f"deadline passed with {len(self._pending)} actions still open"
        elif failing:
            summary.exit_code = ExitCode.SOME_FAILED
            summary.reason = f"{failing} offboard actions ended as " + "/".join(
                sorted(self.settings.fail_on_statuses)
            )
        else:
            summary.exit_code, summary.reason = ExitCode.OK, "completed"

    def _poll_delay_s(self, rounds: int) -> float:
        ceiling = min(self.settings.poll_cap_s, self.settings.poll_base_s * 2 ** (rounds - 1))
        return max(0.001, self._rng.uniform(ceiling * 0.75, ceiling))

    def _backoff_s(self, failures: int) -> float:
        settings = self.settings
        return backoff_s(failures, settings.backoff_base_s, settings.backoff_cap_s, self._rng)

    # -- recording ---------------------------------------------------------------------------------

    def _absorb(self, findings: _Round) -> None:
        """Journal what a round saw; drop final (and too old) actions from the pending set,
        and those the API said it does not have in :data:`MISSING_ROUNDS` rounds."""
        summary = self.summary
        pending, latest = self._pending, self._latest
        oldest = (
            None
            if self.settings.max_age_days is None
            else self._wall() - self.settings.max_age_days * _DAY_S
        )
        now_text = iso(utc_now())
        for action_id, action in findings.seen.items():
            target = pending.get(action_id)
            if target is None:
                continue
            self._misses.pop(action_id, None)
            created = _epoch(action.creation_time)
            if oldest is not None and created is not None and created < oldest:
                # Someone else's action, older than asked for: leave it out, record nothing.
                del pending[action_id]
                del latest[action_id]
                summary.skipped["too_old"] += 1
                continue
            status = action.status or "unknown"
            before = latest.get(action_id)
            if status != before:
                summary.changed += 1
            # One record per action per verify, then one per change: the first says "seen,
            # still Pending tonight", the others follow the lifecycle while polling.
            if action_id not in self._recorded:
                self._recorded.add(action_id)
                summary.checked += 1
                self._record(target, action_id, status, now_text)
            elif status != before:
                self._record(target, action_id, status, now_text)
            latest[action_id] = status
            if status in FINAL_ACTION_STATUSES:
                del pending[action_id]
                del latest[action_id]
                self._final[status] += 1
        for action_id in findings.missing:
            target = pending.get(action_id)
            if target is None:
                continue
            self._misses[action_id] += 1
            if self._misses[action_id] == 1:
                summary.missing += 1
                log.warning(
                    "verify.action_missing", machine_id=target.machine_id, action_id=action_id
                )
            if self._misses[action_id] >= MISSING_ROUNDS or not self.settings.until_final:
                del pending[action_id]  # its last known status stays in the counts
        summary.unresolved = (
            len(set(pending) - set(findings.seen) - findings.missing) if findings.failed else 0
        )

    def _record(self, target: Target, action_id: str, status: str, at: str) -> None:
        record: dict[str, Any] = {
            "type": "status",
            "machine_id": target.machine_id,
            "action_id": action_id,
            "action_status": status,
            "at": at,
        }
        self._journal.append(record)
        self._replay.statuses[target.machine_id] = ActionSeen(action_id, status, at)
        self.summary.recorded += 1
        log.debug("verify.status", machine_id=target.machine_id, action_status=status)
        if self._on_status is not None:
            self._on_status(record)

    # -- one round of lookups ----------------------------------------------------------------------

    async def _look(self, pending: dict[str, Target]) -> _Round:
        """Run the strategies in order, each for what the ones before did not find."""
        findings = _Round()
        left = dict(pending)
        for name in list(self._strategies):
            if not left:
                break
            strategy: Callable[[dict[str, Target], _Round], Awaitable[None]] = {
                "window": self._window,
                "ids": self._ids,
                "open": self._open,
                "single": self._single,
            }[name]
            try:
                await strategy(left, findings)
            except _Refused as refused:
                self._strategies.remove(name)
                self.summary.dropped_strategies.append(name)
                log.warning("verify.strategy_refused", strategy=name, error=str(refused))
            except _CallFailed as failed:
                findings.failed = failed.error
                log.warning("verify.lookup_failed", strategy=name, error=str(failed.error))
                break
            except _AuthFailure as failure:
                findings.auth_failure = failure.message
                break
            except _Stopped:
                break
            for action_id in [*findings.seen, *findings.missing]:
                left.pop(action_id, None)
        return findings

    async def _window(self, left: dict[str, Target], findings: _Round) -> None:
        bounds = [t.since for t in left.values() if t.since is not None]
        if not bounds:
            return
        lower = min(bounds) - self.settings.window_slack_s
        if self.settings.max_age_days is not None:
            lower = max(lower, self._wall() - self.settings.max_age_days * _DAY_S)
        stamp = datetime.fromtimestamp(lower, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        # creationDateTimeUtc is a documented $filter field (mde-api.md section 3).
        await self._scan(f"type eq 'Offboard' and creationDateTimeUtc ge {stamp}", left, findings)

    async def _ids(self, left: dict[str, Target], findings: _Round) -> None:
        wanted = list(left)
        size = self.settings.ids_per_call
        for start in range(0, len(wanted), size):
            batch = wanted[start : start + size]
            filter_ = " or ".join(f"id eq {_literal(a)}" for a in batch)
            actions = await self._list(filter_, top=min(MAX_PAGE_SIZE, max(len(batch), 1)))
            found = {a.id for a in actions}
            self._take(actions, left, findings)
            findings.missing.update(a for a in batch if a not in found)

    async def _open(self, left: dict[str, Target], findings: _Round) -> None:
        for status in OPEN_STATUSES:
            # Only documented syntax: eq on type and status, joined by and (mde-api.md 3).
            await self._scan(f"type eq 'Offboard' and status eq '{status}'", left, findings)
            if not set(left) - set(findings.seen):
                return

    async def _single(self, left: dict[str, Target], findings: _Round) -> None:
        for action_id in list(left):
            if action_id in findings.seen:
                continue
            try:
                action = await self._call(
                    functools.partial(self._client.get_machine_action, action_id)
                )
            except NotFoundError:
                findings.missing.add(action_id)
                continue
            self._take([action], left, findings)

    async def _scan(self, filter_: str, left: dict[str, Target], findings: _Round) -> None:
        """Page through ``filter_`` until a short page, or until every action is found."""
        async for page in self._pages(filter_):
            self._take(page, left, findings)
            if not set(left) - set(findings.seen):
                return

    async def _pages(self, filter_: str) -> AsyncIterator[list[MachineAction]]:
        # Explicit $top/$skip paging, stopping on a short page (mde-api.md section 4's advice
        # for lists whose nextLink is unreliable), capped at max_pages.
        size = self.settings.page_size
        for number in range(self.settings.max_pages):
            page = await self._list(filter_, top=size, skip=number * size)
            yield page
            if len(page) < size:
                return
        log.warning("verify.page_cap", filter=filter_, pages=self.settings.max_pages)

    @staticmethod
    def _take(actions: Iterable[MachineAction], left: dict[str, Target], findings: _Round) -> None:
        for action in actions:
            if action.id in left:
                findings.seen[action.id] = action

    async def _list(
        self, filter_: str, *, top: int, skip: int | None = None
    ) -> list[MachineAction]:
        try:
            return await self._call(
                lambda: self._client.list_machine_actions(filter_, top=top, skip=skip)
            )
        except BadRequestError as exc:
            raise _Refused(str(exc)) from None
        except NotFoundError:
            return []

    # -- one call, under the read throttle ---------------------------------------------------------

    async def _call(self, send: Callable[[], Awaitable[_T]]) -> _T:
        """Send one read: acquire the throttle first, pause it on 429, retry 5xx/transport."""
        settings = self.settings
        transient = 0
        throttled = 0
        refreshed = False
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                async with contextlib.AsyncExitStack() as held:
                    # A stop while waiting for the grant cancels the wait (no grant is made);
                    # a grant made is answered on the way out, whatever happens.
                    await self._unless_stopped(held.enter_async_context(self._throttle.slot()))
                    self.summary.calls += 1
                    return await send()
            except BudgetLostError as exc:
                # No new grant without the shared budget, and no silent private one: stop
                # (the next verify goes on where this one ended).
                self._budget_lost = f"stopped: {exc}"
                log.error("verify.budget_lost", error=str(exc))  # noqa: TRY400 - one line
                self._stop.set()
                raise _Stopped from None
            except ThrottledError as exc:
                self.summary.throttled += 1
                throttled += 1
                self._throttle.pause(exc.retry_after_s)
                log.info("verify.throttled", retry_after_s=exc.retry_after_s)
                if throttled >= settings.max_throttled:
                    raise _CallFailed(exc) from None
            except UnauthorizedError:
                if refreshed:
                    raise _AuthFailure("the API keeps rejecting fresh tokens") from None
                refreshed = True  # the client already refreshed the token: one more try
            except ForbiddenError as exc:
                raise _AuthFailure(
                    "reading machine actions is forbidden: the app needs the Machine.Read.All "
                    f"application permission with admin consent ({exc})"
                ) from None
            except RetryableError as exc:
                transient += 1
                log.info("verify.retry", error=str(exc), failures=transient)
                if transient >= settings.max_attempts:
                    raise _CallFailed(exc) from None
                await self._sleep(self._backoff_s(transient))

    async def _unless_stopped(self, awaitable: Awaitable[_T]) -> _T:
        """Await ``awaitable`` unless a stop comes first (then raise :class:`_Stopped`)."""
        return await unless_stopped(awaitable, self._stop)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early on a stop (the loop's clock, so looptime can skip it)."""
        await sleep_unless_stopped(seconds, self._stop)


def _literal(text: str) -> str:
    """An OData string literal (a quote is doubled)."""
    return "'" + text.replace("'", "''") + "'"


async def verify(
    journal: Journal,
    replay: Replay,
    client: MdeClient,
    throttle: Throttle,
    settings: VerifySettings | None = None,
    *,
    stop: asyncio.Event | None = None,
    wall_clock: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    on_status: Callable[[dict[str, Any]], None] | None = None,
) -> VerifySummary:
    """Look up the open offboard actions of a journal and append ``status`` records.

    ``journal`` and ``replay`` come from :meth:`Journal.resume` (the journal stays locked and
    open; the caller closes it). ``throttle`` is the read throttle (100/60 and 1500/3600 for
    the machine actions endpoint, mde-api.md section 3), separate from the offboard one.
    Setting ``stop`` ends the verify after the call in flight, with exit 130.
    ``on_status`` is called with each ``status`` record written (for a progress display).

    Returns a :class:`VerifySummary`; its ``exit_code`` is 0 when every lookup worked (and,
    with ``until_final``, every action is final) and none ended in ``fail_on_statuses``; 1
    otherwise; 3 when reads are not permitted; 130 when stopped.
    """
    verifier = Verifier(
        journal=journal,
        replay=replay,
        client=client,
        throttle=throttle,
        settings=settings,
        stop=stop,
        wall_clock=wall_clock,
        rng=rng,
        on_status=on_status,
    )
    return await verifier.run()


__all__ = [
    "READ_LIMITS",
    "STRATEGIES",
    "Target",
    "Verifier",
    "VerifyPlan",
    "VerifySettings",
    "VerifySummary",
    "plan_targets",
    "verify",
]
