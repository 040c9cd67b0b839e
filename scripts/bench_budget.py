#!/usr/bin/env python3
"""The shared rate budget: what a grant costs on each store, and what 1, 3 and 8 processes on
one app registration achieve together against the limits.

**Per grant** (``grants``): the budget's own cost, measured against the real stores with limits
so large that no grant ever waits (``Limit(10**9, 3600)``, pace off). Each process is a child
of its own holding one :class:`~bulkoffboard.throttle.Throttle` on the store, exactly as a run
holds it, and times, for each grant, ``acquire()`` (the store's ``try_grant`` included) and
the answer (``observe()`` then ``drain()``: the store's ``answer``). Stores:

- ``none``: no shared budget, the in-process throttle alone (the baseline);
- ``tmpfs``: a :class:`~bulkoffboard.budget.LedgerFile` in ``/dev/shm``;
- ``disk``: a ledger on the disk (``--disk-dir``, ``/var/tmp`` by default; the ledger is written
  whole and renamed over, never fsynced);
- ``redis-tcp`` and ``redis-unix``: a :class:`~bulkoffboard.budget.RedisBudget` on a
  throwaway ``redis-server`` on loopback (no persistence), over TCP and over a unix socket
  (``--budget`` takes ``redis://`` only: the socket row shows what TCP costs on top).

What a grant costs depends on how many grants the ledger holds: it reads and rewrites them
all, and at the real limits it holds the last hour's 1,500 from a quarter of an hour into a
run on. So each case starts every round from a store seeded with ``--occupancy`` grants
(default 0 and 1,500, answered, spread over the last hour), then every process takes
``--batch`` grants as fast as it can; rounds repeat until ``--grants`` grants were taken in
all. ``1`` and ``--contend`` processes (default 1 and 4, on a 2-core machine) run each case.
Reported: microseconds per grant (median and p99), grants a second of all processes together,
and CPU microseconds per grant of the clients and of redis-server (``INFO cpu``).

**Together** (``runs``): ``--procs`` (default 1, 3 and 8) real ``python -m bulkoffboard run``
processes on the same app registration (same tenant and client id, so the same budget), each
with its own journal (tmpfs) and its share of ``--machines`` ids (round robin), against one
time-scaled emulator (strict per-client sliding windows counted on arrival, 100/60 s and
1,500/3,600 s times ``--scale``, arrival jitter 1% of the scaled minute) served from this
process; the processes run with ``--limit 100/<60*scale> --limit 1500/<3600*scale> --margin
<1*scale>`` and 8 workers each, and with ``--stores``:

- ``ledger``: no ``--budget`` flag: the default ledger under ``$XDG_STATE_HOME`` (a fresh
  directory on the disk, under ``--disk-dir``);
- ``redis``: ``--budget redis://127.0.0.1:<port>/0``;
- ``none``: ``--budget none``, the contrast: each process believes it has the whole budget.

Every figure is the emulator's truth: ``completion`` runs from the first offboard POST that
arrived to the last action created, ``ideal`` is :func:`bulkoffboard.throttle.ideal_duration_s`
of the scaled limits for all the machines, ``429s`` the offboard calls answered 429, ``max/min``
and ``max/hour`` the most arrivals in any scaled minute and hour window (429s included, as the
service counts them). The round trips (attempt to result, from the journals) and the CPU the
emulator (this process), the clients and redis-server used are printed beside them: on 2 cores,
8 clients and an emulator compete for CPU.

Reproduce (about 10 minutes on a 2-core machine; ``--quick`` about 2)::

    .venv/bin/python scripts/bench_budget.py
    .venv/bin/python scripts/bench_budget.py --quick
    .venv/bin/python scripts/bench_budget.py --only grants --contend 1,2,4 --grants 20000
    .venv/bin/python scripts/bench_budget.py --only runs --stores ledger,none --procs 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from bench_throughput import ROOT, TMPFS, Case, _base_env, _round_trips, make_workdir

from bulkoffboard.budget import BudgetKey, LedgerFile, RedisBudget, SharedBudget
from bulkoffboard.emulator import Emulator, EmulatorConfig, EmulatorServer, Faults, FleetSpec
from bulkoffboard.emulator.app import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET
from bulkoffboard.throttle import Limit, Throttle, ideal_duration_s

SCRIPT = Path(__file__).resolve()
#: The budget every grant child draws on (the key only names the ledger file and Redis keys).
KEY = BudgetKey("https://bench-budget.invalid", "bench-tenant", "bench-client", "offboard")
#: Limits no grant ever waits on: the rule is evaluated in full, and always says yes.
OPEN_LIMITS = (Limit(10**9, 3600.0),)
GRANT_STORES = ("none", "tmpfs", "disk", "redis-tcp", "redis-unix")
RUN_STORES = ("ledger", "redis", "none")
#: bulkoffboard's jitter margin at real scale (1 s; scaled like the windows for the runs).
REAL_MARGIN_S = 1.0
WORKERS = 8
#: A seeded grant's round trip (answered: it holds its window for the margin).
SEEDED_LAG_S = 0.05


# -- redis-server on loopback ------------------------------------------------------------------


@dataclass(slots=True)
class Redis:
    """A redis-server of this benchmark: loopback TCP on a free port and a unix socket."""

    proc: subprocess.Popen[bytes]
    port: int
    socket_path: Path

    @property
    def tcp_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    async def cpu_s(self) -> float:
        """The server's CPU seconds so far (user + system, ``INFO cpu``)."""
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.tcp_url)
        try:
            info = await client.info("cpu")
        finally:
            await client.aclose()
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def flush(self) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.tcp_url)
        try:
            await client.flushdb()
        finally:
            await client.aclose()


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[Redis | None]:
    """Start a throwaway redis-server (no persistence) for the benchmark's life; None when the
    binary is missing (``scripts/bootstrap.sh test`` installs it)."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    sock = directory / "redis.sock"
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--unixsocket", str(sock)]
    argv += ["--unixsocketperm", "700", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [*argv, "--dir", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() or not _accepts(port):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start (exit {proc.poll()})")
            time.sleep(0.02)
        yield Redis(proc, port, sock)
    finally:
        proc.terminate()
        proc.wait(10)


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


# -- per grant: the child ----------------------------------------------------------------------


def _open_store(spec: str) -> SharedBudget | None:
    """``none``, ``ledger:DIR`` or ``redis:URL`` (any URL redis-py takes, unix sockets too)."""
    kind, _, where = spec.partition(":")
    if kind == "ledger":
        return LedgerFile(Path(where), KEY)
    if kind == "redis":
        return RedisBudget(where, KEY)
    return None


async def _batch(throttle: Throttle, count: int) -> dict[str, Any]:
    """``count`` grants, each answered at once; the time of each grant and of its answer."""
    grant_us, answer_us = [], []
    collections = gc.get_stats()[2]["collections"]
    cpu, start = time.process_time(), time.perf_counter()
    for _ in range(count):
        t0 = time.perf_counter()
        granted = await throttle.acquire()
        t1 = time.perf_counter()
        throttle.observe(throttle.now() - granted, granted)
        await throttle.drain()  # the answer, on its way to the store
        t2 = time.perf_counter()
        grant_us.append((t1 - t0) * 1e6)
        answer_us.append((t2 - t1) * 1e6)
    return {
        "grant_us": grant_us,
        "answer_us": answer_us,
        "start": start,  # perf_counter is CLOCK_MONOTONIC: comparable across processes
        "end": time.perf_counter(),
        "cpu_s": time.process_time() - cpu,
        "full_gcs": gc.get_stats()[2]["collections"] - collections,
    }


def grant_child(spec: str) -> int:
    """``--grant-child SPEC``: one process on the budget; each line ``N`` on standard input
    asks for a batch of N grants, answered with its figures as one JSON line; ``quit`` ends."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    throttle = Throttle(OPEN_LIMITS, pace_s=0, shared=_open_store(spec))
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        figures = loop.run_until_complete(_batch(throttle, int(line)))
        sys.stdout.write(orjson.dumps(figures).decode() + "\n")
        sys.stdout.flush()
    loop.run_until_complete(throttle.aclose())
    loop.close()
    return 0


