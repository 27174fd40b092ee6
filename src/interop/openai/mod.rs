//! OpenAI's improved-diffusion (Nichol & Dhariwal 2021) and guided-diffusion (Dhariwal & Nichol
//! 2021) checkpoints: a `.pt` state dict (read by [`super::torch_pt`], never unpickled by
//! Python's rules) and the flag string its scripts were run with, which alone says how the
//! network is built and what diffusion it was trained for.
//!
//! | file    | owns                                                                       |
//! |---------|----------------------------------------------------------------------------|
//! | `flags` | the flag string (argparse's rules, each repository's defaults) → [`UNetConfig`] and [`DiffusionConfig`] |
//! | `names` | their `state_dict` names and fused `qkv` → ddpm's parameters                |
//!
//! What the flags cannot be checked against: the head count, the `qkv` order and whether the
//! resampling is by residual blocks leave no trace in the tensor names or shapes, so wrong flags
//! there import without an error and compute another function (tests/openai_equivalence.rs
//! checks each against the library's own outputs).

mod flags;
mod names;

use std::path::Path;

pub use flags::{Family, Flags, NUM_CLASSES};
pub use names::params_from_state_dict;

use crate::nn::{ParamStore, UNet, UNetConfig};
use crate::train::DiffusionConfig;
use crate::Result;

/// An improved- or guided-diffusion model read into ddpm's terms.
#[derive(Clone, Debug)]
pub struct OpenAiModel {
    /// The U-Net the flags describe.
    pub unet: UNetConfig,
    /// The diffusion it was trained for (T, schedule, parameterisation, timestep scaling).
    pub diffusion: DiffusionConfig,
    /// Its weights under ddpm's names.
    pub params: ParamStore,
    /// `--timestep_respacing` as given: their sampler's step choice, not part of the model.
    pub timestep_respacing: String,
    /// What the reader noted on the way (a nested or `module.`-prefixed state dict, f64 tensors).
    pub notes: Vec<String>,
}

/// Reads `pt` as a checkpoint of `family`'s `UNetModel` built with `flags`.
///
/// # Errors
/// [`crate::Error::InvalidConfig`] for flags ddpm cannot map (naming the flag);
/// [`crate::Error::BadFile`] naming the file for a `.pt` the reader refuses (half precision,
/// pickle outside the state-dict subset, …) or whose tensors do not fit the flags (naming the
/// tensor).
pub fn load(pt: &Path, flags: &str, family: Family) -> Result<OpenAiModel> {
    let flags = Flags::parse(flags, family)?;
    let unet = flags.unet_config()?;
    let diffusion = flags.diffusion_config()?;
    // Their sampler would refuse a respacing it cannot lay out; so does the import.
    flags.kept_timesteps(diffusion.timesteps)?;
    let dict = super::torch_pt::read_file(pt)?;
    let mut notes = vec![];
    if let Some(key) = &dict.nested_under {
        notes.push(format!("the state dict was read from the file's `{key}` entry"));
    }
    if dict.stripped_module_prefix {
        notes.push("every name began with `module.` (a DataParallel model); it was dropped".into());
    }
    if dict.converted_from_f64 > 0 {
        notes.push(format!("{} float64 tensors were rounded to float32", dict.converted_from_f64));
    }
    let net = UNet::new(unet.clone())?;
    let params = params_from_state_dict(&net, dict.tensors, flags.new_attention_order(), pt)?;
    Ok(OpenAiModel {
        unet,
        diffusion,
        params,
        timestep_respacing: flags.timestep_respacing().to_string(),
        notes,
    })
}
