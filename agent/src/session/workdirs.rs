//! Working folders: `attempts/<attempt>-<instance>`, each made with an empty
//! `outputs/` and `named-outputs/`.
//!
//! On ext4, making those three folders and removing them again after the job
//! cost the agent more than a third of a millisecond a job (`perf record` of
//! `shoal-bench arrays`: `rmdir` evicting and truncating each folder's inode),
//! about a third of all it spends on a `true` job. So a folder that ends
//! exactly as it was made (the same entries, all empty, the same modes and
//! owner) is kept under `spare/` and renamed into place for the next job;
//! anything else is removed as before.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// What every working folder holds when made.
const MADE: [&str; 2] = ["outputs", "named-outputs"];
/// Spares kept at most (more than a node runs at once is of no use).
const KEEP: usize = 256;

pub(super) struct WorkDirs {
    spare_root: PathBuf,
    spares: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
    /// Owner (uid, gid) of a made folder once ready: the run-as user's, or the agent's.
    owner: (u32, u32),
    /// The modes of the first folder made (the folder's, then its subfolders').
    modes: OnceLock<(u32, u32)>,
}

impl WorkDirs {
    /// Spares live in `work_dir/spare`; any left by an earlier agent are removed.
    pub(super) fn new(work_dir: &Path, run_as: Option<(u32, u32)>) -> std::io::Result<Self> {
        let spare_root = work_dir.join("spare");
        match std::fs::remove_dir_all(&spare_root) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::create_dir_all(&spare_root)?;
        let owner = run_as.unwrap_or_else(|| {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        });
        Ok(WorkDirs {
            spare_root,
            spares: Mutex::default(),
            next: AtomicU64::new(0),
            owner,
            modes: OnceLock::new(),
        })
    }

    /// A fresh working folder at `dir` (which must not exist): a spare moved
    /// there where `reuse` (the folder is to have the owner spares have), or one
    /// made.
    pub(super) fn make(&self, dir: &Path, reuse: bool) -> std::io::Result<()> {
        let spare = reuse
            .then(|| self.spares.lock().unwrap_or_else(|p| p.into_inner()).pop())
            .flatten();
        if let Some(spare) = spare {
            if std::fs::rename(&spare, dir).is_ok() {
                return Ok(());
            }
            let _ = std::fs::remove_dir_all(&spare);
        }
        for made in MADE {
            std::fs::create_dir_all(dir.join(made))?;
        }
        if self.modes.get().is_none() {
            let (top, sub) = (
                std::fs::symlink_metadata(dir)?,
                std::fs::symlink_metadata(dir.join(MADE[0]))?,
            );
            let _ = self.modes.set((top.mode(), sub.mode()));
        }
        Ok(())
    }

    /// Done with `dir`: kept as a spare if it is exactly as made (true), or
    /// left for the caller to remove (false). `outputs_empty`: the caller has
    /// just read `outputs/` and found it empty, so it is not read again. Reads at
    /// most a few entries, so it is cheap enough to call on the runtime.
    pub(super) fn keep(&self, dir: &Path, outputs_empty: bool) -> bool {
        if !self.as_made(dir, outputs_empty) {
            return false;
        }
        let mut spares = self.spares.lock().unwrap_or_else(|p| p.into_inner());
        if spares.len() >= KEEP {
            return false;
        }
        let spare = self
            .spare_root
            .join(self.next.fetch_add(1, Ordering::Relaxed).to_string());
        if std::fs::rename(dir, &spare).is_err() {
            return false;
        }
        spares.push(spare);
        true
    }

