"""The run: plan from the journal, feed workers, offboard under the throttle, journal, stop cleanly.

Data flows one way: source records -> plan (skip what the journal already settled, reconcile
what is in doubt) -> throttle -> client -> journal. Nothing here parses argv or opens files
other than through the journal it is handed.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from bulkoffboard.auth import TokenProvider
from bulkoffboard.budget import BudgetLostError
from bulkoffboard.client import MdeClient
from bulkoffboard.errors import (
    ApiError,
    AuthError,
    BadRequestError,
    ConflictError,
    ForbiddenError,
    JournalError,
    NotFoundError,
    RetryableError,
    ThrottledError,
    UnauthorizedError,
    UnsupportedError,
)
from bulkoffboard.journal import Journal, Replay, iso, utc_now
from bulkoffboard.models import MachineAction, Outcome
from bulkoffboard.reads import ReadPolicy, read_with_retries
from bulkoffboard.sources import Deduplicator, SourceRecord
from bulkoffboard.stopping import backoff_s
from bulkoffboard.targeting import Prepared
from bulkoffboard.throttle import Throttle

log = structlog.get_logger("bulkoffboard.runner")


class ExitCode(enum.IntEnum):
    """Process exit codes: a contract with schedulers."""

    OK = 0
    SOME_FAILED = 1
    USAGE = 2
    AUTH = 3
    INTERRUPTED = 130


@dataclass(frozen=True, slots=True)
class RunSettings:
    """How a run behaves. Durations in seconds."""

    comment: str
    run_id: str
    workers: int = 8
    #: Attempts per machine for 5xx and transport errors (429s do not use this budget).
    max_attempts: int = 6
    #: 429s tolerated per machine before it is recorded as failed.
    max_throttled: int = 50
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    #: After a stop request, how long in-flight machines may take to finish.
    shutdown_grace_s: float = 30.0
    #: Stop with exit 3 when this many offboard calls in a row were forbidden and none passed.
    forbidden_stop_after: int = 5
    queue_size: int = 64

    @property
    def api_comment(self) -> str:
        """The comment sent to the API: it carries the run id, so actions trace back here."""
        return f"{self.comment} [bulkoffboard run {self.run_id}]"


@dataclass(slots=True)
class Summary:
    """What a run did; counts are by outcome over the whole journal (earlier sessions too)."""

    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    session_counts: collections.Counter[str] = field(default_factory=collections.Counter)
    calls: int = 0
    throttled: int = 0
    reconciled: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    exit_code: ExitCode = ExitCode.OK
    reason: str = "completed"
    unprocessed: int = 0
    #: ``run --wait``: what following the actions found.
    waited: dict[str, Any] | None = None
    #: ``run --mark``: what tagging did (:meth:`bulkoffboard.marks.MarkSummary.as_dict`).
    marks: dict[str, Any] | None = None
    #: A dry run's plan (what would be offboarded and skipped, and why); None otherwise.
    plan: Prepared | None = None
    #: The run's id and its journal (None for a dry run, which writes none).
    run_id: str = ""
    journal_path: Path | None = None

    @property
    def total(self) -> int:
        """Machines with a result."""
        return sum(self.counts.values())

    @property
    def duration_s(self) -> float:
        """Seconds from start to finish (or to now)."""
        return (self.finished or time.monotonic()) - self.started

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary."""
        return {
            "counts": dict(sorted(self.counts.items())),
            "total": self.total,
            "this_session": dict(sorted(self.session_counts.items())),
            "offboard_calls": self.calls,
            "throttled_429": self.throttled,
            "reconciled": self.reconciled,
            "duration_s": round(self.duration_s, 3),
            "exit_code": int(self.exit_code),
            "reason": self.reason,
            **({"waited": self.waited} if self.waited is not None else {}),
            **({"marks": self.marks} if self.marks is not None else {}),
        }


class _AuthFailure(Exception):
    """Stop the run: authentication or permission is broken for every call."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _LookupFailed(Exception):
    """The machine's actions could not be read, so sending again is not safe yet."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(slots=True)
class _Item:
    machine_id: str
    attempts: int = 0
    in_doubt: bool = False


