//! `PUT` and `DELETE /v1/nodes/{node}/key`: an operator pins the key a node's reports are
//! checked with when its manifest names none, replaces a key pinned on first use (by an
//! impostor, say), or clears the pin so the next report pins its own key again. This is what
//! `roost-coordinator node-key` calls; it needs the admin token, or the upload token when the
//! coordinator has no admin token. A pin may be set before the node ever reports or has a
//! manifest (enrolment). Each key's report `seq` floor outlives any change of pin.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use roost_common::{NodeName, PublicKey};
use serde::{Deserialize, Serialize};

use super::auth;
use super::error::{ApiError, ApiResult};
use super::state::{App, blocking, parse_node, read_body};

/// The route of a node's pinned key.
pub(super) const KEY_ROUTE: &str = roost_common::wire::v1::http::route::NODE_KEY;

/// What `PUT` takes.
#[derive(Debug, Deserialize)]
struct PinRequest {
    node_key: PublicKey,
}

/// What both methods answer.
#[derive(Debug, Serialize)]
struct PinAnswer {
    node: NodeName,
    /// The key pinned now (`null` after a clear).
    pinned_key: Option<PublicKey>,
    /// The key pinned before (`null` when there was none).
    previous: Option<String>,
    /// The node's manifest's `node_key`, which takes precedence over any pin.
    manifest_node_key: Option<PublicKey>,
}

fn check_admin(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(want) = app
        .cfg
        .admin_token
        .as_ref()
        .or(app.cfg.upload_token.as_ref())
    else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "no_admin_token",
            "this coordinator has neither --admin-token-file nor --upload-token-file: node keys cannot be pinned over HTTP",
        ));
    };
    let which = if app.cfg.admin_token.is_some() {
        "admin"
    } else {
        "upload"
    };
    auth::check(
        headers,
        want,
        &format!(
            "pinning a node key needs the coordinator's {which} token (Authorization: Bearer TOKEN)"
        ),
    )
}

async fn set(app: Arc<App>, node: NodeName, key: Option<PublicKey>) -> ApiResult {
    let previous = {
        let (app, n, k) = (app.clone(), node.to_string(), key.clone());
        blocking("pinning the node key", move || {
            app.store.set_pin(&n, k.as_ref())
        })
        .await?
    };
    let manifest_node_key = app
        .live
        .get(&node)
        .and_then(|cur| cur.manifest.node_key.clone());
    match &key {
        Some(k) => {
            tracing::warn!(%node, key = %k, previous = ?previous, "node key pinned by an operator")
        }
        None => tracing::warn!(%node, previous = ?previous, "node key pin cleared by an operator"),
    }
    let answer = PinAnswer {
        node,
        pinned_key: key,
        previous,
        manifest_node_key,
    };
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&answer).map_err(|e| ApiError::internal("answering", e))?,
    )
        .into_response())
}

/// `PUT /v1/nodes/{node}/key` with `{"node_key": "NAME:BASE64"}`.
pub(super) async fn put_key(
    State(app): State<Arc<App>>,
    Path(node): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let node = parse_node(&node)?;
    check_admin(&app, &headers)?;
    let bytes = read_body(&app, body, 4096).await?;
    let req: PinRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(
            "invalid_request",
            format!("expected {{\"node_key\": \"NAME:BASE64\"}} for node `{node}`: {e}"),
        )
    })?;
    set(app, node, Some(req.node_key)).await
}

/// `DELETE /v1/nodes/{node}/key`.
pub(super) async fn delete_key(
    State(app): State<Arc<App>>,
    Path(node): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let node = parse_node(&node)?;
    check_admin(&app, &headers)?;
    set(app, node, None).await
}
