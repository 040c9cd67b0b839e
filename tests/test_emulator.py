"""The emulator over real loopback HTTPS: TLS, Entra ID, MDE endpoints, limits, lifecycle, faults.

Every test below talks to a running ``EmulatorServer`` through aiohttp (and through msal for the
token flows) and checks what comes back against ``shared/mde-api.md`` and against the emulator's
ground truth.

Time: tests marked ``looptime`` run in fake loop time. The emulator reads the running loop's
clock, so ``asyncio.sleep`` moves rate windows, token expiry and the action lifecycle forward
without waiting for real. Tokens in those tests come from the token endpoint over HTTP (inside
the loop) or from ``issue_token``; msal's blocking calls in a worker thread also work under
looptime, but its cache keeps wall time, which fake time does not move.

Speed: making a throwaway CA costs two RSA keys (about 0.15 s), so emulators in this file share
one CA and server certificate, except in the TLS tests (they ask for ``fresh_ca``).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import hashlib
import ssl
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import msal
import orjson
import pytest
import requests
import trustme
import yarl

from bulkoffboard.auth import ClientCredential, MsalTokenProvider
from bulkoffboard.emulator import (
    AppRegistration,
    Emulator,
    EmulatorConfig,
    EmulatorServer,
    Faults,
    FleetSpec,
)
from bulkoffboard.emulator import server as server_module
from bulkoffboard.emulator.app import (
    DEFAULT_AUDIENCE,
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TENANT,
)
from bulkoffboard.emulator.fleet import (
    DEFAULT_HEALTH_MIX,
    DEFAULT_OS_MIX,
    GROUPS,
    SUPPORTED_PLATFORMS,
    TAGS,
    machine_id_for,
    make_fleet,
)
from bulkoffboard.errors import AuthError, UsageError
from tests.conftest import StartEmulator, token_provider

SCOPE = f"{DEFAULT_AUDIENCE}/.default"
WINDOWS = {"Windows10": 1.0}
ONLINE = {"Active": 1.0}
OFFLINE = {"Inactive": 1.0}
OTHER_CLIENT_ID = "aaaaaaaa-bbbb-cccc-dddd-000000000002"
OTHER_SECRET = "the-other-apps-secret"
CERT_CLIENT_ID = "aaaaaaaa-bbbb-cccc-dddd-0000000000ce"
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def windows_fleet(size: int, **kwargs: Any) -> FleetSpec:
    """A fleet of Windows 10 machines (all offboardable)."""
    return FleetSpec(size=size, os_mix=WINDOWS, **kwargs)


# -- one CA for the file -------------------------------------------------------------------------


@functools.cache
def _shared_ca() -> tuple[Any, Any]:
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    return ca, ca.issue_cert("127.0.0.1", "::1", "localhost", key_type=trustme.KeyType.RSA)


class _SharedCA:
    """Stands in for ``trustme.CA`` in the server module: one RSA CA and server certificate for
    the whole file, instead of two fresh 2048-bit keys (about 0.15 s) per emulator."""

    def __init__(self, **_: Any) -> None:
        self._ca, self._leaf = _shared_ca()
        self.cert_pem = self._ca.cert_pem

    def issue_cert(self, *_names: str, **_: Any) -> Any:
        return self._leaf


@pytest.fixture
def fresh_ca() -> None:
    """Asked for by the TLS tests: their emulators make a throwaway CA of their own."""


@pytest.fixture(autouse=True)
def _one_ca_for_the_file(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "fresh_ca" not in request.fixturenames:
        shim = types.SimpleNamespace(CA=_SharedCA, KeyType=trustme.KeyType)
        monkeypatch.setattr(server_module, "trustme", shim)


# -- talking to the emulator -------------------------------------------------------------------


class Reply(NamedTuple):
    status: int
    headers: Mapping[str, str]
    body: Any


@dataclass
class Api:
    """Plain aiohttp requests to one emulator, with a bearer token (or none)."""

    server: EmulatorServer
    session: aiohttp.ClientSession
    token: str | None = None
    ssl_context: ssl.SSLContext | bool = field(init=False)

    def __post_init__(self) -> None:
        self.ssl_context = self.server.client_ssl_context()

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        form: Mapping[str, str] | None = None,
    ) -> Reply:
        sent: dict[str, str] = {}
        if self.token is not None:
            sent["Authorization"] = f"Bearer {self.token}"
        data: bytes | aiohttp.FormData | None = None
        if json is not None:
            data = orjson.dumps(json)
            sent["Content-Type"] = "application/json"
        elif form is not None:
            data = aiohttp.FormData(dict(form))
        sent.update(headers or {})
        url = yarl.URL(self.server.base_url + path, encoded=True)
        async with self.session.request(
            method, url, data=data, params=params, headers=sent, ssl=self.ssl_context
        ) as resp:
            raw = await resp.read()
            body: Any
            try:
                body = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                body = raw.decode(errors="replace")
            return Reply(resp.status, resp.headers, body)

    async def get(self, path: str, **params: str) -> Reply:
        return await self.call("GET", path, params=params or None)

    async def offboard(self, machine_id: str, body: Any = None) -> Reply:
        payload = {"Comment": "Retired asset, change CHG0042"} if body is None else body
        return await self.call("POST", f"/api/machines/{machine_id}/offboard", json=payload)

    async def machine_ids(self, **params: str) -> list[str]:
        reply = await self.get("/api/machines", **params)
        assert reply.status == 200, reply
        return [m["id"] for m in reply.body["value"]]

    async def actions(self, **params: str) -> list[dict[str, Any]]:
        reply = await self.get("/api/machineactions", **params)
        assert reply.status == 200, reply
        actions: list[dict[str, Any]] = reply.body["value"]
        return actions

    async def action(self, action_id: str) -> dict[str, Any]:
        reply = await self.get(f"/api/machineactions/{action_id}")
        assert reply.status == 200, reply
        action: dict[str, Any] = reply.body
        return action


async def request_token(
    server: EmulatorServer,
    session: aiohttp.ClientSession,
    *,
    client_id: str = DEFAULT_CLIENT_ID,
    secret: str = DEFAULT_CLIENT_SECRET,
    tenant: str | None = None,
    scope: str = SCOPE,
) -> Reply:
    """A client-credentials POST to the v2.0 token endpoint, as the docs show it."""
    tenant = tenant or server.emulator.config.tenant_id
    form = {
        "grant_type": "client_credentials",
        "client_id": client_id,
        "client_secret": secret,
        "scope": scope,
    }
    return await Api(server, session).call("POST", f"/{tenant}/oauth2/v2.0/token", form=form)


async def api_for(
    server: EmulatorServer,
    session: aiohttp.ClientSession,
    *,
    client_id: str = DEFAULT_CLIENT_ID,
    secret: str = DEFAULT_CLIENT_SECRET,
) -> Api:
    """An Api holding a token from the emulator's token endpoint."""
    reply = await request_token(server, session, client_id=client_id, secret=secret)
    assert reply.status == 200, reply
    return Api(server, session, token=reply.body["access_token"])


