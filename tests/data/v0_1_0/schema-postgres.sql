-- leak-responder on PostgreSQL, migration 0001: the initial schema.
--
-- Times are Unix epoch seconds as double precision, as in the SQLite schema, so that both backends
-- hand the pipeline the same floats and share their row conversion (service/store/common.py).
-- Every replica stamps times with its own clock: keep the hosts' clocks in sync (NTP), as the
-- leases (30 s by default) assume.
--
-- Migrations are additive: a release's schema must still serve the release before it, because a
-- rolling update runs both against the migrated database for a while.

CREATE TABLE alerts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reporter      text             NOT NULL,
    operator      text,
    received_at   double precision NOT NULL,
    body_sha256   text             NOT NULL,
    item_count    integer          NOT NULL,
    new_incidents integer          NOT NULL
);

CREATE TABLE incidents (
    id              text             PRIMARY KEY,
    token_hash      text             NOT NULL UNIQUE,
    redacted        text             NOT NULL,
    token_sealed    bytea,
    token_type      text             NOT NULL,
    state           text             NOT NULL,
    label           text,
    key_id          text,
    org_id          text,
    key_name        text,
    recipients      jsonb            NOT NULL DEFAULT '[]',
    created_at      double precision NOT NULL,
    matched_at      double precision,
    revoked_at      double precision,
    confirmed_at    double precision,
    notified_at     double precision,
    closed_at       double precision,
    next_run_at     double precision,
    lease_owner     text,
    lease_until     double precision,
    attempts        integer          NOT NULL DEFAULT 0,
    step_started_at double precision,
    revoke_reissued boolean          NOT NULL DEFAULT false,
    pages           text             NOT NULL DEFAULT '',
    last_reason     text
);
CREATE INDEX incidents_due ON incidents (next_run_at) WHERE next_run_at IS NOT NULL;
CREATE INDEX incidents_state ON incidents (state, created_at);
CREATE INDEX incidents_org ON incidents (org_id, created_at);
CREATE INDEX incidents_lease_owner ON incidents (lease_owner) WHERE lease_owner IS NOT NULL;

CREATE TABLE sightings (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id text             NOT NULL REFERENCES incidents (id),
    alert_id    bigint           NOT NULL REFERENCES alerts (id),
    reporter    text             NOT NULL,
    operator    text,
    url         text,
    source      text,
    token_type  text             NOT NULL,
    seen_at     double precision NOT NULL,
    note        text
);
CREATE INDEX sightings_incident ON sightings (incident_id);
CREATE INDEX sightings_reporter ON sightings (reporter, incident_id);
CREATE INDEX sightings_alert ON sightings (alert_id);

-- The audit trail: rows are only ever added. The triggers make that a property of the database,
-- not a convention of the code (TRUNCATE included).
CREATE TABLE events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id text             NOT NULL REFERENCES incidents (id),
    at          double precision NOT NULL,
    kind        text             NOT NULL,
    state       text,
    detail      jsonb            NOT NULL DEFAULT '{}'
);
CREATE INDEX events_incident ON events (incident_id, id);
CREATE FUNCTION events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only';
END
$$;
CREATE TRIGGER events_no_update_or_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_append_only();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_append_only();

-- The outbox: one row per incident, recipient and purpose (see schema_sqlite.sql).
CREATE TABLE deliveries (
    incident_id text             NOT NULL REFERENCES incidents (id),
    recipient   text             NOT NULL,
    purpose     text             NOT NULL,
    status      text             NOT NULL,
    holder      text,
    held_until  double precision,
    attempts    integer          NOT NULL DEFAULT 0,
    message_id  text,
    detail      text,
    updated_at  double precision NOT NULL,
    PRIMARY KEY (incident_id, recipient, purpose)
);

-- Idempotency-Key for operator requests (see schema_sqlite.sql).
CREATE TABLE idempotency (
    operator    text             NOT NULL,
    key         text             NOT NULL,
    fingerprint text             NOT NULL,
    state       text             NOT NULL,
    status      integer,
    response    bytea,
    started_at  double precision NOT NULL,
    expires_at  double precision NOT NULL,
    PRIMARY KEY (operator, key)
);
CREATE INDEX idempotency_expiry ON idempotency (expires_at);
