//! `/orders`: customers place, pay and cancel their own orders; admins ship and cancel
//! any; auditors and admins read all. Another customer's order is 404.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::Method;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use hindsight_commands::store::Loaded;
use hindsight_commands::{ReadAt, Refusal};
use hindsight_domain::ids::{OrderId, ProductId, UserId};
use hindsight_domain::order::{NewOrderLine, Order, OrderCommand, OrderStatus};
use hindsight_domain::product::{self, Product};
use hindsight_domain::role::Role;
use hindsight_domain::values::Quantity;
use hindsight_projections::orders::{self, OrderFilter, OrderView};
use hindsight_projections::page::Page;
use hindsight_projections::schema::{MoneySchema, OrderStatusSchema};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::{
    ApiJson, ApiPath, ApiQuery, CommandAnswer, IfMatch, MinPosition, NoFields, OptionalJson,
    Paging, ReadAnswer,
};
use crate::request_id::RequestId;
use crate::routes::products::MoneyInput;
use crate::routes::support::{actor, metadata, Fields};
use crate::routes::Routes;
use crate::state::AppState;

const PROJECTION: &str = "orders";

pub fn routes(routes: Routes) -> Routes {
    routes
        .add(Method::GET, "/orders", list)
        .add(Method::POST, "/orders", place)
        .add(Method::GET, "/orders/{id}", one)
        .add(Method::GET, "/orders/{id}/stream", stream)
        .add(Method::POST, "/orders/{id}/pay", pay)
        .add(Method::POST, "/orders/{id}/cancel", cancel)
        .add(Method::POST, "/orders/{id}/ship", ship)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlaceRequest {
    /// 1 to 100 lines, one per product.
    #[schema(max_items = 100)]
    lines: Vec<LineRequest>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LineRequest {
    product_id: Uuid,
    /// 1 to 1000.
    #[schema(minimum = 1, maximum = 1000)]
    quantity: i64,
}

/// What `place` answers, besides the command's `position`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct OrderPlaced {
    id: Uuid,
    /// Always `pending`: the order process decides it next.
    #[schema(value_type = OrderStatusSchema)]
    status: OrderStatus,
}

/// What the other order commands answer, besides the command's `position`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct OrderChanged {
    id: Uuid,
    #[schema(value_type = OrderStatusSchema)]
    status: Option<OrderStatus>,
    /// The order's version after the command.
    version: u64,
}

/// Validates each line against the product's current state and captures its SKU, name
/// and price; the order starts `pending` and the order process decides it.
async fn place(
    State(state): State<AppState>,
    user: AuthUser,
    request_id: RequestId,
    ApiJson(body): ApiJson<PlaceRequest>,
) -> Result<CommandAnswer, ApiError> {
    if body.lines.len() > hindsight_domain::order::MAX_ORDER_LINES {
        return Err(ApiError::validation("lines", "must have at most 100 lines"));
    }
    let order_id = OrderId::new();
    let metadata = metadata(actor(&user), &request_id);
    // The order is decided on its products' listings as this process has them cached,
    // and its append holds it to them: should one have changed since the version read
    // (a new price, say), nothing is stored and the products are read again, as the store
    // holds them now. Stock movements change no listing.
    let mut attempts = 0;
    let executed = loop {
        attempts += 1;
        let (lines, reads) = order_lines(&state, &body, attempts > 1).await?;
        let executed = state
            .commands
            .orders
            .execute_new_reading(
                order_id.as_uuid(),
                OrderCommand::Place {
                    order_id,
                    customer_id: UserId::from_uuid(user.id),
                    lines,
                },
                &metadata,
                &reads,
            )
            .await?;
        match executed {
            Err(Refusal::ReadChanged) if attempts < PLACE_ATTEMPTS => {
                tracing::debug!(attempts, "a product's listing changed, reading it again");
            }
            executed => break executed?,
        }
    };
    let body = serde_json::to_value(OrderPlaced {
        id: order_id.as_uuid(),
        status: OrderStatus::Pending,
    })
    .map_err(ApiError::internal)?;
    Ok(CommandAnswer::created(body, executed.position))
}

