//! `roost-coordinator publish`: a flake's `deploy` output (deploy-rs's schema, unchanged, plus
//! `roost.*` keys) becomes built, cached, signed per-node manifests.
//!
//! Pipeline (DESIGN §4): one `nix eval --json` of everything selected → one `nix build` →
//! `nix store sign` + `nix copy --to CACHE` → one `nix path-info` → one signed envelope per node
//! → upload (`--to`) or atomic files in the static layout (`--out`). A node that fails is
//! reported by name; the others still publish unless `--all-or-nothing`.

mod deploy;
mod output;
pub mod target;

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use roost_common::envelope::{Context, Envelope};
use roost_common::nix::{Nix, NixError};
use roost_common::time::parse_duration;
use roost_common::wire::v1::{self, Manifest, Source, Substituter};
use roost_common::{NodeName, SecretKey, StorePath, Timestamp, Version};
use serde::Serialize;

use crate::serve::store::write_atomic;
pub use deploy::{NodeSpec, ProfileSpec};

/// Arguments of `publish`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("dest").required(true).args(["to", "out"])))]
pub struct PublishArgs {
    /// What to publish, in deploy-rs's syntax: `.`, `path/to/flake`, `FLAKE#NODE`,
    /// `FLAKE#NODE.PROFILE`; quote names with dots: '.#"web.prod".system'.
    #[arg(default_value = ".")]
    pub targets: Vec<String>,
    /// The publisher's secret key file (`NAME:BASE64`, from `keygen` or
    /// `nix-store --generate-binary-cache-key`). Agents trust its public half.
    #[arg(long, value_name = "SECRET_FILE")]
    pub key: PathBuf,
    /// Upload to a running coordinator, e.g. https://roost.example.org.
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,
    /// Write the static layout DIR/v1/nodes/NODE/manifest for any static web server.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Push closures to this Nix store URL (file://…, http(s)://…, s3://…; a coordinator's
    /// /cache). The upload token for an http(s) cache comes from $ROOST_UPLOAD_TOKEN.
    #[arg(long, value_name = "STORE_URL")]
    pub cache: Option<String>,
    /// Sign the closures with this Nix secret key before copying; its public half is put in
    /// the manifests so nodes trust the cache.
    #[arg(long, value_name = "SECRET_FILE")]
    pub cache_key: Option<PathBuf>,
    /// The substituter URL nodes should use (default: --cache). Repeat for several.
    #[arg(long = "substituter", value_name = "URL")]
    pub substituters: Vec<String>,
    /// An extra public key nodes trust for the substituters (`name:base64`). Repeatable.
    #[arg(long = "cache-public-key", value_name = "KEY")]
    pub cache_public_keys: Vec<String>,
    /// Do not build: every path must already exist locally or in --cache.
    #[arg(long)]
    pub no_build: bool,
    /// How long manifests stay valid.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub expires: Duration,
    /// Publish nothing unless every selected node evaluates, builds and copies.
    #[arg(long)]
    pub all_or_nothing: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Use this manifest version instead of the current time in milliseconds (still bumped
    /// above the destination's version).
    #[arg(long, hide = true)]
    pub manifest_version: Option<u64>,
    /// Use this issue time (RFC 3339) instead of now.
    #[arg(long, hide = true)]
    pub issued_at: Option<Timestamp>,
    /// Arguments passed to every `nix` call (after `--`), e.g. `-- --impure`.
    #[arg(last = true, value_name = "NIX_ARGS")]
    pub nix_args: Vec<String>,
}

/// One node's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct NodeResult {
    /// The node.
    pub node: String,
    /// `published`, `failed` or `skipped` (another node failed under --all-or-nothing).
    pub result: &'static str,
    /// The published version.
    pub version: Option<u64>,
    /// Profiles, in order, with their paths.
    pub profiles: Vec<PublishedProfile>,
    /// Sum of the closure sizes of its profiles.
    pub closure_size: Option<u64>,
    /// What went wrong.
    pub error: Option<String>,
}

/// A profile as published.
#[derive(Debug, Clone, Serialize)]
pub struct PublishedProfile {
    /// Its name.
    pub name: String,
    /// Its store path.
    pub path: String,
}

/// What `publish` did.
#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    /// Per node, sorted by name.
    pub nodes: Vec<NodeResult>,
    /// Nix invocations by command: proof of one evaluation for the whole fleet.
    pub nix_invocations: BTreeMap<String, u64>,
    /// Where the manifests went.
    pub destination: String,
}

