//! Tamper evidence: the per-stream hash chains the database computes on append, signed
//! checkpoints over the global order, and the verifier naming the first broken link.
//!
//! Each tamper case gets its own database, writes real history through the command bus,
//! seals it, then changes it as a database superuser would, lifting the append-only guard
//! for that one change. The verifier must name the position of the tampered row.

use std::borrow::Cow;

use hindsight_commands::db;
use hindsight_commands::integrity::{
    self, BrokenKind, HashedEvent, IntegrityKey, VerifyReport, GENESIS,
};
use hindsight_commands::{Actor, EventMetadata, StoreSettings};
use hindsight_domain::ids::{ProductId, UserId};
use hindsight_domain::product::ProductCommand;
use hindsight_domain::role::Role;
use hindsight_domain::user::{PasswordHash, UserCommand};
use hindsight_domain::values::{
    Currency, Description, Email, Money, PersonName, ProductName, Quantity, Sku,
};
use hindsight_tests::{append_raw_event, TestDb};
use sqlx::Row;

fn key() -> IntegrityKey {
    IntegrityKey::new(b"system-test-integrity-key-0123456789abcdef").unwrap()
}

fn metadata(request: &str) -> EventMetadata {
    EventMetadata::for_request(Actor::system(), request)
}

/// What a test history holds: two products and a user, their events interleaved.
#[derive(Debug, Clone, Copy)]
struct History {
    /// Created, then restocked three times: sequences 1 to 4.
    tea: ProductId,
    /// Created, then restocked once: sequences 1 and 2.
    mug: ProductId,
    /// Registered: sequence 1.
    user: UserId,
}

async fn create(db: &TestDb, product: ProductId, sku: &str) {
    db.commands(StoreSettings::default())
        .products
        .execute(
            product.as_uuid(),
            ProductCommand::Create {
                product_id: product,
                sku: Sku::parse(sku).unwrap(),
                name: ProductName::parse("Widget").unwrap(),
                description: Description::parse("A widget").unwrap(),
                price: Money::new(1999, Currency::parse("EUR").unwrap()).unwrap(),
                stock: 5,
            },
            &metadata(&format!("create-{sku}")),
            None,
        )
        .await
        .unwrap()
        .unwrap();
}

async fn restock(db: &TestDb, product: ProductId, quantity: u32) {
    db.commands(StoreSettings::default())
        .products
        .execute(
            product.as_uuid(),
            ProductCommand::Restock {
                quantity: Quantity::new(quantity).unwrap(),
            },
            &metadata("restock"),
            None,
        )
        .await
        .unwrap()
        .unwrap();
}

async fn register(db: &TestDb, user: UserId) {
    db.commands(StoreSettings::default())
        .users
        .execute(
            user.as_uuid(),
            UserCommand::Register {
                user_id: user,
                email: Email::parse(&format!("{}@example.com", user.as_uuid().simple())).unwrap(),
                name: PersonName::parse("Ann Example").unwrap(),
                password_hash: PasswordHash::new(
                    "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".to_owned(),
                )
                .unwrap(),
                role: Role::Customer,
            },
            &metadata("register"),
            None,
        )
        .await
        .unwrap()
        .unwrap();
}

/// Seven events through the real write path, interleaved across three streams.
async fn write_history(db: &TestDb) -> History {
    let history = History {
        tea: ProductId::new(),
        mug: ProductId::new(),
        user: UserId::new(),
    };
    create(db, history.tea, "TEA-1").await;
    create(db, history.mug, "MUG-1").await;
    register(db, history.user).await;
    restock(db, history.tea, 1).await;
    restock(db, history.mug, 2).await;
    restock(db, history.tea, 3).await;
    restock(db, history.tea, 4).await;
    history
}

async fn head(db: &TestDb) -> i64 {
    hindsight_commands::relay::head(&db.pool).await.unwrap()
}

async fn event_count(db: &TestDb) -> u64 {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    u64::try_from(count).unwrap()
}

