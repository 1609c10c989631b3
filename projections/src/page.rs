//! Pagination and the plumbing every read model's queries share.
//!
//! Lists are keyset-paginated: a page is fetched with one row more than asked for, and
//! when that extra row exists the page's `next_cursor` carries the sort key of its last
//! row. The cursor is opaque to clients (URL-safe base64 of a small JSON document) and
//! tagged with the list, sort and filter it was made for, so a cursor taken from one
//! query and replayed against another is refused instead of silently skipping rows.

use std::collections::{BTreeMap, BTreeSet};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hindsight_commands::statements::StatementError;
use hindsight_commands::StoredEvent;
use hindsight_domain::values::{Currency, Money};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::read_model::ApplyError;

/// Why a read-model query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The cursor is malformed, or was made for another list, sort or filter.
    #[error("the cursor is not valid for this query")]
    InvalidCursor,
    #[error("read-model query failed: {0}")]
    Database(#[from] sqlx::Error),
}

impl StatementError for QueryError {
    fn leaves_connection_ready(&self) -> bool {
        match self {
            // Refused before any statement was sent.
            QueryError::InvalidCursor => true,
            QueryError::Database(error) => error.leaves_connection_ready(),
        }
    }
}

/// One page of a list, as the API answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Where the next page starts (opaque); `null` on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
}

/// A `limit` outside `1..=100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must be between 1 and {max}, not {limit}", max = PageRequest::MAX_LIMIT)]
pub struct LimitOutOfRange {
    pub limit: u32,
}

/// Which page of a list to answer: at most `limit` rows after `cursor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    limit: u32,
    cursor: Option<String>,
}

impl PageRequest {
    pub const DEFAULT_LIMIT: u32 = 20;
    pub const MAX_LIMIT: u32 = 100;

    /// A page request from the query string's `limit` and `cursor`; a missing limit is
    /// [`Self::DEFAULT_LIMIT`].
    pub fn new(limit: Option<u32>, cursor: Option<String>) -> Result<Self, LimitOutOfRange> {
        let limit = limit.unwrap_or(Self::DEFAULT_LIMIT);
        if !(1..=Self::MAX_LIMIT).contains(&limit) {
            return Err(LimitOutOfRange { limit });
        }
        Ok(Self { limit, cursor })
    }

    /// The first page with `limit` rows (clamped into `1..=100`).
    pub fn first(limit: u32) -> Self {
        Self {
            limit: limit.clamp(1, Self::MAX_LIMIT),
            cursor: None,
        }
    }

    /// The same page size, continuing after `cursor`.
    pub fn after(&self, cursor: impl Into<String>) -> Self {
        Self {
            limit: self.limit,
            cursor: Some(cursor.into()),
        }
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    pub fn cursor(&self) -> Option<&str> {
        self.cursor.as_deref()
    }

    /// How many rows a query fetches: one more than the page, to learn whether another
    /// page follows.
    pub(crate) fn fetch_limit(&self) -> i64 {
        i64::from(self.limit) + 1
    }
}

impl Default for PageRequest {
    fn default() -> Self {
        Self::first(Self::DEFAULT_LIMIT)
    }
}

/// Bumped whenever the cursor's layout changes, so old cursors are refused cleanly.
const CURSOR_VERSION: u8 = 1;
/// Longer input is not a cursor this module made; refused before any decoding work.
const MAX_CURSOR_LEN: usize = 2048;

#[derive(Serialize, Deserialize)]
struct CursorEnvelope<K> {
    v: u8,
    /// Which list, sort and filter the cursor belongs to.
    t: String,
    /// The last row's sort key.
    k: K,
}

/// Identifies one list query's ordering and filter for its cursors.
///
/// The filter is fingerprinted through its `Debug` form, which covers every field; a
/// cursor therefore only continues the exact query it was made for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CursorTag(String);

impl CursorTag {
    pub(crate) fn new(list: &str, sort: &str, filter: &impl std::fmt::Debug) -> Self {
        Self(format!(
            "{list}:{sort}:{:016x}",
            fnv1a(format!("{filter:?}").as_bytes())
        ))
    }

    pub(crate) fn encode<K: Serialize>(&self, key: &K) -> Result<String, QueryError> {
        let envelope = CursorEnvelope {
            v: CURSOR_VERSION,
            t: self.0.clone(),
            k: key,
        };
        let json = serde_json::to_vec(&envelope)
            .map_err(|error| QueryError::Database(sqlx::Error::Encode(Box::new(error))))?;
        Ok(URL_SAFE_NO_PAD.encode(json))
    }

    pub(crate) fn decode<K: DeserializeOwned>(&self, cursor: &str) -> Result<K, QueryError> {
        if cursor.len() > MAX_CURSOR_LEN {
            return Err(QueryError::InvalidCursor);
        }
        let json = URL_SAFE_NO_PAD
            .decode(cursor)
            .map_err(|_| QueryError::InvalidCursor)?;
        let envelope: CursorEnvelope<K> =
            serde_json::from_slice(&json).map_err(|_| QueryError::InvalidCursor)?;
        if envelope.v != CURSOR_VERSION || envelope.t != self.0 {
            return Err(QueryError::InvalidCursor);
        }
        Ok(envelope.k)
    }

