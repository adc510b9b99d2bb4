//! `roost-coordinator serve` as a process: signals, crashes and bad configuration.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use roost_common::SecretKey;
use roost_common::wire::v1::http as v1;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod support;
use support::{manifest, report, sealed};

const BIN: &str = env!("CARGO_BIN_EXE_roost-coordinator");

struct Proc {
    child: Child,
    addr: String,
}

impl Proc {
    /// Starts `serve` on a free port and reads the address from its first stdout line.
    fn start(state: &Path, publisher_pub: &Path, token_file: Option<&Path>) -> Self {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state)
            .arg("--publisher-key")
            .arg(publisher_pub)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(t) = token_file {
            cmd.arg("--upload-token-file").arg(t);
        }
        let mut child = cmd.spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .rsplit("http://")
            .next()
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        Self { child, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits up to `limit` for the process to exit; its exit code.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = std::time::Instant::now();
        while start.elapsed() < limit {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keys(dir: &Path) -> (SecretKey, std::path::PathBuf) {
    let key = SecretKey::generate("pub").unwrap();
    let public = dir.join("publisher.pub");
    std::fs::write(&public, key.public().to_string()).unwrap();
    (key, public)
}

fn manifest_envelope(key: &SecretKey, node: &str, version: u64, node_key: &SecretKey) -> Vec<u8> {
    sealed(key, &manifest(node, version, Some(node_key)))
}

fn report_envelope(node: &str, seq: u64, key: &SecretKey) -> Vec<u8> {
    report(node, seq, key, false)
}

#[tokio::test]
async fn sigterm_lets_an_upload_in_flight_finish_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path());
    let mut p = Proc::start(&dir.path().join("state"), &public, None);
    let node_key = SecretKey::generate("n1").unwrap();
    let body = manifest_envelope(&key, "n1", 1, &node_key);
    let mut stream = tokio::net::TcpStream::connect(&p.addr).await.unwrap();
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
    stream.write_all(&body[..body.len() / 2]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stream.write_all(&body[body.len() / 2..]).await.unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(p.wait(Duration::from_secs(60)), Some(0));
    let stored = std::fs::read(
        dir.path()
            .join("state/manifests")
            .join(v1::manifest_file("n1")),
    )
    .unwrap();
    assert_eq!(stored, body);
}

#[tokio::test]
async fn sigterm_answers_held_long_polls_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path());
    let mut p = Proc::start(&dir.path().join("state"), &public, None);
    let node_key = SecretKey::generate("n1").unwrap();
    let c = reqwest::Client::new();
    let r = c
        .put(v1::manifest_url(&p.url(), "n1"))
        .body(manifest_envelope(&key, "n1", 1, &node_key))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let url = v1::long_poll_url(&p.url(), "n1", 300);
    let poll = tokio::spawn(async move {
        c.get(url)
            .header("If-None-Match", "\"1\"")
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.signal("TERM");
    assert_eq!(poll.await.unwrap().unwrap(), 304);
    assert_eq!(p.wait(Duration::from_secs(25)), Some(0));
}

#[tokio::test]
async fn after_sigkill_a_restart_serves_the_same_manifests_reports_and_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path());
    let token = "kill-restart-token-0123456789";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let state = dir.path().join("state");
    let node_key = SecretKey::generate("n1").unwrap();
    let body = manifest_envelope(&key, "n1", 7, &node_key);
    let c = reqwest::Client::new();

    let p = Proc::start(&state, &public, Some(&token_file));
    let put = c
        .put(v1::manifest_url(&p.url(), "n1"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
    let post = c
        .post(v1::reports_url(&p.url(), "n1"))
        .body(report_envelope("n1", 3, &node_key))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);
    let cache = c
        .put(format!("{}/nar/abc.nar", v1::cache_url(&p.url())))
        .basic_auth("roost", Some(token))
        .body("nar bytes")
        .send()
        .await
        .unwrap();
    assert_eq!(cache.status(), 200);
    p.signal("KILL");
    drop(p);

    let p = Proc::start(&state, &public, Some(&token_file));
    let got = c
        .get(v1::manifest_url(&p.url(), "n1"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.headers()["etag"], "\"7\"");
    assert_eq!(got.bytes().await.unwrap().to_vec(), body);
    let fleet: Value = c
        .get(v1::fleet_url(&p.url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(fleet["nodes"][0]["last_seq"], 3);
    assert_eq!(fleet["nodes"][0]["state"], "success");
    let nar = c
        .get(format!("{}/nar/abc.nar", v1::cache_url(&p.url())))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(nar, "nar bytes");
}

#[test]
fn a_bad_publisher_key_file_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("publisher.pub");
    std::fs::write(&bad, "not a key").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--publisher-key")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&bad.display().to_string()), "{err}");
    assert!(
        !dir.path().join("state").exists(),
        "nothing is created on a configuration error"
    );
}

#[test]
fn a_short_upload_token_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let (_, public) = keys(dir.path());
    let token = dir.path().join("token");
    std::fs::write(&token, "short").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path().join("state"))
        .arg("--publisher-key")
        .arg(&public)
        .arg("--upload-token-file")
        .arg(&token)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("shorter than 16"));
}

