//! The `audit_trail` read model: one row per event of every type, saying who did what to
//! which entity, when, and from which request, with a short sentence describing the
//! change for people reading the trail.
//!
//! A sentence never contains a secret: a password change reads "changed password". To
//! say how much stock is available after a movement, the read model keeps each product's
//! available stock in a side table of its own, which the statement that writes a batch's
//! entries reads and moves.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use hindsight_commands::{ActorRole, StoredEvent};
use hindsight_domain::order::OrderEvent;
use hindsight_domain::product::ProductEvent;
use hindsight_domain::user::UserEvent;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgExecutor, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::page::{
    aggregate_uuid, column_error, format_money, table_name, units, CursorTag, Page, PageRequest,
    QueryError,
};
use crate::read_model::{ApplyError, ReadModel};

const TRAIL_TABLE: &str = "audit_trail";

/// The projection's name (its checkpoint, and the worker that runs it alone).
pub const NAME: &str = "audit_trail";
const STOCK_TABLE: &str = "audit_trail_product_stock";
const COLUMNS: &str = "position, event_id, recorded_at, actor_id, actor_role, request_id, \
     correlation_id, causation_id, aggregate_type, aggregate_id, event_type, summary";

/// One event as the audit trail shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub position: i64,
    pub event_id: Uuid,
    pub recorded_at: DateTime<Utc>,
    pub actor_id: Option<Uuid>,
    #[schema(value_type = crate::schema::ActorRoleSchema)]
    pub actor_role: ActorRole,
    pub request_id: String,
    pub correlation_id: String,
    pub causation_id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    /// What changed, in a short sentence, e.g. `restocked 5 units (available 12)`.
    pub summary: String,
}

/// Which entries a trail shows; `None` matches any. `from` and `to` bound the time the
/// event was recorded, both inclusive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrailFilter {
    pub actor_id: Option<Uuid>,
    /// `user`, `product` or `order`.
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<Uuid>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

/// The `audit_trail` projection.
#[derive(Debug, Clone)]
pub struct AuditTrail {
    trail: String,
    stock: String,
}

/// An event decoded as its aggregate's event enum.
enum Decoded {
    User(UserEvent),
    Product(Uuid, ProductEvent),
    Order(OrderEvent),
    /// An aggregate type this read model does not know; recorded by its event type.
    Unknown,
}

impl AuditTrail {
    /// Writes the live tables.
    pub fn live() -> Self {
        Self::with_suffix("")
    }

    /// Writes `audit_trail<suffix>` and `audit_trail_product_stock<suffix>`, copies a
    /// rebuild fills before they are swapped in.
    pub fn with_suffix(suffix: &str) -> Self {
        Self {
            trail: table_name(TRAIL_TABLE, suffix),
            stock: table_name(STOCK_TABLE, suffix),
        }
    }

    async fn apply_events(
        &self,
        connection: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ApplyError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut decoded = Vec::with_capacity(events.len());
        for event in events {
            decoded.push(match event.aggregate_type.as_str() {
                "user" => Decoded::User(event.decode()?),
                "product" => Decoded::Product(aggregate_uuid(event)?, event.decode()?),
                "order" => Decoded::Order(event.decode()?),
                _ => Decoded::Unknown,
            });
        }

        // The sentences are written without reading the stock first: what the batch did
        // to each product's stock goes along, and the statement that writes the trail
        // reads the stock and completes the sentences. A round trip fewer for every batch
        // the live worker commits.
        let mut book = StockBook::unread(&decoded);
        let rows = sentences(events, &decoded, &mut book)?;
        if self.write_completing(&mut *connection, rows, book).await? {
            return Ok(());
        }

        // A product's stock is missing, or too low for the batch's movements summed to
        // equal them taken one by one (stock stops at zero). Nothing was written: read the
        // stock and take the events one by one.
        tracing::warn!(
            table = %self.trail,
            first_position = events.first().map_or(0, |event| event.position),
            "a batch's stock movements, added up, would take products below zero, or a \
             product's stock is missing; reading the stock first"
        );
        let mut book = StockBook::read(self.load_stock(&mut *connection, &decoded).await?);
        let rows = sentences(events, &decoded, &mut book)?;
        // With every stock read, no sentence is left to complete: the statement writes.
        if self.write_completing(connection, rows, book).await? {
            Ok(())
        } else {
            Err(ApplyError::Invariant {
                position: events.first().map_or(0, |event| event.position),
                reason: "the audit trail's stock changed while the batch was written".into(),
            })
        }
    }

