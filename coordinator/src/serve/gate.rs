//! The rollout gate: where the state machine of `rollout.rs` meets the server. It decides
//! whether an uploaded manifest is served at once or held back for its wave, takes in every
//! stored report, runs operator actions, keeps `rollout.json` durable before anything it
//! decided is served, and serves (releases) the held-back manifests of a released wave:
//! first in memory, waking its long-polls, then on disk. `GET /v1/rollout` and
//! `POST /v1/rollout/{action}` are here too.
//!
//! Withholding is all a coordinator can do (it holds no key): a node of an unreleased wave
//! keeps being served the manifest it had (304 for its ETag, 404 if it never had one).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use roost_common::wire::v1::rollout::{
    Action, NodeRollout, PromoteRequest, RolloutDoc, RolloutStatus,
};
use roost_common::wire::v1::{Manifest, Report};
use roost_common::{NodeName, Timestamp};

use super::auth;
use super::error::{ApiError, ApiResult};
use super::rollout::{Observed, Rollout, Saved};
use super::state::{App, blocking, read_body};
use super::store::{NodeRecord, Store, StoreError};

/// The route of the rollout document.
pub(super) const ROLLOUT_ROUTE: &str = roost_common::wire::v1::http::route::ROLLOUT;
/// The route of an operator's action.
pub(super) const ACTION_ROUTE: &str = roost_common::wire::v1::http::route::ROLLOUT_ACTION;

/// Where an uploaded manifest goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placement {
    /// Served at once: not gated, or its wave is released.
    Serve,
    /// Held back until its wave is released (or for good, when its rollout was superseded).
    Hold,
}

/// The rollout as the fleet views (`/v1/fleet`, `/metrics`, the dashboard) show it.
#[derive(Debug, Default)]
pub(super) struct RolloutView {
    /// `GET /v1/rollout`'s document; `None` before the first gated publish.
    pub status: Option<RolloutStatus>,
    /// Each member's place, by node name.
    pub nodes: HashMap<String, NodeRollout>,
}

/// The current rollout, shared by every handler.
#[derive(Default)]
pub(super) struct Gate {
    rollout: Mutex<Option<Rollout>>,
    /// Wakes the bake-time timer when the next deadline may have moved.
    pub changed: tokio::sync::Notify,
}

fn save(store: &Store, r: &Rollout) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(r.saved()).expect("the rollout state serialises");
    store.save_rollout(&bytes)
}

