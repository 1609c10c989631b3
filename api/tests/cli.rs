//! The `hindsight` binary as an operator runs it: `--help`, `migrate` and `user create`
//! against a real Postgres, in a database of the test's own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use sqlx::{Connection, PgConnection};

const BIN: &str = env!("CARGO_BIN_EXE_hindsight");

fn admin_url() -> String {
    std::env::var("HINDSIGHT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// A throwaway database, dropped on drop.
struct Database {
    name: String,
    url: String,
}

impl Database {
    fn create() -> Self {
        let admin = admin_url();
        let name = format!("hindsight_cli_{}", uuid::Uuid::new_v4().simple());
        admin_sql(&format!("CREATE DATABASE {name}"));
        let base = admin
            .split_once('?')
            .map_or(admin.as_str(), |(base, _)| base);
        let url = format!(
            "{}/{name}",
            &base[..base.rfind('/').expect("URL has a database")]
        );
        Self { name, url }
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        admin_sql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ));
    }
}

fn admin_sql(statement: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let url = admin_url();
        let mut connection = PgConnection::connect(&url).await.unwrap_or_else(|error| {
            panic!("Postgres is not reachable at {url} ({error}); start it with `scripts/services.sh up`")
        });
        sqlx::query(statement).execute(&mut connection).await.unwrap();
    });
}

fn scalar(url: &str, query: &str) -> i64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut connection = PgConnection::connect(url).await.unwrap();
        sqlx::query_scalar(query)
            .fetch_one(&mut connection)
            .await
            .unwrap()
    })
}

fn hindsight(args: &[&str], database_url: &str, stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the hindsight binary starts");
    {
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

#[test]
fn every_subcommand_has_help() {
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["migrate", "--help"],
        vec!["user", "--help"],
        vec!["user", "create", "--help"],
    ] {
        let output = Command::new(BIN).args(&args).output().unwrap();
        assert!(output.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("Usage"),
            "{args:?}"
        );
    }
}

#[test]
fn a_missing_secret_is_reported_by_its_variable_name() {
    let output = Command::new(BIN)
        .args(["serve"])
        .env("DATABASE_URL", "postgres://localhost/x")
        .env(
            "HINDSIGHT_AUDIT_KEY",
            "an-audit-key-of-more-than-32-bytes-0123456789",
        )
        .env_remove("HINDSIGHT_JWT_SECRET")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("HINDSIGHT_JWT_SECRET"), "{stderr}");
}

#[test]
fn migrate_applies_everything_once_and_then_changes_nothing() {
    let db = Database::create();
    let first = hindsight(&["migrate"], &db.url, None);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stderr).contains("migration applied"));
    let applied = scalar(&db.url, "SELECT count(*) FROM _sqlx_migrations");

    let second = hindsight(&["migrate"], &db.url, None);
    assert!(second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("nothing applied"), "{stderr}");
    assert!(!stderr.contains("migration applied"), "{stderr}");
    assert_eq!(
        scalar(&db.url, "SELECT count(*) FROM _sqlx_migrations"),
        applied
    );
}

#[test]
fn user_create_reads_the_password_from_stdin_and_prints_the_user() {
    let db = Database::create();
    let output = hindsight(
        &[
            "user",
            "create",
            "--email",
            "Root@Example.com",
            "--name",
            "Root",
            "--role",
            "admin",
        ],
        &db.url,
        Some("a long enough password\n"),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["user"]["email"], "Root@Example.com");
    assert_eq!(printed["user"]["role"], "admin");
    assert_eq!(printed["user"]["version"], 1);
    assert!(printed["position"].as_i64().unwrap() > 0);
    let stored_hash = scalar(
        &db.url,
        "SELECT count(*) FROM events WHERE payload -> 'UserRegistered' ->> 'password_hash' LIKE '$argon2id$%'",
    );
    assert_eq!(stored_hash, 1);

    // The same address in another spelling is taken; nothing more is stored.
    let again = hindsight(
        &[
            "user",
            "create",
            "--email",
            "root@example.com",
            "--name",
            "Other",
            "--role",
            "admin",
        ],
        &db.url,
        Some("another long password\n"),
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("EMAIL_TAKEN"));
    assert_eq!(scalar(&db.url, "SELECT count(*) FROM events"), 1);
}

