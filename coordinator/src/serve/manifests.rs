//! `GET` and `PUT /v1/nodes/{node}/manifest`.
//!
//! Current manifests and their ETags live in memory (loaded from the state folder at start),
//! so a conditional GET answered 304 touches no disk and no database. Each node has a
//! `watch` channel carrying its version: a long-poll is a receiver waiting for a higher
//! number, and one PUT wakes every waiter of that node at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use roost_common::envelope::{self, Context};
use roost_common::verify::{self, Accepted, Floor, Identity, Rejection};
use roost_common::wire::v1::http as v1;
use roost_common::{EnvelopeError, NodeName, Timestamp};
use serde::Deserialize;
use tokio::sync::watch;

use super::error::{ApiError, ApiResult};
use super::gate::Placement;
use super::live::{Current, etag_for};
use super::state::{App, blocking, parse_node, read_body};

/// Tells agents this server holds `?wait=S` polls open, and for how long at most (static
/// hosts do not send it).
pub const LONG_POLL: HeaderName = HeaderName::from_static(v1::LONG_POLL_HEADER);

pub use v1::MAX_WAIT_S;

/// The route of a node's manifest (the connection front answers most requests to it).
pub(super) const MANIFEST_ROUTE: &str = v1::route::MANIFEST;

/// Whether any `If-None-Match` value names `etag` (or `*`).
pub(super) fn matches_etag<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
    etag: &HeaderValue,
) -> bool {
    values
        .into_iter()
        .any(|v| v1::etag_matches(v, etag.as_bytes()))
}

/// What a manifest GET answers: the envelope, or "not modified".
pub(super) enum Answer {
    Full(Arc<Current>),
    NotModified(Arc<Current>),
}

impl Answer {
    pub fn status(&self) -> StatusCode {
        match self {
            Answer::Full(_) => StatusCode::OK,
            Answer::NotModified(_) => StatusCode::NOT_MODIFIED,
        }
    }

    /// The response headers (besides `content-length` and `date`), the same on every path
    /// that answers: axum's handler and the connection front.
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        let long_poll = (LONG_POLL, HeaderValue::from(MAX_WAIT_S));
        match self {
            Answer::Full(cur) => vec![
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (header::ETAG, cur.etag.clone()),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                long_poll,
            ],
            Answer::NotModified(cur) => vec![(header::ETAG, cur.etag.clone()), long_poll],
        }
    }

    /// The body: the envelope exactly as uploaded, or nothing.
    pub fn body(&self) -> Bytes {
        match self {
            Answer::Full(cur) => cur.bytes.clone(),
            Answer::NotModified(_) => Bytes::new(),
        }
    }

    fn into_response(self) -> Response {
        let mut r = Response::new(Body::from(self.body()));
        *r.status_mut() = self.status();
        for (k, v) in self.headers() {
            r.headers_mut().insert(k, v);
        }
        r
    }
}

/// A long-poll to hold: the client has the current version and asked to wait.
pub(super) struct Hold {
    node: NodeName,
    cur: Arc<Current>,
    rx: watch::Receiver<u64>,
    wait: u64,
}

/// The first, immediate step of a manifest GET.
pub(super) enum Step {
    Answer(Answer),
    Hold(Hold),
}

/// Starts answering `GET /v1/nodes/{node}/manifest[?wait=S]`; `None` when no manifest was
/// published for the node.
pub(super) fn begin_get<'a>(
    app: &App,
    node: &NodeName,
    if_none_match: impl IntoIterator<Item = &'a [u8]>,
    wait: Option<u64>,
) -> Option<Step> {
    let cur = app.live.get_polled(node)?;
    if !matches_etag(if_none_match, &cur.etag) {
        return Some(Step::Answer(Answer::Full(cur)));
    }
    let wait = wait.unwrap_or(0).min(MAX_WAIT_S);
    if wait == 0 {
        return Some(Step::Answer(Answer::NotModified(cur)));
    }
    // Subscribed after reading the version: a newer one stored in between is still seen,
    // since the receiver waits for any value above `cur`'s.
    let rx = app.live.watch(node)?;
    Some(Step::Hold(Hold {
        node: node.clone(),
        cur,
        rx,
        wait,
    }))
}

/// Holds a long-poll until a newer version is stored (answering it), the wait ends or the
/// server shuts down (answering "not modified").
pub(super) async fn hold(app: &App, h: Hold) -> Answer {
    let Hold {
        node,
        cur,
        mut rx,
        wait,
    } = h;
    let version = cur.manifest.version.0;
    app.waiting.fetch_add(1, Ordering::Relaxed);
    let _waiting = scopeguard(app);
    tokio::select! {
        changed = tokio::time::timeout(Duration::from_secs(wait), rx.wait_for(|v| *v > version)) => {
            if matches!(changed, Ok(Ok(_))) {
                if let Some(newer) = app.live.get(&node) {
                    return Answer::Full(newer);
                }
            }
        }
        // Shutting down: answer now so the client re-polls the next server.
        _ = app.shutdown.cancelled() => {}
    }
    Answer::NotModified(cur)
}

fn unknown_node(node: &NodeName) -> ApiError {
    ApiError::not_found(
        "unknown_node",
        format!("no manifest has been published for node `{node}`"),
    )
}

