"""The JSONL journal: append-only, one whole flushed line per event, locked, replayable.

Format (version 1), one JSON object per line, ``type`` first:

``header``   first line: ``format``, ``tool``, ``tool_version``, ``run_id``, ``created_at``,
             ``source``, ``comment``, ``limits`` (list of ``[calls, period_s]``), ``workers``,
             ``api_url``, ``tenant_id``, ``client_id``.
``session``  each time a process starts writing: ``at``, ``pid``, ``command``.
``attempt``  written BEFORE an offboard request is sent: ``machine_id``, ``attempt`` (1-based,
             across sessions), ``at`` (send time).
``result``   after a machine ends: ``machine_id``, ``outcome``, ``action_id``, ``action_status``,
             ``http_status``, ``error_code``, ``message``, ``attempts``, ``at``; for
             ``invalid_id`` also ``where`` (file:line) and ``input`` (the rejected value).
``status``   a later look at an action (verify): ``machine_id``, ``action_id``,
             ``action_status``, ``at``.
``plan``     every planning decision (exclusions, preflight) is journaled: ``at``, ``counts``.
``end``      a process stopped: ``at``, ``exit_code``, ``reason``, ``counts``.

Times are ISO-8601 UTC with microseconds and a ``Z``. The last ``result`` of a machine wins.
A machine whose last ``attempt`` has no later ``result`` is *in doubt*: the request may have
created an action. Readers must ignore unknown fields and unknown record types.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import structlog

from bulkoffboard.errors import JournalError, JournalLockedError

log = structlog.get_logger("bulkoffboard.journal")

FORMAT_VERSION = 1
TOOL = "bulkoffboard"


def utc_now() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    """The journal's timestamp format."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    """Read a journal timestamp back."""
    return datetime.fromisoformat(text)


