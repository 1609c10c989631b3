//! The `orders` read model: every order as the API shows it, newest first.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use hindsight_commands::StoredEvent;
use hindsight_domain::ids::{OrderId, UserId};
use hindsight_domain::order::{OrderEvent, OrderLine, OrderStatus};
use hindsight_domain::values::Money;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::page::{
    self, aggregate_uuid, column_error, fold_or_patch, money_from_columns, table_name, CursorTag,
    Page, PageRequest, QueryError, Split,
};
use crate::read_model::{ApplyError, ReadModel};

const TABLE: &str = "order_views";
const COLUMNS: &str = "id, customer_id, status, lines, total_amount, total_currency, \
     rejection_reason, created_at, updated_at, version";

/// An order as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderView {
    #[schema(value_type = uuid::Uuid)]
    pub id: OrderId,
    #[schema(value_type = uuid::Uuid)]
    pub customer_id: UserId,
    #[schema(value_type = crate::schema::OrderStatusSchema)]
    pub status: OrderStatus,
    /// The lines as placed, with the prices the customer pays.
    #[schema(value_type = Vec<crate::schema::OrderLineSchema>)]
    pub lines: Vec<OrderLine>,
    #[schema(value_type = crate::schema::MoneySchema)]
    pub total: Money,
    /// The code of the rule that refused the order; only present once it is rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The sequence of the order's last event.
    pub version: i64,
}

/// Which orders a list shows; `None` matches any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderFilter {
    pub status: Option<OrderStatus>,
    pub customer_id: Option<UserId>,
}

/// The `orders` projection.
#[derive(Debug, Clone)]
pub struct Orders {
    table: String,
}

impl Orders {
    /// Writes the live table.
    pub fn live() -> Self {
        Self::with_suffix("")
    }

    /// Writes `order_views<suffix>`, a copy a rebuild fills before it is swapped in.
    pub fn with_suffix(suffix: &str) -> Self {
        Self {
            table: table_name(TABLE, suffix),
        }
    }

