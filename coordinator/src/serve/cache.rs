//! The embedded Nix binary cache under `STATE/cache`: what `nix copy --to http://…/cache`
//! uploads and what agents substitute from. Every URL path is percent-decoded, then checked
//! against a strict allow-list, so nothing outside the cache folder can be read or written.
//! Uploads (`PUT`) need the upload token; files are streamed to a temporary name and renamed
//! into place, so a reader never sees half a file.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

/// What an upload is, for how it is made durable (docs/protocol.md §6.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `nar/…`: stored at once, synced in the background; durable before the 200 of any
    /// narinfo that names it.
    Nar,
    /// `HASH.narinfo`: the NAR it names, then itself, on disk before the 200.
    Narinfo,
    /// Anything else: on disk before its own 200.
    Other,
}

impl Kind {
    fn of(raw: &str) -> Self {
        if raw.starts_with("nar/") {
            Kind::Nar
        } else if !raw.contains('/') && raw.ends_with(".narinfo") {
            Kind::Narinfo
        } else {
            Kind::Other
        }
    }
}

/// `PUT /cache/…`: stores an upload from `nix copy --to http://…/cache`. Written to a temp
/// name and renamed, so a reader never sees half a file; on failure no temp file is left.
/// A narinfo, and the NAR it names, are on disk (fsynced, renamed, folders fsynced) before
/// the narinfo's 200, so an acknowledged store path survives a power loss; any other file
/// before its own 200. A NAR is synced in the background after its 200 (Nix uploads it
/// just before its narinfo, and a NAR no narinfo names is invisible to substituters), so
/// its sync overlaps the narinfo's upload and sync instead of adding to them.
pub(super) async fn put_cache(State(app): State<Arc<App>>, req: Request) -> ApiResult {
    use futures_util::StreamExt;
    check_token(&app, req.headers())?;
    let raw = raw_cache_path(req.uri().path()).to_owned();
    let path = resolve_request(&app, &raw)?;
    let kind = Kind::of(&raw);
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
                    // A narinfo (at most 1 MiB) stays whole in memory: it is read below.
                    if upload.buf.len() >= WRITE_CHUNK && kind != Kind::Narinfo {
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
    match kind {
        Kind::Nar => {
            let file = upload
                .store_unsynced(path.clone())
                .await
                .map_err(|e| ApiError::store(&what, e))?;
            app.nar_syncs.start(path, file, total);
        }
        Kind::Narinfo => {
            let nar = named_nar(&app, &upload.buf);
            let nar_ready = async {
                match &nar {
                    Some(n) => app.nar_syncs.durable(n).await,
                    None => Ok(()),
                }
            };
            let (nar_ready, synced) = tokio::join!(nar_ready, upload.sync());
            let upload = match (nar_ready, synced) {
                (Ok(()), Ok(u)) => u,
                (Err(refused), Ok(u)) => {
                    u.abandon().await;
                    return Err(refused);
                }
                (_, Err(e)) => return Err(ApiError::store(&what, e)),
            };
            upload
                .publish(path)
                .await
                .map_err(|e| ApiError::store(&what, e))?;
        }
        Kind::Other => {
            let upload = upload.sync().await.map_err(|e| ApiError::store(&what, e))?;
            upload
                .publish(path)
                .await
                .map_err(|e| ApiError::store(&what, e))?;
        }
    }
    tracing::debug!(file = %raw, bytes = total, "cache upload stored");
    Ok(StatusCode::OK.into_response())
}

/// The NAR a narinfo names (its `URL:`, when that is a file of this cache's `nar/`) and the
/// size it gives it (`FileSize:`).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct NamedNar {
    /// As written in the narinfo.
    url: String,
    path: PathBuf,
    size: Option<u64>,
}

fn named_nar(app: &App, narinfo: &[u8]) -> Option<NamedNar> {
    parse_named_nar(&app.store.cache_dir(), narinfo)
}

fn parse_named_nar(root: &Path, narinfo: &[u8]) -> Option<NamedNar> {
    let text = std::str::from_utf8(narinfo).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
            .map(str::trim)
    };
    let url = field("URL")?;
    if !url.starts_with("nar/") {
        return None;
    }
    let path = resolve(root, url).ok()?;
    Some(NamedNar {
        url: url.to_owned(),
        path,
        size: field("FileSize").and_then(|s| s.parse().ok()),
    })
}

/// Most finished NAR syncs remembered for the narinfo still to come.
const REMEMBERED_SYNCS: usize = 4096;

/// NAR uploads whose sync is running or done, by file, until a narinfo names them: the
/// narinfo waits for the sync.
#[derive(Default)]
pub(super) struct NarSyncs {
    running: Arc<Mutex<HashMap<PathBuf, Syncing>>>,
}

/// A NAR's background sync: its size and, once done, the outcome.
#[derive(Clone)]
struct Syncing {
    size: u64,
    done: tokio::sync::watch::Receiver<Option<Result<(), String>>>,
}

