"""The lookup Coalescer against a fake admin call (the call itself is what is counted): a lone
request goes out at once, concurrent requests share calls, a failed call fails only the requests
it carried, and no call carries more than 100 hashes."""

from __future__ import annotations

import asyncio

from service.reasons import Reason
from service.supermemory import LOOKUP_BATCH, CallFailed, Coalescer, KeyInfo, give_up


def key(digest: str) -> KeyInfo:
    return KeyInfo(digest, f"id-{digest[:4]}", "org", "name", True, [])


def h(i: int) -> str:
    return f"{i:064x}"


class FakeAdmin:
    """Answers each call once `release()` lets it; every call's hashes are kept."""

    def __init__(self, known: set[str] | None = None, fail: set[int] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.known = known or set()
        self.fail = fail or set()
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, hashes: list[str]) -> dict[str, KeyInfo]:
        number = len(self.calls)
        self.calls.append(hashes)
        await self.gate.wait()
        if number in self.fail:
            raise CallFailed(Reason.SERVER_ERROR, 503)
        return {d: key(d) for d in hashes if d in self.known}


def test_a_lone_lookup_goes_out_at_once_and_gets_its_answer():
    async def scenario():
        admin = FakeAdmin(known={h(1)})
        admin.gate.clear()
        coalescer = Coalescer(admin)
        task = asyncio.create_task(coalescer.lookup([h(1), h(2)]))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        # The call left before anything else happened: no window, no timer.
        assert admin.calls == [[h(1), h(2)]]
        admin.gate.set()
        return await task

    assert asyncio.run(scenario()) == {h(1): key(h(1))}


def test_lookups_queued_while_a_call_is_in_flight_share_the_next_call():
    async def scenario():
        admin = FakeAdmin(known={h(3), h(7)})
        admin.gate.clear()
        coalescer = Coalescer(admin)
        first = asyncio.create_task(coalescer.lookup([h(0)]))
        await asyncio.sleep(0)
        others = [asyncio.create_task(coalescer.lookup([h(i)])) for i in range(1, 10)]
        await asyncio.sleep(0)
        assert len(admin.calls) == 1
        admin.gate.set()
        results = await asyncio.gather(first, *others)
        return admin.calls, results

    calls, results = asyncio.run(scenario())
    assert calls == [[h(0)], [h(i) for i in range(1, 10)]]
    # Each caller hears about its own hashes only.
    assert results[3] == {h(3): key(h(3))}
    assert results[7] == {h(7): key(h(7))}
    assert all(r == {} for i, r in enumerate(results) if i not in (3, 7))


def test_a_failed_shared_call_fails_only_the_lookups_it_carried():
    async def scenario():
        admin = FakeAdmin(known={h(9)}, fail={1})
        admin.gate.clear()
        coalescer = Coalescer(admin)
        first = asyncio.create_task(coalescer.lookup([h(0)]))
        await asyncio.sleep(0)
        carried = [asyncio.create_task(coalescer.lookup([h(i)])) for i in (1, 2)]
        await asyncio.sleep(0)
        admin.gate.set()
        await first
        # The second call (carrying 1 and 2) is now in flight and will fail; 9 queues behind it.
        admin.gate.clear()
        queued = asyncio.create_task(coalescer.lookup([h(9)]))
        await asyncio.sleep(0)
        admin.gate.set()
        done = await asyncio.gather(*carried, return_exceptions=True)
        return await first, done, await queued, admin.calls

    first, done, queued, calls = asyncio.run(scenario())
    assert first == {}
    assert all(isinstance(r, CallFailed) and r.reason == Reason.SERVER_ERROR for r in done)
    assert queued == {h(9): key(h(9))}
    assert calls == [[h(0)], [h(1), h(2)], [h(9)]]


