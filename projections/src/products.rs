//! The `products` read model: the catalogue as the API shows it, with stock split into
//! available and reserved exactly as the product aggregate keeps it, and a full-text
//! search over name and description.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use hindsight_commands::StoredEvent;
use hindsight_domain::ids::ProductId;
use hindsight_domain::product::{ProductEvent, ProductStatus};
use hindsight_domain::values::Money;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::{Encode, PgConnection, PgExecutor, Postgres, QueryBuilder, Row, Type};
use uuid::Uuid;

use crate::page::{
    self, aggregate_uuid, column_error, fold_or_patch, load_by_ids, money_from_columns, table_name,
    CursorTag, Page, PageRequest, QueryError, Split,
};
use crate::read_model::{ApplyError, ReadModel};

const TABLE: &str = "product_views";
const COLUMNS: &str = "id, sku, name, description, price_amount, price_currency, \
     stock_available, stock_reserved, status, created_at, updated_at, version";

/// A product as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProductView {
    #[schema(value_type = uuid::Uuid)]
    pub id: ProductId,
    pub sku: String,
    pub name: String,
    pub description: String,
    #[schema(value_type = crate::schema::MoneySchema)]
    pub price: Money,
    /// Units new orders can reserve.
    pub stock_available: i64,
    /// Units held for orders not yet paid, cancelled or rejected.
    pub stock_reserved: i64,
    #[schema(value_type = crate::schema::ProductStatusSchema)]
    pub status: ProductStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The sequence of the product's last event.
    pub version: i64,
}

/// Which products a list shows; `None` matches any. Price bounds are inclusive and
/// compare the amount in minor units.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProductFilter {
    /// Words to find in the name or description. Plain words also match as prefixes
    /// (`gre` finds "green"); anything else is read as a web search (`"green tea"`,
    /// `tea -green`, `tea or coffee`).
    pub q: Option<String>,
    pub status: Option<ProductStatus>,
    pub min_price: Option<i64>,
    pub max_price: Option<i64>,
}

/// The orders a product list can be sorted in; ties are broken by id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ProductSort {
    Name,
    PriceAscending,
    PriceDescending,
    #[default]
    CreatedAtAscending,
    CreatedAtDescending,
}

/// A `sort` that is not one of the product list's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be one of name, price, -price, created_at, -created_at")]
pub struct UnknownSort;

impl ProductSort {
    pub const ALL: [ProductSort; 5] = [
        ProductSort::Name,
        ProductSort::PriceAscending,
        ProductSort::PriceDescending,
        ProductSort::CreatedAtAscending,
        ProductSort::CreatedAtDescending,
    ];

    /// The spelling in the query string.
    pub fn as_str(&self) -> &'static str {
        match self {
            ProductSort::Name => "name",
            ProductSort::PriceAscending => "price",
            ProductSort::PriceDescending => "-price",
            ProductSort::CreatedAtAscending => "created_at",
            ProductSort::CreatedAtDescending => "-created_at",
        }
    }
}

impl FromStr for ProductSort {
    type Err = UnknownSort;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProductSort::ALL
            .into_iter()
            .find(|sort| sort.as_str() == s)
            .ok_or(UnknownSort)
    }
}

impl TryFrom<String> for ProductSort {
    type Error = UnknownSort;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<ProductSort> for String {
    fn from(sort: ProductSort) -> Self {
        sort.as_str().to_owned()
    }
}

impl fmt::Display for ProductSort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `products` projection.
#[derive(Debug, Clone)]
pub struct Products {
    table: String,
}

impl Products {
    /// Writes the live table.
    pub fn live() -> Self {
        Self::with_suffix("")
    }

    /// Writes `product_views<suffix>`, a copy a rebuild fills before it is swapped in.
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
            .filter(|event| event.aggregate_type == "product")
        {
            changes.push((
                event,
                aggregate_uuid(event)?,
                event.decode::<ProductEvent>()?,
            ));
        }
        if changes.is_empty() {
            return Ok(());
        }