def claims_of(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = orjson.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def assert_mde_error(reply: Reply, status: int, code: str) -> str:
    """The documented error shape ``{"error": {"code", "message", "target"}}``; the message."""
    assert reply.status == status, reply
    assert isinstance(reply.body, dict), reply
    assert set(reply.body) == {"error"}
    error = reply.body["error"]
    assert set(error) == {"code", "message", "target"}
    assert error["code"] == code, reply
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["target"], str)
    assert error["target"]
    message: str = error["message"]
    return message


def assert_aad_error(reply: Reply, status: int, error: str, code: int) -> None:
    """An Entra ID error: OAuth ``error``, ``AADSTSnnn`` in the description, ``error_codes``."""
    assert reply.status == status, reply
    assert reply.body["error"] == error
    assert reply.body["error_codes"] == [code]
    assert reply.body["error_description"].startswith(f"AADSTS{code}: ")


def ids_where(server: EmulatorServer, **values: Any) -> list[str]:
    return [
        machine_id
        for machine_id, machine in server.emulator.machines.items()
        if all(machine[key] == value for key, value in values.items())
    ]


def loop_time() -> float:
    return asyncio.get_running_loop().time()


async def sleep_until(moment: float) -> None:
    """Sleep (in loop time) until ``moment`` on the emulator's clock."""
    await asyncio.sleep(max(0.0, moment - loop_time()))


# -- HTTPS with a throwaway CA -----------------------------------------------------------------


async def test_ca_pem_is_written_where_asked_and_a_client_trusting_it_connects(
    start_emulator: StartEmulator,
    http_session: aiohttp.ClientSession,
    tmp_path: Path,
    fresh_ca: None,
) -> None:
    ca_path = tmp_path / "not" / "yet" / "there" / "emulator-ca.pem"
    server = await start_emulator(ca_path=ca_path)
    assert server.base_url.startswith("https://127.0.0.1:")
    assert server.ca_pem is not None
    assert ca_path.read_bytes() == server.ca_pem
    assert server.ca_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    trusting = ssl.create_default_context(cafile=str(ca_path))
    async with http_session.get(server.base_url + "/_emulator/truth", ssl=trusting) as resp:
        assert resp.status == 200
    # Throwaway: every emulator makes a CA of its own, which trusts nothing else.
    other = await start_emulator()
    assert other.ca_pem != server.ca_pem
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with http_session.get(other.base_url + "/_emulator/truth", ssl=trusting):
            pass


async def test_client_that_does_not_trust_the_ca_fails_tls_verification(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession, fresh_ca: None
) -> None:
    server = await start_emulator()
    url = server.base_url + "/_emulator/truth"
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with http_session.get(url):  # the system trust store only
            pass
    stranger = trustme.CA()  # another throwaway CA is no better
    context = ssl.create_default_context(cadata=stranger.cert_pem.bytes().decode())
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with http_session.get(url, ssl=context):
            pass
    # msal (through requests) refuses it too when it is not given the CA.
    untrusting = MsalTokenProvider(
        tenant_id=server.emulator.config.tenant_id,
        client_id=DEFAULT_CLIENT_ID,
        credential=ClientCredential(secret=DEFAULT_CLIENT_SECRET),
        authority_host=server.base_url,
        timeout_s=5,
    )
    try:
        with pytest.raises(UsageError, match="TLS verification failed"):
            await untrusting.token()
    finally:
        untrusting.close()
    assert server.emulator.truth.tokens_issued == 0


