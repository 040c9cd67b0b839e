"""Soak and chaos: crash loops under faults, and a journal whose disk fills up.

The crash loops run the real command line as processes against one loopback emulator and kill
them (SIGKILL) at random moments, resuming each time. At the end every machine has a final
outcome, no machine got two offboard actions from the run, no POST went out for a machine that
already had one, and no rate window was exceeded across the processes (the emulator's truth).

The fast variants run in CI; ``pytest --soak`` adds the long one (``@pytest.mark.slow``).

Disk trouble: a journal on a full device fails before any offboard call, and a write error in the
middle of a run stops it without losing what was recorded: the journal still replays, every POST
has its attempt line, and a resume finishes with each machine offboarded once. The tmpfs
variants need root (``mount``) and skip cleanly otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bulkoffboard.emulator import EmulatorConfig, EmulatorServer, Faults, FleetSpec
from bulkoffboard.errors import JournalError
from bulkoffboard.jobs import Plan, execute, new_plan, plan_resume
from bulkoffboard.journal import replay_file
from bulkoffboard.runner import ExitCode
from bulkoffboard.throttle import Limit
from tests.conftest import StartEmulator, connection_for, env_for

SCALE = 0.01
LIMITS = (Limit(100, 60 * SCALE), Limit(1500, 3600 * SCALE))
LIMIT_ARGS = ("--limit", "100/0.6", "--limit", "1500/36")
FAST = {"backoff_base_s": 0.01, "backoff_cap_s": 0.05, "shutdown_grace_s": 2.0}
FINAL = {"offboarded", "unsupported", "already_pending"}

#: Every fault at once: 5xx, connections dropped before and after the action is created,
#: 429 storms, tokens that expire every two seconds, slow and jittery responses.
CHAOS = Faults(
    error_rate=0.08,
    abort_before_rate=0.04,
    abort_after_rate=0.04,
    latency_s=0.005,
    jitter_s=0.02,
    burst_every_s=2.0,
    burst_length_s=0.25,
)


def config(size: int, faults: Faults | None = None, **kwargs: Any) -> EmulatorConfig:
    return EmulatorConfig(
        time_scale=SCALE,
        action_start_s=0.05,
        action_complete_s=0.1,
        fleet=FleetSpec(size=size, seed=23, os_mix={"Windows10": 0.85, "Linux": 0.15}),
        faults=dataclasses.replace(faults) if faults else Faults(),
        **kwargs,
    )


def _base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH", "SYSTEMROOT", "TMPDIR", "XDG_STATE_HOME")
    return {k: v for k, v in os.environ.items() if k in keep}


async def cli(*args: str, env: dict[str, str], timeout: float = 120) -> tuple[int, str, str]:
    """Run ``python -m bulkoffboard`` and return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bulkoffboard",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**_base_env(), **env},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def write_ids(server: EmulatorServer, path: Path) -> Path:
    path.write_text("\n".join(server.emulator.machines) + "\n", encoding="utf-8")
    return path


def actions_of(server: EmulatorServer, run_id: str) -> collections.Counter[str]:
    """Offboard actions the run created, per machine (the emulator's truth)."""
    return collections.Counter(
        a.machine_id for a in server.emulator.actions.values() if run_id in a.comment
    )


def journal_lines(journal: Path) -> list[dict[str, Any]]:
    """The journal's whole lines (a torn last line is left out)."""
    out = []
    for line in journal.read_bytes().splitlines(keepends=True):
        if line.endswith(b"\n") and line.strip():
            out.append(orjson.loads(line))
    return out


def assert_all_final_once_and_within_limits(
    server: EmulatorServer, journal: Path, *, limits: tuple[Limit, ...] = LIMITS
) -> None:
    """Every machine final, exactly one action per offboarded machine, no POST after an
    action existed, no window over its limit: from the journal and the emulator's truth."""
    replay = replay_file(journal)
    run_id = replay.header["run_id"]
    outcomes = {str(r["machine_id"]): str(r["outcome"]) for r in replay.results()}
    assert set(outcomes) == set(server.emulator.machines), "a machine has no result"
    assert replay.in_doubt() == []
    assert set(outcomes.values()) <= FINAL, collections.Counter(outcomes.values())
    created = actions_of(server, run_id)
    twice = {m: n for m, n in created.items() if n > 1}
    assert not twice, f"offboarded twice: {twice}"
    assert {m for m, o in outcomes.items() if o == "offboarded"} == set(created)
    truth = server.emulator.truth
    assert sum(truth.posts_after_action.values()) == 0, "a POST was re-sent after an action"
    assert truth.malformed_paths == []
    for limit in limits:
        seen = truth.max_in_window.get(f"offboard {limit.period_s:g}", 0)
        assert seen <= limit.calls, f"{seen} calls arrived in one {limit.period_s:g} s window"


