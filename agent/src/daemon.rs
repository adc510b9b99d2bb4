//! The daemon loop (DESIGN §7.1): recover, tell systemd we are ready, then poll — long-polls
//! where the coordinator offers them, else every interval ± 20 % — back off exponentially to
//! an hour on errors, and poll at once after a wall-clock jump (resume from suspend). Between
//! polls the daemon sleeps on one timer (no periodic wake-ups).
//!
//! The live view is served on `STATE/agent.sock` (one JSON document per connection) and
//! mirrored to `status.json` when it changes; `roost-agent status` reads either.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use roost_common::Timestamp;
use sd_notify::NotifyState;

use crate::agent::{Agent, Verdict};
use crate::notify::{self, notify};
use crate::poll::{self, Poll, Wake, WallClock, backoff, jitter};
use crate::state::Snapshot;

/// How long to wait between long-polls that came back unchanged.
const LONG_POLL_GAP: Duration = Duration::from_millis(500);

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
    let held = match &poll {
        Poll::NotModified => true,
        Poll::New(..) => agent.last_poll_fresh(),
        _ => false,
    };
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
    if reachable {
        agent.flush_reports().await;
    }
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
    if r.verdict == Verdict::NotConverged && agent.has_work() {
        // A deferred deploy (closure not in the cache yet, no space): retry sooner.
        delay = delay.min(jitter(backoff(agent.deferred()).min(interval)));
    }
    delay
}

/// Runs until `shutdown` resolves.
pub async fn run(
    mut agent: Agent,
    clock: Arc<dyn WallClock>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let socket = serve_status(agent.config().state_dir.join("agent.sock"), agent.live())?;
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
        let wait = agent.long_poll_offered().then_some(long_wait);
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
    let _ = std::fs::remove_file(agent.config().state_dir.join("agent.sock"));
    Ok(())
}

/// Answers every connection on the status socket with the live view as JSON.
fn serve_status(
    path: PathBuf,
    live: Arc<Mutex<Snapshot>>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).map_err(|e| {
        std::io::Error::new(e.kind(), format!("status socket {}: {e}", path.display()))
    })?;
    Ok(tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let body = live
                .lock()
                .map(|l| serde_json::to_vec(&*l).unwrap_or_default())
                .unwrap_or_default();
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(&body).await;
        }
    }))
}
