//! The state machine in process, against the fake store ([`FakeNix`]) and the test
//! coordinator: no root, no Nix. Profiles live in a temporary folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use roost_agent::nixops::NixOps;
use roost_agent::state::StateDir;
use roost_agent::{Agent, FakeNix, ShiftedClock, SystemClock, Verdict, WallClock};
use roost_common::nix::profiles;
use roost_common::{StorePath, Timestamp};
use serde_json::{Value, json};

use crate::coordinator::TestCoordinator;
use crate::support::{self, NODE, Publisher, fake_store_path};

const NAR: &str = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
const CACHE_URL: &str = "file:///roost-test-cache";
const CACHE_KEY: &str = "cache-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

struct World {
    dir: tempfile::TempDir,
    publisher: Publisher,
    nix: Arc<FakeNix>,
}

impl World {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            publisher: Publisher::new("publisher-1"),
            nix: Arc::new(FakeNix::new()),
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn profile_link(&self) -> PathBuf {
        self.dir.path().join("profiles/system")
    }

    fn agent(&self, coordinators: Vec<String>) -> Agent {
        self.agent_with_clock(coordinators, Arc::new(SystemClock))
    }

    fn agent_with_clock(&self, coordinators: Vec<String>, clock: Arc<dyn WallClock>) -> Agent {
        let cfg = support::config(&self.state_dir(), coordinators, &self.publisher);
        Agent::new(cfg, self.nix.clone(), clock).unwrap()
    }

    /// A profile whose closure is in the fake cache.
    fn profile(&self, name: &str, extra: Value) -> Value {
        let path = fake_store_path(name);
        self.nix.add_to_cache(&path.parse().unwrap(), NAR);
        let mut p = json!({
            "name": "system",
            "path": path,
            "nar_hash": NAR,
            "profile_path": self.profile_link(),
            "activation": {"kind": "none"},
            "confirm_timeout_s": 2,
        });
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    }

    fn manifest(&self, version: u64, profiles: Vec<Value>) -> Value {
        let mut m = support::manifest(version, profiles);
        m["substituters"] = json!([{"url": CACHE_URL, "public_keys": [CACHE_KEY]}]);
        m
    }

    fn signed(&self, version: u64, profiles: Vec<Value>) -> Vec<u8> {
        self.publisher.sign(&self.manifest(version, profiles))
    }

    fn current(&self) -> Option<(u64, String)> {
        profiles::current(&self.profile_link())
            .unwrap()
            .map(|g| (g.number, g.target.display().to_string()))
    }

    fn reports(&self) -> Vec<(u64, Value)> {
        support::queued_reports(&self.state_dir())
    }
}

fn failing_check() -> Value {
    json!({"health_checks": [{"kind": "command", "argv": ["/bin/sh", "-c", "exit 3"], "timeout_s": 5}]})
}

#[tokio::test(start_paused = true)]
async fn an_accepted_manifest_is_realised_switched_and_reported() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    let p = w.profile("sys-v1", json!({}));
    let v = agent
        .handle_manifest(&w.signed(1, vec![p.clone()]), None)
        .await;
    assert_eq!(v, Verdict::Converged);
    assert_eq!(w.current(), Some((1, fake_store_path("sys-v1"))));
    let calls = w.nix.realise_calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].substituters, vec![CACHE_URL.to_owned()]);
    assert_eq!(calls[0].trusted_public_keys, vec![CACHE_KEY.to_owned()]);
    assert!(calls[0].timeout.is_some(), "a realisation must be killable");
    let reports = w.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].1["state"], "success");
    assert_eq!(reports[0].1["profiles"][0]["generation"], 1);
    assert_eq!(agent.state().current_version.map(|v| v.0), Some(1));
    assert!(agent.state().pending.is_none());
}

#[tokio::test]
async fn substituters_and_keys_are_the_manifests_plus_the_configs_only() {
    let w = World::new();
    let mut f: roost_agent::ConfigFile = roost_agent::ConfigFile {
        node: Some(NODE.into()),
        trusted_keys: vec![w.publisher.public_file.clone()],
        state_dir: Some(w.state_dir()),
        extra_substituters: vec!["https://extra.example".into()],
        extra_trusted_public_keys: vec![
            roost_common::SecretKey::generate("extra-1")
                .unwrap()
                .public()
                .to_string(),
        ],
        ca_certs: vec![],
        ..Default::default()
    };
    f.realise_timeout = Some("90s".into());
    let mut agent = Agent::new(f.resolve().unwrap(), w.nix.clone(), Arc::new(SystemClock)).unwrap();
    let p = w.profile("sys-v1", json!({}));
    agent.handle_manifest(&w.signed(1, vec![p]), None).await;
    let c = &w.nix.realise_calls()[0];
    assert_eq!(
        c.substituters,
        vec![CACHE_URL.to_owned(), "https://extra.example".into()]
    );
    assert_eq!(c.trusted_public_keys.len(), 2);
    assert_eq!(c.timeout, Some(Duration::from_secs(90)));
}

