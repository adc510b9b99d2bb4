//! The rule, proved on a real libtest run: this test binary runs its own ignored helper test
//! as a child process, without `--nocapture`, with and without `CI=true`.

use std::process::{Command, Output};

use roost_preflight::require;

const REASON: &str = "the proof's deliberately missing prerequisite";
const CAPTURED: &str = "a line libtest captures";

/// Missing a prerequisite on purpose; only ever run as the child below.
#[test]
#[ignore = "run by the other tests of this file as a child process"]
fn child_missing_a_prerequisite() {
    eprintln!("{CAPTURED}");
    require!(Err::<(), String>(REASON.into()));
    unreachable!("require! returned into the test");
}

fn child(ci: Option<&str>) -> (Output, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--ignored", "--exact", "child_missing_a_prerequisite"])
        .args(["--test-threads", "1"])
        .env_remove("CI")
        .env_remove("RUST_TEST_NOCAPTURE");
    if let Some(v) = ci {
        cmd.env("CI", v);
    }
    let out = cmd.output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, all)
}

#[test]
fn a_skip_outside_ci_passes_and_says_skip_without_nocapture() {
    let (out, all) = child(None);
    assert!(out.status.success(), "the skipped child failed:\n{all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "SKIP child_missing_a_prerequisite: {REASON} (CI=true makes this a failure)"
        )),
        "no SKIP line on stderr:\n{all}"
    );
    // The control: the same test's eprintln! was captured, so the SKIP line is visible
    // because of how it is written, not because capture was off.
    assert!(
        !all.contains(CAPTURED),
        "eprintln! was not captured:\n{all}"
    );
}

#[test]
fn a_missing_prerequisite_fails_under_ci_with_the_reason() {
    for ci in ["true", "1"] {
        let (out, all) = child(Some(ci));
        assert_eq!(
            out.status.code(),
            Some(101),
            "CI={ci}: the child passed:\n{all}"
        );
        assert!(all.contains(REASON), "CI={ci}: no reason given:\n{all}");
        assert!(all.contains("missing under CI=true"), "{all}");
    }
}

#[test]
fn ci_false_or_empty_skips() {
    for ci in ["false", "0", ""] {
        let (out, all) = child(Some(ci));
        assert!(out.status.success(), "CI={ci:?}: the child failed:\n{all}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("SKIP"),
            "{all}"
        );
    }
}
