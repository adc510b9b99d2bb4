//! `serve` against hostile or broken input: tampered and damaged state at start, malformed
//! and oversized requests, a full disk, impostors racing a node for its key, and replayed
//! reports after a key rotation.

use std::path::Path;
use std::time::Duration;

use roost_common::{SecretKey, TrustedKeys};
use roost_coordinator::serve::ServerConfig;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

mod support;
use support::{
    Server, manifest, post_report, put, read_response, report, report_payload, seal_report, sealed,
};

/// A guard against a test hanging for ever: far longer than any answer takes, so reaching it
/// means the server was waiting for something that never comes.
const HANG: Duration = Duration::from_secs(30);

async fn server(state: &Path, publishers: &[&SecretKey]) -> Server {
    let keys = TrustedKeys::new(publishers.iter().map(|k| k.public()), 1);
    Server::with_config(
        ServerConfig::new(state, keys),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
}

async fn get_status(s: &Server, path: &str) -> u16 {
    reqwest::get(format!("{}{path}", s.url))
        .await
        .unwrap()
        .status()
        .as_u16()
}

fn manifest_file(state: &Path, node: &str) -> std::path::PathBuf {
    state.join("manifests/v1/nodes").join(node).join("manifest")
}

#[tokio::test]
async fn stored_manifests_are_verified_at_start_against_the_current_keys_and_folders() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (
        SecretKey::generate("old").unwrap(),
        SecretKey::generate("new").unwrap(),
    );
    let s = server(dir.path(), &[&old]).await;
    for n in ["n1", "n2"] {
        assert_eq!(
            put(&s.url, n, sealed(&old, &manifest(n, 50, None))).await.0,
            200
        );
    }
    s.stop().await;
    // n2's manifest copied into n3's folder: a valid signature, but not n3's manifest.
    std::fs::create_dir_all(manifest_file(dir.path(), "n3").parent().unwrap()).unwrap();
    std::fs::copy(
        manifest_file(dir.path(), "n2"),
        manifest_file(dir.path(), "n3"),
    )
    .unwrap();
    let s = server(dir.path(), &[&old]).await;
    assert_eq!(get_status(&s, "/v1/nodes/n2/manifest").await, 200);
    assert_eq!(
        get_status(&s, "/v1/nodes/n3/manifest").await,
        404,
        "a manifest copied into another node's folder is served as that node's"
    );
    s.stop().await;
    // The old key is no longer trusted: what it signed is not served and blocks nothing.
    let s = server(dir.path(), &[&new]).await;
    assert_eq!(get_status(&s, "/v1/nodes/n1/manifest").await, 404);
    let (st, e) = put(&s.url, "n1", sealed(&new, &manifest("n1", 3, None))).await;
    assert_eq!(
        st, 200,
        "the valid publisher is blocked by a manifest its key never signed: {e}"
    );
    assert_eq!(get_status(&s, "/v1/nodes/n1/manifest").await, 200);
    s.stop().await;
}

#[tokio::test]
async fn a_damaged_manifest_or_report_database_does_not_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let node_key = SecretKey::generate("n3").unwrap();
    let s = server(dir.path(), &[&key]).await;
    for n in ["n1", "n2", "n3"] {
        let m = manifest(n, 1, Some(&node_key));
        assert_eq!(put(&s.url, n, sealed(&key, &m)).await.0, 200);
    }
    s.stop().await;
    std::fs::write(manifest_file(dir.path(), "n1"), b"{ not json").unwrap();
    // A manifest that cannot even be read (a folder where the file should be).
    let n2 = manifest_file(dir.path(), "n2");
    std::fs::remove_file(&n2).unwrap();
    std::fs::create_dir(&n2).unwrap();
    for f in ["coordinator.sqlite-wal", "coordinator.sqlite-shm"] {
        let _ = std::fs::remove_file(dir.path().join(f));
    }
    std::fs::write(
        dir.path().join("coordinator.sqlite"),
        vec![0xA5u8; 64 * 1024],
    )
    .unwrap();
    let running = roost_coordinator::serve::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig::new(dir.path(), TrustedKeys::new([key.public()], 1)),
    )
    .await;
    let running = running.expect("the coordinator did not start with damaged state");
    let url = running.url();
    let get = |p: &str| reqwest::get(format!("{url}{p}"));
    assert_eq!(get("/v1/nodes/n3/manifest").await.unwrap().status(), 200);
    assert_eq!(get("/v1/nodes/n1/manifest").await.unwrap().status(), 404);
    assert_eq!(get("/v1/nodes/n2/manifest").await.unwrap().status(), 404);
    let fleet: Value = get("/v1/fleet").await.unwrap().json().await.unwrap();
    assert_eq!(fleet["reports_available"], false, "{fleet}");
    // n1 and n2 polled and got no manifest: the fleet lists them as UNKNOWN.
    let nodes = fleet["nodes"].as_array().unwrap();
    let flags: Vec<(&str, &str)> = nodes
        .iter()
        .map(|n| {
            let flag = n["flags"][0]["flag"].as_str().unwrap_or("none");
            (n["node"].as_str().unwrap(), flag)
        })
        .collect();
    assert_eq!(
        flags,
        [("n1", "unknown"), ("n2", "unknown"), ("n3", "none")],
        "{fleet}"
    );
    let (st, e) = post_report(&url, "n3", report("n3", 1, &node_key, false)).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (503, Some("reports_unavailable")),
        "{e}"
    );
    assert!(
        !e["message"]
            .as_str()
            .unwrap()
            .contains(&*dir.path().to_string_lossy())
    );
    // Uploads still work, and replace what could not be read.
    let (st, _) = put(&url, "n1", sealed(&key, &manifest("n1", 2, None))).await;
    assert_eq!(st, 200);
    running.stop().await.unwrap();
}

