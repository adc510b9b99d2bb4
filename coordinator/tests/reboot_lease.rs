//! Reboot leases over real HTTP (docs/protocol.md §6.10): three nodes and
//! `--max-concurrent-reboots 1`; requests signed with each node's key; the lease log.

use std::time::Duration;

use roost_common::envelope::{Context, Envelope};
use roost_common::wire::v1::http as v1;
use roost_common::wire::v1::lease::{LeaseAction, LeaseAnswer, LeaseRequest, LeasesDoc};
use roost_common::{SecretKey, Timestamp};
use serde_json::Value;

mod support;
use support::{Server, put, sealed, send};

struct Fleet {
    _dir: tempfile::TempDir,
    s: Server,
    keys: Vec<(String, SecretKey)>,
}

async fn fleet(max: u32) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let publisher = SecretKey::generate("pub").unwrap();
    let s = Server::configured(dir.path(), &publisher, |c| {
        c.max_concurrent_reboots = max;
        c.reboot_lease_timeout = Duration::from_secs(600);
    })
    .await;
    let mut keys = Vec::new();
    for node in ["a", "b", "c"] {
        let key = SecretKey::generate(node).unwrap();
        let (st, body) = put(
            &s.url,
            node,
            sealed(&publisher, &support::manifest(node, 1, Some(&key))),
        )
        .await;
        assert_eq!(st, 200, "{body}");
        keys.push((node.to_owned(), key));
    }
    Fleet { _dir: dir, s, keys }
}

fn request(node: &str, action: LeaseAction, lease: Option<&str>, sent_at: Timestamp) -> Vec<u8> {
    serde_json::to_vec(&LeaseRequest {
        format: 1,
        node: node.parse().unwrap(),
        action,
        sent_at,
        boot_id: format!("boot-of-{node}"),
        lease: lease.map(str::to_owned),
    })
    .unwrap()
}

impl Fleet {
    fn key(&self, node: &str) -> &SecretKey {
        &self.keys.iter().find(|(n, _)| n == node).unwrap().1
    }

    async fn post(&self, node: &str, body: Vec<u8>, key: &SecretKey) -> (u16, Value) {
        let env = Envelope::seal(Context::RebootLease, &body, &[key]).to_bytes();
        send(
            reqwest::Client::new()
                .post(v1::reboot_lease_url(&self.s.url, node))
                .body(env),
        )
        .await
    }

    async fn ask(&self, node: &str, action: LeaseAction, lease: Option<&str>) -> LeaseAnswer {
        let (st, body) = self
            .post(
                node,
                request(node, action, lease, Timestamp::now()),
                self.key(node),
            )
            .await;
        assert_eq!(st, 200, "{body}");
        serde_json::from_value(body).unwrap()
    }

    async fn doc(&self) -> LeasesDoc {
        let (st, body) = send(reqwest::Client::new().get(v1::reboot_leases_url(&self.s.url))).await;
        assert_eq!(st, 200, "{body}");
        serde_json::from_value(body).unwrap()
    }
}

#[tokio::test]
async fn three_nodes_with_a_budget_of_one_take_the_lease_one_at_a_time() {
    let f = fleet(1).await;
    let a = f.ask("a", LeaseAction::Acquire, None).await;
    assert!(a.granted, "{a:?}");
    let a_lease = a.lease.unwrap().id;
    assert!(!f.ask("b", LeaseAction::Acquire, None).await.granted);
    assert!(!f.ask("c", LeaseAction::Acquire, None).await.granted);
    let back = f.ask("a", LeaseAction::Release, Some(&a_lease)).await;
    assert!(back.granted && back.holders.is_empty(), "{back:?}");
    let b = f.ask("b", LeaseAction::Acquire, None).await;
    assert!(b.granted);
    assert!(!f.ask("c", LeaseAction::Acquire, None).await.granted);
    f.ask("b", LeaseAction::Release, Some(&b.lease.unwrap().id))
        .await;
    assert!(f.ask("c", LeaseAction::Acquire, None).await.granted);
    let doc = f.doc().await;
    assert_eq!((doc.max_concurrent, doc.timeout_s), (1, 600));
    assert_eq!(doc.holders.len(), 1);
    assert_eq!(doc.holders[0].node.as_str(), "c");
    assert_eq!(doc.holders[0].boot_id, "boot-of-c");
    let log: Vec<String> = doc
        .log
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e.node,
                serde_json::to_value(e.event).unwrap().as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        log,
        [
            "a acquired",
            "b refused",
            "c refused",
            "a released",
            "b acquired",
            "c refused",
            "b released",
            "c acquired"
        ]
    );
    // Never two holders at once: replaying the log.
    let mut held = 0i32;
    for e in &doc.log {
        match serde_json::to_value(e.event).unwrap().as_str().unwrap() {
            "acquired" => held += 1,
            "released" | "expired" => held -= 1,
            _ => {}
        }
        assert!(held <= 1, "{log:?}");
    }
    f.s.stop().await;
}

#[tokio::test]
async fn a_request_not_signed_by_the_node_or_sent_long_ago_is_refused_and_changes_nothing() {
    let f = fleet(1).await;
    let body = request("a", LeaseAction::Acquire, None, Timestamp::now());
    let (st, e) = f.post("a", body.clone(), f.key("b")).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (403, Some("bad_signature")),
        "{e}"
    );
    let old = Timestamp::from_unix(Timestamp::now().unix() - 3600);
    let (st, e) = f
        .post(
            "a",
            request("a", LeaseAction::Acquire, None, old),
            f.key("a"),
        )
        .await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("stale_request")),
        "{e}"
    );
    let (st, e) = f.post("b", body, f.key("b")).await;
    assert_eq!(
        (st, e["error"].as_str()),
        (400, Some("node_mismatch")),
        "{e}"
    );
    let doc = f.doc().await;
    assert!(doc.holders.is_empty() && doc.log.is_empty(), "{doc:?}");
    f.s.stop().await;
}

#[tokio::test]
async fn the_holders_survive_a_restart_of_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let publisher = SecretKey::generate("pub").unwrap();
    let key = SecretKey::generate("a").unwrap();
    let s = Server::configured(dir.path(), &publisher, |_| {}).await;
    put(
        &s.url,
        "a",
        sealed(&publisher, &support::manifest("a", 1, Some(&key))),
    )
    .await;
    let env = Envelope::seal(
        Context::RebootLease,
        &request("a", LeaseAction::Acquire, None, Timestamp::now()),
        &[&key],
    )
    .to_bytes();
    let (st, _) = send(
        reqwest::Client::new()
            .post(v1::reboot_lease_url(&s.url, "a"))
            .body(env),
    )
    .await;
    assert_eq!(st, 200);
    s.stop().await;
    let s = Server::configured(dir.path(), &publisher, |_| {}).await;
    let (_, body) = send(reqwest::Client::new().get(v1::reboot_leases_url(&s.url))).await;
    assert_eq!(body["holders"][0]["node"], "a", "{body}");
    s.stop().await;
}