#[tokio::test(start_paused = true)]
async fn a_failed_health_check_rolls_back_to_the_exact_previous_generation() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    // Generations 1, 2, 3 exist and the operator has the profile at 2: "previous" is 2,
    // not 3 (what `nix-env --rollback` from 3 would pick) nor 1.
    for (v, name) in [(1, "a"), (2, "b"), (3, "c")] {
        let p = w.profile(name, json!({}));
        assert_eq!(
            agent.handle_manifest(&w.signed(v, vec![p]), None).await,
            Verdict::Converged
        );
    }
    profiles::switch_to(&w.profile_link(), 2).unwrap();
    let bad = w.profile("bad", failing_check());
    let v = agent.handle_manifest(&w.signed(4, vec![bad]), None).await;
    assert_eq!(v, Verdict::NotConverged);
    assert_eq!(w.current(), Some((2, fake_store_path("b"))));
    assert!(agent.state().quarantined.contains(&4));
    assert!(agent.state().pending.is_none());
    let last = w.reports().pop().unwrap().1;
    assert_eq!(last["state"], "rolled_back");
    assert_eq!(last["error"]["phase"], "confirm");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("command:/bin/sh"),
        "{last}"
    );
    assert_eq!(last["health"][0]["ok"], false);
}

#[tokio::test(start_paused = true)]
async fn a_nix_that_cannot_check_the_closure_defers_and_never_quarantines() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    let p = w.profile("good", json!({}));
    let bytes = w.signed(1, vec![p]);
    w.nix.fail_path_info(1);
    assert_eq!(
        agent.handle_manifest(&bytes, None).await,
        Verdict::NotConverged
    );
    assert!(agent.state().quarantined.is_empty());
    assert_eq!(w.current(), None, "switched before the closure was checked");
    let last = w.reports().pop().unwrap().1;
    assert_eq!(last["state"], "deferred", "{last}");
    assert_eq!(last["error"]["phase"], "verify-closure", "{last}");
    assert!(
        last["security_events"]
            .as_array()
            .is_none_or(|e| e.is_empty()),
        "{last}"
    );
    // Nix works again: the same version deploys.
    assert_eq!(agent.deploy_if_needed().await, Verdict::Converged);
    assert_eq!(w.current().unwrap().1, fake_store_path("good"));
}

#[tokio::test(start_paused = true)]
async fn a_quarantined_version_is_not_retried_and_a_newer_one_deploys() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    let good = w.profile("good", json!({}));
    agent.handle_manifest(&w.signed(1, vec![good]), None).await;
    let bad_bytes = w.signed(2, vec![w.profile("bad", failing_check())]);
    assert_eq!(
        agent.handle_manifest(&bad_bytes, None).await,
        Verdict::NotConverged
    );
    let calls = w.nix.counts();
    let reports = w.reports().len();
    // The same manifest again (as every poll would bring it), and a bare retry.
    assert_eq!(
        agent.handle_manifest(&bad_bytes, None).await,
        Verdict::NotConverged
    );
    assert_eq!(agent.deploy_if_needed().await, Verdict::NotConverged);
    assert_eq!(w.nix.counts(), calls, "a quarantined version touched Nix");
    assert_eq!(w.reports().len(), reports);
    assert_eq!(w.current(), Some((1, fake_store_path("good"))));
    // A newer version deploys and clears the quarantine of the older one.
    let newer = w.profile("newer", json!({}));
    assert_eq!(
        agent.handle_manifest(&w.signed(3, vec![newer]), None).await,
        Verdict::Converged
    );
    assert_eq!(w.current().unwrap().1, fake_store_path("newer"));
    assert!(agent.state().quarantined.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failed_first_deploy_leaves_no_profile_behind() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    let bad = w.profile("bad", failing_check());
    assert_eq!(
        agent.handle_manifest(&w.signed(1, vec![bad]), None).await,
        Verdict::NotConverged
    );
    assert!(std::fs::symlink_metadata(w.profile_link()).is_err());
    assert!(
        profiles::generations(&w.profile_link()).unwrap().is_empty(),
        "the failed generation is still a GC root"
    );
    let last = w.reports().pop().unwrap().1;
    assert_eq!(last["state"], "rolled_back");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no previous generation")
    );
}

#[tokio::test(start_paused = true)]
async fn an_activation_that_cannot_start_is_rolled_back() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    agent
        .handle_manifest(&w.signed(1, vec![w.profile("good", json!({}))]), None)
        .await;
    // The fake store has no files: the program inside the path does not exist.
    let bad = w.profile(
        "bad",
        json!({"activation": {"kind": "command", "argv": ["bin/activate"]}}),
    );
    assert_eq!(
        agent.handle_manifest(&w.signed(2, vec![bad]), None).await,
        Verdict::NotConverged
    );
    assert_eq!(w.current(), Some((1, fake_store_path("good"))));
    let last = w.reports().pop().unwrap().1;
    assert_eq!(last["state"], "rolled_back");
    assert_eq!(last["error"]["phase"], "activate");
}

#[tokio::test(start_paused = true)]
async fn without_auto_rollback_a_failure_stays_on_the_new_version_and_says_so() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    agent
        .handle_manifest(&w.signed(1, vec![w.profile("good", json!({}))]), None)
        .await;
    let mut extra = failing_check();
    extra["auto_rollback"] = json!(false);
    let bad = w.profile("bad", extra);
    agent.handle_manifest(&w.signed(2, vec![bad]), None).await;
    assert_eq!(w.current(), Some((2, fake_store_path("bad"))));
    let last = w.reports().pop().unwrap().1;
    assert_eq!(last["state"], "failed");
    assert!(agent.state().quarantined.contains(&2));
}

