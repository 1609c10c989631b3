//! Event distribution: the relay (late commits, rollbacks, leadership, NATS outages)
//! and the projection workers (exactly-once, catch-up, poison events, read-your-writes).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use hindsight_commands::relay::{self, Relay};
use hindsight_commands::wakeup::EVENTS_CHANNEL;
use hindsight_commands::{Actor, CommandBus, EventMetadata, StoreSettings, StoredEvent};
use hindsight_domain::ids::ProductId;
use hindsight_domain::product::ProductCommand;
use hindsight_domain::values::{Currency, Description, Money, ProductName, Quantity, Sku};
use hindsight_projections::progress::{ProjectionProgress, Waited};
use hindsight_projections::read_model::{ApplyError, ReadModel};
use hindsight_projections::worker::{self, ProjectionWorker};
use hindsight_tests::{append_raw_event, eventually, PrivateNats, TestDb, TestStream};
use sqlx::postgres::PgListener;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

fn metadata(request: &str) -> EventMetadata {
    EventMetadata::for_request(Actor::system(), request)
}

async fn create_product(db: &TestDb, sku: &str) -> ProductId {
    create_product_with(&db.commands(StoreSettings::default()), sku)
        .await
        .0
}

/// Creates a product through `commands`; answers it and the event's position.
async fn create_product_with(commands: &CommandBus, sku: &str) -> (ProductId, i64) {
    let product = ProductId::new();
    let executed = commands
        .products
        .execute(
            product.as_uuid(),
            ProductCommand::Create {
                product_id: product,
                sku: Sku::parse(sku).unwrap(),
                name: ProductName::parse("Widget").unwrap(),
                description: Description::parse("").unwrap(),
                price: Money::new(100, Currency::EUR).unwrap(),
                stock: 0,
            },
            &metadata("create"),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    (product, executed.position)
}

async fn restock(db: &TestDb, product: ProductId, n: u32) -> i64 {
    restock_with(&db.commands(StoreSettings::default()), product, n).await
}

/// Restocks `product` through `commands`; answers the event's position.
async fn restock_with(commands: &CommandBus, product: ProductId, n: u32) -> i64 {
    commands
        .products
        .execute(
            product.as_uuid(),
            ProductCommand::Restock {
                quantity: Quantity::new(n).unwrap(),
            },
            &metadata("restock"),
            None,
        )
        .await
        .unwrap()
        .unwrap()
        .position
}

fn spawn_relay(db: &TestDb, client: async_nats::Client, stream: &TestStream) -> CancellationToken {
    let stop = CancellationToken::new();
    let relay = Relay::new(db.pool.clone(), client, stream.relay_settings());
    tokio::spawn(relay.run(stop.clone()));
    stop
}

/// A database and a stream of their own with a relay running between them, and one
/// product created (named by `sku`).
async fn relayed_product(sku: &str) -> (TestDb, TestStream, CancellationToken, ProductId) {
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    let stop = spawn_relay(&db, stream.client.clone(), &stream);
    let product = create_product(&db, sku).await;
    (db, stream, stop, product)
}

async fn relay_reaches(db: &TestDb, stream: &TestStream, position: i64) {
    eventually(20, &format!("relay checkpoint {position}"), || async {
        relay::checkpoint(&db.pool, &stream.stream).await.unwrap() >= position
    })
    .await;
}

/// The stream holds every committed event once, in position order, with an unbroken
/// previous-position chain.
fn assert_chain(messages: &[hindsight_tests::Published], expected: &[i64]) {
    let positions: Vec<i64> = messages.iter().map(|m| m.position).collect();
    assert_eq!(positions, expected, "stream positions");
    let mut previous = 0;
    for message in messages {
        assert_eq!(message.previous, previous, "chain at {}", message.position);
        assert_eq!(message.message_id, message.event.event_id.to_string());
        assert_eq!(message.event.position, message.position);
        previous = message.position;
    }
}

async fn committed_positions(db: &TestDb) -> Vec<i64> {
    sqlx::query_scalar("SELECT position FROM events ORDER BY position")
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// A relay that would otherwise only poll once a minute, so a prompt publish proves it was
/// woken.
fn sleepy_relay(db: &TestDb, stream: &TestStream) -> Relay {
    let mut settings = stream.relay_settings();
    settings.poll_interval = Duration::from_secs(60);
    Relay::new(db.pool.clone(), stream.client.clone(), settings)
}

/// Waits for `position` to be published well before a sleepy relay's poll.
async fn relay_publishes_promptly(db: &TestDb, stream: &TestStream, position: i64) {
    eventually(10, "the relay publishes without polling", || async {
        relay::checkpoint(&db.pool, &stream.stream).await.unwrap() >= position
    })
    .await;
}

#[tokio::test]
async fn an_append_wakes_a_relay_in_another_process_through_postgres() {
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    let stop = CancellationToken::new();
    // No local watch: this relay hears only what Postgres announces.
    tokio::spawn(sleepy_relay(&db, &stream).run(stop.clone()));
    let product = create_product(&db, "WAKE-REMOTE").await;
    relay_reaches(&db, &stream, 1).await;
    // Let the relay settle into its minute-long wait before the next append.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let position = restock(&db, product, 2).await;
    relay_publishes_promptly(&db, &stream, position).await;
    stop.cancel();
}

#[tokio::test]
async fn an_append_wakes_the_relay_of_its_own_process_directly() {
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    let commands = db.commands(StoreSettings::default());
    let stop = CancellationToken::new();
    // The Postgres announcement of this bus's appends is ignored as an echo, so only the
    // in-process signal can wake this relay before its minute-long poll.
    let relay = sleepy_relay(&db, &stream).with_local_appends(commands.appends().watch());
    tokio::spawn(relay.run(stop.clone()));
    let (product, created) = create_product_with(&commands, "WAKE-LOCAL").await;
    relay_publishes_promptly(&db, &stream, created).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let restocked = restock_with(&commands, product, 2).await;
    relay_publishes_promptly(&db, &stream, restocked).await;
    stop.cancel();
}

#[tokio::test]
async fn a_process_whose_relay_is_active_announces_its_appends_to_no_one() {
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    let commands = db.commands(StoreSettings::default());
    let mut announcements = PgListener::connect_with(&db.pool).await.unwrap();
    announcements.listen(EVENTS_CHANNEL).await.unwrap();
    let stop = CancellationToken::new();
    let relay = sleepy_relay(&db, &stream).with_local_appends(commands.appends().watch());
    tokio::spawn(relay.run(stop.clone()));
    let (product, created) = create_product_with(&commands, "WAKE-NONE").await;
    relay_publishes_promptly(&db, &stream, created).await;
    // The creation may have been announced before the relay became active.
    while let Ok(heard) =
        tokio::time::timeout(Duration::from_millis(300), announcements.recv()).await
    {
        heard.unwrap();
    }
    let restocked = restock_with(&commands, product, 2).await;
    relay_publishes_promptly(&db, &stream, restocked).await;
    let heard = tokio::time::timeout(Duration::from_millis(500), announcements.recv()).await;
    assert!(
        heard.is_err(),
        "an append is announced while its own process's relay is active: {heard:?}"
    );

    // Once that relay has stopped, a relay elsewhere is woken by this process's appends.
    stop.cancel();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let elsewhere = CancellationToken::new();
    tokio::spawn(sleepy_relay(&db, &stream).run(elsewhere.clone()));
    let first = restock_with(&commands, product, 3).await;
    relay_reaches(&db, &stream, first).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = restock_with(&commands, product, 4).await;
    relay_publishes_promptly(&db, &stream, next).await;
    elsewhere.cancel();
}

#[tokio::test]
async fn a_late_commit_is_published_in_order_not_skipped() {
    let (db, stream, stop, product) = relayed_product("LATE-1").await;

    // A transaction takes the next position and stays open while later ones commit.
    let mut late = db.pool.begin().await.unwrap();
    let late_position = append_raw_event(&mut late, "late", 1, "Held").await;
    let mut later = Vec::new();
    for n in 1..=5 {
        later.push(restock(&db, product, n).await);
    }
    assert!(later.iter().all(|position| *position > late_position));

    // The relay publishes up to the open transaction's position and no further.
    relay_reaches(&db, &stream, late_position - 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        relay::checkpoint(&db.pool, &stream.stream).await.unwrap(),
        late_position - 1
    );
    assert!(stream
        .messages()
        .await
        .iter()
        .all(|m| m.position < late_position));

    late.commit().await.unwrap();
    let last = *later.last().unwrap();
    relay_reaches(&db, &stream, last).await;
    let messages = stream.messages().await;
    assert_chain(&messages, &committed_positions(&db).await);
    assert!(messages.iter().any(|m| m.position == late_position));
    stop.cancel();
}

/// Postgres lists in a snapshot only the running transactions whose ids are below every
/// id completed so far plus one: a running transaction with a newer id than the newest
/// completed one is left out of the list (it counts as running all the same). A
/// transaction that took its id early but its position late can thus commit a position
/// above one still held by a transaction the snapshot does not name.
#[tokio::test]
async fn a_position_held_by_a_transaction_newer_than_every_completed_one_is_not_skipped() {
    let (db, stream, stop, product) = relayed_product("XID-1").await;
    let created = restock(&db, product, 1).await;
    relay_reaches(&db, &stream, created).await;

    // `early` takes its transaction id first and its position last.
    let mut early = db.pool.begin().await.unwrap();
    let _: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *early)
        .await
        .unwrap();
    let mut held = db.pool.begin().await.unwrap();
    let held_position = append_raw_event(&mut held, "held-newer-id", 1, "Held").await;
    let early_position = append_raw_event(&mut early, "early-id", 1, "Early").await;
    assert!(early_position > held_position);
    early.commit().await.unwrap();

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        relay::checkpoint(&db.pool, &stream.stream).await.unwrap() < held_position,
        "the relay passed a position whose transaction is still open"
    );
    held.commit().await.unwrap();
    relay_reaches(&db, &stream, early_position).await;
    let messages = stream.messages().await;
    assert_chain(&messages, &committed_positions(&db).await);
    assert!(messages.iter().any(|m| m.position == held_position));
    stop.cancel();
}

