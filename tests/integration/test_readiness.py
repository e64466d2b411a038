"""/readyz follows the store's commits: while nothing can be committed, it says so, and it comes
back by itself once commits go through again (no alert needed to notice)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

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


# Root mounts a small filesystem and sets the immutable attribute, which binds root too (permission
# bits do not): the faults of a real volume, made on purpose.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mount and chattr need root")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], check=True)
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=False)


def fill(directory: Path) -> Path:
    """A file that takes every free byte of `directory`'s filesystem."""
    filler = directory / "filler"
    with contextlib.suppress(OSError), filler.open("wb") as out:
        while True:
            out.write(b"\0" * 4096)
            out.flush()
    return filler


@needs_root
def test_a_full_disk_is_503_and_not_ready_until_space_comes_back(sandbox, make_service, small_disk):
    # The database alone on the small disk: the log stays readable elsewhere.
    database = f"sqlite:///{small_disk / 'leak-responder.db'}"
    service = make_service({"LEAK_RESPONDER_DATABASE_URL": database})
    filler = fill(small_disk)
    refused = service.post_alert(sandbox.github, [sandbox.tokens[0]])
    assert refused.status_code == 503 and refused.json()["error"] == "store_unavailable"
    ready = httpx.get(f"{service.url}/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["checks"]["store"] is False
    assert service.proc is not None and service.proc.poll() is None, "the process lives"
    assert any("full" in r["message"] for r in service.logged("store_commit_failed"))
    assert service.failures("store", "store_commit_failed") >= 1
    filler.unlink()
    wait_until(lambda: httpx.get(f"{service.url}/readyz", timeout=10).status_code == 200, timeout=30)
    assert service.post_alert(sandbox.github, [sandbox.tokens[0]]).status_code == 200


@needs_root
@pytest.mark.parametrize(("fault", "error"), [("shm", "SQLITE_READONLY"), ("directory", "SQLITE_CANTOPEN")])
def test_a_store_that_cannot_be_written_at_start_stops_start_up_with_one_line(
    sandbox, make_service, tmp_path, fault, error
):
    # The service cannot serve without its store, so it refuses to start (exit 2) with the line an
    # orchestrator shows, rather than stay up answering 503 to everything (see operations.md).
    make_service().stop()  # a database that served once, cleanly stopped
    target = tmp_path / "leak-responder.db-shm" if fault == "shm" else tmp_path
    if fault == "shm":
        target.write_bytes(b"")
    subprocess.run(["chattr", "+i", str(target)], check=True)
    try:
        service = make_service(ready=False)
        assert service.proc is not None
        assert service.proc.wait(timeout=30) == 2
        last = service.log_text().splitlines()[-1]
    finally:
        subprocess.run(["chattr", "-i", str(target)], check=True)
    assert last.startswith(f"leak-responder: cannot open store {tmp_path / 'leak-responder.db'}: ")
    assert f"({error}); the process must be able to write" in last


def shm(service) -> Path:
    return service.db_path.with_name("leak-responder.db-shm")


@needs_root
def test_a_wal_index_made_unwritable_under_the_process_is_503_not_sigbus(sandbox, service):
    # SQLite writes its WAL index through a memory map: a write to it once the file is immutable
    # (or its volume read-only) was a SIGBUS, exit 135. Now: 503, not ready, and back when writable.
    subprocess.run(["chattr", "+i", str(shm(service))], check=True)
    try:
        refused = service.post_alert(sandbox.github, [sandbox.tokens[0]])
        assert refused.status_code == 503 and refused.json()["error"] == "store_unavailable"
        ready = httpx.get(f"{service.url}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["checks"]["store"] is False
        assert service.proc is not None and service.proc.poll() is None, "the process lives"
    finally:
        subprocess.run(["chattr", "-i", str(shm(service))], check=True)
    [lost] = service.logged("store_index_lost")  # once for the episode, however many refusals
    assert "cannot be written" in lost["message"] and lost["stage"] == "store"
    assert httpx.get(f"{service.url}/readyz", timeout=10).status_code == 200
    assert service.post_alert(sandbox.github, [sandbox.tokens[0]]).status_code == 200
    service.wait_state(sandbox.tokens[0], "confirmed")


@needs_root
def test_a_wal_index_truncated_under_the_process_is_rebuilt_and_serving_goes_on(sandbox, service):
    assert service.post_alert(sandbox.github, [sandbox.tokens[0]]).status_code == 200
    service.wait_state(sandbox.tokens[0], "confirmed")
    os.truncate(shm(service), 0)  # a careless clean-up: the next touch of the map was a SIGBUS
    # The next commit (this probe's heartbeat) finds it shrunk, gives it its size back, and SQLite
    # rebuilds it from the WAL: every commit made before is still there.
    assert httpx.get(f"{service.url}/readyz", timeout=10).status_code == 200
    assert service.proc is not None and service.proc.poll() is None
    assert "shrank" in service.logged("store_index_lost")[0]["message"]
    assert service.failures("store", "store_index_lost") >= 1
    assert service.post_alert(sandbox.github, [sandbox.tokens[1]]).status_code == 200
    service.wait_state(sandbox.tokens[1], "confirmed")
    assert service.state(sandbox.tokens[0]) == "confirmed"