#[tokio::test]
async fn each_profile_rolls_back_by_its_own_auto_rollback_as_in_deploy_rs() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    let home_link = w.dir.path().join("profiles/home");
    let home = |name: &str, extra: Value| {
        let mut p = w.profile(name, extra);
        p["name"] = json!("home");
        p["profile_path"] = json!(home_link);
        p
    };
    let home_at = || {
        profiles::current(&home_link)
            .unwrap()
            .map(|g| g.target.display().to_string())
    };
    agent
        .handle_manifest(
            &w.signed(
                1,
                vec![w.profile("sys-1", json!({})), home("home-1", json!({}))],
            ),
            None,
        )
        .await;
    // `home` keeps what it gets (auto_rollback off); the system's check fails.
    let v2 = vec![
        w.profile("sys-2", failing_check()),
        home("home-2", json!({"auto_rollback": false})),
    ];
    agent.handle_manifest(&w.signed(2, v2), None).await;
    assert_eq!(
        w.current(),
        Some((1, fake_store_path("sys-1"))),
        "system rolled back"
    );
    assert_eq!(home_at(), Some(fake_store_path("home-2")), "home stays");
    let last = w.reports().pop().unwrap().1;
    assert_eq!(
        last["state"], "failed",
        "not every profile went back: {last}"
    );
    let msg = last["error"]["message"].as_str().unwrap();
    assert!(msg.contains("auto_rollback is off for home"), "{msg}");
}

#[tokio::test(start_paused = true)]
async fn a_closure_missing_from_the_cache_is_deferred_reported_once_and_retried() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    let path = fake_store_path("late");
    let p = json!({"name": "system", "path": path, "profile_path": w.profile_link()});
    let bytes = w.signed(1, vec![p]);
    assert_eq!(
        agent.handle_manifest(&bytes, None).await,
        Verdict::NotConverged
    );
    assert_eq!(agent.deploy_if_needed().await, Verdict::NotConverged);
    let reports = w.reports();
    assert_eq!(reports.len(), 1, "a deferred retry is reported once");
    assert_eq!(reports[0].1["state"], "deferred");
    assert!(
        agent.state().quarantined.is_empty(),
        "deferred is not a failure"
    );
    assert!(std::fs::symlink_metadata(w.profile_link()).is_err());
    // The closure reaches the cache; the next poll deploys it.
    w.nix.add_to_cache(&path.parse().unwrap(), NAR);
    assert_eq!(agent.deploy_if_needed().await, Verdict::Converged);
    assert_eq!(w.current(), Some((1, path)));
}

#[tokio::test(start_paused = true)]
async fn a_nar_hash_mismatch_quarantines_without_touching_the_profile() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    agent
        .handle_manifest(&w.signed(1, vec![w.profile("good", json!({}))]), None)
        .await;
    let p = w.profile(
        "tampered",
        json!({"nar_hash": "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}),
    );
    assert_eq!(
        agent.handle_manifest(&w.signed(2, vec![p]), None).await,
        Verdict::NotConverged
    );
    assert_eq!(w.current(), Some((1, fake_store_path("good"))));
    let last = w.reports().pop().unwrap().1;
    assert_eq!(last["state"], "failed");
    assert_eq!(last["error"]["phase"], "verify-closure");
    assert!(agent.state().quarantined.contains(&2));
}

/// Each bad manifest is refused, reported with its reason, and changes nothing else.
#[tokio::test(start_paused = true)]
async fn bad_manifests_are_refused_and_change_nothing_but_the_report_queue() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    let good = w.profile("good", json!({}));
    assert_eq!(
        agent
            .handle_manifest(&w.signed(5, vec![good.clone()]), None)
            .await,
        Verdict::Converged
    );
    let forger = Publisher::new("publisher-1"); // same name, different key
    let stranger = Publisher::new("stranger");
    let fresh = w.profile("fresh", json!({}));
    let mut expired = w.manifest(6, vec![fresh.clone()]);
    expired["issued_at"] = json!("2020-01-01T00:00:00Z");
    expired["expires_at"] = json!("2020-02-01T00:00:00Z");
    let mut other_node = w.manifest(6, vec![fresh.clone()]);
    other_node["node"] = json!("pi-garage");
    let mut other_system = w.manifest(6, vec![fresh.clone()]);
    other_system["system"] = json!("riscv64-plan9");
    let mut not_store = w.manifest(6, vec![fresh.clone()]);
    not_store["profiles"][0]["path"] = json!("/tmp/evil");
    let mut drv_escape = w.manifest(6, vec![fresh.clone()]);
    drv_escape["profiles"][0]["drv_path"] = json!("/nix/store/../../etc/shadow");
    let mut traversal = w.manifest(6, vec![fresh.clone()]);
    traversal["profiles"][0]["profile_path"] = json!("/nix/var/nix/profiles/../../../etc/x");
    let mut cmd_escape = w.manifest(6, vec![fresh.clone()]);
    cmd_escape["profiles"][0]["activation"] = json!({"kind": "command", "argv": ["../../bin/sh"]});
    let mut bad_name = w.manifest(6, vec![fresh.clone()]);
    bad_name["profiles"][0]["name"] = json!("..");
    let mut reused = w.manifest(5, vec![fresh.clone()]);
    reused["rollout"] = json!({"wave": 3});
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "forged",
            forger.sign(&w.manifest(6, vec![fresh.clone()])),
            "bad_signature",
        ),
        (
            "untrusted",
            stranger.sign(&w.manifest(6, vec![fresh.clone()])),
            "bad_signature",
        ),
        ("replayed", w.signed(4, vec![fresh.clone()]), "below_floor"),
        (
            "version reused",
            w.publisher.sign(&reused),
            "version_reused",
        ),
        ("expired", w.publisher.sign(&expired), "expired"),
        ("wrong node", w.publisher.sign(&other_node), "wrong_node"),
        (
            "wrong system",
            w.publisher.sign(&other_system),
            "wrong_system",
        ),
        (
            "non-store path",
            w.publisher.sign(&not_store),
            "invalid_payload",
        ),
        (
            "drv traversal",
            w.publisher.sign(&drv_escape),
            "invalid_payload",
        ),
        (
            "profile_path traversal",
            w.publisher.sign(&traversal),
            "invalid_payload",
        ),
        (
            "command traversal",
            w.publisher.sign(&cmd_escape),
            "command_outside_profile",
        ),
        (
            "profile name",
            w.publisher.sign(&bad_name),
            "invalid_payload",
        ),
        ("garbage", b"{not json".to_vec(), "malformed_envelope"),
    ];
    let profile_before = w.current();
    for (what, bytes, code) in cases {
        let before = support::snapshot_without_reports(&w.state_dir());
        let queued = w.reports().len();
        let calls = w.nix.counts();
        assert_eq!(
            agent.handle_manifest(&bytes, None).await,
            Verdict::NotConverged,
            "{what}"
        );
        assert_eq!(
            support::snapshot_without_reports(&w.state_dir()),
            before,
            "{what}: the state folder changed"
        );
        assert_eq!(w.nix.counts(), calls, "{what}: Nix was called");
        assert_eq!(w.current(), profile_before, "{what}: the profile moved");
        let reports = w.reports();
        assert_eq!(reports.len(), queued + 1, "{what}: not reported");
        let r = &reports.last().unwrap().1;
        assert_eq!(r["state"], "rejected", "{what}");
        let msg = r["error"]["message"].as_str().unwrap();
        assert!(msg.contains(code), "{what}: {msg}");
    }
    // Forgeries and replays are security events in the reports.
    let events: Vec<String> = w
        .reports()
        .iter()
        .flat_map(|(_, r)| r["security_events"].as_array().cloned().unwrap_or_default())
        .map(|e| e.as_str().unwrap().to_owned())
        .collect();
    assert!(events.iter().any(|e| e.starts_with("bad_signature")));
    assert!(events.iter().any(|e| e.starts_with("below_floor")));
}

