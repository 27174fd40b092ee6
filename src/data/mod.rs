//! Datasets: image folders, IDX (MNIST), CIFAR-10 binaries, the embedded MNIST, seeded batches.
//!
//! This module owns everything between a file on disk and the `x0` minibatch the loss sees:
//!
//! | file        | owns                                                                     |
//! |-------------|--------------------------------------------------------------------------|
//! | `mod.rs`    | [`Dataset`] (`u8`, `[N, C, H, W]`, optional labels), [`load`], [`mnist_embedded`], [`pixel_to_unit`] |
//! | [`idx`]     | MNIST-style IDX image and label files, gzip or not; the folder of MNIST names |
//! | [`cifar`]   | CIFAR-10 binary batches (1 label byte + 3072 pixel bytes per record)     |
//! | [`folder`]  | folders of PNG/JPEG: decode, composite, resize, centre-crop              |
//! | [`batches`] | [`Batches`]: shuffled, seeded, resumable minibatches as `f32` tensors    |
//! | `spec`      | [`DataSpec`], [`Fingerprint`], [`DataRecord`]: what a checkpoint records to reload and check its data |
//!
//! A [`Dataset`] keeps the pixels as `u8`, exactly as stored, so that a dataset costs one byte a
//! pixel in memory and the 8-bit grid of the data is never lost. Pixels become model inputs only
//! when a batch is drawn, through [`pixel_to_unit`]: `x = p / 127.5 − 1`, which maps 0 to −1 and
//! 255 to +1, the scaling of Ho et al. (2020, §4, "data scaled linearly to [−1, 1]") and of
//! improved-diffusion's `image_datasets.py`. The decoder of the discretized likelihood (Eq. 13)
//! assumes this grid: the 256 values `x` takes are spaced `2/255` apart.
//!
//! Class labels (for class-conditional training) are loaded only when asked for
//! ([`LoadOptions::labels`]): from the IDX label file next to the images
//! ([`idx::load_labels_for`]), from the label byte of each CIFAR-10 record, or from the labels
//! embedded with MNIST. A folder of PNG/JPEG images carries none. When a dataset holds labels its
//! [`Fingerprint`] covers them, so a resumed class-conditional run checks its labels too; a
//! dataset loaded without them fingerprints exactly as before labels existed.
//!
//! Every loader refuses bad input with an [`Error`] that names the file and says what to do; no
//! input makes it panic. Files may be gzip-compressed (detected by the magic bytes `1f 8b`, not by
//! the file name).

pub mod batches;
pub mod cifar;
pub mod folder;
pub mod idx;
mod spec;

use std::fmt;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::Tensor;

pub use batches::{Batch, BatchConfig, BatchIndices, BatchPosition, Batches};
pub use cifar::{load_cifar, load_cifar_dir, write_cifar, CIFAR_IMAGE_BYTES, CIFAR_RECORD_BYTES};
pub use folder::{find_images, load_image_folder, load_image_paths};
pub use idx::{
    load_idx, load_labels, load_labels_for, load_mnist_dir, parse_idx_labels, write_idx, IDX_IMAGES_MAGIC,
};
pub use spec::{DataRecord, DataSpec, Fingerprint};

/// Which half of a dataset that ships in two halves (MNIST, CIFAR-10) to load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The training images (`train-images-idx3-ubyte`, `data_batch_*.bin`).
    #[default]
    Train,
    /// The held-out images (`t10k-images-idx3-ubyte`, `test_batch.bin`).
    Test,
}

impl Split {
    /// The lower-case name used on the command line and in messages: `train` or `test`.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Split {
    type Err = Error;

    /// Parses `train` or `test` (case-insensitive).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for anything else.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "test" => Ok(Split::Test),
            _ => Err(Error::config("split", format!("`{s}` is not a split; use `train` or `test`"))),
        }
    }
}

/// A set of 8-bit images, all of one shape, stored `[N, C, H, W]` (NCHW) in one contiguous
/// buffer: image `i`, channel `c`, row `y`, column `x` is byte `((i·C + c)·H + y)·W + x`.
///
/// Pixels are `u8` as stored in the file: 0 is black (MNIST background), 255 is white. Turn them
/// into model inputs with [`Dataset::to_tensor`] or [`Batches`], which apply [`pixel_to_unit`].
#[derive(Clone, PartialEq, Eq)]
pub struct Dataset {
    images: Vec<u8>,
    n: usize,
    channels: usize,
    height: usize,
    width: usize,
    source: PathBuf,
    /// One class label per image, when loaded ([`LoadOptions::labels`]).
    labels: Option<Vec<u32>>,
}

impl fmt::Debug for Dataset {
    /// Shape and source only: the pixels would flood the output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dataset")
            .field("n", &self.n)
            .field("channels", &self.channels)
            .field("height", &self.height)
            .field("width", &self.width)
            .field("source", &self.source)
            .field("classes", &self.num_classes())
            .finish_non_exhaustive()
    }
}

