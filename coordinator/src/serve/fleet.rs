//! `GET /v1/fleet` (JSON) and `GET /metrics` (Prometheus text): the fleet as this coordinator
//! sees it — desired versions from manifests, positions and health from reports.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use roost_common::wire::v1::Source;
use roost_common::wire::v1::rollout::{NodeOutcome, NodeRollout, RolloutState, RolloutStatus};
use roost_common::{StorePath, Timestamp, Version};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::auth;
use super::error::ApiError;
use super::live::Current;
use super::observe::{Refusal, UnknownName};
use super::state::App;
use super::store::{NodeRecord, PinSource, StoreError};
use crate::flags::{
    self, Facts, Flag, Flagged, ManifestFacts, RefusalFacts, RejectionFacts, ReportFacts,
    Thresholds, UnknownFacts,
};

/// What the fleet views need of a node's last report (the rest is passed on verbatim).
#[derive(Debug, Default, Deserialize)]
pub(super) struct ReportGist {
    pub state: Option<String>,
    pub manifest_version: Option<u64>,
    pub health: Option<Vec<HealthGist>>,
    pub error: Option<ErrorGist>,
    #[serde(default)]
    pub needs_reboot: bool,
    #[serde(default)]
    pub reboot_reasons: Vec<String>,
}

/// The reason of a `needs_reboot` report without reasons (an agent from before them).
static UNSPECIFIED_REBOOT: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| "the node says so (no reasons given)".to_owned());

#[derive(Debug, Deserialize)]
pub(super) struct HealthGist {
    #[serde(default)]
    pub name: String,
    pub ok: Option<bool>,
    #[serde(default)]
    pub detail: String,
}

/// A report's error.
#[derive(Debug, Deserialize, Serialize)]
pub(super) struct ErrorGist {
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub message: String,
}

impl ReportGist {
    /// Its reboot reasons; one generic reason when it says `needs_reboot` without any.
    fn reboot_reasons(&self) -> &[String] {
        match (self.needs_reboot, self.reboot_reasons.is_empty()) {
            (true, true) => std::slice::from_ref(&*UNSPECIFIED_REBOOT),
            _ => &self.reboot_reasons,
        }
    }

    fn healthy(&self) -> Option<bool> {
        self.health
            .as_ref()
            .map(|h| h.iter().all(|c| c.ok == Some(true)))
    }
}

/// One node as this coordinator knows it: its current manifest, its report record, what
/// the coordinator observed of it, or any of these.
pub(super) struct Row {
    pub name: String,
    pub cur: Option<Arc<Current>>,
    pub rec: Option<NodeRecord>,
    pub gist: Option<ReportGist>,
    pub polled: Option<Timestamp>,
    pub refusal: Option<Refusal>,
    pub unknown: Option<UnknownName>,
    /// The last `rejected` report.
    pub rejection: Option<Rejection>,
    /// Its place in the current rollout.
    pub rollout: Option<NodeRollout>,
}

impl Row {
    fn new(name: String) -> Self {
        Self {
            name,
            cur: None,
            rec: None,
            gist: None,
            polled: None,
            refusal: None,
            unknown: None,
            rejection: None,
            rollout: None,
        }
    }

    /// Its wave: in the current rollout, else its served manifest's.
    pub fn wave(&self) -> Option<u32> {
        self.rollout
            .map(|r| r.wave)
            .or_else(|| self.cur.as_ref().map(|c| c.manifest.rollout.wave))
    }

    fn seconds_since_report(&self, now: Timestamp) -> Option<u64> {
        let seen = self.rec.as_ref()?.last_seen?;
        Some(now.unix().saturating_sub(seen))
    }

