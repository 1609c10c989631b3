//! The read models: each folds real events, written through the command bus, into its
//! tables, and its queries answer the views, filters, sorts and pages the API serves.

use std::collections::BTreeSet;

use hindsight_commands::event::{read_events, Payload};
use hindsight_commands::{Actor, CommandBus, EventMetadata, StoreSettings, StoredEvent};
use hindsight_domain::ids::{OrderId, ProductId, UserId};
use hindsight_domain::order::{NewOrderLine, OrderCommand, OrderEvent, OrderStatus};
use hindsight_domain::product::{ProductCommand, ProductEvent, ProductStatus};
use hindsight_domain::role::Role;
use hindsight_domain::user::{PasswordHash, UserCommand, UserStatus};
use hindsight_domain::values::{
    Currency, Description, Email, Money, PersonName, ProductName, Quantity, Sku,
};
use hindsight_domain::DomainEvent;
use hindsight_projections::audit_trail::{self, AuditTrail, TrailFilter};
use hindsight_projections::orders::{self, OrderFilter, Orders};
use hindsight_projections::page::{Page, PageRequest, QueryError};
use hindsight_projections::products::{self, ProductFilter, ProductSort, Products};
use hindsight_projections::read_model::{ApplyError, ReadModel};
use hindsight_projections::sales::{self, Sales};
use hindsight_projections::users::{self, UserFilter, Users};
use hindsight_projections::worker;
use hindsight_tests::{append_raw_event, TestDb};
use uuid::Uuid;

/// The password hash every test user gets; it must never show up in a read model.
const HASH_MARKER: &str = "S3CRETHASHMARKER";

fn password_hash() -> PasswordHash {
    PasswordHash::new(format!(
        "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA${HASH_MARKER}"
    ))
    .unwrap()
}

fn eur(amount: i64) -> Money {
    Money::new(amount, Currency::EUR).unwrap()
}

fn qty(n: u32) -> Quantity {
    Quantity::new(n).unwrap()
}

/// A product as the tests know it, to place orders for it.
#[derive(Debug, Clone)]
struct Item {
    id: ProductId,
    sku: String,
    name: String,
    price: Money,
}

/// A database and the command bus over it, with the steps the order process would take.
struct Shop {
    db: TestDb,
    bus: CommandBus,
    admin: UserId,
}

impl Shop {
    async fn open() -> Self {
        let db = TestDb::new().await;
        let bus = db.commands(StoreSettings::default());
        let mut shop = Self {
            db,
            bus,
            admin: UserId::new(),
        };
        shop.admin = shop
            .register(
                Actor::system(),
                "admin@example.com",
                "Ada Admin",
                Role::Admin,
            )
            .await;
        shop
    }

    fn metadata(actor: Actor) -> EventMetadata {
        EventMetadata::for_request(actor, format!("req-{}", Uuid::new_v4().simple()))
    }

    fn as_admin(&self) -> Actor {
        Actor::user(self.admin.as_uuid(), Role::Admin)
    }

    async fn register(&self, actor: Actor, email: &str, name: &str, role: Role) -> UserId {
        let id = UserId::new();
        let command = UserCommand::Register {
            user_id: id,
            email: Email::parse(email).unwrap(),
            name: PersonName::parse(name).unwrap(),
            password_hash: password_hash(),
            role,
        };
        self.user(actor, id, command).await;
        id
    }

    async fn user(&self, actor: Actor, id: UserId, command: UserCommand) {
        self.bus
            .users
            .execute(id.as_uuid(), command, &Self::metadata(actor), None)
            .await
            .unwrap()
            .unwrap();
    }

    async fn create_product(
        &self,
        sku: &str,
        name: &str,
        description: &str,
        price: i64,
        stock: u32,
    ) -> Item {
        let id = ProductId::new();
        let command = ProductCommand::Create {
            product_id: id,
            sku: Sku::parse(sku).unwrap(),
            name: ProductName::parse(name).unwrap(),
            description: Description::parse(description).unwrap(),
            price: eur(price),
            stock,
        };
        self.product(self.as_admin(), id, command).await;
        Item {
            id,
            sku: sku.to_owned(),
            name: name.to_owned(),
            price: eur(price),
        }
    }

    async fn product(&self, actor: Actor, id: ProductId, command: ProductCommand) {
        self.bus
            .products
            .execute(id.as_uuid(), command, &Self::metadata(actor), None)
            .await
            .unwrap()
            .unwrap();
    }

    async fn order(&self, actor: Actor, id: OrderId, command: OrderCommand) {
        self.bus
            .orders
            .execute(id.as_uuid(), command, &Self::metadata(actor), None)
            .await
            .unwrap()
            .unwrap();
    }

    /// Places an order and leaves it pending.
    async fn place_pending(&self, customer: UserId, lines: &[(&Item, u32)]) -> OrderId {
        let id = OrderId::new();
        let lines = lines
            .iter()
            .map(|(item, quantity)| NewOrderLine {
                product_id: item.id,
                sku: Sku::parse(&item.sku).unwrap(),
                name: ProductName::parse(&item.name).unwrap(),
                quantity: qty(*quantity),
                unit_price: item.price,
            })
            .collect();
        let command = OrderCommand::Place {
            order_id: id,
            customer_id: customer,
            lines,
        };
        self.order(Actor::user(customer.as_uuid(), Role::Customer), id, command)
            .await;
        id
    }

    /// Places an order and reserves its stock as the order process does: confirmed when
    /// every line is reserved, else rejected with the refusing rule's code.
    async fn place(&self, customer: UserId, lines: &[(&Item, u32)]) -> OrderId {
        let id = self.place_pending(customer, lines).await;
        let mut reserved = Vec::new();
        for (item, quantity) in lines {
            let outcome = self
                .bus
                .products
                .execute(
                    item.id.as_uuid(),
                    ProductCommand::ReserveStock {
                        order_id: id,
                        quantity: qty(*quantity),
                    },
                    &Self::metadata(Actor::system()),
                    None,
                )
                .await
                .unwrap();
            if let Err(refusal) = outcome {
                for item in reserved {
                    let release = ProductCommand::ReleaseReservation { order_id: id };
                    self.product(Actor::system(), item, release).await;
                }
                let reason = refusal.code().to_owned();
                self.order(Actor::system(), id, OrderCommand::Reject { reason })
                    .await;
                return id;
            }
            reserved.push(item.id);
        }
        self.order(Actor::system(), id, OrderCommand::Confirm).await;
        id
    }

    async fn pay(&self, customer: UserId, id: OrderId, amount: Money) {
        let actor = Actor::user(customer.as_uuid(), Role::Customer);
        self.order(actor, id, OrderCommand::Pay { amount }).await;
    }

    async fn ship(&self, id: OrderId, items: &[&Item]) {
        self.order(self.as_admin(), id, OrderCommand::Ship).await;
        for item in items {
            let commit = ProductCommand::CommitReservation { order_id: id };
            self.product(Actor::system(), item.id, commit).await;
        }
    }

    async fn cancel(&self, customer: UserId, id: OrderId, items: &[&Item]) {
        let actor = Actor::user(customer.as_uuid(), Role::Customer);
        let reason = Some("changed my mind".to_owned());
        self.order(actor, id, OrderCommand::Cancel { reason }).await;
        for item in items {
            let release = ProductCommand::ReleaseReservation { order_id: id };
            self.product(Actor::system(), item.id, release).await;
        }
    }

    async fn events(&self) -> Vec<StoredEvent> {
        read_events(&self.db.pool, 0, i64::MAX, 10_000)
            .await
            .unwrap()
    }

    /// Applies every committed event to `model` in batches of `batch` events, each in its
    /// own transaction, as the worker does.
    async fn apply(&self, model: &dyn ReadModel, batch: usize) {
        let events = self.events().await;
        for chunk in events.chunks(batch) {
            let mut tx = self.db.pool.begin().await.unwrap();
            model.apply(&mut tx, chunk).await.unwrap();
            tx.commit().await.unwrap();
        }
    }

