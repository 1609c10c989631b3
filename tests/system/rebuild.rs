//! Zero-downtime rebuilds: every projection rebuilt under concurrent command load, reads
//! answering 200 throughout, the result equal to the live model; a rebuild killed
//! half-way leaves the live model untouched and can be started again.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hindsight_commands::{Actor, EventMetadata};
use hindsight_domain::ids::ProductId;
use hindsight_domain::product::ProductCommand;
use hindsight_domain::values::{Currency, Description, Money, ProductName, Quantity, Sku};
use hindsight_projections::{rebuild, worker};
use hindsight_tests::{eventually, TestSystem};

fn metadata() -> EventMetadata {
    EventMetadata::for_request(Actor::system(), "rebuild-test")
}

async fn seed(system: &TestSystem, products: usize) -> Vec<ProductId> {
    let commands = &system.app.state.commands;
    let mut ids = Vec::new();
    for n in 0..products {
        let id = ProductId::new();
        commands
            .products
            .execute(
                id.as_uuid(),
                ProductCommand::Create {
                    product_id: id,
                    sku: Sku::parse(&format!("RB-{n}")).unwrap(),
                    name: ProductName::parse(&format!("Rebuilt {n}")).unwrap(),
                    description: Description::parse("replayed").unwrap(),
                    price: Money::new(100 + n as i64, Currency::EUR).unwrap(),
                    stock: 10,
                },
                &metadata(),
                None,
            )
            .await
            .unwrap()
            .unwrap();
        ids.push(id);
    }
    ids
}

async fn restock(system: &TestSystem, product: ProductId) {
    system
        .app
        .state
        .commands
        .products
        .execute(
            product.as_uuid(),
            ProductCommand::Restock {
                quantity: Quantity::new(1).unwrap(),
            },
            &metadata(),
            None,
        )
        .await
        .unwrap()
        .unwrap();
}

/// Every index of the read models' tables, with its name (a rebuilt table's indexes
/// keep the names the live ones had).
async fn index_definitions(system: &TestSystem) -> Vec<String> {
    let tables = read_model_tables();
    sqlx::query_scalar(
        "SELECT tablename || ': ' || indexdef FROM pg_indexes WHERE tablename = ANY($1) ORDER BY 1",
    )
    .bind(&tables)
    .fetch_all(&system.db.pool)
    .await
    .unwrap()
}

fn read_model_tables() -> Vec<String> {
    hindsight_projections::live_read_models()
        .iter()
        .flat_map(|model| model.tables())
        .collect()
}

/// Each read model table, and whether it was ever analysed by a command (autovacuum's
/// analyses are counted apart, and the tests' Postgres may run none).
async fn analysed(system: &TestSystem) -> Vec<(String, bool)> {
    let mut tables: Vec<(String, bool)> = sqlx::query_as(
        "SELECT relname::text, last_analyze IS NOT NULL FROM pg_stat_user_tables \
         WHERE relname = ANY($1)",
    )
    .bind(read_model_tables())
    .fetch_all(&system.db.pool)
    .await
    .unwrap();
    tables.sort();
    tables
}

/// `products` new products, each restocked `restocks` times, all projected.
async fn catalogue(system: &TestSystem, products: usize, restocks: usize) -> Vec<ProductId> {
    let products = seed(system, products).await;
    for product in &products {
        for _ in 0..restocks {
            restock(system, *product).await;
        }
    }
    all_at_head(system).await;
    products
}

/// Restocks `products` in turn until `stop`; answers how many commands it ran.
fn restock_until(
    system: &Arc<TestSystem>,
    products: Vec<ProductId>,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<usize> {
    let (system, stop) = (Arc::clone(system), Arc::clone(stop));
    tokio::spawn(async move {
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            restock(&system, products[n % products.len()]).await;
            n += 1;
        }
        n
    })
}

