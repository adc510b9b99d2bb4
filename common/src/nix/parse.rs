//! Tolerant parsers for Nix's JSON output across versions (fixtures from real runs live in
//! `common/tests/fixtures/`).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::names::StorePath;

/// One entry of `nix build --json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    /// The derivation built.
    pub drv_path: StorePath,
    /// Output name → store path.
    pub outputs: BTreeMap<String, StorePath>,
}

/// What `nix path-info --json` says of one valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The path.
    pub path: StorePath,
    /// NAR hash, always normalised to SRI (`sha256-…`).
    pub nar_hash: String,
    /// NAR size in bytes.
    pub nar_size: u64,
    /// Closure size in bytes, when asked for.
    pub closure_size: Option<u64>,
    /// The derivation that built it.
    pub deriver: Option<StorePath>,
    /// Direct references.
    pub references: Vec<StorePath>,
    /// Signatures (`key:base64`).
    pub signatures: Vec<String>,
}

/// What `nix flake metadata --json` says of a flake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlakeMetadata {
    /// The locked URL.
    pub url: String,
    /// The revision, for flakes in a repository with a clean tree.
    pub rev: Option<String>,
    /// Whether the tree has uncommitted changes (a repository without `rev`).
    pub dirty: bool,
    /// The flake's source in the store.
    pub path: Option<String>,
}

/// Parses `nix build --json` output.
pub fn build_results(out: &[u8]) -> Result<Vec<BuildResult>, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        drv_path: StorePath,
        #[serde(default)]
        outputs: BTreeMap<String, StorePath>,
    }
    let raw: Vec<Raw> = serde_json::from_slice(out).map_err(|e| e.to_string())?;
    Ok(raw
        .into_iter()
        .map(|r| BuildResult {
            drv_path: r.drv_path,
            outputs: r.outputs,
        })
        .collect())
}

/// Parses `nix path-info --json`: an array (Nix ≤ 2.18) or an object keyed by path (newer).
pub fn path_infos(out: &[u8]) -> Result<Vec<PathInfo>, String> {
    let v: Value = serde_json::from_slice(out).map_err(|e| e.to_string())?;
    let entries: Vec<(Option<String>, Value)> = match v {
        Value::Array(a) => a.into_iter().map(|e| (None, e)).collect(),
        Value::Object(o) => o.into_iter().map(|(k, e)| (Some(k), e)).collect(),
        _ => return Err("expected an array or an object".into()),
    };
    let mut infos = Vec::new();
    for (key, e) in entries {
        // Invalid paths: `{"path": …, "valid": false}` (2.8) or `null` (newer).
        if e.is_null() || e.get("valid") == Some(&Value::Bool(false)) {
            continue;
        }
        let path = key
            .or_else(|| e.get("path").and_then(Value::as_str).map(str::to_owned))
            .ok_or("an entry has no path")?;
        let path: StorePath = path
            .parse()
            .map_err(|e: crate::names::NameError| e.to_string())?;
        let nar_hash = e
            .get("narHash")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{path}: no narHash"))?;
        let store_paths = |field: &str| -> Vec<StorePath> {
            e.get(field)
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|r| r.as_str()?.parse().ok()).collect())
                .unwrap_or_default()
        };
        infos.push(PathInfo {
            nar_hash: normalise_hash(nar_hash)
                .ok_or_else(|| format!("{path}: unreadable narHash `{nar_hash}`"))?,
            nar_size: e.get("narSize").and_then(Value::as_u64).unwrap_or(0),
            closure_size: e.get("closureSize").and_then(Value::as_u64),
            deriver: e
                .get("deriver")
                .and_then(Value::as_str)
                .and_then(|d| d.parse().ok()),
            references: store_paths("references"),
            signatures: e
                .get("signatures")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| Some(s.as_str()?.to_owned()))
                        .collect()
                })
                .unwrap_or_default(),
            path,
        });
    }
    Ok(infos)
}