    async fn apply_all(&self, model: &dyn ReadModel) {
        self.apply(model, 10_000).await;
    }

    /// Every row of a table as JSON text, sorted: a table's whole state, comparable.
    async fn table_state(&self, table: &str) -> Vec<String> {
        sqlx::query_scalar(&format!(
            "SELECT row_to_json(t)::text AS row FROM {table} t ORDER BY 1"
        ))
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }
}

/// The shop every test starts from: users in every role and state, products, and orders
/// in every status.
struct Seeded {
    shop: Shop,
    ann: UserId,
    bob: UserId,
    carol: UserId,
    dave: UserId,
    tea: Item,
    coffee: Item,
    mug: Item,
    teapot: Item,
    /// ann: 2 tea + 1 mug, shipped.
    o1: OrderId,
    /// bob: 1 coffee, cancelled after confirmation.
    o2: OrderId,
    /// ann: 100 tea, rejected.
    o3: OrderId,
    /// bob: 1 tea + 2 coffee, shipped.
    o4: OrderId,
    /// ann: 1 mug, paid.
    o5: OrderId,
    /// bob: 1 tea, confirmed.
    o6: OrderId,
    /// ann: 1 coffee, pending.
    o7: OrderId,
}

async fn seed() -> Seeded {
    let shop = Shop::open().await;
    let anonymous = Actor::anonymous();
    let ann = shop
        .register(anonymous, "ann@example.com", "Ann Example", Role::Customer)
        .await;
    let bob = shop
        .register(anonymous, "bob@example.com", "Bob", Role::Customer)
        .await;
    let carol = shop
        .register(anonymous, "carol@example.com", "Carol", Role::Customer)
        .await;
    let dave = shop
        .register(anonymous, "dave@example.com", "Dave", Role::Customer)
        .await;
    let as_ann = Actor::user(ann.as_uuid(), Role::Customer);
    let change_password = UserCommand::ChangePasswordHash {
        password_hash: password_hash(),
    };
    shop.user(as_ann, ann, change_password).await;
    let rename = UserCommand::ChangeName {
        name: PersonName::parse("Bob Builder").unwrap(),
    };
    shop.user(Actor::user(bob.as_uuid(), Role::Customer), bob, rename)
        .await;
    let make_auditor = UserCommand::AssignRole {
        role: Role::Auditor,
    };
    shop.user(shop.as_admin(), carol, make_auditor).await;
    shop.user(shop.as_admin(), dave, UserCommand::Deactivate)
        .await;

    let tea = shop
        .create_product(
            "TEA-1",
            "Green tea",
            "Loose leaf sencha from Shizuoka",
            1999,
            10,
        )
        .await;
    let mut coffee = shop
        .create_product("COF-1", "Coffee beans", "Dark roast arabica", 1250, 5)
        .await;
    let mut mug = shop
        .create_product("MUG-1", "Tea mug", "Stoneware mug for green tea", 899, 3)
        .await;
    let teapot = shop
        .create_product("OLD-1", "Old teapot", "Cast iron", 2999, 1)
        .await;
    shop.product(
        shop.as_admin(),
        tea.id,
        ProductCommand::Restock { quantity: qty(5) },
    )
    .await;
    shop.product(
        shop.as_admin(),
        coffee.id,
        ProductCommand::ChangePrice { price: eur(1350) },
    )
    .await;
    coffee.price = eur(1350);
    shop.product(shop.as_admin(), teapot.id, ProductCommand::Discontinue)
        .await;

    let o1 = shop.place(ann, &[(&tea, 2), (&mug, 1)]).await;
    shop.pay(ann, o1, eur(2 * 1999 + 899)).await;
    shop.ship(o1, &[&tea, &mug]).await;
    let rename_mug = ProductCommand::UpdateDetails {
        name: Some(ProductName::parse("Big tea mug").unwrap()),
        description: None,
    };
    shop.product(shop.as_admin(), mug.id, rename_mug).await;
    mug.name = "Big tea mug".to_owned();

    let o2 = shop.place(bob, &[(&coffee, 1)]).await;
    shop.cancel(bob, o2, &[&coffee]).await;
    let o3 = shop.place(ann, &[(&tea, 100)]).await;
    let o4 = shop.place(bob, &[(&tea, 1), (&coffee, 2)]).await;
    shop.pay(bob, o4, eur(1999 + 2 * 1350)).await;
    shop.ship(o4, &[&tea, &coffee]).await;
    let o5 = shop.place(ann, &[(&mug, 1)]).await;
    shop.pay(ann, o5, eur(899)).await;
    let o6 = shop.place(bob, &[(&tea, 1)]).await;
    let o7 = shop.place_pending(ann, &[(&coffee, 1)]).await;

    Seeded {
        shop,
        ann,
        bob,
        carol,
        dave,
        tea,
        coffee,
        mug,
        teapot,
        o1,
        o2,
        o3,
        o4,
        o5,
        o6,
        o7,
    }
}

/// Walks every page of a list with `limit` rows a page, checking each page's size.
async fn walk<T, F, Fut>(limit: u32, mut fetch: F) -> Vec<T>
where
    F: FnMut(PageRequest) -> Fut,
    Fut: std::future::Future<Output = Result<Page<T>, QueryError>>,
{
    let mut request = PageRequest::first(limit);
    let mut all = Vec::new();
    for _ in 0..1000 {
        let page = fetch(request.clone()).await.unwrap();
        assert!(page.items.len() <= limit as usize);
        let next = page.next_cursor.clone();
        if next.is_some() {
            assert_eq!(
                page.items.len(),
                limit as usize,
                "only the last page is short"
            );
        }
        all.extend(page.items);
        match next {
            Some(cursor) => request = request.after(cursor),
            None => return all,
        }
    }
    panic!("the list never ended");
}

fn assert_invalid_cursor<T: std::fmt::Debug>(result: Result<Page<T>, QueryError>) {
    assert!(
        matches!(result, Err(QueryError::InvalidCursor)),
        "expected InvalidCursor, got {result:?}"
    );
}

#[tokio::test]
async fn users_follow_their_events_and_never_hold_the_password_hash() {
    let s = seed().await;
    let shop = &s.shop;
    shop.apply_all(&Users::live()).await;
    let pool = &shop.db.pool;
    let events = shop.events().await;
    let of = |id: UserId| -> Vec<&StoredEvent> {
        events
            .iter()
            .filter(|e| e.aggregate_type == "user" && e.aggregate_id == id.to_string())
            .collect()
    };

    let ann = users::get(pool, s.ann).await.unwrap().unwrap();
    let ann_events = of(s.ann);
    assert_eq!(ann.id, s.ann);
    assert_eq!(ann.email, "ann@example.com");
    assert_eq!(ann.name, "Ann Example");
    assert_eq!(ann.role, Role::Customer);
    assert_eq!(ann.status, UserStatus::Active);
    assert_eq!(ann.version, 2, "registered, then changed password");
    assert_eq!(ann.created_at, ann_events[0].recorded_at);
    assert_eq!(ann.updated_at, ann_events[1].recorded_at);
    assert!(ann.updated_at > ann.created_at);

    let bob = users::get(pool, s.bob).await.unwrap().unwrap();
    assert_eq!((bob.name.as_str(), bob.version), ("Bob Builder", 2));
    let carol = users::get(pool, s.carol).await.unwrap().unwrap();
    assert_eq!(carol.role, Role::Auditor);
    let dave = users::get(pool, s.dave).await.unwrap().unwrap();
    assert_eq!(dave.status, UserStatus::Deactivated);
    assert_eq!(dave.updated_at, of(s.dave)[1].recorded_at);
    assert_eq!(users::get(pool, UserId::new()).await.unwrap(), None);

    let json = serde_json::to_value(&ann).unwrap();
    let mut fields: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "created_at",
            "email",
            "id",
            "name",
            "role",
            "status",
            "updated_at",
            "version"
        ]
    );
    assert_eq!(json["status"], "active");
    assert_eq!(json["role"], "customer");

    // Reactivation brings the user back.
    shop.user(shop.as_admin(), s.dave, UserCommand::Reactivate)
        .await;
    let last = shop.events().await.pop().unwrap();
    let mut tx = pool.begin().await.unwrap();
    Users::live()
        .apply(&mut tx, std::slice::from_ref(&last))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let dave = users::get(pool, s.dave).await.unwrap().unwrap();
    assert_eq!((dave.status, dave.version), (UserStatus::Active, 3));

    let rows = shop.table_state("user_views").await.join("\n");
    assert!(rows.contains("ann@example.com"));
    assert!(!rows.contains(HASH_MARKER) && !rows.contains("argon2"));
}