/// What a stored report says, for the rollout.
fn observed<'a>(r: &'a Report, received_at: Timestamp) -> Observed<'a> {
    Observed {
        state: r.state,
        manifest_version: r.manifest_version.map(|v| v.0),
        error: r.error.as_ref().map(|e| e.message.as_str()),
        received_at,
    }
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, Option<Rollout>> {
        self.rollout.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads the saved rollout at start, with the members among `latest` (each node's
    /// newest manifest) and what their last reports said. Returns the nodes whose
    /// held-back manifest may be served now.
    pub fn load(
        &self,
        store: &Store,
        latest: &[(NodeName, Manifest)],
        records: &[NodeRecord],
        now: Timestamp,
    ) -> Result<Vec<NodeName>, StoreError> {
        let Some(bytes) = store.load_rollout()? else {
            return Ok(Vec::new());
        };
        let saved: Saved = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(
                    "cannot read the saved rollout state ({e}): no rollout is running; \
                     manifests held back stay held back until the next publish"
                );
                return Ok(Vec::new());
            }
        };
        let mut r = Rollout::restore(saved);
        for (node, m) in latest {
            if m.rollout.id == Some(r.id()) {
                r.join(node, m.rollout.wave, m.version.0);
            }
        }
        for rec in records {
            let (Ok(node), Some(payload), Some(seen)) = (
                rec.node.parse::<NodeName>(),
                rec.last_report.as_deref(),
                rec.last_seen,
            ) else {
                continue;
            };
            if let Ok(report) = serde_json::from_str::<Report>(payload) {
                r.observe(&node, &observed(&report, Timestamp::from_unix(seen)));
            }
        }
        let (_, changed) = r.step(now);
        if changed {
            save(store, &r)?;
        }
        let serve = latest
            .iter()
            .filter(|(n, m)| may_serve(&r, n, m))
            .map(|(n, _)| n.clone())
            .collect();
        tracing::info!(
            rollout = r.id(),
            state = r.state().as_str(),
            "rollout state loaded"
        );
        *self.lock() = Some(r);
        Ok(serve)
    }

    /// Where `m`, just uploaded for `node`, goes. A manifest of a newer publish than the
    /// current rollout's starts a new rollout (saved before this returns), which supersedes
    /// the old one: nothing of it is released any more.
    pub fn place(
        &self,
        store: &Store,
        node: &NodeName,
        m: &Manifest,
        now: Timestamp,
    ) -> Result<Placement, StoreError> {
        let mut g = self.lock();
        let Some(id) = m.rollout.id else {
            if let Some(r) = g.as_mut() {
                r.leave(node);
            }
            return Ok(Placement::Serve);
        };
        if g.as_ref().is_none_or(|r| id > r.id()) {
            let mut r = Rollout::start(id, &m.rollout, now);
            r.step(now);
            save(store, &r)?;
            if let Some(old) = g.as_ref() {
                tracing::info!(
                    old = old.id(),
                    new = id,
                    "a new publish supersedes the rollout"
                );
            }
            *g = Some(r);
            self.changed.notify_one();
        }
        let r = g.as_mut().expect("set above");
        if r.id() != id {
            r.leave(node);
            tracing::info!(%node, rollout = id, current = r.id(), "manifest of a superseded publish: held back");
            return Ok(Placement::Hold);
        }
        Ok(match r.join(node, m.rollout.wave, m.version.0) {
            true => Placement::Serve,
            false => Placement::Hold,
        })
    }

    /// Whether `m`, held back for `node`, may be served now.
    pub fn may_serve(&self, node: &NodeName, m: &Manifest) -> bool {
        self.lock().as_ref().is_some_and(|r| may_serve(r, node, m))
    }

    /// Runs `f` on the rollout and saves it when `f` says it changed; returns the nodes
    /// whose waves `f` released. `None` when there is no rollout.
    fn update<T>(
        &self,
        store: &Store,
        f: impl FnOnce(&mut Rollout) -> (T, Vec<u32>, bool),
    ) -> Result<Option<(T, Vec<NodeName>)>, StoreError> {
        let mut g = self.lock();
        let Some(r) = g.as_mut() else {
            return Ok(None);
        };
        let before = r.saved().clone();
        let (out, waves, changed) = f(r);
        if changed {
            if let Err(e) = save(store, r) {
                // Nothing is served that could not be made durable: back to the saved state
                // (what the nodes reported stays taken in).
                r.reset_saved(before);
                return Err(e);
            }
            self.changed.notify_one();
        }
        Ok(Some((out, r.members_of(&waves))))
    }

    /// Whether `node` is part of the current rollout (its reports matter to it).
    pub fn is_member(&self, node: &NodeName) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|r| r.member(node).is_some())
    }

    /// Takes in a stored report; the nodes released because of it.
    pub fn observe(
        &self,
        store: &Store,
        node: &NodeName,
        report: &Report,
        now: Timestamp,
    ) -> Result<Vec<NodeName>, StoreError> {
        let r = self.update(store, |r| {
            if !r.observe(node, &observed(report, now)) {
                return ((), Vec::new(), false);
            }
            let (waves, changed) = r.step(now);
            ((), waves, changed)
        })?;
        Ok(r.map(|(_, n)| n).unwrap_or_default())
    }

    /// The bake-time timer fired (or anything else may be due): the nodes released.
    pub fn tick(&self, store: &Store, now: Timestamp) -> Result<Vec<NodeName>, StoreError> {
        let r = self.update(store, |r| {
            let (waves, changed) = r.step(now);
            ((), waves, changed)
        })?;
        Ok(r.map(|(_, n)| n).unwrap_or_default())
    }

    /// When the bake-time timer must fire next.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.lock().as_ref()?.next_deadline()
    }

    /// What the fleet views show of the rollout: its status and every member's place, read
    /// under one lock so the two agree.
    pub fn view(&self, now: Timestamp) -> RolloutView {
        let g = self.lock();
        let Some(r) = g.as_ref() else {
            return RolloutView::default();
        };
        RolloutView {
            status: Some(r.status(now)),
            nodes: r.node_rollouts().map(|(n, p)| (n.to_string(), p)).collect(),
        }
    }

    /// The document `GET /v1/rollout` shows.
    pub fn doc(&self, now: Timestamp) -> RolloutDoc {
        RolloutDoc {
            rollout: self.lock().as_ref().map(|r| r.status(now)),
        }
    }
}

fn may_serve(r: &Rollout, node: &NodeName, m: &Manifest) -> bool {
    m.rollout.id == Some(r.id())
        && r.member(node) == Some((m.version.0, m.rollout.wave))
        && r.may_serve_wave(m.rollout.wave)
}

