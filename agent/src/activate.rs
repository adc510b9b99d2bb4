//! Running activation scripts and health-check commands: as the profile's user, in a process
//! group of their own, under a hard timeout that kills the whole group. When PID 1 is
//! systemd, activation runs in a transient unit so a restart of the agent (which a switch
//! may cause) cannot kill it halfway.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use roost_common::StorePath;
use roost_common::wire::v1::{Activation, Profile};
use tokio::io::AsyncReadExt;

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0.
    Ok,
    /// Non-zero exit (or a signal), with the end of its output.
    Failed {
        /// Exit code, if it exited.
        code: Option<i32>,
        /// The last lines of stdout and stderr.
        output: String,
    },
    /// Killed after the timeout.
    TimedOut,
    /// Could not be started.
    SpawnFailed(String),
}

impl Outcome {
    /// A sentence for reports.
    pub fn describe(&self, what: &str) -> String {
        match self {
            Outcome::Ok => format!("{what} succeeded"),
            Outcome::Failed {
                code: Some(4),
                output,
            } => format!("{what} exited with status 4 (some units failed to start): {output}"),
            Outcome::Failed {
                code: Some(c),
                output,
            } => format!("{what} exited with status {c}: {output}"),
            Outcome::Failed { code: None, output } => {
                format!("{what} was killed by a signal: {output}")
            }
            Outcome::TimedOut => format!("{what} timed out and its process group was killed"),
            Outcome::SpawnFailed(e) => format!("{what} could not be started: {e}"),
        }
    }
}

/// The command line that activates `path` for `profile`, if any.
pub fn activation_argv(activation: &Activation, path: &Path) -> Option<Vec<String>> {
    match activation {
        Activation::Nixos { goal } => Some(vec![
            path.join("bin/switch-to-configuration")
                .display()
                .to_string(),
            goal.as_str().to_owned(),
        ]),
        Activation::DeployRs => Some(vec![path.join("deploy-rs-activate").display().to_string()]),
        Activation::Command { argv } => {
            let mut v = vec![path.join(&argv[0]).display().to_string()];
            v.extend(argv[1..].iter().cloned());
            Some(v)
        }
        Activation::None => None,
    }
}

/// Whether PID 1 is systemd (then activations run in transient units).
pub fn systemd_is_pid1() -> bool {
    Path::new("/run/systemd/system").is_dir()
        && std::fs::read_to_string("/proc/1/comm").is_ok_and(|c| c.trim() == "systemd")
}

/// Activates `path` as `profile` (its link at `profile_path`).
pub async fn activate(
    profile: &Profile,
    path: &StorePath,
    profile_path: &Path,
    unit_tag: &str,
) -> Outcome {
    let Some(argv) = activation_argv(&profile.activation, path.as_path()) else {
        return Outcome::Ok;
    };
    let timeout = Duration::from_secs(profile.activation_timeout_s.max(1));
    let env = vec![("PROFILE".to_owned(), profile_path.display().to_string())];
    if systemd_is_pid1() {
        let unit = format!("roost-activate-{}-{unit_tag}", profile.name);
        let mut sd = vec![
            "systemd-run".to_owned(),
            format!("--unit={unit}"),
            "--wait".into(),
            "--collect".into(),
            "--pipe".into(),
            "--quiet".into(),
            "--service-type=exec".into(),
            format!("--property=RuntimeMaxSec={}", timeout.as_secs()),
            format!("--uid={}", profile.user),
        ];
        for (k, v) in &env {
            sd.push(format!("--setenv={k}={v}"));
        }
        sd.push("--".into());
        sd.extend(argv);
        // The unit enforces the limit; our own timeout is a backstop a little later.
        let out = run(&sd, &[], None, timeout + Duration::from_secs(10)).await;
        if out == Outcome::TimedOut {
            let _ = tokio::process::Command::new("systemctl")
                .args(["stop", &unit])
                .status()
                .await;
        }
        return out;
    }
    run(&argv, &env, Some(&profile.user), timeout).await
}

/// Runs `argv` (as `user` when given) with a hard timeout on its whole process group.
pub async fn run(
    argv: &[String],
    env: &[(String, String)],
    user: Option<&str>,
    timeout: Duration,
) -> Outcome {
    let Some((program, args)) = argv.split_first() else {
        return Outcome::SpawnFailed("empty command".into());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(user) = user.filter(|u| *u != "root" || !running_as_root()) {
        match ::nix::unistd::User::from_name(user) {
            Ok(Some(u)) => {
                cmd.uid(u.uid.as_raw())
                    .gid(u.gid.as_raw())
                    .env("HOME", &u.dir)
                    .env("USER", user);
            }
            Ok(None) => {
                return Outcome::SpawnFailed(format!("user `{user}` does not exist on this node"));
            }
            Err(e) => return Outcome::SpawnFailed(format!("looking up user `{user}`: {e}")),
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::SpawnFailed(format!("{program}: {e}")),
    };
    let pgid = child.id();
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let collect = async move {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let _ = tokio::join!(stdout.read_to_end(&mut a), stderr.read_to_end(&mut b));
        a.extend_from_slice(&b);
        a
    };
    let waited = tokio::time::timeout(timeout, async {
        let (status, output) = tokio::join!(child.wait(), collect);
        (status, output)
    })
    .await;
    match waited {
        Ok((Ok(status), output)) if status.success() => {
            let _ = output;
            kill_group(pgid);
            Outcome::Ok
        }
        Ok((Ok(status), output)) => {
            kill_group(pgid);
            Outcome::Failed {
                code: status.code(),
                output: tail(&output),
            }
        }
        Ok((Err(e), _)) => Outcome::SpawnFailed(e.to_string()),
        Err(_) => {
            kill_group(pgid);
            Outcome::TimedOut
        }
    }
}

fn running_as_root() -> bool {
    ::nix::unistd::geteuid().is_root()
}

/// Kills the whole process group (leftover children included).
fn kill_group(pgid: Option<u32>) {
    if let Some(pid) = pgid {
        let _ = ::nix::sys::signal::killpg(
            ::nix::unistd::Pid::from_raw(pid as i32),
            ::nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn tail(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// The default profile link for a profile (deploy-rs's rules, DESIGN §3).
pub fn default_profile_path(profile: &Profile) -> PathBuf {
    if let Some(p) = &profile.profile_path {
        return p.as_path().to_owned();
    }
    let name = profile.name.as_str();
    if profile.user == "root" {
        if name == "system" {
            return PathBuf::from("/nix/var/nix/profiles/system");
        }
        return PathBuf::from("/nix/var/nix/profiles/per-user/root").join(name);
    }
    let per_user = PathBuf::from("/nix/var/nix/profiles/per-user").join(&profile.user);
    if per_user.is_dir() {
        return per_user.join(name);
    }
    let home = ::nix::unistd::User::from_name(&profile.user)
        .ok()
        .flatten()
        .map(|u| u.dir)
        .unwrap_or_else(|| PathBuf::from("/home").join(&profile.user));
    home.join(".local/state/nix/profiles").join(name)
}
