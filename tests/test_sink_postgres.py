"""The postgres sink against the real PostgreSQL on loopback: table, migration, typed
columns, ON CONFLICT, group commit, reconnects."""

# The SQL built with f-strings here only splices in the test's own namespace, a fixed
# identifier of letters and digits; every value is a parameter.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any, ClassVar

# asyncpg ships no type hints (no py.typed, no stubs package).
import asyncpg  # type: ignore[import-untyped]
import pytest

from app.events import parse_body
from app.received import ReceivedEvent
from app.samples import sample_body
from app.settings import Settings
from app.signature import SchemePass, Verification
from app.sinks import PermanentSinkError, SinkConfigError, SinkError, build_sinks
from app.sinks.postgres import COLUMNS, KEY, PostgresSink, surrogate_id
from tests.sink_contract import SinkContract, event_id, received

HOST, PORT = "127.0.0.1", 5432
DSN = f"postgresql://postgres@{HOST}:{PORT}/test"
RECEIVED_AT = datetime(2026, 11, 26, 1, 2, 3, 123456, tzinfo=UTC)
SIGNED = Verification((SchemePass("secret", "secret #1"),))

pytestmark = pytest.mark.anyio

EXPECTED_COLUMNS = [
    ("event_id", "text"),
    ("event_type", "text"),
    ("project_id", "text"),
    ("device_id", "text"),
    ("event_time", "timestamp with time zone"),
    ("received_at", "timestamp with time zone"),
    ("verified", "boolean"),
    ("verification", "text"),
    ("outcome", "text"),
    ("error", "text"),
    ("body", "jsonb"),
    ("raw", "bytea"),
]


def dsn(host: str = HOST, port: int = PORT, app: str | None = None) -> str:
    url = f"postgresql://postgres@{host}:{port}/test"
    return f"{url}?application_name={app}" if app else url


@pytest.fixture
async def db() -> AsyncIterator[Any]:
    conn = await asyncpg.connect(DSN)
    yield conn
    await conn.close()


async def columns(db: Any, table: str, schema: str = "public") -> list[tuple[str, str]]:
    rows = await db.fetch(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
        schema,
        table,
    )
    return [(r["column_name"], r["data_type"]) for r in rows]


def body_with(event_id: str | None = None, **event: Any) -> bytes:
    """A DT-shaped body with the given ``event`` fields replaced (None removes one)."""
    doc = json.loads(sample_body("temperature", project_id="proj1", device_id="dev1"))
    doc["event"].update(event)
    if event_id is not None:
        doc["event"]["eventId"] = event_id
    doc["event"] = {k: v for k, v in doc["event"].items() if v is not None}
    return json.dumps(doc, separators=(",", ":")).encode()