/// Sends `request` on a fresh connection and reads one answer (none: the connection ended).
async fn exchange(s: &Server, request: &[u8]) -> Option<(Vec<String>, Vec<u8>)> {
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(request).await.unwrap();
    tokio::time::timeout(HANG, read_response(&mut c))
        .await
        .expect("no answer, and the connection is still open")
}

#[tokio::test]
async fn a_content_length_of_2_pow_64_minus_1_is_answered_400() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let s = server(dir.path(), &[&key]).await;
    for target in ["/v1/nodes/n1/manifest", "/cache/nar/x.nar", "/v1/fleet"] {
        let req = format!(
            "PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551615\r\n\r\n"
        );
        let (head, body) = exchange(&s, req.as_bytes())
            .await
            .unwrap_or_else(|| panic!("{target}: the connection was dropped without an answer"));
        assert_eq!(head[0], "HTTP/1.1 400 Bad Request", "{target}");
        let e: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(e["error"], "bad_content_length");
    }
    assert_eq!(get_status(&s, "/v1/fleet").await, 200, "the server is fine");
    s.stop().await;
}

#[tokio::test]
async fn a_report_seq_of_2_pow_63_or_more_is_refused_with_400() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let node_key = SecretKey::generate("n1").unwrap();
    let s = server(dir.path(), &[&key]).await;
    put(
        &s.url,
        "n1",
        sealed(&key, &manifest("n1", 1, Some(&node_key))),
    )
    .await;
    for seq in [1u64 << 63, u64::MAX] {
        let r = report_payload("n1", seq, roost_common::wire::v1::ReportState::Idle);
        let (st, e) = post_report(&s.url, "n1", seal_report(&r, &node_key)).await;
        assert_eq!(
            (st, e["error"].as_str()),
            (400, Some("invalid_report")),
            "{seq}: {e}"
        );
    }
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 7, &node_key, false))
            .await
            .0,
        200
    );
    s.stop().await;
}