/// The position of one stream's event.
async fn position_of(db: &TestDb, aggregate_id: uuid::Uuid, sequence: i64) -> i64 {
    sqlx::query_scalar("SELECT position FROM events WHERE aggregate_id = $1 AND sequence = $2")
        .bind(aggregate_id.to_string())
        .bind(sequence)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

async fn seal(db: &TestDb, up_to: i64) -> integrity::Checkpoint {
    integrity::record_checkpoint(&db.pool, &key(), up_to)
        .await
        .unwrap()
        .expect("something new to seal")
}

async fn verify(db: &TestDb) -> VerifyReport {
    integrity::verify(&db.pool, &key()).await.unwrap()
}

/// A history written and sealed in two checkpoints, verified intact.
async fn sealed_history() -> (TestDb, History) {
    let db = TestDb::new().await;
    let history = write_history(&db).await;
    seal(&db, 4).await;
    seal(&db, head(&db).await).await;
    let report = verify(&db).await;
    assert!(report.ok, "{report:?}");
    (db, history)
}

/// Runs `statements` in one transaction as the superuser, with the append-only guards
/// of events and checkpoints lifted for it alone.
async fn tamper(db: &TestDb, statements: &[String]) {
    let mut tx = db.pool.begin().await.unwrap();
    for guard in [
        "ALTER TABLE events DISABLE TRIGGER events_append_only",
        "ALTER TABLE integrity_checkpoints DISABLE TRIGGER integrity_checkpoints_append_only",
    ] {
        sqlx::query(guard).execute(&mut *tx).await.unwrap();
    }
    for statement in statements {
        sqlx::query(statement).execute(&mut *tx).await.unwrap();
    }
    for guard in [
        "ALTER TABLE events ENABLE TRIGGER events_append_only",
        "ALTER TABLE integrity_checkpoints ENABLE TRIGGER integrity_checkpoints_append_only",
    ] {
        sqlx::query(guard).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
}

/// Asserts the report names `position` first, as a break of `kind`.
fn assert_broken_at(report: &VerifyReport, position: i64, kind: BrokenKind) {
    assert!(!report.ok, "{report:?}");
    let broken = report.first_broken.as_ref().expect("a broken link");
    assert_eq!(
        (broken.position, broken.kind),
        (position, kind),
        "{broken:?}"
    );
    assert!(!broken.reason.is_empty());
}

fn sql_state(error: &sqlx::Error) -> Option<String> {
    error
        .as_database_error()
        .and_then(|db| db.code())
        .map(Cow::into_owned)
}

#[tokio::test]
async fn history_written_by_commands_and_sealed_verifies_whole() {
    let db = TestDb::new().await;
    let history = write_history(&db).await;

    let unsealed = verify(&db).await;
    assert!(unsealed.ok, "{unsealed:?}");
    assert_eq!(unsealed.checked, 7);
    assert_eq!((unsealed.checkpoints, unsealed.sealed_up_to), (0, 0));

    // Never beyond what is stored, whatever the caller asks.
    let first = seal(&db, head(&db).await + 100).await;
    assert_eq!(
        (first.position, first.previous_position, first.events),
        (7, 0, 7)
    );
    assert_eq!(
        integrity::record_checkpoint(&db.pool, &key(), 7)
            .await
            .unwrap(),
        None,
        "nothing new to seal"
    );

    restock(&db, history.mug, 5).await;
    restock(&db, history.tea, 6).await;
    let second = seal(&db, head(&db).await).await;
    assert_eq!(
        (second.position, second.previous_position, second.events),
        (9, 7, 2)
    );
    assert_ne!(second.chain, first.chain);

    let report = verify(&db).await;
    assert_eq!(report.first_broken, None);
    assert!(report.ok);
    assert_eq!(report.checked, event_count(&db).await);
    assert_eq!(report.checked, 9);
    assert_eq!((report.checkpoints, report.sealed_up_to), (2, 9));

    // The report is what the HTTP route answers.
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["ok"], true);
    assert_eq!(json["checked"], 9);
    assert!(json.get("first_broken").is_none(), "{json}");
}

#[tokio::test]
async fn the_chain_trigger_runs_after_the_stamp_and_links_every_stream() {
    let db = TestDb::new().await;
    write_history(&db).await;

    // Row triggers of one timing fire in name order.
    let before_insert: Vec<String> = sqlx::query_scalar(
        "SELECT tgname::text FROM pg_trigger \
         WHERE tgrelid = 'events'::regclass AND NOT tgisinternal \
           AND tgtype & 1 = 1 AND tgtype & 2 = 2 AND tgtype & 4 = 4 \
         ORDER BY tgname",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(before_insert, ["events_stamp", "events_zchain"]);

    // The stored hash covers the stamped position, id and time.
    let unlinked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events e \
         LEFT JOIN events p ON p.aggregate_type = e.aggregate_type \
                           AND p.aggregate_id = e.aggregate_id AND p.sequence = e.sequence - 1 \
         WHERE e.hash IS DISTINCT FROM hindsight_event_hash(e.prev_hash, e.aggregate_type, \
                   e.aggregate_id, e.sequence, e.event_id, e.event_type, e.event_version, \
                   e.payload, e.metadata, e.position, e.recorded_at) \
            OR e.prev_hash IS DISTINCT FROM \
                   CASE WHEN e.sequence = 1 THEN hindsight_chain_genesis() ELSE p.hash END",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(unlinked, 0);

    // A writer cannot choose the hashes.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                             payload, metadata, prev_hash, hash) \
         VALUES ('test', 'chosen', 1, 'Tested', '1', '{}', '{}', \
                 decode(repeat('11', 32), 'hex'), decode(repeat('22', 32), 'hex'))",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let row = sqlx::query("SELECT prev_hash, hash FROM events WHERE aggregate_id = 'chosen'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(row.get::<Vec<u8>, _>("prev_hash"), GENESIS.to_vec());
    assert_ne!(row.get::<Vec<u8>, _>("hash"), vec![0x22; 32]);
}

#[tokio::test]
async fn the_database_and_the_verifier_hash_the_same_bytes() {
    let db = TestDb::new().await;
    // Unicode, escapes, numbers in several spellings, key order the writer did not sort.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                             payload, metadata) \
         VALUES ('test', 'ünïcode ☃', 1, 'Tested', '2', \
                 '{\"z\": [1, 1.50, 1e3, -0, \"é ☃ \\\"q\\\"\\n\"], \"a\": {\"nested\": null}}', \
                 '{\"request_id\": \"r\", \"actor\": {}}')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let row = sqlx::query(
        "SELECT prev_hash, hash, aggregate_type, aggregate_id, sequence, event_id, event_type, \
                event_version, payload::text AS payload, metadata::text AS metadata, position, \
                recorded_at FROM events",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let prev_hash: Vec<u8> = row.get("prev_hash");
    let (aggregate_type, aggregate_id): (String, String) =
        (row.get("aggregate_type"), row.get("aggregate_id"));
    let (event_type, event_version): (String, String) =
        (row.get("event_type"), row.get("event_version"));
    let (payload, metadata): (String, String) = (row.get("payload"), row.get("metadata"));
    let recomputed = HashedEvent {
        prev_hash: &prev_hash,
        aggregate_type: &aggregate_type,
        aggregate_id: &aggregate_id,
        sequence: row.get("sequence"),
        event_id: row.get("event_id"),
        event_type: &event_type,
        event_version: &event_version,
        payload: &payload,
        metadata: &metadata,
        position: row.get("position"),
        recorded_at: row.get("recorded_at"),
    }
    .hash();
    assert_eq!(recomputed.to_vec(), row.get::<Vec<u8>, _>("hash"));
    assert!(verify(&db).await.ok);
}

#[tokio::test]
async fn an_append_that_skips_a_sequence_is_refused() {
    let db = TestDb::new().await;
    let mut tx = db.pool.begin().await.unwrap();
    append_raw_event(&mut tx, "holey", 1, "Tested").await;
    tx.commit().await.unwrap();
    let error = sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                             payload, metadata) \
         VALUES ('test', 'holey', 3, 'Tested', '1', '{}', '{}')",
    )
    .execute(&db.pool)
    .await
    .unwrap_err();
    assert_eq!(sql_state(&error).as_deref(), Some("HA002"), "{error}");
    assert!(verify(&db).await.ok);
}

#[tokio::test]
async fn an_edited_payload_is_named() {
    let (db, history) = sealed_history().await;
    let position = position_of(&db, history.tea.as_uuid(), 2).await;
    tamper(
        &db,
        &[format!(
            "UPDATE events SET payload = '{{\"ProductRestocked\": {{\"quantity\": 1000}}}}' \
             WHERE position = {position}"
        )],
    )
    .await;
    let report = verify(&db).await;
    assert_broken_at(&report, position, BrokenKind::ContentChanged);
    let broken = report.first_broken.unwrap();
    assert_eq!(broken.aggregate_id, Some(history.tea.as_uuid().to_string()));
    assert_eq!(broken.sequence, Some(2));
    assert_eq!(report.checked, 7, "the walk still covers everything");
}

#[tokio::test]
async fn edited_metadata_is_named() {
    let (db, history) = sealed_history().await;
    let position = position_of(&db, history.user.as_uuid(), 1).await;
    tamper(
        &db,
        &[format!(
            "UPDATE events SET metadata = jsonb_set(metadata, '{{request_id}}', '\"forged\"') \
             WHERE position = {position}"
        )],
    )
    .await;
    assert_broken_at(&verify(&db).await, position, BrokenKind::ContentChanged);
}

#[tokio::test]
async fn an_event_deleted_from_the_middle_of_a_stream_is_named() {
    let (db, history) = sealed_history().await;
    let position = position_of(&db, history.tea.as_uuid(), 2).await;
    tamper(
        &db,
        &[format!("DELETE FROM events WHERE position = {position}")],
    )
    .await;
    assert_broken_at(&verify(&db).await, position, BrokenKind::MissingEvent);
}

#[tokio::test]
async fn the_deleted_last_event_of_a_stream_is_named() {
    let (db, history) = sealed_history().await;
    let position = position_of(&db, history.mug.as_uuid(), 2).await;
    tamper(
        &db,
        &[format!("DELETE FROM events WHERE position = {position}")],
    )
    .await;
    // No later event of that stream is left to notice: only the checkpoint can.
    assert_broken_at(&verify(&db).await, position, BrokenKind::MissingEvent);
}

#[tokio::test]
async fn two_swapped_positions_are_named() {
    let (db, history) = sealed_history().await;
    let registered = position_of(&db, history.user.as_uuid(), 1).await;
    let restocked = position_of(&db, history.mug.as_uuid(), 2).await;
    assert!(registered < restocked);
    tamper(
        &db,
        &[
            format!("UPDATE events SET position = -1 WHERE position = {registered}"),
            format!("UPDATE events SET position = {registered} WHERE position = {restocked}"),
            format!("UPDATE events SET position = {restocked} WHERE position = -1"),
        ],
    )
    .await;
    assert_broken_at(&verify(&db).await, registered, BrokenKind::ContentChanged);
}

#[tokio::test]
async fn a_forged_event_with_a_plausible_hash_is_named() {
    let db = TestDb::new().await;
    let history = write_history(&db).await;
    // A rolled-back append leaves a position no event holds.
    let mut doomed = db.pool.begin().await.unwrap();
    let gap = append_raw_event(&mut doomed, "doomed", 1, "Doomed").await;
    doomed.rollback().await.unwrap();
    restock(&db, history.tea, 7).await;
    seal(&db, head(&db).await).await;
    assert!(verify(&db).await.ok);

    // The forger appends the mug's next restock into the gap, taking the position, id and
    // time themselves; the chain trigger still links it, so its own hash is plausible.
    let mug = history.mug.as_uuid().to_string();
    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("ALTER TABLE events DISABLE TRIGGER events_stamp")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                             payload, metadata, position, event_id, recorded_at, transaction_id) \
         SELECT aggregate_type, aggregate_id, 3, event_type, event_version, payload, metadata, \
                $2, gen_random_uuid(), recorded_at, transaction_id \
         FROM events WHERE aggregate_id = $1 AND sequence = 2",
    )
    .bind(&mug)
    .bind(gap)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("ALTER TABLE events ENABLE TRIGGER events_stamp")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let report = verify(&db).await;
    assert_broken_at(&report, gap, BrokenKind::UnexpectedEvent);
    let broken = report.first_broken.unwrap();
    assert_eq!((broken.aggregate_id, broken.sequence), (Some(mug), Some(3)));
}

