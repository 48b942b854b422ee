"""Typed DT events: the body envelope, one model per event type, and ``parse_body``.

Every DT body is ``{"event", "labels", "metadata"}``. ``event.data`` is keyed by the event
type (``data["temperature"] = {...}``) for every type except ``labelsChanged``. The event
union is discriminated on ``eventType``, so pydantic goes straight to one model, and a type
DT adds later lands in ``UnknownEvent`` instead of failing.

Python names are snake_case; DT's camelCase names are the aliases, used for reading JSON and,
by default, for dumping it. Keys we do not model are kept (``model_extra``), never dropped.
"""

from __future__ import annotations

import json
from enum import StrEnum
from functools import reduce
from operator import attrgetter, or_
from typing import Annotated, Any, Final, Literal, NamedTuple, get_args

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    create_model,
)
from pydantic.alias_generators import to_camel
from pydantic_core import ErrorDetails

from app.errors import MalformedBody


class _Model(BaseModel):
    # Unknown keys are kept because DT adds fields over time and the receiver must not lose
    # them; validate_by_name lets Python code build events with snake_case names.
    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        serialize_by_alias=True,
        extra="allow",
    )


# --- enums: an unknown value fails validation (outcome UNKNOWN), it is never coerced ---


class Presence(StrEnum):
    """State of ``objectPresent`` and ``waterPresent``."""

    PRESENT = "PRESENT"
    NOT_PRESENT = "NOT_PRESENT"


class MotionState(StrEnum):
    """State of ``motion``; NO_MOTION_DETECTED is sent when the activity timer expires."""

    MOTION_DETECTED = "MOTION_DETECTED"
    NO_MOTION_DETECTED = "NO_MOTION_DETECTED"


class DeskState(StrEnum):
    """State of ``deskOccupancy``."""

    OCCUPIED = "OCCUPIED"
    NOT_OCCUPIED = "NOT_OCCUPIED"


class ContactState(StrEnum):
    """State of ``contact``."""

    OPEN = "OPEN"
    CLOSED = "CLOSED"


class ProbeWireState(StrEnum):
    """State of ``probeWireStatus`` (Temperature Probe Sensor only)."""

    INVALID_WIRE_CONFIGURATION = "INVALID_WIRE_CONFIGURATION"
    INVALID_COEFFICIENT_CONFIGURATION = "INVALID_COEFFICIENT_CONFIGURATION"
    TWO_WIRE = "TWO_WIRE"
    THREE_WIRE = "THREE_WIRE"
    FOUR_WIRE = "FOUR_WIRE"


class Connection(StrEnum):
    """How a device reaches DT Cloud (``connectionStatus``)."""

    SDS = "SDS"
    ETHERNET = "ETHERNET"
    CELLULAR = "CELLULAR"
    OFFLINE = "OFFLINE"


class TransmissionMode(StrEnum):
    """Radio mode reported by ``networkStatus``."""

    LOW_POWER_STANDARD_MODE = "LOW_POWER_STANDARD_MODE"
    HIGH_POWER_BOOST_MODE = "HIGH_POWER_BOOST_MODE"


# --- the payload of each event type: what sits in data[eventType] ---
# Timestamps must carry a zone (DT always sends Z) so that they compare safely with each
# other and with datetime.now(UTC). Float quantities accept JSON integers (DT sends 27).


class _Update(_Model):
    update_time: AwareDatetime


class Touch(_Update):
    """A touch; it carries only its time."""


class TemperatureSample(_Model):
    """One temperature reading inside a (possibly multi-sample) event."""

    value: float
    sample_time: AwareDatetime


class Temperature(_Update):
    """Temperature in °C; ``samples`` are newest first as sent (use ``samples_oldest_first``)."""

    value: float
    samples: list[TemperatureSample] = Field(default_factory=list)
    is_backfilled: bool | None = None  # added by DT in 2024

    def samples_oldest_first(self) -> list[TemperatureSample]:
        """The samples sorted by ``sample_time``, oldest first; DT's order is not relied on."""
        return sorted(self.samples, key=attrgetter("sample_time"))


class HumiditySample(_Model):
    """One humidity reading inside a (possibly multi-sample) event."""

    temperature: float
    relative_humidity: float
    sample_time: AwareDatetime


