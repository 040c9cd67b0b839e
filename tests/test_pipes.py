"""A reader of standard output that goes away (``bulkoffboard report ... | head -1``).

Every command is the real command line in a child process whose standard output is a real
pipe. Either the reader has gone before the child writes anything (its read end is closed
before the child starts: the child's first write fails), or it reads one line and goes
(the output is several times the 64 KiB a pipe holds, so the child is still writing). The
children run without PYTHONUNBUFFERED, as users run them. The
child must exit quietly: no traceback, no message, no "Exception ignored" at shutdown;
with 141 (128 + SIGPIPE) when its output is its product, with its own exit code when the
work was done and only the summary after it was cut.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest

from bulkoffboard.cli import main
from bulkoffboard.emulator import EmulatorConfig, FleetSpec
from bulkoffboard.journal import FORMAT_VERSION, TOOL, replay_file
from bulkoffboard.reports import RENDERERS, render_file
from tests.conftest import StartEmulator, env_for

SIGPIPE_EXIT = 128 + int(signal.SIGPIPE)
#: Several times what a pipe holds (64 KiB on Linux), so a reader that leaves after one line
#: leaves while the child is still writing.
BIG = 256 * 1024
LIMIT_ARGS = ["--limit", "100/0.6", "--limit", "1500/36"]
NOISE = ("Traceback", "BrokenPipeError", "Broken pipe", "Exception ignored", "error:")

Reader = Literal["gone", "line"]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment (no PYTHONUNBUFFERED: stdout buffered, as users run it)."""
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH", "SYSTEMROOT", "TMPDIR", "XDG_STATE_HOME")
    return {k: v for k, v in os.environ.items() if k in keep} | (extra or {})


def read_until(fd: int, marker: bytes) -> bytes:
    """Read ``fd`` until ``marker`` has been seen (or end of file)."""
    data = b""
    while marker not in data:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


@dataclass(frozen=True, slots=True)
class Piped:
    code: int
    head: bytes
    err: str

    def assert_quiet(self) -> None:
        for noise in NOISE:
            assert noise not in self.err, self.err


async def piped(
    *args: str, reader: Reader, env: dict[str, str] | None = None, timeout: float = 60
) -> Piped:
    """``bulkoffboard ARGS`` with stdout a real pipe whose reader is ``gone`` before the child
    starts, or reads one ``line`` and closes its end; stderr goes to a file."""
    read_fd, write_fd = os.pipe()
    if reader == "gone":
        os.close(read_fd)
    with tempfile.TemporaryFile() as err:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bulkoffboard",
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=err,
                env=child_env(env),
            )
        finally:
            os.close(write_fd)
        head = b""
        if reader == "line":
            try:
                head = await asyncio.to_thread(read_until, read_fd, b"\n")
            finally:
                os.close(read_fd)
        try:
            code = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        err.seek(0)
        return Piped(code, head, err.read().decode(errors="replace"))


# -- report ----------------------------------------------------------------------------------

MESSAGE = "HTTP 500 InternalServerError: retries exhausted; " * 12


def _at(second: int) -> str:
    return f"2026-11-28T{2 + second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}.000000Z"


def write_journal(path: Path, machines: int = 4000, rejected: int = 300) -> Path:
    """A journal of ``machines`` results, mostly failed with long messages (they all need
    attention), and ``rejected`` invalid input lines: every report but the table is big."""
    records: list[dict[str, Any]] = [
        {
            "type": "header",
            "format": FORMAT_VERSION,
            "tool": TOOL,
            "tool_version": "0.1.0",
            "run_id": "pipes",
            "created_at": _at(0),
            "source": {"kind": "file", "path": "/srv/ids.txt", "format": "text"},
            "comment": "CHG0042",
            "limits": [[100, 60.0], [1500, 3600.0]],
            "workers": 8,
            "api_url": "https://api.security.microsoft.com",
            "tenant_id": "t",
            "client_id": "c",
        },
        {"type": "session", "at": _at(0), "pid": 1, "command": "run", "tool_version": "0.1.0"},
    ]
    records += [
        {
            "type": "result",
            "machine_id": None,
            "outcome": "invalid_id",
            "where": f"/srv/ids.txt:{line}",
            "input": f"not-a-machine-id-{line}-" + "x" * 1000,
            "message": "not a 40-hex machine id",
            "attempts": 0,
            "at": _at(0),
            "stage": "plan",
        }
        for line in range(1, rejected + 1)
    ]
    for i in range(machines):
        machine_id = f"{i + 1:040x}"
        second = 1 + i
        records.append(
            {"type": "attempt", "machine_id": machine_id, "attempt": 1, "at": _at(second)}
        )
        ok = i % 5 == 0
        records.append(
            {
                "type": "result",
                "machine_id": machine_id,
                "outcome": "offboarded" if ok else "failed",
                "action_id": f"action-{i}" if ok else None,
                "action_status": "Pending" if ok else None,
                "http_status": 201 if ok else 500,
                "error_code": None if ok else "InternalServerError",
                "message": None if ok else MESSAGE,
                "attempts": 1,
                "at": _at(second),
            }
        )
    records.append({"type": "end", "at": _at(machines + 1), "exit_code": 1, "reason": "done"})
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