impl PublishReport {
    /// Whether every node was published.
    pub fn all_published(&self) -> bool {
        self.nodes.iter().all(|n| n.result == "published")
    }
}

/// Everything `publish` needs, resolved from the command line.
#[derive(Debug)]
pub struct PublishOptions {
    /// Parsed targets.
    pub targets: Vec<target::Target>,
    /// The publisher key.
    pub key: SecretKey,
    /// Destination.
    pub dest: Destination,
    /// Cache to push closures to.
    pub cache: Option<String>,
    /// Key file to sign closures with.
    pub cache_key: Option<PathBuf>,
    /// Substituters for the manifests.
    pub substituters: Vec<Substituter>,
    /// Skip the build.
    pub no_build: bool,
    /// Manifest lifetime.
    pub expires: Duration,
    /// Publish all or nothing.
    pub all_or_nothing: bool,
    /// Fixed version (tests).
    pub version: Option<u64>,
    /// Fixed issue time (tests).
    pub issued_at: Option<Timestamp>,
    /// Show progress on stderr.
    pub progress: Progress,
}

/// Where manifests go.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A coordinator's base URL.
    Coordinator(String),
    /// A folder for the static layout.
    Folder(PathBuf),
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Coordinator(u) => f.write_str(u),
            Destination::Folder(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Errors that stop the whole publish (per-node failures are in the report instead).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Bad targets, unknown nodes or profiles, bad settings.
    #[error("{0}")]
    Usage(String),
    /// Nix failed for every node at once (evaluation of the flake, metadata).
    #[error(transparent)]
    Nix(#[from] NixError),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Spinners on a terminal.
    Terminal,
    /// Plain lines on stderr.
    Lines,
    /// Nothing.
    Quiet,
}

struct Stage(Option<indicatif::ProgressBar>);

impl Stage {
    fn start(progress: Progress, msg: String) -> Self {
        match progress {
            Progress::Terminal => {
                let pb = indicatif::ProgressBar::new_spinner();
                pb.enable_steady_tick(Duration::from_millis(120));
                pb.set_message(msg);
                Stage(Some(pb))
            }
            Progress::Lines => {
                eprintln!("{msg}");
                Stage(None)
            }
            Progress::Quiet => Stage(None),
        }
    }
    fn done(self, msg: String) {
        if let Some(pb) = self.0 {
            pb.finish_with_message(msg);
        }
    }
}

/// Runs `publish` from the command line.
pub async fn run(args: PublishArgs) -> u8 {
    let progress = if std::io::stderr().is_terminal() {
        Progress::Terminal
    } else {
        Progress::Lines
    };
    let opts = match options(&args, progress) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e:#}");
            return crate::exit::USAGE;
        }
    };
    let mut nix = Nix::new()
        .with_extra_args(args.nix_args.clone())
        .with_progress(progress == Progress::Terminal && !args.json);
    let _netrc = match upload_netrc(&opts) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e:#}");
            return crate::exit::USAGE;
        }
    };
    if let Some(n) = &_netrc {
        let mut extra = args.nix_args.clone();
        extra.extend([
            "--option".into(),
            "netrc-file".into(),
            n.path().display().to_string(),
        ]);
        nix = nix.with_extra_args(extra);
    }
    match publish(&opts, &nix).await {
        Ok(report) => {
            output::print(&report, args.json);
            if report.all_published() {
                crate::exit::OK
            } else {
                crate::exit::FAILED
            }
        }
        Err(PublishError::Usage(e)) => {
            eprintln!("error: {e}");
            crate::exit::USAGE
        }
        Err(e) => {
            eprintln!("error: {e}");
            crate::exit::FAILED
        }
    }
}

/// A netrc file with the upload token for an http(s) cache, from $ROOST_UPLOAD_TOKEN.
fn upload_netrc(opts: &PublishOptions) -> anyhow::Result<Option<tempfile::NamedTempFile>> {
    let Some(cache) = &opts.cache else {
        return Ok(None);
    };
    if !(cache.starts_with("http://") || cache.starts_with("https://")) {
        return Ok(None);
    }
    let Ok(token) = std::env::var("ROOST_UPLOAD_TOKEN") else {
        return Ok(None);
    };
    use std::io::Write;
    let mut f =
        tempfile::NamedTempFile::new().context("creating a netrc file for the upload token")?;
    writeln!(f, "default login roost password {}", token.trim())?;
    f.flush()?;
    Ok(Some(f))
}

