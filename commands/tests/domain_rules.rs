//! Every command and every refusal of the three aggregates, given/when/then, through the
//! cqrs-es adapter the write side runs them with. Refusals are asserted by error variant,
//! never by message text.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use cqrs_es::test::TestFramework;
use hindsight_commands::aggregate::{Event, EventSourced};
use hindsight_domain::ids::{OrderId, ProductId, UserId};
use hindsight_domain::values::{
    Currency, Description, Email, Money, PersonName, ProductName, Quantity, Sku,
};
use uuid::Uuid;

fn events<E>(events: impl IntoIterator<Item = E>) -> Vec<Event<E>> {
    events.into_iter().map(Event).collect()
}

fn eur(amount: i64) -> Money {
    Money::new(amount, Currency::EUR).unwrap()
}

fn usd(amount: i64) -> Money {
    Money::new(amount, Currency::USD).unwrap()
}

fn qty(n: u32) -> Quantity {
    Quantity::new(n).unwrap()
}

fn order_id(n: u128) -> OrderId {
    OrderId::from_uuid(Uuid::from_u128(n))
}

fn product_id(n: u128) -> ProductId {
    ProductId::from_uuid(Uuid::from_u128(0x1000 + n))
}

mod user {
    use hindsight_domain::role::Role;
    use hindsight_domain::user::{PasswordHash, User, UserCommand, UserError, UserEvent};

    use super::*;

    fn framework() -> TestFramework<EventSourced<User>> {
        TestFramework::with(())
    }

    fn user_id() -> UserId {
        UserId::from_uuid(Uuid::from_u128(7))
    }

    fn name(s: &str) -> PersonName {
        PersonName::parse(s).unwrap()
    }

    fn hash(s: &str) -> PasswordHash {
        PasswordHash::new(s).unwrap()
    }

    fn registered() -> UserEvent {
        UserEvent::UserRegistered {
            user_id: user_id(),
            email: Email::parse("Ada@Example.org").unwrap(),
            email_key: "ada@example.org".to_owned(),
            name: name("Ada"),
            role: Role::Customer,
            password_hash: hash("hash-1"),
        }
    }

    fn active() -> Vec<Event<UserEvent>> {
        events([registered()])
    }

    fn deactivated() -> Vec<Event<UserEvent>> {
        events([registered(), UserEvent::UserDeactivated])
    }

    fn register() -> UserCommand {
        UserCommand::Register {
            user_id: user_id(),
            email: Email::parse(" Ada@Example.org ").unwrap(),
            name: name("Ada"),
            password_hash: hash("hash-1"),
            role: Role::Customer,
        }
    }

    #[test]
    fn register_records_the_user_with_its_email_key() {
        framework()
            .given_no_previous_events()
            .when(register())
            .then_expect_events(events([registered()]));
    }

    #[test]
    fn register_twice_is_refused() {
        framework()
            .given(active())
            .when(register())
            .then_expect_error(UserError::UserAlreadyExists);
    }

    #[test]
    fn change_name() {
        framework()
            .given(active())
            .when(UserCommand::ChangeName {
                name: name("Ada Lovelace"),
            })
            .then_expect_events(events([UserEvent::UserNameChanged {
                name: name("Ada Lovelace"),
            }]));
    }

    #[test]
    fn change_to_the_same_name_is_a_no_op() {
        framework()
            .given(active())
            .when(UserCommand::ChangeName { name: name("Ada") })
            .then_expect_events(vec![]);
    }

    #[test]
    fn change_password_hash() {
        framework()
            .given(active())
            .when(UserCommand::ChangePasswordHash {
                password_hash: hash("hash-2"),
            })
            .then_expect_events(events([UserEvent::UserPasswordChanged {
                password_hash: hash("hash-2"),
            }]));
    }

    #[test]
    fn assign_role() {
        framework()
            .given(active())
            .when(UserCommand::AssignRole { role: Role::Admin })
            .then_expect_events(events([UserEvent::UserRoleAssigned { role: Role::Admin }]));
    }

