"""The JSONL journal: append-only, one whole flushed line per event, locked, replayable.

Format (version 1), one JSON object per line, ``type`` first. The published JSON Schema of
every record is ``bulkoffboard/journal.schema.json`` (``bulkoffboard schema`` prints it):

``header``   first line: ``format``, ``tool``, ``tool_version``, ``run_id``, ``created_at``,
             ``source`` (``kind``, ``path``, ``format``, ``sha256``...), ``comment``,
             ``limits`` (list of ``[calls, period_s]``), ``workers``, ``api_url``,
             ``tenant_id``, ``client_id``; optionally ``margin_s``, ``exclusions``,
             ``max_machines``, ``mark`` (the tags ``run --mark`` puts on the plan's machines),
             ``tenant_name`` and ``run_dir`` (a tenants run).
``session``  each time a process starts writing: ``at``, ``pid``, ``command`` (``run``,
             ``resume``, ``verify`` or ``cancel``), ``tool_version``, ``budget``.
``attempt``  written (and fsynced) BEFORE an offboard request is sent: ``machine_id``,
             ``attempt`` (1-based, across sessions), ``at`` (send time).
``result``   after a machine ends: ``machine_id``, ``outcome``, ``action_id``, ``action_status``,
             ``http_status`` (0 when no HTTP answer came), ``error_code``, ``message``,
             ``attempts``, ``at``; for ``invalid_id`` and ``unresolved`` (``machine_id``
             null) also ``where`` (file:line) and ``input`` (the rejected value); a decision
             of the plan (exclusions, preflight) also ``stage: "plan"`` and its ``rule``.
``plan``     every planning decision is journaled: ``at``, ``would_offboard``, ``skipped``,
             ``invalid_id``, ``duplicates``, ``notes``.
``status``   a later look at an action (verify): ``machine_id``, ``action_id``,
             ``action_status``, ``at``.
``tag``      a tag call on up to 500 machines (``run --mark``, undone by ``cancel``):
             ``stage`` (``attempt`` before the call, ``result`` after), ``action`` (``Add`` or
             ``Remove``), ``value``, ``machine_ids``, ``at``; a result also ``outcome``
             (``tagged`` or ``failed``), ``http_status``, ``error_code``, ``message``.
``cancel``   cancelling the offboard action of a machine: ``stage`` ``attempt`` (fsynced before
             the call: ``machine_id``, ``action_id``, ``attempt``, ``at``) or ``result``
             (``machine_id``, ``action_id``, ``outcome``: ``cancelled``, ``too_late`` or
             ``failed``, ``action_status`` as found, ``http_status``, ``error_code``,
             ``message``, ``at``). The last cancel result of a machine wins; its
             ``action_status`` is the action's latest known status, as a ``status`` record's.
``end``      a process stopped: ``at``, ``exit_code``, ``reason``, ``counts`` (a run) or
             ``action_statuses`` (verify) or ``cancels`` (cancel).

Times are ISO-8601 UTC with microseconds and a ``Z``. The last ``result`` of a machine wins.
A machine whose last ``attempt`` has no later ``result`` is *in doubt*: the request may have
created an action. Readers must ignore unknown fields and unknown record types.
"""

from __future__ import annotations

import array
import asyncio
import binascii
import collections
import contextlib
import fcntl
import hashlib
import math
import os
import re
import sys
from collections.abc import Container, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import structlog