fn node_key_cmd(url: &str, token: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["node-key", "n1", "--coordinator", url, "--token-file"])
        .arg(token)
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn node_key_pins_and_clears_with_the_token_and_exits_by_the_book() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path());
    let token = dir.path().join("token");
    std::fs::write(&token, "upload-token-0123456789\n").unwrap();
    let p = Proc::start(&dir.path().join("state"), &public, Some(&token));
    let node = SecretKey::generate("n1").unwrap();
    let node_pub = dir.path().join("n1.pub");
    std::fs::write(&node_pub, format!("{}\n", node.public())).unwrap();
    let pin = ["--key-file", node_pub.to_str().unwrap()];
    let ok = node_key_cmd(&p.url(), &token, &pin);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        out.contains("pinned") && out.contains(&node.public().to_string()),
        "{out}"
    );
    // The pin is what reports are checked with.
    let c = reqwest::Client::new();
    c.put(format!("{}/v1/nodes/n1/manifest", p.url()))
        .body(sealed(&key, &manifest("n1", 1, None)))
        .send()
        .await
        .unwrap();
    let impostor = SecretKey::generate("n1").unwrap();
    let r = c
        .post(format!("{}/v1/nodes/n1/reports", p.url()))
        .body(report("n1", 1, &impostor, true))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-token-0123456789").unwrap();
    let refused = node_key_cmd(&p.url(), &wrong, &pin);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    let cleared = node_key_cmd(&p.url(), &token, &["--clear", "--json"]);
    assert_eq!(cleared.status.code(), Some(0));
    let answer: Value = serde_json::from_slice(&cleared.stdout).unwrap();
    assert!(answer["pinned_key"].is_null(), "{answer}");
    assert_eq!(answer["previous"], node.public().to_string());
    let usage = node_key_cmd(&p.url(), &token, &[]);
    assert_eq!(usage.status.code(), Some(2), "neither a key nor --clear");
    let unreachable = node_key_cmd("http://127.0.0.1:1", &token, &["--clear"]);
    assert_eq!(unreachable.status.code(), Some(1));
}

/// `serve` with `extra` flags, its log in `log`; the URL once it serves.
fn serve_logged(state: &Path, publisher_pub: &Path, extra: &[&str], log: &Path) -> (Child, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state)
        .arg("--publisher-key")
        .arg(publisher_pub)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = format!("http://{}", line.trim().rsplit("http://").next().unwrap());
    (child, url)
}

#[tokio::test]
async fn serve_wants_a_read_token_for_the_fleet_unless_public_read_and_logs_refusals_at_warn() {
    let dir = tempfile::tempdir().unwrap();
    let (key, public) = keys(dir.path());
    let log = dir.path().join("log");
    let (mut child, url) = serve_logged(&dir.path().join("s1"), &public, &[], &log);
    let c = reqwest::Client::new();
    let r = c.get(v1::fleet_url(&url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("--public-read"),
        "{body}"
    );
    // A manifest signed by a key the coordinator does not trust, and a report for a node
    // with no manifest: both refused, both in the log at warn with the reason.
    let stranger = SecretKey::generate("stranger").unwrap();
    let node_key = SecretKey::generate("n1").unwrap();
    let r = c
        .put(v1::manifest_url(&url, "n1"))
        .body(manifest_envelope(&stranger, "n1", 1, &node_key))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = c
        .put(v1::manifest_url(&url, "n1"))
        .body(manifest_envelope(&key, "n1", 1, &node_key))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let wrong = SecretKey::generate("n1").unwrap();
    let r = c
        .post(v1::reports_url(&url, "n1"))
        .body(report_envelope("n1", 1, &wrong))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Refused by the connection front before it is read: logged the same way.
    let r = c
        .post(v1::reports_url(&url, "n1"))
        .body(vec![b'x'; v1::MAX_REPORT_BYTES + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let warned = |path: &str, code: &str| {
        text.lines().any(|l| {
            l.contains("WARN") && l.contains(path) && l.contains(code) && l.contains("refused")
        })
    };
    assert!(warned("/v1/nodes/n1/manifest", "bad_signature"), "{text}");
    assert!(warned("/v1/nodes/n1/reports", "bad_signature"), "{text}");
    assert!(warned("/v1/nodes/{node}/reports", "too_large"), "{text}");

    let (mut child, url) = serve_logged(&dir.path().join("s2"), &public, &["--public-read"], &log);
    let r = c.get(v1::fleet_url(&url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let _ = child.kill();
    let _ = child.wait();
}