#[tokio::test]
async fn users_list_by_role_and_status_in_pages() {
    let s = seed().await;
    let shop = &s.shop;
    shop.apply_all(&Users::live()).await;
    let pool = &shop.db.pool;
    let ids = |users: Vec<users::UserView>| users.into_iter().map(|u| u.id).collect::<Vec<_>>();

    let everyone = users::list(pool, &UserFilter::default(), &PageRequest::default())
        .await
        .unwrap();
    assert_eq!(everyone.next_cursor, None);
    assert_eq!(
        ids(everyone.items.clone()),
        [shop.admin, s.ann, s.bob, s.carol, s.dave],
        "oldest first"
    );

    let customers = UserFilter {
        role: Some(Role::Customer),
        status: None,
    };
    let walked = walk(2, |page| {
        let filter = customers.clone();
        async move { users::list(pool, &filter, &page).await }
    })
    .await;
    assert_eq!(ids(walked), [s.ann, s.bob, s.dave]);

    let deactivated = UserFilter {
        role: None,
        status: Some(UserStatus::Deactivated),
    };
    let page = users::list(pool, &deactivated, &PageRequest::default())
        .await
        .unwrap();
    assert_eq!(ids(page.items), [s.dave]);
    let active_customers = UserFilter {
        role: Some(Role::Customer),
        status: Some(UserStatus::Active),
    };
    let page = users::list(pool, &active_customers, &PageRequest::default())
        .await
        .unwrap();
    assert_eq!(ids(page.items), [s.ann, s.bob]);

    for limit in [1, 2, 3, 5] {
        let walked = walk(limit, |page| async move {
            users::list(pool, &UserFilter::default(), &page).await
        })
        .await;
        assert_eq!(walked, everyone.items, "limit {limit}");
    }

    let first = users::list(pool, &customers, &PageRequest::first(1))
        .await
        .unwrap();
    let cursor = first.next_cursor.unwrap();
    let other_filter = PageRequest::first(1).after(cursor);
    assert_invalid_cursor(users::list(pool, &UserFilter::default(), &other_filter).await);
    let garbage = PageRequest::first(1).after("not-a-cursor");
    assert_invalid_cursor(users::list(pool, &customers, &garbage).await);
}

#[tokio::test]
async fn products_keep_stock_like_the_aggregate() {
    let s = seed().await;
    let shop = &s.shop;
    shop.apply_all(&Products::live()).await;
    let pool = &shop.db.pool;

    let get = |id| async move { products::get(pool, id).await.unwrap().unwrap() };
    let tea = get(s.tea.id).await;
    // 10 + 5 restocked; 2 (o1) and 1 (o4) sold, 1 (o6) reserved; o3 never reserved.
    assert_eq!((tea.stock_available, tea.stock_reserved), (11, 1));
    assert_eq!(tea.sku, "TEA-1");
    assert_eq!(tea.name, "Green tea");
    assert_eq!(tea.description, "Loose leaf sencha from Shizuoka");
    assert_eq!(tea.price, eur(1999));
    assert_eq!(tea.status, ProductStatus::Active);
    // 5; 1 reserved and released (o2); 2 sold (o4); o7 is pending and reserved nothing.
    let coffee = get(s.coffee.id).await;
    assert_eq!((coffee.stock_available, coffee.stock_reserved), (3, 0));
    assert_eq!(coffee.price, eur(1350));
    // 3; 1 sold (o1), 1 reserved for the paid o5.
    let mug = get(s.mug.id).await;
    assert_eq!((mug.stock_available, mug.stock_reserved), (1, 1));
    assert_eq!(mug.name, "Big tea mug");
    assert_eq!(mug.description, "Stoneware mug for green tea");
    let teapot = get(s.teapot.id).await;
    assert_eq!(teapot.status, ProductStatus::Discontinued);
    assert_eq!((teapot.stock_available, teapot.stock_reserved), (1, 0));

    // Every field agrees with the aggregate's own state and the product's events.
    let events = shop.events().await;
    for item in [&s.tea, &s.coffee, &s.mug, &s.teapot] {
        let view = get(item.id).await;
        let loaded = shop
            .bus
            .products
            .load(item.id.as_uuid())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(view.stock_available as u64, loaded.state.stock_available());
        assert_eq!(view.stock_reserved as u64, loaded.state.stock_reserved());
        assert_eq!(view.version as u64, loaded.version);
        let own: Vec<_> = events
            .iter()
            .filter(|e| e.aggregate_id == item.id.to_string())
            .collect();
        assert_eq!(view.created_at, own[0].recorded_at);
        assert_eq!(view.updated_at, own[own.len() - 1].recorded_at);
    }
    let json = serde_json::to_value(&tea).unwrap();
    assert_eq!(
        json["price"],
        serde_json::json!({"amount": 1999, "currency": "EUR"})
    );
    assert_eq!(json["status"], "active");
    assert_eq!(products::get(pool, ProductId::new()).await.unwrap(), None);
}