    #[test]
    fn assign_the_same_role_is_a_no_op() {
        framework()
            .given(active())
            .when(UserCommand::AssignRole {
                role: Role::Customer,
            })
            .then_expect_events(vec![]);
    }

    #[test]
    fn deactivate() {
        framework()
            .given(active())
            .when(UserCommand::Deactivate)
            .then_expect_events(events([UserEvent::UserDeactivated]));
    }

    #[test]
    fn reactivate() {
        framework()
            .given(deactivated())
            .when(UserCommand::Reactivate)
            .then_expect_events(events([UserEvent::UserReactivated]));
    }

    #[test]
    fn reactivated_user_accepts_commands_again() {
        framework()
            .given(deactivated())
            .and(events([UserEvent::UserReactivated]))
            .when(UserCommand::ChangeName {
                name: name("Ada L."),
            })
            .then_expect_events(events([UserEvent::UserNameChanged {
                name: name("Ada L."),
            }]));
    }

    #[test]
    fn reactivate_an_active_user_is_refused() {
        framework()
            .given(active())
            .when(UserCommand::Reactivate)
            .then_expect_error(UserError::UserNotDeactivated);
    }

    #[test]
    fn a_deactivated_user_accepts_only_reactivate() {
        for command in [
            UserCommand::ChangeName {
                name: name("Other"),
            },
            UserCommand::ChangeName { name: name("Ada") },
            UserCommand::ChangePasswordHash {
                password_hash: hash("hash-2"),
            },
            UserCommand::AssignRole { role: Role::Admin },
            UserCommand::AssignRole {
                role: Role::Customer,
            },
            UserCommand::Deactivate,
        ] {
            framework()
                .given(deactivated())
                .when(command)
                .then_expect_error(UserError::UserDeactivated);
        }
    }

    #[test]
    fn commands_on_an_unknown_user_are_refused_as_not_found() {
        for command in [
            UserCommand::ChangeName { name: name("Ada") },
            UserCommand::ChangePasswordHash {
                password_hash: hash("hash-2"),
            },
            UserCommand::AssignRole { role: Role::Admin },
            UserCommand::Deactivate,
            UserCommand::Reactivate,
        ] {
            framework()
                .given_no_previous_events()
                .when(command)
                .then_expect_error(UserError::UserNotFound);
        }
    }
}

mod product {
    use hindsight_domain::product::{
        Product, ProductCommand, ProductError, ProductEvent, MAX_STOCK,
    };

    use super::*;

    fn framework() -> TestFramework<EventSourced<Product>> {
        TestFramework::with(())
    }

    fn name(s: &str) -> ProductName {
        ProductName::parse(s).unwrap()
    }

    fn description(s: &str) -> Description {
        Description::parse(s).unwrap()
    }

    fn created_with(stock: u32) -> ProductEvent {
        ProductEvent::ProductCreated {
            product_id: product_id(1),
            sku: Sku::parse("TEA-1").unwrap(),
            name: name("Green tea"),
            description: description("Loose leaf"),
            price: eur(1999),
            stock,
        }
    }

    fn with_stock(stock: u32) -> Vec<Event<ProductEvent>> {
        events([created_with(stock)])
    }

    fn discontinued() -> Vec<Event<ProductEvent>> {
        events([created_with(10), ProductEvent::ProductDiscontinued])
    }

    fn reserved(order: u128, quantity: u32) -> ProductEvent {
        ProductEvent::StockReserved {
            order_id: order_id(order),
            quantity: qty(quantity),
        }
    }

    fn released(order: u128, quantity: u32) -> ProductEvent {
        ProductEvent::StockReleased {
            order_id: order_id(order),
            quantity: qty(quantity),
        }
    }

    fn committed(order: u128, quantity: u32) -> ProductEvent {
        ProductEvent::ReservationCommitted {
            order_id: order_id(order),
            quantity: qty(quantity),
        }
    }

    fn create_command(price: Money) -> ProductCommand {
        ProductCommand::Create {
            product_id: product_id(1),
            sku: Sku::parse("tea-1").unwrap(),
            name: name("Green tea"),
            description: description("Loose leaf"),
            price,
            stock: 10,
        }
    }

