"""Marks: the tags a run puts on the machines it offboards, so the portal says who and why.

``run --mark TAG`` tags every machine the plan will offboard before the first offboard call
(``--mark-run-id`` adds ``bulkoffboard-<first 8 of the run id>``, one batch's trace), and
``cancel`` takes the mark off the machines whose offboard it cancelled. Both go through
``POST /api/machines/AddOrRemoveTagForMultipleMachines`` (mde-api.md section 5b): at most 500
machine ids a call, 100 calls a minute and 1,500 an hour (their own throttle, kind ``tags``,
shared like every other budget), and the permission ``Machine.ReadWrite.All``.

Every call is journaled as a ``tag`` record: the attempt before it, the result after (see
:mod:`bulkoffboard.journal`). The replay keeps, per tag, the machines whose last successful
call added or removed it, so a resumed run tags only what is not tagged yet. Adding a tag
that is there and removing one that is not both succeed, so a call whose answer was lost is
simply sent again: the attempt is not fsynced before the call (an offboard's is).
"""

from __future__ import annotations

import collections
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from bulkoffboard.auth import granted_permissions
from bulkoffboard.client import MdeClient
from bulkoffboard.errors import (
    ApiError,
    AuthError,
    ForbiddenError,
    ThrottledError,
    UnauthorizedError,
    UsageError,
)
from bulkoffboard.journal import Journal, Replay, iso, utc_now
from bulkoffboard.models import MAX_TAG_BATCH, check_tag
from bulkoffboard.reads import ReadPolicy, read_with_retries
from bulkoffboard.throttle import Throttle

log = structlog.get_logger("bulkoffboard.marks")

#: Tagging needs this application permission (or ``Machine.ReadWrite``, delegated).
MARK_PERMISSIONS = ("Machine.ReadWrite.All", "Machine.ReadWrite")

TagAction = Literal["Add", "Remove"]


def run_tag(run_id: str) -> str:
    """The tag ``--mark-run-id`` adds: ``bulkoffboard-`` and the run id's first 8 characters."""
    return f"bulkoffboard-{run_id[:8]}"


def tags_for(mark: str | None, *, with_run_id: bool, run_id: str) -> tuple[str, ...]:
    """The tags a run puts on its machines, checked (a :class:`UsageError` names a bad one)."""
    tags: list[str] = []
    if mark is not None:
        try:
            tags.append(check_tag(mark))
        except ValueError as exc:
            raise UsageError(f"--mark: {exc}") from None
    if with_run_id:
        tags.append(run_tag(run_id))
    return tuple(dict.fromkeys(tags))


def marks_of(header: dict[str, Any]) -> tuple[str, ...]:
    """The tags a journal's run puts on its machines (its header's ``mark``)."""
    found = header.get("mark")
    if not isinstance(found, list):
        return ()
    return tuple(tag for tag in found if isinstance(tag, str) and tag)


def check_permission(token: str, *, what: str = "mark machines (--mark)") -> None:
    """Refuse (an :class:`AuthError`, exit 3) when the token does not carry the tagging
    permission: before anything is sent."""
    if not set(granted_permissions(token)).intersection(MARK_PERMISSIONS):
        raise AuthError(
            f"cannot {what}: the app lacks the Machine.ReadWrite.All application permission "
            "(grant it with admin consent, or run without --mark)"
        )


def can_mark(token: str) -> bool:
    """True when the token carries the tagging permission."""
    return bool(set(granted_permissions(token)).intersection(MARK_PERMISSIONS))


