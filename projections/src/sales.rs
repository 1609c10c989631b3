//! The `sales` read model: per product, what shipped orders sold of it.
//!
//! It is fed by two aggregate types. Product events give each product its row (SKU and
//! name, renames included; revenue is kept in the product's price currency). Order events
//! give the sales: `OrderShipped` carries no lines, so the lines of every `OrderPlaced`
//! wait in a table of this read model's own until the order ships (and counts) or is
//! cancelled or rejected (and never counts).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use hindsight_commands::StoredEvent;
use hindsight_domain::ids::ProductId;
use hindsight_domain::order::OrderEvent;
use hindsight_domain::product::ProductEvent;
use hindsight_domain::values::{Currency, Money};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgExecutor, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::page::{
    aggregate_uuid, money_from_columns, table_name, CursorTag, Page, PageRequest, QueryError,
};
use crate::read_model::{ApplyError, ReadModel};

const SALES_TABLE: &str = "product_sales";
const OPEN_LINES_TABLE: &str = "product_sales_open_lines";
const COLUMNS: &str =
    "product_id, sku, name, currency, units_sold, revenue_amount, orders_shipped, updated_at";

/// What one product sold in shipped orders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SalesView {
    pub product_id: ProductId,
    pub sku: String,
    pub name: String,
    pub units_sold: i64,
    /// The sum of the shipped lines' totals, in the product's price currency.
    pub revenue: Money,
    /// How many shipped orders had a line of this product.
    pub orders_shipped: i64,
    pub updated_at: DateTime<Utc>,
}

/// The `sales` projection.
#[derive(Debug, Clone)]
pub struct Sales {
    sales: String,
    open_lines: String,
}

/// What a placed order's line will count for once the order ships.
#[derive(Debug, Clone)]
struct OpenLine {
    product_id: Uuid,
    quantity: i64,
    line_total: Money,
}

/// The events this read model folds, already decoded.
enum Change {
    ProductCreated {
        sku: String,
        name: String,
        currency: Currency,
    },
    ProductRenamed {
        name: String,
    },
    OrderPlaced {
        lines: Vec<OpenLine>,
    },
    OrderShipped,
    /// Cancelled or rejected: its lines will never count.
    OrderDropped,
}