#[tokio::test]
async fn a_rolled_back_position_is_passed_once_its_transaction_ends() {
    let (db, stream, stop, product) = relayed_product("ROLL-1").await;

    let mut doomed = db.pool.begin().await.unwrap();
    let hole = append_raw_event(&mut doomed, "doomed", 1, "Doomed").await;
    let after = restock(&db, product, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(relay::checkpoint(&db.pool, &stream.stream).await.unwrap() < hole);

    doomed.rollback().await.unwrap();
    relay_reaches(&db, &stream, after).await;
    let messages = stream.messages().await;
    assert_chain(&messages, &committed_positions(&db).await);
    assert!(messages.iter().all(|m| m.position != hole));
    stop.cancel();
}

#[tokio::test]
async fn only_one_relay_is_active_and_another_takes_over_when_it_dies() {
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    let product = create_product(&db, "LEAD-1").await;
    let first = spawn_relay(&db, stream.client.clone(), &stream);
    let second_client = hindsight_tests::nats_client().await;
    let second = spawn_relay(&db, second_client, &stream);

    let mut last = 0;
    for n in 1..=20 {
        last = restock(&db, product, n).await;
        if n == 10 {
            // Kill whichever is active; the other must take over.
            first.cancel();
        }
    }
    relay_reaches(&db, &stream, last).await;
    let messages = stream.messages().await;
    assert_chain(&messages, &committed_positions(&db).await);
    second.cancel();
}

#[tokio::test]
async fn commands_are_accepted_while_nats_is_down_and_nothing_is_lost() {
    let db = TestDb::new().await;
    let mut nats = PrivateNats::start();
    let stream = TestStream::on(nats.url()).await;
    let client = hindsight_commands_nats_client(&nats.url()).await;
    let stop = spawn_relay(&db, client, &stream);
    let product = create_product(&db, "DOWN-1").await;
    let before = restock(&db, product, 1).await;
    relay_reaches(&db, &stream, before).await;

    nats.kill();
    let mut last = before;
    for n in 2..=30 {
        last = restock(&db, product, n).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(relay::checkpoint(&db.pool, &stream.stream).await.unwrap() < last);

    nats.resume();
    relay_reaches(&db, &stream, last).await;
    let messages = stream.messages().await;
    assert_chain(&messages, &committed_positions(&db).await);
    stop.cancel();
}

/// A client that keeps reconnecting, as `serve` builds it.
async fn hindsight_commands_nats_client(url: &str) -> async_nats::Client {
    hindsight_api::serve::connect_nats(url).await.unwrap()
}

/// A read model for tests: records every position it is given under a primary key, so a
/// double application fails loudly, and refuses events of type `Poison` unless cured.
/// With `only`, it is concerned with events of that aggregate type alone.
struct Ledger {
    name: &'static str,
    cured: bool,
    only: Option<&'static str>,
}

fn ledger_model(name: &'static str, cured: bool) -> Arc<dyn ReadModel> {
    Arc::new(Ledger {
        name,
        cured,
        only: None,
    })
}

/// A ledger concerned only with the raw `test` events of `append_raw_event`.
fn test_events_ledger(name: &'static str) -> Arc<dyn ReadModel> {
    Arc::new(Ledger {
        name,
        cured: true,
        only: Some("test"),
    })
}

impl ReadModel for Ledger {
    fn name(&self) -> &'static str {
        self.name
    }

    fn concerns(&self, event: &StoredEvent) -> bool {
        self.only
            .is_none_or(|aggregate_type| event.aggregate_type == aggregate_type)
    }

    fn tables(&self) -> Vec<String> {
        vec!["test_ledger".to_owned()]
    }

    fn apply<'a>(
        &'a self,
        connection: &'a mut PgConnection,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(async move {
            for event in events {
                if event.event_type == "Poison" && !self.cured {
                    return Err(ApplyError::Invariant {
                        position: event.position,
                        reason: "poison event".to_owned(),
                    });
                }
                sqlx::query("INSERT INTO test_ledger (projection, position) VALUES ($1, $2)")
                    .bind(self.name)
                    .bind(event.position)
                    .execute(&mut *connection)
                    .await?;
            }
            Ok(())
        })
    }
}

