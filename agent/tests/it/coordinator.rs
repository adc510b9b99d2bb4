//! A tiny stand-in coordinator for the agent's tests: serves one node's manifest with ETag,
//! `If-None-Match` and `?wait=` long-polls, verifies and records POSTed reports (409 for a
//! seq not above the last), answers a health URL, and can play dead (connections closed
//! without an answer) on demand or while a marker file exists.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use roost_common::envelope::{self, Context};
use roost_common::wire::v1::Report;
use roost_common::wire::v1::http::{self as v1, LONG_POLL_HEADER, MAX_WAIT_S, WAIT_PARAM};
use roost_common::{PublicKey, TrustedKeys};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub if_none_match: Option<String>,
}

#[derive(Debug, Default)]
struct Shared {
    manifest: Mutex<Option<(Vec<u8>, String)>>,
    reports: Mutex<Vec<Report>>,
    requests: Mutex<Vec<Seen>>,
    down: AtomicBool,
    down_file: Mutex<Option<PathBuf>>,
    health_status: AtomicU16,
    long_poll: AtomicBool,
    etag_counter: AtomicU64,
}

/// The running server (on its own thread and runtime, so blocking tests can use it).
#[derive(Debug)]
pub struct TestCoordinator {
    pub port: u16,
    shared: Arc<Shared>,
    changed: watch::Sender<u64>,
    _thread: std::thread::JoinHandle<()>,
}

impl TestCoordinator {
    pub fn start() -> Self {
        let shared = Arc::new(Shared {
            health_status: AtomicU16::new(200),
            long_poll: AtomicBool::new(true),
            ..Shared::default()
        });
        let (tx, rx) = watch::channel(0u64);
        let (port_tx, port_rx) = std::sync::mpsc::channel();
        let s = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
                port_tx.send(l.local_addr().unwrap().port()).unwrap();
                loop {
                    let Ok((stream, _)) = l.accept().await else {
                        continue;
                    };
                    tokio::spawn(serve_conn(stream, s.clone(), rx.clone()));
                }
            });
        });
        let port = port_rx.recv().unwrap();
        Self {
            port,
            shared,
            changed: tx,
            _thread: thread,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Serves `envelope` as the node's manifest (waking held long-polls).
    pub fn publish(&self, envelope: &[u8]) {
        let n = self.shared.etag_counter.fetch_add(1, Ordering::SeqCst) + 1;
        *self.shared.manifest.lock().unwrap() = Some((envelope.to_vec(), format!("\"m{n}\"")));
        self.changed.send_modify(|v| *v += 1);
    }

    /// Stops answering (true) or answers again (false).
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    /// Plays dead while `file` exists.
    pub fn down_while_exists(&self, file: PathBuf) {
        *self.shared.down_file.lock().unwrap() = Some(file);
    }

    /// What `GET /health` answers.
    pub fn set_health(&self, status: u16) {
        self.shared.health_status.store(status, Ordering::SeqCst);
    }

    /// Whether the server offers long-polls.
    pub fn set_long_poll(&self, on: bool) {
        self.shared.long_poll.store(on, Ordering::SeqCst);
    }

    /// Reports received (signature checked), in arrival order.
    pub fn reports(&self) -> Vec<Report> {
        self.shared.reports.lock().unwrap().clone()
    }

    /// Requests seen.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for the reports, up to `secs`.
    pub fn wait_reports(&self, secs: u64, pred: impl Fn(&[Report]) -> bool) -> Vec<Report> {
        let end = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let r = self.reports();
            if pred(&r) || std::time::Instant::now() > end {
                return r;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn is_down(s: &Shared) -> bool {
    s.down.load(Ordering::SeqCst)
        || s.down_file
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|f| f.exists())
}

async fn serve_conn(stream: TcpStream, s: Arc<Shared>, mut changed: watch::Receiver<u64>) {
    let mut r = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("").to_owned();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await.unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).await.is_err() {
            return;
        }
        if is_down(&s) {
            return; // close without an answer: unreachable
        }
        s.requests.lock().unwrap().push(Seen {
            method: method.clone(),
            target: target.clone(),
            if_none_match: headers.get("if-none-match").cloned(),
        });
        let (status, extra, out) = route(&s, &method, &target, &headers, &body, &mut changed).await;
        if is_down(&s) {
            return;
        }
        let reason = match status {
            200 => "OK",
            304 => "Not Modified",
            404 => "Not Found",
            409 => "Conflict",
            _ => "Other",
        };
        let mut head = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-length: {}\r\n",
            out.len()
        );
        for (k, v) in extra {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let w = r.get_mut();
        if w.write_all(head.as_bytes()).await.is_err() || w.write_all(&out).await.is_err() {
            return;
        }
    }
}

type Answer = (u16, Vec<(String, String)>, Vec<u8>);

async fn route(
    s: &Shared,
    method: &str,
    target: &str,
    headers: &HashMap<String, String>,
    body: &[u8],
    changed: &mut watch::Receiver<u64>,
) -> Answer {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let lp = s.long_poll.load(Ordering::SeqCst);
    let lp_header = || {
        if lp {
            vec![(LONG_POLL_HEADER.to_owned(), MAX_WAIT_S.to_string())]
        } else {
            vec![]
        }
    };
    if method == "GET" && path == "/health" {
        return (
            s.health_status.load(Ordering::SeqCst),
            vec![],
            b"{}".to_vec(),
        );
    }
    if method == "GET" && v1::manifest_node(path).is_some() {
        let wait: u64 = query
            .strip_prefix(WAIT_PARAM)
            .and_then(|q| q.strip_prefix('='))
            .and_then(|w| w.parse().ok())
            .filter(|_| lp)
            .unwrap_or(0);
        changed.mark_unchanged();
        let current = s.manifest.lock().unwrap().clone();
        let Some((bytes, etag)) = current else {
            return (404, vec![], br#"{"error":"not_found"}"#.to_vec());
        };
        if headers.get("if-none-match") == Some(&etag) {
            if wait > 0 {
                let _ = tokio::time::timeout(Duration::from_secs(wait), changed.changed()).await;
                if let Some((b, e)) = s.manifest.lock().unwrap().clone() {
                    if e != etag {
                        let mut h = lp_header();
                        h.push(("etag".into(), e));
                        return (200, h, b);
                    }
                }
            }
            let mut h = lp_header();
            h.push(("etag".into(), etag));
            return (304, h, vec![]);
        }
        let mut h = lp_header();
        h.push(("etag".into(), etag));
        return (200, h, bytes);
    }
    if method == "POST" && v1::reports_node(path).is_some() {
        return match check_report(body) {
            Ok(report) => {
                let mut all = s.reports.lock().unwrap();
                if all.last().is_some_and(|l| l.seq >= report.seq) {
                    return (409, vec![], br#"{"error":"seq"}"#.to_vec());
                }
                all.push(report);
                (200, vec![], b"{}".to_vec())
            }
            Err(e) => (400, vec![], e.into_bytes()),
        };
    }
    (404, vec![], b"{}".to_vec())
}

/// Opens a report envelope with the key the report itself names (trust on first use, as far
/// as this test server cares) and checks the signature.
fn check_report(body: &[u8]) -> Result<Report, String> {
    let env: envelope::Envelope = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(&env.payload)
        .map_err(|e| e.to_string())?;
    let report: Report = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
    let key: PublicKey = report.node_key.clone().ok_or("report names no node key")?;
    envelope::open(body, Context::Report, &TrustedKeys::new([key], 1))
        .map_err(|e| e.to_string())?;
    Ok(report)
}
