//! What `publish` refuses or warns about because nodes would otherwise sit undeployed while
//! every view stays green: manifests that name no cache the nodes can verify, a dirty tree,
//! and manifests that expire before the next publish is likely to replace them.

use std::time::Duration;

use roost_common::Timestamp;
use roost_common::time::human_duration;

/// The expiry below which a publish warns whatever its cadence: nodes offline longer than
/// this refuse their manifest, and the fleet view flags EXPIRING within it.
pub const SAFE_EXPIRY: Duration = Duration::from_secs(7 * 86400);

/// How many publish intervals a manifest should outlive, so one late publish (a quiet week
/// of no pushes) does not leave returning nodes with an expired manifest.
const CADENCE_MARGIN: u32 = 2;

/// What the manifests will say about substitution, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct CacheTrust<'a> {
    /// `--cache`.
    pub cache: Option<&'a str>,
    /// `--substituter` URLs (default: `--cache`).
    pub substituters: &'a [String],
    /// Whether any public key goes into the manifests (`--cache-key`, `--cache-public-key`).
    pub has_key: bool,
    /// `--nodes-trust-paths`: the nodes' own configuration trusts where the paths come from.
    pub nodes_trust_paths: bool,
}

/// Why publishing with these cache settings would leave nodes unable to deploy, if it would.
pub fn cache_refusal(t: CacheTrust<'_>) -> Option<String> {
    if t.nodes_trust_paths {
        return None;
    }
    const ESCAPE: &str = "or --nodes-trust-paths if every node's own configuration already \
         trusts where the paths come from (its extra_substituters and \
         extra_trusted_public_keys) or already has them";
    if t.cache.is_none() && t.substituters.is_empty() {
        return Some(format!(
            "no --cache: the manifests would name no binary cache, so nodes could deploy only \
             paths they already have and would sit deferred otherwise. Give --cache STORE_URL \
             with --cache-key SECRET_FILE (publish signs and pushes the closures), {ESCAPE}"
        ));
    }
    if !t.has_key {
        let what = match t.cache {
            Some(c) => format!("--cache {c}"),
            None => format!("--substituter {}", t.substituters.join(", ")),
        };
        return Some(format!(
            "{what} without --cache-key or --cache-public-key: the manifests would name no key \
             for the cache, and nodes (which require signatures) would refuse every path from \
             it and sit deferred. Give --cache-key SECRET_FILE (publish signs the closures), \
             --cache-public-key NAME:KEY (they are signed elsewhere), {ESCAPE}"
        ));
    }
    None
}

/// A warning when `expires` is short: below [`SAFE_EXPIRY`], or below a margin over the time
/// since the destination's newest manifest was issued (`last_issued`), the publish cadence.
pub fn expiry_warning(
    expires: Duration,
    last_issued: Option<Timestamp>,
    now: Timestamp,
) -> Option<String> {
    let gap = last_issued
        .filter(|t| *t <= now)
        .map(|t| Duration::from_secs(now.secs_since(t)));
    let by_cadence = gap.map(|g| g * CADENCE_MARGIN);
    let e = human_duration(expires);
    match by_cadence {
        Some(need) if expires < need && need > SAFE_EXPIRY => Some(format!(
            "--expires {e} is short for this fleet's pace: the previous publish here was {} \
             ago, so at that pace the next one comes after these manifests expire, and a node \
             that is offline until then refuses its manifest and keeps its old system. Publish \
             more often (a scheduled CI run) or raise --expires above {}",
            human_duration(gap.unwrap_or_default()),
            human_duration(need)
        )),
        _ if expires < SAFE_EXPIRY => Some(format!(
            "--expires {e} is shorter than {}: a node offline longer than that refuses its \
             manifest and keeps its old system until the next publish",
            human_duration(SAFE_EXPIRY)
        )),
        _ => None,
    }
}

/// A warning for a flake with uncommitted changes.
pub fn dirty_warning(flake: &str) -> String {
    format!(
        "{flake} has uncommitted changes: the manifests record the tree as dirty, and what the \
         nodes run cannot be traced back to a commit. Commit first, so `rev` names it"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trust<'a>(
        cache: Option<&'a str>,
        subs: &'a [String],
        has_key: bool,
        escape: bool,
    ) -> Option<String> {
        cache_refusal(CacheTrust {
            cache,
            substituters: subs,
            has_key,
            nodes_trust_paths: escape,
        })
    }

    #[test]
    fn a_cache_without_any_key_is_refused_naming_the_flags_that_fix_it() {
        let e = trust(Some("http://c/cache"), &[], false, false).unwrap();
        for want in [
            "--cache http://c/cache",
            "--cache-key",
            "--cache-public-key",
            "--nodes-trust-paths",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        let e = trust(None, &["https://pub/cache".into()], false, false).unwrap();
        assert!(e.contains("--substituter https://pub/cache"), "{e}");
    }

    #[test]
    fn no_cache_at_all_is_refused() {
        let e = trust(None, &[], false, false).unwrap();
        assert!(e.starts_with("no --cache"), "{e}");
    }

    #[test]
    fn a_key_or_the_explicit_flag_is_enough() {
        assert_eq!(trust(Some("file:///c"), &[], true, false), None);
        assert_eq!(trust(None, &["https://pub".into()], true, false), None);
        assert_eq!(trust(None, &[], false, true), None);
        assert_eq!(trust(Some("file:///c"), &[], false, true), None);
    }

    const DAY: u64 = 86400;

    #[test]
    fn an_expiry_under_a_week_warns() {
        let now = Timestamp::from_unix(100 * DAY);
        let w = expiry_warning(Duration::from_secs(2 * DAY), None, now).unwrap();
        assert!(w.contains("shorter than 7 days"), "{w}");
        assert_eq!(
            expiry_warning(Duration::from_secs(30 * DAY), None, now),
            None
        );
    }

    #[test]
    fn an_expiry_below_twice_the_publish_interval_warns() {
        let now = Timestamp::from_unix(100 * DAY);
        let last = Some(Timestamp::from_unix(80 * DAY));
        let w = expiry_warning(Duration::from_secs(30 * DAY), last, now).unwrap();
        assert!(w.contains("20 days ago") && w.contains("40 days"), "{w}");
        assert_eq!(
            expiry_warning(Duration::from_secs(45 * DAY), last, now),
            None
        );
        // Publishing every hour with the default 30 days is fine.
        let hourly = Some(Timestamp::from_unix(100 * DAY - 3600));
        assert_eq!(
            expiry_warning(Duration::from_secs(30 * DAY), hourly, now),
            None
        );
    }
}
