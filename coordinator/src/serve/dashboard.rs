//! The web dashboard: server-rendered HTML at `/` (the fleet: counts per flag and state, each
//! rollout wave's progress, the node table with flags and reasons) and `/nodes/{node}` (one
//! node: flags, positions, desired and current paths, report history), updated live.
//!
//! Live updates without a build step: `/events` is a server-sent event stream that says
//! `change` whenever a report, refusal, poll of an unknown name or upload changes what the
//! pages show (and `tick` every 15 s, for the ages); a few lines of inline script fetch the
//! page again and swap its `<main>`. Without JavaScript a `<noscript>` refresh reloads the
//! page every 10 s. Same read access as `/v1/fleet`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use roost_common::Timestamp;
use roost_common::time::human_duration;
use roost_common::wire::v1::rollout::RolloutStatus;

use super::auth;
use super::error::ApiError;
use super::fleet::{Row, rows, view};
use super::state::{App, blocking, parse_node};
use crate::flags::{Flag, Flagged};

/// The dashboard's routes.
pub(super) const INDEX_ROUTE: &str = "/";
pub(super) const NODE_ROUTE: &str = "/nodes/{node}";
pub(super) const EVENTS_ROUTE: &str = "/events";

/// How many reports a node's page shows.
const HISTORY: u32 = 50;

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn ago(now: Timestamp, t: Option<Timestamp>) -> String {
    t.map_or("never".into(), |t| {
        format!(
            "{} ago",
            human_duration(Duration::from_secs(now.secs_since(t)))
        )
    })
}

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1rem;align-items:baseline}
header a{color:#fff;text-decoration:none;font-weight:600}
main{padding:1rem 1.2rem}
table{border-collapse:collapse;background:#fff;width:100%;margin:.5rem 0 1.2rem}
th,td{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #e3e6ea;vertical-align:top}
th{background:#eef0f3;font-weight:600}
td{white-space:nowrap}td.reason{white-space:normal;max-width:48rem}
code{font-size:.9em}
.flag{display:inline-block;padding:0 .4rem;border-radius:.3rem;font-size:.8em;font-weight:700;margin-right:.2rem}
.bad{background:#c62828;color:#fff}.info{background:#cfd8dc;color:#263238}
.counts{display:flex;flex-wrap:wrap;gap:.6rem;margin:.5rem 0 1rem}
.count{background:#fff;border:1px solid #e3e6ea;border-radius:.4rem;padding:.4rem .8rem}
.count b{font-size:1.4em;display:block}
.muted{color:#667}
";

/// The page around `main`: the live-update script and the no-script refresh.
fn page(title: &str, main: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title}</title><style>{STYLE}</style>\
<noscript><meta http-equiv=\"refresh\" content=\"10\"></noscript></head>\
<body><header><a href=\"/\">roost</a><span>{title}</span></header>\n{main}\n\
<script>\
(function(){{var busy=false;function load(){{if(busy)return;busy=true;\
fetch(location.href,{{credentials:'same-origin'}}).then(function(r){{return r.text()}})\
.then(function(t){{var d=new DOMParser().parseFromString(t,'text/html');\
var m=d.querySelector('main');if(m)document.querySelector('main').replaceWith(m);}})\
.finally(function(){{busy=false}});}}\
var es=new EventSource('/events');es.addEventListener('change',load);es.addEventListener('tick',load);}})();\
</script></body></html>\n",
        title = esc(title),
    )
}

fn html(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn chips(flags: &[Flagged]) -> String {
    let mut out = String::new();
    for f in flags {
        let class = if f.flag.is_bad() { "bad" } else { "info" };
        let _ = write!(
            out,
            "<span class=\"flag {class}\" title=\"{}\">{}</span>",
            esc(&f.reason),
            f.flag.label()
        );
    }
    out
}

/// A revision for people: short, `+` when dirty; the version when there is none.
fn revision(rev: Option<&str>, dirty: bool, version: Option<u64>) -> String {
    match (rev, dirty) {
        (Some(r), d) => {
            let short: String = r.chars().take(7).collect();
            format!(
                "<code title=\"{}\">{}{}</code>",
                esc(r),
                esc(&short),
                if d { "+" } else { "" }
            )
        }
        (None, true) => "dirty".into(),
        (None, false) => version.map_or("-".into(), |v| v.to_string()),
    }
}

fn desired_cell(r: &Row) -> String {
    let m = r.cur.as_ref().map(|c| &c.manifest);
    let src = m.and_then(|m| m.source.as_ref());
    revision(
        src.and_then(|s| s.rev.as_deref()),
        src.is_some_and(|s| s.dirty),
        m.map(|m| m.version.0),
    )
}

fn reported_cell(r: &Row) -> String {
    let version = r.gist.as_ref().and_then(|g| g.manifest_version);
    let m = r.cur.as_ref().map(|c| &c.manifest);
    let (rev, dirty) = match m {
        Some(m) if Some(m.version.0) == version => m
            .source
            .as_ref()
            .map_or((None, false), |s| (s.rev.clone(), s.dirty)),
        _ => r
            .rec
            .as_ref()
            .and_then(|x| x.reported_source.clone())
            .unwrap_or((None, false)),
    };
    revision(rev.as_deref(), dirty, version)
}

/// `/`: the fleet.
fn index(app: &App) -> Result<String, ApiError> {
    let (rows, rollout) = view(app)?;
    let now = Timestamp::now();
    let t = app.cfg.thresholds;
    let judged: Vec<(&Row, Vec<Flagged>)> = rows.iter().map(|r| (r, r.flags(now, &t))).collect();
    let mut main = String::from("<main>");
    let bad = judged
        .iter()
        .filter(|(_, f)| f.iter().any(|f| f.flag.is_bad()))
        .count();
    let _ = write!(
        main,
        "<div class=\"counts\"><div class=\"count\" id=\"count-nodes\"><b>{}</b>nodes</div>\
         <div class=\"count\" id=\"count-attention\"><b>{bad}</b>need attention</div>",
        judged.len()
    );
    for flag in Flag::ALL {
        let n = judged
            .iter()
            .filter(|(_, f)| f.iter().any(|f| f.flag == flag))
            .count();
        if n > 0 {
            let _ = write!(
                main,
                "<div class=\"count\" id=\"count-{}\"><b>{n}</b>{}</div>",
                flag.as_str(),
                flag.label()
            );
        }
    }
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    for (r, _) in &judged {
        let s = r
            .gist
            .as_ref()
            .and_then(|g| g.state.as_deref())
            .unwrap_or("no report");
        *states.entry(s).or_default() += 1;
    }
    for (s, n) in &states {
        let _ = write!(
            main,
            "<div class=\"count muted\"><b>{n}</b>{}</div>",
            esc(s)
        );
    }
    main.push_str("</div>");
    main.push_str(&match &rollout {
        Some(r) => rollout_waves(r),
        None => waves(&judged),
    });
    main.push_str(
        "<h2>Nodes</h2><table id=\"nodes\"><tr><th>node</th><th>wave</th><th>desired</th>\
         <th>reported</th><th>state</th><th>seen</th><th>flags</th><th>reason</th></tr>",
    );
    for (r, flags) in &judged {
        let seen = match (r.rec.as_ref().and_then(|x| x.last_seen), r.polled) {
            (Some(a), Some(b)) => Some(Timestamp::from_unix(a).max(b)),
            (a, b) => a.map(Timestamp::from_unix).or(b),
        }
        .or(r.unknown.map(|u| u.last));
        let reason = flags.first().map(|f| f.reason.clone()).unwrap_or_else(|| {
            r.gist
                .as_ref()
                .and_then(|g| g.error.as_ref())
                .map(|e| format!("{}: {}", e.phase, e.message))
                .unwrap_or_default()
        });
        let _ = write!(
            main,
            "<tr data-node=\"{name}\"><td><a href=\"/nodes/{name}\">{name}</a></td><td>{}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"reason\">{}</td></tr>",
            wave_cell(r),
            desired_cell(r),
            reported_cell(r),
            esc(r
                .gist
                .as_ref()
                .and_then(|g| g.state.as_deref())
                .unwrap_or("-")),
            ago(now, seen),
            chips(flags),
            esc(&reason),
            name = esc(&r.name),
        );
    }
    main.push_str("</table>");
    let _ = write!(
        main,
        "<p class=\"muted\">{} · stale after {}, stuck after {}, expiring within {} · \
         <a href=\"/v1/fleet\">/v1/fleet</a> · <a href=\"/metrics\">/metrics</a></p></main>",
        now,
        human_duration(t.stale),
        human_duration(t.stuck),
        human_duration(t.expiring)
    );
    Ok(page("fleet", &main))
}

/// A node's wave, `held` after it while the current rollout holds its manifest back (as
/// `roost-coordinator status` shows it).
fn wave_cell(r: &Row) -> String {
    match (r.wave(), r.rollout.is_some_and(|p| !p.released)) {
        (Some(w), false) => w.to_string(),
        (Some(w), true) => format!("{w} held"),
        (None, _) => "-".into(),
    }
}

/// The current rollout wave by wave, as `GET /v1/rollout` has it: released or not, healthy
/// of needed, failed, pending, what it waits for; and why it halted.
fn rollout_waves(r: &RolloutStatus) -> String {
    let mut out = format!(
        "<h2>Rollout {} <span id=\"rollout-state\">{}</span></h2>",
        r.id,
        r.state.as_str()
    );
    if let Some(h) = &r.halt {
        let _ = write!(out, "<p class=\"reason\" id=\"halt\">{}", esc(&h.reason));
        for n in &h.nodes {
            let _ = write!(
                out,
                "<br><b>{}</b> {}: {}",
                esc(&n.node),
                esc(&n.state),
                esc(n.error.as_deref().unwrap_or("(no error message)"))
            );
        }
        out.push_str("</p>");
    }
    out.push_str(
        "<table id=\"waves\"><tr><th>wave</th><th>nodes</th><th>released</th>\
         <th>healthy / needed</th><th>failed</th><th>pending</th><th>progress</th>\
         <th>waiting for</th></tr>",
    );
    for w in &r.waves {
        let pct = (w.healthy * 100).checked_div(w.nodes).unwrap_or(0);
        let _ = write!(
            out,
            "<tr data-wave=\"{wave}\"><td>{wave}</td><td>{n}</td><td>{}</td><td>{}/{}</td>\
             <td>{}</td><td>{}</td><td><progress max=\"{n}\" value=\"{}\">{pct} %</progress> \
             {pct} %</td><td>{}</td></tr>",
            if w.released { "yes" } else { "no" },
            w.healthy,
            w.needed,
            w.failed,
            w.pending,
            w.healthy,
            esc(w.waiting_for.as_deref().unwrap_or("-")),
            wave = w.wave,
            n = w.nodes,
        );
    }
    out.push_str("</table>");
    out
}

/// Without a gated publish, each wave (`roost.wave` of the served manifests): how many nodes
/// run their desired version, how many need attention.
fn waves(judged: &[(&Row, Vec<Flagged>)]) -> String {
    let mut by_wave: BTreeMap<u32, (usize, usize, usize)> = BTreeMap::new();
    for (r, flags) in judged {
        let (Some(cur), Some(wave)) = (&r.cur, r.wave()) else {
            continue;
        };
        let e = by_wave.entry(wave).or_default();
        e.0 += 1;
        let converged = r.gist.as_ref().is_some_and(|g| {
            g.manifest_version == Some(cur.manifest.version.0)
                && g.state.as_deref() == Some("success")
        });
        if converged && !flags.iter().any(|f| f.flag.is_bad()) {
            e.1 += 1;
        }
        if flags.iter().any(|f| f.flag.is_bad()) {
            e.2 += 1;
        }
    }
    if by_wave.len() < 2 && by_wave.values().all(|(n, ..)| *n == 0) {
        return String::new();
    }
    let mut out = String::from(
        "<h2>Rollout waves</h2><table id=\"waves\"><tr><th>wave</th><th>nodes</th>\
         <th>at their desired version</th><th>need attention</th><th>progress</th></tr>",
    );
    for (wave, (n, done, bad)) in by_wave {
        let pct = (done * 100).checked_div(n).unwrap_or(0);
        let _ = write!(
            out,
            "<tr><td>{wave}</td><td>{n}</td><td>{done}</td><td>{bad}</td>\
             <td><progress max=\"{n}\" value=\"{done}\">{pct} %</progress> {pct} %</td></tr>"
        );
    }
    out.push_str("</table>");
    out
}

/// `/nodes/{node}`: one node.
fn node_page(app: &App, node: &str, history: Vec<String>) -> Result<Option<String>, ApiError> {
    let rows = rows(app)?;
    let Some(r) = rows.into_iter().find(|r| r.name == node) else {
        return Ok(None);
    };
    let now = Timestamp::now();
    let flags = r.flags(now, &app.cfg.thresholds);
    let mut main = String::from("<main>");
    let _ = write!(main, "<h1>{}</h1>", esc(node));
    if flags.is_empty() {
        main.push_str("<p id=\"flags\">No flags: nothing needs a human.</p>");
    } else {
        main.push_str("<table id=\"flags\"><tr><th>flag</th><th>code</th><th>reason</th></tr>");
        for f in &flags {
            let _ = write!(
                main,
                "<tr><td>{}</td><td><code>{}</code></td><td class=\"reason\">{}</td></tr>",
                chips(std::slice::from_ref(f)),
                esc(&f.code),
                esc(&f.reason)
            );
        }
        main.push_str("</table>");
    }
    let m = r.cur.as_ref().map(|c| &c.manifest);
    let gist = r.gist.as_ref();
    let mut facts: Vec<(&str, String)> = vec![
        (
            "desired",
            format!(
                "{} (version {})",
                desired_cell(&r),
                m.map_or("-".into(), |m| m.version.0.to_string())
            ),
        ),
        (
            "reported",
            format!(
                "{} (version {}), state {}",
                reported_cell(&r),
                gist.and_then(|g| g.manifest_version)
                    .map_or("-".into(), |v| v.to_string()),
                esc(gist.and_then(|g| g.state.as_deref()).unwrap_or("-"))
            ),
        ),
        (
            "last report",
            ago(
                now,
                r.rec
                    .as_ref()
                    .and_then(|x| x.last_seen)
                    .map(Timestamp::from_unix),
            ),
        ),
        ("last poll", ago(now, r.polled)),
    ];
    if let Some(p) = &r.rollout {
        facts.push(("rollout", esc(&p.to_string())));
    }
    if let Some(c) = &r.cur {
        facts.push(("manifest stored", c.stored_at.to_string()));
        facts.push(("expires", c.manifest.expires_at.to_string()));
        if let Some(s) = &c.manifest.source {
            facts.push(("flake", format!("<code>{}</code>", esc(&s.flake))));
        }
    }
    if let Some(e) = gist.and_then(|g| g.error.as_ref()) {
        facts.push(("last error", esc(&format!("{}: {}", e.phase, e.message))));
    }
    if let Some(x) = &r.refusal {
        facts.push((
            "reports refused",
            esc(&format!(
                "{} ({}{}): {}",
                x.at,
                x.code,
                if x.active {
                    ""
                } else {
                    ", a report was accepted since"
                },
                x.message
            )),
        ));
    }
    if let Some(x) = &r.rejection {
        facts.push((
            "it refused a manifest",
            esc(&format!("{}: {}", x.at, x.message)),
        ));
    }
    main.push_str("<table id=\"facts\">");
    for (k, v) in facts {
        let _ = write!(main, "<tr><th>{k}</th><td>{v}</td></tr>");
    }
    main.push_str("</table>");
    if let Some(m) = m {
        let current: Vec<roost_common::wire::v1::ProfileStatus> = r
            .rec
            .as_ref()
            .and_then(|x| x.last_report.as_deref())
            .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
            .and_then(|v| serde_json::from_value(v["profiles"].clone()).ok())
            .unwrap_or_default();
        main.push_str(
            "<h2>Profiles</h2><table id=\"profiles\"><tr><th>profile</th><th>desired path</th>\
             <th>current path</th><th>generation</th></tr>",
        );
        for p in &m.profiles {
            let now_at = current.iter().find(|c| c.name == p.name);
            let _ = write!(
                main,
                "<tr><td>{}</td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>",
                esc(p.name.as_str()),
                esc(p.path.as_ref()),
                esc(now_at.and_then(|c| c.current.as_deref()).unwrap_or("-")),
                now_at
                    .and_then(|c| c.generation)
                    .map_or("-".into(), |g| g.to_string())
            );
        }
        main.push_str("</table>");
    }
    let _ = write!(
        main,
        "<h2>Report history</h2><table id=\"history\"><tr><th>sent</th><th>seq</th>\
         <th>state</th><th>version</th><th>error</th></tr>"
    );
    for payload in &history {
        let v: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
        let s = |k: &str| match &v[k] {
            serde_json::Value::String(s) => esc(s),
            serde_json::Value::Null => "-".into(),
            x => esc(&x.to_string()),
        };
        let error = v["error"]["message"]
            .as_str()
            .map(|m| format!("{}: {m}", v["error"]["phase"].as_str().unwrap_or("")))
            .unwrap_or_default();
        let _ = write!(
            main,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"reason\">{}</td></tr>",
            s("sent_at"),
            s("seq"),
            s("state"),
            s("manifest_version"),
            esc(&error)
        );
    }
    main.push_str("</table></main>");
    Ok(Some(page(node, &main)))
}

/// `GET /`.
pub(super) async fn get_index(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::check_read(&app, &headers)?;
    let body = tokio::task::spawn_blocking(move || index(&app))
        .await
        .map_err(|e| ApiError::internal("building the dashboard", e))??;
    Ok(html(body))
}

/// `GET /nodes/{node}`.
pub(super) async fn get_node(
    State(app): State<Arc<App>>,
    Path(node): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::check_read(&app, &headers)?;
    let node = parse_node(&node)?.to_string();
    let history = {
        let (app2, node) = (app.clone(), node.clone());
        match blocking("reading the report history", move || {
            app2.store.history(&node, HISTORY)
        })
        .await
        {
            Ok(h) => h,
            Err(_) if !app.store.reports_available() => Vec::new(),
            Err(e) => return Err(e),
        }
    };
    let n = node.clone();
    let body = tokio::task::spawn_blocking(move || node_page(&app, &n, history))
        .await
        .map_err(|e| ApiError::internal("building the node's page", e))??;
    match body {
        Some(b) => Ok(html(b)),
        None => Err(ApiError::not_found(
            "unknown_node",
            format!("this coordinator knows no node `{node}`"),
        )),
    }
}

/// How often `/events` says `tick` (the pages' ages move on without a change).
const TICK: Duration = Duration::from_secs(15);

/// `GET /events`: `change` when the fleet views change, `tick` every 15 s; ends at shutdown.
pub(super) async fn get_events(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::check_read(&app, &headers)?;
    let rx = app.observed.watch();
    let shutdown = app.shutdown.clone();
    let stream = futures_util::stream::unfold((rx, shutdown), |(mut rx, shutdown)| async move {
        let event = tokio::select! {
            changed = rx.changed() => {
                changed.ok()?;
                // Many reports at once make one update.
                tokio::time::sleep(Duration::from_millis(200)).await;
                rx.borrow_and_update();
                Event::default().event("change").data(rx.borrow().to_string())
            }
            () = tokio::time::sleep(TICK) => Event::default().event("tick").data(""),
            () = shutdown.cancelled() => return None,
        };
        Some((Ok::<_, Infallible>(event), (rx, shutdown)))
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}
