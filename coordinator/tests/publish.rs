//! `roost-coordinator publish` against real Nix on an input-free, deploy-rs-shaped fixture
//! flake: manifests exactly as DESIGN §3, target selection, one evaluation for the fleet,
//! per-node failures, versions, identical `--out`/`--to` layouts, closures in a file://
//! cache, clear errors that change nothing, and kills that never expose a half-written file.
//!
//! They need `nix` and root: without them they fail under `CI=true` and skip loudly elsewhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use roost_common::nix::Nix;
use roost_common::wire::v1::http as v1;
use roost_common::wire::v1::{Activation, HealthCheck, Manifest};
use roost_common::{Accepted, Identity, SecretKey, Timestamp, TrustedKeys, verify_manifest};
use roost_coordinator::publish::{
    Destination, PublishError, PublishOptions, PublishReport, publish, target,
};
use roost_coordinator::serve::{ServerConfig, start};
use roost_preflight::require;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_roost-coordinator");

/// Real Nix, and root: these tests write to the Nix store without a daemon.
fn nix_ready() -> Result<(), String> {
    roost_preflight::tools(&["nix"])?;
    roost_preflight::root("these tests write to the Nix store without a daemon")
}

fn system() -> String {
    let out = Command::new("nix")
        .args([
            "eval",
            "--impure",
            "--raw",
            "--expr",
            "builtins.currentSystem",
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// The deploy-rs-shaped fleet: settings at all three levels, two profiles with
/// `profilesOrder`, a dotted node name, a profile with a dependency, and SSH-only settings
/// roost ignores. `@EXTRA@` adds nodes for the failure cases.
const FLAKE: &str = r#"{
  description = "roost publish tests";
  outputs = { self }:
    let
      system = "@SYSTEM@";
      generation = import ./generation.nix;
      fixtures = import ./fixtures.nix { inherit system; };
      sys = node: fixtures.fakeSystem { inherit node generation; };
      home = node: fixtures.userProfile { inherit node generation; };
      plain = name: script: derivation {
        name = "roost-test-${name}-g${toString generation}";
        inherit system;
        builder = "/bin/sh";
        PATH = "/usr/bin:/bin";
        args = [ "-c" script ];
      };
      lib = plain "lib" "mkdir -p $out/lib && echo library > $out/lib/data";
      app = plain "app" "mkdir -p $out/bin && ln -s ${lib}/lib/data $out/bin/data";
      broken = plain "broken" "echo 'roost-test: this build fails on purpose' >&2; exit 1";
    in {
      deploy = {
        user = "root";
        activationTimeout = 100;
        confirmTimeout = 10;
        sshUser = "deploy";
        sshOpts = [ "-p" "2222" ];
        fastConnection = true;
        roost.healthChecks = [ { kind = "http"; url = "http://127.0.0.1:8080/healthz"; timeout_s = 5; } ];
        nodes = {
          "web.prod" = {
            hostname = "web.example.org";
            activationTimeout = 50;
            roost.wave = 2;
            roost.nodeKey = "@NODE_KEY@";
            profilesOrder = [ "system" "home" ];
            profiles = {
              home = {
                path = home "web.prod";
                user = "alice";
                profilePath = "/home/alice/.local/state/nix/profiles/home";
                confirmTimeout = 3;
                roost.healthChecks = [ ];
              };
              system = {
                path = sys "web.prod";
                magicRollback = false;
              };
            };
          };
          db = {
            hostname = "db.example.org";
            autoRollback = false;
            profiles.system.path = sys "db";
            profiles.app = {
              path = app;
              roost.activation = { kind = "command"; argv = [ "bin/data" ]; };
            };
          };
          kiosk = {
            hostname = "kiosk.example.org";
            profiles.system.path = sys "kiosk";
          };
        } // (@EXTRA@);
      };
    };
}
"#;

struct Fleet {
    dir: tempfile::TempDir,
    flake: PathBuf,
    publisher: SecretKey,
    publisher_file: PathBuf,
    cache_key_file: PathBuf,
    cache_public: String,
    node_key: SecretKey,
    system: String,
}

impl Fleet {
    fn new(extra_nodes: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let flake = dir.path().join("flake");
        std::fs::create_dir(&flake).unwrap();
        let offline = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/offline");
        for f in ["fixtures.nix", "switch-to-configuration.sh", "health.sh"] {
            std::fs::copy(offline.join(f), flake.join(f)).unwrap();
        }
        let publisher = SecretKey::generate("test-publisher-1").unwrap();
        let publisher_file = dir.path().join("publisher.sec");
        publisher.write_new_file(&publisher_file).unwrap();
        let cache = SecretKey::generate("test-cache-1").unwrap();
        let cache_key_file = dir.path().join("cache.sec");
        cache.write_new_file(&cache_key_file).unwrap();
        let node_key = SecretKey::generate("web.prod").unwrap();
        let f = Fleet {
            dir,
            flake,
            publisher,
            publisher_file,
            cache_key_file,
            cache_public: cache.public().to_string(),
            node_key,
            system: system(),
        };
        f.write_flake(extra_nodes);
        f.set_generation(1);
        f
    }

    fn write_flake(&self, extra_nodes: &str) {
        let text = FLAKE
            .replace("@SYSTEM@", &self.system)
            .replace("@NODE_KEY@", &self.node_key.public().to_string())
            .replace(
                "@EXTRA@",
                if extra_nodes.is_empty() {
                    "{ }"
                } else {
                    extra_nodes
                },
            );
        std::fs::write(self.flake.join("flake.nix"), text).unwrap();
    }

    fn set_generation(&self, g: u64) {
        std::fs::write(self.flake.join("generation.nix"), format!("{g}\n")).unwrap();
    }

    /// A generation no other test run has built.
    fn fresh_generation(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let g = now.as_nanos() as u64 / 1000 + u64::from(std::process::id());
        self.set_generation(g);
        g
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn target(&self, fragment: &str) -> target::Target {
        target::parse(&format!("{}{fragment}", self.flake.display())).unwrap()
    }

    fn options(&self, fragments: &[&str], dest: Destination) -> PublishOptions {
        let targets = if fragments.is_empty() {
            vec![self.target("")]
        } else {
            fragments.iter().map(|f| self.target(f)).collect()
        };
        PublishOptions::new(targets, self.publisher.clone(), dest)
    }

    /// Publishes every node into the folder `out` with a fresh Nix.
    async fn publish_all_to(&self, out: &Path) -> PublishReport {
        let opts = self.options(&[], Destination::Folder(out.to_owned()));
        publish(&opts, &Nix::new()).await.unwrap()
    }

    fn with_cache(&self, mut o: PublishOptions) -> PublishOptions {
        let url = format!("file://{}", self.path("cache").display());
        o.cache = Some(url.clone());
        o.cache_key = Some(self.cache_key_file.clone());
        o.substituters = vec![roost_common::wire::v1::Substituter {
            url,
            public_keys: vec![self.cache_public.clone()],
        }];
        o
    }

    /// `publish` as a user runs it. The fixture's nodes substitute nothing, so it says the
    /// nodes trust where the paths come from (tests of that refusal use [`Fleet::cli_as_is`]).
    fn cli(&self, targets: &[&str], args: &[&str]) -> Output {
        let mut args = args.to_vec();
        args.push("--nodes-trust-paths");
        self.cli_as_is(targets, &args)
    }

    /// `publish` exactly as given.
    fn cli_as_is(&self, targets: &[&str], args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("publish");
        if targets.is_empty() {
            cmd.arg(&self.flake);
        }
        for t in targets {
            cmd.arg(format!("{}{t}", self.flake.display()));
        }
        cmd.arg("--key").arg(&self.publisher_file).args(args);
        cmd.output().unwrap()
    }

    fn open(&self, bytes: &[u8], node: &str) -> Manifest {
        let trusted = TrustedKeys::new([self.publisher.public()], 1);
        let node = node.parse().unwrap();
        let me = Identity {
            node: &node,
            system: &self.system,
        };
        match verify_manifest(bytes, &trusted, None, Timestamp::now(), me) {
            Ok(Accepted::New(v)) => v.manifest,
            other => panic!("manifest of {node} does not verify: {other:?}"),
        }
    }
}

fn manifest_file(out: &Path, node: &str) -> PathBuf {
    out.join(v1::manifest_file(node))
}

/// Every manifest under `out`, by node.
fn layout(out: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(dir) = std::fs::read_dir(out.join(v1::nodes_dir())) else {
        return BTreeMap::new();
    };
    dir.filter_map(|e| {
        let e = e.unwrap();
        let bytes = std::fs::read(e.path().join("manifest")).ok()?;
        Some((e.file_name().to_string_lossy().into_owned(), bytes))
    })
    .collect()
}

fn payload(bytes: &[u8]) -> Value {
    use base64::Engine;
    let env: Value = serde_json::from_slice(bytes).unwrap();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(env["payload"].as_str().unwrap())
        .unwrap();
    serde_json::from_slice(&raw).unwrap()
}

fn json_out(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON on stdout ({e}); stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn result_of<'a>(report: &'a PublishReport, node: &str) -> &'a str {
    report
        .node(node)
        .unwrap_or_else(|| panic!("{node} not in the report: {report:?}"))
        .result
}

fn nix_json(args: &[&str]) -> Value {
    let out = Command::new("nix").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn a_deploy_rs_fleet_publishes_manifests_exactly_as_design_section_3() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let out = fleet.path("out");
    let opts = fleet.with_cache(fleet.options(&[], Destination::Folder(out.clone())));
    let report = publish(&opts, &Nix::new()).await.unwrap();
    assert!(report.all_published(), "{report:#?}");
    let files = layout(&out);
    assert_eq!(
        files.keys().collect::<Vec<_>>(),
        ["db", "kiosk", "web.prod"]
    );

    // The top level and profile fields are exactly those of DESIGN §3.
    let top: Vec<String> = payload(&files["web.prod"])
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let mut want = [
        "format",
        "node",
        "system",
        "version",
        "issued_at",
        "expires_at",
        "source",
        "substituters",
        "node_key",
        "profiles",
        "rollout",
    ]
    .map(String::from)
    .to_vec();
    want.sort();
    let mut top_sorted = top.clone();
    top_sorted.sort();
    assert_eq!(top_sorted, want);
    let profile_fields = [
        "name",
        "path",
        "nar_hash",
        "closure_size",
        "drv_path",
        "user",
        "profile_path",
        "activation",
        "activation_timeout_s",
        "confirm_timeout_s",
        "auto_rollback",
        "magic_rollback",
        "health_checks",
    ];
    for p in payload(&files["web.prod"])["profiles"].as_array().unwrap() {
        for k in p.as_object().unwrap().keys() {
            assert!(profile_fields.contains(&k.as_str()), "unexpected field {k}");
        }
    }

    let web = fleet.open(&files["web.prod"], "web.prod");
    assert_eq!(web.format, 1);
    assert_eq!(web.node.as_str(), "web.prod");
    assert_eq!(web.system, fleet.system);
    assert_eq!(
        web.expires_at.unix() - web.issued_at.unix(),
        30 * 86400,
        "--expires defaults to 30 days"
    );
    let source = web.source.as_ref().unwrap();
    assert!(source.flake.starts_with("path:"), "{source:?}");
    assert!(!source.dirty && source.rev.is_none());
    assert_eq!(web.node_key, Some(fleet.node_key.public()));
    assert_eq!(web.rollout.wave, 2);
    // One rollout for the whole run, with its plan and the default policy.
    assert_eq!(web.rollout.id, Some(web.version.0));
    let plan: Vec<(u32, u32)> = web
        .rollout
        .waves
        .iter()
        .map(|w| (w.wave, w.nodes))
        .collect();
    assert_eq!(plan, [(0, 2), (2, 1)]);
    assert_eq!(
        (
            web.rollout.min_healthy.get(),
            web.rollout.max_failed,
            web.rollout.bake_time_s
        ),
        (1.0, 0, 0)
    );
    assert_eq!(web.substituters.len(), 1);
    assert_eq!(
        web.substituters[0].public_keys,
        vec![fleet.cache_public.clone()]
    );

    // profilesOrder, then profile > node > deploy.
    let names: Vec<&str> = web.profiles.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["system", "home"]);
    let (system, home) = (&web.profiles[0], &web.profiles[1]);
    assert_eq!(
        system.activation,
        Activation::Nixos {
            goal: Default::default()
        }
    );
    assert_eq!(system.user, "root");
    assert_eq!(system.profile_path, None);
    assert_eq!(system.activation_timeout_s, 50, "node beats deploy");
    assert_eq!(system.confirm_timeout_s, 10, "deploy applies");
    assert!(!system.magic_rollback, "profile beats default");
    assert!(system.auto_rollback);
    assert_eq!(
        system.health_checks,
        [HealthCheck::Http {
            url: "http://127.0.0.1:8080/healthz".into(),
            timeout_s: 5
        }]
    );
    assert_eq!(home.activation, Activation::None);
    assert_eq!(home.user, "alice");
    assert_eq!(
        home.profile_path.as_ref().unwrap().as_str(),
        "/home/alice/.local/state/nix/profiles/home"
    );
    assert_eq!(home.confirm_timeout_s, 3, "profile beats deploy");
    assert_eq!(home.activation_timeout_s, 50);
    assert!(home.health_checks.is_empty(), "profile beats deploy");

    // Paths, derivations, hashes and sizes are Nix's own.
    let flake = fleet.flake.display().to_string();
    let drv = nix_json(&[
        "eval",
        "--json",
        &format!("{flake}#deploy.nodes.\"web.prod\".profiles.system.path.drvPath"),
    ]);
    assert_eq!(system.drv_path.as_ref().unwrap().as_str(), drv);
    let info = nix_json(&[
        "path-info",
        "--json",
        "--closure-size",
        system.path.as_str(),
    ]);
    assert_eq!(system.nar_hash.as_deref(), info[0]["narHash"].as_str());
    assert_eq!(system.closure_size, info[0]["closureSize"].as_u64());

    // A profile with a dependency: the closure is bigger than the path; settings of db.
    let db = fleet.open(&files["db"], "db");
    let names: Vec<&str> = db.profiles.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["app", "system"], "without profilesOrder: by name");
    let app = &db.profiles[0];
    assert_eq!(
        app.activation,
        Activation::Command {
            argv: vec!["bin/data".into()]
        }
    );
    let info = nix_json(&["path-info", "--json", "--closure-size", app.path.as_str()]);
    assert!(app.closure_size.unwrap() > info[0]["narSize"].as_u64().unwrap());
    assert!(db.profiles.iter().all(|p| !p.auto_rollback));
    assert_eq!(db.node_key, None);
    assert_eq!(db.rollout.wave, 0);
    assert_eq!(db.profiles[1].activation_timeout_s, 100, "deploy applies");
}