/// Malformed requests, one of each kind, and the status each is refused with.
fn malformed() -> Vec<(&'static str, Vec<u8>, u16)> {
    let r = |s: &str| s.as_bytes().to_vec();
    let mut many_headers = r("GET /v1/fleet HTTP/1.1\r\n");
    for i in 0..120 {
        many_headers.extend(format!("X-{i}: y\r\n").as_bytes());
    }
    many_headers.extend(b"\r\n");
    vec![
        ("no HTTP version", r("GARBAGE\r\n\r\n"), 400),
        (
            "unknown HTTP version",
            r("GET /v1/fleet HTTP/9.9\r\n\r\n"),
            400,
        ),
        (
            "lower-case version",
            r("GET /v1/fleet http/1.1\r\n\r\n"),
            400,
        ),
        ("invalid method", r("G(T /v1/fleet HTTP/1.1\r\n\r\n"), 400),
        (
            "two spaces in the request line",
            r("GET  /v1/fleet HTTP/1.1\r\n\r\n"),
            400,
        ),
        (
            "control character in the target",
            b"GET /v1/fl\x01eet HTTP/1.1\r\n\r\n".to_vec(),
            400,
        ),
        (
            "non-UTF-8 target",
            b"GET /v1/nodes/\xff/manifest HTTP/1.1\r\n\r\n".to_vec(),
            400,
        ),
        (
            "header without a colon",
            r("GET /v1/fleet HTTP/1.1\r\nHost\r\n\r\n"),
            400,
        ),
        (
            "space in a header name",
            r("GET /v1/fleet HTTP/1.1\r\nBad Header: x\r\n\r\n"),
            400,
        ),
        (
            "empty header name",
            r("GET /v1/fleet HTTP/1.1\r\n: x\r\n\r\n"),
            400,
        ),
        (
            "NUL in a header value",
            b"GET /v1/fleet HTTP/1.1\r\nX: a\x00b\r\n\r\n".to_vec(),
            400,
        ),
        (
            "obsolete line folding",
            r("GET /v1/fleet HTTP/1.1\r\nX: a\r\n b\r\n\r\n"),
            400,
        ),
        (
            "Content-Length not a number",
            r("PUT /v1/nodes/a/manifest HTTP/1.1\r\nContent-Length: abc\r\n\r\n"),
            400,
        ),
        (
            "negative Content-Length",
            r("PUT /v1/nodes/a/manifest HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            400,
        ),
        (
            "signed Content-Length",
            r("PUT /v1/nodes/a/manifest HTTP/1.1\r\nContent-Length: +2\r\n\r\nab"),
            400,
        ),
        (
            "two Content-Lengths",
            r(
                "PUT /v1/nodes/a/manifest HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            ),
            400,
        ),
        (
            "Content-Length list",
            r("PUT /v1/nodes/a/manifest HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\nab"),
            400,
        ),
        (
            "Content-Length over 2^63",
            r("PUT /v1/nodes/a/manifest HTTP/1.1\r\nContent-Length: 9223372036854775808\r\n\r\n"),
            400,
        ),
        (
            "Content-Length with Transfer-Encoding",
            r(
                "PUT /v1/nodes/a/manifest HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
            ),
            400,
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            r("PUT /v1/nodes/a/manifest HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
            400,
        ),
        (
            "unknown Transfer-Encoding",
            r("PUT /v1/nodes/a/manifest HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            501,
        ),
        (
            "malformed chunked body",
            r("PUT /v1/nodes/a/manifest HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n\r\n"),
            400,
        ),
        (
            "a TLS handshake on the plain port",
            [
                &[0x16u8, 3, 1, 0, 0xa5, 1, 0, 0, 0xa1, 3, 3][..],
                &[0u8; 64],
            ]
            .concat(),
            400,
        ),
        (
            "request target over 16 KiB",
            format!("GET /v1/{} HTTP/1.1\r\n\r\n", "a".repeat(20_000)).into_bytes(),
            414,
        ),
        (
            "head over 64 KiB",
            format!(
                "GET /v1/fleet HTTP/1.1\r\nX: {}\r\n\r\n",
                "a".repeat(70_000)
            )
            .into_bytes(),
            431,
        ),
        ("more than 100 headers", many_headers, 431),
        (
            "undecodable node name",
            r("GET /v1/nodes/%ff/manifest HTTP/1.1\r\n\r\n"),
            400,
        ),
        (
            "bad wait",
            r("GET /v1/nodes/a/manifest?wait=soon HTTP/1.1\r\n\r\n"),
            400,
        ),
        (
            "bad limit",
            r("GET /v1/nodes/a/reports?limit=-1 HTTP/1.1\r\n\r\n"),
            400,
        ),
        (
            "invalid node name",
            r("PUT /v1/nodes/-x-/manifest HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"),
            400,
        ),
        ("unknown method", r("BREW /v1/fleet HTTP/1.1\r\n\r\n"), 405),
        (
            "cache path outside the cache",
            r("GET /cache/../coordinator.sqlite HTTP/1.1\r\n\r\n"),
            400,
        ),
    ]
}

#[tokio::test]
async fn every_malformed_request_is_answered_with_a_json_error() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let s = server(dir.path(), &[&key]).await;
    let mut wrong = Vec::new();
    for (kind, request, status) in malformed() {
        let Some((head, body)) = exchange(&s, &request).await else {
            wrong.push(format!(
                "{kind}: the connection was closed without an answer"
            ));
            continue;
        };
        let json: Option<Value> = serde_json::from_slice(&body).ok();
        let is_error = json
            .as_ref()
            .is_some_and(|e| e["error"].is_string() && e["message"].is_string());
        if !head[0].starts_with(&format!("HTTP/1.1 {status} ")) || !is_error {
            wrong.push(format!(
                "{kind}: {} {:?}",
                head[0],
                String::from_utf8_lossy(&body)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "not answered with a JSON error:\n{}",
        wrong.join("\n")
    );
    assert_eq!(get_status(&s, "/v1/fleet").await, 200, "the server is fine");
    s.stop().await;
}

#[tokio::test]
async fn an_oversized_declared_body_is_refused_before_it_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    // Long enough that an answer given only after waiting for the body would trip `HANG`.
    let s = Server::configured(dir.path(), &key, |c| {
        c.body_timeout = Duration::from_secs(600)
    })
    .await;
    put(&s.url, "n1", sealed(&key, &manifest("n1", 1, None))).await;
    for (method, route, size) in [
        ("PUT", "/v1/nodes/n1/manifest", 300 * 1024),
        ("POST", "/v1/nodes/n1/reports", 65 * 1024),
        ("PUT", "/v1/nodes/n1/manifest", 1u64 << 40),
    ] {
        for expect in ["", "Expect: 100-continue\r\n"] {
            // The head only: a server that waits for the body never answers.
            let req = format!(
                "{method} {route} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n{expect}\r\n"
            );
            let (head, body) = exchange(&s, req.as_bytes())
                .await
                .unwrap_or_else(|| panic!("{method} {route}: closed without an answer"));
            assert_eq!(
                head[0], "HTTP/1.1 413 Payload Too Large",
                "{method} {route} {size} {expect:?}"
            );
            let e: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(e["error"], "too_large");
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn a_key_that_returns_after_a_rotation_cannot_replay_its_old_reports() {
    let (a, b) = (
        SecretKey::generate("n1").unwrap(),
        SecretKey::generate("n1").unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let s = server(dir.path(), &[&key]).await;
    let with_key = |v: u64, k: &SecretKey| sealed(&key, &manifest("n1", v, Some(k)));
    put(&s.url, "n1", with_key(1, &a)).await;
    let old_a = report("n1", 5, &a, false);
    assert_eq!(post_report(&s.url, "n1", old_a.clone()).await.0, 200);
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 6, &a, false))
            .await
            .0,
        200
    );
    put(&s.url, "n1", with_key(2, &b)).await;
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 1, &b, false))
            .await
            .0,
        200
    );
    put(&s.url, "n1", with_key(3, &a)).await;
    let (st, e) = post_report(&s.url, "n1", old_a).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (409, Some("seq_not_increasing")),
        "an old report of key A was accepted again after A→B→A: {e}"
    );
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 7, &a, false))
            .await
            .0,
        200
    );
    s.stop().await;
}

