"""The published JSON Schema of journal format 1 (``bulkoffboard schema``), and the check that
validates every journal the test suite writes against it (tests/conftest.py)."""

from __future__ import annotations

import copy
import stat
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest

from bulkoffboard import journal_schema
from bulkoffboard.cli import main
from bulkoffboard.journal import FORMAT_VERSION, TOOL, Journal
from bulkoffboard.models import Outcome
from tests import journal_check

A = "a" * 40
AT = "2026-11-28T02:00:01.123456Z"
ACTION = "7c1b6b2e-3f5a-4d7e-9a0b-1c2d3e4f5a6b"

#: One record of every type, as the writers write them (the shapes the tests below break).
RECORDS: dict[str, dict[str, Any]] = {
    "header": {
        "type": "header",
        "format": FORMAT_VERSION,
        "tool": TOOL,
        "tool_version": "0.1.0",
        "run_id": "84fb675f-d3bd-407f-ade0-10eec17d20a7",
        "created_at": AT,
        "source": {
            "kind": "query",
            "path": "/srv/j.jsonl.targets",
            "format": "text",
            "resolved": 2,
            "sha256": "0" * 64,
            "filter": "healthStatus eq 'Inactive'",
            "presets": {"query": None, "inactive_days": 90, "health": [], "os": [], "tag": []},
        },
        "comment": "CHG0042",
        "limits": [[100, 60.0], [1500, 3600.0]],
        "workers": 8,
        "api_url": "https://api.security.microsoft.com",
        "tenant_id": "t",
        "client_id": "c",
        "margin_s": 0.5,
        "exclusions": {"tags": [], "groups": [], "ids": [A], "names": ["dc-*"], "preflight": True},
        "max_machines": None,
    },
    "session": {
        "type": "session",
        "at": AT,
        "pid": 4242,
        "command": "run",
        "tool_version": "0.1.0",
        "budget": "none",
    },
    "attempt": {"type": "attempt", "machine_id": A, "attempt": 1, "at": AT},
    "result": {
        "type": "result",
        "machine_id": A,
        "outcome": "offboarded",
        "action_id": ACTION,
        "action_status": "Pending",
        "http_status": None,
        "error_code": None,
        "message": None,
        "attempts": 1,
        "at": AT,
    },
    "rejected": {
        "type": "result",
        "machine_id": None,
        "outcome": "invalid_id",
        "action_id": None,
        "action_status": None,
        "http_status": None,
        "error_code": None,
        "message": "not a 40-hex machine id",
        "attempts": 0,
        "at": AT,
        "where": "ids.txt:3",
        "input": "<script>",
    },
    "decision": {
        "type": "result",
        "machine_id": A,
        "outcome": "excluded",
        "action_id": None,
        "action_status": None,
        "http_status": None,
        "error_code": None,
        "message": "excluded by tag keep",
        "attempts": 0,
        "at": AT,
        "stage": "plan",
        "rule": "tag keep",
    },
    "plan": {
        "type": "plan",
        "at": AT,
        "would_offboard": 1,
        "skipped": {"excluded": 1},
        "invalid_id": 1,
        "duplicates": 0,
        "notes": [],
    },
    "status": {
        "type": "status",
        "machine_id": A,
        "action_id": ACTION,
        "action_status": "Succeeded",
        "at": AT,
    },
    "end": {
        "type": "end",
        "at": AT,
        "exit_code": 0,
        "reason": "completed",
        "counts": {"offboarded": 1},
    },
    "verify end": {
        "type": "end",
        "at": AT,
        "exit_code": 0,
        "reason": "every action is final",
        "action_statuses": {"Succeeded": 1},
    },
    "crash end": {"type": "end", "at": AT},
}


def errors(record: dict[str, Any]) -> list[str]:
    return [e.message for e in journal_check.validator().iter_errors(record)]


def changed(name: str, **fields: Any) -> dict[str, Any]:
    """A copy of ``RECORDS[name]`` with ``fields`` set (a value of ``...`` removes the field)."""
    record = copy.deepcopy(RECORDS[name])
    for key, value in fields.items():
        if value is ...:
            del record[key]
        else:
            record[key] = value
    return record