/// A database with the ledger table, a stream of its own, and a relay feeding it.
async fn ledger_system() -> (TestDb, TestStream, CancellationToken) {
    let db = TestDb::new().await;
    ledger_table(&db).await;
    let stream = TestStream::new().await;
    let relay_stop = spawn_relay(&db, stream.client.clone(), &stream);
    (db, stream, relay_stop)
}

async fn ledger_table(db: &TestDb) {
    sqlx::query(
        "CREATE TABLE test_ledger (projection text, position bigint, \
             plan_cache_mode text NOT NULL DEFAULT current_setting('plan_cache_mode'), \
             synchronous_commit text NOT NULL DEFAULT current_setting('synchronous_commit'), \
             enable_hashjoin text NOT NULL DEFAULT current_setting('enable_hashjoin'), \
             transaction_id xid8 NOT NULL DEFAULT pg_current_xact_id(), \
             PRIMARY KEY (projection, position))",
    )
    .execute(&db.pool)
    .await
    .unwrap();
}

async fn ledger(db: &TestDb, name: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT position FROM test_ledger WHERE projection = $1 ORDER BY position")
        .bind(name)
        .fetch_all(&db.pool)
        .await
        .unwrap()
}

/// Waits (at most 20 s) until projection `name`'s checkpoint satisfies `holds`.
async fn checkpoint_until(
    db: &TestDb,
    name: &str,
    what: &str,
    holds: impl Fn(&worker::Checkpoint) -> bool,
) {
    eventually(20, &format!("{name} {what}"), || async {
        worker::checkpoint(&db.pool, name)
            .await
            .unwrap()
            .is_some_and(|checkpoint| holds(&checkpoint))
    })
    .await;
}

