"""Housekeeping on a timer: reporter metadata (sighting URLs) purged once incidents are long over.

GitHub's partner agreement allows keeping the URL of a leak for 30 days after the incident closes;
hash, redacted form, timeline and the rest of each sighting stay for the audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from service.observability import failure
from service.reasons import Reason
from service.store import Store, StoreError

log = logging.getLogger("service.pipeline")


class Sweeper:
    def __init__(
        self, store: Store, *, retention: float, interval: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.retention = retention
        self.interval = interval
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def sweep_once(self) -> int:
        purged = await self.store.purge_reporter_metadata(self._clock() - self.retention)
        if purged:
            log.info("reporter metadata purged", extra={"incidents": purged})
        return purged

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except StoreError as exc:
                failure(log, "sweeper", Reason.STORE_UNAVAILABLE, f"sweep failed: {exc}", level=logging.ERROR)
            await asyncio.sleep(self.interval)
