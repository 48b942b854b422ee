"""The dedup stores against one contract: memory (one process), SQLite (one host) and Redis
(every replica), the shared ones with real processes claiming the same ids."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import os
import random
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from app.dedup import DedupStore, MemoryDedup
from app.dedup_redis import RedisDedup
from app.dedup_shared import SharedDedup
from app.dedup_sqlite import BUSY_TIMEOUT, SqliteDedup
from app.dedup_stores import build_dedup, uvicorn_workers
from app.errors import ConfigError, DedupBusy, DedupUnavailable
from app.samples import sample_body
from app.settings import Settings
from app.sinks.memory import QueueSink
from tests.conftest import serve_app
from tests.tcp_proxy import TcpProxy

pytestmark = pytest.mark.anyio

REDIS = ("127.0.0.1", 6379)
SPAWN = multiprocessing.get_context("spawn")
# Shuffles and delays in tests; nothing secret depends on it.
RNG = random.Random()  # noqa: S311


class Clock:
    """A clock the test moves by hand; ``start`` is where it begins."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class StoreSpec:
    """How to open a shared store, picklable so that a child process can open it too."""

    kind: str  # "sqlite" or "redis"
    where: str  # the SQLite file, or the Redis URL
    prefix: str = ""
    window: float = 100.0
    max_entries: int = 1000
    lease: float = 10.0
    wait: float = 0.3

    def build(self, clock: Callable[[], float] = time.time) -> SharedDedup:
        if self.kind == "sqlite":
            return SqliteDedup(
                Path(self.where),
                window=self.window,
                max_entries=self.max_entries,
                lease=self.lease,
                wait=self.wait,
                retry_after=7,
                clock=clock,
            )
        return RedisDedup(
            self.where,
            prefix=self.prefix,
            window=self.window,
            lease=self.lease,
            wait=self.wait,
            retry_after=7,
        )


# --- what the child processes run -----------------------------------------------------------


def claim_all(
    spec: StoreSpec, ids: list[str], ready: Queue[int], go: Event, out: Queue[Any]
) -> None:
    """Claim every id, all at once, as soon as ``go`` is set; report the ids it delivered."""

    async def run() -> list[str]:
        store = spec.build()
        await store.connect()
        ready.put(os.getpid())
        await asyncio.get_running_loop().run_in_executor(None, go.wait, 30)

        # Bounded, like a receiver's concurrent requests: both processes stay busy for a
        # while, so that they really race instead of one finishing before the other starts.
        slots = asyncio.Semaphore(16)

        async def one(event_id: str) -> str | None:
            async with slots:
                if not await store.claim(event_id):
                    return None
                await asyncio.sleep(RNG.random() / 100)  # a delivery takes a while
                await store.commit(event_id)
                return event_id

        delivered = await asyncio.gather(*(one(event_id) for event_id in ids))
        await store.close()
        return [event_id for event_id in delivered if event_id is not None]

    out.put(asyncio.run(run()))


def claim_then_die(spec: StoreSpec, event_id: str) -> None:
    """Claim ``event_id`` and die on the spot, as a killed worker does: no release."""

    async def run() -> None:
        store = spec.build()
        await store.connect()
        assert await store.claim(event_id)
        os._exit(0)

    asyncio.run(run())


# --- the contract -----------------------------------------------------------------------------


