//! The state every request handler shares: the configuration, the store, the live manifest
//! table, per-node upload locks and request counters; and the two helpers every handler uses
//! on its input (the `{node}` of a URL, a small request body). Handlers depend on this module;
//! the router (`server.rs`) depends on the handlers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use roost_common::{NodeName, TrustedKeys};
use tokio_util::sync::CancellationToken;

use super::cache::NarSyncs;
use super::error::ApiError;
use super::gate::Gate;
use super::leases::Leases;
use super::live::{Current, Live};
use super::observe::Observed;
use super::store::{Store, StoreError};

/// What the server needs, loaded and validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The state folder: manifests, the report database, the binary cache.
    pub state_dir: PathBuf,
    /// Keys that may sign manifests, and how many must.
    pub publishers: TrustedKeys,
    /// The cache upload token; `None` makes the cache read-only.
    pub upload_token: Option<String>,
    /// The token for pinning node keys; `None`: the upload token does.
    pub admin_token: Option<String>,
    /// Largest NAR (or build log) accepted into the cache.
    pub max_nar_bytes: u64,
    /// A request head must arrive within this; also how long an idle connection stays open.
    pub header_timeout: Duration,
    /// Longest pause while a request body is received or a response is sent.
    pub body_timeout: Duration,
    /// After the shutdown signal, how long requests in flight may take to finish.
    pub shutdown_grace: Duration,
    /// The token for reading the fleet's data (`/v1/fleet`, report history, `/metrics`,
    /// the dashboard); the admin and upload tokens read too.
    pub read_token: Option<String>,
    /// Anyone may read the fleet's data. [`ServerConfig::new`] sets it (in-process servers
    /// of tests and benchmarks); `serve` clears it unless given `--public-read`.
    pub public_read: bool,
    /// The limits of the fleet views' flags (a `/v1/fleet` query may change them).
    pub thresholds: crate::flags::Thresholds,
    /// At most this many nodes hold a reboot lease at once.
    pub max_concurrent_reboots: u32,
    /// A reboot lease not given back expires after this.
    pub reboot_lease_timeout: Duration,
}

impl ServerConfig {
    /// A configuration with the default limits: 8 GiB NARs, 30 s for a request head, 60 s
    /// of silence in a body, 30 s of grace at shutdown, no uploads to the cache.
    pub fn new(state_dir: impl Into<PathBuf>, publishers: TrustedKeys) -> Self {
        Self {
            state_dir: state_dir.into(),
            publishers,
            upload_token: None,
            admin_token: None,
            max_nar_bytes: roost_common::wire::v1::http::DEFAULT_MAX_NAR_BYTES,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
            read_token: None,
            public_read: true,
            thresholds: crate::flags::Thresholds::default(),
            max_concurrent_reboots: 1,
            reboot_lease_timeout: Duration::from_secs(30 * 60),
        }
    }

    /// Allows cache uploads with `token`.
    pub fn with_upload_token(mut self, token: impl Into<String>) -> Self {
        self.upload_token = Some(token.into());
        self
    }
}

/// Shared state of a running server.
pub(super) struct App {
    pub cfg: ServerConfig,
    pub store: Store,
    /// Every node's current manifest, in memory.
    pub live: Live,
    /// The current rollout: which held-back manifests may be served.
    pub gate: Gate,
    write_locks: Mutex<HashMap<NodeName, Arc<tokio::sync::Mutex<()>>>>,
    /// Answered requests by `METHOD ROUTE`, then status. Keyed by the route first so that
    /// counting one (every poll does) is a lookup by `&str`, without an allocation.
    pub requests: Mutex<HashMap<String, HashMap<u16, u64>>>,
    /// Long-polls being held right now.
    pub waiting: AtomicU64,
    /// Refusals, names without a manifest, and the change counter of the live views.
    pub observed: Observed,
    /// Reboot leases.
    pub leases: Leases,
    pub shutdown: CancellationToken,
    /// NAR uploads being synced in the background (`cache.rs`).
    pub nar_syncs: NarSyncs,
}