class Humidity(_Update):
    """Temperature (°C) and relative humidity (%); older events have no samples."""

    temperature: float
    relative_humidity: float
    samples: list[HumiditySample] = Field(default_factory=list)
    is_backfilled: bool | None = None

    def samples_oldest_first(self) -> list[HumiditySample]:
        """The samples sorted by ``sample_time``, oldest first; DT's order is not relied on."""
        return sorted(self.samples, key=attrgetter("sample_time"))


class ObjectPresent(_Update):
    """Proximity sensor state change."""

    state: Presence


class ObjectPresentCount(_Update):
    """Lifetime count of object appear/disappear."""

    total: int


class TouchCount(_Update):
    """Lifetime count of touches."""

    total: int


class WaterPresent(_Update):
    """Water detector state change."""

    state: Presence


class CloudConnector(_Model):
    """A Cloud Connector that heard the sensor."""

    id: str
    signal_strength: int | None = None
    rssi: int | None = None


class NetworkStatus(_Model):
    """Radio link of a sensor; every field optional because DT's API marks them so."""

    signal_strength: int | None = None
    rssi: int | None = None
    update_time: AwareDatetime | None = None
    cloud_connectors: list[CloudConnector] = Field(default_factory=list)
    transmission_mode: TransmissionMode | None = None


class BatteryStatus(_Update):
    """Coarse battery level in percent."""

    percentage: int


class LabelsChanged(_Model):
    """Label edits; DT sends no ``updateTime`` here, use ``event.timestamp``."""

    added: dict[str, str] = Field(default_factory=dict)
    modified: dict[str, str] = Field(default_factory=dict)
    removed: list[str] = Field(default_factory=list)


class ConnectionStatus(_Update):
    """Which link a device uses now and which it has available."""

    connection: Connection
    available: list[Connection] = Field(default_factory=list)


class StatusError(_Model):
    """An error reported by a Cloud Connector's Ethernet or cellular link."""

    code: str
    message: str


class EthernetStatus(_Update):
    """Cloud Connector Ethernet link."""

    mac_address: str
    ip_address: str
    errors: list[StatusError] = Field(default_factory=list)


class CellularStatus(_Update):
    """Cloud Connector cellular link."""

    signal_strength: int
    errors: list[StatusError] = Field(default_factory=list)


class Co2(_Update):
    """CO2 concentration in ppm."""

    ppm: int


class Pressure(_Update):
    """Barometric pressure in pascal."""

    pascal: float


class Motion(_Update):
    """Motion sensor state change."""

    state: MotionState


class DeskOccupancy(_Update):
    """Desk sensor state change; ``remarks`` only on newer events."""

    state: DeskState
    remarks: list[str] = Field(default_factory=list)


class Contact(_Update):
    """Door/window contact state change."""

    state: ContactState


class ProbeWireStatus(_Update):
    """How the temperature probe is wired."""

    state: ProbeWireState


# --- event.data: keyed by the event type (the wrapper DT puts around each payload) ---


class TouchData(_Model):
    """``event.data`` of a ``touch`` event."""

    touch: Touch


class TemperatureData(_Model):
    """``event.data`` of a ``temperature`` event."""

    temperature: Temperature


class ObjectPresentData(_Model):
    """``event.data`` of a ``objectPresent`` event."""

    object_present: ObjectPresent


class HumidityData(_Model):
    """``event.data`` of a ``humidity`` event."""

    humidity: Humidity


class ObjectPresentCountData(_Model):
    """``event.data`` of a ``objectPresentCount`` event."""

    object_present_count: ObjectPresentCount


class TouchCountData(_Model):
    """``event.data`` of a ``touchCount`` event."""

    touch_count: TouchCount


class WaterPresentData(_Model):
    """``event.data`` of a ``waterPresent`` event."""

    water_present: WaterPresent


class NetworkStatusData(_Model):
    """``event.data`` of a ``networkStatus`` event."""

    network_status: NetworkStatus


class BatteryStatusData(_Model):
    """``event.data`` of a ``batteryStatus`` event."""

    battery_status: BatteryStatus


class ConnectionStatusData(_Model):
    """``event.data`` of a ``connectionStatus`` event."""

    connection_status: ConnectionStatus


class EthernetStatusData(_Model):
    """``event.data`` of a ``ethernetStatus`` event."""

    ethernet_status: EthernetStatus


class CellularStatusData(_Model):
    """``event.data`` of a ``cellularStatus`` event."""

    cellular_status: CellularStatus


