"""`replay`: deliver the events of spool, dead-letter and file-sink files once more.

Every one of those files holds record lines (``ReceivedEvent.record()``), so a line read
back is the event the receiver accepted, DT's body byte for byte. Replay hands each one
either to the configured sinks, through the same ``Delivery`` and sink deadline as the
receiver, or to another receiver's URL, signed afresh. It never stops at a bad line: a
line that is not a record is counted and named by file and line number.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    ExitStack,
    asynccontextmanager,
    contextmanager,
    nullcontext,
)
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import click
from click.core import ParameterSource

from app.cli.send import (
    SAMPLE_CHARS,
    Answer,
    Backoff,
    Signer,
    backoff_options,
    each_open,
    http_client,
    post_signed,
    retrying,
)
from app.delivery import Delivery, Route
from app.errors import ConfigError, DeliveryFailed
from app.metrics import Metrics
from app.received import ReceivedEvent
from app.records import Line, Unreadable, count_lines, read_event, read_lines
from app.settings import Settings, load_settings
from app.sinks import Sink, SinkConfigError, build_sinks

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_UNREADABLE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
LIVE_SPOOL = "spool.jsonl"
DEAD_LETTER = "dead-letter.jsonl"
LISTED = 10  # failures and unreadable lines the text summary names; --json names more
KEPT = 1000
PROGRESS_EVERY = 10.0  # seconds between progress lines when stderr is not a terminal
BAR_EVERY = 0.1  # seconds between redraws of the bar
# A sink's failure, as Delivery logs it, lands in the list of the event being delivered.
_REASONS: ContextVar[list[str] | None] = ContextVar("replay_reasons", default=None)


class Refused(click.ClickException):
    """Nothing was replayed: bad settings, or a sink that cannot connect."""

    exit_code = EXIT_REFUSED


# --- reading ------------------------------------------------------------------------------


def expand(sources: Sequence[Path]) -> list[Path]:
    """Files to read, in order: a directory gives its segments by name, the live spool last.

    A directory's ``dead-letter.jsonl`` is left out (name it to replay it); a file named
    twice is read once.
    """
    files: list[Path] = []
    for source in sources:
        if not source.is_dir():
            files.append(source)
            continue
        found = sorted(
            p
            for p in source.glob("*.jsonl")
            if p.is_file() and p.name not in (LIVE_SPOOL, DEAD_LETTER)
        )
        found += [p for p in (source / LIVE_SPOOL,) if p.is_file()]
        if not found:
            raise click.UsageError(f"{source}: no .jsonl files to replay")
        files += found
    unique: dict[Path, Path] = {}
    for path in files:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


@dataclass(frozen=True, slots=True)
class Filter:
    """Which events to replay; ``skips`` names the reason an event is left out."""

    types: frozenset[str] = frozenset()
    since: datetime | None = None
    until: datetime | None = None
    routes: tuple[Route, ...] = ()
    dead_letter_sink: str | None = None

    def skips(self, event: ReceivedEvent, raw: bytes) -> str | None:
        if self.dead_letter_sink is not None and noted_sink(raw) != self.dead_letter_sink:
            return "not a dead letter of that sink"
        if self.types and event.event_type not in self.types:
            return "other type"
        if self.since is not None and event.received_at < self.since:
            return "before --since"
        if self.until is not None and event.received_at >= self.until:
            return "not before --until"
        if self.routes and not any(route.takes(event) for route in self.routes):
            return "routed to no sink"
        return None


def noted_sink(raw: bytes) -> str | None:
    """The sink a dead-letter line's note names (None for a line without a note)."""
    note = json.loads(raw).get("deadLetter")
    return note.get("sink") if isinstance(note, dict) else None


# --- counting and reporting ---------------------------------------------------------------