class DedupContract:
    """What every store promises, within one process."""

    opened: list[DedupStore]

    async def open_store(self, **options: Any) -> DedupStore:
        """A connected store over this test's backing (options as in ``StoreSpec``)."""
        raise NotImplementedError

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for every store of this test."""
        raise NotImplementedError

    @pytest.fixture(autouse=True)
    async def _close_stores(self) -> AsyncIterator[None]:
        self.opened = []
        yield
        for store in self.opened:
            await store.close()

    async def test_first_claim_delivers_and_a_committed_id_is_a_duplicate(self) -> None:
        store = await self.open_store()
        assert await store.claim("a")
        await store.commit("a")
        assert not await store.claim("a")
        assert await store.claim("b")

    async def test_released_claim_lets_the_retry_deliver(self) -> None:
        """A failed delivery never blocks DT's retry of the same event."""
        store = await self.open_store()
        assert await store.claim("a")
        await store.release("a")
        assert await store.claim("a")

    async def test_a_copy_in_the_same_process_waits_for_the_first_outcome(self) -> None:
        store = await self.open_store()
        assert await store.claim("a")
        second = asyncio.ensure_future(store.claim("a"))
        await asyncio.sleep(0.05)
        assert not second.done()
        await store.commit("a")
        assert await second is False

        assert await store.claim("b")
        third = asyncio.ensure_future(store.claim("b"))
        await asyncio.sleep(0.05)
        await store.release("b")
        assert await third is True  # the first failed, so this one must deliver

    async def test_committed_id_is_forgotten_once_the_window_has_passed(self) -> None:
        store = await self.open_store(window=100)
        assert await store.claim("a")
        await store.commit("a")
        await self.advance(99)
        assert not await store.claim("a")
        await self.advance(2)
        assert await store.claim("a")


class EntryBoundContract(DedupContract):
    """Stores bounded by ``max_entries`` as well as by the window."""

    async def settle(self, store: DedupStore) -> None:
        """Whatever the store does to enforce its bounds, done now."""

    async def test_oldest_ids_go_first_past_max_entries(self) -> None:
        store = await self.open_store(max_entries=3)
        for event_id in "abcd":
            assert await store.claim(event_id)
            await store.commit(event_id)
            await self.advance(1)
        await self.settle(store)
        assert await store.claim("a")  # dropped, so it is new again
        assert not await store.claim("d")


class SharedDedupContract(DedupContract):
    """What a store shared by processes adds: one claim per id across all of them."""

    def spec(self, **options: Any) -> StoreSpec:
        raise NotImplementedError

    async def test_claim_held_by_another_process_is_busy_then_decided(self) -> None:
        """Held elsewhere past the wait: DedupBusy (503); after its commit: a duplicate."""
        one, other = await self.open_store(), await self.open_store(wait=0.2)
        assert await one.claim("a")
        started = time.monotonic()
        with pytest.raises(DedupBusy) as busy:
            await other.claim("a")
        assert 0.2 <= time.monotonic() - started < 2
        assert busy.value.retry_after == 7
        await one.commit("a")
        assert not await other.claim("a")

    @pytest.mark.parametrize("delivered", [True, False], ids=["committed", "released"])
    async def test_a_copy_in_another_process_waits_for_the_first_outcome(
        self, delivered: bool
    ) -> None:
        one, other = await self.open_store(), await self.open_store(wait=5)
        assert await one.claim("a")
        waiting = asyncio.ensure_future(other.claim("a"))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await (one.commit("a") if delivered else one.release("a"))
        assert await asyncio.wait_for(waiting, 2) is not delivered

    async def test_release_gives_back_only_its_own_claim(self) -> None:
        """A claim taken over after its lease is not dropped by the old holder's release."""
        one, other = await self.open_store(lease=10), await self.open_store(lease=10)
        assert await one.claim("a")
        await self.advance(11)
        assert await other.claim("a")
        await one.release("a")  # too late: no longer one's claim
        with pytest.raises(DedupBusy):
            await (await self.open_store(wait=0.05)).claim("a")

    async def test_a_new_store_remembers_what_an_earlier_one_delivered(self) -> None:
        """A restart (a new store on the same file or server) still knows the old ids."""
        first = await self.open_store()
        assert await first.claim("a")
        await first.commit("a")
        await first.close()
        assert not await (await self.open_store()).claim("a")

    @pytest.mark.slow
    async def test_two_processes_claim_each_id_exactly_once(self) -> None:
        """Two real processes race for the same 300 ids: each id is delivered once."""
        ids = [uuid.uuid4().hex[:20] for _ in range(300)]
        ready: Queue[int] = SPAWN.Queue()
        out: Queue[Any] = SPAWN.Queue()
        go = SPAWN.Event()
        spec = self.spec(wait=5)
        processes = [
            SPAWN.Process(target=claim_all, args=(spec, RNG.sample(ids, len(ids)), ready, go, out))
            for _ in range(2)
        ]
        for process in processes:
            process.start()
        await self._in_thread(lambda: [ready.get(timeout=30) for _ in processes])
        go.set()
        results: list[list[str]] = await self._in_thread(
            lambda: [out.get(timeout=30) for _ in processes]
        )
        for process in processes:
            await self._in_thread(functools.partial(process.join, 10))
            assert process.exitcode == 0
        first, second = (set(r) for r in results)
        assert not first & second
        assert first | second == set(ids)
        assert len(first) + len(second) == len(ids)
        assert first  # both really raced
        assert second

    @pytest.mark.slow
    async def test_claim_of_a_killed_process_is_taken_over_after_the_lease(self) -> None:
        """A worker dies holding a claim: busy (503) until its lease ends, then taken over."""
        child = SPAWN.Process(target=claim_then_die, args=(self.spec(lease=10), "a"))
        child.start()
        await self._in_thread(lambda: child.join(30))
        assert child.exitcode == 0
        survivor = await self.open_store(lease=10, wait=0.05)
        with pytest.raises(DedupBusy):
            await survivor.claim("a")
        await self.advance(11)
        assert await survivor.claim("a")

    @staticmethod
    async def _in_thread(func: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, func)


