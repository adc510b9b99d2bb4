//! `GET /v1/fleet` (JSON) and `GET /metrics` (Prometheus text): the fleet as this coordinator
//! sees it — desired versions from manifests, positions and health from reports.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use roost_common::Timestamp;
use serde_json::{Value, json};

use super::error::ApiError;
use super::server::App;

/// Builds the fleet document.
fn fleet_json(app: &App) -> Result<Value, ApiError> {
    let records = app.store.nodes().map_err(ApiError::internal)?;
    let now = Timestamp::now();
    let mut nodes: BTreeMap<String, Value> = BTreeMap::new();
    for (name, cur) in app.all_current() {
        let m = &cur.manifest;
        nodes.insert(
            name.to_string(),
            json!({
                "node": name,
                "desired_version": m.version,
                "issued_at": m.issued_at,
                "expires_at": m.expires_at,
                "system": m.system,
                "source": m.source,
                "desired": m.profiles.iter().map(|p| json!({"profile": p.name, "path": p.path})).collect::<Vec<_>>(),
                "node_key": m.node_key,
                "key_source": if m.node_key.is_some() { Some("manifest") } else { None },
            }),
        );
    }
    for r in records {
        let e = nodes
            .entry(r.node.clone())
            .or_insert_with(|| json!({"node": r.node, "desired_version": null}));
        let report: Option<Value> = r
            .last_report
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok());
        let obj = e.as_object_mut().expect("object");
        if obj.get("key_source").is_none_or(Value::is_null) && r.pinned_key.is_some() {
            obj.insert("node_key".into(), json!(r.pinned_key));
            obj.insert("key_source".into(), json!("tofu"));
        }
        obj.insert("last_seq".into(), json!(r.last_seq));
        obj.insert(
            "last_seen".into(),
            json!(r.last_seen.map(|s| Timestamp::from_unix(s).to_string())),
        );
        obj.insert(
            "seconds_since_report".into(),
            json!(r.last_seen.map(|s| now.unix().saturating_sub(s))),
        );
        if let Some(rep) = &report {
            let healthy = rep
                .get("health")
                .and_then(Value::as_array)
                .map(|h| h.iter().all(|c| c.get("ok") == Some(&Value::Bool(true))));
            obj.insert("healthy".into(), json!(healthy));
            obj.insert(
                "state".into(),
                rep.get("state").cloned().unwrap_or(Value::Null),
            );
            obj.insert(
                "reported_version".into(),
                rep.get("manifest_version").cloned().unwrap_or(Value::Null),
            );
        }
        obj.insert("last_report".into(), report.unwrap_or(Value::Null));
    }
    for v in nodes.values_mut() {
        let obj = v.as_object_mut().expect("object");
        for k in [
            "last_report",
            "last_seen",
            "seconds_since_report",
            "state",
            "reported_version",
            "healthy",
            "last_seq",
        ] {
            obj.entry(k).or_insert(Value::Null);
        }
    }
    Ok(json!({ "generated_at": now, "nodes": nodes.into_values().collect::<Vec<_>>() }))
}

pub(super) async fn get_fleet(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let doc = tokio::task::spawn_blocking(move || fleet_json(&app))
        .await
        .map_err(ApiError::internal)??;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        doc.to_string(),
    )
        .into_response())
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub(super) async fn get_metrics(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let app2 = app.clone();
    let doc = tokio::task::spawn_blocking(move || fleet_json(&app2))
        .await
        .map_err(ApiError::internal)??;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP roost_node_desired_version Version of the node's current manifest.\n# TYPE roost_node_desired_version gauge"
    );
    let nodes = doc["nodes"].as_array().cloned().unwrap_or_default();
    for n in &nodes {
        if let Some(v) = n["desired_version"].as_u64() {
            let _ = writeln!(
                out,
                "roost_node_desired_version{{node=\"{}\"}} {v}",
                label(n["node"].as_str().unwrap_or(""))
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP roost_node_reported_version Manifest version of the node's last report.\n# TYPE roost_node_reported_version gauge"
    );
    for n in &nodes {
        if let Some(v) = n["reported_version"].as_u64() {
            let _ = writeln!(
                out,
                "roost_node_reported_version{{node=\"{}\"}} {v}",
                label(n["node"].as_str().unwrap_or(""))
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP roost_node_state 1 for the state of the node's last report.\n# TYPE roost_node_state gauge"
    );
    for n in &nodes {
        if let Some(s) = n["state"].as_str() {
            let _ = writeln!(
                out,
                "roost_node_state{{node=\"{}\",state=\"{}\"}} 1",
                label(n["node"].as_str().unwrap_or("")),
                label(s)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP roost_node_seconds_since_report Seconds since the node's last report.\n# TYPE roost_node_seconds_since_report gauge"
    );
    for n in &nodes {
        if let Some(s) = n["seconds_since_report"].as_u64() {
            let _ = writeln!(
                out,
                "roost_node_seconds_since_report{{node=\"{}\"}} {s}",
                label(n["node"].as_str().unwrap_or(""))
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP roost_long_polls_held Manifest long-polls being held open.\n# TYPE roost_long_polls_held gauge\nroost_long_polls_held {}",
        app.waiting.load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP roost_http_requests_total HTTP requests by route and status.\n# TYPE roost_http_requests_total counter"
    );
    let requests: BTreeMap<(String, u16), u64> = app
        .requests
        .lock()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
        .unwrap_or_default();
    for ((route, status), n) in requests {
        let _ = writeln!(
            out,
            "roost_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
            label(&route)
        );
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