    /// The key of the page a request continues from, if it has a cursor.
    pub(crate) fn resume<K: DeserializeOwned>(
        &self,
        page: &PageRequest,
    ) -> Result<Option<K>, QueryError> {
        page.cursor().map(|cursor| self.decode(cursor)).transpose()
    }

    /// Cuts an over-fetched result (see [`PageRequest::fetch_limit`]) to the page and
    /// makes the cursor of its last row when more rows follow.
    pub(crate) fn page<T, K: Serialize>(
        &self,
        mut rows: Vec<T>,
        page: &PageRequest,
        key: impl Fn(&T) -> K,
    ) -> Result<Page<T>, QueryError> {
        let limit = usize::try_from(page.limit()).unwrap_or(usize::MAX);
        if rows.len() <= limit {
            return Ok(Page {
                items: rows,
                next_cursor: None,
            });
        }
        rows.truncate(limit);
        let next_cursor = rows
            .last()
            .map(|last| self.encode(&key(last)))
            .transpose()?;
        Ok(Page {
            items: rows,
            next_cursor,
        })
    }
}

/// 64-bit FNV-1a: a tiny hash whose output is stable across builds and platforms.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

// Helpers shared by the read models' apply and row-decoding code.

/// A read model's table name for one instance: the live name, or a suffixed copy that a
/// rebuild fills. Only `[a-z0-9_]` of the suffix is kept, so it can never leave the
/// identifier it is appended to.
pub(crate) fn table_name(base: &str, suffix: &str) -> String {
    let suffix: String = suffix
        .chars()
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
        .collect();
    format!("{base}{suffix}")
}

/// The aggregate id of an event, which every Hindsight aggregate keeps as a UUID.
pub(crate) fn aggregate_uuid(event: &StoredEvent) -> Result<Uuid, ApplyError> {
    Uuid::parse_str(&event.aggregate_id).map_err(|_| ApplyError::Invariant {
        position: event.position,
        reason: format!("aggregate id {:?} is not a UUID", event.aggregate_id),
    })
}

/// The rows of `table` whose id is in `ids`, decoded and keyed by id; no query at all
/// when `ids` is empty. What a read model loads before folding a batch into it.
pub(crate) async fn load_by_ids<V>(
    connection: &mut sqlx::PgConnection,
    table: &str,
    columns: &str,
    ids: &[Uuid],
    from_row: fn(&sqlx::postgres::PgRow) -> Result<V, sqlx::Error>,
    id_of: fn(&V) -> Uuid,
) -> Result<std::collections::BTreeMap<Uuid, V>, ApplyError> {
    if ids.is_empty() {
        return Ok(std::collections::BTreeMap::new());
    }
    let rows = sqlx::query(&format!("SELECT {columns} FROM {table} WHERE id = ANY($1)"))
        .bind(ids)
        .fetch_all(&mut *connection)
        .await?;
    let loaded = rows
        .iter()
        .map(|row| from_row(row).map(|view| (id_of(&view), view)))
        .collect::<Result<_, _>>()?;
    Ok(loaded)
}

/// The aggregates a batch changes that existed before it: those whose rows must be
/// loaded before the batch is folded onto them (aggregates created within the batch start
/// from nothing).
pub(crate) fn existing_ids<T>(
    changes: &[(&StoredEvent, Uuid, T)],
    creates: impl Fn(&T) -> bool,
) -> Vec<Uuid> {
    let created: BTreeSet<Uuid> = changes
        .iter()
        .filter(|(_, _, change)| creates(change))
        .map(|(_, id, _)| *id)
        .collect();
    changes
        .iter()
        .map(|(_, id, _)| *id)
        .filter(|id| !created.contains(id))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// What a batch does to the row of an aggregate created before it, gathered event by
/// event to change the row in place, without reading it.
pub(crate) trait Patch<E> {
    /// A patch starting with `event`, which is then passed to [`Self::add`].
    fn new(event: &StoredEvent) -> Self;
    /// Adds one event, in order.
    fn add(&mut self, event: &StoredEvent, change: E);
}

/// A batch's changes split by aggregate.
pub(crate) struct Split<V, P> {
    /// The aggregates the batch creates, folded whole.
    pub(crate) whole: BTreeMap<Uuid, V>,
    /// The others, as patches to their rows.
    pub(crate) patches: BTreeMap<Uuid, P>,
}

/// Splits a batch's changes by aggregate: those the batch creates (`creates`) are folded
/// whole from their creation on (`fold`), the others gathered as patches.
pub(crate) fn fold_or_patch<E, V, P: Patch<E>>(
    changes: Vec<(&StoredEvent, Uuid, E)>,
    creates: impl Fn(&E) -> bool,
    fold: impl Fn(&mut BTreeMap<Uuid, V>, &StoredEvent, Uuid, E) -> Result<(), ApplyError>,
) -> Result<Split<V, P>, ApplyError> {
    let created: BTreeSet<Uuid> = changes
        .iter()
        .filter(|(_, _, change)| creates(change))
        .map(|(_, id, _)| *id)
        .collect();
    let mut whole = BTreeMap::new();
    let mut patches: BTreeMap<Uuid, P> = BTreeMap::new();
    for (event, id, change) in changes {
        if created.contains(&id) {
            fold(&mut whole, event, id, change)?;
        } else {
            patches
                .entry(id)
                .or_insert_with(|| P::new(event))
                .add(event, change);
        }
    }
    Ok(Split { whole, patches })
}

/// A column that holds text the read model wrote but that no longer parses.
pub(crate) fn column_error(
    column: &str,
    error: impl std::error::Error + Send + Sync + 'static,
) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: Box::new(error),
    }
}

