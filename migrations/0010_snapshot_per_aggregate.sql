-- One snapshot row per aggregate (postgres-es's own model: it updates that row in place).
-- The write path upserts it; the unique index makes concurrent first snapshots of one
-- aggregate collapse into one row instead of two.
DELETE FROM snapshots s
 USING snapshots newer
 WHERE newer.aggregate_type = s.aggregate_type
   AND newer.aggregate_id = s.aggregate_id
   AND newer.last_sequence > s.last_sequence;

CREATE UNIQUE INDEX snapshots_one_per_aggregate ON snapshots (aggregate_type, aggregate_id);