        // Products this batch creates are folded whole here and written once. The others
        // are changed in place by what the batch does to them, without being read first:
        // a round trip fewer for every batch the live worker commits.
        let Split {
            whole: products,
            patches,
        } = fold_or_patch::<_, _, Patch>(
            changes,
            |change| matches!(change, ProductEvent::ProductCreated { .. }),
            fold,
        )?;
        if !products.is_empty() {
            self.upsert(&mut *connection, products.values().collect())
                .await?;
        }
        let (text, figures): (Vec<_>, Vec<_>) = patches
            .into_iter()
            .partition(|(_, patch)| patch.name.is_some() || patch.description.is_some());
        let mut refused = self.patch(&mut *connection, text, true).await?;
        refused.extend(self.patch(&mut *connection, figures, false).await?);
        if !refused.is_empty() {
            // Events the aggregate never emits, or a row missing (which `refold` answers
            // with an error); worth an operator's look either way.
            tracing::warn!(
                table = %self.table,
                products = refused.len(),
                first_position = events.first().map_or(0, |event| event.position),
                "a batch's stock movements, added up, would take products below zero; \
                 folding them event by event"
            );
            self.refold(connection, events, &refused).await?;
        }
        Ok(())
    }

    /// Changes products in place: stock by the units the batch moved, the rest to what the
    /// batch last set. `text` says whether these patches set a name or description, which
    /// only then are written (see `update_figures` for why). Answers the products it left
    /// alone: rows missing, or holding less stock than a patch's movements need for
    /// none of them to go below zero.
    async fn patch(
        &self,
        connection: &mut PgConnection,
        patches: Vec<(Uuid, Patch)>,
        text: bool,
    ) -> Result<BTreeSet<Uuid>, ApplyError> {
        if patches.is_empty() {
            return Ok(BTreeSet::new());
        }
        let mut columns = PatchColumns::default();
        for (id, patch) in patches {
            columns.push(id, patch);
        }
        let (set_text, text_arrays, text_names) = if text {
            (
                ", name = COALESCE(u.name, p.name), \
                 description = COALESCE(u.description, p.description)",
                ", $11::text[], $12::text[]",
                ", name, description",
            )
        } else {
            ("", "", "")
        };
        let sql = format!(
            "UPDATE {} AS p SET stock_available = p.stock_available + u.available, \
                 stock_reserved = p.stock_reserved + u.reserved, \
                 price_amount = COALESCE(u.price_amount, p.price_amount), \
                 price_currency = COALESCE(u.price_currency, p.price_currency), \
                 status = COALESCE(u.status, p.status), \
                 updated_at = u.updated_at, version = u.version{set_text} \
             FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[], \
                         $6::bigint[], $7::text[], $8::text[], $9::timestamptz[], \
                         $10::bigint[]{text_arrays}) \
                  AS u(id, available, reserved, need_available, need_reserved, price_amount, \
                       price_currency, status, updated_at, version{text_names}) \
             WHERE p.id = u.id AND p.stock_available >= u.need_available \
               AND p.stock_reserved >= u.need_reserved \
             RETURNING p.id",
            self.table
        );
        let mut query = sqlx::query_scalar::<_, Uuid>(&sql)
            .bind(&columns.id)
            .bind(columns.available)
            .bind(columns.reserved)
            .bind(columns.need_available)
            .bind(columns.need_reserved)
            .bind(columns.price_amount)
            .bind(columns.price_currency)
            .bind(columns.status)
            .bind(columns.updated_at)
            .bind(columns.version);
        if text {
            query = query.bind(columns.name).bind(columns.description);
        }
        let changed: BTreeSet<Uuid> = query.fetch_all(connection).await?.into_iter().collect();
        Ok(columns
            .id
            .into_iter()
            .filter(|id| !changed.contains(id))
            .collect())
    }

