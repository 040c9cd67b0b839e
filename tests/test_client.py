"""The client's mapping of statuses and bodies to the error tree, Retry-After parsing, and the
cancel and tag calls against the emulator."""

from __future__ import annotations

import email.utils

import aiohttp
import pytest

from bulkoffboard.client import (
    DEFAULT_RETRY_AFTER_S,
    MAX_RETRY_AFTER_S,
    error_for,
    parse_retry_after,
)
from bulkoffboard.emulator import AppRegistration, EmulatorConfig, FleetSpec
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
from bulkoffboard.models import MAX_TAG_BATCH
from tests.conftest import StartEmulator, client_for

OFFLINE = {"Inactive": 1.0}


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


# -- cancel and tags, against the emulator ---------------------------------------------------


async def test_cancel_action_returns_the_cancelled_action_and_a_final_one_is_a_bad_request(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(
        EmulatorConfig(fleet=FleetSpec(size=1, os_mix={"Windows10": 1.0}, health_mix=OFFLINE))
    )
    client = client_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    pending = await client.offboard(machine_id, "retire")
    cancelled = await client.cancel_action(pending.id.upper(), "wrong machine")
    assert cancelled.id == pending.id
    assert cancelled.status == "Cancelled"
    assert cancelled.is_final
    with pytest.raises(BadRequestError) as refused:
        await client.cancel_action(pending.id, "again")
    assert refused.value.status == 400
    assert server.emulator.truth.cancel_posts == {pending.id: 2}
    assert server.emulator.truth.actions_cancelled == {machine_id: 1}
    with pytest.raises(NotFoundError):
        await client.cancel_action("00000000-0000-4000-8000-000000000000", "unknown")


@pytest.mark.parametrize(
    "action_id",
    ["", "not-a-guid", "00000000-0000-4000-8000-00000000000", "../machines/x", "{0-0}", "a/b"],
)
async def test_cancel_action_refuses_a_non_guid_before_sending(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession, action_id: str
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=FleetSpec(size=1)))
    client = client_for(server, http_session)
    with pytest.raises(ValueError, match="not a machine action id"):
        await client.cancel_action(action_id, "x")
    assert not server.emulator.truth.calls


async def test_tag_machine_adds_and_removes_and_returns_the_machine(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=FleetSpec(size=3)))
    client = client_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    machine = await client.tag_machine(machine_id.upper(), "Retired")
    assert machine["id"] == machine_id
    assert "Retired" in machine["machineTags"]
    listed = await client.list_machines("machineTags/any(tag: tag eq 'Retired')")
    assert [m["id"] for m in listed] == [machine_id]
    machine = await client.tag_machine(machine_id, "Retired", action="Remove")
    assert "Retired" not in machine["machineTags"]
    with pytest.raises(NotFoundError) as missing:
        await client.tag_machine("f" * 40, "Retired")
    assert missing.value.machine_id == "f" * 40
    assert server.emulator.truth.tag_posts == {"single": 3}


async def test_tag_machines_sends_distinct_ids_and_returns_the_updated_machines(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=FleetSpec(size=5)))
    client = client_for(server, http_session)
    machines = list(server.emulator.machines)
    updated = await client.tag_machines(
        [machines[2], machines[0].upper(), " " + machines[2], "e" * 40], "Batch"
    )
    assert [m["id"] for m in updated] == [machines[2], machines[0]]
    assert server.emulator.truth.tag_operations == {machines[2]: 1, machines[0]: 1}
    removed = await client.tag_machines(machines[:1], "Batch", action="Remove")
    assert "Batch" not in removed[0]["machineTags"]


async def test_tag_machines_refuses_bad_input_before_sending(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=FleetSpec(size=1)))
    client = client_for(server, http_session)
    ids = [f"{index:040x}" for index in range(MAX_TAG_BATCH + 1)]
    with pytest.raises(ValueError, match="at most 500"):
        await client.tag_machines(ids, "X")
    with pytest.raises(ValueError, match="not a machine id"):
        await client.tag_machines([ids[0], "host-00000"], "X")
    with pytest.raises(ValueError, match="no machine ids"):
        await client.tag_machines([], "X")
    with pytest.raises(ValueError, match="must not be empty"):
        await client.tag_machines(ids[:1], "  ")
    with pytest.raises(ValueError, match="'Add' or 'Remove'"):
        await client.tag_machines(ids[:1], "X", action="add")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a machine id"):
        await client.tag_machine("../offboard", "X")
    assert not server.emulator.truth.calls
    # 500 distinct ids (a repeat does not count twice) are sent.
    assert await client.tag_machines([*ids[:500], ids[0]], "X") == []
    assert server.emulator.truth.tag_posts == {"bulk": 1}


async def test_tag_calls_without_machine_read_write_all_are_forbidden(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    app = AppRegistration(roles=("Machine.Offboard", "Machine.Read.All"))
    server = await start_emulator(EmulatorConfig(apps=(app,), fleet=FleetSpec(size=1)))
    client = client_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    with pytest.raises(ForbiddenError):
        await client.tag_machine(machine_id, "X")
    with pytest.raises(ForbiddenError):
        await client.tag_machines([machine_id], "X")
