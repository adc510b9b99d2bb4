//! One guest: QEMU booting the image's kernel on a copy-on-write overlay of its disk, the
//! serial console in a file, a 9p share from the host (`/roost` in the guest: the agent, the
//! helper, the test's configuration) and QEMU's user network with `restrict=on`, so the guest
//! reaches exactly two things: the coordinator (a `guestfwd` on 10.0.2.100:80) and nothing
//! else; the host reaches the guest's helper through a `hostfwd`.
//!
//! KVM is tried first; when the guest makes no boot progress within [`KVM_PROGRESS`] (nested
//! KVM hangs early in the boot on some hosts) the machine falls back to TCG, and the verdict
//! is kept for the rest of the process and, per host boot, in `target/vm-image/`.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::image::Image;
use crate::{bin, free_port};

/// How long a KVM boot may print nothing on the console before TCG is used instead.
pub const KVM_PROGRESS: Duration = Duration::from_secs(20);
/// How long a boot may take until the helper answers (TCG on a loaded 2-core host is slow).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one "is the helper up?" probe may wait for its answer. Until the guest's network
/// is up, QEMU accepts the host side of the forward and the guest never answers, so a long
/// wait here is added to every boot (it was 30 s: boots took 18 s or 31 s).
const PROBE: Duration = Duration::from_secs(5);
/// The guest's address for the coordinator (QEMU's user network).
pub const COORDINATOR_IN_GUEST: &str = "http://10.0.2.100";
/// The last line of every helper answer (see `roost-vm-helper`).
const EXIT_MARK: &str = "roost-vm-exit:";

/// Which accelerator QEMU ran with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// QEMU's own CPU emulation.
    Tcg,
}

impl Accel {
    fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What this process learned about KVM (None: not tried yet).
static KVM_VERDICT: Mutex<Option<Accel>> = Mutex::new(None);

/// A guest and everything of it on the host (its folder: overlay, share, console).
#[derive(Debug)]
pub struct Machine {
    dir: PathBuf,
    qemu: Option<Child>,
    helper_port: u16,
    coordinator_port: u16,
    /// The accelerator of the current boot.
    pub accel: Accel,
    /// Boots so far (the first is 1).
    pub boots: u32,
}

impl Machine {
    /// A machine in `dir` whose guest reaches the coordinator on host port
    /// `coordinator_port`; not booted yet. The share gets the agent and the helper.
    pub fn create(dir: &Path, image: &Image, coordinator_port: u16) -> anyhow::Result<Self> {
        fs::create_dir_all(dir.join("share/bin"))?;
        image.overlay(&dir.join("disk.qcow2"))?;
        for b in ["roost-agent", "roost-vm-helper"] {
            let to = dir.join("share/bin").join(b);
            if fs::hard_link(bin(b), &to).is_err() {
                fs::copy(bin(b), &to).with_context(|| format!("copying {b} into the share"))?;
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            qemu: None,
            helper_port: free_port(),
            coordinator_port,
            accel: Accel::Tcg,
            boots: 0,
        })
    }

    /// The host folder the guest sees as `/roost` (read-only there).
    pub fn share(&self) -> PathBuf {
        self.dir.join("share")
    }

