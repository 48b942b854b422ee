"""The unit handed to sinks: DT's raw body, what we parsed from it, and how it was verified."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from app.events import ParsedBody, parse_body
from app.signature import SchemePass, Verification

# json.dumps with non-default arguments builds a new encoder on every call; one built once
# does the same work for a fraction of the cost.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# What that encoder does to one string (the C function where CPython has it).
_STRING: Callable[[str], str] = json.encoder.encode_basestring

# What ``record()`` writes between the metadata and DT's verbatim body.
_BODY_KEY = b',"body":'
# Stands in for the key name, which a record does not keep.
RECORDED_KEY = "(as recorded)"


@dataclass(frozen=True)
class ReceivedEvent:
    body: bytes
    parsed: ParsedBody
    verification: Verification
    received_at: datetime

    @classmethod
    def from_record(cls, line: bytes) -> ReceivedEvent:
        """The event a ``record()`` line describes, with DT's body byte for byte.

        Spool files, dead-letter files and the file sink's JSON Lines all hold these
        lines, so whatever reads them back (the spool's forwarder, ``replay``) gets the
        event the receiver accepted: the same body, receive time and verification label.
        Raises ``ValueError`` for a line that is not a record.
        """
        doc = json.loads(line)
        if not isinstance(doc, dict) or "body" not in doc or "receivedAt" not in doc:
            raise ValueError("not an event record: no body or receivedAt")
        if "bodyBase64" in doc:
            body = base64.b64decode(doc["bodyBase64"], validate=True)
        else:
            # Metadata values are JSON strings, in which a bare quote cannot occur, so
            # the first ',"body":' is where the verbatim body was spliced in.
            line = line.rstrip(b"\r\n")
            start = line.find(_BODY_KEY)
            body = line[start + len(_BODY_KEY) : -1]
        label = doc.get("verification") or "unverified"
        passes = () if label == "unverified" else label.split("+")
        return cls(
            body,
            parse_body(body),
            Verification(tuple(SchemePass(scheme, RECORDED_KEY) for scheme in passes)),
            datetime.fromisoformat(doc["receivedAt"]),
        )

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

    def _head(self) -> str:
        """``meta()`` as compact JSON, written out directly: the same text (a test holds
        them equal) in a third of the time of building and encoding the dict, on a path
        every event takes."""
        parsed = self.parsed
        head = (
            f'{{"eventId":{_text(parsed.event_id)},"eventType":{_text(parsed.event_type)},'
            f'"projectId":{_text(parsed.project_id)},"deviceId":{_text(parsed.device_id)},'
            f'"receivedAt":{_timestamp(self.received_at)},'
            f'"verified":{"true" if self.verified else "false"},'
            f'"verification":{_STRING(self.verification.label)},'
            f'"outcome":{_STRING(parsed.outcome)}'  # a StrEnum: the value itself
        )
        if parsed.error is not None:
            head += f',"error":{_STRING(parsed.error)}'
        return head + "}"

    def record(self) -> bytes:
        """One JSON object on one line (no trailing newline) carrying DT's body unchanged.

        Built once per event, however many sinks ask for it.

        DT sends compact JSON, so its bytes are spliced in verbatim and a reader gets the
        exact signed body back. A body with raw line breaks (legal JSON whitespace) cannot
        sit on one line as it is; it is stored parsed, with the exact bytes in
        ``bodyBase64`` so that nothing signed is lost.
        """
        # Kept in the instance's __dict__ as functools.cached_property would, without the
        # lock it takes on every first access (3.11), which is every event's only access.
        line: bytes | None = self.__dict__.get("_line")
        if line is None:
            line = self.__dict__["_line"] = self._build_record()
        return line

    def _build_record(self) -> bytes:
        head = self._head()
        if b"\n" in self.body or b"\r" in self.body:
            extra = _ENCODE(
                {
                    "body": json.loads(self.body),
                    "bodyBase64": base64.b64encode(self.body).decode("ascii"),
                }
            )
            return (head[:-1] + "," + extra[1:]).encode()
        return head[:-1].encode() + b',"body":' + self.body + b"}"


# The events checked in one batch share one receive time, the same datetime object: its
# quoted text is worked out once per batch rather than once per event (isoformat was
# about a third of the line's head). Kept by identity, not equality: an equal instant in
# another time zone is spelt differently. One tuple, swapped whole, so a reader in
# another thread never pairs one time with another's text.
_last_timestamp: tuple[datetime | None, str] = (None, "")


def _timestamp(received_at: datetime) -> str:
    global _last_timestamp
    last, text = _last_timestamp
    if last is not received_at:
        text = _STRING(received_at.isoformat().replace("+00:00", "Z"))
        _last_timestamp = (received_at, text)
    return text


def _text(value: str | None) -> str:
    return "null" if value is None else _STRING(value)