    async fn apply_events(
        &self,
        connection: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ApplyError> {
        let mut changes = Vec::new();
        for event in events
            .iter()
            .filter(|event| event.aggregate_type == "order")
        {
            changes.push((event, aggregate_uuid(event)?, event.decode::<OrderEvent>()?));
        }
        if changes.is_empty() {
            return Ok(());
        }

        // Orders this batch places are folded whole here and written once. After its
        // placing an order's events only set its status (and a rejection's reason), so an
        // order placed before the batch is changed in place: not read first, and its lines
        // not written again.
        let Split {
            whole: orders,
            patches,
        } = fold_or_patch::<_, _, Patch>(
            changes,
            |change| matches!(change, OrderEvent::OrderPlaced { .. }),
            fold,
        )?;
        if !orders.is_empty() {
            self.upsert(&mut *connection, orders.values()).await?;
        }
        if !patches.is_empty() {
            self.patch(connection, patches).await?;
        }
        Ok(())
    }

    /// Sets the status, reason, time and version of orders placed before the batch. An
    /// order with no row fails the batch, as it does in `fold`.
    async fn patch(
        &self,
        connection: &mut PgConnection,
        patches: BTreeMap<Uuid, Patch>,
    ) -> Result<(), ApplyError> {
        let mut id = Vec::with_capacity(patches.len());
        let mut status = Vec::with_capacity(patches.len());
        let mut rejection_reason = Vec::with_capacity(patches.len());
        let mut updated_at = Vec::with_capacity(patches.len());
        let mut version = Vec::with_capacity(patches.len());
        for (order, patch) in &patches {
            id.push(*order);
            status.push(patch.status.map(|status| status.as_str()));
            rejection_reason.push(patch.rejection_reason.as_deref());
            updated_at.push(patch.updated_at);
            version.push(patch.version);
        }
        // Joined to the table by its primary key under either of the batch's settings
        // (`worker::batch_settings`): a session's generic plan made while the table was
        // small would join the whole table by hash if it could, and orders only ever grow
        // (12.9 ms a batch at 60,000 orders in the benchmark, against ~0.3 ms by the
        // primary key).
        let changed: BTreeSet<Uuid> = sqlx::query_scalar(&format!(
            "UPDATE {} AS o SET status = COALESCE(u.status, o.status), \
                 rejection_reason = COALESCE(u.rejection_reason, o.rejection_reason), \
                 updated_at = u.updated_at, version = u.version \
             FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], \
                         $5::bigint[]) \
                  AS u(id, status, rejection_reason, updated_at, version) \
             WHERE o.id = u.id \
             RETURNING o.id",
            self.table
        ))
        .bind(&id)
        .bind(status)
        .bind(rejection_reason)
        .bind(updated_at)
        .bind(version)
        .fetch_all(connection)
        .await?
        .into_iter()
        .collect();
        match patches.iter().find(|(order, _)| !changed.contains(*order)) {
            Some((order, patch)) => Err(ApplyError::Invariant {
                position: patch.first_position,
                reason: format!(
                    "{} for order {order}, which was never placed",
                    patch.first_event_type
                ),
            }),
            None => Ok(()),
        }
    }

    async fn upsert<'o>(
        &self,
        connection: &mut PgConnection,
        orders: impl Iterator<Item = &'o OrderView>,
    ) -> Result<(), ApplyError> {
        let mut columns = OrderColumns::default();
        for order in orders {
            columns.id.push(order.id.as_uuid());
            columns.customer_id.push(order.customer_id.as_uuid());
            columns.status.push(order.status.as_str());
            columns.lines.push(Json(&order.lines));
            columns.total_amount.push(order.total.amount());
            columns.total_currency.push(order.total.currency().as_str());
            columns
                .rejection_reason
                .push(order.rejection_reason.as_deref());
            columns.created_at.push(order.created_at);
            columns.updated_at.push(order.updated_at);
            columns.version.push(order.version);
        }
        sqlx::query(&format!(
            "INSERT INTO {} ({COLUMNS}) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::jsonb[], \
                                  $5::bigint[], $6::text[], $7::text[], $8::timestamptz[], \
                                  $9::timestamptz[], $10::bigint[]) \
             ON CONFLICT (id) DO UPDATE SET customer_id = EXCLUDED.customer_id, \
                 status = EXCLUDED.status, lines = EXCLUDED.lines, \
                 total_amount = EXCLUDED.total_amount, \
                 total_currency = EXCLUDED.total_currency, \
                 rejection_reason = EXCLUDED.rejection_reason, \
                 created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, \
                 version = EXCLUDED.version",
            self.table
        ))
        .bind(columns.id)
        .bind(columns.customer_id)
        .bind(columns.status)
        .bind(columns.lines)
        .bind(columns.total_amount)
        .bind(columns.total_currency)
        .bind(columns.rejection_reason)
        .bind(columns.created_at)
        .bind(columns.updated_at)
        .bind(columns.version)
        .execute(connection)
        .await?;
        Ok(())
    }
}

#[derive(Default)]
struct OrderColumns<'o> {
    id: Vec<Uuid>,
    customer_id: Vec<Uuid>,
    status: Vec<&'static str>,
    lines: Vec<Json<&'o Vec<OrderLine>>>,
    total_amount: Vec<i64>,
    total_currency: Vec<&'static str>,
    rejection_reason: Vec<Option<&'o str>>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    version: Vec<i64>,
}

/// What a batch does to an order placed before it.
struct Patch {
    /// The batch's first event of the order, named if the order turns out never placed.
    first_position: i64,
    first_event_type: String,
    /// The status the batch last set.
    status: Option<OrderStatus>,
    rejection_reason: Option<String>,
    updated_at: DateTime<Utc>,
    version: i64,
}

impl page::Patch<OrderEvent> for Patch {
    fn new(event: &StoredEvent) -> Self {
        Self {
            first_position: event.position,
            first_event_type: event.event_type.clone(),
            status: None,
            rejection_reason: None,
            updated_at: event.recorded_at,
            version: event.sequence,
        }
    }

    /// As `fold` would apply it to the stored order.
    fn add(&mut self, event: &StoredEvent, change: OrderEvent) {
        match change {
            // Never here: `apply_events` folds the orders a batch places.
            OrderEvent::OrderPlaced { .. } => {}
            OrderEvent::OrderConfirmed => self.status = Some(OrderStatus::Confirmed),
            OrderEvent::OrderRejected { reason } => {
                self.rejection_reason = Some(reason);
                self.status = Some(OrderStatus::Rejected);
            }
            OrderEvent::OrderPaid { .. } => self.status = Some(OrderStatus::Paid),
            OrderEvent::OrderShipped => self.status = Some(OrderStatus::Shipped),
            OrderEvent::OrderCancelled { .. } => self.status = Some(OrderStatus::Cancelled),
        }
        self.updated_at = event.recorded_at;
        self.version = event.sequence;
    }
}

