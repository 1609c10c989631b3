//! Tamper evidence for the event store: per-stream hash chains computed by the database
//! as events are appended, signed checkpoints over the global order, and a verifier that
//! names the first broken link.
//!
//! Every event carries `hash`, SHA-256 over a canonical encoding of its contents and of
//! `prev_hash`, the hash of the same stream's previous event. The database computes both
//! in a trigger (`migrations/0009_integrity.sql`, which documents the encoding), so no
//! writer can skip or fake them. A chain alone is not enough: anyone who can write to the
//! database can also recompute hashes, and deleting a stream's newest event leaves no
//! broken link. So a checkpoint periodically seals the global order with a key the
//! database never sees: checkpoint `P` records
//! `chain = sha256(previous chain || hash of every event in (previous, P], in position order)`
//! and `signature = HMAC-SHA256(key, P || chain || previous || gaps)`, where the gaps are the
//! positions of its range that held no event (rolled-back appends). With the gaps a
//! verifier can name the exact position of a deleted or inserted event, not just the range.
//!
//! [`verify`] walks every event in position order, in keyset batches with flat memory:
//! it recomputes each event's hash from its stored contents (an edited payload, metadata,
//! type, identity, sequence, position or time), checks that it links to its stream's
//! previous event (a deleted, renumbered or reordered event), and recomputes every
//! checkpoint's chain and signature as it passes (a deleted stream tail, an inserted
//! event, a reordered global history, a recomputed chain, a forged or deleted checkpoint).
//! It reports the lowest broken position.
//!
//! What it cannot see: events after the newest checkpoint are protected by their stream
//! chains only, so checkpoint often (see [`run_checkpoints`]); and someone who deletes the
//! newest checkpoints together with the events they sealed leaves an older, consistent
//! history. Keeping the newest checkpoint's position ([`VerifyReport::sealed_up_to`]) and
//! chain where the database's administrators cannot write closes that gap. Whoever holds
//! the key can forge checkpoints, so it lives with the application, never in the database.
//!
//! The verifier reads stored rows, not [`crate::StoredEvent`]s: those are upcast to the
//! current event versions, while the hash covers the payload exactly as stored.

use std::fmt;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::postgres::types::PgRange;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What the first event of every stream links to, and what the first checkpoint extends.
pub const GENESIS: [u8; 32] = [0; 32];

/// The first part of every event's encoding: a new encoding gets a new tag, so hashes of
/// the two can never be confused.
const EVENT_ENCODING_TAG: &[u8] = b"hindsight-event-v1";

/// The most events one checkpoint seals. It bounds a checkpoint's gap list, and with it
/// the memory of sealing and verifying, however large the backlog being sealed.
pub const MAX_EVENTS_PER_CHECKPOINT: u64 = 10_000;

/// Events read per round trip while verifying (payloads included).
const VERIFY_BATCH: i64 = 500;
/// Event hashes read per round trip while sealing.
const SEAL_BATCH: i64 = 1_000;
/// Checkpoints read per round trip while verifying.
const CHECKPOINT_BATCH: i64 = 16;
/// The advisory-lock key name that lets one writer at a time append a checkpoint.
const CHECKPOINT_LOCK: &str = "hindsight-integrity-checkpoint";

type HmacSha256 = Hmac<Sha256>;

/// The secret that signs checkpoints. Never printed; the raw bytes are not kept, only the
/// keyed HMAC state derived from them.
pub struct IntegrityKey {
    mac: HmacSha256,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityKeyError {
    #[error("the integrity key must be at least {min} bytes long, got {len}", min = IntegrityKey::MIN_LEN)]
    TooShort { len: usize },
}

impl IntegrityKey {
    /// The shortest key accepted: HMAC-SHA256's own output size.
    pub const MIN_LEN: usize = 32;

    pub fn new(bytes: &[u8]) -> Result<Self, IntegrityKeyError> {
        let too_short = || IntegrityKeyError::TooShort { len: bytes.len() };
        if bytes.len() < Self::MIN_LEN {
            return Err(too_short());
        }
        // HMAC accepts keys of any length; the error cannot happen.
        let mac = <HmacSha256 as Mac>::new_from_slice(bytes).map_err(|_| too_short())?;
        Ok(Self { mac })
    }

    fn sign(&self, message: &[u8]) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(message);
        mac.finalize().into_bytes().into()
    }

    /// Whether `signature` is this key's signature of `message` (in constant time).
    fn signed(&self, message: &[u8], signature: &[u8]) -> bool {
        let mut mac = self.mac.clone();
        mac.update(message);
        mac.verify_slice(signature).is_ok()
    }
}

impl fmt::Debug for IntegrityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IntegrityKey([REDACTED])")
    }
}

/// Everything an event's hash covers, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashedEvent<'a> {
    pub prev_hash: &'a [u8],
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: i64,
    pub event_id: Uuid,
    pub event_type: &'a str,
    pub event_version: &'a str,
    /// The payload in Postgres's canonical jsonb text form (`payload::text`).
    pub payload: &'a str,
    /// The metadata in Postgres's canonical jsonb text form (`metadata::text`).
    pub metadata: &'a str,
    pub position: i64,
    pub recorded_at: DateTime<Utc>,
}