async fn all_at_head(system: &TestSystem) {
    let head = hindsight_commands::relay::head(&system.db.pool)
        .await
        .unwrap();
    for name in rebuild::rebuildable() {
        eventually(30, &format!("{name} at head"), || async {
            worker::checkpoint(&system.db.pool, name)
                .await
                .unwrap()
                .is_some_and(|checkpoint| checkpoint.position >= head)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_projection_rebuilds_under_load_while_reads_keep_answering() {
    let system = Arc::new(TestSystem::start().await);
    let products = catalogue(&system, 20, 20).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = restock_until(&system, products.clone(), &stop);
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (system, stop, reads, product) = (
            Arc::clone(&system),
            Arc::clone(&stop),
            Arc::clone(&reads),
            products[0],
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for path in [
                    format!("/api/v1/products/{}", product.as_uuid()),
                    "/api/v1/products?limit=5&sort=-price".to_owned(),
                ] {
                    let response = system.client().get(system.url(&path)).send().await.unwrap();
                    assert_eq!(response.status(), 200, "{path} during a rebuild");
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    for name in rebuild::rebuildable() {
        let mut updates = 0;
        let report = rebuild::rebuild(&system.db.pool, name, |_| updates += 1)
            .await
            .unwrap_or_else(|error| panic!("rebuilding {name}: {error}"));
        assert!(report.events > 0, "{name} replayed nothing");
        assert!(updates > 0);
        assert!(
            report.differences.is_empty(),
            "{name}: rebuilt differs from live: {:?}",
            report.differences
        );
        let status = rebuild::status(&system.db.pool, name)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.status, "done");
    }
    stop.store(true, Ordering::Relaxed);
    let commands_during = load.await.unwrap();
    reader.await.unwrap();
    assert!(commands_during > 0 && reads.load(Ordering::Relaxed) > 0);

    // After the swaps the live models keep following the stream.
    restock(&system, products[1]).await;
    all_at_head(&system).await;
    let stock: i64 = sqlx::query_scalar("SELECT sum(stock_available)::bigint FROM product_views")
        .fetch_one(&system.db.pool)
        .await
        .unwrap();
    let expected = 20 * 10 + 20 * 20 + commands_during as i64 + 1;
    assert_eq!(stock, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_projections_rebuild_from_one_replay_and_report_what_the_live_ones_got_wrong() {
    let system = Arc::new(TestSystem::start().await);
    let products = catalogue(&system, 6, 10).await;

    // Damage the live models the way a bug in an old version could have: a product's
    // stock off by seven, a line of the audit trail lost, and another given an actor where
    // the event had none (a value against a null must count as a difference, while the
    // other lines' nulls, the system's commands having no actor, must not).
    let damaged = products[0].as_uuid();
    sqlx::query("UPDATE product_views SET stock_available = stock_available + 7 WHERE id = $1")
        .bind(damaged)
        .execute(&system.db.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit_trail WHERE position = (SELECT min(position) FROM audit_trail)")
        .execute(&system.db.pool)
        .await
        .unwrap();
    let misattributed = sqlx::query(
        "UPDATE audit_trail SET actor_id = gen_random_uuid() \
         WHERE position = (SELECT max(position) FROM audit_trail) AND actor_id IS NULL",
    )
    .execute(&system.db.pool)
    .await
    .unwrap();
    assert_eq!(misattributed.rows_affected(), 1);

    let indexes_before = index_definitions(&system).await;
    let mut tables = read_model_tables();
    tables.sort();
    assert!(analysed(&system)
        .await
        .iter()
        .all(|(_, analysed)| !analysed));
    assert!(
        indexes_before
            .iter()
            .any(|index| index.contains("product_views USING gin (search)")),
        "{indexes_before:?}"
    );

    // Commands go on (on the other products) while everything is rebuilt at once.
    let stop = Arc::new(AtomicBool::new(false));
    let load = restock_until(&system, products[1..].to_vec(), &stop);
    let names = rebuild::rebuildable();
    let started = rebuild::start_many(&system.db.pool, &names).await.unwrap();
    assert_eq!(started.names(), names);
    let mut reported = std::collections::BTreeSet::new();
    let outcomes = started
        .run(|name, _| {
            reported.insert(name);
        })
        .await;
    stop.store(true, Ordering::Relaxed);
    assert!(load.await.unwrap() > 0);
    assert_eq!(reported.len(), names.len(), "progress of every projection");

    assert_eq!(outcomes.len(), names.len());
    for (name, outcome) in outcomes {
        let report = outcome.unwrap_or_else(|error| panic!("rebuilding {name}: {error}"));
        let expected = match name {
            "products" => vec![rebuild::Difference {
                table: "product_views".into(),
                only_live: 1,
                only_rebuilt: 1,
            }],
            "audit_trail" => vec![rebuild::Difference {
                table: "audit_trail".into(),
                only_live: 1,
                only_rebuilt: 2,
            }],
            _ => vec![],
        };
        assert_eq!(report.differences, expected, "{name}");
        let status = rebuild::status(&system.db.pool, name)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.status, "done", "{name}");
    }

    // The rebuilt models are live, indexed as before, analysed, right, and keep following
    // the stream.
    assert_eq!(index_definitions(&system).await, indexes_before);
    let expected: Vec<(String, bool)> = tables.into_iter().map(|table| (table, true)).collect();
    assert_eq!(analysed(&system).await, expected);
    restock(&system, products[0]).await;
    all_at_head(&system).await;
    let stock: i64 = sqlx::query_scalar("SELECT stock_available FROM product_views WHERE id = $1")
        .bind(damaged)
        .fetch_one(&system.db.pool)
        .await
        .unwrap();
    assert_eq!(stock, 10 + 10 + 1);
    let (trail, events): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM audit_trail), (SELECT count(*) FROM events)")
            .fetch_one(&system.db.pool)
            .await
            .unwrap();
    assert_eq!(trail, events);
}

#[tokio::test]
async fn a_projection_that_cannot_be_rebuilt_does_not_stop_the_others() {
    let system = TestSystem::start().await;
    let products = seed(&system, 2).await;
    restock(&system, products[0]).await;
    all_at_head(&system).await;
    let count_users = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM user_views")
            .fetch_one(&system.db.pool)
            .await
            .unwrap()
    };
    let users_before = count_users().await;
    // Something that is not a table sits where the users' copy goes.
    sqlx::query("CREATE VIEW user_views_rebuild AS SELECT 1 AS one")
        .execute(&system.db.pool)
        .await
        .unwrap();

    let names = rebuild::rebuildable();
    let outcomes = rebuild::start_many(&system.db.pool, &names)
        .await
        .unwrap()
        .run(|_, _| {})
        .await;
    for (name, outcome) in outcomes {
        let status = rebuild::status(&system.db.pool, name)
            .await
            .unwrap()
            .unwrap();
        if name == "users" {
            assert!(outcome.is_err(), "users rebuilt over a view");
            assert_eq!(status.status, "failed");
            assert!(status.error.is_some());
        } else {
            assert!(outcome.is_ok(), "{name}: {:?}", outcome.err());
            assert_eq!(status.status, "done", "{name}");
        }
    }
    // The live users model was left alone and keeps serving.
    assert_eq!(count_users().await, users_before);

    // Only one rebuild of a projection at a time, all or nothing.
    let running = rebuild::start(&system.db.pool, "orders").await.unwrap();
    assert!(matches!(
        rebuild::start_many(&system.db.pool, &["products", "orders"]).await,
        Err(rebuild::RebuildError::AlreadyRunning(name)) if name == "orders"
    ));
    // `products` was not left locked by the refused start.
    let report = rebuild::rebuild(&system.db.pool, "products", |_| {})
        .await
        .unwrap();
    assert!(report.differences.is_empty());
    drop(running);
}

#[tokio::test]
async fn an_interrupted_rebuild_leaves_the_live_model_alone_and_can_start_again() {
    let system = TestSystem::start().await;
    let products = seed(&system, 3).await;
    for _ in 0..5 {
        restock(&system, products[0]).await;
    }
    all_at_head(&system).await;
    let before: Vec<(String, i64)> =
        sqlx::query_as("SELECT sku, stock_available FROM product_views ORDER BY sku")
            .fetch_all(&system.db.pool)
            .await
            .unwrap();

    // A rebuild that died after creating and partly filling its copy.
    sqlx::query("CREATE TABLE product_views_rebuild (LIKE product_views INCLUDING ALL)")
        .execute(&system.db.pool)
        .await
        .unwrap();
    let first_events = hindsight_commands::event::read_events(&system.db.pool, 0, i64::MAX, 3)
        .await
        .unwrap();
    let copy = hindsight_projections::products::Products::with_suffix(rebuild::SUFFIX);
    let mut tx = system.db.pool.begin().await.unwrap();
    hindsight_projections::read_model::ReadModel::apply(&copy, &mut tx, &first_events)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let after_crash: Vec<(String, i64)> =
        sqlx::query_as("SELECT sku, stock_available FROM product_views ORDER BY sku")
            .fetch_all(&system.db.pool)
            .await
            .unwrap();
    assert_eq!(after_crash, before);

    let report = rebuild::rebuild(&system.db.pool, "products", |_| {})
        .await
        .unwrap();
    assert!(report.differences.is_empty(), "{:?}", report.differences);
    let after: Vec<(String, i64)> =
        sqlx::query_as("SELECT sku, stock_available FROM product_views ORDER BY sku")
            .fetch_all(&system.db.pool)
            .await
            .unwrap();
    assert_eq!(after, before);
    assert!(matches!(
        rebuild::rebuild(&system.db.pool, "nonsense", |_| {}).await,
        Err(rebuild::RebuildError::Unknown(_))
    ));
}

#[tokio::test]
async fn operators_start_a_rebuild_over_http_and_watch_it_finish() {
    let system = TestSystem::start().await;
    let products = seed(&system, 2).await;
    restock(&system, products[0]).await;
    all_at_head(&system).await;
    let operator = system.user(hindsight_domain::role::Role::Operator).await;
    let post = |name: &str| {
        system
            .client()
            .post(system.url(&format!("/api/v1/admin/projections/{name}/rebuild")))
            .bearer_auth(&operator.access_token)
            .send()
    };
    let accepted = post("products").await.unwrap();
    assert_eq!(accepted.status(), 202);
    eventually(30, "rebuild done", || async {
        let view: serde_json::Value = system
            .client()
            .get(system.url("/api/v1/admin/projections/products"))
            .bearer_auth(&operator.access_token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        view["rebuild"]["status"] == "done"
    })
    .await;
    let manager = post("order_process").await.unwrap();
    assert_eq!(manager.status(), 409);
    assert_eq!(
        manager.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "NOT_REBUILDABLE"
    );
    assert_eq!(post("nonsense").await.unwrap().status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_model_keeps_following_the_stream_while_its_copy_is_compared() {
    let system = Arc::new(TestSystem::start().await);
    let products = catalogue(&system, 2, 0).await;
    // Rows no event explains, far above any position, make the comparison take a while
    // (and show up in it): a live table that went wrong, or merely a large one.
    let extra = 600_000;
    sqlx::query(
        "INSERT INTO audit_trail (position, event_id, recorded_at, actor_role, request_id, \
                                  correlation_id, causation_id, aggregate_type, \
                                  aggregate_id, event_type, summary) \
         SELECT 1000000000000000 + n, gen_random_uuid(), now(), 'system', 'r', 'c', 'c', \
                'product', n::text, 'Stray', 'stray row' \
         FROM generate_series(1, $1) AS n",
    )
    .bind(extra)
    .execute(&system.db.pool)
    .await
    .unwrap();

    // While commands go on, watch the live checkpoint whenever the comparison is running.
    let stop = Arc::new(AtomicBool::new(false));
    let load = restock_until(&system, products.clone(), &stop);
    let watcher = {
        let (system, stop) = (Arc::clone(&system), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let comparing: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT FROM pg_stat_activity \
                     WHERE datname = current_database() AND state = 'active' \
                       AND pid <> pg_backend_pid() \
                       AND query LIKE '%FULL JOIN audit_trail_rebuild%')",
                )
                .fetch_one(&system.db.pool)
                .await
                .unwrap();
                if comparing {
                    let live = worker::checkpoint(&system.db.pool, "audit_trail")
                        .await
                        .unwrap()
                        .map_or(0, |checkpoint| checkpoint.position);
                    seen.push(live);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        })
    };

    let report = rebuild::rebuild(&system.db.pool, "audit_trail", |_| {})
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    assert!(load.await.unwrap() > 0);
    let seen = watcher.await.unwrap();

    assert_eq!(
        report.differences,
        vec![rebuild::Difference {
            table: "audit_trail".into(),
            only_live: extra,
            only_rebuilt: 0,
        }]
    );
    assert!(
        seen.len() >= 3,
        "the comparison was seen running only {} times",
        seen.len()
    );
    // The live audit trail went on applying events while its copy was being compared.
    assert!(
        seen.last() > seen.first(),
        "the live checkpoint stood still at {seen:?} during the comparison"
    );
    all_at_head(&system).await;
    let (trail, events): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM audit_trail), (SELECT count(*) FROM events)")
            .fetch_one(&system.db.pool)
            .await
            .unwrap();
    assert_eq!(trail, events, "the stray rows are gone with the swap");
}
