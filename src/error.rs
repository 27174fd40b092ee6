//! The library's error type.
//!
//! Shape mistakes inside ops are programming errors and panic (ndarray's convention); everything
//! a user can cause (a bad file, a bad schedule, a bad config) is an [`Error`] carrying the
//! context needed to fix it.

use std::path::PathBuf;

/// Every failure the library reports to its caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written. Check the path and its permissions.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its content is not what was expected (corrupt, truncated, wrong
    /// format or mismatched with the model). The message says what was found and what to do.
    #[error("{path}: {reason}")]
    BadFile {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it, and the fix.
        reason: String,
    },
    /// A configuration value is out of its valid range.
    #[error("invalid {what}: {reason}")]
    InvalidConfig {
        /// The setting, e.g. `schedule` or `batch size`.
        what: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// `--device gpu` was asked for but no GPU can be used (no adapter, no Vulkan / Metal / DX12
    /// driver, or a binary built without the `wgpu` feature). Build with `--features wgpu`,
    /// install a driver (on Debian, `mesa-vulkan-drivers` gives a software one), or run with
    /// `--device cpu` (or `auto`, which falls back to the CPU).
    #[error(
        "no GPU available: {reason}. Build with `--features wgpu`, install a Vulkan driver \
         (Debian: apt-get install mesa-vulkan-drivers), or use `--device cpu` (or `--device auto`)"
    )]
    GpuUnavailable {
        /// What was missing.
        reason: String,
    },
}

/// `Result` with the crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// A file whose content is refused, with the reason (and the fix) spelled out.
    pub fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadFile { path: path.into(), reason: reason.into() }
    }

    /// An invalid configuration value.
    pub fn config(what: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidConfig { what, reason: reason.into() }
    }
}
