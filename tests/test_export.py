"""``bulkoffboard export``: journals into SQLite and a real PostgreSQL server.

The journals are the three nights of ``tests/test_history.py``. PostgreSQL is the Debian
package, started by this module on a loopback port with password authentication (as the
``postgres`` user when the tests run as root, as CI does); without it the PostgreSQL tests
skip loudly, and fail under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from bulkoffboard import export
from bulkoffboard.cli import main
from bulkoffboard.errors import UsageError
from bulkoffboard.journal import Journal
from tests.test_history import A, M, at, header, nights, offboarded, status, write

__all__ = ["nights"]  # the fixture, imported for this module's tests

PG_PASSWORD = "s3cret-Pg-Pa55"  # a throwaway test server's
#: The README's query (the SQLite and the PostgreSQL spelling of "this month" both become a
#: parameter here, so the result does not depend on today's date).
STILL_PENDING = """
SELECT machine_id, tenant_name, action_id, result_at
FROM machine_latest
WHERE outcome = 'offboarded' AND action_status = 'Pending' AND result_at >= :month
ORDER BY result_at
"""


def table_counts(url: str) -> dict[str, int]:
    engine = sa.create_engine(export.database_url(url))
    try:
        with engine.connect() as conn:
            names = ("runs", "journals", "sessions", "attempts", "results", "statuses")
            return {
                name: int(conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar_one())  # noqa: S608
                for name in (*names, "cancels", "tags", "machine_latest")
            }
    finally:
        engine.dispose()


def query(url: str, sql: str, **params: Any) -> list[dict[str, Any]]:
    engine = sa.create_engine(export.database_url(url))
    try:
        with engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(sa.text(sql), params)]
    finally:
        engine.dispose()


def latest(url: str) -> dict[str, tuple[Any, ...]]:
    rows = query(url, "SELECT * FROM machine_latest")
    return {
        r["machine_id"]: (r["outcome"], r["action_id"], r["action_status"], r["tenant_name"])
        for r in rows
    }


EXPECTED_LATEST = {
    M[0]: ("offboarded", A[10], "Pending", None),  # night 2's action, never verified
    M[1]: ("offboarded", A[1], "Succeeded", None),  # verify saw it succeed
    M[2]: ("offboarded", A[2], "InProgress", None),
    M[3]: ("already_pending", A[3], "InProgress", "contoso"),
    M[4]: ("offboarded", A[4], "Cancelled", None),  # withdrawn by cancel
    M[5]: ("failed", None, None, None),
    M[6]: ("offboarded", A[6], "Pending", "<script>alert(1)</script>|**x**"),
    M[7]: ("not_found", None, None, "<script>alert(1)</script>|**x**"),
}


def check_export(url: str, root: Path) -> None:
    """Everything an export of the three nights promises, against the database at ``url``."""
    first = export.export(journal_dir=root, db=url)
    assert (first.journals, first.new, first.unchanged) == (4, 4, 0)
    counts = table_counts(url)
    assert counts == {
        "runs": 4,
        "journals": 4,
        "sessions": 4,
        "attempts": 0,
        "results": 11,
        "statuses": 3,
        "cancels": 2,
        "tags": 0,
        "machine_latest": 8,
    }
    assert latest(url) == EXPECTED_LATEST
    month = datetime(2026, 11, 1, tzinfo=UTC)
    pending = query(url, STILL_PENDING, month=month)
    assert [r["machine_id"] for r in pending] == [M[0], M[6]]

    again = export.export(journal_dir=root, db=url)  # idempotent
    assert (again.unchanged, again.lines, again.rows) == (4, 0, {})
    assert table_counts(url) == counts

    # A journal that grew: only its new lines (a torn last line waits for the next export).
    night = root / "2026-11-02.jsonl"
    with night.open("ab") as handle:
        handle.write(orjson.dumps(status(1, M[0], A[10], "Succeeded", 5)) + b"\n")
        handle.write(b'{"type": "status", "machine_id": "')
    grown = export.export(journal_dir=root, db=url)
    assert (grown.grown, grown.rows) == (1, {"statuses": 1})
    assert latest(url)[M[0]][2] == "Succeeded"
    # The torn line, written whole by now.
    data = night.read_bytes()
    night.write_bytes(
        data[: data.rindex(b"\n") + 1] + orjson.dumps(status(1, M[2], A[2], "Succeeded", 6)) + b"\n"
    )
    finished = export.export(journal_dir=root, db=url)
    assert (finished.grown, finished.rows) == (1, {"statuses": 1})
    assert latest(url)[M[2]][2] == "Succeeded"

    # A journal replaced by another run: its old rows go, the new ones come in.
    replaced = root / "2026-11-03" / "contoso.jsonl"
    replaced.unlink()
    write(
        replaced,
        header(2, "night-3-contoso-again", tenant_name="contoso"),
        [offboarded(2, M[8], A[8])],
    )
    third = export.export(journal_dir=root, db=url)
    assert third.replaced == 1
    runs = {r["run_id"] for r in query(url, "SELECT run_id FROM runs")}
    assert "night-3-contoso" not in runs and "night-3-contoso-again" in runs
    assert M[8] in latest(url) and latest(url)[M[3]][0] == "already_pending"  # from night 1

    # A copy of a journal under another path is the same run: skipped, counted once.
    shutil.copy(root / "2026-11-01.jsonl", root / "copy-of-night-1.jsonl")
    copied = export.export(journal_dir=root, db=url)
    assert copied.copies == [str((root / "copy-of-night-1.jsonl").absolute())]
    assert table_counts(url)["runs"] == 4


def test_export_to_sqlite_is_normalised_idempotent_and_incremental(
    nights: Path, tmp_path: Path
) -> None:
    check_export(f"sqlite:///{tmp_path / 'history.db'}", nights)


def test_the_command_line_exports_and_writes_a_summary(
    nights: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    summary = tmp_path / "summary.json"
    assert main(["export", "--journal-dir", str(nights), "--summary-json", str(summary)]) == 0
    out = capsys.readouterr().out
    assert "exported 4 journals to sqlite:///history.db: 4 new" in out
    assert (tmp_path / "history.db").is_file()  # the embedded default
    document = orjson.loads(summary.read_bytes())
    assert document["command"] == "export" and document["rows"]["results"] == 11
    monkeypatch.setenv("BULKOFFBOARD_DB", f"sqlite:///{tmp_path / 'other.db'}")
    assert main(["export", "--journals", str(nights / "*.jsonl")]) == 0
    assert "exported 2 journals" in capsys.readouterr().out
    assert (tmp_path / "other.db").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--db", "mysql://u:hunter2@db.example/x"], "not mysql"),
        (["--db", "sqlite:////nonexistent/folder/h.db"], "does not exist"),
        (["--db", "not a url"], "not a database URL"),
        (["--db", "://u:hunter2@x"], "not a database URL"),
        (["--db", "postgresql://u:hunter2@host:notaport/db"], "not a database URL"),
        (["--db", "postgresql://u:hunter2@[::1/db"], "not a database URL"),
        ([], "give --journal-dir DIR or --journals"),
        (["--journal-dir", "/nonexistent"], "not a folder"),
    ],
)
def test_bad_export_arguments_are_one_line_errors_without_the_password(
    nights: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    if "--journal-dir" not in argv and argv:
        argv = [*argv, "--journal-dir", str(nights)]
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert "hunter2" not in err


def test_database_urls_keep_tls_verified_and_passwords_hidden() -> None:
    remote = export.database_url("postgresql://bob:pw@db.example.com/history", env={})
    assert remote.drivername == "postgresql+psycopg"
    assert remote.query["sslmode"] == "verify-full" and remote.query["sslrootcert"] == "system"
    assert "pw" not in export.shown(remote) and "***" in export.shown(remote)
    chosen = export.database_url("postgres://bob@db.example.com/h?sslmode=require", env={})
    assert chosen.query["sslmode"] == "require"
    local = export.database_url(
        "postgresql://bob@127.0.0.1:5432/h", env={"BULKOFFBOARD_DB_PASSWORD": "x"}
    )
    assert "sslmode" not in local.query and local.password == "x"
    assert export.database_url(None).render_as_string() == "sqlite:///history.db"
    with pytest.raises(UsageError, match="sqlite:///PATH"):
        export.database_url("sqlite+pysqlite:///x.db")


def test_a_damaged_journal_line_is_an_error_naming_it_and_adds_nothing(
    nights: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    export.export(journal_dir=nights, db=url)
    before = table_counts(url)
    night = nights / "2026-11-01.jsonl"
    with night.open("ab") as handle:
        handle.write(orjson.dumps(status(0, M[0], A[0], "Succeeded", 9)) + b"\n")
        handle.write(b"{not json}\n")
    with pytest.raises(UsageError, match=r"2026-11-01.jsonl:\d+: not a journal record"):
        export.export(journal_dir=nights, db=url)
    assert table_counts(url) == before  # the journal's transaction rolled back whole


# -- a real PostgreSQL server ---------------------------------------------------------------------


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL on a loopback port, password (SCRAM) authentication over TCP;
    yields its URL without the password (tests pass it by BULKOFFBOARD_DB_PASSWORD)."""
    binaries = _pg_bin()
    if binaries is None:
        message = "PostgreSQL is not installed (.ci/run installs the Debian package postgresql)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="bulkoffboard-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as the postgres user
        account = pwd.getpwnam("postgres")
        os.chown(root, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()
    secret = root / "pw"
    secret.write_text(PG_PASSWORD)
    if as_user:
        os.chown(secret, pwd.getpwnam("postgres").pw_uid, -1)
    subprocess.run(
        [
            *as_user,
            str(binaries / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={secret}",
        ],
        check=True,
        capture_output=True,
    )
    server = subprocess.Popen(
        [
            *as_user,
            str(binaries / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(root),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            ready = subprocess.run(
                [str(binaries / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                capture_output=True,
                check=False,
            )
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("PostgreSQL did not start")
            time.sleep(0.1)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(10)
        if server.poll() is None:
            server.kill()
        shutil.rmtree(root, ignore_errors=True)


def _fresh_database(url: str, name: str) -> str:
    """A new database on the server at ``url`` (each test its own)."""
    engine = sa.create_engine(export.database_url(url), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"


def test_export_to_postgresql_is_normalised_idempotent_and_incremental(
    postgres: str, nights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BULKOFFBOARD_DB_PASSWORD", PG_PASSWORD)
    check_export(_fresh_database(postgres, "history_a"), nights)


def test_sqlite_and_postgresql_hold_the_same_history(
    postgres: str, nights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BULKOFFBOARD_DB_PASSWORD", PG_PASSWORD)
    pg = _fresh_database(postgres, "history_b")
    lite = f"sqlite:///{tmp_path / 'h.db'}"
    for url in (pg, lite):
        export.export(journal_dir=nights, db=url)
    assert latest(pg) == latest(lite) == EXPECTED_LATEST
    columns = "run_id, line, machine_id, outcome, action_status, http_status, input_where"
    order = " ORDER BY run_id, line"
    assert query(pg, f"SELECT {columns} FROM results{order}") == query(  # noqa: S608
        lite,
        f"SELECT {columns} FROM results{order}",  # noqa: S608
    )


def test_a_wrong_postgresql_password_is_one_line_without_it(
    postgres: str, nights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = postgres.replace("postgres@", "postgres:not-the-Pa55word@")
    assert main(["export", "--journal-dir", str(nights), "--db", wrong]) == 2
    err = capsys.readouterr().err
    assert "password authentication failed" in err and err.count("\n") == 1
    assert "not-the-Pa55word" not in err and PG_PASSWORD not in err
    assert "postgres:***@127.0.0.1" in err


def test_journals_written_by_a_real_run_export_whole(nights: Path, tmp_path: Path) -> None:
    """The history fixture is hand-made; a journal the product wrote (with its plan, end and
    marks) exports too, every line accounted for."""
    journal = tmp_path / "real" / "run.jsonl"
    journal.parent.mkdir()
    made = Journal.create(journal, header(0, "real-run"))
    made.append({"type": "session", "at": at(0), "pid": 7, "command": "run", "budget": "none"})
    made.append({"type": "attempt", "machine_id": M[0], "attempt": 1, "at": at(0, 1)})
    made.append(offboarded(0, M[0], A[0]))
    made.append(
        {
            "type": "tag",
            "stage": "result",
            "action": "Add",
            "value": "bulkoffboard-1234abcd",
            "machine_ids": [M[0], M[1]],
            "outcome": "tagged",
            "http_status": 200,
            "message": None,
            "at": at(0, 2),
        }
    )
    made.append({"type": "end", "at": at(0, 3), "exit_code": 0})
    made.close()
    url = f"sqlite:///{tmp_path / 'h.db'}"
    summary = export.export(journal_dir=journal.parent, db=url)
    assert summary.lines == 5 and summary.rows == {
        "sessions": 1,
        "attempts": 1,
        "results": 1,
        "tags": 2,
    }


def _readme_query() -> str:
    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    start = text.index("```sql\n") + len("```sql\n")
    return text[start : text.index("```", start)]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_readme_query_runs_on_both_databases(
    backend: str, nights: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The README's SQL, with its "this month" (SQLite's spelling, or PostgreSQL's from the
    comment) run as written against each database: the journals are from November 2026,
    so "this month" is taken as November through a fixed month start in its place."""
    sql = _readme_query()
    sqlite_month = "date('now', 'start of month')"
    assert sqlite_month in sql and "date_trunc('month', now())" in sql
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'h.db'}"
        month = "'2026-11-01'"
    else:
        request.getfixturevalue("monkeypatch").setenv("BULKOFFBOARD_DB_PASSWORD", PG_PASSWORD)
        url = _fresh_database(request.getfixturevalue("postgres"), "history_readme")
        month = "date_trunc('month', timestamptz '2026-11-15 00:00:00+00')"
    export.export(journal_dir=nights, db=url)
    rows = query(url, sql.replace(sqlite_month, month))
    assert [r["machine_id"] for r in rows] == [M[0], M[6]]
    # And as written today (December): nothing of November is "this month".
    if backend == "sqlite":
        assert query(url, sql) == []


def test_the_python_api_exports(nights: Path, tmp_path: Path) -> None:
    import bulkoffboard

    summary = bulkoffboard.export_journals(nights, f"sqlite:///{tmp_path / 'h.db'}")
    assert summary.new == 4 and summary.rows["results"] == 11
    assert bulkoffboard.export_journals(nights, f"sqlite:///{tmp_path / 'h.db'}").unchanged == 4


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://u:pw@127.0.0.1:5432/db", "postgresql://u:***@127.0.0.1:5432/db"),
        ("redis://:secret@h:6379/0", "redis://:***@h:6379/0"),
        ("rediss://user:p@ss/w@h/0 and more", "rediss://user:***@h/0 and more"),
        ("http://host/path@x", "http://host/path@x"),
    ],
)
def test_every_error_line_hides_a_url_password(text: str, shown: str) -> None:
    from bulkoffboard.logs import redact_text

    assert redact_text(text) == shown