/// Appends an event the `Ledger` refuses unless cured; answers its position.
async fn append_poison(db: &TestDb) -> i64 {
    append_test_event(db, "poison", "Poison").await
}

/// Appends the first event of raw `test` stream `id`; answers its position.
async fn append_test_event(db: &TestDb, id: &str, event_type: &str) -> i64 {
    let mut tx = db.pool.begin().await.unwrap();
    let position = append_raw_event(&mut tx, id, 1, event_type).await;
    tx.commit().await.unwrap();
    position
}

/// Waits for projection `name` to fail, and checks it stopped just before `poison`.
async fn stops_just_before(db: &TestDb, name: &str, poison: i64) {
    checkpoint_until(db, name, "failed", |checkpoint| {
        checkpoint.status == "failed"
    })
    .await;
    let failed = worker::checkpoint(&db.pool, name).await.unwrap().unwrap();
    assert_eq!(
        failed.position,
        poison - 1,
        "stops just before the poison event"
    );
    assert!(failed.last_error.unwrap().contains("poison event"));
}

fn spawn_worker(db: &TestDb, stream: &TestStream, model: Arc<dyn ReadModel>) -> CancellationToken {
    spawn_worker_with(db, stream, model, stream.worker_settings())
}

fn spawn_worker_with(
    db: &TestDb,
    stream: &TestStream,
    model: Arc<dyn ReadModel>,
    settings: worker::WorkerSettings,
) -> CancellationToken {
    let stop = CancellationToken::new();
    let worker = ProjectionWorker::new(db.pool.clone(), stream.client.clone(), model, settings);
    tokio::spawn(worker.run(stop.clone()));
    stop
}

/// How many of ledger `name`'s rows each of its transactions wrote, in commit order.
async fn ledger_transactions(db: &TestDb, name: &str, after: i64) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM test_ledger WHERE projection = $1 AND position > $2 \
         GROUP BY transaction_id ORDER BY min(position)",
    )
    .bind(name)
    .bind(after)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// A live batch waits for the events that arrive within its linger and applies them in one