# --- the stores ---------------------------------------------------------------------------------


class TestMemoryDedup(EntryBoundContract):
    @pytest.fixture(autouse=True)
    def _clock(self) -> None:
        self.clock = Clock()

    async def open_store(self, **options: Any) -> DedupStore:
        store = MemoryDedup(
            options.get("window", 100.0), options.get("max_entries", 1000), clock=self.clock
        )
        await store.connect()
        self.opened.append(store)
        return store

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds


class TestSqliteDedup(SharedDedupContract, EntryBoundContract):
    @pytest.fixture(autouse=True)
    def _backing(self, tmp_path: Path) -> None:
        self.path = tmp_path / "dedup" / "dedup.sqlite3"
        # Real time, moved on by advance(): child processes use the real clock.
        self.offset = 0.0

    def clock(self) -> float:
        return time.time() + self.offset

    def spec(self, **options: Any) -> StoreSpec:
        return StoreSpec("sqlite", str(self.path), **options)

    async def open_store(self, **options: Any) -> SqliteDedup:
        store = self.spec(**options).build(self.clock)
        assert isinstance(store, SqliteDedup)
        await store.connect()
        self.opened.append(store)
        return store

    async def advance(self, seconds: float) -> None:
        self.offset += seconds

    async def settle(self, store: DedupStore) -> None:
        assert isinstance(store, SqliteDedup)
        await store.prune()

    def rows(self) -> list[tuple[str, int]]:
        with sqlite3.connect(self.path) as db:
            found = db.execute("SELECT event_id, delivered FROM dedup ORDER BY event_id")
            return [(str(event_id), int(delivered)) for event_id, delivered in found]

    async def test_database_is_in_wal_mode(self) -> None:
        await self.open_store()
        with sqlite3.connect(self.path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)

    async def test_old_rows_are_pruned_in_the_background_not_per_request(self) -> None:
        """Expired rows stay until a prune (every prune_every commits), then go."""
        store = await self.open_store(window=100)
        store.prune_every = 3
        for event_id in "ab":
            assert await store.claim(event_id)
            await store.commit(event_id)
        await self.advance(150)
        assert await store.claim("a")  # expired: claimable before any prune
        await store.release("a")
        assert self.rows() == [("b", 1)]  # b expired but is still there
        assert await store.claim("c")
        await store.commit("c")  # the third commit: a prune starts
        for _ in range(100):
            if self.rows() == [("c", 1)]:
                break
            await asyncio.sleep(0.01)
        assert self.rows() == [("c", 1)]

    async def test_abandoned_claims_are_pruned(self) -> None:
        store = await self.open_store(lease=10)
        assert await store.claim("a")
        await self.advance(11)
        await store.prune()
        assert self.rows() == []

    async def test_unusable_path_fails_connect_as_unavailable(self, tmp_path: Path) -> None:
        (tmp_path / "a-file").write_text("not a directory")
        store = SqliteDedup(
            tmp_path / "a-file" / "dedup.sqlite3",
            window=100,
            max_entries=10,
            lease=10,
            wait=1,
            retry_after=7,
        )
        with pytest.raises(DedupUnavailable, match="a-file"):
            await store.connect()
        await store.close()


