//! The agent's configuration: a JSON file with the same keys as the command-line flags;
//! flags win. Validated once, here, into [`Config`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use roost_common::{NodeName, PublicKey, TrustedKeys};
use serde::{Deserialize, Serialize};

use crate::power::PowerPolicy;
use crate::schedule::Schedule;

/// When the agent may build instead of substituting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BuildPolicy {
    /// Only substitute from the manifest's caches.
    SubstituteOnly,
    /// Substitute; build from `drv_path` when substitution fails.
    #[default]
    Fallback,
    /// Always build from `drv_path`.
    Build,
}

/// The config file (every key optional; flags override).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Coordinator base URLs, tried in order.
    #[serde(default)]
    pub coordinators: Vec<String>,
    /// This node's name (default: hostname).
    pub node: Option<String>,
    /// This node's Nix system (default: the agent's build system).
    pub system: Option<String>,
    /// Publisher public key files.
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    /// How many trusted keys must sign.
    pub threshold: Option<usize>,
    /// The state folder.
    pub state_dir: Option<PathBuf>,
    /// Poll interval, e.g. "5min".
    pub interval: Option<String>,
    /// `substitute-only`, `fallback` or `build`.
    pub build_policy: Option<BuildPolicy>,
    /// Hold polls open on coordinators that offer it (default true).
    pub long_poll: Option<bool>,
    /// Longest a realisation may take before it is killed, e.g. "1h" (a cut network must
    /// not hang the agent forever).
    pub realise_timeout: Option<String>,
    /// Extra substituters the node may always use (besides the manifest's).
    #[serde(default)]
    pub extra_substituters: Vec<String>,
    /// Extra cache public keys the node always trusts.
    #[serde(default)]
    pub extra_trusted_public_keys: Vec<String>,
    /// CA certificates (PEM files) trusted for HTTPS coordinators besides the web PKI roots,
    /// for coordinators behind a private CA.
    #[serde(default)]
    pub ca_certs: Vec<PathBuf>,
    /// When deploys may switch, node local time (`"Mon-Fri 12:00-13:00"`); empty: any time.
    /// Wins over the manifest's `apply_windows`.
    #[serde(default)]
    pub apply_windows: Vec<String>,
    /// On battery below this charge (percent) a deploy waits (default 30).
    pub min_battery_percent: Option<u8>,
    /// On battery at all a deploy waits (default false).
    pub defer_on_battery: Option<bool>,
    /// On a metered network, downloads larger than this wait (bytes or `"100MiB"`).
    pub metered_max_download: Option<Size>,
    /// `switch` (default) or `boot`: install new systems for the next boot only.
    pub system_goal: Option<SystemGoal>,
    /// The longest `roost-agent defer` may postpone a deploy (default `24h`).
    pub max_defer: Option<String>,
    /// Healthy generations kept per profile besides current, booted and pending (default 5).
    pub keep_generations: Option<usize>,
    /// Collect garbage when the store has less free space than this (bytes or `"2GiB"`).
    pub gc_min_free: Option<Size>,
    /// Collect garbage after every successful deploy (default false).
    pub gc_after_deploy: Option<bool>,
    /// node-exporter textfile to write metrics to (default: none).
    pub metrics_file: Option<PathBuf>,
    /// Desktop notifications to logged-in users (default true).
    pub notifications: Option<bool>,
    /// What reboots the machine when the reboot policy says so (default
    /// `["systemctl", "reboot"]`; docs/protocol.md §7.16).
    #[serde(default)]
    pub reboot_command: Vec<String>,
}

/// A size: bytes, or a string such as `"2GiB"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size {
    /// Bytes.
    Bytes(u64),
    /// `"2GiB"`, `"500MB"`, ….
    Text(String),
}

impl Size {
    fn bytes(&self, key: &str) -> Result<u64, ConfigError> {
        match self {
            Size::Bytes(b) => Ok(*b),
            Size::Text(t) => {
                roost_common::size::parse_size(t).map_err(|e| ConfigError(format!("{key}: {e}")))
            }
        }
    }
}

