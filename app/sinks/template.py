"""Names built from an event: stream, subject, routing key and topic templates.

A template such as ``dt.{projectId}.{deviceType}.{eventType}`` is checked once at
start-up (an unknown placeholder fails there, naming the setting) and rendered per event.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import TYPE_CHECKING

from app.sinks.base import SinkConfigError

if TYPE_CHECKING:
    from app.received import ReceivedEvent

FIELDS = ("projectId", "deviceId", "deviceType", "eventType", "eventId")
MISSING = "unknown"


def event_fields(event: ReceivedEvent) -> dict[str, str]:
    """The values a template may use; a value the event lacks becomes ``unknown``."""
    parsed = event.parsed
    metadata = parsed.envelope.metadata if parsed.envelope is not None else None
    values = {
        "projectId": parsed.project_id,
        "deviceId": parsed.device_id,
        "deviceType": metadata.device_type if metadata is not None else None,
        "eventType": parsed.event_type,
        "eventId": parsed.event_id,
    }
    return {key: value or MISSING for key, value in values.items()}


class Template:
    def __init__(self, text: str, setting: str) -> None:
        self.text = text
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
        except ValueError as exc:
            raise SinkConfigError(f"{setting}: {exc} in {text!r}") from None
        unknown = [name for name in names if name not in FIELDS]
        if unknown:
            raise SinkConfigError(
                f"{setting}: unknown placeholder {{{unknown[0]}}} in {text!r}; "
                f"use {', '.join('{' + f + '}' for f in FIELDS)}"
            )
        self.static = not names

    def render(self, event: ReceivedEvent, clean: Callable[[str], str] = str) -> str:
        """The name for ``event``; ``clean`` makes each value safe for the target system."""
        if self.static:
            return self.text
        fields = {key: clean(value) for key, value in event_fields(event).items()}
        return self.text.format_map(fields)