#[tokio::test(start_paused = true)]
async fn the_same_refused_bytes_are_reported_once_per_run() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    let bytes = Publisher::new("stranger").sign(&w.manifest(1, vec![w.profile("x", json!({}))]));
    agent.handle_manifest(&bytes, None).await;
    agent.handle_manifest(&bytes, None).await;
    assert_eq!(w.reports().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_floor_survives_a_restart() {
    let w = World::new();
    {
        let mut agent = w.agent(vec![]);
        agent
            .handle_manifest(&w.signed(7, vec![w.profile("a", json!({}))]), None)
            .await;
    }
    let mut agent = w.agent(vec![]);
    let old = w.signed(6, vec![w.profile("b", json!({}))]);
    assert_eq!(
        agent.handle_manifest(&old, None).await,
        Verdict::NotConverged
    );
    assert_eq!(w.current().unwrap().1, fake_store_path("a"));
}

#[tokio::test(start_paused = true)]
async fn an_unchanged_manifest_does_nothing() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    let bytes = w.signed(1, vec![w.profile("a", json!({}))]);
    agent.handle_manifest(&bytes, None).await;
    let calls = w.nix.counts();
    let before = support::snapshot_without_reports(&w.state_dir());
    assert_eq!(
        agent.handle_manifest(&bytes, None).await,
        Verdict::Converged
    );
    assert_eq!(w.nix.counts(), calls);
    assert_eq!(support::snapshot_without_reports(&w.state_dir()), before);
}

/// Writes a pending record as a crash between switch and confirmation would leave it.
async fn crashed_mid_deploy(w: &World, activated: bool, deadline_passed: bool) -> Agent {
    let mut agent = w.agent(vec![]);
    agent
        .handle_manifest(&w.signed(1, vec![w.profile("old", json!({}))]), None)
        .await;
    let new = w.profile("new", json!({}));
    let m: roost_common::wire::v1::Manifest =
        serde_json::from_value(w.manifest(2, vec![new])).unwrap();
    let path: StorePath = fake_store_path("new").parse().unwrap();
    w.nix
        .realise(
            std::slice::from_ref(&path),
            &roost_common::nix::RealiseOptions {
                substituters: vec![CACHE_URL.into()],
                ..Default::default()
            },
        )
        .unwrap();
    w.nix.set_profile(&w.profile_link(), &path).unwrap();
    let sd = StateDir::new(&w.state_dir());
    let mut st = sd.load().unwrap();
    st.desired = Some(m);
    let now = Timestamp::now();
    st.pending = Some(roost_agent::state::Pending {
        version: roost_common::Version(2),
        deadline: if deadline_passed {
            Timestamp::from_unix(now.unix() - 10)
        } else {
            now.plus(Duration::from_secs(600))
        },
        started_at: now,
        coordinator_reachable_before: false,
        profiles: vec![roost_agent::state::PendingProfile {
            name: "system".into(),
            profile_path: w.profile_link(),
            previous_generation: Some(1),
            previous_path: Some(fake_store_path("old")),
            previous_link: Some("system-1-link".into()),
            previous_spec: None,
            new_path: path.to_string(),
            new_generation: Some(2),
            switched: true,
            activated,
            activation: None,
        }],
    });
    sd.save(&st).unwrap();
    drop(agent);
    agent = w.agent(vec![]);
    agent
}

