//! Reading deploy-rs's `deploy` schema (unchanged) plus roost's `roost.*` keys in one
//! evaluation, and merging settings with profile > node > deploy precedence.

use std::collections::{BTreeMap, BTreeSet};

use roost_common::nix::{Nix, NixError};
use roost_common::wire::v1::{Activation, HealthCheck, Profile, Source};
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
    /// Profiles in activation order.
    pub profiles: Vec<ProfileSpec>,
    /// The flake it came from.
    pub source: Option<Source>,
}

/// A profile ready to be published.
#[derive(Debug, Clone)]
pub struct ProfileSpec {
    /// Its name.
    pub name: ProfileName,
    /// Its store path.
    pub path: StorePath,
    /// Its derivation.
    pub drv_path: Option<StorePath>,
    user: String,
    profile_path: Option<ProfilePath>,
    activation: Option<Activation>,
    activation_timeout_s: u64,
    confirm_timeout_s: u64,
    auto_rollback: bool,
    magic_rollback: bool,
    health_checks: Vec<HealthCheck>,
}

impl ProfileSpec {
    /// The wire form, with the activation kind read from the built output when not set.
    pub fn to_wire(
        &self,
        path: &StorePath,
        nar_hash: Option<String>,
        closure_size: Option<u64>,
    ) -> Profile {
        let activation = self
            .activation
            .clone()
            .unwrap_or_else(|| detect_activation(path));
        Profile {
            name: self.name.clone(),
            path: path.clone(),
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
        }
    }
}

/// `bin/switch-to-configuration` → nixos; `deploy-rs-activate` → deploy-rs; else none.
pub fn detect_activation(path: &StorePath) -> Activation {
    let p = path.as_path();
    if p.join("bin/switch-to-configuration").exists() {
        Activation::Nixos {
            goal: Default::default(),
        }
    } else if p.join("deploy-rs-activate").exists() {
        Activation::DeployRs
    } else {
        Activation::None
    }
}

/// The result of the one evaluation.
#[derive(Debug)]
pub struct Evaluated {
    /// Nodes that evaluated.
    pub nodes: Vec<NodeSpec>,
    /// Nodes that did not, with why.
    pub failures: BTreeMap<String, String>,
}

const GENERIC: &str = "{ user = 0; profilePath = 0; autoRollback = 0; magicRollback = 0; activationTimeout = 0; confirmTimeout = 0; roost = 0; }";

/// The `--apply` function: everything publish needs, for the selected nodes, in one go.
/// Each node is wrapped in `tryEval` so one broken node (a `throw` or failed `assert`)
/// does not stop the others; errors `tryEval` cannot catch fail the whole evaluation.
fn apply_expr(selected: Option<&Vec<String>>) -> String {
    let sel = match selected {
        None => "null".to_owned(),
        Some(names) => format!(
            "[ {} ]",
            names
                .iter()
                .map(|n| nix_string(n))
                .collect::<Vec<_>>()
                .join(" ")
        ),
    };
    format!(
        r#"deploy: let
  selected = {sel};
  nodes = deploy.nodes or {{ }};
  names = builtins.attrNames nodes;
  generic = a: builtins.intersectAttrs {GENERIC} a;
  profileInfo = p:
    if !(p ? path) then {{ error = "has no `path`"; }}
    else let path = p.path; isDrv = builtins.isAttrs path; in {{
      path = if isDrv then path.outPath else toString path;
      drvPath = if isDrv && path ? drvPath then path.drvPath else null;
      system = if isDrv && path ? system then path.system else null;
      settings = generic p;
    }};
  evalNode = name:
    if !(builtins.hasAttr name nodes) then {{ missing = true; }}
    else let
      n = nodes.${{name}};
      value = {{
        settings = generic n;
        profilesOrder = n.profilesOrder or [ ];
        profiles = builtins.mapAttrs (_: profileInfo) (n.profiles or {{ }});
      }};
      r = builtins.tryEval (builtins.deepSeq value value);
    in if r.success then r.value else {{ error = "evaluation failed"; }};
in {{
  inherit names;
  settings = generic deploy;
  results = builtins.listToAttrs (map (name: {{ inherit name; value = evalNode name; }}) (if selected == null then names else selected));
}}"#
    )
}

fn nix_string(s: &str) -> String {
    format!(
        "\"{}\"",
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace("${", "\\${")
    )
}

