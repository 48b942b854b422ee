"""``postgres``: one row per event in a PostgreSQL table, committed before ``send`` returns.

The table is created on first use, and columns added by later versions are added to an
older table (``ADD COLUMN``), under an advisory lock so that replicas starting together do
not race. Rows are keyed by eventId and inserted with ``ON CONFLICT DO NOTHING``, so a
repeated event is stored once, whichever replica took it.

Concurrent ``send`` calls are group-committed: one writer task takes every pending row and
inserts the whole batch in one transaction, then wakes each caller once it has committed.
The writer retries a batch once at once when its connection turns out to be dead (after an
outage), which is safe because the insert is idempotent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

# asyncpg ships no type hints (no py.typed, no stubs package).
import asyncpg  # type: ignore[import-untyped]

from app.sinks.base import SinkConfigError, SinkError, settle

if TYPE_CHECKING:
    from app.received import ReceivedEvent
    from app.settings import Settings

log = logging.getLogger(__name__)

NAME = "postgres"
# One connection for the writer's batch in flight, one so that a ping never waits on it.
POOL_SIZE = 2
MAX_BATCH = 500
CONNECT_TIMEOUT = 3.0
# A backstop: the receiver's deadline (DCON_SINK_TIMEOUT, at most 9 s) has given up by
# then, but a hung server must not hold the writer for ever.
COMMAND_TIMEOUT = 10.0
PING_TIMEOUT = 3.0
CLOSE_TIMEOUT = 5.0

# (name, type) in insert order. A column added in a later version goes at the end: it is
# created with the table and added to older tables by ``ADD COLUMN IF NOT EXISTS``.
KEY = ("event_id", "text PRIMARY KEY")
COLUMNS: tuple[tuple[str, str], ...] = (
    ("event_type", "text"),
    ("project_id", "text"),
    ("device_id", "text"),
    ("event_time", "timestamptz"),  # the event's own timestamp; NULL if unparsable
    ("received_at", "timestamptz"),
    ("verified", "boolean"),
    ("verification", "text"),
    ("outcome", "text"),
    ("error", "text"),
    ("body", "jsonb"),  # queryable; NULL if jsonb cannot hold it (e.g. a \u0000)
    ("raw", "bytea"),  # DT's body byte for byte
)
NAMES = (KEY[0], *(name for name, _ in COLUMNS))
BODY = NAMES.index("body")
TEXT_COLUMNS = tuple(NAMES.index(n) for n in ("event_id", "event_type", "project_id", "device_id"))

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1


T = TypeVar("T")
Row = tuple[Any, ...]
Pending = tuple[Row, asyncio.Future[None]]


class Table:
    """A validated, optionally schema-qualified table name, and the SQL that uses it.

    Names follow SQL's rule for unquoted identifiers (folded to lower case), then are
    quoted everywhere, so ``DCON_POSTGRES_TABLE=Events`` is the table ``events``.
    """

    def __init__(self, text: str) -> None:
        parts = text.split(".")
        bad = [p for p in parts if not _IDENTIFIER.fullmatch(p) or len(p) > _MAX_IDENTIFIER]
        if len(parts) > 2 or bad:
            raise SinkConfigError(
                f"DCON_POSTGRES_TABLE: {text!r} is not a table name; use letters, digits "
                f"and _ (at most {_MAX_IDENTIFIER}), optionally as schema.table"
            )
        self.parts = [p.lower() for p in parts]
        self.name = self.parts[-1]
        self.sql = ".".join(f'"{p}"' for p in self.parts)
        # An index lives in its table's schema; its own name cannot be qualified.
        suffix = "_device_time_idx"
        self.index = f'"{self.name[: _MAX_IDENTIFIER - len(suffix)]}{suffix}"'

    def create(self) -> list[str]:
        columns = ", ".join(f'"{n}" {t}' for n, t in (KEY, *COLUMNS))
        return [
            f"CREATE TABLE IF NOT EXISTS {self.sql} ({columns})",
            f"CREATE INDEX IF NOT EXISTS {self.index} "
            f"ON {self.sql} (project_id, device_id, event_time DESC)",
        ]

    def add_column(self, name: str) -> str:
        return f'ALTER TABLE {self.sql} ADD COLUMN IF NOT EXISTS "{name}" {dict(COLUMNS)[name]}'

    def insert(self) -> str:
        values = ", ".join(f"${i}" for i in range(1, len(NAMES) + 1))
        # Only validated, quoted identifiers are spliced in; every value is a parameter.
        return (
            f"INSERT INTO {self.sql} ({', '.join(NAMES)}) VALUES ({values}) "  # noqa: S608
            "ON CONFLICT (event_id) DO NOTHING"
        )


class PostgresSink:
    """Insert each event as one row; ``send`` returns once the row's transaction committed.

    An instance is connected once and closed once.
    """

    name = NAME

    def __init__(self, dsn: str, table: str) -> None:
        if urlsplit(dsn).scheme not in ("postgresql", "postgres"):
            raise SinkConfigError(
                "DCON_POSTGRES_DSN: expected postgresql://user@host:port/database "
                f"(got scheme {urlsplit(dsn).scheme!r})"
            )
        self.dsn = dsn
        self.table = Table(table)
        self.transactions = 0  # batches committed, each one transaction
        self._insert_sql = self.table.insert()
        self._pool: Any = None  # asyncpg.Pool
        self._pending: deque[Pending] = deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    def from_settings(cls, settings: Settings) -> PostgresSink:
        return cls(settings.postgres_dsn, settings.postgres_table)

    async def connect(self) -> None:
        """Open a small pool, create or migrate the table, and start the writer."""
        if self._closing:
            raise SinkError(NAME, "sink is closed")
        if self._writer is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=POOL_SIZE,
                timeout=CONNECT_TIMEOUT,
                command_timeout=COMMAND_TIMEOUT,
            )
        except Exception as exc:
            raise SinkError(NAME, f"cannot connect: {_describe(exc)}") from exc
        try:
            async with pool.acquire() as conn:
                await self._prepare_table(conn)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, SinkError) or not isinstance(exc, Exception):
                raise
            raise SinkError(NAME, f"cannot prepare {self.table.sql}: {_describe(exc)}") from exc
        self._pool = pool
        self._writer = asyncio.create_task(
            self._write_batches(), name=f"postgres-sink {self.table.sql}"
        )

    async def send(self, event: ReceivedEvent) -> None:
        """Return once the event's row is committed (or was already there)."""
        if self._writer is None or self._writer.done() or self._closing:
            raise SinkError(NAME, "closed" if self._closing else "not connected")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row(event), done))
        self._wake.set()
        await done

    async def ping(self) -> None:
        pool = self._pool
        if pool is None:
            raise SinkError(NAME, "not connected")
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                await self._on_connection(lambda conn: conn.fetchval("SELECT 1"))
        except TimeoutError:
            raise SinkError(NAME, f"no answer within {PING_TIMEOUT:g} s") from None
        except Exception as exc:
            raise SinkError(NAME, f"unreachable: {_describe(exc)}") from exc

    async def close(self) -> None:
        """Commit every row already sent, stop the writer and close the pool."""
        self._closing = True
        writer, self._writer = self._writer, None
        if writer is not None:
            self._wake.set()
            # wait() rather than await: a cancelled close must not cancel a batch mid-commit.
            await asyncio.wait([writer])
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
            except Exception:
                pool.terminate()

    # --- the table ------------------------------------------------------------------------

    async def _prepare_table(self, conn: Any) -> None:
        table = self.table
        async with conn.transaction():
            # Replicas starting together would race on CREATE TABLE IF NOT EXISTS.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", table.sql)
            if await conn.fetchval("SELECT to_regclass($1)", table.sql) is None:
                for statement in table.create():
                    await conn.execute(statement)
                log.info("created table %s", table.sql)
                return
            present = {
                r["attname"]
                for r in await conn.fetch(
                    "SELECT attname FROM pg_attribute "
                    "WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped",
                    table.sql,
                )
            }
            if KEY[0] not in present:
                raise SinkError(NAME, f"{table.sql} exists but has no event_id column")
            # Only missing columns: ALTER TABLE takes an exclusive lock even when a no-op.
            for name in NAMES:
                if name not in present:
                    await conn.execute(table.add_column(name))
                    log.info("added column %s to %s", name, table.sql)

    # --- the writer -----------------------------------------------------------------------

    async def _write_batches(self) -> None:
        try:
            while self._pending or not self._closing:
                if not self._pending:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await self._commit(self._take_batch())
        finally:
            _settle(list(self._pending), "the writer stopped")
            self._pending.clear()

    def _take_batch(self) -> list[Pending]:
        batch: list[Pending] = []
        while self._pending and len(batch) < MAX_BATCH:
            item = self._pending.popleft()
            if not item[1].done():  # a caller cancelled before its turn gave up on its row
                batch.append(item)
        return batch

    async def _commit(self, batch: list[Pending]) -> None:
        if not batch:
            return
        try:
            errors = await self._insert([r for r, _ in batch])
        except Exception as exc:
            _settle(batch, f"insert into {self.table.sql} failed: {_describe(exc)}")
            return
        except BaseException:
            # Cancelled mid-batch: the rows may or may not be committed, so no success.
            _settle(batch, "the insert was interrupted")
            raise
        for item, error in zip(batch, errors, strict=True):
            # Refused even with its body left out: it would be refused every time.
            _settle([item], error, refused=True)

    async def _insert(self, rows: list[Row]) -> list[str | None]:
        async def insert(conn: Any) -> list[str | None]:
            try:
                async with conn.transaction():
                    await conn.executemany(self._insert_sql, rows)
            except asyncpg.DataError:
                return await self._insert_one_by_one(conn, rows)
            self.transactions += 1
            return [None] * len(rows)

        return await self._on_connection(insert)

    async def _on_connection(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """Run ``work`` on a pooled connection; once more on a fresh one if that connection
        turns out to be dead.

        A connection the server dropped while idle (an outage, a restart, a killed
        backend) is only found out on use, and asyncpg then raises one of several errors;
        what they share is that the connection is closed. The pool replaces a closed
        connection on release, and every use here is idempotent, so one retry is safe.
        """
        for attempt in (1, 2):
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT) as conn:
                try:
                    return await work(conn)
                except Exception as exc:
                    if attempt == 2 or not _dropped(conn):
                        raise
                    log.info("postgres connection was dropped (%s); retrying", _describe(exc))
        raise AssertionError("unreachable")

    async def _insert_one_by_one(self, conn: Any, rows: list[Row]) -> list[str | None]:
        """Some value PostgreSQL refuses (jsonb and text cannot hold \\u0000, nor jsonb a
        lone surrogate): store such a row with those values made safe and ``body`` NULL
        (``raw`` keeps the exact bytes), rather than refusing it for DT to retry forever."""
        errors: list[str | None] = []
        async with conn.transaction():
            for r in rows:
                errors.append(None)
                try:
                    async with conn.transaction():
                        await conn.execute(self._insert_sql, *r)
                    continue
                except asyncpg.DataError as exc:
                    log.warning("event %r: %s; storing it with body NULL", r[0], exc)
                try:
                    async with conn.transaction():
                        await conn.execute(self._insert_sql, *_made_safe(r))
                except asyncpg.DataError as exc:
                    errors[-1] = f"PostgreSQL refused event {r[0]!r}: {exc}"
        self.transactions += 1
        return errors