/// How many times placing an order reads its products before it answers that they keep
/// changing (`CONCURRENT_MODIFICATION`): after the first, each reads them from the store.
const PLACE_ATTEMPTS: u32 = 3;

/// The lines of an order as placed, each with its product's SKU, name and price, and the
/// version of each product they were read at. `confirmed`: each product is read as the
/// store holds it now (one statement each), else from this process's cache where it can.
async fn order_lines(
    state: &AppState,
    body: &PlaceRequest,
    confirmed: bool,
) -> Result<(Vec<NewOrderLine>, Vec<ReadAt>), ApiError> {
    let mut fields = Fields::default();
    let mut lines = Vec::with_capacity(body.lines.len());
    let mut reads = Vec::with_capacity(body.lines.len());
    for (index, line) in body.lines.iter().enumerate() {
        let quantity = u32::try_from(line.quantity)
            .ok()
            .and_then(|q| Quantity::new(q).ok());
        let Some(quantity) = quantity else {
            fields.fail(
                &format!("lines[{index}].quantity"),
                "must be a positive whole number",
            );
            continue;
        };
        // The product's name, SKU, price and status only: its whole state holds every
        // order that reserved it and has not been shipped.
        let listing = |product: &Product| {
            let listed = match (product.sku(), product.name(), product.price()) {
                (Some(sku), Some(name), Some(price)) => Some((sku.clone(), name.clone(), price)),
                _ => None,
            };
            (product.is_discontinued(), listed)
        };
        let products = &state.commands.products;
        let product = match (!confirmed)
            .then(|| products.read_cached(line.product_id, listing))
            .flatten()
        {
            Some(cached) => Some(cached),
            None => products.read(line.product_id, listing).await?,
        };
        let Some(Loaded {
            state: (discontinued, listed),
            version,
        }) = product
        else {
            fields.fail(&format!("lines[{index}].product_id"), "is not a product");
            continue;
        };
        reads.push(ReadAt::part::<Product>(
            line.product_id,
            version,
            product::LISTING_EVENTS,
        ));
        if discontinued {
            return Err(ApiError::Conflict {
                code: "PRODUCT_DISCONTINUED",
                message: format!("product {} is discontinued", line.product_id),
            });
        }
        match listed {
            Some((sku, name, unit_price)) => lines.push(NewOrderLine {
                product_id: ProductId::from_uuid(line.product_id),
                sku,
                name,
                quantity,
                unit_price,
            }),
            None => fields.fail(&format!("lines[{index}].product_id"), "is not a product"),
        }
    }
    fields.finish()?;
    Ok((lines, reads))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    #[param(value_type = Option<OrderStatusSchema>)]
    status: Option<OrderStatus>,
    /// Admins and auditors: one customer's orders. A customer always sees their own.
    customer_id: Option<Uuid>,
    /// Page size, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<u32>,
    /// The previous page's `next_cursor`.
    cursor: Option<String>,
    /// Answer only once the read model has applied this position.
    #[param(minimum = 0)]
    min_position: Option<i64>,
}