    /// Reads products a patch left alone and folds the batch's events into them one by
    /// one, exactly as the aggregate would (stock stops at zero), then writes them back.
    /// A product that was never created fails the batch here.
    async fn refold(
        &self,
        connection: &mut PgConnection,
        events: &[StoredEvent],
        ids: &BTreeSet<Uuid>,
    ) -> Result<(), ApplyError> {
        let listed: Vec<Uuid> = ids.iter().copied().collect();
        let mut products = load_by_ids(
            connection,
            &self.table,
            COLUMNS,
            &listed,
            product_from_row,
            |view: &ProductView| view.id.as_uuid(),
        )
        .await?;

        // Rows whose text this batch writes. Only these are written whole; see
        // `update_figures`.
        let mut rewritten = BTreeSet::new();
        let mut last = 0;
        for event in events
            .iter()
            .filter(|event| event.aggregate_type == "product")
        {
            let id = aggregate_uuid(event)?;
            if !ids.contains(&id) {
                continue;
            }
            let change = event.decode::<ProductEvent>()?;
            if matches!(change, ProductEvent::ProductDetailsUpdated { .. }) {
                rewritten.insert(id);
            }
            last = event.position;
            fold(&mut products, event, id, change)?;
        }
        let (whole, figures): (Vec<&ProductView>, Vec<&ProductView>) = products
            .values()
            .partition(|product| rewritten.contains(&product.id.as_uuid()));
        if !whole.is_empty() {
            self.upsert(&mut *connection, whole).await?;
        }
        if !figures.is_empty() {
            self.update_figures(connection, figures, last).await?;
        }
        Ok(())
    }

    /// Writes the price, stock, status and version of refolded products whose sku, name
    /// and description this batch leaves as they are. The row's stored search vector is
    /// computed from name and description, and Postgres recomputes it on every statement
    /// that sets either of them, even to the same text; an upsert also computes it for
    /// the row it proposes to insert. Leaving them out of the statement made replaying a
    /// million events' stock movements about three times cheaper in the database; `patch`
    /// leaves them out for the same reason.
    async fn update_figures(
        &self,
        connection: &mut PgConnection,
        products: Vec<&ProductView>,
        position: i64,
    ) -> Result<(), ApplyError> {
        let mut columns = ProductColumns::default();
        for product in &products {
            columns.push_figures(product);
        }
        let updated = sqlx::query(&format!(
            "UPDATE {} AS p SET price_amount = u.price_amount, \
                 price_currency = u.price_currency, stock_available = u.stock_available, \
                 stock_reserved = u.stock_reserved, status = u.status, \
                 updated_at = u.updated_at, version = u.version \
             FROM UNNEST($1::uuid[], $2::bigint[], $3::text[], $4::bigint[], $5::bigint[], \
                         $6::text[], $7::timestamptz[], $8::bigint[]) \
                  AS u(id, price_amount, price_currency, stock_available, stock_reserved, \
                       status, updated_at, version) \
             WHERE p.id = u.id",
            self.table
        ))
        .bind(columns.id)
        .bind(columns.price_amount)
        .bind(columns.price_currency)
        .bind(columns.stock_available)
        .bind(columns.stock_reserved)
        .bind(columns.status)
        .bind(columns.updated_at)
        .bind(columns.version)
        .execute(connection)
        .await?
        .rows_affected();
        // Every one of these rows was read in this transaction, by the read model's only
        // writer: one missing means the table was changed behind its back.
        if updated != products.len() as u64 {
            return Err(ApplyError::Invariant {
                position,
                reason: format!(
                    "{} of {} product rows read for this batch are gone from {}",
                    products.len() as u64 - updated.min(products.len() as u64),
                    products.len(),
                    self.table
                ),
            });
        }
        Ok(())
    }

