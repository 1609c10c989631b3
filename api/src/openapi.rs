//! The OpenAPI 3.1 document of the API, generated from the code and served at
//! `GET /api/v1/openapi.json`: the machine-readable form of the contract.
//!
//! The paths are the router's own table ([`routes::table`]), so every route that is
//! served is documented and nothing else is; who may call each comes from
//! [`policy::rule`] (the `bearerAuth` scheme unless anyone may); request and response
//! bodies come from the types the handlers read and write (`utoipa::ToSchema`). What the
//! router cannot know about a route (its summary, the body it reads, what it answers,
//! which rules can refuse it) is its entry in [`operations`]. The conventions every route
//! shares (`X-Request-Id`, positions, `Idempotency-Key`, `If-Match`, the one error
//! envelope and its codes) are stated once here and applied by the kind of the route.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::http::{header, Method};
use axum::response::{IntoResponse, Response};
use hindsight_commands::history::MAX_FEED_LIMIT;
use hindsight_domain::role::Role;
use hindsight_projections::audit_trail::AuditEntry;
use hindsight_projections::orders::OrderView;
use hindsight_projections::page::Page;
use hindsight_projections::products::ProductView;
use hindsight_projections::schema::{
    ActorRoleSchema, AggregateTypeSchema, MoneySchema, OrderStatusSchema, ProductSortSchema,
    ProductStatusSchema, ProjectionStateSchema, QuantitySchema, RoleSchema, UserStatusSchema,
};
use hindsight_projections::status::{self, ProjectionStatus};
use hindsight_projections::users::UserView;
use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{
    HttpMethod, Operation, OperationBuilder, Parameter, ParameterBuilder, ParameterIn,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::{Response as ApiResponse, ResponseBuilder};
use utoipa::openapi::schema::{
    AdditionalProperties, AllOfBuilder, ArrayBuilder, ComponentsBuilder, KnownFormat,
    ObjectBuilder, Ref, Schema, SchemaFormat, Type,
};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::tag::TagBuilder;
use utoipa::openapi::{InfoBuilder, OpenApi, OpenApiBuilder, Paths, RefOr, Required};
use utoipa::{IntoParams, PartialSchema, ToSchema};

use crate::error::ApiError;
use crate::extract::MinPosition;
use crate::policy::{self, Access};
use crate::routes::{self, admin, auth, health, orders, products, users};

/// `GET /api/v1/openapi.json`: the document, built once.
pub async fn serve() -> Result<Response, ApiError> {
    static DOCUMENT: OnceLock<Result<String, String>> = OnceLock::new();
    let document = DOCUMENT
        .get_or_init(|| serde_json::to_string(&document()).map_err(|error| error.to_string()));
    match document {
        Ok(json) => Ok((
            [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
            json.clone(),
        )
            .into_response()),
        Err(error) => Err(ApiError::internal(error.clone())),
    }
}

// ---------------------------------------------------------------------------------------
// Error codes

/// The contract's error table: every code answered outside the business rules, with its
/// status and when.
pub const GENERAL_CODES: &[(u16, &str, &str)] = &[
    (
        400,
        "MALFORMED_REQUEST",
        "the body is not JSON or has the wrong types, or the query string or a header is malformed",
    ),
    (
        401,
        "UNAUTHENTICATED",
        "no, expired, revoked or invalid token; bad credentials",
    ),
    (
        403,
        "FORBIDDEN",
        "signed in, but the role does not allow this",
    ),
    (
        404,
        "NOT_FOUND",
        "no such resource, or one the caller may not know exists",
    ),
    (
        405,
        "METHOD_NOT_ALLOWED",
        "the route exists, the method does not",
    ),
    (
        409,
        "IDEMPOTENCY_KEY_IN_USE",
        "an earlier request with this `Idempotency-Key` is still being processed",
    ),
    (
        412,
        "VERSION_MISMATCH",
        "`If-Match` is stale; nothing was appended",
    ),
    (
        413,
        "PAYLOAD_TOO_LARGE",
        "the body is over the limit (default 64 KiB)",
    ),
    (
        415,
        "UNSUPPORTED_MEDIA_TYPE",
        "a non-empty body that is not JSON",
    ),
    (
        422,
        "VALIDATION_FAILED",
        "well-formed but invalid input; `details` names each field and why",
    ),
    (
        422,
        "IDEMPOTENCY_KEY_REUSED",
        "the `Idempotency-Key` was used for a different request, or is longer than 255 characters",
    ),
    (
        429,
        "RATE_LIMITED",
        "too many requests; retry after `Retry-After` seconds",
    ),
    (
        500,
        "INTERNAL",
        "an unexpected failure; the message never carries internal detail",
    ),
    (
        503,
        "PROJECTION_LAGGING",
        "the read model has not applied `min_position` within the wait; retry after `Retry-After`",
    ),
    (
        503,
        "UNAVAILABLE",
        "a dependency is down or the request took too long",
    ),
];

/// The user aggregate's rules (`UserError`).
pub const USER_RULES: &[&str] = &[
    "USER_NOT_FOUND",
    "USER_ALREADY_EXISTS",
    "USER_DEACTIVATED",
    "USER_NOT_DEACTIVATED",
];

/// The product aggregate's rules (`ProductError`).
pub const PRODUCT_RULES: &[&str] = &[
    "PRODUCT_NOT_FOUND",
    "PRODUCT_ALREADY_EXISTS",
    "PRICE_NOT_POSITIVE",
    "CURRENCY_MISMATCH",
    "PRODUCT_DISCONTINUED",
    "PRODUCT_ALREADY_DISCONTINUED",
    "INSUFFICIENT_STOCK",
    "RESERVATION_NOT_FOUND",
    "STOCK_OVERFLOW",
];

/// The order aggregate's rules (`OrderError`).
pub const ORDER_RULES: &[&str] = &[
    "ORDER_NOT_FOUND",
    "ORDER_ALREADY_EXISTS",
    "ORDER_EMPTY",
    "TOO_MANY_ORDER_LINES",
    "QUANTITY_OUT_OF_RANGE",
    "DUPLICATE_ORDER_LINE",
    "CURRENCY_MISMATCH",
    "AMOUNT_OVERFLOW",
    "ORDER_NOT_PENDING",
    "ORDER_NOT_CONFIRMED",
    "ORDER_ALREADY_PAID",
    "ORDER_NOT_PAID",
    "ORDER_ALREADY_SHIPPED",
    "ORDER_REJECTED",
    "ORDER_CANCELLED",
    "PAYMENT_AMOUNT_MISMATCH",
];

/// Rules whose refusal means "no such aggregate": answered 404 `NOT_FOUND`, not 409.
pub const NOT_FOUND_RULES: &[&str] = &["USER_NOT_FOUND", "PRODUCT_NOT_FOUND", "ORDER_NOT_FOUND"];

/// The event store's refusals besides `VERSION_MISMATCH` (412): a unique key already
/// taken, or concurrent writers that outlasted the retries.
pub const STORE_RULES: &[&str] = &["EMAIL_TAKEN", "SKU_TAKEN", "CONCURRENT_MODIFICATION"];

/// Refusals of operators' actions.
pub const OPERATOR_RULES: &[&str] = &["NOT_REBUILDABLE", "REBUILD_RUNNING"];

/// Every code an error can carry, general ones first, each once.
pub fn all_codes() -> Vec<&'static str> {
    let mut codes: Vec<&'static str> = GENERAL_CODES.iter().map(|(_, code, _)| *code).collect();
    for code in [
        USER_RULES,
        PRODUCT_RULES,
        ORDER_RULES,
        STORE_RULES,
        OPERATOR_RULES,
    ]
    .concat()
    {
        if !codes.contains(&code) {
            codes.push(code);
        }
    }
    codes
}

/// The 409 codes of a command: its rules (less those answered as 404), the store's
/// contention, and an `Idempotency-Key` still in use.
fn conflicts(rules: &[&[&'static str]]) -> Vec<&'static str> {
    let mut codes: Vec<&'static str> = Vec::new();
    for code in rules
        .concat()
        .into_iter()
        .chain(["CONCURRENT_MODIFICATION", "IDEMPOTENCY_KEY_IN_USE"])
    {
        if !NOT_FOUND_RULES.contains(&code) && !codes.contains(&code) {
            codes.push(code);
        }
    }
    codes
}

// ---------------------------------------------------------------------------------------
// Schemas

/// The component schemas the document refers to.
#[derive(Default)]
struct Schemas(BTreeMap<String, RefOr<Schema>>);

impl Schemas {
    /// Registers `T` and every schema it refers to.
    fn register<T: ToSchema>(&mut self) {
        let mut found = Vec::new();
        T::schemas(&mut found);
        self.0.insert(T::name().into_owned(), T::schema());
        self.0.extend(found);
    }

    /// A reference to `T`'s schema, registered.
    fn of<T: ToSchema>(&mut self) -> RefOr<Schema> {
        self.register::<T>();
        Ref::from_schema_name(T::name()).into()
    }
}

fn integer() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
}

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

fn uuid() -> ObjectBuilder {
    string().format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
}

fn date_time() -> ObjectBuilder {
    string().format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
}

/// `{"position": n}`: what every command's answer adds to its body.
fn position_schema() -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "position",
            integer().minimum(Some(1)).description(Some(
                "The global position of the last event the command appended; pass it as \
                 `min_position` to read your own write.",
            )),
        )
        .required("position")
        .into()
}

/// A command's answer: `body` with `position`.
fn with_position(body: RefOr<Schema>) -> RefOr<Schema> {
    AllOfBuilder::new()
        .item(body)
        .item(Ref::from_schema_name("CommandPosition"))
        .into()
}

fn error_code_schema() -> RefOr<Schema> {
    string()
        .enum_values(Some(all_codes()))
        .description(Some(
            "Every code an error can carry. Besides the contract's general codes, each \
             business rule has its own, answered with 409 when it refuses a command \
             (`USER_NOT_FOUND`, `PRODUCT_NOT_FOUND` and `ORDER_NOT_FOUND` are answered as \
             404 `NOT_FOUND`).",
        ))
        .into()
}

/// The one error envelope.
fn error_schema() -> RefOr<Schema> {
    let details = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some("For `VALIDATION_FAILED`: each refused field and why."))
        .additional_properties(Some(ArrayBuilder::new().items(string())));
    let error = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("code", Ref::from_schema_name("ErrorCode"))
        .required("code")
        .property(
            "message",
            string().description(Some("Human readable; never internal detail.")),
        )
        .required("message")
        .property("details", details)
        .property(
            "request_id",
            string().description(Some("The request's `X-Request-Id`.")),
        )
        .required("request_id");
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .property("error", error)
        .required("error")
        .into()
}

