//! `roost-coordinator publish`: a flake's `deploy` output (deploy-rs's schema, unchanged, plus
//! `roost.*` keys) becomes built, cached, signed per-node manifests.
//!
//! Pipeline (DESIGN §4, in [`pipeline`]): one `nix eval --json` per flake for every selected
//! node ([`deploy`]) → one `nix build --keep-going` → `nix store sign` + `nix copy --to CACHE`
//! → one `nix path-info --closure-size` → one signed envelope per node → upload (`--to`) or
//! atomic files in the static layout (`--out`) ([`deliver`]). A node that fails is reported by
//! name with Nix's own words; the others still publish unless `--all-or-nothing`.

pub mod checks;
pub mod deliver;
pub mod deploy;
mod output;
pub mod pipeline;
pub mod target;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use roost_common::nix::Nix;
use roost_common::time::parse_duration;
use roost_common::wire::v1::Substituter;
use roost_common::{SecretKey, Timestamp};
use serde::Serialize;

pub use deliver::Destination;
pub use deploy::{NodeSpec, ProfileSpec};
pub use output::Progress;
pub use pipeline::publish;

/// Arguments of `publish`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("dest").required(true).args(["to", "out"])))]
#[command(after_help = "\
Reads deploy-rs's `deploy` output unchanged (profile > node > deploy settings, profilesOrder) \
plus roost.* keys, in one `nix eval` for all nodes; builds in one `nix build`; copies to --cache; \
signs one manifest per node with a version above the destination's.
Exit: 0 all published, 1 some node failed (the others are published unless --all-or-nothing), \
2 bad usage (unknown node or profile, bad key file).

Examples:
  roost-coordinator publish --key publisher.sec --to https://roost.example.org \\
      --cache https://roost.example.org/cache --cache-key cache.sec
  roost-coordinator publish '.#\"web.prod\".system' --key publisher.sec --out ./public
  roost-coordinator publish . --key publisher.sec --out ./public --no-build \\
      --cache s3://fleet-cache -- --impure")]
