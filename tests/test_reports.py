"""Reports: every format, action statuses, the call timeline, escaping, the summary file."""

from __future__ import annotations

import csv
import html.parser
import io
import os
import re
import stat
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from bulkoffboard import reports as report
from bulkoffboard.journal import FORMAT_VERSION, TOOL, Journal, Replay, iso, replay_file
from bulkoffboard.runner import Summary
from bulkoffboard.throttle import DEFAULT_LIMITS, Limit

START = datetime(2026, 11, 28, 2, 30, tzinfo=UTC)
HOSTILE_INPUT = "<script>alert('x')</script>"
HOSTILE_MESSAGE = (
    'HTTP 500 <img src="https://evil.example/x.png" onerror="alert(1)"> | **bold** '
    "[a](javascript:alert(1))"
)
M = [f"{i:040x}" for i in range(1, 12)]


def at(seconds: float) -> str:
    return iso(START + timedelta(seconds=seconds))


def header(**extra: Any) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "tool": TOOL,
        "tool_version": "0.1.0",
        "run_id": "run-<b>1</b>",
        "created_at": at(0),
        "source": {"kind": "file", "path": "/srv/<stale>.txt", "format": "text"},
        "comment": "CHG0042 & <retire>",
        "limits": [[100, 60.0], [1500, 3600.0]],
        "workers": 8,
        "api_url": "https://api.security.microsoft.com",
        "tenant_id": "t",
        "client_id": "c",
    } | extra


def result(machine_id: str | None, outcome: str, seconds: float, **fields: Any) -> dict[str, Any]:
    return {
        "type": "result",
        "machine_id": machine_id,
        "outcome": outcome,
        "action_id": None,
        "action_status": None,
        "http_status": None,
        "error_code": None,
        "message": None,
        "attempts": 1,
        "at": at(seconds),
    } | fields


def status(machine_id: str, action_id: str, action_status: str, seconds: float) -> dict[str, Any]:
    return {
        "type": "status",
        "machine_id": machine_id,
        "action_id": action_id,
        "action_status": action_status,
        "at": at(seconds),
    }


def attempt(machine_id: str, seconds: float, number: int = 1) -> dict[str, Any]:
    return {"type": "attempt", "machine_id": machine_id, "attempt": number, "at": at(seconds)}


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    """A run with every outcome, verify statuses, hostile text and two sessions days apart."""
    path = tmp_path / "run.jsonl"
    journal = Journal.create(path, header())
    journal.append({"type": "session", "at": at(0), "pid": 1, "command": "run"})
    for index, machine_id in enumerate(M[:9]):
        journal.append(attempt(machine_id, 1 + index))
    journal.append(result(M[0], "offboarded", 10, action_id="a0", action_status="Pending"))
    journal.append(result(M[1], "offboarded", 10, action_id="a1", action_status="Pending"))
    journal.append(result(M[2], "offboarded", 10, action_id="a2", action_status="Pending"))
    journal.append(result(M[3], "already_pending", 10, action_id="a3", action_status="InProgress"))
    journal.append(result(M[4], "not_found", 10, http_status=404, error_code="ResourceNotFound"))
    journal.append(result(M[5], "failed", 10, http_status=500, message=HOSTILE_MESSAGE))
    journal.append(result(M[6], "forbidden", 10, http_status=403, message="no Machine.Offboard"))
    journal.append(result(M[7], "unsupported", 10, error_code="OsPlatformNotSupported"))
    # M[8]: sent, never answered: in doubt.
    journal.append(
        result(None, "invalid_id", 11, where="ids.txt:3", input=HOSTILE_INPUT, message="bad id")
    )
    journal.append(
        result(None, "invalid_id", 11, where="ids.txt:4", input="ctl\x00\x1b[31m\x7f", message="x")
    )
    journal.append({"type": "end", "at": at(12), "exit_code": 1})
    # Two days later: verify.
    later = 2 * 86400
    journal.append(status(M[0], "a0", "Succeeded", later))
    journal.append(status(M[1], "a1", "Pending", later))
    journal.append(status(M[1], "a1", "TimeOut", later + 60))
    journal.append(status(M[2], "old-action", "Failed", later))  # another action: ignored
    journal.close()
    return path


