//! The user aggregate: registration, profile changes, roles and deactivation.
//!
//! Passwords never reach the domain; the caller hashes them and the aggregate only keeps
//! the hash. Email uniqueness spans all users, so it cannot be decided here: the write
//! side enforces it on [`UserEvent::UserRegistered`]'s `email_key`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::UserId;
use crate::role::Role;
use crate::values::{Email, PersonName, ValueError};
use crate::{Aggregate, DomainEvent, RuleViolation};

/// A password hash in PHC string format, computed outside the domain.
///
/// Its `Debug` output is redacted so it cannot leak through logs of commands or state.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PasswordHash(String);

impl PasswordHash {
    pub fn new(hash: impl Into<String>) -> Result<Self, ValueError> {
        let hash = hash.into();
        if hash.trim().is_empty() {
            return Err(ValueError::PasswordHashEmpty);
        }
        Ok(Self(hash))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHash(<redacted>)")
    }
}

impl TryFrom<String> for PasswordHash {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<PasswordHash> for String {
    fn from(hash: PasswordHash) -> Self {
        hash.0
    }
}

/// Whether a user may sign in and act.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserStatus {
    Active,
    Deactivated,
}

impl UserStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            UserStatus::Active => "active",
            UserStatus::Deactivated => "deactivated",
        }
    }
}

impl FromStr for UserStatus {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [UserStatus::Active, UserStatus::Deactivated]
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or(ValueError::StatusUnknown)
    }
}

impl fmt::Display for UserStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum UserCommand {
    Register {
        user_id: UserId,
        email: Email,
        name: PersonName,
        password_hash: PasswordHash,
        role: Role,
    },
    ChangeName {
        name: PersonName,
    },
    ChangePasswordHash {
        password_hash: PasswordHash,
    },
    AssignRole {
        role: Role,
    },
    Deactivate,
    Reactivate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UserEvent {
    UserRegistered {
        user_id: UserId,
        email: Email,
        /// [`Email::key`] of `email`: what email uniqueness is decided on.
        email_key: String,
        name: PersonName,
        role: Role,
        password_hash: PasswordHash,
    },
    UserNameChanged {
        name: PersonName,
    },
    UserPasswordChanged {
        password_hash: PasswordHash,
    },
    UserRoleAssigned {
        role: Role,
    },
    UserDeactivated,
    UserReactivated,
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> &'static str {
        match self {
            UserEvent::UserRegistered { .. } => "UserRegistered",
            UserEvent::UserNameChanged { .. } => "UserNameChanged",
            UserEvent::UserPasswordChanged { .. } => "UserPasswordChanged",
            UserEvent::UserRoleAssigned { .. } => "UserRoleAssigned",
            UserEvent::UserDeactivated => "UserDeactivated",
            UserEvent::UserReactivated => "UserReactivated",
        }
    }

    fn event_version(&self) -> &'static str {
        "1"
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("the user does not exist")]
    UserNotFound,
    #[error("the user already exists")]
    UserAlreadyExists,
    #[error("the user is deactivated")]
    UserDeactivated,
    #[error("the user is not deactivated")]
    UserNotDeactivated,
}

impl RuleViolation for UserError {
    fn code(&self) -> &'static str {
        match self {
            UserError::UserNotFound => "USER_NOT_FOUND",
            UserError::UserAlreadyExists => "USER_ALREADY_EXISTS",
            UserError::UserDeactivated => "USER_DEACTIVATED",
            UserError::UserNotDeactivated => "USER_NOT_DEACTIVATED",
        }
    }

    fn is_not_found(&self) -> bool {
        matches!(self, UserError::UserNotFound)
    }
}

/// The user aggregate's state: nothing until registered.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct User {
    account: Option<Account>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Account {
    id: UserId,
    email: Email,
    name: PersonName,
    role: Role,
    status: UserStatus,
    password_hash: PasswordHash,
}

impl User {
    pub fn is_registered(&self) -> bool {
        self.account.is_some()
    }

    pub fn id(&self) -> Option<UserId> {
        self.account.as_ref().map(|a| a.id)
    }

