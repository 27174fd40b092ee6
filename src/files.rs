//! Low-level file helpers shared by [`crate::data`], [`crate::io`] and [`crate::train`]: the
//! bottom floor, above only the error type.
//!
//! | item                        | owns                                                       |
//! |-----------------------------|------------------------------------------------------------|
//! | [`write_atomic`]            | a file replaced whole or not at all, under a unique temporary name |
//! | [`write_atomic_keeping_previous`] | the same, keeping the replaced file as `prev` (checkpoint rotation) |
//! | [`remove_stale_temporaries`]| temporaries left by a killed writer                        |
//! | [`DirLock`]                 | an exclusive advisory lock on a directory, naming its holder |
//! | [`memory_cap`], [`read_capped`] | the bound on anything whose size a file declares       |
//!
//! Temporary files are named `.<file name>.<random>.tmp` in the folder of the file they replace
//! (the `tempfile` crate picks the random part and creates the file exclusively), so two writers
//! never share one, and a rename never crosses a file system.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The suffix of every temporary file [`write_atomic`] creates.
const TEMP_SUFFIX: &str = ".tmp";

/// Writes `bytes` to `path` atomically: into a new, uniquely named temporary file in the same
/// folder, flushed to disk (`fsync`), then renamed over `path`; on Unix the folder is then synced
/// too (best effort), so the rename itself survives a power cut. A reader, a crash or a
/// concurrent writer sees the old file or a new one, never a mixture. On failure the temporary
/// file is removed and `path` is left as it was.
///
/// The folder must exist; it is not created.
///
/// # Errors
/// [`Error::Io`] naming the file that could not be created, written or renamed;
/// [`Error::BadFile`] if `path` exists and is not a regular file (e.g. `/dev/null`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    refuse_special(path)?;
    let tmp = write_temporary(path, bytes)?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    sync_parent(path);
    Ok(())
}

/// [`write_atomic`], but the file being replaced (if any) is kept as `previous`: the current
/// `path` is hard-linked to a temporary name that is renamed over `previous`, and only then is
/// the new file renamed over `path`. Every rename is atomic, so at each instant `path` is a
/// complete file (the old one or the new one) and `previous` is a complete older one. Where hard
/// links are not supported, the old file is copied instead (same guarantees, more I/O).
///
/// # Errors
/// [`Error::Io`] naming the file that could not be written, linked or renamed; `path` is then
/// unchanged.
pub fn write_atomic_keeping_previous(path: &Path, previous: &Path, bytes: &[u8]) -> Result<()> {
    refuse_special(path)?;
    refuse_special(previous)?;
    let tmp = write_temporary(path, bytes)?;
    if path.exists() {
        let keep = temporary_name(previous);
        if std::fs::hard_link(path, &keep).is_err() {
            copy_synced(path, &keep)?;
        }
        std::fs::rename(&keep, previous).map_err(|e| {
            let _ = std::fs::remove_file(&keep);
            Error::io(previous, e)
        })?;
    }
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    sync_parent(path);
    Ok(())
}

/// Removes the temporary files that [`write_atomic`] would create for files in `dir`
/// (`.<name>.<random>.tmp`), left behind by a writer that was killed. Call it only while no
/// other process writes into `dir` (e.g. holding its [`DirLock`]). Returns how many were removed.
///
/// # Errors
/// [`Error::Io`] if `dir` cannot be listed.
pub fn remove_stale_temporaries(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_ours = name.starts_with('.') && name.ends_with(TEMP_SUFFIX) && name.len() > 1 + 6 + 4;
        if is_ours
            && entry.file_type().is_ok_and(|t| t.is_file())
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Refuses to replace anything but a regular file (or nothing): renaming over a device such as
/// `/dev/null`, a FIFO or a socket would destroy it, and over a folder fails anyway.
fn refuse_special(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err(Error::bad_file(
            path,
            "exists and is not a regular file (a folder, device, FIFO or socket); ddpm replaces only files, \
             so choose another output path",
        )),
        _ => Ok(()),
    }
}

