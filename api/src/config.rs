//! The `hindsight` command line and its configuration: one typed struct per command, read
//! once at start-up from flags and environment variables, validated before anything
//! runs. Every error names the variable to fix; secrets are wrapped so they never print.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use hindsight_domain::role::Role;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgConnectOptions;

/// Hindsight: an event-sourced commerce backend.
#[derive(Debug, Parser)]
#[command(name = "hindsight", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub logging: LoggingArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP API, the relay and the projection workers (each can be switched off).
    Serve(Box<ServeArgs>),
    /// Apply pending database migrations and exit; a no-op when up to date.
    Migrate(DatabaseArgs),
    /// Manage users from the command line.
    #[command(subcommand)]
    User(UserCommand),
    /// Inspect and rebuild projections.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Read the event history.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Check the tamper evidence of the event history.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute every stream's hash chain and every signed checkpoint; print the report
    /// as JSON and exit non-zero naming the first broken link.
    Verify(AuditArgs),
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The key the checkpoints were signed with.
    #[arg(long, env = "HINDSIGHT_AUDIT_KEY", value_name = "HINDSIGHT_AUDIT_KEY", value_parser = parse_audit_key, hide_env_values = true)]
    pub audit_key: AuditKey,
}

#[derive(Debug, Subcommand)]
pub enum ProjectionsCommand {
    /// Every projection with its status, position, head and lag.
    List(DatabaseArgs),
    /// One projection, with the progress of its latest rebuild.
    Status {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The projection's name (see `projections list`).
        name: String,
    },
    /// Rebuild a read model (or all) without downtime: replay into new tables while the
    /// old ones keep serving, then swap. Safe to start again after an interruption.
    Rebuild {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The projection to rebuild.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Rebuild every read model, one after another.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Export events as NDJSON (one event per line, secrets redacted), with the audit
    /// feed's filters, to a file or standard output.
    Export(ExportArgs),
    /// Prove that every stored event still deserialises through the current code and its
    /// upcasters; exits non-zero naming the first (event type, version) that does not.
    Check(DatabaseArgs),
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Only events after this global position.
    #[arg(long, default_value_t = 0)]
    pub after: i64,
    /// `user`, `product` or `order`.
    #[arg(long, value_parser = ["user", "product", "order"])]
    pub aggregate_type: Option<String>,
    #[arg(long)]
    pub aggregate_id: Option<uuid::Uuid>,
    /// The acting user.
    #[arg(long)]
    pub actor_id: Option<uuid::Uuid>,
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Recorded at or after this time (RFC 3339).
    #[arg(long)]
    pub from: Option<chrono::DateTime<chrono::Utc>>,
    /// Recorded at or before this time (RFC 3339).
    #[arg(long)]
    pub to: Option<chrono::DateTime<chrono::Utc>>,
    /// Write to this file instead of standard output.
    #[arg(long, short)]
    pub output: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user; the password is read as one line from standard input and the new
    /// user is printed as JSON on standard output.
    Create(UserCreateArgs),
}

#[derive(Debug, Args)]
pub struct UserCreateArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// The new user's e-mail address.
    #[arg(long)]
    pub email: String,
    /// The new user's display name.
    #[arg(long)]
    pub name: String,
    /// The new user's role.
    #[arg(long, default_value = "customer", value_parser = parse_role)]
    pub role: Role,
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct LoggingArgs {
    /// Log format.
    #[arg(
        long,
        env = "HINDSIGHT_LOG_FORMAT",
        value_name = "HINDSIGHT_LOG_FORMAT",
        default_value = "human",
        global = true
    )]
    pub log_format: LogFormat,
}

