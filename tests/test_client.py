"""The client's mapping of statuses and bodies to the error tree, and Retry-After parsing."""

from __future__ import annotations

import email.utils

import pytest

from bulkoffboard.client import (
    DEFAULT_RETRY_AFTER_S,
    MAX_RETRY_AFTER_S,
    error_for,
    parse_retry_after,
)
from bulkoffboard.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    ServerError,
    ThrottledError,
    UnauthorizedError,
    UnsupportedError,
)


def body(code: str) -> dict[str, object]:
    return {"error": {"code": code, "message": "m", "target": "t-1"}}


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (400, "ActiveRequestAlreadyExists", ConflictError),
        (400, "OsPlatformNotSupported", UnsupportedError),
        (400, "ClientVersionNotSupported", UnsupportedError),
        (400, "InvalidRequestBody", BadRequestError),
        (401, "Unauthorized", UnauthorizedError),
        (403, "Forbidden", ForbiddenError),
        (404, "ResourceNotFound", NotFoundError),
        (429, "TooManyRequests", ThrottledError),
        (500, "InternalServerError", ServerError),
        (503, "", ServerError),
    ],
)
def test_errors_branch_on_status_and_code_not_message(
    status: int, code: str, kind: type[Exception]
) -> None:
    error = error_for(status, body(code), what="offboard x", machine_id="x", retry_after="5")
    assert isinstance(error, kind)
    assert error.status == status
    assert error.target == "t-1"


def test_an_error_without_the_documented_body_still_maps_by_status() -> None:
    error = error_for(500, None, what="offboard x", machine_id=None, retry_after=None)
    assert isinstance(error, ServerError)
    assert error.code is None


def test_retry_after_reads_seconds_dates_and_caps_nonsense() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after(None) == DEFAULT_RETRY_AFTER_S
    assert parse_retry_after("soon") == DEFAULT_RETRY_AFTER_S
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("99999999") == MAX_RETRY_AFTER_S
    assert parse_retry_after("nan") == DEFAULT_RETRY_AFTER_S
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(date, now=1_000_000) == pytest.approx(30.0)


def test_a_throttled_error_carries_its_delay() -> None:
    error = error_for(429, body("TooManyRequests"), what="w", machine_id=None, retry_after="12")
    assert isinstance(error, ThrottledError)
    assert error.retry_after_s == 12.0
