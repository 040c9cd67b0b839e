"""The emulator: an ``aiohttp.web`` app that plays MDE and Entra ID on loopback.

Everything here follows ``shared/mde-api.md``; where the two disagree, this file is wrong.
It never imports the runner, the client or the journal: it is the other side of the wire.

Time: rate windows, token expiry and the machine-action lifecycle read the event loop's clock,
so a test under ``looptime`` plays hours in seconds. Timestamps shown to clients are wall time
advanced by the same clock.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import hashlib
import hmac
import math
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from bulkoffboard.emulator import kql, odata
from bulkoffboard.emulator.fleet import UNSUPPORTED_PLATFORMS, FleetSpec, iso, make_fleet

DEFAULT_TENANT = "11111111-2222-3333-4444-555555555555"
DEFAULT_CLIENT_ID = "aaaaaaaa-bbbb-cccc-dddd-000000000001"
#: The system-assigned managed identity's client id, and the header secret of the local
#: identity endpoint (App Service style: IDENTITY_ENDPOINT + IDENTITY_HEADER).
SYSTEM_IDENTITY_CLIENT_ID = "aaaaaaaa-bbbb-cccc-dddd-00000000e1e1"
DEFAULT_IDENTITY_HEADER = "emulator-identity-header"
DEFAULT_CLIENT_SECRET = "emulator-secret-not-for-production"  # noqa: S105 - the emulator's own
#: The resource the MDE API accepts tokens for (mde-api.md section 1).
DEFAULT_AUDIENCE = "https://api.securitycenter.microsoft.com"
ALL_ROLES = (
    "Machine.Offboard",
    "Machine.Read.All",
    "Machine.ReadWrite.All",
    "AdvancedQuery.Read.All",
)
#: Endpoint groups, each with its own windows per tenant and client (mde-api.md sections 2 to
#: 5b): cancel and the two tag endpoints state their own 100/min and 1,500/h. Whether those are
#: separate buckets or one shared across endpoints is UNCONFIRMED (mde-api.md section 6); the
#: emulator keeps one per group, as the docs state them per API page.
DEFAULT_LIMITS: dict[str, tuple[tuple[int, float], ...]] = {
    "offboard": ((100, 60.0), (1500, 3600.0)),
    "machineactions": ((100, 60.0), (1500, 3600.0)),
    "cancel": ((100, 60.0), (1500, 3600.0)),
    "machines": ((100, 60.0), (1500, 3600.0)),
    "tags": ((100, 60.0), (1500, 3600.0)),
    "advancedqueries": ((45, 60.0), (1500, 3600.0)),
}
#: Roles that open each group (any one suffices).
GROUP_ROLES: dict[str, tuple[str, ...]] = {
    "offboard": ("Machine.Offboard",),
    "machineactions": ("Machine.Read.All", "Machine.ReadWrite.All"),
    # Cancel takes the permission of any response action, Machine.Offboard among them
    # (mde-api.md section 3; the cancel-machine-action page lists these seven and not
    # Machine.ReadWrite.All, so a read-write token is refused).
    "cancel": (
        "Machine.CollectForensics",
        "Machine.Isolate",
        "Machine.RestrictExecution",
        "Machine.Scan",
        "Machine.Offboard",
        "Machine.StopAndQuarantine",
        "Machine.LiveResponse",
    ),
    "machines": ("Machine.Read.All", "Machine.ReadWrite.All"),
    "tags": ("Machine.ReadWrite.All",),  # mde-api.md section 5b
    "advancedqueries": ("AdvancedQuery.Read.All",),
}
#: At most 500 machine ids in one AddOrRemoveTagForMultipleMachines call (mde-api.md 5b).
MAX_TAG_BATCH = 500
#: Longest tag accepted. UNCONFIRMED (mde-api.md section 5b: no documented maximum; the notes
#: suggest printable characters and at most 200 of them, so the emulator refuses more).
MAX_TAG_LENGTH = 200
TAG_ACTIONS = ("Add", "Remove")
MACHINE_FILTER_PROPERTIES = (
    "computerDnsName",
    "id",
    "version",
    "deviceValue",
    "aadDeviceId",
    "machineTags",
    "lastSeen",
    "exposureLevel",
    "onboardingStatus",
    "lastIpAddress",
    "healthStatus",
    "osPlatform",
    "riskScore",
    "rbacGroupId",
)
ACTION_FILTER_PROPERTIES = ("id", "status", "machineId", "type", "requestor", "creationDateTimeUtc")
MAX_PAGE = 10_000
HUNTING_MAX_ROWS = 100_000
_HEX40 = re.compile(r"[0-9a-f]{40}")
_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass(frozen=True, slots=True)
class AppRegistration:
    """An Entra ID app registration the emulator knows."""

    client_id: str = DEFAULT_CLIENT_ID
    #: The client secret, or None for a certificate-only app.
    secret: str | None = DEFAULT_CLIENT_SECRET
    #: PEM of the certificate whose key may sign client assertions.
    certificate_pem: bytes | None = None
    roles: tuple[str, ...] = ALL_ROLES
    display_name: str = "bulkoffboard-emulator-app"


@dataclass(slots=True)
class Faults:
    """Fault knobs; mutable so a test can turn them on and off while a run is going."""

    #: Probability that an API call gets 500 before anything happens.
    error_rate: float = 0.0
    #: Probability that the connection is dropped before the call is processed.
    abort_before_rate: float = 0.0
    #: Probability that the call is processed (an action created) and then the connection
    #: is dropped, so the client cannot know whether it offboarded.
    abort_after_rate: float = 0.0
    #: Extra delay before a request is counted (network in), plus a uniform random jitter.
    latency_s: float = 0.0
    jitter_s: float = 0.0
    #: Forced 429 bursts: every ``burst_every_s`` seconds, ``burst_length_s`` seconds of 429s.
    burst_every_s: float = 0.0
    burst_length_s: float = 0.0


@dataclass(frozen=True, slots=True)
class TenantSpec:
    """One more tenant served by the same emulator, besides ``EmulatorConfig.tenant_id``.

    It has its own fleet, machine actions, rate windows and ground truth; everything else
    (time scale, limits, lifecycle, fault knobs) is the emulator's. The apps default to the
    first tenant's: one multi-tenant app registration, same client id and secret, consented
    in each tenant.
    """

    tenant_id: str
    fleet: FleetSpec = field(default_factory=FleetSpec)
    apps: tuple[AppRegistration, ...] | None = None
    #: Seeds the tenant's machine action ids (None: derived from the emulator's seed).
    seed: int | None = None


def tenant_id_for(number: int) -> str:
    """The deterministic tenant id of the ``number``-th extra tenant (2, 3, ...)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"bulkoffboard-emulator-tenant-{number}"))