fn fold(
    orders: &mut BTreeMap<Uuid, OrderView>,
    event: &StoredEvent,
    id: Uuid,
    change: OrderEvent,
) -> Result<(), ApplyError> {
    if let OrderEvent::OrderPlaced {
        customer_id,
        lines,
        total,
        ..
    } = change
    {
        orders.insert(
            id,
            OrderView {
                id: OrderId::from_uuid(id),
                customer_id,
                status: OrderStatus::Pending,
                lines,
                total,
                rejection_reason: None,
                created_at: event.recorded_at,
                updated_at: event.recorded_at,
                version: event.sequence,
            },
        );
        return Ok(());
    }
    let order = orders.get_mut(&id).ok_or_else(|| ApplyError::Invariant {
        position: event.position,
        reason: format!(
            "{} for order {id}, which was never placed",
            event.event_type
        ),
    })?;
    order.status = match change {
        OrderEvent::OrderPlaced { .. } => order.status,
        OrderEvent::OrderConfirmed => OrderStatus::Confirmed,
        OrderEvent::OrderRejected { reason } => {
            order.rejection_reason = Some(reason);
            OrderStatus::Rejected
        }
        OrderEvent::OrderPaid { .. } => OrderStatus::Paid,
        OrderEvent::OrderShipped => OrderStatus::Shipped,
        OrderEvent::OrderCancelled { .. } => OrderStatus::Cancelled,
    };
    order.updated_at = event.recorded_at;
    order.version = event.sequence;
    Ok(())
}

impl ReadModel for Orders {
    fn name(&self) -> &'static str {
        "orders"
    }

    fn tables(&self) -> Vec<String> {
        vec![self.table.clone()]
    }

    fn apply<'a>(
        &'a self,
        connection: &'a mut PgConnection,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(self.apply_events(connection, events))
    }
}

fn order_from_row(row: &PgRow) -> Result<OrderView, sqlx::Error> {
    let status: String = row.try_get("status")?;
    let currency: String = row.try_get("total_currency")?;
    let Json(lines) = row.try_get::<Json<Vec<OrderLine>>, _>("lines")?;
    Ok(OrderView {
        id: OrderId::from_uuid(row.try_get("id")?),
        customer_id: UserId::from_uuid(row.try_get("customer_id")?),
        status: status
            .parse()
            .map_err(|error| column_error("status", error))?,
        lines,
        total: money_from_columns(row.try_get("total_amount")?, &currency, "total_currency")?,
        rejection_reason: row.try_get("rejection_reason")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
    })
}

/// One order by id.
pub async fn get<'e>(
    executor: impl PgExecutor<'e>,
    id: OrderId,
) -> Result<Option<OrderView>, QueryError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM {TABLE} WHERE id = $1"))
        .bind(id.as_uuid())
        .fetch_optional(executor)
        .await?;
    Ok(row.as_ref().map(order_from_row).transpose()?)
}

/// Orders matching `filter`, newest first.
pub async fn list<'e>(
    executor: impl PgExecutor<'e>,
    filter: &OrderFilter,
    page: &PageRequest,
) -> Result<Page<OrderView>, QueryError> {
    let tag = CursorTag::new("orders", "-created_at", filter);
    let after: Option<(DateTime<Utc>, Uuid)> = tag.resume(page)?;

    let mut query =
        QueryBuilder::<Postgres>::new(format!("SELECT {COLUMNS} FROM {TABLE} WHERE TRUE"));
    if let Some(status) = filter.status {
        query.push(" AND status = ").push_bind(status.as_str());
    }
    if let Some(customer_id) = filter.customer_id {
        query
            .push(" AND customer_id = ")
            .push_bind(customer_id.as_uuid());
    }
    if let Some((created_at, id)) = after {
        query
            .push(" AND (created_at, id) < (")
            .push_bind(created_at)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    query
        .push(" ORDER BY created_at DESC, id DESC LIMIT ")
        .push_bind(page.fetch_limit());

    let rows = query.build().fetch_all(executor).await?;
    let orders = rows
        .iter()
        .map(order_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    tag.page(orders, page, |order| (order.created_at, order.id.as_uuid()))
}
