//! The dashboard in a real browser: Debian's headless chromium driven through chromedriver
//! (WebDriver, with the fantoccini client: async on tokio like the rest, and no browser
//! build of its own). The page loads, lists the nodes, shows a node's failure within
//! seconds of its report without a reload, and a node's page has its history; screenshots
//! are kept in `target/dashboard/` for people to look at. The HTML is also checked without
//! a browser: it works without JavaScript and needs the read token.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use roost_common::wire::v1::{Manifest, ReportError, ReportState, Source};
use roost_common::{SecretKey, Version};
use roost_preflight::{require, tools};

mod support;
use support::{Server, post_report, put, report_payload, seal_report, sealed};

/// A chromedriver on a free port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        // A hang guard, not a performance limit.
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "chromedriver did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn browser(&self) -> Client {
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,900"]
            }
        });
        let serde_json::Value::Object(caps) = caps else {
            unreachable!()
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a chromium session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `target/dashboard/NAME.png`, for people to look at.
fn screenshot_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let dir = target.join("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.png"))
}

fn manifest(node: &str, version: u64, key: &SecretKey, wave: u32, rev: &str) -> Vec<u8> {
    let mut m: Manifest =
        serde_json::from_slice(&support::manifest(node, version, Some(key))).unwrap();
    m.rollout.wave = wave;
    m.source = Some(Source {
        flake: "git+file:///srv/fleet".into(),
        rev: Some(rev.into()),
        dirty: false,
    });
    serde_json::to_vec(&m).unwrap()
}

struct Fleet {
    _dir: tempfile::TempDir,
    s: Server,
    keys: Vec<(String, SecretKey)>,
}

