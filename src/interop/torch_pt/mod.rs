//! PyTorch `.pt` state dicts (`torch.save(model.state_dict(), path)`), read without Python and
//! without running any of the file's pickle.
//!
//! # The format
//! Since torch 1.6, `torch.save` writes a zip archive whose members are stored uncompressed under
//! one top folder (`archive/`, or the file's stem in older versions):
//!
//! | member                 | holds                                                           |
//! |------------------------|-----------------------------------------------------------------|
//! | `data.pkl`             | the saved object, pickled (protocol 2 unless told otherwise), each tensor's storage replaced by a persistent id |
//! | `data/<key>`           | one storage's raw elements, in the byte order below             |
//! | `byteorder`            | `little` or `big` (torch ≥ 1.10; older files are little-endian)  |
//! | `version`, `.format_version`, `.storage_alignment`, `.data/…` | bookkeeping, ignored  |
//!
//! In the pickle, a state dict is an `OrderedDict` built by REDUCE and filled by SETITEMS; each
//! value is `torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
//! requires_grad, backward_hooks)`, whose storage is the persistent id
//! `('storage', torch.FloatStorage, key, location, numel)` (BINPERSID); a saved `nn.Parameter`
//! wraps that in `torch._utils._rebuild_parameter`; a BUILD at the end sets the dict's
//! `_metadata` attribute (module versions), which is not an item and is ignored.
//!
//! # The subset read
//! The pickle interpreter (`torch_pt/pickle.rs`) knows only these opcodes, and builds data
//! without calling anything: PROTO, FRAME, STOP, MARK, EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE,
//! TUPLE, TUPLE1/2/3, NONE, NEWTRUE, NEWFALSE, BININT, BININT1, BININT2, LONG1 (up to 64 bits),
//! BINFLOAT, BINUNICODE, SHORT_BINUNICODE, BINUNICODE8, BINPUT, LONG_BINPUT, MEMOIZE, BINGET,
//! LONG_BINGET, SETITEM, SETITEMS, APPEND, APPENDS, GLOBAL and STACK_GLOBAL (only
//! `collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`,
//! `torch._utils._rebuild_parameter` and the storage classes
//! `torch.{Float,Double,Half,BFloat16,Long,Int,Short,Char,Byte,Bool}Storage`), REDUCE (on those
//! callables), BUILD (on a dict) and BINPERSID (a storage id). Anything else is refused with the
//! opcode's byte, name and offset, or the GLOBAL's name: a whole pickled model
//! (`torch.save(model)`), numpy scalars, optimizer state holding other objects.
//!
//! # What comes out
//! The state dict's names, in file order, with their values as float32 [`Tensor`]s:
//! - float32 tensors exactly; float64 ones rounded to the nearest float32;
//! - float16 and bfloat16 tensors are refused: a half-precision state dict means the float32
//!   master weights were not saved (guided-diffusion's `--use_fp16` checkpoints still hold
//!   float32 weights); integer and bool tensors (a BatchNorm's `num_batches_tracked`) are refused
//!   naming the tensor, since a DDPM U-Net has none;
//! - a tensor must be a contiguous row-major view (strides of a C-order array, any offset) of
//!   its storage; views sharing one storage are read from the one member. Other strides (a
//!   transposed view) are refused: `.contiguous()` before saving fixes them;
//! - the file may hold the state dict itself (a dict or `OrderedDict` of tensors), or a dict
//!   with exactly one entry that is such a dict (`{"state_dict": …, "step": …}`, or under
//!   `model`, `ema`, …); [`StateDict::nested_under`] says which. Two candidates are refused as
//!   ambiguous, naming them;
//! - if every name starts with `module.` (`nn.DataParallel`), the prefix is removed
//!   ([`StateDict::stripped_module_prefix`]).
//!
//! The legacy format (torch < 1.6 or `_use_new_zipfile_serialization=False`: a bare pickle
//! stream), TorchScript archives and big-endian files are refused with the way to re-save them.
//!
//! # Hostile files
//! Every size the file declares is checked against the bytes present and against the memory
//! cap ([`crate::files::memory_cap`]) before anything is allocated: `data.pkl` is at most
//! [`MAX_PICKLE_BYTES`] and its parse is charged at 128 bytes per byte; each tensor's view must
//! lie inside its storage, whose declared length must equal its member's; the float32 output
//! of all tensors together (a hostile file can view one storage many times) must fit the cap.
//! The pickle interpreter has no recursion and shares memoized values instead of copying them.
//! `tests/fuzz_parsers.rs` and `fuzz/` fuzz [`parse_bytes`] (target `torch_pt`).

