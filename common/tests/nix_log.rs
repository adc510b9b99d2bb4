//! The door's structured log (`Nix::with_log`) against real Nix: the events a progress
//! display needs arrive while the call runs, and a failed build's error reads as in Nix's
//! plain format, its last log lines included. Needs `nix` and root (it builds).

#![cfg(feature = "nix")]

use std::sync::{Arc, Mutex};

use roost_common::nix::log::{Activity, Event};
use roost_common::nix::{LogFn, Nix};
use roost_preflight::require;

#[test]
fn a_failing_build_with_a_structured_log_reports_events_and_the_builders_words() {
    require!(roost_preflight::tools(&["nix"]));
    require!(roost_preflight::root("the test builds into the Nix store"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f.nix");
    let nonce = format!("{:?}", std::time::SystemTime::now());
    std::fs::write(
        &file,
        format!(
            r#"derivation {{
  name = "roost-log-test";
  nonce = "{nonce}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo first words; echo roost-test: this build fails on purpose >&2; exit 1" ];
}}"#
        ),
    )
    .unwrap();
    let seen: Arc<Mutex<Vec<Event>>> = Arc::default();
    let sink = seen.clone();
    let f: LogFn = Arc::new(move |e: &Event| sink.lock().unwrap().push(e.clone()));
    let nix = Nix::new()
        .with_extra_args(vec!["--impure".into()])
        .with_log(f);
    let e = nix
        .build(&["--file".into(), file.display().to_string()], true)
        .unwrap_err();
    let text = e.stderr_tail;
    assert!(text.contains("error: builder for '/nix/store/"), "{text}");
    assert!(
        text.contains("> first words")
            && text.contains("> roost-test: this build fails on purpose"),
        "the builder's last lines, as in Nix's plain format: {text}"
    );
    assert!(!text.contains("@nix"), "no raw structured lines: {text}");
    let seen = seen.lock().unwrap();
    assert!(
        seen.iter().any(|e| matches!(
            e,
            Event::Start {
                activity: Activity::Build,
                ..
            }
        )),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::LogLine { line, .. } if line == "first words")),
        "{seen:?}"
    );
}