/// An error envelope whose code is one of `codes`.
fn error_with_codes(codes: &[&'static str]) -> RefOr<Schema> {
    let narrowed = ObjectBuilder::new().property(
        "error",
        ObjectBuilder::new().property("code", string().enum_values(Some(codes.to_vec()))),
    );
    AllOfBuilder::new()
        .item(Ref::from_schema_name("Error"))
        .item(narrowed)
        .into()
}

// Shapes the audit handlers write without a type of their own to derive from (the event
// comes from the write side, which does not depend on documentation crates). The tests
// hold each to what the handlers serialize.

/// A committed event as the audit API shows it; secrets in `payload` are redacted.
#[derive(Debug, ToSchema)]
#[schema(as = Event)]
#[allow(dead_code)]
struct EventDoc {
    event_id: uuid::Uuid,
    position: i64,
    recorded_at: chrono::DateTime<chrono::Utc>,
    #[schema(value_type = AggregateTypeSchema)]
    aggregate_type: String,
    aggregate_id: String,
    /// The aggregate's own sequence, from 1.
    sequence: i64,
    event_type: String,
    event_version: String,
    /// The event's payload as stored.
    #[schema(value_type = Value)]
    payload: serde_json::Value,
    metadata: EventMetadataDoc,
}

/// Who acted, in which role, and which request (and chain) the event belongs to.
#[derive(Debug, ToSchema)]
#[schema(as = EventMetadata)]
#[allow(dead_code)]
struct EventMetadataDoc {
    /// The user acting; `null` for Hindsight's own processes and anonymous callers.
    actor_id: Option<uuid::Uuid>,
    #[schema(value_type = ActorRoleSchema)]
    actor_role: String,
    /// The request (or process step) that executed the command.
    request_id: String,
    /// The client request that started the chain.
    correlation_id: String,
    /// The event that caused the command, or the request id for a client's own command.
    causation_id: String,
}

/// A page of the event feed.
#[derive(Debug, ToSchema)]
#[schema(as = EventFeed)]
#[allow(dead_code)]
struct FeedDoc {
    /// In global position order.
    events: Vec<EventDoc>,
    /// Pass as `after` for the next page; `null` once a page came back short.
    #[schema(required = true)]
    next_after: Option<i64>,
}

/// Every event of one aggregate.
#[derive(Debug, ToSchema)]
#[schema(as = AggregateEvents)]
#[allow(dead_code)]
struct StreamDoc {
    /// In sequence order.
    events: Vec<EventDoc>,
}

/// An aggregate's state folded from its own events up to a version or time.
#[derive(Debug, ToSchema)]
#[schema(as = AggregateState)]
#[allow(dead_code)]
struct StateDoc {
    #[schema(value_type = AggregateTypeSchema)]
    aggregate_type: String,
    aggregate_id: uuid::Uuid,
    /// The version the state is at.
    version: i64,
    /// When its last event was recorded.
    as_of: chrono::DateTime<chrono::Utc>,
    /// The state as the domain folds it; secrets redacted.
    #[schema(value_type = Value)]
    state: serde_json::Value,
}

/// The integrity report of the stored history (`VerifyReport`).
#[derive(Debug, ToSchema)]
#[schema(as = IntegrityReport)]
#[allow(dead_code)]
struct VerifyDoc {
    /// No broken link anywhere.
    ok: bool,
    /// Events checked.
    checked: u64,
    /// Checkpoints checked.
    checkpoints: u64,
    /// The newest checkpoint's position (0 when none).
    sealed_up_to: i64,
    /// The broken link with the lowest position; absent when `ok`.
    first_broken: Option<BrokenDoc>,
}

/// One broken link of the history.
#[derive(Debug, ToSchema)]
#[schema(as = BrokenLink)]
#[allow(dead_code)]
struct BrokenDoc {
    /// The position of the tampered event or checkpoint.
    position: i64,
    /// `content_changed`, `chain_broken`, `missing_event`, `unexpected_event`,
    /// `chain_mismatch`, `forged_checkpoint` or `missing_checkpoint`.
    kind: String,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    sequence: Option<i64>,
    /// Why, in words.
    reason: String,
}

/// The token pair of login, refresh and password change (`TokenPair`).
#[derive(ToSchema)]
#[schema(as = TokenPair)]
#[allow(dead_code)]
struct TokenPairDoc {
    /// A JWT for `Authorization: Bearer`.
    access_token: String,
    /// Opaque; spent by its first use at `/auth/refresh`.
    refresh_token: String,
    /// Always `Bearer`.
    #[schema(pattern = "^Bearer$")]
    token_type: String,
    /// Seconds until the access token expires.
    expires_in: u64,
}

/// Named so the document can refer to it: `Page<T>` is generic.
struct Named<T>(std::marker::PhantomData<T>);

macro_rules! page_schema {
    ($item:ty, $name:literal) => {
        impl PartialSchema for Named<Page<$item>> {
            fn schema() -> RefOr<Schema> {
                <Page<$item> as PartialSchema>::schema()
            }
        }

        impl ToSchema for Named<Page<$item>> {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }

            fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
                schemas.push((<$item>::name().into_owned(), <$item>::schema()));
                <$item as ToSchema>::schemas(schemas);
            }
        }
    };
}

page_schema!(UserView, "UserPage");
page_schema!(ProductView, "ProductPage");
page_schema!(OrderView, "OrderPage");
page_schema!(AuditEntry, "AuditEntryPage");

// ---------------------------------------------------------------------------------------
// Operations

/// What kind of route an operation is, which decides the conventions it follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A read-model query: takes `min_position`, answers `X-Projection-Position` (and
    /// `ETag` for one resource).
    Query { etag: bool },
    /// A read of the event store or of the system's own state: never waits.
    Read,
    /// Changes state: answers `position` and `X-Event-Position`, takes `Idempotency-Key`
    /// and, where the handler honours it, `If-Match`.
    Command { if_match: bool },
    /// A POST that starts work without appending events (a rebuild).
    Action,
    /// Login, refresh, logout: not commands, no position.
    Session,
    /// Outside `/api/v1`, or this document.
    Service,
}