mod archive;
mod pickle;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;

use archive::PtArchive;
pub use archive::MAX_PICKLE_BYTES;
use pickle::{quoted, DType, Id, Pickled, TensorRef, Value};

use crate::error::{Error, Result};
use crate::Tensor;

/// A state dict read from a `.pt` file, with the choices the reader made on the way.
#[derive(Clone, Debug)]
pub struct StateDict {
    /// Names (less a stripped `module.` prefix) and float32 values, in the file's order.
    pub tensors: Vec<(String, Tensor)>,
    /// The top-level key the state dict was found under (`state_dict`, `model`, `ema`, …), or
    /// `None` when the file holds the state dict itself.
    pub nested_under: Option<String>,
    /// Whether every name began with `module.` (an `nn.DataParallel` model) and lost it.
    pub stripped_module_prefix: bool,
    /// How many tensors were float64 and were rounded to float32.
    pub converted_from_f64: usize,
}

/// Reads the state dict of the `.pt` file at `path`: names in file order → float32 tensors
/// (see the module documentation for what is accepted). [`read_file`] also says where the state
/// dict was found.
///
/// # Errors
/// As [`read_file`].
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Ok(read_file(path)?.tensors)
}

/// [`read_state_dict`] for the bytes of a `.pt` file in memory, bounded by
/// [`crate::files::memory_cap`]; `source` names them in errors.
///
/// # Errors
/// As [`parse_bytes`].
pub fn parse_state_dict(bytes: &[u8], source: &Path) -> Result<Vec<(String, Tensor)>> {
    Ok(parse_bytes(bytes, source, crate::files::memory_cap())?.tensors)
}

/// Reads the `.pt` file at `path` (at most [`crate::files::memory_cap`] bytes, which also bounds
/// the file and everything read from it together).
///
/// # Errors
/// [`Error::Io`] if it cannot be read; otherwise as [`parse_bytes`].
pub fn read_file(path: &Path) -> Result<StateDict> {
    let cap = crate::files::memory_cap();
    let bytes = crate::files::read_capped(path, cap)?;
    parse_bytes(&bytes, path, cap.saturating_sub(bytes.len() as u64))
}

/// Parses the bytes of a `.pt` file, allocating at most `cap` bytes beyond them; `source` names
/// them in errors.
///
/// # Errors
/// [`Error::BadFile`] naming `source`, on one line, for: a legacy, TorchScript, big-endian or
/// non-zip file; a corrupt archive or a member whose size differs from what the pickle needs; a
/// pickle opcode or GLOBAL outside the subset (its name and offset); no state dict, or two;
/// an entry that is not a tensor or a repeated name; a half-precision, integer or non-contiguous
/// tensor, or one outside its storage (each naming the tensor); sizes beyond `cap`.
pub fn parse_bytes(bytes: &[u8], source: &Path, cap: u64) -> Result<StateDict> {
    let bad = |reason: String| Error::bad_file(source, reason);
    let mut budget = Budget { source, cap, used: 0, stored: 0, viewed: 0 };
    let mut archive = PtArchive::open(bytes, source, &mut budget)?;
    let pkl_name = archive.member("data.pkl");
    let pkl_size = archive.size_of(&pkl_name).unwrap_or(0);
    if pkl_size > MAX_PICKLE_BYTES {
        return Err(bad(format!(
            "{} declares {pkl_size} bytes, more than the {MAX_PICKLE_BYTES} a state dict's pickle needs \
             (some 80,000 tensors)",
            quoted(&pkl_name)
        )));
    }
    budget
        .take(&format!("{} (parsed)", quoted(&pkl_name)), pkl_size.saturating_mul(pickle::MEMORY_PER_BYTE))?;
    let pkl = archive.read(&pkl_name, Some(pkl_size), &mut budget)?;
    let tree = pickle::load(&pkl).map_err(|m| bad(format!("{}, {m}", quoted(&pkl_name))))?;
    let chosen = select(&tree, source)?;
    let entries = named_tensors(&tree, chosen.items, source)?;
    let stripped_module_prefix = !entries.is_empty() && entries.iter().all(|(n, _)| n.starts_with("module."));
    let mut storages = HashMap::new();
    let mut state = StateDict {
        tensors: Vec::with_capacity(entries.len()),
        nested_under: chosen.under.map(str::to_string),
        stripped_module_prefix,
        converted_from_f64: 0,
    };
    for (name, t) in entries {
        let name = if stripped_module_prefix { &name["module.".len()..] } else { name };
        let (tensor, dtype) = read_tensor(name, &t, &tree, &mut archive, &mut storages, &mut budget)?;
        state.converted_from_f64 += usize::from(dtype == DType::F64);
        state.tensors.push((name.to_string(), tensor));
    }
    Ok(state)
}