#[tokio::test]
async fn selecting_a_node_or_a_node_profile_publishes_only_that() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let out = fleet.path("node");
    let report = publish(
        &fleet.options(&["#db"], Destination::Folder(out.clone())),
        &Nix::new(),
    )
    .await
    .unwrap();
    assert!(report.all_published(), "{report:#?}");
    assert_eq!(layout(&out).keys().collect::<Vec<_>>(), ["db"]);
    assert_eq!(report.nodes.len(), 1);

    let out = fleet.path("profile");
    let report = publish(
        &fleet.options(&["#\"web.prod\".home"], Destination::Folder(out.clone())),
        &Nix::new(),
    )
    .await
    .unwrap();
    assert!(report.all_published(), "{report:#?}");
    let files = layout(&out);
    assert_eq!(files.keys().collect::<Vec<_>>(), ["web.prod"]);
    let m = fleet.open(&files["web.prod"], "web.prod");
    let names: Vec<&str> = m.profiles.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["home"]);
}

#[tokio::test]
async fn publishing_many_nodes_evaluates_once_and_builds_once() {
    require!(nix_ready());
    let fleet = Fleet::new(
        r#"builtins.listToAttrs (map (i: { name = "n${toString i}"; value.profiles.system.path = sys "n${toString i}"; }) (builtins.genList (i: i) 12))"#,
    );
    let nix = Nix::new();
    let out = fleet.path("out");
    let report = publish(&fleet.options(&[], Destination::Folder(out.clone())), &nix)
        .await
        .unwrap();
    assert!(report.all_published(), "{report:#?}");
    assert_eq!(layout(&out).len(), 15);
    let counts = nix.counts();
    assert_eq!(counts.get("nix eval"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("nix build"), Some(&1), "{counts:?}");
    assert_eq!(report.nix_invocations, counts);
}

#[tokio::test]
async fn a_node_whose_build_fails_is_reported_and_the_others_publish() {
    require!(nix_ready());
    let fleet = Fleet::new("{ broken.profiles.system.path = broken; }");
    fleet.fresh_generation();
    let out = fleet.path("out");
    let run = fleet.cli(&[], &["--out", out.to_str().unwrap(), "--json"]);
    assert_eq!(run.status.code(), Some(1), "exit 1 when any node failed");
    let summary = json_out(&run);
    let nodes = summary["nodes"].as_array().unwrap();
    let broken = nodes.iter().find(|n| n["node"] == "broken").unwrap();
    assert_eq!(broken["result"], "failed");
    let error = broken["error"].as_str().unwrap();
    assert!(
        error.contains("roost-test: this build fails on purpose"),
        "the builder's own words: {error}"
    );
    assert!(error.contains("profile `system`"), "{error}");
    for n in nodes.iter().filter(|n| n["node"] != "broken") {
        assert_eq!(n["result"], "published", "{n}");
    }
    assert_eq!(
        layout(&out).keys().collect::<Vec<_>>(),
        ["db", "kiosk", "web.prod"]
    );
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("broken failed"),
        "the failure is on stderr too"
    );
}

