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
import os
import signal
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson
import structlog

from bulkoffboard import __version__, api, config, history, logs, reports, targeting, tenants
from bulkoffboard.cancel import CancelSummary
from bulkoffboard.errors import AuthError, BulkOffboardError, JournalError, UsageError
from bulkoffboard.jobs import RunObserver
from bulkoffboard.progress import Progress, TenantBoard, choose_mode
from bulkoffboard.runner import ExitCode, Summary
from bulkoffboard.sources import FORMATS
from bulkoffboard.verify import VerifySummary

log = structlog.get_logger("bulkoffboard.cli")

_T = TypeVar("_T")


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


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The connection flags given (they override the environment and the config file)."""
    names = ("cloud", "region", "credential", "tenant_id", "client_id", "api_url", "authority_host")
    return {name: getattr(args, name, None) for name in names}


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
        reports.summary_json(data, Path(path).expanduser(), command=args.command, journal=journal)
    except OSError as exc:
        log.warning("summary_json.failed", path=path, error=exc.strerror)


def _add_budget(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--budget",
        metavar="DIR|none",
        help="where the rate budgets live, shared by every bulkoffboard of this app in this "
        "tenant (default: a ledger in $XDG_STATE_HOME/bulkoffboard/budget, or "
        "BULKOFFBOARD_BUDGET, or the config's budget); 'none' keeps a budget private to this "
        "process, which is only safe when nothing else uses the app: two runs then each "
        "take the whole 100 a minute and earn 429s",
    )


def _add_run_dir(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--run-dir",
        metavar="DIR",
        help="a tenants run's directory: <DIR>/<tenant>.jsonl for each tenant (instead of "
        "--journal)",
    )
    parser.add_argument(
        "--tenant",
        action="append",
        default=[],
        metavar="NAME",
        help="with --run-dir or --tenants: act on this tenant only (repeatable)",
    )


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
    many = run.add_argument_group("many tenants (an MSSP's multi-tenant app)")
    many.add_argument(
        "--tenants",
        metavar="FILE",
        help="a tenants file: the same run in each of its tenants, side by side "
        "(with --run-dir; a tenant's own ids, or the source given here)",
    )
    _add_run_dir(many)
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
    marks = run.add_argument_group("a trace in the portal (needs Machine.ReadWrite.All)")
    marks.add_argument(
        "--mark",
        metavar="TAG",
        help="tag every machine the plan offboards with TAG before the first offboard call "
        "(500 a call, journaled: resume does not tag twice; 'cancel' takes it off again)",
    )
    marks.add_argument(
        "--mark-run-id",
        action="store_true",
        help="also tag them bulkoffboard-<first 8 of the run id>, to trace this one batch",
    )
    _add_summary_json(run)
    run.add_argument("--comment", help="the offboard comment (the run id is appended)")
    run.add_argument("--workers", type=int, metavar="N", help="concurrent workers (default 8)")
    _add_limits(run)
    _add_margin(run)
    _add_budget(run)
    _add_connection(run)
    _add_common(run)
    run.set_defaults(func=cmd_run)

    resume = commands.add_parser("resume", help="continue an interrupted run from its journal")
    resume.add_argument("--journal", metavar="PATH")
    _add_run_dir(resume)
    resume.add_argument("--workers", type=int, metavar="N", help="override the run's workers")
    _add_summary_json(resume)
    _add_limits(resume)
    _add_margin(resume)
    _add_budget(resume)
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
    ver.add_argument("--journal", metavar="PATH")
    _add_run_dir(ver)
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
    _add_budget(ver)
    _add_summary_json(ver)
    _add_connection(ver)
    _add_common(ver)
    ver.set_defaults(func=cmd_verify)

    can = commands.add_parser(
        "cancel",
        help="undo a run: cancel its offboard actions not final yet, take its marks off",
        description="Cancel the offboard actions the run created that are not final yet "
        "(each checked against the API first: still open, and its comment carries the run's "
        "id), never another run's nor someone else's pending offboard; then take the run's "
        "--mark tags off the machines whose offboard was cancelled. Journaled and resumable: "
        "cancelling again retries only what did not settle. A cancelled run is not resumed.",
    )
    can.add_argument("--journal", metavar="PATH")
    _add_run_dir(can)
    can.add_argument(
        "--ids", metavar="PATH", help="only these machines (a file in any format run reads)"
    )
    can.add_argument(
        "--dry-run",
        action="store_true",
        help="check and print what would be cancelled and what is too late; send no cancel",
    )
    can.add_argument(
        "--max-machines",
        type=int,
        metavar="N",
        help="refuse to cancel more than N offboards without --yes",
    )
    can.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    can.add_argument(
        "--comment",
        help="the cancel comment (default: 'cancelled by bulkoffboard'; the run id is appended)",
    )
    can.add_argument("--workers", type=int, metavar="N", help="cancels in flight (default 8)")
    _add_summary_json(can)
    _add_limits(can)
    _add_margin(can)
    _add_budget(can)
    _add_connection(can)
    _add_common(can)
    can.set_defaults(func=cmd_cancel)

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

    rep = commands.add_parser(
        "report",
        help="summarise a journal, a run directory, or the history of many runs",
        description="One journal (--journal), a tenants run's directory (--run-dir), or the "
        "history of many runs (--journals GLOB... and/or --journal-dir DIR, recursive): a row "
        "a run, totals that count each machine once, and the machines whose offboard actions "
        "stayed not final longest.",
    )
    rep.add_argument("--journal", metavar="PATH")
    _add_run_dir(rep)
    rep.add_argument(
        "--journals",
        nargs="+",
        metavar="GLOB",
        help="history: the journals matching these globs (quote them to use ** for any depth)",
    )
    rep.add_argument(
        "--journal-dir",
        metavar="DIR",
        help="history: every journal under DIR, run directories included (recursive)",
    )
    rep.add_argument("--format", choices=sorted(reports.RENDERERS), default="table")
    _add_common(rep)
    rep.set_defaults(func=cmd_report)

    sch = commands.add_parser(
        "schema",
        help="print the JSON Schema of the journal (format 1)",
        description="Print the JSON Schema (draft 2020-12) that every journal line validates "
        "against, or write it to --output (atomically).",
    )
    sch.add_argument("--output", "-o", metavar="PATH", help="write it here instead of stdout")
    _add_common(sch)
    sch.set_defaults(func=cmd_schema)

    exp = commands.add_parser(
        "export",
        help="export journals to a database (SQLite or PostgreSQL) for BI tools",
        description="Read every journal under --journal-dir (run directories included) or "
        "matching --journals into normalised tables (runs, sessions, attempts, results, "
        "statuses, cancels, tags) and the view machine_latest. Idempotent and incremental: "
        "only the lines added since the last export are read; a replaced journal is read "
        "again. The password is never shown.",
    )
    exp.add_argument("--journal-dir", metavar="DIR", help="every journal under DIR (recursive)")
    exp.add_argument(
        "--journals", nargs="+", metavar="GLOB", help="the journals matching these globs"
    )
    exp.add_argument(
        "--db",
        metavar="URL",
        help="sqlite:///PATH or postgresql://USER@HOST[:PORT]/DB (or BULKOFFBOARD_DB; default "
        "sqlite:///history.db); the password in the URL or BULKOFFBOARD_DB_PASSWORD",
    )
    exp.add_argument(
        "--summary-json",
        metavar="PATH",
        help="write a machine-readable summary (journals and rows exported) here",
    )
    _add_common(exp)
    exp.set_defaults(func=cmd_export)

    from bulkoffboard import demo  # noqa: PLC0415 - keeps the emulator out of plain runs

    demo.add_commands(commands, _add_common)
    return parser


# -- what a person sees --------------------------------------------------------------------------


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


def _print_plan(prepared: targeting.Prepared, fmt: str) -> None:
    out = sys.stdout
    if fmt == "json":
        data = {**prepared.as_json(), "machines": prepared.rows}
        out.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if fmt == "csv":
        columns = ("machine_id", "action", "outcome", "reason", "name", "os")
        reports.write_csv(out, columns, prepared.rows)
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


def confirm_on_terminal(prepared: targeting.Prepared, question: str) -> bool:
    """``--max-machines`` on a terminal: show the plan's counts, then ask (Ctrl-D is a no)."""
    _print_plan(prepared, "table")
    return _ask(question)


