//! Nix's structured log (`--log-format internal-json`): each stderr line `@nix {…}` starts or
//! stops an activity (a build, a copy), gives a result of one (progress, a build log line), or
//! is a message. [`Decoder`] turns the lines into [`Event`]s for a progress display, and back
//! into the plain text an error keeps — with a failed build's last log lines, which the
//! structured form sends as separate results rather than inside the message.
//!
//! Activity and result numbers are Nix's own (`ActivityType`, `ResultType` in its logging
//! code), stable since Nix 2.4.

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value;

/// The prefix of a structured log line.
const PREFIX: &str = "@nix ";

/// Build log lines kept per build, as Nix's plain format shows on failure.
const LOG_LINES: usize = 10;

/// What an activity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// Copying one path (between stores).
    CopyPath,
    /// Copying a set of paths (its progress counts paths).
    CopyPaths,
    /// A download.
    FileTransfer,
    /// All builds of the call (its progress counts builds).
    Builds,
    /// Building one derivation.
    Build,
    /// Substituting one path.
    Substitute,
    /// Anything else.
    Other(u64),
}

impl Activity {
    fn from_code(code: u64) -> Self {
        match code {
            100 => Activity::CopyPath,
            101 => Activity::FileTransfer,
            103 => Activity::CopyPaths,
            104 => Activity::Builds,
            105 => Activity::Build,
            108 => Activity::Substitute,
            c => Activity::Other(c),
        }
    }
}

/// One decoded line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An activity began; `path` is the store path it is about (a build's derivation, a
    /// copied path), when Nix names one.
    Start {
        /// Nix's id for it.
        id: u64,
        /// What it is.
        activity: Activity,
        /// Nix's description (`building '/nix/store/…drv'`).
        text: String,
        /// The store path it is about.
        path: Option<String>,
    },
    /// An activity ended.
    Stop {
        /// Its id.
        id: u64,
    },
    /// Progress of an activity: counts for `Builds`/`CopyPaths`, bytes for a copy or download.
    Progress {
        /// Its id.
        id: u64,
        /// Done so far.
        done: u64,
        /// Expected in all.
        expected: u64,
        /// Running now.
        running: u64,
        /// Failed.
        failed: u64,
    },
    /// A line a builder printed.
    LogLine {
        /// The build's id.
        id: u64,
        /// The line.
        line: String,
    },
    /// A message (warnings, errors), as plain text.
    Message(String),
}

/// What one stderr line comes to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    /// For a progress display.
    pub event: Option<Event>,
    /// Plain lines for the error's tail (messages; a failed build's with its log lines).
    pub text: Vec<String>,
}

/// Decodes one call's stderr, line by line, remembering each build's last log lines.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Build activity id → its derivation.
    builds: BTreeMap<u64, String>,
    /// Build activity id → its last log lines.
    lines: BTreeMap<u64, VecDeque<String>>,
}

impl Decoder {
    /// A decoder for one call.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes one stderr line; a line that is not structured is plain text.
    pub fn line(&mut self, raw: &str) -> Decoded {
        let Some(json) = raw.strip_prefix(PREFIX) else {
            return Decoded {
                event: None,
                text: vec![raw.to_owned()],
            };
        };
        let Ok(v) = serde_json::from_str::<Value>(json) else {
            return Decoded {
                event: None,
                text: vec![raw.to_owned()],
            };
        };
        let id = v["id"].as_u64().unwrap_or(0);
        let fields = v["fields"].as_array().cloned().unwrap_or_default();
        let num = |i: usize| fields.get(i).and_then(Value::as_u64).unwrap_or(0);
        let event = match v["action"].as_str() {
            Some("start") => {
                let activity = Activity::from_code(v["type"].as_u64().unwrap_or(0));
                let path = fields
                    .first()
                    .and_then(Value::as_str)
                    .filter(|p| p.starts_with('/'))
                    .map(str::to_owned);
                if let (Activity::Build, Some(drv)) = (activity, &path) {
                    self.builds.insert(id, drv.clone());
                }
                Event::Start {
                    id,
                    activity,
                    text: plain(v["text"].as_str().unwrap_or("")),
                    path,
                }
            }
            Some("stop") => Event::Stop { id },
            Some("result") => match v["type"].as_u64() {
                Some(101) => {
                    let line = plain(fields.first().and_then(Value::as_str).unwrap_or(""));
                    let kept = self.lines.entry(id).or_default();
                    if kept.len() == LOG_LINES {
                        kept.pop_front();
                    }
                    kept.push_back(line.clone());
                    Event::LogLine { id, line }
                }
                Some(105) => Event::Progress {
                    id,
                    done: num(0),
                    expected: num(1),
                    running: num(2),
                    failed: num(3),
                },
                _ => return Decoded::default(),
            },
            Some("msg") => {
                let msg = plain(v["msg"].as_str().unwrap_or(""));
                let text = self.with_build_log(&msg);
                return Decoded {
                    event: Some(Event::Message(msg)),
                    text,
                };
            }
            _ => return Decoded::default(),
        };
        Decoded {
            event: Some(event),
            text: vec![],
        }
    }

