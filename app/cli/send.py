"""`send`: emulate a DT Data Connector, signing exactly as DT does.

Like DT, it does not wait for one request before sending the next (up to ``--concurrency``
in flight), retries every non-2xx answer and every connection error after a growing,
jittered pause, and signs every attempt afresh. It ends with a summary of what the
receiver answered.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import re
import ssl
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
import httpx
import jwt

from app.samples import EVENT_TYPES, sample_body
from app.settings import DT_ISSUER
from app.signing import sign_asymmetric, sign_secret

ALL_TYPES = "all"
# Runs this small print one line per event unless --quiet, so that a single `send` shows
# the receiver's answer (as the README promises); larger runs need --verbose for that.
CHATTY_UP_TO = 10
# Events started and not finished (most of them waiting out a retry pause): bounds memory
# for long runs while new events keep flowing, as DT's do, during other events' retries.
MAX_OPEN_EVENTS = 1024
SAMPLE_CHARS = 300
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Signer:
    """The headers of one attempt: custom ones, then fresh DT signatures."""

    secret: str | None = None
    key: bytes | None = None
    kid: str = "local"
    issuer: str = DT_ISSUER
    org_id: str = "local-org"
    extra: tuple[tuple[str, str], ...] = ()

    def headers(self, body: bytes) -> dict[str, str]:
        # A new iat and jti on every call: a retry carries a token as fresh as DT's first try.
        headers = {"content-type": "application/json", **dict(self.extra)}
        if self.secret:
            headers["X-Dt-Signature"] = sign_secret(body, self.secret)
        if self.key:
            headers["DT-Asymmetric-Signature"] = sign_asymmetric(
                body, self.key, kid=self.kid, issuer=self.issuer, org_id=self.org_id
            )
        return headers


@dataclass(frozen=True, slots=True)
class Backoff:
    """Pauses between attempts: ``first``, doubling up to ``cap``, with jitter.

    DT documents only that "the pause between each resend attempt will gradually
    increase"; this is the usual shape of that. Each pause lies in [base/2, base], so
    retries of many events spread out instead of arriving in waves.
    """

    retries: int = 0
    first: float = 0.5
    cap: float = 30.0

    def pause(self, retry: int) -> float:
        base = min(self.cap, self.first * 2.0**retry)
        return base / 2 + random.uniform(0, base / 2)  # noqa: S311 - jitter, not security


@dataclass(frozen=True, slots=True)
class Answer:
    """What one attempt got: an HTTP status, or the name of a connection error."""

    status: str
    ok: bool
    text: str
    latency: float | None = None

    @property
    def duplicate(self) -> bool:
        """A 2xx whose body says ``{"status": "duplicate"}`` (the eventId was already stored)."""
        if not self.ok:
            return False
        try:
            document = json.loads(self.text)
        except ValueError:
            return False
        return isinstance(document, dict) and document.get("status") == "duplicate"


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


@dataclass
class Tally:
    """Everything the summary reports, updated as answers come in."""

    events: int = 0
    attempts: int = 0
    succeeded: int = 0
    duplicates: int = 0
    final: Counter[str] = field(default_factory=Counter)
    retried: Counter[str] = field(default_factory=Counter)
    samples: dict[str, str] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def add(self, answer: Answer, *, last: bool) -> None:
        self.attempts += 1
        if answer.latency is not None:
            self.latencies.append(answer.latency)
        if not answer.ok:
            (self.final if last else self.retried)[answer.status] += 1
            self.samples.setdefault(answer.status, answer.text[:SAMPLE_CHARS])
        if last:
            self.events += 1
            self.succeeded += answer.ok
            self.duplicates += answer.duplicate

    @property
    def all_succeeded(self) -> bool:
        return self.succeeded == self.events

    def summary(self) -> list[str]:
        elapsed = time.monotonic() - self.started
        rate = self.events / elapsed if elapsed > 0 else 0.0
        lines = [
            f"events sent:     {self.events}",
            f"attempts:        {self.attempts}",
            f"2xx:             {self.succeeded} (duplicates: {self.duplicates})",
            f"non-2xx final:   {_counts(self.final)}",
            f"non-2xx retried: {_counts(self.retried)}",
        ]
        lines += [f"  {status}: {text}" for status, text in sorted(self.samples.items())]
        if self.latencies:
            p50, p99 = (percentile(self.latencies, p) * 1000 for p in (50, 99))
            lines.append(f"latency:         p50 {p50:.1f} ms, p99 {p99:.1f} ms")
        lines.append(f"elapsed:         {elapsed:.2f} s ({rate:.1f} events/s)")
        return lines


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{status} x{n}" for status, n in sorted(counter.items())) or "none"


@dataclass
class Emulator:
    """Sends events the way a Data Connector does and tallies the answers."""

    client: httpx.AsyncClient
    url: str
    signer: Signer
    backoff: Backoff
    concurrency: int
    on_answer: Callable[[Answer, int, float | None], None]
    tally: Tally = field(default_factory=Tally)

    async def run(self, bodies: Iterable[bytes], rate: float) -> None:
        in_flight = asyncio.Semaphore(self.concurrency)
        await each_open(bodies, lambda body: self._deliver(body, in_flight), rate=rate)

    async def _deliver(self, body: bytes, in_flight: asyncio.Semaphore) -> None:
        def answered(answer: Answer, attempt: int, pause: float | None) -> None:
            self.tally.add(answer, last=pause is None)
            self.on_answer(answer, attempt, pause)

        await retrying(
            lambda: post_signed(self.client, self.url, self.signer, body),
            self.backoff,
            in_flight,
            answered,
        )


async def each_open(
    items: Iterable[T], work: Callable[[T], Coroutine[Any, Any, None]], *, rate: float = 0
) -> None:
    """Run ``work`` on every item, at most ``MAX_OPEN_EVENTS`` unfinished at once.

    Items are taken from ``items`` only as earlier ones finish, so a long input is never
    held in memory; ``rate`` > 0 caps how many start per second.
    """
    open_events = asyncio.Semaphore(MAX_OPEN_EVENTS)
    start = time.monotonic()
    async with asyncio.TaskGroup() as group:
        for index, item in enumerate(items):
            if rate > 0:
                await asyncio.sleep(max(0.0, start + index / rate - time.monotonic()))
            await open_events.acquire()
            task = group.create_task(work(item))
            task.add_done_callback(lambda _: open_events.release())


async def retrying(
    attempt: Callable[[], Awaitable[Answer]],
    backoff: Backoff,
    in_flight: asyncio.Semaphore,
    on_answer: Callable[[Answer, int, float | None], None],
) -> Answer:
    """Attempt until a success or ``backoff.retries`` retries; the last answer.

    ``on_answer`` hears every answer with its attempt number and the pause before the
    next attempt (None: that was the last one).
    """
    number = 0
    while True:
        # Only the attempt holds a slot: an event waiting out its pause does not
        # stop other events from going out.
        async with in_flight:
            answer = await attempt()
        last = answer.ok or number == backoff.retries
        pause = None if last else backoff.pause(number)
        on_answer(answer, number, pause)
        if pause is None:
            return answer
        await asyncio.sleep(pause)
        number += 1


async def post_signed(client: httpx.AsyncClient, url: str, signer: Signer, body: bytes) -> Answer:
    """POST ``body`` with fresh signatures; the status, or the connection error's name."""
    headers = signer.headers(body)
    started = time.perf_counter()
    try:
        response = await client.post(url, content=body, headers=headers)
    except httpx.TransportError as exc:
        return Answer(type(exc).__name__, ok=False, text=str(exc) or type(exc).__name__)
    latency = time.perf_counter() - started
    return Answer(str(response.status_code), response.is_success, response.text, latency)


