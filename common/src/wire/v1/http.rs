//! The HTTP side of v1 (docs/protocol.md §6): paths, the static-folder layout, header names,
//! ETags and limits. The agent, the coordinator and the tests build every URL and name every
//! roost header from here, so they cannot drift apart. Strings only: no HTTP library.

use std::fmt::Display;
use std::path::PathBuf;

/// Response header of a manifest GET: this server holds polls open (`?wait=S`) for up to
/// the given number of seconds.
pub const LONG_POLL_HEADER: &str = "roost-long-poll";

/// The query parameter of a long-poll: `?wait=S`.
pub const WAIT_PARAM: &str = "wait";

/// The longest a server holds a long-poll, in seconds; a longer `wait` is shortened to this.
pub const MAX_WAIT_S: u64 = 300;

/// Largest manifest envelope a server accepts and an agent reads (the envelope cap).
pub const MAX_MANIFEST_BYTES: usize = crate::envelope::MAX_ENVELOPE_BYTES;

/// Largest report envelope a server accepts.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;

/// Largest cache file other than a NAR or a build log (`nix-cache-info`, narinfo files).
pub const MAX_CACHE_FILE_BYTES: u64 = 1 << 20;

/// The default cap on a NAR (or build log) uploaded to the cache.
pub const DEFAULT_MAX_NAR_BYTES: u64 = 8 << 30;

/// Route patterns, in the `{param}` syntax of routers such as axum's.
pub mod route {
    /// A node's manifest: GET (long-poll) and PUT.
    pub const MANIFEST: &str = "/v1/nodes/{node}/manifest";
    /// A node's reports: POST one, GET the history.
    pub const REPORTS: &str = "/v1/nodes/{node}/reports";
    /// The fleet document.
    pub const FLEET: &str = "/v1/fleet";
    /// Prometheus text.
    pub const METRICS: &str = "/metrics";
    /// The embedded binary cache.
    pub const CACHE: &str = "/cache/{*path}";
    /// The key a node's reports are checked with when its manifest names none: PUT pins
    /// one, DELETE clears it (an operator's, with the admin token).
    pub const NODE_KEY: &str = "/v1/nodes/{node}/key";
    /// The current rollout (GET).
    pub const ROLLOUT: &str = "/v1/rollout";
    /// An operator's action on it (POST): `pause`, `resume`, `abort`, `promote`.
    pub const ROLLOUT_ACTION: &str = "/v1/rollout/{action}";
    /// A node takes or gives back its reboot lease (POST, signed by the node key).
    pub const REBOOT_LEASE: &str = "/v1/nodes/{node}/reboot-lease";
    /// Who holds reboot leases, and the lease log (GET).
    pub const REBOOT_LEASES: &str = "/v1/reboot-leases";
}

/// Where nodes live, below a server's root or a static folder.
const NODES: &str = "v1/nodes";

/// `/v1/nodes/NODE/manifest`.
pub fn manifest_path(node: impl Display) -> String {
    format!("/{NODES}/{node}/manifest")
}

/// `BASE/v1/nodes/NODE/manifest`; `base` is a server's URL without a trailing `/`.
pub fn manifest_url(base: &str, node: impl Display) -> String {
    format!("{base}{}", manifest_path(node))
}

/// A long-poll of `node`'s manifest, held up to `wait_s` seconds.
pub fn long_poll_url(base: &str, node: impl Display, wait_s: u64) -> String {
    format!("{}?{WAIT_PARAM}={wait_s}", manifest_url(base, node))
}

/// `/v1/nodes/NODE/reports`.
pub fn reports_path(node: impl Display) -> String {
    format!("/{NODES}/{node}/reports")
}

/// `BASE/v1/nodes/NODE/reports`.
pub fn reports_url(base: &str, node: impl Display) -> String {
    format!("{base}{}", reports_path(node))
}

/// `BASE/v1/nodes/NODE/key`: the node's pinned report key.
pub fn node_key_url(base: &str, node: impl Display) -> String {
    format!("{base}/{NODES}/{node}/key")
}

/// The query parameter of a report-history GET: `?limit=N`, newest first.
pub const LIMIT_PARAM: &str = "limit";

/// `BASE/v1/nodes/NODE/reports?limit=N`: the newest `limit` reports.
pub fn report_history_url(base: &str, node: impl Display, limit: u64) -> String {
    format!("{}?{LIMIT_PARAM}={limit}", reports_url(base, node))
}

/// `BASE/v1/fleet`.
pub fn fleet_url(base: &str) -> String {
    format!("{base}{}", route::FLEET)
}

/// `BASE/v1/nodes/NODE/reboot-lease`.
pub fn reboot_lease_url(base: &str, node: impl Display) -> String {
    format!("{base}/v1/nodes/{node}/reboot-lease")
}

/// `BASE/v1/reboot-leases`.
pub fn reboot_leases_url(base: &str) -> String {
    format!("{base}{}", route::REBOOT_LEASES)
}

/// `BASE/v1/rollout`.
pub fn rollout_url(base: &str) -> String {
    format!("{base}{}", route::ROLLOUT)
}

