"""Export journals to a database: normalised tables a BI tool can join, kept up to date.

``bulkoffboard export --journal-dir DIR --db URL`` reads every journal under ``DIR`` (run
directories included) into SQLite (the embedded default, ``sqlite:///history.db``) or
PostgreSQL (``postgresql://user@host/db``, through psycopg 3), with SQLAlchemy Core: the same
tables on both, no dialect SQL of ours but the one view.

Tables (every event table has ``run_id`` and ``line``, the journal line it came from, unique
together; ``machine_id`` is the 40-hex id; times are UTC):

- ``runs``: a row a journal's header (``run_id`` is the key): tenant, source, comment, ...
- ``sessions``, ``attempts``, ``results``, ``statuses``, ``cancels``, ``tags``: a row a
  record of that type (``tags``: a row a machine of the tag call);
- ``journals``: the bookkeeping: path, the SHA-256 of the header line, how many bytes and
  lines were read;
- the view ``machine_latest``: one row a machine, its latest result over every run and the
  latest known status of that result's action (``status`` records and cancels).

Idempotent and incremental: each journal's export reads from where the last one stopped (only
whole lines: a line a run is still writing waits for the next export) and commits its rows and
its new bookkeeping in one transaction, so an export that dies adds nothing half. A journal
whose header line changed, or that shrank, was replaced: its old rows are deleted and it is
read again. A journal that is a copy of one exported from another path (same ``run_id``) is
skipped and said so.

A database password never reaches an error, a log or the summary: URLs are shown with
``***``. TLS to a PostgreSQL server that is not on this host is verified
(``sslmode=verify-full`` against the system's CAs) unless the URL says otherwise.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from bulkoffboard.errors import UsageError
from bulkoffboard.history import find_journals
from bulkoffboard.journal import parse_iso, read_header
from bulkoffboard.logs import redact_text

#: The database when ``--db`` is not given: a SQLite file in the current folder.
DEFAULT_DB = "sqlite:///history.db"
#: A database password kept out of the URL (``--db postgresql://user@host/db``).
PASSWORD_ENV = "BULKOFFBOARD_DB_PASSWORD"  # noqa: S105 - the name of a variable
#: Rows sent to the database at once.
_BATCH = 5000


class ExportError(UsageError):
    """The database could not be reached or written (exit 2, one line; the journals are
    untouched and the database keeps every journal's last whole export)."""


@dataclass(slots=True)
class ExportSummary:
    """What one export did."""

    database: str
    journals: int = 0
    new: int = 0
    grown: int = 0
    replaced: int = 0
    unchanged: int = 0
    copies: list[str] = field(default_factory=list)
    lines: int = 0
    rows: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "journals": self.journals,
            "new": self.new,
            "grown": self.grown,
            "replaced": self.replaced,
            "unchanged": self.unchanged,
            "copies_skipped": self.copies,
            "lines": self.lines,
            "rows": dict(sorted(self.rows.items())),
        }


# -- the database URL ------------------------------------------------------------------------------


def database_url(text: str | None, env: dict[str, str] | None = None) -> sa.URL:
    """``--db`` as a SQLAlchemy URL: ``sqlite:///PATH``, or ``postgresql://...`` (psycopg 3);
    the password from :data:`PASSWORD_ENV` when the URL has none; TLS verified for a
    PostgreSQL server off this host unless the URL chooses ``sslmode``."""
    environ = os.environ if env is None else env
    raw = text or DEFAULT_DB
    try:
        url = sa.make_url(raw)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise UsageError(
            f"--db {redact_text(raw)}: not a database URL (sqlite:///history.db or "
            "postgresql://user@host/database)"
        ) from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if url.drivername != "sqlite":
            raise UsageError(f"--db {shown(url)}: use plain sqlite:///PATH")
        return url
    if backend not in ("postgresql", "postgres"):
        raise UsageError(
            f"--db {shown(url)}: bulkoffboard exports to SQLite or PostgreSQL, not {backend}"
        )
    url = url.set(drivername="postgresql+psycopg")
    if url.password is None and environ.get(PASSWORD_ENV):
        url = url.set(password=environ[PASSWORD_ENV])
    if "sslmode" not in url.query and not _local(url.host):
        url = url.update_query_dict({"sslmode": "verify-full", "sslrootcert": "system"})
    return url


