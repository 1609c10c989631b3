//! The `users` read model: one row per user as the API shows it. The password hash a
//! user event may carry is never stored here.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use hindsight_commands::StoredEvent;
use hindsight_domain::ids::UserId;
use hindsight_domain::role::Role;
use hindsight_domain::user::{UserEvent, UserStatus};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgExecutor, Postgres, QueryBuilder, Row};
use uuid::Uuid;

use crate::page::{
    aggregate_uuid, column_error, existing_ids, load_by_ids, table_name, CursorTag, Page,
    PageRequest, QueryError,
};
use crate::read_model::{ApplyError, ReadModel};

const TABLE: &str = "user_views";
const COLUMNS: &str = "id, email, name, role, status, created_at, updated_at, version";

/// A user as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserView {
    #[schema(value_type = Uuid)]
    pub id: UserId,
    /// The address as registered, lower-cased.
    pub email: String,
    pub name: String,
    #[schema(value_type = crate::schema::RoleSchema)]
    pub role: Role,
    #[schema(value_type = crate::schema::UserStatusSchema)]
    pub status: UserStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The sequence of the user's last event.
    pub version: i64,
}

/// Which users a list shows; `None` matches any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserFilter {
    pub role: Option<Role>,
    pub status: Option<UserStatus>,
}

/// The `users` projection.
#[derive(Debug, Clone)]
pub struct Users {
    table: String,
}

impl Users {
    /// Writes the live table.
    pub fn live() -> Self {
        Self::with_suffix("")
    }

    /// Writes `user_views<suffix>`, a copy a rebuild fills before it is swapped in.
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
        for event in events.iter().filter(|event| event.aggregate_type == "user") {
            changes.push((event, aggregate_uuid(event)?, event.decode::<UserEvent>()?));
        }
        if changes.is_empty() {
            return Ok(());
        }

        let ids = existing_ids(&changes, |change| {
            matches!(change, UserEvent::UserRegistered { .. })
        });
        let mut users = load_by_ids(
            connection,
            &self.table,
            COLUMNS,
            &ids,
            user_from_row,
            |view: &UserView| view.id.as_uuid(),
        )
        .await?;

        for (event, id, change) in changes {
            fold(&mut users, event, id, change)?;
        }
        self.upsert(connection, users.values()).await
    }

    async fn upsert<'u>(
        &self,
        connection: &mut PgConnection,
        users: impl Iterator<Item = &'u UserView>,
    ) -> Result<(), ApplyError> {
        let mut columns = UserColumns::default();
        for user in users {
            columns.id.push(user.id.as_uuid());
            columns.email.push(user.email.clone());
            columns.name.push(user.name.clone());
            columns.role.push(user.role.as_str());
            columns.status.push(user.status.as_str());
            columns.created_at.push(user.created_at);
            columns.updated_at.push(user.updated_at);
            columns.version.push(user.version);
        }
        sqlx::query(&format!(
            "INSERT INTO {} ({COLUMNS}) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], \
                                  $6::timestamptz[], $7::timestamptz[], $8::bigint[]) \
             ON CONFLICT (id) DO UPDATE SET email = EXCLUDED.email, name = EXCLUDED.name, \
                 role = EXCLUDED.role, status = EXCLUDED.status, \
                 created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at, \
                 version = EXCLUDED.version",
            self.table
        ))
        .bind(columns.id)
        .bind(columns.email)
        .bind(columns.name)
        .bind(columns.role)
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
struct UserColumns {
    id: Vec<Uuid>,
    email: Vec<String>,
    name: Vec<String>,
    role: Vec<&'static str>,
    status: Vec<&'static str>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    version: Vec<i64>,
}

fn fold(
    users: &mut BTreeMap<Uuid, UserView>,
    event: &StoredEvent,
    id: Uuid,
    change: UserEvent,
) -> Result<(), ApplyError> {
    if let UserEvent::UserRegistered {
        email, name, role, ..
    } = change
    {
        users.insert(
            id,
            UserView {
                id: UserId::from_uuid(id),
                email: email.as_str().to_owned(),
                name: name.as_str().to_owned(),
                role,
                status: UserStatus::Active,
                created_at: event.recorded_at,
                updated_at: event.recorded_at,
                version: event.sequence,
            },
        );
        return Ok(());
    }
    let user = users.get_mut(&id).ok_or_else(|| ApplyError::Invariant {
        position: event.position,
        reason: format!(
            "{} for user {id}, which was never registered",
            event.event_type
        ),
    })?;
    match change {
        UserEvent::UserRegistered { .. } | UserEvent::UserPasswordChanged { .. } => {}
        UserEvent::UserNameChanged { name } => user.name = name.as_str().to_owned(),
        UserEvent::UserRoleAssigned { role } => user.role = role,
        UserEvent::UserDeactivated => user.status = UserStatus::Deactivated,
        UserEvent::UserReactivated => user.status = UserStatus::Active,
    }
    user.updated_at = event.recorded_at;
    user.version = event.sequence;
    Ok(())
}

impl ReadModel for Users {
    fn name(&self) -> &'static str {
        "users"
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

fn user_from_row(row: &PgRow) -> Result<UserView, sqlx::Error> {
    let role: String = row.try_get("role")?;
    let status: String = row.try_get("status")?;
    Ok(UserView {
        id: UserId::from_uuid(row.try_get("id")?),
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        role: role.parse().map_err(|error| column_error("role", error))?,
        status: status
            .parse()
            .map_err(|error| column_error("status", error))?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        version: row.try_get("version")?,
    })
}

/// One user by id.
pub async fn get<'e>(
    executor: impl PgExecutor<'e>,
    id: UserId,
) -> Result<Option<UserView>, QueryError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM {TABLE} WHERE id = $1"))
        .bind(id.as_uuid())
        .fetch_optional(executor)
        .await?;
    Ok(row.as_ref().map(user_from_row).transpose()?)
}

/// Users matching `filter`, oldest first.
pub async fn list<'e>(
    executor: impl PgExecutor<'e>,
    filter: &UserFilter,
    page: &PageRequest,
) -> Result<Page<UserView>, QueryError> {
    let tag = CursorTag::new("users", "created_at", filter);
    let after: Option<(DateTime<Utc>, Uuid)> = tag.resume(page)?;

    let mut query =
        QueryBuilder::<Postgres>::new(format!("SELECT {COLUMNS} FROM {TABLE} WHERE TRUE"));
    if let Some(role) = filter.role {
        query.push(" AND role = ").push_bind(role.as_str());
    }
    if let Some(status) = filter.status {
        query.push(" AND status = ").push_bind(status.as_str());
    }
    if let Some((created_at, id)) = after {
        query
            .push(" AND (created_at, id) > (")
            .push_bind(created_at)
            .push(", ")
            .push_bind(id)
            .push(")");
    }
    query
        .push(" ORDER BY created_at, id LIMIT ")
        .push_bind(page.fetch_limit());

    let rows = query.build().fetch_all(executor).await?;
    let users = rows
        .iter()
        .map(user_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    tag.page(users, page, |user| (user.created_at, user.id.as_uuid()))
}