async def test_plain_http_is_an_explicit_option(
    http_session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    assert EmulatorServer().tls is True  # HTTPS unless asked otherwise
    ca_path = tmp_path / "ca.pem"
    config = EmulatorConfig(fleet=windows_fleet(3))
    async with EmulatorServer(config=config, tls=False, ca_path=ca_path) as server:
        assert server.base_url.startswith("http://127.0.0.1:")
        assert server.ca_pem is None
        assert not ca_path.exists()
        assert server.client_ssl_context() is False
        api = await api_for(server, http_session)
        assert len(await api.machine_ids()) == 3


@pytest.mark.parametrize(
    "host",
    ["0.0.0.0", "::", "192.0.2.10", "10.1.2.3", "example.com"],  # noqa: S104 - refused
)
def test_refuses_to_bind_a_non_loopback_host(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        EmulatorServer(host=host)


async def test_loopback_host_names_are_accepted(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession, fresh_ca: None
) -> None:
    server = await start_emulator(host="localhost")
    assert server.base_url.startswith("https://localhost:")
    async with http_session.get(
        server.base_url + "/_emulator/truth", ssl=server.client_ssl_context()
    ) as resp:
        assert resp.status == 200


# -- Entra ID ----------------------------------------------------------------------------------


async def test_openid_configuration_names_the_v2_token_endpoint(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator()
    api = Api(server, http_session)
    for path in ("/v2.0/.well-known/openid-configuration", "/.well-known/openid-configuration"):
        reply = await api.get(f"/{DEFAULT_TENANT}{path}")
        assert reply.status == 200
        assert reply.body["token_endpoint"] == f"{server.authority}/oauth2/v2.0/token"
        assert reply.body["issuer"] == f"{server.authority}/v2.0"
        assert "private_key_jwt" in reply.body["token_endpoint_auth_methods_supported"]
        assert "client_secret_post" in reply.body["token_endpoint_auth_methods_supported"]
    unknown = await api.get(
        "/99999999-0000-0000-0000-000000000000/v2.0/.well-known/openid-configuration"
    )
    assert_aad_error(unknown, 400, "invalid_tenant", 90002)


async def test_client_secret_grant_gives_a_bearer_token_for_the_mde_audience_with_the_app_roles(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator()
    reply = await request_token(server, http_session)
    assert reply.status == 200, reply
    assert reply.body["token_type"] == "Bearer"
    assert reply.body["expires_in"] == 3600  # "Tokens last 1 h"
    claims = claims_of(reply.body["access_token"])
    assert claims["aud"] == DEFAULT_AUDIENCE
    assert claims["appid"] == DEFAULT_CLIENT_ID
    assert claims["tid"] == DEFAULT_TENANT
    assert "Machine.Offboard" in claims["roles"]
    assert claims["exp"] - claims["iat"] == pytest.approx(3600, abs=1)
    # msal gets one through the same endpoint (its blocking calls run in a thread).
    token = await token_provider(server).token()
    assert claims_of(token)["appid"] == DEFAULT_CLIENT_ID
    assert server.emulator.truth.tokens_issued == 2


@pytest.fixture(scope="module")
def app_certificates() -> tuple[tuple[str, str], tuple[str, str]]:
    """(key PEM, certificate PEM) of two RSA app certificates: registered, and not."""
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    pairs = []
    for name in ("bulkoffboard-app", "somebody-else"):
        leaf = ca.issue_cert(f"{name}.example", key_type=trustme.KeyType.RSA)
        pairs.append(
            (leaf.private_key_pem.bytes().decode(), leaf.cert_chain_pems[0].bytes().decode())
        )
    return pairs[0], pairs[1]


def certificate_config(cert_pem: str, **kwargs: Any) -> EmulatorConfig:
    app = AppRegistration(client_id=CERT_CLIENT_ID, secret=None, certificate_pem=cert_pem.encode())
    return EmulatorConfig(apps=(app,), **kwargs)


def msal_token(server: EmulatorServer, client_id: str, credential: Any) -> dict[str, Any]:
    """msal's ConfidentialClientApplication against the emulator (blocking: run in a thread)."""
    http = requests.Session()
    http.trust_env = False
    http.verify = str(server.ca_path)
    try:
        app = msal.ConfidentialClientApplication(
            client_id,
            client_credential=credential,
            authority=server.authority,
            http_client=http,
            instance_discovery=False,
            timeout=10,
        )
        result: dict[str, Any] = app.acquire_token_for_client(scopes=[SCOPE])
        return result
    finally:
        http.close()


@pytest.mark.parametrize("form", ["public_certificate", "thumbprint"])
async def test_certificate_assertion_grant_through_msal_gives_a_working_token(
    start_emulator: StartEmulator,
    http_session: aiohttp.ClientSession,
    app_certificates: tuple[tuple[str, str], tuple[str, str]],
    form: str,
) -> None:
    key_pem, cert_pem = app_certificates[0]
    server = await start_emulator(certificate_config(cert_pem, fleet=windows_fleet(2)))
    credential: dict[str, str] = {"private_key": key_pem}
    if form == "public_certificate":  # PS256 with x5t#S256 and x5c
        credential["public_certificate"] = cert_pem
    else:  # RS256 with x5t
        der = ssl.PEM_cert_to_DER_cert(cert_pem)
        credential["thumbprint"] = hashlib.sha1(der, usedforsecurity=False).hexdigest()
    result = await asyncio.to_thread(msal_token, server, CERT_CLIENT_ID, credential)
    assert "access_token" in result, result
    assert claims_of(result["access_token"])["appid"] == CERT_CLIENT_ID
    api = Api(server, http_session, token=result["access_token"])
    assert (await api.offboard(next(iter(server.emulator.machines)))).status == 201


async def test_token_provider_with_a_certificate_file_gets_a_working_token(
    start_emulator: StartEmulator,
    http_session: aiohttp.ClientSession,
    app_certificates: tuple[tuple[str, str], tuple[str, str]],
    tmp_path: Path,
) -> None:
    key_pem, cert_pem = app_certificates[0]
    server = await start_emulator(certificate_config(cert_pem, fleet=windows_fleet(2)))
    pem = tmp_path / "app.pem"
    pem.write_text(key_pem + cert_pem)
    provider = MsalTokenProvider(
        tenant_id=DEFAULT_TENANT,
        client_id=CERT_CLIENT_ID,
        credential=ClientCredential(certificate_path=pem),
        authority_host=server.base_url,
        ca_bundle=server.ca_path,
    )
    try:
        token = await provider.token()
    finally:
        provider.close()
    api = Api(server, http_session, token=token)
    assert (await api.offboard(next(iter(server.emulator.machines)))).status == 201


async def test_certificate_not_registered_on_the_app_is_refused_with_aadsts700027(
    start_emulator: StartEmulator,
    app_certificates: tuple[tuple[str, str], tuple[str, str]],
) -> None:
    registered, stranger = app_certificates
    server = await start_emulator(certificate_config(registered[1]))
    credential = {"private_key": stranger[0], "public_certificate": stranger[1]}
    result = await asyncio.to_thread(msal_token, server, CERT_CLIENT_ID, credential)
    assert "access_token" not in result
    assert result["error"] == "invalid_client"
    assert result["error_description"].startswith("AADSTS700027: ")
    # A secret-only app has no certificate to check an assertion against.
    plain = await start_emulator()
    result = await asyncio.to_thread(msal_token, plain, DEFAULT_CLIENT_ID, credential)
    assert result["error_description"].startswith("AADSTS700027: ")
    assert server.emulator.truth.tokens_issued == plain.emulator.truth.tokens_issued == 0


async def test_wrong_client_secret_is_aadsts7000215(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator()
    reply = await request_token(server, http_session, secret="not-the-secret")
    assert_aad_error(reply, 401, "invalid_client", 7000215)
    with pytest.raises(AuthError) as caught:
        await token_provider(server, secret="not-the-secret").token()
    assert caught.value.code == "AADSTS7000215"
    assert server.emulator.truth.tokens_issued == 0


async def test_unknown_client_is_aadsts700016(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator()
    stranger = "0badc0de-0000-0000-0000-000000000000"
    reply = await request_token(server, http_session, client_id=stranger)
    assert_aad_error(reply, 400, "unauthorized_client", 700016)
    assert stranger in reply.body["error_description"]
    with pytest.raises(AuthError) as caught:
        await token_provider(server, client_id=stranger).token()
    assert caught.value.code == "AADSTS700016"


async def test_unknown_tenant_is_aadsts90002(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator()
    other = "99999999-0000-0000-0000-000000000000"
    reply = await request_token(server, http_session, tenant=other)
    assert_aad_error(reply, 400, "invalid_request", 90002)
    provider = MsalTokenProvider(
        tenant_id=other,
        client_id=DEFAULT_CLIENT_ID,
        credential=ClientCredential(secret=DEFAULT_CLIENT_SECRET),
        authority_host=server.base_url,
        ca_bundle=server.ca_path,
    )
    try:
        with pytest.raises(AuthError, match="OpenID configuration"):
            await provider.token()
    finally:
        provider.close()
    assert server.emulator.truth.tokens_issued == 0


async def test_scope_of_another_resource_is_refused_at_the_token_endpoint(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator()
    reply = await request_token(server, http_session, scope="https://graph.microsoft.com/.default")
    assert_aad_error(reply, 400, "invalid_resource", 500011)
    no_default = await request_token(server, http_session, scope=DEFAULT_AUDIENCE)
    assert_aad_error(no_default, 400, "invalid_scope", 1002012)


@pytest.mark.looptime
async def test_token_expires_after_token_lifetime_and_the_api_then_answers_401(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(token_lifetime_s=300, fleet=windows_fleet(2)))
    api = await api_for(server, http_session)
    issued = loop_time()
    first, second = server.emulator.machines
    assert (await api.get(f"/api/machines/{first}")).status == 200
    await sleep_until(issued + 299)
    assert (await api.get(f"/api/machines/{first}")).status == 200
    await sleep_until(issued + 301)
    message = assert_mde_error(await api.get(f"/api/machines/{first}"), 401, "Unauthorized")
    assert "expired" in message
    assert_mde_error(await api.offboard(second), 401, "Unauthorized")
    assert not server.emulator.truth.actions_created
    fresh = await api_for(server, http_session)  # a new token works again
    assert (await fresh.offboard(second)).status == 201


@pytest.mark.looptime
async def test_msal_token_in_a_worker_thread_works_under_looptime_and_expires_on_the_loop_clock(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(token_lifetime_s=600, fleet=windows_fleet(1)))
    provider = token_provider(server)
    before = loop_time()
    token = await provider.token()  # msal in asyncio.to_thread, the emulator in this loop
    assert loop_time() - before < 1  # the thread's real time does not leap the fake clock
    path = f"/api/machines/{next(iter(server.emulator.machines))}"
    assert (await Api(server, http_session, token).get(path)).status == 200
    await sleep_until(before + 601)
    assert_mde_error(await Api(server, http_session, token).get(path), 401, "Unauthorized")
    # msal's own cache keeps wall time, so only a forced refresh (what MdeClient does on a
    # 401) gets a new token; it is valid on the emulator's clock again.
    fresh = await provider.refresh(token)
    assert fresh != token
    assert (await Api(server, http_session, fresh).get(path)).status == 200


async def test_token_without_machine_offboard_role_gets_403_from_offboard(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    reader = AppRegistration(
        client_id=OTHER_CLIENT_ID, secret=OTHER_SECRET, roles=("Machine.Read.All",)
    )
    server = await start_emulator(
        EmulatorConfig(apps=(AppRegistration(), reader), fleet=windows_fleet(2))
    )
    api = await api_for(server, http_session, client_id=OTHER_CLIENT_ID, secret=OTHER_SECRET)
    assert claims_of(api.token or "")["roles"] == ["Machine.Read.All"]
    machine_id = next(iter(server.emulator.machines))
    message = assert_mde_error(await api.offboard(machine_id), 403, "Forbidden")
    assert "Machine.Offboard" in message
    assert (await api.get(f"/api/machines/{machine_id}")).status == 200  # its own role works
    assert not server.emulator.truth.actions_created


async def test_token_for_the_wrong_audience_gets_403(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(2)))
    emulator = server.emulator
    token, _ = emulator.issue_token(emulator.config.apps[0], "https://graph.microsoft.com")
    api = Api(server, http_session, token=token)
    machine_id = next(iter(emulator.machines))
    assert_mde_error(await api.offboard(machine_id), 403, "Forbidden")
    assert_mde_error(await api.get("/api/machines"), 403, "Forbidden")
    assert not emulator.truth.actions_created


# -- MDE offboard ------------------------------------------------------------------------------


async def test_offboard_answers_201_with_a_pending_machine_action(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(3)))
    api = await api_for(server, http_session)
    first, second, _ = server.emulator.machines
    reply = await api.offboard(first, {"Comment": "Retired asset, change CHG0042"})
    assert reply.status == 201
    action = reply.body
    assert action["type"] == "Offboard"
    assert action["status"] == "Pending"
    assert action["machineId"] == first
    assert action["computerDnsName"] == server.emulator.machines[first]["computerDnsName"]
    assert action["requestorComment"] == "Retired asset, change CHG0042"
    assert action["requestor"] == "bulkoffboard-emulator-app"
    assert action["requestSource"] == "PublicApi"
    assert action["errorHResult"] == 0
    for empty in ("title", "scope", "cancellationRequestor", "cancellationComment"):
        assert action[empty] is None
    created = datetime.fromisoformat(action["creationDateTimeUtc"])
    assert abs(created - datetime.now(UTC)) < timedelta(minutes=1)
    assert action["id"] in server.emulator.actions
    # /api/v1.0 pins the version and behaves the same.
    pinned = await api.call("POST", f"/api/v1.0/machines/{second}/offboard", json={"Comment": "x"})
    assert pinned.status == 201
    assert server.emulator.truth.actions_created == {first: 1, second: 1}


async def test_offboard_answers_200_when_offboard_status_is_200(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(offboard_status=200, fleet=windows_fleet(1)))
    api = await api_for(server, http_session)
    reply = await api.offboard(next(iter(server.emulator.machines)))
    assert reply.status == 200
    assert reply.body["status"] == "Pending"


async def test_offboard_without_comment_is_400_missing_required_parameter(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(1)))
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    assert_mde_error(await api.offboard(machine_id, {}), 400, "MissingRequiredParameter")
    assert_mde_error(
        await api.offboard(machine_id, {"Reason": "retire"}), 400, "MissingRequiredParameter"
    )
    assert not server.emulator.truth.actions_created


async def test_offboard_with_a_miscased_comment_key_is_400_invalid_request_body(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(1)))
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    for body in ({"comment": "retire"}, {"COMMENT": "retire"}):
        assert_mde_error(await api.offboard(machine_id, body), 400, "InvalidRequestBody")
    # Content-Type: application/json is required as well.
    as_text = await api.call(
        "POST",
        f"/api/machines/{machine_id}/offboard",
        json={"Comment": "retire"},
        headers={"Content-Type": "text/plain"},
    )
    assert_mde_error(as_text, 400, "InvalidRequestBody")
    assert not server.emulator.truth.actions_created


async def test_offboard_of_an_unknown_machine_is_404_resource_not_found(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(2)))
    api = await api_for(server, http_session)
    unknown = "f" * 40
    message = assert_mde_error(await api.offboard(unknown), 404, "ResourceNotFound")
    assert unknown in message
    assert_mde_error(await api.offboard("host-00000"), 404, "ResourceNotFound")
    assert server.emulator.truth.malformed_paths == ["host-00000"]
    assert not server.emulator.truth.actions_created


@pytest.mark.parametrize("platform", ["Linux", "macOS"])
async def test_offboard_of_a_linux_or_macos_machine_is_400_os_platform_not_supported(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession, platform: str
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=FleetSpec(size=2, os_mix={platform: 1.0})))
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    message = assert_mde_error(await api.offboard(machine_id), 400, "OsPlatformNotSupported")
    assert platform in message
    assert not server.emulator.truth.actions_created


async def test_second_offboard_while_one_is_pending_is_400_active_request_already_exists(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(2)))
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    assert (await api.offboard(machine_id)).status == 201
    assert_mde_error(await api.offboard(machine_id), 400, "ActiveRequestAlreadyExists")
    assert server.emulator.truth.offboard_posts[machine_id] == 2
    assert server.emulator.truth.actions_created[machine_id] == 1


async def test_offboard_without_a_valid_token_is_401(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(1)))
    machine_id = next(iter(server.emulator.machines))
    anonymous = Api(server, http_session)
    assert_mde_error(await anonymous.offboard(machine_id), 401, "Unauthorized")
    basic = await anonymous.call(
        "POST",
        f"/api/machines/{machine_id}/offboard",
        json={"Comment": "x"},
        headers={"Authorization": "Basic dXNlcjpwYXNz"},
    )
    assert_mde_error(basic, 401, "Unauthorized")
    assert_mde_error(
        await Api(server, http_session, "not.a.jwt").offboard(machine_id), 401, "Unauthorized"
    )
    # Well formed, but signed by another tenant's emulator.
    forged, _ = Emulator().issue_token(AppRegistration(), DEFAULT_AUDIENCE)
    assert_mde_error(
        await Api(server, http_session, forged).offboard(machine_id), 401, "Unauthorized"
    )
    # Unauthenticated calls reach nothing: no action, no count, no window.
    truth = server.emulator.truth
    assert not truth.actions_created
    assert not truth.offboard_posts
    assert not truth.calls


# -- machine actions ---------------------------------------------------------------------------


async def test_get_machine_action_by_id_returns_it_and_an_unknown_id_is_404(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(1)))
    api = await api_for(server, http_session)
    created = (await api.offboard(next(iter(server.emulator.machines)))).body
    fetched = await api.action(created["id"])
    assert fetched == created
    unknown = "00000000-0000-4000-8000-000000000000"
    assert_mde_error(await api.get(f"/api/machineactions/{unknown}"), 404, "ResourceNotFound")


