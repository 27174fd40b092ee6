//! Working with other DDPM implementations: reading and writing their checkpoints, and
//! deterministic weights both sides can build.
//!
//! | file            | owns                                                                              |
//! |-----------------|-----------------------------------------------------------------------------------|
//! | [`diffusers`]   | diffusers' `UNet2DModel` folders (config.json + safetensors) ↔ ddpm's U-Net; `DDPMScheduler`/`DDIMScheduler` configs and steps ↔ [`crate::train::DiffusionConfig`] |
//! | [`openai`]      | improved-diffusion and guided-diffusion checkpoints: a `.pt` state dict and the flags of their scripts ↔ ddpm's U-Net and diffusion |
//! | [`torch_pt`]    | PyTorch `.pt` state dicts (`torch.save`'s zip of a pickle), read without running the pickle |
//! | [`counter`]     | counter-based weights (splitmix64 of tensor and element index), as the fixtures use |
//! | [`model`]       | [`load_model`]: a ddpm checkpoint or run directory, or a diffusers folder, ready to predict |
//!
//! The diffusion math of diffusers' `DDPMScheduler` is the `diffusers`
//! [`Convention`](crate::diffusion::Convention); docs/conventions.md lists where it differs from
//! Ho et al.'s.

pub mod counter;
pub mod diffusers;
pub mod model;
pub mod openai;
pub mod torch_pt;

pub use model::{load_model, load_openai, resolve_checkpoint, LoadedModel};
