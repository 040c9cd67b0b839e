"""Reports: pure functions of a journal replay (table, CSV, JSON, Markdown, HTML). Nothing
here prints.

Markdown and HTML add the action statuses (the latest ``status`` record of each machine, from
``verify``, else the status its result recorded), a timeline of offboard calls per minute
against the limits, and the machines that need attention. Every journaled value is escaped:
machine ids, messages and rejected ``input`` values come from files nobody vetted. The HTML
page is self-contained (inline CSS and SVG; no script, nothing fetched) and well-formed XML.

The replay keeps only the latest 10,000 send times, so the full timeline comes from its own
streaming pass over the journal file (:func:`timeline_from_file`, used by :func:`render_file`).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import html
import io
import math
import os
import re
import tempfile
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson

from bulkoffboard import __version__
from bulkoffboard.journal import (
    ActionSeen,
    CancelSeen,
    Replay,
    iso,
    parse_iso,
    replay_file,
    utc_now,
)
from bulkoffboard.models import Outcome
from bulkoffboard.throttle import DEFAULT_LIMITS, Limit

CSV_COLUMNS = (
    "machine_id",
    "outcome",
    "action_id",
    "action_status",
    "error_code",
    "attempts",
    "updated_at",
    "http_status",
    "message",
    "where",
    "input",
    "action_status_at",
)


def counts(replay: Replay) -> dict[str, int]:
    """Outcome -> number of machines (the last result of each machine counts)."""
    tally = replay.outcome_counts()
    return {o.value: tally.get(o.value, 0) for o in Outcome if tally.get(o.value)} | {
        k: v for k, v in tally.items() if k not in {o.value for o in Outcome}
    }


def identity(replay: Replay) -> dict[str, Any]:
    """The run's identity from the header."""
    header = replay.header
    return {
        "run_id": header.get("run_id"),
        "created_at": header.get("created_at"),
        "source": header.get("source"),
        "comment": header.get("comment"),
        "tool_version": header.get("tool_version"),
        "api_url": header.get("api_url"),
        "tenant_id": header.get("tenant_id"),
    }


def summary(replay: Replay) -> dict[str, Any]:
    """The JSON report: ``counts``, ``total``, ``in_doubt`` and the run's identity."""
    tally = counts(replay)
    cancels = cancel_counts(replay)
    return {
        "run": identity(replay),
        "counts": tally,
        "total": sum(tally.values()),
        "in_doubt": len(replay.in_doubt()),
        "sessions": replay.sessions,
        "cancelled": cancels.get("cancelled", 0),
        "cancels": cancels,
    }


def cancel_counts(replay: Replay) -> dict[str, int]:
    """``bulkoffboard cancel``: machines by the outcome of their last cancel (``cancelled``,
    ``too_late``, ``failed``; ``in_doubt``: sent, no result recorded)."""
    return dict(sorted(replay.cancel_counts().items()))


