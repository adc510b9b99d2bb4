//! Every everyday mistake that used to leave nodes undeployed behind a green status: each is
//! made against a coordinator running in-process, and `roost-coordinator status` (the real
//! binary) must show the flag, the reason and exit 1. Also the table's revisions, one node
//! in full, `/metrics`' flags and read access control.

use std::time::Duration;

use roost_common::wire::v1::http as v1;
use roost_common::wire::v1::{Manifest, ReportError, ReportState, Source};
use roost_common::{SecretKey, Timestamp, Version};
use serde_json::Value;

mod support;
use support::{Server, post_report, put, report_payload, seal_report, sealed};

const BIN: &str = env!("CARGO_BIN_EXE_roost-coordinator");

struct Fleet {
    _dir: tempfile::TempDir,
    s: Server,
    publisher: SecretKey,
}

fn manifest_with(
    node: &str,
    version: u64,
    key: &SecretKey,
    adjust: impl FnOnce(&mut Manifest),
) -> Vec<u8> {
    let mut m: Manifest =
        serde_json::from_slice(&support::manifest(node, version, Some(key))).unwrap();
    adjust(&mut m);
    serde_json::to_vec(&m).unwrap()
}

fn rev(n: u8) -> Source {
    Source {
        flake: "git+file:///srv/fleet".into(),
        rev: Some(format!(
            "{n}{n}{n}{n}{n}{n}{n}{n}0123456789abcdef0123456789abcdef"
        )),
        dirty: false,
    }
}

impl Fleet {
    async fn new() -> Self {
        Self::configured(|_| {}).await
    }

