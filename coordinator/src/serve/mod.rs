//! `roost-coordinator serve`: stores and serves signed manifests (with ETags and long-poll),
//! an embedded Nix binary cache, and the fleet's signed reports. It holds no signing key:
//! every manifest is verified against the publisher keys, every report against its node key.
//!
//! In-process use (tests, harnesses, benchmarks):
//! ```no_run
//! # async fn f(keys: roost_common::TrustedKeys) -> Result<(), roost_coordinator::serve::ServeError> {
//! use roost_coordinator::serve::{ServerConfig, start};
//! let server = start("127.0.0.1:0".parse().unwrap(), ServerConfig::new("/tmp/state", keys)).await?;
//! println!("{}", server.url());
//! server.stop().await
//! # }
//! ```
//!
//! Layers, each depending only on those above it: `error` and `store` (the state folder);
//! `live` (every node's current manifest in memory); `state` (what handlers share: config,
//! store, live table, locks, counters); the handlers `manifests`, `reports`, `fleet`,
//! `cache`; `front` (the connection front, which answers polls through `manifests`); and
//! `server` (router, accept loop, TLS, shutdown).

mod auth;
mod cache;
mod dashboard;
mod error;
mod fleet;
mod front;
mod gate;
mod leases;
mod live;
mod manifests;
mod observe;
mod pins;
mod reports;
mod rollout;
mod server;
mod state;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use roost_common::{PublicKey, TrustedKeys};

pub use error::ApiError;
pub use manifests::{LONG_POLL, MAX_WAIT_S};
pub use reports::MAX_REPORT_BYTES;
pub use server::{Coordinator, Running, ServeError, TlsConfig, load_tls, serve, serve_tls, start};
pub use state::ServerConfig;
pub use store::Store;

/// Arguments of `serve`.
#[derive(Debug, Args)]
#[command(after_help = "\
Endpoints:
  GET  /v1/nodes/NODE/manifest[?wait=S]  the signed manifest; ETag, If-None-Match -> 304;
                                         wait holds the poll up to S (max 300) seconds
  PUT  /v1/nodes/NODE/manifest           upload, verified against the publisher keys
  POST /v1/nodes/NODE/reports            a report signed by the node key
  GET  /v1/nodes/NODE/reports?limit=N    report history, newest first
  PUT|DELETE /v1/nodes/NODE/key          pin or clear the key NODE's reports are checked with
                                         when its manifest names none (admin token; see
                                         `roost-coordinator node-key --help`)
  GET  /v1/fleet[?stale=D&stuck=D&expiring=D]
                                         the fleet as JSON with each node's flags and
                                         reasons (what `status` shows)
  POST /v1/nodes/NODE/reboot-lease       take or give back a reboot lease (signed by the
                                         node key; --max-concurrent-reboots at once)
  GET  /v1/reboot-leases                 lease holders and the lease log
  GET  /metrics                          Prometheus text
  GET  /                                 the dashboard (HTML, live updates; /nodes/NODE for
                                         one node, /events the server-sent change events)
The fleet's data (/v1/fleet, report histories, /metrics, the dashboard) needs the read, admin
or upload token unless --public-read; an agent's manifest polls and reports need none.
  GET|PUT /cache/...                     a Nix binary cache: substituter URL and the target
                                         of `nix copy --to http://HOST:PORT/cache`