@pytest.mark.looptime
async def test_machine_action_list_filters_pages_and_puts_the_newest_first(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(5)))
    machines = list(server.emulator.machines)
    for index, machine_id in enumerate(machines[:4]):  # two online, two offline
        server.emulator.machines[machine_id]["healthStatus"] = "Active" if index < 2 else "Inactive"
    api = await api_for(server, http_session)
    created = []
    for machine_id in machines[:4]:
        created.append((await api.offboard(machine_id)).body["id"])
        await asyncio.sleep(1)
    await asyncio.sleep(20)  # the online two are Succeeded by now, the offline two Pending
    newest_first = created[::-1]

    assert [a["id"] for a in await api.actions()] == newest_first
    by_machine = await api.actions(**{"$filter": f"machineId eq '{machines[1]}'"})
    assert [a["id"] for a in by_machine] == [created[1]]
    pending = await api.actions(**{"$filter": "type eq 'Offboard' and status eq 'Pending'"})
    assert [a["id"] for a in pending] == [created[3], created[2]]
    succeeded = await api.actions(**{"$filter": "status eq 'Succeeded'"})
    assert [a["id"] for a in succeeded] == [created[1], created[0]]
    assert await api.actions(**{"$filter": "type eq 'Isolate'"}) == []
    # "$top=2": the latest two; $skip pages on.
    assert [a["id"] for a in await api.actions(**{"$top": "2"})] == newest_first[:2]
    assert [a["id"] for a in await api.actions(**{"$top": "2", "$skip": "1"})] == newest_first[1:3]
    assert [a["id"] for a in await api.actions(**{"$skip": "3"})] == newest_first[3:]
    assert_mde_error(await api.get("/api/machineactions", **{"$top": "10001"}), 400, "ODataError")
    assert_mde_error(
        await api.get("/api/machineactions", **{"$filter": "osPlatform eq 'Linux'"}),
        400,
        "ODataError",
    )


