//! What the coordinator sees besides stored manifests and accepted reports: the last refusal
//! of each node's reports, names that poll or report here without a manifest (bounded), and
//! a change counter the dashboard's live updates wait on. A middleware fills it from every
//! answer, and logs every refused upload or report at warn with its reason.
//!
//! In memory only: none of it is signed, so none of it may cost a disk write, and a restart
//! forgets it until the next poll or report brings it back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use roost_common::wire::v1::http as v1;
use roost_common::{NodeName, Timestamp};
use tokio::sync::watch;

use super::error::Answered;
use super::state::App;

/// How many names without a manifest are remembered; beyond it the one heard from longest
/// ago is forgotten (anyone can poll any name).
pub(super) const MAX_UNKNOWN: usize = 1000;

/// The coordinator's last refusal of a report posted for a node (as `/v1/fleet` shows it).
#[derive(Debug, Clone, serde::Serialize)]
pub(super) struct Refusal {
    pub at: Timestamp,
    pub code: &'static str,
    pub message: String,
    /// No report was accepted for the node since.
    pub active: bool,
}

/// Requests under a name that has no manifest (as `/v1/fleet` shows them).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(super) struct UnknownName {
    #[serde(rename = "first_seen")]
    pub first: Timestamp,
    #[serde(rename = "last_seen")]
    pub last: Timestamp,
    pub requests: u64,
}

/// See the module documentation.
pub(super) struct Observed {
    refusals: Mutex<HashMap<NodeName, Refusal>>,
    unknown: Mutex<HashMap<NodeName, UnknownName>>,
    changes: watch::Sender<u64>,
}

impl Default for Observed {
    fn default() -> Self {
        Self {
            refusals: Mutex::default(),
            unknown: Mutex::default(),
            changes: watch::channel(0).0,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Observed {
    /// Something the fleet views show changed: wakes the dashboard's live updates.
    pub fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver of the change counter (the dashboard's live updates).
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// A report for `node` (which has a manifest) was refused.
    pub fn refused(&self, node: NodeName, code: &'static str, message: String, now: Timestamp) {
        lock(&self.refusals).insert(
            node,
            Refusal {
                at: now,
                code,
                message,
                active: true,
            },
        );
        self.changed();
    }

    /// A report for `node` was accepted: its last refusal, if any, is history now.
    pub fn accepted(&self, node: &NodeName) {
        if let Some(r) = lock(&self.refusals).get_mut(node) {
            r.active = false;
        }
        self.changed();
    }

    /// Every node's last refusal.
    pub fn refusals(&self) -> HashMap<NodeName, Refusal> {
        lock(&self.refusals).clone()
    }

    /// A poll or report under `node`, which has no manifest.
    pub fn unknown(&self, node: NodeName, now: Timestamp) {
        let mut map = lock(&self.unknown);
        let new = !map.contains_key(&node);
        if new && map.len() >= MAX_UNKNOWN {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, u)| u.last)
                .map(|(n, _)| n.clone())
            {
                map.remove(&oldest);
            }
        }
        let u = map.entry(node).or_insert(UnknownName {
            first: now,
            last: now,
            requests: 0,
        });
        u.last = now;
        u.requests += 1;
        drop(map);
        if new {
            self.changed();
        }
    }

    /// `node` has a manifest now.
    pub fn known(&self, node: &NodeName) {
        lock(&self.unknown).remove(node);
        self.changed();
    }

    /// Every name without a manifest heard from.
    pub fn unknowns(&self) -> HashMap<NodeName, UnknownName> {
        lock(&self.unknown).clone()
    }
}

/// Records refusals, unknown names and changes from each answer, and logs every refused
/// request that writes (reports, manifest and cache uploads, key pins) at warn.
pub(super) async fn observe(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    let status = resp.status();
    let answered = resp.extensions().get::<Answered>();
    let code = answered.map_or("", |a| a.code);
    let message = answered.map_or("", |a| a.message.as_str());
    let writes = !matches!(method, Method::GET | Method::HEAD);
    if writes && status.is_client_error() {
        tracing::warn!(%method, path, status = status.as_u16(), code, "refused: {message}");
    }
    let now = Timestamp::now();
    let node_of = |raw: Option<&str>| raw.and_then(|n| n.parse::<NodeName>().ok());
    if method == Method::POST {
        if let Some(node) = node_of(v1::reports_node(&path)) {
            if status.is_success() {
                app.observed.accepted(&node);
            } else if code == "unknown_node" {
                app.observed.unknown(node, now);
            } else if status.is_client_error() {
                if let Some(a) = answered {
                    app.observed.refused(node, a.code, a.message.clone(), now);
                }
            }
        }
    } else if let Some(node) = node_of(v1::manifest_node(&path)) {
        if method == Method::GET && code == "unknown_node" {
            app.observed.unknown(node, now);
        } else if method == Method::PUT && status.is_success() {
            app.observed.known(&node);
        }
    } else if writes && status.is_success() {
        app.observed.changed();
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(i: usize) -> NodeName {
        format!("n{i}").parse().unwrap()
    }

    #[test]
    fn unknown_names_are_bounded_and_the_oldest_goes_first() {
        let o = Observed::default();
        for i in 0..MAX_UNKNOWN {
            o.unknown(name(i), Timestamp::from_unix(1000 + i as u64));
        }
        o.unknown(name(0), Timestamp::from_unix(5000));
        o.unknown(name(MAX_UNKNOWN), Timestamp::from_unix(5001));
        let u = o.unknowns();
        assert_eq!(u.len(), MAX_UNKNOWN);
        assert!(!u.contains_key(&name(1)), "the oldest is forgotten");
        assert_eq!(u[&name(0)].requests, 2);
        assert!(u.contains_key(&name(MAX_UNKNOWN)));
    }

    #[test]
    fn an_accepted_report_ends_a_refusal_but_keeps_it() {
        let o = Observed::default();
        let n = name(1);
        o.refused(
            n.clone(),
            "bad_signature",
            "no".into(),
            Timestamp::from_unix(1),
        );
        assert!(o.refusals()[&n].active);
        o.accepted(&n);
        let r = o.refusals()[&n].clone();
        assert!(!r.active && r.code == "bad_signature");
    }
}
