"""Validate the journals a test wrote against the published schema (``bulkoffboard schema``).

Used by the autouse fixture in ``conftest.py`` after every test, and by ``test_schema.py``.

A *journal* is a file whose first line is a JSON object with ``"type": "header"``,
``"tool": "bulkoffboard"`` and ``"format": 1``: foreign files, and journals that claim a newer
format, are fed to the reader on purpose by other tests. A *record* is a line that parses as a
JSON object: a torn or corrupted line, a blank line and the NUL bytes a power cut leaves at the
end of a file are not records (the reader drops or refuses them, and tests check that).
A copy of a journal of the hostile corpus (``tests/hostile/``, bad on purpose) is not checked.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import orjson

from bulkoffboard import journal_schema

#: The first bytes read to recognise a journal's header line.
_HEAD_BYTES = 64 * 1024
#: Problems reported per journal at most (the first ones name the cause).
_MAX_PROBLEMS = 5


@functools.cache
def validator() -> jsonschema.protocols.Validator:
    """The schema, checked and compiled once per test session."""
    schema = journal_schema.load()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@functools.cache
def by_type() -> dict[str, jsonschema.protocols.Validator]:
    """A validator of each known record type alone: three times faster than the whole schema
    (which tries every type's ``if``); the whole schema names the problem when one fails."""
    schema = journal_schema.load()
    cls = type(validator())
    known = [branch["then"]["$ref"].rsplit("/", 1)[1] for branch in schema["allOf"]]
    return {
        name: cls(
            {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": f"#/$defs/{name}"}
        )
        for name in known
    }


@functools.cache
def _hostile_digests() -> frozenset[bytes]:
    """SHA-256 digests of the hostile corpus's journals."""
    corpus = Path(__file__).with_name("hostile")
    return frozenset(hashlib.sha256(p.read_bytes()).digest() for p in corpus.glob("*.jsonl"))


def _is_hostile_copy(path: Path) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).digest() in _hostile_digests()
    except OSError:
        return False


@dataclass(slots=True)
class Stats:
    """What the session validated: journals and records, by test module."""

    journals: collections.Counter[str] = field(default_factory=collections.Counter)
    records: collections.Counter[str] = field(default_factory=collections.Counter)
    exempted: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Test modules that ran at least one test that was validated.
    modules: set[str] = field(default_factory=set)
    #: True when some collected tests were deselected (``-k``, ``-m``, ``--lf``).
    deselected: bool = False


STATS = Stats()


def is_journal(path: Path) -> bool:
    """True when ``path`` is a regular file whose first line is a format-1 journal header."""
    try:
        if not path.is_file() or path.is_symlink():
            return False
        with path.open("rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except OSError:
        return False
    first = head.split(b"\n", 1)[0].strip()
    if not first.startswith(b"{"):
        return False
    try:
        record = orjson.loads(first)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(record, dict)
        and record.get("type") == "header"
        and record.get("tool") == "bulkoffboard"
        and record.get("format") == 1
    )


def journals_under(root: Path) -> Iterator[Path]:
    """Every journal below ``root`` (symbolic links are not followed), in a stable order."""
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder, name)
            if is_journal(path) and not _is_hostile_copy(path):
                yield path


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            text = line.strip().strip(b"\0")
            if not text.startswith(b"{"):
                continue  # blank, NUL bytes, or a line that is no object: not a record
            try:
                record = orjson.loads(text)
            except orjson.JSONDecodeError:
                continue  # torn or corrupted: not a record
            if isinstance(record, dict):
                yield number, record


def check(path: Path, *, header: bool = True) -> tuple[int, list[str]]:
    """Validate every record of the journal at ``path`` (``header`` False: not its header,
    which a test built by hand): (records validated, problems), each problem naming the
    file, the line, the record type, where in the record and what is wrong."""
    checker, known = validator(), by_type()
    count = 0
    problems: list[str] = []
    for number, record in _records(path):
        kind = record.get("type")
        if not header and kind == "header":
            continue
        count += 1
        if (known.get(kind, checker) if isinstance(kind, str) else checker).is_valid(record):
            continue
        if len(problems) < _MAX_PROBLEMS:
            error = jsonschema.exceptions.best_match(checker.iter_errors(record))
            where = "/".join(str(part) for part in error.absolute_path) or "(the record)"
            problems.append(
                f"{path}:{number}: {record.get('type')!r} record, at {where}: {error.message}"
            )
        elif len(problems) == _MAX_PROBLEMS:
            problems.append(f"{path}: more records do not match the schema")
    return count, problems
