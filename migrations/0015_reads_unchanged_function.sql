-- The condition an append carries when its command read other aggregates (placing an
-- order reads its products), as a function. Written inline in the INSERT, it made the
-- statement's plan depend on its array parameters: Postgres estimates an array parameter
-- at ten elements in a generic plan and at its real length in a custom one, so the
-- custom plan always looked cheaper and the whole INSERT (the event store's table, its
-- triggers and seven indexes) was planned again on every execution, about 0.17 ms of
-- planning per placement once the table held a thousand events or so. Behind a function
-- the INSERT's cost no longer depends on the reads, and it keeps one generic plan per
-- session.
--
-- What is checked is unchanged: none of the aggregates read holds an event after the
-- version read, counting only the event types that change what was read (`changed_by`,
-- comma-separated) or every type when that is NULL. The function is STABLE, so it sees
-- the snapshot of the INSERT that calls it, as the inline condition did. As in the chain
-- trigger (0012), its lookup keeps one generic plan that walks the primary key whatever
-- the table's size or statistics were when it was made.
CREATE FUNCTION hindsight_reads_unchanged(
    aggregate_types text[],
    aggregate_ids text[],
    versions bigint[],
    changed_by text[]
) RETURNS boolean
LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
AS $$
DECLARE
    reads int := coalesce(array_length(aggregate_ids, 1), 0);
BEGIN
    IF coalesce(array_length(aggregate_types, 1), 0) <> reads
       OR coalesce(array_length(versions, 1), 0) <> reads
       OR coalesce(array_length(changed_by, 1), 0) <> reads THEN
        RAISE EXCEPTION 'the reads of an append are given as arrays of one length'
            USING ERRCODE = 'HA003';
    END IF;
    FOR i IN 1 .. reads LOOP
        IF EXISTS (
            SELECT FROM events
            WHERE aggregate_type = aggregate_types[i]
              AND aggregate_id = aggregate_ids[i]
              AND sequence > versions[i]
              AND (changed_by[i] IS NULL
                   OR event_type = ANY (string_to_array(changed_by[i], ',')))
        ) THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN true;
END
$$;