def extra_tenants(count: int, fleet: FleetSpec | None = None) -> tuple[TenantSpec, ...]:
    """``count`` more tenants, numbered 2 onwards, each with a fleet like ``fleet`` but its own
    seed (so machine ids never collide) and domain ``tN.contoso.com``."""
    base = fleet or FleetSpec()
    return tuple(
        TenantSpec(
            tenant_id=tenant_id_for(number),
            fleet=dataclasses.replace(
                base, seed=base.seed + 1000 * number, domain=f"t{number}.{base.domain}"
            ),
        )
        for number in range(2, count + 2)
    )


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """Everything that shapes one emulator. Defaults play the documented tenant."""

    tenant_id: str = DEFAULT_TENANT
    apps: tuple[AppRegistration, ...] = (AppRegistration(),)
    #: Managed identities: the first is the system-assigned one; the others are user-assigned
    #: and chosen by client id.
    managed_identities: tuple[AppRegistration, ...] = (
        AppRegistration(
            client_id=SYSTEM_IDENTITY_CLIENT_ID, secret=None, display_name="system-assigned"
        ),
    )
    identity_header: str = DEFAULT_IDENTITY_HEADER
    audience: str = DEFAULT_AUDIENCE
    #: Multiplies every rate window: 0.01 plays an hour in 36 s.
    time_scale: float = 1.0
    limits: Mapping[str, tuple[tuple[int, float], ...]] = field(
        default_factory=lambda: dict(DEFAULT_LIMITS)
    )
    token_lifetime_s: float = 3600.0
    #: 201 (2017 docs, 2023 report) or 200 (docs since 2022): clients must accept both.
    offboard_status: int = 201
    #: Online devices: Pending for ``action_start_s``, then InProgress for ``action_complete_s``.
    action_start_s: float = 2.0
    action_complete_s: float = 10.0
    #: Offline devices stay Pending this long, then TimeOut (the real delay is unconfirmed).
    action_timeout_s: float = 3 * 86400.0
    fleet: FleetSpec = field(default_factory=FleetSpec)
    faults: Faults = field(default_factory=Faults)
    seed: int = 1
    #: More tenants on the same port (see TenantSpec and extra_tenants); ``tenant_id`` stays
    #: the first one, served exactly as when it is alone.
    tenants: tuple[TenantSpec, ...] = ()

    def windows(self, group: str) -> tuple[tuple[int, float], ...]:
        """The scaled windows of an endpoint group (the documented ones when ``limits`` does
        not name the group)."""
        limits = self.limits.get(group, DEFAULT_LIMITS[group])
        return tuple((calls, period * self.time_scale) for calls, period in limits)


@dataclass(slots=True)
class _Action:
    id: str
    machine_id: str
    computer_dns_name: str
    requestor: str
    comment: str
    created: float  # emulator clock
    online: bool
    cancelled_at: float | None = None
    cancel_comment: str | None = None
    cancel_requestor: str | None = None


