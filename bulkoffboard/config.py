"""Settings from the command line, the environment and a TOML file, in that order of precedence.

Environment names follow the Azure SDKs: ``AZURE_TENANT_ID``, ``AZURE_CLIENT_ID``,
``AZURE_CLIENT_SECRET``, ``AZURE_CLIENT_CERTIFICATE_PATH``, ``AZURE_CLIENT_CERTIFICATE_PASSWORD``,
``AZURE_AUTHORITY_HOST``; plus ``BULKOFFBOARD_API_URL``, ``BULKOFFBOARD_CA_BUNDLE``,
``BULKOFFBOARD_CLOUD``, ``BULKOFFBOARD_REGION``, ``BULKOFFBOARD_CREDENTIAL``,
``BULKOFFBOARD_CLIENT_SECRET_FILE``, ``BULKOFFBOARD_SCOPE`` and ``BULKOFFBOARD_CONFIG``.
Nothing here touches the network or logs a secret.
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

DEFAULT_COMMENT = "Offboarded by bulkoffboard"


@dataclass(frozen=True, slots=True)
class Cloud:
    """The API host, token host and token scope of one cloud (mde-api.md section 1)."""

    api_url: str
    authority_host: str
    scope: str


#: Presets. The GCC and GCC High/DoD scopes are UNCONFIRMED in Microsoft's docs (community code
#: uses the API host's own audience); the safest reading is the audience of the API host itself,
#: which is what these use. Override with ``scope`` / ``BULKOFFBOARD_SCOPE`` if a tenant differs.
CLOUDS: dict[str, Cloud] = {
    "commercial": Cloud(
        "https://api.security.microsoft.com",
        "https://login.microsoftonline.com",
        "https://api.securitycenter.microsoft.com/.default",
    ),
    "gcc": Cloud(
        "https://api-gcc.securitycenter.microsoft.us",
        "https://login.microsoftonline.com",
        "https://api-gcc.securitycenter.microsoft.us/.default",
    ),
    "gcc-high": Cloud(
        "https://api-gov.securitycenter.microsoft.us",
        "https://login.microsoftonline.us",
        "https://api-gov.securitycenter.microsoft.us/.default",
    ),
    "dod": Cloud(
        "https://api-gov.securitycenter.microsoft.us",
        "https://login.microsoftonline.us",
        "https://api-gov.securitycenter.microsoft.us/.default",
    ),
}
#: Regional API hosts of the commercial cloud: ``{region}.api.security.microsoft.com``. The
#: scope stays the securitycenter one (whether a regional host wants another audience is
#: UNCONFIRMED; the docs say that scope is needed even on api.security.microsoft.com).
REGIONS = ("us", "eu", "uk", "au", "swa", "ina")
CREDENTIALS = ("secret", "certificate", "managed_identity")

DEFAULT_API_URL = CLOUDS["commercial"].api_url
DEFAULT_AUTHORITY_HOST = CLOUDS["commercial"].authority_host
DEFAULT_SCOPE = CLOUDS["commercial"].scope

#: Keys a config file may hold, with their types.
FILE_KEYS: dict[str, type | tuple[type, ...]] = {
    "tenant_id": str,
    "client_id": str,
    "credential": str,
    "client_secret_file": str,
    "certificate_path": str,
    "certificate_password_file": str,
    "managed_identity_client_id": str,
    "cloud": str,
    "region": str,
    "authority_host": str,
    "api_url": str,
    "scope": str,
    "ca_bundle": str,
    "comment": str,
    "workers": int,
    "limits": list,
    "journal_dir": str,
    "max_machines": int,
    "exclude_tags": list,
    "exclude_groups": list,
    "exclude_ids": list,
    "exclude_names": list,
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
    #: "secret", "certificate" or "managed_identity".
    credential_kind: str = "secret"
    cloud: str = "commercial"


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
    for key in ("exclude_tags", "exclude_groups", "exclude_ids", "exclude_names"):
        if key in data and not all(isinstance(v, str | int) for v in data[key]):
            raise UsageError(f"config file {path}: key {key!r} must be a list of strings")
    for key in ("cloud", "credential"):
        allowed = CLOUDS if key == "cloud" else CREDENTIALS
        if key in data and data[key].replace("-", "_") not in {
            a.replace("-", "_") for a in allowed
        }:
            raise UsageError(
                f"config file {path}: key {key!r} must be one of {', '.join(allowed)}, "
                f"not {data[key]!r}"
            )
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


def _read_secret_file(path_text: str, what: str) -> str:
    path = Path(path_text).expanduser()
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None


def connection(
    env: Mapping[str, str],
    file: Mapping[str, Any],
    cli: Mapping[str, Any] | None = None,
) -> Connection:
    """Build the connection: command line > environment > file > cloud preset > defaults.

    Missing pieces are named in one line. Secrets come only from the environment or from
    files, never from the command line (it shows in ``ps``).
    """
    cli = cli or {}

    def pick(flag: str, env_name: str | None, key: str) -> str | None:
        for value in (cli.get(flag), env.get(env_name) if env_name else None, file.get(key)):
            if isinstance(value, str) and value.strip():
                return value.strip()
        return None

    cloud_name = (pick("cloud", "BULKOFFBOARD_CLOUD", "cloud") or "commercial").lower()
    if cloud_name not in CLOUDS:
        raise UsageError(f"unknown cloud {cloud_name!r}; choose one of {', '.join(CLOUDS)}")
    cloud = CLOUDS[cloud_name]
    region = pick("region", "BULKOFFBOARD_REGION", "region")
    api_default = cloud.api_url
    if region:
        region = region.lower()
        if cloud_name != "commercial":
            raise UsageError(f"--region applies to the commercial cloud only, not {cloud_name!r}")
        if region not in REGIONS:
            raise UsageError(f"unknown region {region!r}; choose one of {', '.join(REGIONS)}")
        api_default = f"https://{region}.api.security.microsoft.com"

    kind = (pick("credential", "BULKOFFBOARD_CREDENTIAL", "credential") or "").replace("-", "_")
    if kind and kind not in CREDENTIALS:
        raise UsageError(f"unknown credential {kind!r}; choose one of {', '.join(CREDENTIALS)}")
    secret = env.get("AZURE_CLIENT_SECRET") or None
    secret_file = pick("", "BULKOFFBOARD_CLIENT_SECRET_FILE", "client_secret_file")
    certificate = pick("", "AZURE_CLIENT_CERTIFICATE_PATH", "certificate_path")
    if not kind:
        kind = "secret" if (secret or secret_file) else "certificate" if certificate else "secret"

    tenant = pick("tenant_id", "AZURE_TENANT_ID", "tenant_id")
    client = pick("client_id", "AZURE_CLIENT_ID", "client_id")
    missing: list[str] = []
    if kind == "managed_identity":
        credential = ClientCredential()
        client = pick("", "", "managed_identity_client_id") or client
        tenant = tenant or "managed-identity"
    else:
        missing += [
            n for n, v in (("AZURE_TENANT_ID", tenant), ("AZURE_CLIENT_ID", client)) if not v
        ]
        if kind == "secret":
            if not secret and secret_file:
                secret = _read_secret_file(secret_file, "the client secret file")
            if not secret:
                missing.append("AZURE_CLIENT_SECRET (or AZURE_CLIENT_CERTIFICATE_PATH)")
            credential = ClientCredential(secret=secret)
        else:
            if not certificate:
                missing.append("AZURE_CLIENT_CERTIFICATE_PATH")
            password = env.get("AZURE_CLIENT_CERTIFICATE_PASSWORD") or None
            password_file = pick("", "", "certificate_password_file")
            if password is None and password_file:
                password = _read_secret_file(password_file, "the certificate password file")
            credential = ClientCredential(
                certificate_path=Path(certificate).expanduser() if certificate else None,
                certificate_password=password,
            )
            if certificate and not Path(certificate).expanduser().is_file():
                raise UsageError(
                    f"AZURE_CLIENT_CERTIFICATE_PATH {certificate} is not a readable file"
                )
    if missing:
        raise UsageError(f"missing connection settings: {', '.join(missing)}")
    ca = pick("ca_bundle", "BULKOFFBOARD_CA_BUNDLE", "ca_bundle")
    ca_path = Path(ca).expanduser() if ca else None
    if ca_path is not None and not ca_path.is_file():
        raise UsageError(f"BULKOFFBOARD_CA_BUNDLE {ca_path} is not a readable file")
    api_url = check_url(
        pick("api_url", "BULKOFFBOARD_API_URL", "api_url") or api_default, "API URL"
    )
    authority = pick("authority_host", "AZURE_AUTHORITY_HOST", "authority_host") or (
        cloud.authority_host
    )
    if not authority.startswith("https://"):
        raise UsageError(
            f"AZURE_AUTHORITY_HOST must be https (msal requires it), not {authority!r}"
        )
    return Connection(
        tenant_id=str(tenant),
        client_id=str(client or ""),
        credential=credential,
        api_url=api_url,
        authority_host=authority.rstrip("/"),
        scope=pick("scope", "BULKOFFBOARD_SCOPE", "scope") or cloud.scope,
        ca_bundle=ca_path,
        credential_kind=kind,
        cloud=cloud_name,
    )