/// What a route answers when it succeeds.
struct Answer {
    status: u16,
    description: &'static str,
    content: Option<(&'static str, RefOr<Schema>)>,
}

/// Everything about one route the router does not know.
struct Spec {
    method: Method,
    path: &'static str,
    id: &'static str,
    tag: &'static str,
    summary: &'static str,
    description: Option<&'static str>,
    kind: Kind,
    parameters: Vec<Parameter>,
    body: Option<(RefOr<Schema>, bool)>,
    answer: Answer,
    conflicts: Vec<&'static str>,
    /// Answers that replace the general ones for a status.
    overrides: Vec<(u16, ApiResponse)>,
}

/// A route's entry: a GET reads, anything else is a command, unless [`Spec::kind`] says
/// otherwise; the tag is the area of the path (`/api/v1/<area>/...`).
fn spec(method: Method, path: &'static str, id: &'static str, summary: &'static str) -> Spec {
    let kind = if method == Method::GET {
        Kind::Read
    } else {
        Kind::Command { if_match: false }
    };
    let tag = match path
        .strip_prefix("/api/v1/")
        .and_then(|rest| rest.split('/').next())
    {
        Some("admin") => "operators",
        Some(area @ ("auth" | "users" | "products" | "orders" | "audit")) => area,
        _ => "service",
    };
    Spec {
        method,
        path,
        id,
        tag,
        summary,
        description: None,
        kind,
        parameters: Vec::new(),
        body: None,
        answer: Answer {
            status: 200,
            description: "OK",
            content: None,
        },
        conflicts: Vec::new(),
        overrides: Vec::new(),
    }
}

impl Spec {
    fn kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }

    fn describe(mut self, description: &'static str) -> Self {
        self.description = Some(description);
        self
    }

    fn params<P: IntoParams>(mut self) -> Self {
        self.parameters
            .extend(P::into_params(|| Some(ParameterIn::Query)));
        self
    }

    fn query(mut self, name: &str, schema: impl Into<RefOr<Schema>>, description: &str) -> Self {
        self.parameters.push(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .schema(Some(schema))
                .description(Some(description))
                .build(),
        );
        self
    }

    fn body(mut self, schema: RefOr<Schema>) -> Self {
        self.body = Some((schema, true));
        self
    }

    /// A body that may be empty (or `{}` when `schema` takes no fields).
    fn optional_body(mut self, schema: RefOr<Schema>) -> Self {
        self.body = Some((schema, false));
        self
    }

    fn no_fields(self) -> Self {
        self.optional_body(Ref::from_schema_name("NoFields").into())
    }

    fn answers(self, status: u16, description: &'static str, schema: RefOr<Schema>) -> Self {
        self.answers_as(status, description, "application/json", schema)
    }

    fn answers_as(
        mut self,
        status: u16,
        description: &'static str,
        content_type: &'static str,
        schema: RefOr<Schema>,
    ) -> Self {
        self.answer = Answer {
            status,
            description,
            content: Some((content_type, schema)),
        };
        self
    }

    fn answers_nothing(mut self, status: u16, description: &'static str) -> Self {
        self.answer = Answer {
            status,
            description,
            content: None,
        };
        self
    }

