"""Targeting and safety: which machines a run touches, decided before anything is sent.

Sources beyond id files (an OData query on ``GET /api/machines``, host names, an advanced
hunting query) are resolved once, to a file of ids kept beside the journal, so ``resume`` never
re-runs them. Then a plan pass over the ids applies exclusion rules and a preflight (skip what
cannot or need not be offboarded) using one paged inventory read, and journals those decisions
before the first offboard call. The plan pass also counts what would be offboarded, for the dry
run and for the ``--max-machines`` breaker.
"""

from __future__ import annotations

import collections
import csv
import fnmatch
import io
import os
import tempfile
from collections.abc import Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from bulkoffboard.client import MdeClient
from bulkoffboard.errors import ForbiddenError, RetryableError, SourceError, UsageError
from bulkoffboard.journal import iso, utc_now
from bulkoffboard.models import MachineAction, Outcome, normalize_machine_id
from bulkoffboard.reads import ReadPolicy, read_with_retries
from bulkoffboard.sources import Deduplicator, SourceRecord, iter_records
from bulkoffboard.throttle import Throttle

log = structlog.get_logger("bulkoffboard.targeting")

#: ``$top`` may not exceed 10,000 (mde-api.md section 4).
PAGE_SIZE = 10_000
#: Paging is capped: the published nextLink paging is unreliable (microsoft-365-docs #8316).
MAX_PAGES = 500
#: Advanced hunting returns at most 100,000 rows (mde-api.md section 5).
HUNTING_MAX_ROWS = 100_000
#: Platforms the offboard API accepts (mde-api.md section 2): Windows only.
_SUPPORTED_PREFIX = "windows"
_NAME_HEADERS = ("name", "computerdnsname", "devicename", "hostname", "computer name", "host")