    /// `tofu`, `pinned` or `manifest`; `None` when no key is known.
    fn key_source(&self) -> Option<&'static str> {
        if self
            .cur
            .as_ref()
            .is_some_and(|c| c.manifest.node_key.is_some())
        {
            return Some("manifest");
        }
        let r = self.rec.as_ref()?;
        r.pinned_key.as_ref()?;
        Some(r.pin_source.unwrap_or(PinSource::FirstUse).as_str())
    }

    /// The facts the flags are judged on.
    fn facts(&self) -> Facts<'_> {
        let gist = self.gist.as_ref();
        let failing = gist
            .and_then(|g| g.health.as_ref())
            .and_then(|h| h.iter().find(|c| c.ok != Some(true)));
        Facts {
            manifest: self.cur.as_ref().map(|c| ManifestFacts {
                version: c.manifest.version.0,
                stored_at: c.stored_at,
                expires_at: c.manifest.expires_at,
            }),
            report: self
                .rec
                .as_ref()
                .and_then(|r| r.last_seen)
                .map(|seen| ReportFacts {
                    received_at: Timestamp::from_unix(seen),
                    state: gist.and_then(|g| g.state.as_deref()),
                    version: gist.and_then(|g| g.manifest_version),
                    healthy: gist.and_then(ReportGist::healthy),
                    error: gist
                        .and_then(|g| g.error.as_ref())
                        .map(|e| (e.phase.as_str(), e.message.as_str())),
                    failing_check: failing.map(|c| (c.name.as_str(), c.detail.as_str())),
                    reboot_reasons: gist.map_or(&[][..], ReportGist::reboot_reasons),
                }),
            last_poll: self.polled,
            key_source: self.key_source(),
            refusal: self
                .refusal
                .as_ref()
                .filter(|r| r.active)
                .map(|r| RefusalFacts {
                    at: r.at,
                    code: r.code,
                    message: &r.message,
                }),
            rejection: self.rejection.as_ref().map(|r| RejectionFacts {
                at: r.at,
                message: &r.message,
            }),
            unknown: self.unknown.map(|u| UnknownFacts {
                requests: u.requests,
                last: u.last,
            }),
        }
    }

    /// Its flags at `now`.
    pub fn flags(&self, now: Timestamp, t: &Thresholds) -> Vec<Flagged> {
        flags::judge(&self.facts(), now, t)
    }
}

/// Every node, by name: those with a manifest, those that reported, and names heard from
/// without a manifest. Typed rows, not JSON trees: for 10,000 nodes a tree of
/// `serde_json::Value`s took about 60 MiB (and twice that for `/metrics`), which the
/// allocator then kept.
pub(super) fn rows(app: &App) -> Result<Vec<Row>, ApiError> {
    view(app).map(|(rows, _)| rows)
}

/// [`rows`], each with its place in the current rollout, and the rollout's status: what
/// every fleet view shows of waves and rollouts comes from here.
pub(super) fn view(app: &App) -> Result<(Vec<Row>, Option<RolloutStatus>), ApiError> {
    let mut rollout = app.gate.view(Timestamp::now());
    // Without the report database the views still show every node's manifest.
    let records = match app.store.nodes() {
        Err(StoreError::ReportsUnavailable(_)) => Vec::new(),
        r => r.map_err(|e| ApiError::store("reading the fleet's reports", e))?,
    };
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for (name, cur, polled) in app.live.all_polled() {
        let mut row = Row::new(name.to_string());
        row.cur = Some(cur);
        row.polled = polled;
        rows.insert(row.name.clone(), row);
    }
    for r in records {
        let row = rows
            .entry(r.node.clone())
            .or_insert_with(|| Row::new(r.node.clone()));
        row.gist = r
            .last_report
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok());
        row.rejection = r.last_rejection.as_ref().map(|(at, payload)| {
            let gist: ReportGist = serde_json::from_str(payload).unwrap_or_default();
            Rejection {
                at: Timestamp::from_unix(*at),
                message: gist.error.map(|e| e.message).unwrap_or_default(),
            }
        });
        row.rec = Some(r);
    }
    for (name, refusal) in app.observed.refusals() {
        if let Some(row) = rows.get_mut(name.as_str()) {
            row.refusal = Some(refusal);
        }
    }
    for (name, u) in app.observed.unknowns() {
        let row = rows
            .entry(name.to_string())
            .or_insert_with(|| Row::new(name.to_string()));
        if row.cur.is_none() {
            row.unknown = Some(u);
        }
    }
    for (name, place) in rollout.nodes.drain() {
        if let Some(row) = rows.get_mut(&name) {
            row.rollout = Some(place);
        }
    }
    Ok((rows.into_values().collect(), rollout.status))
}

