"""History: one report over many journals (nights, tenants), streamed one journal at a time.

``report --journals GLOB...`` and ``report --journal-dir DIR`` (recursive, so the run
directories of many tenants are included) read the journals oldest first (by the header's
``created_at``) and keep, per machine over every run, about 60 bytes in flat arrays (the id as
20 bytes in an :class:`~bulkoffboard.idtable.IdTable`, the run that first offboarded it and
when, its latest outcome, its latest known action status, when that was seen and the action's
id). Only one journal's replay is alive at a time, so a year of nightly journals (365 of 3,000
machines) fits the memory of a single-run report.

Per run a row: started, tenant, source, offboarded, already pending, failed, cancelled, still
not final (the journal's own latest status of each action it created or found: Pending or
InProgress), and the machines it named. The totals count each machine once:

- ``offboarded``: machines any run offboarded (those offboarded in several runs are listed
  with their runs: a device that came back, or a second run over the same list);
- ``already_pending``, ``failed``, ``in_doubt``, ``other``: by the machine's outcome in the
  latest run that named it, when no run offboarded it (``failed`` and ``in_doubt`` count
  it either way: a machine that failed last needs a person even if an older run offboarded it);
- ``cancelled``: machines whose offboard a ``cancel`` withdrew;
- ``not_final``: machines whose latest known action status, over every journal, is Pending
  or InProgress; the ones offboarded longest ago are listed (``longest_not_final``).

Nothing here prints: the renderers write to a text stream.
"""

from __future__ import annotations

import array
import collections
import glob
import heapq
import io
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson

from bulkoffboard.errors import JournalError, UsageError
from bulkoffboard.idtable import IdTable
from bulkoffboard.journal import iso, parse_iso, read_header, replay_file, utc_now
from bulkoffboard.reports import (
    FOLLOWED_OUTCOMES,
    _h,
    _html_page,
    _html_table,
    _md,
    _printable,
    rows,
    write_csv,
)

#: Report formats of a history (``report --format``).
FORMATS = ("table", "csv", "json", "jsonl", "markdown", "html")
#: The per-run columns, in order (CSV, JSON Lines and the tables).
RUN_COLUMNS = (
    "started",
    "tenant",
    "tenant_id",
    "run_id",
    "source",
    "machines",
    "offboarded",
    "already_pending",
    "failed",
    "cancelled",
    "not_final",
    "in_doubt",
    "journal",
)
#: Action statuses that can still change.
NOT_FINAL_STATUSES = frozenset({"Pending", "InProgress"})
#: Machines listed under "longest not final" and "in several runs" (JSON: ``_JSON_ROWS``).
_LISTED = 20
_JSON_ROWS = 2000
_NONE = -1


@dataclass(slots=True)
class RunRow:
    """One journal's row of the history."""

    started: str
    tenant: str
    tenant_id: str
    run_id: str
    source: str
    machines: int
    offboarded: int
    already_pending: int
    failed: int
    cancelled: int
    not_final: int
    in_doubt: int
    journal: str

    @property
    def night(self) -> str:
        """The UTC date the run started (``YYYY-MM-DD``; ``unknown`` when its header has none)."""
        return self.started[:10] if len(self.started) >= 10 else "unknown"


def source_text(source: Any) -> str:
    """A header's ``source`` in a few words: ``file ids.txt``, ``query <filter>``, ..."""
    if not isinstance(source, dict):
        return ""
    kind = str(source.get("kind") or "")
    detail: Any = {
        "file": source.get("path"),
        "query": source.get("filter"),
        "names": source.get("names"),
        "hunting": source.get("hunting"),
    }.get(kind)
    if kind == "file" and isinstance(detail, str):
        detail = Path(detail).name
    text = f"{kind} {detail}" if detail else kind
    return " ".join(_printable(text).split())[:200]


# -- finding the journals ----------------------------------------------------------------------