class Runner:
    """Offboards the machines of a source, journaling every step.

    Dependencies come in through the constructor: the client (and its token provider), the
    open journal and its replay, and the throttles for offboard calls and for reads.
    """

    def __init__(
        self,
        *,
        client: MdeClient,
        tokens: TokenProvider,
        journal: Journal,
        replay: Replay,
        throttle: Throttle,
        read_throttle: Throttle,
        settings: RunSettings,
        rng: random.Random | None = None,
        on_result: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._client = client
        self._tokens = tokens
        self._journal = journal
        self._replay = replay
        self._throttle = throttle
        self._reads = read_throttle
        self.settings = settings
        self._rng = rng or random.Random()
        self._on_result = on_result
        self.summary = Summary()
        self._stop = asyncio.Event()
        self._failure: str | None = None
        self._budget_lost: str | None = None
        self._forbidden_streak = 0
        self._any_allowed = False
        self._reads_forbidden = False
        self._busy: set[asyncio.Task[Any] | None] = set()

    def __repr__(self) -> str:
        return (
            f"Runner(run_id={self.settings.run_id!r}, workers={self.settings.workers}, "
            f"calls={self.summary.calls}, stopping={self._stop.is_set()})"
        )

    def request_stop(self) -> None:
        """Stop taking new machines; in-flight ones finish (SIGINT / SIGTERM)."""
        if not self._stop.is_set():
            log.warning("run.stop_requested", in_flight="finishing")
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was requested or the run failed."""
        return self._stop.is_set()

    # -- the whole run ---------------------------------------------------------------------------

    async def run(self, records: Iterable[SourceRecord]) -> Summary:
        """Offboard every machine of ``records`` not already settled by the journal."""
        self.summary.counts.update(self._replay.outcome_counts())
        queue: asyncio.Queue[_Item | None] = asyncio.Queue(self.settings.queue_size)
        workers = [
            asyncio.create_task(self._worker(queue), name=f"worker-{n}")
            for n in range(self.settings.workers)
        ]
        producer = asyncio.create_task(self._produce(records, queue), name="producer")
        try:
            await self._supervise(producer, workers)
        finally:
            for task in (producer, *workers):
                task.cancel()
            await asyncio.gather(producer, *workers, return_exceptions=True)
            self.summary.finished = time.monotonic()
        self._finish()
        return self.summary

    async def _supervise(
        self, producer: asyncio.Task[None], workers: list[asyncio.Task[None]]
    ) -> None:
        """Wait for the work to end, or for a stop: then stop feeding at once and give the
        machines in flight the grace period to finish."""
        stop: asyncio.Task[Any] = asyncio.create_task(self._stop.wait())
        pending: set[asyncio.Task[Any]] = {producer, *workers}
        try:
            while pending:
                done, _ = await asyncio.wait(pending | {stop}, return_when=asyncio.FIRST_COMPLETED)
                for task in done - {stop}:
                    task.result()  # re-raise an unexpected error (journal, source)
                pending -= done
                if stop in done:
                    break
        finally:
            stop.cancel()
        if not pending:
            return
        producer.cancel()
        for worker in workers:
            if worker not in self._busy:
                worker.cancel()  # idle, waiting for the next machine
        in_flight = [w for w in workers if not w.done() and w in self._busy]
        if in_flight:
            done, late = await asyncio.wait(in_flight, timeout=self.settings.shutdown_grace_s)
            if late:
                log.warning("run.grace_expired", grace_s=self.settings.shutdown_grace_s)
            for task in late:
                task.cancel()
            for task in done:
                task.result()

    def _finish(self) -> None:
        summary = self.summary
        if self._failure is not None:
            summary.exit_code, summary.reason = ExitCode.AUTH, self._failure
        elif self._stop.is_set():
            summary.exit_code = ExitCode.INTERRUPTED
            summary.reason = self._budget_lost or "interrupted"
        elif summary.counts.get(Outcome.FAILED, 0) > 0:
            summary.exit_code, summary.reason = ExitCode.SOME_FAILED, "some machines failed"
        else:
            summary.exit_code, summary.reason = ExitCode.OK, "completed"

    # -- producer ----------------------------------------------------------------------------------

    async def _produce(
        self, records: Iterable[SourceRecord], queue: asyncio.Queue[_Item | None]
    ) -> None:
        seen = Deduplicator()
        replay = self._replay
        for count, record in enumerate(records, start=1):
            if count % 512 == 0:
                await asyncio.sleep(0)  # reading is synchronous: let the workers run
            if self._stop.is_set():
                break
            if record.machine_id is None:
                if replay.see_invalid(record.where, record.raw):
                    self._record(
                        None,
                        Outcome.INVALID_ID,
                        message=record.reason,
                        extra={"where": record.where, "input": record.raw},
                    )
                continue
            machine_id = record.machine_id
            if replay.is_final(machine_id):
                continue  # settled by an earlier session (so never in ``seen``: kept small)
            if not seen.add(machine_id):
                continue  # a duplicate in the source
            state = replay.state(machine_id)
            if state is not None and state.outcome is not None:
                self.summary.counts[state.outcome] -= 1  # tried again now
            await queue.put(
                _Item(
                    machine_id,
                    attempts=state.attempts if state else 0,
                    in_doubt=bool(state and state.in_doubt),
                )
            )
        for _ in range(self.settings.workers):
            await queue.put(None)

    # -- workers -----------------------------------------------------------------------------------

    async def _worker(self, queue: asyncio.Queue[_Item | None]) -> None:
        task = asyncio.current_task()
        while not self._stop.is_set():
            # Plain get(): an idle worker is cancelled on stop (wait_for can swallow a
            # cancellation on Python 3.11, which once left a worker spinning forever).
            item = await queue.get()
            if item is None:
                return
            self._busy.add(task)
            try:
                await self._process(item)
            except _LookupFailed as exc:
                if not self._stop.is_set():
                    self._record(
                        item.machine_id,
                        Outcome.FAILED,
                        attempts=item.attempts,
                        error=exc.error,
                        message=f"could not check for an existing action: {exc.error}",
                    )
            except _AuthFailure as failure:
                self._fail(failure.message)
                return
            except BudgetLostError as exc:
                # No new grant without the shared budget, and never a silent private one:
                # the calls in flight finish, the run stops as interrupted, resume goes on.
                if self._budget_lost is None:
                    self._budget_lost = f"stopped: {exc}"
                    log.error("run.budget_lost", error=str(exc))  # noqa: TRY400 - one line
                self._stop.set()
                return
            except AuthError as exc:
                self._fail(str(exc))
                return
            finally:
                self._busy.discard(task)

    def _fail(self, message: str) -> None:
        if self._failure is None:
            self._failure = message
            log.error("run.auth_failure", reason=message)
        self._stop.set()

    async def _process(self, item: _Item) -> None:
        if item.in_doubt:
            # The process before may have sent this request: look before sending again.
            if await self._settle_from_actions(item, reason="in_doubt"):
                self.summary.reconciled += 1
                return
            if self._stop.is_set():
                return
        await self._offboard(item)

    async def _offboard(self, item: _Item) -> None:
        settings = self.settings
        machine_id = item.machine_id
        transient = 0
        throttled = 0
        refreshed = False
        last_error: ApiError | None = None
        while True:
            if self._stop.is_set() and (transient or throttled):
                return  # mid-retry: leave it in doubt for the next run to reconcile
            try:
                # The grant is answered on the way out, whatever happens: a journal error or a
                # cancellation too, or its place in the windows stays held.
                async with self._throttle.slot():
                    item.attempts += 1
                    # Durable before the request leaves: a power cut that lost this line
                    # after the request reached MDE would make resume post it again.
                    await self._journal.append_durable(
                        {
                            "type": "attempt",
                            "machine_id": machine_id,
                            "attempt": item.attempts,
                            "at": iso(utc_now()),
                        }
                    )
                    self.summary.calls += 1
                    action = await self._client.offboard(machine_id, settings.api_comment)
            except ThrottledError as exc:
                self.summary.throttled += 1
                throttled += 1
                self._throttle.pause(exc.retry_after_s)
                log.info(
                    "offboard.throttled", machine_id=machine_id, retry_after_s=exc.retry_after_s
                )
                if throttled >= settings.max_throttled:
                    self._record(machine_id, Outcome.FAILED, attempts=item.attempts, error=exc)
                    return
                continue
            except UnauthorizedError as exc:
                # The client already refreshed the token; one more try, then give up the run.
                if refreshed:
                    raise _AuthFailure(f"the API keeps rejecting fresh tokens: {exc}") from None
                refreshed = True
                continue
            except ConflictError as exc:
                self._count_allowed()
                if not await self._settle_from_actions(item, reason="conflict"):
                    self._record(
                        machine_id, Outcome.ALREADY_PENDING, attempts=item.attempts, error=exc
                    )
                return
            except NotFoundError as exc:
                self._count_allowed()
                self._record(machine_id, Outcome.NOT_FOUND, attempts=item.attempts, error=exc)
                return
            except UnsupportedError as exc:
                self._count_allowed()
                self._record(machine_id, Outcome.UNSUPPORTED, attempts=item.attempts, error=exc)
                return
            except ForbiddenError as exc:
                self._record(machine_id, Outcome.FORBIDDEN, attempts=item.attempts, error=exc)
                self._count_forbidden(exc)
                return
            except BadRequestError as exc:
                self._count_allowed()
                self._record(machine_id, Outcome.FAILED, attempts=item.attempts, error=exc)
                return
            except RetryableError as exc:
                last_error = exc
                transient += 1
                log.info(
                    "offboard.retry", machine_id=machine_id, error=str(exc), attempt=item.attempts
                )
                # The request may have created an action before the failure: look first.
                if await self._settle_from_actions(item, reason="ambiguous"):
                    return
                if transient >= settings.max_attempts:
                    self._record(
                        machine_id, Outcome.FAILED, attempts=item.attempts, error=last_error
                    )
                    return
                await asyncio.sleep(self._backoff_s(transient))
                continue
            self._count_allowed()
            self._record(machine_id, Outcome.OFFBOARDED, attempts=item.attempts, action=action)
            return

    def _backoff_s(self, failures: int) -> float:
        """Capped exponential backoff with jitter (:func:`bulkoffboard.stopping.backoff_s`)."""
        settings = self.settings
        return backoff_s(failures, settings.backoff_base_s, settings.backoff_cap_s, self._rng)

    def _count_allowed(self) -> None:
        self._any_allowed = True
        self._forbidden_streak = 0

    def _count_forbidden(self, exc: ForbiddenError) -> None:
        self._forbidden_streak += 1
        if not self._any_allowed and self._forbidden_streak >= self.settings.forbidden_stop_after:
            raise _AuthFailure(
                f"every offboard call so far was forbidden ({self._forbidden_streak} in a row): "
                f"the app needs the Machine.Offboard application permission with admin consent "
                f"({exc})"
            )

    # -- reconciliation ----------------------------------------------------------------------------

    async def _settle_from_actions(self, item: _Item, *, reason: str) -> bool:
        """Look up the machine's Offboard actions; record the outcome if one settles it.

        Ours (the comment carries this run's id) -> offboarded; someone else's, still open ->
        already_pending. Returns False when nothing settles it (then a POST is needed).
        """
        actions = await self._read_actions(item.machine_id)
        if actions is None:
            return False
        run_tag = f"bulkoffboard run {self.settings.run_id}"
        ours = [a for a in actions if a.is_offboard and run_tag in (a.requestor_comment or "")]
        if ours:
            self._record(
                item.machine_id,
                Outcome.OFFBOARDED,
                attempts=item.attempts,
                action=ours[0],
                note=f"found after {reason}",
            )
            return True
        open_ = [a for a in actions if a.is_offboard and a.status in ("Pending", "InProgress")]
        if open_:
            self._record(
                item.machine_id,
                Outcome.ALREADY_PENDING,
                attempts=item.attempts,
                action=open_[0],
                note=f"found after {reason}",
            )
            return True
        return False

    async def _read_actions(self, machine_id: str) -> list[MachineAction] | None:
        """The machine's Offboard actions, retrying transient errors; None if unreadable."""
        if self._reads_forbidden:
            return None
        settings = self.settings
        policy = ReadPolicy(
            attempts=2 * settings.max_attempts,
            backoff_base_s=settings.backoff_base_s,
            backoff_cap_s=settings.backoff_cap_s,
        )
        try:
            return await read_with_retries(
                self._reads,
                lambda: self._client.offboard_actions_for(machine_id),
                what="machine actions",
                policy=policy,
                rng=self._rng,
            )
        except UnauthorizedError:
            raise _AuthFailure("the API keeps rejecting fresh tokens") from None
        except ForbiddenError:
            self._reads_forbidden = True
            log.warning(
                "reconcile.reads_forbidden",
                hint="grant Machine.Read.All so in-doubt machines can be checked before "
                "they are sent again",
            )
            return None
        except ApiError as exc:
            raise _LookupFailed(exc) from None

    # -- journal -----------------------------------------------------------------------------------

    def _record(
        self,
        machine_id: str | None,
        outcome: Outcome,
        *,
        attempts: int = 0,
        action: MachineAction | None = None,
        error: ApiError | None = None,
        message: str | None = None,
        note: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        record: dict[str, Any] = {
            "type": "result",
            "machine_id": machine_id,
            "outcome": outcome.value,
            "action_id": action.id if action else None,
            "action_status": action.status if action else None,
            "http_status": error.status if error else None,
            "error_code": error.code if error else None,
            "message": message if message is not None else (str(error) if error else note),
            "attempts": attempts,
            "at": iso(utc_now()),
        }
        if extra:
            record.update(extra)
        # A machine's result is fsynced: it decides whether resume sends again. A rejected
        # value's is not (a crash that loses it only makes resume record it again), so a
        # file of a million bad lines does not cost a million fsyncs.
        self._journal.append(record, sync=machine_id is not None)
        self.summary.counts[outcome.value] += 1
        self.summary.session_counts[outcome.value] += 1
        log.info(
            "machine.result",
            machine_id=machine_id,
            outcome=outcome.value,
            action_id=record["action_id"],
            attempts=attempts,
        )
        if self._on_result is not None:
            self._on_result(record)


__all__ = ["ExitCode", "JournalError", "RunSettings", "Runner", "Summary"]