/// A running total of the bytes a parse allocates, refused past the cap; and of the values the
/// storages hold and the tensors view, so that many views of one storage cannot multiply a small
/// file into a large allocation.
struct Budget<'a> {
    source: &'a Path,
    cap: u64,
    used: u64,
    /// Values in the storages read so far.
    stored: u64,
    /// Values in the tensors made so far.
    viewed: u64,
}

/// How many times the values stored the tensors may view in all (a tensor saved under two names
/// shares its storage; a state dict has no reason to go further), plus a fixed allowance.
const MAX_VIEW_FACTOR: u64 = 4;
const VIEW_ALLOWANCE: u64 = 1 << 20;

impl Budget<'_> {
    /// Charges `bytes` for `what`.
    ///
    /// # Errors
    /// [`Error::BadFile`] ([`crate::files::check_declared_size`]'s) if the total exceeds the cap.
    fn take(&mut self, what: &str, bytes: u64) -> Result<()> {
        let total = self.used.saturating_add(bytes);
        let what =
            if self.used == 0 { what.to_string() } else { format!("{what}, with what was read before it,") };
        crate::files::check_declared_size(self.source, &what, total, self.cap)?;
        self.used = total;
        Ok(())
    }
}

/// The dict of a file that holds the tensors.
struct Chosen<'t> {
    /// The top-level key it is under, or `None` for the top-level dict itself.
    under: Option<&'t str>,
    /// Its (key, value) pairs.
    items: &'t [(Id, Id)],
}

/// The dict holding the tensors: the top-level one if it holds any tensor, else its one entry
/// that is a dict holding tensors.
fn select<'t>(tree: &'t Pickled, source: &Path) -> Result<Chosen<'t>> {
    let Value::Dict(top) = &tree.values[tree.root] else {
        return Err(Error::bad_file(
            source,
            format!("holds {}, not a state dict (a dict of tensors)", tree.values[tree.root].kind()),
        ));
    };
    let has_tensor =
        |items: &[(Id, Id)]| items.iter().any(|&(_, v)| matches!(tree.values[v], Value::Tensor(_)));
    if has_tensor(top) {
        return Ok(Chosen { under: None, items: top });
    }
    let nested: Vec<(&str, &[(Id, Id)])> = top
        .iter()
        .filter_map(|&(k, v)| match (&tree.values[k], &tree.values[v]) {
            (Value::Str(k), Value::Dict(d)) if has_tensor(d) => Some((k.as_str(), d.as_slice())),
            _ => None,
        })
        .collect();
    let keys = |names: &mut dyn Iterator<Item = &str>| {
        let mut list: Vec<String> = names.take(9).map(quoted).collect();
        if list.len() == 9 {
            list[8] = "…".into();
        }
        list.join(", ")
    };
    match nested.as_slice() {
        &[(key, items)] => Ok(Chosen { under: Some(key), items }),
        [] => Err(Error::bad_file(
            source,
            format!(
                "holds no tensors, neither at the top (a dict with keys [{}]) nor in a dict under one of \
                 its keys; is it a state dict?",
                keys(&mut top.iter().map(|&(k, _)| tree.str(k)))
            ),
        )),
        several => Err(Error::bad_file(
            source,
            format!(
                "holds {} state dicts (under {}); save the one to read alone, e.g. \
                 torch.save(ckpt[\"ema\"], \"ema.pt\")",
                several.len(),
                keys(&mut several.iter().map(|(k, _)| *k))
            ),
        )),
    }
}

