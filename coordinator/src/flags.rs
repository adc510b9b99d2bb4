//! Which node states need a human, and why: the one judgement behind `/v1/fleet`, `/metrics`,
//! the dashboard and `roost-coordinator status`. Pure: it is given the facts and the time, so
//! every rule is tested without a clock or a server.

use std::time::Duration;

use roost_common::Timestamp;
use roost_common::time::human_duration;
use serde::{Deserialize, Serialize};

/// Why a node is flagged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flag {
    /// A name that polls or reports here but has no manifest.
    Unknown,
    /// No report and no poll within the stale limit.
    Stale,
    /// The last deploy failed or rolled back, or a health check fails.
    Failed,
    /// The coordinator refuses its reports, or the node refused its manifest.
    Refused,
    /// In contact, but not converged to its desired version for longer than the stuck limit.
    Stuck,
    /// Its desired manifest has expired: the node refuses it.
    Expired,
    /// Its desired manifest expires within the expiring limit.
    Expiring,
    /// The reported version is below the desired one.
    Behind,
    /// The report key was pinned on first use.
    Tofu,
    /// The node's system is not fully in use until its next boot (§7.16).
    NeedsReboot,
}

impl Flag {
    /// Every flag, in the order they are shown.
    pub const ALL: [Flag; 10] = [
        Flag::Unknown,
        Flag::Stale,
        Flag::Failed,
        Flag::Refused,
        Flag::Stuck,
        Flag::Expired,
        Flag::Expiring,
        Flag::Behind,
        Flag::Tofu,
        Flag::NeedsReboot,
    ];

    /// The upper-case label of the table.
    pub fn label(self) -> &'static str {
        match self {
            Flag::Unknown => "UNKNOWN",
            Flag::Stale => "STALE",
            Flag::Failed => "FAILED",
            Flag::Refused => "REFUSED",
            Flag::Stuck => "STUCK",
            Flag::Expired => "EXPIRED",
            Flag::Expiring => "EXPIRING",
            Flag::Behind => "BEHIND",
            Flag::Tofu => "TOFU",
            Flag::NeedsReboot => "REBOOT",
        }
    }

    /// The wire name (`stale`, `refused`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Flag::Unknown => "unknown",
            Flag::Stale => "stale",
            Flag::Failed => "failed",
            Flag::Refused => "refused",
            Flag::Stuck => "stuck",
            Flag::Expired => "expired",
            Flag::Expiring => "expiring",
            Flag::Behind => "behind",
            Flag::Tofu => "tofu",
            Flag::NeedsReboot => "needs_reboot",
        }
    }

    /// Whether it needs a human (makes `status` exit 1). BEHIND is a deploy under way,
    /// TOFU a standing risk the operator chose and REBOOT what the reboot policy is for;
    /// none fails.
    pub fn is_bad(self) -> bool {
        !matches!(self, Flag::Behind | Flag::Tofu | Flag::NeedsReboot)
    }
}

/// A flag with its reason: `code` is stable (for alerts and metric labels), `reason` is for
/// people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flagged {
    /// The flag.
    pub flag: Flag,
    /// A stable code: a report state, a refusal's error code, `no_contact`, `expiry`, …
    pub code: String,
    /// What is wrong and what to do, in words.
    pub reason: String,
}

/// The limits the judgement uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// STALE: no report and no poll for longer than this.
    pub stale: Duration,
    /// STUCK: not converged to the desired version this long after it was stored.
    pub stuck: Duration,
    /// EXPIRING: the desired manifest expires within this.
    pub expiring: Duration,
}

impl Default for Thresholds {
    /// Stale after 1 hour, stuck after 30 minutes, expiring within 7 days.
    fn default() -> Self {
        Self {
            stale: Duration::from_secs(3600),
            stuck: Duration::from_secs(1800),
            expiring: Duration::from_secs(7 * 86400),
        }
    }
}

/// The node's current manifest, as far as the judgement needs it.
#[derive(Debug, Clone, Copy)]
pub struct ManifestFacts {
    /// Its version.
    pub version: u64,
    /// When this coordinator stored it (since then the node has had to converge).
    pub stored_at: Timestamp,
    /// When it stops being accepted.
    pub expires_at: Timestamp,
}

