//! CIFAR-10 binary batches ("CIFAR-10 binary version"), gzip-compressed or not.
//!
//! A batch file is a sequence of records with no header. Each record is 3073 bytes: one label
//! byte, then 1024 bytes of red, 1024 of green and 1024 of blue, each channel 32×32 row-major, so
//! the pixels are already CHW. The label bytes become the dataset's labels; [`super::load`] drops
//! them unless [`super::LoadOptions::labels`] asks for them (class-conditional training).
//!
//! The emoji set in `/work/shared/data/emoji-noto` (`emoji_32x32_rgb_cifar.bin.gz`, 3786 images
//! composited on white) uses this format and loads with [`load_cifar`].
//!
//! The standard archive unpacks to a folder `cifar-10-batches-bin` holding `data_batch_1.bin` to
//! `data_batch_5.bin` (train, 50 000 images) and `test_batch.bin` (test, 10 000 images);
//! [`load_cifar_dir`] reads either split from that folder or from its parent.

use std::path::{Path, PathBuf};

use super::{gzip, has_gz_extension, read_maybe_gzip, Dataset, Split};
use crate::error::{Error, Result};

/// Pixel bytes of one CIFAR image: 3 channels × 32 × 32.
pub const CIFAR_IMAGE_BYTES: usize = 3 * 32 * 32;

/// Bytes of one CIFAR-10 record: a label byte and [`CIFAR_IMAGE_BYTES`] pixel bytes.
pub const CIFAR_RECORD_BYTES: usize = 1 + CIFAR_IMAGE_BYTES;

/// The subfolder the official CIFAR-10 archive unpacks to.
const CIFAR_SUBFOLDER: &str = "cifar-10-batches-bin";

/// Parses the bytes of an (uncompressed) CIFAR-10 binary batch into a `[N, 3, 32, 32]` dataset,
/// `N = bytes.len() / 3073`, with each record's label byte as its image's label. `source` names
/// the file in errors.
///
/// # Errors
/// [`Error::BadFile`] if the data is empty or its length is not a multiple of 3073 bytes
/// (truncated, or another format such as the python/pickle version of CIFAR-10).
pub fn parse_cifar(bytes: &[u8], source: &Path) -> Result<Dataset> {
    let n = cifar_records(bytes, source)?;
    let mut pixels = Vec::with_capacity(n * CIFAR_IMAGE_BYTES);
    let mut labels = Vec::with_capacity(n);
    for record in bytes.chunks_exact(CIFAR_RECORD_BYTES) {
        labels.push(u32::from(record[0]));
        pixels.extend_from_slice(&record[1..]);
    }
    Dataset::new(pixels, n, 3, 32, 32, source)?.with_labels(labels)
}

/// [`parse_cifar`] taking the bytes: the labels are squeezed out in place, so the records
/// become the dataset's pixels without a second buffer.
pub(crate) fn parse_cifar_owned(mut bytes: Vec<u8>, source: &Path) -> Result<Dataset> {
    let n = cifar_records(&bytes, source)?;
    let labels: Vec<u32> = (0..n).map(|i| u32::from(bytes[i * CIFAR_RECORD_BYTES])).collect();
    for i in 0..n {
        // Image i moves left by i + 1 bytes (the labels before it and its own), never over
        // bytes not yet moved.
        let from = i * CIFAR_RECORD_BYTES + 1;
        bytes.copy_within(from..from + CIFAR_IMAGE_BYTES, i * CIFAR_IMAGE_BYTES);
    }
    bytes.truncate(n * CIFAR_IMAGE_BYTES);
    bytes.shrink_to_fit();
    Dataset::new(bytes, n, 3, 32, 32, source)?.with_labels(labels)
}