    /// `msg` as lines, and when it says a build failed, that build's last log lines the way
    /// Nix's plain format shows them.
    fn with_build_log(&self, msg: &str) -> Vec<String> {
        let mut text: Vec<String> = msg.lines().map(str::to_owned).collect();
        let failed = self
            .builds
            .iter()
            .find(|(_, drv)| msg.contains(&format!("builder for '{drv}' failed")));
        if let Some((id, _)) = failed {
            if let Some(lines) = self.lines.get(id).filter(|l| !l.is_empty()) {
                if let Some(first) = text.first_mut() {
                    first.push(';');
                }
                text.push(format!("       last {} log lines:", lines.len()));
                text.extend(lines.iter().map(|l| format!("       > {l}")));
            }
        }
        text
    }
}

/// `s` without terminal colour codes (`ESC [ … m`), which Nix puts in messages.
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUILD_FAILURE: &str =
        include_str!("../../tests/fixtures/nix-2.8/log-internal-json-build-failure.txt");
    const COPY: &str = include_str!("../../tests/fixtures/nix-2.8/log-internal-json-copy.txt");

    fn decode(s: &str) -> (Vec<Event>, Vec<String>) {
        let mut d = Decoder::new();
        let (mut events, mut text) = (Vec::new(), Vec::new());
        for l in s.lines() {
            let out = d.line(l);
            events.extend(out.event);
            text.extend(out.text);
        }
        (events, text)
    }

    #[test]
    fn a_failed_build_reads_as_nix_plain_error_with_its_last_log_lines() {
        let (_, text) = decode(BUILD_FAILURE);
        let text = text.join("\n");
        assert!(
            text.starts_with("error: builder for '/nix/store/")
                && text.contains("-roost-log-broken-1796197889.drv' failed with exit code 1;"),
            "{text}"
        );
        assert!(text.contains("       last 3 log lines:\n       > step one\n       > step two\n       > roost-test: fails on purpose"), "{text}");
        assert!(!text.contains('\u{1b}'), "no colour codes: {text:?}");
        assert!(
            !text.contains("compiling ok"),
            "only the failed build's lines"
        );
    }

    #[test]
    fn builds_are_counted_from_the_builds_activity() {
        let (events, _) = decode(BUILD_FAILURE);
        let builds = events
            .iter()
            .find_map(|e| match e {
                Event::Start {
                    id,
                    activity: Activity::Builds,
                    ..
                } => Some(*id),
                _ => None,
            })
            .unwrap();
        let last = events
            .iter()
            .rev()
            .find_map(|e| match e {
                Event::Progress {
                    id,
                    done,
                    expected,
                    failed,
                    ..
                } if *id == builds => Some((*done, *expected, *failed)),
                _ => None,
            })
            .unwrap();
        assert_eq!(
            last,
            (1, 1, 1),
            "one built, one failed (done, expected, failed)"
        );
        let started: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::Start {
                    activity: Activity::Build,
                    path: Some(p),
                    ..
                } => Some(p.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(started.len(), 2);
        assert!(started.iter().all(|p| p.ends_with(".drv")));
    }

    #[test]
    fn copies_name_each_path() {
        let (events, text) = decode(COPY);
        let copied = events
            .iter()
            .filter(|e| {
                matches!(
                    e,
                    Event::Start {
                        activity: Activity::CopyPath,
                        path: Some(_),
                        ..
                    }
                )
            })
            .count();
        assert_eq!(copied, 2);
        assert!(text.is_empty(), "{text:?}");
    }

    #[test]
    fn a_plain_line_stays_as_it_is() {
        let mut d = Decoder::new();
        assert_eq!(
            d.line("warning: something"),
            Decoded {
                event: None,
                text: vec!["warning: something".into()]
            }
        );
    }
}
