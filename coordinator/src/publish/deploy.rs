//! Reading deploy-rs's `deploy` schema (unchanged) plus roost's `roost.*` keys in one
//! evaluation, and merging settings with profile > node > deploy precedence.
//!
//! One `nix eval --json FLAKE#deploy --apply F` covers every selected node. `F` wraps each
//! node in `builtins.tryEval (builtins.deepSeq …)`, so a node that `throw`s or fails an
//! `assert` comes back as `{ error = true; }` and the others still publish. `tryEval` cannot
//! catch everything (missing attributes, type errors, `abort`, infinite recursion): when
//! such an error sinks the whole evaluation, [`evaluate`] first checks that the flake itself
//! evaluates (no node selected), then halves the selection until each broken node stands
//! alone, so a fleet with k broken nodes costs O(k log n) extra evaluations, and none when
//! every node is fine. Nix's own message for a broken node comes from evaluating that node
//! alone, only when it failed.

use std::collections::{BTreeMap, BTreeSet};

use roost_common::nix::{Nix, NixError};
use roost_common::schedule::Window;
use roost_common::wire::v1::{Activation, Fraction, HealthCheck, Profile, RebootPolicy, Source};
use roost_common::{NodeName, ProfileName, ProfilePath, PublicKey, StorePath};
use serde_json::{Map, Value};

use super::PublishError;

/// Selected nodes, each with its selected profiles (all when `None`).
pub type Selection = BTreeMap<String, Option<BTreeSet<String>>>;

/// A node ready to be published.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Its name.
    pub node: NodeName,
    /// Its Nix system.
    pub system: String,
    /// `roost.nodeKey`.
    pub node_key: Option<PublicKey>,
    /// `roost.wave`.
    pub wave: u32,
    /// `roost.rollout` of its flake's `deploy`.
    pub rollout: RolloutPolicy,
    /// Profiles in activation order.
    pub profiles: Vec<ProfileSpec>,
    /// The flake it came from.
    pub source: Source,
}

/// `deploy.roost.rollout`: how a coordinator releases the publish wave by wave.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RolloutPolicy {
    /// `minHealthy`: the fraction of a wave that must report success.
    pub min_healthy: Fraction,
    /// `maxFailed`: failures a wave may have before the rollout halts.
    pub max_failed: u32,
    /// `bakeTime`, in seconds.
    pub bake_time_s: u64,
}

/// Reads `deploy.roost.rollout`; an error names the attribute and what it must be.
pub fn rollout_policy(deploy: &Map<String, Value>) -> Result<RolloutPolicy, String> {
    const AT: &str = "deploy.roost.rollout";
    let mut p = RolloutPolicy::default();
    let Some(r) = deploy
        .get("roost")
        .and_then(|r| r.get("rollout"))
        .filter(|v| !v.is_null())
    else {
        return Ok(p);
    };
    let Some(r) = r.as_object() else {
        return Err(format!(
            "{AT} must be an attribute set {{ minHealthy; maxFailed; bakeTime; }}, not {r}"
        ));
    };
    for (k, v) in r {
        let bad = |what: &str| format!("{AT}.{k} must be {what}, not {v}");
        match k.as_str() {
            _ if v.is_null() => {}
            "minHealthy" => {
                p.min_healthy = v
                    .as_f64()
                    .and_then(Fraction::new)
                    .ok_or_else(|| bad("a number from 0 to 1 (a fraction of the wave's nodes)"))?;
            }
            "maxFailed" => {
                p.max_failed = v
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| bad("a whole number of nodes (0 or more)"))?;
            }
            "bakeTime" => {
                p.bake_time_s = match v {
                    Value::String(d) => roost_common::time::parse_duration(d)
                        .map(|d| d.as_secs())
                        .map_err(|e| format!("{AT}.bakeTime: {e}"))?,
                    _ => v
                        .as_u64()
                        .ok_or_else(|| bad("a duration such as \"10min\" or whole seconds"))?,
                };
            }
            _ => {
                return Err(format!(
                    "{AT}.{k} is not a rollout setting (minHealthy, maxFailed, bakeTime)"
                ));
            }
        }
    }
    Ok(p)
}