def test_every_format_renders_and_the_new_ones_are_registered(journal_path: Path) -> None:
    replay = replay_file(journal_path)
    assert {"table", "csv", "json", "markdown", "html"} <= set(report.RENDERERS)
    for name, renderer in report.RENDERERS.items():
        text = renderer(replay)
        assert text.endswith("\n"), name
        assert M[5] in text or name == "json", name
        assert report.render_file(journal_path, name).endswith("\n")
    assert orjson.loads(report.render_json(replay))["total"] == 10


def test_action_statuses_come_from_status_records_else_from_the_result(
    journal_path: Path,
) -> None:
    replay = replay_file(journal_path)
    assert report.action_statuses(replay) == {
        "Pending": 1,  # M[2]: its status record names another action
        "InProgress": 1,  # M[3]: the result's own status
        "Succeeded": 1,
        "TimeOut": 1,  # M[1]: the latest of its records
    }
    data = report.summary_with_actions(replay)
    assert data["action_statuses"]["TimeOut"] == 1
    assert data["attention"] == 4


def test_attention_lists_failed_forbidden_in_doubt_and_timed_out(journal_path: Path) -> None:
    rows = report.attention(replay_file(journal_path))
    assert {(r["machine_id"], r["outcome"]) for r in rows} == {
        (M[5], "failed"),
        (M[6], "forbidden"),
        (M[8], "in_doubt"),
        (M[1], "offboarded"),
    }
    timed_out = next(r for r in rows if r["machine_id"] == M[1])
    assert timed_out["action_status"] == "TimeOut"
    assert timed_out["seen_at"] == at(2 * 86400 + 60)


def test_every_format_shows_the_latest_known_action_status_of_each_machine(
    journal_path: Path,
) -> None:
    """verify's status records win over the result's status in every format, with when they
    were seen; a status record about another action does not (issue 12: the CSV kept showing
    the result's Pending after verify saw Succeeded)."""
    replay = replay_file(journal_path)
    later = 2 * 86400
    expected = {
        M[0]: ("a0", "Succeeded", at(later)),
        M[1]: ("a1", "TimeOut", at(later + 60)),
        M[2]: ("a2", "Pending", at(10)),  # its status record names another action
        M[3]: ("a3", "InProgress", at(10)),  # never verified: the result's own status
    }
    csv_rows = {
        r["machine_id"]: r
        for r in csv.DictReader(io.StringIO(report.render_csv(replay), newline=""))
    }
    jsonl_rows = {
        r["machine_id"]: r for r in map(orjson.loads, report.render_jsonl(replay).splitlines())
    }
    for machine_id, (action_id, status_, seen) in expected.items():
        for row in (csv_rows[machine_id], jsonl_rows[machine_id]):
            assert (row["action_id"], row["action_status"], row["action_status_at"]) == (
                action_id,
                status_,
                seen,
            ), machine_id
    assert set(csv_rows) == set(jsonl_rows)
    assert {k: str(v) for k, v in jsonl_rows[M[5]].items()} == csv_rows[M[5]]
    data = orjson.loads(report.render_json(replay))
    timed_out = next(r for r in data["attention_machines"] if r["machine_id"] == M[1])
    assert (timed_out["action_status"], timed_out["seen_at"]) == ("TimeOut", at(later + 60))
    assert data["attention"] == len(data["attention_machines"]) == 4
    assert not data["attention_machines_truncated"]
    table = report.render_table(replay)
    assert re.search(r"^Succeeded\s+1$", table, re.MULTILINE), table
    assert re.search(r"^TimeOut\s+1$", table, re.MULTILINE), table
    assert f"{M[1]}  offboarded  the offboard action ended TimeOut" in table
    for fmt in ("markdown", "html"):
        assert "Succeeded" in report.RENDERERS[fmt](replay)