impl App {
    pub fn load(cfg: ServerConfig) -> Result<Self, StoreError> {
        let store = Store::open(&cfg.state_dir)?;
        let live = Live::default();
        for (node, bytes) in store.load_manifests()? {
            let stored_at = std::fs::metadata(store.manifest_path(&node))
                .and_then(|m| m.modified())
                .map_or_else(|_| roost_common::Timestamp::now(), Into::into);
            match Current::from_stored(bytes, &cfg.publishers, &node, stored_at) {
                Ok(cur) => live.set(&node, cur),
                Err(e) => tracing::error!(
                    %node,
                    "not serving the stored manifest {}: {e}; the publisher's next upload \
                     replaces it",
                    store.manifest_path(&node).display()
                ),
            }
        }
        let gate = load_rollout(&cfg, &store, &live)?;
        let leases = Leases::load(
            &cfg.state_dir,
            cfg.max_concurrent_reboots,
            cfg.reboot_lease_timeout,
        )
        .map_err(|source| StoreError::Io {
            path: cfg
                .state_dir
                .join(super::leases::LEASES_FILE)
                .display()
                .to_string(),
            source,
        })?;
        tracing::info!(nodes = live.len(), state_dir = %cfg.state_dir.display(), "state loaded");
        Ok(Self {
            cfg,
            store,
            live,
            gate,
            write_locks: Mutex::new(HashMap::new()),
            requests: Mutex::new(HashMap::new()),
            waiting: AtomicU64::new(0),
            observed: Observed::default(),
            leases,
            shutdown: CancellationToken::new(),
            nar_syncs: NarSyncs::default(),
        })
    }

    /// Counts an answered request by method and route (`GET /v1/fleet`) and status (for
    /// `/metrics`).
    pub fn count_request(&self, key: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let by_status = match m.get_mut(key) {
            Some(s) => s,
            None => m.entry(key.to_owned()).or_default(),
        };
        *by_status.entry(status).or_default() += 1;
    }

    /// The lock that serialises uploads for one node.
    pub fn write_lock(&self, node: &NodeName) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.write_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(node.clone()).or_default().clone()
    }
}

/// Loads the manifests rollouts hold back and the current rollout, and serves those whose
/// wave was released (a crash may have come between saving that and writing them).
fn load_rollout(cfg: &ServerConfig, store: &Store, live: &Live) -> Result<Gate, StoreError> {
    for (node, bytes) in store.load_staged()? {
        let stored_at = std::fs::metadata(store.staged_path(&node))
            .and_then(|m| m.modified())
            .map_or_else(|_| roost_common::Timestamp::now(), Into::into);
        match Current::from_stored(bytes, &cfg.publishers, &node, stored_at) {
            Ok(cur)
                if live
                    .get(&node)
                    .is_none_or(|c| cur.manifest.version > c.manifest.version) =>
            {
                live.stage(&node, cur)
            }
            Ok(_) => store.remove_staged(&node)?,
            Err(e) => tracing::error!(
                %node,
                "not using the held-back manifest {}: {e}",
                store.staged_path(&node).display()
            ),
        }
    }
    let latest: Vec<_> = live
        .all_with_staged()
        .into_iter()
        .filter_map(|(n, b)| Some((n, b.staged.or(b.served)?.manifest.clone())))
        .collect();
    let records = match store.nodes() {
        Err(StoreError::ReportsUnavailable(_)) => Vec::new(),
        r => r?,
    };
    let gate = Gate::default();
    let now = roost_common::Timestamp::now();
    for node in gate.load(store, &latest, &records, now)? {
        if let Some(cur) = live.release(&node, now) {
            store.save_manifest(&node, &cur.bytes)?;
            store.remove_staged(&node)?;
        }
    }
    Ok(gate)
}

/// Runs a blocking state-folder call (SQLite, file writes) off the async threads; its
/// failure is answered as [`ApiError::store`] says, naming `what` was being done.
pub(super) async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| ApiError::store(what, e)),
        Err(e) => Err(ApiError::internal(what, e)),
    }
}

/// Parses the `{node}` of a URL.
pub(super) fn parse_node(raw: &str) -> Result<NodeName, ApiError> {
    raw.parse()
        .map_err(|e| ApiError::bad_request("bad_node_name", format!("{e}")))
}

/// Reads a whole small body: at most `limit` bytes, and no pause longer than the body timeout.
/// A declared length over the limit is refused before anything is read (so no
/// `100 Continue` is sent and nothing is waited for).
pub(super) async fn read_body(app: &App, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    use axum::body::HttpBody as _;
    use futures_util::StreamExt as _;
    let too_large = || ApiError::too_large(limit);
    let declared = body.size_hint().lower();
    if declared > limit as u64 {
        return Err(too_large());
    }
    let mut out = Vec::with_capacity(declared as usize);
    let mut stream = body.into_data_stream();
    loop {
        match tokio::time::timeout(app.cfg.body_timeout, stream.next()).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "timeout",
                    format!(
                        "the request body stalled for more than {} s",
                        app.cfg.body_timeout.as_secs()
                    ),
                ));
            }
            Ok(None) => return Ok(Bytes::from(out.into_boxed_slice())),
            Ok(Some(Err(e))) => {
                return Err(ApiError::bad_request(
                    "bad_body",
                    format!("the request body was cut short or malformed: {e}"),
                ));
            }
            Ok(Some(Ok(chunk))) => {
                if out.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                out.extend_from_slice(&chunk);
            }
        }
    }
}
