"""The application: plan a run, open or resume its journal, run a session, follow actions, check.

This is the layer every face drives (the command line, the demo, the public API in
:mod:`bulkoffboard.api`, scripts): it takes typed settings (:class:`Plan`, :class:`Targets`, a
:class:`~bulkoffboard.config.Connection`) and returns typed results
(:class:`~bulkoffboard.runner.Summary`, :class:`~bulkoffboard.verify.VerifySummary`,
:class:`CheckResult`). It never parses argv, prints, exits, configures logging or installs
signal handlers: a stop comes in as an :class:`asyncio.Event` (or a cancellation), progress
goes out through a :class:`RunObserver`, and a question for a person through a ``confirm``
callback. It holds no process-wide state, so two jobs can run in one event loop at once
(each with its own journal, throttles, token provider and HTTP session).

Data flows one way: source -> plan (targeting, journal replay) -> throttle -> client ->
journal -> report.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Container, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
import structlog

from bulkoffboard import __version__, config, targeting
from bulkoffboard.auth import (
    ManagedIdentityTokenProvider,
    MsalTokenProvider,
    TokenProvider,
    token_roles,
)
from bulkoffboard.budget import BudgetKey, open_budget
from bulkoffboard.budget import label as budget_label
from bulkoffboard.cancel import Canceller, CancelSettings, CancelSummary, plan_cancel
from bulkoffboard.client import MdeClient
from bulkoffboard.connections import http_session
from bulkoffboard.errors import (
    ApiError,
    AuthError,
    ForbiddenError,
    JournalError,
    SourceError,
    UsageError,
)
from bulkoffboard.journal import (
    FORMAT_VERSION,
    TOOL,
    Journal,
    Replay,
    iso,
    read_header,
    replay_file,
    utc_now,
)
from bulkoffboard.marks import Marker, MarkSummary, can_mark, marks_of, tags_for
from bulkoffboard.marks import check_permission as check_mark_permission
from bulkoffboard.models import Outcome
from bulkoffboard.progress import throttle_eta
from bulkoffboard.reads import ReadPolicy
from bulkoffboard.runner import ExitCode, Runner, RunSettings, Summary
from bulkoffboard.sources import Deduplicator, iter_records
from bulkoffboard.throttle import ANSWER_TIMEOUT_S, Limit, Throttle
from bulkoffboard.verify import VerifySettings, VerifySummary, verify

log = structlog.get_logger("bulkoffboard.jobs")

_T = TypeVar("_T")


class RunObserver(Protocol):
    """What a face wants to hear of a session as it goes (a progress display, a notebook)."""

    def run_started(self, total: int | None, eta: Callable[[int], float]) -> None:
        """The session starts: ``total`` machines to do (None: not known yet); ``eta(n)``
        estimates the seconds ``n`` more offboard calls take under the throttle."""

    def machine_done(self, record: dict[str, Any]) -> None:
        """A machine's ``result`` record was journaled."""

    def run_stopped(self) -> None:
        """The session's offboarding ended (before ``--wait`` follows the actions); called
        again when the session ends, so it must be idempotent."""


#: ``confirm(prepared, question)``: the plan is over ``max_machines``; True to go on.
Confirm = Callable[[targeting.Prepared, str], bool]


