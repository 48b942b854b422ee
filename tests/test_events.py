"""Parsing DT bodies into typed events: every known type, the lenient edges, and what is kept."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from app.errors import MalformedBody
from app.events import (
    KNOWN_EVENT_TYPES,
    BatteryStatusEvent,
    CellularStatusEvent,
    Co2Event,
    Connection,
    ConnectionStatusEvent,
    ContactEvent,
    ContactState,
    DeskOccupancyEvent,
    DeskState,
    Envelope,
    EthernetStatusEvent,
    HumidityEvent,
    LabelsChangedEvent,
    MotionEvent,
    MotionState,
    NetworkStatusEvent,
    ObjectPresentCountEvent,
    ObjectPresentEvent,
    ParsedBody,
    ParseOutcome,
    Presence,
    PressureEvent,
    ProbeWireState,
    ProbeWireStatusEvent,
    TemperatureEvent,
    TouchCountEvent,
    TouchEvent,
    TransmissionMode,
    UnknownEvent,
    WaterPresentEvent,
    parse_body,
)
from tests.conftest import PAYLOADS as PAYLOAD_DIR
from tests.conftest import payload_files

PAYLOADS = payload_files()

MODELS: dict[str, type[BaseModel]] = {
    "touch": TouchEvent,
    "temperature": TemperatureEvent,
    "objectPresent": ObjectPresentEvent,
    "humidity": HumidityEvent,
    "objectPresentCount": ObjectPresentCountEvent,
    "touchCount": TouchCountEvent,
    "waterPresent": WaterPresentEvent,
    "networkStatus": NetworkStatusEvent,
    "batteryStatus": BatteryStatusEvent,
    "labelsChanged": LabelsChangedEvent,
    "connectionStatus": ConnectionStatusEvent,
    "ethernetStatus": EthernetStatusEvent,
    "cellularStatus": CellularStatusEvent,
    "co2": Co2Event,
    "pressure": PressureEvent,
    "motion": MotionEvent,
    "deskOccupancy": DeskOccupancyEvent,
    "contact": ContactEvent,
    "probeWireStatus": ProbeWireStatusEvent,
}

# (payload file, what to read from the parsed event, the value DT sent)
VALUES: list[tuple[str, Callable[[Any], object], object]] = [
    (
        "touch.json",
        lambda e: e.data.touch.update_time,
        datetime(2022, 2, 10, 12, 42, 13, 313949, UTC),
    ),
    ("temperature.json", lambda e: e.data.temperature.value, 27.0),
    ("temperature.json", lambda e: e.data.temperature.is_backfilled, False),
    ("temperature-multisample.json", lambda e: len(e.data.temperature.samples), 5),
    ("objectPresent.json", lambda e: e.data.object_present.state, Presence.NOT_PRESENT),
    ("humidity.json", lambda e: e.data.humidity.relative_humidity, 17.0),
    ("humidity.json", lambda e: e.data.humidity.samples[0].temperature, 22.45),
    ("objectPresentCount.json", lambda e: e.data.object_present_count.total, 4176),
    ("touchCount.json", lambda e: e.data.touch_count.total, 469),
    ("waterPresent.json", lambda e: e.data.water_present.state, Presence.PRESENT),
    ("networkStatus.json", lambda e: e.data.network_status.rssi, -83),
    (
        "networkStatus.json",
        lambda e: e.data.network_status.transmission_mode,
        TransmissionMode.LOW_POWER_STANDARD_MODE,
    ),
    ("networkStatus.json", lambda e: e.data.network_status.cloud_connectors[0].signal_strength, 45),
    ("batteryStatus.json", lambda e: e.data.battery_status.percentage, 100),
    ("labelsChanged.json", lambda e: e.data.removed, ["remove-key1", "remove-key2"]),
    ("connectionStatus.json", lambda e: e.data.connection_status.connection, Connection.ETHERNET),
    (
        "connectionStatus.json",
        lambda e: e.data.connection_status.available,
        [Connection.CELLULAR, Connection.ETHERNET],
    ),
    ("ethernetStatus.json", lambda e: e.data.ethernet_status.mac_address, "f0:b5:b7:00:0a:08"),
    ("ethernetStatus.json", lambda e: e.data.ethernet_status.ip_address, "10.0.0.1"),
    ("cellularStatus.json", lambda e: e.data.cellular_status.signal_strength, 80),
    ("co2.json", lambda e: e.data.co2.ppm, 526),
    ("pressure.json", lambda e: e.data.pressure.pascal, 99301.0),
    ("motion.json", lambda e: e.data.motion.state, MotionState.MOTION_DETECTED),
    ("deskOccupancy.json", lambda e: e.data.desk_occupancy.state, DeskState.OCCUPIED),
    ("deskOccupancy.json", lambda e: e.data.desk_occupancy.remarks, []),
    ("contact.json", lambda e: e.data.contact.state, ContactState.OPEN),
    ("probeWireStatus.json", lambda e: e.data.probe_wire_status.state, ProbeWireState.FOUR_WIRE),
]

T0 = "2024-05-29T10:34:03.970415Z"


def body(event_type: str, data: Any, **envelope: Any) -> bytes:
    """A compact DT body around ``data``; keyword arguments replace top-level keys."""
    doc: dict[str, Any] = {
        "event": {
            "eventId": "cpbg96qngr7ai7ldarrg",
            "targetName": "projects/ccol8iuk9smqiha4e8l0/devices/emucdd6ef2eu277bo8f52vg",
            "eventType": event_type,
            "data": data,
            "timestamp": T0,
        },
        "labels": {"name": "test"},
        "metadata": {"deviceId": "emucdd6ef2eu277bo8f52vg", "projectId": "ccol8iuk9smqiha4e8l0"},
    }
    doc.update(envelope)
    return json.dumps(doc, separators=(",", ":")).encode()


def temperature(value: Any, update_time: str = T0) -> bytes:
    return body("temperature", {"temperature": {"value": value, "updateTime": update_time}})


def typed(raw: bytes) -> Envelope:
    parsed = parse_body(raw)
    assert parsed.outcome is ParseOutcome.TYPED, parsed.error
    assert parsed.envelope is not None
    return parsed.envelope


def keys(value: Any) -> Any:
    """The shape of a JSON value: its keys all the way down, without the values."""
    if isinstance(value, dict):
        return {k: keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [keys(v) for v in value]
    return None


def extras(model: BaseModel) -> list[str]:
    """Every key anywhere in ``model`` that no field claimed."""
    found = list(model.model_extra or {})
    for name in type(model).model_fields:
        value = getattr(model, name)
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, BaseModel):
                found += extras(child)
    return found


def test_payloads_cover_all_nineteen_event_types() -> None:
    """The sample payloads hold every modelled type."""
    types = {json.loads(p.read_bytes())["event"]["eventType"] for p in PAYLOADS}
    assert types == KNOWN_EVENT_TYPES == set(MODELS)
    assert len(KNOWN_EVENT_TYPES) == 19


@pytest.mark.parametrize("path", PAYLOADS, ids=lambda p: p.name)
def test_payload_parses_typed_into_its_model(path: Path) -> None:
    """Each sample body is TYPED, lands in its type's model and names its event and device."""
    doc = json.loads(path.read_bytes())
    parsed = parse_body(path.read_bytes())
    assert parsed.outcome is ParseOutcome.TYPED
    assert parsed.error is None
    assert parsed.envelope is not None
    assert type(parsed.envelope.event) is MODELS[doc["event"]["eventType"]]
    assert parsed.event_id == doc["event"]["eventId"]
    assert parsed.event_type == doc["event"]["eventType"]
    assert parsed.project_id == doc["metadata"]["projectId"]
    assert parsed.device_id == doc["metadata"]["deviceId"]
    assert parsed.envelope.labels == doc["labels"]


