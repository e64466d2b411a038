"""Rate buckets in the store: what the public reports' limits rely on, on both backends, and shared by
replicas on PostgreSQL (two stores on one database stand for two replicas)."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from service.store import AlertRecord, RateBucket, RateRefusal
from tests.store.conftest import Backend
from tests.store.test_contract import run

CLIENT = RateBucket("client:a", 3, 60.0)
EVERYONE = RateBucket("global", 5, 60.0)


def test_a_bucket_holds_its_limit_then_refills_one_per_interval(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            assert [await store.take_rates([CLIENT]) for _ in range(3)] == [None, None, None]
            refused = await store.take_rates([CLIENT])
            assert refused == RateRefusal(0, pytest.approx(20.0))
            backend.clock.advance(19.5)
            assert await store.take_rates([CLIENT]) is not None
            backend.clock.advance(0.6)
            assert await store.take_rates([CLIENT]) is None
            assert await store.take_rates([CLIENT]) is not None
            # Another client's bucket is its own.
            assert await store.take_rates([RateBucket("client:b", 3, 60.0)]) is None

    run(body())


def test_a_request_is_taken_from_every_bucket_or_from_none(backend: Backend) -> None:
    async def body() -> None:
        async with backend.opened() as (store,):
            other = RateBucket("client:b", 10, 60.0)
            for _ in range(5):
                assert await store.take_rates([other, EVERYONE]) is None
            # Everyone's bucket is empty: refused there, and the client's bucket was not charged.
            refused = await store.take_rates([CLIENT, EVERYONE])
            assert refused is not None and refused.bucket == 1
            backend.clock.advance(12.0)
            assert await store.take_rates([CLIENT, EVERYONE]) is None
            # The client still has two of its three: the refused request took nothing from it.
            assert [await store.take_rates([CLIENT]) for _ in range(2)] == [None, None]
            refused = await store.take_rates([CLIENT, EVERYONE])
            assert refused is not None and refused.bucket == 0

    run(body())


def test_an_intake_of_no_tokens_records_the_report_alone(backend: Backend) -> None:
    """A public report without keys still commits its (hash-only) record, as one with keys does."""

    async def body() -> None:
        async with backend.opened() as (store,):
            assert await store.intake(AlertRecord("public", "0" * 64, 0), [], match_after=0) == []
            assert (await store.stats()).incidents_by_state == {}

    run(body())
    if backend.url is None:
        with sqlite3.connect(backend.path) as conn:
            assert conn.execute("SELECT reporter, item_count FROM alerts").fetchall() == [("public", 0)]


def test_replicas_share_one_limit(postgres: Backend) -> None:
    async def body() -> None:
        async with postgres.opened(2) as (one, two):
            assert await one.take_rates([CLIENT]) is None
            assert await two.take_rates([CLIENT]) is None
            assert await one.take_rates([CLIENT]) is None
            assert await two.take_rates([CLIENT]) is not None
            # At once from both replicas: exactly the limit gets through, never more.
            bucket = RateBucket("client:c", 10, 60.0)
            answers = await asyncio.gather(*(s.take_rates([bucket, EVERYONE]) for s in (one, two) * 15))
            assert sum(a is None for a in answers) == 5  # everyone's 5
            answers = await asyncio.gather(*(s.take_rates([bucket]) for s in (one, two) * 15))
            assert sum(a is None for a in answers) == 5  # the client's 10, less the 5 above

    run(body())


def test_idle_buckets_are_deleted(postgres: Backend) -> None:
    async def body() -> None:
        async with postgres.opened() as (store,):
            await store.take_rates([CLIENT, EVERYONE])
            postgres.clock.advance(61.0)
            await store.take_rates([RateBucket("client:b", 3, 60.0)])

    run(body())
    import psycopg

    assert postgres.url is not None
    with psycopg.connect(postgres.url) as conn:
        assert [r[0] for r in conn.execute("SELECT key FROM rate_buckets")] == ["client:b"]