def _ask(question: str) -> bool:
    """A yes/no question on the terminal (Ctrl-D is a no)."""
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


class _ProgressObserver:
    """The live display of a session: a bar on a terminal, ``progress`` events otherwise.
    Progress is news, not a warning: at info, so a scheduler's log (and its alerting on
    warnings) sees it only when asked for with ``--log-level info``."""

    def __init__(
        self,
        log_format: str,
        log_level: str,
        *,
        tenant: str | None = None,
        board: TenantBoard | None = None,
    ) -> None:
        self._log_format = log_format
        self._log_level = log_level
        #: A tenant of a tenants run: named in every event; on a terminal, one line of the
        #: ``board`` (one display for every tenant: their own bars would fight over it).
        self._tenant = tenant
        self._board = board
        self._progress: Progress | None = None

    def __repr__(self) -> str:
        return f"_ProgressObserver({self._progress!r})"

    def run_started(self, total: int | None, eta: Callable[[int], float]) -> None:
        tenant = self._tenant
        self._progress = Progress(
            log_format=self._log_format,
            eta=eta,
            mode="auto" if tenant is None else "rich" if self._board is not None else "log",
            fields={"tenant": tenant} if tenant is not None else None,
            description=tenant or "offboarding",
            board=self._board,
        )
        self._progress.start(total)
        if self._progress.mode == "rich":
            logs.configure("console", self._log_level, stream=self._progress.log_stream())

    def machine_done(self, record: dict[str, Any]) -> None:
        if self._progress is not None:
            self._progress.on_result(record)

    def run_stopped(self) -> None:
        progress, self._progress = self._progress, None
        if progress is None:
            return
        progress.stop()
        if progress.mode == "rich" and (self._board is None or not self._board.active):
            logs.configure(self._log_format, self._log_level)


