//! The fleet harness: a real `roost-coordinator serve` and real `roost-agent` processes, each
//! agent a node with its own Nix store (a per-node folder bind-mounted on `/nix` in a private
//! mount namespace) and its own network namespace joined to the host by a veth pair, so a
//! link can be cut and restored. The coordinator's embedded cache is the only way a store path
//! reaches a node. Everything made here is removed on drop, also when a test fails.

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use roost_common::wire::v1::http as v1;
use serde_json::Value;

pub use tempfile::TempDir;

pub mod desktop;
pub mod fleet;
pub mod http;
pub mod proxy;

pub use fleet::Fleet;

pub use roost_preflight::require;

/// Why the fleet cannot run here, if it cannot (not root, no Nix, no namespaces, binaries not
/// built). Tests take it through [`require!`]: under `CI=true` a reason fails the test.
pub fn preflight() -> Result<(), String> {
    roost_preflight::root("nodes are network and mount namespaces with /nix bind-mounted")?;
    roost_preflight::tools(&["nix", "nix-store", "unshare", "ip", "mount"])?;
    for b in ["roost-agent", "roost-coordinator"] {
        roost_preflight::exists(&bin(b), "run `cargo build --workspace` first")?;
    }
    Ok(())
}

/// The nixpkgs `lib` folder the module and example evaluations use: `ROOST_NIXPKGS_LIB`
/// (`.ci/run` points it at `../shared/nixpkgs-lib/lib`; the flake's checks pass
/// `${nixpkgs}/lib`). Test data, never part of the repository.
pub fn nixpkgs_lib() -> Result<PathBuf, String> {
    let lib = roost_preflight::env_dir("ROOST_NIXPKGS_LIB", "a nixpkgs `lib` folder")?;
    roost_preflight::exists(
        &lib.join("default.nix"),
        "ROOST_NIXPKGS_LIB must be nixpkgs' `lib` folder",
    )?;
    Ok(lib)
}

/// A binary of this workspace, built next to the running test or program.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    // Test binaries live in target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// The repository's root (for `examples/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// Runs a command to completion, failing with its stderr when it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A free TCP port on this machine (bound to 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The keys a fleet needs: publisher (manifests), cache (narinfo) and the upload token.
#[derive(Debug)]
pub struct Keys {
    /// Publisher secret key file.
    pub publisher_sec: PathBuf,
    /// Publisher public key file.
    pub publisher_pub: PathBuf,
    /// Cache secret key file.
    pub cache_sec: PathBuf,
    /// Cache public key (`name:base64`).
    pub cache_pub: String,
    /// File holding the cache upload token.
    pub token_file: PathBuf,
    /// The token.
    pub token: String,
}

impl Keys {
    /// Fresh keys under `dir`.
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        let publisher = roost_common::SecretKey::generate("fleet-publisher-1")?;
        let publisher_sec = dir.join("publisher.sec");
        let publisher_pub = dir.join("publisher.pub");
        publisher.write_new_file(&publisher_sec)?;
        fs::write(&publisher_pub, format!("{}\n", publisher.public()))?;
        let cache = roost_common::SecretKey::generate("fleet-cache-1")?;
        let cache_sec = dir.join("cache.sec");
        cache.write_new_file(&cache_sec)?;
        // 32 random bytes (a fresh key's public half), hex: fine for netrc and Basic auth.
        let random = roost_common::SecretKey::generate("token")?
            .public()
            .to_string();
        let token: String = roost_common::verify::digest(random.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let token_file = dir.join("upload-token");
        fs::write(&token_file, &token)?;
        Ok(Self {
            publisher_sec,
            publisher_pub,
            cache_sec,
            cache_pub: cache.public().to_string(),
            token_file,
            token,
        })
    }
}

/// A running `roost-coordinator serve`, listening on every address so nodes can reach it
/// through their veth links.
#[derive(Debug)]
pub struct Coordinator {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    /// Its state folder.
    pub state_dir: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    /// Serving HTTPS (then readiness is an accepted connection, not a plain GET).
    tls: bool,
    /// The token that reads the fleet's data (the upload token).
    pub token: String,
}

