//! Helpers shared by the command-line tests (each test file that uses them says `mod common;`).

#![allow(dead_code)] // each test crate uses its own subset

use std::path::{Path, PathBuf};
use std::process::Output;

/// The command's standard error, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes `n` 8x8 images as an IDX file in `dir` and returns its path: a bright 4x4 square in
/// one of the 4 corners (image i in corner i mod 4), so the data have structure to learn.
pub fn write_squares_idx(dir: &Path, n: u32) -> PathBuf {
    let mut bytes = vec![0, 0, 8, 3];
    for d in [n, 8, 8] {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    for i in 0..n as usize {
        let (oy, ox) = ((i % 2) * 4, ((i / 2) % 2) * 4);
        for y in 0..8 {
            for x in 0..8 {
                let on = (oy..oy + 4).contains(&y) && (ox..ox + 4).contains(&x);
                bytes.push(if on { 255 } else { 0 });
            }
        }
    }
    let path = dir.join("squares-idx3-ubyte");
    std::fs::write(&path, bytes).expect("temp dir is writable");
    path
}

/// Writes the IDX label file that belongs to [`write_squares_idx`]'s images (`squares-idx1-ubyte`
/// next to `squares-idx3-ubyte`): image i's class is its corner, i mod 4. Returns its path.
pub fn write_squares_labels(dir: &Path, n: u32) -> PathBuf {
    let mut bytes = vec![0, 0, 8, 1];
    bytes.extend_from_slice(&n.to_be_bytes());
    bytes.extend((0..n).map(|i| (i % 4) as u8));
    let path = dir.join("squares-idx1-ubyte");
    std::fs::write(&path, bytes).expect("temp dir is writable");
    path
}