Stops cleanly on SIGTERM or SIGINT: held long-polls are answered at once, other requests
finish. Exit status: 0 after a clean stop, 1 when serving fails (address in use, unreadable
state folder), 2 for bad flags, key or token files.")]
pub struct ServeArgs {
    /// Address and port to listen on (`0.0.0.0:8080` for every interface).
    #[arg(long, default_value = "127.0.0.1:8080", env = "ROOST_LISTEN")]
    pub listen: SocketAddr,
    /// Folder for manifests (`manifests/v1/nodes/NODE/manifest`), the report database
    /// (`coordinator.sqlite`) and the binary cache (`cache/`); created when missing. Restarting
    /// on the same folder serves the same manifests, reports and cache.
    #[arg(
        long,
        default_value = "/var/lib/roost-coordinator",
        env = "ROOST_STATE_DIR"
    )]
    pub state_dir: PathBuf,
    /// Publisher public key file (`NAME:BASE64`, as `keygen` or
    /// `nix-store --generate-binary-cache-key` writes). Repeat for several; an uploaded
    /// manifest must be signed by `--threshold` of them.
    #[arg(long = "publisher-key", required = true, value_name = "PUBLIC_FILE")]
    pub publisher_keys: Vec<PathBuf>,
    /// How many distinct publisher keys must sign an uploaded manifest.
    #[arg(long, default_value_t = 1)]
    pub threshold: usize,
    /// File holding the token that authorises uploads to /cache: sent as the HTTP Basic
    /// password (any user name; Nix sends it from a netrc file line
    /// `machine HOST login roost password TOKEN`) or as `Authorization: Bearer TOKEN`.
    /// Without it the cache is read-only. Manifest uploads need no token: the publisher
    /// signature is their authority, and reports are signed by their node.
    #[arg(long, value_name = "FILE", env = "ROOST_UPLOAD_TOKEN_FILE")]
    pub upload_token_file: Option<PathBuf>,
    /// File holding the token that authorises pinning and clearing node keys
    /// (`roost-coordinator node-key`). Without it the upload token does; with neither,
    /// node keys cannot be pinned over HTTP.
    #[arg(long, value_name = "FILE", env = "ROOST_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// File holding the token that authorises reading the fleet's data: /v1/fleet, report
    /// histories, /metrics and the dashboard (Bearer, or the HTTP Basic password, which is
    /// what a browser asks for). The admin and upload tokens read too. Agents need none.
    #[arg(long, value_name = "FILE", env = "ROOST_READ_TOKEN_FILE")]
    pub read_token_file: Option<PathBuf>,
    /// Let anyone who reaches the server read the fleet's data (node names, versions,
    /// errors) without a token.
    #[arg(long)]
    pub public_read: bool,
    /// The fleet views flag a node STALE after this long without a report or a poll.
    #[arg(long, default_value = "1h", value_parser = roost_common::time::parse_duration)]
    pub stale_after: Duration,
    /// ... STUCK when it has not converged this long after its manifest was stored.
    #[arg(long, default_value = "30m", value_parser = roost_common::time::parse_duration)]
    pub stuck_after: Duration,
    /// ... EXPIRING when its manifest expires within this.
    #[arg(long, default_value = "7d", value_parser = roost_common::time::parse_duration)]
    pub expiring_within: Duration,
    /// At most this many nodes of the fleet hold a reboot lease (reboot by themselves) at
    /// once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_reboots: u32,
    /// A reboot lease its node has not given back (it never came back healthy) expires after
    /// this, freeing its place.
    #[arg(long, default_value = "30m", value_parser = roost_common::time::parse_duration)]
    pub reboot_lease_timeout: Duration,
    /// TLS certificate chain (PEM): serve HTTPS instead of HTTP. Needs --tls-key.
    #[arg(long, requires = "tls_key", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM). Needs --tls-cert.
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// Largest NAR (or build log) accepted into the cache, in bytes.
    #[arg(long, default_value_t = roost_common::wire::v1::http::DEFAULT_MAX_NAR_BYTES, value_name = "BYTES")]
    pub max_nar_bytes: u64,
    /// Close a connection whose request head does not arrive within this (slow or idle
    /// clients).
    #[arg(long, default_value = "30s", value_parser = roost_common::time::parse_duration)]
    pub header_timeout: Duration,
    /// Give up on a client that pauses for longer than this while sending a request body or
    /// reading a response (a NAR download it stopped reading, say).
    #[arg(long, default_value = "60s", value_parser = roost_common::time::parse_duration)]
    pub body_timeout: Duration,
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
    let mut cfg = ServerConfig::new(&args.state_dir, TrustedKeys::new(keys, args.threshold));
    if let Some(f) = &args.upload_token_file {
        cfg = cfg.with_upload_token(read_token(f, "upload")?);
    }
    if let Some(f) = &args.admin_token_file {
        cfg.admin_token = Some(read_token(f, "admin")?);
    }
    if let Some(f) = &args.read_token_file {
        cfg.read_token = Some(read_token(f, "read")?);
    }
    cfg.public_read = args.public_read;
    cfg.thresholds = crate::flags::Thresholds {
        stale: args.stale_after,
        stuck: args.stuck_after,
        expiring: args.expiring_within,
    };
    cfg.max_nar_bytes = args.max_nar_bytes;
    cfg.max_concurrent_reboots = args.max_concurrent_reboots;
    cfg.reboot_lease_timeout = args.reboot_lease_timeout;
    cfg.header_timeout = args.header_timeout;
    cfg.body_timeout = args.body_timeout;
    Ok(cfg)
}

/// A token from its file: trimmed, at least 16 characters.
fn read_token(f: &std::path::Path, which: &str) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let t = std::fs::read_to_string(f)
        .with_context(|| format!("{which} token file {}", f.display()))?;
    let t = t.trim();
    anyhow::ensure!(
        t.len() >= 16,
        "{which} token in {} is shorter than 16 characters",
        f.display()
    );
    Ok(t.to_owned())
}

/// Runs `serve` until SIGTERM or SIGINT. Exit 0 after a clean shutdown, 1 when the server
/// fails (address in use, unreadable state folder), 2 for bad flags or key files.
pub async fn run(args: ServeArgs) -> u8 {
    let cfg = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return crate::exit::USAGE;
        }
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => match load_tls(c, k).await {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("error: {e}");
                return crate::exit::USAGE;
            }
        },
        _ => None,
    };
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.listen);
            return crate::exit::FAILED;
        }
    };
    let coordinator = match Coordinator::open(cfg) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}: {e}", args.state_dir.display());
            return crate::exit::FAILED;
        }
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    if let Ok(addr) = listener.local_addr() {
        println!("roost-coordinator serving on {scheme}://{addr}");
    }
    let shutdown = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM ({e}); stopping on SIGINT only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    match coordinator.serve(listener, tls, shutdown).await {
        Ok(()) => {
            tracing::info!("stopped");
            crate::exit::OK
        }
        Err(e) => {
            eprintln!("error: {e}");
            crate::exit::FAILED
        }
    }
}
