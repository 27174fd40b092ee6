//! A small MLP trained with the tape and Adam learns a smooth nonlinear function from noisy
//! samples.
//!
//! The bound comes from the task: targets are `y = f(x) + σ·z` with z ~ N(0, 1) independent of
//! x, so no predictor has expected squared error below σ² (the Bayes risk), and the trivial
//! predictor (the mean) scores Var(f(x)) + σ². A model that has learned f has held-out error
//! near σ²; we require it to be below 2σ², i.e. excess error below the irreducible noise, which
//! here also means it explains more than 95% of the variance of f.

use ddpm::nn::{Adam, AdamConfig, ParamStore};
use ddpm::{rng_from_seed, Tape, Tensor, Var};
use rand::Rng as _;
use rand_distr::StandardNormal;

const SIGMA: f32 = 0.1;

fn target(x0: f32, x1: f32) -> f32 {
    (2.0 * x0).sin() * x1.cos() + 0.5 * x0 * x1
}

fn dataset(n: usize, seed: u64) -> (Tensor, Tensor) {
    let mut rng = rng_from_seed(seed);
    let mut x = Tensor::zeros(vec![n, 2]);
    let mut y = Tensor::zeros(vec![n, 1]);
    for i in 0..n {
        let (a, b) = (rng.random_range(-1.5f32..1.5), rng.random_range(-1.5f32..1.5));
        x[[i, 0]] = a;
        x[[i, 1]] = b;
        y[[i, 0]] = target(a, b) + SIGMA * rng.sample::<f32, _>(StandardNormal);
    }
    (x, y)
}

fn init(store: &mut ParamStore, name: &str, fan_in: usize, fan_out: usize, seed: u64) {
    // PyTorch's default Linear init: U(−1/√fan_in, 1/√fan_in).
    let mut rng = rng_from_seed(seed);
    let bound = 1.0 / (fan_in as f32).sqrt();
    let w = Tensor::from_shape_simple_fn(vec![fan_out, fan_in], || rng.random_range(-bound..bound));
    let b = Tensor::from_shape_simple_fn(vec![fan_out], || rng.random_range(-bound..bound));
    store.insert(format!("{name}.weight"), w);
    store.insert(format!("{name}.bias"), b);
}

fn forward(p: &ddpm::nn::Bound, x: &Var) -> Var {
    let h = x.linear(p.get("fc1.weight"), Some(p.get("fc1.bias"))).silu();
    let h = h.linear(p.get("fc2.weight"), Some(p.get("fc2.bias"))).silu();
    h.linear(p.get("out.weight"), Some(p.get("out.bias")))
}

#[test]
fn mlp_reaches_the_noise_floor() {
    let mut store = ParamStore::new();
    init(&mut store, "fc1", 2, 64, 1);
    init(&mut store, "fc2", 64, 64, 2);
    init(&mut store, "out", 64, 1, 3);
    let (x_train, y_train) = dataset(2048, 10);
    let (x_test, y_test) = dataset(2048, 11);
    let mut adam = Adam::new(&store, AdamConfig::default());
    let mut rng = rng_from_seed(5);
    let batch = 128;
    for step in 0..3000 {
        let idx: Vec<usize> = (0..batch).map(|_| rng.random_range(0..x_train.shape()[0])).collect();
        let xb = x_train.select(ndarray::Axis(0), &idx);
        let yb = y_train.select(ndarray::Axis(0), &idx);
        let tape = Tape::new();
        let p = store.bind(&tape);
        let loss = forward(&p, &Var::constant(xb)).mse(&Var::constant(yb));
        let grads = p.grads(&loss.backward());
        let lr = if step < 2000 { 3e-3 } else { 1e-3 };
        adam.update(&mut store, &grads, lr);
    }
    let p = store.bind_constant();
    let test_mse = forward(&p, &Var::constant(x_test)).mse(&Var::constant(y_test.clone())).value()[[]];
    let trivial = y_test.var(0.0);
    let bayes = SIGMA * SIGMA;
    eprintln!("held-out MSE {test_mse:.5}, Bayes risk {bayes:.5}, trivial predictor {trivial:.5}");
    assert!(test_mse < 2.0 * bayes, "held-out MSE {test_mse}, Bayes risk {bayes}, trivial {trivial}");
    assert!(trivial > 10.0 * bayes, "the task is not trivial: Var(y) = {trivial}");
}
