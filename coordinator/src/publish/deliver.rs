//! Where signed manifests go: a coordinator (`PUT /v1/nodes/NODE/manifest`) or a folder in
//! the same layout for any static web server.
//!
//! Delivery is two-phase so that nothing half-written is ever visible: [`Delivery::stage`]
//! reads the node's current version and prepares the bytes (for a folder: a temp file beside
//! the manifest, written and fsynced), [`Delivery::commit`] makes them visible in one step
//! (rename + fsync of the folder, or one `PUT`, which the coordinator applies atomically). A
//! publish killed at any moment leaves each node with its previous manifest or the new one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use roost_common::wire::v1::http as v1;
use roost_common::{Envelope, NodeName};

use super::PublishError;

/// Where manifests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A coordinator's base URL (no trailing slash).
    Coordinator(String),
    /// A folder for the static layout `v1/nodes/NODE/manifest`.
    Folder(PathBuf),
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Coordinator(u) => f.write_str(u),
            Destination::Folder(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The file of `node`'s manifest in the static layout under `dir`.
pub fn manifest_file(dir: &Path, node: &NodeName) -> PathBuf {
    dir.join(v1::manifest_file(node))
}

/// A manifest ready to be made visible.
#[derive(Debug)]
pub struct Staged {
    /// When the manifest it replaces was issued, if there was one.
    pub replaces_issued_at: Option<roost_common::Timestamp>,
    node: NodeName,
    bytes: Vec<u8>,
    /// The folder case: the written temp file.
    temp: Option<PathBuf>,
}

impl Staged {
    /// Removes a staged temp file that will not be committed.
    pub fn discard(self) {
        if let Some(t) = &self.temp {
            let _ = std::fs::remove_file(t);
        }
    }
}

/// Talks to one destination.
#[derive(Debug, Clone)]
pub struct Delivery {
    dest: Destination,
    client: reqwest::Client,
}

impl Delivery {
    /// A delivery to `dest`.
    pub fn new(dest: Destination) -> Result<Self, PublishError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| PublishError::Destination(format!("cannot make an HTTP client: {e}")))?;
        Ok(Self { dest, client })
    }

    /// Checks, before any work, that the destination can be reached (or the folder written).
    pub async fn preflight(&self) -> Result<(), PublishError> {
        match &self.dest {
            Destination::Folder(dir) => {
                let nodes = dir.join(v1::nodes_dir());
                std::fs::create_dir_all(&nodes).map_err(|e| {
                    PublishError::Destination(format!("cannot create {}: {e}", nodes.display()))
                })?;
                tempfile::NamedTempFile::new_in(&nodes).map_err(|e| {
                    PublishError::Destination(format!("cannot write in {}: {e}", nodes.display()))
                })?;
                Ok(())
            }
            Destination::Coordinator(url) => {
                // Any HTTP answer will do: this only proves the coordinator is there.
                self.client
                    .get(v1::fleet_url(url))
                    .send()
                    .await
                    .map(drop)
                    .map_err(|e| {
                        PublishError::Destination(format!(
                            "cannot reach the coordinator at {url}: {}",
                            error_chain(&e)
                        ))
                    })
            }
        }
    }

    /// Where `node`'s manifest lives at the destination.
    pub fn location(&self, node: &NodeName) -> String {
        match &self.dest {
            Destination::Folder(dir) => manifest_file(dir, node).display().to_string(),
            Destination::Coordinator(url) => v1::manifest_url(url, node),
        }
    }

    /// The version of `node`'s manifest at the destination now, if it has one.
    pub async fn current_version(&self, node: &NodeName) -> Result<Option<u64>, String> {
        Ok(self.current(node).await?.map(|c| c.version))
    }

    /// What `node`'s manifest at the destination now says, if it has one.
    pub async fn current(&self, node: &NodeName) -> Result<Option<Current>, String> {
        let bytes = match &self.dest {
            Destination::Folder(dir) => {
                let file = manifest_file(dir, node);
                match std::fs::read(&file) {
                    Ok(b) => b,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
                }
            }
            Destination::Coordinator(url) => {
                let resp = self
                    .client
                    .get(self.location(node))
                    .send()
                    .await
                    .map_err(|e| {
                        format!("cannot reach the coordinator at {url}: {}", error_chain(&e))
                    })?;
                if resp.status() == reqwest::StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                if !resp.status().is_success() {
                    let status = resp.status();
                    return Err(format!(
                        "the coordinator answered {status} when asked for the current manifest: {}",
                        api_message(resp).await
                    ));
                }
                resp.bytes()
                    .await
                    .map_err(|e| format!("reading the current manifest from {url}: {e}"))?
                    .to_vec()
            }
        };
        current_of(&bytes).map(Some).map_err(|e| {
            format!(
                "the current manifest at {} is unreadable ({e}); remove it to publish anew",
                self.location(node)
            )
        })
    }

    /// Prepares `bytes` as `node`'s next manifest without making it visible.
    pub fn stage(&self, node: &NodeName, bytes: Vec<u8>) -> Result<Staged, String> {
        let temp = match &self.dest {
            Destination::Coordinator(_) => None,
            Destination::Folder(dir) => {
                let file = manifest_file(dir, node);
                Some(
                    write_temp(&file, &bytes)
                        .map_err(|e| format!("cannot write beside {}: {e}", file.display()))?,
                )
            }
        };
        Ok(Staged {
            replaces_issued_at: None,
            node: node.clone(),
            bytes,
            temp,
        })
    }

    /// Makes a staged manifest visible, in one step.
    pub async fn commit(&self, staged: Staged) -> Result<(), String> {
        match &self.dest {
            Destination::Folder(dir) => {
                let file = manifest_file(dir, &staged.node);
                let temp = staged
                    .temp
                    .clone()
                    .expect("a folder delivery stages a file");
                let done = std::fs::rename(&temp, &file).and_then(|()| sync_dir(&file));
                if let Err(e) = done {
                    staged.discard();
                    return Err(format!("cannot replace {}: {e}", file.display()));
                }
                Ok(())
            }
            Destination::Coordinator(url) => {
                let resp = self
                    .client
                    .put(self.location(&staged.node))
                    .header("Content-Type", "application/json")
                    .body(staged.bytes)
                    .send()
                    .await
                    .map_err(|e| {
                        format!("cannot reach the coordinator at {url}: {}", error_chain(&e))
                    })?;
                if resp.status().is_success() {
                    return Ok(());
                }
                let status = resp.status();
                Err(format!(
                    "the coordinator refused the manifest ({status}): {}",
                    api_message(resp).await
                ))
            }
        }
    }
}