def odata_string(value: str) -> str:
    """A single-quoted OData string literal (quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


def build_filter(
    *,
    query: str | None = None,
    inactive_days: float | None = None,
    health: Iterable[str] = (),
    os_platforms: Iterable[str] = (),
    tags: Iterable[str] = (),
    group_ids: Iterable[int] = (),
    now: datetime | None = None,
) -> str | None:
    """An OData ``$filter`` combining the presets with each other and with ``query``."""
    now = now or datetime.now(UTC)
    parts: list[str] = []
    if query and query.strip():
        parts.append(f"({query.strip()})")
    if inactive_days is not None:
        cutoff = (now - timedelta(days=inactive_days)).strftime("%Y-%m-%dT%H:%M:%SZ")
        parts.append(f"lastSeen lt {cutoff}")

    def any_of(expressions: list[str]) -> None:
        if len(expressions) == 1:
            parts.append(expressions[0])
        elif expressions:
            parts.append("(" + " or ".join(expressions) + ")")

    any_of([f"healthStatus eq {odata_string(h)}" for h in health])
    any_of([f"osPlatform eq {odata_string(o)}" for o in os_platforms])
    for tag in tags:
        parts.append(f"machineTags/any(tag: tag eq {odata_string(tag)})")
    any_of([f"rbacGroupId eq {g}" for g in group_ids])
    return " and ".join(parts) if parts else None


@dataclass(frozen=True, slots=True)
class Rules:
    """Exclusion rules and the preflight switch. Recorded in the journal header."""

    tags: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    ids: frozenset[str] = frozenset()
    names: tuple[str, ...] = ()
    preflight: bool = True

    @property
    def needs_metadata(self) -> bool:
        """Tag, group and name rules can only be applied with device metadata at hand."""
        return bool(self.tags or self.groups or self.names)

    def as_json(self) -> dict[str, Any]:
        """For the journal header."""
        return {
            "tags": list(self.tags),
            "groups": list(self.groups),
            "ids": sorted(self.ids),
            "names": list(self.names),
            "preflight": self.preflight,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> Rules:
        """Back from the journal header."""
        data = data or {}
        return cls(
            tags=tuple(data.get("tags") or ()),
            groups=tuple(data.get("groups") or ()),
            ids=frozenset(data.get("ids") or ()),
            names=tuple(data.get("names") or ()),
            preflight=bool(data.get("preflight", True)),
        )

    def match(self, machine_id: str, meta: Mapping[str, Any] | None) -> str | None:
        """The rule that excludes this machine, or None."""
        if machine_id in self.ids:
            return f"id {machine_id}"
        if meta is None:
            return None
        machine_tags = {str(t).lower() for t in meta.get("machineTags") or ()}
        for tag in self.tags:
            if tag.lower() in machine_tags:
                return f"tag {tag}"
        group_keys = {str(meta.get("rbacGroupName") or "").lower(), str(meta.get("rbacGroupId"))}
        for group in self.groups:
            if group.lower() in group_keys:
                return f"group {group}"
        name = str(meta.get("computerDnsName") or "").lower()
        short = name.split(".", 1)[0]
        for pattern in self.names:
            if fnmatch.fnmatchcase(name, pattern.lower()) or fnmatch.fnmatchcase(
                short, pattern.lower()
            ):
                return f"name {pattern}"
        return None


@dataclass(frozen=True, slots=True)
class Request:
    """What the user asked to target. Exactly one kind."""

    kind: str  # "file", "stdin", "query", "names", "hunting"
    path: Path | None = None  # ids (file, stdin) or names file
    fmt: str = "auto"
    odata: str | None = None
    group_names: tuple[str, ...] = ()  # --group given by name: filtered after the read
    hunting: str | None = None
    describe: Mapping[str, Any] = field(default_factory=dict)


# -- reads -----------------------------------------------------------------------------------------


#: The machine fields targeting and the plan read (exclusion rules, preflight, name resolution,
#: dry-run rows). Only these are kept from an inventory read: a full entity is about 2.7 KB,
#: which for a 100,000-device tenant is hundreds of megabytes held through the plan pass.
INVENTORY_FIELDS = (
    "id",
    "computerDnsName",
    "osPlatform",
    "machineTags",
    "rbacGroupName",
    "rbacGroupId",
    "lastSeen",
    "healthStatus",
)


async def read_machines(
    client: MdeClient,
    throttle: Throttle,
    filter_: str | None,
    *,
    max_pages: int = MAX_PAGES,
    policy: ReadPolicy | None = None,
) -> list[dict[str, Any]]:
    """Every machine matching ``filter_``, paged with ``$top``/``$skip``, de-duplicated by id,
    each with only its :data:`INVENTORY_FIELDS`.

    Stops on a short page; a page that brings nothing new also stops (a server that ignores
    ``$skip`` would otherwise loop); the loop is capped.
    """
    seen: dict[str, dict[str, Any]] = {}
    for page_number in range(max_pages):
        skip = page_number * PAGE_SIZE
        page = await read_with_retries(
            throttle,
            lambda skip=skip: client.list_machines(filter_, top=PAGE_SIZE, skip=skip),  # type: ignore[misc]
            what="list machines",
            policy=policy,
        )
        fresh = 0
        for machine in page:
            machine_id = normalize_machine_id(str(machine.get("id", "")))
            if machine_id is not None and machine_id not in seen:
                seen[machine_id] = {k: machine[k] for k in INVENTORY_FIELDS if k in machine}
                fresh += 1
        if len(page) < PAGE_SIZE or fresh == 0:
            return list(seen.values())
    raise UsageError(
        f"the machine query did not end after {max_pages} pages of {PAGE_SIZE}: narrow it"
    )


async def read_open_offboards(
    client: MdeClient, throttle: Throttle, policy: ReadPolicy | None = None
) -> tuple[dict[str, MachineAction], dict[str, MachineAction]]:
    """Offboard actions still open (Pending/InProgress) and Succeeded ones, newest per machine.

    One status per query (``or`` on this endpoint is not confirmed in the docs), paged.
    """
    open_: dict[str, MachineAction] = {}
    done: dict[str, MachineAction] = {}
    for status, into in (("Pending", open_), ("InProgress", open_), ("Succeeded", done)):
        filter_ = f"type eq 'Offboard' and status eq '{status}'"
        for page_number in range(MAX_PAGES):
            skip = page_number * PAGE_SIZE
            page = await read_with_retries(
                throttle,
                lambda f=filter_, s=skip: client.list_machine_actions(f, top=PAGE_SIZE, skip=s),  # type: ignore[misc]
                what="list machine actions",
                policy=policy,
            )
            for action in page:
                if action.machine_id and action.machine_id.lower() not in into:
                    into[action.machine_id.lower()] = action  # newest first: keep the first
            if len(page) < PAGE_SIZE:
                break
    return open_, done


async def run_hunting(
    client: MdeClient, throttle: Throttle, query: str, policy: ReadPolicy | None = None
) -> list[str]:
    """The ``DeviceId`` column of an advanced hunting query, in order (validated later)."""
    rows = await read_with_retries(
        throttle, lambda: client.run_hunting(query), what="advanced hunting", policy=policy
    )
    if rows and not any("DeviceId" in row for row in rows[:1]):
        raise UsageError("the hunting query returns no DeviceId column: add '| project DeviceId'")
    if len(rows) >= HUNTING_MAX_ROWS:
        log.warning(
            "hunting.truncated",
            rows=len(rows),
            hint="advanced hunting returns at most 100,000 rows: narrow the query",
        )
    return [str(row.get("DeviceId", "")) for row in rows]


# -- names -----------------------------------------------------------------------------------------


def read_names(path: Path) -> list[tuple[str, str]]:
    """Host names from a text file (one a line, ``#`` comments) or a CSV with a name column.

    Returns ``(where, name)`` pairs.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise SourceError(f"{path}:{line}: not valid UTF-8") from None
    except OSError as exc:
        raise SourceError(f"{path}: {exc.strerror}") from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip() and not line.startswith("#")), "")
    cells = [c.strip().lower() for c in first.split(",")]
    if "," in first and any(cell in _NAME_HEADERS for cell in cells):
        reader = csv.reader(io.StringIO(text))
        header = [c.strip().lower() for c in next(reader)]
        column = next((header.index(h) for h in _NAME_HEADERS if h in header), None)
        if column is None:
            raise SourceError(f"{path}:1: no name column (found {', '.join(header)})")
        return [
            (f"{path}:{number}", row[column].strip())
            for number, row in enumerate(reader, start=2)
            if len(row) > column and row[column].strip()
        ]
    out: list[tuple[str, str]] = []
    for line_number, text_line in enumerate(lines, start=1):
        name = text_line.split("#", 1)[0].strip()
        if name:
            out.append((f"{path}:{line_number}", name))
    return out


