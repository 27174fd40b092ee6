//! What a checkpoint records about its training data: where it came from ([`DataSpec`], enough
//! to load it again) and what it held ([`Fingerprint`]), together a [`DataRecord`].

use std::path::PathBuf;

use super::{check_stored_shape, load, mnist_embedded, mnist_embedded_labels, Dataset, LoadOptions, Split};
use crate::error::{Error, Result};

/// Where a training set comes from, complete enough to load it again: a path (or the embedded
/// MNIST) and the [`LoadOptions`]. A checkpoint stores it so that `--resume` reloads the data
/// the run was trained on.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataSpec {
    /// The file or folder; `None` for the MNIST embedded in the library.
    pub path: Option<PathBuf>,
    /// The split.
    pub split: Split,
    /// The requested image size, if any.
    pub image_size: Option<usize>,
    /// The requested channel count, if any.
    pub channels: Option<usize>,
    /// Whether the class labels are loaded too (a class-conditional run); absent in
    /// checkpoints written before labels existed, which read as `false`.
    #[serde(default)]
    pub labels: bool,
}

impl DataSpec {
    /// The options [`load`] takes for this spec.
    pub fn options(&self) -> LoadOptions {
        LoadOptions {
            split: self.split,
            image_size: self.image_size,
            channels: self.channels,
            labels: self.labels,
        }
    }

    /// Loads the dataset: [`mnist_embedded`] when there is no path, else [`load`].
    ///
    /// # Errors
    /// As [`load`]; [`Error::Io`] naming the path if it does not exist.
    pub fn load(&self) -> Result<Dataset> {
        match &self.path {
            None => {
                let opts = self.options();
                let data = check_stored_shape(mnist_embedded(self.split)?, &opts)?;
                if opts.labels {
                    let labels = mnist_embedded_labels(self.split)?;
                    return data.with_labels(labels.into_iter().map(u32::from).collect());
                }
                Ok(data)
            }
            Some(p) => load(p, &self.options()),
        }
    }

    /// The spec with its path made absolute and canonical (so a resume from another working
    /// directory finds it), which must be valid UTF-8 to be recorded in a checkpoint.
    ///
    /// # Errors
    /// [`Error::Io`] if the path cannot be resolved; [`Error::BadFile`] if it is not UTF-8.
    pub fn canonical(&self) -> Result<DataSpec> {
        let Some(p) = &self.path else { return Ok(self.clone()) };
        let full = std::fs::canonicalize(p).map_err(|e| Error::io(p, e))?;
        if full.to_str().is_none() {
            return Err(Error::bad_file(
                p,
                "the path is not valid UTF-8, so a checkpoint cannot record it; rename or link it to a UTF-8 path",
            ));
        }
        Ok(DataSpec { path: Some(full), ..self.clone() })
    }

    /// A short description for messages: the path (or `the embedded MNIST`) and the split.
    pub fn describe(&self) -> String {
        let labels = if self.labels { ", with labels" } else { "" };
        match &self.path {
            None => format!("the embedded MNIST ({} split{labels})", self.split),
            Some(p) => format!("{} ({} split{labels})", p.display(), self.split),
        }
    }
}

/// What identifies a dataset's content: its shape and a 128-bit hash (xxh3) of its pixels. Two
/// datasets with equal fingerprints hold the same images in the same order.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint {
    /// `[N, C, H, W]`.
    pub shape: [usize; 4],
    /// xxh3-128 of the NCHW pixel bytes, as 32 hex digits.
    pub xxh3: String,
    /// xxh3-128 of the class labels (little-endian `u32`s), as 32 hex digits, when the dataset
    /// was loaded with labels; absent otherwise (and in checkpoints written before labels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<String>,
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [n, c, h, w] = self.shape;
        write!(f, "{n} images of {c}x{h}x{w}, xxh3 {}", self.xxh3)?;
        match &self.labels {
            Some(l) => write!(f, ", labels xxh3 {l}"),
            None => Ok(()),
        }
    }
}

/// A training set as a checkpoint records it: where it came from and what it held.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataRecord {
    /// How to load it again.
    pub spec: DataSpec,
    /// What it held.
    pub fingerprint: Fingerprint,
}
