//! The daemon loop (DESIGN §7.1): recover, tell systemd we are ready, then poll — long-polls
//! where the coordinator offers them, else every interval ± 20 % — back off exponentially to
//! an hour on errors, and poll at once after a wall-clock jump (resume from suspend). Between
//! polls the daemon sleeps on one timer (no periodic wake-ups).
//!
//! The status document is served on `STATE/agent.sock` (one JSON document per connection,
//! mode 0600) and the live view mirrored to `status.json` when it changes; `roost-agent
//! status` reads either.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use roost_common::Timestamp;
use sd_notify::NotifyState;

use crate::agent::{Agent, Verdict};
use crate::notify::{self, notify};
use crate::poll::{self, Poll, Wake, WallClock, backoff, jitter};
use crate::state::{Snapshot, StateDir};
use crate::status;

/// How long to wait between long-polls that came back unchanged.
const LONG_POLL_GAP: Duration = Duration::from_millis(500);
/// The status socket's mode: root only (see [`serve_status`]).
const SOCKET_MODE: u32 = 0o600;
/// After a failed accept on the status socket, wait this long before the next.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// A status client that does not read its answer within this long is dropped.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// What one cycle did.
#[derive(Debug, Clone)]
pub struct CycleResult {
    /// Whether the node converged.
    pub verdict: Verdict,
    /// What the poll brought (`not modified`, `new manifest`, `failed: …`).
    pub poll: String,
    /// Whether the coordinators could be reached.
    pub reachable: bool,
    /// Whether the next long-poll can start at once: the coordinator held this poll open,
    /// answered with something new, or (on a plain poll's 304) said that it holds polls.
    pub held: bool,
}

/// One poll-and-apply cycle: `wait` asks for a long-poll of that many seconds.
pub async fn cycle(agent: &mut Agent, wait: Option<u64>) -> CycleResult {
    let poll = agent.poll(wait).await;
    apply(agent, poll).await
}

/// The apply half of a cycle: whatever the poll brought is verified and deployed, and
/// queued reports are sent.
pub async fn apply(agent: &mut Agent, poll: Poll) -> CycleResult {
    let text = poll.describe();
    let is_new = matches!(poll, Poll::New(..));
    let held = match &poll {
        Poll::NotModified => true,
        Poll::New(..) => agent.last_poll_fresh(),
        _ => false,
    };
    if !matches!(poll, Poll::Unreachable(_)) {
        agent.note_manifest_presence(poll == Poll::NoManifest);
    }
    let (verdict, reachable) = match poll {
        // Idle: no disk write, no Nix call unless a deploy is still due (deferred).
        Poll::NotModified => (agent.deploy_if_needed().await, true),
        Poll::New(bytes, etag) => (agent.handle_manifest(&bytes, etag).await, true),
        Poll::NoManifest => (Verdict::Converged, true),
        Poll::Unreachable(_) => {
            // Offline nodes still finish what they already accepted.
            let v = agent.deploy_if_needed().await;
            (v, false)
        }
    };
    if verdict == Verdict::Converged {
        agent.reboot_if_due().await;
    }
    if reachable {
        agent.flush_reports().await;
    }
    // "new manifest" would hide that it was refused (`status` shows why).
    let text = match (is_new, agent.last_manifest_refused()) {
        (true, Some(code)) => format!("manifest refused ({code})"),
        _ => text,
    };
    CycleResult {
        verdict,
        held: held && agent.long_poll_offered(),
        poll: text,
        reachable,
    }
}

/// How long to wait after a cycle.
pub fn next_delay(agent: &Agent, r: &CycleResult, failures: u32) -> Duration {
    let interval = agent.config().interval;
    let mut delay = if !r.reachable {
        jitter(backoff(failures))
    } else if r.held {
        // The coordinator held the request until something changed or `wait` passed.
        jitter(LONG_POLL_GAP)
    } else {
        jitter(interval)
    };
    if r.verdict == Verdict::NotConverged && agent.has_work() && agent.waiting().is_none() {
        // A deferred deploy (closure not in the cache yet, no space): retry sooner.
        delay = delay.min(jitter(backoff(agent.deferred()).min(interval)));
    }
    if let Some(wake) = agent.until_wake() {
        // A window opens or a deferral ends: be there (docs/protocol.md §7.13).
        delay = delay.min(wake);
    }
    delay
}

