-- Channels (the org's webhooks and Slack) and what the lookup says of a key besides its owner.
--
-- `channels` holds, per incident, the org's channels as the lookup gave them: URL and secret sealed
-- with the data key (AES-256-GCM, the incident and channel ids as associated data), `sealed_key`
-- naming the data key that sealed them so that a rewrap finds what to reseal.
-- `channel_events` is the outbox: one row per incident, channel and state, written in the same
-- transaction as the transition to that state, so each event is sent once through restarts and
-- replicas; `seq` orders a channel's events of one incident (matched, revoked, unconfirmed,
-- confirmed), and an event waits while an earlier one is unsettled. `next_attempt_at` is set while the row still has to go out (while a sender holds it,
-- the end of its hold): a row found `sending` past it is one whose sender died mid-send.

ALTER TABLE incidents ADD COLUMN key_created_at REAL;
ALTER TABLE incidents ADD COLUMN key_last_used_at REAL;
ALTER TABLE incidents ADD COLUMN org_name TEXT;

CREATE TABLE channels (
    incident_id   TEXT    NOT NULL REFERENCES incidents (id),
    channel_id    TEXT    NOT NULL,
    type          TEXT    NOT NULL,
    url_sealed    BLOB    NOT NULL,
    secret_sealed BLOB,
    sealed_key    TEXT    NOT NULL,
    disabled_at   REAL,
    PRIMARY KEY (incident_id, channel_id)
);

CREATE TABLE channel_events (
    incident_id     TEXT    NOT NULL,
    channel_id      TEXT    NOT NULL,
    state           TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    status          TEXT    NOT NULL,
    holder          TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    created_at      REAL    NOT NULL,
    updated_at      REAL    NOT NULL,
    last_status     INTEGER,
    reason          TEXT,
    PRIMARY KEY (incident_id, channel_id, state),
    FOREIGN KEY (incident_id, channel_id) REFERENCES channels (incident_id, channel_id)
);
CREATE INDEX channel_events_due ON channel_events (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