/// One evaluation of `flake#deploy` for the selected nodes (all when `None`).
pub fn evaluate(
    nix: &Nix,
    flake: &str,
    selection: Option<&Selection>,
) -> Result<Evaluated, PublishError> {
    let names: Option<Vec<String>> = selection.map(|s| s.keys().cloned().collect());
    let v = nix.eval_json(
        &format!("{flake}#deploy"),
        Some(&apply_expr(names.as_ref())),
    )?;
    let all: Vec<String> = v["names"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let empty = Map::new();
    let deploy_settings = v["settings"].as_object().unwrap_or(&empty);
    let results = v["results"].as_object().cloned().unwrap_or_default();
    let mut out = Evaluated {
        nodes: Vec::new(),
        failures: BTreeMap::new(),
    };
    for (name, r) in &results {
        if r.get("missing").is_some() {
            return Err(PublishError::Usage(format!(
                "{flake}: no node `{name}` in deploy.nodes; the flake has: {}",
                list(&all)
            )));
        }
        if let Some(e) = r.get("error").and_then(Value::as_str) {
            out.failures.insert(name.clone(), e.to_owned());
            continue;
        }
        let wanted_profiles = selection.and_then(|s| s.get(name)).and_then(|p| p.as_ref());
        match node_spec(name, r, deploy_settings, wanted_profiles) {
            Ok(spec) => out.nodes.push(spec),
            Err(NodeProblem::Usage(e)) => {
                return Err(PublishError::Usage(format!("{flake}#{name}: {e}")));
            }
            Err(NodeProblem::Node(e)) => {
                out.failures.insert(name.clone(), e);
            }
        }
    }
    Ok(out)
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

fn node_spec(
    name: &str,
    r: &Value,
    deploy: &Map<String, Value>,
    wanted: Option<&BTreeSet<String>>,
) -> Result<NodeSpec, NodeProblem> {
    let bad = NodeProblem::Node;
    let node: NodeName = name.parse().map_err(|e| bad(format!("{e}")))?;
    let empty = Map::new();
    let node_settings = r["settings"].as_object().unwrap_or(&empty);
    let profiles = r["profiles"].as_object().cloned().unwrap_or_default();
    let available: Vec<String> = profiles.keys().cloned().collect();
    if let Some(w) = wanted {
        for p in w {
            if !profiles.contains_key(p) {
                return Err(NodeProblem::Usage(format!(
                    "no profile `{p}`; node `{name}` has: {}",
                    list(&available)
                )));
            }
        }
    }
    // profilesOrder first, then the rest by name (deploy-rs's order).
    let order: Vec<String> = r["profilesOrder"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let mut names: Vec<String> = order
        .iter()
        .filter(|p| profiles.contains_key(*p))
        .cloned()
        .collect();
    for p in &available {
        if !names.contains(p) {
            names.push(p.clone());
        }
    }
    if let Some(w) = wanted {
        names.retain(|p| w.contains(p));
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
        let empty = Map::new();
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
            .map_err(|e| bad(format!("profile `{pname}`: {e}")))?;
        let drv_path = p["drvPath"].as_str().and_then(|d| d.parse().ok());
        let sys = roost("system")
            .and_then(Value::as_str)
            .or(p["system"].as_str())
            .map(str::to_owned);
        match (&system, sys) {
            (None, Some(s)) => system = Some(s),
            (Some(a), Some(b)) if *a != b => {
                return Err(bad(format!(
                    "profiles are built for different systems ({a} and {b}); set roost.system"
                )));
            }
            _ => {}
        }
        let user = get("user")
            .and_then(Value::as_str)
            .unwrap_or("root")
            .to_owned();
        let profile_path = match get("profilePath").and_then(Value::as_str) {
            Some(s) => Some(
                s.parse::<ProfilePath>()
                    .map_err(|e| bad(format!("profile `{pname}`: {e}")))?,
            ),
            None => None,
        };
        let activation = match roost("activation") {
            Some(a) => Some(
                serde_json::from_value::<Activation>(a.clone())
                    .map_err(|e| bad(format!("profile `{pname}`: roost.activation: {e}")))?,
            ),
            None => None,
        };
        let health_checks = match roost("healthChecks") {
            Some(h) => serde_json::from_value::<Vec<HealthCheck>>(h.clone())
                .map_err(|e| bad(format!("profile `{pname}`: roost.healthChecks: {e}")))?,
            None => Vec::new(),
        };
        let num = |k: &str, d: u64| get(k).and_then(Value::as_u64).unwrap_or(d);
        let flag = |k: &str| get(k).and_then(Value::as_bool).unwrap_or(true);
        specs.push(ProfileSpec {
            name: pname.parse().map_err(|e| bad(format!("{e}")))?,
            path,
            drv_path,
            user,
            profile_path,
            activation,
            activation_timeout_s: num("activationTimeout", 240),
            confirm_timeout_s: num("confirmTimeout", 30),
            auto_rollback: flag("autoRollback"),
            magic_rollback: flag("magicRollback"),
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
    let node_key = match roost("nodeKey").and_then(Value::as_str) {
        Some(k) => Some(
            k.parse::<PublicKey>()
                .map_err(|e| bad(format!("roost.nodeKey: {e}")))?,
        ),
        None => None,
    };
    let wave = roost("wave").and_then(Value::as_u64).unwrap_or(0) as u32;
    Ok(NodeSpec {
        node,
        system: system
            .ok_or_else(|| bad("cannot tell the node's system: set roost.system".into()))?,
        node_key,
        wave,
        profiles: specs,
        source: None,
    })
}

/// The flake's locked reference, revision and dirtiness.
pub fn source(nix: &Nix, flake: &str) -> Result<Source, NixError> {
    let m = nix.flake_metadata(flake)?;
    Ok(Source {
        flake: m.url,
        rev: m.rev,
        dirty: m.dirty,
    })
}

/// Nix's own error text for a node whose evaluation failed (one extra evaluation, only then).
pub fn explain_failure(nix: &Nix, flake: &str, node: &str) -> Option<String> {
    let installable = format!("{flake}#deploy.nodes.{}.profiles", nix_string(node));
    match nix.eval_json(
        &installable,
        Some("ps: builtins.mapAttrs (_: p: toString p.path) ps"),
    ) {
        Ok(_) => None,
        Err(e) => Some(
            e.stderr_tail
                .lines()
                .filter(|l| !l.trim().is_empty())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    }
}
