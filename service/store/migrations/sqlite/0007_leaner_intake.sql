-- leak-responder, migration 0007: fewer index entries and no sequence row per row an alert writes.
--
-- A 10,000-token alert writes 10,000 incidents, 20,000 events and 10,000 sightings, and SQLite's
-- own work on them (each row and each index entry) was about half of the alert's time. Three
-- things in that work served nothing:
-- - `sightings_incident` (incident_id): `sightings_place` starts with incident_id and serves the
--   same lookups (an incident's sightings, the foreign key's checks).
-- - `incidents_org` held every incident, though only a matched key has an org: it now holds those
--   that have one, which is every row a lookup by org can find (`org_id = ?` implies it).
-- - AUTOINCREMENT on events and sightings: it reads and rewrites `sqlite_sequence` for every row,
--   to promise that an id is never used again after its row is deleted. Events are never deleted
--   (the triggers refuse it), and sightings' ids only order an incident's sightings: a new row
--   still gets an id above every row there is. The tables are rebuilt without it (SQLite cannot
--   drop it in place), keeping every row with its id, their indexes and the events' triggers.
-- The previous release runs on this schema as it did (it names no index and gives no id).

DROP INDEX sightings_incident;
DROP INDEX incidents_org;
CREATE INDEX incidents_org ON incidents (org_id, created_at) WHERE org_id IS NOT NULL;

CREATE TABLE events_0007 (
    id          INTEGER PRIMARY KEY,
    incident_id TEXT    NOT NULL REFERENCES incidents (id),
    at          REAL    NOT NULL,
    kind        TEXT    NOT NULL,
    state       TEXT,
    detail      TEXT    NOT NULL DEFAULT '{}'
);
INSERT INTO events_0007 (id, incident_id, at, kind, state, detail)
    SELECT id, incident_id, at, kind, state, detail FROM events;
-- The implicit DELETE of a DROP fires no trigger: the events' rows are copied above, not lost.
DROP TABLE events;
ALTER TABLE events_0007 RENAME TO events;
CREATE INDEX events_incident ON events (incident_id, id);
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;

CREATE TABLE sightings_0007 (
    id          INTEGER PRIMARY KEY,
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
INSERT INTO sightings_0007 (id, incident_id, alert_id, reporter, operator, url, source, token_type, seen_at, note)
    SELECT id, incident_id, alert_id, reporter, operator, url, source, token_type, seen_at, note FROM sightings;
DROP TABLE sightings;
ALTER TABLE sightings_0007 RENAME TO sightings;
CREATE INDEX sightings_reporter ON sightings (reporter, incident_id);
CREATE INDEX sightings_alert ON sightings (alert_id);
CREATE UNIQUE INDEX sightings_place ON sightings (incident_id, reporter, COALESCE(url, ''), COALESCE(source, ''));
