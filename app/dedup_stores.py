"""Which dedup store a receiver uses, by ``DCON_DEDUP_STORE`` and the number of workers.

- ``memory``: one process; forgotten on restart.
- ``sqlite``: every worker of one host (``DCON_DEDUP_PATH``); survives restarts.
- ``redis``: every replica on every host (``DCON_DEDUP_REDIS_URL``); survives restarts.
- ``auto``: memory with one worker, sqlite with more or in spool mode (there in
  ``DCON_SPOOL_DIR/dedup.db``, so that the window outlives a restart like the spool).

The worker count is ``DCON_WORKERS`` (which ``dcon-receiver serve --workers`` sets), or
uvicorn's own ``--workers`` when this process is one of the workers it started.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from app.dedup import DedupStore, MemoryDedup
from app.errors import ConfigError
from app.settings import unsafe_with_workers

if TYPE_CHECKING:
    from app.settings import Settings

# A claim in flight is abandoned (its worker died) once it is this much older than the
# sinks' deadline, which bounds every live delivery.
LEASE_MARGIN = 5.0


def build_dedup(settings: Settings) -> DedupStore:
    """The configured store, built without I/O; ``ConfigError`` if it cannot be used."""
    kind = dedup_kind(settings)
    if kind == "memory":
        return MemoryDedup(settings.dedup_window, settings.dedup_max_entries)
    lease = settings.sink_timeout + LEASE_MARGIN
    if kind == "sqlite":
        from app.dedup_sqlite import SqliteDedup

        return SqliteDedup(
            sqlite_dedup_path(settings),
            window=settings.dedup_window,
            max_entries=settings.dedup_max_entries,
            lease=lease,
            wait=settings.sink_timeout,
            retry_after=settings.retry_after,
        )
    if importlib.util.find_spec("redis") is None:
        raise ConfigError('DCON_DEDUP_STORE=redis needs redis (pip install "dcon-receiver[redis]")')
    from app.dedup_redis import RedisDedup

    return RedisDedup(
        settings.dedup_redis_url,
        prefix=settings.dedup_redis_prefix,
        window=settings.dedup_window,
        lease=lease,
        wait=settings.sink_timeout,
        retry_after=settings.retry_after,
    )


def sqlite_dedup_path(settings: Settings) -> Path:
    """``DCON_DEDUP_PATH``; in spool mode with ``auto``, beside the spool it guards."""
    if settings.spool and settings.dedup_store == "auto":
        return settings.spool_dir / "dedup.db"
    return settings.dedup_path


async def open_dedup(settings: Settings) -> DedupStore:
    """``build_dedup``, then open the store (a shared one must answer before we serve)."""
    store = build_dedup(settings)
    await store.connect()
    return store


def dedup_kind(settings: Settings) -> str:
    """``settings.dedup_kind``, counting uvicorn's own workers too."""
    workers = max(settings.workers, uvicorn_workers())
    sinks = [name for name, _ in settings.sink_routes]
    reason = unsafe_with_workers(workers, settings.dedup_store, sinks)
    if reason is not None:
        raise ConfigError(reason)
    if settings.dedup_store == "auto" and workers > 1:
        return "sqlite"
    return settings.dedup_kind


def uvicorn_workers() -> int:
    """How many workers ``uvicorn app.main:app --workers N`` runs, seen from one of them.

    uvicorn spawns its workers with multiprocessing, which hands each child the parent's
    command line; read it with uvicorn's own option parser. 1 anywhere else.
    """
    if multiprocessing.parent_process() is None or not _started_by_uvicorn(sys.argv[0]):
        return 1
    import click
    from uvicorn.main import main as uvicorn_cli

    try:
        context = uvicorn_cli.make_context("uvicorn", sys.argv[1:], resilient_parsing=True)
    except click.ClickException:
        return 1
    if context.params.get("reload"):
        return 1  # --reload runs one worker and ignores --workers
    workers = context.params.get("workers") or os.environ.get("WEB_CONCURRENCY") or 1
    return max(1, int(workers))


def _started_by_uvicorn(program: str) -> bool:
    path = Path(program)
    return path.name == "uvicorn" or (path.parent.name == "uvicorn" and path.stem == "__main__")
