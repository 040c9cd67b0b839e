"""Crash consistency under a power cut, not a kill (issue 12).

A killed process leaves what it wrote in the page cache: the file keeps every line. A power
cut (or a host crash) keeps only what an fsync made durable, and of the rest some prefix, or
zeros where the new size reached the disk but the data did not. In the style of ALICE and
CrashMonkey, the file layer here remembers how far each fsync covered the journal; at a random
moment (when the K-th offboard request reaches the service, which then dies with the host)
the journal is cut back to what survives, and a resume must end with every machine settled,
exactly one action each, no POST for a machine that already had an action, and a journal that
replays.

The cut is taken as the request *arrives*: the request reached MDE, so the journal must say
it might have (a durable ``attempt``). With the attempt written but not fsynced before the
request (the old behaviour) this fails within a few cut points.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bulkoffboard.emulator import EmulatorConfig, EmulatorServer, FleetSpec
from bulkoffboard.emulator.app import DEFAULT_LIMITS as EMULATOR_LIMITS
from bulkoffboard.jobs import execute, new_plan, plan_resume
from bulkoffboard.journal import replay_file
from bulkoffboard.runner import ExitCode
from bulkoffboard.throttle import Limit
from tests.conftest import StartEmulator, connection_for

FINAL = {"offboarded", "already_pending", "not_found", "unsupported", "forbidden", "invalid_id"}
MACHINES = 24


@dataclass
class Disk:
    """The file layer's memory: per file (device, inode), how many bytes the last fsync
    covered. fsync covers what was written before it started, so the size is read first."""

    durable: dict[tuple[int, int], int] = field(default_factory=dict)
    real_fsync: Callable[[int], None] = os.fsync

    def fsync(self, fd: int) -> None:
        info = os.fstat(fd)
        self.real_fsync(fd)
        key = (info.st_dev, info.st_ino)
        self.durable[key] = max(self.durable.get(key, 0), info.st_size)

    def durable_size(self, path: Path) -> int:
        info = path.stat()
        return self.durable.get((info.st_dev, info.st_ino), 0)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    layer = Disk()
    monkeypatch.setattr(os, "fsync", layer.fsync)
    return layer


@dataclass(frozen=True)
class Cut:
    """What survives: the durable bytes, then ``extra`` of the bytes written after them (a
    prefix the disk happened to keep), then, with ``zeros``, NUL bytes up to the old size."""

    extra: int
    zeros: bool

    def image(self, data: bytes, durable: int) -> bytes:
        keep = min(len(data), durable + self.extra)
        return data[:keep] + (b"\0" * (len(data) - keep) if self.zeros else b"")


def emulator_config(seed: int) -> EmulatorConfig:
    """Windows mostly (offboardable) and some Linux; online devices finish their action at
    once, so a second POST after a lost record would create a second action."""
    return EmulatorConfig(
        time_scale=0.01,
        action_start_s=0.0,
        action_complete_s=0.001,
        fleet=FleetSpec(
            size=MACHINES,
            seed=seed,
            os_mix={"Windows10": 0.85, "Linux": 0.15},
            health_mix={"Active": 1.0},
        ),
        limits={**EMULATOR_LIMITS, "offboard": ((100_000, 60.0), (100_000, 3600.0))},
    )


class PowerCut:
    """Arms the emulator so that when the K-th offboard request has created its action, the
    host 'loses power': the journal image that would survive is taken, the run is cancelled,
    and the service answers nothing more (no action is created after the cut)."""

    def __init__(self, server: EmulatorServer, disk: Disk, journal: Path, k: int) -> None:
        self.server = server
        self.disk = disk
        self.journal = journal
        self.k = k
        self.arrived = 0
        self.dead = False
        self.data = b""
        self.durable = 0
        self.run: asyncio.Task[Any] | None = None
        emulator = server.emulator
        self._create = emulator._create_action
        emulator._create_action = self._create_action  # type: ignore[method-assign]

    def _create_action(self, *args: Any, **kwargs: Any) -> Any:
        if self.dead:
            raise RuntimeError("the client's host is down: nothing reaches the service")
        action = self._create(*args, **kwargs)
        self.arrived += 1
        if self.arrived == self.k:
            self.dead = True
            self.data = self.journal.read_bytes()
            self.durable = self.disk.durable_size(self.journal)
            assert self.run is not None
            self.run.cancel()
        return action

    def disarm(self) -> None:
        self.server.emulator._create_action = self._create  # type: ignore[method-assign]


async def one_cut(start_emulator: StartEmulator, disk: Disk, tmp: Path, seed: int) -> str:
    """One run cut by a power loss at a random request, then resumed; returns a line of what
    happened (for the failure message)."""
    rng = random.Random(seed)
    server = await start_emulator(emulator_config(seed))
    windows = [m for m, d in server.emulator.machines.items() if d["osPlatform"] == "Windows10"]
    ids = tmp / f"ids-{seed}.txt"
    ids.write_text("\n".join(server.emulator.machines) + "\n", encoding="utf-8")
    journal = tmp / f"run-{seed}.jsonl"
    conn = connection_for(server)
    plan = new_plan(
        journal_path=journal,
        source={"kind": "file", "path": str(ids), "format": "text"},
        comment="power cut",
        workers=rng.choice([1, 4, 8]),
        limits=(Limit(100, 0.6), Limit(1500, 36.0)),
        conn=conn,
    )
    cut = PowerCut(server, disk, journal, k=rng.randint(1, len(windows)))
    cut.run = asyncio.ensure_future(execute(plan, conn))
    with contextlib.suppress(asyncio.CancelledError):
        await cut.run
    assert cut.dead, "the cut point was never reached"
    unsynced = len(cut.data) - cut.durable
    shape = Cut(
        extra=rng.choice([0, 0, rng.randint(0, max(unsynced, 0)), unsynced]),
        zeros=rng.random() < 0.5,
    )
    journal.write_bytes(shape.image(cut.data, cut.durable))
    cut.disarm()
    what = (
        f"seed {seed}: cut at request {cut.k} of {len(windows)}, {cut.durable} of "
        f"{len(cut.data)} bytes durable, kept {shape}"
    )

    replay_file(journal)  # the image replays as it is (a torn tail is tolerated)
    summary = await execute(plan_resume(journal, None, None, {}), conn)
    assert summary.exit_code == ExitCode.OK, what

    replay = replay_file(journal)
    run_id = replay.header["run_id"]
    outcomes = {str(r["machine_id"]): str(r["outcome"]) for r in replay.results()}
    assert set(outcomes) == set(server.emulator.machines), what
    assert replay.in_doubt() == [], what
    assert set(outcomes.values()) <= FINAL, what
    created = collections.Counter(
        a.machine_id for a in server.emulator.actions.values() if run_id in a.comment
    )
    assert {m: n for m, n in created.items() if n > 1} == {}, f"offboarded twice: {what}"
    assert set(created) == set(windows), what
    assert sum(server.emulator.truth.posts_after_action.values()) == 0, (
        f"a POST went out for a machine that had an action: {what}"
    )
    return what


async def test_a_power_cut_at_random_requests_never_offboards_twice(
    start_emulator: StartEmulator, disk: Disk, tmp_path: Path
) -> None:
    cuts = [await one_cut(start_emulator, disk, tmp_path, seed) for seed in range(12)]
    assert len(cuts) == 12


@pytest.mark.slow
async def test_a_power_cut_at_many_random_requests_never_offboards_twice(
    start_emulator: StartEmulator, disk: Disk, tmp_path: Path
) -> None:
    for seed in range(1000, 1200):
        await one_cut(start_emulator, disk, tmp_path, seed)


async def test_the_attempt_is_durable_before_its_request_leaves(
    start_emulator: StartEmulator, disk: Disk, tmp_path: Path
) -> None:
    """At the moment each request arrives, the journal's durable bytes already hold its
    attempt line: checked at every arrival of a whole run."""
    server = await start_emulator(emulator_config(7))
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(server.emulator.machines) + "\n", encoding="utf-8")
    journal = tmp_path / "run.jsonl"
    conn = connection_for(server)
    emulator = server.emulator
    create = emulator._create_action
    missing: list[str] = []

    def checked(machine: dict[str, Any], **kwargs: Any) -> Any:
        durable = journal.read_bytes()[: disk.durable_size(journal)]
        if f'"type":"attempt","machine_id":"{machine["id"]}"'.encode() not in durable:
            missing.append(machine["id"])
        return create(machine, **kwargs)

    emulator._create_action = checked  # type: ignore[method-assign]
    plan = new_plan(
        journal_path=journal,
        source={"kind": "file", "path": str(ids), "format": "text"},
        comment="durable attempts",
        workers=8,
        limits=(Limit(100, 0.6), Limit(1500, 36.0)),
        conn=conn,
    )
    assert (await execute(plan, conn)).exit_code == ExitCode.OK
    assert emulator.truth.actions_created, "no request reached the service"
    assert missing == []
