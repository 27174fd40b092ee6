//! Mean-squared error (the L_simple objective's reduction) and the softmax cross-entropy of a
//! classifier (the quality score's feature network, `score`).

use ndarray::Zip;

use crate::{Tensor, Var};

impl Var {
    /// `mean((a − b)²)` over all elements, as a 0-d tensor. Backward:
    /// `da = 2(a − b)/n`, `db = −da`.
    ///
    /// # Panics
    /// If the shapes differ.
    pub fn mse(&self, target: &Var) -> Var {
        assert_eq!(self.shape(), target.shape(), "mse: {:?} vs {:?}", self.shape(), target.shape());
        let diff: Tensor = self.value() - target.value();
        let n = diff.len().max(1) as f32;
        let mut sq = 0.0f64;
        Zip::from(&diff).for_each(|&d| sq += (d as f64) * (d as f64));
        let y = Tensor::from_elem(ndarray::IxDyn(&[]), (sq / n as f64) as f32);
        Var::record([self, target], y, move |g, needs| {
            let da = &diff * (2.0 * g[[]] / n);
            let db = needs[1].then(|| -&da);
            [needs[0].then_some(da), db]
        })
    }

    /// Softmax cross-entropy of logits `[N, K]` against class indices, averaged over the rows:
    /// `(1/N) Σ_n (log Σ_k exp(x_nk) − x_n,y_n)`, as a 0-d tensor ([`Var::cross_entropy_soft`]
    /// with one-hot targets).
    ///
    /// # Panics
    /// If the input is not 2-d, `labels.len() != N`, or a label is not below K.
    pub fn cross_entropy(&self, labels: &[usize]) -> Var {
        let shape = self.shape().to_vec();
        assert_eq!(shape.len(), 2, "cross_entropy: logits must be [N, K], got {shape:?}");
        assert_eq!(labels.len(), shape[0], "cross_entropy: {} labels for {} rows", labels.len(), shape[0]);
        assert!(labels.iter().all(|&y| y < shape[1]), "cross_entropy: a label is not below K = {}", shape[1]);
        let mut targets = ndarray::Array2::<f32>::zeros((shape[0], shape[1]));
        labels.iter().enumerate().for_each(|(n, &y)| targets[[n, y]] = 1.0);
        self.cross_entropy_soft(targets.view())
    }

