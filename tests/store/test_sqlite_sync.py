"""SQLite's fsync in a thread of its own (see service/store/sqlite.py): a write is answered only once
the `-wal` holding its commit is fsynced, and the writer commits the next group meanwhile."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from pathlib import Path

import pytest

from service.store import AlertRecord, IncidentRef, StoreError
from service.store import sqlite as sqlite_store
from service.store.common import OFFLOAD_ITEMS
from service.store.sqlite import SqliteStore
from service.tokens import token_hash
from tests.harness import wait_until
from tests.store.conftest import Backend
from tests.store.test_contract import failures, key, reported, run, sighting


class HeldFsync:
    """os.fsync as the store's syncer calls it, each call held until the test lets it go."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[str] = []
        self.started = threading.Event()
        self.gate = threading.Event()
        self.fail: OSError | None = None
        real = os.fsync

        def fsync(fd: int) -> None:
            self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
            self.started.set()
            assert self.gate.wait(10), "the test never let the fsync go"
            if self.fail is not None:
                raise self.fail
            real(fd)

        monkeypatch.setattr(sqlite_store.os, "fsync", fsync)


async def intake(store: SqliteStore, token: str) -> list[IncidentRef]:
    alert = AlertRecord("github", hashlib.sha256(token.encode()).hexdigest(), 1)
    return await store.intake(alert, [sighting(token)], match_after=5)


def committed(backend: Backend, token: str) -> bool:
    """Whether the token's incident is committed, as another connection sees the file."""
    return bool(backend.query(f"SELECT 1 FROM incidents WHERE token_hash = '{token_hash(token)}'"))


def test_a_write_is_answered_only_after_the_wal_is_fsynced_and_the_next_group_commits_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sqlite = Backend("sqlite", tmp_path, None)
    first_token, second_token = key(), key()

    async def body() -> None:
        async with sqlite.opened() as (store,):
            assert isinstance(store, SqliteStore)
            held = HeldFsync(monkeypatch)  # after open: the migrations' commits are SQLite's own
            first = asyncio.create_task(intake(store, first_token))
            assert await asyncio.to_thread(held.started.wait, 10)
            # Committed (another connection reads it), its fsync under way: not answered yet.
            assert committed(sqlite, first_token)
            await asyncio.sleep(0.05)
            assert not first.done()
            # The writer is not waiting for that fsync: the next alert's group commits beside it.
            second = asyncio.create_task(intake(store, second_token))
            await asyncio.to_thread(wait_until, lambda: committed(sqlite, second_token), 10, 0.01)
            assert not first.done() and not second.done()
            held.gate.set()
            (one,), (two,) = await asyncio.gather(first, second)
            assert one.created and two.created
            assert held.paths and all(p == f"{sqlite.path}-wal" for p in held.paths)

    run(body())


def test_after_a_failed_fsync_no_write_is_answered_until_a_restart_finds_what_reached_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Committed but perhaps not on disk, and every later commit would sit behind it in the WAL:
    refused (the app answers 503 and the sender redelivers), reported once as a failed commit, and
    every later write refused too, fsync or not, until the store is opened again; the redelivery
    then finds whatever reached the file (here all of it: only the fsync's answer was an error)."""
    sqlite = Backend("sqlite", tmp_path, None)
    before = failures("store", "store_commit_failed")
    token = key()

    async def body() -> None:
        async with sqlite.opened() as (store,):
            assert isinstance(store, SqliteStore)
            held = HeldFsync(monkeypatch)
            held.fail = OSError(5, "Input/output error")
            held.gate.set()
            with pytest.raises(StoreError, match="commit failed: fsync of the WAL failed"):
                await intake(store, token)
            held.fail = None
            with pytest.raises(StoreError, match="commit failed: fsync of the WAL failed"):
                await intake(store, key())
            with pytest.raises(StoreError, match="fsync of the WAL failed"):
                await store.ping()  # /readyz's commit: not ready
            assert len(held.paths) == 1, "nothing more is fsynced, or answered, after a failure"
        async with sqlite.opened() as (store,):
            assert isinstance(store, SqliteStore)
            (again,) = await intake(store, token)
            assert not again.created and again.token_hash == token_hash(token)
            assert (await store.stats()).incidents_by_state == {"received": 1}

    with caplog.at_level(logging.ERROR):
        run(body())
    (record,) = reported(caplog, "store_commit_failed")
    assert "fsync of the WAL failed" in record.getMessage()
    assert failures("store", "store_commit_failed") == before + 1


async def bulky_intake(store: SqliteStore, tokens: int) -> None:
    """One intake big enough to be a bulky write (a big alert's part)."""
    items = [sighting(key()) for _ in range(tokens)]
    alert = AlertRecord("github", hashlib.sha256(os.urandom(16)).hexdigest(), len(items))
    await store.intake(alert, items, match_after=5)


def test_a_bulky_write_leaves_the_checkpoint_to_the_next_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database file takes the WAL's pages only at a checkpoint: not in a big alert's part,
    at the next other commit."""
    monkeypatch.setattr(sqlite_store, "_AUTOCHECKPOINT", 10)  # pages: any intake is more
    sqlite = Backend("sqlite", tmp_path, None)

    async def body() -> None:
        async with sqlite.opened() as (store,):
            assert isinstance(store, SqliteStore)
            await intake(store, key())  # checkpointed at its commit: the file as it is now
            size = sqlite.path.stat().st_size
            await bulky_intake(store, OFFLOAD_ITEMS + 100)
            assert sqlite.path.stat().st_size == size, "the part's commit checkpointed"
            await intake(store, key())
            assert sqlite.path.stat().st_size > size, "the next commit did not checkpoint"

    run(body())


def test_bulky_writes_in_a_row_checkpoint_once_in_so_many(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of big alerts with nothing between them still checkpoints: the WAL does not grow
    without end."""
    monkeypatch.setattr(sqlite_store, "_AUTOCHECKPOINT", 10)
    monkeypatch.setattr(sqlite_store, "_DEFERRED_CHECKPOINTS", 2)
    sqlite = Backend("sqlite", tmp_path, None)

    async def body() -> None:
        async with sqlite.opened() as (store,):
            await intake(store, key())
            size = sqlite.path.stat().st_size
            for _ in range(2):
                await bulky_intake(store, OFFLOAD_ITEMS + 100)
            assert sqlite.path.stat().st_size == size
            await bulky_intake(store, OFFLOAD_ITEMS + 100)
            assert sqlite.path.stat().st_size > size, "the third bulky write in a row did not checkpoint"

    run(body())