/// Serves the held-back manifests of `nodes` whose wave is released: each in memory at once
/// (waking its long-polls), then all on disk. `rollout.json` already says they are released,
/// so a crash in between serves them again at the next start.
pub(super) async fn release(app: &Arc<App>, nodes: Vec<NodeName>) {
    if nodes.is_empty() {
        return;
    }
    let mut served = Vec::with_capacity(nodes.len());
    for node in nodes {
        let lock = app.write_lock(&node);
        let _g = lock.lock().await;
        let Some(staged) = app.live.staged(&node) else {
            continue;
        };
        if app.gate.may_serve(&node, &staged.manifest) {
            app.live.release(&node, Timestamp::now());
            served.push(node);
        }
    }
    tracing::info!(nodes = served.len(), "rollout: manifests released");
    let app = app.clone();
    let wrote = tokio::task::spawn_blocking(move || {
        for node in served {
            let lock = app.write_lock(&node);
            let _g = lock.blocking_lock();
            let Some(cur) = app.live.get(&node) else {
                continue;
            };
            let r = app.store.save_manifest(&node, &cur.bytes).and_then(|()| {
                match app.live.staged(&node) {
                    None => app.store.remove_staged(&node),
                    Some(_) => Ok(()),
                }
            });
            if let Err(e) = r {
                tracing::error!(
                    %node,
                    "a released manifest could not be written to the state folder ({e}); it \
                     is served, and served again after a restart from its held-back copy"
                );
            }
        }
    });
    if let Err(e) = wrote.await {
        tracing::error!("writing released manifests: {e}");
    }
}

/// Releases what the bake time allows whenever a deadline passes, until shutdown.
pub(super) async fn timer(app: Arc<App>) {
    loop {
        let wait = match app.gate.next_deadline() {
            Some(d) => Duration::from_secs(d.unix().saturating_sub(Timestamp::now().unix()))
                .max(Duration::from_millis(200)),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = app.gate.changed.notified() => continue,
            () = app.shutdown.cancelled() => return,
        }
        let a = app.clone();
        match blocking("releasing a wave", move || {
            a.gate.tick(&a.store, Timestamp::now())
        })
        .await
        {
            Ok(nodes) => release(&app, nodes).await,
            Err(e) => {
                tracing::error!("rollout: {}", e.message);
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// `GET /v1/rollout` (read like `/v1/fleet`).
pub(super) async fn get_rollout(State(app): State<Arc<App>>, headers: HeaderMap) -> ApiResult {
    auth::check_read(&app, &headers)?;
    let doc = app.gate.doc(Timestamp::now());
    Ok(json(StatusCode::OK, &doc))
}

fn json(status: StatusCode, doc: &RolloutDoc) -> axum::response::Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(doc).expect("the rollout document serialises"),
    )
        .into_response()
}

/// The admin token or the upload token, whichever the request carries.
fn check_operator(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let tokens: Vec<&String> = [&app.cfg.admin_token, &app.cfg.upload_token]
        .into_iter()
        .flatten()
        .collect();
    if tokens.is_empty() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "no_admin_token",
            "this coordinator has neither --admin-token-file nor --upload-token-file: the rollout cannot be steered over HTTP",
        ));
    }
    let refusal =
        "a rollout action needs the admin token or the upload token (Authorization: Bearer TOKEN)";
    if tokens
        .iter()
        .any(|t| auth::check(headers, t, refusal).is_ok())
    {
        Ok(())
    } else {
        auth::check(headers, tokens[0], refusal)
    }
}

/// `POST /v1/rollout/{action}`: pause, resume, abort, promote (body `{"wave": K}`, optional).
pub(super) async fn post_action(
    State(app): State<Arc<App>>,
    Path(action): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let action: Action = action
        .parse()
        .map_err(|e: String| ApiError::not_found("unknown_action", e))?;
    check_operator(&app, &headers)?;
    let bytes = read_body(&app, body, 4096).await?;
    let wave = match (action, bytes.iter().all(u8::is_ascii_whitespace)) {
        (_, true) => None,
        (Action::Promote, false) => {
            serde_json::from_slice::<PromoteRequest>(&bytes)
                .map_err(|e| ApiError::bad_request("invalid_request", format!("{e}")))?
                .wave
        }
        (_, false) => {
            return Err(ApiError::bad_request(
                "invalid_request",
                format!("`{}` takes no body", action.as_str()),
            ));
        }
    };
    let a = app.clone();
    let done = blocking("saving the rollout state", move || {
        let now = Timestamp::now();
        a.gate.update(&a.store, |r| match r.act(action, wave, now) {
            Ok(waves) => (Ok(()), waves, true),
            Err(e) => (Err(e), Vec::new(), false),
        })
    })
    .await?;
    let Some((result, nodes)) = done else {
        return Err(ApiError::not_found(
            "no_rollout",
            "no rollout has started here: publish first",
        ));
    };
    result.map_err(|e| ApiError::new(StatusCode::CONFLICT, e.code(), e.to_string()))?;
    tracing::info!(action = action.as_str(), ?wave, "rollout: operator action");
    release(&app, nodes).await;
    Ok(json(StatusCode::OK, &app.gate.doc(Timestamp::now())))
}
