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
//! [`hold`] as axum's handler, with the same headers and request counters. Any other
//! HTTP/1.1 request with a known length (reports, uploads, `/v1/fleet`, cache files) goes to
//! hyper for exactly that request: hyper reads the request and then the end of the stream,
//! answers, and gives the connection back, which stays open for the agent's next poll.
//! hyper's buffers live only while it answers. What the front cannot delimit (HTTP/1.0,
//! chunked bodies, upgrades, HTTP/2, `connection: close`, heads it cannot parse) goes to
//! hyper for the rest of the connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::header;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use hyper_util::service::TowerToHyperService;
use roost_common::wire::v1::http as v1;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use super::manifests::{self, Answer, Step};
use super::server::{App, MANIFEST_ROUTE};

/// A request head longer than this is not an agent's poll: hyper gets it.
const MAX_LEAN_HEAD: usize = 8 * 1024;
/// Most headers an agent's poll carries (more: hyper gets it).
const MAX_HEADERS: usize = 24;
/// Bytes a client may pipeline behind a held poll before the connection is dropped.
const MAX_PIPELINED: usize = 16 * 1024;

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
        keep.http1()
            .timer(TokioTimer::new())
            .header_read_timeout(app.cfg.header_timeout);
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
    pub async fn serve<IO>(&self, mut io: IO, watcher: Watcher)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let next = match self.read_head(&mut io, &mut buf).await {
                Some(n) => n,
                None => return,
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
            };
            buf.drain(..head_len);
            if buf.is_empty() {
                // Nothing of the client's stays in memory while the poll is held.
                buf = Vec::new();
            }
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
                .count_request(format!("GET {MANIFEST_ROUTE}"), answer.status().as_u16());
            let bytes = encode(&answer, close);
            let write = async {
                io.write_all(&bytes).await?;
                io.flush().await
            };
            match tokio::time::timeout(self.app.cfg.body_timeout, write).await {
                Ok(Ok(())) => {}
                _ => return,
            }
            if close {
                let _ = io.shutdown().await;
                return;
            }
        }
    }

    /// Reads until `buf` holds a whole request head and says what it is; `None`: the
    /// connection is to be closed (the client left, the head timed out, or the server is
    /// shutting down between requests).
    async fn read_head<IO>(&self, io: &mut IO, buf: &mut Vec<u8>) -> Option<Next>
    where
        IO: AsyncRead + Unpin,
    {
        let deadline = Instant::now() + self.header_timeout();
        loop {
            if !buf.is_empty() {
                match classify(&self.app, buf) {
                    Parsed::Partial if buf.len() < MAX_LEAN_HEAD => {}
                    Parsed::Partial => return Some(Next::Other),
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
    async fn hand_off<IO>(&self, io: IO, prefix: Vec<u8>, watcher: Watcher)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
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
    async fn once<IO>(&self, io: IO, prefix: Vec<u8>, len: u64) -> Option<(IO, Vec<u8>)>
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
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
    /// An HTTP/1.1 request of `len` bytes (head and body): hyper answers it, the front
    /// takes the connection back.
    Once { len: u64 },
    /// Anything else (HTTP/1.0, chunked bodies, upgrades, HTTP/2, `connection: close`,
    /// heads the front cannot parse): hyper's for good.
    Other,
}

enum Parsed {
    Partial,
    Done(Next),
}

/// Parses the head in `buf` and, for a manifest poll of a known node, takes its first step
/// (while the head is still borrowed).
fn classify(app: &App, buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Done(Next::Other),
    };
    let other = Parsed::Done(Next::Other);
    if req.version != Some(1) {
        return other;
    }
    let (mut body, mut lengths, mut close, mut expect) = (0u64, 0, false, false);
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case(header::CONTENT_LENGTH.as_str()) {
            lengths += 1;
            match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                Some(n) => body = n,
                None => return other,
            }
        } else if name.eq_ignore_ascii_case(header::TRANSFER_ENCODING.as_str())
            || name.eq_ignore_ascii_case(header::UPGRADE.as_str())
        {
            return other;
        } else if name.eq_ignore_ascii_case(header::EXPECT.as_str()) {
            expect = true;
        } else if name.eq_ignore_ascii_case(header::CONNECTION.as_str()) {
            close |= h
                .value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    if lengths > 1 {
        return other;
    }
    if let Some(step) = poll_step(app, &req, body == 0 && !expect) {
        return Parsed::Done(Next::Manifest {
            step,
            len: head,
            close,
        });
    }
    if close {
        return other;
    }
    Parsed::Done(Next::Once {
        len: head as u64 + body,
    })
}

/// The first step of a manifest poll of a known node, if `req` is one.
fn poll_step(app: &App, req: &httparse::Request<'_, '_>, bodiless: bool) -> Option<Step> {
    if req.method != Some("GET") || !bodiless {
        return None;
    }
    let (node, wait) = manifest_target(req.path?)?;
    let node = node.parse().ok()?;
    let inm = req
        .headers
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
    use std::io::Write;
    let status = answer.status();
    let body = answer.body();
    let mut out = Vec::with_capacity(256 + body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in answer.headers() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if status != axum::http::StatusCode::NOT_MODIFIED {
        let _ = write!(out, "content-length: {}\r\n", body.len());
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let _ = write!(
        out,
        "date: {}\r\n\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now())
    );
    out.extend_from_slice(&body);
    out
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
            // Near the end of the request: read no further than it, through a small copy.
            let mut chunk = [0u8; 1024];
            let take = room.min(chunk.len());
            let mut small = ReadBuf::new(&mut chunk[..take]);
            std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, &mut small))?;
            buf.put_slice(small.filled());
            small.filled().len()
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