class Co2Data(_Model):
    """``event.data`` of a ``co2`` event."""

    co2: Co2


class PressureData(_Model):
    """``event.data`` of a ``pressure`` event."""

    pressure: Pressure


class MotionData(_Model):
    """``event.data`` of a ``motion`` event."""

    motion: Motion


class DeskOccupancyData(_Model):
    """``event.data`` of a ``deskOccupancy`` event."""

    desk_occupancy: DeskOccupancy


class ContactData(_Model):
    """``event.data`` of a ``contact`` event."""

    contact: Contact


class ProbeWireStatusData(_Model):
    """``event.data`` of a ``probeWireStatus`` event."""

    probe_wire_status: ProbeWireStatus


# --- events ---


def split_target_name(target_name: str) -> tuple[str | None, str | None]:
    """``projects/{p}/devices/{d}`` → ``(p, d)``; ``(None, None)`` for any other shape."""
    match target_name.split("/"):
        case ["projects", project, "devices", device] if project and device:
            return project, device
    return None, None


class _EventBase(_Model):
    event_id: str
    target_name: str
    timestamp: AwareDatetime

    @property
    def project_id(self) -> str | None:
        """The project id from ``target_name``, or None if it is not the usual shape."""
        return split_target_name(self.target_name)[0]

    @property
    def device_id(self) -> str | None:
        """The device id from ``target_name``, or None if it is not the usual shape."""
        return split_target_name(self.target_name)[1]


class TouchEvent(_EventBase):
    """``touch``."""

    event_type: Literal["touch"]
    data: TouchData


class TemperatureEvent(_EventBase):
    """``temperature``."""

    event_type: Literal["temperature"]
    data: TemperatureData


class ObjectPresentEvent(_EventBase):
    """``objectPresent``."""

    event_type: Literal["objectPresent"]
    data: ObjectPresentData


class HumidityEvent(_EventBase):
    """``humidity``."""

    event_type: Literal["humidity"]
    data: HumidityData


class ObjectPresentCountEvent(_EventBase):
    """``objectPresentCount``."""

    event_type: Literal["objectPresentCount"]
    data: ObjectPresentCountData


class TouchCountEvent(_EventBase):
    """``touchCount``."""

    event_type: Literal["touchCount"]
    data: TouchCountData


class WaterPresentEvent(_EventBase):
    """``waterPresent``."""

    event_type: Literal["waterPresent"]
    data: WaterPresentData


class NetworkStatusEvent(_EventBase):
    """``networkStatus``: one per Cloud Connector in range."""

    event_type: Literal["networkStatus"]
    data: NetworkStatusData


class BatteryStatusEvent(_EventBase):
    """``batteryStatus``."""

    event_type: Literal["batteryStatus"]
    data: BatteryStatusData


class LabelsChangedEvent(_EventBase):
    """``labelsChanged``: the one type whose data is not keyed by its type."""

    event_type: Literal["labelsChanged"]
    data: LabelsChanged


class ConnectionStatusEvent(_EventBase):
    """``connectionStatus``."""

    event_type: Literal["connectionStatus"]
    data: ConnectionStatusData


class EthernetStatusEvent(_EventBase):
    """``ethernetStatus``."""

    event_type: Literal["ethernetStatus"]
    data: EthernetStatusData


class CellularStatusEvent(_EventBase):
    """``cellularStatus``."""

    event_type: Literal["cellularStatus"]
    data: CellularStatusData


class Co2Event(_EventBase):
    """``co2``."""

    event_type: Literal["co2"]
    data: Co2Data


class PressureEvent(_EventBase):
    """``pressure``."""

    event_type: Literal["pressure"]
    data: PressureData


class MotionEvent(_EventBase):
    """``motion``."""

    event_type: Literal["motion"]
    data: MotionData


class DeskOccupancyEvent(_EventBase):
    """``deskOccupancy``."""

    event_type: Literal["deskOccupancy"]
    data: DeskOccupancyData


class ContactEvent(_EventBase):
    """``contact``."""

    event_type: Literal["contact"]
    data: ContactData


class ProbeWireStatusEvent(_EventBase):
    """``probeWireStatus``."""

    event_type: Literal["probeWireStatus"]
    data: ProbeWireStatusData


