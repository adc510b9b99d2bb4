//! The NixOS modules (`nixos-module/`), evaluated with nixpkgs' `lib` alone through
//! `nix/module-eval.nix`: the units they generate have the settings a safe deployment needs,
//! the agent's generated config passes `roost-agent check-config` (at build time too), and bad
//! settings are refused with an error naming the option.
//!
//! `ROOST_NIXPKGS_LIB` names a nixpkgs `lib` folder (`.ci/run` sets it; a checkout of
//! github:nix-community/nixpkgs.lib, its `lib/`, does too). They build tiny derivations, so they
//! need Nix and a writable store (root without a daemon). Without them they fail under
//! `CI=true` and skip loudly elsewhere.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use roost_preflight::{root, tools};
use roost_tests::{bin, nixpkgs_lib, repo_root, require};
use serde_json::Value;

/// Where the modules are evaluated: nixpkgs' lib, keys, scratch files.
struct Eval {
    lib: PathBuf,
    dir: tempfile::TempDir,
    /// An inline public key (`name:base64`).
    key: String,
    /// A public key file, used as a path literal.
    key_file: PathBuf,
}

/// What these tests need: nixpkgs' lib, Nix's tools, a writable store.
fn prerequisites() -> Result<PathBuf, String> {
    let lib = nixpkgs_lib()?;
    tools(&["nix-instantiate", "nix-build", "nix-store"])?;
    root("building the modules' files needs a writable Nix store without a daemon")?;
    Ok(lib)
}

/// Sets up an evaluation with nixpkgs' lib at `lib`.
fn setup(lib: PathBuf) -> Eval {
    let dir = tempfile::tempdir().unwrap();
    let first = keypair(dir.path(), "fleet-publisher-1");
    let key_file = keypair(dir.path(), "fleet-publisher-2");
    let key = std::fs::read_to_string(first).unwrap().trim().to_owned();
    Eval {
        lib,
        dir,
        key,
        key_file,
    }
}

/// Makes a Nix binary-cache key pair named `name` in `dir`; returns the public file.
fn keypair(dir: &Path, name: &str) -> PathBuf {
    let sec = dir.join(format!("{name}.sec"));
    let public = dir.join(format!("{name}.pub"));
    let out = Command::new("nix-store")
        .arg("--generate-binary-cache-key")
        .arg(name)
        .arg(&sec)
        .arg(&public)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nix-store --generate-binary-cache-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    public
}

/// The workspace's debug build of `name`, failing clearly when it was not built.
fn built(name: &str) -> PathBuf {
    let p = bin(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before these tests",
        p.display()
    );
    p
}

impl Eval {
    /// `nix-instantiate`/`nix-build` arguments that load the harness with `configuration`.
    fn harness_args(&self, configuration: &str) -> Vec<String> {
        vec![
            repo_root()
                .join("nix/module-eval.nix")
                .display()
                .to_string(),
            "--arg".into(),
            "lib".into(),
            format!("import {}", self.lib.display()),
            "--arg".into(),
            "configuration".into(),
            configuration.into(),
            "--argstr".into(),
            "agentBin".into(),
            bin("roost-agent").display().to_string(),
            "--argstr".into(),
            "coordinatorBin".into(),
            bin("roost-coordinator").display().to_string(),
        ]
    }