#[tokio::test]
async fn a_forged_checkpoint_signature_is_named() {
    let (db, _) = sealed_history().await;
    tamper(
        &db,
        &[
            "UPDATE integrity_checkpoints SET signature = sha256(signature) WHERE position = 4"
                .to_owned(),
        ],
    )
    .await;
    assert_broken_at(&verify(&db).await, 4, BrokenKind::ForgedCheckpoint);
}

#[tokio::test]
async fn a_deleted_checkpoint_is_named() {
    let (db, _) = sealed_history().await;
    tamper(
        &db,
        &["DELETE FROM integrity_checkpoints WHERE position = 4".to_owned()],
    )
    .await;
    assert_broken_at(&verify(&db).await, 4, BrokenKind::MissingCheckpoint);
}

#[tokio::test]
async fn an_event_rewritten_with_a_recomputed_hash_is_caught_by_its_checkpoint() {
    let (db, history) = sealed_history().await;
    // The tea's newest event, so no later event of the stream links to it: the forger
    // recomputes its hash and every stream chain stays whole.
    let position = position_of(&db, history.tea.as_uuid(), 4).await;
    let forged = "'{\"ProductRestocked\": {\"quantity\": 1000}}'::jsonb";
    tamper(
        &db,
        &[format!(
            "UPDATE events SET payload = {forged}, \
                 hash = hindsight_event_hash(prev_hash, aggregate_type, aggregate_id, sequence, \
                     event_id, event_type, event_version, {forged}, metadata, position, \
                     recorded_at) \
             WHERE position = {position}"
        )],
    )
    .await;
    let sealed_up_to = head(&db).await;
    assert!(position <= sealed_up_to);
    assert_broken_at(&verify(&db).await, sealed_up_to, BrokenKind::ChainMismatch);
}

