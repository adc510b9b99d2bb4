//! `bench rollout`: how fast a coordinator answers a wave's held long-polls once the wave
//! before it is healthy. N simulated agents in this process, each one keep-alive connection
//! holding a long-poll on its version-1 manifest, against the real coordinator (a separate
//! process). A gated publish of version 2 in W equal waves is uploaded; each agent, once
//! its whole wave is answered (a deploy takes longer than a release's fan-out, so no report
//! competes with it) and once the whole upload is done (so that no wave waits for its
//! uploads), posts a signed `success` report for version 2 on the same connection, except
//! the last node of each wave, which reports once every other report of its wave is
//! acknowledged: its report is the one that meets the threshold, with no backlog before it. The
//! figure: for each wave after the first, from the moment that last report of the wave
//! before was sent until each of its nodes has the answer (so it includes that report's own
//! handling: signature check, durable storage, the rollout state saved). Then the baseline: the same held long-polls answered by a plain
//! publish of version 3 without a rollout, from each node's upload being sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use roost_common::SecretKey;
use roost_common::wire::v1::http as api;
use roost_common::wire::v1::{self, Fraction, ReportState, WaveSize};
use roost_tests::http::{Conn, Latencies};
use roost_tests::{Coordinator, Keys, http_get_auth};
use serde_json::json;

use super::{Fleet, manifest_in, node_name, publish_all, report_as, upload};

/// When one simulated agent was answered, and when it sent its report.
struct Answered {
    at: Instant,
    reported: Option<Instant>,
}

/// `disk`: the coordinator's state on the disk (its fsyncs measured too), else on tmpfs.
pub async fn run(nodes: usize, waves: u32, disk: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        waves >= 2 && nodes >= waves as usize,
        "need 2+ waves of 1+ node"
    );
    let dir = match disk {
        true => tempfile::tempdir_in("/var/tmp")?,
        false => tempfile::tempdir_in("/dev/shm")?,
    };
    let keys = Keys::create(&dir.path().join("keys"))?;
    let coordinator = Coordinator::start(dir.path(), &keys)?;
    eprintln!("generating {nodes} node keys …");
    let fleet = Arc::new(Fleet {
        addr: format!("127.0.0.1:{}", coordinator.port),
        publisher: Arc::new(SecretKey::read_file(&keys.publisher_sec)?),
        etags: (0..nodes)
            .map(|_| std::sync::Mutex::new(String::new()))
            .collect(),
        seqs: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
        node_keys: (0..nodes)
            .map(|i| SecretKey::generate(&node_name(i)).unwrap())
            .collect(),
    });
    publish_all(&fleet, 1, 8).await?;
    let per_wave = nodes.div_ceil(waves as usize);
    let wave_of = move |i: usize| (i / per_wave) as u32;

    // The rollout: version 2 in `waves` waves, every node reporting success when answered.
    let (uploaded, upload_done) = tokio::sync::watch::channel(false);
    let reporting = Arc::new(Reporting {
        upload_done,
        acked: (0..waves)
            .map(|_| tokio::sync::watch::channel(0).0)
            .collect(),
        answered: (0..waves)
            .map(|_| tokio::sync::watch::channel(0).0)
            .collect(),
        per_wave,
    });
    let agents = hold(&fleet, "\"1\"", Some(reporting), &coordinator).await?;
    let plan: Vec<WaveSize> = (0..waves)
        .map(|w| WaveSize {
            wave: w,
            nodes: (0..nodes).filter(|i| wave_of(*i) == w).count() as u32,
        })
        .collect();
    let sizes = plan.clone();
    let f = fleet.clone();
    let gated = move |i: usize| {
        let node = node_name(i);
        let rollout = v1::Rollout {
            wave: wave_of(i),
            id: Some(2),
            min_healthy: Fraction::ONE,
            max_failed: 0,
            bake_time_s: 0,
            waves: plan.clone(),
        };
        let m = manifest_in(&node, 2, Some(&f.node_keys[i]), rollout);
        (node, m)
    };
    let t = Instant::now();
    upload(
        &fleet.addr,
        fleet.publisher.clone(),
        nodes,
        8,
        Arc::new(gated),
    )
    .await?;
    let upload_s = t.elapsed().as_secs_f64();
    uploaded.send_replace(true);
    let answered = join(agents).await?;
    let whole_s = t.elapsed().as_secs_f64();
    let mut all = Latencies::default();
    for w in 1..waves {
        let threshold = answered
            .iter()
            .enumerate()
            .filter(|(i, _)| wave_of(*i) == w - 1)
            .filter_map(|(_, a)| a.reported)
            .max()
            .context("a wave without reports")?;
        let mut lat = Latencies::default();
        for (_, a) in answered
            .iter()
            .enumerate()
            .filter(|(i, _)| wave_of(*i) == w)
        {
            let d = a.at.saturating_duration_since(threshold);
            lat.push(d);
            all.push(d);
        }
        println!(
            "{}",
            json!({"scenario": "rollout", "wave": w, "nodes": sizes[w as usize].nodes,
                   "min_ms": lat.quantile_ms(0.0), "p50_ms": lat.quantile_ms(0.5), "p99_ms": lat.quantile_ms(0.99),
                   "max_ms": lat.quantile_ms(1.0)})
        );
    }
    println!(
        "{}",
        json!({"scenario": "rollout", "waves": waves, "nodes": nodes, "state_on_disk": disk,
               "released_waves_p50_ms": all.quantile_ms(0.5), "p99_ms": all.quantile_ms(0.99),
               "max_ms": all.quantile_ms(1.0), "upload_s": upload_s,
               "publish_to_last_node_s": whole_s})
    );

    // The baseline: the same long-polls, a plain publish of version 3 (no rollout).
    let agents = hold(&fleet, "\"2\"", None, &coordinator).await?;
    let base = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..nodes).map(|_| AtomicU64::new(0)).collect());
    let (f, s) = (fleet.clone(), sent.clone());
    let plain = move |i: usize| {
        s[i].store(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let node = node_name(i);
        let m = manifest_in(&node, 3, Some(&f.node_keys[i]), v1::Rollout::default());
        (node, m)
    };
    upload(
        &fleet.addr,
        fleet.publisher.clone(),
        nodes,
        8,
        Arc::new(plain),
    )
    .await?;
    let answered = join(agents).await?;
    let whole_s = base.elapsed().as_secs_f64();
    let mut lat = Latencies::default();
    for (i, a) in answered.iter().enumerate() {
        let put = base + Duration::from_nanos(sent[i].load(Ordering::Relaxed));
        lat.push(a.at.saturating_duration_since(put));
    }
    println!(
        "{}",
        json!({"scenario": "rollout_baseline_plain_publish", "nodes": nodes, "state_on_disk": disk,
               "min_ms": lat.quantile_ms(0.0), "p50_ms": lat.quantile_ms(0.5), "p99_ms": lat.quantile_ms(0.99),
               "max_ms": lat.quantile_ms(1.0), "publish_to_last_node_s": whole_s})
    );
    Ok(())
}

