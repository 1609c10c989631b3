//! The one-shot commands: `hindsight migrate` and `hindsight user create`.

use std::io::BufRead as _;

use anyhow::{bail, Context as _};
use hindsight_commands::{db, Actor, CommandBus, EventMetadata};
use hindsight_domain::ids::UserId;
use hindsight_domain::user::{PasswordHash, UserCommand};
use hindsight_domain::values::{Email, PersonName};
use secrecy::SecretString;
use serde_json::json;

use crate::config::{AuditArgs, DatabaseArgs, ExportArgs, UserCreateArgs};
use crate::password::Passwords;

/// The pool of a command-line `command`, its sessions named after it (`hindsight
/// migrate`, see [`db::session_name`]) so an operator can tell them in `pg_stat_activity`
/// from a server's.
fn pool(args: &DatabaseArgs, command: &str) -> sqlx::PgPool {
    named_pool(args, command, args.db_max_connections.min(4))
}

fn named_pool(args: &DatabaseArgs, command: &str, max_connections: u32) -> sqlx::PgPool {
    let options = args.database_url.connect_options();
    let name = db::session_name(&options, command);
    db::pool(options.application_name(&name), max_connections)
}

/// `hindsight migrate`: applies pending migrations; prints what it applied.
pub async fn migrate(args: DatabaseArgs) -> anyhow::Result<()> {
    let pool = pool(&args, "migrate");
    let report = db::migrate(&pool)
        .await
        .context("applying database migrations (check DATABASE_URL)")?;
    if report.applied.is_empty() {
        tracing::info!("database is up to date; nothing applied");
    }
    for migration in &report.applied {
        tracing::info!(%migration, "migration applied");
    }
    pool.close().await;
    Ok(())
}

/// Reads the password: one line from standard input, without its line ending.
fn read_password() -> anyhow::Result<SecretString> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        bail!("no password on standard input: pipe it in, e.g. `echo \"$PASSWORD\" | hindsight user create ...`");
    }
    Ok(SecretString::from(password.to_owned()))
}

/// `hindsight user create`: registers a user (any role) as the system actor and prints
/// the new user as JSON.
pub async fn create_user(args: UserCreateArgs) -> anyhow::Result<()> {
    let email = Email::parse(&args.email).map_err(|error| anyhow::anyhow!("--email: {error}"))?;
    let name = PersonName::parse(&args.name).map_err(|error| anyhow::anyhow!("--name: {error}"))?;
    let password = read_password()?;
    let passwords = Passwords::new(1).context("initialising password hashing")?;
    let hash = passwords
        .hash(&password)
        .await
        .map_err(|error| anyhow::anyhow!("password: {error}"))?;
    let password_hash =
        PasswordHash::new(hash).map_err(|error| anyhow::anyhow!("password: {error}"))?;

    let pool = pool(&args.database, "user create");
    db::migrate(&pool)
        .await
        .context("applying database migrations (check DATABASE_URL)")?;
    let commands = CommandBus::new(pool.clone(), args.database.store_settings());
    let user_id = UserId::new();
    let request_id = format!("cli-{}", uuid::Uuid::new_v4());
    let metadata = EventMetadata::for_request(Actor::system(), request_id);
    let command = UserCommand::Register {
        user_id,
        email: email.clone(),
        name: name.clone(),
        password_hash,
        role: args.role,
    };
    let executed = commands
        .users
        .execute_new(user_id.as_uuid(), command, &metadata)
        .await
        .context("storing the user")?;
    pool.close().await;
    let executed = match executed {
        Ok(executed) => executed,
        Err(refusal) => bail!("{} ({})", refusal, refusal.code()),
    };
    let user = json!({
        "user": {
            "id": user_id.as_uuid(),
            "email": email.as_str(),
            "name": name.as_str(),
            "role": args.role.as_str(),
            "status": "active",
            "version": executed.version,
        },
        "position": executed.position,
    });
    println!("{user}");
    Ok(())
}

