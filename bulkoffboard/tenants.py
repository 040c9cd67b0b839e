"""Many tenants in one process: the same job in every tenant of a tenants file, side by side.

A managed security provider's multi-tenant app registration is consented in each customer's
tenant; the API's limits are per app and per tenant, so tenants run concurrently at full
speed. Each tenant gets its own connection (its own authority and token), its own throttles,
plan, preflight, exclusions and breaker, and its own journal ``<run dir>/<name>.jsonl`` in
format 1 (its header names the tenant and the run directory): everything a single run
promises holds per tenant. One tenant's trouble (a wrong tenant id, no consent, every call
forbidden, the breaker, a locked journal) is that tenant's result and never stops the others.

The run directory keeps a copy of the tenants file (``tenants.toml``), so ``resume``,
``verify`` and ``report`` of the directory know its tenants and their settings.

The tenants share one pool of at most 256 HTTPS connections
(:func:`bulkoffboard.connections.shared_connections`): 500 tenants starting at once would otherwise
hold thousands of TLS connections (about 3 MB a tenant).

The exit code over tenants is the most serious of theirs, in the order 130 > 3 > 2 > 1 > 0.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from bulkoffboard import api, config
from bulkoffboard.cancel import CancelSummary
from bulkoffboard.connections import shared_connections
from bulkoffboard.errors import AuthError, BulkOffboardError, JournalError, UsageError
from bulkoffboard.jobs import RunObserver
from bulkoffboard.runner import ExitCode, Summary
from bulkoffboard.verify import VerifySummary

log = structlog.get_logger("bulkoffboard.tenants")

#: The copy of the tenants file a run directory keeps.
TENANTS_FILE = "tenants.toml"
#: Exit codes from the most serious down (the run's code is its tenants' most serious).
SEVERITY = (
    ExitCode.INTERRUPTED,
    ExitCode.AUTH,
    ExitCode.USAGE,
    ExitCode.SOME_FAILED,
    ExitCode.OK,
)

#: ``observers(name)``: the observer of one tenant's session (None: none).
Observers = Callable[[str], RunObserver | None]


def most_serious(codes: Iterable[int]) -> ExitCode:
    """The most serious of ``codes`` (130 > 3 > 2 > 1 > 0); 0 for none."""
    found = {int(code) for code in codes}
    for code in SEVERITY:
        if int(code) in found:
            return code
    return ExitCode.SOME_FAILED if found else ExitCode.OK


@dataclass(slots=True)
class TenantResult:
    """What one tenant's job ended with."""

    name: str
    exit_code: ExitCode
    reason: str
    journal: Path
    #: The job's summary; None when it ended in an error before it had one.
    summary: Summary | VerifySummary | CancelSummary | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view: the summary's fields, the exit code and the reason."""
        data = self.summary.as_dict() if self.summary is not None else {}
        return data | {
            "exit_code": int(self.exit_code),
            "reason": self.reason,
            "journal": str(self.journal),
        }


@dataclass(slots=True)
class TenantsSummary:
    """Every tenant's result, and the whole run's."""

    run_dir: Path
    tenants: list[TenantResult] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        """The most serious exit code over the tenants."""
        return most_serious(t.exit_code for t in self.tenants)

    @property
    def counts(self) -> collections.Counter[str]:
        """Machines by outcome over every tenant's journal (run and resume summaries), or
        by this cancel's outcome (cancel summaries)."""
        total: collections.Counter[str] = collections.Counter()
        for tenant in self.tenants:
            if isinstance(tenant.summary, Summary | CancelSummary):
                total.update({k: n for k, n in tenant.summary.counts.items() if n})
        return total

    def as_dict(self) -> dict[str, Any]:
        """One summary per tenant and the totals (``--summary-json``)."""
        counts = self.counts
        return {
            "run_dir": str(self.run_dir),
            "exit_code": int(self.exit_code),
            "tenants": {t.name: t.as_dict() for t in self.tenants},
            "total": {
                "tenants": len(self.tenants),
                "counts": dict(sorted(counts.items())),
                "machines": sum(counts.values()),
                "exit_codes": dict(
                    sorted(collections.Counter(str(int(t.exit_code)) for t in self.tenants).items())
                ),
            },
        }


def select(
    tenants: Sequence[config.TenantSettings], only: Iterable[str] | None
) -> list[config.TenantSettings]:
    """The tenants named by ``--tenant`` (all when none is); an unknown name is an error."""
    wanted = list(only or ())
    if not wanted:
        return list(tenants)
    known = {t.name: t for t in tenants}
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise UsageError(
            f"--tenant {unknown[0]!r} is not in the tenants file (its tenants: {', '.join(known)})"
        )
    return [t for t in tenants if t.name in set(wanted)]


