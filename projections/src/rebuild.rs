//! Zero-downtime rebuilds of read models.
//!
//! The event store is replayed, in large ordered batches, into a copy of each read model's
//! tables (`<table>_rebuild`, created `LIKE` the live ones) while the live tables keep
//! serving queries and following the stream. Several projections rebuilt together share
//! one reading of the history: each batch is read and decoded once and applied to every
//! copy by a task of its own, on a connection of its own. The copies' secondary indexes
//! are built once, after the replay, and each copy is analysed after them, so it goes live
//! with statistics. When a copy has caught up with its live checkpoint,
//! it is compared with the live model, table by table, in a snapshot that sees both at
//! the same position (taken while the checkpoint row is locked, so the live worker leaves
//! this read model alone for that moment, and compared after the lock is released); then
//! one transaction locks the checkpoint row again, applies the last few events to the
//! copy, and renames the copy into place, its indexes taking the names the live ones had.
//! The live worker pauses only while the copy catches up; queries wait at most for the
//! rename. A rebuild killed half-way leaves the live tables untouched; the next one drops
//! the leftover copy and starts again. One rebuild per projection runs at a time.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use hindsight_commands::event::{read_events, read_events_on, EventDecodeError};
use hindsight_commands::StoredEvent;
use serde::Serialize;
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::read_model::{ApplyError, ReadModel};
use crate::worker::batch_settings;

/// The suffix of the tables a rebuild fills.
pub const SUFFIX: &str = "_rebuild";

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("there is no rebuildable projection named `{0}`")]
    Unknown(String),
    #[error("a rebuild of `{0}` is already running")]
    AlreadyRunning(String),
    #[error("the database failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Events(#[from] hindsight_commands::event::EventDecodeError),
    #[error("replaying into the copy failed: {0}")]
    Apply(#[from] ApplyError),
    /// What stopped the shared replay of several projections, for each of them.
    #[error(transparent)]
    Shared(Arc<RebuildError>),
    #[error("the rebuild was interrupted")]
    Interrupted,
}

/// How far a rebuild is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Progress {
    pub events_done: u64,
    pub position: i64,
    pub target: i64,
    pub events_per_second: f64,
}

/// Rows found in one table and not the other, per table, when the copy was swapped in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub table: String,
    pub only_live: i64,
    pub only_rebuilt: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub name: String,
    pub events: u64,
    pub seconds: f64,
    pub differences: Vec<Difference>,
}

/// Events replayed per transaction.
const BATCH: i64 = 5_000;

/// Batches read ahead of the slowest copy: with [`READERS`], what bounds a rebuild's
/// memory.
const READ_AHEAD: usize = 2;

/// Batches read from the store at once.
const READERS: usize = 2;

/// The live model and a copy writing to the rebuild tables, for a rebuildable projection.
fn pair(name: &str) -> Option<(Arc<dyn ReadModel>, Arc<dyn ReadModel>)> {
    let live = crate::live_read_models()
        .into_iter()
        .find(|model| model.name() == name)?;
    let copy = crate::read_model_with_suffix(name, SUFFIX)?;
    Some((live, copy))
}

/// Names of the projections that can be rebuilt.
pub fn rebuildable() -> Vec<&'static str> {
    crate::live_read_models()
        .iter()
        .map(|model| model.name())
        .collect()
}

async fn record<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    name: &str,
    progress: &Progress,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_rebuilds SET position = $2, target = $3, events_done = $4, \
                updated_at = now() WHERE name = $1",
    )
    .bind(name)
    .bind(progress.position)
    .bind(progress.target)
    .bind(progress.events_done as i64)
    .execute(executor)
    .await?;
    Ok(())
}

async fn live_position(pool: &PgPool, name: &str) -> Result<i64, sqlx::Error> {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    Ok(position.unwrap_or(0))
}

fn rate(events: u64, started: Instant) -> f64 {
    events as f64 / started.elapsed().as_secs_f64().max(1e-6)
}

/// One projection being rebuilt: its live model, the copy filling the rebuild tables, and
/// the connection that holds its rebuild lock.
struct Target {
    name: &'static str,
    live: Arc<dyn ReadModel>,
    copy: Arc<dyn ReadModel>,
    guard: PgConnection,
}

