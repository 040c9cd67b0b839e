"""The HTTP sessions of the jobs: TLS as the connection asks, and one pool of connections
shared by the jobs of many tenants in one process.

A job alone keeps a pool of its own (its workers plus a few), right for one tenant. The
tenants runner opens :func:`shared_connections` around its tenants' jobs: they then draw on
one connector (500 tenants starting at once would otherwise hold thousands of TLS
connections), reaching it through a context variable that only that block sets.
"""

from __future__ import annotations

import contextlib
import contextvars
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp

from bulkoffboard import config


def _ssl_for(conn: config.Connection) -> ssl.SSLContext | bool:
    if conn.api_url.startswith("http://"):
        return False
    if conn.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(conn.ca_bundle))
    return True


#: Connections one process's tenants share at most (see :func:`shared_connections`).
SHARED_CONNECTIONS = 256


@dataclass(slots=True)
class SharedConnections:
    """One pool of HTTPS connections for the jobs of many tenants in one process.

    Each job alone keeps a pool of its own (its workers plus a few), which is right for one
    tenant; 500 tenants starting at once would hold thousands of TLS connections, each with
    asyncio's 128 KiB read buffer and OpenSSL's state. Sharing one connector caps them all
    (``limit``), and connections to the same API host are reused across tenants: a request
    carries its tenant's token, a connection carries nothing of a tenant. Each job keeps its
    own session (cookies, timeouts), token, throttles and journal.
    """

    connector: aiohttp.TCPConnector
    #: One TLS context a CA bundle, so tenants with the same bundle share connections.
    contexts: dict[str, ssl.SSLContext] = field(default_factory=dict)

    def ssl_for(self, conn: config.Connection) -> ssl.SSLContext | bool:
        if conn.api_url.startswith("http://") or conn.ca_bundle is None:
            return _ssl_for(conn)
        key = str(conn.ca_bundle)
        if key not in self.contexts:
            self.contexts[key] = ssl.create_default_context(cafile=key)
        return self.contexts[key]


_SHARED: contextvars.ContextVar[SharedConnections | None] = contextvars.ContextVar(
    "bulkoffboard_shared_connections", default=None
)


@contextlib.asynccontextmanager
async def shared_connections(limit: int = SHARED_CONNECTIONS) -> AsyncIterator[SharedConnections]:
    """Within this block, jobs started from this task (and the tasks it creates) draw their
    connections from one pool of at most ``limit`` (a context variable: jobs elsewhere in the
    process keep their own pools)."""
    pool = SharedConnections(aiohttp.TCPConnector(limit=limit))
    token = _SHARED.set(pool)
    try:
        yield pool
    finally:
        _SHARED.reset(token)
        await pool.connector.close()


def http_session(
    conn: config.Connection, timeout: aiohttp.ClientTimeout, *, limit: int = 100
) -> tuple[aiohttp.ClientSession, ssl.SSLContext | bool]:
    """A job's HTTP session and TLS setting: on the shared pool when there is one (see
    :func:`shared_connections`), else on a pool of its own of ``limit`` connections."""
    shared = _SHARED.get()
    if shared is not None:
        session = aiohttp.ClientSession(
            connector=shared.connector, connector_owner=False, timeout=timeout, trust_env=True
        )
        return session, shared.ssl_for(conn)
    connector = aiohttp.TCPConnector(limit=limit)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=True), _ssl_for(
        conn
    )


__all__ = ["SHARED_CONNECTIONS", "SharedConnections", "http_session", "shared_connections"]