/// How a node installs a new `nixos` system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SystemGoal {
    /// As the manifest says (usually a live switch).
    #[default]
    Switch,
    /// `switch-to-configuration boot`: active at the next reboot the user makes.
    Boot,
}

/// Laptop and Raspberry Pi settings (docs/protocol.md §7.13–§7.15).
#[derive(Debug, Clone)]
pub struct Laptop {
    /// The node's own apply windows (empty: the manifest's, if any).
    pub apply_windows: Schedule,
    /// When to wait for power.
    pub power: PowerPolicy,
    /// Largest download on a metered network.
    pub metered_max_download: u64,
    /// How new systems are installed.
    pub system_goal: SystemGoal,
    /// Longest deferral.
    pub max_defer: Duration,
    /// Healthy generations kept.
    pub keep_generations: usize,
    /// Free-space floor that triggers a GC.
    pub gc_min_free: Option<u64>,
    /// GC after every deploy.
    pub gc_after_deploy: bool,
    /// The metrics text file.
    pub metrics_file: Option<PathBuf>,
    /// Desktop notifications.
    pub notifications: bool,
    /// What reboots the machine.
    pub reboot_command: Vec<String>,
}

impl Default for Laptop {
    fn default() -> Self {
        Self {
            apply_windows: Schedule::default(),
            power: PowerPolicy::default(),
            metered_max_download: DEFAULT_METERED_MAX,
            system_goal: SystemGoal::Switch,
            max_defer: Duration::from_secs(24 * 3600),
            keep_generations: 5,
            gc_min_free: None,
            gc_after_deploy: false,
            metrics_file: None,
            notifications: true,
            reboot_command: vec!["systemctl".into(), "reboot".into()],
        }
    }
}

/// Default largest download on a metered network: 100 MiB.
pub const DEFAULT_METERED_MAX: u64 = 100 << 20;

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Coordinator base URLs, tried in order (none: `apply` only).
    pub coordinators: Vec<String>,
    /// This node.
    pub node: NodeName,
    /// Its system.
    pub system: String,
    /// Publisher keys and threshold.
    pub trusted: TrustedKeys,
    /// The state folder.
    pub state_dir: PathBuf,
    /// Poll interval.
    pub interval: Duration,
    /// Build policy.
    pub build_policy: BuildPolicy,
    /// Use long-poll where offered.
    pub long_poll: bool,
    /// Limit for one realisation.
    pub realise_timeout: Duration,
    /// Extra substituters.
    pub extra_substituters: Vec<String>,
    /// Extra cache keys.
    pub extra_trusted_public_keys: Vec<String>,
    /// Extra CA certificates for HTTPS coordinators.
    pub ca_certs: Vec<reqwest::Certificate>,
    /// Windows, power, metered, goal, deferral, retention, metrics, notifications.
    pub laptop: Laptop,
}

/// A configuration problem (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The system this agent was built for, in Nix's spelling (`armv7l-linux`, not Rust's
/// `arm-linux`: a manifest for a 32-bit Pi names the former).
pub fn build_system() -> String {
    nix_system(
        std::env::consts::ARCH,
        std::env::consts::OS,
        cfg!(target_feature = "v7"),
        cfg!(target_endian = "little"),
    )
}

/// Rust's target architecture and OS in Nix's spelling of a system.
fn nix_system(arch: &str, os: &str, armv7: bool, little_endian: bool) -> String {
    let arch = match arch {
        "arm" if armv7 => "armv7l",
        "arm" => "armv6l",
        "x86" => "i686",
        "powerpc64" if little_endian => "powerpc64le",
        "mips64" if little_endian => "mips64el",
        "mips" if little_endian => "mipsel",
        other => other,
    };
    format!("{arch}-{os}")
}

/// The kernel's host name, when set.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

