//! The laptop gate (docs/protocol.md §7.13): one decision, before a download and before a
//! switch, on whether a deploy waits — for power or an unmetered network (before the
//! download), for the user's `defer` or an apply window (after it: a closure is fetched
//! ahead and applied when the window opens).

use std::time::{Duration, SystemTime};

use jiff::tz::TimeZone;
use roost_common::Timestamp;

use crate::power::{PowerPolicy, PowerState};
use crate::schedule::{self, Schedule};
use roost_common::size::human_bytes;

/// Why a deploy waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// Outside every apply window.
    Window {
        /// The windows, as configured.
        windows: String,
        /// When the next one opens (none: they never overlap).
        opens_at: Option<Timestamp>,
    },
    /// On battery (below the charge, or at all).
    Power(String),
    /// A download too large for a metered connection.
    Metered {
        /// Bytes the closures need.
        download: u64,
        /// The most a metered connection may fetch.
        max: u64,
    },
    /// The user postponed it (`roost-agent defer`).
    Deferred {
        /// Until then.
        until: Timestamp,
    },
}

/// A compact duration: `3h12m`, `45m`, `20s`, `2d4h`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (days, h, m) = (s / 86_400, s / 3600 % 24, s / 60 % 60);
    match (days, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, m) => format!("{h}h{m:02}m"),
        (d, h, _) => format!("{d}d{h}h"),
    }
}

/// What kind of wait, as reports (`error.phase`), `state.json` and metrics name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WaitKind {
    /// An apply window.
    Window,
    /// Power.
    Power,
    /// A metered network.
    Metered,
    /// The user's deferral.
    Defer,
}

impl WaitKind {
    /// Its name: `window`, `power`, `metered`, `defer`.
    pub fn as_str(self) -> &'static str {
        match self {
            WaitKind::Window => "window",
            WaitKind::Power => "power",
            WaitKind::Metered => "metered",
            WaitKind::Defer => "defer",
        }
    }
}

impl Wait {
    /// The reason's kind.
    pub fn kind(&self) -> WaitKind {
        match self {
            Wait::Window { .. } => WaitKind::Window,
            Wait::Power(_) => WaitKind::Power,
            Wait::Metered { .. } => WaitKind::Metered,
            Wait::Deferred { .. } => WaitKind::Defer,
        }
    }

    /// When the wait ends by itself, when known.
    pub fn until(&self) -> Option<Timestamp> {
        match self {
            Wait::Window { opens_at, .. } => *opens_at,
            Wait::Deferred { until } => Some(*until),
            Wait::Power(_) | Wait::Metered { .. } => None,
        }
    }

    /// For people, without the time left: `waiting for window Mon-Fri 12:00-13:00`.
    pub fn summary(&self) -> String {
        match self {
            Wait::Window {
                windows,
                opens_at: Some(_),
            } => format!("waiting for window {windows}"),
            Wait::Window {
                windows,
                opens_at: None,
            } => format!("waiting for window {windows} (the windows never overlap)"),
            Wait::Power(why) => format!("waiting for power: {why}"),
            Wait::Metered { download, max } => format!(
                "waiting for an unmetered network: the download needs up to {} and a metered \
                 connection may fetch {}",
                human_bytes(*download),
                human_bytes(*max)
            ),
            Wait::Deferred { until } => format!("deferred by the user until {until}"),
        }
    }

    /// For people, at `now`: `waiting for window Mon-Fri 12:00-13:00 (opens in 3h12m)`.
    pub fn describe(&self, now: Timestamp) -> String {
        with_time_left(self.kind(), &self.summary(), self.until(), now)
    }
}

/// A wait's summary with the time left at `now`: `… (opens in 3h12m)` for a window, `… (in
/// 4h00m)` for a deferral.
pub fn with_time_left(
    kind: WaitKind,
    summary: &str,
    until: Option<Timestamp>,
    now: Timestamp,
) -> String {
    let left = |t: Timestamp| short_duration(Duration::from_secs(t.secs_since(now)));
    match (kind, until) {
        (WaitKind::Window, Some(t)) => format!("{summary} (opens in {})", left(t)),
        (WaitKind::Defer, Some(t)) => format!("{summary} (in {})", left(t)),
        _ => summary.to_owned(),
    }
}

