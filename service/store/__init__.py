"""Durable state: incidents, sightings, the append-only audit trail and leased work."""

from __future__ import annotations

from service.store.base import Store, StoreError
from service.store.common import RewrapReport
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
from service.store.sealing import Sealer, SealingError, embedded_key, key_id
from service.store.sqlite import SqliteStore

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
    "Percentiles",
    "RateBucket",
    "RateRefusal",
    "Reservation",
    "RewrapReport",
    "Sealer",
    "SealingError",
    "Sighting",
    "SqliteStore",
    "State",
    "Store",
    "StoreError",
    "StoreStats",
    "Timed",
    "TokenSighting",
    "Transition",
    "embedded_key",
    "key_id",
]