#[derive(Serialize)]
struct FleetDoc<'a> {
    generated_at: Timestamp,
    /// False when the report database could not be opened at start: no node then shows a
    /// report, and reports are refused until an operator repairs it.
    reports_available: bool,
    /// The limits the flags were judged with, in seconds.
    thresholds: ThresholdsDoc,
    /// How many nodes carry each flag.
    flagged: BTreeMap<&'static str, usize>,
    /// The current rollout, as `GET /v1/rollout` shows it.
    rollout: Option<RolloutStatus>,
    nodes: Vec<NodeDoc<'a>>,
}

#[derive(Serialize)]
struct ThresholdsDoc {
    stale_s: u64,
    stuck_s: u64,
    expiring_s: u64,
}

#[derive(Serialize)]
struct Desired<'a> {
    profile: &'a str,
    path: &'a StorePath,
}

#[derive(Serialize)]
struct SourceDoc<'a> {
    rev: Option<&'a str>,
    dirty: bool,
}

/// A node's last report refusing a manifest.
#[derive(Serialize)]
pub(super) struct Rejection {
    pub at: Timestamp,
    pub message: String,
}

/// A node in `GET /v1/fleet`. The manifest's fields are left out for a node that only
/// reported; `node_key` is the manifest's (`key_source` `manifest`), or the one pinned on
/// first use (`tofu`) or by an operator (`pinned`).
#[derive(Serialize)]
struct NodeDoc<'a> {
    node: &'a str,
    desired_version: Option<Version>,
    /// Its wave: in the current rollout, else its served manifest's.
    wave: Option<u32>,
    /// Its place in the current rollout; `null` when it is not in it.
    rollout: Option<NodeRollout>,
    #[serde(skip_serializing_if = "Option::is_none")]
    issued_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stored_at: Option<Timestamp>,
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
    last_poll: Option<Timestamp>,
    seconds_since_poll: Option<u64>,
    healthy: Option<bool>,
    state: Option<&'a str>,
    reported_version: Option<u64>,
    /// The source of the reported version, when this coordinator stored that version.
    reported_source: Option<SourceDoc<'a>>,
    /// The last report's error.
    error: Option<&'a ErrorGist>,
    /// The coordinator's last refusal of a report for this node (since it started).
    refusal: Option<&'a Refusal>,
    /// The node's last report refusing a manifest.
    rejection: Option<&'a Rejection>,
    /// Requests under this name while it has no manifest.
    #[serde(skip_serializing_if = "Option::is_none")]
    unknown: Option<UnknownName>,
    /// What needs a human, with reasons.
    flags: Vec<Flagged>,
    last_report: Option<&'a RawValue>,
}

fn node_doc<'a>(row: &'a Row, now: Timestamp, t: &Thresholds) -> NodeDoc<'a> {
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
    let reported_version = gist.and_then(|g| g.manifest_version);
    let reported_source = match (m, reported_version) {
        (Some(m), Some(v)) if m.version.0 == v => m.source.as_ref().map(|s| SourceDoc {
            rev: s.rev.as_deref(),
            dirty: s.dirty,
        }),
        _ => row
            .rec
            .as_ref()
            .and_then(|r| r.reported_source.as_ref())
            .map(|(rev, dirty)| SourceDoc {
                rev: rev.as_deref(),
                dirty: *dirty,
            }),
    };
    NodeDoc {
        node: &row.name,
        desired_version: m.map(|m| m.version),
        wave: row.wave(),
        rollout: row.rollout,
        issued_at: m.map(|m| m.issued_at),
        expires_at: m.map(|m| m.expires_at),
        stored_at: row.cur.as_ref().map(|c| c.stored_at),
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
        last_poll: row.polled,
        seconds_since_poll: row.polled.map(|p| now.secs_since(p)),
        healthy: gist.and_then(ReportGist::healthy),
        state: gist.and_then(|g| g.state.as_deref()),
        reported_version,
        reported_source,
        error: gist.and_then(|g| g.error.as_ref()),
        refusal: row.refusal.as_ref(),
        rejection: row.rejection.as_ref(),
        unknown: row.unknown,
        flags: row.flags(now, t),
        last_report: row
            .rec
            .as_ref()
            .and_then(|r| r.last_report.as_deref())
            .and_then(|p| serde_json::from_str(p).ok()),
    }
}

