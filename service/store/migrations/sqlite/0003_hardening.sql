-- leak-responder, migration 0003 (hardening): a replayed alert is one alert, a sighting is one per place; a heartbeat table for readiness.
--
-- A captured signed alert sent again and again used to add an alert row and a sighting each time.
-- Now an alert is unique per (reporter, body_sha256), a sighting per (incident, reporter, url,
-- source): intake inserts with ON CONFLICT DO NOTHING. Rows already duplicated collapse onto the
-- first one (the sightings of a duplicate alert follow it to the first), then the indexes hold.
-- A missing url or source counts as one value, hence COALESCE in the index. Public reports are
-- not replays of one body (their record is the hash of the keys they held, the same for every
-- report holding none), and each one is recorded, so that every answer costs the same write:
-- the alerts' index leaves them out.

DELETE FROM sightings WHERE id NOT IN (
    SELECT min(id) FROM sightings GROUP BY incident_id, reporter, COALESCE(url, ''), COALESCE(source, '')
);
UPDATE sightings SET alert_id = (
    SELECT min(first.id) FROM alerts this JOIN alerts first
        ON first.reporter = this.reporter AND first.body_sha256 = this.body_sha256
    WHERE this.id = sightings.alert_id
) WHERE reporter <> 'public';
DELETE FROM alerts WHERE reporter <> 'public' AND id NOT IN (
    SELECT min(id) FROM alerts WHERE reporter <> 'public' GROUP BY reporter, body_sha256
);
CREATE UNIQUE INDEX alerts_replay ON alerts (reporter, body_sha256) WHERE reporter <> 'public';
CREATE UNIQUE INDEX sightings_place ON sightings (incident_id, reporter, COALESCE(url, ''), COALESCE(source, ''));

-- heartbeat: readiness commits here, through the path every alert takes, so /readyz answers what
-- the next alert would meet (a full disk, an unwritable WAL, a lock held elsewhere).
CREATE TABLE heartbeat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at REAL    NOT NULL
);
