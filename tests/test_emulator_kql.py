"""The emulator's KQL subset for advanced hunting: documented syntax works, the rest is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulkoffboard.emulator.kql import KqlError, run_query

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
Tables = dict[str, list[dict[str, Any]]]


def device(
    number: int,
    *,
    age: timedelta,
    name: str,
    platform: str,
    tags: list[str] | None = None,
    aad: str | None = None,
    excluded: bool = False,
) -> dict[str, Any]:
    return {
        "Timestamp": NOW - age,
        "DeviceId": f"{number:040x}",
        "DeviceName": name,
        "OSPlatform": platform,
        "OSVersion": "10.0",
        "MachineGroup": "Servers",
        "OnboardingStatus": "Onboarded",
        "DeviceCategory": "Endpoint",
        "IsExcluded": excluded,
        "SensorHealthState": "Active",
        "DeviceManualTags": tags or [],
        "AadDeviceId": aad,
        "RiskScore": number * 10,
    }


ROWS = [
    device(1, age=timedelta(days=2), name="host01.contoso.com", platform="Windows10"),
    device(
        1, age=timedelta(days=1), name="HOST01.contoso.com", platform="Windows11", tags=["Gold"]
    ),
    device(2, age=timedelta(hours=3), name="lin01.contoso.com", platform="Linux", aad="aad-2"),
    device(3, age=timedelta(days=40), name="mac01", platform="macOS", excluded=True),
]
TABLES = {"DeviceInfo": ROWS}
ID1, ID2, ID3 = (f"{n:040x}" for n in (1, 2, 3))


def run(query: str) -> list[dict[str, Any]]:
    """The rows a query returns over ROWS."""
    return run_query(query, TABLES, now=NOW)[1]


def schema_of(query: str) -> list[tuple[str, str]]:
    return [(column["Name"], column["Type"]) for column in run_query(query, TABLES, now=NOW)[0]]


def names(query: str) -> list[str]:
    return [row["DeviceName"] for row in run(query)]


def error_of(query: str) -> str:
    with pytest.raises(KqlError) as caught:
        run_query(query, TABLES, now=NOW)
    return str(caught.value)


# --- the mde-api.md sketch and the response shape ----------------------------------------------


def test_sketch_keeps_the_latest_row_per_device_then_filters_on_platform() -> None:
    schema, rows = run_query(
        "DeviceInfo | summarize arg_max(Timestamp, DeviceName, OSPlatform) by DeviceId"
        ' | where OSPlatform startswith "Windows"',
        TABLES,
        now=NOW,
    )
    assert schema == [
        {"Name": "DeviceId", "Type": "String"},
        {"Name": "Timestamp", "Type": "DateTime"},
        {"Name": "DeviceName", "Type": "String"},
        {"Name": "OSPlatform", "Type": "String"},
    ]
    assert rows == [
        {
            "DeviceId": ID1,
            "Timestamp": "2026-11-27T12:00:00Z",
            "DeviceName": "HOST01.contoso.com",
            "OSPlatform": "Windows11",
        }
    ]


def test_bare_table_returns_every_row_with_inferred_types() -> None:
    schema, rows = run_query("DeviceInfo", TABLES, now=NOW)
    assert len(rows) == 4
    assert {c["Name"]: c["Type"] for c in schema} == {
        "Timestamp": "DateTime",
        "DeviceId": "String",
        "DeviceName": "String",
        "OSPlatform": "String",
        "OSVersion": "String",
        "MachineGroup": "String",
        "OnboardingStatus": "String",
        "DeviceCategory": "String",
        "IsExcluded": "Boolean",
        "SensorHealthState": "String",
        "DeviceManualTags": "Dynamic",
        "AadDeviceId": "String",
        "RiskScore": "Int64",
    }
    assert rows[0]["Timestamp"] == "2026-11-26T12:00:00Z"


def test_datetimes_render_as_iso_strings_with_z_and_microseconds() -> None:
    stamp = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    _, rows = run_query("T", {"T": [{"At": stamp}]}, now=NOW)
    assert rows == [{"At": "2026-01-02T03:04:05.123456Z"}]


def test_result_rows_are_copies_and_the_input_is_untouched() -> None:
    rows = run("DeviceInfo | where DeviceId == '" + ID1 + "' | project DeviceManualTags")
    rows[1]["DeviceManualTags"].append("Mutated")
    assert ROWS[1]["DeviceManualTags"] == ["Gold"]
    assert "DeviceManualTags" in ROWS[0]


def test_query_may_span_lines_with_comments() -> None:
    query = """
    // latest state of every device
    DeviceInfo   // the table
    | where Timestamp > ago(30d)   // retention
    | summarize arg_max(Timestamp, *) by DeviceId
    | project DeviceId
    """
    assert [row["DeviceId"] for row in run(query)] == [ID1, ID2]


def test_string_containing_comment_marker_is_not_a_comment() -> None:
    assert run('DeviceInfo | where DeviceName == "//" | count') == [{"Count": 0}]


# --- where: comparisons ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("predicate", "expected"),
    [
        ('OSPlatform == "Linux"', ["lin01.contoso.com"]),
        ('OSPlatform == "linux"', []),
        ('OSPlatform =~ "linux"', ["lin01.contoso.com"]),
        ('OSPlatform != "Linux"', ["host01.contoso.com", "HOST01.contoso.com", "mac01"]),
        ('OSPlatform !~ "WINDOWS10"', ["HOST01.contoso.com", "lin01.contoso.com", "mac01"]),
        ("RiskScore < 20", ["host01.contoso.com", "HOST01.contoso.com"]),
        ("RiskScore <= 20", ["host01.contoso.com", "HOST01.contoso.com", "lin01.contoso.com"]),
        ("RiskScore > 20", ["mac01"]),
        ("RiskScore >= 20.0", ["lin01.contoso.com", "mac01"]),
        ("IsExcluded == true", ["mac01"]),
        ("IsExcluded", ["mac01"]),
        ("IsExcluded != TRUE", ["host01.contoso.com", "HOST01.contoso.com", "lin01.contoso.com"]),
    ],
)
def test_comparison_operators(predicate: str, expected: list[str]) -> None:
    assert names(f"DeviceInfo | where {predicate}") == expected


@pytest.mark.parametrize(
    ("predicate", "expected"),
    [
        ('DeviceName contains "CONTOSO"', ["host01", "HOST01", "lin01"]),
        ('DeviceName !contains "contoso"', ["mac01"]),
        ('DeviceName contains_cs "HOST"', ["HOST01"]),
        ('DeviceName !contains_cs "HOST"', ["host01", "lin01", "mac01"]),
        ('DeviceName startswith "host"', ["host01", "HOST01"]),
        ('DeviceName !startswith "HOST"', ["lin01", "mac01"]),
        ('DeviceName startswith_cs "host"', ["host01"]),
        ('DeviceName endswith ".COM"', ["host01", "HOST01", "lin01"]),
        ('DeviceName !endswith ".com"', ["mac01"]),
        ('DeviceName has "Contoso"', ["host01", "HOST01", "lin01"]),
        ('DeviceName has "cont"', []),
        ('DeviceName has "contoso.com"', ["host01", "HOST01", "lin01"]),
        ('DeviceName has "01.contoso"', []),
        ('DeviceName !has "contoso"', ["mac01"]),
        ('DeviceName has_cs "HOST01"', ["HOST01"]),
        ('DeviceName !has_cs "HOST01"', ["host01", "lin01", "mac01"]),
    ],
)
def test_string_operators(predicate: str, expected: list[str]) -> None:
    found = names(f"DeviceInfo | where {predicate}")
    assert [name.split(".")[0] for name in found] == expected


def test_has_searches_a_dynamic_array_of_tags() -> None:
    assert names('DeviceInfo | where DeviceManualTags has "gold"') == ["HOST01.contoso.com"]


def test_string_operator_on_a_non_string_column_compares_its_text() -> None:
    assert names('DeviceInfo | where RiskScore startswith "3"') == ["mac01"]
    assert names('DeviceInfo | where Timestamp startswith "2026-10"') == ["mac01"]


@pytest.mark.parametrize(
    ("predicate", "expected"),
    [
        ('OSPlatform in ("Linux", "macOS")', ["lin01.contoso.com", "mac01"]),
        ('OSPlatform in ("linux")', []),
        ('OSPlatform in~ ("linux", "MACOS")', ["lin01.contoso.com", "mac01"]),
        ('OSPlatform !in ("Linux", "macOS", "Windows10")', ["HOST01.contoso.com"]),
        ('OSPlatform !in~ ("windows10", "windows11")', ["lin01.contoso.com", "mac01"]),
        ("RiskScore in (10, 30)", ["host01.contoso.com", "HOST01.contoso.com", "mac01"]),
        ("RiskScore in (-1, 5 * 2)", None),
    ],
)
def test_in_operators(predicate: str, expected: list[str] | None) -> None:
    if expected is None:
        assert "Query could not be parsed" in error_of(f"DeviceInfo | where {predicate}")
    else:
        assert names(f"DeviceInfo | where {predicate}") == expected


def test_in_list_must_hold_constants() -> None:
    assert "'in' lists take constants only" in error_of(
        'DeviceInfo | where OSPlatform in ("Linux", DeviceName)'
    )


def test_in_list_accepts_datetimes_and_negative_numbers() -> None:
    assert names("DeviceInfo | where RiskScore in (-10, 20)") == ["lin01.contoso.com"]
    assert names("DeviceInfo | where Timestamp !in (datetime(2026-11-27T12:00:00Z))") == [
        "host01.contoso.com",
        "lin01.contoso.com",
        "mac01",
    ]


def test_and_binds_tighter_than_or() -> None:
    query = 'DeviceInfo | where OSPlatform == "Linux" or OSPlatform == "macOS" and IsExcluded'
    assert names(query) == ["lin01.contoso.com", "mac01"]
    grouped = 'DeviceInfo | where (OSPlatform == "Linux" or OSPlatform == "macOS") and IsExcluded'
    assert names(grouped) == ["mac01"]


def test_not_function_negates_a_predicate() -> None:
    assert names('DeviceInfo | where not(DeviceName contains "contoso")') == ["mac01"]
    assert names("DeviceInfo | where not(IsExcluded) and RiskScore > 10") == ["lin01.contoso.com"]


def test_not_without_parentheses_is_rejected() -> None:
    assert "unexpected 'not'" in error_of("DeviceInfo | where not IsExcluded")


def test_single_quoted_and_verbatim_strings() -> None:
    assert names("DeviceInfo | where DeviceName == 'mac01'") == ["mac01"]
    _, rows = run_query(
        "T | where Path == @'C:\\temp' or Quote == 'it\\'s' or Verbatim == @\"a\"\"b\"",
        {"T": [{"Path": "C:\\temp", "Quote": "", "Verbatim": ""}]},
        now=NOW,
    )
    assert len(rows) == 1
    _, rows = run_query(
        'T | where Quote == \'it\\\'s\' | where Verbatim == @"a""b" | where Tab == "a\\tb"',
        {"T": [{"Quote": "it's", "Verbatim": 'a"b', "Tab": "a\tb"}]},
        now=NOW,
    )
    assert len(rows) == 1


# --- where: time ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("predicate", "count"),
    [
        ("Timestamp > ago(7d)", 3),
        ("Timestamp > ago(1d)", 1),
        ("Timestamp > ago(25h)", 2),
        ("Timestamp > ago(180m)", 0),
        ("Timestamp >= ago(180m)", 1),
        ("Timestamp > ago(10801s)", 1),
        ("Timestamp > ago(10800001ms)", 1),
        ("Timestamp > ago(1.5d)", 2),
        ("Timestamp > ago(3min)", 0),
        ("Timestamp < now()", 4),
        ("Timestamp > now() - 7d", 3),
        ("Timestamp > ago(7d) + 5d", 2),
        ("Timestamp >= datetime(2026-11-27)", 2),
        ("Timestamp == datetime(2026-11-27T12:00:00Z)", 1),
        ("Timestamp == datetime(2026-11-27 12:00:00)", 1),
        ("Timestamp == datetime(2026-11-27T14:00:00+02:00)", 1),
        ("Timestamp == datetime(2026-11-27T12:00:00.0000000Z)", 1),
        ("Timestamp < datetime(2026-10-20)", 1),
        ("now() - Timestamp > 30d", 1),
        ("Timestamp - ago(2d) > 0d", 2),
        ("Timestamp != datetime(null)", 0),
    ],
)
def test_time_predicates(predicate: str, count: int) -> None:
    assert len(run(f"DeviceInfo | where {predicate}")) == count


def test_naive_now_is_taken_as_utc() -> None:
    naive_now = datetime(2026, 11, 28, 12, 0)  # naive is read as UTC
    rows = run_query("DeviceInfo | where Timestamp > ago(1d)", TABLES, now=naive_now)[1]
    assert len(rows) == 1


def test_timespans_render_in_kql_format() -> None:
    _, rows = run_query(
        "DeviceInfo | take 1 | project A = 1d + 2h + 3m + 4s, B = 90ms, C = -(1h), D = 2h",
        TABLES,
        now=NOW,
    )
    assert rows == [{"A": "1.02:03:04", "B": "00:00:00.0900000", "C": "-01:00:00", "D": "02:00:00"}]


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("DeviceInfo | where Timestamp > ago(7x)", "invalid literal '7x'"),
        ("DeviceInfo | where Timestamp > datetime(yesterday)", "invalid datetime literal"),
        ('DeviceInfo | where Timestamp > datetime("2026-01-01")', "invalid datetime literal"),
        ("DeviceInfo | where Timestamp > datetime(2026-01-01", "datetime( is missing its ')'"),
        ("DeviceInfo | where Timestamp > ago(7)", "ago() needs a timespan, got long"),
        ("DeviceInfo | where Timestamp > 2026-01-01", "Cannot compare values of types datetime"),
        ("DeviceInfo | where Timestamp + Timestamp > now()", "operator '+' does not apply"),
        ("DeviceInfo | where -DeviceName == 'x'", "unary '-' does not apply to string"),
        ("DeviceInfo | where now(1) > Timestamp", "'now' takes 0 argument(s), got 1"),
    ],
)
def test_bad_time_expressions_are_rejected(query: str, fragment: str) -> None:
    assert fragment in error_of(query)


# --- where: emptiness and case functions -----------------------------------------------------


def test_isempty_and_isnotempty_treat_missing_strings_as_empty() -> None:
    assert names("DeviceInfo | where isnotempty(AadDeviceId)") == ["lin01.contoso.com"]
    assert len(run("DeviceInfo | where isempty(AadDeviceId)")) == 3
    _, rows = run_query("T | where isempty(Name)", {"T": [{"Name": ""}, {"Name": "x"}]}, now=NOW)
    assert rows == [{"Name": ""}]


def test_isnull_and_isnotnull() -> None:
    assert len(run("DeviceInfo | where isnull(AadDeviceId)")) == 3
    assert names("DeviceInfo | where isnotnull(AadDeviceId)") == ["lin01.contoso.com"]


def test_missing_string_compares_as_the_empty_string() -> None:
    assert len(run('DeviceInfo | where AadDeviceId == ""')) == 3
    assert names('DeviceInfo | where AadDeviceId != ""') == ["lin01.contoso.com"]


def test_missing_non_string_values_fail_every_comparison() -> None:
    table: Tables = {"T": [{"N": 1}, {"N": None}]}
    assert len(run_query("T | where N == 1", table, now=NOW)[1]) == 1
    assert len(run_query("T | where N != 1", table, now=NOW)[1]) == 0
    assert len(run_query("T | where N < 5", table, now=NOW)[1]) == 1
    assert len(run_query("T | where N + 1 > 0", table, now=NOW)[1]) == 1


def test_tolower_and_toupper() -> None:
    assert names('DeviceInfo | where tolower(DeviceName) == "host01.contoso.com"') == [
        "host01.contoso.com",
        "HOST01.contoso.com",
    ]
    assert run('DeviceInfo | where OSPlatform == "macOS" | project P = toupper(OSPlatform)') == [
        {"P": "MACOS"}
    ]


# --- project, project-away, distinct -----------------------------------------------------------


def test_project_keeps_named_columns_in_order() -> None:
    assert schema_of("DeviceInfo | project OSPlatform, DeviceId") == [
        ("OSPlatform", "String"),
        ("DeviceId", "String"),
    ]
    assert run("DeviceInfo | project OSPlatform, DeviceId")[0] == {
        "OSPlatform": "Windows10",
        "DeviceId": ID1,
    }


def test_project_renames_and_computes_columns() -> None:
    query = (
        'DeviceInfo | where OSPlatform == "Linux"'
        " | project Id = DeviceId, Name = tolower(DeviceName), Old = Timestamp < ago(1d)"
    )
    assert run(query) == [{"Id": ID2, "Name": "lin01.contoso.com", "Old": False}]
    assert schema_of(query) == [("Id", "String"), ("Name", "String"), ("Old", "Boolean")]


def test_project_then_where_sees_only_projected_columns() -> None:
    assert "Failed to resolve column 'OSPlatform'" in error_of(
        'DeviceInfo | project DeviceId | where OSPlatform == "Linux"'
    )
    assert names('DeviceInfo | project DeviceName | where DeviceName == "mac01"') == ["mac01"]


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("DeviceInfo | project DeviceId, DeviceId", "column 'DeviceId' is projected twice"),
        ("DeviceInfo | project tolower(DeviceName)", "project needs a name for an expression"),
        ("DeviceInfo | project Nope", "Failed to resolve column 'Nope'"),
        ("DeviceInfo | project", "expected a column name in project, found end of query"),
        ("DeviceInfo | project DeviceId,", "expected a column name in project"),
    ],
)
def test_bad_projections_are_rejected(query: str, fragment: str) -> None:
    assert fragment in error_of(query)


def test_project_away_drops_columns() -> None:
    schema = schema_of("DeviceInfo | project-away Timestamp, DeviceManualTags, RiskScore")
    assert [name for name, _ in schema] == [
        "DeviceId",
        "DeviceName",
        "OSPlatform",
        "OSVersion",
        "MachineGroup",
        "OnboardingStatus",
        "DeviceCategory",
        "IsExcluded",
        "SensorHealthState",
        "AadDeviceId",
    ]
    assert "Timestamp" not in run("DeviceInfo | project-away Timestamp")[0]
    assert "Failed to resolve column 'Nope'" in error_of("DeviceInfo | project-away Nope")


def test_distinct_returns_unique_combinations_in_first_seen_order() -> None:
    assert run("DeviceInfo | distinct DeviceId") == [
        {"DeviceId": ID1},
        {"DeviceId": ID2},
        {"DeviceId": ID3},
    ]
    assert run("DeviceInfo | distinct MachineGroup, OnboardingStatus") == [
        {"MachineGroup": "Servers", "OnboardingStatus": "Onboarded"}
    ]


def test_distinct_star_deduplicates_whole_rows_including_dynamic_values() -> None:
    table: Tables = {"T": [{"A": 1, "B": ["x"]}, {"A": 1, "B": ["x"]}, {"A": 1, "B": ["y"]}]}
    assert run_query("T | distinct *", table, now=NOW)[1] == [
        {"A": 1, "B": ["x"]},
        {"A": 1, "B": ["y"]},
    ]


# --- summarize ---------------------------------------------------------------------------------


def test_arg_max_star_keeps_every_column_of_the_latest_row() -> None:
    query = "DeviceInfo | summarize arg_max(Timestamp, *) by DeviceId"
    rows = run(query)
    assert [row["DeviceName"] for row in rows] == [
        "HOST01.contoso.com",
        "lin01.contoso.com",
        "mac01",
    ]
    columns = [name for name, _ in schema_of(query)]
    assert columns[:3] == ["DeviceId", "Timestamp", "DeviceName"]
    assert columns.count("DeviceId") == 1
    assert len(columns) == len(ROWS[0])


def test_arg_min_keeps_the_earliest_row() -> None:
    rows = run("DeviceInfo | summarize arg_min(Timestamp, DeviceName) by DeviceId")
    assert rows[0] == {
        "DeviceId": ID1,
        "Timestamp": "2026-11-26T12:00:00Z",
        "DeviceName": "host01.contoso.com",
    }


def test_arg_max_ignores_null_keys() -> None:
    table: Tables = {"T": [{"K": "a", "T": 2, "V": "two"}, {"K": "a", "T": None, "V": "none"}]}
    assert run_query("T | summarize arg_max(T, V) by K", table, now=NOW)[1] == [
        {"K": "a", "T": 2, "V": "two"}
    ]
    only_null: Tables = {"T": [{"K": "a", "T": None, "V": "none"}]}
    assert run_query("T | summarize arg_max(T, V) by K", only_null, now=NOW)[1] == [
        {"K": "a", "T": None, "V": "none"}
    ]


def test_arg_max_renames_a_column_that_clashes_with_a_by_column() -> None:
    query = "DeviceInfo | summarize arg_max(Timestamp, DeviceId) by DeviceId"
    assert [name for name, _ in schema_of(query)] == ["DeviceId", "Timestamp", "DeviceId1"]


def test_arg_max_without_by_picks_one_row_overall() -> None:
    assert run("DeviceInfo | summarize arg_max(RiskScore, DeviceName)") == [
        {"RiskScore": 30, "DeviceName": "mac01"}
    ]


def test_count_by_column_counts_each_group() -> None:
    query = "DeviceInfo | summarize count() by DeviceId"
    assert run(query) == [
        {"DeviceId": ID1, "count_": 2},
        {"DeviceId": ID2, "count_": 1},
        {"DeviceId": ID3, "count_": 1},
    ]
    assert schema_of(query) == [("DeviceId", "String"), ("count_", "Int64")]


def test_named_count_and_other_aggregates() -> None:
    query = (
        "DeviceInfo"
        " | summarize Devices = dcount(DeviceId), max(RiskScore), min(Timestamp), n = count()"
    )
    assert run(query) == [
        {"Devices": 3, "max_RiskScore": 30, "min_Timestamp": "2026-10-19T12:00:00Z", "n": 4}
    ]
    assert schema_of(query) == [
        ("Devices", "Int64"),
        ("max_RiskScore", "Int64"),
        ("min_Timestamp", "DateTime"),
        ("n", "Int64"),
    ]


def test_summarize_without_by_over_no_rows_still_counts_zero() -> None:
    assert run('DeviceInfo | where DeviceName == "none" | summarize count()') == [{"count_": 0}]
    assert run('DeviceInfo | where DeviceName == "none" | summarize max(RiskScore)') == [
        {"max_RiskScore": None}
    ]


def test_summarize_by_alone_lists_distinct_groups() -> None:
    assert run("DeviceInfo | summarize by OSVersion, MachineGroup") == [
        {"OSVersion": "10.0", "MachineGroup": "Servers"}
    ]


def test_summarize_groups_by_several_columns() -> None:
    rows = run("DeviceInfo | summarize count() by DeviceId, OSPlatform")
    assert len(rows) == 4


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("DeviceInfo | summarize sum(RiskScore)", "unsupported aggregation function 'sum'"),
        ("DeviceInfo | summarize x = arg_max(Timestamp, *) by DeviceId", "cannot be given a name"),
        ("DeviceInfo | summarize", "summarize needs an aggregation or a by clause"),
        ("DeviceInfo | summarize count() by Nope", "Failed to resolve column 'Nope'"),
        ("DeviceInfo | summarize arg_max(Nope, *) by DeviceId", "Failed to resolve column 'Nope'"),
        ("DeviceInfo | summarize arg_max(Timestamp, Nope)", "Failed to resolve column 'Nope'"),
        ("DeviceInfo | summarize max(Nope)", "Failed to resolve column 'Nope'"),
        ("DeviceInfo | summarize count(", "expected ')' after 'count('"),
        ("DeviceInfo | summarize count by DeviceId", "expected '(' after 'count'"),
        ("DeviceInfo | summarize arg_max(Timestamp, *", "expected ')' to close arg_max("),
        ("DeviceInfo | summarize max(RiskScore", "expected ')' to close max("),
    ],
)
def test_bad_summarize_is_rejected(query: str, fragment: str) -> None:
    assert fragment in error_of(query)


# --- take, top, order, count ------------------------------------------------------------------


def test_take_and_limit_keep_the_first_rows() -> None:
    assert names("DeviceInfo | take 2") == ["host01.contoso.com", "HOST01.contoso.com"]
    assert names("DeviceInfo | limit 1") == ["host01.contoso.com"]
    assert names("DeviceInfo | take 0") == []
    assert len(run("DeviceInfo | take 100")) == 4


@pytest.mark.parametrize("count", ["-1", "1.5", "x", "", "'3'"])
def test_take_needs_a_whole_number(count: str) -> None:
    assert "take needs a whole number of rows" in error_of(f"DeviceInfo | take {count}")


def test_top_sorts_descending_by_default() -> None:
    assert names("DeviceInfo | top 2 by Timestamp") == ["lin01.contoso.com", "HOST01.contoso.com"]
    assert names("DeviceInfo | top 1 by Timestamp asc") == ["mac01"]
    assert names("DeviceInfo | top 1 by RiskScore desc") == ["mac01"]


def test_top_needs_by() -> None:
    assert "expected 'by' after 'top 2'" in error_of("DeviceInfo | top 2 Timestamp")


def test_order_by_sorts_descending_by_default_and_asc_on_request() -> None:
    assert names("DeviceInfo | order by Timestamp") == [
        "lin01.contoso.com",
        "HOST01.contoso.com",
        "host01.contoso.com",
        "mac01",
    ]
    assert names("DeviceInfo | sort by DeviceName asc") == [
        "HOST01.contoso.com",
        "host01.contoso.com",
        "lin01.contoso.com",
        "mac01",
    ]


def test_order_by_several_keys_is_stable() -> None:
    assert names("DeviceInfo | order by DeviceId asc, Timestamp desc") == [
        "HOST01.contoso.com",
        "host01.contoso.com",
        "lin01.contoso.com",
        "mac01",
    ]
    assert names("DeviceInfo | order by MachineGroup asc") == [row["DeviceName"] for row in ROWS]


def test_nulls_sort_last_descending_and_first_ascending_unless_told() -> None:
    table: Tables = {"T": [{"N": 2}, {"N": None}, {"N": 1}]}

    def order(clause: str) -> list[Any]:
        return [row["N"] for row in run_query(f"T | order by {clause}", table, now=NOW)[1]]

    assert order("N") == [2, 1, None]
    assert order("N asc") == [None, 1, 2]
    assert order("N asc nulls last") == [1, 2, None]
    assert order("N desc nulls first") == [None, 2, 1]
    assert "expected first or last" in error_of("DeviceInfo | order by RiskScore nulls never")


def test_order_by_an_expression_and_mixed_dynamic_values() -> None:
    assert names("DeviceInfo | order by now() - Timestamp asc | take 1") == ["lin01.contoso.com"]
    table: Tables = {"T": [{"V": "b"}, {"V": 3}, {"V": ["x"]}, {"V": True}]}
    assert [r["V"] for r in run_query("T | order by V asc", table, now=NOW)[1]] == [
        True,
        3,
        "b",
        ["x"],
    ]


def test_count_returns_one_row() -> None:
    assert run_query("DeviceInfo | count", TABLES, now=NOW) == (
        [{"Name": "Count", "Type": "Int64"}],
        [{"Count": 4}],
    )
    assert run("DeviceInfo | where IsExcluded | count") == [{"Count": 1}]


def test_stages_chain_in_order() -> None:
    query = (
        "DeviceInfo | summarize arg_max(Timestamp, *) by DeviceId"
        " | where Timestamp > ago(30d) | order by DeviceName asc | project DeviceName | take 1"
    )
    assert run(query) == [{"DeviceName": "HOST01.contoso.com"}]


# --- tables, columns and schemas ---------------------------------------------------------------


def test_unknown_table_is_rejected() -> None:
    assert error_of("Devices | take 1") == "Failed to resolve table 'Devices' (line 1, column 1)"
    assert "Failed to resolve table 'deviceinfo'" in error_of("deviceinfo | take 1")


def test_column_names_are_case_sensitive() -> None:
    message = error_of('DeviceInfo | where devicename == "x"')
    assert message.startswith("Failed to resolve column 'devicename'; available: Timestamp, ")
    assert message.endswith("(line 1, column 20)")


def test_operator_names_are_case_sensitive() -> None:
    assert "unsupported operator 'Where'" in error_of("DeviceInfo | Where IsExcluded")


def test_explicit_schema_types_columns_of_an_empty_table() -> None:
    schemas = {"DeviceInfo": {"DeviceId": "String", "Timestamp": "DateTime"}}
    schema, rows = run_query(
        "DeviceInfo | where Timestamp > ago(1d) | project DeviceId",
        {"DeviceInfo": []},
        now=NOW,
        schemas=schemas,
    )
    assert schema == [{"Name": "DeviceId", "Type": "String"}]
    assert rows == []
    with pytest.raises(KqlError, match="Failed to resolve column 'Nope'"):
        run_query("DeviceInfo | project Nope", {"DeviceInfo": []}, now=NOW, schemas=schemas)


def test_empty_table_without_a_schema_accepts_any_column() -> None:
    schema, rows = run_query(
        'DeviceInfo | where Anything == "x" | project Anything', {"DeviceInfo": []}, now=NOW
    )
    assert schema == [{"Name": "Anything", "Type": "Dynamic"}]
    assert rows == []


def test_rows_with_different_keys_union_their_columns() -> None:
    table: Tables = {"T": [{"A": 1}, {"A": 2, "B": "x"}]}
    schema, rows = run_query("T", table, now=NOW)
    assert schema == [{"Name": "A", "Type": "Int64"}, {"Name": "B", "Type": "String"}]
    assert rows == [{"A": 1, "B": None}, {"A": 2, "B": "x"}]


def test_real_and_unknown_python_values_get_types() -> None:
    table: Tables = {"T": [{"R": 1.5, "S": timedelta(hours=1), "O": object(), "N": None}]}
    assert run_query("T | project-away O", table, now=NOW)[0] == [
        {"Name": "R", "Type": "Double"},
        {"Name": "S", "Type": "TimeSpan"},
        {"Name": "N", "Type": "Dynamic"},
    ]


# --- rejected syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "operator", ["join kind=inner (DeviceInfo) on DeviceId", "extend X = 1", "mv-expand Tags"]
)
def test_unsupported_operators_are_rejected_by_name(operator: str) -> None:
    name = operator.split(maxsplit=1)[0]
    assert error_of(f"DeviceInfo | {operator}") == (
        f"Query could not be parsed: unsupported operator '{name}' (line 1, column 14)"
    )


def test_error_location_counts_lines_and_columns() -> None:
    message = error_of("DeviceInfo\n| where IsExcluded\n  | join (X) on Y")
    assert message.endswith("unsupported operator 'join' (line 3, column 5)")


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("", "the query is empty"),
        ("   // only a comment", "the query is empty"),
        ("| take 1", "expected a table name, found '|'"),
        ("let x = 1; DeviceInfo", "unsupported statement 'let'"),
        ("DeviceInfo DeviceInfo", "unexpected 'DeviceInfo'; expected '|'"),
        ("DeviceInfo |", "expected an operator after '|', found end of query"),
        ("DeviceInfo | 5", "expected an operator after '|', found '5'"),
        ("DeviceInfo | where", "unexpected end of query; expected a value"),
        ("DeviceInfo | where | take 1", "unexpected '|'; expected a value"),
        ('DeviceInfo | where DeviceName == "x', "unterminated string literal (line 1, column 34)"),
        ("DeviceInfo | where DeviceName == 'x\n'", "unterminated string literal"),
        ("DeviceInfo | where DeviceName == #", "unexpected character '#'"),
        ("DeviceInfo | where (IsExcluded", "missing ')' to close the '(' opened at line 1"),
        ("DeviceInfo | where IsExcluded)", "unexpected ')'; expected '|'"),
        ("DeviceInfo | where RiskScore between (1 .. 2)", "unsupported operator 'between'"),
        ("DeviceInfo | where DeviceName matches regex 'x'", "unsupported operator 'matches'"),
        ("DeviceInfo | where DeviceName !between 'x'", "unsupported operator '!between'"),
        ("DeviceInfo | where strlen(DeviceName) > 3", "Unknown function 'strlen'"),
        ("DeviceInfo | where isempty(DeviceName, 1)", "'isempty' takes 1 argument(s), got 2"),
        ("DeviceInfo | where RiskScore == 1.2.3", "unexpected '.'"),
        ("DeviceInfo | where DeviceName == and", "unexpected 'and'; expected a value"),
        ("DeviceInfo | where OSPlatform in 'x'", "expected '(' after 'in'"),
        ("DeviceInfo | where OSPlatform in ('x'", "expected ')' to close the 'in' list"),
    ],
)
def test_malformed_queries_are_rejected(query: str, fragment: str) -> None:
    assert fragment in error_of(query)


@pytest.mark.parametrize(
    ("predicate", "fragment"),
    [
        ("DeviceName == 5", "Cannot compare values of types string and long with '=='"),
        ("DeviceName < 'b'", "Cannot compare values of types string and string with '<'"),
        ("IsExcluded > false", "Cannot compare values of types bool and bool"),
        ("RiskScore =~ 10", "Cannot compare values of types long and long with '=~'"),
        ("Timestamp == 7d", "Cannot compare values of types datetime and timespan"),
        ("DeviceName", "where needs a bool predicate, got string"),
        ("RiskScore and IsExcluded", "'and' needs bool operands, got long"),
        ("IsExcluded or DeviceName", "'or' needs bool operands, got string"),
        ("not(RiskScore)", "'not' needs bool operands, got long"),
        ("DeviceName contains 5", "'contains' needs a string on the right, got long"),
    ],
)
def test_type_errors_are_rejected(predicate: str, fragment: str) -> None:
    assert fragment in error_of(f"DeviceInfo | where {predicate}")


def test_numbers_of_either_kind_compare_with_each_other() -> None:
    assert names("DeviceInfo | where RiskScore == 30.0") == ["mac01"]
    assert names("DeviceInfo | where RiskScore + 0.5 > 30") == ["mac01"]


def test_dynamic_values_compare_and_compute_without_crashing() -> None:
    assert names("DeviceInfo | where DeviceManualTags == true") == []
    assert names("DeviceInfo | where DeviceManualTags > 5") == []
    assert names('DeviceInfo | where IsExcluded contains "tru"') == ["mac01"]
    rows = run(
        "DeviceInfo | take 1 | project X = DeviceManualTags + 1, Y = 1h + datetime(2026-01-01)"
    )
    assert rows == [{"X": None, "Y": "2026-01-01T01:00:00Z"}]
    assert schema_of("DeviceInfo | take 1 | project X = DeviceManualTags - 1") == [("X", "Dynamic")]


def test_in_treats_a_missing_string_as_empty() -> None:
    assert len(run('DeviceInfo | where AadDeviceId in ("")')) == 3


def test_has_with_an_empty_needle_matches_everything() -> None:
    assert len(run('DeviceInfo | where DeviceName has ""')) == 4


def test_datetime_literal_may_have_a_space_before_its_parenthesis() -> None:
    assert len(run("DeviceInfo | where Timestamp > datetime (2026-11-27)")) == 2
    _, rows = run_query("T | where datetime == 1", {"T": [{"datetime": 1}]}, now=NOW)
    assert rows == [{"datetime": 1}]


def test_impossible_calendar_date_is_rejected() -> None:
    assert "invalid datetime literal '2026-02-30'" in error_of(
        "DeviceInfo | where Timestamp > datetime(2026-02-30)"
    )


def test_repeated_arg_max_columns_get_numbered_names() -> None:
    query = "DeviceInfo | summarize arg_max(Timestamp, DeviceId, DeviceId) by DeviceId"
    assert [name for name, _ in schema_of(query)] == [
        "DeviceId",
        "Timestamp",
        "DeviceId1",
        "DeviceId2",
    ]


def test_kql_error_is_a_value_error() -> None:
    assert issubclass(KqlError, ValueError)


# --- properties ----------------------------------------------------------------------------------

PREDICATES = [
    'OSPlatform == "Linux"',
    'DeviceName contains "a"',
    "RiskScore > 3",
    "IsExcluded",
    "Timestamp > ago(2d)",
    'OSPlatform in~ ("windows10", "macos")',
    'DeviceName has "x"',
]

random_rows = st.lists(
    st.fixed_dictionaries(
        {
            "DeviceName": st.text(alphabet="abx. ", max_size=6),
            "OSPlatform": st.sampled_from(["Linux", "Windows10", "macOS"]),
            "RiskScore": st.integers(0, 6),
            "IsExcluded": st.booleans(),
            "Timestamp": st.integers(0, 96).map(lambda hours: NOW - timedelta(hours=hours)),
        }
    ),
    min_size=1,
    max_size=15,
)


def chosen(predicate: str, rows: list[dict[str, Any]]) -> set[int]:
    numbered = [{**row, "N": index} for index, row in enumerate(rows)]
    result = run_query(f"T | where {predicate} | project N", {"T": numbered}, now=NOW)[1]
    return {row["N"] for row in result}


@given(random_rows, st.sampled_from(PREDICATES), st.sampled_from(PREDICATES))
def test_where_or_is_the_union_and_and_the_intersection(
    rows: list[dict[str, Any]], left: str, right: str
) -> None:
    a, b = chosen(left, rows), chosen(right, rows)
    assert chosen(f"{left} or {right}", rows) == a | b
    assert chosen(f"({left}) and ({right})", rows) == a & b
    assert chosen(f"not({left})", rows) == set(range(len(rows))) - a


@given(random_rows, st.integers(0, 20))
def test_take_returns_a_prefix_and_count_counts(rows: list[dict[str, Any]], n: int) -> None:
    _, taken = run_query(f"T | take {n}", {"T": rows}, now=NOW)
    assert len(taken) == min(n, len(rows))
    _, counted = run_query("T | count", {"T": rows}, now=NOW)
    assert counted == [{"Count": len(rows)}]
