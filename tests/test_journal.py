"""The journal: whole lines, a lock, replay that tolerates a torn tail and nothing else."""

from __future__ import annotations

import asyncio
import os
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest

from bulkoffboard import journal as journal_module
from bulkoffboard.errors import JournalError, JournalLockedError
from bulkoffboard.journal import FORMAT_VERSION, TOOL, Journal, Replay, replay_file

HEADER = {"format": FORMAT_VERSION, "tool": TOOL, "run_id": "r1", "source": {}}
A, B, C = "a" * 40, "b" * 40, "c" * 40


def lines(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_create_writes_the_header_first_and_refuses_an_existing_journal(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)
    journal.close()
    assert lines(path)[0]["type"] == "header"
    with pytest.raises(JournalError, match="already exists; use 'bulkoffboard resume"):
        Journal.create(path, HEADER)
    assert len(lines(path)) == 1, "the refused create must not touch the journal"


def test_a_second_writer_is_refused_naming_the_holders_pid(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)
    try:
        with pytest.raises(JournalLockedError, match=f"pid {os.getpid()}"):
            Journal.resume(path)
    finally:
        journal.close()
    second, _ = Journal.resume(path)  # free again once closed
    second.close()


def test_replay_folds_attempts_and_results_into_per_machine_state(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)
    journal.append({"type": "session", "at": "2026-11-28T00:00:00.000000Z"})
    for machine in (A, B, C):
        journal.append(
            {
                "type": "attempt",
                "machine_id": machine,
                "attempt": 1,
                "at": "2026-11-28T00:00:01.000000Z",
            }
        )
    journal.append({"type": "result", "machine_id": A, "outcome": "offboarded", "attempts": 1})
    journal.append({"type": "result", "machine_id": B, "outcome": "failed", "attempts": 1})
    journal.append(
        {
            "type": "result",
            "machine_id": None,
            "outcome": "invalid_id",
            "where": "ids.txt:4",
            "input": "zz",
        }
    )
    journal.append({"type": "future-record-type", "anything": 1})
    journal.close()
    replay = replay_file(path)
    assert replay.final_result(A) is not None
    assert replay.final_result(B) is None, "failed is not final: resume retries it"
    assert replay.in_doubt() == [C]
    assert len(replay.recent_sends) == 3
    assert replay.sessions == 1
    assert [r["outcome"] for r in replay.results()] == ["invalid_id", "offboarded", "failed"]
    assert [r["outcome"] for r in replay.results({"failed", "invalid_id"})] == [
        "invalid_id",
        "failed",
    ]
    assert list(replay.results({"excluded"})) == []
    replay.close()
    # A filtered read does not even read the other results' lines.
    path.write_bytes(path.read_bytes().replace(b'"offboarded",', b'"offboarded"X'))
    assert [r["machine_id"] for r in replay.results({"failed"})] == [B]
    with pytest.raises(JournalError, match="changed since it was read"):
        list(replay.results())


def test_a_torn_last_line_is_ignored_on_replay_and_cut_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)
    journal.append(
        {"type": "attempt", "machine_id": A, "attempt": 1, "at": "2026-11-28T00:00:01.000000Z"}
    )
    journal.close()
    with path.open("ab") as handle:
        handle.write(b'{"type":"result","machine_id":"' + A.encode() + b'","outc')
    replay = replay_file(path)
    assert replay.in_doubt() == [A]
    assert replay.torn_tail
    journal, _ = Journal.resume(path)
    journal.append({"type": "result", "machine_id": A, "outcome": "offboarded"})
    journal.close()
    assert [r["type"] for r in lines(path)] == ["header", "attempt", "result"]


