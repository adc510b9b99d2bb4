//! The coordinator's state folder: manifests as files in the static layout
//! (`manifests/v1/nodes/{node}/manifest`, written temp + fsync + rename + fsync of the
//! folder, all before the upload is acknowledged) and an embedded SQLite database
//! (`coordinator.sqlite`) for reports, report history, pinned node keys, per-key report
//! sequence floors and last-seen times, committed durably before a report is acknowledged.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use roost_common::wire::v1::http as v1;
use roost_common::{NodeName, PublicKey};
use rusqlite::{Connection, OptionalExtension, params};

/// The manifests' folder in the state folder; below it, the static layout of `publish --out`.
const MANIFESTS: &str = "manifests";

/// Manifests a rollout holds back, in the same layout: not served until their wave is.
const STAGED: &str = "staged";

/// The current rollout's state (docs/protocol.md §8.2).
const ROLLOUT_FILE: &str = "rollout.json";

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
    /// A group commit of reports failed (the message is for the log).
    #[error("report database: {message}")]
    Commit {
        /// Whether the disk is full.
        disk_full: bool,
        /// What failed.
        message: String,
    },
    /// The report database could not be opened at start (damaged, say): the coordinator
    /// serves manifests and the cache without it.
    #[error("the report database is unavailable: {0}")]
    ReportsUnavailable(String),
}

impl StoreError {
    /// Whether the write failed because the disk (or the quota) is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Io { source: e, .. } | StoreError::Write(e) => is_disk_full(e),
            StoreError::Db(rusqlite::Error::SqliteFailure(e, _)) => {
                e.code == rusqlite::ErrorCode::DiskFull
            }
            StoreError::Commit { disk_full, .. } => *disk_full,
            _ => false,
        }
    }
}

/// Whether an I/O error says the disk or the quota is full.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
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

/// Who pinned a node's key: its first report (trust on first use) or an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinSource {
    /// The first report that named its own key.
    FirstUse,
    /// `roost-coordinator node-key` (or the API behind it).
    Operator,
}

impl PinSource {
    /// The name stored and shown in `/v1/fleet` (`key_source`).
    pub fn as_str(self) -> &'static str {
        match self {
            PinSource::FirstUse => "tofu",
            PinSource::Operator => "pinned",
        }
    }
}

/// A node's stored report summary.
#[derive(Debug, Clone)]
pub struct NodeRecord {
    /// The node.
    pub node: String,
    /// Key pinned on first use or by an operator, for when the manifest names none.
    pub pinned_key: Option<String>,
    /// Who pinned it.
    pub pin_source: Option<PinSource>,
    /// `seq` of the last report received.
    pub last_seq: Option<u64>,
    /// Unix seconds of the last report.
    pub last_seen: Option<u64>,
    /// The last report's payload (JSON).
    pub last_report: Option<String>,
    /// The last report refusing a manifest (state `rejected`): unix seconds and payload.
    pub last_rejection: Option<(u64, String)>,
    /// The source revision and dirtiness of the manifest version the last report is about,
    /// when this coordinator stored that version.
    pub reported_source: Option<(Option<String>, bool)>,
}

/// The key a report was verified with, and what that says about the node's pin.
#[derive(Debug, Clone, Copy)]
pub enum Signer<'a> {
    /// The manifest's `node_key`: the pin plays no part.
    Manifest(&'a str),
    /// The key pinned for the node when the report was checked; refused if the pin has
    /// changed since.
    Pinned(&'a str),
    /// No key was pinned: this one, named by the report itself, is pinned now, unless
    /// another was pinned in the meantime.
    FirstUse(&'a str),
}

impl Signer<'_> {
    fn key(&self) -> &str {
        match *self {
            Signer::Manifest(k) | Signer::Pinned(k) | Signer::FirstUse(k) => k,
        }
    }
}

/// A verified report to record.
#[derive(Debug, Clone, Copy)]
pub struct NewReport<'a> {
    /// The node.
    pub node: &'a str,
    /// Its sequence number (at most `i64::MAX`, what SQLite stores).
    pub seq: u64,
    /// Its state (wire name).
    pub state: &'a str,
    /// The manifest version it is about.
    pub manifest_version: Option<u64>,
    /// The payload as received (JSON).
    pub payload: &'a str,
    /// Unix seconds of receipt.
    pub received_at: u64,
    /// The key (`NAME:BASE64`) it verified with.
    pub signer: Signer<'a>,
}

