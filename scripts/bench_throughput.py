#!/usr/bin/env python3
"""Throughput against the limits: bulkoffboard and two naive peers on the time-scaled emulator.

For each case (machines and time scale) and each peer, a fresh emulator serves loopback HTTPS
in this process, with strict per-client sliding windows (100/60 s and 1,500/3,600 s, scaled)
counted on arrival and a small arrival jitter (``Faults(jitter_s=...)``, 1% of the scaled minute
window by default). The peer runs as its own process (a second core), so it shares no event
loop with the emulator:

- ``bulkoffboard``: ``python -m bulkoffboard run`` with ``--limit 100/<60*scale>`` and
  ``--limit 1500/<3600*scale>``, 8 workers, its journal on tmpfs (see ``--journal-dir``), and
  ``--margin <1 s*scale>``: every time constant of its configuration scaled like the windows,
  so the run is the real one, faster (the measured round trips, which also widen the margin,
  are not scaled: they stay real loopback times, a hundred times longer relative to the
  windows than they would be against the real API).
- ``bulkoffboard-1%``: the same with the default margin floor (1% of a window, at most 1 s),
  which does not scale: at these scales it is 1% of the hour window instead of 0.03%.
- ``sequential``: what public scripts do: one POST after the other with a fixed 500 ms sleep
  (scaled by the same time scale); a 429 waits its Retry-After and tries again.
- ``aiolimiter``: ``AsyncLimiter(100, 60*scale)`` stacked with ``AsyncLimiter(1500,
  3600*scale)``, 8 workers; a 429 waits its Retry-After and tries again.

The naive peers use plain aiohttp POSTs with a token the emulator issued
(``Emulator.issue_token``). Every figure in the table is the emulator's truth:

- ``completion``: from the first offboard POST that arrived to the last action created;
- ``ideal``: :func:`bulkoffboard.throttle.ideal_duration_s` for the scaled limits (the last
  grant of the greedy schedule that respects both windows exactly, from an empty log);
- ``floor``: the same with each window widened by the peer's fixed jitter margin floor
  (``--margin`` for ``bulkoffboard``, else ``Limit.default_margin_s``: 1% of the window, at most
  1 s; under a time scale below ~0.28 that cap never applies, so the hour window's margin alone
  costs 1% here, against 0.03% (1 s an hour) at real scale);
- ``429s``: offboard calls the emulator answered 429; ``max/min`` and ``max/hour``: the most
  arrivals it saw in any scaled minute and hour window (limits 100 and 1,500);
- ``API time``: the completion time unscaled (what it would take against the real API).

Reproduce (about 10 minutes for both default cases and the default peers on a 2-core machine;
``bulkoffboard-1%`` is opt-in, about 3 minutes more)::

    .venv/bin/python scripts/bench_throughput.py
    .venv/bin/python scripts/bench_throughput.py \
        --peers bulkoffboard,bulkoffboard-1%,sequential,aiolimiter
    .venv/bin/python scripts/bench_throughput.py --case 3000:0.01 --peers bulkoffboard
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shutil
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import aiohttp
import orjson

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
#: Journals go to tmpfs by default (see --journal-dir): on purpose, not a shared-temp shortcut.
TMPFS = Path("/dev/shm")  # noqa: S108
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bulkoffboard.emulator import (  # noqa: E402
    Emulator,
    EmulatorConfig,
    EmulatorServer,
    Faults,
    FleetSpec,
)
from bulkoffboard.emulator.app import (  # noqa: E402
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
)
from bulkoffboard.throttle import Limit, ideal_duration_s  # noqa: E402

PEERS = ("bulkoffboard", "bulkoffboard-1%", "sequential", "aiolimiter")
DEFAULT_PEERS = ("bulkoffboard", "sequential", "aiolimiter")
#: The peers that are bulkoffboard itself (the others are the naive scripts).
OURS = PEERS[:2]
#: bulkoffboard's jitter margin floor at real scale for the hour window (1 s; 0.6 s for the
#: minute): ``bulkoffboard`` runs with it scaled like the windows (``--margin``).
REAL_MARGIN_S = 1.0
DEFAULT_CASES = ("3000:0.01", "20000:0.002")
WORKERS = 8
NAIVE_SLEEP_S = 0.5


@dataclass(frozen=True, slots=True)
class Case:
    machines: int
    scale: float

    @property
    def limits(self) -> tuple[Limit, Limit]:
        return Limit(100, 60.0 * self.scale), Limit(1500, 3600.0 * self.scale)


@dataclass(slots=True)
class Row:
    peer: str
    offboarded: int
    twice: int
    calls: int
    throttled: int
    max_minute: int
    max_hour: int
    completion_s: float
    ideal_s: float
    floor_s: float
    wall_s: float
    exit_code: int
    #: Calls in the last hour block (k), when the k-th action was created, and the mean step
    #: from one hour block to the next: completion = ramp + blocks x step.
    ramp_calls: int = 0
    ramp_s: float = 0.0
    step_s: float = 0.0
    #: bulkoffboard only, from its journal: attempt-to-result seconds (p50, p99, max) and how
    #: many exceeded the hour window's margin floor.
    round_trips: tuple[float, float, float, int] | None = None


# -- the naive peers (run in a child process) -------------------------------------------------


async def _post(
    session: aiohttp.ClientSession, api: str, token: str, machine_id: str, ctx: ssl.SSLContext
) -> tuple[int, float]:
    """One offboard POST; returns (status, Retry-After seconds or 0)."""
    async with session.post(
        f"{api}/api/machines/{machine_id}/offboard",
        json={"Comment": "naive peer benchmark"},
        headers={"Authorization": f"Bearer {token}"},
        ssl=ctx,
    ) as resp:
        await resp.read()
        return resp.status, float(resp.headers.get("Retry-After", "0") or 0)


async def _sequential(
    api: str, token: str, ids: list[str], ctx: ssl.SSLContext, scale: float
) -> Counter[int]:
    statuses: Counter[int] = Counter()
    async with aiohttp.ClientSession() as session:
        for machine_id in ids:
            while True:
                status, retry_after = await _post(session, api, token, machine_id, ctx)
                statuses[status] += 1
                if status != 429:
                    break
                await asyncio.sleep(retry_after)
            await asyncio.sleep(NAIVE_SLEEP_S * scale)
    return statuses


async def _aiolimiter(
    api: str, token: str, ids: list[str], ctx: ssl.SSLContext, scale: float
) -> Counter[int]:
    from aiolimiter import AsyncLimiter

    minute = AsyncLimiter(100, 60.0 * scale)
    hour = AsyncLimiter(1500, 3600.0 * scale)
    statuses: Counter[int] = Counter()
    todo = list(reversed(ids))
    connector = aiohttp.TCPConnector(limit=WORKERS + 4)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while todo:
                machine_id = todo.pop()
                while True:
                    async with minute, hour:
                        status, retry_after = await _post(session, api, token, machine_id, ctx)
                    statuses[status] += 1
                    if status != 429:
                        break
                    await asyncio.sleep(retry_after)

        await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return statuses


def peer_child(args: argparse.Namespace) -> int:
    """``--peer-child NAME``: run one naive peer and print its status counts as JSON."""
    token = os.environ["BENCH_TOKEN"]
    ctx = ssl.create_default_context(cafile=args.ca)
    ids = Path(args.ids).read_text(encoding="utf-8").split()
    run = _sequential if args.peer_child == "sequential" else _aiolimiter
    statuses = asyncio.run(run(args.api, token, ids, ctx, args.scale))
    sys.stdout.write(orjson.dumps({str(k): v for k, v in statuses.items()}).decode() + "\n")
    return 0


# -- the parent: emulator, peers, truth -------------------------------------------------------


def _base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep}


async def _run_peer(
    peer: str, case: Case, workdir: Path, jitter_fraction: float
) -> tuple[Row, str]:
    config = EmulatorConfig(
        time_scale=case.scale,
        action_start_s=2.0 * case.scale,
        action_complete_s=10.0 * case.scale,
        fleet=FleetSpec(size=case.machines, seed=5, os_mix={"Windows10": 1.0}),
        faults=Faults(jitter_s=jitter_fraction * 60.0 * case.scale),
        seed=5,
    )
    emulator = Emulator(config)
    run_dir = Path(tempfile.mkdtemp(prefix=f"{peer}-", dir=workdir))
    ids_path = run_dir / "ids.txt"
    ids_path.write_text("\n".join(emulator.machines) + "\n", encoding="utf-8")
    ca_path = run_dir / "ca.pem"
    minute, hour = case.limits
    async with EmulatorServer(emulator, ca_path=ca_path) as server:
        env = _base_env()
        if peer in OURS:
            env |= {
                "AZURE_TENANT_ID": config.tenant_id,
                "AZURE_CLIENT_ID": DEFAULT_CLIENT_ID,
                "AZURE_CLIENT_SECRET": DEFAULT_CLIENT_SECRET,
                "AZURE_AUTHORITY_HOST": server.base_url,
                "BULKOFFBOARD_API_URL": server.base_url,
                "BULKOFFBOARD_CA_BUNDLE": str(ca_path),
                "PYTHONPATH": str(ROOT),
            }
            argv = [
                "-m",
                "bulkoffboard",
                "run",
                "--ids",
                str(ids_path),
                "--journal",
                str(run_dir / "journal.jsonl"),
                "--comment",
                "throughput benchmark",
                "--workers",
                str(WORKERS),
                "--limit",
                f"{minute.calls}/{minute.period_s:g}",
                "--limit",
                f"{hour.calls}/{hour.period_s:g}",
            ]
            if peer == "bulkoffboard":
                argv += ["--margin", repr(REAL_MARGIN_S * case.scale)]
        else:
            token, _ = emulator.issue_token(config.apps[0], config.audience)
            env["BENCH_TOKEN"] = token
            argv = [
                str(SCRIPT),
                "--peer-child",
                peer,
                "--api",
                server.base_url,
                "--ca",
                str(ca_path),
                "--ids",
                str(ids_path),
                "--scale",
                repr(case.scale),
            ]
        started = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=str(ROOT),
        )
        out, err = await proc.communicate()
        wall = time.perf_counter() - started
    truth = emulator.truth
    per_machine = Counter(a.machine_id for a in emulator.actions.values())
    first = min(truth.offboard_arrivals) if truth.offboard_arrivals else 0.0
    last = max((a.created for a in emulator.actions.values()), default=first)
    floor_margin = _floor_margin(peer, case)
    widened = [Limit(lim.calls, lim.period_s + floor_margin(lim)) for lim in case.limits]
    blocks = (case.machines - 1) // hour.calls
    ramp_calls = case.machines - hour.calls * blocks
    created = sorted(a.created for a in emulator.actions.values())
    ramp_s = created[ramp_calls - 1] - first if len(created) >= ramp_calls else 0.0
    row = Row(
        peer=peer,
        offboarded=len(per_machine),
        twice=sum(1 for n in per_machine.values() if n > 1),
        calls=truth.calls["offboard"],
        throttled=truth.throttled["offboard"],
        max_minute=truth.max_in_window.get(f"offboard {minute.period_s:g}", 0),
        max_hour=truth.max_in_window.get(f"offboard {hour.period_s:g}", 0),
        completion_s=last - first,
        ideal_s=ideal_duration_s(case.machines, case.limits),
        floor_s=ideal_duration_s(case.machines, widened),
        wall_s=wall,
        exit_code=proc.returncode if proc.returncode is not None else -1,
        ramp_calls=ramp_calls,
        ramp_s=ramp_s,
        step_s=(last - first - ramp_s) / blocks if blocks else 0.0,
    )
    if peer in OURS:
        row.round_trips = _round_trips(run_dir / "journal.jsonl", floor_margin(hour))
    detail = (out.decode(errors="replace") + err.decode(errors="replace")).strip()
    shutil.rmtree(run_dir, ignore_errors=True)
    return row, detail


def _round_trips(journal: Path, margin_s: float) -> tuple[float, float, float, int] | None:
    """From the journal: seconds from each attempt line to its machine's result line."""
    if not journal.exists():
        return None
    sent: dict[str, datetime] = {}
    trips = []
    for line in journal.read_bytes().splitlines():
        record = orjson.loads(line)
        kind, machine = record.get("type"), record.get("machine_id")
        if kind == "attempt":
            sent[machine] = datetime.fromisoformat(record["at"])
        elif kind == "result" and machine in sent:
            trips.append((datetime.fromisoformat(record["at"]) - sent.pop(machine)).total_seconds())
    if not trips:
        return None
    trips.sort()
    over = sum(1 for t in trips if t > margin_s)
    return trips[len(trips) // 2], trips[int(len(trips) * 0.99)], trips[-1], over


def _floor_margin(peer: str, case: Case) -> Callable[[Limit], float]:
    """The fixed jitter margin ``peer`` widens each window by (for the ``floor`` column)."""
    if peer == "bulkoffboard":
        return lambda limit: REAL_MARGIN_S * case.scale
    return lambda limit: limit.default_margin_s


def _header(args: argparse.Namespace, cases: list[Case], workdir: Path) -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    lines = [
        "bench_throughput: bulkoffboard vs naive peers against the time-scaled emulator",
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start",
        f"settings: limits 100/60 s and 1500/3600 s scaled; arrival jitter "
        f"{args.jitter:g} x the scaled minute window; {WORKERS} workers; naive sleep "
        f"{NAIVE_SLEEP_S * 1000:g} ms scaled; peers run as child processes; journal dir {workdir}",
        "cases: "
        + ", ".join(
            f"{c.machines} machines at time scale {c.scale:g} (minute {c.limits[0].period_s:g} s, "
            f"hour {c.limits[1].period_s:g} s, ideal {ideal_duration_s(c.machines, c.limits):.1f} s"
            f" = {ideal_duration_s(c.machines, c.limits) / c.scale / 3600:.2f} h of API time)"
            for c in cases
        ),
    ]
    return "\n".join(lines)


def _table(case: Case, rows: list[Row]) -> str:
    head = (
        f"{'peer':<13}{'offboarded':>11}{'twice':>6}{'calls':>7}{'429s':>6}{'max/min':>8}"
        f"{'max/hour':>9}{'completion s':>13}{'ideal s':>9}{'/ideal':>8}{'/floor':>8}"
        f"{'API time':>10}{'wall s':>8}{'exit':>5}"
    )
    lines = [
        f"\n{case.machines} machines, time scale {case.scale:g}",
        head,
        "-" * len(head),
    ]
    minute, hour = case.limits
    blocks = (case.machines - 1) // hour.calls
    notes = []
    for r in rows:
        api_hours = r.completion_s / case.scale / 3600
        notes.append(
            f"  {r.peer}: completion = ramp {r.ramp_s:.3f} s to the first {r.ramp_calls} calls "
            f"(ideal {ideal_duration_s(r.ramp_calls, case.limits):.3f} s)"
            + (
                f" + {blocks} hour-window steps of {r.step_s:.4f} s (the window is "
                f"{hour.period_s:g} s; margin floor {_floor_margin(r.peer, case)(hour):g} s)"
                if blocks
                else ""
            )
            + (
                f"; attempt-to-result p50 {r.round_trips[0] * 1000:.1f} ms, p99 "
                f"{r.round_trips[1] * 1000:.1f} ms, max {r.round_trips[2] * 1000:.1f} ms "
                f"({r.round_trips[3]} over that floor, so the margin followed them)"
                if r.round_trips
                else ""
            )
        )
        lines.append(
            f"{r.peer:<13}{r.offboarded:>11}{r.twice:>6}{r.calls:>7}{r.throttled:>6}"
            f"{r.max_minute:>8}{r.max_hour:>9}{r.completion_s:>13.2f}{r.ideal_s:>9.2f}"
            f"{r.completion_s / r.ideal_s:>8.4f}{r.completion_s / r.floor_s:>8.4f}"
            f"{api_hours:>8.2f} h{r.wall_s:>8.1f}{r.exit_code:>5}"
        )
    real = (Limit(minute.calls, 60.0), Limit(hour.calls, 3600.0))
    real_floor = ideal_duration_s(
        case.machines, [Limit(x.calls, x.period_s + x.default_margin_s) for x in real]
    ) / ideal_duration_s(case.machines, real)
    scaled = [Limit(x.calls, x.period_s + x.default_margin_s) for x in case.limits]
    lines.append(
        "the default margin floor (1% of a window, at most 1 s) alone costs "
        f"{ideal_duration_s(case.machines, scaled) / rows[0].ideal_s:.4f} x ideal at this scale "
        f"and {real_floor:.4f} at real scale; the floor column uses each peer's own"
    )
    return "\n".join([*lines, *notes])


async def bench(args: argparse.Namespace) -> int:
    cases = []
    for text in args.case or DEFAULT_CASES:
        machines, _, scale = text.partition(":")
        case = Case(int(machines), float(scale))
        if ideal_duration_s(case.machines, case.limits) <= 0:
            raise SystemExit(
                f"--case {text}: {case.machines} machines all fit the first minute window, so "
                "the ideal time is 0: use more than 100"
            )
        cases.append(case)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for peer in peers:
        if peer not in PEERS:
            raise SystemExit(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
    workdir: Path = args.workdir
    print(_header(args, cases, workdir), flush=True)
    started = time.perf_counter()
    failures = 0
    try:
        for case in cases:
            rows = []
            for peer in peers:
                print(f"  running {peer} on {case.machines} machines ...", flush=True)
                row, detail = await _run_peer(peer, case, workdir, args.jitter)
                rows.append(row)
                if row.exit_code != 0 or row.offboarded != case.machines:
                    failures += 1
                    print(f"  {peer} did not finish cleanly:\n{detail[-2000:]}", flush=True)
            print(_table(case, rows), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


def make_workdir(journal_dir: str | None, prefix: str) -> Path:
    """A fresh folder for the run's files: under ``journal_dir``, else tmpfs, else the temp dir."""
    base = Path(journal_dir) if journal_dir else TMPFS if TMPFS.is_dir() else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--case",
        action="append",
        metavar="MACHINES:SCALE",
        help=f"repeatable; default {' and '.join(DEFAULT_CASES)}",
    )
    listed = ", ".join(PEERS).replace("%", "%%")  # argparse formats help with %
    parser.add_argument(
        "--peers",
        default=",".join(DEFAULT_PEERS),
        help=f"comma-separated peers to run, of {listed} (default: all but bulkoffboard-1%%)",
    )
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.01,
        help="arrival jitter as a fraction of the scaled minute window (default 0.01)",
    )
    parser.add_argument(
        "--journal-dir", help="where bulkoffboard's journal goes (default /dev/shm: tmpfs)"
    )
    parser.add_argument("--peer-child", choices=PEERS[2:], help=argparse.SUPPRESS)
    parser.add_argument("--api", help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_child:
        return peer_child(args)
    args.workdir = make_workdir(args.journal_dir, "bench-throughput-")
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(bench(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
