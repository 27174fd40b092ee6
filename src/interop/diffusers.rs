//! diffusers' DDPM checkpoints (huggingface/diffusers, `UNet2DModel` + `DDPMScheduler`, the
//! google/ddpm-cifar10-32 family) ↔ ddpm's U-Net and diffusion settings.
//!
//! A diffusers folder holds `config.json` (the `UNet2DModel` arguments),
//! `diffusion_pytorch_model.safetensors` (its `state_dict`), and for a pipeline
//! `scheduler_config.json` (the `DDPMScheduler` arguments) and `model_index.json`. [`load_folder`]
//! reads one (also the pipeline layout with `unet/` and `scheduler/` subfolders); [`write_folder`]
//! writes the flat layout, which both `UNet2DModel.from_pretrained(DIR)` and
//! `DDPMPipeline.from_pretrained(DIR)` load.
//!
//! # What maps
//! Both networks are Ho et al.'s U-Net; only the names and two layouts differ:
//!
//! | ddpm                               | diffusers                                              |
//! |------------------------------------|--------------------------------------------------------|
//! | `temb.dense.0`, `temb.dense.1`     | `time_embedding.linear_1`, `time_embedding.linear_2`   |
//! | `conv_in`, `norm_out`, `conv_out`  | `conv_in`, `conv_norm_out`, `conv_out`                 |
//! | `down.{i}.block.{j}.{norm1,conv1,temb_proj,norm2,conv2,nin_shortcut}` | `down_blocks.{i}.resnets.{j}.{norm1,conv1,time_emb_proj,norm2,conv2,conv_shortcut}` |
//! | `down.{i}.attn.{j}.{norm,q,k,v,proj_out}` | `down_blocks.{i}.attentions.{j}.{group_norm,to_q,to_k,to_v,to_out.0}` (old files: `query,key,value,proj_attn`) |
//! | `down.{i}.downsample.conv`         | `down_blocks.{i}.downsamplers.0.conv`                  |
//! | `mid.{block_1,attn_1,block_2}`     | `mid_block.{resnets.0,attentions.0,resnets.1}`         |
//! | `up.{i}.…` (level i)               | `up_blocks.{L−1−i}.…` (diffusers counts from the bottom) |
//! | `up.{i}.upsample.conv`             | `up_blocks.{L−1−i}.upsamplers.0.conv`                  |
//!
//! Attention q/k/v/out are 1x1 convs in ddpm (`[C, C, 1, 1]`) and linear layers in diffusers
//! (`[C, C]`), the same numbers. Config keys: `block_out_channels` = ch·ch_mult,
//! `layers_per_block` = num_res_blocks, an `AttnDownBlock2D`/`AttnUpBlock2D` at a level = that
//! level's resolution in attn_resolutions, `norm_num_groups` / `norm_eps` = gn_groups / gn_eps,
//! `downsample_padding` 0/1 = [`DownsamplePadding::TfSame`] / [`DownsamplePadding::Symmetric`],
//! `flip_sin_to_cos` false/true = [`EmbeddingOrder::SinCos`] / [`EmbeddingOrder::CosSin`],
//! `freq_shift` = embedding_freq_shift.
//!
//! Everything else (a block type, option or tensor with no counterpart, such as
//! `resnet_time_scale_shift = "scale_shift"`, multi-head attention or class embeddings) is refused
//! with an error naming the key and the reason: an import never silently computes another function.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::diffusion::{BetaSchedule, Convention, LossType, MeanType, TimestepSampling, VarianceType};
use crate::nn::{
    AttnHeads, AttnNorm, DownsamplePadding, EmbeddingOrder, ParamStore, Resample, TimeConditioning, UNet,
    UNetConfig,
};
use crate::train::DiffusionConfig;
use crate::{Error, Result, Tensor};

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

/// The DDPMScheduler settings ddpm can represent.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerSettings {
    /// β schedule: `linear` (1e-4 … 0.02) or `squaredcos_cap_v2` ([`BetaSchedule::Cosine`]).
    pub schedule: BetaSchedule,
    /// T (`num_train_timesteps`).
    pub timesteps: usize,
    /// `prediction_type`: epsilon, sample or v_prediction.
    pub mean_type: MeanType,
    /// `variance_type` (the `_log` variants sample the same distribution as the plain ones).
    pub variance_type: VarianceType,
    /// `clip_sample`: clip the predicted x_0 to [−1, 1] at every step.
    pub clip_sample: bool,
}

impl Default for SchedulerSettings {
    /// Ho et al.'s CIFAR-10 sampler: linear, T = 1000, ε, σ² = β, clipping.
    fn default() -> Self {
        SchedulerSettings {
            schedule: BetaSchedule::Linear,
            timesteps: 1000,
            mean_type: MeanType::Eps,
            variance_type: VarianceType::FixedLarge,
            clip_sample: true,
        }
    }
}

impl SchedulerSettings {
    /// The diffusion settings of a ddpm checkpoint with this scheduler: the `diffusers`
    /// convention, L_simple (L_hybrid when the variance is learned).
    pub fn diffusion_config(&self) -> DiffusionConfig {
        DiffusionConfig {
            schedule: self.schedule.clone(),
            timesteps: self.timesteps,
            convention: Convention::Diffusers,
            mean_type: self.mean_type,
            variance_type: self.variance_type,
            loss: if self.variance_type.is_learned() { LossType::Hybrid } else { LossType::Simple },
            timestep_sampling: TimestepSampling::Uniform,
        }
    }

