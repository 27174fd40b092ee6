//! MNIST-style IDX image files, gzip-compressed or not, and the folder with the standard MNIST
//! names.
//!
//! The IDX layout (LeCun's MNIST page; all integers big-endian):
//!
//! | bytes   | content                                                             |
//! |---------|---------------------------------------------------------------------|
//! | 0..4    | magic `0x00000803`: two zero bytes, type `0x08` (u8), 3 dimensions  |
//! | 4..16   | `u32` count, `u32` rows, `u32` cols                                 |
//! | 16..    | `count·rows·cols` pixel bytes, row-major, image after image         |
//!
//! Only this variant (u8, three dimensions) holds images; label files (`0x00000801`) and other
//! element types are refused with a message saying so.
//!
//! Class labels (for class-conditional training) come from the IDX label file next to the
//! images, read only when asked for ([`load_labels_for`]):
//!
//! | bytes   | content                                                             |
//! |---------|---------------------------------------------------------------------|
//! | 0..4    | magic `0x00000801`: two zero bytes, type `0x08` (u8), 1 dimension   |
//! | 4..8    | `u32` count, which must equal the image count                       |
//! | 8..     | `count` label bytes, one per image, in image order                  |
//!
//! Its name is the images file's with `images` → `labels` and `idx3` → `idx1`
//! (`train-images-idx3-ubyte.gz` ↔ `train-labels-idx1-ubyte.gz`), gzip or not.

use std::path::{Path, PathBuf};

use super::{gzip, has_gz_extension, read_maybe_gzip, Dataset, Split};
use crate::error::{Error, Result};

/// Magic number of an IDX file of `u8` values with 3 dimensions: MNIST images.
pub const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;

/// Magic number of an IDX file of `u8` values with 1 dimension: MNIST labels.
pub const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// Size of the header of an IDX label file: magic and one dimension.
pub(crate) const IDX_LABELS_HEADER: usize = 8;

/// Size of the header of an IDX image file: magic and three dimensions.
pub(crate) const IDX_IMAGES_HEADER: usize = 16;

/// The total length (header and body) that the first bytes of an IDX image file (16 bytes) or
/// label file (8 bytes) declare, or `None` if they are neither header (or the size overflows).
pub(crate) fn declared_file_len(head: &[u8]) -> Option<u64> {
    let magic = be_u32(head, 0)?;
    if magic == IDX_LABELS_MAGIC {
        return u64::from(be_u32(head, 4)?).checked_add(IDX_LABELS_HEADER as u64);
    }
    if magic != IDX_IMAGES_MAGIC {
        return None;
    }
    let (count, rows, cols) = (be_u32(head, 4)?, be_u32(head, 8)?, be_u32(head, 12)?);
    u64::from(count)
        .checked_mul(u64::from(rows))?
        .checked_mul(u64::from(cols))?
        .checked_add(IDX_IMAGES_HEADER as u64)
}

/// Parses the bytes of an (uncompressed) IDX image file into a `[count, 1, rows, cols]`
/// dataset. `source` names the file in errors and becomes [`Dataset::source`].
///
/// # Errors
/// [`Error::BadFile`] if the magic is not `0x00000803` (the message tells a label file or another
/// IDX type apart from a non-IDX file), a dimension is zero, or the byte count differs from what
/// the header promises (truncated file, or trailing bytes).
pub fn parse_idx(bytes: &[u8], source: &Path) -> Result<Dataset> {
    let (count, rows, cols) = idx_dims(bytes, source)?;
    Dataset::new(bytes[IDX_IMAGES_HEADER..].to_vec(), count, 1, rows, cols, source)
}

/// [`parse_idx`] taking the bytes, which become the dataset's pixels without a copy.
pub(crate) fn parse_idx_owned(mut bytes: Vec<u8>, source: &Path) -> Result<Dataset> {
    let (count, rows, cols) = idx_dims(&bytes, source)?;
    bytes.drain(..IDX_IMAGES_HEADER);
    Dataset::new(bytes, count, 1, rows, cols, source)
}

