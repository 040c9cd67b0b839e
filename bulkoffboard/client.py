"""The MDE HTTP calls, mapped to the error tree. No retries, no throttling, no journal here."""

from __future__ import annotations

import email.utils
import math
import ssl
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any, Literal

import aiohttp
import orjson
import structlog

from bulkoffboard.auth import TokenProvider
from bulkoffboard.errors import (
    ApiError,
    BadRequestError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ServerError,
    ThrottledError,
    TransportError,
    UnauthorizedError,
    UnsupportedError,
    UsageError,
)
from bulkoffboard.models import (
    MAX_TAG_BATCH,
    MachineAction,
    check_tag,
    describe_invalid,
    normalize_action_id,
    normalize_machine_id,
)

log = structlog.get_logger("bulkoffboard.client")

#: Retry-After is capped: a wrong header must not park a run for a day.
MAX_RETRY_AFTER_S = 3600.0
#: Used when a 429 carries no Retry-After.
DEFAULT_RETRY_AFTER_S = 10.0
_UNSUPPORTED_CODES = frozenset({"OsPlatformNotSupported", "ClientVersionNotSupported"})
#: What the tag endpoints accept as ``Action`` (mde-api.md section 5b).
TagAction = Literal["Add", "Remove"]


def parse_retry_after(value: str | None, *, now: float | None = None) -> float:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date, capped."""
    if value is None or not value.strip():
        return DEFAULT_RETRY_AFTER_S
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER_S
        seconds = moment.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds):
        return DEFAULT_RETRY_AFTER_S
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _error_fields(body: Any) -> tuple[str | None, str, str | None]:
    """``(code, message, target)`` from the documented error body, tolerating others."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        return (
            str(error.get("code")) if error.get("code") is not None else None,
            str(error.get("message") or ""),
            str(error.get("target")) if error.get("target") is not None else None,
        )
    return None, "", None


def error_for(
    status: int, body: Any, *, what: str, machine_id: str | None, retry_after: str | None
) -> ApiError:
    """Map an HTTP error status and body to the error tree (branch on ``code``, not text)."""
    code, message, target = _error_fields(body)
    text = (
        f"{what}: HTTP {status}"
        + (f" {code}" if code else "")
        + (f": {message[:300]}" if message else "")
    )
    kwargs: dict[str, Any] = {
        "status": status,
        "code": code,
        "target": target,
        "machine_id": machine_id,
    }
    if status == 429:
        return ThrottledError(text, retry_after_s=parse_retry_after(retry_after), **kwargs)
    if status >= 500 or status == 408:
        return ServerError(text, **kwargs)
    if status == 401:
        return UnauthorizedError(text, **kwargs)
    if status == 403:
        return ForbiddenError(text, **kwargs)
    if status == 404:
        return NotFoundError(text, **kwargs)
    if code == "ActiveRequestAlreadyExists":
        return ConflictError(text, **kwargs)
    if code in _UNSUPPORTED_CODES:
        return UnsupportedError(text, **kwargs)
    return BadRequestError(text, **kwargs)


def _odata_params(filter_: str | None, top: int | None, skip: int | None) -> dict[str, str]:
    params: dict[str, str] = {}
    if filter_:
        params["$filter"] = filter_
    if top is not None:
        params["$top"] = str(top)
    if skip:
        params["$skip"] = str(skip)
    return params


def _check_tag(tag: str, action: str) -> None:
    """Refuse what the tag endpoints would refuse (mde-api.md section 5b), before sending."""
    if action not in ("Add", "Remove"):
        raise ValueError(f"tag action must be 'Add' or 'Remove', not {describe_invalid(action)}")
    check_tag(tag)