impl ConfigFile {
    /// Reads a config file.
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
        serde_json::from_str(&text)
            .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))
    }

    /// Validates into a [`Config`], loading the trusted keys (at least one).
    pub fn resolve(self) -> Result<Config, ConfigError> {
        if self.trusted_keys.is_empty() {
            return Err(ConfigError("no trusted publisher key: pass --trusted-key FILE (the public half of the key `publish --key` uses)".into()));
        }
        self.resolve_without_trust()
    }

    /// As [`ConfigFile::resolve`], for commands that verify no manifest (`rollback`): the
    /// trusted keys may be absent (those given are still checked).
    pub fn resolve_without_trust(self) -> Result<Config, ConfigError> {
        let laptop = self.laptop()?;
        let node_raw = self
            .node
            .or_else(hostname)
            .ok_or_else(|| ConfigError("no node name: pass --node or set `node`".into()))?;
        let node: NodeName = node_raw
            .parse()
            .map_err(|e| ConfigError(format!("node: {e}")))?;
        for c in &self.coordinators {
            if !(c.starts_with("http://") || c.starts_with("https://")) {
                return Err(ConfigError(format!(
                    "coordinator `{c}`: expected an http:// or https:// URL"
                )));
            }
        }
        let keys = self
            .trusted_keys
            .iter()
            .map(|p| PublicKey::read_file(p).map_err(|e| ConfigError(format!("trusted key: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let threshold = self.threshold.unwrap_or(1);
        if threshold == 0 || (threshold > keys.len() && !keys.is_empty()) {
            return Err(ConfigError(format!(
                "threshold {threshold} needs between 1 and {} trusted keys",
                keys.len()
            )));
        }
        let interval = match &self.interval {
            Some(s) => roost_common::time::parse_duration(s)
                .map_err(|e| ConfigError(format!("interval: {e}")))?,
            None => Duration::from_secs(300),
        };
        if interval < Duration::from_secs(1) {
            return Err(ConfigError("interval must be at least 1s".into()));
        }
        let realise_timeout = match &self.realise_timeout {
            Some(s) => roost_common::time::parse_duration(s)
                .map_err(|e| ConfigError(format!("realise_timeout: {e}")))?,
            None => Duration::from_secs(3600),
        };
        for k in &self.extra_trusted_public_keys {
            k.parse::<PublicKey>()
                .map_err(|e| ConfigError(format!("extra_trusted_public_keys `{k}`: {e}")))?;
        }
        let ca_certs = self
            .ca_certs
            .iter()
            .map(|p| {
                let pem = std::fs::read(p)
                    .map_err(|e| ConfigError(format!("ca_certs: {}: {e}", p.display())))?;
                // reqwest parses lazily; refuse what is plainly not a PEM certificate now.
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(ConfigError(format!(
                        "ca_certs: {}: not a PEM certificate (no BEGIN CERTIFICATE block)",
                        p.display()
                    )));
                }
                reqwest::Certificate::from_pem(&pem).map_err(|e| {
                    ConfigError(format!(
                        "ca_certs: {}: not a PEM certificate: {e}",
                        p.display()
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Config {
            laptop,
            coordinators: self
                .coordinators
                .iter()
                .map(|c| c.trim_end_matches('/').to_owned())
                .collect(),
            node,
            system: self.system.unwrap_or_else(build_system),
            trusted: TrustedKeys::new(keys, threshold),
            state_dir: self
                .state_dir
                .unwrap_or_else(|| PathBuf::from("/var/lib/roost")),
            interval,
            build_policy: self.build_policy.unwrap_or_default(),
            long_poll: self.long_poll.unwrap_or(true),
            realise_timeout,
            extra_substituters: self.extra_substituters,
            extra_trusted_public_keys: self.extra_trusted_public_keys,
            ca_certs,
        })
    }
}

impl ConfigFile {
    fn laptop(&self) -> Result<Laptop, ConfigError> {
        let d = Laptop::default();
        let apply_windows = Schedule::parse(&self.apply_windows)
            .map_err(|e| ConfigError(format!("apply_windows: {e}")))?;
        let min_battery_percent = self
            .min_battery_percent
            .unwrap_or(d.power.min_battery_percent);
        if min_battery_percent > 100 {
            return Err(ConfigError(format!(
                "min_battery_percent: {min_battery_percent} is not a percentage (0-100)"
            )));
        }
        let max_defer = match &self.max_defer {
            Some(s) => roost_common::time::parse_duration(s)
                .map_err(|e| ConfigError(format!("max_defer: {e}")))?,
            None => d.max_defer,
        };
        Ok(Laptop {
            apply_windows,
            power: PowerPolicy {
                min_battery_percent,
                defer_on_battery: self.defer_on_battery.unwrap_or(false),
            },
            metered_max_download: match &self.metered_max_download {
                Some(s) => s.bytes("metered_max_download")?,
                None => d.metered_max_download,
            },
            system_goal: self.system_goal.unwrap_or_default(),
            max_defer,
            keep_generations: self.keep_generations.unwrap_or(d.keep_generations),
            gc_min_free: self
                .gc_min_free
                .as_ref()
                .map(|s| s.bytes("gc_min_free"))
                .transpose()?,
            gc_after_deploy: self.gc_after_deploy.unwrap_or(false),
            metrics_file: self.metrics_file.clone(),
            notifications: self.notifications.unwrap_or(true),
            reboot_command: if self.reboot_command.is_empty() {
                d.reboot_command
            } else {
                self.reboot_command.clone()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &Path, name: &str) -> PathBuf {
        let k = roost_common::SecretKey::generate(name).unwrap();
        let p = dir.join(format!("{name}.pub"));
        std::fs::write(&p, k.public().to_string()).unwrap();
        p
    }

    fn base(dir: &Path) -> ConfigFile {
        ConfigFile {
            node: Some("pi-kitchen".into()),
            trusted_keys: vec![key_file(dir, "publisher-1")],
            ..ConfigFile::default()
        }
    }

    #[test]
    fn defaults_follow_the_design() {
        let d = tempfile::tempdir().unwrap();
        let c = base(d.path()).resolve().unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/roost"));
        assert_eq!(c.interval, Duration::from_secs(300));
        assert_eq!(c.build_policy, BuildPolicy::Fallback);
        assert_eq!(c.trusted.threshold(), 1);
        assert!(c.long_poll);
        assert_eq!(c.system, build_system());
    }

    #[test]
    fn a_ca_cert_that_is_not_pem_is_refused_with_its_file() {
        let d = tempfile::tempdir().unwrap();
        let bad = d.path().join("ca.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        let mut f = base(d.path());
        f.ca_certs = vec![bad];
        let e = f.resolve().unwrap_err().to_string();
        assert!(e.contains("ca.pem") && e.contains("PEM"), "{e}");
        let mut f = base(d.path());
        f.ca_certs = vec![d.path().join("missing.pem")];
        assert!(f.resolve().unwrap_err().to_string().contains("missing.pem"));
    }

    #[test]
    fn an_unknown_key_in_the_file_is_named_with_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("agent.json");
        std::fs::write(&p, r#"{"node": "a", "pol_interval": "5s"}"#).unwrap();
        let e = ConfigFile::read(&p).unwrap_err().to_string();
        assert!(
            e.contains("pol_interval") && e.contains("agent.json"),
            "{e}"
        );
    }

    #[test]
    fn the_file_uses_the_same_keys_as_the_flags() {
        let d = tempfile::tempdir().unwrap();
        let k = key_file(d.path(), "k1");
        let p = d.path().join("agent.json");
        std::fs::write(
            &p,
            serde_json::json!({
                "coordinators": ["https://a.example/", "https://b.example"],
                "node": "pi-garage", "system": "aarch64-linux",
                "trusted_keys": [k], "threshold": 1, "state_dir": "/srv/roost",
                "interval": "30s", "build_policy": "substitute-only", "long_poll": false,
                "realise_timeout": "2h"
            })
            .to_string(),
        )
        .unwrap();
        let c = ConfigFile::read(&p).unwrap().resolve().unwrap();
        assert_eq!(
            c.coordinators,
            vec!["https://a.example".to_owned(), "https://b.example".into()]
        );
        assert_eq!(c.node.as_str(), "pi-garage");
        assert_eq!(c.system, "aarch64-linux");
        assert_eq!(c.state_dir, PathBuf::from("/srv/roost"));
        assert_eq!(c.interval, Duration::from_secs(30));
        assert_eq!(c.build_policy, BuildPolicy::SubstituteOnly);
        assert!(!c.long_poll);
        assert_eq!(c.realise_timeout, Duration::from_secs(7200));
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        let d = tempfile::tempdir().unwrap();
        let cases: Vec<(ConfigFile, &str)> = vec![
            (
                ConfigFile {
                    trusted_keys: vec![],
                    ..base(d.path())
                },
                "no trusted publisher key",
            ),
            (
                ConfigFile {
                    threshold: Some(2),
                    ..base(d.path())
                },
                "threshold 2",
            ),
            (
                ConfigFile {
                    interval: Some("soon".into()),
                    ..base(d.path())
                },
                "interval",
            ),
            (
                ConfigFile {
                    coordinators: vec!["ftp://x".into()],
                    ..base(d.path())
                },
                "ftp://x",
            ),
            (
                ConfigFile {
                    node: Some("not a node!".into()),
                    ..base(d.path())
                },
                "node",
            ),
            (
                ConfigFile {
                    trusted_keys: vec![d.path().join("missing.pub")],
                    ..base(d.path())
                },
                "missing.pub",
            ),
        ];
        for (f, want) in cases {
            let e = f.resolve().unwrap_err().to_string();
            assert!(e.contains(want), "expected `{want}` in: {e}");
        }
    }

    #[test]
    fn laptop_keys_have_defaults_and_are_validated() {
        let d = tempfile::tempdir().unwrap();
        let c = base(d.path()).resolve().unwrap();
        assert!(c.laptop.apply_windows.is_empty());
        assert_eq!(c.laptop.power.min_battery_percent, 30);
        assert_eq!(c.laptop.max_defer, Duration::from_secs(86_400));
        assert_eq!(c.laptop.keep_generations, 5);
        assert_eq!(c.laptop.metered_max_download, 100 << 20);
        assert_eq!(c.laptop.system_goal, SystemGoal::Switch);
        let p = d.path().join("agent.json");
        let k = key_file(d.path(), "k1");
        std::fs::write(
            &p,
            serde_json::json!({
                "node": "lap", "trusted_keys": [k],
                "apply_windows": ["Mon-Fri 12:00-13:00"], "min_battery_percent": 50,
                "defer_on_battery": true, "metered_max_download": "10MiB",
                "system_goal": "boot", "max_defer": "4h", "keep_generations": 2,
                "gc_min_free": 1073741824, "gc_after_deploy": true,
                "metrics_file": "/var/lib/prometheus-node-exporter/roost.prom",
                "notifications": false
            })
            .to_string(),
        )
        .unwrap();
        let l = ConfigFile::read(&p).unwrap().resolve().unwrap().laptop;
        assert_eq!(l.apply_windows.to_string(), "Mon-Fri 12:00-13:00");
        assert!(l.power.defer_on_battery);
        assert_eq!(l.metered_max_download, 10 << 20);
        assert_eq!(l.system_goal, SystemGoal::Boot);
        assert_eq!(l.max_defer, Duration::from_secs(4 * 3600));
        assert_eq!(l.gc_min_free, Some(1 << 30));
        assert!(l.gc_after_deploy && !l.notifications);
        for (bad, want) in [
            (r#"{"apply_windows": ["Mon 25:00-26:00"]}"#, "apply_windows"),
            (r#"{"gc_min_free": "lots"}"#, "gc_min_free"),
            (r#"{"min_battery_percent": 120}"#, "min_battery_percent"),
            (r#"{"max_defer": "soon"}"#, "max_defer"),
        ] {
            let mut f: ConfigFile = serde_json::from_str(bad).unwrap();
            f.trusted_keys = vec![key_file(d.path(), "k2")];
            f.node = Some("lap".into());
            let e = f.resolve().unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn the_build_system_is_spelled_as_nix_spells_it() {
        for (arch, armv7, le, want) in [
            ("x86_64", false, true, "x86_64-linux"),
            ("aarch64", false, true, "aarch64-linux"),
            ("arm", true, true, "armv7l-linux"),
            ("arm", false, true, "armv6l-linux"),
            ("x86", false, true, "i686-linux"),
            ("riscv64", false, true, "riscv64-linux"),
            ("powerpc64", false, true, "powerpc64le-linux"),
            ("powerpc64", false, false, "powerpc64-linux"),
        ] {
            assert_eq!(nix_system(arch, "linux", armv7, le), want, "{arch}");
        }
    }
}