@pytest.mark.parametrize("path", PAYLOADS, ids=lambda p: p.name)
def test_typed_envelope_is_the_one_the_model_itself_gives(path: Path) -> None:
    """parse_body's envelope (a validator for the modelled types alone) is an Envelope
    equal to what Envelope itself validates from the body, extras and set fields too."""
    raw = path.read_bytes()
    parsed = parse_body(raw).envelope
    model = Envelope.model_validate_json(raw)
    assert type(parsed) is Envelope
    assert parsed == model
    assert parsed.model_dump_json(exclude_unset=True) == model.model_dump_json(exclude_unset=True)
    assert extras(parsed) == extras(model)
    assert pickle.loads(pickle.dumps(parsed)) == model  # noqa: S301 - our own bytes


@pytest.mark.parametrize("path", PAYLOADS, ids=lambda p: p.name)
def test_payload_keys_are_all_modelled_and_dump_back_in_dt_shape(path: Path) -> None:
    """No key of a sample body falls through to extras, and dumping gives DT's camelCase keys."""
    envelope = typed(path.read_bytes())
    assert extras(envelope) == []
    dumped = json.loads(envelope.model_dump_json(exclude_unset=True))
    assert keys(dumped) == keys(json.loads(path.read_bytes()))


@pytest.mark.parametrize(("name", "read", "expected"), VALUES)
def test_payload_values(name: str, read: Callable[[Any], object], expected: object) -> None:
    """The values DT sent come out typed and equal."""
    envelope = typed((PAYLOAD_DIR / name).read_bytes())
    assert read(envelope.event) == expected


