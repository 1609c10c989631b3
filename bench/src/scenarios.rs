//! The six scenarios. Each run starts a fresh database, stream and server; the rebuild
//! scenario seeds its own history once and rebuilds it once per run.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::future::{try_join_all, BoxFuture};
use futures::FutureExt as _;
use hindsight_projections::rebuild::rebuildable;
use hindsight_projections::worker::PROGRESS_CHANNEL;
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::PgPool;
use uuid::Uuid;

use crate::baseline;
use crate::client::Api;
use crate::load::{closed_loop, open_loop, quantile, warmup_requests, Outcome, Sample};
use crate::seed;
use crate::server::{self, Database, Environment, Memory, Server};

/// Figures of one run, by key.
pub type Figures = BTreeMap<String, f64>;

#[derive(Debug, Clone)]
pub struct Settings {
    /// The scenarios that run.
    pub scenarios: Vec<Scenario>,
    pub warmup: Duration,
    pub duration: Duration,
    pub history_events: u64,
    pub rebuild_events: u64,
    pub read_products: usize,
    pub keep_rebuild_database: bool,
    /// Where the lag scenario writes its timeline, if anywhere.
    pub lag_timeline: Option<std::path::PathBuf>,
}

/// The scenarios, as `--only` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// 1 and 6: write throughput and the server's memory meanwhile.
    Writes,
    /// 2: history does not slow commands.
    History,
    /// 3: projection lag at a steady rate.
    Lag,
    /// 4: the rebuild of every read model from a million events.
    Rebuild,
    /// 5: single GETs and filtered listings.
    Reads,
}

const PASSWORD: &str = "bench-password-123";
const WRITE_PRODUCTS: usize = 64;
const CUSTOMERS: usize = 32;
/// The read models whose progress the lag scenario watches: the one the restocked
/// product is read from, and the audit trail, which runs in a worker group of its own.
const PRODUCTS: &str = "products";
const AUDIT_TRAIL: &str = "audit_trail";

/// The read models `serve` keeps and `rebuild --all` rebuilds (the order process has none).
fn read_models() -> Vec<String> {
    rebuildable().into_iter().map(str::to_owned).collect()
}

fn log(message: impl AsRef<str>) {
    eprintln!("bench: {}", message.as_ref());
}

fn put(figures: &mut Figures, key: impl Into<String>, value: f64) {
    figures.insert(key.into(), value);
}

fn put_sample(figures: &mut Figures, key: &str, sample: &Sample) {
    put(figures, format!("{key}.rate"), sample.rate());
    put(figures, format!("{key}.p50"), sample.quantile_ms(0.50));
    put(figures, format!("{key}.p99"), sample.quantile_ms(0.99));
    put(figures, format!("{key}.failed"), sample.failed as f64);
    put(figures, format!("{key}.refused"), sample.refused as f64);
    let mut line = format!(
        "{key}: {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {} ok, {} refused, {} failed",
        sample.rate(),
        sample.quantile_ms(0.5),
        sample.quantile_ms(0.99),
        sample.ok,
        sample.refused,
        sample.failed
    );
    let cores = |what: &str| figures.get(&format!("{key}.{what}_cores")).copied();
    if let (Some(machine), Some(server), Some(stolen)) =
        (cores("machine"), cores("server"), cores("stolen"))
    {
        let per_request = server / sample.rate().max(1e-9) * 1e6;
        put(figures, format!("{key}.server_cpu_us"), per_request);
        line.push_str(&format!(
            ", cores busy {machine:.2} (server {server:.2}, {per_request:.0} µs a request), \
             stolen by the host {stolen:.2}"
        ));
    }
    // Postgres's cores by component become its CPU time per request; a phase in which
    // the server's sessions spent nothing (a baseline's) keeps no figure of them.
    let prefix = format!("{key}.pg_cores.");
    let measured: Vec<String> = figures
        .range(prefix.clone()..)
        .take_while(|(name, _)| name.starts_with(&prefix))
        .map(|(name, _)| name.clone())
        .collect();
    let postgres: Vec<(String, f64)> = measured
        .iter()
        .filter_map(|name| {
            let cores = figures.remove(name)?;
            let component = name[prefix.len()..].to_owned();
            Some((component, cores / sample.rate().max(1e-9) * 1e6))
        })
        .collect();
    let total: f64 = postgres.iter().map(|(_, us)| us).sum();
    if total > 0.0 {
        let parts: Vec<String> = postgres
            .iter()
            .map(|(component, us)| format!("{component} {us:.0}"))
            .collect();
        line.push_str(&format!(
            ", Postgres {total:.0} µs a request ({})",
            parts.join(", ")
        ));
        for (component, us) in postgres {
            put(figures, format!("{key}.pg_cpu_us.{component}"), us);
        }
        put(figures, format!("{key}.pg_cpu_us.total"), total);
    }
    if let Some(failure) = &sample.first_failure {
        line.push_str(&format!(" (first failure: {failure})"));
    }
    if let Some(refusal) = &sample.first_refusal {
        line.push_str(&format!(" (first refusal: {refusal})"));
    }
    log(line);
}

