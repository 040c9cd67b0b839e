"""End-to-end runs against the loopback emulator: outcomes, resume, faults, exit codes."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from bulkoffboard import reports as report
from bulkoffboard.emulator import AppRegistration, EmulatorConfig, EmulatorServer, Faults, FleetSpec
from bulkoffboard.errors import AuthError, JournalLockedError
from bulkoffboard.jobs import Plan, execute, new_plan, plan_resume
from bulkoffboard.journal import Journal, replay_file
from bulkoffboard.runner import ExitCode, Summary
from bulkoffboard.throttle import Limit
from tests.conftest import StartEmulator, connection_for

SCALE = 0.01
LIMITS = (Limit(100, 60 * SCALE), Limit(1500, 3600 * SCALE))
FAST = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05, "shutdown_grace_s": 2.0}


def fleet(size: int = 60, **kwargs: Any) -> EmulatorConfig:
    """A time-scaled emulator config (an hour plays in 36 s) with quick action lifecycles."""
    kwargs.setdefault("fleet", FleetSpec(size=size, seed=7))
    return EmulatorConfig(time_scale=SCALE, action_start_s=0.05, action_complete_s=0.1, **kwargs)


def write_ids(path: Path, ids: list[str], extra: list[str] | None = None) -> Path:
    path.write_text("\n".join([*ids, *(extra or [])]) + "\n", encoding="utf-8")
    return path


def plan_for(server: EmulatorServer, tmp_path: Path, ids_path: Path, **tuning: Any) -> Plan:
    workers = tuning.pop("workers", 8)
    base = new_plan(
        journal_path=tmp_path / "journal.jsonl",
        source={"kind": "file", "path": str(ids_path), "format": "text"},
        comment="test run",
        workers=workers,
        limits=LIMITS,
        conn=connection_for(server),
    )
    return Plan(**{**_fields(base), "tuning": {**FAST, **tuning}})


def _fields(plan: Plan) -> dict[str, Any]:
    return {name: getattr(plan, name) for name in Plan.__dataclass_fields__}


def resume_plan(server: EmulatorServer, journal: Path, **tuning: Any) -> Plan:
    plan = plan_resume(journal, None, None, {})
    return Plan(**{**_fields(plan), "tuning": {**FAST, **tuning}})


def ours(server: EmulatorServer, run_id: str) -> dict[str, int]:
    """Offboard actions this run created, per machine, from the emulator's ground truth."""
    per_machine: dict[str, int] = {}
    for action in server.emulator.actions.values():
        if run_id in action.comment:
            per_machine[action.machine_id] = per_machine.get(action.machine_id, 0) + 1
    return per_machine


def outcome_by_machine(journal: Path) -> dict[str, str]:
    return {
        str(r["machine_id"]): str(r["outcome"])
        for r in replay_file(journal).results()
        if r.get("machine_id")
    }


