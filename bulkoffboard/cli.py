"""The command line: argument parsing, wiring, logging set-up and exit codes. No business logic.

Exit codes (a contract): 0 every machine reached a final outcome and none failed; 1 some failed
(``resume`` retries them); 2 usage or configuration error, nothing sent; 3 authentication or
permission failure; 130 interrupted (the journal is consistent and ``resume`` continues);
141 (128 + SIGPIPE) the reader of standard output went away (``report ... | head``), except for a
``run``, ``resume`` or ``verify`` whose work was done: those keep their own code.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import math
import os
import signal
import ssl
import stat
import sys
import tempfile
import time
import uuid
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import structlog

from bulkoffboard import __version__, config, logs, report, targeting
from bulkoffboard.auth import (
    ManagedIdentityTokenProvider,
    MsalTokenProvider,
    TokenProvider,
    token_roles,
)
from bulkoffboard.client import MdeClient
from bulkoffboard.errors import (
    ApiError,
    AuthError,
    BulkOffboardError,
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
from bulkoffboard.models import Outcome, normalize_machine_id
from bulkoffboard.progress import Progress, throttle_eta
from bulkoffboard.reads import ReadPolicy
from bulkoffboard.runner import ExitCode, Runner, RunSettings, Summary
from bulkoffboard.sources import FORMATS, detect_format, iter_records, spool_stdin
from bulkoffboard.throttle import ANSWER_TIMEOUT_S, Limit, Throttle
from bulkoffboard.verify import READ_LIMITS, VerifySettings, VerifySummary, verify

log = structlog.get_logger("bulkoffboard.cli")


# -- parser ----------------------------------------------------------------------------------------


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="log format on stderr (default: console on a terminal, JSON otherwise)",
    )
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="warning"
    )


def _add_connection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "connection (over the environment and the config file; secrets only from those)"
    )
    group.add_argument(
        "--config", metavar="PATH", help="a TOML config file (or BULKOFFBOARD_CONFIG)"
    )
    group.add_argument(
        "--cloud",
        choices=tuple(config.CLOUDS),
        help="picks the API host, token host and scope together (default commercial)",
    )
    group.add_argument(
        "--region", choices=config.REGIONS, help="a regional API host in the commercial cloud"
    )
    group.add_argument(
        "--credential",
        choices=("secret", "certificate", "managed-identity"),
        help="how to authenticate (default: a secret if one is set, else a certificate)",
    )
    group.add_argument("--tenant-id", help="overrides AZURE_TENANT_ID")
    group.add_argument("--client-id", help="overrides AZURE_CLIENT_ID")
    group.add_argument("--api-url", help="overrides the preset API host (BULKOFFBOARD_API_URL)")
    group.add_argument(
        "--authority-host", help="overrides the preset token host (AZURE_AUTHORITY_HOST)"
    )


def _connection(args: argparse.Namespace, file_cfg: dict[str, Any]) -> config.Connection:
    cli = {
        name: getattr(args, name, None)
        for name in (
            "cloud",
            "region",
            "credential",
            "tenant_id",
            "client_id",
            "api_url",
            "authority_host",
        )
    }
    return config.connection(os.environ, file_cfg, cli)


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


def _add_summary_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--summary-json",
        metavar="PATH",
        help="write a machine-readable summary (counts, duration, calls, 429s, exit code) here",
    )


def _write_summary(args: argparse.Namespace, data: dict[str, Any], journal: Path | None) -> None:
    path = getattr(args, "summary_json", None)
    if not path:
        return
    try:
        report.summary_json(data, Path(path).expanduser(), command=args.command, journal=journal)
    except OSError as exc:
        log.warning("summary_json.failed", path=path, error=exc.strerror)


def _add_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit",
        action="append",
        metavar="CALLS/SECONDS",
        help="an offboard rate limit; repeatable; replaces the default pair 100/60 and "
        "1500/3600 (e.g. --limit 100/0.6 --limit 1500/36 against a time-scaled emulator)",
    )


def _add_margin(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--margin",
        type=float,
        metavar="SECONDS",
        help="the least each window is widened by for network jitter (default: 1%% of the "
        "window, at most 1 s; the measured round trips widen it further); scale it with "
        "--limit against a time-scaled emulator",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``bulkoffboard`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="bulkoffboard",
        description="Offboard devices from Microsoft Defender for Endpoint in bulk: throttled "
        "under the API's limits, journaled, resumable without offboarding twice.",
        epilog="Exit codes: 0 done, 1 some failed (resume retries), 2 usage/configuration, "
        "3 authentication/permission, 130 interrupted (resume continues), 141 stdout's reader "
        "went away.",
    )
    parser.add_argument("--version", action="version", version=f"bulkoffboard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="offboard machines from a file, stdin, an OData query, host names or a hunting query",
    )
    source = run.add_argument_group("what to offboard (one source; presets combine with --query)")
    source.add_argument(
        "--ids", metavar="PATH", help="machine ids: text, CSV, JSON or JSONL; - for stdin"
    )
    source.add_argument(
        "--ids-format", choices=("auto", *FORMATS), default="auto", help="the --ids format"
    )
    source.add_argument("--query", metavar="ODATA", help="an OData $filter over GET /api/machines")
    source.add_argument(
        "--inactive-days", type=float, metavar="N", help="machines whose lastSeen is older"
    )
    source.add_argument(
        "--health",
        action="append",
        default=[],
        metavar="STATUS",
        help="healthStatus, e.g. Inactive (repeatable: any of them)",
    )
    source.add_argument(
        "--os",
        action="append",
        default=[],
        metavar="PLATFORM",
        help="osPlatform, e.g. Windows10 (repeatable: any of them)",
    )
    source.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="TAG",
        help="machines carrying this tag (repeatable: all of them)",
    )
    source.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="GROUP",
        help="device group id or name (repeatable: any of them)",
    )
    source.add_argument(
        "--names", metavar="PATH", help="host names (short or FQDN), one a line or a CSV column"
    )
    source.add_argument(
        "--hunting",
        metavar="KQL",
        help="an advanced hunting query, or @file.kql; its DeviceId column",
    )
    safety = run.add_argument_group("safety")
    safety.add_argument(
        "--exclude-tag", action="append", default=[], metavar="TAG", help="never offboard these"
    )
    safety.add_argument("--exclude-group", action="append", default=[], metavar="GROUP")
    safety.add_argument("--exclude-id", action="append", default=[], metavar="ID")
    safety.add_argument(
        "--exclude-name",
        action="append",
        default=[],
        metavar="PATTERN",
        help="a host name pattern (fnmatch, case-insensitive, short name or FQDN)",
    )
    safety.add_argument(
        "--no-preflight",
        action="store_true",
        help="do not skip unsupported/pending/offboarded devices from the inventory",
    )
    safety.add_argument(
        "--dry-run",
        action="store_true",
        help="resolve, apply preflight and exclusions, print the plan; send nothing",
    )
    safety.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="the dry run's output: counts (table) or the full list",
    )
    safety.add_argument(
        "--max-machines",
        type=int,
        metavar="N",
        help="refuse to offboard more than N machines without --yes",
    )
    safety.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    run.add_argument("--journal", metavar="PATH", help="the JSONL journal to create")
    run.add_argument(
        "--wait",
        action="store_true",
        help="after submitting, follow the actions until final (as 'verify --until-final')",
    )
    run.add_argument(
        "--wait-deadline",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="how long --wait follows the actions (default 3600)",
    )
    run.add_argument(
        "--poll-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="--wait's first poll delay; it backs off from there (default 60)",
    )
    _add_summary_json(run)
    run.add_argument("--comment", help="the offboard comment (the run id is appended)")
    run.add_argument("--workers", type=int, metavar="N", help="concurrent workers (default 8)")
    _add_limits(run)
    _add_margin(run)
    _add_connection(run)
    _add_common(run)
    run.set_defaults(func=cmd_run)

    resume = commands.add_parser("resume", help="continue an interrupted run from its journal")
    resume.add_argument("--journal", required=True, metavar="PATH")
    resume.add_argument("--workers", type=int, metavar="N", help="override the run's workers")
    _add_summary_json(resume)
    _add_limits(resume)
    _add_margin(resume)
    _add_connection(resume)
    _add_common(resume)
    resume.set_defaults(func=cmd_resume)

    ver = commands.add_parser(
        "verify",
        help="follow the offboard actions of a journal and journal their status",
        description="Look up the machine action of every offboarded / already_pending machine "
        "whose action is not final yet (batched GET /api/machineactions calls under that "
        "endpoint's own limits) and append 'status' records. Resumable; safe to run every "
        "night on the same journal.",
    )
    ver.add_argument("--journal", required=True, metavar="PATH")
    ver.add_argument(
        "--until-final",
        action="store_true",
        help="keep polling with backoff until every action is final or the deadline passes",
    )
    ver.add_argument("--max-age", type=float, metavar="DAYS", help="skip actions older than this")
    ver.add_argument(
        "--deadline",
        type=float,
        default=6 * 3600.0,
        metavar="SECONDS",
        help="with --until-final, give up after this long (default 6 h)",
    )
    ver.add_argument(
        "--poll-interval",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --until-final, the first poll delay; it backs off from there (default 60)",
    )
    _add_limits(ver)
    _add_summary_json(ver)
    _add_connection(ver)
    _add_common(ver)
    ver.set_defaults(func=cmd_verify)

    check = commands.add_parser(
        "check",
        help="preflight: configuration, token, permissions and one cheap read call",
        description="Load the configuration, acquire a token, decode its roles claim and report "
        "whether Machine.Offboard (and the read permissions other features need) are granted, "
        "then make one cheap read call. Exit 0 when ready, 3 otherwise.",
    )
    _add_connection(check)
    _add_common(check)
    check.set_defaults(func=cmd_check)

    rep = commands.add_parser("report", help="summarise a journal")
    rep.add_argument("--journal", required=True, metavar="PATH")
    rep.add_argument("--format", choices=sorted(report.RENDERERS), default="table")
    _add_common(rep)
    rep.set_defaults(func=cmd_report)

    from bulkoffboard import demo  # noqa: PLC0415 - keeps the emulator out of plain runs

    demo.add_commands(commands, _add_common)
    return parser


# -- shared wiring ---------------------------------------------------------------------------------


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
    log_format: str = "auto"
    log_level: str = "warning"
    #: ``--margin``: each window's jitter margin floor (None: the limit's default).
    margin_s: float | None = None


def _file_config(path_arg: str | None) -> dict[str, Any]:
    path = path_arg or os.environ.get("BULKOFFBOARD_CONFIG")
    return config.load_file(Path(path)) if path else {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror}") from None
    return digest.hexdigest()


def _ssl_for(conn: config.Connection) -> ssl.SSLContext | bool:
    if conn.api_url.startswith("http://"):
        return False
    if conn.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(conn.ca_bundle))
    return True


def _workers(value: int | None, file_cfg: dict[str, Any], default: int = 8) -> int:
    workers = value if value is not None else int(file_cfg.get("workers", default))
    if not 1 <= workers <= 256:
        raise UsageError(f"--workers must be 1 to 256, not {workers}")
    return workers


def _print_summary(summary: Summary, journal_path: Path, run_id: str) -> None:
    data = summary.as_dict()
    out = sys.stdout
    out.write(
        f"run {run_id}: {data['reason']} (exit {data['exit_code']}) in {data['duration_s']:.1f} s\n"
    )
    for outcome, number in data["counts"].items():
        if number:
            out.write(f"  {outcome:<16}{number:>8}\n")
    out.write(f"  {'total':<16}{data['total']:>8}\n")
    out.write(
        f"offboard calls {data['offboard_calls']}, 429s {data['throttled_429']}, "
        f"reconciled {data['reconciled']}\njournal {journal_path}\n"
    )
    if summary.exit_code in (ExitCode.SOME_FAILED, ExitCode.INTERRUPTED):
        out.write(f"continue with: bulkoffboard resume --journal {journal_path}\n")
    out.flush()


@dataclass(frozen=True, slots=True)
class Targets:
    """What a new run targets and how carefully: the source request, the rules, the breaker."""

    request: targeting.Request
    rules: targeting.Rules = field(default_factory=targeting.Rules)
    max_machines: int | None = None
    assume_yes: bool = False
    dry_run: bool = False
    dry_format: str = "table"
    interactive: bool = False


def _hunting_limits(limits: tuple[Limit, ...]) -> tuple[Limit, ...]:
    """Advanced hunting allows 45 calls a minute and 1,500 an hour (mde-api.md section 5):
    the same windows as the offboard limits given, with 45 in the shortest."""
    if not limits:
        return limits
    shortest = min(limits, key=lambda x: x.period_s)
    return tuple(Limit(min(45, x.calls), x.period_s) if x is shortest else x for x in limits)


async def execute(plan: Plan, conn: config.Connection, targets: Targets | None = None) -> Summary:
    """Acquire a token, plan (new runs), open the journal, run, close.

    A new run fails authentication before its journal is created; planning (source
    resolution, exclusions, preflight, the breaker) happens before the first offboard call.
    A resume locks, mends and replays its journal first (once: :func:`plan_resume` read only
    its header), so a damaged or busy journal is reported before any token is asked for.
    """
    tokens = make_tokens(conn)
    opened: tuple[Journal, Replay] | None = None
    try:
        if plan.header is None:
            opened = Journal.resume(plan.journal_path)
        await tokens.token()
        connector = aiohttp.TCPConnector(limit=plan.workers + 4)
        timeout = aiohttp.ClientTimeout(total=ANSWER_TIMEOUT_S, connect=15, sock_read=60)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, trust_env=True
        ) as session:
            client = MdeClient(session, conn.api_url, tokens, ssl_context=_ssl_for(conn))
            reads = Throttle(plan.limits, name="reads")
            handed, opened = opened, None  # _with_client closes it from here on
            return await _with_client(plan, client, tokens, reads, targets, opened=handed)
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
) -> Summary:
    replay: Replay
    total: int | None = None
    if plan.header is not None:
        targets = targets or Targets(
            targeting.Request("file", plan.source_path, plan.source_format)
        )
        plan, prepared = await _prepare(plan, client, reads, targets)
        if targets.dry_run:
            _print_plan(prepared, targets.dry_format)
            dry = Summary(reason="dry run: nothing sent")
            dry.finished = dry.started
            return dry
        _breaker(prepared, targets)
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
            },
            sync=True,
        )
        summary = await _run_session(plan, client, tokens, journal, replay, reads, total=total)
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
    plan: Plan, client: MdeClient, reads: Throttle, targets: Targets
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
            hunting = Throttle(_hunting_limits(plan.limits), name="hunting")
            ids = await targeting.run_hunting(client, hunting, request.hunting or "", policy)
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
            "sha256": _sha256(source_path),
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
        keep_rows=targets.dry_run and targets.dry_format != "table",
    )
    for item in unresolved:
        prepared.decisions.append(
            {
                "type": "result",
                "machine_id": None,
                "outcome": Outcome.UNRESOLVED.value,
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
    if targets.interactive:
        _print_plan(prepared, "table")
        try:
            answer = input(f"{counts}. Offboard {prepared.to_offboard} machines? [y/N] ")
        except EOFError:  # Ctrl-D: no answer is a no
            answer = ""
        if answer.strip().lower() in ("y", "yes"):
            return
        raise UsageError("not confirmed: nothing was sent")
    raise UsageError(f"{counts}: nothing was sent; check the plan with --dry-run, then add --yes")


def _print_plan(prepared: targeting.Prepared, fmt: str) -> None:
    out = sys.stdout
    if fmt == "json":
        data = {**prepared.as_json(), "machines": prepared.rows}
        out.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if fmt == "csv":
        columns = ("machine_id", "action", "outcome", "reason", "name", "os")
        report.write_csv(out, columns, prepared.rows)
        return
    out.write("plan (nothing has been sent):\n")
    out.write(f"  {'would offboard':<22}{prepared.to_offboard:>8}\n")
    for outcome, number in sorted(prepared.skipped.items()):
        out.write(f"  {'skip: ' + outcome:<22}{number:>8}\n")
    if prepared.invalid:
        out.write(f"  {'skip: invalid_id':<22}{prepared.invalid:>8}\n")
    if prepared.duplicates:
        out.write(f"  {'duplicates dropped':<22}{prepared.duplicates:>8}\n")
    reasons = collections.Counter(
        str(d.get("rule") or d.get("message")) for d in prepared.decisions
    )
    if reasons:
        out.write("why skipped:\n")
        for reason, number in reasons.most_common(15):
            out.write(f"  {number:>6}  {reason}\n")
    for note in prepared.notes[:20]:
        out.write(f"note: {note}\n")
    out.flush()


async def _run_session(  # noqa: PLR0917 - the wiring of one session
    plan: Plan,
    client: MdeClient,
    tokens: TokenProvider,
    journal: Journal,
    replay: Replay,
    reads: Throttle,
    *,
    total: int | None = None,
) -> Summary:
    throttle = Throttle(plan.limits, name="offboard", margin_s=plan.margin_s)
    # The sends of the processes before, each held for as long after it as its call may have
    # arrived (up to now for one that was in flight when its process died).
    sends = replay.recent_send_lags(time.time())
    times = Throttle.wall_to_clock((at for at, _ in sends), throttle.now())
    seeded = throttle.seed(list(zip(times, (lag for _, lag in sends), strict=True)))
    for round_trip in replay.recent_round_trips:
        throttle.observe(round_trip)  # the round trips seen before: the ETA's estimate
    if seeded:
        log.info("throttle.seeded", sends=seeded, margin_s=throttle.margin_hint_s())
    # Progress is news, not a warning: at info, so a scheduler's log (and its alerting on
    # warnings) sees it only when asked for with --log-level info.
    progress = Progress(log_format=plan.log_format, eta=throttle_eta(throttle))
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
        on_result=progress.on_result,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            runner.request_stop()
            stop.set()
        elif main_task is not None:
            main_task.cancel()  # a second signal: stop waiting for in-flight calls

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
    progress.start(total)
    if progress.mode == "rich":
        logs.configure("console", plan.log_level, stream=progress.log_stream())
    try:
        summary = await runner.run(iter_records(plan.source_path, plan.source_format))
        progress.stop()
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
        progress.stop()
        if progress.mode == "rich":
            logs.configure(plan.log_format, plan.log_level)
        for sig in installed:
            loop.remove_signal_handler(sig)


# -- commands --------------------------------------------------------------------------------------


def _request(args: argparse.Namespace, journal_path: Path | None) -> targeting.Request:
    """The one source a run reads, checked before anything is sent."""
    presets = bool(
        args.inactive_days is not None or args.health or args.os or args.tag or args.group
    )
    chosen = [
        name
        for name, given in (
            ("--ids", args.ids is not None),
            ("--query/presets", args.query is not None or presets),
            ("--names", args.names is not None),
            ("--hunting", args.hunting is not None),
        )
        if given
    ]
    if len(chosen) != 1:
        raise UsageError(
            "give exactly one source: --ids, --query (or presets such as --inactive-days), "
            f"--names or --hunting (got {', '.join(chosen) or 'none'})"
        )
    if args.ids is not None:
        if args.ids == "-":
            if journal_path is None:
                raise UsageError("--ids - needs --journal (standard input is kept beside it)")
            path = journal_path.with_name(journal_path.name + ".stdin")
            spool_stdin(path, sys.stdin.buffer)
            kind = "stdin"
        else:
            path = Path(args.ids).expanduser().absolute()
            kind = "file"
        fmt = detect_format(path, None if args.ids_format == "auto" else args.ids_format)
        iter_records(path, fmt)  # checks the file now: missing, unreadable, binary
        return targeting.Request(kind, path, fmt, describe={"path": str(path), "format": fmt})
    if args.names is not None:
        path = Path(args.names).expanduser().absolute()
        targeting.read_names(path)  # checks the file now
        return targeting.Request("names", path, describe={"names": str(path)})
    if args.hunting is not None:
        text = args.hunting
        if text.startswith("@"):
            kql_path = Path(text[1:]).expanduser()
            try:
                text = kql_path.read_text(encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"--hunting {kql_path}: {exc.strerror}") from None
        if not text.strip():
            raise UsageError("--hunting: the query is empty")
        return targeting.Request("hunting", hunting=text, describe={"hunting": text})
    if args.inactive_days is not None and args.inactive_days < 0:
        raise UsageError(f"--inactive-days must not be negative, not {args.inactive_days}")
    group_ids = [int(g) for g in args.group if str(g).isdigit()]
    group_names = tuple(g for g in args.group if not str(g).isdigit())
    odata = targeting.build_filter(
        query=args.query,
        inactive_days=args.inactive_days,
        health=args.health,
        os_platforms=args.os,
        tags=args.tag,
        group_ids=group_ids,
    )
    describe = {
        "filter": odata,
        "presets": {
            "query": args.query,
            "inactive_days": args.inactive_days,
            "health": args.health,
            "os": args.os,
            "tag": args.tag,
            "group": args.group,
        },
    }
    return targeting.Request("query", odata=odata, group_names=group_names, describe=describe)


def _rules(args: argparse.Namespace, file_cfg: dict[str, Any]) -> targeting.Rules:
    """Exclusions from the config file and the command line (both apply)."""
    ids: set[str] = set()
    for value in [*file_cfg.get("exclude_ids", []), *args.exclude_id]:
        machine_id = normalize_machine_id(str(value))
        if machine_id is None:
            raise UsageError(f"exclusion id {value!r} is not a 40-hex machine id")
        ids.add(machine_id)
    return targeting.Rules(
        tags=tuple(str(v) for v in [*file_cfg.get("exclude_tags", []), *args.exclude_tag]),
        groups=tuple(str(v) for v in [*file_cfg.get("exclude_groups", []), *args.exclude_group]),
        ids=frozenset(ids),
        names=tuple(str(v) for v in [*file_cfg.get("exclude_names", []), *args.exclude_name]),
        preflight=not args.no_preflight,
    )


def _journal_path(args: argparse.Namespace, file_cfg: dict[str, Any]) -> Path | None:
    if args.journal:
        path = Path(args.journal).expanduser().absolute()
    elif file_cfg.get("journal_dir") and not args.dry_run:
        stamp = utc_now().strftime("%Y%m%d-%H%M%S")
        path = Path(file_cfg["journal_dir"]).expanduser().absolute() / f"bulkoffboard-{stamp}.jsonl"
    elif args.dry_run:
        return None
    else:
        raise UsageError("--journal is required (or set journal_dir in the config file)")
    if path.exists() and path.stat().st_size > 0:
        raise UsageError(
            f"journal {path} already exists; use 'bulkoffboard resume --journal {path}' to "
            "continue it, or choose a new path"
        )
    if not path.parent.is_dir():
        raise UsageError(f"the journal's folder {path.parent} does not exist")
    return path


def cmd_run(args: argparse.Namespace) -> int:
    """``bulkoffboard run``."""
    file_cfg = _file_config(args.config)
    conn = _connection(args, file_cfg)
    limits = config.parse_limits(args.limit, file_cfg)
    margin_s = _margin(args.margin)
    workers = _workers(args.workers, file_cfg)
    comment = (args.comment or file_cfg.get("comment") or config.DEFAULT_COMMENT).strip()
    if not comment:
        raise UsageError("--comment must not be empty")
    max_machines = (
        args.max_machines if args.max_machines is not None else file_cfg.get("max_machines")
    )
    if max_machines is not None and max_machines < 0:
        raise UsageError(f"--max-machines must not be negative, not {max_machines}")
    journal_path = _journal_path(args, file_cfg)
    request = _request(args, journal_path)
    rules = _rules(args, file_cfg)
    journal_or_temp = journal_path or Path(tempfile.gettempdir()) / "bulkoffboard-dry-run.jsonl"
    plan = new_plan(
        journal_path=journal_or_temp,
        source={
            "kind": request.kind,
            "path": str(
                request.path or journal_or_temp.with_name(journal_or_temp.name + ".targets")
            ),
            "format": request.fmt if request.kind in ("file", "stdin") else "text",
            **dict(request.describe),
        },
        comment=comment,
        workers=workers,
        limits=limits,
        conn=conn,
        margin_s=margin_s,
    )
    targets = Targets(
        request=request,
        rules=rules,
        max_machines=max_machines,
        assume_yes=args.yes,
        dry_run=args.dry_run,
        dry_format=args.format,
        interactive=sys.stdin.isatty() and sys.stdout.isatty(),
    )
    plan = Plan(
        **{
            **{name: getattr(plan, name) for name in Plan.__dataclass_fields__},
            "wait_deadline_s": args.wait_deadline if args.wait else None,
            "wait_poll_s": args.poll_interval,
            "log_format": args.log_format,
            "log_level": args.log_level,
        }
    )
    summary = asyncio.run(execute(plan, conn, targets))
    if args.dry_run:
        return int(ExitCode.OK)
    code = _work_done(args, int(summary.exit_code))
    _write_summary(args, summary.as_dict(), journal_or_temp)
    _print_summary(summary, journal_or_temp, plan.run_id)
    return code


def new_plan(
    *,
    journal_path: Path,
    source: dict[str, Any],
    comment: str,
    workers: int,
    limits: tuple[Limit, ...],
    conn: config.Connection,
    margin_s: float | None = None,
) -> Plan:
    """A fresh run: a new run id and the journal header that records everything resume needs
    (never a secret)."""
    source_path = Path(str(source["path"]))
    run_id = str(uuid.uuid4())
    header = {
        "format": FORMAT_VERSION,
        "tool": TOOL,
        "tool_version": __version__,
        "run_id": run_id,
        "created_at": iso(utc_now()),
        "source": {**source, **({"sha256": _sha256(source_path)} if source_path.is_file() else {})},
        "comment": comment,
        "limits": [[limit.calls, limit.period_s] for limit in limits],
        "workers": workers,
        "api_url": conn.api_url,
        "tenant_id": conn.tenant_id,
        "client_id": conn.client_id,
        **({"margin_s": margin_s} if margin_s is not None else {}),
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
    )


def _margin(value: float | None) -> float | None:
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
    elif source.get("sha256") and _sha256(source_path) != source["sha256"]:
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
        workers = _workers(workers_arg, {"workers": int(header.get("workers", 8))})
        recorded = header.get("margin_s")
        margin_s = _margin(margin_arg if margin_arg is not None else _float_or_none(recorded))
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
    )


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def cmd_resume(args: argparse.Namespace) -> int:
    """``bulkoffboard resume``."""
    file_cfg = _file_config(args.config)
    conn = _connection(args, file_cfg)
    journal_path = Path(args.journal).expanduser().absolute()
    plan = plan_resume(journal_path, args.limit, args.workers, file_cfg, args.margin)
    plan = Plan(
        **{
            **{name: getattr(plan, name) for name in Plan.__dataclass_fields__},
            "log_format": args.log_format,
            "log_level": args.log_level,
        }
    )
    summary = asyncio.run(execute(plan, conn))
    code = _work_done(args, int(summary.exit_code))
    _write_summary(args, summary.as_dict(), journal_path)
    _print_summary(summary, journal_path, plan.run_id)
    return code


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


async def _check(conn: config.Connection) -> int:
    out = sys.stdout
    out.write(
        f"cloud {conn.cloud}: API {conn.api_url}, token host {conn.authority_host}, "
        f"scope {conn.scope}\n"
        f"credential: {conn.credential_kind.replace('_', ' ')}, tenant {conn.tenant_id}, "
        f"client {conn.client_id or '(system-assigned)'}\n"
    )
    tokens = make_tokens(conn)
    try:
        try:
            token = await tokens.token()
        except AuthError as exc:
            out.write(f"[fail] token: {logs.redact_text(str(exc))}\n")
            return int(ExitCode.AUTH)
        out.write("[ok] token acquired\n")
        roles = set(token_roles(token))
        ready = "Machine.Offboard" in roles
        if ready:
            out.write("[ok] Machine.Offboard granted\n")
        else:
            out.write(f"[missing] Machine.Offboard (required to offboard): {_GRANT_HINT}\n")
        for names, purpose in _RECOMMENDED_ROLES.items():
            if roles.intersection(names):
                out.write(f"[ok] {' or '.join(names)} granted\n")
            else:
                out.write(f"[warn] {names[0]} not granted (needed for {purpose}): {_GRANT_HINT}\n")
        timeout = aiohttp.ClientTimeout(total=60, connect=15)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=True) as session:
            client = MdeClient(session, conn.api_url, tokens, ssl_context=_ssl_for(conn))
            try:
                await client.list_machines(top=1)
                out.write(f"[ok] API reachable: GET {conn.api_url}/api/machines?$top=1\n")
            except ForbiddenError:
                out.write("[ok] API reachable (reading machines is forbidden: see above)\n")
            except ApiError as exc:
                out.write(f"[fail] API call: {logs.redact_text(str(exc))}\n")
                ready = False
            except UsageError as exc:
                out.write(f"[fail] API call: {exc}\n")
                ready = False
        out.write("ready\n" if ready else "not ready\n")
        return int(ExitCode.OK if ready else ExitCode.AUTH)
    finally:
        tokens.close()


async def _verify(
    journal_path: Path,
    conn: config.Connection,
    limits: tuple[Limit, ...],
    settings: VerifySettings,
) -> VerifySummary:
    tokens = make_tokens(conn)
    try:
        await tokens.token()
        journal, replay = Journal.resume(journal_path)
        try:
            tenant = replay.header.get("tenant_id")
            if tenant and conn.credential_kind != "managed_identity" and tenant != conn.tenant_id:
                raise UsageError(
                    f"journal {journal_path} belongs to tenant {tenant}, not {conn.tenant_id}: "
                    "its actions would all look missing"
                )
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
            async with aiohttp.ClientSession(timeout=timeout, trust_env=True) as session:
                client = MdeClient(session, conn.api_url, tokens, ssl_context=_ssl_for(conn))
                stop = asyncio.Event()
                with _signals_set(stop):
                    summary = await verify(
                        journal,
                        replay,
                        client,
                        Throttle(limits, name="reads"),
                        settings,
                        stop=stop,
                    )
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


@contextlib.contextmanager
def _signals_set(event: asyncio.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set ``event`` while the block runs."""
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, event.set)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def cmd_verify(args: argparse.Namespace) -> int:
    """``bulkoffboard verify``."""
    file_cfg = _file_config(args.config)
    conn = _connection(args, file_cfg)
    limits = config.parse_limits(args.limit, {}) if args.limit else READ_LIMITS
    journal_path = Path(args.journal).expanduser().absolute()
    settings = VerifySettings(
        until_final=args.until_final,
        max_age_days=args.max_age,
        deadline_s=args.deadline if args.until_final else None,
        poll_base_s=args.poll_interval,
        poll_cap_s=max(args.poll_interval, 900.0),
    )
    summary = asyncio.run(_verify(journal_path, conn, limits, settings))
    code = _work_done(args, int(summary.exit_code))
    data = summary.as_dict()
    _write_summary(args, data, journal_path)
    out = sys.stdout
    out.write(f"verify {journal_path}: {data.get('reason')} (exit {summary.exit_code})\n")
    for status, number in sorted((data.get("action_statuses") or {}).items()):
        out.write(f"  {status:<16}{number:>8}\n")
    out.write(f"calls {data.get('calls')}, 429s {data.get('throttled_429')}\n")
    return code