/// Runs until `shutdown` resolves.
pub async fn run(
    mut agent: Agent,
    clock: Arc<dyn WallClock>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let socket = serve_status(agent.config().state_dir.clone(), agent.live())?;
    let watchdog = notify::spawn_watchdog(agent.progress());
    agent.recover().await;
    agent.flush_reports().await;
    agent.idle();
    notify(&[
        NotifyState::Ready,
        NotifyState::Status("state reconciled; polling"),
    ]);
    tracing::info!(node = %agent.config().node, coordinators = ?agent.config().coordinators, "roost-agent running");
    let mut failures: u32 = 0;
    let mut clock_watch = clock.watch();
    let long_wait = agent
        .config()
        .interval
        .as_secs()
        .clamp(1, roost_common::wire::v1::http::MAX_WAIT_S);
    tokio::pin!(shutdown);
    loop {
        // A held poll ends when a window opens or a deferral ends, so the deploy is on time.
        let wait = agent.long_poll_offered().then(|| {
            agent
                .until_wake()
                .map_or(long_wait, |d| d.as_secs().clamp(1, long_wait))
        });
        agent.progress().within(Duration::from_secs(long_wait + 30));
        // A stop request ends a poll at once but never a deploy: that finishes (under its
        // own hard timeouts) so the node is not left half switched.
        let polled = tokio::select! {
            p = agent.poll(wait) => p,
            _ = &mut shutdown => break,
        };
        let r = apply(&mut agent, polled).await;
        if r.reachable {
            failures = 0;
        } else {
            failures = failures.saturating_add(1);
            tracing::warn!(failures, "{}", r.poll);
        }
        let delay = next_delay(&agent, &r, failures);
        let next = Timestamp::from(SystemTime::now() + delay);
        agent.note_poll(&r.poll, Some(next), failures);
        notify(&[NotifyState::Status(&format!("last poll: {}", r.poll))]);
        // The watchdog keeps pinging through the whole sleep: no need to wake to promise.
        agent.progress().within(delay);
        let slept = tokio::select! {
            w = poll::sleep_watching_clock(delay, clock.as_ref(), clock_watch.as_mut()) => w,
            _ = &mut shutdown => break,
        };
        if slept == Wake::ClockJumped {
            tracing::info!("the wall clock jumped ahead (resume from suspend?): polling now");
        }
    }
    notify(&[NotifyState::Stopping]);
    socket.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    let _ = std::fs::remove_file(StateDir::new(&agent.config().state_dir).socket());
    Ok(())
}

/// Answers every connection on the status socket with the status document as JSON.
///
/// The socket is mode 0600: only root (the agent's user) may ask. The document holds
/// nothing secret, but activation output and errors in it can name paths and hosts, and
/// each connection costs the daemon a read of its state folder; `status.json`, which any
/// user who can read the state folder can read, stays the unprivileged view. It is bound
/// under a temporary name and renamed into place once its mode is set, so no client ever
/// connects to it before. A failed accept (say, out of file descriptors) is logged and the
/// server goes on after a pause; each answer is its own task, so a slow reader holds up
/// nobody.
fn serve_status(
    dir: PathBuf,
    live: Arc<Mutex<Snapshot>>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(&dir)?;
    let path = StateDir::new(&dir).socket();
    let fresh = path.with_file_name(".agent.sock.new");
    let _ = std::fs::remove_file(&fresh);
    let at = |e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("status socket {}: {e}", path.display()))
    };
    let listener = tokio::net::UnixListener::bind(&fresh).map_err(at)?;
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(at)?;
    std::fs::rename(&fresh, &path).map_err(at)?;
    Ok(tokio::spawn(async move {
        let accept = || async { listener.accept().await.map(|(s, _)| s) };
        accept_each(accept, |mut s| {
            let (dir, live) = (dir.clone(), live.clone());
            tokio::spawn(async move {
                let snap = live.lock().map(|l| l.clone()).ok();
                let doc = tokio::task::spawn_blocking(move || status::document(&dir, snap)).await;
                let body = match doc {
                    Ok(Ok(doc)) => serde_json::to_vec(&doc).unwrap_or_default(),
                    Ok(Err(e)) => {
                        tracing::warn!("status socket: {e:#}");
                        return;
                    }
                    Err(_) => return,
                };
                use tokio::io::AsyncWriteExt;
                let _ = tokio::time::timeout(ANSWER_TIMEOUT, s.write_all(&body)).await;
            });
        })
        .await
    }))
}

/// Hands every connection `accept` yields to `answer`, for ever: a failed accept is logged
/// and retried after [`ACCEPT_PAUSE`] (an error such as EMFILE would otherwise spin).
async fn accept_each<S, F>(mut accept: impl FnMut() -> F, mut answer: impl FnMut(S))
where
    F: std::future::Future<Output = std::io::Result<S>>,
{
    loop {
        match accept().await {
            Ok(s) => answer(s),
            Err(e) => {
                tracing::warn!("status socket: accept failed: {e}");
                tokio::time::sleep(ACCEPT_PAUSE).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_failed_accept_does_not_end_the_status_server() {
        let calls = std::cell::Cell::new(0);
        let mut answered = Vec::new();
        let accept = || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move {
                match n {
                    1 | 3 => Err(std::io::Error::from_raw_os_error(24)), // EMFILE
                    2 | 4 => Ok(n),
                    _ => std::future::pending().await,
                }
            }
        };
        let served = tokio::time::timeout(
            Duration::from_secs(60),
            accept_each(accept, |n| answered.push(n)),
        )
        .await;
        assert!(served.is_err(), "the server ended");
        assert_eq!(answered, vec![2, 4]);
    }
}