/// A new temporary file beside `path` holding `bytes`, synced to disk.
fn write_temporary(path: &Path, bytes: &[u8]) -> Result<tempfile::NamedTempFile> {
    let dir = parent_of(path);
    let prefix = format!(".{}.", file_name(path));
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(TEMP_SUFFIX);
    // tempfile creates private (0600) files; the files written here are ordinary outputs, made
    // as `File::create` would make them: 0666 less the umask.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder.tempfile_in(dir).map_err(|e| Error::io(path, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(tmp.path(), e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(tmp.path(), e))?;
    Ok(tmp)
}

/// A unique temporary name beside `path` (for the link of the previous file).
fn temporary_name(path: &Path) -> PathBuf {
    use rand::Rng as _;
    let tag: u64 = rand::rng().random();
    parent_of(path).join(format!(".{}.{tag:016x}{TEMP_SUFFIX}", file_name(path)))
}

fn copy_synced(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to).map_err(|e| Error::io(to, e))?;
    File::open(to).and_then(|f| f.sync_all()).map_err(|e| Error::io(to, e))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned())
}

/// Syncs the folder holding `path` so a finished rename is durable. Best effort: some file
/// systems refuse to sync a folder, and the data itself is already on disk.
fn sync_parent(path: &Path) {
    #[cfg(unix)]
    if let Ok(dir) = File::open(parent_of(path)) {
        let _ = dir.sync_all();
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// An exclusive advisory lock on a directory, held until dropped: the lock file
/// `<dir>/.ddpm.lock`, locked with `flock` (std's [`File::try_lock`]). The kernel releases it
/// when the process ends, however it ends, so a killed run never leaves a stale lock. The file
/// holds a line naming the holder (pid, host, start time, what it runs), which a refused
/// process reports.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// The lock file's name inside the locked directory.
    pub const FILE_NAME: &'static str = ".ddpm.lock";

    /// Takes the lock on `dir` (which must exist) without waiting, and records `what` (e.g.
    /// `ddpm train`) as the holder.
    ///
    /// # Errors
    /// [`Error::Locked`] naming the directory and the holder's line if another process holds
    /// it; [`Error::Io`] if the lock file cannot be created.
    pub fn acquire(dir: &Path, what: &str) -> Result<Self> {
        let path = dir.join(Self::FILE_NAME);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // The holder writes its line right after locking; an empty read means it has
                // not yet done so.
                let _ = file.take(4096).read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(Error::Locked {
                    dir: dir.to_path_buf(),
                    holder: if holder.is_empty() { "another process".into() } else { holder.into() },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        let line = format!(
            "{what} (pid {} on {}, started {})\n",
            std::process::id(),
            host_name(),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        );
        file.set_len(0).map_err(|e| Error::io(&path, e))?;
        file.write_all(line.as_bytes()).map_err(|e| Error::io(&path, e))?;
        Ok(DirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The most bytes the library will allocate for anything whose size a file declares (a dataset,
/// a decompressed stream, an array, a decoded image): `DDPM_MAX_DATA_MIB` MiB if that is set,
/// otherwise half of the memory this process may use: the least of the machine's physical
/// memory, its cgroup's limit (a container's) and its address-space limit (8 GiB where none
/// can be read). A file declaring more is refused before anything is allocated, naming the cap
/// and the variable that raises it. (An invalid value of the variable is ignored here; the
/// `ddpm` binary refuses it at start with [`memory_cap_setting`].)
pub fn memory_cap() -> u64 {
    match memory_cap_setting() {
        Ok(Some(cap)) => cap,
        // The system's limits do not change while a process runs: read them once.
        _ => {
            static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
            LIMIT.get_or_init(memory_limit).map_or(8 << 30, |m| m / 2)
        }
    }
}

/// `DDPM_MAX_DATA_MIB` in bytes, if set.
///
/// # Errors
/// [`Error::InvalidConfig`] if it is set to anything but a whole number of MiB above 0.
pub fn memory_cap_setting() -> Result<Option<u64>> {
    let Some(v) = std::env::var_os("DDPM_MAX_DATA_MIB") else { return Ok(None) };
    match v.to_str().and_then(|s| s.trim().parse::<u64>().ok()) {
        Some(mib) if mib > 0 => Ok(Some(mib.saturating_mul(1 << 20))),
        _ => Err(Error::config(
            "DDPM_MAX_DATA_MIB",
            format!("{v:?} is not a whole number of MiB above 0 (e.g. 4096); unset it for the default"),
        )),
    }
}

/// The least of physical memory, the cgroup's memory limit and RLIMIT_AS, where readable.
fn memory_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limits = Vec::new();
        // SAFETY: sysconf reads a system constant and has no preconditions.
        let (pages, size) =
            unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
        if pages > 0 && size > 0 {
            limits.push((pages as u64).saturating_mul(size as u64));
        }
        // cgroup v2, then v1; "max" (no limit) does not parse and is skipped.
        for file in ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"] {
            if let Some(n) = std::fs::read_to_string(file).ok().and_then(|t| t.trim().parse::<u64>().ok()) {
                limits.push(n);
            }
        }
        let mut rlim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit writes the struct it is given and nothing else.
        if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut rlim) } == 0 && rlim.rlim_cur != libc::RLIM_INFINITY
        {
            // rlim_t is u64 here but not on every target.
            #[allow(clippy::unnecessary_cast)]
            limits.push(rlim.rlim_cur as u64);
        }
        limits.into_iter().min()
    }
    #[cfg(not(unix))]
    None
}

/// Refuses an array of `shape` of `bytes_each`-byte elements, held `copies` times, that would
/// not fit in [`memory_cap`] (or whose size overflows): the check for sizes that come from a
/// caller rather than a file (a sampling shape, a reference batch), so that a mistyped size is an
/// error and not an abort in the allocator.
///
/// # Errors
/// [`Error::InvalidConfig`] for `what`, naming the size and the cap.
pub fn check_array_size(what: &'static str, shape: &[usize], bytes_each: u64, copies: u64) -> Result<()> {
    let elements = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
    let bytes = elements.and_then(|n| n.checked_mul(bytes_each)).and_then(|b| b.checked_mul(copies));
    let cap = memory_cap();
    match bytes {
        Some(b) if b <= cap => Ok(()),
        _ => Err(Error::config(
            what,
            format!(
                "shape {shape:?} needs {} of memory, more than ddpm allocates ({} MiB: half the machine's \
                 memory, or DDPM_MAX_DATA_MIB)",
                bytes.map_or("more than 2^64 bytes".to_string(), |b| format!("{} MiB", b.div_ceil(1 << 20))),
                cap >> 20
            ),
        )),
    }
}

/// Refuses a declared size above `cap`: the one message every bounded reader gives.
///
/// # Errors
/// [`Error::BadFile`] naming `source`, the declared size and the cap.
pub fn check_declared_size(source: &Path, what: &str, declared: u64, cap: u64) -> Result<()> {
    if declared > cap {
        return Err(Error::bad_file(
            source,
            format!(
                "{what} declares {declared} bytes, more than the {cap}-byte cap on what a file may make \
                 ddpm allocate (half the machine's memory, or DDPM_MAX_DATA_MIB); the file is corrupt, \
                 or raise DDPM_MAX_DATA_MIB if it is really that large"
            ),
        ));
    }
    Ok(())
}

/// Reads `path` whole if its length is at most `cap`.
///
/// # Errors
/// [`Error::Io`] if it cannot be read; [`Error::BadFile`] if it is longer than `cap` or is not a
/// regular file (a folder, a device such as `/dev/zero`, a FIFO).
pub fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>> {
    // Checked before opening: opening a FIFO blocks, and a device such as /dev/zero has no end.
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let what = if meta.is_dir() { "a folder" } else { "not a regular file (a device, FIFO or socket)" };
        return Err(Error::bad_file(path, format!("{what}; give the path of a file")));
    }
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    check_declared_size(path, "the file", len, cap)?;
    let mut bytes = Vec::with_capacity(len as usize);
    // `take` guards against a file that grows while it is read.
    file.take(cap.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    check_declared_size(path, "the file", bytes.len() as u64, cap)?;
    Ok(bytes)
}

/// Parses the bytes of a `.npy` file into an array of `T`, refusing before any allocation a
/// header whose shape does not match the bytes that follow it (the `ndarray-npy` crate would
/// otherwise allocate what the header declares, and panics on some overflowing shapes).
///
/// # Errors
/// [`Error::BadFile`] naming `source` if the header is malformed, its element type is not `T`
/// (the message names it) or its shape does not fit the data.
pub fn parse_npy<T: ndarray_npy::ReadableElement>(bytes: &[u8], source: &Path) -> Result<ndarray::ArrayD<T>> {
    use ndarray_npy::{ReadNpyError, ReadNpyExt};
    check_npy(bytes, source)?;
    ndarray::ArrayD::<T>::read_npy(std::io::Cursor::new(bytes)).map_err(|e| match e {
        ReadNpyError::WrongDescriptor(descr) => {
            Error::bad_file(source, format!("element type {descr}, expected {}", std::any::type_name::<T>()))
        }
        other => Error::bad_file(source, format!("not a valid .npy file ({other})")),
    })
}

/// Checks that a `.npy` header's shape and element size account exactly for the bytes after
/// it, so that reading it allocates no more than the file holds.
///
/// # Errors
/// [`Error::BadFile`] naming `source` otherwise.
pub fn check_npy(bytes: &[u8], source: &Path) -> Result<()> {
    let mut cursor = std::io::Cursor::new(bytes);
    let header = read_npy_header(&mut cursor, source)?;
    check_npy_header(&header, bytes.len() as u64 - cursor.position(), source).map(|_| ())
}

/// Reads a `.npy` header from `reader` (which is left at the first data byte).
///
/// # Errors
/// [`Error::BadFile`] naming `source` if it is not a valid header.
pub fn read_npy_header(reader: &mut impl Read, source: &Path) -> Result<ndarray_npy::npy::header::Header> {
    ndarray_npy::npy::header::Header::from_reader(reader)
        .map_err(|e| Error::bad_file(source, format!("not a valid .npy file ({})", folded(&e))))
}

/// Checks that a `.npy` header's shape and plain element type account for exactly `data`
/// bytes; returns the element's kind (`f`, `i`, `u`, `b`, `c`) and size in bytes.
///
/// # Errors
/// [`Error::BadFile`] naming `source` otherwise.
pub fn check_npy_header(
    header: &ndarray_npy::npy::header::Header,
    data: u64,
    source: &Path,
) -> Result<(char, u64)> {
    let descr = header.type_descriptor.to_string();
    // A simple dtype is a string such as '<f4' or '|u1': byte order, kind, size in bytes.
    let plain = descr.trim_matches(|c| c == '\'' || c == '"');
    let kind = plain.chars().nth(1).filter(|k| "fiubc".contains(*k));
    let size = plain
        .get(2..)
        .filter(|_| kind.is_some())
        .and_then(|n| n.parse::<u64>().ok())
        .filter(|&n| (1..=16).contains(&n));
    let (Some(kind), Some(size)) = (kind, size) else {
        return Err(Error::bad_file(
            source,
            format!("element type {} is not a plain number type", folded(&descr)),
        ));
    };
    // ndarray needs the product of the non-zero axes to fit in isize, even for an empty array.
    let mut nonzero: u64 = 1;
    let mut len: u64 = 1;
    for &d in &header.shape {
        let d = d as u64;
        len = len.saturating_mul(d);
        if d != 0 {
            nonzero = nonzero.saturating_mul(d);
        }
    }
    let declared = len.saturating_mul(size);
    if nonzero.saturating_mul(size) > isize::MAX as u64 || declared != data {
        return Err(Error::bad_file(
            source,
            format!(
                "the .npy header declares shape {:?} of {size}-byte elements ({declared} bytes) but \
                 {data} bytes follow it; the file is truncated or corrupt",
                header.shape
            ),
        ));
    }
    Ok((kind, size))
}

/// The number of members a zip's end-of-central-directory record declares, when the archive has
/// one within its last 64 KiB (and is not zip64, where the field saturates). The `.npz` and `.pt`
/// readers compare it with the members the `zip` crate lists, which keeps only the last of two
/// members of one name, so a duplicate cannot hide.
pub fn zip_declared_entries(bytes: &[u8]) -> Option<usize> {
    const EOCD: [u8; 4] = [0x50, 0x4b, 0x05, 0x06];
    let start = bytes.len().saturating_sub(22 + 65535);
    let at = bytes[start..].windows(4).rposition(|w| w == EOCD)? + start;
    let count = u16::from_le_bytes([*bytes.get(at + 10)?, *bytes.get(at + 11)?]);
    (count != u16::MAX).then_some(usize::from(count))
}

/// A foreign error's text on one line and at most 300 characters (a parser's message can span
/// lines and quote the whole input).
pub fn folded(e: &dyn std::fmt::Display) -> String {
    let mut text = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    if text.len() > 300 {
        let cut = (0..=300).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.truncate(cut);
        text.push_str(" …");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f.bin");
        write_atomic(&path, b"old").expect("first write");
        write_atomic(&path, b"new").expect("second write");
        assert_eq!(std::fs::read(&path).expect("read"), b"new");
        assert_eq!(names(dir.path()), vec!["f.bin"]);
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
        assert_eq!(parent_of(Path::new("a.png")), Path::new("."));
        sync_parent(Path::new("a.png"));
    }

    #[test]
    fn temporaries_of_two_writers_never_share_a_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("c.safetensors");
        let a = write_temporary(&path, b"a").expect("a");
        let b = write_temporary(&path, b"b").expect("b");
        assert_ne!(a.path(), b.path());
        assert_eq!(std::fs::read(a.path()).expect("a"), b"a");
        assert_eq!(std::fs::read(b.path()).expect("b"), b"b");
    }

    #[test]
    fn keeping_previous_rotates_and_the_current_file_is_never_missing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cur, prev) = (dir.path().join("c"), dir.path().join("c.prev"));
        write_atomic_keeping_previous(&cur, &prev, b"1").expect("first");
        assert_eq!(std::fs::read(&cur).expect("cur"), b"1");
        assert!(!prev.exists(), "nothing to keep on the first save");
        write_atomic_keeping_previous(&cur, &prev, b"2").expect("second");
        write_atomic_keeping_previous(&cur, &prev, b"3").expect("third");
        assert_eq!(std::fs::read(&cur).expect("cur"), b"3");
        assert_eq!(std::fs::read(&prev).expect("prev"), b"2");
        assert_eq!(names(dir.path()), vec!["c", "c.prev"]);
    }

    #[test]
    fn stale_temporaries_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("c.safetensors");
        write_atomic(&path, b"kept").expect("write");
        let stale = write_temporary(&path, b"stale").expect("temp");
        let (_, stale_path) = stale.keep().expect("keep it as a killed writer would");
        std::fs::write(dir.path().join(".hidden"), b"x").expect("hidden");
        std::fs::write(dir.path().join("notes.tmp"), b"x").expect("user file");
        assert!(stale_path.exists());
        assert_eq!(remove_stale_temporaries(dir.path()).expect("clean"), 1);
        assert_eq!(names(dir.path()), vec![".hidden", "c.safetensors", "notes.tmp"]);
    }

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_released_on_drop() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = DirLock::acquire(dir.path(), "ddpm train (test)").expect("first");
        let err = DirLock::acquire(dir.path(), "second").expect_err("held");
        let msg = err.to_string();
        assert!(matches!(err, Error::Locked { .. }), "{err:?}");
        assert!(msg.contains("ddpm train (test)") && msg.contains(&std::process::id().to_string()), "{msg}");
        drop(first);
        DirLock::acquire(dir.path(), "third").expect("free again");
    }

    #[test]
    fn declared_sizes_above_the_cap_are_refused_and_the_cap_is_positive() {
        assert!(memory_cap() > 0);
        let e = check_declared_size(Path::new("/d/x"), "the header", 11, 10).expect_err("over");
        assert!(e.to_string().contains("/d/x") && e.to_string().contains("DDPM_MAX_DATA_MIB"), "{e}");
        check_declared_size(Path::new("x"), "the header", 10, 10).expect("at the cap");
        let dir = tempfile::tempdir().expect("temp dir");
        let f = dir.path().join("f");
        std::fs::write(&f, [7u8; 100]).expect("write");
        assert_eq!(read_capped(&f, 100).expect("fits").len(), 100);
        assert!(matches!(read_capped(&f, 99), Err(Error::BadFile { .. })));
        for special in [Path::new("/dev/null"), dir.path()] {
            let e = write_atomic(special, b"x").expect_err("a device or folder is never replaced");
            assert!(
                matches!(e, Error::BadFile { .. }) && e.to_string().contains("not a regular file"),
                "{e}"
            );
        }
        for special in [Path::new("/dev/zero"), dir.path()] {
            let e = read_capped(special, 1 << 20).expect_err("not a regular file");
            assert!(matches!(e, Error::BadFile { .. }) && e.to_string().contains("file"), "{e}");
        }
    }
}