/// A profile ready to be published: everything but what only the built output tells.
#[derive(Debug, Clone)]
pub struct ProfileSpec {
    /// Its name.
    pub name: ProfileName,
    /// Its store path.
    pub path: StorePath,
    /// Its derivation, when `path` is a derivation.
    pub drv_path: Option<StorePath>,
    /// `roost.activation`, when set; otherwise read from the built output.
    pub activation: Option<Activation>,
    user: String,
    profile_path: Option<ProfilePath>,
    activation_timeout_s: u64,
    confirm_timeout_s: u64,
    auto_rollback: bool,
    magic_rollback: bool,
    health_checks: Vec<HealthCheck>,
    apply_windows: Vec<Window>,
    reboot: RebootPolicy,
    reboot_windows: Vec<Window>,
}

impl ProfileSpec {
    /// The wire form, given what the build and the store said.
    pub fn to_wire(
        &self,
        activation: Activation,
        nar_hash: Option<String>,
        closure_size: Option<u64>,
    ) -> Profile {
        Profile {
            name: self.name.clone(),
            path: self.path.clone(),
            nar_hash,
            closure_size,
            drv_path: self.drv_path.clone(),
            user: self.user.clone(),
            profile_path: self.profile_path.clone(),
            activation,
            activation_timeout_s: self.activation_timeout_s,
            confirm_timeout_s: self.confirm_timeout_s,
            auto_rollback: self.auto_rollback,
            magic_rollback: self.magic_rollback,
            health_checks: self.health_checks.clone(),
            apply_windows: self.apply_windows.clone(),
            reboot: self.reboot,
            reboot_windows: self.reboot_windows.clone(),
        }
    }
}

/// The activation kind of a built output, from what it contains.
///
/// `deploy-rs-activate` wins over `bin/switch-to-configuration`: deploy-rs's
/// `lib.activate.nixos` adds the former to a NixOS system that also has the latter, and its
/// script is what the flake's author asked for.
pub fn activation_from_entries(has_deploy_rs: bool, has_switch: bool) -> Activation {
    if has_deploy_rs {
        Activation::DeployRs
    } else if has_switch {
        Activation::Nixos {
            goal: Default::default(),
        }
    } else {
        Activation::None
    }
}

/// The activation kind of an output in the local store.
pub fn detect_activation(path: &StorePath) -> Activation {
    let p = path.as_path();
    activation_from_entries(
        p.join("deploy-rs-activate").exists(),
        p.join("bin/switch-to-configuration").exists(),
    )
}

/// The result of evaluating one flake.
#[derive(Debug)]
pub struct Evaluated {
    /// Nodes that evaluated.
    pub nodes: Vec<NodeSpec>,
    /// Nodes that did not, with Nix's words.
    pub failures: BTreeMap<String, String>,
}

/// The generic settings publish reads at each level; nothing else is evaluated.
///
/// `sshUser` is read only as the fallback for `user`, as deploy-rs does; `profilePath` only
/// counts at profile level (deploy-rs's `ProfileSettings`), though it is picked everywhere.
const SETTINGS: &str = "{ user = 0; sshUser = 0; profilePath = 0; autoRollback = 0; magicRollback = 0; activationTimeout = 0; confirmTimeout = 0; roost = 0; }";

/// The `--apply` function. `selected` is JSON: `null` (every node) or `{NODE: null |
/// [PROFILE…]}`; with `catch` off a broken node fails the evaluation with Nix's message.
fn apply_expr(selected: &Value, catch: bool) -> String {
    let sel = nix_string(&selected.to_string());
    format!(
        r#"deploy: let
  selected = builtins.fromJSON {sel};
  catch = {catch};
  nodes = deploy.nodes or {{ }};
  names = builtins.attrNames nodes;
  pick = builtins.intersectAttrs {SETTINGS};
  profileInfo = p:
    if !(p ? path) then {{ error = "has no `path`"; }}
    else let path = p.path; isDrv = builtins.isAttrs path; in {{
      path = if isDrv then path.outPath else toString path;
      drvPath = if isDrv && path ? drvPath then path.drvPath else null;
      system = if isDrv && path ? system then path.system else null;
      settings = pick p;
    }};
  evalNode = name: wanted:
    if !(builtins.hasAttr name nodes) then {{ missing = true; }}
    else let
      n = nodes.${{name}};
      all = n.profiles or {{ }};
      chosen = if wanted == null then all
        else builtins.intersectAttrs (builtins.listToAttrs (map (p: {{ name = p; value = 0; }}) wanted)) all;
      value = {{
        profileNames = builtins.attrNames all;
        settings = pick n;
        profilesOrder = n.profilesOrder or [ ];
        profiles = builtins.mapAttrs (_: profileInfo) chosen;
      }};
      forced = builtins.deepSeq value value;
      r = builtins.tryEval forced;
    in if !catch then forced else if r.success then r.value else {{ error = true; }};
  sel = if selected == null
    then builtins.listToAttrs (map (name: {{ inherit name; value = null; }}) names)
    else selected;
in {{
  inherit names;
  settings = pick deploy;
  nodes = builtins.mapAttrs evalNode sel;
}}"#
    )
}

