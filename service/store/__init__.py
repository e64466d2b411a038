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
        raise StoreError("PostgreSQL is not supported by this release; use sqlite:///PATH")
    return SqliteStore(path, Sealer(data_key_for(settings)))


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
    "open_store",
]