#[tokio::test(start_paused = true)]
async fn recovery_confirms_a_deploy_that_was_activated_in_time() {
    let w = World::new();
    let mut agent = crashed_mid_deploy(&w, true, false).await;
    assert_eq!(agent.recover().await, Verdict::Converged);
    assert_eq!(w.current(), Some((2, fake_store_path("new"))));
    assert!(agent.state().pending.is_none());
    assert_eq!(w.reports().pop().unwrap().1["state"], "success");
}

#[tokio::test(start_paused = true)]
async fn recovery_rolls_back_a_deploy_interrupted_during_activation() {
    let w = World::new();
    let mut agent = crashed_mid_deploy(&w, false, false).await;
    assert_eq!(agent.recover().await, Verdict::NotConverged);
    assert_eq!(w.current(), Some((1, fake_store_path("old"))));
    assert!(agent.state().pending.is_none());
    assert!(agent.state().quarantined.contains(&2));
    let last = w.reports().pop().unwrap().1;
    assert_eq!(last["state"], "rolled_back");
    assert_eq!(last["error"]["phase"], "recover");
}

#[tokio::test(start_paused = true)]
async fn recovery_rolls_back_when_the_confirmation_deadline_passed() {
    let w = World::new();
    let mut agent = crashed_mid_deploy(&w, true, true).await;
    assert_eq!(agent.recover().await, Verdict::NotConverged);
    assert_eq!(w.current(), Some((1, fake_store_path("old"))));
    assert!(
        w.reports().pop().unwrap().1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("deadline")
    );
}

#[tokio::test(start_paused = true)]
async fn an_outcome_recorded_but_never_queued_is_reported_at_start() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    agent
        .handle_manifest(&w.signed(1, vec![w.profile("a", json!({}))]), None)
        .await;
    drop(agent);
    // As if the agent died between saving the outcome and queueing its report.
    let sd = StateDir::new(&w.state_dir());
    let mut st = sd.load().unwrap();
    st.last_deploy.as_mut().unwrap().report_seq = None;
    sd.save(&st).unwrap();
    for (_, p) in sd.queued_reports() {
        std::fs::remove_file(p).unwrap();
    }
    let mut agent = w.agent(vec![]);
    agent.recover().await;
    let reports = w.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].1["state"], "success");
    assert_eq!(reports[0].1["manifest_version"], 1);
}

#[tokio::test(start_paused = true)]
async fn manual_rollback_goes_to_the_previous_generation_and_quarantines() {
    let w = World::new();
    let mut agent = w.agent(vec![]);
    for (v, n) in [(1, "a"), (2, "b")] {
        agent
            .handle_manifest(&w.signed(v, vec![w.profile(n, json!({}))]), None)
            .await;
    }
    let before = support::snapshot_without_reports(&w.state_dir());
    let err = agent.manual_rollback(Some("nope")).await.unwrap_err();
    assert!(err.to_string().contains("no profile `nope`"), "{err}");
    assert_eq!(support::snapshot_without_reports(&w.state_dir()), before);
    let done = agent.manual_rollback(Some("system")).await.unwrap();
    assert!(done[0].contains("generation 2 → 1"), "{done:?}");
    assert_eq!(w.current(), Some((1, fake_store_path("a"))));
    assert!(agent.state().quarantined.contains(&2));
    assert_eq!(w.reports().pop().unwrap().1["state"], "rolled_back");
    // The next poll does not re-apply version 2.
    assert_eq!(agent.deploy_if_needed().await, Verdict::NotConverged);
    assert_eq!(w.current(), Some((1, fake_store_path("a"))));
}

// --- with the test coordinator ---

#[tokio::test]
async fn an_idle_poll_writes_nothing_and_calls_no_nix() {
    let c = TestCoordinator::start();
    let w = World::new();
    let mut agent = w.agent(vec![c.url()]);
    c.publish(&w.signed(1, vec![w.profile("a", json!({}))]));
    let r = roost_agent::daemon::cycle(&mut agent, None).await;
    assert_eq!(r.verdict, Verdict::Converged);
    assert_eq!(c.reports().len(), 1, "the success report was delivered");
    agent.note_poll(&r.poll, None, 0);
    let calls = w.nix.counts();
    let files = support::snapshot_without_reports(&w.state_dir());
    let times = mtimes(&w.state_dir());
    for _ in 0..5 {
        let r = roost_agent::daemon::cycle(&mut agent, None).await;
        assert_eq!(r.poll, "not modified");
        agent.note_poll(&r.poll, None, 0);
    }
    assert_eq!(w.nix.counts(), calls, "an idle poll called Nix");
    assert_eq!(support::snapshot_without_reports(&w.state_dir()), files);
    assert_eq!(mtimes(&w.state_dir()), times, "an idle poll wrote to disk");
    let gets: Vec<_> = c
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET")
        .collect();
    assert!(gets[1..].iter().all(|r| r.if_none_match.is_some()));
}