class _Lock:
    """An exclusive ``flock`` on ``<journal>.lock``, holding the owner's pid for messages."""

    def __init__(self, journal_path: Path) -> None:
        self.path = journal_path.with_name(journal_path.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot create the lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise JournalLockedError(
                f"journal {self.path.with_suffix('')} is in use by another bulkoffboard "
                f"process (pid {holder}); wait for it or stop it"
            ) from None
        with contextlib.suppress(OSError):  # the pid is for messages; a full disk must not stop
            os.ftruncate(fd, 0)  # the journal's own clean error
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def _scrub(value: Any) -> Any:
    """Make every string encodable as UTF-8 (lone surrogates become backslash escapes)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _is_whole_record(line: bytes) -> bool:
    """True when ``line`` is one complete JSON object (a record missing only its newline)."""
    try:
        return isinstance(orjson.loads(line), dict)
    except orjson.JSONDecodeError:
        return False


def _refuse_existing(fd: int, path: Path) -> None:
    if os.fstat(fd).st_size > 0:
        raise JournalError(
            f"journal {path} already exists; use 'bulkoffboard resume --journal {path}' "
            "to continue it, or choose a new path"
        )


class Journal:
    """An open, locked journal that appends whole lines. Use :meth:`create` or :meth:`resume`."""

    def __init__(self, path: Path, fd: int, lock: _Lock) -> None:
        self.path = path
        self._fd = fd
        self._lock = lock
        self.lines_written = 0

    def __repr__(self) -> str:
        state = "open" if self._fd >= 0 else "closed"
        return f"Journal({str(self.path)!r}, {state}, lines_written={self.lines_written})"

    @classmethod
    def create(cls, path: Path, header: dict[str, Any]) -> Journal:
        """Start a new journal with ``header``; refuses an existing, non-empty file.

        The header is written and fsynced here, so a full or read-only file system fails
        before any offboard call is made.
        """
        lock = _Lock(path)
        lock.acquire()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            lock.release()
            raise JournalError(f"cannot create journal {path}: {exc.strerror}") from None
        journal = cls(path, fd, lock)
        try:
            _refuse_existing(fd, path)
            journal.append({"type": "header", **header}, sync=True)
        except BaseException:
            journal.close()
            raise
        return journal

    @classmethod
    def resume(cls, path: Path) -> tuple[Journal, Replay]:
        """Lock an existing journal, mend a torn last line, replay it, and open it to append."""
        lock = _Lock(path)
        lock.acquire()
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND)
            except FileNotFoundError:
                raise JournalError(f"journal {path} does not exist") from None
            except OSError as exc:
                raise JournalError(f"cannot open journal {path}: {exc.strerror}") from None
            journal = cls(path, fd, lock)
            try:
                journal._mend_torn_tail()
                replay = replay_file(path)
            except BaseException:
                journal.close()
                raise
            return journal, replay
        except BaseException:
            lock.release()
            raise

    def _mend_torn_tail(self) -> None:
        """Cut a last line that was not written whole (a crash mid-write)."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        tail_start = max(0, size - 65536)
        tail = os.pread(self._fd, size - tail_start, tail_start)
        if tail.endswith(b"\n"):
            return
        cut = tail.rfind(b"\n")
        if cut < 0 and tail_start > 0:
            raise JournalError(f"journal {self.path}: the last line is torn and over 64 KiB long")
        if _is_whole_record(tail[cut + 1 :]):
            # The record was written whole and only its newline is missing (an editor, or a
            # copy that stripped it): keep it, since a truncated JSON object never parses.
            os.pwrite(self._fd, b"\n", size)
            os.fsync(self._fd)
            log.warning("journal.newline_restored", journal=str(self.path))
            return
        keep = tail_start + cut + 1
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)
        log.warning("journal.torn_line_dropped", journal=str(self.path), bytes=size - keep)

    def append(self, record: dict[str, Any], *, sync: bool = False) -> None:
        """Write one record as one line with a single ``write``; fsync when ``sync``."""
        if self._fd < 0:
            raise JournalError(f"journal {self.path} is closed")
        try:
            data = orjson.dumps(record) + b"\n"
        except TypeError:
            # A string orjson cannot encode (a lone surrogate read from a hostile JSON file).
            data = orjson.dumps(_scrub(record)) + b"\n"
        try:
            size = os.lseek(self._fd, 0, os.SEEK_END)
        except OSError as exc:
            raise JournalError(f"cannot write journal {self.path}: {exc.strerror}") from None
        try:
            written = os.write(self._fd, data)
            while written < len(data):  # regular files do not write short, but be exact
                written += os.write(self._fd, data[written:])
            if sync:
                os.fsync(self._fd)
        except OSError as exc:
            # Never leave half a line: a later append (when space comes back) would land after
            # it and the journal would no longer replay.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise JournalError(f"cannot write journal {self.path}: {exc.strerror}") from None
        self.lines_written += 1

    def sync(self) -> None:
        """fsync the journal."""
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise JournalError(f"cannot sync journal {self.path}: {exc.strerror}") from None

    def close(self) -> None:
        """fsync, close and unlock (idempotent)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
        self._lock.release()


class MachineState:
    """What the journal says of one machine so far.

    The last result is kept as its raw line and decoded when asked for: a replay of a
    million-line journal would otherwise hold a million dicts.
    """

    __slots__ = ("_raw", "_record", "attempts", "in_doubt", "last_attempt_at", "outcome")

    def __init__(self) -> None:
        self.attempts = 0
        #: True when the last attempt has no result after it.
        self.in_doubt = False
        #: The journal time of the last attempt while it has no result.
        self.last_attempt_at: str | None = None
        #: The last result's outcome (None when there is no result yet).
        self.outcome: str | None = None
        self._raw: bytes | None = None
        self._record: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (
            f"MachineState(attempts={self.attempts}, outcome={self.outcome!r}, "
            f"in_doubt={self.in_doubt})"
        )

    @property
    def result(self) -> dict[str, Any] | None:
        """The last result record, or None."""
        if self._record is not None:
            return self._record
        if self._raw is None:
            return None
        try:
            record: dict[str, Any] = orjson.loads(self._raw)
        except orjson.JSONDecodeError:
            raise JournalError("a result line of the journal is corrupted") from None
        return record

    def set_result(self, record: dict[str, Any]) -> None:
        """Keep a result record."""
        self._record = record
        self._raw = None
        self.outcome = sys.intern(str(record.get("outcome")))

    def set_raw_result(self, raw: bytes, outcome: str) -> None:
        """Keep a result as its raw journal line (decoded on demand)."""
        self._record = None
        self._raw = raw
        self.outcome = sys.intern(outcome)


@dataclass(frozen=True, slots=True)
class ActionSeen:
    """The latest known status of a machine's offboard action, and when it was seen."""

    #: The machine action's id (None when the record did not name one).
    action_id: str | None
    #: MDE's status: Pending, InProgress, Succeeded, Failed, TimeOut, Cancelled (or as sent).
    action_status: str
    #: When it was seen, in the journal's time format ("" when unknown).
    at: str
    #: True when a ``status`` record (verify) said so; False when it comes from the result.
    verified: bool = True