def find_journals(
    patterns: Sequence[str] = (),
    journal_dir: str | Path | None = None,
    *,
    required: bool = False,
) -> list[Path]:
    """The journals named by ``patterns`` (globs, ``**`` recursive; a pattern that matches
    nothing is a usage error naming it) and every ``*.jsonl`` under ``journal_dir``
    (recursive). Files a glob or the folder holds whose first line is not a journal's header
    are left out; a path named outright must be a journal. Each journal once. ``required``:
    finding none is a usage error."""
    found: dict[Path, None] = {}
    for pattern in patterns:
        if glob.has_magic(pattern):
            # a user's glob, ** included; what it matches that is no journal is left out
            matches = sorted(glob.glob(pattern, recursive=True))  # noqa: PTH207
            paths = [Path(m).absolute() for m in matches if Path(m).is_file()]
            paths = [path for path in paths if _is_journal(path)]
        else:  # a path the shell expanded, or named: it must be a journal (build says why not)
            paths = [Path(pattern).expanduser().absolute()] if Path(pattern).is_file() else []
        if not paths:
            raise UsageError(f"--journals {pattern}: no journal matches")
        for path in paths:
            found.setdefault(path, None)
    if journal_dir is not None:
        folder = Path(journal_dir).expanduser()
        if not folder.is_dir():
            raise UsageError(f"--journal-dir {journal_dir}: not a folder")
        for path in sorted(folder.absolute().rglob("*.jsonl")):
            if path.is_file() and _is_journal(path):
                found.setdefault(path, None)
    if required and not found:
        raise UsageError(
            f"--journal-dir {journal_dir}: no journal in it (searched recursively)"
            if journal_dir is not None
            else "--journals: no journal matches"
        )
    return list(found)


def _is_journal(path: Path) -> bool:
    try:
        read_header(path)
    except (JournalError, OSError):
        return False
    return True


# -- the history ---------------------------------------------------------------------------------


