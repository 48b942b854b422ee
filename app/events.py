"""Typed DT events. CONTRACT STUB: the models are being written; the interface below is fixed."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from app.errors import MalformedBody


class ParseOutcome(StrEnum):
    TYPED = "typed"  # a known eventType that fits its model
    UNKNOWN = "unknown"  # an eventType or enum value we do not know yet: kept, counted
    INVALID = "invalid"  # JSON that does not fit the models: kept, flagged, counted


@dataclass(frozen=True, slots=True)
class ParsedBody:
    outcome: ParseOutcome
    event_id: str | None
    event_type: str | None
    project_id: str | None
    device_id: str | None
    envelope: Any | None  # app.events.Envelope once typed
    error: str | None = None


def parse_body(raw: bytes) -> ParsedBody:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedBody(f"body is not UTF-8 JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MalformedBody("body is not a JSON object")
    event = doc.get("event") if isinstance(doc.get("event"), dict) else {}
    target = str(event.get("targetName", "")).split("/")
    return ParsedBody(
        ParseOutcome.INVALID,
        event.get("eventId"),
        event.get("eventType"),
        target[1] if len(target) == 4 else None,
        target[3] if len(target) == 4 else None,
        None,
        "models not written yet",
    )
