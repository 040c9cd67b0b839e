"""Many tenants in one emulator: a fleet, actions, windows and ground truth per tenant.

Each MDE call is served as the tenant its token's ``tid`` names, so a token sent to the wrong
tenant's machine gets what MDE would answer: 404, the machine is not in that tenant. One
multi-tenant app registration (same client id and secret) is consented in every tenant.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import aiohttp
import pytest

from bulkoffboard.auth import ClientCredential, MsalTokenProvider
from bulkoffboard.cli import build_parser
from bulkoffboard.emulator import (
    AppRegistration,
    Emulator,
    EmulatorConfig,
    EmulatorServer,
    FleetSpec,
    TenantSpec,
    extra_tenants,
)
from bulkoffboard.emulator.app import DEFAULT_TENANT, tenant_id_for
from bulkoffboard.errors import NotFoundError, UsageError
from tests.conftest import StartEmulator, client_for
from tests.test_emulator import (  # noqa: F401 - _one_ca_for_the_file: one CA for this file too
    OTHER_CLIENT_ID,
    OTHER_SECRET,
    Api,
    _one_ca_for_the_file,
    assert_aad_error,
    assert_mde_error,
    claims_of,
    loop_time,
    request_token,
    sleep_until,
    windows_fleet,
)

SECOND = tenant_id_for(2)
THIRD = tenant_id_for(3)


def two_tenants(size: int = 5, **fleet_spec: Any) -> EmulatorConfig:
    """The default tenant and one more, both with a Windows fleet of ``size`` (and
    ``fleet_spec``), each under its own seed."""
    fleet = windows_fleet(size, **fleet_spec)
    return EmulatorConfig(fleet=fleet, tenants=extra_tenants(1, fleet))


async def api_in(
    server: EmulatorServer, session: aiohttp.ClientSession, tenant_id: str, **kwargs: Any
) -> Api:
    """An Api holding a token from ``tenant_id``'s token endpoint."""
    reply = await request_token(server, session, tenant=tenant_id, **kwargs)
    assert reply.status == 200, reply
    return Api(server, session, token=reply.body["access_token"])


def test_a_single_tenant_emulator_serves_only_its_own_tenant() -> None:
    emulator = Emulator(EmulatorConfig(fleet=FleetSpec(size=3)))
    assert emulator.tenant_ids == (DEFAULT_TENANT,)
    assert emulator.tenant(DEFAULT_TENANT) is emulator
    with pytest.raises(KeyError):
        emulator.tenant(SECOND)


def test_extra_tenants_get_their_own_ids_seeds_and_domains() -> None:
    specs = extra_tenants(2, FleetSpec(size=4, seed=5))
    assert [s.tenant_id for s in specs] == [SECOND, THIRD]
    assert len({DEFAULT_TENANT, SECOND, THIRD}) == 3
    assert [s.fleet.seed for s in specs] == [2005, 3005]
    assert [s.fleet.domain for s in specs] == ["t2.contoso.com", "t3.contoso.com"]
    assert all(s.fleet.size == 4 for s in specs)
    assert extra_tenants(0) == ()


def test_a_tenant_declared_twice_is_refused() -> None:
    spec = TenantSpec(tenant_id=SECOND)
    with pytest.raises(ValueError, match="declared twice"):
        Emulator(EmulatorConfig(tenants=(spec, spec)))
    with pytest.raises(ValueError, match="declared twice"):
        Emulator(EmulatorConfig(tenants=(TenantSpec(tenant_id=DEFAULT_TENANT),)))