    /// Writes the trail and the stock in one statement that reads the stock of the products
    /// whose movements `book` holds as unread, and completes the sentences with it.
    /// Answers `false`, having written nothing, when one of those products has no stock
    /// row or less stock than its movements need (see [`Movement::need`]).
    async fn write_completing(
        &self,
        connection: &mut PgConnection,
        rows: TrailColumns<'_>,
        book: StockBook,
    ) -> Result<bool, ApplyError> {
        let (known_ids, known_available): (Vec<Uuid>, Vec<i64>) = book.known.into_iter().unzip();
        let moves = book.unread.map(|pending| pending.moves).unwrap_or_default();
        let mut moved_ids = Vec::with_capacity(moves.len());
        let mut moved_change = Vec::with_capacity(moves.len());
        let mut moved_need = Vec::with_capacity(moves.len());
        for (id, movement) in moves {
            moved_ids.push(id);
            moved_change.push(movement.change);
            moved_need.push(movement.need);
        }
        let complete: bool = sqlx::query_scalar(&format!(
            "WITH moves AS ( \
                 SELECT * FROM UNNEST($13::uuid[], $14::bigint[], $15::bigint[]) \
                     AS m(product_id, change, need) \
             ), base AS ( \
                 SELECT s.product_id, s.stock_available \
                 FROM {stock} AS s JOIN moves AS m USING (product_id) \
                 WHERE s.stock_available >= m.need \
             ), complete AS ( \
                 SELECT (SELECT count(*) FROM base) = (SELECT count(*) FROM moves) AS ok \
             ), trail AS ( \
                 INSERT INTO {trail} ({COLUMNS}) \
                 SELECT r.position, r.event_id, r.recorded_at, r.actor_id, r.actor_role, \
                        r.request_id, r.correlation_id, r.causation_id, r.aggregate_type, \
                        r.aggregate_id, r.event_type, \
                        CASE WHEN r.tail IS NULL THEN r.summary \
                             ELSE r.summary || (b.stock_available + r.moved)::text || r.tail \
                        END \
                 FROM UNNEST($1::bigint[], $2::uuid[], $3::timestamptz[], $4::uuid[], \
                             $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], \
                             $10::text[], $11::text[], $12::text[], $16::uuid[], \
                             $17::bigint[], $18::text[]) \
                     AS r(position, event_id, recorded_at, actor_id, actor_role, request_id, \
                          correlation_id, causation_id, aggregate_type, aggregate_id, \
                          event_type, summary, product_id, moved, tail) \
                 LEFT JOIN base AS b USING (product_id) \
                 WHERE (SELECT ok FROM complete) \
             ), stock AS ( \
                 INSERT INTO {stock} (product_id, stock_available) \
                 SELECT * FROM UNNEST($19::uuid[], $20::bigint[]) \
                 WHERE (SELECT ok FROM complete) \
                 UNION ALL \
                 SELECT b.product_id, b.stock_available + m.change \
                 FROM base AS b JOIN moves AS m USING (product_id) \
                 WHERE (SELECT ok FROM complete) \
                 ON CONFLICT (product_id) DO UPDATE SET stock_available = EXCLUDED.stock_available \
             ) \
             SELECT ok FROM complete",
            stock = self.stock,
            trail = self.trail,
        ))
        .bind(rows.position)
        .bind(rows.event_id)
        .bind(rows.recorded_at)
        .bind(rows.actor_id)
        .bind(rows.actor_role)
        .bind(rows.request_id)
        .bind(rows.correlation_id)
        .bind(rows.causation_id)
        .bind(rows.aggregate_type)
        .bind(rows.aggregate_id)
        .bind(rows.event_type)
        .bind(rows.summary)
        .bind(moved_ids)
        .bind(moved_change)
        .bind(moved_need)
        .bind(rows.product_id)
        .bind(rows.moved)
        .bind(rows.tail)
        .bind(known_ids)
        .bind(known_available)
        .fetch_one(connection)
        .await?;
        Ok(complete)
    }

