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
use hindsight_api::state::{AppState, HttpSettings, Services};
use hindsight_commands::{db, CommandBus, StoreSettings};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};

/// Where the tests find a Postgres server on which they may create databases.
pub fn admin_database_url() -> String {
    std::env::var("HINDSIGHT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres:hindsight@127.0.0.1:5432/postgres".to_owned())
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
        // Read as the server reads DATABASE_URL.
        let options = db::connect_options(&admin_database_url())
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

    /// Positions drawn that no stored event took: every refused append (a conflict)
    /// uses up one per row it tried to insert.
    pub async fn unused_positions(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END \
                    - (SELECT count(*) FROM events) \
             FROM events_position_seq",
        )
        .fetch_one(&self.pool)
        .await
        .expect("counting the positions in use")
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

/// The integrity-checkpoint key of test apps.
pub const TEST_AUDIT_KEY: &str = "test-audit-key-test-audit-key-0123456789abcdef";

/// The signing secret of test apps (tests forge tokens with it to attack the API).
pub const TEST_JWT_SECRET: &str = "test-secret-test-secret-test-secret-0123456789";

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
        Self::spawn_with(db, |_| {}).await
    }

    /// Spawns the app after `configure` adjusted its state.
    pub async fn spawn_with(db: &TestDb, configure: impl FnOnce(&mut Services)) -> Self {
        let nats = nats_client().await;
        let progress = hindsight_projections::progress::ProjectionProgress::start(
            db.pool.clone(),
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .expect("listen for projection progress");
        let access = hindsight_api::access::AccessCache::start(
            db.pool.clone(),
            std::time::Duration::from_secs(60),
            tokio_util::sync::CancellationToken::new(),
        )
        .await
        .expect("listen for access changes");
        let mut services = Services {
            commands: db.commands(StoreSettings::default()),
            pool: db.pool.clone(),
            nats: Some(nats),
            passwords: Passwords::new(2).expect("argon2 parameters are valid"),
            progress,
            settings: Arc::new(HttpSettings::default()),
            tokens: Arc::new(hindsight_api::auth::Tokens::new(
                TEST_JWT_SECRET.as_bytes(),
                "hindsight",
                "hindsight-api",
                std::time::Duration::from_secs(900),
                std::time::Duration::from_secs(30 * 24 * 3600),
            )),
            access,
            login_throttle: Arc::new(hindsight_api::routes::auth::LoginThrottle::per_hour(100)),
            // Off by default: tests send many requests from one address. The rate-limit
            // test switches them on with `spawn_with`.
            rate_limits: None,
            integrity_key: Arc::new(
                hindsight_commands::integrity::IntegrityKey::new(TEST_AUDIT_KEY.as_bytes())
                    .expect("a valid test key"),
            ),
        };
        configure(&mut services);
        let state = AppState::new(services);
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

/// Connects to the test NATS server, failing loudly when it is not there.
pub async fn nats_client() -> async_nats::Client {
    async_nats::connect(nats_url())
        .await
        .unwrap_or_else(|error| {
            panic!(
                "NATS is not reachable at {} ({error}). System tests need a real NATS with \
             JetStream: start it with `scripts/services.sh up` or set HINDSIGHT_TEST_NATS_URL.",
                nats_url()
            )
        })
}

/// A JetStream stream name and subject prefix of one test's own, deleted on drop.
#[derive(Debug)]
pub struct TestStream {
    pub client: async_nats::Client,
    pub stream: String,
    pub prefix: String,
    url: String,
}

/// One message read back from a test stream.
#[derive(Debug, Clone)]
pub struct Published {
    pub sequence: u64,
    pub subject: String,
    pub message_id: String,
    pub position: i64,
    pub previous: i64,
    pub event: hindsight_commands::StoredEvent,
}

impl TestStream {
    pub async fn new() -> Self {
        Self::on(nats_url()).await
    }

    /// Names on a given NATS server (for tests that run their own server).
    pub async fn on(url: String) -> Self {
        let client = async_nats::connect(&url)
            .await
            .unwrap_or_else(|error| panic!("NATS is not reachable at {url} ({error})"));
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            client,
            stream: format!("hindsight_test_{id}"),
            prefix: format!("hindsight_test.{id}"),
            url,
        }
    }

    pub fn relay_settings(&self) -> hindsight_commands::relay::RelaySettings {
        hindsight_commands::relay::RelaySettings::new(&self.stream, &self.prefix)
    }

    pub fn worker_settings(&self) -> hindsight_projections::worker::WorkerSettings {
        hindsight_projections::worker::WorkerSettings::new(&self.stream, &self.prefix)
    }

    /// Every message in the stream, in stream order.
    pub async fn messages(&self) -> Vec<Published> {
        let jetstream = async_nats::jetstream::new(self.client.clone());
        let mut stream = match jetstream.get_stream(&self.stream).await {
            Ok(stream) => stream,
            Err(_) => return Vec::new(),
        };
        let last = stream
            .info()
            .await
            .expect("stream info")
            .state
            .last_sequence;
        let mut messages = Vec::new();
        for sequence in 1..=last {
            let Ok(message) = stream.get_raw_message(sequence).await else {
                continue;
            };
            let header = |name: &str| {
                message
                    .headers
                    .get(name)
                    .map(|value| value.as_str().to_owned())
                    .unwrap_or_default()
            };
            messages.push(Published {
                sequence,
                subject: message.subject.to_string(),
                message_id: header("Nats-Msg-Id"),
                position: header("Hindsight-Position")
                    .parse()
                    .expect("position header"),
                previous: header("Hindsight-Previous-Position")
                    .parse()
                    .expect("previous header"),
                event: serde_json::from_slice(&message.payload).expect("event body"),
            });
        }
        messages
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let stream = self.stream.clone();
        let url = self.url.clone();
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("cleanup runtime");
            runtime.block_on(async move {
                if let Ok(client) = async_nats::connect(&url).await {
                    let jetstream = async_nats::jetstream::new(client);
                    jetstream.delete_stream(&stream).await.ok();
                }
            });
        });
        cleanup.join().ok();
    }
}