def _with_signals(job: Callable[[asyncio.Event], Awaitable[_T]]) -> _T:
    """Run ``job(stop)`` in a new event loop with SIGINT and SIGTERM wired to it: the first
    sets ``stop`` (the calls in flight finish), a second stops at once."""

    async def main() -> _T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        signals = 0

        def on_signal() -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                stop.set()
            elif task is not None:
                task.cancel()  # a second signal: stop waiting for in-flight calls

        installed = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, on_signal)
            except (NotImplementedError, RuntimeError):  # not the main thread
                continue
            installed.append(sig)
        try:
            return await job(stop)
        except asyncio.CancelledError:
            if signals > 1:
                raise KeyboardInterrupt from None
            raise
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    return asyncio.run(main())


# -- commands --------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """``bulkoffboard run``."""
    if args.tenants or args.run_dir:
        return _run_tenants(args)
    if args.tenant:
        raise UsageError("--tenant goes with --tenants and --run-dir")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    observer = _ProgressObserver(args.log_format, args.log_level)
    source = _source_flags(args)
    summary = _with_signals(
        lambda stop: api.run(
            args.ids,
            journal=args.journal,
            os=source.pop("os_platforms"),
            **source,
            **_run_flags(args),
            config=args.config,
            connection_overrides=_overrides(args),
            stop=stop,
            observer=observer,
            confirm=confirm_on_terminal if interactive else None,
        )
    )
    if summary.plan is not None:
        _print_plan(summary.plan, args.format)
        return int(ExitCode.OK)
    return _finished(args, summary)


