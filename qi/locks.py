"""Locks that serialise registering and promoting a model among all of a study's workers.

The study's workers and ``qi promote`` by hand take the same lock, so two processes never both
find "no champion yet" and both promote. The lock lives where the study lives, so that every
worker that can reach the study also reaches its lock:

    postgresql://   an advisory lock in that database (workers on any machine)
    mysql://        a named lock in that server (``GET_LOCK``; workers on any machine)
    sqlite:///f     a file lock beside the database file ``f``
    a journal file  a file lock beside the journal
    (none given)    the default journal's place: beside a local sqlite tracking store, else
                    the working directory (:func:`qi.storage.default_storage_path`)

File locks (``flock``) hold across the machines that share the folder on a file system that
supports them (local disks; NFSv4). Any other database has no lock qi can take across
machines: a study on it that registers is refused at its start (:func:`check_lockable`),
before any training, rather than risking two champions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from qi.storage import StorageError, database_url, redacted

LOCK_TIMEOUT_S = 600  # registering and promoting takes seconds; a held lock this long is stuck


def _scheme(storage: str) -> str:
    return storage.split("://", 1)[0].split("+", 1)[0] if "://" in storage else ""


def check_lockable(storage: str) -> None:
    """A one-line :class:`StorageError` for a study storage whose registrations qi cannot
    serialise across machines (a database other than PostgreSQL, MySQL or sqlite)."""
    scheme = _scheme(storage)
    if scheme and scheme not in ("postgresql", "mysql", "sqlite"):
        raise StorageError(
            f"storage {redacted(storage)}: qi serialises registration and promotion across "
            f"workers on PostgreSQL, MySQL, sqlite or a journal file, not on {scheme}; use one "
            "of those, or --no-register"
        )


@contextmanager
def registration_lock(name: str, storage: str) -> Iterator[None]:
    """Serialises check-register-promote of ``name`` among all workers of a study on
    ``storage`` (a database URL or a journal file path, as :func:`qi.storage.storage_label`
    gives it)."""
    check_lockable(storage)
    key = f"qi-registry:{name}"
    scheme = _scheme(storage)
    if scheme == "postgresql":
        with _advisory_lock(storage, key):
            yield
    elif scheme == "mysql":
        with _mysql_lock(storage, key):
            yield
    else:
        path = Path(storage.split(":///", 1)[1]) if scheme == "sqlite" else Path(storage)
        with FileLock(str(_lock_file(path.expanduser(), name)), timeout=LOCK_TIMEOUT_S):
            yield


def _lock_file(store: Path, name: str) -> Path:
    """``<store>.registry-<name>.lock`` beside the study's file: in-memory sqlite in the
    working directory."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    if str(store) in ("", ":memory:"):
        store = Path.cwd() / "optuna-in-memory"
    store.parent.mkdir(parents=True, exist_ok=True)
    return store.parent / f"{store.name}.registry-{safe}.lock"


def _key_number(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big", signed=True)


@contextmanager
def _advisory_lock(url: str, key: str) -> Iterator[None]:
    import sqlalchemy

    number = _key_number(key)
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


@contextmanager
def _mysql_lock(url: str, key: str) -> Iterator[None]:
    """MySQL's named lock: held by the connection, released with it (MySQL names are at most
    64 characters, hence the digest)."""
    import sqlalchemy

    name = "qi-registry-" + hashlib.sha256(key.encode()).hexdigest()[:40]
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as connection:
            got = connection.execute(
                sqlalchemy.text("SELECT GET_LOCK(:n, :t)"), {"n": name, "t": LOCK_TIMEOUT_S}
            ).scalar()
            if got != 1:
                raise StorageError(
                    f"storage {redacted(url)}: the registration lock stayed held for "
                    f"{LOCK_TIMEOUT_S} s; is another worker stuck registering?"
                )
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:n)"), {"n": name})
    finally:
        engine.dispose()
