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
    let products = seed(&system, 20).await;
    for product in &products {
        for _ in 0..20 {
            restock(&system, *product).await;
        }
    }
    all_at_head(&system).await;

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (system, stop, products) = (Arc::clone(&system), Arc::clone(&stop), products.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                restock(&system, products[n % products.len()]).await;
                n += 1;
            }
            n
        })
    };
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
