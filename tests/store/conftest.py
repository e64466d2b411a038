"""Each contract test runs once per backend, each run on a fresh database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psycopg
import pytest

from service.runtime import store_failure
from service.store import Sealer, Store
from service.store.migrations import migrate_postgres as migrate
from service.store.postgres import PostgresStore
from service.store.sqlite import SqliteStore


class Clock:
    """A clock the test moves by hand, to expire leases and holds without waiting for them."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Backend:
    """Stores of one backend on one database; several may be open at once, as replicas are."""

    def __init__(self, kind: str, tmp_path: Path, pg_url: str | None) -> None:
        self.kind = kind
        self.path = tmp_path / "store.db"
        self.url = pg_url
        self.sealer = Sealer(os.urandom(32))
        self.clock = Clock()

    def __repr__(self) -> str:
        return self.kind

    def make(self, clock: Callable[[], float] | None = None) -> Store:
        clock = clock or self.clock
        if self.url is None:
            return SqliteStore(self.path, self.sealer, clock=clock, on_failure=store_failure)
        return PostgresStore(self.url, self.sealer, clock=clock, on_failure=store_failure)

    @contextlib.asynccontextmanager
    async def opened(self, count: int = 1) -> AsyncIterator[list[Store]]:
        """`count` stores, as replicas; on SQLite, which one process owns, `count` users of one store
        (several workers of that process)."""
        stores = [self.make() for _ in range(count if self.url is not None else 1)]
        for store in stores:
            await store.open()
        try:
            yield stores * (count // len(stores))
        finally:
            for store in stores:
                await store.close()

    def query(self, sql: str) -> list[tuple[object, ...]]:
        """Raw rows behind the store's back, to check what it wrote where."""
        if self.url is None:
            with contextlib.closing(sqlite3.connect(self.path)) as conn:
                return conn.execute(sql).fetchall()
        with psycopg.connect(self.url, autocommit=True) as conn:
            return conn.execute(sql).fetchall()  # type: ignore[arg-type]

    def execute(self, sql: str) -> None:
        """Raw SQL behind the store's back, as an intruder (or a careless operator) would run it."""
        if self.url is None:
            with contextlib.closing(sqlite3.connect(self.path)) as conn:
                conn.execute(sql)
                conn.commit()
        else:
            with psycopg.connect(self.url, autocommit=True) as conn:
                conn.execute(sql)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "postgres":
        return request.getfixturevalue("postgres")
    return Backend("sqlite", tmp_path, None)


@pytest.fixture
def postgres(pg_url: str, tmp_path: Path) -> Backend:
    """A migrated PostgreSQL database; for what only a multi-process backend has."""
    asyncio.run(migrate(pg_url))
    return Backend("postgres", tmp_path, pg_url)