def make_tokens(conn: config.Connection) -> TokenProvider:
    """The token provider for a connection's credential."""
    if conn.credential_kind == "managed_identity":
        return ManagedIdentityTokenProvider(
            client_id=conn.client_id or None, scope=conn.scope, ca_bundle=conn.ca_bundle
        )
    return MsalTokenProvider(
        tenant_id=conn.tenant_id,
        client_id=conn.client_id,
        credential=conn.credential,
        authority_host=conn.authority_host,
        scope=conn.scope,
        ca_bundle=conn.ca_bundle,
    )


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything a session needs, resolved before anything is sent."""

    journal_path: Path
    source_path: Path
    source_format: str
    comment: str
    run_id: str
    workers: int
    limits: tuple[Limit, ...]
    header: dict[str, Any] | None  # None when resuming
    #: Extra RunSettings fields (backoff, grace period...), for tests and benchmarks.
    tuning: Mapping[str, Any] = field(default_factory=dict)
    #: ``run --wait``: follow the actions until final, at most this long (None: do not wait).
    wait_deadline_s: float | None = None
    wait_poll_s: float = 60.0
    #: ``--margin``: each window's jitter margin floor (None: the limit's default).
    margin_s: float | None = None
    #: Where the rate budgets live (:func:`bulkoffboard.budget.open_budget`): None or "none"
    #: this process's alone; "default" or a directory: a ledger shared on this host.
    budget: str | None = None
    #: ``--mark``/``--mark-run-id``: tags put on every machine to offboard, before the first
    #: offboard call (:mod:`bulkoffboard.marks`).
    marks: tuple[str, ...] = ()


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file (a run's source is resumed only while it is unchanged)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from None
    return digest.hexdigest()


def check_workers(value: int | None, file_cfg: Mapping[str, Any], default: int = 8) -> int:
    """``--workers`` (or the config's ``workers``), checked."""
    workers = value if value is not None else int(file_cfg.get("workers", default))
    if not 1 <= workers <= 256:
        raise UsageError(f"--workers must be 1 to 256, not {workers}")
    return workers


@dataclass(frozen=True, slots=True)
class Targets:
    """What a new run targets and how carefully: the source request, the rules, the breaker."""

    request: targeting.Request
    rules: targeting.Rules = field(default_factory=targeting.Rules)
    max_machines: int | None = None
    assume_yes: bool = False
    dry_run: bool = False
    #: Keep every machine's row in the dry run's plan (for a CSV or JSON listing of it).
    dry_rows: bool = False
    #: Asked when the plan is over ``max_machines`` and ``assume_yes`` is off (None: refuse).
    confirm: Confirm | None = None


@dataclass(frozen=True, slots=True)
class Budgets:
    """Where a session's throttles keep their rate budgets: one a call kind, for this app
    registration in this tenant, on the budget ``spec`` names (a ledger shared on this host,
    or none: this process's alone)."""

    spec: str | None
    conn: config.Connection

    def key(self, kind: str) -> BudgetKey:
        """The budget of ``kind`` (offboard, reads, hunting, ...)."""
        conn = self.conn
        return BudgetKey(conn.api_url, conn.tenant_id, conn.client_id, kind)

    async def throttle(
        self, kind: str, limits: tuple[Limit, ...], margin_s: float | None = None
    ) -> Throttle:
        """A throttle for ``kind`` on its budget, the budget's store checked first (a store
        that cannot be used stops the job before any call)."""
        shared = open_budget(self.spec, self.key(kind))
        if shared is not None:
            try:
                await shared.ready()
            except BaseException:
                await shared.close()
                raise
        return Throttle(limits, name=kind, margin_s=margin_s, shared=shared)

    @property
    def label(self) -> str:
        """What the journal's ``session`` record says of the offboard budget."""
        return budget_label(self.spec, self.key("offboard"))


def _hunting_limits(limits: tuple[Limit, ...]) -> tuple[Limit, ...]:
    """Advanced hunting allows 45 calls a minute and 1,500 an hour (mde-api.md section 5):
    the same windows as the offboard limits given, with 45 in the shortest."""
    if not limits:
        return limits
    shortest = min(limits, key=lambda x: x.period_s)
    return tuple(Limit(min(45, x.calls), x.period_s) if x is shortest else x for x in limits)


async def execute(
    plan: Plan,
    conn: config.Connection,
    targets: Targets | None = None,
    *,
    stop: asyncio.Event | None = None,
    observer: RunObserver | None = None,
) -> Summary:
    """Acquire a token, plan (new runs), open the journal, run, close.

    A new run fails authentication before its journal is created; planning (source
    resolution, exclusions, preflight, the breaker) happens before the first offboard call.
    A resume locks, mends and replays its journal first (once: :func:`plan_resume` read only
    its header), so a damaged or busy journal is reported before any token is asked for.

    ``stop`` set: stop taking new machines, let the calls in flight finish (exit 130); set
    while planning, nothing is sent and no journal is made. A dry run returns a summary whose
    ``plan`` is the plan.
    """
    summary = await _execute(plan, conn, targets, stop=stop, observer=observer)
    summary.run_id = plan.run_id
    if not (targets is not None and targets.dry_run):
        summary.journal_path = plan.journal_path
    return summary


async def _execute(
    plan: Plan,
    conn: config.Connection,
    targets: Targets | None,
    *,
    stop: asyncio.Event | None,
    observer: RunObserver | None,
) -> Summary:
    tokens = make_tokens(conn)
    opened: tuple[Journal, Replay] | None = None
    try:
        if plan.header is None:
            opened = Journal.resume(plan.journal_path)
        await tokens.token()
        timeout = aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S, connect=15, sock_read=60)
        session, tls = http_session(conn, timeout, limit=plan.workers + 4)
        async with session:
            client = MdeClient(session, conn.api_url, tokens, ssl_context=tls)
            budgets = Budgets(plan.budget, conn)
            reads = await budgets.throttle("reads", plan.limits)
            handed, opened = opened, None  # _with_client closes it from here on
            try:
                return await _with_client(
                    plan,
                    client,
                    tokens,
                    reads,
                    targets,
                    opened=handed,
                    stop=stop,
                    observer=observer,
                    budgets=budgets,
                )
            finally:
                await reads.aclose()  # the last answers reach the shared budget
    finally:
        tokens.close()
        if opened is not None:
            opened[0].close()