@dataclass(slots=True)
class Replay:
    """A journal read back: header, per-machine state, recent send times."""

    header: dict[str, Any]
    machines: dict[str, MachineState] = field(default_factory=dict)
    #: :func:`invalid_key` of every invalid_id result already journaled.
    invalid_seen: set[str] = field(default_factory=set)
    invalid_results: list[dict[str, Any]] = field(default_factory=list)
    #: Journal times of the most recent attempts, oldest first (parsed on demand: parsing
    #: every time of a million-line journal would double the replay).
    recent_attempt_times: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=10_000)
    )
    #: (attempt time, result time) of the most recent results that followed an attempt.
    recent_result_pairs: collections.deque[tuple[str, str]] = field(
        default_factory=lambda: collections.deque(maxlen=256)
    )
    sessions: int = 0
    lines: int = 0
    torn_tail: bool = False
    #: True once a ``plan`` record says every planning decision was journaled.
    planned: bool = False

    @property
    def recent_sends(self) -> list[float]:
        """Wall-clock send times (epoch seconds) of the most recent attempts, oldest first."""
        return [t for t in (_epoch_of(at) for at in self.recent_attempt_times) if t is not None]

    @property
    def recent_round_trips(self) -> list[float]:
        """Seconds from an attempt to its machine's result, for the most recent results: what
        the process before saw of the round trip (seeds the throttle's margin on resume)."""
        trips: list[float] = []
        for sent, ended in self.recent_result_pairs:
            start, end = _epoch_of(sent), _epoch_of(ended)
            if start is not None and end is not None:
                trips.append(max(0.0, end - start))
        return trips

    def apply(self, record: dict[str, Any]) -> None:
        """Fold one record written by this process (keeps the replay current)."""
        _fold(self, record, Path("<this run>"), 0)

    #: The last ``status`` record of each machine (verify's looks at its action), by machine id.
    statuses: dict[str, ActionSeen] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        """The run's id, from the header."""
        return str(self.header.get("run_id", ""))

    def final_result(self, machine_id: str) -> dict[str, Any] | None:
        """The machine's last result if it is final (not ``failed``) and not in doubt."""
        state = self.machines.get(machine_id)
        if state is None or state.in_doubt or state.outcome is None or state.outcome == "failed":
            return None
        return state.result

    def results(self) -> Iterator[dict[str, Any]]:
        """The last result of every machine (invalid ids included), in first-seen order."""
        yield from self.invalid_results
        for state in self.machines.values():
            if state.result is not None:
                yield state.result

    def in_doubt(self) -> list[str]:
        """Machines whose last attempt has no result."""
        return [m for m, s in self.machines.items() if s.in_doubt]

    def latest_action(self, machine_id: str) -> ActionSeen | None:
        """The newest known status of the machine's action: its last ``status`` record when
        that names the action of its last result (or the result names none), else the status
        the result itself recorded; None when neither is known."""
        state = self.machines.get(machine_id)
        result = state.result if state is not None else None
        seen = self.statuses.get(machine_id)
        result_action = result.get("action_id") if result is not None else None
        if seen is not None and (result_action is None or result_action == seen.action_id):
            return seen
        if result is not None and isinstance(result.get("action_status"), str):
            return ActionSeen(
                action_id=result_action if isinstance(result_action, str) else None,
                action_status=result["action_status"],
                at=str(result.get("at") or ""),
                verified=False,
            )
        return None


