//! What the coordinator's integration tests share: an in-process server, the signed
//! documents they send it, and a raw HTTP/1.1 reader (each test crate uses a part).
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use roost_common::envelope::{Context, Envelope};
use roost_common::wire::v1::http as v1;
use roost_common::wire::v1::{Manifest, Report, ReportState};
use roost_common::{SecretKey, Timestamp, TrustedKeys, Version};
use roost_coordinator::serve::{Running, ServerConfig, start};
use serde_json::{Value, json};

/// A manifest payload for `node`: one tiny system profile, valid for an hour, naming
/// `node_key` if given.
pub fn manifest(node: &str, version: u64, node_key: Option<&SecretKey>) -> Vec<u8> {
    let now = Timestamp::now();
    let m = Manifest {
        format: roost_common::wire::v1::FORMAT,
        node: node.parse().unwrap(),
        system: "x86_64-linux".into(),
        version: Version(version),
        issued_at: now,
        expires_at: now.plus(Duration::from_secs(30 * 86400)),
        source: None,
        substituters: vec![],
        node_key: node_key.map(SecretKey::public),
        profiles: vec![serde_json::from_value(json!({"name": "system", "path": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-sys"})).unwrap()],
        rollout: Default::default(),
    };
    serde_json::to_vec(&m).unwrap()
}

/// A manifest envelope signed by `key`.
pub fn sealed(key: &SecretKey, payload: &[u8]) -> Vec<u8> {
    Envelope::seal(Context::Manifest, payload, &[key]).to_bytes()
}

/// A report of `state` about manifest version 1, to adjust before [`seal_report`].
pub fn report_payload(node: &str, seq: u64, state: ReportState) -> Report {
    Report {
        format: 1,
        node: node.parse().unwrap(),
        seq,
        sent_at: Timestamp::now(),
        boot_id: "b".into(),
        agent_version: "t".into(),
        manifest_version: Some(Version(1)),
        state,
        profiles: vec![],
        booted_system: None,
        error: None,
        health: vec![],
        timings_ms: Default::default(),
        security_events: vec![],
        node_key: None,
        needs_reboot: false,
        reboot_reasons: vec![],
        deferred_until: None,
        gc_freed_bytes: None,
        generations_removed: None,
    }
}

/// A report envelope signed by `key`.
pub fn seal_report(r: &Report, key: &SecretKey) -> Vec<u8> {
    Envelope::seal(Context::Report, &serde_json::to_vec(r).unwrap(), &[key]).to_bytes()
}

/// A signed `success` report, carrying the node's public key when `include_key`.
pub fn report(node: &str, seq: u64, key: &SecretKey, include_key: bool) -> Vec<u8> {
    let mut r = report_payload(node, seq, ReportState::Success);
    r.node_key = include_key.then(|| key.public());
    seal_report(&r, key)
}

/// A coordinator running in this process on a free port.
pub struct Server {
    pub url: String,
    pub addr: std::net::SocketAddr,
    running: Running,
}

impl Server {
    pub async fn start(state: &Path, publisher: &SecretKey, token: Option<&str>) -> Self {
        Self::start_on(state, publisher, token, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(
        state: &Path,
        publisher: &SecretKey,
        token: Option<&str>,
        addr: std::net::SocketAddr,
    ) -> Self {
        let mut cfg = ServerConfig::new(state, TrustedKeys::new([publisher.public()], 1));
        cfg.upload_token = token.map(str::to_owned);
        Self::with_config(cfg, addr).await
    }

    /// A server on `state` trusting `publisher`, with `adjust` applied to its configuration.
    pub async fn configured(
        state: &Path,
        publisher: &SecretKey,
        adjust: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        let mut cfg = ServerConfig::new(state, TrustedKeys::new([publisher.public()], 1));
        adjust(&mut cfg);
        Self::with_config(cfg, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn with_config(cfg: ServerConfig, addr: std::net::SocketAddr) -> Self {
        let running = start(addr, cfg).await.unwrap();
        Self {
            url: running.url(),
            addr: running.addr(),
            running,
        }
    }

    pub async fn stop(self) {
        self.running.stop().await.unwrap();
    }
}

/// PUTs a manifest envelope: the status and the JSON answer.
pub async fn put(url: &str, node: &str, body: Vec<u8>) -> (u16, Value) {
    let c = reqwest::Client::new();
    send(c.put(v1::manifest_url(url, node)).body(body)).await
}

/// POSTs a report envelope: the status and the JSON answer.
pub async fn post_report(url: &str, node: &str, body: Vec<u8>) -> (u16, Value) {
    let c = reqwest::Client::new();
    send(c.post(v1::reports_url(url, node)).body(body)).await
}

/// Sends a request: the status and the JSON answer (`null` when it is not JSON).
pub async fn send(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// One HTTP/1.1 response read off a raw connection: the head's lines (status first, header
/// names lower-cased) and the body (by `content-length`); `None` at end of stream.
pub async fn read_response(s: &mut tokio::net::TcpStream) -> Option<(Vec<String>, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    let lines: Vec<String> = String::from_utf8_lossy(&head)
        .split("\r\n")
        .filter(|l| !l.is_empty())
        .enumerate()
        .map(|(i, l)| match (i, l.split_once(':')) {
            (0, _) | (_, None) => l.to_owned(),
            (_, Some((k, v))) => format!("{}:{}", k.to_ascii_lowercase(), v),
        })
        .collect();
    let len = lines
        .iter()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map_or(0, |v| v.parse().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some((lines, body))
}

/// A header's value in the lines [`read_response`] gives.
pub fn header<'a>(lines: &'a [String], name: &str) -> Option<&'a str> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}
