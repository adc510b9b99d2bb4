//! Rollouts over real HTTP, in process (no Nix): a publish's manifests are served wave by
//! wave as reports come in, long-polls of a wave are answered when it is released, failures
//! halt, operators steer, a restart keeps the state, and a newer publish supersedes.

use std::time::Duration;

use roost_common::wire::v1::http as v1;
use roost_common::wire::v1::{Fraction, Manifest, ReportState, Rollout, WaveSize};
use roost_common::{SecretKey, Version};
use serde_json::Value;

mod support;
use support::{Server, manifest, post_report, put, report_payload, seal_report, sealed, send};

const TOKEN: &str = "an-upload-token-of-some-length";

struct Fleet {
    publisher: SecretKey,
    nodes: Vec<(&'static str, u32, SecretKey)>,
    /// `bakeTime` of every publish, in seconds.
    bake_time_s: u64,
}

impl Fleet {
    /// a0 and b0 in wave 0, a1 in wave 1, a2 in wave 2.
    fn new() -> Self {
        let nodes = [("a0", 0), ("b0", 0), ("a1", 1), ("a2", 2)]
            .into_iter()
            .map(|(n, w)| (n, w, SecretKey::generate(n).unwrap()))
            .collect();
        Self {
            publisher: SecretKey::generate("pub").unwrap(),
            nodes,
            bake_time_s: 0,
        }
    }

    fn key(&self, node: &str) -> &SecretKey {
        &self.nodes.iter().find(|n| n.0 == node).unwrap().2
    }

    /// `node`'s manifest of publish `id` (version `id`), or an ungated one without `id`.
    fn envelope(&self, node: &str, version: u64, id: Option<u64>, min_healthy: f64) -> Vec<u8> {
        let (_, wave, key) = self.nodes.iter().find(|n| n.0 == node).unwrap();
        let mut m: Manifest = serde_json::from_slice(&manifest(node, version, Some(key))).unwrap();
        m.rollout = Rollout {
            wave: *wave,
            id,
            min_healthy: Fraction::new(min_healthy).unwrap(),
            max_failed: 0,
            bake_time_s: self.bake_time_s,
            waves: vec![
                WaveSize { wave: 0, nodes: 2 },
                WaveSize { wave: 1, nodes: 1 },
                WaveSize { wave: 2, nodes: 1 },
            ],
        };
        sealed(&self.publisher, &serde_json::to_vec(&m).unwrap())
    }

    /// Publish `id`: every node's manifest at version `id`.
    async fn publish(&self, url: &str, id: u64, min_healthy: f64) {
        for (node, _, _) in &self.nodes {
            let (st, body) = put(url, node, self.envelope(node, id, Some(id), min_healthy)).await;
            assert_eq!(st, 200, "{node}: {body}");
        }
    }