class TestRedisDedup(SharedDedupContract):
    @pytest.fixture(autouse=True)
    async def _backing(self) -> AsyncIterator[None]:
        self.prefix = f"dcon:test:{uuid.uuid4().hex}:"
        self.redis = Redis(host=REDIS[0], port=REDIS[1])
        yield
        async for key in self.redis.scan_iter(match=f"{self.prefix}*"):
            await self.redis.delete(key)
        await self.redis.aclose()

    def spec(self, **options: Any) -> StoreSpec:
        return StoreSpec("redis", f"redis://{REDIS[0]}:{REDIS[1]}/0", self.prefix, **options)

    async def open_store(self, **options: Any) -> RedisDedup:
        store = self.spec(**options).build()
        assert isinstance(store, RedisDedup)
        await store.connect()
        self.opened.append(store)
        return store

    async def advance(self, seconds: float) -> None:
        """Time passes for Redis' expiries: every key of this test loses ``seconds`` of TTL."""
        async for key in self.redis.scan_iter(match=f"{self.prefix}*"):
            left = await self.redis.pttl(key) - round(seconds * 1000)
            if left <= 0:
                await self.redis.delete(key)
            else:
                await self.redis.pexpire(key, left)

    async def test_keys_expire_after_the_lease_in_flight_and_the_window_once_delivered(
        self,
    ) -> None:
        """Every key expires: memory in Redis is bounded by the window."""
        store = await self.open_store(window=3600, lease=10)
        assert await store.claim("a")
        assert 9_000 < await self.redis.pttl(store.key("a")) <= 10_000
        await store.commit("a")
        assert 3_599_000 < await self.redis.pttl(store.key("a")) <= 3_600_000

    async def test_unreachable_redis_is_unavailable_and_claims_resume(self) -> None:
        """Redis gone: the claim fails (503), nothing is guessed; back: claims work again."""
        async with TcpProxy(*REDIS) as proxy:
            store = RedisDedup(
                f"redis://127.0.0.1:{proxy.port}/0",
                prefix=self.prefix,
                window=100,
                lease=10,
                wait=1,
                retry_after=7,
            )
            await store.connect()
            self.opened.append(store)
            assert await store.claim("a")
            await store.commit("a")
            await proxy.cut()
            with pytest.raises(DedupUnavailable) as down:
                await store.claim("b")
            assert down.value.retry_after == 7
            await proxy.restore()
            assert not await store.claim("a")
            assert await store.claim("b")

    async def test_receiver_answers_503_with_retry_after_while_redis_is_down(self) -> None:
        body = sample_body("touch")
        sink = QueueSink()
        async with TcpProxy(*REDIS) as proxy:
            settings = Settings(
                verify_mode="off",
                retry_after=9,
                dedup_store="redis",
                dedup_redis_url=f"redis://127.0.0.1:{proxy.port}/0",
                dedup_redis_prefix=self.prefix,
            )
            async with serve_app(settings, [sink]) as (_, client):
                await proxy.cut()
                down = await client.post("/events", content=body)
                await proxy.restore()
                stored = await client.post("/events", content=body)
                again = await client.post("/events", content=body)
        assert down.status_code == 503
        assert down.headers["Retry-After"] == "9"
        assert down.json()["error"] == "dedup_unavailable"
        assert stored.json()["status"] == "accepted"
        assert again.json()["status"] == "duplicate"
        assert sink.queue.qsize() == 1