/// Every check of [`parse_cifar`]: the number of records of a valid batch.
fn cifar_records(bytes: &[u8], source: &Path) -> Result<usize> {
    if bytes.is_empty() {
        return Err(Error::bad_file(source, "the file is empty; get it again"));
    }
    if !bytes.len().is_multiple_of(CIFAR_RECORD_BYTES) {
        return Err(Error::bad_file(
            source,
            format!(
                "{} bytes is {} whole CIFAR-10 records of {CIFAR_RECORD_BYTES} bytes plus {} \
                 extra; the file is truncated or not a CIFAR-10 binary batch (the python/pickle \
                 version is not supported: use the binary version)",
                bytes.len(),
                bytes.len() / CIFAR_RECORD_BYTES,
                bytes.len() % CIFAR_RECORD_BYTES
            ),
        ));
    }
    Ok(bytes.len() / CIFAR_RECORD_BYTES)
}

/// Loads one CIFAR-10 binary batch file, gzip-compressed or not (detected by its first bytes),
/// as a `[N, 3, 32, 32]` dataset.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read; [`Error::BadFile`] for corrupt gzip data or any
/// refusal of [`parse_cifar`].
pub fn load_cifar(path: &Path) -> Result<Dataset> {
    parse_cifar_owned(read_maybe_gzip(path)?, path)
}

/// Loads one split from a folder of CIFAR-10 batches: train = every `data_batch_<k>.bin`
/// (in order of `k`), test = `test_batch.bin`; each may also be `.bin.gz` (when both exist, the
/// uncompressed one is read). The batches are looked for in `dir`, then in
/// `dir/cifar-10-batches-bin`. The images keep the file order and, within a file, the record order.
///
/// # Errors
/// [`Error::BadFile`] naming the folder if it holds no batch of the split; [`Error::Io`] if it
/// cannot be listed; the refusal of [`load_cifar`] for any batch.
pub fn load_cifar_dir(dir: &Path, split: Split) -> Result<Dataset> {
    let files = cifar_batch_files(dir, split)?;
    if files.is_empty() {
        return Err(Error::bad_file(
            dir,
            format!(
                "no CIFAR-10 {split} batches here or in {CIFAR_SUBFOLDER}/; expected {}",
                cifar_pattern(split)
            ),
        ));
    }
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for file in &files {
        let batch = load_cifar(file)?;
        pixels.extend_from_slice(batch.pixels());
        // Cannot fail: load_cifar builds every dataset through parse_cifar_owned, which always
        // attaches the label byte of each record (with_labels, one per image).
        labels.extend_from_slice(batch.labels().expect("parse_cifar_owned attaches the labels"));
    }
    let source = files[0].parent().map_or_else(|| dir.to_path_buf(), Path::to_path_buf);
    let n = pixels.len() / CIFAR_IMAGE_BYTES;
    Dataset::new(pixels, n, 3, 32, 32, source)?.with_labels(labels)
}

/// The names [`load_cifar_dir`] reads for `split`, for messages.
pub(crate) fn cifar_pattern(split: Split) -> &'static str {
    match split {
        Split::Train => "data_batch_*.bin[.gz]",
        Split::Test => "test_batch.bin[.gz]",
    }
}

/// The batch files of `split` in `dir`, or else in `dir/cifar-10-batches-bin`, in reading order;
/// empty if there are none.
pub(crate) fn cifar_batch_files(dir: &Path, split: Split) -> Result<Vec<PathBuf>> {
    let found = batch_files_in(dir, split)?;
    let sub = dir.join(CIFAR_SUBFOLDER);
    if found.is_empty() && sub.is_dir() {
        return batch_files_in(&sub, split);
    }
    Ok(found)
}

