//! `roost-coordinator serve` over real HTTP: ETags and long-poll, upload and report rules,
//! the embedded cache against real Nix, traversal attempts, and restarts.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use roost_common::envelope::{Context, Envelope};
use roost_common::wire::v1::http as v1;
use roost_common::{SecretKey, TrustedKeys};
use roost_coordinator::serve::ServerConfig;
use roost_preflight::{require, tools};

mod support;
use serde_json::{Value, json};
use support::{Server, header, manifest, post_report, put, read_response, report, sealed};

/// A server on a fresh state folder with a manifest of version `v` stored for `n1`
/// (naming `node_key`, if given).
async fn serving_n1(
    v: u64,
    node_key: Option<&SecretKey>,
) -> (tempfile::TempDir, SecretKey, Server) {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let s = Server::start(dir.path(), &key, None).await;
    put(&s.url, "n1", sealed(&key, &manifest("n1", v, node_key))).await;
    (dir, key, s)
}

#[tokio::test]
async fn etag_round_trip_gives_200_then_304() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let s = Server::start(dir.path(), &key, None).await;
    let c = reqwest::Client::new();
    let missing = c.get(v1::manifest_url(&s.url, "n1")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(
        missing.json::<Value>().await.unwrap()["error"],
        "unknown_node"
    );
    let body = sealed(&key, &manifest("n1", 5, None));
    assert_eq!(put(&s.url, "n1", body.clone()).await.0, 200);
    let r = c.get(v1::manifest_url(&s.url, "n1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(
        r.bytes().await.unwrap().to_vec(),
        body,
        "the exact uploaded bytes are served"
    );
    let r = c
        .get(v1::manifest_url(&s.url, "n1"))
        .header("If-None-Match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    s.stop().await;
}

#[tokio::test]
async fn long_poll_is_answered_by_a_put_long_before_wait_expires() {
    let (_dir, key, s) = serving_n1(1, None).await;
    let etag = "\"1\"";
    let mut waiters = Vec::new();
    for _ in 0..50 {
        let url = v1::long_poll_url(&s.url, "n1", 60);
        waiters.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .get(url)
                .header("If-None-Match", etag)
                .send()
                .await
                .unwrap();
            (
                Instant::now(),
                r.status().as_u16(),
                r.bytes().await.unwrap(),
            )
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for w in &waiters {
        assert!(
            !w.is_finished(),
            "a long-poll returned before anything changed"
        );
    }
    let newer = sealed(&key, &manifest("n1", 2, None));
    let put_at = Instant::now();
    assert_eq!(put(&s.url, "n1", newer.clone()).await.0, 200);
    for w in waiters {
        let (at, status, body) = w.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body.to_vec(), newer);
        // Woken by the PUT, not by the 60 s wait running out.
        assert!(at.duration_since(put_at) < Duration::from_secs(30));
    }
    s.stop().await;
}

#[tokio::test]
async fn long_poll_without_change_ends_in_304_after_wait() {
    let (_dir, _key, s) = serving_n1(1, None).await;
    let r = reqwest::Client::new()
        .get(v1::long_poll_url(&s.url, "n1", 1))
        .header("If-None-Match", "\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    s.stop().await;
}

#[tokio::test]
async fn uploads_are_refused_for_bad_signature_unknown_key_node_mismatch_and_old_versions() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let s = Server::start(dir.path(), &key, None).await;
    assert_eq!(
        put(&s.url, "n1", sealed(&key, &manifest("n1", 10, None)))
            .await
            .0,
        200
    );

    let mut bad: Envelope =
        serde_json::from_slice(&sealed(&key, &manifest("n1", 11, None))).unwrap();
    bad.signatures[0].sig = Envelope::seal(Context::Manifest, b"other", &[&key]).signatures[0]
        .sig
        .clone();
    let (st, e) = put(&s.url, "n1", bad.to_bytes()).await;
    assert_eq!((st, e["error"].as_str()), (403, Some("bad_signature")));

    let stranger = SecretKey::generate("stranger").unwrap();
    let (st, e) = put(&s.url, "n1", sealed(&stranger, &manifest("n1", 11, None))).await;
    assert_eq!((st, e["error"].as_str()), (403, Some("bad_signature")));
    assert!(e["message"].as_str().unwrap().contains("stranger"));

    let (st, e) = put(&s.url, "n2", sealed(&key, &manifest("n1", 11, None))).await;
    assert_eq!((st, e["error"].as_str()), (400, Some("node_mismatch")));

    for v in [10, 9] {
        let (st, e) = put(&s.url, "n1", sealed(&key, &manifest("n1", v, None))).await;
        assert_eq!(st, 409, "version {v}");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains(&v.to_string()) && msg.contains("10"), "{msg}");
    }
    // Nothing of the refused uploads is served.
    let r = reqwest::get(v1::manifest_url(&s.url, "n1")).await.unwrap();
    assert_eq!(r.headers()["etag"], "\"10\"");
    s.stop().await;
}

#[tokio::test]
async fn racing_uploads_of_one_version_cannot_both_win() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let s = Server::start(dir.path(), &key, None).await;
    let mut tasks = Vec::new();
    for i in 0..20u64 {
        let url = s.url.clone();
        // Same version, different content each time.
        let mut p: Value = serde_json::from_slice(&manifest("n1", 7, None)).unwrap();
        p["profiles"][0]["path"] = json!(format!(
            "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-sys{i}"
        ));
        let body = sealed(&key, &serde_json::to_vec(&p).unwrap());
        tasks.push(tokio::spawn(async move { put(&url, "n1", body).await.0 }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap() == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 1);
    s.stop().await;
}

#[tokio::test]
async fn reports_are_refused_for_wrong_key_replayed_seq_and_unknown_node() {
    let node_key = SecretKey::generate("n1").unwrap();
    let (_dir, _key, s) = serving_n1(1, Some(&node_key)).await;

    assert_eq!(
        post_report(&s.url, "n1", report("n1", 1, &node_key, false))
            .await
            .0,
        200
    );
    let other = SecretKey::generate("n1").unwrap();
    let (st, e) = post_report(&s.url, "n1", report("n1", 2, &other, true)).await;
    assert_eq!((st, e["error"].as_str()), (403, Some("bad_signature")));
    let (st, e) = post_report(&s.url, "n1", report("n1", 1, &node_key, false)).await;
    assert_eq!((st, e["error"].as_str()), (409, Some("seq_not_increasing")));
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 2, &node_key, false))
            .await
            .0,
        200
    );
    let (st, e) = post_report(&s.url, "ghost", report("ghost", 1, &node_key, false)).await;
    assert_eq!((st, e["error"].as_str()), (404, Some("unknown_node")));

    let fleet: Value = reqwest::get(v1::fleet_url(&s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The ghost is listed too, as a name without a manifest.
    let nodes = fleet["nodes"].as_array().unwrap();
    let ghost = nodes.iter().find(|n| n["node"] == "ghost").unwrap();
    assert_eq!(ghost["flags"][0]["flag"], "unknown", "{ghost}");
    let n1 = nodes.iter().find(|n| n["node"] == "n1").unwrap();
    assert_eq!(n1["last_seq"], 2);
    assert_eq!(n1["state"], "success");
    assert_eq!(n1["key_source"], "manifest");
    s.stop().await;
}

#[tokio::test]
async fn without_node_key_the_first_report_pins_its_key() {
    let (_dir, _key, s) = serving_n1(1, None).await;
    let first = SecretKey::generate("n1").unwrap();
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 1, &first, true))
            .await
            .0,
        200
    );
    let intruder = SecretKey::generate("n1").unwrap();
    let (st, _) = post_report(&s.url, "n1", report("n1", 2, &intruder, true)).await;
    assert_eq!(st, 403, "a later report with another key is refused");
    let fleet: Value = reqwest::get(v1::fleet_url(&s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fleet["nodes"][0]["key_source"], "tofu");
    assert_eq!(fleet["nodes"][0]["node_key"], first.public().to_string());
    s.stop().await;
}

