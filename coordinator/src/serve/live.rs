//! The live manifest table: each node's current manifest as served (exact bytes, ETag,
//! parsed payload), the newer one its rollout wave may hold back (`staged`), and the `watch`
//! channel its long-polls wait on. It is what the manifest
//! handlers and the connection front answer from, and what the fleet views read; the files
//! under `manifests/` (see `store.rs`) are its durable copy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::body::Bytes;
use axum::http::HeaderValue;
use roost_common::envelope::{self, Context};
use roost_common::wire::v1::Manifest;
use roost_common::{NodeName, Timestamp, TrustedKeys, verify};
use tokio::sync::watch;

/// A node's current manifest as served.
pub(super) struct Current {
    /// The envelope exactly as uploaded.
    pub bytes: Bytes,
    pub etag: HeaderValue,
    pub manifest: Manifest,
    /// SHA-256 of the payload, to tell a re-upload of the same version apart.
    pub digest: [u8; 32],
    /// When this coordinator stored it (for a stored file, its modification time): since
    /// then the node has had to converge.
    pub stored_at: Timestamp,
}

impl Current {
    /// Reads a stored envelope and checks it as an upload is checked: signed by the
    /// publisher keys configured now, and for the node whose folder holds it. So a manifest
    /// signed by a key no longer trusted, or a file copied into another node's folder, is
    /// not served, and its version blocks no valid publisher. Expiry is not checked: the
    /// newest signed manifest stays the floor for the next upload, and agents refuse it
    /// once it has expired.
    pub fn from_stored(
        bytes: Vec<u8>,
        publishers: &TrustedKeys,
        node: &NodeName,
        stored_at: Timestamp,
    ) -> Result<Self, String> {
        let opened =
            envelope::open(&bytes, Context::Manifest, publishers).map_err(|e| e.to_string())?;
        let manifest =
            verify::parse_manifest_payload(&opened.payload).map_err(|e| e.to_string())?;
        if manifest.node != *node {
            return Err(format!(
                "it is node `{}`'s manifest, in node `{node}`'s folder",
                manifest.node
            ));
        }
        Ok(Self {
            etag: etag_for(manifest.version.0),
            digest: verify::digest(&opened.payload),
            manifest,
            bytes: Bytes::from(bytes),
            stored_at,
        })
    }
}

/// A node known to this coordinator: the manifest it is served, a newer one its rollout
/// wave holds back, and the channel waiters watch (carrying the served version).
struct Slot {
    current: Option<Arc<Current>>,
    staged: Option<Arc<Current>>,
    tx: watch::Sender<u64>,
    /// Unix seconds of the node's last manifest poll; 0 before the first.
    polled: AtomicU64,
}

impl Slot {
    fn empty() -> Self {
        let (tx, _) = watch::channel(0);
        Self {
            current: None,
            staged: None,
            tx,
            polled: AtomicU64::new(0),
        }
    }

    fn serve(&mut self, cur: Arc<Current>) {
        let version = cur.manifest.version.0;
        self.current = Some(cur);
        self.tx.send_replace(version);
    }
}

/// A node's served manifest and the one held back for it.
pub(super) struct Both {
    pub served: Option<Arc<Current>>,
    pub staged: Option<Arc<Current>>,
}

/// The ETag of a manifest version: the version, quoted.
pub(super) fn etag_for(version: u64) -> HeaderValue {
    HeaderValue::from_str(&roost_common::wire::v1::http::manifest_etag(version))
        .expect("digits are a valid header")
}

/// Every node's current manifest.
#[derive(Default)]
pub(super) struct Live {
    nodes: RwLock<HashMap<NodeName, Slot>>,
}

impl Live {
    /// The node's current manifest: the one it is served.
    pub fn get(&self, node: &NodeName) -> Option<Arc<Current>> {
        let map = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        map.get(node).and_then(|s| s.current.clone())
    }

    /// The newest manifest stored for the node, served or held back: the floor of the next
    /// upload.
    pub fn latest(&self, node: &NodeName) -> Option<Arc<Current>> {
        let map = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        map.get(node)
            .and_then(|s| s.staged.clone().or_else(|| s.current.clone()))
    }

    /// The manifest held back for the node, if any.
    pub fn staged(&self, node: &NodeName) -> Option<Arc<Current>> {
        let map = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        map.get(node).and_then(|s| s.staged.clone())
    }

    /// The node's current manifest, for a poll: the poll's time is recorded (liveness for
    /// the fleet views; a relaxed store, no lock beyond the read lock `get` takes).
    pub fn get_polled(&self, node: &NodeName) -> Option<Arc<Current>> {
        let map = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        let slot = map.get(node)?;
        slot.polled
            .store(Timestamp::now().unix(), Ordering::Relaxed);
        slot.current.clone()
    }

    /// A receiver that sees the node's versions from now on (for a long-poll; an answered
    /// poll does not pay for one).
    pub fn watch(&self, node: &NodeName) -> Option<watch::Receiver<u64>> {
        let map = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        map.get(node).map(|s| s.tx.subscribe())
    }

    /// Every node's current manifest and last poll.
    pub fn all_polled(&self) -> Vec<(NodeName, Arc<Current>, Option<Timestamp>)> {
        let map = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .filter_map(|(n, s)| {
                let polled = s.polled.load(Ordering::Relaxed);
                let polled = (polled != 0).then(|| Timestamp::from_unix(polled));
                Some((n.clone(), s.current.clone()?, polled))
            })
            .collect()
    }

    /// Every node with a manifest: the served one and the one held back.
    pub fn all_with_staged(&self) -> Vec<(NodeName, Both)> {
        let map = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(n, s)| {
                let both = Both {
                    served: s.current.clone(),
                    staged: s.staged.clone(),
                };
                (n.clone(), both)
            })
            .collect()
    }

    /// Serves `cur` to the node at once (dropping what was held back) and wakes its waiters.
    pub fn set(&self, node: &NodeName, cur: Current) {
        let mut map = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        let slot = map.entry(node.clone()).or_insert_with(Slot::empty);
        slot.staged = None;
        slot.serve(Arc::new(cur));
    }

    /// Holds `cur` back: the node keeps being served what it was until [`Live::release`].
    pub fn stage(&self, node: &NodeName, cur: Current) {
        let mut map = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        let slot = map.entry(node.clone()).or_insert_with(Slot::empty);
        slot.staged = Some(Arc::new(cur));
    }

    /// Serves the manifest held back for the node and wakes its waiters; the manifest now
    /// served (stored, as the fleet views see it, `at` its release), or `None` when nothing
    /// was held back.
    pub fn release(&self, node: &NodeName, at: Timestamp) -> Option<Arc<Current>> {
        let mut map = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        let slot = map.get_mut(node)?;
        let held = slot.staged.take()?;
        let cur = Arc::new(Current {
            bytes: held.bytes.clone(),
            etag: held.etag.clone(),
            manifest: held.manifest.clone(),
            digest: held.digest,
            stored_at: at,
        });
        slot.serve(cur.clone());
        Some(cur)
    }

    /// How many nodes have a manifest served.
    pub fn len(&self) -> usize {
        let map = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        map.values().filter(|s| s.current.is_some()).count()
    }
}
