//! A large, valid event history written straight into the event store, for the rebuild
//! scenario.
//!
//! Every event is decided by the real domain aggregates (in memory, from commands), so the
//! history is one the system could have produced: users registering, products created and
//! restocked, orders placed, reserved, confirmed, paid, shipped or cancelled, with the
//! metadata envelope a request or the order process would have written. Rows go in through
//! the event store's own triggers (positions, hash chains, unique keys) in large
//! multi-row inserts, which is what makes a million events quick to write.

use std::collections::HashMap;

use anyhow::{anyhow, Context, Result};
use hindsight_commands::{Actor, EventMetadata};
use hindsight_domain::ids::{OrderId, ProductId, UserId};
use hindsight_domain::order::{NewOrderLine, Order, OrderCommand};
use hindsight_domain::product::{Product, ProductCommand, ProductError};
use hindsight_domain::role::Role;
use hindsight_domain::user::{PasswordHash, User, UserCommand};
use hindsight_domain::values::{
    Currency, Description, Email, Money, PersonName, ProductName, Quantity, Sku,
};
use hindsight_domain::{Aggregate, DomainEvent};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use uuid::Uuid;

const BATCH: usize = 5_000;

#[derive(Debug, Default)]
struct Rows {
    aggregate_type: Vec<&'static str>,
    aggregate_id: Vec<String>,
    sequence: Vec<i64>,
    event_type: Vec<&'static str>,
    event_version: Vec<&'static str>,
    payload: Vec<serde_json::Value>,
    metadata: Vec<serde_json::Value>,
}

impl Rows {
    fn len(&self) -> usize {
        self.sequence.len()
    }
}

/// An aggregate being built, with its version.
#[derive(Debug, Default)]
struct Stream<A> {
    state: A,
    version: i64,
}

#[derive(Debug)]
struct Writer {
    pool: PgPool,
    rows: Rows,
    written: u64,
}