/// `BASE/v1/rollout/ACTION`.
pub fn rollout_action_url(base: &str, action: impl Display) -> String {
    format!("{base}{}/{action}", route::ROLLOUT)
}

/// What the URL path of a file in the embedded binary cache starts with.
pub const CACHE_PREFIX: &str = "/cache/";

/// `BASE/cache`: the embedded binary cache's store URL, for `nix copy --to` and as a
/// substituter.
pub fn cache_url(base: &str) -> String {
    format!("{base}/cache")
}

/// The node whose manifest `path` (no query) names: `/v1/nodes/NODE/manifest` → `NODE`,
/// unvalidated; `None` for any other path or an empty or nested name.
pub fn manifest_node(path: &str) -> Option<&str> {
    node_of(path, "/manifest")
}

/// The node whose reports `path` names: `/v1/nodes/NODE/reports` → `NODE`, unvalidated.
pub fn reports_node(path: &str) -> Option<&str> {
    node_of(path, "/reports")
}

fn node_of<'a>(path: &'a str, leaf: &str) -> Option<&'a str> {
    let node = path
        .strip_prefix(&format!("/{NODES}/"))?
        .strip_suffix(leaf)?;
    (!node.is_empty() && !node.contains('/')).then_some(node)
}

/// `node`'s manifest file relative to a static folder (`publish --out DIR`) or the
/// coordinator's `manifests/` folder: `v1/nodes/NODE/manifest`, the same layout as the URLs,
/// so any static web server serves the folder as a coordinator without long-poll.
pub fn manifest_file(node: impl Display) -> PathBuf {
    PathBuf::from(format!("{NODES}/{node}/manifest"))
}

/// The folder holding one sub-folder per node in that layout: `v1/nodes`.
pub fn nodes_dir() -> PathBuf {
    PathBuf::from(NODES)
}

/// The ETag of a manifest version: the version, quoted (`"42"`).
pub fn manifest_etag(version: u64) -> String {
    format!("\"{version}\"")
}

/// Whether an `If-None-Match` header value names `etag`: one of its comma-separated tags
/// equals it, weakly (`W/`) or exactly, or is `*`.
pub fn etag_matches(if_none_match: &[u8], etag: &[u8]) -> bool {
    if_none_match
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .any(|t| t == b"*" || t == etag || t.strip_prefix(b"W/") == Some(etag))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_the_static_layout_agree() {
        let base = "https://roost.example.org";
        assert_eq!(
            manifest_url(base, "pi"),
            "https://roost.example.org/v1/nodes/pi/manifest"
        );
        assert_eq!(
            long_poll_url(base, "pi", 300),
            "https://roost.example.org/v1/nodes/pi/manifest?wait=300"
        );
        assert_eq!(
            reports_url(base, "pi"),
            "https://roost.example.org/v1/nodes/pi/reports"
        );
        assert_eq!(
            report_history_url(base, "pi", 10),
            "https://roost.example.org/v1/nodes/pi/reports?limit=10"
        );
        assert_eq!(fleet_url(base), "https://roost.example.org/v1/fleet");
        assert_eq!(
            format!(
                "{base}{}",
                route::ROLLOUT_ACTION.replace("{action}", "pause")
            ),
            rollout_action_url(base, "pause")
        );
        assert_eq!(cache_url(base), "https://roost.example.org/cache");
        assert_eq!(format!("{}/", cache_url("")), CACHE_PREFIX);
        assert!(route::CACHE.starts_with(CACHE_PREFIX));
        assert_eq!(
            format!("/{}", manifest_file("pi").display()),
            manifest_path("pi")
        );
        assert_eq!(manifest_file("pi").parent(), Some(&*nodes_dir().join("pi")));
        assert_eq!(route::MANIFEST.replace("{node}", "pi"), manifest_path("pi"));
        assert_eq!(route::REPORTS.replace("{node}", "pi"), reports_path("pi"));
        assert_eq!(
            format!("{base}{}", route::NODE_KEY.replace("{node}", "pi")),
            node_key_url(base, "pi")
        );
    }

    #[test]
    fn manifest_node_takes_exactly_one_segment() {
        assert_eq!(manifest_node("/v1/nodes/pi/manifest"), Some("pi"));
        assert_eq!(reports_node("/v1/nodes/pi/reports"), Some("pi"));
        assert_eq!(reports_node("/v1/nodes/pi/manifest"), None);
        for other in [
            "/v1/nodes//manifest",
            "/v1/nodes/a/b/manifest",
            "/v1/nodes/pi/reports",
            "/v1/fleet",
            "/v2/nodes/pi/manifest",
        ] {
            assert_eq!(manifest_node(other), None, "{other}");
        }
    }

    #[test]
    fn if_none_match_lists_weak_tags_and_star_match() {
        let tag = manifest_etag(7);
        assert_eq!(tag, "\"7\"");
        let t = tag.as_bytes();
        assert!(etag_matches(b"\"7\"", t));
        assert!(etag_matches(b"\"3\", W/\"7\"", t));
        assert!(etag_matches(b"*", t));
        assert!(!etag_matches(b"\"70\"", t));
        assert!(!etag_matches(b"7", t));
        assert!(!etag_matches(b"", t));
    }
}