/// Money from its two columns.
pub(crate) fn money_from_columns(
    amount: i64,
    currency: &str,
    column: &str,
) -> Result<Money, sqlx::Error> {
    let currency = Currency::parse(currency).map_err(|error| column_error(column, error))?;
    Money::new(amount, currency).map_err(|error| column_error(column, error))
}

/// `amount` minor units of `currency` written for people, e.g. `59.97 EUR`.
pub(crate) fn format_money(money: &Money) -> String {
    let currency = money.currency().as_str();
    let digits = minor_unit_digits(currency);
    let amount = money.amount();
    if digits == 0 {
        return format!("{amount} {currency}");
    }
    let scale = 10_i64.pow(digits);
    format!(
        "{}.{:0width$} {currency}",
        amount / scale,
        amount % scale,
        width = digits as usize
    )
}

/// ISO 4217 minor-unit exponent of the currencies Hindsight accepts.
fn minor_unit_digits(currency: &str) -> u32 {
    match currency {
        "BIF" | "CLP" | "DJF" | "GNF" | "ISK" | "JPY" | "KMF" | "KRW" | "PYG" | "RWF" | "UGX"
        | "VND" | "VUV" | "XAF" | "XOF" | "XPF" => 0,
        "BHD" | "IQD" | "JOD" | "KWD" | "LYD" | "OMR" | "TND" => 3,
        _ => 2,
    }
}

/// `1 unit`, `5 units`.
pub(crate) fn units(count: u64) -> String {
    if count == 1 {
        "1 unit".to_owned()
    } else {
        format!("{count} units")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_only_for_its_own_query() {
        let tag = CursorTag::new("products", "price", &None::<&str>);
        let id = Uuid::from_u128(7);
        let cursor = tag.encode(&(1999_i64, id)).unwrap();
        assert!(cursor
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(tag.decode::<(i64, Uuid)>(&cursor).unwrap(), (1999, id));

        let other_sort = CursorTag::new("products", "-price", &None::<&str>);
        let other_filter = CursorTag::new("products", "price", &Some("active"));
        for tag in [other_sort, other_filter] {
            assert!(matches!(
                tag.decode::<(i64, Uuid)>(&cursor),
                Err(QueryError::InvalidCursor)
            ));
        }
        for garbage in ["", "!!!", "e30", &"A".repeat(5000)] {
            assert!(matches!(
                tag.decode::<(i64, Uuid)>(garbage),
                Err(QueryError::InvalidCursor)
            ));
        }
    }

    #[test]
    fn pages_are_cut_and_continued() {
        let tag = CursorTag::new("x", "y", &());
        let request = PageRequest::first(2);
        let page = tag.page(vec![1, 2, 3], &request, |n| *n).unwrap();
        assert_eq!(page.items, vec![1, 2]);
        assert_eq!(
            tag.decode::<i32>(page.next_cursor.as_deref().unwrap())
                .unwrap(),
            2
        );
        let last = tag.page(vec![1, 2], &request, |n| *n).unwrap();
        assert_eq!(last.next_cursor, None);
    }

    #[test]
    fn limits_outside_one_to_a_hundred_are_refused() {
        assert_eq!(PageRequest::new(None, None).unwrap().limit(), 20);
        assert_eq!(PageRequest::new(Some(100), None).unwrap().limit(), 100);
        assert_eq!(
            PageRequest::new(Some(0), None),
            Err(LimitOutOfRange { limit: 0 })
        );
        assert_eq!(
            PageRequest::new(Some(101), None),
            Err(LimitOutOfRange { limit: 101 })
        );
    }

    #[test]
    fn money_is_written_in_major_units() {
        let eur = |amount| Money::new(amount, Currency::EUR).unwrap();
        assert_eq!(format_money(&eur(5997)), "59.97 EUR");
        assert_eq!(format_money(&eur(5)), "0.05 EUR");
        assert_eq!(
            format_money(&Money::new(500, Currency::parse("JPY").unwrap()).unwrap()),
            "500 JPY"
        );
        assert_eq!(
            format_money(&Money::new(1234, Currency::parse("KWD").unwrap()).unwrap()),
            "1.234 KWD"
        );
    }

    #[test]
    fn suffixes_cannot_leave_the_identifier() {
        assert_eq!(table_name("users", "_rebuild_1"), "users_rebuild_1");
        assert_eq!(table_name("users", "; DROP TABLE x"), "usersx");
    }
}
