from __future__ import annotations

import aiohttp

from bulkoffboard.emulator import EmulatorConfig, FleetSpec
from tests.conftest import StartEmulator, client_for


async def test_offboard_through_msal_and_the_client(
    start_emulator: StartEmulator, http_session: aiohttp.ClientSession
) -> None:
    server = await start_emulator(
        EmulatorConfig(fleet=FleetSpec(size=5, os_mix={"Windows10": 1.0}))
    )
    client = client_for(server, http_session)
    machine_id = next(iter(server.emulator.machines))
    action = await client.offboard(machine_id, "retire")
    assert action.status == "Pending"
    assert server.emulator.truth.actions_created[machine_id] == 1
