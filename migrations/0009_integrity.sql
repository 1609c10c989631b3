-- Tamper evidence for the event store, verified by `hindsight_commands::integrity`.
--
-- 1. Every stream is a hash chain, computed here as each event is appended: `prev_hash` is
--    the `hash` of the same stream's event at sequence - 1 (32 zero bytes for sequence 1),
--    and `hash` is SHA-256 over this canonical encoding:
--
--        field(b) = int4 big-endian byte length of b || b
--        text     = its UTF-8 bytes;  int8 = 8 bytes big-endian;  uuid = its 16 bytes
--
--        hash = sha256( field('hindsight-event-v1') || field(prev_hash)
--                    || field(aggregate_type) || field(aggregate_id) || int8(sequence)
--                    || uuid(event_id) || field(event_type) || field(event_version)
--                    || field(payload::text) || field(metadata::text)
--                    || int8(position) || int8(recorded_at as microseconds since 1970-01-01 UTC) )
--
--    Every variable-length part carries its length, so two different events never encode
--    alike, and the leading tag keeps a future encoding from colliding with this one.
--    jsonb's text form is canonical (keys sorted, fixed spacing), so it is stable however
--    the writer formatted the JSON. `position` and `recorded_at` are covered as well: a
--    reordered global history or a back-dated event changes the event's own hash.
--
-- 2. `integrity_checkpoints` seals the global order. Checkpoint P covers every position in
--    (previous_position, P]:
--        chain     = sha256(previous checkpoint's chain (32 zero bytes for the first)
--                           || the hash of every event in the range, in position order)
--        signature = HMAC-SHA256(key, int8(P) || chain || int8(previous_position)
--                                     || int8(first) || int8(last) for each gap run)
--    where the gap runs are the positions of the range that held no event when it was
--    sealed (rolled-back appends). They let a verifier name the exact position of a deleted
--    or inserted event. The key never reaches the database.

-- The hash every stream's first event links to.
CREATE FUNCTION hindsight_chain_genesis() RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT decode(repeat('00', 32), 'hex') $$;

-- One length-prefixed part of the encoding.
CREATE FUNCTION hindsight_hash_field(value bytea) RETURNS bytea
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT int4send(octet_length(value)) || value $$;

-- The canonical hash of one event (see above). STRICT: a missing part yields NULL, which
-- the NOT NULL constraint on `hash` refuses, rather than a hash of something else.
CREATE FUNCTION hindsight_event_hash(
    prev_hash bytea,
    aggregate_type text,
    aggregate_id text,
    sequence bigint,
    event_id uuid,
    event_type text,
    event_version text,
    payload jsonb,
    metadata jsonb,
    event_position bigint,
    recorded_at timestamptz
) RETURNS bytea
LANGUAGE sql STABLE STRICT PARALLEL SAFE
AS $$
    SELECT sha256(
        hindsight_hash_field(convert_to('hindsight-event-v1', 'UTF8'))
        || hindsight_hash_field(prev_hash)
        || hindsight_hash_field(convert_to(aggregate_type, 'UTF8'))
        || hindsight_hash_field(convert_to(aggregate_id, 'UTF8'))
        || int8send(sequence)
        || uuid_send(event_id)
        || hindsight_hash_field(convert_to(event_type, 'UTF8'))
        || hindsight_hash_field(convert_to(event_version, 'UTF8'))
        || hindsight_hash_field(convert_to(payload::text, 'UTF8'))
        || hindsight_hash_field(convert_to(metadata::text, 'UTF8'))
        || int8send(event_position)
        || int8send((extract(epoch FROM recorded_at) * 1000000)::bigint)
    )
$$;

ALTER TABLE events ADD COLUMN prev_hash bytea, ADD COLUMN hash bytea;

-- Events stored before this migration get their chains here, each stream in sequence
-- order. The append-only guard is lifted for this one backfill only: the migration runs in
-- one transaction holding an exclusive lock on `events`, so no other session can write in
-- between. A stream with a hole in its sequences keeps it: the event after the hole links
-- to the event before it, and the verifier reports the hole.
ALTER TABLE events DISABLE TRIGGER events_append_only;

DO $$
DECLARE
    stored record;
    previous bytea;
    stream_type text;
    stream_id text;
