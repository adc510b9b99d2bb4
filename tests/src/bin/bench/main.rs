//! roost's benchmarks. Build in release first, then run one scenario:
//!
//! ```sh
//! cargo build --release -p roost-agent -p roost-coordinator -p roost-tests
//! target/release/bench capacity        # coordinator: conditional GETs, reports, held long-polls
//! ```
//!
//! Figures go to stdout as JSON lines and a human summary; BENCHMARKS.md records them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use roost_common::envelope::{Context as Ctx, Envelope};
use roost_common::wire::v1::http as api;
use roost_common::wire::v1::{self, Manifest, Profile, Report, ReportState};
use roost_common::{SecretKey, Timestamp, Version};
use roost_tests::http::{Conn, Latencies};
use roost_tests::{Coordinator, Keys};
use serde_json::json;
use tokio::sync::Mutex;

mod held_tls;
mod rollout;
mod sim;
mod storage;
mod vs_nginx;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let scenario = args.first().map(String::as_str).unwrap_or("help");
    let opt = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let list = |name: &str, default: &str| -> Vec<usize> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, String::as_str)
            .split(',')
            .filter_map(|v| v.parse().ok())
            .collect()
    };
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match scenario {
        "capacity" => rt.block_on(capacity(
            opt("--nodes", 10_000) as usize,
            opt("--conns", 64) as usize,
            opt("--seconds", 10),
        )),
        "idle-poll" => rt.block_on(idle_poll(
            opt("--seconds", 60),
            args.iter().any(|a| a == "--default-interval"),
            args.iter()
                .position(|a| a == "--only")
                .and_then(|i| args.get(i + 1))
                .cloned(),
        )),
        "convergence" => convergence(opt("--nodes", 10) as usize, opt("--interval", 60)),
        "held-tls" => rt.block_on(held_tls::run(opt("--nodes", 10_000) as usize)),
        "rollout" => rt.block_on(rollout::run(
            opt("--nodes", 10_000) as usize,
            opt("--waves", 5) as u32,
            args.iter().any(|a| a == "--disk"),
        )),
        "convergence-sim" => rt.block_on(sim::run(
            opt("--agents", 1000) as usize,
            opt("--interval", 60),
        )),
        "vs-nginx" => rt.block_on(vs_nginx::run(vs_nginx::Plan {
            nar_mib: opt("--nar-mib", 300),
            clients: list("--clients", "1,20"),
            seconds: opt("--seconds", 8),
            rounds: opt("--rounds", 3) as usize,
            poll_conns: opt("--conns", 64) as usize,
            nodes: opt("--nodes", 1000) as usize,
        })),
        "reports" => rt.block_on(storage::reports(
            opt("--nodes", 1000) as usize,
            opt("--conns", 16) as usize,
            opt("--seconds", 10),
        )),
        "nix-copy" => storage::nix_copy(
            opt("--paths", 50) as usize,
            opt("--kib", 512) as usize,
            opt("--rounds", 3) as usize,
        ),
        "publish-scaling" => {
            let sizes = args
                .iter()
                .position(|a| a == "--sizes")
                .and_then(|i| args.get(i + 1))
                .cloned()
                .unwrap_or_else(|| "10,100,1000".into());
            publish_scaling(&sizes, opt("--baseline-max", 100) as usize)
        }
        _ => {
            eprintln!("usage: bench capacity [--nodes N] [--conns C] [--seconds S]");
            eprintln!("       bench held-tls [--nodes N]   (held long-polls over HTTPS: memory)");
            eprintln!(
                "       bench rollout [--nodes 10000] [--waves 5] [--disk]   (wave release to held long-polls)"
            );
            eprintln!(
                "       bench vs-nginx [--nar-mib 300] [--clients 1,20] [--seconds 8] [--rounds 3] [--conns 64] [--nodes 1000]"
            );
            eprintln!(
                "       bench reports [--nodes 1000] [--conns 16] [--seconds 10]   (durable reports/s)"
            );
            eprintln!(
                "       bench nix-copy [--paths 50] [--kib 512] [--rounds 3]   (real Nix: to the cache vs file://)"
            );
            eprintln!("       bench publish-scaling [--sizes 10,100,1000] [--baseline-max 100]");
            eprintln!(
                "       bench idle-poll [--seconds 60] [--default-interval] [--only MODE]   (root: a namespaced node with real Nix)"
            );
            eprintln!(
                "       bench convergence [--nodes 10] [--interval 60]   (root: namespaced nodes, real Nix)"
            );
            eprintln!(
                "       bench convergence-sim [--agents 1000] [--interval 60]   (agents in process, fake Nix)"
            );
            std::process::exit(2);
        }
    }
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(str::to_owned)
        })
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

