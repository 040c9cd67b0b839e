"""Many tenants in one run (issue 14): a tenants file, a run directory, one journal a tenant.

Each tenant here is its own emulator (its own tenant id, CA, fleet and windows), named by the
tenants file's per-tenant ``api_url``, ``authority_host`` and ``ca_bundle``: a token sent to
the wrong tenant would be refused (unknown tenant at the token host) or find no machine.
"""

from __future__ import annotations

import asyncio
import collections
import csv
import io
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from bulkoffboard import tenants
from bulkoffboard.config import load_tenants
from bulkoffboard.emulator import EmulatorConfig, EmulatorServer, FleetSpec, extra_tenants
from bulkoffboard.emulator.app import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET
from bulkoffboard.errors import UsageError
from bulkoffboard.journal import replay_file
from tests.conftest import StartEmulator
from tests.test_cli import cli

LIMITS = ("--limit", "100/0.6", "--limit", "1500/36")
TENANT_IDS = {
    "contoso": "6d3c8a52-0000-4000-8000-00000000c001",
    "fabrikam": "6d3c8a52-0000-4000-8000-00000000fab2",
    "tailspin": "6d3c8a52-0000-4000-8000-0000000007a3",
}


def emulator_config(name: str, size: int, seed: int) -> EmulatorConfig:
    return EmulatorConfig(
        tenant_id=TENANT_IDS[name],
        time_scale=0.01,
        action_start_s=0.05,
        action_complete_s=0.1,
        fleet=FleetSpec(size=size, seed=seed, os_mix={"Windows10": 0.8, "Linux": 0.2}),
    )


def app_env() -> dict[str, str]:
    """The multi-tenant app's one secret and client id; no tenant in the environment."""
    return {"AZURE_CLIENT_ID": DEFAULT_CLIENT_ID, "AZURE_CLIENT_SECRET": DEFAULT_CLIENT_SECRET}


def tenant_block(name: str, server: EmulatorServer, **extra: str) -> str:
    lines = [
        "[[tenant]]",
        f'name = "{name}"',
        f'tenant_id = "{TENANT_IDS[name]}"',
        f'api_url = "{server.base_url}"',
        f'authority_host = "{server.base_url}"',
        f'ca_bundle = "{server.ca_path}"',
        *(f'{key} = "{value}"' for key, value in extra.items()),
    ]
    return "\n".join(lines) + "\n"


def write_ids(server: EmulatorServer, path: Path) -> Path:
    path.write_text("\n".join(server.emulator.machines) + "\n", encoding="utf-8")
    return path


def created(server: EmulatorServer, run_id: str) -> collections.Counter[str]:
    return collections.Counter(
        a.machine_id for a in server.emulator.actions.values() if run_id in a.comment
    )


def windows(server: EmulatorServer) -> set[str]:
    return {m for m, d in server.emulator.machines.items() if d["osPlatform"] == "Windows10"}


async def two_tenants(
    start_emulator: StartEmulator, tmp_path: Path, size: int = 40, **extra: dict[str, str]
) -> tuple[dict[str, EmulatorServer], Path]:
    servers = {
        "contoso": await start_emulator(emulator_config("contoso", size, 1)),
        "fabrikam": await start_emulator(emulator_config("fabrikam", size, 2)),
    }
    text = '[defaults]\ncomment = "CHG0042 nightly"\n\n'
    for name, server in servers.items():
        ids = write_ids(server, tmp_path / f"{name}-stale.txt")
        text += tenant_block(name, server, ids=ids.name, **extra.get(name, {})) + "\n"
    path = tmp_path / "tenants.toml"
    path.write_text(text, encoding="utf-8")
    return servers, path


def assert_each_offboarded_once(server: EmulatorServer, journal: Path) -> None:
    replay = replay_file(journal)
    run_id = replay.header["run_id"]
    made = created(server, run_id)
    assert set(made) == windows(server) and set(made.values()) == {1}
    assert sum(server.emulator.truth.posts_after_action.values()) == 0
    assert replay.in_doubt() == []