/// The fleet document, serialised.
fn fleet_json(app: &App, t: &Thresholds) -> Result<Vec<u8>, ApiError> {
    let (rows, rollout) = view(app)?;
    let now = Timestamp::now();
    let nodes: Vec<NodeDoc<'_>> = rows.iter().map(|r| node_doc(r, now, t)).collect();
    let mut flagged = BTreeMap::new();
    for n in &nodes {
        for f in &n.flags {
            *flagged.entry(f.flag.as_str()).or_default() += 1;
        }
    }
    let doc = FleetDoc {
        generated_at: now,
        reports_available: app.store.reports_available(),
        thresholds: ThresholdsDoc {
            stale_s: t.stale.as_secs(),
            stuck_s: t.stuck.as_secs(),
            expiring_s: t.expiring.as_secs(),
        },
        flagged,
        rollout,
        nodes,
    };
    serde_json::to_vec(&doc).map_err(|e| ApiError::internal("writing the fleet document", e))
}

/// `?stale=1h&stuck=30m&expiring=7d`: the flags' limits for this request (the server's
/// otherwise).
#[derive(Debug, Default, Deserialize)]
pub(super) struct FleetQuery {
    stale: Option<String>,
    stuck: Option<String>,
    expiring: Option<String>,
}

impl FleetQuery {
    pub fn thresholds(&self, base: Thresholds) -> Result<Thresholds, ApiError> {
        let parse = |name: &str, v: &Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(s) => roost_common::time::parse_duration(s)
                .map_err(|e| ApiError::bad_request("bad_threshold", format!("?{name}={s}: {e}"))),
        };
        Ok(Thresholds {
            stale: parse("stale", &self.stale, base.stale)?,
            stuck: parse("stuck", &self.stuck, base.stuck)?,
            expiring: parse("expiring", &self.expiring, base.expiring)?,
        })
    }
}