async fn list(
    State(state): State<AppState>,
    user: AuthUser,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<ReadAnswer<Page<OrderView>>, ApiError> {
    let page = Paging::page(query.limit, query.cursor)?;
    let customer_id = match user.role {
        // A customer's list is their own, whatever they ask for.
        Role::Customer => {
            if query.customer_id.is_some_and(|asked| asked != user.id) {
                return Err(ApiError::validation(
                    "customer_id",
                    "customers see only their own orders",
                ));
            }
            Some(user.id)
        }
        _ => query.customer_id,
    };
    let position = MinPosition::at(query.min_position)
        .wait(&state, PROJECTION)
        .await?;
    let filter = OrderFilter {
        status: query.status,
        customer_id: customer_id.map(UserId::from_uuid),
    };
    let mut connection = state.lend().await?;
    let body = orders::list(&mut *connection, &filter, &page).await;
    let body = connection.give_back(body)?;
    Ok(ReadAnswer {
        body,
        projection_position: position,
        version: None,
    })
}

async fn one(
    State(state): State<AppState>,
    user: AuthUser,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(at): ApiQuery<MinPosition>,
) -> Result<ReadAnswer<OrderView>, ApiError> {
    let position = at.wait(&state, PROJECTION).await?;
    let mut connection = state.lend().await?;
    let order = orders::get(&mut *connection, OrderId::from_uuid(id)).await;
    let order = connection.give_back(order)?.ok_or(ApiError::NotFound)?;
    if user.role == Role::Customer && order.customer_id.as_uuid() != user.id {
        return Err(ApiError::NotFound);
    }
    Ok(ReadAnswer {
        version: Some(order.version),
        body: order,
        projection_position: position,
    })
}

/// How long an order's status stream stays open at most.
const STREAM_LIMIT: Duration = Duration::from_secs(300);

fn is_terminal(status: OrderStatus) -> bool {
    matches!(
        status,
        OrderStatus::Rejected | OrderStatus::Shipped | OrderStatus::Cancelled
    )
}

/// The status an order event moves the order to, if it moves it.
fn status_after(event_type: &str) -> Option<OrderStatus> {
    Some(match event_type {
        "OrderPlaced" => OrderStatus::Pending,
        "OrderConfirmed" => OrderStatus::Confirmed,
        "OrderRejected" => OrderStatus::Rejected,
        "OrderPaid" => OrderStatus::Paid,
        "OrderShipped" => OrderStatus::Shipped,
        "OrderCancelled" => OrderStatus::Cancelled,
        _ => return None,
    })
}

struct Watch {
    state: AppState,
    id: Uuid,
    progress: tokio::sync::watch::Receiver<i64>,
    last_sequence: i64,
    pending: std::collections::VecDeque<SseEvent>,
    deadline: tokio::time::Instant,
    done: bool,
}

impl Watch {
    /// Reads the order's events after the last one seen, from the event store (so every
    /// change is delivered, in order, even when a read model applies several at once).
    async fn read_new(&mut self) -> Result<(), sqlx::Error> {
        let rows: Vec<(i64, i64, String)> = sqlx::query_as(
            "SELECT sequence, position, event_type FROM events \
             WHERE aggregate_type = 'order' AND aggregate_id = $1 AND sequence > $2 \
             ORDER BY sequence",
        )
        .bind(self.id.to_string())
        .bind(self.last_sequence)
        .fetch_all(&self.state.pool)
        .await?;
        for (sequence, position, event_type) in rows {
            self.last_sequence = sequence;
            if let Some(status) = status_after(&event_type) {
                let data = json!({
                    "id": self.id, "status": status, "version": sequence, "position": position,
                });
                self.pending
                    .push_back(SseEvent::default().event("status").data(data.to_string()));
                if is_terminal(status) {
                    self.done = true;
                    break;
                }
            }
        }
        Ok(())
    }

    /// The next status change, or `None` when the order is terminal or time is up.
    async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            if let Err(error) = self.read_new().await {
                tracing::warn!(%error, "order stream: read failed; closing");
                return None;
            }
            if !self.pending.is_empty() {
                continue;
            }
            // Wake on the orders projection's progress; a slow tick covers a stalled relay.
            let woke = tokio::time::timeout_at(
                self.deadline,
                tokio::time::timeout(Duration::from_secs(1), self.progress.changed()),
            )
            .await;
            match woke {
                Err(_) => self.done = true,
                // The progress feed is gone (shutting down): fall back to the slow tick.
                Ok(Ok(Err(_))) => tokio::time::sleep(Duration::from_secs(1)).await,
                Ok(_) => {}
            }
        }
    }
}