#[tokio::test]
async fn errors_are_json_and_bodies_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let s = Server::start(dir.path(), &key, None).await;
    let (st, e) = put(&s.url, "n1", vec![b' '; 300 * 1024]).await;
    assert_eq!(st, 413);
    assert!(e["error"].is_string() && e["message"].is_string());
    let r = reqwest::get(format!("{}/nope", s.url)).await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "not_found");
    let (st, e) = put(&s.url, "..", sealed(&key, &manifest("n1", 1, None))).await;
    assert!(st == 400 || st == 404, "{st} {e}");
    // Answers that axum makes on its own are JSON too.
    put(&s.url, "n1", sealed(&key, &manifest("n1", 1, None))).await;
    let r = reqwest::get(format!("{}/v1/nodes/n1/manifest?wait=soon", s.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "bad_request");
    let r = reqwest::Client::new()
        .delete(v1::manifest_url(&s.url, "n1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "method_not_allowed"
    );
    let (st, e) = post_report(&s.url, "n1", vec![b'x'; 65 * 1024]).await;
    assert_eq!((st, e["error"].as_str()), (413, Some("too_large")));
    s.stop().await;
}

#[tokio::test]
async fn cache_traversal_attempts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let token = "0123456789abcdef0123";
    let s = Server::start(dir.path(), &key, Some(token)).await;
    std::fs::write(dir.path().join("secret.txt"), "do not serve").unwrap();
    for raw in [
        "../secret.txt",
        "nar/../../secret.txt",
        "%2fetc%2fpasswd",
        "%2e%2e/secret.txt",
        "..%2fsecret.txt",
        "nar/%2e%2e/%2e%2e/secret.txt",
        "%2E%2E%2Fcoordinator.sqlite",
        "nar%2F..%2F..%2Fsecret.txt",
    ] {
        let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Raw request line: no client-side normalisation of the path.
        stream
            .write_all(
                format!(
                    "GET {}/{raw} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    v1::cache_url("")
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let mut resp = String::new();
        stream.read_to_string(&mut resp).await.unwrap();
        assert!(
            resp.starts_with("HTTP/1.1 400") || resp.starts_with("HTTP/1.1 404"),
            "{raw}: {resp}"
        );
        assert!(!resp.contains("do not serve"));
        let r = reqwest::Client::new()
            .put(format!("{}/{raw}", v1::cache_url(&s.url)))
            .basic_auth("roost", Some(token))
            .body("overwritten")
            .send()
            .await
            .unwrap();
        assert!(
            r.status() == 400 || r.status() == 404,
            "{raw}: {}",
            r.status()
        );
    }
    assert_eq!(
        std::fs::read_to_string(dir.path().join("secret.txt")).unwrap(),
        "do not serve"
    );
    s.stop().await;
}

fn sh(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn build_fixture(tag: &str) -> String {
    let expr = format!(
        r#"derivation {{ name = "roost-serve-fixture"; system = builtins.currentSystem; builder = "/bin/sh";
            args = [ "-c" "mkdir $out; echo {tag} > $out/data" ]; PATH = "/usr/bin:/bin"; }}"#
    );
    let out =
        sh(Command::new("nix").args(["build", "--impure", "--json", "--no-link", "--expr", &expr]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["outputs"]["out"].as_str().unwrap().to_owned()
}

fn netrc(dir: &Path, token: &str) -> PathBuf {
    let p = dir.join("netrc");
    std::fs::write(
        &p,
        format!("machine 127.0.0.1 login roost password {token}\n"),
    )
    .unwrap();
    p
}

#[tokio::test(flavor = "multi_thread")]
async fn nix_copy_to_the_cache_needs_the_token_and_substitutes_into_an_empty_store() {
    require!(tools(&["nix", "nix-store"]));
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let token = "nix-copy-token-0123456789";
    let s = Server::start(&dir.path().join("state"), &key, Some(token)).await;
    let cache_key = SecretKey::generate("test-cache-1").unwrap();
    let cache_sk = dir.path().join("cache.sec");
    cache_key.write_new_file(&cache_sk).unwrap();
    let path = build_fixture(&format!("{:?}{}", Instant::now(), std::process::id()));
    sh(Command::new("nix")
        .args(["store", "sign", "--key-file"])
        .arg(&cache_sk)
        .arg(&path));
    let cache_url = v1::cache_url(&s.url);

    let without = tokio::task::spawn_blocking({
        let (cache_url, path) = (cache_url.clone(), path.clone());
        move || {
            Command::new("nix")
                .args(["copy", "--to", &cache_url, &path])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        !without.status.success(),
        "an upload without the token must fail"
    );

    let wrong = netrc(&dir.path().join("."), "not-the-token-at-all");
    let with_wrong = tokio::task::spawn_blocking({
        let (cache_url, path, wrong) = (cache_url.clone(), path.clone(), wrong.clone());
        move || {
            Command::new("nix")
                .args(["copy", "--to", &cache_url, &path, "--option", "netrc-file"])
                .arg(&wrong)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        !with_wrong.status.success(),
        "an upload with a wrong token must fail"
    );

    let good = netrc(dir.path(), token);
    tokio::task::spawn_blocking({
        let (cache_url, path) = (cache_url.clone(), path.clone());
        move || {
            sh(Command::new("nix")
                .args(["copy", "--to", &cache_url, &path, "--option", "netrc-file"])
                .arg(&good))
        }
    })
    .await
    .unwrap();

    // Into an empty store, trusting only the cache's key.
    let store = dir.path().join("empty-store");
    let out = tokio::task::spawn_blocking({
        let (cache_url, path, store, pk) = (
            cache_url.clone(),
            path.clone(),
            store.clone(),
            cache_key.public().to_string(),
        );
        move || {
            Command::new("nix")
                .args(["copy", "--from", &cache_url, &path, "--to"])
                .arg(&store)
                .args([
                    "--option",
                    "trusted-public-keys",
                    &pk,
                    "--option",
                    "require-sigs",
                    "true",
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rel = path.trim_start_matches('/');
    assert!(store.join(rel).join("data").exists());

    // With another key trusted instead, substitution is refused.
    let other = SecretKey::generate("other-cache")
        .unwrap()
        .public()
        .to_string();
    let store2 = dir.path().join("empty-store-2");
    let out = tokio::task::spawn_blocking({
        let (cache_url, path, store2) = (cache_url.clone(), path.clone(), store2.clone());
        move || {
            Command::new("nix")
                .args(["copy", "--from", &cache_url, &path, "--to"])
                .arg(&store2)
                .args([
                    "--option",
                    "trusted-public-keys",
                    &other,
                    "--option",
                    "require-sigs",
                    "true",
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    s.stop().await;
}

#[tokio::test]
async fn a_restart_on_the_same_state_serves_the_same_manifests_reports_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let node_key = SecretKey::generate("n1").unwrap();
    let token = "restart-token-0123456789";
    let s = Server::start(dir.path(), &key, Some(token)).await;
    let body = sealed(&key, &manifest("n1", 3, Some(&node_key)));
    put(&s.url, "n1", body.clone()).await;
    post_report(&s.url, "n1", report("n1", 4, &node_key, false)).await;
    let r = reqwest::Client::new()
        .put(format!("{}/abc.narinfo", v1::cache_url(&s.url)))
        .bearer_auth(token)
        .body("StorePath: x\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let addr = s.addr;
    s.stop().await;

    let s = Server::start_on(dir.path(), &key, Some(token), addr).await;
    assert_eq!(sealed_bytes_of(&s, "n1").await, body);
    let fleet: Value = reqwest::get(v1::fleet_url(&s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fleet["nodes"][0]["last_seq"], 4);
    assert_eq!(
        reqwest::get(format!("{}/abc.narinfo", v1::cache_url(&s.url)))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "StorePath: x\n"
    );
    // The seq floor survived too.
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 4, &node_key, false))
            .await
            .0,
        409
    );
    s.stop().await;
}

#[tokio::test]
async fn metrics_expose_versions_states_and_request_counters() {
    let node_key = SecretKey::generate("n1").unwrap();
    let (_dir, _key, s) = serving_n1(3, Some(&node_key)).await;
    post_report(&s.url, "n1", report("n1", 1, &node_key, false)).await;
    let text = metrics_text(&s).await;
    assert!(
        text.contains("roost_node_desired_version{node=\"n1\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("roost_node_reported_version{node=\"n1\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("roost_node_state{node=\"n1\",state=\"success\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "roost_http_requests_total{{route=\"PUT {}\",status=\"200\"}} 1",
            v1::route::MANIFEST
        )),
        "{text}"
    );
    s.stop().await;
}

#[tokio::test]
async fn report_history_lists_a_nodes_reports_newest_first() {
    let node_key = SecretKey::generate("n1").unwrap();
    let (_dir, _key, s) = serving_n1(1, Some(&node_key)).await;
    for seq in [3, 5, 9] {
        assert_eq!(
            post_report(&s.url, "n1", report("n1", seq, &node_key, false))
                .await
                .0,
            200
        );
    }
    let h: Value = reqwest::get(v1::report_history_url(&s.url, "n1", 2))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seqs: Vec<u64> = h["reports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![9, 5]);
    s.stop().await;
}

#[tokio::test]
async fn a_new_node_key_in_the_manifest_starts_a_new_report_sequence() {
    let old_key = SecretKey::generate("n1").unwrap();
    let (_dir, key, s) = serving_n1(1, Some(&old_key)).await;
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 50, &old_key, false))
            .await
            .0,
        200
    );
    // The node is reinstalled with a fresh key and state; the publisher names the new key.
    let new_key = SecretKey::generate("n1").unwrap();
    put(
        &s.url,
        "n1",
        sealed(&key, &manifest("n1", 2, Some(&new_key))),
    )
    .await;
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 1, &new_key, false))
            .await
            .0,
        200
    );
    let (st, _) = post_report(&s.url, "n1", report("n1", 51, &old_key, false)).await;
    assert_eq!(st, 403, "the old key is no longer trusted");
    let (st, _) = post_report(&s.url, "n1", report("n1", 1, &new_key, false)).await;
    assert_eq!(st, 409, "within one key, seq must still increase");
    s.stop().await;
}

#[tokio::test]
async fn a_client_that_stalls_in_its_request_head_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let mut cfg = ServerConfig::new(dir.path(), TrustedKeys::new([key.public()], 1));
    cfg.header_timeout = Duration::from_secs(1);
    let s = Server::with_config(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stream
        .write_all(format!("GET {} HTTP/1.1\r\n", v1::route::FLEET).as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    // Without the header timeout this read would wait forever.
    let read = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server kept a stalled connection open");
    s.stop().await;
}

#[tokio::test]
async fn an_upload_whose_body_stalls_gets_408_and_stores_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let mut cfg = ServerConfig::new(dir.path(), TrustedKeys::new([key.public()], 1));
    cfg.body_timeout = Duration::from_secs(1);
    let s = Server::with_config(cfg, "127.0.0.1:0".parse().unwrap()).await;
    let body = sealed(&key, &manifest("n1", 1, None));
    let mut stream = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stream
        .write_all(
            format!(
                "PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                v1::manifest_path("n1"),
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream.write_all(&body[..10]).await.unwrap();
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf))
        .await
        .expect("the server kept waiting for the body")
        .unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]);
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("\"error\":\"timeout\""), "{resp}");
    let r = reqwest::get(v1::manifest_url(&s.url, "n1")).await.unwrap();
    assert_eq!(r.status(), 404);
    s.stop().await;
}

#[tokio::test]
async fn shutdown_answers_held_long_polls_and_stops() {
    let (_dir, _key, s) = serving_n1(1, None).await;
    let url = v1::long_poll_url(&s.url, "n1", 300);
    let poll = tokio::spawn(async move {
        reqwest::Client::new()
            .get(url)
            .header("If-None-Match", "\"1\"")
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!poll.is_finished());
    // Far below the 300 s wait and the 30 s grace: the held poll is answered at once.
    tokio::time::timeout(Duration::from_secs(25), s.stop())
        .await
        .expect("shutdown waited for the long-poll");
    assert_eq!(poll.await.unwrap().unwrap(), 304);
}

/// A test CA and a certificate for 127.0.0.1 signed by it, made with the openssl command:
/// (CA file, certificate, key).
fn test_certificate(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let script = r#"set -e
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
openssl req -x509 $ec -days 2 -subj /CN=roost-test-ca -keyout ca.key -out ca.pem
openssl req $ec -subj /CN=127.0.0.1 -keyout key.pem -out leaf.csr
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext
openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -out cert.pem -extfile ext
"#;
    sh(Command::new("sh").args(["-c", script]).current_dir(dir));
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}

#[tokio::test]
async fn tls_serves_the_api_over_https() {
    let dir = tempfile::tempdir().unwrap();
    require!(tools(&["openssl"]));
    let (ca, cert, tls_key) = test_certificate(dir.path());
    let key = SecretKey::generate("pub").unwrap();
    let cfg = ServerConfig::new(
        dir.path().join("state"),
        TrustedKeys::new([key.public()], 1),
    );
    let tls = roost_coordinator::serve::load_tls(&cert, &tls_key)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(roost_coordinator::serve::serve_tls(
        listener,
        tls,
        cfg,
        async move {
            let _ = rx.await;
        },
    ));
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let body = sealed(&key, &manifest("n1", 1, None));
    let r = client
        .put(format!("https://{addr}/v1/nodes/n1/manifest"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("https://{addr}/v1/nodes/n1/manifest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().to_vec(), body);
    // Plain HTTP on the TLS port gets no manifest.
    assert!(
        reqwest::get(format!("http://{addr}/v1/nodes/n1/manifest"))
            .await
            .is_err()
    );
    let _ = tx.send(());
    task.await.unwrap().unwrap();
}

async fn raw_get(s: &mut tokio::net::TcpStream, target: &str, extra: &str) {
    use tokio::io::AsyncWriteExt;
    let req = format!("GET {target} HTTP/1.1\r\nHost: x\r\n{extra}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
}

fn without_date(mut lines: Vec<String>) -> Vec<String> {
    lines.retain(|l| !l.starts_with("date:"));
    lines.sort();
    lines
}

#[tokio::test]
async fn the_front_answers_polls_exactly_as_the_router_does() {
    let (_dir, _key, s) = serving_n1(3, None).await;
    // `n%31` is `n1` to axum; the front leaves anything percent-encoded to it.
    for extra in ["", "If-None-Match: \"3\"\r\n"] {
        let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        raw_get(&mut c, &v1::manifest_path("n1"), extra).await;
        let front = read_response(&mut c).await.unwrap();
        let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        raw_get(&mut c, "/v1/nodes/n%31/manifest", extra).await;
        let router = read_response(&mut c).await.unwrap();
        assert!(header(&front.0, "date").is_some(), "{:?}", front.0);
        assert_eq!(without_date(front.0), without_date(router.0), "{extra}");
        assert_eq!(front.1, router.1);
    }
    s.stop().await;
}

#[tokio::test]
async fn the_front_sends_cache_files_exactly_as_the_router_does() {
    let (dir, _key, s) = serving_n1(1, None).await;
    let nar: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(dir.path().join("cache/nar/x.nar"), &nar).unwrap();
    std::fs::write(dir.path().join("cache/abc.narinfo"), "StorePath: x\n").unwrap();
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    // The absolute form of the same target is left to the router.
    for file in [
        "nar/x.nar",
        "abc.narinfo",
        "nar/missing.nar",
        "nix-cache-info",
    ] {
        raw_get(&mut c, &format!("/cache/{file}"), "").await;
        let front = read_response(&mut c).await.unwrap();
        raw_get(&mut c, &format!("http://x/cache/{file}"), "").await;
        let router = read_response(&mut c).await.unwrap();
        assert!(header(&front.0, "date").is_some(), "{:?}", front.0);
        assert_eq!(without_date(front.0), without_date(router.0), "{file}");
        assert!(front.1 == router.1, "{file}: the bodies differ");
    }
    raw_get(&mut c, "/cache/nar/x.nar", "").await;
    assert!(
        read_response(&mut c).await.unwrap().1 == nar,
        "kept alive, and the whole file"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_poll_connection_is_kept_alive_through_other_requests_and_pipelining() {
    use tokio::io::AsyncWriteExt;
    let (_dir, key, s) = serving_n1(1, None).await;
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    raw_get(&mut c, &v1::manifest_path("n1"), "").await;
    let (head, body) = read_response(&mut c).await.unwrap();
    assert_eq!(head[0], "HTTP/1.1 200 OK");
    assert_eq!(body, sealed_bytes_of(&s, "n1").await);
    // Two polls in one write: two answers, in order.
    let poll = format!(
        "GET {} HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"1\"\r\n\r\n",
        v1::manifest_path("n1")
    );
    c.write_all(format!("{poll}{poll}").as_bytes())
        .await
        .unwrap();
    for _ in 0..2 {
        let (head, _) = read_response(&mut c).await.unwrap();
        assert_eq!(head[0], "HTTP/1.1 304 Not Modified");
        assert_eq!(header(&head, "etag"), Some("\"1\""));
        assert_eq!(
            header(&head, v1::LONG_POLL_HEADER),
            Some(v1::MAX_WAIT_S.to_string().as_str())
        );
    }
    // Another route on the same connection (the router answers), pipelined with a poll.
    let fleet = format!("GET {} HTTP/1.1\r\nHost: x\r\n\r\n", v1::route::FLEET);
    c.write_all(format!("{fleet}{poll}").as_bytes())
        .await
        .unwrap();
    let (head, body) = read_response(&mut c).await.unwrap();
    assert_eq!(head[0], "HTTP/1.1 200 OK");
    assert_eq!(header(&head, "connection"), None);
    assert!(serde_json::from_slice::<Value>(&body).is_ok());
    let (head, _) = read_response(&mut c).await.unwrap();
    assert_eq!(head[0], "HTTP/1.1 304 Not Modified");
    // A request with a body on it, then a poll that sees what it stored.
    let newer = sealed(&key, &manifest("n1", 2, None));
    let put = format!(
        "PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        v1::manifest_path("n1"),
        newer.len()
    );
    c.write_all(put.as_bytes()).await.unwrap();
    c.write_all(&newer).await.unwrap();
    let (head, _) = read_response(&mut c).await.unwrap();
    assert_eq!(head[0], "HTTP/1.1 200 OK");
    c.write_all(poll.as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut c).await.unwrap();
    assert_eq!((head[0].as_str(), body), ("HTTP/1.1 200 OK", newer));
    // A connection that starts with another route is kept alive too.
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    for target in [
        v1::route::FLEET,
        v1::route::METRICS,
        &v1::manifest_path("n1"),
        v1::route::FLEET,
    ] {
        raw_get(&mut c, target, "").await;
        let (head, _) = read_response(&mut c).await.unwrap();
        assert_eq!(head[0], "HTTP/1.1 200 OK", "{target}");
        assert_eq!(header(&head, "connection"), None, "{target}");
    }
    // `Connection: close` on a poll is honoured.
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    raw_get(&mut c, &v1::manifest_path("n1"), "Connection: close\r\n").await;
    let (head, _) = read_response(&mut c).await.unwrap();
    assert_eq!(header(&head, "connection"), Some("close"));
    assert!(read_response(&mut c).await.is_none(), "still open");
    // A body the router refuses before reading it all: answered, then the connection ends
    // (where the next request would start is unknown).
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let big = 1 << 20;
    let put = format!(
        "PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: {big}\r\n\r\n",
        v1::manifest_path("n1")
    );
    c.write_all(put.as_bytes()).await.unwrap();
    c.write_all(&vec![b'x'; 512 << 10]).await.unwrap();
    let (head, _) = tokio::time::timeout(Duration::from_secs(20), read_response(&mut c))
        .await
        .expect("no answer to an oversized body")
        .unwrap();
    assert!(head[0].starts_with("HTTP/1.1 413"), "{head:?}");
    let after = tokio::time::timeout(Duration::from_secs(20), read_response(&mut c)).await;
    assert!(matches!(after, Ok(None)), "the connection stayed open");
    s.stop().await;
}

async fn sealed_bytes_of(s: &Server, node: &str) -> Vec<u8> {
    reqwest::get(v1::manifest_url(&s.url, node))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

async fn metrics_text(s: &Server) -> String {
    reqwest::get(format!("{}/metrics", s.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn metric(s: &Server, line_prefix: &str) -> Option<u64> {
    let text = metrics_text(s).await;
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// A raw connection with `n1`'s version 1 poll (`wait` seconds) sent on it.
async fn poll_n1(s: &Server, wait: u64) -> tokio::net::TcpStream {
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let target = v1::long_poll_url("", "n1", wait);
    raw_get(&mut c, &target, "If-None-Match: \"1\"\r\n").await;
    c
}

#[tokio::test]
async fn a_client_leaving_a_held_poll_frees_it_and_answered_polls_are_counted() {
    let (_dir, _key, s) = serving_n1(1, None).await;
    let held = "roost_long_polls_held ";
    let c = poll_n1(&s, 300).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&s, held).await != Some(1) {
        assert!(Instant::now() < deadline, "the poll was never held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(c);
    while metric(&s, held).await != Some(0) {
        assert!(
            Instant::now() < deadline,
            "a poll whose client left is still held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = poll_n1(&s, 1).await;
    let (head, _) = read_response(&mut c).await.unwrap();
    assert_eq!(head[0], "HTTP/1.1 304 Not Modified");
    let route = format!(
        "roost_http_requests_total{{route=\"GET {}\",status=\"304\"}} ",
        v1::route::MANIFEST
    );
    assert_eq!(metric(&s, &route).await, Some(1));
    s.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_a_download_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let mut cfg = ServerConfig::new(dir.path(), TrustedKeys::new([key.public()], 1));
    cfg.body_timeout = Duration::from_secs(1);
    let s = Server::with_config(cfg, "127.0.0.1:0".parse().unwrap()).await;
    // Larger than what the kernel's socket buffers can absorb on both sides.
    let size = 64 << 20;
    let nar_dir = dir.path().join("cache/nar");
    std::fs::create_dir_all(&nar_dir).unwrap();
    std::fs::write(nar_dir.join("big.nar"), vec![7u8; size]).unwrap();
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    c.write_all(
        format!(
            "GET {} HTTP/1.1\r\nHost: x\r\n\r\n",
            v1::cache_url("") + "/nar/big.nar"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Read nothing for a while: the server's writes stall.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), c.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection is still open after 60 s");
    assert!(
        got.len() < size,
        "all {} bytes arrived: the stalled download was never cut off",
        got.len()
    );
    // The server itself is fine.
    assert_eq!(
        reqwest::get(v1::fleet_url(&s.url)).await.unwrap().status(),
        200
    );
    s.stop().await;
}

/// PUTs `body` to the cache file `file` with the upload token: the status and the answer.
async fn put_cache_file(url: &str, token: &str, file: &str, body: Vec<u8>) -> (u16, String) {
    let r = reqwest::Client::new()
        .put(format!("{}/{file}", v1::cache_url(url)))
        .bearer_auth(token)
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn narinfo_naming(nar: &str, size: usize) -> Vec<u8> {
    format!(
        "StorePath: /nix/store/00000000000000000000000000000000-x\nURL: {nar}\n\
         Compression: none\nFileSize: {size}\nNarSize: {size}\n"
    )
    .into_bytes()
}

#[tokio::test]
async fn a_narinfo_naming_a_nar_the_cache_does_not_hold_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let token = "cache-token-0123456789";
    let s = Server::start(dir.path(), &key, Some(token)).await;
    let (status, body) =
        put_cache_file(&s.url, token, "x.narinfo", narinfo_naming("nar/x.nar", 10)).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("nar_missing") && body.contains("nar/x.nar"),
        "{body}"
    );
    let r = reqwest::get(format!("{}/x.narinfo", v1::cache_url(&s.url)))
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "a refused narinfo is not stored");
    // Uploaded in Nix's order, NAR first, both are stored.
    assert_eq!(
        put_cache_file(&s.url, token, "nar/x.nar", vec![1; 10])
            .await
            .0,
        200
    );
    assert_eq!(
        put_cache_file(&s.url, token, "x.narinfo", narinfo_naming("nar/x.nar", 10))
            .await
            .0,
        200
    );
    s.stop().await;
}

#[tokio::test]
async fn a_nar_cut_short_before_a_restart_is_removed_when_its_narinfo_comes() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let token = "cache-token-0123456789";
    // What a power loss can leave of a NAR acknowledged but not yet synced (no narinfo
    // named it): the file under its name, shorter than uploaded.
    let nar_dir = dir.path().join("cache/nar");
    std::fs::create_dir_all(&nar_dir).unwrap();
    std::fs::write(nar_dir.join("y.nar"), [1u8; 4]).unwrap();
    let s = Server::start(dir.path(), &key, Some(token)).await;
    let (status, body) = put_cache_file(
        &s.url,
        token,
        "y.narinfo",
        narinfo_naming("nar/y.nar", 4096),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("nar_damaged") && body.contains("nix copy"),
        "{body}"
    );
    // Removed, so that the next `nix copy`, which asks first, uploads it again.
    let r = reqwest::Client::new()
        .head(format!("{}/nar/y.nar", v1::cache_url(&s.url)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(
        put_cache_file(&s.url, token, "nar/y.nar", vec![1; 4096])
            .await
            .0,
        200
    );
    assert_eq!(
        put_cache_file(
            &s.url,
            token,
            "y.narinfo",
            narinfo_naming("nar/y.nar", 4096)
        )
        .await
        .0,
        200
    );
    // A whole NAR stored before the restart is accepted as it is.
    std::fs::write(nar_dir.join("z.nar"), [2u8; 64]).unwrap();
    assert_eq!(
        put_cache_file(&s.url, token, "z.narinfo", narinfo_naming("nar/z.nar", 64))
            .await
            .0,
        200
    );
    s.stop().await;
}
