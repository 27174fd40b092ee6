//! The short fuzz run of the suite: structured mutations of valid files, driven by proptest,
//! against every parser that reads users' files (the targets of fuzz/targets.rs). The long,
//! coverage-guided run is `fuzz/run.sh` (libFuzzer); docs/reliability.md has its figures.
//!
//! Mutations: truncation, bit flips, a header field overwritten with 0, 1, −1, the maximum or a
//! huge value (1, 2, 4 or 8 bytes, either byte order), bytes inserted or deleted, a JSON leaf
//! (of a config, or of a safetensors header and the JSON inside its metadata) replaced by a
//! hostile value, and gzip applied after the mutation so that the inner parser sees it. A case
//! fails only by panicking (an abort ends the whole test binary, which fails too).
//!
//! `FUZZ_CASES=N` sets the cases per target (default 20000, a few seconds). An input that the
//! long run finds crashing becomes a named test of the parser it breaks, once fixed.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use serde_json::Value;
use targets::{run, seeds, Target};

/// Values a header field or a JSON number is set to.
const SPECIAL: [u64; 10] =
    [0, 1, u64::MAX, u64::MAX >> 1, 1 << 63, 1 << 31, 1 << 32, 1 << 40, 0xFFFF_FFFF, 3];

#[derive(Clone, Debug)]
enum Mutation {
    Truncate(f64),
    FlipBit(f64, u8),
    SetField { at: f64, width: usize, special: usize, big_endian: bool },
    Insert(f64, Vec<u8>),
    Delete(f64, usize),
    JsonLeaf { leaf: usize, value: usize },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let at = 0.0..1.0f64;
    prop_oneof![
        at.clone().prop_map(Mutation::Truncate),
        (at.clone(), 0u8..8).prop_map(|(a, b)| Mutation::FlipBit(a, b)),
        (at.clone(), prop::sample::select(vec![1usize, 2, 4, 8]), 0..SPECIAL.len(), any::<bool>()).prop_map(
            |(at, width, special, big_endian)| Mutation::SetField { at, width, special, big_endian }
        ),
        (at.clone(), prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(a, b)| Mutation::Insert(a, b)),
        (at, 1usize..64).prop_map(|(a, n)| Mutation::Delete(a, n)),
        (any::<usize>(), 0..JSON_VALUES.len()).prop_map(|(leaf, value)| Mutation::JsonLeaf { leaf, value }),
    ]
}

const JSON_VALUES: [&str; 16] = [
    "0",
    "-1",
    "1",
    "1e308",
    "-1e308",
    "18446744073709551615",
    "4294967296",
    "1099511627776",
    "0.5",
    "null",
    "\"x\"",
    "[]",
    "[0]",
    "[1, 0]",
    "[4611686018427387904, 4]",
    "{}",
];

fn pos(at: f64, len: usize) -> usize {
    ((at * len as f64) as usize).min(len)
}

/// Replaces leaf number `leaf` (mod the count) of `v` with `new`; returns false if `v` has none.
fn replace_leaf(v: &mut Value, leaf: usize, new: &Value) -> bool {
    fn count(v: &Value) -> usize {
        match v {
            Value::Object(m) => m.values().map(count).sum(),
            Value::Array(a) if !a.is_empty() => a.iter().map(count).sum(),
            _ => 1,
        }
    }
    fn set(v: &mut Value, k: &mut usize, new: &Value) -> bool {
        match v {
            Value::Object(m) => m.values_mut().any(|x| set(x, k, new)),
            Value::Array(a) if !a.is_empty() => a.iter_mut().any(|x| set(x, k, new)),
            leaf => {
                if *k == 0 {
                    *leaf = new.clone();
                    return true;
                }
                *k -= 1;
                false
            }
        }
    }
    let n = count(v);
    n > 0 && set(v, &mut (leaf % n), new)
}

