"""``bulkoffboard emulate`` and ``bulkoffboard demo``: the emulator on its own, and a whole run
against it in one process."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bulkoffboard import config, reports
from bulkoffboard.auth import ClientCredential
from bulkoffboard.emulator import (
    AppRegistration,
    Emulator,
    EmulatorConfig,
    EmulatorServer,
    Faults,
    FleetSpec,
    extra_tenants,
)
from bulkoffboard.emulator.app import ALL_ROLES, DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET
from bulkoffboard.errors import UsageError
from bulkoffboard.jobs import execute, new_plan
from bulkoffboard.journal import replay_file
from bulkoffboard.runner import ExitCode
from bulkoffboard.throttle import Limit


def _emulator_arguments(parser: argparse.ArgumentParser, *, demo: bool) -> None:
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument(
        "--machines",
        type=int,
        default=1200 if demo else 200,
        help="fleet size (default %(default)s)",
    )
    fleet.add_argument("--seed", type=int, default=1, help="fleet and fault seed")
    fleet.add_argument(
        "--pending-fraction",
        type=float,
        default=0.02,
        help="share of machines that already carry a pending offboard action",
    )
    timing = parser.add_argument_group("time")
    timing.add_argument(
        "--time-scale",
        type=float,
        default=0.01 if demo else 1.0,
        help="multiplies every rate window: 0.01 plays an hour in 36 s (default %(default)s)",
    )
    timing.add_argument("--token-lifetime", type=float, default=3600.0, metavar="SECONDS")
    timing.add_argument(
        "--action-start",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="Pending -> InProgress delay for online devices",
    )
    timing.add_argument(
        "--action-complete",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="InProgress -> Succeeded delay for online devices",
    )
    timing.add_argument(
        "--action-timeout",
        type=float,
        default=3 * 86400.0,
        metavar="SECONDS",
        help="offline devices stay Pending this long, then TimeOut",
    )
    faults = parser.add_argument_group("faults")
    faults.add_argument(
        "--error-rate", type=float, default=0.0, help="share of API calls answered 500"
    )
    faults.add_argument(
        "--abort-before-rate",
        type=float,
        default=0.0,
        help="share of calls whose connection drops before processing",
    )
    faults.add_argument(
        "--abort-after-rate",
        type=float,
        default=0.0,
        help="share of calls processed (action created) then dropped",
    )
    faults.add_argument(
        "--latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="extra delay before a call is counted",
    )
    faults.add_argument(
        "--jitter",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="random extra delay, uniform up to this",
    )
    faults.add_argument(
        "--burst-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="forced 429 bursts: one every this many seconds",
    )
    faults.add_argument(
        "--burst-length",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="how long each forced 429 burst lasts",
    )
    faults.add_argument(
        "--offboard-status",
        type=int,
        choices=(200, 201),
        default=201,
        help="success status of offboard (the docs show both)",
    )


def _emulator_config(args: argparse.Namespace, **extra: Any) -> EmulatorConfig:
    return EmulatorConfig(
        time_scale=args.time_scale,
        token_lifetime_s=args.token_lifetime,
        offboard_status=args.offboard_status,
        action_start_s=args.action_start,
        action_complete_s=args.action_complete,
        action_timeout_s=args.action_timeout,
        fleet=FleetSpec(size=args.machines, seed=args.seed, pending_fraction=args.pending_fraction),
        faults=Faults(
            error_rate=args.error_rate,
            abort_before_rate=args.abort_before_rate,
            abort_after_rate=args.abort_after_rate,
            latency_s=args.latency,
            jitter_s=args.jitter,
            burst_every_s=args.burst_every,
            burst_length_s=args.burst_length,
        ),
        seed=args.seed,
        **extra,
    )


def add_commands(commands: Any, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``emulate`` and ``demo`` on the CLI's subparsers."""
    emulate = commands.add_parser(
        "emulate",
        help="serve the MDE + Entra ID emulator on loopback",
        description="Serve the emulator until interrupted. It plays Entra ID (token endpoint) "
        "and MDE (offboard, machine actions, machines, advanced hunting) on one loopback "
        "port, with the documented limits per endpoint per client, counted on arrival.",
    )
    emulate.add_argument("--host", default="127.0.0.1", help="loopback address only")
    emulate.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    emulate.add_argument("--ca-out", metavar="PATH", help="write the throwaway CA's PEM here")
    emulate.add_argument(
        "--plain-http",
        action="store_true",
        help="serve plain HTTP (tokens then cannot be had through msal)",
    )
    emulate.add_argument("--tenant-id", default=EmulatorConfig().tenant_id)
    emulate.add_argument(
        "--tenants",
        type=int,
        default=1,
        metavar="N",
        help="serve N tenants (the first is --tenant-id), each with its own fleet, actions and "
        "windows; one app, consented in each (default %(default)s)",
    )
    emulate.add_argument("--client-id", default=DEFAULT_CLIENT_ID)
    emulate.add_argument("--client-secret", default=DEFAULT_CLIENT_SECRET)
    emulate.add_argument(
        "--roles",
        default=",".join(ALL_ROLES),
        help="comma-separated application roles of the client's tokens",
    )
    emulate.add_argument("--write-ids", metavar="PATH", help="write the fleet's machine ids here")
    _emulator_arguments(emulate, demo=False)
    add_common(emulate)
    emulate.set_defaults(func=cmd_emulate)

    demo = commands.add_parser(
        "demo",
        help="offboard a synthetic fleet from an in-process emulator, end to end",
        description="Start the emulator in-process (time-scaled), write an id list with a few "
        "bad lines, run the real client, throttle and journal against it, print the summary "
        "and check it against the emulator's ground truth.",
    )
    demo.add_argument(
        "--workdir", metavar="DIR", help="where the journal and ids go (default: a temp dir)"
    )
    demo.add_argument("--workers", type=int, default=8)
    _emulator_arguments(demo, demo=True)
    add_common(demo)
    demo.set_defaults(func=cmd_demo)


