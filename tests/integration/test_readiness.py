"""/readyz follows the store's commits: while nothing can be committed, it says so, and it comes
back by itself once commits go through again (no alert needed to notice)."""

from __future__ import annotations

import sqlite3
import time

import httpx
import pytest

from tests.harness import wait_until

pytestmark = pytest.mark.integration


def test_readiness_fails_while_commits_cannot_happen_and_recovers(sandbox, service):
    assert httpx.get(f"{service.url}/readyz").status_code == 200
    # Another process takes the database's write lock: reads still work (WAL), commits wait.
    blocker = sqlite3.connect(service.db_path, isolation_level=None, timeout=1)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        ready = httpx.get(f"{service.url}/readyz", timeout=10)
        assert ready.status_code == 503
        assert time.monotonic() - started < 5
        body = ready.json()
        assert body["error"] == "not_ready" and body["checks"]["store"] is False
        assert ready.headers["content-type"] == "application/problem+json"
        # The metrics still read (a read needs no lock): only commits are stuck.
        assert httpx.get(f"{service.url}/metrics").status_code == 200
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    wait_until(lambda: httpx.get(f"{service.url}/readyz", timeout=10).status_code == 200, timeout=40)
    assert service.logged("not_ready") and service.failures("http", "not_ready") >= 1
    with service.db() as conn:
        assert conn.execute("SELECT count(*) FROM heartbeat").fetchone()[0] == 1
