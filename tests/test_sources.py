"""Tests for bulkoffboard.sources: streaming machine ids out of text, CSV, JSON and JSONL files."""

from __future__ import annotations

import io
import json
import os
import stat
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bulkoffboard.errors import SourceError, UsageError
from bulkoffboard.sources import (
    FORMATS,
    MAX_JSON_VALUE_CHARS,
    MAX_LINE_BYTES,
    RAW_LIMIT,
    Deduplicator,
    SourceRecord,
    detect_format,
    iter_records,
    spool_stdin,
)

ID_A = "0123456789abcdef0123456789abcdef01234567"
ID_B = "b" * 40
ID_C = "c0ffee" + "0" * 34
UPPER = "ABCDEF0123456789ABCDEF0123456789ABCDEF01"
BOM = b"\xef\xbb\xbf"


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        path.write_bytes(content.encode("utf-8"))
    else:
        path.write_bytes(content)
    return path


def read(path: Path, fmt: str = "auto") -> list[SourceRecord]:
    return list(iter_records(path, fmt))


def ids(records: list[SourceRecord]) -> list[str | None]:
    return [r.machine_id for r in records]


def error_of(path: Path, fmt: str = "auto") -> str:
    with pytest.raises(SourceError) as info:
        read(path, fmt)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    return message


# ---------------------------------------------------------------------------------------------
# Text


