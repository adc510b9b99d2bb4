//! systemd integration: `READY=1`, `STATUS=` lines, and `WATCHDOG=1` pings that stop when
//! the agent stops making progress (so systemd restarts a wedged agent, and recovery runs).
//! Outside systemd every call is a no-op.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Sends `states` to systemd, if it is listening.
pub fn notify(states: &[NotifyState]) {
    let _ = sd_notify::notify(false, states);
}

/// The main loop's promise to make progress: "the next step ends by then". The watchdog
/// pings only while the promise holds, so a hang beyond the agent's own timeouts stops the
/// pings and systemd restarts the agent.
#[derive(Debug, Clone)]
pub struct Progress(Arc<Mutex<Instant>>);

impl Default for Progress {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(
            Instant::now() + Duration::from_secs(300),
        )))
    }
}

impl Progress {
    /// Promises the current step ends within `d` (plus a minute of slack).
    pub fn within(&self, d: Duration) {
        if let Ok(mut until) = self.0.lock() {
            *until = Instant::now() + d + Duration::from_secs(60);
        }
    }

    /// Whether the last promise still holds.
    pub fn on_track(&self) -> bool {
        self.0.lock().is_ok_and(|u| Instant::now() <= *u)
    }
}

/// Starts pinging the watchdog at half its period while `progress` is on track, when
/// systemd asked for a watchdog (`WATCHDOG_USEC`).
pub fn spawn_watchdog(progress: Progress) -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let period = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
    Some(tokio::spawn(async move {
        loop {
            if progress.on_track() {
                notify(&[NotifyState::Watchdog]);
            } else {
                tracing::error!(
                    "no progress past the agent's own deadlines: letting the watchdog fire"
                );
            }
            tokio::time::sleep(period).await;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_on_track_until_its_promise_passes() {
        let p = Progress::default();
        assert!(p.on_track());
        if let Ok(mut u) = p.0.lock() {
            *u = Instant::now() - Duration::from_secs(1);
        }
        assert!(!p.on_track());
        p.within(Duration::from_secs(5));
        assert!(p.on_track());
    }
}