/// Polls `check` every 20 ms until it holds, failing the test after `seconds`.
pub async fn eventually<F, Fut>(seconds: u64, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("timed out after {seconds} s waiting for: {what}");
}

/// Appends one raw event of aggregate type `test` in an open transaction, returning its
/// position; the caller decides when (or whether) the transaction commits.
pub async fn append_raw_event(
    tx: &mut sqlx::PgConnection,
    aggregate_id: &str,
    sequence: i64,
    event_type: &str,
) -> i64 {
    let metadata = hindsight_commands::EventMetadata::for_request(
        hindsight_commands::Actor::system(),
        "raw-test-append",
    );
    sqlx::query_scalar(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('test', $1, $2, $3, '1', '{}', $4) RETURNING position",
    )
    .bind(aggregate_id)
    .bind(sequence)
    .bind(event_type)
    .bind(serde_json::to_value(metadata.to_map()).expect("metadata"))
    .fetch_one(tx)
    .await
    .expect("append a raw event")
}

/// A NATS server with JetStream of a test's own, on a free port, that the test can stop
/// and start again (its data directory survives restarts).
#[derive(Debug)]
pub struct PrivateNats {
    pub port: u16,
    dir: std::path::PathBuf,
    process: Option<std::process::Child>,
}

impl PrivateNats {
    pub fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let dir =
            std::env::temp_dir().join(format!("hindsight-nats-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("nats data directory");
        let mut nats = Self {
            port,
            dir,
            process: None,
        };
        nats.resume();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and data directory.
    pub fn resume(&mut self) {
        let binary = std::env::var("HINDSIGHT_TEST_NATS_SERVER")
            .unwrap_or_else(|_| "nats-server".to_owned());
        let child = std::process::Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot start `{binary}` ({error}): this test runs a NATS server of its own; install nats-server or set HINDSIGHT_TEST_NATS_SERVER")
            });
        self.process = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "private nats-server did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.process.take() {
            child.kill().ok();
            child.wait().ok();
        }
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// The whole system for HTTP tests: a database, a stream, the app, the relay and every
/// read model's worker. Everything stops and is removed on drop.
#[derive(Debug)]
pub struct TestSystem {
    pub app: TestApp,
    pub stream: TestStream,
    pub db: TestDb,
    stop: tokio_util::sync::CancellationToken,
}

/// A signed-in test user.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: uuid::Uuid,
    pub email: String,
    pub password: String,
    pub access_token: String,
    pub refresh_token: String,
}

