//! The connection front: accepts connections, answers agents' manifest polls itself, and
//! hands every other request to hyper and the axum router.
//!
//! Why: an agent keeps one connection open and, with long-poll, a request held on it almost
//! all the time. hyper reserves an 8 KiB read buffer and an 8 KiB write buffer for every
//! HTTP/1.1 connection, and the held request's future, header map and timers come on top:
//! about 23 KiB per idle agent, 230 MiB for 10,000 of them. Here a held poll is the socket, a
//! `watch` receiver and a timer (the request head is parsed from a small buffer that is freed
//! before the hold), so a coordinator holds a fleet's polls in a few KiB each.
//!
//! What the front answers itself: `GET /v1/nodes/{node}/manifest[?wait=S]` over HTTP/1.1
//! without a body, for a node that has a manifest — through the same [`begin_get`] and
//! [`hold`] as axum's handler, with the same headers and request counters; and, over plain
//! TCP, `GET /cache/…` of a file the cache holds, sent with sendfile(2) (the same headers as
//! the router's answer). Any other HTTP/1.1 request with a known length (reports, uploads,
//! `/v1/fleet`, cache misses) goes to hyper for exactly that request: hyper reads the
//! request and then the end of the stream, answers, and gives the connection back, which
//! stays open for the agent's next poll. hyper's buffers live only while it answers. What
//! the front cannot delimit (HTTP/1.0, chunked bodies, upgrades, `connection: close`,
//! HTTP/2) goes to hyper for the rest of the connection: one request for HTTP/1.
//!
//! The front is also the gate: it parses every HTTP/1 head hyper will see and refuses, with
//! the JSON error body of every other answer, what hyper would refuse with an empty one
//! (malformed heads, bad `Content-Length` or `Transfer-Encoding`, heads or targets over
//! the limits), and a declared body over the manifest or report route's limit before it
//! is read.
//!
//! [`begin_get`]: manifests::begin_get
//! [`hold`]: manifests::hold

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use hyper_util::service::TowerToHyperService;
use roost_common::wire::v1::http as v1;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::cache::{self, CACHE_PREFIX, CacheFile};
use super::error::ApiError;
use super::manifests::{self, Answer, MANIFEST_ROUTE, Step};
use super::reports::{MAX_REPORT_BYTES, REPORTS_ROUTE};
use super::state::App;

/// Longest request head accepted (431 above it); nginx's default is 4 × 8 KiB.
const MAX_HEAD: usize = 64 * 1024;
/// Most header lines a request may have (hyper's own limit).
const MAX_HEADERS: usize = 100;
/// Longest request target (414 above it): agents' and Nix's are a few hundred bytes.
const MAX_TARGET: usize = 16 * 1024;
/// Bytes a client may pipeline behind a held poll before the connection is dropped.
const MAX_PIPELINED: usize = 16 * 1024;
/// What starts an HTTP/2 connection without TLS ("prior knowledge"): hyper's.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Most bytes one sendfile(2) call sends, so one fast download cannot hold a worker thread
/// for long (nginx's `sendfile_max_chunk` default).
const SENDFILE_CHUNK: usize = 2 << 20;
/// What the front's answers are counted as in `/metrics`: what the router counts them as.
const MANIFEST_GET: &str = "GET /v1/nodes/{node}/manifest";
const CACHE_GET: &str = "GET /cache/{*path}";

/// After refusing a request whose body may still be coming, how long and how much of it is
/// read and dropped before closing, so the client reads the answer instead of a reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// A client connection. Plain TCP can send a file with sendfile(2), straight from the page
/// cache to the socket; TLS has to encrypt, so its files go through hyper.
pub(super) trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The TCP socket, when what is written to it reaches the client unchanged.
    fn plain(&self) -> Option<&TcpStream>;
}

