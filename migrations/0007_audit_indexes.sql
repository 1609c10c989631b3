-- Indexes for the audit feed and export, which filter the event store by who acted, by
-- the request chain, and by aggregate id alone (without its type), in position order.

CREATE INDEX events_actor_idx ON events ((metadata ->> 'actor_id'), position);
CREATE INDEX events_correlation_idx ON events ((metadata ->> 'correlation_id'), position);
CREATE INDEX events_aggregate_id_idx ON events (aggregate_id, position);
