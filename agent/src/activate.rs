//! Running activation scripts and health-check commands: as the profile's user, in a process
//! group of their own, under a hard timeout that kills the whole group. When PID 1 is
//! systemd, activation runs in a transient unit (`systemd-run`) so a restart of the agent,
//! which a switch may cause, cannot kill it halfway: the unit is not tied to the agent's
//! process (no `--wait`, no `--pipe`), keeps its result after it ends (`RemainAfterExit`), and
//! the agent learns how it ended by asking systemd — also a restarted agent, for the unit its
//! previous run started.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use roost_common::StorePath;
use roost_common::process;
use roost_common::wire::v1::{Activation, Profile};

use crate::state::ActivationHandle;

/// After the main process ends or is killed, how long to wait for the pipes to close.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);
/// Lines of output kept for reports.
const TAIL_LINES: usize = 8;
/// How long `systemctl stop` of a leftover unit may take.
const STOP_UNIT_TIMEOUT: Duration = Duration::from_secs(90);

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
    /// Its transient unit was stopped before it ended (a shutdown, or `systemctl stop`): no
    /// verdict either way.
    Interrupted,
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
            Outcome::Interrupted => format!("{what} was stopped before it ended"),
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
    how: How,
    handle: ActivationHandle,
}

/// What runs: a child process of the agent, or a transient unit of systemd's.
#[derive(Debug)]
enum How {
    Process {
        spawned: process::Spawned,
        /// The start gate: the command runs only once "go" arrives here (see [`GATE`]).
        gate: Option<std::process::ChildStdin>,
    },
    /// Started when the gate opens, like a process: its name is recorded first.
    Unit {
        name: String,
        systemd_run: Vec<String>,
        /// A backstop a little after the unit's own limit.
        timeout: Duration,
    },
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
        let unit = unit_name(profile.name.as_str(), tag);
        let sd = in_directory(
            systemd_run_argv(&unit, &argv, &env, &profile.user, timeout),
            &cwd,
        );
        return Ok(Some(Running {
            handle: ActivationHandle {
                pgid: 0,
                start_ticks: None,
                boot_id: process::boot_id(),
                unit: Some(unit.clone()),
            },
            how: How::Unit {
                name: unit,
                systemd_run: sd,
                // The unit enforces the limit; ours is a backstop a little later.
                timeout: timeout + Duration::from_secs(10),
            },
        }));
    }
    spawn(&argv, &env, Some(&profile.user), Some(&cwd), timeout).map(Some)
}