    /// Evaluates `attr` of the harness strictly, as JSON; Err is Nix's stderr.
    fn eval(&self, configuration: &str, attr: &str) -> Result<Value, String> {
        let out = Command::new("nix-instantiate")
            .args(["--eval", "--strict", "--json"])
            .args(self.harness_args(configuration))
            .args(["-A", attr])
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).expect("nix-instantiate printed JSON"))
    }

    /// Builds `attr` of the harness; Err is Nix's stderr (build logs included).
    fn build(&self, configuration: &str, attr: &str) -> Result<PathBuf, String> {
        let out = Command::new("nix-build")
            .arg("--no-out-link")
            .args(self.harness_args(configuration))
            .args(["-A", attr])
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(PathBuf::from(
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        ))
    }

    /// An agent configuration with both kinds of trusted key and `extra` Nix attributes.
    fn agent(&self, extra: &str) -> String {
        format!(
            r#"{{ networking.hostName = "pi-kitchen";
                 services.roost.agent = {{
                   enable = true;
                   coordinators = [ "https://roost.example.org" ];
                   trustedKeys = [ "{}" {} ];
                   {extra}
                 }}; }}"#,
            self.key,
            self.key_file.display()
        )
    }

    /// A coordinator configuration with `extra` Nix attributes.
    fn coordinator(&self, extra: &str) -> String {
        format!(
            r#"{{ services.roost.coordinator = {{
                   enable = true;
                   publisherKeys = [ "{}" ];
                   {extra}
                 }}; }}"#,
            self.key
        )
    }
}