    fn refused_by(mut self, rules: &[&[&'static str]]) -> Self {
        self.conflicts = conflicts(rules);
        self
    }

    fn answer_for(mut self, status: u16, response: ApiResponse) -> Self {
        self.overrides.push((status, response));
        self
    }
}

/// Every route's entry: one per rule in [`policy::RULES`], in the contract's order.
fn operations(s: &mut Schemas) -> Vec<Spec> {
    use Kind::{Action, Command, Query, Service, Session};
    use Method as M;

    const VERSIONED: Kind = Command { if_match: true };
    const ONE: Kind = Query { etag: true };
    const LIST: Kind = Query { etag: false };

    let user = s.of::<UserView>();
    let changed_user = with_position(user.clone());
    let product_changed = with_position(s.of::<products::ProductChanged>());
    let order_changed = with_position(s.of::<orders::OrderChanged>());
    let tokens = s.of::<TokenPairDoc>();
    let event_filters = |spec: Spec| {
        spec.query(
            "aggregate_type",
            Ref::from_schema_name("AggregateType"),
            "Only events of this aggregate type.",
        )
        .query("aggregate_id", uuid(), "Only events of this aggregate.")
        .query("actor_id", uuid(), "Only events this user caused.")
        .query(
            "correlation_id",
            string().min_length(Some(1)).max_length(Some(128)),
            "Only events of this request chain.",
        )
        .query("from", date_time(), "Recorded at or after this time.")
        .query("to", date_time(), "Recorded at or before this time.")
    };

    vec![
        spec(M::GET, "/health/live", "live", "The process is up")
            .kind(Service)
            .answers(200, "Alive", s.of::<health::Liveness>()),
        spec(
            M::GET,
            "/health/ready",
            "ready",
            "Postgres and NATS reachable, migrations applied",
        )
        .kind(Service)
        .answers(200, "Ready", s.of::<health::Readiness>())
        .answer_for(
            503,
            with_request_id(
                ResponseBuilder::new()
                    .description("Not ready, with each dependency's check; or `UNAVAILABLE`")
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(
                                utoipa::openapi::schema::OneOfBuilder::new()
                                    .item(Ref::from_schema_name("Readiness"))
                                    .item(Ref::from_schema_name("Error")),
                            ))
                            .build(),
                    ),
                true,
            ),
        ),
        spec(M::GET, "/metrics", "metrics", "Prometheus metrics")
            .kind(Service)
            .answers_as(
                200,
                "The Prometheus text exposition format",
                "text/plain; version=0.0.4; charset=utf-8",
                string().into(),
            ),
        spec(M::GET, "/api/v1/openapi.json", "openapi", "This document")
            .kind(Service)
            .answers(
                200,
                "The OpenAPI 3.1 document",
                ObjectBuilder::new().schema_type(Type::Object).into(),
            ),
        spec(
            M::POST,
            "/api/v1/auth/register",
            "register",
            "Register as a customer",
        )
        .body(s.of::<auth::RegisterRequest>())
        .answers(201, "Registered", with_position(s.of::<auth::Registered>()))
        .refused_by(&[USER_RULES, &["EMAIL_TAKEN"]]),
        spec(
            M::POST,
            "/api/v1/auth/login",
            "login",
            "Sign in for an access and refresh token",
        )
        .kind(Session)
        .describe(
            "An unknown address, a wrong password and a deactivated user get the \
             same 401. Too many failed logins for one account answer 429.",
        )
        .body(s.of::<auth::LoginRequest>())
        .answers(200, "Signed in", tokens.clone()),
        spec(
            M::POST,
            "/api/v1/auth/refresh",
            "refresh",
            "Trade a refresh token for a new pair",
        )
        .kind(Session)
        .describe(
            "The presented refresh token is spent; presenting a spent one again \
             revokes its whole family (401).",
        )
        .body(s.of::<auth::RefreshRequest>())
        .answers(200, "A new pair", tokens.clone()),
        spec(
            M::POST,
            "/api/v1/auth/logout",
            "logout",
            "Revoke a refresh token's family",
        )
        .kind(Session)
        .body(Ref::from_schema_name("RefreshRequest").into())
        .answers_nothing(204, "Signed out (also when the token is unknown)"),
        spec(
            M::GET,
            "/api/v1/users/me",
            "getMe",
            "The caller's user view",
        )
        .kind(ONE)
        .params::<MinPosition>()
        .answers(200, "The caller", user.clone()),
        spec(
            M::PATCH,
            "/api/v1/users/me",
            "renameMe",
            "Change the caller's name",
        )
        .kind(VERSIONED)
        .body(s.of::<users::RenameRequest>())
        .answers(200, "Renamed", changed_user.clone())
        .refused_by(&[USER_RULES]),
        spec(
            M::POST,
            "/api/v1/users/me/password",
            "changePassword",
            "Change the caller's password",
        )
        .describe(
            "Every other token and session of the user stops working at once; the \
             answer carries a fresh pair. A wrong current password is 422.",
        )
        .body(s.of::<users::PasswordRequest>())
        .answers(
            200,
            "Changed, with a fresh token pair",
            with_position(tokens),
        )
        .refused_by(&[USER_RULES]),
        spec(M::GET, "/api/v1/users", "listUsers", "A page of users")
            .kind(LIST)
            .params::<users::ListQuery>()
            .answers(200, "A page of users", s.of::<Named<Page<UserView>>>()),
        spec(M::GET, "/api/v1/users/{id}", "getUser", "One user")
            .kind(ONE)
            .describe("Admins and auditors see anyone; others only themselves (404 otherwise).")
            .params::<MinPosition>()
            .answers(200, "The user", user),
        spec(
            M::PUT,
            "/api/v1/users/{id}/role",
            "assignRole",
            "Assign a role",
        )
        .kind(VERSIONED)
        .describe("The user's existing access tokens stop working.")
        .body(s.of::<users::RoleRequest>())
        .answers(200, "Assigned", changed_user.clone())
        .refused_by(&[USER_RULES]),
        spec(
            M::POST,
            "/api/v1/users/{id}/deactivate",
            "deactivateUser",
            "Deactivate a user",
        )
        .kind(VERSIONED)
        .describe("Ends the user's sessions at once.")
        .no_fields()
        .answers(200, "Deactivated", changed_user.clone())
        .refused_by(&[USER_RULES]),
        spec(
            M::POST,
            "/api/v1/users/{id}/reactivate",
            "reactivateUser",
            "Reactivate a user",
        )
        .kind(VERSIONED)
        .no_fields()
        .answers(200, "Reactivated", changed_user)
        .refused_by(&[USER_RULES]),
        spec(
            M::GET,
            "/api/v1/products",
            "listProducts",
            "A page of products",
        )
        .kind(LIST)
        .params::<products::ListQuery>()
        .answers(
            200,
            "A page of products",
            s.of::<Named<Page<ProductView>>>(),
        ),
        spec(M::GET, "/api/v1/products/{id}", "getProduct", "One product")
            .kind(ONE)
            .params::<MinPosition>()
            .answers(200, "The product", s.of::<ProductView>()),
        spec(
            M::POST,
            "/api/v1/products",
            "createProduct",
            "Create a product",
        )
        .body(s.of::<products::CreateRequest>())
        .answers(
            201,
            "Created",
            with_position(s.of::<products::ProductCreated>()),
        )
        .refused_by(&[PRODUCT_RULES, &["SKU_TAKEN"]]),
        spec(
            M::PATCH,
            "/api/v1/products/{id}",
            "reviseProduct",
            "Change a product's name, description or price",
        )
        .kind(VERSIONED)
        .body(s.of::<products::ReviseRequest>())
        .answers(200, "Revised", product_changed.clone())
        .refused_by(&[PRODUCT_RULES]),
        spec(
            M::POST,
            "/api/v1/products/{id}/restock",
            "restockProduct",
            "Add stock",
        )
        .kind(VERSIONED)
        .body(s.of::<products::RestockRequest>())
        .answers(200, "Restocked", product_changed.clone())
        .refused_by(&[PRODUCT_RULES]),
        spec(
            M::POST,
            "/api/v1/products/{id}/discontinue",
            "discontinueProduct",
            "Stop selling a product",
        )
        .kind(VERSIONED)
        .no_fields()
        .answers(200, "Discontinued", product_changed)
        .refused_by(&[PRODUCT_RULES]),
        spec(M::POST, "/api/v1/orders", "placeOrder", "Place an order")
            .describe(
                "The order is `pending` until the order process reserves its stock, \
                 then `confirmed` or `rejected` (with the refusing rule's code as \
                 `rejection_reason`).",
            )
            .body(s.of::<orders::PlaceRequest>())
            .answers(201, "Placed", with_position(s.of::<orders::OrderPlaced>()))
            .refused_by(&[ORDER_RULES, &["PRODUCT_DISCONTINUED"]]),
        spec(M::GET, "/api/v1/orders", "listOrders", "A page of orders")
            .kind(LIST)
            .describe("Customers see only their own.")
            .params::<orders::ListQuery>()
            .answers(200, "A page of orders", s.of::<Named<Page<OrderView>>>()),
        spec(M::GET, "/api/v1/orders/{id}", "getOrder", "One order")
            .kind(ONE)
            .describe("A customer asking for another customer's order gets 404.")
            .params::<MinPosition>()
            .answers(200, "The order", s.of::<OrderView>()),
        spec(
            M::GET,
            "/api/v1/orders/{id}/stream",
            "streamOrder",
            "The order's status changes as server-sent events",
        )
        .describe(
            "One `status` event per status change, in order, each with data \
             `{id, status, version, position}`; the stream closes when the order is \
             rejected, shipped or cancelled, or after five minutes.",
        )
        .answers_as(200, "An event stream", "text/event-stream", string().into()),
        spec(
            M::POST,
            "/api/v1/orders/{id}/pay",
            "payOrder",
            "Pay a confirmed order",
        )
        .kind(VERSIONED)
        .describe(
            "`amount` must equal the order's total, else 409 \
             `PAYMENT_AMOUNT_MISMATCH`.",
        )
        .body(s.of::<orders::PayRequest>())
        .answers(200, "Paid", order_changed.clone())
        .refused_by(&[ORDER_RULES]),
        spec(
            M::POST,
            "/api/v1/orders/{id}/cancel",
            "cancelOrder",
            "Cancel an order",
        )
        .kind(VERSIONED)
        .describe(
            "Owners before shipping, admins any time before shipping; reserved \
             stock is released.",
        )
        .optional_body(s.of::<orders::CancelRequest>())
        .answers(200, "Cancelled", order_changed.clone())
        .refused_by(&[ORDER_RULES]),
        spec(
            M::POST,
            "/api/v1/orders/{id}/ship",
            "shipOrder",
            "Ship a paid order",
        )
        .kind(VERSIONED)
        .no_fields()
        .answers(200, "Shipped", order_changed)
        .refused_by(&[ORDER_RULES]),
        event_filters(
            spec(
                M::GET,
                "/api/v1/audit/events",
                "auditEvents",
                "Committed events in global position order",
            )
            .query(
                "after",
                integer().minimum(Some(0)),
                "Events after this position (the previous page's `next_after`).",
            )
            .query(
                "limit",
                integer().minimum(Some(1)).maximum(Some(MAX_FEED_LIMIT)),
                "Page size.",
            ),
        )
        .answers(200, "A page of the feed", s.of::<FeedDoc>()),
        spec(
            M::GET,
            "/api/v1/audit/streams/{aggregate_type}/{aggregate_id}",
            "auditStream",
            "Every event of one aggregate",
        )
        .answers(
            200,
            "The aggregate's events in sequence order",
            s.of::<StreamDoc>(),
        ),
        spec(
            M::GET,
            "/api/v1/audit/streams/{aggregate_type}/{aggregate_id}/state",
            "auditState",
            "An aggregate's state as of a version or a time",
        )
        .describe(
            "Exactly one of `version` and `at`. A version the aggregate never \
             reached, or a time before its first event, is 404.",
        )
        .query(
            "version",
            integer().minimum(Some(1)),
            "The state after this event.",
        )
        .query("at", date_time(), "The state as of this time.")
        .answers(200, "The folded state", s.of::<StateDoc>()),
        spec(
            M::GET,
            "/api/v1/audit/trail",
            "auditTrail",
            "Who did what to which entity, when",
        )
        .kind(LIST)
        .query("actor_id", uuid(), "Only what this user did.")
        .query(
            "aggregate_type",
            Ref::from_schema_name("AggregateType"),
            "Only this aggregate type.",
        )
        .query("aggregate_id", uuid(), "Only this aggregate.")
        .query("from", date_time(), "Recorded at or after this time.")
        .query("to", date_time(), "Recorded at or before this time.")
        .query(
            "limit",
            integer().minimum(Some(1)).maximum(Some(100)),
            "Page size, 1 to 100 (default 20).",
        )
        .query("cursor", string(), "The previous page's `next_cursor`.")
        .query(
            "min_position",
            integer().minimum(Some(0)),
            "Answer only once the read model has applied this position.",
        )
        .answers(
            200,
            "A page of the trail",
            s.of::<Named<Page<AuditEntry>>>(),
        ),
        event_filters(
            spec(
                M::GET,
                "/api/v1/audit/export",
                "auditExport",
                "The events `/audit/events` pages through, as one NDJSON document",
            )
            .describe(
                "Streamed up to the head of the store when the export began; a \
                 failure after the body started ends it early, unfinished.",
            ),
        )
        .answers_as(
            200,
            "One event (as in `/audit/events`) a line",
            "application/x-ndjson",
            string().into(),
        ),
        spec(
            M::GET,
            "/api/v1/audit/verify",
            "auditVerify",
            "Integrity report of the stored history",
        )
        .answers(200, "The report", s.of::<VerifyDoc>()),
        spec(
            M::GET,
            "/api/v1/admin/projections",
            "listProjections",
            "Where every projection stands",
        )
        .answers(
            200,
            "Every projection",
            ArrayBuilder::new().items(s.of::<ProjectionStatus>()).into(),
        ),
        spec(
            M::GET,
            "/api/v1/admin/projections/{name}",
            "getProjection",
            "Where one projection stands, with rebuild progress",
        )
        .answers(200, "The projection", s.of::<ProjectionStatus>()),
        spec(
            M::POST,
            "/api/v1/admin/projections/{name}/rebuild",
            "rebuildProjection",
            "Rebuild a read model while the old one keeps serving",
        )
        .kind(Action)
        .describe("Answers at once; progress shows in the projection's status.")
        .no_fields()
        .answers(202, "Started", s.of::<admin::RebuildStarted>())
        .refused_by(&[OPERATOR_RULES]),
    ]
}

