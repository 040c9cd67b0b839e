"""The emulator's OData ``$filter`` engine: documented syntax accepted, the rest rejected."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bulkoffboard.emulator.odata import ODataError, parse_datetime, parse_filter

MACHINE_PROPERTIES = (
    "computerDnsName",
    "id",
    "version",
    "deviceValue",
    "aadDeviceId",
    "machineTags",
    "lastSeen",
    "exposureLevel",
    "onboardingStatus",
    "lastIpAddress",
    "healthStatus",
    "osPlatform",
    "riskScore",
    "rbacGroupId",
)
ACTION_PROPERTIES = ("id", "status", "machineId", "type", "requestor", "creationDateTimeUtc")

MACHINE: dict[str, Any] = {
    "id": "1e5bc9d7e413ddd7902c2932e418702b84d0cc07",
    "computerDnsName": "MyMachine1.contoso.com",
    "osPlatform": "Windows10",
    "healthStatus": "Inactive",
    "onboardingStatus": "Onboarded",
    "riskScore": "Medium",
    "exposureLevel": "Low",
    "deviceValue": "Normal",
    "lastSeen": "2026-11-28T10:00:00.123456Z",
    "machineTags": ["Tag", "Finance"],
    "rbacGroupId": 140,
    "aadDeviceId": None,
    "lastIpAddress": "10.0.0.4",
    "version": "22H2",
}


def matches(text: str, entity: dict[str, Any] | None = None) -> bool:
    """Whether the filter matches ``entity`` (MACHINE by default)."""
    return parse_filter(text, MACHINE_PROPERTIES)(MACHINE if entity is None else entity)


def machine(**changes: Any) -> dict[str, Any]:
    return {**MACHINE, **changes}


def error_of(text: str, properties: tuple[str, ...] = MACHINE_PROPERTIES) -> str:
    with pytest.raises(ODataError) as caught:
        parse_filter(text, properties)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- official examples (mde-api.md sections 3 and 4) -----------------------------------------


def test_ne_official_example_matches_a_different_health_status() -> None:
    assert matches("healthStatus ne 'Active'")
    assert not matches("healthStatus ne 'Inactive'")


def test_date_only_literal_with_z_official_example_compares_as_a_datetime() -> None:
    assert matches("lastSeen gt 2018-08-01Z")
    assert not matches("lastSeen gt 2027-08-01Z")


def test_startswith_official_example_is_case_insensitive() -> None:
    assert matches("startswith(computerDnsName,'mymachine')")
    assert not matches("startswith(computerDnsName,'other')")


def test_any_lambda_official_example_matches_a_tag() -> None:
    assert matches("machineTags/any(tag: tag eq 'Tag')")
    assert not matches("machineTags/any(tag: tag eq 'Missing')")


def test_requestor_and_type_official_example_on_machine_actions() -> None:
    predicate = parse_filter("requestor eq 'a@b' and type eq 'RunAntiVirusScan'", ACTION_PROPERTIES)
    assert predicate({"requestor": "a@b", "type": "RunAntiVirusScan"})
    assert not predicate({"requestor": "a@b", "type": "Offboard"})
    assert not predicate({"requestor": "c@d", "type": "RunAntiVirusScan"})


def test_machine_id_eq_official_example_on_machine_actions() -> None:
    predicate = parse_filter(f"machineId eq '{MACHINE['id']}'", ACTION_PROPERTIES)
    assert predicate({"machineId": MACHINE["id"]})
    assert not predicate({"machineId": "0" * 40})


def test_creation_datetime_ge_full_datetime_literal() -> None:
    predicate = parse_filter("creationDateTimeUtc ge 2024-01-01T00:00:00Z", ACTION_PROPERTIES)
    assert predicate({"creationDateTimeUtc": "2024-01-01T00:00:00Z"})
    assert predicate({"creationDateTimeUtc": "2026-11-28T10:00:00.1234567Z"})
    assert not predicate({"creationDateTimeUtc": "2023-12-31T23:59:59.999Z"})


# --- comparison operators ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("osPlatform eq 'Windows10'", True),
        ("osPlatform eq 'windows10'", True),
        ("osPlatform eq 'Windows11'", False),
        ("osPlatform ne 'WINDOWS10'", False),
        ("osPlatform ne 'Linux'", True),
        ("osPlatform gt 'linux'", True),
        ("osPlatform ge 'WINDOWS10'", True),
        ("osPlatform lt 'windows2'", True),
        ("osPlatform le 'windows10'", True),
        ("osPlatform lt 'Linux'", False),
    ],
)
def test_string_comparisons_are_case_insensitive(text: str, expected: bool) -> None:
    assert matches(text) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("rbacGroupId eq 140", True),
        ("rbacGroupId eq '140'", True),
        ("rbacGroupId ne 140", False),
        ("rbacGroupId gt 139", True),
        ("rbacGroupId gt 140", False),
        ("rbacGroupId ge 140", True),
        ("rbacGroupId lt 140.5", True),
        ("rbacGroupId le 139.99", False),
        ("rbacGroupId gt -1", True),
    ],
)
def test_numbers_compare_numerically(text: str, expected: bool) -> None:
    assert matches(text) is expected


def test_number_literal_matches_a_numeric_string_entity_value() -> None:
    assert matches("rbacGroupId eq 140", machine(rbacGroupId="140"))
    assert matches("rbacGroupId eq '140'", machine(rbacGroupId="140"))
    assert matches("rbacGroupId lt 1000", machine(rbacGroupId="140"))
    assert not matches("rbacGroupId eq 140", machine(rbacGroupId="group-140"))


def test_literal_may_stand_on_the_left() -> None:
    assert matches("'Inactive' eq healthStatus")
    assert matches("2024-01-01T00:00:00Z lt lastSeen")
    assert not matches("150 lt rbacGroupId")


def test_datetime_literals_with_offsets_and_fractions_compare_as_instants() -> None:
    assert matches("lastSeen eq 2026-11-28T10:00:00.123456Z")
    assert matches("lastSeen eq 2026-11-28T12:00:00.123456+02:00")
    assert matches("lastSeen gt 2026-11-28T10:00:00.123Z")
    assert matches("lastSeen lt 2026-11-28T10:00:00.1235-00:00")
    assert matches("lastSeen ge 2026-11-28T10:00Z")


def test_date_only_literal_without_z_is_midnight_utc() -> None:
    assert matches("lastSeen ge 2026-11-28")
    assert not matches("lastSeen ge 2026-11-29")


def test_quoted_datetime_compares_as_a_datetime_against_a_datetime_string() -> None:
    assert matches("lastSeen gt '2026-11-28T11:00:00+02:00'")
    assert not matches("lastSeen gt '2026-11-28T11:00:00Z'")


def test_datetime_literal_against_a_datetime_object_entity_value() -> None:
    entity = machine(lastSeen=datetime(2026, 11, 28, 10, tzinfo=UTC))
    assert matches("lastSeen eq 2026-11-28T10:00:00Z", entity)
    naive = machine(lastSeen=datetime(2026, 11, 28, 10))  # naive is read as UTC
    assert matches("lastSeen eq 2026-11-28T10:00:00Z", naive)


def test_datetime_literal_against_a_non_datetime_value_is_not_equal() -> None:
    assert not matches("healthStatus eq 2026-11-28")
    assert matches("healthStatus ne 2026-11-28")


def test_null_literal_matches_missing_and_none_values() -> None:
    assert matches("aadDeviceId eq null")
    assert matches("aadDeviceId eq null", {"id": "x"})
    assert not matches("aadDeviceId ne null")
    assert matches("aadDeviceId ne null", machine(aadDeviceId="80fe8ff8-0000"))
    assert matches("null eq aadDeviceId")


@pytest.mark.parametrize("op", ["gt", "ge", "lt", "le"])
def test_ordering_against_a_missing_value_is_false(op: str) -> None:
    assert not matches(f"aadDeviceId {op} 'a'")
    assert not matches(f"lastSeen {op} 2020-01-01Z", machine(lastSeen=None))


def test_values_that_do_not_compare_are_unequal() -> None:
    assert not matches("machineTags eq 'Tag'")
    assert matches("machineTags ne 'Tag'")
    assert not matches("machineTags gt 'A'")
    assert not matches("rbacGroupId eq true")


def test_numbers_and_datetimes_against_unrelated_entity_values_are_unequal() -> None:
    assert not matches("rbacGroupId gt 1", machine(rbacGroupId=[1, 2]))
    assert matches("rbacGroupId ne 1", machine(rbacGroupId=[1, 2]))
    assert not matches("lastSeen gt 2020-01-01", machine(lastSeen=5))


def test_boolean_literals_compare_with_boolean_values() -> None:
    props = ("isolated",)
    assert parse_filter("isolated eq true", props)({"isolated": True})
    assert not parse_filter("isolated eq false", props)({"isolated": True})
    assert parse_filter("isolated ne false", props)({"isolated": True})


def test_doubled_single_quote_is_an_escaped_quote() -> None:
    entity = machine(computerDnsName="o'brien-pc")
    assert matches("computerDnsName eq 'O''Brien-PC'", entity)
    assert matches("contains(computerDnsName, '''')", entity)


# --- logic and precedence ---------------------------------------------------------------------


def test_and_requires_both_sides() -> None:
    assert matches("osPlatform eq 'Windows10' and healthStatus eq 'Inactive'")
    assert not matches("osPlatform eq 'Windows10' and healthStatus eq 'Active'")


def test_or_requires_either_side() -> None:
    assert matches("osPlatform eq 'Linux' or healthStatus eq 'Inactive'")
    assert not matches("osPlatform eq 'Linux' or healthStatus eq 'Active'")


def test_and_binds_tighter_than_or() -> None:
    # true or (false and false): true; (true or false) and false would be false.
    text = "osPlatform eq 'Windows10' or healthStatus eq 'Active' and riskScore eq 'High'"
    assert matches(text)
    assert not matches(
        "(osPlatform eq 'Windows10' or healthStatus eq 'Active') and riskScore eq 'High'"
    )


def test_not_negates_a_function_call_or_a_parenthesized_condition() -> None:
    assert matches("not startswith(computerDnsName, 'other')")
    assert not matches("not (healthStatus eq 'Inactive')")
    assert matches("not not (healthStatus eq 'Inactive')")


def test_not_binds_tighter_than_and() -> None:
    assert matches("not contains(computerDnsName, 'zzz') and osPlatform eq 'Windows10'")


def test_not_before_a_bare_comparison_is_rejected_with_a_hint() -> None:
    message = error_of("not healthStatus eq 'Active'")
    assert "'not' needs a condition" in message
    assert "not (a eq b)" in message


def test_keywords_are_case_insensitive() -> None:
    assert matches("healthStatus EQ 'inactive' AND NOT (osPlatform Eq 'Linux') Or true")
    assert matches("aadDeviceId eq NULL")


def test_property_names_match_case_insensitively_and_read_the_canonical_key() -> None:
    assert matches("HEALTHSTATUS eq 'Inactive'")
    assert matches("computerdnsname eq 'mymachine1.contoso.com'")


def test_entity_keys_spelled_differently_are_found_case_insensitively() -> None:
    predicate = parse_filter("externalId eq 'abc'", ("externalId",))
    assert predicate({"externalID": "ABC"})


def test_bare_true_and_false_are_conditions() -> None:
    assert matches("true")
    assert not matches("false")
    assert matches("(true)")


# --- functions ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("startswith(computerDnsName, 'MYMACHINE1')", True),
        ("endswith(computerDnsName, '.CONTOSO.com')", True),
        ("endswith(computerDnsName, 'contoso')", False),
        ("contains(computerDnsName, 'Machine1.Con')", True),
        ("contains(computerDnsName, 'fabrikam')", False),
        ("STARTSWITH(computerDnsName, 'my')", True),
        ("startswith(rbacGroupId, '14')", True),
        ("contains(aadDeviceId, 'a')", False),
        ("contains(machineTags, 'Tag')", False),
        ("startswith(computerDnsName, 'my') eq true", True),
        ("contains(computerDnsName, 'zzz') eq false", True),
    ],
)
def test_string_functions_are_case_insensitive(text: str, expected: bool) -> None:
    assert matches(text) is expected


def test_tolower_and_toupper_transform_before_comparing() -> None:
    assert matches("tolower(computerDnsName) eq 'mymachine1.contoso.com'")
    assert matches("toupper(osPlatform) eq 'WINDOWS10'")
    assert matches("startswith(tolower(computerDnsName), 'mym')")
    assert matches("tolower(aadDeviceId) eq null")


def test_unknown_function_is_rejected_with_the_supported_list() -> None:
    message = error_of("length(computerDnsName) gt 3")
    assert "unknown function 'length' at position 0" in message
    assert "startswith" in message


def test_function_with_the_wrong_number_of_arguments_is_rejected() -> None:
    assert "takes 2 arguments, got 1" in error_of("startswith(computerDnsName)")
    assert "takes 1 argument, got 2" in error_of("tolower(computerDnsName, 'x') eq 'y'")
    assert "got 0" in error_of("contains() eq true")


def test_function_missing_its_closing_parenthesis_is_rejected() -> None:
    assert "expected ')'" in error_of("startswith(computerDnsName, 'x'")


# --- lambdas -----------------------------------------------------------------------------------


def test_any_lambda_matches_a_tag_case_insensitively() -> None:
    assert matches("machineTags/any(tag: tag eq 'finance')")


def test_any_lambda_accepts_any_variable_name() -> None:
    assert matches("machineTags/any(t: t eq 'Tag')")
    assert matches("machineTags/ANY(x_1: x_1 ne 'Nope')")


def test_any_lambda_body_may_use_functions_and_or() -> None:
    assert matches("machineTags/any(t: startswith(t, 'fin') or t eq 'zzz')")
    assert matches("machineTags/any(t: endswith(t, 'ANCE') and contains(t, 'nan'))")
    assert not matches("machineTags/any(t: contains(t, 'x') or t eq 'y')")


def test_any_lambda_body_may_refer_to_entity_properties() -> None:
    assert matches("machineTags/any(t: t eq 'Tag' and osPlatform eq 'Windows10')")
    assert not matches("machineTags/any(t: t eq 'Tag' and osPlatform eq 'Linux')")


def test_any_lambda_is_false_for_empty_or_missing_collections() -> None:
    assert not matches("machineTags/any(t: t eq 'Tag')", machine(machineTags=[]))
    assert not matches("machineTags/any(t: t eq 'Tag')", machine(machineTags=None))
    assert not matches("machineTags/any(t: t eq 'Tag')", machine(machineTags="Tag"))


def test_empty_any_matches_a_non_empty_collection() -> None:
    assert matches("machineTags/any()")
    assert not matches("machineTags/any()", machine(machineTags=[]))
    assert not matches("machineTags/any()", machine(machineTags=None))
    assert matches("not machineTags/any()", machine(machineTags=[]))


def test_all_lambda_requires_every_element() -> None:
    assert matches("machineTags/all(t: t ne 'Other')")
    assert not matches("machineTags/all(t: t eq 'Tag')")
    assert matches("machineTags/all(t: t eq 'Tag')", machine(machineTags=[]))


def test_all_without_a_lambda_is_rejected() -> None:
    assert "all() at position 12 needs a lambda" in error_of("machineTags/all()")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("machineTags/count() gt 1", "expected any or all after 'machineTags/'"),
        ("machineTags/any(t t eq 'x')", "expected ':' after lambda variable 't'"),
        ("machineTags/any(eq: eq eq 'x')", "expected a lambda variable name"),
        ("machineTags/any(t: t)", "the any() body needs a condition"),
        ("machineTags/any(t: t eq 'x'", "expected ')' to close machineTags/any("),
        ("machineTags/any(t: t/x eq 'x')", "unsupported path after lambda variable"),
        ("machineTags/any(t: u eq 'x')", "property 'u' (position 19) is not filterable"),
    ],
)
def test_malformed_lambdas_are_rejected(text: str, fragment: str) -> None:
    assert fragment in error_of(text)


def test_lambda_variable_is_out_of_scope_after_the_lambda() -> None:
    assert "property 't'" in error_of("machineTags/any(t: t eq 'x') and t eq 'y'")


# --- in ----------------------------------------------------------------------------------------


def test_in_matches_any_listed_value_case_insensitively() -> None:
    assert matches("osPlatform in ('Windows10','Windows11')")
    assert matches("osPlatform in ('windows10')")
    assert not matches("osPlatform in ('Linux', 'macOS')")


def test_in_accepts_numbers_and_null() -> None:
    assert matches("rbacGroupId in (1, 140)")
    assert matches("aadDeviceId in ('x', null)")


def test_not_in_via_not_and_parentheses() -> None:
    assert matches("not (osPlatform in ('Linux'))")


def test_in_with_an_empty_or_non_literal_list_is_rejected() -> None:
    assert "empty list after 'in'" in error_of("osPlatform in ()")
    assert "'in' lists take literals only" in error_of("osPlatform in (healthStatus)")
    assert "expected '(' after 'in'" in error_of("osPlatform in 'Linux'")
    assert "expected ')' to close the 'in' list" in error_of("osPlatform in ('a' 'b')")


# --- errors ------------------------------------------------------------------------------------


def test_unknown_property_is_rejected_with_the_allowed_list() -> None:
    message = error_of("foo eq 'x'")
    assert message.startswith("property 'foo' (position 0) is not filterable; allowed: ")
    assert "computerDnsName" in message
    assert "healthStatus" in message


def test_property_allowed_on_machines_is_rejected_on_machine_actions() -> None:
    assert "property 'healthStatus'" in error_of("healthStatus eq 'Active'", ACTION_PROPERTIES)


@pytest.mark.parametrize("text", ["", "   ", "\t"])
def test_empty_filter_is_rejected(text: str) -> None:
    assert error_of(text) == "empty $filter expression"


def test_unterminated_string_is_rejected_with_its_start() -> None:
    assert error_of("osPlatform eq 'Windows") == (
        "unterminated string literal starting at position 14"
    )


def test_unclosed_parenthesis_is_rejected() -> None:
    message = error_of("(osPlatform eq 'Linux'")
    assert "missing ')' to close '(' at position 0" in message


def test_extra_closing_parenthesis_is_rejected_as_unbalanced() -> None:
    message = error_of("osPlatform eq 'Linux')")
    assert "unexpected ')' at position 21" in message
    assert "unbalanced parentheses" in message


def test_trailing_garbage_is_rejected() -> None:
    assert "unexpected 'extra' at position 22" in error_of("osPlatform eq 'Linux' extra")
    assert "unexpected 'eq'" in error_of("osPlatform eq 'a' eq 'b'")


def test_dangling_operators_are_rejected() -> None:
    assert "unexpected end of $filter" in error_of("osPlatform eq")
    assert "unexpected end of $filter" in error_of("osPlatform eq 'a' and")
    assert "unexpected 'and'" in error_of("and osPlatform eq 'a'")
    assert "unexpected ')'" in error_of("()")


def test_unexpected_character_is_rejected() -> None:
    assert error_of("osPlatform eq $x") == "unexpected character '$' at position 14"
    assert "unexpected character '\"'" in error_of('osPlatform eq "Linux"')


def test_unquoted_machine_id_is_rejected_as_a_malformed_literal() -> None:
    message = error_of(f"id eq {MACHINE['id']}")
    assert "malformed literal '1e5bc9d7e413" in message
    assert "need single quotes" in message


def test_invalid_datetime_literal_is_rejected() -> None:
    assert "invalid datetime literal '2024-13-01'" in error_of("lastSeen gt 2024-13-01")
    assert "malformed literal" in error_of("lastSeen gt 2024-01-01T10:00:00:00Z")


def test_a_plain_value_is_not_a_filter() -> None:
    assert "a $filter needs a condition" in error_of("osPlatform")
    assert "'and' needs a condition" in error_of("osPlatform eq 'a' and healthStatus")
    assert "'or' needs a condition" in error_of("'x' or osPlatform eq 'a'")


def test_keyword_where_a_value_is_expected_is_rejected() -> None:
    assert "unexpected 'eq' at position 0" in error_of("eq eq 'x'")


def test_slash_after_a_property_needs_any_or_all() -> None:
    assert "expected any or all" in error_of("osPlatform/'x' eq 1")


def test_odata_error_is_a_value_error() -> None:
    assert issubclass(ODataError, ValueError)


# --- parse_datetime ----------------------------------------------------------------------------


def test_parse_datetime_reads_seven_fraction_digits_and_offsets() -> None:
    assert parse_datetime("2026-11-28T10:00:00.1234567Z") == datetime(
        2026, 11, 28, 10, 0, 0, 123456, tzinfo=UTC
    )
    assert parse_datetime("2026-11-28T12:00:00+02:00") == datetime(2026, 11, 28, 10, tzinfo=UTC)
    assert parse_datetime("2026-11-28") == datetime(2026, 11, 28, tzinfo=UTC)
    assert parse_datetime("not a date") is None
    assert parse_datetime("2026-02-30") is None


# --- properties --------------------------------------------------------------------------------

PLATFORMS = ["Windows10", "Windows11", "Linux", "macOS"]
HEALTH = ["Active", "Inactive", "NoSensorData"]
CONDITIONS = [
    "osPlatform eq 'Windows10'",
    "osPlatform ne 'linux'",
    "healthStatus eq 'Active'",
    "startswith(osPlatform, 'win')",
    "rbacGroupId gt 5",
    "rbacGroupId le 2",
    "machineTags/any(t: t eq 'a')",
    "machineTags/all(t: t eq 'b')",
    "aadDeviceId eq null",
    "osPlatform in ('Linux', 'macOS')",
]

entities = st.lists(
    st.fixed_dictionaries(
        {
            "osPlatform": st.sampled_from(PLATFORMS),
            "healthStatus": st.sampled_from(HEALTH),
            "rbacGroupId": st.one_of(st.none(), st.integers(-10, 10)),
            "machineTags": st.lists(st.sampled_from(["a", "b", "C"]), max_size=3),
            "aadDeviceId": st.one_of(st.none(), st.just("abc")),
        }
    ),
    max_size=20,
)


def selected(text: str, population: list[dict[str, Any]]) -> set[int]:
    predicate = parse_filter(text, MACHINE_PROPERTIES)
    return {index for index, entity in enumerate(population) if predicate(entity)}


@given(entities, st.sampled_from(CONDITIONS), st.sampled_from(CONDITIONS))
def test_or_selects_the_union_and_and_the_intersection(
    population: list[dict[str, Any]], left: str, right: str
) -> None:
    a, b = selected(left, population), selected(right, population)
    assert selected(f"{left} or {right}", population) == a | b
    assert selected(f"({left}) and ({right})", population) == a & b


@given(entities, st.sampled_from(CONDITIONS))
def test_not_selects_the_complement(population: list[dict[str, Any]], condition: str) -> None:
    everything = set(range(len(population)))
    assert selected(f"not ({condition})", population) == everything - selected(
        condition, population
    )
