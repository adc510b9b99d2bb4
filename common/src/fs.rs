//! Crash-safe files: the one atomic write both programs use for their state folders.

use std::io::Write;
use std::path::Path;

fn with_path(path: &Path, e: std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Writes `bytes` to `path` atomically: a temp file in the same folder, fsync, rename, fsync
/// of the folder. A crash at any moment leaves the old content or the new, never a mix.
/// Errors name the file they concern.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| with_path(dir, e))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|f| f.to_str()).unwrap_or("f"),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp).map_err(|e| with_path(&tmp, e))?;
    f.write_all(bytes).map_err(|e| with_path(&tmp, e))?;
    f.sync_all().map_err(|e| with_path(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| with_path(path, e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| with_path(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_content_and_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(d.path().join("sub")).unwrap().count(), 1);
    }

    #[test]
    fn an_error_names_the_file() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("file"), "x").unwrap();
        let e = write_atomic(&d.path().join("file/inside"), b"x").unwrap_err();
        assert!(e.to_string().contains("file"), "{e}");
    }
}
