//! `/products`: the catalog (anyone reads it) and its administration.

use axum::extract::State;
use axum::http::Method;
use hindsight_domain::ids::ProductId;
use hindsight_domain::product::{ProductCommand, ProductStatus};
use hindsight_domain::values::{Currency, Description, Money, ProductName, Quantity, Sku};
use hindsight_projections::page::Page;
use hindsight_projections::products::{self, ProductFilter, ProductSort, ProductView};
use hindsight_projections::schema::{MoneySchema, ProductSortSchema, ProductStatusSchema};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::extract::{
    ApiJson, ApiPath, ApiQuery, CommandAnswer, IfMatch, MinPosition, NoFields, Paging, ReadAnswer,
};
use crate::request_id::RequestId;
use crate::routes::support::{actor, metadata, Fields};
use crate::routes::Routes;
use crate::state::AppState;

const PROJECTION: &str = "products";

pub fn routes(routes: Routes) -> Routes {
    routes
        .add(Method::GET, "/products", list)
        .add(Method::POST, "/products", create)
        .add(Method::GET, "/products/{id}", one)
        .add(Method::PATCH, "/products/{id}", revise)
        .add(Method::POST, "/products/{id}/restock", restock)
        .add(Method::POST, "/products/{id}/discontinue", discontinue)
}

/// Money as clients send it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoneyInput {
    pub amount: i64,
    pub currency: String,
}