def tenant_connection(
    tenant: config.TenantSettings,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> config.Connection:
    """The tenant's connection: its own settings over the environment (its tenant id, its
    cloud, its own secret file or certificate), the flags over both."""
    source = os.environ if env is None else env
    return config.connection(tenant.environment(source), dict(tenant.settings), overrides)


def _absolute(path: api.PathArg) -> Path:
    return Path(path).expanduser().absolute()


def journal_of(run_dir: Path, name: str) -> Path:
    """A tenant's journal in a run directory."""
    return run_dir / f"{name}.jsonl"


def read_run_dir(run_dir: Path) -> tuple[config.TenantSettings, ...]:
    """The tenants of a run directory (from the copy of the tenants file it keeps)."""
    copy = run_dir / TENANTS_FILE
    if not copy.is_file():
        raise UsageError(
            f"{run_dir} is not a run directory of a tenants run (no {TENANTS_FILE} in it)"
        )
    return config.load_tenants(copy)


async def _guarded(
    name: str,
    journal: Path,
    work: Callable[[], Awaitable[Summary | VerifySummary | CancelSummary]],
) -> TenantResult:
    """Run one tenant's job; its errors become its result (the others go on)."""
    try:
        summary = await work()
    except AuthError as exc:
        code, reason = ExitCode.AUTH, str(exc)
    except (UsageError, JournalError) as exc:
        code, reason = ExitCode.USAGE, str(exc)
    except BulkOffboardError as exc:
        code, reason = ExitCode.SOME_FAILED, str(exc)
    else:
        return TenantResult(
            name, ExitCode(int(summary.exit_code)), summary.reason, journal, summary
        )
    log.error("tenant.failed", tenant=name, exit_code=int(code), reason=reason)
    return TenantResult(name, code, reason, journal)


def _prepare_run_dir(tenants_file: Path, run_dir: Path) -> None:
    """Create the run directory and keep the tenants file in it; a run directory of another
    tenants file is refused (its journals belong to those tenants)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the run directory {run_dir}: {exc.strerror}") from None
    copy = run_dir / TENANTS_FILE
    data = tenants_file.read_bytes()
    if copy.exists():
        if copy.read_bytes() != data:
            raise UsageError(
                f"{run_dir} holds the run of another tenants file ({copy} differs from "
                f"{tenants_file}): choose a new run directory"
            )
        return
    temp = copy.with_name(copy.name + ".tmp")
    temp.write_bytes(data)
    temp.replace(copy)


async def run_tenants(
    tenants_file: api.PathArg,
    run_dir: api.PathArg,
    *,
    only: Iterable[str] | None = None,
    query: str | None = None,
    inactive_days: float | None = None,
    health: api.Many | None = None,
    os_platforms: api.Many | None = None,
    tag: api.Many | None = None,
    group: api.Many | None = None,
    names: api.PathArg | None = None,
    hunting: str | None = None,
    connection_overrides: Mapping[str, Any] | None = None,
    stop: asyncio.Event | None = None,
    observers: Observers | None = None,
    **options: Any,
) -> TenantsSummary:
    """Run the same job in every tenant of ``tenants_file`` (or those named in ``only``),
    side by side; journals go to ``run_dir``. A tenant with its own ``ids`` reads them; the
    others take the source given here (``query`` and presets, ``names`` or ``hunting``),
    resolved in their own tenant. ``options``: :func:`bulkoffboard.api.run_with`'s other
    keyword arguments (``comment``, ``limits``, ``dry_run``, ``max_machines``, ``yes``, ...),
    for every tenant. A problem with the tenants file itself raises
    :class:`~bulkoffboard.errors.UsageError` before anything is sent."""
    path, folder = _absolute(tenants_file), _absolute(run_dir)
    chosen = select(config.load_tenants(path), only)
    source: dict[str, Any] = {
        "query": query,
        "inactive_days": inactive_days,
        "health": health,
        "os_platforms": os_platforms,
        "tag": tag,
        "group": group,
        "names": names,
        "hunting": hunting,
    }
    given = any(value not in (None, [], (), "") for value in source.values())
    for tenant in chosen:
        if tenant.ids is not None and given:
            raise UsageError(
                f"tenant {tenant.name!r} has its own ids in {path}: give no source on the "
                "command line, or remove its ids"
            )
        if tenant.ids is None and not given:
            raise UsageError(
                f"tenant {tenant.name!r} has no ids in {path}: give a source (--query, a "
                "preset such as --inactive-days, --names or --hunting)"
            )
    if not options.get("dry_run"):
        _prepare_run_dir(path, folder)

    def job(tenant: config.TenantSettings) -> Callable[[], Awaitable[Summary]]:
        async def work() -> Summary:
            conn = tenant_connection(tenant, connection_overrides)
            return await api.run_with(
                tenant.settings,
                conn,
                ids=tenant.ids,
                journal=journal_of(folder, tenant.name),
                **({} if tenant.ids is not None else source),
                stop=stop,
                observer=observers(tenant.name) if observers is not None else None,
                header_extra={"tenant_name": tenant.name, "run_dir": str(folder)},
                **options,
            )

        return work

    async with shared_connections():
        results = await asyncio.gather(
            *(_guarded(t.name, journal_of(folder, t.name), job(t)) for t in chosen)
        )
    return TenantsSummary(folder, list(results))


async def resume_tenants(
    run_dir: api.PathArg,
    *,
    only: Iterable[str] | None = None,
    limits: Sequence[str] | None = None,
    workers: int | None = None,
    margin: float | None = None,
    budget: str | None = None,
    connection_overrides: Mapping[str, Any] | None = None,
    stop: asyncio.Event | None = None,
    observers: Observers | None = None,
) -> TenantsSummary:
    """Resume every tenant's journal of a run directory, side by side (a tenant whose run
    never made a journal is reported as a usage error: run it again with ``--tenant``)."""
    folder = _absolute(run_dir)
    chosen = select(read_run_dir(folder), only)

    def job(tenant: config.TenantSettings) -> Callable[[], Awaitable[Summary]]:
        async def work() -> Summary:
            journal = journal_of(folder, tenant.name)
            if not journal.is_file():
                raise UsageError(
                    f"tenant {tenant.name!r} has no journal in {folder} (its run never "
                    f"started): run it again with --tenant {tenant.name}"
                )
            return await api.resume(
                journal,
                limits=limits,
                workers=workers,
                margin=margin,
                connection=tenant_connection(tenant, connection_overrides),
                file_settings=tenant.settings,
                budget=budget,
                stop=stop,
                observer=observers(tenant.name) if observers is not None else None,
            )

        return work

    async with shared_connections():
        results = await asyncio.gather(
            *(_guarded(t.name, journal_of(folder, t.name), job(t)) for t in chosen)
        )
    return TenantsSummary(folder, list(results))


async def verify_tenants(
    run_dir: api.PathArg,
    *,
    only: Iterable[str] | None = None,
    connection_overrides: Mapping[str, Any] | None = None,
    stop: asyncio.Event | None = None,
    **options: Any,
) -> TenantsSummary:
    """Verify every tenant's journal of a run directory, side by side; ``options`` as
    :func:`bulkoffboard.api.verify`'s (``until_final``, ``deadline``, ...)."""

    async def one(journal: Path, conn: config.Connection) -> VerifySummary:
        return await api.verify(journal, connection=conn, stop=stop, **options)

    return await _each_journal(run_dir, only, connection_overrides, one)