/// A JSON leaf mutation of a JSON document, or of a safetensors header (and the JSON strings of
/// its metadata, which the leaf may land in).
fn mutate_json(bytes: &[u8], leaf: usize, value: usize) -> Option<Vec<u8>> {
    let new: Value = serde_json::from_str(JSON_VALUES[value]).expect("a JSON literal");
    if let Ok(mut v) = serde_json::from_slice::<Value>(bytes) {
        return replace_leaf(&mut v, leaf, &new).then(|| v.to_string().into_bytes());
    }
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let mut header: Value = serde_json::from_slice(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    // Half the time, reach into a metadata value that is itself JSON (the checkpoint's config).
    if leaf.is_multiple_of(2) {
        if let Some(meta) = header.get_mut("__metadata__").and_then(Value::as_object_mut) {
            let keys: Vec<String> = meta.keys().cloned().collect();
            let key = &keys[(leaf / 2) % keys.len().max(1)];
            if let Some(mut inner) = meta[key].as_str().and_then(|s| serde_json::from_str::<Value>(s).ok()) {
                if replace_leaf(&mut inner, leaf / 2, &new) {
                    meta[key] = Value::String(inner.to_string());
                }
            }
        }
    } else {
        replace_leaf(&mut header, leaf, &new);
    }
    let mut json = header.to_string().into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Some(out)
}

fn apply(mut b: Vec<u8>, m: &Mutation) -> Vec<u8> {
    let len = b.len();
    match m {
        Mutation::Truncate(at) => b.truncate(pos(*at, len)),
        Mutation::FlipBit(at, bit) => {
            if len > 0 {
                let i = pos(*at, len - 1);
                b[i] ^= 1 << bit;
            }
        }
        Mutation::SetField { at, width, special, big_endian } => {
            if len >= *width {
                let i = pos(*at, len - width);
                let v = SPECIAL[*special].to_le_bytes();
                let field: Vec<u8> = if *big_endian {
                    v[..*width].iter().rev().copied().collect()
                } else {
                    v[..*width].to_vec()
                };
                b[i..i + width].copy_from_slice(&field);
            }
        }
        Mutation::Insert(at, bytes) => {
            let i = pos(*at, len);
            b.splice(i..i, bytes.iter().copied());
        }
        Mutation::Delete(at, n) => {
            let i = pos(*at, len);
            b.drain(i..(i + n).min(len));
        }
        Mutation::JsonLeaf { leaf, value } => {
            if let Some(m) = mutate_json(&b, *leaf, *value) {
                b = m;
            }
        }
    }
    b
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("writing to memory");
    e.finish().expect("writing to memory")
}

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000)
}

fn fuzz(target: Target) {
    let seeds = seeds(target);
    for seed in &seeds {
        assert!(run(target, seed), "{target:?}: a seed is refused; the seeds must be valid files");
    }
    let n = seeds.len();
    let config = ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() };
    let strategy = (0..n, prop::collection::vec(mutation(), 1..4), any::<bool>());
    let (tried, accepted) = (AtomicUsize::new(0), AtomicUsize::new(0));
    proptest!(config, |((seed, mutations, gzip_after) in strategy)| {
        let mut bytes = mutations.iter().fold(seeds[seed].clone(), apply);
        if gzip_after && target == Target::Dataset {
            bytes = gzip(&bytes);
        }
        tried.fetch_add(1, Ordering::Relaxed);
        if run(target, &bytes) {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
    });
    let (tried, accepted) = (tried.into_inner(), accepted.into_inner());
    eprintln!("{target:?}: {tried} mutated inputs, {accepted} accepted");
    // The mutations must reach past the parsers' first checks, and get refused too.
    assert_eq!(tried as u32, cases());
    assert!(accepted > 0 && accepted < tried, "{target:?}: {accepted} of {tried} accepted");
}

#[test]
fn fuzz_dataset_files() {
    fuzz(Target::Dataset);
}

#[test]
fn fuzz_image_folder_entries() {
    fuzz(Target::Image);
}

#[test]
fn fuzz_checkpoints() {
    fuzz(Target::Checkpoint);
}

#[test]
fn fuzz_diffusers_configs() {
    fuzz(Target::DiffusersConfig);
}

#[test]
fn fuzz_npy() {
    fuzz(Target::Npy);
}

#[test]
fn fuzz_npz() {
    fuzz(Target::Npz);
}

#[test]
fn fuzz_betas() {
    fuzz(Target::Betas);
}

#[test]
fn fuzz_torch_pt() {
    fuzz(Target::TorchPt);
}

#[test]
fn fuzz_scorers() {
    fuzz(Target::Scorer);
}