impl Target {
    /// Each live table with the copy that replaces it.
    fn tables(&self) -> Vec<(String, String)> {
        self.live
            .tables()
            .into_iter()
            .zip(self.copy.tables())
            .collect()
    }
}

/// Rebuilds that hold their projections' rebuild locks and are ready to run.
pub struct Rebuild {
    pool: PgPool,
    targets: Vec<Target>,
}

impl std::fmt::Debug for Rebuild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebuild")
            .field("names", &self.names())
            .finish_non_exhaustive()
    }
}

/// Takes the rebuild lock of projection `name` (one rebuild per projection at a time)
/// and records the rebuild as running.
pub async fn start(pool: &PgPool, name: &str) -> Result<Rebuild, RebuildError> {
    start_many(pool, &[name]).await
}

/// Takes the rebuild locks of several projections, all or none, and records their
/// rebuilds as running. Running them together reads and decodes the history once for
/// all of them.
pub async fn start_many<S: AsRef<str>>(
    pool: &PgPool,
    names: &[S],
) -> Result<Rebuild, RebuildError> {
    let mut models: Vec<(Arc<dyn ReadModel>, Arc<dyn ReadModel>)> = Vec::new();
    for name in names {
        let name = name.as_ref();
        let (live, copy) = pair(name).ok_or_else(|| RebuildError::Unknown(name.to_owned()))?;
        if models.iter().all(|(known, _)| known.name() != live.name()) {
            models.push((live, copy));
        }
    }
    let mut targets: Vec<Target> = Vec::with_capacity(models.len());
    for (live, copy) in models {
        let name = live.name();
        let lock =
            hindsight_commands::db::try_session_lock(pool, &format!("hindsight-rebuild:{name}"))
                .await;
        let guard = match lock {
            Ok(Some(guard)) => guard,
            Ok(None) | Err(_) => {
                for target in targets {
                    hindsight_commands::db::end_session(target.guard).await;
                }
                return Err(match lock {
                    Err(error) => error.into(),
                    Ok(_) => RebuildError::AlreadyRunning(name.to_owned()),
                });
            }
        };
        targets.push(Target {
            name,
            live,
            copy,
            guard,
        });
    }
    for target in &targets {
        sqlx::query(
            "INSERT INTO projection_rebuilds (name, status) VALUES ($1, 'running') \
             ON CONFLICT (name) DO UPDATE SET status = 'running', target = 0, position = 0, \
                 events_done = 0, differences = NULL, error = NULL, started_at = now(), \
                 updated_at = now(), finished_at = NULL",
        )
        .bind(target.name)
        .execute(pool)
        .await?;
    }
    Ok(Rebuild {
        pool: pool.clone(),
        targets,
    })
}

impl Rebuild {
    /// The projections this rebuild covers, in the order their outcomes come.
    pub fn names(&self) -> Vec<&'static str> {
        self.targets.iter().map(|target| target.name).collect()
    }

    /// Runs the rebuilds, calling `on_progress` with a projection's name after each of its
    /// batches, and records each outcome. One projection failing does not stop the others.
    pub async fn run(
        self,
        mut on_progress: impl FnMut(&'static str, Progress) + Send,
    ) -> Vec<(&'static str, Result<Report, RebuildError>)> {
        let Rebuild { pool, mut targets } = self;
        let outcomes = run(&pool, &mut targets, &mut on_progress).await;
        let mut answered = Vec::with_capacity(targets.len());
        for (target, mut outcome) in targets.into_iter().zip(outcomes) {
            let (status, error, differences) = match &outcome {
                Ok(report) => ("done", None, serde_json::to_value(&report.differences).ok()),
                Err(error) => ("failed", Some(error.to_string()), None),
            };
            let recorded = sqlx::query(
                "UPDATE projection_rebuilds SET status = $2, error = $3, differences = $4, \
                        finished_at = now(), updated_at = now() WHERE name = $1",
            )
            .bind(target.name)
            .bind(status)
            .bind(error)
            .bind(differences)
            .execute(&pool)
            .await;
            if let (Err(error), Ok(_)) = (recorded, &outcome) {
                outcome = Err(error.into());
            }
            hindsight_commands::db::end_session(target.guard).await;
            answered.push((target.name, outcome));
        }
        answered
    }
}