#[tokio::test]
async fn products_search_filter_sort_and_page() {
    let s = seed().await;
    let shop = &s.shop;
    shop.apply_all(&Products::live()).await;
    let pool = &shop.db.pool;
    let search = |filter: ProductFilter, sort: ProductSort| async move {
        let page = products::list(pool, &filter, sort, &PageRequest::first(100))
            .await
            .unwrap();
        assert_eq!(page.next_cursor, None);
        page.items.into_iter().map(|p| p.id).collect::<Vec<_>>()
    };
    let q = |text: &str| ProductFilter {
        q: Some(text.to_owned()),
        ..ProductFilter::default()
    };
    let by_created = ProductSort::CreatedAtAscending;
    let (tea, coffee, mug, teapot) = (s.tea.id, s.coffee.id, s.mug.id, s.teapot.id);

    // Plain words match whole words and prefixes, in the name or the description.
    assert_eq!(search(q("tea"), by_created).await, [tea, mug, teapot]);
    assert_eq!(search(q("GRE"), by_created).await, [tea, mug]);
    assert_eq!(search(q("green mug"), by_created).await, [mug]);
    assert_eq!(search(q("shizuoka"), by_created).await, [tea]);
    // The mug was renamed "Big tea mug" after it had been sold.
    assert_eq!(search(q("big"), by_created).await, [mug]);
    // Anything else is a web search: phrases, exclusions, alternatives.
    assert_eq!(search(q("tea -mug"), by_created).await, [tea]);
    assert_eq!(search(q("\"dark roast\""), by_created).await, [coffee]);
    assert_eq!(search(q("iron or mug"), by_created).await, [mug, teapot]);
    assert!(search(q("nothing-like-this"), by_created).await.is_empty());
    assert_eq!(
        search(q("  "), by_created).await,
        [tea, coffee, mug, teapot]
    );

    let status = |status| ProductFilter {
        status: Some(status),
        ..ProductFilter::default()
    };
    assert_eq!(
        search(status(ProductStatus::Discontinued), by_created).await,
        [teapot]
    );
    assert_eq!(
        search(status(ProductStatus::Active), by_created).await,
        [tea, coffee, mug]
    );
    let priced = |min, max| ProductFilter {
        min_price: min,
        max_price: max,
        ..ProductFilter::default()
    };
    assert_eq!(
        search(priced(Some(1350), Some(2999)), by_created).await,
        [tea, coffee, teapot],
        "both bounds are inclusive"
    );
    assert_eq!(
        search(priced(Some(1351), None), by_created).await,
        [tea, teapot]
    );
    assert_eq!(search(priced(None, Some(899)), by_created).await, [mug]);
    let combined = ProductFilter {
        q: Some("tea".to_owned()),
        status: Some(ProductStatus::Active),
        min_price: Some(900),
        max_price: None,
    };
    assert_eq!(search(combined, by_created).await, [tea]);

    let all = ProductFilter::default;
    assert_eq!(
        search(all(), ProductSort::Name).await,
        [mug, coffee, tea, teapot]
    );
    assert_eq!(
        search(all(), ProductSort::PriceAscending).await,
        [mug, coffee, tea, teapot]
    );
    assert_eq!(
        search(all(), ProductSort::PriceDescending).await,
        [teapot, tea, coffee, mug]
    );
    assert_eq!(search(all(), by_created).await, [tea, coffee, mug, teapot]);
    assert_eq!(
        search(all(), ProductSort::CreatedAtDescending).await,
        [teapot, mug, coffee, tea]
    );
    assert_eq!(ProductSort::default(), by_created);

    for sort in ProductSort::ALL {
        let expected = search(all(), sort).await;
        for limit in [1, 2, 3] {
            let walked = walk(limit, |page| async move {
                products::list(pool, &ProductFilter::default(), sort, &page).await
            })
            .await;
            let walked: Vec<_> = walked.into_iter().map(|p| p.id).collect();
            assert_eq!(walked, expected, "{sort} by {limit}");
        }
        let first = products::list(pool, &all(), sort, &PageRequest::first(1))
            .await
            .unwrap();
        let cursor = first.next_cursor.unwrap();
        for other in ProductSort::ALL.into_iter().filter(|other| *other != sort) {
            let request = PageRequest::first(1).after(cursor.clone());
            assert_invalid_cursor(products::list(pool, &all(), other, &request).await);
        }
        let request = PageRequest::first(1).after(cursor.clone());
        assert_invalid_cursor(products::list(pool, &q("tea"), sort, &request).await);
    }
    let walked = walk(1, |page| async move {
        products::list(pool, &q("tea"), ProductSort::PriceDescending, &page).await
    })
    .await;
    let walked: Vec<_> = walked.into_iter().map(|p| p.id).collect();
    assert_eq!(walked, [teapot, tea, mug]);
    let garbage = PageRequest::first(1).after("eyJ2IjoxfQ");
    assert_invalid_cursor(products::list(pool, &all(), by_created, &garbage).await);
}

#[tokio::test]
async fn orders_show_status_lines_and_rejection_and_list_newest_first() {
    let s = seed().await;
    let shop = &s.shop;
    shop.apply_all(&Orders::live()).await;
    let pool = &shop.db.pool;
    let get = |id| async move { orders::get(pool, id).await.unwrap().unwrap() };

    let o1 = get(s.o1).await;
    assert_eq!(o1.customer_id, s.ann);
    assert_eq!(o1.status, OrderStatus::Shipped);
    assert_eq!(o1.total, eur(2 * 1999 + 899));
    assert_eq!(o1.rejection_reason, None);
    assert_eq!(o1.version, 4, "placed, confirmed, paid, shipped");
    assert_eq!(o1.lines.len(), 2);
    assert_eq!(o1.lines[0].product_id, s.tea.id);
    assert_eq!(o1.lines[0].quantity, qty(2));
    assert_eq!(o1.lines[0].unit_price, eur(1999));
    assert_eq!(o1.lines[0].line_total, eur(3998));
    assert_eq!(
        o1.lines[1].name.as_str(),
        "Tea mug",
        "as it was named when placed"
    );
    assert!(o1.updated_at > o1.created_at);

    let json = serde_json::to_value(&o1).unwrap();
    assert!(json.get("rejection_reason").is_none());
    assert_eq!(json["status"], "shipped");
    assert_eq!(
        json["lines"][0],
        serde_json::json!({
            "product_id": s.tea.id, "sku": "TEA-1", "name": "Green tea", "quantity": 2,
            "unit_price": {"amount": 1999, "currency": "EUR"},
            "line_total": {"amount": 3998, "currency": "EUR"},
        })
    );
    assert_eq!(
        json["total"],
        serde_json::json!({"amount": 4897, "currency": "EUR"})
    );

    let o3 = get(s.o3).await;
    assert_eq!(o3.status, OrderStatus::Rejected);
    assert_eq!(o3.rejection_reason.as_deref(), Some("INSUFFICIENT_STOCK"));
    let json = serde_json::to_value(&o3).unwrap();
    assert_eq!(json["rejection_reason"], "INSUFFICIENT_STOCK");
    for (id, status) in [
        (s.o2, OrderStatus::Cancelled),
        (s.o4, OrderStatus::Shipped),
        (s.o5, OrderStatus::Paid),
        (s.o6, OrderStatus::Confirmed),
        (s.o7, OrderStatus::Pending),
    ] {
        let order = get(id).await;
        assert_eq!(order.status, status, "{id}");
        assert_eq!(order.rejection_reason, None);
    }
    assert_eq!(get(s.o7).await.version, 1);
    assert_eq!(orders::get(pool, OrderId::new()).await.unwrap(), None);

    let list = |filter: OrderFilter| async move {
        walk(2, |page| {
            let filter = filter.clone();
            async move { orders::list(pool, &filter, &page).await }
        })
        .await
        .into_iter()
        .map(|o| o.id)
        .collect::<Vec<_>>()
    };
    assert_eq!(
        list(OrderFilter::default()).await,
        [s.o7, s.o6, s.o5, s.o4, s.o3, s.o2, s.o1]
    );
    let of_ann = OrderFilter {
        customer_id: Some(s.ann),
        status: None,
    };
    assert_eq!(list(of_ann).await, [s.o7, s.o5, s.o3, s.o1]);
    let shipped = OrderFilter {
        customer_id: None,
        status: Some(OrderStatus::Shipped),
    };
    assert_eq!(list(shipped).await, [s.o4, s.o1]);
    let bobs_shipped = OrderFilter {
        customer_id: Some(s.bob),
        status: Some(OrderStatus::Shipped),
    };
    assert_eq!(list(bobs_shipped).await, [s.o4]);
    let nobody = OrderFilter {
        customer_id: Some(s.carol),
        status: None,
    };
    assert!(list(nobody).await.is_empty());
    for limit in [1, 3, 7, 100] {
        let walked = walk(limit, |page| async move {
            orders::list(pool, &OrderFilter::default(), &page).await
        })
        .await;
        assert_eq!(walked.len(), 7, "limit {limit}");
        let distinct: BTreeSet<_> = walked.iter().map(|o| o.id).collect();
        assert_eq!(distinct.len(), 7);
    }

    let first = orders::list(pool, &OrderFilter::default(), &PageRequest::first(1))
        .await
        .unwrap();
    let request = PageRequest::first(1).after(first.next_cursor.unwrap());
    let of_ann = OrderFilter {
        customer_id: Some(s.ann),
        status: None,
    };
    assert_invalid_cursor(orders::list(pool, &of_ann, &request).await);
}