    async fn report(&self, url: &str, node: &str, seq: u64, version: u64, state: ReportState) {
        let mut r = report_payload(node, seq, state);
        r.manifest_version = Some(Version(version));
        if state != ReportState::Success {
            r.error = Some(roost_common::wire::v1::ReportError {
                phase: "activate".into(),
                message: format!("{node} broke"),
            });
        }
        let (st, body) = post_report(url, node, seal_report(&r, self.key(node))).await;
        assert_eq!(st, 200, "{node}: {body}");
    }
}

/// The version `node` is served, or `None` (404).
async fn served(url: &str, node: &str) -> Option<u64> {
    let r = reqwest::get(v1::manifest_url(url, node)).await.unwrap();
    if r.status() == 404 {
        return None;
    }
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .to_owned();
    Some(etag.parse().unwrap())
}

async fn rollout(url: &str) -> Value {
    reqwest::get(v1::rollout_url(url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn act(url: &str, action: &str, body: Option<Value>, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(v1::rollout_action_url(url, action));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    send(req).await
}

/// A server with every node at an ungated version 50.
async fn fleet_at_50(dir: &std::path::Path) -> (Fleet, Server) {
    let f = Fleet::new();
    let s = Server::start(dir, &f.publisher, Some(TOKEN)).await;
    for (node, _, _) in &f.nodes {
        assert_eq!(
            put(&s.url, node, f.envelope(node, 50, None, 1.0)).await.0,
            200
        );
    }
    (f, s)
}

#[tokio::test]
async fn waves_are_released_in_order_as_the_previous_wave_reports_success() {
    let dir = tempfile::tempdir().unwrap();
    let (f, s) = fleet_at_50(dir.path()).await;
    f.publish(&s.url, 100, 1.0).await;
    assert_eq!(served(&s.url, "a0").await, Some(100));
    assert_eq!(served(&s.url, "b0").await, Some(100));
    assert_eq!(served(&s.url, "a1").await, Some(50), "wave 1 is held back");
    assert_eq!(served(&s.url, "a2").await, Some(50));
    // A long-poll of wave 1 is held until its wave is released, then answered at once.
    let url = v1::long_poll_url(&s.url, "a1", 60);
    let held = tokio::spawn(async move {
        let r = reqwest::Client::new()
            .get(url)
            .header("If-None-Match", "\"50\"")
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.headers()["etag"].to_str().unwrap().to_owned(),
        )
    });
    f.report(&s.url, "a0", 1, 100, ReportState::Success).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !held.is_finished(),
        "released with one of two wave-0 nodes healthy"
    );
    assert_eq!(served(&s.url, "a1").await, Some(50));
    f.report(&s.url, "b0", 1, 100, ReportState::Success).await;
    let (status, etag) = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("the held long-poll was answered when its wave was released")
        .unwrap();
    assert_eq!((status, etag.as_str()), (200, "\"100\""));
    assert_eq!(served(&s.url, "a2").await, Some(50));
    let doc = rollout(&s.url).await;
    assert_eq!(doc["rollout"]["state"], "running", "{doc}");
    assert_eq!(doc["rollout"]["waves"][1]["released"], true);
    assert_eq!(doc["rollout"]["waves"][2]["released"], false);
    f.report(&s.url, "a1", 1, 100, ReportState::Success).await;
    assert_eq!(served(&s.url, "a2").await, Some(100));
    assert_eq!(rollout(&s.url).await["rollout"]["state"], "complete");
    s.stop().await;
}

#[tokio::test]
async fn a_failure_halts_the_rollout_and_names_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let (f, s) = fleet_at_50(dir.path()).await;
    f.publish(&s.url, 100, 1.0).await;
    f.report(&s.url, "a0", 1, 100, ReportState::Success).await;
    f.report(&s.url, "b0", 1, 100, ReportState::Success).await;
    f.report(&s.url, "a1", 1, 100, ReportState::RolledBack)
        .await;
    let doc = rollout(&s.url).await;
    let r = &doc["rollout"];
    assert_eq!(r["state"], "halted", "{doc}");
    assert_eq!(r["halt"]["wave"], 1);
    assert_eq!(r["halt"]["nodes"][0]["node"], "a1");
    assert_eq!(r["halt"]["nodes"][0]["state"], "rolled_back");
    assert_eq!(r["halt"]["nodes"][0]["error"], "a1 broke");
    assert_eq!(served(&s.url, "a2").await, Some(50), "wave 2 never sees it");
    s.stop().await;
}

#[tokio::test]
async fn a_node_without_a_released_manifest_gets_404_until_its_wave() {
    let dir = tempfile::tempdir().unwrap();
    let f = Fleet::new();
    let s = Server::start(dir.path(), &f.publisher, Some(TOKEN)).await;
    f.publish(&s.url, 100, 1.0).await;
    assert_eq!(served(&s.url, "a0").await, Some(100));
    assert_eq!(served(&s.url, "a2").await, None);
    s.stop().await;
}

#[tokio::test]
async fn operator_actions_need_a_token_and_steer_the_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let (f, s) = fleet_at_50(dir.path()).await;
    let (st, e) = act(&s.url, "pause", None, None).await;
    assert_eq!((st, e["error"].as_str()), (401, Some("unauthorized")));
    let (st, e) = act(&s.url, "pause", None, Some(TOKEN)).await;
    assert_eq!((st, e["error"].as_str()), (404, Some("no_rollout")));
    f.publish(&s.url, 100, 1.0).await;
    assert_eq!(act(&s.url, "pause", None, Some(TOKEN)).await.0, 200);
    f.report(&s.url, "a0", 1, 100, ReportState::Success).await;
    f.report(&s.url, "b0", 1, 100, ReportState::Success).await;
    assert_eq!(served(&s.url, "a1").await, Some(50), "paused");
    assert_eq!(rollout(&s.url).await["rollout"]["state"], "paused");
    let (st, doc) = act(&s.url, "resume", None, Some(TOKEN)).await;
    assert_eq!(st, 200, "{doc}");
    assert_eq!(served(&s.url, "a1").await, Some(100));
    // promote --wave 2 releases the last wave without a1's report.
    let (st, doc) = act(
        &s.url,
        "promote",
        Some(serde_json::json!({"wave": 2})),
        Some(TOKEN),
    )
    .await;
    assert_eq!(st, 200, "{doc}");
    assert_eq!(served(&s.url, "a2").await, Some(100));
    let (st, e) = act(&s.url, "promote", None, Some(TOKEN)).await;
    assert_eq!((st, e["error"].as_str()), (409, Some("already_released")));
    let (st, _) = act(&s.url, "abort", None, Some(TOKEN)).await;
    assert_eq!(st, 200);
    let (st, e) = act(&s.url, "resume", None, Some(TOKEN)).await;
    assert_eq!((st, e["error"].as_str()), (409, Some("rollout_aborted")));
    s.stop().await;
}

