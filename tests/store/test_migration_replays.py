"""Migration 0003 on both backends: a database that stored every replay of an alert (0.1.0 did)
collapses onto one alert and one sighting per place, and the unique indexes then hold."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import psycopg
import pytest

from service.store.migrations import migrate_postgres, migrate_sqlite, migrations
from tests.store.migration_helpers import postgres_before, sqlite_before

URL = "https://github.com/o/r/blob/main/.env"


def replayed_rows() -> list[tuple[str, tuple[object, ...]]]:
    """One incident; its alert stored three times, and sightings: the same place three times, one
    place without URL twice, and one other URL (each pointing at a different copy of the alert)."""
    now = time.time()
    rows: list[tuple[str, tuple[object, ...]]] = [
        (
            "INSERT INTO incidents (id, token_hash, redacted, token_type, state, created_at)"
            " VALUES ('inc_1', ?, 'sm_…', 'supermemory_api_key', 'received', ?)",
            ("e" * 64, now),
        )
    ]
    rows += [
        (
            "INSERT INTO alerts (reporter, received_at, body_sha256, item_count, new_incidents)"
            " VALUES ('github', ?, ?, 1, 0)",
            (now + n, "a" * 64),
        )
        for n in range(3)
    ]
    for alert_id, url in [(1, URL), (2, URL), (3, URL), (2, None), (3, None), (3, "https://x/other")]:
        rows.append(
            (
                "INSERT INTO sightings (incident_id, alert_id, reporter, url, source, token_type, seen_at)"
                " VALUES ('inc_1', ?, 'github', ?, 'content', 't', ?)",
                (alert_id, url, now),
            )
        )
    return rows


def check(rows: list[tuple[object, ...]], alerts: int) -> None:
    assert alerts == 1
    assert sorted(rows, key=str) == sorted([(1, URL), (1, None), (1, "https://x/other")], key=str)


def test_sqlite_replays_collapse(tmp_path):
    conn = sqlite_before(tmp_path / "db.sqlite", 3)
    for sql, args in replayed_rows():
        conn.execute(sql, args)
    assert [m.version for m in migrate_sqlite(conn)] == [m.version for m in migrations("sqlite")[2:]]
    check(
        conn.execute("SELECT alert_id, url FROM sightings").fetchall(),
        conn.execute("SELECT count(*) FROM alerts").fetchone()[0],
    )
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(*replayed_rows()[-1])


def test_postgres_replays_collapse(pg_url):
    with postgres_before(pg_url, 3) as conn:
        for sql, args in replayed_rows():
            conn.execute(sql.replace("?", "%s").encode(), args)
    assert [m.version for m in asyncio.run(migrate_postgres(pg_url))] == [
        m.version for m in migrations("postgres")[2:]
    ]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        check(
            conn.execute("SELECT alert_id, url FROM sightings").fetchall(),
            conn.execute("SELECT count(*) FROM alerts").fetchone()[0],
        )
        sql, args = replayed_rows()[-1]
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(sql.replace("?", "%s").encode(), args)
