//! Polling (docs/protocol.md §7.3): conditional GETs with the stored ETag against the coordinators in
//! order, long-polls where the coordinator offers them, ±20 % jitter, exponential backoff to
//! an hour, and waking early when the wall clock jumps (resume from suspend).
//!
//! A sleep between polls is one timer: the kernel says when the wall clock is set or the
//! machine resumes ([`ClockWatch`]), so an idle node does not wake every few seconds to look.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use reqwest::header::{ETAG, IF_NONE_MATCH};
use roost_common::NodeName;
use roost_common::wire::v1::http::{self as v1, LONG_POLL_HEADER, MAX_MANIFEST_BYTES, MAX_WAIT_S};
use tokio::time::Instant;

/// Backoff never grows past this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// A wall clock running this much ahead of the monotonic one means the machine slept.
pub const CLOCK_JUMP: Duration = Duration::from_secs(30);
/// How often a clock without a kernel notification is looked at during a sleep.
pub const CLOCK_STEP: Duration = Duration::from_secs(5);

/// The wall clock, a parameter so tests can jump it.
pub trait WallClock: Send + Sync + fmt::Debug {
    /// Now.
    fn now(&self) -> SystemTime;

    /// What tells a sleeper that this clock may have jumped. By default it is looked at
    /// every [`CLOCK_STEP`].
    fn watch(&self) -> Box<dyn ClockWatch> {
        Box::new(Stepping(CLOCK_STEP))
    }
}