impl Dataset {
    /// A dataset from raw NCHW pixels. `source` says where they came from (a path, or a
    /// description such as `embedded:data/mnist/train-images-idx3-ubyte.gz`); it is kept for
    /// messages and checkpoint metadata.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if any of `n`, `channels`, `height`, `width` is zero, or if
    /// `images.len()` is not `n·channels·height·width`.
    pub fn new(
        images: Vec<u8>,
        n: usize,
        channels: usize,
        height: usize,
        width: usize,
        source: impl Into<PathBuf>,
    ) -> Result<Self> {
        let source = source.into();
        if n == 0 || channels == 0 || height == 0 || width == 0 {
            return Err(Error::config(
                "dataset",
                format!(
                    "{}: shape [{n}, {channels}, {height}, {width}] has a zero; a dataset needs \
                     at least one image of at least one pixel",
                    source.display()
                ),
            ));
        }
        let expected =
            n.checked_mul(channels).and_then(|v| v.checked_mul(height)).and_then(|v| v.checked_mul(width));
        if expected != Some(images.len()) {
            return Err(Error::config(
                "dataset",
                format!(
                    "{}: {} pixel bytes do not fill shape [{n}, {channels}, {height}, {width}]",
                    source.display(),
                    images.len()
                ),
            ));
        }
        Ok(Dataset { images, n, channels, height, width, source, labels: None })
    }

    /// The dataset with one class label per image (`labels[i]` is image `i`'s class).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the source if there is not exactly one label per image.
    pub fn with_labels(mut self, labels: Vec<u32>) -> Result<Self> {
        if labels.len() != self.n {
            return Err(Error::config(
                "dataset labels",
                format!(
                    "{}: {} labels for {} images; there must be one per image",
                    self.source.display(),
                    labels.len(),
                    self.n
                ),
            ));
        }
        self.labels = Some(labels);
        Ok(self)
    }

    /// The dataset without its labels (a no-op if it has none).
    pub fn without_labels(mut self) -> Self {
        self.labels = None;
        self
    }

    /// The class label of each image, if the dataset was loaded with labels.
    pub fn labels(&self) -> Option<&[u32]> {
        self.labels.as_deref()
    }

    /// The number of classes, `max label + 1`, if the dataset has labels (a class with no image
    /// below the largest label still counts: labels index the embedding table directly).
    pub fn num_classes(&self) -> Option<usize> {
        self.labels.as_ref().map(|l| l.iter().max().map_or(0, |&m| m as usize + 1))
    }

    /// The labels of the images at `indices`, in that order, as the network takes them; `None`
    /// if the dataset has no labels.
    ///
    /// # Panics
    /// If an index is `>= len()`.
    pub fn labels_at(&self, indices: &[usize]) -> Option<Vec<usize>> {
        self.labels.as_ref().map(|l| indices.iter().map(|&i| l[i] as usize).collect())
    }

    /// Number of images `N`.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Always `false`: a [`Dataset`] holds at least one image (the constructor refuses zero).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Channels per image `C`: 1 (grayscale) or 3 (RGB) for every loader of this module.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Image height `H` in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Image width `W` in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// The shape `[N, C, H, W]`.
    pub fn shape(&self) -> [usize; 4] {
        [self.n, self.channels, self.height, self.width]
    }

    /// Bytes per image, `C·H·W`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Where the images came from: a file, a folder, or `embedded:...` for [`mnist_embedded`].
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// All pixels, NCHW, `N·C·H·W` bytes.
    pub fn pixels(&self) -> &[u8] {
        &self.images
    }

    /// The pixels of image `i`, CHW, `C·H·W` bytes.
    ///
    /// # Panics
    /// If `i >= len()`.
    pub fn image(&self, i: usize) -> &[u8] {
        assert!(i < self.n, "Dataset::image: index {i} out of range for {} images", self.n);
        let len = self.image_len();
        &self.images[i * len..(i + 1) * len]
    }

    /// The dataset's [`Fingerprint`]: shape, the xxh3-128 hash of the pixels and, when the
    /// dataset has labels, of the labels (as little-endian `u32`s).
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint {
            shape: self.shape(),
            xxh3: format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&self.images)),
            labels: self.labels.as_ref().map(|l| {
                let bytes: Vec<u8> = l.iter().flat_map(|v| v.to_le_bytes()).collect();
                format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&bytes))
            }),
        }
    }

    /// Mean of all pixel values on the 0..=255 scale (MNIST train: 33.32).
    pub fn mean_pixel(&self) -> f64 {
        let sum: u64 = self.images.iter().map(|&p| u64::from(p)).sum();
        sum as f64 / self.images.len() as f64
    }

    /// The images in `range`, as a new dataset with the same source (e.g. the first 1000 images
    /// for a quick run).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the range is empty or reaches past `len()`.
    pub fn subset(&self, range: Range<usize>) -> Result<Dataset> {
        if range.start >= range.end || range.end > self.n {
            return Err(Error::config(
                "dataset subset",
                format!(
                    "range {}..{} is empty or past the {} images of {}",
                    range.start,
                    range.end,
                    self.n,
                    self.source.display()
                ),
            ));
        }
        let len = self.image_len();
        let mut subset = Dataset::new(
            self.images[range.start * len..range.end * len].to_vec(),
            range.end - range.start,
            self.channels,
            self.height,
            self.width,
            self.source.clone(),
        )?;
        subset.labels = self.labels.as_ref().map(|l| l[range].to_vec());
        Ok(subset)
    }

    /// The images (and labels) at `indices`, in that order, as a new dataset with the same source.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `indices` is empty or an index is `>= len()`.
    pub fn select(&self, indices: &[usize]) -> Result<Dataset> {
        if indices.is_empty() || indices.iter().any(|&i| i >= self.n) {
            return Err(Error::config(
                "dataset selection",
                format!("no images, or an index past the {} images of {}", self.n, self.source.display()),
            ));
        }
        let len = self.image_len();
        let pixels =
            indices.iter().flat_map(|&i| self.images[i * len..(i + 1) * len].iter().copied()).collect();
        let mut picked =
            Dataset::new(pixels, indices.len(), self.channels, self.height, self.width, self.source.clone())?;
        picked.labels = self.labels.as_ref().map(|l| indices.iter().map(|&i| l[i]).collect());
        Ok(picked)
    }

    /// The images at `indices`, in that order, as a `[B, C, H, W]` tensor on [−1, 1]
    /// (`x = p / 127.5 − 1`, see [`pixel_to_unit`]); `B = indices.len()`.
    ///
    /// # Panics
    /// If an index is `>= len()`.
    pub fn to_tensor(&self, indices: &[usize]) -> Tensor {
        self.gather(indices, None)
    }

    /// Shared by [`Dataset::to_tensor`] and [`Batches`]: gathers images, flipping image `k`
    /// left-right when `flips[k]` is true.
    pub(crate) fn gather(&self, indices: &[usize], flips: Option<&[bool]>) -> Tensor {
        let table = unit_table();
        let (c, h, w) = (self.channels, self.height, self.width);
        let mut out = Vec::with_capacity(indices.len() * self.image_len());
        for (k, &i) in indices.iter().enumerate() {
            let image = self.image(i);
            let flip = flips.is_some_and(|f| f[k]);
            for row in image.chunks_exact(w) {
                if flip {
                    out.extend(row.iter().rev().map(|&p| table[usize::from(p)]));
                } else {
                    out.extend(row.iter().map(|&p| table[usize::from(p)]));
                }
            }
        }
        Tensor::from_shape_vec(ndarray::IxDyn(&[indices.len(), c, h, w]), out)
            .expect("gather: one C·H·W block was written per index")
    }
}

