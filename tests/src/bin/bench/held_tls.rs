//! `bench held-tls`: what a held long-poll costs the coordinator over HTTPS. The manifests
//! are uploaded over plain HTTP, then the coordinator is restarted on the same state folder
//! with `--tls-cert`, and one TLS connection per node sends a long-poll that is held.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use roost_common::SecretKey;
use roost_common::wire::v1::http as api;
use roost_tests::{Coordinator, Keys};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{manifest, node_name, rss_kib, test_certificate, upload};

pub async fn run(nodes: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = Keys::create(&dir.path().join("keys"))?;
    let mut coordinator = Coordinator::start(dir.path(), &keys)?;
    let addr = format!("127.0.0.1:{}", coordinator.port);
    let publisher = Arc::new(SecretKey::read_file(&keys.publisher_sec)?);
    let payload = |i: usize| {
        let node = node_name(i);
        let m = manifest(&node, 1, None);
        (node, m)
    };
    upload(&addr, publisher, nodes, 8, Arc::new(payload)).await?;
    let (ca, cert, key) = test_certificate(dir.path(), "127.0.0.1")?;
    tokio::task::block_in_place(|| coordinator.restart_tls(&cert, &key))?;
    let pid = coordinator.pid().context("coordinator pid")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca)? {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let connect = || async {
        let tcp = TcpStream::connect(&addr).await?;
        tcp.set_nodelay(true)?;
        anyhow::Ok(connector.connect(name.clone(), tcp).await?)
    };
    // One full exchange first, so the server's one-time TLS set-up is not counted per poll.
    let metrics_request = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        coordinator.token
    );
    let metrics = || async {
        let mut s = connect().await?;
        s.write_all(metrics_request.as_bytes()).await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        let held = text
            .lines()
            .find_map(|l| l.strip_prefix("roost_long_polls_held "))
            .and_then(|v| v.trim().parse::<u64>().ok());
        anyhow::Ok(held)
    };
    metrics().await?;
    let rss_before = rss_kib(pid);
    let t = Instant::now();
    let mut held = Vec::with_capacity(nodes);
    for i in 0..nodes {
        let mut s = connect().await?;
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"1\"\r\n\r\n",
            api::long_poll_url("", node_name(i), api::MAX_WAIT_S)
        );
        s.write_all(req.as_bytes()).await?;
        s.flush().await?;
        held.push(s);
    }
    let connect_s = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_held = rss_kib(pid);
    let counted = metrics().await?;
    println!(
        "{}",
        json!({"scenario": "held_tls", "held": nodes, "coordinator_says_held": counted,
               "handshakes_and_polls_s": connect_s,
               "rss_before_mib": rss_before as f64 / 1024.0, "rss_held_mib": rss_held as f64 / 1024.0,
               "held_cost_kib_each": rss_held.saturating_sub(rss_before) as f64 / nodes as f64})
    );
    drop(held);
    Ok(())
}