// ---------------------------------------------------------------------------------------
// Assembly

const BEARER: &str = "bearerAuth";

/// The general error answers, by status: component name and the codes it carries.
fn general_responses() -> Vec<(u16, &'static str)> {
    vec![
        (400, "MalformedRequest"),
        (401, "Unauthenticated"),
        (403, "Forbidden"),
        (404, "NotFound"),
        (412, "VersionMismatch"),
        (413, "PayloadTooLarge"),
        (415, "UnsupportedMediaType"),
        (422, "Unprocessable"),
        (429, "RateLimited"),
        (500, "Internal"),
        (503, "Unavailable"),
    ]
}

fn header_schema(schema: impl Into<RefOr<Schema>>, description: &str) -> utoipa::openapi::Header {
    HeaderBuilder::new()
        .schema(schema)
        .description(Some(description))
        .build()
}

/// Adds `X-Request-Id` (and `Retry-After` when asked) to a response.
fn with_request_id(response: ResponseBuilder, retry_after: bool) -> ApiResponse {
    let response = response.header(
        "X-Request-Id",
        header_schema(
            string(),
            "The client's `X-Request-Id` when it is 1-128 characters of `A-Za-z0-9._-`, \
             else a new UUID.",
        ),
    );
    let response = if retry_after {
        response.header(
            "Retry-After",
            header_schema(
                integer().minimum(Some(1)),
                "Seconds to wait before retrying.",
            ),
        )
    } else {
        response
    };
    response.build()
}

fn error_response(description: &str, schema: RefOr<Schema>, retry_after: bool) -> ApiResponse {
    with_request_id(
        ResponseBuilder::new().description(description).content(
            "application/json",
            ContentBuilder::new().schema(Some(schema)).build(),
        ),
        retry_after,
    )
}

/// The general error answers as components, each listing its codes.
fn error_components() -> Vec<(&'static str, ApiResponse)> {
    general_responses()
        .into_iter()
        .map(|(status, name)| {
            let codes: Vec<(&str, &str)> = GENERAL_CODES
                .iter()
                .filter(|(code_status, _, _)| *code_status == status)
                .map(|(_, code, when)| (*code, *when))
                .collect();
            let description = codes
                .iter()
                .map(|(code, when)| format!("`{code}`: {when}."))
                .collect::<Vec<_>>()
                .join(" ");
            let schema = error_with_codes(&codes.iter().map(|(code, _)| *code).collect::<Vec<_>>());
            (
                name,
                error_response(&description, schema, matches!(status, 429 | 503)),
            )
        })
        .collect()
}

fn http_method(method: &Method) -> Option<HttpMethod> {
    Some(match *method {
        Method::GET => HttpMethod::Get,
        Method::POST => HttpMethod::Post,
        Method::PUT => HttpMethod::Put,
        Method::PATCH => HttpMethod::Patch,
        Method::DELETE => HttpMethod::Delete,
        _ => return None,
    })
}

/// The `{name}` segments of a route pattern.
fn path_names(path: &str) -> Vec<&str> {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
        .collect()
}

fn path_parameter(name: &str) -> Parameter {
    let (schema, description): (RefOr<Schema>, &str) = match name {
        "aggregate_type" => (
            Ref::from_schema_name("AggregateType").into(),
            "`user`, `product` or `order`.",
        ),
        "name" => (
            string().enum_values(Some(status::names())).into(),
            "The projection's name.",
        ),
        "aggregate_id" => (uuid().into(), "The aggregate's id."),
        _ => (uuid().into(), "The resource's id."),
    };
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Path)
        .required(Required::True)
        .schema(Some(schema))
        .description(Some(description))
        .build()
}

fn header_parameter(name: &str, schema: ObjectBuilder, description: &str) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Header)
        .required(Required::False)
        .schema(Some(schema))
        .description(Some(description))
        .build()
}