async def crash_loop(
    server: EmulatorServer,
    tmp_path: Path,
    *,
    kills: int,
    seed: int,
    max_posts: int,
    max_wait_s: float = 20.0,
    limit_args: tuple[str, ...] = LIMIT_ARGS,
    final_timeout_s: float = 120,
) -> tuple[Path, int]:
    """Start, SIGKILL at a random moment (a quarter of the time early, during start-up,
    planning or the journal's first lines; otherwise after a random number of POSTs, while
    sending and journaling), resume, ... until ``kills`` processes were killed or one finished
    the run by itself; then one last resume to the end. Returns the journal and the number of
    kills."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    truth = server.emulator.truth
    journal = tmp_path / "soak.jsonl"
    env = {**_base_env(), **env_for(server)}
    ids = write_ids(server, tmp_path / "ids.txt")
    killed = 0

    def command() -> tuple[str, ...]:
        if not journal.exists() or journal.stat().st_size == 0:  # killed before its header
            return ("run", "--ids", str(ids), "--journal", str(journal), "--comment", "soak")
        return ("resume", "--journal", str(journal))

    for _ in range(3 * kills):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bulkoffboard",
            *command(),
            *limit_args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
        if rng.random() < 0.25:  # early: start-up, token, planning, the journal's first lines
            target, deadline = float("inf"), loop.time() + rng.uniform(0.05, 2.0)
        else:  # while sending: after a random number of POSTs
            target = sum(truth.offboard_posts.values()) + rng.randint(1, max_posts)
            deadline = loop.time() + max_wait_s
        while (
            proc.returncode is None
            and sum(truth.offboard_posts.values()) < target
            and loop.time() < deadline
        ):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.002)
        if proc.returncode is None:
            proc.kill()
            killed += 1
        await proc.wait()
        if proc.returncode == 0 or killed >= kills:
            break
    code, out, err = await cli(*command(), *limit_args, env=env, timeout=final_timeout_s)
    assert code == 0, (out, err[-2000:])
    return journal, killed


# -- crash loops -----------------------------------------------------------------------------------


async def test_a_crash_loop_under_every_fault_at_once_loses_nothing_and_does_nothing_twice(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(config(150, CHAOS, token_lifetime_s=2.0))
    server.emulator.force_429(6, retry_after_s=1, group="offboard")
    journal, kills = await crash_loop(server, tmp_path, kills=4, seed=7, max_posts=40)
    assert kills >= 3
    assert_all_final_once_and_within_limits(server, journal)
    truth = server.emulator.truth
    for fault in ("error", "abort_before", "abort_after"):
        assert truth.faults_injected[fault] > 0, f"no {fault} fault was injected"
    assert truth.throttled["offboard"] > 0, "no 429 storm hit the run"
    assert truth.tokens_issued > 1, "the tokens that expire every 2 s were never renewed"
    assert replay_file(journal).sessions >= 2


async def test_faults_at_once_in_one_process_end_final_with_nothing_done_twice(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """The same faults without kills, in-process: one session must settle every machine."""
    server = await start_emulator(config(120, CHAOS, token_lifetime_s=1.5))
    server.emulator.force_429(8, retry_after_s=1, group="offboard")
    ids = write_ids(server, tmp_path / "ids.txt")
    conn = connection_for(server)
    plan = new_plan(
        journal_path=tmp_path / "journal.jsonl",
        source={"kind": "file", "path": str(ids), "format": "text"},
        comment="chaos",
        workers=8,
        limits=LIMITS,
        conn=conn,
    )
    plan = dataclasses.replace(plan, tuning={**FAST, "max_attempts": 12})
    summary = await execute(plan, conn)
    assert summary.exit_code == ExitCode.OK, summary.as_dict()
    assert_all_final_once_and_within_limits(server, plan.journal_path)
    assert server.emulator.truth.faults_injected["abort_after"] > 0


@pytest.mark.slow
async def test_a_long_crash_loop_across_the_hourly_window_keeps_every_promise(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """2,000 machines (more than the hourly 1,500) and 30 kills: the hour window is crossed
    by many processes, each seeding its throttle from the journal of the ones before."""
    faults = Faults(error_rate=0.03, abort_before_rate=0.02, abort_after_rate=0.02, jitter_s=0.01)
    server = await start_emulator(config(2000, faults, token_lifetime_s=5.0))
    server.emulator.force_429(10, retry_after_s=1, group="offboard")
    journal, kills = await crash_loop(
        server, tmp_path, kills=30, seed=2026, max_posts=100, final_timeout_s=300
    )
    assert kills >= 25
    assert_all_final_once_and_within_limits(server, journal)
    truth = server.emulator.truth
    assert sum(truth.offboard_posts.values()) > 1500, "the run never had to wait for the hour"
    assert truth.max_in_window["offboard 36"] > 1200, "the hour window was never loaded"
    assert replay_file(journal).sessions >= 20


@pytest.mark.parametrize("latency_s", [0.3, 1.2])
async def test_a_slow_spell_early_in_a_window_does_not_make_it_overflow_later(
    start_emulator: StartEmulator, tmp_path: Path, latency_s: float
) -> None:
    """The first calls of a window arrive ``latency_s`` after they were sent (a network
    hiccup; 1.2 s is longer than a quarter of the window, where an earlier version capped the
    lag it held for), the rest at once; one window (300 calls in 3 s) on both sides, so
    nothing else gates."""
    limits = {"offboard": ((300, 3.0),), "machineactions": ((300, 3.0),), "machines": ((300, 3.0),)}
    server = await start_emulator(
        EmulatorConfig(
            limits={**EmulatorConfig().limits, **limits},
            fleet=FleetSpec(size=620, seed=5, os_mix={"Windows10": 1.0}),
        )
    )
    ids = write_ids(server, tmp_path / "ids.txt")
    conn = connection_for(server)
    plan = new_plan(
        journal_path=tmp_path / "journal.jsonl",
        source={"kind": "file", "path": str(ids), "format": "text"},
        comment="slow spell",
        workers=8,
        limits=(Limit(300, 3.0),),
        conn=conn,
    )
    truth = server.emulator.truth
    server.emulator.faults.latency_s = latency_s
    run = asyncio.create_task(execute(dataclasses.replace(plan, tuning=FAST), conn))
    while sum(truth.offboard_posts.values()) < 20 and not run.done():
        await asyncio.sleep(0.001)
    server.emulator.faults.latency_s = 0.0
    summary = await run
    assert summary.exit_code == ExitCode.OK, summary.as_dict()
    assert truth.max_in_window["offboard 3"] <= 300
    assert truth.throttled["offboard"] == 0


# -- disk trouble ----------------------------------------------------------------------------------


def _journal_check(server: EmulatorServer, journal: Path) -> None:
    """After a failed write: the journal replays, and no POST went out without its attempt
    line before it (every machine's POSTs <= its attempt lines)."""
    replay_file(journal)
    attempts = collections.Counter(
        str(r["machine_id"]) for r in journal_lines(journal) if r["type"] == "attempt"
    )
    posts = server.emulator.truth.offboard_posts
    unrecorded = {m: n for m, n in posts.items() if n > attempts[m]}
    assert not unrecorded, f"POSTs without an attempt line: {unrecorded}"


@pytest.fixture
def journal_write_trap(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """``arm(journal, after=N, short=True, recovers=False)``: once the first attempt line is
    written, the journal's writes fail with ENOSPC after N more succeeded, the first failing one
    writing half its bytes (a short write, as a file system that fills up mid-write gives); with
    ``recovers`` the space comes back right after that one failure."""
    real_write = os.write
    state: dict[str, Any] = {"path": None}

    def arm(journal: Path, *, after: int, short: bool = True, recovers: bool = False) -> None:
        state.update(
            path=str(journal), left=after, short=short, recovers=recovers, failed=0, sending=False
        )

    def write(fd: int, data: Any) -> int:
        if state["path"] is not None and fd > 2 and _target(fd) == state["path"]:
            state["sending"] = state["sending"] or b'"type":"attempt"' in bytes(data)
            if not state["sending"]:
                pass
            elif state["left"] > 0:
                state["left"] -= 1
            elif not (state["recovers"] and state["failed"] >= 2):
                state["failed"] += 1
                if state["failed"] == 1 and state["short"] and len(data) > 1:
                    return real_write(fd, bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    yield arm
    state["path"] = None


def _target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _needs_proc() -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to tell the journal's descriptor")


async def _interrupted_by_a_full_disk(
    server: EmulatorServer, tmp_path: Path, arm: Callable[..., None], **trap: Any
) -> Plan:
    ids = write_ids(server, tmp_path / "ids.txt")
    conn = connection_for(server)
    plan = new_plan(
        journal_path=tmp_path / "journal.jsonl",
        source={"kind": "file", "path": str(ids), "format": "text"},
        comment="disk full",
        workers=8,
        limits=LIMITS,
        conn=conn,
    )
    plan = dataclasses.replace(plan, tuning=FAST)
    arm(plan.journal_path, **trap)
    with pytest.raises(JournalError, match="No space left on device") as caught:
        await execute(plan, conn)
    assert str(plan.journal_path) in str(caught.value)
    arm(Path("/nonexistent"), after=0)  # the space is back
    return plan


async def test_a_write_error_mid_run_stops_it_and_keeps_what_was_recorded(
    start_emulator: StartEmulator,
    tmp_path: Path,
    journal_write_trap: Callable[..., None],
) -> None:
    _needs_proc()
    server = await start_emulator(config(80))
    plan = await _interrupted_by_a_full_disk(server, tmp_path, journal_write_trap, after=25)
    posted = sum(server.emulator.truth.offboard_posts.values())
    assert 0 < posted < 80, "the run did not stop at the write error"
    _journal_check(server, plan.journal_path)

    resumed = dataclasses.replace(plan_resume(plan.journal_path, None, None, {}), tuning=FAST)
    summary = await execute(resumed, connection_for(server))
    assert summary.exit_code == ExitCode.OK, summary.as_dict()
    assert_all_final_once_and_within_limits(server, plan.journal_path)


async def test_a_short_write_then_space_coming_back_leaves_a_replayable_journal(
    start_emulator: StartEmulator,
    tmp_path: Path,
    journal_write_trap: Callable[..., None],
) -> None:
    _needs_proc()
    server = await start_emulator(config(80))
    plan = await _interrupted_by_a_full_disk(
        server, tmp_path, journal_write_trap, after=25, recovers=True
    )
    _journal_check(server, plan.journal_path)


async def test_a_journal_on_a_full_device_fails_before_any_offboard_call(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """``/dev/full`` takes no byte: the header cannot be written, so nothing is sent."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    server = await start_emulator(config(20))
    journal = tmp_path / "journal.jsonl"
    journal.symlink_to("/dev/full")
    ids = write_ids(server, tmp_path / "ids.txt")
    code, out, err = await cli(
        "run", "--ids", str(ids), "--journal", str(journal), *LIMIT_ARGS, env=env_for(server)
    )
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(journal) in lines[0] and "No space left" in lines[0], err
    assert sum(server.emulator.truth.offboard_posts.values()) == 0


# -- a real full file system (root: a tiny tmpfs) --------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``fill(free_pages)``: a 64 KiB tmpfs with all but ``free_pages`` 4 KiB pages taken;
    returns its folder. Skips unless root and mounting is permitted; unmounts after."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")

    def fill(free_pages: int) -> Path:
        (mount / "filler").write_bytes(b"\0" * (4096 * (16 - free_pages)))
        return mount

    try:
        yield fill
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)


def _remount(mount: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


async def test_a_journal_on_a_full_file_system_with_room_for_the_lock_fails_cleanly(
    start_emulator: StartEmulator, tmp_path: Path, tiny_fs: Callable[[int], Path]
) -> None:
    server = await start_emulator(config(20))
    journal = tiny_fs(1) / "journal.jsonl"  # one page: the lock file's pid takes it
    ids = write_ids(server, tmp_path / "ids.txt")
    code, out, err = await cli(
        "run", "--ids", str(ids), "--journal", str(journal), *LIMIT_ARGS, env=env_for(server)
    )
    assert code == 2, (out, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(journal) in lines[0] and "No space left" in lines[0], err
    assert sum(server.emulator.truth.offboard_posts.values()) == 0


async def test_a_journal_on_a_completely_full_file_system_fails_cleanly(
    start_emulator: StartEmulator, tmp_path: Path, tiny_fs: Callable[[int], Path]
) -> None:
    server = await start_emulator(config(20))
    journal = tiny_fs(0) / "journal.jsonl"
    ids = write_ids(server, tmp_path / "ids.txt")
    code, out, err = await cli(
        "run", "--ids", str(ids), "--journal", str(journal), *LIMIT_ARGS, env=env_for(server)
    )
    assert sum(server.emulator.truth.offboard_posts.values()) == 0
    assert "Traceback" not in err, err[-1500:]
    assert code == 2 and str(journal) in err, (out, err)


async def test_a_file_system_filling_up_mid_run_stops_it_and_resume_finishes_once_space_is_back(
    start_emulator: StartEmulator, tmp_path: Path, tiny_fs: Callable[[int], Path]
) -> None:
    server = await start_emulator(config(60))
    mount = tiny_fs(3)  # the lock's page, and two pages of journal: some 15 machines
    journal = mount / "journal.jsonl"
    ids = write_ids(server, tmp_path / "ids.txt")
    env = env_for(server)
    code, out, err = await cli(
        "run", "--ids", str(ids), "--journal", str(journal), *LIMIT_ARGS, env=env
    )
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert f"cannot write journal {journal}" in err and "No space left" in err, err
    posted = sum(server.emulator.truth.offboard_posts.values())
    assert 0 < posted < 60, "the run did not stop when the disk filled"
    _journal_check(server, journal)

    _remount(mount, "4m")
    code, out, err = await cli("resume", "--journal", str(journal), *LIMIT_ARGS, env=env)
    assert code == 0, (out, err)
    assert_all_final_once_and_within_limits(server, journal)
