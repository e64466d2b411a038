"""Migration 0006 on both backends: an `unconfirmed` incident already in the database gets the time
of its last probe (when it became unconfirmed), from which its re-probes are then scheduled apart
from its owner's email; no other incident gets one."""

from __future__ import annotations

import asyncio

import psycopg

from service.store.migrations import migrate_postgres, migrate_sqlite, migrations
from tests.store.migration_helpers import postgres_before, sqlite_before

T = 1_800_000_000.0
# (id, state, unconfirmed_at, notified_at): untold and told unconfirmed keys, one confirmed after
# an unconfirmed spell, and one that never was.
ROWS = [
    ("inc_untold", "unconfirmed", T, None),
    ("inc_told", "unconfirmed", T + 1, T + 2),
    ("inc_confirmed", "confirmed", T + 3, None),
    ("inc_plain", "revoked", None, None),
]
EXPECTED = {"inc_untold": T, "inc_told": T + 1, "inc_confirmed": None, "inc_plain": None}
INSERT = (
    "INSERT INTO incidents (id, token_hash, redacted, token_type, state, created_at, unconfirmed_at,"
    " notified_at) VALUES (?, ?, 'sm_…', 'supermemory_api_key', ?, ?, ?, ?)"
)


def args(n: int, row: tuple[object, ...]) -> tuple[object, ...]:
    incident, state, unconfirmed_at, notified_at = row
    return (incident, f"{n:064x}", state, T - 60, unconfirmed_at, notified_at)


def test_sqlite_unconfirmed_rows_get_their_last_probe(tmp_path):
    conn = sqlite_before(tmp_path / "db.sqlite", 6)
    conn.executemany(INSERT, [args(n, row) for n, row in enumerate(ROWS)])
    assert [m.version for m in migrate_sqlite(conn)] == [m.version for m in migrations("sqlite")[5:]]
    assert dict(conn.execute("SELECT id, probed_at FROM incidents").fetchall()) == EXPECTED


def test_postgres_unconfirmed_rows_get_their_last_probe(pg_url):
    with postgres_before(pg_url, 6) as conn:
        for n, row in enumerate(ROWS):
            conn.execute(INSERT.replace("?", "%s").encode(), args(n, row))
    assert [m.version for m in asyncio.run(migrate_postgres(pg_url))] == [
        m.version for m in migrations("postgres")[5:]
    ]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert dict(conn.execute("SELECT id, probed_at FROM incidents").fetchall()) == EXPECTED