impl HashedEvent<'_> {
    /// The event's hash: the same value the database's `hindsight_event_hash` computes.
    pub fn hash(&self) -> [u8; 32] {
        fn field(hasher: &mut Sha256, bytes: &[u8]) {
            // Postgres values are at most 1 GB, so the length always fits.
            let length = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
            hasher.update(length.to_be_bytes());
            hasher.update(bytes);
        }
        let mut hasher = Sha256::new();
        field(&mut hasher, EVENT_ENCODING_TAG);
        field(&mut hasher, self.prev_hash);
        field(&mut hasher, self.aggregate_type.as_bytes());
        field(&mut hasher, self.aggregate_id.as_bytes());
        hasher.update(self.sequence.to_be_bytes());
        hasher.update(self.event_id.as_bytes());
        field(&mut hasher, self.event_type.as_bytes());
        field(&mut hasher, self.event_version.as_bytes());
        field(&mut hasher, self.payload.as_bytes());
        field(&mut hasher, self.metadata.as_bytes());
        hasher.update(self.position.to_be_bytes());
        hasher.update(self.recorded_at.timestamp_micros().to_be_bytes());
        hasher.finalize().into()
    }
}

/// Positions `first..=last` of a checkpoint's range held no event when it was sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GapRun {
    first: i64,
    last: i64,
}

impl GapRun {
    fn from_range(range: &PgRange<i64>) -> Self {
        let first = match range.start {
            Bound::Included(first) => first,
            Bound::Excluded(before) => before.saturating_add(1),
            Bound::Unbounded => i64::MIN,
        };
        let last = match range.end {
            Bound::Included(last) => last,
            Bound::Excluded(after) => after.saturating_sub(1),
            Bound::Unbounded => i64::MAX,
        };
        Self { first, last }
    }

    fn to_range(self) -> PgRange<i64> {
        PgRange {
            start: Bound::Included(self.first),
            end: Bound::Included(self.last),
        }
    }
}

/// What a checkpoint's signature covers:
/// `position || chain || previous_position || (first || last) of each gap run`, integers
/// as 8 bytes big-endian. Every part but the last has a fixed size, so the bytes are
/// unambiguous.
fn signed_message(position: i64, chain: &[u8], previous_position: i64, gaps: &[GapRun]) -> Vec<u8> {
    let mut message = Vec::with_capacity(48 + 16 * gaps.len());
    message.extend_from_slice(&position.to_be_bytes());
    message.extend_from_slice(chain);
    message.extend_from_slice(&previous_position.to_be_bytes());
    for run in gaps {
        message.extend_from_slice(&run.first.to_be_bytes());
        message.extend_from_slice(&run.last.to_be_bytes());
    }
    message
}

/// A checkpoint as [`record_checkpoint`] appended it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Every position up to and including this one is sealed.
    pub position: i64,
    /// The checkpoint this one follows (0 for the first): it seals `(previous_position, position]`.
    pub previous_position: i64,
    /// How many events it sealed.
    pub events: u64,
    pub chain: [u8; 32],
    pub recorded_at: DateTime<Utc>,
}

/// A checkpoint being computed: feed it the range's events in position order.
#[derive(Debug, Clone)]
struct Sealing {
    previous_position: i64,
    chain: Sha256,
    gaps: Vec<GapRun>,
    next: i64,
    events: u64,
}

/// A computed checkpoint, ready to store.
#[derive(Debug, Clone)]
struct Sealed {
    position: i64,
    previous_position: i64,
    events: u64,
    gaps: Vec<GapRun>,
    chain: [u8; 32],
    signature: [u8; 32],
}

impl Sealing {
    fn new(previous_position: i64, previous_chain: &[u8]) -> Self {
        Self {
            previous_position,
            chain: Sha256::new_with_prefix(previous_chain),
            gaps: Vec::new(),
            next: previous_position.saturating_add(1),
            events: 0,
        }
    }

    fn add(&mut self, position: i64, hash: &[u8]) {
        if position > self.next {
            self.gaps.push(GapRun {
                first: self.next,
                last: position - 1,
            });
        }
        self.chain.update(hash);
        self.next = position.saturating_add(1);
        self.events += 1;
    }

    /// The checkpoint at `position` (at or after the last event added).
    fn finish(mut self, position: i64, key: &IntegrityKey) -> Sealed {
        if self.next <= position {
            self.gaps.push(GapRun {
                first: self.next,
                last: position,
            });
        }
        let chain: [u8; 32] = self.chain.finalize().into();
        let signature = key.sign(&signed_message(
            position,
            &chain,
            self.previous_position,
            &self.gaps,
        ));
        Sealed {
            position,
            previous_position: self.previous_position,
            events: self.events,
            gaps: self.gaps,
            chain,
            signature,
        }
    }
}

