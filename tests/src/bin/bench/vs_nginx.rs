//! `bench vs-nginx`: the coordinator beside Debian's nginx, on the same files, with the same
//! client: a NAR downloaded from the embedded cache by 1 and by 20 clients at once, and
//! conditional manifest polls (304) against nginx serving the coordinator's manifest folder,
//! which is the static `publish --out` layout. Each round measures both servers back to back
//! (alternating which goes first), so both see the same load on this shared machine; the
//! summary gives the ratio roost / nginx per round, its median and its spread.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use roost_common::SecretKey;
use roost_tests::http::{Conn, Latencies};
use roost_tests::{Coordinator, Keys, free_port, wait_for};
use serde_json::json;

use super::{manifest, node_name, rss_kib, upload};

/// What to measure.
#[derive(Debug, Clone)]
pub struct Plan {
    pub nar_mib: u64,
    pub clients: Vec<usize>,
    pub seconds: u64,
    pub rounds: usize,
    pub poll_conns: usize,
    pub nodes: usize,
}

/// A NAR's file name as Nix writes it (nix-base32 file hash).
const NAR: &str = "1b9p07z77phvv2hf6gm9f28syp39f1ag5jvwaqzbzbd1ra5h0jmh.nar";

pub async fn run(plan: Plan) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::create(&dir.path().join("keys"))?;
    let coordinator = Coordinator::start(dir.path(), &keys)?;
    let pid = coordinator.pid().context("coordinator pid")?;
    let roost = format!("127.0.0.1:{}", coordinator.port);
    let state = coordinator.state_dir.clone();
    write_nar(&state.join("cache/nar").join(NAR), plan.nar_mib << 20)?;
    let publisher = Arc::new(SecretKey::read_file(&keys.publisher_sec)?);
    let payload = |i: usize| {
        let node = node_name(i);
        (node.clone(), manifest(&node, 1, None))
    };
    upload(&roost, publisher, plan.nodes, 8, Arc::new(payload)).await?;
    let nginx = Nginx::start(dir.path(), &state)?;
    let servers = [
        ("roost", roost.clone(), Some(pid)),
        ("nginx", nginx.addr.clone(), None),
    ];
    let etags = [
        learn_etags(&roost, plan.nodes).await?,
        learn_etags(&nginx.addr, plan.nodes).await?,
    ];
    let nar_path = format!("/cache/nar/{NAR}");
    // Both read the file once, so neither round starts with a cold page cache.
    for (_, addr, _) in &servers {
        download(addr, &nar_path, 1, 1, None).await?;
    }
    let mut table: Vec<(String, [Vec<f64>; 2])> = Vec::new();
    let mut record =
        |what: String, server: usize, v: f64| match table.iter_mut().find(|(w, _)| *w == what) {
            Some((_, vals)) => vals[server].push(v),
            None => {
                let mut vals = [Vec::new(), Vec::new()];
                vals[server].push(v);
                table.push((what, vals));
            }
        };
    for round in 0..plan.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for &clients in &plan.clients {
            for &k in &order {
                let (name, addr, pid) = &servers[k];
                let d = download(addr, &nar_path, clients, plan.seconds, *pid).await?;
                println!(
                    "{}",
                    json!({"scenario": "vs_nginx", "round": round, "what": "nar", "server": name,
                           "clients": clients, "nar_mib": plan.nar_mib, "seconds": d.seconds,
                           "mib_per_s": d.mib_per_s, "server_rss_before_mib": d.rss_before_mib,
                           "server_rss_max_mib": d.rss_max_mib})
                );
                record(format!("nar_{clients}_clients_mib_per_s"), k, d.mib_per_s);
            }
        }
        for &k in &order {
            let (name, addr, _) = &servers[k];
            let mut p = polls(addr, &etags[k], plan.poll_conns, plan.seconds).await?;
            let (per_s, p50, p99) = (p.per_s, p.lat.quantile_ms(0.5), p.lat.quantile_ms(0.99));
            println!(
                "{}",
                json!({"scenario": "vs_nginx", "round": round, "what": "poll_304", "server": name,
                       "connections": plan.poll_conns, "nodes": plan.nodes, "per_s": per_s,
                       "p50_ms": p50, "p99_ms": p99, "reconnects": p.reconnects})
            );
            record("poll_304_per_s".into(), k, per_s);
            record("poll_304_p50_ms".into(), k, p50);
            record("poll_304_p99_ms".into(), k, p99);
        }
    }
    for (what, [roost, nginx]) in &table {
        let mut ratios: Vec<f64> = roost.iter().zip(nginx).map(|(r, n)| r / n).collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "{}",
            json!({"scenario": "vs_nginx", "summary": what, "roost": roost, "nginx": nginx,
                   "ratio_roost_over_nginx_median": ratios[ratios.len() / 2],
                   "ratio_min": ratios[0], "ratio_max": ratios[ratios.len() - 1]})
        );
    }
    drop(nginx);
    drop(coordinator);
    Ok(())
}

/// Writes `bytes` of incompressible data (xorshift), as a NAR of a real closure would be.
fn write_nar(path: &Path, bytes: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..bytes / 8 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.write_all(&x.to_le_bytes())?;
    }
    f.flush()?;
    Ok(())
}

