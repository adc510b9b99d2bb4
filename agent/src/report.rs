//! Reports (DESIGN §6): built from the node's position, signed with the node key, queued on
//! disk under a strictly increasing `seq`, and sent in order when a coordinator answers.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use roost_common::envelope::{Context, Envelope};
use roost_common::wire::v1::lease::{LeaseAction, LeaseAnswer, LeaseRequest};
use roost_common::wire::v1::{
    self, HealthResult, ProfileStatus, Report, ReportError, ReportState, Timings,
};
use roost_common::{NodeName, SecretKey, Timestamp, Version};

use crate::poll::error_chain;
use crate::state::StateDir;

/// What a report says, apart from what the reporter fills in itself.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Where the node stands.
    pub state: ReportState,
    /// The manifest version concerned.
    pub version: Option<Version>,
    /// What failed.
    pub error: Option<ReportError>,
    /// Health check results.
    pub health: Vec<HealthResult>,
    /// Phase durations.
    pub timings: Timings,
    /// Per-profile positions.
    pub profiles: Vec<ProfileStatus>,
    /// Security events since the last report.
    pub security_events: Vec<String>,
    /// Reboot, deferral and garbage-collection facts.
    pub conditions: Conditions,
}

/// What a laptop or Pi adds to a report (docs/protocol.md §5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conditions {
    /// Why the system is not fully in use until the next boot (none: it is).
    pub reboot_reasons: Vec<String>,
    /// When a deferral ends by itself.
    pub deferred_until: Option<Timestamp>,
    /// Bytes a garbage collection freed in this deploy.
    pub gc_freed_bytes: Option<u64>,
    /// Generations retention removed in this deploy.
    pub generations_removed: Option<u64>,
}

/// Signs, queues and delivers reports.
#[derive(Debug, Clone)]
pub struct Reporter {
    dir: StateDir,
    key: SecretKey,
    node: NodeName,
    http: reqwest::Client,
    coordinators: Vec<String>,
    /// The queue folder's modification time when it was last seen empty: while it has not
    /// changed, an idle poll's flush looks at one `stat` instead of listing the folder.
    empty_at: Arc<Mutex<Option<SystemTime>>>,
}

/// A folder's modification time, trusted only when it is older than the file system's
/// timestamp granularity could hide (a file added in the same tick would leave it unchanged).
fn settled_mtime(dir: &std::path::Path) -> Option<SystemTime> {
    let m = std::fs::metadata(dir).ok()?.modified().ok()?;
    let age = SystemTime::now().duration_since(m).ok()?;
    (age > Duration::from_secs(1)).then_some(m)
}