fn who_may(access: Option<Access>) -> String {
    match access {
        Some(Access::Anyone) => "Anyone may call this.".to_owned(),
        Some(Access::SignedIn) => "Any signed-in user may call this.".to_owned(),
        Some(Access::Roles(roles)) => format!(
            "Roles: {}.",
            roles
                .iter()
                .map(Role::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "No one: the route has no authorization rule.".to_owned(),
    }
}

impl Spec {
    fn has_input(&self) -> bool {
        self.body.is_some()
            || self
                .parameters
                .iter()
                .any(|p| p.parameter_in == ParameterIn::Query)
    }

    /// The general error statuses this route can answer.
    fn error_statuses(&self, access: Option<Access>) -> Vec<u16> {
        let signed_in = !matches!(access, Some(Access::Anyone));
        let has_path = !path_names(self.path).is_empty();
        let if_match = matches!(self.kind, Kind::Command { if_match: true });
        let keyed = matches!(self.kind, Kind::Command { .. } | Kind::Action);
        let mut statuses = Vec::new();
        let mut add = |condition: bool, status: u16| {
            if condition {
                statuses.push(status);
            }
        };
        add(self.has_input() || if_match, 400);
        add(signed_in || self.kind == Kind::Session, 401);
        add(
            !matches!(access, Some(Access::Anyone | Access::SignedIn)),
            403,
        );
        add(
            has_path || matches!(self.kind, Kind::Query { etag: true }),
            404,
        );
        add(if_match, 412);
        add(self.body.is_some(), 413);
        add(self.body.is_some(), 415);
        add(self.has_input() || has_path || keyed, 422);
        add(true, 429);
        add(true, 500);
        add(true, 503);
        statuses
    }

    fn success(&self) -> ApiResponse {
        let mut response = ResponseBuilder::new().description(self.answer.description);
        if let Some((content_type, schema)) = &self.answer.content {
            response = response.content(
                *content_type,
                ContentBuilder::new().schema(Some(schema.clone())).build(),
            );
        }
        match self.kind {
            Kind::Query { etag } => {
                response = response.header(
                    "X-Projection-Position",
                    header_schema(
                        integer().minimum(Some(0)),
                        "The position the read model had applied when it answered.",
                    ),
                );
                if etag {
                    response = response.header(
                        "ETag",
                        header_schema(
                            string().pattern(Some("^\"[0-9]+\"$")),
                            "The aggregate's version, quoted: send it as `If-Match`.",
                        ),
                    );
                }
            }
            Kind::Command { .. } => {
                response = response.header(
                    "X-Event-Position",
                    header_schema(
                        integer().minimum(Some(1)),
                        "The global position of the last event the command appended.",
                    ),
                );
            }
            _ => {}
        }
        with_request_id(response, false)
    }

    fn operation(&self, access: Option<Access>) -> Operation {
        let mut description = who_may(access);
        if let Some(more) = self.description {
            description = format!("{more}\n\n{description}");
        }
        let mut builder = OperationBuilder::new()
            .operation_id(Some(self.id))
            .tag(self.tag)
            .summary(Some(self.summary))
            .description(Some(description));
        for name in path_names(self.path) {
            builder = builder.parameter(path_parameter(name));
        }
        for parameter in &self.parameters {
            builder = builder.parameter(parameter.clone());
        }
        if self.kind == Kind::Read && self.path.starts_with("/api/v1/audit/") {
            builder = builder.parameter(
                ParameterBuilder::new()
                    .name("min_position")
                    .parameter_in(ParameterIn::Query)
                    .required(Required::False)
                    .schema(Some(integer().minimum(Some(0))))
                    .description(Some(
                        "Accepted like on every read; this answer comes from the event \
                         store itself, which is always current, so it never waits.",
                    ))
                    .build(),
            );
        }
        if matches!(self.kind, Kind::Command { .. } | Kind::Action) {
            builder = builder.parameter(header_parameter(
                "Idempotency-Key",
                string().min_length(Some(1)).max_length(Some(255)),
                "Retrying with the same key and body replays the first answer without \
                 running the command again; the same key with another body is 422 \
                 `IDEMPOTENCY_KEY_REUSED`; while the first is still running, 409 \
                 `IDEMPOTENCY_KEY_IN_USE`.",
            ));
        }
        if self.kind == (Kind::Command { if_match: true }) {
            builder = builder.parameter(header_parameter(
                "If-Match",
                string().pattern(Some("^(W/)?\"[0-9]+\"$")),
                "The version (`ETag`) the client expects the aggregate to be at; a stale \
                 one is 412 `VERSION_MISMATCH` and nothing is appended.",
            ));
        }
        if let Some((schema, required)) = &self.body {
            builder = builder.request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(if *required {
                        Required::True
                    } else {
                        Required::False
                    }))
                    .content(
                        "application/json",
                        ContentBuilder::new().schema(Some(schema.clone())).build(),
                    )
                    .build(),
            ));
        }
        builder = builder.response(self.answer.status.to_string(), self.success());
        let mut statuses: Vec<u16> = self.error_statuses(access);
        if !self.conflicts.is_empty() {
            statuses.push(409);
        }
        statuses.sort_unstable();
        for status in statuses {
            let key = status.to_string();
            if let Some((_, response)) = self.overrides.iter().find(|(s, _)| *s == status) {
                builder = builder.response(key, response.clone());
            } else if status == 409 {
                let description = format!(
                    "A business rule refused the command: {}.",
                    self.conflicts
                        .iter()
                        .map(|code| format!("`{code}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                builder = builder.response(
                    key,
                    error_response(&description, error_with_codes(&self.conflicts), false),
                );
            } else if let Some((_, name)) =
                general_responses().into_iter().find(|(s, _)| *s == status)
            {
                builder = builder.response(key, Ref::from_response_name(name));
            }
        }
        if !matches!(access, Some(Access::Anyone)) {
            builder = builder.security(SecurityRequirement::new(BEARER, Vec::<String>::new()));
        }
        builder.build()
    }
}

/// An operation for a route without an entry in [`operations`] (the tests forbid one),
/// so that whatever is served is at least listed.
fn undocumented(path: &str, access: Option<Access>) -> Operation {
    let mut builder = OperationBuilder::new()
        .summary(Some("Undocumented"))
        .description(Some(who_may(access)));
    for name in path_names(path) {
        builder = builder.parameter(path_parameter(name));
    }
    builder = builder.response(
        "200",
        with_request_id(
            ResponseBuilder::new().description("Not documented yet"),
            false,
        ),
    );
    if !matches!(access, Some(Access::Anyone)) {
        builder = builder.security(SecurityRequirement::new(BEARER, Vec::<String>::new()));
    }
    builder.build()
}

const DESCRIPTION: &str = "Hindsight, an event-sourced CQRS commerce backend. Commands \
                           answer the global `position` of their last event (body field `position`, header \
                           `X-Event-Position`); reads accept `min_position` and answer once their read model has \
                           applied it (`X-Projection-Position`). Every response carries `X-Request-Id`; every \
                           error has one envelope, `{\"error\": {\"code\", \"message\", \"details\"?, \
                           \"request_id\"}}`, whose `code` is one of `ErrorCode`. Money is integer minor units \
                           with an ISO 4217 currency; ids are UUIDs; times are RFC 3339 in UTC.";

/// The whole document.
pub fn document() -> OpenApi {
    let mut schemas = Schemas::default();
    for register in [
        Schemas::register::<RoleSchema>,
        Schemas::register::<UserStatusSchema>,
        Schemas::register::<ProductStatusSchema>,
        Schemas::register::<ProductSortSchema>,
        Schemas::register::<OrderStatusSchema>,
        Schemas::register::<ActorRoleSchema>,
        Schemas::register::<AggregateTypeSchema>,
        Schemas::register::<ProjectionStateSchema>,
        Schemas::register::<MoneySchema>,
        Schemas::register::<QuantitySchema>,
    ] {
        register(&mut schemas);
    }
    let specs = operations(&mut schemas);

    let mut paths = Paths::new();
    for (method, path) in routes::table() {
        let Some(http) = http_method(&method) else {
            continue;
        };
        let access = policy::rule(&method, &path);
        let operation = match specs
            .iter()
            .find(|spec| spec.method == method && spec.path == path)
        {
            Some(spec) => spec.operation(access),
            None => undocumented(&path, access),
        };
        paths.add_path_operation(&path, vec![http], operation);
    }

    let mut components = ComponentsBuilder::new()
        .schema("Error", error_schema())
        .schema("ErrorCode", error_code_schema())
        .schema("CommandPosition", position_schema())
        .schema(
            "NoFields",
            ObjectBuilder::new()
                .schema_type(Type::Object)
                .additional_properties(Some(AdditionalProperties::FreeForm(false)))
                .description(Some(
                    "A command that takes no fields: an empty body or `{}`.",
                )),
        )
        .security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "An access token from `/auth/login` or `/auth/refresh`.",
                    ))
                    .build(),
            ),
        );
    for (name, schema) in schemas.0 {
        components = components.schema(name, schema);
    }
    for (name, response) in error_components() {
        components = components.response(name, response);
    }

    let tags = [
        ("auth", "Registration and sessions"),
        ("users", "Profiles and user administration"),
        ("products", "The catalog"),
        ("orders", "Placing, paying, cancelling and shipping orders"),
        ("audit", "The stored history, for auditors and admins"),
        ("operators", "Projections, for operators and admins"),
        ("service", "Health, metrics and this document"),
    ]
    .map(|(name, description)| {
        TagBuilder::new()
            .name(name)
            .description(Some(description))
            .build()
    });

    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Hindsight API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(DESCRIPTION))
                .build(),
        )
        .paths(paths)
        .components(Some(components.build()))
        .tags(Some(tags))
        .build()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use hindsight_commands::{EventMetadata, Refusal, StoredEvent, UniqueKey};
    use hindsight_domain::ids::ProductId;
    use hindsight_domain::order::{OrderError, OrderStatus};
    use hindsight_domain::product::ProductError;
    use hindsight_domain::user::UserError;
    use hindsight_domain::values::{Currency, Money, Quantity};
    use hindsight_domain::RuleViolation;
    use serde_json::{json, Value};

    use super::*;

    fn json_document() -> Value {
        serde_json::to_value(document()).unwrap()
    }

    fn operation<'a>(document: &'a Value, method: &Method, path: &str) -> &'a Value {
        &document["paths"][path][method.as_str().to_lowercase()]
    }

    /// Follows a local `$ref`.
    fn resolve<'a>(document: &'a Value, value: &'a Value) -> &'a Value {
        match value["$ref"].as_str() {
            Some(reference) => {
                let pointer = reference.trim_start_matches('#');
                resolve(document, document.pointer(pointer).expect(reference))
            }
            None => value,
        }
    }

    fn keys(value: &Value) -> BTreeSet<String> {
        value.as_object().unwrap().keys().cloned().collect()
    }

    fn property_keys(document: &Value, schema: &str) -> BTreeSet<String> {
        keys(&document["components"]["schemas"][schema]["properties"])
    }

    #[test]
    fn the_document_is_openapi_3_1_json() {
        let text = serde_json::to_string(&document()).unwrap();
        let document: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(document["openapi"], "3.1.0");
        assert_eq!(document["info"]["title"], "Hindsight API");
        assert_eq!(
            document["components"]["securitySchemes"][BEARER],
            json!({
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "An access token from `/auth/login` or `/auth/refresh`."
            })
        );
    }

    #[test]
    fn every_served_route_is_documented_and_nothing_else() {
        let document = json_document();
        let mut documented = BTreeSet::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let served: BTreeSet<(String, String)> = routes::table()
            .into_iter()
            .map(|(method, path)| (method.to_string(), path))
            .collect();
        assert_eq!(documented, served);
        for (method, path) in routes::table() {
            let operation = operation(&document, &method, &path);
            assert_ne!(
                operation["summary"], "Undocumented",
                "{method} {path} has no entry in `operations`"
            );
        }
    }

    /// One entry per authorization rule, so a route cannot be added without deciding both
    /// who may call it and how it is documented.
    #[test]
    fn every_rule_has_exactly_one_entry() {
        let specs = operations(&mut Schemas::default());
        let entries: Vec<(Method, &str)> = specs
            .iter()
            .map(|spec| (spec.method.clone(), spec.path))
            .collect();
        let rules: Vec<(Method, &str)> = policy::RULES
            .iter()
            .map(|(method, path, _)| (method.clone(), *path))
            .collect();
        for entry in &entries {
            assert!(rules.contains(entry), "{entry:?} has no authorization rule");
        }
        for rule in &rules {
            let count = entries.iter().filter(|entry| *entry == rule).count();
            assert_eq!(count, 1, "{rule:?} has {count} entries");
        }
        let ids: BTreeSet<&str> = specs.iter().map(|spec| spec.id).collect();
        assert_eq!(ids.len(), specs.len(), "operation ids must be unique");
    }

    #[test]
    fn security_follows_the_policy() {
        let document = json_document();
        for (method, path) in routes::table() {
            let operation = operation(&document, &method, &path);
            let expected = match policy::rule(&method, &path) {
                Some(Access::Anyone) => Value::Null,
                _ => json!([{ BEARER: [] }]),
            };
            assert_eq!(operation["security"], expected, "{method} {path}");
            let responses = &operation["responses"];
            let anyone = policy::rule(&method, &path) == Some(Access::Anyone);
            if !anyone {
                assert!(responses.get("401").is_some(), "{method} {path} lacks 401");
            }
            if matches!(policy::rule(&method, &path), Some(Access::Roles(_))) {
                assert!(responses.get("403").is_some(), "{method} {path} lacks 403");
            }
        }
    }

    #[test]
    fn every_response_carries_x_request_id_and_errors_the_envelope() {
        let document = json_document();
        for (method, path) in routes::table() {
            let operation = operation(&document, &method, &path);
            for (status, response) in operation["responses"].as_object().unwrap() {
                let response = resolve(&document, response);
                assert!(
                    response["headers"].get("X-Request-Id").is_some(),
                    "{method} {path} {status} lacks X-Request-Id"
                );
                let status: u16 = status.parse().unwrap();
                if status >= 400 && !(path == "/health/ready" && status == 503) {
                    let schema = &response["content"]["application/json"]["schema"];
                    assert_eq!(
                        schema["allOf"][0]["$ref"], "#/components/schemas/Error",
                        "{method} {path} {status}"
                    );
                }
                if status == 429 || status == 503 {
                    assert!(
                        response["headers"].get("Retry-After").is_some(),
                        "{method} {path} {status} lacks Retry-After"
                    );
                }
            }
        }
    }

    #[test]
    fn every_reference_resolves() {
        fn walk<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(reference)) = map.get("$ref") {
                        found.push(reference);
                    }
                    map.values().for_each(|value| walk(value, found));
                }
                Value::Array(items) => items.iter().for_each(|value| walk(value, found)),
                _ => {}
            }
        }
        let document = json_document();
        let mut references = Vec::new();
        walk(&document, &mut references);
        assert!(references.len() > 50);
        for reference in references {
            let pointer = reference.strip_prefix('#').expect(reference);
            assert!(
                document.pointer(pointer).is_some(),
                "{reference} does not resolve"
            );
        }
    }

    #[test]
    fn commands_reads_and_headers_follow_the_contract() {
        let document = json_document();
        let status_of = |method: Method, path: &str| -> Vec<String> {
            keys(&operation(&document, &method, path)["responses"])
                .into_iter()
                .filter(|status| status.starts_with('2'))
                .collect()
        };
        assert_eq!(status_of(Method::POST, "/api/v1/auth/register"), ["201"]);
        assert_eq!(status_of(Method::POST, "/api/v1/products"), ["201"]);
        assert_eq!(status_of(Method::POST, "/api/v1/orders"), ["201"]);
        assert_eq!(status_of(Method::POST, "/api/v1/auth/logout"), ["204"]);
        assert_eq!(
            status_of(Method::POST, "/api/v1/admin/projections/{name}/rebuild"),
            ["202"]
        );
        assert_eq!(status_of(Method::POST, "/api/v1/auth/login"), ["200"]);
        assert_eq!(status_of(Method::PATCH, "/api/v1/users/me"), ["200"]);

        let place = operation(&document, &Method::POST, "/api/v1/orders");
        let placed = &place["responses"]["201"];
        assert!(placed["headers"].get("X-Event-Position").is_some());
        let parameters: Vec<&str> = place["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|parameter| parameter["name"].as_str().unwrap())
            .collect();
        assert!(parameters.contains(&"Idempotency-Key"));
        let pay = operation(&document, &Method::POST, "/api/v1/orders/{id}/pay");
        let names: Vec<&str> = pay["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|parameter| parameter["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["id", "Idempotency-Key", "If-Match"]);
        assert!(pay["responses"].get("412").is_some());

        for (method, path) in routes::table() {
            let operation = operation(&document, &method, &path);
            let path_names: Vec<&str> = operation["parameters"]
                .as_array()
                .map(|parameters| {
                    parameters
                        .iter()
                        .filter(|parameter| parameter["in"] == "path")
                        .map(|parameter| parameter["name"].as_str().unwrap())
                        .collect()
                })
                .unwrap_or_default();
            assert_eq!(path_names, super::path_names(&path), "{method} {path}");
            let reads = method == Method::GET
                && ["users", "products", "orders", "audit"]
                    .iter()
                    .any(|area| path.starts_with(&format!("/api/v1/{area}")))
                && !path.ends_with("/stream");
            if reads {
                let takes_min_position = operation["parameters"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|parameter| parameter["name"] == "min_position");
                assert!(takes_min_position, "{method} {path} lacks min_position");
            }
        }

        let one = operation(&document, &Method::GET, "/api/v1/products/{id}");
        let answer = &one["responses"]["200"];
        assert!(answer["headers"].get("ETag").is_some());
        assert!(answer["headers"].get("X-Projection-Position").is_some());
        assert_eq!(
            answer["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/ProductView"
        );
        let page = &document["components"]["schemas"]["ProductPage"];
        assert_eq!(
            keys(&page["properties"]),
            BTreeSet::from(["items".to_owned(), "next_cursor".to_owned()])
        );
        let feed = &document["components"]["schemas"]["EventFeed"];
        assert_eq!(
            keys(&feed["properties"]),
            BTreeSet::from(["events".to_owned(), "next_after".to_owned()])
        );
        let export = operation(&document, &Method::GET, "/api/v1/audit/export");
        assert!(export["responses"]["200"]["content"]
            .get("application/x-ndjson")
            .is_some());
        let stream = operation(&document, &Method::GET, "/api/v1/orders/{id}/stream");
        assert!(stream["responses"]["200"]["content"]
            .get("text/event-stream")
            .is_some());
    }

    /// Every variant of each domain error, listed with an exhaustive match so that adding
    /// a variant fails to compile here until it is listed.
    fn user_errors() -> Vec<UserError> {
        let all = vec![
            UserError::UserNotFound,
            UserError::UserAlreadyExists,
            UserError::UserDeactivated,
            UserError::UserNotDeactivated,
        ];
        for error in &all {
            match error {
                UserError::UserNotFound
                | UserError::UserAlreadyExists
                | UserError::UserDeactivated
                | UserError::UserNotDeactivated => {}
            }
        }
        all
    }

    fn product_errors() -> Vec<ProductError> {
        let all = vec![
            ProductError::ProductNotFound,
            ProductError::ProductAlreadyExists,
            ProductError::PriceNotPositive,
            ProductError::CurrencyMismatch {
                expected: Currency::EUR,
                found: Currency::EUR,
            },
            ProductError::ProductDiscontinued,
            ProductError::ProductAlreadyDiscontinued,
            ProductError::InsufficientStock {
                requested: Quantity::ONE,
                available: 0,
            },
            ProductError::ReservationNotFound,
            ProductError::StockOverflow,
        ];
        for error in &all {
            match error {
                ProductError::ProductNotFound
                | ProductError::ProductAlreadyExists
                | ProductError::PriceNotPositive
                | ProductError::CurrencyMismatch { .. }
                | ProductError::ProductDiscontinued
                | ProductError::ProductAlreadyDiscontinued
                | ProductError::InsufficientStock { .. }
                | ProductError::ReservationNotFound
                | ProductError::StockOverflow => {}
            }
        }
        all
    }

    fn order_errors() -> Vec<OrderError> {
        let money = Money::zero(Currency::EUR);
        let all = vec![
            OrderError::OrderNotFound,
            OrderError::OrderAlreadyExists,
            OrderError::OrderEmpty,
            OrderError::TooManyOrderLines { count: 101 },
            OrderError::QuantityOutOfRange {
                product_id: ProductId::new(),
                quantity: Quantity::ONE,
            },
            OrderError::DuplicateOrderLine {
                product_id: ProductId::new(),
            },
            OrderError::CurrencyMismatch {
                expected: Currency::EUR,
                found: Currency::EUR,
            },
            OrderError::AmountOverflow,
            OrderError::OrderNotPending {
                status: OrderStatus::Paid,
            },
            OrderError::OrderNotConfirmed,
            OrderError::OrderAlreadyPaid,
            OrderError::OrderNotPaid,
            OrderError::OrderAlreadyShipped,
            OrderError::OrderRejected,
            OrderError::OrderCancelled,
            OrderError::PaymentAmountMismatch {
                expected: money,
                paid: money,
            },
        ];
        for error in &all {
            match error {
                OrderError::OrderNotFound
                | OrderError::OrderAlreadyExists
                | OrderError::OrderEmpty
                | OrderError::TooManyOrderLines { .. }
                | OrderError::QuantityOutOfRange { .. }
                | OrderError::DuplicateOrderLine { .. }
                | OrderError::CurrencyMismatch { .. }
                | OrderError::AmountOverflow
                | OrderError::OrderNotPending { .. }
                | OrderError::OrderNotConfirmed
                | OrderError::OrderAlreadyPaid
                | OrderError::OrderNotPaid
                | OrderError::OrderAlreadyShipped
                | OrderError::OrderRejected
                | OrderError::OrderCancelled
                | OrderError::PaymentAmountMismatch { .. } => {}
            }
        }
        all
    }

    fn rule_codes<E: RuleViolation>(errors: &[E]) -> (Vec<&'static str>, Vec<&'static str>) {
        let codes = errors.iter().map(RuleViolation::code).collect();
        let not_found = errors
            .iter()
            .filter(|error| error.is_not_found())
            .map(RuleViolation::code)
            .collect();
        (codes, not_found)
    }

    #[test]
    fn every_business_rule_code_is_listed_in_the_document() {
        let document = json_document();
        let listed: Vec<&str> = document["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|code| code.as_str().unwrap())
            .collect();
        let (user, user_missing) = rule_codes(&user_errors());
        let (product, product_missing) = rule_codes(&product_errors());
        let (order, order_missing) = rule_codes(&order_errors());
        assert_eq!(user, USER_RULES);
        assert_eq!(product, PRODUCT_RULES);
        assert_eq!(order, ORDER_RULES);
        assert_eq!(
            [user_missing, product_missing, order_missing].concat(),
            NOT_FOUND_RULES
        );
        let store: Vec<&str> = [
            Refusal::<UserError>::Taken(UniqueKey::Email),
            Refusal::Taken(UniqueKey::Sku),
            Refusal::Contention,
        ]
        .iter()
        .map(Refusal::code)
        .collect();
        assert_eq!(store, STORE_RULES);
        let version = Refusal::<UserError>::VersionMismatch { expected: 1 }.code();
        let api: Vec<&str> = api_errors().iter().map(ApiError::code).collect();
        for code in [user, product, order, store, api, vec![version]]
            .concat()
            .into_iter()
            .chain(OPERATOR_RULES.iter().copied())
            .chain(["IDEMPOTENCY_KEY_IN_USE", "IDEMPOTENCY_KEY_REUSED"])
        {
            assert!(listed.contains(&code), "{code} is not in the document");
        }
        assert_eq!(
            listed.len(),
            listed.iter().collect::<BTreeSet<_>>().len(),
            "codes are listed once"
        );
    }

    /// One of each `ApiError` variant (exhaustive: a new variant must be listed here).
    fn api_errors() -> Vec<ApiError> {
        let all = vec![
            ApiError::Malformed(String::new()),
            ApiError::Unauthenticated,
            ApiError::Forbidden,
            ApiError::NotFound,
            ApiError::MethodNotAllowed,
            ApiError::VersionMismatch { expected: 1 },
            ApiError::PayloadTooLarge,
            ApiError::UnsupportedMediaType,
            ApiError::validation("field", "reason"),
            ApiError::RateLimited {
                retry_after: Duration::from_secs(1),
            },
            ApiError::ProjectionLagging {
                retry_after: Duration::from_secs(1),
            },
            ApiError::Unavailable("down".into()),
            ApiError::internal("broken"),
        ];
        for error in &all {
            match error {
                ApiError::Malformed(_)
                | ApiError::Unauthenticated
                | ApiError::Forbidden
                | ApiError::NotFound
                | ApiError::MethodNotAllowed
                | ApiError::VersionMismatch { .. }
                | ApiError::PayloadTooLarge
                | ApiError::UnsupportedMediaType
                | ApiError::Validation(_)
                | ApiError::RateLimited { .. }
                | ApiError::ProjectionLagging { .. }
                | ApiError::Unavailable(_)
                | ApiError::Internal(_) => {}
                // Carry a code of their own, checked with the rules.
                ApiError::Conflict { .. } | ApiError::Unprocessable { .. } => {}
            }
        }
        all
    }

    #[test]
    fn general_codes_answer_with_their_documented_status() {
        for error in api_errors() {
            let code = error.code();
            let documented = GENERAL_CODES
                .iter()
                .find(|(_, listed, _)| *listed == code)
                .unwrap_or_else(|| panic!("{code} is not a general code"));
            assert_eq!(documented.0, error.status().as_u16(), "{code}");
        }
    }

    #[test]
    fn hand_written_shapes_match_what_is_serialized() {
        let document = json_document();
        let event = StoredEvent {
            event_id: uuid::Uuid::nil(),
            position: 1,
            recorded_at: chrono::Utc::now(),
            aggregate_type: "user".to_owned(),
            aggregate_id: uuid::Uuid::nil().to_string(),
            sequence: 1,
            event_type: "UserDeactivated".to_owned(),
            event_version: "1".to_owned(),
            payload: hindsight_commands::event::Payload::from_value(&json!("UserDeactivated")),
            metadata: EventMetadata::for_request(
                hindsight_commands::Actor::system(),
                "request".to_owned(),
            ),
        };
        let event = serde_json::to_value(&event).unwrap();
        assert_eq!(keys(&event), property_keys(&document, "Event"));
        assert_eq!(
            keys(&event["metadata"]),
            property_keys(&document, "EventMetadata")
        );
        let pair = crate::auth::TokenPair {
            access_token: String::new(),
            refresh_token: String::new(),
            token_type: "Bearer",
            expires_in: 900,
        };
        assert_eq!(
            keys(&serde_json::to_value(pair).unwrap()),
            property_keys(&document, "TokenPair")
        );
        let broken = hindsight_commands::integrity::Broken {
            position: 1,
            kind: hindsight_commands::integrity::BrokenKind::ChainBroken,
            aggregate_type: None,
            aggregate_id: None,
            sequence: None,
            reason: String::new(),
        };
        let report = hindsight_commands::integrity::VerifyReport {
            ok: false,
            checked: 1,
            checkpoints: 0,
            sealed_up_to: 0,
            first_broken: Some(broken),
        };
        let report = serde_json::to_value(report).unwrap();
        assert_eq!(keys(&report), property_keys(&document, "IntegrityReport"));
        assert_eq!(
            keys(&report["first_broken"]),
            property_keys(&document, "BrokenLink")
        );
    }
}