/// Maps an 8-bit pixel to the model's scale: `x = p / 127.5 − 1`, so 0 → −1, 255 → +1, and the
/// 256 levels are `2/255` apart (Ho et al. 2020, §4 and the decoder of Eq. 13; improved-diffusion
/// `image_datasets.py`: `arr.astype(np.float32) / 127.5 - 1`). The inverse, for writing images,
/// is [`crate::io::png::unit_to_pixel`].
pub fn pixel_to_unit(p: u8) -> f32 {
    f32::from(p) / 127.5 - 1.0
}

/// [`pixel_to_unit`] for all 256 values, so that batching is a table look-up.
fn unit_table() -> [f32; 256] {
    let mut table = [0.0f32; 256];
    for (p, x) in table.iter_mut().enumerate() {
        *x = pixel_to_unit(p as u8);
    }
    table
}

/// How [`load`] should read a dataset. The default reads the training split at the size and
/// channel count stored in the file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Which split of a folder holding MNIST or CIFAR-10 files to read. Ignored for a single
    /// file and for a folder of images.
    pub split: Split,
    /// Side of the square images to produce. Required for a folder of images (each is resized
    /// and centre-cropped to it). For IDX and CIFAR files, which are never resized, it is a check:
    /// when set, it must equal the stored size.
    pub image_size: Option<usize>,
    /// Channels to produce, 1 (grayscale) or 3 (RGB). For a folder of images it defaults to 3;
    /// for IDX (1 channel) and CIFAR (3 channels) it is a check, like `image_size`.
    pub channels: Option<usize>,
    /// Load one class label per image (class-conditional training): from the IDX label file
    /// next to the images, the CIFAR-10 records, or the embedded MNIST labels. When false the
    /// dataset has no labels, whatever the format holds.
    pub labels: bool,
}

/// Loads a dataset from `path`, detecting its format:
///
/// - a **folder** holding the MNIST names for the split (`train-images-idx3-ubyte[.gz]` or
///   `t10k-images-idx3-ubyte[.gz]`, also with `.idx3-ubyte` spelt with a dot)
///   → [`load_mnist_dir`];
/// - a **folder** holding CIFAR-10 batches (`data_batch_*.bin[.gz]` for train,
///   `test_batch.bin[.gz]` for test), directly or in a `cifar-10-batches-bin` subfolder
///   → [`load_cifar_dir`];
/// - any other **folder** → its PNG/JPEG images, searched recursively ([`load_image_folder`],
///   which needs `opts.image_size`);
/// - a **file** (gzip or not) starting with the IDX image magic `0x00000803` → [`load_idx`];
/// - a **file** whose length is a multiple of [`CIFAR_RECORD_BYTES`] → [`load_cifar`].
///
/// # Errors
/// - [`Error::Io`] if `path` cannot be read.
/// - [`Error::BadFile`] if nothing above matches (the message lists what was looked for), or the
///   matching loader refuses the content.
/// - [`Error::InvalidConfig`] if `opts` asks for a size or channel count that an IDX/CIFAR file
///   does not have, or a folder of images is loaded without `opts.image_size`.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Dataset> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let dataset = if meta.is_dir() { load_dir(path, opts)? } else { load_file(path)? };
    let dataset = check_stored_shape(dataset, opts)?;
    if !opts.labels {
        return Ok(dataset.without_labels());
    }
    if dataset.labels().is_some() {
        return Ok(dataset);
    }
    if dataset.source().is_dir() {
        // Only a folder of PNG/JPEG images is both a folder and without labels here.
        return Err(Error::bad_file(
            dataset.source(),
            "class labels are needed but a folder of PNG/JPEG images carries none (subfolders \
             as classes are not supported); use IDX files with their *-labels-idx1-ubyte file or \
             CIFAR-10 batches, or train without class conditioning",
        ));
    }
    let n = dataset.len();
    let labels = idx::load_labels_for(dataset.source(), n)?;
    dataset.with_labels(labels.into_iter().map(u32::from).collect())
}