def resolve_names(
    names: list[tuple[str, str]], inventory: Iterable[Mapping[str, Any]]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Names -> ids (computerDnsName, case-insensitive, short name or FQDN).

    Returns the ids in the names' order and the unresolved names: those matching no device or
    several devices are reported, never guessed.
    """
    by_fqdn: dict[str, list[str]] = collections.defaultdict(list)
    by_short: dict[str, list[str]] = collections.defaultdict(list)
    for machine in inventory:
        machine_id = normalize_machine_id(str(machine.get("id", "")))
        name = str(machine.get("computerDnsName") or "").lower().rstrip(".")
        if machine_id is None or not name:
            continue
        by_fqdn[name].append(machine_id)
        by_short[name.split(".", 1)[0]].append(machine_id)
    ids: list[str] = []
    unresolved: list[dict[str, Any]] = []
    for where, raw in names:
        name = raw.lower().rstrip(".")
        matches = by_fqdn.get(name, []) if "." in name else by_short.get(name, [])
        matches = list(dict.fromkeys(matches))
        if len(matches) == 1:
            ids.append(matches[0])
        else:
            reason = (
                f"no device is named {raw!r}"
                if not matches
                else f"{len(matches)} devices are named {raw!r}: {', '.join(matches)}"
            )
            unresolved.append({"where": where, "input": raw, "message": reason})
    return ids, unresolved


# -- the plan --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Prepared:
    """What the plan pass found, before anything is sent."""

    #: Result records to journal before the first offboard call.
    decisions: list[dict[str, Any]] = field(default_factory=list)
    to_offboard: int = 0
    invalid: int = 0
    duplicates: int = 0
    #: outcome -> number, for the decisions.
    skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Rows for a dry run's full listing: machine_id, action, outcome, reason, name, os.
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """The plan's counts."""
        return {
            "would_offboard": self.to_offboard,
            "skipped": dict(sorted(self.skipped.items())),
            "invalid_id": self.invalid,
            "duplicates": self.duplicates,
            "notes": list(self.notes),
        }


def write_ids(path: Path, ids: Iterable[str]) -> int:
    """Write resolved ids atomically (temp file, fsync, rename); returns how many."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for machine_id in ids:
                out.write(machine_id + "\n")
                count += 1
            out.flush()
            os.fsync(out.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def _decision(
    machine_id: str | None,
    outcome: Outcome,
    message: str,
    *,
    rule: str | None = None,
    action: MachineAction | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "type": "result",
        "machine_id": machine_id,
        "outcome": outcome.value,
        "action_id": action.id if action else None,
        "action_status": action.status if action else None,
        "http_status": None,
        "error_code": None,
        "message": message,
        "attempts": 0,
        "at": iso(utc_now()),
        "stage": "plan",
    }
    if rule:
        record["rule"] = rule
    if extra:
        record.update(extra)
    return record


def plan_pass(
    records: Iterator[SourceRecord],
    *,
    rules: Rules,
    inventory: Mapping[str, Mapping[str, Any]] | None,
    open_actions: Mapping[str, MachineAction],
    done_actions: Mapping[str, MachineAction],
    settled: Container[str] = (),
    keep_rows: bool = False,
) -> Prepared:
    """Decide, for every id of the source, offboard or skip (and why). Pure."""
    prepared = Prepared()
    seen = Deduplicator()
    for record in records:
        if record.machine_id is None:
            prepared.invalid += 1
            if keep_rows:
                prepared.rows.append(
                    {
                        "machine_id": "",
                        "action": "skip",
                        "outcome": "invalid_id",
                        "reason": f"{record.where}: {record.reason}",
                        "name": "",
                        "os": "",
                    }
                )
            continue
        machine_id = record.machine_id
        if machine_id in settled:
            continue  # decided before (a plan made again): not even counted as a duplicate
        if not seen.add(machine_id):
            prepared.duplicates += 1
            continue
        meta = inventory.get(machine_id) if inventory is not None else None
        decision = _decide(machine_id, meta, rules, open_actions, done_actions)
        if decision is None:
            prepared.to_offboard += 1
        else:
            prepared.decisions.append(decision)
            prepared.skipped[decision["outcome"]] += 1
        if keep_rows:
            prepared.rows.append(
                {
                    "machine_id": machine_id,
                    "action": "offboard" if decision is None else "skip",
                    "outcome": "" if decision is None else decision["outcome"],
                    "reason": "" if decision is None else decision["message"],
                    "name": (meta or {}).get("computerDnsName") or "",
                    "os": (meta or {}).get("osPlatform") or "",
                }
            )
    return prepared


def _decide(
    machine_id: str,
    meta: Mapping[str, Any] | None,
    rules: Rules,
    open_actions: Mapping[str, MachineAction],
    done_actions: Mapping[str, MachineAction],
) -> dict[str, Any] | None:
    rule = rules.match(machine_id, meta)
    if rule is not None:
        return _decision(machine_id, Outcome.EXCLUDED, f"excluded by {rule}", rule=rule)
    if not rules.preflight:
        return None
    if meta is not None:
        platform = str(meta.get("osPlatform") or "")
        if platform and not platform.lower().startswith(_SUPPORTED_PREFIX):
            return _decision(
                machine_id,
                Outcome.UNSUPPORTED,
                f"preflight: {platform} cannot be offboarded through the API",
                rule="preflight os",
            )
    pending = open_actions.get(machine_id)
    if pending is not None:
        return _decision(
            machine_id,
            Outcome.ALREADY_PENDING,
            "preflight: an offboard action is already open",
            action=pending,
        )
    succeeded = done_actions.get(machine_id)
    if succeeded is not None and meta is not None:
        last_seen = str(meta.get("lastSeen") or "")
        if last_seen and succeeded.creation_time and last_seen < succeeded.creation_time:
            # Offboarded and not seen since: nothing to do. (Seen since means re-onboarded.)
            return _decision(
                machine_id,
                Outcome.EXCLUDED,
                "preflight: already offboarded and not seen since",
                rule="preflight already offboarded",
                action=succeeded,
            )
    return None


async def inventory_for(
    client: MdeClient, reads: Throttle, rules: Rules, policy: ReadPolicy | None = None
) -> tuple[dict[str, dict[str, Any]] | None, dict[str, MachineAction], dict[str, MachineAction]]:
    """One paged inventory read and the open/succeeded offboard actions, when rules need them.

    Without read permission the preflight is skipped with a warning, but rules that need device
    metadata (tags, groups, names) make it an error: exclusions are never silently dropped.
    """
    if not rules.preflight and not rules.needs_metadata:
        return None, {}, {}
    try:
        machines = await read_machines(client, reads, None, policy=policy)
        open_, done = (
            await read_open_offboards(client, reads, policy) if rules.preflight else ({}, {})
        )
    except (ForbiddenError, RetryableError) as exc:
        why = (
            "forbidden: grant Machine.Read.All"
            if isinstance(exc, ForbiddenError)
            else f"failing ({exc})"
        )
        if rules.needs_metadata:
            raise UsageError(
                "exclusion rules by tag, group or name need the device inventory, but reading "
                f"it is {why}; nothing was sent"
            ) from None
        log.warning(
            "preflight.skipped",
            reason=f"reading the inventory is {why}",
            hint="the API itself still refuses unsupported and pending devices",
        )
        return None, {}, {}
    return {m["id"].lower(): m for m in machines if isinstance(m.get("id"), str)}, open_, done


def records_for(path: Path, fmt: str) -> Iterator[SourceRecord]:
    """The source's records (a thin alias, so callers need not import sources)."""
    return iter_records(path, fmt)
