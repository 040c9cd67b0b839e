"""Targeting and safety against the emulator: queries, names, hunting, preflight, exclusions,
the dry run and the breaker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from bulkoffboard import targeting
from bulkoffboard.cli import confirm_on_terminal
from bulkoffboard.emulator import EmulatorConfig, EmulatorServer, FleetSpec
from bulkoffboard.errors import UsageError
from bulkoffboard.jobs import Plan, Targets, execute, new_plan, plan_resume
from bulkoffboard.journal import replay_file
from bulkoffboard.runner import ExitCode
from bulkoffboard.throttle import Limit, Throttle
from tests.conftest import StartEmulator, connection_for, env_for
from tests.test_cli import cli

SCALE = 0.01
LIMITS = (Limit(100, 0.6), Limit(1500, 36.0))
FAST = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05}


def config(size: int = 60, **kwargs: Any) -> EmulatorConfig:
    kwargs.setdefault("fleet", FleetSpec(size=size, seed=21))
    return EmulatorConfig(time_scale=SCALE, **kwargs)


def plan_for(server: EmulatorServer, tmp_path: Path, request: targeting.Request) -> Plan:
    journal = tmp_path / "j.jsonl"
    path = request.path or journal.with_name(journal.name + ".targets")
    base = new_plan(
        journal_path=journal,
        source={"kind": request.kind, "path": str(path), "format": request.fmt},
        comment="targeting test",
        workers=8,
        limits=LIMITS,
        conn=connection_for(server),
    )
    fields = {name: getattr(base, name) for name in Plan.__dataclass_fields__}
    return Plan(**{**fields, "tuning": FAST})


async def run(
    server: EmulatorServer, tmp_path: Path, request: targeting.Request, **targets: Any
) -> tuple[Plan, dict[str, dict[str, Any]]]:
    plan = plan_for(server, tmp_path, request)
    summary = await execute(plan, connection_for(server), Targets(request=request, **targets))
    assert summary.exit_code in (ExitCode.OK, ExitCode.SOME_FAILED), summary.as_dict()
    if targets.get("dry_run"):
        return plan, {}
    results = {
        str(r.get("machine_id") or r.get("input")): r
        for r in replay_file(plan.journal_path).results()
    }
    return plan, results


def ids_file(tmp_path: Path, ids: list[str]) -> targeting.Request:
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(ids) + "\n")
    return targeting.Request("file", path, "text")


def test_presets_build_one_filter_combined_with_the_query() -> None:
    now = datetime(2026, 11, 28, tzinfo=UTC)
    text = targeting.build_filter(
        query="startswith(computerDnsName,'lab')",
        inactive_days=30,
        health=["Inactive", "NoSensorData"],
        os_platforms=["Windows10"],
        tags=["Decommission"],
        group_ids=[141],
        now=now,
    )
    assert text == (
        "(startswith(computerDnsName,'lab')) and lastSeen lt 2026-10-29T00:00:00Z and "
        "(healthStatus eq 'Inactive' or healthStatus eq 'NoSensorData') and "
        "osPlatform eq 'Windows10' and machineTags/any(tag: tag eq 'Decommission') and "
        "rbacGroupId eq 141"
    )
    assert (
        targeting.build_filter(tags=["O'Brien's"]) == "machineTags/any(tag: tag eq 'O''Brien''s')"
    )
    assert targeting.build_filter() is None


async def test_a_query_over_20000_devices_pages_past_10000_and_resume_does_not_rerun_it(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(
        config(fleet=FleetSpec(size=20_500, seed=3, os_mix={"Windows10": 1.0}))
    )
    emulator = server.emulator
    cutoff = datetime.now(UTC) - timedelta(days=1)
    expected = {
        m["id"]
        for m in emulator.machines.values()
        if datetime.fromisoformat(m["lastSeen"]) < cutoff
    }
    assert len(expected) > 10_000
    odata = targeting.build_filter(inactive_days=1)
    request = targeting.Request("query", odata=odata, describe={"filter": odata})
    plan, _ = await run(server, tmp_path, request, dry_run=True)
    machine_calls = emulator.truth.calls["machines"]
    assert machine_calls == 2  # 10,000 + a short page
    assert sum(emulator.truth.offboard_posts.values()) == 0, "a dry run sent an offboard call"
    # The resolved list is what would be offboarded: the same set the emulator's filter gives.
    machines = await targeting.read_machines(_client(server), Throttle(LIMITS), odata)
    assert {m["id"] for m in machines} == expected


def _client(server: EmulatorServer) -> Any:
    import aiohttp

    from tests.conftest import client_for

    class Lazy:
        async def list_machines(self, f: str | None, *, top: int, skip: int) -> Any:
            async with aiohttp.ClientSession() as session:
                return await client_for(server, session).list_machines(f, top=top, skip=skip)

    return Lazy()


async def test_a_query_run_offboards_what_it_resolved_and_resume_reads_the_kept_list(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(config(300, fleet=FleetSpec(size=300, seed=9)))
    odata = "healthStatus eq 'Inactive'"
    request = targeting.Request("query", odata=odata, describe={"filter": odata})
    plan, results = await run(server, tmp_path, request)
    inactive = {
        m["id"] for m in server.emulator.machines.values() if m["healthStatus"] == "Inactive"
    }
    assert set(results) == inactive
    header = replay_file(plan.journal_path).header
    assert header["source"]["kind"] == "query"
    assert header["source"]["filter"] == odata
    assert Path(header["source"]["path"]).read_text().split() == [
        m for m in server.emulator.machines if m in inactive
    ]
    calls_before = server.emulator.truth.calls["machines"]
    resumed = plan_resume(plan.journal_path, None, None, {})
    summary = await execute(
        Plan(**{**{n: getattr(resumed, n) for n in Plan.__dataclass_fields__}, "tuning": FAST}),
        connection_for(server),
    )
    assert summary.exit_code == ExitCode.OK
    assert server.emulator.truth.calls["machines"] == calls_before, "resume re-ran the query"


class StuckPager:
    """A server that ignores $skip: every page is the same full page."""

    def __init__(self) -> None:
        self.calls = 0

    async def list_machines(self, f: str | None, *, top: int, skip: int) -> list[dict[str, Any]]:
        self.calls += 1
        return [{"id": f"{i:040x}"} for i in range(top)]


async def test_paging_stops_when_a_page_brings_nothing_new() -> None:
    pager = StuckPager()
    machines = await targeting.read_machines(pager, Throttle([Limit(1000, 1)]), None)  # type: ignore[arg-type]
    assert len(machines) == 10_000
    assert pager.calls == 2


class EndlessPager:
    def __init__(self) -> None:
        self.calls = 0

    async def list_machines(self, f: str | None, *, top: int, skip: int) -> list[dict[str, Any]]:
        self.calls += 1
        return [{"id": f"{skip + i:040x}"} for i in range(top)]


async def test_paging_is_capped() -> None:
    pager = EndlessPager()
    with pytest.raises(UsageError, match="did not end after 3 pages"):
        await targeting.read_machines(pager, Throttle([Limit(1000, 1)]), None, max_pages=3)  # type: ignore[arg-type]
    assert pager.calls == 3


async def test_exactly_one_full_page_and_an_empty_fleet_end_cleanly(
    start_emulator: StartEmulator,
) -> None:
    empty = await start_emulator(config(0, fleet=FleetSpec(size=0)))
    assert await targeting.read_machines(_client(empty), Throttle(LIMITS), None) == []
    full = await start_emulator(config(fleet=FleetSpec(size=10_000, seed=2)))
    machines = await targeting.read_machines(_client(full), Throttle(LIMITS), None)
    assert len(machines) == 10_000
    assert full.emulator.truth.calls["machines"] == 2
    # Only the fields the plan reads are kept: a whole entity is about 2.7 KB a device.
    first = machines[0]
    assert set(first) <= set(targeting.INVENTORY_FIELDS)
    assert first == {k: v for k, v in full.emulator.machines[first["id"]].items() if k in first}, (
        "kept fields are kept whole"
    )
    assert {"id", "computerDnsName", "osPlatform", "machineTags"} <= set(first)


async def test_names_resolve_by_short_name_or_fqdn_and_report_missing_and_ambiguous_ones(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(
        config(20, fleet=FleetSpec(size=20, seed=4, os_mix={"Windows11": 1.0}))
    )
    emulator = server.emulator
    machines = list(emulator.machines.values())
    twin = {**machines[0], "id": "ab" * 20, "computerDnsName": "host-00000.other.example"}
    emulator.add_machine(twin)
    names = tmp_path / "names.txt"
    names.write_text(
        "# hosts from the CMDB\n"
        f"{machines[1]['computerDnsName'].split('.')[0].upper()}\n"
        f"{machines[2]['computerDnsName']}\n"
        "host-00000\n"
        "no-such-host\n"
    )
    request = targeting.Request("names", names)
    plan, results = await run(server, tmp_path, request)
    assert results[machines[1]["id"]]["outcome"] == "offboarded"
    assert results[machines[2]["id"]]["outcome"] == "offboarded"
    assert results["host-00000"]["outcome"] == "unresolved"
    assert "2 devices are named" in results["host-00000"]["message"]
    assert results["no-such-host"]["outcome"] == "unresolved"
    assert results["no-such-host"]["where"].endswith("names.txt:5")
    assert machines[0]["id"] not in emulator.truth.offboard_posts
    assert emulator.truth.calls["machines"] == 1, "names are resolved with one inventory read"


async def test_a_hunting_query_supplies_device_ids(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(config(40))
    query = 'DeviceInfo | where OSPlatform startswith "Windows" | project DeviceId'
    request = targeting.Request("hunting", hunting=query, describe={"hunting": query})
    _, results = await run(server, tmp_path, request)
    recent = {
        m["id"]
        for m in server.emulator.machines.values()
        if m["osPlatform"].startswith("Windows")
        and datetime.now(UTC) - datetime.fromisoformat(m["lastSeen"]) <= timedelta(days=30)
    }
    assert set(results) == recent
    assert server.emulator.truth.calls["advancedqueries"] == 1


async def test_the_preflight_skips_unsupported_pending_and_offboarded_devices_without_a_call(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(
        config(80, fleet=FleetSpec(size=80, seed=6, pending_fraction=0.15))
    )
    emulator = server.emulator
    ids = list(emulator.machines)
    # One machine was offboarded earlier and has not been seen since.
    gone = next(
        m
        for m in ids
        if emulator.machines[m]["osPlatform"].startswith("Windows")
        and emulator.pending_offboard(m) is None
    )
    emulator.machines[gone]["lastSeen"] = "2020-01-01T00:00:00.000000Z"
    action = emulator._create_action(
        emulator.machines[gone], requestor="x", comment="earlier", online=True
    )
    action.created -= 10**6  # long ago: Succeeded
    emulator.truth.actions_created[gone] -= 1
    _, results = await run(server, tmp_path, ids_file(tmp_path, ids))
    for machine_id in ids:
        platform = emulator.machines[machine_id]["osPlatform"]
        outcome = results[machine_id]["outcome"]
        if not platform.startswith("Windows"):
            assert outcome == "unsupported"
            assert results[machine_id]["attempts"] == 0
        elif machine_id == gone:
            assert outcome == "excluded"
            assert "already offboarded" in results[machine_id]["message"]
        elif outcome == "already_pending":
            assert results[machine_id]["action_id"] in emulator.actions
            assert results[machine_id]["attempts"] == 0
    skipped = [m for m in ids if results[m]["attempts"] == 0]
    assert skipped
    assert not any(emulator.truth.offboard_posts.get(m) for m in skipped)


@pytest.mark.parametrize("rule", ["tag", "group-name", "group-id", "id", "name"])
async def test_each_exclusion_rule_journals_excluded_with_the_rule_and_sends_nothing(
    start_emulator: StartEmulator, tmp_path: Path, rule: str
) -> None:
    server = await start_emulator(
        config(40, fleet=FleetSpec(size=40, seed=8, os_mix={"Windows10": 1.0}))
    )
    emulator = server.emulator
    machines = list(emulator.machines.values())
    target = next(m for m in machines if "VIP" in m["machineTags"])
    rules = {
        "tag": targeting.Rules(tags=("vip",)),
        "group-name": targeting.Rules(groups=(target["rbacGroupName"],)),
        "group-id": targeting.Rules(groups=(str(target["rbacGroupId"]),)),
        "id": targeting.Rules(ids=frozenset({target["id"]})),
        "name": targeting.Rules(names=(target["computerDnsName"].split(".")[0][:-1] + "?",)),
    }[rule]
    _, results = await run(
        server, tmp_path, ids_file(tmp_path, [m["id"] for m in machines]), rules=rules
    )
    excluded = {m for m, r in results.items() if r["outcome"] == "excluded"}
    assert target["id"] in excluded
    for machine_id in excluded:
        assert results[machine_id]["rule"]
        assert emulator.truth.offboard_posts.get(machine_id, 0) == 0
    offboarded = {m for m, r in results.items() if r["outcome"] == "offboarded"}
    assert offboarded and not offboarded & excluded


async def test_the_dry_run_sends_no_offboard_call_and_lists_the_plan(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(config(30))
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(server.emulator.machines) + "\nnot-an-id\n")
    env = env_for(server)
    code, out, err = await cli(
        "run",
        "--ids",
        str(ids),
        "--dry-run",
        "--format",
        "json",
        "--exclude-tag",
        "VIP",
        "--limit",
        "100/0.6",
        "--limit",
        "1500/36",
        env=env,
    )
    assert code == 0, err
    plan = orjson.loads(out)
    assert plan["would_offboard"] + sum(plan["skipped"].values()) == 30
    assert plan["invalid_id"] == 1
    assert (
        len([row for row in plan["machines"] if row["action"] == "offboard"])
        == plan["would_offboard"]
    )
    assert sum(server.emulator.truth.offboard_posts.values()) == 0
    assert not list(tmp_path.glob("*.jsonl")), "a dry run wrote a journal"
    code, out, _ = await cli("run", "--ids", str(ids), "--dry-run", env=env)
    assert code == 0
    assert "would offboard" in out


async def test_the_breaker_refuses_a_run_over_max_machines_unless_yes(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(
        config(30, fleet=FleetSpec(size=30, seed=1, os_mix={"Windows10": 1.0}))
    )
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(server.emulator.machines) + "\n")
    env = env_for(server)
    journal = tmp_path / "j.jsonl"
    args = [
        "run",
        "--ids",
        str(ids),
        "--journal",
        str(journal),
        "--max-machines",
        "10",
        "--limit",
        "100/0.6",
        "--limit",
        "1500/36",
    ]
    code, _, err = await cli(*args, env=env)
    assert code == 2
    assert "would offboard 30 machines, over the limit of 10" in err
    assert sum(server.emulator.truth.offboard_posts.values()) == 0
    assert not journal.exists()
    code, _, err = await cli(*args, "--yes", env=env)
    assert code == 0, err
    assert sum(server.emulator.truth.offboard_posts.values()) == 30


@pytest.mark.parametrize("answer", ["y", " YES\n", "n", "", "yess", EOFError])
async def test_on_a_terminal_the_breaker_shows_the_plan_and_asks(
    start_emulator: StartEmulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answer: str | type[EOFError],
) -> None:
    server = await start_emulator(
        config(30, fleet=FleetSpec(size=30, seed=1, os_mix={"Windows10": 1.0}))
    )
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(server.emulator.machines) + "\n")
    asked: list[str] = []

    def reply(prompt: str) -> str:
        asked.append(prompt)
        if not isinstance(answer, str):
            raise answer
        return answer

    monkeypatch.setattr("builtins.input", reply)
    request = targeting.Request("file", ids)
    plan = plan_for(server, tmp_path, request)
    targets = Targets(request=request, max_machines=10, confirm=confirm_on_terminal)
    posts = server.emulator.truth.offboard_posts
    if answer in ("y", " YES\n"):
        summary = await execute(plan, connection_for(server), targets)
        assert summary.exit_code == ExitCode.OK
        assert sum(posts.values()) == 30
    else:
        with pytest.raises(UsageError, match="not confirmed: nothing was sent"):
            await execute(plan, connection_for(server), targets)
        assert sum(posts.values()) == 0
        assert not plan.journal_path.exists()
    assert asked == [
        "would offboard 30 machines, over the limit of 10 (--max-machines). "
        "Offboard 30 machines? [y/N] "
    ]
    assert "would offboard" in capsys.readouterr().out, "the plan is shown before the question"


async def test_a_plan_cut_short_by_a_crash_is_made_again_on_resume(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(
        config(30, fleet=FleetSpec(size=30, seed=8, os_mix={"Windows10": 1.0}))
    )
    emulator = server.emulator
    target = next(m for m in emulator.machines.values() if m["machineTags"])
    request = ids_file(tmp_path, list(emulator.machines))
    rules = targeting.Rules(tags=(target["machineTags"][0],))
    plan = plan_for(server, tmp_path, request)
    assert plan.header is not None
    header = {**plan.header, "exclusions": rules.as_json()}
    # The first process wrote its header and died before its plan record.
    plan.journal_path.write_bytes(orjson.dumps({"type": "header", **header}) + b"\n")
    resumed = plan_resume(plan.journal_path, None, None, {})
    summary = await execute(
        Plan(**{**{n: getattr(resumed, n) for n in Plan.__dataclass_fields__}, "tuning": FAST}),
        connection_for(server),
    )
    assert summary.exit_code == ExitCode.OK
    results = {r["machine_id"]: r for r in replay_file(plan.journal_path).results()}
    assert results[target["id"]]["outcome"] == "excluded"
    assert emulator.truth.offboard_posts.get(target["id"], 0) == 0


async def test_conflicting_or_missing_sources_are_usage_errors(tmp_path: Path) -> None:
    env = {"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": "s"}
    code, _, err = await cli("run", "--journal", str(tmp_path / "j.jsonl"), env=env)
    assert code == 2
    assert "exactly one source" in err
    code, _, err = await cli(
        "run",
        "--ids",
        "x.txt",
        "--query",
        "healthStatus eq 'Inactive'",
        "--journal",
        str(tmp_path / "j.jsonl"),
        env=env,
    )
    assert code == 2
    assert "--ids, --query/presets" in err
    code, _, err = await cli(
        "run",
        "--inactive-days",
        "30",
        "--exclude-id",
        "nope",
        "--journal",
        str(tmp_path / "j.jsonl"),
        env=env,
    )
    assert code == 2
    assert "'nope' is not a 40-hex machine id" in err
