//! Sums and means, over everything or along one axis.

use ndarray::{Axis, IxDyn};

use crate::{Tensor, Var};

impl Var {
    /// Sum of all elements, as a 0-d tensor (shape `[]`).
    pub fn sum(&self) -> Var {
        let y = Tensor::from_elem(IxDyn(&[]), self.value().sum());
        let shape = self.shape().to_vec();
        Var::record([self], y, move |g, _| [Some(Tensor::from_elem(shape.as_slice(), g[[]]))])
    }

    /// Mean of all elements, as a 0-d tensor.
    pub fn mean(&self) -> Var {
        let n = self.len().max(1) as f32;
        self.sum().mul_scalar(1.0 / n)
    }

    /// Sum along `axis`; with `keep_dim` the axis stays with size 1.
    ///
    /// # Panics
    /// If `axis` is out of range.
    pub fn sum_axis(&self, axis: usize, keep_dim: bool) -> Var {
        assert!(axis < self.value().ndim(), "sum_axis: axis {axis} of shape {:?}", self.shape());
        let mut y = self.value().sum_axis(Axis(axis));
        if keep_dim {
            y = y.insert_axis(Axis(axis));
        }
        let shape = self.shape().to_vec();
        Var::record([self], y, move |g, _| {
            let g = if keep_dim { g.clone() } else { g.clone().insert_axis(Axis(axis)) };
            // Cannot fail: g has y's shape, whose reduced axis has size 1 and broadcasts back.
            let full = g.broadcast(IxDyn(&shape)).expect("the reduced axis broadcasts back").to_owned();
            [Some(full)]
        })
    }

    /// Mean along `axis`; with `keep_dim` the axis stays with size 1.
    ///
    /// # Panics
    /// If `axis` is out of range.
    pub fn mean_axis(&self, axis: usize, keep_dim: bool) -> Var {
        let n = self.shape().get(axis).copied().unwrap_or(1).max(1) as f32;
        self.sum_axis(axis, keep_dim).mul_scalar(1.0 / n)
    }
}

#[cfg(test)]
mod tests {
    use crate::ops::testutil::{check, randn, shape_strategy};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        #[test]
        fn reductions_backward_match_finite_differences(shape in shape_strategy(3, 4), axis in 0usize..3, seed in 0u64..1000) {
            let x = randn(&shape, seed);
            check(&[x.clone()], seed, |v| v[0].sum());
            check(&[x.clone()], seed, |v| v[0].mean());
            check(&[x.clone()], seed, |v| v[0].sum_axis(axis, false));
            check(&[x.clone()], seed, |v| v[0].sum_axis(axis, true));
            check(&[x.clone()], seed, |v| v[0].mean_axis(axis, true));
            check(&[x.clone()], seed, |v| v[0].mean_axis(axis, false));
        }
    }

    #[test]
    fn mean_of_known_values() {
        let x = crate::Var::constant(ndarray::arr2(&[[1.0f32, 2.0], [3.0, 6.0]]).into_dyn());
        assert_eq!(x.mean().value()[[]], 3.0);
        assert_eq!(x.mean_axis(0, false).value().as_slice().unwrap(), &[2.0, 4.0]);
    }
}
