//! The one process runner of both programs: a command in a process group of its own, its
//! output captured, waited for under a hard timeout, and its whole group killed when the
//! leader ends or the timeout passes — so neither a hang nor a helper left in the background
//! outlives the call. The Nix door and the agent's activations and health checks run on it.
//!
//! Blocking: async callers run [`Spawned::wait`] in `spawn_blocking` (which also keeps a
//! paused tokio clock from jumping ahead while a process runs).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Turns each stderr line into the lines kept and forwarded (none, one or several): Nix's
/// structured log is decoded this way.
pub struct LineMap(pub Box<dyn FnMut(String) -> Vec<String> + Send>);

impl std::fmt::Debug for LineMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LineMap(..)")
    }
}

/// How a run is captured and bounded.
#[derive(Debug)]
pub struct Options {
    /// Kill the group after this long (none: wait for ever).
    pub timeout: Option<Duration>,
    /// How many of the last stderr lines to keep.
    pub stderr_lines: usize,
    /// Copy stderr lines to ours as they come (indented), for long work on a terminal.
    pub forward_stderr: bool,
    /// What each stderr line becomes before it is kept or forwarded (none: itself).
    pub stderr_map: Option<LineMap>,
    /// After the leader ended, how long to wait for the pipes to close: a process that left
    /// the group may hold them for ever.
    pub output_grace: Duration,
    /// Give it a pipe as stdin ([`Spawned::take_stdin`]) instead of `/dev/null`.
    pub stdin_pipe: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            timeout: None,
            stderr_lines: 25,
            forward_stderr: false,
            stderr_map: None,
            output_grace: Duration::from_secs(2),
            stdin_pipe: false,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The leader's exit status; none when it was killed for running past the timeout.
    pub status: Option<ExitStatus>,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// The last lines it wrote to stderr.
    pub stderr_tail: String,
}

impl Finished {
    /// Whether it ran past its timeout.
    pub fn timed_out(&self) -> bool {
        self.status.is_none()
    }
}

/// A started command: its group id now (for a record a crash can be recovered from), its
/// end with [`Spawned::wait`].
#[derive(Debug)]
pub struct Spawned {
    pid: u32,
    stdin: Option<std::process::ChildStdin>,
    exited: mpsc::Receiver<std::io::Result<ExitStatus>>,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<VecDeque<String>>>,
    readers: mpsc::Receiver<()>,
    opts: Options,
}

/// Starts `cmd` (stdin null or a pipe, stdout and stderr captured) as the leader of a new
/// process group.
pub fn spawn(mut cmd: Command, mut opts: Options) -> std::io::Result<Spawned> {
    use std::os::unix::process::CommandExt;
    let stdin = if opts.stdin_pipe {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    cmd.stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child: Child = cmd.spawn()?;
    let pid = child.id();
    let stdin = child.stdin.take();
    let mut out = child.stdout.take().expect("stdout is piped");
    let err = child.stderr.take().expect("stderr is piped");
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(VecDeque::new()));
    let (done, readers) = mpsc::channel();
    {
        let (stdout, done) = (stdout.clone(), done.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            while let Ok(n @ 1..) = out.read(&mut buf) {
                if let Ok(mut o) = stdout.lock() {
                    o.extend_from_slice(&buf[..n]);
                }
            }
            let _ = done.send(());
        });
    }
    {
        let (stderr, lines, forward) = (stderr.clone(), opts.stderr_lines, opts.forward_stderr);
        let mut map = opts.stderr_map.take();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(err);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
                let raw = String::from_utf8_lossy(&line).trim_end().to_owned();
                line.clear();
                let texts = match map.as_mut() {
                    Some(LineMap(f)) => f(raw),
                    None => vec![raw],
                };
                for text in texts {
                    if forward {
                        let _ = writeln!(std::io::stderr(), "  {text}");
                    }
                    if let Ok(mut t) = stderr.lock() {
                        if t.len() == lines {
                            t.pop_front();
                        }
                        if lines > 0 {
                            t.push_back(text);
                        }
                    }
                }
            }
            let _ = done.send(());
        });
    }
    let (tx, exited) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    Ok(Spawned {
        pid,
        stdin,
        exited,
        stdout,
        stderr,
        readers,
        opts,
    })
}

