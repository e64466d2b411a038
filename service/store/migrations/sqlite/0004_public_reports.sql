-- Public reports: nothing to create on SQLite.
--
-- On PostgreSQL, 0004 adds the `rate_buckets` table through which replicas share the public
-- reports' rate limits. A SQLite store belongs to one process, which keeps those buckets in its
-- memory only (so not even a hashed client name touches the disk); this file keeps the two
-- backends' migration numbers in step, so that `schema_migrations` reads the same on both.
SELECT 1;
