//! Hot loops with no tape: gemm, conv2d (implicit or via im2col), nearest-neighbour upsampling.
//! Pure functions over row-major `f32` slices, parallel with rayon, benchmarked on their own.
//!
//! The differentiable ops in [`crate::ops`] check shapes, call these kernels, and record their
//! backward closures; nothing here knows about the tape.
//!
//! | file          | owns                                                                    |
//! |---------------|-------------------------------------------------------------------------|
//! | `attention.rs` | [`attention_forward`], [`attention_backward`]: softmax attention fused per image |
//! | `gemm.rs`     | [`sgemm`], [`sgemm_batched`]: `C = α·op(A)@op(B) + β·C` over the `gemm` crate   |
//! | `conv.rs`     | [`Conv2dGeom`], [`conv2d_forward`] and its input / weight gradients      |
//! | `conv/implicit/` | stride-1 same convolutions read in place under lane masks           |
//! | `norm.rs`     | [`group_norm_forward`] (optionally fused with SiLU) and [`group_norm_backward`] |
//! | `packed.rs`   | [`packed::gemm_packed`]: A packed once, B read in place; the conv micro-kernel |
//! | `lanes/`      | 16 `f32` lanes on AVX-512, AVX2, NEON or a portable loop: the one shape the products and convolutions are written in, so every instruction set gives the same bits |
//! | `math.rs`     | `exp`/sigmoid and f64 lane sums that vectorise (no libm call per element) |
//! | `upsample.rs` | [`upsample_nearest2x`] and its gradient                                  |
//!
//! Determinism: every kernel gives bit-identical results for the same inputs whatever the number
//! of rayon threads. Work is split in pieces whose size depends on the shapes only, and where
//! pieces are summed (the convolution weight gradient) they are summed in a fixed order.

pub mod attention;
pub mod conv;
pub mod gemm;
pub(crate) mod lanes;
pub mod math;
pub mod norm;
pub mod packed;
pub mod upsample;

pub use attention::{attention_backward, attention_forward};
pub use conv::{
    conv2d_backward_input, conv2d_backward_input_uninit, conv2d_backward_weight, conv2d_forward,
    conv2d_forward_plus, conv2d_forward_uninit, upsample2x_conv3x3_forward_uninit, Conv2dGeom, ConvPlus,
    PackedWeights,
};
pub use gemm::{sgemm, sgemm_batched};
pub use norm::{group_norm_backward, group_norm_forward, group_norm_forward_uninit, GroupNormGeom};
pub use upsample::{upsample_nearest2x, upsample_nearest2x_backward, upsample_nearest2x_uninit};

/// Views initialised values as possibly uninitialised, for the kernels that write their output
/// without reading it. Only `f32` values are ever stored through the view.
pub(crate) fn as_uninit(y: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: same layout; every value stored through the result is an initialised f32.
    unsafe { &mut *(y as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) }
}
