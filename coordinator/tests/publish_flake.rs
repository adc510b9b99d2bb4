//! `roost-coordinator publish` against real Nix on input-free fixture flakes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use roost_common::envelope::{self, Context};
use roost_common::wire::v1::{Activation, Manifest};
use roost_common::{SecretKey, TrustedKeys};
use serde_json::Value;

fn have_nix() -> bool {
    let ok = Command::new("nix")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: nix is not installed; this test needs real Nix (CI installs it)");
    }
    ok
}

/// A deploy-rs-shaped fleet: a dotted node name, two profiles with profilesOrder, settings at
/// all three levels, roost keys, SSH-only settings that must be ignored, and a broken node.
const FLAKE: &str = r#"{
  outputs = { self }:
    let
      system = "x86_64-linux";
      mk = name: script: derivation {
        inherit name system; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
        args = [ "-c" script ];
      };
      nixos = name: mk name "mkdir -p $out/bin; printf '#!/bin/sh\nexit 0\n' > $out/bin/switch-to-configuration; chmod +x $out/bin/switch-to-configuration";
      plain = name: mk name "mkdir -p $out; echo TAG > $out/tag";
    in {
      deploy = {
        user = "root";
        activationTimeout = 100;
        sshUser = "deploy";
        fastConnection = true;
        roost.healthChecks = [ { kind = "command"; argv = [ "true" ]; timeout_s = 3; } ];
        nodes = {
          "web.prod" = {
            hostname = "web.example.org";
            confirmTimeout = 50;
            magicRollback = false;
            roost.nodeKey = "NODEKEY";
            roost.wave = 2;
            profilesOrder = [ "app" "system" ];
            profiles = {
              system.path = nixos "nixos-system-web";
              app = {
                path = plain "app-web";
                user = "root";
                profilePath = "/nix/var/nix/profiles/per-user/root/app";
                autoRollback = false;
                activationTimeout = 7;
                roost.activation = { kind = "command"; argv = [ "bin/activate" "--now" ]; };
                roost.healthChecks = [ { kind = "http"; url = "http://127.0.0.1:9/health"; timeout_s = 2; } ];
              };
            };
          };
          db.profiles.system.path = nixos "nixos-system-db";
          cache.profiles.system.path = plain "plain-cache";
          BROKEN
        };
      };
    };
}
"#;

struct Env {
    dir: tempfile::TempDir,
    flake: PathBuf,
    key: SecretKey,
    key_file: PathBuf,
    node_key: SecretKey,
}

fn env(broken: bool) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let flake = dir.path().join("flake");
    std::fs::create_dir_all(&flake).unwrap();
    let node_key = SecretKey::generate("web.prod").unwrap();
    let tag = format!("{}-{:?}", std::process::id(), std::time::Instant::now());
    let broken_node = if broken {
        r#"broken.profiles.system.path = mk "broken" "echo this build fails on purpose >&2; exit 1";"#
    } else {
        ""
    };
    let text = FLAKE
        .replace("NODEKEY", &node_key.public().to_string())
        .replace("TAG", &tag)
        .replace("BROKEN", broken_node);
    let text = text.replace("x86_64-linux", &format!("{}-linux", std::env::consts::ARCH));
    std::fs::write(flake.join("flake.nix"), text).unwrap();
    let key = SecretKey::generate("test-publisher").unwrap();
    let key_file = dir.path().join("publisher.sec");
    key.write_new_file(&key_file).unwrap();
    Env {
        dir,
        flake,
        key,
        key_file,
        node_key,
    }
}

fn publish(e: &Env, targets: &[&str], extra: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_roost-coordinator"));
    cmd.arg("publish");
    for t in targets {
        cmd.arg(format!("{}{t}", e.flake.display()));
    }
    cmd.arg("--key").arg(&e.key_file).args(extra).arg("--json");
    cmd.output().unwrap()
}

fn out_dir(e: &Env) -> PathBuf {
    e.dir.path().join("out")
}

