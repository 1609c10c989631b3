-- Projection rebuilds: progress of the latest rebuild of each projection, so operators can
-- watch it from any process (`GET /admin/projections/{name}`, `hindsight projections status`).

CREATE TABLE projection_rebuilds (
    name          text PRIMARY KEY,
    status        text NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    target        bigint NOT NULL DEFAULT 0,
    position      bigint NOT NULL DEFAULT 0,
    events_done   bigint NOT NULL DEFAULT 0,
    differences   jsonb,
    error         text,
    started_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);
