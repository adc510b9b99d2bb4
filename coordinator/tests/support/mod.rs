//! Signed documents the coordinator's integration tests send it (each test crate uses a part).
#![allow(dead_code)]

use std::time::Duration;

use roost_common::envelope::{Context, Envelope};
use roost_common::wire::v1::{self, Manifest, Report, ReportState};
use roost_common::{SecretKey, Timestamp, Version};
use serde_json::json;

/// A manifest payload for `node`: one tiny system profile, valid for an hour, naming
/// `node_key` if given.
pub fn manifest(node: &str, version: u64, node_key: Option<&SecretKey>) -> Vec<u8> {
    let now = Timestamp::now();
    let m = Manifest {
        format: v1::FORMAT,
        node: node.parse().unwrap(),
        system: "x86_64-linux".into(),
        version: Version(version),
        issued_at: now,
        expires_at: now.plus(Duration::from_secs(3600)),
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
