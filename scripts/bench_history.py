#!/usr/bin/env python3
"""A year of nights: the history report and the export over 365 journals of 3,000 machines.

Writes ``--nights`` journals (default 365) of ``--machines`` each (default 3,000) into a
fresh folder on the disk (``--journal-dir``, default ``/var/tmp``), in the shape a nightly
job leaves them: a header, a session, an attempt and a result a machine (offboarded with a
Pending action, or already pending, failed or not found), an end, and the next night's
``verify`` (a ``status`` record a machine: most Succeeded, some still Pending). Each night
has its own stale devices, and 2% come back from earlier nights (re-onboarded devices). The
journals are written directly (orjson lines in journal format 1; one of them is replayed and
checked first).

Then each measured command runs as the real command line in a child process of its own (its
CPU and peak RSS, ``VmHWM``, read by the child itself):

- ``report --journal-dir DIR`` in every history format (table, csv, json, markdown, html);
- ``export --journal-dir DIR --db sqlite:///...`` (the first export of the whole year), the
  same again (idempotent: nothing to add), and again after one more night was added and the
  last night grew by its verify (incremental);
- with ``--postgres URL``, the first export into that PostgreSQL database too.

Targets (issue 17): the report "in seconds", within the single-run report's memory target
(150 MB); the export idempotent and incremental (the second run adds nothing, the third only
the new lines).

Reproduce (about 4 minutes on a 2-core machine; ``--quick`` about 20 s)::

    .venv/bin/python scripts/bench_history.py
    .venv/bin/python scripts/bench_history.py --quick
    .venv/bin/python scripts/bench_history.py --nights 90 --formats table,html
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from bench_throughput import ROOT, _base_env

from bulkoffboard.journal import FORMAT_VERSION, TOOL, iso, replay_file

SCRIPT = Path(__file__).resolve()
BENCH_TENANTS = SCRIPT.parent / "bench_tenants.py"
FORMATS = ("table", "csv", "json", "markdown", "html")
FIRST_NIGHT = datetime(2025, 12, 1, 2, 0, tzinfo=UTC)


@dataclass(slots=True)
class Measured:
    what: str
    exit_code: int
    wall_s: float
    cpu_s: float
    rss_mib: float
    out_bytes: int
    note: str = ""


def machine_id(number: int) -> str:
    return f"{number:040x}"


def write_night(folder: Path, night: int, machines: int, rng: random.Random) -> Path:
    """One night's journal (and, for every night but the last, its next-day verify)."""
    start = FIRST_NIGHT + timedelta(days=night)
    path = folder / f"{start:%Y-%m}" / f"{start:%Y-%m-%d}.jsonl"
    path.parent.mkdir(exist_ok=True)
    # Mostly this night's own stale devices; 2% come back from earlier nights.
    back = [rng.randrange(night * machines) for _ in range(machines // 50)] if night else []
    chosen = list(dict.fromkeys([*back, *range(night * machines, (night + 1) * machines)]))
    chosen = chosen[:machines]
    lines = [
        {
            "type": "header",
            "format": FORMAT_VERSION,
            "tool": TOOL,
            "tool_version": "0.1.0",
            "run_id": f"{night:08d}-0000-4000-8000-000000000000",
            "created_at": iso(start),
            "source": {"kind": "file", "path": f"/srv/stale-{night}.txt", "format": "text"},
            "comment": "nightly",
            "limits": [[100, 60.0], [1500, 3600.0]],
            "workers": 8,
            "api_url": "https://api.security.microsoft.com",
            "tenant_id": "6d3c8a52-0000-4000-8000-00000000c001",
            "client_id": "0a1b2c3d-0000-4000-8000-000000000001",
        },
        {"type": "session", "at": iso(start), "pid": 4242, "command": "run"},
    ]
    verify = []
    for index, number in enumerate(chosen):
        mid = machine_id(number)
        at = iso(start + timedelta(seconds=index * 1.2))
        lines.append({"type": "attempt", "machine_id": mid, "attempt": 1, "at": at})
        roll = rng.random()
        action = f"{night:08x}-{index:04x}-4000-8000-{number:012x}"
        result: dict[str, Any]
        if roll < 0.93:
            result = {"outcome": "offboarded", "action_id": action, "action_status": "Pending"}
            result["http_status"] = 201
            verify.append((mid, action, "Succeeded" if rng.random() < 0.97 else "Pending"))
        elif roll < 0.96:
            result = {"outcome": "already_pending", "action_id": action}
            result |= {"action_status": "InProgress", "http_status": 400}
        elif roll < 0.98:
            result = {"outcome": "failed", "http_status": 503, "message": "HTTP 503"}
        else:
            result = {"outcome": "not_found", "http_status": 404, "error_code": "ResourceNotFound"}
        lines.append(
            {
                "type": "result",
                "machine_id": mid,
                "action_id": None,
                "action_status": None,
                "http_status": None,
                "error_code": None,
                "message": None,
                "attempts": 1,
                "at": at,
            }
            | result
        )
    lines.append({"type": "end", "at": iso(start + timedelta(hours=1)), "exit_code": 1})
    later = start + timedelta(hours=20)
    lines.append({"type": "session", "at": iso(later), "pid": 4343, "command": "verify"})
    for mid, action, status in verify:
        lines.append(
            {
                "type": "status",
                "machine_id": mid,
                "action_id": action,
                "action_status": status,
                "at": iso(later),
            }
        )
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    return path


def measured(argv: list[str], folder: Path, what: str) -> Measured:
    """Run ``bulkoffboard argv`` in a child that measures itself (bench_tenants' child)."""
    figures = folder / "child.json"
    out_path = folder / "out.bin"
    env = _base_env() | {"PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    with out_path.open("wb") as out:
        proc = subprocess.run(
            [sys.executable, str(BENCH_TENANTS), "--child", str(figures), "--", *argv],
            stdout=out,
            stderr=subprocess.PIPE,
            env=env,
            cwd=str(folder),
            check=False,
        )
    wall = time.perf_counter() - started
    data: dict[str, Any] = orjson.loads(figures.read_bytes()) if figures.exists() else {}
    note = proc.stderr.decode(errors="replace").strip()[-300:]
    if what.startswith("export"):
        note = out_path.read_text(errors="replace").strip().replace("\n", "; ")
    return Measured(
        what,
        int(data.get("exit", proc.returncode)),
        wall,
        float(data.get("cpu_s", 0.0)),
        float(data.get("rss_mib", 0.0)),
        out_path.stat().st_size,
        note,
    )


def bench(args: argparse.Namespace) -> int:
    load = os.getloadavg()
    base = Path(args.journal_dir) if args.journal_dir else Path("/var/tmp")  # noqa: S108
    folder = Path(tempfile.mkdtemp(prefix="bench-history-", dir=base))
    journals = folder / "journals"
    journals.mkdir()
    print("bench_history: a year of nights, reported and exported")
    print(
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    rng = random.Random(17)
    started = time.perf_counter()
    paths = [write_night(journals, n, args.machines, rng) for n in range(args.nights)]
    size = sum(p.stat().st_size for p in paths)
    lines = sum(p.read_bytes().count(b"\n") for p in paths)
    replay = replay_file(paths[0])
    if len(replay.machines) != args.machines:
        raise SystemExit(f"{paths[0]} does not replay as written")
    replay.close()
    print(
        f"journals: {args.nights} nights x {args.machines} machines (2% of a night back "
        "from an earlier one), "
        f"{lines:,} lines, {size / 2**20:.0f} MiB, in {folder} (written in "
        f"{time.perf_counter() - started:.1f} s)"
    )
    rows: list[Measured] = []
    try:
        for fmt in args.formats if args.only in (None, "report") else ():
            print(f"  report --format {fmt} ...", flush=True)
            rows.append(
                measured(
                    ["report", "--journal-dir", str(journals), "--format", fmt],
                    folder,
                    f"report {fmt}",
                )
            )
        db = f"sqlite:///{folder / 'history.db'}"
        if args.only == "report":
            return _table(rows, started)
        print("  export (first) ...", flush=True)  # (--only export: the report part skipped)
        rows.append(
            measured(["export", "--journal-dir", str(journals), "--db", db], folder, "export first")
        )
        print("  export (again) ...", flush=True)
        rows.append(
            measured(["export", "--journal-dir", str(journals), "--db", db], folder, "export again")
        )
        write_night(journals, args.nights, args.machines, rng)
        with paths[-1].open("ab") as handle:  # the last night's journal grows too
            handle.write(orjson.dumps({"type": "end", "at": iso(datetime.now(UTC))}) + b"\n")
        print("  export (one more night) ...", flush=True)
        rows.append(
            measured(
                ["export", "--journal-dir", str(journals), "--db", db], folder, "export a night"
            )
        )
        if args.postgres:
            print("  export to PostgreSQL ...", flush=True)
            rows.append(
                measured(
                    ["export", "--journal-dir", str(journals), "--db", args.postgres],
                    folder,
                    "export postgresql",
                )
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return _table(rows, started)


def _table(rows: list[Measured], started: float) -> int:
    head = f"{'command':<22}{'exit':>5}{'wall s':>9}{'CPU s':>8}{'peak RSS MiB':>14}{'output':>12}"
    print("\n" + head + "\n" + "-" * len(head))
    failures = 0
    for row in rows:
        failures += row.exit_code != 0
        print(
            f"{row.what:<22}{row.exit_code:>5}{row.wall_s:>9.1f}{row.cpu_s:>8.1f}"
            f"{row.rss_mib:>14.1f}{row.out_bytes / 1024:>10.0f} K"
        )
    for row in rows:
        if row.note:
            print(f"  {row.what}: {row.note}")
    print(
        "targets: a report in seconds within 150 MB (the single-run report's); export again "
        "adds nothing; one more night adds only its lines"
    )
    print(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nights", type=int, default=365)
    parser.add_argument("--machines", type=int, default=3000, help="machines a night")
    parser.add_argument(
        "--formats",
        type=lambda text: [f for f in text.split(",") if f],
        default=list(FORMATS),
        help="report formats to time (default all)",
    )
    parser.add_argument("--journal-dir", help="where the journals go (default /var/tmp)")
    parser.add_argument("--postgres", metavar="URL", help="also export to this PostgreSQL")
    parser.add_argument("--quick", action="store_true", help="30 nights of 1,000")
    parser.add_argument("--only", choices=("report", "export"), help="run one part")
    args = parser.parse_args(argv)
    if args.quick:
        args.nights, args.machines = 30, 1000
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
