"""Machine ids from files: plain text, CSV, JSON and JSON Lines, read as a stream.

Every value is validated here, before anything else sees it: :func:`iter_records` yields one
:class:`SourceRecord` per value, carrying either the normalised lower-case 40-hex id or the reason
it was rejected (the runner journals those as ``invalid_id`` and sends nothing for them).

Nothing here holds a whole file in memory. Text, CSV and JSON Lines are read line by line, and a
line longer than :data:`MAX_LINE_BYTES` is skipped in bounded pieces; a JSON document is decoded
one array element at a time from a sliding window, so a file of a million ids costs a few hundred
KiB however it is laid out.

Problems with the file as a whole (missing, unreadable, not UTF-8, binary, the wrong shape) raise
:class:`~bulkoffboard.errors.SourceError` with one line that names the file and, where it applies,
the line. Because reading is lazy, such an error can surface part-way through the iteration.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import os
import re
import stat
import tempfile
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import orjson

from bulkoffboard.errors import SourceError
from bulkoffboard.idtable import IdTable
from bulkoffboard.models import describe_invalid, normalize_machine_id

__all__ = [
    "FORMATS",
    "ID_NAMES",
    "MAX_JSON_VALUE_CHARS",
    "MAX_LINE_BYTES",
    "RAW_LIMIT",
    "REASON_EMPTY",
    "REASON_LINE_TOO_LONG",
    "REASON_NOT_HEX",
    "REASON_NO_ID_KEY",
    "REASON_NUL",
    "REASON_VALUE_TOO_LONG",
    "Deduplicator",
    "SourceRecord",
    "detect_format",
    "iter_records",
    "spool_stdin",
]

#: The input formats :func:`iter_records` understands (plus ``"auto"``, which detects one).
FORMATS: Final = ("text", "csv", "json", "jsonl")

#: Column names (CSV) and keys (JSON) that carry the machine id, matched case-insensitively and
#: white-space-trimmed. When several are present the first in this order wins.
ID_NAMES: Final = ("id", "machineId", "DeviceId", "Device ID")

#: A line longer than this (terminator excluded) is an invalid record, read in bounded pieces.
MAX_LINE_BYTES: Final = 4096

#: A single JSON value larger than this is refused (a too-long string becomes an invalid record).
MAX_JSON_VALUE_CHARS: Final = 1 << 20

#: ``SourceRecord.raw`` is cut to at most this many characters.
RAW_LIMIT: Final = 200

REASON_NOT_HEX: Final = "not a 40-hex machine id"
REASON_EMPTY: Final = "empty id"
REASON_NUL: Final = "NUL byte"
REASON_LINE_TOO_LONG: Final = "line too long"
REASON_VALUE_TOO_LONG: Final = "value too long"
REASON_NO_ID_KEY: Final = "object without an id key (id, machineId, DeviceId, Device ID)"

_ID_KEYS: Final = tuple(name.casefold() for name in ID_NAMES)
_SUFFIX_FORMATS: Final[Mapping[str, str]] = types.MappingProxyType(
    {
        ".txt": "text",
        ".list": "text",
        ".csv": "csv",
        ".json": "json",
        ".jsonl": "jsonl",
        ".ndjson": "jsonl",
    }
)
_CSV_DELIMITERS: Final = (",", ";", "\t", "|")
#: Excel's ``sep=X`` line; matched on the unstripped line, so that a tab (``sep=\t``) is a
#: delimiter and not trailing white space.
_CSV_SEP_HINT: Final = re.compile(r"\s*sep=(.)\s*", re.IGNORECASE)
_JSON_WS: Final = re.compile(r"[ \t\r\n]*")
_ASCII_WS: Final = b" \t\r\n\f\v"
#: Control bytes that do not occur in text files (tab, LF, VT, FF and CR do).
_CONTROL_BYTES: Final = bytes(b for b in range(32) if b not in (9, 10, 11, 12, 13)) + b"\x7f"
_BOM: Final = codecs.BOM_UTF8
_CHUNK: Final = 64 * 1024
_SNIFF_BYTES: Final = 8192
_SPOOL_CHUNK: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """One value read from an input file.

    ``where`` is ``"path:LINE"`` (1-based; for a JSON element the line it starts on), ``raw`` the
    value as read, cut to :data:`RAW_LIMIT` characters. Exactly one of ``machine_id`` (the
    lower-case 40-hex id) and ``reason`` (why the value was rejected) is set.
    """

    where: str
    raw: str
    machine_id: str | None
    reason: str | None

    @property
    def valid(self) -> bool:
        """True when the value is a usable machine id."""
        return self.machine_id is not None


# --------------------------------------------------------------------------------------------
# Public API


def detect_format(path: Path, declared: str | None = None) -> str:
    """The format of ``path``: one of :data:`FORMATS`.

    ``declared`` wins when given (``None`` or ``"auto"`` mean detect). Otherwise the suffix
    decides (.txt/.list, .csv, .json, .jsonl/.ndjson), and failing that the first non-blank line:
    ``[`` is JSON; ``{`` is JSON Lines when that line is a complete object (and not MDE's
    ``{"value": [...]}``), else JSON; ``#`` is text; a line naming an id column (split on comma,
    semicolon, tab or bar), an Excel ``sep=`` line or a line with a comma is CSV; a line holding
    a JSON string that is a machine id is JSON Lines; anything else is text.
    """
    if declared is not None:
        wanted = declared.strip().lower()
        if wanted != "auto":
            if wanted not in FORMATS:
                raise SourceError(
                    f"{path}: unknown input format {declared!r}; "
                    f"expected one of auto, {', '.join(FORMATS)}"
                )
            return wanted
    by_suffix = _SUFFIX_FORMATS.get(path.suffix.lower())
    if by_suffix is not None:
        return by_suffix
    with _open(path) as fh:
        try:
            return _sniff(fh)
        except OSError as exc:
            raise _read_error(path, exc) from None


def iter_records(path: Path, fmt: str = "auto") -> Iterator[SourceRecord]:
    """Stream the values of ``path`` as :class:`SourceRecord`, in file order.

    ``fmt`` is one of :data:`FORMATS` or ``"auto"`` (see :func:`detect_format`). The file is
    opened and checked (exists, is a readable regular file, does not look binary) before this
    returns, so those errors are raised by the call itself; problems further in the file are
    raised while iterating. Duplicates are kept: this is a pure view of the file.
    """
    with _open(path) as fh:
        try:
            sample = fh.read(_SNIFF_BYTES)
        except OSError as exc:
            raise _read_error(path, exc) from None
    _check_sample(path, sample)
    return _records(path, detect_format(path, fmt))


def spool_stdin(dest: Path, stream: BinaryIO) -> int:
    """Copy ``stream`` (standard input) to ``dest`` and return the number of bytes copied.

    The copy is written to a private (0o600) temporary file beside ``dest``, fsynced, and renamed
    over ``dest``, so ``dest`` is either absent or complete. Raises :class:`SourceError` when the
    copy cannot be made.
    """
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise SourceError(f"{dest}: cannot spool standard input: {_strerror(exc)}") from None
    tmp = Path(tmp_name)
    total = 0
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            while chunk := stream.read(_SPOOL_CHUNK):
                out.write(chunk)
                total += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SourceError(f"{dest}: cannot spool standard input: {_strerror(exc)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)
    return total


class Deduplicator:
    """A memory-lean set of machine ids already seen (about 28 bytes an id).

    Ids are stored as their 20 raw bytes in an :class:`~bulkoffboard.idtable.IdTable` rather
    than as 40-character strings, so upper- and lower-case spellings of one id are the same
    entry.
    """

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen = IdTable()

    def add(self, machine_id: str) -> bool:
        """Record ``machine_id``; True when it was not seen before.

        Raises ValueError when ``machine_id`` is not a 40-hex id (validate with
        :func:`~bulkoffboard.models.normalize_machine_id` first).
        """
        key = _id_bytes(machine_id)
        if key is None:
            raise ValueError(f"not a 40-hex machine id: {describe_invalid(str(machine_id))}")
        size = len(self._seen)
        self._seen.add(key)
        return len(self._seen) > size

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, machine_id: object) -> bool:
        if not isinstance(machine_id, str):
            return False
        key = _id_bytes(machine_id)
        return key is not None and key in self._seen


# --------------------------------------------------------------------------------------------
# Opening and checking files


def _open(path: Path) -> io.BufferedReader:
    """Open ``path`` for binary reading; SourceError unless it is a readable regular file."""
    with contextlib.suppress(OSError, ValueError):  # open() below names any error properly
        # Look before opening: opening a FIFO with no writer would wait forever.
        if stat.S_ISFIFO(path.stat().st_mode):
            raise SourceError(
                f"{path}: not a regular file (to read a pipe, feed it on standard input)"
            )
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise SourceError(f"{path}: is a directory, not a file of machine ids") from None
    except PermissionError:
        raise SourceError(f"{path}: permission denied") from None
    except OSError as exc:
        raise SourceError(f"{path}: cannot open: {_strerror(exc)}") from None
    except ValueError:  # a NUL byte in the name (from a hand-edited journal, say)
        raise SourceError(
            f"{describe_invalid(str(path), 200)}: cannot open: a NUL byte in the file name"
        ) from None
    try:
        mode = os.fstat(fh.fileno()).st_mode
    except OSError as exc:
        fh.close()
        raise SourceError(f"{path}: cannot open: {_strerror(exc)}") from None
    if stat.S_ISDIR(mode):
        fh.close()
        raise SourceError(f"{path}: is a directory, not a file of machine ids")
    if not stat.S_ISREG(mode):
        fh.close()
        raise SourceError(f"{path}: not a regular file (to read a pipe, feed it on standard input)")
    return fh


def _check_sample(path: Path, sample: bytes) -> None:
    """Refuse UTF-16/32 and binary files from their first bytes."""
    if sample.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise SourceError(f"{path}: is UTF-16 or UTF-32 encoded; save it as UTF-8")
    if _looks_binary(sample):
        raise SourceError(
            f"{path}: looks binary (NUL bytes in the first {_SNIFF_BYTES // 1024} KiB); "
            "expected a text, CSV or JSON file of machine ids"
        )


def _looks_binary(sample: bytes) -> bool:
    """NUL bytes in a sample that is not otherwise readable text.

    A stray NUL in a text file is a per-value problem (an invalid record), so the sample must
    also fail to decode as UTF-8 or be more than a tenth control bytes (UTF-16 without a BOM,
    images, archives, executables).
    """
    if b"\0" not in sample:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return True
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    return controls * 10 > len(sample)


def _sniff(fh: BinaryIO) -> str:
    """Guess the format from the first non-blank line (see :func:`detect_format`)."""
    offset = 0
    while True:
        chunk = fh.read(_CHUNK)
        if not chunk:
            return "text"  # empty or blank: zero records whatever the format
        skip = len(_BOM) if offset == 0 and chunk.startswith(_BOM) else 0
        body = chunk[skip:]
        rest = body.lstrip(_ASCII_WS)
        if rest:
            start = offset + skip + len(body) - len(rest)
            break
        offset += len(chunk)
    fh.seek(start)
    line = fh.readline(MAX_LINE_BYTES + 8).rstrip(b"\r\n")
    first = line[:1]
    if first == b"[":
        return "json"
    if first == b"{":
        parsed = _try_orjson(line)
        if isinstance(parsed, dict) and not _has_value_array(parsed):
            return "jsonl"
        return "json"
    if first == b"#":
        return "text"
    text = line.decode("utf-8", "replace")
    if _CSV_SEP_HINT.fullmatch(text) is not None:
        return "csv"
    for delimiter in _CSV_DELIMITERS:
        try:
            cells = _split_csv_line(text, delimiter)
        except csv.Error:
            continue  # csv cannot split it (a bare CR outside quotes): not a header this way
        if _id_column(cells) is not None:
            return "csv"
    if first == b'"':
        parsed = _try_orjson(line)
        if isinstance(parsed, str) and normalize_machine_id(parsed) is not None:
            return "jsonl"
    if b"," in line:
        return "csv"
    return "text"


def _try_orjson(data: bytes) -> Any:
    """``orjson.loads(data)``, or None when it is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None


def _has_value_array(obj: dict[Any, Any]) -> bool:
    """True for MDE's ``{"value": [...]}`` shape."""
    return any(
        isinstance(key, str) and key.strip().casefold() == "value" and isinstance(item, list)
        for key, item in obj.items()
    )


def _records(path: Path, fmt: str) -> Iterator[SourceRecord]:
    """The generator behind :func:`iter_records`: opens the file only once iterated."""
    with _open(path) as fh:
        try:
            if fmt == "text":
                yield from _text_records(path, fh)
            elif fmt == "csv":
                yield from _csv_records(path, fh)
            elif fmt == "json":
                yield from _json_records(path, fh)
            else:
                yield from _jsonl_records(path, fh)
        except OSError as exc:
            raise _read_error(path, exc) from None


def _read_error(path: Path, exc: OSError) -> SourceError:
    return SourceError(f"{path}: read failed: {_strerror(exc)}")


def _strerror(exc: OSError) -> str:
    return exc.strerror or str(exc).replace("\n", " ")


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# Values


def _clip(value: str) -> str:
    """``value`` cut to :data:`RAW_LIMIT` characters for display."""
    if len(value) <= RAW_LIMIT:
        return value
    return value[: RAW_LIMIT - 3] + "..."


def _check(where: str, value: str) -> SourceRecord:
    """Validate one id value."""
    raw = _clip(value)
    if "\0" in value:
        return SourceRecord(where, raw, None, REASON_NUL)
    if not value.strip():
        return SourceRecord(where, raw, None, REASON_EMPTY)
    machine_id = normalize_machine_id(value)
    if machine_id is None:
        return SourceRecord(where, raw, None, REASON_NOT_HEX)
    return SourceRecord(where, raw, machine_id, None)


def _id_bytes(value: str) -> bytes | None:
    """The 20 bytes of a 40-hex id, or None."""
    if len(value) != 40:
        return None
    try:
        key = bytes.fromhex(value)
    except ValueError:
        return None
    return key if len(key) == 20 else None


def _id_column(cells: list[str]) -> int | None:
    """Index of the id column in a CSV header, by :data:`ID_NAMES` priority."""
    folded = [cell.strip().casefold() for cell in cells]
    for name in _ID_KEYS:
        if name in folded:
            return folded.index(name)
    return None


def _id_key(obj: dict[Any, Any]) -> Any:
    """The key of ``obj`` carrying the id (by :data:`ID_NAMES` priority), or None."""
    folded: dict[str, Any] = {}
    for key in obj:
        if isinstance(key, str):
            folded.setdefault(key.strip().casefold(), key)
    for name in _ID_KEYS:
        if name in folded:
            return folded[name]
    return None


def _kind(value: Any) -> str:
    """A JSON type name with its article, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _dump(value: Any) -> str:
    """Compact JSON text of a decoded value, for ``raw``; never fails.

    A value nested close to the recursion limit was parsed (orjson goes 1024 levels deep, and
    the decoder ran a few frames higher up the stack) but may be too deep for the encoder: it
    is shown by its kind alone.
    """
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    except (RecursionError, ValueError, TypeError):
        if isinstance(value, list):
            return "[...]"
        if isinstance(value, dict):
            return "{...}"
        return f"({_kind(value)})"


@dataclass(frozen=True, slots=True)
class _Oversized:
    """Stands in for a JSON string longer than :data:`MAX_JSON_VALUE_CHARS` (already skipped)."""

    preview: str


def _element(where: str, value: Any) -> SourceRecord:
    """Validate one JSON value: an id string, or an object carrying one."""
    if isinstance(value, _Oversized):
        return SourceRecord(where, _clip(value.preview), None, REASON_VALUE_TOO_LONG)
    if isinstance(value, str):
        return _check(where, value)
    if isinstance(value, dict):
        key = _id_key(value)
        if key is None:
            return SourceRecord(where, _clip(_dump(value)), None, REASON_NO_ID_KEY)
        found = value[key]
        if isinstance(found, str):
            return _check(where, found)
        return SourceRecord(where, _clip(_dump(found)), None, f"id is {_kind(found)}, not a string")
    return SourceRecord(
        where, _clip(_dump(value)), None, f"expected a string or an object, got {_kind(value)}"
    )


# --------------------------------------------------------------------------------------------
# Line formats: text, CSV, JSON Lines


def _lines(fh: BinaryIO, path: Path) -> Iterator[tuple[int, str | None, str]]:
    """Yield ``(line number, text, preview)`` for each line, terminator and BOM removed.

    ``text`` is None for a line longer than :data:`MAX_LINE_BYTES`; the rest of such a line is
    read and dropped in bounded pieces, and ``preview`` holds its beginning. Raises SourceError
    naming the line when a line is not valid UTF-8.
    """
    limit = MAX_LINE_BYTES + 8  # room for a BOM and CRLF
    number = 0
    while True:
        piece = fh.readline(limit)
        if not piece:
            return
        number += 1
        complete = piece.endswith(b"\n")
        if number == 1 and piece.startswith(_BOM):
            piece = piece[len(_BOM) :]
        if not complete and len(piece) >= limit - len(_BOM):
            preview = piece[: RAW_LIMIT * 4].decode("utf-8", "replace")
            while True:
                more = fh.readline(_CHUNK)
                if not more or more.endswith(b"\n"):
                    break
            yield number, None, preview
            continue
        if complete:
            piece = piece[:-1]
        if piece.endswith(b"\r"):
            piece = piece[:-1]
        if len(piece) > MAX_LINE_BYTES:
            yield number, None, piece[: RAW_LIMIT * 4].decode("utf-8", "replace")
            continue
        try:
            text = piece.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SourceError(
                f"{path}:{number}: not valid UTF-8 (byte 0x{piece[exc.start]:02x} at column "
                f"{exc.start + 1}); save the file as UTF-8"
            ) from None
        yield number, text, ""


def _text_records(path: Path, fh: BinaryIO) -> Iterator[SourceRecord]:
    """One id a line; ``#`` starts a comment; blank lines are skipped."""
    name = str(path)
    for number, text, preview in _lines(fh, path):
        where = f"{name}:{number}"
        if text is None:
            yield SourceRecord(where, _clip(preview), None, REASON_LINE_TOO_LONG)
            continue
        value = text.split("#", 1)[0].strip()
        if value:
            yield _check(where, value)


def _split_csv_line(text: str, delimiter: str) -> list[str]:
    """The cells of one CSV line.

    Raises :class:`csv.Error` when the csv module cannot split it: a carriage return outside
    quotes (lines are split on LF only), or a ``sep=`` delimiter it refuses (raised as
    TypeError or ValueError at construction, depending on the Python version).
    """
    try:
        return next(csv.reader([text], delimiter=delimiter), [])
    except (TypeError, ValueError) as exc:
        raise csv.Error(str(exc)) from None


def _is_stray_cr(exc: csv.Error) -> bool:
    """True when csv refused a carriage return outside quotes (lines are split on LF only, so
    that is the only line break csv can see there)."""
    return str(exc).startswith("new-line character seen in unquoted field")


def _csv_problem(exc: csv.Error) -> str:
    """What :class:`csv.Error` ``exc`` means, in one line and without Python's advice."""
    if _is_stray_cr(exc):
        return "a carriage return (CR) inside an unquoted field"
    return " ".join(str(exc).split()) or "unreadable row"


class _CsvFeed:
    """Feeds decoded lines to :func:`csv.reader`, remembering line numbers and over-long lines.

    ``line`` and ``text`` are the number and text (a preview when over-long) of the last line
    fed.
    """

    __slots__ = ("_lines", "line", "text", "too_long")

    def __init__(self, lines: Iterator[tuple[int, str | None, str]], line: int) -> None:
        self._lines = lines
        self.line = line
        self.text = ""
        self.too_long: list[tuple[int, str]] = []

    def __iter__(self) -> _CsvFeed:
        return self

    def __next__(self) -> str:
        number, text, preview = next(self._lines)
        self.line = number
        if text is None:
            self.text = preview
            self.too_long.append((number, preview))
            return "\n"
        self.text = text
        return text + "\n"


def _csv_records(path: Path, fh: BinaryIO) -> Iterator[SourceRecord]:
    """Rows of a CSV file with a header naming the id column (see :data:`ID_NAMES`)."""
    name = str(path)
    lines = _lines(fh, path)
    found = _csv_header(path, lines)
    if found is None:
        return
    header_line, header, column, delimiter = found
    width = len(header)
    feed = _CsvFeed(lines, header_line)
    reader = csv.reader(feed, delimiter=delimiter)
    end = header_line
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if not _is_stray_cr(exc):  # a field over csv's limit: a runaway quote, rows lost
                raise SourceError(
                    f"{name}:{feed.line}: malformed CSV: {_csv_problem(exc)}"
                ) from None
            # A bad row, like a bad line of text: csv drops the rest of the line and goes on.
            end = feed.line
            feed.too_long.clear()
            yield SourceRecord(
                f"{name}:{end}", _clip(feed.text), None, f"malformed CSV row: {_csv_problem(exc)}"
            )
            continue
        start, end = end + 1, feed.line
        if feed.too_long:
            number, preview = feed.too_long[0]
            feed.too_long.clear()
            yield SourceRecord(f"{name}:{number}", _clip(preview), None, REASON_LINE_TOO_LONG)
            continue
        if not any(cell.strip() for cell in row):
            continue
        where = f"{name}:{start}"
        if len(row) < width:
            yield SourceRecord(
                where,
                _clip(delimiter.join(row)),
                None,
                f"short row: {len(row)} of the header's {width} fields",
            )
            continue
        yield _check(where, row[column])


def _csv_header(
    path: Path, lines: Iterator[tuple[int, str | None, str]]
) -> tuple[int, list[str], int, str] | None:
    """Find the header: ``(line, cells, id column, delimiter)``, or None for a blank file.

    Skips blank lines and an Excel ``sep=X`` line (which fixes the delimiter); otherwise the
    delimiter is the first of comma, semicolon, tab and bar that yields an id column.
    """
    forced: str | None = None
    for number, text, _preview in lines:
        if text is None:
            raise SourceError(
                f"{path}:{number}: the first row is longer than {MAX_LINE_BYTES} bytes; "
                "expected a CSV header"
            )
        if not text.strip():
            continue
        hint = _CSV_SEP_HINT.fullmatch(text)
        if forced is None and hint is not None:
            forced = hint.group(1)
            continue
        cells: list[str] | None = None  # the first split that worked, to show
        problem: csv.Error | None = None
        for delimiter in (forced,) if forced is not None else _CSV_DELIMITERS:
            try:
                split = _split_csv_line(text, delimiter)
            except csv.Error as exc:
                problem = problem or exc
                continue
            column = _id_column(split)
            if column is not None:
                return number, split, column, delimiter
            cells = cells if cells is not None else split
        if cells is None:
            reason = _csv_problem(problem) if problem is not None else "unreadable"
            raise SourceError(f"{path}:{number}: malformed CSV header: {reason}")
        shown = ", ".join(describe_invalid(cell, 40) for cell in cells[:20])
        if len(cells) > 20:
            shown += f", ... ({len(cells)} columns)"
        raise SourceError(
            f"{path}:{number}: no id column (expected one of {', '.join(ID_NAMES)}); "
            f"the header is: {shown}"
        )
    return None


def _jsonl_records(path: Path, fh: BinaryIO) -> Iterator[SourceRecord]:
    """Each non-blank line a JSON string or an object with an id key."""
    name = str(path)
    for number, text, preview in _lines(fh, path):
        where = f"{name}:{number}"
        if text is None:
            yield SourceRecord(where, _clip(preview), None, REASON_LINE_TOO_LONG)
            continue
        stripped = text.strip()
        if not stripped:
            continue
        if "\0" in stripped:
            yield SourceRecord(where, _clip(stripped), None, REASON_NUL)
            continue
        yield _element(where, _parse_json_line(where, stripped))


def _parse_json_line(where: str, text: str) -> Any:
    """Parse one JSON Lines line with orjson, falling back to the standard library.

    The fallback accepts what orjson refuses but Python reads (lone surrogates, NaN); a line
    neither accepts is malformed, reported with the standard library's message.
    """
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(text, strict=False)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{where}: malformed JSON at column {exc.colno}: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:
        raise SourceError(f"{where}: unreadable JSON value: {exc}") from None


# --------------------------------------------------------------------------------------------
# JSON documents, streamed


class _JsonStream:
    """A sliding window over a JSON file, decoding one value at a time.

    The file is read in :data:`_CHUNK` pieces and decoded incrementally; consumed text is
    dropped on each refill, so memory stays near one chunk plus the largest single value.
    ``line`` is the 1-based line of the read position.
    """

    __slots__ = (
        "_buf",
        "_decoder",
        "_eof",
        "_fh",
        "_name",
        "_newlines",
        "_pos",
        "_scanner",
        "_started",
        "line",
    )

    def __init__(self, fh: BinaryIO, name: str) -> None:
        self._fh = fh
        self._name = name
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._scanner = json.JSONDecoder(strict=False)
        self._buf = ""
        self._pos = 0
        self._eof = False
        self._started = False
        self._newlines = 0  # newlines decoded so far, to name the line of a decoding error
        self.line = 1

    def error(self, message: str, line: int | None = None) -> SourceError:
        """A SourceError naming the file and ``line`` (default: the read position)."""
        return SourceError(f"{self._name}:{self.line if line is None else line}: {message}")

    def _fill(self) -> None:
        """Append the next chunk to the window, dropping what was consumed."""
        if self._eof:
            return
        data = self._fh.read(_CHUNK)
        if not self._started:
            self._started = True
            if data.startswith(_BOM):
                data = data[len(_BOM) :]
        pending = len(self._decoder.getstate()[0])
        try:
            text = self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            offset = max(exc.start - pending, 0)
            line = self._newlines + data.count(b"\n", 0, offset) + 1
            bad = exc.object[exc.start] if exc.start < len(exc.object) else 0
            raise self.error(
                f"not valid UTF-8 (byte 0x{bad:02x}); save the file as UTF-8", line
            ) from None
        self._newlines += text.count("\n")
        if not data:
            self._eof = True
        if self._pos:
            self._buf = self._buf[self._pos :]
            self._pos = 0
        self._buf += text

    def _advance(self, end: int) -> None:
        self.line += self._buf.count("\n", self._pos, end)
        self._pos = end

    def peek(self) -> str | None:
        """Skip white space and return the next character (not consumed); None at the end."""
        if self._pos < len(self._buf) and self._buf[self._pos] not in " \t\r\n":
            return self._buf[self._pos]  # fast path: minified JSON has no white space to skip
        while True:
            match = _JSON_WS.match(self._buf, self._pos)
            end = match.end() if match is not None else self._pos
            self._advance(end)
            if end < len(self._buf):
                return self._buf[end]
            if self._eof:
                return None
            self._fill()

    def take(self) -> None:
        """Consume the character :meth:`peek` returned (a structural one, never a newline)."""
        self._pos += 1

    def value(self) -> Any:
        """Decode the value at the read position (after :meth:`peek`).

        A string longer than :data:`MAX_JSON_VALUE_CHARS` is skipped and returned as
        :class:`_Oversized`; any other value that large raises SourceError.
        """
        start_line = self.line
        while True:
            try:
                value, end = self._scanner.raw_decode(self._buf, self._pos)
            except json.JSONDecodeError as exc:
                truncated = (
                    exc.msg.startswith("Unterminated string") or exc.pos >= len(self._buf) - 8
                )
                if self._eof or not truncated:
                    line = self.line + self._buf.count("\n", self._pos, exc.pos)
                    raise self.error(f"malformed JSON: {exc.msg}", line) from None
                if len(self._buf) - self._pos > MAX_JSON_VALUE_CHARS:
                    if self._buf[self._pos] == '"':
                        preview = self._buf[self._pos + 1 : self._pos + 1 + RAW_LIMIT]
                        self._skip_string(start_line)
                        return _Oversized(preview)
                    raise self.error(
                        f"a JSON value longer than {MAX_JSON_VALUE_CHARS} characters", start_line
                    ) from None
                self._fill()
                continue
            except (ValueError, RecursionError) as exc:
                raise self.error(f"unreadable JSON value: {exc}", start_line) from None
            if end == len(self._buf) and not self._eof:
                self._fill()  # a number at the end of the window may go on in the next chunk
                continue
            self._advance(end)
            return value

    def _skip_string(self, start_line: int) -> None:
        """Consume the string at the read position without holding it, in bounded pieces."""
        scan_from = self._pos + 1
        while True:
            quote = self._buf.find('"', scan_from)
            while quote != -1:
                first = quote
                while first > scan_from and self._buf[first - 1] == "\\":
                    first -= 1
                if (quote - first) % 2 == 0:  # not escaped
                    self._advance(quote + 1)
                    return
                quote = self._buf.find('"', quote + 1)
            # No closing quote yet: drop the text, keeping the parity of a trailing backslash run.
            region = self._buf[scan_from:]
            backslashes = len(region) - len(region.rstrip("\\"))
            self._advance(len(self._buf))
            self._buf = "\\" * (backslashes % 2)
            self._pos = 0
            scan_from = 0
            if self._eof:
                raise self.error("malformed JSON: unterminated string", start_line)
            self._fill()


def _json_records(path: Path, fh: BinaryIO) -> Iterator[SourceRecord]:
    """A JSON array of ids (or of objects with an id key), or MDE's ``{"value": [...]}``."""
    name = str(path)
    stream = _JsonStream(fh, name)
    first = stream.peek()
    if first is None:
        return
    if first == "[":
        yield from _json_array(stream, name)
    elif first == "{":
        yield from _json_object(stream, name)
    else:
        raise stream.error(
            "expected a JSON array of machine ids or an object with a 'value' array, "
            f"found {_kind_of_char(first)}"
        )
    if stream.peek() is not None:
        raise stream.error("unexpected data after the JSON document")


def _kind_of_char(char: str) -> str:
    """What a JSON value starting with ``char`` is, for messages."""
    if char == '"':
        return "a string"
    if char in "-0123456789":
        return "a number"
    if char in "tf":
        return "a boolean"
    if char == "n":
        return "null"
    if char == "[":
        return "an array"
    if char == "{":
        return "an object"
    return f"{char!r} (not JSON)"


def _json_array(stream: _JsonStream, name: str) -> Iterator[SourceRecord]:
    """Stream the elements of the array at the read position (which is on ``[``)."""
    stream.take()
    if stream.peek() == "]":
        stream.take()
        return
    while True:
        if stream.peek() is None:
            raise stream.error("malformed JSON: the array is not closed")
        where = f"{name}:{stream.line}"
        yield _element(where, stream.value())
        follow = stream.peek()
        if follow == ",":
            stream.take()
        elif follow == "]":
            stream.take()
            return
        elif follow is None:
            raise stream.error("malformed JSON: the array is not closed")
        else:
            raise stream.error(f"malformed JSON: expected ',' or ']', found {follow!r}")


def _json_object(stream: _JsonStream, name: str) -> Iterator[SourceRecord]:
    """Stream the ``value`` array of the object at the read position (which is on ``{``)."""
    start_line = stream.line
    stream.take()
    found = False
    if stream.peek() == "}":
        stream.take()
    else:
        while True:
            if stream.peek() != '"':
                raise stream.error("malformed JSON: expected a property name in double quotes")
            key = stream.value()
            if stream.peek() != ":":
                raise stream.error("malformed JSON: expected ':' after a property name")
            stream.take()
            follow = stream.peek()
            if follow is None:
                raise stream.error("malformed JSON: the object is not closed")
            if isinstance(key, str) and key.strip().casefold() == "value":
                if follow != "[":
                    raise stream.error(
                        f"'value' is {_kind_of_char(follow)}, expected an array of machine ids"
                    )
                found = True
                yield from _json_array(stream, name)
            else:
                stream.value()  # @odata.context, @odata.nextLink, ...: not ours
            follow = stream.peek()
            if follow == ",":
                stream.take()
            elif follow == "}":
                stream.take()
                break
            elif follow is None:
                raise stream.error("malformed JSON: the object is not closed")
            else:
                raise stream.error(f"malformed JSON: expected ',' or '}}', found {follow!r}")
    if not found:
        hint = (
            "; it looks like JSON Lines (one object a line): use the jsonl format"
            if stream.peek() is not None
            else ""
        )
        raise stream.error(
            "JSON object without a 'value' array; expected an array of machine ids "
            f'or {{"value": [...]}} as MDE returns it{hint}',
            start_line,
        )
