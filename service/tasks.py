"""Stopping a loop that runs work as tasks: one rule for the pipeline's worker and the channels'
dispatcher, so both give work in flight the same bounded grace on SIGTERM."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def drain(tasks: Iterable[asyncio.Task[None]], grace: float) -> None:
    """Let `tasks` finish within `grace` seconds, then cancel the rest and wait for them to end.

    A task cut short is safe to cut: its work is leased (or held) and runs again elsewhere."""
    inflight = list(tasks)
    if not inflight:
        return
    _, pending = await asyncio.wait(inflight, timeout=grace)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