@dataclass
class Tally:
    """What the summary reports, updated as lines are read and events answered."""

    files: list[str]
    target: str
    dry_run: bool = False
    lines: int = 0
    events: int = 0
    delivered: int = 0
    duplicates: int = 0
    attempts: int = 0
    failed_by: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[dict[str, str]] = field(default_factory=list)
    unreadable_count: int = 0
    skipped_by: Counter[str] = field(default_factory=Counter)
    failed_to: str | None = None
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)

    @property
    def failed(self) -> int:
        return sum(self.failed_by.values())

    @property
    def done(self) -> int:
        """Lines finished with: unreadable, skipped, counted in a dry run, or answered."""
        answered = self.delivered + self.duplicates + self.failed
        skipped = sum(self.skipped_by.values())
        return self.unreadable_count + skipped + (self.events if self.dry_run else answered)

    def unreadable_line(self, where: str, reason: str) -> None:
        self.unreadable_count += 1
        if len(self.unreadable) < KEPT:
            self.unreadable.append({"where": where, "reason": reason})

    def answered(self, line: Line, event: ReceivedEvent, answer: Answer) -> None:
        if answer.duplicate:
            self.duplicates += 1
        elif answer.ok:
            self.delivered += 1
        else:
            self.failed_by[answer.status] += 1
            if len(self.failures) < KEPT:
                self.failures.append(
                    {"where": line.where, "eventId": event.event_id, "reason": reason(answer)}
                )

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        if self.failed:
            return EXIT_FAILED
        return EXIT_UNREADABLE if self.unreadable_count else EXIT_OK

    def as_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "target": self.target,
            "dryRun": self.dry_run,
            "lines": self.lines,
            "events": self.events,
            "delivered": self.delivered,
            "duplicates": self.duplicates,
            "failed": self.failed,
            "failedBy": dict(self.failed_by),
            "failures": self.failures,
            "unreadable": self.unreadable_count,
            "unreadableLines": self.unreadable,
            "skipped": sum(self.skipped_by.values()),
            "skippedBy": dict(self.skipped_by),
            "attempts": self.attempts,
            "failedTo": self.failed_to if self.failed else None,
            "elapsedSeconds": round(time.monotonic() - self.started, 3),
            "interrupted": self.interrupted,
            "exitCode": self.exit_code,
        }

    def summary(self) -> list[str]:
        elapsed = time.monotonic() - self.started
        lines = [
            f"files:       {len(self.files)}",
            f"lines read:  {self.lines}",
            f"events:      {self.events}",
        ]
        if self.dry_run:
            lines.append(f"dry run:     nothing sent; {self.events} would go to {self.target}")
        else:
            lines += [
                f"delivered:   {self.delivered} to {self.target}",
                f"duplicates:  {self.duplicates}",
                f"failed:      {self.failed}{_by(self.failed_by)}",
            ]
            lines += [
                f"  {f['where']} {f['eventId']}: {f['reason']}" for f in self.failures[:LISTED]
            ]
            lines += _more(self.failed, LISTED)
        lines.append(f"unreadable:  {self.unreadable_count}")
        lines += [f"  {u['where']}: {u['reason']}" for u in self.unreadable[:LISTED]]
        lines += _more(self.unreadable_count, LISTED)
        lines.append(f"skipped:     {sum(self.skipped_by.values())}{_by(self.skipped_by)}")
        if not self.dry_run:
            lines.append(f"attempts:    {self.attempts}")
        if self.failed and self.failed_to:
            lines.append(f"failed to:   {self.failed_to} (replay it to retry just those)")
        rate = self.events / elapsed if elapsed > 0 else 0.0
        lines.append(f"elapsed:     {elapsed:.2f} s ({rate:.1f} events/s)")
        return lines


def reason(answer: Answer) -> str:
    return f"{answer.status} {answer.text[:SAMPLE_CHARS]}".strip()


def _by(counts: Counter[str]) -> str:
    parts = ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))
    return f" ({parts})" if parts else ""


def _more(count: int, shown: int) -> list[str]:
    return [f"  ... and {count - shown} more (--json lists up to {KEPT})"] if count > shown else []