class MdeClient:
    """The MDE API calls bulkoffboard makes, over one shared ``aiohttp.ClientSession``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        api_url: str,
        tokens: TokenProvider,
        *,
        ssl_context: ssl.SSLContext | bool = True,
    ) -> None:
        self._session = session
        self.api_url = api_url.rstrip("/")
        self._tokens = tokens
        self._ssl = ssl_context

    def __repr__(self) -> str:
        return f"MdeClient({self.api_url!r})"

    async def _call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        machine_id: str | None = None,
        json: Any = None,
        params: dict[str, str] | None = None,
        token: str | None = None,
    ) -> tuple[int, Any]:
        """Send one request; return (status, parsed body) for 2xx, raise ApiError otherwise."""
        bearer = token if token is not None else await self._tokens.token()
        headers = {"Authorization": f"Bearer {bearer}", "Accept": "application/json"}
        data: bytes | None = None
        if json is not None:
            data = orjson.dumps(json)
            headers["Content-Type"] = "application/json"
        url = self.api_url + path
        try:
            async with self._session.request(
                method, url, data=data, params=params, headers=headers, ssl=self._ssl
            ) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except aiohttp.ClientConnectorCertificateError as exc:
            raise UsageError(
                f"TLS verification failed for {self.api_url}: {exc.certificate_error}; "
                "set BULKOFFBOARD_CA_BUNDLE to the CA that signs it"
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = type(exc).__name__
            raise TransportError(f"{what}: {reason}", machine_id=machine_id) from None
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        if 200 <= status < 300:
            return status, body
        if status == 401:
            # Refresh now (shared by concurrent callers); the caller decides whether to retry,
            # since a retried POST must pass the throttle again.
            await self._tokens.refresh(bearer)
        raise error_for(status, body, what=what, machine_id=machine_id, retry_after=retry_after)

    async def offboard(self, machine_id: str, comment: str) -> MachineAction:
        """``POST /api/machines/{id}/offboard``; 200 and 201 both mean success."""
        normalized = normalize_machine_id(machine_id)
        if normalized is None:
            raise ValueError(f"not a machine id: {machine_id!r}")
        what = f"offboard {normalized}"
        _, body = await self._call(
            "POST",
            f"/api/machines/{normalized}/offboard",
            what=what,
            machine_id=normalized,
            json={"Comment": comment},
        )
        if not isinstance(body, dict):
            raise ServerError(f"{what}: success without a machine action body", status=200)
        return MachineAction.from_api(body)

    async def cancel_action(self, action_id: str, comment: str) -> MachineAction:
        """``POST /api/machineactions/{id}/cancel``: the cancelled action (mde-api.md section
        3). Only an action not yet final can be cancelled; a final one is refused (a
        BadRequestError, its code unconfirmed)."""
        normalized = normalize_action_id(action_id)
        if normalized is None:
            raise ValueError(f"not a machine action id: {describe_invalid(action_id)}")
        what = f"cancel machine action {normalized}"
        _, body = await self._call(
            "POST",
            f"/api/machineactions/{normalized}/cancel",
            what=what,
            json={"Comment": comment},
        )
        if not isinstance(body, dict):
            raise ServerError(f"{what}: success without a machine action body", status=200)
        return MachineAction.from_api(body)

    async def tag_machine(
        self, machine_id: str, tag: str, action: TagAction = "Add"
    ) -> dict[str, Any]:
        """``POST /api/machines/{id}/tags``: add or remove one tag; the updated Machine."""
        normalized = normalize_machine_id(machine_id)
        if normalized is None:
            raise ValueError(f"not a machine id: {describe_invalid(machine_id)}")
        _check_tag(tag, action)
        what = f"{action.lower()} tag on {normalized}"
        _, body = await self._call(
            "POST",
            f"/api/machines/{normalized}/tags",
            what=what,
            machine_id=normalized,
            json={"Value": tag, "Action": action},
        )
        if not isinstance(body, dict):
            raise ServerError(f"{what}: success without a machine body", status=200)
        return body

    async def tag_machines(
        self, machine_ids: Iterable[str], tag: str, action: TagAction = "Add"
    ) -> list[dict[str, Any]]:
        """``POST /api/machines/AddOrRemoveTagForMultipleMachines`` for at most 500 distinct
        machine ids; the machines the reply lists as updated.

        The reply's shape is unconfirmed (mde-api.md section 5b): an OData collection
        (``value``) or a bare list are both read; anything else gives an empty list, so read
        the machines back when it matters. Every id is checked before anything is sent.
        """
        normalized: dict[str, None] = {}
        for machine_id in machine_ids:
            checked = normalize_machine_id(machine_id)
            if checked is None:
                raise ValueError(f"not a machine id: {describe_invalid(machine_id)}")
            normalized[checked] = None
        if not normalized:
            raise ValueError("no machine ids to tag")
        if len(normalized) > MAX_TAG_BATCH:
            raise ValueError(
                f"{len(normalized)} machine ids in one tag call; the API takes at most "
                f"{MAX_TAG_BATCH}"
            )
        _check_tag(tag, action)
        _, body = await self._call(
            "POST",
            "/api/machines/AddOrRemoveTagForMultipleMachines",
            what=f"{action.lower()} tag on {len(normalized)} machines",
            json={"Value": tag, "Action": action, "MachineIds": list(normalized)},
        )
        values = body.get("value") if isinstance(body, dict) else body
        if not isinstance(values, list):
            return []
        return [v for v in values if isinstance(v, dict)]

    async def list_machine_actions(
        self, filter_: str | None = None, *, top: int | None = None, skip: int | None = None
    ) -> list[MachineAction]:
        """``GET /api/machineactions`` with an OData filter (newest first)."""
        _, body = await self._call(
            "GET",
            "/api/machineactions",
            what="list machine actions",
            params=_odata_params(filter_, top, skip),
        )
        values = body.get("value") if isinstance(body, dict) else None
        return [MachineAction.from_api(v) for v in values or () if isinstance(v, dict)]

    async def offboard_actions_for(self, machine_id: str) -> list[MachineAction]:
        """Every Offboard action of one machine, newest first."""
        normalized = normalize_machine_id(machine_id)
        if normalized is None:
            raise ValueError(f"not a machine id: {machine_id!r}")
        return await self.list_machine_actions(
            f"machineId eq '{normalized}' and type eq 'Offboard'"
        )

    async def get_machine_action(self, action_id: str) -> MachineAction:
        """``GET /api/machineactions/{id}``."""
        quoted = urllib.parse.quote(action_id, safe="-")
        _, body = await self._call(
            "GET", f"/api/machineactions/{quoted}", what=f"get machine action {action_id}"
        )
        if not isinstance(body, dict):
            raise ServerError("get machine action: empty body", status=200)
        return MachineAction.from_api(body)

    async def list_machines(
        self, filter_: str | None = None, *, top: int | None = None, skip: int | None = None
    ) -> list[dict[str, Any]]:
        """``GET /api/machines`` with an OData filter; one page."""
        try:
            _, body = await self._call(
                "GET",
                "/api/machines",
                what="list machines",
                params=_odata_params(filter_, top, skip),
            )
        except NotFoundError:
            return []  # "404 when there are no recent machines" (mde-api.md section 4)
        values = body.get("value") if isinstance(body, dict) else None
        return [v for v in values or () if isinstance(v, dict)]

    async def run_hunting(self, query: str) -> list[dict[str, Any]]:
        """``POST /api/advancedqueries/run``; the result rows."""
        _, body = await self._call(
            "POST",
            "/api/advancedqueries/run",
            what="advanced hunting query",
            json={"Query": query},
        )
        rows = body.get("Results") if isinstance(body, dict) else None
        return [r for r in rows or () if isinstance(r, dict)]