impl Conn for TcpStream {
    fn plain(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl<IO: Conn> Conn for tokio_rustls::server::TlsStream<IO> {
    fn plain(&self) -> Option<&TcpStream> {
        None
    }
}

/// What every connection shares.
pub(super) struct Front {
    app: Arc<App>,
    router: Router,
    /// hyper for connections it keeps (HTTP/1.0, chunked bodies, HTTP/2, …).
    keep: auto::Builder<TokioExecutor>,
    /// hyper for one HTTP/1.1 request, after which the front takes the connection back.
    one: http1::Builder,
}

impl Front {
    pub fn new(app: Arc<App>, router: Router) -> Self {
        let mut keep = auto::Builder::new(TokioExecutor::new());
        // Slow clients: a request head (including the first one after an idle keep-alive)
        // must arrive within the header timeout, or the connection is closed.
        // One HTTP/1 request, then the connection closes: every request head hyper parses
        // is one the front has checked (and answers errors to as JSON).
        keep.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(app.cfg.header_timeout)
            .keep_alive(false);
        let mut one = http1::Builder::new();
        // The end of the stream after the request is the front's doing, not the client
        // leaving: hyper must still answer.
        one.half_close(true)
            .timer(TokioTimer::new())
            .header_read_timeout(app.cfg.header_timeout);
        Self {
            keep,
            one,
            router,
            app,
        }
    }

    /// How long a request head (or a TLS handshake) may take.
    pub fn header_timeout(&self) -> Duration {
        self.app.cfg.header_timeout
    }

    /// Serves one connection until the client or the server ends it.
    pub async fn serve<IO: Conn>(&self, mut io: IO, watcher: Watcher) {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let sendfile = io.plain().is_some();
            let next = match self.read_head(&mut io, &mut buf, sendfile).await {
                Some(n) => n,
                None => return,
            };
            let next = match next {
                Next::CacheFile { raw, len, close } => match cache::open(&self.app, &raw).await {
                    Ok(Some(file)) => {
                        consume(&mut buf, len);
                        if !self.send_file(&mut io, file, close).await {
                            return;
                        }
                        self.app.count_request(CACHE_GET, 200);
                        if close {
                            let _ = io.shutdown().await;
                            return;
                        }
                        continue;
                    }
                    // No such file, or a name the cache refuses: the router answers, as
                    // it does on every other connection.
                    _ if close => Next::Other,
                    _ => Next::Once { len: len as u64 },
                },
                n => n,
            };
            let (step, head_len, close) = match next {
                Next::Manifest { step, len, close } => (step, len, close),
                // Boxed: hyper's connection state is large, and a future is as large as its
                // largest state; connections the front keeps never pay for it.
                Next::Once { len } => {
                    let prefix = std::mem::take(&mut buf);
                    match Box::pin(self.once(io, prefix, len)).await {
                        Some((back, rest)) => {
                            io = back;
                            buf = rest;
                            continue;
                        }
                        None => return,
                    }
                }
                Next::Other => {
                    return Box::pin(self.hand_off(io, buf, watcher)).await;
                }
                Next::Refuse { error, route } => {
                    self.app.count_request(&route, error.status().as_u16());
                    // An upload or report refused before it was read is logged as those the
                    // router refuses are (`observe.rs`).
                    if route.starts_with("PUT ") || route.starts_with("POST ") {
                        let status = error.status().as_u16();
                        tracing::warn!(
                            route,
                            status,
                            code = error.code,
                            "refused: {}",
                            error.message
                        );
                    }
                    return Box::pin(self.refuse(io, &error)).await;
                }
                Next::CacheFile { .. } => unreachable!("answered above"),
            };
            consume(&mut buf, head_len);
            let answer = match step {
                Step::Answer(a) => a,
                Step::Hold(h) => {
                    tokio::select! {
                        a = manifests::hold(&self.app, h) => a,
                        () = closed(&mut io, &mut buf) => return,
                    }
                }
            };
            self.app
                .count_request(MANIFEST_GET, answer.status().as_u16());
            let bytes = encode(&answer, close);
            if !self.write(&mut io, &bytes).await {
                return;
            }
            if close {
                let _ = io.shutdown().await;
                return;
            }
        }
    }

    /// Writes `bytes` within the body timeout; false: the connection is done.
    async fn write<IO: Conn>(&self, io: &mut IO, bytes: &[u8]) -> bool {
        let write = async {
            io.write_all(bytes).await?;
            io.flush().await
        };
        matches!(
            tokio::time::timeout(self.app.cfg.body_timeout, write).await,
            Ok(Ok(()))
        )
    }

    /// Sends a cache file as the router would answer it (same headers), its body with
    /// sendfile(2): no copy through this process, no buffer, however many download at once.
    /// False: the connection is done (the client left or stopped reading).
    async fn send_file<IO: Conn>(&self, io: &mut IO, f: CacheFile, close: bool) -> bool {
        let mut head = Vec::with_capacity(256);
        let content_type = HeaderValue::from_static(f.content_type);
        response_head(
            &mut head,
            StatusCode::OK,
            &[(header::CONTENT_TYPE, content_type)],
            Some(f.len),
            close,
        );
        if !self.write(io, &head).await {
            return false;
        }
        let Some(tcp) = io.plain() else {
            return false;
        };
        match sendfile(tcp, &f.file, f.len, self.app.cfg.body_timeout).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!("cache download ended: {e}");
                false
            }
        }
    }

    /// Answers a request refused before it was read, then closes the connection.
    async fn refuse<IO: Conn>(&self, mut io: IO, error: &ApiError) {
        let body = error.body();
        let mut out = Vec::with_capacity(256 + body.len());
        let json = HeaderValue::from_static("application/json");
        response_head(
            &mut out,
            error.status(),
            &[(header::CONTENT_TYPE, json)],
            Some(body.len() as u64),
            true,
        );
        out.extend_from_slice(body.as_bytes());
        if self.write(&mut io, &out).await {
            let _ = io.shutdown().await;
            // Drop what the client still sends (the body of a refused upload, say), so
            // that it reads this answer rather than a connection reset.
            let mut sink = [0u8; 4096];
            let mut left = LINGER_BYTES;
            let _ = tokio::time::timeout(LINGER, async {
                while left > 0 {
                    match io.read(&mut sink).await {
                        Ok(n) if n > 0 => left = left.saturating_sub(n),
                        _ => return,
                    }
                }
            })
            .await;
        }
    }

    /// Reads until `buf` holds a whole request head and says what it is; `None`: the
    /// connection is to be closed (the client left, the head timed out, or the server is
    /// shutting down between requests).
    async fn read_head<IO>(&self, io: &mut IO, buf: &mut Vec<u8>, sendfile: bool) -> Option<Next>
    where
        IO: AsyncRead + Unpin,
    {
        let deadline = Instant::now() + self.header_timeout();
        loop {
            if !buf.is_empty() {
                match classify(&self.app, buf, sendfile) {
                    Parsed::Partial => {}
                    Parsed::Done(next) => return Some(next),
                }
            }
            if buf.capacity() - buf.len() < 512 {
                buf.reserve(1024);
            }
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline, io.read_buf(buf)) => r,
                // Between requests a stopping server just closes the connection.
                () = self.app.shutdown.cancelled(), if buf.is_empty() => return None,
            };
            match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }

    /// Gives the connection, with the bytes already read, to hyper for good.
    async fn hand_off<IO: Conn>(&self, io: IO, prefix: Vec<u8>, watcher: Watcher) {
        let io = TokioIo::new(Rewind::new(io, prefix, None, self.app.cfg.body_timeout));
        let service = TowerToHyperService::new(self.router.clone());
        let conn = self.keep.serve_connection(io, service);
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!("connection ended: {e}");
        }
    }

    /// Lets hyper answer exactly one request (`len` bytes, head and body, starting with
    /// `prefix`) and takes the connection back, with any bytes the client sent after it.
    /// hyper sees the end of the stream after the request; allowed to half-close, it answers
    /// and then ends the connection without shutting it. `None`: the connection is done
    /// (hyper failed, or did not read the whole request, so where the next one starts is
    /// unknown).
    async fn once<IO: Conn>(&self, io: IO, prefix: Vec<u8>, len: u64) -> Option<(IO, Vec<u8>)> {
        let io = TokioIo::new(Rewind::new(
            io,
            prefix,
            Some(len),
            self.app.cfg.body_timeout,
        ));
        let service = TowerToHyperService::new(self.router.clone());
        let parts = match self
            .one
            .serve_connection(io, service)
            .without_shutdown()
            .await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!("connection ended: {e}");
                return None;
            }
        };
        // hyper could read no further than the request, so bytes it left unread belong to
        // the request too: then, as when it did not read all of it, the next request's start
        // is unknown.
        let rewind = parts.io.into_inner();
        if rewind.limit != Some(0) || !parts.read_buf.is_empty() {
            return None;
        }
        Some((rewind.inner, rewind.prefix.to_vec()))
    }
}

