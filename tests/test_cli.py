"""The command line as schedulers use it: real processes against the loopback emulator."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
from pathlib import Path

import orjson
import pytest

from bulkoffboard.cli import build_parser, main
from bulkoffboard.emulator import EmulatorConfig, EmulatorServer, FleetSpec
from bulkoffboard.jobs import plan_resume
from bulkoffboard.journal import replay_file
from tests.conftest import StartEmulator, env_for

SCALE = 0.01
LIMIT_ARGS = ["--limit", "100/0.6", "--limit", "1500/36"]


def emulator_config(size: int, **kwargs: object) -> EmulatorConfig:
    return EmulatorConfig(
        time_scale=SCALE,
        action_start_s=0.05,
        action_complete_s=0.1,
        fleet=FleetSpec(size=size, seed=11, os_mix={"Windows10": 0.8, "Linux": 0.2}),
        **kwargs,  # type: ignore[arg-type]
    )


async def cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = None, timeout: float = 60
) -> tuple[int, str, str]:
    """Run ``python -m bulkoffboard`` and return (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bulkoffboard",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**_base_env(), **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH", "SYSTEMROOT", "TMPDIR", "XDG_STATE_HOME")
    return {k: v for k, v in os.environ.items() if k in keep}


def ids_file(server: EmulatorServer, path: Path) -> Path:
    path.write_text("\n".join(server.emulator.machines) + "\n", encoding="utf-8")
    return path


