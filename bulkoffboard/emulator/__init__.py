"""An ``aiohttp.web`` stand-in for MDE and Entra ID, with limits, lifecycle and fault knobs."""

from bulkoffboard.emulator.app import (
    AppRegistration,
    Emulator,
    EmulatorConfig,
    Faults,
    TenantSpec,
    Truth,
    extra_tenants,
)
from bulkoffboard.emulator.fleet import FleetSpec
from bulkoffboard.emulator.server import EmulatorServer

__all__ = [
    "AppRegistration",
    "Emulator",
    "EmulatorConfig",
    "EmulatorServer",
    "Faults",
    "FleetSpec",
    "TenantSpec",
    "Truth",
    "extra_tenants",
]