class UnknownEvent(_EventBase):
    """Any ``eventType`` not modelled here; ``data`` is kept as DT sent it."""

    event_type: str
    data: dict[str, Any]


_UNKNOWN_TAG: Final = "unknown"


def _event_tag(value: Any) -> str:
    # Called on the raw dict (JSON, or a Python dict keyed by alias or by field name) or on
    # a model instance; anything we do not model goes to UnknownEvent rather than failing.
    if isinstance(value, dict):
        event_type = value.get("eventType", value.get("event_type"))
    else:
        event_type = getattr(value, "event_type", None)
    if isinstance(event_type, str) and event_type in KNOWN_EVENT_TYPES:
        return event_type
    return _UNKNOWN_TAG


Event = Annotated[
    Annotated[TouchEvent, Tag("touch")]
    | Annotated[TemperatureEvent, Tag("temperature")]
    | Annotated[ObjectPresentEvent, Tag("objectPresent")]
    | Annotated[HumidityEvent, Tag("humidity")]
    | Annotated[ObjectPresentCountEvent, Tag("objectPresentCount")]
    | Annotated[TouchCountEvent, Tag("touchCount")]
    | Annotated[WaterPresentEvent, Tag("waterPresent")]
    | Annotated[NetworkStatusEvent, Tag("networkStatus")]
    | Annotated[BatteryStatusEvent, Tag("batteryStatus")]
    | Annotated[LabelsChangedEvent, Tag("labelsChanged")]
    | Annotated[ConnectionStatusEvent, Tag("connectionStatus")]
    | Annotated[EthernetStatusEvent, Tag("ethernetStatus")]
    | Annotated[CellularStatusEvent, Tag("cellularStatus")]
    | Annotated[Co2Event, Tag("co2")]
    | Annotated[PressureEvent, Tag("pressure")]
    | Annotated[MotionEvent, Tag("motion")]
    | Annotated[DeskOccupancyEvent, Tag("deskOccupancy")]
    | Annotated[ContactEvent, Tag("contact")]
    | Annotated[ProbeWireStatusEvent, Tag("probeWireStatus")]
    | Annotated[UnknownEvent, Tag(_UNKNOWN_TAG)],
    Discriminator(_event_tag),
]
"""One DT event: the model for its ``eventType``, or ``UnknownEvent``."""

# Read off the union itself so the tags and this set cannot drift apart.
_TAGS: Final = frozenset(get_args(member)[1].tag for member in get_args(get_args(Event)[0]))
KNOWN_EVENT_TYPES: Final = _TAGS - {_UNKNOWN_TAG}
"""The 19 ``eventType`` strings that have a model."""


class Metadata(_Model):
    """Device facts DT adds to the body; any field may be missing on unusual events."""

    device_id: str | None = None
    project_id: str | None = None
    device_type: str | None = None
    product_number: str | None = None  # "" for emulated devices


class Envelope(_Model):
    """A whole DT body. ``metadata`` is None on bodies from before about January 2022."""

    event: Event
    labels: dict[str, str] = Field(default_factory=dict)
    metadata: Metadata | None = None


# Built once: building a TypeAdapter compiles the validator, far too slow per request.
_ENVELOPE: Final = TypeAdapter(Envelope)

# The envelope of the 19 modelled types alone, discriminated by pydantic-core itself on
# the ``eventType`` string. ``Event``'s discriminator is a Python function, which
# pydantic-core can only call with the event rebuilt as Python objects from the JSON,
# for that call alone. ``parse_body`` tries this validator first: measured on the bench's
# bodies, 7.4 -> 6.7 µs per body. The union is taken from ``Event``, not listed twice.
_KNOWN_MODELS: Final = tuple(
    get_args(member)[0]
    for member in get_args(get_args(Event)[0])
    if get_args(member)[1].tag != _UNKNOWN_TAG
)
_KNOWN_EVENT: Any = Annotated[reduce(or_, _KNOWN_MODELS), Field(discriminator="event_type")]
_KNOWN_ENVELOPE: Final = TypeAdapter(
    create_model("_KnownEnvelope", __base__=Envelope, event=(_KNOWN_EVENT, ...))
)


# --- parsing a request body ---


class ParseOutcome(StrEnum):
    """How well a body fits the models. Every outcome is kept and acknowledged."""

    TYPED = "typed"  # a known eventType that fits its model
    UNKNOWN = "unknown"  # an eventType or enum value we do not know yet: kept, counted
    INVALID = "invalid"  # JSON that does not fit the models: kept, flagged, counted