@dataclass(slots=True)
class Truth:
    """Ground truth for tests: what really reached the emulator. Not on the public API."""

    #: Offboard POSTs that arrived (authenticated), per machine id.
    offboard_posts: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Offboard actions created through the API, per machine id.
    actions_created: collections.Counter[str] = field(default_factory=collections.Counter)
    #: 429s served, per endpoint group.
    throttled: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Calls that arrived, per endpoint group (429s included).
    calls: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Highest number of arrivals seen in any window, per "group period_s".
    max_in_window: dict[str, int] = field(default_factory=dict)
    #: Arrival times (emulator clock) of offboard POSTs, for window checks across processes.
    offboard_arrivals: list[float] = field(default_factory=list)
    #: Paths that named something that is not a 40-hex machine id.
    malformed_paths: list[str] = field(default_factory=list)
    tokens_issued: int = 0
    #: Offboard POSTs that arrived for a machine that already had an action created through
    #: the API: a client that never offboards twice keeps this at zero for its own actions.
    posts_after_action: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Every token issued, so tests can grep outputs for them (not served over HTTP).
    tokens: list[str] = field(default_factory=list, repr=False)
    faults_injected: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Cancel POSTs that arrived (authenticated), per action id as given in the path.
    cancel_posts: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Actions cancelled through the API, per machine id.
    actions_cancelled: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Tag POSTs that arrived (authenticated): ``"single"`` and ``"bulk"``.
    tag_posts: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Tag operations applied (no-ops included: adding a tag already there, removing one that
    #: is not), per machine id; a bulk call counts once for each machine it tagged.
    tag_operations: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_json(self) -> dict[str, Any]:
        """A JSON-friendly copy."""
        return {
            "offboard_posts": dict(self.offboard_posts),
            "actions_created": dict(self.actions_created),
            "throttled": dict(self.throttled),
            "calls": dict(self.calls),
            "max_in_window": dict(self.max_in_window),
            "malformed_paths": list(self.malformed_paths),
            "tokens_issued": self.tokens_issued,
            "posts_after_action": dict(self.posts_after_action),
            "faults_injected": dict(self.faults_injected),
            "cancel_posts": dict(self.cancel_posts),
            "actions_cancelled": dict(self.actions_cancelled),
            "tag_posts": dict(self.tag_posts),
            "tag_operations": dict(self.tag_operations),
        }


class _Reply(Exception):
    """Raised inside a handler to send ``response`` at once."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__()
        self.response = response


class _Dropped(Exception):
    """The emulator dropped the connection on purpose."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mde_error(status: int, code: str, message: str, **headers: str) -> web.Response:
    """An MDE error in the documented ``{"error": {"code", "message", "target"}}`` shape."""
    body = {"error": {"code": code, "message": message, "target": str(uuid.uuid4())}}
    return web.Response(
        status=status,
        body=orjson.dumps(body),
        content_type="application/json",
        headers=headers or None,
    )


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_TenantHandler = Callable[["Emulator", web.Request], Awaitable[web.StreamResponse]]


class Emulator:
    """State and handlers of one emulated tenant. ``build_app()`` gives the web app.

    With ``config.tenants`` it also serves more tenants on the same app: each is an Emulator
    of its own (``tenant(tid)``: fleet, actions, windows, truth) sharing this one's clock and
    token signing key; an MDE call is served by the tenant its token's ``tid`` names.
    """

    def __init__(
        self,
        config: EmulatorConfig | None = None,
        *,
        clock: Callable[[], float] | None = None,
        parent: Emulator | None = None,
    ) -> None:
        """``parent`` is internal: the first tenant's emulator, whose clock, wall time and
        signing key the other tenants share."""
        self.config = config or EmulatorConfig()
        self.faults = self.config.faults
        self.truth = Truth()
        self._parent = parent
        self._clock = clock
        self._clock0: float | None = None
        self._wall0: float = parent._wall0 if parent is not None else time.time()
        self._rng = random.Random(self.config.seed)
        self._signing_key: bytes = (
            parent._signing_key
            if parent is not None
            else hashlib.sha256(f"emulator-key-{uuid.uuid4()}".encode()).digest()
        )
        self._apps = {app.client_id: app for app in self.config.apps}
        self.machines: dict[str, dict[str, Any]] = {}
        self._by_name: dict[str, list[str]] = collections.defaultdict(list)
        for machine in make_fleet(self.config.fleet, now=datetime.fromtimestamp(self._wall0, UTC)):
            self.add_machine(machine)
        self.actions: dict[str, _Action] = {}
        self._actions_by_machine: dict[str, list[str]] = collections.defaultdict(list)
        self._windows: dict[tuple[str, str, float], collections.deque[float]] = {}
        #: (Retry-After, call group or None for any) to serve next, in order.
        self._forced_429: list[tuple[float, str | None]] = []
        self._seed_pending(self.config.fleet.pending_fraction)
        #: Every tenant served, by tenant id; the first is this one.
        self._tenants: dict[str, Emulator] = {self.config.tenant_id: self}
        for number, spec in enumerate(self.config.tenants, start=2):
            if spec.tenant_id in self._tenants:
                raise ValueError(f"tenant {spec.tenant_id} is declared twice")
            tenant_config = dataclasses.replace(
                self.config,
                tenant_id=spec.tenant_id,
                fleet=spec.fleet,
                apps=spec.apps if spec.apps is not None else self.config.apps,
                seed=spec.seed if spec.seed is not None else self.config.seed + 1000 * number,
                tenants=(),
            )
            self._tenants[spec.tenant_id] = Emulator(tenant_config, clock=clock, parent=self)

    @property
    def tenant_ids(self) -> tuple[str, ...]:
        """Every tenant served, the first (``config.tenant_id``) first."""
        return tuple(self._tenants)

    def tenant(self, tenant_id: str) -> Emulator:
        """The emulator of one tenant: its ``machines``, ``actions``, ``truth``, ``force_429``.
        The first tenant's is this object itself. KeyError for a tenant not served."""
        return self._tenants[tenant_id]

    def __repr__(self) -> str:
        return (
            f"Emulator(machines={len(self.machines)}, actions={len(self.actions)}, "
            f"time_scale={self.config.time_scale}, calls={dict(self.truth.calls)})"
        )

    # -- time ---------------------------------------------------------------------------------

    def now(self) -> float:
        """The emulator's clock (the running loop's, unless one was injected)."""
        if self._parent is not None:
            value = self._parent.now()  # one clock for every tenant
        elif self._clock is not None:
            value = self._clock()
        else:
            value = asyncio.get_running_loop().time()
        if self._clock0 is None:
            self._clock0 = value
            # Actions seeded by pending_fraction were stamped before the clock was first read
            # (relative to zero); anchor them now, or a loop clock reading days (asyncio's is
            # time.monotonic(), the host's uptime) would time them out at once.
            for action in self.actions.values():
                action.created += value
        return value

    def wall(self, moment: float | None = None) -> datetime:
        """Wall time for an emulator-clock moment (now by default)."""
        moment = self.now() if moment is None else moment
        if self._parent is not None:
            return self._parent.wall(moment)
        assert self._clock0 is not None  # noqa: S101 - now() has run
        return datetime.fromtimestamp(self._wall0 + (moment - self._clock0), UTC)

    # -- fleet and actions -----------------------------------------------------------------------

    def add_machine(self, machine: dict[str, Any]) -> None:
        """Add (or replace) a machine in the fleet."""
        self.machines[machine["id"]] = machine
        name = str(machine.get("computerDnsName") or "").lower()
        if name:
            self._by_name[name].append(machine["id"])
            short = name.split(".", 1)[0]
            if short != name:
                self._by_name[short].append(machine["id"])

    def _seed_pending(self, fraction: float) -> None:
        if fraction <= 0:
            return
        rng = random.Random(self.config.fleet.seed + 7)
        for machine_id, machine in self.machines.items():
            if machine["osPlatform"] in UNSUPPORTED_PLATFORMS or rng.random() >= fraction:
                continue
            # Created "earlier" (1 s before the clock's first reading, see now()) by someone
            # else; offline so it stays Pending.
            self._create_action(
                machine,
                requestor="secops@contoso.com",
                comment="Offboarded from the portal",
                created=-1.0,
                online=False,
            )
            self.truth.actions_created[machine_id] -= 1  # not created through our API

    def _create_action(
        self,
        machine: dict[str, Any],
        *,
        requestor: str,
        comment: str,
        created: float | None = None,
        online: bool | None = None,
    ) -> _Action:
        action = _Action(
            id=str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
            machine_id=machine["id"],
            computer_dns_name=machine.get("computerDnsName") or "",
            requestor=requestor,
            comment=comment,
            created=self.now() if created is None else created,
            online=self._is_online(machine) if online is None else online,
        )
        self.actions[action.id] = action
        self._actions_by_machine[machine["id"]].append(action.id)
        self.truth.actions_created[machine["id"]] += 1
        return action

    def _is_online(self, machine: dict[str, Any]) -> bool:
        return machine.get("healthStatus") == "Active" and not self._offboarded(machine["id"])

    def _offboarded(self, machine_id: str) -> bool:
        now = self.now()
        return any(
            self.action_status(self.actions[a], now) == "Succeeded"
            for a in self._actions_by_machine.get(machine_id, ())
        )

    def action_status(self, action: _Action, now: float | None = None) -> str:
        """The lifecycle: Pending -> InProgress -> Succeeded online; Pending -> TimeOut offline."""
        now = self.now() if now is None else now
        if action.cancelled_at is not None and action.cancelled_at <= now:
            return "Cancelled"
        age = now - action.created
        if action.online:
            if age < self.config.action_start_s:
                return "Pending"
            if age < self.config.action_start_s + self.config.action_complete_s:
                return "InProgress"
            return "Succeeded"
        return "Pending" if age < self.config.action_timeout_s else "TimeOut"

    def _status_changed_at(self, action: _Action, status: str) -> float:
        cfg = self.config
        return {
            "Pending": action.created,
            "InProgress": action.created + cfg.action_start_s,
            "Succeeded": action.created + cfg.action_start_s + cfg.action_complete_s,
            "TimeOut": action.created + cfg.action_timeout_s,
            "Cancelled": action.cancelled_at or action.created,
        }.get(status, action.created)

    def action_entity(self, action: _Action) -> dict[str, Any]:
        """The MachineAction as the API returns it (mde-api.md sections 2 and 3)."""
        now = self.now()
        status = self.action_status(action, now)
        cancelled = status == "Cancelled"
        return {
            "id": action.id,
            "type": "Offboard",
            "title": None,
            "requestor": action.requestor,
            "requestorComment": action.comment,
            "status": status,
            "machineId": action.machine_id,
            "computerDnsName": action.computer_dns_name,
            "creationDateTimeUtc": iso(self.wall(action.created)),
            "lastUpdateDateTimeUtc": iso(self.wall(self._status_changed_at(action, status))),
            "cancellationRequestor": action.cancel_requestor if cancelled else None,
            "cancellationComment": action.cancel_comment if cancelled else None,
            "cancellationDateTimeUtc": iso(self.wall(action.cancelled_at))
            if cancelled and action.cancelled_at is not None
            else None,
            "errorHResult": 0,
            "scope": None,
            "externalId": None,
            "requestSource": "PublicApi",
            "relatedFileInfo": None,
        }

    def machine_entity(self, machine: dict[str, Any]) -> dict[str, Any]:
        """A machine as the API shows it now (an offboarded sensor stops reporting)."""
        if self._actions_by_machine.get(machine["id"]) and self._offboarded(machine["id"]):
            return {**machine, "healthStatus": "Inactive"}
        return machine

    def pending_offboard(self, machine_id: str) -> _Action | None:
        """The machine's offboard action that is still Pending or InProgress, if any."""
        now = self.now()
        for action_id in self._actions_by_machine.get(machine_id, ()):
            action = self.actions[action_id]
            if self.action_status(action, now) in ("Pending", "InProgress"):
                return action
        return None

    def force_429(self, count: int, retry_after_s: float = 1.0, group: str | None = None) -> None:
        """Answer the next ``count`` API calls (of ``group`` only, e.g. ``"offboard"``, when
        given) with 429 and this Retry-After."""
        self._forced_429.extend([(retry_after_s, group)] * count)

    # -- tokens ----------------------------------------------------------------------------------

    def issue_token(self, app: AppRegistration, audience: str) -> tuple[str, float]:
        """A signed JWT for ``app``; returns the token and its lifetime."""
        now_wall = self.wall().timestamp()
        lifetime = self.config.token_lifetime_s
        claims = {
            "aud": audience,
            "iss": f"https://sts.windows.net/{self.config.tenant_id}/",
            "iat": int(now_wall),
            "nbf": int(now_wall),
            "exp": now_wall + lifetime,
            "appid": app.client_id,
            "azp": app.client_id,
            "tid": self.config.tenant_id,
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, app.client_id)),
            "roles": list(app.roles),
            "ver": "1.0",
            "app_displayname": app.display_name,
        }
        header = _b64url(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
        payload = _b64url(orjson.dumps(claims))
        signature = hmac.new(self._signing_key, f"{header}.{payload}".encode(), "sha256").digest()
        self.truth.tokens_issued += 1
        self.truth.tokens.append(token := f"{header}.{payload}.{_b64url(signature)}")
        return token, lifetime

    def _verify_token(self, token: str) -> dict[str, Any] | None:
        parts = token.split(".")
        if len(parts) != 3:
            return None
        expected = hmac.new(self._signing_key, f"{parts[0]}.{parts[1]}".encode(), "sha256").digest()
        try:
            if not hmac.compare_digest(expected, _b64url_decode(parts[2])):
                return None
            claims: dict[str, Any] = orjson.loads(_b64url_decode(parts[1]))
        except (ValueError, orjson.JSONDecodeError):
            return None
        return claims

    # -- the web app -------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        """The ``aiohttp.web`` application serving Entra ID, MDE and the truth view."""
        app = web.Application(client_max_size=1024 * 1024)
        tenant = "/{tenant}"
        by_path, by_token = self._by_path_tenant, self._by_token_tenant
        openid = by_path(Emulator._openid)
        app.router.add_get(tenant + "/v2.0/.well-known/openid-configuration", openid)
        app.router.add_get(tenant + "/.well-known/openid-configuration", openid)
        app.router.add_post(tenant + "/oauth2/v2.0/token", by_path(Emulator._token))
        for prefix in ("/api", "/api/v1.0"):
            # The bulk tag path first: its last segment must never be read as a machine id.
            app.router.add_post(
                prefix + "/machines/AddOrRemoveTagForMultipleMachines",
                by_token(Emulator._tag_machines),
            )
            app.router.add_post(prefix + "/machines/{id}/offboard", by_token(Emulator._offboard))
            app.router.add_post(prefix + "/machines/{id}/tags", by_token(Emulator._tag_machine))
            app.router.add_get(prefix + "/machines", by_token(Emulator._list_machines))
            app.router.add_get(prefix + "/machines/{id}", by_token(Emulator._get_machine))
            app.router.add_get(prefix + "/machineactions", by_token(Emulator._list_actions))
            app.router.add_get(prefix + "/machineactions/{id}", by_token(Emulator._get_action))
            app.router.add_post(
                prefix + "/machineactions/{id}/cancel", by_token(Emulator._cancel_action)
            )
            app.router.add_post(prefix + "/advancedqueries/run", by_token(Emulator._hunting))
        app.router.add_get("/msi/token", self._managed_identity_token)
        app.router.add_get("/_emulator/truth", self._truth)
        return app

    def _by_path_tenant(self, handler: _TenantHandler) -> _Handler:
        """Serve an Entra ID call as the tenant its path names (``/{tenant}/...``); a tenant
        not served goes to the first one, which answers that it does not exist."""

        async def route(request: web.Request) -> web.StreamResponse:
            return await handler(self._tenants.get(request.match_info["tenant"], self), request)

        return route

    def _by_token_tenant(self, handler: _TenantHandler) -> _Handler:
        """Serve an MDE call as the tenant its token's ``tid`` names: each tenant sees only its
        own fleet, actions and windows, so another tenant's machine is simply not found (404).
        A token that does not verify, or names no tenant served, goes to the first tenant,
        whose gate refuses it (401)."""

        async def route(request: web.Request) -> web.StreamResponse:
            return await handler(self._tenant_of_token(request), request)

        return route

    def _tenant_of_token(self, request: web.Request) -> Emulator:
        if len(self._tenants) == 1:
            return self
        auth = request.headers.get("Authorization", "")
        claims = (
            self._verify_token(auth.removeprefix("Bearer ").strip())
            if auth.startswith("Bearer ")
            else None
        )
        tid = claims.get("tid") if claims is not None else None
        return self._tenants.get(str(tid), self)

    # Entra ID ------------------------------------------------------------------------------------

    def _aad_error(self, status: int, error: str, code: int, description: str) -> web.Response:
        trace = str(uuid.uuid4())
        stamp = self.wall().strftime("%Y-%m-%d %H:%M:%SZ")
        return _json(
            {
                "error": error,
                "error_description": f"AADSTS{code}: {description} Trace ID: {trace} "
                f"Correlation ID: {uuid.uuid4()} Timestamp: {stamp}",
                "error_codes": [code],
                "timestamp": stamp,
                "trace_id": trace,
                "correlation_id": str(uuid.uuid4()),
            },
            status,
        )

    async def _openid(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        if tenant not in (self.config.tenant_id, "organizations", "common"):
            return self._aad_error(
                400,
                "invalid_tenant",
                90002,
                f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID.",
            )
        base = f"{request.scheme}://{request.host}/{tenant}"
        return _json(
            {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "issuer": f"{request.scheme}://{request.host}/{self.config.tenant_id}/v2.0",
                "token_endpoint_auth_methods_supported": [
                    "client_secret_post",
                    "private_key_jwt",
                    "client_secret_basic",
                ],
                "response_types_supported": ["code", "id_token", "token"],
                "jwks_uri": f"{base}/discovery/v2.0/keys",
            }
        )

    async def _token(self, request: web.Request) -> web.Response:
        tenant = request.match_info["tenant"]
        if tenant != self.config.tenant_id:
            return self._aad_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        form = await request.post()
        grant = str(form.get("grant_type", ""))
        if grant != "client_credentials":
            return self._aad_error(
                400,
                "unsupported_grant_type",
                70003,
                f"The app requested an unsupported grant type '{grant}'.",
            )
        client_id = str(form.get("client_id", ""))
        app = self._apps.get(client_id)
        if app is None:
            return self._aad_error(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{client_id}' was not found in the directory "
                f"'{tenant}'.",
            )
        if "client_assertion" in form:
            problem = self._check_assertion(
                app,
                str(form.get("client_assertion_type", "")),
                str(form["client_assertion"]),
                f"{request.scheme}://{request.host}{request.path}",
            )
            if problem:
                return self._aad_error(401, "invalid_client", 700027, problem)
        elif "client_secret" in form:
            given = str(form["client_secret"]).encode()
            if app.secret is None or not hmac.compare_digest(given, app.secret.encode()):
                return self._aad_error(
                    401,
                    "invalid_client",
                    7000215,
                    "Invalid client secret provided. Ensure the secret being sent in the "
                    f"request is the client secret value, not the client secret ID, for a "
                    f"secret added to app '{client_id}'.",
                )
        else:
            return self._aad_error(
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' "
                "or 'client_secret'.",
            )
        scope = str(form.get("scope", ""))
        scopes = scope.split()
        if len(scopes) != 1 or not scopes[0].endswith("/.default"):
            return self._aad_error(
                400,
                "invalid_scope",
                1002012,
                f"The provided value for scope {scope} is not valid. Client credential flows "
                "must have a scope value with /.default suffixed to the resource identifier.",
            )
        audience = scopes[0].removesuffix("/.default")
        if audience.rstrip("/") != self.config.audience.rstrip("/"):
            return self._aad_error(
                400,
                "invalid_resource",
                500011,
                f"The resource principal named {audience} was not found in the tenant named "
                f"{tenant}.",
            )
        token, lifetime = self.issue_token(app, self.config.audience)
        return _json(
            {
                "token_type": "Bearer",
                "expires_in": int(lifetime),
                "ext_expires_in": int(lifetime),
                "access_token": token,
            }
        )

    def _check_assertion(
        self, app: AppRegistration, assertion_type: str, assertion: str, endpoint: str
    ) -> str | None:
        """Why a client assertion is not acceptable, or None when it is."""
        if assertion_type != _ASSERTION_TYPE:
            return f"Client assertion type '{assertion_type}' is not supported."
        if app.certificate_pem is None:
            return f"No certificate is registered for app '{app.client_id}'."
        parts = assertion.split(".")
        if len(parts) != 3:
            return "Client assertion is not a JWT."
        try:
            header = orjson.loads(_b64url_decode(parts[0]))
            claims = orjson.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, orjson.JSONDecodeError):
            return "Client assertion is not a JWT."
        cert = x509.load_pem_x509_certificate(app.certificate_pem)
        thumbprints = {
            "x5t": _b64url(cert.fingerprint(hashes.SHA1())),  # noqa: S303 - x5t is SHA-1 by spec
            "x5t#S256": _b64url(cert.fingerprint(hashes.SHA256())),
        }
        # msal sends the thumbprints base64url-encoded WITH "=" padding; Entra ID accepts both.
        if not any(str(header.get(k, "")).rstrip("=") == v for k, v in thumbprints.items()):
            return (
                "The certificate with identifier used to sign the client assertion is not "
                f"registered on application '{app.client_id}'."
            )
        key = cert.public_key()
        if not isinstance(key, rsa.RSAPublicKey):
            return "Only RSA certificates are supported."
        signed = f"{parts[0]}.{parts[1]}".encode()
        pad: padding.AsymmetricPadding
        if header.get("alg") == "RS256":
            pad = padding.PKCS1v15()
        elif header.get("alg") == "PS256":
            pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        else:
            return f"Unsupported client assertion algorithm '{header.get('alg')}'."
        try:
            key.verify(signature, signed, pad, hashes.SHA256())
        except InvalidSignature:
            return "Client assertion contains an invalid signature."
        if claims.get("iss") != app.client_id or claims.get("sub") != app.client_id:
            return "Client assertion iss and sub must be the client id."
        if claims.get("aud") not in (endpoint, endpoint.replace("/v2.0", "")):
            return f"Client assertion audience '{claims.get('aud')}' is not the token endpoint."
        if float(claims.get("exp", 0)) < self.wall().timestamp() - 300:
            return "Client assertion is expired."
        return None

    # MDE: the common gate -----------------------------------------------------------------------

    async def _gate(self, request: web.Request, group: str) -> tuple[str, str]:
        """Delay, authenticate, count, throttle, authorise and inject faults.

        Returns (client id, requestor name). Raises _Reply with the error to send.
        """
        faults = self.faults
        delay = faults.latency_s + (self._rng.uniform(0, faults.jitter_s) if faults.jitter_s else 0)
        if delay > 0:
            await asyncio.sleep(delay)
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise _Reply(
                mde_error(401, "Unauthorized", "Authorization header is missing or malformed.")
            )
        claims = self._verify_token(auth.removeprefix("Bearer ").strip())
        if claims is None:
            raise _Reply(mde_error(401, "Unauthorized", "Invalid token."))
        if float(claims.get("exp", 0)) <= self.wall().timestamp():
            raise _Reply(mde_error(401, "Unauthorized", "The access token has expired."))
        if str(claims.get("aud", "")).rstrip("/") != self.config.audience.rstrip("/"):
            # A token with the wrong audience gets 403 (microsoft-365-docs #9246).
            raise _Reply(mde_error(403, "Forbidden", "Invalid audience for this API."))
        if claims.get("tid") != self.config.tenant_id:
            # Only reachable with a tenant this emulator does not serve: the router sends a
            # token to the tenant named by its tid (see _by_token_tenant).
            raise _Reply(mde_error(401, "Unauthorized", "The token's tenant is not known."))
        client_id = str(claims.get("appid", ""))
        now = self.now()
        self.truth.calls[group] += 1
        if group == "offboard":
            self.truth.offboard_arrivals.append(now)
            posted = request.match_info.get("id", "").lower()
            self.truth.offboard_posts[posted] += 1
            if self.truth.actions_created.get(posted, 0) > 0:
                self.truth.posts_after_action[posted] += 1
        elif group == "cancel":
            self.truth.cancel_posts[request.match_info.get("id", "")] += 1
        elif group == "tags":
            self.truth.tag_posts["single" if "id" in request.match_info else "bulk"] += 1
        retry_after = self._count(client_id, group, now)
        if retry_after is None:
            for index, (forced, only) in enumerate(self._forced_429):
                if only is None or only == group:
                    retry_after = forced
                    del self._forced_429[index]
                    break
        if retry_after is None and faults.burst_every_s > 0 and faults.burst_length_s > 0:
            phase = now % faults.burst_every_s
            if phase < faults.burst_length_s:
                retry_after = faults.burst_length_s - phase
        if retry_after is not None:
            self.truth.throttled[group] += 1
            seconds = max(1, math.ceil(retry_after))
            raise _Reply(
                mde_error(
                    429,
                    "TooManyRequests",
                    f"Rate limit is exceeded. Try again in {seconds} seconds.",
                    **{"Retry-After": str(seconds)},
                )
            )
        roles = set(claims.get("roles") or ())
        needed = GROUP_ROLES[group]
        if not roles.intersection(needed):
            raise _Reply(
                mde_error(
                    403,
                    "Forbidden",
                    f"Missing application roles. API required roles: {', '.join(needed)}. "
                    f"Application roles: {', '.join(sorted(roles)) or 'none'}.",
                )
            )
        if faults.error_rate and self._rng.random() < faults.error_rate:
            self.truth.faults_injected["error"] += 1
            raise _Reply(web.Response(status=500))
        if faults.abort_before_rate and self._rng.random() < faults.abort_before_rate:
            self.truth.faults_injected["abort_before"] += 1
            self._drop(request)
        name = str(claims.get("app_displayname") or client_id)
        return client_id, name

    def _count(self, client_id: str, group: str, now: float) -> float | None:
        """Count an arrival in every window; the delay until a call would pass, if over."""
        retry_after: float | None = None
        for calls, period in self.config.windows(group):
            key = (client_id, group, period)
            window = self._windows.setdefault(key, collections.deque())
            while window and window[0] <= now - period:
                window.popleft()
            over = len(window) >= calls
            window.append(now)  # every arrival counts, 429s included: retrying early keeps
            # a client throttled (mde-api.md section 6)
            label = f"{group} {period:g}"
            self.truth.max_in_window[label] = max(
                self.truth.max_in_window.get(label, 0), len(window)
            )
            if over:
                wait = window[len(window) - calls] + period - now
                retry_after = max(retry_after or 0.0, wait)
        return retry_after

    def _drop(self, request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise _Dropped

    @staticmethod
    async def _guarded(
        handler: Callable[[], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        try:
            return await handler()
        except _Reply as reply:
            return reply.response
        except _Dropped:
            # The transport is already aborted: this response is never written.
            return web.Response(status=499)

    def _maybe_drop_after(self, request: web.Request) -> None:
        if self.faults.abort_after_rate and self._rng.random() < self.faults.abort_after_rate:
            self.truth.faults_injected["abort_after"] += 1
            self._drop(request)

    # MDE: endpoints ------------------------------------------------------------------------------

    async def _offboard(self, request: web.Request) -> web.StreamResponse:
        async def handle() -> web.StreamResponse:
            _, requestor = await self._gate(request, "offboard")
            machine_id = request.match_info["id"]
            body = await self._json_body(request)
            comment = self._required_text(body, "Comment")
            machine = self._find_machine(machine_id)
            if machine is None:
                return mde_error(404, "ResourceNotFound", f"Machine {machine_id} was not found")
            if machine["osPlatform"] in UNSUPPORTED_PLATFORMS:
                return mde_error(
                    400,
                    "OsPlatformNotSupported",
                    f"Offboard is not supported for OS platform {machine['osPlatform']}.",
                )
            if self.pending_offboard(machine["id"]) is not None:
                return mde_error(
                    400,
                    "ActiveRequestAlreadyExists",
                    f"Action Offboard already exists for machine {machine['id']}.",
                )
            action = self._create_action(machine, requestor=requestor, comment=comment)
            self._maybe_drop_after(request)
            return _json(self.action_entity(action), self.config.offboard_status)

        return await self._guarded(handle)

    @staticmethod
    async def _json_body(request: web.Request) -> dict[str, Any]:
        """The JSON object a POST must carry with ``Content-Type: application/json``
        (mde-api.md section 2); raises _Reply with the 400 otherwise."""
        if request.content_type != "application/json":
            raise _Reply(
                mde_error(400, "InvalidRequestBody", "Content-Type must be application/json.")
            )
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            raise _Reply(
                mde_error(400, "InvalidRequestBody", "Request body is not valid JSON.")
            ) from None
        if not isinstance(body, dict):
            raise _Reply(mde_error(400, "InvalidRequestBody", "Request body must be an object."))
        return body

    @staticmethod
    def _required(body: dict[str, Any], key: str) -> Any:
        """``body[key]``; body keys are case-sensitive (mde-api.md section 2): a key in the
        wrong case is InvalidRequestBody, a missing one MissingRequiredParameter."""
        if key not in body:
            if any(k.lower() == key.lower() for k in body):
                raise _Reply(
                    mde_error(
                        400,
                        "InvalidRequestBody",
                        "Unknown parameter; parameters are case-sensitive.",
                    )
                )
            raise _Reply(mde_error(400, "MissingRequiredParameter", f"{key} is required."))
        return body[key]

    @classmethod
    def _required_text(cls, body: dict[str, Any], key: str) -> str:
        """A required, non-blank string parameter."""
        value = cls._required(body, key)
        if not isinstance(value, str) or not value.strip():
            raise _Reply(mde_error(400, "InvalidRequestBody", f"{key} must be a non-empty string."))
        return value

    def _find_machine(self, key: str) -> dict[str, Any] | None:
        lowered = key.lower()
        if _HEX40.fullmatch(lowered) is None:
            self.truth.malformed_paths.append(key)
            return None
        return self.machines.get(lowered)

    @staticmethod
    def _paging(request: web.Request) -> tuple[int | None, int]:
        """``$top`` (None when absent) and ``$skip``; raises _Reply on bad values."""
        try:
            top_text = request.query.get("$top")
            top = int(top_text) if top_text is not None else None
            skip = int(request.query.get("$skip", "0"))
        except ValueError:
            raise _Reply(
                mde_error(400, "ODataError", "$top and $skip must be whole numbers.")
            ) from None
        if top is not None and (top < 0 or top > MAX_PAGE):
            raise _Reply(
                mde_error(
                    400, "ODataError", f"The limit of '{MAX_PAGE}' for Top query has been exceeded."
                )
            )
        if skip < 0:
            raise _Reply(mde_error(400, "ODataError", "$skip must not be negative."))
        return top, skip

    @staticmethod
    def _filtered(
        request: web.Request, items: Iterable[dict[str, Any]], properties: Iterable[str]
    ) -> list[dict[str, Any]]:
        text = request.query.get("$filter")
        if text is None:
            return list(items)
        try:
            predicate = odata.parse_filter(text, tuple(properties))
        except odata.ODataError as exc:
            raise _Reply(mde_error(400, "ODataError", f"Invalid filter clause: {exc}")) from None
        return [item for item in items if predicate(item)]

    async def _list_machines(self, request: web.Request) -> web.StreamResponse:
        async def handle() -> web.StreamResponse:
            await self._gate(request, "machines")
            if not self.machines:
                # "404 when there are no recent machines" (mde-api.md section 4).
                return mde_error(404, "ResourceNotFound", "No recent machines found.")
            top, skip = self._paging(request)
            views = (self.machine_entity(m) for m in self.machines.values())
            matched = self._filtered(request, views, MACHINE_FILTER_PROPERTIES)
            page_size = MAX_PAGE if top is None else top
            page = matched[skip : skip + page_size]
            body: dict[str, Any] = {
                "@odata.context": f"{request.scheme}://{request.host}/api/$metadata#Machines",
                "value": page,
            }
            if top is None and len(matched) > MAX_PAGE:
                # Reproduces microsoft-365-docs #8316: with no $top the nextLink carries
                # $skip=10000, and following it never ends: every page links on again with
                # one more $skip=10000 appended (the first one wins), a malformed link.
                query = request.query_string
                link = f"{request.scheme}://{request.host}{request.path}?"
                link += (query + "&" if query else "") + f"$skip={MAX_PAGE}"
                body["@odata.nextLink"] = link
            return _json(body)

        return await self._guarded(handle)

    async def _get_machine(self, request: web.Request) -> web.StreamResponse:
        async def handle() -> web.StreamResponse:
            await self._gate(request, "machines")
            key = request.match_info["id"]
            if _HEX40.fullmatch(key.lower()):
                machine = self.machines.get(key.lower())
            else:
                ids = self._by_name.get(key.lower(), [])
                machine = self.machines[ids[0]] if len(ids) == 1 else None
            if machine is None:
                return mde_error(404, "ResourceNotFound", f"Machine {key} was not found")
            return _json(self.machine_entity(machine))

        return await self._guarded(handle)

    # Machine tags (mde-api.md section 5b) ----------------------------------------------------

    def _tag_parameters(self, body: dict[str, Any]) -> tuple[str, str]:
        """``(Value, Action)`` of a tag request; raises _Reply with the 400 otherwise."""
        value = self._required_text(body, "Value")
        action = self._required(body, "Action")
        if len(value) > MAX_TAG_LENGTH or not value.isprintable():
            # UNCONFIRMED (mde-api.md section 5b: maximum length and allowed characters are
            # not documented): more than 200 characters or a control character is refused.
            raise _Reply(
                mde_error(
                    400,
                    "InvalidInput",
                    f"Tag must be at most {MAX_TAG_LENGTH} printable characters.",
                )
            )
        if action not in TAG_ACTIONS:
            raise _Reply(mde_error(400, "InvalidRequestBody", "Action must be 'Add' or 'Remove'."))
        return value, str(action)

    def _apply_tag(self, machine: dict[str, Any], value: str, action: str) -> None:
        """Add or remove one tag. Adding a tag already there and removing one that is not are
        no-ops that succeed; tags compare exactly (UNCONFIRMED, mde-api.md section 5b: whether
        MDE folds case when it compares tags is not documented)."""
        tags = [str(tag) for tag in machine.get("machineTags") or ()]
        if action == "Add" and value not in tags:
            tags.append(value)
        elif action == "Remove":
            tags = [tag for tag in tags if tag != value]
        machine["machineTags"] = tags  # a new list: entities served earlier keep theirs
        self.truth.tag_operations[machine["id"]] += 1

    async def _tag_machine(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/machines/{id}/tags``: 200 with the updated Machine (mde-api.md 5b)."""

        async def handle() -> web.StreamResponse:
            await self._gate(request, "tags")
            machine_id = request.match_info["id"]
            value, action = self._tag_parameters(await self._json_body(request))
            # Only machines seen within retention can be tagged: the fleet is what the tenant
            # still shows (GET /api/machines), so anything else is not found.
            machine = self._find_machine(machine_id)
            if machine is None:
                return mde_error(404, "ResourceNotFound", f"Machine {machine_id} was not found")
            self._apply_tag(machine, value, action)
            self._maybe_drop_after(request)
            return _json(self.machine_entity(machine))

        return await self._guarded(handle)

    async def _tag_machines(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/machines/AddOrRemoveTagForMultipleMachines`` (mde-api.md section 5b).

        UNCONFIRMED choices (mde-api.md section 5b leaves them open):

        * the response is 200 with the machines tagged, as an OData collection like
          ``GET /api/machines`` (``{"@odata.context", "value": [...]}``), in request order;
        * well-formed ids the tenant does not have (never seen, or out of retention) are
          skipped, not an error: they are missing from ``value``, and a call naming only such
          ids answers 200 with an empty ``value``;
        * a malformed id (not 40 hex) refuses the whole call: 400 ``InvalidInput``, nothing
          tagged; an empty list is 400 ``InvalidRequestBody``; repeated ids count once;
        * more than 500 ids: 400 ``MaximumBatchSizeExceeded``, nothing tagged.
        """

        async def handle() -> web.StreamResponse:
            await self._gate(request, "tags")
            body = await self._json_body(request)
            value, action = self._tag_parameters(body)
            ids = self._required(body, "MachineIds")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                return mde_error(
                    400, "InvalidRequestBody", "MachineIds must be a list of machine ids."
                )
            if not ids:
                return mde_error(400, "InvalidRequestBody", "MachineIds must not be empty.")
            if len(ids) > MAX_TAG_BATCH:
                return mde_error(
                    400,
                    "MaximumBatchSizeExceeded",
                    f"At most {MAX_TAG_BATCH} machines can be tagged in one call; "
                    f"{len(ids)} were given.",
                )
            malformed = [i for i in ids if _HEX40.fullmatch(i.lower()) is None]
            if malformed:
                return mde_error(400, "InvalidInput", f"Invalid machine id {malformed[0][:60]!r}.")
            tagged: list[dict[str, Any]] = []
            for machine_id in dict.fromkeys(i.lower() for i in ids):
                machine = self.machines.get(machine_id)
                if machine is not None:
                    self._apply_tag(machine, value, action)
                    tagged.append(machine)
            self._maybe_drop_after(request)
            return _json(
                {
                    "@odata.context": f"{request.scheme}://{request.host}/api/$metadata#Machines",
                    "value": [self.machine_entity(m) for m in tagged],
                }
            )

        return await self._guarded(handle)

    async def _list_actions(self, request: web.Request) -> web.StreamResponse:
        async def handle() -> web.StreamResponse:
            await self._gate(request, "machineactions")
            top, skip = self._paging(request)
            # Newest first: the docs call $top=2 "the latest two" (mde-api.md section 3).
            ordered = sorted(self.actions.values(), key=lambda a: a.created, reverse=True)
            matched = self._filtered(
                request, (self.action_entity(a) for a in ordered), ACTION_FILTER_PROPERTIES
            )
            page = matched[skip : skip + (MAX_PAGE if top is None else top)]
            return _json(
                {
                    "@odata.context": f"{request.scheme}://{request.host}"
                    "/api/$metadata#MachineActions",
                    "value": page,
                }
            )

        return await self._guarded(handle)

    async def _get_action(self, request: web.Request) -> web.StreamResponse:
        async def handle() -> web.StreamResponse:
            await self._gate(request, "machineactions")
            action = self.actions.get(request.match_info["id"])
            if action is None:
                return mde_error(
                    404, "ResourceNotFound", f"Machine action {request.match_info['id']} not found"
                )
            return _json(self.action_entity(action))

        return await self._guarded(handle)

    async def _cancel_action(self, request: web.Request) -> web.StreamResponse:
        """``POST /api/machineactions/{id}/cancel`` (mde-api.md section 3)."""

        async def handle() -> web.StreamResponse:
            _, requestor = await self._gate(request, "cancel")
            action_id = request.match_info["id"]
            # Same body rules as offboard's: JSON, "Comment" required, keys case-sensitive.
            comment = self._required_text(await self._json_body(request), "Comment")
            action = self.actions.get(action_id.lower())
            if action is None:
                return mde_error(
                    404, "ResourceNotFound", f"Machine action {action_id} was not found"
                )
            status = self.action_status(action)
            if status not in ("Pending", "InProgress"):
                # UNCONFIRMED (mde-api.md section 3 says cancel "works only on actions not yet
                # final" but not how a final one is refused): 400 BadRequest, the generic code
                # of the docs' 400 row (section 6), naming the status. Nothing changes.
                return mde_error(
                    400,
                    "BadRequest",
                    f"Machine action {action.id} is in final state {status} and cannot be "
                    "cancelled.",
                )
            action.cancelled_at = self.now()
            action.cancel_comment = comment
            action.cancel_requestor = requestor
            self.truth.actions_cancelled[action.machine_id] += 1
            self._maybe_drop_after(request)
            return _json(self.action_entity(action))

        return await self._guarded(handle)

    def device_info_rows(self) -> list[dict[str, Any]]:
        """The ``DeviceInfo`` table: two snapshots per device seen in the last 30 days."""
        now = self.wall()
        rows: list[dict[str, Any]] = []
        for machine in self.machines.values():
            last_seen = datetime.fromisoformat(machine["lastSeen"])
            if now - last_seen > timedelta(days=30):
                continue  # advanced hunting keeps 30 days (mde-api.md section 5)
            view = self.machine_entity(machine)
            for age in (timedelta(days=1), timedelta(0)):
                rows.append(
                    {
                        "Timestamp": last_seen - age,
                        "DeviceId": machine["id"],
                        "DeviceName": machine["computerDnsName"],
                        "OSPlatform": machine["osPlatform"],
                        "OSVersion": machine["version"],
                        "OSBuild": machine["osBuild"],
                        "MachineGroup": machine["rbacGroupName"],
                        "OnboardingStatus": machine["onboardingStatus"],
                        "SensorHealthState": view["healthStatus"],
                        "DeviceCategory": "Endpoint",
                        "ExposureLevel": machine["exposureLevel"],
                        "IsExcluded": False,
                        "PublicIP": machine["lastExternalIpAddress"],
                        "AadDeviceId": machine["aadDeviceId"],
                        "DeviceManualTags": list(machine["machineTags"]),
                    }
                )
        return rows

    async def _hunting(self, request: web.Request) -> web.StreamResponse:
        async def handle() -> web.StreamResponse:
            await self._gate(request, "advancedqueries")
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                return mde_error(400, "InvalidRequestBody", "Request body is not valid JSON.")
            query = body.get("Query") if isinstance(body, dict) else None
            if not isinstance(query, str) or not query.strip():
                return mde_error(400, "MissingRequiredParameter", "Query is required.")
            try:
                schema, rows = kql.run_query(
                    query, {"DeviceInfo": self.device_info_rows()}, now=self.wall()
                )
            except kql.KqlError as exc:
                return mde_error(400, "BadRequest", str(exc))
            # "Queries return up to 100,000 rows" (mde-api.md section 5).
            return _json({"Schema": schema, "Results": rows[:HUNTING_MAX_ROWS]})

        return await self._guarded(handle)

    async def _managed_identity_token(self, request: web.Request) -> web.Response:
        """The local identity endpoint of App Service / Functions (api-version 2019-08-01)."""
        if request.headers.get("X-IDENTITY-HEADER") != self.config.identity_header:
            return _json(
                {"statusCode": 401, "message": "Invalid or missing X-IDENTITY-HEADER."}, 401
            )
        resource = request.query.get("resource", "")
        if resource.rstrip("/") != self.config.audience.rstrip("/"):
            return _json(
                {"statusCode": 400, "message": f"Resource {resource!r} is not valid."}, 400
            )
        wanted = request.query.get("client_id")
        identities = self.config.managed_identities
        if wanted is None:
            identity = identities[0] if identities else None
        else:
            identity = next((i for i in identities[1:] if i.client_id == wanted), None)
        if identity is None:
            return _json(
                {
                    "statusCode": 400,
                    "message": f"No managed identity found for client id {wanted!r}.",
                },
                400,
            )
        token, lifetime = self.issue_token(identity, self.config.audience)
        expires_on = int(self.wall().timestamp() + lifetime)
        return _json(
            {
                "access_token": token,
                "expires_on": str(expires_on),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": identity.client_id,
            }
        )

    async def _truth(self, request: web.Request) -> web.Response:
        """The first tenant's ground truth, or ``?tenant=<id>``'s."""
        tenant = self._tenants.get(request.query.get("tenant", self.config.tenant_id))
        if tenant is None:
            return _json({"error": "unknown tenant"}, 404)
        return _json(tenant.truth.as_json())
