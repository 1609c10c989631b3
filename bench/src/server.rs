//! The system under test: a throw-away database and JetStream stream, and the real
//! `hindsight` binary serving on a free loopback port.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use futures::TryStreamExt as _;
use rand::RngCore;
use sqlx::{Connection, PgConnection};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

/// Where the services are and which binary to run.
#[derive(Debug, Clone)]
pub struct Environment {
    /// A Postgres URL whose database can `CREATE DATABASE`.
    pub postgres_url: String,
    pub nats_url: String,
    pub hindsight: PathBuf,
    /// Logs of the started servers go here.
    pub work_dir: PathBuf,
}

/// A database created for one benchmark run and dropped afterwards.
/// This process's databases and streams are named `<prefix><label>_<process id>`.
const DATABASE_PREFIX: &str = "hindsight_bench_";
const STREAM_PREFIX: &str = "bench_";

fn own_name(prefix: &str, label: &str) -> String {
    format!("{prefix}{label}_{}", std::process::id())
}

fn is_own(prefix: &str, name: &str) -> bool {
    name.starts_with(prefix) && name.ends_with(&format!("_{}", std::process::id()))
}

#[derive(Debug)]
pub struct Database {
    pub name: String,
    pub url: String,
    postgres_url: String,
}

impl Database {
    pub async fn create(env: &Environment, label: &str) -> Result<Self> {
        Self::create_on(&env.postgres_url, label).await
    }

    /// Another throw-away database on the same server, named after `label`.
    pub async fn beside(&self, label: &str) -> Result<Self> {
        Self::create_on(&self.postgres_url, label).await
    }

    async fn create_on(postgres_url: &str, label: &str) -> Result<Self> {
        let name = own_name(DATABASE_PREFIX, label);
        let mut admin = PgConnection::connect(postgres_url).await.with_context(|| {
            format!(
                "connecting to Postgres at {} (is it running? scripts/services.sh up starts it)",
                redact(postgres_url)
            )
        })?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await?;
        Ok(Self {
            url: with_database(postgres_url, &name),
            name,
            postgres_url: postgres_url.to_owned(),
        })
    }

    pub async fn drop_now(self) -> Result<()> {
        let mut admin = PgConnection::connect(&self.postgres_url).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

/// `url` with its database name replaced.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

fn secret() -> String {
    let mut bytes = [0u8; 48];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// How a `hindsight` process of one benchmark database is configured.
#[derive(Debug, Clone)]
pub struct Config {
    pub label: String,
    pub stream: String,
    vars: Vec<(String, String)>,
}

impl Config {
    pub fn new(
        env: &Environment,
        database: &Database,
        label: &str,
        extra: &[(&str, &str)],
    ) -> Self {
        let stream = own_name(STREAM_PREFIX, label);
        let mut vars: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), database.url.clone()),
            ("NATS_URL".into(), env.nats_url.clone()),
            ("HINDSIGHT_NATS_STREAM".into(), stream.clone()),
            ("HINDSIGHT_NATS_SUBJECT_PREFIX".into(), stream.clone()),
            ("HINDSIGHT_NATS_MAX_AGE".into(), "2h".into()),
            ("HINDSIGHT_JWT_SECRET".into(), secret()),
            ("HINDSIGHT_AUDIT_KEY".into(), secret()),
            ("HINDSIGHT_ACCESS_TOKEN_TTL".into(), "4h".into()),
            ("HINDSIGHT_RATE_LIMITS".into(), "off".into()),
            ("HINDSIGHT_LOG_FORMAT".into(), "json".into()),
            (
                "RUST_LOG".into(),
                std::env::var("HINDSIGHT_BENCH_LOG").unwrap_or_else(|_| "info".into()),
            ),
        ];
        for (key, value) in extra {
            vars.retain(|(k, _)| k != key);
            vars.push(((*key).to_owned(), (*value).to_owned()));
        }
        Self {
            label: label.to_owned(),
            stream,
            vars,
        }
    }

    fn set(&mut self, key: &str, value: String) {
        self.vars.retain(|(k, _)| k != key);
        self.vars.push((key.to_owned(), value));
    }

