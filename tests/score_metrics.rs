//! The score's FD and KID against the usual numpy/scipy computation (pytorch-fid's
//! `scipy.linalg.sqrtm(Σ1 Σ2)`, clean-fid's polynomial-kernel MMD), from the fixture written by
//! tests/fixtures/make_score_fixtures.py with the versions of requirements-score.txt.

use std::path::Path;

use ddpm::io::npz::read_npz;
use ddpm::score::frechet_distance;
use ddpm::score::metrics::{mmd2_unbiased, Gaussian};
use ndarray::{s, Array2, Ix2};

fn fixture() -> std::collections::BTreeMap<String, ndarray::ArrayD<f64>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/score/score.npz");
    read_npz(&path).unwrap().into_iter().map(|e| (e.name, e.values)).collect()
}

fn matrix(f: &std::collections::BTreeMap<String, ndarray::ArrayD<f64>>, name: &str) -> Array2<f64> {
    f[name].clone().into_dimensionality::<Ix2>().unwrap()
}

#[test]
fn frechet_distance_matches_scipy_sqrtm() {
    let f = fixture();
    let (a, b) = (matrix(&f, "a"), matrix(&f, "b"));
    let ga = Gaussian::fit(a.view()).unwrap();
    let gb = Gaussian::fit(b.view()).unwrap();
    let expected = f["fd"][[]];
    let got = frechet_distance(&ga, &gb);
    assert!((got - expected).abs() < 1e-9 * expected.abs().max(1.0), "FD {got} vs scipy {expected}");
    // scipy's sqrtm of Σ Σ leaves a little rounding; both are 0 to within it.
    assert!(frechet_distance(&ga, &ga) < 1e-9 && f["fd_aa"][[]].abs() < 1e-6);
}

#[test]
fn mmd2_matches_numpy() {
    let f = fixture();
    let (a, b) = (matrix(&f, "a"), matrix(&f, "b"));
    let expected = f["mmd2_first40"][[]];
    let got = mmd2_unbiased(a.view(), b.slice(s![..40, ..]));
    assert!((got - expected).abs() < 1e-9 * expected.abs().max(1.0), "MMD² {got} vs numpy {expected}");
}