class ParsedBody(NamedTuple):
    """What ``parse_body`` learnt from a body; ``envelope`` is None unless it validated.

    A named tuple: as immutable as a frozen dataclass, at a third of its cost to build,
    and one is built for every request.
    """

    outcome: ParseOutcome
    event_id: str | None
    event_type: str | None
    project_id: str | None
    device_id: str | None
    envelope: Envelope | None
    error: str | None = None


def parse_body(raw: bytes) -> ParsedBody:
    """Parse a DT request body; raise ``MalformedBody`` only if it is not a UTF-8 JSON object.

    A body that is JSON but does not fit the models is still returned (UNKNOWN or INVALID,
    with ``error`` saying why) so that the caller stores it rather than losing it.
    """
    try:
        # The adapters' core validators themselves: TypeAdapter.validate_json adds a tenth
        # in Python around each, on every request.
        envelope = _KNOWN_ENVELOPE.validator.validate_json(raw)
    except ValidationError:
        # A new type or a broken body: the full validator's verdict and errors.
        try:
            envelope = _ENVELOPE.validator.validate_json(raw)
        except ValidationError as exc:
            return _salvage(raw, exc)
    else:
        # A subclass that only narrows ``event``: the same fields and layout, so the
        # instance can become the plain ``Envelope`` it is in all but name (equality with
        # other envelopes, repr and pickling go by class). object's own __setattr__:
        # pydantic's, in Python, would take four times as long.
        object.__setattr__(envelope, "__class__", Envelope)
    event = envelope.event
    project_id, device_id = split_target_name(event.target_name)
    outcome = ParseOutcome.UNKNOWN if isinstance(event, UnknownEvent) else ParseOutcome.TYPED
    return ParsedBody(outcome, event.event_id, event.event_type, project_id, device_id, envelope)


# Errors that mean "DT sent a value we have not met yet" rather than "the body is broken".
_UNKNOWN_VALUE_ERRORS: Final = frozenset({"enum", "literal_error"})
_MAX_ERROR_CHARS: Final = 500


def _salvage(raw: bytes, exc: ValidationError) -> ParsedBody:
    # Only reached when validation failed, so json.loads stays off the happy path. pydantic's
    # parser already refuses non-UTF-8 bytes (UTF-16 included); decoding strictly here turns
    # them into MalformedBody, since downstream code splices the raw bytes into UTF-8 lines.
    doc = _json_object(raw)
    event = doc.get("event")
    event = event if isinstance(event, dict) else {}
    target = event.get("targetName")
    project_id, device_id = split_target_name(target) if isinstance(target, str) else (None, None)
    errors = exc.errors(include_url=False)
    return ParsedBody(
        ParseOutcome.UNKNOWN if all(map(_is_new_value, errors)) else ParseOutcome.INVALID,
        _string(event.get("eventId")),
        _string(event.get("eventType")),
        project_id,
        device_id,
        None,
        _summarise(errors),
    )


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    # RecursionError: a deeply nested body would otherwise escape as a 500.
    except (ValueError, RecursionError) as exc:
        raise MalformedBody(f"body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MalformedBody(f"body is a JSON {type(doc).__name__}, not an object")
    return doc


def _is_new_value(error: ErrorDetails) -> bool:
    # Only a string can be an enum value DT added; an object or number there is a broken body.
    return error["type"] in _UNKNOWN_VALUE_ERRORS and isinstance(error["input"], str)


def _string(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _summarise(errors: list[ErrorDetails]) -> str:
    text = "; ".join(_describe(error) for error in errors)
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 1] + "…"
    return text


def _describe(error: ErrorDetails) -> str:
    line = f"{_location(error['loc'])}: {error['msg']}"
    value = error["input"]
    if isinstance(value, str | int | float | bool):  # containers would swamp the summary
        line += f" (got {value!r:.40})"
    return line


def _location(loc: tuple[int | str, ...]) -> str:
    # pydantic puts the union tag after "event" (event.temperature.data...); it names the
    # model, not a key in the body, so drop it to give the path as it is in the JSON.
    if len(loc) > 1 and loc[0] == "event" and loc[1] in _TAGS:
        loc = loc[:1] + loc[2:]
    return ".".join(str(part) for part in loc) or "body"