    /// Softmax cross-entropy of logits `[N, K]` against target distributions `t` `[N, K]`,
    /// averaged over the rows: `(1/N) Σ_n Σ_k t_nk (log Σ_j exp(x_nj) − x_nk)`, computed through
    /// each row's maximum so no exponential overflows. A uniform row `t_n = 1/K` is outlier
    /// exposure's target (Hendrycks et al. 2019). Backward:
    /// `dx_nk = g · (softmax(x_n)_k Σ_j t_nj − t_nk) / N`.
    ///
    /// # Panics
    /// If the input is not 2-d or the targets' shape differs.
    pub fn cross_entropy_soft(&self, targets: ndarray::ArrayView2<f32>) -> Var {
        let shape = self.shape().to_vec();
        assert_eq!(shape.len(), 2, "cross_entropy: logits must be [N, K], got {shape:?}");
        assert_eq!(
            targets.shape(),
            shape.as_slice(),
            "cross_entropy: targets {:?} for logits {shape:?}",
            targets.shape()
        );
        let (n, k) = (shape[0], shape[1].max(1));
        let x = self.value().as_standard_layout();
        let xs = x.as_slice().expect("as_standard_layout above");
        let ts: Vec<f32> = targets.iter().copied().collect();
        // Softmax probabilities are kept for the backward pass.
        let mut probs = vec![0.0f32; xs.len()];
        let mut total = 0.0f64;
        for ((row, p), trow) in xs.chunks(k).zip(probs.chunks_mut(k)).zip(ts.chunks(k)) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&xi| ((xi - max) as f64).exp()).sum();
            let log_sum = sum.ln();
            for ((pi, &xi), &ti) in p.iter_mut().zip(row).zip(trow) {
                *pi = (((xi - max) as f64).exp() / sum) as f32;
                total += ti as f64 * (log_sum - (xi - max) as f64);
            }
        }
        let inv_n = 1.0 / n.max(1) as f32;
        let y = Tensor::from_elem(ndarray::IxDyn(&[]), (total * inv_n as f64) as f32);
        Var::record([self], y, move |g, _| {
            let scale = g[[]] * inv_n;
            let mut dx = probs.clone();
            for (row, trow) in dx.chunks_mut(k).zip(ts.chunks(k)) {
                let mass: f32 = trow.iter().sum();
                row.iter_mut().zip(trow).for_each(|(d, &ti)| *d = scale * (*d * mass - ti));
            }
            [Some(Tensor::from_shape_vec(shape.clone(), dx).expect("one gradient per logit"))]
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testutil::{check, randn, shape_strategy};
    use crate::Var;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        #[test]
        fn mse_backward_matches_finite_differences(shape in shape_strategy(3, 4), seed in 0u64..1000) {
            check(&[randn(&shape, seed), randn(&shape, seed + 1)], seed, |v| v[0].mse(&v[1]));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        #[test]
        fn cross_entropy_backward_matches_finite_differences(n in 1usize..5, k in 1usize..6, seed in 0u64..1000) {
            let labels: Vec<usize> = (0..n).map(|i| (i * 7 + seed as usize) % k).collect();
            check(&[randn(&[n, k], seed)], seed, |v| v[0].cross_entropy(&labels));
        }

        #[test]
        fn soft_cross_entropy_backward_matches_finite_differences(n in 1usize..5, k in 1usize..6, seed in 0u64..1000) {
            // Arbitrary non-negative targets, not normalised, so the Σ_j t_nj factor is exercised.
            let t = randn(&[n, k], seed + 7).mapv(f32::abs).into_dimensionality::<ndarray::Ix2>().unwrap();
            check(&[randn(&[n, k], seed)], seed, |v| v[0].cross_entropy_soft(t.view()));
        }
    }

    #[test]
    fn cross_entropy_of_known_values() {
        // Row 0: logits (0, ln 3) with label 1: −ln(3/4). Row 1: (0, 0) with label 0: ln 2.
        let x = Var::constant(ndarray::arr2(&[[0.0f32, 3f32.ln()], [0.0, 0.0]]).into_dyn());
        let expected = (-(0.75f64).ln() + 2f64.ln()) / 2.0;
        assert!((x.cross_entropy(&[1, 0]).value()[[]] as f64 - expected).abs() < 1e-6);
        // Huge logits stay finite (computed through the row's maximum).
        let big = Var::constant(ndarray::arr2(&[[1e4f32, 0.0]]).into_dyn());
        assert!(big.cross_entropy(&[1]).value()[[]].is_finite());
        // Against a uniform target the loss is log K − mean_k x_k + ... : for logits (0, ln 3),
        // log Σ exp = ln 4, so the loss is ln 4 − (0 + ln 3)/2.
        let x = Var::constant(ndarray::arr2(&[[0.0f32, 3f32.ln()]]).into_dyn());
        let uniform = ndarray::arr2(&[[0.5f32, 0.5]]);
        let expected = 4f64.ln() - 3f64.ln() / 2.0;
        assert!((x.cross_entropy_soft(uniform.view()).value()[[]] as f64 - expected).abs() < 1e-6);
    }

    #[test]
    fn mse_of_known_values() {
        let a = Var::constant(ndarray::arr1(&[1.0f32, 2.0, 3.0]).into_dyn());
        let b = Var::constant(ndarray::arr1(&[1.0f32, 0.0, 0.0]).into_dyn());
        assert!((a.mse(&b).value()[[]] - 13.0 / 3.0).abs() < 1e-6);
    }
}
