//! `roost-coordinator serve`: stores and serves signed manifests (with ETags and long-poll),
//! an embedded Nix binary cache, and the fleet's signed reports. It holds no signing key:
//! every manifest is verified against the publisher keys, every report against its node key.
//!
//! The hot path — a conditional GET answered 304 — touches only memory.

mod cache;
mod fleet;
pub mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Args;
use roost_common::envelope::{self, Context};
use roost_common::verify::{self, Accepted, Floor, Identity, Rejection};
use roost_common::wire::v1::{Manifest, Report};
use roost_common::{EnvelopeError, NodeName, PublicKey, Timestamp, TrustedKeys};
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use store::Store;

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, default_value = "0.0.0.0:8080", env = "ROOST_LISTEN")]
    pub listen: SocketAddr,
    /// Folder for manifests, reports (SQLite) and the binary cache; created when missing.
    #[arg(
        long,
        default_value = "/var/lib/roost-coordinator",
        env = "ROOST_STATE_DIR"
    )]
    pub state_dir: PathBuf,
    /// Publisher public key file (`NAME:BASE64`, as `keygen` writes). Repeat for several;
    /// uploaded manifests must be signed by `--threshold` of them.
    #[arg(long = "publisher-key", required = true, value_name = "PUBLIC_FILE")]
    pub publisher_keys: Vec<PathBuf>,
    /// How many distinct publisher keys must sign an uploaded manifest.
    #[arg(long, default_value_t = 1)]
    pub threshold: usize,
    /// File holding the token that authorises uploads to /cache (HTTP Basic password, any
    /// user, as Nix sends from a netrc file; or `Authorization: Bearer TOKEN`). Without it the
    /// cache is read-only. Manifest uploads need no token: their signature is the authority.
    #[arg(long, value_name = "FILE")]
    pub upload_token_file: Option<PathBuf>,
    /// TLS certificate chain (PEM); serve HTTPS instead of HTTP.
    #[arg(long, requires = "tls_key", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Largest NAR accepted into the cache, in bytes.
    #[arg(long, default_value_t = 8 << 30)]
    pub max_nar_bytes: u64,
}

/// What the server needs, already loaded and validated.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The state folder.
    pub state_dir: PathBuf,
    /// Keys that may sign manifests, and how many must.
    pub publishers: TrustedKeys,
    /// The cache upload token, if uploads are allowed.
    pub upload_token: Option<String>,
    /// Largest NAR accepted.
    pub max_nar_bytes: u64,
}

/// Tells agents this server holds `?wait=S` polls open (static hosts do not send it).
const LONG_POLL: header::HeaderName = header::HeaderName::from_static("roost-long-poll");

/// Longest long-poll a client may ask for, in seconds.
pub const MAX_WAIT_S: u64 = 300;
const MAX_REPORT_BYTES: usize = 64 * 1024;
const BODY_TIMEOUT: Duration = Duration::from_secs(60);

struct Current {
    bytes: Bytes,
    etag: HeaderValue,
    manifest: Manifest,
    digest: [u8; 32],
}

struct Slot {
    current: Arc<Current>,
    tx: watch::Sender<u64>,
}

struct App {
    cfg: ServerConfig,
    store: Store,
    nodes: RwLock<HashMap<NodeName, Slot>>,
    write_lock: tokio::sync::Mutex<()>,
    requests: Mutex<HashMap<(String, u16), u64>>,
    shutdown: CancellationToken,
}

/// An error answer: `{"error": code, "message": text}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {e}");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response()
    }
}

type ApiResult = Result<Response, ApiError>;

fn parse_node(raw: &str) -> Result<NodeName, ApiError> {
    raw.parse()
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_node_name", format!("{e}")))
}

fn etag_for(version: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).expect("digits are a valid header")
}

fn matches_etag(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let want = etag.as_bytes();
    headers.get_all(header::IF_NONE_MATCH).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .map(|t| t.trim_ascii())
            .any(|t| t == b"*" || t == want || t.strip_prefix(b"W/") == Some(want))
    })
}