#[tokio::test]
async fn checkpoints_are_append_only() {
    let (db, _) = sealed_history().await;
    for statement in [
        "UPDATE integrity_checkpoints SET signature = sha256(signature)",
        "DELETE FROM integrity_checkpoints",
        "TRUNCATE integrity_checkpoints",
    ] {
        let error = sqlx::query(statement).execute(&db.pool).await.unwrap_err();
        assert_eq!(
            sql_state(&error).as_deref(),
            Some("HA001"),
            "{statement}: {error}"
        );
    }
    assert!(verify(&db).await.ok);
}

#[tokio::test]
async fn concurrent_sealers_extend_one_chain() {
    let db = TestDb::new().await;
    write_history(&db).await;
    let sealers = (1..=7).map(|up_to| {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            integrity::record_checkpoint(&pool, &key(), up_to)
                .await
                .unwrap()
        })
    });
    for sealer in futures::future::join_all(sealers).await {
        sealer.unwrap();
    }
    let links: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT previous_position, position FROM integrity_checkpoints ORDER BY position",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(links.last().map(|link| link.1), Some(7));
    for pair in links.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "{links:?}");
    }
    let report = verify(&db).await;
    assert!(report.ok, "{report:?}");
    assert_eq!(report.checkpoints, u64::try_from(links.len()).unwrap());
}