def test_a_whole_last_record_missing_only_its_newline_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)
    journal.append(
        {"type": "attempt", "machine_id": A, "attempt": 1, "at": "2026-11-28T00:00:01.000000Z"}
    )
    journal.append({"type": "result", "machine_id": A, "outcome": "offboarded"})
    journal.close()
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    assert replay_file(path).final_result(A) is not None
    journal, replay = Journal.resume(path)
    assert replay.final_result(A) is not None
    journal.append({"type": "end"})
    journal.close()
    assert [r["type"] for r in lines(path)] == ["header", "attempt", "result", "end"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"hello world\n", "not a JSON line"),
        (b'{"type": "header", "tool": "other", "format": 1}\n', "not a bulkoffboard journal"),
        (b'{"type": "header", "tool": "bulkoffboard", "format": 99}\n', "newer bulkoffboard"),
        (
            b'{"type": "header", "tool": "bulkoffboard", "format": 1}\nnot json\n{"type": "end"}\n',
            ":2: not a JSON line",
        ),
        (
            b'{"type": "header", "tool": "bulkoffboard", "format": 1}\n{"type": "attempt"}\n',
            "without a machine_id",
        ),
    ],
)
def test_foreign_corrupted_or_newer_journals_are_refused_with_a_clear_error(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(content)
    with pytest.raises(JournalError, match=message):
        replay_file(path)


def test_resuming_a_missing_journal_names_it(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="does not exist"):
        Journal.resume(tmp_path / "missing.jsonl")


def test_a_journal_that_cannot_be_created_fails_before_anything_else(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(JournalError):
        Journal.create(blocker / "j.jsonl", HEADER)


def test_each_record_is_one_whole_line(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)
    journal.append({"type": "result", "machine_id": A, "message": "line\nbreak and \u00e9"})
    journal.close()
    raw = path.read_bytes()
    assert raw.count(b"\n") == 2
    assert lines(path)[1]["message"] == "line\nbreak and \u00e9"


def test_replay_measures_the_round_trips_of_the_process_before(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)
    journal.append({"type": "attempt", "machine_id": A, "at": "2026-11-28T00:00:01.000000Z"})
    journal.append(
        {
            "type": "result",
            "machine_id": A,
            "outcome": "offboarded",
            "at": "2026-11-28T00:00:01.250000Z",
        }
    )
    journal.close()
    assert list(replay_file(path).recent_round_trips) == [pytest.approx(0.25)]


def test_recent_sends_know_when_each_call_had_arrived_at_the_latest(tmp_path: Path) -> None:
    """A call arrived before the next line about its machine (a retry or a result), and
    before the next session started (its process was gone); one in doubt at the end of the
    journal, before now."""

    def at(seconds: float) -> str:
        return f"2026-11-28T00:00:{seconds:09.6f}Z"

    records: list[dict[str, Any]] = [
        {"type": "session", "at": at(0), "pid": 1},
        {"type": "attempt", "machine_id": A, "attempt": 1, "at": at(1)},
        {"type": "attempt", "machine_id": A, "attempt": 2, "at": at(1.5)},  # a 429, retried
        {"type": "result", "machine_id": A, "outcome": "offboarded", "at": at(2)},
        {"type": "attempt", "machine_id": B, "attempt": 1, "at": at(3)},  # killed in flight
        {"type": "attempt", "machine_id": C, "attempt": 1, "at": at(3.25)},
        {"type": "session", "at": at(5), "pid": 2},
        {"type": "result", "machine_id": C, "outcome": "offboarded", "at": at(5.5)},
        {"type": "attempt", "machine_id": B, "attempt": 2, "at": at(6)},  # in doubt at the end
    ]
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)
    for record in records:
        journal.append(record)
    journal.close()
    applied = Replay(HEADER)
    for record in records:
        applied.apply(record)
    zero = journal_module.parse_iso(at(0)).timestamp()
    expected = [(1, 0.5), (1.5, 0.5), (3, 2), (3.25, 1.75), (6, 4)]
    for replay in (replay_file(path), applied):
        got = [x for sent, lag in replay.recent_send_lags(zero + 10) for x in (sent - zero, lag)]
        assert got == pytest.approx([x for pair in expected for x in pair])
        assert replay.recent_round_trips == [pytest.approx(0.5)]  # only A's retry was answered


def test_recent_sends_keep_the_latest_in_a_ring() -> None:
    recent = journal_module.RecentSends(maxlen=3)
    for n in range(5):
        recent.sent(f"m{n}", f"2026-11-28T00:00:0{n}.000000Z")
    recent.answered("m0", "2026-11-28T00:00:09.000000Z")  # dropped already: nothing to pair
    assert recent.answered("m3", "2026-11-28T00:00:05.000000Z") is not None
    zero = journal_module.parse_iso("2026-11-28T00:00:00.000000Z").timestamp()
    assert [t - zero for t in recent.times()] == [2, 3, 4]
    assert [lag for _, lag in recent.lags(zero + 10)] == [8, 2, 6]
    assert len(recent) == 3


def test_the_fast_replay_path_agrees_with_the_general_one(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)
    for n, machine in enumerate((A, B, C)):
        journal.append(
            {
                "type": "attempt",
                "machine_id": machine,
                "attempt": n + 1,
                "at": f"2026-11-28T00:00:0{n}.000000Z",
            }
        )
        if machine != C:
            journal.append(
                {
                    "type": "result",
                    "machine_id": machine,
                    "outcome": "offboarded",
                    "action_id": "x",
                    "message": 'a "quoted" ,"at":"trap"',
                    "attempts": n + 1,
                    "at": f"2026-11-28T00:00:0{n}.500000Z",
                }
            )
    journal.close()
    fast = replay_file(path)
    # The same records with their keys in another order only take the general path.
    shuffled = tmp_path / "k.jsonl"
    shuffled.write_bytes(
        b"".join(orjson.dumps(dict(sorted(r.items(), reverse=True))) + b"\n" for r in lines(path))
    )
    slow = replay_file(shuffled)
    for replay in (fast, slow):
        assert replay.in_doubt() == [C]
        assert replay.machines[B].attempts == 2
        assert replay.final_result(A) is not None
    assert [r["message"] for r in fast.results()] == [r["message"] for r in slow.results()]
    assert fast.recent_sends == slow.recent_sends
    assert fast.recent_round_trips == slow.recent_round_trips == [0.5, 0.5]


def _pairs(path: Path, count: int, *, outcome: str = "offboarded") -> list[str]:
    """A journal of ``count`` attempt + result pairs written by :class:`Journal`."""
    journal = Journal.create(path, HEADER)
    machines = [f"{n:040x}" for n in range(1, count + 1)]
    for n, machine in enumerate(machines):
        at = f"2026-11-28T00:{n // 60 % 60:02d}:{n % 60:02d}.000000Z"
        journal.append({"type": "attempt", "machine_id": machine, "attempt": 1, "at": at})
        journal.append(
            {"type": "result", "machine_id": machine, "outcome": outcome, "message": f"m{n}"}
            | {"at": at.replace(".000000Z", ".250000Z")}
        )
    journal.close()
    return machines


def test_results_are_read_back_from_their_lines_not_held(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    machines = _pairs(path, 50)
    replay = replay_file(path)
    assert [r["message"] for r in replay.results()] == [f"m{n}" for n in range(50)]
    assert replay.outcome_counts() == {"offboarded": 50}
    assert replay.machines[machines[7]].result == replay.final_result(machines[7])
    replay.close()
    # The file changed under the replay (it never does: the journal is append-only).
    path.write_bytes(path.read_bytes().replace(b'"m7"', b"XXXX"))
    with pytest.raises(JournalError, match="changed since it was read"):
        replay.final_result(machines[7])


def test_records_applied_with_their_offset_read_back_and_without_one_are_held(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)
    replay = Replay(header=HEADER, path=path)
    first = {"type": "result", "machine_id": A, "outcome": "excluded", "message": "by tag"}
    replay.apply(first, journal.append(first))
    second = {"type": "result", "machine_id": B, "outcome": "excluded", "message": "held"}
    replay.apply(second)
    rejected = {"type": "result", "machine_id": None, "outcome": "invalid_id", "where": "f:1"}
    replay.apply(rejected, journal.append(rejected))
    journal.close()
    assert list(replay.results()) == [rejected, first, second]
    assert not replay.see_invalid("f:1", ""), "the rejected value is known"
    assert replay.see_invalid("f:2", "")


def test_a_machine_id_in_either_case_is_one_machine_and_a_non_hex_one_is_refused(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)
    journal.append({"type": "attempt", "machine_id": A.upper(), "attempt": 1, "at": "x"})
    journal.append({"type": "result", "machine_id": A, "outcome": "offboarded"})
    journal.close()
    replay = replay_file(path)
    assert list(replay.machines) == [A]
    assert replay.in_doubt() == []
    with path.open("ab") as handle:
        handle.write(b'{"type":"attempt","machine_id":"../../etc","attempt":1}\n')
    with pytest.raises(JournalError, match=r":4: the machine_id of a attempt is not a 40-hex"):
        replay_file(path)


def test_recent_sends_come_from_the_tail_however_far_back_it_must_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.jsonl"
    _pairs(path, 120)
    whole = replay_file(path)
    monkeypatch.setattr(journal_module, "_TAIL_BYTES", 256)  # grows x4 until the whole file
    grown = replay_file(path)
    assert len(grown.recent_sends) == 120
    assert grown.recent_sends == whole.recent_sends
    assert grown.recent_round_trips == whole.recent_round_trips == [0.25] * 120
    monkeypatch.setattr(Replay, "__init__", _small_recent(Replay.__init__))
    tail = replay_file(path)  # 10 sends wanted: the first small window is enough
    assert tail.recent_sends == whole.recent_sends[-10:]
    assert tail.recent_round_trips[-1] == 0.25


def _small_recent(init: Any) -> Any:
    def small(self: Replay, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.recent = journal_module.RecentSends(maxlen=10)

    return small


def test_a_replay_holds_tens_of_bytes_a_machine_not_records(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    _pairs(path, 20_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        replay = replay_file(path)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(replay.machines) == 20_000
    assert held / 20_000 < 120, f"{held / 20_000:.0f} bytes a machine"


def _attempt(machine: str, number: int = 1) -> dict[str, Any]:
    return {
        "type": "attempt",
        "machine_id": machine,
        "attempt": number,
        "at": "2026-11-28T00:00:01.000000Z",
    }


async def test_attempts_appended_in_one_turn_of_the_loop_share_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        offsets = await asyncio.gather(*(journal.append_durable(_attempt(m)) for m in (A, B, C)))
        assert synced == [path.stat().st_size], "one fsync covered all three"
        assert journal.durable_bytes == path.stat().st_size
        assert offsets == sorted(offsets)
        await journal.append_durable(_attempt(A, 2))  # a later turn: its own fsync
        assert len(synced) == 2
        journal.append(_attempt(B, 2), sync=True)  # a result's sync counts as durable too
        assert journal.durable_bytes == path.stat().st_size
    finally:
        journal.close()
    assert [r["machine_id"] for r in lines(path)[1:]] == [A, B, C, A, B]


async def test_a_failed_fsync_fails_every_waiter_and_the_next_commit_tries_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)
    real = os.fsync
    failures = [OSError(5, "Input/output error")]

    def fsync(fd: int) -> None:
        if failures:
            raise failures.pop()
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        outcome = await asyncio.gather(
            journal.append_durable(_attempt(A)),
            journal.append_durable(_attempt(B)),
            return_exceptions=True,
        )
        assert all(isinstance(e, JournalError) for e in outcome), outcome
        assert "cannot sync journal" in str(outcome[0]) and "Input/output" in str(outcome[0])
        assert journal.durable_bytes < path.stat().st_size
        await journal.append_durable(_attempt(C))
        assert journal.durable_bytes == path.stat().st_size
    finally:
        journal.close()


async def test_a_waiter_cancelled_during_the_commit_leaves_no_stray_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)

    def fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    try:
        waiter = asyncio.ensure_future(journal.append_durable(_attempt(A)))
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert waiter.cancelled()
    finally:
        monkeypatch.undo()
        journal.close()


@pytest.mark.parametrize(
    ("tail", "kept"),
    [
        (b"\0" * 10, 0),  # the new size reached the disk, the data did not
        (b"\0" * 200_000, 0),  # more zeros than the torn-line window
        (b'{"type":"attempt","mach' + b"\0" * 30, 0),  # half a line, then zeros
        (b'{"type":"session","at":"2026-11-28T00:00:02.000000Z"}' + b"\0" * 30, 1),
    ],
)
def test_zeros_a_power_cut_left_at_the_end_are_cut_before_appending(
    tmp_path: Path, tail: bytes, kept: int
) -> None:
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, HEADER)
    journal.append(_attempt(A), sync=True)
    journal.close()
    whole = path.read_bytes()
    path.write_bytes(whole + tail)
    assert replay_file(path).machines[A].in_doubt  # readable as it is
    journal, replay = Journal.resume(path)
    journal.append(_attempt(B))
    journal.close()
    records = lines(path)
    assert [r["type"] for r in records] == ["header", "attempt"] + ["session"] * kept + ["attempt"]
    assert b"\0" not in path.read_bytes()


def test_a_journal_of_zeros_is_refused_not_emptied(tmp_path: Path) -> None:
    path = tmp_path / "j.jsonl"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(JournalError, match="only zero bytes"):
        Journal.resume(path)
    assert path.read_bytes() == b"\0" * 4096