async def _with_client(
    plan: Plan,
    client: MdeClient,
    tokens: TokenProvider,
    reads: Throttle,
    targets: Targets | None,
    *,
    opened: tuple[Journal, Replay] | None = None,
    stop: asyncio.Event | None = None,
    observer: RunObserver | None = None,
    budgets: Budgets,
) -> Summary:
    stop = stop or asyncio.Event()
    replay: Replay
    total: int | None = None
    if plan.marks:
        check_mark_permission(await tokens.token())
    if plan.header is not None:
        targets = targets or Targets(
            targeting.Request("file", plan.source_path, plan.source_format)
        )
        planned = await _unless_stopped(_prepare(plan, client, reads, targets, budgets), stop)
        if planned is None:
            return _interrupted_before_sending()
        plan, prepared = planned
        if targets.dry_run:
            dry = Summary(reason="dry run: nothing sent", plan=prepared)
            dry.finished = dry.started
            return dry
        _breaker(prepared, targets)
        if stop.is_set():
            return _interrupted_before_sending()
        _say_if_empty(prepared, targets.request)
        total = prepared.to_offboard
        assert plan.header is not None  # noqa: S101 - a new run has a header
        journal = Journal.create(plan.journal_path, plan.header)
        replay = Replay(header=plan.header, path=plan.journal_path)
        try:
            _journal_plan(journal, replay, prepared)
        except BaseException:
            journal.close()
            raise
    else:
        journal, replay = opened or Journal.resume(plan.journal_path)
        if "cancel" in replay.session_commands:
            journal.close()
            raise UsageError(
                f"run {replay.run_id} was cancelled ('bulkoffboard cancel'): its offboards "
                "were withdrawn on purpose, so it is not resumed; start a new run for the "
                "machines that should go"
            )
        if not replay.planned:
            try:
                await _replan(plan, client, reads, journal, replay)
            except BaseException:
                journal.close()
                raise
    summary: Summary | None = None
    try:
        journal.append(
            {
                "type": "session",
                "at": iso(utc_now()),
                "pid": os.getpid(),
                "command": "run" if replay.sessions == 0 else "resume",
                "tool_version": __version__,
                "budget": budgets.label,
            },
            sync=True,
        )
        summary = await _run_session(
            plan,
            client,
            tokens,
            journal,
            replay,
            reads,
            total=total,
            stop=stop,
            observer=observer,
            budgets=budgets,
        )
        return summary
    finally:
        end: dict[str, Any] = {"type": "end", "at": iso(utc_now())}
        if summary is not None:
            end |= {
                "exit_code": int(summary.exit_code),
                "reason": summary.reason,
                "counts": summary.as_dict()["counts"],
            }
        with contextlib.suppress(JournalError):
            journal.append(end, sync=True)
        journal.close()