pub struct PublishArgs {
    /// What to publish, in deploy-rs's syntax: `.` (every node of the flake here),
    /// `path/to/flake`, `FLAKE#NODE`, `FLAKE#NODE.PROFILE`; quote names with dots:
    /// '.#"web.prod".system'. Several targets may name several flakes.
    #[arg(default_value = ".")]
    pub targets: Vec<String>,
    /// The publisher's secret key file (`NAME:BASE64`, from `roost-coordinator keygen` or
    /// `nix-store --generate-binary-cache-key`). Agents trust its public half.
    #[arg(long, value_name = "SECRET_FILE")]
    pub key: PathBuf,
    /// Upload to a running coordinator (`PUT URL/v1/nodes/NODE/manifest`), e.g.
    /// https://roost.example.org. The coordinator checks the signature and refuses a
    /// version that is not newer than the one it has.
    #[arg(long, value_name = "URL")]
    pub to: Option<String>,
    /// Write the static layout DIR/v1/nodes/NODE/manifest for any static web server
    /// (nginx, S3, a CDN). Each file is replaced atomically.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// With --out: write only the manifests of nodes in these waves (`roost.wave`): `K`, or
    /// `A..B` for A to B inclusive. A static host cannot gate on reports, so stage by hand:
    /// `--waves 0`, check the canaries, then `--waves 0..1`, and so on. The other nodes are
    /// listed as `held` and their files are left as they are.
    #[arg(long, value_name = "K|A..B", value_parser = WaveRange::parse)]
    pub waves: Option<WaveRange>,
    /// Push every closure to this Nix store URL with `nix copy --to` (file://…,
    /// http(s)://…, s3://…; a coordinator's URL/cache). Also the substituter the manifests
    /// name, unless --substituter is given. For an http(s) cache that wants an upload token
    /// (a coordinator's /cache), set $ROOST_UPLOAD_TOKEN or give --cache-netrc.
    #[arg(long, value_name = "STORE_URL")]
    pub cache: Option<String>,
    /// Sign every closure with this Nix secret key (`nix store sign`) before copying; its
    /// public half goes into the manifests, so nodes trust the cache for these paths only
    /// through the signed manifest.
    #[arg(long, value_name = "SECRET_FILE")]
    pub cache_key: Option<PathBuf>,
    /// A netrc file Nix uses to authenticate uploads to an http(s) --cache (the coordinator
    /// accepts `machine HOST login roost password TOKEN`). Default: one made from
    /// $ROOST_UPLOAD_TOKEN, when set.
    #[arg(long, value_name = "FILE")]
    pub cache_netrc: Option<PathBuf>,
    /// The substituter URL nodes should use, when it differs from --cache (e.g. the public
    /// name of a cache CI writes to through a private one). Repeat for several.
    #[arg(long = "substituter", value_name = "URL")]
    pub substituters: Vec<String>,
    /// Another public key (`NAME:BASE64`) nodes trust for the substituters, e.g. when the
    /// closures were signed elsewhere. Repeatable.
    #[arg(long = "cache-public-key", value_name = "KEY")]
    pub cache_public_keys: Vec<String>,
    /// Publish even though the manifests name no cache the nodes can verify (no --cache, or
    /// one without --cache-key/--cache-public-key): every node's own configuration already
    /// trusts where the paths come from (its extra_substituters and
    /// extra_trusted_public_keys), or already has them. Without it, publish refuses, since
    /// such nodes would sit deferred for ever.
    #[arg(long)]
    pub nodes_trust_paths: bool,
    /// Do not build: every path must already be in the local store or in --cache; publish
    /// stops naming the missing ones otherwise.
    #[arg(long)]
    pub no_build: bool,
    /// Do not push the derivations (`drv_path` and what building it needs) to --cache. By
    /// default they go with the closures, so a node whose build policy lets it build
    /// (`fallback`, the default, or `build`) can build a path the cache does not have.
    /// Use it when every node is `substitute-only`.
    #[arg(long)]
    pub no_derivations: bool,
    /// How long the manifests stay valid; agents refuse an expired manifest and keep
    /// running what they have. Units: s, m, h, d (e.g. 12h, 30d).
    #[arg(long, default_value = "30d", value_parser = parse_duration, value_name = "DURATION")]
    pub expires: Duration,
    /// Publish nothing unless every selected node evaluates, builds, copies and its current
    /// version can be read. (A coordinator may still refuse one upload after accepting
    /// others; each refusal is reported.)
    #[arg(long)]
    pub all_or_nothing: bool,
    /// Print the summary as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Use this manifest version instead of the current time in milliseconds (still raised
    /// above the version the destination serves; a coordinator also refuses, 409, one not
    /// above a manifest it holds back for a rollout wave). For reproducible output in tests.
    #[arg(long, hide = true)]
    pub manifest_version: Option<u64>,
    /// Use this issue time (RFC 3339) instead of now. For reproducible output in tests.
    #[arg(long, hide = true)]
    pub issued_at: Option<Timestamp>,
    /// Arguments added to every `nix` call, after `--`: e.g. `-- --impure` or
    /// `-- --option substituters ''`.
    #[arg(last = true, value_name = "NIX_ARGS")]
    pub nix_args: Vec<String>,
}

/// The waves `publish --out DIR --waves` writes: `from` to `to`, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaveRange {
    /// The lowest wave written.
    pub from: u32,
    /// The highest wave written.
    pub to: u32,
}

impl WaveRange {
    /// `K` or `A..B` (`A` ≤ `B`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let wave = |w: &str| {
            w.trim().parse::<u32>().map_err(|_| {
                format!(
                    "`{s}`: expected a wave number K or a range A..B of wave numbers (e.g. 0..1)"
                )
            })
        };
        let (from, to) = match s.split_once("..") {
            Some((a, b)) => (wave(a)?, wave(b.strip_prefix('=').unwrap_or(b))?),
            None => (wave(s)?, wave(s)?),
        };
        if from > to {
            return Err(format!(
                "`{s}`: the range is empty ({from} is above {to}); write the lower wave first, e.g. {to}..{from}"
            ));
        }
        Ok(Self { from, to })
    }

    /// Whether it holds `wave`.
    pub fn contains(self, wave: u32) -> bool {
        (self.from..=self.to).contains(&wave)
    }
}