# -- machines ----------------------------------------------------------------------------------


async def test_machine_list_filter_matches_the_fleet(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=FleetSpec(size=300, seed=7)))
    api = await api_for(server, http_session)
    machines = list(server.emulator.machines.values())
    seen = sorted(m["lastSeen"] for m in machines)
    pivot = seen[len(seen) // 2]
    pivot_at = datetime.fromisoformat(pivot)

    def last_seen(m: dict[str, Any]) -> datetime:
        return datetime.fromisoformat(m["lastSeen"])

    cases: dict[str, Any] = {
        "osPlatform eq 'Windows11'": lambda m: m["osPlatform"] == "Windows11",
        "healthStatus ne 'Active'": lambda m: m["healthStatus"] != "Active",
        f"lastSeen gt {pivot}": lambda m: last_seen(m) > pivot_at,
        f"lastSeen ge {pivot}": lambda m: last_seen(m) >= pivot_at,
        f"lastSeen lt {pivot}": lambda m: last_seen(m) < pivot_at,
        f"lastSeen le {pivot}": lambda m: last_seen(m) <= pivot_at,
        "startswith(computerDnsName,'host-0001')": lambda m: m["computerDnsName"].startswith(
            "host-0001"
        ),
        "machineTags/any(tag: tag eq 'VIP')": lambda m: "VIP" in m["machineTags"],
        "osPlatform eq 'Linux' and healthStatus eq 'Active'": lambda m: (
            m["osPlatform"] == "Linux" and m["healthStatus"] == "Active"
        ),
        "osPlatform eq 'Linux' or osPlatform eq 'macOS'": lambda m: (
            m["osPlatform"] in ("Linux", "macOS")
        ),
        "rbacGroupId eq 140 and machineTags/any(tag: tag eq 'Lab')": lambda m: (
            m["rbacGroupId"] == 140 and "Lab" in m["machineTags"]
        ),
    }
    for text, predicate in cases.items():
        expected = [m["id"] for m in machines if predicate(m)]
        assert 0 < len(expected) < len(machines), text  # every case tells something
        assert await api.machine_ids(**{"$filter": text}) == expected, text
    assert len(await api.machine_ids(**{"$filter": f"lastSeen ge {pivot}"})) == len(
        await api.machine_ids(**{"$filter": f"lastSeen gt {pivot}"})
    ) + seen.count(pivot)
    for bad in ("osPlatform eq", "color eq 'red'", "osPlatform has 'Win'"):
        assert_mde_error(await api.get("/api/machines", **{"$filter": bad}), 400, "ODataError")


async def test_machine_list_top_and_skip_page_through_and_top_10001_is_400(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=FleetSpec(size=30)))
    api = await api_for(server, http_session)
    everything = list(server.emulator.machines)
    assert await api.machine_ids() == everything
    assert await api.machine_ids(**{"$top": "10"}) == everything[:10]
    assert await api.machine_ids(**{"$top": "10", "$skip": "10"}) == everything[10:20]
    assert await api.machine_ids(**{"$skip": "25"}) == everything[25:]
    assert await api.machine_ids(**{"$top": "10000"}) == everything
    reply = await api.get("/api/machines", **{"$top": "10"})
    assert "@odata.nextLink" not in reply.body
    for top in ("10001", "-1", "ten"):
        assert_mde_error(await api.get("/api/machines", **{"$top": top}), 400, "ODataError")


async def test_more_than_10000_machines_without_top_give_a_broken_next_link(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=FleetSpec(size=10_050)))
    api = await api_for(server, http_session)
    everything = list(server.emulator.machines)

    first = await api.get("/api/machines")
    assert [m["id"] for m in first.body["value"]] == everything[:10_000]
    link = first.body["@odata.nextLink"]
    assert link.startswith(server.base_url + "/api/machines?")
    assert "$skip=10000" in link
    # Following the links never ends: each page repeats the last 50 under a longer, malformed
    # link (microsoft-365-docs #8316), so a client must cap the loop and de-duplicate.
    pages = []
    for _ in range(3):
        reply = await api.get(link.removeprefix(server.base_url))
        pages.append([m["id"] for m in reply.body["value"]])
        assert "@odata.nextLink" in reply.body
        assert len(reply.body["@odata.nextLink"]) > len(link)
        link = reply.body["@odata.nextLink"]
    assert pages == [everything[10_000:]] * 3
    assert link.count("$skip=") == 4

    # The documented workaround: an explicit $top never gives a nextLink (even with more left)
    # and $skip pages to a short last page.
    explicit = await api.get("/api/machines", **{"$top": "20", "$skip": "10000"})
    assert [m["id"] for m in explicit.body["value"]] == everything[10_000:10_020]
    assert "@odata.nextLink" not in explicit.body
    assert await api.machine_ids(**{"$top": "10000", "$skip": "10000"}) == everything[10_000:]
    # With a filter that leaves 10,000 or fewer, there is no link either.
    few = await api.get("/api/machines", **{"$filter": "startswith(computerDnsName,'host-0000')"})
    assert len(few.body["value"]) == 10
    assert "@odata.nextLink" not in few.body


async def test_machine_list_of_an_empty_fleet_is_404(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=FleetSpec(size=0)))
    api = await api_for(server, http_session)
    assert_mde_error(await api.get("/api/machines"), 404, "ResourceNotFound")


