//! What durable storage costs. `bench reports`: signed reports per second into the
//! coordinator (each committed to SQLite and synced before its 200), from many connections.
//! `bench nix-copy`: `nix copy --to` the coordinator's cache against `nix copy --to file://`
//! of the same closure, rounds interleaved; and the same copy to a coordinator run under
//! `eatmydata` (every fsync a no-op), so the difference is what fsync costs.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use roost_common::SecretKey;
use roost_tests::http::{Conn, Latencies};
use roost_tests::{Coordinator, Keys, free_port, wait_for};
use serde_json::json;
use tokio::sync::Mutex;

use super::{Fleet, node_name, publish_all, report};

pub async fn reports(nodes: usize, conns: usize, seconds: u64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::create(&dir.path().join("keys"))?;
    let coordinator = Coordinator::start(dir.path(), &keys)?;
    let fleet = Arc::new(Fleet {
        addr: format!("127.0.0.1:{}", coordinator.port),
        publisher: Arc::new(SecretKey::read_file(&keys.publisher_sec)?),
        etags: (0..nodes)
            .map(|_| std::sync::Mutex::new(String::new()))
            .collect(),
        seqs: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
        node_keys: (0..nodes)
            .map(|i| SecretKey::generate(&node_name(i)))
            .collect::<Result<_, _>>()?,
    });
    publish_all(&fleet, 1, 8).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let all = Arc::new(Mutex::new(Latencies::default()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..conns {
        let (fleet, stop, all) = (fleet.clone(), stop.clone(), all.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::connect(&fleet.addr).await?;
            let mut lat = Latencies::default();
            // Each connection reports for its own nodes, so seqs arrive in order.
            let mut i = k;
            while !stop.load(Ordering::Relaxed) {
                let body = report(&fleet, i);
                let t = Instant::now();
                let r = c
                    .request(
                        "POST",
                        &format!("/v1/nodes/{}/reports", node_name(i)),
                        &[("Content-Type", "application/json")],
                        &body,
                    )
                    .await?;
                lat.push(t.elapsed());
                if r.status != 200 {
                    bail!("report {}: {}", node_name(i), r.status);
                }
                i = if i + conns < fleet.node_keys.len() {
                    i + conns
                } else {
                    k
                };
            }
            all.lock().await.0.extend(lat.0);
            anyhow::Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut lat = std::mem::take(&mut *all.lock().await);
    println!(
        "{}",
        json!({"scenario": "reports", "nodes": nodes, "connections": conns, "seconds": elapsed,
               "reports_per_s": lat.0.len() as f64 / elapsed,
               "p50_ms": lat.quantile_ms(0.5), "p99_ms": lat.quantile_ms(0.99)})
    );
    Ok(())
}

/// A closure of `paths` store paths of `kib` KiB of random bytes each, plus a root that
/// refers to all of them; built offline. Returns the root.
fn build_closure(dir: &Path, paths: usize, kib: usize) -> anyhow::Result<String> {
    let seed = std::process::id();
    let expr = format!(
        r#"let
          blob = i: derivation {{
            name = "bench-blob-{seed}-${{toString i}}"; system = builtins.currentSystem;
            builder = "/bin/sh"; PATH = "/usr/bin:/bin";
            args = [ "-c" "head -c {kib}K /dev/urandom > $out" ];
          }};
          blobs = builtins.genList blob {paths};
        in derivation {{
          name = "bench-closure-{seed}"; system = builtins.currentSystem;
          builder = "/bin/sh"; PATH = "/usr/bin:/bin";
          args = [ "-c" "echo ${{toString blobs}} > $out" ];
        }}"#
    );
    let out = Command::new("nix")
        .args(["build", "--no-link", "--json", "--impure", "--expr", &expr])
        .current_dir(dir)
        .output()
        .context("running nix build")?;
    if !out.status.success() {
        bail!("nix build: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["outputs"]["out"]
        .as_str()
        .map(str::to_owned)
        .context("no output path from nix build")
}

/// `roost-coordinator serve` on a fresh state folder, optionally under a wrapper command.
struct Served {
    child: Child,
    port: u16,
    state: std::path::PathBuf,
}

impl Served {
    fn start(dir: &Path, keys: &Keys, wrapper: Option<&str>) -> anyhow::Result<Self> {
        let state = dir.join("state");
        let port = free_port();
        let bin = roost_tests::bin("roost-coordinator");
        let mut cmd = match wrapper {
            Some(w) => {
                let mut c = Command::new(w);
                c.arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(&state)
            .arg("--publisher-key")
            .arg(&keys.publisher_pub)
            .arg("--upload-token-file")
            .arg(&keys.token_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting roost-coordinator serve")?;
        wait_for("the coordinator to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(drop)
        })?;
        Ok(Self { child, port, state })
    }

    /// Empties its cache, so the next copy uploads everything again.
    fn clear_cache(&self) -> anyhow::Result<()> {
        let cache = self.state.join("cache");
        std::fs::remove_dir_all(&cache)?;
        std::fs::create_dir_all(cache.join("nar"))?;
        Ok(())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `nix copy --to URL ROOT`, timed; Nix's narinfo cache is bypassed so every round uploads.
fn copy(url: &str, root: &str, netrc: &Path) -> anyhow::Result<f64> {
    let t = Instant::now();
    let out = Command::new("nix")
        .args(["copy", "--to", url, root])
        .args(["--option", "narinfo-cache-positive-ttl", "0"])
        .args(["--option", "narinfo-cache-negative-ttl", "0"])
        .arg("--option")
        .arg("netrc-file")
        .arg(netrc)
        .output()
        .context("running nix copy")?;
    if !out.status.success() {
        bail!(
            "nix copy --to {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(t.elapsed().as_secs_f64())
}

pub fn nix_copy(paths: usize, kib: usize, rounds: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::create(&dir.path().join("keys"))?;
    let netrc = dir.path().join("netrc");
    std::fs::write(
        &netrc,
        format!("default login roost password {}\n", keys.token),
    )?;
    eprintln!("building a closure of {paths} paths of {kib} KiB …");
    let root = build_closure(dir.path(), paths, kib)?;
    let synced = Served::start(&dir.path().join("synced"), &keys, None)?;
    let unsynced = match Command::new("eatmydata").arg("true").status() {
        Ok(s) if s.success() => Some(Served::start(
            &dir.path().join("unsynced"),
            &keys,
            Some("eatmydata"),
        )?),
        _ => {
            eprintln!("eatmydata is not installed: no figure without fsync");
            None
        }
    };
    for compression in ["xz", "none"] {
        let mut rows: Vec<(&str, Vec<f64>)> = vec![("file", vec![]), ("coordinator", vec![])];
        if unsynced.is_some() {
            rows.push(("coordinator_without_fsync", vec![]));
        }
        for round in 0..rounds {
            let file_dir = dir.path().join(format!("file-{compression}-{round}"));
            let file_url = format!("file://{}?compression={compression}", file_dir.display());
            rows[0].1.push(copy(&file_url, &root, &netrc)?);
            synced.clear_cache()?;
            let url = format!(
                "http://127.0.0.1:{}/cache?compression={compression}",
                synced.port
            );
            rows[1].1.push(copy(&url, &root, &netrc)?);
            if let Some(u) = &unsynced {
                u.clear_cache()?;
                let url = format!(
                    "http://127.0.0.1:{}/cache?compression={compression}",
                    u.port
                );
                rows[2].1.push(copy(&url, &root, &netrc)?);
            }
            std::fs::remove_dir_all(&file_dir)?;
        }
        let file = rows[0].1.clone();
        for (target, secs) in &rows {
            let ratios: Vec<f64> = secs.iter().zip(&file).map(|(s, f)| s / f).collect();
            println!(
                "{}",
                json!({"scenario": "nix_copy", "paths": paths + 1, "kib_each": kib,
                       "compression": compression, "to": target, "seconds": secs,
                       "ratio_to_file_per_round": ratios})
            );
        }
    }
    Ok(())
}