#[tokio::test]
async fn sales_count_only_shipped_orders() {
    let s = seed().await;
    let shop = &s.shop;
    shop.apply_all(&Sales::live()).await;
    let pool = &shop.db.pool;
    let get = |id| async move { sales::get(pool, id).await.unwrap().unwrap() };

    // Shipped: o1 (2 tea, 1 mug) and o4 (1 tea, 2 coffee). Cancelled o2, rejected o3,
    // paid o5, confirmed o6 and pending o7 do not count.
    let tea = get(s.tea.id).await;
    assert_eq!(
        (tea.units_sold, tea.revenue, tea.orders_shipped),
        (3, eur(3 * 1999), 2)
    );
    assert_eq!(
        (tea.sku.as_str(), tea.name.as_str()),
        ("TEA-1", "Green tea")
    );
    let coffee = get(s.coffee.id).await;
    assert_eq!(
        (coffee.units_sold, coffee.revenue, coffee.orders_shipped),
        (2, eur(2 * 1350), 1)
    );
    let mug = get(s.mug.id).await;
    assert_eq!(
        (mug.units_sold, mug.revenue, mug.orders_shipped),
        (1, eur(899), 1)
    );
    assert_eq!(mug.name, "Big tea mug", "renamed after its sale");
    let teapot = get(s.teapot.id).await;
    assert_eq!(
        (teapot.units_sold, teapot.revenue, teapot.orders_shipped),
        (0, eur(0), 0)
    );
    assert_eq!(sales::get(pool, ProductId::new()).await.unwrap(), None);

    let events = shop.events().await;
    let shipped_o4 = events
        .iter()
        .find(|e| e.event_type == "OrderShipped" && e.aggregate_id == s.o4.to_string())
        .unwrap();
    assert_eq!(coffee.updated_at, shipped_o4.recorded_at);
    let json = serde_json::to_value(&teapot).unwrap();
    assert_eq!(
        json["revenue"],
        serde_json::json!({"amount": 0, "currency": "EUR"})
    );

    // Only the lines of orders that may still ship wait.
    let waiting: BTreeSet<Uuid> =
        sqlx::query_scalar("SELECT DISTINCT order_id FROM product_sales_open_lines")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let expected: BTreeSet<Uuid> = [s.o5, s.o6, s.o7].iter().map(|o| o.as_uuid()).collect();
    assert_eq!(waiting, expected);

    let best_sellers = |limit| async move {
        walk(limit, |page| async move { sales::list(pool, &page).await })
            .await
            .into_iter()
            .map(|p| p.product_id)
            .collect::<Vec<_>>()
    };
    for limit in [1, 2, 4] {
        assert_eq!(
            best_sellers(limit).await,
            [s.tea.id, s.coffee.id, s.mug.id, s.teapot.id]
        );
    }
    assert_invalid_cursor(sales::list(pool, &PageRequest::first(1).after("x")).await);

    // Shipping o5 later counts it then.
    shop.ship(s.o5, &[&s.mug]).await;
    let already = events.len();
    let fresh: Vec<_> = shop.events().await.split_off(already);
    let mut tx = pool.begin().await.unwrap();
    Sales::live().apply(&mut tx, &fresh).await.unwrap();
    tx.commit().await.unwrap();
    let mug = get(s.mug.id).await;
    assert_eq!(
        (mug.units_sold, mug.revenue, mug.orders_shipped),
        (2, eur(1798), 2)
    );
}

#[tokio::test]
async fn the_audit_trail_says_who_did_what_for_every_event() {
    let s = seed().await;
    let shop = &s.shop;
    shop.apply_all(&AuditTrail::live()).await;
    let pool = &shop.db.pool;
    let events = shop.events().await;

    let trail = walk(7, |page| async move {
        audit_trail::list(pool, &TrailFilter::default(), &page).await
    })
    .await;
    assert_eq!(trail.len(), events.len(), "one entry per event");
    for (entry, event) in trail.iter().zip(&events) {
        assert_eq!(entry.position, event.position);
        assert_eq!(entry.event_id, event.event_id);
        assert_eq!(entry.recorded_at, event.recorded_at);
        assert_eq!(entry.actor_id, event.metadata.actor_id);
        assert_eq!(entry.actor_role, event.metadata.actor_role);
        assert_eq!(entry.request_id, event.metadata.request_id);
        assert_eq!(entry.correlation_id, event.metadata.correlation_id);
        assert_eq!(entry.causation_id, event.metadata.causation_id);
        assert_eq!(entry.aggregate_type, event.aggregate_type);
        assert_eq!(entry.aggregate_id, event.aggregate_id);
        assert_eq!(entry.event_type, event.event_type);
        assert!(!entry.summary.is_empty());
    }

    let summaries_of = |id: String| -> Vec<(String, String)> {
        trail
            .iter()
            .filter(|entry| entry.aggregate_id == id)
            .map(|entry| (entry.event_type.clone(), entry.summary.clone()))
            .collect()
    };
    let pairs = |expected: &[(&str, String)]| -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(t, summary)| (t.to_string(), summary.clone()))
            .collect()
    };
    assert_eq!(
        summaries_of(s.ann.to_string()),
        pairs(&[
            (
                "UserRegistered",
                "registered ann@example.com as customer".into()
            ),
            ("UserPasswordChanged", "changed password".into()),
        ])
    );
    assert_eq!(
        summaries_of(s.bob.to_string())[1].1,
        "changed name to Bob Builder"
    );
    assert_eq!(
        summaries_of(s.carol.to_string())[1].1,
        "changed role to auditor"
    );
    assert_eq!(
        summaries_of(s.dave.to_string())[1].1,
        "deactivated the account"
    );
    let (o1, o2, o3, o4, o6) = (s.o1, s.o2, s.o3, s.o4, s.o6);
    assert_eq!(
        summaries_of(s.tea.id.to_string()),
        pairs(&[
            (
                "ProductCreated",
                "created TEA-1 \"Green tea\" at 19.99 EUR with 10 units in stock".into()
            ),
            (
                "ProductRestocked",
                "restocked 5 units (available 15)".into()
            ),
            (
                "StockReserved",
                format!("reserved 2 units for order {o1} (available 13)")
            ),
            (
                "ReservationCommitted",
                format!("sold 2 units reserved for order {o1}")
            ),
            (
                "StockReserved",
                format!("reserved 1 unit for order {o4} (available 12)")
            ),
            (
                "ReservationCommitted",
                format!("sold 1 unit reserved for order {o4}")
            ),
            (
                "StockReserved",
                format!("reserved 1 unit for order {o6} (available 11)")
            ),
        ])
    );
    assert_eq!(
        summaries_of(s.coffee.id.to_string())[1..4],
        pairs(&[
            ("ProductPriceChanged", "changed price to 13.50 EUR".into()),
            (
                "StockReserved",
                format!("reserved 1 unit for order {o2} (available 4)")
            ),
            (
                "StockReleased",
                format!("released 1 unit from order {o2} (available 5)")
            ),
        ])
    );
    assert_eq!(
        summaries_of(s.mug.id.to_string())[3],
        (
            "ProductDetailsUpdated".to_owned(),
            "renamed to \"Big tea mug\"".to_owned()
        )
    );
    assert_eq!(
        summaries_of(s.teapot.id.to_string())[1].1,
        "discontinued the product"
    );
    assert_eq!(
        summaries_of(o1.to_string()),
        pairs(&[
            (
                "OrderPlaced",
                "placed an order of 2 lines totalling 48.97 EUR".into()
            ),
            ("OrderConfirmed", "confirmed the order".into()),
            ("OrderPaid", "paid 48.97 EUR".into()),
            ("OrderShipped", "shipped the order".into()),
        ])
    );
    assert_eq!(
        summaries_of(o2.to_string())[2].1,
        "cancelled the confirmed order: changed my mind"
    );
    assert_eq!(
        summaries_of(o3.to_string()),
        pairs(&[
            (
                "OrderPlaced",
                "placed an order of 1 line totalling 1999.00 EUR".into()
            ),
            ("OrderRejected", "rejected: INSUFFICIENT_STOCK".into()),
        ])
    );

    let rows = [
        shop.table_state("audit_trail").await,
        shop.table_state("audit_trail_product_stock").await,
    ]
    .concat()
    .join("\n");
    assert!(!rows.contains(HASH_MARKER) && !rows.contains("argon2"));
}