/// Rebuilds projection `name`, calling `on_progress` after every batch.
pub async fn rebuild(
    pool: &PgPool,
    name: &str,
    mut on_progress: impl FnMut(Progress) + Send,
) -> Result<Report, RebuildError> {
    let rebuild = start(pool, name).await?;
    rebuild
        .run(|_, progress| on_progress(progress))
        .await
        .pop()
        .map_or_else(
            || Err(RebuildError::Unknown(name.to_owned())),
            |(_, outcome)| outcome,
        )
}

/// How far a copy got in the shared replay.
#[derive(Debug, Clone, Copy)]
struct Replayed {
    position: i64,
    events: u64,
}

/// Creates every copy, replays the history once into all of them, then builds each copy's
/// deferred indexes and swaps it in. Answers one outcome per target, in order.
async fn run(
    pool: &PgPool,
    targets: &mut [Target],
    on_progress: &mut (impl FnMut(&'static str, Progress) + Send),
) -> Vec<Result<Report, RebuildError>> {
    let started = Instant::now();
    let mut prepared = Vec::with_capacity(targets.len());
    for target in targets.iter() {
        prepared.push(prepare(pool, target).await);
    }
    let copies = targets
        .iter()
        .zip(&prepared)
        .filter(|(_, prepared)| prepared.is_ok())
        .map(|(target, _)| (target.name, Arc::clone(&target.copy)))
        .collect();
    let mut replayed = replay(pool, copies, started, on_progress).await.into_iter();
    // The copies are finished side by side: each waits only for its own indexes, its own
    // comparison and its own live worker.
    let finishing = targets.iter_mut().zip(prepared).map(|(target, prepared)| {
        let replayed = prepared.map(|deferred| (deferred, replayed.next()));
        async move {
            match replayed? {
                (deferred, Some(Ok(replayed))) => {
                    finish(pool, target, deferred, replayed, started).await
                }
                (_, Some(Err(error))) => Err(error),
                (_, None) => Err(RebuildError::Interrupted),
            }
        }
    });
    let finished = futures::future::join_all(finishing).await;
    let mut outcomes = Vec::with_capacity(targets.len());
    for (target, outcome) in targets.iter().zip(finished) {
        outcomes.push(outcome.map(|(report, progress)| {
            on_progress(target.name, progress);
            report
        }));
    }
    outcomes
}

/// Creates the copy of each of the target's tables, empty, and answers the definitions of
/// its secondary indexes: they are dropped from the copy and built once after the replay,
/// which is much cheaper than keeping them up to date row by row. Unique indexes stay, as
/// the read models' upserts rely on them.
async fn prepare(pool: &PgPool, target: &Target) -> Result<Vec<String>, RebuildError> {
    let mut deferred = Vec::new();
    for (live_table, copy_table) in target.tables() {
        sqlx::query(&format!("DROP TABLE IF EXISTS {copy_table}"))
            .execute(pool)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE {copy_table} (LIKE {live_table} INCLUDING ALL)"
        ))
        .execute(pool)
        .await?;
        let indexes: Vec<(String, String)> = sqlx::query_as(
            "SELECT format('%I.%I', n.nspname, c.relname), pg_get_indexdef(i.indexrelid) \
             FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indexrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE i.indrelid = $1::text::regclass AND NOT i.indisunique",
        )
        .bind(&copy_table)
        .fetch_all(pool)
        .await?;
        for (index, definition) in indexes {
            sqlx::query(&format!("DROP INDEX {index}"))
                .execute(pool)
                .await?;
            deferred.push(definition);
        }
    }
    Ok(deferred)
}

/// Events handed to a copy: every event after the copy's position up to `end`.
struct Batch {
    events: Arc<[StoredEvent]>,
    end: i64,
    /// The live model's checkpoint, for progress reports.
    target: i64,
}

/// A window of positions being read from the store.
type Read = JoinHandle<Result<Vec<StoredEvent>, EventDecodeError>>;

/// One copy's side of the shared replay.
struct Lane {
    name: &'static str,
    batches: Option<mpsc::Sender<Batch>>,
    filler: JoinHandle<Result<(), RebuildError>>,
    replayed: Replayed,
    /// The live model's checkpoint when last looked at, for progress reports.
    target: i64,
    /// Whether the copy got within a batch of its live model (the swap does the rest).
    finished: bool,
}