fn summary(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
        panic!(
            "no JSON: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn read_manifest(dir: &Path, node: &str, key: &SecretKey) -> Manifest {
    let bytes = std::fs::read(dir.join(format!("v1/nodes/{node}/manifest"))).unwrap();
    let opened = envelope::open(
        &bytes,
        Context::Manifest,
        &TrustedKeys::new([key.public()], 1),
    )
    .unwrap();
    serde_json::from_slice(&opened.payload).unwrap()
}

fn nodes_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("v1/nodes"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_deploy_rs_fleet_publishes_manifests_that_match_the_design_and_verify() {
    if !have_nix() {
        return;
    }
    let e = env(false);
    let out = out_dir(&e);
    let o = publish(&e, &[""], &["--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(nodes_in(&out), vec!["cache", "db", "web.prod"]);
    let web = read_manifest(&out, "web.prod", &e.key);
    assert_eq!(web.format, 1);
    assert_eq!(web.node.as_str(), "web.prod");
    assert_eq!(web.system, format!("{}-linux", std::env::consts::ARCH));
    assert_eq!(web.node_key, Some(e.node_key.public()));
    assert_eq!(web.rollout.wave, 2);
    assert!(
        web.expires_at.unix() - web.issued_at.unix() == 30 * 86400,
        "default expiry is 30 days"
    );
    let src = web.source.as_ref().unwrap();
    assert!(src.flake.starts_with("path:"), "{}", src.flake);
    // profilesOrder: app before system.
    let names: Vec<&str> = web.profiles.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["app", "system"]);
    let (app, sys) = (&web.profiles[0], &web.profiles[1]);
    // Profile > node > deploy precedence.
    assert_eq!(app.activation_timeout_s, 7);
    assert_eq!(sys.activation_timeout_s, 100);
    assert_eq!(app.confirm_timeout_s, 50);
    assert_eq!(sys.confirm_timeout_s, 50);
    assert!(!app.magic_rollback && !sys.magic_rollback);
    assert!(!app.auto_rollback && sys.auto_rollback);
    assert_eq!(
        app.profile_path.as_ref().unwrap().as_str(),
        "/nix/var/nix/profiles/per-user/root/app"
    );
    assert_eq!(
        app.activation,
        Activation::Command {
            argv: vec!["bin/activate".into(), "--now".into()]
        }
    );
    assert_eq!(
        sys.activation,
        Activation::Nixos {
            goal: Default::default()
        },
        "detected from bin/switch-to-configuration"
    );
    assert_eq!(app.health_checks.len(), 1);
    assert_eq!(sys.health_checks[0].name(), "command:true");
    for p in &web.profiles {
        assert!(p.nar_hash.as_deref().unwrap().starts_with("sha256-"));
        assert!(p.closure_size.unwrap() > 0);
        assert!(p.drv_path.is_some());
        assert!(p.path.as_path().exists());
    }
    let plain = read_manifest(&out, "cache", &e.key);
    assert_eq!(plain.profiles[0].activation, Activation::None);
    assert_eq!(plain.profiles[0].activation_timeout_s, 100);
    assert_eq!(
        plain.profiles[0].confirm_timeout_s, 30,
        "deploy-rs's default"
    );
    // One evaluation for the whole fleet.
    let s = summary(&o);
    assert_eq!(s["nix_invocations"]["nix eval"], 1, "{s}");
    assert_eq!(s["nix_invocations"]["nix build"], 1, "{s}");
}

#[test]
fn selecting_a_node_or_a_profile_publishes_only_that() {
    if !have_nix() {
        return;
    }
    let e = env(false);
    let out = out_dir(&e);
    let o = publish(&e, &["#db"], &["--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(nodes_in(&out), vec!["db"]);
    let o = publish(
        &e,
        &["#\"web.prod\".app"],
        &["--out", out.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(nodes_in(&out), vec!["db", "web.prod"]);
    let web = read_manifest(&out, "web.prod", &e.key);
    assert_eq!(
        web.profiles
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["app"]
    );
}

#[test]
fn unknown_nodes_and_profiles_are_usage_errors_that_list_what_exists() {
    if !have_nix() {
        return;
    }
    let e = env(false);
    let out = out_dir(&e);
    let o = publish(&e, &["#nope"], &["--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no node `nope`") && err.contains("cache, db, web.prod"),
        "{err}"
    );
    let o = publish(&e, &["#db.nope"], &["--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("node `db` has: system"));
    assert!(!out.exists(), "nothing may be written");
}

#[test]
fn a_key_file_in_the_wrong_format_is_a_usage_error() {
    if !have_nix() {
        return;
    }
    let e = env(false);
    std::fs::write(e.dir.path().join("bad.sec"), e.key.public().to_string()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_roost-coordinator"))
        .arg("publish")
        .arg(&e.flake)
        .arg("--key")
        .arg(e.dir.path().join("bad.sec"))
        .arg("--out")
        .arg(out_dir(&e))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.sec") && err.contains("secret key has 64"),
        "{err}"
    );
}

#[test]
fn a_failing_node_is_reported_and_the_rest_publish_unless_all_or_nothing() {
    if !have_nix() {
        return;
    }
    let e = env(true);
    let out = out_dir(&e);
    let strict = e.dir.path().join("strict");
    let o = publish(
        &e,
        &[""],
        &["--out", strict.to_str().unwrap(), "--all-or-nothing"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        nodes_in(&strict).is_empty(),
        "--all-or-nothing published {:?}",
        nodes_in(&strict)
    );
    let s = summary(&o);
    assert!(
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["result"] == "skipped")
    );

    let o = publish(&e, &[""], &["--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(nodes_in(&out), vec!["cache", "db", "web.prod"]);
    let s = summary(&o);
    let broken = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == "broken")
        .unwrap();
    assert_eq!(broken["result"], "failed");
    let msg = broken["error"].as_str().unwrap();
    assert!(
        msg.contains("build failed") && msg.contains("system"),
        "{msg}"
    );
}

#[test]
fn publishing_twice_gives_strictly_higher_versions() {
    if !have_nix() {
        return;
    }
    let e = env(false);
    let out = out_dir(&e);
    // A version from the future at the destination: the next publish must still go above it.
    let o = publish(
        &e,
        &["#db"],
        &[
            "--out",
            out.to_str().unwrap(),
            "--manifest-version",
            "99999999999999",
        ],
    );
    assert!(o.status.success());
    let first = read_manifest(&out, "db", &e.key).version;
    let o = publish(&e, &["#db"], &["--out", out.to_str().unwrap()]);
    assert!(o.status.success());
    let second = read_manifest(&out, "db", &e.key).version;
    assert!(second > first, "{second} > {first}");
}

#[tokio::test(flavor = "multi_thread")]
async fn out_and_to_produce_byte_identical_envelopes() {
    if !have_nix() {
        return;
    }
    let e = env(false);
    let out = out_dir(&e);
    let state = e.dir.path().join("coordinator");
    let server = roost_coordinator::serve::start(
        "127.0.0.1:0".parse().unwrap(),
        roost_coordinator::serve::ServerConfig::new(&state, TrustedKeys::new([e.key.public()], 1)),
    )
    .await
    .unwrap();
    let url = server.url();
    let fixed = [
        "--manifest-version",
        "1795349047123",
        "--issued-at",
        "2026-11-22T12:00:00Z",
    ];
    let args_out: Vec<&str> = ["--out", out.to_str().unwrap()]
        .into_iter()
        .chain(fixed)
        .collect();
    let args_to: Vec<&str> = ["--to", url.as_str()].into_iter().chain(fixed).collect();
    let (e1, e2) = (&e, &e);
    let o1 = tokio::task::block_in_place(|| publish(e1, &[""], &args_out));
    assert!(
        o1.status.success(),
        "{}",
        String::from_utf8_lossy(&o1.stderr)
    );
    let o2 = tokio::task::block_in_place(|| publish(e2, &[""], &args_to));
    assert!(
        o2.status.success(),
        "{}",
        String::from_utf8_lossy(&o2.stderr)
    );
    for node in ["cache", "db", "web.prod"] {
        let file = std::fs::read(out.join(format!("v1/nodes/{node}/manifest"))).unwrap();
        let served = reqwest::get(format!("{url}/v1/nodes/{node}/manifest"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(file, served.to_vec(), "{node}");
    }
    // The coordinator refuses the same version again, and publish says so by name.
    let o3 = tokio::task::block_in_place(|| publish(e2, &["#db"], &args_to));
    assert!(
        o3.status.success(),
        "publish bumps above the destination's version"
    );
    server.stop().await.unwrap();
}

#[test]
fn a_closure_copied_to_a_file_cache_substitutes_into_an_empty_store_with_only_its_key() {
    if !have_nix() {
        return;
    }
    let e = env(false);
    let out = out_dir(&e);
    let cache_key = SecretKey::generate("test-file-cache").unwrap();
    let cache_sec = e.dir.path().join("cache.sec");
    cache_key.write_new_file(&cache_sec).unwrap();
    let cache = format!("file://{}", e.dir.path().join("cache").display());
    let o = publish(
        &e,
        &["#db"],
        &[
            "--out",
            out.to_str().unwrap(),
            "--cache",
            &cache,
            "--cache-key",
            cache_sec.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = read_manifest(&out, "db", &e.key);
    assert_eq!(m.substituters[0].url, cache);
    assert_eq!(
        m.substituters[0].public_keys,
        vec![cache_key.public().to_string()]
    );
    let store = e.dir.path().join("empty-store");
    let path = m.profiles[0].path.to_string();
    let o = Command::new("nix")
        .args(["copy", "--from", &cache, &path, "--to"])
        .arg(&store)
        .args([
            "--option",
            "trusted-public-keys",
            &cache_key.public().to_string(),
            "--option",
            "require-sigs",
            "true",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        store
            .join(path.trim_start_matches('/'))
            .join("bin/switch-to-configuration")
            .exists()
    );
}
