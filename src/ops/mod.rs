//! Differentiable ops on [`Var`](crate::Var): one file per family, each op's forward and backward
//! side by side.
//!
//! Every op is an inherent method of [`Var`](crate::Var), so models read like the math:
//! `x.conv2d(&w, Some(&b), 1, Padding::same(1)).group_norm(..).silu()`. Shapes are checked
//! up front and a mismatch panics with the op's name and the shapes involved (a programming
//! error, as in ndarray). Broadcasting happens only through [`Var::broadcast_to`](crate::Var::broadcast_to),
//! whose backward is [`Var::sum_to`](crate::Var::sum_to).
//!
//! | file            | ops                                                                  |
//! |-----------------|----------------------------------------------------------------------|
//! | `elementwise`   | add, sub, mul, div, neg, scalar add/mul, exp, log, sqrt, square, tanh, sigmoid, SiLU |
//! | `broadcast`     | broadcast_to, sum_to                                                 |
//! | `reduce`        | sum/mean over everything or one axis                                 |
//! | `shape`         | reshape, permute, transpose, concat, slice                           |
//! | `matmul`        | matmul (2-D), batched matmul (3-D), linear; fused attention      |
//! | `conv`          | conv2d (stride, asymmetric zero padding), nearest 2x upsampling       |
//! | `norm`          | group norm with affine parameters                                    |
//! | `softmax`       | softmax over the last axis                                           |
//! | `dropout`       | inverted dropout with an explicit RNG                                |
//! | `loss`          | mean-squared error                                                   |

mod broadcast;
mod conv;
mod dropout;
mod elementwise;
mod loss;
mod matmul;
mod norm;
mod par;
mod reduce;
mod shape;
mod softmax;

pub use conv::Padding;
pub use dropout::DropoutDraws;

#[cfg(test)]
pub(crate) mod testutil {
    //! Shared helpers for the ops' gradient checks.
    use rand::Rng as _;
    use rand_distr::StandardNormal;

    use crate::autodiff::{gradcheck, GradcheckConfig};
    use crate::{Tensor, Var};

    /// A standard-normal tensor of the given shape from a seed.
    pub fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::rng_from_seed(seed);
        Tensor::from_shape_fn(shape, |_| rng.sample::<f32, _>(StandardNormal))
    }

    /// A tensor with entries uniform in [lo, hi).
    pub fn uniform(shape: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
        let mut rng = crate::rng_from_seed(seed);
        Tensor::from_shape_fn(shape, |_| rng.random_range(lo..hi))
    }

    /// Runs a gradient check with the default config and a seed, panicking with its message.
    pub fn check<F: Fn(&[Var]) -> Var>(inputs: &[Tensor], seed: u64, f: F) {
        let cfg = GradcheckConfig { seed, ..GradcheckConfig::default() };
        if let Err(msg) = gradcheck(inputs, f, &cfg) {
            panic!("gradient check failed: {msg}");
        }
    }

    /// A shape of `rank` dimensions, each in 1..=max (1-element axes included on purpose).
    pub fn shape_strategy(rank: usize, max: usize) -> impl proptest::strategy::Strategy<Value = Vec<usize>> {
        proptest::collection::vec(1..=max, rank)
    }
}