@pytest.fixture(scope="module")
def journal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_journal(tmp_path_factory.mktemp("pipes") / "big.jsonl")


FORMATS = sorted(RENDERERS)


@pytest.mark.parametrize("fmt", FORMATS)
async def test_report_exits_141_quietly_when_the_reader_is_gone_before_it_writes(
    journal: Path, fmt: str
) -> None:
    ran = await piped("report", "--journal", str(journal), "--format", fmt, reader="gone")
    ran.assert_quiet()
    assert ran.err == ""
    assert ran.code == SIGPIPE_EXIT


@pytest.mark.parametrize("fmt", FORMATS)
async def test_report_exits_quietly_when_the_reader_leaves_after_one_line(
    journal: Path, fmt: str
) -> None:
    size = len(render_file(journal, fmt).encode())
    if fmt != "table":
        assert size > BIG, f"the {fmt} report must overflow the pipe for this test to mean much"
    ran = await piped("report", "--journal", str(journal), "--format", fmt, reader="line")
    ran.assert_quiet()
    assert ran.err == ""
    assert b"\n" in ran.head
    # A report that fits the pipe reached it whole before the reader left: 0, as any Unix tool.
    assert ran.code == (SIGPIPE_EXIT if size > BIG else 0)


class CountingStdout(io.TextIOWrapper):
    """A text stdout over a real pipe that counts the writes made to it, and those made
    after one had failed."""

    writes = 0
    failed = 0
    after_failure = 0

    def write(self, text: str) -> int:
        self.writes += 1
        if self.failed:
            self.after_failure += 1
        try:
            return super().write(text)
        except BrokenPipeError:
            self.failed += 1
            raise


def test_a_streamed_csv_report_stops_rendering_at_the_first_failed_write(
    journal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    out = CountingStdout(open(write_fd, "wb"), encoding="utf-8")  # noqa: SIM115 - closed below
    try:
        with monkeypatch.context() as patch:
            patch.setattr(sys, "stdout", out)
            code = main(["report", "--journal", str(journal), "--format", "csv"])
    finally:
        out.close()
    assert code == SIGPIPE_EXIT
    assert sum(replay_file(journal).outcome_counts().values()) > 4000, "thousands of rows to go"
    assert out.failed == 1
    assert out.after_failure == 0, "kept rendering after the pipe broke"
    assert out.writes < 100, "rendered far more than one buffer's worth before noticing"


# -- commands against the emulator -----------------------------------------------------------


def emulator_config(size: int) -> EmulatorConfig:
    return EmulatorConfig(
        time_scale=0.01,
        action_start_s=0.05,
        action_complete_s=0.1,
        fleet=FleetSpec(size=size, seed=7, os_mix={"Windows10": 0.9, "Linux": 0.1}),
    )


@pytest.mark.parametrize(
    ("fmt", "reader"),
    [("table", "gone"), ("csv", "gone"), ("json", "gone"), ("csv", "line"), ("json", "line")],
)
async def test_a_dry_run_plan_exits_141_quietly_when_its_reader_goes(
    start_emulator: StartEmulator, tmp_path: Path, fmt: str, reader: Reader
) -> None:
    server = await start_emulator(emulator_config(4000))
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(server.emulator.machines) + "\n", encoding="utf-8")
    ran = await piped(
        "run",
        "--ids",
        str(ids),
        "--dry-run",
        "--format",
        fmt,
        *LIMIT_ARGS,
        reader=reader,
        env=env_for(server),
    )
    ran.assert_quiet()
    assert ran.code == SIGPIPE_EXIT
    assert not server.emulator.truth.offboard_posts, "a dry run sent an offboard call"


async def test_check_exits_141_quietly_when_its_reader_is_gone(
    start_emulator: StartEmulator,
) -> None:
    server = await start_emulator(emulator_config(5))
    ran = await piped("check", reader="gone", env=env_for(server))
    ran.assert_quiet()
    assert ran.code == SIGPIPE_EXIT


