//! Softmax over the last axis (the attention weights).

use rayon::prelude::*;

use super::par::{filled_uninit, write_from, FILL_CHUNK};
use crate::kernels::math::{softmax_backward_in_place, softmax_in_place};
use crate::{Tensor, Var};

impl Var {
    /// `y_i = exp(x_i − max x) / Σ_j exp(x_j − max x)` along the last axis.
    /// Backward: `dx = y ⊙ (g − Σ_j g_j y_j)`.
    ///
    /// # Panics
    /// On a 0-d input.
    pub fn softmax(&self) -> Var {
        let ndim = self.value().ndim();
        assert!(ndim > 0, "softmax: 0-d input");
        let n = self.shape()[ndim - 1];
        if n == 0 {
            let y = self.value().as_standard_layout().into_owned();
            return Var::record([self], y, |g, _| [Some(g.clone())]);
        }
        let x = self.value().as_standard_layout();
        let xs = x.as_slice().expect("as_standard_layout above");
        // Whole rows per task, about FILL_CHUNK elements.
        let chunk = n * (FILL_CHUNK / n).max(1);
        // SAFETY: write_from covers each whole row, and the rows cover the chunk.
        let y = unsafe {
            filled_uninit(xs.len(), chunk, |i, out| {
                for (row, src) in out.chunks_mut(n).zip(xs[i * chunk..].chunks(n)) {
                    softmax_in_place(write_from(row, src));
                }
            })
        };
        let y = Tensor::from_shape_vec(self.shape(), y).expect("y holds one value per element of x");
        Var::record_with_output([self], y, move |g, ys, _| {
            let mut dx = g.as_standard_layout().into_owned();
            let ys = ys.as_slice().expect("record_with_output keeps the output in standard layout");
            let d_rows = dx.as_slice_mut().expect("dx is an owned as_standard_layout copy");
            let body = |(d, y): (&mut [f32], &[f32])| softmax_backward_in_place(d, y);
            if d_rows.len() >= PAR_MIN {
                d_rows.par_chunks_mut(n).zip(ys.par_chunks(n)).for_each(body);
            } else {
                d_rows.chunks_mut(n).zip(ys.chunks(n)).for_each(body);
            }
            [Some(dx)]
        })
    }
}

/// Below this many elements the rows are processed on the calling thread.
const PAR_MIN: usize = 1 << 15;

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