async def test_two_tenants_are_offboarded_each_with_its_own_token_and_journal(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    servers, toml = await two_tenants(start_emulator, tmp_path)
    run_dir = tmp_path / "runs" / "2026-12-04"
    summary_path = tmp_path / "summary.json"
    code, out, err = await cli(
        "run",
        "--tenants",
        str(toml),
        "--run-dir",
        str(run_dir),
        "--summary-json",
        str(summary_path),
        *LIMITS,
        env=app_env(),
    )
    assert code == 0, err
    for name, server in servers.items():
        journal = run_dir / f"{name}.jsonl"
        assert_each_offboarded_once(server, journal)
        header = replay_file(journal).header
        assert header["tenant_name"] == name and header["run_dir"] == str(run_dir)
        assert header["tenant_id"] == TENANT_IDS[name]
        assert header["comment"] == "CHG0042 nightly"
        # The token each emulator saw was its own tenant's (another tenant's token host
        # would not know the app in this tenant).
        assert server.emulator.truth.tokens_issued >= 1
        assert set(server.emulator.truth.offboard_posts) <= set(server.emulator.machines)
        assert name in out
    assert (run_dir / "tenants.toml").read_bytes() == toml.read_bytes()
    data = orjson.loads(summary_path.read_bytes())
    assert set(data["tenants"]) == {"contoso", "fabrikam"}
    assert data["exit_code"] == 0
    assert data["total"]["counts"]["offboarded"] == sum(len(windows(s)) for s in servers.values())


async def test_one_tenant_with_a_wrong_secret_fails_alone_while_the_others_finish(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    wrong = tmp_path / "fabrikam-secret"
    wrong.write_text("not-the-secret\n", encoding="utf-8")
    servers, toml = await two_tenants(
        start_emulator, tmp_path, fabrikam={"client_secret_file": str(wrong)}
    )
    run_dir = tmp_path / "run"
    code, out, err = await cli(
        "run", "--tenants", str(toml), "--run-dir", str(run_dir), *LIMITS, env=app_env()
    )
    assert code == 3, out + err
    assert_each_offboarded_once(servers["contoso"], run_dir / "contoso.jsonl")
    assert sum(servers["fabrikam"].emulator.truth.offboard_posts.values()) == 0
    assert not (run_dir / "fabrikam.jsonl").exists()
    fabrikam_line = next(line for line in out.splitlines() if "fabrikam" in line)
    assert " 3 " in fabrikam_line and "AADSTS" in fabrikam_line
    assert "not-the-secret" not in out + err


async def test_a_kill_mid_run_then_resume_run_dir_offboards_each_machine_once(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    servers, toml = await two_tenants(start_emulator, tmp_path, size=300)
    run_dir = tmp_path / "run"
    env = {
        k: v
        for k, v in os.environ.items()
        if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "XDG_STATE_HOME")
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bulkoffboard",
        "run",
        "--tenants",
        str(toml),
        "--run-dir",
        str(run_dir),
        *LIMITS,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env=env | app_env(),
    )
    posts = [s.emulator.truth.offboard_posts for s in servers.values()]
    while min(sum(p.values()) for p in posts) < 60 and proc.returncode is None:
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    code, out, err = await cli("resume", "--run-dir", str(run_dir), env=app_env())
    assert code == 0, out + err
    for name, server in servers.items():
        assert_each_offboarded_once(server, run_dir / f"{name}.jsonl")


async def test_tenant_filters_and_the_aggregated_reports(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    servers, toml = await two_tenants(start_emulator, tmp_path, size=20)
    run_dir = tmp_path / "run"
    code, _, err = await cli(
        "run",
        "--tenants",
        str(toml),
        "--run-dir",
        str(run_dir),
        "--tenant",
        "contoso",
        *LIMITS,
        env=app_env(),
    )
    assert code == 0, err
    assert (run_dir / "contoso.jsonl").is_file() and not (run_dir / "fabrikam.jsonl").exists()
    assert sum(servers["fabrikam"].emulator.truth.offboard_posts.values()) == 0
    code, _, err = await cli(
        "run",
        "--tenants",
        str(toml),
        "--run-dir",
        str(run_dir),
        "--tenant",
        "fabrikam",
        *LIMITS,
        env=app_env(),
    )
    assert code == 0, err

    code, out, _ = await cli("report", "--run-dir", str(run_dir))
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    expected = {name: len(windows(server)) for name, server in servers.items()}
    assert int(rows["contoso"][1]) == expected["contoso"]
    assert int(rows["fabrikam"][1]) == expected["fabrikam"]
    assert int(rows["total"][1]) == sum(expected.values())
    assert int(rows["total"][-1]) == 40

    code, out, _ = await cli("report", "--run-dir", str(run_dir), "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert next(iter(table[0])) == "tenant"
    assert collections.Counter(r["tenant"] for r in table) == {"contoso": 20, "fabrikam": 20}

    code, out, _ = await cli("report", "--run-dir", str(run_dir), "--format", "json")
    data = orjson.loads(out)
    assert set(data["tenants"]) == {"contoso", "fabrikam"}
    assert data["tenants"]["contoso"]["counts"]["offboarded"] == expected["contoso"]
    assert data["total"]["total"] == 40
    assert data["total"]["counts"]["offboarded"] == sum(expected.values())

    code, out, _ = await cli("report", "--run-dir", str(run_dir), "--format", "html")
    assert out.count('<section id="tenant-') == 2 and "Tenant fabrikam" in out
    code, out, _ = await cli(
        "report", "--run-dir", str(run_dir), "--format", "markdown", "--tenant", "fabrikam"
    )
    assert "## Tenant fabrikam" in out and "contoso" not in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[tenant]]\nname = "a"\ntenant_id = "t"\nsecret = "x"\n', "unknown key 'secret'"),
        (
            '[[tenant]]\nname = "a"\ntenant_id = "t"\n[[tenant]]\nname = "a"\ntenant_id = "u"\n',
            "tenant name 'a' is used twice",
        ),
        ('[[tenant]]\nname = "Contoso Ltd"\ntenant_id = "t"\n', "needs a name"),
        ('[[tenant]]\nname = "a"\n', "tenant 'a'.*needs a tenant_id"),
        ('[defaults]\nworkers = 0\n[[tenant]]\nname = "a"\ntenant_id = "t"\n', "workers"),
        ("[other]\nx = 1\n", "unknown table 'other'"),
        ("", "no \\[\\[tenant\\]\\] tables"),
    ],
)
def test_a_bad_tenants_file_is_a_usage_error_naming_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "tenants.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError, match=message):
        load_tenants(path)


async def test_a_bad_tenants_file_exits_2_before_anything_is_sent(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    servers, toml = await two_tenants(start_emulator, tmp_path, size=5)
    toml.write_text(toml.read_text() + '\n[[tenant]]\nname = "contoso"\ntenant_id = "x"\n')
    code, out, err = await cli(
        "run", "--tenants", str(toml), "--run-dir", str(tmp_path / "run"), env=app_env()
    )
    assert code == 2 and "used twice" in err and "Traceback" not in err
    assert all(sum(s.emulator.truth.offboard_posts.values()) == 0 for s in servers.values())
    assert not (tmp_path / "run").exists()


async def test_a_tenant_with_its_own_ids_and_a_source_flag_is_refused_naming_it(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    _, toml = await two_tenants(start_emulator, tmp_path, size=5)
    with pytest.raises(UsageError, match="tenant 'contoso' has its own ids"):
        await tenants.run_tenants(toml, tmp_path / "run", inactive_days=90)


def test_a_tenants_own_settings_win_over_the_environment(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("its-own\n", encoding="utf-8")
    path = tmp_path / "tenants.toml"
    path.write_text(
        '[defaults]\nclient_id = "app"\n'
        '[[tenant]]\nname = "a"\ntenant_id = "ta"\n'
        '[[tenant]]\nname = "b"\ntenant_id = "tb"\ncloud = "gcc-high"\n'
        f'client_secret_file = "{secret}"\n',
        encoding="utf-8",
    )
    a, b = load_tenants(path)
    env: dict[str, Any] = {
        "AZURE_TENANT_ID": "from-env",
        "AZURE_CLIENT_SECRET": "app-secret",
        "BULKOFFBOARD_CLOUD": "commercial",
    }
    first, second = tenants.tenant_connection(a, env=env), tenants.tenant_connection(b, env=env)
    assert (first.tenant_id, first.client_id, first.cloud) == ("ta", "app", "commercial")
    assert first.credential.secret == "app-secret"
    assert (second.tenant_id, second.cloud) == ("tb", "gcc-high")
    assert second.credential.secret == "its-own"
    assert "gov" in second.api_url


async def test_one_emulator_serving_three_tenants_sees_each_tenants_own_token(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    """The realistic set-up: one API host and one token host for every tenant; each tenant's
    token carries its tid, so a machine of another tenant would be 404 (the emulator routes
    each call by the token's tid)."""
    fleet = FleetSpec(size=30, seed=4, os_mix={"Windows10": 0.8, "Linux": 0.2})
    server = await start_emulator(
        EmulatorConfig(
            time_scale=0.01,
            action_start_s=0.05,
            action_complete_s=0.1,
            fleet=fleet,
            tenants=extra_tenants(2, fleet),
        )
    )
    emulator = server.emulator
    names = ("alpha", "beta", "gamma")
    text = (
        f'[defaults]\napi_url = "{server.base_url}"\nauthority_host = "{server.base_url}"\n'
        f'ca_bundle = "{server.ca_path}"\n\n'
    )
    for name, tid in zip(names, emulator.tenant_ids, strict=True):
        ids = write_ids_of(emulator.tenant(tid).machines, tmp_path / f"{name}.txt")
        text += f'[[tenant]]\nname = "{name}"\ntenant_id = "{tid}"\nids = "{ids.name}"\n\n'
    toml = tmp_path / "tenants.toml"
    toml.write_text(text, encoding="utf-8")
    run_dir = tmp_path / "run"
    code, out, err = await cli(
        "run", "--tenants", str(toml), "--run-dir", str(run_dir), *LIMITS, env=app_env()
    )
    assert code == 0, out + err
    for name, tid in zip(names, emulator.tenant_ids, strict=True):
        tenant = emulator.tenant(tid)
        replay = replay_file(run_dir / f"{name}.jsonl")
        outcomes = collections.Counter(str(r["outcome"]) for r in replay.results())
        offboardable = {m for m, d in tenant.machines.items() if d["osPlatform"] == "Windows10"}
        assert outcomes["offboarded"] == len(offboardable)
        assert outcomes.get("not_found", 0) == 0, "a token went to the wrong tenant"
        made = collections.Counter(
            a.machine_id for a in tenant.actions.values() if replay.header["run_id"] in a.comment
        )
        assert set(made) == offboardable and set(made.values()) == {1}


def write_ids_of(machines: Any, path: Path) -> Path:
    path.write_text("\n".join(machines) + "\n", encoding="utf-8")
    return path


async def test_cancel_run_dir_undoes_the_chosen_tenants_open_offboards_only(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    servers, toml = await two_tenants(start_emulator, tmp_path)
    run_dir = tmp_path / "run"
    env = app_env()
    code, _, err = await cli(
        "run", "--tenants", str(toml), "--run-dir", str(run_dir), *LIMITS, env=env
    )
    assert code == 0, err
    await asyncio.sleep(0.3)  # the online devices finish their actions
    contoso = servers["contoso"].emulator
    run_id = replay_file(run_dir / "contoso.jsonl").header["run_id"]
    open_ = {
        a.id
        for a in contoso.actions.values()
        if run_id in a.comment and contoso.action_status(a) == "Pending"
    }
    assert open_, "the fleet's inactive devices keep their offboard pending"
    summary = tmp_path / "cancel.json"
    code, out, err = await cli(
        "cancel",
        "--run-dir",
        str(run_dir),
        "--tenant",
        "contoso",
        "--summary-json",
        str(summary),
        *LIMITS,
        env=env,
    )
    assert code == 0, err
    assert set(contoso.truth.cancel_posts) == open_
    assert not servers["fabrikam"].emulator.truth.cancel_posts
    data = orjson.loads(summary.read_bytes())
    assert data["tenants"]["contoso"]["counts"]["cancelled"] == len(open_)
    assert "fabrikam" not in data["tenants"]


async def test_the_tenants_of_a_run_share_one_pool_of_connections(
    start_emulator: StartEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 tenants would otherwise hold thousands of TLS connections: every tenant's session
    draws on the one connector of the run, which is closed at the end."""
    import aiohttp

    from bulkoffboard import connections

    made: list[Any] = []
    real = aiohttp.TCPConnector

    def counting(*args: Any, **kwargs: Any) -> Any:
        connector = real(*args, **kwargs)
        made.append(connector)
        return connector

    monkeypatch.setattr(aiohttp, "TCPConnector", counting)
    servers, toml = await two_tenants(start_emulator, tmp_path, size=12)
    for name, value in app_env().items():
        monkeypatch.setenv(name, value)
    summary = await tenants.run_tenants(
        toml, tmp_path / "run", limits=["100/0.6", "1500/36"], workers=4
    )
    assert summary.exit_code == 0
    for name, server in servers.items():
        assert_each_offboarded_once(server, tmp_path / "run" / f"{name}.jsonl")
    assert len(made) == 1 and made[0].limit == connections.SHARED_CONNECTIONS
    assert made[0].closed
    # Outside a tenants run, a job keeps a pool of its own.
    assert connections._SHARED.get() is None