class Progress:
    """A bar on a terminal; otherwise a plain line every ``PROGRESS_EVERY`` seconds."""

    def __init__(self, tally: Tally, stack: ExitStack, *, bar_length: int | None) -> None:
        self.tally = tally
        self.shown = 0
        self.bar = None
        self.next_line = time.monotonic() + (PROGRESS_EVERY if bar_length is None else 0)
        if bar_length is not None:
            self.bar = stack.enter_context(
                click.progressbar(
                    length=bar_length, label="replaying", file=sys.stderr, show_pos=True
                )
            )
            stack.callback(self._draw)  # the last count, before the bar closes

    def update(self) -> None:
        now = time.monotonic()
        if now < self.next_line:
            return
        if self.bar is not None:
            self.next_line = now + BAR_EVERY
            self._draw()
            return
        self.next_line = now + PROGRESS_EVERY
        t = self.tally
        click.echo(
            f"replay: {t.done} lines done, {t.delivered} delivered, {t.duplicates} duplicates,"
            f" {t.failed} failed, {t.unreadable_count} unreadable",
            err=True,
        )

    def _draw(self) -> None:
        if self.bar is not None:
            done = self.tally.done
            self.bar.update(done - self.shown)
            self.shown = done


class Quiet:
    def update(self) -> None:
        pass