@dataclass(slots=True)
class MarkSummary:
    """What tagging did: machines per tag and outcome, calls made, 429s."""

    #: (tag, "tagged" or "failed") -> machines.
    machines: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    calls: int = 0
    throttled: int = 0

    @property
    def failed(self) -> int:
        """Machines a tag call failed for."""
        return sum(n for (_, outcome), n in self.machines.items() if outcome == "failed")

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary: ``{tag: {"tagged": n, "failed": n}}``, calls and 429s."""
        per_tag: dict[str, dict[str, int]] = {}
        for (tag, outcome), number in sorted(self.machines.items()):
            per_tag.setdefault(tag, {})[outcome] = number
        return {"tags": per_tag, "calls": self.calls, "throttled_429": self.throttled}


def _batches(machine_ids: Iterable[str], size: int = MAX_TAG_BATCH) -> Iterator[list[str]]:
    batch: list[str] = []
    for machine_id in machine_ids:
        batch.append(machine_id)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Marker:
    """Adds or removes a tag on many machines, 500 a call, under the ``tags`` throttle,
    journaling each call; skips the machines the journal says are in that state already."""

    def __init__(
        self,
        client: MdeClient,
        journal: Journal,
        replay: Replay,
        throttle: Throttle,
        *,
        policy: ReadPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._journal = journal
        self._replay = replay
        self._throttle = throttle
        self._policy = policy or ReadPolicy()
        self._rng = rng or random.Random()
        self.summary = MarkSummary()

    def __repr__(self) -> str:
        return f"Marker(calls={self.summary.calls}, throttled={self.summary.throttled})"

    async def apply(self, action: TagAction, tag: str, machine_ids: Iterable[str]) -> int:
        """Add or remove ``tag`` on ``machine_ids`` (distinct, valid ids) that the journal does
        not already show in that state; returns the machines tagged now. A forbidden call
        raises :class:`AuthError` (exit 3): the permission is missing."""
        wanted = (m for m in machine_ids if self._needs(action, tag, m))
        done = 0
        for batch in _batches(wanted):
            done += await self._call(action, tag, batch)
        return done

    def _needs(self, action: TagAction, tag: str, machine_id: str) -> bool:
        marked = self._replay.is_marked(tag, machine_id)
        return not marked if action == "Add" else marked

    async def _call(self, action: TagAction, tag: str, batch: list[str]) -> int:
        base = {"type": "tag", "action": action, "value": tag, "machine_ids": batch}

        async def send() -> list[dict[str, Any]]:
            self.summary.calls += 1
            self._append(base | {"stage": "attempt", "at": iso(utc_now())})
            try:
                return await self._client.tag_machines(batch, tag, action)
            except ThrottledError:
                self.summary.throttled += 1
                raise

        outcome, error = "tagged", None
        try:
            await read_with_retries(
                self._throttle, send, what=f"{action} tag", policy=self._policy, rng=self._rng
            )
        except UnauthorizedError:
            raise AuthError("the API keeps rejecting fresh tokens") from None
        except ForbiddenError as exc:
            self._append(self._result(base, "failed", exc))
            raise AuthError(
                f"tagging is forbidden: the app needs the Machine.ReadWrite.All application "
                f"permission with admin consent ({exc})"
            ) from None
        except ApiError as exc:
            outcome, error = "failed", exc
            log.warning("mark.failed", tag=tag, action=action, machines=len(batch), error=str(exc))
        self._append(self._result(base, outcome, error))
        self.summary.machines[tag, outcome] += len(batch)
        return len(batch) if outcome == "tagged" else 0

    @staticmethod
    def _result(base: dict[str, Any], outcome: str, error: ApiError | None) -> dict[str, Any]:
        return base | {
            "stage": "result",
            "outcome": outcome,
            "http_status": error.status if error else None,
            "error_code": error.code if error else None,
            "message": str(error) if error else None,
            "at": iso(utc_now()),
        }

    def _append(self, record: dict[str, Any]) -> None:
        offset = self._journal.append(record, sync=record["stage"] == "result")
        self._replay.apply(record, offset)


__all__ = [
    "MARK_PERMISSIONS",
    "MarkSummary",
    "Marker",
    "can_mark",
    "check_permission",
    "marks_of",
    "run_tag",
    "tags_for",
]
