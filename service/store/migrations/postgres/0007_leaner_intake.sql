-- leak-responder, migration 0007: fewer index entries per row an alert writes.
--
-- A big alert writes an incident, two events and a sighting per token, and the database's work
-- on each row and each index entry is most of its time. Two indexes served nothing:
-- - `sightings_incident` (incident_id): `sightings_place` starts with incident_id and serves the
--   same lookups (an incident's sightings, the foreign key's checks).
-- - `incidents_org` held every incident, though only a matched key has an org: it now holds those
--   that have one, which is every row a lookup by org can find (`org_id = $1` implies it).
-- (SQLite's migration also drops AUTOINCREMENT from events and sightings; an identity column has
-- no such cost.) The previous release runs on this schema as it did (it names no index). Building
-- the partial index holds writes to incidents for one scan of the table (in the migration's
-- transaction, so not CONCURRENTLY).

DROP INDEX sightings_incident;
DROP INDEX incidents_org;
CREATE INDEX incidents_org ON incidents (org_id, created_at) WHERE org_id IS NOT NULL;