    async fn upsert(
        &self,
        connection: &mut PgConnection,
        products: Vec<&ProductView>,
    ) -> Result<(), ApplyError> {
        let mut columns = ProductColumns::default();
        for product in products {
            columns.push_figures(product);
            columns.sku.push(product.sku.clone());
            columns.name.push(product.name.clone());
            columns.description.push(product.description.clone());
            columns.created_at.push(product.created_at);
        }
        sqlx::query(&format!(
            "INSERT INTO {} ({COLUMNS}) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bigint[], \
                                  $6::text[], $7::bigint[], $8::bigint[], $9::text[], \
                                  $10::timestamptz[], $11::timestamptz[], $12::bigint[]) \
             ON CONFLICT (id) DO UPDATE SET sku = EXCLUDED.sku, name = EXCLUDED.name, \
                 description = EXCLUDED.description, price_amount = EXCLUDED.price_amount, \
                 price_currency = EXCLUDED.price_currency, \
                 stock_available = EXCLUDED.stock_available, \
                 stock_reserved = EXCLUDED.stock_reserved, status = EXCLUDED.status, \
                 created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, \
                 version = EXCLUDED.version",
            self.table
        ))
        .bind(columns.id)
        .bind(columns.sku)
        .bind(columns.name)
        .bind(columns.description)
        .bind(columns.price_amount)
        .bind(columns.price_currency)
        .bind(columns.stock_available)
        .bind(columns.stock_reserved)
        .bind(columns.status)
        .bind(columns.created_at)
        .bind(columns.updated_at)
        .bind(columns.version)
        .execute(connection)
        .await?;
        Ok(())
    }
}

#[derive(Default)]
struct ProductColumns {
    id: Vec<Uuid>,
    sku: Vec<String>,
    name: Vec<String>,
    description: Vec<String>,
    price_amount: Vec<i64>,
    price_currency: Vec<&'static str>,
    stock_available: Vec<i64>,
    stock_reserved: Vec<i64>,
    status: Vec<&'static str>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    version: Vec<i64>,
}

impl ProductColumns {
    /// The id and the columns that change without the product's text.
    fn push_figures(&mut self, product: &ProductView) {
        self.id.push(product.id.as_uuid());
        self.price_amount.push(product.price.amount());
        self.price_currency.push(product.price.currency().as_str());
        self.stock_available.push(product.stock_available);
        self.stock_reserved.push(product.stock_reserved);
        self.status.push(product.status.as_str());
        self.updated_at.push(product.updated_at);
        self.version.push(product.version);
    }
}

/// What a batch does to a product it did not create, to be applied to the stored row
/// in place.
struct Patch {
    /// Units the batch added to the available stock (negative: took from it).
    available: i64,
    /// Units the batch added to the reserved stock.
    reserved: i64,
    /// The least available stock the row must hold for none of the batch's movements to
    /// take it below zero. Below that, the aggregate's arithmetic (which stops at zero)
    /// and a sum part ways, and the product is refolded event by event instead. The
    /// aggregate never lets it happen; the read model does not rely on that.
    need_available: i64,
    /// The same for the reserved stock.
    need_reserved: i64,
    price: Option<Money>,
    discontinued: bool,
    name: Option<String>,
    description: Option<String>,
    updated_at: DateTime<Utc>,
    version: i64,
}

impl page::Patch<ProductEvent> for Patch {
    fn new(event: &StoredEvent) -> Self {
        Self {
            available: 0,
            reserved: 0,
            need_available: 0,
            need_reserved: 0,
            price: None,
            discontinued: false,
            name: None,
            description: None,
            updated_at: event.recorded_at,
            version: event.sequence,
        }
    }

