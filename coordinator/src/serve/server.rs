//! The server: routes, the accept loop, TLS and graceful shutdown. It takes its listener and
//! its shutdown signal as parameters, so tests, the fleet harness and benchmarks run it
//! in-process.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use roost_common::wire::v1::http as v1;

use super::error::{ApiError, json_errors};
use super::front::Front;
use super::manifests::MANIFEST_ROUTE;
use super::state::{App, ServerConfig};
use super::store::StoreError;
use super::{cache, dashboard, fleet, gate, leases, manifests, observe, pins, reports};

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

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route(
            MANIFEST_ROUTE,
            get(manifests::get_manifest)
                .put(manifests::put_manifest)
                .layer(DefaultBodyLimit::max(v1::MAX_MANIFEST_BYTES)),
        )
        .route(
            reports::REPORTS_ROUTE,
            get(reports::get_reports)
                .post(reports::post_report)
                .layer(DefaultBodyLimit::max(reports::MAX_REPORT_BYTES)),
        )
        .route(
            pins::KEY_ROUTE,
            axum::routing::put(pins::put_key).delete(pins::delete_key),
        )
        .route(gate::ROLLOUT_ROUTE, get(gate::get_rollout))
        .route(gate::ACTION_ROUTE, axum::routing::post(gate::post_action))
        .route(v1::route::FLEET, get(fleet::get_fleet))
        .route(
            v1::route::REBOOT_LEASE,
            axum::routing::post(leases::post_lease),
        )
        .route(v1::route::REBOOT_LEASES, get(leases::get_leases))
        .route(v1::route::METRICS, get(fleet::get_metrics))
        .route(dashboard::INDEX_ROUTE, get(dashboard::get_index))
        .route(dashboard::NODE_ROUTE, get(dashboard::get_node))
        .route(dashboard::EVENTS_ROUTE, get(dashboard::get_events))
        .route(
            cache::CACHE_ROUTE,
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
            observe::observe,
        ))
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
    app.count_request(&key, resp.status().as_u16());
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
        let timer = tokio::spawn(gate::timer(app.clone()));
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
        timer.abort();
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