/// The batch files of `split` directly inside `dir`.
fn batch_files_in(dir: &Path, split: Split) -> Result<Vec<PathBuf>> {
    // (batch number, is gzip, path): sorting puts batches in order and `.bin` before `.bin.gz`.
    let mut found: Vec<(u64, bool, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let (stem, gz) = match name.strip_suffix(".gz") {
            Some(stem) => (stem, true),
            None => (name, false),
        };
        let Some(stem) = stem.strip_suffix(".bin") else {
            continue;
        };
        let number = match split {
            Split::Train => stem
                .strip_prefix("data_batch_")
                .filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|k| k.parse::<u64>().ok()),
            Split::Test => (stem == "test_batch").then_some(0),
        };
        if let Some(number) = number {
            if entry.path().is_file() {
                found.push((number, gz, entry.path()));
            }
        }
    }
    found.sort();
    // `x.bin` and `x.bin.gz` are one batch (the plain file is read); two spellings of one number
    // (`data_batch_1.bin`, `data_batch_01.bin`) are ambiguous, and reading one would silently
    // drop the other.
    for pair in found.windows(2) {
        let [(a, _, pa), (b, _, pb)] = pair else { continue };
        let plain = |p: &Path| p.with_extension("").with_extension("").file_name().map(|n| n.to_os_string());
        if a == b && plain(pa) != plain(pb) {
            return Err(Error::bad_file(
                dir,
                format!(
                    "{} and {} are both batch {a}; remove or rename one of them",
                    pa.display(),
                    pb.display()
                ),
            ));
        }
    }
    found.dedup_by_key(|(number, _, _)| *number);
    Ok(found.into_iter().map(|(_, _, path)| path).collect())
}

/// The CIFAR-10 binary batch of a `[N, 3, 32, 32]` dataset: each record's label byte is the
/// image's label, or 0 when the dataset has no labels.
///
/// # Errors
/// [`Error::InvalidConfig`] if the dataset is not 3 × 32 × 32, or a label is above 255.
pub fn encode_cifar(dataset: &Dataset) -> Result<Vec<u8>> {
    if dataset.channels() != 3 || dataset.height() != 32 || dataset.width() != 32 {
        return Err(Error::config(
            "CIFAR export",
            format!(
                "CIFAR-10 records hold 3x32x32 images; {} is {}x{}x{}",
                dataset.source().display(),
                dataset.channels(),
                dataset.height(),
                dataset.width()
            ),
        ));
    }
    let mut out = Vec::with_capacity(dataset.len() * CIFAR_RECORD_BYTES);
    for (i, image) in dataset.pixels().chunks_exact(CIFAR_IMAGE_BYTES).enumerate() {
        let label = dataset.labels().map_or(0, |l| l[i]);
        let label = u8::try_from(label).map_err(|_| {
            Error::config("CIFAR export", format!("label {label} of image {i} does not fit in a byte"))
        })?;
        out.push(label);
        out.extend_from_slice(image);
    }
    Ok(out)
}

