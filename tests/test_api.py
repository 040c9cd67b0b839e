"""The public Python API (issue 13): run, resume after a kill, verify, report, check; two jobs
in one event loop; a stop from another task. Typed: mypy --strict checks this file as a
caller's script would be checked."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

import bulkoffboard
from bulkoffboard.emulator import EmulatorConfig, EmulatorServer, FleetSpec
from bulkoffboard.journal import replay_file
from tests.conftest import StartEmulator, connection_for, env_for

LIMITS = ["100/0.6", "1500/36"]


def emulator_config(size: int, *, seed: int = 11, tenant_id: str | None = None) -> EmulatorConfig:
    extra: dict[str, Any] = {"tenant_id": tenant_id} if tenant_id else {}
    return EmulatorConfig(
        time_scale=0.01,
        action_start_s=0.05,
        action_complete_s=0.1,
        fleet=FleetSpec(size=size, seed=seed, os_mix={"Windows10": 0.8, "Linux": 0.2}),
        **extra,
    )


def actions_by_machine(server: EmulatorServer, run_id: str) -> collections.Counter[str]:
    return collections.Counter(
        a.machine_id for a in server.emulator.actions.values() if run_id in a.comment
    )


def windows(server: EmulatorServer) -> set[str]:
    return {m for m, d in server.emulator.machines.items() if d["osPlatform"] == "Windows10"}


async def test_a_run_from_python_with_ids_as_values(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(emulator_config(30))
    journal = tmp_path / "run.jsonl"
    ids = [m.upper() for m in server.emulator.machines] + ["not-an-id"]
    summary = await bulkoffboard.run(
        ids=ids,
        journal=str(journal),
        comment="CHG0042 retire",
        limits=LIMITS,
        connection=connection_for(server),
    )
    assert summary.exit_code == bulkoffboard.ExitCode.OK
    assert int(summary.exit_code) == 0
    assert summary.counts["offboarded"] == len(windows(server))
    assert summary.counts["unsupported"] == 30 - len(windows(server))
    assert summary.counts["invalid_id"] == 1
    assert summary.journal_path == journal and summary.run_id
    created = actions_by_machine(server, summary.run_id)
    assert set(created) == windows(server) and set(created.values()) == {1}
    header = replay_file(journal).header
    assert header["source"]["kind"] == "list"
    assert Path(header["source"]["path"]) == journal.with_name("run.jsonl.ids")
    data = orjson.loads(bulkoffboard.report(journal, format="json"))
    assert data["counts"] == {k: n for k, n in summary.counts.items() if n}
    assert data["run"]["run_id"] == summary.run_id


async def test_connection_settings_come_from_the_environment_as_for_the_cli(
    start_emulator: StartEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_emulator(emulator_config(10))
    for name, value in env_for(server).items():
        monkeypatch.setenv(name, value)
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(server.emulator.machines) + "\n", encoding="utf-8")
    summary = await bulkoffboard.run(ids, journal=tmp_path / "run.jsonl", limits=LIMITS)
    assert summary.exit_code == 0
    result = await bulkoffboard.check()
    assert result.ready and result.exit_code == 0
    assert ("ok", "Machine.Offboard granted") in result.findings


async def test_problems_a_caller_can_fix_raise_the_error_tree_with_the_clis_message(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(emulator_config(5))
    conn = connection_for(server)
    with pytest.raises(bulkoffboard.UsageError, match="give exactly one source"):
        await bulkoffboard.run(journal=tmp_path / "a.jsonl", connection=conn)
    with pytest.raises(bulkoffboard.UsageError, match=r"missing\.txt: no such file"):
        await bulkoffboard.run(
            tmp_path / "missing.txt", journal=tmp_path / "b.jsonl", connection=conn
        )
    with pytest.raises(bulkoffboard.AuthError):
        await bulkoffboard.run(
            ["a" * 40],
            journal=tmp_path / "c.jsonl",
            connection=connection_for(server, secret="wrong-secret"),
        )
    assert not (tmp_path / "c.jsonl").exists(), "authentication fails before the journal"
    with pytest.raises(bulkoffboard.JournalError, match="does not exist"):
        await bulkoffboard.resume(tmp_path / "never.jsonl", connection=conn)
    with pytest.raises(bulkoffboard.UsageError, match="report format"):
        bulkoffboard.report(tmp_path / "never.jsonl", format="pdf")  # type: ignore[arg-type]


async def test_a_dry_run_returns_the_plan_and_sends_nothing(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(emulator_config(20))
    summary = await bulkoffboard.run(
        list(server.emulator.machines),
        journal=tmp_path / "dry.jsonl",
        dry_run=True,
        dry_rows=True,
        connection=connection_for(server),
    )
    assert summary.exit_code == 0 and summary.plan is not None
    assert summary.plan.to_offboard == len(windows(server))
    assert len(summary.plan.rows) == 20
    assert sum(server.emulator.truth.offboard_posts.values()) == 0
    assert not (tmp_path / "dry.jsonl").exists()


async def test_the_breaker_asks_the_confirm_callback(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(emulator_config(20))
    asked: list[str] = []

    def no(plan: Any, question: str) -> bool:
        asked.append(question)
        return False

    with pytest.raises(bulkoffboard.UsageError, match="not confirmed: nothing was sent"):
        await bulkoffboard.run(
            list(server.emulator.machines),
            journal=tmp_path / "j.jsonl",
            max_machines=3,
            confirm=no,
            connection=connection_for(server),
        )
    assert asked and "over the limit of 3" in asked[0]
    assert sum(server.emulator.truth.offboard_posts.values()) == 0


async def test_a_stop_from_another_task_ends_with_130_and_resume_finishes(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(emulator_config(120))
    conn = connection_for(server)
    journal = tmp_path / "run.jsonl"
    stop = asyncio.Event()
    seen: list[dict[str, Any]] = []

    class Watch:
        def run_started(self, total: int | None, eta: Any) -> None:
            seen.append({"total": total})

        def machine_done(self, record: dict[str, Any]) -> None:
            seen.append(record)
            if len(seen) == 20:
                stop.set()

        def run_stopped(self) -> None:
            pass

    summary = await bulkoffboard.run(
        list(server.emulator.machines),
        journal=journal,
        limits=LIMITS,
        connection=conn,
        stop=stop,
        observer=Watch(),
    )
    assert summary.exit_code == bulkoffboard.ExitCode.INTERRUPTED
    assert seen[0] == {"total": len(windows(server))}  # the preflight skips the rest
    assert 20 <= summary.total < 120
    resumed = await bulkoffboard.resume(journal, connection=conn)
    assert resumed.exit_code == 0
    created = actions_by_machine(server, summary.run_id)
    assert set(created) == windows(server) and set(created.values()) == {1}


async def test_resume_after_a_kill_then_verify_and_report(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """A run cancelled mid-flight (as a hard kill: no stop, no end record) leaves machines in
    doubt; resume reconciles them, verify follows the actions, every report agrees."""
    server = await start_emulator(emulator_config(150))
    conn = connection_for(server)
    journal = tmp_path / "run.jsonl"
    task = asyncio.ensure_future(
        bulkoffboard.run(
            list(server.emulator.machines), journal=journal, limits=LIMITS, connection=conn
        )
    )
    while sum(server.emulator.truth.offboard_posts.values()) < 40:
        await asyncio.sleep(0.01)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    run_id = replay_file(journal).header["run_id"]
    resumed = await bulkoffboard.resume(journal, connection=conn)
    assert resumed.exit_code == 0
    created = actions_by_machine(server, run_id)
    assert set(created) == windows(server) and set(created.values()) == {1}
    assert sum(server.emulator.truth.posts_after_action.values()) == 0
    await asyncio.sleep(0.3)  # online devices finish their actions
    verified = await bulkoffboard.verify(journal, connection=conn)
    assert verified.exit_code == 0 and verified.statuses["Succeeded"] > 0
    rows = [orjson.loads(line) for line in bulkoffboard.report(journal, "jsonl").splitlines()]
    statuses = {r["machine_id"]: r["action_status"] for r in rows if r["outcome"] == "offboarded"}
    assert collections.Counter(statuses.values()) == verified.statuses


async def test_two_runs_at_once_in_one_loop_share_nothing(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """Two jobs side by side against two tenants' emulators: each has its own journal,
    tokens, throttles and session; each emulator sees only its own machines and tokens."""
    first = await start_emulator(
        emulator_config(60, seed=1, tenant_id="11111111-1111-4111-8111-111111111111")
    )
    second = await start_emulator(
        emulator_config(60, seed=2, tenant_id="22222222-2222-4222-8222-222222222222")
    )
    one, two = await asyncio.gather(
        bulkoffboard.run(
            list(first.emulator.machines),
            journal=tmp_path / "one.jsonl",
            limits=LIMITS,
            connection=connection_for(first),
        ),
        bulkoffboard.run(
            list(second.emulator.machines),
            journal=tmp_path / "two.jsonl",
            limits=["30/0.6", "1500/36"],
            workers=3,
            connection=connection_for(second),
        ),
    )
    assert one.exit_code == two.exit_code == 0
    assert one.run_id != two.run_id
    for server, summary in ((first, one), (second, two)):
        created = actions_by_machine(server, summary.run_id)
        assert set(created) == windows(server) and set(created.values()) == {1}
        assert set(server.emulator.truth.offboard_posts) <= set(server.emulator.machines)
        assert summary.counts["offboarded"] == len(windows(server))
    # Each job kept its own limits: the second one's tighter window was never exceeded.
    assert second.emulator.truth.max_in_window["offboard 0.6"] <= 30
    assert replay_file(tmp_path / "two.jsonl").header["workers"] == 3
    assert (
        replay_file(tmp_path / "one.jsonl").header["tenant_id"]
        != replay_file(tmp_path / "two.jsonl").header["tenant_id"]
    )


def test_the_package_ships_its_types_and_its_public_names() -> None:
    package = Path(bulkoffboard.__file__).parent
    assert (package / "py.typed").is_file()
    for name in ("run", "resume", "verify", "report", "check", "UsageError", "ExitCode"):
        assert name in bulkoffboard.__all__
        assert hasattr(bulkoffboard, name)


def readme_example() -> str:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Use from Python") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


async def test_the_readme_example_is_the_checked_file_and_runs(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    example = Path(__file__).with_name("example_api.py")
    text = example.read_text(encoding="utf-8")
    assert text.endswith(readme_example()), "README and tests/example_api.py differ"
    server = await start_emulator(emulator_config(5))
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH", "TMPDIR", "XDG_STATE_HOME")
    env = {k: v for k, v in os.environ.items() if k in keep} | env_for(server)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(example),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "not_found" in out.decode()  # the example's ids are not in the emulator's fleet
    assert (tmp_path / "offboard-2026-12-04.jsonl").is_file()