def cmd_check(args: argparse.Namespace) -> int:
    """``bulkoffboard check``."""
    conn = _connection(args, _file_config(args.config))
    return asyncio.run(_check(conn))


def cmd_report(args: argparse.Namespace) -> int:
    """``bulkoffboard report``."""
    report.write_file(Path(args.journal).expanduser(), args.format, sys.stdout)
    return 0


# -- entry point -----------------------------------------------------------------------------------

#: The exit code when the reader of standard output went away: 128 + SIGPIPE, what a Unix tool
#: killed by SIGPIPE reports (``report ... | head -1``).
EXIT_STDOUT_CLOSED = 128 + int(signal.SIGPIPE)


def _work_done(args: argparse.Namespace, code: int) -> int:
    """Mark the command's work as done with ``code``: what it writes from here on is only a
    summary, so a reader of standard output that goes away no longer changes the exit code
    (:func:`main` keeps ``code``; the journal and the summary file are already written)."""
    args.work_exit_code = code
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Standard output's reader going away (a broken pipe) is handled here, once: the command
    stops at its next write (a streamed report renders nothing more), nothing is said, and
    the exit code is 141, or the code of the work when the command had marked it done
    (:func:`_work_done`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not at exit
        return code
    except BrokenPipeError:
        if not _stdout_is_pipe():
            raise  # not standard output's reader: a real error
        _discard_stdout()
        return int(getattr(args, "work_exit_code", EXIT_STDOUT_CLOSED))
    except AuthError as exc:
        _error(str(exc))
        return ExitCode.AUTH
    except (UsageError, JournalError) as exc:
        _error(str(exc))
        return ExitCode.USAGE
    except BulkOffboardError as exc:
        _error(str(exc))
        return ExitCode.SOME_FAILED
    except KeyboardInterrupt:
        _error("interrupted")
        return ExitCode.INTERRUPTED


def _stdout_is_pipe() -> bool:
    """Whether standard output is a pipe or a socket: the only kinds whose reader can leave."""
    try:
        mode = os.fstat(sys.stdout.fileno()).st_mode
    except (AttributeError, OSError, ValueError):  # no descriptor (a capture): not a pipe
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _discard_stdout() -> None:
    """Point standard output's file descriptor at /dev/null: what is still buffered for the
    reader that left goes there, so the interpreter's last flush at exit cannot fail with an
    "Exception ignored ... BrokenPipeError" (the Python docs' "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _error(message: str) -> None:
    sys.stderr.write(f"bulkoffboard: error: {logs.redact_text(message)}\n")
    sys.stderr.flush()


__all__ = ["Plan", "build_parser", "execute", "main", "plan_resume"]