/// Wakes a sleeper when the wall clock may have jumped; [`sleep_watching_clock`] then compares
/// the clocks to tell a jump from noise.
pub trait ClockWatch: Send + fmt::Debug {
    /// Resolves at the next moment the wall clock may have jumped.
    fn changed(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// A watch that looks every so often: for clocks the kernel does not watch (tests, or a
/// kernel without timerfd).
#[derive(Debug, Clone, Copy)]
pub struct Stepping(pub Duration);

impl ClockWatch for Stepping {
    fn changed(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(tokio::time::sleep(self.0))
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn watch(&self) -> Box<dyn ClockWatch> {
        match KernelClockWatch::new() {
            Ok(w) => Box::new(w),
            Err(e) => {
                tracing::warn!(
                    "no timerfd clock notification ({e}): looking at the clock every {} s instead",
                    CLOCK_STEP.as_secs()
                );
                Box::new(Stepping(CLOCK_STEP))
            }
        }
    }
}

/// A `CLOCK_REALTIME` timerfd armed far in the future with `TFD_TIMER_CANCEL_ON_SET`: the
/// kernel cancels it (the read fails with `ECANCELED`) whenever the wall clock is set and
/// when the machine resumes from suspend, and at no other time. Re-armed after each.
#[derive(Debug)]
pub struct KernelClockWatch {
    fd: tokio::io::unix::AsyncFd<Timer>,
}

/// The timerfd, owned: only its `AsyncFd` can close it.
#[derive(Debug)]
struct Timer(nix::sys::timerfd::TimerFd);

impl std::os::fd::AsRawFd for Timer {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl KernelClockWatch {
    /// Opens and arms the timer; needs a tokio runtime with I/O enabled.
    pub fn new() -> std::io::Result<Self> {
        use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags};
        let fd = TimerFd::new(
            ClockId::CLOCK_REALTIME,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        arm(&fd)?;
        // Deprecated because a borrowed descriptor could be closed while registered; this one
        // is owned by the AsyncFd for its whole life.
        #[allow(deprecated)]
        let fd = tokio::io::unix::AsyncFd::with_interest(Timer(fd), tokio::io::Interest::READABLE)?;
        Ok(Self { fd })
    }
}

fn arm(fd: &nix::sys::timerfd::TimerFd) -> nix::Result<()> {
    use nix::sys::time::TimeSpec;
    use nix::sys::timerfd::{Expiration, TimerSetTimeFlags};
    // Far enough never to expire (year 2242), near enough for every time_t.
    let never = TimeSpec::new(i64::from(i32::MAX) * 4, 0);
    fd.set(
        Expiration::OneShot(never),
        TimerSetTimeFlags::TFD_TIMER_ABSTIME | TimerSetTimeFlags::TFD_TIMER_CANCEL_ON_SET,
    )
}

impl ClockWatch for KernelClockWatch {
    fn changed(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            loop {
                let Ok(mut ready) = self.fd.readable().await else {
                    return std::future::pending().await;
                };
                // `wait` reads the timer: Ok once cancelled by a clock change (or, never, at
                // expiry), EAGAIN while it is armed.
                match ready.try_io(|fd| fd.get_ref().0.wait().map_err(std::io::Error::from)) {
                    Ok(Ok(())) => {
                        if let Err(e) = arm(&self.fd.get_ref().0) {
                            tracing::warn!("cannot re-arm the clock watch: {e}");
                        }
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("clock watch: {e}");
                        return std::future::pending().await;
                    }
                    Err(_would_block) => continue,
                }
            }
        })
    }
}

/// The clock the binary runs with: the system's, or, in debug builds only, one that starts
/// at `ROOST_TEST_CLOCK` (an RFC 3339 time) and runs at the real rate from there, so tests
/// can put a node just before an apply window opens.
pub fn process_clock() -> std::sync::Arc<dyn WallClock> {
    #[cfg(debug_assertions)]
    if let Some(start) = std::env::var("ROOST_TEST_CLOCK")
        .ok()
        .and_then(|s| s.parse::<roost_common::Timestamp>().ok())
    {
        return std::sync::Arc::new(ShiftedClock::starting_at(start.to_system_time()));
    }
    std::sync::Arc::new(SystemClock)
}

/// The system's wall clock shifted by an offset that can change while it runs: tests jump
/// it forward and back (a manifest refused as expired, accepted again once the clock is
/// right); debug builds start one at `ROOST_TEST_CLOCK`.
#[derive(Debug, Default)]
pub struct ShiftedClock {
    offset_s: std::sync::atomic::AtomicI64,
}

impl ShiftedClock {
    /// The system clock moved by `offset_s` seconds (negative: back).
    pub fn new(offset_s: i64) -> Self {
        Self {
            offset_s: offset_s.into(),
        }
    }

    /// A clock that reads `start` now and runs on at the real rate.
    pub fn starting_at(start: SystemTime) -> Self {
        let now = SystemTime::now();
        let offset = match start.duration_since(now) {
            Ok(ahead) => ahead.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        };
        Self::new(offset)
    }

    /// Moves it by `by_s` seconds more.
    pub fn shift(&self, by_s: i64) {
        self.offset_s
            .fetch_add(by_s, std::sync::atomic::Ordering::SeqCst);
    }
}

impl WallClock for ShiftedClock {
    fn now(&self) -> SystemTime {
        let off = self.offset_s.load(std::sync::atomic::Ordering::SeqCst);
        let by = Duration::from_secs(off.unsigned_abs());
        if off >= 0 {
            SystemTime::now() + by
        } else {
            SystemTime::now() - by
        }
    }
}

/// What a poll brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Poll {
    /// 304: nothing new.
    NotModified,
    /// A manifest envelope and its ETag.
    New(Vec<u8>, Option<String>),
    /// The coordinator has no manifest for this node.
    NoManifest,
    /// No coordinator could be reached (or none answered usefully).
    Unreachable(String),
}

impl Poll {
    /// A short description for status and logs.
    pub fn describe(&self) -> String {
        match self {
            Poll::NotModified => "not modified".into(),
            Poll::New(..) => "new manifest".into(),
            Poll::NoManifest => "no manifest published for this node".into(),
            Poll::Unreachable(e) => format!("failed: {e}"),
        }
    }
}

/// The HTTP side of polling: one keep-alive client, the coordinators in order.
#[derive(Debug, Clone)]
pub struct Poller {
    http: reqwest::Client,
    coordinators: Vec<String>,
    node: NodeName,
    long_poll: bool,
    offered: bool,
}

impl Poller {
    /// A poller for `node` against `coordinators`; `long_poll` allows `?wait=`.
    pub fn new(
        http: reqwest::Client,
        coordinators: Vec<String>,
        node: NodeName,
        long_poll: bool,
    ) -> Self {
        Self {
            http,
            coordinators,
            node,
            long_poll,
            offered: false,
        }
    }

