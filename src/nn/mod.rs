//! Parameters, layers, the U-Net, Adam and EMA.
//!
//! | file          | owns                                                            |
//! |---------------|-----------------------------------------------------------------|
//! | `params`      | [`ParamStore`] (named tensors) and [`Bound`] (them as `Var`s)   |
//! | `layers`      | conv / linear / group-norm helpers and the DDPM initialiser     |
//! | `embedding`   | the sinusoidal timestep embedding                               |
//! | `resblock`    | the residual block: timestep added or scale-shift, optional resampling |
//! | `attention`   | multi-head spatial self-attention                               |
//! | `unet`        | [`UNetConfig`], [`Preset`], [`UNet`]                            |
//! | `optim`, `ema`| Adam, clipping, warm-up; the parameter EMA                      |

mod attention;
mod ema;
mod embedding;
pub mod layers;
mod optim;
mod params;
mod resblock;
mod unet;

pub use ema::{power_ema_gamma, power_ema_sigma_rel, Ema, MAX_SIGMA_REL};
pub use embedding::{timestep_embedding, EmbeddingOrder};
pub use optim::{clip_grad_norm, warmup_lr, Adam, AdamConfig};
pub use params::{all_finite, Bound, ParamStore};
pub use unet::{
    AttnHeads, AttnNorm, DownsamplePadding, Preset, Resample, TimeConditioning, UNet, UNetConfig,
};
