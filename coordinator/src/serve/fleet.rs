//! `GET /v1/fleet` (JSON) and `GET /metrics` (Prometheus text): the fleet as this coordinator
//! sees it — desired versions from manifests, positions and health from reports.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use roost_common::wire::v1::Source;
use roost_common::{StorePath, Timestamp, Version};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::error::ApiError;
use super::live::Current;
use super::state::App;
use super::store::{NodeRecord, PinSource, StoreError};

/// What the fleet views need of a node's last report (the rest is passed on verbatim).
#[derive(Debug, Default, Deserialize)]
struct ReportGist {
    state: Option<String>,
    manifest_version: Option<u64>,
    health: Option<Vec<HealthGist>>,
}

#[derive(Debug, Deserialize)]
struct HealthGist {
    ok: Option<bool>,
}

/// One node as this coordinator knows it: its current manifest, its report record, or both.
struct Row {
    name: String,
    cur: Option<Arc<Current>>,
    rec: Option<NodeRecord>,
    gist: Option<ReportGist>,
}

impl Row {
    fn seconds_since_report(&self, now: Timestamp) -> Option<u64> {
        let seen = self.rec.as_ref()?.last_seen?;
        Some(now.unix().saturating_sub(seen))
    }
}

/// Every node, by name. Typed rows, not JSON trees: for 10,000 nodes a tree of
/// `serde_json::Value`s took about 60 MiB (and twice that for `/metrics`), which the
/// allocator then kept.
fn rows(app: &App) -> Result<Vec<Row>, ApiError> {
    // Without the report database the views still show every node's manifest.
    let records = match app.store.nodes() {
        Err(StoreError::ReportsUnavailable(_)) => Vec::new(),
        r => r.map_err(|e| ApiError::store("reading the fleet's reports", e))?,
    };
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for (name, cur) in app.live.all() {
        let name = name.to_string();
        rows.insert(
            name.clone(),
            Row {
                name,
                cur: Some(cur),
                rec: None,
                gist: None,
            },
        );
    }
    for r in records {
        let row = rows.entry(r.node.clone()).or_insert_with(|| Row {
            name: r.node.clone(),
            cur: None,
            rec: None,
            gist: None,
        });
        row.gist = r
            .last_report
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok());
        row.rec = Some(r);
    }
    Ok(rows.into_values().collect())
}

#[derive(Serialize)]
struct FleetDoc<'a> {
    generated_at: Timestamp,
    /// False when the report database could not be opened at start: no node then shows a
    /// report, and reports are refused until an operator repairs it.
    reports_available: bool,
    nodes: Vec<NodeDoc<'a>>,
}

#[derive(Serialize)]
struct Desired<'a> {
    profile: &'a str,
    path: &'a StorePath,
}

/// A node in `GET /v1/fleet`. The manifest's fields are left out for a node that only
/// reported; `node_key` is the manifest's (`key_source` `manifest`), or the one pinned on
/// first use (`tofu`) or by an operator (`pinned`).
#[derive(Serialize)]
struct NodeDoc<'a> {
    node: &'a str,
    desired_version: Option<Version>,
    #[serde(skip_serializing_if = "Option::is_none")]
    issued_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<Option<&'a Source>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    desired: Option<Vec<Desired<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node_key: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_source: Option<Option<&'static str>>,
    last_seq: Option<u64>,
    last_seen: Option<String>,
    seconds_since_report: Option<u64>,
    healthy: Option<bool>,
    state: Option<&'a str>,
    reported_version: Option<u64>,
    last_report: Option<&'a RawValue>,
}