fn mtimes(dir: &Path) -> Vec<(PathBuf, std::time::SystemTime)> {
    let mut v = Vec::new();
    fn walk(d: &Path, v: &mut Vec<(PathBuf, std::time::SystemTime)>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            v.push((e.path(), m.modified().unwrap()));
            if m.is_dir() {
                walk(&e.path(), v);
            }
        }
    }
    walk(dir, &mut v);
    v.sort();
    v
}

#[tokio::test]
async fn a_long_poll_returns_as_soon_as_a_new_manifest_is_published() {
    let c = TestCoordinator::start();
    let w = World::new();
    let mut agent = w.agent(vec![c.url()]);
    c.publish(&w.signed(1, vec![w.profile("a", json!({}))]));
    roost_agent::daemon::cycle(&mut agent, None).await;
    assert!(agent.long_poll_offered());
    let next = w.signed(2, vec![w.profile("b", json!({}))]);
    let t = std::time::Instant::now();
    let (r, _) = tokio::join!(roost_agent::daemon::cycle(&mut agent, Some(60)), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.publish(&next);
    });
    assert_eq!(r.poll, "new manifest");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "the long-poll was not woken"
    );
    assert_eq!(w.current().unwrap().1, fake_store_path("b"));
    let long_poll = roost_common::wire::v1::http::long_poll_url("", support::NODE, 60);
    assert!(c.requests().iter().any(|r| r.target == long_poll));
}

#[tokio::test]
async fn coordinators_are_tried_in_order() {
    let c = TestCoordinator::start();
    let w = World::new();
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let mut agent = w.agent(vec![dead, c.url()]);
    c.publish(&w.signed(1, vec![w.profile("a", json!({}))]));
    let r = roost_agent::daemon::cycle(&mut agent, None).await;
    assert_eq!(r.verdict, Verdict::Converged);
    assert_eq!(c.reports().len(), 1);
}

#[tokio::test]
async fn reports_queue_while_the_coordinator_is_down_and_arrive_in_order() {
    let c = TestCoordinator::start();
    let w = World::new();
    let mut agent = w.agent(vec![c.url()]);
    c.set_down(true);
    agent
        .handle_manifest(&w.signed(1, vec![w.profile("a", json!({}))]), None)
        .await;
    agent
        .handle_manifest(&w.signed(2, vec![w.profile("b", failing_check())]), None)
        .await;
    agent
        .handle_manifest(&w.signed(3, vec![w.profile("c", json!({}))]), None)
        .await;
    assert_eq!(agent.flush_reports().await, 3);
    assert_eq!(w.reports().len(), 3, "reports are not on disk");
    assert!(c.reports().is_empty());
    c.set_down(false);
    assert_eq!(agent.flush_reports().await, 0);
    let got = c.reports();
    let states: Vec<_> = got.iter().map(|r| r.state.as_str()).collect();
    assert_eq!(states, vec!["success", "rolled_back", "success"]);
    assert!(got.windows(2).all(|p| p[0].seq < p[1].seq));
    assert!(w.reports().is_empty(), "delivered reports stay queued");
}

#[tokio::test]
async fn a_report_already_received_counts_as_delivered() {
    let c = TestCoordinator::start();
    let w = World::new();
    let mut agent = w.agent(vec![c.url()]);
    agent
        .handle_manifest(&w.signed(1, vec![w.profile("a", json!({}))]), None)
        .await;
    assert_eq!(agent.flush_reports().await, 0);
    // The delivery was not recorded (a crash right after the POST): the report is back.
    let sd = StateDir::new(&w.state_dir());
    let r = c.reports();
    let env = roost_common::envelope::Envelope::seal(
        roost_common::envelope::Context::Report,
        &serde_json::to_vec(&r[0]).unwrap(),
        &[&sd.node_key(NODE).unwrap()],
    );
    sd.queue_report(r[0].seq, &env.to_bytes()).unwrap();
    assert_eq!(agent.flush_reports().await, 0, "a 409 must empty the queue");
    assert_eq!(c.reports().len(), 1);
}

/// Version 1, then version 2 (with `extra` profile settings) whose "switch" cuts the network
/// (a health check stands in for the activation here); the reports flushed once it is back.
async fn a_switch_that_cuts_the_coordinator_off(extra: Value) -> (World, TestCoordinator, Verdict) {
    let c = TestCoordinator::start();
    let w = World::new();
    let cut = w.dir.path().join("network-cut");
    c.down_while_exists(cut.clone());
    let mut agent = w.agent(vec![c.url()]);
    c.publish(&w.signed(1, vec![w.profile("a", json!({}))]));
    roost_agent::daemon::cycle(&mut agent, None).await;
    let mut settings = json!({"health_checks": [{"kind": "command", "argv": ["/bin/sh", "-c", format!("touch {}", cut.display())]}],
           "confirm_timeout_s": 3});
    for (k, v) in extra.as_object().unwrap() {
        settings[k] = v.clone();
    }
    c.publish(&w.signed(2, vec![w.profile("breaks-network", settings)]));
    let r = roost_agent::daemon::cycle(&mut agent, None).await;
    std::fs::remove_file(&cut).unwrap();
    agent.flush_reports().await;
    (w, c, r.verdict)
}