    /// Whether the last answer said the coordinator holds polls open.
    pub fn long_poll_offered(&self) -> bool {
        self.long_poll && self.offered
    }

    /// One conditional GET, trying each coordinator in order until one answers.
    /// `wait` (seconds) asks for a long-poll; it is only sent with an ETag to wait on.
    pub async fn poll(&mut self, etag: Option<&str>, wait: Option<u64>) -> Poll {
        if self.coordinators.is_empty() {
            return Poll::Unreachable("no coordinator configured".into());
        }
        let wait = wait
            .filter(|_| self.long_poll && etag.is_some())
            .map(|w| w.clamp(1, MAX_WAIT_S));
        let mut errors = Vec::new();
        for base in self.coordinators.clone() {
            let url = match wait {
                Some(w) => v1::long_poll_url(&base, &self.node, w),
                None => v1::manifest_url(&base, &self.node),
            };
            let mut req = self
                .http
                .get(&url)
                .timeout(Duration::from_secs(wait.unwrap_or(0) + 10));
            if let Some(e) = etag {
                req = req.header(IF_NONE_MATCH, e);
            }
            let r = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    errors.push(format!("{base}: {}", error_chain(&e)));
                    continue;
                }
            };
            self.offered = r.headers().contains_key(LONG_POLL_HEADER);
            match r.status().as_u16() {
                304 => return Poll::NotModified,
                404 => return Poll::NoManifest,
                200 => {
                    let etag = r
                        .headers()
                        .get(ETAG)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    if r.content_length()
                        .is_some_and(|n| n as usize > MAX_MANIFEST_BYTES)
                    {
                        errors.push(format!("{base}: manifest is over the size limit"));
                        continue;
                    }
                    match read_capped(r, MAX_MANIFEST_BYTES).await {
                        Ok(Some(b)) => return Poll::New(b, etag),
                        Ok(None) => errors.push(format!(
                            "{base}: manifest over the limit of {MAX_MANIFEST_BYTES} bytes"
                        )),
                        Err(e) => errors.push(format!("{base}: {}", error_chain(&e))),
                    }
                }
                s => errors.push(format!("{base}: HTTP {s}")),
            }
        }
        Poll::Unreachable(errors.join("; "))
    }

    /// Whether any coordinator answers HTTP at all (magic rollback's probe).
    pub async fn reachable(&self, etag: Option<&str>) -> bool {
        for base in &self.coordinators {
            let mut req = self
                .http
                .get(v1::manifest_url(base, &self.node))
                .timeout(Duration::from_secs(10));
            if let Some(e) = etag {
                req = req.header(IF_NONE_MATCH, e);
            }
            if req.send().await.is_ok() {
                return true;
            }
        }
        false
    }
}

/// Reads a body chunk by chunk and stops as soon as it passes `cap` bytes, whatever the
/// framing (a chunked body has no length to check first): `None` when it is over.
pub async fn read_capped(
    mut r: reqwest::Response,
    cap: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        if body.len() + chunk.len() > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// reqwest's errors hide the useful part (connection refused, timed out) in their sources.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

/// A value in `[d·0.8, d·1.2]`, so a fleet does not poll in lockstep.
pub fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No randomness: fall back on the clock's nanoseconds, still spread across nodes.
        let n = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        b[..4].copy_from_slice(&n.to_le_bytes());
    }
    let r = (u64::from_le_bytes(b) % 4001) as f64 / 10_000.0; // 0.0 ..= 0.4
    d.mul_f64(0.8 + r)
}

/// Delay after `failures` consecutive failed polls: 5 s, 10 s, 20 s … capped at 1 h.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(5)
        .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
        .min(MAX_BACKOFF)
}

