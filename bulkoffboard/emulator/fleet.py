"""A synthetic, seeded MDE fleet: machines as ``GET /api/machines`` returns them."""

from __future__ import annotations

import hashlib
import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

#: Platforms the offboard API accepts, and those it refuses (mde-api.md section 2).
SUPPORTED_PLATFORMS = (
    "Windows10",
    "Windows11",
    "WindowsServer2019",
    "WindowsServer2022",
    "WindowsServer2016",
    "WindowsServer2012R2",
)
UNSUPPORTED_PLATFORMS = ("Linux", "macOS", "iOS", "Android")

DEFAULT_OS_MIX: dict[str, float] = {
    "Windows10": 0.42,
    "Windows11": 0.25,
    "WindowsServer2019": 0.08,
    "WindowsServer2022": 0.08,
    "WindowsServer2016": 0.03,
    "Linux": 0.08,
    "macOS": 0.06,
}
DEFAULT_HEALTH_MIX: dict[str, float] = {
    "Active": 0.70,
    "Inactive": 0.20,
    "ImpairedCommunication": 0.04,
    "NoSensorData": 0.03,
    "NoSensorDataImpairedCommunication": 0.02,
    "Unknown": 0.01,
}
TAGS = ("Decommission", "VIP", "Lab", "Finance", "Kiosk", "DoNotOffboard")
GROUPS: tuple[tuple[int, str], ...] = (
    (140, "Workstations"),
    (141, "Servers"),
    (142, "Lab"),
    (143, "Finance"),
    (144, "UnassignedGroup"),
)


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """How to make a fleet. Same spec, same seed: same fleet."""

    size: int = 200
    seed: int = 1
    os_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_OS_MIX))
    health_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_HEALTH_MIX))
    #: Fraction of machines that already carry a pending offboard action from someone else.
    pending_fraction: float = 0.0
    #: Oldest ``lastSeen``, in days before now.
    max_age_days: int = 120
    name_prefix: str = "host"
    domain: str = "contoso.com"


def machine_id_for(seed: int, index: int) -> str:
    """The deterministic 40-hex id of machine ``index`` in the fleet made from ``seed``."""
    return hashlib.sha1(f"{seed}:{index}".encode(), usedforsecurity=False).hexdigest()


def _pick(rng: random.Random, mix: dict[str, float]) -> str:
    names = list(mix)
    return rng.choices(names, weights=[mix[n] for n in names])[0]


def _os_build(platform: str, rng: random.Random) -> tuple[str, int | None]:
    if platform.startswith("Windows"):
        return "10.0", rng.choice([19045, 22621, 22631, 17763, 20348, 14393])
    if platform == "macOS":
        return "14.5", None
    return "5.15", None


def make_fleet(spec: FleetSpec, now: datetime | None = None) -> list[dict[str, Any]]:
    """Machines in the documented ``Machine`` shape (mde-api.md section 4)."""
    now = now or datetime.now(UTC)
    rng = random.Random(spec.seed)
    machines: list[dict[str, Any]] = []
    for index in range(spec.size):
        platform = _pick(rng, spec.os_mix)
        health = _pick(rng, spec.health_mix)
        age_days = rng.uniform(0, 2) if health == "Active" else rng.uniform(3, spec.max_age_days)
        last_seen = now - timedelta(days=age_days)
        first_seen = last_seen - timedelta(days=rng.uniform(30, 900))
        group_id, group_name = rng.choice(GROUPS)
        tags = sorted(rng.sample(TAGS, k=rng.choice([0, 0, 0, 1, 1, 2])))
        version, build = _os_build(platform, rng)
        octets = [10, rng.randrange(256), rng.randrange(256), rng.randrange(1, 255)]
        onboarding = (
            "Onboarded"
            if platform in SUPPORTED_PLATFORMS or rng.random() < 0.9
            else ("InsufficientInfo")
        )
        machines.append(
            {
                "id": machine_id_for(spec.seed, index),
                "computerDnsName": f"{spec.name_prefix}-{index:05d}.{spec.domain}",
                "firstSeen": _iso(first_seen),
                "lastSeen": _iso(last_seen),
                "osPlatform": platform,
                "version": version,
                "osProcessor": "x64",
                "osArchitecture": "64-bit",
                "osBuild": build,
                "lastIpAddress": ".".join(map(str, octets)),
                "lastExternalIpAddress": f"203.0.113.{rng.randrange(1, 255)}",
                "healthStatus": health,
                "onboardingStatus": onboarding,
                "rbacGroupId": group_id,
                "rbacGroupName": group_name,
                "riskScore": rng.choice(["None", "Informational", "Low", "Medium", "High"]),
                "exposureLevel": rng.choice(["None", "Low", "Medium", "High"]),
                "deviceValue": rng.choice(["Normal", "Normal", "Low", "High"]),
                "isAadJoined": rng.random() < 0.6,
                "aadDeviceId": str(uuid.UUID(int=rng.getrandbits(128), version=4))
                if rng.random() < 0.6
                else None,
                "machineTags": tags,
                "ipAddresses": [
                    {
                        "ipAddress": ".".join(map(str, octets)),
                        "macAddress": "".join(f"{rng.randrange(256):02X}" for _ in range(6)),
                        "operationalStatus": "Up",
                    }
                ],
            }
        )
    return machines


def _iso(moment: datetime) -> str:
    """ISO-8601 in UTC with a ``Z``, the way the API writes timestamps."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso(moment: datetime) -> str:
    """Public alias of the timestamp format used throughout the emulator."""
    return _iso(moment)
