"""Entra ID tokens through msal, off the event loop, cached and refreshed before expiry.

msal is blocking: the application is built in a thread (its constructor fetches the OpenID
configuration) and every token call runs in a thread too, one at a time behind a lock (ten
concurrent calls on an empty cache made six token requests; with a lock, one: LIBRARY-NOTES.md).
"""

from __future__ import annotations

import asyncio
import base64
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
import requests
import structlog

from bulkoffboard.errors import AuthError, UsageError

log = structlog.get_logger("bulkoffboard.auth")

_AADSTS = re.compile(r"AADSTS(\d+)")
#: Hosts msal knows; any other authority host is used as given, with no instance discovery
#: (which would call a public endpoint).
_KNOWN_AUTHORITY_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoftonline.us",
        "login.chinacloudapi.cn",
        "login.microsoft.com",
        "login.windows.net",
    }
)


class TokenProvider(Protocol):
    """Gives bearer tokens for the MDE API."""

    def close(self) -> None:
        """Release HTTP connections."""
        ...

    async def token(self) -> str:
        """A token valid for a while yet."""
        ...

    async def refresh(self, stale: str) -> str:
        """A new token after ``stale`` was rejected (a 401); shared by concurrent callers."""
        ...


@dataclass(frozen=True, slots=True)
class ClientCredential:
    """How the app proves who it is. Exactly one of secret or certificate."""

    secret: str | None = None
    #: PEM with the private key (and the certificate), or a PFX file.
    certificate_path: Path | None = None
    certificate_password: str | None = None

    def __repr__(self) -> str:
        kind = "secret" if self.secret is not None else f"certificate {self.certificate_path}"
        return f"ClientCredential({kind})"

    def for_msal(self) -> str | dict[str, Any]:
        """The ``client_credential`` argument msal expects."""
        if self.secret is not None:
            return self.secret
        if self.certificate_path is None:
            raise AuthError("no client secret or certificate is configured")
        return load_certificate(self.certificate_path, self.certificate_password)


def load_certificate(path: Path, password: str | None) -> dict[str, Any]:
    """A msal certificate credential from a PEM (key + certificate) or a PFX file.

    msal works out the thumbprint itself from the public certificate (x5t#S256 with PS256), so
    nobody types one by hand.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuthError(f"cannot read the client certificate {path}: {exc.strerror}") from None
    if path.suffix.lower() in (".pfx", ".p12") or not data.lstrip().startswith(b"-----"):
        return {"private_key_pfx_path": str(path), "passphrase": password}
    text = data.decode("ascii", errors="replace")
    key = re.search(
        r"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----", text, re.S
    )
    certs = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.S)
    if key is None or not certs:
        raise AuthError(
            f"the client certificate {path} must hold both the private key and the certificate"
        )
    credential: dict[str, Any] = {"private_key": key.group(0), "public_certificate": certs[0]}
    if password:
        credential["passphrase"] = password
    return credential


def _claims(token: str) -> dict[str, Any]:
    """The claims of a JWT access token, decoded without checking the signature ({} when it
    is not one)."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError, orjson.JSONDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def token_roles(token: str) -> list[str]:
    """The ``roles`` claim of a JWT access token (its application permissions)."""
    roles = _claims(token).get("roles")
    return [str(r) for r in roles] if isinstance(roles, list) else []


def granted_permissions(token: str) -> list[str]:
    """What a JWT access token grants: its ``roles`` (application permissions) and the
    space-separated ``scp`` claim (delegated ones)."""
    scopes = _claims(token).get("scp")
    return token_roles(token) + (scopes.split() if isinstance(scopes, str) else [])


def _describe(result: dict[str, Any]) -> tuple[str, str | None]:
    """A one-line reason from a msal error result, and its AADSTS code."""
    description = str(result.get("error_description") or "")
    match = _AADSTS.search(description)
    code = f"AADSTS{match.group(1)}" if match else str(result.get("error") or "") or None
    # Keep the first sentence; the rest is trace and correlation ids.
    first = description.split(" Trace ID:", maxsplit=1)[0].strip()
    first = first.split("\r\n")[0].split("\n")[0]
    return first or str(result.get("error") or "unknown error"), code


