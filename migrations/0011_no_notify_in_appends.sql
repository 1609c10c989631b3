-- Appends no longer notify in their own transaction.
--
-- A transaction that has queued a NOTIFY takes a database-wide lock at commit and keeps
-- it until its commit record is flushed, so every append committed one WAL flush after
-- another instead of sharing flushes with its neighbours. With pgbench on two cores,
-- single-row inserts of an event-sized row fell from about 13,000 to 5,000 per second at 8
-- clients (17,900 to 4,300 at 32) when the table had a statement-level trigger calling
-- pg_notify. The write path now announces its appends after they commit, from a separate
-- transaction that needs no flush (commands/src/wakeup.rs); the relay still polls.
DROP TRIGGER events_notify ON events;
DROP FUNCTION hindsight_events_notify();