def test_no_call_carries_more_than_100_hashes_and_full_batches_go_out_side_by_side():
    async def scenario():
        admin = FakeAdmin(known={h(0), h(249)})
        admin.gate.clear()
        coalescer = Coalescer(admin, parallel=8)
        big = asyncio.create_task(coalescer.lookup([h(i) for i in range(250)]))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        in_flight = len(admin.calls)
        admin.gate.set()
        return in_flight, await big, admin.calls

    in_flight, found, calls = asyncio.run(scenario())
    assert max(len(c) for c in calls) == LOOKUP_BATCH
    assert sorted(len(c) for c in calls) == [50, 100, 100]
    # The two full batches went out together; the 50 left over waited for a call to end.
    assert in_flight == 2
    assert found == {h(0): key(h(0)), h(249): key(h(249))}


def test_a_partial_batch_waits_for_the_call_in_flight_rather_than_going_beside_it():
    async def scenario():
        admin = FakeAdmin()
        admin.gate.clear()
        coalescer = Coalescer(admin, parallel=8)
        first = asyncio.create_task(coalescer.lookup([h(0)]))
        await asyncio.sleep(0)
        second = asyncio.create_task(coalescer.lookup([h(i) for i in range(1, 60)]))
        await asyncio.sleep(0)
        in_flight = len(admin.calls)
        admin.gate.set()
        await asyncio.gather(first, second)
        return in_flight, admin.calls

    in_flight, calls = asyncio.run(scenario())
    assert in_flight == 1
    assert [len(c) for c in calls] == [1, 59]


def test_a_small_lookup_rides_the_next_call_ahead_of_a_big_ones_queued_chunks():
    async def scenario():
        admin = FakeAdmin()
        admin.gate.clear()
        coalescer = Coalescer(admin, parallel=1)
        big = asyncio.create_task(coalescer.lookup([h(i) for i in range(400)]))
        await asyncio.sleep(0)
        small = asyncio.create_task(coalescer.lookup([h(1000)]))
        await asyncio.sleep(0)
        admin.gate.set()
        await asyncio.gather(big, small)
        return admin.calls

    calls = asyncio.run(scenario())
    # The big alert's first chunk was in flight; the small one goes next, not after its 3 others.
    assert calls[0] == [h(i) for i in range(100)]
    assert calls[1] == [h(1000)]
    assert [len(c) for c in calls[2:]] == [100, 100, 100]


def test_the_same_hash_asked_by_two_callers_is_sent_once():
    async def scenario():
        admin = FakeAdmin(known={h(5)})
        admin.gate.clear()
        coalescer = Coalescer(admin)
        first = asyncio.create_task(coalescer.lookup([h(0)]))
        await asyncio.sleep(0)
        a = asyncio.create_task(coalescer.lookup([h(5)]))
        b = asyncio.create_task(coalescer.lookup([h(5), h(6)]))
        await asyncio.sleep(0)
        admin.gate.set()
        return await asyncio.gather(first, a, b), admin.calls

    results, calls = asyncio.run(scenario())
    assert calls[1] == [h(5), h(6)]
    assert results[1] == results[2] == {h(5): key(h(5))}


def test_a_caller_that_gives_up_leaves_the_others_their_answers():
    async def scenario():
        admin = FakeAdmin(known={h(2)})
        admin.gate.clear()
        coalescer = Coalescer(admin)
        first = asyncio.create_task(coalescer.lookup([h(0)]))
        await asyncio.sleep(0)
        quitter = asyncio.create_task(coalescer.lookup([h(1)]))
        stayer = asyncio.create_task(coalescer.lookup([h(2)]))
        await asyncio.sleep(0)
        quitter.cancel()
        await asyncio.sleep(0)
        admin.gate.set()
        return await asyncio.gather(first, stayer), quitter.cancelled(), admin.calls

    (_, stayer), quit_, calls = asyncio.run(scenario())
    assert quit_
    assert stayer == {h(2): key(h(2))}
    # The quitter's hash left the queue with it.
    assert calls == [[h(0)], [h(2)]]