def _tls_error(url: str) -> UsageError:
    """TLS verification failed: a configuration problem (exit 2), not an authentication one."""
    host = url.split("/")[2] if "//" in url else url
    return UsageError(
        f"TLS verification failed for {host}; set BULKOFFBOARD_CA_BUNDLE to the CA that signs "
        "it (a TLS-inspecting proxy's CA, or the emulator's)"
    )


class _CachedTokens:
    """What every msal-backed provider shares: one lock, a cache, refresh before expiry.

    Subclasses implement :meth:`_acquire` (blocking; runs in a thread) and :meth:`_where`.
    """

    def __init__(
        self, *, ca_bundle: Path | None, timeout_s: float, clock: Callable[[], float]
    ) -> None:
        self._ca_bundle = ca_bundle
        self._timeout_s = timeout_s
        self._clock = clock
        self._http: requests.Session | None = None
        self._lock = asyncio.Lock()
        self._token: str | None = None
        self._refresh_at = 0.0
        self.acquired = 0

    def _where(self) -> str:
        raise NotImplementedError

    def _acquire(self, force: bool) -> tuple[str, float]:
        raise NotImplementedError

    def _http_client(self, url: str) -> requests.Session:
        # requests lets REQUESTS_CA_BUNDLE override verify=, so the environment is not trusted
        # here; proxies from HTTPS_PROXY / NO_PROXY are put back explicitly for this URL.
        if self._http is not None:
            self._http.close()
        session = self._http = requests.Session()
        session.trust_env = False
        session.verify = str(self._ca_bundle) if self._ca_bundle else True
        session.proxies.update(requests.utils.get_environ_proxies(url))
        return session

    async def _fetch(self, force: bool) -> str:
        token, lifetime = await asyncio.to_thread(self._acquire, force)
        self._token = token
        # Refresh before expiry: 5 minutes early for normal tokens, halfway for short ones.
        early = 300.0 if lifetime > 600 else lifetime / 2
        self._refresh_at = self._clock() + lifetime - early
        self.acquired += 1
        log.debug("auth.token_acquired", lifetime_s=lifetime, forced=force)
        return token

    def close(self) -> None:
        """Close msal's HTTP connections."""
        if self._http is not None:
            self._http.close()
            self._http = None

    async def token(self) -> str:
        """A cached token, or a new one when the cached one is near expiry."""
        async with self._lock:
            if self._token is not None and self._clock() < self._refresh_at:
                return self._token
            return await self._fetch(force=self._token is not None)

    async def refresh(self, stale: str) -> str:
        """A new token after ``stale`` was rejected; one refresh serves every waiting caller."""
        async with self._lock:
            if (
                self._token is not None
                and self._token != stale
                and self._clock() < self._refresh_at
            ):
                return self._token
            return await self._fetch(force=True)