def _local(host: str | None) -> bool:
    """A Unix socket (no host, or a path) or a loopback address."""
    if not host or host.startswith("/") or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def shown(url: sa.URL) -> str:
    """The URL as it may be shown: the password as ``***``."""
    return url.render_as_string(hide_password=True)


# -- the schema ------------------------------------------------------------------------------------


def _schema() -> tuple[sa.MetaData, dict[str, sa.Table]]:
    meta = sa.MetaData()
    when = sa.DateTime(timezone=True)
    text = sa.Text

    def events(
        name: str,
        *columns: sa.Column[Any],
        index_machine: bool = True,
        unique: tuple[str, ...] = ("run_id", "line"),
    ) -> sa.Table:
        table = sa.Table(
            name,
            meta,
            sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
            sa.Column("run_id", text, sa.ForeignKey("runs.run_id"), nullable=False),
            sa.Column("line", sa.Integer, nullable=False),
            *columns,
            sa.UniqueConstraint(*unique, name=f"uq_{name}_line"),
        )
        if index_machine:
            sa.Index(f"ix_{name}_machine", table.c.machine_id, table.c.at)
        return table

    runs = sa.Table(
        "runs",
        meta,
        sa.Column("run_id", text, primary_key=True),
        sa.Column("created_at", when, index=True),
        sa.Column("tenant_id", text, index=True),
        sa.Column("tenant_name", text),
        sa.Column("client_id", text),
        sa.Column("api_url", text),
        sa.Column("run_dir", text),
        sa.Column("source_kind", text),
        sa.Column("source_path", text),
        sa.Column("source_filter", text),
        sa.Column("comment", text),
        sa.Column("mark", text),
        sa.Column("workers", sa.Integer),
        sa.Column("tool_version", text),
    )
    journals = sa.Table(
        "journals",
        meta,
        sa.Column("path", text, primary_key=True),
        sa.Column("run_id", text, sa.ForeignKey("runs.run_id"), nullable=False, index=True),
        sa.Column("header_sha256", sa.String(64), nullable=False),
        sa.Column("bytes_read", sa.BigInteger, nullable=False),
        sa.Column("lines_read", sa.Integer, nullable=False),
        sa.Column("exported_at", when, nullable=False),
    )
    sessions = events(
        "sessions",
        sa.Column("at", when),
        sa.Column("command", text),
        sa.Column("pid", sa.Integer),
        sa.Column("budget", text),
        sa.Column("tool_version", text),
        index_machine=False,
    )
    attempts = events(
        "attempts",
        sa.Column("machine_id", sa.String(40), nullable=False),
        sa.Column("attempt", sa.Integer),
        sa.Column("at", when),
    )
    results = events(
        "results",
        sa.Column("machine_id", sa.String(40)),
        sa.Column("outcome", text, nullable=False, index=True),
        sa.Column("action_id", text, index=True),
        sa.Column("action_status", text),
        sa.Column("http_status", sa.Integer),
        sa.Column("error_code", text),
        sa.Column("message", text),
        sa.Column("attempts", sa.Integer),
        sa.Column("at", when),
        sa.Column("input_where", text),
        sa.Column("input", text),
    )
    statuses = events(
        "statuses",
        sa.Column("machine_id", sa.String(40), nullable=False),
        sa.Column("action_id", text, index=True),
        sa.Column("action_status", text, nullable=False),
        sa.Column("at", when),
    )
    cancels = events(
        "cancels",
        sa.Column("machine_id", sa.String(40), nullable=False),
        sa.Column("stage", text, nullable=False),
        sa.Column("action_id", text),
        sa.Column("attempt", sa.Integer),
        sa.Column("outcome", text),
        sa.Column("action_status", text),
        sa.Column("http_status", sa.Integer),
        sa.Column("error_code", text),
        sa.Column("message", text),
        sa.Column("at", when),
    )
    tags = events(
        "tags",
        sa.Column("machine_id", sa.String(40), nullable=False),
        sa.Column("stage", text, nullable=False),
        sa.Column("action", text, nullable=False),
        sa.Column("value", text, nullable=False),
        sa.Column("outcome", text),
        sa.Column("http_status", sa.Integer),
        sa.Column("at", when),
        unique=("run_id", "line", "machine_id"),  # a row a machine of the call
    )
    tables = {
        t.name: t for t in (runs, journals, sessions, attempts, results, statuses, cancels, tags)
    }
    return meta, tables


