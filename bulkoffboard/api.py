"""The public Python API: what the command line does, as typed calls.

::

    import asyncio, bulkoffboard

    summary = asyncio.run(bulkoffboard.run(
        ids=["1e5bc9d7e413ddd7902c2932e418702b84d0cc07"],   # or a path, as --ids takes
        journal="runs/2026-12-04.jsonl",
        comment="CHG0042 retire",
    ))
    summary.exit_code       # 0, 1, 2, 3 or 130, as the command line's
    summary.counts          # {"offboarded": 1, ...}, over the whole journal
    await bulkoffboard.resume("runs/2026-12-04.jsonl")
    await bulkoffboard.verify("runs/2026-12-04.jsonl", until_final=False)
    text = bulkoffboard.report("runs/2026-12-04.jsonl", format="json")

Keyword arguments mirror the command line's flags (``--inactive-days`` is ``inactive_days=``;
a repeatable flag takes a string or a sequence). Connection settings come from the environment
and ``BULKOFFBOARD_CONFIG`` exactly as for the command line, unless ``connection=`` (a
:class:`~bulkoffboard.config.Connection`) or ``config=`` (a TOML file) is given. Problems a
caller can fix raise the package's error tree (:class:`~bulkoffboard.errors.UsageError`,
:class:`~bulkoffboard.errors.AuthError`, :class:`~bulkoffboard.errors.JournalError`, ...) with
the one-line messages the command line prints; what happened to machines is never an
exception, it is in the summary (and the journal). To stop a run from another task, pass
``stop=asyncio.Event()`` and set it: the calls in flight finish and the summary's exit code is
130 (``resume`` continues); cancelling the task stops at once, as a second Ctrl-C does.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from bulkoffboard import config as settings
from bulkoffboard import reports, targeting
from bulkoffboard.cancel import CancelSummary
from bulkoffboard.errors import UsageError
from bulkoffboard.jobs import (
    CancelRequest,
    CheckResult,
    Confirm,
    Plan,
    RunObserver,
    Targets,
    cancel_journal,
    check_margin,
    check_workers,
    execute,
    new_plan,
    plan_resume,
    verify_journal,
)
from bulkoffboard.jobs import check as check_connection
from bulkoffboard.journal import utc_now
from bulkoffboard.models import describe_invalid, normalize_machine_id
from bulkoffboard.runner import Summary
from bulkoffboard.sources import detect_format, iter_records, spool_stdin
from bulkoffboard.verify import READ_LIMITS, VerifySettings, VerifySummary

if TYPE_CHECKING:
    from bulkoffboard.export import ExportSummary

#: A path as the API takes one.
PathArg = str | os.PathLike[str]
#: A repeatable flag's values: one string or several.
Many = str | Sequence[str]
#: ``report(format=...)``.
ReportFormat = Literal["table", "csv", "json", "jsonl", "markdown", "html"]


def _many(value: Many | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def load_config(config: PathArg | None = None) -> dict[str, Any]:
    """The config file's settings: ``config``, else ``BULKOFFBOARD_CONFIG``, else none."""
    path = config or os.environ.get("BULKOFFBOARD_CONFIG")
    return settings.load_file(Path(path)) if path else {}


