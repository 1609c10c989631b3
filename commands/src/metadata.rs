//! The metadata envelope every stored event carries: who acted, in which role, and
//! which request (and chain of requests and events) the event belongs to.
//!
//! cqrs-es stores metadata as a string map; Hindsight never builds that map by hand. The
//! only way to execute a command is with an [`EventMetadata`], which is converted to the
//! map at the last moment and parsed back, validated, when events are read.

use std::collections::HashMap;
use std::fmt;

use hindsight_domain::role::Role;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The role an actor acted in. Users act in their [`Role`]; work done by Hindsight itself
/// (the command line, the order process manager) is `system`; `anonymous` is a caller
/// without a session, e.g. someone registering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActorRole {
    Customer,
    Admin,
    Auditor,
    Operator,
    System,
    Anonymous,
}

impl ActorRole {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Admin => "admin",
            Self::Auditor => "auditor",
            Self::Operator => "operator",
            Self::System => "system",
            Self::Anonymous => "anonymous",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        Some(match value {
            "customer" => Self::Customer,
            "admin" => Self::Admin,
            "auditor" => Self::Auditor,
            "operator" => Self::Operator,
            "system" => Self::System,
            "anonymous" => Self::Anonymous,
            _ => return None,
        })
    }
}

impl From<Role> for ActorRole {
    fn from(role: Role) -> Self {
        match role {
            Role::Customer => Self::Customer,
            Role::Admin => Self::Admin,
            Role::Auditor => Self::Auditor,
            Role::Operator => Self::Operator,
        }
    }
}

impl fmt::Display for ActorRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who executes a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor {
    /// The user acting, if any (`None` for Hindsight's own processes and for anonymous callers).
    pub id: Option<Uuid>,
    pub role: ActorRole,
}

impl Actor {
    pub fn user(id: Uuid, role: Role) -> Self {
        Self {
            id: Some(id),
            role: role.into(),
        }
    }

    pub const fn system() -> Self {
        Self {
            id: None,
            role: ActorRole::System,
        }
    }

    pub const fn anonymous() -> Self {
        Self {
            id: None,
            role: ActorRole::Anonymous,
        }
    }
}

/// The typed envelope stored with every event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    pub actor_id: Option<Uuid>,
    pub actor_role: ActorRole,
    /// The request (or process step) that executed the command.
    pub request_id: String,
    /// The client request that started the chain this event belongs to.
    pub correlation_id: String,
    /// The event that caused the command, or the request id for a client's own command.
    pub causation_id: String,
}

/// Why a stored metadata map is not a valid envelope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event metadata field `{field}` is {problem}")]
pub struct MetadataError {
    pub field: &'static str,
    pub problem: &'static str,
}

const ACTOR_ID: &str = "actor_id";
const ACTOR_ROLE: &str = "actor_role";
const REQUEST_ID: &str = "request_id";
const CORRELATION_ID: &str = "correlation_id";
const CAUSATION_ID: &str = "causation_id";

impl EventMetadata {
    /// A client's own command: the request starts the chain and causes the command.
    pub fn for_request(actor: Actor, request_id: impl Into<String>) -> Self {
        let request_id = request_id.into();
        Self {
            actor_id: actor.id,
            actor_role: actor.role,
            correlation_id: request_id.clone(),
            causation_id: request_id.clone(),
            request_id,
        }
    }

    /// A command issued by a process in reaction to a stored event: it keeps the chain's
    /// correlation id and names the event as its cause.
    pub fn caused_by(
        actor: Actor,
        request_id: impl Into<String>,
        cause_event_id: Uuid,
        cause: &EventMetadata,
    ) -> Self {
        Self {
            actor_id: actor.id,
            actor_role: actor.role,
            request_id: request_id.into(),
            correlation_id: cause.correlation_id.clone(),
            causation_id: cause_event_id.to_string(),
        }
    }

