"""The command line: argument parsing, wiring, logging set-up and exit codes. No business logic.

Exit codes (a contract): 0 every machine reached a final outcome and none failed; 1 some failed
(``resume`` retries them); 2 usage or configuration error, nothing sent; 3 authentication or
permission failure; 130 interrupted (the journal is consistent and ``resume`` continues).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import signal
import ssl
import sys
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from bulkoffboard import __version__, config, logs, report
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
from bulkoffboard.journal import FORMAT_VERSION, TOOL, Journal, Replay, iso, replay_file, utc_now
from bulkoffboard.runner import ExitCode, Runner, RunSettings, Summary
from bulkoffboard.sources import FORMATS, detect_format, iter_records, spool_stdin
from bulkoffboard.throttle import Limit, Throttle

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


def _add_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--limit",
        action="append",
        metavar="CALLS/SECONDS",
        help="an offboard rate limit; repeatable; replaces the default pair 100/60 and "
        "1500/3600 (e.g. --limit 100/0.6 --limit 1500/36 against a time-scaled emulator)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``bulkoffboard`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="bulkoffboard",
        description="Offboard devices from Microsoft Defender for Endpoint in bulk: throttled "
        "under the API's limits, journaled, resumable without offboarding twice.",
        epilog="Exit codes: 0 done, 1 some failed (resume retries), 2 usage/configuration, "
        "3 authentication/permission, 130 interrupted (resume continues).",
    )
    parser.add_argument("--version", action="version", version=f"bulkoffboard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="offboard the machines listed in a file or on stdin")
    run.add_argument(
        "--ids",
        required=True,
        metavar="PATH",
        help="machine ids: text, CSV, JSON or JSONL; - for stdin",
    )
    run.add_argument(
        "--ids-format", choices=("auto", *FORMATS), default="auto", help="the --ids format"
    )
    run.add_argument("--journal", required=True, metavar="PATH", help="the JSONL journal to create")
    run.add_argument("--comment", help="the offboard comment (the run id is appended)")
    run.add_argument("--workers", type=int, metavar="N", help="concurrent workers (default 8)")
    _add_limits(run)
    _add_connection(run)
    run.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    _add_common(run)
    run.set_defaults(func=cmd_run)

    resume = commands.add_parser("resume", help="continue an interrupted run from its journal")
    resume.add_argument("--journal", required=True, metavar="PATH")
    resume.add_argument("--workers", type=int, metavar="N", help="override the run's workers")
    _add_limits(resume)
    _add_connection(resume)
    _add_common(resume)
    resume.set_defaults(func=cmd_resume)

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


async def execute(plan: Plan, conn: config.Connection) -> Summary:
    """Acquire a token, open the journal, run, close. Raises AuthError before the journal."""
    tokens = make_tokens(conn)
    try:
        return await _with_tokens(plan, conn, tokens)
    finally:
        tokens.close()


async def _with_tokens(plan: Plan, conn: config.Connection, tokens: TokenProvider) -> Summary:
    await tokens.token()  # authentication fails here, before any journal or call
    replay: Replay
    if plan.header is not None:
        journal = Journal.create(plan.journal_path, plan.header)
        replay = Replay(header=plan.header)
    else:
        journal, replay = Journal.resume(plan.journal_path)
    summary: Summary | None = None
    try:
        journal.append(
            {
                "type": "session",
                "at": iso(utc_now()),
                "pid": os.getpid(),
                "command": "run" if plan.header is not None else "resume",
                "tool_version": __version__,
            },
            sync=True,
        )
        summary = await _run_session(plan, conn, tokens, journal, replay)
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


async def _run_session(
    plan: Plan, conn: config.Connection, tokens: TokenProvider, journal: Journal, replay: Replay
) -> Summary:
    connector = aiohttp.TCPConnector(limit=plan.workers + 4)
    timeout = aiohttp.ClientTimeout(total=90, connect=15, sock_read=60)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trust_env=True
    ) as session:
        client = MdeClient(session, conn.api_url, tokens, ssl_context=_ssl_for(conn))
        throttle = Throttle(plan.limits, name="offboard")
        seeded = throttle.seed(Throttle.wall_to_clock(replay.recent_sends, throttle.now()))
        for round_trip in replay.recent_round_trips:
            # The calls of the process before arrived up to a round trip after their send
            # times: keep that much margin until this process has measured its own.
            throttle.observe(round_trip)
        if seeded:
            log.info("throttle.seeded", sends=seeded, margin_s=throttle.margin_hint_s())
        reads = Throttle(plan.limits, name="reads")
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
        )
        loop = asyncio.get_running_loop()
        main_task = asyncio.current_task()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                runner.request_stop()
            elif main_task is not None:
                main_task.cancel()  # a second signal: stop waiting for in-flight calls

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal)
                installed.append(sig)
        try:
            return await runner.run(iter_records(plan.source_path, plan.source_format))
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)


# -- commands --------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """``bulkoffboard run``."""
    file_cfg = _file_config(args.config)
    conn = _connection(args, file_cfg)
    limits = config.parse_limits(args.limit, file_cfg)
    workers = _workers(args.workers, file_cfg)
    comment = (args.comment or file_cfg.get("comment") or config.DEFAULT_COMMENT).strip()
    if not comment:
        raise UsageError("--comment must not be empty")
    journal_path = Path(args.journal).expanduser().absolute()
    if journal_path.exists() and journal_path.stat().st_size > 0:
        raise UsageError(
            f"journal {journal_path} already exists; use 'bulkoffboard resume --journal "
            f"{journal_path}' to continue it, or choose a new path"
        )
    if not journal_path.parent.is_dir():
        raise UsageError(f"the journal's folder {journal_path.parent} does not exist")
    if args.ids == "-":
        source_path = journal_path.with_name(journal_path.name + ".stdin")
        spool_stdin(source_path, sys.stdin.buffer)
        kind = "stdin"
    else:
        source_path = Path(args.ids).expanduser().absolute()
        kind = "file"
    fmt = detect_format(source_path, None if args.ids_format == "auto" else args.ids_format)
    iter_records(source_path, fmt)  # checks the file now: missing, unreadable, binary
    plan = new_plan(
        journal_path=journal_path,
        source={"kind": kind, "path": str(source_path), "format": fmt},
        comment=comment,
        workers=workers,
        limits=limits,
        conn=conn,
    )
    summary = asyncio.run(execute(plan, conn))
    _print_summary(summary, journal_path, plan.run_id)
    return int(summary.exit_code)


def new_plan(
    *,
    journal_path: Path,
    source: dict[str, Any],
    comment: str,
    workers: int,
    limits: tuple[Limit, ...],
    conn: config.Connection,
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
        "source": {**source, "sha256": _sha256(source_path)},
        "comment": comment,
        "limits": [[limit.calls, limit.period_s] for limit in limits],
        "workers": workers,
        "api_url": conn.api_url,
        "tenant_id": conn.tenant_id,
        "client_id": conn.client_id,
    }
    return Plan(
        journal_path, source_path, str(source["format"]), comment, run_id, workers, limits, header
    )


def plan_resume(
    journal_path: Path,
    limit_args: list[str] | None,
    workers_arg: int | None,
    file_cfg: dict[str, Any],
) -> Plan:
    """Read what a journal recorded and check its source is unchanged."""
    header = replay_file(journal_path).header
    source = header.get("source") or {}
    source_path = Path(str(source.get("path", "")))
    if not source_path.is_file():
        raise UsageError(f"the run's source {source_path} is gone; resume needs it unchanged")
    if source.get("sha256") and _sha256(source_path) != source["sha256"]:
        raise UsageError(
            f"the run's source {source_path} changed since the run started; start a new run "
            "with a new journal for the new list"
        )
    limits = (
        config.parse_limits(limit_args, {})
        if limit_args
        else tuple(Limit(int(c), float(p)) for c, p in header.get("limits") or [])
        or config.parse_limits(None, file_cfg)
    )
    return Plan(
        journal_path=journal_path,
        source_path=source_path,
        source_format=str(source.get("format", "auto")),
        comment=str(header.get("comment") or config.DEFAULT_COMMENT),
        run_id=str(header.get("run_id")),
        workers=_workers(workers_arg, {"workers": header.get("workers", 8)}),
        limits=limits,
        header=None,
    )


def cmd_resume(args: argparse.Namespace) -> int:
    """``bulkoffboard resume``."""
    file_cfg = _file_config(args.config)
    conn = _connection(args, file_cfg)
    journal_path = Path(args.journal).expanduser().absolute()
    plan = plan_resume(journal_path, args.limit, args.workers, file_cfg)
    summary = asyncio.run(execute(plan, conn))
    _print_summary(summary, journal_path, plan.run_id)
    return int(summary.exit_code)


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


def cmd_check(args: argparse.Namespace) -> int:
    """``bulkoffboard check``."""
    conn = _connection(args, _file_config(args.config))
    return asyncio.run(_check(conn))


def cmd_report(args: argparse.Namespace) -> int:
    """``bulkoffboard report``."""
    replay = replay_file(Path(args.journal).expanduser())
    sys.stdout.write(report.RENDERERS[args.format](replay))
    return 0


# -- entry point -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    try:
        return int(args.func(args))
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


def _error(message: str) -> None:
    sys.stderr.write(f"bulkoffboard: error: {logs.redact_text(message)}\n")
    sys.stderr.flush()


__all__ = ["Plan", "build_parser", "execute", "main", "plan_resume"]