BEGIN
    FOR stored IN
        SELECT aggregate_type, aggregate_id, sequence, event_id, event_type, event_version,
               payload, metadata, position, recorded_at
        FROM events
        ORDER BY aggregate_type, aggregate_id, sequence
    LOOP
        IF stored.aggregate_type IS DISTINCT FROM stream_type
           OR stored.aggregate_id IS DISTINCT FROM stream_id THEN
            previous := hindsight_chain_genesis();
            stream_type := stored.aggregate_type;
            stream_id := stored.aggregate_id;
        END IF;
        UPDATE events
        SET prev_hash = previous,
            hash = hindsight_event_hash(previous, stored.aggregate_type, stored.aggregate_id,
                                        stored.sequence, stored.event_id, stored.event_type,
                                        stored.event_version, stored.payload, stored.metadata,
                                        stored.position, stored.recorded_at)
        WHERE aggregate_type = stored.aggregate_type
          AND aggregate_id = stored.aggregate_id
          AND sequence = stored.sequence
        RETURNING hash INTO previous;
    END LOOP;
END
$$;

ALTER TABLE events ENABLE TRIGGER events_append_only;

ALTER TABLE events
    ALTER COLUMN prev_hash SET NOT NULL,
    ALTER COLUMN hash SET NOT NULL,
    ADD CONSTRAINT events_hash_length
        CHECK (octet_length(prev_hash) = 32 AND octet_length(hash) = 32);

-- Chains every appended event to its stream. Triggers of one kind fire in name order, so
-- `events_zchain` runs after `events_stamp` has set the position, id and time it hashes.
-- Whatever the writer put in `prev_hash` and `hash` is overwritten. An event whose
-- predecessor is not stored is refused (SQLSTATE HA002): sequences are consecutive, and a
-- writer only appends sequence n after reading a committed n - 1.
-- The predecessor lookup is planned afresh on every call: a plan cached while `events` was
-- small would scan the whole table for every row of a bulk append.
CREATE FUNCTION hindsight_events_chain() RETURNS trigger
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
BEGIN
    IF NEW.sequence = 1 THEN
        NEW.prev_hash := hindsight_chain_genesis();
    ELSE
        SELECT hash INTO NEW.prev_hash
        FROM events
        WHERE aggregate_type = NEW.aggregate_type
          AND aggregate_id = NEW.aggregate_id
          AND sequence = NEW.sequence - 1;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'event % of % % follows no stored event: sequences are consecutive',
                NEW.sequence, NEW.aggregate_type, NEW.aggregate_id
                USING ERRCODE = 'HA002';
        END IF;
    END IF;
    NEW.hash := hindsight_event_hash(NEW.prev_hash, NEW.aggregate_type, NEW.aggregate_id,
                                     NEW.sequence, NEW.event_id, NEW.event_type,
                                     NEW.event_version, NEW.payload, NEW.metadata,
                                     NEW.position, NEW.recorded_at);
    RETURN NEW;
END
$$;

CREATE TRIGGER events_zchain
    BEFORE INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION hindsight_events_chain();

COMMENT ON COLUMN events.prev_hash IS
    'hash of the same stream''s event at sequence - 1; 32 zero bytes for sequence 1';
COMMENT ON COLUMN events.hash IS
    'SHA-256 of the canonical encoding in migrations/0009_integrity.sql';

-- Signed checkpoints over the global order (see above). Written by
-- `hindsight_commands::integrity::record_checkpoint` only up to a position below which no
-- transaction can still commit an event. Append-only, like the events they seal.
CREATE TABLE integrity_checkpoints (
    position          bigint PRIMARY KEY CHECK (position >= 1),
    previous_position bigint NOT NULL UNIQUE
                      CHECK (previous_position >= 0 AND previous_position < position),
    gaps              int8range[] NOT NULL DEFAULT '{}',
    chain             bytea NOT NULL CHECK (octet_length(chain) = 32),
    signature         bytea NOT NULL CHECK (octet_length(signature) = 32),
    recorded_at       timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION hindsight_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % is refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'HA001';
END
$$;

CREATE TRIGGER integrity_checkpoints_append_only
    BEFORE UPDATE OR DELETE ON integrity_checkpoints
    FOR EACH ROW EXECUTE FUNCTION hindsight_append_only();

CREATE TRIGGER integrity_checkpoints_no_truncate
    BEFORE TRUNCATE ON integrity_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION hindsight_append_only();