/// Reads the history once, in batches, and hands every batch to each copy's filler task,
/// each on a connection of its own, until every copy is within one batch of its live
/// model's checkpoint. The reader stays at most [`READ_AHEAD`] batches ahead of the
/// slowest copy. A copy that fails stops alone; a failure to read stops them all.
async fn replay(
    pool: &PgPool,
    copies: Vec<(&'static str, Arc<dyn ReadModel>)>,
    started: Instant,
    on_progress: &mut (impl FnMut(&'static str, Progress) + Send),
) -> Vec<Result<Replayed, RebuildError>> {
    let (progress, mut reports) = mpsc::unbounded_channel();
    let mut lanes: Vec<Lane> = copies
        .into_iter()
        .map(|(name, copy)| {
            let (batches, received) = mpsc::channel(READ_AHEAD);
            let filler = tokio::spawn(fill(
                pool.clone(),
                name,
                copy,
                received,
                progress.clone(),
                started,
            ));
            Lane {
                name,
                batches: Some(batches),
                filler,
                replayed: Replayed {
                    position: 0,
                    events: 0,
                },
                target: 0,
                finished: false,
            }
        })
        .collect();
    drop(progress);

    let mut position = 0;
    // Windows of positions being read, oldest first, and the end of the newest.
    let mut reads: VecDeque<(i64, Read)> = VecDeque::new();
    let mut requested = 0;
    let read: Result<(), RebuildError> = async {
        loop {
            // Which copies still replay, and how far all of them may go.
            let mut up_to = i64::MAX;
            for lane in &mut lanes {
                let Some(batches) = &lane.batches else {
                    continue;
                };
                if batches.is_closed() {
                    // Its filler failed; the error comes with the task.
                    lane.batches = None;
                    continue;
                }
                let live = live_position(pool, lane.name).await?;
                lane.target = live;
                if live - position <= BATCH {
                    lane.batches = None;
                    lane.finished = true;
                } else {
                    up_to = up_to.min(live);
                }
            }
            if up_to == i64::MAX {
                return Ok(());
            }
            // Windows are fixed ranges of positions, so several can be read (and decoded)
            // at once. Every window ends at or below the checkpoint of every copy still
            // replaying when it was asked for, and checkpoints only move forward.
            while reads.len() < READERS && requested < up_to {
                let end = requested.saturating_add(BATCH).min(up_to);
                let (pool, after) = (pool.clone(), requested);
                reads.push_back((
                    end,
                    tokio::spawn(async move { read_events(&pool, after, end, i64::MAX).await }),
                ));
                requested = end;
            }
            let Some((end, read)) = reads.pop_front() else {
                return Ok(());
            };
            let events: Arc<[StoredEvent]> = joined(read).await??.into();
            for lane in &mut lanes {
                let Some(batches) = &lane.batches else {
                    continue;
                };
                if events.is_empty() {
                    lane.replayed.position = end;
                } else if batches
                    .send(Batch {
                        events: Arc::clone(&events),
                        end,
                        target: lane.target,
                    })
                    .await
                    .is_ok()
                {
                    lane.replayed = Replayed {
                        position: end,
                        events: lane.replayed.events + events.len() as u64,
                    };
                } else {
                    lane.batches = None;
                }
            }
            position = end;
            while let Ok((name, progress)) = reports.try_recv() {
                on_progress(name, progress);
            }
        }
    }
    .await;
    // Windows read ahead of where the replay stopped are not needed; they are waited for
    // rather than aborted so their connections go back to the pool between statements.
    for (_, read) in reads {
        joined(read).await.ok();
    }
    let read = read.map_err(Arc::new);

    let mut outcomes = Vec::with_capacity(lanes.len());
    for mut lane in lanes {
        lane.batches = None;
        let filled = joined(lane.filler).await.and_then(|filled| filled);
        outcomes.push(match (filled, &read) {
            (Err(error), _) => Err(error),
            (Ok(()), Err(error)) if !lane.finished => Err(RebuildError::Shared(Arc::clone(error))),
            (Ok(()), _) => Ok(lane.replayed),
        });
    }
    while let Ok((name, progress)) = reports.try_recv() {
        on_progress(name, progress);
    }
    outcomes
}
/// Waits for a task of the rebuild, passing its panic on.
async fn joined<T>(task: JoinHandle<T>) -> Result<T, RebuildError> {
    match task.await {
        Ok(answer) => Ok(answer),
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => Err(RebuildError::Interrupted),
    }
}

/// Applies each batch handed to it to one copy, one transaction per batch, and records
/// the copy's progress.
async fn fill(
    pool: PgPool,
    name: &'static str,
    copy: Arc<dyn ReadModel>,
    mut batches: mpsc::Receiver<Batch>,
    progress: mpsc::UnboundedSender<(&'static str, Progress)>,
    started: Instant,
) -> Result<(), RebuildError> {
    let mut events_done = 0u64;
    while let Some(Batch {
        events,
        end,
        target,
    }) = batches.recv().await
    {
        let mut tx = hindsight_commands::db::begin(&pool).await?;
        // A copy is worth nothing until it is swapped in, by a transaction that commits
        // durably after every batch: no batch needs to wait for its own flush. A copy
        // grows from nothing to the whole history, on pooled sessions that keep their
        // prepared statements: each full batch (more than `worker::SMALL_BATCH` events) is
        // planned for the copy as it is; a short last one runs on joins by key only.
        tx.execute(sqlx::raw_sql(batch_settings(events.len())))
            .await?;
        copy.apply(&mut tx, &events).await?;
        events_done += events.len() as u64;
        let report = Progress {
            events_done,
            position: end,
            target,
            events_per_second: rate(events_done, started),
        };
        // With the batch, in its transaction: no round trip and no flush of its own.
        record(&mut *tx, name, &report).await?;
        tx.commit().await?;
        // The receiver only goes away once every filler has ended.
        progress.send((name, report)).ok();
    }
    Ok(())
}

/// Finishes a copy whose replay got within a batch of its live model, in three steps:
///
/// 1. With the live worker paused on its checkpoint (the checkpoint row locked by the
///    rebuild's own guard connection), the copy catches up to the live position, that is
///    committed, and a snapshot is taken that sees both at it; then the worker goes on.
/// 2. In that snapshot copy and live are compared, table by table, while the copy's
///    deferred indexes are built, all at once, each on a connection of its own, and then
///    its tables analysed.
/// 3. One transaction pauses the live worker again, applies the events the copy still
///    lacks and renames the copy into place.
///
/// The comparison, which reads every row of both tables, thus neither holds up the live
/// model nor waits for the indexes; the live worker pauses only while the copy catches up.
async fn finish(
    pool: &PgPool,
    target: &mut Target,
    deferred: Vec<String>,
    replayed: Replayed,
    started: Instant,
) -> Result<(Report, Progress), RebuildError> {
    let name = target.name;
    let Replayed {
        mut position,
        events: mut events_done,
    } = replayed;
    let tables = target.tables();

    // 1. The copy at the live position, and a snapshot of both there.
    let pause = target.guard.begin().await?;
    let pause = paused(pause, name).await?;
    let compared_at = pause.live;
    let held = async {
        let mut catch_up = hindsight_commands::db::begin(pool).await?;
        let caught_up = apply_up_to(&mut catch_up, &*target.copy, position, compared_at).await?;
        catch_up.commit().await?;
        let mut snapshot = hindsight_commands::db::begin(pool).await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *snapshot)
            .await?;
        // The snapshot is taken by the transaction's first query.
        sqlx::query("SELECT 1").execute(&mut *snapshot).await?;
        Ok::<_, RebuildError>((snapshot, caught_up))
    }
    .await;
    let (mut snapshot, caught_up) = match held {
        Ok(held) => {
            pause.transaction.commit().await?;
            held
        }
        Err(error) => {
            // Let the live worker go on at once, not when the whole rebuild ends.
            pause.transaction.rollback().await.ok();
            return Err(error);
        }
    };
    position = caught_up.0;
    events_done += caught_up.1;

    // 2. The comparison in the snapshot, the indexes side by side with it.
    let comparing = async {
        let mut differences = Vec::new();
        for (live_table, copy_table) in &tables {
            let (only_live, only_rebuilt) = compare(&mut snapshot, live_table, copy_table).await?;
            if only_live != 0 || only_rebuilt != 0 {
                differences.push(Difference {
                    table: live_table.clone(),
                    only_live,
                    only_rebuilt,
                });
            }
        }
        snapshot.commit().await?;
        Ok::<_, sqlx::Error>(differences)
    };
    // An index build is mostly one backend sorting, and a copy's indexes are the last
    // thing its swap waits for. Then each copy is analysed, so that it goes live with
    // statistics of its own, not none: the queries planned on it from the swap on would
    // otherwise guess at every filter's selectivity until autovacuum came by (never, where
    // it is off). Not beside the index builds: `ANALYZE` and `CREATE INDEX` take locks
    // that exclude each other, and a queued `ANALYZE` would hold up the builds behind it.
    let analyses: Vec<String> = tables
        .iter()
        .map(|(_, copy_table)| format!("ANALYZE {copy_table}"))
        .collect();
    let indexing = async {
        futures::future::try_join_all(
            deferred
                .iter()
                .map(|definition| sqlx::query(definition).execute(pool)),
        )
        .await?;
        futures::future::try_join_all(
            analyses
                .iter()
                .map(|analyse| pool.execute(sqlx::raw_sql(analyse))),
        )
        .await
    };
    let (differences, _) = futures::future::try_join(comparing, indexing).await?;

    // 3. The swap.
    let Paused {
        transaction: mut tx,
        live,
    } = paused(hindsight_commands::db::begin(pool).await?, name).await?;
    let caught_up = apply_up_to(&mut tx, &*target.copy, position, live).await?;
    position = caught_up.0;
    events_done += caught_up.1;
    for (live_table, copy_table) in &tables {
        let mut names = index_names(&mut tx, live_table).await?;
        let copies = index_names(&mut tx, copy_table).await?;
        sqlx::query(&format!(
            "ALTER TABLE {live_table} RENAME TO {live_table}_retired"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!("ALTER TABLE {copy_table} RENAME TO {live_table}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("DROP TABLE {live_table}_retired"))
            .execute(&mut *tx)
            .await?;
        // The copy's indexes were named after the copy: give each the name of the live
        // index it replaces, so migrations and operators find them as before.
        for (copy_name, shape) in copies {
            let Some(index) = names.iter().position(|(_, live)| *live == shape) else {
                continue;
            };
            let (name, _) = names.remove(index);
            if name != copy_name {
                sqlx::query(&format!(
                    "ALTER INDEX {} RENAME TO {}",
                    quote(&copy_name),
                    quote(&name)
                ))
                .execute(&mut *tx)
                .await?;
            }
        }
    }
    tx.commit().await?;
    let progress = Progress {
        events_done,
        position,
        target: live,
        events_per_second: rate(events_done, started),
    };
    record(pool, name, &progress).await?;
    if !differences.is_empty() {
        tracing::warn!(
            projection = name,
            compared_at,
            ?differences,
            "the rebuilt model differs from the live one; the rebuilt one is now live"
        );
    }
    let report = Report {
        name: name.to_owned(),
        events: events_done,
        seconds: started.elapsed().as_secs_f64(),
        differences,
    };
    Ok((report, progress))
}

/// A transaction holding a projection's checkpoint row, so its live worker leaves the
/// read model alone, and the position the live model had reached.
struct Paused<'c> {
    transaction: sqlx::Transaction<'c, sqlx::Postgres>,
    live: i64,
}

async fn paused<'c>(
    mut transaction: sqlx::Transaction<'c, sqlx::Postgres>,
    name: &str,
) -> Result<Paused<'c>, sqlx::Error> {
    sqlx::query("SET LOCAL lock_timeout = '10s'")
        .execute(&mut *transaction)
        .await?;
    let live: i64 = sqlx::query_scalar(
        "SELECT position FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
    )
    .bind(name)
    .fetch_optional(&mut *transaction)
    .await?
    .unwrap_or(0);
    Ok(Paused { transaction, live })
}

/// Applies to `copy` the events after `position` up to `up_to`, in batches, through
/// `connection`; answers the position reached and how many events were applied.
async fn apply_up_to(
    connection: &mut PgConnection,
    copy: &dyn ReadModel,
    mut position: i64,
    up_to: i64,
) -> Result<(i64, u64), RebuildError> {
    let mut applied = 0;
    loop {
        let events = read_events_on(connection, position, up_to, BATCH).await?;
        let Some(last) = events.last().map(|event| event.position) else {
            break;
        };
        copy.apply(connection, &events).await?;
        position = last;
        applied += events.len() as u64;
    }
    Ok((position, applied))
}

/// Every index of `table` with what it indexes: its definition without its own name and
/// its table's, so that a table's and its copy's indexes match.
async fn index_names(
    connection: &mut PgConnection,
    table: &str,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT c.relname, \
                regexp_replace(pg_get_indexdef(i.indexrelid), '^(CREATE (UNIQUE )?INDEX) \\S+ ON \\S+', '\\1') \
         FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE i.indrelid = $1::text::regclass ORDER BY c.relname",
    )
    .bind(table)
    .fetch_all(connection)
    .await
}

/// `name` as a quoted SQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Counts the rows of `live` not in `copy` and those of `copy` not in `live`, as
/// `EXCEPT ALL` both ways would. Tables with a primary key are compared row against row
/// in one merge join over both primary key indexes: no sort, no hash table spilling to
/// disk, and about a third of the time of the two set operations on a million rows. The
/// rows that share a key are compared column by column (`ROW(l.a, …) IS DISTINCT FROM
/// ROW(c.a, …)`), which treats two nulls as equal as a comparison of whole rows does, at
/// half its cost: a whole-row reference builds a copy of each row before comparing it.
async fn compare(
    connection: &mut PgConnection,
    live: &str,
    copy: &str,
) -> Result<(i64, i64), sqlx::Error> {
    // Every column of the live table, and whether its primary key holds it.
    let columns: Vec<(String, bool)> = sqlx::query_as(
        "SELECT quote_ident(a.attname), coalesce(a.attnum = ANY (i.indkey), false) \
         FROM pg_attribute a \
         LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
         WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
    )
    .bind(live)
    .fetch_all(&mut *connection)
    .await?;
    let (key, rest): (Vec<_>, Vec<_>) = columns.into_iter().partition(|(_, key)| *key);
    let statement = match key.first() {
        Some((first, _)) => {
            sqlx::query("SET LOCAL enable_hashjoin = off")
                .execute(&mut *connection)
                .await?;
            let on = key
                .iter()
                .map(|(column, _)| format!("l.{column} = c.{column}"))
                .collect::<Vec<_>>()
                .join(" AND ");
            let changed = if rest.is_empty() {
                // The key is the whole row: rows that share it are equal.
                "false".to_owned()
            } else {
                let side = |table: &str| {
                    rest.iter()
                        .map(|(column, _)| format!("{table}.{column}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                format!("ROW({}) IS DISTINCT FROM ROW({})", side("l"), side("c"))
            };
            format!(
                "SELECT count(*) FILTER (WHERE c.{first} IS NULL \
                                         OR (l.{first} IS NOT NULL AND {changed})), \
                        count(*) FILTER (WHERE l.{first} IS NULL \
                                         OR (c.{first} IS NOT NULL AND {changed})) \
                 FROM {live} l FULL JOIN {copy} c ON {on}"
            )
        }
        None => format!(
            "SELECT (SELECT count(*) FROM (SELECT * FROM {live} EXCEPT ALL SELECT * FROM {copy}) a), \
                    (SELECT count(*) FROM (SELECT * FROM {copy} EXCEPT ALL SELECT * FROM {live}) b)"
        ),
    };
    sqlx::query_as(&statement).fetch_one(connection).await
}

/// The state of the latest rebuild of a projection, if any.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RebuildStatus {
    pub status: String,
    pub target: i64,
    pub position: i64,
    pub events_done: i64,
    pub differences: Option<serde_json::Value>,
    pub error: Option<String>,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

pub async fn status(pool: &PgPool, name: &str) -> Result<Option<RebuildStatus>, sqlx::Error> {
    sqlx::query_as(
        // A `running` rebuild that stopped reporting progress died with its process.
        "SELECT CASE WHEN status = 'running' AND updated_at < now() - interval '60 seconds' \
                     THEN 'interrupted' ELSE status END AS status, \
                target, position, events_done, differences, error, started_at, finished_at \
         FROM projection_rebuilds WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await
}