# -- per grant: the parent ---------------------------------------------------------------------


@dataclass(slots=True)
class GrantRow:
    store: str
    where: str
    procs: int
    occupancy: int | None
    grown_to: int = 0
    grant_us: list[float] = field(default_factory=list)
    total_us: list[float] = field(default_factory=list)
    answer_us: list[float] = field(default_factory=list)
    busy_s: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    #: Full (generation 2) garbage collections in the clients during the rounds.
    full_gcs: int = 0

    @property
    def grants(self) -> int:
        return len(self.grant_us)


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def _seed_times(occupancy: int) -> list[tuple[float, float]]:
    """``occupancy`` answered grants spread over the last hour: ``(seconds ago, lag)``, oldest
    first (all still inside the 3,600 s window of :data:`OPEN_LIMITS`)."""
    span = 3500.0
    return [(span - n * span / occupancy, SEEDED_LAG_S) for n in range(occupancy)]


async def _reset(store: str, spec: str, occupancy: int, redis: Redis | None) -> None:
    """The store as a round starts: exactly ``occupancy`` grants, answered."""
    if store in ("tmpfs", "disk"):
        ledger = LedgerFile(Path(spec.partition(":")[2]), KEY)
        ledger.path.unlink(missing_ok=True)
        now = ledger.clock()
        ledger.seed_now((now - ago, lag) for ago, lag in _seed_times(occupancy))
    elif store.startswith("redis") and redis is not None:
        await redis.flush()
        seeder = RedisBudget(redis.tcp_url, KEY)
        try:
            await seeder.seed(_seed_times(occupancy))
        finally:
            await seeder.close()