/// Every check of [`parse_idx`]: the dimensions `(count, rows, cols)` of a valid file.
pub(crate) fn idx_dims(bytes: &[u8], source: &Path) -> Result<(usize, usize, usize)> {
    let Some(magic) = be_u32(bytes, 0) else {
        return Err(Error::bad_file(
            source,
            format!(
                "{} bytes is too short for an IDX file; it is empty or truncated, get it again",
                bytes.len()
            ),
        ));
    };
    if magic == IDX_LABELS_MAGIC {
        return Err(Error::bad_file(
            source,
            "this is an IDX label file (magic 0x00000801), not images; pass the matching \
             *-images-idx3-ubyte file",
        ));
    }
    if magic != IDX_IMAGES_MAGIC {
        let reason = if bytes[0] == 0 && bytes[1] == 0 {
            format!(
                "IDX file of element type 0x{:02x} with {} dimensions (magic 0x{magic:08x}); only \
                 u8 images with 3 dimensions (magic 0x00000803) are supported",
                bytes[2], bytes[3]
            )
        } else {
            format!(
                "not an IDX image file: it starts with 0x{magic:08x}, expected 0x00000803 (if it \
                 is gzip-compressed, it is not a valid gzip stream)"
            )
        };
        return Err(Error::bad_file(source, reason));
    }
    let (Some(count), Some(rows), Some(cols)) = (be_u32(bytes, 4), be_u32(bytes, 8), be_u32(bytes, 12))
    else {
        return Err(Error::bad_file(
            source,
            format!(
                "the IDX header is truncated ({} of {IDX_IMAGES_HEADER} bytes); get the file again",
                bytes.len()
            ),
        ));
    };
    let (count, rows, cols) = (count as usize, rows as usize, cols as usize);
    if count == 0 || rows == 0 || cols == 0 {
        return Err(Error::bad_file(
            source,
            format!("the IDX header says {count} images of {rows}x{cols}; there is nothing to load"),
        ));
    }
    let image_len = rows.checked_mul(cols);
    let body = image_len.and_then(|l| l.checked_mul(count));
    let Some(body) = body.filter(|b| b.checked_add(IDX_IMAGES_HEADER).is_some()) else {
        return Err(Error::bad_file(
            source,
            format!("the IDX header's size {count} x {rows} x {cols} overflows; the file is corrupt"),
        ));
    };
    let present = bytes.len() - IDX_IMAGES_HEADER;
    if present < body {
        let whole = present / (rows * cols);
        return Err(Error::bad_file(
            source,
            format!(
                "truncated: the header promises {count} images of {rows}x{cols} ({body} pixel \
                 bytes) but only {present} are present ({whole} whole images); get the file again"
            ),
        ));
    }
    if present > body {
        return Err(Error::bad_file(
            source,
            format!(
                "{} bytes follow the {count} images of {rows}x{cols} that the header promises; \
                 the file is corrupt or not an IDX image file",
                present - body
            ),
        ));
    }
    Ok((count, rows, cols))
}

/// Loads an IDX image file, gzip-compressed or not (detected by its first bytes `1f 8b`), as a
/// `[count, 1, rows, cols]` dataset.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read; [`Error::BadFile`] for corrupt gzip data or any
/// refusal of [`parse_idx`].
pub fn load_idx(path: &Path) -> Result<Dataset> {
    parse_idx_owned(read_maybe_gzip(path)?, path)
}