/// The database, needed by every command.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Postgres connection URL, e.g. postgres://user:password@127.0.0.1:5432/hindsight.
    #[arg(long, env = "DATABASE_URL", value_name = "DATABASE_URL", value_parser = parse_database_url)]
    pub database_url: DatabaseUrl,
    /// Size of each of the process's two Postgres pools (transactions; statements that run
    /// on their own): up to twice this many connections, plus leader sessions and listeners.
    #[arg(long, env = "HINDSIGHT_DB_MAX_CONNECTIONS", value_name = "HINDSIGHT_DB_MAX_CONNECTIONS", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_max_connections: u32,
    /// Take an aggregate snapshot every this many events.
    #[arg(long, env = "HINDSIGHT_SNAPSHOT_EVERY", value_name = "HINDSIGHT_SNAPSHOT_EVERY", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub snapshot_every: u32,
    /// Aggregates of each type kept in memory between commands (0 loads every time).
    #[arg(long, env = "HINDSIGHT_AGGREGATE_CACHE", value_name = "HINDSIGHT_AGGREGATE_CACHE", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub aggregate_cache: u32,
}

impl DatabaseArgs {
    /// The write path's settings.
    pub fn store_settings(&self) -> hindsight_commands::StoreSettings {
        hindsight_commands::StoreSettings {
            snapshot_every: self.snapshot_every as usize,
            cache_capacity: self.aggregate_cache as usize,
            ..hindsight_commands::StoreSettings::default()
        }
    }
}

