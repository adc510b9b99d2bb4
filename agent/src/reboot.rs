//! Whether a NixOS system needs a reboot, and whether NixOS would refuse to switch to it live
//! (docs/protocol.md §7.16). Pure functions over system paths, so every rule is tested on
//! folders of symlinks.
//!
//! The inhibitor rule is NixOS 26.05's own (`system.switch.inhibitors`): each system may have
//! a `switch-inhibitors` file, a JSON object of strings; a key present in both the running
//! system's and the new one's with different values makes `switch-to-configuration` refuse
//! `switch` and `test` (exit 1, "Pre-switch checks failed"). `boot` is never checked, and
//! `NIXOS_NO_CHECK=1` skips the check. roost compares the two files itself before it
//! activates, since exit 1 alone does not say why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use jiff::Zoned;
use roost_common::Timestamp;
use roost_common::schedule::Schedule;
use roost_common::wire::v1::{Activation, Goal, Manifest, RebootPolicy};

use crate::activate::{Outcome, default_profile_path};

/// Where NixOS says which system it booted.
pub const BOOTED_SYSTEM: &str = "/run/booted-system";
/// Where NixOS says which system runs now.
pub const CURRENT_SYSTEM: &str = "/run/current-system";
/// The file of a system that names what must not change in a live switch.
pub const INHIBITORS_FILE: &str = "switch-inhibitors";
/// The environment variable that makes `switch-to-configuration` skip its checks.
pub const NO_CHECK_ENV: &str = "NIXOS_NO_CHECK";
/// `switch-to-configuration`'s exit status when the new system's init cannot be switched to
/// live: it is the boot default now and runs after the next boot.
pub const EXIT_INIT_CHANGED: i32 = 100;

/// The parts of a system that only a boot brings into use, and their names in reasons.
const BOOT_PARTS: [(&str, &str); 4] = [
    ("kernel", "kernel"),
    ("initrd", "initrd"),
    ("kernel-modules", "kernel modules"),
    ("systemd", "systemd"),
];

/// The running machine's two system links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Running {
    /// What was booted (`/run/booted-system`).
    pub booted: PathBuf,
    /// What runs now (`/run/current-system`).
    pub current: PathBuf,
}

impl Default for Running {
    fn default() -> Self {
        Self {
            booted: BOOTED_SYSTEM.into(),
            current: CURRENT_SYSTEM.into(),
        }
    }
}

fn resolve(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

fn shown(p: &Option<PathBuf>) -> String {
    p.as_ref()
        .map_or_else(|| "none".to_owned(), |p| p.display().to_string())
}

/// Why `system` (a system, or a link to one such as the `system` profile) is not fully in
/// use until the next boot: it is installed but not running, or its kernel, initrd, kernel
/// modules or systemd differ from the booted system's (and, when it is not running, what
/// inhibits a live switch to it). Empty when nothing waits, and on a
/// machine without `/run/booted-system` (not NixOS: nothing to tell).
pub fn reasons(system: &Path, run: &Running) -> Vec<String> {
    let (Some(booted), Some(new)) = (resolve(&run.booted), resolve(system)) else {
        return Vec::new();
    };
    if booted == new {
        return Vec::new();
    }
    let mut out = Vec::new();
    let active = resolve(&run.current).unwrap_or_else(|| booted.clone());
    if active != new {
        out.push(format!(
            "{} is installed for the next boot; {} runs now",
            new.display(),
            active.display()
        ));
        match inhibitors(&active, &new) {
            Ok(i) => out.extend(
                i.iter()
                    .map(|i| format!("NixOS refuses a live switch: {i}")),
            ),
            Err(e) => tracing::debug!("{e}"),
        }
    }
    for (part, name) in BOOT_PARTS {
        let (was, will) = (resolve(&booted.join(part)), resolve(&new.join(part)));
        if was != will {
            out.push(format!(
                "{name} changed: {} (booted) -> {}",
                shown(&was),
                shown(&will)
            ));
        }
    }
    out
}

/// The reboot reasons of a manifest's `nixos` profiles, each as its profile link is now.
pub fn manifest_reasons(m: &Manifest, run: &Running) -> Vec<String> {
    m.profiles
        .iter()
        .filter(|p| matches!(p.activation, Activation::Nixos { .. }))
        .flat_map(|p| reasons(&default_profile_path(p), run))
        .collect()
}

/// One key of `switch-inhibitors` that differs between the running and the new system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inhibitor {
    /// The key (`systemd`, `dbus`, …).
    pub key: String,
    /// Its value in the running system.
    pub old: String,
    /// Its value in the new one.
    pub new: String,
}