    /// Runs a `hindsight` subcommand with this configuration; answers its output.
    pub async fn cli(
        &self,
        env: &Environment,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String> {
        run_cli(&env.hindsight, &self.vars, args, stdin).await
    }

    /// Runs a `hindsight` subcommand, sampling its memory; answers how long it took.
    pub async fn timed_cli(
        &self,
        env: &Environment,
        args: &[&str],
    ) -> Result<(f64, ProcessMemory)> {
        let log = env
            .work_dir
            .join(format!("{}-{}.log", self.label, args.join("-")));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let started = Instant::now();
        let mut child = hindsight(&env.hindsight, &self.vars, args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", env.hindsight.display()))?;
        let pid = child.id();
        let mut samples: Vec<(f64, u64)> = Vec::new();
        let mut peak = 0u64;
        let status = loop {
            if let Some(memory) = pid.and_then(memory_of) {
                samples.push((started.elapsed().as_secs_f64(), memory.rss));
                peak = peak.max(memory.peak);
            }
            tokio::select! {
                status = child.wait() => break status?,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            bail!(
                "`hindsight {}` failed ({status}); its log:\n{}",
                args.join(" "),
                tail(&log)
            );
        }
        let largest = |from: f64, to: f64| {
            samples
                .iter()
                .filter(|(at, _)| *at >= from * seconds && *at <= to * seconds)
                .map(|(_, rss)| *rss)
                .max()
                .unwrap_or(0)
        };
        Ok((
            seconds,
            ProcessMemory {
                peak: peak.max(largest(0.0, 1.0)),
                early: largest(0.0, 0.25),
                late: largest(0.75, 1.0),
            },
        ))
    }
}

/// Memory of a process over its life, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessMemory {
    pub peak: u64,
    /// The largest resident size in the first quarter of its run time.
    pub early: u64,
    /// The largest resident size in the last quarter.
    pub late: u64,
}

/// A running `hindsight serve`.
#[derive(Debug)]
pub struct Server {
    child: Child,
    pub base_url: String,
    pub stream: String,
    pub log: PathBuf,
    config: Config,
    hindsight: PathBuf,
}

/// Resident memory of a process, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss: u64,
    /// The peak resident size so far (VmHWM).
    pub peak: u64,
}

impl Server {
    /// Migrates `database` and starts serving it; waits for `/health/ready`.
    pub async fn start(
        env: &Environment,
        database: &Database,
        label: &str,
        extra: &[(&str, &str)],
    ) -> Result<Self> {
        let config = Config::new(env, database, label, extra);
        config.cli(env, &["migrate"], None).await?;
        Self::start_with(env, config).await
    }

