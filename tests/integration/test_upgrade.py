"""A database made by 0.1.0 upgrades in place: incidents, events and sealed tokens survive, and an
incident open at upgrade time finishes its pipeline on the new release.

The 0.1.0 schemas are kept as they landed (tests/data/v0_1_0/), and the rows are written the way
0.1.0 wrote them: a sealed token with no key id beside it.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import time
from pathlib import Path

import psycopg
import pytest

from service.store import Sealer
from service.store.migrations import migrations
from service.tokens import redact, token_hash
from tests.harness import postgres_env

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "v0_1_0"
CLOSED_HASH = "f" * 64
CLOSED_TIMELINE = ["received", "matched", "revoked", "confirmed", "notified", "closed"]


def rows_0_1_0(token: str, key_id: str, org_id: str, key: bytes) -> list[tuple[str, tuple[object, ...]]]:
    """One incident open at `matched` (due now, sealed token, leased by a process long dead) and one
    closed, with their alert, sightings and events: (SQL with `?` marks, args)."""
    now = time.time()
    digest = token_hash(token)
    sealed = Sealer(key).seal(token, digest)
    return [
        (
            "INSERT INTO alerts (reporter, operator, received_at, body_sha256, item_count, new_incidents)"
            " VALUES ('github', NULL, ?, ?, 2, 2)",
            (now - 60, "a" * 64),
        ),
        (
            "INSERT INTO incidents (id, token_hash, redacted, token_sealed, token_type, state, label, key_id,"
            " org_id, key_name, recipients, created_at, matched_at, next_run_at, lease_owner, lease_until)"
            " VALUES ('inc_open', ?, ?, ?, 'supermemory_api_key', 'matched', 'true_positive', ?, ?, 'ci',"
            " '[]', ?, ?, ?, 'oldhost:1:dead', ?)",
            (digest, redact(token), sealed, key_id, org_id, now - 60, now - 59, now - 59, now - 1),
        ),
        (
            "INSERT INTO incidents (id, token_hash, redacted, token_type, state, label, key_id, org_id,"
            " key_name, recipients, created_at, matched_at, revoked_at, confirmed_at, notified_at, closed_at)"
            " VALUES ('inc_closed', ?, 'sm_abcd…wxyz', 'supermemory_api_key', 'closed', 'true_positive',"
            " 'key_old', 'org_old', 'old', '[]', ?, ?, ?, ?, ?, ?)",
            (CLOSED_HASH, now - 60, now - 59, now - 58, now - 57, now - 56, now - 55),
        ),
        *[
            (
                "INSERT INTO sightings (incident_id, alert_id, reporter, url, source, token_type, seen_at)"
                " VALUES (?, 1, 'github', 'https://github.com/o/r/blob/main/.env', 'content',"
                " 'supermemory_api_key', ?)",
                (incident, now - 60),
            )
            for incident in ("inc_open", "inc_closed")
        ],
        *[
            ("INSERT INTO events (incident_id, at, kind, state, detail) VALUES (?, ?, ?, ?, '{}')", event)
            for event in [
                ("inc_open", now - 60, "received", "received"),
                ("inc_open", now - 59, "matched", "matched"),
                *[
                    ("inc_closed", now - 60 + i, kind, kind)
                    for i, kind in enumerate(
                        ["received", "matched", "revoked", "confirmed", "notified", "closed"]
                    )
                ],
            ]
        ],
    ]


def test_a_0_1_0_sqlite_database_upgrades_and_its_open_incident_finishes(sandbox, make_service, tmp_path):
    key = sandbox.supermemory.keys[0]
    data_key = os.urandom(32)
    db = tmp_path / "leak-responder.db"
    with sqlite3.connect(db) as conn:
        conn.executescript((FIXTURES / "schema-sqlite.sql").read_text() + "\nPRAGMA user_version = 1;")
        for sql, args in rows_0_1_0(key.token, key.id, key.org_id, data_key):
            conn.execute(sql, args)
    conn.close()

    service = make_service({"LEAK_RESPONDER_DATA_KEY": base64.b64encode(data_key).decode()})
    service.wait_state(key.token, "confirmed", "closed")
    assert sandbox.supermemory.stats()["effective_revokes"] == {key.id: 1}

    with service.db() as reader:
        applied = [r[0] for r in reader.execute("SELECT version FROM schema_migrations ORDER BY version")]
        closed = dict(reader.execute("SELECT * FROM incidents WHERE id = 'inc_closed'").fetchone())
        closed_events = [
            r[0] for r in reader.execute("SELECT kind FROM events WHERE incident_id = 'inc_closed'")
        ]
    assert applied == [m.version for m in migrations("sqlite")]
    assert (
        closed["state"] == "closed" and closed["token_hash"] == CLOSED_HASH and closed["sealed_key"] is None
    )
    assert closed_events == ["received", "matched", "revoked", "confirmed", "notified", "closed"]
    assert service.events(key.token)[:2] == ["received", "matched"]
    assert service.events(key.token).count("revoked") == 1


def test_a_0_1_0_postgres_database_migrates_and_its_open_incident_finishes(sandbox, make_service, pg_url):
    key = sandbox.supermemory.keys[0]
    env = postgres_env(sandbox, pg_url)
    data_key = base64.b64decode(env["LEAK_RESPONDER_DATA_KEY"])
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute((FIXTURES / "schema-postgres.sql").read_text().encode())
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at double precision NOT NULL)"
        )
        conn.execute("INSERT INTO schema_migrations VALUES (1, 'initial', %s)", (time.time(),))
        for sql, args in rows_0_1_0(key.token, key.id, key.org_id, data_key):
            conn.execute(sql.replace("?", "%s").encode(), args)

    # The new release refuses the old schema until it is migrated, then finishes the open incident.
    refused = make_service(env, ready=False)
    assert refused.proc.wait(timeout=30) == 2
    assert "0002_foundation" in refused.log_text() and "leak-responder migrate" in refused.log_text()
    migrated = refused.cli("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "0002_foundation" in migrated.stdout and "0001_initial" not in migrated.stdout
    service = make_service(env)
    service.wait_state(key.token, "confirmed", "closed")
    assert sandbox.supermemory.stats()["effective_revokes"] == {key.id: 1}
    with psycopg.connect(pg_url) as conn:
        closed = conn.execute("SELECT state, token_hash FROM incidents WHERE id = 'inc_closed'").fetchone()
        events = conn.execute("SELECT count(*) FROM events WHERE incident_id = 'inc_closed'").fetchone()
    assert closed == ("closed", CLOSED_HASH) and events == (6,)
    assert json.loads(service.http.get(f"{service.url}/readyz").text)["checks"]["migrations"] is True
