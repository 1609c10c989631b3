//! The one-shot commands: `hindsight migrate` and `hindsight user create`.

use std::io::BufRead as _;

use anyhow::{bail, Context as _};
use hindsight_commands::{db, Actor, CommandBus, EventMetadata, StoreSettings};
use hindsight_domain::ids::UserId;
use hindsight_domain::user::{PasswordHash, UserCommand};
use hindsight_domain::values::{Email, PersonName};
use secrecy::SecretString;
use serde_json::json;

use crate::config::{DatabaseArgs, UserCreateArgs};
use crate::password::Passwords;

fn pool(args: &DatabaseArgs) -> sqlx::PgPool {
    db::pool(
        args.database_url.connect_options(),
        args.db_max_connections.min(4),
    )
}

/// `hindsight migrate`: applies pending migrations; prints what it applied.
pub async fn migrate(args: DatabaseArgs) -> anyhow::Result<()> {
    let pool = pool(&args);
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

    let pool = pool(&args.database);
    db::migrate(&pool)
        .await
        .context("applying database migrations (check DATABASE_URL)")?;
    let commands = CommandBus::new(
        pool.clone(),
        StoreSettings {
            snapshot_every: args.database.snapshot_every as usize,
            ..StoreSettings::default()
        },
    );
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
        .execute(user_id.as_uuid(), command, &metadata, None)
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