class TestPostgresSink(SinkContract):
    target: ClassVar[tuple[str, int]] = (HOST, PORT)
    dedups: ClassVar[bool] = True  # ON CONFLICT (event_id) DO NOTHING

    def make_sink(self, host: str, port: int, namespace: str) -> PostgresSink:
        return PostgresSink(dsn(host, port), namespace)

    async def read_back(self, namespace: str, expected: int) -> list[tuple[str, bytes]]:
        # A committed row is visible at once; there is nothing to wait for.
        conn = await asyncpg.connect(DSN)
        try:
            rows = await conn.fetch(f'SELECT event_id, raw FROM "{namespace}"')
        finally:
            await conn.close()
        return [(r["event_id"], bytes(r["raw"])) for r in rows]

    @pytest.fixture(autouse=True)
    async def _drop_tables(self, namespace: str, db: Any) -> AsyncIterator[None]:
        """Every table or schema a test makes starts with its namespace; drop them after."""
        yield
        for (schema,) in await db.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", namespace + "%"
        ):
            await db.execute(f'DROP SCHEMA "{schema}" CASCADE')
        for (table,) in await db.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename LIKE $1",
            namespace + "%",
        ):
            await db.execute(f'DROP TABLE "{table}"')

    @pytest.fixture
    async def connected(self, namespace: str) -> AsyncIterator[PostgresSink]:
        sink = PostgresSink(dsn(app=namespace), namespace)
        await sink.connect()
        yield sink
        await sink.close()

    async def test_table_is_created_with_the_documented_columns_and_index(
        self, connected: PostgresSink, namespace: str, db: Any
    ) -> None:
        assert await columns(db, namespace) == EXPECTED_COLUMNS
        assert [KEY[0], *(n for n, _ in COLUMNS)] == [n for n, _ in EXPECTED_COLUMNS]
        key = await db.fetchval(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = $1::regclass AND contype = 'p'",
            namespace,
        )
        assert key == "PRIMARY KEY (event_id)"
        indexes = await db.fetch("SELECT indexdef FROM pg_indexes WHERE tablename = $1", namespace)
        assert any("(project_id, device_id, event_time DESC)" in r["indexdef"] for r in indexes), (
            indexes
        )

    async def test_migration_adds_missing_columns_to_an_older_table(
        self, namespace: str, db: Any
    ) -> None:
        await db.execute(
            f'CREATE TABLE "{namespace}" (event_id text PRIMARY KEY, event_type text, body jsonb)'
        )
        await db.execute(
            f"INSERT INTO \"{namespace}\" VALUES ('old1', 'touch', '{{\"a\": 1}}')",
        )
        sink = PostgresSink(DSN, namespace)
        await sink.connect()
        body = body_with(event_id="new1")
        await sink.send(ReceivedEvent(body, parse_body(body), SIGNED, RECEIVED_AT))
        await sink.close()
        # Added columns come after the old ones; the set is what matters.
        assert sorted(await columns(db, namespace)) == sorted(EXPECTED_COLUMNS)
        rows = await db.fetch(f'SELECT event_id, raw FROM "{namespace}" ORDER BY event_id')
        assert [(r["event_id"], r["raw"]) for r in rows] == [("new1", body), ("old1", None)]
        # A second start finds nothing to add.
        again = PostgresSink(DSN, namespace)
        await again.connect()
        await again.close()
        assert sorted(await columns(db, namespace)) == sorted(EXPECTED_COLUMNS)

    async def test_a_table_without_event_id_is_refused_at_connect(
        self, namespace: str, db: Any
    ) -> None:
        await db.execute(f'CREATE TABLE "{namespace}" (id serial PRIMARY KEY)')
        with pytest.raises(SinkError, match="no event_id column"):
            await PostgresSink(DSN, namespace).connect()

    async def test_typed_columns_are_filled_from_the_event(
        self, connected: PostgresSink, namespace: str, db: Any
    ) -> None:
        body = body_with(event_id="typed1", timestamp="2026-01-02T03:04:05.678901Z")
        await connected.send(ReceivedEvent(body, parse_body(body), SIGNED, RECEIVED_AT))
        r = await db.fetchrow(f'SELECT * FROM "{namespace}"')
        assert dict(r) == {
            "event_id": "typed1",
            "event_type": "temperature",
            "project_id": "proj1",
            "device_id": "dev1",
            "event_time": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
            "received_at": RECEIVED_AT,
            "verified": True,
            "verification": "secret",
            "outcome": "typed",
            "error": None,
            "body": r["body"],
            "raw": body,
        }
        assert json.loads(r["body"]) == json.loads(body)

    async def test_an_invalid_body_keeps_a_parsable_timestamp_and_its_error(
        self, connected: PostgresSink, namespace: str, db: Any
    ) -> None:
        body = body_with(event_id="bad1", data="not an object", timestamp="2026-01-02T03:04:05Z")
        event = received(body)
        assert event.parsed.outcome.value == "invalid"
        await connected.send(event)
        r = await db.fetchrow(f'SELECT * FROM "{namespace}"')
        assert r["event_time"] == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        assert (r["outcome"], r["error"]) == ("invalid", event.parsed.error)
        assert r["raw"] == body

    async def test_an_event_without_event_id_gets_a_stable_surrogate_key(
        self, connected: PostgresSink, namespace: str, db: Any
    ) -> None:
        """Refusing it would make DT retry for 12 h; its body's hash keys it, so twice is once."""
        body = body_with(eventId=None, timestamp="yesterday")
        await connected.send(received(body))
        await connected.send(received(body))
        rows = await db.fetch(f'SELECT event_id, event_time, raw FROM "{namespace}"')
        assert [tuple(r) for r in rows] == [(surrogate_id(body), None, body)]
        assert surrogate_id(body).startswith("sha256:")

    async def test_on_conflict_keeps_the_first_row(
        self, connected: PostgresSink, namespace: str, db: Any
    ) -> None:
        body = body_with(event_id="dup1")
        first = ReceivedEvent(body, parse_body(body), SIGNED, RECEIVED_AT)
        later = received(body)  # unverified, received now
        await connected.send(first)
        await asyncio.gather(*(connected.send(later) for _ in range(5)))
        await connected.send(later)
        rows = await db.fetch(f'SELECT received_at, verified FROM "{namespace}"')
        assert [tuple(r) for r in rows] == [(RECEIVED_AT, True)]

    async def test_concurrent_sends_share_far_fewer_transactions(
        self, connected: PostgresSink, namespace: str, db: Any
    ) -> None:
        bodies = [sample_body("touch") for _ in range(100)]
        await asyncio.gather(*(connected.send(received(b)) for b in bodies))
        rows = await db.fetch(f'SELECT event_id, xmin::text AS tx FROM "{namespace}"')
        assert sorted(r["event_id"] for r in rows) == sorted(event_id(b) for b in bodies)
        # Rows written by one transaction share its id (xmin): PostgreSQL's own count.
        transactions = len({r["tx"] for r in rows})
        assert transactions == connected.transactions <= 10

    async def test_a_body_jsonb_cannot_hold_is_kept_raw_with_body_null(
        self, connected: PostgresSink, namespace: str, db: Any
    ) -> None:
        """jsonb refuses \\u0000; the row is still stored, with the exact bytes in raw."""
        odd = body_with(event_id="nul1").replace(b'"labels":{', b'"labels":{"x":"a\\u0000b",')
        assert json.loads(odd)["labels"]["x"] == "a\x00b"
        fine = body_with(event_id="fine1")
        await asyncio.gather(*(connected.send(received(b)) for b in (odd, fine)))
        rows = await db.fetch(f'SELECT event_id, body, raw FROM "{namespace}" ORDER BY 1')
        assert [(r["event_id"], r["body"] is None, r["raw"]) for r in rows] == [
            ("fine1", False, fine),
            ("nul1", True, odd),
        ]

    async def test_a_row_the_table_refuses_whatever_is_retried_is_refused_for_good(
        self, namespace: str, db: Any
    ) -> None:
        """A column narrowed by hand refuses a longer device id every time: that send raises
        PermanentSinkError (spool mode dead-letters it), and the others are stored."""
        narrowed = ", ".join(
            f'"{n}" {"varchar(8)" if n == "device_id" else t}' for n, t in (KEY, *COLUMNS)
        )
        await db.execute(f'CREATE TABLE "{namespace}" ({narrowed})')
        sink = PostgresSink(DSN, namespace)
        await sink.connect()
        long_id = received(sample_body("touch", device_id="d" * 20))
        short_id = received(sample_body("touch", device_id="d1"))
        try:
            results = await asyncio.gather(
                sink.send(long_id), sink.send(short_id), return_exceptions=True
            )
        finally:
            await sink.close()
        assert isinstance(results[0], PermanentSinkError), results
        assert "PostgreSQL refused" in str(results[0])
        assert results[1] is None
        rows = await db.fetch(f'SELECT event_id FROM "{namespace}"')
        assert [r["event_id"] for r in rows] == [short_id.event_id]

    async def test_schema_qualified_mixed_case_name_is_folded_and_quoted(
        self, namespace: str, db: Any
    ) -> None:
        schema = f"{namespace}_s"
        await db.execute(f'CREATE SCHEMA "{schema}"')
        sink = PostgresSink(DSN, f"{schema.upper()}.Events")
        await sink.connect()
        await sink.send(received(sample_body("touch")))
        await sink.close()
        assert await columns(db, "events", schema) == EXPECTED_COLUMNS
        assert await db.fetchval(f'SELECT count(*) FROM "{schema}".events') == 1

    async def test_a_killed_connection_does_not_poison_the_pool(
        self, connected: PostgresSink, namespace: str, db: Any
    ) -> None:
        """The server drops the sink's connections; the very next send and ping still work."""
        await connected.send(received(sample_body("touch")))
        killed = await db.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            namespace,
        )
        assert killed
        await connected.send(received(sample_body("co2")))
        await connected.ping()
        assert await db.fetchval(f'SELECT count(*) FROM "{namespace}"') == 2

    async def test_a_cancelled_send_leaves_the_sink_usable(
        self, connected: PostgresSink, namespace: str, db: Any
    ) -> None:
        for turns in range(20):  # cancel at different points: queued, in the batch, after
            task = asyncio.ensure_future(connected.send(received(sample_body("touch"))))
            for _ in range(turns % 10):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        last = sample_body("co2")
        await connected.send(received(last))
        await connected.ping()
        assert await db.fetchval(
            f'SELECT count(*) FROM "{namespace}" WHERE event_id = $1', event_id(last)
        )

    async def test_close_commits_what_was_sent_and_is_idempotent(
        self, namespace: str, db: Any
    ) -> None:
        sink = PostgresSink(DSN, namespace)
        await sink.connect()
        sends = [asyncio.ensure_future(sink.send(received(sample_body()))) for _ in range(10)]
        await asyncio.sleep(0)
        await sink.close()
        await sink.close()
        await asyncio.gather(*sends)
        assert await db.fetchval(f'SELECT count(*) FROM "{namespace}"') == 10
        with pytest.raises(SinkError, match="closed"):
            await sink.send(received(sample_body()))
        with pytest.raises(SinkError, match="not connected"):
            await sink.ping()

    async def test_connect_fails_with_sink_error_when_unreachable(self) -> None:
        sink = PostgresSink("postgresql://postgres@127.0.0.1:9/test", "dt_events")
        with pytest.raises(SinkError, match="cannot connect"):
            await sink.connect()
        with pytest.raises(SinkError, match="not connected"):
            await sink.send(received(sample_body()))


@pytest.mark.parametrize(
    "table",
    ["dt-events", "a.b.c", "1events", 'x"; DROP TABLE y; --', "", "s.", "e" * 64],
)
def test_unsafe_table_name_fails_at_start_up_naming_the_setting(table: str) -> None:
    with pytest.raises(SinkConfigError, match="DCON_POSTGRES_TABLE"):
        PostgresSink.from_settings(Settings(postgres_table=table))


def test_bad_dsn_fails_at_start_up_naming_the_setting() -> None:
    with pytest.raises(SinkConfigError, match="DCON_POSTGRES_DSN"):
        PostgresSink.from_settings(Settings(postgres_dsn="mysql://127.0.0.1/test"))


def test_registry_builds_it_from_settings_without_io() -> None:
    """Port 9 has nothing listening: building must not notice, only connect would."""
    settings = Settings(
        sinks=["postgres"], postgres_dsn="postgresql://127.0.0.1:9/x", postgres_table="S.T"
    )
    [sink] = build_sinks(settings)
    assert isinstance(sink, PostgresSink)
    assert (sink.dsn, sink.table.sql) == ("postgresql://127.0.0.1:9/x", '"s"."t"')