from bulkoffboard.errors import JournalError, JournalLockedError
from bulkoffboard.idtable import KEY_WIDTH, IdTable

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
        #: File size after the last line this process wrote, and the size an fsync is known
        #: to have covered (what survives a power cut).
        self._written = 0
        self._durable = 0
        #: The group commit waiting to run (see :meth:`append_durable`).
        self._commit: asyncio.Future[None] | None = None
        #: fsyncs made, and how many of them were group commits (for the benchmark and tests).
        self.syncs = 0
        self.group_commits = 0

    def __repr__(self) -> str:
        state = "open" if self._fd >= 0 else "closed"
        return (
            f"Journal({str(self.path)!r}, {state}, lines_written={self.lines_written}, "
            f"durable={self._durable}/{self._written})"
        )

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
                journal._written = os.fstat(fd).st_size
                replay = replay_file(path)
            except BaseException:
                journal.close()
                raise
            return journal, replay
        except BaseException:
            lock.release()
            raise

    def _mend_torn_tail(self) -> None:
        """Cut a last line that was not written whole (a crash mid-write), and the zeros a
        power cut can leave at the end of a file (its new size reached the disk, the data
        written after the last fsync did not)."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        end = self._end_of_data(size)
        if end == 0:
            raise JournalError(f"journal {self.path} holds only zero bytes: not a journal")
        tail_start = max(0, end - 65536)
        tail = os.pread(self._fd, end - tail_start, tail_start)
        if tail.endswith(b"\n"):
            if end == size:
                return
            keep = end  # whole lines, then zeros
        else:
            cut = tail.rfind(b"\n")
            if cut < 0 and tail_start > 0:
                raise JournalError(
                    f"journal {self.path}: the last line is torn and over 64 KiB long"
                )
            if _is_whole_record(tail[cut + 1 :]):
                # The record was written whole and only its newline is missing (an editor, or
                # a copy that stripped it): keep it, since a truncated JSON object never parses.
                os.ftruncate(self._fd, end)
                os.pwrite(self._fd, b"\n", end)
                os.fsync(self._fd)
                log.warning("journal.newline_restored", journal=str(self.path))
                return
            keep = tail_start + cut + 1
        os.ftruncate(self._fd, keep)
        os.fsync(self._fd)
        log.warning("journal.torn_line_dropped", journal=str(self.path), bytes=size - keep)

    def _end_of_data(self, size: int) -> int:
        """``size`` less the NUL bytes at the end of the file (no line of ours holds one)."""
        end = size
        while end > 0:
            start = max(0, end - 65536)
            data = os.pread(self._fd, end - start, start).rstrip(b"\0")
            if data:
                return start + len(data)
            end = start
        return 0

    def append(self, record: dict[str, Any], *, sync: bool = False) -> int:
        """Write one record as one line with a single ``write``; fsync when ``sync``.

        Returns the offset of the line in the file (for :meth:`Replay.apply`)."""
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
            self._written = size + len(data)
            if sync:
                self._fsync()
        except OSError as exc:
            # Never leave half a line: a later append (when space comes back) would land after
            # it and the journal would no longer replay.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            self._written = min(self._written, size)
            raise JournalError(f"cannot write journal {self.path}: {exc.strerror}") from None
        self.lines_written += 1
        return size

    async def append_durable(self, record: dict[str, Any]) -> int:
        """Append ``record`` and return once it is on stable storage (it survives a power
        cut, not only a crash of this process). Returns its offset, as :meth:`append`.

        A group commit: the fsync runs once the callbacks ready now have run, so every
        coroutine of this process that appends in the same turn of the event loop (the
        workers one throttle wake-up granted together) shares one fsync. The fsync runs on
        the loop, like the result's: a thread would let a fast-forwarded test clock jump
        while it runs, and at 100 calls a minute the pause is nothing. Raises
        :class:`~bulkoffboard.errors.JournalError` when the write or the fsync fails (the
        caller must not act on the record then).
        """
        offset = self.append(record)
        end = self._written
        while self._durable < end:
            commit = self._commit
            if commit is None or commit.done():
                loop = asyncio.get_running_loop()
                commit = self._commit = loop.create_future()
                loop.call_soon(self._group_commit, commit)
            await asyncio.shield(commit)
        return offset

    def _group_commit(self, commit: asyncio.Future[None]) -> None:
        """Run one fsync for every line written so far; settle ``commit`` with its outcome."""
        if commit.done():
            return
        error: JournalError | None = None
        if self._fd < 0:
            error = JournalError(f"journal {self.path} is closed")
        else:
            try:
                self.group_commits += 1
                self._fsync()
            except OSError as exc:
                error = JournalError(f"cannot sync journal {self.path}: {exc.strerror}")
        if error is None:
            commit.set_result(None)
        else:
            commit.set_exception(error)
            commit.exception()  # retrieved: waiters that were cancelled must not warn

    def _fsync(self) -> None:
        """fsync, and note how far the file is now durable."""
        target = self._written
        os.fsync(self._fd)
        self.syncs += 1
        self._durable = max(self._durable, target)

    @property
    def durable_bytes(self) -> int:
        """How many bytes of the file an fsync of this process is known to have covered."""
        return self._durable

    def sync(self) -> None:
        """fsync the journal."""
        if self._fd >= 0:
            try:
                self._fsync()
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


#: A machine's state byte: its last result's outcome code (0: no result yet), and this bit
#: while its last attempt has no result after it.
_IN_DOUBT = 0x80
_OUTCOME = 0x7F
#: ``_offsets`` value of a machine without a result, and of one whose result is held as a
#: record (folded from this process with no journal offset known).
_NONE = -1
_HELD = -2
#: The two records a journal is mostly made of, as this tool writes them (orjson keeps key
#: order); the replay reads them by position, without decoding the JSON.
_ATTEMPT_HEAD = b'{"type":"attempt","machine_id":"'
_ATTEMPT_MID = b'","attempt":'
_RESULT_HEAD = b'{"type":"result","machine_id":"'
_RESULT_MID = b'","outcome":"'
_AT_FIELD = b',"at":"'
_OUTCOME_TEXT = re.compile(rb"[a-z_]{1,40}")


def invalid_key(where: str, raw: str) -> bytes:
    """Identifies one rejected input value: a digest of its place and its text (a minified
    JSON array holds many values on one line), so a million of them stay small."""
    text = f"{where}\x00{raw}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=KEY_WIDTH).digest()


class MachineState:
    """What the journal says of one machine so far: a view into a :class:`Replay`.

    The last result is not held in memory: it is read back from its line in the journal when
    asked for, so replaying a million-line journal holds about 50 bytes a machine.
    """

    __slots__ = ("_entry", "_replay")

    def __init__(self, replay: Replay, entry: int) -> None:
        self._replay = replay
        self._entry = entry

    def __repr__(self) -> str:
        return (
            f"MachineState(attempts={self.attempts}, outcome={self.outcome!r}, "
            f"in_doubt={self.in_doubt})"
        )

    @property
    def attempts(self) -> int:
        """The highest attempt number journaled."""
        return self._replay._attempts[self._entry]

    @property
    def in_doubt(self) -> bool:
        """True when the last attempt has no result after it."""
        return bool(self._replay._state[self._entry] & _IN_DOUBT)

    @property
    def outcome(self) -> str | None:
        """The last result's outcome (None when there is no result yet)."""
        code = self._replay._state[self._entry] & _OUTCOME
        return self._replay._outcomes[code] if code else None

    @property
    def result(self) -> dict[str, Any] | None:
        """The last result record, or None."""
        return self._replay._result(self._entry)


