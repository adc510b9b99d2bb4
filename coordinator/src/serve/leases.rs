//! Reboot leases (docs/protocol.md §6.10): `POST /v1/nodes/{node}/reboot-lease`, signed by
//! the node key like a report, takes or gives back a lease; at most
//! `--max-concurrent-reboots` nodes hold one at a time, and one not given back expires after
//! `--reboot-lease-timeout`. `GET /v1/reboot-leases` shows the holders and the log. The book
//! ([`LeaseBook`]) is pure and saved to `STATE/reboot-leases.json` after every change, so a
//! restart keeps who holds what.

use std::collections::VecDeque;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use roost_common::envelope::{self, Context};
use roost_common::wire::v1::lease::{
    LOG_KEPT, Lease, LeaseAction, LeaseAnswer, LeaseEvent, LeaseLogEntry, LeaseRequest, LeasesDoc,
    MAX_CLOCK_SKEW_S,
};
use roost_common::{NodeName, PublicKey, Timestamp, TrustedKeys};

use super::auth;
use super::error::ApiError;
use super::state::{App, blocking, parse_node, read_body};

/// The file the book is kept in, under the state folder.
pub const LEASES_FILE: &str = "reboot-leases.json";
/// Largest lease request body.
const MAX_REQUEST_BYTES: usize = 16 * 1024;

/// Who holds a reboot lease, and what happened to leases.
#[derive(Debug, Clone)]
pub struct LeaseBook {
    max: u32,
    timeout: Duration,
    holders: Vec<Lease>,
    log: VecDeque<LeaseLogEntry>,
}

impl LeaseBook {
    /// An empty book: at most `max` holders, leases expiring after `timeout`.
    pub fn new(max: u32, timeout: Duration) -> Self {
        Self {
            max,
            timeout,
            holders: Vec::new(),
            log: VecDeque::new(),
        }
    }

    /// The book saved in `doc`, under this server's limits.
    fn from_doc(doc: LeasesDoc, max: u32, timeout: Duration) -> Self {
        Self {
            max,
            timeout,
            holders: doc.holders,
            log: doc.log.into(),
        }
    }

    fn note(&mut self, at: Timestamp, node: &NodeName, event: LeaseEvent, lease: Option<&str>) {
        if self.log.len() == LOG_KEPT {
            self.log.pop_front();
        }
        self.log.push_back(LeaseLogEntry {
            at,
            node: node.clone(),
            event,
            lease: lease.map(str::to_owned),
        });
    }

    /// Drops the leases whose timeout passed by `now`.
    pub fn expire(&mut self, now: Timestamp) {
        let (gone, kept): (Vec<Lease>, Vec<Lease>) = std::mem::take(&mut self.holders)
            .into_iter()
            .partition(|l| l.expires_at <= now);
        self.holders = kept;
        for l in gone {
            tracing::warn!(node = %l.node, lease = %l.id, "reboot lease expired: the node did not give it back in time");
            self.note(now, &l.node, LeaseEvent::Expired, Some(&l.id));
        }
    }

    fn answer(&self, node: &NodeName, granted: bool) -> LeaseAnswer {
        LeaseAnswer {
            granted,
            lease: self.holders.iter().find(|l| l.node == *node).cloned(),
            holders: self.holders.iter().map(|l| l.node.clone()).collect(),
            max_concurrent: self.max,
        }
    }

    /// `node` asks for a lease at `now`: it keeps one it holds, gets one while fewer than the
    /// maximum are held, else is refused.
    pub fn acquire(&mut self, node: &NodeName, boot_id: &str, now: Timestamp) -> LeaseAnswer {
        self.expire(now);
        if self.holders.iter().any(|l| l.node == *node) {
            return self.answer(node, true);
        }
        if self.holders.len() >= self.max as usize {
            self.note(now, node, LeaseEvent::Refused, None);
            return self.answer(node, false);
        }
        let id = format!("{node}-{}", now.unix());
        self.holders.push(Lease {
            node: node.clone(),
            id: id.clone(),
            since: now,
            expires_at: now.plus(self.timeout),
            boot_id: boot_id.to_owned(),
        });
        self.note(now, node, LeaseEvent::Acquired, Some(&id));
        self.answer(node, true)
    }