def test_lookups_asked_in_one_turn_share_the_call_that_turn_started():
    """Under load a turn of the event loop resumes many requests that ask one after another: the
    first one's call takes its hashes when it leaves, in the next turn, so it carries them all
    rather than leaving alone with the others queued behind its answer."""

    async def scenario():
        admin = FakeAdmin(known={h(3)})
        coalescer = Coalescer(admin)
        results = await asyncio.gather(*(coalescer.lookup([h(i)]) for i in range(5)))
        return results, admin.calls

    results, calls = asyncio.run(scenario())
    assert calls == [[h(i) for i in range(5)]]
    assert results[3] == {h(3): key(h(3))}
    assert all(r == {} for i, r in enumerate(results) if i != 3)


def test_a_call_cancelled_in_flight_cancels_its_callers_and_the_queue_goes_on():
    async def scenario():
        admin = FakeAdmin()
        admin.gate.clear()
        coalescer = Coalescer(admin)
        first = asyncio.create_task(coalescer.lookup([h(0)]))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # the first call has taken h(0) and is in flight
        queued = [asyncio.create_task(coalescer.lookup([h(i)])) for i in range(1, 5)]
        await asyncio.sleep(0)
        for call in list(coalescer._calls):
            call.cancel()
        admin.gate.set()
        tasks = [first, *queued]
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1), admin.calls

    results, calls = asyncio.run(scenario())
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [{}] * 4
    assert calls == [[h(0)], [h(i) for i in range(1, 5)]]


def test_a_call_cancelled_before_it_took_its_hashes_leaves_them_to_the_next_call():
    async def scenario():
        admin = FakeAdmin()
        coalescer = Coalescer(admin)
        tasks = [asyncio.create_task(coalescer.lookup([h(i)])) for i in range(3)]
        await asyncio.sleep(0)  # asked; the call that turn started has not run yet
        (call,) = coalescer._calls
        call.cancel()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 1), admin.calls

    results, calls = asyncio.run(scenario())
    assert results == [{}] * 3
    assert calls == [[h(i) for i in range(3)]]


def test_the_next_call_leaves_in_the_turn_of_the_event_loop_that_read_the_answer():
    """Under load every turn of the event loop runs a round of every request's ready work: the
    callers queued behind a call must not wait extra turns after its answer for their own to go."""

    class TurnedAdmin(FakeAdmin):
        async def __call__(self, hashes: list[str]) -> dict[str, KeyInfo]:
            self.turns.append(turns)
            return await super().__call__(hashes)

    turns = 0

    async def scenario():
        loop = asyncio.get_running_loop()

        def tick() -> None:
            nonlocal turns
            turns += 1
            loop.call_soon(tick)

        tick()
        admin = TurnedAdmin()
        admin.turns = []
        admin.gate.clear()
        coalescer = Coalescer(admin)
        first = asyncio.create_task(coalescer.lookup([h(0)]))
        await asyncio.sleep(0)
        queued = asyncio.create_task(coalescer.lookup([h(1)]))
        await asyncio.sleep(0)
        answered = turns
        admin.gate.set()  # the answer read in this turn: the first call's task resumes in the next
        await asyncio.gather(first, queued)
        return answered, admin.turns, admin.calls

    answered, started, calls = asyncio.run(scenario())
    assert calls == [[h(0)], [h(1)]]
    assert started[1] == answered + 1


def test_a_call_whose_callers_all_gave_up_before_it_left_frees_its_place():
    async def scenario():
        admin = FakeAdmin()
        coalescer = Coalescer(admin)
        give_up(coalescer.ask([h(0)]))  # in the turn it asked: nothing left for its call to carry
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        later = await asyncio.wait_for(coalescer.lookup([h(1)]), 1)
        return later, admin.calls

    later, calls = asyncio.run(scenario())
    assert later == {}
    assert calls == [[h(1)]]