    /// The scheduler of a ddpm checkpoint's diffusion settings.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a schedule or parameterisation diffusers' `DDPMScheduler`
    /// cannot express (a schedule other than linear or cosine, a rescaled linear schedule, x_{t−1}
    /// prediction, a learned log-variance).
    pub fn from_diffusion(d: &DiffusionConfig, clip_sample: bool) -> Result<Self> {
        let refuse = |reason: String| Err(Error::config("diffusers export", reason));
        match &d.schedule {
            BetaSchedule::Linear | BetaSchedule::Cosine => {}
            other => {
                return refuse(format!(
                    "schedule `{other}` has no DDPMScheduler beta_schedule (only linear and cosine map)"
                ))
            }
        }
        if d.schedule == BetaSchedule::Linear
            && d.timesteps != 1000
            && d.convention.settings().linear_rescale != crate::diffusion::convention::LinearRescale::None
        {
            return refuse(format!(
                "the {} convention rescales the linear schedule for T = {}; DDPMScheduler's linear does not",
                d.convention, d.timesteps
            ));
        }
        if d.variance_type == VarianceType::Learned {
            return refuse(
                "a learned log-variance has no DDPMScheduler variance_type (its \"learned\" reads the output as the variance)"
                    .into(),
            );
        }
        if d.mean_type == MeanType::PrevX {
            return refuse("prediction of x_(t-1) (prev-x) has no DDPMScheduler prediction_type".into());
        }
        Ok(SchedulerSettings {
            schedule: d.schedule.clone(),
            timesteps: d.timesteps,
            mean_type: d.mean_type,
            variance_type: d.variance_type,
            clip_sample,
        })
    }

    /// Reads a `scheduler_config.json` value; missing keys take DDPMScheduler's defaults.
    ///
    /// # Errors
    /// [`Error::BadFile`] naming `path`, the key and the reason for anything ddpm cannot
    /// reproduce (another scheduler class, trained_betas, thresholding, another clip range, a
    /// steps_offset, zero-SNR rescaling, other β endpoints, the `learned` variance, an unknown key).
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let keys = Keys::new(v, path, "scheduler config")?;
        keys.class_name("DDPMScheduler")?;
        keys.refuse_unknown(&[
            "num_train_timesteps",
            "beta_start",
            "beta_end",
            "beta_schedule",
            "trained_betas",
            "variance_type",
            "clip_sample",
            "prediction_type",
            "thresholding",
            "dynamic_thresholding_ratio",
            "clip_sample_range",
            "sample_max_value",
            "timestep_spacing",
            "steps_offset",
            "rescale_betas_zero_snr",
        ])?;
        let timesteps = keys.usize_or("num_train_timesteps", 1000)?;
        if !keys.is_null_or_absent("trained_betas") {
            return Err(keys.bad("trained_betas", "explicit β lists are not supported; use a named schedule"));
        }
        let schedule = match keys.str_or("beta_schedule", "linear")? {
            "linear" => {
                let (start, end) = (keys.f64_or("beta_start", 1e-4)?, keys.f64_or("beta_end", 0.02)?);
                if start != 1e-4 || end != 0.02 {
                    return Err(keys.bad(
                        "beta_start",
                        &format!(
                            "the linear schedule runs from {start} to {end}; ddpm's runs from 1e-4 to 0.02"
                        ),
                    ));
                }
                BetaSchedule::Linear
            }
            "squaredcos_cap_v2" => BetaSchedule::Cosine,
            other => {
                return Err(keys.bad(
                    "beta_schedule",
                    &format!("{other:?} is not supported (linear and squaredcos_cap_v2 are)"),
                ))
            }
        };
        let variance_type = match keys.str_or("variance_type", "fixed_small")? {
            "fixed_small" | "fixed_small_log" => VarianceType::FixedSmall,
            "fixed_large" | "fixed_large_log" => VarianceType::FixedLarge,
            // diffusers' `learned` takes the output as σ² itself; ddpm's (improved-diffusion's)
            // as log σ². Not the same model, so refused.
            "learned" => return Err(keys.bad(
                "variance_type",
                "\"learned\" reads the network output as the variance, ddpm's learned as the log-variance",
            )),
            "learned_range" => VarianceType::LearnedRange,
            other => return Err(keys.bad("variance_type", &format!("unknown value {other:?}"))),
        };
        let mean_type = match keys.str_or("prediction_type", "epsilon")? {
            "epsilon" => MeanType::Eps,
            "sample" => MeanType::X0,
            "v_prediction" => MeanType::V,
            other => return Err(keys.bad("prediction_type", &format!("unknown value {other:?}"))),
        };
        if keys.bool_or("thresholding", false)? {
            return Err(keys.bad("thresholding", "dynamic thresholding is not implemented in ddpm"));
        }
        let clip_sample = keys.bool_or("clip_sample", true)?;
        if clip_sample && keys.f64_or("clip_sample_range", 1.0)? != 1.0 {
            return Err(keys.bad("clip_sample_range", "ddpm clips x_0 to [-1, 1] only"));
        }
        if keys.usize_or("steps_offset", 0)? != 0 {
            return Err(keys.bad("steps_offset", "a non-zero offset skips t = 0; ddpm samples every step"));
        }
        if keys.bool_or("rescale_betas_zero_snr", false)? {
            return Err(keys.bad("rescale_betas_zero_snr", "zero terminal SNR rescaling is not implemented"));
        }
        Ok(SchedulerSettings { schedule, timesteps, mean_type, variance_type, clip_sample })
    }

    /// The `scheduler_config.json` value, every key written.
    pub fn to_json(&self) -> Value {
        let beta_schedule = match self.schedule {
            BetaSchedule::Cosine => "squaredcos_cap_v2",
            _ => "linear",
        };
        json!({
            "_class_name": "DDPMScheduler",
            "_diffusers_version": DIFFUSERS_VERSION,
            "beta_end": 0.02,
            "beta_schedule": beta_schedule,
            "beta_start": 0.0001,
            "clip_sample": self.clip_sample,
            "clip_sample_range": 1.0,
            "dynamic_thresholding_ratio": 0.995,
            "num_train_timesteps": self.timesteps,
            "prediction_type": match self.mean_type {
                MeanType::Eps | MeanType::PrevX => "epsilon",
                MeanType::X0 => "sample",
                MeanType::V => "v_prediction",
            },
            "rescale_betas_zero_snr": false,
            "sample_max_value": 1.0,
            "steps_offset": 0,
            "thresholding": false,
            "timestep_spacing": "leading",
            "trained_betas": null,
            "variance_type": match self.variance_type {
                VarianceType::FixedSmall => "fixed_small",
                VarianceType::FixedLarge => "fixed_large",
                // Refused by from_diffusion; diffusers' "learned" is another parameterisation.
                VarianceType::Learned => "learned",
                VarianceType::LearnedRange => "learned_range",
            },
        })
    }
}

