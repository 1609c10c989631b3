//! `hindsight serve`: the HTTP API, the relay and the projection workers in one process,
//! each switchable off so they can also run as separate processes. All of them share one
//! cancellation token: a signal (SIGINT/SIGTERM) or the failure of any component stops
//! the others, and the HTTP server lets in-flight requests finish first.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hindsight_commands::relay::{Relay, RelaySettings};
use hindsight_commands::{db, CommandBus};
use hindsight_projections::progress::ProjectionProgress;
use hindsight_projections::worker::WorkerSettings;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::access::AccessCache;
use crate::config::ServeArgs;
use crate::password::Passwords;
use crate::rate_limit::RateLimits;
use crate::routes::auth::LoginThrottle;
use crate::state::{AppState, HttpSettings, Services};

/// How long components get to finish after shutdown was requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Connects to NATS without waiting for it: commands are accepted while NATS is down and
/// the client keeps reconnecting in the background.
pub async fn connect_nats(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .max_reconnects(None)
        .connect(url)
        .await
        .with_context(|| format!("NATS_URL `{url}` cannot be used"))
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let tokens = args.tokens()?;
    let pool = db::pool(
        args.database.database_url.connect_options(),
        args.database.db_max_connections,
    );
    let report = db::migrate(&pool)
        .await
        .context("applying database migrations (check DATABASE_URL)")?;
    for migration in &report.applied {
        tracing::info!(%migration, "migration applied");
    }
    // Refuse to start on a store this build cannot read (one event of each kind).
    let checked = hindsight_commands::upcast::check_stored_events(&pool, true)
        .await
        .context("checking stored events (check DATABASE_URL)")?;
    crate::cli::refuse_undecodable(&checked)?;
    let nats = connect_nats(&args.nats_url).await?;
    let commands = CommandBus::new(pool.clone(), args.database.store_settings());
    let passwords = Passwords::new(args.max_concurrent_hashes as usize)
        .context("initialising password hashing")?;
    let shutdown = CancellationToken::new();
    let progress = ProjectionProgress::start(pool.clone(), shutdown.clone())
        .await
        .context("listening for projection progress (check DATABASE_URL)")?;
    // Only the HTTP API checks access; a relay- or worker-only process holds no listener.
    let access = if args.run_api {
        AccessCache::start(pool.clone(), args.access_cache_ttl, shutdown.clone())
            .await
            .context("listening for access changes (check DATABASE_URL)")?
    } else {
        AccessCache::off(pool.clone())
    };
    let state = AppState::new(Services {
        commands,
        pool,
        nats: Some(nats.clone()),
        passwords,
        progress,
        settings: Arc::new(HttpSettings {
            body_limit: args.body_limit,
            request_timeout: args.request_timeout,
            cors_origins: args.cors_origins.clone(),
            hsts: args.hsts,
            projection_wait: args.projection_wait,
            idempotency_ttl: args.idempotency_ttl,
        }),
        tokens: Arc::new(tokens),
        access,
        login_throttle: Arc::new(LoginThrottle::per_hour(args.failed_logins_per_hour)),
        integrity_key: args.audit_key.key(),
        rate_limits: args.rate_limits.then(|| {
            Arc::new(RateLimits::new(
                args.rate_limit_per_second,
                args.auth_rate_limit_per_minute,
            ))
        }),
    });

    if let Some(limits) = state.rate_limits.clone() {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut every_minute = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = every_minute.tick() => limits.forget_idle(),
                }
            }
        });
    }
    let mut components: JoinSet<(&'static str, anyhow::Result<()>)> = JoinSet::new();
    if args.run_api {
        let listener = tokio::net::TcpListener::bind(args.listen_addr)
            .await
            .with_context(|| {
                format!("HINDSIGHT_LISTEN_ADDR {} cannot be bound", args.listen_addr)
            })?;
        tracing::info!(addr = %args.listen_addr, "HTTP API listening");
        let app = crate::build_app(state.clone());
        let stop = shutdown.clone();
        components.spawn(async move {
            let result = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
            .context("HTTP server failed");
            ("api", result)
        });
    }
    if args.run_relay {
        let mut settings = RelaySettings::new(&args.nats_stream, &args.nats_subject_prefix);
        settings.max_age = args.nats_max_age;
        let relay = Relay::new(state.pool.clone(), nats.clone(), settings)
            .with_local_appends(state.commands.appends().watch());
        let stop = shutdown.clone();
        components.spawn(async move {
            relay.run(stop).await;
            ("relay", Ok(()))
        });
    }
    if args.run_relay {
        // Checkpoints seal what the relay has published: positions below it can no
        // longer be filled by a late commit.
        let settings = hindsight_commands::integrity::CheckpointSettings {
            relay_stream: args.nats_stream.clone(),
            interval: args.audit_checkpoint_interval,
        };
        let checkpoints = hindsight_commands::integrity::run_checkpoints(
            state.pool.clone(),
            args.audit_key.key(),
            settings,
            shutdown.clone(),
        );
        components.spawn(async move {
            checkpoints.await;
            ("integrity checkpoints", Ok(()))
        });
    }
    // Projection workers are not watched like the other components: a projection that
    // stops on a poison event must not stop the process or the other projections.
    let mut workers = JoinSet::new();
    if args.run_projections {
        let mut settings = WorkerSettings::new(&args.nats_stream, &args.nats_subject_prefix);
        settings.linger = args.projection_linger;
        for worker in
            hindsight_projections::workers(&state.pool, &nats, state.commands.clone(), &settings)
        {
            workers.spawn(worker.run(shutdown.clone()));
        }
    }
    if components.is_empty() && workers.is_empty() {
        anyhow::bail!("every component is switched off: enable at least one of HINDSIGHT_RUN_API, HINDSIGHT_RUN_RELAY, HINDSIGHT_RUN_PROJECTIONS");
    }

    tokio::select! {
        () = shutdown_signal() => tracing::info!("shutdown requested"),
        Some(finished) = components.join_next(), if !components.is_empty() => {
            match finished {
                Ok((name, Ok(()))) => tracing::warn!(component = name, "component stopped"),
                Ok((name, Err(error))) => tracing::error!(component = name, error = format!("{error:#}"), "component failed"),
                Err(error) => tracing::error!(%error, "component panicked"),
            }
        }
    }
    shutdown.cancel();
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while let Some(finished) = components.join_next().await {
            if let Ok((name, Err(error))) = finished {
                tracing::error!(
                    component = name,
                    error = format!("{error:#}"),
                    "component failed while stopping"
                );
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("components did not stop in time; exiting anyway");
    }
    state.pool.close().await;
    state.commands.statements().close().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
