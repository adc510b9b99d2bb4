//! Every `.nix` file of the repository parses (the modules' evaluation is in nixos_module.rs).

use std::path::{Path, PathBuf};
use std::process::Command;

use roost_tests::repo_root;

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: {tool} is not installed (CI installs Nix)");
    }
    ok
}

fn nix_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" {
            continue;
        }
        if p.is_dir() {
            nix_files(&p, out);
        } else if name.ends_with(".nix") {
            out.push(p);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    if !have("nix-instantiate") {
        return;
    }
    let mut files = Vec::new();
    nix_files(&repo_root(), &mut files);
    assert!(
        files.len() >= 10,
        "expected the modules, flake, tests and examples: {files:?}"
    );
    for f in &files {
        let o = Command::new("nix-instantiate")
            .arg("--parse")
            .arg(f)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{} does not parse:\n{}",
            f.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