    /// The available stock of the products whose stock this batch moves, for those created
    /// before it.
    async fn load_stock(
        &self,
        connection: &mut PgConnection,
        decoded: &[Decoded],
    ) -> Result<BTreeMap<Uuid, i64>, ApplyError> {
        let mut created = BTreeSet::new();
        let mut moved = BTreeSet::new();
        for change in decoded {
            match change {
                Decoded::Product(id, ProductEvent::ProductCreated { .. }) => {
                    created.insert(*id);
                }
                Decoded::Product(
                    id,
                    ProductEvent::ProductRestocked { .. }
                    | ProductEvent::StockReserved { .. }
                    | ProductEvent::StockReleased { .. },
                ) => {
                    moved.insert(*id);
                }
                _ => {}
            }
        }
        let ids: Vec<Uuid> = moved.difference(&created).copied().collect();
        if ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        let rows = sqlx::query(&format!(
            "SELECT product_id, stock_available FROM {} WHERE product_id = ANY($1)",
            self.stock
        ))
        .bind(&ids)
        .fetch_all(connection)
        .await?;
        let mut stock = BTreeMap::new();
        for row in rows {
            stock.insert(row.try_get("product_id")?, row.try_get("stock_available")?);
        }
        Ok(stock)
    }
}

#[derive(Default)]
struct TrailColumns<'e> {
    position: Vec<i64>,
    event_id: Vec<Uuid>,
    recorded_at: Vec<DateTime<Utc>>,
    actor_id: Vec<Option<Uuid>>,
    actor_role: Vec<&'static str>,
    request_id: Vec<&'e str>,
    correlation_id: Vec<&'e str>,
    causation_id: Vec<&'e str>,
    aggregate_type: Vec<&'e str>,
    aggregate_id: Vec<&'e str>,
    event_type: Vec<&'e str>,
    summary: Vec<String>,
    /// For a sentence completed by the statement: the product whose stock it states,
    /// what the batch had moved it by then, and the text after the number.
    product_id: Vec<Option<Uuid>>,
    moved: Vec<Option<i64>>,
    tail: Vec<Option<String>>,
}

impl<'e> TrailColumns<'e> {
    fn push(&mut self, event: &'e StoredEvent, sentence: Sentence) {
        let metadata = &event.metadata;
        self.position.push(event.position);
        self.event_id.push(event.event_id);
        self.recorded_at.push(event.recorded_at);
        self.actor_id.push(metadata.actor_id);
        self.actor_role.push(metadata.actor_role.as_str());
        self.request_id.push(&metadata.request_id);
        self.correlation_id.push(&metadata.correlation_id);
        self.causation_id.push(&metadata.causation_id);
        self.aggregate_type.push(&event.aggregate_type);
        self.aggregate_id.push(&event.aggregate_id);
        self.event_type.push(&event.event_type);
        self.summary.push(sentence.text);
        match sentence.unread {
            Some(Unread {
                product_id,
                moved,
                tail,
            }) => {
                self.product_id.push(Some(product_id));
                self.moved.push(Some(moved));
                self.tail.push(Some(tail));
            }
            None => {
                self.product_id.push(None);
                self.moved.push(None);
                self.tail.push(None);
            }
        }
    }
}

