//! Hindsight's benchmark harness.
//!
//! It starts the real `hindsight` binary against the local Postgres and NATS (a database
//! and a JetStream stream of its own per run, dropped afterwards), drives it over HTTP with
//! many concurrent connections, measures every figure next to a baseline taken in the same
//! run (raw Postgres inserts and reads through the same driver), repeats the whole run
//! several times and writes the medians to `BENCHMARKS.md`. It is not part of `cargo test`
//! and asserts nothing: a missed target is reported, not failed.
//!
//! Run it with `scripts/bench` (which builds in release mode first). Interrupted (Ctrl-C,
//! SIGTERM), it stops the servers it started and removes its databases and streams.

mod baseline;
mod client;
mod load;
mod report;
mod scenarios;
mod seed;
mod server;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use sqlx::{Connection, PgConnection};

use crate::scenarios::{Figures, Scenario, Settings};
use crate::server::Environment;

#[derive(Debug, Parser)]
#[command(
    name = "hindsight-bench",
    about = "Measure Hindsight and write BENCHMARKS.md"
)]
struct Args {
    /// How many times every scenario runs (the report quotes medians).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Length of each measured phase.
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    duration: Duration,
    /// Unmeasured warm-up before each phase, closed loop or open.
    #[arg(long, default_value = "2s", value_parser = positive_duration)]
    warmup: Duration,
    /// Events stored on the long-history aggregate of scenario 2.
    #[arg(long, default_value_t = 10_000)]
    history_events: u64,
    /// Events seeded for the rebuild scenario.
    #[arg(long, default_value_t = 1_000_000)]
    rebuild_events: u64,
    /// Products in the catalogue of the read scenario.
    #[arg(long, default_value_t = 1_000)]
    read_products: usize,
    /// Skip the rebuild scenario (it seeds a large history).
    #[arg(long)]
    skip_rebuild: bool,
    /// Run only these scenarios (comma-separated), to profile one of them; the report
    /// then leaves the others out. `writes` is scenarios 1 and 6 together.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
    /// Keep the rebuild scenario's seeded database afterwards (its name is logged), to
    /// profile `hindsight projections rebuild` against it by hand.
    #[arg(long)]
    keep_rebuild_database: bool,
    /// Write each measured command of the lag scenario to this file (the last run's), one
    /// line each: microseconds since the first, position, microseconds until the products
    /// read model and until the audit trail applied it. The first line is the first
    /// command's wall-clock time in microseconds since 1970, to line the timeline up with
    /// the server's log.
    #[arg(long)]
    lag_timeline: Option<PathBuf>,
    /// A Postgres URL whose user can create databases.
    #[arg(
        long,
        env = "HINDSIGHT_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres:hindsight@127.0.0.1:5432/postgres"
    )]
    postgres_url: String,
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The `hindsight` binary (default: next to this one).
    #[arg(long)]
    hindsight: Option<PathBuf>,
    /// Where the report goes.
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: PathBuf,
    /// Where server logs go (default: a `bench` folder beside the binary).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// A duration such as `10s`, `500ms` or `2m`; zero is refused.
fn positive_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(duration) if !duration.is_zero() => Ok(duration),
        Ok(_) => Err(format!("`{text}` must be positive")),
        Err(error) => Err(format!(
            "`{text}` is not a duration such as 10s, 500ms or 2m: {error}"
        )),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let (postgres_url, nats_url) = (args.postgres_url.clone(), args.nats_url.clone());
    tokio::select! {
        result = measure(args) => result,
        signal = interrupted() => {
            // The measuring future is gone, and with it the servers it started.
            eprintln!("bench: {signal}; removing this run's databases and streams");
            server::remove_leftovers(&postgres_url, &nats_url).await?;
            anyhow::bail!("interrupted by {signal}")
        }
    }
}

/// Resolves when the harness is asked to stop, naming the signal.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "Ctrl-C",
            _ = terminate.recv() => "SIGTERM",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