#[test]
fn user_create_refuses_bad_input_and_stores_nothing() {
    let db = Database::create();
    let short = hindsight(
        &["user", "create", "--email", "a@example.com", "--name", "A"],
        &db.url,
        Some("short\n"),
    );
    assert!(!short.status.success());
    assert!(String::from_utf8_lossy(&short.stderr).contains("8 to 128"));

    let bad_email = hindsight(
        &["user", "create", "--email", "not-an-email", "--name", "A"],
        &db.url,
        Some("long enough password\n"),
    );
    assert!(!bad_email.status.success());
    assert!(String::from_utf8_lossy(&bad_email.stderr).contains("--email"));

    let bad_role = hindsight(
        &[
            "user",
            "create",
            "--email",
            "a@example.com",
            "--name",
            "A",
            "--role",
            "root",
        ],
        &db.url,
        Some("long enough password\n"),
    );
    assert!(!bad_role.status.success());

    let no_password = hindsight(
        &["user", "create", "--email", "a@example.com", "--name", "A"],
        &db.url,
        Some(""),
    );
    assert!(!no_password.status.success());
    assert!(String::from_utf8_lossy(&no_password.stderr).contains("standard input"));
}

#[test]
fn projections_are_listed_and_rebuilt_from_the_command_line() {
    let db = Database::create();
    let created = hindsight(
        &[
            "user",
            "create",
            "--email",
            "ops@example.com",
            "--name",
            "Ops",
            "--role",
            "operator",
        ],
        &db.url,
        Some("a long enough password\n"),
    );
    assert!(created.status.success());

    let list = hindsight(&["projections", "list"], &db.url, None);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let table = String::from_utf8_lossy(&list.stdout);
    for name in [
        "users",
        "products",
        "orders",
        "sales",
        "audit_trail",
        "order_process",
    ] {
        assert!(table.contains(name), "{name} missing from:\n{table}");
    }

    let rebuilt = hindsight(&["projections", "rebuild", "--all"], &db.url, None);
    assert!(
        rebuilt.status.success(),
        "{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    assert!(String::from_utf8_lossy(&rebuilt.stderr).contains("users: rebuilt from"));

    let status = hindsight(&["projections", "status", "users"], &db.url, None);
    assert!(status.status.success());
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["name"], "users");
    assert_eq!(status["rebuild"]["status"], "done");

    let unknown = hindsight(&["projections", "rebuild", "nonsense"], &db.url, None);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("nonsense"));
}

#[test]
fn events_are_exported_as_redacted_ndjson() {
    let db = Database::create();
    for email in ["one@example.com", "two@example.com"] {
        let created = hindsight(
            &["user", "create", "--email", email, "--name", "Someone"],
            &db.url,
            Some("a long enough password\n"),
        );
        assert!(created.status.success());
    }
    let file =
        std::env::temp_dir().join(format!("hindsight-export-{}.ndjson", uuid::Uuid::new_v4()));
    let exported = hindsight(
        &[
            "events",
            "export",
            "--aggregate-type",
            "user",
            "--output",
            file.to_str().unwrap(),
        ],
        &db.url,
        None,
    );
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::remove_file(&file).ok();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(events.len(), 2);
    assert!(events[0]["position"].as_i64() < events[1]["position"].as_i64());
    assert_eq!(
        events[0]["payload"]["UserRegistered"]["password_hash"],
        "[REDACTED]"
    );
    assert!(!text.contains("$argon2id$"));

    let to_stdout = hindsight(&["events", "export", "--after", "1"], &db.url, None);
    assert!(to_stdout.status.success());
    assert_eq!(
        String::from_utf8_lossy(&to_stdout.stdout).lines().count(),
        1
    );
}

fn sql(url: &str, statement: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut connection = PgConnection::connect(url).await.unwrap();
        sqlx::query(statement)
            .execute(&mut connection)
            .await
            .unwrap();
    });
}

#[test]
fn events_check_and_serve_refuse_a_store_this_build_cannot_read() {
    let db = Database::create();
    let created = hindsight(
        &[
            "user",
            "create",
            "--email",
            "fine@example.com",
            "--name",
            "Fine",
        ],
        &db.url,
        Some("a long enough password\n"),
    );
    assert!(created.status.success());
    let check = hindsight(&["events", "check"], &db.url, None);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(String::from_utf8_lossy(&check.stdout).contains("UserRegistered"));

    sql(
        &db.url,
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('order', 'x', 1, 'OrderShipped', '9', '{\"OrderShipped\": [1]}', '{}')",
    );
    let check = hindsight(&["events", "check"], &db.url, None);
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("OrderShipped version 9"));

    let serve = Command::new(BIN)
        .args(["serve"])
        .env("DATABASE_URL", &db.url)
        .env(
            "HINDSIGHT_JWT_SECRET",
            "0123456789abcdef0123456789abcdef0123",
        )
        .env("HINDSIGHT_LISTEN_ADDR", "127.0.0.1:0")
        .env(
            "HINDSIGHT_AUDIT_KEY",
            "an-audit-key-of-more-than-32-bytes-0123456789",
        )
        .output()
        .unwrap();
    assert!(!serve.status.success());
    assert!(String::from_utf8_lossy(&serve.stderr).contains("OrderShipped version 9"));
}