impl Change {
    /// The change an event makes to sales, if any. Cheap for the many events that make
    /// none (stock movements, payments): those are not even decoded.
    fn of(event: &StoredEvent) -> Result<Option<Change>, ApplyError> {
        let change = match (event.aggregate_type.as_str(), event.event_type.as_str()) {
            ("product", "ProductCreated" | "ProductDetailsUpdated") => {
                match event.decode::<ProductEvent>()? {
                    ProductEvent::ProductCreated {
                        sku, name, price, ..
                    } => Change::ProductCreated {
                        sku: sku.as_str().to_owned(),
                        name: name.as_str().to_owned(),
                        currency: price.currency(),
                    },
                    ProductEvent::ProductDetailsUpdated {
                        name: Some(name), ..
                    } => Change::ProductRenamed {
                        name: name.as_str().to_owned(),
                    },
                    _ => return Ok(None),
                }
            }
            ("order", "OrderPlaced" | "OrderShipped" | "OrderCancelled" | "OrderRejected") => {
                match event.decode::<OrderEvent>()? {
                    OrderEvent::OrderPlaced { lines, .. } => Change::OrderPlaced {
                        lines: lines
                            .into_iter()
                            .map(|line| OpenLine {
                                product_id: line.product_id.as_uuid(),
                                quantity: i64::from(line.quantity.get()),
                                line_total: line.line_total,
                            })
                            .collect(),
                    },
                    OrderEvent::OrderShipped => Change::OrderShipped,
                    OrderEvent::OrderCancelled { .. } | OrderEvent::OrderRejected { .. } => {
                        Change::OrderDropped
                    }
                    _ => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
        Ok(Some(change))
    }
}

impl Sales {
    /// Writes the live tables.
    pub fn live() -> Self {
        Self::with_suffix("")
    }

    /// Writes `product_sales<suffix>` and `product_sales_open_lines<suffix>`, copies a
    /// rebuild fills before they are swapped in.
    pub fn with_suffix(suffix: &str) -> Self {
        Self {
            sales: table_name(SALES_TABLE, suffix),
            open_lines: table_name(OPEN_LINES_TABLE, suffix),
        }
    }

    async fn apply_events(
        &self,
        connection: &mut PgConnection,
        events: &[StoredEvent],
    ) -> Result<(), ApplyError> {
        let mut changes = Vec::new();
        for event in events {
            if let Some(change) = Change::of(event)? {
                changes.push((event, aggregate_uuid(event)?, change));
            }
        }
        if changes.is_empty() {
            return Ok(());
        }

        // The lines of orders that ship in this batch but were placed before it.
        let placed_here: BTreeSet<Uuid> = changes
            .iter()
            .filter(|(_, _, change)| matches!(change, Change::OrderPlaced { .. }))
            .map(|(_, id, _)| *id)
            .collect();
        let shipped_from_before: Vec<Uuid> = changes
            .iter()
            .filter(|(_, id, change)| {
                matches!(change, Change::OrderShipped) && !placed_here.contains(id)
            })
            .map(|(_, id, _)| *id)
            .collect();
        let mut open = self
            .load_open_lines(&mut *connection, &shipped_from_before)
            .await?;

        // The products whose rows this batch changes and that exist already.
        let created_here: BTreeSet<Uuid> = changes
            .iter()
            .filter(|(_, _, change)| matches!(change, Change::ProductCreated { .. }))
            .map(|(_, id, _)| *id)
            .collect();
        let placed_lines: BTreeMap<Uuid, &[OpenLine]> = changes
            .iter()
            .filter_map(|(_, id, change)| match change {
                Change::OrderPlaced { lines } => Some((*id, lines.as_slice())),
                _ => None,
            })
            .collect();
        let mut touched = BTreeSet::new();
        for (_, id, change) in &changes {
            match change {
                Change::ProductRenamed { .. } => {
                    touched.insert(*id);
                }
                Change::OrderShipped => {
                    let before = open.get(id).map(Vec::as_slice);
                    let here = placed_lines.get(id).copied();
                    for line in before.into_iter().chain(here).flatten() {
                        touched.insert(line.product_id);
                    }
                }
                _ => {}
            }
        }
        let load: Vec<Uuid> = touched.difference(&created_here).copied().collect();
        let mut sales = self.load_sales(&mut *connection, &load).await?;

        let mut closed = BTreeSet::new();
        for (event, id, change) in changes {
            match change {
                Change::ProductCreated {
                    sku,
                    name,
                    currency,
                } => {
                    sales.insert(
                        id,
                        SalesView {
                            product_id: ProductId::from_uuid(id),
                            sku,
                            name,
                            units_sold: 0,
                            revenue: Money::zero(currency),
                            orders_shipped: 0,
                            updated_at: event.recorded_at,
                        },
                    );
                }
                Change::ProductRenamed { name } => {
                    let product = existing(&mut sales, event, id)?;
                    product.name = name;
                    product.updated_at = event.recorded_at;
                }
                Change::OrderPlaced { lines } => {
                    open.insert(id, lines);
                }
                Change::OrderShipped => {
                    closed.insert(id);
                    let lines = open.remove(&id).ok_or_else(|| ApplyError::Invariant {
                        position: event.position,
                        reason: format!("order {id} shipped without being placed"),
                    })?;
                    for line in lines {
                        count_shipped(existing(&mut sales, event, line.product_id)?, event, &line)?;
                    }
                }
                Change::OrderDropped => {
                    closed.insert(id);
                    open.remove(&id);
                }
            }
        }

        self.upsert_sales(&mut *connection, sales.values()).await?;
        // Orders both placed and closed in this batch never reached the table.
        let closed: Vec<Uuid> = closed.difference(&placed_here).copied().collect();
        if !closed.is_empty() {
            sqlx::query(&format!(
                "DELETE FROM {} WHERE order_id = ANY($1)",
                self.open_lines
            ))
            .bind(&closed)
            .execute(&mut *connection)
            .await?;
        }
        let still_open = placed_here
            .iter()
            .filter_map(|order_id| open.get(order_id).map(|lines| (*order_id, lines)));
        self.insert_open_lines(connection, still_open).await
    }

    async fn load_open_lines(
        &self,
        connection: &mut PgConnection,
        orders: &[Uuid],
    ) -> Result<BTreeMap<Uuid, Vec<OpenLine>>, ApplyError> {
        let mut open: BTreeMap<Uuid, Vec<OpenLine>> = BTreeMap::new();
        if orders.is_empty() {
            return Ok(open);
        }
        let rows = sqlx::query(&format!(
            "SELECT order_id, product_id, quantity, line_total, currency FROM {} \
             WHERE order_id = ANY($1) ORDER BY order_id, product_id",
            self.open_lines
        ))
        .bind(orders)
        .fetch_all(connection)
        .await?;
        for row in rows {
            let currency: String = row.try_get("currency")?;
            open.entry(row.try_get("order_id")?)
                .or_default()
                .push(OpenLine {
                    product_id: row.try_get("product_id")?,
                    quantity: row.try_get("quantity")?,
                    line_total: money_from_columns(
                        row.try_get("line_total")?,
                        &currency,
                        "currency",
                    )?,
                });
        }
        Ok(open)
    }

    async fn load_sales(
        &self,
        connection: &mut PgConnection,
        products: &[Uuid],
    ) -> Result<BTreeMap<Uuid, SalesView>, ApplyError> {
        if products.is_empty() {
            return Ok(BTreeMap::new());
        }
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM {} WHERE product_id = ANY($1)",
            self.sales
        ))
        .bind(products)
        .fetch_all(connection)
        .await?;
        Ok(rows
            .iter()
            .map(|row| sales_from_row(row).map(|sales| (sales.product_id.as_uuid(), sales)))
            .collect::<Result<_, _>>()?)
    }

    async fn upsert_sales<'s>(
        &self,
        connection: &mut PgConnection,
        sales: impl Iterator<Item = &'s SalesView>,
    ) -> Result<(), ApplyError> {
        let mut columns = SalesColumns::default();
        for product in sales {
            columns.product_id.push(product.product_id.as_uuid());
            columns.sku.push(product.sku.as_str());
            columns.name.push(product.name.as_str());
            columns.currency.push(product.revenue.currency().as_str());
            columns.units_sold.push(product.units_sold);
            columns.revenue_amount.push(product.revenue.amount());
            columns.orders_shipped.push(product.orders_shipped);
            columns.updated_at.push(product.updated_at);
        }
        if columns.product_id.is_empty() {
            return Ok(());
        }
        sqlx::query(&format!(
            "INSERT INTO {} ({COLUMNS}) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[], \
                                  $6::bigint[], $7::bigint[], $8::timestamptz[]) \
             ON CONFLICT (product_id) DO UPDATE SET sku = EXCLUDED.sku, name = EXCLUDED.name, \
                 currency = EXCLUDED.currency, units_sold = EXCLUDED.units_sold, \
                 revenue_amount = EXCLUDED.revenue_amount, \
                 orders_shipped = EXCLUDED.orders_shipped, updated_at = EXCLUDED.updated_at",
            self.sales
        ))
        .bind(columns.product_id)
        .bind(columns.sku)
        .bind(columns.name)
        .bind(columns.currency)
        .bind(columns.units_sold)
        .bind(columns.revenue_amount)
        .bind(columns.orders_shipped)
        .bind(columns.updated_at)
        .execute(connection)
        .await?;
        Ok(())
    }

