//! Apply windows (docs/protocol.md §4.1, §7.13): when a node may switch, in its own local
//! time.
//! A window is `[DAYS] HH:MM-HH:MM`: `Mon-Fri 12:00-13:00`, `Sat,Sun 00:00-24:00`,
//! `22:00-06:00` (every day, across midnight). An empty schedule is always open.

use std::fmt;
use std::str::FromStr;

use jiff::civil::{Date, Weekday};
use jiff::tz::TimeZone;
use jiff::{Span, Zoned};

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// One window: the days it starts on and its start and end, in minutes after midnight. An
/// end at or before the start runs into the next day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    days: [bool; 7],
    start: u16,
    end: u16,
    text: String,
}

/// Why a window does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("apply window `{text}`: {why} (expected e.g. `Mon-Fri 12:00-13:00` or `22:00-06:00`)")]
pub struct WindowError {
    text: String,
    why: String,
}

fn day_index(s: &str) -> Option<usize> {
    DAY_NAMES
        .iter()
        .position(|d| d.eq_ignore_ascii_case(s.get(..3).unwrap_or(s)) && s.len() >= 3)
        .filter(|_| {
            // "Monday", "mon" and "Mon" are fine; "Monxyz" is not.
            let full = [
                "monday",
                "tuesday",
                "wednesday",
                "thursday",
                "friday",
                "saturday",
                "sunday",
            ];
            s.len() == 3 || full.iter().any(|f| f.eq_ignore_ascii_case(s))
        })
}

fn minutes(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    match (h, m) {
        (24, 0) => Some(24 * 60),
        (0..=23, 0..=59) => Some(h * 60 + m),
        _ => None,
    }
}

impl FromStr for Window {
    type Err = WindowError;

    fn from_str(text: &str) -> Result<Self, WindowError> {
        let bad = |why: &str| WindowError {
            text: text.to_owned(),
            why: why.to_owned(),
        };
        let parts: Vec<&str> = text.split_whitespace().collect();
        let (days_part, times) = match parts.as_slice() {
            [t] => (None, *t),
            [d, t] => (Some(*d), *t),
            _ => return Err(bad("want days and a time range")),
        };
        let mut days = [days_part.is_none(); 7];
        for item in days_part.into_iter().flat_map(|d| d.split(',')) {
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            let (a, b) = match (day_index(a), day_index(b)) {
                (Some(a), Some(b)) => (a, b),
                _ => {
                    return Err(bad(&format!(
                        "`{item}` is not a day or day range like Mon-Fri"
                    )));
                }
            };
            let mut i = a;
            loop {
                days[i] = true;
                if i == b {
                    break;
                }
                i = (i + 1) % 7;
            }
        }
        let (s, e) = times
            .split_once('-')
            .ok_or_else(|| bad("the time range needs a `-`"))?;
        let start = minutes(s)
            .filter(|m| *m < 24 * 60)
            .ok_or_else(|| bad(&format!("`{s}` is not a time HH:MM")))?;
        let end = minutes(e).ok_or_else(|| bad(&format!("`{e}` is not a time HH:MM")))?;
        Ok(Window {
            days,
            start,
            end,
            text: text.to_owned(),
        })
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl serde::Serialize for Window {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> serde::Deserialize<'de> for Window {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn weekday_index(w: Weekday) -> usize {
    w.to_monday_zero_offset() as usize
}

impl Window {
    fn crosses_midnight(&self) -> bool {
        self.end <= self.start
    }

    /// Whether `t` (local time) is inside this window.
    fn contains(&self, t: &Zoned) -> bool {
        let now = t.hour() as u16 * 60 + t.minute() as u16;
        let today = weekday_index(t.weekday());
        let yesterday = (today + 6) % 7;
        if self.crosses_midnight() {
            (self.days[today] && now >= self.start) || (self.days[yesterday] && now < self.end)
        } else {
            self.days[today] && now >= self.start && now < self.end
        }
    }

    /// This window's start on `date` in `tz`, when it starts that day.
    fn start_on(&self, date: Date, tz: &TimeZone) -> Option<Zoned> {
        if !self.days[weekday_index(date.weekday())] {
            return None;
        }
        let at = date.at((self.start / 60) as i8, (self.start % 60) as i8, 0, 0);
        at.to_zoned(tz.clone()).ok()
    }
}

/// Every window of a node; empty means "any time".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    windows: Vec<Window>,
}

impl Schedule {
    /// A schedule of these windows.
    pub fn new(windows: Vec<Window>) -> Self {
        Self { windows }
    }

