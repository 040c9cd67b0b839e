"""History across nights and tenants: ``report --journals GLOB...`` and ``--journal-dir DIR``.

Three nights of journals (the last a tenants run directory) with machines that come back,
fail, wait on someone else's action, are verified, and are cancelled: every figure below is
worked out by hand from the records written here.
"""

from __future__ import annotations

import csv
import io
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from bulkoffboard import history
from bulkoffboard.cli import main
from bulkoffboard.journal import FORMAT_VERSION, TOOL, Journal, iso

M = [f"{i:040x}" for i in range(1, 10)]
NIGHT = [datetime(2026, 11, n, 2, 0, tzinfo=UTC) for n in (1, 2, 3)]
NOW = datetime(2026, 12, 1, tzinfo=UTC)
A = [f"00000000-0000-4000-8000-{i:012d}" for i in range(20)]
HOSTILE = "<script>alert(1)</script>|**x**"


def at(night: int, seconds: float = 0.0) -> str:
    return iso(NIGHT[night] + timedelta(seconds=seconds))


def header(night: int, run_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "tool": TOOL,
        "tool_version": "0.1.0",
        "run_id": run_id,
        "created_at": at(night),
        "source": {"kind": "file", "path": f"/srv/stale-{night}.txt", "format": "text"},
        "comment": "CHG0042",
        "limits": [[100, 60.0], [1500, 3600.0]],
        "workers": 8,
        "api_url": "https://api.security.microsoft.com",
        "tenant_id": "11111111-1111-4111-8111-111111111111",
        "client_id": "c",
    } | extra


def result(night: int, machine_id: str, outcome: str, **fields: Any) -> dict[str, Any]:
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
        "at": at(night, 10),
    } | fields


def offboarded(night: int, machine_id: str, action: str, **fields: Any) -> dict[str, Any]:
    return (
        result(night, machine_id, "offboarded", action_id=action, action_status="Pending")
        | {"http_status": 201}
        | fields
    )


def status(night: int, machine_id: str, action: str, value: str, hours: float) -> dict[str, Any]:
    return {
        "type": "status",
        "machine_id": machine_id,
        "action_id": action,
        "action_status": value,
        "at": at(night, hours * 3600),
    }