/// The next request on a connection.
enum Next {
    /// A manifest poll the front answers: its first step, the head's length, and whether the
    /// client asked to close the connection after it.
    Manifest { step: Step, len: usize, close: bool },
    /// A cache download over plain TCP, which the front sends with sendfile(2) when the file
    /// exists: the path after `/cache/`, the head's length, and `connection: close`.
    CacheFile {
        raw: String,
        len: usize,
        close: bool,
    },
    /// An HTTP/1.1 request of `len` bytes (head and body): hyper answers it, the front
    /// takes the connection back.
    Once { len: u64 },
    /// A request the front cannot delimit (HTTP/1.0, chunked body, upgrade,
    /// `connection: close`, HTTP/2): hyper answers it and, for HTTP/1, closes.
    Other,
    /// A request refused before its body is read (a head that is not valid HTTP/1.1, or a
    /// declared body over its route's limit), counted under `route`.
    Refuse { error: ApiError, route: String },
}

enum Parsed {
    Partial,
    Done(Next),
}

fn refuse(status: StatusCode, code: &'static str, message: String) -> Parsed {
    Parsed::Done(Next::Refuse {
        error: ApiError::new(status, code, message),
        route: "malformed".into(),
    })
}

/// Parses the head in `buf`, refuses what hyper would refuse with an empty body (so every
/// error is JSON) or what is over its route's body limit, and, for a manifest poll of a
/// known node, takes its first step (while the head is still borrowed). Every request it
/// passes on is one hyper parses without error.
fn classify(app: &App, buf: &[u8], sendfile: bool) -> Parsed {
    if H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
        return if buf.len() >= H2_PREFACE.len() {
            Parsed::Done(Next::Other)
        } else {
            Parsed::Partial
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        Ok(httparse::Status::Partial) => {
            return refuse(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "head_too_large",
                format!("the request head is over the {MAX_HEAD}-byte limit"),
            );
        }
        Err(httparse::Error::TooManyHeaders) => {
            return refuse(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "too_many_headers",
                format!("the request has more than {MAX_HEADERS} header lines"),
            );
        }
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "malformed_request",
                format!("the request head is not valid HTTP/1.1: {e}"),
            );
        }
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "malformed_request",
            "the request line is incomplete".into(),
        );
    };
    if target.len() > MAX_TARGET {
        return refuse(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!("the request target is over the {MAX_TARGET}-byte limit"),
        );
    }
    if axum::http::Uri::try_from(target).is_err() {
        let shown: String = target.chars().take(200).collect();
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_target",
            format!("the request target `{shown}` is not a valid URI"),
        );
    }
    let h = match RequestHeaders::read(req.headers, version) {
        Ok(h) => h,
        Err(e) => {
            return Parsed::Done(Next::Refuse {
                error: e,
                route: "malformed".into(),
            });
        }
    };
    let body = h.length.unwrap_or(0);
    let Some(total) = (head as u64).checked_add(body) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "bad_content_length",
            "the request head and its Content-Length add up to more than 2^64 bytes".into(),
        );
    };
    if let Some((route, limit)) = body_limit(method, target) {
        if body > limit as u64 {
            return Parsed::Done(Next::Refuse {
                error: ApiError::too_large(limit),
                route: format!("{method} {route}"),
            });
        }
    }
    let bodiless = body == 0 && !h.chunked && !h.expect;
    if version == 1 && method == "GET" && bodiless && !h.upgrade {
        if let Some(step) = poll_step(app, target, req.headers) {
            return Parsed::Done(Next::Manifest {
                step,
                len: head,
                close: h.close,
            });
        }
        if let Some(raw) = target.strip_prefix(CACHE_PREFIX).filter(|_| sendfile) {
            let raw = raw.split_once('?').map_or(raw, |(p, _)| p);
            return Parsed::Done(Next::CacheFile {
                raw: raw.to_owned(),
                len: head,
                close: h.close,
            });
        }
    }
    if version != 1 || h.chunked || h.upgrade || h.close {
        return Parsed::Done(Next::Other);
    }
    Parsed::Done(Next::Once { len: total })
}

