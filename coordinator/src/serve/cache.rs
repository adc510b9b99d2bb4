//! The embedded Nix binary cache under `STATE/cache`: what `nix copy --to http://…/cache`
//! uploads and what agents substitute from. Every URL path is percent-decoded, then checked
//! against a strict allow-list, so nothing outside the cache folder can be read or written.

use std::path::{Path, PathBuf};

/// `nix-cache-info` served when none was uploaded.
pub const DEFAULT_CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";

/// Folders Nix writes inside a binary cache.
const FOLDERS: &[&str] = &["nar", "log", "realisations", "debuginfo"];

/// Why a cache path was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a binary cache file name (expected e.g. HASH.narinfo or nar/FILE.nar.xz)")]
pub struct BadCachePath(pub String);

/// Turns the raw (still percent-encoded) path after `/cache/` into a file under `root`.
pub fn resolve(root: &Path, raw: &str) -> Result<PathBuf, BadCachePath> {
    let bad = || BadCachePath(raw.chars().take(200).collect());
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| bad())?;
    let segments: Vec<&str> = decoded.split('/').collect();
    let ok_segment = |s: &str| {
        !s.is_empty()
            && s.len() <= 255
            && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._+-=".contains(c))
            && !s.contains("..")
    };
    match segments.as_slice() {
        [file] if ok_segment(file) => Ok(root.join(file)),
        [folder, file] if FOLDERS.contains(folder) && ok_segment(file) => {
            Ok(root.join(folder).join(file))
        }
        _ => Err(bad()),
    }
}

/// The Content-Type Nix expects for a cache file.
pub fn content_type(path: &Path) -> &'static str {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.ends_with(".narinfo") {
        "text/x-nix-narinfo"
    } else if name == "nix-cache-info" {
        "text/x-nix-cache-info"
    } else if path
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|f| f == "nar")
    {
        "application/x-nix-nar"
    } else {
        "application/octet-stream"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_nix_writes() {
        let r = Path::new("/s/cache");
        assert_eq!(
            resolve(r, "nix-cache-info").unwrap(),
            r.join("nix-cache-info")
        );
        assert_eq!(
            resolve(r, "zr2knphxg8yyy2mkq8akf2hfknjvdiz7.narinfo").unwrap(),
            r.join("zr2knphxg8yyy2mkq8akf2hfknjvdiz7.narinfo")
        );
        assert_eq!(
            resolve(r, "nar/1abc.nar.xz").unwrap(),
            r.join("nar/1abc.nar.xz")
        );
        assert_eq!(
            resolve(r, "log/abc-x.drv").unwrap(),
            r.join("log/abc-x.drv")
        );
    }

    #[test]
    fn refuses_traversal_in_every_spelling() {
        let r = Path::new("/s/cache");
        for raw in [
            "../coordinator.sqlite",
            "nar/../../etc/passwd",
            "%2e%2e/coordinator.sqlite",
            "%2E%2E%2Fcoordinator.sqlite",
            "nar%2f..%2f..%2fx",
            "..",
            "/etc/passwd",
            "%2fetc%2fpasswd",
            "nar/.hidden",
            "manifests/v1/nodes/x/manifest",
            "nar/",
            "a%00b",
            "nar/x/y",
        ] {
            assert!(resolve(r, raw).is_err(), "{raw} must be refused");
        }
    }
}