#[tokio::test]
async fn magic_rollback_when_the_coordinator_is_gone_after_the_switch() {
    let (w, c, verdict) = a_switch_that_cuts_the_coordinator_off(json!({})).await;
    assert_eq!(verdict, Verdict::NotConverged);
    assert_eq!(w.current(), Some((1, fake_store_path("a"))));
    let last = c.reports().pop().unwrap();
    assert_eq!(last.state.as_str(), "rolled_back");
    assert!(last.error.unwrap().message.contains("magic rollback"));
}

#[tokio::test]
async fn magic_rollback_rolls_back_even_without_auto_rollback_as_in_deploy_rs() {
    // deploy-rs's activate-rs deactivates when confirmation never comes, autoRollback or not.
    let (w, c, _) = a_switch_that_cuts_the_coordinator_off(json!({"auto_rollback": false})).await;
    assert_eq!(w.current(), Some((1, fake_store_path("a"))));
    assert_eq!(c.reports().pop().unwrap().state.as_str(), "rolled_back");
}

#[tokio::test]
async fn an_http_health_check_must_answer_2xx() {
    let c = TestCoordinator::start();
    let w = World::new();
    let mut agent = w.agent(vec![]);
    agent
        .handle_manifest(&w.signed(1, vec![w.profile("a", json!({}))]), None)
        .await;
    c.set_health(503);
    let p = w.profile(
        "b",
        json!({"health_checks": [{"kind": "http", "url": format!("{}/health", c.url()), "timeout_s": 2}]}),
    );
    agent.handle_manifest(&w.signed(2, vec![p]), None).await;
    assert_eq!(w.current(), Some((1, fake_store_path("a"))));
    let last = w.reports().pop().unwrap().1;
    assert!(
        last["health"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("503"),
        "{last}"
    );
    c.set_health(200);
    let p = w.profile(
        "c",
        json!({"health_checks": [{"kind": "http", "url": format!("{}/health", c.url())}]}),
    );
    assert_eq!(
        agent.handle_manifest(&w.signed(3, vec![p]), None).await,
        Verdict::Converged
    );
}

#[tokio::test]
async fn status_has_every_field_the_issue_lists() {
    let c = TestCoordinator::start();
    let w = World::new();
    let mut agent = w.agent(vec![c.url()]);
    c.publish(&w.signed(1, vec![w.profile("a", json!({}))]));
    let r = roost_agent::daemon::cycle(&mut agent, None).await;
    agent.note_poll(&r.poll, Some(Timestamp::now()), 0);
    let typed = roost_agent::status::collect(&w.state_dir()).unwrap();
    let doc = serde_json::to_value(&typed).unwrap();
    for key in [
        "node",
        "manifest_version",
        "current_version",
        "profiles",
        "last_poll",
        "next_poll",
        "last_deploy",
        "pending",
        "pending_reports",
        "quarantined",
        "daemon_running",
    ] {
        assert!(doc.get(key).is_some(), "status lacks `{key}`: {doc}");
    }
    let p = &doc["profiles"][0];
    assert_eq!(p["current"], fake_store_path("a"));
    assert_eq!(p["desired"], fake_store_path("a"));
    assert_eq!(p["generation"], 1);
    assert_eq!(doc["manifest_version"], 1);
    assert_eq!(doc["last_poll"]["result"], "new manifest");
    assert_eq!(doc["last_deploy"]["state"], "success");
    let text = roost_agent::status::render(&typed);
    assert!(text.contains("last poll"), "{text}");
    assert!(text.contains("ago: new manifest"), "{text}");
}

#[tokio::test]
async fn the_daemon_serves_its_live_view_and_stops_on_shutdown() {
    let c = TestCoordinator::start();
    let w = World::new();
    let agent = w.agent(vec![c.url()]);
    c.publish(&w.signed(1, vec![w.profile("a", json!({}))]));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(roost_agent::daemon::run(
        agent,
        Arc::new(SystemClock),
        async move {
            let _ = stopped.await;
        },
    ));
    let end = std::time::Instant::now() + Duration::from_secs(20);
    let doc = loop {
        let state_dir = w.state_dir();
        let doc = tokio::task::spawn_blocking(move || roost_agent::status::collect(&state_dir))
            .await
            .unwrap()
            .unwrap();
        let doc = serde_json::to_value(doc).unwrap();
        // The outcome is recorded before its report is sent: wait for both.
        if doc["daemon_running"] == true
            && doc["last_deploy"]["state"] == "success"
            && doc["next_poll"].is_string()
            && !c.reports().is_empty()
        {
            break doc;
        }
        assert!(
            std::time::Instant::now() < end,
            "daemon did not converge: {doc}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(doc["last_poll"]["at"].is_string(), "{doc}");
    assert_eq!(c.reports().len(), 1);
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let sock = std::fs::metadata(w.state_dir().join("agent.sock")).unwrap();
    assert!(sock.file_type().is_socket());
    assert_eq!(
        sock.permissions().mode() & 0o777,
        0o600,
        "the status socket is root's only"
    );
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), daemon)
        .await
        .expect("the daemon did not stop")
        .unwrap()
        .unwrap();
    assert!(!w.state_dir().join("agent.sock").exists());
}

#[tokio::test]
async fn polls_are_held_open_only_where_the_coordinator_offers_it() {
    let c = TestCoordinator::start();
    let w = World::new();
    c.publish(&w.signed(1, vec![w.profile("a", json!({}))]));
    c.set_long_poll(false);
    let mut agent = w.agent(vec![c.url()]);
    let r = roost_agent::daemon::cycle(&mut agent, None).await;
    assert!(!agent.long_poll_offered());
    let d = roost_agent::daemon::next_delay(&agent, &r, 0);
    assert!(
        d >= Duration::from_millis(800),
        "plain polling waits the interval: {d:?}"
    );
    c.set_long_poll(true);
    let r = roost_agent::daemon::cycle(&mut agent, None).await;
    assert!(agent.long_poll_offered());
    // The plain poll that learns of long-polls is followed by one at once, not after an
    // interval (at the default 5 min a fresh agent waited that long, and found its
    // connection closed by the coordinator's idle timeout).
    let d = roost_agent::daemon::next_delay(&agent, &r, 0);
    assert!(
        d < Duration::from_millis(800),
        "the first long-poll waited an interval: {d:?}"
    );
    let r2 = roost_agent::daemon::cycle(&mut agent, Some(1)).await;
    assert_eq!(r2.poll, "not modified");
    assert!(r2.held);
    let d = roost_agent::daemon::next_delay(&agent, &r2, 0);
    assert!(
        d < Duration::from_millis(800),
        "a held poll is followed at once: {d:?}"
    );
    let unreachable = roost_agent::daemon::CycleResult {
        verdict: Verdict::Converged,
        poll: "failed: down".into(),
        reachable: false,
        held: false,
    };
    let d = roost_agent::daemon::next_delay(&agent, &unreachable, 8);
    assert!(
        d >= Duration::from_secs(500),
        "eight failures back off to minutes: {d:?}"
    );
}

#[tokio::test]
async fn a_deferred_manifest_that_expires_is_not_applied_late() {
    let w = World::new();
    let clock = Arc::new(ShiftedClock::new(0));
    let mut agent = w.agent_with_clock(vec![], clock.clone());
    let path = fake_store_path("late");
    let mut m = w.manifest(
        1,
        vec![json!({"name": "system", "path": path, "profile_path": w.profile_link()})],
    );
    let soon = Timestamp::now().plus(Duration::from_secs(2));
    m["expires_at"] = json!(soon.to_string());
    assert_eq!(
        agent.handle_manifest(&w.publisher.sign(&m), None).await,
        Verdict::NotConverged
    );
    w.nix.add_to_cache(&path.parse().unwrap(), NAR);
    clock.shift(3);
    let calls = w.nix.counts();
    assert_eq!(agent.deploy_if_needed().await, Verdict::NotConverged);
    assert_eq!(w.nix.counts(), calls, "an expired manifest was realised");
    assert!(std::fs::symlink_metadata(w.profile_link()).is_err());
    let last = w.reports().pop().unwrap().1;
    assert_eq!(last["state"], "rejected");
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
}

#[tokio::test]
async fn a_chunked_manifest_body_is_cut_off_at_the_cap_not_read_to_its_end() {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::{AtomicU64, Ordering};
    // A coordinator that answers with a chunked body of up to 1 GiB: no Content-Length to
    // refuse it by.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sent = Arc::new(AtomicU64::new(0));
    let server = {
        let sent = sent.clone();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                line.clear();
            }
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\netag: \"big\"\r\n\r\n";
            s.write_all(head.as_bytes()).unwrap();
            let chunk = vec![b'x'; 64 * 1024];
            let frame = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
            while sent.load(Ordering::SeqCst) < 1 << 30 {
                if s.write_all(&frame).is_err() {
                    break;
                }
                sent.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        })
    };
    let w = World::new();
    let mut agent = w.agent(vec![url]);
    let r = roost_agent::daemon::cycle(&mut agent, None).await;
    assert!(r.poll.contains("over the limit"), "{}", r.poll);
    drop(agent);
    tokio::task::spawn_blocking(move || server.join().unwrap())
        .await
        .unwrap();
    let sent = sent.load(Ordering::SeqCst);
    // What the socket buffers held besides the 256 KiB read: a few MiB at most, not 1 GiB.
    assert!(
        sent < 32 << 20,
        "the agent read {sent} bytes of a body capped at 256 KiB"
    );
}