/// Seals every event up to `up_to` with signed checkpoints and returns the last one
/// appended, or `None` when everything up to `up_to` was sealed already.
///
/// `up_to` must be a position below which no event can still appear: a transaction that
/// drew a lower position and commits after the checkpoint would look like an inserted
/// event to [`verify`]. The relay's checkpoint is such a position (it only moves past a
/// gap once no transaction can fill it, see [`crate::relay`]); [`seal_published`] uses it.
/// Positions above the store's head are never sealed, whatever `up_to` says.
///
/// Each checkpoint covers at most [`MAX_EVENTS_PER_CHECKPOINT`] events and is written in
/// its own transaction holding a transaction-scoped advisory lock, so concurrent callers
/// (several `serve` processes) append one chain and never the same checkpoint twice (the
/// table's unique `previous_position` backs this up); readers are not blocked, and the
/// writing role needs no more than `SELECT` and `INSERT` on the table.
pub async fn record_checkpoint(
    pool: &PgPool,
    key: &IntegrityKey,
    up_to: i64,
) -> Result<Option<Checkpoint>, sqlx::Error> {
    let mut recorded = None;
    while let Some(checkpoint) = seal_next(pool, key, up_to).await? {
        recorded = Some(checkpoint);
    }
    Ok(recorded)
}

/// Seals the positions the relay of `relay_stream` has published: see [`record_checkpoint`].
pub async fn seal_published(
    pool: &PgPool,
    key: &IntegrityKey,
    relay_stream: &str,
) -> Result<Option<Checkpoint>, sqlx::Error> {
    let published = crate::relay::checkpoint(pool, relay_stream).await?;
    record_checkpoint(pool, key, published).await
}

async fn seal_next(
    pool: &PgPool,
    key: &IntegrityKey,
    up_to: i64,
) -> Result<Option<Checkpoint>, sqlx::Error> {
    let mut tx = crate::db::begin(pool).await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(CHECKPOINT_LOCK)
        .execute(&mut *tx)
        .await?;
    let last = sqlx::query(
        "SELECT position, chain FROM integrity_checkpoints ORDER BY position DESC LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    let (previous_position, previous_chain) = match last {
        Some(row) => (row.try_get("position")?, row.try_get("chain")?),
        None => (0_i64, GENESIS.to_vec()),
    };
    let head: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM events")
        .fetch_one(&mut *tx)
        .await?;
    let end = up_to.min(head);
    if end <= previous_position {
        tx.rollback().await?;
        return Ok(None);
    }

    let mut sealing = Sealing::new(previous_position, &previous_chain);
    let mut position = end;
    'batches: loop {
        let remaining = MAX_EVENTS_PER_CHECKPOINT - sealing.events;
        let limit = i64::try_from(remaining).map_or(SEAL_BATCH, |left| left.min(SEAL_BATCH));
        let rows = sqlx::query(
            "SELECT position, hash FROM events \
             WHERE position >= $1 AND position <= $2 ORDER BY position LIMIT $3",
        )
        .bind(sealing.next)
        .bind(end)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        for row in &rows {
            let event_position: i64 = row.try_get("position")?;
            let hash: Vec<u8> = row.try_get("hash")?;
            sealing.add(event_position, &hash);
            if sealing.events >= MAX_EVENTS_PER_CHECKPOINT {
                position = event_position;
                break 'batches;
            }
        }
        if i64::try_from(rows.len()).map_or(true, |fetched| fetched < limit) {
            break;
        }
    }

    let sealed = sealing.finish(position, key);
    let gaps: Vec<PgRange<i64>> = sealed.gaps.iter().map(|run| run.to_range()).collect();
    let recorded_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO integrity_checkpoints (position, previous_position, gaps, chain, signature) \
         VALUES ($1, $2, $3, $4, $5) RETURNING recorded_at",
    )
    .bind(sealed.position)
    .bind(sealed.previous_position)
    .bind(gaps)
    .bind(sealed.chain.as_slice())
    .bind(sealed.signature.as_slice())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Checkpoint {
        position: sealed.position,
        previous_position: sealed.previous_position,
        events: sealed.events,
        chain: sealed.chain,
        recorded_at,
    }))
}

/// How the background checkpointing runs.
#[derive(Debug, Clone)]
pub struct CheckpointSettings {
    /// The relay stream whose published position is sealed.
    pub relay_stream: String,
    /// Time between two checkpoints.
    pub interval: Duration,
}

impl CheckpointSettings {
    pub fn new(relay_stream: impl Into<String>) -> Self {
        Self {
            relay_stream: relay_stream.into(),
            interval: Duration::from_secs(10),
        }
    }
}

