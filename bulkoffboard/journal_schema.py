"""The published JSON Schema (draft 2020-12) of journal format 1, shipped in the package.

``journal.schema.json`` describes one journal line (one record): the record types of format 1
with every field the writers put in them, types and formats checked strictly, unknown fields
and unknown record types allowed (readers ignore them). ``bulkoffboard schema`` prints it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from bulkoffboard.errors import UsageError

#: The schema's file name inside the package.
RESOURCE = "journal.schema.json"


def text() -> str:
    """The schema as published (UTF-8 JSON text)."""
    return resources.files("bulkoffboard").joinpath(RESOURCE).read_text(encoding="utf-8")


def load() -> dict[str, Any]:
    """The schema, parsed."""
    schema = orjson.loads(text())
    if not isinstance(schema, dict):  # pragma: no cover - the packaged file is an object
        raise TypeError(f"{RESOURCE} is not a JSON object")
    return schema


def write(path: Path) -> None:
    """Write the schema to ``path`` atomically: a temp file in the same folder, fsynced, then
    renamed over ``path`` (a reader never sees half a schema). Raises
    :class:`~bulkoffboard.errors.UsageError` naming the path when it cannot be written."""
    data = text().encode("utf-8")
    try:
        fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        temp.chmod(0o644)  # mkstemp makes it 0600; a schema is public
        temp.replace(path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(exc, OSError):
            raise UsageError(f"cannot write {path}: {exc.strerror}") from None
        raise