    fn reserve(order: u128, quantity: u32) -> ProductCommand {
        ProductCommand::ReserveStock {
            order_id: order_id(order),
            quantity: qty(quantity),
        }
    }

    fn release(order: u128) -> ProductCommand {
        ProductCommand::ReleaseReservation {
            order_id: order_id(order),
        }
    }

    fn commit(order: u128) -> ProductCommand {
        ProductCommand::CommitReservation {
            order_id: order_id(order),
        }
    }

    #[test]
    fn create() {
        framework()
            .given_no_previous_events()
            .when(create_command(eur(1999)))
            .then_expect_events(with_stock(10));
    }

    #[test]
    fn create_twice_is_refused() {
        framework()
            .given(with_stock(10))
            .when(create_command(eur(1999)))
            .then_expect_error(ProductError::ProductAlreadyExists);
    }

    #[test]
    fn create_with_a_zero_price_is_refused() {
        framework()
            .given_no_previous_events()
            .when(create_command(eur(0)))
            .then_expect_error(ProductError::PriceNotPositive);
    }

    #[test]
    fn update_details_records_only_what_changed() {
        framework()
            .given(with_stock(10))
            .when(ProductCommand::UpdateDetails {
                name: Some(name("Sencha")),
                description: Some(description("Loose leaf")),
            })
            .then_expect_events(events([ProductEvent::ProductDetailsUpdated {
                name: Some(name("Sencha")),
                description: None,
            }]));
    }

    #[test]
    fn update_details_without_a_change_is_a_no_op() {
        for (name, description) in [
            (None, None),
            (Some(name("Green tea")), Some(description("Loose leaf"))),
        ] {
            framework()
                .given(with_stock(10))
                .when(ProductCommand::UpdateDetails { name, description })
                .then_expect_events(vec![]);
        }
    }

    #[test]
    fn change_price() {
        framework()
            .given(with_stock(10))
            .when(ProductCommand::ChangePrice { price: eur(2499) })
            .then_expect_events(events([ProductEvent::ProductPriceChanged {
                price: eur(2499),
            }]));
    }

    #[test]
    fn change_to_the_same_price_is_a_no_op() {
        framework()
            .given(with_stock(10))
            .when(ProductCommand::ChangePrice { price: eur(1999) })
            .then_expect_events(vec![]);
    }

    #[test]
    fn change_price_to_zero_is_refused() {
        framework()
            .given(with_stock(10))
            .when(ProductCommand::ChangePrice { price: eur(0) })
            .then_expect_error(ProductError::PriceNotPositive);
    }

    #[test]
    fn change_price_to_another_currency_is_refused() {
        framework()
            .given(with_stock(10))
            .when(ProductCommand::ChangePrice { price: usd(1999) })
            .then_expect_error(ProductError::CurrencyMismatch {
                expected: Currency::EUR,
                found: Currency::USD,
            });
    }

    #[test]
    fn restock() {
        framework()
            .given(with_stock(10))
            .when(ProductCommand::Restock { quantity: qty(5) })
            .then_expect_events(events([ProductEvent::ProductRestocked {
                quantity: qty(5),
            }]));
    }

    #[test]
    fn restock_up_to_the_maximum_is_accepted() {
        let max = u32::try_from(MAX_STOCK).unwrap();
        framework()
            .given(with_stock(max - 5))
            .when(ProductCommand::Restock { quantity: qty(5) })
            .then_expect_events(events([ProductEvent::ProductRestocked {
                quantity: qty(5),
            }]));
    }

    #[test]
    fn restock_beyond_the_maximum_is_refused() {
        let max = u32::try_from(MAX_STOCK).unwrap();
        framework()
            .given(with_stock(max))
            .when(ProductCommand::Restock { quantity: qty(1) })
            .then_expect_error(ProductError::StockOverflow);
    }

    #[test]
    fn restock_counts_reserved_stock_towards_the_maximum() {
        let max = u32::try_from(MAX_STOCK).unwrap();
        framework()
            .given(events([created_with(max), reserved(1, 100)]))
            .when(ProductCommand::Restock { quantity: qty(1) })
            .then_expect_error(ProductError::StockOverflow);
    }

