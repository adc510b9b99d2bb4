//! What a laptop's surroundings look like to the agent, for its tests: a private D-Bus bus
//! (Debian's `dbus-daemon`), a fake NetworkManager on it that answers `Metered`, a listener
//! that records the desktop notifications sent to it, and a fake `/sys/class/power_supply`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use anyhow::Context;
use zbus::zvariant::OwnedValue;

use crate::wait_for;

/// A `dbus-daemon` of its own on a socket file: any user may connect, own any name and send
/// to anyone (only the test and the node under test are on it).
#[derive(Debug)]
pub struct PrivateBus {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
}

impl PrivateBus {
    /// Starts a bus listening on `socket` (its folder is made), configured from `dir`.
    pub fn start(dir: &Path, socket: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        if let Some(parent) = socket.parent() {
            fs::create_dir_all(parent)?;
        }
        let config = dir.join(format!(
            "bus-{}.conf",
            socket.file_name().and_then(|n| n.to_str()).unwrap_or("bus")
        ));
        fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )?;
        let child = Command::new("dbus-daemon")
            .arg(format!("--config-file={}", config.display()))
            .arg("--nofork")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("starting dbus-daemon")?;
        let bus = Self {
            child,
            socket: socket.to_owned(),
        };
        wait_for("the private bus's socket", Duration::from_secs(10), || {
            bus.socket.exists().then_some(())
        })?;
        Ok(bus)
    }

    /// Its D-Bus address.
    pub fn address(&self) -> String {
        format!("unix:path={}", self.socket.display())
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A service on a bus, served from a thread of its own until dropped.
#[derive(Debug)]
pub struct Served {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve<I: zbus::object_server::Interface>(
    address: String,
    name: &'static str,
    path: &'static str,
    iface: I,
) -> anyhow::Result<Served> {
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        rt.block_on(async move {
            let conn = async {
                zbus::connection::Builder::address(address.as_str())?
                    .name(name)?
                    .serve_at(path, iface)?
                    .build()
                    .await
            }
            .await;
            match conn {
                Ok(_conn) => {
                    let _ = ready_tx.send(Ok(()));
                    let _ = stop_rx.await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                }
            }
        });
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the service did not come up")?
        .map_err(|e| anyhow::anyhow!("serving {name}: {e}"))?;
    Ok(Served {
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

struct NetworkManager {
    metered: Arc<AtomicU32>,
}

#[zbus::interface(name = "org.freedesktop.NetworkManager")]
impl NetworkManager {
    /// NMMetered: 1 yes, 2 no, 3 guess-yes, 4 guess-no.
    #[zbus(property)]
    fn metered(&self) -> u32 {
        self.metered.load(Ordering::SeqCst)
    }
}

/// A fake NetworkManager whose `Metered` property is what the test sets.
#[derive(Debug)]
pub struct FakeNetworkManager {
    metered: Arc<AtomicU32>,
    _served: Served,
}

impl FakeNetworkManager {
    /// Serves `org.freedesktop.NetworkManager` on the bus at `address`.
    pub fn serve(address: &str, metered: u32) -> anyhow::Result<Self> {
        let m = Arc::new(AtomicU32::new(metered));
        let served = serve(
            address.to_owned(),
            "org.freedesktop.NetworkManager",
            "/org/freedesktop/NetworkManager",
            NetworkManager { metered: m.clone() },
        )?;
        Ok(Self {
            metered: m,
            _served: served,
        })
    }

    /// Sets `Metered` (1 yes, 2 no).
    pub fn set_metered(&self, v: u32) {
        self.metered.store(v, Ordering::SeqCst);
    }
}

/// A desktop notification as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The sending application.
    pub app: String,
    /// Its summary line.
    pub summary: String,
    /// Its body.
    pub body: String,
}

struct Notifications {
    tx: mpsc::Sender<Notification>,
}

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl Notifications {
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        app_name: String,
        _replaces_id: u32,
        _app_icon: String,
        summary: String,
        body: String,
        _actions: Vec<String>,
        _hints: HashMap<String, OwnedValue>,
        _expire_timeout: i32,
    ) -> u32 {
        let _ = self.tx.send(Notification {
            app: app_name,
            summary,
            body,
        });
        1
    }
}

/// A notification server that records what it is sent.
#[derive(Debug)]
pub struct NotificationListener {
    rx: mpsc::Receiver<Notification>,
    _served: Served,
}

impl NotificationListener {
    /// Serves `org.freedesktop.Notifications` on the bus at `address`.
    pub fn serve(address: &str) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let served = serve(
            address.to_owned(),
            "org.freedesktop.Notifications",
            "/org/freedesktop/Notifications",
            Notifications { tx },
        )?;
        Ok(Self {
            rx,
            _served: served,
        })
    }

    /// The next notification whose summary contains `what`, within `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration) -> anyhow::Result<Notification> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let n = self
                .rx
                .recv_timeout(left)
                .with_context(|| format!("no notification `{what}` within {timeout:?}"))?;
            if n.summary.contains(what) {
                return Ok(n);
            }
        }
    }
}

/// Writes a fake `power_supply` folder: an `AC` supply (online or not) and a `BAT0` battery
/// at `charge` percent, discharging unless on mains.
pub fn fake_power_supply(dir: &Path, on_mains: bool, charge: u8) -> anyhow::Result<()> {
    let ac = dir.join("AC");
    let bat = dir.join("BAT0");
    fs::create_dir_all(&ac)?;
    fs::create_dir_all(&bat)?;
    fs::write(ac.join("type"), "Mains\n")?;
    fs::write(ac.join("online"), if on_mains { "1\n" } else { "0\n" })?;
    fs::write(bat.join("type"), "Battery\n")?;
    fs::write(bat.join("present"), "1\n")?;
    fs::write(bat.join("capacity"), format!("{charge}\n"))?;
    fs::write(
        bat.join("status"),
        if on_mains {
            "Charging\n"
        } else {
            "Discharging\n"
        },
    )?;
    Ok(())
}
