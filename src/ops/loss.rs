//! Mean-squared error, the L_simple objective's reduction.

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

    #[test]
    fn mse_of_known_values() {
        let a = Var::constant(ndarray::arr1(&[1.0f32, 2.0, 3.0]).into_dyn());
        let b = Var::constant(ndarray::arr1(&[1.0f32, 0.0, 0.0]).into_dyn());
        assert!((a.mse(&b).value()[[]] - 13.0 / 3.0).abs() < 1e-6);
    }
}