/// How long after its phase a measured window may still end (see [`metered`]).
const WINDOW_GRACE: Duration = Duration::from_secs(1);

/// Runs a load phase and records, over its measured window (from the end of the warm-up
/// for `settings.duration`), the cores kept busy: by the whole machine (server, Postgres,
/// NATS, the harness itself) as `<key>.machine_cores`, and by the server alone as
/// `<key>.server_cores`; and the cores the host took from the machine meanwhile (steal)
/// as `<key>.stolen_cores`; and the cores Postgres kept busy on the sessions of each of
/// the server's components as `<key>.pg_cores.<component>` (see
/// [`server::postgres_sessions`]). Call it before [`put_sample`], which adds the server's
/// CPU time per request and turns Postgres's cores into its CPU time per request
/// (`<key>.pg_cpu_us.<component>` and `.total`). A phase that ends well before its window (it
/// failed) records none of these, and is not kept waiting for the window to run out.
async fn metered<T>(
    settings: &Settings,
    meter: &Meter,
    figures: &mut Figures,
    key: &str,
    phase: impl Future<Output = T>,
) -> T {
    let (warmup, duration) = (settings.warmup, settings.duration);
    let (server_pid, database) = (meter.server_pid, meter.database.clone());
    let window = tokio::spawn(async move {
        let pid = server_pid?;
        tokio::time::sleep(warmup).await;
        let sessions_before = postgres_sessions(database.as_ref()).await;
        let (start, from) = (server::cpu_time(pid)?, Instant::now());
        tokio::time::sleep(duration).await;
        let end = server::cpu_time(pid)?;
        let seconds = from.elapsed().as_secs_f64();
        let sessions_after = postgres_sessions(database.as_ref()).await;
        let postgres = sessions_before
            .zip(sessions_after)
            .map(|(before, after)| postgres_cores(&before, &after, seconds));
        Some((
            [
                (end.machine - start.machine) / seconds,
                (end.process - start.process) / seconds,
                (end.stolen - start.stolen) / seconds,
            ],
            postgres.unwrap_or_default(),
        ))
    });
    let result = phase.await;
    // A phase that ran its course ends with its window, give or take the scheduler.
    let mut window = window;
    let window = match tokio::time::timeout(WINDOW_GRACE, &mut window).await {
        Ok(measured) => measured,
        Err(_) => {
            window.abort();
            log(format!(
                "{key}: the phase ended before its measured window; no CPU figures"
            ));
            return result;
        }
    };
    if let Ok(Some(([machine, server, stolen], postgres))) = window {
        put(figures, format!("{key}.machine_cores"), machine);
        put(figures, format!("{key}.server_cores"), server);
        put(figures, format!("{key}.stolen_cores"), stolen);
        for (component, cores) in postgres {
            put(figures, format!("{key}.pg_cores.{component}"), cores);
        }
    }
    result
}

/// What a phase is metered on: the server's process and, for Postgres's CPU time by the
/// server's component, its database (see [`server::postgres_sessions`]).
#[derive(Debug, Clone, Default)]
struct Meter {
    server_pid: Option<u32>,
    database: Option<PgPool>,
}

/// The server's Postgres sessions and their CPU time so far, when the phase names the
/// server's database and they can be read.
async fn postgres_sessions(database: Option<&PgPool>) -> Option<Vec<(i32, &'static str, f64)>> {
    server::postgres_sessions(database?).await.ok()
}

