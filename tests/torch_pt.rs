//! The `.pt` reader (`ddpm::interop::torch_pt`) on files torch.save wrote: the fixtures of
//! tests/fixtures/torch_pt/, made by tests/fixtures/make_torch_pt_fixture.py (torch 2.15.0,
//! numpy 2.4.6). Accepted files are compared bit for bit with the float32 values the script
//! stored beside them in a `.npz`; refused ones must give one line naming what is refused.

use std::path::{Path, PathBuf};

use ddpm::interop::torch_pt::{self, StateDict};
use ddpm::{Error, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_pt").join(name)
}

/// The expected (name, float32 array) pairs, in the order the script wrote them.
fn expected(npz: &str) -> Vec<(String, ndarray::ArrayD<f32>)> {
    let file = std::fs::File::open(fixture(npz)).expect("fixture");
    let mut z = ndarray_npy::NpzReader::new(file).expect("npz");
    let names = z.names().expect("names");
    names.into_iter().map(|n| (n.clone(), z.by_name(&n).expect("f32 array"))).collect()
}

fn assert_same_bits(got: &[(String, Tensor)], want: &[(String, ndarray::ArrayD<f32>)]) {
    let names = |v: &[(String, _)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "names, in file order");
    for ((name, g), (_, w)) in got.iter().zip(want) {
        assert_eq!(g.shape(), w.shape(), "{name}: shape");
        let bits = |a: &ndarray::ArrayD<f32>| a.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(g), bits(w), "{name}: values");
    }
}

fn read(name: &str) -> StateDict {
    torch_pt::read_file(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The error for a refused fixture: a `BadFile` naming the file, on one line.
fn refusal(name: &str) -> String {
    let e = torch_pt::read_file(&fixture(name)).expect_err(name);
    let msg = e.to_string();
    assert!(matches!(e, Error::BadFile { .. }), "{name}: {e:?}");
    assert!(msg.contains(name) && !msg.contains('\n'), "{name}: {msg}");
    msg
}

#[test]
fn a_module_state_dict_with_shared_storages_and_odd_shapes_reads_bit_exactly() {
    let want = expected("state_dict.npz");
    for file in ["state_dict.pt", "state_dict_proto4.pt", "deflated.pt"] {
        let sd = read(file);
        assert_same_bits(&sd.tensors, &want);
        assert_eq!(
            (sd.nested_under, sd.stripped_module_prefix, sd.converted_from_f64),
            (None, false, 0),
            "{file}"
        );
    }
    let sd = read("state_dict.pt");
    let get = |n: &str| &sd.tensors.iter().find(|(k, _)| k == n).expect(n).1;
    assert_eq!(get("scalar").ndim(), 0);
    assert_eq!(get("one").shape(), &[1]);
    assert_eq!(get("empty").shape(), &[0, 3]);
    assert_eq!(get("shared.col").shape(), &[4, 1]);
    // A view reads the elements of the storage it views.
    assert_eq!(get("shared.row").as_slice(), get("shared.base").slice(ndarray::s![1, ..]).to_slice());
}

#[test]
fn the_path_and_bytes_entry_points_agree() {
    let path = fixture("state_dict.pt");
    let by_path = torch_pt::read_state_dict(&path).expect("reads");
    let bytes = std::fs::read(&path).expect("fixture");
    let by_bytes = torch_pt::parse_state_dict(&bytes, &path).expect("parses");
    let bits = |v: &[(String, Tensor)]| {
        v.iter().map(|(n, t)| (n.clone(), t.shape().to_vec(), t.map(|x| x.to_bits()))).collect::<Vec<_>>()
    };
    assert_eq!(bits(&by_path), bits(&by_bytes));
}

#[test]
fn float64_tensors_are_rounded_to_the_nearest_float32() {
    let sd = read("f64.pt");
    assert_same_bits(&sd.tensors, &expected("f64.npz"));
    assert_eq!(sd.converted_from_f64, 3);
    assert!(sd.tensors[2].1[[0]].is_infinite(), "1e300 is beyond float32");
}

#[test]
fn a_checkpoint_dict_yields_its_one_state_dict_without_the_data_parallel_prefix() {
    let sd = read("nested.pt");
    assert_same_bits(&sd.tensors, &expected("nested.npz"));
    assert_eq!(sd.nested_under.as_deref(), Some("state_dict"));
    assert!(sd.stripped_module_prefix);
}

#[test]
fn unsupported_files_are_refused_in_one_line_naming_what_is_unsupported() {
    let cases: [(&str, &[&str]); 8] = [
        ("ambiguous.pt", &["2 state dicts", "`model`", "`ema`"]),
        ("fp16.pt", &["tensor `b`", "float16", "master weights"]),
        ("int.pt", &["tensor `num_batches_tracked`", "int64"]),
        ("transposed.pt", &["tensor `w`", "strides [1, 3]", "shape [3, 2]", ".contiguous()"]),
        ("legacy.pt", &["legacy format", "re-save"]),
        ("whole_model.pt", &["GLOBAL `torch.nn.modules.linear.Linear`", "never runs code"]),
        ("forbidden_global.pt", &["byte 2", "GLOBAL `os.system`", "never runs code"]),
        ("unknown_opcode.pt", &["byte 5", "opcode 0xff (not a pickle opcode)"]),
    ];
    for (file, words) in cases {
        let msg = refusal(file);
        eprintln!("{msg}");
        for w in words {
            assert!(msg.contains(w), "{file}: `{w}` missing from: {msg}");
        }
    }
}

#[test]
fn a_corrupted_storage_or_a_tight_cap_is_an_error_naming_the_file() {
    let path = fixture("state_dict.pt");
    let mut bytes = std::fs::read(&path).expect("fixture");
    // Flip a bit of the first tensor's first value, where its storage member holds it.
    let first =
        expected("state_dict.npz")[0].1.iter().flat_map(|x| x.to_le_bytes()).take(8).collect::<Vec<u8>>();
    let at = bytes.windows(8).position(|w| w == first).expect("the storage is stored as is");
    bytes[at] ^= 0x10;
    let e = torch_pt::parse_state_dict(&bytes, &path).expect_err("checksum");
    assert!(e.to_string().contains("state_dict.pt"), "{e}");
    let ok = std::fs::read(&path).expect("fixture");
    let e = torch_pt::parse_bytes(&ok, &path, 1000).expect_err("over the cap");
    assert!(e.to_string().contains("DDPM_MAX_DATA_MIB"), "{e}");
    for cut in [0, 10, ok.len() / 3, ok.len() - 1] {
        assert!(torch_pt::parse_state_dict(&ok[..cut], &path).is_err(), "truncated at {cut}");
    }
}
