"""Settings from the command line, the environment and a TOML file, in that order of precedence.

Environment names follow the Azure SDKs: ``AZURE_TENANT_ID``, ``AZURE_CLIENT_ID``,
``AZURE_CLIENT_SECRET``, ``AZURE_AUTHORITY_HOST``; plus ``BULKOFFBOARD_API_URL``,
``BULKOFFBOARD_CA_BUNDLE`` and ``BULKOFFBOARD_CONFIG``. Nothing here touches the network or logs
a secret.
"""

from __future__ import annotations

import ipaddress
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bulkoffboard.auth import ClientCredential
from bulkoffboard.errors import UsageError
from bulkoffboard.throttle import DEFAULT_LIMITS, Limit

DEFAULT_API_URL = "https://api.security.microsoft.com"
DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
#: The token scope for MDE, whichever commercial API host is used (mde-api.md section 1).
DEFAULT_SCOPE = "https://api.securitycenter.microsoft.com/.default"
DEFAULT_COMMENT = "Offboarded by bulkoffboard"

#: Keys a config file may hold, with their types.
FILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "tenant_id": str,
    "client_id": str,
    "client_secret_file": str,
    "certificate_path": str,
    "authority_host": str,
    "api_url": str,
    "scope": str,
    "ca_bundle": str,
    "comment": str,
    "workers": int,
    "limits": list,
}


@dataclass(frozen=True, slots=True)
class Connection:
    """Where and as whom to connect. ``repr`` never shows the secret."""

    tenant_id: str
    client_id: str
    credential: ClientCredential
    api_url: str
    authority_host: str
    scope: str
    ca_bundle: Path | None


def load_file(path: Path) -> dict[str, Any]:
    """Read and check a TOML config file; unknown keys and wrong types name the key and file."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path}: {exc}") from None
    for key, value in data.items():
        expected = FILE_KEYS.get(key)
        if expected is None:
            raise UsageError(
                f"config file {path}: unknown key {key!r} (known: {', '.join(sorted(FILE_KEYS))})"
            )
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            name = expected.__name__ if isinstance(expected, type) else "value"
            raise UsageError(f"config file {path}: key {key!r} must be a {name}, not {value!r}")
    if "limits" in data:
        data["limits"] = [
            _limit(item, f"config file {path}: key 'limits'") for item in data["limits"]
        ]
    if "workers" in data and not 1 <= data["workers"] <= 256:
        raise UsageError(f"config file {path}: key 'workers' must be 1 to 256")
    return data


def _limit(item: Any, where: str) -> Limit:
    if not isinstance(item, str):
        raise UsageError(f"{where}: each limit is a string like '100/60', not {item!r}")
    try:
        return Limit.parse(item)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


def parse_limits(values: list[str] | None, file: Mapping[str, Any]) -> tuple[Limit, ...]:
    """``--limit`` values replace the file's, which replace the documented defaults."""
    if values:
        return tuple(_limit(v, "--limit") for v in values)
    if file.get("limits"):
        return tuple(file["limits"])
    return DEFAULT_LIMITS


def is_loopback_url(url: str) -> bool:
    """True when ``url`` points at 127.0.0.0/8, ::1 or localhost."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, what: str) -> str:
    """https everywhere; plain http only to a loopback emulator."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UsageError(f"{what} must be an https URL, not {url!r}")
    if parts.scheme == "http" and not is_loopback_url(url):
        raise UsageError(
            f"{what} {url!r} is plain http: only a loopback emulator may be reached without TLS"
        )
    return url.rstrip("/")


def connection(env: Mapping[str, str], file: Mapping[str, Any]) -> Connection:
    """Build the connection from the environment over the file; missing pieces are named."""

    def pick(env_name: str, key: str, default: str | None = None) -> str | None:
        value = env.get(env_name) or file.get(key) or default
        return value.strip() if isinstance(value, str) else value

    tenant = pick("AZURE_TENANT_ID", "tenant_id")
    client = pick("AZURE_CLIENT_ID", "client_id")
    missing = [n for n, v in (("AZURE_TENANT_ID", tenant), ("AZURE_CLIENT_ID", client)) if not v]
    secret = env.get("AZURE_CLIENT_SECRET")
    certificate = pick("AZURE_CLIENT_CERTIFICATE_PATH", "certificate_path")
    if not secret and file.get("client_secret_file"):
        secret_path = Path(str(file["client_secret_file"])).expanduser()
        try:
            secret = secret_path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(
                f"cannot read client_secret_file {secret_path}: {exc.strerror}"
            ) from None
    if not secret and not certificate:
        missing.append("AZURE_CLIENT_SECRET (or AZURE_CLIENT_CERTIFICATE_PATH)")
    if missing:
        raise UsageError(f"missing connection settings: {', '.join(missing)}")
    assert tenant is not None  # noqa: S101 - checked just above
    assert client is not None  # noqa: S101 - checked just above
    credential = (
        ClientCredential(secret=secret)
        if secret
        else ClientCredential(
            certificate_path=Path(str(certificate)).expanduser(),
            certificate_password=env.get("AZURE_CLIENT_CERTIFICATE_PASSWORD"),
        )
    )
    ca = pick("BULKOFFBOARD_CA_BUNDLE", "ca_bundle")
    ca_path = Path(ca).expanduser() if ca else None
    if ca_path is not None and not ca_path.is_file():
        raise UsageError(f"BULKOFFBOARD_CA_BUNDLE {ca_path} is not a readable file")
    api_url = check_url(str(pick("BULKOFFBOARD_API_URL", "api_url", DEFAULT_API_URL)), "API URL")
    authority = str(pick("AZURE_AUTHORITY_HOST", "authority_host", DEFAULT_AUTHORITY_HOST))
    if not authority.startswith("https://"):
        raise UsageError(
            f"AZURE_AUTHORITY_HOST must be https (msal requires it), not {authority!r}"
        )
    return Connection(
        tenant_id=tenant,
        client_id=client,
        credential=credential,
        api_url=api_url,
        authority_host=authority.rstrip("/"),
        scope=str(pick("BULKOFFBOARD_SCOPE", "scope", DEFAULT_SCOPE)),
        ca_bundle=ca_path,
    )