/// Seals what the relay has published, every `interval`, until `shutdown`. Failures are
/// logged and retried on the next tick. Any number of processes may run this at once:
/// they take turns (see [`record_checkpoint`]) and extend one chain.
pub async fn run_checkpoints(
    pool: PgPool,
    key: Arc<IntegrityKey>,
    settings: CheckpointSettings,
    shutdown: CancellationToken,
) {
    loop {
        match seal_published(&pool, &key, &settings.relay_stream).await {
            Ok(Some(checkpoint)) => tracing::debug!(
                position = checkpoint.position,
                events = checkpoint.events,
                "sealed an integrity checkpoint"
            ),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!(%error, "sealing an integrity checkpoint failed; retrying")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(settings.interval) => {}
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// No broken link anywhere.
    pub ok: bool,
    /// Events checked.
    pub checked: u64,
    /// Checkpoints checked.
    pub checkpoints: u64,
    /// The newest checkpoint's position (0 when none): events above it are protected by
    /// their stream chains only.
    pub sealed_up_to: i64,
    /// The broken link with the lowest position.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_broken: Option<Broken>,
}

/// One broken link: where, what kind, and why in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Broken {
    /// The position of the tampered event or checkpoint.
    pub position: i64,
    pub kind: BrokenKind,
    /// The event's stream and sequence, when an event is stored at `position`.
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub sequence: Option<i64>,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokenKind {
    /// The event no longer matches its own hash: something it covers was changed.
    ContentChanged,
    /// The event does not link to its stream's previous event, or that event is gone.
    ChainBroken,
    /// A checkpoint sealed an event at this position; none is stored there now.
    MissingEvent,
    /// An event at a position a checkpoint sealed as empty, or at no valid position.
    UnexpectedEvent,
    /// The sealed events no longer hash to the checkpoint's chain.
    ChainMismatch,
    /// A checkpoint whose signature does not match, or that is out of its place.
    ForgedCheckpoint,
    /// A checkpoint that a later one follows is no longer stored.
    MissingCheckpoint,
}

/// Verifies the whole event store against its hash chains and signed checkpoints; see
/// the module documentation. A broken history is an answer (`ok: false`), not an error.
///
/// Checkpoints are read up to the newest one when the walk starts (everything they seal
/// was committed by then) and events up to the head of the store at that moment, in
/// keyset batches, so memory stays flat however long the history is.
pub async fn verify(pool: &PgPool, key: &IntegrityKey) -> Result<VerifyReport, sqlx::Error> {
    let sealed_up_to: i64 =
        sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM integrity_checkpoints")
            .fetch_one(pool)
            .await?;
    let head = crate::relay::head(pool).await?;
    let up_to = head.max(sealed_up_to);

    let mut checkpoints = CheckpointReader::new(sealed_up_to);
    let mut walk = Walk::new(key);
    if let Some(first) = checkpoints.next(pool).await? {
        walk.open(first);
    }
    // Inclusive lower bound: even an event at a forged, impossible position is walked.
    let mut from = i64::MIN;
    loop {
        let rows = sqlx::query(
            "SELECT e.position, e.aggregate_type, e.aggregate_id, e.sequence, e.event_id, \
                    e.event_type, e.event_version, e.payload::text AS payload, \
                    e.metadata::text AS metadata, e.recorded_at, e.prev_hash, e.hash, \
                    p.hash AS predecessor_hash \
             FROM events e \
             LEFT JOIN events p ON p.aggregate_type = e.aggregate_type \
                               AND p.aggregate_id = e.aggregate_id \
                               AND p.sequence = e.sequence - 1 \
             WHERE e.position >= $1 AND e.position <= $2 \
             ORDER BY e.position LIMIT $3",
        )
        .bind(from)
        .bind(up_to)
        .bind(VERIFY_BATCH)
        .fetch_all(pool)
        .await?;
        for row in &rows {
            let event = WalkedEvent::from_row(row)?;
            while walk
                .sealing_up_to()
                .is_some_and(|sealed| event.position > sealed)
            {
                walk.close();
                if let Some(next) = checkpoints.next(pool).await? {
                    walk.open(next);
                }
            }
            walk.event(&event);
        }
        let last = rows
            .last()
            .map(|row| row.try_get::<i64, _>("position"))
            .transpose()?;
        match last {
            Some(last) if rows.len() == VERIFY_BATCH as usize && last < i64::MAX => {
                from = last + 1;
            }
            _ => break,
        }
    }
    while walk.sealing_up_to().is_some() {
        walk.close();
        if let Some(next) = checkpoints.next(pool).await? {
            walk.open(next);
        }
    }
    Ok(walk.report(sealed_up_to))
}

/// A checkpoint as stored.
#[derive(Debug, Clone)]
struct StoredCheckpoint {
    position: i64,
    previous_position: i64,
    gaps: Vec<GapRun>,
    chain: Vec<u8>,
    signature: Vec<u8>,
}

impl StoredCheckpoint {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        let gaps: Vec<PgRange<i64>> = row.try_get("gaps")?;
        Ok(Self {
            position: row.try_get("position")?,
            previous_position: row.try_get("previous_position")?,
            gaps: gaps.iter().map(GapRun::from_range).collect(),
            chain: row.try_get("chain")?,
            signature: row.try_get("signature")?,
        })
    }

    fn signed_by(&self, key: &IntegrityKey) -> bool {
        let message = signed_message(
            self.position,
            &self.chain,
            self.previous_position,
            &self.gaps,
        );
        key.signed(&message, &self.signature)
    }
}

/// Reads checkpoints in position order, a few at a time, up to a fixed position.
#[derive(Debug)]
struct CheckpointReader {
    after: i64,
    up_to: i64,
    buffered: std::collections::VecDeque<StoredCheckpoint>,
    exhausted: bool,
}

impl CheckpointReader {
    fn new(up_to: i64) -> Self {
        Self {
            after: 0,
            up_to,
            buffered: std::collections::VecDeque::new(),
            exhausted: false,
        }
    }

    async fn next(&mut self, pool: &PgPool) -> Result<Option<StoredCheckpoint>, sqlx::Error> {
        if self.buffered.is_empty() && !self.exhausted {
            let rows = sqlx::query(
                "SELECT position, previous_position, gaps, chain, signature \
                 FROM integrity_checkpoints WHERE position > $1 AND position <= $2 \
                 ORDER BY position LIMIT $3",
            )
            .bind(self.after)
            .bind(self.up_to)
            .bind(CHECKPOINT_BATCH)
            .fetch_all(pool)
            .await?;
            self.exhausted = rows.len() < CHECKPOINT_BATCH as usize;
            for row in &rows {
                let checkpoint = StoredCheckpoint::from_row(row)?;
                self.after = checkpoint.position;
                self.buffered.push_back(checkpoint);
            }
        }
        Ok(self.buffered.pop_front())
    }
}

/// One stored event with what the walk needs to check it.
#[derive(Debug, Clone)]
struct WalkedEvent {
    position: i64,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_id: Uuid,
    event_type: String,
    event_version: String,
    payload: String,
    metadata: String,
    recorded_at: DateTime<Utc>,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
    /// The stored hash of the same stream's event at `sequence - 1`, if there is one.
    predecessor_hash: Option<Vec<u8>>,
}

impl WalkedEvent {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            position: row.try_get("position")?,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get("sequence")?,
            event_id: row.try_get("event_id")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            payload: row.try_get("payload")?,
            metadata: row.try_get("metadata")?,
            recorded_at: row.try_get("recorded_at")?,
            prev_hash: row.try_get("prev_hash")?,
            hash: row.try_get("hash")?,
            predecessor_hash: row.try_get("predecessor_hash")?,
        })
    }

    fn hashed(&self) -> HashedEvent<'_> {
        HashedEvent {
            prev_hash: &self.prev_hash,
            aggregate_type: &self.aggregate_type,
            aggregate_id: &self.aggregate_id,
            sequence: self.sequence,
            event_id: self.event_id,
            event_type: &self.event_type,
            event_version: &self.event_version,
            payload: &self.payload,
            metadata: &self.metadata,
            position: self.position,
            recorded_at: self.recorded_at,
        }
    }

    fn broken(&self, kind: BrokenKind, reason: String) -> Broken {
        Broken {
            position: self.position,
            kind,
            aggregate_type: Some(self.aggregate_type.clone()),
            aggregate_id: Some(self.aggregate_id.clone()),
            sequence: Some(self.sequence),
            reason,
        }
    }
}

