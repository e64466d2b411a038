-- leak-responder on PostgreSQL, migration 0006 (SQLite has its twin): when an `unconfirmed` key was last probed.
--
-- An unconfirmed key has two things due: its owner's urgent email and its hourly re-probe. With one
-- next_run_at, an email that kept failing (SMTP down) held the re-probes, and with them the page of
-- a window that ran out. probed_at is the time of the key's last probe since it became unconfirmed
-- (or of the attempt, when its token could not be opened): its re-probes are scheduled from it,
-- whatever the email does. Rows already unconfirmed take the time they became so: exact for a key
-- whose owner was not told yet (nothing re-probed those), and for a told one next_run_at still
-- holds its schedule.

ALTER TABLE incidents ADD COLUMN probed_at double precision;
UPDATE incidents SET probed_at = unconfirmed_at WHERE state = 'unconfirmed';