/// Loads what `serve` needs from the command line.
pub fn load_config(args: &ServeArgs) -> anyhow::Result<ServerConfig> {
    use anyhow::Context as _;
    let keys = args
        .publisher_keys
        .iter()
        .map(|p| PublicKey::read_file(p).with_context(|| format!("publisher key {}", p.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(
        args.threshold >= 1 && args.threshold <= keys.len(),
        "--threshold {} needs between 1 and {} publisher keys",
        args.threshold,
        keys.len()
    );
    let upload_token = match &args.upload_token_file {
        Some(f) => {
            let t = std::fs::read_to_string(f)
                .with_context(|| format!("upload token file {}", f.display()))?;
            let t = t.trim().to_owned();
            anyhow::ensure!(
                t.len() >= 16,
                "upload token in {} is shorter than 16 characters",
                f.display()
            );
            Some(t)
        }
        None => None,
    };
    Ok(ServerConfig {
        state_dir: args.state_dir.clone(),
        publishers: TrustedKeys::new(keys, args.threshold),
        upload_token,
        max_nar_bytes: args.max_nar_bytes,
    })
}

/// Runs `serve` until SIGTERM or SIGINT.
pub async fn run(args: ServeArgs) -> u8 {
    let cfg = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return crate::exit::USAGE;
        }
    };
    let listener = match std::net::TcpListener::bind(args.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.listen);
            return crate::exit::FAILED;
        }
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => {
            match axum_server::tls_rustls::RustlsConfig::from_pem_file(c, k).await {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!(
                        "error: TLS certificate {} / key {}: {e}",
                        c.display(),
                        k.display()
                    );
                    return crate::exit::USAGE;
                }
            }
        }
        _ => None,
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down: finishing requests in flight");
    };
    match serve(listener, tls, cfg, shutdown).await {
        Ok(()) => crate::exit::OK,
        Err(e) => {
            eprintln!("error: {e:#}");
            crate::exit::FAILED
        }
    }
}

/// Serves on `listener` (HTTPS when `tls` is given) until `shutdown` completes, then lets
/// requests in flight finish (held long-polls are answered at once).
pub async fn serve(
    listener: std::net::TcpListener,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let app = Arc::new(App::load(cfg)?);
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let router = router(app.clone());
    let handle = axum_server::Handle::new();
    let h = handle.clone();
    let token = app.shutdown.clone();
    tokio::spawn(async move {
        shutdown.await;
        token.cancel();
        h.graceful_shutdown(Some(Duration::from_secs(30)));
    });
    tracing::info!(%addr, tls = tls.is_some(), "roost-coordinator serving");
    let make = router.into_make_service();
    match tls {
        Some(tls) => {
            let mut server = axum_server::from_tcp_rustls(listener, tls).handle(handle);
            tune(server.http_builder());
            server.serve(make).await?;
        }
        None => {
            let mut server = axum_server::from_tcp(listener).handle(handle);
            tune(server.http_builder());
            server.serve(make).await?;
        }
    }
    Ok(())
}

fn tune(b: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>) {
    // Slow clients: a request head must arrive within 30 s.
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            "/v1/nodes/{node}/manifest",
            get(get_manifest)
                .put(put_manifest)
                .layer(DefaultBodyLimit::max(envelope::MAX_ENVELOPE_BYTES)),
        )
        .route(
            "/v1/nodes/{node}/reports",
            get(get_reports)
                .post(post_report)
                .layer(DefaultBodyLimit::max(MAX_REPORT_BYTES)),
        )
        .route("/v1/fleet", get(fleet::get_fleet))
        .route("/metrics", get(fleet::get_metrics))
        .route(
            "/cache/{*path}",
            get(get_cache)
                .put(put_cache)
                .layer(DefaultBodyLimit::disable()),
        )
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint; see DESIGN.md §5",
            )
        })
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
    let method = req.method().as_str().to_owned();
    let resp = next.run(req).await;
    if let Ok(mut m) = app.requests.lock() {
        *m.entry((format!("{method} {route}"), resp.status().as_u16()))
            .or_default() += 1;
    }
    resp
}

impl App {
    fn load(cfg: ServerConfig) -> anyhow::Result<Self> {
        let store = Store::open(&cfg.state_dir)?;
        let mut nodes = HashMap::new();
        for (node, bytes) in store.load_manifests()? {
            // Stored manifests were verified on upload; a key rotation may make old ones
            // unverifiable, so they are parsed, not re-verified.
            match current_from_bytes(bytes) {
                Ok(cur) => {
                    let (tx, _) = watch::channel(cur.manifest.version.0);
                    nodes.insert(
                        node,
                        Slot {
                            current: Arc::new(cur),
                            tx,
                        },
                    );
                }
                Err(e) => tracing::warn!(%node, "ignoring unreadable stored manifest: {e}"),
            }
        }
        tracing::info!(nodes = nodes.len(), state_dir = %cfg.state_dir.display(), "state loaded");
        Ok(Self {
            cfg,
            store,
            nodes: RwLock::new(nodes),
            write_lock: tokio::sync::Mutex::new(()),
            requests: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
        })
    }

