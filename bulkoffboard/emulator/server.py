"""Serving the emulator on loopback, over HTTPS with a throwaway CA (or plain HTTP on request)."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from pathlib import Path
from types import TracebackType

import trustme
from aiohttp import web

from bulkoffboard.emulator.app import Emulator, EmulatorConfig


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EmulatorServer:
    """Runs an :class:`Emulator` on a loopback port as an async context manager.

    With ``tls=True`` (the default) a throwaway CA signs a certificate for 127.0.0.1, ::1 and
    localhost; ``ca_pem`` is the CA certificate clients must trust, written to ``ca_path`` when
    given. msal refuses a non-https authority, so the token flow needs TLS.
    """

    def __init__(
        self,
        emulator: Emulator | None = None,
        *,
        config: EmulatorConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: bool = True,
        ca_path: Path | None = None,
    ) -> None:
        if not is_loopback(host):
            raise ValueError(f"the emulator only listens on loopback, not {host!r}")
        self.emulator = emulator or Emulator(config)
        self.host = host
        self.port = port
        self.tls = tls
        self.ca_path = ca_path
        self.ca_pem: bytes | None = None
        self._runner: web.AppRunner | None = None

    def __repr__(self) -> str:
        state = "running" if self._runner else "stopped"
        return f"EmulatorServer({self.base_url if self._runner else self.host!r}, {state})"

    @property
    def base_url(self) -> str:
        """``https://127.0.0.1:PORT`` (the API base and the authority host alike)."""
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def authority(self) -> str:
        """The tenant's authority URL for msal."""
        return f"{self.base_url}/{self.emulator.config.tenant_id}"

    def authority_for(self, tenant_id: str) -> str:
        """The authority URL of one of the tenants served (``emulator.tenant_ids``)."""
        return f"{self.base_url}/{self.emulator.tenant(tenant_id).config.tenant_id}"

    def _ssl_context(self) -> ssl.SSLContext:
        ca = trustme.CA(key_type=trustme.KeyType.RSA)
        cert = ca.issue_cert("127.0.0.1", "::1", "localhost", key_type=trustme.KeyType.RSA)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        self.ca_pem = ca.cert_pem.bytes()
        if self.ca_path is not None:
            self.ca_path.parent.mkdir(parents=True, exist_ok=True)
            self.ca_path.write_bytes(self.ca_pem)
        return context

    async def start(self) -> EmulatorServer:
        """Bind, serve, and fill in the port."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(
            self.emulator.build_app(), access_log=None, handle_signals=False
        )
        await self._runner.setup()
        site = web.SockSite(
            self._runner, sock, ssl_context=self._ssl_context() if self.tls else None
        )
        await site.start()
        return self

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> EmulatorServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def client_ssl_context(self) -> ssl.SSLContext | bool:
        """An SSL context that trusts this server's CA (False for plain HTTP)."""
        if not self.tls or self.ca_pem is None:
            return False
        return ssl.create_default_context(cadata=self.ca_pem.decode())