    pub fn email(&self) -> Option<&Email> {
        self.account.as_ref().map(|a| &a.email)
    }

    pub fn name(&self) -> Option<&PersonName> {
        self.account.as_ref().map(|a| &a.name)
    }

    pub fn role(&self) -> Option<Role> {
        self.account.as_ref().map(|a| a.role)
    }

    pub fn status(&self) -> Option<UserStatus> {
        self.account.as_ref().map(|a| a.status)
    }

    pub fn password_hash(&self) -> Option<&PasswordHash> {
        self.account.as_ref().map(|a| &a.password_hash)
    }

    /// Registered and not deactivated.
    pub fn is_active(&self) -> bool {
        self.status() == Some(UserStatus::Active)
    }

    fn existing(&self) -> Result<&Account, UserError> {
        self.account.as_ref().ok_or(UserError::UserNotFound)
    }

    fn active(&self) -> Result<&Account, UserError> {
        let account = self.existing()?;
        match account.status {
            UserStatus::Active => Ok(account),
            UserStatus::Deactivated => Err(UserError::UserDeactivated),
        }
    }
}

impl Aggregate for User {
    const TYPE: &'static str = "user";
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;

    fn handle(&self, command: UserCommand) -> Result<Vec<UserEvent>, UserError> {
        match command {
            UserCommand::Register {
                user_id,
                email,
                name,
                password_hash,
                role,
            } => {
                if self.account.is_some() {
                    return Err(UserError::UserAlreadyExists);
                }
                Ok(vec![UserEvent::UserRegistered {
                    user_id,
                    email_key: email.key(),
                    email,
                    name,
                    role,
                    password_hash,
                }])
            }
            UserCommand::ChangeName { name } => {
                if self.active()?.name == name {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::UserNameChanged { name }])
            }
            UserCommand::ChangePasswordHash { password_hash } => {
                self.active()?;
                // Always recorded, even for an identical hash: a password change is also
                // what ends the user's other sessions.
                Ok(vec![UserEvent::UserPasswordChanged { password_hash }])
            }
            UserCommand::AssignRole { role } => {
                if self.active()?.role == role {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::UserRoleAssigned { role }])
            }
            UserCommand::Deactivate => {
                self.active()?;
                Ok(vec![UserEvent::UserDeactivated])
            }
            UserCommand::Reactivate => match self.existing()?.status {
                UserStatus::Deactivated => Ok(vec![UserEvent::UserReactivated]),
                UserStatus::Active => Err(UserError::UserNotDeactivated),
            },
        }
    }

    fn apply(&mut self, event: UserEvent) {
        if let UserEvent::UserRegistered {
            user_id,
            email,
            name,
            role,
            password_hash,
            ..
        } = event
        {
            self.account = Some(Account {
                id: user_id,
                email,
                name,
                role,
                status: UserStatus::Active,
                password_hash,
            });
            return;
        }
        // `handle` never emits a later event for a user that was not registered.
        let Some(account) = self.account.as_mut() else {
            return;
        };
        match event {
            UserEvent::UserRegistered { .. } => {}
            UserEvent::UserNameChanged { name } => account.name = name,
            UserEvent::UserPasswordChanged { password_hash } => {
                account.password_hash = password_hash;
            }
            UserEvent::UserRoleAssigned { role } => account.role = role,
            UserEvent::UserDeactivated => account.status = UserStatus::Deactivated,
            UserEvent::UserReactivated => account.status = UserStatus::Active,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn registered() -> UserEvent {
        UserEvent::UserRegistered {
            user_id: UserId::from_uuid(uuid::Uuid::from_u128(1)),
            email: Email::parse("Ada@Example.org").unwrap(),
            email_key: "ada@example.org".to_owned(),
            name: PersonName::parse("Ada").unwrap(),
            role: Role::Customer,
            password_hash: PasswordHash::new("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA")
                .unwrap(),
        }
    }

    fn user_from(events: impl IntoIterator<Item = UserEvent>) -> User {
        let mut user = User::default();
        for event in events {
            user.apply(event);
        }
        user
    }

    #[test]
    fn password_hash_must_not_be_empty_and_never_prints() {
        assert_eq!(PasswordHash::new(" "), Err(ValueError::PasswordHashEmpty));
        let hash = PasswordHash::new("secret-hash").unwrap();
        assert_eq!(format!("{hash:?}"), "PasswordHash(<redacted>)");
        let command = UserCommand::ChangePasswordHash {
            password_hash: hash,
        };
        assert!(!format!("{command:?}").contains("secret-hash"));
        assert!(serde_json::from_str::<PasswordHash>("\"\"").is_err());
    }

    #[test]
    fn registration_records_the_email_key() {
        let user = User::default();
        let events = user
            .handle(UserCommand::Register {
                user_id: UserId::new(),
                email: Email::parse("Ada@Example.ORG").unwrap(),
                name: PersonName::parse("Ada").unwrap(),
                password_hash: PasswordHash::new("h").unwrap(),
                role: Role::Customer,
            })
            .unwrap();
        let [UserEvent::UserRegistered { email_key, .. }] = events.as_slice() else {
            panic!("expected one UserRegistered, got {events:?}");
        };
        assert_eq!(email_key, "ada@example.org");
    }

    #[test]
    fn state_follows_the_events() {
        let user = user_from([
            registered(),
            UserEvent::UserNameChanged {
                name: PersonName::parse("Ada L.").unwrap(),
            },
            UserEvent::UserRoleAssigned { role: Role::Admin },
            UserEvent::UserDeactivated,
        ]);
        assert!(user.is_registered());
        assert_eq!(user.name().unwrap().as_str(), "Ada L.");
        assert_eq!(user.role(), Some(Role::Admin));
        assert_eq!(user.status(), Some(UserStatus::Deactivated));
        assert!(!user.is_active());
        assert_eq!(user.email().unwrap().as_str(), "Ada@Example.org");
    }

    #[test]
    fn an_unregistered_user_has_no_state() {
        let user = User::default();
        assert!(!user.is_registered());
        assert_eq!(user.status(), None);
        assert_eq!(
            serde_json::to_value(&user).unwrap(),
            serde_json::Value::Null
        );
    }

    #[test]
    fn state_and_events_round_trip_through_json() {
        let event = registered();
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json["UserRegistered"]["email_key"],
            serde_json::json!("ada@example.org")
        );
        assert_eq!(
            json["UserRegistered"]["role"],
            serde_json::json!("customer")
        );
        let back: UserEvent = serde_json::from_value(json).unwrap();
        assert_eq!(back, event);

        let user = user_from([registered(), UserEvent::UserDeactivated]);
        let state: User = serde_json::from_value(serde_json::to_value(&user).unwrap()).unwrap();
        assert_eq!(state, user);
    }

    #[test]
    fn event_types_are_the_variant_names() {
        let user = user_from([registered()]);
        assert_eq!(registered().event_type(), "UserRegistered");
        assert_eq!(UserEvent::UserDeactivated.event_type(), "UserDeactivated");
        assert_eq!(UserEvent::UserReactivated.event_version(), "1");
        assert!(user.is_active());
    }

    #[test]
    fn status_parses_from_its_text_form() {
        assert_eq!("active".parse(), Ok(UserStatus::Active));
        assert_eq!("deactivated".parse(), Ok(UserStatus::Deactivated));
        assert_eq!("gone".parse::<UserStatus>(), Err(ValueError::StatusUnknown));
    }

    #[test]
    fn error_codes_are_stable() {
        assert_eq!(UserError::UserNotFound.code(), "USER_NOT_FOUND");
        assert!(UserError::UserNotFound.is_not_found());
        assert!(!UserError::UserDeactivated.is_not_found());
        assert_eq!(UserError::UserAlreadyExists.code(), "USER_ALREADY_EXISTS");
        assert_eq!(UserError::UserDeactivated.code(), "USER_DEACTIVATED");
        assert_eq!(UserError::UserNotDeactivated.code(), "USER_NOT_DEACTIVATED");
    }
}
