"""Migration 0007 on both backends: fewer index entries per row an alert writes (no
`sightings_incident`, `incidents_org` only for incidents with an org) and, on SQLite, events and
sightings rebuilt without AUTOINCREMENT, every row kept with its id and the events still
append-only."""

from __future__ import annotations

import asyncio
import sqlite3

import psycopg
import pytest

from service.store.common import incident_filter
from service.store.migrations import migrate_postgres, migrate_sqlite, migrations
from service.store.models import IncidentFilter
from service.store.sqlite import SQLITE
from tests.store.migration_helpers import postgres_before, sqlite_before

T = 1_800_000_000.0
INCIDENTS = [
    "INSERT INTO incidents (id, token_hash, redacted, token_type, state, created_at, org_id)"
    " VALUES ('inc_a', 'a', 'sm_…', 'supermemory_api_key', 'matched', ?, 'org_1')",
    "INSERT INTO incidents (id, token_hash, redacted, token_type, state, created_at)"
    " VALUES ('inc_b', 'b', 'sm_…', 'supermemory_api_key', 'false_positive', ?)",
]
ALERT = (
    "INSERT INTO alerts (id, reporter, received_at, body_sha256, item_count, new_incidents)"
    " VALUES (1, 'github', ?, 'x', 2, 2)"
)
# Ids with gaps, as deletions of sightings (the purge) leave them.
EVENTS = [
    (3, "inc_a", T, "received", "received", '{"reporter":"github"}'),
    (4, "inc_a", T, "matched", "matched", '{"key_id":"k"}'),
    (7, "inc_b", T, "received", "received", '{"reporter":"github"}'),
]
SIGHTINGS = [
    (2, "inc_a", 1, "github", None, "https://x.test/a", "content", "supermemory_api_key", T, None),
    (9, "inc_b", 1, "github", None, None, None, "supermemory_api_key", T, "a note"),
]


def _fill(conn: sqlite3.Connection) -> None:
    for sql in INCIDENTS:
        conn.execute(sql, (T,))
    conn.execute(ALERT, (T,))
    conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", EVENTS)
    conn.executemany("INSERT INTO sightings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", SIGHTINGS)


def test_sqlite_events_and_sightings_keep_every_row_and_id(tmp_path):
    conn = sqlite_before(tmp_path / "db.sqlite", 7)
    conn.execute("PRAGMA foreign_keys = ON")
    _fill(conn)
    assert [m.version for m in migrate_sqlite(conn)] == [m.version for m in migrations("sqlite")[6:]]
    assert conn.execute("SELECT * FROM events ORDER BY id").fetchall() == EVENTS
    assert conn.execute("SELECT * FROM sightings ORDER BY id").fetchall() == SIGHTINGS
    tables = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
    assert "AUTOINCREMENT" not in tables["events"] + tables["sightings"]
    assert not {"events_0007", "sightings_0007"} & set(tables)
    # A new row's id is above every row's, as AUTOINCREMENT gave it while no row was deleted.
    new = conn.execute(
        "INSERT INTO events (incident_id, at, kind) VALUES ('inc_b', ?, 'false_positive')", (T,)
    )
    assert new.lastrowid == 8
    # The audit trail is still append-only, and the foreign keys still hold.
    for statement in ("UPDATE events SET kind = 'x' WHERE id = 3", "DELETE FROM events WHERE id = 3"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute(statement)
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        conn.execute("INSERT INTO events (incident_id, at, kind) VALUES ('inc_none', ?, 'x')", (T,))
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
        conn.execute("INSERT INTO sightings SELECT 10, incident_id, alert_id, reporter, operator, url,"
                     " source, token_type, seen_at, note FROM sightings WHERE id = 2")  # fmt: skip


def test_sqlite_indexes_serve_the_same_lookups(tmp_path):
    conn = sqlite_before(tmp_path / "db.sqlite", 7)
    _fill(conn)
    migrate_sqlite(conn)
    indexes = {
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name IN ('events', 'sightings')"
            " AND sql IS NOT NULL"
        )
    }
    assert indexes == {"events_incident", "sightings_reporter", "sightings_alert", "sightings_place"}
    # An incident's sightings through the unique index that starts with incident_id.
    plan = conn.execute("EXPLAIN QUERY PLAN SELECT * FROM sightings WHERE incident_id = ?", ("inc_a",))
    assert "USING INDEX sightings_place" in " ".join(row[3] for row in plan)
    # The operator API's listing by org through the partial index, which holds only incidents with
    # an org (the false positive is not in it).
    sql, args = incident_filter(IncidentFilter(org_id="org_1"), SQLITE)
    plan = conn.execute(f"EXPLAIN QUERY PLAN {sql}", args)
    assert "USING INDEX incidents_org" in " ".join(row[3] for row in plan)
    (definition,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'incidents_org'").fetchone()
    assert definition.endswith("WHERE org_id IS NOT NULL")


def test_postgres_indexes_serve_the_same_lookups(pg_url):
    with postgres_before(pg_url, 7) as conn:
        for sql in INCIDENTS:
            conn.execute(sql.replace("?", "%s").encode(), (T,))
    assert [m.version for m in asyncio.run(migrate_postgres(pg_url))] == [
        m.version for m in migrations("postgres")[6:]
    ]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        names = {
            row[0]
            for row in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename IN ('sightings', 'incidents')"
            )
        }
        assert "sightings_incident" not in names
        assert {"sightings_place", "incidents_org"} <= names
        (definition,) = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'incidents_org'"
        ).fetchone()
        assert "WHERE (org_id IS NOT NULL)" in definition
        # Small tables are scanned whole; with scans off the planner shows which index serves.
        conn.execute("SET enable_seqscan = off")
        plans = {
            "sightings_place": "SELECT * FROM sightings WHERE incident_id = 'inc_a'",
            "incidents_org": "SELECT * FROM incidents WHERE org_id = 'org_1' ORDER BY id DESC LIMIT 50",
        }
        for index, query in plans.items():
            plan = " ".join(row[0] for row in conn.execute(f"EXPLAIN {query}".encode()))
            assert index in plan, plan