/// What the front needs of a request's headers, checked as hyper checks them.
struct RequestHeaders {
    length: Option<u64>,
    chunked: bool,
    upgrade: bool,
    expect: bool,
    close: bool,
}

impl RequestHeaders {
    fn read(headers: &[httparse::Header<'_>], version: u8) -> Result<Self, ApiError> {
        let bad = |code, message: String| Err(ApiError::bad_request(code, message));
        let mut h = Self {
            length: None,
            chunked: false,
            upgrade: false,
            expect: false,
            close: false,
        };
        let mut coding: Option<&[u8]> = None;
        for hd in headers {
            let name = hd.name;
            if name.eq_ignore_ascii_case(header::CONTENT_LENGTH.as_str()) {
                let Some(n) = parse_length(hd.value) else {
                    return bad(
                        "bad_content_length",
                        format!(
                            "Content-Length `{}` is not a length (decimal digits, at most 2^63 - 1)",
                            String::from_utf8_lossy(hd.value)
                                .chars()
                                .take(40)
                                .collect::<String>()
                        ),
                    );
                };
                if h.length.replace(n).is_some() {
                    return bad("bad_content_length", "Content-Length is given twice".into());
                }
            } else if name.eq_ignore_ascii_case(header::TRANSFER_ENCODING.as_str()) {
                // The codings of several headers form one list; what matters is the last.
                if let Some(last) = hd
                    .value
                    .rsplit(|&b| b == b',')
                    .map(<[u8]>::trim_ascii)
                    .next()
                {
                    coding = Some(last);
                }
            } else if name.eq_ignore_ascii_case(header::UPGRADE.as_str()) {
                h.upgrade = true;
            } else if name.eq_ignore_ascii_case(header::EXPECT.as_str()) {
                h.expect = true;
            } else if name.eq_ignore_ascii_case(header::CONNECTION.as_str()) {
                h.close |= hd
                    .value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            }
        }
        if let Some(coding) = coding {
            if version == 0 {
                return bad(
                    "bad_transfer_encoding",
                    "Transfer-Encoding is not allowed in an HTTP/1.0 request".into(),
                );
            }
            if !coding.eq_ignore_ascii_case(b"chunked") {
                return Err(ApiError::new(
                    StatusCode::NOT_IMPLEMENTED,
                    "unsupported_transfer_encoding",
                    "the request's Transfer-Encoding does not end in `chunked`, the only one supported",
                ));
            }
            if h.length.is_some() {
                return bad(
                    "bad_content_length",
                    "a request may not have both Content-Length and Transfer-Encoding".into(),
                );
            }
            h.chunked = true;
        }
        Ok(h)
    }
}

/// A Content-Length value: decimal digits only, at most `i64::MAX` (what hyper accepts).
fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(v).ok()?.parse().ok()?;
    (n <= i64::MAX as u64).then_some(n)
}

