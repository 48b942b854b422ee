"""The unit handed to sinks: DT's raw body, what we parsed from it, and how it was verified."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

from app.events import ParsedBody
from app.signature import Verification


@dataclass(frozen=True)
class ReceivedEvent:
    body: bytes
    parsed: ParsedBody
    verification: Verification
    received_at: datetime

    @property
    def event_id(self) -> str | None:
        return self.parsed.event_id

    @property
    def event_type(self) -> str | None:
        return self.parsed.event_type

    @property
    def verified(self) -> bool:
        return self.verification.verified

    def meta(self) -> dict[str, Any]:
        """Everything about the event except its body, as JSON-ready values."""
        meta: dict[str, Any] = {
            "eventId": self.parsed.event_id,
            "eventType": self.parsed.event_type,
            "projectId": self.parsed.project_id,
            "deviceId": self.parsed.device_id,
            "receivedAt": self.received_at.isoformat().replace("+00:00", "Z"),
            "verified": self.verified,
            "verification": self.verification.label,
            "outcome": self.parsed.outcome.value,
        }
        if self.parsed.error is not None:
            meta["error"] = self.parsed.error
        return meta

    def record(self) -> bytes:
        """One JSON object on one line (no trailing newline) carrying DT's body unchanged.

        Built once per event, however many sinks ask for it.

        DT sends compact JSON, so its bytes are spliced in verbatim and a reader gets the
        exact signed body back. A body with raw line breaks (legal JSON whitespace) cannot
        sit on one line as it is; it is stored parsed, with the exact bytes in
        ``bodyBase64`` so that nothing signed is lost.
        """
        return self._record

    @cached_property
    def _record(self) -> bytes:
        head = json.dumps(self.meta(), separators=(",", ":"), ensure_ascii=False)
        if b"\n" in self.body or b"\r" in self.body:
            extra = json.dumps(
                {
                    "body": json.loads(self.body),
                    "bodyBase64": base64.b64encode(self.body).decode("ascii"),
                },
                separators=(",", ":"),
                ensure_ascii=False,
            )
            return (head[:-1] + "," + extra[1:]).encode()
        return head[:-1].encode() + b',"body":' + self.body + b"}"