/// The keys of one JSON config object, read with diffusers' defaults and refused by name.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
    what: &'static str,
}

impl<'a> Keys<'a> {
    fn new(v: &'a Value, path: &'a Path, what: &'static str) -> Result<Self> {
        let map =
            v.as_object().ok_or_else(|| Error::bad_file(path, format!("the {what} is not a JSON object")))?;
        Ok(Keys { map, path, what })
    }

    fn bad(&self, key: &str, reason: &str) -> Error {
        Error::bad_file(self.path, format!("{} key `{key}`: {reason}", self.what))
    }

    fn class_name(&self, want: &str) -> Result<()> {
        match self.map.get("_class_name") {
            None => Ok(()),
            Some(Value::String(s)) if s == want => Ok(()),
            Some(other) => Err(self.bad("_class_name", &format!("{other}; ddpm reads {want} only"))),
        }
    }

    /// Keys starting with `_` are diffusers' bookkeeping and ignored.
    fn refuse_unknown(&self, known: &[&str]) -> Result<()> {
        match self.map.keys().find(|k| !k.starts_with('_') && !known.contains(&k.as_str())) {
            Some(k) => Err(self.bad(k, "unknown to ddpm's mapping, so its effect cannot be reproduced")),
            None => Ok(()),
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn is_null_or_absent(&self, key: &str) -> bool {
        self.get(key).is_none()
    }

    fn str_or(&self, key: &str, default: &'static str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.bad(key, &format!("{v} is not a string"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.bad(key, &format!("{v} is not true/false"))),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, &format!("{v} is not a number"))),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| self.bad(key, &format!("{v} is not a non-negative integer"))),
        }
    }

    fn str_list(&self, key: &str) -> Result<Vec<&'a str>> {
        let v = self.get(key).ok_or_else(|| self.bad(key, "missing"))?;
        v.as_array()
            .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.bad(key, &format!("{v} is not a list of strings")))
    }

    fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        let v = self.get(key).ok_or_else(|| self.bad(key, "missing"))?;
        v.as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| self.bad(key, &format!("{v} is not a list of integers")))
    }

    /// A value that must equal `want` (diffusers' default `default` when absent).
    fn require(&self, key: &str, default: Value, want: &[Value], reason: &str) -> Result<()> {
        let got = self.map.get(key).cloned().unwrap_or(default);
        if want.contains(&got) {
            Ok(())
        } else {
            Err(self.bad(key, &format!("{got} is not supported: {reason}")))
        }
    }
}

/// The keys of `UNet2DModel`'s config that [`unet_config_from_json`] understands.
const UNET_KEYS: [&str; 28] = [
    "sample_size",
    "in_channels",
    "out_channels",
    "center_input_sample",
    "time_embedding_type",
    "time_embedding_dim",
    "freq_shift",
    "flip_sin_to_cos",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "mid_block_scale_factor",
    "downsample_padding",
    "downsample_type",
    "upsample_type",
    "dropout",
    "act_fn",
    "attention_head_dim",
    "norm_num_groups",
    "attn_norm_num_groups",
    "norm_eps",
    "resnet_time_scale_shift",
    "add_attention",
    "class_embed_type",
    "num_class_embeds",
    "num_train_timesteps",
];