    /// Its stock arithmetic is `fold`'s, given a row holding at least the `need_` figures.
    fn add(&mut self, event: &StoredEvent, change: ProductEvent) {
        let units = |quantity: hindsight_domain::values::Quantity| i64::from(quantity.get());
        match change {
            // Never here: `apply_events` folds the products a batch creates.
            ProductEvent::ProductCreated { .. } => {}
            ProductEvent::ProductDetailsUpdated { name, description } => {
                if let Some(name) = name {
                    self.name = Some(name.as_str().to_owned());
                }
                if let Some(description) = description {
                    self.description = Some(description.as_str().to_owned());
                }
            }
            ProductEvent::ProductPriceChanged { price } => self.price = Some(price),
            ProductEvent::ProductRestocked { quantity } => {
                self.available = self.available.saturating_add(units(quantity));
            }
            ProductEvent::StockReserved { quantity, .. } => {
                let units = units(quantity);
                self.need_available = self.need_available.max(units - self.available);
                self.available -= units;
                self.reserved += units;
            }
            ProductEvent::StockReleased { quantity, .. } => {
                let units = units(quantity);
                self.need_reserved = self.need_reserved.max(units - self.reserved);
                self.reserved -= units;
                self.available += units;
            }
            ProductEvent::ReservationCommitted { quantity, .. } => {
                let units = units(quantity);
                self.need_reserved = self.need_reserved.max(units - self.reserved);
                self.reserved -= units;
            }
            ProductEvent::ProductDiscontinued => self.discontinued = true,
        }
        self.updated_at = event.recorded_at;
        self.version = event.sequence;
    }
}

#[derive(Default)]
struct PatchColumns {
    id: Vec<Uuid>,
    available: Vec<i64>,
    reserved: Vec<i64>,
    need_available: Vec<i64>,
    need_reserved: Vec<i64>,
    price_amount: Vec<Option<i64>>,
    price_currency: Vec<Option<&'static str>>,
    status: Vec<Option<&'static str>>,
    updated_at: Vec<DateTime<Utc>>,
    version: Vec<i64>,
    name: Vec<Option<String>>,
    description: Vec<Option<String>>,
}

impl PatchColumns {
    fn push(&mut self, id: Uuid, patch: Patch) {
        self.id.push(id);
        self.available.push(patch.available);
        self.reserved.push(patch.reserved);
        self.need_available.push(patch.need_available);
        self.need_reserved.push(patch.need_reserved);
        self.price_amount
            .push(patch.price.as_ref().map(|price| price.amount()));
        self.price_currency
            .push(patch.price.as_ref().map(|price| price.currency().as_str()));
        self.status.push(
            patch
                .discontinued
                .then_some(ProductStatus::Discontinued.as_str()),
        );
        self.updated_at.push(patch.updated_at);
        self.version.push(patch.version);
        self.name.push(patch.name);
        self.description.push(patch.description);
    }
}

/// Folds one event the way the product aggregate does, including its stock arithmetic.
fn fold(
    products: &mut BTreeMap<Uuid, ProductView>,
    event: &StoredEvent,
    id: Uuid,
    change: ProductEvent,
) -> Result<(), ApplyError> {
    if let ProductEvent::ProductCreated {
        sku,
        name,
        description,
        price,
        stock,
        ..
    } = change
    {
        products.insert(
            id,
            ProductView {
                id: ProductId::from_uuid(id),
                sku: sku.as_str().to_owned(),
                name: name.as_str().to_owned(),
                description: description.as_str().to_owned(),
                price,
                stock_available: i64::from(stock),
                stock_reserved: 0,
                status: ProductStatus::Active,
                created_at: event.recorded_at,
                updated_at: event.recorded_at,
                version: event.sequence,
            },
        );
        return Ok(());
    }
    let product = products.get_mut(&id).ok_or_else(|| ApplyError::Invariant {
        position: event.position,
        reason: format!(
            "{} for product {id}, which was never created",
            event.event_type
        ),
    })?;
    let units = |quantity: hindsight_domain::values::Quantity| i64::from(quantity.get());
    match change {
        ProductEvent::ProductCreated { .. } => {}
        ProductEvent::ProductDetailsUpdated { name, description } => {
            if let Some(name) = name {
                product.name = name.as_str().to_owned();
            }
            if let Some(description) = description {
                product.description = description.as_str().to_owned();
            }
        }
        ProductEvent::ProductPriceChanged { price } => product.price = price,
        ProductEvent::ProductRestocked { quantity } => {
            product.stock_available = product.stock_available.saturating_add(units(quantity));
        }
        ProductEvent::StockReserved { quantity, .. } => {
            product.stock_available = (product.stock_available - units(quantity)).max(0);
            product.stock_reserved = product.stock_reserved.saturating_add(units(quantity));
        }
        ProductEvent::StockReleased { quantity, .. } => {
            product.stock_reserved = (product.stock_reserved - units(quantity)).max(0);
            product.stock_available = product.stock_available.saturating_add(units(quantity));
        }
        ProductEvent::ReservationCommitted { quantity, .. } => {
            product.stock_reserved = (product.stock_reserved - units(quantity)).max(0);
        }
        ProductEvent::ProductDiscontinued => product.status = ProductStatus::Discontinued,
    }
    product.updated_at = event.recorded_at;
    product.version = event.sequence;
    Ok(())
}

