//! The embedded Nix binary cache under `STATE/cache`: what `nix copy --to http://…/cache`
//! uploads and what agents substitute from. Every URL path is percent-decoded, then checked
//! against a strict allow-list, so nothing outside the cache folder can be read or written.
//! Uploads (`PUT`) need the upload token; files are streamed to a temporary name and renamed
//! into place, so a reader never sees half a file.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use roost_common::wire::v1::http::{MAX_CACHE_FILE_BYTES, route};

use super::auth;
use super::error::{ApiError, ApiResult};
use super::state::App;
use super::store::StoreError;

/// `nix-cache-info` served when none was uploaded.
pub const DEFAULT_CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";

/// The route of the cache's files.
pub(super) const CACHE_ROUTE: &str = route::CACHE;

/// What a cache file's URL path starts with: `/cache/`.
pub(super) use roost_common::wire::v1::http::CACHE_PREFIX;

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

fn check_token(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(want) = &app.cfg.upload_token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "read_only",
            "this coordinator has no --upload-token-file: the cache is read-only",
        ));
    };
    auth::check(
        headers,
        want,
        "cache uploads need the upload token (HTTP Basic password, e.g. from a netrc file, or Bearer)",
    )
}

/// The raw, still percent-encoded part of the request path after `/cache/`.
fn raw_cache_path(req_path: &str) -> &str {
    req_path.strip_prefix(CACHE_PREFIX).unwrap_or("")
}

fn resolve_request(app: &App, raw: &str) -> Result<PathBuf, ApiError> {
    resolve(&app.store.cache_dir(), raw)
        .map_err(|e| ApiError::bad_request("bad_path", e.to_string()))
}

/// A cache file ready to send.
pub(super) struct CacheFile {
    pub file: std::fs::File,
    pub len: u64,
    pub content_type: &'static str,
}

/// Opens the cache file at `raw` (the path after `/cache/`, still percent-encoded); `None`
/// when there is none.
pub(super) async fn open(app: &App, raw: &str) -> Result<Option<CacheFile>, ApiError> {
    let path = resolve_request(app, raw)?;
    let content_type = content_type(&path);
    let opened = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)?;
        let meta = file.metadata()?;
        Ok::<_, std::io::Error>(meta.is_file().then_some((file, meta.len())))
    })
    .await
    .map_err(|e| ApiError::internal("opening a cache file", e))?;
    match opened {
        Ok(Some((file, len))) => Ok(Some(CacheFile {
            file,
            len,
            content_type,
        })),
        Ok(None) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ApiError::internal(&format!("opening cache file {raw}"), e)),
    }
}

/// Read size when hyper streams a file (TLS connections, HTTP/1.0): large reads, few
/// wake-ups. Plain HTTP/1.1 downloads go through the connection front's sendfile instead.
const STREAM_CHUNK: usize = 256 * 1024;

/// `GET /cache/…` (and `HEAD`): a file of the cache, streamed.
pub(super) async fn get_cache(State(app): State<Arc<App>>, req: Request) -> ApiResult {
    let raw = raw_cache_path(req.uri().path()).to_owned();
    let Some(f) = open(&app, &raw).await? else {
        if raw == "nix-cache-info" {
            return Ok((
                [(header::CONTENT_TYPE, "text/x-nix-cache-info")],
                DEFAULT_CACHE_INFO,
            )
                .into_response());
        }
        return Err(ApiError::not_found(
            "not_found",
            format!("{raw} is not in the cache"),
        ));
    };
    let file = tokio::fs::File::from_std(f.file);
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file,
        STREAM_CHUNK,
    ));
    Ok((
        [
            (header::CONTENT_TYPE, f.content_type.to_owned()),
            (header::CONTENT_LENGTH, f.len.to_string()),
        ],
        body,
    )
        .into_response())
}

