//! The bridge from the pure domain aggregates to cqrs-es.
//!
//! The domain crate may not depend on cqrs-es (it pulls in tokio), so cqrs-es's traits are
//! implemented here on thin transparent wrappers. The wrappers serialize exactly like the
//! wrapped domain types, so stored payloads and snapshots are the domain's own JSON.

use hindsight_domain as domain;
use serde::{Deserialize, Serialize};

/// A domain aggregate seen through cqrs-es.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventSourced<A>(pub A);

/// A domain event seen through cqrs-es.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Event<E>(pub E);

impl<E: domain::DomainEvent> cqrs_es::DomainEvent for Event<E> {
    fn event_type(&self) -> String {
        self.0.event_type().to_owned()
    }

    fn event_version(&self) -> String {
        self.0.event_version().to_owned()
    }
}

impl<A: domain::Aggregate> cqrs_es::Aggregate for EventSourced<A> {
    const TYPE: &'static str = A::TYPE;
    type Command = A::Command;
    type Event = Event<A::Event>;
    type Error = A::Error;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &cqrs_es::event_sink::EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let events = self.0.handle(command)?;
        for event in events {
            sink.write(Event(event), self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        self.0.apply(event.0);
    }
}