impl std::fmt::Display for WaveRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.from == self.to {
            write!(f, "{}", self.from)
        } else {
            write!(f, "{}..{}", self.from, self.to)
        }
    }
}

/// One node's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct NodeResult {
    /// The node.
    pub node: String,
    /// `published`, `failed`, `skipped` (not published because another node failed under
    /// `--all-or-nothing`) or `held` (its wave is outside `--waves`: not written).
    pub result: &'static str,
    /// The published version.
    pub version: Option<u64>,
    /// Profiles, in activation order.
    pub profiles: Vec<PublishedProfile>,
    /// Sum of the closure sizes of its profiles, in bytes.
    pub closure_size: Option<u64>,
    /// Where the manifest went (URL or file).
    pub location: Option<String>,
    /// What went wrong, in Nix's or the coordinator's words.
    pub error: Option<String>,
}

impl NodeResult {
    fn failed(node: &str, error: String) -> Self {
        Self {
            node: node.to_owned(),
            result: "failed",
            version: None,
            profiles: vec![],
            closure_size: None,
            location: None,
            error: Some(error),
        }
    }

    fn skipped(node: &str) -> Self {
        Self {
            result: "skipped",
            error: Some("not published: another node failed and --all-or-nothing is set".into()),
            ..Self::failed(node, String::new())
        }
    }

    fn held(node: &str, wave: u32, range: WaveRange) -> Self {
        Self {
            result: "held",
            error: Some(format!(
                "not written: its wave {wave} is outside --waves {range}"
            )),
            ..Self::failed(node, String::new())
        }
    }
}

/// A profile as published.
#[derive(Debug, Clone, Serialize)]
pub struct PublishedProfile {
    /// Its name.
    pub name: String,
    /// Its store path.
    pub path: String,
    /// The activation kind in the manifest (`nixos`, `deploy-rs`, `command`, `none`).
    pub activation: String,
    /// Bytes of its closure.
    pub closure_size: Option<u64>,
}

/// What `publish` did.
#[derive(Debug, Clone, Serialize)]
pub struct PublishReport {
    /// Per node, sorted by name.
    pub nodes: Vec<NodeResult>,
    /// Nix invocations by command (`nix eval`: once per flake, whatever the node count).
    pub nix_invocations: BTreeMap<String, u64>,
    /// Where the manifests went.
    pub destination: String,
}

impl PublishReport {
    /// Whether every node was published.
    pub fn all_published(&self) -> bool {
        self.nodes
            .iter()
            .all(|n| n.result == "published" || n.result == "held")
    }

    /// The node's result, if it was selected.
    pub fn node(&self, name: &str) -> Option<&NodeResult> {
        self.nodes.iter().find(|n| n.node == name)
    }
}

/// Everything `publish` needs, resolved from the command line (or built by a test).
#[derive(Debug)]
pub struct PublishOptions {
    /// Parsed targets.
    pub targets: Vec<target::Target>,
    /// The publisher key.
    pub key: SecretKey,
    /// Where manifests go.
    pub dest: Destination,
    /// Only nodes of these waves (`--waves`, with a folder destination).
    pub waves: Option<WaveRange>,
    /// Nix store URL to copy closures to.
    pub cache: Option<String>,
    /// Key file to sign closures with before copying.
    pub cache_key: Option<PathBuf>,
    /// Substituters written into the manifests.
    pub substituters: Vec<Substituter>,
    /// Skip the build: every path must exist locally or in `cache`.
    pub no_build: bool,
    /// Push the derivations' closures to `cache` too, for nodes that may build.
    pub derivations: bool,
    /// Manifest lifetime.
    pub expires: Duration,
    /// Publish all or nothing.
    pub all_or_nothing: bool,
    /// Wanted version (default: now in milliseconds); raised above the destination's.
    pub version: Option<u64>,
    /// Issue time (default: now).
    pub issued_at: Option<Timestamp>,
    /// How progress is shown.
    pub progress: Progress,
}