    async fn insert_open_lines<'l>(
        &self,
        connection: &mut PgConnection,
        orders: impl Iterator<Item = (Uuid, &'l Vec<OpenLine>)>,
    ) -> Result<(), ApplyError> {
        let (mut order_id, mut product_id, mut quantity, mut line_total, mut currency) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (order, lines) in orders {
            for line in lines {
                order_id.push(order);
                product_id.push(line.product_id);
                quantity.push(line.quantity);
                line_total.push(line.line_total.amount());
                currency.push(line.line_total.currency().as_str());
            }
        }
        if order_id.is_empty() {
            return Ok(());
        }
        sqlx::query(&format!(
            "INSERT INTO {} (order_id, product_id, quantity, line_total, currency) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[], $4::bigint[], $5::text[])",
            self.open_lines
        ))
        .bind(order_id)
        .bind(product_id)
        .bind(quantity)
        .bind(line_total)
        .bind(currency)
        .execute(connection)
        .await?;
        Ok(())
    }
}

#[derive(Default)]
struct SalesColumns<'s> {
    product_id: Vec<Uuid>,
    sku: Vec<&'s str>,
    name: Vec<&'s str>,
    currency: Vec<&'static str>,
    units_sold: Vec<i64>,
    revenue_amount: Vec<i64>,
    orders_shipped: Vec<i64>,
    updated_at: Vec<DateTime<Utc>>,
}

