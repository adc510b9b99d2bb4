//! What `serve` asks of the kernel, seen with strace: acknowledged reports, manifests and cache
//! uploads are fsynced (file and folder) before the answer — a NAR before the answer of the
//! narinfo that names it — so a power loss cannot take back what was acknowledged; and a
//! cache download over plain HTTP goes out with sendfile(2), never read through the process.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use roost_common::SecretKey;

mod support;
use support::{manifest, post_report, put, report, sealed};

const BIN: &str = env!("CARGO_BIN_EXE_roost-coordinator");

/// A fresh folder and publisher key, and `serve` on them under strace (`None`: no strace,
/// and the test is skipped, or fails under CI).
fn traced(trace: &str) -> Option<(tempfile::TempDir, SecretKey, Traced)> {
    if let Err(why) = roost_preflight::tools(&["strace"]) {
        roost_preflight::skip(&why);
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("pub").unwrap();
    let t = Traced::start(dir.path(), trace, &key);
    Some((dir, key, t))
}

/// `serve` running under `strace -f -y`, logging the syscalls in `trace`.
struct Traced {
    strace: Child,
    url: String,
    log: PathBuf,
}

impl Traced {
    fn start(dir: &Path, trace: &str, publisher: &SecretKey) -> Self {
        let public = dir.join("publisher.pub");
        std::fs::write(&public, publisher.public().to_string()).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "upload-token-0123456789").unwrap();
        let log = dir.join("strace.log");
        let mut strace = Command::new("strace")
            .args(["-f", "-qq", "-y", "-e"])
            .arg(format!("trace={trace}"))
            .arg("-o")
            .arg(&log)
            .arg(BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.join("state"))
            .arg("--publisher-key")
            .arg(&public)
            .arg("--upload-token-file")
            .arg(&token)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(strace.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().rsplit("http://").next().unwrap().to_owned();
        Self {
            strace,
            url: format!("http://{addr}"),
            log,
        }
    }

    /// Stops the coordinator (SIGTERM to the traced process) and returns the log.
    fn stop(mut self) -> String {
        let pid = self.strace.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        for child in children.split_whitespace() {
            let _ = Command::new("kill").args(["-TERM", child]).status();
        }
        let _ = self.strace.wait();
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = self.strace.kill();
        let _ = self.strace.wait();
    }
}

/// Completed calls of `syscall` with a descriptor argument of a path for which `path` holds
/// (strace -y prints descriptors as `3</the/path>`).
fn calls(log: &str, syscall: &str, path: impl Fn(&str) -> bool) -> usize {
    let prefix = format!("{syscall}(");
    log.lines()
        .filter(|l| !l.contains("<unfinished"))
        .filter_map(|l| {
            // `PID name(…` with -f.
            let call = l.split_once(' ').map_or(l, |(_, rest)| rest.trim_start());
            call.strip_prefix(&prefix)
        })
        .filter(|args| {
            args.split('<')
                .skip(1)
                .filter_map(|a| a.split_once('>'))
                .any(|(p, _)| path(p))
        })
        .count()
}

fn syncs(log: &str, path: impl Fn(&str) -> bool + Copy) -> usize {
    calls(log, "fsync", path) + calls(log, "fdatasync", path)
}

#[tokio::test]
async fn an_acknowledged_report_is_on_disk_before_the_answer() {
    let node_key = SecretKey::generate("n1").unwrap();
    let Some((_dir, key, t)) = traced("fsync,fdatasync") else {
        return;
    };
    put(
        &t.url,
        "n1",
        sealed(&key, &manifest("n1", 1, Some(&node_key))),
    )
    .await;
    let reports = 10;
    for seq in 1..=reports {
        assert_eq!(
            post_report(&t.url, "n1", report("n1", seq, &node_key, false))
                .await
                .0,
            200
        );
    }
    let log = t.stop();
    let wal = syncs(&log, |p| p.ends_with("coordinator.sqlite-wal"));
    assert!(
        wal >= reports as usize,
        "{reports} reports acknowledged, the report database's log synced {wal} times:\n{log}"
    );
}

#[tokio::test]
async fn an_acknowledged_manifest_is_on_disk_file_and_folder_before_the_answer() {
    let Some((dir, key, t)) = traced("fsync,fdatasync") else {
        return;
    };
    let uploads = 5;
    for v in 1..=uploads {
        assert_eq!(
            put(&t.url, "n1", sealed(&key, &manifest("n1", v, None)))
                .await
                .0,
            200
        );
    }
    let log = t.stop();
    let folder = dir.path().join("state/manifests/v1/nodes/n1");
    let folder = folder.to_str().unwrap();
    let files = syncs(&log, |p| {
        p.strip_prefix(folder)
            .is_some_and(|f| f.starts_with("/.manifest.tmp"))
    });
    let folders = syncs(&log, |p| p == folder);
    assert!(
        files >= uploads as usize && folders >= uploads as usize,
        "{uploads} uploads acknowledged: {files} file and {folders} folder syncs:\n{log}"
    );
}

/// Line numbers (0-based) at which calls of `syscall` on a path for which `path` holds
/// returned: the call's line, or for a call strace shows `<unfinished ...>` (another thread
/// ran meanwhile), its thread's `<... syscall resumed>` line.
fn lines_of(log: &str, syscall: &str, path: impl Fn(&str) -> bool) -> Vec<usize> {
    let lines: Vec<&str> = log.lines().collect();
    let resumed = format!("<... {syscall} resumed>");
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let Some((pid, call)) = l.split_once(' ') else {
            continue;
        };
        let whole = l.replace(" <unfinished ...>", ")");
        if calls(&whole, syscall, &path) == 0 {
            continue;
        }
        if !call.contains("<unfinished") {
            out.push(i);
        } else if let Some(j) = (i + 1..lines.len())
            .find(|&j| lines[j].starts_with(&format!("{pid} ")) && lines[j].contains(&resumed))
        {
            out.push(j);
        }
    }
    out
}