    /// `node` gives back lease `id`: only the lease it holds under that id (an old request
    /// replayed names an old id and changes nothing).
    pub fn release(&mut self, node: &NodeName, id: Option<&str>, now: Timestamp) -> LeaseAnswer {
        self.expire(now);
        let held = self
            .holders
            .iter()
            .position(|l| l.node == *node && Some(l.id.as_str()) == id);
        if let Some(i) = held {
            let l = self.holders.remove(i);
            self.note(now, node, LeaseEvent::Released, Some(&l.id));
        }
        self.answer(node, held.is_some())
    }

    /// The document `GET /v1/reboot-leases` answers (and the file holds).
    pub fn doc(&self) -> LeasesDoc {
        LeasesDoc {
            max_concurrent: self.max,
            timeout_s: self.timeout.as_secs(),
            holders: self.holders.clone(),
            log: self.log.iter().cloned().collect(),
        }
    }
}

/// The book kept in the state folder.
#[derive(Debug)]
pub(super) struct Leases {
    path: PathBuf,
    book: std::sync::Mutex<LeaseBook>,
}

impl Leases {
    /// Loads `STATE/reboot-leases.json` (an empty book when there is none).
    pub fn load(state_dir: &FsPath, max: u32, timeout: Duration) -> std::io::Result<Self> {
        let path = state_dir.join(LEASES_FILE);
        let book = match std::fs::read(&path) {
            Ok(b) => {
                let doc: LeasesDoc = serde_json::from_slice(&b)
                    .map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?;
                LeaseBook::from_doc(doc, max, timeout)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LeaseBook::new(max, timeout),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path,
            book: std::sync::Mutex::new(book),
        })
    }

    /// Applies `f` to the book and saves it.
    fn change<T>(&self, f: impl FnOnce(&mut LeaseBook) -> T) -> std::io::Result<T> {
        let mut book = self.book.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut book);
        let bytes = serde_json::to_vec_pretty(&book.doc()).expect("the lease book serialises");
        roost_common::fs::write_atomic(&self.path, &bytes)?;
        Ok(out)
    }
}

/// The key a node's lease requests are checked with: its manifest's `node_key`, else the
/// key pinned for it (by an operator or its first report). A lease needs a known key.
async fn node_key(app: &Arc<App>, node: &NodeName) -> Result<PublicKey, ApiError> {
    let Some(cur) = app.live.get(node) else {
        return Err(ApiError::not_found(
            "unknown_node",
            format!("node `{node}` has no manifest here; publish one first"),
        ));
    };
    if let Some(k) = &cur.manifest.node_key {
        return Ok(k.clone());
    }
    let record = {
        let app = app.clone();
        let n = node.to_string();
        blocking("reading the node's record", move || app.store.node(&n)).await?
    };
    record
        .and_then(|r| r.pinned_key)
        .and_then(|k| k.parse::<PublicKey>().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "no_node_key",
                format!(
                    "node `{node}` has no node_key in its manifest and no pinned key: a reboot \
                     lease needs one (its first report pins it, or set roost.nodeKey)"
                ),
            )
        })
}

/// `POST /v1/nodes/{node}/reboot-lease`.
pub(super) async fn post_lease(
    State(app): State<Arc<App>>,
    Path(node): Path<String>,
    body: Body,
) -> Result<Json<LeaseAnswer>, ApiError> {
    let node = parse_node(&node)?;
    let bytes = read_body(&app, body, MAX_REQUEST_BYTES).await?;
    let key = node_key(&app, &node).await?;
    let opened = envelope::open(
        &bytes,
        Context::RebootLease,
        &TrustedKeys::new([key.clone()], 1),
    )
    .map_err(|e| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "bad_signature",
            format!(
                "reboot lease request for `{node}` is not signed by its node key `{}`: {e}",
                key.name()
            ),
        )
    })?;
    let req: LeaseRequest = serde_json::from_slice(&opened.payload).map_err(|e| {
        ApiError::bad_request("invalid_request", format!("lease request of `{node}`: {e}"))
    })?;
    if req.node != node {
        return Err(ApiError::bad_request(
            "node_mismatch",
            format!(
                "lease request is from `{}` but was posted to `{node}`",
                req.node
            ),
        ));
    }
    let now = Timestamp::now();
    let skew = now.secs_since(req.sent_at).max(req.sent_at.secs_since(now));
    if skew > MAX_CLOCK_SKEW_S {
        return Err(ApiError::bad_request(
            "stale_request",
            format!(
                "lease request of `{node}` was sent at {}, {skew} s from this server's clock \
                 (at most {MAX_CLOCK_SKEW_S} s): check the node's clock",
                req.sent_at
            ),
        ));
    }
    let answer = app
        .leases
        .change(|b| match req.action {
            LeaseAction::Acquire => b.acquire(&node, &req.boot_id, now),
            LeaseAction::Release => b.release(&node, req.lease.as_deref(), now),
        })
        .map_err(|e| ApiError::internal("saving the reboot leases", e))?;
    tracing::info!(%node, action = ?req.action, granted = answer.granted, holders = answer.holders.len(), "reboot lease");
    Ok(Json(answer))
}

