-- Uniqueness across aggregates: one user per e-mail address (compared by its normalised
-- key) and one product per SKU. The key is claimed by the same transaction that appends
-- the creating event, so a crash can never leave a key claimed without its event, or an
-- event without its key, and concurrent attempts are serialised by the primary key.

CREATE TABLE unique_keys (
    kind         text NOT NULL CHECK (kind IN ('email', 'sku')),
    key          text NOT NULL CHECK (key <> ''),
    aggregate_id text NOT NULL,
    position     bigint NOT NULL,
    PRIMARY KEY (kind, key)
);

CREATE FUNCTION hindsight_claim_unique_key() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    claim_kind text;
    claim_key  text;
    taken_code text;
BEGIN
    IF NEW.aggregate_type = 'user' AND NEW.event_type = 'UserRegistered' THEN
        claim_kind := 'email';
        taken_code := 'HK001';
        claim_key := COALESCE(NEW.payload -> 'UserRegistered' ->> 'email_key',
                              NEW.payload ->> 'email_key');
    ELSIF NEW.aggregate_type = 'product' AND NEW.event_type = 'ProductCreated' THEN
        claim_kind := 'sku';
        taken_code := 'HK002';
        claim_key := COALESCE(NEW.payload -> 'ProductCreated' ->> 'sku',
                              NEW.payload ->> 'sku');
    ELSE
        RETURN NULL;
    END IF;

    IF claim_key IS NULL THEN
        RAISE EXCEPTION '% event of % % carries no % key', NEW.event_type,
            NEW.aggregate_type, NEW.aggregate_id, claim_kind;
    END IF;

    INSERT INTO unique_keys (kind, key, aggregate_id, position)
    VALUES (claim_kind, claim_key, NEW.aggregate_id, NEW.position)
    ON CONFLICT DO NOTHING;

    IF NOT FOUND THEN
        -- A dedicated SQLSTATE per kind lets the writer answer EMAIL_TAKEN or SKU_TAKEN.
        RAISE EXCEPTION 'the % is already taken', claim_kind USING ERRCODE = taken_code;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_claim_unique_key
    AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION hindsight_claim_unique_key();