def test_text_reads_one_id_a_line_with_where_and_raw(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.txt", f"{ID_A}\n{ID_B}\n")
    assert read(path) == [
        SourceRecord(f"{path}:1", ID_A, ID_A, None),
        SourceRecord(f"{path}:2", ID_B, ID_B, None),
    ]


def test_text_skips_comments_and_blank_lines_keeping_line_numbers(tmp_path: Path) -> None:
    content = (
        f"# machines to retire, batch 7\n\n{ID_A}  # laptop of Bob\n   \n\t{ID_B}\t\n#{ID_C}\n"
    )
    path = write(tmp_path / "ids.txt", content)
    records = read(path)
    assert [(r.where, r.machine_id) for r in records] == [
        (f"{path}:3", ID_A),
        (f"{path}:5", ID_B),
    ]


def test_text_tolerates_bom_and_crlf(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.txt", BOM + f"{ID_A}\r\n\r\n{ID_B}\r\n{ID_C}".encode())
    records = read(path)
    assert ids(records) == [ID_A, ID_B, ID_C]
    assert [r.where for r in records] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert all(r.reason is None and r.valid for r in records)


def test_upper_case_ids_are_lower_cased_and_raw_kept(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.txt", UPPER + "\n")
    [record] = read(path)
    assert record.machine_id == UPPER.lower()
    assert record.raw == UPPER


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("0123abc", "not a 40-hex machine id"),
        ("g" * 40, "not a 40-hex machine id"),
        (ID_A + "0", "not a 40-hex machine id"),
        ("../etc/passwd", "not a 40-hex machine id"),
        (f"../{ID_A}", "not a 40-hex machine id"),
        ("abc?x=1", "not a 40-hex machine id"),
        (f"{ID_A}?x=1", "not a 40-hex machine id"),
        (f"{ID_A[:20]}/{ID_A[21:]}", "not a 40-hex machine id"),
        (f"{ID_A[:37]}%2F", "not a 40-hex machine id"),
        (f'"{ID_A}"', "not a 40-hex machine id"),
        (f"{ID_A[:39]}\x00", "NUL byte"),
        ("abc\x00def", "NUL byte"),
    ],
)
def test_text_invalid_values_become_records_with_reasons(
    tmp_path: Path, value: str, reason: str
) -> None:
    path = write(tmp_path / "ids.txt", f"{ID_A}\n\n{value}\n{ID_B}\n")
    records = read(path)
    assert ids(records) == [ID_A, None, ID_B]
    bad = records[1]
    assert bad.where == f"{path}:3"
    assert bad.raw == value
    assert bad.reason == reason
    assert not bad.valid


def test_hash_in_value_cuts_url_fragment_but_query_stays_invalid(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.txt", f"{ID_A}?api=1#frag\n")
    [record] = read(path)
    assert record.raw == f"{ID_A}?api=1"
    assert record.reason == "not a 40-hex machine id"


def test_long_raw_values_are_clipped_for_display(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.txt", "z" * 3000 + "\n")
    [record] = read(path)
    assert record.reason == "not a 40-hex machine id"
    assert len(record.raw) <= RAW_LIMIT
    assert record.raw.startswith("zzz")


def test_duplicates_are_kept(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.txt", f"{ID_A}\n{ID_A.upper()}\n{ID_A}\n")
    assert ids(read(path)) == [ID_A, ID_A, ID_A]


# ---------------------------------------------------------------------------------------------
# CSV


@pytest.mark.parametrize(
    "header",
    [
        "id",
        "ID",
        "Id",
        "machineId",
        "MachineId",
        "MACHINEID",
        "machineid",
        "DeviceId",
        "deviceid",
        "DEVICEID",
        "Device ID",
        "device id",
        "DEVICE ID",
        "  Device ID  ",
        " id ",
    ],
)
def test_csv_finds_the_id_column_by_any_header_spelling(tmp_path: Path, header: str) -> None:
    path = write(tmp_path / "ids.csv", f"Name,{header},OS\nalpha,{ID_A},Windows\nbeta,{UPPER},\n")
    records = read(path)
    assert ids(records) == [ID_A, UPPER.lower()]
    assert [r.where for r in records] == [f"{path}:2", f"{path}:3"]


def test_csv_quoted_header_and_values(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.csv", f'"Device Name","Device ID"\n"pc, one","{ID_A}"\n')
    assert ids(read(path)) == [ID_A]


def test_csv_tolerates_bom_crlf_and_blank_lines_before_the_header(tmp_path: Path) -> None:
    content = BOM + f"\r\n\r\nDevice ID,Device Name\r\n{ID_A},a\r\n\r\n{ID_B},b\r\n".encode()
    path = write(tmp_path / "export.csv", content)
    records = read(path)
    assert ids(records) == [ID_A, ID_B]
    assert [r.where for r in records] == [f"{path}:4", f"{path}:6"]


def test_csv_single_column(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.csv", f"machineId\n{ID_A}\n{ID_B}")
    assert ids(read(path)) == [ID_A, ID_B]


def test_csv_prefers_id_over_other_id_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.csv", f"Device ID,id\n{ID_B},{ID_A}\n")
    assert ids(read(path)) == [ID_A]


def test_csv_semicolon_delimiter_and_excel_sep_line(tmp_path: Path) -> None:
    semi = write(tmp_path / "semi.csv", f"Name;Device ID\nx;{ID_A}\n")
    assert ids(read(semi)) == [ID_A]
    sep = write(tmp_path / "sep.csv", f"sep=;\nName;Device ID\nx;{ID_B}\n")
    [record] = read(sep)
    assert (record.where, record.machine_id) == (f"{sep}:3", ID_B)


def test_csv_short_row_and_bad_values_are_invalid_records(tmp_path: Path) -> None:
    content = (
        f"name,id,os\na,{ID_A},win\nshort\nc,,linux\nd,../etc/passwd,x\ne,abc\x00,y\nf,{ID_B},mac\n"
    )
    path = write(tmp_path / "ids.csv", content)
    records = read(path)
    assert ids(records) == [ID_A, None, None, None, None, ID_B]
    assert [r.where for r in records] == [f"{path}:{n}" for n in range(2, 8)]
    assert records[1].reason is not None
    assert "short row" in records[1].reason
    assert records[2].reason == "empty id"
    assert records[3].reason == "not a 40-hex machine id"
    assert records[4].reason == "NUL byte"


def test_csv_row_with_multi_line_quoted_field_keeps_line_numbers(tmp_path: Path) -> None:
    content = f'id,notes\n{ID_A},"first\nsecond\nthird"\n{ID_B},plain\n'
    path = write(tmp_path / "ids.csv", content)
    records = read(path)
    assert [(r.where, r.machine_id) for r in records] == [(f"{path}:2", ID_A), (f"{path}:5", ID_B)]


def test_csv_without_id_column_names_file_and_header(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.csv", f"\nName,Serial,OS\nx,{ID_A},win\n")
    message = error_of(path)
    assert f"{path}:2" in message
    assert "no id column" in message
    assert "'Name'" in message
    assert "'Serial'" in message


def test_csv_header_only_gives_no_records(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.csv", "id,name\n")
    assert read(path) == []


# ---------------------------------------------------------------------------------------------
# JSON


def test_json_array_of_strings(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.json", json.dumps([ID_A, UPPER, ID_B], indent=2))
    records = read(path)
    assert ids(records) == [ID_A, UPPER.lower(), ID_B]
    assert [r.where for r in records] == [f"{path}:2", f"{path}:3", f"{path}:4"]


def test_json_minified_array_is_all_on_line_one(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.json", json.dumps([ID_A, ID_B]))
    assert [(r.where, r.machine_id) for r in read(path)] == [
        (f"{path}:1", ID_A),
        (f"{path}:1", ID_B),
    ]


@pytest.mark.parametrize(
    "key", ["id", "ID", "machineId", "MACHINEID", "DeviceId", "deviceid", "Device ID", "device id"]
)
def test_json_array_of_objects_with_any_id_key(tmp_path: Path, key: str) -> None:
    data = [{key: ID_A, "computerDnsName": "a"}, {"healthStatus": "Active", key: UPPER}]
    path = write(tmp_path / "ids.json", json.dumps(data, indent=1))
    records = read(path)
    assert ids(records) == [ID_A, UPPER.lower()]
    assert records[0].raw == ID_A


def test_json_mde_value_object(tmp_path: Path) -> None:
    body = {
        "@odata.context": "https://api.security.microsoft.com/api/$metadata#Machines",
        "value": [
            {"id": ID_A, "computerDnsName": "mymachine1.contoso.com", "osPlatform": "Windows10"},
            {"id": ID_B, "aadDeviceId": "80fe8ff8-2624-418e-9591-41f0491218f9"},
        ],
        "@odata.nextLink": "https://api.security.microsoft.com/api/machines?$skip=2",
    }
    path = write(tmp_path / "machines.json", json.dumps(body, indent=4))
    records = read(path)
    assert ids(records) == [ID_A, ID_B]
    text = path.read_text().splitlines()
    for record in records:
        line = int(record.where.rsplit(":", 1)[1])
        assert text[line - 1].strip() == "{"


def test_json_value_object_on_one_line(tmp_path: Path) -> None:
    path = write(tmp_path / "machines", json.dumps({"value": [{"id": ID_A}, ID_B]}))
    assert detect_format(path) == "json"
    assert ids(read(path)) == [ID_A, ID_B]


def test_json_tolerates_bom_and_crlf(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.json", BOM + f'[\r\n  "{ID_A}",\r\n  "{ID_B}"\r\n]\r\n'.encode())
    records = read(path)
    assert [(r.where, r.machine_id) for r in records] == [(f"{path}:2", ID_A), (f"{path}:3", ID_B)]


def test_json_invalid_elements_become_records(tmp_path: Path) -> None:
    content = "\n".join(
        [
            "[",
            f'"{ID_A}",',
            "12345,",
            '{"name": "no id here"},',
            '{"id": 7},',
            '"../etc/passwd",',
            f'"{ID_A[:39]}\\u0000",',
            "null,",
            f'["{ID_B}"],',
            "true,",
            f'"{ID_B}"',
            "]",
        ]
    )
    path = write(tmp_path / "ids.json", content)
    records = read(path)
    assert [r.where for r in records] == [f"{path}:{n}" for n in range(2, 12)]
    assert ids(records) == [ID_A, None, None, None, None, None, None, None, None, ID_B]
    reasons = [r.reason for r in records]
    assert reasons[1] == "expected a string or an object, got a number"
    assert records[1].raw == "12345"
    assert reasons[2] is not None
    assert "without an id key" in reasons[2]
    assert reasons[3] == "id is a number, not a string"
    assert reasons[4] == "not a 40-hex machine id"
    assert reasons[5] == "NUL byte"
    assert reasons[6] == "expected a string or an object, got null"
    assert reasons[7] == "expected a string or an object, got an array"
    assert reasons[8] == "expected a string or an object, got a boolean"


def test_json_raw_nul_byte_in_a_string_is_an_invalid_record(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.json", f'[\n"{ID_A}",\n"ab\x00cd",\n"{ID_B}"\n]'.encode())
    records = read(path)
    assert ids(records) == [ID_A, None, ID_B]
    assert (records[1].where, records[1].reason) == (f"{path}:3", "NUL byte")


def test_json_empty_array_and_empty_value(tmp_path: Path) -> None:
    assert read(write(tmp_path / "a.json", "[]")) == []
    assert read(write(tmp_path / "b.json", '{"value": []}')) == []
    assert read(write(tmp_path / "c.json", "  \n [ \n ] \n")) == []


@pytest.mark.parametrize(
    ("content", "line", "fragment"),
    [
        ("42", 1, "found a number"),
        ('"abc"', 1, "found a string"),
        ('\n\n{"id": "x"}', 3, "without a 'value' array"),
        ('{"count": 3}', 1, "without a 'value' array"),
        ('{"value": 3}', 1, "'value' is a number"),
        ('{"value": {"id": 1}}', 1, "'value' is an object"),
        ('[\n"a",\n"b"\n', 4, "not closed"),
        ('[\n"a"\n"b"]', 3, "expected ',' or ']'"),
        ('[\n"a",\n]', 3, "malformed JSON"),
        ('[\n"a",\nnope]', 3, "malformed JSON"),
        ('[\n"a"\n]\n[]', 4, "unexpected data after"),
        ('{\n"value": [\n"a"\n]', 4, "not closed"),
        ('[\n"abc', 2, "malformed JSON"),
    ],
)
def test_json_file_level_errors_name_file_and_line(
    tmp_path: Path, content: str, line: int, fragment: str
) -> None:
    path = write(tmp_path / "ids.json", content)
    message = error_of(path)
    assert message.startswith(f"{path}:{line}: ")
    assert fragment in message


def test_json_lines_content_in_a_json_file_hints_at_jsonl(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.json", f'{{"id": "{ID_A}"}}\n{{"id": "{ID_B}"}}\n')
    message = error_of(path)
    assert "jsonl" in message


def test_json_number_split_across_read_chunks_is_read_whole(tmp_path: Path) -> None:
    # The first read chunk is 64 KiB: put a number right across that boundary.
    padding = " " * (64 * 1024 - 4)
    path = write(tmp_path / "ids.json", f'[{padding}123456789, "{ID_A}"]')
    records = read(path)
    assert [r.raw for r in records] == ["123456789", ID_A]


def test_json_elements_across_many_chunks_keep_line_numbers(tmp_path: Path) -> None:
    values = [f"{n:040x}" for n in range(20_000)]
    path = write(tmp_path / "ids.json", json.dumps(values, indent=2))
    records = read(path)
    assert ids(records) == values
    assert records[-1].where == f"{path}:20001"


def test_json_oversized_string_element_is_skipped_in_pieces(tmp_path: Path) -> None:
    # Backslashes and escaped quotes around read-chunk boundaries must not end the string early.
    body = ('x\\\\\\"' * 50_000) + "y" * (MAX_JSON_VALUE_CHARS + 70_001) + '\\"\\\\'
    path = write(tmp_path / "ids.json", f'[\n"{ID_A}",\n"{body}",\n"{ID_B}"\n]')
    records = read(path)
    assert ids(records) == [ID_A, None, ID_B]
    assert records[1].reason == "value too long"
    assert records[1].where == f"{path}:3"
    assert len(records[1].raw) <= RAW_LIMIT
    assert records[2].where == f"{path}:4"


def test_json_oversized_non_string_element_is_refused(tmp_path: Path) -> None:
    big = "[" + ",".join(["1"] * MAX_JSON_VALUE_CHARS) + "]"
    path = write(tmp_path / "ids.json", f'[\n"{ID_A}",\n{big}\n]')
    message = error_of(path)
    assert message.startswith(f"{path}:3: ")
    assert "longer than" in message


# ---------------------------------------------------------------------------------------------
# JSON Lines


def test_jsonl_strings_and_objects(tmp_path: Path) -> None:
    content = f'"{ID_A}"\n\n{{"machineId": "{UPPER}", "x": 1}}\n{{"Device ID": "{ID_B}"}}\n'
    path = write(tmp_path / "ids.jsonl", content)
    records = read(path)
    assert [(r.where, r.machine_id) for r in records] == [
        (f"{path}:1", ID_A),
        (f"{path}:3", UPPER.lower()),
        (f"{path}:4", ID_B),
    ]


def test_jsonl_tolerates_bom_and_crlf(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.ndjson", BOM + f'{{"id": "{ID_A}"}}\r\n"{ID_B}"\r\n'.encode())
    assert ids(read(path)) == [ID_A, ID_B]


def test_jsonl_invalid_values_are_records(tmp_path: Path) -> None:
    content = "\n".join(
        [
            f'"{ID_A}"',
            "3",
            '{"name": "x"}',
            '"abc?x=1"',
            '"ab\x00c"',
            '{"id": null}',
            "[1, 2]",
            f'"{ID_B}"',
        ]
    )
    path = write(tmp_path / "ids.jsonl", content)
    records = read(path)
    assert [r.where for r in records] == [f"{path}:{n}" for n in range(1, 9)]
    assert ids(records) == [ID_A, None, None, None, None, None, None, ID_B]
    assert [r.reason for r in records[1:7]] == [
        "expected a string or an object, got a number",
        "object without an id key (id, machineId, DeviceId, Device ID)",
        "not a 40-hex machine id",
        "NUL byte",
        "id is null, not a string",
        "expected a string or an object, got an array",
    ]


def test_jsonl_malformed_line_is_an_error_naming_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.jsonl", f'"{ID_A}"\n\n{{"id": "{ID_B}"\n')
    message = error_of(path)
    assert message.startswith(f"{path}:3: malformed JSON")


# ---------------------------------------------------------------------------------------------
# Files that cannot be read


def test_missing_file_is_an_error_at_call_time(tmp_path: Path) -> None:
    path = tmp_path / "nope.txt"
    with pytest.raises(SourceError, match="no such file") as info:
        iter_records(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, UsageError)


def test_directory_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ids.csv"
    path.mkdir()
    assert "directory" in error_of(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_is_permission_denied(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.txt", ID_A)
    path.chmod(0)
    try:
        assert "permission denied" in error_of(path)
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_permission_error_on_open_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "ids.txt", ID_A)
    real_open = Path.open

    def deny(self: Path, *args: object, **kwargs: object) -> object:
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", deny)
    assert error_of(path) == f"{path}: permission denied"


def test_fifo_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    os.mkfifo(path)
    # Opening a FIFO for reading blocks until a writer appears; keep one open.
    writer = os.open(path, os.O_RDWR | os.O_NONBLOCK)
    try:
        assert "not a regular file" in error_of(path)
    finally:
        os.close(writer)


@pytest.mark.parametrize(
    ("name", "content", "line"),
    [
        ("ids.txt", f"{ID_A}\n{ID_B}\ncaf\xe9\n".encode("latin-1"), 3),
        ("ids.csv", f"id,name\n{ID_A},Jos\xe9\n".encode("latin-1"), 2),
        ("ids.jsonl", f'"{ID_A}"\n\n{{"id": "{ID_B}", "n": "\xe9"}}\n'.encode("latin-1"), 3),
        ("ids.json", f'[\n"{ID_A}",\n"\xe9"\n]'.encode("latin-1"), 3),
    ],
)
def test_invalid_utf8_names_file_and_line(
    tmp_path: Path, name: str, content: bytes, line: int
) -> None:
    path = write(tmp_path / name, content)
    message = error_of(path)
    assert message.startswith(f"{path}:{line}: not valid UTF-8")


def test_invalid_utf8_far_into_a_json_file_names_the_line(tmp_path: Path) -> None:
    values = [f"{n:040x}" for n in range(5000)]
    content = json.dumps(values, indent=1).encode()
    content = content[:-2] + b',\n"\xff"\n]'
    path = write(tmp_path / "ids.json", content)
    assert error_of(path).startswith(f"{path}:5002: not valid UTF-8")


@pytest.mark.parametrize("name", ["ids.txt", "ids.csv", "ids.json", "ids.jsonl", "ids"])
def test_binary_file_is_refused(tmp_path: Path, name: str) -> None:
    content = bytes(range(256)) * 4 + b"\x00" * 100
    path = write(tmp_path / name, b"\x89PNG\r\n\x1a\n" + content)
    assert "looks binary" in error_of(path)


def test_utf16_is_refused(tmp_path: Path) -> None:
    with_bom = write(tmp_path / "a.txt", f"{ID_A}\n".encode("utf-16"))
    assert "UTF-16" in error_of(with_bom)
    without_bom = write(tmp_path / "b.txt", f"{ID_A}\n{ID_B}\n".encode("utf-16-le"))
    assert "looks binary" in error_of(without_bom)


def test_a_stray_nul_in_a_text_file_is_not_binary(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.txt", f"{ID_A}\n{ID_B[:20]}\x00{ID_B[21:]}\n{ID_C}\n".encode())
    records = read(path)
    assert [r.reason for r in records] == [None, "NUL byte", None]


@pytest.mark.parametrize("fmt", [*FORMATS, "auto"])
@pytest.mark.parametrize("content", [b"", b"\n\n  \r\n", BOM])
def test_empty_file_gives_no_records(tmp_path: Path, fmt: str, content: bytes) -> None:
    path = write(tmp_path / "ids", content)
    assert read(path, fmt) == []


def test_read_error_mid_stream_is_a_source_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "ids.txt", f"{ID_A}\n{ID_B}\n")

    class Flaky(io.BufferedReader):
        def readline(self, size: int | None = -1, /) -> bytes:
            raise OSError(5, "Input/output error")

    real_open = Path.open

    def flaky_open(self: Path, *args: object, **kwargs: object) -> object:
        if self == path:
            return Flaky(io.FileIO(self, "rb"))
        return real_open(self, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", flaky_open)
    records = iter_records(path)
    with pytest.raises(SourceError) as info:
        next(records)
    assert str(info.value) == f"{path}: read failed: Input/output error"


# ---------------------------------------------------------------------------------------------
# Format detection


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ids.txt", "text"),
        ("ids.TXT", "text"),
        ("ids.list", "text"),
        ("ids.csv", "csv"),
        ("ids.json", "json"),
        ("ids.jsonl", "jsonl"),
        ("ids.ndjson", "jsonl"),
        ("IDS.NDJSON", "jsonl"),
    ],
)
def test_detect_format_by_suffix(tmp_path: Path, name: str, expected: str) -> None:
    # The suffix decides even when the content says otherwise, and without opening the file.
    assert detect_format(tmp_path / name) == expected


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (f'["{ID_A}"]', "json"),
        (f'\n\n   [\n"{ID_A}"\n]', "json"),
        (BOM + f' \r\n["{ID_A}"]'.encode(), "json"),
        (f'{{"id": "{ID_A}"}}\n{{"id": "{ID_B}"}}\n', "jsonl"),
        (f'{{\n  "value": [\n"{ID_A}"\n  ]\n}}', "json"),
        (f'{{"value": ["{ID_A}"]}}', "json"),
        (f'"{ID_A}"\n"{ID_B}"\n', "jsonl"),
        (f"Name,Device ID\nx,{ID_A}\n", "csv"),
        (f"Device ID\n{ID_A}\n", "csv"),
        (f'"machineId"\n"{ID_A}"\n', "csv"),
        (f"Name;DeviceId\nx;{ID_A}\n", "csv"),
        (f"sep=;\nName;DeviceId\nx;{ID_A}\n", "csv"),
        (f"{ID_A},{ID_B}\n", "csv"),
        (f"{ID_A}\n{ID_B}\n", "text"),
        (f"# retire these, says Bob\n{ID_A}\n", "text"),
        ("", "text"),
        ("   \n\n", "text"),
    ],
)
def test_detect_format_by_sniffing(tmp_path: Path, content: str | bytes, expected: str) -> None:
    path = write(tmp_path / "ids.input", content)
    assert detect_format(path) == expected
    assert detect_format(path, "auto") == expected
    assert detect_format(path, None) == expected


def test_detect_format_sniffs_past_a_long_first_line(tmp_path: Path) -> None:
    path = write(tmp_path / "export", json.dumps({"value": [{"id": ID_A}] * 500}))
    assert detect_format(path) == "json"


def test_declared_format_wins(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.json", f"{ID_A}\n")
    assert detect_format(path, "text") == "text"
    assert detect_format(path, " JSONL ") == "jsonl"
    assert ids(read(path, "text")) == [ID_A]


def test_unknown_declared_format_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.txt", ID_A)
    with pytest.raises(SourceError, match="unknown input format 'xml'"):
        detect_format(path, "xml")
    with pytest.raises(SourceError, match="unknown input format"):
        iter_records(path, "yaml")


def test_sniffing_a_missing_file_is_a_source_error(tmp_path: Path) -> None:
    path = tmp_path / "ids"
    with pytest.raises(SourceError, match="no such file"):
        detect_format(path)


def test_iter_records_uses_sniffed_format(tmp_path: Path) -> None:
    path = write(tmp_path / "from-stdin", f"Name,DeviceId\nx,{ID_A}\n")
    assert ids(read(path)) == [ID_A]


# ---------------------------------------------------------------------------------------------
# Over-long lines and large files


def _write_with_long_line(path: Path, prefix: bytes, middle: bytes, suffix: bytes) -> None:
    with path.open("wb") as fh:
        fh.write(prefix)
        fh.write(middle)
        fh.write(suffix)


def test_twenty_megabyte_line_is_an_invalid_record_and_reading_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    long_line = b"9" * (20 * 1024 * 1024)
    _write_with_long_line(path, f"{ID_A}\n".encode(), long_line, f"\n{ID_B}\r\n\n{ID_C}".encode())
    del long_line
    tracemalloc.start()
    try:
        records = read(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ids(records) == [ID_A, None, ID_B, ID_C]
    assert [r.where for r in records] == [f"{path}:{n}" for n in (1, 2, 3, 5)]
    assert records[1].reason == "line too long"
    assert records[1].raw.startswith("999")
    assert len(records[1].raw) <= RAW_LIMIT
    assert peak < 2 * 1024 * 1024


def test_over_long_last_line_without_newline(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.txt", f"{ID_A}\n".encode() + b"f" * 100_000)
    records = read(path)
    assert [r.reason for r in records] == [None, "line too long"]


@pytest.mark.parametrize(
    ("name", "head"),
    [("ids.csv", f"name,id\nx,{ID_A}\n"), ("ids.jsonl", f'"{ID_A}"\n')],
)
def test_over_long_lines_in_csv_and_jsonl(tmp_path: Path, name: str, head: str) -> None:
    tail = f"y,{ID_B}\n" if name.endswith(".csv") else f'{{"id": "{ID_B}"}}\n'
    path = tmp_path / name
    _write_with_long_line(path, head.encode(), b'"' + b"a" * 300_000 + b'"\n', tail.encode())
    records = read(path)
    assert ids(records) == [ID_A, None, ID_B]
    assert [r.where for r in records][1:] == [
        f"{path}:{len(head.splitlines()) + n}" for n in (1, 2)
    ]
    assert records[1].reason == "line too long"


def test_line_length_limit_is_inclusive(tmp_path: Path) -> None:
    path = write(
        tmp_path / "ids.txt",
        "a" * MAX_LINE_BYTES + "\r\n" + "a" * (MAX_LINE_BYTES + 1) + "\n" + ID_A,
    )
    records = read(path)
    assert [r.reason for r in records] == ["not a 40-hex machine id", "line too long", None]


def test_csv_header_too_long_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.csv", "id," + "x" * 10_000 + "\n" + ID_A)
    assert error_of(path).startswith(f"{path}:1: ")


def _peak_while_counting(records: Iterator[SourceRecord]) -> tuple[int, int, str | None]:
    tracemalloc.start()
    try:
        count = 0
        last: str | None = None
        for record in records:
            count += 1
            last = record.machine_id
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return count, peak, last


def test_large_json_array_is_streamed_in_small_memory(tmp_path: Path) -> None:
    path = tmp_path / "ids.json"
    total = 200_000
    with path.open("w") as fh:
        fh.write("[")
        for n in range(total):
            fh.write(f'{"," if n else ""}\n  "{n:040x}"')
        fh.write("\n]\n")
    size = path.stat().st_size
    count, peak, last = _peak_while_counting(iter_records(path))
    assert count == total
    assert last == f"{total - 1:040x}"
    assert peak < size / 20, (peak, size)


def test_large_text_file_is_streamed_in_small_memory(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    total = 200_000
    with path.open("w") as fh:
        fh.writelines(f"{n:040x}\n" for n in range(total))
    size = path.stat().st_size
    count, peak, _ = _peak_while_counting(iter_records(path))
    assert count == total
    assert peak < size / 20, (peak, size)


def test_large_mde_value_object_is_streamed(tmp_path: Path) -> None:
    path = tmp_path / "machines.json"
    total = 50_000
    with path.open("w") as fh:
        fh.write('{"@odata.context": "x", "value": [')
        for n in range(total):
            fh.write(f'{"," if n else ""}{{"id": "{n:040x}", "osPlatform": "Windows11"}}')
        fh.write("]}")
    size = path.stat().st_size
    count, peak, _ = _peak_while_counting(iter_records(path))
    assert count == total
    assert peak < size / 10, (peak, size)


def test_records_are_produced_lazily(tmp_path: Path) -> None:
    path = write(tmp_path / "ids.json", f'["{ID_A}", oops]')
    records = iter_records(path)
    assert next(records).machine_id == ID_A  # the error further on is not raised yet
    with pytest.raises(SourceError):
        next(records)


# ---------------------------------------------------------------------------------------------
# Round trip


HEX_IDS = st.text(alphabet="0123456789abcdefABCDEF", min_size=40, max_size=40)


@settings(max_examples=60, deadline=None, database=None)
@given(machine_id=HEX_IDS, crlf=st.booleans(), bom=st.booleans())
def test_any_hex_id_round_trips_through_every_format(
    machine_id: str, crlf: bool, bom: bool
) -> None:
    eol = "\r\n" if crlf else "\n"
    contents = {
        "ids.txt": f"# comment{eol}{machine_id}  # trailing{eol}",
        "ids.csv": f"name,Device ID{eol}x,{machine_id}{eol}",
        "strings.json": json.dumps([machine_id]),
        "objects.json": json.dumps([{"machineId": machine_id}]),
        "value.json": json.dumps({"value": [{"id": machine_id}]}),
        "ids.jsonl": f'"{machine_id}"{eol}{{"DeviceId": "{machine_id}"}}{eol}',
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in contents.items():
            path = Path(tmp) / name
            path.write_bytes((BOM if bom else b"") + text.encode())
            records = read(path)
            assert records
            assert {r.machine_id for r in records} == {machine_id.lower()}
            # And detection without the suffix agrees.
            bare = Path(tmp) / f"bare-{name.replace('.', '-')}"
            bare.write_bytes(path.read_bytes())
            assert {r.machine_id for r in read(bare)} == {machine_id.lower()}


# ---------------------------------------------------------------------------------------------
# Deduplicator


def test_deduplicator_add_reports_new_ids() -> None:
    seen = Deduplicator()
    assert len(seen) == 0
    assert seen.add(ID_A) is True
    assert seen.add(ID_A) is False
    assert seen.add(ID_A.upper()) is False
    assert seen.add(ID_B) is True
    assert len(seen) == 2


def test_deduplicator_membership() -> None:
    seen = Deduplicator()
    seen.add(UPPER)
    assert UPPER in seen
    assert UPPER.lower() in seen
    assert ID_A not in seen
    assert 42 not in seen
    assert None not in seen
    assert "not hex" not in seen
    assert bytes.fromhex(UPPER) not in seen


@pytest.mark.parametrize("bad", ["", "abc", "g" * 40, ID_A + "00", "ab cd" + "0" * 35])
def test_deduplicator_refuses_invalid_ids(bad: str) -> None:
    seen = Deduplicator()
    with pytest.raises(ValueError, match="not a 40-hex machine id"):
        seen.add(bad)
    assert len(seen) == 0


# ---------------------------------------------------------------------------------------------
# spool_stdin


def test_spool_stdin_copies_bytes_privately(tmp_path: Path) -> None:
    data = (f"{ID_A}\r\n".encode() + b"\xff\x00 any bytes at all\n") * 200_000
    dest = tmp_path / "stdin.ids"
    count = spool_stdin(dest, io.BytesIO(data))
    assert count == len(data)
    assert dest.read_bytes() == data
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stdin.ids"]


def test_spool_stdin_replaces_an_existing_file(tmp_path: Path) -> None:
    dest = write(tmp_path / "stdin.ids", "old content that is longer\n")
    dest.chmod(0o644)
    assert spool_stdin(dest, io.BytesIO(b"new\n")) == 4
    assert dest.read_bytes() == b"new\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600


def test_spool_stdin_empty_input(tmp_path: Path) -> None:
    dest = tmp_path / "stdin.ids"
    assert spool_stdin(dest, io.BytesIO(b"")) == 0
    assert dest.read_bytes() == b""
    assert read(dest) == []


def test_spool_stdin_into_missing_directory_is_a_source_error(tmp_path: Path) -> None:
    dest = tmp_path / "missing" / "stdin.ids"
    with pytest.raises(SourceError, match="cannot spool"):
        spool_stdin(dest, io.BytesIO(b"x"))


def test_spool_stdin_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self.calls = 0

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            self.calls += 1
            if self.calls > 2:
                raise OSError(5, "Input/output error")
            return b"x" * 10

    dest = tmp_path / "stdin.ids"
    with pytest.raises(SourceError, match="Input/output error"):
        spool_stdin(dest, Broken())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_spooled_stdin_reads_like_a_file(tmp_path: Path) -> None:
    dest = tmp_path / "stdin"
    spool_stdin(dest, io.BytesIO(f"DeviceId,Name\n{ID_A},x\n".encode()))
    assert ids(read(dest)) == [ID_A]
