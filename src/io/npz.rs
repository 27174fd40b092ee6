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
        Error::bad_file(source, format!("not a valid npz archive, or corrupt/truncated ({e})"))
    };
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| corrupt(&e))?;
    let mut entries: Vec<NpzEntry> = Vec::with_capacity(archive.len().min(1 << 16));
    for index in 0..archive.len() {
        let mut file = archive.by_index(index).map_err(|e| corrupt(&e))?;
        let file_name = file.name().to_string();
        let name = file_name.strip_suffix(".npy").unwrap_or(&file_name).to_string();
        let declared = file.size();
        let member = Path::new(&file_name);
        crate::files::check_declared_size(source, &format!("array `{name}`"), declared, cap)?;
        let mut npy = Vec::with_capacity(declared.min(bytes.len() as u64 * 2) as usize);
        (&mut file).take(declared.saturating_add(1)).read_to_end(&mut npy).map_err(|e| corrupt(&e))?;
        if npy.len() as u64 != declared {
            return Err(corrupt(&format!(
                "array `{name}` holds {} bytes, not the {declared} its entry declares",
                npy.len()
            )));
        }
        crate::files::check_npy(&npy, member).map_err(|e| match e {
            Error::BadFile { reason, .. } => Error::bad_file(source, format!("array `{name}`: {reason}")),
            other => other,
        })?;
        let (dtype, values) = read_any(&npy).map_err(|e| match e {
            ReadNpyError::WrongDescriptor(descr) => Error::bad_file(
                source,
                format!(
                    "array `{name}` has element type {descr}; only f64, f32, i64, i32, u8 and bool \
                     can be read"
                ),
            ),
            other => corrupt(&format!("array `{name}`: {other}")),
        })?;
        if entries.iter().any(|e| e.name == name) {
            return Err(corrupt(&format!("two arrays are named `{name}`")));
        }
        entries.push(NpzEntry { name, dtype, values });
    }
    Ok(entries)
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

/// Reads a checked `.npy` as the first element type that matches its descriptor.
fn read_any(npy: &[u8]) -> Result<(NpzDtype, ArrayD<f64>), ReadNpyError> {
    /// Tries one element type; `Ok(None)` when the descriptor names another type.
    fn attempt<T: ndarray_npy::ReadableElement>(npy: &[u8]) -> Result<Option<ArrayD<T>>, ReadNpyError> {
        match ArrayD::<T>::read_npy(Cursor::new(npy)) {
            Ok(array) => Ok(Some(array)),
            Err(ReadNpyError::WrongDescriptor(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
    if let Some(a) = attempt::<f64>(npy)? {
        return Ok((NpzDtype::F64, a.as_standard_layout().into_owned()));
    }
    if let Some(a) = attempt::<f32>(npy)? {
        return Ok((NpzDtype::F32, a.mapv(f64::from).as_standard_layout().into_owned()));
    }
    if let Some(a) = attempt::<i64>(npy)? {
        return Ok((NpzDtype::I64, a.mapv(|v| v as f64).as_standard_layout().into_owned()));
    }
    if let Some(a) = attempt::<i32>(npy)? {
        return Ok((NpzDtype::I32, a.mapv(f64::from).as_standard_layout().into_owned()));
    }
    if let Some(a) = attempt::<u8>(npy)? {
        return Ok((NpzDtype::U8, a.mapv(f64::from).as_standard_layout().into_owned()));
    }
    // The last type reports the descriptor if it does not match either.
    let a = ArrayD::<bool>::read_npy(Cursor::new(npy))?;
    Ok((NpzDtype::Bool, a.mapv(|v| f64::from(u8::from(v))).as_standard_layout().into_owned()))
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
}
