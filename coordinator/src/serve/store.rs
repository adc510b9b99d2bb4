//! The coordinator's state folder: manifests as files in the static layout
//! (`manifests/v1/nodes/{node}/manifest`, written temp + fsync + rename) and an embedded
//! SQLite database for reports, report history, pinned node keys and last-seen times.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use roost_common::wire::v1::http as v1;
use roost_common::{NodeName, PublicKey};
use rusqlite::{Connection, OptionalExtension, params};

/// The manifests' folder in the state folder; below it, the static layout of `publish --out`.
const MANIFESTS: &str = "manifests";

/// What can go wrong with the state folder.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File system trouble.
    #[error("{path}: {source}")]
    Io {
        /// Where.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// An atomic write failed (the message names the file).
    #[error(transparent)]
    Write(std::io::Error),
    /// SQLite trouble.
    #[error("report database: {0}")]
    Db(#[from] rusqlite::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync of the folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    roost_common::fs::write_atomic(path, bytes).map_err(StoreError::Write)
}

/// A node's stored report summary.
#[derive(Debug, Clone)]
pub struct NodeRecord {
    /// The node.
    pub node: String,
    /// Key pinned on first use, when the manifest names none.
    pub pinned_key: Option<String>,
    /// Highest report `seq` received.
    pub last_seq: Option<u64>,
    /// Unix seconds of the last report.
    pub last_seen: Option<u64>,
    /// The last report's payload (JSON).
    pub last_report: Option<String>,
}

/// A verified report to record.
#[derive(Debug, Clone, Copy)]
pub struct NewReport<'a> {
    /// The node.
    pub node: &'a str,
    /// Its sequence number.
    pub seq: u64,
    /// Its state (wire name).
    pub state: &'a str,
    /// The manifest version it is about.
    pub manifest_version: Option<u64>,
    /// The payload as received (JSON).
    pub payload: &'a str,
    /// Unix seconds of receipt.
    pub received_at: u64,
    /// A key to pin on first use.
    pub pin: Option<&'a PublicKey>,
    /// The key the report verified with (`NAME:BASE64`).
    pub signer: &'a str,
}

/// A report whose `seq` is not above the last one received from the same key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRefused {
    /// The highest seq received.
    pub last: u64,
}

/// The state folder.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    db: Mutex<Connection>,
}

impl Store {
    /// Opens (creating when needed) the state folder.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root.join(MANIFESTS).join(v1::nodes_dir())).map_err(io(root))?;
        std::fs::create_dir_all(root.join("cache/nar")).map_err(io(root))?;
        let db = Connection::open(root.join("coordinator.sqlite"))?;
        db.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS nodes (
                node TEXT PRIMARY KEY, pinned_key TEXT, last_seq INTEGER, last_seen INTEGER, last_report TEXT,
                last_signer TEXT);
             CREATE TABLE IF NOT EXISTS reports (
                id INTEGER PRIMARY KEY, node TEXT NOT NULL, seq INTEGER NOT NULL,
                received_at INTEGER NOT NULL, state TEXT NOT NULL, manifest_version INTEGER,
                payload TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS reports_by_node ON reports (node, id);",
        )?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Self {
            root: root.to_owned(),
            db: Mutex::new(db),
        })
    }

    /// The state folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The binary cache folder.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// Where `node`'s manifest lives.
    pub fn manifest_path(&self, node: &NodeName) -> PathBuf {
        self.root.join(MANIFESTS).join(v1::manifest_file(node))
    }

    /// Every stored manifest: (node, envelope bytes).
    pub fn load_manifests(&self) -> Result<Vec<(NodeName, Vec<u8>)>, StoreError> {
        let dir = self.root.join(MANIFESTS).join(v1::nodes_dir());
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let Some(node) = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<NodeName>().ok())
            else {
                continue;
            };
            let path = e.path().join("manifest");
            match std::fs::read(&path) {
                Ok(bytes) => out.push((node, bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        Ok(out)
    }

    /// Stores `node`'s manifest atomically.
    pub fn save_manifest(&self, node: &NodeName, bytes: &[u8]) -> Result<(), StoreError> {
        write_atomic(&self.manifest_path(node), bytes)
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node's report record.
    pub fn node(&self, node: &str) -> Result<Option<NodeRecord>, StoreError> {
        Ok(self
            .db()
            .query_row("SELECT node, pinned_key, last_seq, last_seen, last_report FROM nodes WHERE node = ?1", [node], row_to_record)
            .optional()?)
    }

    /// Every node's report record.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let db = self.db();
        let mut st = db.prepare(
            "SELECT node, pinned_key, last_seq, last_seen, last_report FROM nodes ORDER BY node",
        )?;
        let rows = st
            .query_map([], row_to_record)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Records a verified report in one transaction, unless its `seq` is not above the last
    /// one from the same key. A new key (the manifest's `node_key` changed, e.g. a
    /// reinstalled node) starts a new sequence. Pins `r.pin` as the node's key when given.
    pub fn add_report(&self, r: &NewReport<'_>) -> Result<Result<(), SeqRefused>, StoreError> {
        let NewReport {
            node,
            seq,
            state,
            manifest_version,
            payload,
            received_at: now,
            pin,
            signer,
        } = *r;
        let mut db = self.db();
        let tx = db.transaction()?;
        let last: Option<(Option<u64>, Option<String>)> = tx
            .query_row(
                "SELECT last_seq, last_signer FROM nodes WHERE node = ?1",
                [node],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if let Some((Some(last), last_signer)) = last {
            let same_key = last_signer.as_deref().is_none_or(|k| k == signer);
            if same_key && seq <= last {
                return Ok(Err(SeqRefused { last }));
            }
        }
        tx.execute(
            "INSERT INTO reports (node, seq, received_at, state, manifest_version, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![node, seq, now, state, manifest_version, payload],
        )?;
        tx.execute(
            "INSERT INTO nodes (node, pinned_key, last_seq, last_seen, last_report, last_signer) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(node) DO UPDATE SET pinned_key = COALESCE(nodes.pinned_key, excluded.pinned_key),
               last_seq = excluded.last_seq, last_seen = excluded.last_seen, last_report = excluded.last_report,
               last_signer = excluded.last_signer",
            params![node, pin.map(|k| k.to_string()), seq, now, payload, signer],
        )?;
        tx.commit()?;
        Ok(Ok(()))
    }

    /// The node's report history, newest first.
    pub fn history(&self, node: &str, limit: u32) -> Result<Vec<String>, StoreError> {
        let db = self.db();
        let mut st =
            db.prepare("SELECT payload FROM reports WHERE node = ?1 ORDER BY id DESC LIMIT ?2")?;
        let rows = st
            .query_map(params![node, limit], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRecord> {
    Ok(NodeRecord {
        node: r.get(0)?,
        pinned_key: r.get(1)?,
        last_seq: r.get(2)?,
        last_seen: r.get(3)?,
        last_report: r.get(4)?,
    })
}
