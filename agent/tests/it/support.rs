//! Shared test helpers: a publisher key that signs manifests, manifest JSON, fake store
//! paths, agent configs, and snapshots of a state folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use roost_agent::{Config, ConfigFile};
use roost_common::envelope::{Context, Envelope};
use roost_common::{SecretKey, Timestamp};
use serde_json::{Value, json};

/// The node name every test uses.
pub const NODE: &str = "pi-kitchen";

/// A publisher: a signing key and its public half on disk (for `--trusted-key`).
#[derive(Debug)]
pub struct Publisher {
    pub key: SecretKey,
    pub public_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Publisher {
    pub fn new(name: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::generate(name).unwrap();
        let public_file = dir.path().join(format!("{name}.pub"));
        std::fs::write(&public_file, key.public().to_string()).unwrap();
        Self {
            key,
            public_file,
            _dir: dir,
        }
    }

    /// The envelope of `manifest`, signed.
    pub fn sign(&self, manifest: &Value) -> Vec<u8> {
        let payload = serde_json::to_vec(manifest).unwrap();
        Envelope::seal(Context::Manifest, &payload, &[&self.key]).to_bytes()
    }
}

/// A manifest for [`NODE`] on this system, valid for a day, with `profiles`.
pub fn manifest(version: u64, profiles: Vec<Value>) -> Value {
    let now = Timestamp::now();
    json!({
        "format": 1,
        "node": NODE,
        "system": roost_agent::config::build_system(),
        "version": version,
        "issued_at": now.to_string(),
        "expires_at": now.plus(std::time::Duration::from_secs(86400)).to_string(),
        "profiles": profiles,
    })
}

/// A syntactically valid store path for `name` (not a real one: for the fake store).
pub fn fake_store_path(name: &str) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let mut h: u64 = 1469598103934665603;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(1099511628211);
    }
    let hash: String = (0..32)
        .map(|i| {
            let x = h.rotate_left(i * 7) ^ u64::from(i);
            ALPHABET[(x % 32) as usize] as char
        })
        .collect();
    format!("/nix/store/{hash}-{name}")
}

/// An agent config for tests: state in `state_dir`, trusting `publisher`.
pub fn config(state_dir: &Path, coordinators: Vec<String>, publisher: &Publisher) -> Config {
    ConfigFile {
        coordinators,
        node: Some(NODE.into()),
        trusted_keys: vec![publisher.public_file.clone()],
        state_dir: Some(state_dir.to_owned()),
        interval: Some("1s".into()),
        ..ConfigFile::default()
    }
    .resolve()
    .unwrap()
}

/// Every file under `dir` except the report queue and the record of the last refused
/// manifest (what a refusal writes, for the coordinator and for `status`), with its content
/// (bytes compared, shown as text when a test fails).
pub fn snapshot_without_reports(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, d: &Path, out: &mut BTreeMap<PathBuf, String>) {
        let Ok(entries) = std::fs::read_dir(d) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_owned();
            if rel.starts_with("reports") || rel == Path::new(roost_agent::state::REFUSED_FILE) {
                continue;
            }
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                walk(root, &p, out);
            } else if meta.file_type().is_symlink() {
                out.insert(rel, std::fs::read_link(&p).unwrap().display().to_string());
            } else {
                let bytes = std::fs::read(&p).unwrap_or_default();
                // Text stays readable in a failure message; anything else is escaped.
                let text = String::from_utf8(bytes)
                    .unwrap_or_else(|e| e.into_bytes().escape_ascii().to_string());
                out.insert(rel, text);
            }
        }
    }
    walk(dir, dir, &mut out);
    out
}

/// Reports queued in `state_dir`, decoded (seq, payload JSON).
pub fn queued_reports(state_dir: &Path) -> Vec<(u64, Value)> {
    use base64::Engine;
    let sd = roost_agent::state::StateDir::new(state_dir);
    sd.queued_reports()
        .into_iter()
        .map(|(seq, path)| {
            let env: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            let payload = base64::engine::general_purpose::STANDARD
                .decode(env["payload"].as_str().unwrap())
                .unwrap();
            (seq, serde_json::from_slice(&payload).unwrap())
        })
        .collect()
}