impl Reporter {
    /// POSTs the signed JSON `body` to `url`, within 30 s.
    async fn post(&self, url: &str, body: &[u8]) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(url)
            .header("Content-Type", "application/json")
            .body(body.to_vec())
            .timeout(Duration::from_secs(30))
            .send()
            .await
    }

    /// A reporter writing into `dir`'s queue and sending to `coordinators`.
    pub fn new(
        dir: StateDir,
        key: SecretKey,
        node: NodeName,
        http: reqwest::Client,
        coordinators: Vec<String>,
    ) -> Self {
        Self {
            dir,
            key,
            node,
            http,
            coordinators,
            empty_at: Arc::default(),
        }
    }

    /// Builds the report for `o` under the next `seq`, signs it and queues it.
    pub fn queue(&self, o: Outcome) -> std::io::Result<u64> {
        let seq = self.dir.next_seq();
        let report = Report {
            format: v1::FORMAT,
            node: self.node.clone(),
            seq,
            sent_at: Timestamp::now(),
            boot_id: roost_common::process::boot_id(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            manifest_version: o.version,
            state: o.state,
            profiles: o.profiles,
            booted_system: std::fs::read_link("/run/booted-system")
                .ok()
                .map(|p| p.display().to_string()),
            error: o.error,
            health: o.health,
            timings_ms: o.timings,
            security_events: o.security_events,
            node_key: Some(self.key.public()),
            needs_reboot: !o.conditions.reboot_reasons.is_empty(),
            reboot_reasons: o.conditions.reboot_reasons,
            deferred_until: o.conditions.deferred_until,
            gc_freed_bytes: o.conditions.gc_freed_bytes,
            generations_removed: o.conditions.generations_removed,
        };
        let payload = serde_json::to_vec(&report).expect("a report always serialises");
        let env = Envelope::seal(Context::Report, &payload, &[&self.key]).to_bytes();
        self.dir.queue_report(seq, &env)?;
        tracing::debug!(seq, state = report.state.as_str(), "report queued");
        Ok(seq)
    }

    /// Sends queued reports oldest first and stops at the first that cannot be delivered,
    /// so the coordinator sees them in order. A 409 (already received) counts as delivered;
    /// a coordinator's 404 `unknown_node` (it knows no such node) keeps the report queued
    /// (a static host's 404 does not: it never takes reports); another 4xx is a
    /// permanent refusal: that report moves to `reports/refused/` instead of blocking the
    /// queue forever. Returns how many are still queued.
    pub async fn flush(&self) -> usize {
        let dir = self.dir.queue_dir();
        let seen_empty = *self.empty_at.lock().unwrap_or_else(|e| e.into_inner());
        let mtime = std::fs::metadata(&dir).and_then(|m| m.modified()).ok();
        if seen_empty.is_some() && seen_empty == mtime {
            return 0;
        }
        let queued = self.dir.queued_reports();
        if queued.is_empty() {
            *self.empty_at.lock().unwrap_or_else(|e| e.into_inner()) = settled_mtime(&dir);
        }
        if queued.is_empty() || self.coordinators.is_empty() {
            return queued.len();
        }
        crate::fault::point("report");
        let mut left = queued.len();
        'reports: for (seq, path) in queued {
            let body = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(seq, "cannot read queued report {}: {e}", path.display());
                    break;
                }
            };
            for base in &self.coordinators {
                let url = roost_common::wire::v1::http::reports_url(base, &self.node);
                let sent = self.post(&url, &body).await;
                let (status, unknown_node) = match sent {
                    Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                        (404, is_unknown_node(r).await)
                    }
                    Ok(r) => (r.status().as_u16(), false),
                    Err(e) => {
                        tracing::debug!(seq, "cannot reach {base}: {}", error_chain(&e));
                        continue;
                    }
                };
                let done = match status {
                    200..=299 => self.dir.report_delivered(seq, &path),
                    409 => {
                        tracing::debug!(seq, "{base} already has report {seq}");
                        self.dir.report_delivered(seq, &path)
                    }
                    // The coordinator has no manifest for this node (docs/protocol.md §6.4):
                    // a fact about the coordinator (a fresh replica, one restored from an old
                    // backup, a node not yet published there), not about the report, which
                    // the node will be known for once it is published again.
                    404 if unknown_node => {
                        tracing::warn!(
                            seq,
                            "{base} answered 404 unknown_node: it knows no node {} (no \
                             manifest published for it there); report {seq} stays queued and \
                             is sent again later",
                            self.node
                        );
                        continue;
                    }
                    400..=499 if status != 408 && status != 429 => {
                        tracing::error!(
                            seq,
                            status,
                            "{base} refused report {seq}; kept in {}",
                            self.dir.refused_dir().display()
                        );
                        self.dir.report_refused(seq, &path)
                    }
                    _ => {
                        tracing::warn!(seq, status, "{base} did not take report {seq}");
                        continue;
                    }
                };
                if let Err(e) = done {
                    tracing::error!(seq, "{e}");
                    break 'reports;
                }
                left -= 1;
                continue 'reports;
            }
            break;
        }
        left
    }

    /// Asks each coordinator in turn for a reboot lease, or gives back `lease` (docs/protocol.md
    /// §6.10), signed with the node key. The first coordinator that answers decides; a 404 or
    /// 405 from all of them means they hand out no leases (static hosts).
    pub async fn reboot_lease(&self, action: LeaseAction, lease: Option<&str>) -> LeaseOutcome {
        let req = LeaseRequest {
            format: v1::FORMAT,
            node: self.node.clone(),
            action,
            sent_at: Timestamp::now(),
            boot_id: roost_common::process::boot_id(),
            lease: lease.map(str::to_owned),
        };
        let payload = serde_json::to_vec(&req).expect("a lease request always serialises");
        let body = Envelope::seal(Context::RebootLease, &payload, &[&self.key]).to_bytes();
        let mut no_leases = 0;
        for base in &self.coordinators {
            let url = roost_common::wire::v1::http::reboot_lease_url(base, &self.node);
            let sent = self.post(&url, &body).await;
            match sent {
                Ok(r) if r.status().is_success() => match r.json::<LeaseAnswer>().await {
                    Ok(a) => return LeaseOutcome::Answer(a),
                    Err(e) => tracing::warn!("{base}: unreadable lease answer: {e}"),
                },
                Ok(r) if matches!(r.status().as_u16(), 404 | 405) => no_leases += 1,
                Ok(r) => {
                    let status = r.status();
                    let text = r.text().await.unwrap_or_default();
                    tracing::warn!(%status, "{base} refused the reboot lease request: {text}");
                }
                Err(e) => tracing::debug!("cannot reach {base}: {}", error_chain(&e)),
            }
        }
        if no_leases == self.coordinators.len() {
            LeaseOutcome::NoLeases
        } else {
            LeaseOutcome::Unreachable
        }
    }
}