#[tokio::test]
async fn the_trail_of_one_entity_reads_only_its_entries() {
    // 6,000 entries of 600 entities, of two types. Without a usable index Postgres walks
    // the trail in position order (or scans it) and filters it; with one, it reads the
    // entity's ten entries. The table is not analysed, as a new database's is not.
    let db = TestDb::new().await;
    sqlx::query(
        "INSERT INTO audit_trail (position, event_id, recorded_at, actor_id, actor_role, \
                                  request_id, correlation_id, causation_id, aggregate_type, \
                                  aggregate_id, event_type, summary) \
         SELECT n, gen_random_uuid(), now(), NULL, 'system', 'r', 'r', 'r', \
                CASE WHEN n % 2 = 0 THEN 'product' ELSE 'order' END, \
                md5((n % 600)::text)::uuid::text, 'Seeded', 'seeded' \
         FROM generate_series(1, 6000) AS n",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let entity: Uuid = sqlx::query_scalar("SELECT md5('7')::uuid")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let filters = [
        TrailFilter {
            aggregate_id: Some(entity),
            ..TrailFilter::default()
        },
        TrailFilter {
            aggregate_type: Some("order".to_owned()),
            aggregate_id: Some(entity),
            ..TrailFilter::default()
        },
    ];
    for filter in filters {
        let mut tx = db.pool.begin().await.unwrap();
        let page = audit_trail::list(&mut *tx, &filter, &PageRequest::first(50))
            .await
            .unwrap();
        let positions: Vec<i64> = page.items.iter().map(|entry| entry.position).collect();
        assert_eq!(positions, (0..10).map(|k| 7 + 600 * k).collect::<Vec<_>>());
        // What this transaction's scans of the trail returned: index entries and rows read
        // by sequential scans.
        let read: i64 = sqlx::query_scalar(
            "SELECT pg_stat_get_xact_tuples_returned('audit_trail'::regclass) \
                  + (SELECT sum(pg_stat_get_xact_tuples_returned(indexrelid))::int8 \
                     FROM pg_index WHERE indrelid = 'audit_trail'::regclass)",
        )
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!(read, 10, "{filter:?} read {read} entries or rows");
        tx.rollback().await.unwrap();
    }
}

#[tokio::test]
async fn the_audit_trail_filters_by_actor_entity_and_time() {
    let s = seed().await;
    let shop = &s.shop;
    shop.apply_all(&AuditTrail::live()).await;
    let pool = &shop.db.pool;
    let events = shop.events().await;
    let list = |filter: TrailFilter| async move {
        walk(2, |page| {
            let filter = filter.clone();
            async move { audit_trail::list(pool, &filter, &page).await }
        })
        .await
        .into_iter()
        .map(|entry| entry.position)
        .collect::<Vec<_>>()
    };
    let positions = |keep: &dyn Fn(&StoredEvent) -> bool| -> Vec<i64> {
        events
            .iter()
            .filter(|e| keep(e))
            .map(|e| e.position)
            .collect()
    };

    let by_ann = TrailFilter {
        actor_id: Some(s.ann.as_uuid()),
        ..TrailFilter::default()
    };
    let expected = positions(&|e| e.metadata.actor_id == Some(s.ann.as_uuid()));
    assert_eq!(
        expected.len(),
        7,
        "a password change, 4 placements and 2 payments"
    );
    assert_eq!(list(by_ann).await, expected);

    let o1 = TrailFilter {
        aggregate_type: Some("order".to_owned()),
        aggregate_id: Some(s.o1.as_uuid()),
        ..TrailFilter::default()
    };
    let expected = positions(&|e| e.aggregate_id == s.o1.to_string());
    assert_eq!(expected.len(), 4);
    assert_eq!(list(o1).await, expected);
    let o1_of_any_type = TrailFilter {
        aggregate_id: Some(s.o1.as_uuid()),
        ..TrailFilter::default()
    };
    assert_eq!(list(o1_of_any_type).await, expected);
    let wrong_type = TrailFilter {
        aggregate_type: Some("product".to_owned()),
        aggregate_id: Some(s.o1.as_uuid()),
        ..TrailFilter::default()
    };
    assert!(list(wrong_type).await.is_empty());
    let products = TrailFilter {
        aggregate_type: Some("product".to_owned()),
        ..TrailFilter::default()
    };
    assert_eq!(
        list(products).await,
        positions(&|e| e.aggregate_type == "product")
    );

    let (from, to) = (events[4].recorded_at, events[11].recorded_at);
    let window = TrailFilter {
        from: Some(from),
        to: Some(to),
        ..TrailFilter::default()
    };
    assert_eq!(
        list(window).await,
        events[4..=11]
            .iter()
            .map(|e| e.position)
            .collect::<Vec<_>>(),
        "both ends are inclusive"
    );
    let since = TrailFilter {
        from: Some(events[events.len() - 1].recorded_at),
        ..TrailFilter::default()
    };
    assert_eq!(list(since).await, [events[events.len() - 1].position]);
    let until = TrailFilter {
        to: Some(events[0].recorded_at),
        ..TrailFilter::default()
    };
    assert_eq!(list(until).await, [events[0].position]);
    let ann_on_o1 = TrailFilter {
        actor_id: Some(s.ann.as_uuid()),
        aggregate_type: Some("order".to_owned()),
        aggregate_id: Some(s.o1.as_uuid()),
        from: Some(from),
        to: None,
    };
    let expected = positions(&|e| {
        e.metadata.actor_id == Some(s.ann.as_uuid())
            && e.aggregate_id == s.o1.to_string()
            && e.recorded_at >= from
    });
    assert_eq!(expected.len(), 2, "placed and paid by ann");
    assert_eq!(list(ann_on_o1).await, expected);

    let first = audit_trail::list(pool, &TrailFilter::default(), &PageRequest::first(3))
        .await
        .unwrap();
    let request = PageRequest::first(3).after(first.next_cursor.unwrap());
    let by_ann = TrailFilter {
        actor_id: Some(s.ann.as_uuid()),
        ..TrailFilter::default()
    };
    assert_invalid_cursor(audit_trail::list(pool, &by_ann, &request).await);
    let next = audit_trail::list(pool, &TrailFilter::default(), &request)
        .await
        .unwrap();
    assert_eq!(next.items[0].position, events[3].position);
}

fn models(suffix: &str) -> Vec<Box<dyn ReadModel>> {
    vec![
        Box::new(Users::with_suffix(suffix)),
        Box::new(Products::with_suffix(suffix)),
        Box::new(Orders::with_suffix(suffix)),
        Box::new(Sales::with_suffix(suffix)),
        Box::new(AuditTrail::with_suffix(suffix)),
    ]
}

#[tokio::test]
async fn suffixed_copies_fill_alone_and_every_batching_reaches_the_same_state() {
    let s = seed().await;
    let shop = &s.shop;
    let live = models("");
    let names: Vec<&str> = live.iter().map(|model| model.name()).collect();
    assert_eq!(
        names,
        ["users", "products", "orders", "sales", "audit_trail"]
    );
    let live_tables: Vec<String> = live.iter().flat_map(|model| model.tables()).collect();
    assert_eq!(
        live_tables,
        [
            "user_views",
            "product_views",
            "order_views",
            "product_sales",
            "product_sales_open_lines",
            "audit_trail",
            "audit_trail_product_stock",
        ]
    );

    for (suffix, batch) in [("_rebuild_1", 1), ("_rebuild_7", 7)] {
        let copies: Vec<String> = models(suffix).iter().flat_map(|m| m.tables()).collect();
        for (table, copy) in live_tables.iter().zip(&copies) {
            assert_eq!(*copy, format!("{table}{suffix}"));
            sqlx::query(&format!("CREATE TABLE {copy} (LIKE {table} INCLUDING ALL)"))
                .execute(&shop.db.pool)
                .await
                .unwrap();
        }
        for model in models(suffix) {
            shop.apply(model.as_ref(), batch).await;
        }
        for table in &live_tables {
            assert!(
                shop.table_state(table).await.is_empty(),
                "{table} was written by a suffixed instance"
            );
        }
    }

    for model in &live {
        shop.apply_all(model.as_ref()).await;
    }
    for table in &live_tables {
        let state = shop.table_state(table).await;
        assert!(!state.is_empty(), "{table} is empty");
        for suffix in ["_rebuild_1", "_rebuild_7"] {
            assert_eq!(
                shop.table_state(&format!("{table}{suffix}")).await,
                state,
                "{table}{suffix} differs from {table}"
            );
        }
    }
}

#[tokio::test]
async fn events_a_read_model_does_not_need_are_ignored() {
    let shop = Shop::open().await;
    let item = shop.create_product("X-1", "Thing", "", 100, 1).await;
    // An aggregate type no read model knows, e.g. one a later version adds.
    let mut tx = shop.db.pool.begin().await.unwrap();
    append_raw_event(&mut tx, "raw-1", 1, "SomethingHappened").await;
    tx.commit().await.unwrap();
    for model in models("") {
        shop.apply_all(model.as_ref()).await;
    }
    let pool = &shop.db.pool;
    let page = users::list(pool, &UserFilter::default(), &PageRequest::default())
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1, "only the admin");
    assert!(products::get(pool, item.id).await.unwrap().is_some());
    assert!(sales::get(pool, item.id).await.unwrap().is_some());
    let trail = audit_trail::list(pool, &TrailFilter::default(), &PageRequest::default())
        .await
        .unwrap();
    let last = trail.items.last().unwrap();
    assert_eq!(
        (last.aggregate_type.as_str(), last.summary.as_str()),
        ("test", "recorded SomethingHappened")
    );
    assert_eq!(trail.items.len(), 3);
}

