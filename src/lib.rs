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
//! Floors from the ground up; a module imports only from the floors below it.
//!
//! | module        | owns                                                                  |
//! |---------------|-----------------------------------------------------------------------|
//! | [`error`], [`files`], [`stop`], [`cpu`] | the error type; atomic writes, rotation, the directory lock, bounded reads, memory caps; the stop flag; the kernels' instruction set (`DDPM_CPU`) |
//! | [`autodiff`]  | the tape (Wengert list), [`Var`] handles, [`Grads`], gradient checks   |
//! | [`kernels`]   | hot loops with no tape: gemm, conv2d (im2col), rayon                   |
//! | [`device`]    | CPU or GPU for the large products: `--device`, the one dispatch point  |
//! | `gpu`         | (feature `wgpu`) the products as wgpu compute shaders, docs/gpu.md     |
//! | [`ops`]       | differentiable ops, one file per family, forward and backward together |
//! | [`nn`]        | parameter store, layers, the U-Net, Adam, EMA                          |
//! | [`diffusion`] | schedules, q(x_t given x_0), posteriors, p_θ, losses, bits/dim         |
//! | [`sample`]    | the reverse process: ancestral and DDIM sampling, respacing, traces    |
//! | [`config`]    | what a training run depends on, and its validation                    |
//! | [`data`]      | image folders, IDX, CIFAR-10 binaries, seeded batches, fingerprints    |
//! | [`io`]        | checkpoints (the [`io::checkpoint::TrainState`] record), PNG grids, npz |
//! | [`score`]     | sample quality: a small classifier's features, FD, KID, precision/recall, class statistics |
//! | [`distributed`] | data parallelism: the `Collective` trait, sums in rank order, MPI (feature `mpi`) |
//! | [`train`]     | one step of Algorithm 1; [`train::run::Run`], a whole run in a directory |
//! | [`interop`]   | diffusers folders in and out, improved-/guided-diffusion `.pt` files in (a safe torch reader), counter weights |
//!
//! docs/reliability.md says what a run guarantees (atomic, rotated checkpoints; the lock;
//! signals; non-finite steps; exact resume; bounded parsing of every file) and how each is
//! tested.
//!
//! Randomness is always passed in explicitly as a seeded [`Rng`]; the library has no thread-local
//! or global random state.

#![warn(missing_docs)]
// Gradient checks read best as `check(&[x.clone()], ..)` next to the multi-input cases.
#![cfg_attr(test, allow(clippy::cloned_ref_to_slice_refs))]

mod alloc;
pub mod autodiff;
pub mod config;
pub mod cpu;
pub mod data;
pub mod device;
pub mod diffusion;
pub mod distributed;
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
pub mod score;
pub mod stop;
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
