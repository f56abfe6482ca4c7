//! Working folders: `attempts/<attempt>-<instance>`, each made with an empty
//! `outputs/` and `named-outputs/`.
//!
//! On ext4, making those three folders and removing them again after the job
//! cost the agent more than a third of a millisecond a job (`perf record` of
//! `shoal-bench arrays`: `rmdir` evicting and truncating each folder's inode),
//! about a third of all it spends on a `true` job. So a folder that ends
//! exactly as it was made (the same entries, all empty, the same modes and
//! owner) is kept as a spare and renamed into place for the next job; anything
//! else is removed as before. Spares wait beside the jobs' folders, as
//! `.spare-<n>`: a folder renamed within its parent is cheaper than one moved to
//! another (ext4 rewrites a moved folder's `..` and both parents' link counts).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// What every working folder holds when made.
const MADE: [&str; 2] = ["outputs", "named-outputs"];
/// Spares kept at most (more than a node runs at once is of no use).
const KEEP: usize = 256;
/// How a spare's name starts.
const SPARE: &str = ".spare-";

pub(super) struct WorkDirs {
    /// Where the jobs' folders are made, and spares kept.
    root: PathBuf,
    spares: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
    /// Owner (uid, gid) of a made folder once ready: the run-as user's, or the agent's.
    owner: (u32, u32),
    /// The modes of the first folder made (the folder's, then its subfolders').
    modes: OnceLock<(u32, u32)>,
}

impl WorkDirs {
    /// Jobs' folders are made in `root`; spares an earlier agent left there are
    /// removed.
    pub(super) fn new(root: &Path, run_as: Option<(u32, u32)>) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        for entry in std::fs::read_dir(root)? {
            let entry = entry?;
            if entry
                .file_name()
                .as_encoded_bytes()
                .starts_with(SPARE.as_bytes())
            {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        let owner = run_as.unwrap_or_else(|| {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        });
        Ok(WorkDirs {
            root: root.to_path_buf(),
            spares: Mutex::default(),
            next: AtomicU64::new(0),
            owner,
            modes: OnceLock::new(),
        })
    }

    /// A fresh working folder at `dir` (in the root, and not there yet): a spare
    /// renamed there where `reuse` (the folder is to have the owner spares have),
    /// or one made.
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
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let spare = self.root.join(format!("{SPARE}{n}"));
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
                is(&sub, sub_mode) && ((outputs_empty && *made == MADE[0]) || holds(&sub, &[]))
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
    fn a_spare_waits_beside_the_jobs_folders() {
        let (root, dirs) = dirs();
        let first = root.path().join("a-0");
        dirs.make(&first, true).unwrap();
        assert!(dirs.keep(&first, true));
        let names: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [".spare-0"]);
        // Told outputs/ was found empty, it still checks the rest.
        let second = root.path().join("b-0");
        dirs.make(&second, true).unwrap();
        std::fs::write(second.join("named-outputs/x"), "x").unwrap();
        assert!(!dirs.keep(&second, true));
    }

    #[test]
    fn spares_of_an_earlier_agent_are_removed() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join(".spare-7/outputs")).unwrap();
        std::fs::create_dir_all(root.path().join("job-1.1-0/outputs")).unwrap();
        let dirs = WorkDirs::new(root.path(), None).unwrap();
        let names: Vec<_> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["job-1.1-0"], "a job's folder stays");
        let dir = root.path().join("a-0");
        dirs.make(&dir, true).unwrap();
        assert!(dir.join("outputs").is_dir());
    }
}
