"""The emulator's cancel and machine tag endpoints, over real loopback HTTPS.

Checked against ``shared/mde-api.md`` sections 3 (cancel) and 5b (tags) and against the
emulator's ground truth. Choices the docs leave open are the emulator's UNCONFIRMED ones (see
``bulkoffboard/emulator/app.py``); the tests pin them so a change is deliberate.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from bulkoffboard.emulator import AppRegistration, EmulatorConfig, Faults
from bulkoffboard.emulator.app import MAX_TAG_BATCH
from bulkoffboard.emulator.fleet import machine_id_for
from tests.conftest import StartEmulator
from tests.test_emulator import (  # noqa: F401 - _one_ca_for_the_file: one CA for this file too
    OFFLINE,
    ONLINE,
    OTHER_CLIENT_ID,
    OTHER_SECRET,
    Api,
    Reply,
    _one_ca_for_the_file,
    api_for,
    assert_mde_error,
    loop_time,
    sleep_until,
    windows_fleet,
)

BULK = "/api/machines/AddOrRemoveTagForMultipleMachines"


async def cancel(api: Api, action_id: str, body: Any = None) -> Reply:
    payload = {"Comment": "Wrong machine, CHG0043"} if body is None else body
    return await api.call("POST", f"/api/machineactions/{action_id}/cancel", json=payload)


async def tag(api: Api, machine_id: str, value: str, action: str = "Add") -> Reply:
    body = {"Value": value, "Action": action}
    return await api.call("POST", f"/api/machines/{machine_id}/tags", json=body)


async def tag_many(api: Api, machine_ids: list[str], value: str, action: str = "Add") -> Reply:
    body = {"Value": value, "Action": action, "MachineIds": machine_ids}
    return await api.call("POST", BULK, json=body)


async def api_with_roles(
    start_emulator: StartEmulator,
    http_session: aiohttp.ClientSession,
    roles: tuple[str, ...],
    **config: Any,
) -> tuple[Any, Api, Api]:
    """An emulator with the default app (every role) and one with ``roles``; both Apis."""
    limited = AppRegistration(client_id=OTHER_CLIENT_ID, secret=OTHER_SECRET, roles=roles)
    server = await start_emulator(EmulatorConfig(apps=(AppRegistration(), limited), **config))
    full = await api_for(server, http_session)
    other = await api_for(server, http_session, client_id=OTHER_CLIENT_ID, secret=OTHER_SECRET)
    return server, full, other


def unknown_ids(count: int) -> list[str]:
    """Well-formed machine ids that no fleet of seed 1 holds."""
    return [machine_id_for(999, index) for index in range(count)]


# -- cancel ------------------------------------------------------------------------------------


async def test_cancel_of_a_pending_offboard_makes_it_cancelled_with_the_cancellation_fields(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(2, health_mix=OFFLINE)))
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    created = (await api.offboard(machine_id)).body
    assert created["status"] == "Pending"

    reply = await cancel(api, created["id"], {"Comment": "Wrong machine, CHG0043"})
    assert reply.status == 200, reply
    action = reply.body
    assert action["id"] == created["id"]
    assert action["status"] == "Cancelled"
    assert action["cancellationRequestor"] == "bulkoffboard-emulator-app"
    assert action["cancellationComment"] == "Wrong machine, CHG0043"
    cancelled_at = datetime.fromisoformat(action["cancellationDateTimeUtc"])
    assert abs(cancelled_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert action["requestorComment"] == created["requestorComment"]  # the offboard's own
    # GET shows the same, and the list filters on the new status.
    assert await api.action(created["id"]) == action
    cancelled = await api.actions(**{"$filter": "status eq 'Cancelled'"})
    assert [a["id"] for a in cancelled] == [created["id"]]
    truth = server.emulator.truth
    assert truth.cancel_posts == {created["id"]: 1}
    assert truth.actions_cancelled == {machine_id: 1}
    assert truth.calls["cancel"] == 1
    # Nothing is pending on the machine any more: a new offboard is accepted.
    assert (await api.offboard(machine_id)).status == 201


@pytest.mark.looptime
async def test_cancel_of_an_in_progress_offboard_stops_it_before_it_succeeds(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(
        EmulatorConfig(
            action_start_s=5, action_complete_s=30, fleet=windows_fleet(1, health_mix=ONLINE)
        )
    )
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    action_id = (await api.offboard(machine_id)).body["id"]
    created = server.emulator.actions[action_id].created
    await sleep_until(created + 10)
    assert (await api.action(action_id))["status"] == "InProgress"
    assert (await cancel(api, action_id)).body["status"] == "Cancelled"
    await sleep_until(created + 60)  # long past when it would have succeeded
    assert (await api.action(action_id))["status"] == "Cancelled"
    assert (await api.get(f"/api/machines/{machine_id}")).body["healthStatus"] == "Active"


@pytest.mark.looptime
async def test_cancel_of_a_final_action_is_400_bad_request_and_changes_nothing(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(
        EmulatorConfig(
            action_start_s=1, action_complete_s=1, fleet=windows_fleet(2, health_mix=ONLINE)
        )
    )
    api = await api_for(server, http_session)
    first, second = server.emulator.machines
    done = (await api.offboard(first)).body["id"]
    await asyncio.sleep(5)
    before = await api.action(done)
    assert before["status"] == "Succeeded"
    message = assert_mde_error(await cancel(api, done), 400, "BadRequest")
    assert "Succeeded" in message
    assert await api.action(done) == before
    # A cancelled action is final too: cancelling it again is refused the same way.
    again = (await api.offboard(second)).body["id"]
    assert (await cancel(api, again)).status == 200
    assert "Cancelled" in assert_mde_error(await cancel(api, again), 400, "BadRequest")
    assert server.emulator.truth.actions_cancelled == {second: 1}
    assert server.emulator.truth.cancel_posts == {done: 1, again: 2}


async def test_cancel_needs_a_json_body_with_a_comment_under_its_exact_key(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(1, health_mix=OFFLINE)))
    api = await api_for(server, http_session)
    action_id = (await api.offboard(next(iter(server.emulator.machines)))).body["id"]
    assert_mde_error(await cancel(api, action_id, {}), 400, "MissingRequiredParameter")
    for miscased in ({"comment": "x"}, {"COMMENT": "x"}):
        assert_mde_error(await cancel(api, action_id, miscased), 400, "InvalidRequestBody")
    for blank in ({"Comment": ""}, {"Comment": 7}, ["Comment"]):
        assert_mde_error(await cancel(api, action_id, blank), 400, "InvalidRequestBody")
    as_text = await api.call(
        "POST",
        f"/api/machineactions/{action_id}/cancel",
        json={"Comment": "x"},
        headers={"Content-Type": "text/plain"},
    )
    assert_mde_error(as_text, 400, "InvalidRequestBody")
    assert (await api.action(action_id))["status"] == "Pending"
    assert not server.emulator.truth.actions_cancelled


async def test_cancel_of_an_unknown_action_is_404_resource_not_found(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(1)))
    api = await api_for(server, http_session)
    unknown = "00000000-0000-4000-8000-000000000000"
    assert unknown in assert_mde_error(await cancel(api, unknown), 404, "ResourceNotFound")
    assert_mde_error(await cancel(api, "not-a-guid"), 404, "ResourceNotFound")


async def test_cancel_takes_machine_offboard_and_refuses_a_read_write_token(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server, full, read_write = await api_with_roles(
        start_emulator,
        http_session,
        ("Machine.Read.All", "Machine.ReadWrite.All"),
        fleet=windows_fleet(1, health_mix=OFFLINE),
    )
    action_id = (await full.offboard(next(iter(server.emulator.machines)))).body["id"]
    message = assert_mde_error(await cancel(read_write, action_id), 403, "Forbidden")
    assert "Machine.Offboard" in message
    assert (await read_write.action(action_id))["status"] == "Pending"  # its reads work
    offboard_only = AppRegistration(
        client_id="aaaaaaaa-bbbb-cccc-dddd-000000000003",
        secret="offboard-only",
        roles=("Machine.Offboard",),
    )
    server2 = await start_emulator(
        EmulatorConfig(apps=(offboard_only,), fleet=windows_fleet(1, health_mix=OFFLINE))
    )
    api = await api_for(
        server2, http_session, client_id=offboard_only.client_id, secret="offboard-only"
    )
    action_id = (await api.offboard(next(iter(server2.emulator.machines)))).body["id"]
    assert (await cancel(api, action_id)).body["status"] == "Cancelled"


@pytest.mark.looptime
async def test_cancel_has_its_own_window_of_100_a_minute_counted_on_arrival(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(1, health_mix=OFFLINE)))
    api = await api_for(server, http_session)
    action_id = (await api.offboard(next(iter(server.emulator.machines)))).body["id"]
    start = loop_time()
    for _ in range(100):  # refused calls (404) arrive and count all the same
        assert (await cancel(api, "00000000-0000-4000-8000-000000000000")).status == 404
    throttled = await cancel(api, action_id)
    assert_mde_error(throttled, 429, "TooManyRequests")
    assert throttled.headers["Retry-After"] == "60"
    # Reads of machine actions are another group, untouched.
    assert (await api.action(action_id))["status"] == "Pending"
    await sleep_until(start + 60)
    assert (await cancel(api, action_id)).status == 200
    truth = server.emulator.truth
    assert truth.calls["cancel"] == 102
    assert truth.throttled == {"cancel": 1}
    assert truth.max_in_window["cancel 60"] == 101
    assert server.emulator.config.windows("cancel") == ((100, 60.0), (1500, 3600.0))


# -- tags: one machine -------------------------------------------------------------------------


async def test_tag_add_and_remove_answer_the_updated_machine_and_show_in_reads(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(20)))
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    before = list(server.emulator.machines[machine_id]["machineTags"])
    assert "Retired 2026" not in before

    added = await tag(api, machine_id, "Retired 2026")
    assert added.status == 200, added
    assert added.body["id"] == machine_id
    assert added.body["machineTags"] == [*before, "Retired 2026"]
    assert (await api.get(f"/api/machines/{machine_id}")).body["machineTags"] == [
        *before,
        "Retired 2026",
    ]
    filtered = await api.machine_ids(**{"$filter": "machineTags/any(tag: tag eq 'Retired 2026')"})
    assert filtered == [machine_id]
    # Adding it again changes nothing; removing it takes it away; removing again is no error.
    assert (await tag(api, machine_id, "Retired 2026")).body["machineTags"] == [
        *before,
        "Retired 2026",
    ]
    assert (await tag(api, machine_id, "Retired 2026", "Remove")).body["machineTags"] == before
    assert (await tag(api, machine_id, "Retired 2026", "Remove")).status == 200
    assert await api.machine_ids(**{"$filter": "machineTags/any(tag: tag eq 'Retired 2026')"}) == []
    # /api/v1.0 behaves the same.
    pinned = await api.call(
        "POST", f"/api/v1.0/machines/{machine_id}/tags", json={"Value": "v1", "Action": "Add"}
    )
    assert pinned.body["machineTags"] == [*before, "v1"]
    truth = server.emulator.truth
    assert truth.tag_posts == {"single": 5}
    assert truth.tag_operations == {machine_id: 5}
    assert truth.calls["tags"] == 5


async def test_tag_of_an_unknown_or_malformed_machine_id_is_404(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(2)))
    api = await api_for(server, http_session)
    unknown = unknown_ids(1)[0]
    assert unknown in assert_mde_error(await tag(api, unknown, "X"), 404, "ResourceNotFound")
    assert_mde_error(await tag(api, "host-00000", "X"), 404, "ResourceNotFound")
    assert server.emulator.truth.malformed_paths == ["host-00000"]
    assert not server.emulator.truth.tag_operations


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"Action": "Add"}, "MissingRequiredParameter"),
        ({"Value": "X"}, "MissingRequiredParameter"),
        ({"value": "X", "Action": "Add"}, "InvalidRequestBody"),
        ({"Value": "X", "action": "Add"}, "InvalidRequestBody"),
        ({"Value": "", "Action": "Add"}, "InvalidRequestBody"),
        ({"Value": "   ", "Action": "Add"}, "InvalidRequestBody"),
        ({"Value": 5, "Action": "Add"}, "InvalidRequestBody"),
        ({"Value": "X", "Action": "add"}, "InvalidRequestBody"),
        ({"Value": "X", "Action": "Toggle"}, "InvalidRequestBody"),
        ({"Value": "x" * 201, "Action": "Add"}, "InvalidInput"),
        ({"Value": "bad\ntag", "Action": "Add"}, "InvalidInput"),
    ],
)
async def test_tag_request_bodies_are_checked_like_offboard_comments(
    start_emulator: StartEmulator,
    http_session: aiohttp.ClientSession,
    body: dict[str, Any],
    code: str,
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(1)))
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    single = await api.call("POST", f"/api/machines/{machine_id}/tags", json=body)
    assert_mde_error(single, 400, code)
    bulk = await api.call("POST", BULK, json={**body, "MachineIds": [machine_id]})
    assert_mde_error(bulk, 400, code)
    assert not server.emulator.truth.tag_operations


async def test_a_tag_of_200_printable_characters_is_accepted(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(1)))
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    longest = "Ünïcode tag " + "x" * 188
    assert (await tag(api, machine_id, longest)).body["machineTags"][-1] == longest


async def test_tags_need_machine_read_write_all(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server, _, offboarder = await api_with_roles(
        start_emulator,
        http_session,
        ("Machine.Offboard", "Machine.Read.All"),
        fleet=windows_fleet(1),
    )
    machine_id = next(iter(server.emulator.machines))
    assert "Machine.ReadWrite.All" in assert_mde_error(
        await tag(offboarder, machine_id, "X"), 403, "Forbidden"
    )
    assert_mde_error(await tag_many(offboarder, [machine_id], "X"), 403, "Forbidden")
    assert not server.emulator.truth.tag_operations
    assert server.emulator.truth.tag_posts == {"single": 1, "bulk": 1}  # they arrived


# -- tags: many machines -----------------------------------------------------------------------


async def test_bulk_tag_tags_the_known_machines_and_answers_them_skipping_unknown_ids(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(10)))
    api = await api_for(server, http_session)
    machines = list(server.emulator.machines)
    chosen = [machines[3], machines[1].upper(), *unknown_ids(2), machines[3], machines[7]]
    reply = await tag_many(api, chosen, "Decommission 2026")
    assert reply.status == 200, reply
    assert reply.body["@odata.context"].endswith("/api/$metadata#Machines")
    updated = reply.body["value"]
    assert [m["id"] for m in updated] == [machines[3], machines[1], machines[7]]
    assert all("Decommission 2026" in m["machineTags"] for m in updated)
    tagged = await api.machine_ids(
        **{"$filter": "machineTags/any(tag: tag eq 'Decommission 2026')"}
    )
    assert tagged == sorted([machines[1], machines[3], machines[7]], key=machines.index)
    removed = await tag_many(api, [machines[1], machines[3]], "Decommission 2026", "Remove")
    assert [m["id"] for m in removed.body["value"]] == [machines[1], machines[3]]
    tagged = await api.machine_ids(
        **{"$filter": "machineTags/any(tag: tag eq 'Decommission 2026')"}
    )
    assert tagged == [machines[7]]
    # Only unknown ids: nothing to tag, still 200.
    assert (await tag_many(api, unknown_ids(3), "X")).body["value"] == []
    truth = server.emulator.truth
    assert truth.tag_posts == {"bulk": 3}
    assert truth.tag_operations == {machines[1]: 2, machines[3]: 2, machines[7]: 1}


async def test_bulk_tag_takes_500_ids_and_refuses_501_with_maximum_batch_size_exceeded(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(3)))
    api = await api_for(server, http_session)
    machines = list(server.emulator.machines)
    assert MAX_TAG_BATCH == 500
    full = [*machines, *unknown_ids(497)]
    reply = await tag_many(api, full, "Batch")
    assert [m["id"] for m in reply.body["value"]] == machines
    too_many = await tag_many(api, [*full, unknown_ids(498)[-1]], "Too many")
    assert "501" in assert_mde_error(too_many, 400, "MaximumBatchSizeExceeded")
    assert await api.machine_ids(**{"$filter": "machineTags/any(tag: tag eq 'Too many')"}) == []


@pytest.mark.parametrize(
    ("machine_ids", "code"),
    [
        ([], "InvalidRequestBody"),
        ("not a list", "InvalidRequestBody"),
        ([7], "InvalidRequestBody"),
        (None, "InvalidRequestBody"),
        (["host-00000"], "InvalidInput"),
    ],
)
async def test_bulk_tag_refuses_a_bad_id_list_as_a_whole(
    start_emulator: StartEmulator,
    http_session: aiohttp.ClientSession,
    machine_ids: Any,
    code: str,
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(2)))
    api = await api_for(server, http_session)
    known = next(iter(server.emulator.machines))
    if isinstance(machine_ids, list) and machine_ids:
        machine_ids = [known, *machine_ids]  # one good id does not save the call
    body = {"Value": "X", "Action": "Add", "MachineIds": machine_ids}
    assert_mde_error(await api.call("POST", BULK, json=body), 400, code)
    no_key = await api.call("POST", BULK, json={"Value": "X", "Action": "Add"})
    assert_mde_error(no_key, 400, "MissingRequiredParameter")
    assert not server.emulator.truth.tag_operations


async def test_the_bulk_tag_path_is_never_read_as_a_machine_id(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(2)))
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    pinned = await api.call(
        "POST",
        "/api/v1.0/machines/AddOrRemoveTagForMultipleMachines",
        json={"Value": "X", "Action": "Add", "MachineIds": [machine_id]},
    )
    assert [m["id"] for m in pinned.body["value"]] == [machine_id]
    assert_mde_error(await api.get(BULK), 404, "ResourceNotFound")
    assert_mde_error(
        await api.offboard("AddOrRemoveTagForMultipleMachines"), 404, "ResourceNotFound"
    )
    assert_mde_error(
        await tag(api, "AddOrRemoveTagForMultipleMachines", "X"), 404, "ResourceNotFound"
    )
    truth = server.emulator.truth
    assert truth.malformed_paths == ["AddOrRemoveTagForMultipleMachines"] * 2
    assert not truth.actions_created
    assert truth.tag_operations == {machine_id: 1}


# -- tags: windows and faults ------------------------------------------------------------------


@pytest.mark.looptime
async def test_single_and_bulk_tags_share_a_window_of_their_own_counted_on_arrival(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(EmulatorConfig(fleet=windows_fleet(2)))
    api = await api_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    start = loop_time()
    for index in range(50):
        assert (await tag(api, machine_id, f"t{index}")).status == 200
        assert (await tag_many(api, [machine_id], "", "Add")).status == 400  # counted too
    throttled = await tag(api, machine_id, "late")
    assert_mde_error(throttled, 429, "TooManyRequests")
    assert throttled.headers["Retry-After"] == "60"
    assert_mde_error(await tag_many(api, [machine_id], "late"), 429, "TooManyRequests")
    # Reads and offboard keep their own windows.
    assert (await api.get(f"/api/machines/{machine_id}")).status == 200
    assert (await api.offboard(machine_id)).status == 201
    await sleep_until(start + 60)
    assert (await tag_many(api, [machine_id], "late")).status == 200
    truth = server.emulator.truth
    assert truth.throttled == {"tags": 2}
    assert truth.calls["tags"] == 103
    assert truth.max_in_window["tags 60"] == 102
    assert "late" in server.emulator.machines[machine_id]["machineTags"]


async def test_fault_knobs_apply_to_tags_and_cancel(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(
        EmulatorConfig(faults=Faults(error_rate=1.0), fleet=windows_fleet(2, health_mix=OFFLINE))
    )
    emulator = server.emulator
    api = await api_for(server, http_session)
    first, second = emulator.machines
    assert (await tag(api, first, "X")).status == 500
    assert (await tag_many(api, [first], "X")).status == 500
    emulator.faults.error_rate = 0.0
    action_id = (await api.offboard(second)).body["id"]
    emulator.force_429(1, retry_after_s=4, group="tags")
    assert (await cancel(api, action_id)).status == 200  # another group: not forced
    assert (await tag(api, first, "X")).headers["Retry-After"] == "4"
    assert "X" not in emulator.machines[first]["machineTags"]
    # Dropped after the change: the client cannot tell, the machine is tagged.
    emulator.faults.abort_after_rate = 1.0
    with pytest.raises(aiohttp.ClientError):
        await tag(api, first, "dropped")
    emulator.faults.abort_after_rate = 0.0
    assert "dropped" in emulator.machines[first]["machineTags"]
    assert emulator.truth.faults_injected == {"error": 2, "abort_after": 1}