def actions_per_machine(server: EmulatorServer, run_id: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for action in server.emulator.actions.values():
        if run_id in action.comment:
            counts[action.machine_id] = counts.get(action.machine_id, 0) + 1
    return counts


def test_emulate_help_documents_every_knob(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["emulate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for knob in (
        "--machines",
        "--seed",
        "--pending-fraction",
        "--time-scale",
        "--token-lifetime",
        "--action-start",
        "--action-complete",
        "--action-timeout",
        "--error-rate",
        "--abort-before-rate",
        "--abort-after-rate",
        "--latency",
        "--jitter",
        "--burst-every",
        "--burst-length",
        "--offboard-status",
        "--ca-out",
        "--plain-http",
        "--roles",
    ):
        assert knob in text, knob


def test_missing_connection_settings_exit_2_naming_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("a" * 40 + "\n")
    code = main(["run", "--ids", str(ids), "--journal", str(tmp_path / "j.jsonl")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "AZURE_TENANT_ID" in err[0] and "AZURE_CLIENT_SECRET" in err[0]
    assert not (tmp_path / "j.jsonl").exists()


MARGIN_ERROR = "--margin must be a number of seconds above 0, not "


@pytest.mark.parametrize(
    ("setting", "culprit"),
    [
        (("--limit", "100"), "'100'"),
        (("--limit", "0/60"), "'0/60'"),
        (("--limit", "x/y"), "'x/y'"),
        (("--margin", "0"), MARGIN_ERROR + "0.0"),
        (("--margin", "-1"), MARGIN_ERROR + "-1.0"),
        (("--margin", "nan"), MARGIN_ERROR + "nan"),
        (("--margin", "inf"), MARGIN_ERROR + "inf"),
    ],
)
def test_a_bad_rate_setting_is_a_one_line_usage_error_naming_the_value(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    setting: tuple[str, str],
    culprit: str,
) -> None:
    monkeypatch.setenv("AZURE_TENANT_ID", "t")
    monkeypatch.setenv("AZURE_CLIENT_ID", "c")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "s")
    ids = tmp_path / "ids.txt"
    ids.write_text("a" * 40 + "\n")
    journal = tmp_path / "j.jsonl"
    code = main(["run", "--ids", str(ids), "--journal", str(journal), *setting])
    assert code == 2
    err = capsys.readouterr().err
    assert culprit in err
    assert len(err.strip().splitlines()) == 1
    assert not journal.exists()


def test_a_missing_ids_file_is_a_usage_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AZURE_TENANT_ID", "t")
    monkeypatch.setenv("AZURE_CLIENT_ID", "c")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "s")
    code = main(
        ["run", "--ids", str(tmp_path / "nope.txt"), "--journal", str(tmp_path / "j.jsonl")]
    )
    assert code == 2
    assert "nope.txt" in capsys.readouterr().err
    assert not (tmp_path / "j.jsonl").exists()


def test_plain_http_is_refused_for_a_remote_api(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AZURE_TENANT_ID", "t")
    monkeypatch.setenv("AZURE_CLIENT_ID", "c")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "s")
    monkeypatch.setenv("BULKOFFBOARD_API_URL", "http://api.security.microsoft.com")
    ids = tmp_path / "ids.txt"
    ids.write_text("a" * 40 + "\n")
    assert main(["run", "--ids", str(ids), "--journal", str(tmp_path / "j.jsonl")]) == 2
    assert "plain http" in capsys.readouterr().err


async def test_run_then_report_in_every_format(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(emulator_config(40))
    env = env_for(server)
    journal = tmp_path / "run.jsonl"
    code, out, err = await cli(
        "run",
        "--ids",
        str(ids_file(server, tmp_path / "ids.txt")),
        "--journal",
        str(journal),
        "--comment",
        "CHG0042 retire",
        *LIMIT_ARGS,
        "--margin",
        "0.004",
        env=env,
    )
    assert code == 0, err
    assert "offboarded" in out
    assert replay_file(journal).header["margin_s"] == 0.004, "resume keeps the run's margin"
    assert plan_resume(journal, None, None, {}).margin_s == 0.004
    assert plan_resume(journal, None, None, {}, 0.5).margin_s == 0.5
    code, out, _ = await cli("report", "--journal", str(journal), "--format", "json")
    assert code == 0
    data = orjson.loads(out)
    header = replay_file(journal).header
    assert data["total"] == 40
    assert data["run"]["run_id"] == header["run_id"]
    assert data["counts"]["offboarded"] == len(actions_per_machine(server, header["run_id"]))
    assert data["counts"]["offboarded"] + data["counts"]["unsupported"] == 40
    code, out, _ = await cli("report", "--journal", str(journal), "--format", "csv")
    lines = out.splitlines()
    assert lines[0].split(",")[:7] == [
        "machine_id",
        "outcome",
        "action_id",
        "action_status",
        "error_code",
        "attempts",
        "updated_at",
    ]
    assert len(lines) == 41
    code, out, _ = await cli("report", "--journal", str(journal))
    assert code == 0 and "offboarded" in out and header["run_id"] in out
    action = next(iter(server.emulator.actions.values()))
    assert action.comment == f"CHG0042 retire [bulkoffboard run {header['run_id']}]"


async def test_ids_from_stdin_are_kept_for_resume(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(emulator_config(10))
    ids = "\n".join(server.emulator.machines).encode() + b"\nnot-an-id\n"
    journal = tmp_path / "stdin.jsonl"
    code, _, err = await cli(
        "run", "--ids", "-", "--journal", str(journal), *LIMIT_ARGS, env=env_for(server), stdin=ids
    )
    assert code == 0, err
    header = replay_file(journal).header
    assert header["source"]["kind"] == "stdin"
    assert Path(header["source"]["path"]).read_bytes() == ids
    posts = dict(server.emulator.truth.offboard_posts)
    assert posts
    assert set(posts.values()) == {1}
    code, out, _ = await cli("resume", "--journal", str(journal), env=env_for(server))
    assert code == 0
    assert dict(server.emulator.truth.offboard_posts) == posts, "resume sent something again"


async def test_resume_reports_a_damaged_journal_before_asking_for_a_token(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(emulator_config(20))
    env = env_for(server)
    journal = tmp_path / "run.jsonl"
    ids = ids_file(server, tmp_path / "ids.txt")
    code, _, err = await cli(
        "run", "--ids", str(ids), "--journal", str(journal), *LIMIT_ARGS, env=env
    )
    assert code == 0, err
    lines = journal.read_bytes().splitlines(keepends=True)
    lines[3] = b"{not json\n"
    journal.write_bytes(b"".join(lines))
    issued = server.emulator.truth.tokens_issued
    code, _, err = await cli("resume", "--journal", str(journal), env=env)
    assert code == 2
    assert f"{journal}:4: not a JSON line" in err
    assert server.emulator.truth.tokens_issued == issued, "a token was asked for first"


async def test_sigint_stops_cleanly_with_130_and_resume_finishes(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(emulator_config(400))
    journal = tmp_path / "int.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bulkoffboard",
        "run",
        "--ids",
        str(ids_file(server, tmp_path / "i.txt")),
        "--journal",
        str(journal),
        *LIMIT_ARGS,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**_base_env(), **env_for(server)},
    )
    while sum(server.emulator.truth.offboard_posts.values()) < 50:
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 130
    assert b"resume" in out
    replay = replay_file(journal)
    assert not replay.torn_tail
    assert replay.in_doubt() == [], "in-flight calls were not let finish"
    code, _, err = await cli("resume", "--journal", str(journal), env=env_for(server))
    assert code == 0, err
    run_id = replay.header["run_id"]
    assert all(n == 1 for n in actions_per_machine(server, run_id).values())


async def test_sigkill_at_random_moments_then_resume_offboards_each_machine_exactly_once(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    rng = random.Random(2026)
    server = await start_emulator(emulator_config(500))
    truth = server.emulator.truth
    journal = tmp_path / "kill.jsonl"
    env = {**_base_env(), **env_for(server)}
    first = ["run", "--ids", str(ids_file(server, tmp_path / "k.txt")), "--journal", str(journal)]
    kills = 0
    for round_ in range(8):
        args = first if round_ == 0 else ["resume", "--journal", str(journal)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bulkoffboard",
            *args,
            *LIMIT_ARGS,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
        posts = sum(truth.offboard_posts.values())
        target = posts + rng.randint(5, 120)
        while sum(truth.offboard_posts.values()) < target and proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.002)
        if proc.returncode is None:
            proc.kill()
            kills += 1
        await proc.wait()
    assert kills >= 3
    code, out, err = await cli(
        "resume", "--journal", str(journal), env=env_for(server), timeout=120
    )
    assert code == 0, err
    replay = replay_file(journal)
    run_id = replay.header["run_id"]
    outcomes = {r["machine_id"]: r["outcome"] for r in replay.results()}
    assert set(outcomes) == set(server.emulator.machines)
    assert set(outcomes.values()) <= {"offboarded", "unsupported"}
    created = actions_per_machine(server, run_id)
    assert all(n == 1 for n in created.values()), "a machine got two offboard actions"
    assert {m for m, o in outcomes.items() if o == "offboarded"} == set(created)
    assert sum(truth.posts_after_action.values()) == 0, "a POST was re-sent after an action existed"
    assert truth.max_in_window["offboard 0.6"] <= 100
    assert truth.max_in_window["offboard 36"] <= 1500
    assert replay.sessions >= 9


async def test_tokens_and_secrets_never_reach_logs_journal_or_reports(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    secret = "S3cr3t-Value-That-Must-Never-Leak"
    server = await start_emulator(
        emulator_config(
            30,
            apps=(__import__("bulkoffboard.emulator").emulator.AppRegistration(secret=secret),),
            token_lifetime_s=0.5,
        )
    )
    journal = tmp_path / "sec.jsonl"
    env = env_for(server, secret=secret)
    outputs: list[str] = []
    code, out, err = await cli(
        "run",
        "--ids",
        str(ids_file(server, tmp_path / "s.txt")),
        "--journal",
        str(journal),
        "--log-level",
        "debug",
        "--log-format",
        "json",
        *LIMIT_ARGS,
        env=env,
    )
    assert code == 0, err
    outputs += [out, err, journal.read_text()]
    for fmt in ("table", "csv", "json"):
        _, rep, rep_err = await cli("report", "--journal", str(journal), "--format", fmt)
        outputs += [rep, rep_err]
    code, out, err = await cli(
        "run",
        "--ids",
        str(tmp_path / "s.txt"),
        "--journal",
        str(tmp_path / "bad.jsonl"),
        env={**env, "AZURE_CLIENT_SECRET": secret + "-wrong"},
    )
    assert code == 3
    assert len(err.strip().splitlines()) == 1 and "AADSTS7000215" in err
    outputs += [out, err]
    tokens = server.emulator.truth.tokens
    assert len(tokens) >= 1
    everything = "\n".join(outputs)
    assert secret not in everything
    for token in tokens:
        assert token not in everything
        assert token.split(".")[2] not in everything
