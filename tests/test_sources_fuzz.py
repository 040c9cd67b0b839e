"""Property-based fuzzing of bulkoffboard.sources: any bytes in, records or one clean error out.

Every reader (text, CSV, JSON, JSON Lines, the auto-detection sniffer and the stdin spool) is
driven with arbitrary bytes, arbitrary text (UTF-8, with a BOM and CRLF variants), soups of the
bytes that matter to the parsers, and mutations of valid files. The property, for auto-detection
and every forced format (the CLI's ``--ids-format`` choices), read as the CLI reads them:

- consuming the whole iterator completes and yields only :class:`SourceRecord` values whose
  ``machine_id`` is None (with a reason) or a lower-case 40-hex id, so nothing else can reach a
  URL; or
- it raises the package's :class:`~bulkoffboard.errors.UsageError` family (``SourceError``) with
  a one-line message naming the file;
- never any other exception.

The default examples keep this file to a few seconds; ``--soak`` runs the ``slow`` variants with
thousands of examples and larger inputs. End-to-end checks at the bottom drive the real command
line (in-process, ``--dry-run``, against the loopback emulator of tests/test_hostile_input.py).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bulkoffboard.cli import build_parser
from bulkoffboard.errors import SourceError, UsageError
from bulkoffboard.sources import (
    FORMATS,
    ID_NAMES,
    RAW_LIMIT,
    REASON_NOT_HEX,
    SourceRecord,
    detect_format,
    iter_records,
    spool_stdin,
)
from tests.test_hostile_input import (  # noqa: F401 - h and server: fixtures, found by name
    LIMITS,
    Harness,
    Ran,
    Truth,
    assert_clean_output,
    h,
    module_loop,
    server,
)

BOM = b"\xef\xbb\xbf"
ID_RE = re.compile(r"[0-9a-f]{40}")
T = TypeVar("T")


#: "auto" and every forced format (the command line's choices: see the next test).
DECLARED = ("auto", *FORMATS)


def test_the_fuzzed_formats_are_the_command_lines_choices() -> None:
    parser = build_parser()
    run = next(
        action.choices["run"]
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    option = next(o for o in run._actions if "--ids-format" in o.option_strings)
    assert option.choices is not None
    assert sorted(map(str, option.choices)) == sorted(DECLARED)


# -- the property ----------------------------------------------------------------------------------


def check_error(exc: UsageError, path: Path) -> None:
    """A clean refusal: one line that names the file."""
    assert isinstance(exc, SourceError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert message, "an empty error message"
    assert "\n" not in message and "\r" not in message, repr(message)
    assert str(path) in message, f"the message does not name {path}: {message!r}"


def check_records(records: list[Any], path: Path) -> None:
    """Only well-formed records: a lower-case 40-hex id, or None with a reason."""
    where = re.compile(re.escape(str(path)) + r":([1-9][0-9]*)")
    for record in records:
        assert isinstance(record, SourceRecord), record
        assert where.fullmatch(record.where), record
        assert isinstance(record.raw, str) and len(record.raw) <= RAW_LIMIT, record
        if record.machine_id is None:
            assert isinstance(record.reason, str) and record.reason, record
            assert not record.valid
        else:
            assert ID_RE.fullmatch(record.machine_id), record
            assert record.reason is None and record.valid, record


def consume(path: Path, declared: str) -> list[SourceRecord] | None:
    """Read ``path`` as the command line does (``detect_format``, then ``iter_records`` on the
    result) and check the property. Returns the records, or None when the file was refused."""
    try:
        fmt = detect_format(path, None if declared == "auto" else declared)
        assert fmt in FORMATS, fmt
        records = list(iter_records(path, fmt))
    except UsageError as exc:
        check_error(exc, path)
        return None
    check_records(records, path)
    if declared == "auto":
        # iter_records detecting on its own (it checks the sample first) agrees.
        try:
            again = list(iter_records(path, "auto"))
        except UsageError as exc:
            check_error(exc, path)
            raise AssertionError(f"refused only when iter_records detected: {exc}") from None
        assert again == records
    return records


def check_bytes(data: bytes, *, stdin: bool = True) -> None:
    """The property for one input, as a file in every declared format and through stdin."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        path = Path(tmp) / "ids"  # no suffix: auto really sniffs
        path.write_bytes(data)
        for declared in DECLARED:
            consume(path, declared)
        if stdin:
            # `--ids -`: the CLI spools stdin beside the journal, then reads the spool.
            spool = Path(tmp) / "journal.jsonl.stdin"
            assert spool_stdin(spool, io.BytesIO(data)) == len(data)
            assert spool.read_bytes() == data
            consume(spool, "auto")


