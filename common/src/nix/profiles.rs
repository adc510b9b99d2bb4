//! Nix profiles on disk: `PROFILE` → `PROFILE-N-link` → store path. Pure filesystem reads and
//! one atomic re-point, so rollback can name an exact generation without calling Nix.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// One generation of a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Its number.
    pub number: u64,
    /// The `PROFILE-N-link` symlink.
    pub link: PathBuf,
    /// The store path it points at.
    pub target: PathBuf,
}

fn split(profile: &Path) -> io::Result<(PathBuf, String)> {
    let dir = profile
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let name = profile
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a profile path", profile.display()),
            )
        })?
        .to_owned();
    Ok((dir, name))
}

/// The generation number in `NAME-N-link`, if `file` is one of `name`'s.
fn generation_number(name: &str, file: &str) -> Option<u64> {
    file.strip_prefix(name)?
        .strip_prefix('-')?
        .strip_suffix("-link")?
        .parse()
        .ok()
}

/// All generations of `profile`, oldest first. A missing folder means none.
pub fn generations(profile: &Path) -> io::Result<Vec<Generation>> {
    let (dir, name) = split(profile)?;
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut gens = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Some(file) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some(number) = generation_number(&name, &file) else {
            continue;
        };
        let link = dir.join(&file);
        let Ok(target) = fs::read_link(&link) else {
            continue;
        };
        gens.push(Generation {
            number,
            link,
            target,
        });
    }
    gens.sort_by_key(|g| g.number);
    Ok(gens)
}

/// The generation `profile` points at now, if any.
pub fn current(profile: &Path) -> io::Result<Option<Generation>> {
    let (dir, name) = split(profile)?;
    let link = match fs::read_link(profile) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(number) = link
        .file_name()
        .and_then(|f| f.to_str())
        .and_then(|f| generation_number(&name, f))
    else {
        // A profile pointing straight into the store (not made by nix-env): no generation.
        return Ok(None);
    };
    let gen_link = dir.join(format!("{name}-{number}-link"));
    let target = fs::read_link(&gen_link)?;
    Ok(Some(Generation {
        number,
        link: gen_link,
        target,
    }))
}

/// Atomically points `profile` at its existing generation `number`.
pub fn switch_to(profile: &Path, number: u64) -> io::Result<()> {
    let (dir, name) = split(profile)?;
    let target = format!("{name}-{number}-link");
    fs::symlink_metadata(dir.join(&target)).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "{}: generation {number} does not exist: {e}",
                profile.display()
            ),
        )
    })?;
    let tmp = dir.join(format!(".{name}.roost-tmp"));
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp)?;
    fs::rename(&tmp, profile)?;
    fs::File::open(&dir)?.sync_all()
}

/// Deletes generation `number` of `profile` (its `NAME-N-link`), as
/// `nix-env --delete-generations N` does: a failed deploy's generation must not stay a
/// garbage-collector root, nor an entry of the boot menu. The current generation is never
/// deleted; one already gone is fine.
pub fn delete_generation(profile: &Path, number: u64) -> io::Result<()> {
    if current(profile)?.is_some_and(|g| g.number == number) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{}: generation {number} is the current one",
                profile.display()
            ),
        ));
    }
    let (dir, name) = split(profile)?;
    match fs::remove_file(dir.join(format!("{name}-{number}-link"))) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => fs::File::open(&dir)?.sync_all(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn fake_profile(dir: &Path) -> PathBuf {
        for n in [1, 2, 10] {
            symlink(
                format!("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-gen{n}"),
                dir.join(format!("system-{n}-link")),
            )
            .unwrap();
        }
        symlink("system-10-link", dir.join("system")).unwrap();
        symlink("/elsewhere", dir.join("system-x-link")).unwrap();
        dir.join("system")
    }

    #[test]
    fn lists_generations_numerically() {
        let d = tempfile::tempdir().unwrap();
        let p = fake_profile(d.path());
        let nums: Vec<u64> = generations(&p).unwrap().iter().map(|g| g.number).collect();
        assert_eq!(nums, vec![1, 2, 10]);
        assert_eq!(current(&p).unwrap().unwrap().number, 10);
    }

    #[test]
    fn switch_to_an_exact_generation() {
        let d = tempfile::tempdir().unwrap();
        let p = fake_profile(d.path());
        switch_to(&p, 1).unwrap();
        let cur = current(&p).unwrap().unwrap();
        assert_eq!(cur.number, 1);
        assert_eq!(
            cur.target,
            PathBuf::from("/nix/store/0123456789abcdfghijklmnpqrsvwxyz-gen1")
        );
    }

    #[test]
    fn switch_to_a_missing_generation_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = fake_profile(d.path());
        assert!(switch_to(&p, 7).is_err());
        assert_eq!(current(&p).unwrap().unwrap().number, 10);
    }

    #[test]
    fn a_missing_profile_has_no_generations() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("nothing/here");
        assert!(generations(&p).unwrap().is_empty());
        assert!(current(&p).unwrap().is_none());
    }

    #[test]
    fn deleting_a_generation_keeps_the_others_and_never_the_current_one() {
        let d = tempfile::tempdir().unwrap();
        let p = fake_profile(d.path());
        switch_to(&p, 2).unwrap();
        delete_generation(&p, 10).unwrap();
        let nums: Vec<u64> = generations(&p).unwrap().iter().map(|g| g.number).collect();
        assert_eq!(nums, vec![1, 2]);
        delete_generation(&p, 10).unwrap();
        assert!(delete_generation(&p, 2).is_err());
        assert_eq!(current(&p).unwrap().unwrap().number, 2);
    }
}
