//! Files the library writes and reads: checkpoints (safetensors), PNG grids of samples, npz arrays.
//!
//! | file            | owns                                                                 |
//! |-----------------|----------------------------------------------------------------------|
//! | [`png`]         | `[N, C, H, W]` on [−1, 1] → PNG grid or image; `round((x + 1)·127.5)` |
//! | [`safetensors`] | named `f32` tensors + string metadata ↔ a `.safetensors` file        |
//! | [`npz`]         | named `f64`/`f32`/`i64` arrays ↔ a NumPy `.npz` archive; f32 `.npy`   |
//!
//! Every writer is atomic ([`crate::files::write_atomic`]): a reader (or a crash) sees the old
//! file or the new one, never half of one.

pub mod checkpoint;
pub mod npz;
pub mod plot;
pub mod png;
pub mod safetensors;