class MsalTokenProvider(_CachedTokens):
    """Client-credential tokens from msal's ``ConfidentialClientApplication``."""

    def __init__(
        self,
        *,
        tenant_id: str,
        client_id: str,
        credential: ClientCredential,
        authority_host: str = "https://login.microsoftonline.com",
        scope: str = "https://api.securitycenter.microsoft.com/.default",
        ca_bundle: Path | None = None,
        timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not authority_host.startswith("https://"):
            raise AuthError(f"the authority host must be https, not {authority_host!r}")
        super().__init__(ca_bundle=ca_bundle, timeout_s=timeout_s, clock=clock)
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.authority = f"{authority_host.rstrip('/')}/{tenant_id}"
        self.scope = scope
        self._credential = credential
        self._app: Any = None

    def __repr__(self) -> str:
        return (
            f"MsalTokenProvider(tenant={self.tenant_id!r}, client={self.client_id!r}, "
            f"authority={self.authority!r}, cached={self._token is not None})"
        )

    def _where(self) -> str:
        return f"tenant {self.tenant_id}, client {self.client_id}"

    def _build(self) -> Any:
        import msal  # noqa: PLC0415 - imported in the worker thread, off the loop

        host = self.authority.split("/")[2].split(":")[0].lower()
        try:
            return msal.ConfidentialClientApplication(
                self.client_id,
                client_credential=self._credential.for_msal(),
                authority=self.authority,
                http_client=self._http_client(self.authority),
                timeout=self._timeout_s,
                instance_discovery=host in _KNOWN_AUTHORITY_HOSTS,
            )
        except ValueError as exc:
            # msal raises ValueError when the tenant's OpenID configuration cannot be read
            # (unknown tenant, or an authority that is not Entra ID), or a key cannot be read.
            match = _AADSTS.search(str(exc))
            code = f"AADSTS{match.group(1)}" if match else None
            if "authority" in str(exc).lower() or "OIDC" in str(exc):
                what = f"cannot read the OpenID configuration of {self.authority}"
                reason = "unknown tenant, or not an Entra ID authority"
            else:
                what = f"cannot use the client credential with {self.authority}"
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            raise AuthError(
                f"{what} for {self._where()}{f' ({code})' if code else ''}: {reason}",
                code=code,
            ) from None
        except requests.exceptions.SSLError:
            raise _tls_error(self.authority) from None
        except requests.RequestException as exc:
            raise AuthError(
                f"cannot reach the authority {self.authority} for {self._where()}: "
                f"{type(exc).__name__}"
            ) from None

    def _acquire(self, force: bool) -> tuple[str, float]:
        if self._app is None:
            self._app = self._build()
        app = self._app
        if force:
            cache = app.token_cache
            for entry in list(cache.search(cache.CredentialType.ACCESS_TOKEN)):
                cache.remove_at(entry)
        try:
            result = app.acquire_token_for_client(scopes=[self.scope])
        except requests.exceptions.SSLError:
            raise _tls_error(self.authority) from None
        except requests.RequestException as exc:
            raise AuthError(
                f"cannot reach the token endpoint for {self._where()}: {type(exc).__name__}"
            ) from None
        if "access_token" not in result:
            reason, code = _describe(result)
            raise AuthError(f"token request failed for {self._where()}: {reason}", code=code)
        return str(result["access_token"]), float(result.get("expires_in") or 3600)

    def close(self) -> None:
        """Close msal's HTTP connections."""
        super().close()
        self._app = None


class ManagedIdentityTokenProvider(_CachedTokens):
    """Tokens from an Azure managed identity through msal's ``ManagedIdentityClient``.

    msal finds the identity endpoint from the environment (App Service / Functions:
    ``IDENTITY_ENDPOINT`` + ``IDENTITY_HEADER``; Arc; a VM's instance metadata service).
    ``client_id`` selects a user-assigned identity; None means system-assigned.
    """

    def __init__(
        self,
        *,
        client_id: str | None = None,
        scope: str = "https://api.securitycenter.microsoft.com/.default",
        ca_bundle: Path | None = None,
        timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(ca_bundle=ca_bundle, timeout_s=timeout_s, clock=clock)
        self.client_id = client_id
        self.resource = scope.removesuffix("/.default")
        self.tenant_id = "managed-identity"

    def __repr__(self) -> str:
        kind = f"user-assigned {self.client_id}" if self.client_id else "system-assigned"
        return f"ManagedIdentityTokenProvider({kind}, cached={self._token is not None})"

    def _where(self) -> str:
        kind = (
            f"user-assigned identity {self.client_id}"
            if self.client_id
            else ("the system-assigned identity")
        )
        return f"managed identity ({kind})"

    def _acquire(self, force: bool) -> tuple[str, float]:
        import os  # noqa: PLC0415

        import msal  # noqa: PLC0415 - imported in the worker thread, off the loop

        identity: Any = (
            msal.UserAssignedManagedIdentity(client_id=self.client_id)
            if self.client_id
            else msal.SystemAssignedManagedIdentity()
        )
        endpoint = os.environ.get("IDENTITY_ENDPOINT") or "http://169.254.169.254"
        # A fresh client each time: msal's managed-identity cache has no forced refresh.
        client = msal.ManagedIdentityClient(identity, http_client=self._http_client(endpoint))
        try:
            result = client.acquire_token_for_client(resource=self.resource)
        except requests.exceptions.SSLError:
            raise _tls_error(endpoint) from None
        except (requests.RequestException, ValueError) as exc:
            raise AuthError(
                f"cannot reach the managed identity endpoint for {self._where()}: "
                f"{type(exc).__name__}"
            ) from None
        if "access_token" not in result:
            reason, code = _describe(result)
            raise AuthError(f"token request failed for {self._where()}: {reason}", code=code)
        return str(result["access_token"]), float(result.get("expires_in") or 3600)
