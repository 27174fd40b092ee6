//! diffusers' DDPM-family checkpoints (huggingface/diffusers `UNet2DModel` + `DDPMScheduler`:
//! google/ddpm-cifar10-32 and what `train_unconditional.py` writes) ↔ ddpm's U-Net and diffusion
//! settings.
//!
//! A diffusers folder holds `config.json` (the `UNet2DModel` arguments),
//! `diffusion_pytorch_model.safetensors` (its `state_dict`), and for a pipeline
//! `scheduler_config.json` (the `DDPMScheduler` arguments) and `model_index.json`. [`load_folder`]
//! reads one (also the pipeline layout with `unet/` and `scheduler/` subfolders); [`write_folder`]
//! writes the flat layout, which both `UNet2DModel.from_pretrained(DIR)` and
//! `DDPMPipeline.from_pretrained(DIR)` load.
//!
//! | file           | owns                                                                  |
//! |----------------|-----------------------------------------------------------------------|
//! | `unet_config`  | `config.json` ↔ [`UNetConfig`] (the option table is there)            |
//! | `names`        | parameter names and layouts ↔ `state_dict` tensors                    |
//! | `scheduler`    | `DDPMScheduler`/`DDIMScheduler` configs in full, their timesteps and `step`; the subset ddpm samples with ↔ diffusion settings |
//! | `keys`         | reading JSON keys with diffusers' defaults, refusing them by name     |
//!
//! Anything ddpm cannot reproduce (a block type, option or tensor with no counterpart) is refused
//! with an error naming the key and the reason: an import never silently computes another
//! function.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::nn::{ParamStore, UNet, UNetConfig};
use crate::{Error, Result, Tensor};

mod keys;
mod names;
mod scheduler;
mod unet_config;

pub use names::{diffusers_name, params_from_tensors, params_to_tensors};
pub use scheduler::{
    ddpm_scheduler_step_f32, BetaSource, DdpmVarianceType, DiffusersBetaSchedule, DiffusersScheduler,
    DiffusersSchedulerConfig, PredictionType, SchedulerClass, SchedulerSettings, SchedulerStep, StepVariance,
    TimestepSpacing,
};
pub use unet_config::{unet_config_from_json, unet_config_to_json};

/// The UNet2DModel arguments.
pub const CONFIG_FILE: &str = "config.json";
/// The weights, as `save_pretrained` names them.
pub const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// The DDPMScheduler arguments.
pub const SCHEDULER_FILE: &str = "scheduler_config.json";
/// What `DDPMPipeline.from_pretrained` reads first.
pub const MODEL_INDEX_FILE: &str = "model_index.json";
/// The diffusers version the mapping was checked against (written into exported configs).
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// A diffusers model read into ddpm's terms.
#[derive(Clone, Debug)]
pub struct DiffusersModel {
    /// The U-Net's configuration.
    pub unet: UNetConfig,
    /// Its weights under ddpm's names.
    pub params: ParamStore,
    /// The scheduler, when the folder has a `scheduler_config.json`.
    pub scheduler: Option<SchedulerSettings>,
    /// The folder holding `config.json` and the weights.
    pub unet_dir: PathBuf,
}

/// Whether `dir` looks like a diffusers model or pipeline folder.
pub fn is_diffusers_folder(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file() || dir.join("unet").join(CONFIG_FILE).is_file()
}

fn read_json(path: &Path) -> Result<Value> {
    // A configuration is a few kilobytes; this cap only stops a wrong path from filling memory.
    let bytes = crate::files::read_capped(path, 16 << 20)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::bad_file(path, format!("not valid JSON: {e}")))
}