/// Writes a `[N, 3, 32, 32]` dataset as a CIFAR-10 binary batch (see [`encode_cifar`]), gzip-compressed when
/// `path` ends in `.gz`, atomically (see [`crate::files::write_atomic`]).
///
/// # Errors
/// Those of [`encode_cifar`], and [`Error::Io`] if the file cannot be written.
pub fn write_cifar(path: &Path, dataset: &Dataset) -> Result<()> {
    let raw = encode_cifar(dataset)?;
    let bytes = if has_gz_extension(path) { gzip(&raw) } else { raw };
    crate::files::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn colour(n: usize, seed: usize) -> Dataset {
        let pixels = (0..n * CIFAR_IMAGE_BYTES).map(|i| ((i + seed) * 13 % 256) as u8).collect();
        Dataset::new(pixels, n, 3, 32, 32, "colour").expect("valid shape")
    }

    #[test]
    fn cifar_round_trips_plain_and_gzip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = colour(4, 0);
        for name in ["b.bin", "b.bin.gz"] {
            let path = dir.path().join(name);
            write_cifar(&path, &d).expect("write");
            let got = load_cifar(&path).expect("read");
            assert_eq!(got.shape(), [4, 3, 32, 32]);
            assert_eq!(got.pixels(), d.pixels());
        }
    }

    #[test]
    fn label_byte_is_the_label_and_channels_are_planar() {
        let mut record = vec![9u8]; // label
        record.extend(std::iter::repeat_n(200u8, 1024)); // red
        record.extend(std::iter::repeat_n(100u8, 1024)); // green
        record.extend(std::iter::repeat_n(50u8, 1024)); // blue
        let d = parse_cifar(&record, Path::new("r")).expect("one record");
        assert_eq!(d.len(), 1);
        assert_eq!(d.labels(), Some(&[9u32][..]));
        assert_eq!(
            parse_cifar_owned(record.clone(), Path::new("r")).expect("owned").labels(),
            Some(&[9u32][..])
        );
        let t = d.to_tensor(&[0]);
        assert_eq!(t[[0, 0, 31, 31]], crate::data::pixel_to_unit(200));
        assert_eq!(t[[0, 1, 0, 0]], crate::data::pixel_to_unit(100));
        assert_eq!(t[[0, 2, 5, 7]], crate::data::pixel_to_unit(50));
    }

    #[test]
    fn length_not_a_multiple_of_the_record_is_refused_naming_the_file() {
        let mut bytes = encode_cifar(&colour(2, 0)).expect("encode");
        bytes.pop();
        let err = parse_cifar(&bytes, Path::new("/c/data_batch_1.bin")).expect_err("truncated");
        let msg = err.to_string();
        assert!(matches!(err, Error::BadFile { .. }));
        assert!(msg.contains("/c/data_batch_1.bin") && msg.contains("truncated"), "{msg}");
        assert!(msg.contains("1 whole CIFAR-10 records"), "{msg}");
        assert!(parse_cifar(&[], Path::new("e")).expect_err("empty").to_string().contains("empty"));
    }

    #[test]
    fn folder_reads_train_batches_in_numeric_order_and_the_test_batch() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sub = dir.path().join(CIFAR_SUBFOLDER);
        std::fs::create_dir(&sub).expect("mkdir");
        // data_batch_10 must come after data_batch_2, although it sorts before it as text.
        write_cifar(&sub.join("data_batch_10.bin"), &colour(1, 10)).expect("write");
        write_cifar(&sub.join("data_batch_2.bin.gz"), &colour(2, 2)).expect("write");
        write_cifar(&sub.join("data_batch_1.bin"), &colour(1, 1)).expect("write");
        write_cifar(&sub.join("test_batch.bin"), &colour(3, 7)).expect("write");
        std::fs::write(sub.join("batches.meta.txt"), "airplane\n").expect("write");

        let train = load_cifar_dir(dir.path(), Split::Train).expect("train");
        assert_eq!(train.len(), 4);
        assert_eq!(train.image(0), colour(1, 1).image(0));
        assert_eq!(train.image(1), colour(2, 2).image(0));
        assert_eq!(train.image(3), colour(1, 10).image(0));
        assert_eq!(train.source(), sub);
        let test = load_cifar_dir(dir.path(), Split::Test).expect("test");
        assert_eq!(test.pixels(), colour(3, 7).pixels());
    }

    #[test]
    fn folder_keeps_each_batch_s_labels_in_image_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let one = colour(2, 1).with_labels(vec![3, 4]).expect("two labels");
        let two = colour(1, 2).with_labels(vec![9]).expect("one label");
        write_cifar(&dir.path().join("data_batch_1.bin"), &one).expect("write");
        write_cifar(&dir.path().join("data_batch_2.bin.gz"), &two).expect("write");
        let train = load_cifar_dir(dir.path(), Split::Train).expect("train");
        assert_eq!(train.labels(), Some(&[3u32, 4, 9][..]));
        assert_eq!(train.num_classes(), Some(10));
    }

    #[test]
    fn folder_without_batches_is_refused_with_the_expected_names() {
        let dir = tempfile::tempdir().expect("temp dir");
        let msg = load_cifar_dir(dir.path(), Split::Test).expect_err("none").to_string();
        assert!(msg.contains("test_batch.bin"), "{msg}");
    }

    #[test]
    fn encode_refuses_non_cifar_shapes() {
        let d = Dataset::new(vec![0; 4], 1, 1, 2, 2, "g").expect("valid shape");
        assert!(matches!(encode_cifar(&d), Err(Error::InvalidConfig { .. })));
    }
}