async def test_get_machine_by_id_or_by_computer_name(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=FleetSpec(size=5)))
    api = await api_for(server, http_session)
    machine_id, machine = next(iter(server.emulator.machines.items()))
    fqdn = machine["computerDnsName"]
    assert fqdn == "host-00000.contoso.com"
    for key in (machine_id, machine_id.upper(), fqdn, fqdn.upper(), "host-00000"):
        reply = await api.get(f"/api/machines/{key}")
        assert reply.status == 200, key
        assert reply.body == machine
    assert (await api.get(f"/api/v1.0/machines/{machine_id}")).body == machine
    for unknown in ("0" * 40, "no-such-host.contoso.com"):
        assert_mde_error(await api.get(f"/api/machines/{unknown}"), 404, "ResourceNotFound")


# -- advanced hunting --------------------------------------------------------------------------


async def test_advanced_query_for_windows_devices_returns_their_device_ids(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=FleetSpec(size=120, seed=3)))
    api = await api_for(server, http_session)
    query = 'DeviceInfo | where OSPlatform startswith "Windows" | project DeviceId'
    reply = await api.call("POST", "/api/advancedqueries/run", json={"Query": query})
    assert reply.status == 200, reply
    assert reply.body["Schema"] == [{"Name": "DeviceId", "Type": "String"}]
    got = [row["DeviceId"] for row in reply.body["Results"]]
    expected = [
        row["DeviceId"]
        for row in server.emulator.device_info_rows()
        if row["OSPlatform"].startswith("Windows")
    ]
    assert expected
    assert collections.Counter(got) == collections.Counter(expected)
    windows = {
        i for i, m in server.emulator.machines.items() if m["osPlatform"] in SUPPORTED_PLATFORMS
    }
    assert set(got) <= windows
    # Only devices seen in the last 30 days are in DeviceInfo.
    month_ago = datetime.now(UTC) - timedelta(days=30)
    assert all(
        datetime.fromisoformat(server.emulator.machines[i]["lastSeen"]) > month_ago for i in got
    )


async def test_bad_advanced_query_is_400(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=FleetSpec(size=10)))
    api = await api_for(server, http_session)
    run = "/api/advancedqueries/run"
    for query in ("DeviceInfo | where", "NoSuchTable | take 1", "DeviceInfo | frobnicate"):
        assert_mde_error(await api.call("POST", run, json={"Query": query}), 400, "BadRequest")
    lower = await api.call("POST", run, json={"query": "DeviceInfo | take 1"})
    assert_mde_error(lower, 400, "MissingRequiredParameter")


@pytest.mark.looptime
async def test_advanced_queries_have_their_own_45_per_minute_limit(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=FleetSpec(size=10)))
    api = await api_for(server, http_session)
    start = loop_time()
    run = "/api/advancedqueries/run"
    body = {"Query": "DeviceInfo | take 1"}
    for _ in range(45):
        assert (await api.call("POST", run, json=body)).status == 200
    throttled = await api.call("POST", run, json=body)
    assert_mde_error(throttled, 429, "TooManyRequests")
    assert throttled.headers["Retry-After"] == "60"
    assert (await api.get("/api/machines")).status == 200  # other endpoints are not affected
    truth = server.emulator.truth
    assert truth.throttled == {"advancedqueries": 1}
    assert truth.max_in_window["advancedqueries 60"] == 46
    await sleep_until(start + 60)
    assert (await api.call("POST", run, json=body)).status == 200


# -- action lifecycle --------------------------------------------------------------------------


@pytest.mark.looptime
async def test_online_device_offboard_goes_pending_then_in_progress_then_succeeded(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(
        EmulatorConfig(
            action_start_s=5, action_complete_s=30, fleet=windows_fleet(1, health_mix=ONLINE)
        )
    )
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    action_id = (await api.offboard(machine_id)).body["id"]
    created = server.emulator.actions[action_id].created
    timeline = [(4.9, "Pending"), (5.1, "InProgress"), (34.9, "InProgress"), (35.1, "Succeeded")]
    for moment, status in timeline:
        await sleep_until(created + moment)
        assert (await api.action(action_id))["status"] == status, moment
    done = await api.action(action_id)
    took = datetime.fromisoformat(done["lastUpdateDateTimeUtc"]) - datetime.fromisoformat(
        done["creationDateTimeUtc"]
    )
    assert took == timedelta(seconds=35)
    # The sensor stopped: the machine no longer reports as Active.
    assert (await api.get(f"/api/machines/{machine_id}")).body["healthStatus"] == "Inactive"


@pytest.mark.looptime
async def test_offline_device_offboard_stays_pending_then_times_out(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(
        EmulatorConfig(
            action_timeout_s=3 * 86400,
            token_lifetime_s=7 * 86400,
            fleet=windows_fleet(1, health_mix=OFFLINE),
        )
    )
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    action_id = (await api.offboard(machine_id)).body["id"]
    created = server.emulator.actions[action_id].created
    await sleep_until(created + 3 * 86400 - 1)
    assert (await api.action(action_id))["status"] == "Pending"
    assert_mde_error(await api.offboard(machine_id), 400, "ActiveRequestAlreadyExists")
    await sleep_until(created + 3 * 86400 + 1)
    assert (await api.action(action_id))["status"] == "TimeOut"
    assert (await api.offboard(machine_id)).status == 201  # nothing pending any more


# -- rate limits -------------------------------------------------------------------------------


@pytest.mark.looptime
async def test_101st_offboard_inside_60_s_gets_429_with_retry_after_and_passes_after_it(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(102)))
    api = await api_for(server, http_session)
    machines = list(server.emulator.machines)
    start = loop_time()
    for machine_id in machines[:100]:
        assert (await api.offboard(machine_id)).status == 201
    throttled = await api.offboard(machines[100])
    assert_mde_error(throttled, 429, "TooManyRequests")
    assert throttled.headers["Retry-After"] == "60"
    truth = server.emulator.truth
    assert truth.throttled == {"offboard": 1}
    assert sum(truth.actions_created.values()) == 100
    assert truth.offboard_posts[machines[100]] == 1  # the 429 arrived and was counted
    await sleep_until(start + int(throttled.headers["Retry-After"]))
    assert (await api.offboard(machines[100])).status == 201
    assert (await api.offboard(machines[101])).status == 201


@pytest.mark.looptime
async def test_429s_count_so_retrying_early_keeps_a_client_throttled(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(101)))
    api = await api_for(server, http_session)
    machines = list(server.emulator.machines)
    start = loop_time()
    for machine_id in machines[:100]:
        assert (await api.offboard(machine_id)).status == 201
    await sleep_until(start + 30)
    for _ in range(100):  # impatient retries, each one a 429 that counts
        assert (await api.offboard(machines[100])).status == 429
    await sleep_until(start + 60)  # the first 100 have left the window, the retries have not
    still = await api.offboard(machines[100])
    assert_mde_error(still, 429, "TooManyRequests")
    assert still.headers["Retry-After"] == "30"
    await sleep_until(start + 90)
    assert (await api.offboard(machines[100])).status == 201
    truth = server.emulator.truth
    assert truth.throttled == {"offboard": 101}
    assert truth.calls["offboard"] == 202
    assert truth.max_in_window["offboard 60"] == 200


