"""One event's way through the receiver, with no HTTP in sight:
verify, parse, dedup, deliver. The route in ``app.ingest`` only reads and answers."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from app.dedup import MemoryDedup
from app.delivery import Delivery
from app.events import ParseOutcome, parse_body
from app.received import ReceivedEvent
from app.signature import Verifier

log = logging.getLogger("dcon.receiver")


@dataclass(frozen=True, slots=True)
class Ack:
    status: Literal["accepted", "duplicate"]
    event: ReceivedEvent


class Receiver:
    def __init__(self, verifier: Verifier, dedup: MemoryDedup, delivery: Delivery) -> None:
        self.verifier = verifier
        self.dedup = dedup
        self.delivery = delivery
        self.counts: Counter[str] = Counter()

    async def receive(self, body: bytes, headers: Mapping[str, str]) -> Ack:
        """Take one DT request; return only once the event is safe in every sink.

        Raises ``SignatureError``, ``MalformedBody`` or ``DeliveryFailed``.
        """
        verification = self.verifier.verify(body, headers)
        parsed = parse_body(body)
        event = ReceivedEvent(body, parsed, verification, datetime.now(UTC))
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
            self.counts["accepted"] += 1
            return Ack("accepted", event)
        if not await self.dedup.claim(event_id):
            self.counts["duplicate"] += 1
            return Ack("duplicate", event)
        try:
            await self.delivery.deliver(event)
        except BaseException:
            self.dedup.release(event_id)
            raise
        self.dedup.commit(event_id)
        self.counts["accepted"] += 1
        return Ack("accepted", event)