def test_event_fields_and_metadata() -> None:
    """The envelope's own fields are typed: ids, timestamp, metadata."""
    envelope = typed((PAYLOAD_DIR / "batteryStatus.json").read_bytes())
    assert envelope.event.event_id == "bjehr0am3vu74sd46f30"
    assert envelope.event.timestamp == datetime(2019, 5, 16, 8, 21, 21, 76013, UTC)
    assert envelope.metadata is not None
    assert envelope.metadata.device_type == "temperature"
    assert envelope.metadata.product_number == "102067"


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2018-05-08T13:29:47.543486780Z", datetime(2018, 5, 8, 13, 29, 47, 543486, UTC)),
        ("1970-01-01T00:00:00Z", datetime(1970, 1, 1, tzinfo=UTC)),
        ("2022-01-27T15:50:34.471Z", datetime(2022, 1, 27, 15, 50, 34, 471000, UTC)),
    ],
)
def test_timestamps_with_zero_to_nine_fraction_digits(stamp: str, expected: datetime) -> None:
    """Nanosecond timestamps are truncated to microseconds; no fraction is fine too."""
    event = typed(temperature(21.5, update_time=stamp)).event
    assert isinstance(event, TemperatureEvent)
    assert event.data.temperature.update_time == expected


def test_timestamp_without_zone_is_invalid() -> None:
    """DT always sends Z; a zoneless time is flagged rather than guessed."""
    parsed = parse_body(temperature(21.5, update_time="2024-05-29T10:34:03"))
    assert parsed.outcome is ParseOutcome.INVALID
    assert parsed.error is not None
    assert "event.data.temperature.updateTime" in parsed.error


@pytest.mark.parametrize("value", [27, 27.0, -3.25])
def test_float_quantities_accept_json_integers(value: float) -> None:
    """``"value":27`` and ``"value":27.0`` both give a float."""
    event = typed(temperature(value)).event
    assert isinstance(event, TemperatureEvent)
    assert event.data.temperature.value == value
    assert type(event.data.temperature.value) is float


def test_unknown_fields_are_kept_at_every_level() -> None:
    """Keys DT adds later are kept in model_extra, not dropped."""
    raw = body(
        "contact",
        {"contact": {"state": "CLOSED", "updateTime": T0, "battery": 3}, "hint": "x"},
        future={"a": 1},
    )
    envelope = typed(raw)
    event = envelope.event
    assert isinstance(event, ContactEvent)
    assert envelope.model_extra == {"future": {"a": 1}}
    assert event.data.model_extra == {"hint": "x"}
    assert event.data.contact.model_extra == {"battery": 3}
    assert json.loads(envelope.model_dump_json())["event"]["data"]["contact"]["battery"] == 3


def test_body_without_metadata_or_labels() -> None:
    """Bodies from before 2022 have no metadata; labels default to an empty dict."""
    doc = json.loads(body("touch", {"touch": {"updateTime": T0}}))
    del doc["metadata"], doc["labels"]
    envelope = typed(json.dumps(doc).encode())
    assert envelope.metadata is None
    assert envelope.labels == {}


def test_metadata_fields_may_be_missing() -> None:
    """A metadata object with only some of its keys still parses."""
    envelope = typed(body("touch", {"touch": {"updateTime": T0}}, metadata={"deviceId": "d"}))
    assert envelope.metadata is not None
    assert envelope.metadata.device_id == "d"
    assert envelope.metadata.device_type is None


def test_labels_changed_data_is_not_keyed_by_type() -> None:
    """labelsChanged carries added/modified/removed directly in data, no updateTime."""
    raw = body("labelsChanged", {"added": {"floor": "2"}, "modified": {}, "removed": ["old"]})
    event = typed(raw).event
    assert isinstance(event, LabelsChangedEvent)
    assert event.data.added == {"floor": "2"}
    assert event.data.modified == {}
    assert event.data.removed == ["old"]