    fn current(&self, node: &NodeName) -> Option<(Arc<Current>, watch::Receiver<u64>)> {
        let map = self.nodes.read().unwrap_or_else(|p| p.into_inner());
        map.get(node).map(|s| (s.current.clone(), s.tx.subscribe()))
    }
}

fn current_from_bytes(bytes: Vec<u8>) -> Result<Current, String> {
    let env: roost_common::Envelope = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    use base64::Engine;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(&env.payload)
        .map_err(|e| e.to_string())?;
    let manifest = verify::parse_manifest_payload(&payload).map_err(|e| e.to_string())?;
    Ok(Current {
        etag: etag_for(manifest.version.0),
        digest: verify::digest(&payload),
        manifest,
        bytes: Bytes::from(bytes),
    })
}

fn manifest_response(cur: &Current) -> Response {
    let mut r = Response::new(Body::from(cur.bytes.clone()));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::ETAG, cur.etag.clone());
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(LONG_POLL, HeaderValue::from_static("300"));
    r
}

fn not_modified(cur: &Current) -> Response {
    let mut r = StatusCode::NOT_MODIFIED.into_response();
    r.headers_mut().insert(header::ETAG, cur.etag.clone());
    r.headers_mut()
        .insert(LONG_POLL, HeaderValue::from_static("300"));
    r
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    wait: Option<u64>,
}

async fn get_manifest(
    State(app): State<Arc<App>>,
    Path(node): Path<String>,
    Query(q): Query<WaitQuery>,
    headers: HeaderMap,
) -> ApiResult {
    let node = parse_node(&node)?;
    let Some((cur, mut rx)) = app.current(&node) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_node",
            format!("no manifest has been published for node `{node}`"),
        ));
    };
    if !matches_etag(&headers, &cur.etag) {
        return Ok(manifest_response(&cur));
    }
    let wait = q.wait.unwrap_or(0).min(MAX_WAIT_S);
    if wait == 0 {
        return Ok(not_modified(&cur));
    }
    let version = cur.manifest.version.0;
    tokio::select! {
        changed = tokio::time::timeout(Duration::from_secs(wait), rx.wait_for(|v| *v > version)) => {
            if matches!(changed, Ok(Ok(_))) {
                if let Some((newer, _)) = app.current(&node) {
                    return Ok(manifest_response(&newer));
                }
            }
        }
        _ = app.shutdown.cancelled() => {}
    }
    Ok(not_modified(&cur))
}

fn rejection_to_error(r: Rejection) -> ApiError {
    let status = match &r {
        Rejection::Envelope(EnvelopeError::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
        Rejection::Envelope(EnvelopeError::NotEnoughSignatures { .. }) => StatusCode::FORBIDDEN,
        Rejection::BelowFloor { .. } | Rejection::VersionReused(_) => StatusCode::CONFLICT,
        _ => StatusCode::BAD_REQUEST,
    };
    let message = match &r {
        Rejection::BelowFloor { version, floor } => {
            format!("manifest version {version} is not newer than the stored version {floor}")
        }
        Rejection::VersionReused(v) => {
            format!("manifest version {v} is not newer than the stored version {v}")
        }
        other => other.to_string(),
    };
    ApiError::new(status, r.code(), message)
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body over {limit} bytes"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "request body took too long",
        )),
    }
}

