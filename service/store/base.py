"""The store's contract: what the app and the pipeline may ask of any backend.

Kept narrow on purpose (intake, claim, apply, a few reads) so that a PostgreSQL backend can follow
without the pipeline changing: the pipeline decides, the store only records and fences.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from service.reasons import Reason
from service.store.common import RewrapReport
from service.store.models import (
    AlertRecord,
    ChannelJob,
    ChannelOutcome,
    Decide,
    Delivery,
    DeliveryStatus,
    IdempotentRequest,
    Incident,
    IncidentDetail,
    IncidentFilter,
    IncidentRef,
    Percentiles,
    RateBucket,
    RateRefusal,
    Reservation,
    Sighting,
    State,
    StoreStats,
    Timed,
    TokenSighting,
    Transition,
)


class StoreError(Exception):
    """The store could not do what was asked; callers answer 503 so the sender retries."""


# How a backend reports a failure that no caller sees (a failed group commit, a lost LISTEN
# connection): the runtime passes one that logs and counts it, since the store knows neither.
FailureHook = Callable[[Reason, str], None]


def ignore_failure(reason: Reason, message: str) -> None:
    """For tools and tests that open a store without the service's observability."""


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> None:
        """Commit a heartbeat the way an alert's intake commits: fails as the next alert would."""
        ...

    async def pending_migrations(self) -> list[str]:
        """Migrations of this release the database lacks (readiness reports them; none once open)."""
        ...

    async def watch(self, wake: Callable[[], None]) -> None:
        """Call `wake` when another process commits work that is due, until `close`.

        Replicas share one database but not one event loop: this is how a commit in one wakes the
        workers of all. A single-process backend has nothing to watch.
        """
        ...

    async def intake(
        self,
        alert: AlertRecord,
        items: Sequence[TokenSighting],
        match_after: float,
        decide: Decide | None = None,
    ) -> list[IncidentRef]:
        """Record an alert (its incidents, sightings and record) in one transaction; with `decide`,
        the same transaction also applies the decided transitions of its incidents still in
        `received`, so that an alert and its labels cost one commit."""
        ...

    async def claim(self, owner: str, limit: int, lease: float) -> list[Incident]: ...
    async def apply(self, transitions: Sequence[Transition]) -> list[bool]: ...
    async def release(self, owner: str) -> None: ...
    async def reclaim(self, replica: str) -> int:
        """Hand back the leases a dead predecessor of `replica` held, at once (see the backends)."""
        ...

    async def resume(self, state: State) -> int: ...
    async def reveal_token(self, incident_id: str) -> str | None: ...
    async def next_due(self) -> float | None: ...

    async def incidents(self, ids: Sequence[str]) -> list[Incident]: ...
    async def detail(self, incident_id: str) -> IncidentDetail | None: ...
    async def list_incidents(self, where: IncidentFilter) -> list[Incident]: ...
    async def oldest_pending(self, limit: int) -> list[Incident]:
        """The incidents waiting longest for the pipeline (not closed, not a false positive)."""
        ...

    async def percentiles(self, timed: Timed, since: float, until: float, width: float) -> list[Percentiles]:
        """p50/p95 of `timed` minus arrival, for incidents that arrived in [since, until), in buckets
        of `width` seconds from `since`."""
        ...

    # -- for telling owners: alert siblings, sightings in bulk, and the outbox --
    async def alert_siblings(self, incident_ids: Sequence[str]) -> dict[str, list[Incident]]: ...
    async def sightings(self, incident_ids: Sequence[str]) -> dict[str, list[Sighting]]: ...
    async def wake(self, incident_ids: Sequence[str]) -> None: ...
    async def deliveries(self, incident_ids: Sequence[str]) -> list[Delivery]: ...
    async def reserve_deliveries(
        self, holder: str, recipient: str, purpose: str, incident_ids: Sequence[str], hold: float
    ) -> Reservation: ...
    async def finish_deliveries(
        self,
        holder: str,
        recipient: str,
        purpose: str,
        incident_ids: Sequence[str],
        status: DeliveryStatus,
        message_id: str | None,
        detail: str | None,
    ) -> None: ...

    # -- the channel outbox: events to the org's webhooks and Slack --
    async def claim_channel_events(self, holder: str, limit: int, hold: float) -> list[ChannelJob]:
        """Hold up to `limit` due events for `hold` seconds, their channels' URL and secret opened."""
        ...

    async def finish_channel_event(self, holder: str, job: ChannelJob, outcome: ChannelOutcome) -> bool:
        """Record an attempt and its timeline event; False when the hold was lost (nothing written)."""
        ...

    async def next_channel_due(self) -> float | None: ...

    # -- Idempotency-Key for operator requests --
    async def begin_idempotent(
        self, operator: str, key: str, fingerprint: str, ttl: float, stale_after: float
    ) -> IdempotentRequest | None: ...
    async def finish_idempotent(self, operator: str, key: str, status: int, response: bytes) -> None: ...
    async def drop_idempotent(self, operator: str, key: str) -> None: ...

    # -- rate limits for unauthenticated requests --
    async def take_rates(self, buckets: Sequence[RateBucket]) -> RateRefusal | None:
        """Take one request from every bucket, or from none and say which had no room.

        Shared by every process that shares the store: on SQLite (one process) the buckets are kept
        in memory only; on PostgreSQL they are rows, so that replicas enforce one limit together.
        """
        ...

    # -- housekeeping and metrics --
    async def purge_reporter_metadata(self, finished_before: float) -> int: ...
    async def stats(self) -> StoreStats: ...

    # -- data keys --
    async def check_keys(self) -> None:
        """SealingError unless the configured data keys open what the store holds."""
        ...

    async def rewrap(self, batch: int = 500) -> RewrapReport: ...
