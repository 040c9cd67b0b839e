"""Hostile input: every file in ``tests/hostile/`` is refused cleanly.

Each corpus file is run through the real command line (``bulkoffboard.cli.main`` in a thread,
against a loopback emulator in the test's loop; a few also as real subprocesses) and must give
one of:

- ``error``: exit 2 with exactly one line on stderr that names the file (and the line where one
  applies), nothing sent;
- ``invalid``: ``invalid_id`` results naming file and line for the bad values, while the good
  ids in the same file go through;
- ``nothing``: an empty list: nothing sent and nothing recorded (exit 0), or a clear exit 2.

In every case: no traceback, no control bytes echoed, no offboard POST for anything but a valid
id (the emulator's truth: ``malformed_paths`` stays empty), and no earlier journal content lost
(resuming a valid journal with a hostile source or a bad flag leaves it byte-identical).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import hashlib
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest
import pytest_asyncio

from bulkoffboard.cli import main
from bulkoffboard.emulator import EmulatorConfig, EmulatorServer, FleetSpec
from bulkoffboard.journal import replay_file
from tests.conftest import env_for

HOSTILE = Path(__file__).parent / "hostile"
#: The valid ids the corpus uses; the emulator's fleet has them as Windows machines.
VALID = tuple(
    hashlib.sha1(f"hostile-{n}".encode(), usedforsecurity=False).hexdigest() for n in (1, 2, 3)
)
V1, V2, V3 = VALID
LIMITS = ("--limit", "100/0.6", "--limit", "1500/36")
module_loop = pytest.mark.asyncio(loop_scope="module")


@dataclass(frozen=True, slots=True)
class Expect:
    """What one corpus file must produce."""

    kind: Literal["error", "invalid", "nothing"]
    #: error: the line the message must name (None: the file as a whole).
    line: int | None = None
    #: error: a fragment of the message.
    says: str = ""
    #: invalid: how many invalid_id results.
    invalid: int = 0
    #: invalid: the valid ids in the file, which must get a (non-invalid) result.
    valid: tuple[str, ...] = ()


def error(says: str, line: int | None = None) -> Expect:
    return Expect("error", line=line, says=says)


def invalid(count: int, *valid: str) -> Expect:
    return Expect("invalid", invalid=count, valid=valid)


NOTHING = Expect("nothing")
NOT_UTF8 = "not valid UTF-8"
NOT_JOURNAL = "not a bulkoffboard journal"

#: Id files, run with ``bulkoffboard run --ids``.
ID_FILES: dict[str, Expect] = {
    # ids that are not ids
    "id_truncated.txt": invalid(3),
    "id_too_long.txt": invalid(2),
    "id_non_hex.txt": invalid(4),
    "id_guid_and_names.txt": invalid(3),
    "line_too_long.txt": invalid(1, V2),
    # path traversal and URL injection
    "traversal_dotdot.txt": invalid(4),
    "traversal_embedded.txt": invalid(5),
    "traversal_percent.txt": invalid(5),
    "url_query.txt": invalid(4),
    "url_fragment.txt": invalid(0, V1),  # '#' starts a comment in text: the fragment is dropped
    "url_fragment.csv": invalid(2),
    "url_absolute.txt": invalid(4),
    "crlf_injection.json": invalid(2, V3),
    # white space, look-alikes and control bytes
    "spaces.txt": invalid(2, V3),
    "unicode_spaces.txt": invalid(2, V1, V3),
    "unicode_digits.txt": invalid(3),
    "homoglyphs.txt": invalid(3),
    "fullwidth_hex.txt": invalid(3),
    "nul_bytes.txt": invalid(3, V3),
    "control_chars.txt": invalid(4),
    # binary files and wrong encodings
    "binary_image.png": error("looks binary"),
    "binary_elf.bin": error("looks binary"),
    "binary_gzip.txt.gz": error("looks binary"),
    "binary_no_nul.txt": error(NOT_UTF8, 1),
    "utf16le_bom.txt": error("UTF-16"),
    "utf16be_bom.csv": error("UTF-16"),
    "utf16le_no_bom.txt": error("looks binary"),
    "utf32le_bom.txt": error("UTF-32"),
    "latin1.txt": error(NOT_UTF8, 2),
    "latin1.csv": error(NOT_UTF8, 2),
    "invalid_utf8.json": error(NOT_UTF8, 1),
    "overlong_utf8.txt": error(NOT_UTF8, 1),
    "surrogate_utf8.txt": error(NOT_UTF8, 1),
    # empty
    "empty.txt": NOTHING,
    "empty.csv": NOTHING,
    "empty.json": NOTHING,
    "blank_and_comments.txt": NOTHING,
    "bom_only.txt": NOTHING,
    # CSV
    "csv_no_id_column.csv": error("no id column", 1),
    "csv_short_rows.csv": invalid(1, V1),
    "csv_formula_injection.csv": invalid(4),
    "csv_unterminated_quote.csv": invalid(1),
    # JSON of the wrong shape
    "json_number.json": error("found a number", 1),
    "json_string.json": error("found a string", 1),
    "json_object_no_value.json": error("without a 'value' array", 1),
    "json_value_not_array.json": error("'value' is an object", 1),
    "json_truncated.json": error("malformed JSON", 1),
    "json_trailing_garbage.json": error("unexpected data after the JSON document", 1),
    "json_deep_nesting.json": error("unreadable JSON value", 1),
    "json_huge_number.json": error("unreadable JSON value", 1),
    "json_mixed_elements.json": invalid(9, V3),
    "json_nan.json": invalid(3),
    "json_duplicate_keys.json": invalid(1),  # the last "id" wins: "../../offboard"
    "json_lone_surrogate.json": invalid(2, V2),
    "mde_value_shape.json": invalid(1, V1),
    "jsonl_malformed.jsonl": error("malformed JSON", 3),
    "jsonl_wrong_types.jsonl": invalid(4, V1, V2),
    "jsonl_lone_surrogate.jsonl": invalid(2),
}

#: Journals, given to ``resume`` and ``report``.
JOURNALS: dict[str, Expect] = {
    "journal_foreign.jsonl": error(NOT_JOURNAL, 1),
    "journal_newer_format.jsonl": error("newer bulkoffboard (journal format 2)"),
    "journal_format_not_int.jsonl": error("no valid format version", 1),
    "journal_corrupt_middle.jsonl": error("not a JSON line", 4),
    "journal_record_not_object.jsonl": error("must be a JSON object", 3),
    "journal_attempt_not_a_number.jsonl": error("attempt", 3),
    "journal_no_machine_id.jsonl": error("without a machine_id", 3),
    "journal_header_not_first.jsonl": error(NOT_JOURNAL, 1),
    "journal_empty.jsonl": error(NOT_JOURNAL),
    "journal_binary.jsonl": error("not a JSON line", 1),
    "journal_utf16.jsonl": error("not a JSON line", 1),
}

CORPUS = {**ID_FILES, **JOURNALS}


def params(table: dict[str, Expect]) -> list[str]:
    return sorted(table)


# -- fixtures and helpers --------------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmulatorServer]:
    """One emulator for the module (starting one costs two RSA keys); tests compare its truth
    before and after their own run."""
    config = EmulatorConfig(
        time_scale=0.01,
        action_start_s=0.05,
        action_complete_s=0.1,
        fleet=FleetSpec(size=3, seed=9, os_mix={"Windows10": 1.0}),
    )
    emulator = EmulatorServer(config=config, ca_path=tmp_path_factory.mktemp("ca") / "ca.pem")
    await emulator.start()
    template = next(iter(emulator.emulator.machines.values()))
    for machine_id in VALID:
        emulator.emulator.add_machine(
            {**template, "id": machine_id, "computerDnsName": f"h{machine_id[:8]}.contoso.com"}
        )
    yield emulator
    await emulator.stop()


@dataclass(frozen=True, slots=True)
class Ran:
    code: int
    out: str
    err: str


@dataclass(frozen=True, slots=True)
class Harness:
    """The module's emulator, the environment pointing at it, and a test's folder and
    captured output."""

    server: EmulatorServer
    env: dict[str, str]
    tmp: Path
    capsys: pytest.CaptureFixture[str]

    async def run(self, *args: str) -> Ran:
        return await run_cli(self.capsys, *args)


@pytest.fixture
def h(
    server: EmulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> Harness:
    values = env_for(server)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return Harness(server, values, tmp_path, capsys)


async def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> Ran:
    """``bulkoffboard ARGS`` in a thread (it runs its own event loop; the emulator keeps
    serving from the test's)."""
    capsys.readouterr()

    def call() -> int:
        try:
            return main(list(args))
        except SystemExit as exc:  # argparse
            return exc.code if isinstance(exc.code, int) else 2

    code = await asyncio.to_thread(call)
    out, err = capsys.readouterr()
    return Ran(code, out, err)


class Truth:
    """What reached the emulator from now on."""

    def __init__(self, server: EmulatorServer) -> None:
        self._truth = server.emulator.truth
        self._posts = collections.Counter(self._truth.offboard_posts)
        self._malformed = len(self._truth.malformed_paths)

    @property
    def posts(self) -> collections.Counter[str]:
        return collections.Counter(self._truth.offboard_posts) - self._posts

    @property
    def malformed(self) -> list[str]:
        return self._truth.malformed_paths[self._malformed :]


def records(journal: Path) -> list[dict[str, Any]]:
    if not journal.exists():
        return []
    return [orjson.loads(line) for line in journal.read_bytes().splitlines() if line.strip()]


def assert_clean_output(ran: Ran) -> None:
    both = ran.out + ran.err
    assert "Traceback" not in both, ran.err
    assert "\x1b" not in both and "\x00" not in both, "control bytes echoed"


def assert_one_line_error(ran: Ran, path: Path, expect: Expect) -> str:
    assert ran.code == 2, (ran.code, ran.out, ran.err)
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1, ran.err
    line = lines[0]
    assert line.startswith("bulkoffboard: error: "), line
    assert str(path) in line, f"the message does not name {path}: {line}"
    assert expect.says in line, line
    if expect.line is not None:
        assert f"{path}:{expect.line}:" in line or f"line {expect.line} " in line, line
    return line


def check_invalid_results(
    results: list[dict[str, Any]], source: Path, expect: Expect, posts: collections.Counter[str]
) -> None:
    invalid = [r for r in results if r["outcome"] == "invalid_id"]
    assert len(invalid) == expect.invalid, [r.get("input") for r in invalid]
    where = re.compile(re.escape(str(source)) + r":(\d+)")
    for result in invalid:
        assert result["machine_id"] is None
        assert where.fullmatch(str(result["where"])), result["where"]
        assert isinstance(result["input"], str)
        assert result["message"]
    by_machine = {r["machine_id"]: r["outcome"] for r in results if r["machine_id"]}
    assert set(by_machine) == set(expect.valid), by_machine
    assert set(posts) <= set(expect.valid), f"POST for something not a valid id: {posts}"
    assert all(n == 1 for n in posts.values()), posts


# -- the corpus ------------------------------------------------------------------------------------


def test_the_corpus_is_complete_and_large_enough() -> None:
    on_disk = {p.name for p in HOSTILE.iterdir() if p.is_file() and p.name != "README.md"}
    assert on_disk == set(CORPUS), (
        f"unlisted: {sorted(on_disk - set(CORPUS))}, missing: {sorted(set(CORPUS) - on_disk)}"
    )
    assert len(CORPUS) >= 30


@module_loop
@pytest.mark.parametrize("name", params(ID_FILES))
async def test_a_hostile_id_file_is_refused_cleanly(name: str, h: Harness) -> None:
    expect = ID_FILES[name]
    source = h.tmp / name
    shutil.copyfile(HOSTILE / name, source)
    journal = h.tmp / "journal.jsonl"
    truth = Truth(h.server)

    ran = await h.run("run", "--ids", str(source), "--journal", str(journal), *LIMITS)

    assert_clean_output(ran)
    assert truth.malformed == []
    results = [r for r in records(journal) if r["type"] == "result"]
    if expect.kind == "error" or (expect.kind == "nothing" and ran.code == 2):
        assert_one_line_error(ran, source, expect)
        assert truth.posts == collections.Counter()
        assert not [r for r in records(journal) if r["type"] == "attempt"]
        if journal.exists():
            replay_file(journal)  # whatever was written still replays
    elif expect.kind == "nothing":
        assert ran.code == 0, ran.err
        assert results == []
        assert truth.posts == collections.Counter()
        assert "source.empty" in ran.err, "an id file with no ids is worth a warning"
    else:
        assert ran.code == 0, (ran.out, ran.err)
        check_invalid_results(results, source, expect, truth.posts)
        assert replay_file(journal).in_doubt() == []
    assert source.read_bytes() == (HOSTILE / name).read_bytes(), "the source was modified"


@module_loop
@pytest.mark.parametrize("command", ["resume", "report"])
@pytest.mark.parametrize("name", params(JOURNALS))
async def test_a_corrupted_or_foreign_journal_is_refused_and_left_as_it_was(
    name: str, command: str, h: Harness
) -> None:
    journal = h.tmp / name
    shutil.copyfile(HOSTILE / name, journal)
    truth = Truth(h.server)
    ran = await h.run(command, "--journal", str(journal))
    assert_clean_output(ran)
    assert_one_line_error(ran, journal, JOURNALS[name])
    assert journal.read_bytes() == (HOSTILE / name).read_bytes()
    assert truth.posts == collections.Counter()


@module_loop
@pytest.mark.parametrize(("suffix", "reason"), [("txt", "line too long"), ("json", "too long")])
async def test_a_100_mb_single_line_is_one_clipped_invalid_id(
    suffix: str, reason: str, h: Harness
) -> None:
    source = h.tmp / f"huge.{suffix}"
    block = b"a" * (1 << 20)
    with source.open("wb") as out:
        out.write(b'["' if suffix == "json" else b"")
        for _ in range(100):
            out.write(block)
        out.write(f'", "{V1}"]'.encode() if suffix == "json" else f"\n{V1}\n".encode())
    journal = h.tmp / "journal.jsonl"
    truth = Truth(h.server)
    ran = await h.run("run", "--ids", str(source), "--journal", str(journal), *LIMITS)
    assert_clean_output(ran)
    assert ran.code == 0, ran.err
    results = [r for r in records(journal) if r["type"] == "result"]
    check_invalid_results(results, source, invalid(1, V1), truth.posts)
    bad = next(r for r in results if r["outcome"] == "invalid_id")
    assert reason in bad["message"]
    assert len(bad["input"]) <= 200
    assert journal.stat().st_size < 16_384, "the huge value reached the journal"


@module_loop
@pytest.mark.parametrize("kind", ["directory", "fifo", "device", "missing"])
async def test_an_ids_path_that_is_not_a_regular_file_is_a_usage_error(
    kind: str, h: Harness
) -> None:
    path = h.tmp / "ids"
    writer: int | None = None
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        # A pipe with a writer, as `--ids <(command)` gives (without one, see the next test).
        os.mkfifo(path)
        writer = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    elif kind == "device":
        path = Path("/dev/zero")
    journal = h.tmp / "journal.jsonl"
    truth = Truth(h.server)
    try:
        ran = await h.run("run", "--ids", str(path), "--journal", str(journal), *LIMITS)
    finally:
        if writer is not None:
            os.close(writer)
    assert_clean_output(ran)
    assert_one_line_error(ran, path, error(""))
    assert not journal.exists() or not [r for r in records(journal) if r["type"] != "header"]
    assert truth.posts == collections.Counter()


@module_loop
async def test_a_fifo_without_a_writer_is_refused_not_waited_on(h: Harness) -> None:
    path = h.tmp / "ids.fifo"
    os.mkfifo(path)
    args = ("run", "--ids", str(path), "--journal", str(h.tmp / "journal.jsonl"), *LIMITS)
    code, _, err = await cli(*args, env=h.env, timeout=30)
    assert code == 2 and str(path) in err, err


# -- earlier journal content is never lost ---------------------------------------------------------


async def _valid_run(h: Harness) -> tuple[Path, Path, bytes]:
    ids = h.tmp / "ids.txt"
    ids.write_text("\n".join(VALID) + "\n", encoding="utf-8")
    journal = h.tmp / "journal.jsonl"
    ran = await h.run("run", "--ids", str(ids), "--journal", str(journal), *LIMITS)
    assert ran.code == 0, ran.err
    return ids, journal, journal.read_bytes()


@module_loop
@pytest.mark.parametrize("name", sorted(ID_FILES))
async def test_resuming_with_a_hostile_source_leaves_the_journal_byte_identical(
    name: str, h: Harness
) -> None:
    ids, journal, before = await _valid_run(h)
    shutil.copyfile(HOSTILE / name, ids)  # the source was swapped for a hostile file
    truth = Truth(h.server)
    ran = await h.run("resume", "--journal", str(journal))
    assert_clean_output(ran)
    assert_one_line_error(ran, ids, error("changed"))
    assert journal.read_bytes() == before
    assert truth.posts == collections.Counter()


HEADER_DAMAGE: dict[str, tuple[str, Any]] = {
    "limits with zero calls": ("limits", [[0, 60.0]]),
    "limits not a list": ("limits", "abc"),
    "workers not a number": ("workers", "many"),
    "no workers": ("workers", 0),
    "format from the future": ("format", 99),
    "another tool": ("tool", "someone-else"),
}


@module_loop
@pytest.mark.parametrize(
    ("key", "value"),
    list(HEADER_DAMAGE.values()),
    ids=list(HEADER_DAMAGE),
)
async def test_a_damaged_journal_header_is_refused_and_left_as_it_was(
    key: str, value: Any, h: Harness
) -> None:
    """A real journal whose header was damaged by hand: resume refuses it with one line."""
    _, journal, valid = await _valid_run(h)
    lines = valid.splitlines(keepends=True)
    header = orjson.loads(lines[0])
    header[key] = value
    journal.write_bytes(orjson.dumps(header) + b"\n" + b"".join(lines[1:]))
    before = journal.read_bytes()
    truth = Truth(h.server)
    ran = await h.run("resume", "--journal", str(journal))
    assert_clean_output(ran)
    assert ran.code == 2, (ran.out, ran.err)
    assert len(ran.err.strip().splitlines()) == 1, ran.err
    assert journal.read_bytes() == before
    assert truth.posts == collections.Counter()


BAD_FLAGS: dict[str, tuple[str, ...]] = {
    "limit without a period": ("--limit", "100"),
    "zero calls": ("--limit", "0/60"),
    "negative period": ("--limit", "100/-1"),
    "not numbers": ("--limit", "x/y"),
    "no workers": ("--workers", "0"),
    "too many workers": ("--workers", "100000"),
    "workers not a number": ("--workers", "many"),
    "missing config": ("--config", "/nonexistent/bulkoffboard.toml"),
    "unknown flag": ("--bogus",),
    "bad log level": ("--log-level", "loud"),
}


@module_loop
@pytest.mark.parametrize("flags", list(BAD_FLAGS.values()), ids=list(BAD_FLAGS))
async def test_resuming_with_a_bad_flag_leaves_the_journal_byte_identical(
    flags: tuple[str, ...], h: Harness
) -> None:
    _, journal, before = await _valid_run(h)
    truth = Truth(h.server)
    ran = await h.run("resume", "--journal", str(journal), *flags)
    assert_clean_output(ran)
    assert ran.code == 2, (ran.out, ran.err)
    last = ran.err.strip().splitlines()[-1]
    assert "error:" in last, ran.err  # argparse prints its usage line first
    assert journal.read_bytes() == before
    assert truth.posts == collections.Counter()


@module_loop
@pytest.mark.parametrize("case", ["run over it", "source gone", "locked"])
async def test_misuse_of_an_existing_journal_leaves_it_byte_identical(
    case: str, h: Harness
) -> None:
    ids, journal, before = await _valid_run(h)
    truth = Truth(h.server)
    lock_fd: int | None = None
    if case == "run over it":
        args: tuple[str, ...] = ("run", "--ids", str(ids), "--journal", str(journal), *LIMITS)
        culprit = str(journal)
    elif case == "source gone":
        ids.unlink()
        args, culprit = ("resume", "--journal", str(journal)), str(ids)
    else:
        lock_fd = os.open(journal.with_name(journal.name + ".lock"), os.O_RDWR)
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.pwrite(lock_fd, b"424242\n", 0)
        args, culprit = ("resume", "--journal", str(journal)), "424242"
    try:
        ran = await h.run(*args)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    assert_clean_output(ran)
    assert ran.code == 2, (ran.out, ran.err)
    assert len(ran.err.strip().splitlines()) == 1 and culprit in ran.err, ran.err
    assert journal.read_bytes() == before
    assert truth.posts == collections.Counter()


# -- as a real process: stderr is exactly the one line ---------------------------------------------


async def cli(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    """``python -m bulkoffboard ARGS`` (see tests/test_cli.py); killed after ``timeout``."""
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH", "SYSTEMROOT", "TMPDIR", "XDG_STATE_HOME")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bulkoffboard",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**{k: v for k, v in os.environ.items() if k in keep}, **env},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@module_loop
@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("binary_image.png", "run"),
        ("jsonl_malformed.jsonl", "run"),
        ("journal_corrupt_middle.jsonl", "resume"),
        ("journal_newer_format.jsonl", "resume"),
    ],
)
async def test_as_a_process_the_error_is_one_line_without_traceback(
    name: str, command: str, h: Harness
) -> None:
    path = h.tmp / name
    shutil.copyfile(HOSTILE / name, path)
    journal = h.tmp / "journal.jsonl"
    args = (
        ("run", "--ids", str(path), "--journal", str(journal), *LIMITS)
        if command == "run"
        else ("resume", "--journal", str(path))
    )
    truth = Truth(h.server)
    code, out, err = await cli(*args, env=h.env)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and str(path) in err, err
    assert truth.posts == collections.Counter()
    if command == "resume":
        assert path.read_bytes() == (HOSTILE / name).read_bytes()