async def _unless_stopped(work: Awaitable[_T], stop: asyncio.Event) -> _T | None:
    """Await ``work``; None (``work`` cancelled) when ``stop`` is set first."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()


def _interrupted_before_sending() -> Summary:
    stopped = Summary(exit_code=ExitCode.INTERRUPTED, reason="interrupted before anything was sent")
    stopped.finished = stopped.started
    return stopped


def _say_if_empty(prepared: targeting.Prepared, request: targeting.Request) -> None:
    """Warn when a file or stdin held no ids at all (a wrong file, a failed export upstream);
    a query that matches nothing is a normal quiet night and only says so at info."""
    seen = prepared.to_offboard + prepared.invalid + prepared.duplicates
    if seen or sum(prepared.skipped.values()):
        return
    if request.kind in ("file", "stdin"):
        where = "stdin" if request.kind == "stdin" else str(request.path)
        log.warning("source.empty", source=where, detail="no machine ids in it: nothing to do")
    else:
        log.info("targets.none", kind=request.kind, detail="nothing matched: nothing to do")


class _Settled(Container[str]):
    """The machines with a result in a replay, as a container (a list of a million ids
    would take about 100 MB)."""

    def __init__(self, replay: Replay) -> None:
        self._replay = replay

    def __contains__(self, machine_id: object) -> bool:
        if not isinstance(machine_id, str):
            return False
        state = self._replay.state(machine_id)
        return state is not None and state.outcome is not None


def _journal_plan(journal: Journal, replay: Replay, prepared: targeting.Prepared) -> None:
    """Write every planning decision, then the ``plan`` record that says they are all there."""
    for record in prepared.decisions:
        replay.apply(record, journal.append(record))
    journal.append({"type": "plan", "at": iso(utc_now()), **prepared.as_json()}, sync=True)
    replay.planned = True


async def _prepare(
    plan: Plan, client: MdeClient, reads: Throttle, targets: Targets, budgets: Budgets
) -> tuple[Plan, targeting.Prepared]:
    """Resolve the source to ids, read what the rules need, and decide for every id."""
    request = targets.request
    rules = targets.rules
    policy = _read_policy(plan)
    header = dict(plan.header or {})
    inventory: dict[str, dict[str, Any]] | None = None
    open_actions: dict[str, Any] = {}
    done_actions: dict[str, Any] = {}
    unresolved: list[dict[str, Any]] = []
    source_path, source_format = plan.source_path, plan.source_format
    if request.kind in ("query", "names", "hunting"):
        ids: list[str]
        if request.kind == "query":
            machines = await targeting.read_machines(client, reads, request.odata, policy=policy)
            if request.group_names:
                wanted = {g.lower() for g in request.group_names}
                machines = [
                    m for m in machines if str(m.get("rbacGroupName") or "").lower() in wanted
                ]
            ids = [str(m["id"]).lower() for m in machines]
            inventory = {str(m["id"]).lower(): m for m in machines}
        elif request.kind == "names":
            assert request.path is not None  # noqa: S101 - names always come from a file
            names = targeting.read_names(request.path)
            machines = await targeting.read_machines(client, reads, None, policy=policy)
            ids, unresolved = targeting.resolve_names(names, machines)
            inventory = {str(m["id"]).lower(): m for m in machines}
        else:
            hunting = await budgets.throttle("hunting", _hunting_limits(plan.limits))
            try:
                ids = await targeting.run_hunting(client, hunting, request.hunting or "", policy)
            finally:
                await hunting.aclose()
        source_path = (
            plan.journal_path.with_name(plan.journal_path.name + ".targets")
            if not targets.dry_run
            else Path(tempfile.mkdtemp(prefix="bulkoffboard-plan-")) / "targets.txt"
        )
        resolved = targeting.write_ids(source_path, ids)
        source_format = "text"
        header["source"] = {
            **dict(request.describe),
            "kind": request.kind,
            "path": str(source_path),
            "format": "text",
            "resolved": resolved,
            "sha256": sha256_file(source_path),
        }
        log.info("targeting.resolved", kind=request.kind, machines=resolved)
    if rules.preflight or rules.needs_metadata:
        if inventory is None:
            inventory, open_actions, done_actions = await targeting.inventory_for(
                client, reads, rules, policy
            )
        elif rules.preflight:
            open_actions, done_actions = await targeting.read_open_offboards(client, reads, policy)
    prepared = targeting.plan_pass(
        iter_records(source_path, source_format),
        rules=rules,
        inventory=inventory,
        open_actions=open_actions,
        done_actions=done_actions,
        keep_rows=targets.dry_run and targets.dry_rows,
    )
    for item in unresolved:
        prepared.decisions.append(
            {
                "type": "result",
                "machine_id": None,
                "outcome": Outcome.UNRESOLVED.value,
                "action_id": None,
                "action_status": None,
                "http_status": None,
                "error_code": None,
                "message": item["message"],
                "where": item["where"],
                "input": item["input"],
                "attempts": 0,
                "at": iso(utc_now()),
                "stage": "plan",
            }
        )
        prepared.skipped[Outcome.UNRESOLVED.value] += 1
        prepared.notes.append(f"{item['where']}: {item['message']}")
    if inventory is None and (rules.preflight or rules.needs_metadata):
        prepared.notes.append("preflight skipped: the device inventory could not be read")
    header["exclusions"] = rules.as_json()
    header["max_machines"] = targets.max_machines
    new_plan_ = Plan(
        **{
            **{name: getattr(plan, name) for name in Plan.__dataclass_fields__},
            "source_path": source_path,
            "source_format": source_format,
            "header": header,
        }
    )
    return new_plan_, prepared


async def _replan(
    plan: Plan, client: MdeClient, reads: Throttle, journal: Journal, replay: Replay
) -> None:
    """The first session died while journaling its plan: decide again for what is unsettled,
    so no excluded machine is offboarded."""
    rules = targeting.Rules.from_json(replay.header.get("exclusions"))
    inventory, open_actions, done_actions = await targeting.inventory_for(
        client, reads, rules, _read_policy(plan)
    )
    settled = _Settled(replay)
    prepared = targeting.plan_pass(
        iter_records(plan.source_path, plan.source_format),
        rules=rules,
        inventory=inventory,
        open_actions=open_actions,
        done_actions=done_actions,
        settled=settled,
    )
    log.warning("plan.redone", decisions=len(prepared.decisions))
    _journal_plan(journal, replay, prepared)


def _read_policy(plan: Plan) -> ReadPolicy:
    tuning = plan.tuning
    return ReadPolicy(
        attempts=2 * int(tuning.get("max_attempts", 6)),
        backoff_base_s=float(tuning.get("backoff_base_s", 1.0)),
        backoff_cap_s=float(tuning.get("backoff_cap_s", 60.0)),
    )


def _breaker(prepared: targeting.Prepared, targets: Targets) -> None:
    """``--max-machines``: refuse a run that would offboard more, unless confirmed."""
    limit = targets.max_machines
    if limit is None or prepared.to_offboard <= limit or targets.assume_yes:
        return
    counts = (
        f"would offboard {prepared.to_offboard} machines, over the limit of {limit} "
        f"(--max-machines)"
    )
    if targets.confirm is not None:
        if targets.confirm(prepared, f"{counts}. Offboard {prepared.to_offboard} machines?"):
            return
        raise UsageError("not confirmed: nothing was sent")
    raise UsageError(f"{counts}: nothing was sent; check the plan with --dry-run, then add --yes")


async def _run_session(  # noqa: PLR0917 - the wiring of one session
    plan: Plan,
    client: MdeClient,
    tokens: TokenProvider,
    journal: Journal,
    replay: Replay,
    reads: Throttle,
    *,
    total: int | None = None,
    stop: asyncio.Event,
    observer: RunObserver | None = None,
    budgets: Budgets,
) -> Summary:
    throttle = await budgets.throttle("offboard", plan.limits, plan.margin_s)
    # The sends of the processes before, each held for as long after it as its call may have
    # arrived (up to now for one that was in flight when its process died).
    sends = replay.recent_send_lags(time.time())
    times = Throttle.wall_to_clock((at for at, _ in sends), throttle.now())
    # Sends made on the shared ledger this session uses are in it already (a killed
    # process's unanswered ones are answered there once it is gone): seeding them again
    # would count them twice.
    in_ledger = throttle.shared is not None and replay.session_budgets <= {budgets.label}
    seeded = throttle.seed(
        list(zip(times, (lag for _, lag in sends), strict=True)), shared=not in_ledger
    )
    for round_trip in replay.recent_round_trips:
        throttle.observe(round_trip)  # the round trips seen before: the ETA's estimate
    if seeded:
        log.info("throttle.seeded", sends=seeded, margin_s=throttle.margin_hint_s())
    runner = Runner(
        client=client,
        tokens=tokens,
        journal=journal,
        replay=replay,
        throttle=throttle,
        read_throttle=reads,
        settings=RunSettings(
            comment=plan.comment, run_id=plan.run_id, workers=plan.workers, **plan.tuning
        ),
        on_result=observer.machine_done if observer is not None else None,
    )
    stopping = asyncio.ensure_future(stop.wait())

    def on_stop(done: asyncio.Future[Any]) -> None:
        if not done.cancelled():
            runner.request_stop()

    stopping.add_done_callback(on_stop)
    marked: MarkSummary | None = None
    try:
        if plan.marks:
            marked = await _unless_stopped(
                _mark(plan, client, journal, replay, budgets, _read_policy(plan)), stop
            )
            if marked is None:
                stopped = Summary(
                    exit_code=ExitCode.INTERRUPTED,
                    reason="interrupted while marking: no offboard was sent",
                )
                stopped.finished = stopped.started
                return stopped
        if observer is not None:
            observer.run_started(total, throttle_eta(throttle))
        summary = await runner.run(iter_records(plan.source_path, plan.source_format))
        if marked is not None:
            summary.marks = marked.as_dict()
            if marked.failed and summary.exit_code == ExitCode.OK:
                summary.exit_code = ExitCode.SOME_FAILED
                summary.reason = f"{marked.failed} machines could not be marked"
        if observer is not None:
            observer.run_stopped()
        if plan.wait_deadline_s is not None and summary.exit_code in (
            ExitCode.OK,
            ExitCode.SOME_FAILED,
        ):
            waited = await verify(
                journal,
                replay_file(plan.journal_path),
                client,
                reads,
                VerifySettings(
                    until_final=True,
                    deadline_s=plan.wait_deadline_s,
                    poll_base_s=plan.wait_poll_s,
                    poll_cap_s=max(plan.wait_poll_s, 900.0),
                ),
                stop=stop,
            )
            summary.waited = waited.as_dict()
            if summary.exit_code == ExitCode.OK and waited.exit_code != 0:
                summary.exit_code = ExitCode(waited.exit_code)
                summary.reason = f"submitted; waiting: {waited.reason}"
        return summary
    finally:
        stopping.cancel()
        if observer is not None:
            observer.run_stopped()
        await throttle.aclose()  # the last answers reach the shared budget


async def _mark(  # noqa: PLR0917 - the wiring of the marking pass
    plan: Plan,
    client: MdeClient,
    journal: Journal,
    replay: Replay,
    budgets: Budgets,
    policy: ReadPolicy,
) -> MarkSummary:
    """``--mark``: tag every machine the session will offboard (the source's valid ids not
    settled by the journal), before the first offboard call; what the journal shows tagged
    already is not tagged again."""
    tags = await budgets.throttle("tags", plan.limits, plan.margin_s)
    marker = Marker(client, journal, replay, tags, policy=policy)
    try:
        for tag in plan.marks:
            seen = Deduplicator()
            wanted = (
                record.machine_id
                for record in iter_records(plan.source_path, plan.source_format)
                if record.machine_id is not None
                and not replay.is_final(record.machine_id)
                and seen.add(record.machine_id)
            )
            tagged = await marker.apply("Add", tag, wanted)
            log.info("run.marked", tag=tag, machines=tagged)
    finally:
        await tags.aclose()
    return marker.summary


def new_plan(
    *,
    journal_path: Path,
    source: dict[str, Any],
    comment: str,
    workers: int,
    limits: tuple[Limit, ...],
    conn: config.Connection,
    margin_s: float | None = None,
    header_extra: Mapping[str, Any] | None = None,
    mark: str | None = None,
    mark_run_id: bool = False,
) -> Plan:
    """A fresh run: a new run id and the journal header that records everything resume needs
    (never a secret); ``header_extra``: more header fields (a tenant's name and run
    directory)."""
    source_path = Path(str(source["path"]))
    run_id = str(uuid.uuid4())
    marks = tags_for(mark, with_run_id=mark_run_id, run_id=run_id)
    header = {
        "format": FORMAT_VERSION,
        "tool": TOOL,
        "tool_version": __version__,
        "run_id": run_id,
        "created_at": iso(utc_now()),
        "source": {
            **source,
            **({"sha256": sha256_file(source_path)} if source_path.is_file() else {}),
        },
        "comment": comment,
        "limits": [[limit.calls, limit.period_s] for limit in limits],
        "workers": workers,
        "api_url": conn.api_url,
        "tenant_id": conn.tenant_id,
        "client_id": conn.client_id,
        **({"margin_s": margin_s} if margin_s is not None else {}),
        **({"mark": list(marks)} if marks else {}),
        **(header_extra or {}),
    }
    return Plan(
        journal_path,
        source_path,
        str(source["format"]),
        comment,
        run_id,
        workers,
        limits,
        header,
        margin_s=margin_s,
        marks=marks,
    )


def check_margin(value: float | None) -> float | None:
    """``--margin``, checked: windows are closed, so it must be above zero."""
    if value is not None and not (0 < value < math.inf):
        raise UsageError(f"--margin must be a number of seconds above 0, not {value}")
    return value


def plan_resume(
    journal_path: Path,
    limit_args: list[str] | None,
    workers_arg: int | None,
    file_cfg: dict[str, Any],
    margin_arg: float | None = None,
) -> Plan:
    """Read what a journal recorded (its header) and check its source is unchanged."""
    header = read_header(journal_path)
    source = header.get("source") or {}
    source_path = Path(str(source.get("path", "")))
    problem = None
    if not source_path.is_file():
        problem = f"the run's source {source_path} is gone; resume needs it unchanged"
    elif source.get("sha256") and sha256_file(source_path) != source["sha256"]:
        problem = (
            f"the run's source {source_path} changed since the run started; start a new run "
            "with a new journal for the new list"
        )
    if problem is not None:
        replay_file(journal_path)  # a damaged journal is the error to report first
        raise UsageError(problem)
    try:
        limits = (
            config.parse_limits(limit_args, {})
            if limit_args
            else tuple(Limit(int(c), float(p)) for c, p in header.get("limits") or [])
            or config.parse_limits(None, file_cfg)
        )
        workers = check_workers(workers_arg, {"workers": int(header.get("workers", 8))})
        recorded = header.get("margin_s")
        margin_s = check_margin(margin_arg if margin_arg is not None else _float_or_none(recorded))
    except (TypeError, ValueError):
        raise JournalError(
            f"{journal_path}: the header's limits or workers are damaged "
            f"({header.get('limits')!r}, {header.get('workers')!r})"
        ) from None
    return Plan(
        journal_path=journal_path,
        source_path=source_path,
        source_format=str(source.get("format", "auto")),
        comment=str(header.get("comment") or config.DEFAULT_COMMENT),
        run_id=str(header.get("run_id")),
        workers=workers,
        limits=limits,
        header=None,
        margin_s=margin_s,
        marks=marks_of(header),
    )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


#: Roles worth having, with what they are for (mde-api.md sections 2 to 5).
_RECOMMENDED_ROLES = {
    ("Machine.Read.All", "Machine.ReadWrite.All"): "checking for an existing action before "
    "re-sending after a crash, verify, and --query/--names targeting",
    ("AdvancedQuery.Read.All",): "--hunting queries",
}

_GRANT_HINT = (
    "grant it in Entra ID > App registrations > API permissions > APIs my organization uses > "
    "WindowsDefenderATP > Application permissions, then 'Grant admin consent'"
)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What :func:`check` found, a line a finding: ``(mark, text)`` with mark ``ok``,
    ``warn``, ``missing``, ``fail`` or ``info``."""

    findings: tuple[tuple[str, str], ...]
    #: A token was acquired, Machine.Offboard is granted and the API answered.
    ready: bool

    @property
    def exit_code(self) -> ExitCode:
        """0 when ready, 3 otherwise (as ``bulkoffboard check``)."""
        return ExitCode.OK if self.ready else ExitCode.AUTH


