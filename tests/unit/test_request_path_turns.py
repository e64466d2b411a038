"""The request path's lookup as the event loop sees it. Under load every turn of the loop runs a round
of every request's ready work, so each turn between a lookup call's answer and the request going on
to its commit is a wait that request has: it must go on in the turn after its answer is read."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.store import Label
from service.supermemory import Asked
from service.tokens import token_hash
from tests.unit.pipeline_doubles import Clock, FakeSupermemory, alert_of, run_with_store, token
from tests.unit.test_pipeline_worker import worker_for


class AnsweredByTheTest(FakeSupermemory):
    """Hands out the futures the Coalescer would, and lets the test answer them."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[Asked] = []
        self.was_asked = asyncio.Event()

    def ask(self, hashes: Sequence[str]) -> Asked:
        asked: Asked = [(list(hashes), asyncio.get_running_loop().create_future())]
        self.asked.append(asked)
        self.was_asked.set()
        return asked


def test_a_request_goes_on_to_its_commit_in_the_turn_after_its_lookup_is_answered(
    tmp_path: Path,
) -> None:
    clock = Clock()
    turns = 0

    async def scenario(store: Any) -> tuple[int, list[int], dict[str, Label]]:
        loop = asyncio.get_running_loop()
        client = AnsweredByTheTest()  # its Event belongs to this loop

        def tick() -> None:
            nonlocal turns
            turns += 1
            loop.call_soon(tick)

        tick()
        intake, started = store.intake, []

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started.append(turns)
            return await intake(*args, **kwargs)

        store.intake = timed
        worker = worker_for(store, clock, client)
        accept = asyncio.create_task(worker.accept(*alert_of(token(1)), budget=5.0))
        await client.was_asked.wait()
        for _ in range(3):
            await asyncio.sleep(0)  # the request is parked on its answer by now, whatever wraps it
        ((_, answer),) = client.asked[0]
        answered = turns
        answer.set_result({})  # as the Coalescer's call task does, in the turn that read the answer
        _, labels = await accept
        return answered, started, labels

    answered, started, labels = run_with_store(tmp_path, clock, scenario)
    assert labels == {token_hash(token(1)): Label.FALSE_POSITIVE}
    assert started == [answered + 1]