#[tokio::test]
async fn abort_keeps_later_waves_on_what_they_had() {
    let dir = tempfile::tempdir().unwrap();
    let (f, s) = fleet_at_50(dir.path()).await;
    f.publish(&s.url, 100, 1.0).await;
    assert_eq!(act(&s.url, "abort", None, Some(TOKEN)).await.0, 200);
    f.report(&s.url, "a0", 1, 100, ReportState::Success).await;
    f.report(&s.url, "b0", 1, 100, ReportState::Success).await;
    assert_eq!(served(&s.url, "a1").await, Some(50));
    assert_eq!(rollout(&s.url).await["rollout"]["state"], "aborted");
    s.stop().await;
}

#[tokio::test]
async fn a_restart_in_the_middle_keeps_what_was_released_and_what_was_held() {
    let dir = tempfile::tempdir().unwrap();
    let (f, s) = fleet_at_50(dir.path()).await;
    f.publish(&s.url, 100, 1.0).await;
    f.report(&s.url, "a0", 1, 100, ReportState::Success).await;
    f.report(&s.url, "b0", 1, 100, ReportState::Success).await;
    assert_eq!(served(&s.url, "a1").await, Some(100));
    s.stop().await;
    let s = Server::start(dir.path(), &f.publisher, Some(TOKEN)).await;
    assert_eq!(served(&s.url, "a1").await, Some(100));
    assert_eq!(
        served(&s.url, "a2").await,
        Some(50),
        "still held after the restart"
    );
    let doc = rollout(&s.url).await;
    assert_eq!(doc["rollout"]["waves"][0]["healthy"], 2, "{doc}");
    // The reports from before the restart still count: a1's success releases wave 2.
    f.report(&s.url, "a1", 1, 100, ReportState::Success).await;
    assert_eq!(served(&s.url, "a2").await, Some(100));
    s.stop().await;
}

#[tokio::test]
async fn a_newer_publish_supersedes_and_its_first_wave_goes_first() {
    let dir = tempfile::tempdir().unwrap();
    let (f, s) = fleet_at_50(dir.path()).await;
    f.publish(&s.url, 100, 1.0).await;
    f.publish(&s.url, 200, 1.0).await;
    assert_eq!(served(&s.url, "a0").await, Some(200));
    assert_eq!(served(&s.url, "a1").await, Some(50));
    // Reports about the superseded publish do not release anything.
    f.report(&s.url, "a0", 1, 100, ReportState::Success).await;
    f.report(&s.url, "b0", 1, 100, ReportState::Success).await;
    assert_eq!(served(&s.url, "a1").await, Some(50));
    assert_eq!(rollout(&s.url).await["rollout"]["id"], 200);
    f.report(&s.url, "a0", 2, 200, ReportState::Success).await;
    f.report(&s.url, "b0", 2, 200, ReportState::Success).await;
    assert_eq!(served(&s.url, "a1").await, Some(200), "never 100");
    s.stop().await;
}

#[tokio::test]
async fn an_upload_older_than_the_held_back_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (f, s) = fleet_at_50(dir.path()).await;
    f.publish(&s.url, 100, 1.0).await;
    let (st, e) = put(&s.url, "a2", f.envelope("a2", 60, None, 1.0)).await;
    assert_eq!((st, e["error"].as_str()), (409, Some("below_floor")), "{e}");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("not newer than the stored version 100")
            && message.contains("holds back for its wave"),
        "{e}"
    );
    s.stop().await;
}

#[tokio::test]
async fn an_offline_wave_zero_node_does_not_hold_back_the_next_wave_under_min_healthy_below_one() {
    let dir = tempfile::tempdir().unwrap();
    let (f, s) = fleet_at_50(dir.path()).await;
    // minHealthy 0.5 of wave 0's two nodes: one success is enough; b0 never reports.
    f.publish(&s.url, 100, 0.5).await;
    assert_eq!(served(&s.url, "a1").await, Some(50), "nothing reported yet");
    let doc = rollout(&s.url).await;
    assert_eq!(doc["rollout"]["waves"][0]["needed"], 1, "{doc}");
    f.report(&s.url, "a0", 1, 100, ReportState::Success).await;
    assert_eq!(served(&s.url, "a1").await, Some(100), "b0 is offline");
    let doc = rollout(&s.url).await;
    assert_eq!(doc["rollout"]["waves"][0]["pending"], 1, "{doc}");
    assert_eq!(doc["rollout"]["waves"][1]["released"], true, "{doc}");
    s.stop().await;
}