impl ReadModel for Products {
    fn name(&self) -> &'static str {
        "products"
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

fn product_from_row(row: &PgRow) -> Result<ProductView, sqlx::Error> {
    let currency: String = row.try_get("price_currency")?;
    let status: String = row.try_get("status")?;
    Ok(ProductView {
        id: ProductId::from_uuid(row.try_get("id")?),
        sku: row.try_get("sku")?,
        name: row.try_get("name")?,
        description: row.try_get("description")?,
        price: money_from_columns(row.try_get("price_amount")?, &currency, "price_currency")?,
        stock_available: row.try_get("stock_available")?,
        stock_reserved: row.try_get("stock_reserved")?,
        status: status
            .parse()
            .map_err(|error| column_error("status", error))?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
    })
}

/// One product by id.
pub async fn get<'e>(
    executor: impl PgExecutor<'e>,
    id: ProductId,
) -> Result<Option<ProductView>, QueryError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM {TABLE} WHERE id = $1"))
        .bind(id.as_uuid())
        .fetch_optional(executor)
        .await?;
    Ok(row.as_ref().map(product_from_row).transpose()?)
}

/// The text query `q` stands for: plain words all match, each also as a prefix, so a
/// search box finds "green tea" while it is being typed; anything with punctuation or an
/// `or` is read as a web search. `None` for a blank `q`.
fn text_search(q: &str) -> Option<(&'static str, String)> {
    // Control characters (a NUL above all) are not text Postgres accepts.
    let q: String = q.chars().filter(|c| !c.is_control()).collect();
    let q = q.trim();
    if q.is_empty() {
        return None;
    }
    let plain = q.chars().all(|c| c.is_alphanumeric() || c.is_whitespace())
        && !q
            .split_whitespace()
            .any(|word| word.eq_ignore_ascii_case("or"));
    if plain {
        // Only letters and digits reach `to_tsquery`, so no word can be read as an operator.
        let prefixes: Vec<String> = q
            .split_whitespace()
            .map(|word| format!("{word}:*"))
            .collect();
        return Some(("to_tsquery('simple', ", prefixes.join(" & ")));
    }
    Some(("websearch_to_tsquery('simple', ", q.to_owned()))
}