fn node_doc(row: &Row, now: Timestamp) -> NodeDoc<'_> {
    let m = row.cur.as_ref().map(|c| &c.manifest);
    let pinned = row.rec.as_ref().and_then(|r| {
        let source = r.pin_source.unwrap_or(PinSource::FirstUse).as_str();
        Some((r.pinned_key.clone()?, source))
    });
    let manifest_key = m.and_then(|m| m.node_key.as_ref().map(ToString::to_string));
    let (node_key, key_source) = match (m, manifest_key, pinned) {
        (_, Some(k), _) => (Some(Some(k)), Some(Some("manifest"))),
        (_, None, Some((p, source))) => (Some(Some(p)), Some(Some(source))),
        (Some(_), None, None) => (Some(None), Some(None)),
        (None, None, None) => (None, None),
    };
    let gist = row.gist.as_ref();
    NodeDoc {
        node: &row.name,
        desired_version: m.map(|m| m.version),
        issued_at: m.map(|m| m.issued_at),
        expires_at: m.map(|m| m.expires_at),
        system: m.map(|m| m.system.as_str()),
        source: m.map(|m| m.source.as_ref()),
        desired: m.map(|m| {
            m.profiles
                .iter()
                .map(|p| Desired {
                    profile: p.name.as_str(),
                    path: &p.path,
                })
                .collect()
        }),
        node_key,
        key_source,
        last_seq: row.rec.as_ref().and_then(|r| r.last_seq),
        last_seen: row
            .rec
            .as_ref()
            .and_then(|r| r.last_seen)
            .map(|s| Timestamp::from_unix(s).to_string()),
        seconds_since_report: row.seconds_since_report(now),
        healthy: gist
            .and_then(|g| g.health.as_ref())
            .map(|h| h.iter().all(|c| c.ok == Some(true))),
        state: gist.and_then(|g| g.state.as_deref()),
        reported_version: gist.and_then(|g| g.manifest_version),
        last_report: row
            .rec
            .as_ref()
            .and_then(|r| r.last_report.as_deref())
            .and_then(|p| serde_json::from_str(p).ok()),
    }
}

/// The fleet document, serialised.
fn fleet_json(app: &App) -> Result<Vec<u8>, ApiError> {
    let rows = rows(app)?;
    let now = Timestamp::now();
    let doc = FleetDoc {
        generated_at: now,
        reports_available: app.store.reports_available(),
        nodes: rows.iter().map(|r| node_doc(r, now)).collect(),
    };
    serde_json::to_vec(&doc).map_err(|e| ApiError::internal("writing the fleet document", e))
}

