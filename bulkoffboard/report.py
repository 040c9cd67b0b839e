"""Reports: pure functions of a journal replay (table, CSV, JSON). Nothing here prints."""

from __future__ import annotations

import collections
import csv
import io
from collections.abc import Iterator
from typing import Any

import orjson

from bulkoffboard.journal import Replay
from bulkoffboard.models import Outcome

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
)


def counts(replay: Replay) -> dict[str, int]:
    """Outcome -> number of machines (the last result of each machine counts)."""
    tally: collections.Counter[str] = collections.Counter(
        str(r.get("outcome")) for r in replay.results()
    )
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
    return {
        "run": identity(replay),
        "counts": tally,
        "total": sum(tally.values()),
        "in_doubt": len(replay.in_doubt()),
        "sessions": replay.sessions,
    }


def render_json(replay: Replay) -> str:
    """One JSON object."""
    return orjson.dumps(summary(replay), option=orjson.OPT_INDENT_2).decode() + "\n"


def rows(replay: Replay) -> Iterator[dict[str, Any]]:
    """One row a machine with :data:`CSV_COLUMNS`, in journal order."""
    for result in replay.results():
        yield {
            "machine_id": result.get("machine_id") or "",
            "outcome": result.get("outcome"),
            "action_id": result.get("action_id") or "",
            "action_status": result.get("action_status") or "",
            "error_code": result.get("error_code") or "",
            "attempts": result.get("attempts", 0),
            "updated_at": result.get("at") or "",
            "http_status": result.get("http_status") or "",
            "message": result.get("message") or "",
            "where": result.get("where") or "",
            "input": result.get("input") or "",
        }
    for machine_id in replay.in_doubt():
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
        }


def render_csv(replay: Replay) -> str:
    """CSV with a header row; one row a machine."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows(replay):
        writer.writerow(row)
    return out.getvalue()


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
    attention = [r for r in rows(replay) if r["outcome"] in ("failed", "forbidden", "in_doubt")]
    if attention:
        lines += ["", "needs attention:"]
        for row in attention[:20]:
            lines.append(
                f"  {row['machine_id'] or row['where']}  {row['outcome']}  {row['message']}"
            )
        if len(attention) > 20:
            lines.append(f"  ... and {len(attention) - 20} more (see --format csv)")
    return "\n".join(lines) + "\n"


RENDERERS = {"table": render_table, "csv": render_csv, "json": render_json}
