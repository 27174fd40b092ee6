//! Named `f32` tensors and string metadata in a `.safetensors` file (the format of Hugging Face's
//! `safetensors`: an 8-byte little-endian header length, a JSON header, then the raw data).
//!
//! - **Writing** ([`save_atomic`]) produces the same bytes for the same tensors and metadata:
//!   the header is written here with its keys sorted (the `safetensors` crate's own writer keeps
//!   the metadata in a `HashMap`, whose order changes from run to run), the data follows in name
//!   order, and the header is padded with spaces to a multiple of 8 bytes as the format asks.
//!   Tensors are stored as `F32`, little-endian, row-major (logical order, whatever the memory
//!   layout of the array).
//! - **Reading** ([`load`]) goes through the `safetensors` crate, which checks the header and
//!   that the offsets cover the data exactly, so a truncated or padded file is refused. `F32`
//!   tensors load as they are; `F64` tensors are accepted and narrowed to `f32` (round to
//!   nearest; values beyond `f32`'s range become ±∞), so weights exported from NumPy/PyTorch in
//!   double precision load too. Other dtypes are refused, naming the tensor.

use std::collections::BTreeMap;
use std::path::Path;

use ::safetensors::{Dtype, SafeTensors};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::Tensor;

/// The reserved header key holding the string metadata.
const METADATA_KEY: &str = "__metadata__";

/// What [`load`] returns: every tensor by name, and the string metadata (empty if the file has
/// none).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loaded {
    /// The tensors, by name, each with its stored shape.
    pub tensors: BTreeMap<String, Tensor>,
    /// The `__metadata__` map of the header.
    pub metadata: BTreeMap<String, String>,
}

/// One tensor's entry in the JSON header.
#[derive(Serialize)]
struct TensorEntry<'a> {
    dtype: &'static str,
    shape: &'a [usize],
    data_offsets: [usize; 2],
}