pub(super) async fn get_fleet(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let doc = tokio::task::spawn_blocking(move || fleet_json(&app))
        .await
        .map_err(|e| ApiError::internal("building the fleet view", e))??;
    Ok(([(header::CONTENT_TYPE, "application/json")], doc).into_response())
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One gauge: its help line, then a line per node that has a value.
fn gauge<T: std::fmt::Display>(
    out: &mut String,
    name: &str,
    help: &str,
    rows: &[Row],
    value: impl Fn(&Row) -> Option<(String, T)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for r in rows {
        if let Some((labels, v)) = value(r) {
            let _ = writeln!(out, "{name}{{node=\"{}\"{labels}}} {v}", label(&r.name));
        }
    }
}

pub(super) async fn get_metrics(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    let app2 = app.clone();
    let rows = tokio::task::spawn_blocking(move || rows(&app2))
        .await
        .map_err(|e| ApiError::internal("building the fleet view", e))??;
    let now = Timestamp::now();
    let mut out = String::new();
    gauge(
        &mut out,
        "roost_node_desired_version",
        "Version of the node's current manifest.",
        &rows,
        |r| {
            r.cur
                .as_ref()
                .map(|c| (String::new(), c.manifest.version.0))
        },
    );
    gauge(
        &mut out,
        "roost_node_reported_version",
        "Manifest version of the node's last report.",
        &rows,
        |r| {
            let v = r.gist.as_ref()?.manifest_version?;
            Some((String::new(), v))
        },
    );
    gauge(
        &mut out,
        "roost_node_state",
        "1 for the state of the node's last report.",
        &rows,
        |r| {
            let s = r.gist.as_ref()?.state.as_deref()?;
            Some((format!(",state=\"{}\"", label(s)), 1))
        },
    );
    gauge(
        &mut out,
        "roost_node_seconds_since_report",
        "Seconds since the node's last report.",
        &rows,
        |r| r.seconds_since_report(now).map(|s| (String::new(), s)),
    );
    let _ = writeln!(
        out,
        "# HELP roost_long_polls_held Manifest long-polls being held open.\n# TYPE roost_long_polls_held gauge\nroost_long_polls_held {}",
        app.waiting.load(std::sync::atomic::Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP roost_report_database_up 1 when the report database is in use, 0 when it could not be opened at start.\n# TYPE roost_report_database_up gauge\nroost_report_database_up {}",
        u8::from(app.store.reports_available())
    );
    let _ = writeln!(
        out,
        "# HELP roost_http_requests_total HTTP requests by route and status.\n# TYPE roost_http_requests_total counter"
    );
    let requests: BTreeMap<(String, u16), u64> = app
        .requests
        .lock()
        .map(|m| {
            m.iter()
                .flat_map(|(route, by)| by.iter().map(|(s, n)| ((route.clone(), *s), *n)))
                .collect()
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use roost_common::envelope::{Context as Ctx, Envelope};
    use serde_json::{Value, json};

    fn current(node_key: Option<String>) -> Arc<Current> {
        let now = Timestamp::now();
        let m = json!({
            "format": 1, "node": "n1", "system": "x86_64-linux", "version": 7,
            "issued_at": now, "expires_at": now.plus(std::time::Duration::from_secs(60)),
            "node_key": node_key,
            "profiles": [{"name": "system", "path": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-sys",
                          "activation": {"kind": "none"}}]
        });
        let key = roost_common::SecretKey::generate("p").unwrap();
        let env = Envelope::seal(Ctx::Manifest, &serde_json::to_vec(&m).unwrap(), &[&key]);
        let trusted = roost_common::TrustedKeys::new([key.public()], 1);
        Arc::new(Current::from_stored(env.to_bytes(), &trusted, &"n1".parse().unwrap()).unwrap())
    }

    fn record(report: &str, pinned: Option<&str>) -> NodeRecord {
        NodeRecord {
            node: "n1".into(),
            pinned_key: pinned.map(str::to_owned),
            pin_source: pinned.map(|_| PinSource::FirstUse),
            last_seq: Some(3),
            last_seen: Some(Timestamp::now().unix()),
            last_report: Some(report.into()),
        }
    }

    fn doc(cur: Option<Arc<Current>>, rec: Option<NodeRecord>) -> Value {
        let gist = rec
            .as_ref()
            .and_then(|r| serde_json::from_str(r.last_report.as_deref()?).ok());
        let row = Row {
            name: "n1".into(),
            cur,
            rec,
            gist,
        };
        serde_json::to_value(node_doc(&row, Timestamp::now())).unwrap()
    }

    #[test]
    fn a_node_with_a_manifest_and_no_report_has_every_field() {
        let d = doc(Some(current(None)), None);
        assert_eq!(d["desired_version"], 7);
        assert_eq!(d["desired"][0]["profile"], "system");
        assert_eq!(d["system"], "x86_64-linux");
        assert!(d["source"].is_null() && d.get("source").is_some());
        assert!(d["node_key"].is_null() && d.get("key_source").is_some());
        for k in [
            "last_report",
            "state",
            "healthy",
            "reported_version",
            "last_seen",
        ] {
            assert!(d.get(k).is_some_and(Value::is_null), "{k}: {d}");
        }
    }

    #[test]
    fn a_node_that_only_reported_shows_its_pinned_key_and_its_report_verbatim() {
        let report = r#"{"state":"failed","manifest_version":6,"health":[{"ok":true},{"ok":false}],"extra":{"x":[1,2]}}"#;
        let d = doc(None, Some(record(report, Some("n1-1:AAAA"))));
        assert!(
            d.get("system").is_none() && d.get("desired").is_none(),
            "{d}"
        );
        assert!(d["desired_version"].is_null());
        assert_eq!(
            (d["node_key"].as_str(), d["key_source"].as_str()),
            (Some("n1-1:AAAA"), Some("tofu"))
        );
        assert_eq!(d["state"], "failed");
        assert_eq!(d["reported_version"], 6);
        assert_eq!(d["healthy"], false);
        assert_eq!(d["last_seq"], 3);
        assert_eq!(
            d["last_report"],
            serde_json::from_str::<Value>(report).unwrap()
        );
    }

    #[test]
    fn the_manifests_node_key_wins_over_a_pinned_one_and_unreadable_reports_are_null() {
        let key = roost_common::SecretKey::generate("n1-2")
            .unwrap()
            .public()
            .to_string();
        let d = doc(
            Some(current(Some(key.clone()))),
            Some(record("not json", Some("old:AAAA"))),
        );
        assert_eq!(
            (d["node_key"].as_str(), d["key_source"].as_str()),
            (Some(key.as_str()), Some("manifest"))
        );
        assert!(d["last_report"].is_null() && d["state"].is_null() && d["healthy"].is_null());
    }
}
