"""Verify against the emulator's action lifecycle: statuses, call counts, fallbacks, limits.

Online devices go Pending -> InProgress -> Succeeded; offline ones stay Pending, then TimeOut
(``action_timeout_s``). The emulator's rate windows are scaled x0.01 (an hour plays in 36 s) and
so are the throttles here; ``looptime`` tests fast-forward the loop clock instead. Call counts
are the emulator's ground truth (``truth.calls["machineactions"]``), not verify's own count.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import math
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bulkoffboard import reports as report
from bulkoffboard.client import MdeClient
from bulkoffboard.emulator import AppRegistration, EmulatorConfig, EmulatorServer, FleetSpec
from bulkoffboard.emulator.app import DEFAULT_LIMITS as EMULATOR_LIMITS
from bulkoffboard.errors import BadRequestError
from bulkoffboard.jobs import execute, new_plan
from bulkoffboard.journal import FORMAT_VERSION, TOOL, Journal, iso, replay_file, utc_now
from bulkoffboard.models import FINAL_ACTION_STATUSES, MachineAction
from bulkoffboard.runner import ExitCode
from bulkoffboard.throttle import Limit, Throttle
from bulkoffboard.verify import (
    MISSING_ROUNDS,
    Target,
    VerifySettings,
    VerifySummary,
    plan_targets,
    verify,
)
from tests.conftest import StartEmulator, connection_for

SCALE = 0.01
LIMITS = (Limit(100, 60 * SCALE), Limit(1500, 3600 * SCALE))
HALF_ONLINE = {"Active": 0.5, "Inactive": 0.5}
#: Quick polling and retries for the time-scaled emulator.
FAST = VerifySettings(poll_base_s=0.2, poll_cap_s=0.5, backoff_base_s=0.01, backoff_cap_s=0.05)


def fast(**changes: Any) -> VerifySettings:
    """:data:`FAST` with ``changes``."""
    return dataclasses.replace(FAST, **changes)


def emulator_config(size: int, *, timeout_s: float = 3600.0, **kwargs: Any) -> EmulatorConfig:
    """Windows only (every offboard is accepted), half online; a quick online lifecycle;
    offboard limits raised so tests can make thousands of actions fast."""
    kwargs.setdefault(
        "fleet",
        FleetSpec(size=size, seed=11, os_mix={"Windows10": 1.0}, health_mix=HALF_ONLINE),
    )
    kwargs.setdefault(
        "limits", {**EMULATOR_LIMITS, "offboard": ((100_000, 60.0), (100_000, 3600.0))}
    )
    return EmulatorConfig(
        time_scale=SCALE,
        action_start_s=0.05,
        action_complete_s=0.1,
        action_timeout_s=timeout_s,
        **kwargs,
    )


class EmulatorTokens:
    """Tokens straight from the emulator (no msal thread: fine under looptime)."""

    def __init__(self, server: EmulatorServer, app: AppRegistration | None = None) -> None:
        self._server = server
        self._app = app or server.emulator.config.apps[0]

    def close(self) -> None:
        """Nothing to release."""

    async def token(self) -> str:
        emulator = self._server.emulator
        return emulator.issue_token(self._app, emulator.config.audience)[0]

    async def refresh(self, stale: str) -> str:
        return await self.token()


def client_for(
    server: EmulatorServer,
    session: aiohttp.ClientSession,
    app: AppRegistration | None = None,
    cls: type[MdeClient] = MdeClient,
) -> MdeClient:
    return cls(
        session,
        server.base_url,
        EmulatorTokens(server, app),
        ssl_context=server.client_ssl_context(),
    )


def header() -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "tool": TOOL,
        "run_id": "verify-test",
        "source": {"kind": "file", "path": "ids.txt", "format": "text"},
        "limits": [[100, 60.0], [1500, 3600.0]],
    }


async def offboarded_journal(
    path: Path, client: MdeClient, machine_ids: Iterable[str], *, at: str | None = None
) -> dict[str, str]:
    """Offboard ``machine_ids`` through the real client (no throttle: the emulator's offboard
    limits are raised) and journal them as a run would. Returns machine id -> action id."""
    gate = asyncio.Semaphore(32)

    async def one(machine_id: str) -> MachineAction:
        async with gate:
            return await client.offboard(machine_id, "verify test [bulkoffboard run verify-test]")

    ids = list(machine_ids)
    actions = await asyncio.gather(*(one(m) for m in ids))
    journal = Journal.create(path, header())
    try:
        for machine_id, action in zip(ids, actions, strict=True):
            when = at or iso(utc_now())
            journal.append({"type": "attempt", "machine_id": machine_id, "attempt": 1, "at": when})
            journal.append(result(machine_id, action.id, action.status, at=when))
    finally:
        journal.close()
    return {m: a.id for m, a in zip(ids, actions, strict=True)}


def result(
    machine_id: str,
    action_id: str | None,
    status: str | None,
    *,
    outcome: str = "offboarded",
    at: str | None = None,
) -> dict[str, Any]:
    return {
        "type": "result",
        "machine_id": machine_id,
        "outcome": outcome,
        "action_id": action_id,
        "action_status": status,
        "http_status": None,
        "error_code": None,
        "message": None,
        "attempts": 1,
        "at": at or iso(utc_now()),
    }


async def run_verify(
    path: Path, client: MdeClient, settings: VerifySettings | None = None, **kwargs: Any
) -> VerifySummary:
    """One verify over the journal at ``path``, opened and closed as the CLI would."""
    journal, replay = Journal.resume(path)
    try:
        return await verify(
            journal, replay, client, Throttle(LIMITS, name="reads"), settings, **kwargs
        )
    finally:
        journal.close()


def status_records(path: Path) -> list[dict[str, Any]]:
    return [
        record
        for line in path.read_bytes().splitlines()
        if (record := orjson.loads(line)).get("type") == "status"
    ]


def truth_status(server: EmulatorServer, action_id: str) -> str:
    emulator = server.emulator
    return emulator.action_status(emulator.actions[action_id])


def reads(server: EmulatorServer) -> int:
    return server.emulator.truth.calls["machineactions"]


async def settle(seconds: float = 0.3) -> None:
    """Let online actions finish their (0.15 s) lifecycle."""
    await asyncio.sleep(seconds)


# -- end to end: a real run, then verify ---------------------------------------------------------


async def test_after_a_real_run_verify_records_online_succeeded_and_offline_pending(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(
        emulator_config(
            60,
            fleet=FleetSpec(
                size=60, seed=5, health_mix=HALF_ONLINE, pending_fraction=0.1
            ),  # Linux/macOS too, and some already pending from the portal
        )
    )
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(server.emulator.machines) + "\n")
    plan = new_plan(
        journal_path=tmp_path / "run.jsonl",
        source={"kind": "file", "path": str(ids), "format": "text"},
        comment="verify e2e",
        workers=8,
        limits=LIMITS,
        conn=connection_for(server),
    )
    run = await execute(plan, connection_for(server))
    assert run.exit_code == ExitCode.OK
    await settle()

    summary = await run_verify(plan.journal_path, client_for(server, http_session))

    assert summary.exit_code == ExitCode.OK, summary.reason
    replay = replay_file(plan.journal_path)
    followed = {
        m: s.result
        for m, s in replay.machines.items()
        if s.result and s.result["outcome"] in ("offboarded", "already_pending")
    }
    assert {r["outcome"] for r in followed.values()} == {"offboarded", "already_pending"}
    for machine_id, res in followed.items():
        seen = replay.latest_action(machine_id)
        assert seen is not None and seen.verified
        assert seen.action_id == res["action_id"]
        assert seen.action_status == truth_status(server, res["action_id"])
    assert summary.statuses["Succeeded"] > 0 and summary.statuses["Pending"] > 0
    assert sum(summary.statuses.values()) == len(followed)
    assert len(status_records(plan.journal_path)) == summary.recorded == len(followed)
    assert summary.calls == 1 and summary.throttled == 0


async def test_after_verify_every_report_format_shows_what_verify_saw(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    """Issue 12: run, let the online devices finish, verify, report: the CSV (and JSONL and
    JSON) show the status verify saw, not the Pending the results recorded."""
    server = await start_emulator(emulator_config(60))
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(server.emulator.machines) + "\n")
    plan = new_plan(
        journal_path=tmp_path / "run.jsonl",
        source={"kind": "file", "path": str(ids), "format": "text"},
        comment="report after verify",
        workers=8,
        limits=LIMITS,
        conn=connection_for(server),
    )
    assert (await execute(plan, connection_for(server))).exit_code == ExitCode.OK
    await settle()
    summary = await run_verify(plan.journal_path, client_for(server, http_session))
    assert summary.statuses["Succeeded"] > 0 and summary.statuses["Pending"] > 0

    truth = {a.machine_id: truth_status(server, a.id) for a in server.emulator.actions.values()}
    csv_rows = list(csv.DictReader(io.StringIO(report.render_file(plan.journal_path, "csv"))))
    out = io.StringIO()
    report.write_file(plan.journal_path, "jsonl", out)
    jsonl_rows = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert len(csv_rows) == len(jsonl_rows) == 60
    for rows in (csv_rows, jsonl_rows):
        assert {r["machine_id"]: r["action_status"] for r in rows} == truth
    seen = {s.at for s in replay_file(plan.journal_path).statuses.values()}
    assert {r["action_status_at"] for r in csv_rows} == seen
    data = orjson.loads(report.render_file(plan.journal_path, "json"))
    assert data["action_statuses"] == dict(summary.statuses)


# -- the lifecycle, polled to the end ------------------------------------------------------------


async def test_until_final_polls_until_offline_actions_time_out(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(emulator_config(40, timeout_s=1.0))
    client = client_for(server, http_session)
    path = tmp_path / "j.jsonl"
    actions = await offboarded_journal(path, client, server.emulator.machines)
    online = {
        m for m, machine in server.emulator.machines.items() if machine["healthStatus"] == "Active"
    }
    assert 0 < len(online) < 40

    summary = await run_verify(path, client, fast(until_final=True, deadline_s=30))

    assert summary.exit_code == ExitCode.OK, summary.reason
    assert summary.statuses == {"Succeeded": len(online), "TimeOut": 40 - len(online)}
    replay = replay_file(path)
    for machine_id, action_id in actions.items():
        seen = replay.latest_action(machine_id)
        assert seen is not None
        assert seen.action_status == ("Succeeded" if machine_id in online else "TimeOut")
        assert seen.action_status == truth_status(server, action_id)
    # The offline ones were seen Pending first, then TimeOut: one record per change only.
    records = status_records(path)
    per_action: dict[str, list[str]] = {}
    for record in records:
        per_action.setdefault(record["action_id"], []).append(record["action_status"])
    for action_id in actions.values():
        trail = per_action[action_id]
        assert trail[-1] in FINAL_ACTION_STATUSES
        assert len(trail) == len(set(trail)), f"a status was recorded twice: {trail}"
    assert summary.rounds >= 2
    assert summary.calls == reads(server) <= 2 * summary.rounds


async def test_until_final_gives_up_at_the_deadline_with_exit_1(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(emulator_config(10, timeout_s=3600.0))
    client = client_for(server, http_session)
    path = tmp_path / "j.jsonl"
    await offboarded_journal(path, client, server.emulator.machines)

    loop = asyncio.get_running_loop()
    started = loop.time()
    summary = await run_verify(path, client, fast(until_final=True, deadline_s=0.8))

    assert loop.time() - started < 3
    assert summary.exit_code == ExitCode.SOME_FAILED
    assert "deadline passed" in summary.reason
    assert summary.open == summary.statuses["Pending"] > 0


# -- many actions per call -----------------------------------------------------------------------


async def test_a_large_journal_takes_a_handful_of_calls_and_a_second_verify_only_the_open_ones(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(emulator_config(2000))
    client = client_for(server, http_session)
    path = tmp_path / "big.jsonl"
    await offboarded_journal(path, client, server.emulator.machines)
    await settle()
    before = reads(server)

    first = await run_verify(path, client)

    first_calls = reads(server) - before
    assert first.exit_code == ExitCode.OK, first.reason
    assert first.checked == 2000
    assert first_calls == first.calls == 1, "2,000 actions fit one page of the window scan"
    open_after_first = first.open
    assert 0 < open_after_first < 2000  # the offline half stays Pending
    assert first.statuses["Succeeded"] == 2000 - open_after_first
    lines_before = len(path.read_bytes().splitlines())

    second = await run_verify(path, client)

    assert second.checked == open_after_first, "final actions must not be looked up again"
    assert reads(server) - before - first_calls == second.calls == 1
    assert len(path.read_bytes().splitlines()) == lines_before + open_after_first
    assert second.statuses == first.statuses

    # The documented-only status scan finds the same open actions: one Pending page.
    third = await run_verify(path, client, VerifySettings(strategies=("open", "single")))
    assert third.calls == 1
    assert third.statuses == first.statuses


async def test_id_batches_take_one_call_per_25_actions_and_agree_with_the_window_scan(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(emulator_config(240))
    client = client_for(server, http_session)
    path = tmp_path / "j.jsonl"
    await offboarded_journal(path, client, server.emulator.machines)
    await settle()

    by_ids = await run_verify(path, client, VerifySettings(strategies=("ids",)))

    assert by_ids.checked == 240
    assert by_ids.calls == math.ceil(240 / 25)
    open_ = by_ids.open
    again = await run_verify(path, client, VerifySettings(strategies=("ids",), ids_per_call=40))
    assert again.calls == math.ceil(open_ / 40)
    by_window = await run_verify(path, client)
    assert by_window.calls == 1
    assert by_ids.statuses == again.statuses == by_window.statuses


async def test_the_window_scan_pages_with_top_and_skip(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(emulator_config(120))
    client = client_for(server, http_session)
    path = tmp_path / "j.jsonl"
    await offboarded_journal(path, client, server.emulator.machines)

    summary = await run_verify(path, client, VerifySettings(page_size=50))

    assert summary.checked == 120
    assert summary.calls == 3  # 50 + 50 + 20 (a short page ends the scan)


async def test_a_refused_filter_drops_that_strategy_and_the_next_one_answers(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    class StrictClient(MdeClient):
        """A server that takes only documented syntax: no datetime comparison, no ``or``."""

        async def list_machine_actions(
            self, filter_: str | None = None, *, top: int | None = None, skip: int | None = None
        ) -> list[MachineAction]:
            if filter_ and ("creationDateTimeUtc" in filter_ or " or " in filter_):
                raise BadRequestError("list machine actions: HTTP 400 ODataError", status=400)
            return await super().list_machine_actions(filter_, top=top, skip=skip)

    server = await start_emulator(emulator_config(30))
    client = client_for(server, http_session, cls=StrictClient)
    path = tmp_path / "j.jsonl"
    actions = await offboarded_journal(path, client, server.emulator.machines)
    await settle()

    summary = await run_verify(path, client)

    assert summary.exit_code == ExitCode.OK, summary.reason
    assert summary.dropped_strategies == ["window", "ids"]
    assert summary.checked == 30
    replay = replay_file(path)
    for machine_id, action_id in actions.items():
        seen = replay.latest_action(machine_id)
        assert seen is not None and seen.action_status == truth_status(server, action_id)
    succeeded = summary.statuses["Succeeded"]
    # 2 refused + Pending scan + InProgress scan + one GET per action that left the open set.
    assert summary.calls == 2 + 2 + succeeded


# -- limits and errors ---------------------------------------------------------------------------


@pytest.mark.looptime
async def test_a_429_pauses_the_read_throttle_for_its_retry_after(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(emulator_config(20))
    client = client_for(server, http_session)
    path = tmp_path / "j.jsonl"
    await offboarded_journal(path, client, server.emulator.machines)
    server.emulator.force_429(2, retry_after_s=30)
    loop = asyncio.get_running_loop()
    started = loop.time()

    summary = await run_verify(path, client)

    assert summary.exit_code == ExitCode.OK, summary.reason
    assert summary.throttled == 2 == server.emulator.truth.throttled["machineactions"]
    assert summary.calls == 3
    assert loop.time() - started >= 60, "each 429 must hold the next call for its Retry-After"
    assert summary.checked == 20


async def test_5xx_and_dropped_connections_are_retried_with_backoff(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(emulator_config(50, seed=3))
    client = client_for(server, http_session)
    path = tmp_path / "j.jsonl"
    await offboarded_journal(path, client, server.emulator.machines)
    faults = server.emulator.faults
    faults.error_rate, faults.abort_before_rate = 0.4, 0.2

    summary = await run_verify(
        path, client, fast(strategies=("ids",), ids_per_call=5, max_attempts=20)
    )

    assert summary.exit_code == ExitCode.OK, summary.reason
    assert summary.checked == 50
    injected = server.emulator.truth.faults_injected
    assert injected["error"] + injected["abort_before"] > 0
    # Every 500 cost one more throttled call. A dropped connection did too, unless aiohttp
    # resent the GET itself (it retries an idempotent request once on a reused connection,
    # unseen by the throttle): the emulator counts those arrivals, verify cannot.
    faults_seen = injected["error"] + injected["abort_before"]
    assert 10 + injected["error"] <= summary.calls <= 10 + faults_seen
    assert reads(server) == 10 + faults_seen


async def test_lookups_that_keep_failing_end_with_exit_1_and_nothing_lost(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(emulator_config(10))
    client = client_for(server, http_session)
    path = tmp_path / "j.jsonl"
    await offboarded_journal(path, client, server.emulator.machines)
    server.emulator.faults.error_rate = 1.0

    summary = await run_verify(path, client, fast(max_attempts=3))

    assert summary.exit_code == ExitCode.SOME_FAILED
    assert summary.unresolved == 10
    assert summary.calls == 3
    assert status_records(path) == []
    server.emulator.faults.error_rate = 0.0
    again = await run_verify(path, client)
    assert again.exit_code == ExitCode.OK and again.checked == 10


async def test_reads_forbidden_stop_at_once_with_exit_3(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    offboard_only = AppRegistration(roles=("Machine.Offboard",))
    server = await start_emulator(emulator_config(5, apps=(offboard_only,)))
    client = client_for(server, http_session)
    path = tmp_path / "j.jsonl"
    await offboarded_journal(path, client, server.emulator.machines)

    summary = await run_verify(path, client)

    assert summary.exit_code == ExitCode.AUTH
    assert "Machine.Read.All" in summary.reason
    assert summary.calls == 1


# -- what is (not) looked up ---------------------------------------------------------------------


async def test_max_age_skips_old_actions_without_a_call(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(emulator_config(6))
    client = client_for(server, http_session)
    path = tmp_path / "j.jsonl"
    old = iso(utc_now() - timedelta(days=40))
    await offboarded_journal(path, client, server.emulator.machines, at=old)

    summary = await run_verify(path, client, VerifySettings(max_age_days=30))

    assert summary.skipped == {"too_old": 6}
    assert summary.calls == reads(server) == 0
    assert status_records(path) == []
    assert summary.exit_code == ExitCode.OK
    # Without the age limit they are looked up.
    assert (await run_verify(path, client)).checked == 6


async def test_an_action_the_api_does_not_know_is_counted_missing_and_given_up(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(emulator_config(3, timeout_s=0.5))
    client = client_for(server, http_session)
    path = tmp_path / "j.jsonl"
    await offboarded_journal(path, client, server.emulator.machines)
    journal, _ = Journal.resume(path)
    journal.append(result("d" * 40, "00000000-0000-4000-8000-000000000000", "Pending"))
    journal.close()

    summary = await run_verify(path, client, fast(until_final=True, deadline_s=20))

    assert summary.missing == 1
    assert summary.rounds >= MISSING_ROUNDS
    assert summary.statuses["Pending"] == 1  # the last known status stays in the counts
    assert summary.exit_code == ExitCode.OK, summary.reason


async def test_a_stop_ends_after_the_call_in_flight_and_keeps_what_was_seen(
    start_emulator: StartEmulator, tmp_path: Path, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(emulator_config(8, timeout_s=3600.0))
    client = client_for(server, http_session)
    path = tmp_path / "j.jsonl"
    await offboarded_journal(path, client, server.emulator.machines)
    stop = asyncio.Event()

    summary = await run_verify(
        path,
        client,
        fast(until_final=True),
        stop=stop,
        on_status=lambda record: stop.set(),
    )

    assert summary.exit_code == ExitCode.INTERRUPTED
    assert summary.rounds == 1
    assert len(status_records(path)) == summary.recorded == 8


# -- the plan, a pure function of the replay -----------------------------------------------------


def test_plan_follows_only_open_actions_of_offboarded_and_already_pending_machines(
    tmp_path: Path,
) -> None:
    m = [f"{i:040x}" for i in range(1, 9)]
    now = datetime(2026, 11, 28, 12, tzinfo=UTC)
    recent = iso(now - timedelta(hours=1))
    old = iso(now - timedelta(days=20))
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, header())
    journal.append(result(m[0], "a0", "Pending", at=recent))  # open: followed
    journal.append(result(m[1], "a1", "Pending", at=recent))
    journal.append(
        {"type": "status", "machine_id": m[1], "action_id": "a1", "action_status": "Succeeded"}
    )  # verified final: not looked up again
    journal.append(result(m[2], "a2", "Succeeded", at=recent))  # final at offboard time
    journal.append(result(m[3], "a3", "Pending", outcome="already_pending", at=recent))
    journal.append(result(m[4], None, None, outcome="already_pending", at=recent))
    journal.append(result(m[5], None, None, outcome="failed", at=recent))
    journal.append(result(m[6], "a6", "Pending", at=old))
    journal.append(result(m[7], "a7", "InProgress", at=recent))
    journal.append({"type": "attempt", "machine_id": m[7], "attempt": 2, "at": recent})
    journal.close()
    replay = replay_file(path)

    plan = plan_targets(replay, now=now.timestamp(), max_age_days=10)

    assert [t.machine_id for t in plan.targets] == [m[0], m[3]]
    assert plan.targets[0] == Target(m[0], "a0", "Pending", (now - timedelta(hours=1)).timestamp())
    assert plan.final == {"Succeeded": 2}
    assert plan.skipped == {"no_action_id": 1, "too_old": 1, "in_doubt": 1}
    unlimited = plan_targets(replay, now=now.timestamp())
    assert [t.machine_id for t in unlimited.targets] == [m[0], m[3], m[6]]


def test_replay_keeps_the_latest_status_of_the_results_action_only(tmp_path: Path) -> None:
    a, b, c = "a" * 40, "b" * 40, "c" * 40
    path = tmp_path / "j.jsonl"
    journal = Journal.create(path, header())
    journal.append(result(a, "x1", "Pending"))
    journal.append(
        {
            "type": "status",
            "machine_id": a,
            "action_id": "x1",
            "action_status": "InProgress",
            "at": "2026-11-28T01:00:00.000000Z",
        }
    )
    journal.append(
        {
            "type": "status",
            "machine_id": a,
            "action_id": "x1",
            "action_status": "Succeeded",
            "at": "2026-11-28T02:00:00.000000Z",
        }
    )
    journal.append(result(b, "y2", "Pending"))
    journal.append(  # names another action than the result: stale, ignored
        {"type": "status", "machine_id": b, "action_id": "y1", "action_status": "TimeOut", "at": ""}
    )
    journal.append({"type": "status", "machine_id": c})  # incomplete: skipped, no error
    journal.append({"type": "status", "action_status": "Pending"})
    journal.close()

    replay = replay_file(path)

    seen_a = replay.latest_action(a)
    assert seen_a is not None
    assert (seen_a.action_status, seen_a.at, seen_a.verified) == (
        "Succeeded",
        "2026-11-28T02:00:00.000000Z",
        True,
    )
    seen_b = replay.latest_action(b)
    assert seen_b is not None and (seen_b.action_id, seen_b.action_status) == ("y2", "Pending")
    assert not seen_b.verified
    assert replay.latest_action(c) is None
    # Status records change nothing else: no machine appears, none is in doubt.
    assert set(replay.machines) == {a, b}
    assert replay.in_doubt() == []
    assert [r["machine_id"] for r in replay.results()] == [a, b]


def test_settings_refuse_impossible_values() -> None:
    with pytest.raises(ValueError, match="page_size"):
        VerifySettings(page_size=10_001)
    with pytest.raises(ValueError, match="strategies"):
        VerifySettings(strategies=("everything",))
    with pytest.raises(ValueError, match="max_age_days"):
        VerifySettings(max_age_days=0)