    /// Starts serving with `config` on a free port; waits for `/health/ready`.
    pub async fn start_with(env: &Environment, mut config: Config) -> Result<Self> {
        let port = free_port()?;
        config.set("HINDSIGHT_LISTEN_ADDR", format!("127.0.0.1:{port}"));
        let log = env.work_dir.join(format!("{}-server.log", config.label));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = hindsight(&env.hindsight, &config.vars, &["serve"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {}", env.hindsight.display()))?;
        let mut server = Self {
            child,
            base_url: format!("http://127.0.0.1:{port}"),
            stream: config.stream.clone(),
            log,
            config,
            hindsight: env.hindsight.clone(),
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "hindsight exited with {status} while starting; its log:\n{}",
                    tail(&self.log)
                );
            }
            let url = format!("{}/health/ready", self.base_url);
            if let Ok(response) = http.get(&url).send().await {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "hindsight was not ready within 2 minutes; its log:\n{}",
                    tail(&self.log)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs a `hindsight` subcommand with the server's configuration.
    pub async fn cli(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        run_cli(&self.hindsight, &self.config.vars, args, stdin).await
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    pub fn memory(&self) -> Option<Memory> {
        self.child.id().and_then(memory_of)
    }

    /// SIGTERM, then waits for the graceful shutdown (SIGKILL after 30 s).
    pub async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => self.child.kill().await?,
        }
        Ok(())
    }
}

/// `hindsight <args>` with exactly `vars` as its environment (plus `PATH`).
fn hindsight(binary: &Path, vars: &[(String, String)], args: &[&str]) -> Command {
    let mut command = Command::new(binary);
    command
        .args(args)
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .kill_on_drop(true);
    command
}

/// Runs `hindsight <args>` to completion and returns its standard output.
pub async fn run_cli(
    hindsight: &Path,
    vars: &[(String, String)],
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String> {
    let mut child = self::hindsight(hindsight, vars, args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", hindsight.display()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await?;
        pipe.write_all(b"\n").await?;
    }
    let output = child.wait_with_output().await?;
    if !output.status.success() {
        bail!(
            "`hindsight {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Resident and peak resident memory of process `pid`, from `/proc`.
pub fn memory_of(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|line| line.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some(Memory {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
    })
}

/// CPU time used so far, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTime {
    /// The whole machine's busy time, summed over its cores.
    pub machine: f64,
    /// One process's own time (user and system, all its threads).
    pub process: f64,
    /// Time the machine's virtual cores wanted to run but the host ran something else
    /// (steal), summed over the cores.
    pub stolen: f64,
}

/// The clock ticks of a second in `/proc`'s CPU times (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// The machine's and process `pid`'s CPU time so far, from `/proc`.
pub fn cpu_time(pid: u32) -> Option<CpuTime> {
    let (busy, stolen) = machine_ticks(&std::fs::read_to_string("/proc/stat").ok()?)?;
    let process = process_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    Some(CpuTime {
        machine: busy as f64 / TICKS_PER_SECOND,
        process: process as f64 / TICKS_PER_SECOND,
        stolen: stolen as f64 / TICKS_PER_SECOND,
    })
}

/// The busy and the stolen ticks of `/proc/stat`'s `cpu` line. Busy is user, nice,
/// system, irq and softirq (guests' time is within user); not idle, waiting for I/O, or
/// stolen by the host.
fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|line| line.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let busy = [0, 1, 2, 5, 6]
        .iter()
        .map(|&index| ticks.get(index).copied())
        .sum::<Option<u64>>()?;
    Some((busy, *ticks.get(7)?))
}

/// User and system ticks from a `/proc/<pid>/stat` line (its fields 14 and 15). The
/// process name, in parentheses, may hold spaces and parentheses: fields are counted
/// from the last `)`.
fn process_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// The CPU time Postgres has spent so far on each session of the server's components in
/// the database `pool` reaches, by process id: the session's component (see
/// [`component`]) and its seconds, from `/proc`. Empty when Postgres runs on another
/// machine (a process id here that is not a Postgres backend is left out), and without the
/// harness's own sessions, Postgres's background processes, or sessions of no component.
pub async fn postgres_sessions(pool: &sqlx::PgPool) -> Result<Vec<(i32, &'static str, f64)>> {
    let sessions: Vec<(i32, String)> = sqlx::query_as(
        "SELECT pid, application_name FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(pool)
    .await?;
    Ok(sessions
        .into_iter()
        .filter_map(|(pid, name)| {
            let component = component(&name)?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let command = stat.split_once('(')?.1.rsplit_once(')')?.0;
            (command == "postgres").then_some(())?;
            Some((
                pid,
                component,
                process_ticks(&stat)? as f64 / TICKS_PER_SECOND,
            ))
        })
        .collect())
}

/// The component a session of the server serves, from the name the server gives it
/// (`hindsight_commands::db::session_name`; the harness's URLs name no application, so
/// the server's names start with its default): `statements` (the statement pool: the
/// commands' appends, the order process's, the API's point reads and listings), `relay`,
/// a worker's name (`read_models`, `audit_trail`, `order_process`), or `pool` (sqlx's pool:
/// logins, idempotency keys, transactions, listeners, catch-ups).
pub fn component(application_name: &str) -> Option<&'static str> {
    let base = hindsight_commands::db::APPLICATION_NAME;
    if application_name == base {
        return Some("pool");
    }
    let rest = application_name.strip_prefix(base)?.strip_prefix(' ')?;
    let (kind, name) = rest.split_once(' ').unwrap_or((rest, ""));
    match (kind, name) {
        ("statements", "") => Some("statements"),
        ("relay", _) => Some("relay"),
        ("worker", name) => WORKERS.iter().copied().find(|worker| *worker == name),
        _ => None,
    }
}

/// The server's workers, as `component` names them: its read-model groups and its process
/// manager.
pub const WORKERS: [&str; 3] = ["read_models", "audit_trail", "order_process"];

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

async fn jetstream(nats_url: &str) -> Result<async_nats::jetstream::Context> {
    let client = async_nats::connect(nats_url)
        .await
        .with_context(|| format!("connecting to NATS at {nats_url}"))?;
    Ok(async_nats::jetstream::new(client))
}

/// Deletes the JetStream stream a server used.
pub async fn delete_stream(nats_url: &str, stream: &str) -> Result<()> {
    delete_stream_in(&jetstream(nats_url).await?, stream).await
}

async fn delete_stream_in(jetstream: &async_nats::jetstream::Context, stream: &str) -> Result<()> {
    match jetstream.delete_stream(stream).await {
        Ok(_) => Ok(()),
        Err(error) if error.to_string().contains("not found") => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Drops the databases and deletes the streams this process created (their names end in
/// its process id), after an interrupted run.
pub async fn remove_leftovers(postgres_url: &str, nats_url: &str) -> Result<()> {
    let mut admin = PgConnection::connect(postgres_url)
        .await
        .with_context(|| format!("connecting to Postgres at {}", redact(postgres_url)))?;
    let databases: Vec<String> = sqlx::query_scalar("SELECT datname FROM pg_database")
        .fetch_all(&mut admin)
        .await?;
    for name in databases
        .iter()
        .filter(|name| is_own(DATABASE_PREFIX, name))
    {
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
        eprintln!("bench: dropped database {name}");
    }
    let jetstream = jetstream(nats_url).await?;
    let streams: Vec<String> = jetstream.stream_names().try_collect().await?;
    for name in streams.iter().filter(|name| is_own(STREAM_PREFIX, name)) {
        delete_stream_in(&jetstream, name).await?;
        eprintln!("bench: deleted stream {name}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_counted_to_the_component_its_name_gives() {
        let named = |component: &str| {
            hindsight_commands::db::session_name(
                &sqlx::postgres::PgConnectOptions::new(),
                component,
            )
        };
        assert_eq!(component("hindsight"), Some("pool"));
        assert_eq!(component(&named("statements")), Some("statements"));
        assert_eq!(component(&named("relay bench_run1_7")), Some("relay"));
        for worker in WORKERS {
            assert_eq!(component(&named(&format!("worker {worker}"))), Some(worker));
        }
        // The read-model groups the server runs and its process manager: a new group must
        // be counted too.
        let mut served: Vec<&str> = hindsight_projections::read_model_groups()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        served.push(hindsight_projections::order_process::NAME);
        assert_eq!(served, WORKERS);
        for other in [
            "",
            "psql",
            "hindsight-bench",
            "hindsightstatements",
            "hindsight worker someone_else",
            "hindsight statements extra",
        ] {
            assert_eq!(component(other), None, "{other:?}");
        }
    }

    #[test]
    fn the_database_name_is_replaced_keeping_the_query() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u:p@h:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "x"), "postgres://h/x");
        assert_eq!(redact("postgres://u:p@h/db"), "postgres://***@h/db");
    }

    #[test]
    fn cpu_times_are_read_from_the_fields_proc_gives_them_in() {
        let stat = "cpu  100 20 30 4000 50 6 7 80 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nctxt 9\n";
        // user + nice + system + irq + softirq; idle, iowait and steal are not busy.
        assert_eq!(machine_ticks(stat), Some((163, 80)));
        assert_eq!(machine_ticks("cpu0 1 2 3\n"), None);
        assert_eq!(machine_ticks("cpu  1 2 3 4 5 6 7\n"), None);
        let process = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 \
                       250 75 0 0 20 0 9 0 1000 1000000 500";
        assert_eq!(process_ticks(process), Some(325));
        assert_eq!(process_ticks("42 (x) S 1"), None);
    }

    #[test]
    fn a_busy_process_is_charged_its_cpu_and_the_machine_at_least_as_much() {
        let pid = std::process::id();
        let before = cpu_time(pid).unwrap_or_default();
        assert!(before.machine > 0.0, "{before:?}");
        // Spin until the kernel has charged this process at least five ticks.
        let mut now = before;
        let give_up = std::time::Instant::now() + Duration::from_secs(60);
        while now.process - before.process < 0.05 && std::time::Instant::now() < give_up {
            std::hint::black_box((0..100_000u64).sum::<u64>());
            now = cpu_time(pid).unwrap_or_default();
        }
        let used = now.process - before.process;
        assert!(used >= 0.05, "charged {used} s");
        assert!(
            now.machine - before.machine >= used / 2.0,
            "{before:?} {now:?}"
        );
    }
}