/// ddpm's U-Net configuration for a diffusers `UNet2DModel` config (`config.json`'s value);
/// missing keys take `UNet2DModel`'s defaults, as diffusers does.
///
/// # Errors
/// [`Error::BadFile`] naming `path`, the key and the reason for any setting ddpm's U-Net cannot
/// reproduce (see the module docs).
pub fn unet_config_from_json(v: &Value, path: &Path) -> Result<UNetConfig> {
    let keys = Keys::new(v, path, "UNet2DModel config")?;
    keys.class_name("UNet2DModel")?;
    keys.refuse_unknown(&UNET_KEYS)?;
    keys.require("center_input_sample", json!(false), &[json!(false)], "ddpm feeds x unchanged")?;
    keys.require(
        "time_embedding_type",
        json!("positional"),
        &[json!("positional")],
        "ddpm has the sinusoidal (positional) timestep embedding only",
    )?;
    keys.require(
        "mid_block_type",
        json!("UNetMidBlock2D"),
        &[json!("UNetMidBlock2D")],
        "ddpm's U-Net always has the ResBlock-attention-ResBlock middle",
    )?;
    keys.require(
        "mid_block_scale_factor",
        json!(1),
        &[json!(1), json!(1.0)],
        "ddpm does not rescale the middle block",
    )?;
    keys.require(
        "downsample_type",
        json!("conv"),
        &[json!("conv")],
        "ddpm downsamples with a stride-2 conv",
    )?;
    keys.require("upsample_type", json!("conv"), &[json!("conv")], "ddpm upsamples with nearest x2 + conv")?;
    keys.require("act_fn", json!("silu"), &[json!("silu"), json!("swish")], "ddpm uses SiLU")?;
    keys.require(
        "resnet_time_scale_shift",
        json!("default"),
        &[json!("default")],
        "ddpm adds the timestep projection (\"scale_shift\" is FiLM-style scale and shift, not DDPM's block)",
    )?;
    keys.require("add_attention", json!(true), &[json!(true)], "ddpm's middle block always has attention")?;
    keys.require("class_embed_type", Value::Null, &[Value::Null], "ddpm is not class-conditional")?;
    keys.require("num_class_embeds", Value::Null, &[Value::Null], "ddpm is not class-conditional")?;

    let resolution = match keys.get("sample_size") {
        None => return Err(keys.bad("sample_size", "missing; ddpm needs the image size")),
        Some(Value::Array(a)) if a.len() == 2 && a[0] == a[1] && a[0].as_u64().is_some() => {
            a[0].as_u64().map(|x| x as usize).unwrap_or(0)
        }
        Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
            keys.bad("sample_size", &format!("{v}: ddpm needs square images, one integer size"))
        })?,
    };
    let in_channels = keys.usize_or("in_channels", 3)?;
    let out_channels = keys.usize_or("out_channels", 3)?;
    let boc = match keys.get("block_out_channels") {
        None => vec![224, 448, 672, 896],
        Some(_) => keys.usize_list("block_out_channels")?,
    };
    let ch = *boc.first().ok_or_else(|| keys.bad("block_out_channels", "empty"))?;
    if ch == 0 || boc.iter().any(|c| c % ch != 0) {
        return Err(keys.bad(
            "block_out_channels",
            &format!("{boc:?}: ddpm's widths are ch x ch_mult with integer multipliers of the first"),
        ));
    }
    let ch_mult: Vec<usize> = boc.iter().map(|c| c / ch).collect();
    let levels = boc.len();
    let down = match keys.get("down_block_types") {
        None => vec!["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
        Some(_) => keys.str_list("down_block_types")?,
    };
    let up = match keys.get("up_block_types") {
        None => vec!["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
        Some(_) => keys.str_list("up_block_types")?,
    };
    if down.len() != levels || up.len() != levels {
        return Err(keys.bad(
            "down_block_types",
            &format!("{} down and {} up blocks for {levels} block_out_channels", down.len(), up.len()),
        ));
    }
    let mut attn_resolutions = vec![];
    for (i, kind) in down.iter().enumerate() {
        let level_res = resolution >> i;
        let down_attn = match *kind {
            "DownBlock2D" => false,
            "AttnDownBlock2D" => true,
            other => {
                return Err(keys.bad(
                    "down_block_types",
                    &format!("{other} (level {i}) is not a DDPM block; DownBlock2D and AttnDownBlock2D map"),
                ))
            }
        };
        let up_attn = match up[levels - 1 - i] {
            "UpBlock2D" => false,
            "AttnUpBlock2D" => true,
            other => {
                return Err(keys.bad(
                    "up_block_types",
                    &format!(
                        "{other} (index {}) is not a DDPM block; UpBlock2D and AttnUpBlock2D map",
                        levels - 1 - i
                    ),
                ))
            }
        };
        if down_attn != up_attn {
            return Err(keys.bad(
                "up_block_types",
                &format!(
                    "level {i} ({level_res}x{level_res}) has attention on the way {} only; ddpm puts it on both ways",
                    if down_attn { "down" } else { "up" }
                ),
            ));
        }
        if down_attn {
            attn_resolutions.push(level_res);
        }
    }
    let gn_groups = keys.usize_or("norm_num_groups", 32)?;
    if let Some(g) = keys.get("attn_norm_num_groups") {
        if g.as_u64() != Some(gn_groups as u64) {
            return Err(
                keys.bad("attn_norm_num_groups", &format!("{g}: ddpm's attention norm uses norm_num_groups"))
            );
        }
    }
    // Every attention must be single-head: attention_head_dim null, or the width of each block.
    if let Some(h) = keys.get("attention_head_dim") {
        let mut widths: Vec<usize> =
            (0..levels).filter(|&i| attn_resolutions.contains(&(resolution >> i))).map(|i| boc[i]).collect();
        widths.push(boc[levels - 1]);
        if widths.iter().any(|&w| h.as_u64() != Some(w as u64)) {
            return Err(keys.bad(
                "attention_head_dim",
                &format!("{h} makes multi-head attention over widths {widths:?}; ddpm's attention has one head (null)"),
            ));
        }
    } else if !keys.map.contains_key("attention_head_dim") {
        return Err(keys.bad(
            "attention_head_dim",
            "missing, so UNet2DModel's default 8 (multi-head) applies; ddpm's attention has one head (null)",
        ));
    }
    if let Some(d) = keys.get("time_embedding_dim") {
        if d.as_u64() != Some(4 * ch as u64) {
            return Err(keys.bad(
                "time_embedding_dim",
                &format!("{d}: ddpm's timestep MLP is 4 x ch = {} wide", 4 * ch),
            ));
        }
    }
    let downsample_padding = match keys.usize_or("downsample_padding", 1)? {
        0 => DownsamplePadding::TfSame,
        1 => DownsamplePadding::Symmetric,
        p => return Err(keys.bad("downsample_padding", &format!("{p}: ddpm has 0 (TF-style) and 1"))),
    };
    let embedding_order =
        if keys.bool_or("flip_sin_to_cos", true)? { EmbeddingOrder::CosSin } else { EmbeddingOrder::SinCos };
    let config = UNetConfig {
        in_channels,
        out_channels,
        resolution,
        ch,
        ch_mult,
        num_res_blocks: keys.usize_or("layers_per_block", 2)?,
        attn_resolutions,
        dropout: keys.f64_or("dropout", 0.0)? as f32,
        gn_groups,
        gn_eps: keys.f64_or("norm_eps", 1e-5)? as f32,
        downsample_padding,
        embedding_order,
        embedding_freq_shift: keys.f64_or("freq_shift", 0.0)?,
        attn_heads: AttnHeads::Count(1),
        attn_heads_up: None,
        time_conditioning: TimeConditioning::Add,
        downsample: Resample::Conv,
        upsample: Resample::Conv,
        mid_attention: true,
        mid_attn_norm: AttnNorm::Inherit,
        num_classes: None,
    };
    config.validate().map_err(|e| {
        Error::bad_file(path, format!("the UNet2DModel config maps to an invalid U-Net: {e}"))
    })?;
    if let Some(w) = group_widths(&config).into_iter().find(|&w| w < gn_groups) {
        return Err(keys.bad(
            "norm_num_groups",
            &format!("{gn_groups} groups for a {w}-channel norm (diffusers itself cannot build this)"),
        ));
    }
    Ok(config)
}

/// The channel count of every group norm of the U-Net.
fn group_widths(c: &UNetConfig) -> Vec<usize> {
    UNet { config: c.clone() }
        .param_shapes()
        .into_iter()
        .filter(|(name, _)| {
            let layer = name.rsplit('.').nth(1).unwrap_or("");
            name.ends_with(".weight") && matches!(layer, "norm1" | "norm2" | "norm" | "norm_out")
        })
        .map(|(_, shape)| shape.iter().product())
        .collect()
}

/// The `config.json` value of a `UNet2DModel` computing the same function as `c`.
///
/// # Errors
/// [`Error::InvalidConfig`] if diffusers cannot express it: a group norm narrower than
/// `gn_groups` (ddpm then uses fewer groups, diffusers cannot), or attention at a resolution
/// that is not one of the levels'.
pub fn unet_config_to_json(c: &UNetConfig) -> Result<Value> {
    c.validate()?;
    if let Some(w) = group_widths(c).into_iter().find(|&w| w < c.gn_groups) {
        return Err(Error::config(
            "diffusers export",
            format!(
                "a {w}-channel group norm uses min({}, {w}) groups in ddpm; diffusers' norm_num_groups is one count for all",
                c.gn_groups
            ),
        ));
    }
    let levels = c.ch_mult.len();
    let level_res: Vec<usize> = (0..levels).map(|i| c.resolution >> i).collect();
    if let Some(r) = c.attn_resolutions.iter().find(|r| !level_res.contains(r)) {
        // ddpm ignores it too; refuse so the file states exactly what runs.
        return Err(Error::config(
            "diffusers export",
            format!("attention resolution {r} is none of the levels' {level_res:?}"),
        ));
    }
    let attn = |i: usize| c.attn_resolutions.contains(&level_res[i]);
    let down: Vec<&str> =
        (0..levels).map(|i| if attn(i) { "AttnDownBlock2D" } else { "DownBlock2D" }).collect();
    let up: Vec<&str> =
        (0..levels).rev().map(|i| if attn(i) { "AttnUpBlock2D" } else { "UpBlock2D" }).collect();
    let boc: Vec<usize> = c.ch_mult.iter().map(|m| m * c.ch).collect();
    Ok(json!({
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "add_attention": true,
        "attention_head_dim": null,
        "attn_norm_num_groups": null,
        "block_out_channels": boc,
        "center_input_sample": false,
        "class_embed_type": null,
        "down_block_types": down,
        "downsample_padding": match c.downsample_padding {
            DownsamplePadding::TfSame => 0,
            DownsamplePadding::Symmetric => 1,
        },
        "downsample_type": "conv",
        "dropout": short(c.dropout),
        "flip_sin_to_cos": c.embedding_order == EmbeddingOrder::CosSin,
        "freq_shift": c.embedding_freq_shift,
        "in_channels": c.in_channels,
        "layers_per_block": c.num_res_blocks,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2D",
        "norm_eps": short(c.gn_eps),
        "norm_num_groups": c.gn_groups,
        "num_class_embeds": null,
        "num_train_timesteps": null,
        "out_channels": c.out_channels,
        "resnet_time_scale_shift": "default",
        "sample_size": c.resolution,
        "time_embedding_dim": null,
        "time_embedding_type": "positional",
        "up_block_types": up,
        "upsample_type": "conv",
    }))
}

/// An f32 as the shortest decimal that reads back to it (0.1, not 0.10000000149011612).
fn short(x: f32) -> f64 {
    x.to_string().parse().expect("f32's Display output, inf and NaN included, parses as f64")
}

/// The diffusers name of ddpm parameter `name` in a U-Net with `levels` levels (module docs).
///
/// # Panics
/// If `name` is not a name [`UNet::init_params`] creates.
pub fn diffusers_name(name: &str, levels: usize) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    let resnet = |layer: &str| match layer {
        "temb_proj" => "time_emb_proj".to_string(),
        "nin_shortcut" => "conv_shortcut".to_string(),
        other => other.to_string(),
    };
    let attn = |layer: &str| match layer {
        "norm" => "group_norm",
        "q" => "to_q",
        "k" => "to_k",
        "v" => "to_v",
        "proj_out" => "to_out.0",
        other => panic!("diffusers_name: unknown attention layer {other} in {name}"),
    };
    // A documented precondition (# Panics): init_params names have a number in this place.
    let up_index = |i: &str| levels - 1 - i.parse::<usize>().expect("level index");
    match parts.as_slice() {
        ["temb", "dense", "0", p] => format!("time_embedding.linear_1.{p}"),
        ["temb", "dense", "1", p] => format!("time_embedding.linear_2.{p}"),
        ["norm_out", p] => format!("conv_norm_out.{p}"),
        ["conv_in" | "conv_out", _] => name.to_string(),
        ["down", i, "block", j, layer, p] => format!("down_blocks.{i}.resnets.{j}.{}.{p}", resnet(layer)),
        ["down", i, "attn", j, layer, p] => format!("down_blocks.{i}.attentions.{j}.{}.{p}", attn(layer)),
        ["down", i, "downsample", "conv", p] => format!("down_blocks.{i}.downsamplers.0.conv.{p}"),
        ["mid", "block_1", layer, p] => format!("mid_block.resnets.0.{}.{p}", resnet(layer)),
        ["mid", "block_2", layer, p] => format!("mid_block.resnets.1.{}.{p}", resnet(layer)),
        ["mid", "attn_1", layer, p] => format!("mid_block.attentions.0.{}.{p}", attn(layer)),
        ["up", i, "block", j, layer, p] => {
            format!("up_blocks.{}.resnets.{j}.{}.{p}", up_index(i), resnet(layer))
        }
        ["up", i, "attn", j, layer, p] => {
            format!("up_blocks.{}.attentions.{j}.{}.{p}", up_index(i), attn(layer))
        }
        ["up", i, "upsample", "conv", p] => format!("up_blocks.{}.upsamplers.0.conv.{p}", up_index(i)),
        _ => panic!("diffusers_name: {name} is not a U-Net parameter"),
    }
}