# --- choosing a store -------------------------------------------------------------------------


def test_auto_is_memory_for_one_worker_and_sqlite_for_several(tmp_path: Path) -> None:
    assert isinstance(build_dedup(Settings()), MemoryDedup)
    several = build_dedup(Settings(workers=4, dedup_path=tmp_path / "d.sqlite3"))
    assert isinstance(several, SqliteDedup)
    assert several.path == tmp_path / "d.sqlite3"
    assert several.lease == Settings().sink_timeout + 5
    assert not several.path.exists()  # built without I/O
    shared = build_dedup(Settings(dedup_store="redis", dedup_redis_prefix="p:"))
    assert isinstance(shared, RedisDedup)
    assert shared.key("x") == "p:x"


def test_bad_redis_url_is_a_config_error_without_the_password() -> None:
    settings = Settings(dedup_store="redis", dedup_redis_url="http://user:hunter2@host/0")
    with pytest.raises(ConfigError, match="DCON_DEDUP_REDIS_URL") as caught:
        build_dedup(settings)
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["/venv/bin/uvicorn", "app.main:app", "--workers", "3"], {}, 3),
        (["/lib/uvicorn/__main__.py", "app.main:app", "--workers=2", "--port", "1"], {}, 2),
        (["/venv/bin/uvicorn", "app.main:app"], {"WEB_CONCURRENCY": "5"}, 5),
        (["/venv/bin/uvicorn", "app.main:app", "--reload", "--workers", "3"], {}, 1),
        (["/venv/bin/uvicorn", "app.main:app"], {}, 1),
        (["/venv/bin/dcon-receiver", "serve", "--workers", "3"], {}, 1),
    ],
)
def test_uvicorn_workers_are_read_from_the_command_line_uvicorn_was_started_with(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], environ: dict[str, str], expected: int
) -> None:
    """Inside a worker that uvicorn spawned, sys.argv is uvicorn's own command line."""
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    monkeypatch.setattr(sys, "argv", argv)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert uvicorn_workers() == expected


def test_uvicorn_workers_with_memory_dedup_refuse_and_auto_shares_sqlite(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: object())
    monkeypatch.setattr(sys, "argv", ["/venv/bin/uvicorn", "app.main:app", "--workers", "2"])
    with pytest.raises(ConfigError, match="DCON_DEDUP_STORE=memory"):
        build_dedup(Settings(dedup_store="memory"))
    assert isinstance(build_dedup(Settings(dedup_path=tmp_path / "d")), SqliteDedup)


def _set_up_when_told(path: str, go: Event, out: Queue[str]) -> None:
    go.wait()
    db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
    try:
        SqliteDedup._set_up(db)
        out.put("ok")
    except sqlite3.Error as exc:
        out.put(str(exc))
    finally:
        db.close()


def test_workers_opening_a_new_sqlite_store_at_once_all_start(tmp_path: Path) -> None:
    """Workers started together race to switch a new database to WAL; SQLite answers the
    losers "database is locked" at once, which once killed a worker at start-up."""
    fork = multiprocessing.get_context("fork")
    outcomes: list[str] = []
    for trial in range(30):
        path = str(tmp_path / f"dedup-{trial}.sqlite3")
        go, out = fork.Event(), fork.Queue()
        workers = [fork.Process(target=_set_up_when_told, args=(path, go, out)) for _ in range(8)]
        for worker in workers:
            worker.start()
        go.set()
        outcomes += [out.get(timeout=30) for _ in workers]
        for worker in workers:
            worker.join(10)
    assert outcomes == ["ok"] * 240
