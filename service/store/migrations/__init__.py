"""Numbered migrations for both backends: `sqlite/NNNN_name.sql` and `postgres/NNNN_name.sql`, each
applied once, in order, and recorded in `schema_migrations`.

One list of files per backend and one planner (`pending`): a backend differs only in how it runs a
file inside a transaction and how it serialises concurrent runs. Each migration runs in its own
transaction together with its bookkeeping row, so a failed one leaves the database at the previous
version.

- **SQLite** migrates whenever the store is opened: one process owns the file (the store's lock),
  so nothing can race it. A database made by 0.1.0 carries `PRAGMA user_version = 1` and no
  `schema_migrations` table; it is adopted as having 0001 applied.
- **PostgreSQL** is migrated only by `leak-responder migrate`, under a session-level advisory lock
  (several replicas or jobs may run it at once: one applies, the others wait, then find nothing
  pending). The service refuses to start while migrations are pending, so that a schema change
  happens once, on purpose, before a rollout.

Migrations are additive, so a release still runs on a database that a newer release migrated
further (a rolling update or a rollback of the code needs that): versions this release does not
know are ignored, never an error.
"""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

from service.store.base import StoreError

if TYPE_CHECKING:
    import psycopg

Backend = Literal["sqlite", "postgres"]

# pg_advisory_lock's key: any constant that no other application on the database uses.
LOCK_KEY = 0x6C6B7270_6D696772  # "lkrpmigr"
_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_BOOKKEEPING = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
    " applied_at double precision NOT NULL)"
)
# What 0.1.0 left in an SQLite file instead of a schema_migrations row.
_LEGACY_SQLITE_VERSION = 1


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


def migrations(backend: Backend) -> list[Migration]:
    """Every migration this release knows for `backend`, in order."""
    found = []
    for entry in resources.files(f"service.store.migrations.{backend}").iterdir():
        match = _FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if len({m.version for m in found}) != len(found):
        raise StoreError(f"two {backend} migrations share a version number")
    return found


def pending(backend: Backend, applied: set[int]) -> list[Migration]:
    """Migrations of this release not yet applied, in order."""
    return [m for m in migrations(backend) if m.version not in applied]


# -- SQLite -------------------------------------------------------------------------------------------


def migrate_sqlite(conn: sqlite3.Connection) -> list[Migration]:
    """Apply what is pending on an SQLite connection (autocommit mode); the migrations applied."""
    conn.execute(_BOOKKEEPING)
    applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    if not applied and conn.execute("PRAGMA user_version").fetchone()[0] == _LEGACY_SQLITE_VERSION:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'initial', ?)",
            (_LEGACY_SQLITE_VERSION, time.time()),
        )
        applied = {_LEGACY_SQLITE_VERSION}
    done = []
    for migration in pending("sqlite", applied):
        # executescript runs the file's statements as they are; the transaction wraps them with the
        # bookkeeping row, so a failure leaves neither.
        record = (
            "INSERT INTO schema_migrations (version, name, applied_at)"  # noqa: S608 (our own file names)
            f" VALUES ({migration.version}, '{migration.name}', {time.time()!r})"
        )
        try:
            conn.executescript(f"BEGIN IMMEDIATE;\n{migration.sql}\n;{record};\nCOMMIT;")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"migration {migration.label} failed: {exc}") from exc
        done.append(migration)
    return done


# -- PostgreSQL ---------------------------------------------------------------------------------------


async def postgres_applied(conn: psycopg.AsyncConnection[Any]) -> set[int]:
    from psycopg.rows import tuple_row

    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        exists = await cur.fetchone()
        if exists is None or not exists[0]:
            return set()
        await cur.execute("SELECT version FROM schema_migrations")
        return {row[0] for row in await cur.fetchall()}


async def migrate_postgres(url: str) -> list[Migration]:
    """Apply what is pending, under the advisory lock; the migrations this call applied."""
    import psycopg  # here, so that a SQLite deployment never loads the PostgreSQL driver

    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
            try:
                await conn.execute(_BOOKKEEPING)
                done = []
                for migration in pending("postgres", await postgres_applied(conn)):
                    async with conn.transaction():
                        await conn.execute(migration.sql.encode())
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                            (migration.version, migration.name, time.time()),
                        )
                    done.append(migration)
                return done
            finally:
                await conn.execute("SELECT pg_advisory_unlock(%s)", (LOCK_KEY,))
    except psycopg.Error as exc:
        raise StoreError(f"migration failed: {exc}") from exc