/// Debian's nginx with its packaged defaults that matter here (`sendfile on`,
/// `tcp_nopush on`, one worker per core), serving the coordinator's state folder: the cache
/// under `/cache/`, the manifests under `/v1/`. No access log (the coordinator keeps none
/// per request either) and no limit on requests per connection (the coordinator has none).
struct Nginx {
    child: Child,
    addr: String,
}

impl Nginx {
    fn start(dir: &Path, state: &Path) -> anyhow::Result<Self> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("nginx is not installed (apt-get install nginx-light)")?;
        let port = free_port();
        let run = dir.join("nginx");
        std::fs::create_dir_all(&run)?;
        let conf = run.join("nginx.conf");
        let p = |p: PathBuf| p.display().to_string();
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nuser root;\nworker_processes auto;\npid {pid};\nerror_log {err} warn;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{\n  sendfile on;\n  tcp_nopush on;\n  access_log off;\n  keepalive_requests 100000000;\n\
                 \x20 client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n  fastcgi_temp_path {tmp}/fastcgi;\n\
                 \x20 uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n\
                 \x20 default_type application/octet-stream;\n\
                 \x20 server {{\n    listen 127.0.0.1:{port};\n\
                 \x20   location /cache/ {{ alias {cache}/; }}\n\
                 \x20   location /v1/ {{ root {manifests}; default_type application/json; }}\n  }}\n}}\n",
                pid = p(run.join("nginx.pid")),
                err = p(run.join("error.log")),
                tmp = p(run.clone()),
                cache = p(state.join("cache")),
                manifests = p(state.join("manifests")),
            ),
        )?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&run)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting nginx")?;
        let addr = format!("127.0.0.1:{port}");
        wait_for("nginx to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(&addr).ok().map(drop)
        })?;
        Ok(Self { child, addr })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM is nginx's fast shutdown; the master stops its workers.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

/// Each node's ETag as `addr` gives it.
async fn learn_etags(addr: &str, nodes: usize) -> anyhow::Result<Vec<String>> {
    let mut c = Conn::connect(addr).await?;
    let mut out = Vec::with_capacity(nodes);
    for i in 0..nodes {
        let r = c
            .request(
                "GET",
                &format!("/v1/nodes/{}/manifest", node_name(i)),
                &[],
                &[],
            )
            .await?;
        if r.status != 200 {
            bail!("GET {} from {addr}: {}", node_name(i), r.status);
        }
        out.push(r.etag.with_context(|| format!("no ETag from {addr}"))?);
    }
    Ok(out)
}

struct Downloaded {
    seconds: f64,
    mib_per_s: f64,
    rss_before_mib: f64,
    rss_max_mib: f64,
}

/// `clients` connections download `path` over and over for `seconds`; bytes are counted as
/// they arrive, so a download cut by the end of the window counts for what arrived.
async fn download(
    addr: &str,
    path: &str,
    clients: usize,
    seconds: u64,
    pid: Option<u32>,
) -> anyhow::Result<Downloaded> {
    let bytes = Arc::new(AtomicU64::new(0));
    let rss_before = pid.map_or(0, rss_kib);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (addr, path, bytes) = (addr.to_owned(), path.to_owned(), bytes.clone());
        tasks.spawn(async move {
            let mut c = Conn::connect(&addr).await?;
            let mut scratch = vec![0u8; 1 << 20];
            loop {
                let (status, _) = c.download(&path, &mut scratch, &bytes).await?;
                if status != 200 {
                    bail!("GET {path} from {addr}: {status}");
                }
            }
        });
    }
    let mut rss_max = rss_before;
    let deadline = start + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        rss_max = rss_max.max(pid.map_or(0, rss_kib));
        if let Some(r) = tasks.try_join_next() {
            r??;
            bail!("a download client stopped early");
        }
    }
    let got = bytes.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    tasks.abort_all();
    Ok(Downloaded {
        seconds: elapsed,
        mib_per_s: got as f64 / elapsed / f64::from(1 << 20),
        rss_before_mib: rss_before as f64 / 1024.0,
        rss_max_mib: rss_max as f64 / 1024.0,
    })
}

struct Polled {
    per_s: f64,
    lat: Latencies,
    reconnects: u64,
}

/// `conns` keep-alive connections poll every node's manifest with its ETag for `seconds`.
async fn polls(addr: &str, etags: &[String], conns: usize, seconds: u64) -> anyhow::Result<Polled> {
    let stop = Arc::new(AtomicBool::new(false));
    let etags = Arc::new(etags.to_vec());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..conns {
        let (addr, stop, etags) = (addr.to_owned(), stop.clone(), etags.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Conn::connect(&addr).await?;
            let mut lat = Latencies::default();
            let mut i = k * 7919 % etags.len();
            while !stop.load(Ordering::Relaxed) {
                i = (i + conns) % etags.len();
                let t = Instant::now();
                let r = c
                    .request(
                        "GET",
                        &format!("/v1/nodes/{}/manifest", node_name(i)),
                        &[("If-None-Match", &etags[i])],
                        &[],
                    )
                    .await?;
                lat.push(t.elapsed());
                if r.status != 304 {
                    bail!("conditional GET {} from {addr}: {}", node_name(i), r.status);
                }
            }
            anyhow::Ok((lat, c.reconnects))
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Latencies::default();
    let mut reconnects = 0;
    for t in tasks {
        let (lat, r) = t.await??;
        all.0.extend(lat.0);
        reconnects += r;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Polled {
        per_s: all.0.len() as f64 / elapsed,
        lat: all,
        reconnects,
    })
}