    async fn configured(adjust: impl FnOnce(&mut roost_coordinator::serve::ServerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let publisher = SecretKey::generate("pub").unwrap();
        let s = Server::configured(dir.path(), &publisher, adjust).await;
        Self {
            _dir: dir,
            s,
            publisher,
        }
    }

    /// Publishes `version` of `node` (adjusted) and returns its node key.
    async fn publish(
        &self,
        node: &str,
        version: u64,
        adjust: impl FnOnce(&mut Manifest),
    ) -> SecretKey {
        let key = SecretKey::generate(node).unwrap();
        self.publish_with(node, version, &key, adjust).await;
        key
    }

    async fn publish_with(
        &self,
        node: &str,
        version: u64,
        key: &SecretKey,
        adjust: impl FnOnce(&mut Manifest),
    ) {
        let body = sealed(&self.publisher, &manifest_with(node, version, key, adjust));
        let (st, e) = put(&self.s.url, node, body).await;
        assert_eq!(st, 200, "{e}");
    }

    async fn report(
        &self,
        node: &str,
        key: &SecretKey,
        seq: u64,
        version: u64,
        state: ReportState,
        error: Option<(&str, &str)>,
    ) -> (u16, Value) {
        let mut r = report_payload(node, seq, state);
        r.manifest_version = Some(Version(version));
        r.error = error.map(|(phase, message)| ReportError {
            phase: phase.into(),
            message: message.into(),
        });
        post_report(&self.s.url, node, seal_report(&r, key)).await
    }

    async fn poll(&self, node: &str) -> u16 {
        reqwest::get(v1::manifest_url(&self.s.url, node))
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    async fn status(&self, args: &[&str]) -> (Option<i32>, String) {
        let out = tokio::process::Command::new(BIN)
            .arg("status")
            .args(["--coordinator", &self.s.url])
            .args(args)
            .env_remove("ROOST_READ_TOKEN_FILE")
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    /// `status --json`: the exit code and the node's entry.
    async fn entry(&self, node: &str, args: &[&str]) -> (Option<i32>, Value) {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let (code, out) = self.status(&a).await;
        let doc: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let n = doc["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == node)
            .unwrap_or_else(|| panic!("no {node} in {doc}"))
            .clone();
        (code, n)
    }
}

impl Fleet {
    /// `status --json ARGS` exits 1 and flags `node` with `flag`, whose code is `code` and
    /// whose reason says `says`; the node's entry.
    async fn flagged(
        &self,
        node: &str,
        args: &[&str],
        flag_: &str,
        code: &str,
        says: &str,
    ) -> Value {
        let (exit, n) = self.entry(node, args).await;
        assert_eq!(exit, Some(1), "{n}");
        let f = flag(&n, flag_);
        assert_eq!(f["code"], code, "{f}");
        assert!(f["reason"].as_str().unwrap().contains(says), "{f}");
        n
    }
}

fn line_of<'a>(table: &'a str, node: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(&format!("{node} ")))
        .unwrap_or_else(|| panic!("no line for {node} in\n{table}"))
}

fn flag<'a>(n: &'a Value, name: &str) -> &'a Value {
    n["flags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["flag"] == name)
        .unwrap_or_else(|| panic!("no {name} flag in {n}"))
}

#[tokio::test]
async fn a_wrong_node_key_is_refused_with_the_check_that_failed_and_exits_1() {
    let f = Fleet::new().await;
    let _real = f.publish("web", 1, |_| {}).await;
    let rotated = SecretKey::generate("web").unwrap();
    let (st, _) = f
        .report("web", &rotated, 1, 1, ReportState::Success, None)
        .await;
    assert_eq!(st, 403);
    let n = f
        .flagged(
            "web",
            &[],
            "refused",
            "bad_signature",
            "not signed by its node key",
        )
        .await;
    assert_eq!(n["refusal"]["active"], true);
    let (code, table) = f.status(&[]).await;
    assert_eq!(code, Some(1));
    let line = line_of(&table, "web");
    assert!(
        line.contains("REFUSED") && line.contains("bad_signature"),
        "{table}"
    );
    f.s.stop().await;
}

#[tokio::test]
async fn an_accepted_report_ends_the_refused_flag() {
    let f = Fleet::new().await;
    let key = f.publish("web", 1, |_| {}).await;
    let other = SecretKey::generate("web").unwrap();
    f.report("web", &other, 1, 1, ReportState::Success, None)
        .await;
    let (st, e) = f
        .report("web", &key, 2, 1, ReportState::Success, None)
        .await;
    assert_eq!(st, 200, "{e}");
    let (code, n) = f.entry("web", &[]).await;
    assert_eq!(
        (code, n["flags"].clone()),
        (Some(0), serde_json::json!([])),
        "{n}"
    );
    assert_eq!(
        n["refusal"]["active"], false,
        "the refusal is kept as history"
    );
    f.s.stop().await;
}

#[tokio::test]
async fn a_name_that_polls_without_a_manifest_is_unknown_and_exits_1() {
    let f = Fleet::new().await;
    let k = f.publish("web", 1, |_| {}).await;
    f.report("web", &k, 1, 1, ReportState::Success, None).await;
    assert_eq!(f.poll("web-typo").await, 404);
    assert_eq!(f.poll("web-typo").await, 404);
    let n = f
        .flagged("web-typo", &[], "unknown", "no_manifest", "2 request(s)")
        .await;
    assert_eq!(n["unknown"]["requests"], 2);
    let (_, table) = f.status(&[]).await;
    assert!(line_of(&table, "web-typo").contains("UNKNOWN"), "{table}");
    assert!(!line_of(&table, "web").contains("UNKNOWN"), "{table}");
    // Publishing for the name makes it a node like any other.
    f.publish("web-typo", 1, |_| {}).await;
    let (_, n) = f.entry("web-typo", &[]).await;
    assert!(n.get("unknown").is_none(), "{n}");
    f.s.stop().await;
}

#[tokio::test]
async fn a_node_deferred_for_ever_is_stuck_with_the_agents_error_and_exits_1() {
    let f = Fleet::new().await;
    let k = f.publish("pi", 2, |_| {}).await;
    let why = "cannot substitute /nix/store/…-sys: path is not signed by any trusted key";
    let deferred = ReportState::Deferred;
    f.report("pi", &k, 1, 2, deferred, Some(("realise", why)))
        .await;
    // Within the limit it is only a deploy under way.
    let (code, n) = f.entry("pi", &[]).await;
    assert_eq!(code, Some(0), "{n}");
    f.flagged("pi", &["--stuck", "0s"], "stuck", "deferred", why)
        .await;
    let (_, table) = f.status(&["--stuck", "0s"]).await;
    assert!(line_of(&table, "pi").contains("STUCK"), "{table}");
    f.s.stop().await;
}

#[tokio::test]
async fn a_node_refusing_its_manifest_is_refused_with_why_and_exits_1() {
    let f = Fleet::new().await;
    let k = f.publish("lap", 3, |_| {}).await;
    let why = "manifest refused (bad_signature): not signed by 1 of the trusted keys";
    let rejected = ReportState::Rejected;
    f.report("lap", &k, 1, 2, rejected, Some(("verify", why)))
        .await;
    let refused = "the node refused its manifest";
    let n = f
        .flagged("lap", &[], "refused", "bad_signature", refused)
        .await;
    assert_eq!(n["rejection"]["message"], why);
    // Kept when the node reports something else afterwards without converging.
    f.report("lap", &k, 2, 2, ReportState::Idle, None).await;
    f.flagged("lap", &[], "refused", "bad_signature", refused)
        .await;
    f.s.stop().await;
}

#[tokio::test]
async fn a_manifest_expiring_within_the_limit_is_expiring_and_past_it_expired() {
    let f = Fleet::new().await;
    let k = f
        .publish("srv", 1, |m| {
            m.expires_at = Timestamp::now().plus(Duration::from_secs(2 * 86400))
        })
        .await;
    f.report("srv", &k, 1, 1, ReportState::Success, None).await;
    let (code, n) = f.entry("srv", &[]).await;
    assert_eq!(code, Some(1));
    let e = flag(&n, "expiring")["reason"].as_str().unwrap();
    assert!(e.contains("in 47 hours") || e.contains("in 2 days"), "{e}");
    let (code, _) = f.status(&["--expiring", "1d"]).await;
    assert_eq!(code, Some(0), "two days left is fine with a one-day limit");
    // Uploaded with two seconds left, then expired.
    let k2 = f
        .publish("old", 1, |m| {
            m.expires_at = Timestamp::now().plus(Duration::from_secs(2))
        })
        .await;
    f.report("old", &k2, 1, 1, ReportState::Success, None).await;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    f.flagged("old", &[], "expired", "expiry", "publish again")
        .await;
    f.s.stop().await;
}

#[tokio::test]
async fn the_table_names_desired_and_reported_revisions_and_the_last_error() {
    let f = Fleet::new().await;
    let k = f.publish("web", 1, |m| m.source = Some(rev(1))).await;
    f.report("web", &k, 1, 1, ReportState::Success, None).await;
    f.publish_with("web", 2, &k, |m| m.source = Some(rev(2)))
        .await;
    f.report(
        "web",
        &k,
        2,
        2,
        ReportState::RolledBack,
        Some(("confirm", "health check http:8080 failed")),
    )
    .await;
    f.publish_with("web", 3, &k, |m| {
        m.source = Some(Source {
            dirty: true,
            ..rev(3)
        })
    })
    .await;
    let (code, table) = f.status(&[]).await;
    assert_eq!(code, Some(1), "{table}");
    let line = line_of(&table, "web");
    // Desired: version 3, dirty; reported: version 2's revision, from the coordinator's record.
    assert!(
        line.contains("3333333+") && line.contains("2222222 "),
        "{table}"
    );
    assert!(line.contains("health check http:8080 failed"), "{table}");
    let (_, n) = f.entry("web", &[]).await;
    assert_eq!(n["reported_source"]["rev"], rev(2).rev.unwrap());
    f.s.stop().await;
}

#[tokio::test]
async fn status_node_shows_it_in_full_with_its_report_history() {
    let f = Fleet::new().await;
    let k = f.publish("pi", 1, |m| m.source = Some(rev(4))).await;
    f.report("pi", &k, 1, 1, ReportState::Downloading, None)
        .await;
    f.report(
        "pi",
        &k,
        2,
        1,
        ReportState::Failed,
        Some(("activate", "switch-to-configuration exited 4")),
    )
    .await;
    let (code, out) = f.status(&["pi"]).await;
    assert_eq!(code, Some(1), "{out}");
    for want in [
        "44444444",
        "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-sys",
        "FAILED",
        "switch-to-configuration exited 4",
        "report history (2 shown",
        "downloading",
    ] {
        assert!(out.contains(want), "{want} missing in\n{out}");
    }
    let (code, out) = f.status(&["pi", "--json"]).await;
    assert_eq!(code, Some(1));
    let doc: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["reports"].as_array().unwrap().len(), 2);
    assert_eq!(doc["reports"][0]["state"], "failed");
    assert_eq!(doc["ok"], false);
    let (code, out) = f.status(&["nobody"]).await;
    assert_eq!(code, Some(1));
    assert!(out.contains("knows no node `nobody`"), "{out}");
    f.s.stop().await;
}

