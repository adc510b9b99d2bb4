//! The server core: configuration, shared state, routes, limits and graceful shutdown. It
//! takes its listener and its shutdown signal as parameters, so tests, the fleet harness and
//! benchmarks run it in-process.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{StatusCode, header::HeaderName};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use roost_common::wire::v1::http as v1;
use roost_common::{NodeName, TrustedKeys};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::error::{ApiError, json_errors};
use super::front::Front;
use super::manifests::{Current, Slot};
use super::store::{Store, StoreError};
use super::{cache, fleet, manifests, reports};

/// Tells agents this server holds `?wait=S` polls open, and for how long at most (static
/// hosts do not send it).
pub const LONG_POLL: HeaderName = HeaderName::from_static(v1::LONG_POLL_HEADER);

pub use v1::MAX_WAIT_S;

/// The route of a node's manifest (the connection front answers most requests to it).
pub(super) const MANIFEST_ROUTE: &str = v1::route::MANIFEST;

/// What the server needs, loaded and validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The state folder: manifests, the report database, the binary cache.
    pub state_dir: PathBuf,
    /// Keys that may sign manifests, and how many must.
    pub publishers: TrustedKeys,
    /// The cache upload token; `None` makes the cache read-only.
    pub upload_token: Option<String>,
    /// Largest NAR (or build log) accepted into the cache.
    pub max_nar_bytes: u64,
    /// A request head must arrive within this; also how long an idle connection stays open.
    pub header_timeout: Duration,
    /// Longest pause while a request body is received or a response is sent.
    pub body_timeout: Duration,
    /// After the shutdown signal, how long requests in flight may take to finish.
    pub shutdown_grace: Duration,
}

impl ServerConfig {
    /// A configuration with the default limits: 8 GiB NARs, 30 s for a request head, 60 s
    /// of silence in a body, 30 s of grace at shutdown, no uploads to the cache.
    pub fn new(state_dir: impl Into<PathBuf>, publishers: TrustedKeys) -> Self {
        Self {
            state_dir: state_dir.into(),
            publishers,
            upload_token: None,
            max_nar_bytes: v1::DEFAULT_MAX_NAR_BYTES,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(30),
        }
    }

    /// Allows cache uploads with `token`.
    pub fn with_upload_token(mut self, token: impl Into<String>) -> Self {
        self.upload_token = Some(token.into());
        self
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The state folder or its database could not be opened.
    #[error("state folder: {0}")]
    State(#[from] StoreError),
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS certificate or key could not be loaded.
    #[error("TLS certificate {cert} / key {key}: {source}")]
    Tls {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// Shared state of a running server.
pub(super) struct App {
    pub cfg: ServerConfig,
    pub store: Store,
    nodes: RwLock<HashMap<NodeName, Slot>>,
    write_locks: Mutex<HashMap<NodeName, Arc<tokio::sync::Mutex<()>>>>,
    pub requests: Mutex<HashMap<(String, u16), u64>>,
    /// Long-polls being held right now.
    pub waiting: AtomicU64,
    pub shutdown: CancellationToken,
}

impl App {
    fn load(cfg: ServerConfig) -> Result<Self, ServeError> {
        let store = Store::open(&cfg.state_dir)?;
        let mut nodes = HashMap::new();
        for (node, bytes) in store.load_manifests()? {
            match Current::from_stored(bytes) {
                Ok(cur) => {
                    nodes.insert(node, Slot::new(cur));
                }
                Err(e) => tracing::warn!(%node, "ignoring unreadable stored manifest: {e}"),
            }
        }
        tracing::info!(nodes = nodes.len(), state_dir = %cfg.state_dir.display(), "state loaded");
        Ok(Self {
            cfg,
            store,
            nodes: RwLock::new(nodes),
            write_locks: Mutex::new(HashMap::new()),
            requests: Mutex::new(HashMap::new()),
            waiting: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
        })
    }

    /// The node's current manifest and a receiver that sees its next version.
    pub fn current(&self, node: &NodeName) -> Option<(Arc<Current>, watch::Receiver<u64>)> {
        let map = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        map.get(node).map(|s| (s.current.clone(), s.tx.subscribe()))
    }

    /// Every node's current manifest.
    pub fn all_current(&self) -> Vec<(NodeName, Arc<Current>)> {
        let map = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        map.iter()
            .map(|(n, s)| (n.clone(), s.current.clone()))
            .collect()
    }

    /// Replaces the node's manifest and wakes its waiters.
    pub fn set_current(&self, node: &NodeName, cur: Current) {
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

    /// Counts an answered request by method, route and status (for `/metrics`).
    pub fn count_request(&self, key: String, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((key, status)).or_default() += 1;
        }
    }

    /// The lock that serialises uploads for one node.
    pub fn write_lock(&self, node: &NodeName) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.write_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(node.clone()).or_default().clone()
    }
}

/// Parses the `{node}` of a URL.
pub(super) fn parse_node(raw: &str) -> Result<NodeName, ApiError> {
    raw.parse()
        .map_err(|e| ApiError::bad_request("bad_node_name", format!("{e}")))
}

/// Reads a whole small body: at most `limit` bytes, and no pause longer than the body timeout.
pub(super) async fn read_body(app: &App, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let body = tower_http::timeout::TimeoutBody::new(app.cfg.body_timeout, body);
    match axum::body::to_bytes(Body::new(body), limit).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.is::<tower_http::timeout::TimeoutError>() {
                    return Err(ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        format!(
                            "the request body stalled for more than {} s",
                            app.cfg.body_timeout.as_secs()
                        ),
                    ));
                }
                source = s.source();
            }
            Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("the request body is over the {limit}-byte limit or was cut short"),
            ))
        }
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            MANIFEST_ROUTE,
            get(manifests::get_manifest)
                .put(manifests::put_manifest)
                .layer(DefaultBodyLimit::max(v1::MAX_MANIFEST_BYTES)),
        )
        .route(
            v1::route::REPORTS,
            get(reports::get_reports)
                .post(reports::post_report)
                .layer(DefaultBodyLimit::max(reports::MAX_REPORT_BYTES)),
        )
        .route(v1::route::FLEET, get(fleet::get_fleet))
        .route(v1::route::METRICS, get(fleet::get_metrics))
        .route(
            v1::route::CACHE,
            get(cache::get_cache)
                .put(cache::put_cache)
                .layer(DefaultBodyLimit::disable()),
        )
        .fallback(|| async {
            ApiError::not_found("not_found", "no such endpoint; see docs/protocol.md §6")
        })
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            count_requests,
        ))
        .with_state(app)
}