/// `GET /v1/reboot-leases` (the read token, like the fleet view).
pub(super) async fn get_leases(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Json<LeasesDoc>, ApiError> {
    auth::check_read(&app, &headers)?;
    let doc = app
        .leases
        .change(|b| {
            b.expire(Timestamp::now());
            b.doc()
        })
        .map_err(|e| ApiError::internal("saving the reboot leases", e))?;
    Ok(Json(doc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeName {
        s.parse().unwrap()
    }

    fn at(s: u64) -> Timestamp {
        Timestamp::from_unix(1_800_000_000 + s)
    }

    #[test]
    fn at_most_max_nodes_hold_a_lease_and_a_holder_keeps_its_own() {
        let mut b = LeaseBook::new(1, Duration::from_secs(600));
        let a = b.acquire(&n("a"), "boot-a", at(0));
        assert!(a.granted);
        let id = a.lease.unwrap().id;
        assert!(!b.acquire(&n("b"), "boot-b", at(1)).granted);
        let again = b.acquire(&n("a"), "boot-a", at(2));
        assert!(again.granted);
        assert_eq!(again.lease.unwrap().id, id, "the same lease, not a second");
        assert_eq!(again.holders, vec![n("a")]);
    }

    #[test]
    fn a_release_frees_the_lease_only_under_its_own_id() {
        let mut b = LeaseBook::new(1, Duration::from_secs(600));
        let id = b.acquire(&n("a"), "", at(0)).lease.unwrap().id;
        assert!(!b.release(&n("a"), Some("a-1"), at(1)).granted, "an old id");
        assert!(
            !b.release(&n("b"), Some(&id), at(1)).granted,
            "another node"
        );
        assert!(!b.acquire(&n("b"), "", at(2)).granted);
        assert!(b.release(&n("a"), Some(&id), at(3)).granted);
        assert!(b.acquire(&n("b"), "", at(4)).granted);
        let events: Vec<(String, LeaseEvent)> = b
            .doc()
            .log
            .iter()
            .map(|e| (e.node.to_string(), e.event))
            .collect();
        assert_eq!(
            events,
            [
                ("a".into(), LeaseEvent::Acquired),
                ("b".into(), LeaseEvent::Refused),
                ("a".into(), LeaseEvent::Released),
                ("b".into(), LeaseEvent::Acquired),
            ]
        );
    }

    #[test]
    fn a_lease_not_given_back_expires_after_the_timeout() {
        let mut b = LeaseBook::new(1, Duration::from_secs(600));
        b.acquire(&n("a"), "", at(0));
        assert!(!b.acquire(&n("b"), "", at(599)).granted);
        assert!(b.acquire(&n("b"), "", at(600)).granted);
        let log = b.doc().log;
        assert_eq!(log[2].event, LeaseEvent::Expired);
        assert_eq!(log[2].node, n("a"));
    }

    #[test]
    fn the_book_survives_a_restart_in_its_file() {
        let d = tempfile::tempdir().unwrap();
        let l = Leases::load(d.path(), 2, Duration::from_secs(60)).unwrap();
        l.change(|b| b.acquire(&n("a"), "x", at(0))).unwrap();
        let l = Leases::load(d.path(), 2, Duration::from_secs(60)).unwrap();
        let doc = l.change(|b| b.doc()).unwrap();
        assert_eq!(doc.holders.len(), 1);
        assert_eq!(doc.holders[0].node, n("a"));
        assert_eq!(doc.max_concurrent, 2);
    }
}