/// transaction; without a linger the same events, arriving 50 ms apart, are applied as
/// they come.
#[tokio::test]
async fn a_live_batch_gathers_the_events_that_arrive_within_its_linger() {
    let (db, stream, relay_stop) = ledger_system().await;
    let mut lingering = stream.worker_settings();
    lingering.linger = Duration::from_secs(2);
    let mut at_once = stream.worker_settings();
    at_once.linger = Duration::ZERO;
    let stops = [
        spawn_worker_with(&db, &stream, ledger_model("ledger", true), lingering),
        spawn_worker_with(&db, &stream, ledger_model("ledger_now", true), at_once),
    ];
    let product = create_product(&db, "LINGER-1").await;
    let first = restock(&db, product, 1).await;
    for name in ["ledger", "ledger_now"] {
        projection_reaches(&db, name, first).await;
        projection_goes_live(&db, name).await;
    }
    let mut last = first;
    for n in 1..=5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = restock(&db, product, n).await;
    }
    projection_reaches(&db, "ledger", last).await;
    projection_reaches(&db, "ledger_now", last).await;
    assert_eq!(ledger_transactions(&db, "ledger", first).await, [5]);
    let as_they_came = ledger_transactions(&db, "ledger_now", first).await;
    assert!(as_they_came.len() > 1, "{as_they_came:?}");
    for name in ["ledger", "ledger_now"] {
        assert_eq!(ledger(&db, name).await, committed_positions(&db).await);
    }
    for stop in stops {
        stop.cancel();
    }
    relay_stop.cancel();
}

/// A lingering batch holds at most `batch_size` events: what arrives beyond (here a burst
/// of ten while a batch of one waits) starts the next batch, and nothing is lost or
/// applied twice.
#[tokio::test]
async fn a_lingering_batch_holds_at_most_a_batch_and_carries_the_rest_over() {
    let (db, stream, relay_stop) = ledger_system().await;
    let mut settings = stream.worker_settings();
    settings.linger = Duration::from_millis(500);
    settings.batch_size = 3;
    let worker_stop = spawn_worker_with(&db, &stream, ledger_model("ledger", true), settings);
    let product = create_product(&db, "LINGER-2").await;
    let first = restock(&db, product, 1).await;
    projection_reaches(&db, "ledger", first).await;
    projection_goes_live(&db, "ledger").await;
    // One event starts a batch lingering; ten more arrive at once while it waits.
    restock(&db, product, 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut tx = db.pool.begin().await.unwrap();
    let mut last = 0;
    for sequence in 1..=10 {
        last = hindsight_tests::append_raw_event(&mut tx, "burst", sequence, "Burst").await;
    }
    // Announced as the write path announces its appends, so the relay need not poll.
    sqlx::query("SELECT pg_notify($1, 'test')")
        .bind(EVENTS_CHANNEL)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    projection_reaches(&db, "ledger", last).await;
    let sizes = ledger_transactions(&db, "ledger", first).await;
    assert_eq!(sizes.iter().sum::<i64>(), 11, "{sizes:?}");
    assert!(sizes.iter().all(|&size| size <= 3), "{sizes:?}");
    assert_eq!(ledger(&db, "ledger").await, committed_positions(&db).await);
    worker_stop.cancel();
    relay_stop.cancel();
}

async fn projection_reaches(db: &TestDb, name: &str, position: i64) {
    checkpoint_until(db, name, &format!("at {position}"), |checkpoint| {
        checkpoint.position >= position
    })
    .await;
}

async fn projection_goes_live(db: &TestDb, name: &str) {
    checkpoint_until(db, name, "live", |checkpoint| checkpoint.status == "live").await;
}

#[tokio::test]
async fn a_projection_catches_up_from_the_store_then_follows_the_stream_exactly_once() {
    let (db, stream, relay_stop) = ledger_system().await;
    let product = create_product(&db, "PROJ-1").await;
    let mut last = 0;
    for n in 1..=30 {
        last = restock(&db, product, n).await;
    }
    relay_reaches(&db, &stream, last).await;

    // Started late: must replay what exists, then follow new events.
    let worker_stop = spawn_worker(&db, &stream, ledger_model("ledger", true));
    for n in 1..=30 {
        last = restock(&db, product, n).await;
    }
    projection_reaches(&db, "ledger", last).await;
    assert_eq!(ledger(&db, "ledger").await, committed_positions(&db).await);
    projection_goes_live(&db, "ledger").await;

    // A restarted worker (and redelivered messages) applies nothing twice.
    worker_stop.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = spawn_worker(&db, &stream, ledger_model("ledger", true));
    last = restock(&db, product, 1).await;
    projection_reaches(&db, "ledger", last).await;
    assert_eq!(ledger(&db, "ledger").await, committed_positions(&db).await);
    again.cancel();
    relay_stop.cancel();
}

/// Every batch a worker applies, catching up from the store or following the stream, runs
/// under `worker::batch_settings` for its size: each ledger row keeps the settings of the
/// transaction that wrote it. The catch-up is one batch of more than `worker::SMALL_BATCH`
/// events, planned for itself; the live batches are small and keep generic plans.
#[tokio::test]
async fn a_workers_batches_run_under_the_settings_for_their_size_catching_up_and_live() {
    let (db, stream, relay_stop) = ledger_system().await;
    let product = create_product(&db, "SETTINGS-1").await;
    let mut last = 0;
    for n in 1..=worker::SMALL_BATCH as u32 + 6 {
        last = restock(&db, product, n).await;
    }
    let caught_up = last;
    relay_reaches(&db, &stream, last).await;
    let worker_stop = spawn_worker(&db, &stream, ledger_model("ledger", true));
    projection_goes_live(&db, "ledger").await;
    for n in 1..=5 {
        last = restock(&db, product, n).await;
    }
    projection_reaches(&db, "ledger", last).await;

    let settings: Vec<(bool, String, String, String)> = sqlx::query_as(
        "SELECT DISTINCT position > $1, plan_cache_mode, synchronous_commit, enable_hashjoin \
         FROM test_ledger ORDER BY 1",
    )
    .bind(caught_up)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let row = |live: bool, plans: &str, hash_joins: &str| {
        (
            live,
            plans.to_owned(),
            "off".to_owned(),
            hash_joins.to_owned(),
        )
    };
    assert_eq!(
        settings,
        [
            row(false, "force_custom_plan", "on"),
            row(true, "force_generic_plan", "off")
        ]
    );
    assert_eq!(ledger(&db, "ledger").await, committed_positions(&db).await);
    worker_stop.cancel();
    relay_stop.cancel();
}

/// The sessions holding advisory locks in the test's database: the relay's and each
/// worker's leader session.
async fn leader_sessions(db: &TestDb) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
         WHERE l.locktype = 'advisory' AND l.granted AND d.datname = current_database() \
         ORDER BY l.pid",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_relay_and_a_worker_whose_sessions_are_cut_lead_again_and_lose_or_repeat_nothing() {
    let (db, stream, relay_stop) = ledger_system().await;
    let worker_stop = spawn_worker(&db, &stream, ledger_model("ledger", true));
    let product = create_product(&db, "CUT-1").await;
    let mut last = 0;
    for n in 1..=20 {
        last = restock(&db, product, n).await;
    }
    projection_reaches(&db, "ledger", last).await;
    projection_goes_live(&db, "ledger").await;

    // Their statements run on the sessions that hold their locks: the database ends
    // those sessions (as a failover or an administrator would) while events keep coming.
    let cut = leader_sessions(&db).await;
    assert_eq!(cut.len(), 2, "the relay and the worker each lead: {cut:?}");
    let terminated: Vec<bool> =
        sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) AS pid")
            .bind(&cut)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(terminated, vec![true, true]);
    for n in 1..=20 {
        last = restock(&db, product, n).await;
    }

    relay_reaches(&db, &stream, last).await;
    projection_reaches(&db, "ledger", last).await;
    eventually(20, "both lead again on new sessions", || async {
        let now = leader_sessions(&db).await;
        now.len() == 2 && now.iter().all(|pid| !cut.contains(pid))
    })
    .await;
    // Nothing lost, nothing published out of order, nothing applied twice (the ledger's
    // primary key would refuse it and stop the projection).
    assert_chain(&stream.messages().await, &committed_positions(&db).await);
    assert_eq!(ledger(&db, "ledger").await, committed_positions(&db).await);
    projection_goes_live(&db, "ledger").await;
    worker_stop.cancel();
    relay_stop.cancel();
}