class _Machines(Mapping[str, MachineState]):
    """``Replay.machines``: machine id -> :class:`MachineState`, in first-seen order."""

    __slots__ = ("_replay",)

    def __init__(self, replay: Replay) -> None:
        self._replay = replay

    def __getitem__(self, machine_id: str) -> MachineState:
        entry = self._replay._entry(machine_id)
        if entry < 0:
            raise KeyError(machine_id)
        return MachineState(self._replay, entry)

    def __iter__(self) -> Iterator[str]:
        for key in self._replay._table:
            yield key.hex()

    def __len__(self) -> int:
        return len(self._replay._table)

    def items(self) -> Iterator[tuple[str, MachineState]]:  # type: ignore[override]
        """(machine id, state) pairs, in first-seen order."""
        replay = self._replay
        for entry, key in enumerate(replay._table):
            yield key.hex(), MachineState(replay, entry)


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


@dataclass(frozen=True, slots=True)
class CancelSeen:
    """The latest ``cancel`` record of a machine: an attempt without a result yet (in doubt:
    the cancel may have reached MDE), or the last result."""

    action_id: str | None
    #: ``attempt`` or ``result``.
    stage: str
    #: The last result's outcome (``cancelled``, ``too_late``, ``failed``); None before any.
    outcome: str | None
    #: Cancel calls made for this machine, across sessions.
    attempts: int
    at: str

    @property
    def in_doubt(self) -> bool:
        """True when the last cancel call has no result after it."""
        return self.stage == "attempt"

    @property
    def settled(self) -> bool:
        """True when nothing is left to do: cancelled, or found too late."""
        return self.stage == "result" and self.outcome in ("cancelled", "too_late")


class RecentSends:
    """The latest attempts (sends) of a journal and, for each, the latest moment its call can
    have arrived.

    A call arrives between its send and its answer. The journal does not keep answers, but
    the next line about the same machine (a retry or a result) is written after the answer
    came, and a ``session`` line is written by a process that holds the journal's lock, so
    the one that sent every still unanswered call before it was gone. A call with neither
    after it (in doubt at the end of the journal) was sent by a process that is gone now.
    Times are epoch seconds, in a ring of two float arrays (16 bytes a send).
    """

    __slots__ = ("_answered", "_count", "_maxlen", "_pending", "_sent")

    def __init__(self, maxlen: int = 10_000) -> None:
        self._maxlen = maxlen
        self._sent = array.array("d")
        #: When each send was answered at the latest (NaN: not yet).
        self._answered = array.array("d")
        #: How many sends were ever noted: the sequence number of the next one.
        self._count = 0
        #: The sequence number of each machine's last unanswered send.
        self._pending: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._sent)

    @property
    def maxlen(self) -> int:
        """How many of the latest sends are kept."""
        return self._maxlen

    def clear(self) -> None:
        """Forget every send."""
        del self._sent[:], self._answered[:]
        self._count = 0
        self._pending.clear()

    def _slot(self, number: int) -> int:
        """The ring index of send ``number``; -1 when it has been dropped already."""
        if number < self._count - len(self._sent):
            return -1
        return number % self._maxlen

    def _answer(self, number: int, at: float) -> float | None:
        """Note that send ``number`` was answered by ``at``; returns its send time."""
        slot = self._slot(number)
        if slot < 0:
            return None
        if math.isnan(self._answered[slot]):
            self._answered[slot] = at
        return self._sent[slot]

    def sent(self, machine_id: str, at: str | bytes) -> None:
        """An attempt line: a send at ``at`` (it also answers the machine's send before)."""
        moment = _epoch_of(at)
        if moment is None:
            return
        before = self._pending.get(machine_id)
        if before is not None:
            self._answer(before, moment)
        if len(self._sent) < self._maxlen:
            self._sent.append(moment)
            self._answered.append(math.nan)
        else:
            slot = self._count % self._maxlen
            self._sent[slot] = moment
            self._answered[slot] = math.nan
        self._pending[machine_id] = self._count
        self._count += 1

    def answered(self, machine_id: str, at: str | bytes) -> tuple[float, float] | None:
        """A result line at ``at``; (send, answer) times when a send of the machine waited."""
        number = self._pending.pop(machine_id, None)
        moment = _epoch_of(at)
        if number is None or moment is None:
            return None
        sent = self._answer(number, moment)
        return None if sent is None else (sent, moment)

    def session(self, at: str | bytes) -> None:
        """A session line: every send still unanswered had arrived by ``at`` at the latest."""
        moment = _epoch_of(at)
        if moment is None:
            return
        for number in self._pending.values():
            self._answer(number, moment)
        self._pending.clear()

    def _ordered(self) -> Iterator[int]:
        """Ring indexes, oldest send first."""
        size = len(self._sent)
        first = (self._count - size) % self._maxlen if size else 0
        return (first + i if first + i < size else first + i - size for i in range(size))

    def times(self) -> list[float]:
        """The send times, oldest first."""
        return [self._sent[i] for i in self._ordered()]

    def lags(self, now: float) -> list[tuple[float, float]]:
        """(send time, lag), oldest first: the lag bounds how long after its send the call
        arrived (up to ``now`` for a send nothing answered yet)."""
        out: list[tuple[float, float]] = []
        for i in self._ordered():
            sent, answered = self._sent[i], self._answered[i]
            out.append((sent, max(0.0, (now if math.isnan(answered) else answered) - sent)))
        return out