impl Broken {
    /// A break at a position no stored event explains (a missing event, a checkpoint).
    fn at(position: i64, kind: BrokenKind, reason: String) -> Self {
        Self {
            position,
            kind,
            aggregate_type: None,
            aggregate_id: None,
            sequence: None,
            reason,
        }
    }
}

/// The checkpoint whose range the walk is in: it seals `(start, checkpoint.position]`.
#[derive(Debug)]
struct Seal {
    checkpoint: StoredCheckpoint,
    start: i64,
    /// Its gaps can be believed (its signature holds), so they name missing or added events.
    trusted: bool,
    /// The chain being recomputed, when the chain it extends is known.
    chain: Option<Sha256>,
    /// The lowest position of the range not walked past yet.
    next: i64,
    /// The first gap run that may still reach `next` or beyond.
    gap: usize,
}

impl Seal {
    /// The first position in `next..end` that the checkpoint sealed as holding an event.
    fn first_sealed_before(&mut self, end: i64) -> Option<i64> {
        let mut position = self.next;
        while position < end {
            match self.checkpoint.gaps.get(self.gap) {
                Some(run) if run.last < position => self.gap += 1,
                Some(run) if run.first <= position => position = run.last.saturating_add(1),
                _ => return Some(position),
            }
        }
        None
    }

    fn sealed_as_empty(&mut self, position: i64) -> bool {
        while let Some(run) = self.checkpoint.gaps.get(self.gap) {
            if run.last < position {
                self.gap += 1;
            } else {
                return run.first <= position;
            }
        }
        false
    }

    fn missing(&self, position: i64) -> Broken {
        Broken::at(
            position,
            BrokenKind::MissingEvent,
            format!(
                "checkpoint {} sealed an event at position {position}; none is stored there \
                 now: it was deleted or moved",
                self.checkpoint.position
            ),
        )
    }

    /// Walks past one event of the range; answers the lowest break it reveals.
    fn pass(&mut self, event: &WalkedEvent) -> Option<Broken> {
        let mut broken = None;
        if self.trusted {
            if let Some(missing) = self.first_sealed_before(event.position) {
                broken = Some(self.missing(missing));
            } else if self.sealed_as_empty(event.position) {
                broken = Some(event.broken(
                    BrokenKind::UnexpectedEvent,
                    format!(
                        "checkpoint {} sealed position {} as empty; this event was added \
                         afterwards",
                        self.checkpoint.position, event.position
                    ),
                ));
            }
        }
        if let Some(chain) = &mut self.chain {
            chain.update(&event.hash);
        }
        self.next = event.position.saturating_add(1);
        broken
    }
}