impl Writer {
    /// Decides `command` on `stream` and queues the resulting events.
    async fn decide<A: Aggregate>(
        &mut self,
        stream: &mut Stream<A>,
        id: Uuid,
        command: A::Command,
        metadata: &EventMetadata,
    ) -> Result<std::result::Result<(), A::Error>> {
        let events = match stream.state.handle(command) {
            Ok(events) => events,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let metadata = serde_json::to_value(metadata.to_map())?;
        for event in events {
            stream.version += 1;
            self.rows.aggregate_type.push(A::TYPE);
            self.rows.aggregate_id.push(id.to_string());
            self.rows.sequence.push(stream.version);
            self.rows.event_type.push(event.event_type());
            self.rows.event_version.push(event.event_version());
            self.rows.payload.push(serde_json::to_value(&event)?);
            self.rows.metadata.push(metadata.clone());
            stream.state.apply(event);
        }
        if self.rows.len() >= BATCH {
            self.flush().await?;
        }
        Ok(Ok(()))
    }

    async fn flush(&mut self) -> Result<()> {
        if self.rows.len() == 0 {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.rows);
        let count = rows.len() as u64;
        sqlx::query(
            "INSERT INTO events \
                 (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             SELECT t, i, s, e, v, p, m FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], \
                 $5::text[], $6::jsonb[], $7::jsonb[]) WITH ORDINALITY AS r(t, i, s, e, v, p, m, n) \
             ORDER BY n",
        )
        .bind(rows.aggregate_type)
        .bind(rows.aggregate_id)
        .bind(rows.sequence)
        .bind(rows.event_type)
        .bind(rows.event_version)
        .bind(rows.payload)
        .bind(rows.metadata)
        .execute(&self.pool)
        .await
        .context("inserting seeded events")?;
        self.written += count;
        Ok(())
    }

    fn queued(&self) -> u64 {
        self.written + self.rows.len() as u64
    }
}

fn request() -> String {
    Uuid::new_v4().to_string()
}

fn value<T, E: std::fmt::Display>(result: std::result::Result<T, E>) -> Result<T> {
    result.map_err(|error| anyhow!("building seed data: {error}"))
}

/// Writes at least `events` events: `events / 50` users, `events / 500` products, and
/// orders through their whole life until the count is reached. Answers how many.
pub async fn seed(pool: &PgPool, events: u64, mut on_progress: impl FnMut(u64)) -> Result<u64> {
    let mut rng = StdRng::seed_from_u64(7);
    let run = Uuid::new_v4().simple().to_string();
    let mut writer = Writer {
        pool: pool.clone(),
        rows: Rows::default(),
        written: 0,
    };
    let admin = Actor::user(Uuid::now_v7(), Role::Admin);
    let process = Actor::system();
    let hash = value(PasswordHash::new(
        "$argon2id$v=19$m=19456,t=2,p=1$c2VlZGVkLXVzZXI$Ar9Grw1H7dRZwnnbvmkpzLfcOI1UdPtBZDgBaGr0vJw",
    ))?;

    let users = (events / 50).max(10);
    let mut customers = Vec::with_capacity(users as usize);
    for i in 0..users {
        let id = UserId::new();
        let mut stream = Stream::<User>::default();
        let command = UserCommand::Register {
            user_id: id,
            email: value(Email::parse(&format!("seed-{i}-{run}@bench.example")))?,
            name: value(PersonName::parse(&format!("Seeded Customer {i}")))?,
            password_hash: hash.clone(),
            role: Role::Customer,
        };
        let metadata = EventMetadata::for_request(Actor::anonymous(), request());
        value(
            writer
                .decide(&mut stream, id.as_uuid(), command, &metadata)
                .await?,
        )?;
        customers.push(id);
    }

    let product_count = (events / 500).max(5);
    let mut products: Vec<(ProductId, Stream<Product>)> = Vec::new();
    let mut catalogue: HashMap<ProductId, (Sku, ProductName, Money)> = HashMap::new();
    for i in 0..product_count {
        let id = ProductId::new();
        let sku = value(Sku::parse(&format!("SEED-{i}-{}", &run[..8])))?;
        let name = value(ProductName::parse(&format!("Seeded product {i}")))?;
        let price = value(Money::new(rng.gen_range(100..100_000), Currency::EUR))?;
        let mut stream = Stream::<Product>::default();
        let command = ProductCommand::Create {
            product_id: id,
            sku: sku.clone(),
            name: name.clone(),
            description: value(Description::parse("Seeded for the rebuild benchmark"))?,
            price,
            stock: 1_000,
        };
        let metadata = EventMetadata::for_request(admin, request());
        value(
            writer
                .decide(&mut stream, id.as_uuid(), command, &metadata)
                .await?,
        )?;
        catalogue.insert(id, (sku, name, price));
        products.push((id, stream));
    }

    let mut orders = 0u64;
    while writer.queued() < events {
        orders += 1;
        let customer = customers[rng.gen_range(0..customers.len())];
        let buyer = Actor::user(customer.as_uuid(), Role::Customer);
        let placing = EventMetadata::for_request(buyer, request());
        let caused = |step: &str| {
            EventMetadata::caused_by(
                process,
                format!("{step}-{}", request()),
                Uuid::new_v4(),
                &placing,
            )
        };

        // Now and then an admin restocks or reprices a product.
        if orders.is_multiple_of(40) {
            let index = rng.gen_range(0..products.len());
            let (id, stream) = &mut products[index];
            let metadata = EventMetadata::for_request(admin, request());
            let command = if orders.is_multiple_of(200) {
                let price = value(Money::new(rng.gen_range(100..100_000), Currency::EUR))?;
                if let Some(entry) = catalogue.get_mut(id) {
                    entry.2 = price;
                }
                ProductCommand::ChangePrice { price }
            } else {
                ProductCommand::Restock {
                    quantity: value(Quantity::new(500))?,
                }
            };
            value(
                writer
                    .decide(stream, id.as_uuid(), command, &metadata)
                    .await?,
            )?;
        }

        let line_count = rng.gen_range(1..=2usize);
        let mut picked: Vec<usize> = Vec::with_capacity(line_count);
        while picked.len() < line_count {
            let index = rng.gen_range(0..products.len());
            if !picked.contains(&index) {
                picked.push(index);
            }
        }
        let mut lines = Vec::with_capacity(line_count);
        for &index in &picked {
            let id = products[index].0;
            let (sku, name, price) = catalogue
                .get(&id)
                .cloned()
                .context("a seeded product is missing from the catalogue")?;
            lines.push(NewOrderLine {
                product_id: id,
                sku,
                name,
                quantity: value(Quantity::new(rng.gen_range(1..=3)))?,
                unit_price: price,
            });
        }
        let order_id = OrderId::new();
        let mut order = Stream::<Order>::default();
        let place = OrderCommand::Place {
            order_id,
            customer_id: customer,
            lines: lines.clone(),
        };
        value(
            writer
                .decide(&mut order, order_id.as_uuid(), place, &placing)
                .await?,
        )?;

        for (line, &index) in lines.iter().zip(&picked) {
            let stream = &mut products[index].1;
            let reserve = ProductCommand::ReserveStock {
                order_id,
                quantity: line.quantity,
            };
            let reserving = caused("reserve");
            let product_id = line.product_id.as_uuid();
            if let Err(refusal) = writer
                .decide(stream, product_id, reserve.clone(), &reserving)
                .await?
            {
                if !matches!(refusal, ProductError::InsufficientStock { .. }) {
                    return Err(anyhow!("seeding a reservation: {refusal}"));
                }
                let restock = ProductCommand::Restock {
                    quantity: value(Quantity::new(1_000))?,
                };
                let metadata = EventMetadata::for_request(admin, request());
                value(
                    writer
                        .decide(stream, product_id, restock, &metadata)
                        .await?,
                )?;
                value(
                    writer
                        .decide(stream, product_id, reserve, &reserving)
                        .await?,
                )?;
            }
        }
        value(
            writer
                .decide(
                    &mut order,
                    order_id.as_uuid(),
                    OrderCommand::Confirm,
                    &caused("confirm"),
                )
                .await?,
        )?;

        let fate = rng.gen_range(0..10u8);
        let total = order
            .state
            .total()
            .context("a confirmed order has a total")?;
        // 0-5: paid and shipped (reservations committed); 6-7: paid, not shipped yet;
        // 8: cancelled by the customer (reservations released); 9: awaiting payment.
        let mut steps = Vec::with_capacity(2);
        if fate <= 7 {
            steps.push((buyer, OrderCommand::Pay { amount: total }));
        }
        if fate <= 5 {
            steps.push((admin, OrderCommand::Ship));
        }
        if fate == 8 {
            let reason = Some("changed my mind".to_owned());
            steps.push((buyer, OrderCommand::Cancel { reason }));
        }
        for (actor, command) in steps {
            let metadata = EventMetadata::for_request(actor, request());
            value(
                writer
                    .decide(&mut order, order_id.as_uuid(), command, &metadata)
                    .await?,
            )?;
        }
        let outcome = match fate {
            0..=5 => Some(true),
            8 => Some(false),
            _ => None,
        };
        if let Some(commit) = outcome {
            for (line, &index) in lines.iter().zip(&picked) {
                let stream = &mut products[index].1;
                let command = if commit {
                    ProductCommand::CommitReservation { order_id }
                } else {
                    ProductCommand::ReleaseReservation { order_id }
                };
                let settling = caused(if commit { "commit" } else { "release" });
                value(
                    writer
                        .decide(stream, line.product_id.as_uuid(), command, &settling)
                        .await?,
                )?;
            }
        }
        if orders.is_multiple_of(1_000) {
            on_progress(writer.written);
        }
    }
    writer.flush().await?;
    on_progress(writer.written);
    Ok(writer.written)
}