/// An entry's sentence. One that states the available stock of a product whose stock was
/// not read holds the text before the number, and `unread` the rest.
struct Sentence {
    text: String,
    unread: Option<Unread>,
}

struct Unread {
    product_id: Uuid,
    /// What the batch had moved the product's stock by after this event.
    moved: i64,
    tail: String,
}

impl Sentence {
    fn whole(text: String) -> Self {
        Self { text, unread: None }
    }
}

/// What a batch did to the stock of a product it did not create, to add to the stored
/// stock.
#[derive(Default)]
struct Movement {
    /// Units added to the available stock (negative: taken from it).
    change: i64,
    /// The least stock the product must hold for none of the batch's reservations to take
    /// it below zero. Below that, taking the events one by one (stock stops at zero) and
    /// adding up their movements part ways, and the stock is read first instead. The
    /// aggregate never lets it happen; the read model does not rely on that.
    need: i64,
}

/// The available stock of the products a batch moves, as its sentences state it.
struct StockBook {
    /// Products whose stock is known here: read before the batch, or created in it.
    known: BTreeMap<Uuid, i64>,
    /// While the stock is not read: what the batch does to the others. `None` once it is.
    unread: Option<Pending>,
}

/// The stock movements of products whose stock was not read.
struct Pending {
    /// Products the batch creates, known only from their creation on.
    created: BTreeSet<Uuid>,
    moves: BTreeMap<Uuid, Movement>,
}

/// The available stock after an event, or what the batch has moved it by so far.
enum Available {
    Known(i64),
    Moved(Uuid, i64),
}

impl StockBook {
    /// Nothing read: movements of products created before the batch are summed.
    fn unread(decoded: &[Decoded]) -> Self {
        let created = decoded
            .iter()
            .filter_map(|change| match change {
                Decoded::Product(id, ProductEvent::ProductCreated { .. }) => Some(*id),
                _ => None,
            })
            .collect();
        Self {
            known: BTreeMap::new(),
            unread: Some(Pending {
                created,
                moves: BTreeMap::new(),
            }),
        }
    }

    /// The stock of every product moved and created before the batch, read.
    fn read(known: BTreeMap<Uuid, i64>) -> Self {
        Self {
            known,
            unread: None,
        }
    }
}

/// Written where the number of available units goes in a sentence completed later. No
/// sentence that states stock holds anything but numbers, units and ids besides.
const AVAILABLE_MARK: &str = "\u{0}";

/// The batch's entries, their sentences as far as `book` knows the stock.
fn sentences<'e>(
    events: &'e [StoredEvent],
    decoded: &[Decoded],
    book: &mut StockBook,
) -> Result<TrailColumns<'e>, ApplyError> {
    let mut rows = TrailColumns::default();
    for (event, change) in events.iter().zip(decoded) {
        let sentence = summarize(event, change, book)?;
        rows.push(event, sentence);
    }
    Ok(rows)
}

/// The sentence for one event. Moves `book` along with the product events.
fn summarize(
    event: &StoredEvent,
    change: &Decoded,
    book: &mut StockBook,
) -> Result<Sentence, ApplyError> {
    Ok(match change {
        Decoded::User(change) => Sentence::whole(summarize_user(change)),
        Decoded::Product(id, change) => match stock_after(event, *id, change, book)? {
            Available::Known(available) => Sentence::whole(summarize_product(change, available)),
            Available::Moved(product_id, moved) => {
                let text = summarize_product(change, AVAILABLE_MARK);
                match text.split_once(AVAILABLE_MARK) {
                    Some((head, tail)) => Sentence {
                        text: head.to_owned(),
                        unread: Some(Unread {
                            product_id,
                            moved,
                            tail: tail.to_owned(),
                        }),
                    },
                    None => Sentence::whole(text),
                }
            }
        },
        Decoded::Order(change) => Sentence::whole(summarize_order(change)),
        Decoded::Unknown => Sentence::whole(format!("recorded {}", event.event_type)),
    })
}