    #[test]
    fn reserve_stock() {
        framework()
            .given(with_stock(10))
            .when(reserve(1, 10))
            .then_expect_events(events([reserved(1, 10)]));
    }

    #[test]
    fn reserve_more_than_available_is_refused() {
        framework()
            .given(events([created_with(10), reserved(1, 4)]))
            .when(reserve(2, 7))
            .then_expect_error(ProductError::InsufficientStock {
                requested: qty(7),
                available: 6,
            });
    }

    #[test]
    fn reserve_on_a_discontinued_product_is_refused() {
        framework()
            .given(discontinued())
            .when(reserve(1, 1))
            .then_expect_error(ProductError::ProductDiscontinued);
    }

    #[test]
    fn reserve_again_for_the_same_order_is_a_no_op() {
        framework()
            .given(events([created_with(10), reserved(1, 3)]))
            .when(reserve(1, 3))
            .then_expect_events(vec![]);
    }

    #[test]
    fn reserve_again_after_the_product_was_discontinued_is_a_no_op() {
        framework()
            .given(events([
                created_with(10),
                reserved(1, 3),
                ProductEvent::ProductDiscontinued,
            ]))
            .when(reserve(1, 3))
            .then_expect_events(vec![]);
    }

    #[test]
    fn reserve_again_after_release_is_a_no_op() {
        framework()
            .given(events([created_with(10), reserved(1, 3), released(1, 3)]))
            .when(reserve(1, 3))
            .then_expect_events(vec![]);
    }

    #[test]
    fn reserve_again_after_commit_is_a_no_op() {
        framework()
            .given(events([created_with(10), reserved(1, 3), committed(1, 3)]))
            .when(reserve(1, 3))
            .then_expect_events(vec![]);
    }

    #[test]
    fn released_stock_can_be_reserved_by_another_order() {
        framework()
            .given(events([created_with(3), reserved(1, 3), released(1, 3)]))
            .when(reserve(2, 3))
            .then_expect_events(events([reserved(2, 3)]));
    }

    #[test]
    fn release_reservation() {
        framework()
            .given(events([created_with(10), reserved(1, 3)]))
            .when(release(1))
            .then_expect_events(events([released(1, 3)]));
    }

    #[test]
    fn release_without_a_reservation_is_a_no_op() {
        for given in [
            with_stock(10),
            events([created_with(10), reserved(1, 3), released(1, 3)]),
            events([created_with(10), reserved(1, 3), committed(1, 3)]),
        ] {
            framework()
                .given(given)
                .when(release(1))
                .then_expect_events(vec![]);
        }
    }

    #[test]
    fn release_still_works_on_a_discontinued_product() {
        framework()
            .given(events([
                created_with(10),
                reserved(1, 3),
                ProductEvent::ProductDiscontinued,
            ]))
            .when(release(1))
            .then_expect_events(events([released(1, 3)]));
    }

    #[test]
    fn commit_reservation() {
        framework()
            .given(events([created_with(10), reserved(1, 3)]))
            .when(commit(1))
            .then_expect_events(events([committed(1, 3)]));
    }

    #[test]
    fn commit_again_is_a_no_op() {
        framework()
            .given(events([created_with(10), reserved(1, 3), committed(1, 3)]))
            .when(commit(1))
            .then_expect_events(vec![]);
    }

    #[test]
    fn commit_without_a_reservation_is_refused() {
        framework()
            .given(with_stock(10))
            .when(commit(1))
            .then_expect_error(ProductError::ReservationNotFound);
    }

    #[test]
    fn commit_after_release_is_refused() {
        framework()
            .given(events([created_with(10), reserved(1, 3), released(1, 3)]))
            .when(commit(1))
            .then_expect_error(ProductError::ReservationNotFound);
    }

    #[test]
    fn commit_still_works_on_a_discontinued_product() {
        framework()
            .given(events([
                created_with(10),
                reserved(1, 3),
                ProductEvent::ProductDiscontinued,
            ]))
            .when(commit(1))
            .then_expect_events(events([committed(1, 3)]));
    }

