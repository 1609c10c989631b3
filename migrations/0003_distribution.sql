-- Event distribution: how far the relay has published each stream, and how far each
-- projection has applied. Both advance only in the transaction that did the work.

CREATE TABLE relay_checkpoints (
    stream     text PRIMARY KEY,
    position   bigint NOT NULL DEFAULT 0 CHECK (position >= 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE projection_checkpoints (
    name       text PRIMARY KEY,
    position   bigint NOT NULL DEFAULT 0 CHECK (position >= 0),
    status     text NOT NULL DEFAULT 'catching_up'
               CHECK (status IN ('live', 'catching_up', 'rebuilding', 'failed')),
    last_error text,
    failed_position bigint,
    updated_at timestamptz NOT NULL DEFAULT now()
);