def connect(
    connection: settings.Connection | None = None,
    file_cfg: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> settings.Connection:
    """The connection: ``connection`` as given, else from the environment, the config file's
    settings and ``overrides`` (the command line's ``--cloud``, ``--tenant-id``, ...)."""
    if connection is not None:
        return connection
    return settings.connection(os.environ, dict(file_cfg or {}), dict(overrides or {}))


def _journal_path(
    journal: PathArg | None, file_cfg: Mapping[str, Any], *, dry_run: bool
) -> Path | None:
    if journal:
        path = Path(journal).expanduser().absolute()
    elif file_cfg.get("journal_dir") and not dry_run:
        stamp = utc_now().strftime("%Y%m%d-%H%M%S")
        path = Path(file_cfg["journal_dir"]).expanduser().absolute() / f"bulkoffboard-{stamp}.jsonl"
    elif dry_run:
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


def _spool_ids(ids: Iterable[str], journal: Path) -> Path:
    """Machine ids given as values, kept beside the journal (``<journal>.ids``) so a resume
    reads the same list; each is checked as a line of a file would be."""
    path = journal.with_name(journal.name + ".ids")
    with path.open("w", encoding="utf-8") as out:
        for value in ids:
            if not isinstance(value, str):
                raise UsageError(f"ids: {value!r} is not a string")
            out.write(value.replace("\r", " ").replace("\n", " ") + "\n")
        out.flush()
        os.fsync(out.fileno())
    return path


def source_request(
    *,
    ids: PathArg | Iterable[str] | None = None,
    ids_format: str = "auto",
    query: str | None = None,
    inactive_days: float | None = None,
    health: Many | None = None,
    os_platforms: Many | None = None,
    tag: Many | None = None,
    group: Many | None = None,
    names: PathArg | None = None,
    hunting: str | None = None,
    journal: Path | None = None,
    stdin: BinaryIO | None = None,
) -> targeting.Request:
    """The one source a run reads, checked before anything is sent (``ids="-"`` reads
    ``stdin``, by default the process's, and keeps it beside the journal)."""
    healths, platforms, tags, groups = (
        _many(health),
        _many(os_platforms),
        _many(tag),
        _many(group),
    )
    presets = bool(inactive_days is not None or healths or platforms or tags or groups)
    chosen = [
        name
        for name, given in (
            ("--ids", ids is not None),
            ("--query/presets", query is not None or presets),
            ("--names", names is not None),
            ("--hunting", hunting is not None),
        )
        if given
    ]
    if len(chosen) != 1:
        raise UsageError(
            "give exactly one source: --ids, --query (or presets such as --inactive-days), "
            f"--names or --hunting (got {', '.join(chosen) or 'none'})"
        )
    if ids is not None:
        kind = "file"
        if isinstance(ids, str | os.PathLike) and str(ids) == "-":
            if journal is None:
                raise UsageError("--ids - needs --journal (standard input is kept beside it)")
            path = journal.with_name(journal.name + ".stdin")
            spool_stdin(path, stdin if stdin is not None else sys.stdin.buffer)
            kind = "stdin"
        elif isinstance(ids, str | os.PathLike):
            path = Path(ids).expanduser().absolute()
        else:
            if journal is None:
                raise UsageError("ids given as values need a journal (they are kept beside it)")
            path = _spool_ids(ids, journal)
            kind, ids_format = "list", "text"
        fmt = detect_format(path, None if ids_format == "auto" else ids_format)
        iter_records(path, fmt)  # checks the file now: missing, unreadable, binary
        return targeting.Request(kind, path, fmt, describe={"path": str(path), "format": fmt})
    if names is not None:
        path = Path(names).expanduser().absolute()
        targeting.read_names(path)  # checks the file now
        return targeting.Request("names", path, describe={"names": str(path)})
    if hunting is not None:
        text = hunting
        if text.startswith("@"):
            kql_path = Path(text[1:]).expanduser()
            try:
                text = kql_path.read_text(encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"--hunting {kql_path}: {exc.strerror}") from None
        if not text.strip():
            raise UsageError("--hunting: the query is empty")
        return targeting.Request("hunting", hunting=text, describe={"hunting": text})
    if inactive_days is not None and inactive_days < 0:
        raise UsageError(f"--inactive-days must not be negative, not {inactive_days}")
    group_ids = [int(g) for g in groups if g.isdigit()]
    group_names = tuple(g for g in groups if not g.isdigit())
    odata = targeting.build_filter(
        query=query,
        inactive_days=inactive_days,
        health=healths,
        os_platforms=platforms,
        tags=tags,
        group_ids=group_ids,
    )
    describe = {
        "filter": odata,
        "presets": {
            "query": query,
            "inactive_days": inactive_days,
            "health": healths,
            "os": platforms,
            "tag": tags,
            "group": groups,
        },
    }
    return targeting.Request("query", odata=odata, group_names=group_names, describe=describe)


def exclusion_rules(
    file_cfg: Mapping[str, Any],
    *,
    exclude_tag: Many | None = None,
    exclude_group: Many | None = None,
    exclude_id: Many | None = None,
    exclude_name: Many | None = None,
    preflight: bool = True,
) -> targeting.Rules:
    """Exclusions from the config file and the arguments (both apply)."""
    ids: set[str] = set()
    for value in [*file_cfg.get("exclude_ids", []), *_many(exclude_id)]:
        machine_id = normalize_machine_id(str(value))
        if machine_id is None:
            raise UsageError(f"exclusion id {value!r} is not a 40-hex machine id")
        ids.add(machine_id)
    return targeting.Rules(
        tags=tuple(str(v) for v in [*file_cfg.get("exclude_tags", []), *_many(exclude_tag)]),
        groups=tuple(str(v) for v in [*file_cfg.get("exclude_groups", []), *_many(exclude_group)]),
        ids=frozenset(ids),
        names=tuple(str(v) for v in [*file_cfg.get("exclude_names", []), *_many(exclude_name)]),
        preflight=preflight,
    )


async def run(
    ids: PathArg | Iterable[str] | None = None,
    *,
    journal: PathArg | None = None,
    comment: str | None = None,
    limits: Sequence[str] | None = None,
    margin: float | None = None,
    workers: int | None = None,
    ids_format: str = "auto",
    query: str | None = None,
    inactive_days: float | None = None,
    health: Many | None = None,
    os: Many | None = None,
    tag: Many | None = None,
    group: Many | None = None,
    names: PathArg | None = None,
    hunting: str | None = None,
    exclude_tag: Many | None = None,
    exclude_group: Many | None = None,
    exclude_id: Many | None = None,
    exclude_name: Many | None = None,
    preflight: bool = True,
    dry_run: bool = False,
    dry_rows: bool = False,
    max_machines: int | None = None,
    yes: bool = False,
    wait: bool = False,
    wait_deadline: float = 3600.0,
    poll_interval: float = 60.0,
    budget: str | None = None,
    mark: str | None = None,
    mark_run_id: bool = False,
    connection: settings.Connection | None = None,
    config: PathArg | None = None,
    connection_overrides: Mapping[str, Any] | None = None,
    stop: asyncio.Event | None = None,
    observer: RunObserver | None = None,
    confirm: Confirm | None = None,
    stdin: BinaryIO | None = None,
) -> Summary:
    """Offboard machines (``bulkoffboard run``); returns the run's summary.

    ``ids``: a file (text, CSV, JSON, JSONL; ``"-"`` reads ``stdin``) or the ids themselves
    (kept beside the journal as ``<journal>.ids`` for resume); or one of the other sources
    (``query`` and its presets ``inactive_days``, ``health``, ``os``, ``tag``, ``group``;
    ``names``; ``hunting``). ``limits``: as ``--limit`` (``["100/60", "1500/3600"]``).
    ``dry_run``: nothing is sent; the summary's ``plan`` says what would be (``dry_rows``
    keeps every machine's row). ``max_machines`` over the plan raises
    :class:`~bulkoffboard.errors.UsageError` unless ``yes`` or ``confirm(plan, question)``
    says so. ``wait``: follow the actions until final (as ``--wait``). ``mark``: tag every
    machine to offboard first (as ``--mark``; ``mark_run_id`` adds ``bulkoffboard-<run id>``,
    as ``--mark-run-id``). ``stop``: set it to stop (exit 130); ``observer``: hears progress.
    """
    file_cfg = load_config(config)
    conn = connect(connection, file_cfg, connection_overrides)
    return await run_with(
        file_cfg,
        conn,
        ids=ids,
        journal=journal,
        comment=comment,
        limits=limits,
        margin=margin,
        workers=workers,
        ids_format=ids_format,
        query=query,
        inactive_days=inactive_days,
        health=health,
        os_platforms=os,
        tag=tag,
        group=group,
        names=names,
        hunting=hunting,
        exclude_tag=exclude_tag,
        exclude_group=exclude_group,
        exclude_id=exclude_id,
        exclude_name=exclude_name,
        preflight=preflight,
        dry_run=dry_run,
        dry_rows=dry_rows,
        max_machines=max_machines,
        yes=yes,
        wait=wait,
        wait_deadline=wait_deadline,
        poll_interval=poll_interval,
        budget=budget,
        mark=mark,
        mark_run_id=mark_run_id,
        stop=stop,
        observer=observer,
        confirm=confirm,
        stdin=stdin,
    )


async def run_with(
    file_cfg: Mapping[str, Any],
    conn: settings.Connection,
    *,
    ids: PathArg | Iterable[str] | None = None,
    journal: PathArg | None = None,
    comment: str | None = None,
    limits: Sequence[str] | None = None,
    margin: float | None = None,
    workers: int | None = None,
    ids_format: str = "auto",
    query: str | None = None,
    inactive_days: float | None = None,
    health: Many | None = None,
    os_platforms: Many | None = None,
    tag: Many | None = None,
    group: Many | None = None,
    names: PathArg | None = None,
    hunting: str | None = None,
    exclude_tag: Many | None = None,
    exclude_group: Many | None = None,
    exclude_id: Many | None = None,
    exclude_name: Many | None = None,
    preflight: bool = True,
    dry_run: bool = False,
    dry_rows: bool = False,
    max_machines: int | None = None,
    yes: bool = False,
    wait: bool = False,
    wait_deadline: float = 3600.0,
    poll_interval: float = 60.0,
    budget: str | None = None,
    mark: str | None = None,
    mark_run_id: bool = False,
    stop: asyncio.Event | None = None,
    observer: RunObserver | None = None,
    confirm: Confirm | None = None,
    stdin: BinaryIO | None = None,
    header_extra: Mapping[str, Any] | None = None,
) -> Summary:
    """:func:`run` with the settings of a config file (``file_cfg``) and a connection already
    resolved (one tenant of a tenants file); ``header_extra`` goes into the journal header."""
    run_limits = settings.parse_limits(list(limits) if limits else None, file_cfg)
    margin_s = check_margin(margin)
    run_workers = check_workers(workers, file_cfg)
    text = (comment or file_cfg.get("comment") or settings.DEFAULT_COMMENT).strip()
    if not text:
        raise UsageError("--comment must not be empty")
    breaker = max_machines if max_machines is not None else file_cfg.get("max_machines")
    if breaker is not None and breaker < 0:
        raise UsageError(f"--max-machines must not be negative, not {breaker}")
    journal_path = _journal_path(journal, file_cfg, dry_run=dry_run)
    request = source_request(
        ids=ids,
        ids_format=ids_format,
        query=query,
        inactive_days=inactive_days,
        health=health,
        os_platforms=os_platforms,
        tag=tag,
        group=group,
        names=names,
        hunting=hunting,
        journal=journal_path,
        stdin=stdin,
    )
    rules = exclusion_rules(
        file_cfg,
        exclude_tag=exclude_tag,
        exclude_group=exclude_group,
        exclude_id=exclude_id,
        exclude_name=exclude_name,
        preflight=preflight,
    )
    journal_or_temp = journal_path or Path(tempfile.gettempdir()) / "bulkoffboard-dry-run.jsonl"
    plan = new_plan(
        journal_path=journal_or_temp,
        source={
            "kind": request.kind,
            "path": str(
                request.path or journal_or_temp.with_name(journal_or_temp.name + ".targets")
            ),
            "format": request.fmt if request.kind in ("file", "stdin", "list") else "text",
            **dict(request.describe),
        },
        comment=text,
        workers=run_workers,
        limits=run_limits,
        conn=conn,
        margin_s=margin_s,
        header_extra=header_extra,
        mark=mark if mark is not None else _mark_setting(file_cfg),
        mark_run_id=mark_run_id or bool(file_cfg.get("mark_run_id", False)),
    )
    plan = _replace(
        plan,
        wait_deadline_s=wait_deadline if wait else None,
        wait_poll_s=poll_interval,
        budget=settings.budget_spec(budget, file_cfg, os.environ),
    )
    targets = Targets(
        request=request,
        rules=rules,
        max_machines=breaker,
        assume_yes=yes,
        dry_run=dry_run,
        dry_rows=dry_rows,
        confirm=confirm,
    )
    return await execute(plan, conn, targets, stop=stop, observer=observer)


def _mark_setting(file_cfg: Mapping[str, Any]) -> str | None:
    """The config file's ``mark`` (a tag), checked to be text."""
    value = file_cfg.get("mark")
    if value is None or isinstance(value, str):
        return value
    raise UsageError(f"config: mark must be a tag (text), not {value!r}")


def _absolute(path: PathArg) -> Path:
    return Path(path).expanduser().absolute()


def _replace(plan: Plan, **changes: Any) -> Plan:
    return Plan(**{**{name: getattr(plan, name) for name in Plan.__dataclass_fields__}, **changes})


async def resume(
    journal: PathArg,
    *,
    limits: Sequence[str] | None = None,
    workers: int | None = None,
    margin: float | None = None,
    connection: settings.Connection | None = None,
    config: PathArg | None = None,
    connection_overrides: Mapping[str, Any] | None = None,
    stop: asyncio.Event | None = None,
    observer: RunObserver | None = None,
    file_settings: Mapping[str, Any] | None = None,
    budget: str | None = None,
) -> Summary:
    """Continue a run from its journal (``bulkoffboard resume``): its source, comment and
    settings come from the journal; ``limits``, ``workers`` and ``margin`` may override.
    ``file_settings``: a config file's settings already read (one tenant's)."""
    file_cfg = dict(file_settings) if file_settings is not None else load_config(config)
    conn = connect(connection, file_cfg, connection_overrides)
    journal_path = _absolute(journal)
    plan = plan_resume(journal_path, list(limits) if limits else None, workers, file_cfg, margin)
    plan = _replace(plan, budget=settings.budget_spec(budget, file_cfg, os.environ))
    return await execute(plan, conn, stop=stop, observer=observer)


async def verify(
    journal: PathArg,
    *,
    until_final: bool = False,
    max_age: float | None = None,
    deadline: float = 6 * 3600.0,
    poll_interval: float = 60.0,
    limits: Sequence[str] | None = None,
    connection: settings.Connection | None = None,
    config: PathArg | None = None,
    connection_overrides: Mapping[str, Any] | None = None,
    stop: asyncio.Event | None = None,
    budget: str | None = None,
) -> VerifySummary:
    """Follow a journal's offboard actions and journal their status (``bulkoffboard
    verify``); ``limits`` as ``--limit`` (default: the read endpoints' own)."""
    file_cfg = load_config(config)
    conn = connect(connection, file_cfg, connection_overrides)
    read_limits = settings.parse_limits(list(limits), {}) if limits else READ_LIMITS
    verify_settings = VerifySettings(
        until_final=until_final,
        max_age_days=max_age,
        deadline_s=deadline if until_final else None,
        poll_base_s=poll_interval,
        poll_cap_s=max(poll_interval, 900.0),
    )
    journal_path = _absolute(journal)
    spec = settings.budget_spec(budget, file_cfg, os.environ)
    return await verify_journal(
        journal_path, conn, read_limits, verify_settings, stop=stop, budget=spec
    )


async def cancel(
    journal: PathArg,
    *,
    ids: PathArg | Iterable[str] | None = None,
    comment: str | None = None,
    dry_run: bool = False,
    max_machines: int | None = None,
    yes: bool = False,
    confirm: Callable[[int, str], bool] | None = None,
    limits: Sequence[str] | None = None,
    margin: float | None = None,
    workers: int | None = None,
    budget: str | None = None,
    connection: settings.Connection | None = None,
    config: PathArg | None = None,
    connection_overrides: Mapping[str, Any] | None = None,
    stop: asyncio.Event | None = None,
) -> CancelSummary:
    """Cancel the offboard actions the journal's run created that are not final yet, and
    take its marks off those machines (``bulkoffboard cancel``). ``ids``: only these machines
    (a file as ``--ids`` reads, or the ids). ``limits``: as ``--limit`` (default: the cancel
    endpoint's 100/60 and 1500/3600). ``dry_run``: check and say, send no cancel, write
    nothing. ``max_machines`` as for :func:`run`. Cancelling again retries only what did not
    settle."""
    file_cfg = load_config(config)
    conn = connect(connection, file_cfg, connection_overrides)
    journal_path = _absolute(journal)
    text = (comment or file_cfg.get("cancel_comment") or "cancelled by bulkoffboard").strip()
    if not text:
        raise UsageError("--comment must not be empty")
    if max_machines is not None and max_machines < 0:
        raise UsageError(f"--max-machines must not be negative, not {max_machines}")
    request = CancelRequest(
        comment=text,
        only=_machine_ids(ids) if ids is not None else None,
        dry_run=dry_run,
        max_machines=max_machines,
        assume_yes=yes,
        confirm=confirm,
        workers=check_workers(workers, file_cfg),
    )
    return await cancel_journal(
        journal_path,
        conn,
        settings.parse_limits(list(limits) if limits else None, {}),
        request,
        margin_s=check_margin(margin),
        stop=stop,
        budget=settings.budget_spec(budget, file_cfg, os.environ),
    )


def _machine_ids(ids: PathArg | Iterable[str]) -> frozenset[str]:
    """The machine ids of a file (any format ``--ids`` reads) or a list; a value that is not
    a machine id is refused, naming it (nothing is sent)."""
    pairs: Iterable[tuple[str, str, str | None]]
    if isinstance(ids, str | os.PathLike):
        pairs = ((r.where, r.raw, r.machine_id) for r in iter_records(_absolute(ids), "auto"))
    else:
        pairs = ((f"ids[{n}]", raw, normalize_machine_id(raw)) for n, raw in enumerate(ids))
    found: set[str] = set()
    for where, raw, machine_id in pairs:
        if machine_id is None:
            raise UsageError(f"{where}: {describe_invalid(raw)} is not a machine id")
        found.add(machine_id)
    return frozenset(found)


async def check(
    *,
    connection: settings.Connection | None = None,
    config: PathArg | None = None,
    connection_overrides: Mapping[str, Any] | None = None,
) -> CheckResult:
    """Is this app registration ready (``bulkoffboard check``)? A token, its roles, one
    cheap read."""
    conn = connect(connection, load_config(config), connection_overrides)
    return await check_connection(conn)


def report(journal: PathArg, format: ReportFormat = "table") -> str:
    """A report of the journal (``bulkoffboard report``): ``table``, ``csv``, ``json``,
    ``jsonl``, ``markdown`` or ``html``; a pure function of the journal file."""
    if format not in reports.RENDERERS:
        raise UsageError(
            f"report format {format!r}: choose one of {', '.join(sorted(reports.RENDERERS))}"
        )
    return reports.render_file(Path(journal).expanduser(), format)


def report_history(
    journals: Iterable[PathArg] = (),
    journal_dir: PathArg | None = None,
    format: ReportFormat = "table",
) -> str:
    """The history of many runs (``bulkoffboard report --journals/--journal-dir``): the
    journals matching the globs ``journals`` and every journal under ``journal_dir``
    (recursive), as ``table``, ``csv``, ``jsonl``, ``json``, ``markdown`` or ``html``."""
    from bulkoffboard import history as history_  # noqa: PLC0415 - only history reads it

    folder = Path(journal_dir) if journal_dir is not None else None
    return history_.report([str(j) for j in journals], folder, format)


def export_journals(
    journal_dir: PathArg | None = None,
    db: str | None = None,
    *,
    journals: Iterable[PathArg] = (),
) -> ExportSummary:
    """Export journals to a database (``bulkoffboard export``): SQLite by default
    (``sqlite:///history.db``) or ``postgresql://...``; idempotent and incremental."""
    from bulkoffboard import export as export_  # noqa: PLC0415 - SQLAlchemy only for this

    folder = Path(journal_dir) if journal_dir is not None else None
    return export_.export([str(j) for j in journals], folder, db)


__all__ = [
    "check",
    "connect",
    "export_journals",
    "load_config",
    "report",
    "report_history",
    "resume",
    "run",
    "run_with",
    "verify",
]
