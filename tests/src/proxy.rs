//! A counting TCP proxy: bytes in each direction and connections, measured at the socket, so
//! a benchmark can say what one idle poll costs on the wire.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Byte and connection counters of a [`CountingProxy`].
#[derive(Debug, Default)]
pub struct Counters {
    /// Client → server bytes.
    pub up: AtomicU64,
    /// Server → client bytes.
    pub down: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
}

impl Counters {
    /// (up, down, connections) now.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
            self.connections.load(Ordering::Relaxed),
        )
    }
}

/// Forwards every connection on `listen` to `target`, counting bytes.
#[derive(Debug)]
pub struct CountingProxy {
    /// The address clients connect to.
    pub addr: std::net::SocketAddr,
    /// Its counters.
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    /// Starts a proxy on 127.0.0.1 (a free port) in front of `target`.
    pub async fn start(target: String) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?, target).await
    }

    /// Starts a proxy on `bind` in front of `target`.
    pub async fn start_on(bind: std::net::SocketAddr, target: String) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                c.connections.fetch_add(1, Ordering::Relaxed);
                let (c, target) = (c.clone(), target.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = pump(cr, sw, c.clone(), true);
                    let down = pump(sr, cw, c, false);
                    let _ = tokio::join!(up, down);
                });
            }
        });
        Ok(Self {
            addr,
            counters,
            task,
        })
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    c: Arc<Counters>,
    up: bool,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        if up { &c.up } else { &c.down }.fetch_add(n as u64, Ordering::Relaxed);
        to.write_all(&buf[..n]).await?;
    }
}