impl PublishOptions {
    /// Options with the defaults of the command line: no cache, 30 days, quiet.
    pub fn new(targets: Vec<target::Target>, key: SecretKey, dest: Destination) -> Self {
        Self {
            targets,
            key,
            dest,
            waves: None,
            cache: None,
            cache_key: None,
            substituters: Vec::new(),
            no_build: false,
            derivations: true,
            expires: Duration::from_secs(30 * 86400),
            all_or_nothing: false,
            version: None,
            issued_at: None,
            progress: Progress::Quiet,
        }
    }
}

/// Errors that stop the whole publish; per-node failures are in the report instead.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Bad targets, unknown nodes or profiles: exit 2.
    #[error("{0}")]
    Usage(String),
    /// The flake or its `deploy` output does not evaluate at all.
    #[error("{flake} does not evaluate:\n{message}")]
    Flake {
        /// The flake reference.
        flake: String,
        /// Nix's words.
        message: String,
    },
    /// `--no-build` and some paths are neither local nor in the cache.
    #[error(
        "--no-build: these paths are neither in the local store nor in the cache; build them first or drop --no-build:\n{}",
        .0.join("\n")
    )]
    Missing(Vec<String>),
    /// The destination cannot be reached or written.
    #[error("{0}")]
    Destination(String),
    /// A Nix step that covers every node failed (signing, reading path info).
    #[error("{step}: {source}")]
    Nix {
        /// What was being done.
        step: String,
        /// The failed call.
        source: roost_common::nix::NixError,
    },
}