/// Everything `serve` needs.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// NATS server URL.
    #[arg(
        long,
        env = "NATS_URL",
        value_name = "NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// JetStream stream the relay publishes to and the projections consume.
    #[arg(long, env = "HINDSIGHT_NATS_STREAM", value_name = "HINDSIGHT_NATS_STREAM", default_value = "hindsight", value_parser = parse_nats_name)]
    pub nats_stream: String,
    /// Subject prefix: events are published as `<prefix>.<aggregate_type>.<aggregate_id>`.
    #[arg(long, env = "HINDSIGHT_NATS_SUBJECT_PREFIX", value_name = "HINDSIGHT_NATS_SUBJECT_PREFIX", default_value = "hindsight", value_parser = parse_subject_prefix)]
    pub nats_subject_prefix: String,
    /// How long the stream keeps events (e.g. `7d`); unset keeps them until removed.
    /// Postgres keeps every event regardless; projections read older ranges from it.
    #[arg(long, env = "HINDSIGHT_NATS_MAX_AGE", value_name = "HINDSIGHT_NATS_MAX_AGE", value_parser = parse_duration)]
    pub nats_max_age: Option<Duration>,
    /// How long a projection's live batch waits, from its first event, for more before it
    /// is applied (`0s` applies what has arrived at once): fewer, fuller transactions at a
    /// steady rate, for at most this much more staleness.
    #[arg(long, env = "HINDSIGHT_PROJECTION_LINGER", value_name = "HINDSIGHT_PROJECTION_LINGER", default_value = "3ms", value_parser = parse_duration_or_zero)]
    pub projection_linger: Duration,

    /// Address the HTTP API listens on.
    #[arg(
        long,
        env = "HINDSIGHT_LISTEN_ADDR",
        value_name = "HINDSIGHT_LISTEN_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub listen_addr: SocketAddr,
    /// Access-token signing: `HS256` (shared secret), `EdDSA` or `RS256` (key files).
    #[arg(
        long,
        env = "HINDSIGHT_JWT_ALGORITHM",
        value_name = "HINDSIGHT_JWT_ALGORITHM",
        default_value = "HS256"
    )]
    pub jwt_algorithm: crate::auth::SigningAlgorithm,
    /// HS256 signing secret for access tokens: at least 32 bytes (required with HS256).
    #[arg(long, env = "HINDSIGHT_JWT_SECRET", value_name = "HINDSIGHT_JWT_SECRET", value_parser = parse_jwt_secret, hide_env_values = true)]
    pub jwt_secret: Option<JwtSecret>,
    /// PEM private key (PKCS#8) for EdDSA or RS256.
    #[arg(
        long,
        env = "HINDSIGHT_JWT_PRIVATE_KEY_FILE",
        value_name = "HINDSIGHT_JWT_PRIVATE_KEY_FILE"
    )]
    pub jwt_private_key_file: Option<std::path::PathBuf>,
    /// PEM public key (SPKI) for EdDSA or RS256.
    #[arg(
        long,
        env = "HINDSIGHT_JWT_PUBLIC_KEY_FILE",
        value_name = "HINDSIGHT_JWT_PUBLIC_KEY_FILE"
    )]
    pub jwt_public_key_file: Option<std::path::PathBuf>,
    /// Key (at least 32 bytes) that signs the integrity checkpoints of the event history.
    #[arg(long, env = "HINDSIGHT_AUDIT_KEY", value_name = "HINDSIGHT_AUDIT_KEY", value_parser = parse_audit_key, hide_env_values = true)]
    pub audit_key: AuditKey,
    /// How often a signed integrity checkpoint is recorded over newly published events.
    #[arg(long, env = "HINDSIGHT_AUDIT_CHECKPOINT_INTERVAL", value_name = "HINDSIGHT_AUDIT_CHECKPOINT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub audit_checkpoint_interval: Duration,
    /// `iss` claim written into and required of access tokens.
    #[arg(
        long,
        env = "HINDSIGHT_JWT_ISSUER",
        value_name = "HINDSIGHT_JWT_ISSUER",
        default_value = "hindsight"
    )]
    pub jwt_issuer: String,
    /// `aud` claim written into and required of access tokens.
    #[arg(
        long,
        env = "HINDSIGHT_JWT_AUDIENCE",
        value_name = "HINDSIGHT_JWT_AUDIENCE",
        default_value = "hindsight-api"
    )]
    pub jwt_audience: String,
    /// Lifetime of an access token.
    #[arg(long, env = "HINDSIGHT_ACCESS_TOKEN_TTL", value_name = "HINDSIGHT_ACCESS_TOKEN_TTL", default_value = "15m", value_parser = parse_duration)]
    pub access_token_ttl: Duration,
    /// Absolute lifetime of a refresh-token family.
    #[arg(long, env = "HINDSIGHT_REFRESH_TOKEN_TTL", value_name = "HINDSIGHT_REFRESH_TOKEN_TTL", default_value = "30d", value_parser = parse_duration)]
    pub refresh_token_ttl: Duration,
    /// Origins allowed by CORS, comma separated; empty allows none.
    #[arg(
        long,
        env = "HINDSIGHT_CORS_ORIGINS",
        value_name = "HINDSIGHT_CORS_ORIGINS",
        value_delimiter = ',',
        default_value = ""
    )]
    pub cors_origins: Vec<String>,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "HINDSIGHT_BODY_LIMIT", value_name = "HINDSIGHT_BODY_LIMIT", default_value_t = 64 * 1024)]
    pub body_limit: usize,
    /// Per-IP rate limits: `on` or `off` (the per-account failed-login limit always stays).
    #[arg(long, env = "HINDSIGHT_RATE_LIMITS", value_name = "HINDSIGHT_RATE_LIMITS", default_value = "on", value_parser = parse_switch)]
    pub rate_limits: bool,
    /// Requests per second allowed per client IP (burst is twice this).
    #[arg(long, env = "HINDSIGHT_RATE_LIMIT_PER_SECOND", value_name = "HINDSIGHT_RATE_LIMIT_PER_SECOND", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_per_second: u32,
    /// Calls of login, refresh and register allowed per client IP per minute.
    #[arg(long, env = "HINDSIGHT_AUTH_RATE_LIMIT_PER_MINUTE", value_name = "HINDSIGHT_AUTH_RATE_LIMIT_PER_MINUTE", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub auth_rate_limit_per_minute: u32,
    /// Failed logins allowed per account per hour.
    #[arg(long, env = "HINDSIGHT_FAILED_LOGINS_PER_HOUR", value_name = "HINDSIGHT_FAILED_LOGINS_PER_HOUR", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub failed_logins_per_hour: u32,
    /// Longest time a request may take before it is answered 503.
    #[arg(long, env = "HINDSIGHT_REQUEST_TIMEOUT", value_name = "HINDSIGHT_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Longest time a query with `min_position` waits for its read model.
    #[arg(long, env = "HINDSIGHT_PROJECTION_WAIT", value_name = "HINDSIGHT_PROJECTION_WAIT", default_value = "2s", value_parser = parse_duration)]
    pub projection_wait: Duration,
    /// How long an `Idempotency-Key` and its stored answer are kept.
    #[arg(long, env = "HINDSIGHT_IDEMPOTENCY_TTL", value_name = "HINDSIGHT_IDEMPOTENCY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_ttl: Duration,
    /// How long a caller's access (role, active, token version) is kept in memory; changes
    /// drop it at once (they are announced by the database), this only bounds the worst
    /// case. `0s` reads it from the database on every request.
    #[arg(long, env = "HINDSIGHT_ACCESS_CACHE_TTL", value_name = "HINDSIGHT_ACCESS_CACHE_TTL", default_value = "60s", value_parser = parse_duration_or_zero)]
    pub access_cache_ttl: Duration,
    /// Largest number of password hashes computed at once.
    #[arg(long, env = "HINDSIGHT_MAX_CONCURRENT_HASHES", value_name = "HINDSIGHT_MAX_CONCURRENT_HASHES", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub max_concurrent_hashes: u32,
    /// Send `Strict-Transport-Security` (set when clients reach Hindsight over TLS).
    #[arg(long, env = "HINDSIGHT_HSTS", value_name = "HINDSIGHT_HSTS", default_value = "off", value_parser = parse_switch)]
    pub hsts: bool,

    /// Run the HTTP API in this process.
    #[arg(long, env = "HINDSIGHT_RUN_API", value_name = "HINDSIGHT_RUN_API", default_value = "on", value_parser = parse_switch)]
    pub run_api: bool,
    /// Run the relay (Postgres to JetStream) in this process.
    #[arg(long, env = "HINDSIGHT_RUN_RELAY", value_name = "HINDSIGHT_RUN_RELAY", default_value = "on", value_parser = parse_switch)]
    pub run_relay: bool,
    /// Run the projection workers in this process.
    #[arg(long, env = "HINDSIGHT_RUN_PROJECTIONS", value_name = "HINDSIGHT_RUN_PROJECTIONS", default_value = "on", value_parser = parse_switch)]
    pub run_projections: bool,
}