impl std::fmt::Display for Inhibitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} -> {}", self.key, self.old, self.new)
    }
}

/// A `switch-inhibitors` file that cannot be read as NixOS writes it.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why} (NixOS writes a JSON object of strings here)")]
pub struct InhibitorsError {
    path: PathBuf,
    why: String,
}

fn read_inhibitors(system: &Path) -> Result<BTreeMap<String, String>, InhibitorsError> {
    let path = system.join(INHIBITORS_FILE);
    let bad = |why: String| InhibitorsError {
        path: path.clone(),
        why,
    };
    match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(bad(e.to_string())),
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string())),
    }
}

/// What would make NixOS refuse a live switch from `current` (the running system) to `new`:
/// the keys both systems' `switch-inhibitors` name, with different values. A system without
/// the file names none.
pub fn inhibitors(current: &Path, new: &Path) -> Result<Vec<Inhibitor>, InhibitorsError> {
    let (old, new) = (read_inhibitors(current)?, read_inhibitors(new)?);
    Ok(old
        .into_iter()
        .filter_map(|(key, old)| {
            let new = new.get(&key)?;
            (*new != old).then(|| Inhibitor {
                key,
                old,
                new: new.clone(),
            })
        })
        .collect())
}

/// Whether NixOS checks inhibitors for `goal` in this environment (`no_check`: the value of
/// `NIXOS_NO_CHECK`, which the activation inherits).
pub fn checked(goal: Goal, no_check: Option<&str>) -> bool {
    goal != Goal::Boot && no_check != Some("1")
}

/// Whether an activation's outcome means "installed, active after the next boot": a `nixos`
/// `switch` whose new init cannot be switched to live (exit 100) has made the new system the
/// boot default, which is what the deploy asked for as far as it can be had without a reboot.
pub fn installed_for_boot(activation: &Activation, outcome: &Outcome) -> bool {
    matches!(activation, Activation::Nixos { goal: Goal::Switch })
        && matches!(
            outcome,
            Outcome::Failed {
                code: Some(EXIT_INIT_CHANGED),
                ..
            }
        )
}

/// What the reboot policy says now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Do not reboot (policy `never`, or nothing allows it).
    Stay,
    /// Not yet: a window opens then.
    WaitUntil(Timestamp),
    /// Reboot now (after taking a lease, where there are leases).
    Now,
}

/// The policy's verdict at `now` for a node that needs a reboot. `leases`: whether the
/// node's coordinators hand out reboot leases. Without leases (a static host) a node reboots
/// only inside its windows, whatever the policy, since nothing bounds how many reboot at
/// once; `auto` without windows then never reboots.
pub fn decide(policy: RebootPolicy, windows: &Schedule, now: &Zoned, leases: bool) -> Decision {
    let windowed = match policy {
        RebootPolicy::Never => return Decision::Stay,
        RebootPolicy::Auto if leases => return Decision::Now,
        RebootPolicy::Auto | RebootPolicy::Window => windows,
    };
    if windowed.is_empty() {
        return Decision::Stay;
    }
    if windowed.is_open(now) {
        return Decision::Now;
    }
    match windowed.next_opening(now) {
        Some((at, _)) => Decision::WaitUntil(Timestamp::from_unix(
            at.timestamp().as_second().max(0) as u64,
        )),
        None => Decision::Stay,
    }
}

