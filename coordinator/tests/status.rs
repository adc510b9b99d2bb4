//! `roost-coordinator status` against a coordinator running in-process.

use std::time::Duration;

use roost_common::wire::v1::http as v1;
use roost_common::wire::v1::{HealthResult, ReportState};
use roost_common::{SecretKey, TrustedKeys};
use roost_coordinator::serve::{Running, ServerConfig, start};

mod support;
use serde_json::{Value, json};
use support::{manifest, report_payload, seal_report, sealed};

const BIN: &str = env!("CARGO_BIN_EXE_roost-coordinator");

struct Fleet {
    _dir: tempfile::TempDir,
    server: Running,
    publisher: SecretKey,
}

impl Fleet {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let publisher = SecretKey::generate("pub").unwrap();
        let cfg = ServerConfig::new(dir.path(), TrustedKeys::new([publisher.public()], 1));
        let server = start("127.0.0.1:0".parse().unwrap(), cfg).await.unwrap();
        Self {
            _dir: dir,
            server,
            publisher,
        }
    }

    /// Publishes version 1 for `node` and returns its node key.
    async fn publish(&self, node: &str) -> SecretKey {
        let node_key = SecretKey::generate(node).unwrap();
        let env = sealed(&self.publisher, &manifest(node, 1, Some(&node_key)));
        let r = reqwest::Client::new()
            .put(v1::manifest_url(&self.server.url(), node))
            .body(env)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        node_key
    }

    async fn report(&self, node: &str, key: &SecretKey, state: ReportState, healthy: bool) {
        let mut r = report_payload(node, 1, state);
        r.health = vec![HealthResult {
            name: "command:true".into(),
            ok: healthy,
            detail: String::new(),
        }];
        let env = seal_report(&r, key);
        let resp = reqwest::Client::new()
            .post(v1::reports_url(&self.server.url(), node))
            .body(env)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    async fn status(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = tokio::process::Command::new(BIN)
            .arg("status")
            .args(["--coordinator", &self.server.url()])
            .args(args)
            .output()
            .await
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn line_of<'a>(table: &'a str, node: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(&format!("{node} ")))
        .unwrap_or_else(|| panic!("no line for {node} in\n{table}"))
}

#[tokio::test]
async fn a_healthy_fleet_is_a_table_and_exit_0() {
    let f = Fleet::new().await;
    for node in ["web", "pi-kitchen"] {
        let k = f.publish(node).await;
        f.report(node, &k, ReportState::Success, true).await;
    }
    let (code, out, err) = f.status(&[]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.lines().next().unwrap().starts_with("NODE"), "{out}");
    let web = line_of(&out, "web");
    for cell in ["1", "success"] {
        assert!(web.contains(cell), "{cell} missing in {web:?}");
    }
    // Reported a moment ago: "0 seconds ago", or "1 second ago" when the status command
    // runs just after a second boundary.
    assert!(
        web.contains(" seconds ago") || web.contains(" 1 second ago"),
        "last seen missing in {web:?}"
    );
    assert!(!web.contains("FAILED") && !web.contains("STALE"), "{web}");
    f.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_rolled_back_or_unhealthy_node_is_flagged_failed_and_exits_1() {
    let f = Fleet::new().await;
    let a = f.publish("a").await;
    f.report("a", &a, ReportState::Success, true).await;
    let b = f.publish("b").await;
    f.report("b", &b, ReportState::RolledBack, true).await;
    let c = f.publish("c").await;
    f.report("c", &c, ReportState::Success, false).await;
    let (code, out, _) = f.status(&[]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(!line_of(&out, "a").contains("FAILED"), "{out}");
    assert!(line_of(&out, "b").contains("FAILED"), "{out}");
    let c_line = line_of(&out, "c");
    assert!(
        c_line.contains("FAILED") && c_line.contains("a health check fails"),
        "{out}"
    );
    f.server.stop().await.unwrap();
}

#[tokio::test]
async fn a_node_silent_past_the_stale_limit_is_flagged_stale_and_exits_1() {
    let f = Fleet::new().await;
    let k = f.publish("quiet").await;
    f.report("quiet", &k, ReportState::Success, true).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (code, out, _) = f.status(&["--stale", "1s"]).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(line_of(&out, "quiet").contains("STALE"), "{out}");
    let (code, out, _) = f.status(&["--stale", "1h"]).await;
    assert_eq!(code, Some(0), "{out}");
    f.server.stop().await.unwrap();
}

#[tokio::test]
async fn json_gives_the_fleet_with_flags_and_ok() {
    let f = Fleet::new().await;
    let k = f.publish("n1").await;
    f.report("n1", &k, ReportState::Failed, true).await;
    let (code, out, _) = f.status(&["--json"]).await;
    assert_eq!(code, Some(1));
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["ok"], false);
    let n = &doc["nodes"][0];
    assert_eq!(n["node"], "n1");
    assert_eq!(n["state"], "failed");
    assert_eq!(n["desired_version"], 1);
    assert_eq!(n["flags"][0]["flag"], "failed");
    assert_eq!(n["flags"][0]["code"], "failed");
    f.server.stop().await.unwrap();
}

#[tokio::test]
async fn the_coordinator_url_comes_from_roost_coordinator_when_not_given() {
    let f = Fleet::new().await;
    let out = tokio::process::Command::new(BIN)
        .args(["status", "--json"])
        .env("ROOST_COORDINATOR", f.server.url())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["nodes"], json!([]));
    f.server.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_coordinator_exits_1_naming_the_url() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = tokio::process::Command::new(BIN)
        .args(["status", "--coordinator", &url])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&url), "{err}");
}

#[tokio::test]
async fn a_bad_stale_duration_is_bad_usage() {
    let out = tokio::process::Command::new(BIN)
        .args(["status", "--stale", "soonish"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test]
async fn a_bad_ca_certificate_or_coordinator_url_is_bad_usage_exit_2() {
    let f = Fleet::new().await;
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let missing = dir.path().join("missing.pem");
    for ca in [&not_pem, &missing] {
        let (code, _, err) = f.status(&["--ca-cert", &ca.display().to_string()]).await;
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(&ca.display().to_string()), "{err}");
    }
    let out = tokio::process::Command::new(BIN)
        .args(["status", "--coordinator", "roost.example.org:8080"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("roost.example.org:8080"));
    f.server.stop().await.unwrap();
}