#: One row a machine: its latest result over every run (by time, then journal line) and the
#: latest known status of that result's action (a ``status`` record, or a cancel's result).
VIEW = """
CREATE VIEW machine_latest AS
WITH latest AS (
    SELECT r.*, ROW_NUMBER() OVER (
        PARTITION BY r.machine_id ORDER BY r.at DESC, r.run_id DESC, r.line DESC
    ) AS n
    FROM results r WHERE r.machine_id IS NOT NULL
),
seen AS (
    SELECT machine_id, action_id, action_status, at, run_id, line FROM statuses
    UNION ALL
    SELECT machine_id, action_id, action_status, at, run_id, line FROM cancels
    WHERE stage = 'result' AND action_status IS NOT NULL
),
seen_latest AS (
    SELECT s.*, ROW_NUMBER() OVER (
        PARTITION BY s.machine_id, s.action_id ORDER BY s.at DESC, s.line DESC
    ) AS n
    FROM seen s
)
SELECT
    latest.machine_id,
    runs.tenant_id,
    runs.tenant_name,
    latest.run_id,
    runs.created_at AS run_created_at,
    latest.outcome,
    latest.action_id,
    COALESCE(seen_latest.action_status, latest.action_status) AS action_status,
    COALESCE(seen_latest.at, latest.at) AS action_status_at,
    latest.at AS result_at
FROM latest
JOIN runs ON runs.run_id = latest.run_id
LEFT JOIN seen_latest
    ON seen_latest.machine_id = latest.machine_id
    AND seen_latest.action_id = latest.action_id
    AND seen_latest.n = 1
WHERE latest.n = 1
"""


# -- the export ------------------------------------------------------------------------------------


def export(
    journals: Sequence[str] = (),
    journal_dir: str | Path | None = None,
    db: str | None = None,
    *,
    env: dict[str, str] | None = None,
) -> ExportSummary:
    """Export the journals found (see :func:`bulkoffboard.history.find_journals`) to ``db``."""
    url = database_url(db, env)
    paths = find_journals(journals, journal_dir, required=True)
    if url.get_backend_name() == "sqlite" and url.database:
        folder = Path(url.database).expanduser().absolute().parent
        if not folder.is_dir():
            raise UsageError(f"--db {shown(url)}: the folder {folder} does not exist")
    summary = ExportSummary(shown(url))
    meta, tables = _schema()
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            meta.create_all(conn)
            if not sa.inspect(conn).has_table("machine_latest") and "machine_latest" not in (
                sa.inspect(conn).get_view_names()
            ):
                conn.execute(sa.text(VIEW))
        for path in paths:
            with engine.begin() as conn:
                _export_one(conn, tables, path, summary)
    except SQLAlchemyError as exc:
        raise ExportError(f"database {shown(url)}: {_reason(exc, url)}") from None
    finally:
        engine.dispose()
    return summary


def _reason(exc: BaseException, url: sa.URL) -> str:
    """The database's own words, one line, with no password in them."""
    cause = getattr(exc, "orig", None) or exc
    text = " ".join(str(cause).split("\n")[0].split())
    if url.password:
        text = text.replace(str(url.password), "***")
    return redact_text(text)[:300] or type(cause).__name__


