"""Credentials, clouds, proxies, CA bundles, configuration precedence and errors, and check."""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from bulkoffboard import config
from bulkoffboard.cli import main
from bulkoffboard.emulator import AppRegistration, EmulatorConfig, EmulatorServer, FleetSpec
from bulkoffboard.emulator.app import DEFAULT_CLIENT_ID, DEFAULT_IDENTITY_HEADER
from bulkoffboard.errors import AuthError, UsageError
from bulkoffboard.jobs import execute, new_plan
from bulkoffboard.runner import ExitCode
from bulkoffboard.throttle import Limit
from tests.conftest import StartEmulator, env_for

LIMITS = (Limit(100, 0.6), Limit(1500, 36.0))


def small_fleet(**kwargs: Any) -> EmulatorConfig:
    return EmulatorConfig(
        time_scale=0.01, fleet=FleetSpec(size=6, seed=5, os_mix={"Windows11": 1.0}), **kwargs
    )


def make_certificate(tmp_path: Path) -> tuple[rsa.RSAPrivateKey, x509.Certificate, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bulkoffboard-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return key, cert, cert.public_bytes(serialization.Encoding.PEM)


async def offboard_all(server: EmulatorServer, tmp_path: Path, conn: config.Connection) -> int:
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(server.emulator.machines) + "\n")
    plan = new_plan(
        journal_path=tmp_path / "j.jsonl",
        source={"kind": "file", "path": str(ids), "format": "text"},
        comment="identity test",
        workers=2,
        limits=LIMITS,
        conn=conn,
    )
    summary = await execute(plan, conn)
    assert summary.exit_code == ExitCode.OK, summary.as_dict()
    return summary.counts["offboarded"]


def emulator_env(server: EmulatorServer) -> dict[str, str]:
    env = env_for(server)
    del env["AZURE_CLIENT_SECRET"]
    return env


async def test_a_pem_certificate_with_its_key_authenticates(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    key, _, cert_pem = make_certificate(tmp_path)
    app = AppRegistration(secret=None, certificate_pem=cert_pem)
    server = await start_emulator(small_fleet(apps=(app,)))
    pem = tmp_path / "client.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        + cert_pem
    )
    env = {**emulator_env(server), "AZURE_CLIENT_CERTIFICATE_PATH": str(pem)}
    conn = config.connection(env, {})
    assert conn.credential_kind == "certificate"
    assert await offboard_all(server, tmp_path, conn) == 6


async def test_a_password_protected_pfx_authenticates(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    key, cert, cert_pem = make_certificate(tmp_path)
    app = AppRegistration(secret=None, certificate_pem=cert_pem)
    server = await start_emulator(small_fleet(apps=(app,)))
    pfx = tmp_path / "client.pfx"
    pfx.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"client", key, cert, None, serialization.BestAvailableEncryption(b"pfx-pass")
        )
    )
    env = {
        **emulator_env(server),
        "AZURE_CLIENT_CERTIFICATE_PATH": str(pfx),
        "AZURE_CLIENT_CERTIFICATE_PASSWORD": "pfx-pass",
    }
    assert await offboard_all(server, tmp_path, config.connection(env, {})) == 6


async def test_an_unregistered_certificate_is_an_auth_error_with_its_aadsts_code(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    _, _, registered = make_certificate(tmp_path)
    key, _, other = make_certificate(tmp_path)
    server = await start_emulator(small_fleet(apps=(AppRegistration(certificate_pem=registered),)))
    pem = tmp_path / "other.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        + other
    )
    conn = config.connection(
        {**emulator_env(server), "AZURE_CLIENT_CERTIFICATE_PATH": str(pem)}, {}
    )
    with pytest.raises(AuthError) as caught:
        await offboard_all(server, tmp_path, conn)
    assert caught.value.code == "AADSTS700027"


@pytest.mark.parametrize("user_assigned", [False, True])
async def test_a_managed_identity_authenticates_through_the_local_identity_endpoint(
    start_emulator: StartEmulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    user_assigned: bool,
) -> None:
    identities = (
        AppRegistration(client_id="system-mi", secret=None),
        AppRegistration(client_id="user-mi", secret=None),
    )
    server = await start_emulator(small_fleet(managed_identities=identities))
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"{server.base_url}/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", DEFAULT_IDENTITY_HEADER)
    file_cfg: dict[str, Any] = {"credential": "managed_identity"}
    if user_assigned:
        file_cfg["managed_identity_client_id"] = "user-mi"
    env = {
        "BULKOFFBOARD_API_URL": server.base_url,
        "BULKOFFBOARD_CA_BUNDLE": str(server.ca_path),
    }
    conn = config.connection(env, file_cfg)
    assert conn.credential_kind == "managed_identity"
    assert await offboard_all(server, tmp_path, conn) == 6
    comments = {a.requestor for a in server.emulator.actions.values()}
    assert comments  # the actions were made by the identity's token
    if user_assigned:
        assert server.emulator.truth.tokens_issued == 1


