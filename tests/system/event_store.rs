//! The event store: migrations, the append-only guard, positions and metadata,
//! optimistic concurrency, snapshots, and uniqueness under concurrency.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::join_all;
use hindsight_commands::{
    Actor, AggregateStore, CommandBus, EventMetadata, Executed, ReadAt, Refusal, StoreError,
    StoreSettings, UniqueKey,
};
use hindsight_domain::ids::{OrderId, ProductId, UserId};
use hindsight_domain::order::{NewOrderLine, Order, OrderCommand, OrderError};
use hindsight_domain::product::{self, Product, ProductCommand, ProductError};
use hindsight_domain::role::Role;
use hindsight_domain::user::{PasswordHash, UserCommand};
use hindsight_domain::values::{
    Currency, Description, Email, Money, PersonName, ProductName, Quantity, Sku,
};
use hindsight_tests::TestDb;
use sqlx::Row;

fn metadata(request: &str) -> EventMetadata {
    EventMetadata::for_request(Actor::system(), request)
}

fn register(user_id: UserId, email: &str) -> UserCommand {
    UserCommand::Register {
        user_id,
        email: Email::parse(email).unwrap(),
        name: PersonName::parse("Ann Example").unwrap(),
        password_hash: PasswordHash::new("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".to_owned())
            .unwrap(),
        role: Role::Customer,
    }
}

