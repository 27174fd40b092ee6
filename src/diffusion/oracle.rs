//! The Bayes-optimal denoiser of a finite data set, in closed form: a model with no parameters
//! whose bound and samples are known in advance, used to check the whole chain end to end.
//!
//! For data uniform on K points x⁽¹⁾ … x⁽ᴷ⁾, q(x_t ∣ x_0 = x⁽ᵏ⁾) = N(√ᾱ_t x⁽ᵏ⁾, (1 − ᾱ_t) I)
//! (Ho Eq. 4), so by Bayes' rule the posterior over which point produced x_t is
//!
//! w_k(x_t) = softmax_k(−‖x_t − √ᾱ_t x⁽ᵏ⁾‖² / (2(1 − ᾱ_t))),
//!
//! E[x_0 ∣ x_t] = Σ_k w_k x⁽ᵏ⁾, and E[ε ∣ x_t] = (x_t − √ᾱ_t E[x_0 ∣ x_t])/√(1 − ᾱ_t).
//! E[ε ∣ x_t] minimises E‖ε − ε_θ(x_t, t)‖², so it is the optimum of L_simple (Ho Eq. 14) that
//! a network can only approach. docs/derivation.md §8 says what its samples and its bits/dim
//! must be, and the tests in tests/diffusion_oracle.rs check both.

use ndarray::{Array2, ArrayD, Axis};

use super::gaussian::predict_eps_from_x0;
use super::schedule::NoiseSchedule;

/// The optimal ε-predictor E[ε ∣ x_t] of a data set of K points.
#[derive(Clone, Debug)]
pub struct OracleDenoiser {
    /// The K points, flattened: `[K, D]`.
    points: Array2<f64>,
}

impl OracleDenoiser {
    /// An oracle for the data set `images` of shape `[K, …]` (every sample has the same shape).
    ///
    /// # Panics
    /// If `images` has no axis or K = 0.
    pub fn new(images: &ArrayD<f64>) -> Self {
        assert!(images.ndim() >= 1 && images.shape()[0] > 0, "OracleDenoiser: empty data set");
        let k = images.shape()[0];
        let d = images.len() / k;
        let points = images
            .as_standard_layout()
            .into_owned()
            .into_shape_with_order((k, d))
            .expect("a row-major copy of K·D elements, as d = len / K");
        OracleDenoiser { points }
    }

    /// The number of points K.
    pub fn num_points(&self) -> usize {
        self.points.nrows()
    }

    /// The number of values D of each point.
    pub fn dim(&self) -> usize {
        self.points.ncols()
    }

    /// w_k(x_t), the posterior probability of each point given x_t, shape `[N, K]` (rows sum to 1).
    ///
    /// # Panics
    /// If the per-sample size of `x_t` differs from the points', or `t.len()` from N, or a t ≥ T.
    pub fn posterior_weights(&self, schedule: &NoiseSchedule, x_t: &ArrayD<f64>, t: &[usize]) -> Array2<f64> {
        let n = x_t.shape()[0];
        assert_eq!(t.len(), n, "OracleDenoiser: {} timesteps for {n} samples", t.len());
        let x = self.flatten(x_t);
        let mut w = Array2::zeros((n, self.num_points()));
        for (i, (row, mut w_row)) in x.axis_iter(Axis(0)).zip(w.axis_iter_mut(Axis(0))).enumerate() {
            let sqrt_ab = schedule.sqrt_alpha_bar()[t[i]];
            let var = 1.0 - schedule.alpha_bar()[t[i]];
            for (k, p) in self.points.axis_iter(Axis(0)).enumerate() {
                let d2: f64 = row.iter().zip(p).map(|(x, p)| (x - sqrt_ab * p).powi(2)).sum();
                w_row[k] = -d2 / (2.0 * var);
            }
            // Softmax with the maximum subtracted, so the largest weight is exp(0) = 1 before normalising.
            let max = w_row.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
            w_row.mapv_inplace(|v| (v - max).exp());
            let sum = w_row.sum();
            w_row /= sum;
        }
        w
    }

    /// E[x_0 ∣ x_t] = Σ_k w_k x⁽ᵏ⁾, shape like `x_t`.
    ///
    /// # Panics
    /// As [`OracleDenoiser::posterior_weights`].
    pub fn x0_mean(&self, schedule: &NoiseSchedule, x_t: &ArrayD<f64>, t: &[usize]) -> ArrayD<f64> {
        let w = self.posterior_weights(schedule, x_t, t);
        w.dot(&self.points)
            .into_shape_with_order(x_t.raw_dim())
            .expect("a fresh [N, D] array; flatten checked N·D == x_t.len()")
    }

    /// E[ε ∣ x_t] = (x_t − √ᾱ_t E[x_0 ∣ x_t])/√(1 − ᾱ_t), the optimal ε-prediction, shape like `x_t`.
    ///
    /// # Panics
    /// As [`OracleDenoiser::posterior_weights`].
    pub fn eps_pred(&self, schedule: &NoiseSchedule, x_t: &ArrayD<f64>, t: &[usize]) -> ArrayD<f64> {
        predict_eps_from_x0(schedule, x_t, t, &self.x0_mean(schedule, x_t, t))
    }

    fn flatten(&self, x: &ArrayD<f64>) -> Array2<f64> {
        let n = x.shape()[0];
        assert_eq!(
            x.len(),
            n * self.points.ncols(),
            "OracleDenoiser: samples of shape {:?} do not have {} values each",
            &x.shape()[1..],
            self.points.ncols()
        );
        x.as_standard_layout()
            .into_owned()
            .into_shape_with_order((n, self.points.ncols()))
            .expect("a row-major copy whose size is asserted above")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::convention::Conventions;
    use crate::diffusion::schedule::BetaSchedule;

    #[test]
    fn weights_pick_the_point_that_generated_a_noiseless_input() {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 100, Conventions::default()).expect("valid");
        let images = ArrayD::from_shape_vec(vec![2, 2], vec![1.0, -1.0, -1.0, 1.0]).expect("2 points");
        let o = OracleDenoiser::new(&images);
        let t = [0usize];
        let x_t = ArrayD::from_shape_vec(vec![1, 2], vec![s.sqrt_alpha_bar()[0], -s.sqrt_alpha_bar()[0]])
            .expect("1 sample");
        let w = o.posterior_weights(&s, &x_t, &t);
        assert!((w[[0, 0]] - 1.0).abs() < 1e-12 && w[[0, 1]] < 1e-12);
        // With x_t exactly √ᾱ x⁽¹⁾, E[ε ∣ x_t] is 0.
        assert!(o.eps_pred(&s, &x_t, &t).iter().all(|e| e.abs() < 1e-9));
    }
}