impl ServeArgs {
    /// The token signer this configuration asks for; every error names its variable.
    pub fn tokens(&self) -> anyhow::Result<crate::auth::Tokens> {
        use crate::auth::{SigningAlgorithm, Tokens};
        match self.jwt_algorithm {
            SigningAlgorithm::Hs256 => {
                let secret = self.jwt_secret.as_ref().ok_or_else(|| {
                    anyhow::anyhow!("HINDSIGHT_JWT_SECRET is required when HINDSIGHT_JWT_ALGORITHM is HS256 (generate one with `openssl rand -base64 48`)")
                })?;
                Ok(Tokens::new(
                    secret.expose(),
                    &self.jwt_issuer,
                    &self.jwt_audience,
                    self.access_token_ttl,
                    self.refresh_token_ttl,
                ))
            }
            algorithm => {
                let read = |path: &Option<std::path::PathBuf>,
                            variable: &str|
                 -> anyhow::Result<Vec<u8>> {
                    let path = path.as_ref().ok_or_else(|| {
                        anyhow::anyhow!(
                            "{variable} is required when HINDSIGHT_JWT_ALGORITHM is {algorithm:?}"
                        )
                    })?;
                    std::fs::read(path).map_err(|error| {
                        anyhow::anyhow!("{variable} ({}) cannot be read: {error}", path.display())
                    })
                };
                let private = read(&self.jwt_private_key_file, "HINDSIGHT_JWT_PRIVATE_KEY_FILE")?;
                let public = read(&self.jwt_public_key_file, "HINDSIGHT_JWT_PUBLIC_KEY_FILE")?;
                Ok(Tokens::from_pem(
                    algorithm,
                    &private,
                    &public,
                    &self.jwt_issuer,
                    &self.jwt_audience,
                    self.access_token_ttl,
                    self.refresh_token_ttl,
                )?)
            }
        }
    }
}