/// A Nix string literal.
fn nix_string(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace("${", "\\${")
    )
}

fn selection_json(sel: &[(String, Option<BTreeSet<String>>)]) -> Value {
    Value::Object(
        sel.iter()
            .map(|(n, ps)| {
                let v = match ps {
                    None => Value::Null,
                    Some(ps) => Value::Array(ps.iter().cloned().map(Value::String).collect()),
                };
                (n.clone(), v)
            })
            .collect(),
    )
}

fn eval(nix: &Nix, flake: &str, selected: &Value, catch: bool) -> Result<Value, NixError> {
    nix.eval_json(
        &format!("{flake}#deploy"),
        Some(&apply_expr(selected, catch)),
    )
}

/// Nix's error message without the hint about `--show-trace`.
pub fn nix_message(e: &NixError) -> String {
    let lines: Vec<&str> = e
        .stderr_tail
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("--show-trace"))
        .collect();
    let start = lines
        .iter()
        .position(|l| l.starts_with("error"))
        .unwrap_or(0);
    let text = lines[start..].join("\n");
    if text.is_empty() { e.to_string() } else { text }
}

/// Evaluates the selected nodes of `flake` (every node when `selection` is `None`), at the
/// locked reference in `source`, so the recorded source is exactly what was evaluated.
///
/// Unknown nodes or profiles are a usage error naming what exists; a node that fails to
/// evaluate is in `failures`; an `Err` means the flake or its `deploy` output itself is broken.
pub fn evaluate(
    nix: &Nix,
    flake: &str,
    selection: Option<&Selection>,
    source: &Source,
) -> Result<Evaluated, PublishError> {
    let sel_json = match selection {
        None => Value::Null,
        Some(s) => selection_json(&s.clone().into_iter().collect::<Vec<_>>()),
    };
    let locked = source.flake.as_str();
    let (names, settings, results, mut failures) = match eval(nix, locked, &sel_json, true) {
        Ok(v) => (
            strings(&v["names"]),
            v["settings"].clone(),
            v["nodes"].as_object().cloned().unwrap_or_default(),
            BTreeMap::new(),
        ),
        Err(whole) => {
            // Something tryEval cannot catch. Is it the flake, or some nodes?
            let base = eval(nix, locked, &Value::Object(Map::new()), true).map_err(|e| {
                PublishError::Flake {
                    flake: flake.to_owned(),
                    message: nix_message(&e),
                }
            })?;
            let names = strings(&base["names"]);
            let sel: Vec<(String, Option<BTreeSet<String>>)> = match selection {
                Some(s) => s.clone().into_iter().collect(),
                None => names.iter().map(|n| (n.clone(), None)).collect(),
            };
            tracing::debug!(
                "the evaluation of {flake} failed as a whole ({whole}); isolating the broken nodes"
            );
            let mut results = Map::new();
            let mut failures = BTreeMap::new();
            bisect(nix, locked, &sel, &mut results, &mut failures);
            (names, base["settings"].clone(), results, failures)
        }
    };
    if names.is_empty() {
        return Err(PublishError::Usage(format!(
            "{flake}: deploy.nodes is empty; there is nothing to publish"
        )));
    }
    let empty = Map::new();
    let deploy_settings = settings.as_object().unwrap_or(&empty);
    let rollout = rollout_policy(deploy_settings)
        .map_err(|e| PublishError::Usage(format!("{flake}: {e}")))?;
    let mut out = Evaluated {
        nodes: Vec::new(),
        failures: BTreeMap::new(),
    };
    for (name, r) in &results {
        if r.get("missing").is_some() {
            return Err(PublishError::Usage(format!(
                "{flake}: no node `{name}` in deploy.nodes; the flake has: {}",
                list(&names)
            )));
        }
    }
    for (name, r) in &results {
        if r.get("error").is_some() {
            // Caught by tryEval, which does not say why: ask Nix about this node alone.
            let one = selection_json(&[(
                name.clone(),
                selection.and_then(|s| s.get(name)).cloned().flatten(),
            )]);
            let why = match eval(nix, locked, &one, false) {
                Err(e) => nix_message(&e),
                Ok(_) => "evaluation failed (a `throw` or `assert` caught by builtins.tryEval)"
                    .to_owned(),
            };
            failures.insert(name.clone(), why);
            continue;
        }
        let wanted_profiles = selection.and_then(|s| s.get(name)).and_then(|p| p.as_ref());
        match node_spec(name, r, deploy_settings, wanted_profiles, source) {
            Ok(spec) => out.nodes.push(NodeSpec { rollout, ..spec }),
            Err(NodeProblem::Usage(e)) => {
                return Err(PublishError::Usage(format!("{flake}#\"{name}\": {e}")));
            }
            Err(NodeProblem::Node(e)) => {
                failures.insert(name.clone(), e);
            }
        }
    }
    out.failures = failures;
    Ok(out)
}

