//! The live manifest table: each node's current manifest as served (exact bytes, ETag,
//! parsed payload) and the `watch` channel its long-polls wait on. It is what the manifest
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

/// A node known to this coordinator: its current manifest and the channel waiters watch.
struct Slot {
    current: Arc<Current>,
    tx: watch::Sender<u64>,
    /// Unix seconds of the node's last manifest poll; 0 before the first.
    polled: AtomicU64,
}

impl Slot {
    fn new(current: Current) -> Self {
        let (tx, _) = watch::channel(current.manifest.version.0);
        Self {
            current: Arc::new(current),
            tx,
            polled: AtomicU64::new(0),
        }
    }
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
    /// The node's current manifest.
    pub fn get(&self, node: &NodeName) -> Option<Arc<Current>> {
        let map = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        map.get(node).map(|s| s.current.clone())
    }

    /// The node's current manifest, for a poll: the poll's time is recorded (liveness for
    /// the fleet views; a relaxed store, no lock beyond the read lock `get` takes).
    pub fn get_polled(&self, node: &NodeName) -> Option<Arc<Current>> {
        let map = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        let slot = map.get(node)?;
        slot.polled
            .store(Timestamp::now().unix(), Ordering::Relaxed);
        Some(slot.current.clone())
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
            .map(|(n, s)| {
                let polled = s.polled.load(Ordering::Relaxed);
                let polled = (polled != 0).then(|| Timestamp::from_unix(polled));
                (n.clone(), s.current.clone(), polled)
            })
            .collect()
    }

    /// Replaces the node's manifest and wakes its waiters.
    pub fn set(&self, node: &NodeName, cur: Current) {
        let version = cur.manifest.version.0;
        let mut map = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(node) {
            Some(slot) => {
                slot.current = Arc::new(cur);
                slot.tx.send_replace(version);
            }
            None => {
                map.insert(node.clone(), Slot::new(cur));
            }
        }
    }

    /// How many nodes have a manifest.
    pub fn len(&self) -> usize {
        self.nodes.read().unwrap_or_else(|p| p.into_inner()).len()
    }
}