/// The folder branch of [`load`].
fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Dataset> {
    if idx::find_mnist_file(dir, opts.split).is_some() {
        return load_mnist_dir(dir, opts.split);
    }
    if let Some(other) = idx::find_mnist_file(dir, other_split(opts.split)) {
        return Err(Error::bad_file(
            dir,
            format!(
                "this MNIST folder holds {} but no {} images (expected {}); add the file or \
                 choose the other split",
                other.display(),
                opts.split,
                idx::mnist_names(opts.split).join(" or ")
            ),
        ));
    }
    if !cifar::cifar_batch_files(dir, opts.split)?.is_empty() {
        return load_cifar_dir(dir, opts.split);
    }
    if !cifar::cifar_batch_files(dir, other_split(opts.split))?.is_empty() {
        return Err(Error::bad_file(
            dir,
            format!(
                "this CIFAR-10 folder holds {} batches but none for the {} split (expected {}); \
                 add them or choose the other split",
                other_split(opts.split),
                opts.split,
                cifar::cifar_pattern(opts.split)
            ),
        ));
    }
    if find_images(dir)?.is_empty() {
        return Err(Error::bad_file(
            dir,
            format!(
                "no dataset found in this folder; looked for MNIST files ({}), CIFAR-10 batches \
                 ({}, also in a cifar-10-batches-bin subfolder) and PNG/JPEG images (searched \
                 recursively); point at a folder holding one of these",
                idx::mnist_names(opts.split).join(", "),
                cifar::cifar_pattern(opts.split)
            ),
        ));
    }
    let size = opts.image_size.ok_or_else(|| {
        Error::config(
            "image size",
            format!(
                "{} is a folder of images, which are resized to a square of a chosen side; set \
                 the image size (e.g. 32)",
                dir.display()
            ),
        )
    })?;
    load_image_folder(dir, size, opts.channels.unwrap_or(3))
}

/// The file branch of [`load`].
fn load_file(path: &Path) -> Result<Dataset> {
    let cap = crate::files::memory_cap();
    decode_file(crate::files::read_capped(path, cap)?, path, cap)
}

/// A dataset file's bytes, as [`load`] reads a file at `path` (IDX or CIFAR, gzip or not; the
/// name decides only between CIFAR and an unknown format), with `cap` the most the gzip data
/// may inflate to. `path` names the data in errors and is not read.
///
/// # Errors
/// As [`load`] for a file, without the I/O.
pub fn parse_file_bytes(raw: &[u8], path: &Path, cap: u64) -> Result<Dataset> {
    decode_file(raw.to_vec(), path, cap)
}

/// The labels of an IDX label file's bytes, gzip or not, as [`idx::load_labels_for`] reads them
/// (`expected` images, `None` for any count), with `cap` the most the gzip data may inflate to.
/// `path` names the data in errors and is not read.
///
/// # Errors
/// [`Error::BadFile`] for corrupt gzip data or any refusal of [`idx::parse_idx_labels`].
pub fn parse_label_file_bytes(raw: &[u8], path: &Path, cap: u64, expected: Option<usize>) -> Result<Vec<u8>> {
    idx::parse_idx_labels(&gunzip_if_needed(raw, path, cap)?, path, expected)
}

/// [`parse_file_bytes`] taking the bytes: plain data becomes the dataset without a copy, and
/// gzip data is dropped once inflated, so a dataset is held once in memory, not twice.
fn decode_file(raw: Vec<u8>, path: &Path, cap: u64) -> Result<Dataset> {
    let bytes = if is_gzip(&raw) { gunzip_if_needed(&raw, path, cap)? } else { raw };
    let cifar_length = !bytes.is_empty() && bytes.len() % CIFAR_RECORD_BYTES == 0;
    if idx::looks_like_idx(&bytes) {
        // A CIFAR record starting with label 0 and pixels 0, 8, 3 also looks like IDX: only a
        // header that fails to parse on a CIFAR-sized file sends it on to the CIFAR branch.
        match idx::idx_dims(&bytes, path) {
            Ok(_) => return idx::parse_idx_owned(bytes, path),
            Err(e) if !cifar_length => return Err(e),
            Err(_) => {}
        }
    }
    if folder::has_image_extension(path) {
        return Err(Error::bad_file(
            path,
            "a single image is not a dataset; point at the folder that holds the images",
        ));
    }
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let cifar_like_name = name.contains(".bin") || name.contains("batch");
    if cifar_length || cifar_like_name {
        return cifar::parse_cifar_owned(bytes, path);
    }
    Err(Error::bad_file(
        path,
        format!(
            "not a recognised dataset file ({} bytes after gunzip); looked for an IDX image file \
             (starting with 0x00000803) and a CIFAR-10 binary batch (a multiple of {} bytes), \
             gzip-compressed or not; for PNG/JPEG images point at their folder",
            bytes.len(),
            CIFAR_RECORD_BYTES
        ),
    ))
}