#[tokio::test]
async fn a_manifest_refused_as_expired_by_a_clock_jump_is_applied_once_the_clock_is_right() {
    let c = TestCoordinator::start();
    let w = World::new();
    let clock = Arc::new(ShiftedClock::new(0));
    let mut agent = w.agent_with_clock(vec![c.url()], clock.clone());
    c.publish(&w.signed(1, vec![w.profile("a", json!({}))]));
    // The wall clock jumps a year ahead: the manifest (valid for a day) is refused.
    clock.shift(365 * 86400);
    let r = roost_agent::daemon::cycle(&mut agent, None).await;
    assert_eq!(r.verdict, Verdict::NotConverged);
    assert_eq!(agent.last_manifest_refused(), Some("expired"));
    // Polled again, it is fetched again (not a 304 for its own ETag), and not as news.
    let r = roost_agent::daemon::cycle(&mut agent, None).await;
    assert_eq!(r.poll, "manifest refused (expired)", "not fetched again");
    assert!(
        !r.held,
        "a refused manifest fetched again made the agent poll at once"
    );
    // The clock is set right: the same manifest, no new publish, no restart, is applied.
    clock.shift(-365 * 86400);
    let r = roost_agent::daemon::cycle(&mut agent, None).await;
    assert_eq!(r.verdict, Verdict::Converged);
    assert_eq!(w.current().unwrap().1, fake_store_path("a"));
}