@pytest.mark.parametrize(
    ("event_type", "data"),
    [
        ("networkStatus", {"networkStatus": {}}),
        ("humidity", {"humidity": {"temperature": 21, "relativeHumidity": 40, "updateTime": T0}}),
        ("temperature", {"temperature": {"value": 21, "updateTime": T0}}),
        (
            "ethernetStatus",
            {"ethernetStatus": {"macAddress": "m", "ipAddress": "i", "updateTime": T0}},
        ),
        ("cellularStatus", {"cellularStatus": {"signalStrength": 3, "updateTime": T0}}),
        ("deskOccupancy", {"deskOccupancy": {"state": "NOT_OCCUPIED", "updateTime": T0}}),
        ("labelsChanged", {"removed": ["x"]}),
    ],
)
def test_fields_dt_leaves_out_are_optional(event_type: str, data: dict[str, Any]) -> None:
    """Older or sparser events (no samples, errors, remarks, network fields) still parse."""
    event = typed(body(event_type, data)).event
    assert type(event) is MODELS[event_type]


def test_unknown_event_type_is_kept_with_its_data() -> None:
    """A type DT adds later is UNKNOWN, with its ids and raw data kept in UnknownEvent."""
    parsed = parse_body(body("milliAmpere", {"milliAmpere": {"value": 4.2, "updateTime": T0}}))
    assert parsed.outcome is ParseOutcome.UNKNOWN
    assert parsed.error is None
    assert parsed.event_type == "milliAmpere"
    assert parsed.event_id == "cpbg96qngr7ai7ldarrg"
    assert parsed.device_id == "emucdd6ef2eu277bo8f52vg"
    assert parsed.envelope is not None
    event = parsed.envelope.event
    assert isinstance(event, UnknownEvent)
    assert event.data == {"milliAmpere": {"value": 4.2, "updateTime": T0}}


def test_unknown_enum_value_is_unknown_and_not_coerced() -> None:
    """A new state such as "AJAR" is UNKNOWN, with the field named, and no envelope is forced."""
    parsed = parse_body(body("contact", {"contact": {"state": "AJAR", "updateTime": T0}}))
    assert parsed == ParsedBody(
        ParseOutcome.UNKNOWN,
        "cpbg96qngr7ai7ldarrg",
        "contact",
        "ccol8iuk9smqiha4e8l0",
        "emucdd6ef2eu277bo8f52vg",
        None,
        "event.data.contact.state: Input should be 'OPEN' or 'CLOSED' (got 'AJAR')",
    )


def test_unknown_value_in_an_enum_list_is_unknown() -> None:
    """A new link type in connectionStatus.available is UNKNOWN too."""
    data = {"connection": "SDS", "available": ["SDS", "SATELLITE"], "updateTime": T0}
    parsed = parse_body(body("connectionStatus", {"connectionStatus": data}))
    assert parsed.outcome is ParseOutcome.UNKNOWN
    assert parsed.error is not None
    assert parsed.error.startswith("event.data.connectionStatus.available.1:")


def test_wrong_value_type_is_invalid_and_names_the_location() -> None:
    """A temperature of "warm" is INVALID; the error says where and why."""
    parsed = parse_body(temperature("warm"))
    assert parsed.outcome is ParseOutcome.INVALID
    assert parsed.envelope is None
    assert parsed.event_type == "temperature"
    assert parsed.error is not None
    assert parsed.error.startswith("event.data.temperature.value: Input should be a valid number")


def test_object_where_a_state_belongs_is_invalid_not_unknown() -> None:
    """Only a string can be a new enum value; anything else is a broken body."""
    parsed = parse_body(body("contact", {"contact": {"state": {"open": 1}, "updateTime": T0}}))
    assert parsed.outcome is ParseOutcome.INVALID


def test_unknown_enum_plus_another_error_is_invalid() -> None:
    """UNKNOWN needs every error to be a new enum value."""
    parsed = parse_body(body("contact", {"contact": {"state": "AJAR"}}))
    assert parsed.outcome is ParseOutcome.INVALID
    assert parsed.error is not None
    assert "event.data.contact.updateTime: Field required" in parsed.error


def test_missing_envelope_field_is_invalid() -> None:
    """An event without eventId still returns, flagged, with what could be read."""
    doc = json.loads(temperature(20))
    del doc["event"]["eventId"]
    parsed = parse_body(json.dumps(doc).encode())
    assert parsed.outcome is ParseOutcome.INVALID
    assert parsed.event_id is None
    assert parsed.event_type == "temperature"
    assert parsed.project_id == "ccol8iuk9smqiha4e8l0"
    assert parsed.error == "event.eventId: Field required"


