//! The embedded Nix binary cache under `STATE/cache`: what `nix copy --to http://…/cache`
//! uploads and what agents substitute from. Every URL path is percent-decoded, then checked
//! against a strict allow-list, so nothing outside the cache folder can be read or written.
//! Uploads (`PUT`) need the upload token; files are streamed to a temporary name and renamed
//! into place, so a reader never sees half a file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use base64::Engine;
use roost_common::wire::v1::http::{MAX_CACHE_FILE_BYTES, route};

use super::error::{ApiError, ApiResult};
use super::server::App;

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

/// The token from `Authorization: Bearer T` or the password of `Authorization: Basic`
/// (any user name), which is what Nix sends from a netrc file.
fn given_token(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(b) = v.strip_prefix("Bearer ") {
        return Some(b.trim().to_owned());
    }
    let basic = v.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(match text.split_once(':') {
        Some((_, password)) => password.to_owned(),
        None => text,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn check_token(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(want) = &app.cfg.upload_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "read_only",
            "this coordinator has no --upload-token-file: the cache is read-only",
        ));
    };
    if given_token(headers).is_some_and(|g| constant_time_eq(g.as_bytes(), want.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "cache uploads need the upload token (HTTP Basic password, e.g. from a netrc file, or Bearer)",
        ))
    }
}

/// The raw, still percent-encoded part of the request path after `/cache/`.
fn raw_cache_path(req_path: &str) -> &str {
    req_path
        .strip_prefix(route::CACHE.trim_end_matches("{*path}"))
        .unwrap_or("")
}

fn resolve_request(app: &App, raw: &str) -> Result<PathBuf, ApiError> {
    resolve(&app.store.cache_dir(), raw)
        .map_err(|e| ApiError::bad_request("bad_path", e.to_string()))
}

/// `GET /cache/…` (and `HEAD`): a file of the cache, streamed.
pub(super) async fn get_cache(State(app): State<Arc<App>>, req: Request) -> ApiResult {
    let raw = raw_cache_path(req.uri().path()).to_owned();
    let path = resolve_request(&app, &raw)?;
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if raw == "nix-cache-info" {
                return Ok((
                    [(header::CONTENT_TYPE, content_type(&path))],
                    DEFAULT_CACHE_INFO,
                )
                    .into_response());
            }
            return Err(ApiError::not_found(
                "not_found",
                format!("{raw} is not in the cache"),
            ));
        }
        Err(e) => return Err(ApiError::internal(format!("{}: {e}", path.display()))),
    };
    let meta = file.metadata().await.map_err(ApiError::internal)?;
    if !meta.is_file() {
        return Err(ApiError::not_found(
            "not_found",
            format!("{raw} is not in the cache"),
        ));
    }
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, content_type(&path).to_owned()),
            (header::CONTENT_LENGTH, meta.len().to_string()),
        ],
        body,
    )
        .into_response())
}

/// `PUT /cache/…`: stores an upload from `nix copy --to http://…/cache`.
pub(super) async fn put_cache(State(app): State<Arc<App>>, req: Request) -> ApiResult {
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    check_token(&app, req.headers())?;
    let raw = raw_cache_path(req.uri().path()).to_owned();
    let path = resolve_request(&app, &raw)?;
    let limit = if raw.starts_with("nar/") || raw.starts_with("log/") {
        app.cfg.max_nar_bytes
    } else {
        MAX_CACHE_FILE_BYTES
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(&raw, limit));
    }
    let dir = path.parent().expect("cache files have a folder").to_owned();
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(ApiError::internal)?;
    let tmp = dir.join(format!(".upload-{}-{}", std::process::id(), next_id()));
    let mut f = tokio::fs::File::create(&tmp)
        .await
        .map_err(ApiError::internal)?;
    let mut stream = req.into_body().into_data_stream();
    let mut total = 0u64;
    let idle = app.cfg.body_timeout;
    let result: Result<(), ApiError> = async {
        loop {
            let chunk = match tokio::time::timeout(idle, stream.next()).await {
                Ok(Some(Ok(c))) => c,
                Ok(Some(Err(e))) => return Err(ApiError::bad_request("bad_body", e.to_string())),
                Ok(None) => break,
                Err(_) => {
                    return Err(ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "timeout",
                        format!("upload of {raw} stalled for {} s", idle.as_secs()),
                    ));
                }
            };
            total += chunk.len() as u64;
            if total > limit {
                return Err(too_large(&raw, limit));
            }
            f.write_all(&chunk).await.map_err(ApiError::internal)?;
        }
        f.sync_all().await.map_err(ApiError::internal)?;
        tokio::fs::rename(&tmp, &path)
            .await
            .map_err(ApiError::internal)
    }
    .await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    tracing::debug!(file = %raw, bytes = total, "cache upload stored");
    Ok(StatusCode::OK.into_response())
}

fn too_large(raw: &str, limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("{raw} is over the {limit}-byte limit for this kind of cache file"),
    )
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
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