async fn pin(s: &Server, node: &str, token: &str, key: Option<&SecretKey>) -> (u16, Value) {
    let c = reqwest::Client::new();
    let url = format!("{}/v1/nodes/{node}/key", s.url);
    let req = match key {
        Some(k) => c.put(url).json(&json!({"node_key": k.public()})),
        None => c.delete(url),
    };
    support::send(req.bearer_auth(token)).await
}

async fn fleet_node(s: &Server, node: &str) -> Value {
    let fleet: Value = reqwest::get(format!("{}/v1/fleet", s.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    fleet["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_node_key_pinned_before_the_first_report_refuses_an_impostor() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let token = "admin-token-0123456789";
    let s = Server::configured(dir.path(), &key, |c| c.admin_token = Some(token.into())).await;
    let (real, impostor) = (
        SecretKey::generate("n1").unwrap(),
        SecretKey::generate("n1").unwrap(),
    );
    // Enrolment: the operator pins the node's key before it ever reports (or is published).
    assert_eq!(
        pin(&s, "n1", "wrong-token-0123456789", Some(&real)).await.0,
        401
    );
    let (st, a) = pin(&s, "n1", token, Some(&real)).await;
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["pinned_key"], real.public().to_string());
    put(&s.url, "n1", sealed(&key, &manifest("n1", 1, None))).await;
    let (st, e) = post_report(&s.url, "n1", report("n1", 1, &impostor, true)).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (403, Some("bad_signature")),
        "{e}"
    );
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 1, &real, true))
            .await
            .0,
        200
    );
    let n = fleet_node(&s, "n1").await;
    assert_eq!(
        (n["node_key"].as_str(), n["key_source"].as_str()),
        (Some(&*real.public().to_string()), Some("pinned"))
    );
    s.stop().await;
}

