"""The operations commands end to end: verify, run --wait, --summary-json, report formats."""

from __future__ import annotations

from pathlib import Path

import orjson

from bulkoffboard.emulator import EmulatorConfig, FleetSpec
from bulkoffboard.journal import replay_file
from tests.conftest import StartEmulator, env_for
from tests.test_cli import cli

LIMITS = ["--limit", "100/0.6", "--limit", "1500/36"]


def config(**kwargs: object) -> EmulatorConfig:
    return EmulatorConfig(
        time_scale=0.01,
        action_start_s=0.05,
        action_complete_s=0.1,
        action_timeout_s=0.6,
        fleet=FleetSpec(size=40, seed=12, os_mix={"Windows10": 1.0}),
        **kwargs,  # type: ignore[arg-type]
    )


async def test_verify_journals_status_and_writes_a_summary_file(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(config())
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(server.emulator.machines) + "\n")
    journal = tmp_path / "j.jsonl"
    env = env_for(server)
    code, _, err = await cli("run", "--ids", str(ids), "--journal", str(journal), *LIMITS, env=env)
    assert code == 0, err
    summary_path = tmp_path / "verify-summary.json"
    code, out, err = await cli(
        "verify",
        "--journal",
        str(journal),
        "--until-final",
        "--deadline",
        "30",
        "--poll-interval",
        "0.2",
        "--summary-json",
        str(summary_path),
        *LIMITS,
        env=env,
    )
    assert code == 0, err + out
    replay = replay_file(journal)
    statuses = {m: s.action_status for m, s in replay.statuses.items()}
    online = {m for m, x in server.emulator.machines.items() if x["healthStatus"] == "Active"}
    assert statuses
    assert all(statuses[m] == "Succeeded" for m in online if m in statuses)
    assert all(statuses[m] == "TimeOut" for m in statuses if m not in online)
    data = orjson.loads(summary_path.read_bytes())
    assert data["exit_code"] == 0
    assert data["command"] == "verify"
    assert server.emulator.truth.calls["machineactions"] < 40, "verify made a call per machine"


async def test_run_wait_follows_the_actions_and_the_summary_has_the_counts(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(config())
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(server.emulator.machines) + "\n")
    journal = tmp_path / "j.jsonl"
    summary_path = tmp_path / "run-summary.json"
    code, out, err = await cli(
        "run",
        "--ids",
        str(ids),
        "--journal",
        str(journal),
        "--wait",
        "--wait-deadline",
        "30",
        "--poll-interval",
        "0.2",
        "--summary-json",
        str(summary_path),
        *LIMITS,
        env=env_for(server),
    )
    assert code == 0, err + out
    data = orjson.loads(summary_path.read_bytes())
    assert data["exit_code"] == 0
    assert data["counts"]["offboarded"] == 40
    assert data["offboard_calls"] == 40
    assert data["throttled_429"] == 0
    assert "waited" in data
    assert replay_file(journal).statuses, "--wait journaled no status"


async def test_report_markdown_and_html_from_the_command_line(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(config())
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(server.emulator.machines) + "\n<script>alert(1)</script>\n")
    journal = tmp_path / "j.jsonl"
    code, _, err = await cli(
        "run", "--ids", str(ids), "--journal", str(journal), *LIMITS, env=env_for(server)
    )
    assert code == 0, err
    code, md, _ = await cli("report", "--journal", str(journal), "--format", "markdown")
    assert code == 0
    assert "offboarded" in md
    code, html, _ = await cli("report", "--journal", str(journal), "--format", "html")
    assert code == 0
    assert html.lstrip().lower().startswith("<!doctype html")
    assert "<script>" not in html
    assert "<svg" in html
