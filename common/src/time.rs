//! Timestamps on the wire: RFC 3339 in UTC with whole seconds (`2026-11-22T12:00:00Z`).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in time, whole seconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The wall clock now.
    pub fn now() -> Self {
        Self::from(SystemTime::now())
    }

    /// From seconds since the epoch.
    pub fn from_unix(secs: u64) -> Self {
        Self(secs)
    }

    /// Seconds since the epoch.
    pub fn unix(self) -> u64 {
        self.0
    }

    /// This time plus `d` (saturating).
    pub fn plus(self, d: Duration) -> Self {
        Self(self.0.saturating_add(d.as_secs()))
    }

    /// Seconds from `earlier` to `self`, 0 when `earlier` is later.
    pub fn secs_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// As a `SystemTime`.
    pub fn to_system_time(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.0)
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Self(
            t.duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        )
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_rfc3339_seconds(self.to_system_time()).fmt(f)
    }
}

/// A timestamp that is not RFC 3339.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`{0}` is not an RFC 3339 timestamp like 2026-11-22T12:00:00Z")]
pub struct TimestampError(String);

impl FromStr for Timestamp {
    type Err = TimestampError;
    fn from_str(s: &str) -> Result<Self, TimestampError> {
        humantime::parse_rfc3339_weak(s)
            .map(Timestamp::from)
            .map_err(|_| TimestampError(s.chars().take(64).collect()))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a duration such as `30d`, `5min`, `90s` or `1h 30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration like 30s, 5min, 12h or 30d: {e}"))
}

/// Formats a duration for people: `3 days`, `5 minutes`, `12 seconds`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (n, unit) = match s {
        0..=119 => (s, "second"),
        120..=7199 => (s / 60, "minute"),
        7200..=172_799 => (s / 3600, "hour"),
        _ => (s / 86400, "day"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_rfc3339() {
        let t: Timestamp = "2026-11-22T12:00:00Z".parse().unwrap();
        assert_eq!(t.to_string(), "2026-11-22T12:00:00Z");
        assert_eq!(t.unix(), 1_795_348_800);
    }

    #[test]
    fn refuses_garbage() {
        assert!("yesterday".parse::<Timestamp>().is_err());
    }

    #[test]
    fn human_durations_pick_a_readable_unit() {
        assert_eq!(human_duration(Duration::from_secs(1)), "1 second");
        assert_eq!(human_duration(Duration::from_secs(300)), "5 minutes");
        assert_eq!(human_duration(Duration::from_secs(3 * 86400 + 5)), "3 days");
    }
}