fn existing<'s>(
    sales: &'s mut BTreeMap<Uuid, SalesView>,
    event: &StoredEvent,
    product_id: Uuid,
) -> Result<&'s mut SalesView, ApplyError> {
    sales
        .get_mut(&product_id)
        .ok_or_else(|| ApplyError::Invariant {
            position: event.position,
            reason: format!(
                "{} refers to product {product_id}, which was never created",
                event.event_type
            ),
        })
}

fn count_shipped(
    product: &mut SalesView,
    event: &StoredEvent,
    line: &OpenLine,
) -> Result<(), ApplyError> {
    let invariant = |reason: String| ApplyError::Invariant {
        position: event.position,
        reason,
    };
    product.revenue = product
        .revenue
        .checked_add(line.line_total)
        .map_err(|error| {
            invariant(format!(
                "revenue of product {} cannot grow by {:?}: {error}",
                product.product_id, line.line_total
            ))
        })?;
    product.units_sold = product
        .units_sold
        .checked_add(line.quantity)
        .ok_or_else(|| invariant(format!("units sold of {} overflow", product.product_id)))?;
    product.orders_shipped += 1;
    product.updated_at = event.recorded_at;
    Ok(())
}

impl ReadModel for Sales {
    fn name(&self) -> &'static str {
        "sales"
    }

    fn tables(&self) -> Vec<String> {
        vec![self.sales.clone(), self.open_lines.clone()]
    }

    fn apply<'a>(
        &'a self,
        connection: &'a mut PgConnection,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(self.apply_events(connection, events))
    }
}

fn sales_from_row(row: &PgRow) -> Result<SalesView, sqlx::Error> {
    let currency: String = row.try_get("currency")?;
    Ok(SalesView {
        product_id: ProductId::from_uuid(row.try_get("product_id")?),
        sku: row.try_get("sku")?,
        name: row.try_get("name")?,
        units_sold: row.try_get("units_sold")?,
        revenue: money_from_columns(row.try_get("revenue_amount")?, &currency, "currency")?,
        orders_shipped: row.try_get("orders_shipped")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// What one product sold; `None` for a product that was never created.
pub async fn get<'e>(
    executor: impl PgExecutor<'e>,
    product_id: ProductId,
) -> Result<Option<SalesView>, QueryError> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM {SALES_TABLE} WHERE product_id = $1"
    ))
    .bind(product_id.as_uuid())
    .fetch_optional(executor)
    .await?;
    Ok(row.as_ref().map(sales_from_row).transpose()?)
}

/// Every product's sales, best sellers (most units) first.
pub async fn list<'e>(
    executor: impl PgExecutor<'e>,
    page: &PageRequest,
) -> Result<Page<SalesView>, QueryError> {
    let tag = CursorTag::new("sales", "-units_sold", &());
    let after: Option<(i64, Uuid)> = tag.resume(page)?;

    let mut query =
        QueryBuilder::<Postgres>::new(format!("SELECT {COLUMNS} FROM {SALES_TABLE} WHERE TRUE"));
    if let Some((units_sold, product_id)) = after {
        query
            .push(" AND (units_sold < ")
            .push_bind(units_sold)
            .push(" OR (units_sold = ")
            .push_bind(units_sold)
            .push(" AND product_id > ")
            .push_bind(product_id)
            .push("))");
    }
    query
        .push(" ORDER BY units_sold DESC, product_id ASC LIMIT ")
        .push_bind(page.fetch_limit());

    let rows = query.build().fetch_all(executor).await?;
    let sales = rows
        .iter()
        .map(sales_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    tag.page(sales, page, |product| {
        (product.units_sold, product.product_id.as_uuid())
    })
}
