//! deploy-rs compatibility (#13): fixture flakes written for deploy-rs, through a real
//! `publish` and a real agent on a namespaced node, behave as deploy-rs's own source says —
//! `user` falling back to `sshUser`, `profilePath` read per profile only, `profilesOrder`
//! repeats dropped, activation in the profile link with `PROFILE`, `DRY_ACTIVATE=0` and
//! `BOOT=0`, other users' profiles owned by them, and a failed generation deleted on rollback.
//! (deploy-rs's `parse_flake` vectors are unit tests in `coordinator/src/publish/target.rs`.)

use std::os::unix::fs::MetadataExt;

use roost_common::wire::v1::http as v1;
use roost_tests::fleet::{Settings, tail};
use roost_tests::{Fleet, http_get, preflight, require};
use serde_json::Value;

const NODE: &str = "web";

/// A deploy-rs fleet of one node: `system` (a NixOS-like system), `hello` (what deploy-rs's
/// `lib.activate.custom pkgs.hello "./bin/hello"` builds: the package plus a
/// `deploy-rs-activate` that runs `./bin/hello` from the profile's folder, and, like deploy-rs's
/// wrapper, branches on DRY_ACTIVATE/BOOT under `set -u`), and `tools` (a plain profile of
/// another user). No `user` anywhere: `sshUser` names the owner, as deploy-rs reads it.
const FLAKE: &str = r#"{
  outputs = { self }:
    let
      settings = import ./settings.nix;
      inherit (settings) system generation;
      fixtures = import ./fixtures.nix { inherit system; };
      sh = name: script: derivation {
        name = "${name}-g${toString generation}";
        inherit system;
        builder = "/bin/sh";
        PATH = "/usr/bin:/bin";
        args = [ "-c" script ];
      };
      hello = sh "hello" ''
        mkdir -p $out/bin
        printf '%s\n' '#!/bin/sh' 'echo "hello $PROFILE $(pwd -P)" >> "$ROOST_FIXTURE_LOG"' > $out/bin/hello
        printf '%s\n' '#!/bin/sh' 'set -eu' 'if [ "$DRY_ACTIVATE" = 1 ]; then exit 3; elif [ "$BOOT" = 1 ]; then exit 4; fi' './bin/hello' > $out/deploy-rs-activate
        chmod +x $out/bin/hello $out/deploy-rs-activate
      '';
      tools = sh "tools" "mkdir -p $out/bin && echo tools > $out/bin/README";
    in {
      deploy = {
        sshUser = "root";
        hostname = "unused.example.org";
        nodes.web = {
          hostname = "web.example.org";
          # deploy-rs reads profilePath per profile only: here it is ignored.
          profilePath = "/nix/var/nix/profiles/shared";
          profilesOrder = [ "tools" "system" "tools" ];
          profiles = {
            system.path = fixtures.fakeSystem { node = "web"; inherit generation; };
            hello.path = hello;
            tools = {
              path = tools;
              user = "nobody";
              profilePath = "/nix/var/nix/profiles/per-user/nobody/tools";
            };
          };
        };
      };
    };
}
"#;

/// The manifest the coordinator serves for `node`, decoded.
fn served_manifest(f: &Fleet, node: &str) -> Value {
    use base64::Engine;
    let body = http_get(&v1::manifest_url(&f.coordinator.url(), node)).unwrap();
    let env: Value = serde_json::from_slice(&body).unwrap();
    let payload = base64::engine::general_purpose::STANDARD
        .decode(env["payload"].as_str().unwrap())
        .unwrap();
    serde_json::from_slice(&payload).unwrap()
}