class FailedFile:
    """Failed events as dead-letter lines: the record, with a ``deadLetter`` note first.

    The note's sink is the URL of --to, or the sinks that failed (as in the spool's dead
    letters, so that --dead-letter-sink picks them). Appended to (never truncated), and
    created only when the first event fails.
    """

    def __init__(self, path: Path, url: str | None) -> None:
        self.path = path
        self.url = url
        self._file: IO[bytes] | None = None

    def write(self, event: ReceivedEvent, answer: Answer) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
        at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        sink = self.url or answer.status
        note = {"sink": sink, "reason": reason(answer), "at": at}
        head = json.dumps({"deadLetter": note}, separators=(",", ":"), ensure_ascii=False)
        # Failures are few; a short local write between events is not worth a thread.
        self._file.write(head[:-1].encode() + b"," + event.record()[1:] + b"\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# --- replaying ----------------------------------------------------------------------------

Attempt = Callable[[ReceivedEvent], Awaitable[Answer]]


@dataclass
class Replay:
    """Reads lines, skips what the filter leaves out, delivers the rest with retries."""

    attempt: Attempt | None  # None: a dry run
    backoff: Backoff
    concurrency: int
    keep: Filter
    tally: Tally
    progress: Progress | Quiet
    failed_file: FailedFile | None = None

    async def run(self, lines: Iterable[Line], within: AbstractAsyncContextManager[Any]) -> None:
        """Replay ``lines`` inside ``within`` (an open client, connected sinks)."""
        in_flight = asyncio.Semaphore(self.concurrency)
        async with within:
            await each_open(self._events(lines), lambda item: self._deliver(item, in_flight))

    def _events(self, lines: Iterable[Line]) -> Iterator[tuple[Line, ReceivedEvent]]:
        for line in lines:
            self.tally.lines += 1
            try:
                event = read_event(line.raw)
            except Unreadable as exc:
                self.tally.unreadable_line(line.where, str(exc))
            else:
                skip = self.keep.skips(event, line.raw)
                if skip is not None:
                    self.tally.skipped_by[skip] += 1
                else:
                    self.tally.events += 1
                    if self.attempt is not None:
                        yield line, event
            self.progress.update()

    async def _deliver(
        self, item: tuple[Line, ReceivedEvent], in_flight: asyncio.Semaphore
    ) -> None:
        line, event = item
        assert self.attempt is not None  # noqa: S101 - _events yields nothing in a dry run
        attempt = self.attempt

        def answered(answer: Answer, number: int, pause: float | None) -> None:
            self.tally.attempts += 1

        answer = await retrying(lambda: attempt(event), self.backoff, in_flight, answered)
        self.tally.answered(line, event, answer)
        if not answer.ok and self.failed_file is not None:
            self.failed_file.write(event, answer)
        self.progress.update()


def to_url(client: Any, url: str, signer: Signer) -> Attempt:
    async def post(event: ReceivedEvent) -> Answer:
        return await post_signed(client, url, signer, event.body)

    return post


def to_sinks(delivery: Delivery) -> Attempt:
    async def store(event: ReceivedEvent) -> Answer:
        reasons: list[str] = []
        token = _REASONS.set(reasons)
        try:
            await delivery.deliver(event)
        except DeliveryFailed as exc:
            return Answer("+".join(exc.sinks), ok=False, text="; ".join(reasons) or exc.detail)
        finally:
            _REASONS.reset(token)
        return Answer("stored", ok=True, text="")

    return store


class _Reasons(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        reasons = _REASONS.get()
        if reasons is not None and record.levelno >= logging.ERROR:
            reasons.append(record.getMessage())


@contextmanager
def sink_reasons() -> Iterator[None]:
    """Delivery's log lines about failing sinks become the failures' reasons, and stay off
    stderr, where the progress bar is."""
    logger = logging.getLogger("dcon.delivery")
    handler, propagate = _Reasons(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


@asynccontextmanager
async def connected(sinks: Sequence[Sink]) -> AsyncIterator[None]:
    """Sinks connected for the replay (or ``Refused``), closed after it."""
    opened: list[Sink] = []
    try:
        for sink in sinks:
            try:
                await sink.connect()
            except Exception as exc:
                raise Refused(f"sink {sink.name} cannot connect: {exc}") from None
            opened.append(sink)
        with sink_reasons():
            yield
    finally:
        for sink in reversed(opened):
            await sink.close()


def run_until_interrupted(work: Awaitable[None], tally: Tally) -> None:
    """Run to the end; Ctrl-C stops it, and the summary still counts what was done."""

    async def main() -> None:
        await work

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        tally.interrupted = True


# --- the command --------------------------------------------------------------------------


def _check_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.startswith(("https://", "http://")):
        raise click.BadParameter(f"{value!r} is not an http(s) URL", ctx, param)
    return value


def _moment(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time", ctx, param) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _types(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> frozenset[str]:
    return frozenset(t.strip() for value in values for t in value.split(",") if t.strip())


EPILOG = """\b
Exit codes:
  0    every event was delivered or was already there (duplicate)
  1    some events failed after their retries (see --failed-to)
  2    nothing replayed: usage, settings, or a sink that cannot connect
  3    no event failed, but some lines were unreadable (named by file:line)
  130  interrupted (Ctrl-C); the summary counts what was done
"""


@click.command(epilog=EPILOG)
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--to",
    "url",
    callback=_check_url,
    metavar="URL",
    help="POST each body to this receiver instead of the configured sinks.",
)
@click.option(
    "--secret",
    envvar="DCON_REPLAY_SECRET",
    help="With --to: sign X-Dt-Signature (HS256) afresh over the exact body with this secret.",
)
@click.option(
    "--cacert",
    type=click.Path(exists=True, dir_okay=False),
    help="With --to: CA bundle to trust for an https URL.",
)
@click.option("--insecure", is_flag=True, help="With --to: do not check the TLS certificate.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="With --to: seconds one POST may take.",
)
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML settings file for the sinks (same as DCON_CONFIG).",
)
@click.option(
    "--sinks",
    metavar="LIST",
    help="Override DCON_SINKS for this replay, e.g. 'redis' or 'file,postgres:co2'.",
)
@click.option(
    "--type",
    "--event-type",
    "event_types",
    multiple=True,
    callback=_types,
    metavar="TYPE",
    help="Replay only events of this type (repeatable, or comma-separated).",
)
@click.option(
    "--since",
    callback=_moment,
    metavar="TIME",
    help="Replay only events received at or after TIME (ISO 8601; UTC if no offset).",
)
@click.option(
    "--until",
    callback=_moment,
    metavar="TIME",
    help="Replay only events received before TIME (ISO 8601; UTC if no offset).",
)
@click.option(
    "--dead-letter-sink",
    metavar="NAME",
    help="Replay only dead-letter lines whose note names this sink (pair with --sinks NAME "
    "to give each sink back just what it missed).",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1, max=1000),
    default=8,
    show_default=True,
    help="Events delivered at once; 1 keeps the order of the files (but for events waiting "
    "to be retried).",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Retries of an event that failed (non-2xx, connection error, sink failure).",
)
@backoff_options
@click.option(
    "--failed-to",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append failed events to this file as dead-letter lines (replayable).",
)
@click.option("--dry-run", is_flag=True, help="Read, filter and count only; send nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def replay(
    sources: tuple[Path, ...],
    url: str | None,
    secret: str | None,
    cacert: str | None,
    insecure: bool,
    timeout: float,
    config: Path | None,
    sinks: str | None,
    event_types: frozenset[str],
    since: datetime | None,
    until: datetime | None,
    dead_letter_sink: str | None,
    concurrency: int,
    retries: int,
    backoff: float,
    backoff_max: float,
    failed_to: Path | None,
    dry_run: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Deliver the events in spool, dead-letter or file-sink files (SOURCES) again.

    SOURCES are files of record lines, or spool directories: a directory gives its
    *.jsonl segments in name order with the live spool.jsonl last; its dead-letter.jsonl
    only when named. Each event goes, with its body byte for byte, to the sinks configured
    as for `serve` (DCON_* variables, DCON_CONFIG or --config, within DCON_SINK_TIMEOUT),
    or with --to to another receiver, signed afresh with --secret.

    Replay does not deduplicate: the receiver's dedup window is not consulted. A receiver
    behind --to answers an eventId it holds as a duplicate. Of the sinks, nats
    (Nats-Msg-Id) and postgres (unique eventId) store a repeat once; file, log, redis,
    rabbitmq and mqtt store it again. The log sink's lines go to stdout, before the
    summary.

    A line that is not a record (torn, corrupt, a dead letter of an unreadable line) is
    counted and named by file:line; the rest go on. Progress goes to stderr (a bar on a
    terminal, a line every 10 s otherwise); the summary to stdout.
    """
    ctx = click.get_current_context()
    secret_given = ctx.get_parameter_source("secret") is ParameterSource.COMMANDLINE
    if url is None and (secret_given or cacert or insecure):
        raise click.UsageError("--secret, --cacert and --insecure go with --to")
    if url is not None and (config or sinks):
        raise click.UsageError("--config and --sinks choose sinks; --to sends elsewhere")
    files = expand(sources)
    if failed_to is not None and any(f.resolve() == failed_to.resolve() for f in files):
        raise click.UsageError(f"--failed-to {failed_to} is also being read")
    keep = Filter(event_types, since, until, dead_letter_sink=dead_letter_sink)
    within: AbstractAsyncContextManager[Any] = nullcontext()
    if url is not None:
        target = url
        client = http_client(
            False if insecure else ssl.create_default_context(cafile=cacert), timeout, concurrency
        )
        attempt = to_url(client, url, Signer(secret))
        if not dry_run:
            within = client
    else:
        settings, built = _sinks(config, sinks)
        routes = [Route(s, t) for s, (_, t) in zip(built, settings.sink_routes, strict=True)]
        target = "sinks " + ", ".join(sink.name for sink in built)
        keep = replace(keep, routes=tuple(routes))
        metrics = Metrics()
        attempt = to_sinks(Delivery(routes, settings.sink_timeout, settings.retry_after, metrics))
        if not dry_run:
            within = connected(built)
    tally = Tally([str(f) for f in files], target, dry_run=dry_run)
    with ExitStack() as stack:
        bar = None if quiet or not sys.stderr.isatty() else count_lines(files)
        progress = Quiet() if quiet else Progress(tally, stack, bar_length=bar)
        failed_file = None
        if failed_to is not None:
            failed_file = FailedFile(failed_to, url)
            stack.callback(failed_file.close)
            tally.failed_to = str(failed_to)
        job = Replay(
            None if dry_run else attempt,
            Backoff(retries, backoff, backoff_max),
            concurrency,
            keep,
            tally,
            progress,
            failed_file,
        )
        lines = read_lines(files, tally.unreadable_line)
        run_until_interrupted(job.run(lines, within), tally)
    _report(tally, as_json)


def _sinks(config: Path | None, sinks: str | None) -> tuple[Settings, list[Sink]]:
    """The sinks of the settings, built without I/O, or ``Refused``."""
    if config is not None:
        os.environ["DCON_CONFIG"] = str(config)
    try:
        settings = load_settings(**({"sinks": sinks} if sinks else {}))
        built = build_sinks(settings)
    except (ConfigError, SinkConfigError) as exc:
        raise Refused(str(exc)) from None
    if any(sink.name == "queue" for sink in built):
        raise Refused(
            "the queue sink lives inside one process: replayed events would vanish with "
            "this one; choose other sinks with --sinks"
        )
    return settings, built


def _report(tally: Tally, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(tally.as_json(), ensure_ascii=False))
    else:
        for line in tally.summary():
            click.echo(line)
    if tally.interrupted:
        click.echo("interrupted", err=True)
    sys.exit(tally.exit_code)