/// Why a verified report was not recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Its `seq` is not above the highest one received with the same key.
    Seq {
        /// That highest seq.
        last: u64,
    },
    /// The node's pinned key changed while the report was being checked (another first
    /// report won the pin, or an operator replaced it).
    PinChanged,
}

/// The state folder.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// The report database, or why it could not be opened at start.
    db: Result<Db, String>,
    /// Reports waiting for the next group commit.
    pending: Mutex<Vec<Job>>,
}

/// Two connections to the report database: one writes, one reads, so a reader (every report
/// first reads its node's record) does not wait behind a commit's sync (WAL lets a reader
/// see the last commit while the next is written).
#[derive(Debug)]
struct Db {
    write: Mutex<Connection>,
    read: Mutex<Connection>,
}

/// The report database's schema; `node_keys` keeps each key's highest `seq` for good, so a
/// key that signs again after a rotation (A, B, A) cannot replay its old reports.
const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS nodes (
        node TEXT PRIMARY KEY, pinned_key TEXT, last_seq INTEGER, last_seen INTEGER,
        last_report TEXT, last_signer TEXT);
    CREATE TABLE IF NOT EXISTS reports (
        id INTEGER PRIMARY KEY, node TEXT NOT NULL, seq INTEGER NOT NULL,
        received_at INTEGER NOT NULL, state TEXT NOT NULL, manifest_version INTEGER,
        payload TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS reports_by_node ON reports (node, id);
    CREATE TABLE IF NOT EXISTS node_keys (
        node TEXT NOT NULL, key TEXT NOT NULL, last_seq INTEGER NOT NULL,
        PRIMARY KEY (node, key)) WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS versions (
        node TEXT NOT NULL, version INTEGER NOT NULL, rev TEXT, dirty INTEGER NOT NULL,
        stored_at INTEGER NOT NULL, PRIMARY KEY (node, version)) WITHOUT ROWID;";

/// How many manifest versions' sources are kept per node (to name the revision a node
/// reports running).
const KEPT_VERSIONS: u32 = 100;

/// The columns of a [`NodeRecord`], in `row_to_record`'s order; the reported version's
/// source comes from `versions`.
const RECORD_COLUMNS: &str = "nodes.node, pinned_key, pin_source, last_seq, last_seen,
    last_report, last_rejected_at, last_rejection, v.rev, v.dirty
    FROM nodes LEFT JOIN versions v ON v.node = nodes.node
        AND v.version = json_extract(nodes.last_report, '$.manifest_version')";

/// Opens the report database: WAL, and `synchronous = FULL` so a commit is on disk (the WAL
/// fsynced) before the report is acknowledged; `NORMAL` could lose the last commits on
/// power loss.
fn open_db(path: &Path) -> Result<Connection, rusqlite::Error> {
    let db = Connection::open(path)?;
    db.busy_timeout(std::time::Duration::from_secs(10))?;
    db.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")?;
    db.execute_batch(SCHEMA)?;
    let has_pin_source = db.prepare("SELECT pin_source FROM nodes LIMIT 0").is_ok();
    if !has_pin_source {
        db.execute_batch(
            "ALTER TABLE nodes ADD COLUMN pin_source TEXT;
             UPDATE nodes SET pin_source = 'tofu' WHERE pinned_key IS NOT NULL;",
        )?;
    }
    let has_rejection = db
        .prepare("SELECT last_rejection FROM nodes LIMIT 0")
        .is_ok();
    if !has_rejection {
        db.execute_batch(
            "ALTER TABLE nodes ADD COLUMN last_rejected_at INTEGER;
             ALTER TABLE nodes ADD COLUMN last_rejection TEXT;",
        )?;
    }
    // Databases from before `node_keys`: each node's last signer keeps its floor.
    db.execute(
        "INSERT OR IGNORE INTO node_keys (node, key, last_seq)
         SELECT node, last_signer, last_seq FROM nodes
         WHERE last_signer IS NOT NULL AND last_seq IS NOT NULL",
        [],
    )?;
    // Reads a page of each table: a file that is not a database fails here, at start.
    db.query_row(
        "SELECT count(*) FROM (SELECT 1 FROM nodes LIMIT 1)",
        [],
        |_| Ok(()),
    )?;
    db.query_row(
        "SELECT count(*) FROM (SELECT 1 FROM reports LIMIT 1)",
        [],
        |_| Ok(()),
    )?;
    Ok(db)
}

impl Store {
    /// Opens (creating when needed) the state folder. A report database that cannot be
    /// opened does not stop it: that is logged, and report calls answer
    /// [`StoreError::ReportsUnavailable`] until it is repaired or moved aside.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root.join(MANIFESTS).join(v1::nodes_dir())).map_err(io(root))?;
        std::fs::create_dir_all(root.join("cache/nar")).map_err(io(root))?;
        let path = root.join("coordinator.sqlite");
        let db = open_db(&path)
            .and_then(|write| {
                let read = Connection::open(&path)?;
                read.busy_timeout(std::time::Duration::from_secs(10))?;
                Ok(Db {
                    write: Mutex::new(write),
                    read: Mutex::new(read),
                })
            })
            .map_err(|e| {
                tracing::error!(
                    "the report database {} cannot be used ({e}): serving manifests and the \
                 cache without it; reports are refused with 503 (agents keep them queued) \
                 until it is repaired, or moved aside with its -wal and -shm files and the \
                 coordinator restarted (which starts an empty one: report history, pinned \
                 node keys and report sequence floors start over)",
                    path.display()
                );
                e.to_string()
            });
        Ok(Self {
            root: root.to_owned(),
            db,
            pending: Mutex::new(Vec::new()),
        })
    }

    /// The state folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the report database is in use (it could be opened at start).
    pub fn reports_available(&self) -> bool {
        self.db.is_ok()
    }

    /// The binary cache folder.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// Where `node`'s manifest lives.
    pub fn manifest_path(&self, node: &NodeName) -> PathBuf {
        self.root.join(MANIFESTS).join(v1::manifest_file(node))
    }

    /// Every stored manifest that can be read: (node, envelope bytes). A folder that is not
    /// a node name or a manifest that cannot be read is logged and skipped; only an
    /// unreadable manifests folder is an error.
    pub fn load_manifests(&self) -> Result<Vec<(NodeName, Vec<u8>)>, StoreError> {
        self.load_layout(MANIFESTS)
    }

    /// Every manifest a rollout holds back, as [`Store::load_manifests`] reads them.
    pub fn load_staged(&self) -> Result<Vec<(NodeName, Vec<u8>)>, StoreError> {
        match self.root.join(STAGED).join(v1::nodes_dir()).exists() {
            true => self.load_layout(STAGED),
            false => Ok(Vec::new()),
        }
    }

    /// Where `node`'s held-back manifest lives.
    pub fn staged_path(&self, node: &NodeName) -> PathBuf {
        self.root.join(STAGED).join(v1::manifest_file(node))
    }

    /// Stores a manifest its rollout holds back, atomically.
    pub fn save_staged(&self, node: &NodeName, bytes: &[u8]) -> Result<(), StoreError> {
        write_atomic(&self.staged_path(node), bytes)
    }

    /// Forgets `node`'s held-back manifest (served now, or replaced by a newer upload). A
    /// crash before this leaves a file that the next start drops as no newer than what is
    /// served.
    pub fn remove_staged(&self, node: &NodeName) -> Result<(), StoreError> {
        let path = self.staged_path(node);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
            _ => Ok(()),
        }
    }

    /// The saved rollout state, when there is one.
    pub fn load_rollout(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.root.join(ROLLOUT_FILE);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Saves the rollout state atomically.
    pub fn save_rollout(&self, bytes: &[u8]) -> Result<(), StoreError> {
        write_atomic(&self.root.join(ROLLOUT_FILE), bytes)
    }

    fn load_layout(&self, folder: &str) -> Result<Vec<(NodeName, Vec<u8>)>, StoreError> {
        let dir = self.root.join(folder).join(v1::nodes_dir());
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name();
            let Some(node) = name.to_str().and_then(|n| n.parse::<NodeName>().ok()) else {
                tracing::warn!("ignoring {}: not a node name", e.path().display());
                continue;
            };
            let path = e.path().join("manifest");
            match std::fs::read(&path) {
                Ok(bytes) => out.push((node, bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::error!(
                    %node,
                    "cannot read the stored manifest {}: {e}; serving none for the node until \
                     the publisher uploads one",
                    path.display()
                ),
            }
        }
        Ok(out)
    }

    /// Stores `node`'s manifest atomically. On failure nothing is left behind: no temp
    /// file, and no empty folder for a node that had none.
    pub fn save_manifest(&self, node: &NodeName, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.manifest_path(node);
        let dir = path.parent().expect("a manifest has a folder");
        let new_dir = !dir.exists();
        let r = write_atomic(&path, bytes);
        if r.is_err() && new_dir {
            let _ = std::fs::remove_dir(dir);
        }
        r
    }

    /// The connection that writes.
    fn db(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.connection(|db| &db.write)
    }

    /// The connection that reads.
    fn reader(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.connection(|db| &db.read)
    }

    fn connection(
        &self,
        which: impl FnOnce(&Db) -> &Mutex<Connection>,
    ) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        match &self.db {
            Ok(db) => Ok(which(db).lock().unwrap_or_else(|p| p.into_inner())),
            Err(why) => Err(StoreError::ReportsUnavailable(why.clone())),
        }
    }

    /// The node's report record.
    pub fn node(&self, node: &str) -> Result<Option<NodeRecord>, StoreError> {
        Ok(self
            .reader()?
            .query_row(
                &format!("SELECT {RECORD_COLUMNS} WHERE nodes.node = ?1"),
                [node],
                row_to_record,
            )
            .optional()?)
    }

    /// Every node's report record.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let db = self.reader()?;
        let mut st = db.prepare(&format!("SELECT {RECORD_COLUMNS} ORDER BY nodes.node"))?;
        let rows = st
            .query_map([], row_to_record)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Records a verified report durably, unless its `seq` is not above the highest one ever
    /// received with the same key, or the pin it relied on changed. A key never seen for the
    /// node (a reinstalled node's) starts its own sequence.
    ///
    /// Group commit: the report is queued, and whichever caller holds the database next
    /// commits every queued report in one transaction, so one sync of the log serves all the
    /// reports that arrived meanwhile. Each returns once the commit holding it is on disk.
    pub fn add_report(&self, r: &NewReport<'_>) -> Result<Result<(), Refused>, StoreError> {
        if let Err(why) = &self.db {
            return Err(StoreError::ReportsUnavailable(why.clone()));
        }
        let (done, result) = std::sync::mpsc::sync_channel(1);
        self.queue().push(Job {
            report: OwnedReport::from(r),
            done,
        });
        {
            let mut db = self.db()?;
            let jobs = std::mem::take(&mut *self.queue());
            if !jobs.is_empty() {
                commit_reports(&mut db, jobs);
            }
        }
        result.recv().unwrap_or_else(|_| {
            Err(StoreError::Commit {
                disk_full: false,
                message: "the thread committing the report stopped".into(),
            })
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Job>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pins `key` as the node's key (an operator's choice; `None` clears the pin, so the
    /// next report pins its own key again). Every key's `seq` floor is kept. Returns the key
    /// pinned before.
    pub fn set_pin(
        &self,
        node: &str,
        key: Option<&PublicKey>,
    ) -> Result<Option<String>, StoreError> {
        let mut db = self.db()?;
        let tx = db.transaction()?;
        let before = pinned_key(&tx, node)?;
        let key = key.map(ToString::to_string);
        tx.execute(
            "INSERT INTO nodes (node, pinned_key, pin_source) VALUES (?1, ?2, CASE WHEN ?2 IS NULL THEN NULL ELSE 'pinned' END)
             ON CONFLICT(node) DO UPDATE SET pinned_key = excluded.pinned_key, pin_source = excluded.pin_source",
            params![node, key],
        )?;
        tx.commit()?;
        Ok(before)
    }

    /// Remembers the source of `node`'s manifest `version` (stored just now), keeping the
    /// newest [`KEPT_VERSIONS`] per node.
    pub fn record_version(
        &self,
        node: &str,
        version: u64,
        rev: Option<&str>,
        dirty: bool,
        stored_at: u64,
    ) -> Result<(), StoreError> {
        let db = self.db()?;
        db.execute(
            "INSERT OR REPLACE INTO versions (node, version, rev, dirty, stored_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![node, version, rev, dirty, stored_at],
        )?;
        db.execute(
            "DELETE FROM versions WHERE node = ?1 AND version NOT IN
             (SELECT version FROM versions WHERE node = ?1 ORDER BY version DESC LIMIT ?2)",
            params![node, KEPT_VERSIONS],
        )?;
        Ok(())
    }

    /// The node's report history, newest first.
    pub fn history(&self, node: &str, limit: u32) -> Result<Vec<String>, StoreError> {
        let db = self.reader()?;
        let mut st =
            db.prepare("SELECT payload FROM reports WHERE node = ?1 ORDER BY id DESC LIMIT ?2")?;
        let rows = st
            .query_map(params![node, limit], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

/// What a report's answer waits for.
type Outcome = Result<Result<(), Refused>, StoreError>;

/// A report waiting for the next group commit.
struct Job {
    report: OwnedReport,
    done: std::sync::mpsc::SyncSender<Outcome>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Job({} #{})", self.report.node, self.report.seq)
    }
}

/// A [`NewReport`] that can wait in the queue for another thread to commit it.
#[derive(Debug)]
struct OwnedReport {
    node: String,
    seq: u64,
    state: String,
    manifest_version: Option<u64>,
    payload: String,
    received_at: u64,
    key: String,
    /// `Pinned` or `FirstUse` (see [`Signer`]); `None` for the manifest's key.
    pin: Option<PinCheck>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PinCheck {
    Pinned,
    FirstUse,
}

impl From<&NewReport<'_>> for OwnedReport {
    fn from(r: &NewReport<'_>) -> Self {
        let pin = match r.signer {
            Signer::Manifest(_) => None,
            Signer::Pinned(_) => Some(PinCheck::Pinned),
            Signer::FirstUse(_) => Some(PinCheck::FirstUse),
        };
        Self {
            node: r.node.to_owned(),
            seq: r.seq,
            state: r.state.to_owned(),
            manifest_version: r.manifest_version,
            payload: r.payload.to_owned(),
            received_at: r.received_at,
            key: r.signer.key().to_owned(),
            pin,
        }
    }
}

/// Commits `jobs` in one transaction, each in a savepoint of its own (a refused or failed
/// report leaves the others alone), and tells each caller its outcome.
fn commit_reports(db: &mut Connection, jobs: Vec<Job>) {
    let outcomes = (|| -> rusqlite::Result<Vec<Outcome>> {
        let mut tx = db.transaction()?;
        let mut out = Vec::with_capacity(jobs.len());
        for j in &jobs {
            let sp = tx.savepoint()?;
            match insert_report(&sp, &j.report) {
                Ok(Ok(())) => {
                    sp.commit()?;
                    out.push(Ok(Ok(())));
                }
                // Dropping the savepoint rolls it back.
                Ok(Err(refused)) => out.push(Ok(Err(refused))),
                Err(e) => out.push(Err(StoreError::Db(e))),
            }
        }
        tx.commit()?;
        Ok(out)
    })();
    match outcomes {
        Ok(out) => {
            for (j, o) in jobs.into_iter().zip(out) {
                let _ = j.done.send(o);
            }
        }
        Err(e) => {
            let message = format!("committing {} report(s) failed: {e}", jobs.len());
            let disk_full = StoreError::Db(e).is_disk_full();
            tracing::error!(disk_full, "report database: {message}");
            for j in jobs {
                let _ = j.done.send(Err(StoreError::Commit {
                    disk_full,
                    message: message.clone(),
                }));
            }
        }
    }
}

/// One report's checks and rows, inside the caller's transaction.
fn insert_report(db: &Connection, r: &OwnedReport) -> rusqlite::Result<Result<(), Refused>> {
    let (node, key) = (r.node.as_str(), r.key.as_str());
    let pinned = pinned_key(db, node)?;
    let pin_holds = match r.pin {
        None => true,
        Some(PinCheck::Pinned) => pinned.as_deref() == Some(key),
        Some(PinCheck::FirstUse) => pinned.as_deref().is_none_or(|p| p == key),
    };
    if !pin_holds {
        return Ok(Err(Refused::PinChanged));
    }
    let floor: Option<u64> = db
        .query_row(
            "SELECT last_seq FROM node_keys WHERE node = ?1 AND key = ?2",
            [node, key],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(last) = floor.filter(|&last| r.seq <= last) {
        return Ok(Err(Refused::Seq { last }));
    }
    db.execute(
        "INSERT INTO reports (node, seq, received_at, state, manifest_version, payload)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            node,
            r.seq,
            r.received_at,
            r.state,
            r.manifest_version,
            r.payload
        ],
    )?;
    db.execute(
        "INSERT INTO node_keys (node, key, last_seq) VALUES (?1, ?2, ?3)
         ON CONFLICT(node, key) DO UPDATE SET last_seq = excluded.last_seq",
        params![node, key, r.seq],
    )?;
    let pin = (r.pin == Some(PinCheck::FirstUse)).then_some(key);
    db.execute(
        "INSERT INTO nodes (node, pinned_key, pin_source, last_seq, last_seen, last_report, last_signer)
         VALUES (?1, ?2, CASE WHEN ?2 IS NULL THEN NULL ELSE 'tofu' END, ?3, ?4, ?5, ?6)
         ON CONFLICT(node) DO UPDATE SET
           pin_source = CASE WHEN nodes.pinned_key IS NULL THEN excluded.pin_source ELSE nodes.pin_source END,
           pinned_key = COALESCE(nodes.pinned_key, excluded.pinned_key),
           last_seq = excluded.last_seq, last_seen = excluded.last_seen,
           last_report = excluded.last_report, last_signer = excluded.last_signer",
        params![node, pin, r.seq, r.received_at, r.payload, key],
    )?;
    if r.state == "rejected" {
        db.execute(
            "UPDATE nodes SET last_rejected_at = ?2, last_rejection = ?3 WHERE node = ?1",
            params![node, r.received_at, r.payload],
        )?;
    }
    Ok(Ok(()))
}

fn pinned_key(tx: &Connection, node: &str) -> rusqlite::Result<Option<String>> {
    Ok(tx
        .query_row(
            "SELECT pinned_key FROM nodes WHERE node = ?1",
            [node],
            |r| r.get(0),
        )
        .optional()?
        .flatten())
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRecord> {
    let source: Option<String> = r.get(2)?;
    Ok(NodeRecord {
        node: r.get(0)?,
        pinned_key: r.get(1)?,
        pin_source: source.map(|s| match s.as_str() {
            "pinned" => PinSource::Operator,
            _ => PinSource::FirstUse,
        }),
        last_seq: r.get(3)?,
        last_seen: r.get(4)?,
        last_report: r.get(5)?,
        last_rejection: match (r.get::<_, Option<u64>>(6)?, r.get::<_, Option<String>>(7)?) {
            (Some(at), Some(payload)) => Some((at, payload)),
            _ => None,
        },
        reported_source: match r.get::<_, Option<bool>>(9)? {
            Some(dirty) => Some((r.get(8)?, dirty)),
            None => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_report<'a>(node: &'a str, seq: u64, key: &'a str) -> NewReport<'a> {
        NewReport {
            node,
            seq,
            state: "success",
            manifest_version: Some(1),
            payload: "{}",
            received_at: 1,
            signer: Signer::Manifest(key),
        }
    }

    #[test]
    fn reports_committed_together_keep_their_own_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let node = format!("n{t}");
                    (1..=40u64)
                        .map(|seq| {
                            // Every fifth report repeats the seq before it: refused.
                            let seq = if seq % 5 == 0 { seq - 1 } else { seq };
                            store.add_report(&new_report(&node, seq, "k:A")).unwrap()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for (t, h) in threads.into_iter().enumerate() {
            let outcomes = h.join().unwrap();
            for (i, o) in outcomes.iter().enumerate() {
                let seq = i as u64 + 1;
                let want = if seq % 5 == 0 {
                    Err(Refused::Seq { last: seq - 1 })
                } else {
                    Ok(())
                };
                assert_eq!(*o, want, "node n{t}, report {seq}");
            }
            let rec = store.node(&format!("n{t}")).unwrap().unwrap();
            assert_eq!(rec.last_seq, Some(39));
            assert_eq!(store.history(&format!("n{t}"), 100).unwrap().len(), 32);
        }
    }
}
