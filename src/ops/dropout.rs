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

/// Where the masks of a forward pass come from.
#[derive(Debug)]
pub enum DropoutDraws<'a> {
    /// [`Var::dropout`]: each call takes one seed from the stream and lays the mask over the
    /// whole tensor (the trainer's sequential draws).
    Sequential(&'a mut Rng),
    /// [`Var::dropout_keyed`]: each call takes one seed from `rng` (a stream every rank of a
    /// data-parallel step shares) and example j of the tensor gets the part of the mask that
    /// belongs to batch position `first_example + j`, so it does not depend on which slice of the
    /// batch a rank holds.
    Keyed {
        /// The step's shared stream.
        rng: &'a mut Rng,
        /// The batch position of the tensor's first example.
        first_example: u64,
    },
}

impl DropoutDraws<'_> {
    /// Applies dropout of rate `p` to `x` with these draws.
    pub fn apply(&mut self, x: &Var, p: f32) -> Var {
        match self {
            DropoutDraws::Sequential(rng) => x.dropout(p, rng),
            DropoutDraws::Keyed { rng, first_example } => x.dropout_keyed(p, rng, *first_example),
        }
    }
}

impl Var {
    /// Dropout whose mask is keyed by batch position: the first axis is the batch, example j
    /// is position `first_example + j`, and its mask comes from streams `(first_example + j)·2^24
    /// + chunk` of one seed drawn from `rng`. The same seed and position give the same mask
    /// whatever else is in the tensor. `p = 0` returns the input and draws nothing.
    ///
    /// # Panics
    /// If `p` is not in `[0, 1)`, or the tensor has no batch axis.
    pub fn dropout_keyed(&self, p: f32, rng: &mut Rng, first_example: u64) -> Var {
        assert!((0.0..1.0).contains(&p), "dropout: p = {p} is not in [0, 1)");
        if p == 0.0 {
            return self.clone();
        }
        let shape = self.shape();
        assert!(!shape.is_empty(), "dropout_keyed: the tensor needs a batch axis");
        let scale = 1.0 / (1.0 - p);
        let seed: u64 = rng.random();
        let x = self.value().as_standard_layout();
        let xs = x.as_slice().expect("as_standard_layout above");
        let per_example = xs.len() / shape[0].max(1);
        let (mut y, mut mask) = (zeroed(xs.len()), zeroed(xs.len()));
        let chunks_per_example = per_example.div_ceil(MASK_CHUNK).max(1);
        y.par_chunks_mut(per_example.max(1))
            .zip(mask.par_chunks_mut(per_example.max(1)))
            .zip(xs.par_chunks(per_example.max(1)))
            .enumerate()
            .for_each(|(j, ((y, m), x))| {
                for (c, ((y, m), x)) in y
                    .chunks_mut(MASK_CHUNK)
                    .zip(m.chunks_mut(MASK_CHUNK))
                    .zip(x.chunks(MASK_CHUNK))
                    .enumerate()
                {
                    debug_assert!(c < chunks_per_example);
                    let mut r = crate::rng_from_seed(seed);
                    r.set_stream(((first_example + j as u64) << 24) | c as u64);
                    for ((y, m), &x) in y.iter_mut().zip(m.iter_mut()).zip(x) {
                        *m = if r.random::<f32>() < p { 0.0 } else { scale };
                        *y = x * *m;
                    }
                }
            });
        let y = Tensor::from_shape_vec(shape, y).expect("y holds one value per element of x");
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
    fn keyed_masks_depend_on_the_batch_position_not_on_the_slice() {
        // A batch of 5 examples at once, and the same batch as slices [0, 2) and [2, 5) with
        // their first positions: the same masks.
        let x = randn(&[5, 3, 4, 4], 9);
        let whole = Var::constant(x.clone()).dropout_keyed(0.4, &mut rng_from_seed(11), 0);
        for (lo, hi) in [(0, 2), (2, 5)] {
            let part = x.slice(ndarray::s![lo..hi, .., .., ..]).to_owned().into_dyn();
            let y = Var::constant(part).dropout_keyed(0.4, &mut rng_from_seed(11), lo as u64);
            let want = whole.value().slice(ndarray::s![lo..hi, .., .., ..]).to_owned().into_dyn();
            assert_eq!(*y.value(), want);
        }
        // Positions differ, masks differ.
        let a = Var::constant(x.clone()).dropout_keyed(0.4, &mut rng_from_seed(11), 1);
        assert_ne!(a.value(), whole.value());
    }

    #[test]
    fn keyed_dropout_backward_matches_finite_differences() {
        let x = randn(&[2, 3, 5], 4);
        let f = |v: &[Var]| v[0].dropout_keyed(0.3, &mut rng_from_seed(5), 7);
        gradcheck(&[x], f, &GradcheckConfig { seed: 4, ..Default::default() }).unwrap();
    }

    #[test]
    fn same_seed_same_mask() {
        let x = Var::constant(randn(&[50], 1));
        let a = x.dropout(0.5, &mut rng_from_seed(3));
        let b = x.dropout(0.5, &mut rng_from_seed(3));
        assert_eq!(a.value(), b.value());
    }
}
