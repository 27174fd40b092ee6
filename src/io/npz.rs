//! NumPy `.npz` archives: write named `f64`/`f32`/`i64` arrays, read every array back as `f64`.
//!
//! These are the exchange format with Python reference code (`np.savez`, `np.load`): vectors of
//! schedule values, losses, or samples to compare against. Archives are written uncompressed
//! (`np.savez`, not `savez_compressed`) and atomically; each array is stored as `<name>.npy`, as
//! NumPy does. Reading accepts arrays of `f64`, `f32`, `i64`, `i32`, `u8` and `bool`, in either
//! C or Fortran order, and converts them to `f64` in C order; `i64` values beyond ±2^53 lose
//! precision in that conversion.

use std::io::Cursor;
use std::path::Path;

use ndarray::{ArrayD, ArrayView, ArrayViewD, Dimension};
use ndarray_npy::{NpzWriter, ReadNpyError, ReadNpyExt};

use crate::error::{Error, Result};

/// An array to write, borrowed, of one of the element types [`write_npz`] stores.
#[derive(Clone, Debug)]
pub enum NpzArray<'a> {
    /// Stored as `<f8`.
    F64(ArrayViewD<'a, f64>),
    /// Stored as `<f4`.
    F32(ArrayViewD<'a, f32>),
    /// Stored as `<i8` (NumPy's `int64`).
    I64(ArrayViewD<'a, i64>),
}

impl<'a, D: Dimension> From<ArrayView<'a, f64, D>> for NpzArray<'a> {
    fn from(view: ArrayView<'a, f64, D>) -> Self {
        NpzArray::F64(view.into_dyn())
    }
}

impl<'a, D: Dimension> From<ArrayView<'a, f32, D>> for NpzArray<'a> {
    fn from(view: ArrayView<'a, f32, D>) -> Self {
        NpzArray::F32(view.into_dyn())
    }
}

impl<'a, D: Dimension> From<ArrayView<'a, i64, D>> for NpzArray<'a> {
    fn from(view: ArrayView<'a, i64, D>) -> Self {
        NpzArray::I64(view.into_dyn())
    }
}

/// Element type of an array found in an archive by [`read_npz`], before its conversion to `f64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NpzDtype {
    /// `float64`
    F64,
    /// `float32`
    F32,
    /// `int64`
    I64,
    /// `int32`
    I32,
    /// `uint8`
    U8,
    /// `bool` (false → 0, true → 1)
    Bool,
}

/// One array of an archive, as [`read_npz`] returns it.
#[derive(Clone, Debug, PartialEq)]
pub struct NpzEntry {
    /// The array's name (without the `.npy` suffix).
    pub name: String,
    /// Its element type in the file.
    pub dtype: NpzDtype,
    /// Its values converted to `f64`, with its shape, C order.
    pub values: ArrayD<f64>,
}