/// Parses the bytes of an (uncompressed) IDX label file: one `u8` class label per image.
/// `expected` is the number of images the labels belong to (`None` accepts any count).
/// `source` names the file in errors.
///
/// # Errors
/// [`Error::BadFile`] naming `source` if the magic is not `0x00000801` (an image file is told
/// apart), the header is truncated, the count is zero or differs from `expected`, or the byte
/// count differs from the header's.
pub fn parse_idx_labels(bytes: &[u8], source: &Path, expected: Option<usize>) -> Result<Vec<u8>> {
    let (Some(magic), Some(count)) = (be_u32(bytes, 0), be_u32(bytes, 4)) else {
        return Err(Error::bad_file(
            source,
            format!(
                "{} bytes is too short for an IDX label file ({IDX_LABELS_HEADER}-byte header); it \
                 is empty or truncated, get it again",
                bytes.len()
            ),
        ));
    };
    if magic == IDX_IMAGES_MAGIC {
        return Err(Error::bad_file(
            source,
            "this is an IDX image file (magic 0x00000803), not labels; the labels are the \
             matching *-labels-idx1-ubyte file",
        ));
    }
    if magic != IDX_LABELS_MAGIC {
        return Err(Error::bad_file(
            source,
            format!("not an IDX label file: it starts with 0x{magic:08x}, expected 0x00000801"),
        ));
    }
    let count = count as usize;
    if count == 0 {
        return Err(Error::bad_file(source, "the IDX label header says 0 labels; there is nothing to load"));
    }
    if let Some(n) = expected.filter(|&n| n != count) {
        return Err(Error::bad_file(
            source,
            format!(
                "holds {count} labels but the images file holds {n} images; the two files do not \
                 belong together"
            ),
        ));
    }
    let present = bytes.len() - IDX_LABELS_HEADER;
    if present != count {
        let what = if present < count { "truncated" } else { "too long" };
        return Err(Error::bad_file(
            source,
            format!(
                "{what}: the header promises {count} labels but {present} bytes follow it; get the \
                 file again"
            ),
        ));
    }
    Ok(bytes[IDX_LABELS_HEADER..].to_vec())
}

/// The label file names that belong to the IDX images file `images`, in order of preference:
/// its name with `images` → `labels` and `idx3` → `idx1`, with and without `.gz`. Empty when the
/// name holds no `idx3`, so no labels name can be derived from it.
pub fn labels_paths_for(images: &Path) -> Vec<PathBuf> {
    let Some(name) = images.file_name().and_then(|n| n.to_str()) else { return vec![] };
    let Some(at) = name.rfind("idx3") else { return vec![] };
    let name = format!("{}idx1{}", &name[..at], &name[at + 4..]).replacen("images", "labels", 1);
    let base = name.strip_suffix(".gz").unwrap_or(&name).to_string();
    [base.clone(), format!("{base}.gz")].iter().map(|n| images.with_file_name(n)).collect()
}

/// Reads the labels of the `count` images of the IDX file `images` from the label file next to
/// it ([`labels_paths_for`]), gzip or not, within [`crate::files::memory_cap`].
///
/// # Errors
/// [`Error::BadFile`] naming the file(s) looked for if none exists, or naming the label file if
/// [`parse_idx_labels`] refuses it; [`Error::Io`] if it cannot be read.
pub fn load_labels_for(images: &Path, count: usize) -> Result<Vec<u8>> {
    let candidates = labels_paths_for(images);
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        let looked = if candidates.is_empty() {
            "its name holds no `idx3`, so no label file name follows from it; name the images \
             `<x>-images-idx3-ubyte` and the labels `<x>-labels-idx1-ubyte`"
                .to_string()
        } else {
            format!(
                "looked for {}",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" and ")
            )
        };
        return Err(Error::bad_file(
            images,
            format!("class labels are needed but there is no IDX label file for these images: {looked}"),
        ));
    };
    parse_idx_labels(&read_maybe_gzip(path)?, path, Some(count))
}

/// Reads an IDX label file named directly (gzip or not, within [`crate::files::memory_cap`]),
/// holding the labels of `count` images.
///
/// # Errors
/// [`Error::Io`] if it cannot be read; [`Error::BadFile`] naming it if it cannot be
/// decompressed or [`parse_idx_labels`] refuses it.
pub fn load_labels(path: &Path, count: usize) -> Result<Vec<u8>> {
    parse_idx_labels(&read_maybe_gzip(path)?, path, Some(count))
}