/// `hindsight projections list`: a table on standard output.
pub async fn list_projections(args: DatabaseArgs) -> anyhow::Result<()> {
    let pool = pool(&args, "projections list");
    let standing =
        hindsight_projections::status::standing(&pool, &hindsight_projections::status::names())
            .await
            .context("reading projection checkpoints (check DATABASE_URL)")?;
    println!(
        "{:<16} {:<12} {:>12} {:>12} {:>10}  ERROR",
        "NAME", "STATUS", "POSITION", "HEAD", "LAG"
    );
    for projection in standing {
        println!(
            "{:<16} {:<12} {:>12} {:>12} {:>10}  {}",
            projection.name,
            projection.status,
            projection.position,
            projection.head,
            projection.lag,
            projection.last_error.unwrap_or_default()
        );
    }
    pool.close().await;
    Ok(())
}

/// `hindsight projections status NAME`: JSON on standard output.
pub async fn projection_status(args: DatabaseArgs, name: String) -> anyhow::Result<()> {
    let name = hindsight_projections::status::names()
        .into_iter()
        .find(|known| *known == name)
        .ok_or_else(|| {
            anyhow::anyhow!("no projection is named `{name}`; see `hindsight projections list`")
        })?;
    let pool = pool(&args, "projections status");
    let standing = hindsight_projections::status::standing(&pool, &[name])
        .await
        .context("reading projection checkpoints (check DATABASE_URL)")?;
    println!("{}", serde_json::to_string_pretty(&standing.first())?);
    pool.close().await;
    Ok(())
}

/// `hindsight projections rebuild NAME | --all`: a progress bar per projection on a
/// terminal, plain lines otherwise. `--all` replays the history once for every read model.
pub async fn rebuild_projections(
    args: DatabaseArgs,
    name: Option<String>,
    all: bool,
) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let names: Vec<String> = if all {
        hindsight_projections::rebuild::rebuildable()
            .into_iter()
            .map(str::to_owned)
            .collect()
    } else {
        name.into_iter().collect()
    };
    // One connection per copy being filled, two for the readers, two to keep track.
    let pool = named_pool(
        &args,
        "projections rebuild",
        args.db_max_connections.min(names.len() as u32 + 4),
    );
    db::migrate(&pool)
        .await
        .context("applying database migrations (check DATABASE_URL)")?;
    let rebuild = hindsight_projections::rebuild::start_many(&pool, &names)
        .await
        .with_context(|| format!("starting the rebuild of {}", names.join(", ")))?;
    let bars = std::io::stderr().is_terminal().then(|| {
        let bars = indicatif::MultiProgress::new();
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:>12} [{bar:40}] {pos}/{len} events, {per_sec}, {eta} left",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ");
        let each: std::collections::HashMap<&'static str, indicatif::ProgressBar> = rebuild
            .names()
            .into_iter()
            .map(|name| {
                let bar = bars.add(indicatif::ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_prefix(name);
                (name, bar)
            })
            .collect();
        (bars, each)
    });
    let outcomes = rebuild
        .run(
            |name, progress| match bars.as_ref().and_then(|(_, each)| each.get(name)) {
                Some(bar) => {
                    bar.set_length(progress.target.max(0) as u64);
                    bar.set_position(progress.position.max(0) as u64);
                }
                None => eprintln!(
                    "{name}: {} events replayed, at position {} of {}, {:.0} events/s",
                    progress.events_done,
                    progress.position,
                    progress.target,
                    progress.events_per_second
                ),
            },
        )
        .await;
    if let Some((bars, _)) = bars {
        bars.clear().ok();
    }
    let mut failed = Vec::new();
    for (name, outcome) in outcomes {
        match outcome {
            Ok(report) => {
                eprintln!(
                    "{name}: rebuilt from {} events in {:.1} s, now live",
                    report.events, report.seconds
                );
                for difference in &report.differences {
                    eprintln!(
                        "{name}: {} differed from the rebuild: {} rows only in the old model, {} only in the rebuilt one",
                        difference.table, difference.only_live, difference.only_rebuilt
                    );
                }
            }
            Err(error) => {
                eprintln!("{name}: the rebuild failed, the old model stays live: {error}");
                failed.push(name);
            }
        }
    }
    pool.close().await;
    if !failed.is_empty() {
        anyhow::bail!("rebuilding {} failed", failed.join(", "));
    }
    Ok(())
}