/// user+system CPU time of a process, in milliseconds (from /proc/PID/stat).
fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = after
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the state field is skipped.
    let ticks = f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0);
    ticks * 1000 / 100
}

/// A throw-away CA and a certificate for `ip` signed by it, made with the openssl command:
/// (CA certificate, certificate, key), all PEM files in `dir`.
fn test_certificate(
    dir: &std::path::Path,
    ip: &str,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    use std::ffi::OsString;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let (ca, ca_key, csr, ext) = (
        dir.join("ca.pem"),
        dir.join("ca.key"),
        dir.join("leaf.csr"),
        dir.join("leaf.ext"),
    );
    std::fs::write(
        &ext,
        format!("subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\n"),
    )?;
    let openssl = |args: Vec<OsString>| {
        std::process::Command::new("openssl")
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let os = |x: &[&str]| x.iter().map(OsString::from).collect::<Vec<_>>();
    let p = |x: &std::path::Path| x.as_os_str().to_owned();
    let ec = os(&[
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ]);
    let mut ca_args = os(&["req", "-x509", "-days", "2", "-subj", "/CN=roost-bench-ca"]);
    ca_args.extend(ec.iter().cloned());
    ca_args.extend([OsString::from("-keyout"), p(&ca_key), "-out".into(), p(&ca)]);
    let mut leaf_args = os(&["req", "-subj", "/CN=roost-bench"]);
    leaf_args.extend(ec);
    leaf_args.extend([OsString::from("-keyout"), p(&key), "-out".into(), p(&csr)]);
    let mut sign_args = os(&["x509", "-req", "-days", "2", "-CAcreateserial", "-in"]);
    sign_args.extend([p(&csr), "-CA".into(), p(&ca), "-CAkey".into(), p(&ca_key)]);
    sign_args.extend(["-out".into(), p(&cert), "-extfile".into(), p(&ext)]);
    let ok = openssl(ca_args) && openssl(leaf_args) && openssl(sign_args);
    anyhow::ensure!(ok, "openssl could not make a test certificate");
    Ok((ca, cert, key))
}

/// Nanoseconds on CPU of every thread of a process (/proc/PID/task/*/schedstat).
fn cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

fn manifest(node: &str, version: u64, node_key: Option<&SecretKey>) -> Vec<u8> {
    manifest_in(node, version, node_key, v1::Rollout::default())
}

/// [`manifest`] with a rollout (`rollout.id`, wave, policy) of a gated publish.
fn manifest_in(
    node: &str,
    version: u64,
    node_key: Option<&SecretKey>,
    rollout: v1::Rollout,
) -> Vec<u8> {
    let now = Timestamp::now();
    let m = Manifest {
        format: v1::FORMAT,
        node: node.parse().unwrap(),
        system: "x86_64-linux".into(),
        version: Version(version),
        issued_at: now,
        expires_at: now.plus(Duration::from_secs(86_400 * 30)),
        source: None,
        substituters: vec![],
        node_key: node_key.map(SecretKey::public),
        profiles: vec![serde_json::from_value::<Profile>(json!({
            "name": "system",
            "path": format!("/nix/store/{}-nixos-system-{node}", "0123456789abcdfghijklmnpqrsvwxyz"),
            "activation": {"kind": "nixos", "goal": "switch"},
            "closure_size": 912_345_678u64,
            "health_checks": [{"kind": "command", "argv": ["systemctl", "is-system-running", "--wait"], "timeout_s": 60}]
        }))
        .unwrap()],
        rollout,
    };
    serde_json::to_vec(&m).unwrap()
}

struct Fleet {
    addr: String,
    publisher: Arc<SecretKey>,
    node_keys: Vec<SecretKey>,
    etags: Vec<std::sync::Mutex<String>>,
    seqs: Vec<AtomicU64>,
}

/// PUTs one manifest version for every node over `conns` connections; returns elapsed time.
async fn publish_all(fleet: &Arc<Fleet>, version: u64, conns: usize) -> anyhow::Result<Duration> {
    let f = fleet.clone();
    let payload = move |i: usize| {
        let node = node_name(i);
        let m = manifest(&node, version, Some(&f.node_keys[i]));
        (node, m)
    };
    upload(
        &fleet.addr,
        fleet.publisher.clone(),
        fleet.node_keys.len(),
        conns,
        Arc::new(payload),
    )
    .await
}

/// A manifest payload for node `i`: the node's name and the payload bytes.
type Payload = Arc<dyn Fn(usize) -> (String, Vec<u8>) + Send + Sync>;

/// Signs and PUTs `n` manifests (`payload(i)` for i in 0..n) over `conns` keep-alive
/// connections, the way `publish` delivers them; returns the elapsed time.
async fn upload(
    addr: &str,
    publisher: Arc<SecretKey>,
    n: usize,
    conns: usize,
    payload: Payload,
) -> anyhow::Result<Duration> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (next, publisher, payload) = (next.clone(), publisher.clone(), payload.clone());
        let addr = addr.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::connect(&addr).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= n {
                    return anyhow::Ok(());
                }
                let (node, payload) = payload(i);
                let env = Envelope::seal(Ctx::Manifest, &payload, &[&*publisher]).to_bytes();
                let r = c
                    .request(
                        "PUT",
                        &api::manifest_path(&node),
                        &[("Content-Type", "application/json")],
                        &env,
                    )
                    .await?;
                if r.status != 200 && r.status != 201 && r.status != 204 {
                    bail!(
                        "PUT {node}: {} {}",
                        r.status,
                        String::from_utf8_lossy(&r.body)
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed())
}

async fn learn_etags(fleet: &Arc<Fleet>) -> anyhow::Result<()> {
    let mut c = Conn::connect(&fleet.addr).await?;
    for i in 0..fleet.node_keys.len() {
        let r = c
            .request("GET", &api::manifest_path(node_name(i)), &[], &[])
            .await?;
        let etag = r
            .etag
            .with_context(|| format!("no ETag for {}", node_name(i)))?;
        *fleet.etags[i].lock().unwrap() = etag;
    }
    Ok(())
}

fn report(fleet: &Fleet, i: usize) -> Vec<u8> {
    report_as(fleet, i, 1, ReportState::Idle)
}

/// Node `i`'s next report, in `state` for manifest `version`, signed with its key.
fn report_as(fleet: &Fleet, i: usize, version: u64, state: ReportState) -> Vec<u8> {
    let seq = fleet.seqs[i].fetch_add(1, Ordering::Relaxed) + 1;
    let r = Report {
        format: v1::FORMAT,
        node: node_name(i).parse().unwrap(),
        seq,
        sent_at: Timestamp::now(),
        boot_id: "bench".into(),
        agent_version: "bench".into(),
        manifest_version: Some(Version(version)),
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
    };
    Envelope::seal(
        Ctx::Report,
        &serde_json::to_vec(&r).unwrap(),
        &[&fleet.node_keys[i]],
    )
    .to_bytes()
}

async fn capacity(nodes: usize, conns: usize, seconds: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::create(&dir.path().join("keys"))?;
    let coordinator = Coordinator::start(dir.path(), &keys)?;
    let pid = coordinator.pid().context("coordinator pid")?;
    let publisher = SecretKey::read_file(&keys.publisher_sec)?;
    eprintln!("generating {nodes} node keys …");
    let node_keys: Vec<SecretKey> = (0..nodes)
        .map(|i| SecretKey::generate(&node_name(i)).unwrap())
        .collect();
    let fleet = Arc::new(Fleet {
        addr: format!("127.0.0.1:{}", coordinator.port),
        publisher: Arc::new(publisher),
        etags: (0..nodes)
            .map(|_| std::sync::Mutex::new(String::new()))
            .collect(),
        seqs: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
        node_keys,
    });
    let rss_empty = rss_kib(pid);
    let t = publish_all(&fleet, 1, 8).await?;
    println!(
        "{}",
        json!({"phase": "upload", "manifests": nodes, "seconds": t.as_secs_f64(), "per_s": nodes as f64 / t.as_secs_f64()})
    );
    learn_etags(&fleet).await?;
    let rss_loaded = rss_kib(pid);

    // Phase 1: conditional GETs (304) with one signed report per 20 requests.
    let stop = Arc::new(AtomicBool::new(false));
    let gets = Arc::new(Mutex::new(Latencies::default()));
    let posts = Arc::new(Mutex::new(Latencies::default()));
    let reconnects = Arc::new(AtomicU64::new(0));
    let cpu0 = cpu_ms(pid);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..conns {
        let (fleet, stop, gets, posts) = (fleet.clone(), stop.clone(), gets.clone(), posts.clone());
        let reconnects = reconnects.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::connect(&fleet.addr).await?;
            let (mut g, mut p) = (Latencies::default(), Latencies::default());
            let mut i = k * 7919 % nodes;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i = (i + conns) % nodes;
                n += 1;
                if n % 20 == 0 {
                    let body = report(&fleet, i);
                    let t = Instant::now();
                    let r = c
                        .request(
                            "POST",
                            &api::reports_path(node_name(i)),
                            &[("Content-Type", "application/json")],
                            &body,
                        )
                        .await?;
                    p.push(t.elapsed());
                    if !(200..300).contains(&r.status) {
                        bail!(
                            "report {}: {} {}",
                            node_name(i),
                            r.status,
                            String::from_utf8_lossy(&r.body)
                        );
                    }
                } else {
                    let etag = fleet.etags[i].lock().unwrap().clone();
                    let t = Instant::now();
                    let r = c
                        .request(
                            "GET",
                            &api::manifest_path(node_name(i)),
                            &[("If-None-Match", &etag)],
                            &[],
                        )
                        .await?;
                    g.push(t.elapsed());
                    if r.status != 304 {
                        bail!("conditional GET {}: {}", node_name(i), r.status);
                    }
                }
            }
            gets.lock().await.0.extend(g.0);
            posts.lock().await.0.extend(p.0);
            reconnects.fetch_add(c.reconnects, Ordering::Relaxed);
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_ms(pid) - cpu0;
    let (mut g, mut p) = (
        std::mem::take(&mut *gets.lock().await),
        std::mem::take(&mut *posts.lock().await),
    );
    println!(
        "{}",
        json!({"phase": "conditional_get", "connections": conns, "seconds": elapsed,
               "get_per_s": g.0.len() as f64 / elapsed, "get_p50_ms": g.quantile_ms(0.5), "get_p99_ms": g.quantile_ms(0.99),
               "reconnects_after_reports": reconnects.load(Ordering::Relaxed),
               "report_per_s": p.0.len() as f64 / elapsed, "report_p50_ms": p.quantile_ms(0.5), "report_p99_ms": p.quantile_ms(0.99),
               "coordinator_cpu_s": cpu as f64 / 1000.0, "coordinator_rss_mib": rss_kib(pid) as f64 / 1024.0,
               "rss_empty_mib": rss_empty as f64 / 1024.0, "rss_with_manifests_mib": rss_loaded as f64 / 1024.0})
    );

    // The fleet views over every node (what a dashboard or Prometheus scrape costs).
    let mut c = Conn::connect(&fleet.addr).await?;
    let bearer = format!("Bearer {}", coordinator.token);
    for path in [api::route::FLEET, api::route::METRICS] {
        let rss0 = rss_kib(pid);
        let cpu0 = cpu_ms(pid);
        let t = Instant::now();
        let r = c
            .request("GET", path, &[("authorization", &bearer)], &[])
            .await?;
        let took = t.elapsed();
        anyhow::ensure!(r.status == 200, "GET {path}: {}", r.status);
        println!(
            "{}",
            json!({"phase": "fleet_view", "path": path, "nodes": nodes, "ms": took.as_secs_f64() * 1000.0,
                   "coordinator_cpu_ms": cpu_ms(pid) - cpu0, "body_bytes": r.body.len(),
                   "rss_before_mib": rss0 as f64 / 1024.0, "rss_after_mib": rss_kib(pid) as f64 / 1024.0})
        );
    }
    drop(c);

    // Phase 2: one held long-poll per node, then a publish of every node wakes them all.
    learn_etags(&fleet).await?;
    let rss_before = rss_kib(pid);
    let mut waiters = Vec::with_capacity(nodes);
    for i in 0..nodes {
        let mut c = Conn::connect(&fleet.addr).await?;
        let etag = fleet.etags[i].lock().unwrap().clone();
        c.send_only(
            &api::long_poll_url("", node_name(i), api::MAX_WAIT_S),
            &[("If-None-Match", &etag)],
        )
        .await?;
        waiters.push(c);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_held = rss_kib(pid);
    let woke = Arc::new(Mutex::new(Vec::with_capacity(nodes)));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for mut c in waiters {
        let woke = woke.clone();
        tasks.push(tokio::spawn(async move {
            let r = c.read_response().await?;
            woke.lock().await.push((t0.elapsed(), r.status));
            anyhow::Ok(())
        }));
    }
    let publish_time = publish_all(&fleet, 2, 8).await?;
    let all = tokio::time::timeout(Duration::from_secs(120), async {
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    })
    .await;
    let woke = woke.lock().await;
    let ok = woke.iter().filter(|(_, s)| *s == 200).count();
    let last = woke.iter().map(|(d, _)| *d).max().unwrap_or_default();
    println!(
        "{}",
        json!({"phase": "long_poll", "held": nodes, "rss_before_mib": rss_before as f64 / 1024.0, "rss_held_mib": rss_held as f64 / 1024.0,
               "held_cost_kib_each": (rss_held.saturating_sub(rss_before)) as f64 / nodes as f64,
               "publish_all_s": publish_time.as_secs_f64(), "woken_with_200": ok,
               "last_woken_after_publish_start_s": last.as_secs_f64(),
               "last_woken_after_publish_end_s": last.saturating_sub(publish_time).as_secs_f64(),
               "complete": all.is_ok()})
    );
    drop(coordinator);
    Ok(())
}

/// A flake with `n` nodes, each with one tiny system profile; input-free, builds offline.
fn scaling_flake(dir: &std::path::Path, n: usize) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("flake.nix"),
        format!(
            r#"{{
  description = "roost publish-scaling fixture: {n} nodes";
  outputs = {{ self }}:
    let
      system = "x86_64-linux";
      mk = i: derivation {{
        name = "system-node-${{toString i}}"; inherit system; builder = "/bin/sh";
        args = [ "-c" "echo ${{toString i}} > $out" ]; PATH = "/usr/bin:/bin";
      }};
      node = i: {{
        name = "node-${{toString i}}";
        value = {{ hostname = "node-${{toString i}}.example"; profiles.system = {{ path = mk i; user = "root"; }}; }};
      }};
    in {{
      deploy.nodes = builtins.listToAttrs (builtins.genList node {n});
    }};
}}
"#
        ),
    )?;
    Ok(())
}

