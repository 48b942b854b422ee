"""One error tree for the receiver.

Domain code raises these; only ``app.ingest`` turns them into HTTP answers, through
``status`` and ``code``. Constructing an error does nothing but store its data.
"""

from __future__ import annotations

from collections.abc import Mapping


class ReceiverError(Exception):
    """Base of every error the receiver answers with a JSON body."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
        # What is known of the event when this was raised (for the access log).
        self.context: dict[str, object] = {}


class SignatureError(ReceiverError):
    """The request's signature did not pass; DT will retry, so 401 is safe."""

    status = 401

    def __init__(self, code: str, detail: str, scheme: str) -> None:
        super().__init__(detail)
        self.code = code
        self.scheme = scheme


class BodyTooLarge(ReceiverError):
    status = 413
    code = "body_too_large"


class MalformedBody(ReceiverError):
    status = 400
    code = "malformed_body"


class RetryLater(ReceiverError):
    """Not stored now, nothing wrong with the request: 503 with ``Retry-After``."""

    status = 503

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class DeliveryFailed(RetryLater):
    """At least one sink did not take the event: answer 503 so that DT retries."""

    code = "sink_unavailable"

    def __init__(
        self,
        detail: str,
        sinks: tuple[str, ...],
        retry_after: int,
        rejected: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(detail, retry_after)
        self.sinks = sinks
        # Those of ``sinks`` that refused the event for good, with their reason: sending
        # it again cannot help them (the spool's forwarder dead-letters it).
        self.rejected = dict(rejected or {})


class SpoolFull(RetryLater):
    """Spool mode: the spool already holds its limit of events not yet forwarded."""

    code = "spool_full"


class DedupBusy(RetryLater):
    """Another process is still delivering this eventId; its outcome is not known yet."""

    code = "in_flight_elsewhere"


class DedupUnavailable(RetryLater):
    """The dedup store shared by processes did not answer: without it a duplicate cannot be
    told apart, so the event is refused (503) rather than risked; DT retries."""

    code = "dedup_unavailable"


class ConfigError(Exception):
    """A setting is invalid; raised before the port opens, naming the setting."""
