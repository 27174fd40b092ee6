//! [`load_model`]: a network ready to predict, from whichever kind of file holds it (a ddpm
//! checkpoint or run directory, or a diffusers folder; [`load_openai`] for an improved- or
//! guided-diffusion `.pt`). `ddpm predict` and `ddpm trace` load through it, and so do the
//! Python bindings' `ddpm.load`.

use std::path::{Path, PathBuf};

use super::diffusers;
use crate::config::Draws;
use crate::nn::{ParamStore, UNet};
use crate::train::run::CHECKPOINT;
use crate::train::{DiffusionConfig, TrainConfig};
use crate::{Error, Result};

/// A network, its weights and the diffusion it belongs to.
#[derive(Debug)]
pub struct LoadedModel {
    /// The U-Net.
    pub net: UNet,
    /// Its weights (EMA unless asked otherwise, for a ddpm checkpoint).
    pub params: ParamStore,
    /// The diffusion it samples (from scheduler_config.json for a diffusers folder).
    pub diffusion: DiffusionConfig,
    /// Whether sampling clips x̂_0 unless told otherwise.
    pub clip_x0: bool,
}

/// The checkpoint file `path` names: itself, or `checkpoint.safetensors` in a run directory.
///
/// # Errors
/// [`Error::BadFile`] naming `path` if there is no such file.
pub fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    let file = if path.is_dir() { path.join(CHECKPOINT) } else { path.to_path_buf() };
    if file.is_file() {
        return Ok(file);
    }
    Err(Error::bad_file(
        path,
        if path.is_dir() {
            format!(
                "no {CHECKPOINT} in this directory; train first with `ddpm train --out {}`",
                path.display()
            )
        } else {
            "no such checkpoint file".to_string()
        },
    ))
}

/// Loads `path`: a diffusers folder (config.json, or unet/config.json), a ddpm run directory or
/// a ddpm checkpoint file. `no_ema` picks a ddpm checkpoint's raw weights.
///
/// # Errors
/// A missing or unreadable file, or a network and scheduler that do not fit together, each
/// naming the file.
pub fn load_model(path: &Path, no_ema: bool) -> Result<LoadedModel> {
    if path.is_dir() && diffusers::is_diffusers_folder(path) {
        let m = diffusers::load_folder(path)?;
        let scheduler = match m.scheduler {
            Some(s) => s,
            // DDPMScheduler's defaults, as diffusers would use them.
            None => diffusers::SchedulerSettings::from_json(&serde_json::json!({}), path)?,
        };
        let diffusion = scheduler.diffusion_config();
        // The network and the scheduler must fit together (e.g. a learned variance needs twice
        // the image channels out), as `ddpm import` checks.
        let config = TrainConfig {
            unet: m.unet.clone(),
            diffusion: diffusion.clone(),
            optim: Default::default(),
            batch_size: 1,
            random_flip: false,
            seed: 0,
            draws: Draws::Keyed,
        };
        config.validate().map_err(|e| {
            Error::bad_file(path, format!("the UNet2DModel and the scheduler do not fit together: {e}"))
        })?;
        return Ok(LoadedModel {
            net: UNet::new(m.unet)?,
            params: m.params,
            diffusion,
            clip_x0: scheduler.clip_sample,
        });
    }
    let file = resolve_checkpoint(path)?;
    let ck = crate::io::checkpoint::load(&file)?;
    let clip_x0 = ck.clip_x0.unwrap_or(true);
    let params = if no_ema { ck.params } else { ck.ema_params() };
    Ok(LoadedModel {
        net: UNet::new(ck.config.unet.clone())?,
        params,
        diffusion: ck.config.diffusion,
        clip_x0,
    })
}

/// Loads an improved- or guided-diffusion `.pt` checkpoint built with `flags` (the flags of
/// their scripts, as `ddpm import` takes them). Their samplers clip x̂_0, so `clip_x0` is set.
///
/// # Errors
/// As [`super::openai::load`]; flags that describe no model ddpm can run.
pub fn load_openai(pt: &Path, flags: &str, family: super::openai::Family) -> Result<LoadedModel> {
    let m = super::openai::load(pt, flags, family)?;
    let config = TrainConfig {
        unet: m.unet.clone(),
        diffusion: m.diffusion.clone(),
        optim: Default::default(),
        batch_size: 1,
        random_flip: false,
        seed: 0,
        draws: Draws::Keyed,
    };
    config
        .validate()
        .map_err(|e| Error::bad_file(pt, format!("the flags describe no model ddpm can run: {e}")))?;
    Ok(LoadedModel { net: UNet::new(m.unet)?, params: m.params, diffusion: m.diffusion, clip_x0: true })
}