def test_the_packaged_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = journal_schema.load()

    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert jsonschema.validators.validator_for(schema) is jsonschema.Draft202012Validator


def test_the_schema_names_every_outcome_and_no_other() -> None:
    assert journal_schema.load()["$defs"]["outcome"]["enum"] == [o.value for o in Outcome]
    assert errors(changed("result", outcome="in_doubt")), "in doubt is no journal outcome"


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_records_as_the_writers_write_them_validate(name: str) -> None:
    assert errors(RECORDS[name]) == []
    assert journal_check.by_type()[RECORDS[name]["type"]].is_valid(RECORDS[name])


def test_unknown_fields_and_unknown_record_types_validate() -> None:
    assert errors(changed("attempt", trace_id="x", nested={"a": [1]})) == []
    assert errors({"type": "checkpoint", "anything": [1, 2]}) == []
    assert errors({"type": "checkpoint"}) == []


@pytest.mark.parametrize(
    ("name", "fields", "complaint"),
    [
        ("attempt", {"machine_id": A.upper()}, "does not match"),
        ("attempt", {"machine_id": "a" * 39}, "does not match"),
        ("attempt", {"attempt": 0}, "less than the minimum"),
        ("attempt", {"attempt": "1"}, "is not of type 'integer'"),
        ("attempt", {"at": "2026-11-28T02:00:01Z"}, "does not match"),
        ("attempt", {"at": "2026-11-28T02:00:01.123456+00:00"}, "does not match"),
        ("attempt", {"at": "2026-13-28T02:00:01.123456Z"}, "does not match"),
        ("attempt", {"at": ...}, "'at' is a required property"),
        ("result", {"outcome": "done"}, "is not one of"),
        ("result", {"machine_id": None}, "is a required property"),  # no where/input
        ("result", {"http_status": "404"}, "is not valid under any of the given schemas"),
        ("result", {"attempts": -1}, "less than the minimum"),
        ("rejected", {"outcome": "offboarded"}, "is not one of"),
        ("rejected", {"where": ...}, "'where' is a required property"),
        ("decision", {"stage": "run"}, "'plan' was expected"),
        ("header", {"format": 2}, "1 was expected"),
        ("header", {"tool": "other"}, "'bulkoffboard' was expected"),
        ("header", {"limits": [[100]]}, "is too short"),
        ("header", {"created_at": ...}, "'created_at' is a required property"),
        ("header", {"source": {"kind": "query", "path": "p", "format": "csv"}}, "required"),
        ("header", {"source": {"kind": "s3", "path": "p", "format": "text"}}, "is not one of"),
        ("session", {"command": "emulate"}, "is not one of"),
        ("session", {"pid": "1"}, "is not of type 'integer'"),
        ("plan", {"skipped": {"in_doubt": 1}}, "is not one of"),
        ("status", {"action_id": None}, "is not of type 'string'"),
        ("end", {"counts": {"offboarded": -1}}, "less than the minimum"),
        ("end", {"exit_code": "0"}, "is not of type 'integer'"),
    ],
)
def test_known_record_types_are_checked_strictly(
    name: str, fields: dict[str, Any], complaint: str
) -> None:
    record = changed(name, **fields)
    found = errors(record)

    assert found, f"{name} with {fields} must not validate"
    assert any(complaint in message for message in found), found
    assert not journal_check.by_type()[record["type"]].is_valid(record), "the fast path agrees"


def test_bulkoffboard_schema_prints_the_packaged_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0

    out = capsys.readouterr().out
    assert out == journal_schema.text()
    assert orjson.loads(out)["$id"] == "urn:bulkoffboard:journal:format-1"


def test_bulkoffboard_schema_output_writes_the_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "journal.schema.json"
    target.write_text("an older schema")

    assert main(["schema", "--output", str(target)]) == 0

    assert target.read_text(encoding="utf-8") == journal_schema.text()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no temp left"


def test_bulkoffboard_schema_output_to_a_missing_folder_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "missing" / "schema.json"

    assert main(["schema", "--output", str(target)]) == 2

    assert f"cannot write {target}" in capsys.readouterr().err