def _export_one(
    conn: sa.Connection, tables: dict[str, sa.Table], path: Path, summary: ExportSummary
) -> None:
    summary.journals += 1
    journals = tables["journals"]
    header = read_header(path)  # checked: a journal's header, or a JournalError naming it
    run_id = str(header.get("run_id") or "")
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        first = handle.readline()
        digest = hashlib.sha256(first).hexdigest()
        size = os.fstat(handle.fileno()).st_size
        known = conn.execute(sa.select(journals).where(journals.c.path == str(path))).first()
        if known is not None and known.header_sha256 == digest and size >= known.bytes_read:
            state, start, line = "grown", int(known.bytes_read), int(known.lines_read)
        else:
            state = "new"
            if known is not None:  # replaced (a new header) or cut short: read it again
                _forget(conn, tables, str(known.run_id))
                state = "replaced"
            other = conn.execute(
                sa.select(journals.c.path).where(journals.c.run_id == run_id)
            ).first()
            if other is not None:
                summary.copies.append(str(path))
                return  # the same run exported from another path: a copy, counted once
            conn.execute(tables["runs"].insert(), [_run_row(header)])
            start, line = len(first), 1
        handle.seek(start)
        first_line = line
        batches: dict[str, list[dict[str, Any]]] = {}
        read = start
        for raw in handle:
            if not raw.endswith(b"\n"):
                break  # a line still being written: the next export takes it
            line += 1
            read += len(raw)
            if raw.strip(b"\x00 \t\r\n"):
                _rows(_record(raw, path, line), run_id, line, batches)
            for name, rows in batches.items():
                if len(rows) >= _BATCH:
                    _flush(conn, tables, name, rows, summary)
        for name, rows in batches.items():
            _flush(conn, tables, name, rows, summary)
    summary.lines += line - first_line
    if state == "grown" and line == first_line:
        state = "unchanged"
    setattr(summary, state, getattr(summary, state) + 1)
    values = {
        "run_id": run_id,
        "header_sha256": digest,
        "bytes_read": read,
        "lines_read": line,
        "exported_at": datetime.now(UTC),
    }
    if state in ("new", "replaced"):
        conn.execute(journals.insert(), [{"path": str(path), **values}])
    else:
        conn.execute(journals.update().where(journals.c.path == str(path)).values(**values))


def _forget(conn: sa.Connection, tables: dict[str, sa.Table], run_id: str) -> None:
    """Delete every row of a run (its journal was replaced)."""
    for name in ("sessions", "attempts", "results", "statuses", "cancels", "tags"):
        table = tables[name]
        conn.execute(table.delete().where(table.c.run_id == run_id))
    journals = tables["journals"]
    conn.execute(journals.delete().where(journals.c.run_id == run_id))
    runs = tables["runs"]
    conn.execute(runs.delete().where(runs.c.run_id == run_id))


def _flush(
    conn: sa.Connection,
    tables: dict[str, sa.Table],
    name: str,
    rows: list[dict[str, Any]],
    summary: ExportSummary,
) -> None:
    if rows:
        conn.execute(tables[name].insert(), rows)
        summary.rows[name] = summary.rows.get(name, 0) + len(rows)
        rows.clear()


def _record(raw: bytes, path: Path, line: int) -> dict[str, Any]:
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UsageError(f"{path}:{line}: not a journal record (not JSON)") from None
    if not isinstance(record, dict):
        raise UsageError(f"{path}:{line}: not a journal record")
    return record


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return parse_iso(value).astimezone(UTC)
    except ValueError:
        return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _run_row(header: dict[str, Any]) -> dict[str, Any]:
    source = header.get("source") if isinstance(header.get("source"), dict) else {}
    assert isinstance(source, dict)  # noqa: S101 - for the type checker
    return {
        "run_id": str(header.get("run_id") or ""),
        "created_at": _when(header.get("created_at")),
        "tenant_id": _str(header.get("tenant_id")),
        "tenant_name": _str(header.get("tenant_name")),
        "client_id": _str(header.get("client_id")),
        "api_url": _str(header.get("api_url")),
        "run_dir": _str(header.get("run_dir")),
        "source_kind": _str(source.get("kind")),
        "source_path": _str(source.get("path")),
        "source_filter": _str(source.get("filter")),
        "comment": _str(header.get("comment")),
        "mark": _str(header.get("mark")),
        "workers": _int(header.get("workers")),
        "tool_version": _str(header.get("tool_version")),
    }