/// The verifier's walk over events and checkpoints, both in position order. It keeps
/// one checkpoint and one running hash, never the history.
#[derive(Debug)]
struct Walk<'k> {
    key: &'k IntegrityKey,
    checked: u64,
    checkpoints: u64,
    /// The last checkpoint walked past, and its chain when that can be believed.
    closed_position: i64,
    closed_chain: Option<[u8; 32]>,
    seal: Option<Seal>,
    first_broken: Option<Broken>,
}

impl<'k> Walk<'k> {
    fn new(key: &'k IntegrityKey) -> Self {
        Self {
            key,
            checked: 0,
            checkpoints: 0,
            closed_position: 0,
            closed_chain: Some(GENESIS),
            seal: None,
            first_broken: None,
        }
    }

    /// Keeps the break with the lowest position (the first one found among equals).
    fn broke(&mut self, broken: Broken) {
        if self
            .first_broken
            .as_ref()
            .is_none_or(|first| broken.position < first.position)
        {
            self.first_broken = Some(broken);
        }
    }

    /// The position of the checkpoint whose range the walk is in.
    fn sealing_up_to(&self) -> Option<i64> {
        self.seal.as_ref().map(|seal| seal.checkpoint.position)
    }

    /// Enters the range of the next checkpoint.
    fn open(&mut self, checkpoint: StoredCheckpoint) {
        self.checkpoints += 1;
        let trusted = checkpoint.signed_by(self.key);
        let mut start = self.closed_position;
        let mut extends_known_chain = trusted;
        if !trusted {
            self.broke(Broken::at(
                checkpoint.position,
                BrokenKind::ForgedCheckpoint,
                format!(
                    "the signature of checkpoint {} does not match what it records: it was \
                     forged or altered",
                    checkpoint.position
                ),
            ));
        } else if checkpoint.previous_position > self.closed_position {
            self.broke(Broken::at(
                checkpoint.previous_position,
                BrokenKind::MissingCheckpoint,
                format!(
                    "checkpoint {} follows a checkpoint at position {} that is no longer stored",
                    checkpoint.position, checkpoint.previous_position
                ),
            ));
            start = checkpoint.previous_position;
            extends_known_chain = false;
        } else if checkpoint.previous_position < self.closed_position {
            self.broke(Broken::at(
                checkpoint.position,
                BrokenKind::ForgedCheckpoint,
                format!(
                    "checkpoint {} was sealed after checkpoint {}, but checkpoint {} is \
                     stored in between",
                    checkpoint.position, checkpoint.previous_position, self.closed_position
                ),
            ));
            extends_known_chain = false;
        }
        let chain = self
            .closed_chain
            .filter(|_| extends_known_chain)
            .map(Sha256::new_with_prefix);
        self.seal = Some(Seal {
            start,
            trusted,
            chain,
            next: start.saturating_add(1),
            gap: 0,
            checkpoint,
        });
    }

    /// Checks one event; the walk must already be in the range of the first checkpoint at
    /// or after its position, if there is one.
    fn event(&mut self, event: &WalkedEvent) {
        self.checked += 1;
        if event.position < 1 {
            self.broke(event.broken(
                BrokenKind::UnexpectedEvent,
                format!(
                    "no event can be at position {}: positions start at 1",
                    event.position
                ),
            ));
        }
        if event.hashed().hash()[..] != event.hash[..] {
            self.broke(
                event.broken(
                    BrokenKind::ContentChanged,
                    "the event no longer matches its hash: its payload, metadata, type, version, \
                 stream, sequence, id, position or time was changed after it was stored"
                        .to_owned(),
                ),
            );
        }
        let previous = event.sequence - 1;
        match &event.predecessor_hash {
            _ if event.sequence == 1 => {
                if event.prev_hash[..] != GENESIS[..] {
                    self.broke(event.broken(
                        BrokenKind::ChainBroken,
                        "the first event of its stream links to a previous event".to_owned(),
                    ));
                }
            }
            None => self.broke(event.broken(
                BrokenKind::ChainBroken,
                format!(
                    "sequence {previous} of this stream is missing: an event was deleted or \
                     renumbered"
                ),
            )),
            Some(predecessor) if predecessor[..] != event.prev_hash[..] => {
                self.broke(event.broken(
                    BrokenKind::ChainBroken,
                    format!(
                        "the event does not link to the hash of sequence {previous}: the \
                         stream was rewritten or reordered"
                    ),
                ));
            }
            Some(_) => {}
        }
        let passed = self
            .seal
            .as_mut()
            .filter(|seal| event.position > seal.start)
            .and_then(|seal| seal.pass(event));
        if let Some(broken) = passed {
            self.broke(broken);
        }
    }