    /// The string map cqrs-es stores.
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::with_capacity(5);
        if let Some(actor_id) = self.actor_id {
            map.insert(ACTOR_ID.to_owned(), actor_id.to_string());
        }
        map.insert(ACTOR_ROLE.to_owned(), self.actor_role.as_str().to_owned());
        map.insert(REQUEST_ID.to_owned(), self.request_id.clone());
        map.insert(CORRELATION_ID.to_owned(), self.correlation_id.clone());
        map.insert(CAUSATION_ID.to_owned(), self.causation_id.clone());
        map
    }

    /// Parses a stored map back into the envelope, refusing incomplete ones.
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, MetadataError> {
        let required = |field: &'static str| {
            map.get(field)
                .filter(|value| !value.is_empty())
                .cloned()
                .ok_or(MetadataError {
                    field,
                    problem: "missing",
                })
        };
        let actor_id = match map.get(ACTOR_ID) {
            None => None,
            Some(raw) => Some(Uuid::parse_str(raw).map_err(|_| MetadataError {
                field: ACTOR_ID,
                problem: "not a UUID",
            })?),
        };
        let actor_role = ActorRole::parse(&required(ACTOR_ROLE)?).ok_or(MetadataError {
            field: ACTOR_ROLE,
            problem: "not a known role",
        })?;
        Ok(Self {
            actor_id,
            actor_role,
            request_id: required(REQUEST_ID)?,
            correlation_id: required(CORRELATION_ID)?,
            causation_id: required(CAUSATION_ID)?,
        })
    }

    /// Parses the JSON text of the `metadata` column.
    pub fn from_json_text(text: &str) -> Result<Self, MetadataError> {
        let map =
            serde_json::from_str::<HashMap<String, String>>(text).map_err(|_| MetadataError {
                field: "metadata",
                problem: "not an object of strings",
            })?;
        Self::from_map(&map)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_client_request_starts_and_causes_its_own_chain() {
        let user = Uuid::now_v7();
        let metadata = EventMetadata::for_request(Actor::user(user, Role::Customer), "req-1");
        assert_eq!(metadata.actor_id, Some(user));
        assert_eq!(metadata.actor_role, ActorRole::Customer);
        assert_eq!(metadata.correlation_id, "req-1");
        assert_eq!(metadata.causation_id, "req-1");
    }

    #[test]
    fn a_caused_command_keeps_the_correlation_and_names_the_event() {
        let origin = EventMetadata::for_request(Actor::anonymous(), "client-req");
        let event_id = Uuid::now_v7();
        let step = EventMetadata::caused_by(Actor::system(), "step-1", event_id, &origin);
        assert_eq!(step.correlation_id, "client-req");
        assert_eq!(step.causation_id, event_id.to_string());
        assert_eq!(step.request_id, "step-1");
    }

    #[test]
    fn the_map_round_trips() {
        let metadata =
            EventMetadata::for_request(Actor::user(Uuid::now_v7(), Role::Admin), "req-2");
        assert_eq!(
            EventMetadata::from_map(&metadata.to_map()).unwrap(),
            metadata
        );
        let system = EventMetadata::for_request(Actor::system(), "cli");
        assert_eq!(EventMetadata::from_map(&system.to_map()).unwrap(), system);
    }

    #[test]
    fn incomplete_or_invalid_maps_are_refused() {
        let mut map = EventMetadata::for_request(Actor::system(), "r").to_map();
        map.remove(CORRELATION_ID);
        assert_eq!(
            EventMetadata::from_map(&map).unwrap_err().field,
            CORRELATION_ID
        );
        let mut map = EventMetadata::for_request(Actor::system(), "r").to_map();
        map.insert(ACTOR_ROLE.to_owned(), "root".to_owned());
        assert_eq!(EventMetadata::from_map(&map).unwrap_err().field, ACTOR_ROLE);
        let mut map = EventMetadata::for_request(Actor::system(), "r").to_map();
        map.insert(ACTOR_ID.to_owned(), "nope".to_owned());
        assert_eq!(EventMetadata::from_map(&map).unwrap_err().field, ACTOR_ID);
    }
}