def _source_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The source flags other than ``--ids``, as API arguments."""
    return {
        "query": args.query,
        "inactive_days": args.inactive_days,
        "health": args.health,
        "os_platforms": args.os,
        "tag": args.tag,
        "group": args.group,
        "names": args.names,
        "hunting": args.hunting,
    }


def _run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags of how a run behaves, as API arguments (one tenant or many)."""
    return {
        "comment": args.comment,
        "limits": args.limit,
        "margin": args.margin,
        "workers": args.workers,
        "ids_format": args.ids_format,
        "exclude_tag": args.exclude_tag,
        "exclude_group": args.exclude_group,
        "exclude_id": args.exclude_id,
        "exclude_name": args.exclude_name,
        "preflight": not args.no_preflight,
        "dry_run": args.dry_run,
        "dry_rows": args.format != "table",
        "max_machines": args.max_machines,
        "yes": args.yes,
        "wait": args.wait,
        "wait_deadline": args.wait_deadline,
        "poll_interval": args.poll_interval,
        "budget": args.budget,
        "mark": args.mark,
        "mark_run_id": args.mark_run_id,
    }


def _finished(args: argparse.Namespace, summary: Summary) -> int:
    """The end of a run or resume: the summary file, then the summary on stdout."""
    code = _work_done(args, int(summary.exit_code))
    if summary.journal_path is None:  # stopped while planning: nothing was sent
        sys.stdout.write(f"{summary.reason} (exit {code})\n")
        return code
    _write_summary(args, summary.as_dict(), summary.journal_path)
    _print_summary(summary, summary.journal_path, summary.run_id)
    return code


def cmd_resume(args: argparse.Namespace) -> int:
    """``bulkoffboard resume``."""
    if _journal_or_run_dir(args) is None:
        observers = _tenant_observers(args)
        result = _with_signals(
            lambda stop: tenants.resume_tenants(
                args.run_dir,
                only=args.tenant,
                limits=args.limit,
                workers=args.workers,
                margin=args.margin,
                budget=args.budget,
                connection_overrides=_overrides(args),
                stop=stop,
                observers=observers,
            )
        )
        return _tenants_finished(args, result)
    observer = _ProgressObserver(args.log_format, args.log_level)
    summary = _with_signals(
        lambda stop: api.resume(
            args.journal,
            limits=args.limit,
            workers=args.workers,
            margin=args.margin,
            budget=args.budget,
            config=args.config,
            connection_overrides=_overrides(args),
            stop=stop,
            observer=observer,
        )
    )
    return _finished(args, summary)


def cmd_verify(args: argparse.Namespace) -> int:
    """``bulkoffboard verify``."""
    if _journal_or_run_dir(args) is None:
        result = _with_signals(
            lambda stop: tenants.verify_tenants(
                args.run_dir,
                only=args.tenant,
                connection_overrides=_overrides(args),
                stop=stop,
                until_final=args.until_final,
                max_age=args.max_age,
                deadline=args.deadline,
                poll_interval=args.poll_interval,
                limits=args.limit,
                budget=args.budget,
            )
        )
        return _tenants_finished(args, result)
    journal_path = Path(args.journal).expanduser().absolute()
    summary = _with_signals(
        lambda stop: api.verify(
            journal_path,
            until_final=args.until_final,
            max_age=args.max_age,
            deadline=args.deadline,
            poll_interval=args.poll_interval,
            limits=args.limit,
            budget=args.budget,
            config=args.config,
            connection_overrides=_overrides(args),
            stop=stop,
        )
    )
    code = _work_done(args, int(summary.exit_code))
    data = summary.as_dict()
    _write_summary(args, data, journal_path)
    out = sys.stdout
    out.write(f"verify {journal_path}: {data.get('reason')} (exit {summary.exit_code})\n")
    for status, number in sorted((data.get("action_statuses") or {}).items()):
        out.write(f"  {status:<16}{number:>8}\n")
    out.write(f"calls {data.get('calls')}, 429s {data.get('throttled_429')}\n")
    return code


