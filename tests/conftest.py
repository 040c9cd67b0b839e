"""Shared fixtures: a loopback HTTPS emulator, tokens and a client against it."""

from __future__ import annotations

import sys
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
from tests import journal_check


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


# -- every journal a test writes must match the published schema (issue 17) ----------------------
#
# After each test, every format-1 journal under the test's ``tmp_path`` is validated, record by
# record, against bulkoffboard/journal.schema.json (what is a journal and what is a record:
# tests/journal_check.py); a record that does not match fails the test (an error at teardown)
# naming the file, the line and the schema's complaint. A test that writes bad or hand-built
# records on purpose says so: ``@pytest.mark.unvalidated_journal("why")`` skips its journals,
# ``@pytest.mark.unvalidated_journal("why", header=True)`` only their header lines. Tests written
# before the schema are listed, with why, in ``UNVALIDATED_JOURNALS``.

#: ``pytester``: tests/test_schema.py runs a test session with this conftest to prove the check
#: fails a test that writes a bad record.
pytest_plugins = ("pytester",)

#: Node id prefix -> (what is not validated: "all" or "header", why). Everything else a test
#: writes is validated.
UNVALIDATED_JOURNALS: dict[str, tuple[str, str]] = {
    "tests/test_journal.py::": (
        "all",
        "unit tests of the journal's mechanics: minimal hand-built records (no times, no "
        "outcome, upper-case ids) and deliberately corrupted ones, to prove what replay "
        "tolerates and what it refuses",
    ),
    "tests/test_verify.py::": (
        "header",
        "journals of offboards made directly through the client: the header is a minimal "
        "hand-built one; the results and everything verify writes are validated",
    ),
    "tests/test_verify.py::test_replay_keeps_the_latest_status_of_the_results_action_only": (
        "all",
        "writes incomplete status records on purpose: replay must skip them",
    ),
    "tests/test_verify.py::test_plan_follows_only_open_actions_of_offboarded_and_already_": (
        "all",
        "a hand-built status record without its time stands for one verify wrote",
    ),
    "tests/test_hostile_input.py::test_a_damaged_journal_header_is_refused_and_left_as_it_was": (
        "header",
        "the header of a real journal is damaged on purpose: resume must refuse it",
    ),
    "tests/test_runner.py::test_a_second_run_on_the_same_journal_is_refused_while_locked": (
        "header",
        "a hand-built header stands for the other process holding the journal",
    ),
}

#: Test modules that write real journals: a session that ran one of them whole and validated
#: no journal of it fails (the check must not pass by finding nothing).
MUST_VALIDATE_JOURNALS = ("tests/test_cli.py", "tests/test_runner.py", "tests/test_verify.py")


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker where pyproject.toml does not (a pytester session's own ini)."""
    if not any(line.startswith("unvalidated_journal") for line in config.getini("markers")):
        config.addinivalue_line(
            "markers",
            "unvalidated_journal(reason, header=False): the test writes deliberately bad or "
            "hand-built journal records, not validated against the journal schema (with "
            "header=True: only the header lines are not)",
        )


def _journal_exemption(item: pytest.Item) -> str | None:
    """What of the test's journals is not validated: "all", "header" or None (nothing)."""
    marker = item.get_closest_marker("unvalidated_journal")
    if marker is not None:
        return "header" if marker.kwargs.get("header") else "all"
    found: tuple[str, str] | None = None
    for prefix, exemption in UNVALIDATED_JOURNALS.items():
        if item.nodeid.startswith(prefix) and (found is None or exemption[0] == "all"):
            found = exemption
    return found[0] if found is not None else None


@pytest.fixture(autouse=True)
def _journals_match_the_schema(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """Validate every journal the test wrote under ``tmp_path`` (after the test's other
    fixtures stopped: this one is set up before them, so it is torn down after them)."""
    yield
    module = request.node.nodeid.split("::", 1)[0]
    exemption = _journal_exemption(request.node)
    if exemption == "all":
        journal_check.STATS.exempted[module] += 1
        return
    problems: list[str] = []
    for path in journal_check.journals_under(tmp_path):
        records, found = journal_check.check(path, header=exemption is None)
        journal_check.STATS.journals[module] += 1
        journal_check.STATS.records[module] += records
        problems += found
    journal_check.STATS.modules.add(module)
    if problems:
        pytest.fail(
            "journal records that do not match bulkoffboard/journal.schema.json "
            "(a test that writes bad records on purpose: @pytest.mark.unvalidated_journal):\n"
            + "\n".join(problems),
            pytrace=False,
        )


def pytest_deselected(items: list[pytest.Item]) -> None:
    journal_check.STATS.deselected = True


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail a session that ran the whole of a module that writes journals (no test chosen
    by name, ``-k`` or ``-m``) but validated no journal of it."""
    stats = journal_check.STATS
    options = session.config.option
    chosen = (
        stats.deselected
        or bool(getattr(options, "keyword", ""))
        or bool(getattr(options, "markexpr", ""))
        or any("::" in str(arg) for arg in session.config.args)
    )
    silent = [m for m in MUST_VALIDATE_JOURNALS if m in stats.modules and not stats.journals[m]]
    if silent and not chosen and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        sys.stderr.write(
            f"\njournal schema check: no journal was validated in {', '.join(silent)}: "
            "the check in tests/conftest.py finds nothing\n"
        )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    stats = journal_check.STATS
    if stats.modules or stats.exempted:
        terminalreporter.write_line(
            f"journal schema: {sum(stats.records.values())} records in "
            f"{sum(stats.journals.values())} journals validated "
            f"({len(stats.modules)} modules; {sum(stats.exempted.values())} tests exempted)"
        )