# -- strategies ------------------------------------------------------------------------------------

#: The bytes the parsers care about (and a few that break decoders).
TOKENS: tuple[bytes, ...] = (
    b'"',
    b"'",
    b"\n",
    b"\r",
    b"\r\n",
    b"\0",
    b",",
    b";",
    b"\t",
    b"|",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b"\\",
    b"#",
    b" ",
    b"\x0b",
    b"\x85",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",  # an encoded surrogate
    b"\xe2\x80\xa8",  # U+2028
    BOM,
    b"sep=;",
    b'sep="',
    b"id",
    b"DeviceId",
    b"Device ID",
    b"value",
    b'"value"',
    b'"id":',
    b"\\u",
    b"\\ud800",
    b"null",
    b"1e999",
    b"-0",
    b"9" * 30,
    b"0123456789abcdef0123456789abcdef01234567",
    b"ABCDEF0123456789ABCDEF0123456789ABCDEF01",
)

ids40 = st.binary(min_size=20, max_size=20).map(bytes.hex)
any_case_ids = st.one_of(ids40, ids40.map(str.upper))
#: Cell text for CSV's other columns: anything csv can write.
cells = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=12)


@st.composite
def valid_files(draw: st.DrawFn) -> tuple[str, bytes, list[str]]:
    """A valid id file: ``(format, content, the ids it holds, lower-cased, in order)``."""
    machine_ids = draw(st.lists(any_case_ids, max_size=8))
    fmt = draw(st.sampled_from(("text", "csv", "json", "mde", "jsonl")))
    eol = draw(st.sampled_from(("\n", "\r\n")))
    if fmt == "text":
        lines = [draw(st.sampled_from(("", "# ids", "  "))) for _ in range(draw(st.integers(0, 2)))]
        lines += [f"{m}{draw(st.sampled_from(('', '  # note', ' ')))}" for m in machine_ids]
        text = eol.join(lines) + eol
    elif fmt == "csv":
        delimiter = draw(st.sampled_from((",", ";", "\t", "|")))
        others = draw(st.lists(st.sampled_from(("name", "Device Name", "os")), max_size=2))
        id_name = draw(st.sampled_from(ID_NAMES))
        at = draw(st.integers(0, len(others)))
        header = [*others[:at], id_name, *others[at:]]
        rows = [[draw(cells) for _ in others] for _ in machine_ids]
        # csv.writer leaves a CR unquoted when the line terminator is LF, which no reader
        # (RFC 4180, Excel, Python's) takes back: quote everything then, as Excel would.
        needs_quotes = any("\r" in cell for row in rows for cell in row)
        out = io.StringIO()
        if delimiter != "," and draw(st.booleans()):
            out.write(f"sep={delimiter}{eol}")
        writer = csv.writer(
            out,
            delimiter=delimiter,
            lineterminator=eol,
            quoting=csv.QUOTE_ALL if needs_quotes or draw(st.booleans()) else csv.QUOTE_MINIMAL,
        )
        writer.writerow(header)
        for machine_id, row in zip(machine_ids, rows, strict=True):
            writer.writerow([*row[:at], machine_id, *row[at:]])
        text = out.getvalue()
    elif fmt in ("json", "mde"):
        key = draw(st.sampled_from(("id", "machineId", "DeviceId", "Device ID", "ID")))
        elements: list[Any] = [
            m if draw(st.booleans()) else {key: m, "computerDnsName": draw(cells)}
            for m in machine_ids
        ]
        document: Any = elements
        if fmt == "mde":
            document = {"@odata.context": "https://api/$metadata#Machines", "value": elements}
        indent = draw(st.sampled_from((None, 2)))
        text = json.dumps(document, indent=indent, ensure_ascii=draw(st.booleans()))
        text = text.replace("\n", eol)
    else:
        text = "".join(
            (json.dumps(m) if draw(st.booleans()) else json.dumps({"DeviceId": m})) + eol
            for m in machine_ids
        )
    data = (BOM if draw(st.booleans()) else b"") + text.encode("utf-8")
    return fmt, data, [m.lower() for m in machine_ids]