/// Reads a diffusers folder: `DIR/config.json` + `DIR/diffusion_pytorch_model.safetensors`, or the
/// pipeline layout `DIR/unet/…`; the scheduler from `DIR/scheduler_config.json` or
/// `DIR/scheduler/scheduler_config.json` when present.
///
/// # Errors
/// [`Error::Io`] / [`Error::BadFile`] naming the file for anything missing, unreadable or
/// unmappable (see [`unet_config_from_json`], [`params_from_tensors`],
/// [`SchedulerSettings::from_json`]); a folder with only PyTorch `.bin` weights is refused with
/// the conversion to do.
pub fn load_folder(dir: &Path) -> Result<DiffusersModel> {
    let unet_dir = if dir.join(CONFIG_FILE).is_file() { dir.to_path_buf() } else { dir.join("unet") };
    let config_path = unet_dir.join(CONFIG_FILE);
    if !config_path.is_file() {
        return Err(Error::bad_file(
            dir,
            format!("no {CONFIG_FILE} here or in unet/; give the folder UNet2DModel.save_pretrained wrote"),
        ));
    }
    let unet = unet_config_from_json(&read_json(&config_path)?, &config_path)?;
    let weights = unet_dir.join(WEIGHTS_FILE);
    if !weights.is_file() {
        let bin = unet_dir.join("diffusion_pytorch_model.bin");
        let hint = if bin.is_file() {
            "only the PyTorch pickle diffusion_pytorch_model.bin is here; convert it in Python with \
             UNet2DModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)"
        } else {
            "the weights are missing"
        };
        return Err(Error::bad_file(&weights, hint));
    }
    let net = UNet::new(unet.clone())?;
    let params = params_from_tensors(&net, crate::io::safetensors::load(&weights)?.tensors, &weights)?;
    let scheduler_path = [dir.join(SCHEDULER_FILE), dir.join("scheduler").join(SCHEDULER_FILE)]
        .into_iter()
        .find(|p| p.is_file());
    let scheduler = match scheduler_path {
        Some(p) => Some(SchedulerSettings::from_json(&read_json(&p)?, &p)?),
        None => None,
    };
    Ok(DiffusersModel { unet, params, scheduler, unet_dir })
}

/// Writes `dir` (created if needed) as a flat diffusers folder: `config.json`,
/// `diffusion_pytorch_model.safetensors`, `scheduler_config.json` and `model_index.json`, so
/// `UNet2DModel.from_pretrained(dir)` and `DDPMPipeline.from_pretrained(dir)` load it.
///
/// # Errors
/// [`Error::InvalidConfig`] as [`unet_config_to_json`], or if `params` does not match `unet`
/// (a missing or extra name, another shape); [`Error::Io`] if a file cannot be written.
pub fn write_folder(
    dir: &Path,
    unet: &UNetConfig,
    params: &ParamStore,
    scheduler: &SchedulerSettings,
) -> Result<()> {
    let config = unet_config_to_json(unet)?;
    let net = UNet::new(unet.clone())?;
    let shapes = net.param_shapes();
    let fits = shapes.len() == params.len()
        && shapes.iter().all(|(n, shape)| params.get(n).is_some_and(|p| p.shape() == shape.as_slice()));
    if !fits {
        return Err(Error::config(
            "diffusers export",
            "the weights do not match the U-Net of the configuration",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors = params_to_tensors(&net, params);
    let refs: Vec<(String, &Tensor)> = tensors.iter().map(|(n, t)| (n.clone(), t)).collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    crate::io::safetensors::save_atomic(&dir.join(WEIGHTS_FILE), &refs, &meta)?;
    let index = json!({
        "_class_name": "DDPMPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "unet": ["diffusers", "UNet2DModel"],
    });
    for (file, value) in
        [(CONFIG_FILE, &config), (SCHEDULER_FILE, &scheduler.to_json()), (MODEL_INDEX_FILE, &index)]
    {
        let text = serde_json::to_string_pretty(value).expect("a serde_json::Value always serialises") + "\n";
        crate::files::write_atomic(&dir.join(file), text.as_bytes())?;
    }
    Ok(())
}