#[tokio::test]
async fn an_operator_replaces_an_impostors_pin_and_can_clear_it() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let token = "upload-token-0123456789";
    let s = Server::start(dir.path(), &key, Some(token)).await;
    let (real, impostor) = (
        SecretKey::generate("n1").unwrap(),
        SecretKey::generate("n1").unwrap(),
    );
    put(&s.url, "n1", sealed(&key, &manifest("n1", 1, None))).await;
    // The impostor reports first and wins trust on first use.
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 1, &impostor, true))
            .await
            .0,
        200
    );
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 1, &real, true))
            .await
            .0,
        403
    );
    // Without an admin token, the upload token authorises the fix.
    let (st, a) = pin(&s, "n1", token, Some(&real)).await;
    assert_eq!(st, 200, "{a}");
    assert_eq!(a["previous"], impostor.public().to_string());
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 2, &impostor, true))
            .await
            .0,
        403
    );
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 1, &real, true))
            .await
            .0,
        200
    );
    // Cleared: the next report pins its own key again, and floors survive the change.
    let (st, a) = pin(&s, "n1", token, None).await;
    assert_eq!((st, a["pinned_key"].clone()), (200, Value::Null));
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 1, &real, true))
            .await
            .0,
        409,
        "a cleared pin reset the real key's seq floor"
    );
    assert_eq!(
        post_report(&s.url, "n1", report("n1", 2, &real, true))
            .await
            .0,
        200
    );
    assert_eq!(fleet_node(&s, "n1").await["key_source"], "tofu");
    s.stop().await;
}

/// A small tmpfs mounted on `dir` for the test's life.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs failed");
        Self(dir.to_owned())
    }

    /// Fills it up; the file that takes the space.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Every file and folder under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().display().to_string());
            if p.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[tokio::test]
async fn a_full_disk_leaves_no_temp_files_and_answers_507_naming_no_server_path() {
    roost_preflight::require!(
        roost_preflight::root("a full disk is a small tmpfs: mounting one needs root")
            .and(roost_preflight::tools(&["mount", "umount"]))
    );
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let disk = SmallDisk::mount(&state, "2m");
    let key = SecretKey::generate("pub").unwrap();
    let node_key = SecretKey::generate("n0").unwrap();
    let token = "upload-token-0123456789";
    let s = Server::start(&state, &key, Some(token)).await;
    put(
        &s.url,
        "n0",
        sealed(&key, &manifest("n0", 1, Some(&node_key))),
    )
    .await;
    let filler = disk.fill();
    let before = tree(&state);
    let state_path = state.display().to_string();
    let check = |what: &str, st: u16, e: &Value| {
        assert_eq!(
            (st, e["error"].as_str()),
            (507, Some("insufficient_storage")),
            "{what}: {e}"
        );
        let m = e["message"].as_str().unwrap();
        assert!(
            !m.contains(&state_path) && !m.contains("/tmp"),
            "{what}: the message names a server path: {m}"
        );
    };
    for i in 1..=20 {
        let n = format!("n{i}");
        let (st, e) = put(&s.url, &n, sealed(&key, &manifest(&n, 1, None))).await;
        check(&format!("manifest of {n}"), st, &e);
    }
    let (st, e) = put(
        &s.url,
        "n0",
        sealed(&key, &manifest("n0", 2, Some(&node_key))),
    )
    .await;
    check("a newer manifest of n0", st, &e);
    let r = reqwest::Client::new()
        .put(format!("{}/cache/nar/x.nar", s.url))
        .basic_auth("roost", Some(token))
        .body(vec![1u8; 256 * 1024])
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    check("a cache upload", st, &r.json().await.unwrap());
    let (st, e) = post_report(&s.url, "n0", report("n0", 1, &node_key, false)).await;
    check("a report", st, &e);
    assert_eq!(tree(&state), before, "a failed write left something behind");
    // Space again: everything works, and n0 still has the manifest that was stored.
    std::fs::remove_file(filler).unwrap();
    assert_eq!(
        reqwest::get(format!("{}/v1/nodes/n0/manifest", s.url))
            .await
            .unwrap()
            .headers()["etag"],
        "\"1\""
    );
    assert_eq!(
        put(&s.url, "n1", sealed(&key, &manifest("n1", 1, None)))
            .await
            .0,
        200
    );
    assert_eq!(
        post_report(&s.url, "n0", report("n0", 1, &node_key, false))
            .await
            .0,
        200
    );
    s.stop().await;
}