pub(super) async fn get_fleet(
    State(app): State<Arc<App>>,
    Query(q): Query<FleetQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::check_read(&app, &headers)?;
    let t = q.thresholds(app.cfg.thresholds)?;
    let doc = tokio::task::spawn_blocking(move || fleet_json(&app, &t))
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

/// `roost_node_flag{node, flag, code} 1` for every flag of every node, and
/// `roost_nodes_flagged{flag}` with every flag's count (0 included, for alerts on rises).
fn flag_metrics(out: &mut String, rows: &[Row], now: Timestamp, t: &Thresholds) {
    let _ = writeln!(
        out,
        "# HELP roost_node_flag 1 for each flag of a node, with the code of its reason (see roost-coordinator status --help).\n# TYPE roost_node_flag gauge"
    );
    let mut counts: BTreeMap<Flag, usize> = Flag::ALL.iter().map(|f| (*f, 0)).collect();
    for r in rows {
        for f in r.flags(now, t) {
            *counts.entry(f.flag).or_default() += 1;
            let _ = writeln!(
                out,
                "roost_node_flag{{node=\"{}\",flag=\"{}\",code=\"{}\"}} 1",
                label(&r.name),
                f.flag.as_str(),
                label(&f.code)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP roost_nodes_flagged Nodes carrying each flag.\n# TYPE roost_nodes_flagged gauge"
    );
    for (flag, n) in counts {
        let _ = writeln!(out, "roost_nodes_flagged{{flag=\"{}\"}} {n}", flag.as_str());
    }
}

/// Each node's wave, and the current rollout: its state, which waves are released, and
/// how many nodes of each wave are pending, healthy or failed (as `GET /v1/rollout` counts).
fn rollout_metrics(out: &mut String, rows: &[Row], r: Option<&RolloutStatus>) {
    gauge(
        out,
        "roost_node_wave",
        "The node's wave: in the current rollout, else its manifest's.",
        rows,
        |r| r.wave().map(|w| (String::new(), w)),
    );
    gauge(
        out,
        "roost_node_rollout_released",
        "1 when the node's wave of the current rollout is released, 0 while it is held back.",
        rows,
        |r| r.rollout.map(|p| (String::new(), u8::from(p.released))),
    );
    let _ = writeln!(
        out,
        "# HELP roost_rollout_id The current rollout (its publish's rollout.id); absent before the first gated publish.\n# TYPE roost_rollout_id gauge"
    );
    if let Some(r) = r {
        let _ = writeln!(out, "roost_rollout_id {}", r.id);
    }
    let _ = writeln!(
        out,
        "# HELP roost_rollout_state 1 for the current rollout's state (every state listed, 0 included).\n# TYPE roost_rollout_state gauge"
    );
    for s in RolloutState::ALL {
        let on = r.is_some_and(|r| r.state == s);
        let _ = writeln!(
            out,
            "roost_rollout_state{{state=\"{}\"}} {}",
            s.as_str(),
            u8::from(on)
        );
    }
    let halted = r.is_some_and(|r| r.state == RolloutState::Halted);
    let _ = writeln!(
        out,
        "# HELP roost_rollout_halted 1 while the current rollout is halted (an operator must act).\n# TYPE roost_rollout_halted gauge\nroost_rollout_halted {}",
        u8::from(halted)
    );
    let _ = writeln!(
        out,
        "# HELP roost_rollout_wave_released 1 for each released wave of the current rollout, 0 for one held back.\n# TYPE roost_rollout_wave_released gauge"
    );
    let waves = r.map(|r| r.waves.as_slice()).unwrap_or_default();
    for w in waves {
        let _ = writeln!(
            out,
            "roost_rollout_wave_released{{wave=\"{}\"}} {}",
            w.wave,
            u8::from(w.released)
        );
    }
    let _ = writeln!(
        out,
        "# HELP roost_rollout_wave_nodes Nodes of each wave of the current rollout by outcome.\n# TYPE roost_rollout_wave_nodes gauge"
    );
    for w in waves {
        for o in NodeOutcome::ALL {
            let n = match o {
                NodeOutcome::Pending => w.pending,
                NodeOutcome::Healthy => w.healthy,
                NodeOutcome::Failed => w.failed,
            };
            let _ = writeln!(
                out,
                "roost_rollout_wave_nodes{{wave=\"{}\",outcome=\"{}\"}} {n}",
                w.wave,
                o.as_str()
            );
        }
    }
}

pub(super) async fn get_metrics(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::check_read(&app, &headers)?;
    let app2 = app.clone();
    let (rows, rollout) = tokio::task::spawn_blocking(move || view(&app2))
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
    gauge(
        &mut out,
        "roost_node_seconds_since_poll",
        "Seconds since the node's last manifest poll (since the coordinator started).",
        &rows,
        |r| r.polled.map(|p| (String::new(), now.secs_since(p))),
    );
    flag_metrics(&mut out, &rows, now, &app.cfg.thresholds);
    rollout_metrics(&mut out, &rows, rollout.as_ref());
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
        Arc::new(
            Current::from_stored(env.to_bytes(), &trusted, &"n1".parse().unwrap(), now).unwrap(),
        )
    }

    fn record(report: &str, pinned: Option<&str>) -> NodeRecord {
        NodeRecord {
            node: "n1".into(),
            pinned_key: pinned.map(str::to_owned),
            pin_source: pinned.map(|_| PinSource::FirstUse),
            last_seq: Some(3),
            last_seen: Some(Timestamp::now().unix()),
            last_report: Some(report.into()),
            last_rejection: None,
            reported_source: None,
        }
    }

    fn doc(cur: Option<Arc<Current>>, rec: Option<NodeRecord>) -> Value {
        let gist = rec
            .as_ref()
            .and_then(|r| serde_json::from_str(r.last_report.as_deref()?).ok());
        let mut row = Row::new("n1".into());
        (row.cur, row.rec, row.gist) = (cur, rec, gist);
        serde_json::to_value(node_doc(&row, Timestamp::now(), &Thresholds::default())).unwrap()
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