/// The routes whose bodies are small and read whole, with their limits: a declared body
/// over the limit is refused at once (no `100 Continue`, no wait for the body).
fn body_limit(method: &str, target: &str) -> Option<(&'static str, usize)> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    match method {
        "PUT" if v1::manifest_node(path).is_some() => {
            Some((MANIFEST_ROUTE, v1::MAX_MANIFEST_BYTES))
        }
        "POST" if v1::reports_node(path).is_some() => Some((REPORTS_ROUTE, MAX_REPORT_BYTES)),
        _ => None,
    }
}

/// The first step of a manifest poll of a known node, if `req` is one.
fn poll_step(app: &App, target: &str, headers: &[httparse::Header<'_>]) -> Option<Step> {
    let (node, wait) = manifest_target(target)?;
    let node = node.parse().ok()?;
    let inm = headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case(header::IF_NONE_MATCH.as_str()))
        .map(|h| h.value);
    manifests::begin_get(app, &node, inm, wait)
}

/// `/v1/nodes/{node}/manifest[?wait=S]` → the node and the wait; `None` for any other
/// target, or one the front would have to decode (percent-escapes, a malformed `wait`, a
/// repeated `wait`): axum decides those.
fn manifest_target(target: &str) -> Option<(&str, Option<u64>)> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let node = v1::manifest_node(path)?;
    if node.contains('%') {
        return None;
    }
    let mut wait = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if pair.contains(['%', '+']) {
            return None;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == v1::WAIT_PARAM {
            if wait.is_some() {
                return None;
            }
            wait = Some(v.parse::<u64>().ok()?);
        }
    }
    Some((node, wait))
}

