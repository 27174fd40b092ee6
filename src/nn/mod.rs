//! Parameters, layers, the U-Net, Adam and EMA.

mod ema;
mod optim;
mod params;

pub use ema::Ema;
pub use optim::{clip_grad_norm, warmup_lr, Adam, AdamConfig};
pub use params::{Bound, ParamStore};