/// Parses `nix flake metadata --json`.
pub fn flake_metadata(out: &[u8]) -> Result<FlakeMetadata, String> {
    let v: Value = serde_json::from_slice(out).map_err(|e| e.to_string())?;
    let url = v
        .get("url")
        .or_else(|| v.get("resolvedUrl"))
        .and_then(Value::as_str)
        .ok_or("no url")?
        .to_owned();
    let locked = v.get("locked");
    let rev = locked
        .and_then(|l| l.get("rev"))
        .or_else(|| v.get("revision"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let is_repo = locked
        .and_then(|l| l.get("type"))
        .and_then(Value::as_str)
        .is_some_and(|t| t != "path" && t != "tarball" && t != "file");
    let dirty = locked.and_then(|l| l.get("dirtyRev")).is_some() || (is_repo && rev.is_none());
    Ok(FlakeMetadata {
        url,
        rev,
        dirty,
        path: v.get("path").and_then(Value::as_str).map(str::to_owned),
    })
}

/// `sha256-<base64>` stays; `sha256:<nix32 or hex>` becomes SRI.
pub fn normalise_hash(h: &str) -> Option<String> {
    use base64::Engine;
    if let Some(b64) = h.strip_prefix("sha256-") {
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        return (bytes.len() == 32).then(|| h.to_owned());
    }
    let digest = h.strip_prefix("sha256:")?;
    let bytes = match digest.len() {
        52 => nix32_decode(digest)?,
        64 => (0..32)
            .map(|i| u8::from_str_radix(&digest[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?,
        _ => return None,
    };
    Some(format!(
        "sha256-{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    ))
}

/// Decodes Nix's base-32 (least significant digit last, its own alphabet).
fn nix32_decode(s: &str) -> Option<Vec<u8>> {
    let alphabet = crate::names::NIX_BASE32_CHARS.as_bytes();
    let len = s.len() * 5 / 8;
    let mut out = vec![0u8; len];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = alphabet.iter().position(|&a| a == c)? as u16;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        if i + 1 < len {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return None;
        }
    }
    Some(out)
}

/// The bytes in the last line of `nix-store --gc` (`12 store paths deleted, 3.40 MiB
/// freed`); Nix rounds to hundredths of the unit it prints.
pub fn gc_freed_bytes(out: &str) -> Option<u64> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with("freed"))?;
    let mut words = line.split_whitespace().rev();
    let _freed = words.next()?;
    let unit = words.next()?;
    let n: f64 = words.next()?.parse().ok()?;
    let scale = match unit {
        "bytes" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "TiB" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    Some((n * scale).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix32_and_sri_agree() {
        // Nix 2.8's `nix hash to-base32` printed this nix32 form of the SRI hash.
        let sri = "sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=";
        let nix32 = "sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h";
        assert_eq!(normalise_hash(nix32).as_deref(), Some(sri));
        assert_eq!(normalise_hash(sri).as_deref(), Some(sri));
        assert_eq!(normalise_hash("md5:abc"), None);
    }

    #[test]
    fn path_info_accepts_the_object_shape_of_newer_nix() {
        let newer = br#"{"/nix/store/zr2knphxg8yyy2mkq8akf2hfknjvdiz7-x":{"narHash":"sha256-EFUdrtf6Rn0LWIJufrmg8q99aT3jGfLvd1//zaJEufY=","narSize":120,"closureSize":120,"references":[],"signatures":["k:abc"]},
          "/nix/store/00000000000000000000000000000000-gone":null}"#;
        let infos = path_infos(newer).unwrap();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].closure_size, Some(120));
        assert_eq!(infos[0].signatures, vec!["k:abc".to_owned()]);
    }

    #[test]
    fn gc_output_gives_the_bytes_freed() {
        let out = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-a\n12 store paths deleted, 3.50 MiB freed\n";
        assert_eq!(gc_freed_bytes(out), Some(3_670_016));
        assert_eq!(
            gc_freed_bytes("0 store paths deleted, 0.00 MiB freed\n"),
            Some(0)
        );
        assert_eq!(gc_freed_bytes("nothing useful"), None);
    }
}