#[test]
fn nodes_without_a_node_key_are_named_in_a_warning() {
    require!(nix_ready());
    let fleet = Fleet::new("{ }");
    fleet.fresh_generation();
    let out = fleet.path("out");
    let run = fleet.cli(&[], &["--out", out.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(0));
    let err = String::from_utf8_lossy(&run.stderr);
    let warning = err
        .lines()
        .find(|l| l.contains("no roost.nodeKey"))
        .unwrap_or_else(|| panic!("no warning about nodes without roost.nodeKey:\n{err}"));
    assert!(
        warning.contains("db") && warning.contains("kiosk"),
        "{warning}"
    );
    assert!(
        !warning.contains("web.prod"),
        "web.prod has a node key: {warning}"
    );
    assert!(warning.contains("roost-coordinator node-key"), "{warning}");
}

#[tokio::test]
async fn all_or_nothing_publishes_nothing_when_one_node_fails() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let out = fleet.path("out");
    let first = fleet.publish_all_to(&out).await;
    assert!(first.all_published());
    let before = layout(&out);

    fleet.write_flake("{ broken.profiles.system.path = broken; }");
    fleet.fresh_generation();
    let mut opts = fleet.options(&[], Destination::Folder(out.clone()));
    opts.all_or_nothing = true;
    let report = publish(&opts, &Nix::new()).await.unwrap();
    assert_eq!(result_of(&report, "broken"), "failed");
    for n in ["db", "kiosk", "web.prod"] {
        assert_eq!(result_of(&report, n), "skipped");
    }
    assert_eq!(layout(&out), before, "every previous manifest is intact");
    let leftovers: Vec<_> = std::fs::read_dir(out.join(v1::nodes_dir()).join("db"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["manifest"], "no staged file is left behind");
}

#[tokio::test]
async fn a_node_that_throws_is_reported_with_nix_message_and_the_others_publish() {
    require!(nix_ready());
    let fleet =
        Fleet::new(r#"{ thrower.profiles.system.path = throw "roost-test: this node throws"; }"#);
    let nix = Nix::new();
    let out = fleet.path("out");
    let report = publish(&fleet.options(&[], Destination::Folder(out.clone())), &nix)
        .await
        .unwrap();
    assert_eq!(result_of(&report, "thrower"), "failed");
    let error = report.node("thrower").unwrap().error.clone().unwrap();
    assert!(error.contains("roost-test: this node throws"), "{error}");
    assert_eq!(
        layout(&out).keys().collect::<Vec<_>>(),
        ["db", "kiosk", "web.prod"]
    );
    // One evaluation for the fleet, one more only to get the failed node's message.
    assert_eq!(nix.counts().get("nix eval"), Some(&2), "{:?}", nix.counts());
}

#[tokio::test]
async fn a_node_with_an_error_try_eval_cannot_catch_is_isolated() {
    require!(nix_ready());
    let fleet = Fleet::new("{ missing.profiles.system.path = self.no-such-output; }");
    let out = fleet.path("out");
    let report = fleet.publish_all_to(&out).await;
    assert_eq!(result_of(&report, "missing"), "failed");
    let error = report.node("missing").unwrap().error.clone().unwrap();
    assert!(error.contains("no-such-output"), "{error}");
    assert_eq!(
        layout(&out).keys().collect::<Vec<_>>(),
        ["db", "kiosk", "web.prod"]
    );
}

#[tokio::test]
async fn a_profile_without_path_fails_its_node_by_name_and_writes_nothing_for_it() {
    require!(nix_ready());
    let fleet = Fleet::new("{ pathless.profiles.system.user = \"root\"; }");
    let out = fleet.path("out");
    let report = fleet.publish_all_to(&out).await;
    let n = report.node("pathless").unwrap();
    assert_eq!(n.result, "failed");
    assert!(
        n.error
            .as_deref()
            .unwrap()
            .contains("profile `system` has no `path`"),
        "{n:?}"
    );
    assert!(!manifest_file(&out, "pathless").exists());
    assert_eq!(result_of(&report, "db"), "published");
}

#[tokio::test]
async fn publishing_twice_gives_strictly_higher_versions() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let out = fleet.path("out");
    let versions = |r: &PublishReport| -> BTreeMap<String, u64> {
        r.nodes
            .iter()
            .map(|n| (n.node.clone(), n.version.unwrap()))
            .collect()
    };
    let first = fleet.publish_all_to(&out).await;
    let second = fleet.publish_all_to(&out).await;
    for (node, v1) in versions(&first) {
        assert!(versions(&second)[&node] > v1, "{node}");
    }
    // A wanted version below the destination's is raised above it.
    let mut opts = fleet.options(&["#db"], Destination::Folder(out.clone()));
    opts.version = Some(5);
    let third = publish(&opts, &Nix::new()).await.unwrap();
    assert_eq!(versions(&third)["db"], versions(&second)["db"] + 1);
    let m = fleet.open(&std::fs::read(manifest_file(&out, "db")).unwrap(), "db");
    assert_eq!(m.version.0, versions(&second)["db"] + 1);
}

#[tokio::test]
async fn out_and_to_produce_byte_identical_envelope_layouts() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let state = fleet.path("coordinator");
    let server = start(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig::new(&state, TrustedKeys::new([fleet.publisher.public()], 1)),
    )
    .await
    .unwrap();
    let fixed = |mut o: PublishOptions| {
        o.version = Some(1_795_349_047_123);
        o.issued_at = Some(Timestamp::from_unix(1_795_349_047));
        o
    };
    let out = fleet.path("out");
    let to_folder = publish(
        &fixed(fleet.options(&[], Destination::Folder(out.clone()))),
        &Nix::new(),
    )
    .await
    .unwrap();
    assert!(to_folder.all_published(), "{to_folder:#?}");
    let to_server = publish(
        &fixed(fleet.options(&[], Destination::Coordinator(server.url()))),
        &Nix::new(),
    )
    .await
    .unwrap();
    assert!(to_server.all_published(), "{to_server:#?}");
    let files = layout(&out);
    assert_eq!(files.len(), 3);
    for (node, bytes) in &files {
        let r = reqwest::get(v1::manifest_url(&server.url(), node))
            .await
            .unwrap();
        // web.prod is in wave 2: the coordinator holds it back (and serves it byte for
        // byte once its wave is released).
        let served = match r.status().as_u16() {
            404 => std::fs::read(state.join("staged").join(v1::manifest_file(node))).unwrap(),
            _ => r.bytes().await.unwrap().to_vec(),
        };
        assert_eq!(&served[..], &bytes[..], "{node}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn the_closure_in_a_file_cache_substitutes_into_an_empty_store_trusting_only_the_cache_key() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let out = fleet.path("out");
    let opts = fleet.with_cache(fleet.options(&["#db"], Destination::Folder(out.clone())));
    let report = publish(&opts, &Nix::new()).await.unwrap();
    assert!(report.all_published(), "{report:#?}");
    let m = fleet.open(&std::fs::read(manifest_file(&out, "db")).unwrap(), "db");
    let app = m
        .profiles
        .iter()
        .find(|p| p.name.as_str() == "app")
        .unwrap();
    let sub = &m.substituters[0];
    let realise = |store: &Path, key: &str| {
        Command::new("nix-store")
            .arg("--store")
            .arg(store)
            .args(["--realise", app.path.as_str()])
            .args(["--option", "substituters", &sub.url])
            .args(["--option", "trusted-public-keys", key])
            .args(["--option", "require-sigs", "true"])
            .output()
            .unwrap()
    };
    // Another key: Nix refuses the cache's paths (so the positive case below means something).
    let other = SecretKey::generate("test-cache-1")
        .unwrap()
        .public()
        .to_string();
    let refused = realise(&fleet.path("store-a"), &other);
    assert!(
        !refused.status.success(),
        "an untrusted cache must not substitute"
    );
    // The key in the manifest: the whole closure arrives.
    let store = fleet.path("store-b");
    let ok = realise(&store, &sub.public_keys[0]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let closure = nix_json(&[
        "path-info",
        "--json",
        "--recursive",
        "--store",
        store.to_str().unwrap(),
        app.path.as_str(),
    ]);
    assert_eq!(
        closure.as_array().unwrap().len(),
        2,
        "the app and its library"
    );
    let nar_hash = closure
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["path"] == app.path.as_str())
        .unwrap()["narHash"]
        .clone();
    assert_eq!(app.nar_hash.as_deref(), nar_hash.as_str());
}

#[tokio::test]
async fn an_unknown_node_or_profile_is_a_usage_error_listing_what_exists_and_changes_nothing() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let out = fleet.path("out");
    let first = fleet.publish_all_to(&out).await;
    assert!(first.all_published());
    let before = layout(&out);

    let run = fleet.cli(&["#nope"], &["--out", out.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("no node `nope`"), "{err}");
    assert!(err.contains("db, kiosk, web.prod"), "{err}");

    let run = fleet.cli(&["#db.nope", "#kiosk"], &["--out", out.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("no profile `nope`"), "{err}");
    assert!(err.contains("app, system"), "{err}");
    assert_eq!(layout(&out), before, "nothing changed, not even kiosk");
}

#[tokio::test]
async fn a_bad_rollout_policy_is_refused_naming_the_attribute_and_publishes_nothing() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let file = fleet.flake.join("flake.nix");
    let text = std::fs::read_to_string(&file).unwrap().replace(
        "fastConnection = true;",
        "fastConnection = true;\n        roost.rollout = { minHealthy = 1.5; bakeTime = \"1h\"; };",
    );
    std::fs::write(&file, text).unwrap();
    let out = fleet.path("out");
    let run = fleet.cli(&[], &["--out", out.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("deploy.roost.rollout.minHealthy"), "{err}");
    assert!(err.contains("1.5"), "{err}");
    assert!(layout(&out).is_empty(), "nothing was published");
}

#[test]
fn a_key_file_in_the_wrong_format_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("publisher.sec");
    std::fs::write(&key, "this is not a key\n").unwrap();
    let out = dir.path().join("out");
    let run = Command::new(BIN)
        .args(["publish", ".", "--key"])
        .arg(&key)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains(&key.display().to_string()), "{err}");
    assert!(err.contains("NAME:BASE64"), "says what is wrong: {err}");
    assert!(!out.exists(), "nothing written");

    // A public key where the secret one belongs is just as clear.
    let public = SecretKey::generate("p").unwrap().public().to_string();
    std::fs::write(&key, public).unwrap();
    let run = Command::new(BIN)
        .args(["publish", ".", "--key"])
        .arg(&key)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains(&key.display().to_string()) && err.contains("secret"),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_coordinator_fails_before_any_nix_call() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let key = SecretKey::generate("p").unwrap();
    let opts = PublishOptions::new(
        vec![target::parse("/nonexistent-flake").unwrap()],
        key,
        Destination::Coordinator(url.clone()),
    );
    let nix = Nix::new();
    let err = publish(&opts, &nix).await.unwrap_err();
    assert!(matches!(err, PublishError::Destination(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("cannot reach the coordinator") && text.contains(&url),
        "{text}"
    );
    assert!(nix.counts().is_empty(), "{:?}", nix.counts());
    assert_eq!(err.exit_code(), 1);
}

#[tokio::test]
async fn a_coordinator_refusing_the_upload_fails_each_node_with_its_message() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let stranger = SecretKey::generate("someone-else").unwrap();
    let server = start(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig::new(
            fleet.path("coordinator"),
            TrustedKeys::new([stranger.public()], 1),
        ),
    )
    .await
    .unwrap();
    let url = server.url();
    let run = tokio::task::spawn_blocking({
        let flake = fleet.flake.clone();
        let key = fleet.publisher_file.clone();
        move || {
            Command::new(BIN)
                .arg("publish")
                .arg(format!("{}#kiosk", flake.display()))
                .arg("--key")
                .arg(key)
                .args(["--to", &url, "--json", "--nodes-trust-paths"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert_eq!(run.status.code(), Some(1));
    let summary = json_out(&run);
    let kiosk = &summary["nodes"][0];
    assert_eq!(kiosk["result"], "failed");
    let error = kiosk["error"].as_str().unwrap();
    assert!(error.contains("refused"), "{error}");
    assert!(
        error.contains("test-publisher-1"),
        "the coordinator's reason: {error}"
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn no_build_stops_naming_the_paths_that_are_nowhere() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    fleet.fresh_generation();
    let out = fleet.path("out");
    let mut opts = fleet.with_cache(fleet.options(&["#kiosk"], Destination::Folder(out.clone())));
    opts.no_build = true;
    let nix = Nix::new();
    let err = publish(&opts, &nix).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, PublishError::Missing(_)), "{err:?}");
    assert!(text.contains("kiosk.system: /nix/store/"), "{text}");
    assert!(layout(&out).is_empty());
    assert_eq!(
        nix.counts().get("nix build"),
        None,
        "--no-build builds nothing"
    );
}

#[tokio::test]
async fn an_upload_token_from_the_environment_lets_nix_copy_into_the_coordinator_cache() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let token = "a-long-enough-upload-token-1234";
    let server = start(
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig::new(
            fleet.path("coordinator"),
            TrustedKeys::new([fleet.publisher.public()], 1),
        )
        .with_upload_token(token),
    )
    .await
    .unwrap();
    let url = server.url();
    let cache = v1::cache_url(&url);
    let cache_key = fleet.cache_key_file.clone();
    let run_with = |token: Option<&'static str>| {
        let (flake, key, url, cache, cache_key) = (
            fleet.flake.clone(),
            fleet.publisher_file.clone(),
            url.clone(),
            cache.clone(),
            cache_key.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut cmd = Command::new(BIN);
            cmd.arg("publish")
                .arg(format!("{}#kiosk", flake.display()))
                .arg("--key")
                .arg(key)
                .args(["--to", &url, "--cache", &cache, "--json", "--cache-key"])
                .arg(cache_key)
                .env_remove("ROOST_UPLOAD_TOKEN");
            if let Some(t) = token {
                cmd.env("ROOST_UPLOAD_TOKEN", t);
            }
            cmd.output().unwrap()
        })
    };
    // Without the token the cache refuses the upload, and kiosk is not published.
    let refused = run_with(None).await.unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(json_out(&refused)["nodes"][0]["result"], "failed");

    let run = run_with(Some(token)).await.unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary = json_out(&run);
    let path = summary["nodes"][0]["profiles"][0]["path"].as_str().unwrap();
    let hash = &path["/nix/store/".len().."/nix/store/".len() + 32];
    let narinfo = reqwest::get(format!("{cache}/{hash}.narinfo"))
        .await
        .unwrap();
    assert_eq!(narinfo.status(), 200);
    let text = narinfo.text().await.unwrap();
    assert!(text.contains("Sig: test-cache-1:"), "{text}");
    server.stop().await.unwrap();
}

#[test]
fn a_publish_killed_at_any_moment_leaves_every_previous_manifest_intact() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let out = fleet.path("out");
    let out_arg = out.to_str().unwrap().to_owned();
    let first = fleet.cli(&[], &["--out", &out_arg]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let mut previous = layout(&out);
    let mut completed = false;
    let mut delay_ms = 0;
    while !completed {
        fleet.fresh_generation();
        let mut child = Command::new(BIN)
            .arg("publish")
            .arg(&fleet.flake)
            .arg("--key")
            .arg(&fleet.publisher_file)
            .args(["--out", &out_arg])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        completed = child.try_wait().unwrap().is_some();
        let _ = child.kill();
        let _ = child.wait();
        let now = layout(&out);
        assert_eq!(
            now.keys().collect::<Vec<_>>(),
            previous.keys().collect::<Vec<_>>()
        );
        for (node, bytes) in &now {
            let m = fleet.open(bytes, node);
            let before = fleet.open(&previous[node], node);
            assert!(
                *bytes == previous[node] || m.version > before.version,
                "{node}: neither the previous manifest nor a newer one"
            );
        }
        previous = now;
        delay_ms += 40;
        assert!(delay_ms < 60_000, "publish never completed");
    }
}

#[tokio::test]
async fn a_node_whose_closure_the_cache_refuses_is_reported_and_the_others_publish() {
    require!(nix_ready());
    let fleet = Fleet::new(
        "{ big.profiles.system.path = fixtures.fakeSystem { node = \"big\"; inherit generation; blobKiB = 512; }; }",
    );
    fleet.fresh_generation();
    let token = "a-long-enough-upload-token-5678";
    let mut cfg = ServerConfig::new(
        fleet.path("coordinator"),
        TrustedKeys::new([fleet.publisher.public()], 1),
    )
    .with_upload_token(token);
    cfg.max_nar_bytes = 64 * 1024;
    let server = start("127.0.0.1:0".parse().unwrap(), cfg).await.unwrap();
    let netrc = fleet.path("netrc");
    std::fs::write(&netrc, format!("default login roost password {token}\n")).unwrap();
    let nix = Nix::new().with_extra_args(vec![
        "--option".into(),
        "netrc-file".into(),
        netrc.display().to_string(),
    ]);
    let mut opts = fleet.options(&[], Destination::Coordinator(server.url()));
    opts.cache = Some(v1::cache_url(&server.url()));
    let report = publish(&opts, &nix).await.unwrap();
    let big = report.node("big").unwrap();
    assert_eq!(big.result, "failed", "{report:#?}");
    let error = big.error.as_deref().unwrap();
    assert!(
        error.contains("copy to") && error.contains("nixos-system-big"),
        "{error}"
    );
    for n in ["db", "kiosk", "web.prod"] {
        assert_eq!(result_of(&report, n), "published");
    }
    let big_manifest = reqwest::get(v1::manifest_url(&server.url(), "big"))
        .await
        .unwrap();
    assert_eq!(
        big_manifest.status(),
        404,
        "no manifest without its closure"
    );
    server.stop().await.unwrap();
}

#[test]
fn a_target_path_without_a_flake_is_bad_usage() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("publisher.sec");
    SecretKey::generate("p")
        .unwrap()
        .write_new_file(&key)
        .unwrap();
    let missing = dir.path().join("no-flake-here");
    let run = Command::new(BIN)
        .arg("publish")
        .arg(format!("{}#web", missing.display()))
        .arg("--key")
        .arg(&key)
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("flake.nix"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists());
}

/// `git ARGS` in `dir`; its stdout.
fn git_in(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.org"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn source_records_the_git_revision_and_whether_the_tree_was_dirty() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let git = |args: &[&str]| git_in(&fleet.flake, args);
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "fleet"]);
    let rev = git(&["rev-parse", "HEAD"]);
    async fn source_of(fleet: &Fleet, out: PathBuf) -> roost_common::wire::v1::Source {
        let report = publish(
            &fleet.options(&["#kiosk"], Destination::Folder(out.clone())),
            &Nix::new(),
        )
        .await
        .unwrap();
        assert!(report.all_published(), "{report:#?}");
        let m = fleet.open(
            &std::fs::read(manifest_file(&out, "kiosk")).unwrap(),
            "kiosk",
        );
        m.source.unwrap()
    }
    let clean = source_of(&fleet, fleet.path("clean")).await;
    assert!(clean.flake.starts_with("git+file://"), "{clean:?}");
    assert_eq!(clean.rev.as_deref(), Some(rev.as_str()));
    assert!(!clean.dirty);

    fleet.set_generation(2);
    let dirty = source_of(&fleet, fleet.path("dirty")).await;
    assert!(dirty.dirty, "{dirty:?}");
    assert_eq!(dirty.rev, None);
}