    /// Leaves the current checkpoint's range: every event it sealed has been walked.
    fn close(&mut self) {
        let Some(mut seal) = self.seal.take() else {
            return;
        };
        let position = seal.checkpoint.position;
        if seal.trusted {
            if let Some(missing) = seal.first_sealed_before(position.saturating_add(1)) {
                let broken = seal.missing(missing);
                self.broke(broken);
            }
        }
        if let Some(chain) = seal.chain.take() {
            let recomputed: [u8; 32] = chain.finalize().into();
            if recomputed[..] != seal.checkpoint.chain[..] {
                self.broke(Broken::at(
                    position,
                    BrokenKind::ChainMismatch,
                    format!(
                        "the events sealed in positions {} to {position} no longer hash to \
                         checkpoint {position}'s chain: one was inserted, removed, reordered \
                         or rewritten together with its hash",
                        seal.start.saturating_add(1)
                    ),
                ));
            }
        }
        self.closed_position = position;
        self.closed_chain = seal
            .trusted
            .then(|| <[u8; 32]>::try_from(seal.checkpoint.chain.as_slice()).ok())
            .flatten();
    }

    fn report(self, sealed_up_to: i64) -> VerifyReport {
        VerifyReport {
            ok: self.first_broken.is_none(),
            checked: self.checked,
            checkpoints: self.checkpoints,
            sealed_up_to,
            first_broken: self.first_broken,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key() -> IntegrityKey {
        IntegrityKey::new(b"unit-test-integrity-key-0123456789abcdef").unwrap()
    }

    /// A stream-chained history: `(position, stream)` in position order.
    fn history(layout: &[(i64, &str)]) -> Vec<WalkedEvent> {
        let mut events: Vec<WalkedEvent> = Vec::new();
        for &(position, stream) in layout {
            let predecessor = events
                .iter()
                .rev()
                .find(|event| event.aggregate_id == stream);
            let sequence = predecessor.map_or(1, |event| event.sequence + 1);
            let prev_hash = predecessor.map_or(GENESIS.to_vec(), |event| event.hash.clone());
            let mut event = WalkedEvent {
                position,
                aggregate_type: "test".to_owned(),
                aggregate_id: stream.to_owned(),
                sequence,
                event_id: Uuid::new_v4(),
                event_type: "Tested".to_owned(),
                event_version: "1".to_owned(),
                payload: format!(r#"{{"n": {position}}}"#),
                metadata: "{}".to_owned(),
                recorded_at: DateTime::<Utc>::from_timestamp_micros(1_700_000_000_000_000).unwrap(),
                predecessor_hash: predecessor.map(|event| event.hash.clone()),
                prev_hash,
                hash: Vec::new(),
            };
            event.hash = event.hashed().hash().to_vec();
            events.push(event);
        }
        events
    }

    /// Checkpoints at `ends` over `events`, as `record_checkpoint` computes them.
    fn checkpoints(events: &[WalkedEvent], ends: &[i64]) -> Vec<StoredCheckpoint> {
        let key = key();
        let mut previous = (0, GENESIS.to_vec());
        let mut sealed = Vec::new();
        for &end in ends {
            let mut sealing = Sealing::new(previous.0, &previous.1);
            for event in events
                .iter()
                .filter(|event| event.position > previous.0 && event.position <= end)
            {
                sealing.add(event.position, &event.hash);
            }
            let done = sealing.finish(end, &key);
            previous = (end, done.chain.to_vec());
            sealed.push(StoredCheckpoint {
                position: done.position,
                previous_position: done.previous_position,
                gaps: done.gaps,
                chain: done.chain.to_vec(),
                signature: done.signature.to_vec(),
            });
        }
        sealed
    }

    /// Walks `events` and `checkpoints` the way `verify` does.
    fn walk(events: &[WalkedEvent], checkpoints: Vec<StoredCheckpoint>) -> VerifyReport {
        let key = key();
        let sealed_up_to = checkpoints
            .last()
            .map_or(0, |checkpoint| checkpoint.position);
        let mut pending = checkpoints.into_iter();
        let mut walk = Walk::new(&key);
        if let Some(first) = pending.next() {
            walk.open(first);
        }
        for event in events {
            while walk
                .sealing_up_to()
                .is_some_and(|sealed| event.position > sealed)
            {
                walk.close();
                if let Some(next) = pending.next() {
                    walk.open(next);
                }
            }
            walk.event(event);
        }
        while walk.sealing_up_to().is_some() {
            walk.close();
            if let Some(next) = pending.next() {
                walk.open(next);
            }
        }
        walk.report(sealed_up_to)
    }

    fn first_broken(report: &VerifyReport) -> (i64, BrokenKind) {
        let broken = report.first_broken.as_ref().unwrap();
        (broken.position, broken.kind)
    }

    const LAYOUT: [(i64, &str); 7] = [
        (1, "a"),
        (2, "b"),
        (3, "a"),
        (5, "a"),
        (6, "b"),
        (7, "c"),
        (9, "a"),
    ];

    #[test]
    fn an_untouched_history_verifies_with_its_gaps() {
        let events = history(&LAYOUT);
        let sealed = checkpoints(&events, &[4, 8]);
        assert_eq!(
            sealed[0].gaps,
            vec![GapRun { first: 4, last: 4 }],
            "position 4 was rolled back"
        );
        assert_eq!(sealed[1].gaps, vec![GapRun { first: 8, last: 8 }]);
        let report = walk(&events, sealed);
        assert_eq!(report.first_broken, None);
        assert!(report.ok);
        assert_eq!(report.checked, 7);
        assert_eq!(report.checkpoints, 2);
        assert_eq!(report.sealed_up_to, 8);
    }

    #[test]
    fn an_edited_payload_is_named_by_its_position() {
        let mut events = history(&LAYOUT);
        events[2].payload = r#"{"n": 999}"#.to_owned();
        let sealed = checkpoints(&history(&LAYOUT), &[8]);
        assert_eq!(
            first_broken(&walk(&events, sealed)),
            (3, BrokenKind::ContentChanged)
        );
    }

    #[test]
    fn a_deleted_stream_tail_is_named_by_the_position_it_left() {
        let events = history(&LAYOUT);
        let sealed = checkpoints(&events, &[4, 8]);
        let mut tampered = events.clone();
        tampered.retain(|event| event.position != 7);
        assert_eq!(
            first_broken(&walk(&tampered, sealed)),
            (7, BrokenKind::MissingEvent)
        );
        // Deleting the newest sealed event is seen at the checkpoint's end, too.
        let sealed = checkpoints(&events, &[4, 8]);
        let mut tampered = events.clone();
        tampered.retain(|event| event.position <= 6);
        assert_eq!(
            first_broken(&walk(&tampered, sealed)),
            (7, BrokenKind::MissingEvent)
        );
    }

    #[test]
    fn an_event_added_in_a_sealed_gap_is_named() {
        let events = history(&LAYOUT);
        let sealed = checkpoints(&events, &[8]);
        // A well-formed event of a new stream, at the rolled-back position 4.
        let forged = history(&[(4, "d")]);
        let mut tampered = events.clone();
        tampered.insert(3, forged[0].clone());
        let report = walk(&tampered, sealed);
        assert_eq!(first_broken(&report), (4, BrokenKind::UnexpectedEvent));
    }

    #[test]
    fn a_consistently_rewritten_event_is_caught_by_its_checkpoint() {
        let events = history(&LAYOUT);
        let sealed = checkpoints(&events, &[4, 8]);
        let mut tampered = events.clone();
        tampered[5].payload = r#"{"forged": true}"#.to_owned();
        tampered[5].hash = tampered[5].hashed().hash().to_vec();
        assert_eq!(
            first_broken(&walk(&tampered, sealed)),
            (8, BrokenKind::ChainMismatch)
        );
    }

    #[test]
    fn forged_and_deleted_checkpoints_are_named() {
        let events = history(&LAYOUT);
        let mut sealed = checkpoints(&events, &[2, 4, 8]);
        sealed[1].signature[0] ^= 1;
        assert_eq!(
            first_broken(&walk(&events, sealed)),
            (4, BrokenKind::ForgedCheckpoint)
        );
        let mut sealed = checkpoints(&events, &[2, 4, 8]);
        sealed.remove(1);
        assert_eq!(
            first_broken(&walk(&events, sealed)),
            (4, BrokenKind::MissingCheckpoint)
        );
    }

    #[test]
    fn the_lowest_break_is_reported_whatever_order_it_was_found_in() {
        let events = history(&LAYOUT);
        let mut sealed = checkpoints(&events, &[4, 8]);
        // The forged checkpoint is seen before the edited event below it is walked.
        sealed[0].signature[0] ^= 1;
        let mut tampered = events.clone();
        tampered[1].metadata = r#"{"actor": "someone else"}"#.to_owned();
        let report = walk(&tampered, sealed);
        assert_eq!(first_broken(&report), (2, BrokenKind::ContentChanged));
        assert_eq!(report.checked, 7, "the walk goes on to the end");
    }

    #[test]
    fn every_part_of_the_encoding_counts_and_parts_cannot_trade_bytes() {
        let events = history(&[(1, "a")]);
        let event = events[0].hashed();
        let original = event.hash();
        let moved = HashedEvent {
            event_type: "Teste",
            event_version: "d1",
            ..event
        };
        assert_ne!(moved.hash(), original);
        let later = HashedEvent {
            recorded_at: event.recorded_at + chrono::Duration::microseconds(1),
            ..event
        };
        assert_ne!(later.hash(), original);
        assert_ne!(
            HashedEvent {
                position: 2,
                ..event
            }
            .hash(),
            original
        );
    }

    #[test]
    fn gap_runs_read_back_from_canonical_ranges() {
        let canonical = PgRange {
            start: Bound::Included(4),
            end: Bound::Excluded(7),
        };
        assert_eq!(GapRun::from_range(&canonical), GapRun { first: 4, last: 6 });
        let run = GapRun { first: 9, last: 9 };
        assert_eq!(GapRun::from_range(&run.to_range()), run);
    }

    #[test]
    fn the_key_is_never_printed_and_must_be_long_enough() {
        assert_eq!(format!("{:?}", key()), "IntegrityKey([REDACTED])");
        assert_eq!(
            IntegrityKey::new(b"short").unwrap_err(),
            IntegrityKeyError::TooShort { len: 5 }
        );
    }
}