    /// Parses each window.
    pub fn parse<S: AsRef<str>>(windows: &[S]) -> Result<Self, WindowError> {
        windows
            .iter()
            .map(|w| w.as_ref().parse())
            .collect::<Result<Vec<_>, _>>()
            .map(Self::new)
    }

    /// The windows.
    pub fn windows(&self) -> &[Window] {
        &self.windows
    }

    /// Whether there is no restriction.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Whether a deploy may happen at `t`.
    pub fn is_open(&self, t: &Zoned) -> bool {
        self.windows.is_empty() || self.windows.iter().any(|w| w.contains(t))
    }

    /// When the next window opens after `t` (none when one is open now, or none is ever
    /// open), with the window that opens.
    pub fn next_opening(&self, t: &Zoned) -> Option<(Zoned, &Window)> {
        if self.is_open(t) {
            return None;
        }
        let tz = t.time_zone();
        let mut best: Option<(Zoned, &Window)> = None;
        for offset in 0..=7 {
            let Ok(date) = t.date().checked_add(Span::new().days(offset)) else {
                continue;
            };
            for w in &self.windows {
                let Some(s) = w.start_on(date, tz).filter(|s| s > t) else {
                    continue;
                };
                if best.as_ref().is_none_or(|(b, _)| s < *b) {
                    best = Some((s, w));
                }
            }
        }
        best
    }
}

/// Whether every schedule is open at `t`.
pub fn all_open(schedules: &[Schedule], t: &Zoned) -> bool {
    schedules.iter().all(|s| s.is_open(t))
}

/// The first moment after `t` when every schedule is open at once (none when they are open
/// now, or do not overlap within a week). Such a moment is always some window's start.
pub fn next_common_opening(schedules: &[Schedule], t: &Zoned) -> Option<Zoned> {
    if all_open(schedules, t) {
        return None;
    }
    let tz = t.time_zone();
    let mut starts: Vec<Zoned> = Vec::new();
    for offset in 0..=7 {
        let Ok(date) = t.date().checked_add(Span::new().days(offset)) else {
            continue;
        };
        for w in schedules.iter().flat_map(|s| s.windows()) {
            starts.extend(w.start_on(date, tz).filter(|s| s > t));
        }
    }
    starts.sort();
    starts.into_iter().find(|s| all_open(schedules, s))
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.windows.iter().map(|w| w.text.as_str()).collect();
        f.write_str(&names.join(", "))
    }
}

/// The node's local time zone (`TZ`, else `/etc/localtime`, else UTC).
pub fn local_zone() -> TimeZone {
    TimeZone::try_system().unwrap_or(TimeZone::UTC)
}