#[tokio::test]
async fn the_next_wave_waits_out_the_bake_time_and_is_then_released_without_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let (mut f, s) = fleet_at_50(dir.path()).await;
    f.bake_time_s = 2;
    f.publish(&s.url, 100, 1.0).await;
    f.report(&s.url, "a0", 1, 100, ReportState::Success).await;
    f.report(&s.url, "b0", 1, 100, ReportState::Success).await;
    assert_eq!(served(&s.url, "a1").await, Some(50), "baking");
    let doc = rollout(&s.url).await;
    let w0 = &doc["rollout"]["waves"][0];
    assert!(w0["threshold_met_at"].is_string(), "{doc}");
    let waiting = w0["waiting_for"].as_str().unwrap_or_default();
    assert!(waiting.contains("bake"), "{doc}");
    // The timer releases it: nothing else happens meanwhile.
    let mut released = None;
    for _ in 0..100 {
        if served(&s.url, "a1").await == Some(100) {
            released = Some(rollout(&s.url).await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let doc = released.expect("wave 1 released once the bake time passed");
    let r = &doc["rollout"];
    let met = r["waves"][0]["threshold_met_at"].as_str().unwrap();
    let out = r["waves"][1]["released_at"].as_str().unwrap();
    let secs = |t: &str| t.parse::<roost_common::Timestamp>().unwrap().unix();
    assert!(
        secs(out) >= secs(met) + 2,
        "released {out}, threshold met {met}: {doc}"
    );
    assert_eq!(served(&s.url, "a2").await, Some(50), "wave 2 waits for a1");
    s.stop().await;
}

#[tokio::test]
async fn the_fleet_and_the_metrics_show_each_nodes_wave_and_the_halted_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let (f, s) = fleet_at_50(dir.path()).await;
    f.publish(&s.url, 100, 1.0).await;
    f.report(&s.url, "a0", 1, 100, ReportState::Success).await;
    f.report(&s.url, "b0", 1, 100, ReportState::Success).await;
    f.report(&s.url, "a1", 1, 100, ReportState::Failed).await;
    let fleet: Value = reqwest::get(v1::fleet_url(&s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fleet["rollout"], rollout(&s.url).await["rollout"]);
    assert_eq!(fleet["rollout"]["state"], "halted", "{fleet}");
    let node = |n: &str| {
        fleet["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["node"] == n)
            .unwrap()
            .clone()
    };
    let a2 = node("a2");
    assert_eq!(a2["wave"], 2, "{a2}");
    assert_eq!(a2["desired_version"], 50, "served what it had: {a2}");
    assert_eq!(a2["rollout"]["version"], 100, "{a2}");
    assert_eq!(a2["rollout"]["released"], false, "{a2}");
    assert_eq!(a2["rollout"]["outcome"], "pending", "{a2}");
    assert_eq!(node("a1")["rollout"]["outcome"], "failed");
    assert_eq!(node("a0")["rollout"]["outcome"], "healthy");
    assert_eq!(node("a0")["rollout"]["released"], true);

    let metrics = reqwest::get(format!("{}/metrics", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "roost_node_wave{node=\"a2\"} 2",
        "roost_node_rollout_released{node=\"a2\"} 0",
        "roost_node_rollout_released{node=\"a1\"} 1",
        "roost_rollout_id 100",
        "roost_rollout_state{state=\"halted\"} 1",
        "roost_rollout_state{state=\"running\"} 0",
        "roost_rollout_halted 1",
        "roost_rollout_wave_released{wave=\"1\"} 1",
        "roost_rollout_wave_released{wave=\"2\"} 0",
        "roost_rollout_wave_nodes{wave=\"0\",outcome=\"healthy\"} 2",
        "roost_rollout_wave_nodes{wave=\"1\",outcome=\"failed\"} 1",
        "roost_rollout_wave_nodes{wave=\"2\",outcome=\"pending\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }
    // The dashboard shows the same rollout: its state, the halt, and wave 2 not released.
    let page = reqwest::get(format!("{}/", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("<span id=\"rollout-state\">halted</span>"),
        "{page}"
    );
    assert!(page.contains("<b>a1</b> failed: a1 broke"), "{page}");
    assert!(
        page.contains("<tr data-wave=\"2\"><td>2</td><td>1</td><td>no</td>"),
        "{page}"
    );
    assert!(
        page.contains("<a href=\"/nodes/a2\">a2</a></td><td>2 held</td>"),
        "{page}"
    );
    let page = reqwest::get(format!("{}/nodes/a2", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("wave 2 of rollout 100: version 100 held back until its wave is released"),
        "{page}"
    );
    s.stop().await;
}
