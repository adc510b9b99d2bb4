//! The publish pipeline: evaluate → build → sign and copy → path-info → sign manifests →
//! deliver. Each step runs once for all nodes; a failure is pinned on the nodes it concerns.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use roost_common::envelope::{Context, Envelope};
use roost_common::nix::{Nix, NixError, PathInfo, Tool};
use roost_common::wire::v1::{self, Activation, Manifest};
use roost_common::{StorePath, Timestamp, Version};

use super::checks;
use super::deliver::{Delivery, Staged};
use super::deploy::{self, NodeSpec, Selection};
use super::output::Stage;
use super::{NodeResult, PublishError, PublishOptions, PublishReport, PublishedProfile};

/// How many manifests are staged or delivered at once.
const PARALLEL_DELIVERIES: usize = 16;

/// After this many single-node copies fail with none succeeding, the cache itself is down.
const COPY_PROBES: usize = 3;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a blocking Nix call panicked")
}

/// Publishes. Per-node failures are in the report; an `Err` means nothing was published.
pub async fn publish(opts: &PublishOptions, nix: &Nix) -> Result<PublishReport, PublishError> {
    // Publish evaluates flakes: it asks for them itself, whatever the caller's driver does.
    let nix = &nix.clone().with_flakes();
    let delivery = Delivery::new(opts.dest.clone())?;
    // Fail in a second, not after a long build, when the destination is unreachable.
    delivery.preflight().await?;

    let mut results: BTreeMap<String, NodeResult> = BTreeMap::new();
    let mut specs = evaluate_all(opts, nix, &mut results).await?;
    if let Some(range) = opts.waves {
        hold_outside(range, &mut specs, &mut results);
    }
    warn_without_node_key(&specs);

    let missing = if opts.no_build {
        check_present(opts, nix, &specs).await?
    } else {
        build(opts, nix, &specs, &mut results).await?;
        BTreeSet::new()
    };
    specs.retain(|s| !results.contains_key(s.node.as_str()));
    if give_up(opts, &specs, &mut results) {
        return Ok(report(results, nix, opts));
    }

    // Paths that are only in the cache (--no-build) are neither signed nor copied again.
    let local: Vec<StorePath> = all_paths(&specs)
        .into_iter()
        .filter(|p| !missing.contains(p))
        .collect();
    if let Some(cache) = &opts.cache {
        copy(opts, nix, cache, &specs, &local, &mut results).await?;
        specs.retain(|s| !results.contains_key(s.node.as_str()));
        if give_up(opts, &specs, &mut results) {
            return Ok(report(results, nix, opts));
        }
    }

    let info = path_info(opts, nix, &specs, &missing).await?;
    let activations = activations(opts, nix, &specs, &missing).await;

    let issued_at = opts.issued_at.unwrap_or_else(Timestamp::now);
    let wanted = opts.version.unwrap_or_else(now_ms);
    let stage = Stage::start(
        opts.progress,
        format!("signing {} manifest(s)", specs.len()),
    );
    let staged = stage_all(
        opts,
        &delivery,
        &specs,
        &info,
        &activations,
        issued_at,
        wanted,
    )
    .await;
    stage.done(format!("signed {} manifest(s)", specs.len()));
    let last_issued = staged
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok()?.1.replaces_issued_at)
        .max();
    if let Some(w) = checks::expiry_warning(opts.expires, last_issued, issued_at) {
        tracing::warn!("{w}");
    }

    let mut ready = Vec::new();
    for (node, r) in staged {
        match r {
            Ok(x) => ready.push(x),
            Err(e) => {
                results.insert(node.clone(), NodeResult::failed(&node, e));
            }
        }
    }
    if opts.all_or_nothing && any_failed(&results) {
        for (result, staged) in ready {
            staged.discard();
            results.insert(result.node.clone(), NodeResult::skipped(&result.node));
        }
        return Ok(report(results, nix, opts));
    }

    let stage = Stage::start(
        opts.progress,
        format!("delivering {} manifest(s) to {}", ready.len(), opts.dest),
    );
    for (result, outcome) in commit_all(&delivery, ready).await {
        let node = result.node.clone();
        results.insert(
            node.clone(),
            match outcome {
                Ok(()) => result,
                Err(e) => NodeResult::failed(&node, e),
            },
        );
    }
    stage.done(format!("delivered to {}", opts.dest));
    Ok(report(results, nix, opts))
}

