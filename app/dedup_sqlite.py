"""``sqlite``: the dedup window in a small SQLite file that the workers of one host share.

A claim is one ``INSERT … ON CONFLICT DO UPDATE … WHERE`` statement, atomic across
processes: it inserts an in-flight row, or takes over a row whose window or lease has run
out, or changes nothing (a duplicate, or a claim held elsewhere). WAL mode lets readers
and the one writer of the moment proceed together. The file outlives the processes, so a
restart still knows what it delivered.

SQLite calls block, so each process runs them on one thread of its own, holding the
process's one connection; the event loop only awaits them. Claims, commits and releases
that arrive together run in one transaction (see ``app.dedup_shared``). Old rows are
pruned in the background every ``prune_interval`` seconds or ``prune_every`` commits,
never per request.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from app.dedup_shared import Action, Claim, Op, Result, SharedDedup
from app.errors import DedupUnavailable

log = logging.getLogger("dcon.dedup")

T = TypeVar("T")

# A writer waits this long for another process's write before the claim fails (503).
BUSY_TIMEOUT = 5.0
PRUNE_INTERVAL = 60.0
PRUNE_EVERY = 10_000

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS dedup ("
    " event_id TEXT PRIMARY KEY,"
    " delivered INTEGER NOT NULL,"  # 0: in flight since ``at``; 1: delivered at ``at``
    " token TEXT NOT NULL,"  # whose claim it is
    " at REAL NOT NULL"  # seconds since the epoch: every process shares the wall clock
    ") WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS dedup_age ON dedup (delivered, at)",
)
TAKE = (
    "INSERT INTO dedup (event_id, delivered, token, at) VALUES (:id, 0, :token, :now) "
    "ON CONFLICT (event_id) DO UPDATE SET delivered = 0, token = :token, at = :now "
    "WHERE (delivered = 1 AND at < :expired) OR (delivered = 0 AND at < :abandoned)"
)
STATE = "SELECT delivered FROM dedup WHERE event_id = ?"
DELIVER = (
    "INSERT INTO dedup (event_id, delivered, token, at) VALUES (?, 1, ?, ?) "
    "ON CONFLICT (event_id) DO UPDATE SET delivered = 1, token = excluded.token, at = excluded.at"
)
GIVE_BACK = "DELETE FROM dedup WHERE event_id = ? AND token = ? AND delivered = 0"
PRUNE = (
    "DELETE FROM dedup WHERE delivered = 1 AND at < :expired",
    "DELETE FROM dedup WHERE delivered = 0 AND at < :abandoned",
    # Past max_entries the oldest go first, as in MemoryDedup.
    "DELETE FROM dedup WHERE delivered = 1 AND at <= (SELECT at FROM dedup"
    " WHERE delivered = 1 ORDER BY at DESC LIMIT 1 OFFSET :max_entries)",
)


class SqliteDedup(SharedDedup):
    """Delivered and in-flight eventIds in a SQLite file, for every worker of one host.

    ``window`` and ``max_entries`` bound what is remembered; an in-flight claim older
    than ``lease`` was abandoned by a dead worker and can be taken over.
    """

    store = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        window: float,
        max_entries: int,
        lease: float,
        wait: float,
        retry_after: int,
        clock: Callable[[], float] = time.time,
        prune_interval: float = PRUNE_INTERVAL,
        prune_every: int = PRUNE_EVERY,
    ) -> None:
        super().__init__(wait=wait, retry_after=retry_after)
        self.path = Path(path)
        self.window = window
        self.max_entries = max_entries
        self.lease = lease
        self.prune_interval = prune_interval
        self.prune_every = prune_every
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        # One thread owns the connection: statements run in order, never on the event loop.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dedup-sqlite")
        self._closed = False
        self._commits = 0
        self._next_prune = 0.0

    async def connect(self) -> None:
        """Open (or create) the database in WAL mode and prune what has expired."""
        await self._call(self._open)
        await self.prune()

    async def prune(self) -> None:
        """Forget delivered ids past the window or past ``max_entries``, and dead claims."""
        self._commits = 0
        self._next_prune = self._clock() + self.prune_interval
        await self._call(self._prune)

    async def _mark_delivered(self, event_id: str, token: str) -> None:
        await super()._mark_delivered(event_id, token)
        self._commits += 1
        if self._commits >= self.prune_every or self._clock() >= self._next_prune:
            self._in_background(self._prune_quietly())

    async def _run_batch(self, ops: list[Op]) -> list[Result]:
        return await self._call(self._apply, ops)

    async def _close_store(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._close)
        finally:
            self._thread.shutdown(wait=False)

    async def _prune_quietly(self) -> None:
        try:
            await self.prune()
        except DedupUnavailable as exc:
            log.warning("pruning the sqlite dedup store failed, will try again: %s", exc.detail)

    async def _call(self, func: Callable[..., T], *args: object) -> T:
        """Run ``func`` on the store's thread; a failing database is ``DedupUnavailable``."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, func, *args)
        except (sqlite3.Error, OSError) as exc:
            detail = f"sqlite dedup store {self.path}: {exc}"
            raise DedupUnavailable(detail, self.retry_after) from exc

    # --- on the store's thread ------------------------------------------------------------------

    def _open(self) -> None:
        if self._db is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            self._set_up(db)
        except BaseException:
            db.close()
            raise
        self._db = db

    @staticmethod
    def _set_up(db: sqlite3.Connection) -> None:
        """WAL mode and the schema, retried while another process does the same.

        Workers started together all open a new database at once, and SQLite answers the
        switch to WAL with "database is locked" at once, without waiting out the busy
        timeout, while another connection is making that switch (seen: a worker that
        died at start-up). So a busy answer is retried until the busy timeout has passed.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT
        while True:
            try:
                db.execute("PRAGMA journal_mode=WAL")
                # In WAL mode, NORMAL syncs at checkpoints only: a power cut may forget
                # the last few ids (a duplicate later), never lose an event.
                db.execute("PRAGMA synchronous=NORMAL")
                for statement in SCHEMA:
                    db.execute(statement)
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _apply(self, ops: list[Op]) -> list[Result]:
        """Every op in one transaction: all of them happen, or none."""
        db = self._connection()
        now = self._clock()
        with _transaction(db):
            return [self._apply_one(db, op, now) for op in ops]

    def _apply_one(self, db: sqlite3.Connection, op: Op, now: float) -> Result:
        if op.action is Action.DELIVER:
            db.execute(DELIVER, (op.event_id, op.token, now))
            return None
        if op.action is Action.GIVE_BACK:
            db.execute(GIVE_BACK, (op.event_id, op.token))
            return None
        taken = db.execute(
            TAKE,
            {
                "id": op.event_id,
                "token": op.token,
                "now": now,
                "expired": now - self.window,
                "abandoned": now - self.lease,
            },
        )
        if taken.rowcount == 1:
            return Claim.OURS
        row = db.execute(STATE, (op.event_id,)).fetchone()
        return Claim.DELIVERED if row is not None and row[0] == 1 else Claim.HELD

    def _prune(self) -> None:
        db = self._connection()
        now = self._clock()
        params = {
            "expired": now - self.window,
            "abandoned": now - self.lease,
            "max_entries": self.max_entries,
        }
        with _transaction(db):
            for statement in PRUNE:
                db.execute(statement, params)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("the store is not open")
        return self._db

    def _close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction, taking the write lock up front (waiting up to BUSY_TIMEOUT)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