impl NarSyncs {
    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Syncing>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Syncs `file`, just renamed to `path`, and its folder, in the background, the two at
    /// once (the file system can then commit both in one go). If that fails the NAR is
    /// removed, so that no narinfo can be stored for it and the next `nix copy` (which asks
    /// whether the NAR is there first) uploads it again. A finished sync is remembered until
    /// a narinfo names the NAR (so it is not synced again: even a sync with nothing to write
    /// costs a disk cache flush), at most [`REMEMBERED_SYNCS`] of them.
    fn start(&self, path: PathBuf, file: std::fs::File, size: u64) {
        let (tx, done) = tokio::sync::watch::channel(None);
        let me = Syncing { size, done };
        {
            let mut running = self.running();
            if running.len() >= REMEMBERED_SYNCS {
                running.retain(|_, s| s.done.borrow().is_none());
            }
            running.insert(path.clone(), me.clone());
        }
        let running = self.running.clone();
        tokio::spawn(async move {
            let dir = path.parent().expect("a NAR has a folder").to_owned();
            let data = blocking_io({
                let path = path.clone();
                move || file.sync_all().map_err(store_io(&path))
            });
            let name = blocking_io(move || sync_dir(&dir));
            let r = match tokio::join!(data, name) {
                (Ok(()), Ok(())) => Ok(()),
                (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
            };
            if let Err(e) = &r {
                tracing::error!("syncing the uploaded {}: {e}; removed it", path.display());
                let p = path.clone();
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(p)).await;
                let mut running = running.lock().unwrap_or_else(|p| p.into_inner());
                if running
                    .get(&path)
                    .is_some_and(|s| s.done.same_channel(&me.done))
                {
                    running.remove(&path);
                }
            }
            let _ = tx.send(Some(r));
        });
    }

    /// Returns once `nar` is on disk, file and folder: at once when this process synced it
    /// already, else after its background sync, else (stored before a restart, perhaps
    /// before a power loss) after syncing it now. Refuses a NAR that is not there, or whose
    /// size is not the narinfo's `FileSize` (one cut short by a power loss before any
    /// narinfo named it: it is removed, so that the next `nix copy` uploads it again).
    async fn durable(&self, nar: &NamedNar) -> Result<(), ApiError> {
        let syncing = self.running().get(&nar.path).cloned();
        if let Some(mut s) = syncing {
            if nar.size.is_some_and(|want| want != s.size) {
                return Err(nar_damaged(nar, s.size, false));
            }
            let outcome = s.done.wait_for(Option::is_some).await.map(|o| o.clone());
            return match outcome {
                Ok(Some(Ok(()))) => {
                    let mut running = self.running();
                    if running
                        .get(&nar.path)
                        .is_some_and(|r| r.done.same_channel(&s.done))
                    {
                        running.remove(&nar.path);
                    }
                    Ok(())
                }
                Ok(Some(Err(e))) => Err(ApiError::internal(
                    &format!("syncing {} to disk", nar.url),
                    e,
                )),
                _ => Err(ApiError::internal(
                    &format!("syncing {} to disk", nar.url),
                    "the sync task stopped",
                )),
            };
        }
        let path = nar.path.clone();
        let want = nar.size;
        let checked = tokio::task::spawn_blocking(move || {
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Err(None)),
                Err(e) => return Err(store_io(&path)(e)),
            };
            let len = file.metadata().map_err(store_io(&path))?.len();
            if want.is_some_and(|want| want != len) {
                let _ = std::fs::remove_file(&path);
                return Ok(Err(Some(len)));
            }
            file.sync_all().map_err(store_io(&path))?;
            sync_dir(path.parent().expect("a NAR has a folder"))?;
            Ok(Ok(()))
        })
        .await
        .map_err(|e| ApiError::internal("checking a NAR", e))?;
        let what = format!("syncing {} to disk", nar.url);
        match checked.map_err(|e| ApiError::store(&what, e))? {
            Ok(()) => Ok(()),
            Err(None) => Err(ApiError::new(
                StatusCode::CONFLICT,
                "nar_missing",
                format!(
                    "the narinfo names {}, which is not in the cache: upload the NAR first \
                     (`nix copy` does)",
                    nar.url
                ),
            )),
            Err(Some(len)) => Err(nar_damaged(nar, len, true)),
        }
    }
}

fn nar_damaged(nar: &NamedNar, len: u64, removed: bool) -> ApiError {
    let size = nar.size.unwrap_or_default();
    let then = if removed {
        "; it was removed (cut short by a power loss before its narinfo?): run `nix copy` \
         again to upload it"
    } else {
        ""
    };
    ApiError::new(
        StatusCode::CONFLICT,
        "nar_damaged",
        format!(
            "the narinfo gives {} FileSize {size}, but the cache's file is {len} bytes{then}",
            nar.url
        ),
    )
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

    /// Writes the rest and fsyncs the temp file; on failure it is removed.
    async fn sync(self) -> Result<Self, StoreError> {
        blocking_io(move || {
            let mut me = self;
            let done = me.file.write_all(&me.buf).and_then(|()| me.file.sync_all());
            if let Err(e) = done {
                let _ = std::fs::remove_file(&me.tmp);
                return Err(store_io(&me.tmp)(e));
            }
            me.buf.clear();
            Ok(me)
        })
        .await
    }

    /// Renames the synced temp file to `path` and fsyncs the folder.
    async fn publish(self, path: PathBuf) -> Result<(), StoreError> {
        blocking_io(move || {
            if let Err(e) = std::fs::rename(&self.tmp, &path) {
                let _ = std::fs::remove_file(&self.tmp);
                return Err(store_io(&path)(e));
            }
            sync_dir(&self.dir)
        })
        .await
    }

    /// Writes the rest and renames the file to `path`, without syncing anything; returns
    /// the file, for [`NarSyncs::start`].
    async fn store_unsynced(self, path: PathBuf) -> Result<std::fs::File, StoreError> {
        blocking_io(move || {
            let mut me = self;
            let done = me
                .file
                .write_all(&me.buf)
                .map_err(store_io(&me.tmp))
                .and_then(|()| std::fs::rename(&me.tmp, &path).map_err(store_io(&path)));
            if let Err(e) = done {
                let _ = std::fs::remove_file(&me.tmp);
                return Err(e);
            }
            Ok(me.file)
        })
        .await
    }

    async fn abandon(self) {
        let tmp = self.tmp;
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(tmp)).await;
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(store_io(dir))
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