async def cancel_tenants(
    run_dir: api.PathArg,
    *,
    only: Iterable[str] | None = None,
    connection_overrides: Mapping[str, Any] | None = None,
    stop: asyncio.Event | None = None,
    **options: Any,
) -> TenantsSummary:
    """Cancel every tenant's open offboards of a run directory, side by side; ``options``
    as :func:`bulkoffboard.api.cancel`'s (``ids``, ``dry_run``, ``comment``, ...)."""

    async def one(journal: Path, conn: config.Connection) -> CancelSummary:
        return await api.cancel(journal, connection=conn, stop=stop, **options)

    return await _each_journal(run_dir, only, connection_overrides, one)


async def _each_journal(
    run_dir: api.PathArg,
    only: Iterable[str] | None,
    connection_overrides: Mapping[str, Any] | None,
    job: Callable[[Path, config.Connection], Awaitable[Summary | VerifySummary | CancelSummary]],
) -> TenantsSummary:
    """``job`` on each chosen tenant's journal with its own connection, side by side."""
    folder = _absolute(run_dir)
    chosen = select(read_run_dir(folder), only)

    def work(tenant: config.TenantSettings) -> Callable[[], Awaitable[Any]]:
        async def run() -> Summary | VerifySummary | CancelSummary:
            journal = journal_of(folder, tenant.name)
            if not journal.is_file():
                raise UsageError(f"tenant {tenant.name!r} has no journal in {folder}")
            return await job(journal, tenant_connection(tenant, connection_overrides))

        return run

    async with shared_connections():
        results = await asyncio.gather(
            *(_guarded(t.name, journal_of(folder, t.name), work(t)) for t in chosen)
        )
    return TenantsSummary(folder, list(results))


def journals_of(run_dir: api.PathArg, only: Iterable[str] | None = None) -> list[tuple[str, Path]]:
    """(tenant name, journal) of a run directory's tenants that have a journal, in the
    tenants file's order."""
    folder = _absolute(run_dir)
    chosen = select(read_run_dir(folder), only)
    return [
        (t.name, journal_of(folder, t.name)) for t in chosen if journal_of(folder, t.name).is_file()
    ]


__all__ = [
    "TENANTS_FILE",
    "TenantResult",
    "TenantsSummary",
    "cancel_tenants",
    "journals_of",
    "most_serious",
    "resume_tenants",
    "run_tenants",
    "select",
    "tenant_connection",
    "verify_tenants",
]
