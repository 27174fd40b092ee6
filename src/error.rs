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
    /// Another process holds the directory's lock (a second `ddpm train` into the same `--out`).
    /// Wait for it to finish, stop it, or choose another directory.
    #[error("{dir} is in use by {holder}; wait for that run to end or stop it, or choose another --out")]
    Locked {
        /// The locked directory.
        dir: PathBuf,
        /// The holder's own description (command, pid, host, start), as it wrote it.
        holder: String,
    },
    /// Training produced non-finite numbers (NaN or ±∞) it could not step past: `consecutive`
    /// steps in a row ending at attempt `step` had a non-finite loss or gradient norm, or the
    /// weights themselves became non-finite. Nothing was saved after the last good checkpoint.
    #[error(
        "training diverged: {what} at step {step} ({consecutive} non-finite step(s) in a row); \
         nothing was saved after the last good checkpoint{checkpoint}. Lower the learning rate \
         (--lr), keep gradient clipping on (--grad-clip), or resume from the checkpoint"
    )]
    Diverged {
        /// The step (1-based, counting applied steps, plus one) at which the run stopped.
        step: u64,
        /// What was not finite: the loss, the gradient norm, or the weights.
        what: String,
        /// Non-finite steps in a row.
        consecutive: u64,
        /// ` (step N, in PATH)` when a good checkpoint exists, else empty.
        checkpoint: String,
    },
    /// A resumed run was given (or found at the recorded path) data other than what its
    /// checkpoint was trained on.
    #[error(
        "the training data differs from the data this run was trained on (recorded: {recorded}; \
         found: {found}); give the original with --data, or pass --data with \
         --allow-different-data to train on this data anyway"
    )]
    DataChanged {
        /// The recorded source and fingerprint.
        recorded: String,
        /// What was found.
        found: String,
    },
    /// Long work (sampling) stopped because a stop was requested (a signal).
    #[error("stopped on request before the work was done")]
    Interrupted,
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
    /// A data-parallel run's ranks could not work together: a communication failed, or they
    /// disagree (different weights, configurations or lengths); the message says which.
    #[error("distributed run: {0}")]
    Distributed(String),
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