/// Encodes labels as an IDX label file: header `0x00000801, N`, then one byte per label.
///
/// # Panics
/// If there are more than `u32::MAX` labels.
pub fn encode_idx_labels(labels: &[u8]) -> Vec<u8> {
    let n = u32::try_from(labels.len()).expect("encode_idx_labels: more than u32::MAX labels");
    let mut out = Vec::with_capacity(IDX_LABELS_HEADER + labels.len());
    out.extend_from_slice(&IDX_LABELS_MAGIC.to_be_bytes());
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(labels);
    out
}

/// Loads one split from a folder holding the MNIST files under their standard names:
/// `train-images-idx3-ubyte` (train) or `t10k-images-idx3-ubyte` (test), each with or without
/// `.gz`, also spelt `train-images.idx3-ubyte`. The first name found in that order is read.
///
/// # Errors
/// [`Error::BadFile`] naming the folder and the names tried if none is present, or the refusal of
/// [`load_idx`] for the file found.
pub fn load_mnist_dir(dir: &Path, split: Split) -> Result<Dataset> {
    match find_mnist_file(dir, split) {
        Some(path) => load_idx(&path),
        None => Err(Error::bad_file(
            dir,
            format!("no MNIST {split} images here; expected one of {}", mnist_names(split).join(", ")),
        )),
    }
}

/// The file names [`load_mnist_dir`] looks for, in order of preference.
pub(crate) fn mnist_names(split: Split) -> [&'static str; 4] {
    match split {
        Split::Train => [
            "train-images-idx3-ubyte",
            "train-images-idx3-ubyte.gz",
            "train-images.idx3-ubyte",
            "train-images.idx3-ubyte.gz",
        ],
        Split::Test => [
            "t10k-images-idx3-ubyte",
            "t10k-images-idx3-ubyte.gz",
            "t10k-images.idx3-ubyte",
            "t10k-images.idx3-ubyte.gz",
        ],
    }
}

/// The first MNIST file of `split` present in `dir`, if any.
pub(crate) fn find_mnist_file(dir: &Path, split: Split) -> Option<PathBuf> {
    mnist_names(split).iter().map(|name| dir.join(name)).find(|path| path.is_file())
}

/// Whether `bytes` start like some IDX file (two zero bytes, a known element type, 1 to 4
/// dimensions), so that [`super::load`] can give IDX files of the wrong kind a precise error.
pub(crate) fn looks_like_idx(bytes: &[u8]) -> bool {
    matches!(bytes, [0, 0, 0x08 | 0x09 | 0x0b | 0x0c | 0x0d | 0x0e, 1..=4, ..])
}

/// The IDX image file for a single-channel dataset: header `0x00000803, N, H, W`, then the pixels.
///
/// # Errors
/// [`Error::InvalidConfig`] if the dataset has more than one channel, or a dimension does not
/// fit in a `u32`.
pub fn encode_idx(dataset: &Dataset) -> Result<Vec<u8>> {
    if dataset.channels() != 1 {
        return Err(Error::config(
            "IDX export",
            format!(
                "IDX image files hold one channel; {} has {}",
                dataset.source().display(),
                dataset.channels()
            ),
        ));
    }
    let mut out = Vec::with_capacity(IDX_IMAGES_HEADER + dataset.pixels().len());
    out.extend_from_slice(&IDX_IMAGES_MAGIC.to_be_bytes());
    for dim in [dataset.len(), dataset.height(), dataset.width()] {
        let dim = u32::try_from(dim)
            .map_err(|_| Error::config("IDX export", format!("dimension {dim} exceeds u32")))?;
        out.extend_from_slice(&dim.to_be_bytes());
    }
    out.extend_from_slice(dataset.pixels());
    Ok(out)
}