/// The reboot policy of a manifest: that of its first `nixos` profile whose system needs a
/// reboot, with that profile's windows.
pub fn manifest_policy(m: &Manifest, run: &Running) -> Option<(RebootPolicy, Schedule)> {
    m.profiles
        .iter()
        .filter(|p| matches!(p.activation, Activation::Nixos { .. }))
        .find(|p| !reasons(&default_profile_path(p), run).is_empty())
        .map(|p| (p.reboot, Schedule::new(p.reboot_windows.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake system folder `name` under `d` with links for the given parts.
    fn system(d: &Path, name: &str, parts: &[(&str, &str)]) -> PathBuf {
        let s = d.join(name);
        std::fs::create_dir_all(&s).unwrap();
        for (part, target) in parts {
            let t = d.join(target);
            std::fs::write(&t, target).unwrap();
            symlink(&t, s.join(part)).unwrap();
        }
        s
    }

    fn running(d: &Path, booted: &Path, current: Option<&Path>) -> Running {
        let r = Running {
            booted: d.join("booted-system"),
            current: d.join("current-system"),
        };
        symlink(booted, &r.booted).unwrap();
        if let Some(c) = current {
            symlink(c, &r.current).unwrap();
        }
        r
    }

    const V1: [(&str, &str); 4] = [
        ("kernel", "bzImage-6.6"),
        ("initrd", "initrd-1"),
        ("kernel-modules", "modules-6.6"),
        ("systemd", "systemd-257"),
    ];

    #[test]
    fn the_booted_system_needs_no_reboot() {
        let d = tempfile::tempdir().unwrap();
        let a = system(d.path(), "a", &V1);
        let run = running(d.path(), &a, Some(&a));
        assert!(reasons(&a, &run).is_empty());
    }

    #[test]
    fn a_live_switch_that_keeps_kernel_initrd_modules_and_systemd_needs_no_reboot() {
        let d = tempfile::tempdir().unwrap();
        let a = system(d.path(), "a", &V1);
        let b = d.path().join("b");
        std::fs::create_dir(&b).unwrap();
        for (part, _) in V1 {
            symlink(std::fs::read_link(a.join(part)).unwrap(), b.join(part)).unwrap();
        }
        let run = running(d.path(), &a, Some(&b));
        assert_eq!(reasons(&b, &run), Vec::<String>::new());
    }

    #[test]
    fn each_changed_boot_part_is_a_reason_naming_both_paths() {
        let d = tempfile::tempdir().unwrap();
        let a = system(d.path(), "a", &V1);
        let b = system(
            d.path(),
            "b",
            &[
                ("kernel", "bzImage-6.12"),
                ("initrd", "initrd-2"),
                ("kernel-modules", "modules-6.12"),
                ("systemd", "systemd-258"),
            ],
        );
        let run = running(d.path(), &a, Some(&b));
        let r = reasons(&b, &run);
        assert_eq!(r.len(), 4, "{r:?}");
        assert!(r[0].starts_with("kernel changed: ") && r[0].ends_with("bzImage-6.12"));
        assert!(r[0].contains("bzImage-6.6"), "{r:?}");
        assert!(r[1].starts_with("initrd changed"), "{r:?}");
        assert!(r[2].starts_with("kernel modules changed"), "{r:?}");
        assert!(r[3].starts_with("systemd changed"), "{r:?}");
    }

    #[test]
    fn a_system_installed_but_not_running_waits_for_the_next_boot() {
        let d = tempfile::tempdir().unwrap();
        let a = system(d.path(), "a", &V1);
        let b = system(d.path(), "b", &[("kernel", "bzImage-6.12")]);
        // The profile link points at b; a runs.
        let link = d.path().join("system");
        symlink(&b, &link).unwrap();
        let run = running(d.path(), &a, Some(&a));
        let r = reasons(&link, &run);
        assert!(r[0].contains("is installed for the next boot"), "{r:?}");
        assert!(r.iter().any(|r| r.starts_with("kernel changed")), "{r:?}");
        assert!(!r.iter().any(|r| r.contains("refuses")), "{r:?}");
        std::fs::write(a.join(INHIBITORS_FILE), r#"{"systemd":"257"}"#).unwrap();
        std::fs::write(b.join(INHIBITORS_FILE), r#"{"systemd":"258"}"#).unwrap();
        let r = reasons(&link, &run);
        assert!(
            r.contains(&"NixOS refuses a live switch: systemd: 257 -> 258".to_owned()),
            "{r:?}"
        );
        // Without /run/current-system the booted system is what runs.
        let d2 = tempfile::tempdir().unwrap();
        let run = running(d2.path(), &a, None);
        assert!(reasons(&link, &run)[0].contains("installed for the next boot"));
    }

    #[test]
    fn a_machine_without_a_booted_system_has_nothing_to_say() {
        let d = tempfile::tempdir().unwrap();
        let a = system(d.path(), "a", &V1);
        let run = Running {
            booted: d.path().join("nothing"),
            current: d.path().join("nothing"),
        };
        assert!(reasons(&a, &run).is_empty());
    }

    fn with_inhibitors(d: &Path, name: &str, json: Option<&str>) -> PathBuf {
        let s = d.join(name);
        std::fs::create_dir_all(&s).unwrap();
        if let Some(j) = json {
            std::fs::write(s.join(INHIBITORS_FILE), j).unwrap();
        }
        s
    }

    #[test]
    fn a_key_in_both_systems_with_different_values_inhibits() {
        let d = tempfile::tempdir().unwrap();
        let old = with_inhibitors(
            d.path(),
            "old",
            Some(r#"{"systemd":"/nix/store/a-systemd-257","dbus":"dbus","gone":"x"}"#),
        );
        let new = with_inhibitors(
            d.path(),
            "new",
            Some(r#"{"systemd":"/nix/store/b-systemd-258","dbus":"dbus","added":"y"}"#),
        );
        let i = inhibitors(&old, &new).unwrap();
        assert_eq!(
            i,
            vec![Inhibitor {
                key: "systemd".into(),
                old: "/nix/store/a-systemd-257".into(),
                new: "/nix/store/b-systemd-258".into()
            }]
        );
        assert_eq!(
            i[0].to_string(),
            "systemd: /nix/store/a-systemd-257 -> /nix/store/b-systemd-258"
        );
    }

    #[test]
    fn keys_in_only_one_system_or_a_missing_file_never_inhibit() {
        let d = tempfile::tempdir().unwrap();
        let none = with_inhibitors(d.path(), "none", None);
        let some = with_inhibitors(d.path(), "some", Some(r#"{"systemd":"a"}"#));
        let other = with_inhibitors(d.path(), "other", Some(r#"{"dbus":"b"}"#));
        assert!(inhibitors(&none, &some).unwrap().is_empty());
        assert!(inhibitors(&some, &none).unwrap().is_empty());
        assert!(inhibitors(&some, &other).unwrap().is_empty());
        assert!(inhibitors(&some, &some).unwrap().is_empty());
    }

    #[test]
    fn an_inhibitors_file_that_is_not_a_json_object_of_strings_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let ok = with_inhibitors(d.path(), "ok", Some("{}"));
        let list = with_inhibitors(d.path(), "list", Some("/nix/store/a-systemd\n"));
        let e = inhibitors(&ok, &list).unwrap_err().to_string();
        assert!(e.contains("list/switch-inhibitors"), "{e}");
        assert!(e.contains("JSON object"), "{e}");
    }

    #[test]
    fn boot_and_no_check_skip_the_inhibitor_check() {
        assert!(checked(Goal::Switch, None));
        assert!(checked(Goal::Test, Some("0")));
        assert!(!checked(Goal::Boot, None));
        assert!(!checked(Goal::Switch, Some("1")));
    }

    #[test]
    fn exit_100_of_a_nixos_switch_is_installed_for_boot_and_nothing_else_is() {
        let switch = Activation::Nixos { goal: Goal::Switch };
        let test = Activation::Nixos { goal: Goal::Test };
        let c100 = Outcome::Failed {
            code: Some(100),
            output: String::new(),
        };
        let c1 = Outcome::Failed {
            code: Some(1),
            output: String::new(),
        };
        assert!(installed_for_boot(&switch, &c100));
        assert!(!installed_for_boot(&switch, &c1));
        assert!(!installed_for_boot(&switch, &Outcome::Ok));
        assert!(!installed_for_boot(&test, &c100));
        assert!(!installed_for_boot(&Activation::DeployRs, &c100));
    }

    fn at(text: &str) -> Zoned {
        format!("{text}[UTC]").parse().unwrap()
    }

    #[test]
    fn the_policy_decides_with_windows_and_leases() {
        let sat = Schedule::parse(&["Sat 02:00-05:00"]).unwrap();
        let none = Schedule::default();
        let open = at("2026-12-05T03:00:00");
        let closed = at("2026-12-02T13:00:00");
        use RebootPolicy::*;
        assert_eq!(decide(Never, &sat, &open, true), Decision::Stay);
        assert_eq!(decide(Auto, &none, &closed, true), Decision::Now);
        assert_eq!(decide(Window, &sat, &open, true), Decision::Now);
        assert_eq!(
            decide(Window, &sat, &closed, true),
            Decision::WaitUntil("2026-12-05T02:00:00Z".parse().unwrap())
        );
        // A static host: only inside a window, whatever the policy.
        assert_eq!(decide(Auto, &none, &open, false), Decision::Stay);
        assert_eq!(decide(Auto, &sat, &open, false), Decision::Now);
        assert!(matches!(
            decide(Auto, &sat, &closed, false),
            Decision::WaitUntil(_)
        ));
    }
}