impl Spawned {
    /// The leader's pid, which is also the group's id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its stdin, when [`Options::stdin_pipe`] asked for one (once).
    pub fn take_stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.stdin.take()
    }

    /// Waits for the leader under the timeout, then kills the whole group and collects the
    /// output (waiting at most `output_grace` for the pipes to close).
    pub fn wait(self) -> std::io::Result<Finished> {
        let status = match self.opts.timeout {
            None => Some(self.exited.recv().map_err(gone)??),
            Some(t) => match self.exited.recv_timeout(t) {
                Ok(s) => Some(s?),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(gone(mpsc::RecvError)),
            },
        };
        kill_group(self.pid as i32);
        if status.is_none() {
            // Reap the killed leader.
            let _ = self.exited.recv();
        }
        let end = Instant::now() + self.opts.output_grace;
        for _ in 0..2 {
            let left = end.saturating_duration_since(Instant::now());
            if self.readers.recv_timeout(left).is_err() {
                break;
            }
        }
        let stdout = self.stdout.lock().map(|o| o.clone()).unwrap_or_default();
        let stderr_tail = self
            .stderr
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default();
        Ok(Finished {
            status,
            stdout,
            stderr_tail,
        })
    }
}

fn gone(_: mpsc::RecvError) -> std::io::Error {
    std::io::Error::other("the thread waiting for the process ended")
}

/// Runs `cmd` to its end: [`spawn`] then [`Spawned::wait`].
pub fn run(cmd: Command, opts: Options) -> std::io::Result<Finished> {
    spawn(cmd, opts)?.wait()
}

/// SIGKILL to every process of group `pgid` (nothing for 0, 1 or below).
pub fn kill_group(pgid: i32) {
    if pgid > 1 {
        let _ = ::nix::sys::signal::killpg(
            ::nix::unistd::Pid::from_raw(pgid),
            ::nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Field 22 of `/proc/PID/stat`: when the process started, in clock ticks since boot. With
/// the pid it names one process for good (a pid is reused, the pair is not).
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; count from its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether process `pid` is still running (a zombie has finished).
pub fn running(pid: i32) -> bool {
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

/// The kernel's id of this boot (a reboot ends every process group).
pub fn boot_id() -> String {
    // Debug builds only: tests simulate a reboot by changing this file (docs/protocol.md §7.16).
    #[cfg(debug_assertions)]
    if let Some(f) = std::env::var_os("ROOST_TEST_BOOT_ID_FILE") {
        if let Ok(s) = std::fs::read_to_string(f) {
            return s.trim().to_owned();
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn stdout_is_whole_and_stderr_keeps_its_last_lines() {
        let opts = Options {
            stderr_lines: 2,
            ..Options::default()
        };
        let f = run(
            sh("echo out; for i in 1 2 3; do echo err$i >&2; done; exit 3"),
            opts,
        )
        .unwrap();
        assert_eq!(f.status.unwrap().code(), Some(3));
        assert_eq!(f.stdout, b"out\n");
        assert_eq!(f.stderr_tail, "err2\nerr3");
    }

    #[test]
    fn a_timeout_kills_the_whole_group_and_a_finished_leader_leaves_no_helper() {
        let dir = tempfile::tempdir().unwrap();
        let pid_of = |name: &str| -> i32 {
            std::fs::read_to_string(dir.path().join(name))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let hang = format!("sleep 1000 & echo $! > {}/a; wait", dir.path().display());
        let opts = Options {
            timeout: Some(Duration::from_millis(300)),
            ..Options::default()
        };
        let f = run(sh(&hang), opts).unwrap();
        assert!(f.timed_out());
        let ends = format!("sleep 1000 & echo $! > {}/b; exit 0", dir.path().display());
        let f = run(sh(&ends), Options::default()).unwrap();
        assert!(f.status.unwrap().success());
        for child in [pid_of("a"), pid_of("b")] {
            let gone = (0..100).any(|_| {
                std::thread::sleep(Duration::from_millis(10));
                !running(child)
            });
            assert!(gone, "helper {child} outlived its group's run");
        }
    }

    #[test]
    fn a_process_that_left_the_group_does_not_hold_the_run_past_the_grace() {
        let opts = Options {
            output_grace: Duration::from_millis(200),
            ..Options::default()
        };
        // setsid: a new session, out of reach of the group kill, holding stdout for ever
        // (without the grace this run would not end).
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!(
            "echo before; setsid sh -c 'echo $$ > {}; exec sleep 1000' & \
             while [ ! -s {} ]; do sleep 0.01; done; exit 0",
            pidfile.display(),
            pidfile.display()
        );
        let f = run(sh(&script), opts).unwrap();
        let escaped: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        kill_group(escaped);
        assert!(f.status.unwrap().success());
        assert_eq!(f.stdout, b"before\n");
    }
}