/// Whether the wall clock moved further than the monotonic clock by more than
/// [`CLOCK_JUMP`]: the machine was suspended (the monotonic clock stops) or the time was set.
pub fn clock_jumped(monotonic: Duration, wall: Duration) -> bool {
    wall > monotonic + CLOCK_JUMP
}

/// How a sleep ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The whole delay passed.
    Elapsed,
    /// The wall clock jumped ahead: poll now.
    ClockJumped,
}

/// Sleeps `d`, waking early when the wall clock jumps ahead: one timer, plus `watch`, which
/// fires only when the clock may have changed.
pub async fn sleep_watching_clock(
    d: Duration,
    clock: &dyn WallClock,
    watch: &mut dyn ClockWatch,
) -> Wake {
    let start = Instant::now();
    let wall_start = clock.now();
    let until = start + d;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return Wake::Elapsed,
            _ = watch.changed() => {
                let wall = clock.now().duration_since(wall_start).unwrap_or_default();
                if clock_jumped(start.elapsed(), wall) {
                    return Wake::ClockJumped;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let d = Duration::from_secs(300);
        let mut seen_low = false;
        let mut seen_high = false;
        for _ in 0..2000 {
            let j = jitter(d);
            assert!(
                j >= Duration::from_secs(240) && j <= Duration::from_secs(360),
                "{j:?}"
            );
            seen_low |= j < Duration::from_secs(270);
            seen_high |= j > Duration::from_secs(330);
        }
        assert!(seen_low && seen_high, "jitter does not spread");
    }

    #[test]
    fn backoff_doubles_up_to_an_hour() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(5), Duration::from_secs(80));
        assert_eq!(backoff(11), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn a_wall_clock_far_ahead_of_the_monotonic_one_is_a_jump() {
        let s = Duration::from_secs;
        assert!(!clock_jumped(s(60), s(61)));
        assert!(
            !clock_jumped(s(60), s(30)),
            "a clock set back is not a resume"
        );
        assert!(clock_jumped(s(60), s(3600)));
    }

    #[derive(Debug)]
    struct JumpingClock {
        start: SystemTime,
        calls: Mutex<u32>,
    }

    impl WallClock for JumpingClock {
        fn now(&self) -> SystemTime {
            let mut c = self.calls.lock().unwrap();
            *c += 1;
            // The first reading is the start; from the third on, eight hours have passed.
            if *c >= 3 {
                self.start + Duration::from_secs(8 * 3600)
            } else {
                self.start
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_ends_early_when_the_wall_clock_jumps() {
        let clock = JumpingClock {
            start: SystemTime::now(),
            calls: Mutex::new(0),
        };
        let t = Instant::now();
        let wake = sleep_watching_clock(
            Duration::from_secs(3600),
            &clock,
            &mut Stepping(Duration::from_secs(5)),
        )
        .await;
        assert_eq!(wake, Wake::ClockJumped);
        assert_eq!(t.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_without_a_jump_lasts_its_whole_delay() {
        let t = Instant::now();
        let wake = sleep_watching_clock(
            Duration::from_secs(60),
            &SystemClock,
            &mut Stepping(Duration::from_secs(5)),
        )
        .await;
        assert_eq!(wake, Wake::Elapsed);
        assert_eq!(t.elapsed(), Duration::from_secs(60));
    }

    /// Counts how often a sleeper is woken.
    #[derive(Debug, Default)]
    struct CountingWatch(u32);

    impl ClockWatch for CountingWatch {
        fn changed(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
            Box::pin(async move {
                self.0 += 1;
                std::future::pending().await
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_clock_costs_a_sleep_no_wake_up() {
        let mut watch = CountingWatch::default();
        let wake = sleep_watching_clock(Duration::from_secs(300), &SystemClock, &mut watch).await;
        assert_eq!(wake, Wake::Elapsed);
        assert_eq!(
            watch.0, 1,
            "the watch was polled again: the sleeper woke up"
        );
    }

    #[tokio::test]
    async fn the_system_clock_is_watched_by_the_kernel_not_by_steps() {
        let watch = SystemClock.watch();
        assert!(
            format!("{watch:?}").starts_with("KernelClockWatch"),
            "{watch:?}"
        );
    }
}