# -- the check every test's journals go through ------------------------------------------------


def write_lines(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(lines))
    return path


def line(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record) + b"\n"


@pytest.mark.unvalidated_journal("writes a record that breaks the schema on purpose")
def test_the_check_names_the_file_line_and_problem_of_a_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    journal = Journal.create(path, {k: v for k, v in RECORDS["header"].items() if k != "type"})
    journal.append(RECORDS["attempt"])
    journal.append(changed("result", machine_id=A.upper()))
    journal.close()

    records, problems = journal_check.check(path)

    assert records == 3
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:3: 'result' record, at machine_id: ")
    assert "does not match" in problems[0]


@pytest.mark.unvalidated_journal("writes foreign and torn files on purpose")
def test_only_format_1_journals_and_whole_records_are_checked(tmp_path: Path) -> None:
    header = line(RECORDS["header"])
    good = write_lines(
        tmp_path / "torn.jsonl",
        header,
        b"\n",
        line(RECORDS["attempt"]),
        b'{"type":"result","machine_id":"' + A.encode() + b'","outc',  # torn: not a record
    )
    nul = write_lines(tmp_path / "power-cut.log", header, line(RECORDS["status"]), b"\0" * 64)
    write_lines(tmp_path / "foreign.jsonl", b'{"type":"header","tool":"other","format":1}\n')
    write_lines(tmp_path / "newer.jsonl", line(changed("header", format=2)), b'{"type":"x"}\n')
    write_lines(tmp_path / "not-first.jsonl", line(RECORDS["session"]), header)
    write_lines(tmp_path / "ids.txt", A.encode() + b"\n")
    (tmp_path / "sub").mkdir()
    nested = write_lines(tmp_path / "sub" / "j", header)

    found = list(journal_check.journals_under(tmp_path))

    assert found == [nul, good, nested]
    assert journal_check.check(good) == (2, [])
    assert journal_check.check(nul) == (2, [])


@pytest.mark.unvalidated_journal("writes a hostile-corpus journal on purpose")
def test_copies_of_the_hostile_corpus_are_not_checked(tmp_path: Path) -> None:
    corpus = Path(__file__).with_name("hostile") / "journal_attempt_not_a_number.jsonl"
    copy_ = tmp_path / "journal.jsonl"
    copy_.write_bytes(corpus.read_bytes())
    assert journal_check.is_journal(copy_)
    assert journal_check.check(copy_)[1], "the corpus journal breaks the schema"

    assert list(journal_check.journals_under(tmp_path)) == []


def test_the_check_fails_a_test_that_writes_a_bad_record(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: a test session with this suite's conftest fails a test whose journal has
    a bad record, naming the file and line, and passes the same test once it is marked."""
    conftest = Path(__file__).with_name("conftest.py")
    pytester.makeconftest(conftest.read_text(encoding="utf-8"))
    pytester.makepyfile(
        test_inner=textwrap.dedent(
            f"""
            import orjson
            import pytest

            HEADER = {RECORDS["header"]!r}
            BAD = {changed("attempt", at="yesterday")!r}


            def write(tmp_path):
                lines = [HEADER, {RECORDS["attempt"]!r}, BAD]
                (tmp_path / "run.jsonl").write_bytes(
                    b"".join(orjson.dumps(r) + b"\\n" for r in lines)
                )


            def test_bad(tmp_path):
                write(tmp_path)


            @pytest.mark.unvalidated_journal("bad on purpose")
            def test_marked(tmp_path):
                write(tmp_path)
            """
        )
    )
    monkeypatch.setenv("PYTHONPATH", str(conftest.parent.parent))

    ran = pytester.runpytest_subprocess("-p", "no:cacheprovider")

    ran.assert_outcomes(passed=2, errors=1)
    output = ran.stdout.str()
    assert "ERROR at teardown of test_bad" in output
    assert "run.jsonl:3: 'attempt' record, at at: 'yesterday' does not match" in output
    assert "journal schema: 3 records in 1 journals validated" in output