async def test_every_outcome_comes_from_the_emulators_real_behaviour(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(fleet(80, fleet=FleetSpec(size=80, seed=3, pending_fraction=0.1)))
    emulator = server.emulator
    ids = list(emulator.machines)
    unknown = ["f" * 40, "e" * 40]
    ids_path = write_ids(tmp_path / "ids.txt", ids, [*unknown, "nonsense", ids[0].upper()])
    plan = plan_for(server, tmp_path, ids_path)

    summary = await execute(plan, connection_for(server))

    assert summary.exit_code == ExitCode.OK
    outcomes = outcome_by_machine(plan.journal_path)
    created = ours(server, plan.run_id)
    for machine_id, machine in emulator.machines.items():
        if machine["osPlatform"] in ("Linux", "macOS"):
            assert outcomes[machine_id] == "unsupported"
        elif machine_id in created:
            assert outcomes[machine_id] == "offboarded"
        else:
            assert outcomes[machine_id] == "already_pending"
    assert outcomes["f" * 40] == outcomes["e" * 40] == "not_found"
    counts = report.summary(replay_file(plan.journal_path))["counts"]
    assert counts["invalid_id"] == 1
    assert counts["offboarded"] == len(created) > 0
    assert counts["already_pending"] > 0
    assert counts["unsupported"] > 0
    assert all(n == 1 for n in created.values()), "a machine was offboarded twice"
    # The pending ones got their existing action recorded, not a new one.
    pending = [
        r for r in replay_file(plan.journal_path).results() if r["outcome"] == "already_pending"
    ]
    assert all(r["action_id"] in emulator.actions for r in pending)
    assert emulator.truth.malformed_paths == []


async def test_the_report_matches_the_emulators_ground_truth(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(fleet(50))
    ids_path = write_ids(tmp_path / "ids.txt", list(server.emulator.machines))
    plan = plan_for(server, tmp_path, ids_path)
    summary = await execute(plan, connection_for(server))
    data = report.summary(replay_file(plan.journal_path))
    truth = server.emulator.truth
    assert data["counts"]["offboarded"] == len(ours(server, plan.run_id))
    assert data["total"] == 50
    assert summary.calls == sum(truth.offboard_posts.values())
    assert data["run"]["run_id"] == plan.run_id
    csv_rows = report.render_csv(replay_file(plan.journal_path)).splitlines()
    assert csv_rows[0].startswith(
        "machine_id,outcome,action_id,action_status,error_code,attempts,updated_at"
    )
    assert len(csv_rows) == 51


async def test_a_second_run_on_the_same_journal_is_refused_while_locked(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(fleet(5))
    ids_path = write_ids(tmp_path / "ids.txt", list(server.emulator.machines))
    plan = plan_for(server, tmp_path, ids_path)
    holder = Journal.create(plan.journal_path, {"format": 1, "tool": "bulkoffboard"})
    try:
        with pytest.raises(JournalLockedError, match="in use by another bulkoffboard process"):
            await execute(resume_plan_like(plan), connection_for(server))
    finally:
        holder.close()
    assert sum(server.emulator.truth.offboard_posts.values()) == 0


def resume_plan_like(plan: Plan) -> Plan:
    return Plan(**{**_fields(plan), "header": None})


async def test_a_wrong_secret_fails_before_any_journal_or_call(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(fleet(5))
    ids_path = write_ids(tmp_path / "ids.txt", list(server.emulator.machines))
    plan = plan_for(server, tmp_path, ids_path)
    with pytest.raises(AuthError) as caught:
        await execute(plan, connection_for(server, secret="wrong-secret-value"))
    assert caught.value.code == "AADSTS7000215"
    assert "wrong-secret-value" not in str(caught.value)
    assert server.emulator.config.tenant_id in str(caught.value)
    assert not plan.journal_path.exists()
    assert sum(server.emulator.truth.offboard_posts.values()) == 0


async def test_forbidden_everywhere_stops_early_with_exit_3_naming_the_permission(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    app = AppRegistration(roles=("Machine.Read.All",))
    server = await start_emulator(fleet(60, apps=(app,)))
    ids_path = write_ids(tmp_path / "ids.txt", list(server.emulator.machines))
    plan = plan_for(server, tmp_path, ids_path, workers=2)
    summary = await execute(plan, connection_for(server))
    assert summary.exit_code == ExitCode.AUTH
    assert "Machine.Offboard" in summary.reason
    assert summary.calls < 10, "kept calling after every call was forbidden"
    outcomes = set(outcome_by_machine(plan.journal_path).values())
    assert "forbidden" in outcomes
    assert outcomes <= {"forbidden", "unsupported"}  # unsupported: decided by the preflight


async def test_server_errors_until_retries_run_out_end_failed_and_exit_1_then_resume_retries(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(fleet(6, faults=Faults(error_rate=1.0)))
    ids_path = write_ids(tmp_path / "ids.txt", list(server.emulator.machines))
    plan = plan_for(server, tmp_path, ids_path, max_attempts=3)
    summary = await execute(plan, connection_for(server))
    assert summary.exit_code == ExitCode.SOME_FAILED
    outcomes = outcome_by_machine(plan.journal_path)
    assert set(outcomes.values()) <= {"failed", "unsupported"}
    assert "failed" in outcomes.values()
    failed = [r for r in replay_file(plan.journal_path).results() if r["outcome"] == "failed"]
    # Every endpoint answers 500, so after the first POST the existing-action check cannot be
    # made either: the machine is left failed rather than posted blindly again.
    assert all(r["http_status"] == 500 and r["attempts"] >= 1 for r in failed)
    assert all("could not check for an existing action" in r["message"] for r in failed)

    server.emulator.faults.error_rate = 0.0
    again = await execute(resume_plan(server, plan.journal_path), connection_for(server))
    assert again.exit_code == ExitCode.OK
    outcomes = outcome_by_machine(plan.journal_path)
    assert "failed" not in outcomes.values()
    assert all(n == 1 for n in ours(server, plan.run_id).values())


async def test_faults_end_with_every_machine_final_none_failed_and_none_offboarded_twice(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    faults = Faults(
        error_rate=0.15,
        abort_before_rate=0.08,
        abort_after_rate=0.08,
        latency_s=0.001,
        jitter_s=0.004,
        burst_every_s=2.0,
        burst_length_s=0.3,
    )
    server = await start_emulator(fleet(150, faults=faults, token_lifetime_s=1.5))
    server.emulator.force_429(5, retry_after_s=1)
    ids = list(server.emulator.machines)
    ids_path = write_ids(tmp_path / "ids.txt", ids)
    plan = plan_for(server, tmp_path, ids_path, max_attempts=12)

    summary = await execute(plan, connection_for(server))

    assert summary.exit_code == ExitCode.OK, summary.as_dict()
    outcomes = outcome_by_machine(plan.journal_path)
    assert set(outcomes) == set(ids)
    assert "failed" not in outcomes.values()
    truth = server.emulator.truth
    assert truth.faults_injected["abort_after"] > 0
    assert truth.faults_injected["error"] > 0
    assert sum(truth.throttled.values()) > 0
    assert truth.tokens_issued > 1, "tokens that expire every 1.5 s were never refreshed"
    created = ours(server, plan.run_id)
    assert all(n == 1 for n in created.values()), "a machine was offboarded twice"
    assert {m for m, o in outcomes.items() if o == "offboarded"} == set(created)
    assert sum(truth.posts_after_action.values()) == 0, "a POST was re-sent after an action existed"


async def test_an_in_doubt_machine_is_looked_up_and_not_posted_again(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(fleet(4, fleet=FleetSpec(size=4, os_mix={"Windows11": 1.0})))
    ids = list(server.emulator.machines)
    ids_path = write_ids(tmp_path / "ids.txt", ids)
    plan = plan_for(server, tmp_path, ids_path)
    # A first process sent the POST for ids[0], the action was created, and it died before the
    # result: simulate it with the emulator dropping the connection after creating the action.
    server.emulator.faults.abort_after_rate = 1.0
    first = Plan(**{**_fields(plan), "tuning": {**FAST, "max_attempts": 1}})
    stop_after_first = asyncio.Event()
    task = asyncio.create_task(execute(first, connection_for(server)))
    while server.emulator.truth.faults_injected["abort_after"] == 0:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stop_after_first.set()
    server.emulator.faults.abort_after_rate = 0.0
    before = dict(server.emulator.truth.offboard_posts)
    in_doubt = replay_file(plan.journal_path).in_doubt()
    assert in_doubt, "the interrupted machine should be in doubt"
    had_action = [m for m in in_doubt if server.emulator.truth.actions_created[m]]
    assert had_action, "the dropped response left an action behind"

    summary = await execute(resume_plan(server, plan.journal_path), connection_for(server))

    assert summary.exit_code == ExitCode.OK
    for machine_id in had_action:
        assert server.emulator.truth.offboard_posts[machine_id] == before[machine_id]
    assert summary.reconciled >= 1
    assert all(n == 1 for n in ours(server, plan.run_id).values())
    assert set(outcome_by_machine(plan.journal_path).values()) == {"offboarded"}


async def test_resume_after_a_stop_finishes_without_offboarding_twice(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(fleet(300, fleet=FleetSpec(size=300, os_mix={"Windows10": 1.0})))
    ids = list(server.emulator.machines)
    ids_path = write_ids(tmp_path / "ids.txt", ids)
    plan = plan_for(server, tmp_path, ids_path)
    task = asyncio.create_task(execute(plan, connection_for(server)))
    while sum(server.emulator.truth.actions_created.values()) < 120:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    done_before = len(outcome_by_machine(plan.journal_path))
    assert 0 < done_before < 300

    summary = await execute(resume_plan(server, plan.journal_path), connection_for(server))

    assert summary.exit_code == ExitCode.OK
    assert len(outcome_by_machine(plan.journal_path)) == 300
    created = ours(server, plan.run_id)
    assert len(created) == 300
    assert all(n == 1 for n in created.values())
    truth = server.emulator.truth
    assert truth.max_in_window["offboard 0.6"] <= 100
    assert truth.max_in_window["offboard 36"] <= 1500


async def test_a_resumed_run_counts_the_dead_processs_calls_in_the_hourly_window(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    # 1,500 per "hour" (36 s scaled): the first run makes 1,450 calls, the resumed run may only
    # make 50 more until the first calls leave the window, without the emulator refusing any.
    limits = (Limit(1000, 60 * SCALE), Limit(1500, 3600 * SCALE))
    config = fleet(1600, fleet=FleetSpec(size=1600, os_mix={"Windows10": 1.0}))
    config = EmulatorConfig(
        **{
            **_config_fields(config),
            "limits": {**config.limits, "offboard": ((1000, 60.0), (1500, 3600.0))},
        }
    )
    server = await start_emulator(config)
    ids = list(server.emulator.machines)
    first_ids = write_ids(tmp_path / "first.txt", ids[:1450])
    plan = plan_for(server, tmp_path, first_ids, workers=16)
    plan = Plan(
        **{
            **_fields(plan),
            "limits": limits,
            "header": {**(plan.header or {}), "limits": [[1000, 0.6], [1500, 36.0]]},
        }
    )
    summary = await execute(plan, connection_for(server))
    assert summary.exit_code == ExitCode.OK
    # Now pretend the list was longer: a new journal that replays the first one's attempts.
    second = tmp_path / "second.jsonl"
    second.write_bytes(plan.journal_path.read_bytes())
    ids_all = write_ids(tmp_path / "first.txt.new", ids[:1500])
    header_patch = second.read_text().splitlines()
    import orjson

    header = orjson.loads(header_patch[0])
    header["source"]["path"] = str(ids_all)
    header["source"].pop("sha256")
    header_patch[0] = orjson.dumps(header).decode()
    second.write_text("\n".join(header_patch) + "\n")
    throttled_before = server.emulator.truth.throttled["offboard"]
    resumed = await execute(resume_plan(server, second), connection_for(server))
    assert resumed.exit_code == ExitCode.OK
    assert server.emulator.truth.throttled["offboard"] == throttled_before == 0
    assert server.emulator.truth.max_in_window["offboard 36"] <= 1500


def _config_fields(config: EmulatorConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in EmulatorConfig.__dataclass_fields__}


def test_summary_counts_are_reported_as_json_ready() -> None:
    summary = Summary()
    summary.counts["offboarded"] += 2
    data = summary.as_dict()
    assert data["total"] == 2
    assert data["exit_code"] == 0
    random.seed(0)
