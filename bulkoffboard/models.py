"""Values shared across the package: machine ids, outcomes, machine actions."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

#: A machine id is 40 hex digits (mde-api.md section 7). Checked before it goes near a URL.
_MACHINE_ID = re.compile(r"[0-9a-fA-F]{40}")


def normalize_machine_id(value: str) -> str | None:
    """Return ``value`` as a lower-case 40-hex machine id, or None when it is not one.

    Surrounding white space is tolerated; anything else (quotes, slashes, query strings, NUL
    bytes, non-ASCII digits) makes the value invalid.
    """
    candidate = value.strip()
    if _MACHINE_ID.fullmatch(candidate) is None:
        return None
    return candidate.lower()


#: A machine action id is a GUID (mde-api.md section 3). Checked before it goes into a URL.
_ACTION_ID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)

#: At most this many machine ids in one bulk tag call (mde-api.md section 5b).
MAX_TAG_BATCH = 500


def normalize_action_id(value: str) -> str | None:
    """Return ``value`` as a lower-case GUID machine action id, or None when it is not one.

    Surrounding white space is tolerated; braces, URNs and anything else are refused.
    """
    candidate = value.strip()
    if _ACTION_ID.fullmatch(candidate) is None:
        return None
    return candidate.lower()


#: Longest tag bulkoffboard sends. The API documents no maximum (mde-api.md section 5b: keep to
#: printable characters and at most 200 of them).
MAX_TAG_LENGTH = 200


def check_tag(value: str) -> str:
    """``value`` as a tag to send, or ValueError saying what is wrong with it: not empty, no
    white space around it, at most :data:`MAX_TAG_LENGTH` printable characters."""
    if not value or not value.strip():
        raise ValueError("a tag must not be empty")
    if value != value.strip():
        raise ValueError(f"tag {describe_invalid(value)} has white space around it")
    if len(value) > MAX_TAG_LENGTH:
        raise ValueError(
            f"tag {describe_invalid(value)} is {len(value)} characters long; at most "
            f"{MAX_TAG_LENGTH} are sent"
        )
    if not value.isprintable():
        raise ValueError(f"tag {describe_invalid(value)} holds a character that is not printable")
    return value


def describe_invalid(value: str, limit: int = 60) -> str:
    """A short, printable rendering of a rejected value for one-line error messages."""
    shown = value if len(value) <= limit else value[:limit] + "..."
    return repr(shown)


class Outcome(enum.StrEnum):
    """How one machine ended. Names are a contract: reports and pipelines read them."""

    OFFBOARDED = "offboarded"
    ALREADY_PENDING = "already_pending"
    NOT_FOUND = "not_found"
    UNSUPPORTED = "unsupported"
    FORBIDDEN = "forbidden"
    INVALID_ID = "invalid_id"
    EXCLUDED = "excluded"
    #: A host name that matched no device, or several (``--names``): reported, never guessed.
    UNRESOLVED = "unresolved"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        """Final outcomes are never retried; ``failed`` is retried by ``resume``."""
        return self is not Outcome.FAILED


#: Machine action states after which nothing changes (mde-api.md section 3).
FINAL_ACTION_STATUSES = frozenset({"Succeeded", "Failed", "TimeOut", "Cancelled"})


def _lowered(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with lower-case keys, for case-insensitive lookups (:func:`_field`)."""
    return {k.lower() if isinstance(k, str) else k: v for k, v in data.items()}


def _field(lowered: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` present in ``lowered`` (a :func:`_lowered` dict)."""
    for name in names:
        if name.lower() in lowered:
            return lowered[name.lower()]
    return None


@dataclass(frozen=True, slots=True)
class MachineAction:
    """The parts of an MDE MachineAction that bulkoffboard records.

    Parsed leniently (mde-api.md section 3): names are matched case-insensitively, both
    timestamp spellings are accepted, unknown enum values are kept as they came.
    """

    id: str
    type: str
    status: str
    machine_id: str | None
    requestor_comment: str | None
    creation_time: str | None
    last_update_time: str | None
    #: Set once the action was cancelled: the comment the cancel sent (None otherwise).
    cancellation_comment: str | None = None

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> MachineAction:
        """Build from an API body; raises ValueError when ``id`` is missing."""
        data = _lowered(data)  # once, not once a field: this runs for every call's answer
        action_id = _field(data, "id")
        if not isinstance(action_id, str) or not action_id:
            raise ValueError("machine action without an id")
        return cls(
            id=action_id,
            type=str(_field(data, "type") or ""),
            status=str(_field(data, "status") or ""),
            machine_id=_field(data, "machineId"),
            requestor_comment=_field(data, "requestorComment"),
            creation_time=_field(data, "creationDateTimeUtc"),
            last_update_time=_field(data, "lastUpdateDateTimeUtc", "lastUpdateTimeUtc"),
            cancellation_comment=_field(data, "cancellationComment"),
        )

    @property
    def is_final(self) -> bool:
        """True once the action can no longer change."""
        return self.status in FINAL_ACTION_STATUSES

    @property
    def is_offboard(self) -> bool:
        """True for offboard actions (the 2017 docs spelled the type ``OffboardMachine``)."""
        return self.type in ("Offboard", "OffboardMachine")