#[tokio::test]
async fn the_migration_chains_the_events_stored_before_it() {
    let db = TestDb::empty().await;
    let before_integrity = sqlx::migrate::Migrator {
        migrations: Cow::Owned(
            db::MIGRATOR
                .iter()
                .filter(|migration| migration.version < 9)
                .cloned()
                .collect(),
        ),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before_integrity.run(&db.pool).await.unwrap();
    write_history(&db).await;

    db::migrate(&db.pool).await.unwrap();
    let report = verify(&db).await;
    assert!(report.ok, "{report:?}");
    assert_eq!(report.checked, 7);
    seal(&db, head(&db).await).await;
    assert!(verify(&db).await.ok);

    // The guard lifted for the backfill is back.
    let error = sqlx::query("UPDATE events SET payload = '{}'")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert_eq!(sql_state(&error).as_deref(), Some("HA001"), "{error}");
}

#[tokio::test]
async fn a_large_backlog_is_sealed_in_bounded_checkpoints() {
    let db = TestDb::new().await;
    let backlog = integrity::MAX_EVENTS_PER_CHECKPOINT + 50;
    // One statement, in sequence order: each row links to the one inserted before it.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
                             payload, metadata) \
         SELECT 'test', 'backlog', n, 'Tested', '1', jsonb_build_object('n', n), '{}' \
         FROM generate_series(1, $1::bigint) AS n ORDER BY n",
    )
    .bind(i64::try_from(backlog).unwrap())
    .execute(&db.pool)
    .await
    .unwrap();
    let head = head(&db).await;
    let last = seal(&db, head).await;
    assert_eq!((last.position, last.events), (head, 50));
    let first_end = position_of_backlog(&db, integrity::MAX_EVENTS_PER_CHECKPOINT).await;
    assert_eq!(last.previous_position, first_end);

    let report = verify(&db).await;
    assert!(report.ok, "{report:?}");
    assert_eq!((report.checked, report.checkpoints), (backlog, 2));
}