    #[test]
    fn discontinue() {
        framework()
            .given(with_stock(10))
            .when(ProductCommand::Discontinue)
            .then_expect_events(events([ProductEvent::ProductDiscontinued]));
    }

    #[test]
    fn discontinue_twice_is_refused() {
        framework()
            .given(discontinued())
            .when(ProductCommand::Discontinue)
            .then_expect_error(ProductError::ProductAlreadyDiscontinued);
    }

    #[test]
    fn catalogue_and_stock_changes_on_a_discontinued_product_are_refused() {
        for command in [
            ProductCommand::UpdateDetails {
                name: Some(name("Sencha")),
                description: None,
            },
            ProductCommand::ChangePrice { price: eur(2499) },
            ProductCommand::Restock { quantity: qty(1) },
        ] {
            framework()
                .given(discontinued())
                .when(command)
                .then_expect_error(ProductError::ProductDiscontinued);
        }
    }

    #[test]
    fn commands_on_an_unknown_product_are_refused_as_not_found() {
        for command in [
            ProductCommand::UpdateDetails {
                name: Some(name("Sencha")),
                description: None,
            },
            ProductCommand::ChangePrice { price: eur(2499) },
            ProductCommand::Restock { quantity: qty(1) },
            reserve(1, 1),
            release(1),
            commit(1),
            ProductCommand::Discontinue,
        ] {
            framework()
                .given_no_previous_events()
                .when(command)
                .then_expect_error(ProductError::ProductNotFound);
        }
    }
}

mod order {
    use hindsight_domain::order::{
        NewOrderLine, Order, OrderCommand, OrderError, OrderEvent, OrderLine, OrderStatus,
        MAX_LINE_QUANTITY, MAX_ORDER_LINES,
    };

    use super::*;

    fn framework() -> TestFramework<EventSourced<Order>> {
        TestFramework::with(())
    }

    fn customer() -> UserId {
        UserId::from_uuid(Uuid::from_u128(20))
    }

    fn line(product: u128, quantity: u32, unit_price: Money) -> NewOrderLine {
        NewOrderLine {
            product_id: product_id(product),
            sku: Sku::parse(&format!("SKU-{product}")).unwrap(),
            name: ProductName::parse(&format!("Product {product}")).unwrap(),
            quantity: qty(quantity),
            unit_price,
        }
    }

    fn place(lines: Vec<NewOrderLine>) -> OrderCommand {
        OrderCommand::Place {
            order_id: order_id(1),
            customer_id: customer(),
            lines,
        }
    }

    /// Two lines: 2 × 19.99 and 1 × 5.00, 44.98 in total.
    fn placed() -> OrderEvent {
        let placed_line = |l: NewOrderLine, line_total| OrderLine {
            product_id: l.product_id,
            sku: l.sku,
            name: l.name,
            quantity: l.quantity,
            unit_price: l.unit_price,
            line_total,
        };
        OrderEvent::OrderPlaced {
            order_id: order_id(1),
            customer_id: customer(),
            lines: vec![
                placed_line(line(1, 2, eur(1999)), eur(3998)),
                placed_line(line(2, 1, eur(500)), eur(500)),
            ],
            total: eur(4498),
        }
    }

    fn total() -> Money {
        eur(4498)
    }

    fn pending() -> Vec<Event<OrderEvent>> {
        events([placed()])
    }

    fn confirmed() -> Vec<Event<OrderEvent>> {
        events([placed(), OrderEvent::OrderConfirmed])
    }

    fn rejected() -> Vec<Event<OrderEvent>> {
        events([
            placed(),
            OrderEvent::OrderRejected {
                reason: "INSUFFICIENT_STOCK".to_owned(),
            },
        ])
    }

    fn paid() -> Vec<Event<OrderEvent>> {
        events([
            placed(),
            OrderEvent::OrderConfirmed,
            OrderEvent::OrderPaid { amount: total() },
        ])
    }

    fn shipped() -> Vec<Event<OrderEvent>> {
        events([
            placed(),
            OrderEvent::OrderConfirmed,
            OrderEvent::OrderPaid { amount: total() },
            OrderEvent::OrderShipped,
        ])
    }