    fn as_made(&self, dir: &Path, outputs_empty: bool) -> bool {
        let Some(&(top_mode, sub_mode)) = self.modes.get() else {
            return false;
        };
        let is = |path: &Path, mode: u32| {
            std::fs::symlink_metadata(path).is_ok_and(|m| {
                m.file_type().is_dir() && m.mode() == mode && (m.uid(), m.gid()) == self.owner
            })
        };
        let holds = |path: &Path, names: &[&str]| -> bool {
            let Ok(entries) = std::fs::read_dir(path) else {
                return false;
            };
            let mut seen = 0;
            for entry in entries {
                let Ok(entry) = entry else { return false };
                if seen == names.len() || !names.iter().any(|n| entry.file_name() == **n) {
                    return false;
                }
                seen += 1;
            }
            seen == names.len()
        };
        is(dir, top_mode)
            && holds(dir, &MADE)
            && MADE.iter().all(|made| {
                let sub = dir.join(made);
                is(&sub, sub_mode) && ((outputs_empty && *made == "outputs") || holds(&sub, &[]))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dirs() -> (tempfile::TempDir, WorkDirs) {
        let root = tempfile::tempdir().unwrap();
        let dirs = WorkDirs::new(root.path(), None).unwrap();
        (root, dirs)
    }

    #[test]
    fn a_folder_left_as_made_is_used_again() {
        let (root, dirs) = dirs();
        let first = root.path().join("a-0");
        dirs.make(&first, true).unwrap();
        let inode = std::fs::metadata(&first).unwrap().ino();
        assert!(dirs.keep(&first, false));
        assert!(!first.exists());
        let second = root.path().join("b-0");
        dirs.make(&second, true).unwrap();
        assert_eq!(std::fs::metadata(&second).unwrap().ino(), inode);
        for made in MADE {
            assert!(second.join(made).is_dir(), "{made}");
        }
    }

    #[test]
    fn a_folder_the_job_changed_is_not_kept() {
        let (root, dirs) = dirs();
        type Change = (&'static str, fn(&Path));
        let changes: [Change; 5] = [
            ("a file in outputs", |d| {
                std::fs::write(d.join("outputs/x"), "x").unwrap()
            }),
            ("a file beside them", |d| {
                std::fs::write(d.join("x"), "").unwrap()
            }),
            ("a subfolder gone", |d| {
                std::fs::remove_dir(d.join("named-outputs")).unwrap()
            }),
            ("a mode changed", |d| {
                std::fs::set_permissions(d.join("outputs"), std::fs::Permissions::from_mode(0o710))
                    .unwrap()
            }),
            ("a link for a folder", |d| {
                std::fs::remove_dir(d.join("outputs")).unwrap();
                std::os::unix::fs::symlink("/tmp", d.join("outputs")).unwrap();
            }),
        ];
        for (i, (what, change)) in changes.into_iter().enumerate() {
            let dir = root.path().join(format!("j{i}"));
            dirs.make(&dir, true).unwrap();
            change(&dir);
            assert!(!dirs.keep(&dir, false), "kept with {what}");
            assert!(dir.exists(), "{what}: left for the caller to remove");
        }
    }

    #[test]
    fn outputs_found_empty_are_taken_as_such_and_the_rest_still_read() {
        let (root, dirs) = dirs();
        let first = root.path().join("a-0");
        dirs.make(&first, true).unwrap();
        assert!(dirs.keep(&first, true));
        let second = root.path().join("b-0");
        dirs.make(&second, true).unwrap();
        std::fs::write(second.join("named-outputs/x"), "x").unwrap();
        assert!(!dirs.keep(&second, true));
        // A mode changed on outputs/ is seen without reading it.
        let third = root.path().join("c-0");
        dirs.make(&third, true).unwrap();
        std::fs::set_permissions(
            third.join("outputs"),
            std::fs::Permissions::from_mode(0o710),
        )
        .unwrap();
        assert!(!dirs.keep(&third, true));
    }

    #[test]
    fn spares_of_an_earlier_agent_are_removed() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("spare/7/outputs")).unwrap();
        let dirs = WorkDirs::new(root.path(), None).unwrap();
        assert_eq!(
            std::fs::read_dir(root.path().join("spare"))
                .unwrap()
                .count(),
            0
        );
        let dir = root.path().join("a-0");
        dirs.make(&dir, true).unwrap();
        assert!(dir.join("outputs").is_dir());
    }
}
