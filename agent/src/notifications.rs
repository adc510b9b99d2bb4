//! Telling the people at the machine (docs/protocol.md §7.13): a desktop notification
//! (`org.freedesktop.Notifications.Notify`) on the session bus of every user who has one at
//! `/run/user/UID/bus`.
//!
//! A session bus admits its own user only, so the agent does not connect itself: it runs
//! itself as that user (`roost-agent notify-user`, hidden) for each bus, with a time limit.
//! A user without a notification server simply gets nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use zbus::zvariant::Value;

/// Where user runtime folders live.
pub const RUN_USER: &str = "/run/user";
const NOTIFICATIONS: &str = "org.freedesktop.Notifications";
const NOTIFICATIONS_PATH: &str = "/org/freedesktop/Notifications";
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a notification is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A new version is downloaded or due, and waits (window, power, metered, deferred).
    Waiting {
        /// The version.
        version: u64,
        /// Why it waits, for people.
        reason: String,
    },
    /// A new version is active.
    Applied {
        /// The version.
        version: u64,
    },
    /// A new version failed and the previous one is back.
    RolledBack {
        /// The version.
        version: u64,
        /// What failed.
        why: String,
    },
    /// A new version is installed for the next boot.
    NeedsReboot {
        /// The version.
        version: u64,
    },
}

impl Notice {
    /// Summary and body.
    pub fn text(&self) -> (String, String) {
        match self {
            Notice::Waiting { version, reason } => (
                "System update waiting".into(),
                format!(
                    "Version {version} will be applied later: {reason}. \
                     `roost-agent defer 4h` postpones it further."
                ),
            ),
            Notice::Applied { version } => (
                "System updated".into(),
                format!("Version {version} is now active."),
            ),
            Notice::RolledBack { version, why } => (
                "System update rolled back".into(),
                format!("Version {version} failed and the previous system is back: {why}"),
            ),
            Notice::NeedsReboot { version } => (
                "Restart to finish the update".into(),
                format!("Version {version} is installed and becomes active at the next restart."),
            ),
        }
    }

    /// The freedesktop urgency: 0 low, 1 normal, 2 critical.
    pub fn urgency(&self) -> u8 {
        match self {
            Notice::Applied { .. } | Notice::Waiting { .. } => 0,
            Notice::NeedsReboot { .. } => 1,
            Notice::RolledBack { .. } => 2,
        }
    }
}

/// A user's session bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionBus {
    /// The user.
    pub uid: u32,
    /// Its socket.
    pub socket: PathBuf,
}

impl SessionBus {
    /// The D-Bus address of the socket.
    pub fn address(&self) -> String {
        format!("unix:path={}", self.socket.display())
    }
}

/// Every `RUN/UID/bus` socket, by uid.
pub fn session_buses(run_user: &Path) -> Vec<SessionBus> {
    use std::os::unix::fs::FileTypeExt;
    let mut v: Vec<SessionBus> = std::fs::read_dir(run_user)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let uid: u32 = e.file_name().to_str()?.parse().ok()?;
                    let socket = e.path().join("bus");
                    let meta = std::fs::metadata(&socket).ok()?;
                    meta.file_type()
                        .is_socket()
                        .then_some(SessionBus { uid, socket })
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|b| b.uid);
    v
}

/// Sends notices to every session bus under a runtime folder.
#[derive(Debug, Clone)]
pub struct Notifier {
    run_user: PathBuf,
    enabled: bool,
}

impl Notifier {
    /// Notices to the buses under `run_user`, when `enabled`.
    pub fn new(run_user: impl Into<PathBuf>, enabled: bool) -> Self {
        Self {
            run_user: run_user.into(),
            enabled,
        }
    }

    /// Tells every user; failures are logged, never fatal. Returns how many buses took it.
    pub async fn send(&self, notice: &Notice) -> usize {
        if !self.enabled {
            return 0;
        }
        let buses = session_buses(&self.run_user);
        let mut delivered = 0;
        for bus in buses {
            match run_helper(&bus, notice).await {
                Ok(()) => delivered += 1,
                Err(e) => tracing::debug!(uid = bus.uid, "no desktop notification: {e}"),
            }
        }
        delivered
    }
}

async fn run_helper(bus: &SessionBus, notice: &Notice) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (summary, body) = notice.text();
    let gid = ::nix::unistd::User::from_uid(bus.uid.into())
        .ok()
        .flatten()
        .map_or(bus.uid, |u| u.gid.as_raw());
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("notify-user")
        .arg("--address")
        .arg(bus.address())
        .arg("--summary")
        .arg(summary)
        .arg("--body")
        .arg(body)
        .arg("--urgency")
        .arg(notice.urgency().to_string())
        .env_clear()
        .env("PATH", "/run/current-system/sw/bin:/usr/bin:/bin")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if ::nix::unistd::geteuid().is_root() && bus.uid != 0 {
        cmd.uid(bus.uid).gid(gid);
    }
    let child = cmd.spawn().map_err(|e| e.to_string())?;
    match tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the session bus did not answer within 10 s".into()),
    }
}

/// What `roost-agent notify-user` runs, as the bus's user: one `Notify` call.
pub async fn notify_on_bus(
    address: &str,
    summary: &str,
    body: &str,
    urgency: u8,
) -> zbus::Result<u32> {
    let conn = zbus::connection::Builder::address(address)?.build().await?;
    let mut hints: HashMap<&str, Value<'_>> = HashMap::new();
    hints.insert("urgency", Value::U8(urgency));
    let actions: Vec<&str> = Vec::new();
    let reply = conn
        .call_method(
            Some(NOTIFICATIONS),
            NOTIFICATIONS_PATH,
            Some(NOTIFICATIONS),
            "Notify",
            &(
                "roost",
                0u32,
                "system-software-update",
                summary,
                body,
                actions,
                hints,
                -1i32,
            ),
        )
        .await?;
    reply.body().deserialize::<u32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_user_folders_with_a_bus_socket_count() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("1000")).unwrap();
        let _l = std::os::unix::net::UnixListener::bind(d.path().join("1000/bus")).unwrap();
        std::fs::create_dir_all(d.path().join("1001")).unwrap();
        std::fs::write(d.path().join("1001/bus"), "not a socket").unwrap();
        std::fs::create_dir_all(d.path().join("gdm")).unwrap();
        let buses = session_buses(d.path());
        assert_eq!(
            buses,
            vec![SessionBus {
                uid: 1000,
                socket: d.path().join("1000/bus")
            }]
        );
        assert!(buses[0].address().starts_with("unix:path=/"));
    }

    #[test]
    fn a_rollback_is_urgent_and_says_what_failed() {
        let n = Notice::RolledBack {
            version: 7,
            why: "health check failed".into(),
        };
        let (summary, body) = n.text();
        assert!(summary.contains("rolled back"));
        assert!(body.contains("Version 7") && body.contains("health check failed"));
        assert_eq!(n.urgency(), 2);
    }
}