#[tokio::test]
async fn an_acknowledged_narinfo_is_on_disk_with_its_nar_file_and_folders_before_the_answer() {
    // The answers are traced too: each upload's 200 is one write to the socket.
    let Some((dir, _key, t)) = traced("fsync,fdatasync,write,writev,sendto,sendmsg") else {
        return;
    };
    let c = reqwest::Client::new();
    let nar = 3usize << 20;
    let narinfo = format!(
        "StorePath: /nix/store/00000000000000000000000000000000-x\nURL: nar/a.nar\n\
         Compression: none\nFileSize: {nar}\nNarSize: {nar}\n"
    );
    for (file, body) in [
        ("nar/a.nar", vec![7u8; nar]),
        ("nix-cache-info", b"StoreDir: /nix/store\n".to_vec()),
        ("a.narinfo", narinfo.into_bytes()),
    ] {
        let r = c
            .put(format!("{}/cache/{file}", t.url))
            .bearer_auth("upload-token-0123456789")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{file}");
    }
    let log = t.stop();
    let cache = dir.path().join("state/cache");
    let cache = cache.to_str().unwrap();
    let answers: Vec<usize> = log
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("HTTP/1.1 200"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(answers.len(), 3, "three answers written:\n{log}");
    let narinfo_answer = answers[2];
    let before = |lines: Vec<usize>| lines.iter().any(|&l| l < narinfo_answer);
    let synced = |p: &dyn Fn(&str) -> bool| {
        before(lines_of(&log, "fsync", p)) || before(lines_of(&log, "fdatasync", p))
    };
    // The NAR is synced under its final name (it was renamed before its sync).
    let nar_file = format!("{cache}/nar/a.nar");
    let nar_dir = format!("{cache}/nar");
    assert!(
        synced(&|p| p == nar_file),
        "nar/a.nar not synced before the narinfo's answer:\n{log}"
    );
    assert!(
        synced(&|p| p == nar_dir),
        "cache/nar not synced before the narinfo's answer:\n{log}"
    );
    assert!(
        synced(&|p| p.starts_with(cache) && p.contains("/.upload-")),
        "the narinfo's temp file not synced before its answer:\n{log}"
    );
    let top = lines_of(&log, "fsync", |p| p == cache);
    assert!(
        top.iter().filter(|&&l| l < narinfo_answer).count() >= 2,
        "cache/ synced fewer than twice (nix-cache-info, then the narinfo) before the \
         narinfo's answer:\n{log}"
    );
    // Every other file is on disk before its own answer.
    let info_answer = answers[1];
    assert!(
        top.iter().any(|&l| answers[0] < l && l < info_answer),
        "nix-cache-info's folder not synced before its answer:\n{log}"
    );
}

#[tokio::test]
async fn a_plain_http_download_is_sent_with_sendfile_and_never_read_by_the_process() {
    let trace = "read,readv,pread64,preadv,preadv2,sendfile,sendfile64,copy_file_range,splice";
    let Some((dir, _key, t)) = traced(trace) else {
        return;
    };
    let content: Vec<u8> = (0..(24u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("state/cache/nar/big.nar"), &content).unwrap();
    let r = reqwest::get(format!("{}/cache/nar/big.nar", t.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-nix-nar");
    let body = r.bytes().await.unwrap();
    assert!(body == content, "the download differs from the file");
    let log = t.stop();
    let is_nar = |p: &str| p.ends_with("/cache/nar/big.nar");
    let reads: usize = ["read", "readv", "pread64", "preadv", "preadv2"]
        .iter()
        .map(|s| calls(&log, s, is_nar))
        .sum();
    let sent = calls(&log, "sendfile", is_nar) + calls(&log, "sendfile64", is_nar);
    assert_eq!(
        reads, 0,
        "the coordinator read the file itself ({reads} reads)"
    );
    assert!(sent > 0, "no sendfile call on the file");
}
