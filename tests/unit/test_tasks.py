"""`drain`: work in flight gets its grace on shutdown, and no more."""

from __future__ import annotations

import asyncio

from service.tasks import drain


def test_work_within_the_grace_finishes_and_work_past_it_is_cancelled():
    async def body() -> tuple[bool, bool, bool]:
        quick = asyncio.create_task(asyncio.sleep(0.05))
        slow = asyncio.create_task(asyncio.sleep(30))
        await drain({quick, slow}, grace=0.5)
        return quick.done() and not quick.cancelled(), slow.cancelled(), slow.done()

    assert asyncio.run(body()) == (True, True, True)


def test_nothing_in_flight_returns_at_once():
    asyncio.run(drain([], grace=30))