/// Writes the named arrays to an uncompressed `.npz` at `path`, atomically
/// ([`crate::files::write_atomic`]); `np.load(path)[name]` gives each back with its dtype and shape.
///
/// # Errors
/// [`Error::InvalidConfig`] if two arrays share a name or a name is empty; [`Error::Io`] if the
/// file cannot be written (the folder must exist).
pub fn write_npz(path: &Path, arrays: &[(&str, NpzArray<'_>)]) -> Result<()> {
    let mut names = std::collections::BTreeSet::new();
    for (name, _) in arrays {
        if name.is_empty() || !names.insert(*name) {
            return Err(Error::config(
                "npz array name",
                format!("`{name}` is empty or used twice in {}", path.display()),
            ));
        }
    }
    let mut writer = NpzWriter::new(Cursor::new(Vec::new()));
    let failed = |e: ndarray_npy::WriteNpzError| {
        Error::io(path, std::io::Error::other(format!("cannot build the npz archive: {e}")))
    };
    for (name, array) in arrays {
        match array {
            NpzArray::F64(a) => writer.add_array(*name, a),
            NpzArray::F32(a) => writer.add_array(*name, a),
            NpzArray::I64(a) => writer.add_array(*name, a),
        }
        .map_err(failed)?;
    }
    let bytes = writer.finish().map_err(failed)?.into_inner();
    crate::files::write_atomic(path, &bytes)
}

/// Reads every array of the `.npz` at `path`, in archive order, converted to `f64` (see the
/// module documentation for the element types accepted). Archives may be stored or deflated
/// (`np.savez` or `np.savez_compressed`); each member is read only up to the size the archive
/// declares for it, which must be within [`crate::files::memory_cap`], and its `.npy` header
/// must account exactly for its bytes.
///
/// # Errors
/// - [`Error::Io`] if the file cannot be read.
/// - [`Error::BadFile`] naming the file if it is not a zip archive of `.npy` files, is truncated,
///   declares sizes it does not hold, or holds an array of another element type (the message
///   names the array).
pub fn read_npz(path: &Path) -> Result<Vec<NpzEntry>> {
    let cap = crate::files::memory_cap();
    let bytes = crate::files::read_capped(path, cap)?;
    read_npz_bytes(&bytes, path, cap)
}

/// [`read_npz`] for bytes in memory, with `cap` the most bytes one member may inflate to;
/// `source` names them in errors.
///
/// # Errors
/// As [`read_npz`], without the I/O.
pub fn read_npz_bytes(bytes: &[u8], source: &Path, cap: u64) -> Result<Vec<NpzEntry>> {
    use std::io::Read;
    let corrupt = |e: &dyn std::fmt::Display| {
        Error::bad_file(
            source,
            format!("not a valid npz archive, or corrupt/truncated ({})", crate::files::folded(e)),
        )
    };
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| corrupt(&e))?;
    // The zip crate indexes members by name, so a second member of one name would silently
    // replace the first: compare with the count the archive's end record declares.
    if let Some(declared) = crate::files::zip_declared_entries(bytes) {
        if declared != archive.len() {
            return Err(corrupt(&format!(
                "{declared} members are listed but only {} distinct names: two members share a name",
                archive.len()
            )));
        }
    }
    let mut entries: Vec<NpzEntry> = Vec::with_capacity(archive.len().min(1 << 16));
    for index in 0..archive.len() {
        let mut file = archive.by_index(index).map_err(|e| corrupt(&e))?;
        let file_name = file.name().to_string();
        let name = file_name.strip_suffix(".npy").unwrap_or(&file_name).to_string();
        let declared = file.size();
        let member = |reason: String| Error::bad_file(source, format!("array `{name}`: {reason}"));
        // The header is read first and checked against the member's declared size; only then is
        // the array read, straight from the (decompressing) member into its one allocation.
        let mut head = Vec::new();
        let header = crate::files::read_npy_header(
            &mut TeeReader { inner: &mut file, copy: &mut head },
            Path::new(&name),
        )
        .map_err(|e| member(e.to_string()))?;
        let data = declared
            .checked_sub(head.len() as u64)
            .ok_or_else(|| member("shorter than its header".into()))?;
        let (kind, size) = crate::files::check_npy_header(&header, data, Path::new(&name))
            .map_err(|e| member(e.to_string()))?;
        // Every array becomes f64: count that size against the cap.
        let as_f64 = data / size * 8;
        crate::files::check_declared_size(
            source,
            &format!("array `{name}` (as float64)"),
            as_f64.max(declared),
            cap,
        )?;
        let reader = Cursor::new(head).chain((&mut file).take(data.saturating_add(1)));
        let (dtype, values) = read_as_f64(reader, kind, size).map_err(|e| match e {
            ReadNpyError::WrongDescriptor(descr) => member(format!(
                "element type {}; only f64, f32, i64, i32, u8 and bool can be read",
                crate::files::folded(&descr)
            )),
            other => member(crate::files::folded(&other)),
        })?;
        entries.push(NpzEntry { name, dtype, values });
    }
    Ok(entries)
}

/// A reader that keeps a copy of what it reads (the `.npy` header, re-read by the array parser).
struct TeeReader<'a, R> {
    inner: &'a mut R,
    copy: &'a mut Vec<u8>,
}

impl<R: std::io::Read> std::io::Read for TeeReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Reads a float32 `.npy` file (`np.save(path, x.astype(np.float32))`), any shape.
///
/// # Errors
/// [`Error::Io`] if unreadable; [`Error::BadFile`] naming the file if it is not a `.npy`, its
/// header does not match its length, or its element type is not float32 (the message says how
/// to convert it).
pub fn read_npy_f32(path: &Path) -> Result<ArrayD<f32>> {
    let bytes = crate::files::read_capped(path, crate::files::memory_cap())?;
    parse_npy_f32(&bytes, path)
}

