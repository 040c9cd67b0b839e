"""The journal: whole lines, a lock, replay that tolerates a torn tail and nothing else."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from bulkoffboard.errors import JournalError, JournalLockedError
from bulkoffboard.journal import FORMAT_VERSION, TOOL, Journal, replay_file

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