/// Registers a new user through `commands`; answers its id.
async fn registered(commands: &CommandBus, email: &str, request: &str) -> UserId {
    let user = UserId::new();
    commands
        .users
        .execute(
            user.as_uuid(),
            register(user, email),
            &metadata(request),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    user
}

/// Creates a product through `commands` with `stock` units; answers its id.
async fn created_product(commands: &CommandBus, sku: &str, stock: u32) -> ProductId {
    let product = ProductId::new();
    commands
        .products
        .execute(
            product.as_uuid(),
            create_product(product, sku, stock),
            &metadata("c"),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    product
}

/// Restocks product `id` by `quantity`, `times` times, one command after another.
async fn restock_times(commands: &CommandBus, id: uuid::Uuid, quantity: u32, times: usize) {
    for n in 0..times {
        commands
            .products
            .execute(id, restock(quantity), &metadata(&format!("r{n}")), None)
            .await
            .unwrap()
            .unwrap();
    }
}

/// Restocks product `id` by 1, 2, … `count` units, all at once; answers each outcome.
async fn concurrent_restocks(
    commands: &Arc<CommandBus>,
    id: uuid::Uuid,
    count: u32,
) -> Vec<Result<Result<Executed, Refusal<ProductError>>, StoreError>> {
    join_all((1..=count).map(|n| {
        let commands = Arc::clone(commands);
        async move {
            commands
                .products
                .execute(id, restock(n), &metadata(&format!("r{n}")), None)
                .await
        }
    }))
    .await
}

/// The sequences stored for aggregate `id`, in order.
async fn sequences_of(db: &TestDb, id: uuid::Uuid) -> Vec<i64> {
    sqlx::query_scalar("SELECT sequence FROM events WHERE aggregate_id = $1 ORDER BY sequence")
        .bind(id.to_string())
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

fn create_product(product_id: ProductId, sku: &str, stock: u32) -> ProductCommand {
    ProductCommand::Create {
        product_id,
        sku: Sku::parse(sku).unwrap(),
        name: ProductName::parse("Widget").unwrap(),
        description: Description::parse("A widget").unwrap(),
        price: Money::new(1999, Currency::parse("EUR").unwrap()).unwrap(),
        stock,
    }
}

fn restock(quantity: u32) -> ProductCommand {
    ProductCommand::Restock {
        quantity: Quantity::new(quantity).unwrap(),
    }
}

/// Tables, columns, constraints and triggers of the public schema, as one string.
async fn schema_fingerprint(db: &TestDb) -> String {
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT table_name || '.' || column_name || ':' || data_type || ':' || is_nullable \
           FROM information_schema.columns WHERE table_schema = 'public' \
         UNION ALL SELECT conrelid::regclass::text || ':' || conname FROM pg_constraint \
           WHERE connamespace = 'public'::regnamespace \
         UNION ALL SELECT tgrelid::regclass::text || ':' || tgname FROM pg_trigger \
           WHERE NOT tgisinternal \
         ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    rows.join("\n")
}

#[tokio::test]
async fn migrating_an_up_to_date_database_changes_nothing() {
    let db = TestDb::new().await;
    let before = schema_fingerprint(&db).await;
    let migrations_before: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&db.pool)
        .await
        .unwrap();

    let report = hindsight_commands::db::migrate(&db.pool).await.unwrap();

    assert!(
        report.applied.is_empty(),
        "applied again: {:?}",
        report.applied
    );
    assert_eq!(schema_fingerprint(&db).await, before);
    let migrations_after: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(migrations_after, migrations_before);
    assert!(hindsight_commands::db::is_up_to_date(&db.pool)
        .await
        .unwrap());
}

#[tokio::test]
async fn the_database_refuses_to_change_history() {
    let db = TestDb::new().await;
    let commands = db.commands(StoreSettings::default());
    registered(&commands, "ann@example.com", "r1").await;

    for statement in [
        "UPDATE events SET payload = '{}'::jsonb",
        "DELETE FROM events",
        "TRUNCATE events",
    ] {
        let error = sqlx::query(statement)
            .execute(&db.pool)
            .await
            .expect_err(statement);
        let code = error
            .as_database_error()
            .and_then(|db| db.code())
            .map(|code| code.into_owned());
        assert_eq!(code.as_deref(), Some("HA001"), "{statement}: {error}");
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
}

#[tokio::test]
async fn the_store_stamps_position_id_time_and_transaction_itself() {
    let db = TestDb::new().await;
    // A writer cannot choose the position, id or time of an event.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                             payload, metadata, position, event_id, recorded_at, transaction_id) \
         VALUES ('test', 'x', 1, 'Tested', '1', '{}', '{}', 999999, \
                 '00000000-0000-0000-0000-000000000000', '2000-01-01', '1')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let row = sqlx::query(
        "SELECT position, event_id::text AS event_id, recorded_at > now() - interval '1 minute' AS fresh, \
                transaction_id::text::bigint > 1 AS real_xid FROM events",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_ne!(row.get::<i64, _>("position"), 999999);
    assert_ne!(
        row.get::<String, _>("event_id"),
        "00000000-0000-0000-0000-000000000000"
    );
    assert!(row.get::<bool, _>("fresh"));
    assert!(row.get::<bool, _>("real_xid"));
}

#[tokio::test]
async fn commands_answer_their_version_and_global_position_and_store_typed_metadata() {
    let db = TestDb::new().await;
    let commands = db.commands(StoreSettings::default());
    let user = UserId::new();
    let first_metadata = EventMetadata::for_request(Actor::anonymous(), "req-register");
    let registered = commands
        .users
        .execute(
            user.as_uuid(),
            register(user, "bob@example.com"),
            &first_metadata,
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(registered.version, 1);
    assert_eq!(registered.appended, 1);

    let rename_metadata =
        EventMetadata::for_request(Actor::user(user.as_uuid(), Role::Customer), "req-rename");
    let renamed = commands
        .users
        .execute(
            user.as_uuid(),
            UserCommand::ChangeName {
                name: PersonName::parse("Bob Renamed").unwrap(),
            },
            &rename_metadata,
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(renamed.version, 2);
    assert!(renamed.position > registered.position);

    // A no-op answers the current version and position and appends nothing.
    let same = commands
        .users
        .execute(
            user.as_uuid(),
            UserCommand::ChangeName {
                name: PersonName::parse("Bob Renamed").unwrap(),
            },
            &rename_metadata,
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (same.version, same.position, same.appended),
        (2, renamed.position, 0)
    );

    let rows = sqlx::query(
        "SELECT sequence, position, metadata FROM events \
         WHERE aggregate_type = 'user' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(user.to_string())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<i64, _>("position"), registered.position);
    assert_eq!(rows[1].get::<i64, _>("position"), renamed.position);
    let stored: serde_json::Value = rows[1].get("metadata");
    assert_eq!(
        EventMetadata::from_json_text(&stored.to_string()).unwrap(),
        rename_metadata
    );
}

#[tokio::test]
async fn stored_events_read_alike_from_jsonb_and_json_in_either_wire_format() {
    use hindsight_commands::event::{read_events, StoredEvent, EVENT_COLUMNS};
    let db = TestDb::new().await;
    let commands = db.commands(StoreSettings::default());
    registered(&commands, "json@example.com", "req-json-1").await;
    let product = ProductId::new();
    for command in [create_product(product, "JSON-1", 3), restock(4)] {
        commands
            .products
            .execute(product.as_uuid(), command, &metadata("req-json-2"), None)
            .await
            .unwrap()
            .unwrap();
    }
    let events = read_events(&db.pool, 0, i64::MAX, 100).await.unwrap();
    assert_eq!(events.len(), 3);
    assert!(events[2].payload.get().contains("ProductRestocked"));

    // `json` columns in the binary format carry no version byte.
    let as_json = EVENT_COLUMNS.replace(
        "payload, metadata",
        "payload::json AS payload, metadata::json AS metadata",
    );
    let decoded = |rows: Vec<sqlx::postgres::PgRow>| -> Vec<StoredEvent> {
        rows.iter()
            .map(|row| StoredEvent::from_row(row).unwrap())
            .collect()
    };
    let rows = sqlx::query(&format!("SELECT {as_json} FROM events ORDER BY position"))
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(decoded(rows), events);

    // A simple query answers in the text format.
    let rows = sqlx::raw_sql(&format!(
        "SELECT {EVENT_COLUMNS} FROM events ORDER BY position"
    ))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(decoded(rows), events);
}

#[tokio::test]
async fn refusals_and_stale_versions_append_nothing() {
    let db = TestDb::new().await;
    let commands = db.commands(StoreSettings::default());
    let product = ProductId::new();
    commands
        .products
        .execute(
            product.as_uuid(),
            create_product(product, "SKU-1", 5),
            &metadata("r1"),
            None,
        )
        .await
        .unwrap()
        .unwrap();

    let refused = commands
        .products
        .execute(
            product.as_uuid(),
            create_product(product, "SKU-1", 5),
            &metadata("r2"),
            None,
        )
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(refused, Refusal::Rule(ProductError::ProductAlreadyExists)),
        "{refused:?}"
    );

    let stale = commands
        .products
        .execute(product.as_uuid(), restock(1), &metadata("r3"), Some(7))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(stale, Refusal::VersionMismatch { expected: 7 });

    let current = commands
        .products
        .execute(product.as_uuid(), restock(1), &metadata("r4"), Some(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(current.version, 2);

    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
        .bind(product.to_string())
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(count, 2);
}

#[tokio::test]
async fn concurrent_commands_on_one_aggregate_are_all_applied_once() {
    let db = TestDb::new().await;
    let commands = Arc::new(db.commands(StoreSettings {
        max_attempts: 50,
        ..StoreSettings::default()
    }));
    let product = created_product(&commands, "SKU-C", 0).await;

    let results = concurrent_restocks(&commands, product.as_uuid(), 20).await;
    for result in results {
        result.unwrap().unwrap();
    }

    let loaded = commands
        .products
        .load(product.as_uuid())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(loaded.version, 21);
    assert_eq!(loaded.state.stock_available(), (1..=20u64).sum::<u64>());
    let sequences = sequences_of(&db, product.as_uuid()).await;
    assert_eq!(sequences, (1..=21).collect::<Vec<i64>>());
}

#[tokio::test]
async fn commands_on_one_aggregate_in_one_process_take_turns_without_conflicts() {
    // One attempt each: a command that lost a race to another in this process would be
    // refused for contention. Reads run among them and must not disturb the queue.
    let db = TestDb::new().await;
    let commands = Arc::new(db.commands(StoreSettings {
        max_attempts: 1,
        ..StoreSettings::default()
    }));
    let id = created_product(&commands, "SKU-TURNS", 0).await.as_uuid();

    let writes = concurrent_restocks(&commands, id, 40);
    let reads = join_all((0..10).map(|_| {
        let commands = Arc::clone(&commands);
        async move { commands.products.load(id).await }
    }));
    let (written, read) = futures::join!(writes, reads);
    let mut versions: Vec<u64> = written
        .into_iter()
        .map(|result| result.unwrap().expect("no command lost a race").version)
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (2..=41).collect::<Vec<u64>>());
    for loaded in read {
        assert!(loaded.unwrap().is_some());
    }

    let loaded = commands.products.load(id).await.unwrap().unwrap();
    assert_eq!(loaded.version, 41);
    assert_eq!(loaded.state.stock_available(), (1..=40u64).sum::<u64>());
    // No append was refused: a refused one would have used up a position.
    let (events, highest): (i64, i64) =
        sqlx::query_as("SELECT count(*), max(position) FROM events")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(events, 41);
    assert_eq!(highest, 41, "a refused append left a gap in the positions");
}

#[tokio::test]
async fn snapshots_bound_what_a_load_replays() {
    let db = TestDb::new().await;
    let commands = db.commands(StoreSettings {
        snapshot_every: 10,
        ..StoreSettings::default()
    });
    let product = created_product(&commands, "SKU-S", 0).await;
    restock_times(&commands, product.as_uuid(), 2, 34).await;
    let last_sequence: i64 = sqlx::query_scalar(
        "SELECT last_sequence FROM snapshots WHERE aggregate_type = 'product' AND aggregate_id = $1",
    )
    .bind(product.to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(last_sequence, 30);

    let loaded = commands
        .products
        .load(product.as_uuid())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(loaded.version, 35);
    assert_eq!(loaded.state.stock_available(), 68);
}

/// The first array under key `settled` in `value`, anywhere.
fn settled_list(value: &mut serde_json::Value) -> Option<&mut serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => {
            if map.get("settled").is_some_and(serde_json::Value::is_array) {
                return map.get_mut("settled");
            }
            map.values_mut().find_map(settled_list)
        }
        serde_json::Value::Array(items) => items.iter_mut().find_map(settled_list),
        _ => None,
    }
}

/// A product's snapshot stored before its reservation endings were bounded holds them as
/// a map from order to ending; a process that reads it knows those endings as before.
#[tokio::test]
async fn a_product_snapshot_of_the_former_shape_loads_with_its_endings() {
    let db = TestDb::new().await;
    let settings = StoreSettings {
        snapshot_every: 10,
        ..StoreSettings::default()
    };
    let commands = db.commands(settings);
    let product = created_product(&commands, "SKU-OLD", 100).await;
    let id = product.as_uuid();
    let orders: Vec<OrderId> = (0..12).map(|_| OrderId::new()).collect();
    for (n, &order_id) in orders.iter().enumerate() {
        let end = if n % 2 == 0 {
            ProductCommand::CommitReservation { order_id }
        } else {
            ProductCommand::ReleaseReservation { order_id }
        };
        let reserve = ProductCommand::ReserveStock {
            order_id,
            quantity: Quantity::new(1).unwrap(),
        };
        for command in [reserve, end] {
            commands
                .products
                .execute(id, command, &metadata(&format!("s{n}")), None)
                .await
                .unwrap()
                .unwrap();
        }
    }
    let written = commands.products.load(id).await.unwrap().unwrap();
    assert_eq!(written.version, 25);

    // Rewrite the stored snapshot (at sequence 20) in the former shape.
    let (last_sequence, mut payload): (i64, serde_json::Value) = sqlx::query_as(
        "SELECT last_sequence, payload FROM snapshots \
         WHERE aggregate_type = 'product' AND aggregate_id = $1",
    )
    .bind(product.to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(last_sequence, 20);
    let list = settled_list(&mut payload).expect("the snapshot lists the endings");
    let pairs = list.as_array().unwrap().clone();
    // Sequence 20: the creation, nine orders reserved and ended, the tenth reserved.
    assert_eq!(pairs.len(), 9);
    let map: serde_json::Map<String, serde_json::Value> = pairs
        .into_iter()
        .map(|pair| (pair[0].as_str().unwrap().to_owned(), pair[1].clone()))
        .collect();
    *list = serde_json::Value::Object(map);
    sqlx::query(
        "UPDATE snapshots SET payload = $2 WHERE aggregate_type = 'product' AND aggregate_id = $1",
    )
    .bind(product.to_string())
    .bind(&payload)
    .execute(&db.pool)
    .await
    .unwrap();

    // Another process, with nothing cached, loads it from that snapshot.
    let fresh = db.commands(settings);
    let loaded = fresh.products.load(id).await.unwrap().unwrap();
    assert_eq!(loaded.version, 25);
    assert_eq!(loaded.state, written.state);
    assert_eq!(loaded.state.settled().len(), 12);
    // A retried reservation of an order whose reservation ended takes nothing.
    let retried = fresh
        .products
        .execute(
            id,
            ProductCommand::ReserveStock {
                order_id: orders[0],
                quantity: Quantity::new(1).unwrap(),
            },
            &metadata("retry"),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(retried.version, 25);
}

#[tokio::test]
async fn fifty_concurrent_registrations_of_one_email_make_exactly_one_user() {
    let db = TestDb::new().await;
    let commands = Arc::new(db.commands(StoreSettings::default()));
    let spellings = ["dup@example.com", "DUP@example.com", "Dup@Example.COM"];
    let results = join_all((0..50).map(|n| {
        let commands = Arc::clone(&commands);
        async move {
            let user = UserId::new();
            commands
                .users
                .execute(
                    user.as_uuid(),
                    register(user, spellings[n % spellings.len()]),
                    &metadata(&format!("reg-{n}")),
                    None,
                )
                .await
        }
    }))
    .await;

    let mut accepted = 0;
    for result in results {
        match result.expect("no infrastructure failure") {
            Ok(_) => accepted += 1,
            Err(refusal) => assert_eq!(refusal, Refusal::Taken(UniqueKey::Email)),
        }
    }
    assert_eq!(accepted, 1);
    let users: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'UserRegistered'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(users, 1);
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM unique_keys WHERE kind = 'email'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(keys, 1);
}

#[tokio::test]
async fn concurrent_products_with_one_sku_make_exactly_one_product() {
    let db = TestDb::new().await;
    let commands = Arc::new(db.commands(StoreSettings::default()));
    let results = join_all((0..20).map(|n| {
        let commands = Arc::clone(&commands);
        async move {
            let product = ProductId::new();
            let sku = if n % 2 == 0 { "sku-dup" } else { "SKU-DUP" };
            commands
                .products
                .execute(
                    product.as_uuid(),
                    create_product(product, sku, 1),
                    &metadata("p"),
                    None,
                )
                .await
        }
    }))
    .await;
    let accepted = results
        .into_iter()
        .map(|result| result.expect("no infrastructure failure"))
        .filter(|outcome| match outcome {
            Ok(_) => true,
            Err(refusal) => {
                assert_eq!(refusal, &Refusal::Taken(UniqueKey::Sku));
                false
            }
        })
        .count();
    assert_eq!(accepted, 1);
}

#[tokio::test]
async fn a_refused_registration_leaves_no_key_claimed() {
    let db = TestDb::new().await;
    let commands = db.commands(StoreSettings::default());
    let user = registered(&commands, "first@example.com", "a").await;
    // Registering the same aggregate again is refused by the aggregate; the e-mail of the
    // refused attempt must stay free for someone else.
    let refused = commands
        .users
        .execute(
            user.as_uuid(),
            register(user, "second@example.com"),
            &metadata("b"),
            None,
        )
        .await
        .unwrap();
    assert!(refused.is_err());
    let other = UserId::new();
    commands
        .users
        .execute(
            other.as_uuid(),
            register(other, "second@example.com"),
            &metadata("c"),
            None,
        )
        .await
        .unwrap()
        .expect("the e-mail of a refused registration is free");
}

#[tokio::test]
async fn a_stale_aggregate_cache_never_decides_wrongly() {
    // Two writers with their own caches, as two API instances would have.
    let db = TestDb::new().await;
    let a = db.commands(StoreSettings::default());
    let b = db.commands(StoreSettings::default());
    let id = created_product(&a, "SKU-STALE", 0).await.as_uuid();
    // B restocks behind A's back: A's cached copy still says "no stock".
    b.products
        .execute(id, restock(5), &metadata("b1"), None)
        .await
        .unwrap()
        .unwrap();

    // A refusal decided on the stale copy is confirmed against the store first.
    let order = hindsight_domain::ids::OrderId::new();
    let reserved = a
        .products
        .execute(
            id,
            ProductCommand::ReserveStock {
                order_id: order,
                quantity: Quantity::new(3).unwrap(),
            },
            &metadata("a1"),
            None,
        )
        .await
        .unwrap()
        .expect("the reservation fits the stock B added");
    assert_eq!(reserved.version, 3);

    // B's copy is now stale: its append conflicts, it reloads and decides again.
    let restocked = b
        .products
        .execute(id, restock(1), &metadata("b2"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restocked.version, 4);

    // If-Match against A's stale copy: the current version is accepted, an old one is not.
    let refused = a
        .products
        .execute(id, restock(1), &metadata("a2"), Some(3))
        .await
        .unwrap();
    assert_eq!(refused, Err(Refusal::VersionMismatch { expected: 3 }));
    let accepted = a
        .products
        .execute(id, restock(1), &metadata("a3"), Some(4))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(accepted.version, 5);

    // Both see the same, complete history; the stock is exactly what was decided.
    for bus in [&a, &b] {
        let loaded = bus.products.load(id).await.unwrap().unwrap();
        assert_eq!(loaded.version, 5);
        assert_eq!(loaded.state.stock_available(), 5 - 3 + 1 + 1);
    }
    let sequences = sequences_of(&db, id).await;
    assert_eq!(sequences, (1..=5).collect::<Vec<i64>>());
    let positions: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM events WHERE aggregate_id = $1 ORDER BY sequence")
            .bind(id.to_string())
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(accepted.position, positions[4]);
}

#[tokio::test]
async fn a_read_of_part_of_a_cached_aggregate_answers_what_the_store_holds() {
    // `read` hands a closure the cached state instead of a copy of it; like `load`, it
    // must not answer from a copy another process has made stale.
    let db = TestDb::new().await;
    let a = db.commands(StoreSettings::default());
    let b = db.commands(StoreSettings::default());
    let id = created_product(&a, "SKU-READ", 2).await.as_uuid();
    let stock = |product: &hindsight_domain::product::Product| product.stock_available();

    let read = a.products.read(id, stock).await.unwrap().unwrap();
    assert_eq!(
        (read.state, read.version),
        (2, 1),
        "the cached copy, current"
    );

    b.products
        .execute(id, restock(5), &metadata("b1"), None)
        .await
        .unwrap()
        .unwrap();
    let read = a.products.read(id, stock).await.unwrap().unwrap();
    assert_eq!(
        (read.state, read.version),
        (7, 2),
        "a copy the store has moved past is read afresh"
    );
    // The stale copy is gone from A's cache: its next command appends without a conflict.
    let restocked = a
        .products
        .execute(id, restock(1), &metadata("a1"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restocked.version, 3);
    assert_eq!(db.unused_positions().await, 0, "no append conflicted");

    let unknown = a.products.read(uuid::Uuid::new_v4(), stock).await.unwrap();
    assert!(unknown.is_none(), "an id without events is no aggregate");
}

/// Counts `hindsight_aggregate_reads_total` by aggregate type and source, for the thread
/// it is set on (a `#[tokio::test]` runs everything on its one thread).
#[derive(Default)]
struct AggregateReads {
    counters: Mutex<HashMap<(String, String), Arc<AtomicU64>>>,
}

impl AggregateReads {
    /// Reads of `aggregate_type` counted from `source` so far.
    fn of(&self, aggregate_type: &str, source: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(&(aggregate_type.to_owned(), source.to_owned()))
            .map_or(0, |counter| counter.load(Ordering::Relaxed))
    }

    /// Product reads by source since the last call, as (cache, caught_up, store).
    fn products_since(&self, before: &mut (u64, u64, u64)) -> (u64, u64, u64) {
        let now = (
            self.of("product", "cache"),
            self.of("product", "caught_up"),
            self.of("product", "store"),
        );
        let since = (now.0 - before.0, now.1 - before.1, now.2 - before.2);
        *before = now;
        since
    }
}

impl metrics::Recorder for AggregateReads {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        if key.name() != "hindsight_aggregate_reads_total" {
            return metrics::Counter::noop();
        }
        let label = |name: &str| {
            key.labels()
                .find(|label| label.key() == name)
                .map(|label| label.value().to_owned())
                .unwrap_or_default()
        };
        let counter = self
            .counters
            .lock()
            .unwrap()
            .entry((label("aggregate_type"), label("source")))
            .or_default()
            .clone();
        metrics::Counter::from_arc(counter)
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

#[tokio::test]
async fn a_cached_copy_the_store_moved_past_is_caught_up_from_the_events_after_it() {
    // Another process appends to a product this one holds in its cache. Reading it,
    // confirming it for a command and confirming it in a batch read the events after the
    // cached version, not the snapshot and the events after that.
    let reads = AggregateReads::default();
    let _counting = metrics::set_default_local_recorder(&reads);
    let db = TestDb::new().await;
    let settings = StoreSettings {
        snapshot_every: 10,
        ..StoreSettings::default()
    };
    let here = db.commands(settings);
    let elsewhere = db.commands(settings);
    let id = created_product(&here, "SKU-CATCH-UP", 1).await.as_uuid();
    let stock = |product: &hindsight_domain::product::Product| product.stock_available();
    let read = here.products.read(id, stock).await.unwrap().unwrap();
    assert_eq!((read.state, read.version), (1, 1));
    restock_times(&elsewhere, id, 2, 9).await;

    let mut before = (
        reads.of("product", "cache"),
        reads.of("product", "caught_up"),
        reads.of("product", "store"),
    );
    let read = here.products.read(id, stock).await.unwrap().unwrap();
    assert_eq!((read.state, read.version), (19, 10));
    assert_eq!(
        reads.products_since(&mut before),
        (1, 1, 0),
        "a read catches its cached copy up"
    );
    let restocked = here
        .products
        .execute(id, restock(1), &metadata("here-1"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        restocked.version, 11,
        "the caught-up copy went back to the cache"
    );
    assert_eq!(reads.products_since(&mut before), (1, 0, 0));

    // A command whose expected version the cached copy does not have confirms it.
    restock_times(&elsewhere, id, 1, 3).await;
    reads.products_since(&mut before);
    let restocked = here
        .products
        .execute(id, restock(1), &metadata("here-2"), Some(14))
        .await
        .unwrap()
        .expect("the copy, caught up, is at the expected version");
    assert_eq!(restocked.version, 15);
    assert_eq!(
        reads.products_since(&mut before),
        (1, 1, 0),
        "a command's confirmation catches its cached copy up"
    );

    // A batch confirming its copy for a current read.
    restock_times(&elsewhere, id, 1, 1).await;
    reads.products_since(&mut before);
    let mut batch = here.batch().await;
    let product = batch
        .state::<hindsight_domain::product::Product>(id, hindsight_commands::batch::Read::Current)
        .await
        .unwrap()
        .map(|product| product.stock_available());
    assert_eq!(product, Some(25));
    drop(batch);
    assert_eq!(
        reads.products_since(&mut before),
        (1, 1, 0),
        "a batch's confirmation catches its copy up"
    );

    // A copy further behind than a snapshot's stretch is loaded, snapshot and all.
    restock_times(&elsewhere, id, 1, 11).await;
    reads.products_since(&mut before);
    let read = here.products.read(id, stock).await.unwrap().unwrap();
    assert_eq!((read.state, read.version), (36, 27));
    assert_eq!(reads.products_since(&mut before), (1, 0, 1));
    let loaded = db
        .commands(settings)
        .products
        .load(id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((loaded.state.stock_available(), loaded.version), (36, 27));
}

/// Places an order for one unit of each product through `commands`, decided with them as
/// read in `reads`; answers the order's id and the outcome.
/// Changes the price of product `id` through `commands`.
async fn reprice(commands: &CommandBus, id: ProductId, cents: i64, request: &str) {
    commands
        .products
        .execute(
            id.as_uuid(),
            ProductCommand::ChangePrice {
                price: Money::new(cents, Currency::EUR).unwrap(),
            },
            &metadata(request),
            None,
        )
        .await
        .unwrap()
        .unwrap();
}

async fn place_reading(
    orders: &AggregateStore<Order>,
    products: &[ProductId],
    reads: &[ReadAt],
) -> (OrderId, Result<Executed, Refusal<OrderError>>) {
    let order = OrderId::new();
    let lines = products
        .iter()
        .map(|product| NewOrderLine {
            product_id: *product,
            sku: Sku::parse("SKU-READ").unwrap(),
            name: ProductName::parse("Widget").unwrap(),
            quantity: Quantity::new(1).unwrap(),
            unit_price: Money::new(1999, Currency::EUR).unwrap(),
        })
        .collect();
    let command = OrderCommand::Place {
        order_id: order,
        customer_id: UserId::new(),
        lines,
    };
    let outcome = orders
        .execute_new_reading(order.as_uuid(), command, &metadata("place"), reads)
        .await
        .unwrap();
    (order, outcome)
}

#[tokio::test]
async fn an_append_holds_to_what_its_command_read_of_other_aggregates() {
    let db = TestDb::new().await;
    let here = db.commands(StoreSettings::default());
    let elsewhere = db.commands(StoreSettings::default());
    let kettle = created_product(&here, "SKU-KETTLE", 5).await;
    let teapot = created_product(&here, "SKU-TEAPOT", 5).await;
    let listing = |product: ProductId, version| {
        ReadAt::part::<Product>(product.as_uuid(), version, product::LISTING_EVENTS)
    };
    let whole = |product: ProductId, version| ReadAt::new::<Product>(product.as_uuid(), version);

    let (_, placed) = place_reading(
        &here.orders,
        &[kettle, teapot],
        &[listing(kettle, 1), listing(teapot, 1)],
    )
    .await;
    assert_eq!(placed.unwrap().version, 1);

    // A restock elsewhere changes the kettle, but not its listing.
    restock_times(&elsewhere, kettle.as_uuid(), 1, 1).await;
    let (_, placed) = place_reading(&here.orders, &[kettle], &[listing(kettle, 1)]).await;
    assert!(
        placed.is_ok(),
        "a stock movement leaves the listing read: {placed:?}"
    );
    let (order, refused) = place_reading(&here.orders, &[kettle], &[whole(kettle, 1)]).await;
    assert_eq!(
        refused,
        Err(Refusal::ReadChanged),
        "the kettle as a whole has changed"
    );
    assert!(
        sequences_of(&db, order.as_uuid()).await.is_empty(),
        "nothing was appended"
    );

    // A new price elsewhere changes the listing; one changed read of two is enough.
    reprice(&elsewhere, teapot, 2499, "price").await;
    let (order, refused) = place_reading(
        &here.orders,
        &[kettle, teapot],
        &[listing(kettle, 2), listing(teapot, 1)],
    )
    .await;
    assert_eq!(refused, Err(Refusal::ReadChanged));
    assert!(
        sequences_of(&db, order.as_uuid()).await.is_empty(),
        "nothing was appended"
    );
    let (_, placed) = place_reading(
        &here.orders,
        &[kettle, teapot],
        &[listing(kettle, 2), whole(teapot, 2)],
    )
    .await;
    assert!(placed.is_ok(), "read again at its version: {placed:?}");
    assert_eq!(
        db.unused_positions().await,
        0,
        "a refused append takes no position"
    );
}

/// An aggregate of this test file whose one command decides several events: no command
/// of the domain does today, but the store appends such commands in one statement, and
/// that statement carries the condition on what the command read.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Tally {
    count: u64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
enum TallyEvent {
    Counted { nth: u64 },
}

#[derive(Debug, Clone, PartialEq)]
struct NeverRefused;

impl std::fmt::Display for NeverRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a tally refuses nothing")
    }
}

impl std::error::Error for NeverRefused {}

impl hindsight_domain::RuleViolation for NeverRefused {
    fn code(&self) -> &'static str {
        "NEVER_REFUSED"
    }
}

impl hindsight_domain::DomainEvent for TallyEvent {
    fn event_type(&self) -> &'static str {
        "Counted"
    }

    fn event_version(&self) -> &'static str {
        "1"
    }
}

impl hindsight_domain::Aggregate for Tally {
    const TYPE: &'static str = "test_tally";
    /// How many events to decide.
    type Command = u64;
    type Event = TallyEvent;
    type Error = NeverRefused;

    fn handle(&self, times: u64) -> Result<Vec<TallyEvent>, NeverRefused> {
        Ok((1..=times)
            .map(|n| TallyEvent::Counted {
                nth: self.count + n,
            })
            .collect())
    }

    fn apply(&mut self, TallyEvent::Counted { nth }: TallyEvent) {
        self.count = nth;
    }
}

#[tokio::test]
async fn a_command_of_several_events_holds_to_what_it_read_and_appends_all_or_none() {
    let db = TestDb::new().await;
    let commands = db.commands(StoreSettings::default());
    let tallies = AggregateStore::<Tally>::new(
        db.pool.clone(),
        commands.statements().clone(),
        StoreSettings::default(),
        commands.appends().clone(),
    );
    let kettle = created_product(&commands, "SKU-TALLY", 5).await;
    restock_times(&commands, kettle.as_uuid(), 1, 1).await;
    let listing = ReadAt::part::<Product>(kettle.as_uuid(), 1, product::LISTING_EVENTS);
    let whole = ReadAt::new::<Product>(kettle.as_uuid(), 1);

    // Read as a whole at version 1, the kettle has moved on (a restock): nothing appended.
    let refused_id = uuid::Uuid::new_v4();
    let refused = tallies
        .execute_new_reading(refused_id, 3, &metadata("tally-whole"), &[whole])
        .await
        .unwrap();
    assert_eq!(refused.unwrap_err(), Refusal::ReadChanged);
    assert!(
        sequences_of(&db, refused_id).await.is_empty(),
        "no event of three"
    );

    // Its listing at version 1 still holds: all three events, in order, one statement.
    let counted_id = uuid::Uuid::new_v4();
    let counted = tallies
        .execute_new_reading(counted_id, 3, &metadata("tally-listing"), &[listing])
        .await
        .unwrap()
        .unwrap();
    assert_eq!((counted.version, counted.appended), (3, 3));
    assert_eq!(sequences_of(&db, counted_id).await, vec![1, 2, 3]);
    let positions: Vec<i64> =
        sqlx::query_scalar("SELECT position FROM events WHERE aggregate_id = $1 ORDER BY sequence")
            .bind(counted_id.to_string())
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(positions.windows(2).all(|pair| pair[0] < pair[1]));
    assert_eq!(positions.last(), Some(&counted.position));

    // A new price changes the listing: refused again, and the tally keeps its three.
    reprice(&commands, kettle, 2499, "tally-price").await;
    let listing = ReadAt::part::<Product>(kettle.as_uuid(), 2, product::LISTING_EVENTS);
    let again = tallies
        .execute(counted_id, 2, &metadata("tally-again"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        again.version, 5,
        "without reads, appended as any command is"
    );
    let refused = tallies
        .execute_new_reading(refused_id, 2, &metadata("tally-price-read"), &[listing])
        .await
        .unwrap();
    assert_eq!(refused.unwrap_err(), Refusal::ReadChanged);
    assert!(sequences_of(&db, refused_id).await.is_empty());
    assert_eq!(
        db.unused_positions().await,
        0,
        "a refused append of several events takes no position"
    );
}

#[tokio::test]
async fn a_command_on_a_minted_id_that_holds_events_is_decided_on_the_stored_aggregate() {
    // `execute_new` skips the load for an id its caller just minted. Should the id hold
    // events after all (here: another process created the product), nothing may be
    // decided on the presumed-empty state: not a second creation, not a refusal.
    let db = TestDb::new().await;
    let elsewhere = db.commands(StoreSettings::default());
    let here = db.commands(StoreSettings::default());
    let product = created_product(&elsewhere, "SKU-MINTED", 2).await;
    let id = product.as_uuid();

    let again = here
        .products
        .execute_new(id, create_product(product, "SKU-OTHER", 9), &metadata("n1"))
        .await
        .unwrap();
    assert_eq!(
        again,
        Err(Refusal::Rule(ProductError::ProductAlreadyExists)),
        "the append at sequence 1 conflicts, and the reloaded product refuses"
    );
    // Refused on the empty state (no such product), confirmed against the store, and
    // decided again on the product as stored.
    let restocked = here
        .products
        .execute_new(id, restock(3), &metadata("n2"))
        .await
        .unwrap()
        .expect("the stored product takes the restock");
    assert_eq!((restocked.version, restocked.appended), (2, 1));

    let fresh = ProductId::new();
    let created = here
        .products
        .execute_new(
            fresh.as_uuid(),
            create_product(fresh, "SKU-FRESH", 1),
            &metadata("n3"),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!((created.version, created.appended), (1, 1));

    let loaded = here.products.load(id).await.unwrap().unwrap();
    assert_eq!((loaded.version, loaded.state.stock_available()), (2, 5));
    assert_eq!(
        loaded.state.sku().map(|sku| sku.as_str()),
        Some("SKU-MINTED")
    );
    let sequences = sequences_of(&db, id).await;
    assert_eq!(sequences, vec![1, 2]);
}

/// The most rows any scan node of an `EXPLAIN (ANALYZE, FORMAT JSON)` plan produced.
fn widest_scan(plan: &serde_json::Value) -> u64 {
    let own = match plan["Node Type"].as_str() {
        Some(node) if node.contains("Scan") => plan["Actual Rows"].as_u64().unwrap(),
        _ => 0,
    };
    let children = plan["Plans"].as_array().into_iter().flatten();
    children.map(widest_scan).fold(own, u64::max)
}

#[tokio::test]
async fn confirming_a_cached_aggregate_reads_one_index_entry_whatever_its_history() {
    // Confirming a cached copy asks the store for the aggregate's current version. sqlx
    // prepares the statement, and after a few executions Postgres may plan it generically;
    // `max(sequence)` was then an aggregate over every entry of the stream. The plan is
    // forced generic here, as a long-running server's would be.
    let db = TestDb::new().await;
    let commands = db.commands(StoreSettings::default());
    let id = created_product(&commands, "SKU-LONG", 0).await.as_uuid();
    restock_times(&commands, id, 1, 60).await;
    let mut connection = db.pool.acquire().await.unwrap();
    sqlx::raw_sql("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *connection)
        .await
        .unwrap();
    sqlx::raw_sql(&format!(
        "PREPARE current_version(text, text) AS {}",
        hindsight_commands::store::CURRENT_VERSION
    ))
    .execute(&mut *connection)
    .await
    .unwrap();
    let explained: serde_json::Value = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE current_version('product', '{id}')"
    ))
    .fetch_one(&mut *connection)
    .await
    .unwrap();
    let plan = &explained[0]["Plan"];
    assert_eq!(
        widest_scan(plan),
        1,
        "one index entry, not the stream: {plan}"
    );
    let version: i64 = sqlx::query_scalar(&format!("EXECUTE current_version('product', '{id}')"))
        .fetch_one(&mut *connection)
        .await
        .unwrap();
    assert_eq!(version, 61);
    sqlx::raw_sql("DEALLOCATE current_version; RESET plan_cache_mode")
        .execute(&mut *connection)
        .await
        .unwrap();
}

/// Index entries read by this transaction's scans of the event store's indexes so far.
async fn event_index_entries_read(connection: &mut sqlx::PgConnection) -> i64 {
    sqlx::query_scalar(
        "SELECT sum(pg_stat_get_xact_tuples_returned(indexrelid))::int8 \
         FROM pg_index WHERE indrelid = 'events'::regclass",
    )
    .fetch_one(connection)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_append_reads_one_index_entry_whatever_its_streams_length() {
    // The chain trigger finds each event's predecessor with one generic plan per session,
    // made at the session's first append. In a new database Postgres has no statistics,
    // and a plan made then took the audit feed's index by aggregate id and filtered the
    // stream's whole history for every append (migration 0014). This session's first
    // append is made on such a table.
    let db = TestDb::new().await;
    let mut connection = db.pool.acquire().await.unwrap();
    let mut tx = sqlx::Connection::begin(&mut *connection).await.unwrap();
    let before = event_index_entries_read(&mut tx).await;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT 'test', 'long', s, 'Happened', '1', '{}', '{}' FROM generate_series(1, 200) s",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    let after_bulk = event_index_entries_read(&mut tx).await;
    assert_eq!(
        after_bulk - before,
        199,
        "a bulk append reads each event's predecessor once, not the stream before it"
    );
    hindsight_tests::append_raw_event(&mut tx, "long", 201, "Happened").await;
    let after_one = event_index_entries_read(&mut tx).await;
    assert_eq!(
        after_one - after_bulk,
        1,
        "the 201st event reads its predecessor's entry only"
    );
    tx.rollback().await.unwrap();
}

#[tokio::test]
async fn an_append_that_read_other_aggregates_keeps_one_plan_per_session() {
    // Written inline, the condition on the reads made the placement's INSERT cost depend on
    // its array parameters, and Postgres planned the whole statement on every execution
    // (migration 0015) once the store held a thousand events or so. Eight placements on a
    // session of their own, with a few thousand events stored: after Postgres's five
    // custom plans, the session reuses one generic plan.
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT 'test', 'history', s, 'Happened', '1', '{}', '{}' FROM generate_series(1, 3000) s",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let commands = db.commands(StoreSettings::default());
    let kettle = created_product(&commands, "SKU-PLANS", 50).await;
    let session = hindsight_commands::statements::StatementPool::new(db.connect_options(), 1);
    let orders = AggregateStore::<Order>::new(
        db.pool.clone(),
        session.clone(),
        StoreSettings::default(),
        commands.appends().clone(),
    );
    for _ in 0..8 {
        let read = ReadAt::part::<Product>(kettle.as_uuid(), 1, product::LISTING_EVENTS);
        let (_, placed) = place_reading(&orders, &[kettle], &[read]).await;
        placed.unwrap();
    }
    let mut connection = session.acquire().await.unwrap();
    let plans = sqlx::query_as::<_, (i64, i64)>(
        "SELECT generic_plans, custom_plans FROM pg_prepared_statements \
         WHERE statement LIKE 'INSERT INTO events%' \
           AND statement LIKE '%$11::text[]%'",
    )
    .fetch_one(&mut *connection)
    .await;
    let (generic, custom) = connection.give_back(plans).unwrap();
    assert_eq!(
        (generic, custom),
        (3, 5),
        "eight guarded appends: five custom plans, then the generic one"
    );
}

#[tokio::test]
async fn commands_without_the_aggregate_cache_behave_the_same() {
    let db = TestDb::new().await;
    let commands = db.commands(StoreSettings {
        cache_capacity: 0,
        snapshot_every: 3,
        ..StoreSettings::default()
    });
    let id = created_product(&commands, "SKU-NOCACHE", 1).await.as_uuid();
    restock_times(&commands, id, 1, 7).await;
    let loaded = commands.products.load(id).await.unwrap().unwrap();
    assert_eq!((loaded.version, loaded.state.stock_available()), (8, 8));
    let snapshots: Vec<i64> = sqlx::query_scalar(
        "SELECT last_sequence FROM snapshots WHERE aggregate_type = 'product' AND aggregate_id = $1",
    )
    .bind(id.to_string())
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        snapshots,
        vec![6],
        "one row per aggregate, at the last multiple of 3"
    );
}

#[tokio::test]
async fn a_cancelled_transaction_start_never_swallows_later_writes() {
    // One pooled connection, so a connection left inside a transaction would be the one
    // every later statement uses.
    let db = TestDb::new().await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(db.pool.connect_options().as_ref().clone())
        .await
        .unwrap();
    sqlx::query("CREATE TABLE cancelled_begins (n int PRIMARY KEY)")
        .execute(&pool)
        .await
        .unwrap();
    for n in 0..200i32 {
        // Cancel the start of a transaction at a different moment each time.
        let wait = std::time::Duration::from_micros((n as u64 * 37) % 1_500);
        let _ = tokio::time::timeout(wait, hindsight_commands::db::begin(&pool)).await;
        sqlx::query("INSERT INTO cancelled_begins VALUES ($1)")
            .bind(n)
            .execute(&pool)
            .await
            .unwrap();
        // Seen from another connection: the autocommitted row is committed.
        let seen: Option<i32> = sqlx::query_scalar("SELECT n FROM cancelled_begins WHERE n = $1")
            .bind(n)
            .fetch_optional(&db.pool)
            .await
            .unwrap();
        assert_eq!(
            seen,
            Some(n),
            "insert {n} ran inside a leftover transaction"
        );
    }
}

#[tokio::test]
async fn reading_events_crosses_gaps_and_keeps_limits_and_bounds() {
    use hindsight_commands::event::read_events;
    let db = TestDb::new().await;
    let mut connection = db.pool.acquire().await.unwrap();
    // Runs of events separated by stretches of unused positions, one far longer than any
    // window the reader asks for.
    let mut positions = Vec::new();
    for (run, gap) in [(3, 0_i64), (4, 50), (2, 5_000_000), (3, 1)] {
        if gap > 0 {
            sqlx::query(
                "SELECT setval('events_position_seq', nextval('events_position_seq') + $1)",
            )
            .bind(gap)
            .execute(&mut *connection)
            .await
            .unwrap();
        }
        for _ in 0..run {
            let id = format!("gap-{}", positions.len());
            positions
                .push(hindsight_tests::append_raw_event(&mut connection, &id, 1, "Seen").await);
        }
    }
    drop(connection);
    let read = |after: i64, up_to: i64, limit: i64| {
        let pool = db.pool.clone();
        async move {
            read_events(&pool, after, up_to, limit)
                .await
                .unwrap()
                .iter()
                .map(|event| event.position)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(read(0, i64::MAX, i64::MAX).await, positions);
    assert_eq!(read(0, i64::MAX, 5).await, positions[..5]);
    assert_eq!(read(positions[6], i64::MAX, 3).await, positions[7..10]);
    assert_eq!(read(positions[2], positions[8], 100).await, positions[3..9]);
    assert_eq!(
        read(positions[8], positions[8], 100).await,
        Vec::<i64>::new()
    );
    let last = *positions.last().unwrap();
    assert_eq!(read(last, i64::MAX, 100).await, Vec::<i64>::new());
}