/// [`read_npy_f32`] for bytes in memory; `source` names them in errors.
///
/// # Errors
/// As [`read_npy_f32`], without the I/O.
pub fn parse_npy_f32(bytes: &[u8], source: &Path) -> Result<ArrayD<f32>> {
    crate::files::check_npy(bytes, source)?;
    ArrayD::<f32>::read_npy(Cursor::new(bytes)).map_err(|e| match e {
        ReadNpyError::WrongDescriptor(descr) => Error::bad_file(
            source,
            format!("element type {descr}, expected float32; save it with x.astype(np.float32)"),
        ),
        other => Error::bad_file(source, format!("not a valid .npy file ({other})")),
    })
}

/// Writes `array` as a float32 `.npy` file at `path`, atomically ([`crate::files::write_atomic`]).
///
/// # Errors
/// [`Error::Io`] if the file cannot be written (the folder must exist).
pub fn write_npy_f32(path: &Path, array: &ArrayD<f32>) -> Result<()> {
    use ndarray_npy::WriteNpyExt;
    let mut bytes = Vec::new();
    array
        .write_npy(&mut bytes)
        .map_err(|e| Error::io(path, std::io::Error::other(format!("cannot encode the .npy: {e}"))))?;
    crate::files::write_atomic(path, &bytes)
}

