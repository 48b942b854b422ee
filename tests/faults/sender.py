"""A sender that behaves like DT: concurrent POSTs of signed events over keep-alive
connections, each retried after any answer but 200, and after any connection error, with
growing pauses."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from app.samples import EVENT_TYPES, sample_body
from app.signing import sign_secret
from tests.faults.processes import SECRET, wait_until

# The mix of event types; nothing depends on it being unpredictable.
RNG = random.Random()  # noqa: S311


def dt_events(count: int) -> dict[str, bytes]:
    """``count`` DT bodies of random types, by their distinct eventIds."""
    bodies = (sample_body(RNG.choice(EVENT_TYPES)) for _ in range(count))
    events = {json.loads(body)["event"]["eventId"]: body for body in bodies}
    assert len(events) == count
    return events


@dataclass(frozen=True, slots=True)
class Attempt:
    request_id: str
    outcome: str  # the HTTP status ("200", "503"), or what went wrong ("ConnectionRefusedError")
    started: float  # time.monotonic()
    ended: float


@dataclass
class Delivery:
    """Every attempt at one event, in order."""

    event_id: str
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def acknowledged(self) -> bool:
        return any(a.outcome == "200" for a in self.attempts)

    @property
    def final(self) -> str | None:
        return self.attempts[-1].outcome if self.attempts else None


class DTSender:
    """POST every event over ``connections`` connections until each is answered 200, or
    until ``give_up_after`` seconds since the start have passed."""

    def __init__(
        self,
        url: str,
        *,
        connections: int = 32,
        first_pause: float = 0.05,
        longest_pause: float = 1.0,
        give_up_after: float = 120.0,
        rate: float | None = None,
    ) -> None:
        parts = urlsplit(url)
        assert parts.scheme == "http", url
        assert parts.hostname, url
        assert parts.port, url
        self.host, self.port = parts.hostname, parts.port
        self.connections = connections
        self.first_pause = first_pause
        self.longest_pause = longest_pause
        self.give_up_after = give_up_after
        # New events per second (None: all at once). Paced, a run lasts as long as the
        # test needs it to, however fast the receiver answers.
        self.rate = rate
        self.deliveries: dict[str, Delivery] = {}
        self.acknowledged = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # --- driving it from a test ---------------------------------------------------------------

    def start(self, bodies: dict[str, bytes]) -> None:
        """Send in a thread of its own, so the test can kill and restart things meanwhile."""
        self._thread = threading.Thread(
            target=self._run, args=(bodies,), name="dt-sender", daemon=True
        )
        self._thread.start()

    def wait_acknowledged(self, count: int, timeout: float = 60) -> None:
        wait_until(lambda: self.acknowledged >= count, timeout, f"{count} events answered 200")

    def finish(self, timeout: float = 180) -> None:
        """Wait until every event is answered 200 or given up on."""
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the sender did not finish"
        if self._error is not None:
            raise self._error

    # --- what it saw ----------------------------------------------------------------------------

    def answers(self) -> Counter[str]:
        return Counter(a.outcome for d in self.deliveries.values() for a in d.attempts)

    def attempts(self) -> list[Attempt]:
        return [a for d in self.deliveries.values() for a in d.attempts]

    # --- sending ------------------------------------------------------------------------------

    def _run(self, bodies: dict[str, bytes]) -> None:
        try:
            asyncio.run(self._send_all(bodies))
        except BaseException as exc:  # handed to the test thread by finish()
            self._error = exc

    async def _send_all(self, bodies: dict[str, bytes]) -> None:
        """``connections`` workers take events from one queue; an event that failed goes
        back into it after its pause, so new events keep flowing meanwhile, as with DT."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, bytes, float]] = asyncio.Queue()
        started = loop.time()
        for n, (event_id, body) in enumerate(bodies.items()):
            self.deliveries[event_id] = Delivery(event_id)
            new = (event_id, body, self.first_pause)
            if self.rate is None:
                queue.put_nowait(new)
            else:
                loop.call_at(started + n / self.rate, queue.put_nowait, new)
        give_up_at = time.monotonic() + self.give_up_after
        pending = len(bodies)
        done = asyncio.Event()

        def settle() -> None:
            nonlocal pending
            pending -= 1
            if not pending:
                done.set()

        async def work() -> None:
            connection = Connection(self.host, self.port)
            try:
                while True:
                    event_id, body, pause = await queue.get()
                    delivery = self.deliveries[event_id]
                    attempt = await connection.post(event_id, len(delivery.attempts), body)
                    delivery.attempts.append(attempt)
                    if attempt.outcome == "200":
                        self.acknowledged += 1
                        settle()
                    elif time.monotonic() > give_up_at:
                        settle()
                    else:
                        retry = (event_id, body, min(pause * 2, self.longest_pause))
                        loop.call_later(pause * RNG.uniform(0.5, 1.0), queue.put_nowait, retry)
            finally:
                connection.close()

        workers = [asyncio.create_task(work()) for _ in range(self.connections)]
        if pending:
            await done.wait()
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


class Connection:
    """One keep-alive HTTP/1.1 connection, opened again after any error.

    Plain asyncio rather than an HTTP client library: on this two-core machine the sender
    shares the CPU with the receiver, and a library's per-request cost made the sender,
    not the receiver, the bottleneck.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, event_id: str, number: int, body: bytes) -> Attempt:
        request_id = f"{event_id}.{number}"
        head = (
            f"POST /events HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-Id: {request_id}\r\n"
            f"X-Dt-Signature: {sign_secret(body, SECRET)}\r\n\r\n"
        )
        started = time.monotonic()
        try:
            outcome = await self._exchange(head.encode() + body)
        except OSError as exc:  # refused, reset, broken pipe
            outcome = type(exc).__name__
            self.close()
        except asyncio.IncompleteReadError:
            outcome = "ClosedWithoutAnswer"
            self.close()
        return Attempt(request_id, outcome, started, time.monotonic())

    async def _exchange(self, request: bytes) -> str:
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        writer.write(request)
        await writer.drain()
        status = (await reader.readuntil(b"\r\n")).split(b" ", 2)[1].decode()
        length, keep_alive = 0, True
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "connection" and value.strip().lower() == "close":
                keep_alive = False
        await reader.readexactly(length)
        if not keep_alive:
            self.close()
        return status

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None