    fn cancelled() -> Vec<Event<OrderEvent>> {
        events([
            placed(),
            OrderEvent::OrderCancelled {
                reason: None,
                previous_status: OrderStatus::Pending,
            },
        ])
    }

    fn reject_command() -> OrderCommand {
        OrderCommand::Reject {
            reason: "INSUFFICIENT_STOCK".to_owned(),
        }
    }

    #[test]
    fn place_computes_line_totals_and_the_total() {
        framework()
            .given_no_previous_events()
            .when(place(vec![line(1, 2, eur(1999)), line(2, 1, eur(500))]))
            .then_expect_events(pending());
    }

    #[test]
    fn place_accepts_the_largest_quantity_and_line_count() {
        let result = framework()
            .given_no_previous_events()
            .when(place(
                (0..MAX_ORDER_LINES as u128)
                    .map(|p| line(p, MAX_LINE_QUANTITY, eur(1)))
                    .collect(),
            ))
            .inspect_result()
            .unwrap();
        assert_eq!(result.len(), 1);
    }

    #[test]
    fn place_twice_is_refused() {
        framework()
            .given(pending())
            .when(place(vec![line(1, 1, eur(1))]))
            .then_expect_error(OrderError::OrderAlreadyExists);
    }

    #[test]
    fn place_without_lines_is_refused() {
        framework()
            .given_no_previous_events()
            .when(place(vec![]))
            .then_expect_error(OrderError::OrderEmpty);
    }

    #[test]
    fn place_with_too_many_lines_is_refused() {
        let count = MAX_ORDER_LINES + 1;
        framework()
            .given_no_previous_events()
            .when(place(
                (0..count as u128).map(|p| line(p, 1, eur(1))).collect(),
            ))
            .then_expect_error(OrderError::TooManyOrderLines { count });
    }

    #[test]
    fn place_with_a_quantity_over_the_limit_is_refused() {
        framework()
            .given_no_previous_events()
            .when(place(vec![
                line(1, 1, eur(1)),
                line(2, MAX_LINE_QUANTITY + 1, eur(1)),
            ]))
            .then_expect_error(OrderError::QuantityOutOfRange {
                product_id: product_id(2),
                quantity: qty(MAX_LINE_QUANTITY + 1),
            });
    }

    #[test]
    fn place_with_a_product_twice_is_refused() {
        framework()
            .given_no_previous_events()
            .when(place(vec![line(1, 1, eur(1)), line(1, 2, eur(1))]))
            .then_expect_error(OrderError::DuplicateOrderLine {
                product_id: product_id(1),
            });
    }

    #[test]
    fn place_with_mixed_currencies_is_refused() {
        framework()
            .given_no_previous_events()
            .when(place(vec![line(1, 1, eur(1)), line(2, 1, usd(1))]))
            .then_expect_error(OrderError::CurrencyMismatch {
                expected: Currency::EUR,
                found: Currency::USD,
            });
    }

    #[test]
    fn place_with_an_overflowing_line_total_is_refused() {
        framework()
            .given_no_previous_events()
            .when(place(vec![line(1, 2, eur(i64::MAX / 2 + 1))]))
            .then_expect_error(OrderError::AmountOverflow);
    }

    #[test]
    fn place_with_an_overflowing_order_total_is_refused() {
        framework()
            .given_no_previous_events()
            .when(place(vec![
                line(1, 1, eur(i64::MAX / 2 + 1)),
                line(2, 1, eur(i64::MAX / 2 + 1)),
            ]))
            .then_expect_error(OrderError::AmountOverflow);
    }

    #[test]
    fn confirm() {
        framework()
            .given(pending())
            .when(OrderCommand::Confirm)
            .then_expect_events(events([OrderEvent::OrderConfirmed]));
    }

    #[test]
    fn reject() {
        framework()
            .given(pending())
            .when(reject_command())
            .then_expect_events(events([OrderEvent::OrderRejected {
                reason: "INSUFFICIENT_STOCK".to_owned(),
            }]));
    }