fn path_of(summary: &Value, profile: &str) -> String {
    summary["nodes"][0]["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == profile)
        .unwrap_or_else(|| panic!("no profile {profile} in {summary}"))["path"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn a_deploy_rs_flake_publishes_and_activates_as_deploy_rs_would() {
    require!(preflight());
    let nobody = require!(
        nix::unistd::User::from_name("nobody")
            .ok()
            .flatten()
            .ok_or("there is no user `nobody` to own a profile")
    );
    let f = Fleet::new(&[NODE]).unwrap();
    f.edit("flake.nix", FLAKE).unwrap();
    let summary = f.publish(&[]).unwrap();

    // The manifest: each repeat in profilesOrder once, the listed ones first; `sshUser` as
    // the owner where no `user` is set; no node-level profilePath.
    let m = served_manifest(&f, NODE);
    let profiles = m["profiles"].as_array().unwrap();
    let names: Vec<&str> = profiles
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["tools", "system", "hello"]);
    let field =
        |name: &str, key: &str| profiles.iter().find(|p| p["name"] == name).unwrap()[key].clone();
    assert_eq!(field("system", "user"), "root");
    assert_eq!(field("hello", "user"), "root");
    assert_eq!(field("tools", "user"), "nobody");
    assert_eq!(field("system", "profile_path"), Value::Null);
    assert_eq!(field("hello", "profile_path"), Value::Null);
    assert_eq!(field("hello", "activation")["kind"], "deploy-rs");

    // The agent deploys all three (a duplicate profile would have been refused).
    let node = f.node(NODE);
    let out = node.run_agent(&f.agent_args(node, true), &[]).unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", tail(&node.log(), 40));
    for (profile, link) in [
        ("system", "var/nix/profiles/system"),
        ("hello", "var/nix/profiles/per-user/root/hello"),
        ("tools", "var/nix/profiles/per-user/nobody/tools"),
    ] {
        assert_eq!(
            node.profile_target(link).as_deref(),
            Some(path_of(&summary, profile).as_str()),
            "{profile} at {link}"
        );
    }
    assert!(!node.nix_dir().join("var/nix/profiles/shared").exists());

    // deploy-rs-activate ran in the profile's folder (so ./bin/hello was found), with
    // PROFILE the link and DRY_ACTIVATE/BOOT set (it runs under `set -u`).
    let hello: Vec<String> = node
        .activations()
        .into_iter()
        .filter(|l| l.starts_with("hello "))
        .collect();
    assert_eq!(
        hello,
        [format!(
            "hello /nix/var/nix/profiles/per-user/root/hello {}",
            path_of(&summary, "hello")
        )]
    );

    // Another user's profile is that user's, as when deploy-rs runs nix-env as them: its
    // folder, the link and the generation; the shared per-user folder stays root's.
    let profiles_dir = node.nix_dir().join("var/nix/profiles/per-user");
    let uid = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().uid();
    let who = nobody.uid.as_raw();
    assert_eq!(uid(&profiles_dir.join("nobody")), who);
    assert_eq!(uid(&profiles_dir.join("nobody/tools")), who);
    assert_eq!(uid(&profiles_dir.join("nobody/tools-1-link")), who);
    assert_eq!(uid(&profiles_dir), 0);
    assert_eq!(uid(&profiles_dir.join("root/hello")), 0);
}

#[test]
fn a_profile_with_neither_user_nor_ssh_user_is_refused_naming_it() {
    require!(preflight());
    let f = Fleet::new(&[]).unwrap();
    f.edit("flake.nix", &FLAKE.replace("sshUser = \"root\";", ""))
        .unwrap();
    let out = f.publish_command(&[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    let error = summary["nodes"][0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("neither `user` nor `sshUser`") && error.contains("`system`"),
        "{summary}"
    );
}

/// The system profile's generation numbers in the node, and the current one.
fn generations(f: &Fleet, node: &str) -> (Vec<u64>, Option<u64>) {
    let dir = f.node(node).nix_dir().join("var/nix/profiles");
    let number = |name: &str| -> Option<u64> {
        name.strip_prefix("system-")?
            .strip_suffix("-link")?
            .parse()
            .ok()
    };
    let mut all: Vec<u64> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| number(e.ok()?.file_name().to_str()?))
        .collect();
    all.sort();
    let current = std::fs::read_link(dir.join("system"))
        .ok()
        .and_then(|l| number(l.to_str()?));
    (all, current)
}

#[test]
fn a_rollback_deletes_the_failed_generation_as_deploy_rs_does() {
    require!(preflight());
    const PI: &str = "pi-kitchen";
    let f = Fleet::new(&[PI]).unwrap();
    let once = |f: &Fleet| {
        let node = f.node(PI);
        node.run_agent(&f.agent_args(node, true), &[]).unwrap()
    };
    f.publish(&[&format!("#{PI}")]).unwrap();
    assert_eq!(once(&f).status.code(), Some(0));
    assert_eq!(generations(&f, PI), (vec![1], Some(1)));

    f.settings(&Settings {
        generation: 2,
        behaviour: vec![(PI, "fail")],
        ..Settings::default()
    })
    .unwrap();
    let v2 = f.publish(&[&format!("#{PI}")]).unwrap()["nodes"][0]["version"]
        .as_u64()
        .unwrap();
    assert_eq!(once(&f).status.code(), Some(1));
    f.wait_report(PI, v2, "rolled_back", std::time::Duration::from_secs(30))
        .unwrap();
    // Back at generation 1, and generation 2 (the failed system) is gone: no boot entry, no
    // garbage-collector root.
    assert_eq!(generations(&f, PI), (vec![1], Some(1)));
}
