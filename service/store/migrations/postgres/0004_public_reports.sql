-- Rate buckets for unauthenticated requests (public reports), shared by every replica.
--
-- One row per bucket: `key` is "global" or a client's keyed hash (HMAC under a key derived from the
-- data key and rotated daily; never an address), `tat` the epoch second at which the bucket is full
-- again (GCRA). UNLOGGED: a rate counter is not worth a WAL write per request, and losing the table
-- in a server crash only hands every client a full bucket. Rows idle past their `tat` are deleted.
CREATE UNLOGGED TABLE rate_buckets (
    key text PRIMARY KEY,
    tat double precision NOT NULL
);