def render_json(replay: Replay) -> str:
    """One JSON object: :func:`summary` plus ``action_statuses``, ``attention`` (a count) and
    ``attention_machines`` (the first 2,000 of them, each from the shared view of
    :func:`rows`; ``attention_machines_truncated`` says when there are more: ``jsonl`` has
    every machine)."""
    statuses, needs = follow_up(replay)
    document = summary(replay) | {
        "action_statuses": statuses,
        "attention": len(needs),
        "attention_machines": needs[:_JSON_ATTENTION_ROWS],
        "attention_machines_truncated": len(needs) > _JSON_ATTENTION_ROWS,
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n"


def render_jsonl(replay: Replay) -> str:
    """One JSON object a machine (JSON Lines), with the same fields and values as the CSV."""
    return "".join(orjson.dumps(row).decode() + "\n" for row in rows(replay))


def write_jsonl(out: TextIO, records: Iterable[dict[str, Any]]) -> None:
    """One JSON line a record (streamed)."""
    for record in records:
        out.write(orjson.dumps(record).decode() + "\n")


def rows(replay: Replay, outcomes: Container[str] | None = None) -> Iterator[dict[str, Any]]:
    """The one view of each machine that every renderer shares: one row a machine with
    :data:`CSV_COLUMNS`, rejected values first, then machines in journal order, then those in
    doubt (sent, no result recorded); only the rows with one of ``outcomes`` when given.

    ``action_id``, ``action_status`` and ``action_status_at`` are the latest known state of the
    machine's offboard action: the newest ``status`` record (what ``verify`` saw) when it
    names the action of the result, else what the result recorded, and when it was seen.
    """
    for result in replay.results(outcomes, settled=True):
        seen = (
            replay.latest_action(str(result["machine_id"]), result)
            if result.get("outcome") in FOLLOWED_OUTCOMES and result.get("machine_id")
            else None
        )
        yield _row(result, seen)
    for machine_id in replay.in_doubt() if outcomes is None or "in_doubt" in outcomes else ():
        state = replay.machines[machine_id]
        yield {
            "machine_id": machine_id,
            "outcome": "in_doubt",
            "action_id": "",
            "action_status": "",
            "error_code": "",
            "attempts": state.attempts,
            "updated_at": "",
            "http_status": "",
            "message": "sent, no result recorded: 'bulkoffboard resume' checks it",
            "where": "",
            "input": "",
            "action_status_at": "",
        }


def _row(result: dict[str, Any], seen: ActionSeen | None) -> dict[str, Any]:
    """A machine's row from its last result and the latest known state of its action."""
    action_id: Any = result.get("action_id")
    action_status: Any = result.get("action_status")
    status_at: Any = result.get("at") if action_status else ""
    if seen is not None:
        action_id, action_status, status_at = (
            seen.action_id or action_id,
            seen.action_status,
            seen.at,
        )
    return {
        "machine_id": result.get("machine_id") or "",
        "outcome": result.get("outcome"),
        "action_id": action_id or "",
        "action_status": action_status or "",
        "error_code": result.get("error_code") or "",
        "attempts": result.get("attempts", 0),
        "updated_at": result.get("at") or "",
        "http_status": result.get("http_status") or "",
        "message": result.get("message") or "",
        "where": result.get("where") or "",
        "input": result.get("input") or "",
        "action_status_at": status_at or "",
    }


def render_csv(replay: Replay) -> str:
    """CSV with a header row; one row a machine."""
    out = io.StringIO()
    write_csv(out, CSV_COLUMNS, rows(replay))
    return out.getvalue()


def write_csv(out: TextIO, columns: Sequence[str], records: Iterable[dict[str, Any]]) -> None:
    """A header row, then one row a record, safe to open in a spreadsheet.

    Lines end in ``\n``. The csv module quotes a cell holding ``\n`` but not one holding a lone
    ``\r``, which readers take as a line break: such a row is written fully quoted.
    """
    plain = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    quoted = csv.DictWriter(out, fieldnames=columns, lineterminator="\n", quoting=csv.QUOTE_ALL)
    plain.writeheader()
    for record in records:
        row = csv_safe(record)
        carriage = any(isinstance(value, str) and "\r" in value for value in row.values())
        (quoted if carriage else plain).writerow(row)


#: First characters that make a spreadsheet read a cell as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with every text cell that a spreadsheet would run as a formula prefixed by ``'``.

    Input values and device names come from files and tenants we do not control; a cell like
    ``=HYPERLINK(...)`` must reach the operator's spreadsheet as text.
    """
    return {
        key: "'" + value if isinstance(value, str) and value.startswith(_FORMULA_START) else value
        for key, value in row.items()
    }


def render_table(replay: Replay) -> str:
    """A short human summary: identity, counts, and the machines that need attention."""
    info = summary(replay)
    run = info["run"]
    source = run.get("source") or {}
    lines = [
        f"run {run.get('run_id')}  started {run.get('created_at')}",
        f"source {source.get('kind')} {source.get('path') or ''}".rstrip(),
        "",
        f"{'outcome':<18}{'machines':>10}",
    ]
    for outcome, number in info["counts"].items():
        lines.append(f"{outcome:<18}{number:>10}")
    if info["in_doubt"]:
        lines.append(f"{'in doubt':<18}{info['in_doubt']:>10}")
    lines.append(f"{'total':<18}{info['total']:>10}")
    if info["cancels"]:
        lines += ["", f"{'cancel':<18}{'machines':>10}"]
        lines += [f"{outcome:<18}{number:>10}" for outcome, number in info["cancels"].items()]
    statuses, attention = follow_up(replay)
    if statuses:
        lines += ["", f"{'action status':<18}{'machines':>10}"]
        lines += [f"{status:<18}{number:>10}" for status, number in statuses.items()]
    if attention:
        lines += ["", "needs attention:"]
        for row in attention[:20]:
            lines.append(
                f"  {row['machine_id'] or row['where']}  {row['outcome']}  {row['message']}"
            )
        if len(attention) > 20:
            lines.append(f"  ... and {len(attention) - 20} more (see --format csv)")
    return "\n".join(lines) + "\n"


#: Format name -> renderer (``report --format``); Markdown and HTML are added below.
RENDERERS: dict[str, Callable[[Replay], str]] = {
    "table": render_table,
    "csv": render_csv,
    "json": render_json,
    "jsonl": render_jsonl,
}


# -- action statuses and attention -------------------------------------------------------------

#: Outcomes whose machine has an offboard action to follow (``verify`` records its status).
FOLLOWED_OUTCOMES = ("offboarded", "already_pending")
#: Outcomes that need a person (in doubt: sent, no result recorded).
ATTENTION_OUTCOMES = ("failed", "forbidden", "in_doubt")
#: Final action statuses that mean the device was not offboarded (mde-api.md section 3).
ATTENTION_STATUSES = ("Failed", "TimeOut", "Cancelled")
_STATUS_ORDER = ("Pending", "InProgress", "Succeeded", "Failed", "TimeOut", "Cancelled")


def action_statuses(replay: Replay) -> dict[str, int]:
    """Action status -> machines, over the ``offboarded`` and ``already_pending`` machines:
    the latest ``status`` record of each (what ``verify`` saw), else the status its result
    recorded, else ``unknown``. Lifecycle order first, then any other value."""
    return follow_up(replay)[0]


def attention(replay: Replay) -> list[dict[str, Any]]:
    """Machines that need a person: ``failed``, ``forbidden``, in doubt, and those whose
    offboard action ended Failed, TimeOut or Cancelled. One dict a machine with
    ``machine_id``, ``outcome``, ``action_id``, ``action_status``, ``seen_at``, ``message``,
    ``where`` and ``input`` (all as journaled: render them escaped)."""
    return follow_up(replay)[1]


def follow_up(replay: Replay) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """:func:`action_statuses` and :func:`attention` in one pass over the machines' rows
    (:func:`rows`, the view every format shares; each result line is read once)."""
    found: list[dict[str, Any]] = []
    tally: collections.Counter[str] = collections.Counter()
    cancels = replay.cancels
    for row in rows(replay, (*ATTENTION_OUTCOMES, *FOLLOWED_OUTCOMES)):
        status = row["action_status"]
        message = row["message"]
        if row["outcome"] in FOLLOWED_OUTCOMES:
            tally[status or "unknown"] += 1
            if status not in ATTENTION_STATUSES or _cancelled_on_purpose(cancels, row):
                continue
            message = f"the offboard action ended {status}"
        found.append(
            {
                "machine_id": row["machine_id"],
                "outcome": row["outcome"],
                "action_id": row["action_id"],
                "action_status": status,
                "seen_at": row["action_status_at"] or row["updated_at"],
                "message": message,
                "where": row["where"],
                "input": row["input"],
            }
        )
    ordered = {s: tally[s] for s in _STATUS_ORDER if tally.get(s)}
    return ordered | {s: n for s, n in sorted(tally.items()) if s not in ordered}, found


def _cancelled_on_purpose(cancels: Mapping[str, CancelSeen], row: dict[str, Any]) -> bool:
    """True when ``bulkoffboard cancel`` cancelled the row's action: an undone offboard,
    not one that needs a person."""
    seen = cancels.get(row["machine_id"])
    return (
        seen is not None
        and seen.outcome == "cancelled"
        and row["action_status"] == "Cancelled"
        and seen.action_id in (None, row["action_id"])
    )


def summary_with_actions(replay: Replay) -> dict[str, Any]:
    """:func:`summary` plus ``action_statuses`` and the ``attention`` count."""
    statuses, needs = follow_up(replay)
    return summary(replay) | {"action_statuses": statuses, "attention": len(needs)}


# -- the timeline of offboard calls ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timeline:
    """Offboard calls per minute (from ``attempt`` records' send times)."""

    #: ``(minute, calls)`` for every minute with calls, ascending; a minute is epoch // 60.
    per_minute: tuple[tuple[int, int], ...]
    #: True when built from a replay that kept only its latest sends (see
    #: :func:`timeline_from_replay`): older calls are missing.
    partial: bool = False

    @property
    def total(self) -> int:
        """Calls counted."""
        return sum(n for _, n in self.per_minute)


def _minutes(epochs: Iterable[float]) -> tuple[tuple[int, int], ...]:
    tally: collections.Counter[int] = collections.Counter(int(t // 60) for t in epochs)
    return tuple(sorted(tally.items()))


def timeline_from_file(path: Path) -> Timeline:
    """Every ``attempt`` of the journal at ``path``, per minute: one streaming pass, a pure
    function of the file (lines that do not parse, and attempts without a time, are skipped:
    :func:`~bulkoffboard.journal.replay_file` is the one that judges a journal)."""
    sends: list[float] = []
    with path.open("rb") as handle:
        for line in handle:
            if b'"attempt"' not in line:
                continue  # cheap pre-filter: most lines are results
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(record, dict) or record.get("type") != "attempt":
                continue
            at = record.get("at")
            if not isinstance(at, str):
                continue
            try:
                sends.append(parse_iso(at).timestamp())
            except ValueError:
                continue
    return Timeline(_minutes(sends))


def timeline_from_replay(replay: Replay) -> Timeline:
    """The calls a replay kept (its latest 10,000 sends): ``partial`` when it may have
    dropped older ones. :func:`timeline_from_file` reads them all."""
    kept = replay.recent
    partial = len(kept) >= kept.maxlen
    return Timeline(_minutes(replay.recent_sends), partial=partial)


def _limits(replay: Replay) -> tuple[Limit, ...]:
    parsed: list[Limit] = []
    for item in replay.header.get("limits") or ():
        try:
            calls, period = item
            parsed.append(Limit(int(calls), float(period)))
        except (TypeError, ValueError):
            continue
    return tuple(parsed) or DEFAULT_LIMITS


def span_cap(limits: Iterable[Limit], span_s: float) -> int:
    """The most calls any ``span_s`` seconds may hold under ``limits`` (100 a minute and
    1,500 an hour for the documented pair, mde-api.md section 2)."""
    return min(limit.calls * max(1, math.ceil(span_s / limit.period_s)) for limit in limits)


@dataclass(frozen=True, slots=True)
class _Column:
    #: The minute (epoch // 60), or None for a collapsed stretch without calls.
    minute: int | None
    calls: int
    #: Calls in the 60 minutes ending with this one.
    hour: int
    #: For a collapsed stretch: how many minutes it hides.
    gap: int = 0


#: A stretch of more minutes than this without calls is drawn as one narrow gap.
_GAP_MINUTES = 10
#: Above this many columns, each bar shows the busiest minute of several.
_MAX_COLUMNS = 1440


def _columns(timeline: Timeline) -> list[_Column]:
    columns: list[_Column] = []
    window: collections.deque[tuple[int, int]] = collections.deque()
    in_window = 0
    previous: int | None = None

    def add(minute: int, calls: int) -> None:
        nonlocal in_window
        window.append((minute, calls))
        in_window += calls
        while window and window[0][0] <= minute - 60:
            in_window -= window.popleft()[1]
        columns.append(_Column(minute, calls, in_window))

    for minute, calls in timeline.per_minute:
        if previous is not None:
            quiet = minute - previous - 1
            if quiet > _GAP_MINUTES:
                columns.append(_Column(None, 0, 0, gap=quiet))
            else:
                for empty in range(previous + 1, minute):
                    add(empty, 0)
        add(minute, calls)
        previous = minute
    return columns


def _coarsen(columns: list[_Column]) -> tuple[list[_Column], int]:
    """Merge runs of minutes into one bar (the busiest minute and hour of the run)."""
    if len(columns) <= _MAX_COLUMNS:
        return columns, 1
    step = math.ceil(len(columns) / _MAX_COLUMNS)
    merged: list[_Column] = []
    run: list[_Column] = []

    def flush() -> None:
        if run:
            merged.append(
                _Column(run[0].minute, max(c.calls for c in run), max(c.hour for c in run))
            )
            run.clear()

    for column in columns:
        if column.minute is None:
            flush()
            merged.append(column)
            continue
        run.append(column)
        if len(run) == step:
            flush()
    flush()
    return merged, step


def _minute_text(minute: int) -> str:
    return datetime.fromtimestamp(minute * 60, UTC).strftime("%Y-%m-%d %H:%M")


def _gap_text(minutes: int) -> str:
    days, rest = divmod(minutes, 1440)
    hours, mins = divmod(rest, 60)
    parts = [f"{days} d" if days else "", f"{hours} h" if hours else "", f"{mins} min"]
    return " ".join(p for p in parts if p and not (p.endswith("min") and days))


@dataclass(frozen=True, slots=True)
class _Peaks:
    minute: tuple[int, int] | None  # (calls, minute)
    hour: tuple[int, int] | None  # (calls, minute the hour ends with)


def _peaks(columns: list[_Column]) -> _Peaks:
    real = [(c.calls, c.hour, c.minute) for c in columns if c.minute is not None]
    if not real:
        return _Peaks(None, None)
    calls, _, minute = max(real, key=lambda c: c[0])
    _, hour, hour_end = max(real, key=lambda c: c[1])
    return _Peaks((calls, minute), (hour, hour_end))


def _per_hour(timeline: Timeline) -> list[tuple[int, int, int]]:
    """``(hour, calls, busiest minute)`` per clock hour with calls (hour = epoch // 3600)."""
    calls: collections.Counter[int] = collections.Counter()
    busiest: dict[int, int] = {}
    for minute, count in timeline.per_minute:
        hour = minute // 60
        calls[hour] += count
        busiest[hour] = max(busiest.get(hour, 0), count)
    return [(hour, calls[hour], busiest[hour]) for hour in sorted(calls)]


# -- escaping ----------------------------------------------------------------------------------

#: Characters XML 1.0 forbids (and HTML renders as garbage): C0 controls but tab, LF and CR,
#: lone surrogates, and the two non-characters at the end of the BMP.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff\ufffe\uffff]")


def _printable(value: Any) -> str:
    text = "" if value is None else str(value)
    return _NOT_XML.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _h(value: Any) -> str:
    """Text for HTML (and XML) content or a quoted attribute."""
    return html.escape(_printable(value), quote=True)


#: Inline Markdown inside a table cell: emphasis, code, links and images, strike-through, and
#: the cell separator (block syntax such as ``#`` or ``-`` does not start inside a cell).
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def _md(value: Any) -> str:
    """Text for one Markdown table cell: no line breaks, no live HTML, no formatting."""
    text = " ".join(_printable(value).split())
    text = html.escape(text, quote=False)  # <script> shows as text, never runs
    return _MD_SPECIAL.sub(r"\\\1", text)


# -- Markdown ----------------------------------------------------------------------------------

_MD_ATTENTION_ROWS = 200
_HTML_ATTENTION_ROWS = 2000
_JSON_ATTENTION_ROWS = 2000


def _run_facts(replay: Replay) -> list[tuple[str, str]]:
    run = identity(replay)
    source: dict[str, Any] = run["source"] if isinstance(run.get("source"), dict) else {}
    source_text = " ".join(
        _printable(source.get(k)) for k in ("kind", "path", "format") if source.get(k)
    )
    return [
        ("run id", _printable(run.get("run_id"))),
        ("started", _printable(run.get("created_at"))),
        ("source", source_text),
        ("comment", _printable(run.get("comment"))),
        ("tool version", _printable(run.get("tool_version"))),
        ("API", _printable(run.get("api_url"))),
        ("tenant", _printable(run.get("tenant_id"))),
        ("sessions", str(replay.sessions)),
    ]


def _calls_facts(timeline: Timeline, limits: tuple[Limit, ...]) -> list[str]:
    if not timeline.per_minute:
        return ["no offboard calls recorded"]
    columns = _columns(timeline)
    peaks = _peaks(columns)
    first, last = timeline.per_minute[0][0], timeline.per_minute[-1][0]
    facts = [
        f"{timeline.total:,} calls from {_minute_text(first)} to {_minute_text(last)} UTC "
        f"({len(timeline.per_minute):,} minutes with calls)"
        + (
            " (only the latest 10,000 calls: read from the file for all)"
            if timeline.partial
            else ""
        )
    ]
    if peaks.minute is not None:
        calls, minute = peaks.minute
        facts.append(
            f"busiest minute: {calls:,} calls at {_minute_text(minute)} UTC "
            f"(limit {span_cap(limits, 60):,} a minute)"
        )
    if peaks.hour is not None:
        calls, minute = peaks.hour
        facts.append(
            f"busiest hour: {calls:,} calls in the hour to {_minute_text(minute)} UTC "
            f"(limit {span_cap(limits, 3600):,} an hour)"
        )
    return facts


def render_markdown(replay: Replay, *, timeline: Timeline | None = None) -> str:
    """A Markdown report: the run, outcome counts, action statuses, offboard calls per hour
    against the limits, and the machines that need attention. Every journaled value is
    escaped (no live HTML, no formatting). ``timeline`` defaults to the replay's own sends
    (:func:`timeline_from_replay`); pass :func:`timeline_from_file` for every call."""
    timeline = timeline if timeline is not None else timeline_from_replay(replay)
    limits = _limits(replay)
    info = summary(replay)
    out = [f"# bulkoffboard report: run {_md(info['run'].get('run_id'))}", ""]
    out += ["| | |", "|---|---|"]
    out += [f"| {_md(k)} | {_md(v)} |" for k, v in _run_facts(replay)]
    out += ["", "## Outcomes", "", "| outcome | machines |", "|---|---:|"]
    out += [f"| {_md(k)} | {n:,} |" for k, n in info["counts"].items()]
    if info["in_doubt"]:
        out.append(f"| in doubt | {info['in_doubt']:,} |")
    out.append(f"| **total** | **{info['total']:,}** |")
    statuses, needs = follow_up(replay)
    out += ["", "## Offboard actions", ""]
    if statuses:
        out += [
            "Latest status of each offboarded or already pending machine's action (as "
            "`verify` last saw it, else as recorded when it was offboarded).",
            "",
            "| action status | machines |",
            "|---|---:|",
        ]
        out += [f"| {_md(k)} | {n:,} |" for k, n in statuses.items()]
    else:
        out.append("No offboard actions recorded.")
    cancels = cancel_counts(replay)
    if cancels:
        out += ["", "## Cancelled (`bulkoffboard cancel`)", ""]
        out += ["| cancel | machines |", "|---|---:|"]
        out += [f"| {_md(k)} | {n:,} |" for k, n in cancels.items()]
    out += ["", "## Offboard calls", ""]
    out += [f"- {_md(fact)}" for fact in _calls_facts(timeline, limits)]
    hours = _per_hour(timeline)
    if hours:
        out += ["", "| hour (UTC) | calls | busiest minute |", "|---|---:|---:|"]
        out += [
            f"| {_md(_minute_text(hour * 60))} | {calls:,} | {top:,} |"
            for hour, calls, top in hours
        ]
    out += ["", f"## Needs attention ({len(needs):,})", ""]
    if needs:
        out += [
            "| machine | outcome | action status | seen | message | input |",
            "|---|---|---|---|---|---|",
        ]
        for row in needs[:_MD_ATTENTION_ROWS]:
            out.append(
                f"| {_md(row['machine_id'] or row['where'])} | {_md(row['outcome'])} | "
                f"{_md(row['action_status'])} | {_md(row['seen_at'])} | {_md(row['message'])} "
                f"| {_md(row['input'])} |"
            )
        if len(needs) > _MD_ATTENTION_ROWS:
            out += ["", f"... and {len(needs) - _MD_ATTENTION_ROWS:,} more (see `--format csv`)."]
    else:
        out.append("Nothing.")
    rejected = replay.invalid_results
    if rejected:
        out += ["", f"## Rejected input ({len(rejected):,})", ""]
        out += ["| where | input | outcome | why |", "|---|---|---|---|"]
        out += [
            f"| {_md(r.get('where'))} | {_md(r.get('input'))} | {_md(r.get('outcome'))} "
            f"| {_md(r.get('message'))} |"
            for r in rejected[:_MD_ATTENTION_ROWS]
        ]
        if len(rejected) > _MD_ATTENTION_ROWS:
            out += ["", f"... and {len(rejected) - _MD_ATTENTION_ROWS:,} more."]
    return "\n".join(out) + "\n"


# -- HTML --------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2733;
  margin: 2em auto; max-width: 1000px; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border-bottom: 1px solid #dde3ea; padding: 0.25em 0.8em; text-align: left;
  vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.id { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.92em;
  word-break: break-all; }
tr.total td { font-weight: 600; border-top: 2px solid #9aa7b4; }
.muted { color: #65717e; } .warn { color: #a4282a; }
.Succeeded { color: #1b7a3a; } .Failed, .TimeOut, .Cancelled { color: #a4282a; }
.Pending, .InProgress { color: #8a5a00; }
svg { display: block; margin: 0.5em 0; } svg text { font: 11px system-ui, sans-serif;
  fill: #4b5763; }
svg .bar { fill: #3f7fbf; } svg .over { fill: #c0392b; } svg .gap { fill: #eef1f4; }
svg .limit { stroke: #c0392b; stroke-width: 1.2; stroke-dasharray: 5 3; }
svg .axis { stroke: #9aa7b4; stroke-width: 1; }
svg .hour { fill: none; stroke: #3f7fbf; stroke-width: 1.5; }
"""

_W, _H = 960, 200
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 12, 14, 30


def _svg_chart(
    columns: list[_Column], value: Callable[[_Column], int], cap: int, *, label: str, line: bool
) -> str:
    """One chart: bars (or a line) of ``value`` per column, the ``cap`` as a dashed line."""
    plot_w = _W - _LEFT - _RIGHT
    plot_h = _H - _TOP - _BOTTOM
    peak = max((value(c) for c in columns), default=0)
    top = max(peak, cap, 1) * 1.12
    width = plot_w / max(len(columns), 1)

    def y(v: float) -> float:
        return _TOP + plot_h - v / top * plot_h

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{_h(label)}">',
        f"<title>{_h(label)}</title>",
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{_W - _RIGHT}" '
        f'y2="{_TOP + plot_h}"/>',
    ]
    points: list[str] = []
    segments: list[list[str]] = []
    for index, column in enumerate(columns):
        x = _LEFT + index * width
        if column.minute is None:
            parts.append(
                f'<rect class="gap" x="{x:.2f}" y="{_TOP}" width="{max(width, 1):.2f}" '
                f'height="{plot_h}"><title>{_h(_gap_text(column.gap))} without calls'
                "</title></rect>"
            )
            if points:
                segments.append(points)
                points = []
            continue
        v = value(column)
        when = _minute_text(column.minute)
        if line:
            points.append(f"{x + width / 2:.2f},{y(v):.2f}")
            continue
        if v <= 0:
            continue
        kind = "over" if v > cap else "bar"
        parts.append(
            f'<rect class="{kind}" x="{x:.2f}" y="{y(v):.2f}" '
            f'width="{max(width - 0.4, 0.6):.2f}" height="{_TOP + plot_h - y(v):.2f}">'
            f"<title>{_h(when)} UTC: {v:,} calls</title></rect>"
        )
    if points:
        segments.append(points)
    for segment in segments:
        if len(segment) == 1:
            cx, cy = segment[0].split(",")
            parts.append(f'<circle cx="{cx}" cy="{cy}" r="1.5" class="hour"/>')
        else:
            parts.append(f'<polyline class="hour" points="{" ".join(segment)}"/>')
    parts += [
        f'<line class="limit" x1="{_LEFT}" y1="{y(cap):.2f}" x2="{_W - _RIGHT}" '
        f'y2="{y(cap):.2f}"/>',
        f'<text x="{_W - _RIGHT - 4}" y="{y(cap) - 4:.2f}" text-anchor="end">limit {cap:,}</text>',
        f'<text x="{_LEFT - 6}" y="{y(cap) + 4:.2f}" text-anchor="end">{cap:,}</text>',
        f'<text x="{_LEFT - 6}" y="{_TOP + plot_h + 4}" text-anchor="end">0</text>',
    ]
    real = [c.minute for c in columns if c.minute is not None]
    if real:
        parts += [
            f'<text x="{_LEFT}" y="{_H - 8}">{_h(_minute_text(real[0]))} UTC</text>',
            f'<text x="{_W - _RIGHT}" y="{_H - 8}" text-anchor="end">'
            f"{_h(_minute_text(real[-1]))} UTC</text>",
        ]
    parts.append("</svg>")
    return "\n".join(parts)


def _class(name: str) -> str:
    return f' class="{name}"' if name else ""


def _html_table(
    head: list[tuple[str, str]], body: Iterable[list[tuple[str, str]]], *, total: bool = False
) -> str:
    """A table; cells are ``(css class, already escaped html)``."""
    out = ["<table>", "<thead><tr>"]
    out += [f"<th{_class(cls)}>{text}</th>" for cls, text in head]
    out.append("</tr></thead><tbody>")
    body_rows = list(body)
    for index, row in enumerate(body_rows):
        last = total and index == len(body_rows) - 1
        out.append('<tr class="total">' if last else "<tr>")
        out += [f"<td{_class(cls)}>{text}</td>" for cls, text in row]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def render_html(replay: Replay, *, timeline: Timeline | None = None) -> str:
    """A self-contained HTML page (inline CSS and SVG, no script, nothing fetched): the run,
    outcome counts, action statuses, offboard calls per minute against the minute limit and
    per trailing hour against the hour limit, and the machines that need attention. Every
    journaled value is escaped; the page is also well-formed XML. ``timeline`` as for
    :func:`render_markdown`."""
    run_id = _h(replay.run_id)
    body = [f'<h1>bulkoffboard report</h1><p class="muted">run {run_id}</p>']
    body += _html_sections(replay, timeline)
    return _html_page(f"bulkoffboard report {run_id}", body)


def _html_page(title: str, body: list[str]) -> str:
    """A whole page around ``body`` (escaped HTML already), with the report's inline CSS."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8"/>',
        '<meta name="viewport" content="width=device-width, initial-scale=1"/>',
        f"<title>{title}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        *body,
        "</body>",
        "</html>",
    ]
    return "\n".join(out) + "\n"


def _html_sections(replay: Replay, timeline: Timeline | None = None) -> list[str]:
    """The report of one run, below its title: the run's facts, outcomes, action statuses,
    the call charts, attention and rejected input (headings from ``<h2>``)."""
    timeline = timeline if timeline is not None else timeline_from_replay(replay)
    limits = _limits(replay)
    info = summary(replay)
    out = [
        _html_table(
            [("", "run"), ("", "")],
            (
                [("", _h(k)), ("id" if k in ("run id", "tenant") else "", _h(v))]
                for k, v in _run_facts(replay)
            ),
        ),
        "<h2>Outcomes</h2>",
    ]
    outcome_rows = [[("", _h(k)), ("n", f"{n:,}")] for k, n in info["counts"].items()]
    if info["in_doubt"]:
        outcome_rows.append([("warn", "in doubt"), ("n", f"{info['in_doubt']:,}")])
    outcome_rows.append([("", "total"), ("n", f"{info['total']:,}")])
    out.append(_html_table([("", "outcome"), ("n", "machines")], outcome_rows, total=True))
    statuses, needs = follow_up(replay)
    out.append("<h2>Offboard actions</h2>")
    if statuses:
        out.append(
            '<p class="muted">Latest status of each offboarded or already pending machine\'s '
            "action, as <code>verify</code> last saw it, else as recorded when it was "
            "offboarded.</p>"
        )
        out.append(
            _html_table(
                [("", "action status"), ("n", "machines")],
                ([(_status_class(k), _h(k)), ("n", f"{n:,}")] for k, n in statuses.items()),
            )
        )
    else:
        out.append('<p class="muted">No offboard actions recorded.</p>')
    cancels = cancel_counts(replay)
    if cancels:
        out.append("<h2>Cancelled (<code>bulkoffboard cancel</code>)</h2>")
        out.append(
            _html_table(
                [("", "cancel"), ("n", "machines")],
                (([("", _h(k)), ("n", f"{n:,}")] for k, n in cancels.items())),
            )
        )
    out.append("<h2>Offboard calls</h2>")
    out += [f"<p>{_h(fact)}</p>" for fact in _calls_facts(timeline, limits)]
    if timeline.per_minute:
        columns, step = _coarsen(_columns(timeline))
        minute_cap, hour_cap = span_cap(limits, 60), span_cap(limits, 3600)
        per = "minute" if step == 1 else f"busiest minute of every {step}"
        out += [
            f'<p class="muted">Calls per {_h(per)}, against the limit of {minute_cap:,} a '
            "minute (dashed); red bars are over it.</p>",
            _svg_chart(
                columns,
                lambda c: c.calls,
                minute_cap,
                label=f"offboard calls per minute, limit {minute_cap}",
                line=False,
            ),
            f'<p class="muted">Calls in the trailing 60 minutes, against the limit of '
            f"{hour_cap:,} an hour (dashed).</p>",
            _svg_chart(
                columns,
                lambda c: c.hour,
                hour_cap,
                label=f"offboard calls in the trailing hour, limit {hour_cap}",
                line=True,
            ),
        ]
    out.append(f"<h2>Needs attention ({len(needs):,})</h2>")
    if needs:
        out.append(
            _html_table(
                [
                    ("", "machine"),
                    ("", "outcome"),
                    ("", "action status"),
                    ("", "seen"),
                    ("", "message"),
                    ("", "input"),
                ],
                (
                    [
                        ("id", _h(row["machine_id"] or row["where"])),
                        ("", _h(row["outcome"])),
                        (_status_class(row["action_status"]), _h(row["action_status"])),
                        ("", _h(row["seen_at"])),
                        ("", _h(row["message"])),
                        ("id", _h(row["input"])),
                    ]
                    for row in needs[:_HTML_ATTENTION_ROWS]
                ),
            )
        )
        if len(needs) > _HTML_ATTENTION_ROWS:
            out.append(
                f'<p class="muted">... and {len(needs) - _HTML_ATTENTION_ROWS:,} more '
                "(see <code>--format csv</code>).</p>"
            )
    else:
        out.append('<p class="muted">Nothing.</p>')
    rejected = replay.invalid_results
    if rejected:
        out.append(f"<h2>Rejected input ({len(rejected):,})</h2>")
        out.append(
            _html_table(
                [("", "where"), ("", "input"), ("", "outcome"), ("", "why")],
                (
                    [
                        ("", _h(r.get("where"))),
                        ("id", _h(r.get("input"))),
                        ("", _h(r.get("outcome"))),
                        ("", _h(r.get("message"))),
                    ]
                    for r in rejected[:_HTML_ATTENTION_ROWS]
                ),
            )
        )
        if len(rejected) > _HTML_ATTENTION_ROWS:
            out.append(
                f'<p class="muted">... and {len(rejected) - _HTML_ATTENTION_ROWS:,} more.</p>'
            )
    return out


def _status_class(status: Any) -> str:
    return str(status) if status in _STATUS_ORDER else ""


def render_file(path: Path, fmt: str) -> str:
    """Render the journal at ``path`` in ``fmt`` (a :data:`RENDERERS` key); Markdown and HTML
    get the timeline of every call from a streaming pass over the file."""
    replay = replay_file(path)
    if fmt in ("markdown", "html"):
        renderer = render_markdown if fmt == "markdown" else render_html
        return renderer(replay, timeline=timeline_from_file(path))
    return RENDERERS[fmt](replay)


def write_file(path: Path, fmt: str, out: TextIO) -> None:
    """:func:`render_file` written to ``out``; CSV and JSON Lines are streamed a row at a
    time (a report of a million machines is never held whole)."""
    if fmt == "csv":
        write_csv(out, CSV_COLUMNS, rows(replay_file(path)))
    elif fmt == "jsonl":
        write_jsonl(out, rows(replay_file(path)))
    else:
        out.write(render_file(path, fmt))


# -- a run directory: many tenants ------------------------------------------------------------

#: Outcome columns of the per-tenant table (the rest are summed in ``other``).
_TENANT_COLUMNS = ("offboarded", "already_pending", "failed")


def _tenant_row(replay: Replay) -> dict[str, int]:
    tally = counts(replay)
    row = {name: tally.get(name, 0) for name in _TENANT_COLUMNS}
    row["other"] = sum(n for k, n in tally.items() if k not in _TENANT_COLUMNS)
    row["in_doubt"] = len(replay.in_doubt())
    row["total"] = sum(tally.values())
    return row


def _run_dir_rows(
    replays: Sequence[tuple[str, Replay]],
) -> tuple[list[tuple[str, dict[str, int]]], dict[str, int]]:
    rows_ = [(name, _tenant_row(replay)) for name, replay in replays]
    total: collections.Counter[str] = collections.Counter()
    for _, row in rows_:
        total.update(row)
    keys = (*_TENANT_COLUMNS, "other", "in_doubt", "total")
    return rows_, {k: total.get(k, 0) for k in keys}


def render_run_dir(run_dir: Path, journals: Sequence[tuple[str, Path]], fmt: str) -> str:
    """A report over the tenants' journals of a run directory (``journals``: tenant name and
    journal, in order): a row a tenant and a total (table), ``tenant`` as the first CSV
    column, ``tenants`` and ``total`` in JSON, a section a tenant in Markdown and HTML."""
    out = io.StringIO()
    write_run_dir(run_dir, journals, fmt, out)
    return out.getvalue()


def write_run_dir(
    run_dir: Path, journals: Sequence[tuple[str, Path]], fmt: str, out: TextIO
) -> None:
    """:func:`render_run_dir` written to ``out``; CSV and JSON Lines stream a row at a time."""
    if fmt == "csv":
        write_csv(
            out,
            ("tenant", *CSV_COLUMNS),
            ({"tenant": name} | row for name, path in journals for row in rows(replay_file(path))),
        )
        return
    if fmt == "jsonl":
        write_jsonl(
            out,
            ({"tenant": name} | row for name, path in journals for row in rows(replay_file(path))),
        )
        return
    replays = [(name, replay_file(path)) for name, path in journals]
    tenant_rows, total = _run_dir_rows(replays)
    if fmt == "json":
        statuses: collections.Counter[str] = collections.Counter()
        tenants: dict[str, Any] = {}
        for name, replay in replays:
            tenants[name] = orjson.loads(render_json(replay))
            statuses.update(tenants[name]["action_statuses"])
        document = {
            "run_dir": str(run_dir),
            "tenants": tenants,
            "total": {
                "tenants": len(replays),
                "counts": dict(
                    sum((collections.Counter(counts(r)) for _, r in replays), collections.Counter())
                ),
                "total": total["total"],
                "in_doubt": total["in_doubt"],
                "action_statuses": dict(statuses),
                "attention": sum(t["attention"] for t in tenants.values()),
            },
        }
        out.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    if fmt == "markdown":
        lines = [f"# bulkoffboard report: run directory {_md(run_dir)}", ""]
        lines += _md_tenant_table(tenant_rows, total)
        for name, path in journals:
            lines += ["", f"## Tenant {_md(name)}", ""]
            single = render_markdown(replay_file(path), timeline=timeline_from_file(path))
            lines += ["#" + line if line.startswith("#") else line for line in single.splitlines()]
        out.write("\n".join(lines) + "\n")
        return
    if fmt == "html":
        body = [
            "<h1>bulkoffboard report</h1>",
            f'<p class="muted">run directory {_h(run_dir)}, {len(replays):,} tenants</p>',
            _html_tenant_table(tenant_rows, total),
        ]
        for name, path in journals:
            replay = replay_file(path)
            body.append(f'<section id="tenant-{_h(name)}"><h2>Tenant {_h(name)}</h2>')
            body += [
                part.replace("<h2>", "<h3>").replace("</h2>", "</h3>")
                for part in _html_sections(replay, timeline_from_file(path))
            ]
            body.append("</section>")
        out.write(_html_page(f"bulkoffboard report {_h(run_dir)}", body))
        return
    # table
    head = f"{'tenant':<20}" + "".join(
        f"{k:>17}" for k in (*_TENANT_COLUMNS, "other", "in doubt", "total")
    )
    lines = [f"run directory {run_dir}: {len(replays)} tenants", "", head]
    for name, row in [*tenant_rows, ("total", total)]:
        lines.append(f"{name:<20}" + "".join(f"{v:>17}" for v in row.values()))
    out.write("\n".join(lines) + "\n")


def _md_tenant_table(
    tenant_rows: list[tuple[str, dict[str, int]]], total: dict[str, int]
) -> list[str]:
    keys = (*_TENANT_COLUMNS, "other", "in doubt", "total")
    lines = ["| tenant | " + " | ".join(keys) + " |", "|---" + "|---:" * len(keys) + "|"]
    for name, row in tenant_rows:
        lines.append(f"| {_md(name)} | " + " | ".join(f"{v:,}" for v in row.values()) + " |")
    lines.append("| **total** | " + " | ".join(f"**{v:,}**" for v in total.values()) + " |")
    return lines


def _html_tenant_table(tenant_rows: list[tuple[str, dict[str, int]]], total: dict[str, int]) -> str:
    keys = (*_TENANT_COLUMNS, "other", "in doubt", "total")
    return _html_table(
        [("", "tenant"), *(("n", k) for k in keys)],
        (
            [("", _h(name)), *(("n", f"{v:,}") for v in row.values())]
            for name, row in [*tenant_rows, ("total", total)]
        ),
        total=True,
    )


# -- the summary file --------------------------------------------------------------------------


def summary_json(
    summary_data: Mapping[str, Any],
    path: Path,
    *,
    command: str,
    journal: Path | None = None,
) -> dict[str, Any]:
    """Write ``--summary-json PATH`` atomically (a temp file in the same folder, fsynced, then
    renamed over ``path``) and return what was written.

    ``summary_data`` is a summary's ``as_dict()`` (:class:`bulkoffboard.runner.Summary` for
    run/resume: counts, duration_s, offboard_calls, throttled_429, exit_code; or
    :class:`bulkoffboard.verify.VerifySummary` for verify). The file adds ``format``,
    ``tool``, ``tool_version``, ``command``, ``journal`` and ``written_at``. Raises OSError
    when the file cannot be written (the caller logs it and keeps its exit code).
    """
    document: dict[str, Any] = {
        "format": 1,
        "tool": "bulkoffboard",
        "tool_version": __version__,
        "command": command,
        "journal": str(journal) if journal is not None else None,
        "written_at": iso(utc_now()),
        **summary_data,
    }
    data = orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n"
    folder = path.parent
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename durable too (best effort)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return document


RENDERERS["markdown"] = render_markdown
RENDERERS["html"] = render_html