    fn console_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// The serial console of every boot so far.
    pub fn console(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.console_path()).unwrap_or_default()).into_owned()
    }

    /// The last `n` console lines, for failure messages.
    pub fn console_tail(&self, n: usize) -> String {
        crate::fleet::tail(&self.console(), n)
    }

    /// Boots the guest and waits until its helper answers. KVM first, unless this host is
    /// known to hang with it.
    pub fn boot(&mut self) -> anyhow::Result<()> {
        let image = Image::get()?;
        self.boots += 1;
        let started = Instant::now();
        let verdict = *KVM_VERDICT.lock().unwrap_or_else(|e| e.into_inner());
        let verdict = verdict.or_else(kvm_verdict_on_disk);
        let kvm_usable = Path::new("/dev/kvm").exists() && verdict != Some(Accel::Tcg);
        if kvm_usable {
            self.spawn(image, Accel::Kvm)?;
            if self.wait_console_progress(KVM_PROGRESS) {
                remember_kvm(Accel::Kvm);
            } else {
                log(&format!(
                    "KVM made no boot progress in {KVM_PROGRESS:?}: falling back to TCG"
                ));
                self.kill();
                remember_kvm(Accel::Tcg);
                self.spawn(image, Accel::Tcg)?;
            }
        } else {
            self.spawn(image, Accel::Tcg)?;
        }
        self.wait_helper(BOOT_TIMEOUT).with_context(|| {
            format!(
                "boot {} ({}) never reached the helper; console:\n{}",
                self.boots,
                self.accel.name(),
                self.console_tail(40)
            )
        })?;
        log(&format!(
            "boot {} with {} ready in {:.1?} (console: {})",
            self.boots,
            self.accel.name().to_uppercase(),
            started.elapsed(),
            self.console_path().display()
        ));
        Ok(())
    }

    fn spawn(&mut self, image: &Image, accel: Accel) -> anyhow::Result<()> {
        self.accel = accel;
        let mut console = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.console_path())?;
        writeln!(
            console,
            "\n===== roost vm: boot {} with {} =====",
            self.boots,
            accel.name()
        )?;
        let relay = format!(
            "{} relay 127.0.0.1:{}",
            self.share().join("bin/roost-vm-helper").display(),
            self.coordinator_port
        );
        let netdev = format!(
            "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:{}-:7000,guestfwd=tcp:10.0.2.100:80-cmd:{relay}",
            self.helper_port
        );
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(["-machine", &format!("pc,accel={}", accel.name())])
            .args(["-m", "1024", "-smp", "1"])
            .arg("-chardev")
            .arg(format!(
                "file,id=console,append=on,path={}",
                self.console_path().display()
            ))
            .args(["-serial", "chardev:console"])
            .arg("-kernel")
            .arg(image.kernel())
            .arg("-initrd")
            .arg(image.initrd())
            .args([
                "-append",
                "console=ttyS0 root=/dev/vda rw net.ifnames=0 loglevel=5 systemd.show_status=error",
            ])
            .arg("-drive")
            .arg(format!(
                "file={},format=qcow2,if=virtio,cache=writeback",
                self.dir.join("disk.qcow2").display()
            ))
            .arg("-fsdev")
            .arg(format!(
                "local,id=share,path={},security_model=none,readonly=on",
                self.share().display()
            ))
            .args(["-device", "virtio-9p-pci,fsdev=share,mount_tag=roost"])
            .args(["-netdev", &netdev])
            .args(["-device", "virtio-net-pci,netdev=net0"])
            .args(["-device", "virtio-rng-pci"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.dir.join("qemu.log"))?);
        self.qemu = Some(cmd.spawn().context("starting qemu-system-x86_64")?);
        Ok(())
    }

    /// Whether the console grows past its size at boot start within `timeout`.
    fn wait_console_progress(&mut self, timeout: Duration) -> bool {
        let start_len = self.console().len();
        let marker = format!("===== roost vm: boot {} ", self.boots);
        let start = Instant::now();
        while start.elapsed() < timeout {
            let console = self.console();
            if let Some(at) = console.rfind(&marker) {
                let after = &console[at..];
                if after.lines().count() > 1 && console.len() > start_len {
                    return true;
                }
            }
            if self.exited() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        false
    }

    fn wait_helper(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Ok((0, _)) = self.exec_with_timeout("true", PROBE) {
                return Ok(());
            }
            if self.exited() {
                bail!(
                    "qemu exited: {}",
                    fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default()
                );
            }
            if start.elapsed() > timeout {
                bail!("the guest's helper did not answer within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Whether QEMU has exited.
    pub fn exited(&mut self) -> bool {
        self.qemu
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Cuts the power: SIGKILL to QEMU, no shutdown of any kind in the guest.
    ///
    /// What survives is what a power cut leaves. The disk is `cache=writeback`: the guest
    /// sees a disk with a volatile write cache, so its kernel sends flushes (fsync, ext4's
    /// journal commits) and QEMU turns each into an fdatasync of the overlay; its writes
    /// reach the host's page cache, which outlives QEMU. So everything the guest flushed
    /// survives, while the guest's own page cache (every write not yet flushed) and QEMU's
    /// unflushed qcow2 metadata die with the process. (`cache=unsafe` drops flushes, so a
    /// SIGKILL could lose even fsynced data, which no honest disk does; `cache=none` needs
    /// O_DIRECT from the host's file system and loses nothing more.)
    pub fn kill(&mut self) {
        if let Some(mut c) = self.qemu.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Cuts the power ([`Machine::kill`]) and says so in the test's log.
    pub fn power_cut(&mut self, why: &str) {
        self.kill();
        log(&format!("power cut during boot {}: {why}", self.boots));
    }

    /// The guest kernel's boot id: a new one after every boot, also one the guest made itself.
    pub fn boot_id(&self) -> anyhow::Result<String> {
        Ok(self
            .sh("cat /proc/sys/kernel/random/boot_id")?
            .trim()
            .to_owned())
    }

    /// Waits until the guest runs a boot other than `old` (it rebooted itself: QEMU resets
    /// the machine in the same process) and its helper answers; counts it as a boot.
    pub fn wait_rebooted(&mut self, old: &str, timeout: Duration) -> anyhow::Result<String> {
        let started = Instant::now();
        loop {
            if let Ok((0, id)) =
                self.exec_with_timeout("cat /proc/sys/kernel/random/boot_id", PROBE)
            {
                if id.trim() != old {
                    self.boots += 1;
                    log(&format!(
                        "boot {} (the guest rebooted itself) ready in {:.1?}",
                        self.boots,
                        started.elapsed()
                    ));
                    return Ok(id.trim().to_owned());
                }
            }
            if self.exited() {
                bail!(
                    "qemu exited while the guest rebooted; console:\n{}",
                    self.console_tail(40)
                );
            }
            if started.elapsed() > timeout {
                bail!(
                    "the guest did not come back from its reboot within {timeout:?}; console:\n{}",
                    self.console_tail(40)
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Runs `script` in the guest (as root, `/bin/sh`): its exit code and output.
    pub fn exec(&self, script: &str) -> anyhow::Result<(i32, String)> {
        self.exec_with_timeout(script, Duration::from_secs(300))
    }

    fn exec_with_timeout(&self, script: &str, timeout: Duration) -> anyhow::Result<(i32, String)> {
        let mut conn = self.connect(script, timeout)?;
        let mut out = String::new();
        conn.read_to_string(&mut out)?;
        split_exit(&out).with_context(|| format!("the guest's helper answered {out:?}"))
    }

    /// Runs `script` in the guest and fails unless it exits 0; its output.
    pub fn sh(&self, script: &str) -> anyhow::Result<String> {
        let (code, out) = self.exec(script)?;
        if code != 0 {
            bail!("in the guest, `{script}` exited {code}:\n{out}");
        }
        Ok(out)
    }

    /// Starts `script` in the guest and returns once it prints a line starting with
    /// `signal` (the rest of the line), leaving it running. For acting at a moment the guest
    /// chooses, such as a power cut in the middle of a deploy phase.
    pub fn wait_for_line(
        &self,
        script: &str,
        signal: &str,
        timeout: Duration,
    ) -> anyhow::Result<String> {
        let conn = self.connect(script, timeout)?;
        let mut lines = BufReader::new(conn);
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            if lines.read_line(&mut line)? == 0 {
                bail!("the guest's script ended without `{signal}`:\n{seen}");
            }
            if let Some(rest) = line.strip_prefix(signal) {
                return Ok(rest.trim().to_owned());
            }
            seen.push_str(&line);
        }
    }

    fn connect(&self, script: &str, timeout: Duration) -> anyhow::Result<TcpStream> {
        let mut conn = TcpStream::connect(("127.0.0.1", self.helper_port))?;
        conn.set_read_timeout(Some(timeout))?;
        conn.write_all(script.as_bytes())?;
        conn.shutdown(Shutdown::Write)?;
        Ok(conn)
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Splits a helper answer into exit code and output.
fn split_exit(out: &str) -> Option<(i32, String)> {
    let at = out.rfind(EXIT_MARK)?;
    let code = out[at + EXIT_MARK.len()..].trim().parse().ok()?;
    let body = out[..at].strip_suffix('\n').unwrap_or(&out[..at]);
    Some((code, body.to_owned()))
}

fn log(line: &str) {
    // Captured by libtest (shown for a failing test, or with --nocapture).
    eprintln!("vm: {line}");
}

fn kvm_verdict_file() -> PathBuf {
    let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    Image::get()
        .map(|i| i.dir.parent().unwrap_or(&i.dir).to_path_buf())
        .unwrap_or_else(|_| std::env::temp_dir())
        .join(format!("kvm-{}", boot.trim()))
}

fn kvm_verdict_on_disk() -> Option<Accel> {
    match fs::read_to_string(kvm_verdict_file()).ok()?.trim() {
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        _ => None,
    }
}

fn remember_kvm(accel: Accel) {
    *KVM_VERDICT.lock().unwrap_or_else(|e| e.into_inner()) = Some(accel);
    let _ = fs::write(kvm_verdict_file(), accel.name());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_helper_answer_splits_into_code_and_output() {
        assert_eq!(
            split_exit("a\nb\n\nroost-vm-exit:3\n"),
            Some((3, "a\nb\n".into()))
        );
        assert_eq!(split_exit("\nroost-vm-exit:0\n"), Some((0, String::new())));
        assert_eq!(split_exit("cut off"), None);
    }
}
