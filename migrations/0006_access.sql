-- Access control state the API checks on every request.
--
-- `user_access` is maintained by a trigger in the same transaction that appends a user's
-- events, so a password change, role change or deactivation takes effect the moment it
-- commits: an access token is valid only while its `ver` claim equals `token_version`
-- and the user is active.

CREATE TABLE user_access (
    user_id       uuid PRIMARY KEY,
    role          text NOT NULL,
    active        boolean NOT NULL,
    token_version bigint NOT NULL DEFAULT 1
);

CREATE FUNCTION hindsight_track_user_access() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    body jsonb := NEW.payload -> NEW.event_type;
BEGIN
    IF NEW.aggregate_type <> 'user' THEN
        RETURN NULL;
    END IF;
    CASE NEW.event_type
        WHEN 'UserRegistered' THEN
            INSERT INTO user_access (user_id, role, active)
            VALUES (NEW.aggregate_id::uuid, body ->> 'role', true);
        WHEN 'UserRoleAssigned' THEN
            UPDATE user_access SET role = body ->> 'role', token_version = token_version + 1
            WHERE user_id = NEW.aggregate_id::uuid;
        WHEN 'UserPasswordChanged' THEN
            UPDATE user_access SET token_version = token_version + 1
            WHERE user_id = NEW.aggregate_id::uuid;
        WHEN 'UserDeactivated' THEN
            UPDATE user_access SET active = false, token_version = token_version + 1
            WHERE user_id = NEW.aggregate_id::uuid;
        WHEN 'UserReactivated' THEN
            UPDATE user_access SET active = true
            WHERE user_id = NEW.aggregate_id::uuid;
        ELSE
            NULL;
    END CASE;
    RETURN NULL;
END
$$;

CREATE TRIGGER events_track_user_access
    AFTER INSERT ON events
    FOR EACH ROW EXECUTE FUNCTION hindsight_track_user_access();

-- Refresh tokens: opaque random values stored only as SHA-256 hashes. Every refresh spends
-- its token and issues the next one in the same family; presenting a spent token revokes
-- the whole family. A family has an absolute expiry that rotation never extends.
CREATE TABLE refresh_tokens (
    token_hash  bytea PRIMARY KEY,
    family_id   uuid NOT NULL,
    user_id     uuid NOT NULL,
    issued_at   timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    spent_at    timestamptz
);

CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user_idx ON refresh_tokens (user_id);

CREATE TABLE refresh_families (
    family_id  uuid PRIMARY KEY,
    user_id    uuid NOT NULL,
    revoked_at timestamptz
);

CREATE INDEX refresh_families_user_idx ON refresh_families (user_id);

-- Idempotency keys, scoped to the user, expiring after a configured time.
CREATE TABLE idempotency_keys (
    user_id          uuid NOT NULL,
    key              text NOT NULL,
    request_hash     bytea NOT NULL,
    status           text NOT NULL CHECK (status IN ('in_progress', 'done')),
    response_status  smallint,
    response_headers jsonb,
    response_body    bytea,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (user_id, key)
);

CREATE INDEX idempotency_keys_expires_idx ON idempotency_keys (expires_at);
