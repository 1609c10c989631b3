//! `/users`: the caller's own profile and password, and user administration.

use axum::extract::State;
use axum::http::Method;
use axum::Json;
use hindsight_commands::{EventMetadata, Executed};
use hindsight_domain::ids::UserId;
use hindsight_domain::role::Role;
use hindsight_domain::user::{PasswordHash, UserCommand, UserStatus};
use hindsight_domain::values::PersonName;
use hindsight_projections::page::Page;
use hindsight_projections::schema::{RoleSchema, UserStatusSchema};
use hindsight_projections::users::{self, UserFilter, UserView};
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::auth::{access_of, AuthUser};
use crate::error::ApiError;
use crate::extract::{
    ApiJson, ApiPath, ApiQuery, CommandAnswer, IfMatch, MinPosition, NoFields, Paging, ReadAnswer,
};
use crate::request_id::RequestId;
use crate::routes::auth::revoke_user_sessions;
use crate::routes::support::{actor, metadata, user_view_from_store, Fields};
use crate::routes::Routes;
use crate::state::AppState;

const PROJECTION: &str = "users";

pub fn routes(routes: Routes) -> Routes {
    routes
        .add(Method::GET, "/users/me", me)
        .add(Method::PATCH, "/users/me", rename_me)
        .add(Method::POST, "/users/me/password", change_password)
        .add(Method::GET, "/users", list)
        .add(Method::GET, "/users/{id}", one)
        .add(Method::PUT, "/users/{id}/role", assign_role)
        .add(Method::POST, "/users/{id}/deactivate", deactivate)
        .add(Method::POST, "/users/{id}/reactivate", reactivate)
}

async fn read_one(
    state: &AppState,
    id: Uuid,
    at: MinPosition,
) -> Result<ReadAnswer<UserView>, ApiError> {
    let position = at.wait(state, PROJECTION).await?;
    let mut connection = state.lend().await?;
    let user = users::get(&mut *connection, UserId::from_uuid(id)).await;
    let user = connection.give_back(user)?.ok_or(ApiError::NotFound)?;
    Ok(ReadAnswer {
        version: Some(user.version),
        body: user,
        projection_position: position,
    })
}