class History:
    """Runs and machines over many journals; :meth:`add` them oldest first (see
    :func:`build`). ``now``: the report's time (when ages are measured)."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or utc_now()
        self.runs: list[RunRow] = []
        self._table = IdTable()
        self._offboarded_runs = array.array("B")  # runs that offboarded the machine (<= 255)
        self._first_run = array.array("i")  # the first run that offboarded it (-1: none)
        self._offboarded_at = array.array("I")  # when (epoch seconds; 0: never)
        self._last_outcome = bytearray()  # code in _outcomes
        self._cancelled = bytearray()
        self._status = bytearray()  # code in _statuses (0: none known)
        self._status_at = array.array("I")  # epoch seconds (0: unknown)
        self._action = bytearray()  # 16 bytes a machine: the action id as a UUID (0: none)
        self._action_text: dict[int, str] = {}  # action ids that are not UUIDs
        self._outcomes: list[str] = [""]
        self._statuses: list[str] = [""]
        #: Machine entry -> every run that offboarded it, for machines of more than one.
        self._runs_of: dict[int, list[int]] = {}

    # -- adding a journal -------------------------------------------------------------------------

    def add(self, path: Path) -> RunRow:
        """Fold one journal in (after every older one); returns its row."""
        replay = replay_file(path, recent=False)
        try:
            run = len(self.runs)
            header = replay.header
            tally = replay.outcome_counts()
            cancels = replay.cancels
            not_final = 0
            for row in rows(replay):
                machine_id = row["machine_id"]
                if not machine_id:
                    continue  # an invalid or unresolved value: no machine
                status = row["action_status"]
                if row["outcome"] in FOLLOWED_OUTCOMES and status in NOT_FINAL_STATUSES:
                    not_final += 1
                self._see(run, machine_id, row)
            cancelled = 0
            for machine_id, seen in cancels.items():
                if seen.outcome == "cancelled":
                    cancelled += 1
                    entry = self._table.find(_key(machine_id))
                    if entry != _NONE:
                        self._cancelled[entry] = 1
            tenant_id = str(header.get("tenant_id") or "")
            result = RunRow(
                started=str(header.get("created_at") or ""),
                tenant=str(header.get("tenant_name") or tenant_id),
                tenant_id=tenant_id,
                run_id=replay.run_id,
                source=source_text(header.get("source")),
                machines=sum(tally.values()),
                offboarded=tally.get("offboarded", 0),
                already_pending=tally.get("already_pending", 0),
                failed=tally.get("failed", 0),
                cancelled=cancelled,
                not_final=not_final,
                in_doubt=len(replay.in_doubt()),
                journal=str(path),
            )
        finally:
            replay.close()
        self.runs.append(result)
        return result

    def _see(self, run: int, machine_id: str, row: dict[str, Any]) -> None:
        key = _key(machine_id)
        if not key:
            return
        entry = self._table.add(key)
        if entry == len(self._last_outcome):
            self._offboarded_runs.append(0)
            self._first_run.append(_NONE)
            self._offboarded_at.append(0)
            self._last_outcome.append(0)
            self._cancelled.append(0)
            self._status.append(0)
            self._status_at.append(0)
            self._action.extend(bytes(16))
        outcome = str(row["outcome"])
        self._last_outcome[entry] = _code(self._outcomes, outcome)
        if outcome == "offboarded":
            times = self._offboarded_runs[entry]
            if times == 0:
                self._first_run[entry] = run
                self._offboarded_at[entry] = _epoch(row["updated_at"])
            elif times == 1:
                self._runs_of[entry] = [self._first_run[entry], run]
            else:
                self._runs_of[entry].append(run)
            self._offboarded_runs[entry] = min(times + 1, 255)
        status = row["action_status"]
        if status:
            seen_at = _epoch(row["action_status_at"] or row["updated_at"])
            if not seen_at or seen_at >= self._status_at[entry]:
                self._status[entry] = _code(self._statuses, str(status))
                self._status_at[entry] = seen_at
                self._set_action(entry, str(row["action_id"] or ""))

    def _set_action(self, entry: int, action_id: str) -> None:
        self._action_text.pop(entry, None)
        raw = _uuid_bytes(action_id) if action_id else bytes(16)
        if raw is None:
            raw = bytes(16)
            self._action_text[entry] = action_id
        self._action[entry * 16 : entry * 16 + 16] = raw

    def _action_id(self, entry: int) -> str:
        if entry in self._action_text:
            return self._action_text[entry]
        raw = bytes(self._action[entry * 16 : entry * 16 + 16])
        return str(uuid.UUID(bytes=raw)) if any(raw) else ""

    # -- what it found ----------------------------------------------------------------------------

    @property
    def machines(self) -> int:
        """Machines named by any run."""
        return len(self._table)

    def totals(self) -> dict[str, Any]:
        """Each machine counted once (see the module)."""
        names = self._outcomes
        outcome_of = collections.Counter(self._last_outcome)
        never = collections.Counter(
            names[code]
            for code, runs in zip(self._last_outcome, self._offboarded_runs, strict=True)
            if runs == 0
        )
        statuses = collections.Counter(self._status)
        status_counts = {self._statuses[c]: n for c, n in sorted(statuses.items()) if c}
        offboarded = sum(1 for n in self._offboarded_runs if n)
        several = sum(1 for n in self._offboarded_runs if n > 1)
        counted = ("offboarded", "already_pending", "failed", "in_doubt")
        return {
            "runs": len(self.runs),
            "nights": len({r.night for r in self.runs}),
            "tenants": len({r.tenant_id or r.tenant for r in self.runs}),
            "machines": self.machines,
            "offboarded": offboarded,
            "offboarded_in_several_runs": several,
            "already_pending": never.get("already_pending", 0),
            "failed": sum(n for c, n in outcome_of.items() if names[c] == "failed"),
            "in_doubt": sum(n for c, n in outcome_of.items() if names[c] == "in_doubt"),
            "cancelled": sum(self._cancelled),
            "not_final": sum(n for s, n in status_counts.items() if s in NOT_FINAL_STATUSES),
            "other": sum(n for name, n in never.items() if name not in counted),
            "action_statuses": status_counts,
        }

    def longest_not_final(self, limit: int = _LISTED) -> list[dict[str, Any]]:
        """Machines a run offboarded whose latest known action status is not final, offboarded
        longest ago first: id, tenant, run, action, status, when offboarded and seen, days."""
        not_final = {c for c, name in enumerate(self._statuses) if name in NOT_FINAL_STATUSES}
        at, runs = self._offboarded_at, self._offboarded_runs
        candidates = (
            entry for entry, code in enumerate(self._status) if code in not_final and runs[entry]
        )
        now = self.now.timestamp()
        out = []
        for entry in heapq.nsmallest(limit, candidates, key=lambda e: (at[e], e)):
            run = self.runs[self._first_run[entry]]
            seen = self._status_at[entry]
            out.append(
                {
                    "machine_id": self._table.key_at(entry).hex(),
                    "tenant": run.tenant,
                    "run_id": run.run_id,
                    "action_id": self._action_id(entry),
                    "action_status": self._statuses[self._status[entry]],
                    "offboarded_at": _iso(at[entry]),
                    "status_seen_at": _iso(seen),
                    "days_not_final": round(max(now - at[entry], 0.0) / 86400, 1),
                }
            )
        return out

    def in_several_runs(self, limit: int = _LISTED) -> list[dict[str, Any]]:
        """Machines offboarded by more than one run, most runs first, with those runs."""
        ranked = sorted(self._runs_of.items(), key=lambda item: (-len(item[1]), item[0]))
        return [
            {
                "machine_id": self._table.key_at(entry).hex(),
                "runs": [
                    {
                        "run_id": self.runs[r].run_id,
                        "started": self.runs[r].started,
                        "tenant": self.runs[r].tenant,
                    }
                    for r in runs
                ],
            }
            for entry, runs in ranked[:limit]
        ]

    def per_night(self) -> list[tuple[str, int]]:
        """(UTC date, machines offboarded by the runs started that day), oldest first."""
        nights: collections.Counter[str] = collections.Counter()
        for run in self.runs:
            nights[run.night] += run.offboarded
        return sorted(nights.items())


def build(paths: Iterable[Path], now: datetime | None = None) -> History:
    """A :class:`History` of ``paths``, read oldest first (header ``created_at``, then path)."""
    dated = []
    for path in paths:
        header = read_header(path)
        dated.append((str(header.get("created_at") or ""), str(path), path))
    history = History(now)
    for _, _, path in sorted(dated):
        history.add(path)
    return history


def _key(machine_id: str) -> bytes:
    try:
        key = bytes.fromhex(machine_id)
    except ValueError:
        return b""
    return key if len(key) == 20 else b""


def _uuid_bytes(text: str) -> bytes | None:
    """A GUID's 16 bytes (MDE's action ids are GUIDs), or None for anything else."""
    if len(text) != 36 or text[8:24:5] != "----" or text != text.lower():
        return None  # dashes at 8, 13, 18 and 23; lower case, so it renders back the same
    try:
        raw = bytes.fromhex(text.replace("-", ""))
    except ValueError:
        return None
    return raw if len(raw) == 16 else None


def _code(names: list[str], name: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        if len(names) >= 255:
            return names.index("") if "" in names else 0
        names.append(name)
        return len(names) - 1


def _epoch(text: Any) -> int:
    """Whole seconds since 1970 (kept in 4 bytes a machine); 0 when unknown."""
    if not isinstance(text, str) or not text:
        return 0
    try:
        seconds = int(parse_iso(text).timestamp())
    except ValueError:
        return 0
    return seconds if 0 < seconds < 2**32 else 0


def _iso(epoch: int) -> str:
    return iso(datetime.fromtimestamp(epoch, UTC)) if epoch else ""


# -- rendering ---------------------------------------------------------------------------------


def write(history: History, fmt: str, out: TextIO) -> None:
    """The history in ``fmt`` (one of :data:`FORMATS`) to ``out``."""
    if fmt == "csv":
        write_csv(out, RUN_COLUMNS, iter_rows(history))
    elif fmt == "jsonl":
        for row in iter_rows(history):
            out.write(orjson.dumps(row).decode() + "\n")
    elif fmt == "json":
        out.write(render_json(history))
    elif fmt == "markdown":
        out.write(render_markdown(history))
    elif fmt == "html":
        out.write(render_html(history))
    elif fmt == "table":
        out.write(render_table(history))
    else:
        raise UsageError(f"--format {fmt}: a history report is one of {', '.join(FORMATS)}")


def render(history: History, fmt: str) -> str:
    """:func:`write` to a string."""
    out = io.StringIO()
    write(history, fmt, out)
    return out.getvalue()


def render_json(history: History) -> str:
    """``runs`` (one object a run), ``totals``, ``per_night``, ``longest_not_final`` and
    ``in_several_runs`` (the first 2,000 of each; ``..._truncated`` says when there are
    more)."""
    totals = history.totals()
    longest = history.longest_not_final(_JSON_ROWS + 1)
    several = history.in_several_runs(_JSON_ROWS + 1)
    document = {
        "report_at": iso(history.now),
        "runs": [asdict(run) for run in history.runs],
        "totals": totals,
        "per_night": [{"night": n, "offboarded": c} for n, c in history.per_night()],
        "longest_not_final": longest[:_JSON_ROWS],
        "longest_not_final_truncated": len(longest) > _JSON_ROWS,
        "in_several_runs": several[:_JSON_ROWS],
        "in_several_runs_truncated": len(several) > _JSON_ROWS,
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n"


_TABLE_COLUMNS = (
    ("started", "started (UTC)", 18),
    ("tenant", "tenant", 22),
    ("source", "source", 24),
    ("offboarded", "offboarded", 11),
    ("already_pending", "pending", 9),
    ("failed", "failed", 7),
    ("cancelled", "cancelled", 10),
    ("not_final", "not final", 10),
    ("machines", "machines", 9),
)


def _count(number: int, word: str) -> str:
    return f"{number:,} {word}" + ("" if number == 1 else "s")


def _scope(totals: dict[str, Any]) -> str:
    """``4 runs over 3 nights, 2 tenants, 8 machines``."""
    return (
        f"{_count(totals['runs'], 'run')} over {_count(totals['nights'], 'night')}, "
        f"{_count(totals['tenants'], 'tenant')}, {_count(totals['machines'], 'machine')}"
    )


def _cell(value: Any, width: int) -> str:
    if isinstance(value, int):
        return f"{value:>{width},}"
    text = " ".join(_printable(value).split())
    text = text if len(text) < width else text[: width - 2] + "~"
    return f"{text:<{width}}"


def render_table(history: History) -> str:
    """For a terminal: a row a run, the totals, the longest not final, runs per machine."""
    totals = history.totals()
    lines = [
        f"history: {_scope(totals)}",
        "",
        "".join(_cell(label, width) for _, label, width in _TABLE_COLUMNS),
    ]
    for run in history.runs:
        cells = asdict(run) | {"started": run.started[:16].replace("T", " ")}
        lines.append("".join(_cell(cells[key], w) for key, _, w in _TABLE_COLUMNS))
    cells = totals | {"started": "total", "tenant": "(each machine once)", "source": ""}
    lines.append("".join(_cell(cells[key], w) for key, _, w in _TABLE_COLUMNS))
    lines.append(
        f"offboarded in several runs: {totals['offboarded_in_several_runs']:,}; in doubt: "
        f"{totals['in_doubt']:,}; other outcomes: {totals['other']:,}"
    )
    longest = history.longest_not_final()
    if longest:
        lines += ["", "still not final, offboarded longest ago:"]
        for item in longest:
            lines.append(
                f"  {item['machine_id']}  {item['action_status']:<10} since "
                f"{item['offboarded_at']}  ({item['days_not_final']:g} days)  "
                f"{_printable(item['tenant'])}  action {item['action_id']}"
            )
    several = history.in_several_runs()
    if several:
        lines += ["", "offboarded in several runs:"]
        for item in several:
            runs = ", ".join(f"{r['started'][:10]} {_printable(r['tenant'])}" for r in item["runs"])
            lines.append(f"  {item['machine_id']}  {len(item['runs'])} runs: {runs}")
    return "\n".join(lines) + "\n"


def render_markdown(history: History) -> str:
    """A Markdown document: the runs, the totals, the longest not final, machines in several
    runs. Every journaled value is escaped (:func:`bulkoffboard.reports._md`)."""
    totals = history.totals()
    keys = [k for k, _, _ in _TABLE_COLUMNS]
    lines = [
        "# bulkoffboard history",
        "",
        f"{_scope(totals)} (report at {iso(history.now)}).",
        "",
        "| " + " | ".join(label for _, label, _ in _TABLE_COLUMNS) + " |",
        "|---|---|---" + "|---:" * (len(keys) - 3) + "|",
    ]
    for run in history.runs:
        cells = [getattr(run, k) for k in keys]
        lines.append("| " + " | ".join(_md_cell(v) for v in cells) + " |")
    total_cells = ["**total (each machine once)**", "", ""] + [
        f"**{totals[k]:,}**" for k in keys[3:]
    ]
    lines.append("| " + " | ".join(total_cells) + " |")
    lines += [
        "",
        f"Offboarded in several runs: {totals['offboarded_in_several_runs']:,}. In doubt: "
        f"{totals['in_doubt']:,}. Other outcomes: {totals['other']:,}.",
    ]
    longest = history.longest_not_final()
    if longest:
        lines += [
            "",
            "## Still not final, offboarded longest ago",
            "",
            "| machine | status | offboarded | days | tenant | action |",
            "|---|---|---|---:|---|---|",
        ]
        for item in longest:
            lines.append(
                f"| `{_md(item['machine_id'])}` | {_md(item['action_status'])} | "
                f"{_md(item['offboarded_at'])} | {item['days_not_final']:g} | "
                f"{_md(item['tenant'])} | {_md(item['action_id'])} |"
            )
    several = history.in_several_runs()
    if several:
        lines += ["", "## Offboarded in several runs", "", "| machine | runs |", "|---|---|"]
        for item in several:
            runs = "; ".join(f"{r['started'][:10]} {r['tenant']}" for r in item["runs"])
            lines.append(f"| `{_md(item['machine_id'])}` | {_md(runs)} |")
    return "\n".join(lines) + "\n"


def _md_cell(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else _md(value)


# The chart of offboards per night (inline SVG; the page has no script).
_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 720, 200, 56, 12, 14, 30


def svg_per_night(nights: Sequence[tuple[str, int]]) -> str:
    """Bars of machines offboarded per night (one ``rect class="bar"`` a night)."""
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM
    peak = max((n for _, n in nights), default=0)
    top = max(peak, 1) * 1.1
    width = plot_w / max(len(nights), 1)
    label = "machines offboarded per night"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
        f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{label}" class="nights">',
        f"<title>{label}</title>",
        f'<line class="axis" x1="{_LEFT}" y1="{_TOP + plot_h}" x2="{_W - _RIGHT}" '
        f'y2="{_TOP + plot_h}"/>',
    ]
    for index, (night, count) in enumerate(nights):
        height = count / top * plot_h
        x = _LEFT + index * width
        parts.append(
            f'<rect class="bar" x="{x:.2f}" y="{_TOP + plot_h - height:.2f}" '
            f'width="{max(width - 0.4, 0.6):.2f}" height="{height:.2f}">'
            f"<title>{_h(night)}: {count:,} offboarded</title></rect>"
        )
    parts += [
        f'<text x="{_LEFT - 6}" y="{_TOP + 4}" text-anchor="end">{peak:,}</text>',
        f'<text x="{_LEFT - 6}" y="{_TOP + plot_h + 4}" text-anchor="end">0</text>',
    ]
    if nights:
        parts += [
            f'<text x="{_LEFT}" y="{_H - 8}">{_h(nights[0][0])}</text>',
            f'<text x="{_W - _RIGHT}" y="{_H - 8}" text-anchor="end">{_h(nights[-1][0])}</text>',
        ]
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(history: History) -> str:
    """A self-contained page (inline CSS and SVG, no script, nothing fetched): offboards per
    night, the runs and totals, the longest not final, machines in several runs."""
    totals = history.totals()
    keys = [k for k, _, _ in _TABLE_COLUMNS]
    numeric = set(keys[3:])
    body = [
        "<h1>bulkoffboard history</h1>",
        f'<p class="muted">{_scope(totals)}; report at {_h(iso(history.now))}</p>',
        "<h2>Offboarded per night</h2>",
        svg_per_night(history.per_night()),
        "<h2>Runs</h2>",
        _html_table(
            [("n" if k in numeric else "", _h(label)) for k, label, _ in _TABLE_COLUMNS],
            [
                *(
                    [
                        ("n", f"{getattr(run, k):,}") if k in numeric else ("", _h(getattr(run, k)))
                        for k in keys
                    ]
                    for run in history.runs
                ),
                [("", "total (each machine once)"), ("", ""), ("", "")]
                + [("n", f"{totals[k]:,}") for k in keys[3:]],
            ],
            total=True,
        ),
        f'<p class="muted">offboarded in several runs: {totals["offboarded_in_several_runs"]:,}'
        f"; in doubt: {totals['in_doubt']:,}; other outcomes: {totals['other']:,}</p>",
    ]
    longest = history.longest_not_final()
    if longest:
        body += [
            "<h2>Still not final, offboarded longest ago</h2>",
            _html_table(
                [
                    ("", "machine"),
                    ("", "status"),
                    ("", "offboarded"),
                    ("n", "days"),
                    ("", "tenant"),
                    ("", "action"),
                ],
                (
                    [
                        ("id", _h(item["machine_id"])),
                        (_h(item["action_status"]), _h(item["action_status"])),
                        ("", _h(item["offboarded_at"])),
                        ("n", f"{item['days_not_final']:g}"),
                        ("", _h(item["tenant"])),
                        ("id", _h(item["action_id"])),
                    ]
                    for item in longest
                ),
            ),
        ]
    several = history.in_several_runs()
    if several:
        body += [
            "<h2>Offboarded in several runs</h2>",
            _html_table(
                [("", "machine"), ("", "runs")],
                (
                    [
                        ("id", _h(item["machine_id"])),
                        (
                            "",
                            _h(
                                "; ".join(
                                    f"{r['started'][:10]} {r['tenant']}" for r in item["runs"]
                                )
                            ),
                        ),
                    ]
                    for item in several
                ),
            ),
        ]
    return _html_page("bulkoffboard history", body)


def report(
    journals: Sequence[str] = (),
    journal_dir: str | Path | None = None,
    fmt: str = "table",
    *,
    now: datetime | None = None,
) -> str:
    """The history of the journals found (:func:`find_journals`) in ``fmt``."""
    out = io.StringIO()
    write_report(journals, journal_dir, fmt, out, now=now)
    return out.getvalue()


def write_report(
    journals: Sequence[str],
    journal_dir: str | Path | None,
    fmt: str,
    out: TextIO,
    *,
    now: datetime | None = None,
) -> None:
    """:func:`report` written to ``out``."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: a history report is one of {', '.join(FORMATS)}")
    paths = find_journals(journals, journal_dir, required=True)
    write(build(paths, now), fmt, out)


def iter_rows(history: History) -> Iterator[dict[str, Any]]:
    """The runs as dicts with :data:`RUN_COLUMNS` (what CSV and JSON Lines write)."""
    for run in history.runs:
        yield asdict(run)


__all__ = [
    "FORMATS",
    "RUN_COLUMNS",
    "History",
    "RunRow",
    "build",
    "find_journals",
    "iter_rows",
    "render",
    "report",
    "source_text",
    "svg_per_night",
    "write",
    "write_report",
]
