//! Nodes that build (#12 item 6): `publish` pushes the derivations with the closures by
//! default, so a node under the default build policy (`fallback`) builds a path the cache
//! lacks from its `drv_path` — also when the cache still lists the path but cannot serve it
//! (the agent passes Nix `fallback`) — and `--no-derivations` leaves such a node deferred.

use std::path::PathBuf;
use std::process::Output;

use roost_tests::fleet::{Settings, tail};
use roost_tests::{Fleet, preflight, require};

const NODE: &str = "pi-kitchen";

/// Publishes generation `g` of the node (plus `extra` flags); its system path and version.
fn publish(f: &Fleet, g: u32, extra: &[&str]) -> (String, u64) {
    f.settings(&Settings {
        generation: g,
        ..Settings::default()
    })
    .unwrap();
    let summary = f.publish_with(&[&format!("#{NODE}")], extra).unwrap();
    let n = &summary["nodes"][0];
    let path = n["profiles"][0]["path"].as_str().unwrap().to_owned();
    (path, n["version"].as_u64().unwrap())
}

/// The coordinator's cache file for `path`'s narinfo, and the NAR it names.
fn cache_files(f: &Fleet, path: &str) -> (PathBuf, PathBuf) {
    let cache = f.coordinator.state_dir.join("cache");
    let hash = &path["/nix/store/".len().."/nix/store/".len() + 32];
    let narinfo = cache.join(format!("{hash}.narinfo"));
    let text = std::fs::read_to_string(&narinfo).unwrap();
    let url = text
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .expect("a narinfo names its NAR");
    (narinfo, cache.join(url.trim()))
}

fn once(f: &Fleet) -> Output {
    let node = f.node(NODE);
    node.run_agent(&f.agent_args(node, true), &[]).unwrap()
}

fn at(f: &Fleet) -> Option<String> {
    f.node(NODE).profile_target("var/nix/profiles/system")
}

#[test]
fn a_node_builds_what_the_cache_lacks_from_the_published_derivation() {
    require!(preflight());
    let f = Fleet::new(&[NODE]).unwrap();

    // The system is not in the cache at all: only its derivation is.
    let (v1, _) = publish(&f, 1, &[]);
    let (narinfo, _) = cache_files(&f, &v1);
    std::fs::remove_file(&narinfo).unwrap();
    let out = once(&f);
    let log = f.node(NODE).log();
    assert_eq!(out.status.code(), Some(0), "{}", tail(&log, 30));
    assert_eq!(at(&f).as_deref(), Some(v1.as_str()));
    assert!(log.contains("building from drv_path"), "{}", tail(&log, 30));

    // The cache still lists the system but serves a damaged NAR: substitution fails, and
    // only Nix's `fallback` (which the agent sets for drv_paths) turns that into a build.
    let (v2, _) = publish(&f, 2, &[]);
    let (_, nar) = cache_files(&f, &v2);
    std::fs::write(&nar, b"not the NAR the narinfo describes").unwrap();
    let out = once(&f);
    let log = f.node(NODE).log();
    assert_eq!(out.status.code(), Some(0), "{}", tail(&log, 30));
    assert_eq!(at(&f).as_deref(), Some(v2.as_str()));
}

#[test]
fn without_the_derivations_a_node_cannot_build_and_stays_deferred() {
    require!(preflight());
    let f = Fleet::new(&[NODE]).unwrap();
    let (v1, version) = publish(&f, 1, &["--no-derivations"]);
    let (narinfo, _) = cache_files(&f, &v1);
    std::fs::remove_file(&narinfo).unwrap();
    let out = once(&f);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        tail(&f.node(NODE).log(), 30)
    );
    assert_eq!(at(&f), None);
    let r = f
        .wait_report(
            NODE,
            version,
            "deferred",
            std::time::Duration::from_secs(30),
        )
        .unwrap();
    assert!(
        r.to_string().contains("drv"),
        "the deferral says the derivation could not be had: {r}"
    );
}