def row(event: ReceivedEvent) -> Row:
    """The event's values in ``NAMES`` order."""
    parsed = event.parsed
    return (
        event.event_id or surrogate_id(event.body),
        parsed.event_type,
        parsed.project_id,
        parsed.device_id,
        event_time(event),
        event.received_at,
        event.verified,
        event.verification.label,
        parsed.outcome.value,
        parsed.error,
        _json_text(event.body),
        event.body,
    )


def _json_text(body: bytes) -> str | None:
    # The receiver only passes UTF-8 JSON on; this guards the row against anything else.
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def surrogate_id(body: bytes) -> str:
    """The key of an event without an eventId: the same body always gets the same one, so
    DT's retries of it are still stored once."""
    return "sha256:" + hashlib.sha256(body).hexdigest()


def event_time(event: ReceivedEvent) -> datetime | None:
    """``event.timestamp`` as an aware datetime, or None if missing or unparsable."""
    envelope = event.parsed.envelope
    if envelope is not None:
        return envelope.event.timestamp
    # A body that did not fit the models may still carry a usable timestamp.
    try:
        value = json.loads(event.body)["event"]["timestamp"]
        moment = datetime.fromisoformat(value)
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    return moment if moment.tzinfo is not None else None


def _made_safe(r: Row) -> Row:
    values = list(r)
    for i in TEXT_COLUMNS:
        if isinstance(values[i], str):
            values[i] = values[i].replace("\x00", "\ufffd")
    values[BODY] = None
    return tuple(values)


def _dropped(conn: Any) -> bool:
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True  # the pool has already taken a closed connection back


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _settle(batch: list[Pending], error: str | None, *, refused: bool = False) -> None:
    settle((done for _, done in batch), NAME, error, refused=refused)
