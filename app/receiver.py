"""One event's way through the receiver, with no HTTP in sight:
verify, parse, dedup, deliver. The route in ``app.ingest`` only reads and answers."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from app.dedup import DedupStore
from app.delivery import Deliverer
from app.errors import ReceiverError, SignatureError
from app.events import ParseOutcome, parse_body
from app.metrics import Metrics
from app.received import ReceivedEvent
from app.signature import Verification, Verifier

log = logging.getLogger("dcon.receiver")


@dataclass(frozen=True, slots=True)
class Ack:
    status: Literal["accepted", "duplicate"]
    event: ReceivedEvent


class Receiver:
    def __init__(
        self, verifier: Verifier, dedup: DedupStore, delivery: Deliverer, metrics: Metrics
    ) -> None:
        self.verifier = verifier
        self.dedup = dedup
        self.delivery = delivery
        self.metrics = metrics
        self.counts: Counter[str] = Counter()
        self._keys_seen: set[str] = set()

    async def receive(self, body: bytes, headers: Mapping[str, str]) -> Ack:
        """Take one DT request; return only once the event is safe in every sink.

        Raises ``SignatureError`` (401), ``MalformedBody`` (400) or a ``RetryLater`` (503:
        a sink failed, or a shared dedup store is busy or unreachable).
        """
        try:
            verification = self.verifier.verify(body, headers)
        except SignatureError as exc:
            self.metrics.signature_failures.labels(exc.scheme, exc.code).inc()
            raise
        self._note_keys(verification)
        parsed = parse_body(body)
        event = ReceivedEvent(body, parsed, verification, datetime.now(UTC))
        try:
            return await self._deliver_once(event)
        except ReceiverError as exc:
            exc.context = access_fields(event)
            raise

    async def _deliver_once(self, event: ReceivedEvent) -> Ack:
        parsed = event.parsed
        if parsed.outcome is not ParseOutcome.TYPED:
            self.counts[parsed.outcome.value] += 1
            log.warning(
                "event %s of type %r kept as %s: %s",
                parsed.event_id,
                parsed.event_type,
                parsed.outcome.value,
                parsed.error or "unknown event type",
            )
        event_id = parsed.event_id
        if event_id is None:
            # Nothing to deduplicate on; deliver it rather than lose it.
            await self.delivery.deliver(event)
            return self._accepted(event)
        if not await self.dedup.claim(event_id):
            self.counts["duplicate"] += 1
            self.metrics.duplicates.inc()
            return Ack("duplicate", event)
        try:
            await self.delivery.deliver(event)
        except BaseException:
            # Shielded: a cancelled request must still give its claim back.
            await asyncio.shield(self.dedup.release(event_id))
            raise
        await self.dedup.commit(event_id)
        return self._accepted(event)

    def _accepted(self, event: ReceivedEvent) -> Ack:
        self.counts["accepted"] += 1
        self.metrics.count_event(event.event_type, event.parsed.outcome, event.verification.label)
        return Ack("accepted", event)

    def _note_keys(self, verification: Verification) -> None:
        # Say once when a key is first used (e.g. "secret #2" during a rotation), so an
        # operator sees the switch happen without a log line per event.
        for passed in verification.passes:
            if passed.key not in self._keys_seen:
                self._keys_seen.add(passed.key)
                log.info("first event verified by %s with %s", passed.scheme, passed.key)


def access_fields(event: ReceivedEvent) -> dict[str, object]:
    """What the access log says about an event: ids and verification, never a token."""
    return {
        "eventId": event.event_id,
        "eventType": event.event_type,
        "deviceId": event.parsed.device_id,
        "verification": event.verification.label,
    }