/// A Postgres URL; it may hold a password, so it never prints.
#[derive(Clone)]
pub struct DatabaseUrl {
    secret: SecretString,
    options: PgConnectOptions,
}

impl DatabaseUrl {
    pub fn connect_options(&self) -> PgConnectOptions {
        self.options.clone()
    }

    pub fn expose(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DatabaseUrl([REDACTED])")
    }
}

/// The integrity-checkpoint key; never prints.
#[derive(Clone)]
pub struct AuditKey(std::sync::Arc<hindsight_commands::integrity::IntegrityKey>);

impl AuditKey {
    pub fn key(&self) -> std::sync::Arc<hindsight_commands::integrity::IntegrityKey> {
        self.0.clone()
    }
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditKey([REDACTED])")
    }
}

fn parse_audit_key(value: &str) -> Result<AuditKey, String> {
    hindsight_commands::integrity::IntegrityKey::new(value.as_bytes())
        .map(|key| AuditKey(std::sync::Arc::new(key)))
        .map_err(|error| format!("HINDSIGHT_AUDIT_KEY: {error}"))
}

/// The access-token signing secret.
#[derive(Clone)]
pub struct JwtSecret(SecretString);

impl JwtSecret {
    pub fn expose(&self) -> &[u8] {
        self.0.expose_secret().as_bytes()
    }
}

impl std::fmt::Debug for JwtSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtSecret([REDACTED])")
    }
}

fn parse_database_url(value: &str) -> Result<DatabaseUrl, String> {
    // Without TLS to a server on this host unless the URL or PGSSLMODE names a mode.
    let options = hindsight_commands::db::connect_options(value)
        .map_err(|_| "DATABASE_URL is not a valid postgres:// URL".to_owned())?;
    Ok(DatabaseUrl {
        secret: SecretString::from(value.to_owned()),
        options,
    })
}

pub(crate) fn parse_jwt_secret(value: &str) -> Result<JwtSecret, String> {
    if value.len() < 32 {
        return Err(format!(
            "HINDSIGHT_JWT_SECRET must be at least 32 bytes (got {}); generate one with `openssl rand -base64 48`",
            value.len()
        ));
    }
    Ok(JwtSecret(SecretString::from(value.to_owned())))
}

fn parse_duration(value: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(value)
        .map_err(|error| format!("not a duration such as `15m` or `2s`: {error}"))?;
    if duration.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    Ok(duration)
}

/// A duration where zero is allowed (it switches something off).
fn parse_duration_or_zero(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value)
        .map_err(|error| format!("not a duration such as `60s` or `0s`: {error}"))
}

fn parse_switch(value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "1" | "yes" => Ok(true),
        "off" | "false" | "0" | "no" => Ok(false),
        _ => Err("must be `on` or `off`".to_owned()),
    }
}

fn parse_role(value: &str) -> Result<Role, String> {
    Role::from_str(value)
        .map_err(|_| "must be one of customer, admin, auditor, operator".to_owned())
}

fn parse_nats_name(value: &str) -> Result<String, String> {
    let valid = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(value.to_owned())
    } else {
        Err("must be 1-64 characters of A-Z, a-z, 0-9, '-' or '_'".to_owned())
    }
}