def invalid_key(where: str, raw: str) -> str:
    """Identifies one rejected input value: its place and its text (a minified JSON array
    holds many values on one line)."""
    return f"{where}\x00{raw}"


def _check_header(first: Any, path: Path) -> dict[str, Any]:
    if not isinstance(first, dict) or first.get("type") != "header" or first.get("tool") != TOOL:
        raise JournalError(f"{path} is not a bulkoffboard journal (line 1 is not its header)")
    version = first.get("format")
    if not isinstance(version, int) or version < 1:
        raise JournalError(f"{path}: line 1 has no valid format version")
    if version > FORMAT_VERSION:
        raise JournalError(
            f"{path} was written by a newer bulkoffboard (journal format {version}); this one "
            f"reads format {FORMAT_VERSION}: upgrade bulkoffboard"
        )
    return first


def replay_lines(lines: Iterable[bytes], path: Path) -> Replay:
    """Fold journal lines into a :class:`Replay`. A torn (unterminated, unparsable) last line
    is ignored; a bad line anywhere else is an error naming its number."""
    replay: Replay | None = None
    pending_error: JournalError | None = None
    attempt_match = _FAST_ATTEMPT.match
    result_match = _FAST_RESULT.match
    for number, line in enumerate(lines, start=1):
        if pending_error is not None:
            raise pending_error
        # Fast paths for the two records a journal is mostly made of, as this tool writes
        # them (orjson keeps key order); anything else takes the general path below.
        if replay is not None:
            fast = attempt_match(line)
            if fast is not None:
                _fast_attempt(replay, fast[1].decode(), int(fast[2]), fast[3].decode())
                replay.lines = number
                continue
            fast = result_match(line)
            if fast is not None and line.endswith(b"}\n"):
                _fast_result(replay, fast[1].decode(), fast[2].decode(), line)
                replay.lines = number
                continue
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            error = JournalError(f"{path}:{number}: not a JSON line (the journal is corrupted)")
            if not line.endswith(b"\n"):
                pending_error = error  # tolerated if it is the very last line
                if replay is not None:
                    replay.torn_tail = True
                continue
            raise error from None
        if replay is None:
            replay = Replay(header=_check_header(record, path))
            replay.lines = number
            continue
        replay.lines = number
        if not isinstance(record, dict):
            raise JournalError(f"{path}:{number}: a record must be a JSON object")
        _fold(replay, record, path, number)
    if replay is None:
        if pending_error is not None:
            raise pending_error
        raise JournalError(f"{path} is empty: not a bulkoffboard journal")
    return replay


_FAST_ATTEMPT = re.compile(
    rb'\{"type":"attempt","machine_id":"([0-9a-f]{40})","attempt":(\d{1,9}),"at":"([0-9T:.Z+-]{1,40})"\}\n\Z'
)
_FAST_RESULT = re.compile(
    rb'\{"type":"result","machine_id":"([0-9a-f]{40})","outcome":"([a-z_]{1,40})",'
)


