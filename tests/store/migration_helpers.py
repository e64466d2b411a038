"""A database as an older release left it, for the tests of a migration's data step: the schema of
every migration before `version`, with its bookkeeping saying they were applied."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from service.store.migrations import migrations

BOOKKEEPING = (
    "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
    " applied_at double precision NOT NULL)"
)


def sqlite_before(path: Path, version: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    for m in migrations("sqlite")[: version - 1]:
        conn.executescript(m.sql)
    conn.execute(BOOKKEEPING)
    conn.executemany("INSERT INTO schema_migrations VALUES (?, 'x', 0)", [(v,) for v in range(1, version)])
    return conn


@contextlib.contextmanager
def postgres_before(pg_url: str, version: int) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for m in migrations("postgres")[: version - 1]:
            conn.execute(m.sql.encode())
        conn.execute(BOOKKEEPING)
        conn.execute(
            "INSERT INTO schema_migrations SELECT v, 'x', 0 FROM generate_series(1, %s) v", [version - 1]
        )
        yield conn