/// The node's last accepted report.
#[derive(Debug, Clone, Copy)]
pub struct ReportFacts<'a> {
    /// When it arrived.
    pub received_at: Timestamp,
    /// Its state (wire name).
    pub state: Option<&'a str>,
    /// The manifest version it is about.
    pub version: Option<u64>,
    /// Whether every health check passed (`None`: none ran).
    pub healthy: Option<bool>,
    /// Its error: phase and message.
    pub error: Option<(&'a str, &'a str)>,
    /// The first failing health check: name and detail.
    pub failing_check: Option<(&'a str, &'a str)>,
    /// Why the node needs a reboot (empty: it does not).
    pub reboot_reasons: &'a [String],
}

/// The coordinator's last refusal of a report posted for the node.
#[derive(Debug, Clone, Copy)]
pub struct RefusalFacts<'a> {
    /// When.
    pub at: Timestamp,
    /// The error code answered (`bad_signature`, `seq_not_increasing`, …).
    pub code: &'a str,
    /// The message answered.
    pub message: &'a str,
}

/// The node's last report refusing its manifest (state `rejected`).
#[derive(Debug, Clone, Copy)]
pub struct RejectionFacts<'a> {
    /// When it arrived.
    pub at: Timestamp,
    /// The agent's message (`manifest refused (expired): …`).
    pub message: &'a str,
}

/// Polls or reports for a name that has no manifest.
#[derive(Debug, Clone, Copy)]
pub struct UnknownFacts {
    /// How many requests.
    pub requests: u64,
    /// The last one.
    pub last: Timestamp,
}

/// Everything known about one node.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts<'a> {
    /// Its current manifest.
    pub manifest: Option<ManifestFacts>,
    /// Its last accepted report.
    pub report: Option<ReportFacts<'a>>,
    /// Its last manifest poll.
    pub last_poll: Option<Timestamp>,
    /// `tofu`, `pinned` or `manifest`.
    pub key_source: Option<&'a str>,
    /// The coordinator's last refusal of its reports, when no report was accepted since.
    pub refusal: Option<RefusalFacts<'a>>,
    /// Its last refusal of a manifest.
    pub rejection: Option<RejectionFacts<'a>>,
    /// Requests under its name while it has no manifest.
    pub unknown: Option<UnknownFacts>,
}

/// States of a report that say the desired version runs.
const CONVERGED_STATES: &[&str] = &["success", "idle"];

fn ago(now: Timestamp, t: Timestamp) -> String {
    format!(
        "{} ago",
        human_duration(Duration::from_secs(now.secs_since(t)))
    )
}

fn words(d: Duration) -> String {
    human_duration(d)
}

fn flagged(flag: Flag, code: impl Into<String>, reason: impl Into<String>) -> Flagged {
    Flagged {
        flag,
        code: code.into(),
        reason: reason.into(),
    }
}

/// The code in an agent's `manifest refused (CODE): …` message, else `rejected`.
fn rejection_code(message: &str) -> &str {
    message
        .split_once('(')
        .and_then(|(_, rest)| rest.split_once(')'))
        .map(|(code, _)| code)
        .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        .unwrap_or("rejected")
}