class Replay:
    """A journal read back: header, per-machine state, recent send times.

    Per-machine state lives in flat arrays indexed by an :class:`IdTable` entry (the id as 20
    bytes, an outcome byte, an attempt count and the journal offset of the last result line);
    results are decoded from the journal file (``path``) when asked for.
    """

    def __init__(self, header: dict[str, Any], path: Path | None = None, *, reserve: int = 0):
        self._fd = -1  # first: __del__ closes it, even after a failed __init__
        self.header = header
        #: The journal file the result offsets point into.
        self.path = path
        self._table = IdTable(reserve)
        self._state = bytearray()
        self._attempts = array.array("I")
        self._offsets = array.array("q")
        #: Results folded with no journal offset (``apply`` without one), by entry.
        self._held: dict[int, dict[str, Any]] = {}
        self._outcomes: list[str] = [""]
        self._codes: dict[bytes, int] = {}
        self._invalid_seen = IdTable()
        #: Invalid and unresolved results: journal offsets, or ``-1 - i`` for ``_invalid_held[i]``.
        self._invalid = array.array("q")
        self._invalid_held: list[dict[str, Any]] = []
        self._invalid_counts: collections.Counter[str] = collections.Counter()
        #: The most recent attempts, with when each was answered at the latest.
        self.recent = RecentSends()
        #: (attempt time, result time) of the most recent results that followed an attempt.
        self.recent_result_pairs: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=256
        )
        #: The last ``status`` record of each machine (verify's looks at its action), or the
        #: status its last cancel result found.
        self.statuses: dict[str, ActionSeen] = {}
        #: The last ``cancel`` record of each machine (``bulkoffboard cancel``).
        self.cancels: dict[str, CancelSeen] = {}
        #: Tag value -> machine (20-byte key) -> the action of its last successful tag call
        #: (``Add`` or ``Remove``): what ``run --mark`` put on and ``cancel`` took off.
        self.marks: dict[str, dict[bytes, str]] = {}
        self.sessions = 0
        #: The rate budget each session drew on (its ``budget`` field; "none" before there
        #: was one): a resume on the same shared ledger need not seed the sends again.
        self.session_budgets: set[str] = set()
        #: The commands of the sessions (``run``, ``resume``, ``verify``, ``cancel``).
        self.session_commands: set[str] = set()
        self.lines = 0
        self.torn_tail = False
        #: True once a ``plan`` record says every planning decision was journaled.
        self.planned = False

    def __repr__(self) -> str:
        return f"Replay({self.run_id!r}, machines={len(self._table)}, lines={self.lines})"

    # -- reading ---------------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The run's id, from the header."""
        return str(self.header.get("run_id", ""))

    @property
    def machines(self) -> Mapping[str, MachineState]:
        """Machine id -> :class:`MachineState`, in first-seen order (a live view)."""
        return _Machines(self)

    @property
    def recent_sends(self) -> list[float]:
        """Wall-clock send times (epoch seconds) of the most recent attempts, oldest first."""
        return self.recent.times()

    def recent_send_lags(self, now: float) -> list[tuple[float, float]]:
        """(send time, lag) of the most recent attempts, oldest first, in epoch seconds: the
        lag is how long after its send each call had arrived at the latest (seeds the
        throttle on resume). See :class:`RecentSends`."""
        return self.recent.lags(now)

    @property
    def recent_round_trips(self) -> list[float]:
        """Seconds from an attempt to its machine's result, for the most recent results: what
        the process before saw of the round trip (the throttle's ETA estimate on resume)."""
        return [max(0.0, ended - sent) for sent, ended in self.recent_result_pairs]

    def state(self, machine_id: str) -> MachineState | None:
        """The machine's state, or None when the journal never named it."""
        entry = self._entry(machine_id)
        return MachineState(self, entry) if entry >= 0 else None

    def is_final(self, machine_id: str) -> bool:
        """True when the machine's last result is final (not ``failed``) and not in doubt."""
        entry = self._entry(machine_id)
        if entry < 0:
            return False
        code = self._state[entry]
        return code != 0 and not code & _IN_DOUBT and self._outcomes[code] != "failed"

    def final_result(self, machine_id: str) -> dict[str, Any] | None:
        """The machine's last result if it is final (not ``failed``) and not in doubt."""
        if not self.is_final(machine_id):
            return None
        return self._result(self._entry(machine_id))

    def results(
        self, outcomes: Container[str] | None = None, *, settled: bool = False
    ) -> Iterator[dict[str, Any]]:
        """The last result of every machine (invalid ids included), in first-seen order; only
        those with one of ``outcomes`` when given (the others are not read from the file);
        ``settled``: not those of machines in doubt (sent again after that result)."""
        if outcomes is None or any(o in outcomes for o in self._invalid_counts):
            for record in self.invalid_results:
                if outcomes is None or record.get("outcome") in outcomes:
                    yield record
        state, names = self._state, self._outcomes
        wanted = {
            code
            for code, name in enumerate(names)
            if code and (outcomes is None or name in outcomes)
        }
        in_doubt = _IN_DOUBT if settled else 0
        for entry in range(len(state)):
            byte = state[entry]
            if (byte & _OUTCOME) in wanted and not byte & in_doubt:
                found = self._result(entry)
                if found is not None:
                    yield found

    @property
    def invalid_results(self) -> list[dict[str, Any]]:
        """The ``invalid_id`` and ``unresolved`` results, one per rejected value, in order."""
        held = self._invalid_held
        return [held[-1 - at] if at < 0 else self._read_at(at) for at in self._invalid]

    def outcome_counts(self) -> collections.Counter[str]:
        """Machines (and rejected values) by the outcome of their last result."""
        counts = collections.Counter(self._invalid_counts)
        for byte, number in collections.Counter(self._state).items():
            code = byte & _OUTCOME
            if code:
                counts[self._outcomes[code]] += number
        return counts

    def in_doubt(self) -> list[str]:
        """Machines whose last attempt has no result."""
        key_at = self._table.key_at
        return [key_at(e).hex() for e, byte in enumerate(self._state) if byte & _IN_DOUBT]

    def latest_action(
        self, machine_id: str, result: dict[str, Any] | None = None
    ) -> ActionSeen | None:
        """The newest known status of the machine's action: its last ``status`` record when
        that names the action of its last result (or the result names none), else the status
        the result itself recorded; None when neither is known. ``result``: the machine's last
        result when the caller has it already (saves reading it again)."""
        if result is None:
            state = self.state(machine_id)
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

    def cancel_counts(self) -> collections.Counter[str]:
        """Machines by the outcome of their last cancel result (``in_doubt``: a cancel call
        without a result yet)."""
        return collections.Counter(
            "in_doubt" if seen.in_doubt else str(seen.outcome) for seen in self.cancels.values()
        )

    def marked(self, tag: str) -> set[str]:
        """Machines that carry ``tag`` by this run's doing (their last successful tag call on
        it was an Add)."""
        return {key.hex() for key, action in self.marks.get(tag, {}).items() if action == "Add"}

    def is_marked(self, tag: str, machine_id: str) -> bool:
        """True when this run's last successful tag call for the machine added ``tag``."""
        key = _key_of(machine_id)
        return key is not None and self.marks.get(tag, {}).get(key) == "Add"

    # -- folding ---------------------------------------------------------------------------------

    def apply(self, record: dict[str, Any], offset: int | None = None) -> None:
        """Fold one record written by this process (keeps the replay current); ``offset``:
        where :meth:`Journal.append` wrote it, so the record need not be held in memory."""
        _fold(self, record, Path("<this run>"), 0, offset, recency=True)

    def see_invalid(self, where: str, raw: str) -> bool:
        """Note a rejected input value; True when it was not noted before."""
        table = self._invalid_seen
        size = len(table)
        table.add(invalid_key(where, raw))
        return len(table) > size

    def close(self) -> None:
        """Close the journal file kept open to read results back (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _entry(self, machine_id: str) -> int:
        key = _key_of(machine_id)
        return self._table.find(key) if key is not None else -1

    def _add(self, key: bytes) -> int:
        """The entry of ``key``, with empty state when new."""
        entry = self._table.add(key)
        if entry == len(self._state):
            self._state.append(0)
            self._attempts.append(0)
            self._offsets.append(_NONE)
        return entry

    def _code(self, outcome: bytes) -> int:
        code = self._codes.get(outcome)
        if code is None:
            if len(self._outcomes) > _OUTCOME:
                raise JournalError("the journal names over 127 different outcomes")
            code = self._codes[outcome] = len(self._outcomes)
            self._outcomes.append(sys.intern(outcome.decode("utf-8", "replace")))
        return code

    def _result(self, entry: int) -> dict[str, Any] | None:
        offset = self._offsets[entry]
        if offset >= 0:
            return self._read_at(offset)
        return self._held.get(entry) if offset == _HELD else None

    def _read_at(self, offset: int) -> dict[str, Any]:
        """Decode the journal line that starts at ``offset``."""
        if self._fd < 0:
            if self.path is None:
                raise JournalError("a replay without a journal file cannot read results back")
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise JournalError(f"cannot read journal {self.path}: {exc.strerror}") from None
        size = 4096
        while True:
            chunk = os.pread(self._fd, size, offset)
            end = chunk.find(b"\n")
            if end >= 0 or len(chunk) < size:
                break
            size *= 4
        try:
            record = orjson.loads(chunk if end < 0 else chunk[:end])
        except orjson.JSONDecodeError:
            raise JournalError(f"{self.path}: a result line changed since it was read") from None
        if not isinstance(record, dict):
            raise JournalError(f"{self.path}: a result line changed since it was read")
        return record


def _key_of(machine_id: str) -> bytes | None:
    """A 40-hex machine id as its 20 bytes (either case), or None."""
    if len(machine_id) != 2 * KEY_WIDTH:
        return None
    try:
        key = bytes.fromhex(machine_id)
    except ValueError:
        return None
    return key if len(key) == KEY_WIDTH else None


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


def replay_lines(
    lines: Iterable[bytes], path: Path, *, reserve: int = 0, recent: bool = True
) -> Replay:
    """Fold journal lines into a :class:`Replay`. A torn (unterminated, unparsable) last line
    is ignored; a bad line anywhere else is an error naming its number.

    ``lines`` are the file at ``path`` from its start: results are kept as the offsets of
    their lines and read back from ``path`` when asked for. ``recent=False``: leave the
    recent send times and round trips empty (they seed a throttle; a report has no use for
    them, and reading them costs a second pass over the file's tail).
    """
    numbered = enumerate(lines, start=1)
    header, number, position = _header_of(numbered, path)
    replay = Replay(header, path, reserve=reserve)
    replay.lines = number
    return _fold_lines(replay, numbered, path, position, recent=recent)


def _header_of(
    numbered: Iterator[tuple[int, bytes]], path: Path
) -> tuple[dict[str, Any], int, int]:
    """The checked header from the first non-blank line, its line number, and the byte
    position after it."""
    position = 0
    for number, line in numbered:
        position += len(line)
        if not line.strip():
            continue
        try:
            first = orjson.loads(line)
        except orjson.JSONDecodeError:
            raise JournalError(
                f"{path}:{number}: not a JSON line (the journal is corrupted)"
            ) from None
        return _check_header(first, path), number, position
    raise JournalError(f"{path} is empty: not a bulkoffboard journal")


_ATTEMPT_ID = slice(len(_ATTEMPT_HEAD), len(_ATTEMPT_HEAD) + 2 * KEY_WIDTH)
_ATTEMPT_AFTER_ID = slice(_ATTEMPT_ID.stop, _ATTEMPT_ID.stop + len(_ATTEMPT_MID))
_RESULT_ID = slice(len(_RESULT_HEAD), len(_RESULT_HEAD) + 2 * KEY_WIDTH)
_RESULT_AFTER_ID = slice(_RESULT_ID.stop, _RESULT_ID.stop + len(_RESULT_MID))


def _fold_lines(
    replay: Replay,
    numbered: Iterator[tuple[int, bytes]],
    path: Path,
    position: int,
    *,
    recent: bool = True,
) -> Replay:
    """Fold the lines after the header.

    Attempt and result lines exactly as this tool writes them (nearly all of a journal) are
    read by position without decoding the JSON, in this one flat loop: at a million lines,
    every function call saved is a tenth of a second. Any other line takes :func:`_fold`.
    """
    state, attempts, offsets = replay._state, replay._attempts, replay._offsets
    held, codes = replay._held, replay._codes
    table_add = replay._table.add
    unhexlify, hex_error = binascii.unhexlify, binascii.Error
    attempt_id, attempt_mid_at, number_at = _ATTEMPT_ID, _ATTEMPT_ID.stop, _ATTEMPT_AFTER_ID.stop
    result_id, result_mid_at, outcome_at = _RESULT_ID, _RESULT_ID.stop, _RESULT_AFTER_ID.stop
    at_width = len(_AT_FIELD)
    #: hex id -> entry of the machines whose attempt this loop folded: their result (usually a
    #: few lines later) needs no table probe.
    recent_entries: dict[bytes, int] = {}
    pending_error: JournalError | None = None
    folded = replay.lines
    torn = 0  # the length of a torn last line
    for number, line in numbered:
        start = position
        position += len(line)
        if pending_error is not None:
            raise pending_error
        hex_id = None
        code = 0  # an attempt; else the result's outcome code
        if line.startswith(_ATTEMPT_HEAD):
            cut = line.find(_AT_FIELD, number_at)
            digits = line[number_at:cut]
            if (
                cut > 0
                and line.startswith(_ATTEMPT_MID, attempt_mid_at)
                and line.endswith(b'"}\n')
                and digits.isdigit()
                and len(digits) < 10
                and line.find(b'"', cut + at_width, len(line) - 3) < 0
            ):
                hex_id = line[attempt_id]
        elif line.startswith(_RESULT_HEAD):
            outcome = line[outcome_at : line.find(b'"', outcome_at)]
            code = codes.get(outcome, 0)
            if not code and _OUTCOME_TEXT.fullmatch(outcome):
                code = replay._code(outcome)
            if code and line.startswith(_RESULT_MID, result_mid_at) and line.endswith(b"}\n"):
                hex_id = line[result_id]
        if hex_id is not None:
            entry = recent_entries.pop(hex_id, -1)
            if entry < 0:
                try:
                    entry = table_add(unhexlify(hex_id))
                except hex_error:
                    entry = -1
                if entry == len(state):  # a machine seen first: its state is appended whole
                    if code:
                        state.append(code)
                        attempts.append(0)
                        offsets.append(start)
                    else:
                        recent_entries[hex_id] = entry
                        state.append(_IN_DOUBT)
                        attempts.append(1 if digits == b"1" else int(digits))
                        offsets.append(_NONE)
                    folded = number
                    continue
            if entry >= 0:
                if code:
                    state[entry] = code
                    offsets[entry] = start
                    if held:
                        held.pop(entry, None)
                else:
                    recent_entries[hex_id] = entry
                    attempt = int(digits)
                    state[entry] |= _IN_DOUBT
                    if attempt > attempts[entry]:  # noqa: PLR1730 - max() is a call: slower
                        attempts[entry] = attempt
                folded = number
                continue
        if not line.strip():
            continue
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            error = JournalError(f"{path}:{number}: not a JSON line (the journal is corrupted)")
            if not line.endswith(b"\n"):
                pending_error = error  # tolerated if it is the very last line
                replay.torn_tail = True
                torn = len(line)
                continue
            raise error from None
        folded = number
        if not isinstance(record, dict):
            raise JournalError(f"{path}:{number}: a record must be a JSON object")
        _fold(replay, record, path, number, start)
    replay.lines = folded
    if recent:
        _scan_recent(replay, path, position - torn)
    return replay


#: Bytes of the journal's tail read first for the recent send times (about 20,000 lines).
_TAIL_BYTES = 4 << 20


def _scan_recent(replay: Replay, path: Path, end: int) -> None:
    """Fill the replay's recent send times and round trips from the journal's last lines
    (up to byte ``end``): only the newest 10,000 sends matter, so the main pass skips them.
    The tail is read again, growing until it holds enough attempts or is the whole file."""
    wanted = replay.recent.maxlen
    window = _TAIL_BYTES
    try:
        with path.open("rb") as handle:
            while True:
                start = max(0, end - window)
                handle.seek(start)
                lines = handle.read(end - start).split(b"\n")
                if start > 0:
                    del lines[0]  # the end of a line that began before the window
                attempts = sum(1 for line in lines if line.startswith(_ATTEMPT_HEAD))
                if start == 0 or attempts >= wanted:
                    break
                window *= 4
    except OSError as exc:
        raise JournalError(f"cannot read journal {path}: {exc.strerror}") from None
    recent, pairs = replay.recent, replay.recent_result_pairs
    recent.clear()
    pairs.clear()
    for line in lines:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # blank, or a line the main pass has judged already
        if not isinstance(record, dict):
            continue
        kind, at = record.get("type"), record.get("at")
        if not isinstance(at, str):
            continue
        if kind == "session":
            recent.session(at)
            continue
        machine_id = record.get("machine_id")
        if not isinstance(machine_id, str):
            continue
        if kind == "attempt":
            recent.sent(machine_id, at)
        elif kind == "result":
            pair = recent.answered(machine_id, at)
            if pair is not None:
                pairs.append(pair)


def _fold(
    replay: Replay,
    record: dict[str, Any],
    path: Path,
    number: int,
    offset: int | None,
    *,
    recency: bool = False,
) -> None:
    """Fold one decoded record; ``recency``: also keep the recent send and round-trip times
    (a replay of a file takes those from the file's tail instead: :func:`_scan_recent`)."""
    kind = record.get("type")
    if kind == "session":
        replay.sessions += 1
        command = record.get("command")
        if isinstance(command, str):
            replay.session_commands.add(command)
        budget = record.get("budget")
        replay.session_budgets.add(budget if isinstance(budget, str) else "none")
        if recency and isinstance(record.get("at"), str):
            replay.recent.session(record["at"])
        return
    if kind == "plan":
        replay.planned = True
        return
    if kind == "status":
        _fold_status(replay, record)
        return
    if kind == "cancel":
        _fold_cancel(replay, record)
        return
    if kind == "tag":
        _fold_tag(replay, record)
        return
    if kind not in ("attempt", "result"):
        return  # header repeats, end and unknown types do not change the plan
    machine_id = record.get("machine_id")
    if kind == "result" and machine_id is None and record.get("outcome") in _REJECTED:
        if replay.see_invalid(str(record.get("where", "")), str(record.get("input", ""))):
            if offset is None:
                replay._invalid.append(-1 - len(replay._invalid_held))
                replay._invalid_held.append(record)
            else:
                replay._invalid.append(offset)
            replay._invalid_counts[str(record.get("outcome"))] += 1
        return
    if not isinstance(machine_id, str):
        raise JournalError(f"{path}:{number}: a {kind} record without a machine_id")
    key = _key_of(machine_id)
    if key is None:
        raise JournalError(f"{path}:{number}: the machine_id of a {kind} is not a 40-hex id")
    entry = replay._add(key)
    if kind == "attempt":
        attempt = record.get("attempt", replay._attempts[entry] + 1)
        if not isinstance(attempt, int) or isinstance(attempt, bool) or not 0 <= attempt < 2**32:
            raise JournalError(f"{path}:{number}: the attempt count {attempt!r} is not a number")
        replay._attempts[entry] = max(replay._attempts[entry], attempt)
        replay._state[entry] |= _IN_DOUBT
        at = record.get("at")
        if recency and isinstance(at, str):
            replay.recent.sent(machine_id, at)
        return
    if recency:
        at = record.get("at")
        if isinstance(at, str):
            pair = replay.recent.answered(machine_id, at)
            if pair is not None:
                replay.recent_result_pairs.append(pair)
    replay._state[entry] = replay._code(str(record.get("outcome")).encode("utf-8", "replace"))
    if offset is None:
        replay._offsets[entry] = _HELD
        replay._held[entry] = record
    else:
        replay._offsets[entry] = offset
        replay._held.pop(entry, None)


#: Results that name no machine: one per rejected input value.
_REJECTED = ("invalid_id", "unresolved")


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


def _fold_cancel(replay: Replay, record: dict[str, Any]) -> None:
    """Keep the latest ``cancel`` record of a machine; a result's ``action_status`` is also
    the action's latest known status. Incomplete records are skipped (as status records)."""
    machine_id = record.get("machine_id")
    stage = record.get("stage")
    if not isinstance(machine_id, str) or stage not in ("attempt", "result"):
        return
    action_id = record.get("action_id")
    action_id = action_id if isinstance(action_id, str) else None
    at = record.get("at")
    at = at if isinstance(at, str) else ""
    before = replay.cancels.get(machine_id)
    attempts = before.attempts if before is not None else 0
    if stage == "attempt":
        number = record.get("attempt")
        attempts = max(attempts, number if isinstance(number, int) else attempts + 1)
        outcome = before.outcome if before is not None else None
    else:
        outcome = str(record.get("outcome"))
        status = record.get("action_status")
        if isinstance(status, str) and status:
            replay.statuses[machine_id] = ActionSeen(
                action_id=action_id, action_status=status, at=at
            )
    replay.cancels[machine_id] = CancelSeen(action_id, stage, outcome, attempts, at)


def _fold_tag(replay: Replay, record: dict[str, Any]) -> None:
    """Note the machines a successful tag call added the tag to, or removed it from."""
    if record.get("stage") != "result" or record.get("outcome") != "tagged":
        return
    value, action, machine_ids = (
        record.get("value"),
        record.get("action"),
        record.get("machine_ids"),
    )
    if not isinstance(value, str) or action not in ("Add", "Remove"):
        return
    if not isinstance(machine_ids, list):
        return
    marks = replay.marks.setdefault(value, {})
    for machine_id in machine_ids:
        key = _key_of(machine_id) if isinstance(machine_id, str) else None
        if key is not None:
            marks[key] = sys.intern(action)


def _epoch_of(text: str | bytes) -> float | None:
    """A journal time as epoch seconds; None when it is not one."""
    try:
        return parse_iso(text.decode() if isinstance(text, bytes) else text).timestamp()
    except (ValueError, UnicodeDecodeError):
        return None


def _read_lines(path: Path) -> Generator[bytes, None, None]:
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise JournalError(f"journal {path} does not exist") from None
    except OSError as exc:
        raise JournalError(f"cannot read journal {path}: {exc.strerror}") from None
    with handle:
        yield from handle


#: Bytes a journal line takes at least, to size the machine table from the file's size.
_SHORTEST_LINE = 300


def read_header(path: Path) -> dict[str, Any]:
    """The journal's header alone (its first line), checked, without replaying the rest."""
    lines = _read_lines(path)
    try:
        return _header_of(enumerate(lines, start=1), path)[0]
    finally:
        lines.close()


def replay_file(path: Path, *, recent: bool = True) -> Replay:
    """Replay the journal at ``path`` (no lock needed: reading is safe while a run appends);
    ``recent=False`` for a report (see :func:`replay_lines`)."""
    try:
        reserve = path.stat().st_size // _SHORTEST_LINE
    except OSError:
        reserve = 0
    return replay_lines(_read_lines(path), path, reserve=reserve, recent=recent)