def write(path: Path, head: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    journal = Journal.create(path, head)
    journal.append({"type": "session", "at": head["created_at"], "pid": 1, "command": "run"})
    for record in records:
        journal.append(record)
    journal.append({"type": "end", "at": head["created_at"], "exit_code": 0})
    journal.close()
    return path


@pytest.fixture
def nights(tmp_path: Path) -> Path:
    """``journals/`` with three nights; the last is a run directory of two tenants."""
    root = tmp_path / "journals"
    write(
        root / "2026-11-01.jsonl",
        header(0, "night-1"),
        [
            offboarded(0, M[0], A[0]),
            offboarded(0, M[1], A[1]),
            result(0, M[2], "failed", http_status=500, message="HTTP 500"),
            result(0, M[3], "already_pending", action_id=A[3], action_status="InProgress"),
            offboarded(0, M[4], A[4]),
            # verify, an hour later
            status(0, M[1], A[1], "Succeeded", 1),
            status(0, M[0], A[0], "Pending", 1),
            # cancel withdraws M4's offboard
            {
                "type": "cancel",
                "stage": "attempt",
                "machine_id": M[4],
                "action_id": A[4],
                "attempt": 1,
                "at": at(0, 7200),
            },
            {
                "type": "cancel",
                "stage": "result",
                "machine_id": M[4],
                "action_id": A[4],
                "outcome": "cancelled",
                "action_status": "Cancelled",
                "http_status": 200,
                "message": None,
                "at": at(0, 7201),
            },
        ],
    )
    write(
        root / "2026-11-02.jsonl",
        header(1, "night-2"),
        [
            offboarded(1, M[0], A[10]),  # came back: offboarded a second time
            offboarded(1, M[2], A[2]),
            result(1, M[5], "failed", http_status=503, message="HTTP 503"),
            status(1, M[2], A[2], "InProgress", 2),
        ],
    )
    run_dir = root / "2026-11-03"
    write(
        run_dir / "contoso.jsonl",
        header(2, "night-3-contoso", tenant_name="contoso", run_dir=str(run_dir)),
        [result(2, M[3], "already_pending", action_id=A[3], action_status="InProgress")],
    )
    write(
        run_dir / "fabrikam.jsonl",
        header(
            2,
            "night-3-fabrikam",
            tenant_name=HOSTILE,
            run_dir=str(run_dir),
            tenant_id="22222222-2222-4222-8222-222222222222",
            source={
                "kind": "query",
                "path": "/x.targets",
                "format": "text",
                "filter": "a eq 'b'",
                "resolved": 2,
                "sha256": "0" * 64,
            },
        ),
        [
            offboarded(2, M[6], A[6]),
            result(2, M[7], "not_found", http_status=404, error_code="ResourceNotFound"),
        ],
    )
    (run_dir / "tenants.toml").write_text("[defaults]\n", encoding="utf-8")
    (root / "notes.jsonl").write_text('{"not": "a journal"}\n', encoding="utf-8")
    (root / "summary.json").write_text("{}", encoding="utf-8")
    return root


def test_a_history_counts_each_machine_once_with_runs_in_night_order(nights: Path) -> None:
    found = history.find_journals(journal_dir=nights)
    assert nights / "notes.jsonl" not in found and len(found) == 4
    made = history.build(reversed(found), now=NOW)  # the order of the paths does not matter
    assert [r.run_id for r in made.runs][:2] == ["night-1", "night-2"]
    by_run = {r.run_id: r for r in made.runs}
    one = by_run["night-1"]
    assert (one.offboarded, one.already_pending, one.failed, one.cancelled) == (3, 1, 1, 1)
    # M0 Pending (verified), M3 InProgress; M1 Succeeded and M4 Cancelled are final.
    assert one.not_final == 2 and one.machines == 5 and one.tenant == one.tenant_id
    assert one.source == "file stale-0.txt"
    two = by_run["night-2"]
    assert (two.offboarded, two.failed, two.not_final, two.machines) == (2, 1, 2, 3)
    fabrikam = by_run["night-3-fabrikam"]
    assert fabrikam.tenant == HOSTILE and fabrikam.source == "query a eq 'b'"
    assert (fabrikam.offboarded, fabrikam.not_final, fabrikam.machines) == (1, 1, 2)

    totals = made.totals()
    assert totals["runs"] == 4 and totals["nights"] == 3 and totals["tenants"] == 2
    assert totals["machines"] == 8
    # M0 (twice), M1, M2, M4, M6: each once.
    assert totals["offboarded"] == 5 and totals["offboarded_in_several_runs"] == 1
    assert totals["already_pending"] == 1  # M3: someone else's action, never ours
    assert totals["failed"] == 1  # M5 failed last; M2 failed first, then was offboarded
    assert totals["cancelled"] == 1 and totals["other"] == 1  # M7 not found
    # Latest known status: M0 Pending (night 2's action), M2 InProgress, M3 InProgress, M6
    # Pending; M1 Succeeded, M4 Cancelled.
    assert totals["not_final"] == 4
    assert totals["action_statuses"] == {
        "Pending": 2,
        "Succeeded": 1,
        "InProgress": 2,
        "Cancelled": 1,
    }


def test_the_longest_not_final_are_ours_oldest_first_with_their_latest_action(
    nights: Path,
) -> None:
    made = history.build(history.find_journals(journal_dir=nights), now=NOW)
    longest = made.longest_not_final()
    assert [item["machine_id"] for item in longest] == [M[0], M[2], M[6]]  # M3 is not ours
    first = longest[0]
    assert first["action_id"] == A[10] and first["action_status"] == "Pending"
    assert first["offboarded_at"] == at(0, 10) and first["run_id"] == "night-1"
    assert first["days_not_final"] == pytest.approx(29.9, abs=0.05)
    assert longest[1]["action_status"] == "InProgress"
    assert made.longest_not_final(limit=1) == longest[:1]
    several = made.in_several_runs()
    assert several == [
        {
            "machine_id": M[0],
            "runs": [
                {"run_id": "night-1", "started": at(0), "tenant": header(0, "x")["tenant_id"]},
                {"run_id": "night-2", "started": at(1), "tenant": header(1, "x")["tenant_id"]},
            ],
        }
    ]
    assert made.per_night() == [("2026-11-01", 3), ("2026-11-02", 2), ("2026-11-03", 1)]


def test_every_format_renders_the_history(nights: Path) -> None:
    made = history.build(history.find_journals(journal_dir=nights), now=NOW)
    rows = list(csv.DictReader(io.StringIO(history.render(made, "csv"))))
    assert [r["run_id"] for r in rows] == [
        "night-1",
        "night-2",
        "night-3-contoso",
        "night-3-fabrikam",
    ]
    assert tuple(rows[0]) == history.RUN_COLUMNS and rows[0]["offboarded"] == "3"
    lines = history.render(made, "jsonl").splitlines()
    assert [orjson.loads(line)["not_final"] for line in lines] == [2, 2, 1, 1]
    document = orjson.loads(history.render(made, "json"))
    assert document["totals"]["offboarded"] == 5 and len(document["runs"]) == 4
    assert document["longest_not_final"][0]["machine_id"] == M[0]
    assert document["in_several_runs"][0]["machine_id"] == M[0]
    assert document["per_night"][0] == {"night": "2026-11-01", "offboarded": 3}
    assert not document["longest_not_final_truncated"]
    table = history.render(made, "table")
    assert "4 runs over 3 nights, 2 tenants, 8 machines" in table
    assert M[0] in table and "29.9 days" in table
    markdown = history.render(made, "markdown")
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown
    assert "\\*\\*x\\*\\*" in markdown


def test_the_html_history_is_self_contained_with_a_bar_a_night(nights: Path) -> None:
    page = history.render(history.build(history.find_journals(journal_dir=nights)), "html")
    assert "<script" not in page.replace("&lt;script", "") and "http://" not in page.replace(
        "http://www.w3.org/2000/svg", ""
    )
    tree = ET.fromstring(page.removeprefix("<!DOCTYPE html>\n"))  # noqa: S314 - our page
    svg = "{http://www.w3.org/2000/svg}"
    bars = [r for r in tree.iter(f"{svg}rect") if r.get("class") == "bar"]
    assert len(bars) == 3
    assert bars[0].findtext(f"{svg}title") == "2026-11-01: 3 offboarded"


def test_the_command_line_reports_a_journal_dir_and_globs(
    nights: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "--journal-dir", str(nights), "--format", "json"]) == 0
    document = orjson.loads(capsys.readouterr().out)
    assert document["totals"]["runs"] == 4
    pattern = str(nights / "**" / "*.jsonl")
    assert main(["report", "--journals", pattern, "--format", "csv"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 5  # the header, four runs (notes.jsonl is no journal)
    # Paths the shell expanded already, and a glob, together.
    assert (
        main(["report", "--journals", str(nights / "2026-11-01.jsonl"), str(nights / "*.jsonl")])
        == 0
    )
    assert "2 runs over 2 nights" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--journals", "/nonexistent/*.jsonl"], "--journals /nonexistent/*.jsonl: no journal"),
        (["--journal-dir", "/nonexistent"], "--journal-dir /nonexistent: not a folder"),
        (["--journal-dir", "{empty}"], "no journal in it"),
        (["--journal-dir", "{root}", "--journal", "x.jsonl"], "leave out --journal"),
        (["--journals", "{root}/notes.jsonl"], "notes.jsonl"),
    ],
)
def test_bad_history_arguments_are_one_line_errors(
    nights: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [a.format(root=nights, empty=empty) for a in argv]
    assert main(["report", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err


def test_a_year_of_journals_keeps_one_replay_open_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streaming: each journal's replay is closed before the next is read."""
    for night in range(30):
        day = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=night)
        head = header(0, f"n{night}") | {"created_at": iso(day)}
        ids = [f"{night * 100 + i:040x}" for i in range(50)]
        write(
            tmp_path / f"{night:03d}.jsonl",
            head,
            [
                result(0, m, "offboarded", action_id=A[1], action_status="Pending", at=iso(day))
                for m in ids
            ],
        )
    from bulkoffboard import journal as journal_module

    open_now: list[Any] = []
    most = [0]
    real = journal_module.replay_file

    def counting(path: Path, **options: Any) -> Any:
        replay = real(path, **options)
        open_now.append(replay)
        most[0] = max(most[0], len(open_now))
        closing = replay.close

        def close() -> None:  # again at garbage collection: counted once
            if replay in open_now:
                open_now.remove(replay)
            closing()

        replay.close = close  # type: ignore[method-assign]
        return replay

    monkeypatch.setattr(history, "replay_file", counting)
    made = history.build(history.find_journals(journal_dir=tmp_path))
    assert most[0] == 1 and not open_now
    assert made.totals()["offboarded"] == 1500 and len(made.per_night()) == 30


def test_the_python_api_reports_a_history(nights: Path) -> None:
    import bulkoffboard

    document = orjson.loads(bulkoffboard.report_history(journal_dir=nights, format="json"))
    assert document["totals"]["offboarded"] == 5
    text = bulkoffboard.report_history([nights / "2026-11-01.jsonl"])
    assert "1 run over 1 night, 1 tenant, 5 machines" in text
