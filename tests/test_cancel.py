"""Undo a batch (issue 16): ``cancel`` cancels exactly the run's open offboard actions and
takes the run's marks off those machines; ``run --mark`` tags before the first offboard call;
resumable both ways; a missing permission stops with exit 3."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import io
from pathlib import Path
from typing import Any

import orjson
import pytest

import bulkoffboard
from bulkoffboard.emulator import AppRegistration, EmulatorConfig, EmulatorServer, FleetSpec
from bulkoffboard.journal import replay_file
from tests.conftest import StartEmulator, connection_for, env_for
from tests.test_cli import cli

LIMITS = ["100/0.6", "1500/36"]
LIMIT_FLAGS = ("--limit", LIMITS[0], "--limit", LIMITS[1])
MARK = "retired CHG0042"
READER_ID = "33333333-3333-4333-8333-333333333333"
READER_SECRET = "reader-secret-value"


def fleet_config(size: int = 60, **kwargs: Any) -> EmulatorConfig:
    """Windows machines, half of them offline (their offboard stays Pending), some with
    someone else's offboard pending already; a reader app without Machine.Offboard and
    without Machine.ReadWrite.All."""
    kwargs.setdefault(
        "apps",
        (
            AppRegistration(),
            AppRegistration(client_id=READER_ID, secret=READER_SECRET, roles=("Machine.Read.All",)),
        ),
    )
    return EmulatorConfig(
        time_scale=0.01,
        action_start_s=0.05,
        action_complete_s=0.1,
        fleet=FleetSpec(
            size=size,
            seed=5,
            os_mix={"Windows10": 1.0},
            health_mix={"Active": 0.5, "Inactive": 0.5},
            pending_fraction=0.1,
        ),
        **kwargs,
    )


def run_actions(server: EmulatorServer, run_id: str) -> dict[str, Any]:
    """Machine id -> the run's offboard action (one each)."""
    return {a.machine_id: a for a in server.emulator.actions.values() if run_id in a.comment}


def tags_of(server: EmulatorServer, machine_id: str) -> list[str]:
    return list(server.emulator.machines[machine_id].get("machineTags") or ())


async def offboard_all(server: EmulatorServer, journal: Path, **options: Any) -> str:
    summary = await bulkoffboard.run(
        list(server.emulator.machines),
        journal=journal,
        limits=LIMITS,
        connection=connection_for(server),
        **options,
    )
    assert summary.exit_code == 0, summary.reason
    await asyncio.sleep(0.3)  # the online devices finish their actions
    return summary.run_id


