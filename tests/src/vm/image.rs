//! The guest's disk image: Debian bookworm from Debian's packages (`image.sh`, run once), kept
//! under `target/vm-image/HASH/` where HASH is the hash of the recipe, so reruns reuse it and
//! a changed recipe makes a new one. Each machine boots a copy-on-write overlay of it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context, bail};

/// The recipe: everything that decides what the image holds.
const RECIPE: &str = include_str!("image.sh");

/// A built image: `disk.raw` (ext4, the whole disk), `vmlinuz`, `initrd.img`.
#[derive(Debug)]
pub struct Image {
    /// Its folder.
    pub dir: PathBuf,
}

impl Image {
    /// The image, built if this recipe has none yet. Once per process; across processes a
    /// lock file makes a second builder wait for the first.
    pub fn get() -> anyhow::Result<&'static Image> {
        static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
        IMAGE
            .get_or_init(|| Self::build_or_reuse().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("the VM image could not be built: {e}"))
    }

    /// The root of all images: `target/vm-image`.
    fn root() -> PathBuf {
        // bin() is target/<profile>/NAME.
        let profile_dir = crate::bin("x").parent().expect("profile dir").to_path_buf();
        profile_dir.parent().expect("target dir").join("vm-image")
    }

    fn hash() -> String {
        roost_common::verify::digest(RECIPE.as_bytes())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn build_or_reuse() -> anyhow::Result<Image> {
        let root = Self::root();
        fs::create_dir_all(&root)?;
        let lock = fs::File::create(root.join("lock"))?;
        let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", root.display()))?;
        let hash = Self::hash();
        let dir = root.join(&hash);
        let image = Image { dir: dir.clone() };
        if image.complete() {
            return Ok(image);
        }
        // Images of older recipes are 1 GB each on disk: only the current one is kept.
        for entry in fs::read_dir(&root)? {
            let path = entry?.path();
            if path.is_dir() && path != dir {
                let _ = fs::remove_dir_all(&path);
            }
        }
        let building = root.join(format!("{hash}.building"));
        let _ = fs::remove_dir_all(&building);
        fs::create_dir_all(&building)?;
        let script = building.join("image.sh");
        fs::write(&script, RECIPE)?;
        let log_path = root.join(format!("{hash}.log"));
        let log = fs::File::create(&log_path)?;
        let started = Instant::now();
        eprintln!(
            "vm: building the guest image {hash} with mmdebstrap (log: {})",
            log_path.display()
        );
        let status = Command::new("bash")
            .arg(&script)
            .arg(&building)
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .context("running the image recipe")?;
        if !status.success() {
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            bail!(
                "the image recipe failed ({status}); end of {}:\n{}",
                log_path.display(),
                crate::fleet::tail(&log, 30)
            );
        }
        fs::remove_file(&script)?;
        fs::rename(&building, &dir)?;
        eprintln!("vm: image {hash} built in {:?}", started.elapsed());
        if !image.complete() {
            bail!("the image recipe left {} incomplete", dir.display());
        }
        Ok(image)
    }

    fn complete(&self) -> bool {
        ["disk.raw", "vmlinuz", "initrd.img"]
            .iter()
            .all(|f| self.dir.join(f).is_file())
    }

    /// The whole disk.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk.raw")
    }

    /// The guest's kernel.
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    /// The guest's initrd.
    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initrd.img")
    }

    /// A new copy-on-write overlay of the disk at `path`.
    pub fn overlay(&self, path: &Path) -> anyhow::Result<()> {
        crate::run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(self.disk())
                .arg(path),
        )?;
        Ok(())
    }
}