/// Reads a checked `.npy` (its header's element `kind` and `size`) as `f64` in C order, keeping
/// an `f64` array that is already in C order as it is.
fn read_as_f64(
    reader: impl std::io::Read,
    kind: char,
    size: u64,
) -> Result<(NpzDtype, ArrayD<f64>), ReadNpyError> {
    fn c_order(a: ArrayD<f64>) -> ArrayD<f64> {
        if a.is_standard_layout() {
            a
        } else {
            a.as_standard_layout().into_owned()
        }
    }
    Ok(match (kind, size) {
        ('f', 8) => (NpzDtype::F64, c_order(ArrayD::<f64>::read_npy(reader)?)),
        ('f', 4) => (NpzDtype::F32, c_order(ArrayD::<f32>::read_npy(reader)?.mapv(f64::from))),
        ('i', 8) => (NpzDtype::I64, c_order(ArrayD::<i64>::read_npy(reader)?.mapv(|v| v as f64))),
        ('i', 4) => (NpzDtype::I32, c_order(ArrayD::<i32>::read_npy(reader)?.mapv(f64::from))),
        ('u', 1) => (NpzDtype::U8, c_order(ArrayD::<u8>::read_npy(reader)?.mapv(f64::from))),
        // Anything else is read as bool, whose parser names the descriptor if it is not one.
        _ => (NpzDtype::Bool, c_order(ArrayD::<bool>::read_npy(reader)?.mapv(|v| f64::from(u8::from(v))))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr1, arr2, Array1, Array3, ShapeBuilder};

    #[test]
    fn npz_round_trips_f64_f32_and_i64_with_shapes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("v.npz");
        let betas = Array1::linspace(1e-4, 0.02, 1000);
        let x = Array3::from_shape_fn((2, 3, 4), |(a, b, c)| (a * 12 + b * 4 + c) as f32 / 7.0);
        let t = arr1(&[0i64, 999, -5, 1 << 40]);
        write_npz(&path, &[("betas", betas.view().into()), ("x", x.view().into()), ("t", t.view().into())])
            .expect("write");
        let read = read_npz(&path).expect("read");
        let names: Vec<&str> = read.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["betas", "x", "t"]);
        assert_eq!(read[0].dtype, NpzDtype::F64);
        assert_eq!(read[0].values, betas.into_dyn());
        assert_eq!(read[1].dtype, NpzDtype::F32);
        assert_eq!(read[1].values, x.mapv(f64::from).into_dyn());
        assert_eq!(read[2].dtype, NpzDtype::I64);
        assert_eq!(read[2].values, t.mapv(|v| v as f64).into_dyn());
        assert!(!dir.path().join("v.npz.tmp").exists());
    }

    #[test]
    fn i32_u8_bool_and_fortran_order_arrays_read_as_f64_in_c_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("mixed.npz");
        // Written directly with ndarray-npy, as NumPy would write these types.
        let mut writer = NpzWriter::new(std::fs::File::create(&path).expect("create"));
        writer.add_array("i", &arr1(&[-3i32, 7])).expect("i32");
        writer.add_array("u", &arr1(&[0u8, 255])).expect("u8");
        writer.add_array("b", &arr1(&[true, false])).expect("bool");
        let fortran =
            ndarray::Array2::from_shape_vec((2, 2).f(), vec![1.0f64, 3.0, 2.0, 4.0]).expect("shape");
        writer.add_array("f", &fortran).expect("fortran");
        writer.finish().expect("finish");
        let read = read_npz(&path).expect("read");
        assert_eq!((read[0].dtype, read[0].values.clone()), (NpzDtype::I32, arr1(&[-3.0, 7.0]).into_dyn()));
        assert_eq!((read[1].dtype, read[1].values.clone()), (NpzDtype::U8, arr1(&[0.0, 255.0]).into_dyn()));
        assert_eq!((read[2].dtype, read[2].values.clone()), (NpzDtype::Bool, arr1(&[1.0, 0.0]).into_dyn()));
        assert_eq!(read[3].values, arr2(&[[1.0, 2.0], [3.0, 4.0]]).into_dyn());
        assert!(read[3].values.is_standard_layout());
    }

    #[test]
    fn unsupported_element_types_are_refused_naming_the_array() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("u16.npz");
        let mut writer = NpzWriter::new(std::fs::File::create(&path).expect("create"));
        writer.add_array("counts", &arr1(&[1u16, 2])).expect("u16");
        writer.finish().expect("finish");
        let msg = read_npz(&path).expect_err("u16").to_string();
        assert!(msg.contains("u16.npz") && msg.contains("counts"), "{msg}");
    }

    #[test]
    fn truncated_or_foreign_files_are_bad_files_naming_the_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("v.npz");
        write_npz(&path, &[("a", arr1(&[1.0f64, 2.0, 3.0]).view().into())]).expect("write");
        let bytes = std::fs::read(&path).expect("read");
        let cut = dir.path().join("cut.npz");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
        let err = read_npz(&cut).expect_err("truncated");
        assert!(matches!(err, Error::BadFile { .. }));
        assert!(err.to_string().contains("cut.npz"), "{err}");
        let text = dir.path().join("text.npz");
        std::fs::write(&text, "not a zip").expect("write");
        assert!(matches!(read_npz(&text), Err(Error::BadFile { .. })));
        assert!(matches!(read_npz(&dir.path().join("none.npz")), Err(Error::Io { .. })));
    }

    #[test]
    fn duplicate_or_empty_names_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = arr1(&[1.0f64]);
        let path = dir.path().join("d.npz");
        let dup = [("a", a.view().into()), ("a", a.view().into())];
        assert!(matches!(write_npz(&path, &dup), Err(Error::InvalidConfig { .. })));
        assert!(matches!(write_npz(&path, &[("", a.view().into())]), Err(Error::InvalidConfig { .. })));
        assert!(!path.exists());
    }

    #[test]
    fn an_archive_with_two_members_of_one_name_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("two.npz");
        let (zeros, fives) = (arr1(&[0.0f64; 3]), arr1(&[5.0f64; 3]));
        write_npz(&path, &[("a", zeros.view().into()), ("b", fives.view().into())]).expect("write");
        let mut bytes = std::fs::read(&path).expect("read");
        // Rename member `b.npy` to `a.npy` wherever the name is stored (local and central headers).
        let mut renamed = 0;
        for i in 0..bytes.len() - 5 {
            if &bytes[i..i + 5] == b"b.npy" {
                bytes[i] = b'a';
                renamed += 1;
            }
        }
        assert_eq!(renamed, 2);
        let err = read_npz_bytes(&bytes, Path::new("two.npz"), 1 << 20).expect_err("two members named a");
        assert!(err.to_string().contains("share a name"), "{err}");
    }

    #[test]
    fn a_member_is_read_once_and_its_declared_size_counts_against_the_cap() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("big.npz");
        let a = ndarray::Array1::from_elem(1000, 0.5f32);
        write_npz(&path, &[("a", a.view().into())]).expect("write");
        let bytes = std::fs::read(&path).expect("read");
        // 1000 f32 become 8000 bytes of f64.
        assert!(read_npz_bytes(&bytes, Path::new("big.npz"), 8000).is_ok());
        let err = read_npz_bytes(&bytes, Path::new("big.npz"), 7999).expect_err("over the cap");
        assert!(err.to_string().contains("DDPM_MAX_DATA_MIB"), "{err}");
    }
}