/// Evaluates `sel`, halving it on failure until each broken node stands alone.
fn bisect(
    nix: &Nix,
    flake: &str,
    sel: &[(String, Option<BTreeSet<String>>)],
    results: &mut Map<String, Value>,
    failures: &mut BTreeMap<String, String>,
) {
    if sel.is_empty() {
        return;
    }
    match eval(nix, flake, &selection_json(sel), true) {
        Ok(v) => {
            if let Some(nodes) = v["nodes"].as_object() {
                results.extend(nodes.clone());
            }
        }
        Err(e) if sel.len() == 1 => {
            failures.insert(sel[0].0.clone(), nix_message(&e));
        }
        Err(_) => {
            let (a, b) = sel.split_at(sel.len() / 2);
            bisect(nix, flake, a, results, failures);
            bisect(nix, flake, b, results, failures);
        }
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "(none)".into()
    } else {
        names.join(", ")
    }
}

enum NodeProblem {
    /// The command line asked for something that does not exist.
    Usage(String),
    /// The node's own definition is wrong.
    Node(String),
}

/// One node's evaluated data, merged with profile > node > deploy precedence.
fn node_spec(
    name: &str,
    r: &Value,
    deploy: &Map<String, Value>,
    wanted: Option<&BTreeSet<String>>,
    source: &Source,
) -> Result<NodeSpec, NodeProblem> {
    let bad = NodeProblem::Node;
    let node: NodeName = name.parse().map_err(|e| bad(format!("{e}")))?;
    let empty = Map::new();
    let node_settings = r["settings"].as_object().unwrap_or(&empty);
    let profiles = r["profiles"].as_object().cloned().unwrap_or_default();
    let available = strings(&r["profileNames"]);
    if let Some(w) = wanted {
        for p in w {
            if !available.contains(p) {
                return Err(NodeProblem::Usage(format!(
                    "no profile `{p}`; node `{name}` has: {}",
                    list(&available)
                )));
            }
        }
    }
    // deploy-rs's order: profilesOrder first, then the others (by name here, in hash-map
    // order there); a name listed twice counts once, where it first appears.
    let order = strings(&r["profilesOrder"]);
    for p in &order {
        if !available.contains(p) {
            return Err(bad(format!(
                "profilesOrder names `{p}`, which is not one of its profiles ({})",
                list(&available)
            )));
        }
    }
    let mut names: Vec<String> = Vec::new();
    for p in order.into_iter().chain(profiles.keys().cloned()) {
        if profiles.contains_key(&p) && !names.contains(&p) {
            names.push(p);
        }
    }
    if names.is_empty() {
        return Err(bad(format!("node `{name}` has no profiles")));
    }
    let mut specs = Vec::new();
    let mut system: Option<String> = None;
    for pname in names {
        let p = &profiles[&pname];
        if let Some(e) = p.get("error").and_then(Value::as_str) {
            return Err(bad(format!("profile `{pname}` {e}")));
        }
        let ctx = |e: String| bad(format!("profile `{pname}`: {e}"));
        let ps = p["settings"].as_object().unwrap_or(&empty);
        let levels = [ps, node_settings, deploy];
        let get = |k: &str| {
            levels
                .iter()
                .find_map(|l| l.get(k).filter(|v| !v.is_null()))
        };
        let roost = |k: &str| {
            levels.iter().find_map(|l| {
                l.get("roost")
                    .and_then(|r| r.get(k))
                    .filter(|v| !v.is_null())
            })
        };
        let path: StorePath = p["path"]
            .as_str()
            .unwrap_or("")
            .parse()
            .map_err(|e| ctx(format!("`path` {e}")))?;
        let drv_path = match p["drvPath"].as_str() {
            Some(d) => Some(
                d.parse::<StorePath>()
                    .map_err(|e| ctx(format!("`drvPath` {e}")))?,
            ),
            None => None,
        };
        let sys = roost("system")
            .and_then(Value::as_str)
            .or(p["system"].as_str())
            .map(str::to_owned);
        match (&system, sys) {
            (None, Some(s)) => system = Some(s),
            (Some(a), Some(b)) if *a != b => {
                return Err(bad(format!(
                    "its profiles are built for different systems ({a} and {b}); set roost.system"
                )));
            }
            _ => {}
        }
        let text = |k: &str| -> Result<Option<String>, NodeProblem> {
            match get(k) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => Err(ctx(format!("`{k}` must be a string, not {v}"))),
            }
        };
        let num = |k: &str, d: u64| -> Result<u64, NodeProblem> {
            match get(k) {
                None => Ok(d),
                Some(v) => v.as_u64().ok_or_else(|| {
                    ctx(format!("`{k}` must be a whole number of seconds, not {v}"))
                }),
            }
        };
        let flag = |k: &str| -> Result<bool, NodeProblem> {
            match get(k) {
                None => Ok(true),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| ctx(format!("`{k}` must be true or false, not {v}"))),
            }
        };
        // deploy-rs reads `profilePath` per profile only: at node level it would make two
        // profiles share one link.
        let profile_path = match ps.get("profilePath").filter(|v| !v.is_null()) {
            None => None,
            Some(Value::String(s)) => Some(
                s.parse::<ProfilePath>()
                    .map_err(|e| ctx(format!("`profilePath` {e}")))?,
            ),
            Some(v) => return Err(ctx(format!("`profilePath` must be a string, not {v}"))),
        };
        // deploy-rs: `user`, else `sshUser`, else an error (there is no default user).
        let user = match (text("user")?, text("sshUser")?) {
            (Some(u), _) | (None, Some(u)) => u,
            (None, None) => {
                return Err(bad(format!(
                    "neither `user` nor `sshUser` is set for profile `{pname}` of node `{name}` \
                     (deploy-rs refuses this too): set `user` at the profile, node or deploy level"
                )));
            }
        };
        let activation = match roost("activation") {
            Some(a) => Some(
                serde_json::from_value::<Activation>(a.clone())
                    .map_err(|e| ctx(format!("roost.activation: {e}")))?,
            ),
            None => None,
        };
        let health_checks = match roost("healthChecks") {
            Some(h) => serde_json::from_value::<Vec<HealthCheck>>(h.clone())
                .map_err(|e| ctx(format!("roost.healthChecks: {e}")))?,
            None => Vec::new(),
        };
        // One window as a string, or a list of them.
        let windows = |key: &str| -> Result<Vec<Window>, NodeProblem> {
            match roost(key) {
                None => Vec::new(),
                Some(Value::String(w)) => vec![w.clone()],
                Some(v) => serde_json::from_value::<Vec<String>>(v.clone()).map_err(|_| {
                    ctx(format!(
                        "roost.{key} must be a window string or a list of them, not {v}"
                    ))
                })?,
            }
            .iter()
            .map(|w| w.parse::<Window>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ctx(format!("roost.{key}: {e}")))
        };
        let apply_windows = windows("applyWindow")?;
        let reboot_windows = windows("rebootWindow")?;
        let reboot = match roost("reboot") {
            None => RebootPolicy::Never,
            Some(v) => serde_json::from_value::<RebootPolicy>(v.clone()).map_err(|_| {
                ctx(format!(
                    "roost.reboot must be \"never\", \"window\" or \"auto\", not {v}"
                ))
            })?,
        };
        if reboot == RebootPolicy::Window && reboot_windows.is_empty() {
            return Err(ctx(
                "roost.reboot is \"window\" but no roost.rebootWindow is set: add one \
                 (e.g. \"Sat 02:00-05:00\") or use \"auto\" or \"never\""
                    .to_owned(),
            ));
        }
        specs.push(ProfileSpec {
            apply_windows,
            reboot,
            reboot_windows,
            name: pname.parse().map_err(|e| bad(format!("{e}")))?,
            path,
            drv_path,
            activation,
            user,
            profile_path,
            activation_timeout_s: num("activationTimeout", 240)?,
            confirm_timeout_s: num("confirmTimeout", 30)?,
            auto_rollback: flag("autoRollback")?,
            magic_rollback: flag("magicRollback")?,
            health_checks,
        });
    }
    let levels = [node_settings, deploy];
    let roost = |k: &str| {
        levels.iter().find_map(|l| {
            l.get("roost")
                .and_then(|r| r.get(k))
                .filter(|v| !v.is_null())
        })
    };
    let node_key = match roost("nodeKey") {
        Some(Value::String(k)) => Some(
            k.parse::<PublicKey>()
                .map_err(|e| bad(format!("roost.nodeKey: {e}")))?,
        ),
        Some(v) => {
            return Err(bad(format!(
                "roost.nodeKey must be a public key string, not {v}"
            )));
        }
        None => None,
    };
    let wave = match roost("wave") {
        None => 0,
        Some(v) => v
            .as_u64()
            .and_then(|w| u32::try_from(w).ok())
            .ok_or_else(|| bad(format!("roost.wave must be a small whole number, not {v}")))?,
    };
    Ok(NodeSpec {
        node,
        system: system.ok_or_else(|| {
            bad("cannot tell its system (no derivation `system`): set roost.system".into())
        })?,
        node_key,
        wave,
        rollout: RolloutPolicy::default(),
        profiles: specs,
        source: source.clone(),
    })
}