impl TestSystem {
    pub async fn start() -> Self {
        let db = TestDb::new().await;
        let stream = TestStream::new().await;
        let app = TestApp::spawn(&db).await;
        let stop = tokio_util::sync::CancellationToken::new();
        let relay = hindsight_commands::relay::Relay::new(
            db.pool.clone(),
            stream.client.clone(),
            stream.relay_settings(),
        )
        .with_local_appends(app.state.commands.appends().watch());
        tokio::spawn(relay.run(stop.clone()));
        for worker in hindsight_projections::workers(
            &db.pool,
            &stream.client,
            app.state.commands.clone(),
            &stream.worker_settings(),
        ) {
            tokio::spawn(worker.run(stop.clone()));
        }
        Self {
            app,
            stream,
            db,
            stop,
        }
    }

    pub fn url(&self, path: &str) -> String {
        self.app.url(path)
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.app.client
    }

    /// `POST /api/v1/products` with `product` as the holder of `token`, which must answer
    /// 201; answers the created product as the API returned it.
    pub async fn create_product(
        &self,
        token: &str,
        product: serde_json::Value,
    ) -> serde_json::Value {
        let response = self
            .client()
            .post(self.url("/api/v1/products"))
            .bearer_auth(token)
            .json(&product)
            .send()
            .await
            .expect("POST /api/v1/products");
        assert_eq!(
            response.status(),
            reqwest::StatusCode::CREATED,
            "creating a product"
        );
        response.json().await.expect("the created product")
    }

    /// Creates a user with `role` through the command layer (as `hindsight user create`
    /// does) and signs them in over HTTP.
    pub async fn user(&self, role: hindsight_domain::role::Role) -> TestUser {
        use hindsight_domain::user::{PasswordHash, UserCommand};
        use hindsight_domain::values::{Email, PersonName};
        let id = hindsight_domain::ids::UserId::new();
        let email = format!(
            "{}-{}@example.com",
            role.as_str(),
            uuid::Uuid::new_v4().simple()
        );
        let password = "correct horse battery staple".to_owned();
        let hash = self
            .app
            .state
            .passwords
            .hash(&secrecy::SecretString::from(password.clone()))
            .await
            .expect("hash");
        self.app
            .state
            .commands
            .users
            .execute(
                id.as_uuid(),
                UserCommand::Register {
                    user_id: id,
                    email: Email::parse(&email).expect("email"),
                    name: PersonName::parse("Test User").expect("name"),
                    password_hash: PasswordHash::new(hash).expect("hash"),
                    role,
                },
                &hindsight_commands::EventMetadata::for_request(
                    hindsight_commands::Actor::system(),
                    "test-setup",
                ),
                None,
            )
            .await
            .expect("store")
            .expect("registered");
        let tokens = self.login(&email, &password).await;
        TestUser {
            id: id.as_uuid(),
            email,
            password,
            access_token: tokens["access_token"].as_str().expect("access").to_owned(),
            refresh_token: tokens["refresh_token"]
                .as_str()
                .expect("refresh")
                .to_owned(),
        }
    }

    pub async fn login(&self, email: &str, password: &str) -> serde_json::Value {
        let response = self
            .client()
            .post(self.url("/api/v1/auth/login"))
            .json(&serde_json::json!({ "email": email, "password": password }))
            .send()
            .await
            .expect("login request");
        assert_eq!(response.status(), 200, "login of {email}");
        response.json().await.expect("login body")
    }
}

impl Drop for TestSystem {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