async def check(conn: config.Connection) -> CheckResult:
    """Acquire a token, read its roles, make one cheap read (``GET /api/machines?$top=1``).
    Messages are redacted (:func:`bulkoffboard.logs.redact_text`) by the face that shows them."""
    found: list[tuple[str, str]] = [
        (
            "info",
            f"cloud {conn.cloud}: API {conn.api_url}, token host {conn.authority_host}, "
            f"scope {conn.scope}",
        ),
        (
            "info",
            f"credential: {conn.credential_kind.replace('_', ' ')}, tenant {conn.tenant_id}, "
            f"client {conn.client_id or '(system-assigned)'}",
        ),
    ]
    tokens = make_tokens(conn)
    try:
        try:
            token = await tokens.token()
        except AuthError as exc:
            found.append(("fail", f"token: {exc}"))
            return CheckResult(tuple(found), ready=False)
        found.append(("ok", "token acquired"))
        roles = set(token_roles(token))
        ready = "Machine.Offboard" in roles
        if ready:
            found.append(("ok", "Machine.Offboard granted"))
        else:
            found.append(("missing", f"Machine.Offboard (required to offboard): {_GRANT_HINT}"))
        if can_mark(token):
            found.append(("ok", "marking possible (--mark): Machine.ReadWrite.All granted"))
        else:
            found.append(
                (
                    "warn",
                    "marking not possible (--mark needs Machine.ReadWrite.All): " + _GRANT_HINT,
                )
            )
        for names, purpose in _RECOMMENDED_ROLES.items():
            if roles.intersection(names):
                found.append(("ok", f"{' or '.join(names)} granted"))
            else:
                found.append(
                    ("warn", f"{names[0]} not granted (needed for {purpose}): {_GRANT_HINT}")
                )
        timeout = aiohttp.ClientTimeout(total=60, connect=15)
        session, tls = http_session(conn, timeout)
        async with session:
            client = MdeClient(session, conn.api_url, tokens, ssl_context=tls)
            try:
                await client.list_machines(top=1)
                found.append(("ok", f"API reachable: GET {conn.api_url}/api/machines?$top=1"))
            except ForbiddenError:
                found.append(("ok", "API reachable (reading machines is forbidden: see above)"))
            except (ApiError, UsageError) as exc:
                found.append(("fail", f"API call: {exc}"))
                ready = False
        return CheckResult(tuple(found), ready=ready)
    finally:
        tokens.close()


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """What ``bulkoffboard cancel`` was asked: the operator's comment, which machines, how
    carefully (as :class:`Targets` for a run)."""

    comment: str = config.DEFAULT_COMMENT
    #: Only these machines (``--ids``); None: every machine of the run.
    only: frozenset[str] | None = None
    dry_run: bool = False
    max_machines: int | None = None
    assume_yes: bool = False
    #: Asked when more than ``max_machines`` would be cancelled and ``assume_yes`` is off.
    confirm: Callable[[int, str], bool] | None = None
    workers: int = 8
    #: Extra CancelSettings fields (backoff...), for tests.
    tuning: Mapping[str, Any] = field(default_factory=dict)


