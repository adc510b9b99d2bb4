//! `POST /v1/nodes/{node}/reports` (signed by the node key) and `GET …/reports` (history).
//!
//! The key is the `node_key` of the node's current manifest. When the manifest names none,
//! the key an operator pinned (`roost-coordinator node-key`), or else the first report that
//! names its own key and verifies with it pins that key (trust on first use, flagged `tofu`
//! in `/v1/fleet`); later reports must use the pinned key. `seq` must rise per node and
//! key, and a key's floor is kept when the node moves to another key and back.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use base64::Engine;
use roost_common::envelope::{self, Context};
use roost_common::wire::v1::Report;
use roost_common::{Envelope, EnvelopeError, PublicKey, Timestamp, TrustedKeys};
use serde::Deserialize;

use super::error::{ApiError, ApiResult};
use super::state::{App, blocking, parse_node, read_body};
use super::store::{NewReport, Refused, Signer};

pub use roost_common::wire::v1::http::MAX_REPORT_BYTES;

/// The route of a node's reports.
pub(super) const REPORTS_ROUTE: &str = roost_common::wire::v1::http::route::REPORTS;

/// The key a report claims for itself, read without verifying (only for trust on first use).
fn claimed_key(bytes: &[u8]) -> Option<PublicKey> {
    let env: Envelope = serde_json::from_slice(bytes).ok()?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(env.payload)
        .ok()?;
    let report: Report = serde_json::from_slice(&payload).ok()?;
    report.node_key
}

/// Which key a report must be signed with, and why.
#[derive(Clone, Copy)]
enum KeyFrom {
    Manifest,
    Pinned,
    FirstUse,
}

/// Largest `seq` stored (SQLite's integers are signed 64-bit).
const MAX_SEQ: u64 = i64::MAX as u64;

/// `POST /v1/nodes/{node}/reports`.
pub(super) async fn post_report(
    State(app): State<Arc<App>>,
    Path(node): Path<String>,
    body: Body,
) -> ApiResult {
    let node = parse_node(&node)?;
    let bytes = read_body(&app, body, MAX_REPORT_BYTES).await?;
    let Some(cur) = app.live.get(&node) else {
        return Err(ApiError::not_found(
            "unknown_node",
            format!("node `{node}` has no manifest here; publish one first"),
        ));
    };
    let record = {
        let app = app.clone();
        let n = node.to_string();
        blocking("reading the node's record", move || app.store.node(&n)).await?
    };
    let pinned = record
        .as_ref()
        .and_then(|r| r.pinned_key.as_deref())
        .and_then(|k| k.parse::<PublicKey>().ok());
    let (key, from) = match (&cur.manifest.node_key, pinned) {
        (Some(k), _) => (k.clone(), KeyFrom::Manifest),
        (None, Some(k)) => (k, KeyFrom::Pinned),
        (None, None) => {
            let claimed = claimed_key(&bytes).ok_or_else(|| {
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "no_node_key",
                    format!(
                        "node `{node}` has no node_key in its manifest and the report names no key to pin"
                    ),
                )
            })?;
            (claimed, KeyFrom::FirstUse)
        }
    };
    let opened = envelope::open(&bytes, Context::Report, &TrustedKeys::new([key.clone()], 1))
        .map_err(|e| {
            let (status, code) = match e {
                EnvelopeError::NotEnoughSignatures { .. } => {
                    (StatusCode::FORBIDDEN, "bad_signature")
                }
                EnvelopeError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
                _ => (StatusCode::BAD_REQUEST, "malformed_envelope"),
            };
            ApiError::new(
                status,
                code,
                format!(
                    "report for `{node}` is not signed by its node key `{}`: {e}",
                    key.name()
                ),
            )
        })?;
    let report: Report = serde_json::from_slice(&opened.payload).map_err(|e| {
        ApiError::bad_request(
            "invalid_report",
            format!("report payload for `{node}`: {e}"),
        )
    })?;
    if report.format != roost_common::wire::v1::FORMAT {
        return Err(ApiError::bad_request(
            "unsupported_format",
            format!("report format {} is not supported (1 is)", report.format),
        ));
    }
    if report.node != node {
        return Err(ApiError::bad_request(
            "node_mismatch",
            format!(
                "report is from `{}` but was posted to `{node}`",
                report.node
            ),
        ));
    }
    let seq = report.seq;
    if seq > MAX_SEQ {
        return Err(ApiError::bad_request(
            "invalid_report",
            format!("report seq {seq} from `{node}` is above {MAX_SEQ}, the largest stored"),
        ));
    }
    let payload = String::from_utf8_lossy(&opened.payload).into_owned();
    let res = {
        let app = app.clone();
        let n = node.to_string();
        let state = report.state.as_str();
        let mv = report.manifest_version.map(|v| v.0);
        let key = key.to_string();
        blocking("storing the report", move || {
            app.store.add_report(&NewReport {
                node: &n,
                seq,
                state,
                manifest_version: mv,
                payload: &payload,
                received_at: Timestamp::now().unix(),
                signer: match from {
                    KeyFrom::Manifest => Signer::Manifest(&key),
                    KeyFrom::Pinned => Signer::Pinned(&key),
                    KeyFrom::FirstUse => Signer::FirstUse(&key),
                },
            })
        })
        .await?
    };
    match res {
        Ok(()) => {}
        Err(Refused::Seq { last }) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "seq_not_increasing",
                format!(
                    "report seq {seq} from `{node}` is not above {last}, already received with key `{}`",
                    key.name()
                ),
            ));
        }
        // Not 4xx: the agent keeps the report and sends it again, and it is then checked
        // against the key pinned now.
        Err(Refused::PinChanged) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "pin_changed",
                format!(
                    "node `{node}`'s pinned key changed while this report was checked; send it again"
                ),
            ));
        }
    }
    tracing::info!(%node, seq, state = report.state.as_str(), "report received");
    let released = if !app.gate.is_member(&node) {
        Ok(Vec::new())
    } else {
        let (app, node) = (app.clone(), node.clone());
        blocking("saving the rollout state", move || {
            app.gate
                .observe(&app.store, &node, &report, Timestamp::now())
        })
        .await
    };
    match released {
        Ok(nodes) => super::gate::release(&app, nodes).await,
        // The report is stored; the rollout takes it in again at the next start.
        Err(e) => tracing::error!(%node, "rollout: {}", e.message),
    }
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({"node": node, "seq": seq}).to_string(),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct LimitQuery {
    /// How many reports, newest first (default 100, at most 10 000).
    limit: Option<u32>,
}

/// `GET /v1/nodes/{node}/reports?limit=N`: the node's report history, newest first.
pub(super) async fn get_reports(
    State(app): State<Arc<App>>,
    Path(node): Path<String>,
    Query(q): Query<LimitQuery>,
    headers: axum::http::HeaderMap,
) -> ApiResult {
    super::auth::check_read(&app, &headers)?;
    let node = parse_node(&node)?;
    if app.live.get(&node).is_none() {
        return Err(ApiError::not_found(
            "unknown_node",
            format!("no manifest has been published for node `{node}`"),
        ));
    }
    let limit = q.limit.unwrap_or(100).min(10_000);
    let n = node.to_string();
    let rows = blocking("reading the report history", move || {
        app.store.history(&n, limit)
    })
    .await?;
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