/// Judges one node at `now`.
pub fn judge(f: &Facts<'_>, now: Timestamp, t: &Thresholds) -> Vec<Flagged> {
    let mut out = Vec::new();
    let Some(m) = f.manifest else {
        if let Some(u) = f.unknown {
            out.push(flagged(
                Flag::Unknown,
                "no_manifest",
                format!(
                    "{} request(s) under this name, the last {}, but no manifest is published \
                     for it: check the agent's node name against the flake's deploy.nodes",
                    u.requests,
                    ago(now, u.last)
                ),
            ));
        }
        return out;
    };
    let report = f.report;
    let contact = match (report.map(|r| r.received_at), f.last_poll) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let stale = match contact {
        Some(c) if now.secs_since(c) > t.stale.as_secs() => {
            out.push(flagged(
                Flag::Stale,
                "no_contact",
                format!(
                    "no report and no poll for {} (stale after {})",
                    words(Duration::from_secs(now.secs_since(c))),
                    words(t.stale)
                ),
            ));
            true
        }
        Some(_) => false,
        None if now.secs_since(m.stored_at) > t.stale.as_secs() => {
            out.push(flagged(
                Flag::Stale,
                "never_seen",
                format!(
                    "never polled or reported since its manifest was stored {}",
                    ago(now, m.stored_at)
                ),
            ));
            true
        }
        None => false,
    };
    let converged = report.is_some_and(|r| {
        r.version == Some(m.version)
            && r.state.is_some_and(|s| CONVERGED_STATES.contains(&s))
            && r.healthy != Some(false)
    });
    let mut failed = false;
    if let Some(r) = report {
        let error = r
            .error
            .map(|(phase, msg)| format!(": {phase}: {msg}"))
            .unwrap_or_default();
        match r.state {
            Some(s @ ("failed" | "rolled_back")) => {
                let what = if s == "failed" {
                    "the deploy failed"
                } else {
                    "the deploy failed and was rolled back"
                };
                out.push(flagged(Flag::Failed, s, format!("{what}{error}")));
                failed = true;
            }
            _ if r.healthy == Some(false) => {
                let check = r
                    .failing_check
                    .map(|(name, detail)| format!(": {name}: {detail}"))
                    .unwrap_or_default();
                out.push(flagged(
                    Flag::Failed,
                    "health",
                    format!("a health check fails{check}"),
                ));
                failed = true;
            }
            _ => {}
        }
    }
    let mut refused = false;
    if let Some(r) = f.refusal {
        out.push(flagged(
            Flag::Refused,
            r.code,
            format!(
                "the coordinator refuses its reports ({}, {}): {}",
                r.code,
                ago(now, r.at),
                r.message
            ),
        ));
        refused = true;
    }
    if let Some(r) = f.rejection.filter(|r| r.at >= m.stored_at && !converged) {
        out.push(flagged(
            Flag::Refused,
            rejection_code(r.message),
            format!(
                "the node refused its manifest ({}): {}",
                ago(now, r.at),
                r.message
            ),
        ));
        refused = true;
    }
    let waiting = now.secs_since(m.stored_at);
    if !stale && !converged && !failed && !refused && waiting >= t.stuck.as_secs() {
        let (code, last) = match report {
            Some(r) => {
                let state = r.state.unwrap_or("unknown");
                let error = r
                    .error
                    .map(|(phase, msg)| format!(" ({phase}: {msg})"))
                    .unwrap_or_default();
                (state, format!("last state {state}{error}"))
            }
            None => ("no_report", "no report yet".to_owned()),
        };
        out.push(flagged(
            Flag::Stuck,
            code,
            format!(
                "not converged to version {} since it was stored {}: {last}",
                m.version,
                ago(now, m.stored_at)
            ),
        ));
    }
    if m.expires_at <= now {
        out.push(flagged(
            Flag::Expired,
            "expiry",
            format!(
                "its manifest (version {}) expired at {} ({}): agents refuse it; publish again",
                m.version,
                m.expires_at,
                ago(now, m.expires_at)
            ),
        ));
    } else if m.expires_at.secs_since(now) < t.expiring.as_secs() {
        out.push(flagged(
            Flag::Expiring,
            "expiry",
            format!(
                "its manifest (version {}) expires at {}, in {}: publish again before then, \
                 or with a longer --expires",
                m.version,
                m.expires_at,
                words(Duration::from_secs(m.expires_at.secs_since(now)))
            ),
        ));
    }
    if let Some(v) = report.and_then(|r| r.version).filter(|v| *v < m.version) {
        out.push(flagged(
            Flag::Behind,
            "behind",
            format!("reports version {v}, desired {}", m.version),
        ));
    }
    if let Some(r) = report.filter(|r| !r.reboot_reasons.is_empty()) {
        out.push(flagged(
            Flag::NeedsReboot,
            "needs_reboot",
            format!(
                "needs a reboot to be fully on its system: {}",
                r.reboot_reasons.join("; ")
            ),
        ));
    }
    if f.key_source == Some("tofu") {
        out.push(flagged(
            Flag::Tofu,
            "tofu",
            "its report key was pinned on first use: put it in the flake as roost.nodeKey, \
             or pin it with `roost-coordinator node-key`",
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Timestamp {
        Timestamp::from_unix(1_800_000_000 + s)
    }

    fn manifest(stored: u64) -> ManifestFacts {
        ManifestFacts {
            version: 5,
            stored_at: at(stored),
            expires_at: at(stored + 30 * 86400),
        }
    }

    fn report(received: u64, state: &'static str, version: u64) -> ReportFacts<'static> {
        ReportFacts {
            received_at: at(received),
            state: Some(state),
            version: Some(version),
            healthy: None,
            error: None,
            failing_check: None,
            reboot_reasons: &[],
        }
    }

    fn flags(f: &Facts<'_>, now: u64) -> Vec<Flag> {
        judge(f, at(now), &Thresholds::default())
            .into_iter()
            .map(|f| f.flag)
            .collect()
    }

    #[test]
    fn a_converged_node_in_contact_has_no_flag() {
        let f = Facts {
            manifest: Some(manifest(0)),
            report: Some(report(100, "success", 5)),
            ..Facts::default()
        };
        assert_eq!(flags(&f, 200), vec![]);
    }

    #[test]
    fn polls_keep_a_node_from_going_stale_and_silence_makes_it_stale() {
        let f = Facts {
            manifest: Some(manifest(0)),
            report: Some(report(100, "success", 5)),
            last_poll: Some(at(7000)),
            ..Facts::default()
        };
        assert_eq!(flags(&f, 7200), vec![]);
        let silent = Facts {
            last_poll: None,
            ..f
        };
        let j = judge(&silent, at(7200), &Thresholds::default());
        assert_eq!(j[0].flag, Flag::Stale);
        assert!(
            j[0].reason
                .contains("for 118 minutes (stale after 60 minutes)"),
            "{}",
            j[0].reason
        );
    }

    #[test]
    fn a_deferred_node_is_stuck_only_after_the_limit_and_says_why() {
        let mut r = report(60, "deferred", 4);
        r.error = Some(("realise", "path is not signed by a trusted key"));
        let f = Facts {
            manifest: Some(manifest(0)),
            report: Some(r),
            last_poll: Some(at(1790)),
            ..Facts::default()
        };
        assert_eq!(flags(&f, 1700), vec![Flag::Behind]);
        let j = judge(&f, at(1900), &Thresholds::default());
        assert_eq!(j[0].flag, Flag::Stuck);
        assert_eq!(j[0].code, "deferred");
        assert!(
            j[0].reason.contains("not signed by a trusted key"),
            "{}",
            j[0].reason
        );
    }

    #[test]
    fn a_stale_node_is_not_also_stuck() {
        let f = Facts {
            manifest: Some(manifest(0)),
            report: Some(report(60, "deferred", 4)),
            ..Facts::default()
        };
        assert_eq!(flags(&f, 9000), vec![Flag::Stale, Flag::Behind]);
    }

    #[test]
    fn refused_reports_are_flagged_with_the_check_that_failed() {
        let f = Facts {
            manifest: Some(manifest(0)),
            last_poll: Some(at(100)),
            refusal: Some(RefusalFacts {
                at: at(100),
                code: "bad_signature",
                message: "report for `a` is not signed by its node key `a-1`",
            }),
            ..Facts::default()
        };
        let j = judge(&f, at(200), &Thresholds::default());
        assert_eq!(j.len(), 1, "{j:?}");
        assert_eq!(
            (j[0].flag, j[0].code.as_str()),
            (Flag::Refused, "bad_signature")
        );
        assert!(j[0].reason.contains("not signed by its node key"));
    }

    #[test]
    fn a_node_refusing_its_manifest_is_refused_until_it_converges() {
        let f = Facts {
            manifest: Some(manifest(10)),
            report: Some(report(20, "rejected", 4)),
            rejection: Some(RejectionFacts {
                at: at(20),
                message: "manifest refused (bad_signature): not signed by a trusted key",
            }),
            ..Facts::default()
        };
        let j = judge(&f, at(30), &Thresholds::default());
        assert_eq!(
            (j[0].flag, j[0].code.as_str()),
            (Flag::Refused, "bad_signature")
        );
        let later = Facts {
            report: Some(report(40, "success", 5)),
            ..f
        };
        assert_eq!(flags(&later, 50), vec![]);
        let older = Facts {
            manifest: Some(manifest(25)),
            report: Some(report(20, "rejected", 4)),
            ..f
        };
        assert_eq!(
            flags(&older, 30),
            vec![Flag::Behind],
            "refused an older manifest"
        );
    }

    #[test]
    fn expiry_within_the_limit_is_expiring_and_past_it_expired() {
        let f = Facts {
            manifest: Some(manifest(0)),
            report: Some(report(100, "success", 5)),
            last_poll: Some(at(30 * 86400 - 10)),
            ..Facts::default()
        };
        assert_eq!(flags(&f, 23 * 86400 - 1), vec![]);
        let j = judge(&f, at(24 * 86400), &Thresholds::default());
        assert_eq!(j[0].flag, Flag::Expiring);
        assert!(j[0].reason.contains("in 6 days"), "{}", j[0].reason);
        assert_eq!(flags(&f, 30 * 86400), vec![Flag::Expired]);
    }

    #[test]
    fn a_name_without_a_manifest_that_polls_is_unknown() {
        let f = Facts {
            unknown: Some(UnknownFacts {
                requests: 3,
                last: at(0),
            }),
            ..Facts::default()
        };
        let j = judge(&f, at(5), &Thresholds::default());
        assert_eq!(j.len(), 1);
        assert_eq!(j[0].flag, Flag::Unknown);
        assert!(j[0].reason.contains("3 request(s)"), "{}", j[0].reason);
        assert!(Flag::Unknown.is_bad() && !Flag::Behind.is_bad() && !Flag::Tofu.is_bad());
    }

    #[test]
    fn rolled_back_and_failing_checks_are_failed_with_the_error() {
        let mut r = report(10, "rolled_back", 5);
        r.error = Some(("confirm", "health check http failed"));
        let f = Facts {
            manifest: Some(manifest(0)),
            report: Some(r),
            ..Facts::default()
        };
        let j = judge(&f, at(20), &Thresholds::default());
        assert_eq!(
            (j[0].flag, j[0].code.as_str()),
            (Flag::Failed, "rolled_back")
        );
        assert!(j[0].reason.ends_with("confirm: health check http failed"));
        let mut h = report(10, "success", 5);
        h.healthy = Some(false);
        h.failing_check = Some(("command:true", "exit 1"));
        let f = Facts {
            report: Some(h),
            last_poll: Some(at(4990)),
            ..f
        };
        let j = judge(&f, at(5000), &Thresholds::default());
        assert_eq!(j.len(), 1, "failing, not also stuck: {j:?}");
        assert_eq!(j[0].code, "health");
    }

    #[test]
    fn a_success_that_needs_a_reboot_is_flagged_with_its_reasons_and_is_not_bad() {
        let reasons = ["kernel changed: a (booted) -> b".to_owned()];
        let mut r = report(10, "success", 5);
        r.reboot_reasons = &reasons;
        let f = Facts {
            manifest: Some(manifest(0)),
            report: Some(r),
            ..Facts::default()
        };
        let j = judge(&f, at(20), &Thresholds::default());
        assert_eq!(j.len(), 1, "{j:?}");
        assert_eq!(
            (j[0].flag, j[0].code.as_str()),
            (Flag::NeedsReboot, "needs_reboot")
        );
        assert!(
            j[0].reason.ends_with("kernel changed: a (booted) -> b"),
            "{}",
            j[0].reason
        );
        assert!(!Flag::NeedsReboot.is_bad());
        let f = Facts {
            report: Some(report(10, "success", 5)),
            ..f
        };
        assert!(judge(&f, at(20), &Thresholds::default()).is_empty());
    }
}
