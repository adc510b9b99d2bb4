//! Running activation scripts and health-check commands: as the profile's user, in a process
//! group of their own, under a hard timeout that kills the whole group. When PID 1 is
//! systemd, activation runs in a transient unit (`systemd-run`) so a restart of the agent,
//! which a switch may cause, cannot kill it halfway.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use roost_common::StorePath;
use roost_common::wire::v1::{Activation, Profile};
use tokio::io::AsyncReadExt;
use tokio::task::JoinHandle;

use crate::state::ActivationHandle;

/// After the main process ends or is killed, how long to wait for the pipes to close.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);
/// Lines of output kept for reports.
const TAIL_LINES: usize = 8;

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
    /// A sentence for reports, `what` naming the command.
    pub fn describe(&self, what: &str) -> String {
        let out = |o: &str| {
            if o.is_empty() {
                String::new()
            } else {
                format!(": {o}")
            }
        };
        match self {
            Outcome::Ok => format!("{what} succeeded"),
            Outcome::Failed {
                code: Some(4),
                output,
            } => format!(
                "{what} exited with status 4 (some units failed to start){}",
                out(output)
            ),
            Outcome::Failed {
                code: Some(c),
                output,
            } => format!("{what} exited with status {c}{}", out(output)),
            Outcome::Failed { code: None, output } => {
                format!("{what} was killed by a signal{}", out(output))
            }
            Outcome::TimedOut => format!("{what} timed out and its process group was killed"),
            Outcome::SpawnFailed(e) => format!("{what} could not be started: {e}"),
        }
    }
}

/// The command line that activates `path`, if its kind has one.
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
            // verify_manifest guarantees argv[0] is relative and has no `..`.
            let (program, args) = argv.split_first()?;
            let mut v = vec![path.join(program).display().to_string()];
            v.extend(args.iter().cloned());
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

/// A started command: wait for it with [`Running::wait`].
#[derive(Debug)]
pub struct Running {
    child: tokio::process::Child,
    handle: ActivationHandle,
    output: JoinHandle<Vec<u8>>,
    timeout: Duration,
}

/// Starts activating `path` as `profile` (its link at `profile_path`); `None` for kind
/// `none`. `tag` makes the transient unit's name unique.
pub fn start_activation(
    profile: &Profile,
    path: &StorePath,
    profile_path: &Path,
    tag: &str,
) -> Result<Option<Running>, Outcome> {
    let Some(argv) = activation_argv(&profile.activation, path.as_path()) else {
        return Ok(None);
    };
    let timeout = Duration::from_secs(profile.activation_timeout_s.max(1));
    let env = activation_env(profile_path);
    let cwd = activation_dir(profile_path);
    if systemd_is_pid1() {
        let unit = format!("roost-activate-{}-{tag}", profile.name).replace(['+', '.'], "-");
        let sd = in_directory(
            systemd_run_argv(&unit, &argv, &env, &profile.user, timeout),
            &cwd,
        );
        // The unit enforces the limit; our own timeout is a backstop a little later.
        let mut r = start(&sd, &[], None, timeout + Duration::from_secs(10))?;
        r.handle.unit = Some(unit);
        return Ok(Some(r));
    }
    spawn(&argv, &env, Some(&profile.user), Some(&cwd), timeout).map(Some)
}

/// What deploy-rs's `activate-rs` gives an activation: `PROFILE` (the link), and
/// `DRY_ACTIVATE=0`, `BOOT=0` (its `lib.activate.custom` scripts branch on them).
pub fn activation_env(profile_path: &Path) -> Vec<(String, String)> {
    vec![
        ("PROFILE".to_owned(), profile_path.display().to_string()),
        ("DRY_ACTIVATE".to_owned(), "0".to_owned()),
        ("BOOT".to_owned(), "0".to_owned()),
    ]
}

/// The working directory of an activation: the profile link, as deploy-rs runs it (so
/// `activate.custom pkgs.hello "./bin/hello"` finds `./bin/hello`); `/` when the link is
/// not a directory.
pub fn activation_dir(profile_path: &Path) -> PathBuf {
    if profile_path.is_dir() {
        profile_path.to_owned()
    } else {
        PathBuf::from("/")
    }
}

/// The `systemd-run` command line that runs `argv` in the transient unit `unit`: waits for
/// it and pipes its output (so its exit status and output are ours), as `user`, killed by
/// systemd after `timeout` (`RuntimeMaxSec`), collected even when it fails.
pub fn systemd_run_argv(
    unit: &str,
    argv: &[String],
    env: &[(String, String)],
    user: &str,
    timeout: Duration,
) -> Vec<String> {
    let mut sd = vec![
        "systemd-run".to_owned(),
        format!("--unit={unit}"),
        "--wait".into(),
        "--collect".into(),
        "--pipe".into(),
        "--quiet".into(),
        "--service-type=exec".into(),
        format!("--property=RuntimeMaxSec={}", timeout.as_secs()),
        format!("--uid={user}"),
    ];
    for (k, v) in env {
        sd.push(format!("--setenv={k}={v}"));
    }
    sd.push("--".into());
    sd.extend(argv.iter().cloned());
    sd
}

