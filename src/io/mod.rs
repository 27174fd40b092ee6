//! Files the library writes and reads: checkpoints (safetensors), PNG grids of samples, npz arrays.
//!
//! | file            | owns                                                                 |
//! |-----------------|----------------------------------------------------------------------|
//! | [`png`]         | `[N, C, H, W]` on [−1, 1] → PNG grid or image; `round((x + 1)·127.5)` |
//! | [`safetensors`] | named `f32` tensors + string metadata ↔ a `.safetensors` file        |
//! | [`npz`]         | named `f64`/`f32`/`i64` arrays ↔ a NumPy `.npz` archive; f32 `.npy`   |
//! | `mod.rs`        | [`write_atomic`], which every writer here uses                       |
//!
//! Every writer is atomic: a reader (or a crash) sees the old file or the new one, never half of
//! one.

pub mod checkpoint;
pub mod npz;
pub mod plot;
pub mod png;
pub mod safetensors;

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically: to `<path>.tmp` in the same folder, flushed to disk
/// (`fsync`), then renamed over `path`; on Unix the folder is then synced too (best effort, its
/// failure is ignored), so the rename itself survives a power cut. On failure the temporary file
/// is removed and `path` is left as it was.
///
/// The folder must exist; it is not created.
///
/// # Errors
/// [`Error::Io`] naming the file that could not be created, written or renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let written = (|| {
        let mut file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        file.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        file.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(file);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if written.is_err() {
        // Best effort: the temporary file may not even exist.
        let _ = std::fs::remove_file(&tmp);
        return written;
    }
    sync_parent(path);
    Ok(())
}

/// `<path>.tmp`: the temporary name [`write_atomic`] writes first.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Syncs the folder holding `path` so a finished rename is durable. Best effort: some file
/// systems refuse to sync a folder, and the data itself is already on disk.
fn sync_parent(path: &Path) {
    #[cfg(unix)]
    {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temp() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f.bin");
        write_atomic(&path, b"old").expect("first write");
        write_atomic(&path, b"new").expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        assert!(!temp_path(&path).exists());
    }

    #[test]
    fn write_atomic_into_a_missing_folder_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("missing").join("f.bin");
        let err = write_atomic(&path, b"x").expect_err("no folder");
        assert!(matches!(err, Error::Io { .. }));
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn write_atomic_works_with_a_bare_file_name() {
        // The parent of a bare name is "", which must not break the folder sync.
        assert_eq!(temp_path(Path::new("a.png")), Path::new("a.png.tmp"));
        sync_parent(Path::new("a.png"));
    }
}