async def test_run_resume_and_verify_keep_their_exit_code_when_only_the_summary_is_cut(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(emulator_config(60))
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(server.emulator.machines) + "\n", encoding="utf-8")
    journal = tmp_path / "run.jsonl"
    summary = tmp_path / "run.summary.json"
    env = env_for(server)
    args = ["--journal", str(journal), "--summary-json", str(summary)]
    ran = await piped("run", "--ids", str(ids), *args, *LIMIT_ARGS, reader="gone", env=env)
    ran.assert_quiet()
    assert ran.code == 0, "the work succeeded: a closed pipe must not turn it into a failure"
    replay = replay_file(journal)
    assert replay.in_doubt() == []
    outcomes = {r["machine_id"] for r in replay.results()}
    assert outcomes == set(server.emulator.machines), "every machine has its result"
    assert orjson.loads(summary.read_bytes())["exit_code"] == 0, "the summary file is written"
    last = orjson.loads(journal.read_bytes().splitlines()[-1])
    assert last["type"] == "end" and last["exit_code"] == 0
    posts = dict(server.emulator.truth.offboard_posts)

    ran = await piped("resume", *args, reader="line", env=env)
    ran.assert_quiet()
    assert ran.code == 0 and ran.head.startswith(b"run ")
    assert dict(server.emulator.truth.offboard_posts) == posts, "resume sent something again"

    await asyncio.sleep(0.3)  # every action has completed (0.15 s in this emulator)
    verify = ["verify", "--journal", str(journal), "--limit", "100/0.6"]
    ran = await piped(*verify, reader="gone", env=env)
    ran.assert_quiet()
    assert ran.code == 0
    assert orjson.loads(journal.read_bytes().splitlines()[-1])["type"] == "end"


async def test_demo_exits_141_quietly_when_its_reader_is_gone(tmp_path: Path) -> None:
    ran = await piped(
        "demo", "--machines", "20", "--workdir", str(tmp_path), reader="gone", timeout=90
    )
    ran.assert_quiet()
    assert ran.code == SIGPIPE_EXIT


# -- emulate ---------------------------------------------------------------------------------


async def test_emulate_exits_141_quietly_when_its_environment_lines_cannot_be_written() -> None:
    ran = await piped("emulate", "--machines", "5", "--plain-http", reader="gone", timeout=30)
    ran.assert_quiet()
    assert ran.code == SIGPIPE_EXIT


async def test_emulate_keeps_serving_after_its_reader_took_the_environment_and_left() -> None:
    """A script reads the exports and closes its end: the emulator is still wanted, and stops
    (exit 0, quietly) when signalled, as documented."""
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryFile() as err:
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bulkoffboard",
                "emulate",
                "--machines",
                "5",
                "--plain-http",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=err,
                env=child_env(),
            )
        finally:
            os.close(write_fd)
        try:
            lines = await asyncio.to_thread(read_until, read_fd, b"AZURE_CLIENT_SECRET")
        finally:
            os.close(read_fd)
        try:
            url = lines.decode().split("listening on ", 1)[1].split()[0]
            host, port = url.removeprefix("http://").rsplit(":", 1)
            await asyncio.sleep(0.3)
            assert proc.returncode is None, "the emulator stopped when its reader left"
            answer = await asyncio.to_thread(_http_get, host, int(port))
            assert answer.startswith(b"HTTP/1.1 "), answer
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
        err.seek(0)
        errors = err.read().decode(errors="replace")
    for noise in NOISE:
        assert noise not in errors, errors
    assert code == 0


def _http_get(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(b"GET /api/machines HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return conn.recv(64)


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "html"])
async def test_a_history_report_exits_141_quietly_when_its_reader_is_gone(
    journal: Path, tmp_path: Path, fmt: str
) -> None:
    folder = tmp_path / "nights"
    folder.mkdir()
    for night in range(3):
        (folder / f"night-{night}.jsonl").write_bytes(
            journal.read_bytes().replace(b'"run_id":"', f'"run_id":"n{night}-'.encode(), 1)
        )
    ran = await piped("report", "--journal-dir", str(folder), "--format", fmt, reader="gone")
    ran.assert_quiet()
    assert ran.err == "" and ran.code == SIGPIPE_EXIT


async def test_export_keeps_its_work_when_only_its_summary_meets_a_closed_pipe(
    journal: Path, tmp_path: Path
) -> None:
    """The database is written before a word is printed: the closed pipe costs nothing."""
    db = tmp_path / "h.db"
    ran = await piped(
        "export", "--journals", str(journal), "--db", f"sqlite:///{db}", reader="gone"
    )
    ran.assert_quiet()
    assert ran.code == 0, "the export's work was done: its exit code, not the pipe's"
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{db}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM runs")).scalar_one() == 1
    engine.dispose()
