#!/usr/bin/env python3
"""Overhead: peak memory and CPU time of runs over 1,000,000 ids, and journal replay time.

What is measured (every run is ``bulkoffboard.cli.main`` in a child process of its own, so its
peak RSS (``VmHWM``; see :func:`peak_rss_mib` for why not ``ru_maxrss``) and CPU time are its
alone; the emulator serves loopback HTTPS from this process with its limits lifted, and the run
lifts bulkoffboard's with ``--limit 1000000/1``; the default preflight reads the emulator's
inventory of N machines first):

- ``baseline``: N unique valid ids, N real offboard calls (the fixed cost plus the per-call
  cost);
- ``dups``: 1,000,000 lines: the same N ids (real calls) and 1,000,000 - N duplicate lines;
- ``invalid``: 1,000,000 lines: N ids (real calls) and 1,000,000 - N invalid lines (each one an
  ``invalid_id`` result in the journal);
- ``resume``: 1,000,000 unique valid ids, of which 1,000,000 - N were already settled by an
  earlier session (a synthetic journal of 2 x (1,000,000 - N) + 3 lines with the real record
  shapes: header, session, plan, attempt/result pairs), resumed: N real calls;
- ``replay``: :func:`bulkoffboard.journal.replay_file` on a synthetic 1,000,000-line journal
  (header, session, plan, then attempt/result pairs), best of 3, in a child process.

1,000,000 real HTTP calls would take about 40 minutes here (the client and the emulator are both
Python, about 400 calls a second over loopback TLS), so the real calls are N (default 5,000) and
the rest of the million is lines that cost no call; the table also gives a projection for
1,000,000 real calls from the measured parts (labelled as such). Each configuration is then run
again on inputs ten times smaller, once under ``tracemalloc`` (a snapshot at the end of the run,
with the run's dedup sets kept alive until then) and once under ``cProfile``, to show where the
memory and the CPU time go (those runs are slower; their figures are not the table's).

The journal lives on tmpfs by default (``--journal-dir``): every result is fsynced, and on this
VM's disk an fsync costs milliseconds (measured and printed), which would make the 990,000
invalid-id lines alone take most of an hour.

The cost of the durable attempt (``durability``): the attempt line of every offboard call is
fsynced before its request leaves (a group commit: the workers granted in one turn of the loop
share one fsync), so a power cut cannot lose the record of a request that reached MDE. The same
run of ``--durability-calls`` real calls is made four times: with the durable attempt (the
product) and without it (the child replaces ``Journal.append_durable`` with a plain append, as
before issue 12), each with its journal on tmpfs and on the disk-backed temp directory. It
prints calls per second (real calls over the run's wall time less start-up), CPU seconds, and
fsyncs per call.

Reproduce (about 5 minutes)::

    .venv/bin/python scripts/bench_overhead.py
    .venv/bin/python scripts/bench_overhead.py --calls 20000 --no-tracemalloc
    .venv/bin/python scripts/bench_overhead.py --only durability    # about 1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

SCRIPT = Path(__file__).resolve()
ROOT = SCRIPT.parent.parent
#: Journals go to tmpfs by default (see --journal-dir): on purpose, not a shared-temp shortcut.
TMPFS = Path("/dev/shm")  # noqa: S108
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bulkoffboard import __version__  # noqa: E402
from bulkoffboard.emulator import Emulator, EmulatorConfig, EmulatorServer, FleetSpec  # noqa: E402
from bulkoffboard.emulator.app import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET  # noqa: E402
from bulkoffboard.journal import FORMAT_VERSION, TOOL, Journal, iso, replay_file  # noqa: E402

MILLION = 1_000_000
#: The tracemalloc runs use inputs this many times smaller (their snapshots are slow).
TRACED_FRACTION = 10
LIFTED = ["--limit", "1000000/1"]
GROUPS = ("offboard", "machineactions", "machines", "advancedqueries")


# -- child side ---------------------------------------------------------------------------------


class _EndSnapshot:
    """Takes one tracemalloc snapshot at the end of the work, while its big structures are
    still alive: in ``Runner._finish`` (the replay, the journal's state) with every
    ``Deduplicator`` of the run kept alive until then (the producer's set is otherwise freed a
    few dozen machines before the end, so this is the peak within a queue's length), or after
    ``replay_file`` returned."""

    def __init__(self) -> None:
        self.snapshot: tracemalloc.Snapshot | None = None
        self._kept: list[Any] = []

    def hook_run(self) -> None:
        from bulkoffboard import runner, sources

        keep = self._kept
        dedup_init = sources.Deduplicator.__init__

        def init(obj: Any) -> None:
            dedup_init(obj)
            keep.append(obj)

        sources.Deduplicator.__init__ = init  # type: ignore[method-assign,assignment]
        finish = getattr(runner.Runner, "_finish", None)
        if finish is None:
            return

        def finishing(obj: Any) -> None:
            self.take()
            finish(obj)

        runner.Runner._finish = finishing  # type: ignore[method-assign,assignment]

    def take(self) -> None:
        self.snapshot = tracemalloc.take_snapshot()


def _count_fsyncs() -> list[int]:
    """Count this process's fsyncs (one entry each) from now on."""
    done: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        done.append(fd)

    os.fsync = fsync
    return done


def _attempts_not_durable() -> None:
    """The journal as before issue 12: the attempt line is written, not fsynced, before its
    request (only for the comparison; the product has no such switch)."""
    from bulkoffboard.journal import Journal

    async def append_durable(self: Journal, record: dict[str, Any]) -> int:
        return self.append(record)

    Journal.append_durable = append_durable  # type: ignore[method-assign]


def _profile_top(profiler: Any, count: int = 8) -> list[str]:
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(count)
    lines = [ln for ln in text.getvalue().splitlines() if ln.strip()]
    cut = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    shown = []
    for line in lines[cut : cut + count + 1]:
        clean = line
        for prefix in (str(ROOT) + "/", sys.prefix + "/lib/", sys.base_prefix + "/lib/"):
            clean = clean.replace(prefix, "")
        shown.append(clean)
    return shown


def _top(snapshot: tracemalloc.Snapshot | None, limit: int = 8) -> list[str]:
    if snapshot is None:
        return []
    snapshot = snapshot.filter_traces(
        [
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
        ]
    )
    out = []
    for stat in snapshot.statistics("lineno")[:limit]:
        frame = stat.traceback[0]
        name = frame.filename
        for prefix in (str(ROOT) + "/", sys.prefix + "/lib/", sys.base_prefix + "/lib/"):
            name = name.removeprefix(prefix)
        out.append(f"{stat.size / 2**20:8.1f} MiB {stat.count:>9} blocks  {name}:{frame.lineno}")
    return out


def peak_rss_mib() -> float:
    """This process's peak RSS: ``VmHWM``. Not ``ru_maxrss``: on Linux a child's ``ru_maxrss``
    keeps the high-water mark of the process it was forked from (the parent's pages count until
    ``exec``), so a child of a big parent reports the parent's size."""
    with Path("/proc/self/status").open(encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace, argv: list[str]) -> int:
    """Run one measured thing and write its figures as JSON to ``--result``.

    ``--traced``: under tracemalloc, with a snapshot at the end of the work; ``--profiled``:
    under cProfile. Either makes the run slower: their times are not the table's.
    """
    import cProfile

    end = _EndSnapshot() if args.traced else None
    profiler = cProfile.Profile() if args.profiled else None
    if end is not None:
        tracemalloc.start(1)
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if profiler is not None:
        profiler.enable()
    if args.child == "replay":
        times = []
        for _ in range(1 if args.traced or args.profiled else 3):
            t0 = time.perf_counter()
            replay = replay_file(Path(argv[0]))
            times.append(time.perf_counter() - t0)
            extra = {"lines": replay.lines, "machines": len(replay.machines)}
            if end is not None:
                end.take()
            del replay
        extra["times"] = times
        code = 0
    else:
        from bulkoffboard.cli import main

        fsyncs = _count_fsyncs()
        if args.no_attempt_fsync:
            _attempts_not_durable()
        extra["fsyncs"] = fsyncs
        if end is not None:
            end.hook_run()
        try:
            code = main(argv)
        except SystemExit as exc:  # --version
            code = int(exc.code or 0)
    if profiler is not None:
        profiler.disable()
        extra["profile"] = _profile_top(profiler)
    wall = time.perf_counter() - started
    if isinstance(extra.get("fsyncs"), list):
        extra["fsyncs"] = len(extra["fsyncs"])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result: dict[str, Any] = {
        "exit": code,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "maxrss_mib": peak_rss_mib(),
        **extra,
    }
    if end is not None:
        result["traced_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        result["top"] = _top(end.snapshot)
    Path(args.result).write_bytes(orjson.dumps(result))
    return 0


# -- data ---------------------------------------------------------------------------------------


def fake_id(n: int) -> str:
    return hashlib.sha1(f"bench-overhead-{n}".encode(), usedforsecurity=False).hexdigest()


def write_lines(path: Path, lines: list[str] | Any) -> None:
    with path.open("w", encoding="utf-8") as out:
        for line in lines:
            out.write(line)
            out.write("\n")


def header_for(source: Path, api_url: str, tenant: str) -> dict[str, Any]:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    return {
        "type": "header",
        "format": FORMAT_VERSION,
        "tool": TOOL,
        "tool_version": __version__,
        "run_id": str(uuid.uuid4()),
        "created_at": iso(datetime.now(UTC) - timedelta(days=1)),
        "source": {"kind": "file", "path": str(source), "format": "text", "sha256": digest},
        "comment": "overhead benchmark",
        "limits": [[1000000, 1.0]],
        "workers": 8,
        "api_url": api_url,
        "tenant_id": tenant,
        "client_id": DEFAULT_CLIENT_ID,
    }


def write_journal(path: Path, header: dict[str, Any], machine_ids: Any) -> int:
    """A journal with the real record shapes: header, session, plan, then attempt + result pairs
    for each machine (offboarded, a day ago). Returns the number of lines."""
    start = datetime.now(UTC) - timedelta(days=1)
    lines = 3
    with path.open("wb") as out:
        out.write(orjson.dumps(header) + b"\n")
        session = {
            "type": "session",
            "at": iso(start),
            "pid": 1,
            "command": "run",
            "tool_version": __version__,
        }
        out.write(orjson.dumps(session) + b"\n")
        # Every journal of `run` has its plan record before the first offboard call.
        plan = {"type": "plan", "at": iso(start), "would_offboard": 0, "skipped": {}}
        out.write(orjson.dumps(plan) + b"\n")
        for n, machine_id in enumerate(machine_ids):
            sent = start + timedelta(milliseconds=n)
            attempt = {"type": "attempt", "machine_id": machine_id, "attempt": 1, "at": iso(sent)}
            result = {
                "type": "result",
                "machine_id": machine_id,
                "outcome": "offboarded",
                "action_id": str(uuid.UUID(int=n + 1, version=4)),
                "action_status": "Pending",
                "http_status": None,
                "error_code": None,
                "message": None,
                "attempts": 1,
                "at": iso(sent + timedelta(milliseconds=250)),
            }
            out.write(orjson.dumps(attempt) + b"\n" + orjson.dumps(result) + b"\n")
            lines += 2
    return lines


def fsync_cost_ms(directory: Path, count: int = 300) -> float:
    """Mean milliseconds of one journal append with fsync in ``directory``."""
    path = directory / f"fsync-probe-{os.getpid()}.jsonl"
    journal = Journal.create(path, {"format": FORMAT_VERSION, "tool": TOOL})
    record = {"type": "result", "machine_id": fake_id(0), "outcome": "offboarded", "at": "x"}
    try:
        t0 = time.perf_counter()
        for _ in range(count):
            journal.append(record, sync=True)
        return (time.perf_counter() - t0) / count * 1000
    finally:
        journal.close()
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".lock").unlink(missing_ok=True)


# -- parent side --------------------------------------------------------------------------------


@dataclass(slots=True)
class Measured:
    name: str
    what: str
    figures: dict[str, Any]
    traced: dict[str, Any] | None = None
    profiled: dict[str, Any] | None = None


def _base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in keep}


async def _measure(
    kind: str,
    argv: list[str],
    env: dict[str, str],
    workdir: Path,
    *,
    mode: str = "plain",
    child_flags: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Run ``kind`` in a child; ``mode`` plain, traced (tracemalloc) or profiled (cProfile)."""
    result = workdir / f"result-{uuid.uuid4().hex}.json"
    cmd = [str(SCRIPT), "--child", kind, "--result", str(result), *child_flags]
    if mode != "plain":
        cmd.append(f"--{mode}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *cmd,
        "--",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=str(ROOT),
    )
    out, err = await proc.communicate()
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"{kind} {argv[:3]} failed: {out.decode()[-800:]}{err.decode()[-800:]}")
    figures: dict[str, Any] = orjson.loads(result.read_bytes())
    result.unlink()
    return figures


async def bench(args: argparse.Namespace) -> int:
    workdir: Path = args.workdir
    calls = args.calls
    load = os.getloadavg()
    print("bench_overhead: peak memory and CPU time over 1,000,000 ids; journal replay time")
    print(
        f"machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f} at start"
    )
    print(
        f"settings: {calls} real offboard calls per run (loopback HTTPS, emulator limits lifted, "
        f"--limit 1000000/1, 8 workers); journal dir {workdir}; each run in its own child "
        "process (peak RSS = VmHWM, CPU = utime + stime)",
        flush=True,
    )
    disk = Path(tempfile.gettempdir())
    print(
        f"fsync cost of one journal append: {fsync_cost_ms(disk):.2f} ms on {disk}, "
        f"{fsync_cost_ms(workdir):.3f} ms on {workdir}",
        flush=True,
    )
    started = time.perf_counter()
    limits = dict.fromkeys(GROUPS, ((10**9, 1.0),))
    emulator = Emulator(
        EmulatorConfig(limits=limits, fleet=FleetSpec(size=calls, seed=3, os_mix={"Windows10": 1}))
    )
    real = list(emulator.machines)

    def inputs(size: int, tag: str) -> dict[str, tuple[Path, list[str] | None]]:
        """The id files of each configuration for ``size`` lines (and the settled ids)."""
        made: dict[str, tuple[Path, list[str] | None]] = {}

        def make(name: str, lines: Any, settled: list[str] | None = None) -> None:
            path = workdir / f"{name}-{tag}.txt"
            write_lines(path, lines)
            made[name] = (path, settled)

        make("baseline", real)
        make("dups", (real[n % calls] for n in range(size)))
        make("invalid", (*real, *(fake_id(n)[:39] for n in range(size - calls))))
        settled = [fake_id(n) for n in range(size - calls)]
        make("resume", (*settled, *real), settled)
        return made

    if args.only == "durability":
        return await bench_durability(args, emulator, disk, started)
    full = inputs(MILLION, "full")
    small = inputs(MILLION // TRACED_FRACTION, "small")
    replay_journals = {}
    for tag, size in (("full", MILLION), ("small", MILLION // TRACED_FRACTION)):
        replay_journals[tag] = workdir / f"replay-{tag}.jsonl"
        write_journal(
            replay_journals[tag],
            header_for(full["baseline"][0], "https://127.0.0.1:1", emulator.config.tenant_id),
            (fake_id(n) for n in range((size - 3) // 2)),
        )
    print(f"data written in {time.perf_counter() - started:.1f} s", flush=True)

    measured: list[Measured] = []
    async with EmulatorServer(emulator, ca_path=workdir / "ca.pem") as server:
        env = _emulator_env(emulator, server, workdir / "ca.pem")

        def describe(name: str, size: int) -> str:
            return {
                "baseline": f"{calls:,} unique valid ids",
                "dups": f"{calls:,} unique valid + {size - calls:,} duplicate lines",
                "invalid": f"{calls:,} unique valid + {size - calls:,} invalid lines",
                "resume": f"{size:,} unique valid, {size - calls:,} settled in the journal",
            }[name]

        async def one(
            name: str, files: dict[str, tuple[Path, list[str] | None]], mode: str = "plain"
        ) -> dict[str, Any]:
            path, settled = files[name]
            journal = workdir / f"{name}-{mode}.jsonl"
            if settled is not None:
                header = header_for(path, server.base_url, emulator.config.tenant_id)
                write_journal(journal, header, settled)
                argv = ["resume", "--journal", str(journal), *LIFTED]
            else:
                argv = ["run", "--ids", str(path), "--journal", str(journal), *LIFTED]
            before = sum(emulator.truth.offboard_posts.values())
            shown = "" if mode == "plain" else f" ({mode}, 1/{TRACED_FRACTION} size)"
            print(f"  {name}{shown} ...", flush=True)
            got = await _measure("run", argv, env, workdir, mode=mode)
            got["posts"] = sum(emulator.truth.offboard_posts.values()) - before
            journal.unlink(missing_ok=True)
            # This run's actions must not make the next run's POSTs "already pending".
            emulator.actions.clear()
            emulator._actions_by_machine.clear()
            return got

        for name in ("baseline", "dups", "invalid", "resume"):
            figures = await one(name, full)
            traced = profiled = None
            if not args.no_tracemalloc:
                traced = await one(name, small, "traced")
                profiled = await one(name, small, "profiled")
            measured.append(Measured(name, describe(name, MILLION), figures, traced, profiled))
        print("  start-up, replay ...", flush=True)
        startup = await _measure("run", ["--version"], env, workdir)
        replay_figures = await _measure("replay", [str(replay_journals["full"])], env, workdir)
        small_journal = [str(replay_journals["small"])]
        replay_traced = replay_profiled = None
        if not args.no_tracemalloc:
            replay_traced = await _measure("replay", small_journal, env, workdir, mode="traced")
            replay_profiled = await _measure("replay", small_journal, env, workdir, mode="profiled")
        measured.append(
            Measured("replay", "replay_file", replay_figures, replay_traced, replay_profiled)
        )

    # Parts for the projection, measured in this process.
    tracemalloc.start()
    from bulkoffboard.sources import Deduplicator

    dedup = Deduplicator()
    for n in range(MILLION):
        dedup.add(fake_id(n))
    dedup_mib = tracemalloc.get_traced_memory()[0] / 2**20
    del dedup
    tracemalloc.stop()
    tracemalloc.start()
    grants: deque[float] = deque(maxlen=MILLION)
    for n in range(MILLION):
        grants.append(n * 1e-6)
    log_mib = tracemalloc.get_traced_memory()[0] / 2**20
    del grants
    tracemalloc.stop()

    print(
        f"\n{'run':<10}{'input (1,000,000 lines unless said)':<56}{'calls':>7}"
        f"{'peak RSS MiB':>13}{'CPU s':>8}{'wall s':>8}{'exit':>5}"
    )
    print("-" * 97)
    runs, replay_m = measured[:-1], measured[-1]
    for m in runs:
        f = m.figures
        print(
            f"{m.name:<10}{m.what:<56}{f['posts']:>7}{f['maxrss_mib']:>13.1f}"
            f"{f['cpu_s']:>8.2f}{f['wall_s']:>8.2f}{f['exit']:>5}"
        )
    rf = replay_m.figures
    times = rf["times"]
    replay_what = f"replay_file, {rf['lines']:,} journal lines"
    print(
        f"{'replay':<10}{replay_what:<56}{0:>7}{rf['maxrss_mib']:>13.1f}"
        f"{rf['cpu_s']:>8.2f}{min(times):>8.2f}{0:>5}"
    )
    print(
        f"\nreplay_file on {rf['lines']:,} lines ({rf['machines']:,} machines): best "
        f"{min(times):.2f} s, median {statistics.median(times):.2f} s of {len(times)} (target "
        f"< 3 s); peak RSS {rf['maxrss_mib']:.0f} MiB (target < 150 MB); the row's CPU s is "
        "for the three replays"
    )
    base = runs[0].figures
    per_call_cpu = (base["cpu_s"] - startup["cpu_s"]) / calls
    print(
        f"start-up alone (bulkoffboard --version in a child): {startup['cpu_s']:.2f} s CPU, "
        f"{startup['maxrss_mib']:.0f} MiB"
    )
    print(
        "projection for 1,000,000 real calls (NOT measured): the baseline run "
        f"({base['maxrss_mib']:.0f} MiB) + the dedup set for 1,000,000 ids ({dedup_mib:.0f} MiB, "
        f"measured alone) + the send-time log that --limit 1000000/1 keeps ({log_mib:.0f} MiB, "
        f"measured alone) = about {base['maxrss_mib'] + dedup_mib + log_mib:.0f} MiB peak; "
        f"{per_call_cpu * 1000:.2f} ms CPU per call (baseline less start-up) -> about "
        f"{per_call_cpu * MILLION / 60:.0f} min of CPU for 1,000,000 calls"
    )
    if not args.no_tracemalloc:
        print(
            f"\nwhere the memory goes (tracemalloc, inputs {TRACED_FRACTION} times smaller: sizes "
            "scale about linearly with the lines; snapshot at the end of the run with its dedup "
            "sets kept alive, or right after replay_file):"
        )
        for m in measured:
            t = m.traced or {}
            print(f"  {m.name}: traced peak {t.get('traced_peak_mib', 0):.1f} MiB")
            for line in t.get("top", []):
                print(f"    {line}")
        print(
            f"\nwhere the CPU time goes (cProfile, inputs {TRACED_FRACTION} times smaller, by "
            "own time):"
        )
        for m in measured:
            print(f"  {m.name}:")
            for line in (m.profiled or {}).get("profile", []):
                print(f"    {line}")
    await bench_durability(args, emulator, disk, started, startup)
    return 0


def _emulator_env(emulator: Emulator, server: EmulatorServer, ca: Path) -> dict[str, str]:
    return _base_env() | {
        "AZURE_TENANT_ID": emulator.config.tenant_id,
        "AZURE_CLIENT_ID": DEFAULT_CLIENT_ID,
        "AZURE_CLIENT_SECRET": DEFAULT_CLIENT_SECRET,
        "AZURE_AUTHORITY_HOST": server.base_url,
        "BULKOFFBOARD_API_URL": server.base_url,
        "BULKOFFBOARD_CA_BUNDLE": str(ca),
    }


async def bench_durability(
    args: argparse.Namespace,
    emulator: Emulator,
    disk: Path,
    started: float,
    startup: dict[str, Any] | None = None,
) -> int:
    """The durable attempt against a plain one, on tmpfs and on disk: calls per second, CPU
    and fsyncs per call of the same run (its first ``--durability-calls`` machines)."""
    workdir: Path = args.workdir
    calls = min(args.durability_calls, len(emulator.machines))
    ids = workdir / "durability-ids.txt"
    write_lines(ids, list(emulator.machines)[:calls])
    places = {"tmpfs": workdir, "disk": Path(tempfile.mkdtemp(prefix="bench-dur-", dir=disk))}
    rows: list[tuple[str, str, dict[str, Any]]] = []
    async with EmulatorServer(emulator, ca_path=workdir / "ca-durability.pem") as server:
        env = _emulator_env(emulator, server, workdir / "ca-durability.pem")
        if startup is None:
            startup = await _measure("run", ["--version"], env, workdir)
        for rounds in range(args.durability_rounds):
            for place, folder in places.items():
                for durable in (True, False):
                    journal = folder / f"durability-{place}-{durable}-{rounds}.jsonl"
                    argv = ["run", "--ids", str(ids), "--journal", str(journal), *LIFTED]
                    print(
                        f"  durability: {place}, attempt {'durable' if durable else 'plain'} ...",
                        flush=True,
                    )
                    before = sum(emulator.truth.offboard_posts.values())
                    flags = () if durable else ("--no-attempt-fsync",)
                    got = await _measure("run", argv, env, workdir, child_flags=flags)
                    got["posts"] = sum(emulator.truth.offboard_posts.values()) - before
                    journal.unlink(missing_ok=True)
                    journal.with_name(journal.name + ".lock").unlink(missing_ok=True)
                    emulator.actions.clear()
                    emulator._actions_by_machine.clear()
                    rows.append((place, "durable" if durable else "plain", got))
    shutil.rmtree(places["disk"], ignore_errors=True)
    print(
        f"\nthe durable attempt: {calls:,} real calls a run (limits lifted, 8 workers), best of "
        f"{args.durability_rounds} rounds by wall time; calls/s over the run's wall less "
        f"start-up ({startup['wall_s']:.2f} s)"
    )
    print(f"{'journal on':<12}{'attempt':<10}{'calls/s':>9}{'CPU s':>8}{'fsyncs/call':>13}")
    print("-" * 52)
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for place, kind, got in rows:
        key = (place, kind)
        if key not in best or got["wall_s"] < best[key]["wall_s"]:
            best[key] = got
    for (place, kind), got in best.items():
        rate = got["posts"] / max(got["wall_s"] - startup["wall_s"], 1e-9)
        print(
            f"{place:<12}{kind:<10}{rate:>9.0f}{got['cpu_s']:>8.2f}"
            f"{got['fsyncs'] / max(got['posts'], 1):>13.2f}"
        )
    for place in places:
        durable, plain = best[(place, "durable")], best[(place, "plain")]
        print(
            f"{place}: durable / plain wall {durable['wall_s'] / plain['wall_s']:.3f}, CPU "
            f"{durable['cpu_s'] / plain['cpu_s']:.3f}"
        )
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def make_workdir(journal_dir: str | None, prefix: str) -> Path:
    """A fresh folder for the run's files: under ``journal_dir``, else tmpfs, else the temp dir."""
    base = Path(journal_dir) if journal_dir else TMPFS if TMPFS.is_dir() else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    rest: list[str] = []
    if "--" in raw:
        cut = raw.index("--")
        raw, rest = raw[:cut], raw[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000, help="real calls per run")
    parser.add_argument("--no-tracemalloc", action="store_true", help="skip the instrumented runs")
    parser.add_argument("--journal-dir", help="where journals go (default /dev/shm: tmpfs)")
    parser.add_argument(
        "--only", choices=("durability",), help="run one part only (durability: about 1 minute)"
    )
    parser.add_argument(
        "--durability-calls", type=int, default=2000, help="real calls per durability run"
    )
    parser.add_argument("--durability-rounds", type=int, default=2, help="rounds of the four runs")
    parser.add_argument("--no-attempt-fsync", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=("run", "replay"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profiled", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(raw)
    if args.child:
        return child(args, rest)
    args.workdir = make_workdir(args.journal_dir, "bench-overhead-")
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
