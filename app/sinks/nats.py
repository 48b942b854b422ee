"""``nats``: each event into a JetStream stream, confirmed by the stream's PubAck.

The payload is DT's raw body; the metadata travels in headers. ``Nats-Msg-Id`` is the
eventId, so JetStream's duplicate window stores a repeated event once, however many
receiver replicas publish it. ``send`` returns only on a PubAck from our stream: a plain
NATS publish is fire-and-forget and would be a false success.

nats-py reconnects on its own (forever, every second). Its reconnect buffer is switched
off: a publish during an outage fails at once instead of sitting in a buffer that may be
flushed after the receiver has already answered 503.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import StorageType, StreamConfig

from app.sinks.base import PermanentSinkError, SinkConfigError, SinkError
from app.sinks.template import Template

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

    from app.received import ReceivedEvent
    from app.settings import Settings

log = logging.getLogger(__name__)

NAME = "nats"
SCHEMES = ("nats", "tls", "ws", "wss")
CONNECT_TIMEOUT = 10.0  # the first connection, at start-up
RECONNECT_WAIT = 1  # seconds between reconnection attempts, which never stop
# A connection that died silently is noticed after ~3 unanswered pings (default: 4 min).
PING_INTERVAL = 10
CLOSE_TIMEOUT = 5.0
# Not allowed inside a subject token: the separator, the wildcards, any whitespace.
UNSAFE = re.compile(r"[.*>\s]")
PLACEHOLDER = re.compile(r"\{[^{}]*\}")
# ServerError 10058: "stream name already in use" (another replica created it first).
STREAM_NAME_IN_USE = 10058


def clean_token(value: str) -> str:
    """A template value made safe as (part of) one subject token."""
    return UNSAFE.sub("_", value)


def subject_filter(template: str) -> str:
    """The subject filter a stream needs for every subject ``template`` can render:
    ``dt.{projectId}.{eventType}`` → ``dt.*.*``."""
    return ".".join("*" if PLACEHOLDER.search(t) else t for t in template.split("."))


def covers(pattern: str, subject: str) -> bool:
    """Whether a stream subject ``pattern`` matches every subject ``subject`` matches."""
    theirs, ours = pattern.split("."), subject.split(".")
    for i, part in enumerate(theirs):
        if part == ">":
            return len(ours) > i
        if i >= len(ours) or part not in ("*", ours[i]):
            return False
    return len(theirs) == len(ours)


def check_subject(text: str, setting: str) -> Template:
    template = Template(text, setting)
    for token in text.split("."):
        static = PLACEHOLDER.sub("", token)
        if not token or UNSAFE.search(static):
            raise SinkConfigError(
                f"{setting}: {text!r} is not a NATS subject template: tokens separated by "
                "'.', each non-empty and without '*', '>' or whitespace"
            )
    return template


def check_servers(url: str, setting: str) -> list[str]:
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise SinkConfigError(f"{setting}: no server given")
    for server in servers:
        try:
            parts = urlsplit(server)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise SinkConfigError(f"{setting}: {exc}") from None
        if parts.scheme not in SCHEMES or not parts.hostname:
            raise SinkConfigError(
                f"{setting}: expected {'|'.join(SCHEMES)}://[user:password@]host[:port], "
                f"comma-separated; got scheme {parts.scheme!r}"
                + ("" if parts.hostname else " without a host")
            )
    return servers


def check_stream(name: str, setting: str) -> str:
    if not name or re.search(r"[.*>/\\\s]", name):
        raise SinkConfigError(
            f"{setting}: {name!r} is not a stream name (no '.', '*', '>', '/', '\\' or spaces)"
        )
    return name


def header_name(key: str) -> str:
    """``receivedAt`` → ``Dcon-Received-At``."""
    return "Dcon-" + "-".join(w.capitalize() for w in re.split(r"(?=[A-Z])", key))


def message_id(event: ReceivedEvent) -> str:
    """The eventId; a body without one is identified by its hash, so DT's retries of it
    still deduplicate."""
    return event.event_id or "sha256:" + hashlib.sha256(event.body).hexdigest()


def headers(event: ReceivedEvent) -> dict[str, str]:
    found = {"Nats-Msg-Id": message_id(event)}
    for key, value in event.meta().items():
        if value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        found[header_name(key)] = " ".join(text.splitlines())
    return found


class NatsSink:
    """Publish each event to a JetStream stream; ``send`` returns on the stream's PubAck.

    The stream is created at ``connect`` when missing (subjects: the subject template with
    each placeholder token as ``*``); an existing one is used as it is, provided its
    subjects cover the template.
    """

    name = NAME

    def __init__(
        self,
        url: str,
        *,
        stream: str,
        subject: str,
        duplicate_window: float,
        timeout: float,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.servers = check_servers(url, "DCON_NATS_URL")
        self.stream = check_stream(stream, "DCON_NATS_STREAM")
        self.subject = check_subject(subject, "DCON_NATS_SUBJECT")
        self.filter = subject_filter(subject)
        self.duplicate_window = duplicate_window
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.duplicates = 0  # sends that JetStream acknowledged as already stored
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._stream_ready = False
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> NatsSink:
        return cls(
            settings.nats_url,
            stream=settings.nats_stream,
            subject=settings.nats_subject,
            duplicate_window=settings.nats_duplicate_window,
            timeout=settings.sink_timeout,
        )

    async def connect(self) -> None:
        """Connect, then create the stream or check that the existing one fits."""
        if self._closed:
            raise SinkError(NAME, "sink is closed")
        if self._nc is not None:
            return
        nc = Client()
        try:
            # With endless reconnects nats-py would retry a first connection forever too.
            await asyncio.wait_for(self._open(nc), self.connect_timeout)
            js = nc.jetstream(timeout=self.timeout)
            await self._ensure_stream(js)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            await _close_quietly(nc)
            reason = f"no connection within {self.connect_timeout:g} s" if _timeout(exc) else exc
            raise SinkError(NAME, f"cannot connect to {self._where()}: {reason}") from exc
        except BaseException:  # the stream does not fit, or we were cancelled
            await _close_quietly(nc)
            raise
        self._nc, self._js = nc, js

    async def send(self, event: ReceivedEvent) -> None:
        """Return once the stream acknowledged the event (or said it already has it)."""
        js = self._context()
        if not self._stream_ready:
            await self._ensure_stream(js)
        subject = self.subject.render(event, clean_token)
        try:
            ack = await js.publish(
                subject,
                event.body,
                timeout=self.timeout,
                stream=self.stream,
                headers=headers(event),
            )
        except nats.js.errors.NoStreamResponseError:
            self._stream_ready = False  # deleted under us? the next send looks again
            raise SinkError(NAME, f"no JetStream stream took {subject!r}") from None
        except nats.js.errors.APIError as exc:
            raise SinkError(NAME, f"stream {self.stream} refused {subject!r}: {exc}") from exc
        except nats.errors.MaxPayloadError as exc:
            raise PermanentSinkError(
                NAME, f"{len(event.body)}-byte event is over the server's max_payload"
            ) from exc
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise SinkError(NAME, f"publish to {subject!r} failed: {_describe(exc)}") from exc
        if ack.duplicate:
            self.duplicates += 1
            log.debug("event %s already in stream %s", message_id(event), ack.stream)

    async def ping(self) -> None:
        """Ask JetStream for the stream's info: proves the server, JetStream and the stream."""
        js = self._context()
        try:
            await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            self._stream_ready = False
            raise SinkError(NAME, f"stream {self.stream} does not exist") from None
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise SinkError(NAME, f"{self._where()} unreachable: {_describe(exc)}") from exc

    async def close(self) -> None:
        """Close the connection; idempotent."""
        self._closed = True
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            await _close_quietly(nc)

    async def _open(self, nc: Client) -> None:
        await nc.connect(
            servers=self.servers,
            name="dcon-receiver",
            connect_timeout=max(1, round(self.connect_timeout)),
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT,
            pending_size=0,  # no reconnect buffer: fail fast while disconnected
            ping_interval=PING_INTERVAL,
            max_outstanding_pings=3,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        for _ in range(2):
            try:
                info = await js.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                pass
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                detail = f"cannot look up stream {self.stream}: {_describe(exc)}"
                raise SinkError(NAME, detail) from exc
            else:
                self._check_existing(info.config)
                self._stream_ready = True
                return
            try:
                await js.add_stream(self._config())
            except nats.js.errors.APIError as exc:
                if exc.err_code == STREAM_NAME_IN_USE:
                    continue  # created concurrently by another replica: check that one
                raise SinkError(NAME, f"cannot create stream {self.stream}: {exc}") from exc
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                detail = f"cannot create stream {self.stream}: {_describe(exc)}"
                raise SinkError(NAME, detail) from exc
            log.info(
                "created JetStream stream %s for %s (duplicate window %g s)",
                self.stream,
                self.filter,
                self.duplicate_window,
            )
            self._stream_ready = True
            return
        raise SinkError(NAME, f"stream {self.stream} could be neither created nor found")

    def _config(self) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            subjects=[self.filter],
            storage=StorageType.FILE,
            duplicate_window=self.duplicate_window,
        )

    def _check_existing(self, config: StreamConfig) -> None:
        subjects = config.subjects or []
        if not any(covers(pattern, self.filter) for pattern in subjects):
            raise SinkError(
                NAME,
                f"stream {self.stream} exists with subjects {subjects}, which do not cover "
                f"{self.filter!r} (DCON_NATS_SUBJECT); publishing would fail or land "
                "nowhere. Add the subject to the stream or choose another DCON_NATS_STREAM",
            )
        if config.duplicate_window != self.duplicate_window:
            log.warning(
                "stream %s exists with a duplicate window of %g s, not the %g s of "
                "DCON_NATS_DUPLICATE_WINDOW; it is used as it is",
                self.stream,
                config.duplicate_window,
                self.duplicate_window,
            )

    def _context(self) -> JetStreamContext:
        if self._js is None:
            raise SinkError(NAME, "closed" if self._closed else "not connected")
        return self._js

    def _where(self) -> str:
        # host[:port] only: the URL may carry a password or token.
        parts = [urlsplit(server) for server in self.servers]
        return ", ".join(f"{p.hostname}:{p.port}" if p.port else str(p.hostname) for p in parts)

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS %s: %s", self._where(), _describe(exc))

    async def _on_disconnected(self) -> None:
        if self._nc is not None and not self._nc.is_closed:  # not our own close
            log.warning("NATS %s: disconnected; reconnecting", self._where())

    async def _on_reconnected(self) -> None:
        log.info("NATS %s: reconnected", self._where())


def _timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) and not isinstance(exc, nats.errors.Error)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, nats.errors.OutboundBufferLimitError):
        return "not connected (reconnecting)"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__


async def _close_quietly(nc: Client) -> None:
    try:
        await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        log.warning("closing the NATS connection: %s", _describe(exc))