fn other_split(split: Split) -> Split {
    match split {
        Split::Train => Split::Test,
        Split::Test => Split::Train,
    }
}

/// For formats that are never resized (IDX, CIFAR), checks the requested size and channels
/// against the stored ones, so that a model built for 32×32 RGB is not handed 28×28 MNIST.
pub(super) fn check_stored_shape(dataset: Dataset, opts: &LoadOptions) -> Result<Dataset> {
    if let Some(size) = opts.image_size {
        if dataset.height != size || dataset.width != size {
            return Err(Error::config(
                "image size",
                format!(
                    "{} holds {}x{} images but {size}x{size} was asked for; only folders of \
                     PNG/JPEG images are resized, so set the image size to {} or leave it unset",
                    dataset.source.display(),
                    dataset.height,
                    dataset.width,
                    dataset.height
                ),
            ));
        }
    }
    if let Some(channels) = opts.channels {
        if dataset.channels != channels {
            return Err(Error::config(
                "channels",
                format!(
                    "{} holds {}-channel images but {channels} channels were asked for; only \
                     folders of PNG/JPEG images are converted, so set channels to {} or leave it \
                     unset",
                    dataset.source.display(),
                    dataset.channels,
                    dataset.channels
                ),
            ));
        }
    }
    Ok(dataset)
}

/// The embedded MNIST training images (`data/mnist/train-images-idx3-ubyte.gz`, CC BY-SA 3.0,
/// see `data/mnist/LICENSE.md`), carried in the binary so it works from any directory.
const MNIST_TRAIN_GZ: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist/train-images-idx3-ubyte.gz"));

/// The embedded MNIST test images (`data/mnist/t10k-images-idx3-ubyte.gz`).
const MNIST_TEST_GZ: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist/t10k-images-idx3-ubyte.gz"));

/// The embedded MNIST training labels (`data/mnist/train-labels-idx1-ubyte.gz`).
const MNIST_TRAIN_LABELS_GZ: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist/train-labels-idx1-ubyte.gz"));

/// The embedded MNIST test labels (`data/mnist/t10k-labels-idx1-ubyte.gz`).
const MNIST_TEST_LABELS_GZ: &[u8] =
    include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/data/mnist/t10k-labels-idx1-ubyte.gz"));

/// The class labels (digits 0–9) of [`mnist_embedded`]`(split)`, one per image in image order.
///
/// # Errors
/// [`Error::BadFile`] only if the embedded bytes were corrupted at build time.
pub fn mnist_embedded_labels(split: Split) -> Result<Vec<u8>> {
    let (bytes, name, n) = match split {
        Split::Train => (MNIST_TRAIN_LABELS_GZ, "embedded:data/mnist/train-labels-idx1-ubyte.gz", 60_000),
        Split::Test => (MNIST_TEST_LABELS_GZ, "embedded:data/mnist/t10k-labels-idx1-ubyte.gz", 10_000),
    };
    let source = Path::new(name);
    let raw = gunzip_if_needed(bytes, source, crate::files::memory_cap())?;
    idx::parse_idx_labels(&raw, source, Some(n))
}

/// MNIST, embedded in the library: 60 000 training or 10 000 test images, `[N, 1, 28, 28]`,
/// 0 = background. Pixel means: 33.32 (train), 33.79 (test). The data is CC BY-SA 3.0 (LeCun,
/// Cortes & Burges); see `data/mnist/README.md` and `LICENSE.md` in the repository.
///
/// The dataset's [`Dataset::source`] is `embedded:data/mnist/<file>.gz`.
///
/// # Errors
/// [`Error::BadFile`] only if the embedded bytes were corrupted at build time.
pub fn mnist_embedded(split: Split) -> Result<Dataset> {
    let (bytes, name) = match split {
        Split::Train => (MNIST_TRAIN_GZ, "embedded:data/mnist/train-images-idx3-ubyte.gz"),
        Split::Test => (MNIST_TEST_GZ, "embedded:data/mnist/t10k-images-idx3-ubyte.gz"),
    };
    let source = Path::new(name);
    let raw = gunzip_if_needed(bytes, source, crate::files::memory_cap())?;
    idx::parse_idx_owned(raw, source)
}

/// Whether `bytes` start with the gzip magic `1f 8b`.
pub(crate) fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// Reads `path` whole and decompresses it if it is gzip (by magic bytes, not by name), within
/// [`crate::files::memory_cap`].
pub(crate) fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let cap = crate::files::memory_cap();
    let bytes = crate::files::read_capped(path, cap)?;
    if is_gzip(&bytes) {
        gunzip_if_needed(&bytes, path, cap)
    } else {
        Ok(bytes)
    }
}

/// The most a deflate stream inflates per input byte (RFC 1951: a 258-byte match costs at
/// least 2 bits, so at most 1032 output bytes per input byte), with room for gzip's headers.
const DEFLATE_MAX_RATIO: u64 = 1032;

