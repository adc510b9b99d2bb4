//! Keys agree with real Nix both ways: Nix-made keys sign roost envelopes, and roost-made keys
//! sign store paths that `nix store verify` accepts.

use std::path::Path;
use std::process::Command;

use roost_common::envelope::{self, Context, Envelope};
use roost_common::{PublicKey, SecretKey, TrustedKeys};
use roost_preflight::{require, tools};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_key_pair_from_nix_signs_an_envelope_that_verifies() {
    require!(tools(&["nix", "nix-store"]));
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
    run(Command::new("nix-store")
        .args(["--generate-binary-cache-key", "nix-made-1"])
        .arg(&sk)
        .arg(&pk));
    let secret = SecretKey::read_file(&sk).unwrap();
    let public = PublicKey::read_file(&pk).unwrap();
    assert_eq!(
        secret.public(),
        public,
        "the public half stored in Nix's secret matches its public file"
    );
    let env = Envelope::seal(Context::Manifest, b"{\"hello\":1}", &[&secret]);
    let opened = envelope::open(
        &env.to_bytes(),
        Context::Manifest,
        &TrustedKeys::new([public], 1),
    )
    .unwrap();
    assert_eq!(opened.payload, b"{\"hello\":1}");
}

fn build_fixture(tag: &str) -> String {
    let expr = format!(
        r#"derivation {{ name = "roost-key-fixture"; system = builtins.currentSystem; builder = "/bin/sh";
            args = [ "-c" "echo {tag} > $out" ]; PATH = "/usr/bin:/bin"; }}"#
    );
    let out = run(Command::new("nix").args([
        "build",
        "--impure",
        "--json",
        "--no-link",
        "--expr",
        &expr,
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["outputs"]["out"].as_str().unwrap().to_owned()
}

#[test]
fn a_key_pair_from_roost_is_accepted_by_nix_store_sign_and_verify() {
    require!(tools(&["nix", "nix-store"]));
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = (dir.path().join("sk"), dir.path().join("pk"));
    let key = SecretKey::generate("roost-made-1").unwrap();
    key.write_new_file(&sk).unwrap();
    std::fs::write(&pk, format!("{}\n", key.public())).unwrap();
    let tag = format!("{:?}", std::time::SystemTime::now());
    let path = build_fixture(&tag);

    let verify = |keys: &str| {
        Command::new("nix")
            .args([
                "store",
                "verify",
                "--no-contents",
                "--sigs-needed",
                "1",
                "--trusted-public-keys",
                keys,
            ])
            .arg(&path)
            .output()
            .unwrap()
    };
    // Not signed yet: verification with only our key must fail, proving the check is real.
    assert!(!verify(&key.public().to_string()).status.success());
    run(Command::new("nix")
        .args(["store", "sign", "--key-file"])
        .arg(&sk)
        .arg(&path));
    let pk_text = std::fs::read_to_string(&pk).unwrap();
    let out = verify(pk_text.trim());
    assert!(
        out.status.success(),
        "nix store verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(Path::new(&path).exists());
}