async fn count_requests(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "other".into());
    let key = format!("{} {route}", req.method());
    let resp = next.run(req).await;
    app.count_request(key, resp.status().as_u16());
    resp
}

/// A coordinator with its state loaded, ready to serve.
pub struct Coordinator {
    app: Arc<App>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("state_dir", &self.app.cfg.state_dir)
            .finish_non_exhaustive()
    }
}

impl Coordinator {
    /// Opens the state folder (creating it when needed) and loads the stored manifests.
    pub fn open(cfg: ServerConfig) -> Result<Self, ServeError> {
        Ok(Self {
            app: Arc::new(App::load(cfg)?),
        })
    }

    /// Serves on `listener` (HTTPS when `tls` is given) until `shutdown` completes; then
    /// answers held long-polls at once, lets other requests in flight finish within the
    /// grace period, and returns.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        tls: Option<TlsConfig>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let app = self.app;
        let addr = listener.local_addr()?;
        let grace = app.cfg.shutdown_grace;
        let front = Arc::new(Front::new(app.clone(), router(app.clone())));
        let acceptor = tls.map(|t| tokio_rustls::TlsAcceptor::from(t.0));
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut conns = tokio::task::JoinSet::new();
        tracing::info!(%addr, tls = acceptor.is_some(), "roost-coordinator serving");
        tokio::pin!(shutdown);
        loop {
            let (tcp, _peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, most likely: let connections end first.
                        tracing::warn!("accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            while conns.try_join_next().is_some() {}
            let _ = tcp.set_nodelay(true);
            let (front, watcher) = (front.clone(), graceful.watcher());
            // Two task types, so a plain connection's task is not sized for TLS state.
            match acceptor.clone() {
                None => conns.spawn(async move { front.serve(tcp, watcher).await }),
                Some(acceptor) => conns.spawn(async move {
                    let hs = tokio::time::timeout(front.header_timeout(), acceptor.accept(tcp));
                    match hs.await {
                        Ok(Ok(tls)) => front.serve(tls, watcher).await,
                        Ok(Err(e)) => tracing::debug!("TLS handshake: {e}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }),
            };
        }
        tracing::info!("shutting down: finishing requests in flight");
        drop(listener);
        app.shutdown.cancel();
        let drained = tokio::time::timeout(grace, async {
            graceful.shutdown().await;
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                left = conns.len(),
                "requests still running after the {grace:?} grace period are cut off"
            );
        }
        conns.abort_all();
        Ok(())
    }
}

/// Serves plain HTTP on `listener` until `shutdown` completes (see [`Coordinator::serve`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    Coordinator::open(cfg)?
        .serve(listener, None, shutdown)
        .await
}

/// Serves HTTPS on `listener` until `shutdown` completes (see [`Coordinator::serve`]).
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    tls: TlsConfig,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    Coordinator::open(cfg)?
        .serve(listener, Some(tls), shutdown)
        .await
}

/// A certificate chain and key, ready to serve HTTPS (TLS 1.2 and 1.3, HTTP/1.1).
#[derive(Clone)]
pub struct TlsConfig(Arc<rustls::ServerConfig>);

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConfig")
    }
}

/// Loads a PEM certificate chain and private key for [`serve_tls`].
pub async fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<TlsConfig, ServeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let err = |source: std::io::Error| ServeError::Tls {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        source,
    };
    let pem = |e: rustls::pki_types::pem::Error| match e {
        rustls::pki_types::pem::Error::Io(e) => e,
        e => std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| err(pem(e)))?;
    if certs.is_empty() {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no certificate in the file",
        )));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| err(pem(e)))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key_der))
        .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
    // HTTP/1.1 only: an agent's one held poll per connection gains nothing from HTTP/2, and
    // the connection front answers polls over HTTP/1.1 for a fraction of the memory.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConfig(Arc::new(config)))
}

/// A server running in the background of the current tokio runtime.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl Running {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts it down gracefully and waits until it has stopped.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(r) => r,
            Err(e) => Err(ServeError::Io(std::io::Error::other(e))),
        }
    }
}

/// Binds `addr` (use port 0 for any free port), loads the state and serves plain HTTP in a
/// background task: what tests, the fleet harness and benchmarks call.
pub async fn start(addr: SocketAddr, cfg: ServerConfig) -> Result<Running, ServeError> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let coordinator = Coordinator::open(cfg)?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(coordinator.serve(listener, None, async move {
        let _ = rx.await;
    }));
    Ok(Running {
        addr,
        stop: Some(tx),
        task,
    })
}