def cmd_cancel(args: argparse.Namespace) -> int:
    """``bulkoffboard cancel``."""
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    options: dict[str, Any] = {
        "ids": Path(args.ids).expanduser() if args.ids else None,
        "comment": args.comment,
        "dry_run": args.dry_run,
        "max_machines": args.max_machines,
        "yes": args.yes,
        "confirm": _confirm_cancel if interactive else None,
        "limits": args.limit,
        "margin": args.margin,
        "workers": args.workers,
        "budget": args.budget,
    }
    if _journal_or_run_dir(args) is None:
        result = _with_signals(
            lambda stop: tenants.cancel_tenants(
                args.run_dir,
                only=args.tenant,
                connection_overrides=_overrides(args),
                stop=stop,
                **options,
            )
        )
        return _tenants_finished(args, result)
    journal_path = Path(args.journal).expanduser().absolute()
    summary = _with_signals(
        lambda stop: api.cancel(
            journal_path,
            config=args.config,
            connection_overrides=_overrides(args),
            stop=stop,
            **options,
        )
    )
    code = _work_done(args, int(summary.exit_code))
    data = summary.as_dict()
    _write_summary(args, data, journal_path)
    out = sys.stdout
    verb = "cancel --dry-run" if args.dry_run else "cancel"
    out.write(f"{verb} {journal_path}: {summary.reason} (exit {code})\n")
    for row in summary.rows:
        out.write(
            f"  {row['would']:<18}{row['machine_id']}  {row['action_id'] or '-'}  "
            f"{row['action_status'] or '-'}\n"
        )
    for outcome, number in sorted(summary.counts.items()):
        out.write(f"  {outcome:<18}{number:>8}\n")
    for reason, number in sorted(summary.skipped.items()):
        out.write(f"  {'left: ' + reason:<18}{number:>8}\n")
    if summary.unmarked:
        out.write(f"  {'unmarked':<18}{summary.unmarked:>8}\n")
    out.write(f"cancel calls {summary.calls}, reads {summary.reads}, 429s {summary.throttled}\n")
    return code


def _confirm_cancel(count: int, question: str) -> bool:
    """``cancel --max-machines`` on a terminal: ask (Ctrl-D is a no)."""
    return _ask(question)


def _journal_or_run_dir(args: argparse.Namespace) -> Path | None:
    """``--journal`` (a path) or ``--run-dir`` (None): exactly one of them."""
    if bool(args.journal) == bool(args.run_dir):
        raise UsageError("give --journal PATH or --run-dir DIR (a tenants run's directory)")
    if args.tenant and not args.run_dir:
        raise UsageError("--tenant goes with --run-dir")
    return Path(args.journal).expanduser().absolute() if args.journal else None


def _tenant_observers(args: argparse.Namespace) -> tenants.Observers:
    """Each tenant's progress: on a terminal a line a running tenant and the total (one
    board); otherwise ``progress`` events naming the tenant (every 30 s at info)."""
    board = TenantBoard() if choose_mode(sys.stderr, args.log_format) == "rich" else None

    def observer(name: str) -> RunObserver:
        return _ProgressObserver(args.log_format, args.log_level, tenant=name, board=board)

    return observer


def _run_tenants(args: argparse.Namespace) -> int:
    """``run --tenants FILE --run-dir DIR``: the same run in every tenant, side by side."""
    if not (args.tenants and args.run_dir):
        raise UsageError("--tenants FILE and --run-dir DIR go together")
    if args.journal or args.ids:
        raise UsageError(
            "with --tenants, each tenant's journal is <run-dir>/<tenant>.jsonl and its ids "
            "come from the tenants file: drop --journal and --ids"
        )
    observers = _tenant_observers(args)
    result = _with_signals(
        lambda stop: tenants.run_tenants(
            args.tenants,
            args.run_dir,
            only=args.tenant,
            **_source_flags(args),
            connection_overrides=_overrides(args),
            stop=stop,
            observers=observers,
            **_run_flags(args),
        )
    )
    if args.dry_run:
        for tenant in result.tenants:
            sys.stdout.write(f"tenant {tenant.name}:\n")
            plan = tenant.summary.plan if isinstance(tenant.summary, Summary) else None
            if plan is not None:
                _print_plan(plan, args.format)
            else:
                sys.stdout.write(f"  {tenant.reason} (exit {int(tenant.exit_code)})\n")
        return int(result.exit_code)
    return _tenants_finished(args, result)