/// A value of the JSON header: the metadata map, or a tensor's entry.
#[derive(Serialize)]
#[serde(untagged)]
enum HeaderEntry<'a> {
    Metadata(&'a BTreeMap<String, String>),
    Tensor(TensorEntry<'a>),
}

/// The bytes of a `.safetensors` file holding `tensors` (as `F32`) and `metadata`; the same
/// input always gives the same bytes (see the module documentation).
///
/// # Errors
/// [`Error::InvalidConfig`] if two tensors share a name or a tensor is named `__metadata__`.
pub fn to_bytes(tensors: &[(String, &Tensor)], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut by_name: BTreeMap<&str, &Tensor> = BTreeMap::new();
    for (name, tensor) in tensors {
        if name == METADATA_KEY {
            return Err(Error::config(
                "checkpoint",
                format!("`{METADATA_KEY}` is reserved, not a tensor name"),
            ));
        }
        if by_name.insert(name.as_str(), tensor).is_some() {
            return Err(Error::config("checkpoint", format!("two tensors are named `{name}`")));
        }
    }
    let mut header: BTreeMap<&str, HeaderEntry> = BTreeMap::new();
    if !metadata.is_empty() {
        header.insert(METADATA_KEY, HeaderEntry::Metadata(metadata));
    }
    let mut offset = 0;
    for (&name, tensor) in &by_name {
        let len = tensor.len() * std::mem::size_of::<f32>();
        let entry = TensorEntry { dtype: "F32", shape: tensor.shape(), data_offsets: [offset, offset + len] };
        header.insert(name, HeaderEntry::Tensor(entry));
        offset += len;
    }
    let mut json = serde_json::to_vec(&header).expect("a map of strings and numbers serialises");
    json.resize(json.len().next_multiple_of(8), b' ');

    let mut out = Vec::with_capacity(8 + json.len() + offset);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    for tensor in by_name.values() {
        for v in tensor.iter() {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    Ok(out)
}

/// Saves `tensors` (each as `F32` with its shape) and `metadata` to `path`: written to
/// a uniquely named temporary file, synced, renamed over `path`, folder synced ([`crate::files::write_atomic`]). A crash at
/// any point leaves the previous file intact.
///
/// # Errors
/// Those of [`to_bytes`]; [`Error::Io`] if the file cannot be written (the folder must exist).
pub fn save_atomic(
    path: &Path,
    tensors: &[(String, &Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let bytes = to_bytes(tensors, metadata)?;
    crate::files::write_atomic(path, &bytes)
}

/// Loads every tensor and the metadata of a `.safetensors` file. `F64` tensors are narrowed to
/// `f32` (see the module documentation).
///
/// # Errors
/// - [`Error::Io`] if the file cannot be read.
/// - [`Error::BadFile`] naming the file if it is not a safetensors file, or is corrupt or
///   truncated, or holds a tensor of a dtype other than `F32`/`F64`.
pub fn load(path: &Path) -> Result<Loaded> {
    let bytes = crate::files::read_capped(path, crate::files::memory_cap())?;
    from_bytes(&bytes, path)
}

/// [`load`] for bytes already in memory; `source` names them in errors.
///
/// # Errors
/// As [`load`], without the I/O.
pub fn from_bytes(bytes: &[u8], source: &Path) -> Result<Loaded> {
    let corrupt = |e: ::safetensors::SafeTensorError| {
        Error::bad_file(
            source,
            format!(
                "not a valid safetensors file, or corrupt/truncated ({e}); use another checkpoint \
                 (e.g. the previous one) or save it again"
            ),
        )
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(corrupt)?;
    let file = SafeTensors::deserialize(bytes).map_err(corrupt)?;
    let metadata: BTreeMap<String, String> = header
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let mut tensors = BTreeMap::new();
    for (name, view) in file.iter() {
        let data = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => {
                data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
                .collect(),
            other => {
                return Err(Error::bad_file(
                    source,
                    format!("tensor `{name}` is {other:?}; only F32 (and F64, narrowed) can be loaded"),
                ))
            }
        };
        // The crate checked that the data fills the shape, but ndarray also needs the product
        // of the non-zero axes to fit in isize (a header can declare [0, 2^40, 2^40]).
        let tensor = Tensor::from_shape_vec(ndarray::IxDyn(view.shape()), values).map_err(|e| {
            Error::bad_file(
                source,
                format!("tensor `{name}` has an impossible shape {:?} ({e})", view.shape()),
            )
        })?;
        tensors.insert(name.to_string(), tensor);
    }
    Ok(Loaded { tensors, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn, ShapeBuilder};

    fn sample() -> (Vec<(String, Tensor)>, BTreeMap<String, String>) {
        let a =
            ArrayD::from_shape_fn(IxDyn(&[2, 3, 4]), |i| (i[0] * 12 + i[1] * 4 + i[2]) as f32 * 0.25 - 1.0);
        let b = ArrayD::from_elem(IxDyn(&[5]), f32::MIN_POSITIVE);
        let scalar = ArrayD::from_elem(IxDyn(&[]), 3.5f32);
        let empty = ArrayD::<f32>::zeros(IxDyn(&[0, 4]));
        let tensors = vec![
            ("unet.conv.weight".to_string(), a),
            ("bias".to_string(), b),
            ("step_scale".to_string(), scalar),
            ("empty".to_string(), empty),
        ];
        let metadata = BTreeMap::from([
            ("step".to_string(), "1200".to_string()),
            ("config".to_string(), "{\"ch\":64}".to_string()),
            ("note".to_string(), "ünïcødé".to_string()),
        ]);
        (tensors, metadata)
    }

    fn refs(tensors: &[(String, Tensor)]) -> Vec<(String, &Tensor)> {
        tensors.iter().map(|(n, t)| (n.clone(), t)).collect()
    }

    #[test]
    fn save_then_load_gives_equal_tensors_and_metadata() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ckpt.safetensors");
        let (tensors, metadata) = sample();
        save_atomic(&path, &refs(&tensors), &metadata).expect("save");
        let loaded = load(&path).expect("load");
        assert_eq!(loaded.metadata, metadata);
        assert_eq!(loaded.tensors.len(), tensors.len());
        for (name, t) in &tensors {
            assert_eq!(&loaded.tensors[name], t, "{name}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 1, "no temporary file is left");
    }

    #[test]
    fn bytes_are_deterministic_and_independent_of_argument_order() {
        let (tensors, metadata) = sample();
        let first = to_bytes(&refs(&tensors), &metadata).expect("bytes");
        let mut reversed = refs(&tensors);
        reversed.reverse();
        assert_eq!(to_bytes(&reversed, &metadata).expect("bytes"), first);
        let header_len = u64::from_le_bytes(first[..8].try_into().expect("8 bytes")) as usize;
        assert_eq!(header_len % 8, 0);
    }

    #[test]
    fn non_standard_layouts_are_stored_in_logical_order() {
        let fortran = ndarray::Array2::from_shape_vec((2, 3).f(), vec![1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0])
            .expect("shape")
            .into_dyn();
        let bytes = to_bytes(&[("m".to_string(), &fortran)], &BTreeMap::new()).expect("bytes");
        let loaded = from_bytes(&bytes, Path::new("m")).expect("load");
        assert_eq!(loaded.tensors["m"].as_slice().expect("standard layout"), &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn f64_tensors_written_by_the_safetensors_crate_are_narrowed() {
        let values: Vec<u8> = [0.5f64, -2.25, 1e-3].iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = ::safetensors::tensor::TensorView::new(Dtype::F64, vec![3], &values).expect("view");
        let bytes = ::safetensors::serialize([("x", view)], None).expect("serialize");
        let loaded = from_bytes(&bytes, Path::new("x")).expect("load");
        assert_eq!(loaded.tensors["x"].as_slice().expect("contiguous"), &[0.5, -2.25, 1e-3f64 as f32]);
        assert!(loaded.metadata.is_empty());
    }

    #[test]
    fn other_dtypes_are_refused_naming_the_tensor() {
        let values = [1u8, 2, 3];
        let view = ::safetensors::tensor::TensorView::new(Dtype::U8, vec![3], &values).expect("view");
        let bytes = ::safetensors::serialize([("labels", view)], None).expect("serialize");
        let msg = from_bytes(&bytes, Path::new("/c/x.safetensors")).expect_err("u8").to_string();
        assert!(msg.contains("/c/x.safetensors") && msg.contains("labels") && msg.contains("U8"), "{msg}");
    }

    #[test]
    fn truncated_file_is_a_bad_file_naming_the_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cut.safetensors");
        let (tensors, metadata) = sample();
        let bytes = to_bytes(&refs(&tensors), &metadata).expect("bytes");
        for keep in [0, 5, 8, 40, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..keep]).expect("write");
            let err = load(&path).expect_err("truncated");
            let msg = err.to_string();
            assert!(matches!(err, Error::BadFile { .. }), "{keep}: {err:?}");
            assert!(msg.contains("cut.safetensors") && msg.contains("corrupt/truncated"), "{msg}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(from_bytes(&longer, Path::new("long")).is_err());
    }

    #[test]
    fn a_file_of_another_format_is_a_bad_file() {
        let err = from_bytes(b"\x89PNG\r\n\x1a\n0000000000000000", Path::new("img.png")).expect_err("png");
        assert!(matches!(err, Error::BadFile { .. }));
        assert!(err.to_string().contains("img.png"));
    }

    #[test]
    fn a_missing_file_is_an_io_error() {
        assert!(matches!(load(Path::new("/no/such.safetensors")), Err(Error::Io { .. })));
    }

    #[test]
    fn duplicate_and_reserved_names_are_refused() {
        let t = ArrayD::<f32>::zeros(IxDyn(&[1]));
        let dup = [("a".to_string(), &t), ("a".to_string(), &t)];
        assert!(matches!(to_bytes(&dup, &BTreeMap::new()), Err(Error::InvalidConfig { .. })));
        let reserved = [(METADATA_KEY.to_string(), &t)];
        assert!(matches!(to_bytes(&reserved, &BTreeMap::new()), Err(Error::InvalidConfig { .. })));
    }
}