async def test_an_unknown_user_assigned_identity_fails_with_a_clear_auth_error(
    start_emulator: StartEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_emulator(small_fleet())
    monkeypatch.setenv("IDENTITY_ENDPOINT", f"{server.base_url}/msi/token")
    monkeypatch.setenv("IDENTITY_HEADER", DEFAULT_IDENTITY_HEADER)
    conn = config.connection(
        {"BULKOFFBOARD_API_URL": server.base_url, "BULKOFFBOARD_CA_BUNDLE": str(server.ca_path)},
        {"credential": "managed_identity", "managed_identity_client_id": "nobody"},
    )
    with pytest.raises(AuthError, match="managed identity"):
        await offboard_all(server, tmp_path, conn)


async def test_a_ca_bundle_that_does_not_sign_the_server_is_a_tls_configuration_error(
    start_emulator: StartEmulator, tmp_path: Path
) -> None:
    server = await start_emulator(small_fleet())
    other = await start_emulator(small_fleet())
    env = {**env_for(server), "BULKOFFBOARD_CA_BUNDLE": str(other.ca_path)}
    with pytest.raises(UsageError, match="TLS verification failed"):
        await offboard_all(server, tmp_path, config.connection(env, {}))


class ConnectProxy:
    """A minimal loopback HTTPS (CONNECT) proxy that records where it was asked to go."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        method, target, _ = request.split(b"\r\n", 1)[0].decode().split(" ", 2)
        if method != "CONNECT":
            writer.close()
            return
        self.targets.append(target)
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_https_proxy_carries_both_the_token_and_the_api_calls(
    start_emulator: StartEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_emulator(small_fleet())
    proxy = ConnectProxy()
    url = await proxy.start()
    try:
        monkeypatch.setenv("HTTPS_PROXY", url)
        await offboard_all(server, tmp_path, config.connection(env_for(server), {}))
    finally:
        await proxy.stop()
    target = f"127.0.0.1:{server.port}"
    assert proxy.targets.count(target) >= 2, "token and API calls should both use the proxy"


async def test_no_proxy_bypasses_the_proxy(
    start_emulator: StartEmulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await start_emulator(small_fleet())
    proxy = ConnectProxy()
    url = await proxy.start()
    try:
        monkeypatch.setenv("HTTPS_PROXY", url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        await offboard_all(server, tmp_path, config.connection(env_for(server), {}))
    finally:
        await proxy.stop()
    assert proxy.targets == []


@pytest.mark.parametrize(
    ("cloud", "api", "authority", "scope"),
    [
        (
            "commercial",
            "https://api.security.microsoft.com",
            "https://login.microsoftonline.com",
            "https://api.securitycenter.microsoft.com/.default",
        ),
        (
            "gcc",
            "https://api-gcc.securitycenter.microsoft.us",
            "https://login.microsoftonline.com",
            "https://api-gcc.securitycenter.microsoft.us/.default",
        ),
        (
            "gcc-high",
            "https://api-gov.securitycenter.microsoft.us",
            "https://login.microsoftonline.us",
            "https://api-gov.securitycenter.microsoft.us/.default",
        ),
        (
            "dod",
            "https://api-gov.securitycenter.microsoft.us",
            "https://login.microsoftonline.us",
            "https://api-gov.securitycenter.microsoft.us/.default",
        ),
    ],
)
def test_a_cloud_preset_picks_api_host_token_host_and_scope_together(
    cloud: str, api: str, authority: str, scope: str
) -> None:
    env = {"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": "s"}
    conn = config.connection(env, {}, {"cloud": cloud})
    assert (conn.api_url, conn.authority_host, conn.scope) == (api, authority, scope)


def test_a_region_picks_a_regional_commercial_host_and_keeps_the_scope() -> None:
    env = {"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": "s"}
    conn = config.connection(env, {"region": "eu"})
    assert conn.api_url == "https://eu.api.security.microsoft.com"
    assert conn.scope == "https://api.securitycenter.microsoft.com/.default"
    with pytest.raises(UsageError, match="commercial cloud only"):
        config.connection(env, {}, {"cloud": "gcc-high", "region": "eu"})


def test_explicit_urls_override_the_preset() -> None:
    env = {
        "AZURE_TENANT_ID": "t",
        "AZURE_CLIENT_ID": "c",
        "AZURE_CLIENT_SECRET": "s",
        "BULKOFFBOARD_API_URL": "https://proxy.example.org/mde",
    }
    conn = config.connection(
        env, {}, {"cloud": "gcc-high", "authority_host": "https://login.example.org"}
    )
    assert conn.api_url == "https://proxy.example.org/mde"
    assert conn.authority_host == "https://login.example.org"
    assert conn.scope.endswith("microsoft.us/.default")


def test_command_line_beats_environment_beats_file() -> None:
    file_cfg = {"tenant_id": "from-file", "client_id": "file-client", "cloud": "gcc"}
    env = {"AZURE_TENANT_ID": "from-env", "AZURE_CLIENT_SECRET": "s", "BULKOFFBOARD_CLOUD": "dod"}
    conn = config.connection(env, file_cfg, {"tenant_id": "from-cli"})
    assert conn.tenant_id == "from-cli"
    assert conn.client_id == "file-client"
    assert conn.cloud == "dod"
    assert config.connection(env, file_cfg).tenant_id == "from-env"
    assert config.connection({"AZURE_CLIENT_SECRET": "s"}, file_cfg).tenant_id == "from-file"


def test_a_secret_can_come_from_a_file_named_in_the_config(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    conn = config.connection(
        {"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c"}, {"client_secret_file": str(secret_file)}
    )
    assert conn.credential.secret == "from-a-file"
    assert "from-a-file" not in repr(conn)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('tenant = "x"\n', "unknown key 'tenant'"),
        ("workers = 'eight'\n", "key 'workers' must be a int"),
        ("workers = 0\n", "key 'workers' must be 1 to 256"),
        ('limits = ["100"]\n', "key 'limits'"),
        ("limits = [100]\n", "each limit is a string"),
        ('cloud = "mars"\n', "key 'cloud' must be one of"),
        ('credential = "password"\n', "key 'credential' must be one of"),
        ("exclude_tags = [[1]]\n", "key 'exclude_tags' must be a list of strings"),
        ("this is not toml\n", "config file"),
    ],
)
def test_every_config_file_error_names_the_key_and_the_file(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    with pytest.raises(UsageError) as caught:
        config.load_file(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("env", "cli", "message"),
    [
        ({}, {}, "missing connection settings: AZURE_TENANT_ID, AZURE_CLIENT_ID"),
        ({"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c"}, {}, "AZURE_CLIENT_SECRET"),
        (
            {"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": "s"},
            {"cloud": "mars"},
            "unknown cloud 'mars'",
        ),
        (
            {"AZURE_TENANT_ID": "t", "AZURE_CLIENT_ID": "c", "AZURE_CLIENT_SECRET": "s"},
            {"region": "moon"},
            "unknown region 'moon'",
        ),
        (
            {
                "AZURE_TENANT_ID": "t",
                "AZURE_CLIENT_ID": "c",
                "AZURE_CLIENT_SECRET": "s",
                "AZURE_AUTHORITY_HOST": "http://login.example.org",
            },
            {},
            "must be https",
        ),
        (
            {
                "AZURE_TENANT_ID": "t",
                "AZURE_CLIENT_ID": "c",
                "AZURE_CLIENT_SECRET": "s",
                "BULKOFFBOARD_CA_BUNDLE": "/nonexistent/ca.pem",
            },
            {},
            "/nonexistent/ca.pem",
        ),
        (
            {
                "AZURE_TENANT_ID": "t",
                "AZURE_CLIENT_ID": "c",
                "AZURE_CLIENT_CERTIFICATE_PATH": "/nonexistent/c.pem",
            },
            {},
            "/nonexistent/c.pem",
        ),
        (
            {
                "AZURE_TENANT_ID": "t",
                "AZURE_CLIENT_ID": "c",
                "AZURE_CLIENT_SECRET": "s",
                "BULKOFFBOARD_CREDENTIAL": "kerberos",
            },
            {},
            "unknown credential 'kerberos'",
        ),
    ],
)
def test_every_connection_error_is_one_line_naming_the_culprit(
    env: dict[str, str], cli: dict[str, str], message: str
) -> None:
    with pytest.raises(UsageError) as caught:
        config.connection(env, {}, cli)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_config_file_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["check", "--config", str(tmp_path / "missing.toml")])
    assert code == 2
    assert "missing.toml" in capsys.readouterr().err


async def run_check(server: EmulatorServer, **env: str) -> tuple[int, str]:
    from tests.test_cli import cli

    code, out, err = await cli("check", env={**env_for(server), **env})
    return code, out + err


async def test_check_reports_ready_when_every_permission_is_granted(
    start_emulator: StartEmulator,
) -> None:
    server = await start_emulator(small_fleet())
    code, out = await run_check(server)
    assert code == 0, out
    assert "[ok] Machine.Offboard granted" in out
    assert "ready" in out.splitlines()[-1]


async def test_check_names_a_missing_offboard_permission_and_exits_3(
    start_emulator: StartEmulator,
) -> None:
    server = await start_emulator(small_fleet(apps=(AppRegistration(roles=("Machine.Read.All",)),)))
    code, out = await run_check(server)
    assert code == 3
    assert "[missing] Machine.Offboard" in out
    assert "AdvancedQuery.Read.All not granted" in out


async def test_check_with_a_wrong_secret_exits_3_without_showing_it(
    start_emulator: StartEmulator,
) -> None:
    server = await start_emulator(small_fleet())
    code, out = await run_check(server, AZURE_CLIENT_SECRET="not-the-secret-123")
    assert code == 3
    assert "AADSTS7000215" in out
    assert "not-the-secret-123" not in out
    assert DEFAULT_CLIENT_ID in out


@pytest.mark.parametrize(
    "name",
    [
        "commercial-secret.toml",
        "gcc-high-certificate.toml",
        "azure-managed-identity.toml",
        "emulator.toml",
    ],
)
def test_the_example_configs_load(name: str) -> None:
    path = Path(__file__).parent.parent / "configs" / name
    data = config.load_file(path)
    assert data