fn time_cmd(cmd: &mut std::process::Command) -> anyhow::Result<(Duration, std::process::Output)> {
    let t = Instant::now();
    let out = cmd.output()?;
    let d = t.elapsed();
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((d, out))
}

fn publish_scaling(sizes: &str, baseline_max: usize) -> anyhow::Result<()> {
    use std::process::Command;
    let dir = tempfile::tempdir()?;
    let key = SecretKey::generate("bench-publisher")?;
    let key_file = dir.path().join("publisher.sec");
    key.write_new_file(&key_file)?;
    for n in sizes
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()?
    {
        let flake = dir.path().join(format!("flake-{n}"));
        scaling_flake(&flake, n)?;
        let flake_ref = format!("path:{}", flake.display());
        // Build everything once so both sides measure evaluation and publishing, not builds.
        time_cmd(Command::new("nix").args(["build", "--no-link", "--impure", "--expr"]).arg(format!(
            "builtins.map (n: n.profiles.system.path) (builtins.attrValues (builtins.getFlake \"{flake_ref}\").deploy.nodes)"
        )))?;
        let out_dir = dir.path().join(format!("out-{n}"));
        let (publish_time, out) = time_cmd(
            Command::new(roost_tests::bin("roost-coordinator"))
                .arg("publish")
                .arg(&flake_ref)
                .arg("--key")
                .arg(&key_file)
                .arg("--out")
                .arg(&out_dir)
                .arg("--json")
                .arg("--nodes-trust-paths"),
        )?;
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let published = std::fs::read_dir(out_dir.join(api::nodes_dir()))
            .map(|d| d.count())
            .unwrap_or(0);
        // Baseline: one `nix eval` per node, as per-host tools do; capped, then extrapolated.
        let sample = n.min(baseline_max);
        let t = Instant::now();
        for i in 0..sample {
            time_cmd(Command::new("nix").args(["eval", "--json"]).arg(format!(
                "{flake_ref}#deploy.nodes.\"node-{i}\".profiles.system.path"
            )))?;
        }
        let per_node = t.elapsed() / sample as u32;
        let baseline = per_node * n as u32;
        println!(
            "{}",
            json!({"scenario": "publish_scaling", "nodes": n, "published": published,
                   "publish_s": publish_time.as_secs_f64(),
                   "nix_invocations": summary.get("nix_invocations").cloned().unwrap_or_default(),
                   "baseline_per_node_eval_s": per_node.as_secs_f64(), "baseline_sampled_nodes": sample,
                   "baseline_total_s": baseline.as_secs_f64(), "baseline_extrapolated": sample < n,
                   "speedup": baseline.as_secs_f64() / publish_time.as_secs_f64()})
        );
    }
    Ok(())
}

fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn conditional_gets_304(coordinator: &roost_tests::Coordinator) -> u64 {
    let text = String::from_utf8(
        coordinator
            .read(&format!("{}{}", coordinator.url(), api::route::METRICS))
            .unwrap_or_default(),
    )
    .unwrap_or_default();
    metric(
        &text,
        &format!(
            "roost_http_requests_total{{route=\"GET {}\",status=\"304\"}}",
            api::route::MANIFEST
        ),
    )
}

/// One way of polling that `idle-poll` measures.
struct IdleMode {
    name: &'static str,
    /// The agent's `--interval`, in seconds (a long-poll's `wait` is the same).
    interval_s: u64,
    long_poll: bool,
    tls: bool,
}

/// What one idle node pays: the real agent, on a namespaced node, polling through a counting
/// proxy, with CPU from /proc and polls counted by the coordinator. Long-polls are measured
/// at a short interval (1 s, the worst case: a request every 1.5 s), at 30 s and, with
/// `--default-interval`, at the agent's default of 5 minutes (`wait=300`), each over at least
/// four of its cycles.
async fn idle_poll(
    seconds: u64,
    default_interval: bool,
    only: Option<String>,
) -> anyhow::Result<()> {
    use roost_tests::Fleet;
    use roost_tests::proxy::CountingProxy;
    roost_tests::preflight().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut fleet = tokio::task::spawn_blocking(|| Fleet::new(&["pi-kitchen"])).await??;
    let target = format!("127.0.0.1:{}", fleet.coordinator.port);
    let proxy =
        CountingProxy::start_on(std::net::SocketAddr::new(fleet.bridge.ip.into(), 0), target)
            .await?;
    let summary = {
        let f = &fleet;
        tokio::task::block_in_place(|| f.publish(&[]))?
    };
    let mut version = summary["nodes"][0]["version"].as_u64().context("version")?;
    // HTTPS: a TLS front (rustls) with a certificate for the bridge address, trusted by the
    // agent through --ca-cert; bytes are counted encrypted, at its socket.
    let certs = tempfile::tempdir()?;
    let (ca, cert, key) = test_certificate(certs.path(), &fleet.bridge.ip.to_string())?;
    let tls_proxy = CountingProxy::start_tls(
        std::net::SocketAddr::new(fleet.bridge.ip.into(), 0),
        format!("127.0.0.1:{}", fleet.coordinator.port),
        &cert,
        &key,
    )
    .await?;
    let mode = |name, interval_s, long_poll, tls| IdleMode {
        name,
        interval_s,
        long_poll,
        tls,
    };
    let mut modes = vec![
        mode("plain polling, 1 s interval, keep-alive", 1, false, false),
        mode("long-poll, 1 s interval (wait=1)", 1, true, false),
        mode("long-poll, 30 s interval (wait=30)", 30, true, false),
        mode(
            "HTTPS (rustls), plain polling, 1 s interval, keep-alive",
            1,
            false,
            true,
        ),
        // The coordinator closes a connection idle for --header-timeout (30 s): every poll
        // is a new TCP and TLS connection.
        mode(
            "HTTPS (rustls), plain polling, 60 s interval, a new connection per poll",
            60,
            false,
            true,
        ),
    ];
    if default_interval {
        modes.push(mode(
            "long-poll, default 5 min interval (wait=300)",
            300,
            true,
            false,
        ));
        modes.push(mode(
            "plain polling, default 5 min interval",
            300,
            false,
            false,
        ));
    }
    modes.retain(|m| only.as_deref().is_none_or(|o| m.name.contains(o)));
    for m in modes {
        let proxy = if m.tls { &tls_proxy } else { &proxy };
        let node_url = if m.tls {
            format!("https://{}", proxy.addr)
        } else {
            format!("http://{}", proxy.addr)
        };
        let mut args = fleet.agent_args(fleet.node("pi-kitchen"), false);
        let i = args
            .iter()
            .position(|a| a == "--coordinator")
            .context("args")?;
        args[i + 1] = node_url;
        let j = args
            .iter()
            .position(|a| a == "--interval")
            .context("args")?;
        args[j + 1] = format!("{}s", m.interval_s);
        if !m.long_poll {
            args.push("--no-long-poll".into());
        }
        if m.tls {
            args.push("--ca-cert".into());
            args.push(ca.display().to_string());
        }
        fleet.node_mut("pi-kitchen").start_agent(&args, &[])?;
        {
            let f = &fleet;
            tokio::task::block_in_place(|| {
                f.wait_report("pi-kitchen", version, "success", Duration::from_secs(120))
            })?;
        }
        // Settle: the first long-poll of a fresh agent is a plain poll (it learns that the
        // coordinator holds polls from the answer).
        tokio::time::sleep(Duration::from_secs(3)).await;
        let pid = fleet.node("pi-kitchen").agent_pid().context("agent pid")?;
        let window = seconds.max(if m.long_poll {
            4 * m.interval_s + 5
        } else {
            2 * m.interval_s
        });
        let (cpu0, (up0, down0, conns0), polls0) = (
            cpu_ns(pid),
            proxy.counters.snapshot(),
            conditional_gets_304(&fleet.coordinator),
        );
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(window)).await;
        let (cpu1, (up1, down1, conns1), polls1) = (
            cpu_ns(pid),
            proxy.counters.snapshot(),
            conditional_gets_304(&fleet.coordinator),
        );
        let polls = (polls1 - polls0).max(1);
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu_ms = (cpu1 - cpu0) as f64 / 1e6;
        println!(
            "{}",
            json!({"scenario": "idle_poll", "mode": m.name, "seconds": elapsed, "polls": polls,
                   "cpu_ms_per_poll": cpu_ms / polls as f64,
                   "cpu_ms_per_hour": cpu_ms / elapsed * 3600.0,
                   "bytes_sent_per_poll": (up1 - up0) as f64 / polls as f64,
                   "bytes_received_per_poll": (down1 - down0) as f64 / polls as f64,
                   "new_connections": conns1 - conns0,
                   "agent_rss_mib": rss_kib(pid) as f64 / 1024.0,
                   "cpu_source": "/proc/PID/task/*/schedstat (ns on CPU, all threads)"})
        );
        if polls < (window / (m.interval_s + 1)).max(2) {
            eprintln!(
                "fewer polls than expected: agent log:\n{}",
                roost_tests::fleet::tail(&fleet.node("pi-kitchen").log(), 15)
            );
        }
        if !m.long_poll && !m.tls && m.interval_s == 1 {
            // A poll that brings a new manifest for a closure the node already has.
            let before = cpu_ns(pid);
            let again = {
                let f = &fleet;
                tokio::task::block_in_place(|| f.publish(&[]))?
            };
            let v2 = again["nodes"][0]["version"].as_u64().context("version")?;
            let f = &fleet;
            tokio::task::block_in_place(|| {
                f.wait_report("pi-kitchen", v2, "success", Duration::from_secs(60))
            })?;
            let spent = (cpu_ns(pid) - before) as f64 / 1e6;
            version = v2;
            println!(
                "{}",
                json!({"scenario": "new_manifest_present_closure", "agent_cpu_ms": spent, "note": "the agent process only (its Nix and health-check child processes are not counted), including the idle polls in the same seconds"})
            );
        }
    }
    Ok(())
}