/// `hindsight events export`: NDJSON, streamed, secrets redacted.
pub async fn export_events(args: ExportArgs) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    use std::io::Write as _;
    let pool = pool(&args.database, "events export");
    let filter = hindsight_commands::history::HistoryFilter {
        after: args.after,
        aggregate_type: args.aggregate_type,
        aggregate_id: args.aggregate_id,
        actor_id: args.actor_id,
        correlation_id: args.correlation_id,
        from: args.from,
        to: args.to,
    };
    let mut out: Box<dyn std::io::Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut events = hindsight_commands::history::stream_events(&pool, &filter);
    let mut count = 0u64;
    while let Some(event) = events.next().await {
        let event = hindsight_commands::history::redacted(event.context("reading events")?);
        serde_json::to_writer(&mut out, &event)?;
        out.write_all(b"\n")?;
        count += 1;
    }
    out.flush()?;
    tracing::info!(events = count, "export finished");
    pool.close().await;
    Ok(())
}

/// Fails naming every (aggregate type, event type, version) whose events do not
/// deserialise.
pub fn refuse_undecodable(checked: &[hindsight_commands::upcast::Checked]) -> anyhow::Result<()> {
    let broken: Vec<String> = checked
        .iter()
        .filter_map(|kind| {
            kind.first_failure.as_ref().map(|(position, reason)| {
                format!(
                    "{} {} version {} (first at position {position}): {reason}",
                    kind.aggregate_type, kind.event_type, kind.event_version
                )
            })
        })
        .collect();
    if broken.is_empty() {
        Ok(())
    } else {
        bail!(
            "stored events no longer deserialise through this build; add an upcaster or fix the code:\n  {}",
            broken.join("\n  ")
        )
    }
}

/// `hindsight events check`: every stored event, one line per kind on standard output.
pub async fn check_events(args: DatabaseArgs) -> anyhow::Result<()> {
    let pool = pool(&args, "events check");
    let checked = hindsight_commands::upcast::check_stored_events(&pool, false)
        .await
        .context("reading the event store (check DATABASE_URL)")?;
    for kind in &checked {
        println!(
            "{:<8} {:<24} v{:<3} {:>10} events  {}",
            kind.aggregate_type,
            kind.event_type,
            kind.event_version,
            kind.events,
            if kind.first_failure.is_some() {
                "FAILS"
            } else {
                "ok"
            }
        );
    }
    pool.close().await;
    refuse_undecodable(&checked)
}

/// `hindsight audit verify`: the integrity report as JSON; non-zero when broken.
pub async fn verify_history(args: AuditArgs) -> anyhow::Result<()> {
    let pool = pool(&args.database, "audit verify");
    let report = hindsight_commands::integrity::verify(&pool, &args.audit_key.key())
        .await
        .context("reading the event store (check DATABASE_URL)")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    pool.close().await;
    match &report.first_broken {
        None if report.ok => Ok(()),
        Some(broken) => bail!(
            "the history is broken at position {}: {}",
            broken.position,
            broken.reason
        ),
        None => bail!("the history failed verification"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Args {
        #[command(flatten)]
        database: DatabaseArgs,
    }

    fn database(url: &str) -> DatabaseArgs {
        Args::try_parse_from(["hindsight", "--database-url", url])
            .unwrap()
            .database
    }

    #[tokio::test]
    async fn a_commands_sessions_are_named_after_it() {
        let unnamed = pool(&database("postgres://h/db"), "projections rebuild");
        assert_eq!(
            unnamed.connect_options().get_application_name(),
            Some("hindsight projections rebuild")
        );
        let named = pool(
            &database("postgres://h/db?application_name=shop-eu"),
            "migrate",
        );
        assert_eq!(
            named.connect_options().get_application_name(),
            Some("shop-eu migrate")
        );
    }
}