def http_client(
    trust: ssl.SSLContext | bool, timeout: float, concurrency: int
) -> httpx.AsyncClient:
    """A client as DT's: HTTP/1.1, one connection per request in flight."""
    return httpx.AsyncClient(
        verify=trust,
        timeout=timeout,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        http1=True,
        http2=False,
    )


def generated(event_type: str, count: int) -> Iterator[bytes]:
    """``count`` fresh bodies, made as they are sent; ``all`` cycles through every type."""
    kinds = itertools.cycle(EVENT_TYPES if event_type == ALL_TYPES else (event_type,))
    return (sample_body(kind) for kind in itertools.islice(kinds, count))


def _parse_headers(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[tuple[str, str], ...]:
    parsed = []
    for value in values:
        name, colon, content = value.partition(":")
        name, content = name.strip(), content.strip()
        if not colon or not _TOKEN.match(name) or "\r" in content or "\n" in content:
            raise click.BadParameter(f"{value!r} is not 'Name: value'", ctx, param)
        parsed.append((name, content))
    return tuple(parsed)


def _check_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not re.match(r"^https?://[^/?#]", value):
        raise click.BadParameter(f"{value!r} is not an http(s) URL", ctx, param)
    return value


def _printer(verbose: bool, retries: int) -> Callable[[Answer, int, float | None], None]:
    def show(answer: Answer, attempt: int, pause: float | None) -> None:
        if not verbose:
            return
        note = ""
        if retries:
            retrying = f"; retrying in {pause:.2f} s" if pause is not None else ""
            note = f"  (attempt {attempt + 1} of {retries + 1}{retrying})"
        click.echo(f"{answer.status} {answer.text}{note}")

    return show


F = TypeVar("F", bound=Callable[..., Any])


def backoff_options(command: F) -> F:
    """``--backoff`` and ``--backoff-max``, the pauses of ``Backoff``."""
    first = click.option(
        "--backoff",
        type=click.FloatRange(min=0),
        default=0.5,
        show_default=True,
        help="First pause before a retry, in seconds; it doubles each time, with jitter.",
    )
    cap = click.option(
        "--backoff-max",
        type=click.FloatRange(min=0),
        default=30.0,
        show_default=True,
        help="Longest pause between retries, in seconds.",
    )
    return first(cap(command))


@click.command()
@click.argument("files", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--url",
    default="https://127.0.0.1:8443/events",
    show_default=True,
    callback=_check_url,
    help="Receiver endpoint.",
)
@click.option(
    "--type",
    "event_type",
    type=click.Choice((*EVENT_TYPES, ALL_TYPES)),
    metavar="TYPE",
    default="temperature",
    show_default=True,
    help="DT event type to generate when no FILES are given (touch, temperature, co2, ...); "
    "'all' cycles through all 19.",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Generated events to send when no FILES are given.",
)
@click.option(
    "--secret", envvar="DCON_SEND_SECRET", help="Sign X-Dt-Signature (HS256) with this secret."
)
@click.option(
    "--key",
    "key_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Sign DT-Asymmetric-Signature (ES256) with this EC P-256 private key (PEM).",
)
@click.option("--kid", default="local", show_default=True, help="kid for --key.")
@click.option("--org-id", default="local-org", show_default=True, help="sub for --key.")
@click.option("--issuer", default=DT_ISSUER, show_default=True, help="iss for --key.")
@click.option(
    "--cacert",
    type=click.Path(exists=True, dir_okay=False),
    help="CA bundle to trust for https URLs.",
)
@click.option(
    "-H",
    "--header",
    "headers",
    multiple=True,
    callback=_parse_headers,
    metavar="'NAME: VALUE'",
    help="Extra request header, like a Data Connector's httpConfig.headers (repeatable).",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="Most events started per second; 0 = as fast as --concurrency allows.",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=1000),
    default=1,
    show_default=True,
    help="Requests in flight at once (and HTTP/1.1 connections); DT sends in parallel.",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Retries of an event after a non-2xx answer or a connection error, each signed "
    "afresh (DT retries for 12 h).",
)
@backoff_options
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds an attempt may take; DT counts a slower answer as a failure.",
)
@click.option("-v", "--verbose", is_flag=True, help="Print every answer: status and response body.")
@click.option(
    "-q", "--quiet", is_flag=True, help="Print the summary only: no progress, no answers."
)
def send(
    files: tuple[Path, ...],
    url: str,
    event_type: str,
    count: int,
    secret: str | None,
    key_file: Path | None,
    kid: str,
    org_id: str,
    issuer: str,
    cacert: str | None,
    headers: tuple[tuple[str, str], ...],
    rate: float,
    concurrency: int,
    retries: int,
    backoff: float,
    backoff_max: float,
    timeout: float,
    verbose: bool,
    quiet: bool,
) -> None:
    """POST DT events, signed as DT signs them: FILES byte for byte, or generated ones.

    Ends with a summary (events, attempts, answers by status, duplicates, latency, rate)
    and exits 0 only if every event finally got a 2xx. Answers are printed one per line
    with --verbose, and by default for runs of at most 10 events.
    """
    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet exclude each other")
    bodies = [f.read_bytes() for f in files] if files else generated(event_type, count)
    total = len(files) or count
    verbose = verbose or (not quiet and total <= CHATTY_UP_TO)
    signer = Signer(
        secret,
        key_file.read_bytes() if key_file else None,
        kid=kid,
        issuer=issuer,
        org_id=org_id,
        extra=headers,
    )
    try:
        signer.headers(b"{}")
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise click.BadParameter(
            f"cannot sign with {key_file}: {exc}", param_hint="--key"
        ) from None
    client = http_client(ssl.create_default_context(cafile=cacert), timeout, concurrency)
    printer = _printer(verbose, retries)
    show_progress = not (quiet or verbose) and sys.stderr.isatty()
    with ExitStack() as stack:
        if show_progress:
            bar = stack.enter_context(
                click.progressbar(length=total, label="sending", file=sys.stderr, show_pos=True)
            )

            def show(answer: Answer, attempt: int, pause: float | None) -> None:
                if pause is None:
                    bar.update(1)

            printer = show
        emulator = Emulator(
            client, url, signer, Backoff(retries, backoff, backoff_max), concurrency, printer
        )
        interrupted = _run(emulator, bodies, rate)
    for line in emulator.tally.summary():
        click.echo(line)
    if interrupted:
        click.echo("interrupted", err=True)
    sys.exit(0 if emulator.tally.all_succeeded and not interrupted else 1)


def _run(emulator: Emulator, bodies: Iterable[bytes], rate: float) -> bool:
    """Run to the end; say whether Ctrl-C cut it short (the summary still counts)."""

    async def main() -> None:
        async with emulator.client:
            await emulator.run(bodies, rate)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return True
    return False