/// Applies `events` to `model` in batches of `batch`, each in its own transaction.
async fn apply_events(
    pool: &sqlx::PgPool,
    model: &dyn ReadModel,
    events: &[StoredEvent],
    batch: usize,
) {
    for chunk in events.chunks(batch) {
        let mut tx = pool.begin().await.unwrap();
        model.apply(&mut tx, chunk).await.unwrap();
        tx.commit().await.unwrap();
    }
}

/// An event applied to read models directly and never stored (so it may be one no
/// aggregate would write), shaped after `template`, whose metadata and time it keeps.
fn crafted<E: DomainEvent>(
    template: &StoredEvent,
    position: i64,
    aggregate_type: &str,
    id: Uuid,
    sequence: i64,
    change: &E,
) -> StoredEvent {
    let mut event = template.clone();
    event.event_id = Uuid::new_v4();
    event.position = position;
    event.aggregate_type = aggregate_type.to_owned();
    event.aggregate_id = id.to_string();
    event.sequence = sequence;
    event.event_type = change.event_type().to_owned();
    event.payload = Payload::from_value(&serde_json::to_value(change).unwrap());
    event
}

/// Events the aggregate never emits: reservations and releases of more units than there
/// are. The read models stop stock at zero, as the aggregate's arithmetic does, which a
/// batch's movements added up cannot show: such a product's events are taken one by one,
/// and those of the others in the same batch as usual. Every batching agrees.
#[tokio::test]
async fn stock_moved_below_zero_stops_at_zero_in_every_batching() {
    let shop = Shop::open().await;
    let short = shop
        .create_product("SHORT-1", "Short stock", "Three left", 500, 3)
        .await;
    let plenty = shop
        .create_product("PLENTY-1", "Plenty", "Ten left", 700, 10)
        .await;
    let stored = shop.events().await;
    let last = stored.last().unwrap().clone();

    let (o1, o2) = (OrderId::new(), OrderId::new());
    let moves = [
        // 3 available: the reservation takes it to 0 (not -2), reserving 5.
        (
            &short,
            2,
            ProductEvent::StockReserved {
                order_id: o1,
                quantity: qty(5),
            },
        ),
        (
            &plenty,
            2,
            ProductEvent::StockReserved {
                order_id: o2,
                quantity: qty(2),
            },
        ),
        // 5 reserved: releasing 7 leaves 0 reserved (not -2) and 7 available.
        (
            &short,
            3,
            ProductEvent::StockReleased {
                order_id: o1,
                quantity: qty(7),
            },
        ),
        (
            &plenty,
            3,
            ProductEvent::ReservationCommitted {
                order_id: o2,
                quantity: qty(2),
            },
        ),
        (
            &short,
            4,
            ProductEvent::ProductRestocked { quantity: qty(4) },
        ),
    ];
    let impossible: Vec<StoredEvent> = (last.position + 1..)
        .zip(moves)
        .map(|(position, (item, sequence, change))| {
            crafted(
                &last,
                position,
                "product",
                item.id.as_uuid(),
                sequence,
                &change,
            )
        })
        .collect();
    let all: Vec<StoredEvent> = stored.iter().chain(&impossible).cloned().collect();

    let pool = &shop.db.pool;
    let live: [Box<dyn ReadModel>; 2] = [Box::new(Products::live()), Box::new(AuditTrail::live())];
    for model in &live {
        // Stored first, then the impossible batch whole: products created before it.
        apply_events(pool, model.as_ref(), &stored, 10_000).await;
        apply_events(pool, model.as_ref(), &impossible, 10_000).await;
    }

    let view = products::get(pool, short.id).await.unwrap().unwrap();
    assert_eq!((view.stock_available, view.stock_reserved), (11, 0));
    assert_eq!(view.version, 4);
    assert_eq!(view.updated_at, impossible[4].recorded_at);
    let view = products::get(pool, plenty.id).await.unwrap().unwrap();
    assert_eq!((view.stock_available, view.stock_reserved), (8, 0));
    assert_eq!(view.version, 3);

    let trail = audit_trail::list(
        pool,
        &TrailFilter {
            aggregate_type: Some("product".to_owned()),
            ..TrailFilter::default()
        },
        &PageRequest::first(100),
    )
    .await
    .unwrap();
    let sentences: Vec<&str> = trail
        .items
        .iter()
        .filter(|entry| entry.position > last.position)
        .map(|entry| entry.summary.as_str())
        .collect();
    assert_eq!(
        sentences,
        [
            format!("reserved 5 units for order {o1} (available 0)"),
            format!("reserved 2 units for order {o2} (available 8)"),
            format!("released 7 units from order {o1} (available 7)"),
            format!("sold 2 units reserved for order {o2}"),
            "restocked 4 units (available 11)".to_owned(),
        ]
    );

    // The same events one at a time, and all in one batch (where every product is
    // created in the batch), reach the same rows.
    let tables: Vec<String> = live.iter().flat_map(|model| model.tables()).collect();
    for (suffix, batch) in [("_one", 1), ("_two", 2), ("_all", 10_000)] {
        for table in &tables {
            sqlx::query(&format!(
                "CREATE TABLE {table}{suffix} (LIKE {table} INCLUDING ALL)"
            ))
            .execute(pool)
            .await
            .unwrap();
        }
        let copies: [Box<dyn ReadModel>; 2] = [
            Box::new(Products::with_suffix(suffix)),
            Box::new(AuditTrail::with_suffix(suffix)),
        ];
        for model in &copies {
            apply_events(pool, model.as_ref(), &all, batch).await;
        }
        for table in &tables {
            assert_eq!(
                shop.table_state(&format!("{table}{suffix}")).await,
                shop.table_state(table).await,
                "{table}{suffix} differs from {table}"
            );
        }
    }
}

