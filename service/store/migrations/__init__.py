"""Versioned PostgreSQL migrations: numbered SQL files, each applied once, recorded in
`schema_migrations`.

Several replicas may start (or run `leak-responder migrate`) at once, so `migrate` takes a
session-level advisory lock first: one applies, the others wait and then find nothing pending.
Each migration runs in its own transaction together with its bookkeeping row, so a failed one
leaves the database at the previous version. The service itself never migrates PostgreSQL: it
refuses to start while migrations are pending, so that schema changes happen once, on purpose,
before a rollout (SQLite, one process by design, still migrates at open).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from service.store.base import StoreError

# pg_advisory_lock's key: any constant that no other application on the database uses.
LOCK_KEY = 0x6C6B7270_6D696772  # "lkrpmigr"
_FILE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


def postgres_migrations() -> list[Migration]:
    """Every migration this release knows, in order."""
    found = []
    for entry in resources.files("service.store.migrations.postgres").iterdir():
        match = _FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    if len({m.version for m in found}) != len(found):
        raise StoreError("two migrations share a version number")
    return found


async def pending(conn: psycopg.AsyncConnection[Any]) -> list[Migration]:
    """Migrations of this release not yet applied. Versions applied by a newer release are fine:
    migrations are additive, so this release still runs on them (a rolling update needs that)."""
    applied: set[int] = set()
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        exists = await cur.fetchone()
        if exists is not None and exists[0]:
            await cur.execute("SELECT version FROM schema_migrations")
            applied = {row[0] for row in await cur.fetchall()}
    return [m for m in postgres_migrations() if m.version not in applied]


async def migrate(url: str) -> list[Migration]:
    """Apply what is pending, under the advisory lock; the migrations this call applied."""
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY,"
                    " name text NOT NULL, applied_at double precision NOT NULL)"
                )
                done = []
                for migration in await pending(conn):
                    async with conn.transaction():
                        await conn.execute(migration.sql)
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