async def test_each_tenant_serves_its_own_disjoint_fleet_to_tokens_carrying_its_tid(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    fleet = windows_fleet(6)
    server = await start_emulator(EmulatorConfig(fleet=fleet, tenants=extra_tenants(2, fleet)))
    emulator = server.emulator
    assert emulator.tenant_ids == (DEFAULT_TENANT, SECOND, THIRD)
    fleets = {tid: set(emulator.tenant(tid).machines) for tid in emulator.tenant_ids}
    assert all(len(ids) == 6 for ids in fleets.values())
    assert not fleets[DEFAULT_TENANT] & fleets[SECOND]
    assert not fleets[SECOND] & fleets[THIRD]
    assert not fleets[DEFAULT_TENANT] & fleets[THIRD]
    for tid in emulator.tenant_ids:
        api = await api_in(server, http_session, tid)
        claims = claims_of(api.token or "")
        assert claims["tid"] == tid
        assert claims["iss"] == f"https://sts.windows.net/{tid}/"
        assert set(await api.machine_ids()) == fleets[tid]
        # Each tenant's OpenID configuration names its own issuer.
        discovery = await api.get(f"/{tid}/v2.0/.well-known/openid-configuration")
        assert discovery.body["issuer"].endswith(f"/{tid}/v2.0")
        assert emulator.tenant(tid).truth.tokens_issued == 1
        assert emulator.tenant(tid).truth.calls == {"machines": 1}


async def test_a_token_of_one_tenant_cannot_see_offboard_tag_or_cancel_in_another(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(two_tenants(health_mix={"Inactive": 1.0}))
    emulator = server.emulator
    first, second = emulator, emulator.tenant(SECOND)
    api_a = await api_in(server, http_session, DEFAULT_TENANT)
    api_b = await api_in(server, http_session, SECOND)
    b_machine = next(iter(second.machines))
    a_machine = next(iter(first.machines))
    # Tenant A's token on B's machine: not found, as in MDE, and nothing happens in B.
    assert_mde_error(await api_a.get(f"/api/machines/{b_machine}"), 404, "ResourceNotFound")
    assert_mde_error(await api_a.offboard(b_machine), 404, "ResourceNotFound")
    tag = {"Value": "X", "Action": "Add"}
    reply = await api_a.call("POST", f"/api/machines/{b_machine}/tags", json=tag)
    assert_mde_error(reply, 404, "ResourceNotFound")
    bulk = await api_a.call(
        "POST",
        "/api/machines/AddOrRemoveTagForMultipleMachines",
        json={**tag, "MachineIds": [b_machine]},
    )
    assert bulk.body["value"] == []
    assert "X" not in second.machines[b_machine]["machineTags"]
    # Actions are per tenant too: B's action is unknown to A.
    b_action = (await api_b.offboard(b_machine)).body["id"]
    assert_mde_error(await api_a.get(f"/api/machineactions/{b_action}"), 404, "ResourceNotFound")
    cancel = await api_a.call(
        "POST", f"/api/machineactions/{b_action}/cancel", json={"Comment": "not mine"}
    )
    assert_mde_error(cancel, 404, "ResourceNotFound")
    assert await api_a.actions() == []
    assert [a["id"] for a in await api_b.actions()] == [b_action]
    assert (await api_b.action(b_action))["status"] == "Pending"
    # B's own machine and A's own machine still work for their own tokens.
    assert (await api_a.offboard(a_machine)).status == 201
    assert first.truth.offboard_posts == {b_machine: 1, a_machine: 1}
    assert first.truth.actions_created == {a_machine: 1}
    assert second.truth.offboard_posts == {b_machine: 1}
    assert second.truth.actions_created == {b_machine: 1}
    assert not second.truth.tag_operations
    assert not second.truth.cancel_posts


@pytest.mark.looptime
async def test_windows_are_counted_per_tenant_so_one_at_its_limit_leaves_another_alone(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(two_tenants(size=101))
    emulator = server.emulator
    api_a = await api_in(server, http_session, DEFAULT_TENANT)
    api_b = await api_in(server, http_session, SECOND)
    a_machines = list(emulator.machines)
    b_machines = list(emulator.tenant(SECOND).machines)
    start = loop_time()
    for machine_id in a_machines[:100]:
        assert (await api_a.offboard(machine_id)).status == 201
    throttled = await api_a.offboard(a_machines[100])
    assert_mde_error(throttled, 429, "TooManyRequests")
    # The same app (same client id) in tenant B has windows of its own.
    for machine_id in b_machines[:100]:
        assert (await api_b.offboard(machine_id)).status == 201
    assert (await api_b.offboard(b_machines[100])).status == 429
    await sleep_until(start + 60)
    assert (await api_a.offboard(a_machines[100])).status == 201
    assert emulator.truth.throttled == {"offboard": 1}
    assert emulator.tenant(SECOND).truth.throttled == {"offboard": 1}
    assert emulator.truth.max_in_window["offboard 60"] == 101
    assert emulator.tenant(SECOND).truth.max_in_window["offboard 60"] == 101


async def test_forced_429s_and_ground_truth_are_per_tenant_and_truth_is_served_per_tenant(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(two_tenants())
    emulator = server.emulator
    api_a = await api_in(server, http_session, DEFAULT_TENANT)
    api_b = await api_in(server, http_session, SECOND)
    emulator.tenant(SECOND).force_429(1, retry_after_s=5)
    assert (await api_a.get("/api/machines")).status == 200
    assert (await api_b.get("/api/machines")).status == 429
    assert (await api_b.get("/api/machines")).status == 200
    anonymous = Api(server, http_session)
    served_a = (await anonymous.get("/_emulator/truth")).body
    served_b = (await anonymous.get("/_emulator/truth", tenant=SECOND)).body
    assert served_a == emulator.truth.as_json()
    assert served_b == emulator.tenant(SECOND).truth.as_json()
    assert served_a["calls"] == {"machines": 1}
    assert served_b["calls"] == {"machines": 2}
    assert served_b["throttled"] == {"machines": 1}
    assert (await anonymous.get("/_emulator/truth", tenant=THIRD)).status == 404


async def test_tenants_have_their_own_apps_when_declared(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    only_b = AppRegistration(client_id=OTHER_CLIENT_ID, secret=OTHER_SECRET)
    spec = TenantSpec(tenant_id=SECOND, fleet=windows_fleet(2, seed=9), apps=(only_b,))
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(2), tenants=(spec,)))
    in_b = await request_token(
        server, http_session, tenant=SECOND, client_id=OTHER_CLIENT_ID, secret=OTHER_SECRET
    )
    assert in_b.status == 200
    assert claims_of(in_b.body["access_token"])["tid"] == SECOND
    not_in_a = await request_token(
        server, http_session, client_id=OTHER_CLIENT_ID, secret=OTHER_SECRET
    )
    assert_aad_error(not_in_a, 400, "unauthorized_client", 700016)
    assert_aad_error(
        await request_token(server, http_session, tenant=SECOND), 400, "unauthorized_client", 700016
    )
    unknown = await request_token(server, http_session, tenant=THIRD)
    assert_aad_error(unknown, 400, "invalid_request", 90002)


async def test_a_token_signed_by_another_emulator_is_401_whatever_tenant_it_names(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(two_tenants())
    stranger = Emulator(two_tenants()).tenant(SECOND)
    forged, _ = stranger.issue_token(stranger.config.apps[0], stranger.config.audience)
    assert claims_of(forged)["tid"] == SECOND
    reply = await Api(server, http_session, forged).get("/api/machines")
    assert_mde_error(reply, 401, "Unauthorized")
    assert not server.emulator.tenant(SECOND).truth.calls
    assert not server.emulator.truth.calls


async def test_seeded_pending_offboards_of_another_tenant_are_pending_and_block_a_new_one(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    fleet = windows_fleet(20)
    pending_fleet = windows_fleet(20, seed=77, pending_fraction=0.5)
    spec = TenantSpec(tenant_id=SECOND, fleet=pending_fleet)
    server = await start_emulator(EmulatorConfig(fleet=fleet, tenants=(spec,)))
    api_b = await api_in(server, http_session, SECOND)
    seeded = await api_b.actions()
    assert seeded
    assert {a["status"] for a in seeded} == {"Pending"}
    assert_mde_error(
        await api_b.offboard(seeded[0]["machineId"]), 400, "ActiveRequestAlreadyExists"
    )
    assert await (await api_in(server, http_session, DEFAULT_TENANT)).actions() == []


async def test_msal_and_the_client_work_against_the_second_tenant(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(two_tenants())
    tokens = MsalTokenProvider(
        tenant_id=SECOND,
        client_id=server.emulator.config.apps[0].client_id,
        credential=ClientCredential(secret=server.emulator.config.apps[0].secret or ""),
        authority_host=server.base_url,
        ca_bundle=server.ca_path,
    )
    try:
        client = client_for(server, http_session, tokens)
        second = server.emulator.tenant(SECOND)
        listed = await client.list_machines()
        assert {m["id"] for m in listed} == set(second.machines)
        b_machine = next(iter(second.machines))
        action = await client.offboard(b_machine, "retire in B")
        assert second.actions[action.id].machine_id == b_machine
        with pytest.raises(NotFoundError):
            await client.offboard(next(iter(server.emulator.machines)), "A's machine")
        assert server.authority_for(SECOND) == f"{server.base_url}/{SECOND}"
    finally:
        tokens.close()
    assert not server.emulator.truth.actions_created


# -- bulkoffboard emulate --tenants N ----------------------------------------------------------


def test_emulate_refuses_fewer_than_one_tenant() -> None:
    args = build_parser().parse_args(["emulate", "--tenants", "0"])
    with pytest.raises(UsageError, match="--tenants"):
        args.func(args)


async def test_emulate_with_tenants_prints_each_tenant_and_serves_each_fleet(
    http_session: aiohttp.ClientSession,
) -> None:
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH", "SYSTEMROOT", "TMPDIR", "XDG_STATE_HOME")
    env = {k: v for k, v in os.environ.items() if k in keep} | {"PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bulkoffboard",
        "emulate",
        "--tenants",
        "3",
        "--machines",
        "4",
        "--plain-http",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not lines or not lines[-1].startswith("tenant 3:"):
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, lines
            lines.append(line.decode().strip())
        url = lines[0].split("listening on ", 1)[1]
        assert f"export AZURE_TENANT_ID={DEFAULT_TENANT}" in lines
        tenants = [line.split(": ", 1)[1] for line in lines if line.startswith("tenant ")]
        assert tenants == [DEFAULT_TENANT, SECOND, THIRD]
        seen: list[set[str]] = []
        for tenant in tenants:
            form = {
                "grant_type": "client_credentials",
                "client_id": "aaaaaaaa-bbbb-cccc-dddd-000000000001",
                "client_secret": "emulator-secret-not-for-production",
                "scope": "https://api.securitycenter.microsoft.com/.default",
            }
            async with http_session.post(f"{url}/{tenant}/oauth2/v2.0/token", data=form) as resp:
                token = (await resp.json())["access_token"]
            headers = {"Authorization": f"Bearer {token}"}
            async with http_session.get(f"{url}/api/machines", headers=headers) as resp:
                seen.append({m["id"] for m in (await resp.json())["value"]})
        assert [len(ids) for ids in seen] == [4, 4, 4]
        assert len(set().union(*seen)) == 12
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