#[tokio::test]
async fn metrics_carry_every_flag_with_its_code() {
    let f = Fleet::new().await;
    f.publish("web", 1, |_| {}).await;
    let rotated = SecretKey::generate("web").unwrap();
    f.report("web", &rotated, 1, 1, ReportState::Success, None)
        .await;
    f.poll("ghost").await;
    let text = reqwest::get(format!("{}/metrics", f.s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for want in [
        "roost_node_flag{node=\"web\",flag=\"refused\",code=\"bad_signature\"} 1",
        "roost_node_flag{node=\"ghost\",flag=\"unknown\",code=\"no_manifest\"} 1",
        "roost_nodes_flagged{flag=\"refused\"} 1",
        "roost_nodes_flagged{flag=\"stuck\"} 0",
    ] {
        assert!(text.contains(want), "{want} missing in\n{text}");
    }
    f.s.stop().await;
}

#[tokio::test]
async fn the_fleets_data_needs_a_read_token_unless_public_and_agents_need_none() {
    let token = "read-token-0123456789";
    let f = Fleet::configured(|c| {
        c.public_read = false;
        c.read_token = Some(token.into());
    })
    .await;
    let k = f.publish("web", 1, |_| {}).await;
    // The agent's side: polls and reports, no token.
    assert_eq!(f.poll("web").await, 200);
    let (st, _) = f.report("web", &k, 1, 1, ReportState::Success, None).await;
    assert_eq!(st, 200);
    let c = reqwest::Client::new();
    for path in [
        v1::fleet_url(&f.s.url),
        format!("{}/metrics", f.s.url),
        v1::report_history_url(&f.s.url, "web", 5),
    ] {
        let r = c.get(&path).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Basic")
        );
        let wrong = c
            .get(&path)
            .bearer_auth("wrong-token-0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path}");
        let ok = c.get(&path).bearer_auth(token).send().await.unwrap();
        assert_eq!(ok.status(), 200, "{path}");
        let basic = c
            .get(&path)
            .basic_auth("me", Some(token))
            .send()
            .await
            .unwrap();
        assert_eq!(basic.status(), 200, "{path}");
    }
    let (code, out) = f.status(&[]).await;
    assert_eq!(code, Some(1));
    assert!(out.contains("401") && out.contains("--token-file"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("read-token");
    std::fs::write(&file, format!("{token}\n")).unwrap();
    let (code, out) = f
        .status(&["--token-file", &file.display().to_string()])
        .await;
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = f.status(&["--token-file", "/nonexistent/token"]).await;
    assert_eq!(code, Some(2), "{out}");
    f.s.stop().await;
}
