"""Durable state: incidents, sightings, the append-only audit trail and leased work."""

from __future__ import annotations

from pathlib import Path

from service.settings import Settings
from service.store.base import Store, StoreError
from service.store.models import (
    DELIVERY_FINAL,
    FINAL_STATES,
    AlertRecord,
    Delivery,
    DeliveryStatus,
    Event,
    IdempotencyState,
    IdempotentRequest,
    Incident,
    IncidentDetail,
    IncidentFilter,
    IncidentRef,
    Label,
    Reservation,
    Sighting,
    State,
    StoreStats,
    TokenSighting,
    Transition,
)
from service.store.sealing import Sealer, SealingError, embedded_key
from service.store.sqlite import SqliteStore


def data_key_for(settings: Settings) -> bytes:
    if settings.data_key is not None:
        return settings.data_key
    path = settings.sqlite_path
    assert path is not None, "settings require DATA_KEY without SQLite"
    return embedded_key(Path(f"{path}.key"))


def open_store(settings: Settings) -> Store:
    """The backend named by DATABASE_URL (not yet opened)."""
    path = settings.sqlite_path
    if path is None:
        # Imported here so that a SQLite deployment never loads the PostgreSQL driver.
        from service.store.postgres import PostgresStore

        return PostgresStore(
            settings.database_url, Sealer(data_key_for(settings)), pool_size=settings.database_pool_size
        )
    return SqliteStore(path, Sealer(data_key_for(settings)))


async def check_store(settings: Settings) -> None:
    """Open and close the store once: StoreError when it is unreachable or behind on migrations,
    so that a command can refuse to start with one line instead of a failed start-up's traceback."""
    store = open_store(settings)
    await store.open()
    await store.close()


async def migrate(settings: Settings) -> list[str]:
    """Apply pending migrations; the ones this call applied. SQLite migrates whenever it is opened,
    so for it this only opens the store."""
    if settings.sqlite_path is None:
        from service.store.migrations import migrate as migrate_postgres

        return [m.label for m in await migrate_postgres(settings.database_url)]
    await check_store(settings)
    return []


__all__ = [
    "DELIVERY_FINAL",
    "FINAL_STATES",
    "AlertRecord",
    "Delivery",
    "DeliveryStatus",
    "Event",
    "IdempotencyState",
    "IdempotentRequest",
    "Incident",
    "IncidentDetail",
    "IncidentFilter",
    "IncidentRef",
    "Label",
    "Reservation",
    "Sealer",
    "SealingError",
    "Sighting",
    "State",
    "Store",
    "StoreError",
    "StoreStats",
    "TokenSighting",
    "Transition",
    "check_store",
    "migrate",
    "open_store",
]