type Agent = tokio::task::JoinHandle<anyhow::Result<Answered>>;

/// When the simulated agents report.
struct Reporting {
    /// True once the gated publish is uploaded.
    upload_done: tokio::sync::watch::Receiver<bool>,
    /// Acknowledged reports, per wave.
    acked: Vec<tokio::sync::watch::Sender<usize>>,
    /// Answered long-polls, per wave.
    answered: Vec<tokio::sync::watch::Sender<usize>>,
    /// Nodes per wave (node `i` is in wave `i / per_wave`).
    per_wave: usize,
}

impl Reporting {
    /// Waits until node `i` of `n` may report: the upload is done, its wave answered and,
    /// for the last node of its wave, every other report of the wave acknowledged.
    async fn wait_turn(&self, i: usize, n: usize) -> anyhow::Result<()> {
        self.upload_done.clone().wait_for(|d| *d).await?;
        let w = i / self.per_wave;
        let last = ((w + 1) * self.per_wave).min(n) - 1;
        let size = last + 1 - w * self.per_wave;
        self.answered[w]
            .subscribe()
            .wait_for(|c| *c >= size)
            .await?;
        if i == last {
            let others = last - w * self.per_wave;
            self.acked[w].subscribe().wait_for(|c| *c >= others).await?;
        }
        Ok(())
    }

    fn acknowledged(&self, i: usize) {
        self.acked[i / self.per_wave].send_modify(|c| *c += 1);
    }
}

/// One simulated agent per node, each holding a long-poll with `etag`; returns once the
/// coordinator holds all of them. With `report`, each reports success once answered, in
/// its turn.
async fn hold(
    fleet: &Arc<Fleet>,
    etag: &'static str,
    report: Option<Arc<Reporting>>,
    coordinator: &Coordinator,
) -> anyhow::Result<Vec<Agent>> {
    let n = fleet.node_keys.len();
    let mut agents = Vec::with_capacity(n);
    for i in 0..n {
        let (fleet, report) = (fleet.clone(), report.clone());
        agents.push(tokio::spawn(async move {
            let mut c = Conn::connect(&fleet.addr).await?;
            let path = api::long_poll_url("", node_name(i), api::MAX_WAIT_S);
            let (at, version) = loop {
                let r = c
                    .request("GET", &path, &[("If-None-Match", etag)], &[])
                    .await?;
                match (r.status, r.etag) {
                    (304, _) => continue,
                    (200, Some(e)) if e != etag => {
                        break (Instant::now(), e.trim_matches('"').parse::<u64>()?);
                    }
                    (s, e) => bail!("{}: {s} {e:?}", node_name(i)),
                }
            };
            let mut reported = None;
            if let Some(turn) = &report {
                turn.answered[i / turn.per_wave].send_modify(|c| *c += 1);
                turn.wait_turn(i, n).await?;
                let body = report_as(&fleet, i, version, ReportState::Success);
                reported = Some(Instant::now());
                let r = c
                    .request("POST", &api::reports_path(node_name(i)), &[], &body)
                    .await?;
                if r.status != 200 {
                    bail!("report of {}: {}", node_name(i), r.status);
                }
                turn.acknowledged(i);
            }
            Ok(Answered { at, reported })
        }));
    }
    let url = format!("{}/metrics", coordinator.url());
    let token = coordinator.token.clone();
    let t = Instant::now();
    loop {
        let (url, token) = (url.clone(), token.clone());
        let held = tokio::task::spawn_blocking(move || {
            let body = http_get_auth(&url, Some(&token)).ok()?;
            String::from_utf8_lossy(&body)
                .lines()
                .find_map(|l| l.strip_prefix("roost_long_polls_held "))
                .and_then(|v| v.trim().parse::<usize>().ok())
        })
        .await?;
        if held == Some(n) {
            return Ok(agents);
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!("only {held:?} of {n} long-polls held after 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn join(agents: Vec<Agent>) -> anyhow::Result<Vec<Answered>> {
    let mut out = Vec::with_capacity(agents.len());
    for a in agents {
        out.push(tokio::time::timeout(Duration::from_secs(600), a).await???);
    }
    Ok(out)
}
