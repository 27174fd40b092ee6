//! `ddpm score` end to end: the shipped MNIST scorer puts real digits near the floor and noise
//! far from it, a sample folder's grid.png is skipped, `--train-scorer` writes a scorer that
//! `--scorer` loads, and bad input gets one clear error.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{stderr, write_squares_idx, write_squares_labels};

fn ddpm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm")).args(args).output().expect("the binary runs")
}

fn json(out: Output) -> serde_json::Value {
    assert!(out.status.success(), "ddpm failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

fn mnist_test() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/mnist/t10k-images-idx3-ubyte.gz")
        .to_str()
        .unwrap()
        .to_string()
}

/// `n` 28×28 images of clipped Gaussian noise (σ = 0.5 on [−1, 1]) as an IDX file.
fn write_noise_idx(dir: &Path, n: u32) -> PathBuf {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut bytes = vec![0, 0, 8, 3];
    for d in [n, 28, 28] {
        bytes.extend_from_slice(&d.to_be_bytes());
    }
    let normal = rand_distr::Normal::new(127.5f64, 64.0).unwrap();
    bytes.extend((0..n * 784).map(|_| rng.sample(normal).clamp(0.0, 255.0) as u8));
    let path = dir.join("noise-images-idx3-ubyte");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn real_digits_score_near_the_floor_and_noise_far_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let common = ["--n", "200", "--reference", "2000", "--json"];
    let real = json(ddpm(&[&["score", &mnist_test()][..], &common].concat()));
    let keys =
        ["n", "fd", "kid", "kid_se", "precision", "recall", "class_hist", "class_entropy", "frac_conf90"];
    for k in keys {
        assert!(
            real.get(k).is_some() && real.get(format!("real_{k}")).is_some() || k == "n",
            "no {k} in {real}"
        );
    }
    assert_eq!(real["n"], 200);
    let (fd, floor) = (real["fd"].as_f64().unwrap(), real["real_fd"].as_f64().unwrap());
    assert!(fd < 1.5 * floor, "real test digits: FD {fd} against a floor of {floor}");
    assert!(real["frac_conf90"].as_f64().unwrap() > 0.9, "{real}");
    let noise = write_noise_idx(dir.path(), 200);
    let noise = json(ddpm(&[&["score", noise.to_str().unwrap()][..], &common].concat()));
    assert!(noise["fd"].as_f64().unwrap() > 10.0 * floor, "{noise}");
    assert!(noise["frac_conf90"].as_f64().unwrap() < 0.05, "{noise}");
    assert!(noise["recall"].as_f64().unwrap() < 0.05, "{noise}");
}

#[test]
fn a_sample_folder_is_scored_without_its_grid_and_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("samples");
    std::fs::create_dir(&folder).unwrap();
    // Ten "samples" (blank-ish images) and an overview grid of another size, as `ddpm sample`
    // writes them.
    for i in 0..10 {
        let img =
            ndarray::Array3::<f32>::from_shape_fn(
                (1, 28, 28),
                |(_, y, x)| if (y + x + i) % 7 == 0 { 1.0 } else { -1.0 },
            );
        ddpm::io::png::save_image(&folder.join(format!("{i:06}.png")), img.view()).unwrap();
    }
    let grid = ndarray::Array4::<f32>::zeros((4, 1, 28, 28));
    ddpm::io::png::save_grid(&folder.join("grid.png"), grid.view(), 2).unwrap();
    let args = ["score", folder.to_str().unwrap(), "--reference", "500", "--json"];
    let a = json(ddpm(&args));
    assert_eq!(a["n"], 10, "grid.png is not one of the samples: {a}");
    assert_eq!(a, json(ddpm(&args)), "the same seed gives the same figures");
}

#[test]
fn train_scorer_writes_a_scorer_that_score_loads() {
    let dir = tempfile::tempdir().unwrap();
    let images = write_squares_idx(dir.path(), 64);
    write_squares_labels(dir.path(), 64);
    let out = dir.path().join("scorer.safetensors");
    let o = ddpm(&[
        "score",
        "--train-scorer",
        "--data",
        images.to_str().unwrap(),
        "--epochs",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = json(ddpm(&[
        "score",
        images.to_str().unwrap(),
        "--against",
        images.to_str().unwrap(),
        "--scorer",
        out.to_str().unwrap(),
        "--n",
        "16",
        "--reference",
        "32",
        "--json",
    ]));
    assert_eq!(r["class_hist"].as_array().unwrap().len(), 4, "the squares have 4 classes: {r}");
    assert_eq!(r["n"], 16);
}

#[test]
fn bad_input_gets_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let o = ddpm(&["score", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("nowhere") && stderr(&o).contains("no such file"), "{}", stderr(&o));
    let o = ddpm(&["score", &mnist_test(), "--against", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--against") && stderr(&o).contains("nowhere"), "{}", stderr(&o));
    // A safetensors file that is not a scorer.
    let fake = dir.path().join("fake.safetensors");
    std::fs::write(&fake, b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ").unwrap();
    let o = ddpm(&["score", &mnist_test(), "--scorer", fake.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("fake.safetensors"), "{}", stderr(&o));
    // More images asked for than there are.
    let noise = write_noise_idx(dir.path(), 8);
    let o = ddpm(&["score", noise.to_str().unwrap(), "--n", "9"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--n 9") && stderr(&o).contains("only 8"), "{}", stderr(&o));
    // Images of another shape than the scorer's.
    let squares = write_squares_idx(dir.path(), 8);
    let o = ddpm(&["score", squares.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("squares-idx3-ubyte"), "{}", stderr(&o));
    // No images and no --train-scorer: a usage error.
    assert_eq!(ddpm(&["score"]).status.code(), Some(2));
    // Labels that do not fit the images.
    let labels = dir.path().join("few-labels");
    std::fs::write(&labels, [0u8, 0, 8, 1, 0, 0, 0, 2, 1, 2]).unwrap();
    let out = dir.path().join("s.safetensors");
    let o = ddpm(&[
        "score",
        "--train-scorer",
        "--data",
        squares.to_str().unwrap(),
        "--labels",
        labels.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("few-labels"), "{}", stderr(&o));
    assert!(!out.exists(), "nothing is written on an error");
}

#[test]
fn the_demo_scores_its_own_samples() {
    // A demo of a second's training: it draws its 256 digits and writes their score.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = ddpm(&["demo", "--out", out.to_str().unwrap(), "--minutes", "0.02"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let score: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("samples/score.json")).unwrap()).unwrap();
    assert_eq!(score["n"], 256);
    assert!(score["real_frac_conf90"].as_f64().unwrap() > 0.9, "{score}");
    assert!(stderr(&o).contains("score of the 256 digits"), "{}", stderr(&o));
    assert!(out.join("samples/grid.png").is_file() && out.join("samples/000255.png").is_file());
}