def test_ids_are_read_only_when_they_are_strings() -> None:
    """Best-effort ids never carry a number or object through as an id."""
    raw = b'{"event":{"eventId":5,"eventType":["x"],"targetName":7},"labels":{}}'
    parsed = parse_body(raw)
    assert parsed.outcome is ParseOutcome.INVALID
    assert (parsed.event_id, parsed.event_type, parsed.project_id, parsed.device_id) == (
        None,
        None,
        None,
        None,
    )


def test_error_summary_is_capped() -> None:
    """A body with hundreds of errors gives a summary of about 500 characters."""
    labels = {f"label{i}": i for i in range(300)}
    parsed = parse_body(body("touch", {"touch": {"updateTime": T0}}, labels=labels))
    assert parsed.outcome is ParseOutcome.INVALID
    assert parsed.error is not None
    assert parsed.error.startswith("labels.label0: Input should be a valid string (got 0)")
    assert len(parsed.error) <= 500


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'"event"', id="string"),
        pytest.param(temperature(20).decode().encode("utf-16"), id="utf-16"),
        pytest.param(b'{"event":{"eventId":"caf\xe9"}}', id="latin-1-byte"),
        pytest.param(b"[" * 100_000, id="deeply-nested"),
    ],
)
def test_bodies_that_are_not_a_utf8_json_object_are_malformed(raw: bytes) -> None:
    """Only bytes that are not a UTF-8 JSON object raise MalformedBody (a 400)."""
    with pytest.raises(MalformedBody) as caught:
        parse_body(raw)
    assert caught.value.status == 400


def test_json_pydantic_refuses_but_python_reads_is_kept_as_invalid() -> None:
    """A lone surrogate escape is valid JSON to Python: the body is kept, flagged INVALID."""
    doc = json.loads(temperature(20))
    doc["labels"] = {"name": "\ud800"}
    parsed = parse_body(json.dumps(doc).encode())
    assert parsed.outcome is ParseOutcome.INVALID
    assert parsed.event_id == "cpbg96qngr7ai7ldarrg"
    assert parsed.error is not None
    assert parsed.error.startswith("body: Invalid JSON")


def test_temperature_samples_oldest_first() -> None:
    """Samples come sorted by sampleTime ascending whatever order DT sent them in."""
    event = typed((PAYLOAD_DIR / "temperature-multisample.json").read_bytes()).event
    assert isinstance(event, TemperatureEvent)
    samples = event.data.temperature.samples_oldest_first()
    assert [s.value for s in samples] == [4.0, 4.05, 4.1, 4.1, 4.15]
    assert samples == sorted(event.data.temperature.samples, key=lambda s: s.sample_time)
    assert event.data.temperature.samples[0].value == 4.15  # as sent: newest first


def test_humidity_samples_oldest_first() -> None:
    """Humidity samples sort by sampleTime too."""
    samples = [
        {"temperature": 21, "relativeHumidity": 40, "sampleTime": "2024-05-29T10:00:00Z"},
        {"temperature": 20, "relativeHumidity": 41, "sampleTime": "2024-05-29T09:00:00Z"},
    ]
    data = {"temperature": 21, "relativeHumidity": 40, "samples": samples, "updateTime": T0}
    event = typed(body("humidity", {"humidity": data})).event
    assert isinstance(event, HumidityEvent)
    assert [s.relative_humidity for s in event.data.humidity.samples_oldest_first()] == [41, 40]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("projects/p1/devices/d1", ("p1", "d1")),
        ("projects/p1/devices/", (None, None)),
        ("projects/p1", (None, None)),
        ("organizations/o/projects/p1/devices/d1", (None, None)),
        ("devices/d1/projects/p1", (None, None)),
        ("", (None, None)),
    ],
)
def test_project_and_device_ids_from_target_name(
    target: str, expected: tuple[str | None, str | None]
) -> None:
    """Ids come from projects/{p}/devices/{d}; any other shape gives None, not a wrong id."""
    doc = json.loads(temperature(20))
    doc["event"]["targetName"] = target
    parsed = parse_body(json.dumps(doc).encode())
    assert parsed.outcome is ParseOutcome.TYPED
    assert parsed.envelope is not None
    assert (parsed.project_id, parsed.device_id) == expected
    event = parsed.envelope.event
    assert (event.project_id, event.device_id) == expected


def test_dumped_envelope_validates_back_to_itself() -> None:
    """An envelope dumped (camelCase, DT's shape) and validated again is equal."""
    envelope = typed((PAYLOAD_DIR / "humidity.json").read_bytes())
    assert Envelope.model_validate(envelope.model_dump()) == envelope