#[test]
fn a_cache_the_nodes_could_not_verify_is_refused_before_any_work() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let out = fleet.path("out");
    let cache = format!("file://{}", fleet.path("cache").display());
    // --cache without a key: the manifests would name no key, nodes would refuse every path.
    let run = fleet.cli_as_is(&[], &["--out", out.to_str().unwrap(), "--cache", &cache]);
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    for want in ["--cache-key", "--cache-public-key", "--nodes-trust-paths"] {
        assert!(err.contains(want), "{want}: {err}");
    }
    // No cache at all.
    let run = fleet.cli_as_is(&[], &["--out", out.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("no --cache"), "{err}");
    assert!(!out.exists(), "nothing written");
    assert!(!fleet.path("cache").exists(), "nothing copied");
}

#[test]
fn a_cache_with_a_public_key_signed_elsewhere_is_accepted() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let out = fleet.path("out");
    let cache = format!("file://{}", fleet.path("cache").display());
    let run = fleet.cli_as_is(
        &["#kiosk"],
        &[
            "--out",
            out.to_str().unwrap(),
            "--cache",
            &cache,
            "--cache-public-key",
            &fleet.cache_public,
        ],
    );
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn a_short_expiry_and_a_dirty_tree_are_warned_about() {
    require!(nix_ready());
    let fleet = Fleet::new("");
    let out = fleet.path("out");
    let git = |args: &[&str]| git_in(&fleet.flake, args);
    git(&["init", "-q"]);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "fleet"]);
    let run = fleet.cli(&["#kiosk"], &["--out", out.to_str().unwrap()]);
    assert_eq!(run.status.code(), Some(0));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        !err.contains("uncommitted"),
        "a clean tree is not warned about: {err}"
    );
    assert!(!err.contains("--expires"), "30 days is not short: {err}");

    fleet.set_generation(2);
    let run = fleet.cli(
        &["#kiosk"],
        &["--out", out.to_str().unwrap(), "--expires", "2d"],
    );
    assert_eq!(run.status.code(), Some(0), "warnings do not fail a publish");
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("has uncommitted changes"), "{err}");
    assert!(
        err.contains("--expires 2 days") && err.contains("7 days"),
        "{err}"
    );
}