fn summarize_user(change: &UserEvent) -> String {
    match change {
        UserEvent::UserRegistered { email, role, .. } => {
            format!("registered {} as {role}", email.as_str())
        }
        UserEvent::UserNameChanged { name } => format!("changed name to {}", name.as_str()),
        UserEvent::UserPasswordChanged { .. } => "changed password".to_owned(),
        UserEvent::UserRoleAssigned { role } => format!("changed role to {role}"),
        UserEvent::UserDeactivated => "deactivated the account".to_owned(),
        UserEvent::UserReactivated => "reactivated the account".to_owned(),
    }
}

/// Applies a product event's stock movement and answers the available stock after it.
fn stock_after(
    event: &StoredEvent,
    id: Uuid,
    change: &ProductEvent,
    book: &mut StockBook,
) -> Result<Available, ApplyError> {
    if let ProductEvent::ProductCreated { stock: initial, .. } = change {
        let initial = i64::from(*initial);
        book.known.insert(id, initial);
        return Ok(Available::Known(initial));
    }
    let units = match change {
        ProductEvent::ProductRestocked { quantity }
        | ProductEvent::StockReleased { quantity, .. }
        | ProductEvent::StockReserved { quantity, .. } => i64::from(quantity.get()),
        // Other events say nothing about stock.
        _ => return Ok(Available::Known(0)),
    };
    let taken = matches!(change, ProductEvent::StockReserved { .. });
    if let Some(available) = book.known.get_mut(&id) {
        *available = if taken {
            (*available - units).max(0)
        } else {
            available.saturating_add(units)
        };
        return Ok(Available::Known(*available));
    }
    let Some(pending) = book
        .unread
        .as_mut()
        .filter(|pending| !pending.created.contains(&id))
    else {
        return Err(ApplyError::Invariant {
            position: event.position,
            reason: format!(
                "{} for product {id}, which was never created",
                event.event_type
            ),
        });
    };
    let movement = pending.moves.entry(id).or_default();
    if taken {
        movement.need = movement.need.max(units - movement.change);
        movement.change -= units;
    } else {
        movement.change = movement.change.saturating_add(units);
    }
    Ok(Available::Moved(id, movement.change))
}

fn summarize_product(change: &ProductEvent, available: impl std::fmt::Display) -> String {
    match change {
        ProductEvent::ProductCreated {
            sku,
            name,
            price,
            stock,
            ..
        } => format!(
            "created {} \"{}\" at {} with {} in stock",
            sku.as_str(),
            name.as_str(),
            format_money(price),
            units(u64::from(*stock))
        ),
        ProductEvent::ProductDetailsUpdated { name, description } => {
            match (name, description.is_some()) {
                (Some(name), true) => {
                    format!(
                        "renamed to \"{}\" and changed the description",
                        name.as_str()
                    )
                }
                (Some(name), false) => format!("renamed to \"{}\"", name.as_str()),
                (None, true) => "changed the description".to_owned(),
                (None, false) => "updated the details".to_owned(),
            }
        }
        ProductEvent::ProductPriceChanged { price } => {
            format!("changed price to {}", format_money(price))
        }
        ProductEvent::ProductRestocked { quantity } => format!(
            "restocked {} (available {available})",
            units(u64::from(*quantity))
        ),
        ProductEvent::StockReserved { order_id, quantity } => format!(
            "reserved {} for order {order_id} (available {available})",
            units(u64::from(*quantity))
        ),
        ProductEvent::StockReleased { order_id, quantity } => format!(
            "released {} from order {order_id} (available {available})",
            units(u64::from(*quantity))
        ),
        ProductEvent::ReservationCommitted { order_id, quantity } => format!(
            "sold {} reserved for order {order_id}",
            units(u64::from(*quantity))
        ),
        ProductEvent::ProductDiscontinued => "discontinued the product".to_owned(),
    }
}