/// A `systemd-run` command line with the unit's working directory set to `cwd`.
fn in_directory(mut sd: Vec<String>, cwd: &Path) -> Vec<String> {
    let sep = sd.iter().position(|a| a == "--").unwrap_or(sd.len());
    sd.insert(sep, format!("--working-directory={}", cwd.display()));
    sd
}

/// Activates and waits: [`start_activation`] then [`Running::wait`].
pub async fn activate(
    profile: &Profile,
    path: &StorePath,
    profile_path: &Path,
    tag: &str,
) -> Outcome {
    match start_activation(profile, path, profile_path, tag) {
        Ok(Some(r)) => r.wait().await,
        Ok(None) => Outcome::Ok,
        Err(o) => o,
    }
}

/// Runs `argv` to completion under a hard timeout (health-check commands).
pub async fn run(
    argv: &[String],
    env: &[(String, String)],
    user: Option<&str>,
    timeout: Duration,
) -> Outcome {
    match start(argv, env, user, timeout) {
        Ok(r) => r.wait().await,
        Err(o) => o,
    }
}

/// Starts `argv` (as `user` when given) in a new process group. The agent's environment is
/// passed on (minus systemd's notify socket), plus `env`.
pub fn start(
    argv: &[String],
    env: &[(String, String)],
    user: Option<&str>,
    timeout: Duration,
) -> Result<Running, Outcome> {
    spawn(argv, env, user, None, timeout)
}