/// Whether some node failed (a node `held` by `--waves` did not).
fn any_failed(results: &BTreeMap<String, NodeResult>) -> bool {
    results.values().any(|r| r.result != "held")
}

/// `--waves`: nodes of other waves are neither built nor written (`held`).
fn hold_outside(
    range: super::WaveRange,
    specs: &mut Vec<NodeSpec>,
    results: &mut BTreeMap<String, NodeResult>,
) {
    specs.retain(|s| {
        let keep = range.contains(s.wave);
        if !keep {
            let node = s.node.to_string();
            results.insert(node.clone(), NodeResult::held(&node, s.wave, range));
        }
        keep
    });
    tracing::info!(
        "--waves {range}: {} node(s) to write, {} held",
        specs.len(),
        results.values().filter(|r| r.result == "held").count()
    );
}

/// Nodes without `roost.nodeKey` get their report key pinned by whoever reports first for
/// their name (trust on first use): say so, and what to do instead.
fn warn_without_node_key(specs: &[NodeSpec]) {
    let open: Vec<&str> = specs
        .iter()
        .filter(|s| s.node_key.is_none())
        .map(|s| s.node.as_str())
        .collect();
    if open.is_empty() {
        return;
    }
    let shown = open.iter().take(10).copied().collect::<Vec<_>>().join(", ");
    let more = open.len().saturating_sub(10);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    tracing::warn!(
        "no roost.nodeKey for {shown}{more}: a coordinator trusts the key of the first report \
         for such a node (trust on first use). Set roost.nodeKey to the node's key \
         (`roost-agent key` prints it), or pin it with `roost-coordinator node-key` \
         (README: Enrolment)"
    );
}

