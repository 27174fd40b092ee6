//! Inverted dropout with an explicitly passed, seeded RNG.

use rand::Rng as _;
use rayon::prelude::*;

use super::par::zeroed;
use crate::{Rng, Tensor, Var};

impl Var {
    /// Zeroes each element with probability `p` and scales the survivors by `1/(1 − p)`, so the
    /// expectation is unchanged (inverted dropout, as in PyTorch's training mode). `p = 0`
    /// returns the input unchanged and draws nothing from `rng`.
    ///
    /// # Panics
    /// If `p` is not in `[0, 1)`.
    pub fn dropout(&self, p: f32, rng: &mut Rng) -> Var {
        assert!((0.0..1.0).contains(&p), "dropout: p = {p} is not in [0, 1)");
        if p == 0.0 {
            return self.clone();
        }
        let scale = 1.0 / (1.0 - p);
        // One draw from `rng` seeds the mask; chunk i of the mask comes from stream i of that
        // seed, so chunks fill in parallel and the mask does not depend on the thread count.
        let seed: u64 = rng.random();
        let x = self.value().as_standard_layout();
        let xs = x.as_slice().expect("as_standard_layout above");
        let (mut y, mut mask) = (zeroed(xs.len()), zeroed(xs.len()));
        y.par_chunks_mut(MASK_CHUNK)
            .zip(mask.par_chunks_mut(MASK_CHUNK))
            .zip(xs.par_chunks(MASK_CHUNK))
            .enumerate()
            .for_each(|(i, ((y, m), x))| {
                let mut r = crate::rng_from_seed(seed);
                r.set_stream(i as u64);
                for ((y, m), &x) in y.iter_mut().zip(m.iter_mut()).zip(x) {
                    *m = if r.random::<f32>() < p { 0.0 } else { scale };
                    *y = x * *m;
                }
            });
        let y = Tensor::from_shape_vec(self.shape(), y).expect("y holds one value per element of x");
        Var::record_owned([self], y, move |mut g, _| {
            let gs = g.as_slice_mut().expect("the tape keeps gradients in standard layout");
            gs.par_chunks_mut(MASK_CHUNK).zip(mask.par_chunks(MASK_CHUNK)).for_each(|(g, m)| {
                g.iter_mut().zip(m).for_each(|(g, &m)| *g *= m);
            });
            [Some(g)]
        })
    }
}

/// Elements per independently seeded piece of a dropout mask.
const MASK_CHUNK: usize = 1 << 14;

#[cfg(test)]
mod tests {
    use crate::autodiff::{gradcheck, GradcheckConfig};
    use crate::ops::testutil::randn;
    use crate::{rng_from_seed, Var};

    #[test]
    fn dropout_backward_matches_finite_differences_with_a_fixed_mask() {
        // The mask is redrawn on every forward, so re-seed inside the checked function: every
        // evaluation then uses the same mask.
        for (shape, seed) in [(vec![3, 4], 1u64), (vec![2, 1, 5], 2), (vec![1], 3)] {
            let x = randn(&shape, seed);
            let f = |v: &[Var]| v[0].dropout(0.3, &mut rng_from_seed(seed));
            gradcheck(&[x], f, &GradcheckConfig { seed, ..Default::default() }).unwrap();
        }
    }

    #[test]
    fn dropout_keeps_the_mean_and_drops_about_p() {
        let x = Var::constant(ndarray::Array1::<f32>::ones(100_000).into_dyn());
        let y = x.dropout(0.25, &mut rng_from_seed(7));
        let zeros = y.value().iter().filter(|&&v| v == 0.0).count() as f64 / 1e5;
        // Binomial standard error for p = 0.25, n = 1e5 is 0.00137; allow 5 of them.
        assert!((zeros - 0.25).abs() < 0.007, "dropped fraction {zeros}");
        let mean = y.value().mean().unwrap() as f64;
        assert!((mean - 1.0).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn same_seed_same_mask() {
        let x = Var::constant(randn(&[50], 1));
        let a = x.dropout(0.5, &mut rng_from_seed(3));
        let b = x.dropout(0.5, &mut rng_from_seed(3));
        assert_eq!(a.value(), b.value());
    }
}