/// [`start`], in `cwd` when given (else the agent's own working directory).
fn spawn(
    argv: &[String],
    env: &[(String, String)],
    user: Option<&str>,
    cwd: Option<&Path>,
    timeout: Duration,
) -> Result<Running, Outcome> {
    let Some((program, args)) = argv.split_first() else {
        return Err(Outcome::SpawnFailed("empty command".into()));
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    // Root running root's activation needs no switch; anything else drops to that user.
    if let Some(user) = user.filter(|u| *u != "root" || !running_as_root()) {
        match ::nix::unistd::User::from_name(user) {
            Ok(Some(u)) => {
                cmd.uid(u.uid.as_raw())
                    .gid(u.gid.as_raw())
                    .env("HOME", &u.dir)
                    .env("USER", user)
                    .env("LOGNAME", user);
            }
            Ok(None) => {
                return Err(Outcome::SpawnFailed(format!(
                    "user `{user}` does not exist on this node"
                )));
            }
            Err(e) => {
                return Err(Outcome::SpawnFailed(format!(
                    "looking up user `{user}`: {e}"
                )));
            }
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Outcome::SpawnFailed(format!("{program}: {e}")))?;
    let pid = child.id().unwrap_or(0) as i32;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let output = tokio::spawn(async move {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let _ = tokio::join!(stdout.read_to_end(&mut a), stderr.read_to_end(&mut b));
        a.extend_from_slice(&b);
        a
    });
    Ok(Running {
        child,
        handle: ActivationHandle {
            pgid: pid,
            start_ticks: start_ticks(pid),
            boot_id: boot_id(),
            unit: None,
        },
        output,
        timeout,
    })
}

impl Running {
    /// What identifies it, for the pending record.
    pub fn handle(&self) -> &ActivationHandle {
        &self.handle
    }

    /// Waits for the main process under the timeout, then kills the whole process group, so
    /// neither a hang nor a child left running in the background outlives activation.
    pub async fn wait(mut self) -> Outcome {
        let waited = tokio::time::timeout(self.timeout, self.child.wait()).await;
        kill_group(self.handle.pgid);
        let status = match waited {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => return Outcome::SpawnFailed(e.to_string()),
            Err(_) => {
                let _ = self.child.wait().await;
                None
            }
        };
        if let Some(unit) = &self.handle.unit {
            if status.is_none() {
                stop_unit(unit).await;
            }
        }
        let output = tokio::time::timeout(OUTPUT_GRACE, &mut self.output)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        match status {
            None => Outcome::TimedOut,
            Some(s) if s.success() => Outcome::Ok,
            Some(s) => Outcome::Failed {
                code: s.code(),
                output: tail(&output),
            },
        }
    }
}

/// Stops an activation a previous run of the agent left behind (recovery after a crash).
/// A process group is only signalled when its leader is gone or is still the very process
/// that was started (same start time), never a stranger that reused the pid.
pub async fn stop_leftover(h: &ActivationHandle) {
    if let Some(unit) = &h.unit {
        stop_unit(unit).await;
    }
    if h.pgid <= 1 || h.boot_id != boot_id() {
        return;
    }
    match start_ticks(h.pgid) {
        Some(t) if Some(t) != h.start_ticks => {}
        _ => {
            tracing::warn!(
                pgid = h.pgid,
                "killing an activation left by a previous run"
            );
            kill_group(h.pgid);
        }
    }
}

async fn stop_unit(unit: &str) {
    let _ = tokio::process::Command::new("systemctl")
        .args(["stop", unit])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

fn running_as_root() -> bool {
    ::nix::unistd::geteuid().is_root()
}

fn kill_group(pgid: i32) {
    if pgid > 1 {
        let _ = ::nix::sys::signal::killpg(
            ::nix::unistd::Pid::from_raw(pgid),
            ::nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot.
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; count from its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The kernel's id of this boot.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn tail(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    fn alive(pid: i32) -> bool {
        // A zombie has finished; only a process still running counts.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s[s.rfind(')')? + 1..]
                    .split_whitespace()
                    .next()
                    .map(str::to_owned)
            })
            .is_some_and(|state| state != "Z" && state != "X")
    }

    #[tokio::test]
    async fn a_zero_exit_is_ok_and_a_nonzero_exit_is_a_failure_with_output() {
        let ok = run(&sh("true"), &[], None, Duration::from_secs(10)).await;
        assert_eq!(ok, Outcome::Ok);
        let bad = run(
            &sh("echo boom >&2; exit 3"),
            &[],
            None,
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(
            bad,
            Outcome::Failed {
                code: Some(3),
                output: "boom".into()
            }
        );
    }

    #[test]
    fn exit_status_four_is_described_as_failed_units() {
        let o = Outcome::Failed {
            code: Some(4),
            output: String::new(),
        };
        assert!(o.describe("switch").contains("some units failed"));
    }

    /// Runs a shell script that starts `sleep 1000` in the background and then does `tail`;
    /// its outcome and the background child's pid.
    async fn with_background_child(tail: &str, timeout: Duration) -> (Outcome, i32) {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("child.pid");
        let script = format!("sleep 1000 & echo $! > {}; {tail}", pidfile.display());
        let out = run(&sh(&script), &[], None, timeout).await;
        let child: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        (out, child)
    }

    /// Whether `pid` is gone within a second (SIGKILL is delivered before killpg returns; the
    /// kernel may take a moment to reap).
    async fn gone(pid: i32) -> bool {
        for _ in 0..50 {
            if !alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn a_hang_past_the_timeout_kills_the_whole_process_group() {
        let (out, child) = with_background_child("wait", Duration::from_secs(1)).await;
        assert_eq!(out, Outcome::TimedOut);
        assert!(
            gone(child).await,
            "the background child {child} of a timed-out command survived"
        );
    }

    #[tokio::test]
    async fn a_background_child_does_not_outlive_a_successful_command() {
        let (out, child) = with_background_child("exit 0", Duration::from_secs(30)).await;
        assert_eq!(
            out,
            Outcome::Ok,
            "a leftover child holding the pipes is not a hang"
        );
        assert!(gone(child).await, "background child {child} survived");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_failure() {
        let out = run(
            &["/nonexistent/roost-test".into()],
            &[],
            None,
            Duration::from_secs(1),
        )
        .await;
        assert!(matches!(out, Outcome::SpawnFailed(_)), "{out:?}");
    }

    #[tokio::test]
    async fn an_unknown_user_is_refused_before_anything_runs() {
        let out = run(
            &sh("true"),
            &[],
            Some("roost-no-such-user"),
            Duration::from_secs(1),
        )
        .await;
        match out {
            Outcome::SpawnFailed(m) => assert!(m.contains("roost-no-such-user"), "{m}"),
            o => panic!("{o:?}"),
        }
    }

    #[tokio::test]
    async fn stop_leftover_kills_a_group_whose_leader_still_matches() {
        let r = start(&sh("sleep 1000"), &[], None, Duration::from_secs(100)).unwrap();
        let h = r.handle().clone();
        assert!(h.start_ticks.is_some());
        // Forget the Running (as a crashed agent would) without killing it.
        let Running { child, output, .. } = r;
        let pid = h.pgid;
        std::mem::forget(child);
        output.abort();
        assert!(alive(pid));
        stop_leftover(&h).await;
        for _ in 0..50 {
            if !alive(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("leftover activation {pid} survived");
    }

    #[tokio::test]
    async fn stop_leftover_spares_a_process_that_reused_the_pid() {
        let mut r = start(&sh("sleep 1000"), &[], None, Duration::from_secs(100)).unwrap();
        let mut h = r.handle().clone();
        h.start_ticks = h.start_ticks.map(|t| t + 1);
        stop_leftover(&h).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            alive(h.pgid),
            "a different process with the same pid was killed"
        );
        r.child.start_kill().unwrap();
        kill_group(h.pgid);
    }

    #[test]
    fn a_transient_unit_runs_in_the_profile_link() {
        let link = Path::new("/nix/var/nix/profiles/per-user/root/hello");
        let sd = in_directory(
            systemd_run_argv(
                "u",
                &["./bin/hello".into()],
                &activation_env(link),
                "root",
                Duration::from_secs(5),
            ),
            link,
        );
        let sep = sd.iter().position(|a| a == "--").unwrap();
        assert!(
            sd[..sep].contains(&format!("--working-directory={}", link.display())),
            "{sd:?}"
        );
        for want in ["--setenv=DRY_ACTIVATE=0", "--setenv=BOOT=0"] {
            assert!(sd[..sep].iter().any(|a| a == want), "{want}: {sd:?}");
        }
        assert_eq!(&sd[sep + 1..], ["./bin/hello"]);
    }

    #[tokio::test]
    async fn an_activation_runs_in_the_profile_link_with_deploy_rs_environment() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("generation");
        std::fs::create_dir_all(target.join("bin")).unwrap();
        let link = dir.path().join("profile");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let out = dir.path().join("seen");
        let script = format!(
            "test -d ./bin && echo \"$(pwd -P) $PROFILE $DRY_ACTIVATE $BOOT\" > {}",
            out.display()
        );
        let cwd = activation_dir(&link);
        let r = spawn(
            &sh(&script),
            &activation_env(&link),
            None,
            Some(&cwd),
            Duration::from_secs(10),
        )
        .unwrap()
        .wait()
        .await;
        assert_eq!(r, Outcome::Ok);
        let seen = std::fs::read_to_string(&out).unwrap();
        let (t, l) = (target.canonicalize().unwrap(), link.display());
        assert_eq!(seen.trim(), format!("{} {l} 0 0", t.display()));
        assert_eq!(activation_dir(&dir.path().join("gone")), PathBuf::from("/"));
    }

    #[test]
    fn a_transient_unit_waits_pipes_and_enforces_the_timeout_as_the_user() {
        let argv = systemd_run_argv(
            "roost-activate-system-7",
            &[
                "/nix/store/x/bin/switch-to-configuration".into(),
                "switch".into(),
            ],
            &[("PROFILE".into(), "/nix/var/nix/profiles/system".into())],
            "root",
            Duration::from_secs(240),
        );
        for want in [
            "--unit=roost-activate-system-7",
            "--wait",
            "--collect",
            "--pipe",
            "--property=RuntimeMaxSec=240",
            "--uid=root",
            "--setenv=PROFILE=/nix/var/nix/profiles/system",
        ] {
            assert!(argv.iter().any(|a| a == want), "{want} missing: {argv:?}");
        }
        let sep = argv.iter().position(|a| a == "--").unwrap();
        assert_eq!(
            &argv[sep + 1..],
            ["/nix/store/x/bin/switch-to-configuration", "switch"]
        );
    }

    #[tokio::test]
    async fn a_command_runs_as_the_named_user() {
        roost_preflight::require!(roost_preflight::root("switching users"));
        let nobody = roost_preflight::require!(
            ::nix::unistd::User::from_name("nobody")
                .ok()
                .flatten()
                .ok_or("there is no user `nobody` to switch to")
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .unwrap();
        let out = dir.path().join("uid");
        let script = format!("id -u > {}", out.display());
        let r = run(&sh(&script), &[], Some("nobody"), Duration::from_secs(10)).await;
        assert_eq!(r, Outcome::Ok);
        let uid: u32 = std::fs::read_to_string(&out)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(uid, nobody.uid.as_raw());
    }

    #[test]
    fn profile_paths_default_like_deploy_rs() {
        let p = |name: &str, user: &str| -> Profile {
            serde_json::from_value(serde_json::json!({
                "name": name, "user": user,
                "path": "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x"
            }))
            .unwrap()
        };
        assert_eq!(
            default_profile_path(&p("system", "root")),
            PathBuf::from("/nix/var/nix/profiles/system")
        );
        assert_eq!(
            default_profile_path(&p("home", "root")),
            PathBuf::from("/nix/var/nix/profiles/per-user/root/home")
        );
        let other = default_profile_path(&p("home", "roost-no-such-user"));
        assert!(
            other.ends_with(".local/state/nix/profiles/home")
                || other == Path::new("/nix/var/nix/profiles/per-user/roost-no-such-user/home"),
            "{other:?}"
        );
        let mut explicit = p("system", "root");
        explicit.profile_path = Some("/srv/profiles/x".parse().unwrap());
        assert_eq!(
            default_profile_path(&explicit),
            PathBuf::from("/srv/profiles/x")
        );
    }
}
