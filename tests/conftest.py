"""Shared fixtures: a loopback HTTPS emulator, tokens and a client against it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

# Imported now, while the session is single-threaded: otherwise hypothesis's pytest plugin
# imports it at the terminal summary of a run that used no hypothesis test, and pytest's
# assertion rewriting of it then failed with "AST constructor recursion depth mismatch"
# (a CPython 3.11.7 counter shared by the interpreter; seen only after in-process CLI tests,
# whose worker threads import modules: the exact race was not pinned down).
import hypothesis  # noqa: F401
import pytest
import structlog

from bulkoffboard.auth import ClientCredential, MsalTokenProvider
from bulkoffboard.client import MdeClient
from bulkoffboard.config import DEFAULT_SCOPE, Connection
from bulkoffboard.emulator import EmulatorConfig, EmulatorServer
from bulkoffboard.emulator.app import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run the long soak tests too")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="long soak: run with --soak")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """The CLI configures structlog globally; each test starts and ends with the defaults."""
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Machine-wide CA and proxy variables must not leak into tests (LIBRARY-NOTES.md); each
    test has its own state directory, so the default shared rate budget (a ledger under
    $XDG_STATE_HOME) is the test's own (its child processes inherit it)."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.delenv("BULKOFFBOARD_BUDGET", raising=False)
    for name in (
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "SSL_CERT_FILE",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_ID",
        "AZURE_CLIENT_SECRET",
        "AZURE_AUTHORITY_HOST",
        "AZURE_CLIENT_CERTIFICATE_PATH",
        "BULKOFFBOARD_API_URL",
        "BULKOFFBOARD_CA_BUNDLE",
        "BULKOFFBOARD_CONFIG",
    ):
        monkeypatch.delenv(name, raising=False)


StartEmulator = Callable[..., Awaitable[EmulatorServer]]
_PROVIDERS: list[MsalTokenProvider] = []


@pytest.fixture
async def start_emulator(tmp_path: Path) -> AsyncIterator[StartEmulator]:
    """Start emulators on loopback HTTPS; each writes its CA to ``tmp_path``; all stop after
    (and the token providers made for them close their connections first)."""
    servers: list[EmulatorServer] = []

    async def start(config: EmulatorConfig | None = None, **kwargs: Any) -> EmulatorServer:
        kwargs.setdefault("ca_path", tmp_path / f"ca-{len(servers)}.pem")
        server = EmulatorServer(config=config, **kwargs)
        await server.start()
        servers.append(server)
        return server

    yield start
    while _PROVIDERS:
        _PROVIDERS.pop().close()
    for server in servers:
        await server.stop()


def connection_for(
    server: EmulatorServer,
    *,
    secret: str = DEFAULT_CLIENT_SECRET,
    client_id: str = DEFAULT_CLIENT_ID,
) -> Connection:
    """The connection settings a user would give for this emulator."""
    return Connection(
        tenant_id=server.emulator.config.tenant_id,
        client_id=client_id,
        credential=ClientCredential(secret=secret),
        api_url=server.base_url,
        authority_host=server.base_url,
        scope=DEFAULT_SCOPE,
        ca_bundle=server.ca_path,
    )


def env_for(server: EmulatorServer, *, secret: str = DEFAULT_CLIENT_SECRET) -> dict[str, str]:
    """Environment variables for a bulkoffboard process talking to ``server``."""
    return {
        "AZURE_TENANT_ID": server.emulator.config.tenant_id,
        "AZURE_CLIENT_ID": DEFAULT_CLIENT_ID,
        "AZURE_CLIENT_SECRET": secret,
        "AZURE_AUTHORITY_HOST": server.base_url,
        "BULKOFFBOARD_API_URL": server.base_url,
        "BULKOFFBOARD_CA_BUNDLE": str(server.ca_path),
    }


def token_provider(
    server: EmulatorServer,
    *,
    secret: str = DEFAULT_CLIENT_SECRET,
    client_id: str = DEFAULT_CLIENT_ID,
) -> MsalTokenProvider:
    """A msal token provider for the emulator's tenant (closed when the emulator stops)."""
    provider = MsalTokenProvider(
        tenant_id=server.emulator.config.tenant_id,
        client_id=client_id,
        credential=ClientCredential(secret=secret),
        authority_host=server.base_url,
        ca_bundle=server.ca_path,
    )
    _PROVIDERS.append(provider)
    return provider


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    """One aiohttp session per test."""
    async with aiohttp.ClientSession() as session:
        yield session


def client_for(
    server: EmulatorServer, session: aiohttp.ClientSession, tokens: MsalTokenProvider | None = None
) -> MdeClient:
    """An MdeClient trusting the emulator's CA."""
    return MdeClient(
        session,
        server.base_url,
        tokens or token_provider(server),
        ssl_context=server.client_ssl_context(),
    )