def cmd_emulate(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM."""
    app = AppRegistration(
        client_id=args.client_id,
        secret=args.client_secret,
        roles=tuple(r.strip() for r in args.roles.split(",") if r.strip()),
    )
    if args.tenants < 1:
        raise UsageError(f"--tenants must be 1 or more, not {args.tenants}")
    emulator_config = _emulator_config(args, tenant_id=args.tenant_id, apps=(app,))
    emulator_config = dataclasses.replace(
        emulator_config, tenants=extra_tenants(args.tenants - 1, emulator_config.fleet)
    )
    emulator = Emulator(emulator_config)
    if args.write_ids:
        Path(args.write_ids).write_text("\n".join(emulator.machines) + "\n", encoding="utf-8")
    ca_path = Path(args.ca_out).absolute() if args.ca_out else None

    async def serve() -> None:
        server = EmulatorServer(
            emulator, host=args.host, port=args.port, tls=not args.plain_http, ca_path=ca_path
        )
        async with server:
            out = sys.stdout
            out.write(f"emulator listening on {server.base_url}\n")
            out.write(f"export BULKOFFBOARD_API_URL={server.base_url}\n")
            out.write(f"export AZURE_AUTHORITY_HOST={server.base_url}\n")
            out.write(f"export AZURE_TENANT_ID={args.tenant_id}\n")
            out.write(f"export AZURE_CLIENT_ID={args.client_id}\n")
            if ca_path is not None:
                out.write(f"export BULKOFFBOARD_CA_BUNDLE={ca_path}\n")
            out.write("(AZURE_CLIENT_SECRET is the --client-secret value)\n")
            if len(emulator.tenant_ids) > 1:
                for number, tenant_id in enumerate(emulator.tenant_ids, start=1):
                    out.write(f"tenant {number}: {tenant_id}\n")
            out.flush()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()

    asyncio.run(serve())
    return 0


def _write_demo_ids(path: Path, machine_ids: list[str], rng: random.Random) -> int:
    """The fleet's ids plus what real lists contain: duplicates, junk, unknown ids."""
    lines = ["# machines to offboard (bulkoffboard demo)"]
    lines += [m.upper() if rng.random() < 0.05 else m for m in machine_ids]
    lines += rng.sample(machine_ids, k=min(5, len(machine_ids)))  # duplicates
    lines += ["not-a-machine-id", "../../etc/passwd", "0123456789abcdef0123456789abcdef0123456"]
    lines += [f"{rng.getrandbits(160):040x}" for _ in range(3)]  # well-formed, unknown
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole product against an in-process emulator and check the ground truth."""

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bulkoffboard-demo-")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    scale = args.time_scale
    limits = (Limit(100, 60.0 * scale), Limit(1500, 3600.0 * scale))
    emulator = Emulator(_emulator_config(args))
    ids_path = workdir / "ids.txt"
    journal_path = workdir / "journal.jsonl"
    ca_path = workdir / "emulator-ca.pem"
    for stale in (journal_path, journal_path.with_name(journal_path.name + ".lock")):
        stale.unlink(missing_ok=True)
    _write_demo_ids(ids_path, list(emulator.machines), random.Random(args.seed))

    async def demo() -> int:
        async with EmulatorServer(emulator, ca_path=ca_path) as server:
            conn = config.Connection(
                tenant_id=emulator.config.tenant_id,
                client_id=DEFAULT_CLIENT_ID,
                credential=ClientCredential(secret=DEFAULT_CLIENT_SECRET),
                api_url=server.base_url,
                authority_host=server.base_url,
                scope=config.DEFAULT_SCOPE,
                ca_bundle=ca_path,
            )
            plan = new_plan(
                journal_path=journal_path,
                source={"kind": "file", "path": str(ids_path), "format": "text"},
                comment="bulkoffboard demo",
                workers=args.workers,
                limits=limits,
                conn=conn,
            )
            sys.stdout.write(
                f"demo: emulator at {server.base_url}, {len(emulator.machines)} machines, "
                f"windows scaled x{scale:g} ({limits[0]} and {limits[1]})\n"
            )
            sys.stdout.flush()
            summary = await execute(plan, conn)
            return _check_truth(
                summary.as_dict(),
                emulator,
                run_id=plan.run_id,
                limits=limits,
                exit_code=int(summary.exit_code),
            )

    code = asyncio.run(demo())
    sys.stdout.write(reports.render_table(replay_file(journal_path)))
    sys.stdout.write(f"journal: {journal_path}\n")
    return code


def _check_truth(
    summary: dict[str, Any],
    emulator: Emulator,
    *,
    run_id: str,
    limits: tuple[Limit, ...],
    exit_code: int,
) -> int:
    """Compare the run's summary with what the emulator saw."""
    truth = emulator.truth
    ours = [a for a in emulator.actions.values() if run_id in a.comment]
    per_machine: dict[str, int] = {}
    for action in ours:
        per_machine[action.machine_id] = per_machine.get(action.machine_id, 0) + 1
    twice = sum(1 for n in per_machine.values() if n > 1)
    offboarded = summary["counts"].get("offboarded", 0)
    windows = {f"{lim}": truth.max_in_window.get(f"offboard {lim.period_s:g}", 0) for lim in limits}
    checks = {
        "offboarded in the journal = actions the emulator created for this run": offboarded
        == len(per_machine),
        "no machine offboarded twice": twice == 0,
        "no window over its limit": all(windows[f"{lim}"] <= lim.calls for lim in limits),
        "no 429 served": truth.throttled.get("offboard", 0) == 0,
    }
    out = sys.stdout
    out.write(
        f"\nground truth: {len(per_machine)} machines got an offboard action from this run, "
        f"{twice} twice; most calls in any window: "
        + ", ".join(f"{n} (limit {k})" for k, n in windows.items())
        + f"; 429s served: {truth.throttled.get('offboard', 0)}\n"
    )
    for name, ok in checks.items():
        out.write(f"  [{'ok' if ok else 'MISMATCH'}] {name}\n")
    out.flush()
    if not all(checks.values()):
        return int(ExitCode.SOME_FAILED)
    return exit_code