/// The name older diffusers files (before the `Attention` rewrite, e.g. google/ddpm-cifar10-32)
/// use for an attention tensor, if it differs.
fn deprecated_name(name: &str) -> Option<String> {
    [(".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")]
        .iter()
        .find(|(new, _)| name.contains(new))
        .map(|(new, old)| name.replace(new, old))
}

/// Whether a diffusers tensor is an attention projection, stored `[C, C]` (ddpm: `[C, C, 1, 1]`).
fn is_attention_linear(diffusers: &str) -> bool {
    diffusers.contains("attentions.") && !diffusers.contains(".group_norm.")
}

/// The diffusers tensor `name` → ddpm parameter, for every parameter of `net` (in its order),
/// taken from `tensors`; `path` names the file in errors.
///
/// # Errors
/// [`Error::BadFile`] naming the tensor if one is missing, has the wrong shape, or is left over
/// (a tensor ddpm's U-Net has no place for).
pub fn params_from_tensors(
    net: &UNet,
    mut tensors: BTreeMap<String, Tensor>,
    path: &Path,
) -> Result<ParamStore> {
    let levels = net.config.ch_mult.len();
    let mut store = ParamStore::new();
    for (name, want) in &net.param_shapes() {
        let want_len: usize = want.iter().product();
        let key = diffusers_name(name, levels);
        let t = match tensors.remove(&key) {
            Some(t) => t,
            None => deprecated_name(&key).and_then(|old| tensors.remove(&old)).ok_or_else(|| {
                Error::bad_file(
                    path,
                    format!("tensor `{key}` (ddpm `{name}`) is missing; is config.json the one saved with these weights?"),
                )
            })?,
        };
        let t = if t.shape() != want.as_slice() && is_attention_linear(&key) && t.len() == want_len {
            // Row-major first: into_shape_with_order reshapes only a C-contiguous array.
            let t = if t.is_standard_layout() { t } else { t.as_standard_layout().into_owned() };
            t.into_shape_with_order(want.as_slice())
                .expect("row-major, and t.len() == want_len checked above")
        } else {
            t
        };
        if t.shape() != want.as_slice() {
            return Err(Error::bad_file(
                path,
                format!(
                    "tensor `{key}` has shape {:?}; config.json needs {want:?} for ddpm `{name}`",
                    t.shape()
                ),
            ));
        }
        store.insert(name.as_str(), t.as_standard_layout().into_owned());
    }
    if !tensors.is_empty() {
        let extra: Vec<&str> = tensors.keys().take(5).map(String::as_str).collect();
        return Err(Error::bad_file(
            path,
            format!(
                "{} tensor(s) have no place in the U-Net config.json describes, e.g. `{}`; a block or option ddpm does not map?",
                tensors.len(),
                extra.join("`, `")
            ),
        ));
    }
    Ok(store)
}

