"""PostgreSQL's batched intake (concurrent intakes of a process in one transaction) where it differs
from SQLite's group commit: what a batch reads, a database out of reach, a request cancelled while
its batch is in flight."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest

from service.store import AlertRecord, IncidentRef, Sealer, StoreError, TokenSighting
from service.store import postgres as postgres_module
from service.store.migrations import migrate_postgres as migrate
from service.store.postgres import PostgresStore


def sighting() -> TokenSighting:
    return TokenSighting(
        f"sm_{secrets.token_hex(20)}", "supermemory_api_key", "https://x.test/a", None, "github"
    )


def alert(n: int) -> AlertRecord:
    return AlertRecord("github", f"{n:064x}", 1)


def admin(url: str) -> psycopg.Connection[Any]:
    """A connection to the cluster's own database, to act on the test's database from outside."""
    return psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", autocommit=True)


class CountingStore(PostgresStore):
    """The real store, counting its write transactions and able to hold a batch mid-flight."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes = 0
        self.batch_started = asyncio.Event()
        self.batch_gate: asyncio.Event | None = None

    async def _write(self, work: Any) -> Any:
        self.writes += 1
        return await super()._write(work)

    async def _intake_batch(self, conn: Any, batch: Sequence[Any]) -> list[list[IncidentRef]]:
        self.batch_started.set()
        if self.batch_gate is not None:
            await self.batch_gate.wait()
        return await super()._intake_batch(conn, batch)


def test_a_batch_finds_a_replayed_alert_by_index_not_by_reading_every_alert(pg_url: str) -> None:
    # With a join, the planner read the whole alerts table on every batch to find replays: a cost
    # that grows with every alert ever received. Counted by the server's own statistics.
    async def body() -> None:
        await migrate(pg_url)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO alerts (reporter, received_at, body_sha256, item_count, new_incidents)"
                " SELECT 'github', 0, lpad(to_hex(n), 64, '0'), 1, 0 FROM generate_series(1, 20000) AS n"
            )
            conn.execute("ANALYZE alerts")
        store = PostgresStore(pg_url, Sealer(os.urandom(32)))
        await store.open()
        try:
            before = seq_scans(pg_url)
            # Ten replays of old alerts and thirty fresh ones, batched together.
            await asyncio.gather(*(store.intake(alert(n), [sighting()], 0) for n in range(19991, 20031)))
        finally:
            await store.close()
        assert seq_scans(pg_url, inserted=20000 + 30) == before

    asyncio.run(body())


def seq_scans(url: str, inserted: int | None = None, table: str = "alerts") -> int:
    """`table`'s sequential scans so far, once the server's statistics show `inserted` rows in it
    (a backend reports its counts shortly after its transactions, not at once)."""
    deadline = time.monotonic() + 30
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            row = conn.execute(
                "SELECT seq_scan, n_tup_ins FROM pg_stat_user_tables WHERE relname = %s", (table,)
            ).fetchone()
            assert row is not None
            if inserted is None or row[1] >= inserted or time.monotonic() > deadline:
                assert inserted is None or row[1] >= inserted, "statistics never caught up"
                return int(row[0])
            conn.execute("SELECT pg_sleep(0.1)")
            conn.execute("SELECT pg_stat_clear_snapshot()")


async def intakes(store: PostgresStore, numbers: range) -> None:
    """Alerts of one fresh token each, taken at once (so batched), each deciding its new incidents."""
    await asyncio.gather(*(store.intake(alert(n), [sighting()], 0, decide=lambda ref: None) for n in numbers))


def test_a_plan_made_while_the_database_was_empty_is_not_kept_once_it_has_grown(pg_url: str) -> None:
    # psycopg prepares a statement on its sixth run and the server then keeps a generic plan: made
    # on a new, empty database it read all of `incidents` for every batch (its token hashes looked
    # up with a sequential scan) until autovacuum's first ANALYZE, a minute or more later. Here
    # autovacuum never comes, as on a database growing faster than it analyzes.
    async def body() -> None:
        await migrate(pg_url)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("ALTER TABLE incidents SET (autovacuum_enabled = false)")
        store = PostgresStore(pg_url, Sealer(os.urandom(32)))
        await store.open()
        try:
            # Batches of several alerts, as under load: each statement is run again and again on
            # an almost empty table, with arrays of several hashes (a plan for one hash probes the
            # index even then).
            for n in range(0, 192, 16):
                await intakes(store, range(n, n + 16))
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute(
                    "INSERT INTO incidents (id, token_hash, redacted, token_type, state, created_at)"
                    " SELECT 'i' || n, md5(n::text), 'sm_…', 'supermemory_api_key', 'closed', 0"
                    " FROM generate_series(1, 20000) AS n"
                )
            before = seq_scans(pg_url, inserted=192 + 20000, table="incidents")
            for n in range(192, 240, 16):
                await intakes(store, range(n, n + 16))
        finally:
            await store.close()
        assert seq_scans(pg_url, inserted=240 + 20000, table="incidents") == before

    asyncio.run(body())


def test_an_unreachable_database_fails_a_batch_at_once_not_intake_by_intake(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of reach, each intake retried alone would wait for a connection as long again, and a
    # batch of 64 would hold its requests for 64 times the connect timeout.
    monkeypatch.setattr(postgres_module, "_CONNECT_TIMEOUT", 1.0)
    database = pg_url.rsplit("/", 1)[1]

    async def body() -> None:
        await migrate(pg_url)
        store = CountingStore(pg_url, Sealer(os.urandom(32)))
        await store.open()
        with admin(pg_url) as conn:
            conn.execute(f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")  # type: ignore[arg-type]
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,)
            )
        try:
            writes = store.writes
            results = await asyncio.gather(
                *(store.intake(alert(n), [sighting()], 0) for n in range(6)), return_exceptions=True
            )
            assert all(isinstance(r, StoreError) for r in results), results
            assert store.writes - writes == 1, "one batch, not one more try per intake"
        finally:
            with admin(pg_url) as conn:
                conn.execute(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")  # type: ignore[arg-type]
            await store.close()

    asyncio.run(body())


def test_a_request_cancelled_while_its_batch_is_in_flight_leaves_the_others_answered(pg_url: str) -> None:
    # A client that hangs up mid-intake cancels its request: the batch it is in still commits the
    # others' alerts and answers them, and the store takes the next intake as usual. (The cancelled
    # alert is committed with its batch, unacknowledged: its redelivery is a replay.)
    async def body() -> None:
        await migrate(pg_url)
        store = CountingStore(pg_url, Sealer(os.urandom(32)))
        await store.open()
        try:
            store.batch_gate = asyncio.Event()
            intakes = [asyncio.create_task(store.intake(alert(n), [sighting()], 0)) for n in range(4)]
            await asyncio.wait_for(store.batch_started.wait(), 10)
            intakes[1].cancel()
            store.batch_gate.set()
            results = await asyncio.wait_for(asyncio.gather(*intakes, return_exceptions=True), 30)
            assert isinstance(results[1], asyncio.CancelledError)
            assert all(isinstance(r, list) and r[0].created for n, r in enumerate(results) if n != 1)
            assert len(await asyncio.wait_for(store.intake(alert(9), [sighting()], 0), 30)) == 1
        finally:
            await store.close()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM alerts").fetchone() == (5,)

    asyncio.run(body())
