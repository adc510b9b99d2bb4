//! Power (docs/protocol.md §7.13): whether the node runs on battery, and how full it is, from
//! the kernel's `/sys/class/power_supply` (the folder is a parameter, for tests).
//!
//! A machine with no battery is on mains. With batteries, it is on mains when any `Mains`
//! or `USB` supply is online, or, when it has none, when a battery says it is charging or
//! full. Peripheral batteries (`scope` = `Device`: mice, headsets) are ignored.

use std::path::{Path, PathBuf};

/// Where the kernel lists power supplies.
pub const SYS_POWER_SUPPLY: &str = "/sys/class/power_supply";

/// What the power supplies say now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerState {
    /// Whether the node draws on its battery (no mains, at least one battery).
    pub on_battery: bool,
    /// The mean charge of the node's batteries, in percent (none without a battery).
    pub charge: Option<u8>,
}

impl PowerState {
    /// Mains power, no battery.
    pub const MAINS: PowerState = PowerState {
        on_battery: false,
        charge: None,
    };
}

/// Reads power supplies from a `power_supply` folder.
#[derive(Debug, Clone)]
pub struct PowerSupplies {
    root: PathBuf,
}

impl Default for PowerSupplies {
    fn default() -> Self {
        Self::new(SYS_POWER_SUPPLY)
    }
}

fn read(dir: &Path, name: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(name))
        .ok()
        .map(|s| s.trim().to_owned())
}

impl PowerSupplies {
    /// Supplies listed under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The state now; a missing or unreadable folder reads as mains power.
    pub fn read(&self) -> PowerState {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return PowerState::MAINS;
        };
        let mut mains_seen = false;
        let mut mains_online = false;
        let mut charging = false;
        let mut charges = Vec::new();
        for e in entries.flatten() {
            let dir = e.path();
            if read(&dir, "scope").is_some_and(|s| s.eq_ignore_ascii_case("device")) {
                continue;
            }
            match read(&dir, "type").as_deref() {
                Some("Mains") | Some("USB") => {
                    mains_seen = true;
                    mains_online |= read(&dir, "online").as_deref() == Some("1");
                }
                Some("Battery") => {
                    if read(&dir, "present").as_deref() == Some("0") {
                        continue;
                    }
                    let status = read(&dir, "status").unwrap_or_default();
                    charging |= status == "Charging" || status == "Full";
                    if let Some(c) = read(&dir, "capacity").and_then(|c| c.parse::<u8>().ok()) {
                        charges.push(c.min(100));
                    }
                }
                _ => {}
            }
        }
        let has_battery = !charges.is_empty();
        let on_mains = if mains_seen { mains_online } else { charging };
        let charge = (has_battery)
            .then(|| (charges.iter().map(|c| *c as u32).sum::<u32>() / charges.len() as u32) as u8);
        PowerState {
            on_battery: has_battery && !on_mains,
            charge,
        }
    }
}

/// When a deploy must wait for power: the node's rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerPolicy {
    /// On battery below this charge (percent), wait.
    pub min_battery_percent: u8,
    /// On battery at all, wait.
    pub defer_on_battery: bool,
}

impl Default for PowerPolicy {
    fn default() -> Self {
        Self {
            min_battery_percent: 30,
            defer_on_battery: false,
        }
    }
}

impl PowerPolicy {
    /// Why a deploy waits in `state`, or none.
    pub fn why_wait(&self, state: PowerState) -> Option<String> {
        if !state.on_battery {
            return None;
        }
        let charge = state
            .charge
            .map_or_else(|| "unknown charge".to_owned(), |c| format!("{c} %"));
        if self.defer_on_battery {
            return Some(format!(
                "on battery ({charge}); this node deploys on mains power only"
            ));
        }
        match state.charge {
            Some(c) if c < self.min_battery_percent => Some(format!(
                "on battery at {charge}, below {} %; waiting for mains power",
                self.min_battery_percent
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn supply(root: &Path, name: &str, files: &[(&str, &str)]) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for (k, v) in files {
            std::fs::write(d.join(k), format!("{v}\n")).unwrap();
        }
    }

    #[test]
    fn a_laptop_unplugged_is_on_battery_with_its_charge() {
        let d = tempfile::tempdir().unwrap();
        supply(d.path(), "AC", &[("type", "Mains"), ("online", "0")]);
        supply(
            d.path(),
            "BAT0",
            &[
                ("type", "Battery"),
                ("capacity", "22"),
                ("status", "Discharging"),
            ],
        );
        let s = PowerSupplies::new(d.path()).read();
        assert_eq!(
            s,
            PowerState {
                on_battery: true,
                charge: Some(22)
            }
        );
        supply(d.path(), "AC", &[("online", "1")]);
        assert!(!PowerSupplies::new(d.path()).read().on_battery);
    }

    #[test]
    fn no_folder_or_no_battery_is_mains() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(
            PowerSupplies::new(d.path().join("missing")).read(),
            PowerState::MAINS
        );
        supply(d.path(), "AC", &[("type", "Mains"), ("online", "0")]);
        assert!(!PowerSupplies::new(d.path()).read().on_battery);
    }

    #[test]
    fn peripheral_batteries_are_ignored_and_a_charging_battery_without_mains_is_mains() {
        let d = tempfile::tempdir().unwrap();
        supply(
            d.path(),
            "hidpp_battery_0",
            &[("type", "Battery"), ("scope", "Device"), ("capacity", "5")],
        );
        assert_eq!(PowerSupplies::new(d.path()).read(), PowerState::MAINS);
        supply(
            d.path(),
            "BAT1",
            &[
                ("type", "Battery"),
                ("capacity", "50"),
                ("status", "Charging"),
            ],
        );
        assert!(!PowerSupplies::new(d.path()).read().on_battery);
        supply(d.path(), "BAT1", &[("status", "Discharging")]);
        assert!(PowerSupplies::new(d.path()).read().on_battery);
    }

    #[test]
    fn the_policy_waits_below_the_charge_or_on_battery_at_all() {
        let low = PowerState {
            on_battery: true,
            charge: Some(22),
        };
        let high = PowerState {
            on_battery: true,
            charge: Some(80),
        };
        let p = PowerPolicy::default();
        assert!(p.why_wait(low).unwrap().contains("22 %, below 30 %"));
        assert_eq!(p.why_wait(high), None);
        assert_eq!(p.why_wait(PowerState::MAINS), None);
        let strict = PowerPolicy {
            defer_on_battery: true,
            ..p
        };
        assert!(strict.why_wait(high).unwrap().contains("mains power only"));
    }
}
