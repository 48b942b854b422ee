"""Realistic DT event bodies of every type, for the ``send`` emulator and for tests.

Bodies are compact JSON, as DT sends them, each with a fresh xid-shaped ``eventId``.
"""

from __future__ import annotations

import base64
import json
import os
import time
from datetime import UTC, datetime
from typing import Any


def xid(now: float | None = None) -> str:
    """A 20-character id shaped like DT's (rs/xid: 4 bytes of seconds, then 8 random)."""
    seconds = int(time.time() if now is None else now).to_bytes(4, "big")
    return base64.b32hexencode(seconds + os.urandom(8)).decode("ascii")[:20].lower()


def _rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _data(event_type: str, ts: str) -> dict[str, Any]:
    errors: list[dict[str, str]] = []
    keyed: dict[str, dict[str, Any]] = {
        "touch": {},
        "temperature": {
            "value": 21.45,
            "samples": [{"value": 21.45, "sampleTime": ts}],
            "isBackfilled": False,
        },
        "objectPresent": {"state": "PRESENT"},
        "humidity": {
            "temperature": 22.45,
            "relativeHumidity": 17,
            "samples": [{"temperature": 22.45, "relativeHumidity": 17, "sampleTime": ts}],
            "isBackfilled": False,
        },
        "objectPresentCount": {"total": 4176},
        "touchCount": {"total": 469},
        "waterPresent": {"state": "NOT_PRESENT"},
        "networkStatus": {
            "signalStrength": 45,
            "rssi": -83,
            "cloudConnectors": [{"id": "emulated-ccon", "signalStrength": 45, "rssi": -83}],
            "transmissionMode": "LOW_POWER_STANDARD_MODE",
        },
        "batteryStatus": {"percentage": 100},
        "connectionStatus": {"connection": "ETHERNET", "available": ["CELLULAR", "ETHERNET"]},
        "ethernetStatus": {
            "macAddress": "f0:b5:b7:00:0a:08",
            "ipAddress": "10.0.0.1",
            "errors": errors,
        },
        "cellularStatus": {"signalStrength": 80, "errors": errors},
        "co2": {"ppm": 512},
        "pressure": {"pascal": 99301},
        "motion": {"state": "MOTION_DETECTED"},
        "deskOccupancy": {"state": "OCCUPIED", "remarks": []},
        "contact": {"state": "CLOSED"},
        "probeWireStatus": {"state": "THREE_WIRE"},
    }
    if event_type == "labelsChanged":
        return {"added": {"room": "lab"}, "modified": {"name": "renamed"}, "removed": ["old"]}
    if event_type not in keyed:
        raise ValueError(f"unknown DT event type {event_type!r}")
    return {event_type: {**keyed[event_type], "updateTime": ts}}


DEVICE_TYPE = {
    "touch": "touch",
    "temperature": "temperature",
    "objectPresent": "proximity",
    "humidity": "humidity",
    "objectPresentCount": "proximityCounter",
    "touchCount": "touchCounter",
    "waterPresent": "waterDetector",
    "networkStatus": "temperature",
    "batteryStatus": "temperature",
    "labelsChanged": "temperature",
    "connectionStatus": "ccon",
    "ethernetStatus": "ccon",
    "cellularStatus": "ccon",
    "co2": "co2",
    "pressure": "co2",
    "motion": "motion",
    "deskOccupancy": "deskOccupancy",
    "contact": "contact",
    "probeWireStatus": "temperature",
}
EVENT_TYPES = tuple(DEVICE_TYPE)


def sample_body(
    event_type: str = "temperature",
    *,
    project_id: str = "c14u9p094l47cdv1o3pg",
    device_id: str | None = None,
    event_id: str | None = None,
    now: datetime | None = None,
) -> bytes:
    """One DT body of ``event_type``, compact JSON, with a fresh ``eventId``."""
    moment = now or datetime.now(UTC)
    ts = _rfc3339(moment)
    device = device_id or "emu" + xid(moment.timestamp())
    body = {
        "event": {
            "eventId": event_id or xid(moment.timestamp()),
            "targetName": f"projects/{project_id}/devices/{device}",
            "eventType": event_type,
            "data": _data(event_type, ts),
            "timestamp": ts,
        },
        "labels": {"name": f"emulated {event_type}"},
        "metadata": {
            "deviceId": device,
            "projectId": project_id,
            "deviceType": DEVICE_TYPE[event_type],
            "productNumber": "",
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()