/// Writes a single-channel dataset as an IDX image file, gzip-compressed when `path` ends in
/// `.gz`, atomically (see [`crate::files::write_atomic`]).
///
/// # Errors
/// Those of [`encode_idx`], and [`Error::Io`] if the file cannot be written.
pub fn write_idx(path: &Path, dataset: &Dataset) -> Result<()> {
    let raw = encode_idx(dataset)?;
    let bytes = if has_gz_extension(path) { gzip(&raw) } else { raw };
    crate::files::write_atomic(path, &bytes)
}

/// Big-endian `u32` at `at`, if the bytes are there.
fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits(n: usize, h: usize, w: usize) -> Dataset {
        let pixels = (0..n * h * w).map(|i| (i * 31 % 256) as u8).collect();
        Dataset::new(pixels, n, 1, h, w, "digits").expect("valid shape")
    }

    fn message(err: Error) -> String {
        assert!(matches!(err, Error::BadFile { .. }), "{err:?}");
        err.to_string()
    }

    #[test]
    fn idx_round_trips_plain_and_gzip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = digits(7, 5, 4);
        for name in ["x-idx3-ubyte", "x-idx3-ubyte.gz"] {
            let path = dir.path().join(name);
            write_idx(&path, &d).expect("write");
            let got = load_idx(&path).expect("read");
            assert_eq!(got.shape(), [7, 1, 5, 4]);
            assert_eq!(got.pixels(), d.pixels());
            assert_eq!(got.source(), path);
        }
        let gz = std::fs::read(dir.path().join("x-idx3-ubyte.gz")).expect("read back");
        assert_eq!(gz[..2], [0x1f, 0x8b]);
        let raw = crate::data::gunzip_if_needed(&gz, Path::new("x"), 1 << 30).expect("gunzip");
        assert_eq!(parse_idx(&raw, Path::new("x")).expect("parse").pixels(), d.pixels());
    }

    #[test]
    fn header_is_big_endian_with_the_image_magic() {
        let bytes = encode_idx(&digits(2, 28, 28)).expect("encode");
        assert_eq!(bytes[..16], [0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28]);
        assert_eq!(bytes.len(), 16 + 2 * 28 * 28);
    }

    #[test]
    fn truncated_idx_is_refused_naming_the_file() {
        let mut bytes = encode_idx(&digits(3, 4, 4)).expect("encode");
        bytes.truncate(bytes.len() - 5);
        let msg = message(parse_idx(&bytes, Path::new("/d/train-images-idx3-ubyte")).expect_err("short"));
        assert!(msg.contains("/d/train-images-idx3-ubyte") && msg.contains("truncated"), "{msg}");
        assert!(msg.contains("2 whole images"), "{msg}");
        let msg = message(parse_idx(&bytes[..10], Path::new("h")).expect_err("short header"));
        assert!(msg.contains("header is truncated"), "{msg}");
        let msg = message(parse_idx(&[], Path::new("empty")).expect_err("empty"));
        assert!(msg.contains("empty or truncated"), "{msg}");
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode_idx(&digits(2, 3, 3)).expect("encode");
        bytes.push(0);
        let msg = message(parse_idx(&bytes, Path::new("t")).expect_err("long"));
        assert!(msg.contains("1 bytes follow"), "{msg}");
    }

    #[test]
    fn wrong_magic_is_refused_with_the_reason() {
        let mut bytes = encode_idx(&digits(1, 2, 2)).expect("encode");
        bytes[..4].copy_from_slice(&0x0000_0801u32.to_be_bytes());
        assert!(message(parse_idx(&bytes, Path::new("l")).expect_err("labels")).contains("label"));
        bytes[..4].copy_from_slice(&0x0000_0d03u32.to_be_bytes());
        let msg = message(parse_idx(&bytes, Path::new("f")).expect_err("f32"));
        assert!(msg.contains("element type 0x0d"), "{msg}");
        bytes[..4].copy_from_slice(b"\x89PNG");
        let msg = message(parse_idx(&bytes, Path::new("p.png")).expect_err("png"));
        assert!(msg.contains("not an IDX image file") && msg.contains("p.png"), "{msg}");
    }

    #[test]
    fn zero_dimensions_are_refused() {
        let mut bytes = encode_idx(&digits(1, 2, 2)).expect("encode");
        bytes[4..8].copy_from_slice(&0u32.to_be_bytes());
        let msg = message(parse_idx(&bytes[..16], Path::new("z")).expect_err("zero"));
        assert!(msg.contains("0 images"), "{msg}");
    }

    #[test]
    fn absurd_header_sizes_do_not_overflow() {
        let mut bytes = Vec::new();
        for v in [IDX_IMAGES_MAGIC, u32::MAX, u32::MAX, u32::MAX] {
            bytes.extend_from_slice(&v.to_be_bytes());
        }
        assert!(parse_idx(&bytes, Path::new("huge")).is_err());
    }

    #[test]
    fn mnist_folder_reads_the_split_by_standard_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let train = digits(3, 28, 28);
        let test = digits(2, 28, 28);
        write_idx(&dir.path().join("train-images-idx3-ubyte.gz"), &train).expect("write");
        write_idx(&dir.path().join("t10k-images.idx3-ubyte"), &test).expect("write");
        assert_eq!(load_mnist_dir(dir.path(), Split::Train).expect("train").len(), 3);
        assert_eq!(load_mnist_dir(dir.path(), Split::Test).expect("test").len(), 2);
        let empty = tempfile::tempdir().expect("temp dir");
        let msg = message(load_mnist_dir(empty.path(), Split::Test).expect_err("none"));
        assert!(msg.contains("t10k-images-idx3-ubyte"), "{msg}");
    }

    #[test]
    fn encode_refuses_rgb() {
        let d = Dataset::new(vec![0; 12], 1, 3, 2, 2, "rgb").expect("valid shape");
        assert!(matches!(encode_idx(&d), Err(Error::InvalidConfig { .. })));
    }

    #[test]
    fn label_file_names_follow_the_images_file() {
        let names = |p: &str| -> Vec<String> {
            labels_paths_for(Path::new(p)).iter().map(|p| p.display().to_string()).collect()
        };
        assert_eq!(
            names("/d/train-images-idx3-ubyte.gz"),
            ["/d/train-labels-idx1-ubyte", "/d/train-labels-idx1-ubyte.gz"]
        );
        assert_eq!(names("t10k-images.idx3-ubyte"), ["t10k-labels.idx1-ubyte", "t10k-labels.idx1-ubyte.gz"]);
        assert_eq!(names("squares-idx3-ubyte"), ["squares-idx1-ubyte", "squares-idx1-ubyte.gz"]);
        assert!(names("digits.idx.gz").is_empty());
    }

    #[test]
    fn labels_load_from_the_file_next_to_the_images_plain_or_gzip() {
        let dir = tempfile::tempdir().expect("temp dir");
        let images = dir.path().join("train-images-idx3-ubyte.gz");
        write_idx(&images, &digits(4, 2, 2)).expect("write");
        let labels = encode_idx_labels(&[7, 0, 9, 3]);
        std::fs::write(dir.path().join("train-labels-idx1-ubyte.gz"), gzip(&labels)).expect("write");
        assert_eq!(load_labels_for(&images, 4).expect("labels"), [7, 0, 9, 3]);
        // The uncompressed name is preferred when both exist.
        std::fs::write(dir.path().join("train-labels-idx1-ubyte"), encode_idx_labels(&[1, 1, 1, 1]))
            .expect("write");
        assert_eq!(load_labels_for(&images, 4).expect("labels"), [1, 1, 1, 1]);
    }

    #[test]
    fn missing_label_file_names_what_was_looked_for() {
        let dir = tempfile::tempdir().expect("temp dir");
        let images = dir.path().join("x-images-idx3-ubyte");
        write_idx(&images, &digits(2, 2, 2)).expect("write");
        let msg = message(load_labels_for(&images, 2).expect_err("no labels"));
        assert!(msg.contains("x-labels-idx1-ubyte") && msg.contains("x-images-idx3-ubyte"), "{msg}");
        let msg = message(load_labels_for(&dir.path().join("plain.idx"), 2).expect_err("no idx3"));
        assert!(msg.contains("no `idx3`"), "{msg}");
    }

    #[test]
    fn label_count_must_equal_the_image_count() {
        let bytes = encode_idx_labels(&[1, 2, 3]);
        let msg = message(
            parse_idx_labels(&bytes, Path::new("/d/t10k-labels-idx1-ubyte"), Some(4)).expect_err("3 != 4"),
        );
        assert!(
            msg.contains("/d/t10k-labels-idx1-ubyte") && msg.contains("3 labels") && msg.contains("4 images"),
            "{msg}"
        );
        assert_eq!(parse_idx_labels(&bytes, Path::new("l"), Some(3)).expect("fits"), [1, 2, 3]);
        assert_eq!(parse_idx_labels(&bytes, Path::new("l"), None).expect("any count"), [1, 2, 3]);
    }

    #[test]
    fn bad_label_files_are_refused_with_the_reason() {
        let good = encode_idx_labels(&[1, 2, 3]);
        let msg = message(parse_idx_labels(&good[..6], Path::new("h"), None).expect_err("short header"));
        assert!(msg.contains("too short"), "{msg}");
        let msg = message(parse_idx_labels(&good[..10], Path::new("t"), Some(3)).expect_err("short body"));
        assert!(msg.contains("truncated"), "{msg}");
        let mut long = good.clone();
        long.push(0);
        let msg = message(parse_idx_labels(&long, Path::new("t"), None).expect_err("long"));
        assert!(msg.contains("too long"), "{msg}");
        let images = encode_idx(&digits(3, 2, 2)).expect("encode");
        let msg = message(parse_idx_labels(&images, Path::new("i"), Some(3)).expect_err("images"));
        assert!(msg.contains("image file"), "{msg}");
        let msg = message(parse_idx_labels(b"\x89PNG\r\n\x1a\n", Path::new("p"), None).expect_err("png"));
        assert!(msg.contains("not an IDX label file"), "{msg}");
        let msg = message(parse_idx_labels(&encode_idx_labels(&[]), Path::new("z"), None).expect_err("zero"));
        assert!(msg.contains("0 labels"), "{msg}");
    }

    #[test]
    fn huge_label_headers_are_refused_before_allocating() {
        let mut head = IDX_LABELS_MAGIC.to_be_bytes().to_vec();
        head.extend_from_slice(&u32::MAX.to_be_bytes());
        // Plain: the header promises 4 GiB that are not there.
        let msg = message(parse_idx_labels(&head, Path::new("huge"), None).expect_err("truncated"));
        assert!(msg.contains("truncated"), "{msg}");
        // Gzip: the declared size is checked against what the compressed bytes can inflate to.
        let gz = gzip(&head);
        let err =
            crate::data::parse_label_file_bytes(&gz, Path::new("huge.gz"), 1 << 30, None).expect_err("huge");
        assert!(matches!(err, Error::BadFile { .. }), "{err:?}");
        // A count smaller than the first gzip read (16 bytes) stops at the declared size.
        let mut short = encode_idx_labels(&[1, 2]);
        short.extend_from_slice(&[0; 20]);
        let err = crate::data::parse_label_file_bytes(&gzip(&short), Path::new("s.gz"), 1 << 30, None)
            .expect_err("more than declared");
        assert!(matches!(err, Error::BadFile { .. }), "{err:?}");
    }
}