/// How a reboot lease request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    /// A coordinator answered.
    Answer(LeaseAnswer),
    /// No coordinator hands out leases (static hosts, or none configured).
    NoLeases,
    /// None could be asked.
    Unreachable,
}

/// Whether a 404 is a coordinator's `unknown_node` (its JSON error body says so), as opposed
/// to a static host's or a proxy's 404, which will never take a report.
async fn is_unknown_node(r: reqwest::Response) -> bool {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    match r.bytes().await {
        Ok(b) if b.len() <= 64 * 1024 => {
            serde_json::from_slice::<ErrorBody>(&b).is_ok_and(|e| e.error == "unknown_node")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reporter(dir: &std::path::Path) -> Reporter {
        Reporter::new(
            StateDir::new(dir),
            SecretKey::generate("n1").unwrap(),
            "n1".parse().unwrap(),
            reqwest::Client::new(),
            vec![],
        )
    }

    #[tokio::test]
    async fn a_report_queued_after_the_queue_was_seen_empty_is_still_found() {
        let d = tempfile::tempdir().unwrap();
        let r = reporter(d.path());
        let queue = StateDir::new(d.path()).queue_dir();
        std::fs::create_dir_all(&queue).unwrap();
        // An old, settled folder: its emptiness is remembered.
        let old = SystemTime::now() - Duration::from_secs(60);
        std::fs::File::open(&queue)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(r.flush().await, 0);
        assert_eq!(*r.empty_at.lock().unwrap(), Some(old));
        // Another process (`roost-agent apply`) queues a report.
        StateDir::new(d.path()).queue_report(1, b"{}").unwrap();
        assert_eq!(
            r.flush().await,
            1,
            "the remembered empty folder hid a report"
        );
    }

    /// A coordinator on loopback answering every request with `status` and `body`.
    async fn answering(status: u16, body: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let Ok((mut c, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut got = Vec::new();
                    // The head, then the body its Content-Length gives.
                    loop {
                        let n = c.read(&mut buf).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        got.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&got).to_lowercase();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            if got.len() >= end + 4 + len {
                                break;
                            }
                        }
                    }
                    let answer = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = c.write_all(answer.as_bytes()).await;
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn a_report_answered_unknown_node_stays_queued_and_other_refusals_move_aside() {
        let unknown = r#"{"error":"unknown_node","message":"no manifest for n1"}"#;
        let invalid = r#"{"error":"invalid_report","message":"x"}"#;
        // A static host's 404 (no JSON error code): it will never take a report.
        let plain = "<html>404 Not Found</html>";
        for (status, body, queued) in [(404, unknown, 1), (404, plain, 0), (400, invalid, 0)] {
            let d = tempfile::tempdir().unwrap();
            let state = StateDir::new(d.path());
            let r = Reporter::new(
                StateDir::new(d.path()),
                SecretKey::generate("n1").unwrap(),
                "n1".parse().unwrap(),
                reqwest::Client::new(),
                vec![answering(status, body).await],
            );
            state.queue_report(1, b"{}").unwrap();
            assert_eq!(r.flush().await, queued, "answered {status} {body}");
            assert_eq!(
                state.queued_reports().len(),
                queued,
                "answered {status} {body}"
            );
            let refused = std::fs::read_dir(state.refused_dir()).map_or(0, Iterator::count);
            assert_eq!(refused, 1 - queued, "answered {status} {body}");
        }
    }

    #[tokio::test]
    async fn a_folder_changed_within_the_last_second_is_not_remembered_empty() {
        let d = tempfile::tempdir().unwrap();
        let r = reporter(d.path());
        std::fs::create_dir_all(StateDir::new(d.path()).queue_dir()).unwrap();
        assert_eq!(r.flush().await, 0);
        assert_eq!(*r.empty_at.lock().unwrap(), None);
    }
}