async fn measure(args: Args) -> Result<()> {
    let here = std::env::current_exe()?;
    let dir = here
        .parent()
        .context("the harness binary has no folder")?
        .to_path_buf();
    let hindsight = args
        .hindsight
        .clone()
        .unwrap_or_else(|| dir.join("hindsight"));
    if !hindsight.exists() {
        anyhow::bail!(
            "{} does not exist: build it first (`cargo build --release -p hindsight-api`), or use scripts/bench",
            hindsight.display()
        );
    }
    let work_dir = args.work_dir.clone().unwrap_or_else(|| dir.join("bench"));
    std::fs::create_dir_all(&work_dir)?;
    let env = Environment {
        postgres_url: args.postgres_url.clone(),
        nats_url: args.nats_url.clone(),
        hindsight,
        work_dir,
    };
    let settings = Settings {
        scenarios: Scenario::value_variants()
            .iter()
            .copied()
            .filter(|scenario| args.only.is_empty() || args.only.contains(scenario))
            .filter(|scenario| *scenario != Scenario::Rebuild || !args.skip_rebuild)
            .collect(),
        warmup: args.warmup,
        duration: args.duration,
        history_events: args.history_events,
        rebuild_events: args.rebuild_events,
        read_products: args.read_products,
        keep_rebuild_database: args.keep_rebuild_database,
        lag_timeline: args.lag_timeline.clone(),
    };
    let machine = machine(&env).await?;
    for (name, value) in &machine {
        eprintln!("bench: {name}: {value}");
    }

    let mut runs: Vec<Figures> = vec![Figures::new(); args.runs];
    if settings.scenarios.iter().any(|s| *s != Scenario::Rebuild) {
        for (index, figures) in runs.iter_mut().enumerate() {
            eprintln!("bench: run {} of {}", index + 1, args.runs);
            figures.extend(scenarios::run(&env, &settings, index + 1).await?);
        }
    }
    if settings.scenarios.contains(&Scenario::Rebuild) {
        eprintln!(
            "bench: rebuild scenario ({} events)",
            settings.rebuild_events
        );
        let rebuilds = scenarios::rebuild(&env, &settings, args.runs).await?;
        for (figures, rebuild) in runs.iter_mut().zip(rebuilds) {
            figures.extend(rebuild);
        }
    }

    let described = vec![
        ("Runs".to_owned(), args.runs.to_string()),
        (
            "Phases".to_owned(),
            format!(
                "{} s measured after {} s of warm-up; closed loops for maximum rates, open loops (requests paced evenly by a thread of their own, latency counted from each request's due time) for latency at a fixed rate; cores busy, the server's CPU per request and Postgres's by the server's component read from /proc over each measured window",
                settings.duration.as_secs_f64(),
                settings.warmup.as_secs_f64()
            ),
        ),
        (
            "Server".to_owned(),
            format!(
                "release build, defaults of .env.example except HINDSIGHT_RATE_LIMITS=off and RUST_LOG={}; the harness, the server, Postgres and NATS share the machine",
                std::env::var("HINDSIGHT_BENCH_LOG").unwrap_or_else(|_| "info".into())
            ),
        ),
    ];
    let section = report::section(&machine, &described, &runs);
    let existing = std::fs::read_to_string(&args.output).ok();
    std::fs::write(&args.output, report::merge(existing.as_deref(), &section))
        .with_context(|| format!("writing {}", args.output.display()))?;
    eprintln!("bench: wrote {}", args.output.display());
    Ok(())
}

/// What the figures were measured on.
async fn machine(env: &Environment) -> Result<Vec<(String, String)>> {
    let mut facts = Vec::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map_or("unknown".to_owned(), |(_, model)| model.trim().to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    facts.push((
        "CPU".to_owned(),
        format!("{model}, {cores} cores available"),
    ));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(total) = meminfo.lines().find(|line| line.starts_with("MemTotal")) {
        let kib: f64 = total
            .split_whitespace()
            .nth(1)
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0.0);
        facts.push((
            "Memory".to_owned(),
            format!("{:.1} GiB", kib / 1024.0 / 1024.0),
        ));
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    facts.push(("Kernel".to_owned(), format!("Linux {}", kernel.trim())));

    // Opened as the baselines' and the server's connections are (see `baseline::options`).
    let mut postgres = PgConnection::connect_with(&baseline::options(&env.postgres_url)?)
        .await
        .context("connecting to Postgres (is it running? scripts/services.sh up starts it)")?;
    let mut settings = Vec::new();
    for name in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "shared_buffers",
        "max_connections",
        "autovacuum",
        "ssl",
    ] {
        let value: String = sqlx::query_scalar(&format!("SHOW {name}"))
            .fetch_one(&mut postgres)
            .await?;
        settings.push(format!("{name}={value}"));
    }
    facts.push(("PostgreSQL".to_owned(), settings.join(", ")));
    let tls: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut postgres)
        .await?;
    facts.push((
        "Postgres connections".to_owned(),
        if tls { "TLS" } else { "without TLS" }.to_owned(),
    ));
    let nats = async_nats::connect(&env.nats_url)
        .await
        .with_context(|| format!("connecting to NATS at {} (is it running?)", env.nats_url))?;
    let info = nats.server_info();
    facts.push((
        "NATS".to_owned(),
        format!("{} (JetStream: {})", info.version, info.jetstream),
    ));
    let revision = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned());
    if let Some(revision) = revision {
        facts.push(("Revision".to_owned(), revision));
    }
    facts.push((
        "Date".to_owned(),
        chrono::Utc::now().format("%Y-%m-%d").to_string(),
    ));
    Ok(facts)
}
