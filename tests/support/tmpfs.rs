//! A real small filesystem that can be filled: a tmpfs mount, unmounted when
//! dropped. Mounting needs root (as on the CI machines); where the kernel
//! refuses it, [`Tmpfs::mount`] answers `None` and the test says it skipped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs {
    pub dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `"16m"`) on a fresh directory, or
    /// `None` where mounting is not permitted.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("cannot run mount");
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
            let refused = ["permission denied", "not permitted", "must be superuser", "only root"];
            assert!(
                refused.iter().any(|r| err.contains(r)),
                "mount failed for another reason than permissions: {err}"
            );
            return None;
        }
        Some(Tmpfs { dir, _parent: parent })
    }

    /// Fills the filesystem with one file until the kernel answers ENOSPC;
    /// returns its path (delete it to free the space).
    pub fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        for chunk in [1 << 20, 4096, 1] {
            let buf = vec![0xa5u8; chunk];
            // Bounded: at most the whole filesystem, chunk by chunk.
            for _ in 0..(64 << 20) / chunk {
                match f.write_all(&buf) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(28) => break,
                    Err(e) => panic!("filling the tmpfs failed: {e}"),
                }
            }
        }
        let _ = f.sync_all();
        path
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a process being reaped): detach it lazily.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}