/// What deploy-rs's `activate-rs` gives an activation: `PROFILE` (the link), and
/// `DRY_ACTIVATE=0`, `BOOT=0` (its `lib.activate.custom` scripts branch on them). The
/// agent's own `NIXOS_NO_CHECK` is passed on, also into a transient unit (whose environment
/// is systemd's), so `switch-to-configuration` skips its checks exactly when roost did
/// (§7.16).
pub fn activation_env(profile_path: &Path) -> Vec<(String, String)> {
    let mut env = vec![
        ("PROFILE".to_owned(), profile_path.display().to_string()),
        ("DRY_ACTIVATE".to_owned(), "0".to_owned()),
        ("BOOT".to_owned(), "0".to_owned()),
    ];
    if let Ok(v) = std::env::var(crate::reboot::NO_CHECK_ENV) {
        env.push((crate::reboot::NO_CHECK_ENV.to_owned(), v));
    }
    env
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

/// The transient unit that activates profile `profile` for `tag` (a version, `rollback`, …).
pub fn unit_name(profile: &str, tag: &str) -> String {
    format!("roost-activate-{profile}-{tag}").replace(['+', '.'], "-")
}

/// Starts the transient unit: `systemd-run` returns once its process runs. A failed unit
/// of the same name (an earlier try) is cleared first; one transient failure (systemd busy,
/// say) is retried once.
async fn start_unit(sd: &[String], unit: &str) -> Result<(), Outcome> {
    let mut last = String::new();
    for attempt in 0..2 {
        if attempt > 0 {
            tracing::warn!(unit, "systemd-run failed, retrying once: {last}");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let _ = tokio::process::Command::new("systemctl")
            .args(["reset-failed", unit])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        match tokio::process::Command::new(&sd[0])
            .args(&sd[1..])
            .stdin(Stdio::null())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .output()
            .await
        {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => {
                last = format!(
                    "{} ({})",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    out.status
                );
            }
            Err(e) => return Err(Outcome::SpawnFailed(format!("systemd-run: {e}"))),
        }
    }
    Err(Outcome::SpawnFailed(format!("systemd-run: {last}")))
}

/// The `systemd-run` command line that starts `argv` in the transient unit `unit` and
/// returns: as `user`, killed by systemd after `timeout` (`RuntimeMaxSec`), its output in
/// the journal, its result kept after it ends (`RemainAfterExit`) until the agent has read it.
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
        "--quiet".into(),
        "--service-type=exec".into(),
        "--property=RemainAfterExit=yes".into(),
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

/// Every command starts behind this gate: a shell that waits for the line `go` on its stdin
/// and only then becomes the command (stdin `/dev/null`, same pid and process group). The
/// agent records the process group durably first and opens the gate after, so an agent
/// killed in between leaves nothing running that recovery could not find: the gate reads
/// end-of-file and exits without running anything.
const GATE: &str = r#"read -r go && [ "$go" = go ] || exit 125; exec "$@" </dev/null"#;

/// Where `program` is, as `execvp` would find it: a name with a slash relative to `cwd` (or
/// the agent's directory), any other through `PATH`; `None` unless it is an executable file.
fn executable(program: &str, cwd: Option<&Path>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let is_exe = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = cwd.map_or_else(|| PathBuf::from(program), |d| d.join(program));
        return is_exe(&p).then(|| PathBuf::from(program));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| is_exe(p))
}

/// [`start`], in `cwd` when given (else the agent's own working directory).
fn spawn(
    argv: &[String],
    env: &[(String, String)],
    user: Option<&str>,
    cwd: Option<&Path>,
    timeout: Duration,
) -> Result<Running, Outcome> {
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = argv.split_first() else {
        return Err(Outcome::SpawnFailed("empty command".into()));
    };
    // The gate's shell would report a missing program as its own exit 127; find it first so
    // it stays what it is, a command that could not be started.
    let program = executable(program, cwd)
        .ok_or_else(|| Outcome::SpawnFailed(format!("{program}: no such executable")))?;
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.args(["-c", GATE, "roost-gate"])
        .arg(&program)
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID");
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
    let opts = process::Options {
        timeout: Some(timeout),
        stderr_lines: TAIL_LINES,
        forward_stderr: false,
        stderr_map: None,
        output_grace: OUTPUT_GRACE,
        stdin_pipe: true,
    };
    let mut spawned = process::spawn(cmd, opts)
        .map_err(|e| Outcome::SpawnFailed(format!("{}: {e}", program.display())))?;
    let gate = spawned.take_stdin();
    let pid = spawned.pid() as i32;
    Ok(Running {
        how: How::Process { spawned, gate },
        handle: ActivationHandle {
            pgid: pid,
            start_ticks: process::start_ticks(pid),
            boot_id: process::boot_id(),
            unit: None,
        },
    })
}

impl Running {
    /// What identifies it, for the pending record.
    pub fn handle(&self) -> &ActivationHandle {
        &self.handle
    }

    /// Waits for the main process under the timeout, then kills the whole process group, so
    /// neither a hang nor a child left running in the background outlives activation.
    /// Opens the start gate first: call it only once the [`handle`](Self::handle) is
    /// recorded where recovery will look. A transient unit is started then (`systemd-run`)
    /// and waited for through systemd (see [`wait_unit`]).
    pub async fn wait(self) -> Outcome {
        let (spawned, gate) = match self.how {
            How::Unit {
                name,
                systemd_run,
                timeout,
            } => {
                if let Err(o) = start_unit(&systemd_run, &name).await {
                    return o;
                }
                return wait_unit(&name, timeout).await;
            }
            How::Process { spawned, gate } => (spawned, gate),
        };
        if let Some(mut gate) = gate {
            use std::io::Write;
            // A failed write means the gate is gone already; the wait below says how. Three
            // bytes into an empty pipe never block.
            let _ = gate.write_all(b"go\n");
        }
        let done = match tokio::task::spawn_blocking(move || spawned.wait()).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => return Outcome::SpawnFailed(e.to_string()),
            Err(e) => return Outcome::SpawnFailed(format!("waiting for it failed: {e}")),
        };
        match done.status {
            None => Outcome::TimedOut,
            Some(s) if s.success() => Outcome::Ok,
            Some(s) => {
                let mut output = String::from_utf8_lossy(&done.stdout).into_owned();
                output.push('\n');
                output.push_str(&done.stderr_tail);
                Outcome::Failed {
                    code: s.code(),
                    output: tail(output.as_bytes()),
                }
            }
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
    if h.pgid <= 1 || h.boot_id != process::boot_id() {
        return;
    }
    match process::start_ticks(h.pgid) {
        Some(t) if Some(t) != h.start_ticks => {}
        _ => {
            tracing::warn!(
                pgid = h.pgid,
                "killing an activation left by a previous run"
            );
            process::kill_group(h.pgid);
        }
    }
}

/// How often a running transient unit is asked about.
const UNIT_POLL: Duration = Duration::from_secs(1);

/// Waits for the transient unit `unit` (started by this run of the agent or by an earlier
/// one) to end, at most `timeout`, and reads its outcome from systemd: its result, exit
/// status and the end of its output (from the journal). A unit that was stopped before it
/// ended — a shutdown — is [`Outcome::Interrupted`]; one that systemd no longer knows
/// (another boot) too. The unit is cleared once read.
pub async fn wait_unit(unit: &str, timeout: Duration) -> Outcome {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let state = unit_state(unit).await;
        match state.get("ActiveState").map(String::as_str) {
            // Ended and kept by RemainAfterExit, or failed: read, then clear it.
            Some("active") if state.get("SubState").map(String::as_str) == Some("exited") => {
                stop_unit(unit).await;
                return Outcome::Ok;
            }
            Some("failed") => {
                let output = unit_output(state.get("InvocationID")).await;
                let _ = tokio::process::Command::new("systemctl")
                    .args(["reset-failed", unit])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .await;
                return match state.get("Result").map(String::as_str) {
                    Some("timeout") => Outcome::TimedOut,
                    Some("exit-code") => Outcome::Failed {
                        code: state.get("ExecMainStatus").and_then(|c| c.parse().ok()),
                        output,
                    },
                    _ => Outcome::Failed { code: None, output },
                };
            }
            Some("active" | "activating" | "reloading" | "deactivating") => {}
            // Stopped, or gone (unloaded once stopped, or never known in this boot).
            Some("inactive") => return Outcome::Interrupted,
            // systemctl did not answer: ask again until the deadline.
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            stop_unit(unit).await;
            return Outcome::TimedOut;
        }
        tokio::time::sleep(UNIT_POLL).await;
    }
}

/// `systemctl show UNIT` of the properties [`wait_unit`] reads (empty when it cannot run).
async fn unit_state(unit: &str) -> std::collections::HashMap<String, String> {
    let out = tokio::process::Command::new("systemctl")
        .args([
            "show",
            unit,
            "--property=LoadState,ActiveState,SubState,Result,ExecMainStatus,InvocationID",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await;
    let Ok(out) = out else {
        return Default::default();
    };
    parse_properties(&String::from_utf8_lossy(&out.stdout))
}

/// `KEY=VALUE` lines, as `systemctl show` prints them.
fn parse_properties(text: &str) -> std::collections::HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// The end of a unit invocation's output, from the journal.
async fn unit_output(invocation: Option<&String>) -> String {
    let Some(id) = invocation.filter(|i| !i.is_empty()) else {
        return String::new();
    };
    let out = tokio::process::Command::new("journalctl")
        .arg(format!("_SYSTEMD_INVOCATION_ID={id}"))
        .args(["--output=cat", "--no-pager", "--lines=50"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await;
    out.map(|o| tail(&o.stdout)).unwrap_or_default()
}

/// Whether the machine is shutting down (an activation stopped then is no verdict, and
/// recovery waits for the next boot).
pub async fn system_stopping() -> bool {
    tokio::process::Command::new("systemctl")
        .arg("is-system-running")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "stopping")
}

async fn stop_unit(unit: &str) {
    let mut cmd = std::process::Command::new("systemctl");
    cmd.args(["stop", unit]);
    let opts = process::Options {
        timeout: Some(STOP_UNIT_TIMEOUT),
        ..process::Options::default()
    };
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || process::run(cmd, opts)).await {
        tracing::warn!("systemctl stop {unit}: {e}");
    }
}

fn running_as_root() -> bool {
    ::nix::unistd::geteuid().is_root()
}

fn tail(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

/// A non-root user's uid, primary gid and home: deploy-rs's `activate-rs` runs `nix-env`
/// as that user, so what it makes belongs to the user.
fn profile_owner(user: &str) -> Option<(u32, u32, PathBuf)> {
    if user == "root" || !running_as_root() {
        return None;
    }
    let u = ::nix::unistd::User::from_name(user).ok().flatten()?;
    Some((u.uid.as_raw(), u.gid.as_raw(), u.dir))
}

/// Creates the folders missing above profile link `link`. Those in the user's own places —
/// `/nix/var/nix/profiles/per-user/USER` and below, or below the user's home (e.g.
/// `~/.local/state/nix/profiles`) — belong to a non-root `user`, so its own `nix-env` can
/// use the profile too; shared folders such as `per-user` itself stay root's.
pub fn make_profile_dir(link: &Path, user: &str) -> std::io::Result<()> {
    let Some(parent) = link.parent() else {
        return Ok(());
    };
    let missing: Vec<PathBuf> = parent
        .ancestors()
        .take_while(|d| !d.exists())
        .map(Path::to_path_buf)
        .collect();
    std::fs::create_dir_all(parent)?;
    if let Some((uid, gid, home)) = profile_owner(user) {
        for d in missing.iter().filter(|d| users_own(d, user, &home)) {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// Whether folder `dir` is one of `user`'s own (its per-user profile folder, or in its home).
fn users_own(dir: &Path, user: &str, home: &Path) -> bool {
    dir.starts_with(Path::new(PER_USER).join(user)) || dir.starts_with(home)
}

/// Gives a non-root user's profile link and its generation link `generation` (both made by
/// the agent's `nix-env`, running as root) to the user.
pub fn give_profile_to_user(link: &Path, generation: &Path, user: &str) -> std::io::Result<()> {
    if let Some((uid, gid, _)) = profile_owner(user) {
        for l in [link, generation] {
            std::os::unix::fs::lchown(l, Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

/// Where other users' profiles live, when their folder there exists (deploy-rs's rule).
const PER_USER: &str = "/nix/var/nix/profiles/per-user";

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
    let per_user = PathBuf::from(PER_USER).join(&profile.user);
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

    use roost_common::process::running as alive;

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
        let pid = h.pgid;
        std::mem::forget(r);
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
        let r = start(&sh("sleep 1000"), &[], None, Duration::from_secs(100)).unwrap();
        let mut h = r.handle().clone();
        h.start_ticks = h.start_ticks.map(|t| t + 1);
        stop_leftover(&h).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            alive(h.pgid),
            "a different process with the same pid was killed"
        );
        process::kill_group(h.pgid);
        drop(r);
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
    fn systemctl_show_output_reads_as_properties() {
        let p = parse_properties(
            "LoadState=loaded\nActiveState=failed\nResult=exit-code\nExecMainStatus=3\nInvocationID=ab=c\n",
        );
        assert_eq!(p["ActiveState"], "failed");
        assert_eq!(p["ExecMainStatus"], "3");
        assert_eq!(p["InvocationID"], "ab=c", "only the first = splits");
    }

    #[test]
    fn a_transient_unit_outlives_the_agent_keeps_its_result_and_enforces_the_timeout() {
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
            "--property=RemainAfterExit=yes",
            "--property=RuntimeMaxSec=240",
            "--uid=root",
            "--setenv=PROFILE=/nix/var/nix/profiles/system",
        ] {
            assert!(argv.iter().any(|a| a == want), "{want} missing: {argv:?}");
        }
        // Tied to the agent's process, the unit would die with it (a restart, a switch).
        for tied in ["--wait", "--pipe", "--collect", "--scope"] {
            assert!(!argv.iter().any(|a| a == tied), "{tied} in {argv:?}");
        }
        let sep = argv.iter().position(|a| a == "--").unwrap();
        assert_eq!(
            &argv[sep + 1..],
            ["/nix/store/x/bin/switch-to-configuration", "switch"]
        );
    }

    /// The user `nobody`, for tests that switch to another user.
    fn nobody() -> Result<::nix::unistd::User, &'static str> {
        ::nix::unistd::User::from_name("nobody")
            .ok()
            .flatten()
            .ok_or("there is no user `nobody` to switch to")
    }

    #[tokio::test]
    async fn a_command_runs_as_the_named_user() {
        roost_preflight::require!(roost_preflight::root("switching users"));
        let nobody = roost_preflight::require!(nobody());
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
    fn a_users_own_folders_are_its_per_user_folder_and_its_home() {
        let home = Path::new("/home/alice");
        for (dir, own) in [
            ("/nix/var/nix/profiles/per-user/alice", true),
            ("/nix/var/nix/profiles/per-user/alice/sub", true),
            ("/nix/var/nix/profiles/per-user", false),
            ("/nix/var/nix/profiles/per-user/alicia", false),
            ("/home/alice/.local/state/nix/profiles", true),
            ("/home", false),
            ("/srv/profiles", false),
        ] {
            assert_eq!(users_own(Path::new(dir), "alice", home), own, "{dir}");
        }
    }

    #[test]
    fn a_user_profile_link_and_its_generation_belong_to_the_user() {
        use std::os::unix::fs::MetadataExt;
        roost_preflight::require!(roost_preflight::root("changing owners"));
        let nobody = roost_preflight::require!(nobody());
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("profiles/tools");
        make_profile_dir(&link, "nobody").unwrap();
        let generation = dir.path().join("profiles/tools-1-link");
        std::os::unix::fs::symlink("/nix/store/x", &generation).unwrap();
        std::os::unix::fs::symlink("tools-1-link", &link).unwrap();
        give_profile_to_user(&link, &generation, "nobody").unwrap();
        for l in [&link, &generation] {
            let uid = std::fs::symlink_metadata(l).unwrap().uid();
            assert_eq!(uid, nobody.uid.as_raw(), "{l:?}");
        }
        let shared = std::fs::metadata(dir.path().join("profiles")).unwrap();
        assert_eq!(
            shared.uid(),
            0,
            "a folder outside the user's places stays root's"
        );
        // Root's profiles stay root's.
        let root_link = dir.path().join("profiles/system");
        std::os::unix::fs::symlink("tools-1-link", &root_link).unwrap();
        give_profile_to_user(&root_link, &generation, "root").unwrap();
        assert_eq!(std::fs::symlink_metadata(&root_link).unwrap().uid(), 0);
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