#[derive(Debug, Deserialize)]
pub(super) struct WaitQuery {
    /// Seconds to hold the request while the client's ETag is current (capped at 300).
    wait: Option<u64>,
}

/// `GET /v1/nodes/{node}/manifest[?wait=S]` (the connection front answers most of these
/// itself, through the same [`begin_get`] and [`hold`]).
pub(super) async fn get_manifest(
    State(app): State<Arc<App>>,
    Path(node): Path<String>,
    Query(q): Query<WaitQuery>,
    headers: HeaderMap,
) -> ApiResult {
    let node = parse_node(&node)?;
    let inm = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .map(HeaderValue::as_bytes);
    let answer = match begin_get(&app, &node, inm, q.wait) {
        None => return Err(unknown_node(&node)),
        Some(Step::Answer(a)) => a,
        Some(Step::Hold(h)) => hold(&app, h).await,
    };
    Ok(answer.into_response())
}

/// Decrements the held-long-poll gauge when the request ends, however it ends.
fn scopeguard(app: &App) -> impl Drop + '_ {
    struct Guard<'a>(&'a App);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            self.0.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
    Guard(app)
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

/// `PUT /v1/nodes/{node}/manifest`: verify, check the version rises, store, wake waiters.
pub(super) async fn put_manifest(
    State(app): State<Arc<App>>,
    Path(node): Path<String>,
    body: Body,
) -> ApiResult {
    let node = parse_node(&node)?;
    let bytes = read_body(&app, body, envelope::MAX_ENVELOPE_BYTES).await?;
    // Signature first, so only publisher-signed uploads reach the per-node lock.
    let opened = envelope::open(&bytes, Context::Manifest, &app.cfg.publishers)
        .map_err(|e| rejection_to_error(e.into()))
        .map_err(|e| with_node(e, &node))?;
    // The system is the manifest's own: the server has none, but checks node, paths, expiry
    // and the version floor through the same function the agents use.
    let system = verify::parse_manifest_payload(&opened.payload)
        .map_err(rejection_to_error)
        .map_err(|e| with_node(e, &node))?
        .system;
    let lock = app.write_lock(&node);
    let _guard = lock.lock().await;
    // The floor is the newest upload, served or held back for its wave.
    let floor = app.live.latest(&node).map(|c| Floor {
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
        Ok(Accepted::Unchanged(v)) => {
            return Err(with_node(
                rejection_to_error(Rejection::VersionReused(v)),
                &node,
            ));
        }
        Err(Rejection::WrongNode { expected, got }) => {
            return Err(ApiError::bad_request(
                "node_mismatch",
                format!("manifest is for node `{got}` but was uploaded to `{expected}`"),
            ));
        }
        Err(r @ Rejection::BelowFloor { .. }) if app.live.staged(&node).is_some() => {
            // The floor is a manifest the nodes do not see yet: a publish that read the
            // served version (an older one) and chose its own version below it ends here.
            let mut e = rejection_to_error(r);
            e.message.push_str(
                ", which the current rollout holds back for its wave (GET serves an older one): \
                 publish with a higher version (publish's default, the time in milliseconds, is)",
            );
            return Err(with_node(e, &node));
        }
        Err(r) => return Err(with_node(rejection_to_error(r), &node)),
    };
    // `read_body` copied the envelope out of hyper's read buffer, which a stored slice
    // would keep alive (7.8 KiB per node measured in memory).
    let store_bytes = bytes.clone();
    let app2 = app.clone();
    let node2 = node.clone();
    let manifest = verified.manifest.clone();
    let version = verified.manifest.version.0;
    let source = verified.manifest.source.clone().unwrap_or_default();
    let stored_at = Timestamp::now();
    let placement = blocking("storing the manifest", move || {
        let p = app2.gate.place(&app2.store, &node2, &manifest, stored_at)?;
        match p {
            Placement::Serve => {
                app2.store.save_manifest(&node2, &store_bytes)?;
                app2.store.remove_staged(&node2)?;
            }
            Placement::Hold => app2.store.save_staged(&node2, &store_bytes)?,
        }
        // Only names the revision a node reports running: a failure costs the fleet views
        // a column, not the upload.
        let (rev, dirty) = (source.rev.as_deref(), source.dirty);
        if let Err(e) =
            app2.store
                .record_version(node2.as_str(), version, rev, dirty, stored_at.unix())
        {
            tracing::warn!(node = %node2, version, "cannot record the manifest's source: {e}");
        }
        Ok(p)
    })
    .await
    .map_err(|e| with_node(e, &node))?;
    let wave = verified.manifest.rollout.wave;
    let cur = Current {
        etag: etag_for(version),
        digest: verified.digest,
        manifest: verified.manifest,
        bytes,
        stored_at,
    };
    let served = placement == Placement::Serve;
    if served {
        app.live.set(&node, cur);
    } else {
        app.live.stage(&node, cur);
    }
    tracing::info!(%node, version, wave, served, "manifest stored");
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({"node": node, "version": version, "served": served}).to_string(),
    )
        .into_response())
}

fn with_node(mut e: ApiError, node: &NodeName) -> ApiError {
    e.message = format!("node `{node}`: {}", e.message);
    e
}