def _tenants_finished(args: argparse.Namespace, result: tenants.TenantsSummary) -> int:
    """The end of a tenants run, resume or verify: the summary file (one summary a tenant
    and the totals), then a row a tenant and the total."""
    code = _work_done(args, int(result.exit_code))
    data = result.as_dict()
    path = getattr(args, "summary_json", None)
    if path:
        try:
            reports.summary_json(data, Path(path).expanduser(), command=args.command)
        except OSError as exc:
            log.warning("summary_json.failed", path=path, error=exc.strerror)
    out = sys.stdout
    out.write(f"{args.command} {result.run_dir}: {len(result.tenants)} tenants (exit {code})\n")
    out.write(f"  {'tenant':<20}{'machines':>10}{'exit':>6}  reason\n")
    for tenant in result.tenants:
        summary = tenant.summary
        machines = (
            sum(n for n in summary.counts.values() if n)
            if isinstance(summary, Summary | CancelSummary)
            else sum(summary.statuses.values())
            if isinstance(summary, VerifySummary)
            else 0
        )
        out.write(
            f"  {tenant.name:<20}{machines:>10}{int(tenant.exit_code):>6}  "
            f"{logs.redact_text(tenant.reason)}\n"
        )
    for outcome, number in sorted(result.counts.items()):
        out.write(f"  {'total ' + outcome:<20}{number:>10}\n")
    if result.exit_code in (ExitCode.SOME_FAILED, ExitCode.INTERRUPTED) and args.command == "run":
        out.write(f"continue with: bulkoffboard resume --run-dir {result.run_dir}\n")
    return code


def cmd_check(args: argparse.Namespace) -> int:
    """``bulkoffboard check``."""
    result = asyncio.run(api.check(config=args.config, connection_overrides=_overrides(args)))
    out = sys.stdout
    for mark, text in result.findings:
        shown = logs.redact_text(text) if mark == "fail" else text
        out.write(f"{shown}\n" if mark == "info" else f"[{mark}] {shown}\n")
    out.write("ready\n" if result.ready else "not ready\n")
    return int(result.exit_code)


def cmd_report(args: argparse.Namespace) -> int:
    """``bulkoffboard report``."""
    if args.journals or args.journal_dir:
        if args.journal or args.run_dir or args.tenant:
            raise UsageError(
                "--journals and --journal-dir make a history report: leave out --journal, "
                "--run-dir and --tenant"
            )
        history.write_report(args.journals or (), args.journal_dir, args.format, sys.stdout)
        return 0
    if _journal_or_run_dir(args) is None:
        run_dir = Path(args.run_dir).expanduser().absolute()
        journals = tenants.journals_of(run_dir, args.tenant)
        reports.write_run_dir(run_dir, journals, args.format, sys.stdout)
        return 0
    reports.write_file(Path(args.journal).expanduser(), args.format, sys.stdout)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """``bulkoffboard export``: journals to a database."""
    from bulkoffboard import export  # noqa: PLC0415 - SQLAlchemy loads only for this command

    if not (args.journal_dir or args.journals):
        raise UsageError("give --journal-dir DIR or --journals GLOB... (the journals to export)")
    summary = export.export(
        args.journals or (), args.journal_dir, args.db or os.environ.get("BULKOFFBOARD_DB")
    )
    _write_summary(args, summary.as_dict(), None)
    code = _work_done(args, 0)  # the database is written: a closed pipe changes nothing
    for line in export.iter_summary_lines(summary):
        sys.stdout.write(line + "\n")
    return code


def cmd_schema(args: argparse.Namespace) -> int:
    """``bulkoffboard schema``: the journal's JSON Schema, on stdout or in ``--output``."""
    from bulkoffboard import journal_schema  # noqa: PLC0415 - only this command reads it

    if args.output is None:
        sys.stdout.write(journal_schema.text())
    else:
        journal_schema.write(Path(args.output).expanduser())
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


__all__ = ["build_parser", "confirm_on_terminal", "main"]