fn parse_subject_prefix(value: &str) -> Result<String, String> {
    let valid = !value.is_empty()
        && value.split('.').all(|token| {
            !token.is_empty()
                && token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if valid {
        Ok(value.to_owned())
    } else {
        Err("must be dot-separated tokens of A-Z, a-z, 0-9, '-' or '_' (no wildcards)".to_owned())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        let mut argv = vec![
            "hindsight",
            "serve",
            "--audit-key",
            "an-audit-key-of-more-than-32-bytes-0123456789",
        ];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Serve(args) => Ok(*args),
            _ => unreachable!("parsed serve"),
        }
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn defaults_are_applied() {
        let args = serve(&[
            "--database-url",
            "postgres://u:pw@localhost/db",
            "--jwt-secret",
            SECRET,
        ])
        .unwrap();
        assert_eq!(args.listen_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(args.access_token_ttl, Duration::from_secs(15 * 60));
        assert_eq!(args.body_limit, 65536);
        assert!(args.rate_limits && args.run_api && args.run_relay && args.run_projections);
        // The flag's default is the workers' own.
        assert_eq!(
            args.projection_linger,
            hindsight_projections::worker::LINGER
        );
    }

    #[test]
    fn a_database_on_this_host_is_reached_without_tls_unless_the_url_names_a_mode() {
        let mode = |url: &str| {
            let args = serve(&["--database-url", url, "--jwt-secret", SECRET]).unwrap();
            format!(
                "{:?}",
                args.database.database_url.connect_options().get_ssl_mode()
            )
        };
        // PGSSLMODE, when set, names the mode as the URL would.
        let local = match std::env::var("PGSSLMODE") {
            Ok(named) => format!("{:?}", named.parse::<sqlx::postgres::PgSslMode>().unwrap()),
            Err(_) => "Disable".to_owned(),
        };
        assert_eq!(mode("postgres://u:pw@localhost/db"), local);
        assert_eq!(mode("postgres://u:pw@127.0.0.1:5432/db"), local);
        assert_eq!(
            mode("postgres://u:pw@127.0.0.1/db?sslmode=require"),
            "Require"
        );
        assert_eq!(
            mode("postgres://u:pw@db.example/db?sslmode=verify-full"),
            "VerifyFull"
        );
    }

    #[test]
    fn a_missing_or_short_audit_key_is_refused_naming_the_variable() {
        let error = Cli::try_parse_from(["hindsight", "serve", "--audit-key", "short"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("HINDSIGHT_AUDIT_KEY"), "{error}");
    }

    #[test]
    fn hs256_needs_its_secret_and_key_pairs_need_their_files() {
        let args = serve(&["--database-url", "postgres://localhost/db"]).unwrap();
        let error = args.tokens().unwrap_err().to_string();
        assert!(error.contains("HINDSIGHT_JWT_SECRET"), "{error}");
        let args = serve(&[
            "--database-url",
            "postgres://localhost/db",
            "--jwt-algorithm",
            "EdDSA",
        ])
        .unwrap();
        let error = args.tokens().unwrap_err().to_string();
        assert!(error.contains("HINDSIGHT_JWT_PRIVATE_KEY_FILE"), "{error}");
    }

    #[test]
    fn a_short_jwt_secret_is_refused_naming_the_variable() {
        let error = serve(&[
            "--database-url",
            "postgres://localhost/db",
            "--jwt-secret",
            "short",
        ])
        .unwrap_err()
        .to_string();
        assert!(error.contains("HINDSIGHT_JWT_SECRET"), "{error}");
    }

    #[test]
    fn a_bad_listen_address_names_the_variable() {
        let error = serve(&[
            "--database-url",
            "postgres://localhost/db",
            "--jwt-secret",
            SECRET,
            "--listen-addr",
            "nowhere",
        ])
        .unwrap_err()
        .to_string();
        assert!(error.contains("HINDSIGHT_LISTEN_ADDR"), "{error}");
    }

    #[test]
    fn secrets_never_print() {
        let args = serve(&[
            "--database-url",
            "postgres://u:hunter2@localhost/db",
            "--jwt-secret",
            SECRET,
        ])
        .unwrap();
        let debug = format!("{args:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(!debug.contains(SECRET), "{debug}");
    }

    #[test]
    fn subject_prefixes_without_wildcards() {
        assert!(parse_subject_prefix("tenant.a").is_ok());
        assert!(parse_subject_prefix("a.*").is_err());
        assert!(parse_subject_prefix("a..b").is_err());
    }
}