    #[test]
    fn confirm_or_reject_when_not_pending_is_refused() {
        for (given, status) in [
            (confirmed(), OrderStatus::Confirmed),
            (rejected(), OrderStatus::Rejected),
            (paid(), OrderStatus::Paid),
            (shipped(), OrderStatus::Shipped),
            (cancelled(), OrderStatus::Cancelled),
        ] {
            framework()
                .given(given.clone())
                .when(OrderCommand::Confirm)
                .then_expect_error(OrderError::OrderNotPending { status });
            framework()
                .given(given)
                .when(reject_command())
                .then_expect_error(OrderError::OrderNotPending { status });
        }
    }

    #[test]
    fn pay() {
        framework()
            .given(confirmed())
            .when(OrderCommand::Pay { amount: total() })
            .then_expect_events(events([OrderEvent::OrderPaid { amount: total() }]));
    }

    #[test]
    fn pay_a_different_amount_is_refused() {
        framework()
            .given(confirmed())
            .when(OrderCommand::Pay { amount: eur(4497) })
            .then_expect_error(OrderError::PaymentAmountMismatch {
                expected: total(),
                paid: eur(4497),
            });
    }

    #[test]
    fn pay_in_a_different_currency_is_refused() {
        framework()
            .given(confirmed())
            .when(OrderCommand::Pay { amount: usd(4498) })
            .then_expect_error(OrderError::PaymentAmountMismatch {
                expected: total(),
                paid: usd(4498),
            });
    }

    #[test]
    fn pay_outside_confirmed_is_refused_with_the_reason() {
        for (given, error) in [
            (pending(), OrderError::OrderNotConfirmed),
            (paid(), OrderError::OrderAlreadyPaid),
            (rejected(), OrderError::OrderRejected),
            (cancelled(), OrderError::OrderCancelled),
            (shipped(), OrderError::OrderAlreadyShipped),
        ] {
            framework()
                .given(given)
                .when(OrderCommand::Pay { amount: total() })
                .then_expect_error(error);
        }
    }

    #[test]
    fn ship() {
        framework()
            .given(paid())
            .when(OrderCommand::Ship)
            .then_expect_events(events([OrderEvent::OrderShipped]));
    }

    #[test]
    fn ship_outside_paid_is_refused_with_the_reason() {
        for (given, error) in [
            (pending(), OrderError::OrderNotPaid),
            (confirmed(), OrderError::OrderNotPaid),
            (shipped(), OrderError::OrderAlreadyShipped),
            (rejected(), OrderError::OrderRejected),
            (cancelled(), OrderError::OrderCancelled),
        ] {
            framework()
                .given(given)
                .when(OrderCommand::Ship)
                .then_expect_error(error);
        }
    }

    #[test]
    fn cancel_records_the_status_it_left() {
        for (given, previous_status) in [
            (pending(), OrderStatus::Pending),
            (confirmed(), OrderStatus::Confirmed),
            (paid(), OrderStatus::Paid),
        ] {
            framework()
                .given(given)
                .when(OrderCommand::Cancel {
                    reason: Some("changed my mind".to_owned()),
                })
                .then_expect_events(events([OrderEvent::OrderCancelled {
                    reason: Some("changed my mind".to_owned()),
                    previous_status,
                }]));
        }
    }

    #[test]
    fn cancel_after_the_order_ended_is_refused_with_the_reason() {
        for (given, error) in [
            (shipped(), OrderError::OrderAlreadyShipped),
            (cancelled(), OrderError::OrderCancelled),
            (rejected(), OrderError::OrderRejected),
        ] {
            framework()
                .given(given)
                .when(OrderCommand::Cancel { reason: None })
                .then_expect_error(error);
        }
    }

    #[test]
    fn commands_on_an_unknown_order_are_refused_as_not_found() {
        for command in [
            OrderCommand::Confirm,
            reject_command(),
            OrderCommand::Pay { amount: total() },
            OrderCommand::Ship,
            OrderCommand::Cancel { reason: None },
        ] {
            framework()
                .given_no_previous_events()
                .when(command)
                .then_expect_error(OrderError::OrderNotFound);
        }
    }
}