async def _grant_case(
    store: str,
    spec: str,
    where: str,
    procs: int,
    *,
    occupancy: int | None,
    args: argparse.Namespace,
    redis: Redis | None,
) -> GrantRow:
    env = _base_env() | {"PYTHONPATH": str(ROOT)}
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(SCRIPT),
            "--grant-child",
            spec,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            cwd=str(ROOT),
        )
        for _ in range(procs)
    ]

    async def batch(count: int) -> list[dict[str, Any]]:
        pipes = [c.stdin for c in children if c.stdin is not None]
        for pipe in pipes:
            pipe.write(f"{count}\n".encode())
        await asyncio.gather(*(pipe.drain() for pipe in pipes))
        lines = await asyncio.gather(*(c.stdout.readline() for c in children if c.stdout))
        if not all(lines):
            raise RuntimeError(f"a grant child on {store} died")
        return [orjson.loads(line) for line in lines]

    row = GrantRow(store, where, procs, occupancy)
    rounds = max(1, args.grants // (procs * args.batch))
    try:
        await _reset(store, spec, occupancy or 0, redis)
        await batch(min(args.batch, 20))  # warm-up: imports, connections, first file
        for _ in range(rounds):
            await _reset(store, spec, occupancy or 0, redis)
            server = await redis.cpu_s() if redis is not None and store.startswith("redis") else 0
            got = await batch(args.batch)
            if redis is not None and store.startswith("redis"):
                row.server_cpu_s += await redis.cpu_s() - server
            row.busy_s += max(g["end"] for g in got) - min(g["start"] for g in got)
            for g in got:
                row.grant_us += g["grant_us"]
                row.answer_us += g["answer_us"]
                row.total_us += [a + b for a, b in zip(g["grant_us"], g["answer_us"], strict=True)]
                row.client_cpu_s += g["cpu_s"]
                row.full_gcs += g["full_gcs"]
        row.grown_to = (occupancy or 0) + procs * args.batch
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.write(b"quit\n")
                child.stdin.close()
        await asyncio.gather(*(c.wait() for c in children))
    return row


async def bench_grants(args: argparse.Namespace, redis: Redis | None) -> list[GrantRow]:
    tmpfs_dir = Path(tempfile.mkdtemp(prefix="bench-budget-ledger-", dir=TMPFS))
    disk_dir = Path(tempfile.mkdtemp(prefix="bench-budget-ledger-", dir=args.disk_dir))
    stores: dict[str, tuple[str, str]] = {
        "none": ("none", "in-process throttle only"),
        "tmpfs": (f"ledger:{tmpfs_dir}", f"ledger in {TMPFS} ({_fstype(tmpfs_dir)})"),
        "disk": (f"ledger:{disk_dir}", f"ledger in {args.disk_dir} ({_fstype(disk_dir)})"),
    }
    if redis is not None:
        stores["redis-tcp"] = (f"redis:{redis.tcp_url}", "redis-server, loopback TCP")
        stores["redis-unix"] = (f"redis:{redis.unix_url}", "redis-server, unix socket")
    rows = []
    try:
        for procs in args.contend:
            for store, (spec, where) in stores.items():
                for occupancy in [None] if store == "none" else args.occupancy:
                    held = "" if occupancy is None else f", {occupancy} grants held"
                    print(f"  grants: {store}, {procs} process(es){held} ...", flush=True)
                    row = await _grant_case(
                        store, spec, where, procs, occupancy=occupancy, args=args, redis=redis
                    )
                    rows.append(row)
    finally:
        shutil.rmtree(tmpfs_dir, ignore_errors=True)
        shutil.rmtree(disk_dir, ignore_errors=True)
    return rows


def _fstype(path: Path) -> str:
    """The file system ``path`` is on (findmnt), for the table."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=5,
        )
        return (out.stdout.split() or ["?"])[0]  # stacked mounts: the top one
    return "?"


def grant_table(rows: list[GrantRow], args: argparse.Namespace) -> str:
    head = (
        f"{'store':<11}{'procs':>6}{'ledger holds':>14}{'grant µs p50':>13}{'p99':>8}"
        f"{'answer p50':>11}{'both p50':>10}{'p99':>8}{'x none':>8}{'grants/s':>10}"
        f"{'CPU µs client':>14}{'server':>8}{'full GCs/1k':>12}"
    )
    lines = [
        f"\nper grant: a Throttle on the store, {args.batch} grants a process a round from a "
        f"store reset to the grants held, {args.grants} grants a case; µs a grant "
        "(acquire), its answer (observe + drain) and both; CPU µs a grant",
        head,
        "-" * len(head),
    ]
    baseline = {r.procs: _pct(r.total_us, 0.5) for r in rows if r.store == "none"}
    for r in rows:
        held = "-" if r.occupancy is None else f"{r.occupancy}-{r.grown_to}"
        both = _pct(r.total_us, 0.5)
        server = r.server_cpu_s / r.grants * 1e6 if r.store.startswith("redis") else None
        lines.append(
            f"{r.store:<11}{r.procs:>6}{held:>14}{_pct(r.grant_us, 0.5):>13.1f}"
            f"{_pct(r.grant_us, 0.99):>8.1f}{_pct(r.answer_us, 0.5):>11.1f}{both:>10.1f}"
            f"{_pct(r.total_us, 0.99):>8.1f}{both / baseline.get(r.procs, both):>8.1f}"
            f"{r.grants / r.busy_s:>10.0f}{r.client_cpu_s / r.grants * 1e6:>14.1f}"
            f"{'-' if server is None else f'{server:.1f}':>8}"
            f"{r.full_gcs / r.grants * 1000:>12.1f}"
        )
    lines.append("stores: " + "; ".join(sorted({f"{r.store}: {r.where}" for r in rows})))
    lines.append(
        "ledger holds: the grants in the store during a round (reset to the first figure, "
        "grown by every grant of the round); grants/s: all processes together over the "
        "round's span; x none: 'both p50' over the in-process throttle's with as many "
        "processes; full GCs/1k: the clients' generation-2 collections a thousand grants "
        "(format 1 ledgers made a Python list a grant at every read; format 2 keeps four columns)"
    )
    return "\n".join(lines)


# -- together: real runs on one budget ---------------------------------------------------------


@dataclass(slots=True)
class RunRow:
    store: str
    procs: int
    offboarded: int = 0
    twice: int = 0
    calls: int = 0
    throttled: int = 0
    max_minute: int = 0
    max_hour: int = 0
    completion_s: float = 0.0
    ideal_s: float = 0.0
    wall_s: float = 0.0
    exits: list[int] = field(default_factory=list)
    #: Attempt to result across the processes' journals: median of medians, worst p99, max.
    trips_ms: tuple[float, float, float] | None = None
    emulator_cpu_s: float = 0.0
    clients_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    detail: str = ""


async def _run_case(
    store: str, procs: int, case: Case, args: argparse.Namespace, redis: Redis | None
) -> RunRow:
    config = EmulatorConfig(
        time_scale=case.scale,
        action_start_s=2.0 * case.scale,
        action_complete_s=10.0 * case.scale,
        fleet=FleetSpec(size=case.machines, seed=7, os_mix={"Windows10": 1.0}),
        faults=Faults(jitter_s=args.jitter * 60.0 * case.scale),
        seed=7,
    )
    emulator = Emulator(config)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{store}-{procs}-", dir=args.workdir))
    state_home = Path(tempfile.mkdtemp(prefix="bench-budget-state-", dir=args.disk_dir))
    machines = list(emulator.machines)
    minute, hour = case.limits
    row = RunRow(store, procs, ideal_s=ideal_duration_s(case.machines, case.limits))
    if redis is not None:
        await redis.flush()
    async with EmulatorServer(emulator, ca_path=run_dir / "ca.pem") as server:
        env = _base_env() | {
            "AZURE_TENANT_ID": config.tenant_id,
            "AZURE_CLIENT_ID": DEFAULT_CLIENT_ID,
            "AZURE_CLIENT_SECRET": DEFAULT_CLIENT_SECRET,
            "AZURE_AUTHORITY_HOST": server.base_url,
            "BULKOFFBOARD_API_URL": server.base_url,
            "BULKOFFBOARD_CA_BUNDLE": str(run_dir / "ca.pem"),
            "PYTHONPATH": str(ROOT),
            "XDG_STATE_HOME": str(state_home),
        }
        budget = {"ledger": [], "none": ["--budget", "none"]}.get(store)
        if budget is None:
            budget = ["--budget", redis.tcp_url if redis is not None else "redis-missing"]
        journals = []
        argvs = []
        for n in range(procs):
            ids = run_dir / f"ids-{n}.txt"
            ids.write_text("\n".join(machines[n::procs]) + "\n", encoding="utf-8")
            journals.append(run_dir / f"journal-{n}.jsonl")
            argvs.append(
                [
                    "-m",
                    "bulkoffboard",
                    "run",
                    "--ids",
                    str(ids),
                    "--journal",
                    str(journals[-1]),
                    "--comment",
                    "budget benchmark",
                    "--workers",
                    str(WORKERS),
                    "--limit",
                    f"{minute.calls}/{minute.period_s:g}",
                    "--limit",
                    f"{hour.calls}/{hour.period_s:g}",
                    "--margin",
                    repr(REAL_MARGIN_S * case.scale),
                    *budget,
                ]
            )
        redis_before = await redis.cpu_s() if redis is not None else 0.0
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        emulator_before = time.process_time()
        started = time.perf_counter()
        running = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=str(ROOT),
            )
            for argv in argvs
        ]
        timeout = args.timeout_factor * row.ideal_s + 60
        talks = [asyncio.ensure_future(p.communicate()) for p in running]
        _, late = await asyncio.wait(talks, timeout=timeout)
        if late:
            for proc in running:
                if proc.returncode is None:
                    proc.kill()
            row.detail = f"stopped after {timeout:.0f} s (the timeout)\n"
        outputs = [await talk for talk in talks]
        row.wall_s = time.perf_counter() - started
        row.emulator_cpu_s = time.process_time() - emulator_before
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        row.clients_cpu_s = (after.ru_utime + after.ru_stime) - (
            children_before.ru_utime + children_before.ru_stime
        )
        if redis is not None and store == "redis":
            row.redis_cpu_s = await redis.cpu_s() - redis_before
    row.exits = [p.returncode if p.returncode is not None else -1 for p in running]
    truth = emulator.truth
    per_machine = Counter(a.machine_id for a in emulator.actions.values())
    first = min(truth.offboard_arrivals) if truth.offboard_arrivals else 0.0
    row.offboarded = len(per_machine)
    row.twice = sum(1 for n in per_machine.values() if n > 1)
    row.calls = truth.calls["offboard"]
    row.throttled = truth.throttled["offboard"]
    row.max_minute = truth.max_in_window.get(f"offboard {minute.period_s:g}", 0)
    row.max_hour = truth.max_in_window.get(f"offboard {hour.period_s:g}", 0)
    row.completion_s = max((a.created for a in emulator.actions.values()), default=first) - first
    trips = [t for t in (_round_trips(j, REAL_MARGIN_S * case.scale) for j in journals) if t]
    if trips:
        medians = sorted(t[0] for t in trips)
        row.trips_ms = (
            medians[len(medians) // 2] * 1000,
            max(t[1] for t in trips) * 1000,
            max(t[2] for t in trips) * 1000,
        )
    if any(row.exits) or row.offboarded != case.machines:
        row.detail += "\n".join(
            f"process {n} exit {code}: "
            + (out + err).decode(errors="replace").strip()[-600:].replace("\n", "\n    ")
            for n, (code, (out, err)) in enumerate(zip(row.exits, outputs, strict=True))
            if code
        )
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(state_home, ignore_errors=True)
    return row


async def bench_runs(args: argparse.Namespace, redis: Redis | None) -> list[RunRow]:
    case = Case(args.machines, args.scale)
    rows = []
    for store in args.stores:
        if store == "redis" and redis is None:
            print("  runs: redis skipped (redis-server is not installed)", flush=True)
            continue
        for procs in args.procs:
            print(f"  runs: {store}, {procs} process(es) ...", flush=True)
            row = await _run_case(store, procs, case, args, redis)
            rows.append(row)
            if row.detail:
                print(f"  {store} x {procs} did not finish cleanly: {row.detail}", flush=True)
    return rows


def run_table(rows: list[RunRow], args: argparse.Namespace) -> str:
    case = Case(args.machines, args.scale)
    minute, hour = case.limits
    head = (
        f"{'budget':<8}{'procs':>6}{'offboarded':>11}{'twice':>6}{'calls':>7}{'429s':>6}"
        f"{'max/min':>8}{'max/hour':>9}{'completion s':>13}{'ideal s':>9}{'/ideal':>8}"
        f"{'rt p50 ms':>10}{'p99':>7}{'max':>7}{'CPU emu':>8}{'clients':>8}{'redis':>6}"
        f"{'wall s':>7}{'exit':>6}"
    )
    lines = [
        f"\ntogether: {case.machines} machines split over N processes on one app, time scale "
        f"{case.scale:g} (windows {minute.calls}/{minute.period_s:g} s and "
        f"{hour.calls}/{hour.period_s:g} s, margin {REAL_MARGIN_S * case.scale:g} s, jitter "
        f"{args.jitter * 60.0 * case.scale * 1000:g} ms); emulator truth",
        head,
        "-" * len(head),
    ]
    for r in rows:
        trips = r.trips_ms or (float("nan"),) * 3
        redis_cpu = f"{r.redis_cpu_s:>6.1f}" if r.store == "redis" else f"{'-':>6}"
        exits = ",".join(str(c) for c in sorted(set(r.exits)))
        lines.append(
            f"{r.store:<8}{r.procs:>6}{r.offboarded:>11}{r.twice:>6}{r.calls:>7}{r.throttled:>6}"
            f"{r.max_minute:>8}{r.max_hour:>9}{r.completion_s:>13.2f}{r.ideal_s:>9.2f}"
            f"{r.completion_s / r.ideal_s:>8.4f}{trips[0]:>10.1f}{trips[1]:>7.1f}{trips[2]:>7.1f}"
            f"{r.emulator_cpu_s:>8.1f}{r.clients_cpu_s:>8.1f}{redis_cpu}{r.wall_s:>7.1f}"
            f"{exits:>6}"
        )
    lines.append(
        f"limits {minute.calls} a minute and {hour.calls} an hour (max/min, max/hour above them: "
        "the windows were overfilled); rt: attempt to result in the journals (median of the "
        "processes' medians, worst p99, max); CPU s of the emulator (this process), of all "
        f"clients and of redis-server over the run, on {os.cpu_count()} CPUs"
    )
    return "\n".join(lines)


# -- the whole -----------------------------------------------------------------------------------


def _header(args: argparse.Namespace) -> str:
    load = os.getloadavg()
    case = Case(args.machines, args.scale)
    ideal = ideal_duration_s(case.machines, case.limits)
    return "\n".join(
        [
            "bench_budget: the shared rate budget, per grant and for N processes on one app",
            f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, load average {load[0]:.2f} {load[1]:.2f} "
            f"{load[2]:.2f} at start",
            f"settings: parts {', '.join(args.only)}; grants: {args.grants} a case, batches of "
            f"{args.batch}, held {','.join(map(str, args.occupancy))}, processes "
            f"{','.join(map(str, args.contend))}; runs: {args.machines} machines at time scale "
            f"{args.scale:g} (ideal {ideal:.2f} s = {ideal / args.scale / 3600:.2f} h of API "
            f"time), processes {','.join(map(str, args.procs))}, budgets "
            f"{','.join(args.stores)}; journals in {args.workdir}, ledgers and state in "
            f"{args.disk_dir}",
        ]
    )


async def bench(args: argparse.Namespace) -> int:
    print(_header(args), flush=True)
    started = time.perf_counter()
    failed = 0
    with redis_server(args.workdir) as redis:
        if redis is None:
            print("redis-server is not installed: the Redis rows are skipped", flush=True)
        if "grants" in args.only:
            print(grant_table(await bench_grants(args, redis), args), flush=True)
        if "runs" in args.only:
            rows = await bench_runs(args, redis)
            failed = sum(1 for r in rows if r.detail and r.store != "none")
            print(run_table(rows, args), flush=True)
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _names(choices: Sequence[str]) -> Any:
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",") if part.strip()]
        for name in names:
            if name not in choices:
                raise argparse.ArgumentTypeError(f"{name!r}: choose from {', '.join(choices)}")
        return names

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (about 2 minutes)")
    parser.add_argument(
        "--only", type=_names(("grants", "runs")), default=["grants", "runs"], help="parts"
    )
    parser.add_argument("--scale", type=float, default=0.01, help="time scale of the runs")
    parser.add_argument("--machines", type=int, help="machines of the runs (default 1800)")
    parser.add_argument("--procs", type=_ints, default=[1, 3, 8], help="runs: processes")
    parser.add_argument(
        "--stores",
        type=_names(RUN_STORES),
        default=list(RUN_STORES),
        help="runs: budgets, of ledger, redis, none",
    )
    parser.add_argument("--grants", type=int, help="grants a per-grant case (default 4000)")
    parser.add_argument("--batch", type=int, default=50, help="grants a process a round")
    parser.add_argument(
        "--occupancy", type=_ints, default=[0, 1500], help="grants held as a round starts"
    )
    parser.add_argument("--contend", type=_ints, default=[1, 4], help="grants: processes")
    parser.add_argument(
        "--jitter", type=float, default=0.01, help="arrival jitter, fraction of a minute"
    )
    parser.add_argument(
        "--disk-dir",
        type=Path,
        default=Path("/var/tmp"),  # noqa: S108 - a disk-backed folder on purpose, not tmpfs
        help="a folder on the disk for the disk ledger and the runs' state (default /var/tmp)",
    )
    parser.add_argument("--journal-dir", help="where the runs' journals go (default /dev/shm)")
    parser.add_argument(
        "--timeout-factor", type=float, default=6.0, help="a run stops after this x ideal + 60 s"
    )
    parser.add_argument("--grant-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.grant_child:
        return grant_child(args.grant_child)
    if args.machines is None:
        args.machines = 600 if args.quick else 1800
    if args.grants is None:
        args.grants = 1000 if args.quick else 4000
    if ideal_duration_s(args.machines, Case(args.machines, args.scale).limits) <= 0:
        parser.error("--machines: more than 100, or they all fit the first minute window")
    args.workdir = make_workdir(args.journal_dir, "bench-budget-")
    try:
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(bench(args))
        return 130
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