#[test]
fn waves_writes_only_those_waves_for_a_static_host_and_refuses_bad_ranges() {
    require!(nix_ready());
    let fleet = Fleet::new("{ }");
    fleet.fresh_generation();
    let out = fleet.path("out");
    let out_s = out.to_str().unwrap();
    // db and kiosk are in wave 0, web.prod in wave 2.
    let run = fleet.cli(&[], &["--out", out_s, "--waves", "0..1", "--json"]);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(layout(&out).keys().collect::<Vec<_>>(), ["db", "kiosk"]);
    let summary = json_out(&run);
    let web = summary["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "web.prod")
        .unwrap()
        .clone();
    assert_eq!(web["result"], "held", "{web}");
    assert!(
        web["error"]
            .as_str()
            .unwrap()
            .contains("wave 2 is outside --waves 0..1"),
        "{web}"
    );
    let before = layout(&out);
    // The next stage: wave 2 alone; waves 0's files stay as they were.
    let run = fleet.cli(&[], &["--out", out_s, "--waves", "2"]);
    assert_eq!(run.status.code(), Some(0));
    let after = layout(&out);
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        ["db", "kiosk", "web.prod"]
    );
    assert_eq!(after["db"], before["db"], "db untouched by --waves 2");
    // Bad ranges are refused before anything is evaluated, saying what is expected.
    for (bad, says) in [
        ("2..1", "the range is empty"),
        ("x", "expected a wave number K or a range A..B"),
        ("0..", "expected a wave number K or a range A..B"),
        ("-1", "expected a wave number"),
    ] {
        let run = fleet.cli(&[], &["--out", out_s, &format!("--waves={bad}")]);
        let err = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "--waves {bad}: {err}");
        assert!(err.contains(says), "--waves {bad}: {err}");
    }
    // A coordinator gates waves itself: --waves is for --out only.
    let run = fleet.cli(&[], &["--to", "http://127.0.0.1:9", "--waves", "0"]);
    assert_eq!(run.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&run.stderr).contains("--out"),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}