def _fast_attempt(replay: Replay, machine_id: str, attempt: int, at: str) -> None:
    state = replay.machines.get(machine_id)
    if state is None:
        state = replay.machines[machine_id] = MachineState()
    state.attempts = max(state.attempts, attempt)
    state.in_doubt = True
    replay.recent_attempt_times.append(at)
    state.last_attempt_at = at


def _fast_result(replay: Replay, machine_id: str, outcome: str, line: bytes) -> None:
    state = replay.machines.get(machine_id)
    if state is None:
        state = replay.machines[machine_id] = MachineState()
    sent = state.last_attempt_at
    if state.in_doubt and sent is not None:
        start = line.rfind(b',"at":"')
        if start > 0:
            end = line.find(b'"', start + 7)
            replay.recent_result_pairs.append((sent, line[start + 7 : end].decode()))
    state.last_attempt_at = None
    state.set_raw_result(line, outcome)
    state.in_doubt = False


def _fold(replay: Replay, record: dict[str, Any], path: Path, number: int) -> None:
    kind = record.get("type")
    if kind == "session":
        replay.sessions += 1
        return
    if kind == "plan":
        replay.planned = True
        return
    if kind == "status":
        _fold_status(replay, record)
        return
    if kind not in ("attempt", "result"):
        return  # header repeats, end and unknown types do not change the plan
    machine_id = record.get("machine_id")
    if (
        kind == "result"
        and record.get("machine_id") is None
        and record.get("outcome")
        in (
            "invalid_id",
            "unresolved",
        )
    ):
        key = invalid_key(str(record.get("where", "")), str(record.get("input", "")))
        if key not in replay.invalid_seen:
            replay.invalid_seen.add(key)
            replay.invalid_results.append(record)
        return
    if not isinstance(machine_id, str):
        raise JournalError(f"{path}:{number}: a {kind} record without a machine_id")
    state = replay.machines.get(machine_id)
    if state is None:
        state = replay.machines[machine_id] = MachineState()
    if kind == "attempt":
        attempt = record.get("attempt", state.attempts + 1)
        if not isinstance(attempt, int) or isinstance(attempt, bool):
            raise JournalError(f"{path}:{number}: the attempt count {attempt!r} is not a number")
        state.attempts = max(state.attempts, attempt)
        state.in_doubt = True
        at = record.get("at")
        if isinstance(at, str):
            replay.recent_attempt_times.append(at)
            state.last_attempt_at = at
    else:
        sent = state.last_attempt_at
        if state.in_doubt and sent is not None:
            at = record.get("at")
            if isinstance(at, str):
                replay.recent_result_pairs.append((sent, at))
        state.last_attempt_at = None
        state.set_result(record)
        state.in_doubt = False


def _fold_status(replay: Replay, record: dict[str, Any]) -> None:
    """Keep the latest ``status`` record of a machine. Status records never change the plan
    (which machines to send), so an incomplete one is skipped rather than refused."""
    machine_id = record.get("machine_id")
    status = record.get("action_status")
    if not isinstance(machine_id, str) or not isinstance(status, str):
        return
    action_id = record.get("action_id")
    at = record.get("at")
    replay.statuses[machine_id] = ActionSeen(
        action_id=action_id if isinstance(action_id, str) else None,
        action_status=status,
        at=at if isinstance(at, str) else "",
    )


def _epoch_of(text: str) -> float | None:
    """A journal time as epoch seconds; None when it is not one."""
    try:
        return parse_iso(text).timestamp()
    except ValueError:
        return None


def _read_lines(path: Path) -> Iterator[bytes]:
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise JournalError(f"journal {path} does not exist") from None
    except OSError as exc:
        raise JournalError(f"cannot read journal {path}: {exc.strerror}") from None
    with handle:
        yield from handle


def replay_file(path: Path) -> Replay:
    """Replay the journal at ``path`` (no lock needed: reading is safe while a run appends)."""
    return replay_lines(_read_lines(path), path)