/// The chosen dict's entries as names and tensor descriptions, refusing anything else.
fn named_tensors<'t>(
    tree: &'t Pickled,
    items: &[(Id, Id)],
    source: &Path,
) -> Result<Vec<(&'t str, TensorRef)>> {
    let mut seen = HashSet::with_capacity(items.len());
    let mut out = Vec::with_capacity(items.len());
    for &(k, v) in items {
        let Value::Str(name) = &tree.values[k] else {
            return Err(Error::bad_file(
                source,
                format!("the state dict has a key that is {}, not a name", tree.values[k].kind()),
            ));
        };
        let Value::Tensor(t) = tree.values[v] else {
            return Err(Error::bad_file(
                source,
                format!(
                    "state dict entry {} is {}, not a tensor; ddpm reads state dicts whose every entry is a \
                     tensor",
                    quoted(name),
                    tree.values[v].kind()
                ),
            ));
        };
        if !seen.insert(name.as_str()) {
            return Err(Error::bad_file(source, format!("state dict entry {} appears twice", quoted(name))));
        }
        out.push((name.as_str(), t));
    }
    Ok(out)
}

/// One storage as read: its element type, length and bytes.
type StorageData<'a> = (DType, u64, Cow<'a, [u8]>);

/// Builds tensor `name` from its description, reading its storage (once per key).
fn read_tensor<'a, 't>(
    name: &str,
    t: &TensorRef,
    tree: &'t Pickled,
    archive: &mut PtArchive<'a>,
    storages: &mut HashMap<&'t str, StorageData<'a>>,
    budget: &mut Budget<'_>,
) -> Result<(Tensor, DType)> {
    let source = budget.source;
    let who = format!("tensor {}", quoted(name));
    let bad = |reason: String| Error::bad_file(source, format!("{who} {reason}"));
    let Value::Storage(storage) = tree.values[t.storage] else {
        unreachable!("REDUCE checked that a tensor's first argument is a storage")
    };
    let dtype = storage.dtype;
    match dtype {
        DType::F32 | DType::F64 => {}
        DType::F16 | DType::BF16 => {
            return Err(bad(format!(
                "is {}: the checkpoint holds half-precision weights, not the float32 master weights ddpm \
                 needs; save the float32 state dict (guided-diffusion's checkpoints hold it even with \
                 --use_fp16)",
                dtype.name()
            )))
        }
        _ => {
            return Err(bad(format!(
                "holds {} values, not float weights (a buffer such as BatchNorm's num_batches_tracked?); \
                 ddpm reads only the float32 or float64 weights of a U-Net",
                dtype.name()
            )))
        }
    }
    let (size, stride) = (tree.dims(t.size), tree.dims(t.stride));
    let numel = size.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
    // ndarray needs the product of the non-zero sizes in isize even for an empty tensor.
    let nonzero = size.iter().filter(|&&d| d != 0).try_fold(1u64, |n, &d| n.checked_mul(d));
    let (Some(numel), Some(_)) = (numel, nonzero.filter(|&n| n <= isize::MAX as u64 / 8)) else {
        return Err(bad(format!("has shape {size:?}, more elements than any storage holds")));
    };
    let key = tree.str(storage.key);
    let end = t.offset.checked_add(numel).filter(|&end| numel == 0 || end <= storage.numel);
    let Some(end) = end else {
        return Err(bad(format!(
            "views elements {}..{} of storage {}, which holds {}",
            t.offset,
            t.offset.saturating_add(numel),
            quoted(key),
            storage.numel
        )));
    };
    if numel > 0 {
        let mut expected = 1;
        for (&d, &s) in size.iter().zip(&stride).rev() {
            if d != 1 && s != expected {
                return Err(bad(format!(
                    "has strides {stride:?} for shape {size:?}: not a contiguous row-major view (a transposed \
                     or sliced tensor); save it with .contiguous()"
                )));
            }
            expected *= d;
        }
    }
    let data = match storages.entry(key) {
        std::collections::hash_map::Entry::Occupied(e) => {
            let (d, n, _) = e.get();
            if (*d, *n) != (dtype, storage.numel) {
                return Err(bad(format!(
                    "declares storage {} as {} {}, where another tensor declared {n} {}",
                    quoted(key),
                    storage.numel,
                    dtype.name(),
                    d.name()
                )));
            }
            &e.into_mut().2
        }
        std::collections::hash_map::Entry::Vacant(e) => {
            let len = storage
                .numel
                .checked_mul(dtype.size())
                .ok_or_else(|| bad("has a storage too large".into()))?;
            let member = archive.member(&format!("data/{key}"));
            budget.stored = budget.stored.saturating_add(storage.numel);
            &e.insert((dtype, storage.numel, archive.read(&member, Some(len), budget)?)).2
        }
    };
    budget.viewed = budget.viewed.saturating_add(numel);
    if budget.viewed > budget.stored.saturating_mul(MAX_VIEW_FACTOR).saturating_add(VIEW_ALLOWANCE) {
        return Err(bad(format!(
            "makes the tensors view {} values of the {} stored, more than {MAX_VIEW_FACTOR} times over; \
             a state dict whose tensors overlap this much is refused",
            budget.viewed, budget.stored
        )));
    }
    // The output, with ndarray's shape and strides (two words per axis).
    let out_bytes = numel.saturating_mul(4).saturating_add(16 * size.len() as u64 + 64);
    budget.take(&format!("{who} as float32"), out_bytes)?;
    let (es, start, end) = (dtype.size() as usize, t.offset as usize, end as usize);
    let bytes = if numel == 0 { &[][..] } else { &data[start * es..end * es] };
    let values: Vec<f32> = match dtype {
        DType::F64 => {
            bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect()
        }
        _ => bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect(),
    };
    let shape: Vec<usize> = size.iter().map(|&d| d as usize).collect();
    let tensor = Tensor::from_shape_vec(shape, values).map_err(|e| bad(format!("cannot be built ({e})")))?;
    Ok((tensor, dtype))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::pickle::tests::Writer;
    use super::*;

    /// A `.pt` archive as torch lays it out: `archive/data.pkl`, `archive/byteorder` and the
    /// given storages under `archive/data/`.
    fn pt(pickle: &[u8], storages: &[(&str, Vec<u8>)], byteorder: &[u8]) -> Vec<u8> {
        let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let stored =
            zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
        let mut add = |name: &str, bytes: &[u8]| {
            z.start_file(name, stored).expect("zip in memory");
            z.write_all(bytes).expect("zip in memory");
        };
        add("archive/data.pkl", pickle);
        add("archive/byteorder", byteorder);
        for (key, bytes) in storages {
            add(&format!("archive/data/{key}"), bytes);
        }
        z.finish().expect("zip in memory").into_inner()
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn parse(pickle: &[u8], storages: &[(&str, Vec<u8>)]) -> Result<StateDict> {
        parse_bytes(&pt(pickle, storages, b"little"), Path::new("m.pt"), 1 << 20)
    }

    fn refused(pickle: &[u8], storages: &[(&str, Vec<u8>)]) -> String {
        let e = parse(pickle, storages).expect_err("refused");
        assert!(matches!(e, Error::BadFile { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.starts_with("m.pt: ") && !msg.contains('\n'), "{msg}");
        msg
    }

    #[test]
    fn views_of_one_storage_read_their_own_elements() {
        let p = Writer::state_dict(&[
            &|w| {
                w.str("all").tensor("FloatStorage", "0", 6, 0, &[2, 3], &[3, 1]);
            },
            &|w| {
                w.str("tail").tensor("FloatStorage", "0", 6, 4, &[2], &[1]);
            },
        ]);
        let sd = parse(&p, &[("0", f32_bytes(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]))]).expect("valid");
        assert_eq!(sd.tensors[0].1.shape(), &[2, 3]);
        assert_eq!(sd.tensors[1].1.as_slice(), Some(&[4.0f32, 5.0][..]));
    }

    #[test]
    fn many_views_of_one_storage_cannot_multiply_a_small_file() {
        // 600 names for the same 4096 values: 2.4 million values to decode from 16 KiB stored.
        type Entry = Box<dyn Fn(&mut Writer)>;
        let names: Vec<String> = (0..600).map(|i| format!("w{i}")).collect();
        let entries: Vec<Entry> = names
            .iter()
            .map(|n| {
                let n = n.clone();
                Box::new(move |w: &mut Writer| {
                    w.str(&n).tensor("FloatStorage", "0", 4096, 0, &[4096], &[1]);
                }) as Entry
            })
            .collect();
        let refs: Vec<&dyn Fn(&mut Writer)> = entries.iter().map(|b| b.as_ref()).collect();
        let file = pt(&Writer::state_dict(&refs), &[("0", f32_bytes(&[0.5; 4096]))], b"little");
        let e = parse_bytes(&file, Path::new("m.pt"), 1 << 34).expect_err("refused").to_string();
        assert!(e.contains("more than 4 times over"), "{e}");
        // Two names for one tensor (tied weights) are fine.
        let two: Vec<&dyn Fn(&mut Writer)> = refs[..2].to_vec();
        let file = pt(&Writer::state_dict(&two), &[("0", f32_bytes(&[0.5; 4096]))], b"little");
        assert_eq!(parse_bytes(&file, Path::new("m.pt"), 1 << 34).expect("valid").tensors.len(), 2);
    }

    #[test]
    fn module_prefixes_are_stripped_only_when_every_name_has_one() {
        let two = |a: &'static str, b: &'static str| {
            let (fa, fb) = (
                move |w: &mut Writer| {
                    w.str(a).tensor("FloatStorage", "0", 1, 0, &[], &[]);
                },
                move |w: &mut Writer| {
                    w.str(b).tensor("FloatStorage", "0", 1, 0, &[], &[]);
                },
            );
            Writer::state_dict(&[&fa, &fb])
        };
        let storage = [("0", f32_bytes(&[1.5]))];
        let sd = parse(&two("module.a", "module.b"), &storage).expect("valid");
        assert!(sd.stripped_module_prefix);
        assert_eq!(sd.tensors.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let sd = parse(&two("module.a", "b"), &storage).expect("valid");
        assert!(!sd.stripped_module_prefix && sd.tensors[0].0 == "module.a");
        assert!(refused(&two("a", "a"), &storage).contains("`a` appears twice"));
    }

    #[test]
    fn bfloat16_and_integer_tensors_are_refused_naming_them() {
        for (class, bytes, words) in [
            ("BFloat16Storage", vec![0u8; 2], "tensor `x` is bfloat16"),
            ("BoolStorage", vec![1u8], "tensor `x` holds bool values"),
        ] {
            let p = Writer::state_dict(&[&|w| {
                w.str("x").tensor(class, "0", 1, 0, &[1], &[1]);
            }]);
            let msg = refused(&p, &[("0", bytes)]);
            assert!(msg.contains(words), "{msg}");
        }
    }

    #[test]
    fn views_outside_their_storage_and_storages_of_the_wrong_length_are_refused() {
        let one = |numel: u32, offset: u32, size: u32| {
            Writer::state_dict(&[&move |w: &mut Writer| {
                w.str("x").tensor("FloatStorage", "0", numel, offset, &[size], &[1]);
            }])
        };
        let four = [("0", f32_bytes(&[1.0; 4]))];
        assert!(refused(&one(4, 2, 3), &four).contains("views elements 2..5 of storage `0`, which holds 4"));
        assert!(refused(&one(5, 0, 1), &four).contains("declares 16 bytes where 20 are expected"));
        assert!(refused(&one(4, 0, 1), &[]).contains("`archive/data/0`: missing"));
        // An empty view may sit anywhere.
        let sd = parse(&one(4, 200, 0), &four).expect("valid");
        assert_eq!(sd.tensors[0].1.shape(), &[0]);
    }

    #[test]
    fn one_storage_declared_with_two_types_is_refused() {
        let p = Writer::state_dict(&[
            &|w| {
                w.str("a").tensor("FloatStorage", "0", 2, 0, &[2], &[1]);
            },
            &|w| {
                w.str("b").tensor("DoubleStorage", "0", 1, 0, &[1], &[1]);
            },
        ]);
        let msg = refused(&p, &[("0", vec![0; 8])]);
        assert!(msg.contains(
            "tensor `b` declares storage `0` as 1 float64, where another tensor declared 2 float32"
        ));
    }

    #[test]
    fn many_views_of_one_storage_are_bounded_by_the_cap() {
        // 5 names viewing one 256 KiB storage: 1.25 MiB of output from a file of 260 KiB (within
        // the view factor; many_views_of_one_storage_cannot_multiply_a_small_file goes beyond).
        type Entry = Box<dyn Fn(&mut Writer)>;
        let entries: Vec<Entry> = (0..5)
            .map(|i| {
                Box::new(move |w: &mut Writer| {
                    w.str(&format!("v{i}")).tensor("FloatStorage", "0", 65536, 0, &[256, 256], &[256, 1]);
                }) as Entry
            })
            .collect();
        let refs: Vec<&dyn Fn(&mut Writer)> = entries.iter().map(|b| b.as_ref()).collect();
        let p = Writer::state_dict(&refs);
        let file = pt(&p, &[("0", f32_bytes(&[0.5; 65536]))], b"little");
        let e = parse_bytes(&file, Path::new("m.pt"), 1 << 20).expect_err("over the cap");
        assert!(e.to_string().contains("as float32, with what was read before it"), "{e}");
        assert_eq!(parse_bytes(&file, Path::new("m.pt"), 40 << 20).expect("fits").tensors.len(), 5);
    }

    #[test]
    fn entries_that_are_not_tensors_and_files_without_tensors_are_refused() {
        let p = Writer::state_dict(&[
            &|w| {
                w.str("w").tensor("FloatStorage", "0", 1, 0, &[], &[]);
            },
            &|w| {
                w.str("extra").int(3);
            },
        ]);
        assert!(refused(&p, &[("0", f32_bytes(&[1.0]))]).contains("entry `extra` is an int, not a tensor"));
        let p = Writer::state_dict(&[&|w| {
            w.str("step").int(3);
        }]);
        assert!(refused(&p, &[]).contains("holds no tensors"));
        // Deeply nested lists do not recurse anywhere: 100,000 levels, refused as no state dict.
        let mut w = Writer::default();
        for _ in 0..100_000 {
            w.op(b']');
        }
        for _ in 1..100_000 {
            w.op(b'a');
        }
        w.op(b'.');
        let e = parse_bytes(&pt(&w.0, &[], b"little"), Path::new("m.pt"), 1 << 30).expect_err("a list");
        assert!(e.to_string().contains("holds a list, not a state dict"), "{e}");
    }

    #[test]
    fn other_formats_are_refused_with_the_way_to_re_save_them() {
        let src = Path::new("m.pt");
        let p = Writer::state_dict(&[]);
        let cases: [(Vec<u8>, &str); 5] = [
            (vec![0x80, 2, 0x8a, 10], "legacy format"),
            ([vec![0; 257], b"ustar".to_vec()].concat(), "tar format"),
            (b"{\"a\": 1}".to_vec(), "not a PyTorch .pt file"),
            (pt(&p, &[], b"big"), "byteorder `big`"),
            (b"PK\x03\x04garbage".to_vec(), "not a valid .pt zip archive"),
        ];
        for (bytes, words) in cases {
            let e = parse_bytes(&bytes, src, 1 << 20).expect_err(words).to_string();
            assert!(e.contains(words), "{e}");
        }
    }
}
