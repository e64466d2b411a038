-- leak-responder on PostgreSQL, migration 0002 (release 0.2.0).
--
-- sealed_key: the id of the data key that sealed token_sealed, so that a key check at start-up and
-- `leak-responder rewrap` know which rows each key holds. NULL on rows sealed before 0.2.0: those
-- are opened by trying every configured key, and `rewrap` gives them an id.
-- unconfirmed_at: when the incident became `unconfirmed`; its slow re-probes run for a window from
-- then (LEAK_RESPONDER_UNCONFIRMED_WINDOW).

ALTER TABLE incidents ADD COLUMN sealed_key text;
ALTER TABLE incidents ADD COLUMN unconfirmed_at double precision;
CREATE INDEX incidents_sealed ON incidents (sealed_key) WHERE token_sealed IS NOT NULL;
