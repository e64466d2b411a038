-- leak-responder schema, version 1. Times are Unix seconds (REAL).

CREATE TABLE alerts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    reporter      TEXT    NOT NULL,
    operator      TEXT,
    received_at   REAL    NOT NULL,
    body_sha256   TEXT    NOT NULL,
    item_count    INTEGER NOT NULL,
    new_incidents INTEGER NOT NULL
);

CREATE TABLE incidents (
    id              TEXT    PRIMARY KEY,
    token_hash      TEXT    NOT NULL UNIQUE,
    redacted        TEXT    NOT NULL,
    token_sealed    BLOB,
    token_type      TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    label           TEXT,
    key_id          TEXT,
    org_id          TEXT,
    key_name        TEXT,
    recipients      TEXT    NOT NULL DEFAULT '[]',
    created_at      REAL    NOT NULL,
    matched_at      REAL,
    revoked_at      REAL,
    confirmed_at    REAL,
    notified_at     REAL,
    closed_at       REAL,
    next_run_at     REAL,
    lease_owner     TEXT,
    lease_until     REAL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    step_started_at REAL,
    revoke_reissued INTEGER NOT NULL DEFAULT 0,
    pages           TEXT    NOT NULL DEFAULT '',
    last_reason     TEXT
);
CREATE INDEX incidents_due ON incidents (next_run_at) WHERE next_run_at IS NOT NULL;
CREATE INDEX incidents_state ON incidents (state, created_at);
CREATE INDEX incidents_org ON incidents (org_id, created_at);

CREATE TABLE sightings (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id TEXT    NOT NULL REFERENCES incidents (id),
    alert_id    INTEGER NOT NULL REFERENCES alerts (id),
    reporter    TEXT    NOT NULL,
    operator    TEXT,
    url         TEXT,
    source      TEXT,
    token_type  TEXT    NOT NULL,
    seen_at     REAL    NOT NULL,
    note        TEXT
);
CREATE INDEX sightings_incident ON sightings (incident_id);
CREATE INDEX sightings_reporter ON sightings (reporter, incident_id);
CREATE INDEX sightings_alert ON sightings (alert_id);

-- The audit trail: rows are only ever added. The triggers make that a property of the database,
-- not a convention of the code.
CREATE TABLE events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id TEXT    NOT NULL REFERENCES incidents (id),
    at          REAL    NOT NULL,
    kind        TEXT    NOT NULL,
    state       TEXT,
    detail      TEXT    NOT NULL DEFAULT '{}'
);
CREATE INDEX events_incident ON events (incident_id, id);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;

-- The outbox: one row per incident, recipient and purpose, so that each is told exactly once
-- through retries, restarts and replicas. A sender holds rows under a lease while it sends; a row
-- still `sending` after its lease ran out is one whose outcome is unknown (the sender died).
CREATE TABLE deliveries (
    incident_id    TEXT    NOT NULL REFERENCES incidents (id),
    recipient      TEXT    NOT NULL,
    purpose        TEXT    NOT NULL,
    status         TEXT    NOT NULL,
    holder         TEXT,
    held_until     REAL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    message_id     TEXT,
    detail         TEXT,
    updated_at     REAL    NOT NULL,
    PRIMARY KEY (incident_id, recipient, purpose)
);

-- Idempotency-Key (draft-ietf-httpapi-idempotency-key-header) for operator requests: the first
-- request with a key runs and its response is kept, so a retry of it replays that response instead
-- of reporting twice. `fingerprint` tells a retry from a different request that reused the key.
CREATE TABLE idempotency (
    operator    TEXT    NOT NULL,
    key         TEXT    NOT NULL,
    fingerprint TEXT    NOT NULL,
    state       TEXT    NOT NULL,
    status      INTEGER,
    response    BLOB,
    started_at  REAL    NOT NULL,
    expires_at  REAL    NOT NULL,
    PRIMARY KEY (operator, key)
);
CREATE INDEX idempotency_expiry ON idempotency (expires_at);