/// The answer as HTTP/1.1 bytes: the same status, headers and body as axum's handler gives,
/// plus `content-length` and `date` as hyper adds them.
fn encode(answer: &Answer, close: bool) -> Vec<u8> {
    let status = answer.status();
    let body = answer.body();
    let mut out = Vec::with_capacity(256 + body.len());
    let length = (status != StatusCode::NOT_MODIFIED).then_some(body.len() as u64);
    response_head(&mut out, status, &answer.headers(), length, close);
    out.extend_from_slice(&body);
    out
}

/// A response head as hyper writes it: status line, `headers`, `content-length` (when
/// given), `connection: close` (when closing) and `date`.
fn response_head(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &[(HeaderName, HeaderValue)],
    length: Option<u64>,
    close: bool,
) {
    use std::io::Write;
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(n) = length {
        let _ = write!(out, "content-length: {n}\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let _ = write!(
        out,
        "date: {}\r\n\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now())
    );
}

/// Drops a request head that was answered from `buf`; frees the buffer when nothing of the
/// client's is left in it (a held poll then keeps no buffer).
fn consume(buf: &mut Vec<u8>, len: usize) {
    buf.drain(..len);
    if buf.is_empty() {
        *buf = Vec::new();
    }
}

/// Sends `len` bytes of `file` to `tcp` with sendfile(2). The kernel copies from the page
/// cache to the socket; this only waits for the socket to take more. Fails when the client
/// takes nothing for `stall`.
async fn sendfile(
    tcp: &TcpStream,
    file: &std::fs::File,
    len: u64,
    stall: Duration,
) -> io::Result<()> {
    let len = i64::try_from(len).map_err(|_| io::Error::other("the file is too large"))?;
    let mut offset: i64 = 0;
    while offset < len {
        let count = usize::try_from(len - offset)
            .unwrap_or(usize::MAX)
            .min(SENDFILE_CHUNK);
        let send = tcp.async_io(Interest::WRITABLE, || {
            nix::sys::sendfile::sendfile(tcp, file, Some(&mut offset), count)
                .map_err(io::Error::from)
        });
        match tokio::time::timeout(stall, send).await {
            Ok(Ok(0)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file got shorter while it was sent",
                ));
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client read nothing for {stall:?}"),
                ));
            }
        }
        // A client as fast as loopback never makes the socket wait: let others run.
        tokio::task::yield_now().await;
    }
    Ok(())
}

/// Resolves when the client closes the connection (or it fails) while a poll is held. Bytes
/// it sends meanwhile (a pipelined request) are kept for after the answer, within a limit.
async fn closed<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 256];
    loop {
        match io.read(&mut chunk).await {
            Ok(n) if n > 0 && buf.len() + n <= MAX_PIPELINED => {
                buf.extend_from_slice(&chunk[..n]);
            }
            _ => return,
        }
    }
}