/// Under `--all-or-nothing`, once a node failed the rest is skipped (no copy, no reads).
fn give_up(
    opts: &PublishOptions,
    specs: &[NodeSpec],
    results: &mut BTreeMap<String, NodeResult>,
) -> bool {
    if !opts.all_or_nothing || !any_failed(results) {
        return false;
    }
    for s in specs {
        let node = s.node.to_string();
        results.insert(node.clone(), NodeResult::skipped(&node));
    }
    true
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn report(
    results: BTreeMap<String, NodeResult>,
    nix: &Nix,
    opts: &PublishOptions,
) -> PublishReport {
    PublishReport {
        nodes: results.into_values().collect(),
        nix_invocations: nix.counts(),
        destination: opts.dest.to_string(),
    }
}

fn all_paths(specs: &[NodeSpec]) -> Vec<StorePath> {
    specs
        .iter()
        .flat_map(|s| s.profiles.iter().map(|p| p.path.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Targets grouped by flake: `None` selects every node of that flake.
fn group(targets: &[super::target::Target]) -> BTreeMap<String, Option<Selection>> {
    let mut by_flake: BTreeMap<String, Option<Selection>> = BTreeMap::new();
    for t in targets {
        let entry = by_flake
            .entry(t.flake.clone())
            .or_insert_with(|| Some(BTreeMap::new()));
        let (Some(n), Some(sel)) = (&t.node, entry.as_mut()) else {
            if t.node.is_none() {
                *entry = None;
            }
            continue;
        };
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
    by_flake
}

/// One evaluation per flake (of its locked reference, so `source` is exactly what was read).
async fn evaluate_all(
    opts: &PublishOptions,
    nix: &Nix,
    results: &mut BTreeMap<String, NodeResult>,
) -> Result<Vec<NodeSpec>, PublishError> {
    let mut specs: Vec<NodeSpec> = Vec::new();
    let mut origin: BTreeMap<String, String> = BTreeMap::new();
    for (flake, selection) in group(&opts.targets) {
        let stage = Stage::start(opts.progress, format!("evaluating {flake}"));
        let (n, f) = (nix.clone(), flake.clone());
        let (source, evaluated) = blocking(move || {
            let source = deploy::source(&n, &f)?;
            let evaluated = deploy::evaluate(&n, &f, selection.as_ref(), &source)?;
            Ok::<_, PublishError>((source, evaluated))
        })
        .await?;
        if source.dirty {
            tracing::warn!("{}", checks::dirty_warning(&flake));
        }
        stage.done(format!(
            "evaluated {flake}: {} node(s) ready, {} failed",
            evaluated.nodes.len(),
            evaluated.failures.len()
        ));
        let names = evaluated
            .nodes
            .iter()
            .map(|s| s.node.to_string())
            .chain(evaluated.failures.keys().cloned());
        for name in names {
            if let Some(other) = origin.insert(name.clone(), flake.clone()) {
                return Err(PublishError::Usage(format!(
                    "node `{name}` is selected from two flakes ({other} and {flake}); a node has one manifest"
                )));
            }
        }
        for (node, e) in evaluated.failures {
            let msg = format!("evaluation failed:\n{e}");
            results.insert(node.clone(), NodeResult::failed(&node, msg));
        }
        specs.extend(evaluated.nodes);
    }
    Ok(specs)
}

/// `--no-build`: the paths that are only in the cache; stops when some are nowhere.
async fn check_present(
    opts: &PublishOptions,
    nix: &Nix,
    specs: &[NodeSpec],
) -> Result<BTreeSet<StorePath>, PublishError> {
    let paths = all_paths(specs);
    let stage = Stage::start(
        opts.progress,
        format!("checking that {} path(s) exist (--no-build)", paths.len()),
    );
    let mut not_local = invalid_paths(nix, &paths).await?;
    let mut nowhere = not_local.clone();
    if let (Some(cache), false) = (&opts.cache, not_local.is_empty()) {
        let (n, c, p) = (
            nix.clone(),
            cache.clone(),
            not_local.iter().cloned().collect::<Vec<_>>(),
        );
        let found = blocking(move || n.path_info(&p, Some(&c), false))
            .await
            .map_err(|source| PublishError::Nix {
                step: format!("looking paths up in {cache}"),
                source,
            })?;
        for f in found {
            nowhere.remove(&f.path);
        }
    }
    stage.done(format!(
        "{} path(s) local, {} only in the cache, {} missing",
        paths.len() - not_local.len(),
        not_local.len() - nowhere.len(),
        nowhere.len()
    ));
    if !nowhere.is_empty() {
        let mut lines = Vec::new();
        for s in specs {
            for p in s.profiles.iter().filter(|p| nowhere.contains(&p.path)) {
                lines.push(format!("  {}.{}: {}", s.node, p.name, p.path));
            }
        }
        return Err(PublishError::Missing(lines));
    }
    not_local.retain(|p| !nowhere.contains(p));
    Ok(not_local)
}

/// Whether this Nix reads `DRV^*` (all outputs); older ones build a bare `.drv` path's
/// outputs, newer ones take a bare `.drv` for the file itself.
fn caret_installables(nix: &Nix) -> bool {
    let Ok(out) = nix.run(
        Tool::Nix,
        &["--version".to_owned()],
        Some(Duration::from_secs(30)),
    ) else {
        return false;
    };
    let text = String::from_utf8_lossy(&out);
    let version = text.split_whitespace().last().unwrap_or("");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 13)
}

/// One `nix build --keep-going` of every selected derivation; nodes whose outputs are then
/// missing fail with the builder's own words.
async fn build(
    opts: &PublishOptions,
    nix: &Nix,
    specs: &[NodeSpec],
    results: &mut BTreeMap<String, NodeResult>,
) -> Result<(), PublishError> {
    let drvs: BTreeSet<StorePath> = specs
        .iter()
        .flat_map(|s| s.profiles.iter())
        .filter_map(|p| p.drv_path.clone())
        .collect();
    let stage = Stage::start(
        opts.progress,
        format!("building {} derivation(s) in one `nix build`", drvs.len()),
    );
    let mut build_error: Option<NixError> = None;
    if !drvs.is_empty() {
        let n = stage.nix(nix);
        build_error = blocking(move || {
            let caret = caret_installables(&n);
            let installables: Vec<String> = drvs
                .iter()
                .map(|d| {
                    if caret {
                        format!("{d}^*")
                    } else {
                        d.to_string()
                    }
                })
                .collect();
            n.build(&installables, true).err()
        })
        .await;
    }
    let missing = invalid_paths(nix, &all_paths(specs)).await?;
    stage.done(format!("built; {} output(s) missing", missing.len()));
    for s in specs {
        let mut why = Vec::new();
        for p in s.profiles.iter().filter(|p| missing.contains(&p.path)) {
            let text = match (&p.drv_path, &build_error) {
                (None, _) => format!(
                    "{} is not in the store and is not a derivation that could build it",
                    p.path
                ),
                (Some(drv), Some(e)) => build_failure(nix, drv, e).await,
                (Some(drv), None) => format!("{drv} built but {} is not valid", p.path),
            };
            why.push(format!("profile `{}`: {text}", p.name));
        }
        if !why.is_empty() {
            let node = s.node.to_string();
            let msg = format!("build failed:\n{}", why.join("\n"));
            results.insert(node.clone(), NodeResult::failed(&node, msg));
        }
    }
    Ok(())
}

/// What Nix said about `drv` failing: its block in the build's stderr, else its build log,
/// else every error the build printed (a dependency failed).
async fn build_failure(nix: &Nix, drv: &StorePath, e: &NixError) -> String {
    let blocks = error_blocks(&e.stderr_tail);
    let mine: Vec<&String> = blocks
        .iter()
        .filter(|b| b.contains(drv.as_str()) && !b.starts_with("error: build of "))
        .collect();
    if !mine.is_empty() {
        return mine
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n");
    }
    let (n, d) = (nix.clone(), drv.to_string());
    let log = blocking(move || n.run(Tool::Nix, &["log".to_owned(), d], None)).await;
    if let Ok(log) = log {
        let text = String::from_utf8_lossy(&log);
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(10)..];
        return format!(
            "builder for '{drv}' failed; last log lines:\n{}",
            tail.iter()
                .map(|l| format!("> {l}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    if blocks.is_empty() {
        e.to_string()
    } else {
        format!(
            "'{drv}' was not built; the build said:\n{}",
            blocks.join("\n")
        )
    }
}

/// Nix's `error: …` messages with their indented continuation lines.
fn error_blocks(stderr: &str) -> Vec<String> {
    let mut blocks: Vec<String> = Vec::new();
    let mut inside = false;
    for line in stderr.lines() {
        if line.starts_with("error") {
            blocks.push(line.to_owned());
            inside = true;
        } else if inside && line.starts_with(' ') {
            if let Some(b) = blocks.last_mut() {
                b.push('\n');
                b.push_str(line);
            }
        } else {
            inside = false;
        }
    }
    blocks
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
        .await
        .map_err(|source| PublishError::Nix {
            step: "checking which paths are in the local store".into(),
            source,
        })?
        .into_iter()
        .map(|i| i.path)
        .collect();
    Ok(paths
        .iter()
        .filter(|p| !valid.contains(*p))
        .cloned()
        .collect())
}

/// Signs (with `--cache-key`) and copies the local closures to the cache in one call each;
/// when the copy fails, node by node to find whose closure the cache refuses.
async fn copy(
    opts: &PublishOptions,
    nix: &Nix,
    cache: &str,
    specs: &[NodeSpec],
    local: &[StorePath],
    results: &mut BTreeMap<String, NodeResult>,
) -> Result<(), PublishError> {
    if local.is_empty() {
        return Ok(());
    }
    let stage = Stage::start(
        opts.progress,
        format!("copying {} closure(s) to {cache}", local.len()),
    );
    if let Some(k) = &opts.cache_key {
        let (n, key, p) = (stage.nix(nix), k.clone(), local.to_vec());
        blocking(move || n.sign(&key, &p))
            .await
            .map_err(|source| PublishError::Nix {
                step: format!("signing the closures with {}", k.display()),
                source,
            })?;
    }
    let (n, c, p) = (stage.nix(nix), cache.to_owned(), local.to_vec());
    let Err(whole) = blocking(move || n.copy_to(&c, &p)).await else {
        stage.done(format!("copied {} closure(s) to {cache}", local.len()));
        return copy_derivations(opts, nix, cache, specs, results).await;
    };
    let mut copied_any = false;
    let mut failures = 0;
    for s in specs {
        let node = s.node.to_string();
        let mine: Vec<StorePath> = s
            .profiles
            .iter()
            .map(|p| p.path.clone())
            .filter(|p| local.contains(p))
            .collect();
        if mine.is_empty() {
            continue;
        }
        if !copied_any && failures >= COPY_PROBES {
            let msg = format!("copy to {cache} failed for every node tried:\n{whole}");
            results.insert(node.clone(), NodeResult::failed(&node, msg));
            continue;
        }
        let (n, c) = (stage.nix(nix), cache.to_owned());
        match blocking(move || n.copy_to(&c, &mine)).await {
            Ok(()) => copied_any = true,
            Err(e) => {
                failures += 1;
                let msg = format!("copy to {cache} failed:\n{e}");
                results.insert(node.clone(), NodeResult::failed(&node, msg));
            }
        }
    }
    stage.done(format!("copied to {cache}, {failures} node(s) refused"));
    let copied: Vec<NodeSpec> = specs
        .iter()
        .filter(|s| !results.contains_key(s.node.as_str()))
        .cloned()
        .collect();
    copy_derivations(opts, nix, cache, &copied, results).await
}

/// Signs and copies the derivations' closures (unless `--no-derivations`), so a node that
/// may build finds what building needs; when that fails, every node with a derivation
/// fails with the reason.
async fn copy_derivations(
    opts: &PublishOptions,
    nix: &Nix,
    cache: &str,
    specs: &[NodeSpec],
    results: &mut BTreeMap<String, NodeResult>,
) -> Result<(), PublishError> {
    let drvs: Vec<StorePath> = specs
        .iter()
        .flat_map(|s| s.profiles.iter().filter_map(|p| p.drv_path.clone()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if !opts.derivations || drvs.is_empty() {
        return Ok(());
    }
    let stage = Stage::start(
        opts.progress,
        format!(
            "copying {} derivation(s) to {cache}, for nodes that may build",
            drvs.len()
        ),
    );
    let (n, c, key, d) = (
        stage.nix(nix),
        cache.to_owned(),
        opts.cache_key.clone(),
        drvs.clone(),
    );
    let copied = blocking(move || {
        if let Some(k) = &key {
            n.sign_derivations(k, &d)?;
        }
        n.copy_derivations_to(&c, &d)
    })
    .await;
    match copied {
        Ok(()) => stage.done(format!("copied {} derivation(s) to {cache}", drvs.len())),
        Err(e) => {
            stage.done(format!("copying the derivations to {cache} failed"));
            for s in specs
                .iter()
                .filter(|s| s.profiles.iter().any(|p| p.drv_path.is_some()))
            {
                let node = s.node.to_string();
                let msg = format!(
                    "copying the derivations to {cache} (for nodes that may build; \
                     --no-derivations skips it) failed:\n{e}"
                );
                results.insert(node.clone(), NodeResult::failed(&node, msg));
            }
        }
    }
    Ok(())
}

/// NAR hash and closure size of every path: one call for the local store, one for the
/// paths only in the cache.
async fn path_info(
    opts: &PublishOptions,
    nix: &Nix,
    specs: &[NodeSpec],
    cache_only: &BTreeSet<StorePath>,
) -> Result<BTreeMap<StorePath, PathInfo>, PublishError> {
    let (remote, local): (Vec<StorePath>, Vec<StorePath>) = all_paths(specs)
        .into_iter()
        .partition(|p| cache_only.contains(p));
    let mut out = BTreeMap::new();
    for (paths, store) in [(local, None), (remote, opts.cache.clone())] {
        if paths.is_empty() {
            continue;
        }
        let n = nix.clone();
        let what = store.clone().unwrap_or_else(|| "the local store".into());
        let infos = blocking(move || n.path_info(&paths, store.as_deref(), true))
            .await
            .map_err(|source| PublishError::Nix {
                step: format!("reading NAR hashes and closure sizes from {what}"),
                source,
            })?;
        out.extend(infos.into_iter().map(|i| (i.path.clone(), i)));
    }
    Ok(out)
}

/// The activation kind of every profile without `roost.activation`, from its output.
async fn activations(
    opts: &PublishOptions,
    nix: &Nix,
    specs: &[NodeSpec],
    cache_only: &BTreeSet<StorePath>,
) -> BTreeMap<StorePath, Activation> {
    let mut out = BTreeMap::new();
    for p in specs.iter().flat_map(|s| s.profiles.iter()) {
        if p.activation.is_some() || out.contains_key(&p.path) {
            continue;
        }
        let kind = match (&opts.cache, cache_only.contains(&p.path)) {
            (Some(cache), true) => {
                let (n, c, path) = (nix.clone(), cache.clone(), p.path.clone());
                blocking(move || {
                    let has = |rel: &str| {
                        n.run(
                            Tool::Nix,
                            &[
                                "store".into(),
                                "ls".into(),
                                "--store".into(),
                                c.clone(),
                                format!("{path}/{rel}"),
                            ],
                            None,
                        )
                        .is_ok()
                    };
                    deploy::activation_from_entries(
                        has("deploy-rs-activate"),
                        has("bin/switch-to-configuration"),
                    )
                })
                .await
            }
            _ => deploy::detect_activation(&p.path),
        };
        out.insert(p.path.clone(), kind);
    }
    out
}

/// The manifest of one node.
fn manifest(
    opts: &PublishOptions,
    s: &NodeSpec,
    info: &BTreeMap<StorePath, PathInfo>,
    activations: &BTreeMap<StorePath, Activation>,
    issued_at: Timestamp,
    version: u64,
) -> Manifest {
    let profiles = s
        .profiles
        .iter()
        .map(|p| {
            let i = info.get(&p.path);
            let activation = p
                .activation
                .clone()
                .or_else(|| activations.get(&p.path).cloned())
                .unwrap_or_default();
            p.to_wire(
                activation,
                i.map(|i| i.nar_hash.clone()),
                i.and_then(|i| i.closure_size),
            )
        })
        .collect();
    Manifest {
        format: v1::FORMAT,
        node: s.node.clone(),
        system: s.system.clone(),
        version: Version(version),
        issued_at,
        expires_at: issued_at.plus(opts.expires),
        source: Some(s.source.clone()),
        substituters: opts.substituters.clone(),
        node_key: s.node_key.clone(),
        profiles,
        rollout: v1::Rollout {
            wave: s.wave,
            id: None,
            min_healthy: s.rollout.min_healthy,
            max_failed: s.rollout.max_failed,
            bake_time_s: s.rollout.bake_time_s,
            waves: Vec::new(),
        },
    }
}

/// How many of the nodes being published are in each wave, lowest wave first.
fn wave_plan(specs: &[NodeSpec]) -> Vec<v1::WaveSize> {
    let mut by_wave: BTreeMap<u32, u32> = BTreeMap::new();
    for s in specs {
        *by_wave.entry(s.wave).or_default() += 1;
    }
    by_wave
        .into_iter()
        .map(|(wave, nodes)| v1::WaveSize { wave, nodes })
        .collect()
}

type StagedNode = (String, Result<(NodeResult, Staged), String>);

/// Reads each node's current version, signs its manifest one version above, and stages it.
#[allow(clippy::too_many_arguments)]
async fn stage_all(
    opts: &PublishOptions,
    delivery: &Delivery,
    specs: &[NodeSpec],
    info: &BTreeMap<StorePath, PathInfo>,
    activations: &BTreeMap<StorePath, Activation>,
    issued_at: Timestamp,
    wanted: u64,
) -> Vec<StagedNode> {
    let key = Arc::new(opts.key.clone());
    let plan = wave_plan(specs);
    let jobs = specs.iter().map(|s| {
        let (d, s) = (delivery.clone(), s.clone());
        let mut m = manifest(opts, &s, info, activations, issued_at, wanted);
        // One publish, one rollout: a coordinator releases it wave by wave (§6.9).
        m.rollout.id = Some(wanted);
        m.rollout.waves = plan.clone();
        let key = key.clone();
        let node = s.node.to_string();
        (node.clone(), async move {
            let r = async {
                let current = d.current(&s.node).await?;
                if let Some(c) = current {
                    m.version = Version(m.version.0.max(c.version + 1));
                }
                let payload = serde_json::to_vec(&m).map_err(|e| e.to_string())?;
                let bytes = Envelope::seal(Context::Manifest, &payload, &[&key]).to_bytes();
                let mut staged = d.stage(&s.node, bytes)?;
                staged.replaces_issued_at = current.and_then(|c| c.issued_at);
                let result = NodeResult {
                    node: node.clone(),
                    result: "published",
                    version: Some(m.version.0),
                    profiles: m
                        .profiles
                        .iter()
                        .map(|p| PublishedProfile {
                            name: p.name.to_string(),
                            path: p.path.to_string(),
                            activation: activation_kind(&p.activation).to_owned(),
                            closure_size: p.closure_size,
                        })
                        .collect(),
                    closure_size: m.profiles.iter().map(|p| p.closure_size).sum(),
                    location: Some(d.location(&s.node)),
                    error: None,
                };
                Ok((result, staged))
            }
            .await;
            (node, r)
        })
    });
    bounded(jobs, |node, panic| (node, Err(panic))).await
}

fn activation_kind(a: &Activation) -> &'static str {
    match a {
        Activation::Nixos { .. } => "nixos",
        Activation::DeployRs => "deploy-rs",
        Activation::Command { .. } => "command",
        Activation::None => "none",
    }
}

/// Makes every staged manifest visible.
async fn commit_all(
    delivery: &Delivery,
    ready: Vec<(NodeResult, Staged)>,
) -> Vec<(NodeResult, Result<(), String>)> {
    let jobs = ready.into_iter().map(|(result, staged)| {
        let d = delivery.clone();
        (result.clone(), async move {
            let r = d.commit(staged).await;
            (result, r)
        })
    });
    bounded(jobs, |result, panic| (result, Err(panic))).await
}

/// Runs `jobs` at most [`PARALLEL_DELIVERIES`] at a time and returns every outcome: a job
/// that panics is not dropped but becomes `failed(its key, "… panicked: MESSAGE")`, so its
/// node fails in the report instead of going missing.
async fn bounded<K, T, F>(
    jobs: impl IntoIterator<Item = (K, F)>,
    failed: impl Fn(K, String) -> T,
) -> Vec<T>
where
    K: Send + 'static,
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let mut keys = std::collections::HashMap::new();
    let mut out = Vec::new();
    let mut collect =
        |r: Result<(tokio::task::Id, T), tokio::task::JoinError>,
         keys: &mut std::collections::HashMap<tokio::task::Id, K>| {
            match r {
                Ok((id, t)) => {
                    keys.remove(&id);
                    out.push(t);
                }
                Err(e) => {
                    let Some(key) = keys.remove(&e.id()) else {
                        return;
                    };
                    let why = if e.is_panic() {
                        let p = e.into_panic();
                        let msg = p
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_owned())
                            .or_else(|| p.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "(no message)".into());
                        format!("publishing this node panicked: {msg}")
                    } else {
                        "publishing this node was cancelled".to_owned()
                    };
                    tracing::error!("{why}");
                    out.push(failed(key, why));
                }
            }
        };
    for (key, job) in jobs {
        if set.len() >= PARALLEL_DELIVERIES {
            if let Some(r) = set.join_next_with_id().await {
                collect(r, &mut keys);
            }
        }
        keys.insert(set.spawn(job).id(), key);
    }
    while let Some(r) = set.join_next_with_id().await {
        collect(r, &mut keys);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::target::parse;

    #[tokio::test]
    async fn a_panicked_job_fails_its_node_with_the_panic_message_and_the_others_finish() {
        let jobs = (0..40).map(|i| {
            (format!("node-{i}"), async move {
                if i == 7 {
                    panic!("boom in node 7");
                }
                (format!("node-{i}"), Ok::<u32, String>(i))
            })
        });
        let mut out = bounded(jobs, |node, why| (node, Err(why))).await;
        out.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(out.len(), 40, "a job went missing");
        let failed: Vec<_> = out.iter().filter(|(_, r)| r.is_err()).collect();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, "node-7");
        let why = failed[0].1.as_ref().unwrap_err();
        assert!(why.contains("panicked: boom in node 7"), "{why}");
    }

    #[test]
    fn targets_of_one_flake_merge_into_one_selection() {
        let t = [".#a.system", ".#a.home", ".#b", "other#c.x"].map(|t| parse(t).unwrap());
        let g = group(&t);
        let here = g["."].as_ref().unwrap();
        assert_eq!(
            here["a"].as_ref().unwrap().iter().collect::<Vec<_>>(),
            ["home", "system"]
        );
        assert!(here["b"].is_none());
        assert!(g["other"].as_ref().unwrap().contains_key("c"));
    }

    #[test]
    fn a_whole_flake_target_selects_every_node() {
        let t = [".#a", "."].map(|t| parse(t).unwrap());
        assert!(group(&t)["."].is_none());
    }

    #[test]
    fn a_whole_node_target_beats_its_profile_targets() {
        let t = [".#a.system", ".#a"].map(|t| parse(t).unwrap());
        assert!(group(&t)["."].as_ref().unwrap()["a"].is_none());
    }

    #[test]
    fn build_errors_split_into_blocks() {
        let s = "building '/nix/store/x.drv'...\nerror: builder for '/nix/store/a.drv' failed with exit code 1;\n       last 2 log lines:\n       > oops\nerror: build of '/nix/store/a.drv' failed\n";
        let b = error_blocks(s);
        assert_eq!(b.len(), 2);
        assert!(b[0].contains("> oops"));
    }
}