/// The cores Postgres kept busy over `seconds` for each component, from the CPU time of
/// its sessions `before` and `after`. A session that was not there at both ends (opened
/// or closed meanwhile) is left out: the server's pools keep theirs open under load.
fn postgres_cores(
    before: &[(i32, &'static str, f64)],
    after: &[(i32, &'static str, f64)],
    seconds: f64,
) -> BTreeMap<&'static str, f64> {
    let mut cores = BTreeMap::new();
    for &(pid, component, used) in after {
        let Some(&(_, _, earlier)) = before
            .iter()
            .find(|&&(other, named, _)| other == pid && named == component)
        else {
            continue;
        };
        *cores.entry(component).or_insert(0.0) += (used - earlier).max(0.0) / seconds;
    }
    cores
}

/// What a run set up: an admin, products to write to, customers.
struct Fixture {
    api: Api,
    admin: String,
    products: Arc<Vec<Uuid>>,
    customers: Arc<Vec<String>>,
    pool: PgPool,
    /// The server process and its database, whose CPU time the phases measure.
    meter: Meter,
}

/// One run of scenarios 1, 2, 3, 5 and 6 on a fresh system.
pub async fn run(env: &Environment, settings: &Settings, index: usize) -> Result<Figures> {
    let label = format!("run{index}");
    let database = Database::create(env, &label).await?;
    let result = async {
        let server = Server::start(env, &database, &label, &[]).await?;
        let stream = server.stream.clone();
        let result = run_on(settings, &database, &server).await;
        let stopped = server.stop().await;
        server::delete_stream(&env.nats_url, &stream).await.ok();
        let figures = result?;
        stopped?;
        Ok(figures)
    }
    .await;
    database.drop_now().await.ok();
    result
}

async fn run_on(settings: &Settings, database: &Database, server: &Server) -> Result<Figures> {
    let mut figures = Figures::new();
    let fixture = setup(database, server).await?;
    wait_idle(&fixture.pool).await?;

    let chosen = |scenario| settings.scenarios.contains(&scenario);
    if chosen(Scenario::Writes) {
        let idle = server.memory().unwrap_or_default();
        put(&mut figures, "s6.idle_rss_mb", mb(idle.rss));
        let sampler = MemorySampler::start(server);
        writes(settings, database, &fixture, &mut figures).await?;
        let peak = sampler.stop(server);
        put(&mut figures, "s6.peak_rss_mb", mb(peak));
        log(format!(
            "peak RSS during writes: {:.1} MB (idle {:.1} MB)",
            mb(peak),
            mb(idle.rss)
        ));
        wait_idle(&fixture.pool).await?;
    }
    if chosen(Scenario::Lag) {
        lag(settings, database, &fixture, &mut figures).await?;
        wait_idle(&fixture.pool).await?;
    }
    if chosen(Scenario::History) {
        history(settings, &fixture, &mut figures).await?;
        wait_idle(&fixture.pool).await?;
    }
    if chosen(Scenario::Reads) {
        reads(settings, database, &fixture, &mut figures).await?;
    }
    Ok(figures)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn setup(database: &Database, server: &Server) -> Result<Fixture> {
    let api = Api::new(&server.base_url)?;
    server
        .cli(
            &[
                "user",
                "create",
                "--email",
                "admin@bench.example",
                "--name",
                "Bench Admin",
                "--role",
                "admin",
            ],
            Some(PASSWORD),
        )
        .await?;
    let admin = api.login("admin@bench.example", PASSWORD).await?;
    let products = try_join_all((0..WRITE_PRODUCTS).map(|i| {
        let (api, admin) = (api.clone(), admin.clone());
        async move {
            api.create_product(
                &admin,
                &format!("BENCH-W{i}"),
                &format!("Write target {i}"),
                "A product the write scenarios restock and order",
                1_000 + i as i64,
                1_000_000_000,
            )
            .await
            .map(|(id, _)| id)
        }
    }))
    .await?;
    let customers = try_join_all((0..CUSTOMERS).map(|i| {
        let api = api.clone();
        async move {
            let email = format!("customer{i}@bench.example");
            api.register(&email, PASSWORD, &format!("Customer {i}"))
                .await?;
            api.login(&email, PASSWORD).await
        }
    }))
    .await?;
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(baseline::options(&database.url)?)
        .await?;
    Ok(Fixture {
        api,
        admin,
        products: Arc::new(products),
        customers: Arc::new(customers),
        meter: Meter {
            server_pid: server.pid(),
            database: Some(pool.clone()),
        },
        pool,
    })
}

/// Waits until every projection has applied every stored event (and so the order process
/// has made every decision): a phase's background work must not bleed into the next.
async fn wait_idle(pool: &PgPool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let behind: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM projection_checkpoints \
             WHERE position < (SELECT coalesce(max(position), 0) FROM events)",
        )
        .fetch_one(pool)
        .await?;
        let failed: Option<String> = sqlx::query_scalar(
            "SELECT name || ': ' || coalesce(last_error, '') FROM projection_checkpoints \
             WHERE status = 'failed' LIMIT 1",
        )
        .fetch_optional(pool)
        .await?;
        if let Some(failed) = failed {
            bail!("a projection failed during the benchmark: {failed}");
        }
        if behind == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("projections did not catch up within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Scenario 1 (and the memory of scenario 6): restocks and order placements at 8 and 32
/// clients, against raw single-row inserts at the same concurrency, and beside them the
/// event store's own appends without the server (in a database of their own).
async fn writes(
    settings: &Settings,
    database: &Database,
    fixture: &Fixture,
    figures: &mut Figures,
) -> Result<()> {
    let appends = database.beside("appends").await?;
    let result = writes_beside(settings, database, &appends, fixture, figures).await;
    let dropped = appends.drop_now().await;
    result?;
    dropped
}

async fn writes_beside(
    settings: &Settings,
    database: &Database,
    appends: &Database,
    fixture: &Fixture,
    figures: &mut Figures,
) -> Result<()> {
    {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(baseline::options(&appends.url)?)
            .await?;
        hindsight_commands::db::migrate(&pool)
            .await
            .context("migrating the database of the event-store appends")?;
        pool.close().await;
    }
    for clients in [8usize, 32] {
        let (warmup, duration) = (settings.warmup, settings.duration);
        let baselines: [(&str, BoxFuture<'_, Result<Sample>>); 2] = [
            (
                "raw_insert",
                baseline::raw_inserts(&database.url, clients, warmup, duration).boxed(),
            ),
            (
                "store_append",
                baseline::store_appends(&appends.url, clients, warmup, duration).boxed(),
            ),
        ];
        for (name, phase) in baselines {
            let key = format!("s1.{name}.{clients}");
            let sample = metered(settings, &fixture.meter, figures, &key, phase).await?;
            put_sample(figures, &key, &sample);
        }

        let (api, admin, products) = (
            fixture.api.clone(),
            fixture.admin.clone(),
            Arc::clone(&fixture.products),
        );
        let key = format!("s1.restock.{clients}");
        let restocks = closed_loop(
            clients,
            settings.warmup,
            settings.duration,
            move |client, i| {
                let (api, admin) = (api.clone(), admin.clone());
                let product = products[(client * 2 + i as usize) % products.len()];
                async move { api.restock(&admin, product, 1).await }
            },
        );
        let restocks = metered(settings, &fixture.meter, figures, &key, restocks).await;
        put_sample(figures, &key, &restocks);

        let (api, customers, products) = (
            fixture.api.clone(),
            Arc::clone(&fixture.customers),
            Arc::clone(&fixture.products),
        );
        // The order process decides each placement afterwards, in runs of orders (ADR 6);
        // how fast it does (until it has caught up) is measured from the same start.
        let before: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events")
            .fetch_one(&fixture.pool)
            .await?;
        let started = Instant::now();
        let key = format!("s1.order.{clients}");
        let orders = closed_loop(
            clients,
            settings.warmup,
            settings.duration,
            move |client, i| {
                let api = api.clone();
                let token = customers[client % customers.len()].clone();
                let product = products[(client * 2 + i as usize) % products.len()];
                async move { api.place_order(&token, product, 1).await }
            },
        );
        let orders = metered(settings, &fixture.meter, figures, &key, orders).await;
        put_sample(figures, &key, &orders);
        wait_idle(&fixture.pool).await?;
        let decided: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events WHERE position > $1 AND aggregate_type = 'order' \
             AND event_type IN ('OrderConfirmed', 'OrderRejected')",
        )
        .bind(before)
        .fetch_one(&fixture.pool)
        .await?;
        let elapsed = started.elapsed().as_secs_f64();
        put(
            figures,
            format!("s1.decided.{clients}.rate"),
            decided as f64 / elapsed,
        );
        log(format!(
            "order process: {decided} orders decided in {elapsed:.1} s after the placements began"
        ));
    }
    Ok(())
}

/// Scenario 3: restocks at a steady rate; for each, the time from its acknowledgement to
/// the products read model, and to the audit trail, having applied its position (each read
/// model's own commit notification, which is what `min_position` reads wait on).
async fn lag(
    settings: &Settings,
    database: &Database,
    fixture: &Fixture,
    figures: &mut Figures,
) -> Result<()> {
    let max = figures.get("s1.restock.32.rate").copied().unwrap_or(0.0);
    let rate = (max / 2.0).clamp(10.0, 1_000.0);
    put(figures, "s3.rate", rate);

    let listening = PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy_with(baseline::options(&database.url)?);
    let mut listener = PgListener::connect_with(&listening).await?;
    listener
        .listen(PROGRESS_CHANNEL)
        .await
        .context("listening for projection progress")?;
    type Progress = Vec<(Instant, i64)>;
    let applied: Arc<Mutex<[Progress; 2]>> = Arc::default();
    let recorder = {
        let applied = Arc::clone(&applied);
        tokio::spawn(async move {
            while let Ok(notification) = listener.recv().await {
                let at = Instant::now();
                let Some((name, position)) = notification.payload().rsplit_once(':') else {
                    continue;
                };
                let Some(index) = [PRODUCTS, AUDIT_TRAIL].iter().position(|&n| n == name) else {
                    continue;
                };
                if let (Ok(position), Ok(mut applied)) = (position.parse(), applied.lock()) {
                    applied[index].push((at, position));
                }
            }
        })
    };

    let acked: Arc<Mutex<Vec<(Instant, i64)>>> = Arc::default();
    let (api, admin, products, acks) = (
        fixture.api.clone(),
        fixture.admin.clone(),
        Arc::clone(&fixture.products),
        Arc::clone(&acked),
    );
    // The warm-up's commands are sent but their lag is not measured.
    let measured_from = warmup_requests(rate, settings.warmup);
    let commands = open_loop(rate, 32, settings.warmup, settings.duration, move |k| {
        let (api, admin, acks) = (api.clone(), admin.clone(), Arc::clone(&acks));
        let product = products[k as usize % products.len()];
        async move {
            let outcome = api.restock(&admin, product, 1).await;
            if let (Outcome::Ok(Some(position)), true) = (&outcome, k >= measured_from) {
                if let Ok(mut acks) = acks.lock() {
                    acks.push((Instant::now(), *position));
                }
            }
            outcome
        }
    });
    let commands = metered(settings, &fixture.meter, figures, "s3.command", commands).await;
    wait_idle(&fixture.pool).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    recorder.abort();
    put_sample(figures, "s3.command", &commands);

    let [products, audit_trail] = applied.lock().map(|a| a.clone()).unwrap_or_default();
    let acked = acked.lock().map(|a| a.clone()).unwrap_or_default();
    if let Some(path) = &settings.lag_timeline {
        let timeline = lag_timeline(&acked, &products, &audit_trail);
        std::fs::write(path, timeline)
            .with_context(|| format!("writing the lag timeline to {}", path.display()))?;
    }
    for (name, key, applied) in [
        (PRODUCTS, "s3.lag", products),
        (AUDIT_TRAIL, "s3.audit_lag", audit_trail),
    ] {
        let (lags, unseen) = lags(&acked, &applied);
        let p50 = quantile(&lags, 0.50) as f64 / 1000.0;
        let p99 = quantile(&lags, 0.99) as f64 / 1000.0;
        put(figures, format!("{key}.p50"), p50);
        put(figures, format!("{key}.p99"), p99);
        put(figures, format!("{key}.unseen"), unseen as f64);
        log(format!(
            "{name} lag at {rate:.0} commands/s: p50 {p50:.2} ms, p99 {p99:.2} ms over {} commands ({unseen} never seen)",
            lags.len()
        ));
    }
    Ok(())
}

/// The lag scenario's commands in the order they were acknowledged (see `--lag-timeline`),
/// with their lags to each read model (-1: never seen).
fn lag_timeline(
    acked: &[(Instant, i64)],
    products: &[(Instant, i64)],
    audit_trail: &[(Instant, i64)],
) -> String {
    let Some(&(first, _)) = acked.first() else {
        return String::new();
    };
    let since_1970 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(first.elapsed());
    let shown = |lag: Option<u32>| lag.map_or(-1, i64::from);
    let mut timeline = format!("{}\n", since_1970.as_micros());
    let lags = lags_in_order(acked, products)
        .into_iter()
        .zip(lags_in_order(acked, audit_trail));
    for (&(at, position), (to_products, to_audit_trail)) in acked.iter().zip(lags) {
        timeline.push_str(&format!(
            "{} {position} {} {}\n",
            at.duration_since(first).as_micros(),
            shown(to_products),
            shown(to_audit_trail),
        ));
    }
    timeline
}

/// For each acknowledged position, the microseconds until a read model's progress
/// (`applied`, in arrival order) reached it, sorted; and how many it never reached.
fn lags(acked: &[(Instant, i64)], applied: &[(Instant, i64)]) -> (Vec<u32>, u64) {
    let mut lags: Vec<u32> = Vec::with_capacity(acked.len());
    let mut unseen = 0u64;
    for lag in lags_in_order(acked, applied) {
        match lag {
            Some(lag) => lags.push(lag),
            None => unseen += 1,
        }
    }
    lags.sort_unstable();
    (lags, unseen)
}

/// For each acknowledged position, in the order given, the microseconds until a read
/// model's progress (`applied`, in arrival order) reached it; `None` if it never did.
fn lags_in_order(acked: &[(Instant, i64)], applied: &[(Instant, i64)]) -> Vec<Option<u32>> {
    // The notifications arrive in commit order, so positions only grow along the list;
    // keep a running maximum to be safe against reordering.
    let mut running = i64::MIN;
    let frontier: Vec<(Instant, i64)> = applied
        .iter()
        .map(|&(at, position)| {
            running = running.max(position);
            (at, running)
        })
        .collect();
    acked
        .iter()
        .map(|(acked_at, position)| {
            let index = frontier.partition_point(|(_, applied)| applied < position);
            frontier.get(index).map(|(seen_at, _)| {
                u32::try_from(seen_at.saturating_duration_since(*acked_at).as_micros())
                    .unwrap_or(u32::MAX)
            })
        })
        .collect()
}

/// Scenario 2: a command's latency on an aggregate with 10,000 events against one with 10.
async fn history(settings: &Settings, fixture: &Fixture, figures: &mut Figures) -> Result<()> {
    let api = &fixture.api;
    let admin = &fixture.admin;
    let (long, _) = api
        .create_product(
            admin,
            "BENCH-LONG",
            "Long history",
            "Restocked many times",
            500,
            0,
        )
        .await?;
    let (short, _) = api
        .create_product(
            admin,
            "BENCH-SHORT",
            "Short history",
            "Restocked a few times",
            500,
            0,
        )
        .await?;
    for _ in 1..10 {
        expect_ok(api.restock(admin, short, 1).await)?;
    }
    let target = settings.history_events.saturating_sub(1);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    try_join_all((0..4).map(|_| {
        let (api, admin, done) = (api.clone(), admin.clone(), Arc::clone(&done));
        async move {
            while done.load(Ordering::Relaxed) < target {
                match api.restock(&admin, long, 1).await {
                    Outcome::Ok(_) => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Outcome::Refused(_) => {}
                    Outcome::Failed(why) => bail!("building the long history: {why}"),
                }
            }
            Ok(())
        }
    }))
    .await?;
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'product' AND aggregate_id = $1",
    )
    .bind(long.to_string())
    .fetch_one(&fixture.pool)
    .await?;
    log(format!(
        "long history: {events} events in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    put(figures, "s2.long_events", events as f64);
    wait_idle(&fixture.pool).await?;

    // One client, taking turns, so every kind sees the same machine at the same moments:
    // a restock of each product, and an order of each (placing one reads its product
    // first; with no stock the order process rejects it, so the product's history stays).
    let kinds = [
        ("restock", "long", long),
        ("restock", "short", short),
        ("order", "long", long),
        ("order", "short", short),
    ];
    let samples: Arc<Vec<Mutex<Vec<u32>>>> =
        Arc::new(kinds.iter().map(|_| Mutex::new(Vec::new())).collect());
    let (api, admin, customer) = (
        fixture.api.clone(),
        fixture.admin.clone(),
        fixture.customers[0].clone(),
    );
    let into = Arc::clone(&samples);
    let all = closed_loop(1, settings.warmup, settings.duration, move |_, i| {
        let (api, admin, customer) = (api.clone(), admin.clone(), customer.clone());
        let into = Arc::clone(&into);
        async move {
            let kind = i as usize % kinds.len();
            let (command, _, product) = kinds[kind];
            let sent = Instant::now();
            let outcome = if command == "restock" {
                api.restock(&admin, product, 1).await
            } else {
                api.place_order(&customer, product, 1).await
            };
            if let Ok(mut list) = into[kind].lock() {
                list.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            outcome
        }
    })
    .await;
    if all.failed > 0 {
        bail!("history commands failed: {:?}", all.first_failure);
    }
    // The warm-up's requests are in the lists too; drop as many as were not measured.
    for ((command, history, _), list) in kinds.iter().zip(samples.iter()) {
        let mut values = list.lock().map(|v| v.clone()).unwrap_or_default();
        let skip = values.len().saturating_sub(all.count() / kinds.len());
        values.drain(..skip);
        values.sort_unstable();
        let p50 = quantile(&values, 0.50) as f64 / 1000.0;
        let p99 = quantile(&values, 0.99) as f64 / 1000.0;
        put(figures, format!("s2.{command}.{history}.p50"), p50);
        put(figures, format!("s2.{command}.{history}.p99"), p99);
        log(format!(
            "history {command} {history}: p50 {p50:.2} ms, p99 {p99:.2} ms over {}",
            values.len()
        ));
    }
    Ok(())
}

fn expect_ok(outcome: Outcome) -> Result<()> {
    match outcome {
        Outcome::Ok(_) => Ok(()),
        other => bail!("a setup command failed: {other:?}"),
    }
}

const WORDS: [&str; 16] = [
    "oak", "linen", "copper", "walnut", "wool", "stone", "glass", "cedar", "brass", "clay",
    "maple", "slate", "cotton", "birch", "iron", "amber",
];

/// The filtered listing of scenario 5.
pub const LISTING: &str = "status=active&min_price=1000&max_price=20000&sort=price&limit=20";

/// Scenario 5: single-product GETs and a filtered listing at 32 connections; the maximum
/// rate (closed loop), then the latency at half of it (open loop).
async fn reads(
    settings: &Settings,
    database: &Database,
    fixture: &Fixture,
    figures: &mut Figures,
) -> Result<()> {
    let (api, admin) = (&fixture.api, &fixture.admin);
    let chunk = settings.read_products.div_ceil(16);
    let created = try_join_all((0..16).map(|worker| {
        let (api, admin) = (api.clone(), admin.clone());
        async move {
            let mut ids = Vec::with_capacity(chunk);
            for i in worker * chunk..((worker + 1) * chunk).min(settings.read_products) {
                let name = format!("{} {} {i}", WORDS[i % 16], WORDS[(i / 16) % 16]);
                let description = format!(
                    "Made of {} and {}",
                    WORDS[(i * 7) % 16],
                    WORDS[(i * 3) % 16]
                );
                let price = 100 + (i as i64 * 7_919) % 50_000;
                let (id, _) = api
                    .create_product(
                        &admin,
                        &format!("BENCH-R{i}"),
                        &name,
                        &description,
                        price,
                        100,
                    )
                    .await?;
                ids.push(id);
            }
            anyhow::Ok(ids)
        }
    }))
    .await?;
    let ids: Arc<Vec<Uuid>> = Arc::new(created.into_iter().flatten().collect());
    wait_idle(&fixture.pool).await?;

    let raw = baseline::raw_point_reads(
        &database.url,
        32,
        ids.to_vec(),
        settings.warmup,
        settings.duration,
    );
    let raw = metered(settings, &fixture.meter, figures, "s5.raw_get.32", raw).await?;
    put_sample(figures, "s5.raw_get.32", &raw);

    let get = |api: Api, ids: Arc<Vec<Uuid>>| {
        move |k: usize| {
            let api = api.clone();
            let id = ids[(k * 7_919) % ids.len()];
            async move { api.get_product(id).await }
        }
    };
    let one = get(api.clone(), Arc::clone(&ids));
    let max_get = closed_loop(32, settings.warmup, settings.duration, move |client, i| {
        one(client * 1_000_003 + i as usize)
    });
    let max_get = metered(settings, &fixture.meter, figures, "s5.get_max.32", max_get).await;
    put_sample(figures, "s5.get_max.32", &max_get);

    let list_api = api.clone();
    let max_list = closed_loop(32, settings.warmup, settings.duration, move |_, _| {
        let api = list_api.clone();
        async move { api.list_products(LISTING).await }
    })
    .await;
    put_sample(figures, "s5.list_max.32", &max_list);

    let one = get(api.clone(), Arc::clone(&ids));
    let half_get = open_loop(
        max_get.rate() / 2.0,
        32,
        settings.warmup,
        settings.duration,
        move |k| one(k as usize),
    );
    let half_get = metered(
        settings,
        &fixture.meter,
        figures,
        "s5.get_half.32",
        half_get,
    )
    .await;
    put_sample(figures, "s5.get_half.32", &half_get);

    // The machine's own latency for the same reads at the same rate, without the server.
    let raw_half = baseline::raw_point_reads_at(
        &database.url,
        max_get.rate() / 2.0,
        32,
        ids.to_vec(),
        settings.warmup,
        settings.duration,
    );
    let raw_half = metered(
        settings,
        &fixture.meter,
        figures,
        "s5.raw_get_half.32",
        raw_half,
    )
    .await?;
    put_sample(figures, "s5.raw_get_half.32", &raw_half);

    let list_api = api.clone();
    let half_list = open_loop(
        max_list.rate() / 2.0,
        32,
        settings.warmup,
        settings.duration,
        move |_| {
            let api = list_api.clone();
            async move { api.list_products(LISTING).await }
        },
    )
    .await;
    put_sample(figures, "s5.list_half.32", &half_list);
    Ok(())
}

/// Polls a process's memory while a phase runs, keeping the largest resident size.
struct MemorySampler {
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl MemorySampler {
    fn start(server: &Server) -> Self {
        let peak = Arc::new(AtomicU64::new(0));
        let pid = server.pid();
        let task = {
            let peak = Arc::clone(&peak);
            tokio::spawn(async move {
                loop {
                    if let Some(memory) = pid.and_then(server::memory_of) {
                        peak.fetch_max(memory.peak.max(memory.rss), Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        Self { peak, task }
    }

    /// Stops sampling; the answer includes the kernel's own high-water mark.
    fn stop(self, server: &Server) -> u64 {
        self.task.abort();
        let Memory { peak, .. } = server.memory().unwrap_or_default();
        self.peak.load(Ordering::Relaxed).max(peak)
    }
}

/// Scenario 4: a history of `rebuild_events` events seeded once, served until every read
/// model is live, then rebuilt with `hindsight projections rebuild --all` once per run.
pub async fn rebuild(env: &Environment, settings: &Settings, runs: usize) -> Result<Vec<Figures>> {
    let database = Database::create(env, "rebuild").await?;
    let result = rebuild_on(env, settings, runs, &database).await;
    if settings.keep_rebuild_database {
        log(format!("kept database {}", database.name));
    } else {
        database.drop_now().await.ok();
    }
    result
}

async fn rebuild_on(
    env: &Environment,
    settings: &Settings,
    runs: usize,
    database: &Database,
) -> Result<Vec<Figures>> {
    let config = server::Config::new(env, database, "rebuild", &[]);
    config.cli(env, &["migrate"], None).await?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(baseline::options(&database.url)?)
        .await?;
    let started = Instant::now();
    let mut last_report = Instant::now();
    let seeded = seed::seed(&pool, settings.rebuild_events, |written| {
        if last_report.elapsed() > Duration::from_secs(5) {
            log(format!("seeded {written} events"));
            last_report = Instant::now();
        }
    })
    .await?;
    let seed_seconds = started.elapsed().as_secs_f64();
    log(format!("seeded {seeded} events in {seed_seconds:.1} s"));
    config
        .cli(env, &["events", "check"], None)
        .await
        .context("the seeded history does not read back")?;

    // The seeded orders went through their whole life already: the order process has no
    // decision left to make about them.
    let head: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events")
        .fetch_one(&pool)
        .await?;
    sqlx::query(
        "INSERT INTO projection_checkpoints (name, position, status) VALUES ('order_process', $1, 'live') \
         ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position",
    )
    .bind(head)
    .execute(&pool)
    .await?;

    let started = Instant::now();
    let server = Server::start_with(env, config.clone()).await?;
    let caught_up = async {
        let deadline = Instant::now() + Duration::from_secs(1_800);
        loop {
            let behind: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM unnest($1::text[]) AS m(name) \
                 LEFT JOIN projection_checkpoints c USING (name) \
                 WHERE coalesce(c.position, 0) < $2",
            )
            .bind(read_models())
            .bind(head)
            .fetch_one(&pool)
            .await?;
            if behind == 0 {
                return anyhow::Ok(());
            }
            if Instant::now() > deadline {
                bail!("the read models did not catch up with the seeded history in 30 minutes");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    .await;
    let catch_up_seconds = started.elapsed().as_secs_f64();
    let stream = server.stream.clone();
    server.stop().await?;
    server::delete_stream(&env.nats_url, &stream).await.ok();
    caught_up?;
    log(format!(
        "live read models caught up with {seeded} events in {catch_up_seconds:.1} s"
    ));

    let mut all = Vec::with_capacity(runs);
    for run in 0..runs {
        let mut figures = Figures::new();
        put(&mut figures, "s4.events", seeded as f64);
        put(&mut figures, "s4.seed_rate", seeded as f64 / seed_seconds);
        put(
            &mut figures,
            "s4.catch_up_rate",
            seeded as f64 / catch_up_seconds,
        );

        let (scanned, scan_seconds) = baseline::raw_event_scan(&database.url).await?;
        put(
            &mut figures,
            "s4.raw_scan_rate",
            scanned as f64 / scan_seconds,
        );

        let (seconds, memory) = config
            .timed_cli(env, &["projections", "rebuild", "--all"])
            .await?;
        let rate = seeded as f64 / seconds;
        put(&mut figures, "s4.rate", rate);
        put(
            &mut figures,
            "s4.per_model_rate",
            rate * read_models().len() as f64,
        );
        put(&mut figures, "s4.seconds", seconds);
        put(&mut figures, "s4.peak_rss_mb", mb(memory.peak));
        put(&mut figures, "s4.early_rss_mb", mb(memory.early));
        put(&mut figures, "s4.late_rss_mb", mb(memory.late));
        log(format!(
            "rebuild {}: {seeded} events into {} read models in {seconds:.1} s ({rate:.0} events/s; raw scan {:.0}/s); RSS early {:.1} MB, late {:.1} MB, peak {:.1} MB",
            run + 1,
            read_models().len(),
            scanned as f64 / scan_seconds,
            mb(memory.early),
            mb(memory.late),
            mb(memory.peak),
        ));
        all.push(figures);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timed(warmup_ms: u64, duration_ms: u64) -> Settings {
        Settings {
            scenarios: Vec::new(),
            warmup: Duration::from_millis(warmup_ms),
            duration: Duration::from_millis(duration_ms),
            history_events: 0,
            rebuild_events: 0,
            read_products: 0,
            keep_rebuild_database: false,
            lag_timeline: None,
        }
    }

    #[tokio::test]
    async fn a_phase_that_runs_its_window_records_the_cores_busy() {
        let mut figures = Figures::new();
        let phase = tokio::time::sleep(Duration::from_millis(400));
        metered(
            &timed(100, 250),
            &Meter {
                server_pid: Some(std::process::id()),
                database: None,
            },
            &mut figures,
            "p",
            phase,
        )
        .await;
        let keys: Vec<&str> = figures.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            ["p.machine_cores", "p.server_cores", "p.stolen_cores"]
        );
    }

    #[tokio::test]
    async fn a_phase_that_ends_early_records_nothing_and_does_not_wait_for_its_window() {
        let mut figures = Figures::new();
        let started = Instant::now();
        metered(
            &timed(100, 60_000),
            &Meter {
                server_pid: Some(std::process::id()),
                database: None,
            },
            &mut figures,
            "p",
            async {},
        )
        .await;
        assert!(figures.is_empty(), "{figures:?}");
        // Waiting the window out would take a minute; the grace is a second.
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn postgres_cores_count_the_sessions_there_at_both_ends_by_component() {
        let before = [
            (1, "statements", 10.0),
            (2, "statements", 4.0),
            (3, "relay", 1.0),
            (4, "pool", 2.0),
        ];
        // 2 was closed, 5 opened, and 3's id went to another component's session.
        let after = [
            (1, "statements", 12.0),
            (3, "audit_trail", 1.5),
            (4, "pool", 2.5),
            (5, "statements", 1.0),
        ];
        let cores = postgres_cores(&before, &after, 2.0);
        assert_eq!(
            cores.into_iter().collect::<Vec<_>>(),
            [("pool", 0.25), ("statements", 1.0)]
        );
    }

    #[test]
    fn a_phase_gives_postgres_cpu_per_request_by_component_and_in_all() {
        let mut figures = Figures::new();
        figures.insert("p.pg_cores.relay".into(), 0.1);
        figures.insert("p.pg_cores.statements".into(), 0.5);
        figures.insert("q.pg_cores.relay".into(), 9.0);
        let mut sample = Sample::default();
        sample.ok = 1_000;
        sample.seconds = 1.0;
        put_sample(&mut figures, "p", &sample);
        let per_request = |component: &str| figures[&format!("p.pg_cpu_us.{component}")];
        assert!((per_request("relay") - 100.0).abs() < 1e-6);
        assert!((per_request("statements") - 500.0).abs() < 1e-6);
        assert!((per_request("total") - 600.0).abs() < 1e-6);
        assert!(!figures.contains_key("q.pg_cpu_us.relay"));
        assert!(!figures.keys().any(|key| key.starts_with("p.pg_cores.")));

        // A baseline's phase: the server's sessions idle.
        figures.insert("b.pg_cores.relay".into(), 0.0);
        put_sample(&mut figures, "b", &sample);
        assert!(!figures.keys().any(|key| key.starts_with("b.pg_")));
    }

    #[test]
    fn each_command_waits_for_the_first_progress_that_reaches_it() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let acked = [(at(0), 5), (at(1), 7), (at(2), 9)];
        // A notification for 8 arrives before one for 6: 6 is reached at 10 ms all the same.
        let applied = [(at(4), 5), (at(10), 8), (at(12), 6)];
        assert_eq!(
            lags_in_order(&acked, &applied),
            vec![Some(4_000), Some(9_000), None]
        );
        assert_eq!(lags(&acked, &applied), (vec![4_000, 9_000], 1));
        let timeline = lag_timeline(&acked, &applied, &applied[..1]);
        let lines: Vec<&str> = timeline.lines().skip(1).collect();
        assert_eq!(lines, ["0 5 4000 4000", "1000 7 9000 -1", "2000 9 -1 -1"]);
    }
}