/// The `version` inside an envelope's payload (no signature check: only to pick the next).
/// The parts of a destination's current manifest a publish needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Current {
    /// Its version: the next one must be higher.
    pub version: u64,
    /// When it was issued (absent in a manifest too old or odd to say): the publish cadence.
    pub issued_at: Option<roost_common::Timestamp>,
}

fn current_of(bytes: &[u8]) -> Result<Current, String> {
    let env: Envelope = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(env.payload)
        .map_err(|e| format!("payload is not base64: {e}"))?;
    #[derive(serde::Deserialize)]
    struct V {
        version: u64,
        issued_at: Option<serde_json::Value>,
    }
    serde_json::from_slice::<V>(&payload)
        .map(|v| Current {
            version: v.version,
            issued_at: v.issued_at.and_then(|t| serde_json::from_value(t).ok()),
        })
        .map_err(|e| format!("payload has no version: {e}"))
}

/// The coordinator's `{"message": …}`, or the body as text.
async fn api_message(resp: reqwest::Response) -> String {
    let body = resp.text().await.unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or(body)
}

/// reqwest's error with its causes (the top one alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Writes `bytes` to a fresh temp file beside `file` and fsyncs it.
fn write_temp(file: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    use std::io::Write;
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    // A dot-name a static server never serves as `manifest`; unique per call.
    let mut f = tempfile::Builder::new()
        .prefix(".manifest.")
        .suffix(".tmp")
        .tempfile_in(dir)?;
    f.write_all(bytes)?;
    f.as_file().sync_all()?;
    let (_, path) = f.keep().map_err(|e| e.error)?;
    Ok(path)
}

fn sync_dir(file: &Path) -> std::io::Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_common::envelope::Context;

    fn envelope(version: u64) -> Vec<u8> {
        let key = roost_common::SecretKey::generate("t").unwrap();
        Envelope::seal(
            Context::Manifest,
            format!(r#"{{"version":{version}}}"#).as_bytes(),
            &[&key],
        )
        .to_bytes()
    }

    #[tokio::test]
    async fn a_staged_manifest_is_invisible_until_committed() {
        let dir = tempfile::tempdir().unwrap();
        let d = Delivery::new(Destination::Folder(dir.path().into())).unwrap();
        let node: NodeName = "web.prod".parse().unwrap();
        let file = manifest_file(dir.path(), &node);
        let first = envelope(1);
        d.commit(d.stage(&node, first.clone()).unwrap())
            .await
            .unwrap();
        let staged = d.stage(&node, envelope(2)).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), first);
        assert_eq!(d.current_version(&node).await.unwrap(), Some(1));
        d.commit(staged).await.unwrap();
        assert_eq!(d.current_version(&node).await.unwrap(), Some(2));
        let leftovers: Vec<_> = std::fs::read_dir(file.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["manifest"]);
    }

    #[tokio::test]
    async fn a_discarded_stage_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = Delivery::new(Destination::Folder(dir.path().into())).unwrap();
        let node: NodeName = "a".parse().unwrap();
        d.stage(&node, envelope(1)).unwrap().discard();
        let n = std::fs::read_dir(manifest_file(dir.path(), &node).parent().unwrap())
            .unwrap()
            .count();
        assert_eq!(n, 0);
        assert_eq!(d.current_version(&node).await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_unreadable_current_manifest_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let d = Delivery::new(Destination::Folder(dir.path().into())).unwrap();
        let node: NodeName = "a".parse().unwrap();
        let file = manifest_file(dir.path(), &node);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"garbage").unwrap();
        let e = d.current_version(&node).await.unwrap_err();
        assert!(e.contains(&file.display().to_string()), "{e}");
    }
}