/// Decompresses gzip data (all members, as `gunzip` does); other data is returned as is.
/// `source` names the data in errors.
///
/// Memory is bounded before it is spent: when the data inflates to an IDX image file, its
/// header declares the total size, which must be within `cap` and within what the compressed
/// bytes can possibly inflate to, and reading stops one byte past it; otherwise reading stops
/// one byte past `cap`. Either way the excess is an error, not an allocation.
pub(crate) fn gunzip_if_needed(bytes: &[u8], source: &Path, cap: u64) -> Result<Vec<u8>> {
    if !is_gzip(bytes) {
        return Ok(bytes.to_vec());
    }
    let corrupt = |e: std::io::Error| {
        Error::bad_file(
            source,
            format!("gzip data is corrupt or truncated ({e}); download or copy the file again"),
        )
    };
    let mut decoder = flate2::read::MultiGzDecoder::new(bytes);
    let mut out = Vec::new();
    (&mut decoder).take(idx::IDX_IMAGES_HEADER as u64).read_to_end(&mut out).map_err(corrupt)?;
    let possible = (bytes.len() as u64).saturating_mul(DEFLATE_MAX_RATIO);
    let limit = match idx::declared_file_len(&out) {
        Some(declared) => {
            crate::files::check_declared_size(
                source,
                "the IDX header (inside the gzip data)",
                declared,
                cap,
            )?;
            if declared > possible {
                return Err(Error::bad_file(
                    source,
                    format!(
                        "the IDX header declares {declared} bytes, more than {} compressed bytes can \
                         inflate to; the file is corrupt",
                        bytes.len()
                    ),
                ));
            }
            out.reserve((declared as usize).saturating_sub(out.len()));
            declared
        }
        None => cap.min(possible),
    };
    let room = (limit + 1).saturating_sub(out.len() as u64);
    (&mut decoder).take(room).read_to_end(&mut out).map_err(corrupt)?;
    if out.len() as u64 > limit {
        return Err(Error::bad_file(
            source,
            format!(
                "the gzip data inflates to more than {limit} bytes ({}); the file is corrupt, or raise \
                 DDPM_MAX_DATA_MIB if it is really that large",
                if limit < cap { "what its IDX header declares" } else { "the memory cap" }
            ),
        ));
    }
    Ok(out)
}

/// Gzip-compresses `bytes` (for writers that are given a `.gz` path).
pub(crate) fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