/// Resolves the command line into options (exit 2 on anything wrong).
pub fn options(args: &PublishArgs, progress: Progress) -> anyhow::Result<PublishOptions> {
    let targets = args
        .targets
        .iter()
        .map(|t| target::parse(t))
        .collect::<Result<Vec<_>, _>>()?;
    let key = SecretKey::read_file(&args.key)
        .with_context(|| format!("publisher key {}", args.key.display()))?;
    let dest = match (&args.to, &args.out) {
        (Some(u), None) => {
            anyhow::ensure!(
                u.starts_with("http://") || u.starts_with("https://"),
                "--to {u}: expected an http:// or https:// URL"
            );
            Destination::Coordinator(u.trim_end_matches('/').to_owned())
        }
        (None, Some(d)) => Destination::Folder(d.clone()),
        _ => anyhow::bail!("give exactly one of --to URL or --out DIR"),
    };
    let mut keys = args.cache_public_keys.clone();
    for k in &keys {
        k.parse::<roost_common::PublicKey>()
            .with_context(|| format!("--cache-public-key {k}"))?;
    }
    if let Some(f) = &args.cache_key {
        let k = SecretKey::read_file(f).with_context(|| format!("cache key {}", f.display()))?;
        keys.insert(0, k.public().to_string());
    }
    let urls: Vec<String> = if args.substituters.is_empty() {
        args.cache.iter().cloned().collect()
    } else {
        args.substituters.clone()
    };
    let substituters = urls
        .into_iter()
        .map(|url| Substituter {
            url,
            public_keys: keys.clone(),
        })
        .collect();
    Ok(PublishOptions {
        targets,
        key,
        dest,
        cache: args.cache.clone(),
        cache_key: args.cache_key.clone(),
        substituters,
        no_build: args.no_build,
        expires: args.expires,
        all_or_nothing: args.all_or_nothing,
        version: args.manifest_version,
        issued_at: args.issued_at,
        progress: if args.json && progress == Progress::Lines {
            Progress::Lines
        } else {
            progress
        },
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking task panicked")
}

/// Publishes. Per-node failures are in the report; an `Err` means nothing was published.
pub async fn publish(opts: &PublishOptions, nix: &Nix) -> Result<PublishReport, PublishError> {
    // Group targets by flake; one evaluation per flake covers every selected node.
    let mut by_flake: BTreeMap<String, Option<deploy::Selection>> = BTreeMap::new();
    for t in &opts.targets {
        let entry = by_flake
            .entry(t.flake.clone())
            .or_insert_with(|| Some(BTreeMap::new()));
        match (&t.node, entry.as_mut()) {
            (None, _) => *entry = None,
            (Some(n), Some(sel)) => {
                let profiles = sel
                    .entry(n.clone())
                    .or_insert_with(|| Some(BTreeSet::new()));
                match (&t.profile, profiles.as_mut()) {
                    (None, _) => *profiles = None,
                    (Some(p), Some(ps)) => {
                        ps.insert(p.clone());
                    }
                    (Some(_), None) => {}
                }
            }
            (Some(_), None) => {}
        }
    }
    let mut specs: Vec<NodeSpec> = Vec::new();
    let mut failures: BTreeMap<String, String> = BTreeMap::new();
    for (flake, selection) in &by_flake {
        let stage = Stage::start(
            opts.progress,
            format!("evaluating {flake} (one evaluation for all nodes)"),
        );
        let (flake_ref, n, f, sel) = (flake.clone(), nix.clone(), flake.clone(), selection.clone());
        let source = blocking(move || deploy::source(&n, &f)).await?;
        let n = nix.clone();
        let evaluated = blocking(move || deploy::evaluate(&n, &flake_ref, sel.as_ref())).await?;
        stage.done(format!(
            "evaluated {flake}: {} node(s)",
            evaluated.nodes.len()
        ));
        for (node, err) in evaluated.failures {
            failures.insert(node, err);
        }
        for mut s in evaluated.nodes {
            s.source = Some(source.clone());
            specs.push(s);
        }
    }
    // Nodes that failed to evaluate: get Nix's own words, one extra evaluation each.
    for (node, msg) in failures.iter_mut() {
        if let Some(flake) = by_flake.keys().next() {
            let (n, f, node) = (nix.clone(), flake.clone(), node.clone());
            if let Some(text) = blocking(move || deploy::explain_failure(&n, &f, &node)).await {
                *msg = format!("{msg}: {text}");
            }
        }
    }

    let mut results: BTreeMap<String, NodeResult> = failures
        .into_iter()
        .map(|(node, e)| {
            (
                node.clone(),
                failed(&node, format!("evaluation failed: {e}")),
            )
        })
        .collect();

    // Build (one call) or check presence.
    let all_paths: Vec<StorePath> = specs
        .iter()
        .flat_map(|s| s.profiles.iter().map(|p| p.path.clone()))
        .collect();
    let missing: BTreeSet<StorePath> = if opts.no_build {
        let stage = Stage::start(
            opts.progress,
            format!("checking {} path(s) exist (--no-build)", all_paths.len()),
        );
        let missing = check_present(nix, &all_paths, opts.cache.as_deref()).await?;
        stage.done(format!("{} path(s) missing", missing.len()));
        missing
    } else {
        let drvs: Vec<String> = specs
            .iter()
            .flat_map(|s| s.profiles.iter())
            .filter(|p| !nix_valid_cached(&p.path))
            .filter_map(|p| p.drv_path.as_ref().map(|d| d.to_string()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let stage = Stage::start(
            opts.progress,
            format!("building {} derivation(s) in one `nix build`", drvs.len()),
        );
        let mut build_error = String::new();
        if !drvs.is_empty() {
            let (n, d) = (nix.clone(), drvs.clone());
            if let Err(e) = blocking(move || n.build(&d, true)).await {
                build_error = e.stderr_tail.clone();
            }
        }
        let missing = invalid_paths(nix, &all_paths).await?;
        stage.done(format!("built; {} path(s) failed", missing.len()));
        if !missing.is_empty() {
            for s in &specs {
                let bad: Vec<&ProfileSpec> = s
                    .profiles
                    .iter()
                    .filter(|p| missing.contains(&p.path))
                    .collect();
                if !bad.is_empty() {
                    let names: Vec<String> = bad
                        .iter()
                        .map(|p| format!("{} ({})", p.name, p.path))
                        .collect();
                    let detail = relevant_lines(&build_error, &bad);
                    results.insert(
                        s.node.to_string(),
                        failed(
                            s.node.as_str(),
                            format!(
                                "build failed for profile(s) {}:\n{detail}",
                                names.join(", ")
                            ),
                        ),
                    );
                }
            }
        }
        missing
    };
    if opts.no_build {
        for s in &specs {
            let bad: Vec<String> = s
                .profiles
                .iter()
                .filter(|p| missing.contains(&p.path))
                .map(|p| format!("{} ({})", p.name, p.path))
                .collect();
            if !bad.is_empty() {
                results.insert(
                    s.node.to_string(),
                    failed(
                        s.node.as_str(),
                        format!(
                            "--no-build: not in the local store nor the cache: {}",
                            bad.join(", ")
                        ),
                    ),
                );
            }
        }
    }
    specs.retain(|s| !results.contains_key(s.node.as_str()));

    // Sign and copy to the cache.
    if let Some(cache) = &opts.cache {
        let paths: Vec<StorePath> = specs
            .iter()
            .flat_map(|s| s.profiles.iter().map(|p| p.path.clone()))
            .collect();
        if !paths.is_empty() {
            let stage = Stage::start(
                opts.progress,
                format!("copying {} closure(s) to {cache}", paths.len()),
            );
            if let Some(k) = &opts.cache_key {
                let (n, k, p) = (nix.clone(), k.clone(), paths.clone());
                blocking(move || n.sign(&k, &p)).await.map_err(|e| {
                    PublishError::Other(format!(
                        "signing closures with {}: {e}",
                        opts_key_display(&opts.cache_key)
                    ))
                })?;
            }
            let (n, c, p) = (nix.clone(), cache.clone(), paths.clone());
            if let Err(all) = blocking(move || n.copy_to(&c, &p)).await {
                // Find out which nodes cannot be copied, one node at a time.
                for s in &specs {
                    let (n, c, p) = (
                        nix.clone(),
                        cache.clone(),
                        s.profiles
                            .iter()
                            .map(|p| p.path.clone())
                            .collect::<Vec<_>>(),
                    );
                    if let Err(e) = blocking(move || n.copy_to(&c, &p)).await {
                        results.insert(
                            s.node.to_string(),
                            failed(s.node.as_str(), format!("copy to {cache} failed: {e}")),
                        );
                    }
                }
                if specs.iter().all(|s| results.contains_key(s.node.as_str())) {
                    tracing::debug!("copy failed for every node: {all}");
                }
            }
            stage.done(format!("copied to {cache}"));
        }
    }
    specs.retain(|s| !results.contains_key(s.node.as_str()));

    // NAR hashes and closure sizes, one call.
    let paths: Vec<StorePath> = specs
        .iter()
        .flat_map(|s| s.profiles.iter().map(|p| p.path.clone()))
        .collect();
    let infos = if paths.is_empty() {
        Vec::new()
    } else {
        let (n, p, store) = (
            nix.clone(),
            paths.clone(),
            if opts.no_build {
                opts.cache.clone()
            } else {
                None
            },
        );
        let local = blocking(move || n.path_info(&p, None, true)).await?;
        if local.len() < paths.len() && store.is_some() {
            let n = nix.clone();
            blocking(move || n.path_info(&paths, store.as_deref(), true)).await?
        } else {
            local
        }
    };
    let info: BTreeMap<StorePath, (String, Option<u64>)> = infos
        .into_iter()
        .map(|i| (i.path, (i.nar_hash, i.closure_size)))
        .collect();

    if opts.all_or_nothing && !results.is_empty() {
        for s in &specs {
            results.insert(
                s.node.to_string(),
                NodeResult {
                    node: s.node.to_string(),
                    result: "skipped",
                    version: None,
                    profiles: vec![],
                    closure_size: None,
                    error: Some(
                        "not published: another node failed and --all-or-nothing is set".into(),
                    ),
                },
            );
        }
        return Ok(report(results, nix, &opts.dest));
    }

    // Sign and deliver.
    let issued_at = opts.issued_at.unwrap_or_else(Timestamp::now);
    // One version for the whole publish (bumped per node above what the destination has).
    let wanted = opts.version.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| PublishError::Other(e.to_string()))?;
    let stage = Stage::start(
        opts.progress,
        format!(
            "signing and delivering {} manifest(s) to {}",
            specs.len(),
            opts.dest
        ),
    );
    for s in &specs {
        let node = s.node.to_string();
        let res = deliver(opts, &client, s, &info, issued_at, wanted).await;
        results.insert(
            node.clone(),
            match res {
                Ok((version, closure)) => NodeResult {
                    node: node.clone(),
                    result: "published",
                    version: Some(version),
                    profiles: s
                        .profiles
                        .iter()
                        .map(|p| PublishedProfile {
                            name: p.name.to_string(),
                            path: p.path.to_string(),
                        })
                        .collect(),
                    closure_size: Some(closure),
                    error: None,
                },
                Err(e) => failed(&node, e),
            },
        );
    }
    stage.done(format!("delivered to {}", opts.dest));
    Ok(report(results, nix, &opts.dest))
}

fn opts_key_display(k: &Option<PathBuf>) -> String {
    k.as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn nix_valid_cached(_p: &StorePath) -> bool {
    // Building a valid path is a no-op for Nix; let the one build call decide.
    false
}

fn report(results: BTreeMap<String, NodeResult>, nix: &Nix, dest: &Destination) -> PublishReport {
    PublishReport {
        nodes: results.into_values().collect(),
        nix_invocations: nix.counts(),
        destination: dest.to_string(),
    }
}

fn failed(node: &str, error: String) -> NodeResult {
    NodeResult {
        node: node.to_owned(),
        result: "failed",
        version: None,
        profiles: vec![],
        closure_size: None,
        error: Some(error),
    }
}

/// The lines of Nix's build output that mention the failed derivations (or the tail).
fn relevant_lines(stderr: &str, bad: &[&ProfileSpec]) -> String {
    let names: Vec<&str> = bad.iter().map(|p| p.path.name()).collect();
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            names.iter().any(|n| l.contains(n))
                || l.starts_with("error")
                || l.starts_with("       >")
        })
        .collect();
    if lines.is_empty() {
        stderr.trim().to_owned()
    } else {
        lines.join("\n")
    }
}

async fn check_present(
    nix: &Nix,
    paths: &[StorePath],
    cache: Option<&str>,
) -> Result<BTreeSet<StorePath>, PublishError> {
    let mut missing = invalid_paths(nix, paths).await?;
    if let (Some(cache), false) = (cache, missing.is_empty()) {
        let (n, c, p) = (
            nix.clone(),
            cache.to_owned(),
            missing.iter().cloned().collect::<Vec<_>>(),
        );
        let found = blocking(move || n.path_info(&p, Some(&c), false)).await?;
        for f in found {
            missing.remove(&f.path);
        }
    }
    Ok(missing)
}

/// The paths not valid in the local store, in one `nix path-info` call.
async fn invalid_paths(
    nix: &Nix,
    paths: &[StorePath],
) -> Result<BTreeSet<StorePath>, PublishError> {
    if paths.is_empty() {
        return Ok(BTreeSet::new());
    }
    let (n, p) = (nix.clone(), paths.to_vec());
    let valid: BTreeSet<StorePath> = blocking(move || n.path_info(&p, None, false))
        .await?
        .into_iter()
        .map(|i| i.path)
        .collect();
    Ok(paths
        .iter()
        .filter(|p| !valid.contains(*p))
        .cloned()
        .collect())
}

/// The version at the destination now, if any.
async fn current_version(
    opts: &PublishOptions,
    client: &reqwest::Client,
    node: &NodeName,
) -> Result<Option<u64>, String> {
    let bytes = match &opts.dest {
        Destination::Folder(dir) => match std::fs::read(manifest_file(dir, node)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("reading the current manifest: {e}")),
        },
        Destination::Coordinator(url) => {
            let resp = client
                .get(format!("{url}/v1/nodes/{node}/manifest"))
                .send()
                .await
                .map_err(|e| format!("cannot reach the coordinator at {url}: {e}"))?;
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !resp.status().is_success() {
                return Err(format!(
                    "coordinator at {url} answered {} to GET",
                    resp.status()
                ));
            }
            resp.bytes().await.map_err(|e| e.to_string())?.to_vec()
        }
    };
    let env: Envelope = serde_json::from_slice(&bytes)
        .map_err(|e| format!("the current manifest is unreadable: {e}"))?;
    use base64::Engine;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(env.payload)
        .map_err(|e| e.to_string())?;
    #[derive(serde::Deserialize)]
    struct V {
        version: u64,
    }
    Ok(Some(
        serde_json::from_slice::<V>(&payload)
            .map_err(|e| e.to_string())?
            .version,
    ))
}

fn manifest_file(dir: &Path, node: &NodeName) -> PathBuf {
    dir.join("v1/nodes").join(node.as_str()).join("manifest")
}

async fn deliver(
    opts: &PublishOptions,
    client: &reqwest::Client,
    s: &NodeSpec,
    info: &BTreeMap<StorePath, (String, Option<u64>)>,
    issued_at: Timestamp,
    wanted: u64,
) -> Result<(u64, u64), String> {
    let current = current_version(opts, client, &s.node).await?;
    let version = match current {
        Some(c) if c >= wanted => c + 1,
        _ => wanted,
    };
    let mut closure_total = 0;
    let profiles = s
        .profiles
        .iter()
        .map(|p| {
            let (nar_hash, closure) = info.get(&p.path).cloned().unwrap_or_default();
            closure_total += closure.unwrap_or(0);
            p.to_wire(&p.path, (!nar_hash.is_empty()).then_some(nar_hash), closure)
        })
        .collect();
    let manifest = Manifest {
        format: v1::FORMAT,
        node: s.node.clone(),
        system: s.system.clone(),
        version: Version(version),
        issued_at,
        expires_at: issued_at.plus(opts.expires),
        source: s.source.clone(),
        substituters: opts.substituters.clone(),
        node_key: s.node_key.clone(),
        profiles,
        rollout: v1::Rollout { wave: s.wave },
    };
    let payload = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
    let bytes = Envelope::seal(Context::Manifest, &payload, &[&opts.key]).to_bytes();
    match &opts.dest {
        Destination::Folder(dir) => {
            let path = manifest_file(dir, &s.node);
            write_atomic(&path, &bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
        }
        Destination::Coordinator(url) => {
            let resp = client
                .put(format!("{url}/v1/nodes/{}/manifest", s.node))
                .header("Content-Type", "application/json")
                .body(bytes)
                .send()
                .await
                .map_err(|e| format!("cannot reach the coordinator at {url}: {e}"))?;
            if !resp.status().is_success() {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                let msg = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["message"].as_str().map(str::to_owned))
                    .unwrap_or(body);
                return Err(format!(
                    "the coordinator refused the manifest ({status}): {msg}"
                ));
            }
        }
    }
    Ok((version, closure_total))
}

/// Re-exported for tests that build a source record themselves.
pub type FlakeSource = Source;
