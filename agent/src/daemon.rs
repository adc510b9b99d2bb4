//! The daemon loop (DESIGN §7.1): conditional GETs (long-polls where the coordinator offers
//! them) every interval ± 20 %, exponential backoff to 1 h on errors, a prompt poll after a
//! wall-clock jump (resume from suspend), systemd notifications, and the status socket.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use roost_common::Timestamp;
use sd_notify::NotifyState;
use tokio::time::Instant;

use crate::agent::{Agent, Live, Poll, Verdict};

const MAX_BACKOFF: Duration = Duration::from_secs(3600);
const JUMP: Duration = Duration::from_secs(30);

/// A value in `[d·0.8, d·1.2]`.
pub fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 8];
    let _ = getrandom_fill(&mut b);
    let r = (u64::from_le_bytes(b) % 4001) as f64 / 10_000.0; // 0.0 ..= 0.4
    d.mul_f64(0.8 + r)
}

fn getrandom_fill(b: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(b)
}

/// Backoff after `n` consecutive failures: 5 s, 10 s, 20 s … capped at 1 h.
pub fn backoff(n: u32) -> Duration {
    Duration::from_secs(5)
        .saturating_mul(1u32 << n.min(20))
        .min(MAX_BACKOFF)
}

fn notify(states: &[NotifyState]) {
    let _ = sd_notify::notify(false, states);
}

/// One poll-and-apply cycle. `wait` asks for a long-poll of that many seconds.
pub async fn cycle(
    agent: &mut Agent,
    wait: Option<u64>,
) -> (Verdict, Result<&'static str, String>) {
    let poll = agent.poll(wait).await;
    let result = match poll {
        Poll::NotModified => {
            let v = agent.deploy_if_needed().await;
            (v, Ok("not modified"))
        }
        Poll::New(bytes, etag) => {
            let v = agent.handle_manifest(&bytes, etag).await;
            (v, Ok("new manifest"))
        }
        Poll::NoManifest => (
            Verdict::Converged,
            Ok("no manifest published for this node"),
        ),
        Poll::Unreachable(e) => {
            let v = agent.deploy_if_needed().await;
            (
                if v == Verdict::Converged && agent.state().desired.is_some() {
                    Verdict::Converged
                } else {
                    Verdict::NotConverged
                },
                Err(e),
            )
        }
    };
    agent.flush_reports().await;
    result
}

/// Runs until `shutdown` resolves.
pub async fn run(
    mut agent: Agent,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let live = agent.live.clone();
    let socket = serve_status(agent.config().state_dir.join("agent.sock"), live.clone());
    agent.recover().await;
    agent.flush_reports().await;
    notify(&[
        NotifyState::Ready,
        NotifyState::Status("reconciled; polling"),
    ]);
    tracing::info!(node = %agent.config().node, coordinators = ?agent.config().coordinators, "roost-agent running");
    let mut failures: u32 = 0;
    let interval = agent.config().interval;
    let long_wait = interval.as_secs().clamp(1, 300);
    tokio::pin!(shutdown);
    loop {
        let wait = agent.long_poll_offered().then_some(long_wait);
        let (verdict, result) = tokio::select! {
            r = cycle(&mut agent, wait) => r,
            _ = &mut shutdown => break,
        };
        let mut delay = match &result {
            Ok("not modified") if agent.long_poll_offered() && wait.is_some() => {
                jitter(Duration::from_millis(500))
            }
            Ok(_) => jitter(interval),
            Err(_) => backoff(failures),
        };
        match &result {
            Ok(_) => failures = 0,
            Err(e) => {
                failures += 1;
                tracing::warn!(failures, "poll failed: {e}");
            }
        }
        if verdict == Verdict::NotConverged && agent.has_work() {
            // A deferred deploy (closure not in the cache yet, no space): retry soon.
            delay = delay.min(backoff(agent.deferred.saturating_sub(1)).min(interval));
        }
        let next = Timestamp::from(SystemTime::now() + delay);
        let text = match &result {
            Ok(t) => (*t).to_owned(),
            Err(e) => format!("failed: {e}"),
        };
        agent.note_poll(&text, Some(next), failures);
        notify(&[
            NotifyState::Watchdog,
            NotifyState::Status(&format!("last poll: {text}")),
        ]);
        tokio::select! {
            _ = sleep_watching_clock(delay) => {}
            _ = &mut shutdown => break,
        }
    }
    notify(&[NotifyState::Stopping]);
    socket.abort();
    Ok(())
}

/// Sleeps `d`, waking early when the wall clock jumps ahead of the monotonic clock (a
/// resume from suspend), and pinging the watchdog meanwhile.
async fn sleep_watching_clock(d: Duration) {
    let start = Instant::now();
    let wall = SystemTime::now();
    while start.elapsed() < d {
        let step = (d - start.elapsed()).min(Duration::from_secs(5));
        tokio::time::sleep(step).await;
        notify(&[NotifyState::Watchdog]);
        let wall_elapsed = SystemTime::now().duration_since(wall).unwrap_or_default();
        if wall_elapsed > start.elapsed() + JUMP {
            tracing::info!("the wall clock jumped (resume from suspend?): polling now");
            return;
        }
    }
}

/// Answers every connection on the status socket with the live view as JSON.
fn serve_status(path: std::path::PathBuf, live: Arc<Mutex<Live>>) -> tokio::task::JoinHandle<()> {
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path);
    tokio::spawn(async move {
        let Ok(listener) = listener else {
            tracing::warn!("cannot open the status socket {}", path.display());
            return;
        };
        while let Ok((mut s, _)) = listener.accept().await {
            let body = live
                .lock()
                .map(|l| serde_json::to_vec(&*l).unwrap_or_default())
                .unwrap_or_default();
            use tokio::io::AsyncWriteExt;
            let _ = s.write_all(&body).await;
        }
    })
}
