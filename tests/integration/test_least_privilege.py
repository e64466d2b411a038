"""The migration job with its own role and nothing but the database URL; the service with a role that
can only read and write rows: the GRANTs of docs/operations.md, tried against a real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest

from tests.harness import Service, postgres_env

pytestmark = pytest.mark.integration

# As docs/operations.md gives them (passwords aside: the test cluster trusts loopback).
SUPERUSER = [
    "CREATE ROLE leak_owner LOGIN",
    "CREATE ROLE leak_app LOGIN",
    "CREATE DATABASE leak_responder OWNER leak_owner",
]
IN_DATABASE = [
    "REVOKE CREATE ON SCHEMA public FROM PUBLIC",
    "GRANT USAGE ON SCHEMA public TO leak_app",
    "ALTER DEFAULT PRIVILEGES FOR ROLE leak_owner IN SCHEMA public"
    " GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO leak_app",
    "ALTER DEFAULT PRIVILEGES FOR ROLE leak_owner IN SCHEMA public"
    " GRANT USAGE, SELECT ON SEQUENCES TO leak_app",
]


def test_migrate_as_owner_with_the_url_alone_then_serve_as_a_rows_only_role(
    sandbox, make_service, pg_server, tmp_path
):
    with psycopg.connect(pg_server.url(), autocommit=True) as conn:
        for sql in SUPERUSER:
            conn.execute(sql)
    with psycopg.connect(pg_server.url("leak_responder"), autocommit=True) as conn:
        for sql in IN_DATABASE:
            conn.execute(sql)
    owner = pg_server.url("leak_responder").replace("postgres@", "leak_owner@")
    app = pg_server.url("leak_responder").replace("postgres@", "leak_app@")

    # The job's whole environment: the owner's URL. No admin token, no data key, no keys URLs.
    job = Service(tmp_path, {})
    job.env = {"LEAK_RESPONDER_DATABASE_URL": owner}
    migrated = job.cli("migrate")
    assert migrated.returncode == 0, migrated.stderr
    assert "0001_initial" in migrated.stdout

    service = make_service({**postgres_env(sandbox, app), "LEAK_RESPONDER_DATABASE_URL": app})
    token = sandbox.tokens[0]
    assert service.post_alert(sandbox.github, [token]).status_code == 200
    service.wait_state(token, "confirmed")
    with psycopg.connect(app, autocommit=True) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("CREATE TABLE intruder (x int)")
