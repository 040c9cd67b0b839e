"""Cancel: undo a run's offboards that are not final yet (``bulkoffboard cancel``).

An offline device holds its offboard action ``Pending`` until it comes back, so a wrong batch
found the next morning can still be mostly undone, and the journal knows exactly which
actions the run created. Only those are touched: the action ids of the run's ``offboarded``
machines (and of its machines in doubt, whose action is looked up and must carry the run's
id in its comment), never an ``already_pending`` machine's (someone else's action) nor any
other run's.

Each action is checked against the API before it is cancelled:

1. ``check``: one paged scan of the open offboard actions (``type eq 'Offboard' and status eq
   'Pending'``, then ``'InProgress'``: documented syntax, mde-api.md section 3) finds the
   run's actions still open, and that their ``requestorComment`` carries ``bulkoffboard run
   <id>``. The rest are final (or gone): ``GET /api/machineactions/{id}`` each, after the
   cancels, records how they ended (``too_late``, with the status found).
2. ``POST /api/machineactions/{id}/cancel`` with ``{"Comment": "<comment> [bulkoffboard run
   <id>]"}``, under the endpoint's own limits (kind ``cancel``, shared like every budget);
   its ``cancel`` attempt record is fsynced before the call. A 429 pauses the throttle; 5xx
   and transport errors, and a 400 (MDE refuses to cancel a final action), look the action
   up before anything is sent again: a cancel whose answer was lost is found ``Cancelled``
   with this run's comment and recorded ``cancelled``.
3. The run's marks (``run --mark``) are taken off the machines whose offboard was cancelled.

Results are ``cancel`` records (``cancelled``, ``too_late``, ``failed``), so cancelling again
only retries what did not settle; a run that was cancelled is not resumed (its offboards were
withdrawn on purpose). Reports count the cancellations and show the action ``Cancelled``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import random
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from bulkoffboard.budget import BudgetLostError
from bulkoffboard.client import MdeClient
from bulkoffboard.errors import (
    ApiError,
    AuthError,
    BadRequestError,
    ForbiddenError,
    NotFoundError,
    RetryableError,
    ThrottledError,
    UnauthorizedError,
)
from bulkoffboard.journal import Journal, Replay, iso, utc_now
from bulkoffboard.marks import Marker
from bulkoffboard.models import FINAL_ACTION_STATUSES, MachineAction, Outcome
from bulkoffboard.reads import ReadPolicy, read_with_retries
from bulkoffboard.runner import ExitCode
from bulkoffboard.stopping import Stopped, backoff_s, sleep_unless_stopped, unless_stopped
from bulkoffboard.throttle import Throttle

log = structlog.get_logger("bulkoffboard.cancel")

_T = TypeVar("_T")

#: What a cancel can end in (a contract: reports and pipelines read them).
CANCEL_OUTCOMES = ("cancelled", "too_late", "failed")
#: Offboard action statuses that can still be cancelled.
OPEN_STATUSES = ("Pending", "InProgress")
#: ``$top`` of the open-action scan, and pages per status at most (mde-api.md section 3).
_PAGE = 10_000
_MAX_PAGES = 100


@dataclass(frozen=True, slots=True)
class CancelSettings:
    """How a cancel behaves. Durations in seconds."""

    #: The operator's comment; the run id is appended (:attr:`api_comment`).
    comment: str
    run_id: str
    #: Cancels in flight at once.
    workers: int = 8
    #: Tries per action for 5xx and transport errors (429s have their own budget).
    max_attempts: int = 6
    max_throttled: int = 50
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    #: Only these machines (``--ids``); None: every machine of the run.
    only: frozenset[str] | None = None
    #: Check and say what would be cancelled; send no cancel, write nothing.
    dry_run: bool = False
    #: The run's marks to take off the machines whose offboard is cancelled.
    marks: tuple[str, ...] = ()

    @property
    def run_tag(self) -> str:
        """What the run's offboard comments carry (:attr:`RunSettings.api_comment`)."""
        return f"bulkoffboard run {self.run_id}"

    @property
    def api_comment(self) -> str:
        """The cancel comment sent: it carries the run id too."""
        return f"{self.comment} [{self.run_tag}]"


@dataclass(frozen=True, slots=True)
class CancelTarget:
    """A machine whose offboard action this run created (or may have: in doubt)."""

    machine_id: str
    #: None for a machine in doubt: its action is looked up first.
    action_id: str | None
    #: The latest status the journal knows (None: none known).
    status: str | None