async fn position_of_backlog(db: &TestDb, sequence: u64) -> i64 {
    sqlx::query_scalar(
        "SELECT position FROM events WHERE aggregate_id = 'backlog' AND sequence = $1",
    )
    .bind(i64::try_from(sequence).unwrap())
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn auditors_verify_over_http_and_see_the_first_broken_link() {
    let system = hindsight_tests::TestSystem::start().await;
    let auditor = system.user(Role::Auditor).await;
    let product = ProductId::new();
    create(&system.db, product, "HTTP-VERIFY").await;
    restock(&system.db, product, 2).await;
    let up_to = head(&system.db).await;
    integrity::record_checkpoint(
        &system.db.pool,
        &IntegrityKey::new(hindsight_tests::TEST_AUDIT_KEY.as_bytes()).unwrap(),
        up_to,
    )
    .await
    .unwrap();
    let verify = || async {
        let response = system
            .client()
            .get(system.url("/api/v1/audit/verify"))
            .bearer_auth(&auditor.access_token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json::<serde_json::Value>().await.unwrap()
    };
    let clean = verify().await;
    assert_eq!(clean["ok"], true);
    assert!(clean["checked"].as_u64().unwrap() >= 3);
    assert!(clean
        .get("first_broken")
        .is_none_or(serde_json::Value::is_null));

    let tampered = position_of(&system.db, product.as_uuid(), 2).await;
    tamper(
        &system.db,
        &[format!(
            "UPDATE events SET payload = '{{\"ProductRestocked\": {{\"quantity\": 200}}}}' WHERE position = {tampered}"
        )],
    )
    .await;
    let broken = verify().await;
    assert_eq!(broken["ok"], false);
    assert_eq!(broken["first_broken"]["position"], tampered);
}
