//! Finite-difference gradient checks.
//!
//! The checked function is `L(x) = Σ w ⊙ f(x)` with a random, non-uniform `w`, so a backward
//! pass that ignores (or transposes, or sums) its incoming gradient cannot pass. The analytic
//! side seeds the reverse sweep with `w` ([`Var::backward_with`]); the numeric side evaluates
//! `f` with no tape at `x ± eps·e_i` and takes the central difference, summing in f64.

use ndarray::Zip;
use rand::Rng as _;
use rand_distr::StandardNormal;

use super::{Tape, Tensor, Var};

/// Step and tolerances of a [`gradcheck`].
#[derive(Clone, Debug)]
pub struct GradcheckConfig {
    /// Finite-difference step.
    pub eps: f32,
    /// Relative tolerance, against `max(|analytic|, |numeric|)`.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// Seed of the random upstream weights `w`.
    pub seed: u64,
    /// Check at most this many elements of each input (spread evenly), to bound the cost.
    pub max_checks_per_input: usize,
}

impl Default for GradcheckConfig {
    fn default() -> Self {
        Self { eps: 1e-2, rtol: 2e-2, atol: 2e-3, seed: 0, max_checks_per_input: 400 }
    }
}

/// The worst disagreement found by a [`gradcheck`].
#[derive(Clone, Debug)]
pub struct GradcheckReport {
    /// Largest |analytic − numeric| seen.
    pub max_abs_err: f64,
    /// Number of elements compared.
    pub checked: usize,
}

/// Compares the tape's gradient of `Σ w ⊙ f(inputs)` with central differences.
///
/// # Errors
/// A message naming the input, the element, both values and the tolerance, for the first element
/// where `|a − n| > atol + rtol·max(|a|, |n|)`.
pub fn gradcheck<F>(inputs: &[Tensor], f: F, cfg: &GradcheckConfig) -> Result<GradcheckReport, String>
where
    F: Fn(&[Var]) -> Var,
{
    let tape = Tape::new();
    let leaves: Vec<Var> = inputs.iter().map(|x| tape.var(x.clone())).collect();
    let out = f(&leaves);
    let mut rng = crate::rng_from_seed(cfg.seed);
    let w: Tensor = Tensor::from_shape_fn(out.shape(), |_| rng.sample::<f32, _>(StandardNormal));
    let grads = out.backward_with(w.clone());

    let loss = |xs: &[Tensor]| -> f64 {
        let vars: Vec<Var> = xs.iter().cloned().map(Var::constant).collect();
        let y = f(&vars);
        assert_eq!(y.shape(), w.shape(), "gradcheck: output shape changed under perturbation");
        let mut s = 0.0f64;
        Zip::from(y.value()).and(&w).for_each(|&y, &w| s += y as f64 * w as f64);
        s
    };

    let mut report = GradcheckReport { max_abs_err: 0.0, checked: 0 };
    // Row-major copies, so that element i of an input and of its gradient are the same element.
    let mut xs: Vec<Tensor> = inputs.iter().map(|x| x.as_standard_layout().into_owned()).collect();
    for (k, leaf) in leaves.iter().enumerate() {
        let analytic = grads.get_or_zeros(leaf);
        let len = xs[k].len();
        let stride = len.div_ceil(cfg.max_checks_per_input.max(1)).max(1);
        for i in (0..len).step_by(stride) {
            let orig = flat(&xs[k])[i];
            flat_mut(&mut xs[k])[i] = orig + cfg.eps;
            let plus = loss(&xs);
            flat_mut(&mut xs[k])[i] = orig - cfg.eps;
            let minus = loss(&xs);
            flat_mut(&mut xs[k])[i] = orig;
            // The step actually taken, as rounded in f32.
            let h = ((orig + cfg.eps) - (orig - cfg.eps)) as f64;
            let numeric = (plus - minus) / h;
            let a = flat(&analytic)[i] as f64;
            let err = (a - numeric).abs();
            report.max_abs_err = report.max_abs_err.max(err);
            report.checked += 1;
            if err > cfg.atol + cfg.rtol * a.abs().max(numeric.abs()) {
                return Err(format!(
                    "input {k} {:?}, element {i}: analytic {a:.6e}, numeric {numeric:.6e} \
                     (|diff| {err:.3e} > atol {} + rtol {} x magnitude)",
                    inputs[k].shape(),
                    cfg.atol,
                    cfg.rtol
                ));
            }
        }
    }
    Ok(report)
}

/// Called on `xs` (row-major copies) and on gradients (the tape keeps them row-major).
fn flat(t: &Tensor) -> &[f32] {
    t.as_slice().expect("xs and gradients are in standard layout")
}

fn flat_mut(t: &mut Tensor) -> &mut [f32] {
    t.as_slice_mut().expect("xs are row-major copies of the inputs")
}