/// `GET /orders/{id}/stream`: server-sent events, one `status` event per status change,
/// in order, read from the order's own events; closes when the order is terminal or
/// after a bounded time. Waiting wakes on the orders projection's progress.
async fn stream(
    State(state): State<AppState>,
    user: AuthUser,
    ApiPath(id): ApiPath<Uuid>,
) -> Result<Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    order_for(&state, &user, id).await?;
    let progress = state
        .progress
        .subscribe(PROJECTION)
        .await
        .map_err(ApiError::from_sqlx)?;
    let watch = Watch {
        state,
        id,
        progress,
        last_sequence: 0,
        pending: std::collections::VecDeque::new(),
        deadline: tokio::time::Instant::now() + STREAM_LIMIT,
        done: false,
    };
    let events = futures::stream::unfold(watch, |mut watch| async move {
        watch.next().await.map(|event| (Ok(event), watch))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// Loads an order the caller may act on: customers only their own (else 404).
async fn order_for(state: &AppState, user: &AuthUser, id: Uuid) -> Result<Order, ApiError> {
    let order = state
        .commands
        .orders
        .load(id)
        .await?
        .ok_or(ApiError::NotFound)?
        .state;
    let owner = order.customer_id().map(|customer| customer.as_uuid());
    if user.role == Role::Customer && owner != Some(user.id) {
        return Err(ApiError::NotFound);
    }
    Ok(order)
}

async fn execute(
    state: &AppState,
    user: &AuthUser,
    request_id: &RequestId,
    id: Uuid,
    command: OrderCommand,
    expected: IfMatch,
) -> Result<CommandAnswer, ApiError> {
    let executed = state
        .commands
        .orders
        .execute(id, command, &metadata(actor(user), request_id), expected.0)
        .await??;
    let order = state
        .commands
        .orders
        .load(id)
        .await?
        .ok_or(ApiError::NotFound)?
        .state;
    let body = serde_json::to_value(OrderChanged {
        id,
        status: order.status(),
        version: executed.version,
    })
    .map_err(ApiError::internal)?;
    Ok(CommandAnswer::ok(body, executed.position))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PayRequest {
    /// Must equal the order's total.
    #[schema(value_type = MoneySchema)]
    amount: MoneyInput,
}

async fn pay(
    State(state): State<AppState>,
    user: AuthUser,
    request_id: RequestId,
    ApiPath(id): ApiPath<Uuid>,
    expected: IfMatch,
    ApiJson(body): ApiJson<PayRequest>,
) -> Result<CommandAnswer, ApiError> {
    order_for(&state, &user, id).await?;
    let mut fields = Fields::default();
    let amount = body.amount.parse("amount", &mut fields);
    fields.finish()?;
    let amount = amount.ok_or_else(|| ApiError::internal("validated amount missing"))?;
    execute(
        &state,
        &user,
        &request_id,
        id,
        OrderCommand::Pay { amount },
        expected,
    )
    .await
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CancelRequest {
    /// At most 500 characters.
    #[schema(max_length = 500)]
    reason: Option<String>,
}

async fn cancel(
    State(state): State<AppState>,
    user: AuthUser,
    request_id: RequestId,
    ApiPath(id): ApiPath<Uuid>,
    expected: IfMatch,
    OptionalJson(body): OptionalJson<CancelRequest>,
) -> Result<CommandAnswer, ApiError> {
    order_for(&state, &user, id).await?;
    let reason = body.and_then(|body| body.reason);
    if reason
        .as_ref()
        .is_some_and(|reason| reason.chars().count() > 500)
    {
        return Err(ApiError::validation(
            "reason",
            "must be at most 500 characters",
        ));
    }
    // The reason is stored in the event's JSON payload, which cannot hold U+0000.
    if reason.as_ref().is_some_and(|reason| reason.contains('\0')) {
        return Err(ApiError::validation(
            "reason",
            "must not contain NUL characters",
        ));
    }
    execute(
        &state,
        &user,
        &request_id,
        id,
        OrderCommand::Cancel { reason },
        expected,
    )
    .await
}

async fn ship(
    State(state): State<AppState>,
    user: AuthUser,
    request_id: RequestId,
    ApiPath(id): ApiPath<Uuid>,
    expected: IfMatch,
    _body: NoFields,
) -> Result<CommandAnswer, ApiError> {
    order_for(&state, &user, id).await?;
    execute(&state, &user, &request_id, id, OrderCommand::Ship, expected).await
}