async fn put_manifest(
    State(app): State<Arc<App>>,
    Path(node): Path<String>,
    body: Body,
) -> ApiResult {
    let node = parse_node(&node)?;
    let bytes = read_body(body, envelope::MAX_ENVELOPE_BYTES).await?;
    // The system is the manifest's own: the server checks signature, node, paths, expiry and
    // the version floor through the same function the agents use.
    let opened = envelope::open(&bytes, Context::Manifest, &app.cfg.publishers)
        .map_err(|e| rejection_to_error(e.into()))?;
    let system = verify::parse_manifest_payload(&opened.payload)
        .map_err(rejection_to_error)?
        .system;
    let _guard = app.write_lock.lock().await;
    let floor = app.current(&node).map(|(c, _)| Floor {
        version: c.manifest.version,
        digest: c.digest,
    });
    let verified = match verify::verify_manifest(
        &bytes,
        &app.cfg.publishers,
        floor.as_ref(),
        Timestamp::now(),
        Identity {
            node: &node,
            system: &system,
        },
    ) {
        Ok(Accepted::New(v)) => v,
        Ok(Accepted::Unchanged(v)) => return Err(rejection_to_error(Rejection::VersionReused(v))),
        Err(Rejection::WrongNode { expected, got }) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "node_mismatch",
                format!("manifest is for node `{got}` but was uploaded to `{expected}`"),
            ));
        }
        Err(r) => return Err(rejection_to_error(r)),
    };
    let store_bytes = bytes.to_vec();
    let app2 = app.clone();
    let node2 = node.clone();
    tokio::task::spawn_blocking(move || app2.store.save_manifest(&node2, &store_bytes))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let version = verified.manifest.version.0;
    let cur = Arc::new(Current {
        etag: etag_for(version),
        digest: verified.digest,
        manifest: verified.manifest,
        bytes,
    });
    {
        let mut map = app.nodes.write().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(&node) {
            Some(slot) => {
                slot.current = cur;
                slot.tx.send_replace(version);
            }
            None => {
                let (tx, _) = watch::channel(version);
                map.insert(node.clone(), Slot { current: cur, tx });
            }
        }
    }
    tracing::info!(%node, version, "manifest stored");
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({"node": node, "version": version}).to_string(),
    )
        .into_response())
}

async fn post_report(
    State(app): State<Arc<App>>,
    Path(node): Path<String>,
    body: Body,
) -> ApiResult {
    let node = parse_node(&node)?;
    let bytes = read_body(body, MAX_REPORT_BYTES).await?;
    let Some((cur, _)) = app.current(&node) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_node",
            format!("node `{node}` has no manifest here; publish one first"),
        ));
    };
    let record = {
        let app = app.clone();
        let n = node.to_string();
        tokio::task::spawn_blocking(move || app.store.node(&n))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?
    };
    let pinned = record
        .as_ref()
        .and_then(|r| r.pinned_key.as_deref())
        .and_then(|k| k.parse::<PublicKey>().ok());
    let (key, pin) = match (&cur.manifest.node_key, pinned) {
        (Some(k), _) => (k.clone(), None),
        (None, Some(k)) => (k, None),
        (None, None) => {
            // Trust on first use: the report names its own key; it must also verify with it.
            let claimed = unverified_report_key(&bytes).ok_or_else(|| {
                ApiError::new(StatusCode::FORBIDDEN, "no_node_key", format!("node `{node}` has no node_key in its manifest and the report names no key to pin"))
            })?;
            (claimed.clone(), Some(claimed))
        }
    };
    let opened = envelope::open(&bytes, Context::Report, &TrustedKeys::new([key.clone()], 1))
        .map_err(|e| {
            let status = if matches!(e, EnvelopeError::NotEnoughSignatures { .. }) {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::BAD_REQUEST
            };
            ApiError::new(
                status,
                "bad_signature",
                format!(
                    "report for `{node}` is not signed by its node key `{}`: {e}",
                    key.name()
                ),
            )
        })?;
    let report: Report = serde_json::from_slice(&opened.payload).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_report",
            format!("report payload: {e}"),
        )
    })?;
    if report.node != node {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "node_mismatch",
            format!(
                "report is from `{}` but was posted to `{node}`",
                report.node
            ),
        ));
    }
    let payload = String::from_utf8_lossy(&opened.payload).into_owned();
    let seq = report.seq;
    let res = {
        let app = app.clone();
        let n = node.to_string();
        let state = report.state.as_str();
        let mv = report.manifest_version.map(|v| v.0);
        tokio::task::spawn_blocking(move || {
            app.store.add_report(&store::NewReport {
                node: &n,
                seq,
                state,
                manifest_version: mv,
                payload: &payload,
                received_at: Timestamp::now().unix(),
                pin: pin.as_ref(),
            })
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?
    };
    if let Err(last) = res {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "seq_not_increasing",
            format!("report seq {seq} from `{node}` is not above {last}, already received"),
        ));
    }
    tracing::info!(%node, seq, state = report.state.as_str(), "report received");
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({"node": node, "seq": seq}).to_string(),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
struct LimitQuery {
    limit: Option<u32>,
}

