//! Reverse-mode automatic differentiation on a tape.
//!
//! A [`Tape`] is a Wengert list: every op run on a [`Var`] that belongs to a tape appends one
//! node holding a closure that maps the gradient of the op's output to the gradients of its
//! inputs. Recording order is a topological order, so [`Var::backward`] is one reverse loop.
//!
//! - Gradients accumulate: a value used twice (a skip connection) receives both contributions.
//! - [`Var::detach`] cuts a value off the tape (the hybrid loss uses it to stop the gradient of
//!   the mean through L_vlb).
//! - Values made with [`Var::constant`] carry no tape at all. Ops on constants record nothing and
//!   keep nothing for a backward pass, which is how sampling runs: no tape, no saved activations.
//! - A backward closure runs once ([`FnOnce`]) and is dropped right after, so the activations it
//!   saved are freed as the reverse sweep proceeds.

mod gradcheck;
mod tape;

pub use gradcheck::{gradcheck, GradcheckConfig, GradcheckReport};
pub use tape::{Grads, Tape, Var};

/// The tensor type of the library: a dynamically shaped, row-major `f32` ndarray.
pub type Tensor = ndarray::ArrayD<f32>;
