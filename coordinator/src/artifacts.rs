//! Code snapshots and job outputs, as files under the data dir. Every write goes to
//! a temporary file that is synced and renamed, so a crash never leaves half a file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct Artifacts {
    root: PathBuf,
}

static UPLOADS: AtomicU64 = AtomicU64::new(0);

/// Attempt ids come from agents: accept only the shape we hand out (`job-12.3`).
pub fn valid_attempt_id(id: &str) -> bool {
    let Some((job, number)) = id.rsplit_once('.') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    job.strip_prefix("job-").is_some_and(digits) && digits(number)
}

impl Artifacts {
    pub fn new(root: PathBuf) -> Self {
        Artifacts { root }
    }

    async fn write_atomic(path: PathBuf, data: Vec<u8>) -> Result<()> {
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let dir = path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir)?;
            let mut tmp = tempfile_in(dir)?;
            tmp.1.write_all(&data)?;
            tmp.1.sync_all()?;
            std::fs::rename(&tmp.0, &path)?;
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(format!("artifact writer: {e}")))?
        .map_err(|e| Error::Internal(format!("cannot store artifact: {e}")))
    }

    /// Stores a code snapshot; returns its path (kept in the job spec).
    pub async fn put_code(&self, data: Vec<u8>) -> Result<String> {
        let n = UPLOADS.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "{}-{}-{n}.tar.gz",
            crate::model::now_ms(),
            std::process::id()
        );
        let path = self.root.join("code").join(name);
        Self::write_atomic(path.clone(), data).await?;
        Ok(path.to_string_lossy().into_owned())
    }

    /// Keeps a job's uploaded input (a file, or a folder as tar.gz); its path.
    pub async fn put_input(&self, data: Vec<u8>) -> Result<String> {
        self.put_under("inputs", data).await
    }

    /// Keeps a data asset's uploaded content; its path.
    pub async fn put_data(&self, data: Vec<u8>) -> Result<String> {
        self.put_under("data", data).await
    }

    async fn put_under(&self, folder: &str, data: Vec<u8>) -> Result<String> {
        let n = UPLOADS.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{}-{n}", crate::model::now_ms(), std::process::id());
        let path = self.root.join(folder).join(name);
        Self::write_atomic(path.clone(), data).await?;
        Ok(path.to_string_lossy().into_owned())
    }

    fn named_path(&self, attempt_id: &str, instance: u32, name: &str) -> PathBuf {
        self.root
            .join("outputs")
            .join(attempt_id)
            .join(format!("{instance}.named.{name}.tar.gz"))
    }

    /// Keeps what one instance wrote to a named output.
    pub async fn put_named(
        &self,
        attempt_id: &str,
        instance: u32,
        name: &str,
        data: Vec<u8>,
    ) -> Result<()> {
        if !valid_attempt_id(attempt_id) || !valid_output_name(name) {
            return Err(Error::invalid(
                "output_name",
                format!("`{attempt_id}`/`{name}` is not an attempt and output name"),
            ));
        }
        Self::write_atomic(self.named_path(attempt_id, instance, name), data).await
    }

    /// What each instance of an attempt wrote to a named output.
    pub async fn named(
        &self,
        attempt_id: &str,
        instances: u32,
        name: &str,
    ) -> Result<Vec<(u32, Vec<u8>)>> {
        let mut found = Vec::new();
        for instance in 0..instances {
            let path = self.named_path(attempt_id, instance, name);
            match tokio::fs::read(&path).await {
                Ok(data) => found.push((instance, data)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::Internal(format!(
                        "cannot read {}: {e}",
                        path.display()
                    )));
                }
            }
        }
        Ok(found)
    }

    pub async fn read(path: &str) -> Result<Vec<u8>> {
        tokio::fs::read(path)
            .await
            .map_err(|e| Error::Internal(format!("cannot read artifact {path}: {e}")))
    }

    pub async fn discard(path: &str) {
        let _ = tokio::fs::remove_file(path).await;
    }

    fn outputs_path(&self, attempt_id: &str, instance: u32) -> PathBuf {
        self.root
            .join("outputs")
            .join(attempt_id)
            .join(format!("{instance}.tar.gz"))
    }

    pub async fn put_outputs(&self, attempt_id: &str, instance: u32, data: Vec<u8>) -> Result<()> {
        if !valid_attempt_id(attempt_id) {
            return Err(Error::invalid(
                "attempt_id",
                format!("`{attempt_id}` is not an attempt id"),
            ));
        }
        Self::write_atomic(self.outputs_path(attempt_id, instance), data).await
    }

    /// What one instance of an attempt uploaded, if it did.
    pub async fn instance_outputs(
        &self,
        attempt_id: &str,
        instance: u32,
    ) -> Result<Option<Vec<u8>>> {
        let path = self.outputs_path(attempt_id, instance);
        match tokio::fs::read(&path).await {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::Internal(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }

    /// The outputs each instance of an attempt uploaded: (instance, tar.gz).
    pub async fn outputs(&self, attempt_id: &str, instances: u32) -> Result<Vec<(u32, Vec<u8>)>> {
        let mut found = Vec::new();
        for instance in 0..instances {
            if let Some(data) = self.instance_outputs(attempt_id, instance).await? {
                found.push((instance, data));
            }
        }
        Ok(found)
    }
}

impl Artifacts {
    /// Deletes a job's files: its code snapshot, its uploaded inputs and its
    /// attempts' outputs (blocking: call it off the async runtime).
    pub fn remove_job_files(&self, code_paths: &[String], inputs: &[String], attempts: &[String]) {
        // Only the job's own files: a data asset's content (in `data/`) stays.
        let code = code_paths.iter().map(|p| (p.as_str(), "code"));
        let uploaded = inputs.iter().map(|p| (p.as_str(), "inputs"));
        for (path, folder) in code.chain(uploaded) {
            if Path::new(path).starts_with(self.root.join(folder)) {
                let _ = std::fs::remove_file(path);
            }
        }
        for attempt in attempts.iter().filter(|a| valid_attempt_id(a)) {
            let _ = std::fs::remove_dir_all(self.root.join("outputs").join(attempt));
        }
    }
}

/// Output names as job files write them: letters, digits and `_`.
pub fn valid_output_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A file's bytes, or a folder as tar.gz (blocking: call it off the async runtime).
pub fn pack_path(path: &Path) -> Result<Vec<u8>> {
    let io = |e: std::io::Error| Error::Internal(format!("cannot read {}: {e}", path.display()));
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.is_file() {
        return std::fs::read(path).map_err(io);
    }
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    builder.follow_symlinks(false);
    builder.append_dir_all(".", path).map_err(io)?;
    builder.into_inner().map_err(io)?.finish().map_err(io)
}

/// Unpacks a tar.gz into `dest`, made if missing; entries may not leave it
/// (blocking: call it off the async runtime).
pub fn unpack_into(data: &[u8], dest: &Path) -> Result<()> {
    let io =
        |e: std::io::Error| Error::Internal(format!("cannot unpack into {}: {e}", dest.display()));
    std::fs::create_dir_all(dest).map_err(io)?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(data));
    for entry in archive.entries().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        // `unpack_in` refuses paths that would leave `dest`.
        entry.unpack_in(dest).map_err(io)?;
    }
    Ok(())
}

/// A named temporary file next to its final place (same filesystem, so rename is atomic).
fn tempfile_in(dir: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    for attempt in 0..100u32 {
        let n = UPLOADS.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".tmp-{}-{n}-{attempt}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => return Ok((path, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free temporary file name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_attempt_ids_pass() {
        assert!(valid_attempt_id("job-12.3"));
        for bad in [
            "../x.1",
            "job-1",
            "job-.1",
            "job-1.",
            "job-1/2.3",
            "job-a.1",
        ] {
            assert!(!valid_attempt_id(bad), "{bad}");
        }
    }
}