/// `GET /v1/nodes/{node}/reports?limit=N`: the node's report history, newest first.
async fn get_reports(
    State(app): State<Arc<App>>,
    Path(node): Path<String>,
    Query(q): Query<LimitQuery>,
) -> ApiResult {
    let node = parse_node(&node)?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    let n = node.to_string();
    let app2 = app.clone();
    let rows = tokio::task::spawn_blocking(move || app2.store.history(&n, limit))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let reports: Vec<serde_json::Value> = rows
        .iter()
        .filter_map(|r| serde_json::from_str(r).ok())
        .collect();
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({"node": node, "reports": reports}).to_string(),
    )
        .into_response())
}

fn unverified_report_key(bytes: &[u8]) -> Option<PublicKey> {
    use base64::Engine;
    let env: roost_common::Envelope = serde_json::from_slice(bytes).ok()?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(env.payload)
        .ok()?;
    let report: Report = serde_json::from_slice(&payload).ok()?;
    report.node_key
}

fn check_token(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(want) = &app.cfg.upload_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "read_only",
            "this coordinator has no --upload-token-file: the cache is read-only",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            if let Some(b) = v.strip_prefix("Bearer ") {
                return Some(b.trim().to_owned());
            }
            use base64::Engine;
            let basic = v.strip_prefix("Basic ")?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(basic.trim())
                .ok()?;
            let text = String::from_utf8(decoded).ok()?;
            Some(
                text.split_once(':')
                    .map(|(_, p)| p.to_owned())
                    .unwrap_or(text),
            )
        });
    let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), want.as_bytes()));
    if ok {
        Ok(())
    } else {
        let mut e = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "cache uploads need the upload token (HTTP Basic password or Bearer)",
        );
        e.code = "unauthorized";
        Err(e)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn raw_cache_path(req_path: &str) -> &str {
    req_path.strip_prefix("/cache/").unwrap_or("")
}

async fn get_cache(State(app): State<Arc<App>>, req: Request) -> ApiResult {
    let raw = raw_cache_path(req.uri().path()).to_owned();
    let path = cache::resolve(&app.store.cache_dir(), &raw)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_path", e.to_string()))?;
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if raw == "nix-cache-info" {
                return Ok((
                    [(header::CONTENT_TYPE, cache::content_type(&path))],
                    cache::DEFAULT_CACHE_INFO,
                )
                    .into_response());
            }
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{raw} is not in the cache"),
            ));
        }
        Err(e) => return Err(ApiError::internal(e)),
    };
    let len = file.metadata().await.map_err(ApiError::internal)?.len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, cache::content_type(&path).to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}

async fn put_cache(State(app): State<Arc<App>>, req: Request) -> ApiResult {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    check_token(&app, req.headers())?;
    let raw = raw_cache_path(req.uri().path()).to_owned();
    let path = cache::resolve(&app.store.cache_dir(), &raw)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_path", e.to_string()))?;
    let limit = if raw.starts_with("nar/") {
        app.cfg.max_nar_bytes
    } else {
        1 << 20
    };
    let dir = path.parent().expect("cache files have a folder").to_owned();
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(ApiError::internal)?;
    let tmp = dir.join(format!(".upload-{}-{}", std::process::id(), rand_suffix()));
    let mut f = tokio::fs::File::create(&tmp)
        .await
        .map_err(ApiError::internal)?;
    let mut stream = req.into_body().into_data_stream();
    let mut total = 0u64;
    let result: Result<(), ApiError> = async {
        loop {
            let chunk = match tokio::time::timeout(BODY_TIMEOUT, stream.next()).await {
                Ok(Some(Ok(c))) => c,
                Ok(Some(Err(e))) => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "bad_body",
                        e.to_string(),
                    ));
                }
                Ok(None) => break,
                Err(_) => {
                    return Err(ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        "upload stalled for 60 s",
                    ));
                }
            };
            total += chunk.len() as u64;
            if total > limit {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("{raw} is over {limit} bytes"),
                ));
            }
            f.write_all(&chunk).await.map_err(ApiError::internal)?;
        }
        f.sync_all().await.map_err(ApiError::internal)?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(ApiError::internal)
    }
    .await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    tracing::debug!(file = %raw, bytes = total, "cache upload stored");
    Ok(StatusCode::OK.into_response())
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