async def test_cancel_undoes_exactly_the_runs_open_offboards_and_their_marks(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(fleet_config())
    emulator = server.emulator
    journal = tmp_path / "run.jsonl"
    others = {a.id: a.machine_id for a in emulator.actions.values()}  # someone else's
    assert others, "the fleet must hold someone else's pending offboards"
    before = {m: tags_of(server, m) for m in emulator.machines}
    run_id = await offboard_all(server, journal, mark=MARK, mark_run_id=True)
    ours = run_actions(server, run_id)
    assert not set(ours) & set(others.values())  # those were already_pending
    pending = {m for m, a in ours.items() if emulator.action_status(a) == "Pending"}
    final = set(ours) - pending
    assert pending and final
    run_tag = f"bulkoffboard-{run_id[:8]}"
    for machine_id in ours:  # tagged before the offboard, with both tags
        assert tags_of(server, machine_id) == [*before[machine_id], MARK, run_tag]
    for machine_id in set(emulator.machines) - set(ours):  # not offboarded: not marked
        assert tags_of(server, machine_id) == before[machine_id]
    header = replay_file(journal).header
    assert header["mark"] == [MARK, run_tag]

    conn = connection_for(server)
    summary = await bulkoffboard.cancel(journal, limits=LIMITS, connection=conn)
    assert summary.exit_code == 0, summary.reason
    assert summary.counts == {"cancelled": len(pending), "too_late": len(final)}
    assert summary.skipped["not_this_run"] == len(others)
    # Exactly the run's open actions were cancelled, once each; nothing else was touched.
    assert set(emulator.truth.cancel_posts) == {ours[m].id for m in pending}
    assert set(emulator.truth.cancel_posts.values()) == {1}
    for machine_id, action in ours.items():
        expected = "Cancelled" if machine_id in pending else "Succeeded"
        assert emulator.action_status(action) == expected
    for action_id in others:
        assert emulator.action_status(emulator.actions[action_id]) == "Pending"
    # The marks came off the cancelled machines only.
    for machine_id in ours:
        marks = [] if machine_id in pending else [MARK, run_tag]
        assert tags_of(server, machine_id) == [*before[machine_id], *marks]
    assert summary.unmarked == 2 * len(pending)

    # A second cancel sends nothing: every machine settled.
    posts = sum(emulator.truth.cancel_posts.values())
    again = await bulkoffboard.cancel(journal, limits=LIMITS, connection=conn)
    assert again.exit_code == 0
    assert again.calls == again.reads == 0 and not again.counts
    assert again.skipped["settled"] == len(ours)
    assert sum(emulator.truth.cancel_posts.values()) == posts

    # Every report shows the cancellations; an undone offboard does not need a person.
    data = orjson.loads(bulkoffboard.report(journal, "json"))
    assert data["cancelled"] == len(pending)
    assert data["cancels"] == {"cancelled": len(pending), "too_late": len(final)}
    assert data["action_statuses"]["Cancelled"] == len(pending)
    assert not [m for m in data["attention_machines"] if m["machine_id"] in ours]
    rows = {
        r["machine_id"]: r for r in csv.DictReader(io.StringIO(bulkoffboard.report(journal, "csv")))
    }
    for machine_id in pending:
        assert rows[machine_id]["action_status"] == "Cancelled"
    assert "cancelled" in bulkoffboard.report(journal, "table")
    assert "Cancelled (`bulkoffboard cancel`)" in bulkoffboard.report(journal, "markdown")

    # A cancelled run is not resumed: its offboards were withdrawn on purpose.
    with pytest.raises(bulkoffboard.UsageError, match="was cancelled"):
        await bulkoffboard.resume(journal, connection=conn)


async def test_dry_run_says_what_would_be_cancelled_and_sends_nothing(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(fleet_config(40))
    journal = tmp_path / "run.jsonl"
    run_id = await offboard_all(server, journal)
    ours = run_actions(server, run_id)
    pending = {m for m, a in ours.items() if server.emulator.action_status(a) == "Pending"}
    before = journal.read_bytes()
    summary = await bulkoffboard.cancel(
        journal, dry_run=True, limits=LIMITS, connection=connection_for(server)
    )
    assert summary.exit_code == 0 and summary.dry_run
    would = collections.Counter(row["would"] for row in summary.rows)
    assert would == {"cancel": len(pending), "too_late": len(ours) - len(pending)}
    assert {r["machine_id"] for r in summary.rows if r["would"] == "cancel"} == pending
    assert not server.emulator.truth.cancel_posts
    assert journal.read_bytes() == before  # a dry run writes nothing


async def test_ids_narrow_the_cancel_and_a_bad_id_is_refused_before_anything(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(fleet_config(40))
    journal = tmp_path / "run.jsonl"
    run_id = await offboard_all(server, journal)
    ours = run_actions(server, run_id)
    pending = sorted(m for m, a in ours.items() if server.emulator.action_status(a) == "Pending")
    conn = connection_for(server)
    with pytest.raises(bulkoffboard.UsageError, match="not a machine id"):
        await bulkoffboard.cancel(journal, ids=[pending[0], "nope"], connection=conn)
    assert not server.emulator.truth.cancel_posts
    chosen = tmp_path / "undo.txt"
    chosen.write_text("\n".join(pending[:2]) + "\n", encoding="utf-8")
    summary = await bulkoffboard.cancel(journal, ids=chosen, limits=LIMITS, connection=conn)
    assert summary.counts == {"cancelled": 2}
    assert set(server.emulator.truth.cancel_posts) == {ours[m].id for m in pending[:2]}


async def test_a_cancel_killed_midway_resumes_without_cancelling_twice(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(fleet_config(80))
    emulator = server.emulator
    journal = tmp_path / "run.jsonl"
    run_id = await offboard_all(server, journal)
    ours = run_actions(server, run_id)
    pending = {m for m, a in ours.items() if emulator.action_status(a) == "Pending"}
    conn = connection_for(server)
    slow = ["5/0.3", "1500/36"]  # a few cancels at a time, so the kill lands mid-way
    task = asyncio.ensure_future(bulkoffboard.cancel(journal, limits=slow, connection=conn))
    while sum(emulator.truth.cancel_posts.values()) < 6:
        await asyncio.sleep(0.005)
    task.cancel()  # as a hard kill: no end record, a cancel may be in flight
    with contextlib.suppress(asyncio.CancelledError):
        await task
    done = set(emulator.truth.cancel_posts)
    assert 0 < len(done) < len(pending)
    summary = await bulkoffboard.cancel(journal, limits=LIMITS, connection=conn)
    assert summary.exit_code == 0, summary.reason
    assert {m for m, a in ours.items() if emulator.action_status(a) == "Cancelled"} == pending
    assert set(emulator.truth.cancel_posts.values()) == {1}  # never cancelled twice
    assert set(emulator.truth.actions_cancelled.values()) == {1}
    replay = replay_file(journal)
    assert replay.cancel_counts()["cancelled"] == len(pending)


async def test_cancel_without_the_permission_stops_with_exit_3(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(fleet_config(20))
    journal = tmp_path / "run.jsonl"
    await offboard_all(server, journal)
    reader = connection_for(server, client_id=READER_ID, secret=READER_SECRET)
    summary = await bulkoffboard.cancel(journal, limits=LIMITS, connection=reader)
    assert summary.exit_code == 3
    assert "Machine.Offboard" in summary.reason
    assert not server.emulator.truth.actions_cancelled


async def test_a_run_asked_to_mark_without_the_permission_refuses_to_start(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(
        fleet_config(
            10,
            apps=(AppRegistration(roles=("Machine.Offboard", "Machine.Read.All")),),
        )
    )
    journal = tmp_path / "run.jsonl"
    with pytest.raises(bulkoffboard.AuthError, match=r"Machine\.ReadWrite\.All"):
        await bulkoffboard.run(
            list(server.emulator.machines),
            journal=journal,
            mark=MARK,
            limits=LIMITS,
            connection=connection_for(server),
        )
    assert not journal.exists()
    assert not server.emulator.truth.offboard_posts
    check = await bulkoffboard.check(connection=connection_for(server))
    assert ("warn", next(t for m, t in check.findings if "marking" in t)) in check.findings


@pytest.mark.parametrize("tag", ["", " padded", "bell\x07", "x" * 201])
async def test_a_bad_tag_is_refused_before_anything_is_sent(
    start_emulator: StartEmulator, tmp_path: Path, tag: str
) -> None:
    server = await start_emulator(fleet_config(5))
    with pytest.raises(bulkoffboard.UsageError, match="--mark"):
        await bulkoffboard.run(
            list(server.emulator.machines),
            journal=tmp_path / "run.jsonl",
            mark=tag,
            connection=connection_for(server),
        )
    assert not server.emulator.truth.offboard_posts
    assert not server.emulator.truth.tag_operations


async def test_resume_does_not_tag_twice(start_emulator: StartEmulator, tmp_path: Path) -> None:
    server = await start_emulator(fleet_config(120))
    emulator = server.emulator
    journal = tmp_path / "run.jsonl"
    conn = connection_for(server)
    task = asyncio.ensure_future(
        bulkoffboard.run(
            list(emulator.machines),
            journal=journal,
            mark=MARK,
            limits=["10/0.3", "1500/36"],
            connection=conn,
        )
    )
    while sum(emulator.truth.offboard_posts.values()) < 5:
        await asyncio.sleep(0.005)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    tagged = dict(emulator.truth.tag_operations)
    assert tagged and set(tagged.values()) == {1}  # every machine to offboard, tagged once
    resumed = await bulkoffboard.resume(journal, limits=LIMITS, connection=conn)
    assert resumed.exit_code == 0
    assert dict(emulator.truth.tag_operations) == tagged  # nothing tagged again


async def test_cancel_from_the_command_line(start_emulator: StartEmulator, tmp_path: Path) -> None:
    server = await start_emulator(fleet_config(30))
    journal = tmp_path / "run.jsonl"
    run_id = await offboard_all(server, journal)
    pending = [
        m
        for m, a in run_actions(server, run_id).items()
        if server.emulator.action_status(a) == "Pending"
    ]
    env = env_for(server)
    code, out, err = await cli(
        "cancel",
        "--journal",
        str(journal),
        "--dry-run",
        *LIMIT_FLAGS,
        env=env,
    )
    assert code == 0, err
    assert out.count("cancel ") >= len(pending)
    assert not server.emulator.truth.cancel_posts
    summary_path = tmp_path / "cancel.json"
    code, out, err = await cli(
        "cancel",
        "--journal",
        str(journal),
        "--comment",
        "wrong list CHG0043",
        "--summary-json",
        str(summary_path),
        *LIMIT_FLAGS,
        env=env,
    )
    assert code == 0, err
    data = orjson.loads(summary_path.read_bytes())
    assert data["counts"]["cancelled"] == len(pending)
    cancelled = [a for a in server.emulator.actions.values() if a.cancel_comment]
    assert {a.cancel_comment for a in cancelled} == {
        f"wrong list CHG0043 [bulkoffboard run {run_id}]"
    }
    code, out, err = await cli("cancel", "--journal", str(journal), "--max-machines", "-1", env=env)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