/// The flake's locked reference, revision and dirtiness.
pub fn source(nix: &Nix, flake: &str) -> Result<Source, PublishError> {
    let m = nix.flake_metadata(flake).map_err(|e| PublishError::Flake {
        flake: flake.to_owned(),
        message: nix_message(&e),
    })?;
    Ok(Source {
        flake: m.url,
        rev: m.rev,
        dirty: m.dirty,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const P1: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixos-system-a";
    const P2: &str = "/nix/store/zyxwvsrqpnmlkjihgfdcba9876543210-home-a";

    fn src() -> Source {
        Source {
            flake: "path:/x".into(),
            rev: None,
            dirty: false,
        }
    }

    fn node(v: Value) -> Result<NodeSpec, String> {
        let deploy =
            json!({ "activationTimeout": 100, "user": "deployer", "roost": { "wave": 3 } });
        node_spec("a", &v, deploy.as_object().unwrap(), None, &src()).map_err(|e| match e {
            NodeProblem::Usage(s) | NodeProblem::Node(s) => s,
        })
    }

    #[test]
    fn profile_settings_beat_node_settings_beat_deploy_settings() {
        let n = node(json!({
            "profileNames": ["home", "system"],
            "settings": { "activationTimeout": 50, "confirmTimeout": 7, "roost": { "wave": 1 } },
            "profilesOrder": ["system"],
            "profiles": {
                "home": { "path": P2, "system": "x86_64-linux", "settings": { "user": "alice", "activationTimeout": 5 } },
                "system": { "path": P1, "system": "x86_64-linux", "settings": {} }
            }
        }))
        .unwrap();
        let names: Vec<&str> = n.profiles.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["system", "home"]);
        let (sys, home) = (&n.profiles[0], &n.profiles[1]);
        assert_eq!(
            (sys.activation_timeout_s, sys.confirm_timeout_s, &*sys.user),
            (50, 7, "deployer")
        );
        assert_eq!(
            (
                home.activation_timeout_s,
                home.confirm_timeout_s,
                &*home.user
            ),
            (5, 7, "alice")
        );
        assert_eq!(n.wave, 1);
    }

    #[test]
    fn apply_windows_come_from_the_nearest_level_and_are_checked() {
        let n = node(json!({
            "profileNames": ["home", "system"],
            "settings": { "roost": { "applyWindow": ["Mon-Fri 12:00-13:00", "Sat 00:00-24:00"] } },
            "profiles": {
                "home": { "path": P2, "system": "x86_64-linux", "settings": { "roost": { "applyWindow": "22:00-06:00" } } },
                "system": { "path": P1, "system": "x86_64-linux", "settings": {} }
            }
        }))
        .unwrap();
        let w = |i: usize| -> Vec<String> {
            n.profiles[i]
                .apply_windows
                .iter()
                .map(|w| w.to_string())
                .collect()
        };
        assert_eq!(w(0), ["22:00-06:00"], "home: its own");
        assert_eq!(
            w(1),
            ["Mon-Fri 12:00-13:00", "Sat 00:00-24:00"],
            "system: the node's"
        );
        let e = node(json!({
            "profileNames": ["system"],
            "profiles": { "system": { "path": P1, "system": "x86_64-linux",
                "settings": { "roost": { "applyWindow": "Mon 25:00-26:00" } } } }
        }))
        .unwrap_err();
        assert!(
            e.contains("roost.applyWindow") && e.contains("25:00"),
            "{e}"
        );
    }

    #[test]
    fn reboot_policy_and_windows_come_from_the_nearest_level_and_bad_values_name_the_key() {
        let n = node(json!({
            "profileNames": ["home", "system"],
            "settings": { "roost": { "reboot": "window", "rebootWindow": "Sat 02:00-05:00" } },
            "profiles": {
                "home": { "path": P2, "system": "x86_64-linux", "settings": {} },
                "system": { "path": P1, "system": "x86_64-linux",
                    "settings": { "roost": { "reboot": "auto" } } }
            }
        }))
        .unwrap();
        let (home, sys) = (&n.profiles[0], &n.profiles[1]);
        assert_eq!(home.reboot, RebootPolicy::Window);
        assert_eq!(home.reboot_windows[0].to_string(), "Sat 02:00-05:00");
        assert_eq!(sys.reboot, RebootPolicy::Auto);
        let bad = |roost: Value| {
            node(json!({
                "profileNames": ["system"],
                "profiles": { "system": { "path": P1, "system": "x86_64-linux",
                    "settings": { "roost": roost } } }
            }))
            .unwrap_err()
        };
        let e = bad(json!({ "reboot": "sometimes" }));
        assert!(e.contains("roost.reboot") && e.contains("sometimes"), "{e}");
        let e = bad(json!({ "reboot": "window" }));
        assert!(e.contains("roost.rebootWindow"), "{e}");
        let e = bad(json!({ "reboot": "auto", "rebootWindow": "Sat 02:00" }));
        assert!(
            e.contains("roost.rebootWindow") && e.contains("Sat 02:00"),
            "{e}"
        );
        let default = node(json!({
            "profileNames": ["system"],
            "profiles": { "system": { "path": P1, "system": "x86_64-linux", "settings": {} } }
        }))
        .unwrap();
        assert_eq!(default.profiles[0].reboot, RebootPolicy::Never);
    }

    fn bare(deploy: Value, n: Value) -> Result<NodeSpec, String> {
        node_spec("a", &n, deploy.as_object().unwrap(), None, &src()).map_err(|e| match e {
            NodeProblem::Usage(s) | NodeProblem::Node(s) => s,
        })
    }

    fn one_profile(node_settings: Value, profile_settings: Value) -> Value {
        json!({
            "profileNames": ["system"],
            "settings": node_settings,
            "profiles": { "system": { "path": P1, "system": "x86_64-linux", "settings": profile_settings } }
        })
    }

    #[test]
    fn user_falls_back_to_ssh_user_at_any_level_as_in_deploy_rs() {
        let n = bare(
            json!({ "sshUser": "bob" }),
            one_profile(json!({}), json!({})),
        )
        .unwrap();
        assert_eq!(n.profiles[0].user, "bob");
        // `user` anywhere beats `sshUser` anywhere (deploy-rs merges each key on its own).
        let n = bare(
            json!({ "user": "alice" }),
            one_profile(json!({}), json!({ "sshUser": "bob" })),
        )
        .unwrap();
        assert_eq!(n.profiles[0].user, "alice");
    }

    #[test]
    fn neither_user_nor_ssh_user_fails_the_node_as_deploy_rs_refuses_it() {
        let e = bare(json!({}), one_profile(json!({}), json!({}))).unwrap_err();
        assert!(
            e.contains("neither `user` nor `sshUser`") && e.contains("`system`"),
            "{e}"
        );
    }

    #[test]
    fn profile_path_counts_only_at_profile_level() {
        let n = bare(
            json!({ "user": "root", "profilePath": "/srv/deploy-level" }),
            one_profile(json!({ "profilePath": "/srv/node-level" }), json!({})),
        )
        .unwrap();
        assert_eq!(n.profiles[0].profile_path, None);
        let n = bare(
            json!({ "user": "root" }),
            one_profile(json!({}), json!({ "profilePath": "/srv/mine" })),
        )
        .unwrap();
        assert_eq!(
            n.profiles[0]
                .profile_path
                .as_ref()
                .map(|p| p.as_path().to_owned()),
            Some("/srv/mine".into())
        );
    }

    #[test]
    fn a_profile_listed_twice_in_profiles_order_is_deployed_once() {
        let n = node(json!({
            "profileNames": ["home", "system"],
            "settings": {},
            "profilesOrder": ["system", "home", "system"],
            "profiles": {
                "home": { "path": P2, "system": "x86_64-linux", "settings": {} },
                "system": { "path": P1, "system": "x86_64-linux", "settings": {} }
            }
        }))
        .unwrap();
        let names: Vec<&str> = n.profiles.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["system", "home"]);
    }

    #[test]
    fn a_setting_of_the_wrong_type_names_the_profile_and_the_setting() {
        let e = node(json!({
            "profileNames": ["system"],
            "settings": { "magicRollback": "yes" },
            "profiles": { "system": { "path": P1, "system": "x86_64-linux", "settings": {} } }
        }))
        .unwrap_err();
        assert!(
            e.contains("profile `system`") && e.contains("magicRollback"),
            "{e}"
        );
    }

    #[test]
    fn a_profile_without_path_is_named() {
        let e = node(json!({
            "profileNames": ["system"],
            "settings": {},
            "profiles": { "system": { "error": "has no `path`" } }
        }))
        .unwrap_err();
        assert_eq!(e, "profile `system` has no `path`");
    }

    #[test]
    fn the_rollout_policy_is_read_with_its_defaults() {
        let p =
            |v: Value| rollout_policy(json!({ "roost": { "rollout": v } }).as_object().unwrap());
        assert_eq!(
            rollout_policy(&Map::new()).unwrap(),
            RolloutPolicy::default()
        );
        let got = p(json!({ "minHealthy": 0.5, "maxFailed": 2, "bakeTime": "10min" })).unwrap();
        assert_eq!(
            (got.min_healthy.get(), got.max_failed, got.bake_time_s),
            (0.5, 2, 600)
        );
        assert_eq!(p(json!({ "bakeTime": 30 })).unwrap().bake_time_s, 30);
    }

    #[test]
    fn a_bad_rollout_value_names_the_attribute() {
        let p = |v: Value| {
            rollout_policy(json!({ "roost": { "rollout": v } }).as_object().unwrap()).unwrap_err()
        };
        for (v, attr) in [
            (
                json!({ "minHealthy": 1.5 }),
                "deploy.roost.rollout.minHealthy",
            ),
            (
                json!({ "minHealthy": "all" }),
                "deploy.roost.rollout.minHealthy",
            ),
            (json!({ "maxFailed": -1 }), "deploy.roost.rollout.maxFailed"),
            (
                json!({ "bakeTime": "soon" }),
                "deploy.roost.rollout.bakeTime",
            ),
            (
                json!({ "maxFailures": 1 }),
                "deploy.roost.rollout.maxFailures",
            ),
            (json!(3), "deploy.roost.rollout"),
        ] {
            let e = p(v.clone());
            assert!(e.starts_with(attr), "{v}: {e}");
        }
    }

    #[test]
    fn deploy_rs_activate_wins_over_switch_to_configuration() {
        assert_eq!(activation_from_entries(true, true), Activation::DeployRs);
        assert!(matches!(
            activation_from_entries(false, true),
            Activation::Nixos { .. }
        ));
        assert_eq!(activation_from_entries(false, false), Activation::None);
    }

    #[test]
    fn the_selection_survives_nix_string_escaping() {
        let s = nix_string(&selection_json(&[("we\"ird${x}".into(), None)]).to_string());
        assert_eq!(s, r#""{\"we\\\"ird\${x}\":null}""#);
    }
}
