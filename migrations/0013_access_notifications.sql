-- Every change to a user's access is announced on channel `hindsight_access`, payload the
-- user's id, when the transaction that appended it commits. API processes keep the rows of
-- `user_access` they have read in memory (api/src/access.rs) and drop a user's row when
-- this arrives, so they need not query the table on every authenticated request.
--
-- Only role changes, password changes, deactivations and reactivations notify: a
-- registration creates a row nobody can have cached. These are rare, so the database-wide
-- lock a notifying transaction holds through its commit (see 0011) costs nothing here.
CREATE OR REPLACE FUNCTION hindsight_track_user_access() RETURNS trigger
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
            RETURN NULL;
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
            RETURN NULL;
    END CASE;
    PERFORM pg_notify('hindsight_access', NEW.aggregate_id);
    RETURN NULL;
END
$$;
