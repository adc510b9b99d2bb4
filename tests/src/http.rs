//! A minimal HTTP/1.1 keep-alive client for load generation: one request at a time per
//! connection, no pooling, no allocation beyond the response body. A general-purpose client
//! would spend more CPU than the server under test on this 2-core machine.

use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A response: status, ETag header (if any), body.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// The `ETag` header, verbatim.
    pub etag: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// A response's status line and the headers this client acts on.
struct Head {
    status: u16,
    etag: Option<String>,
    length: Option<u64>,
    chunked: bool,
}

/// One keep-alive connection.
#[derive(Debug)]
pub struct Conn {
    stream: BufReader<TcpStream>,
    host: String,
    line: String,
    /// Bytes written on this connection.
    pub sent: u64,
    /// Bytes read on this connection.
    pub received: u64,
    /// The server said it closes the connection after the last response.
    closing: bool,
    /// New connections opened because the server closed one (as real clients do).
    pub reconnects: u64,
}

impl Conn {
    /// Connects to `addr` (`host:port`).
    pub async fn connect(addr: &str) -> anyhow::Result<Self> {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(s),
            host: addr.to_owned(),
            line: String::new(),
            sent: 0,
            received: 0,
            closing: false,
            reconnects: 0,
        })
    }

    /// Opens a new connection when the server said it closes this one (as real clients do).
    async fn reconnect_if_closed(&mut self) -> anyhow::Result<()> {
        if self.closing {
            let fresh = Self::connect(&self.host).await?;
            self.stream = fresh.stream;
            self.closing = false;
            self.reconnects += 1;
        }
        Ok(())
    }

    /// Sends a request and reads the whole response.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<Response> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        for (k, v) in headers {
            head.push_str(k);
            head.push_str(": ");
            head.push_str(v);
            head.push_str("\r\n");
        }
        if !body.is_empty() || method == "PUT" || method == "POST" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        self.reconnect_if_closed().await?;
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        self.sent += (head.len() + body.len()) as u64;
        self.read_response().await
    }

    /// Sends a request without waiting for the answer (for held long-polls).
    pub async fn send_only(&mut self, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<()> {
        let mut head = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.stream.get_mut().write_all(head.as_bytes()).await?;
        self.sent += head.len() as u64;
        Ok(())
    }

    /// GETs `path` and reads the body into `scratch` over and over, keeping none of it (a
    /// download as fast as this client can take it), adding each read to `progress`; returns
    /// the status and the body's length.
    pub async fn download(
        &mut self,
        path: &str,
        scratch: &mut [u8],
        progress: &std::sync::atomic::AtomicU64,
    ) -> anyhow::Result<(u16, u64)> {
        self.reconnect_if_closed().await?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host);
        self.stream.get_mut().write_all(head.as_bytes()).await?;
        self.sent += head.len() as u64;
        let head = self.read_head().await?;
        let length = head.length.context("no content-length in a download")?;
        let mut left = length;
        while left > 0 {
            let want = scratch
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = self.stream.read(&mut scratch[..want]).await?;
            if n == 0 {
                bail!("connection closed with {left} bytes of the body to come");
            }
            left -= n as u64;
            progress.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        self.received += length;
        Ok((head.status, length))
    }

    /// Reads a status line and headers.
    async fn read_head(&mut self) -> anyhow::Result<Head> {
        self.line.clear();
        let n = self.stream.read_line(&mut self.line).await?;
        if n == 0 {
            bail!("connection closed");
        }
        self.received += n as u64;
        let status: u16 = self
            .line
            .split_whitespace()
            .nth(1)
            .context("no status")?
            .parse()?;
        let mut head = Head {
            status,
            etag: None,
            length: None,
            chunked: false,
        };
        loop {
            self.line.clear();
            let n = self.stream.read_line(&mut self.line).await?;
            if n == 0 {
                bail!("connection closed in headers");
            }
            self.received += n as u64;
            let l = self.line.trim_end();
            if l.is_empty() {
                return Ok(head);
            }
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                head.length = Some(v.parse()?);
            } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
                self.closing = true;
            } else if k.eq_ignore_ascii_case("etag") {
                head.etag = Some(v.to_owned());
            } else if k.eq_ignore_ascii_case("transfer-encoding")
                && v.eq_ignore_ascii_case("chunked")
            {
                head.chunked = true;
            }
        }
    }

    /// Reads one response.
    pub async fn read_response(&mut self) -> anyhow::Result<Response> {
        let Head {
            status,
            etag,
            length,
            chunked,
        } = self.read_head().await?;
        let mut body = Vec::new();
        if chunked {
            loop {
                self.line.clear();
                self.received += self.stream.read_line(&mut self.line).await? as u64;
                let size = usize::from_str_radix(self.line.trim(), 16)?;
                let mut chunk = vec![0; size + 2];
                self.stream.read_exact(&mut chunk).await?;
                self.received += chunk.len() as u64;
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(len) = length {
            let len = usize::try_from(len)?;
            body.resize(len, 0);
            self.stream.read_exact(&mut body).await?;
            self.received += len as u64;
        }
        Ok(Response { status, etag, body })
    }
}

/// Latency samples in microseconds, summarised.
#[derive(Debug, Default)]
pub struct Latencies(pub Vec<u32>);

impl Latencies {
    /// Records one sample.
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_micros().min(u32::MAX as u128) as u32);
    }

    /// The q-quantile (0..=1) in milliseconds.
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        self.0.sort_unstable();
        let i = ((self.0.len() - 1) as f64 * q).round() as usize;
        f64::from(self.0[i]) / 1000.0
    }
}
