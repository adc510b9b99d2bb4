//! `bench convergence-sim`: many agents in this process — each the real state machine and
//! daemon loop (`roost_agent::daemon::run`), polling the real coordinator over real HTTP —
//! with a fake Nix (`FakeNix`, wrapped to record when each node switches its profile, which
//! is where activation starts). What it measures is the protocol and the two programs, not
//! Nix: from a publish of every node's next version until each node starts activating and
//! until the coordinator has its success report, with long-poll and with plain polling.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use roost_agent::{Agent, ConfigFile, FakeNix, NixOps, SystemClock, WallClock};
use roost_common::nix::{NixError, PathInfo, RealiseOptions};
use roost_common::wire::v1::http as api;
use roost_common::wire::v1::{self, Manifest, Profile, Substituter};
use roost_common::{SecretKey, StorePath, Timestamp, Version};
use roost_tests::http::Conn;
use roost_tests::{Coordinator, Keys};
use serde_json::json;

use super::{Payload, mode_name, quantiles, upload};

const NAR: &str = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
const CACHE_URL: &str = "file:///roost-sim-cache";

/// A fake Nix that notes when each path becomes the profile's (activation starts then).
#[derive(Debug, Default)]
struct SimNix {
    fake: FakeNix,
    switched: Mutex<Vec<(StorePath, Instant)>>,
}

impl SimNix {
    fn switched_to(&self, path: &StorePath) -> Option<Instant> {
        let s = self.switched.lock().unwrap_or_else(|e| e.into_inner());
        s.iter().find(|(p, _)| p == path).map(|(_, t)| *t)
    }
}

impl NixOps for SimNix {
    fn realise(&self, paths: &[StorePath], opts: &RealiseOptions) -> Result<(), NixError> {
        self.fake.realise(paths, opts)
    }

    fn path_info(&self, paths: &[StorePath]) -> Result<Vec<PathInfo>, NixError> {
        self.fake.path_info(paths)
    }

    fn set_profile(&self, profile: &Path, path: &StorePath) -> Result<(), NixError> {
        let at = Instant::now();
        self.fake.set_profile(profile, path)?;
        let mut s = self.switched.lock().unwrap_or_else(|e| e.into_inner());
        s.push((path.clone(), at));
        Ok(())
    }

    fn reclaimable(&self) -> Result<u64, NixError> {
        self.fake.reclaimable()
    }

    fn collect_garbage(&self) -> Result<u64, NixError> {
        self.fake.collect_garbage()
    }

    fn counts(&self) -> BTreeMap<String, u64> {
        self.fake.counts()
    }
}

/// A store path unique to `name` (the hash part is fixed; names differ).
fn sim_path(name: &str) -> StorePath {
    format!("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-{name}")
        .parse()
        .expect("a valid store path")
}

struct SimNode {
    name: String,
    dir: PathBuf,
    nix: Arc<SimNix>,
}

impl SimNode {
    fn path(&self, version: u64) -> StorePath {
        sim_path(&format!("{}-v{version}", self.name))
    }

    fn manifest(&self, version: u64, system: &str, cache_key: &str) -> Vec<u8> {
        let now = Timestamp::now();
        let profile = json!({
            "name": "system",
            "path": self.path(version),
            "nar_hash": NAR,
            "profile_path": self.dir.join("profiles/system"),
            "activation": {"kind": "none"},
        });
        let m = Manifest {
            format: v1::FORMAT,
            node: self.name.parse().expect("a valid node name"),
            system: system.to_owned(),
            version: Version(version),
            issued_at: now,
            expires_at: now.plus(Duration::from_secs(86_400)),
            source: None,
            substituters: vec![Substituter {
                url: CACHE_URL.into(),
                public_keys: vec![cache_key.to_owned()],
            }],
            node_key: None,
            profiles: vec![serde_json::from_value::<Profile>(profile).expect("a valid profile")],
            rollout: Default::default(),
        };
        serde_json::to_vec(&m).expect("serialisable")
    }
}

/// Where the agents' state goes: tmpfs when there is one, so that 1,000 agents' fsyncs on
/// one shared disk (each real node has its own) do not stand in for the protocol's latency.
fn sim_root() -> anyhow::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    Ok(if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("roost-sim")
            .tempdir_in(shm)?
    } else {
        tempfile::tempdir()?
    })
}

