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
import re
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
    "budget": str,
    "mark": str,
    "mark_run_id": bool,
    "cancel_comment": str,
}

#: ``--budget`` when nothing names one: a ledger shared on this host (bulkoffboard.budget).
DEFAULT_BUDGET = "default"


def budget_spec(given: str | None, file: Mapping[str, Any], env: Mapping[str, str]) -> str:
    """Where the rate budgets live: ``--budget`` > ``BULKOFFBOARD_BUDGET`` > the config's
    ``budget`` > a ledger shared on this host. ``none``: this process's alone."""
    for value in (given, env.get("BULKOFFBOARD_BUDGET"), file.get("budget")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return DEFAULT_BUDGET


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


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{what} {path}: {exc}") from None


def load_file(path: Path) -> dict[str, Any]:
    """Read and check a TOML config file; unknown keys and wrong types name the key and file."""
    return check_settings(_read_toml(path, "config file"), f"config file {path}")


def check_settings(
    data: dict[str, Any], where: str, extra: Mapping[str, type] | None = None
) -> dict[str, Any]:
    """Check config-file settings (``extra``: more keys allowed there); ``where`` names the
    place in every message. Returns ``data``, its limits parsed."""
    for key, value in data.items():
        expected = FILE_KEYS.get(key) or (extra or {}).get(key)
        if expected is None:
            known = ", ".join(sorted([*FILE_KEYS, *(extra or {})]))
            raise UsageError(f"{where}: unknown key {key!r} (known: {known})")
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            name = expected.__name__ if isinstance(expected, type) else "value"
            raise UsageError(f"{where}: key {key!r} must be a {name}, not {value!r}")
    if "limits" in data:
        data["limits"] = [_limit(item, f"{where}: key 'limits'") for item in data["limits"]]
    if "workers" in data and not 1 <= data["workers"] <= 256:
        raise UsageError(f"{where}: key 'workers' must be 1 to 256")
    for key in ("exclude_tags", "exclude_groups", "exclude_ids", "exclude_names"):
        if key in data and not all(isinstance(v, str | int) for v in data[key]):
            raise UsageError(f"{where}: key {key!r} must be a list of strings")
    for key in ("cloud", "credential"):
        allowed = CLOUDS if key == "cloud" else CREDENTIALS
        if key in data and data[key].replace("-", "_") not in {
            a.replace("-", "_") for a in allowed
        }:
            raise UsageError(
                f"{where}: key {key!r} must be one of {', '.join(allowed)}, not {data[key]!r}"
            )
    return data


#: A tenant's name in a tenants file: its journal is ``<run dir>/<name>.jsonl``.
TENANT_NAME = re.compile(r"[a-z0-9_-]{1,64}")
#: Connection keys of a tenants file, with the environment variables a tenant's own value
#: overrides (a tenants file is more specific than the environment).
_TENANT_OVERRIDES: dict[str, tuple[str, ...]] = {
    "tenant_id": ("AZURE_TENANT_ID",),
    "client_id": ("AZURE_CLIENT_ID",),
    "cloud": ("BULKOFFBOARD_CLOUD",),
    "region": ("BULKOFFBOARD_REGION",),
    "credential": ("BULKOFFBOARD_CREDENTIAL",),
    "api_url": ("BULKOFFBOARD_API_URL",),
    "authority_host": ("AZURE_AUTHORITY_HOST",),
    "scope": ("BULKOFFBOARD_SCOPE",),
    "ca_bundle": ("BULKOFFBOARD_CA_BUNDLE",),
    "client_secret_file": ("AZURE_CLIENT_SECRET", "BULKOFFBOARD_CLIENT_SECRET_FILE"),
    "certificate_path": (
        "AZURE_CLIENT_SECRET",
        "BULKOFFBOARD_CLIENT_SECRET_FILE",
        "AZURE_CLIENT_CERTIFICATE_PATH",
        "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    ),
}


@dataclass(frozen=True, slots=True)
class TenantSettings:
    """One ``[[tenant]]`` of a tenants file: its name, its settings (the ``[defaults]``
    overridden by its own keys, as a config file's) and its own id source, if any."""

    name: str
    settings: Mapping[str, Any]
    ids: Path | None = None

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` without the variables this tenant's own settings override (its
        ``tenant_id`` over ``AZURE_TENANT_ID``; its own secret file or certificate over the
        app's ``AZURE_CLIENT_SECRET``; ...)."""
        dropped = {name for key in self.settings for name in _TENANT_OVERRIDES.get(key, ())}
        return {k: v for k, v in env.items() if k not in dropped}


def load_tenants(path: Path) -> tuple[TenantSettings, ...]:
    """Read and check a tenants file: ``[defaults]`` (any config-file key, for every tenant)
    and ``[[tenant]]`` tables (``name``, unique, ``[a-z0-9_-]+``; ``tenant_id``; optional
    ``ids``, relative to the file; any config-file key overriding the defaults). Secrets never
    go in it: the app's is ``AZURE_CLIENT_SECRET``, or a tenant's own ``client_secret_file``
    or certificate. Every problem names the file and the tenant."""
    data = _read_toml(path, "tenants file")
    unknown = sorted(set(data) - {"defaults", "tenant"})
    if unknown:
        raise UsageError(
            f"tenants file {path}: unknown table {unknown[0]!r} (known: defaults, tenant)"
        )
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise UsageError(f"tenants file {path}: [defaults] must be a table")
    defaults = check_settings(dict(defaults), f"tenants file {path} [defaults]")
    entries = data.get("tenant", [])
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"tenants file {path}: no [[tenant]] tables")
    tenants: list[TenantSettings] = []
    seen: set[str] = set()
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict):
            raise UsageError(f"tenants file {path}: tenant {number} must be a table")
        name = entry.get("name")
        if not isinstance(name, str) or TENANT_NAME.fullmatch(name) is None:
            raise UsageError(
                f"tenants file {path}: tenant {number} needs a name of 1 to 64 characters "
                f"a-z 0-9 _ - (got {name!r})"
            )
        if name in seen:
            raise UsageError(f"tenants file {path}: tenant name {name!r} is used twice")
        seen.add(name)
        where = f"tenants file {path} tenant {name!r}"
        own = dict(entry)
        del own["name"]
        ids_value = own.pop("ids", None)
        if ids_value is not None and (not isinstance(ids_value, str) or not ids_value.strip()):
            raise UsageError(f"{where}: key 'ids' must be a path")
        own = check_settings(own, where)
        settings = {**defaults, **own}
        if not isinstance(settings.get("tenant_id"), str) or not settings["tenant_id"].strip():
            raise UsageError(f"{where}: needs a tenant_id")
        ids = (path.parent / Path(ids_value).expanduser()).absolute() if ids_value else None
        tenants.append(TenantSettings(name, settings, ids))
    return tuple(tenants)


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