fn service(e: &Eval, configuration: &str, name: &str) -> Value {
    e.eval(configuration, &format!("config.systemd.services.{name}"))
        .unwrap_or_else(|err| panic!("evaluating the {name} unit failed:\n{err}"))
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn agent_daemon_unit_notifies_is_watched_and_survives_the_switches_it_performs() {
    let e = setup(require!(prerequisites()));
    let cfg = e.agent("");
    let unit = service(&e, &cfg, "roost-agent");
    let sc = &unit["serviceConfig"];
    assert_eq!(sc["Type"], "notify", "{unit:#}");
    assert!(
        sc["WatchdogSec"].as_str().is_some_and(|w| !w.is_empty()),
        "{unit:#}"
    );
    assert_eq!(sc["Restart"], "always", "{unit:#}");
    assert_eq!(unit["restartIfChanged"], false, "{unit:#}");
    assert_eq!(unit["stopIfChanged"], false, "{unit:#}");
    assert!(strings(&unit["after"]).contains(&"network-online.target"));
    assert!(strings(&unit["wants"]).contains(&"network-online.target"));
    assert!(strings(&unit["wantedBy"]).contains(&"multi-user.target"));
    let nix = e.eval(&cfg, "config.nix.package.outPath").unwrap();
    assert!(
        unit["path"].as_array().unwrap().contains(&nix),
        "config.nix.package is not on the agent's path: {unit:#}"
    );
    let config_file = e
        .eval(&cfg, "config.services.roost.agent.configFile.outPath")
        .unwrap();
    let exec = sc["ExecStart"].as_str().unwrap();
    assert!(
        exec.ends_with(&format!(
            "/bin/roost-agent run --config {}",
            config_file.as_str().unwrap()
        )),
        "{exec}"
    );
    assert!(
        e.eval(&cfg, "config.systemd.timers")
            .unwrap()
            .as_object()
            .unwrap()
            .is_empty()
    );
}

#[test]
fn agent_timer_mode_runs_once_on_a_persistent_timer() {
    let e = setup(require!(prerequisites()));
    let cfg = e.agent(r#"mode = "timer"; dates = "hourly";"#);
    let timer = e
        .eval(&cfg, "config.systemd.timers.roost-agent")
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(timer["timerConfig"]["Persistent"], true, "{timer:#}");
    assert_eq!(timer["timerConfig"]["OnCalendar"], "hourly", "{timer:#}");
    assert!(strings(&timer["wantedBy"]).contains(&"timers.target"));
    let unit = service(&e, &cfg, "roost-agent");
    assert_eq!(unit["serviceConfig"]["Type"], "oneshot", "{unit:#}");
    assert!(
        unit["serviceConfig"]["ExecStart"]
            .as_str()
            .unwrap()
            .ends_with(" --once")
    );
    assert!(unit["serviceConfig"].get("Restart").is_none(), "{unit:#}");
    assert!(strings(&unit["wantedBy"]).is_empty(), "{unit:#}");
    assert_eq!(unit["restartIfChanged"], false);
}

#[test]
fn agent_generated_config_has_every_option_and_passes_check_config() {
    let e = setup(require!(prerequisites()));
    let cfg = e.agent(
        r#"checkConfig = false;
           threshold = 2;
           interval = "30s";
           buildPolicy = "substitute-only";
           settings.realise_timeout = "2h";"#,
    );
    let file = e
        .build(&cfg, "config.services.roost.agent.configFile")
        .unwrap_or_else(|err| panic!("{err}"));
    let json: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(json["node"], "pi-kitchen", "{json:#}");
    assert_eq!(json["coordinators"][0], "https://roost.example.org");
    assert_eq!(json["threshold"], 2);
    assert_eq!(json["interval"], "30s");
    assert_eq!(json["build_policy"], "substitute-only");
    assert_eq!(json["state_dir"], "/var/lib/roost");
    assert_eq!(json["realise_timeout"], "2h");
    // Both the inline key and the key file became files holding the public key.
    let keys = strings(&json["trusted_keys"]);
    assert_eq!(keys.len(), 2, "{json:#}");
    assert_eq!(
        std::fs::read_to_string(keys[0]).unwrap().trim(),
        e.key,
        "the inline key's file"
    );
    assert_eq!(
        std::fs::read_to_string(keys[1]).unwrap(),
        std::fs::read_to_string(&e.key_file).unwrap(),
        "the key file's copy"
    );
    let out = Command::new(built("roost-agent"))
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "roost-agent check-config refused the module's config:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("pi-kitchen"));
}

#[test]
fn agent_config_is_checked_at_build_time_and_an_unknown_key_fails_the_build() {
    let e = setup(require!(prerequisites()));
    built("roost-agent");
    e.build(&e.agent(""), "config.services.roost.agent.configFile")
        .unwrap_or_else(|err| panic!("a valid config failed the build-time check:\n{err}"));
    let err = e
        .build(
            &e.agent(r#"settings.pol_interval = "5s";"#),
            "config.services.roost.agent.configFile",
        )
        .expect_err("a config with an unknown key was built");
    assert!(err.contains("pol_interval"), "{err}");
}

#[test]
fn agent_refuses_a_malformed_inline_key_naming_the_option() {
    let e = setup(require!(prerequisites()));
    let cfg = r#"{ services.roost.agent = { enable = true; trustedKeys = [ "not a key" ]; }; }"#;
    let err = e
        .eval(cfg, "config.services.roost.agent.configFile.outPath")
        .expect_err("a malformed key was accepted");
    assert!(err.contains("trustedKeys"), "{err}");
}

#[test]
fn coordinator_unit_is_hardened_and_gets_its_secrets_as_credentials() {
    let e = setup(require!(prerequisites()));
    let cfg = e.coordinator(
        r#"uploadTokenFile = "/run/secrets/roost-upload-token";
           adminTokenFile = "/run/secrets/roost-admin-token";
           tlsCertFile = "/var/lib/acme/roost/fullchain.pem";
           tlsKeyFile = "/var/lib/acme/roost/key.pem";
           openFirewall = true;
           listen = "[::]:8443";"#,
    );
    let unit = service(&e, &cfg, "roost-coordinator");
    let sc = &unit["serviceConfig"];
    assert_eq!(sc["DynamicUser"], true, "{unit:#}");
    assert_eq!(sc["StateDirectory"], "roost-coordinator");
    for (k, v) in [
        ("ProtectSystem", Value::from("strict")),
        ("ProtectHome", Value::from(true)),
        ("PrivateTmp", Value::from(true)),
        ("NoNewPrivileges", Value::from(true)),
        ("CapabilityBoundingSet", Value::from("")),
    ] {
        assert_eq!(sc[k], v, "{k}: {unit:#}");
    }
    assert!(strings(&sc["SystemCallFilter"]).contains(&"@system-service"));
    assert!(strings(&sc["RestrictAddressFamilies"]).contains(&"AF_INET6"));
    assert_eq!(
        strings(&sc["LoadCredential"]),
        [
            "upload-token:/run/secrets/roost-upload-token",
            "admin-token:/run/secrets/roost-admin-token",
            "tls-cert:/var/lib/acme/roost/fullchain.pem",
            "tls-key:/var/lib/acme/roost/key.pem"
        ]
    );
    let exec = sc["ExecStart"].as_str().unwrap();
    for part in [
        "--upload-token-file %d/upload-token",
        "--admin-token-file %d/admin-token",
        "--tls-cert %d/tls-cert",
        "--tls-key %d/tls-key",
    ] {
        assert!(exec.contains(part), "{part} missing from {exec}");
    }
    assert!(
        !exec.contains("/run/secrets"),
        "the secret's own path leaked into the command line: {exec}"
    );
    assert_eq!(
        e.eval(&cfg, "config.networking.firewall.allowedTCPPorts")
            .unwrap(),
        serde_json::json!([8443])
    );
    assert_eq!(
        e.eval(&cfg, "failedAssertions").unwrap(),
        serde_json::json!([])
    );
}

#[test]
fn coordinator_refuses_a_token_in_the_nix_store() {
    let e = setup(require!(prerequisites()));
    for option in ["uploadTokenFile", "adminTokenFile"] {
        let cfg = e.coordinator(&format!(
            r#"{option} = "${{builtins.toFile "token" "0123456789abcdef"}}";"#
        ));
        let failed = e.eval(&cfg, "failedAssertions").unwrap();
        let failed = strings(&failed);
        assert!(
            failed.iter().any(|m| m.contains(option)),
            "{option}: {failed:?}"
        );
    }
}

/// Splits a systemd command line the way `lib.escapeShellArgs` quotes it (bare words and
/// single quotes, `'\''` for a quote).
fn split_command_line(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in s.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            ' ' if !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\\' if !quoted => {}
            _ => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

#[test]
fn coordinator_command_line_is_one_roost_coordinator_serve_accepts() {
    let e = setup(require!(prerequisites()));
    let binary = built("roost-coordinator");
    let cfg = e.coordinator(
        r#"uploadTokenFile = "/run/secrets/roost-upload-token"; listen = "127.0.0.1:0";
           readTokenFile = "/run/secrets/roost-read-token"; publicRead = true;"#,
    );
    // Building a file that holds ExecStart realises everything it names (key files).
    let exec = e
        .build(&cfg, "execStart.roost-coordinator")
        .unwrap_or_else(|err| panic!("{err}"));
    let exec = std::fs::read_to_string(exec).unwrap();
    let creds = e.dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("upload-token"), "0123456789abcdef0123\n").unwrap();
    std::fs::write(creds.join("read-token"), "read-0123456789abcdef\n").unwrap();
    assert!(
        exec.contains("--read-token-file") && exec.contains("--public-read"),
        "{exec}"
    );
    let state = e.dir.path().join("state");
    let mut args = split_command_line(&exec);
    args.remove(0);
    for a in &mut args {
        *a = a.replace("%d", &creds.display().to_string());
        if a == "/var/lib/roost-coordinator" {
            *a = state.display().to_string();
        }
    }
    let mut child = Command::new(&binary)
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // A hang guard, not a performance limit.
    let first = rx.recv_timeout(Duration::from_secs(60));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let line = first.unwrap_or_else(|_| {
        panic!(
            "roost-coordinator {args:?} did not start serving:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(line.contains("serving on http://127.0.0.1:"), "{line}");
}

#[test]
fn an_apply_only_agent_without_coordinators_starts_no_daemon_and_no_timer() {
    let e = setup(require!(prerequisites()));
    let no_coordinator = |extra: &str| {
        format!(
            r#"{{ networking.hostName = "pi-kitchen";
                 services.roost.agent = {{ enable = true; trustedKeys = [ "{}" ]; {extra} }}; }}"#,
            e.key
        )
    };
    let daemon = no_coordinator("");
    let unit = service(&e, &daemon, "roost-agent");
    assert!(strings(&unit["wantedBy"]).is_empty(), "{unit:#}");
    let timer = no_coordinator(r#"mode = "timer";"#);
    let timers = e.eval(&timer, "config.systemd.timers").unwrap();
    assert!(timers.as_object().unwrap().is_empty(), "{timers:#}");
    // The config is still valid for `apply`, and the agent is installed for it.
    e.build(&daemon, "config.services.roost.agent.configFile")
        .unwrap_or_else(|err| panic!("{err}"));
}

#[test]
fn agent_laptop_options_reach_the_config_file_and_pass_check_config() {
    let e = setup(require!(prerequisites()));
    let cfg = e.agent(
        r#"checkConfig = false;
           applyWindows = [ "Mon-Fri 12:00-13:00" "Sat 00:00-24:00" ];
           power.minBatteryPercent = 50;
           power.deferOnBattery = true;
           meteredMaxDownload = "10MiB";
           systemGoal = "boot";
           maxDefer = "8h";
           keepGenerations = 2;
           gcMinFree = "2GiB";
           gcAfterDeploy = true;
           notifications = false;
           metrics.enable = true;"#,
    );
    let file = e
        .build(&cfg, "config.services.roost.agent.configFile")
        .unwrap_or_else(|err| panic!("{err}"));
    let json: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        strings(&json["apply_windows"]),
        ["Mon-Fri 12:00-13:00", "Sat 00:00-24:00"]
    );
    assert_eq!(json["min_battery_percent"], 50, "{json:#}");
    assert_eq!(json["defer_on_battery"], true);
    assert_eq!(json["metered_max_download"], "10MiB");
    assert_eq!(json["system_goal"], "boot");
    assert_eq!(json["max_defer"], "8h");
    assert_eq!(json["keep_generations"], 2);
    assert_eq!(json["gc_min_free"], "2GiB");
    assert_eq!(json["gc_after_deploy"], true);
    assert_eq!(json["notifications"], false);
    assert_eq!(json["metrics_file"], "/var/lib/roost-metrics/roost.prom");
    let out = Command::new(built("roost-agent"))
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "roost-agent check-config refused the laptop options:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn agent_metrics_feed_the_node_exporters_textfile_collector_when_it_is_enabled() {
    let e = setup(require!(prerequisites()));
    let with = |exporter: bool| {
        format!(
            r#"{{ networking.hostName = "pi-kitchen";
                 services.prometheus.exporters.node.enable = {exporter};
                 services.roost.agent = {{
                   enable = true;
                   checkConfig = false;
                   coordinators = [ "https://roost.example.org" ];
                   trustedKeys = [ "{}" ];
                 }}; }}"#,
            e.key
        )
    };
    let on = with(true);
    let flags = e
        .eval(&on, "config.services.prometheus.exporters.node.extraFlags")
        .unwrap();
    assert_eq!(
        strings(&flags),
        ["--collector.textfile.directory=/var/lib/roost-metrics"]
    );
    let rules = e.eval(&on, "config.systemd.tmpfiles.rules").unwrap();
    assert_eq!(
        strings(&rules),
        ["d /var/lib/roost-metrics 0755 root root -"]
    );
    let file = e
        .build(&on, "config.services.roost.agent.configFile")
        .unwrap_or_else(|err| panic!("{err}"));
    let json: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(json["metrics_file"], "/var/lib/roost-metrics/roost.prom");
    let off = with(false);
    let flags = e
        .eval(&off, "config.services.prometheus.exporters.node.extraFlags")
        .unwrap();
    assert_eq!(flags, serde_json::json!([]));
    let file = e
        .build(&off, "config.services.roost.agent.configFile")
        .unwrap_or_else(|err| panic!("{err}"));
    let json: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    assert!(json.get("metrics_file").is_none(), "{json:#}");
}