fn summarize_order(change: &OrderEvent) -> String {
    match change {
        OrderEvent::OrderPlaced { lines, total, .. } => format!(
            "placed an order of {} totalling {}",
            if lines.len() == 1 {
                "1 line".to_owned()
            } else {
                format!("{} lines", lines.len())
            },
            format_money(total)
        ),
        OrderEvent::OrderConfirmed => "confirmed the order".to_owned(),
        OrderEvent::OrderRejected { reason } => format!("rejected: {reason}"),
        OrderEvent::OrderPaid { amount } => format!("paid {}", format_money(amount)),
        OrderEvent::OrderShipped => "shipped the order".to_owned(),
        OrderEvent::OrderCancelled {
            reason,
            previous_status,
        } => match reason {
            Some(reason) => format!("cancelled the {previous_status} order: {reason}"),
            None => format!("cancelled the {previous_status} order"),
        },
    }
}

impl ReadModel for AuditTrail {
    fn name(&self) -> &'static str {
        NAME
    }

    fn tables(&self) -> Vec<String> {
        vec![self.trail.clone(), self.stock.clone()]
    }

    fn apply<'a>(
        &'a self,
        connection: &'a mut PgConnection,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(self.apply_events(connection, events))
    }
}

fn entry_from_row(row: &PgRow) -> Result<AuditEntry, sqlx::Error> {
    let actor_role: String = row.try_get("actor_role")?;
    Ok(AuditEntry {
        position: row.try_get("position")?,
        event_id: row.try_get("event_id")?,
        recorded_at: row.try_get("recorded_at")?,
        actor_id: row.try_get("actor_id")?,
        actor_role: serde_json::from_value(serde_json::Value::String(actor_role))
            .map_err(|error| column_error("actor_role", error))?,
        request_id: row.try_get("request_id")?,
        correlation_id: row.try_get("correlation_id")?,
        causation_id: row.try_get("causation_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        event_type: row.try_get("event_type")?,
        summary: row.try_get("summary")?,
    })
}

/// Trail entries matching `filter`, in global position order.
pub async fn list<'e>(
    executor: impl PgExecutor<'e>,
    filter: &TrailFilter,
    page: &PageRequest,
) -> Result<Page<AuditEntry>, QueryError> {
    let tag = CursorTag::new("audit_trail", "position", filter);
    let after: Option<i64> = tag.resume(page)?;

    let mut query =
        QueryBuilder::<Postgres>::new(format!("SELECT {COLUMNS} FROM {TRAIL_TABLE} WHERE TRUE"));
    if let Some(actor_id) = filter.actor_id {
        query.push(" AND actor_id = ").push_bind(actor_id);
    }
    if let Some(aggregate_type) = &filter.aggregate_type {
        query
            .push(" AND aggregate_type = ")
            .push_bind(aggregate_type.clone());
    }
    if let Some(aggregate_id) = filter.aggregate_id {
        // In the collation of `audit_trail_entity_idx` (migration 0016), so it serves this.
        query
            .push(" AND aggregate_id COLLATE \"C\" = ")
            .push_bind(aggregate_id.to_string());
    }
    if let Some(from) = filter.from {
        query.push(" AND recorded_at >= ").push_bind(from);
    }
    if let Some(to) = filter.to {
        query.push(" AND recorded_at <= ").push_bind(to);
    }
    if let Some(position) = after {
        query.push(" AND position > ").push_bind(position);
    }
    query
        .push(" ORDER BY position LIMIT ")
        .push_bind(page.fetch_limit());

    let rows = query.build().fetch_all(executor).await?;
    let entries = rows
        .iter()
        .map(entry_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    tag.page(entries, page, |entry| entry.position)
}