/// A `SystemTime` in `tz`.
pub fn zoned(t: std::time::SystemTime, tz: &TimeZone) -> Zoned {
    let ts = jiff::Timestamp::try_from(t).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    ts.to_zoned(tz.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Zoned {
        // 2026-12-07 is a Monday.
        format!("{s}[Europe/Berlin]").parse().unwrap()
    }

    fn sched(w: &[&str]) -> Schedule {
        Schedule::parse(w).unwrap()
    }

    #[test]
    fn a_weekday_lunch_window_is_open_only_then() {
        let s = sched(&["Mon-Fri 12:00-13:00"]);
        assert!(s.is_open(&at("2026-12-07T12:00:00")));
        assert!(s.is_open(&at("2026-12-11T12:59:59")));
        assert!(
            !s.is_open(&at("2026-12-07T13:00:00")),
            "the end is exclusive"
        );
        assert!(!s.is_open(&at("2026-12-07T11:59:59")));
        assert!(!s.is_open(&at("2026-12-12T12:30:00")), "Saturday");
    }

    #[test]
    fn an_empty_schedule_is_always_open() {
        let s = Schedule::default();
        assert!(s.is_open(&at("2026-12-12T03:00:00")));
        assert_eq!(s.next_opening(&at("2026-12-12T03:00:00")), None);
    }

    #[test]
    fn a_window_across_midnight_belongs_to_the_day_it_starts() {
        let s = sched(&["Fri 22:00-06:00"]);
        assert!(s.is_open(&at("2026-12-11T23:00:00")), "Friday night");
        assert!(s.is_open(&at("2026-12-12T05:59:00")), "Saturday morning");
        assert!(!s.is_open(&at("2026-12-12T22:30:00")), "Saturday night");
        assert!(!s.is_open(&at("2026-12-11T05:00:00")), "Friday morning");
    }

    #[test]
    fn the_next_opening_is_the_earliest_start_of_any_window() {
        let s = sched(&["Mon-Fri 12:00-13:00", "Sat 00:00-24:00"]);
        let (t, w) = s.next_opening(&at("2026-12-07T08:48:00")).unwrap();
        assert_eq!(t, at("2026-12-07T12:00:00"));
        assert_eq!(w.to_string(), "Mon-Fri 12:00-13:00");
        let (t, _) = s.next_opening(&at("2026-12-11T13:30:00")).unwrap();
        assert_eq!(t, at("2026-12-12T00:00:00"), "Friday afternoon: Saturday");
        let (t, _) = s.next_opening(&at("2026-12-13T10:00:00")).unwrap();
        assert_eq!(t, at("2026-12-14T12:00:00"), "Sunday: Monday lunch");
    }

    #[test]
    fn openings_follow_local_time_across_a_dst_change() {
        // Europe/Berlin leaves summer time on 2026-10-25 at 03:00.
        let s = sched(&["Sun 12:00-13:00"]);
        let (t, _) = s.next_opening(&at("2026-10-24T12:30:00")).unwrap();
        assert_eq!(t, at("2026-10-25T12:00:00"));
        let hours = (t.timestamp().as_second() - at("2026-10-24T12:30:00").timestamp().as_second())
            as f64
            / 3600.0;
        assert_eq!(hours, 24.5, "one extra hour on the day summer time ends");
    }

    #[test]
    fn day_lists_ranges_that_wrap_and_full_names_parse() {
        let s = sched(&["Fri-Mon 09:00-10:00"]);
        for (d, open) in [
            ("2026-12-11", true),
            ("2026-12-12", true),
            ("2026-12-13", true),
            ("2026-12-14", true),
            ("2026-12-15", false),
        ] {
            assert_eq!(s.is_open(&at(&format!("{d}T09:30:00"))), open, "{d}");
        }
        let s = sched(&["monday,Wed 09:00-10:00"]);
        assert!(s.is_open(&at("2026-12-09T09:30:00")));
        assert!(!s.is_open(&at("2026-12-08T09:30:00")));
    }

    #[test]
    fn bad_windows_are_refused_naming_the_part() {
        for (w, want) in [
            ("Mon-Fri", "not a time"),
            ("Mon-Fry 12:00-13:00", "Mon-Fry"),
            ("Mon 25:00-26:00", "25:00"),
            ("Mon 12:00", "`-`"),
            ("Mon 12:00-13:00 extra", "want days"),
            ("Mon 24:00-01:00", "24:00"),
        ] {
            let e = w.parse::<Window>().unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(w), "{w}: {e}");
        }
    }

    #[test]
    fn several_schedules_open_together_only_where_they_overlap() {
        let a = sched(&["Mon-Fri 12:00-14:00"]);
        let b = sched(&["Wed 13:00-18:00"]);
        let both = [a, b];
        assert!(!all_open(&both, &at("2026-12-07T12:30:00")));
        assert!(all_open(&both, &at("2026-12-09T13:30:00")));
        assert_eq!(
            next_common_opening(&both, &at("2026-12-07T12:30:00")),
            Some(at("2026-12-09T13:00:00"))
        );
        assert_eq!(next_common_opening(&both, &at("2026-12-09T13:30:00")), None);
        let never = [sched(&["Mon 01:00-02:00"]), sched(&["Tue 01:00-02:00"])];
        assert_eq!(
            next_common_opening(&never, &at("2026-12-07T12:30:00")),
            None
        );
    }
}
