-- The event store: postgres-es's `events` and `snapshots` tables, extended with what
-- Hindsight needs on every event: a global position, an event id, the time it was
-- recorded, and the id of the transaction that wrote it (the relay uses it to publish a
-- late-committing transaction's events in order instead of skipping them).

CREATE SEQUENCE events_position_seq AS bigint START WITH 1 NO CYCLE;

CREATE TABLE events (
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    sequence       bigint NOT NULL CHECK (sequence >= 1),
    event_type     text   NOT NULL,
    event_version  text   NOT NULL,
    payload        jsonb  NOT NULL,
    metadata       jsonb  NOT NULL,
    position       bigint NOT NULL,
    event_id       uuid   NOT NULL,
    recorded_at    timestamptz NOT NULL,
    transaction_id xid8   NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence),
    CONSTRAINT events_position_key UNIQUE (position),
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);

ALTER SEQUENCE events_position_seq OWNED BY events.position;

CREATE TABLE snapshots (
    aggregate_type   text   NOT NULL,
    aggregate_id     text   NOT NULL,
    last_sequence    bigint NOT NULL CHECK (last_sequence >= 0),
    current_snapshot bigint NOT NULL CHECK (current_snapshot >= 0),
    payload          jsonb  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- Every column Hindsight adds is set here, never by the writer. The transaction id is
-- taken (which assigns one if the transaction has none yet) *before* the position is
-- drawn, so any transaction holding a position is visible in every later snapshot's
-- in-progress list: that is what lets the relay tell "not committed yet" from "rolled back".
CREATE FUNCTION hindsight_events_stamp() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.transaction_id := pg_current_xact_id();
    NEW.position := nextval('events_position_seq');
    NEW.event_id := gen_random_uuid();
    NEW.recorded_at := clock_timestamp();
    RETURN NEW;
END
$$;

CREATE TRIGGER events_stamp
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION hindsight_events_stamp();

-- History is append-only: the database itself refuses to change or remove an event.
CREATE FUNCTION hindsight_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the event store is append-only: % on events is refused', TG_OP
        USING ERRCODE = 'HA001';
END
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION hindsight_events_append_only();

CREATE TRIGGER events_no_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION hindsight_events_append_only();

-- Committed appends wake the relay at once (delivered at commit, one per transaction).
CREATE FUNCTION hindsight_events_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hindsight_events', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER events_notify
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION hindsight_events_notify();

CREATE INDEX events_recorded_at_idx ON events (recorded_at);