def test_a_machine_sent_again_after_a_result_is_one_row_in_doubt(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    journal = Journal.create(path, header())
    journal.append(attempt(M[0], 1))
    journal.append(result(M[0], "failed", 2, http_status=500))
    journal.append(attempt(M[0], 3, number=2))  # resumed, then killed before the answer
    journal.close()
    rendered = list(csv.DictReader(io.StringIO(report.render_csv(replay_file(path)))))
    assert [(r["machine_id"], r["outcome"], r["attempts"]) for r in rendered] == [
        (M[0], "in_doubt", "2")
    ]


class _Audit(html.parser.HTMLParser):
    """Collects what would make a page unsafe or not self-contained."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag in ("script", "iframe", "object", "embed", "link", "img", "image"):
            self.problems.append(f"<{tag}>")
        for name, value in attrs:
            if name.startswith("on"):
                self.problems.append(f"{tag} {name}=")
            if name in ("src", "href", "xlink:href", "action") and value is not None:
                self.problems.append(f"{tag} {name}={value}")
            if value and "url(" in value:
                self.problems.append(f"{tag} {name} url()")


def test_the_html_page_is_well_formed_self_contained_and_escapes_everything(
    journal_path: Path,
) -> None:
    page = report.render_file(journal_path, "html")

    root = ET.fromstring(  # noqa: S314 - our own output
        page.removeprefix("<!DOCTYPE html>\n")
    )  # well-formed XML too
    assert root.tag == "html"
    assert root.find("body") is not None
    assert len(root.findall(".//{http://www.w3.org/2000/svg}svg")) == 2
    audit = _Audit()
    audit.feed(page)
    audit.close()
    assert audit.problems == []
    assert "script" not in audit.tags
    assert "<style>" in page  # inline CSS
    assert "@import" not in page and "url(" not in page
    # Hostile values show as text.
    assert HOSTILE_INPUT not in page and "&lt;script&gt;" in page
    assert "<img" not in page and "&lt;img src=&quot;https://evil.example" in page
    assert "run-&lt;b&gt;1&lt;/b&gt;" in page and "CHG0042 &amp; &lt;retire&gt;" in page
    assert "\x00" not in page and "\x1b" not in page and "ctl\\x00\\x1b[31m\\x7f" in page
    text = "".join(root.itertext())
    assert HOSTILE_INPUT in text  # what a reader sees is the value itself
    for section in (
        "Outcomes",
        "Offboard actions",
        "Offboard calls",
        "Needs attention (4)",
        "Rejected input (2)",
    ):
        assert section in text


def test_the_markdown_report_escapes_html_and_markdown(journal_path: Path) -> None:
    text = report.render_file(journal_path, "markdown")

    assert "<script" not in text and "<img" not in text
    assert "&lt;script&gt;alert('x')&lt;/script&gt;" in text
    assert "**bold**" not in text and "\\*\\*bold\\*\\*" in text
    assert "\\[a\\](javascript:alert(1))" in text
    assert "| failed |" in text and "| TimeOut |" in text
    attention_rows = [
        line
        for line in text.split("## Needs attention (4)")[1].split("## ")[0].splitlines()
        if line.startswith("| ")
    ]
    columns = {len(re.findall(r"(?<!\\)\|", line)) for line in attention_rows}
    assert len(columns) == 1, "a hostile | must not add a column"
    assert "busiest minute: 9 calls" in text and "limit 100 a minute" in text


def write_attempts(path: Path, sends: list[float], **extra: Any) -> None:
    journal = Journal.create(path, header(**extra))
    for number, seconds in enumerate(sends):
        journal.append(attempt(M[number % len(M)], seconds, number + 1))
    journal.close()


def test_the_timeline_counts_calls_per_minute_and_collapses_long_quiet_stretches(
    tmp_path: Path,
) -> None:
    sends = [i * 0.5 for i in range(120)]  # 120 calls in the first minute: over the limit
    sends += [60 + i for i in range(30)]  # 30 in the second
    sends += [3 * 86400 + 5.0] * 4  # three days later
    path = tmp_path / "j.jsonl"
    write_attempts(path, sends)

    timeline = report.timeline_from_file(path)

    first = int(START.timestamp() // 60)
    assert timeline.per_minute == ((first, 120), (first + 1, 30), (first + 3 * 1440, 4))
    assert timeline.total == 154 and not timeline.partial
    assert report.timeline_from_replay(replay_file(path)) == timeline
    page = report.render_html(replay_file(path), timeline=timeline)
    assert 'class="over"' in page  # the 120-call minute is drawn over the 100 line
    assert "limit 100" in page and "limit 1,500" in page
    assert "4 d" not in page and "2 d 23 h" in page  # one gap column for the quiet days
    ET.fromstring(  # noqa: S314 - our own output
        page.removeprefix("<!DOCTYPE html>\n")
    )


def test_the_replay_keeps_10000_sends_so_the_file_pass_gives_the_whole_timeline(
    tmp_path: Path,
) -> None:
    sends = [i * 0.2 for i in range(12_000)]
    path = tmp_path / "j.jsonl"
    write_attempts(path, sends)

    partial = report.timeline_from_replay(replay_file(path))
    full = report.timeline_from_file(path)

    assert partial.partial and partial.total == 10_000
    assert full.total == 12_000 and not full.partial
    assert "only the latest 10,000 calls" in report.render_markdown(replay_file(path))
    assert "12,000 calls" in report.render_file(path, "markdown")


def test_span_caps_follow_the_recorded_limits() -> None:
    assert report.span_cap(DEFAULT_LIMITS, 60) == 100
    assert report.span_cap(DEFAULT_LIMITS, 3600) == 1500
    scaled = (Limit(100, 0.6), Limit(1500, 36.0))
    assert report.span_cap(scaled, 60) == 3000


def test_a_journal_without_calls_renders_plainly(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    Journal.create(path, header()).close()
    replay = replay_file(path)
    assert "no offboard calls recorded" in report.render_markdown(replay)
    page = report.render_html(replay)
    ET.fromstring(  # noqa: S314 - our own output
        page.removeprefix("<!DOCTYPE html>\n")
    )
    assert "<svg" not in page and "Nothing." in page


def test_summary_json_is_written_atomically_and_replaces_the_old_file(tmp_path: Path) -> None:
    summary = Summary()
    summary.counts["offboarded"] += 3
    summary.calls, summary.throttled = 5, 1
    target = tmp_path / "run.summary.json"
    target.write_text("old")

    written = report.summary_json(
        summary.as_dict(), target, command="run", journal=tmp_path / "run.jsonl"
    )

    data = orjson.loads(target.read_bytes())
    assert data == written
    assert data["command"] == "run" and data["journal"] == str(tmp_path / "run.jsonl")
    assert data["counts"] == {"offboarded": 3}
    assert (data["offboard_calls"], data["throttled_429"], data["exit_code"]) == (5, 1, 0)
    assert "duration_s" in data and data["tool"] == "bulkoffboard"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.summary.json"]  # no temp left
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600


def test_summary_json_leaves_nothing_behind_when_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        report.summary_json({}, tmp_path / "missing-dir" / "s.json", command="verify")
    target = tmp_path / "dir-in-the-way"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        report.summary_json({}, target, command="verify")
    assert [p.name for p in tmp_path.iterdir()] == ["dir-in-the-way"]


def test_reports_are_pure_functions_of_the_replay(journal_path: Path) -> None:
    replay: Replay = replay_file(journal_path)
    timeline = report.timeline_from_file(journal_path)
    first = report.render_html(replay, timeline=timeline)
    assert report.render_html(replay, timeline=timeline) == first
    assert report.render_markdown(replay, timeline=timeline) == report.render_markdown(
        replay_file(journal_path), timeline=timeline
    )


@pytest.mark.parametrize(
    "cell", ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"]
)
def test_csv_cells_a_spreadsheet_would_run_as_formulas_are_prefixed(
    tmp_path: Path, cell: str
) -> None:
    path = tmp_path / "run.jsonl"
    journal = Journal.create(path, header())
    journal.append(result(None, "invalid_id", 1, where="ids.txt:1", input=cell, message=cell))
    journal.append(result(M[0], "offboarded", 2, action_id="a0", message="plain"))
    journal.close()
    rendered = list(csv.DictReader(io.StringIO(report.render_csv(replay_file(path)), newline="")))
    assert rendered[0]["input"] == "'" + cell
    assert rendered[0]["message"] == "'" + cell
    assert rendered[1]["message"] == "plain"
    assert rendered[1]["attempts"] == "1"


@pytest.mark.parametrize("fmt", sorted(report.RENDERERS))
def test_write_file_writes_what_render_file_renders(journal_path: Path, fmt: str) -> None:
    out = io.StringIO(newline="")
    report.write_file(journal_path, fmt, out)
    assert out.getvalue() == report.render_file(journal_path, fmt)
