//! `roost-coordinator keygen`: Nix-format files, 0600 secret, never overwrites.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use roost_common::{PublicKey, SecretKey};

fn keygen(name: &str, sk: &std::path::Path, pk: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_roost-coordinator"))
        .args(["keygen", name, "--secret-file"])
        .arg(sk)
        .arg("--public-file")
        .arg(pk)
        .output()
        .unwrap()
}

#[test]
fn keygen_writes_a_matching_pair_with_a_private_secret() {
    let d = tempfile::tempdir().unwrap();
    let (sk, pk) = (d.path().join("p.sec"), d.path().join("p.pub"));
    let out = keygen("acme-1", &sk, &pk);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = SecretKey::read_file(&sk).unwrap();
    let public = PublicKey::read_file(&pk).unwrap();
    assert_eq!(secret.public(), public);
    assert_eq!(public.name(), "acme-1");
    assert_eq!(
        std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        public.to_string()
    );
}

#[test]
fn keygen_refuses_to_overwrite_and_leaves_files_untouched() {
    let d = tempfile::tempdir().unwrap();
    let (sk, pk) = (d.path().join("p.sec"), d.path().join("p.pub"));
    std::fs::write(&pk, "precious\n").unwrap();
    let out = keygen("acme-1", &sk, &pk);
    assert_eq!(out.status.code(), Some(2), "an existing file is bad usage");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert_eq!(std::fs::read_to_string(&pk).unwrap(), "precious\n");
    assert!(!sk.exists(), "no secret may be left behind");
}

#[test]
fn keygen_refuses_a_name_nix_cannot_use_with_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let (sk, pk) = (d.path().join("p.sec"), d.path().join("p.pub"));
    for bad in ["bad:name", "two words", ""] {
        let out = keygen(bad, &sk, &pk);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!("`{bad}`")),
            "{bad:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!sk.exists() && !pk.exists());
    }
}

#[test]
fn keygen_into_a_folder_it_cannot_write_exits_1_leaving_nothing() {
    let d = tempfile::tempdir().unwrap();
    let sk = d.path().join("p.sec");
    let pk = d.path().join("missing-folder/p.pub");
    let out = keygen("acme-1", &sk, &pk);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing-folder"));
    assert!(
        !sk.exists(),
        "the secret of a pair never finished was left behind"
    );
}