/// Before a download: power, then the network.
pub fn before_download(
    power: PowerState,
    policy: PowerPolicy,
    metered: bool,
    download: u64,
    metered_max: u64,
) -> Option<Wait> {
    if let Some(why) = policy.why_wait(power) {
        return Some(Wait::Power(why));
    }
    (metered && download > metered_max).then_some(Wait::Metered {
        download,
        max: metered_max,
    })
}

/// Before the switch: the user's deferral, then the windows (every schedule must be open).
pub fn before_apply(
    now: SystemTime,
    tz: &TimeZone,
    schedules: &[Schedule],
    deferred_until: Option<Timestamp>,
) -> Option<Wait> {
    let stamp = Timestamp::from(now);
    if let Some(until) = deferred_until.filter(|u| *u > stamp) {
        return Some(Wait::Deferred { until });
    }
    let t = schedule::zoned(now, tz);
    if schedule::all_open(schedules, &t) {
        return None;
    }
    let opens_at = schedule::next_common_opening(schedules, &t)
        .map(|z| Timestamp::from_unix(z.timestamp().as_second().max(0) as u64));
    let windows = schedules
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(" and ");
    Some(Wait::Window { windows, opens_at })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> SystemTime {
        s.parse::<Timestamp>().unwrap().to_system_time()
    }

    #[test]
    fn outside_a_window_the_reason_says_when_it_opens() {
        let s = [Schedule::parse(&["Mon-Fri 12:00-13:00"]).unwrap()];
        let now = utc("2026-12-07T08:48:00Z");
        let w = before_apply(now, &TimeZone::UTC, &s, None).unwrap();
        assert_eq!(w.kind(), WaitKind::Window);
        assert_eq!(w.until(), Some("2026-12-07T12:00:00Z".parse().unwrap()));
        assert_eq!(
            w.describe(Timestamp::from(now)),
            "waiting for window Mon-Fri 12:00-13:00 (opens in 3h12m)"
        );
        assert_eq!(
            before_apply(utc("2026-12-07T12:10:00Z"), &TimeZone::UTC, &s, None),
            None
        );
    }

    #[test]
    fn windows_are_in_the_nodes_time_zone() {
        let s = [Schedule::parse(&["Mon 12:00-13:00"]).unwrap()];
        let berlin = TimeZone::get("Europe/Berlin").unwrap();
        // 11:30 UTC is 12:30 in Berlin in December.
        assert_eq!(
            before_apply(utc("2026-12-07T11:30:00Z"), &berlin, &s, None),
            None
        );
        assert!(before_apply(utc("2026-12-07T11:30:00Z"), &TimeZone::UTC, &s, None).is_some());
    }

    #[test]
    fn a_deferral_wins_over_an_open_window_until_it_ends() {
        let now = utc("2026-12-07T12:00:00Z");
        let until = Timestamp::from(now).plus(Duration::from_secs(4 * 3600));
        let w = before_apply(now, &TimeZone::UTC, &[], Some(until)).unwrap();
        assert_eq!(w.kind(), WaitKind::Defer);
        assert!(w.describe(Timestamp::from(now)).contains("(in 4h00m)"));
        let later = until.to_system_time();
        assert_eq!(before_apply(later, &TimeZone::UTC, &[], Some(until)), None);
    }

    #[test]
    fn power_comes_before_the_network_and_small_downloads_pass_a_metered_one() {
        let low = PowerState {
            on_battery: true,
            charge: Some(10),
        };
        let p = PowerPolicy::default();
        assert_eq!(
            before_download(low, p, true, 1 << 30, 1 << 20).map(|w| w.kind()),
            Some(WaitKind::Power)
        );
        let mains = PowerState::MAINS;
        let w = before_download(mains, p, true, 1 << 30, 100 << 20).unwrap();
        assert!(w.describe(Timestamp::now()).contains("1.0 GiB"), "{w:?}");
        assert_eq!(before_download(mains, p, true, 1 << 20, 100 << 20), None);
        assert_eq!(before_download(mains, p, false, 1 << 30, 0), None);
    }

    #[test]
    fn short_durations_read_like_a_clock() {
        assert_eq!(short_duration(Duration::from_secs(11_520)), "3h12m");
        assert_eq!(short_duration(Duration::from_secs(45 * 60)), "45m");
        assert_eq!(short_duration(Duration::from_secs(20)), "20s");
        assert_eq!(
            short_duration(Duration::from_secs(2 * 86_400 + 4 * 3600)),
            "2d4h"
        );
    }
}
