//! Reboot leases (docs/protocol.md §6.10): before rebooting by itself a node takes a lease
//! from its coordinator, which lets at most `--max-concurrent-reboots` nodes hold one at a
//! time (the FleetLock idea); the node gives it back once it is up and healthy again, and a
//! lease whose node never comes back expires. Requests are signed with the node key
//! (context `roost/reboot-lease/v1`).

use serde::{Deserialize, Serialize};

use crate::names::NodeName;
use crate::time::Timestamp;

/// How far a request's `sent_at` may be from the coordinator's clock, in seconds: an old
/// request cannot be replayed later.
pub const MAX_CLOCK_SKEW_S: u64 = 600;

/// What a node asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseAction {
    /// Take a lease (or keep the one it holds).
    Acquire,
    /// Give back the lease it names.
    Release,
}

/// The signed payload of `POST /v1/nodes/{node}/reboot-lease`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    /// Always [`super::FORMAT`].
    pub format: u64,
    /// The node.
    pub node: NodeName,
    /// Acquire or release.
    pub action: LeaseAction,
    /// When the node made the request.
    pub sent_at: Timestamp,
    /// The node's boot id (for the log).
    #[serde(default)]
    pub boot_id: String,
    /// For `release`: the lease given back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

/// One lease held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds it.
    pub node: NodeName,
    /// Its id, which the release names.
    pub id: String,
    /// When it was granted.
    pub since: Timestamp,
    /// When it expires if not given back.
    pub expires_at: Timestamp,
    /// The node's boot id when it took it.
    #[serde(default)]
    pub boot_id: String,
}

/// The answer to a lease request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAnswer {
    /// `acquire`: the node holds a lease now. `release`: the lease it named was held and is
    /// given back.
    pub granted: bool,
    /// The node's lease, when it holds one after the request.
    pub lease: Option<Lease>,
    /// The nodes holding a lease after the request.
    pub holders: Vec<NodeName>,
    /// At most this many at once.
    pub max_concurrent: u32,
}

/// What happened to a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LeaseEvent {
    /// Granted.
    Acquired,
    /// Asked for while the budget was used up.
    Refused,
    /// Given back by its node.
    Released,
    /// Its timeout passed before its node gave it back.
    Expired,
}

/// One line of the lease log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseLogEntry {
    /// When.
    pub at: Timestamp,
    /// The node.
    pub node: NodeName,
    /// What happened.
    pub event: LeaseEvent,
    /// The lease concerned (none for a refusal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

/// `GET /v1/reboot-leases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasesDoc {
    /// At most this many nodes hold a lease at once.
    pub max_concurrent: u32,
    /// A lease not given back expires after this many seconds.
    pub timeout_s: u64,
    /// The leases held now.
    pub holders: Vec<Lease>,
    /// What happened, oldest first (the newest [`LOG_KEPT`] entries).
    pub log: Vec<LeaseLogEntry>,
}

/// Log entries kept.
pub const LOG_KEPT: usize = 1000;