impl MoneyInput {
    pub fn parse(&self, field: &str, fields: &mut Fields) -> Option<Money> {
        let currency = fields.check(
            &format!("{field}.currency"),
            Currency::parse(&self.currency),
        )?;
        fields.check(
            &format!("{field}.amount"),
            Money::new(self.amount, currency),
        )
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Text search over name and description.
    q: Option<String>,
    #[param(value_type = Option<ProductStatusSchema>)]
    status: Option<ProductStatus>,
    /// Lowest price in minor units, inclusive.
    min_price: Option<i64>,
    /// Highest price in minor units, inclusive.
    max_price: Option<i64>,
    #[param(value_type = Option<ProductSortSchema>)]
    sort: Option<String>,
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
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<ReadAnswer<Page<ProductView>>, ApiError> {
    let sort = match query.sort.as_deref() {
        None => ProductSort::default(),
        Some(sort) => sort.parse::<ProductSort>().map_err(|_| {
            ApiError::validation(
                "sort",
                "must be one of name, price, -price, created_at, -created_at",
            )
        })?,
    };
    if let (Some(min), Some(max)) = (query.min_price, query.max_price) {
        if min > max {
            return Err(ApiError::validation(
                "min_price",
                "must not exceed max_price",
            ));
        }
    }
    let page = Paging::page(query.limit, query.cursor)?;
    let position = MinPosition::at(query.min_position)
        .wait(&state, PROJECTION)
        .await?;
    let filter = ProductFilter {
        q: query.q,
        status: query.status,
        min_price: query.min_price,
        max_price: query.max_price,
    };
    let mut connection = state.lend().await?;
    let body = products::list(&mut *connection, &filter, sort, &page).await;
    let body = connection.give_back(body)?;
    Ok(ReadAnswer {
        body,
        projection_position: position,
        version: None,
    })
}

async fn one(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(at): ApiQuery<MinPosition>,
) -> Result<ReadAnswer<ProductView>, ApiError> {
    let position = at.wait(&state, PROJECTION).await?;
    let mut connection = state.lend().await?;
    let product = products::get(&mut *connection, ProductId::from_uuid(id)).await;
    let product = connection.give_back(product)?.ok_or(ApiError::NotFound)?;
    Ok(ReadAnswer {
        version: Some(product.version),
        body: product,
        projection_position: position,
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateRequest {
    /// 1 to 64 letters, digits, `.`, `_` or `-`, starting with a letter or digit; unique.
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    sku: String,
    name: String,
    #[serde(default)]
    description: String,
    #[schema(value_type = MoneySchema)]
    price: MoneyInput,
    /// Units on hand.
    #[schema(minimum = 0, maximum = 4294967295_i64)]
    stock: i64,
}

/// What `create` answers, besides the command's `position`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ProductCreated {
    id: Uuid,
}

/// What the other product commands answer, besides the command's `position`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ProductChanged {
    id: Uuid,
    /// The product's version after the command.
    version: u64,
}

async fn create(
    State(state): State<AppState>,
    user: AuthUser,
    request_id: RequestId,
    ApiJson(body): ApiJson<CreateRequest>,
) -> Result<CommandAnswer, ApiError> {
    let mut fields = Fields::default();
    let sku = fields.check("sku", Sku::parse(&body.sku));
    let name = fields.check("name", ProductName::parse(&body.name));
    let description = fields.check("description", Description::parse(&body.description));
    let price = body.price.parse("price", &mut fields);
    let stock = u32::try_from(body.stock).ok();
    if stock.is_none() {
        fields.fail("stock", "must be a whole number from 0 to 4294967295");
    }
    fields.finish()?;
    let (Some(sku), Some(name), Some(description), Some(price), Some(stock)) =
        (sku, name, description, price, stock)
    else {
        return Err(ApiError::internal("validated fields missing"));
    };
    let product_id = ProductId::new();
    let executed = state
        .commands
        .products
        .execute_new(
            product_id.as_uuid(),
            ProductCommand::Create {
                product_id,
                sku,
                name,
                description,
                price,
                stock,
            },
            &metadata(actor(&user), &request_id),
        )
        .await??;
    let body = serde_json::to_value(ProductCreated {
        id: product_id.as_uuid(),
    })
    .map_err(ApiError::internal)?;
    Ok(CommandAnswer::created(body, executed.position))
}

async fn execute(
    state: &AppState,
    user: &AuthUser,
    request_id: &RequestId,
    id: Uuid,
    command: ProductCommand,
    expected: IfMatch,
) -> Result<CommandAnswer, ApiError> {
    let executed = state
        .commands
        .products
        .execute(id, command, &metadata(actor(user), request_id), expected.0)
        .await??;
    let body = serde_json::to_value(ProductChanged {
        id,
        version: executed.version,
    })
    .map_err(ApiError::internal)?;
    Ok(CommandAnswer::ok(body, executed.position))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReviseRequest {
    name: Option<String>,
    description: Option<String>,
    /// Must stay in the product's currency.
    #[schema(value_type = Option<MoneySchema>)]
    price: Option<MoneyInput>,
}

async fn revise(
    State(state): State<AppState>,
    user: AuthUser,
    request_id: RequestId,
    ApiPath(id): ApiPath<Uuid>,
    expected: IfMatch,
    ApiJson(body): ApiJson<ReviseRequest>,
) -> Result<CommandAnswer, ApiError> {
    let mut fields = Fields::default();
    let name = body
        .name
        .as_deref()
        .and_then(|name| fields.check("name", ProductName::parse(name)));
    let description = body
        .description
        .as_deref()
        .and_then(|text| fields.check("description", Description::parse(text)));
    let price = body
        .price
        .as_ref()
        .and_then(|price| price.parse("price", &mut fields));
    fields.finish()?;
    let command = ProductCommand::Revise {
        name,
        description,
        price,
    };
    execute(&state, &user, &request_id, id, command, expected).await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RestockRequest {
    /// Units added to the stock.
    #[schema(minimum = 1, maximum = 4294967295_i64)]
    quantity: i64,
}

async fn restock(
    State(state): State<AppState>,
    user: AuthUser,
    request_id: RequestId,
    ApiPath(id): ApiPath<Uuid>,
    expected: IfMatch,
    ApiJson(body): ApiJson<RestockRequest>,
) -> Result<CommandAnswer, ApiError> {
    let quantity = u32::try_from(body.quantity)
        .ok()
        .and_then(|quantity| Quantity::new(quantity).ok())
        .ok_or_else(|| ApiError::validation("quantity", "must be a positive whole number"))?;
    execute(
        &state,
        &user,
        &request_id,
        id,
        ProductCommand::Restock { quantity },
        expected,
    )
    .await
}

async fn discontinue(
    State(state): State<AppState>,
    user: AuthUser,
    request_id: RequestId,
    ApiPath(id): ApiPath<Uuid>,
    expected: IfMatch,
    _body: NoFields,
) -> Result<CommandAnswer, ApiError> {
    execute(
        &state,
        &user,
        &request_id,
        id,
        ProductCommand::Discontinue,
        expected,
    )
    .await
}