/// ddpm's parameters under diffusers' names and shapes, sorted by name.
///
/// # Panics
/// If `params` is not a parameter set of `net` (a name [`diffusers_name`] does not know).
pub fn params_to_tensors(net: &UNet, params: &ParamStore) -> Vec<(String, Tensor)> {
    let levels = net.config.ch_mult.len();
    let mut out: Vec<(String, Tensor)> = params
        .iter()
        .map(|(name, t)| {
            let key = diffusers_name(name, levels);
            let t = if is_attention_linear(&key) && t.ndim() == 4 {
                let s = t.shape();
                // A documented precondition (# Panics): params has net's shapes, [C, C, 1, 1] here.
                t.to_shape((s[0], s[1])).expect("[C, C, 1, 1] holds C x C").into_dyn().into_owned()
            } else {
                t.clone()
            };
            (key, t)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

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

/// The variance choices of [`ddpm_scheduler_step_f32`], under diffusers' names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepVariance {
    /// `fixed_small`: σ = √max(β̃_t, 1e-20).
    FixedSmall,
    /// `fixed_small_log`: σ = exp(½ log max(β̃_t, 1e-20)).
    FixedSmallLog,
    /// `fixed_large`: σ = √β_t, β_t = 1 − ᾱ_t/ᾱ_{t−1}.
    FixedLarge,
}

/// What `DDPMScheduler.step` returns, `[N, C, H, W]` each.
#[derive(Clone, Debug, PartialEq)]
pub struct SchedulerStep {
    /// x_{t−1}.
    pub prev_sample: Tensor,
    /// x̂_0, clipped when asked.
    pub pred_original_sample: Tensor,
}

/// diffusers' `DDPMScheduler.step` (all T steps, so the previous timestep is t − 1) computed the
/// way it computes it: in f32, operation by operation, from its f32 `alphas_cumprod`, with the
/// noise `noise` (what its generator would draw). Ho et al.'s Eqs. (7), (11) and (15) in
/// diffusers' arithmetic; the `diffusers` [`Convention`] computes the same step in f64 from the
/// same tables, within a few f32 roundings of this. `mean_type` is what `model_output` predicts
/// (`epsilon`, `sample` or `v_prediction`).
///
/// # Panics
/// If the shapes differ, `t` is out of range, or `mean_type` is [`MeanType::PrevX`] (no
/// `prediction_type` for it).
#[allow(clippy::too_many_arguments)]
pub fn ddpm_scheduler_step_f32(
    alphas_cumprod: &[f32],
    mean_type: MeanType,
    variance: StepVariance,
    clip_sample: bool,
    t: usize,
    model_output: &Tensor,
    sample: &Tensor,
    noise: &Tensor,
) -> SchedulerStep {
    assert_eq!(model_output.shape(), sample.shape(), "ddpm_scheduler_step_f32: model_output vs sample");
    assert_eq!(noise.shape(), sample.shape(), "ddpm_scheduler_step_f32: noise vs sample");
    let ab_t = alphas_cumprod[t];
    let ab_prev = if t > 0 { alphas_cumprod[t - 1] } else { 1.0 };
    let beta_prod_t = 1.0 - ab_t;
    let beta_prod_t_prev = 1.0 - ab_prev;
    let current_alpha_t = ab_t / ab_prev;
    let current_beta_t = 1.0 - current_alpha_t;
    let mut pred = match mean_type {
        MeanType::Eps => {
            let (a, b) = (beta_prod_t.sqrt(), ab_t.sqrt());
            ndarray::Zip::from(sample).and(model_output).map_collect(|&x, &e| (x - a * e) / b)
        }
        MeanType::X0 => model_output.clone(),
        MeanType::V => {
            let (a, b) = (ab_t.sqrt(), beta_prod_t.sqrt());
            ndarray::Zip::from(sample).and(model_output).map_collect(|&x, &v| a * x - b * v)
        }
        MeanType::PrevX => panic!("ddpm_scheduler_step_f32: DDPMScheduler has no x_(t-1) prediction"),
    };
    if clip_sample {
        pred.mapv_inplace(|v| v.clamp(-1.0, 1.0));
    }
    let c1 = (ab_prev.sqrt() * current_beta_t) / beta_prod_t;
    let c2 = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
    let mut prev = ndarray::Zip::from(&pred).and(sample).map_collect(|&p, &x| c1 * p + c2 * x);
    if t > 0 {
        let var = ((1.0 - ab_prev) / (1.0 - ab_t) * current_beta_t).max(1e-20);
        let std = match variance {
            StepVariance::FixedSmall => var.sqrt(),
            StepVariance::FixedSmallLog => (0.5 * var.ln()).exp(),
            StepVariance::FixedLarge => current_beta_t.sqrt(),
        };
        ndarray::Zip::from(&mut prev).and(noise).for_each(|p, &z| *p += std * z);
    }
    SchedulerStep { prev_sample: prev, pred_original_sample: pred }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Preset;

    #[test]
    fn every_parameter_gets_a_distinct_diffusers_name_and_back() {
        let net = UNet::new(Preset::Cifar10.config(3, 32)).unwrap();
        let params = net.init_params(&mut crate::rng_from_seed(0));
        let tensors = params_to_tensors(&net, &params);
        let names: std::collections::BTreeSet<&String> = tensors.iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), params.len());
        assert!(names.contains(&"up_blocks.2.attentions.1.to_out.0.weight".to_string()));
        assert!(names.contains(&"down_blocks.1.resnets.0.conv_shortcut.weight".to_string()));
        let back = params_from_tensors(&net, tensors.into_iter().collect(), Path::new("x")).unwrap();
        for (name, t) in params.iter() {
            assert_eq!(back.get(name).unwrap(), t, "{name}");
        }
    }

    #[test]
    fn deprecated_attention_names_are_read() {
        let net = UNet::new(Preset::Tiny.config(1, 8)).unwrap();
        let params = net.init_params(&mut crate::rng_from_seed(0));
        let old: BTreeMap<String, Tensor> = params_to_tensors(&net, &params)
            .into_iter()
            .map(|(n, t)| (deprecated_name(&n).unwrap_or(n), t))
            .collect();
        assert!(old.contains_key("mid_block.attentions.0.proj_attn.weight"));
        let back = params_from_tensors(&net, old, Path::new("x")).unwrap();
        assert_eq!(back.get("mid.attn_1.proj_out.weight"), params.get("mid.attn_1.proj_out.weight"));
    }

    #[test]
    fn missing_and_extra_tensors_are_named() {
        let net = UNet::new(Preset::Tiny.config(1, 8)).unwrap();
        let params = net.init_params(&mut crate::rng_from_seed(0));
        let mut tensors: BTreeMap<String, Tensor> = params_to_tensors(&net, &params).into_iter().collect();
        let t = tensors.remove("conv_in.bias").unwrap();
        let err = params_from_tensors(&net, tensors.clone(), Path::new("w")).unwrap_err().to_string();
        assert!(err.contains("`conv_in.bias`") && err.contains("missing"), "{err}");
        tensors.insert("conv_in.bias".into(), t);
        tensors.insert("class_embedding.weight".into(), Tensor::zeros(vec![2]));
        let err = params_from_tensors(&net, tensors, Path::new("w")).unwrap_err().to_string();
        assert!(err.contains("class_embedding.weight"), "{err}");
    }

    #[test]
    fn configs_round_trip_and_unmappable_keys_are_refused_by_name() {
        let c = Preset::Cifar10.config(3, 32);
        let v = unet_config_to_json(&c).unwrap();
        assert_eq!(unet_config_from_json(&v, Path::new("c")).unwrap(), c);
        for (key, value, needle) in [
            ("resnet_time_scale_shift", json!("scale_shift"), "scale_shift"),
            ("attention_head_dim", json!(8), "one head"),
            (
                "down_block_types",
                json!(["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]),
                "CrossAttnDownBlock2D",
            ),
            ("num_class_embeds", json!(10), "class"),
            ("some_new_option", json!(1), "unknown"),
        ] {
            let mut bad = v.clone();
            bad[key] = value;
            let err = unet_config_from_json(&bad, Path::new("c")).unwrap_err().to_string();
            assert!(err.contains(&format!("`{key}`")) && err.contains(needle), "{key}: {err}");
        }
        // ddpm's `small` preset narrows its 16 groups nowhere; `tiny` at ch 32 with 64 groups would.
        let narrow = UNetConfig { gn_groups: 64, ..Preset::Tiny.config(1, 8) };
        assert!(unet_config_to_json(&narrow).unwrap_err().to_string().contains("groups"));
    }

    #[test]
    fn scheduler_settings_round_trip_and_refuse_what_ddpm_lacks() {
        let s = SchedulerSettings {
            variance_type: VarianceType::FixedSmall,
            clip_sample: false,
            ..Default::default()
        };
        assert_eq!(SchedulerSettings::from_json(&s.to_json(), Path::new("s")).unwrap(), s);
        for (key, value) in [
            ("thresholding", json!(true)),
            ("beta_end", json!(0.012)),
            ("steps_offset", json!(1)),
            ("beta_schedule", json!("scaled_linear")),
            ("variance_type", json!("learned")),
        ] {
            let mut bad = s.to_json();
            bad[key] = value;
            let err = SchedulerSettings::from_json(&bad, Path::new("s")).unwrap_err().to_string();
            let named = if key == "beta_end" { "beta_start" } else { key };
            assert!(err.contains(&format!("`{named}`")), "{key}: {err}");
        }
    }
}