MUTATIONS = ("flip", "insert", "run", "truncate", "delete", "duplicate")


@st.composite
def mutated(
    draw: st.DrawFn,
    base: st.SearchStrategy[bytes],
    max_run: int = 64,
    min_run: int = 2,
    ops: Sequence[str] = MUTATIONS,
) -> bytes:
    """``base`` after a few byte flips, insertions of parser bytes (one, or a run of copies),
    truncations, deletions and duplications of slices."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 6 if len(ops) > 1 else 1))):
        op = draw(st.sampled_from(ops))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            index = min(at, len(data) - 1)
            data[index] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.sampled_from(TOKENS))
        elif op == "run":
            data[at:at] = draw(st.sampled_from(TOKENS)) * draw(st.integers(min_run, max_run))
        elif op == "truncate":
            del data[at:]
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "duplicate":
            end = draw(st.integers(at, min(len(data), at + 64)))
            where = draw(st.integers(0, len(data)))
            data[where:where] = data[at:end]
    return bytes(data)


#: How real binary files start (a PDF's first line often ends in a lone CR).
MAGIC: tuple[bytes, ...] = (
    b"",
    b"%PDF-1.4\r%\xe2\xe3\xcf\xd3\r\n",
    b"\x89PNG\r\n\x1a\n",
    b"\x7fELF\x02\x01\x01\x00",
    b"MZ\x90\x00\x03\x00",
    b"\x1f\x8b\x08\x00",
    b"PK\x03\x04\x14\x00",
    b"\xff\xd8\xff\xe0\x00\x10JFIF",
    b"GIF89a",
    b"{\\rtf1\\ansi\r",
)


def binary_files(max_size: int) -> st.SearchStrategy[bytes]:
    """Uniformly random bytes after a file type's magic, with or without NUL bytes (Hypothesis's
    own binary() favours small and repeated bytes: real binary files look like this)."""

    def build(magic: bytes, rng: random.Random, size: int, nul: bool) -> bytes:
        tail = rng.randbytes(size)
        return magic + (tail if nul else tail.replace(b"\0", b"\x01"))

    return st.builds(
        build,
        st.sampled_from(MAGIC),
        st.randoms(use_true_random=False),
        st.integers(0, max_size),
        st.booleans(),
    )


def token_soup(max_size: int) -> st.SearchStrategy[bytes]:
    return st.lists(st.sampled_from(TOKENS), max_size=max_size).map(b"".join)


@st.composite
def texts(draw: st.DrawFn, max_size: int) -> bytes:
    """Arbitrary text as UTF-8, with or without a BOM, with LF or CRLF line ends."""
    text = draw(st.text(max_size=max_size))
    if draw(st.booleans()):
        text = text.replace("\r\n", "\n").replace("\n", "\r\n")
    return (BOM if draw(st.booleans()) else b"") + text.encode("utf-8")


valid_bytes = valid_files().map(lambda found: found[1])


# -- running the properties ----------------------------------------------------------------------


class Mode(NamedTuple):
    """How hard to fuzz: ``examples`` per property, input sizes times ``scale``."""

    examples: int
    scale: int


#: The default run keeps this file to seconds; --soak runs thousands of larger examples.
MODES = (
    pytest.param(Mode(200, 1), id="ci"),
    pytest.param(Mode(3000, 8), id="soak", marks=pytest.mark.slow),
)


def fuzz(examples: int, strategy: st.SearchStrategy[T], check: Callable[[T], None]) -> None:
    """Run ``check`` over ``examples`` draws of ``strategy``."""

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(strategy)
    def run(value: T) -> None:
        check(value)

    run()


@pytest.mark.parametrize("mode", MODES)
def test_arbitrary_bytes(mode: Mode) -> None:
    size = 512 * mode.scale
    fuzz(mode.examples, st.one_of(st.binary(max_size=size), binary_files(size)), check_bytes)


@pytest.mark.parametrize("mode", MODES)
def test_soups_of_parser_bytes(mode: Mode) -> None:
    fuzz(mode.examples, token_soup(40 * mode.scale), check_bytes)


@pytest.mark.parametrize("mode", MODES)
def test_arbitrary_text_with_bom_and_crlf(mode: Mode) -> None:
    fuzz(mode.examples, texts(300 * mode.scale), check_bytes)


@pytest.mark.parametrize("mode", MODES)
def test_mutations_of_valid_files(mode: Mode) -> None:
    fuzz(2 * mode.examples, mutated(valid_bytes, max_run=256 * mode.scale), check_bytes)


@pytest.mark.parametrize("mode", MODES)
def test_long_lines_and_large_values(mode: Mode) -> None:
    """Runs past a line (4 KiB), a read chunk (64 KiB) and a JSON value (1 MiB)."""
    big = mutated(valid_bytes, max_run=40_000, min_run=4_000, ops=("run",))
    fuzz(mode.examples // 10, mutated(big, ops=("flip", "insert", "duplicate")), check_bytes)


@pytest.mark.parametrize("mode", MODES)
def test_valid_files_read_back_exactly(mode: Mode) -> None:
    """The unmutated files are read as before: every id, in order, by detection and forced."""

    def check(found: tuple[str, bytes, list[str]]) -> None:
        fmt, data, expected = found
        forced = "json" if fmt == "mde" else fmt
        with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
            path = Path(tmp) / "ids"
            path.write_bytes(data)
            for declared in ("auto", forced):
                records = consume(path, declared)
                assert records is not None, (declared, data)
                assert [r.machine_id for r in records] == expected, (declared, data)

    fuzz(mode.examples, valid_files(), check)


# -- regressions -----------------------------------------------------------------------------------

#: The first line of a binary file (the start of a Windows executable, no NUL bytes before the
#: first LF) holds a lone CR: the sniffer's CSV split raised ``_csv.Error: new-line character
#: seen in unquoted field`` with a traceback, before any journal existed (issue 12).
BINARY_WITH_CR = b'MZ\x90\x03"\xff\xb8@\r\x0e\x1f\xba\x0e\xb4\t\xcd!\nThis program\x00\x00\x00'

#: A PDF as many writers start one: the first line break is a lone CR.
PDF = b"%PDF-1.4\r%\xe2\xe3\xcf\xd3\r\n1 0 obj\r<< /Length 5 >>\rstream\r\x00\x01\x02\x03\r"

REGRESSIONS: dict[str, bytes] = {
    "binary, lone CR in the first line": BINARY_WITH_CR,
    "PDF": PDF,
    "text, lone CR": b"a\rb\n",
    "text, quote then lone CR": b'"x\r1,2\n',
    "CSV header with a lone CR": b"id\r,name\n0123456789abcdef0123456789abcdef01234567,x\n",
    "CSV row with a lone CR": b"id,name\nab\rcd,x\n0123456789abcdef0123456789abcdef01234567,y\n",
    "classic Mac line ends": b"id\r0123456789abcdef0123456789abcdef01234567\r",
    "sep hint, quote as delimiter": b'sep="\nid"name\n"a"b\n',
    "JSON Lines nested deep": b'{"id":' + b"[" * 1000 + b"]" * 1000 + b"}\n",
    "JSON element nested deep": b"[" + b"[" * 990 + b"]" * 990 + b"]\n",
    "JSON id nested deep": b'[{"id":' + b"[" * 990 + b"]" * 990 + b"}]\n",
}


@pytest.mark.parametrize("data", list(REGRESSIONS.values()), ids=list(REGRESSIONS))
def test_regressions(data: bytes) -> None:
    check_bytes(data)


ID = "0123456789abcdef0123456789abcdef01234567"
#: What some of them read as: an error naming the line (a fragment of it), or the records as
#: ``(machine_id, reason, raw)``.
READ_AS: dict[str, tuple[bytes, str, str | list[tuple[str | None, str | None, str]]]] = {
    "binary file": (BINARY_WITH_CR, "auto", "ids: looks binary"),
    "PDF": (PDF, "auto", "ids: looks binary"),
    "text, lone CR": (b"a\rb\n", "auto", [(None, REASON_NOT_HEX, "a\rb")]),
    "CSV header with a lone CR": (
        REGRESSIONS["CSV header with a lone CR"],
        "auto",
        "ids:1: malformed CSV header: a carriage return (CR) inside an unquoted field",
    ),
    "CSV row with a lone CR": (
        REGRESSIONS["CSV row with a lone CR"],
        "csv",
        [
            (
                None,
                "malformed CSV row: a carriage return (CR) inside an unquoted field",
                "ab\rcd,x",
            ),
            (ID, None, ID),
        ],
    ),
    "classic Mac line ends": (
        REGRESSIONS["classic Mac line ends"],
        "auto",
        [(None, REASON_NOT_HEX, f"id\r{ID}")],
    ),
    "Excel's sep= line naming a tab": (
        f"sep=\t\nname\tid\nx\t{ID}\n".encode(),
        "auto",
        [(ID, None, ID)],
    ),
    "JSON Lines nested deep": (
        REGRESSIONS["JSON Lines nested deep"],
        "auto",
        [(None, "id is an array, not a string", "[...]")],
    ),
}


@pytest.mark.parametrize("case", list(READ_AS.values()), ids=list(READ_AS))
def test_what_the_regressions_read_as(
    case: tuple[bytes, str, str | list[tuple[str | None, str | None, str]]],
) -> None:
    data, declared, expected = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ids"
        path.write_bytes(data)
        records = consume(path, declared)
        if isinstance(expected, str):
            assert records is None, records
            with pytest.raises(SourceError) as info:
                list(iter_records(path, detect_format(path, declared)))
            assert f"{tmp}/{expected}" in str(info.value)
        else:
            assert records is not None
            assert [(r.machine_id, r.reason, r.raw) for r in records] == expected


def test_the_binary_file_of_issue_12_is_refused_as_binary_not_a_traceback() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "some-binary-file"
        path.write_bytes(BINARY_WITH_CR)
        fmt = detect_format(path)  # raised _csv.Error before the fix
        assert fmt in FORMATS
        with pytest.raises(SourceError, match=r"not valid UTF-8|looks binary") as info:
            list(iter_records(path, fmt))
        check_error(info.value, path)


@pytest.mark.parametrize("depth", [*range(900, 1040, 7), 5000])
@pytest.mark.parametrize("shape", ["jsonl", "json element", "json id"])
def test_deep_nesting_is_an_invalid_record_or_one_error_at_any_depth(
    depth: int, shape: str
) -> None:
    """Nesting near the recursion limit: parsed by one library, then too deep to show."""
    nested = b"[" * depth + b"]" * depth
    data = {
        "jsonl": b'{"id":' + nested + b"}\n",
        "json element": b"[" + nested + b"]",
        "json id": b'[{"id":' + nested + b"}]",
    }[shape]
    check_bytes(data, stdin=False)


# -- end to end: the real command line ----------------------------------------------------------


def random_files() -> list[bytes]:
    """Fixed pseudo-random inputs for the command line (seeded, so every run sees the same)."""
    rng = random.Random(12)
    files = [BINARY_WITH_CR, b"a\rb\n", REGRESSIONS["JSON Lines nested deep"], PDF]
    files += [rng.randbytes(size) for size in (1, 16, 300, 5000, 70_000)]
    # No NUL bytes: past the binary check, into the parsers.
    files += [bytes(rng.choices(range(1, 256), k=size)) for size in (40, 400, 9000)]
    files += [b"".join(rng.choices(TOKENS, k=size)) for size in (30, 200)]
    valid = b"\n".join(
        hashlib.sha1(bytes([n]), usedforsecurity=False).hexdigest().encode() for n in range(5)
    )
    for _ in range(3):
        data = bytearray(valid)
        for _ in range(4):
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.choice(TOKENS)
        files.append(bytes(data))
    return files


RANDOM_FILES = random_files()


def check_cli(ran: Ran, path: Path, truth: Truth) -> None:
    """Exit 0 with a plan that names only valid ids, or exit 2 with one line naming the file;
    never a traceback, and nothing sent."""
    assert_clean_output(ran)
    assert ran.code in (0, 2), ran
    if ran.code == 2:
        lines = ran.err.strip().splitlines()
        assert len(lines) == 1, ran.err
        assert lines[0].startswith("bulkoffboard: error: "), lines[0]
        assert str(path) in lines[0], lines[0]
    else:
        plan = orjson.loads(ran.out)
        for row in plan["machines"]:
            assert row["action"] != "offboard" or ID_RE.fullmatch(row["machine_id"]), row
            assert not row["machine_id"] or ID_RE.fullmatch(row["machine_id"]), row
    assert truth.posts == {} and truth.malformed == []


@pytest.fixture
def harness(request: pytest.FixtureRequest) -> Harness:
    """tests/test_hostile_input.py's ``h``: this module's emulator, its environment, a folder
    and captured output."""
    found = request.getfixturevalue("h")
    assert isinstance(found, Harness)
    return found


async def dry_run(harness: Harness, *args: str) -> Ran:
    """``bulkoffboard run ARGS --dry-run``: planned as for real, nothing sent."""
    return await harness.run(
        "run", *args, "--dry-run", "--format", "json", "--no-preflight", *LIMITS
    )


@module_loop
@pytest.mark.parametrize("index", range(len(RANDOM_FILES)))
async def test_the_command_line_reads_random_files_cleanly(index: int, harness: Harness) -> None:
    data = RANDOM_FILES[index]
    path = harness.tmp / "some-binary-file"
    path.write_bytes(data)
    truth = Truth(harness.server)
    for declared in ("auto", FORMATS[index % len(FORMATS)]):
        ran = await dry_run(harness, "--ids", str(path), "--ids-format", declared)
        check_cli(ran, path, truth)
    assert path.read_bytes() == data


@module_loop
@pytest.mark.parametrize("index", [0, 1, 2, 6, 9, 13])
async def test_the_command_line_reads_random_stdin_cleanly(
    index: int, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--ids -``: standard input is spooled beside the journal and read from there."""
    data = RANDOM_FILES[index]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    journal = harness.tmp / "journal.jsonl"
    truth = Truth(harness.server)
    ran = await dry_run(harness, "--ids", "-", "--journal", str(journal))
    spool = journal.with_name(journal.name + ".stdin")
    check_cli(ran, spool, truth)
    assert spool.read_bytes() == data


@module_loop
async def test_the_command_line_refuses_the_binary_file_of_issue_12(harness: Harness) -> None:
    """``run --ids some-binary-file --yes`` ended in ``_csv.Error`` from the sniffer."""
    path = harness.tmp / "some-binary-file"
    path.write_bytes(BINARY_WITH_CR)
    journal = harness.tmp / "journal.jsonl"
    truth = Truth(harness.server)
    ran = await harness.run("run", "--ids", str(path), "--journal", str(journal), "--yes", *LIMITS)
    check_cli(ran, path, truth)
    assert ran.code == 2
    assert not journal.exists()
