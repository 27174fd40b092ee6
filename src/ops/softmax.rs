//! Softmax over the last axis (the attention weights).

use ndarray::{Axis, Zip};

use crate::{Tensor, Var};

impl Var {
    /// `y_i = exp(x_i − max x) / Σ_j exp(x_j − max x)` along the last axis.
    /// Backward: `dx = y ⊙ (g − Σ_j g_j y_j)`.
    ///
    /// # Panics
    /// On a 0-d input.
    pub fn softmax(&self) -> Var {
        let last = Axis(self.value().ndim().checked_sub(1).expect("softmax: 0-d input"));
        let mut y: Tensor = self.value().as_standard_layout().into_owned();
        for mut row in y.lanes_mut(last) {
            let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            row.mapv_inplace(|v| (v - max).exp());
            let sum = row.sum();
            row.mapv_inplace(|v| v / sum);
        }
        let ys = std::rc::Rc::new(y.clone());
        Var::record([self], y, move |g, _| {
            let mut dx = g.clone();
            Zip::from(dx.lanes_mut(last)).and(ys.lanes(last)).for_each(|mut d, y| {
                let dot: f32 = d.iter().zip(y.iter()).map(|(a, b)| a * b).sum();
                Zip::from(&mut d).and(&y).for_each(|d, &y| *d = y * (*d - dot));
            });
            [Some(dx)]
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
        fn softmax_backward_matches_finite_differences(shape in shape_strategy(3, 5), seed in 0u64..1000) {
            check(&[randn(&shape, seed)], seed, |v| v[0].softmax());
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_survive_large_inputs() {
        let x = Var::constant(ndarray::arr2(&[[1000.0f32, 1000.0], [0.0, f32::ln(3.0)]]).into_dyn());
        let y = x.softmax();
        let v = y.value();
        assert!((v[[0, 0]] - 0.5).abs() < 1e-6 && (v[[1, 1]] - 0.75).abs() < 1e-6, "{v:?}");
    }
}