#[tokio::test]
async fn a_poison_event_stops_only_its_projection_and_a_fixed_restart_resumes() {
    let (db, stream, relay_stop) = ledger_system().await;
    let sick = spawn_worker(&db, &stream, ledger_model("sick", false));
    let healthy = spawn_worker(&db, &stream, ledger_model("healthy", true));

    let product = create_product(&db, "POISON-1").await;
    let poison = append_poison(&db).await;
    let last = restock(&db, product, 3).await;

    projection_reaches(&db, "healthy", last).await;
    stops_just_before(&db, "sick", poison).await;
    assert_eq!(ledger(&db, "healthy").await, committed_positions(&db).await);

    // Fixed and restarted, it resumes where it stopped.
    sick.cancel();
    let cured = spawn_worker(&db, &stream, ledger_model("sick", true));
    projection_reaches(&db, "sick", last).await;
    assert_eq!(ledger(&db, "sick").await, committed_positions(&db).await);
    // It replays from the store first, then goes live on the stream.
    projection_goes_live(&db, "sick").await;
    cured.cancel();
    healthy.cancel();
    relay_stop.cancel();
}

fn spawn_group(
    db: &TestDb,
    stream: &TestStream,
    name: &str,
    models: Vec<Arc<dyn ReadModel>>,
) -> CancellationToken {
    let stop = CancellationToken::new();
    let worker = ProjectionWorker::group(
        db.pool.clone(),
        stream.client.clone(),
        name,
        models,
        stream.worker_settings(),
    );
    tokio::spawn(worker.run(stop.clone()));
    stop
}