def _rows(
    record: dict[str, Any], run_id: str, line: int, batches: dict[str, list[dict[str, Any]]]
) -> None:
    """The rows of one record, added to ``batches`` (table -> rows)."""
    kind = record.get("type")
    at = _when(record.get("at"))
    base = {"run_id": run_id, "line": line, "at": at}
    machine = _str(record.get("machine_id"))
    if kind == "session":
        batches.setdefault("sessions", []).append(
            base
            | {
                "command": _str(record.get("command")),
                "pid": _int(record.get("pid")),
                "budget": _str(record.get("budget")),
                "tool_version": _str(record.get("tool_version")),
            }
        )
    elif kind == "attempt" and machine:
        batches.setdefault("attempts", []).append(
            base | {"machine_id": machine, "attempt": _int(record.get("attempt"))}
        )
    elif kind == "result":
        batches.setdefault("results", []).append(
            base
            | {
                "machine_id": machine,
                "outcome": str(record.get("outcome") or ""),
                "action_id": _str(record.get("action_id")),
                "action_status": _str(record.get("action_status")),
                "http_status": _int(record.get("http_status")),
                "error_code": _str(record.get("error_code")),
                "message": _str(record.get("message")),
                "attempts": _int(record.get("attempts")),
                "input_where": _str(record.get("where")),
                "input": _str(record.get("input")),
            }
        )
    elif kind == "status" and machine and _str(record.get("action_status")):
        batches.setdefault("statuses", []).append(
            base
            | {
                "machine_id": machine,
                "action_id": _str(record.get("action_id")),
                "action_status": record["action_status"],
            }
        )
    elif kind == "cancel" and machine and _str(record.get("stage")):
        batches.setdefault("cancels", []).append(
            base
            | {
                "machine_id": machine,
                "stage": record["stage"],
                "action_id": _str(record.get("action_id")),
                "attempt": _int(record.get("attempt")),
                "outcome": _str(record.get("outcome")),
                "action_status": _str(record.get("action_status")),
                "http_status": _int(record.get("http_status")),
                "error_code": _str(record.get("error_code")),
                "message": _str(record.get("message")),
            }
        )
    elif kind == "tag" and isinstance(record.get("machine_ids"), list):
        for tagged in dict.fromkeys(m for m in record["machine_ids"] if isinstance(m, str)):
            batches.setdefault("tags", []).append(
                base
                | {
                    "machine_id": tagged,
                    "stage": str(record.get("stage") or ""),
                    "action": str(record.get("action") or ""),
                    "value": str(record.get("value") or ""),
                    "outcome": _str(record.get("outcome")),
                    "http_status": _int(record.get("http_status")),
                }
            )


def iter_summary_lines(summary: ExportSummary) -> Iterator[str]:
    """The export's summary for a terminal."""
    yield (
        f"exported {summary.journals} journals to {summary.database}: {summary.new} new, "
        f"{summary.grown} grown, {summary.replaced} replaced, {summary.unchanged} unchanged"
    )
    if summary.copies:
        yield f"skipped {len(summary.copies)} copies of journals exported from another path"
    added = ", ".join(f"{n:,} {t}" for t, n in sorted(summary.rows.items())) or "nothing"
    yield f"{summary.lines:,} new lines: {added}"


__all__ = [
    "DEFAULT_DB",
    "PASSWORD_ENV",
    "VIEW",
    "ExportError",
    "ExportSummary",
    "database_url",
    "export",
    "iter_summary_lines",
    "shown",
]
