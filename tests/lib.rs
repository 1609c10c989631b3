//! Helpers for Hindsight's black-box system tests: a fresh Postgres database per test,
//! unique JetStream names per test, and the HTTP app served on an ephemeral port.
//!
//! Every fixture fails loudly, naming what is missing, when Postgres or NATS cannot be
//! reached: a system test never silently skips. Databases are dropped when their
//! fixture is dropped.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use hindsight_api::password::Passwords;
use hindsight_api::state::{AppState, HttpSettings};
use hindsight_commands::{db, CommandBus, StoreSettings};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};
use std::str::FromStr;

/// Where the tests find a Postgres server on which they may create databases.
pub fn admin_database_url() -> String {
    std::env::var("HINDSIGHT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Where the tests find NATS with JetStream.
pub fn nats_url() -> String {
    std::env::var("HINDSIGHT_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

async fn admin_connection() -> PgConnection {
    let url = admin_database_url();
    match PgConnection::connect(&url).await {
        Ok(connection) => connection,
        Err(error) => panic!(
            "Postgres is not reachable at {url} ({error}). System tests need a real Postgres: \
             start it with `scripts/services.sh up` or point HINDSIGHT_TEST_DATABASE_URL at one."
        ),
    }
}

/// A database of its own for one test, migrated, dropped on drop.
#[derive(Debug)]
pub struct TestDb {
    pub pool: PgPool,
    pub name: String,
    options: PgConnectOptions,
}

impl TestDb {
    /// A new, fully migrated database.
    pub async fn new() -> Self {
        let db = Self::empty().await;
        db::migrate(&db.pool).await.expect("migrations apply");
        db
    }

    /// A new database with no tables at all.
    pub async fn empty() -> Self {
        let name = format!("hindsight_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = admin_connection().await;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        admin.close().await.ok();
        let options = PgConnectOptions::from_str(&admin_database_url())
            .expect("HINDSIGHT_TEST_DATABASE_URL is a postgres URL")
            .database(&name);
        let pool = db::pool(options.clone(), 20);
        Self {
            pool,
            name,
            options,
        }
    }

    /// The URL of this database, for processes started by a test.
    pub fn url(&self) -> String {
        let mut url = url_without_database(&admin_database_url());
        url.push('/');
        url.push_str(&self.name);
        url
    }

    pub fn connect_options(&self) -> PgConnectOptions {
        self.options.clone()
    }

    /// A command bus over this database.
    pub fn commands(&self, settings: StoreSettings) -> CommandBus {
        CommandBus::new(self.pool.clone(), settings)
    }
}

/// `postgres://user@host:port/db?params` without `/db?params`.
fn url_without_database(url: &str) -> String {
    let base = url.split_once('?').map_or(url, |(base, _)| base);
    let scheme_end = base.find("://").map_or(0, |at| at + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |at| scheme_end + at);
    base[..path_start].to_owned()
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // The pool's connections belong to the test's runtime, which is blocked here, so
        // they are not closed politely: the server terminates them as it drops the
        // database. A thread with its own runtime does that, since drop is not async.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                let mut admin = admin_connection().await;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&mut admin)
                    .await
                    .ok();
                admin.close().await.ok();
            });
        });
        cleanup.join().ok();
    }
}

/// The HTTP app served on an ephemeral loopback port.
#[derive(Debug)]
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub state: AppState,
    server: tokio::task::JoinHandle<()>,
}

impl TestApp {
    pub async fn spawn(db: &TestDb) -> Self {
        let nats = async_nats::connect(nats_url())
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "NATS is not reachable at {} ({error}). System tests need a real NATS with \
                 JetStream: start it with `scripts/services.sh up` or set HINDSIGHT_TEST_NATS_URL.",
                    nats_url()
                )
            });
        let state = AppState {
            commands: db.commands(StoreSettings::default()),
            pool: db.pool.clone(),
            nats: Some(nats),
            passwords: Passwords::new(2).expect("argon2 parameters are valid"),
            settings: Arc::new(HttpSettings::default()),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        let addr = listener.local_addr().expect("local address");
        let app = hindsight_api::build_app(state.clone());
        let server = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await
            .ok();
        });
        Self {
            addr,
            client: reqwest::Client::new(),
            state,
            server,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.server.abort();
    }
}