async fn checkpoint_position(db: &TestDb, name: &str) -> i64 {
    worker::checkpoint(&db.pool, name)
        .await
        .unwrap()
        .map_or(0, |checkpoint| checkpoint.position)
}

#[tokio::test]
async fn a_poison_event_in_a_group_stops_only_the_read_model_it_breaks() {
    let (db, stream, relay_stop) = ledger_system().await;
    let group = spawn_group(
        &db,
        &stream,
        "ledgers",
        vec![ledger_model("sick", false), ledger_model("healthy", true)],
    );
    projection_goes_live(&db, "sick").await;
    projection_goes_live(&db, "healthy").await;

    let product = create_product(&db, "GROUP-POISON-1").await;
    let before = restock(&db, product, 2).await;
    let poison = append_poison(&db).await;
    let mut last = 0;
    for n in 1..=5 {
        last = restock(&db, product, n).await;
    }

    projection_reaches(&db, "healthy", last).await;
    stops_just_before(&db, "sick", poison).await;
    let committed = committed_positions(&db).await;
    assert_eq!(ledger(&db, "healthy").await, committed);
    let before_poison: Vec<i64> = committed.iter().copied().filter(|&p| p < poison).collect();
    assert!(before_poison.contains(&before));
    assert_eq!(ledger(&db, "sick").await, before_poison);

    // The healthy member goes on alone while the sick one stays stopped.
    let later = restock(&db, product, 1).await;
    projection_reaches(&db, "healthy", later).await;
    assert_eq!(checkpoint_position(&db, "sick").await, poison - 1);
    // The failed batch's transaction, begun and ended with its statements on the group's
    // session, was rolled back: no session is left inside it.
    let aborted: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND state = 'idle in transaction (aborted)'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(aborted, 0, "a failed batch left its transaction open");

    // Fixed and restarted, the group resumes the sick member where it stopped.
    group.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cured = spawn_group(
        &db,
        &stream,
        "ledgers",
        vec![ledger_model("sick", true), ledger_model("healthy", true)],
    );
    let last = restock(&db, product, 1).await;
    projection_reaches(&db, "sick", last).await;
    projection_reaches(&db, "healthy", last).await;
    let committed = committed_positions(&db).await;
    assert_eq!(ledger(&db, "sick").await, committed);
    assert_eq!(ledger(&db, "healthy").await, committed);
    cured.cancel();
    relay_stop.cancel();
}

#[tokio::test]
async fn a_group_member_whose_checkpoint_is_held_is_skipped_then_catches_up_by_itself() {
    let (db, stream, relay_stop) = ledger_system().await;
    let group = spawn_group(
        &db,
        &stream,
        "pair",
        vec![ledger_model("held", true), ledger_model("free", true)],
    );
    let product = create_product(&db, "GROUP-HELD-1").await;
    let first = restock(&db, product, 1).await;
    projection_reaches(&db, "held", first).await;
    projection_reaches(&db, "free", first).await;

    // What a rebuild's swap does: hold the checkpoint row.
    let mut swap = db.pool.begin().await.unwrap();
    sqlx::query("SELECT position FROM projection_checkpoints WHERE name = 'held' FOR UPDATE")
        .execute(&mut *swap)
        .await
        .unwrap();
    let mut last = 0;
    for n in 1..=10 {
        last = restock(&db, product, n).await;
    }
    projection_reaches(&db, "free", last).await;
    assert_eq!(
        checkpoint_position(&db, "held").await,
        first,
        "the held member waits without holding the others up"
    );

    // Released, it catches up from the store with no new event to carry it.
    swap.rollback().await.unwrap();
    projection_reaches(&db, "held", last).await;
    let committed = committed_positions(&db).await;
    assert_eq!(ledger(&db, "held").await, committed);
    assert_eq!(ledger(&db, "free").await, committed);

    // And it follows the stream with the others again.
    let later = restock(&db, product, 1).await;
    projection_reaches(&db, "held", later).await;
    projection_reaches(&db, "free", later).await;
    group.cancel();
    relay_stop.cancel();
}