impl Fleet {
    async fn new(adjust: impl FnOnce(&mut roost_coordinator::serve::ServerConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let publisher = SecretKey::generate("pub").unwrap();
        let s = Server::configured(dir.path(), &publisher, adjust).await;
        let mut keys = Vec::new();
        for (node, wave) in [("web", 0), ("pi-kitchen", 1), ("laptop", 1)] {
            let key = SecretKey::generate(node).unwrap();
            let body = sealed(
                &publisher,
                &manifest(node, 1, &key, wave, "a1b2c3d4e5f60718293a4b5c"),
            );
            assert_eq!(put(&s.url, node, body).await.0, 200);
            keys.push((node.to_owned(), key));
        }
        Self { _dir: dir, s, keys }
    }

    async fn report(&self, node: &str, seq: u64, state: ReportState, error: Option<&str>) {
        let key = &self.keys.iter().find(|(n, _)| n == node).unwrap().1;
        let mut r = report_payload(node, seq, state);
        r.manifest_version = Some(Version(1));
        r.error = error.map(|m| ReportError {
            phase: "activate".into(),
            message: m.into(),
        });
        let (st, e) = post_report(&self.s.url, node, seal_report(&r, key)).await;
        assert_eq!(st, 200, "{e}");
    }
}

/// The text of the node table's row for `node`.
async fn row_text(c: &Client, node: &str) -> String {
    text_of(c, &format!("tr[data-node=\"{node}\"]")).await
}

/// The text of the element `css` selects. A live update may replace it between finding it
/// and reading it (a stale element): then it is found again.
async fn text_of(c: &Client, css: &str) -> String {
    let mut last = None;
    for _ in 0..20 {
        match c.find(Locator::Css(css)).await {
            Ok(row) => match row.text().await {
                Ok(t) => return t,
                Err(e) => last = Some(e),
            },
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {css}: {last:?}")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_lists_the_nodes_and_shows_a_failure_within_seconds_of_its_report() {
    require!(tools(&["chromium", "chromedriver"]));
    let f = Fleet::new(|_| {}).await;
    f.report("web", 1, ReportState::Success, None).await;
    let driver = Driver::start();
    let c = driver.browser().await;
    c.goto(&f.s.url).await.unwrap();
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css("table#nodes"))
        .await
        .expect("the node table");
    let text = text_of(&c, "table#nodes").await;
    for node in ["web", "pi-kitchen", "laptop"] {
        assert!(text.contains(node), "{node} missing in\n{text}");
    }
    assert!(row_text(&c, "web").await.contains("a1b2c3d"), "{text}");
    assert!(
        c.find(Locator::Css("table#waves")).await.is_ok(),
        "wave progress"
    );
    c.screenshot()
        .await
        .map(|png| std::fs::write(screenshot_path("fleet"), png).unwrap())
        .unwrap();

    // A failure arrives: the open page shows it without a reload.
    let why = "switch-to-configuration exited with status 4";
    f.report("pi-kitchen", 1, ReportState::RolledBack, Some(why))
        .await;
    // A hang guard: the update normally lands well within a second (server-sent event).
    let start = Instant::now();
    loop {
        let row = row_text(&c, "pi-kitchen").await;
        if row.contains("FAILED") && row.contains(why) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the failure did not show: {row}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let attention = text_of(&c, "#count-attention b").await;
    assert_ne!(attention, "0");
    c.screenshot()
        .await
        .map(|png| std::fs::write(screenshot_path("fleet-failure"), png).unwrap())
        .unwrap();

    // The node's page: its flags, paths and history.
    c.find(Locator::LinkText("pi-kitchen"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .at_most(Duration::from_secs(20))
        .for_element(Locator::Css("table#history"))
        .await
        .unwrap();
    let history = text_of(&c, "table#history").await;
    assert!(
        history.contains("rolled_back") && history.contains(why),
        "{history}"
    );
    let profiles = text_of(&c, "table#profiles").await;
    assert!(
        profiles.contains("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-sys"),
        "{profiles}"
    );
    c.screenshot()
        .await
        .map(|png| std::fs::write(screenshot_path("node"), png).unwrap())
        .unwrap();
    c.close().await.unwrap();
    f.s.stop().await;
}

#[tokio::test]
async fn the_pages_work_without_javascript_and_need_the_read_token() {
    let token = "dash-read-token-0123456789";
    let f = Fleet::new(|c| {
        c.public_read = false;
        c.read_token = Some(token.into());
    })
    .await;
    f.report(
        "laptop",
        1,
        ReportState::Failed,
        Some("no space left on device"),
    )
    .await;
    let c = reqwest::Client::new();
    for path in ["/", "/nodes/laptop", "/events"] {
        let r = c.get(format!("{}{path}", f.s.url)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
        assert!(r.headers().contains_key("www-authenticate"), "{path}");
    }
    let get = |path: &str| {
        c.get(format!("{}{path}", f.s.url))
            .basic_auth("me", Some(token))
            .send()
    };
    let r = get("/").await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = r.text().await.unwrap();
    // Server-rendered: the data is in the HTML; without script the page refreshes itself.
    assert!(
        page.contains("<noscript><meta http-equiv=\"refresh\""),
        "{page}"
    );
    assert!(
        page.contains("no space left on device") && page.contains(">FAILED<"),
        "{page}"
    );
    let node = get("/nodes/laptop").await.unwrap().text().await.unwrap();
    assert!(
        node.contains("table id=\"history\"") && node.contains("no space left"),
        "{node}"
    );
    assert_eq!(get("/nodes/nobody").await.unwrap().status(), 404);
    // Text from reports is escaped.
    f.report(
        "web",
        1,
        ReportState::Failed,
        Some("<script>alert(1)</script>"),
    )
    .await;
    let page = get("/").await.unwrap().text().await.unwrap();
    assert!(
        !page.contains("<script>alert") && page.contains("&lt;script&gt;alert(1)"),
        "{page}"
    );
    let events = get("/events").await.unwrap();
    assert_eq!(events.status(), 200);
    assert!(
        events.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    f.s.stop().await;
}
