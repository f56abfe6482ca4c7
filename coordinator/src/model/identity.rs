//! Managed identities, and cluster locks.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IdentityKind {
    SystemAssigned,
    UserAssigned,
}

impl IdentityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::SystemAssigned => "SystemAssigned",
            IdentityKind::UserAssigned => "UserAssigned",
        }
    }
}

/// A user-assigned managed identity (`shoal identity create`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub name: String,
    pub client_id: String,
    pub created_at: Millis,
}

/// An identity a cluster's jobs may use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterIdentity {
    pub kind: IdentityKind,
    pub client_id: String,
}

/// `[system]` (or `system`), the cluster's own identity.
pub fn is_system_identity(which: &str) -> bool {
    which == "[system]" || which.eq_ignore_ascii_case("system")
}

/// A user-assigned identity named the way people name it: its name, its client
/// id, or the resource id the managed service uses
/// (`/subscriptions/…/userAssignedIdentities/NAME`), whose last segment names it.
pub fn identity_name_of(which: &str) -> &str {
    which
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(which)
}

/// 1 to 64 letters, digits, `-` or `_`.
pub fn validate_identity_name(name: &str) -> Result<()> {
    let fine = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if fine {
        Ok(())
    } else {
        Err(Error::invalid(
            "name",
            format!("`{name}`: 1 to 64 letters, digits, - or _"),
        ))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockKind {
    /// No scaling, no updates, no deletion.
    ReadOnly,
    /// No deletion.
    CannotDelete,
}

impl LockKind {
    pub fn parse(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().replace('_', "-").as_str() {
            "read-only" | "readonly" => Ok(LockKind::ReadOnly),
            "cannot-delete" | "cannotdelete" => Ok(LockKind::CannotDelete),
            other => Err(Error::invalid(
                "kind",
                format!("`{other}` is neither `read-only` nor `cannot-delete`"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LockKind::ReadOnly => "read-only",
            LockKind::CannotDelete => "cannot-delete",
        }
    }
}