/// An event for an order or product that was never created fails the batch (the worker
/// then retries it and marks it poison), naming the event, whether the read model reads
/// its rows first or changes them in place.
#[tokio::test]
async fn events_of_entities_never_created_fail_the_batch() {
    let shop = Shop::open().await;
    let tea = shop
        .create_product("TEA-9", "Tea", "For the real product", 500, 3)
        .await;
    let stored = shop.events().await;
    let last = stored.last().unwrap().clone();
    let pool = &shop.db.pool;
    let models: [Box<dyn ReadModel>; 3] = [
        Box::new(Products::live()),
        Box::new(Orders::live()),
        Box::new(AuditTrail::live()),
    ];
    for model in &models {
        apply_events(pool, model.as_ref(), &stored, 10_000).await;
    }

    let (ghost_order, ghost_product) = (Uuid::new_v4(), Uuid::new_v4());
    let restock = ProductEvent::ProductRestocked { quantity: qty(1) };
    let batch = [
        crafted(
            &last,
            last.position + 1,
            "product",
            tea.id.as_uuid(),
            2,
            &restock,
        ),
        crafted(
            &last,
            last.position + 2,
            "product",
            ghost_product,
            2,
            &restock,
        ),
        crafted(
            &last,
            last.position + 3,
            "order",
            ghost_order,
            2,
            &OrderEvent::OrderConfirmed,
        ),
    ];

    for (model, position) in
        models
            .iter()
            .zip([last.position + 2, last.position + 3, last.position + 2])
    {
        let tables = model.tables();
        let mut before = Vec::new();
        for table in &tables {
            before.push(shop.table_state(table).await);
        }
        let mut tx = pool.begin().await.unwrap();
        let error = model.apply(&mut tx, &batch).await.unwrap_err();
        tx.rollback().await.unwrap();
        match error {
            ApplyError::Invariant {
                position: at,
                reason,
            } => {
                assert_eq!(at, position, "{}: {reason}", model.name());
                assert!(reason.contains("never"), "{}: {reason}", model.name());
            }
            other => panic!("{}: {other}", model.name()),
        }
        for (table, state) in tables.iter().zip(before) {
            assert_eq!(shop.table_state(table).await, state, "{table} changed");
        }
    }
}

/// Rows read by this transaction's sequential scans of `table` so far.
async fn rows_scanned(connection: &mut sqlx::PgConnection, table: &str) -> i64 {
    sqlx::query_scalar("SELECT pg_stat_get_xact_tuples_returned($1::regclass)")
        .bind(table)
        .fetch_one(connection)
        .await
        .unwrap()
}

/// Begins the transaction of a batch of `events` events on `session` as the projection
/// workers and rebuilds do, with [`worker::batch_settings`].
async fn begin_batch(
    session: &mut sqlx::PgConnection,
    events: usize,
) -> sqlx::Transaction<'_, sqlx::Postgres> {
    let mut tx = sqlx::Connection::begin(session).await.unwrap();
    sqlx::Executor::execute(&mut *tx, sqlx::raw_sql(worker::batch_settings(events)))
        .await
        .unwrap();
    tx
}

/// The batch sizes whose settings the growth tests apply under: a small batch's (one
/// generic plan per session, made while the table was small) and a large one's.
const BATCH_SIZES: [usize; 2] = [1, worker::SMALL_BATCH + 1];

/// Applies each of `events` to `models` in a batch of its own on `session`.
async fn apply_one_by_one(
    session: &mut sqlx::PgConnection,
    models: &[&dyn ReadModel],
    events: &[StoredEvent],
) {
    for event in events {
        let mut tx = begin_batch(&mut *session, 1).await;
        for model in models {
            model
                .apply(&mut tx, std::slice::from_ref(event))
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
}

/// The orders read model changes the orders of a batch by joining them to `order_views`
/// by id. A plan of that statement made on one session while the table was small (a
/// hash join over the whole table) was kept as the table grew, until an `ANALYZE`:
/// every batch then read every order. Here one session applies a dozen batches to a
/// small table, the table grows by 20,000 orders, and the next batch must still read
/// its own rows only.
#[tokio::test]
async fn an_orders_batch_reads_its_own_rows_however_the_table_grew_under_its_session() {
    let shop = Shop::open().await;
    let customer = shop
        .register(
            Actor::anonymous(),
            "grow@example.com",
            "Gro Wing",
            Role::Customer,
        )
        .await;
    let tea = shop
        .create_product("GROW-1", "Tea", "Green", 500, 100)
        .await;
    for _ in 0..12 {
        shop.place(customer, &[(&tea, 1)]).await;
    }
    let model = Orders::live();
    let mut session = shop.db.pool.acquire().await.unwrap();
    let early = shop.events().await;
    apply_one_by_one(&mut session, &[&model], &early).await;

    sqlx::query(
        "INSERT INTO order_views (id, customer_id, status, lines, total_amount, total_currency, \
                                  created_at, updated_at, version) \
         SELECT gen_random_uuid(), $1, 'confirmed', '[]', 500, 'EUR', now(), now(), 2 \
         FROM generate_series(1, 20000)",
    )
    .bind(customer.as_uuid())
    .execute(&shop.db.pool)
    .await
    .unwrap();
    let last = shop.place(customer, &[(&tea, 1)]).await;
    let late: Vec<StoredEvent> = shop.events().await.into_iter().skip(early.len()).collect();
    let (placed, rest): (Vec<_>, Vec<_>) = late
        .into_iter()
        .partition(|event| event.event_type == "OrderPlaced");
    for size in BATCH_SIZES {
        let mut tx = begin_batch(&mut session, size).await;
        model.apply(&mut tx, &placed).await.unwrap();
        let before = rows_scanned(&mut tx, "order_views").await;
        model.apply(&mut tx, &rest).await.unwrap();
        let scanned = rows_scanned(&mut tx, "order_views").await - before;
        assert_eq!(
            scanned, 0,
            "under the settings of a batch of {size}: the confirmation read the table, not its order by id"
        );
        if size == worker::SMALL_BATCH + 1 {
            tx.commit().await.unwrap();
        }
    }
    let view = orders::get(&shop.db.pool, last).await.unwrap().unwrap();
    assert_eq!(view.status, OrderStatus::Confirmed);
}

/// The same for the tables that grow with the catalogue: the products read model joins a
/// batch's stock movements to `product_views`, the audit trail to its stock of each
/// product. One session applies a dozen restocks while the catalogue is one product, the
/// catalogue grows by 20,000 products, and the next restock must read neither table
/// whole.
#[tokio::test]
async fn a_restock_batch_reads_its_own_rows_however_the_catalogue_grew_under_its_session() {
    let shop = Shop::open().await;
    let tea = shop
        .create_product("GROW-2", "Tea", "Green", 500, 100)
        .await;
    let restock = || ProductCommand::Restock { quantity: qty(1) };
    for _ in 0..12 {
        shop.product(shop.as_admin(), tea.id, restock()).await;
    }
    let (products, trail) = (Products::live(), AuditTrail::live());
    let models: [&dyn ReadModel; 2] = [&products, &trail];
    let mut session = shop.db.pool.acquire().await.unwrap();
    let early = shop.events().await;
    apply_one_by_one(&mut session, &models, &early).await;

    sqlx::query(
        "INSERT INTO product_views (id, sku, name, description, price_amount, price_currency, \
                                    stock_available, stock_reserved, status, created_at, \
                                    updated_at, version) \
         SELECT gen_random_uuid(), 'BULK-' || n, 'Bulk', 'Filler', 100, 'EUR', 5, 0, 'active', \
                now(), now(), 1 \
         FROM generate_series(1, 20000) AS n",
    )
    .execute(&shop.db.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO audit_trail_product_stock (product_id, stock_available) \
         SELECT gen_random_uuid(), 5 FROM generate_series(1, 20000)",
    )
    .execute(&shop.db.pool)
    .await
    .unwrap();
    shop.product(shop.as_admin(), tea.id, restock()).await;
    let late: Vec<StoredEvent> = shop.events().await.into_iter().skip(early.len()).collect();
    assert_eq!(late.len(), 1);
    for size in BATCH_SIZES {
        let mut tx = begin_batch(&mut session, size).await;
        for (model, table) in models
            .iter()
            .zip(["product_views", "audit_trail_product_stock"])
        {
            let before = rows_scanned(&mut tx, table).await;
            model.apply(&mut tx, &late).await.unwrap();
            let scanned = rows_scanned(&mut tx, table).await - before;
            assert_eq!(
                scanned,
                0,
                "{}, under the settings of a batch of {size}: the restock read {table} whole",
                model.name()
            );
        }
        if size == worker::SMALL_BATCH + 1 {
            tx.commit().await.unwrap();
        }
    }
    let view = products::get(&shop.db.pool, tea.id).await.unwrap().unwrap();
    assert_eq!(view.stock_available, 113);
}