@dataclass(frozen=True, slots=True)
class CancelPlan:
    """What the journal asks of a cancel (:func:`plan_cancel`)."""

    targets: tuple[CancelTarget, ...]
    #: Machines left alone, by reason: ``already_final`` (known final: too late),
    #: ``settled`` (cancelled or too late in an earlier cancel), ``not_this_run``
    #: (``already_pending``: someone else's action), ``not_in_run`` (``--ids`` names a
    #: machine the run did not offboard).
    skipped: collections.Counter[str]


def plan_cancel(replay: Replay, only: Collection[str] | None = None) -> CancelPlan:
    """The machines whose offboard action a cancel must look at, from the journal alone."""
    targets: list[CancelTarget] = []
    skipped: collections.Counter[str] = collections.Counter()
    seen: set[str] = set()
    for result in replay.results(("offboarded", "already_pending"), settled=True):
        machine_id = str(result["machine_id"])
        if only is not None and machine_id not in only:
            continue
        seen.add(machine_id)
        if result.get("outcome") == Outcome.ALREADY_PENDING:
            skipped["not_this_run"] += 1
            continue
        earlier = replay.cancels.get(machine_id)
        if earlier is not None and earlier.settled:
            skipped["settled"] += 1
            continue
        latest = replay.latest_action(machine_id, result)
        action_id = result.get("action_id")
        status = latest.action_status if latest is not None else None
        if status in FINAL_ACTION_STATUSES and (earlier is None or not earlier.in_doubt):
            skipped["already_final"] += 1
            continue
        targets.append(
            CancelTarget(machine_id, action_id if isinstance(action_id, str) else None, status)
        )
    for machine_id in replay.in_doubt():
        if only is None or machine_id in only:
            seen.add(machine_id)
            targets.append(CancelTarget(machine_id, None, None))
    if only is not None:
        skipped["not_in_run"] += len(set(only) - seen)
    return CancelPlan(tuple(targets), skipped)


@dataclass(slots=True)
class CancelSummary:
    """What a cancel did. ``counts``: this cancel's outcomes by machine; ``journal_counts``:
    the last cancel outcome of every machine over the whole journal."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    journal_counts: collections.Counter[str] = field(default_factory=collections.Counter)
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    calls: int = 0
    reads: int = 0
    throttled: int = 0
    unmarked: int = 0
    exit_code: ExitCode = ExitCode.OK
    reason: str = "completed"
    dry_run: bool = False
    #: A dry run's findings, one row a machine: machine_id, action_id, status, would.
    rows: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def duration_s(self) -> float:
        """Seconds from start to finish (or to now)."""
        return (self.finished or time.monotonic()) - self.started

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary (``--summary-json``)."""
        return {
            "counts": dict(sorted(self.counts.items())),
            "journal_counts": dict(sorted(self.journal_counts.items())),
            "skipped": dict(sorted(self.skipped.items())),
            "cancel_calls": self.calls,
            "read_calls": self.reads,
            "throttled_429": self.throttled,
            "unmarked": self.unmarked,
            "duration_s": round(self.duration_s, 3),
            "exit_code": int(self.exit_code),
            "reason": self.reason,
            "dry_run": self.dry_run,
            **({"would": [dict(r) for r in self.rows]} if self.dry_run else {}),
        }


#: A stop was requested: leave what is left for the next cancel.
_Stopped = Stopped