/// A fixture flake with `n` nodes built from the offline fleet's fixtures.
fn big_fleet_flake(n: usize) -> String {
    format!(
        r#"{{
  outputs = {{ self }}:
    let
      settings = import ./settings.nix;
      fixtures = import ./fixtures.nix {{ inherit (settings) system; }};
      node = i: let name = "node-${{toString i}}"; in {{
        inherit name;
        value.profiles.system.path = fixtures.fakeSystem {{ node = name; inherit (settings) generation; }};
      }};
    in {{
      deploy.roost.healthChecks = [ {{ kind = "command"; argv = [ "/nix/var/nix/profiles/system/bin/health" ]; timeout_s = 10; }} ];
      deploy.nodes = builtins.listToAttrs (builtins.genList node {n});
    }};
}}
"#
    )
}

/// Time from `publish` returning until each node starts activating and until it reports
/// success, with long-poll and with plain polling.
fn convergence(n: usize, interval_s: u64) -> anyhow::Result<()> {
    use roost_tests::Fleet;
    use roost_tests::fleet::Settings;
    roost_tests::preflight().map_err(|e| anyhow::anyhow!("{e}"))?;
    let names: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut fleet = Fleet::new(&refs)?;
    fleet.edit("flake.nix", &big_fleet_flake(n))?;
    fleet.interval = format!("{interval_s}s");
    let mut generation = 1;
    fleet.settings(&Settings {
        generation,
        ..Settings::default()
    })?;
    let first = fleet.publish(&[])?;
    let v1 = first["nodes"][0]["version"].as_u64().context("version")?;
    fleet.start_agents()?;
    for name in &names {
        fleet.wait_report(name, v1, "success", Duration::from_secs(180))?;
    }
    for long_poll in [true, false] {
        if !long_poll {
            for i in 0..n {
                let mut args = fleet.agent_args(&fleet.nodes[i], false);
                args.push("--no-long-poll".into());
                fleet.nodes[i].start_agent(&args, &[])?;
            }
            std::thread::sleep(Duration::from_secs(5));
        } else {
            // Let every agent settle into a held long-poll.
            std::thread::sleep(Duration::from_secs(3));
        }
        generation += 1;
        fleet.settings(&Settings {
            generation,
            ..Settings::default()
        })?;
        let summary = fleet.publish(&[])?;
        let published = Instant::now();
        let version = summary["nodes"][0]["version"].as_u64().context("version")?;
        let paths: Vec<String> = (0..n)
            .map(|i| {
                let node = summary["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|x| x["node"] == names[i].as_str())
                    .unwrap();
                node["profiles"][0]["path"].as_str().unwrap().to_owned()
            })
            .collect();
        let mut started: Vec<Option<Duration>> = vec![None; n];
        let mut done: Vec<Option<Duration>> = vec![None; n];
        let deadline = Duration::from_secs(interval_s * 2 + 120);
        while done.iter().any(Option::is_none) && published.elapsed() < deadline {
            for i in 0..n {
                if started[i].is_none()
                    && fleet.nodes[i]
                        .activations()
                        .iter()
                        .any(|a| a.contains(&paths[i]))
                {
                    started[i] = Some(published.elapsed());
                }
            }
            if let Ok(doc) = fleet.coordinator.fleet() {
                for e in doc["nodes"].as_array().into_iter().flatten() {
                    let Some(i) = names.iter().position(|x| e["node"] == x.as_str()) else {
                        continue;
                    };
                    if done[i].is_none()
                        && e["last_report"]["manifest_version"].as_u64() == Some(version)
                        && e["last_report"]["state"] == "success"
                    {
                        done[i] = Some(published.elapsed());
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let stats = |v: &[Option<Duration>]| {
            quantiles(
                v.iter()
                    .flatten()
                    .map(|d| d.as_secs_f64() * 1000.0)
                    .collect(),
            )
        };
        println!(
            "{}",
            json!({"scenario": "convergence", "nodes": n, "mode": mode_name(long_poll, interval_s),
                   "start_activating": stats(&started), "reported_success": stats(&done)})
        );
    }
    Ok(())
}

/// How a convergence run's agents poll, for its JSON line.
fn mode_name(long_poll: bool, interval_s: u64) -> String {
    if long_poll {
        "long-poll".to_owned()
    } else {
        format!("plain polling every {interval_s} s ± 20 %")
    }
}

/// Count, min, median, p90 and max of millisecond samples (they may be negative).
fn quantiles(mut ms: Vec<f64>) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    let q = |p: f64| {
        ms.get(((ms.len().saturating_sub(1)) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    json!({"count": ms.len(), "min_ms": q(0.0), "median_ms": q(0.5), "p90_ms": q(0.9), "max_ms": q(1.0)})
}
