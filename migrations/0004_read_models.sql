-- Read models: tables the projection workers fold the event stream into, and the queries
-- of the API read. Each belongs to one projection (see `projections/src/`) and holds
-- nothing that cannot be rebuilt from the events: a rebuild fills a copy made with
-- `CREATE TABLE <name>_<suffix> (LIKE <name> INCLUDING ALL)` and swaps it in, so every
-- index, default, check and generated column lives on the table itself.

-- Projection `users`. Never holds a password hash.
CREATE TABLE user_views (
    id         uuid PRIMARY KEY,
    email      text NOT NULL,
    name       text NOT NULL,
    role       text NOT NULL CHECK (role IN ('customer', 'admin', 'auditor', 'operator')),
    status     text NOT NULL CHECK (status IN ('active', 'deactivated')),
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    version    bigint NOT NULL CHECK (version >= 1)
);

CREATE INDEX user_views_created_idx ON user_views (created_at, id);
CREATE INDEX user_views_role_created_idx ON user_views (role, created_at, id);

-- Projection `products`. `search` serves the `q` text search over name and description;
-- the `simple` configuration neither stems nor drops words, so product names match as
-- typed, in any language.
CREATE TABLE product_views (
    id              uuid PRIMARY KEY,
    sku             text NOT NULL,
    name            text NOT NULL,
    description     text NOT NULL,
    price_amount    bigint NOT NULL CHECK (price_amount >= 0),
    price_currency  text NOT NULL,
    stock_available bigint NOT NULL CHECK (stock_available >= 0),
    stock_reserved  bigint NOT NULL CHECK (stock_reserved >= 0),
    status          text NOT NULL CHECK (status IN ('active', 'discontinued')),
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    version         bigint NOT NULL CHECK (version >= 1),
    search          tsvector GENERATED ALWAYS AS (
                        setweight(to_tsvector('simple'::regconfig, name), 'A')
                        || setweight(to_tsvector('simple'::regconfig, description), 'B')
                    ) STORED
);

CREATE INDEX product_views_search_idx ON product_views USING gin (search);
CREATE INDEX product_views_created_idx ON product_views (created_at, id);
CREATE INDEX product_views_price_idx ON product_views (price_amount, id);
CREATE INDEX product_views_name_idx ON product_views (name, id);

-- Projection `orders`. Lines are kept as placed (JSON array of the API's line shape):
-- they never change after placement and are always read whole.
CREATE TABLE order_views (
    id               uuid PRIMARY KEY,
    customer_id      uuid NOT NULL,
    status           text NOT NULL CHECK (status IN
                         ('pending', 'confirmed', 'rejected', 'paid', 'shipped', 'cancelled')),
    lines            jsonb NOT NULL,
    total_amount     bigint NOT NULL CHECK (total_amount >= 0),
    total_currency   text NOT NULL,
    rejection_reason text,
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    version          bigint NOT NULL CHECK (version >= 1)
);

CREATE INDEX order_views_created_idx ON order_views (created_at DESC, id DESC);
CREATE INDEX order_views_customer_created_idx
    ON order_views (customer_id, created_at DESC, id DESC);
CREATE INDEX order_views_status_created_idx ON order_views (status, created_at DESC, id DESC);

-- Projection `sales`: what each product sold in shipped orders. The lines of orders that
-- are placed but not yet shipped, cancelled or rejected wait in `product_sales_open_lines`
-- (OrderShipped itself carries no lines).
CREATE TABLE product_sales (
    product_id       uuid PRIMARY KEY,
    sku              text NOT NULL,
    name             text NOT NULL,
    currency         text NOT NULL,
    units_sold       bigint NOT NULL CHECK (units_sold >= 0),
    revenue_amount   bigint NOT NULL CHECK (revenue_amount >= 0),
    orders_shipped   bigint NOT NULL CHECK (orders_shipped >= 0),
    updated_at       timestamptz NOT NULL
);

CREATE INDEX product_sales_units_idx ON product_sales (units_sold DESC, product_id);

CREATE TABLE product_sales_open_lines (
    order_id   uuid NOT NULL,
    product_id uuid NOT NULL,
    quantity   bigint NOT NULL CHECK (quantity >= 1),
    line_total bigint NOT NULL CHECK (line_total >= 0),
    currency   text NOT NULL,
    PRIMARY KEY (order_id, product_id)
);

-- Projection `audit_trail`: one row per event, who did what to which entity and from
-- which request, with a sentence saying what changed. The product stock it keeps on the
-- side lets a sentence say what is available after a stock movement.
CREATE TABLE audit_trail (
    position       bigint PRIMARY KEY,
    event_id       uuid NOT NULL,
    recorded_at    timestamptz NOT NULL,
    actor_id       uuid,
    actor_role     text NOT NULL,
    request_id     text NOT NULL,
    correlation_id text NOT NULL,
    causation_id   text NOT NULL,
    aggregate_type text NOT NULL,
    aggregate_id   text NOT NULL,
    event_type     text NOT NULL,
    summary        text NOT NULL
);

CREATE INDEX audit_trail_actor_idx ON audit_trail (actor_id, position);
CREATE INDEX audit_trail_entity_idx ON audit_trail (aggregate_type, aggregate_id, position);
CREATE INDEX audit_trail_recorded_at_idx ON audit_trail (recorded_at);

CREATE TABLE audit_trail_product_stock (
    product_id      uuid PRIMARY KEY,
    stock_available bigint NOT NULL CHECK (stock_available >= 0)
);