#[tokio::test]
async fn batches_that_concern_a_read_model_not_never_reach_it_yet_its_checkpoint_follows() {
    let (db, stream, relay_stop) = ledger_system().await;
    // Alone (such a batch opens no transaction at all), and beside a member that is
    // concerned with everything (the batch's one transaction leaves it out).
    let lone = tokio::spawn(
        ProjectionWorker::new(
            db.pool.clone(),
            stream.client.clone(),
            test_events_ledger("picky"),
            stream.worker_settings(),
        )
        .run(CancellationToken::new()),
    );
    let group = spawn_group(
        &db,
        &stream,
        "mixed",
        vec![
            ledger_model("every", true),
            test_events_ledger("picky_member"),
        ],
    );
    for name in ["picky", "every", "picky_member"] {
        projection_goes_live(&db, name).await;
    }

    // A batch holding a concerned event is given whole (the ledger records all of it), so
    // the concerned event is appended once everything before it was passed by, and the
    // events after it once it was applied: it travels alone.
    let product = create_product(&db, "QUIET-1").await;
    let mut last = 0;
    for n in 1..=20 {
        last = restock(&db, product, n).await;
    }
    for name in ["picky", "every", "picky_member"] {
        projection_reaches(&db, name, last).await;
    }
    let noted = append_test_event(&db, "quiet-noted-1", "Noted").await;
    for name in ["picky", "every", "picky_member"] {
        projection_reaches(&db, name, noted).await;
    }
    for n in 1..=5 {
        last = restock(&db, product, n).await;
    }
    for name in ["picky", "every", "picky_member"] {
        projection_reaches(&db, name, last).await;
    }
    assert_eq!(ledger(&db, "picky").await, vec![noted]);
    assert_eq!(ledger(&db, "picky_member").await, vec![noted]);
    assert_eq!(ledger(&db, "every").await, committed_positions(&db).await);

    // Killed as soon as the stream has carried more such events (before it may have written
    // its checkpoint past them), it passes them by again from the store, and then follows
    // the stream.
    for n in 1..=5 {
        last = restock(&db, product, n).await;
    }
    projection_reaches(&db, "every", last).await;
    lone.abort();
    for n in 1..=5 {
        last = restock(&db, product, n).await;
    }
    let again = spawn_worker(&db, &stream, test_events_ledger("picky"));
    projection_reaches(&db, "picky", last).await;
    let noted_again = append_test_event(&db, "quiet-noted-2", "Noted").await;
    projection_reaches(&db, "picky", noted_again).await;
    assert_eq!(ledger(&db, "picky").await, vec![noted, noted_again]);
    again.cancel();
    group.cancel();
    relay_stop.cancel();
}

#[tokio::test]
async fn a_group_takes_over_read_models_that_had_a_worker_of_their_own() {
    let (db, stream, relay_stop) = ledger_system().await;
    let solo = spawn_worker(&db, &stream, ledger_model("solo", true));
    let product = create_product(&db, "GROUP-TAKEOVER-1").await;
    let mut last = 0;
    for n in 1..=5 {
        last = restock(&db, product, n).await;
    }
    projection_reaches(&db, "solo", last).await;
    projection_goes_live(&db, "solo").await;
    let jetstream = async_nats::jetstream::new(stream.client.clone());
    let nats_stream = jetstream.get_stream(&stream.stream).await.unwrap();
    assert!(nats_stream.consumer_info("solo").await.is_ok());

    // While the lone worker runs, the group cannot lead: one worker per read model.
    let group = spawn_group(
        &db,
        &stream,
        "together",
        vec![ledger_model("solo", true), ledger_model("newcomer", true)],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(worker::checkpoint(&db.pool, "newcomer")
        .await
        .unwrap()
        .is_none());

    solo.cancel();
    for n in 1..=5 {
        last = restock(&db, product, n).await;
    }
    projection_reaches(&db, "solo", last).await;
    projection_reaches(&db, "newcomer", last).await;
    let committed = committed_positions(&db).await;
    assert_eq!(
        ledger(&db, "solo").await,
        committed,
        "nothing applied twice or missed"
    );
    assert_eq!(
        ledger(&db, "newcomer").await,
        committed,
        "replayed from the store"
    );
    assert!(
        nats_stream.consumer_info("solo").await.is_err(),
        "the superseded consumer is deleted"
    );
    group.cancel();
    relay_stop.cancel();
}

#[tokio::test]
async fn queries_can_wait_for_a_position_and_report_lag_past_the_bound() {
    let db = TestDb::new().await;
    ledger_table(&db).await;
    let stream = TestStream::new().await;
    let shutdown = CancellationToken::new();
    let progress = ProjectionProgress::start(db.pool.clone(), shutdown.clone())
        .await
        .unwrap();
    let relay_stop = spawn_relay(&db, stream.client.clone(), &stream);
    let worker_stop = spawn_worker(&db, &stream, ledger_model("ryw", true));
    let product = create_product(&db, "RYW-1").await;
    let position = restock(&db, product, 2).await;

    let waited = progress
        .wait_for("ryw", position, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        matches!(waited, Waited::Reached(at) if at >= position),
        "{waited:?}"
    );
    assert!(ledger(&db, "ryw").await.contains(&position));

    let never = progress
        .wait_for("ryw", position + 1_000_000, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(
        matches!(never, Waited::Lagging(at) if at >= position),
        "{never:?}"
    );
    worker_stop.cancel();
    relay_stop.cancel();
    shutdown.cancel();
}
