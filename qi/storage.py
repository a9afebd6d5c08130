"""Where a study's trials live: a journal file or a database, opened with one-line errors.

The study (:mod:`qi.study`) opens its storage here and the registry (:mod:`qi.locks`) reads
the same URLs, so both sit above this module. Optuna is imported when a storage is opened,
not when a URL is only read or redacted.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    import optuna

JOURNAL_FILE = "optuna-studies.journal"


def default_storage_path(tracking_uri: str) -> Path:
    """Next to a local sqlite tracking store; else in the working directory."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite" and tracking_uri.startswith("sqlite:///"):
        db_file = Path(tracking_uri[len("sqlite:///") :])
        if str(db_file) not in ("", ":memory:"):
            return db_file.expanduser().resolve().parent / JOURNAL_FILE
    return Path.cwd() / JOURNAL_FILE


def storage_label(storage: str | None, tracking_uri: str) -> str:
    """What the user should pass as --storage to reach the same study."""
    return storage or str(default_storage_path(tracking_uri))


def public_label(storage: str | None, tracking_uri: str) -> str:
    """:func:`storage_label` without a password, for what others read (tags, params)."""
    return redacted(storage_label(storage, tracking_uri))


class StorageError(RuntimeError):
    """The study's storage cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class Heartbeat:
    """Optuna's trial heartbeat on database storages (see :mod:`qi.study.recovery`)."""

    interval: int = 20
    grace_period: int = 60
    # called with (study, trial) when a dead worker's trial is failed (qi.study.recovery)
    on_stale_trial: Callable[[Any, Any], None] | None = None

    def __post_init__(self) -> None:
        if self.grace_period <= self.interval:
            raise StorageError(
                f"--grace-period {self.grace_period} must exceed --heartbeat-interval "
                f"{self.interval}: a live worker would be declared dead"
            )


def database_url(url: str) -> str:
    """A bare ``postgresql://`` means psycopg 3 to SQLAlchemy 2.1; qi installs psycopg2, so a
    bare URL gets that driver when psycopg 3 is absent."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def redacted(url: str | None) -> str | None:
    """The storage URL without its password: for messages, tags, params and status output."""
    if url is None:
        return None
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@", 1)
    return url


def open_storage(
    storage: str | None, tracking_uri: str, heartbeat: Heartbeat | None = None
) -> optuna.storages.BaseStorage:
    """A database URL (postgresql://, mysql://, sqlite://) or a journal file path.

    A journal file is safe for several processes on one machine (file locks); a database lets
    workers on many machines share one study, and with ``heartbeat`` a trial of a worker that
    died anywhere is failed and retried. A database that cannot be reached, refuses the
    credentials or lacks its driver is a :class:`StorageError`, before any training.
    """
    target = storage_label(storage, tracking_uri)
    if "://" in target:
        return _open_database(database_url(target), heartbeat)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(target).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _lost_schema_race(exc: Exception) -> bool:
    """A duplicate table, index or row: another worker created that part of the schema first.

    PostgreSQL says "already exists" (a table, an index) or "duplicate key" (its catalogue,
    or Optuna's version row); MySQL and sqlite say "already exists" or "Duplicate entry"."""
    text = str(getattr(exc, "orig", exc)).lower()
    return any(sign in text for sign in ("already exists", "duplicate key", "duplicate entry"))


def _open_database(url: str, heartbeat: Heartbeat | None) -> optuna.storages.RDBStorage:
    import optuna
    import sqlalchemy.exc
    from optuna.storages import RDBStorage

    beats = {}
    if heartbeat is not None:
        beats = dict(
            heartbeat_interval=heartbeat.interval,
            grace_period=heartbeat.grace_period,
            heartbeat_stale_trial_callback=heartbeat.on_stale_trial,
        )
    try:
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **beats)
            except (
                sqlalchemy.exc.IntegrityError,
                sqlalchemy.exc.ProgrammingError,
                sqlalchemy.exc.OperationalError,  # MySQL's "table already exists"
            ) as exc:
                # workers starting together on a new database all create Optuna's schema: one
                # wins, the others fail on a table or row it made (CI, 2026-12-03: "relation
                # alembic_version already exists") and find it made once they look again
                if attempt == 4 or not _lost_schema_race(exc):
                    raise
                time.sleep(0.5 * (attempt + 1))
    except (ImportError, sqlalchemy.exc.NoSuchModuleError):
        raise StorageError(
            f"storage {redacted(url)}: its database driver is missing; install it (pip install "
            "psycopg2-binary for postgresql+psycopg2://, mysqlclient for mysql://)"
        ) from None
    except sqlalchemy.exc.OperationalError as exc:
        cause = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise StorageError(
            f"storage {redacted(url)} cannot be used: {cause}; check the host, port, user, "
            "password and database name"
        ) from None
    except sqlalchemy.exc.ArgumentError as exc:
        raise StorageError(f"storage {redacted(url)} is not a database URL: {exc}") from None