class _AuthFailure(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Canceller:
    """Cancels the open offboard actions of one run (see the module docstring)."""

    def __init__(
        self,
        *,
        client: MdeClient,
        journal: Journal | None,
        replay: Replay,
        throttle: Throttle,
        reads: Throttle,
        settings: CancelSettings,
        tags: Throttle | None = None,
        stop: asyncio.Event | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if journal is None and not settings.dry_run:
            raise ValueError("a cancel that sends needs the journal open for writing")
        self._client = client
        self._journal = journal
        self._replay = replay
        self._throttle = throttle
        self._reads = reads
        self._tags = tags
        self.settings = settings
        self._stop = stop or asyncio.Event()
        self._rng = rng or random.Random()
        self.summary = CancelSummary(dry_run=settings.dry_run)
        self._policy = ReadPolicy(
            attempts=2 * settings.max_attempts,
            backoff_base_s=settings.backoff_base_s,
            backoff_cap_s=settings.backoff_cap_s,
        )

    def __repr__(self) -> str:
        return (
            f"Canceller(run_id={self.settings.run_id!r}, calls={self.summary.calls}, "
            f"dry_run={self.settings.dry_run})"
        )

    def request_stop(self) -> None:
        """Finish the calls in flight, start no new one (exit 130)."""
        self._stop.set()

    # -- the whole cancel ------------------------------------------------------------------------

    async def run(self, plan: CancelPlan | None = None) -> CancelSummary:
        """Check, cancel and unmark; the summary's exit code is 0, 1 (some failed), 3 (not
        permitted) or 130 (stopped)."""
        summary = self.summary
        plan = plan or plan_cancel(self._replay, self.settings.only)
        summary.skipped.update(plan.skipped)
        failure: str | None = None
        try:
            await self._cancel_all(plan.targets)
            if not self.settings.dry_run:
                await self._unmark()
        except _AuthFailure as exc:
            failure = exc.message
        except BudgetLostError as exc:
            log.error("cancel.budget_lost", error=str(exc))  # noqa: TRY400 - one line
            summary.exit_code, summary.reason = ExitCode.INTERRUPTED, f"stopped: {exc}"
        except _Stopped:
            pass
        summary.finished = time.monotonic()
        summary.journal_counts.update(self._replay.cancel_counts())
        if failure is not None:
            summary.exit_code, summary.reason = ExitCode.AUTH, failure
        elif summary.exit_code == ExitCode.INTERRUPTED:
            pass
        elif self._stop.is_set():
            summary.exit_code, summary.reason = ExitCode.INTERRUPTED, "interrupted"
        elif summary.counts.get("failed"):
            summary.exit_code, summary.reason = ExitCode.SOME_FAILED, "some cancels failed"
        elif self.settings.dry_run:
            summary.reason = "dry run: nothing sent"
        return summary

    async def _cancel_all(self, targets: tuple[CancelTarget, ...]) -> None:
        if not targets:
            return
        found = await self._open_actions(targets)
        later: list[tuple[CancelTarget, str]] = []  # (target, action id) not open: look up
        ready: list[tuple[CancelTarget, MachineAction]] = []
        for target in targets:
            action_id = target.action_id
            if action_id is None:
                action = await self._in_doubt_action(target)
                if action is None:
                    continue
                action_id = action.id
                if action.status in OPEN_STATUSES:
                    ready.append((target, action))
                    continue
            action = found.get(action_id.lower())
            if action is not None:
                ready.append((target, action))
            else:
                later.append((target, action_id))
        # The urgent part first: every action still open, cancelled before the devices come
        # back and pick it up; then how the others ended.
        await self._each(ready, lambda item: self._cancel(item[0], item[1]))
        await self._each(later, lambda item: self._settle_closed(item[0], item[1]))

    async def _each(self, items: list[_T], work: Callable[[_T], Awaitable[None]]) -> None:
        """``work`` on every item, ``workers`` at a time; stops taking items on a stop. The
        first failure that ends the cancel (auth, the shared budget lost) stops the others and
        is raised once they finished their calls."""
        queue = collections.deque(items)
        ended: list[BaseException] = []

        async def worker() -> None:
            try:
                while queue and not self._stop.is_set():
                    await work(queue.popleft())
            except _Stopped:
                pass
            except (_AuthFailure, BudgetLostError) as exc:
                ended.append(exc)
                self._stop.set()

        async with asyncio.TaskGroup() as group:
            for _ in range(min(self.settings.workers, len(items))):
                group.create_task(worker())
        if ended:
            raise ended[0]
        if self._stop.is_set():
            raise _Stopped

    # -- checks ----------------------------------------------------------------------------------

    async def _open_actions(self, targets: tuple[CancelTarget, ...]) -> dict[str, MachineAction]:
        """The run's offboard actions still open, by lower-case id (one paged scan a status;
        a server that refuses the filter leaves every action to a single lookup)."""
        wanted = {t.action_id.lower() for t in targets if t.action_id is not None}
        found: dict[str, MachineAction] = {}
        if not wanted:
            return found
        for status in OPEN_STATUSES:
            for page in range(_MAX_PAGES):
                try:
                    actions = await self._read(
                        functools.partial(
                            self._client.list_machine_actions,
                            f"type eq 'Offboard' and status eq '{status}'",
                            top=_PAGE,
                            skip=page * _PAGE,
                        )
                    )
                except BadRequestError as exc:
                    log.warning("cancel.scan_refused", error=str(exc))
                    return found
                for action in actions:
                    if action.id.lower() in wanted:
                        found[action.id.lower()] = action
                if len(actions) < _PAGE or len(found) == len(wanted):
                    break
        return found

    async def _in_doubt_action(self, target: CancelTarget) -> MachineAction | None:
        """The offboard action a machine in doubt got from this run, if any; found, it is
        journaled as the machine's result (as resume would)."""
        try:
            actions = await self._read(lambda: self._client.offboard_actions_for(target.machine_id))
        except ApiError as exc:
            self._result(target, None, "failed", error=exc, message=f"lookup failed: {exc}")
            return None
        ours = [a for a in actions if self.settings.run_tag in (a.requestor_comment or "")]
        if not ours:
            self.summary.skipped["never_created"] += 1
            return None
        action = ours[0]
        if self._journal is not None:
            state = self._replay.state(target.machine_id)
            record = {
                "type": "result",
                "machine_id": target.machine_id,
                "outcome": Outcome.OFFBOARDED.value,
                "action_id": action.id,
                "action_status": action.status,
                "http_status": None,
                "error_code": None,
                "message": "found by cancel after in_doubt",
                "attempts": state.attempts if state is not None else 0,
                "at": iso(utc_now()),
            }
            self._replay.apply(record, self._journal.append(record, sync=True))
        return action

    async def _look_up(self, action_id: str) -> MachineAction | None:
        """The action now (None when MDE does not know it)."""
        try:
            return await self._read(lambda: self._client.get_machine_action(action_id))
        except NotFoundError:
            return None

    async def _settle_closed(self, target: CancelTarget, action_id: str) -> None:
        """An action not found open: look up how it ended and record it."""
        try:
            action = await self._look_up(action_id)
        except ApiError as exc:
            self._result(target, action_id, "failed", error=exc, message=f"lookup failed: {exc}")
            return
        if action is None:
            self._result(target, action_id, "failed", message="MDE does not know this action")
        elif action.status in OPEN_STATUSES:
            await self._cancel(target, action)  # opened between the scan and now: cancel it
        else:
            self._closed(target, action)

    def _closed(self, target: CancelTarget, action: MachineAction) -> None:
        """Record a final action: cancelled by this run (an answer lost before), else too
        late."""
        if action.status == "Cancelled" and self.settings.run_tag in (
            action.cancellation_comment or ""
        ):
            self._result(target, action.id, "cancelled", action=action)
        else:
            self._result(target, action.id, "too_late", action=action)

    # -- the cancel call -------------------------------------------------------------------------

    async def _cancel(self, target: CancelTarget, action: MachineAction) -> None:
        if self.settings.run_tag not in (action.requestor_comment or ""):
            self._result(
                target,
                action.id,
                "failed",
                action=action,
                message="not cancelled: the action's comment does not carry this run's id",
            )
            return
        if self.settings.dry_run:
            self.summary.rows.append(self._row(target, action, "cancel"))
            self.summary.counts["would_cancel"] += 1
            return
        settings = self.settings
        transient = throttled = 0
        refreshed = False
        while True:
            if self._stop.is_set():
                raise _Stopped
            try:
                async with contextlib.AsyncExitStack() as held:
                    await self._unless_stopped(held.enter_async_context(self._throttle.slot()))
                    assert self._journal is not None  # noqa: S101 - checked in __init__
                    seen = self._replay.cancels.get(target.machine_id)
                    record = {
                        "type": "cancel",
                        "stage": "attempt",
                        "machine_id": target.machine_id,
                        "action_id": action.id,
                        "attempt": (seen.attempts if seen is not None else 0) + 1,
                        "at": iso(utc_now()),
                    }
                    self._replay.apply(record, await self._journal.append_durable(record))
                    self.summary.calls += 1
                    done = await self._client.cancel_action(action.id, settings.api_comment)
            except ThrottledError as exc:
                self.summary.throttled += 1
                throttled += 1
                self._throttle.pause(exc.retry_after_s)
                if throttled >= settings.max_throttled:
                    self._result(target, action.id, "failed", error=exc)
                    return
                continue
            except UnauthorizedError:
                if refreshed:
                    raise _AuthFailure("the API keeps rejecting fresh tokens") from None
                refreshed = True
                continue
            except ForbiddenError as exc:
                self._result(target, action.id, "failed", error=exc)
                raise _AuthFailure(
                    "cancelling is forbidden: the app needs the Machine.Offboard application "
                    f"permission with admin consent ({exc})"
                ) from None
            except NotFoundError as exc:
                self._result(target, action.id, "failed", error=exc)
                return
            except (BadRequestError, RetryableError) as exc:
                # Refused (final already?) or the answer was lost: look before sending again.
                now = await self._look_up(action.id)
                if now is not None and now.status not in OPEN_STATUSES:
                    self._closed(target, now)
                    return
                if isinstance(exc, BadRequestError) or now is None:
                    self._result(target, action.id, "failed", error=exc)
                    return
                transient += 1
                if transient >= settings.max_attempts:
                    self._result(target, action.id, "failed", error=exc)
                    return
                await self._sleep(self._backoff_s(transient))
                continue
            self._result(target, action.id, "cancelled", action=done)
            return

    # -- marks -----------------------------------------------------------------------------------

    async def _unmark(self) -> None:
        """Take the run's marks off the machines whose offboard was cancelled."""
        if self._tags is None or self._journal is None or not self.settings.marks:
            return
        replay = self._replay
        cancelled = [m for m, seen in replay.cancels.items() if seen.outcome == "cancelled"]
        marker = Marker(
            self._client, self._journal, replay, self._tags, policy=self._policy, rng=self._rng
        )
        try:
            for tag in self.settings.marks:
                self.summary.unmarked += await marker.apply("Remove", tag, cancelled)
        except AuthError as exc:
            raise _AuthFailure(str(exc)) from None
        finally:
            self.summary.throttled += marker.summary.throttled
            self.summary.calls += marker.summary.calls
            if marker.summary.failed:
                self.summary.counts["unmark_failed"] += marker.summary.failed

    # -- helpers ---------------------------------------------------------------------------------

    async def _read(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """One read under the read throttle, with retries; 403 and repeated 401 end the
        cancel with exit 3."""
        self.summary.reads += 1
        try:
            return await self._unless_stopped(
                read_with_retries(
                    self._reads, call, what="machine actions", policy=self._policy, rng=self._rng
                )
            )
        except UnauthorizedError:
            raise _AuthFailure("the API keeps rejecting fresh tokens") from None
        except ForbiddenError as exc:
            raise _AuthFailure(
                "reading machine actions is forbidden: the app needs the Machine.Read.All "
                f"application permission with admin consent ({exc})"
            ) from None

    def _result(
        self,
        target: CancelTarget,
        action_id: str | None,
        outcome: str,
        *,
        action: MachineAction | None = None,
        error: ApiError | None = None,
        message: str | None = None,
    ) -> None:
        self.summary.counts[outcome] += 1
        if self.settings.dry_run:
            would = "too_late" if outcome == "too_late" else f"skip ({outcome})"
            self.summary.rows.append(self._row(target, action, would, message or error))
            return
        assert self._journal is not None  # noqa: S101 - checked in __init__
        record = {
            "type": "cancel",
            "stage": "result",
            "machine_id": target.machine_id,
            "action_id": action_id,
            "outcome": outcome,
            "action_status": action.status if action is not None else None,
            "http_status": error.status if error is not None else None,
            "error_code": error.code if error is not None else None,
            "message": message if message is not None else (str(error) if error else None),
            "at": iso(utc_now()),
        }
        self._replay.apply(record, self._journal.append(record, sync=True))
        log.info(
            "cancel.result",
            machine_id=target.machine_id,
            action_id=action_id,
            outcome=outcome,
            action_status=record["action_status"],
        )

    @staticmethod
    def _row(
        target: CancelTarget, action: MachineAction | None, would: str, note: Any = None
    ) -> dict[str, Any]:
        return {
            "machine_id": target.machine_id,
            "action_id": action.id if action is not None else target.action_id,
            "action_status": action.status if action is not None else target.status,
            "would": would,
            "note": str(note) if note is not None else "",
        }

    def _backoff_s(self, failures: int) -> float:
        settings = self.settings
        return backoff_s(failures, settings.backoff_base_s, settings.backoff_cap_s, self._rng)

    async def _unless_stopped(self, awaitable: Awaitable[_T]) -> _T:
        return await unless_stopped(awaitable, self._stop)

    async def _sleep(self, seconds: float) -> None:
        await sleep_unless_stopped(seconds, self._stop)


__all__ = [
    "CANCEL_OUTCOMES",
    "CancelPlan",
    "CancelSettings",
    "CancelSummary",
    "CancelTarget",
    "Canceller",
    "plan_cancel",
]