impl Coordinator {
    /// Starts a coordinator with its state under `dir`.
    pub fn start(dir: &Path, keys: &Keys) -> anyhow::Result<Self> {
        let state_dir = dir.join("coordinator");
        fs::create_dir_all(&state_dir)?;
        let port = free_port();
        let args = vec![
            "serve".to_owned(),
            "--listen".into(),
            format!("0.0.0.0:{port}"),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--publisher-key".into(),
            keys.publisher_pub.display().to_string(),
            "--upload-token-file".into(),
            keys.token_file.display().to_string(),
        ];
        let mut c = Self {
            child: None,
            port,
            state_dir,
            log: dir.join("coordinator.log"),
            args,
            tls: false,
            token: keys.token.clone(),
        };
        c.spawn()?;
        Ok(c)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin("roost-coordinator"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting roost-coordinator serve")?;
        self.child = Some(child);
        let url = v1::fleet_url(&self.url());
        let port = self.port;
        let tls = self.tls;
        let token = self.token.clone();
        wait_for("the coordinator to answer", Duration::from_secs(20), || {
            if tls {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .ok()
                    .map(drop)
            } else {
                http_get_auth(&url, Some(&token)).ok().map(drop)
            }
        })
        .with_context(|| {
            format!(
                "coordinator log:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            )
        })?;
        Ok(())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The URL from the host.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Kills it with SIGKILL (no graceful shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and state folder.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }

    /// Starts it again on the same port and state folder, serving HTTPS with the PEM
    /// certificate chain `cert` and key `key`; ready once it accepts connections.
    pub fn restart_tls(&mut self, cert: &Path, key: &Path) -> anyhow::Result<()> {
        self.kill();
        self.args.extend([
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ]);
        self.tls = true;
        self.spawn()
    }

    /// `GET /v1/fleet`.
    pub fn fleet(&self) -> anyhow::Result<Value> {
        Ok(serde_json::from_slice(
            &self.read(&v1::fleet_url(&self.url()))?,
        )?)
    }

    /// A GET of the fleet's data (`/v1/fleet`, a report history, `/metrics`) with the token
    /// that reads it.
    pub fn read(&self, url: &str) -> anyhow::Result<Vec<u8>> {
        http_get_auth(url, Some(&self.token))
    }

    /// The log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A blocking GET with a short timeout, body on 2xx. Runs on a thread of its own, so it
/// works from inside an async runtime too (the benchmarks).
pub fn http_get(url: &str) -> anyhow::Result<Vec<u8>> {
    http_get_auth(url, None)
}

/// [`http_get`] with `Authorization: Bearer TOKEN`.
pub fn http_get_auth(url: &str, token: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let url = url.to_owned();
    let token = token.map(str::to_owned);
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let resp = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?
                .get(&url);
            let resp = match &token {
                Some(t) => resp.bearer_auth(t),
                None => resp,
            }
            .send()
            .await?;
            ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
            Ok(resp.bytes().await?.to_vec())
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the GET thread panicked"))?
}

static NEXT_NET: AtomicU32 = AtomicU32::new(0);

/// A host bridge the nodes' links hang off, so every node reaches the coordinator at one
/// address (the one its manifests name for the cache).
#[derive(Debug)]
pub struct Bridge {
    name: String,
    /// The host's address on the bridge.
    pub ip: Ipv4Addr,
    subnet: u8,
    next: AtomicU32,
}

impl Bridge {
    /// A new bridge with a /24 of its own out of 10.213.0.0/16 (both ends are ours).
    pub fn create() -> anyhow::Result<Self> {
        let n = NEXT_NET.fetch_add(1, Ordering::SeqCst);
        let subnet = ((std::process::id() * 7 + n * 13) % 250) as u8 + 1;
        let name = format!("rb{:x}{n:x}", std::process::id() % 0xfffff);
        let ip = Ipv4Addr::new(10, 213, subnet, 1);
        run(Command::new("ip").args(["link", "add", &name, "type", "bridge"]))?;
        run(Command::new("ip").args(["addr", "add", &format!("{ip}/24"), "dev", &name]))?;
        run(Command::new("ip").args(["link", "set", &name, "up"]))?;
        Ok(Self {
            name,
            ip,
            subnet,
            next: AtomicU32::new(2),
        })
    }

    fn next_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(
            10,
            213,
            self.subnet,
            self.next.fetch_add(1, Ordering::SeqCst) as u8,
        )
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A node: its own `/nix`, state folder, network namespace and (when started) agent process.
#[derive(Debug)]
pub struct Node {
    /// The node's name, as in the flake.
    pub name: String,
    /// Its folder: `nix/` (bind-mounted on /nix), `state/`, logs.
    pub dir: PathBuf,
    /// The network namespace.
    pub netns: String,
    veth_host: String,
    /// The host's address, as the node reaches it.
    pub host_ip: Ipv4Addr,
    agent: Option<Child>,
    log: PathBuf,
    /// Host folders bind-mounted inside the node besides `/nix` (host path, node path).
    binds: Vec<(PathBuf, PathBuf)>,
}

impl Node {
    /// Creates the node's folders, network namespace and a veth link onto `bridge`.
    pub fn create(root: &Path, name: &str, bridge: &Bridge) -> anyhow::Result<Self> {
        let dir = root.join("nodes").join(name);
        fs::create_dir_all(dir.join("nix"))?;
        fs::create_dir_all(dir.join("state"))?;
        let n = NEXT_NET.fetch_add(1, Ordering::SeqCst);
        // Unique per process and node: interface names are at most 15 bytes.
        let tag = format!("{:x}{n:x}", std::process::id() % 0xfffff);
        let netns = format!("roost-{tag}");
        let veth_host = format!("rh{tag}");
        let veth_node = format!("rn{tag}");
        let node_ip = bridge.next_ip();
        let node = Self {
            name: name.to_owned(),
            dir: dir.clone(),
            netns: netns.clone(),
            veth_host: veth_host.clone(),
            host_ip: bridge.ip,
            agent: None,
            log: dir.join("agent.log"),
            binds: Vec::new(),
        };
        let ip = |args: &[&str]| run(Command::new("ip").args(args));
        ip(&["netns", "add", &netns])?;
        ip(&[
            "link", "add", &veth_host, "type", "veth", "peer", "name", &veth_node,
        ])?;
        ip(&["link", "set", &veth_node, "netns", &netns])?;
        ip(&["link", "set", &veth_host, "master", &bridge.name])?;
        ip(&["link", "set", &veth_host, "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            &veth_node,
        ])?;
        ip(&["-n", &netns, "link", "set", &veth_node, "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        Ok(node)
    }

    /// This node's view of the coordinator.
    pub fn coordinator_url(&self, c: &Coordinator) -> String {
        format!("http://{}:{}", self.host_ip, c.port)
    }

    /// The node's `/nix` folder on the host.
    pub fn nix_dir(&self) -> PathBuf {
        self.dir.join("nix")
    }

    /// The agent's state folder on the host (the agent sees the same path).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// From now on, commands in the node see host folder `host` at `inside` (a fake
    /// `/sys/class/power_supply`, a `/run` of its own, …).
    pub fn bind(&mut self, host: &Path, inside: &str) {
        self.binds.push((host.to_owned(), PathBuf::from(inside)));
    }

    /// A command that runs `program args` inside the node: its netns, its own `/nix` (and
    /// whatever [`Node::bind`] added) and a stock Nix configuration.
    pub fn command(&self, program: &Path, args: &[String]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.netns,
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
        ])
        .arg(format!(
            r#"mount --bind "$1" /nix && shift{} && exec "$@""#,
            r#" && mount --bind "$1" "$2" && shift 2"#.repeat(self.binds.len())
        ))
        .arg("roost-node")
        .arg(self.nix_dir())
        .args(
            self.binds
                .iter()
                .flat_map(|(h, i)| [h.as_os_str(), i.as_os_str()]),
        )
        .arg(program)
        .args(args);
        roost_preflight::stock_nix(&mut cmd);
        cmd
    }

    /// Starts `roost-agent ARGS` in the background, logging to the node's `agent.log`.
    pub fn start_agent(&mut self, args: &[String], env: &[(&str, &str)]) -> anyhow::Result<()> {
        self.stop_agent();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = self.command(&bin("roost-agent"), args);
        cmd.env("ROOST_FIXTURE_LOG", self.activation_log_path())
            .env("RUST_LOG", "info,roost_agent=debug")
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.agent = Some(cmd.spawn().context("starting roost-agent")?);
        Ok(())
    }

    /// Runs `roost-agent ARGS` in the node to completion (e.g. `run --once`).
    pub fn run_agent(&self, args: &[String], env: &[(&str, &str)]) -> anyhow::Result<Output> {
        let mut cmd = self.command(&bin("roost-agent"), args);
        cmd.env("ROOST_FIXTURE_LOG", self.activation_log_path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output()?;
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        log.write_all(&out.stderr)?;
        Ok(out)
    }

    /// The running agent's pid, if any.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// Whether the background agent has exited.
    pub fn agent_exited(&mut self) -> bool {
        self.agent
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Kills the agent with SIGKILL, as a power cut would.
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the agent (SIGKILL; the agent is built to survive that).
    pub fn stop_agent(&mut self) {
        self.kill_agent();
    }

    /// Cuts (`false`) or restores (`true`) the node's only network link.
    pub fn set_link(&self, up: bool) -> anyhow::Result<()> {
        run(Command::new("ip").args([
            "link",
            "set",
            &self.veth_host,
            if up { "up" } else { "down" },
        ]))?;
        Ok(())
    }

    /// Limits the host→node direction (the node's downloads) to `rate` (tc's syntax, e.g.
    /// `4mbit`), or lifts the limit with `None`.
    pub fn set_download_rate(&self, rate: Option<&str>) -> anyhow::Result<()> {
        let _ = Command::new("tc")
            .args(["qdisc", "del", "dev", &self.veth_host, "root"])
            .stderr(Stdio::null())
            .status();
        if let Some(rate) = rate {
            run(Command::new("tc").args([
                "qdisc",
                "add",
                "dev",
                &self.veth_host,
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "32kbit",
                "latency",
                "2s",
            ]))?;
        }
        Ok(())
    }

    /// Brings every interface inside the node back up (after a fixture cut it from within).
    pub fn restore_inner_links(&self) -> anyhow::Result<()> {
        let out = run(Command::new("ip").args(["-n", &self.netns, "-o", "link", "show"]))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line
                .split(':')
                .nth(1)
                .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            {
                run(Command::new("ip").args(["-n", &self.netns, "link", "set", &name, "up"]))?;
            }
        }
        Ok(())
    }

    /// Command lines of the processes still running inside the node.
    pub fn processes(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.netns])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        String::from_utf8_lossy(&out)
            .split_whitespace()
            .filter_map(|pid| fs::read(format!("/proc/{pid}/cmdline")).ok())
            .map(|c| {
                String::from_utf8_lossy(&c)
                    .replace('\0', " ")
                    .trim()
                    .to_owned()
            })
            .collect()
    }

    /// Where a profile inside the node points (`var/nix/profiles/system` → store path).
    pub fn profile_target(&self, rel: &str) -> Option<String> {
        let link = self.nix_dir().join(rel);
        let generation = fs::read_link(&link).ok()?;
        let generation = if generation.is_absolute() {
            generation
        } else {
            link.parent()?.join(generation)
        };
        // The generation link points at /nix/store/…, which is the node's store.
        let target = fs::read_link(&generation).ok()?;
        Some(target.display().to_string())
    }

    /// `roost-agent status --json`, run inside the node (it reads the node's profiles).
    pub fn status_json(&self) -> anyhow::Result<Value> {
        let out = run(&mut self.command(
            &bin("roost-agent"),
            &[
                "status".into(),
                "--json".into(),
                "--state-dir".into(),
                self.state_dir().display().to_string(),
            ],
        ))?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `roost-agent status` for people, run inside the node.
    pub fn status_text(&self) -> anyhow::Result<String> {
        let out = run(&mut self.command(
            &bin("roost-agent"),
            &[
                "status".into(),
                "--state-dir".into(),
                self.state_dir().display().to_string(),
            ],
        ))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Where the fixture's activation scripts record their calls.
    pub fn activation_log_path(&self) -> PathBuf {
        self.dir.join("activations.log")
    }

    /// Activations so far: "<goal> <store path>" lines.
    pub fn activations(&self) -> Vec<String> {
        fs::read_to_string(self.activation_log_path())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
        // Kill anything still running in the namespace (activation scripts the agent left).
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.netns])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth_host])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
    }
}
