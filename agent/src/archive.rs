//! tar.gz in and out: the job's code snapshot is unpacked into its working dir,
//! and its `./outputs` is packed for upload.

use std::path::Path;

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;

/// Unpacks a snapshot; entries that would land outside `dir` are refused by `tar`.
pub fn unpack(data: &[u8], dir: &Path) -> std::io::Result<()> {
    tar::Archive::new(GzDecoder::new(data)).unpack(dir)
}

/// Packs `dir` (its contents, not the folder itself); None when it is empty or absent.
pub fn pack_dir(dir: &Path) -> std::io::Result<Option<Vec<u8>>> {
    if !has_entries(dir)? {
        return Ok(None);
    }
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    builder.follow_symlinks(false);
    builder.append_dir_all(".", dir)?;
    Ok(Some(builder.into_inner()?.finish()?))
}

/// Whether `dir` holds anything (a missing folder holds nothing); one read.
pub fn has_entries(dir: &Path) -> std::io::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Packs a folder's contents, or one file (by its name), as tar.gz.
pub fn pack_path(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    builder.follow_symlinks(false);
    if path.is_dir() {
        builder.append_dir_all(".", path)?;
    } else {
        let name = path.file_name().unwrap_or(path.as_os_str());
        builder.append_path_with_name(path, name)?;
    }
    builder.into_inner()?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_folder() {
        let src = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(src.path().join("sub")).expect("mkdir");
        std::fs::write(src.path().join("sub/model.txt"), "w=0.5\n").expect("write");
        let packed = pack_dir(src.path()).expect("pack").expect("not empty");
        let dst = tempfile::tempdir().expect("tempdir");
        unpack(&packed, dst.path()).expect("unpack");
        let text = std::fs::read_to_string(dst.path().join("sub/model.txt")).expect("read");
        assert_eq!(text, "w=0.5\n");
    }

    #[test]
    fn empty_or_missing_outputs_pack_to_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(pack_dir(dir.path()).expect("pack").is_none());
        assert!(
            pack_dir(&dir.path().join("absent"))
                .expect("pack")
                .is_none()
        );
    }
}