async fn me(
    State(state): State<AppState>,
    user: AuthUser,
    ApiQuery(at): ApiQuery<MinPosition>,
) -> Result<ReadAnswer<UserView>, ApiError> {
    read_one(&state, user.id, at).await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RenameRequest {
    name: String,
}

/// Runs `command` on user `id`. Whatever the outcome, this process then forgets the
/// user's access, so a role, password or status change holds for the very next request,
/// not from when this process hears the database announce it.
async fn run(
    state: &AppState,
    id: Uuid,
    command: UserCommand,
    metadata: &EventMetadata,
    expected: Option<u64>,
) -> Result<Executed, ApiError> {
    let executed = state
        .commands
        .users
        .execute(id, command, metadata, expected)
        .await;
    state.access.forget(id);
    Ok(executed??)
}

async fn execute(
    state: &AppState,
    caller: &AuthUser,
    request_id: &RequestId,
    id: Uuid,
    command: UserCommand,
    expected: IfMatch,
) -> Result<CommandAnswer, ApiError> {
    let executed = run(
        state,
        id,
        command,
        &metadata(actor(caller), request_id),
        expected.0,
    )
    .await?;
    let view = user_view_from_store(state, id).await?;
    let body = serde_json::to_value(view).map_err(ApiError::internal)?;
    Ok(CommandAnswer::ok(body, executed.position))
}

async fn rename_me(
    State(state): State<AppState>,
    user: AuthUser,
    request_id: RequestId,
    expected: IfMatch,
    ApiJson(body): ApiJson<RenameRequest>,
) -> Result<CommandAnswer, ApiError> {
    let mut fields = Fields::default();
    let name = fields.check("name", PersonName::parse(&body.name));
    fields.finish()?;
    let name = name.ok_or_else(|| ApiError::internal("validated name missing"))?;
    execute(
        &state,
        &user,
        &request_id,
        user.id,
        UserCommand::ChangeName { name },
        expected,
    )
    .await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PasswordRequest {
    current_password: String,
    /// 8 to 128 characters.
    #[schema(min_length = 8, max_length = 128)]
    new_password: String,
}

async fn change_password(
    State(state): State<AppState>,
    user: AuthUser,
    request_id: RequestId,
    ApiJson(body): ApiJson<PasswordRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let loaded = state
        .commands
        .users
        .load(user.id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let current = loaded
        .state
        .password_hash()
        .map(|hash| hash.as_str().to_owned());
    let matches = state
        .passwords
        .verify(
            &SecretString::from(body.current_password),
            current.as_deref(),
        )
        .await
        .map_err(ApiError::internal)?;
    if !matches {
        return Err(ApiError::validation(
            "current_password",
            "is not the current password",
        ));
    }
    let hash = state
        .passwords
        .hash(&SecretString::from(body.new_password))
        .await
        .map_err(|_| ApiError::validation("new_password", "must be 8 to 128 characters"))?;
    let executed = run(
        &state,
        user.id,
        UserCommand::ChangePasswordHash {
            password_hash: PasswordHash::new(hash).map_err(ApiError::internal)?,
        },
        &metadata(actor(&user), &request_id),
        None,
    )
    .await?;
    // The store bumped the token version with the event: every older access token is
    // dead. End the refresh families too, then hand out a fresh pair.
    revoke_user_sessions(&state, user.id).await?;
    let access = access_of(&state.pool, user.id)
        .await?
        .ok_or(ApiError::Unauthenticated)?;
    let pair = state
        .tokens
        .issue_pair(
            &state.pool,
            user.id,
            access.role,
            access.token_version,
            None,
        )
        .await?;
    let mut body = serde_json::to_value(pair).map_err(ApiError::internal)?;
    body["position"] = json!(executed.position);
    Ok(Json(body))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    #[param(value_type = Option<RoleSchema>)]
    role: Option<Role>,
    #[param(value_type = Option<UserStatusSchema>)]
    status: Option<UserStatus>,
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
) -> Result<ReadAnswer<Page<UserView>>, ApiError> {
    let page = Paging::page(query.limit, query.cursor)?;
    let position = MinPosition::at(query.min_position)
        .wait(&state, PROJECTION)
        .await?;
    let filter = UserFilter {
        role: query.role,
        status: query.status,
    };
    let mut connection = state.lend().await?;
    let users = users::list(&mut *connection, &filter, &page).await;
    let users = connection.give_back(users)?;
    Ok(ReadAnswer {
        body: users,
        projection_position: position,
        version: None,
    })
}

async fn one(
    State(state): State<AppState>,
    user: AuthUser,
    ApiPath(id): ApiPath<Uuid>,
    ApiQuery(at): ApiQuery<MinPosition>,
) -> Result<ReadAnswer<UserView>, ApiError> {
    let may_read = matches!(user.role, Role::Admin | Role::Auditor) || user.id == id;
    if !may_read {
        return Err(ApiError::NotFound);
    }
    read_one(&state, id, at).await
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RoleRequest {
    #[schema(value_type = RoleSchema)]
    role: Role,
}

async fn assign_role(
    State(state): State<AppState>,
    user: AuthUser,
    request_id: RequestId,
    ApiPath(id): ApiPath<Uuid>,
    expected: IfMatch,
    ApiJson(body): ApiJson<RoleRequest>,
) -> Result<CommandAnswer, ApiError> {
    execute(
        &state,
        &user,
        &request_id,
        id,
        UserCommand::AssignRole { role: body.role },
        expected,
    )
    .await
}

async fn deactivate(
    State(state): State<AppState>,
    user: AuthUser,
    request_id: RequestId,
    ApiPath(id): ApiPath<Uuid>,
    expected: IfMatch,
    _body: NoFields,
) -> Result<CommandAnswer, ApiError> {
    let answer = execute(
        &state,
        &user,
        &request_id,
        id,
        UserCommand::Deactivate,
        expected,
    )
    .await?;
    revoke_user_sessions(&state, id).await?;
    Ok(answer)
}

async fn reactivate(
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
        UserCommand::Reactivate,
        expected,
    )
    .await
}
