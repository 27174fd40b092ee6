//! # ddpm
//!
//! Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020, arXiv:2006.11239) in pure
//! Rust, for CPUs: a tape-based reverse-mode autodiff written here, the diffusion math implemented
//! exactly and named as in the paper, and a compact U-Net trained to predict the noise.
//!
//! What it is not: a general deep-learning framework. The ops are the ones a DDPM U-Net and its
//! losses need, each with its backward pass side by side and a finite-difference check.
//!
//! ## Module map
//! | module        | owns                                                                  |
//! |---------------|-----------------------------------------------------------------------|
//! | [`autodiff`]  | the tape (Wengert list), [`Var`] handles, [`Grads`], gradient checks   |
//! | [`ops`]       | differentiable ops, one file per family, forward and backward together |
//! | [`kernels`]   | hot loops with no tape: gemm, conv2d (im2col), rayon                   |
//! | [`device`]    | CPU or GPU for the large products: `--device`, the one dispatch point  |
//! | `gpu`         | (feature `wgpu`) the products as wgpu compute shaders, docs/gpu.md     |
//! | [`nn`]        | parameter store, layers, the U-Net, Adam, EMA                          |
//! | [`diffusion`] | schedules, q(x_t given x_0), posteriors, p_θ, losses, bits/dim, samplers |
//! | [`data`]      | image folders, IDX, CIFAR-10 binaries, seeded batches                  |
//! | [`io`]        | checkpoints (safetensors), PNG grids, npz                              |
//! | [`interop`]   | diffusers checkpoints in and out, counter-based weights for fixtures   |
//!
//! Randomness is always passed in explicitly as a seeded [`Rng`]; the library has no thread-local
//! or global random state.

#![warn(missing_docs)]
// Gradient checks read best as `check(&[x.clone()], ..)` next to the multi-input cases.
#![cfg_attr(test, allow(clippy::cloned_ref_to_slice_refs))]

mod alloc;
pub mod autodiff;
pub mod config;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod error;
pub mod files;
#[cfg(feature = "wgpu")]
pub mod gpu;
pub mod interop;
pub mod io;
pub mod kernels;
pub mod nn;
pub mod ops;
pub mod sample;
pub mod train;

pub use alloc::{keep_freed_memory, HugePageHeap};
pub use autodiff::{Grads, Tape, Tensor, Var};
pub use error::{Error, Result};

/// The random number generator used everywhere in the library: ChaCha8, seeded explicitly, with a
/// stream that is the same on every platform and whose position can be saved and restored.
pub type Rng = rand_chacha::ChaCha8Rng;

/// A [`Rng`] from a 64-bit seed.
pub fn rng_from_seed(seed: u64) -> Rng {
    use rand::SeedableRng;
    Rng::seed_from_u64(seed)
}