/// Bytes of an upload gathered before each write to disk: one blocking-pool hop per MiB
/// instead of one per network read.
const WRITE_CHUNK: usize = 1 << 20;

/// `PUT /cache/…`: stores an upload from `nix copy --to http://…/cache`. The file is on disk
/// (written to a temp name, fsynced, renamed, its folder fsynced) before the answer, so an
/// acknowledged NAR or narinfo survives a power loss; on failure no temp file is left.
pub(super) async fn put_cache(State(app): State<Arc<App>>, req: Request) -> ApiResult {
    use futures_util::StreamExt;
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
    let what = format!("storing cache file {raw}");
    let dir = path.parent().expect("cache files have a folder").to_owned();
    let tmp = dir.join(format!(".upload-{}-{}", std::process::id(), next_id()));
    let mut upload = Upload::create(dir, tmp)
        .await
        .map_err(|e| ApiError::store(&what, e))?;
    let mut stream = req.into_body().into_data_stream();
    let mut total = 0u64;
    let idle = app.cfg.body_timeout;
    loop {
        let refused = match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(Ok(chunk))) => {
                total += chunk.len() as u64;
                if total <= limit {
                    upload.buf.extend_from_slice(&chunk);
                    if upload.buf.len() >= WRITE_CHUNK {
                        upload = upload
                            .flush()
                            .await
                            .map_err(|e| ApiError::store(&what, e))?;
                    }
                    continue;
                }
                too_large(&raw, limit)
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => ApiError::bad_request("bad_body", e.to_string()),
            Err(_) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("upload of {raw} stalled for {} s", idle.as_secs()),
            ),
        };
        upload.abandon().await;
        return Err(refused);
    }
    upload
        .finish(path)
        .await
        .map_err(|e| ApiError::store(&what, e))?;
    tracing::debug!(file = %raw, bytes = total, "cache upload stored");
    Ok(StatusCode::OK.into_response())
}

/// An upload being written to its temp file.
struct Upload {
    dir: PathBuf,
    tmp: PathBuf,
    file: std::fs::File,
    buf: Vec<u8>,
}

impl Upload {
    async fn create(dir: PathBuf, tmp: PathBuf) -> Result<Self, StoreError> {
        blocking_io(move || {
            std::fs::create_dir_all(&dir).map_err(store_io(&dir))?;
            let file = std::fs::File::create(&tmp).map_err(store_io(&tmp))?;
            Ok(Self {
                dir,
                tmp,
                file,
                buf: Vec::with_capacity(WRITE_CHUNK + 64 * 1024),
            })
        })
        .await
    }

    /// Writes what was gathered; on failure the temp file is removed.
    async fn flush(self) -> Result<Self, StoreError> {
        blocking_io(move || {
            let mut me = self;
            if let Err(e) = me.file.write_all(&me.buf) {
                let _ = std::fs::remove_file(&me.tmp);
                return Err(store_io(&me.tmp)(e));
            }
            me.buf.clear();
            Ok(me)
        })
        .await
    }

    /// Writes the rest, fsyncs, renames to `path` and fsyncs the folder.
    async fn finish(self, path: PathBuf) -> Result<(), StoreError> {
        blocking_io(move || {
            let mut me = self;
            let done = me
                .file
                .write_all(&me.buf)
                .and_then(|()| me.file.sync_all())
                .map_err(store_io(&me.tmp))
                .and_then(|()| std::fs::rename(&me.tmp, &path).map_err(store_io(&path)));
            if let Err(e) = done {
                let _ = std::fs::remove_file(&me.tmp);
                return Err(e);
            }
            std::fs::File::open(&me.dir)
                .and_then(|d| d.sync_all())
                .map_err(store_io(&me.dir))
        })
        .await
    }

    async fn abandon(self) {
        let tmp = self.tmp;
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(tmp)).await;
    }
}

fn store_io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

async fn blocking_io<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(StoreError::Write(std::io::Error::other(e))))
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