@pytest.mark.looptime
async def test_reads_and_other_clients_have_windows_of_their_own(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    other = AppRegistration(client_id=OTHER_CLIENT_ID, secret=OTHER_SECRET)
    server = await start_emulator(
        EmulatorConfig(apps=(AppRegistration(), other), fleet=windows_fleet(110))
    )
    api = await api_for(server, http_session)
    machines = list(server.emulator.machines)
    for machine_id in machines[:100]:
        assert (await api.offboard(machine_id)).status == 201
    assert (await api.offboard(machines[100])).status == 429
    # Reads have their own windows...
    for _ in range(100):
        assert (await api.get(f"/api/machines/{machines[0]}")).status == 200
    assert (await api.get("/api/machineactions")).status == 200
    assert (await api.get("/api/machines")).status == 429  # ...which fill up on their own
    # ...and another app registration has its own windows for every endpoint.
    other_api = await api_for(server, http_session, client_id=OTHER_CLIENT_ID, secret=OTHER_SECRET)
    assert (await other_api.offboard(machines[100])).status == 201
    assert (await other_api.get("/api/machines")).status == 200
    assert server.emulator.truth.throttled == {"offboard": 1, "machines": 1}


@pytest.mark.looptime
async def test_time_scale_001_makes_the_windows_06_s_and_36_s(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(time_scale=0.01, fleet=windows_fleet(2)))
    assert server.emulator.config.windows("machines") == ((100, 0.6), (1500, 36.0))
    api = await api_for(server, http_session)
    path = f"/api/machines/{next(iter(server.emulator.machines))}"
    start = loop_time()
    for batch in range(15):  # 100 calls every 0.61 s: the 0.6 s window never bites...
        await sleep_until(start + batch * 0.61)
        for _ in range(100 if batch < 14 else 99):
            assert (await api.get(path)).status == 200, batch
        if batch == 0:
            early = await api.get(path)  # ...except on the 101st inside 0.6 s
            assert_mde_error(early, 429, "TooManyRequests")
            assert early.headers["Retry-After"] == "1"  # 0.6 s, rounded up
    # 1500 arrivals (the early 429 among them) in 8.54 s: the 36 s "hour" window is full.
    late = await api.get(path)
    assert_mde_error(late, 429, "TooManyRequests")
    assert late.headers["Retry-After"] == "28"  # 36 - 8.54, rounded up
    await sleep_until(start + 36.01)  # the first batch has left the window
    assert (await api.get(path)).status == 200
    assert server.emulator.truth.max_in_window["machines 0.6"] == 101
    assert server.emulator.truth.max_in_window["machines 36"] == 1501


@pytest.mark.looptime
async def test_hour_window_bites_after_1500_calls_spread_over_more_than_a_minute(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(token_lifetime_s=7200, fleet=windows_fleet(2)))
    api = await api_for(server, http_session)
    path = f"/api/machines/{next(iter(server.emulator.machines))}"
    start = loop_time()
    for batch in range(15):  # 100 a minute, never more
        await sleep_until(start + batch * 60)
        for _ in range(100):
            assert (await api.get(path)).status == 200, batch
    await sleep_until(start + 15 * 60)
    throttled = await api.get(path)
    assert_mde_error(throttled, 429, "TooManyRequests")
    assert throttled.headers["Retry-After"] == "2700"  # the first 100 leave at 3600 s
    await sleep_until(start + 3600)
    assert (await api.get(path)).status == 200
    truth = server.emulator.truth
    assert truth.max_in_window["machines 60"] == 100
    assert truth.max_in_window["machines 3600"] == 1501
    assert truth.throttled == {"machines": 1}


# -- fault knobs -------------------------------------------------------------------------------


async def test_error_rate_1_gives_500_and_creates_no_action(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(
        EmulatorConfig(faults=Faults(error_rate=1.0), fleet=windows_fleet(1))
    )
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    assert (await api.offboard(machine_id)).status == 500
    assert (await api.get("/api/machines")).status == 500
    truth = server.emulator.truth
    assert not truth.actions_created
    assert truth.offboard_posts[machine_id] == 1
    assert truth.faults_injected["error"] == 2
    server.emulator.faults.error_rate = 0.0  # the knobs can be turned while serving
    assert (await api.offboard(machine_id)).status == 201


async def test_abort_before_drops_the_connection_and_creates_no_action(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(
        EmulatorConfig(faults=Faults(abort_before_rate=1.0), fleet=windows_fleet(1))
    )
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    with pytest.raises(aiohttp.ClientError):
        await api.offboard(machine_id)
    truth = server.emulator.truth
    assert truth.faults_injected["abort_before"] == 1
    assert truth.offboard_posts[machine_id] == 1
    assert not truth.actions_created
    assert not server.emulator.actions
    server.emulator.faults.abort_before_rate = 0.0
    assert (await api.offboard(machine_id)).status == 201


async def test_abort_after_drops_the_connection_after_creating_the_action(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(
        EmulatorConfig(faults=Faults(abort_after_rate=1.0), fleet=windows_fleet(1))
    )
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    with pytest.raises(aiohttp.ClientError):
        await api.offboard(machine_id)
    truth = (await api.get("/_emulator/truth")).body
    assert truth["actions_created"] == {machine_id: 1}
    assert truth["faults_injected"] == {"abort_after": 1}
    server.emulator.faults.abort_after_rate = 0.0
    # The client never saw it, but the action exists and blocks a second one.
    actions = await api.actions(**{"$filter": f"machineId eq '{machine_id}'"})
    assert [a["status"] for a in actions] == ["Pending"]
    assert_mde_error(await api.offboard(machine_id), 400, "ActiveRequestAlreadyExists")


@pytest.mark.looptime
async def test_latency_delays_every_api_call(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(
        EmulatorConfig(faults=Faults(latency_s=2.5), fleet=windows_fleet(1))
    )
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    before = loop_time()
    assert (await api.get("/api/machines")).status == 200
    assert loop_time() - before == pytest.approx(2.5, abs=0.01)
    before = loop_time()
    assert (await api.offboard(machine_id)).status == 201
    assert loop_time() - before == pytest.approx(2.5, abs=0.01)
    server.emulator.faults.latency_s = 0.0
    before = loop_time()
    assert (await api.get("/api/machines")).status == 200
    assert loop_time() - before < 0.01


async def test_force_429_answers_the_next_calls_with_429_and_that_retry_after(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(1)))
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    server.emulator.force_429(2, retry_after_s=7)
    for _ in range(2):
        reply = await api.offboard(machine_id)
        assert_mde_error(reply, 429, "TooManyRequests")
        assert reply.headers["Retry-After"] == "7"
    assert not server.emulator.truth.actions_created
    assert (await api.offboard(machine_id)).status == 201
    assert server.emulator.truth.throttled == {"offboard": 2}


async def test_forced_429s_for_one_group_leave_the_other_calls_alone(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(1)))
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    server.emulator.force_429(1, retry_after_s=3, group="offboard")
    assert (await api.get("/api/machines")).status == 200
    reply = await api.offboard(machine_id)
    assert_mde_error(reply, 429, "TooManyRequests")
    assert reply.headers["Retry-After"] == "3"
    assert (await api.offboard(machine_id)).status == 201
    assert server.emulator.truth.throttled == {"offboard": 1}


@pytest.mark.looptime
async def test_burst_knobs_serve_429_bursts_on_schedule(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(
        EmulatorConfig(faults=Faults(burst_every_s=100, burst_length_s=10), fleet=windows_fleet(1))
    )
    api = await api_for(server, http_session)
    cycle = (loop_time() // 100 + 1) * 100  # the start of the next burst
    expected = [(1, 429, "9"), (9.5, 429, "1"), (10, 200, None), (99.5, 200, None)]
    expected += [(100.5, 429, "10"), (110.5, 200, None)]
    for offset, status, retry_after in expected:
        await sleep_until(cycle + offset)
        reply = await api.get("/api/machines")
        assert reply.status == status, offset
        assert reply.headers.get("Retry-After") == retry_after, offset
    assert server.emulator.truth.throttled == {"machines": 3}


# -- fleet -------------------------------------------------------------------------------------


def test_same_seed_makes_the_same_fleet_and_another_seed_another() -> None:
    assert make_fleet(FleetSpec(size=50, seed=3), NOW) == make_fleet(
        FleetSpec(size=50, seed=3), NOW
    )
    one, other = (
        make_fleet(FleetSpec(size=50, seed=3), NOW),
        make_fleet(FleetSpec(size=50, seed=4), NOW),
    )
    assert {m["id"] for m in one}.isdisjoint(m["id"] for m in other)
    assert [m["osPlatform"] for m in one] != [m["osPlatform"] for m in other]


async def test_same_seed_serves_the_same_fleet(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    servers = [
        await start_emulator(EmulatorConfig(fleet=FleetSpec(size=40, seed=s))) for s in (5, 5, 6)
    ]
    listed = []
    for server in servers:
        api = await api_for(server, http_session)
        listed.append(
            [
                (m["id"], m["computerDnsName"], m["osPlatform"], m["machineTags"])
                for m in (await api.get("/api/machines")).body["value"]
            ]
        )
    assert listed[0] == listed[1]
    assert listed[0] != listed[2]


def test_fleet_spec_sets_size_os_mix_health_tags_groups_and_names() -> None:
    spec = FleetSpec(size=2000, seed=11, name_prefix="pc", domain="corp.example")
    fleet = make_fleet(spec, NOW)
    assert len(fleet) == 2000
    assert [m["id"] for m in fleet] == [machine_id_for(11, i) for i in range(2000)]
    assert all(len(m["id"]) == 40 and int(m["id"], 16) >= 0 for m in fleet)
    assert [m["computerDnsName"] for m in fleet] == [
        f"pc-{i:05d}.corp.example" for i in range(2000)
    ]
    platforms = collections.Counter(m["osPlatform"] for m in fleet)
    assert set(platforms) == set(DEFAULT_OS_MIX)
    for platform, share in DEFAULT_OS_MIX.items():
        assert platforms[platform] / 2000 == pytest.approx(share, abs=0.04), platform
    health = collections.Counter(m["healthStatus"] for m in fleet)
    for status, share in DEFAULT_HEALTH_MIX.items():
        assert health[status] / 2000 == pytest.approx(share, abs=0.04), status
    for machine in fleet:
        age = NOW - datetime.fromisoformat(machine["lastSeen"])
        if machine["healthStatus"] == "Active":
            assert age <= timedelta(days=2)
        else:
            assert timedelta(days=3) <= age <= timedelta(days=spec.max_age_days)
        assert datetime.fromisoformat(machine["firstSeen"]) < datetime.fromisoformat(
            machine["lastSeen"]
        )
        assert set(machine["machineTags"]) <= set(TAGS)
        assert machine["machineTags"] == sorted(machine["machineTags"])
        assert (machine["rbacGroupId"], machine["rbacGroupName"]) in GROUPS
        if machine["osPlatform"] in SUPPORTED_PLATFORMS:
            assert machine["onboardingStatus"] == "Onboarded"
    assert {len(m["machineTags"]) for m in fleet} == {0, 1, 2}
    assert {m["rbacGroupId"] for m in fleet} == {g for g, _ in GROUPS}
    narrow = make_fleet(FleetSpec(size=50, os_mix={"Linux": 1.0}, health_mix=OFFLINE), NOW)
    assert {(m["osPlatform"], m["healthStatus"]) for m in narrow} == {("Linux", "Inactive")}


async def test_pending_fraction_seeds_pending_offboards_that_block_a_new_one(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    spec = FleetSpec(size=80, os_mix={"Windows10": 0.75, "Linux": 0.25}, pending_fraction=0.5)
    server = await start_emulator(EmulatorConfig(fleet=spec))
    api = await api_for(server, http_session)
    pending = await api.actions(**{"$filter": "status eq 'Pending'"})
    seeded = {a["machineId"] for a in pending}
    windows = set(ids_where(server, osPlatform="Windows10"))
    assert seeded <= windows  # never on a platform that cannot be offboarded
    assert 0.3 * len(windows) < len(seeded) < 0.7 * len(windows)
    assert {a["requestor"] for a in pending} == {"secops@contoso.com"}
    assert_mde_error(await api.offboard(sorted(seeded)[0]), 400, "ActiveRequestAlreadyExists")
    free = sorted(windows - seeded)[0]
    assert (await api.offboard(free)).status == 201
    # Seeded actions were not created through the API.
    assert sum(server.emulator.truth.actions_created.values()) == 1


async def test_seeded_pending_offboards_are_pending_whatever_the_loop_clock_reads(
    http_session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    # asyncio's clock is time.monotonic(): on a host up for weeks it reads millions of seconds.
    spec = windows_fleet(20, pending_fraction=0.5)
    emulator = Emulator(EmulatorConfig(fleet=spec), clock=lambda: 30 * 86400.0)
    async with EmulatorServer(emulator, ca_path=tmp_path / "ca.pem") as server:
        api = await api_for(server, http_session)
        actions = await api.actions()
        assert actions
        assert {a["status"] for a in actions} == {"Pending"}
        blocked = await api.offboard(actions[0]["machineId"])
        assert_mde_error(blocked, 400, "ActiveRequestAlreadyExists")


# -- ground truth ------------------------------------------------------------------------------


async def test_truth_counts_posts_actions_429s_and_window_peaks_and_is_served_outside_api(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(3)))
    api = await api_for(server, http_session)
    first, second, third = server.emulator.machines
    assert (await api.offboard(first)).status == 201
    assert (await api.offboard(first)).status == 400
    assert (await api.offboard(second)).status == 201
    server.emulator.force_429(1)
    assert (await api.offboard(third)).status == 429

    served = await Api(server, http_session).get("/_emulator/truth")  # no token needed
    assert served.status == 200
    truth = served.body
    assert truth == server.emulator.truth.as_json()
    assert truth["offboard_posts"] == {first: 2, second: 1, third: 1}
    assert truth["actions_created"] == {first: 1, second: 1}
    assert truth["throttled"] == {"offboard": 1}
    assert truth["calls"] == {"offboard": 4}
    assert truth["max_in_window"] == {"offboard 60": 4, "offboard 3600": 4}
    assert truth["tokens_issued"] == 1
    for hidden in ("/api/_emulator/truth", "/api/truth", "/api/v1.0/_emulator/truth"):
        assert (await api.get(hidden)).status == 404