/// A connection handed to hyper: the bytes the front already read come first; with a
/// `limit`, hyper reads that many bytes (one request) and then the end of the stream; and a
/// write that cannot make progress for `stall` (a client that stopped reading the response)
/// fails, which ends the connection.
struct Rewind<T> {
    prefix: Bytes,
    inner: T,
    /// Bytes hyper may still read (`None`: no limit).
    limit: Option<u64>,
    stall: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Rewind<T> {
    fn new(inner: T, prefix: Vec<u8>, limit: Option<u64>, stall: Duration) -> Self {
        Self {
            prefix: Bytes::from(prefix),
            inner,
            limit,
            stall,
            stalled: None,
        }
    }

    /// Passes a write's result on; while it is pending, counts towards the stall limit.
    fn watch<R>(&mut self, cx: &mut Context<'_>, p: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if p.is_ready() {
            self.stalled = None;
            return p;
        }
        let stall = self.stall;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        if timer.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {stall:?}"),
            )));
        }
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = match self.limit {
            Some(0) => return Poll::Ready(Ok(())),
            Some(left) => usize::try_from(left)
                .unwrap_or(usize::MAX)
                .min(buf.remaining()),
            None => buf.remaining(),
        };
        let n = if !self.prefix.is_empty() {
            let n = self.prefix.len().min(room);
            buf.put_slice(&self.prefix[..n]);
            self.prefix = self.prefix.slice(n..);
            n
        } else if room == buf.remaining() {
            let before = buf.filled().len();
            std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
            buf.filled().len() - before
        } else {
            // Near the end of the request: read no further than it, straight into hyper's
            // buffer cut to what is left (once in 1 KiB pieces: the last few hundred KiB of
            // every upload took hundreds of reads).
            let mut limited = ReadBuf::new(buf.initialize_unfilled_to(room));
            std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, &mut limited))?;
            let n = limited.filled().len();
            buf.advance(n);
            n
        };
        if let Some(left) = self.limit.as_mut() {
            *left -= n as u64;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, p)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, p)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, p)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_targets_are_recognised_and_anything_to_decode_is_left_to_axum() {
        assert_eq!(manifest_target("/v1/nodes/pi/manifest"), Some(("pi", None)));
        assert_eq!(
            manifest_target("/v1/nodes/pi/manifest?wait=300"),
            Some(("pi", Some(300)))
        );
        assert_eq!(
            manifest_target("/v1/nodes/pi/manifest?x=1&wait=5&"),
            Some(("pi", Some(5)))
        );
        for other in [
            "/v1/nodes/pi/reports",
            "/v1/nodes//manifest",
            "/v1/nodes/a/b/manifest",
            "/v1/nodes/p%69/manifest",
            "/v1/nodes/pi/manifest?wait=abc",
            "/v1/nodes/pi/manifest?wait=1&wait=2",
            "/v1/nodes/pi/manifest?wait=%31",
            "/v1/fleet",
            "/cache/nix-cache-info",
        ] {
            assert_eq!(manifest_target(other), None, "{other}");
        }
    }

    #[tokio::test]
    async fn near_the_end_of_a_request_rewind_reads_what_is_left_in_one_read() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        a.write_all(&[1u8; 300 * 1024]).await.unwrap();
        let mut r = Rewind::new(b, Vec::new(), Some(200 * 1024), Duration::from_secs(5));
        let mut buf = vec![0u8; 400 * 1024];
        let n = r.read(&mut buf).await.unwrap();
        assert_eq!(n, 200 * 1024, "one read up to the request's end");
        assert_eq!(
            r.read(&mut buf).await.unwrap(),
            0,
            "then the end of the stream"
        );
    }

    #[test]
    fn the_fronts_counters_are_the_routers() {
        use super::super::cache::CACHE_ROUTE;
        assert_eq!(MANIFEST_GET, format!("GET {MANIFEST_ROUTE}"));
        assert_eq!(CACHE_GET, format!("GET {CACHE_ROUTE}"));
    }

    #[tokio::test]
    async fn rewind_replays_the_prefix_then_reads_the_connection() {
        let (mut a, b) = tokio::io::duplex(64);
        a.write_all(b" world").await.unwrap();
        drop(a);
        let mut r = Rewind::new(b, b"hello".to_vec(), None, Duration::from_secs(5));
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "hello world");
    }
}
