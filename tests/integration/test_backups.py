"""Backups and restores as docs/operations.md gives them, each tried once: SQLite's online copy
while the service serves, PostgreSQL's pg_dump and pg_restore, and a restored database serving."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.harness import Service, postgres_env

pytestmark = pytest.mark.integration


def test_sqlite_online_backup_while_serving_restores_and_serves(sandbox, make_service, tmp_path):
    service = make_service()
    token = sandbox.tokens[0]
    assert service.post_alert(sandbox.github, [token]).status_code == 200
    service.wait_state(token, "confirmed")
    copy = tmp_path / "backup" / "leak-responder.db"
    copy.parent.mkdir()
    done = service.cli("backup", str(copy))  # the service keeps running meanwhile
    assert done.returncode == 0, done.stderr
    assert "integrity ok" in done.stdout and "leak-responder.db.key" in done.stdout
    assert service.cli("backup", str(copy)).returncode == 2  # never overwrites
    assert service.post_alert(sandbox.github, [sandbox.tokens[1]]).status_code == 200  # still serving
    service.stop()

    # Restore: the copy (and the key, kept apart) where a new service expects them.
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(copy, restored / "leak-responder.db")
    shutil.copy(service.db_path.with_name("leak-responder.db.key"), restored / "leak-responder.db.key")
    again = make_service(workdir=restored)
    assert again.state(token) in ("confirmed", "notified", "closed")
    assert again.post_alert(sandbox.github, [token]).json()[0]["label"] == "true_positive"


def test_postgres_dump_and_restore_serve(sandbox, make_service, pg_server, pg_url, tmp_path):
    env = postgres_env(sandbox, pg_url)
    assert Service(tmp_path, env).cli("migrate").returncode == 0
    service = make_service(env)
    token = sandbox.tokens[0]
    assert service.post_alert(sandbox.github, [token]).status_code == 200
    service.wait_state(token, "confirmed")
    dump = tmp_path / "leak-responder.dump"
    bindir = pg_server.bindir
    subprocess.run([bindir / "pg_dump", "-Fc", "-f", str(dump), pg_url], check=True)
    service.stop()

    target = pg_server.create_database("restored_from_dump")
    subprocess.run([bindir / "pg_restore", "--no-owner", "-d", target, str(dump)], check=True)
    (tmp_path / "r").mkdir()
    restored = make_service({**env, "LEAK_RESPONDER_DATABASE_URL": target}, workdir=tmp_path / "r")
    assert restored.state(token) in ("confirmed", "notified", "closed")
    assert restored.post_alert(sandbox.github, [token]).json()[0]["label"] == "true_positive"