/// Runs the scenario with `n` agents, first with long-poll, then with plain polling every
/// `interval_s` seconds.
pub async fn run(n: usize, interval_s: u64) -> anyhow::Result<()> {
    let root = sim_root()?;
    let keys = Keys::create(&root.path().join("keys"))?;
    let coordinator = Coordinator::start(root.path(), &keys)?;
    let addr = format!("127.0.0.1:{}", coordinator.port);
    let publisher = Arc::new(SecretKey::read_file(&keys.publisher_sec)?);
    for long_poll in [true, false] {
        let mode = if long_poll { "lp" } else { "pp" };
        let nodes: Vec<SimNode> = (0..n)
            .map(|i| {
                let name = format!("sim-{mode}-{i:04}");
                SimNode {
                    dir: root.path().join("nodes").join(&name),
                    nix: Arc::new(SimNix::default()),
                    name,
                }
            })
            .collect();
        let config = |node: &SimNode| {
            ConfigFile {
                coordinators: vec![format!("http://{addr}")],
                node: Some(node.name.clone()),
                trusted_keys: vec![keys.publisher_pub.clone()],
                state_dir: Some(node.dir.join("state")),
                interval: Some(format!("{interval_s}s")),
                long_poll: Some(long_poll),
                ..ConfigFile::default()
            }
            .resolve()
            .with_context(|| format!("configuration of {}", node.name))
        };
        let system = config(&nodes[0])?.system;
        for node in &nodes {
            std::fs::create_dir_all(node.dir.join("profiles"))?;
            for v in [1, 2] {
                node.nix.fake.add_to_cache(&node.path(v), NAR);
            }
        }
        let nodes = Arc::new(nodes);
        let payload = |version: u64| -> Payload {
            let (nodes, system, key) = (nodes.clone(), system.clone(), keys.cache_pub.clone());
            Arc::new(move |i: usize| {
                let node = &nodes[i];
                (node.name.clone(), node.manifest(version, &system, &key))
            })
        };
        upload(&addr, publisher.clone(), n, 8, payload(1)).await?;

        // Start the agents: with plain polling spread evenly over one interval, as a fleet's
        // polls are in steady state.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut agents = Vec::with_capacity(n);
        let started = Instant::now();
        for (i, node) in nodes.iter().enumerate() {
            let cfg = config(node)?;
            let clock: Arc<dyn WallClock> = Arc::new(SystemClock);
            let agent = Agent::new(cfg, node.nix.clone(), clock.clone())
                .with_context(|| format!("agent {}", node.name))?;
            let offset = if long_poll {
                Duration::ZERO
            } else {
                Duration::from_secs(interval_s).mul_f64(i as f64 / n as f64)
            };
            let mut stop = stop_rx.clone();
            agents.push(tokio::spawn(async move {
                tokio::time::sleep_until((started + offset).into()).await;
                let shutdown = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                roost_agent::daemon::run(agent, clock, shutdown).await
            }));
        }
        let first = Duration::from_secs(interval_s * 2 + 120);
        wait_all(&nodes, 1, Instant::now() + first).await?;
        eprintln!("{mode}: {n} agents at version 1");
        // Let every agent settle into its held poll (long-poll) or its polling rhythm.
        tokio::time::sleep(Duration::from_secs(3)).await;

        let t0 = Instant::now();
        let upload_took = upload(&addr, publisher.clone(), n, 8, payload(2)).await?;
        let published = t0 + upload_took;
        let deadline = published + Duration::from_secs(interval_s * 2 + 60);
        let mut activating: Vec<Option<Instant>> = vec![None; n];
        let mut success: Vec<Option<Instant>> = vec![None; n];
        let mut fleet = Conn::connect(&addr).await?;
        let bearer = format!("Bearer {}", coordinator.token);
        let auth = ("authorization", bearer.as_str());
        let index: BTreeMap<&str, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, x)| (x.name.as_str(), i))
            .collect();
        while success.iter().any(Option::is_none) && Instant::now() < deadline {
            for (i, node) in nodes.iter().enumerate() {
                if activating[i].is_none() {
                    activating[i] = node.nix.switched_to(&node.path(2));
                }
            }
            let r = fleet
                .request("GET", api::route::FLEET, &[auth], &[])
                .await?;
            let doc: serde_json::Value = serde_json::from_slice(&r.body)?;
            let now = Instant::now();
            for e in doc["nodes"].as_array().into_iter().flatten() {
                let Some(&i) = e["node"].as_str().and_then(|x| index.get(x)) else {
                    continue;
                };
                if success[i].is_none()
                    && e["last_report"]["manifest_version"].as_u64() == Some(2)
                    && e["last_report"]["state"] == "success"
                {
                    success[i] = Some(now);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = stop_tx.send(true);
        for a in agents {
            match tokio::time::timeout(Duration::from_secs(30), a).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => eprintln!("an agent stopped with: {e}"),
                Ok(Err(e)) => eprintln!("an agent panicked: {e}"),
                Err(_) => eprintln!("an agent did not stop within 30 s"),
            }
        }
        let since = |base: Instant, v: &[Option<Instant>]| {
            let ms: Vec<f64> = v.iter().flatten().map(|t| signed_ms(*t, base)).collect();
            quantiles(ms)
        };
        println!(
            "{}",
            json!({
                "scenario": "convergence-sim", "agents": n,
                "mode": mode_name(long_poll, interval_s),
                "publish_upload_ms": upload_took.as_secs_f64() * 1000.0,
                "start_activating_after_publish_returned": since(published, &activating),
                "start_activating_after_publish_began": since(t0, &activating),
                "reported_success_after_publish_returned": since(published, &success),
                "coordinator_rss_mib": coordinator.pid().map(|p| super::rss_kib(p) as f64 / 1024.0),
                "bench_process_rss_mib": super::rss_kib(std::process::id()) as f64 / 1024.0,
            })
        );
    }
    drop(coordinator);
    Ok(())
}

/// Waits until every node has switched to `version`.
async fn wait_all(nodes: &[SimNode], version: u64, deadline: Instant) -> anyhow::Result<()> {
    loop {
        let left = nodes
            .iter()
            .filter(|x| x.nix.switched_to(&x.path(version)).is_none())
            .count();
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{left} of {} agents never reached version {version}",
                nodes.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `t - base` in milliseconds, negative when `t` came first.
fn signed_ms(t: Instant, base: Instant) -> f64 {
    if t >= base {
        (t - base).as_secs_f64() * 1000.0
    } else {
        -((base - t).as_secs_f64() * 1000.0)
    }
}