async def cancel_journal(
    journal_path: Path,
    conn: config.Connection,
    limits: tuple[Limit, ...],
    request: CancelRequest,
    *,
    margin_s: float | None = None,
    stop: asyncio.Event | None = None,
    budget: str | None = None,
) -> CancelSummary:
    """Cancel the run's offboard actions not final yet (``bulkoffboard cancel``): lock the
    journal (a dry run only reads it), check it belongs to the connection's tenant, journal a
    session, check and cancel under ``limits`` (the cancel endpoint's, and the same for the
    reads and the tag calls that take the run's marks off), journal the end."""
    stop = stop or asyncio.Event()
    tokens = make_tokens(conn)
    journal: Journal | None = None
    budgets = Budgets(budget, conn)
    throttles: list[Throttle] = []
    try:
        await tokens.token()
        if request.dry_run:
            replay = replay_file(journal_path)
        else:
            journal, replay = Journal.resume(journal_path)
        _check_tenant(replay, conn, journal_path)
        plan = plan_cancel(replay, request.only)
        _cancel_breaker(len(plan.targets), request)
        if journal is not None:
            journal.append(
                {
                    "type": "session",
                    "at": iso(utc_now()),
                    "pid": os.getpid(),
                    "command": "cancel",
                    "tool_version": __version__,
                    "budget": budgets.label,
                },
                sync=True,
            )
        for kind in ("cancel", "reads", "tags"):
            throttles.append(await budgets.throttle(kind, limits, margin_s))
        cancels, reads, tags = throttles
        timeout = aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S, connect=15, sock_read=60)
        session, tls = http_session(conn, timeout)
        async with session:
            client = MdeClient(session, conn.api_url, tokens, ssl_context=tls)
            canceller = Canceller(
                client=client,
                journal=journal,
                replay=replay,
                throttle=cancels,
                reads=reads,
                tags=tags,
                settings=CancelSettings(
                    comment=request.comment,
                    run_id=replay.run_id,
                    workers=request.workers,
                    only=request.only,
                    dry_run=request.dry_run,
                    marks=marks_of(replay.header),
                    **request.tuning,
                ),
                stop=stop,
            )
            summary = await canceller.run(plan)
        if journal is not None:
            journal.append(
                {
                    "type": "end",
                    "at": iso(utc_now()),
                    "exit_code": int(summary.exit_code),
                    "reason": summary.reason,
                    "cancels": dict(summary.journal_counts),
                },
                sync=True,
            )
        return summary
    finally:
        for throttle in throttles:
            await throttle.aclose()
        if journal is not None:
            journal.close()
        tokens.close()