/// Appends the keyset condition that continues after `after` in the given direction.
fn push_after<'a, K>(
    query: &mut QueryBuilder<'a, Postgres>,
    column: &str,
    descending: bool,
    after: Option<(K, Uuid)>,
) where
    K: 'a + Encode<'a, Postgres> + Type<Postgres> + Send,
{
    if let Some((key, id)) = after {
        let comparison = if descending { "<" } else { ">" };
        query
            .push(format!(" AND ({column}, id) {comparison} ("))
            .push_bind(key)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
}

/// Products matching `filter`, in `sort` order.
pub async fn list<'e>(
    executor: impl PgExecutor<'e>,
    filter: &ProductFilter,
    sort: ProductSort,
    page: &PageRequest,
) -> Result<Page<ProductView>, QueryError> {
    let tag = CursorTag::new("products", sort.as_str(), filter);

    let mut query =
        QueryBuilder::<Postgres>::new(format!("SELECT {COLUMNS} FROM {TABLE} WHERE TRUE"));
    if let Some((function, text)) = filter.q.as_deref().and_then(text_search) {
        query
            .push(" AND search @@ ")
            .push(function)
            .push_bind(text)
            .push(")");
    }
    if let Some(status) = filter.status {
        query.push(" AND status = ").push_bind(status.as_str());
    }
    if let Some(min_price) = filter.min_price {
        query.push(" AND price_amount >= ").push_bind(min_price);
    }
    if let Some(max_price) = filter.max_price {
        query.push(" AND price_amount <= ").push_bind(max_price);
    }
    let (column, descending) = match sort {
        ProductSort::Name => {
            push_after(
                &mut query,
                "name",
                false,
                tag.resume::<(String, Uuid)>(page)?,
            );
            ("name", false)
        }
        ProductSort::PriceAscending | ProductSort::PriceDescending => {
            let descending = sort == ProductSort::PriceDescending;
            let after = tag.resume::<(i64, Uuid)>(page)?;
            push_after(&mut query, "price_amount", descending, after);
            ("price_amount", descending)
        }
        ProductSort::CreatedAtAscending | ProductSort::CreatedAtDescending => {
            let descending = sort == ProductSort::CreatedAtDescending;
            let after = tag.resume::<(DateTime<Utc>, Uuid)>(page)?;
            push_after(&mut query, "created_at", descending, after);
            ("created_at", descending)
        }
    };
    let direction = if descending { "DESC" } else { "ASC" };
    query
        .push(format!(
            " ORDER BY {column} {direction}, id {direction} LIMIT "
        ))
        .push_bind(page.fetch_limit());

    let rows = query.build().fetch_all(executor).await?;
    let products = rows
        .iter()
        .map(product_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    match sort {
        ProductSort::Name => tag.page(products, page, |p| (p.name.clone(), p.id.as_uuid())),
        ProductSort::PriceAscending | ProductSort::PriceDescending => {
            tag.page(products, page, |p| (p.price.amount(), p.id.as_uuid()))
        }
        ProductSort::CreatedAtAscending | ProductSort::CreatedAtDescending => {
            tag.page(products, page, |p| (p.created_at, p.id.as_uuid()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_parse_from_their_query_spelling() {
        for sort in ProductSort::ALL {
            assert_eq!(sort.as_str().parse::<ProductSort>(), Ok(sort));
        }
        assert_eq!("price desc".parse::<ProductSort>(), Err(UnknownSort));
        assert_eq!(ProductSort::default(), ProductSort::CreatedAtAscending);
    }

    #[test]
    fn plain_words_search_as_prefixes_and_the_rest_as_a_web_search() {
        assert_eq!(text_search("  \u{0}\n "), None);
        assert_eq!(
            text_search(" green \u{0} Te "),
            Some(("to_tsquery('simple', ", "green:* & Te:*".to_owned()))
        );
        assert_eq!(
            text_search("tea -green"),
            Some(("websearch_to_tsquery('simple', ", "tea -green".to_owned()))
        );
        assert_eq!(
            text_search("tea OR coffee"),
            Some((
                "websearch_to_tsquery('simple', ",
                "tea OR coffee".to_owned()
            ))
        );
        assert_eq!(
            text_search("it's"),
            Some(("websearch_to_tsquery('simple', ", "it's".to_owned()))
        );
    }
}