impl PublishError {
    /// The exit code this error deserves.
    pub fn exit_code(&self) -> u8 {
        match self {
            PublishError::Usage(_) => crate::exit::USAGE,
            _ => crate::exit::FAILED,
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
    // Kept alive until the end: Nix reads it on every upload.
    let netrc = match upload_netrc(&args) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e:#}");
            return crate::exit::USAGE;
        }
    };
    let mut nix_args = args.nix_args.clone();
    if let Some(path) = netrc.as_ref().map(Netrc::path) {
        nix_args.extend(["--option".into(), "netrc-file".into(), path]);
    }
    // Nix's own output is kept for error messages, not forwarded: it would tear through the
    // spinners, and piped runs should stay quiet.
    let nix = Nix::new().with_extra_args(nix_args);
    match publish(&opts, &nix).await {
        Ok(report) => {
            output::print(&report, args.json);
            if report.all_published() {
                crate::exit::OK
            } else {
                crate::exit::FAILED
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// The netrc file Nix authenticates cache uploads with.
enum Netrc {
    Given(PathBuf),
    Made(tempfile::NamedTempFile),
}

impl Netrc {
    fn path(&self) -> String {
        match self {
            Netrc::Given(p) => p.display().to_string(),
            Netrc::Made(f) => f.path().display().to_string(),
        }
    }
}

/// `--cache-netrc`, or one made from $ROOST_UPLOAD_TOKEN for an http(s) cache.
fn upload_netrc(args: &PublishArgs) -> anyhow::Result<Option<Netrc>> {
    if let Some(f) = &args.cache_netrc {
        std::fs::metadata(f).with_context(|| format!("--cache-netrc {}", f.display()))?;
        return Ok(Some(Netrc::Given(f.clone())));
    }
    let Some(cache) = &args.cache else {
        return Ok(None);
    };
    if !(cache.starts_with("http://") || cache.starts_with("https://")) {
        return Ok(None);
    }
    let Ok(token) = std::env::var("ROOST_UPLOAD_TOKEN") else {
        return Ok(None);
    };
    let token = token.trim();
    anyhow::ensure!(
        !token.is_empty() && !token.contains(char::is_whitespace),
        "$ROOST_UPLOAD_TOKEN is empty or contains whitespace"
    );
    let line = netrc_line(cache, token)?;
    use std::io::Write;
    // NamedTempFile is created 0600: the token stays private.
    let mut f =
        tempfile::NamedTempFile::new().context("creating a netrc file for the upload token")?;
    writeln!(f, "{line}")
        .and_then(|()| f.flush())
        .context("writing the netrc file for the upload token")?;
    Ok(Some(Netrc::Made(f)))
}

/// The netrc line that gives `token` to the cache's host only. Nix reads the netrc for every
/// download it makes, so a `default` line would send the token to every host of the
/// publish's Nix calls (the flake's inputs, other substituters).
fn netrc_line(cache: &str, token: &str) -> anyhow::Result<String> {
    let url = reqwest::Url::parse(cache).with_context(|| format!("--cache {cache}"))?;
    let host = url
        .host_str()
        .with_context(|| format!("--cache {cache} names no host"))?;
    // curl matches an IPv6 address without its brackets.
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(format!("machine {host} login roost password {token}"))
}

/// Resolves the command line into options; every error here is bad usage (exit 2).
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
    if let (Some(w), Destination::Coordinator(_)) = (args.waves, &dest) {
        anyhow::bail!(
            "--waves {w} is for --out DIR (a static host, staged by hand); a coordinator (--to) \
             releases the waves itself as their nodes report (roost.rollout)"
        );
    }
    for t in &targets {
        // A local path without a flake: say so now rather than through Nix. (A bare word
        // may be a registry name, so only path-looking references are checked.)
        let f = &t.flake;
        let local = !f.contains(':') && (f.starts_with('.') || f.contains('/'));
        if local && !std::path::Path::new(f).join("flake.nix").exists() {
            anyhow::bail!("target `{f}`: there is no flake.nix in {f}");
        }
    }
    anyhow::ensure!(
        args.expires.as_secs() >= 60,
        "--expires must be at least a minute"
    );
    let mut keys = Vec::new();
    if let Some(f) = &args.cache_key {
        anyhow::ensure!(
            args.cache.is_some(),
            "--cache-key {} needs --cache: there is nothing to sign for",
            f.display()
        );
        let k = SecretKey::read_file(f).with_context(|| format!("cache key {}", f.display()))?;
        keys.push(k.public().to_string());
    }
    for k in &args.cache_public_keys {
        let parsed = k
            .parse::<roost_common::PublicKey>()
            .with_context(|| format!("--cache-public-key {k}"))?;
        if !keys.contains(&parsed.to_string()) {
            keys.push(parsed.to_string());
        }
    }
    let urls: Vec<String> = if args.substituters.is_empty() {
        args.cache.iter().cloned().collect()
    } else {
        args.substituters.clone()
    };
    anyhow::ensure!(
        !urls.is_empty() || keys.is_empty(),
        "--cache-public-key needs --cache or --substituter"
    );
    if let Some(why) = checks::cache_refusal(checks::CacheTrust {
        cache: args.cache.as_deref(),
        substituters: &args.substituters,
        has_key: !keys.is_empty(),
        nodes_trust_paths: args.nodes_trust_paths,
    }) {
        anyhow::bail!(why);
    }
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
        waves: args.waves,
        cache: args.cache.clone(),
        cache_key: args.cache_key.clone(),
        substituters,
        no_build: args.no_build,
        derivations: !args.no_derivations,
        expires: args.expires,
        all_or_nothing: args.all_or_nothing,
        version: args.manifest_version,
        issued_at: args.issued_at,
        progress,
    })
}

#[cfg(test)]
mod tests {
    use super::netrc_line;

    #[test]
    fn the_upload_token_goes_to_the_cache_host_only() {
        for (cache, host) in [
            ("https://roost.acme.org/cache", "roost.acme.org"),
            ("http://127.0.0.1:8080/cache?compression=none", "127.0.0.1"),
            ("https://[::1]:8443/cache", "::1"),
        ] {
            assert_eq!(
                netrc_line(cache, "T0KEN").unwrap(),
                format!("machine {host} login roost password T0KEN"),
                "{cache}"
            );
        }
        assert!(netrc_line("not a url", "T").is_err());
    }
}