def _check_tenant(replay: Replay, conn: config.Connection, journal_path: Path) -> None:
    tenant = replay.header.get("tenant_id")
    if tenant and conn.credential_kind != "managed_identity" and tenant != conn.tenant_id:
        raise UsageError(
            f"journal {journal_path} belongs to tenant {tenant}, not {conn.tenant_id}: "
            "its actions would all look missing"
        )


def _cancel_breaker(count: int, request: CancelRequest) -> None:
    """``--max-machines`` for a cancel: refuse to look at more, unless confirmed."""
    limit = request.max_machines
    if limit is None or count <= limit or request.assume_yes or request.dry_run:
        return
    text = f"would cancel up to {count} offboards, over the limit of {limit} (--max-machines)"
    if request.confirm is not None:
        if request.confirm(count, f"{text}. Cancel them?"):
            return
        raise UsageError("not confirmed: nothing was sent")
    raise UsageError(f"{text}: nothing was sent; check with --dry-run, then add --yes")


async def verify_journal(
    journal_path: Path,
    conn: config.Connection,
    limits: tuple[Limit, ...],
    settings: VerifySettings,
    *,
    stop: asyncio.Event | None = None,
    budget: str | None = None,
) -> VerifySummary:
    """Follow the offboard actions of a journal (``bulkoffboard verify``): lock it, check it
    belongs to the connection's tenant, journal a session, verify under the read ``limits``,
    journal the end. ``stop`` set: end after the call in flight (exit 130)."""
    tokens = make_tokens(conn)
    try:
        await tokens.token()
        journal, replay = Journal.resume(journal_path)
        try:
            _check_tenant(replay, conn, journal_path)
            journal.append(
                {
                    "type": "session",
                    "at": iso(utc_now()),
                    "pid": os.getpid(),
                    "command": "verify",
                    "tool_version": __version__,
                },
                sync=True,
            )
            timeout = aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S, connect=15, sock_read=60)
            reads = await Budgets(budget, conn).throttle("reads", limits)
            session, tls = http_session(conn, timeout)
            async with session:
                client = MdeClient(session, conn.api_url, tokens, ssl_context=tls)
                try:
                    summary = await verify(
                        journal,
                        replay,
                        client,
                        reads,
                        settings,
                        stop=stop or asyncio.Event(),
                    )
                finally:
                    await reads.aclose()
            journal.append(
                {
                    "type": "end",
                    "at": iso(utc_now()),
                    "exit_code": summary.exit_code,
                    "reason": summary.reason,
                    "action_statuses": summary.as_dict().get("action_statuses", {}),
                },
                sync=True,
            )
            return summary
        finally:
            journal.close()
    finally:
        tokens.close()