/// Whether `path`'s name ends in `.gz` (case-insensitive): writers compress such files.
pub(crate) fn has_gz_extension(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gz"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(n: usize, c: usize, h: usize, w: usize) -> Dataset {
        let pixels = (0..n * c * h * w).map(|i| (i * 37 % 256) as u8).collect();
        Dataset::new(pixels, n, c, h, w, "tiny").expect("valid shape")
    }

    #[test]
    fn scaling_maps_0_to_minus_1_and_255_to_plus_1() {
        assert_eq!(pixel_to_unit(0), -1.0);
        assert_eq!(pixel_to_unit(255), 1.0);
        // Levels are 2/255 apart.
        let step = pixel_to_unit(1) - pixel_to_unit(0);
        assert!((step - 2.0 / 255.0).abs() < 1e-7);
    }

    #[test]
    fn scaling_inverts_exactly_through_png_quantisation() {
        for p in 0..=255u8 {
            assert_eq!(crate::io::png::unit_to_pixel(pixel_to_unit(p)), p, "pixel {p}");
        }
    }

    #[test]
    fn dataset_new_refuses_wrong_length_and_zero_dims() {
        assert!(matches!(Dataset::new(vec![0; 10], 1, 1, 3, 3, "x"), Err(Error::InvalidConfig { .. })));
        assert!(matches!(Dataset::new(vec![], 0, 1, 3, 3, "x"), Err(Error::InvalidConfig { .. })));
    }

    #[test]
    fn to_tensor_is_nchw_and_scaled() {
        let d = tiny(3, 2, 2, 3);
        let t = d.to_tensor(&[2, 0]);
        assert_eq!(t.shape(), &[2, 2, 2, 3]);
        for (k, &i) in [2usize, 0].iter().enumerate() {
            for c in 0..2 {
                for y in 0..2 {
                    for x in 0..3 {
                        let p = d.image(i)[(c * 2 + y) * 3 + x];
                        assert_eq!(t[[k, c, y, x]], pixel_to_unit(p));
                    }
                }
            }
        }
    }

    #[test]
    fn subset_keeps_the_chosen_images() {
        let d = tiny(5, 1, 2, 2);
        let s = d.subset(1..3).expect("valid range");
        assert_eq!(s.len(), 2);
        assert_eq!(s.image(0), d.image(1));
        assert_eq!(s.image(1), d.image(2));
        assert!(d.subset(3..3).is_err());
        assert!(d.subset(4..6).is_err());
    }

    #[test]
    fn split_parses_and_prints() {
        assert_eq!("Train".parse::<Split>().expect("valid"), Split::Train);
        assert_eq!("test".parse::<Split>().expect("valid"), Split::Test);
        assert!("val".parse::<Split>().is_err());
        assert_eq!(Split::Test.to_string(), "test");
    }

    #[test]
    fn corrupt_gzip_is_a_bad_file_naming_the_source() {
        let mut gz = gzip(&[7u8; 1000]);
        gz.truncate(gz.len() / 2);
        let err = gunzip_if_needed(&gz, Path::new("/x/broken.gz"), 1 << 30).expect_err("truncated gzip");
        let msg = err.to_string();
        assert!(matches!(err, Error::BadFile { .. }));
        assert!(msg.contains("/x/broken.gz") && msg.contains("corrupt or truncated"), "{msg}");
    }

    #[test]
    fn gzip_round_trips() {
        let data: Vec<u8> = (0..5000).map(|i| (i % 251) as u8).collect();
        let gz = gzip(&data);
        assert!(is_gzip(&gz));
        assert_eq!(gunzip_if_needed(&gz, Path::new("x"), 1 << 30).expect("valid gzip"), data);
    }

    #[test]
    fn load_detects_idx_cifar_and_image_folders() {
        let dir = tempfile::tempdir().expect("temp dir");
        // IDX file, gzip.
        let gray = tiny(4, 1, 5, 5);
        let idx_path = dir.path().join("digits.idx.gz");
        write_idx(&idx_path, &gray).expect("write idx");
        let got = load(&idx_path, &LoadOptions::default()).expect("load idx");
        assert_eq!(got.pixels(), gray.pixels());
        // CIFAR file.
        let rgb = tiny(3, 3, 32, 32);
        let cifar_path = dir.path().join("stuff.dat");
        write_cifar(&cifar_path, &rgb).expect("write cifar");
        let got = load(&cifar_path, &LoadOptions::default()).expect("load cifar");
        assert_eq!(got.pixels(), rgb.pixels());
        // Folder of images.
        let images = dir.path().join("pngs");
        std::fs::create_dir(&images).expect("mkdir");
        image::RgbImage::from_pixel(8, 8, image::Rgb([10, 20, 30]))
            .save(images.join("a.png"))
            .expect("save png");
        let opts = LoadOptions { image_size: Some(4), channels: Some(3), ..Default::default() };
        let got = load(&images, &opts).expect("load folder");
        assert_eq!(got.shape(), [1, 3, 4, 4]);
        // Without a size, a folder of images is refused with a config error.
        let err = load(&images, &LoadOptions::default()).expect_err("no size");
        assert!(matches!(err, Error::InvalidConfig { what: "image size", .. }));
    }

    #[test]
    fn load_refuses_a_size_that_idx_does_not_have() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("x-idx3-ubyte");
        write_idx(&path, &tiny(2, 1, 28, 28)).expect("write idx");
        let opts = LoadOptions { image_size: Some(32), ..Default::default() };
        let msg = load(&path, &opts).expect_err("28 != 32").to_string();
        assert!(msg.contains("28x28") && msg.contains("32x32"), "{msg}");
        let opts = LoadOptions { channels: Some(3), ..Default::default() };
        assert!(load(&path, &opts).is_err());
        let opts = LoadOptions { image_size: Some(28), channels: Some(1), ..Default::default() };
        assert!(load(&path, &opts).is_ok());
    }

    #[test]
    fn cifar_file_whose_first_bytes_look_like_idx_loads_as_cifar() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut pixels = vec![0u8; 2 * CIFAR_IMAGE_BYTES];
        pixels[..3].copy_from_slice(&[0, 8, 3]); // with label 0: 00 00 08 03, the IDX magic
        let rgb = Dataset::new(pixels, 2, 3, 32, 32, "rgb").expect("valid shape");
        let path = dir.path().join("odd.dat");
        write_cifar(&path, &rgb).expect("write cifar");
        assert_eq!(load(&path, &LoadOptions::default()).expect("cifar").pixels(), rgb.pixels());
    }

    #[test]
    fn load_of_an_unrecognised_file_lists_what_was_looked_for() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, b"hello, not a dataset").expect("write");
        let err = load(&path, &LoadOptions::default()).expect_err("text file");
        let msg = err.to_string();
        assert!(matches!(err, Error::BadFile { .. }));
        assert!(msg.contains("notes.txt") && msg.contains("IDX") && msg.contains("CIFAR"), "{msg}");
    }

    #[test]
    fn load_of_an_empty_folder_lists_what_was_looked_for() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = load(dir.path(), &LoadOptions::default()).expect_err("empty folder");
        let msg = err.to_string();
        assert!(matches!(err, Error::BadFile { .. }));
        for wanted in ["train-images-idx3-ubyte", "data_batch_", "PNG/JPEG"] {
            assert!(msg.contains(wanted), "{msg}");
        }
    }

    #[test]
    fn load_of_a_missing_path_is_an_io_error() {
        let err = load(Path::new("/no/such/dataset"), &LoadOptions::default()).expect_err("none");
        assert!(matches!(err, Error::Io { .. }));
        assert!(err.to_string().contains("/no/such/dataset"));
    }

    #[test]
    fn mnist_folder_missing_the_split_says_so() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_idx(&dir.path().join("train-images-idx3-ubyte.gz"), &tiny(2, 1, 28, 28)).expect("write idx");
        let opts = LoadOptions { split: Split::Test, ..Default::default() };
        let msg = load(dir.path(), &opts).expect_err("no test file").to_string();
        assert!(msg.contains("t10k-images-idx3-ubyte"), "{msg}");
        assert_eq!(load(dir.path(), &LoadOptions::default()).expect("train").len(), 2);
    }

    #[test]
    fn embedded_mnist_has_the_published_counts_and_means() {
        let train = mnist_embedded(Split::Train).expect("embedded train");
        assert_eq!(train.shape(), [60000, 1, 28, 28]);
        // Mean from data/mnist/README.md ("mean 33.32 (train) / 33.79 (test)").
        assert!((train.mean_pixel() - 33.32).abs() < 0.005, "{}", train.mean_pixel());
        let test = mnist_embedded(Split::Test).expect("embedded test");
        assert_eq!(test.shape(), [10000, 1, 28, 28]);
        assert!((test.mean_pixel() - 33.79).abs() < 0.005, "{}", test.mean_pixel());
        assert!(train.source().to_string_lossy().starts_with("embedded:"));
    }

    fn with_labels(opts: LoadOptions) -> LoadOptions {
        LoadOptions { labels: true, ..opts }
    }

    #[test]
    fn labels_are_loaded_only_when_asked_and_enter_the_fingerprint() {
        let dir = tempfile::tempdir().expect("temp dir");
        let images = dir.path().join("train-images-idx3-ubyte.gz");
        write_idx(&images, &tiny(3, 1, 4, 4)).expect("write idx");
        std::fs::write(dir.path().join("train-labels-idx1-ubyte"), idx::encode_idx_labels(&[2, 0, 5]))
            .expect("write labels");
        let plain = load(&images, &LoadOptions::default()).expect("images only");
        assert_eq!(plain.labels(), None);
        assert_eq!(plain.fingerprint().labels, None);
        let mut before = None;
        for path in [images.as_path(), dir.path()] {
            let labelled = load(path, &with_labels(LoadOptions::default())).expect("with labels");
            assert_eq!(labelled.labels(), Some(&[2u32, 0, 5][..]));
            assert_eq!(labelled.num_classes(), Some(6));
            assert_eq!(labelled.labels_at(&[2, 0]), Some(vec![5, 2]));
            let (a, b) = (plain.fingerprint(), labelled.fingerprint());
            assert_eq!((&a.shape, &a.xxh3), (&b.shape, &b.xxh3));
            assert!(b.labels.is_some() && b.to_string().contains("labels xxh3"), "{b}");
            before = Some(b);
        }
        // Other labels, same images: another fingerprint.
        std::fs::write(dir.path().join("train-labels-idx1-ubyte"), idx::encode_idx_labels(&[2, 0, 4]))
            .expect("write labels");
        let other = load(&images, &with_labels(LoadOptions::default())).expect("with labels");
        assert_ne!(Some(other.fingerprint()), before);
        assert_eq!(other.subset(1..3).expect("subset").labels(), Some(&[0u32, 4][..]));
    }

    #[test]
    fn fingerprints_without_labels_read_and_write_as_before() {
        let fp = tiny(2, 1, 2, 2).fingerprint();
        let json = serde_json::to_string(&fp).expect("serialise");
        assert!(!json.contains("labels"), "{json}");
        let old = r#"{"shape":[2,1,2,2],"xxh3":"00"}"#;
        let parsed: Fingerprint = serde_json::from_str(old).expect("old record");
        assert_eq!(parsed.labels, None);
        let spec: DataSpec =
            serde_json::from_str(r#"{"path":null,"split":"train","image_size":null,"channels":null}"#)
                .expect("old spec");
        assert!(!spec.labels);
    }

    #[test]
    fn mismatched_label_count_names_the_label_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let images = dir.path().join("x-images-idx3-ubyte");
        write_idx(&images, &tiny(3, 1, 4, 4)).expect("write idx");
        let labels = dir.path().join("x-labels-idx1-ubyte");
        std::fs::write(&labels, idx::encode_idx_labels(&[1, 2])).expect("write labels");
        let msg =
            load(&images, &with_labels(LoadOptions::default())).expect_err("2 labels, 3 images").to_string();
        assert!(
            msg.contains("x-labels-idx1-ubyte") && msg.contains("2 labels") && msg.contains("3 images"),
            "{msg}"
        );
    }

    #[test]
    fn cifar_labels_are_kept_only_when_asked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let rgb = tiny(2, 3, 32, 32).with_labels(vec![4, 7]).expect("labels");
        let path = dir.path().join("data_batch_1.bin");
        write_cifar(&path, &rgb).expect("write cifar");
        assert_eq!(load(&path, &LoadOptions::default()).expect("cifar").labels(), None);
        let got = load(&path, &with_labels(LoadOptions::default())).expect("cifar");
        assert_eq!(got.labels(), Some(&[4u32, 7][..]));
        assert_eq!(
            load(dir.path(), &with_labels(LoadOptions::default())).expect("dir").labels(),
            Some(&[4u32, 7][..])
        );
    }

    #[test]
    fn image_folders_refuse_labels_with_a_clear_message() {
        let dir = tempfile::tempdir().expect("temp dir");
        image::RgbImage::from_pixel(8, 8, image::Rgb([10, 20, 30]))
            .save(dir.path().join("a.png"))
            .expect("png");
        let opts = LoadOptions { image_size: Some(4), labels: true, ..Default::default() };
        let msg = load(dir.path(), &opts).expect_err("no labels").to_string();
        assert!(msg.contains("PNG/JPEG") && msg.contains("labels"), "{msg}");
    }

    #[test]
    fn embedded_mnist_labels_are_the_ten_digits() {
        let spec =
            DataSpec { path: None, split: Split::Test, image_size: None, channels: None, labels: true };
        let test = spec.load().expect("embedded test with labels");
        assert_eq!(test.num_classes(), Some(10));
        assert_eq!(test.labels().expect("labels").len(), 10_000);
        assert!(spec.describe().contains("with labels"));
        assert_eq!(mnist_embedded_labels(Split::Train).expect("train labels").len(), 60_000);
    }

    #[test]
    fn with_labels_needs_one_per_image() {
        let err = tiny(3, 1, 2, 2).with_labels(vec![1, 2]).expect_err("2 for 3");
        assert!(matches!(err, Error::InvalidConfig { .. }));
    }
}
