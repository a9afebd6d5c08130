"""Locks that serialise registering and promoting a model among all of a study's workers.

The study's workers and ``qi promote`` by hand take the same lock, so two processes never both
find "no champion yet" and both promote.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from filelock import FileLock

from qi.config import cache_dir
from qi.storage import database_url


@contextmanager
def registration_lock(name: str, storage: str | None = None) -> Iterator[None]:
    """Serialises check-register-promote of ``name`` among all workers of a study.

    On a PostgreSQL study storage the lock is a PostgreSQL advisory lock in that database,
    which every worker on every machine shares; otherwise (a journal file or sqlite, which
    live on one machine) it is a file lock on this machine.
    """
    if storage and storage.split("://", 1)[0].startswith("postgresql"):
        with _advisory_lock(storage, f"qi-registry:{name}"):
            yield
        return
    folder = cache_dir() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    with FileLock(str(folder / f"registry-{safe}.lock"), timeout=600):
        yield


@contextmanager
def _advisory_lock(url: str, key: str) -> Iterator[None]:
    import hashlib

    import sqlalchemy

    number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(database_url(url), poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": number})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": number})
    finally:
        engine.dispose()
