//! Training checkpoints: one safetensors file holding the model, the EMA weights, Adam's
//! moments, and (in the metadata) the step, the RNG and data-stream positions and the full
//! [`TrainConfig`]. Written atomically (temp file + rename): a run killed at any moment leaves
//! either the previous checkpoint or the new one, never a truncated file.
//!
//! | tensor name        | content                         |
//! |--------------------|---------------------------------|
//! | `model.{param}`    | the trained weights             |
//! | `ema.{param}`      | their exponential moving average |
//! | `adam.m.{param}`   | Adam's first moment             |
//! | `adam.v.{param}`   | Adam's second moment            |
//!
//! Metadata keys: `format` (`ddpm-checkpoint-v1`), `config` (JSON), `step`, `adam_step`,
//! `ema_updates`, `rng` (JSON: seed, stream, word position), `batch_position` (JSON), `data`
//! (the training set's source and shape, informational), and `importance` (JSON: the loss
//! history of importance-sampled timesteps, when used). Checkpoints written by [`save_weights`]
//! (`ddpm import`) may also hold `clip_x0` (`true`/`false`): whether sampling clips x̂_0 unless
//! told otherwise.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::safetensors::{load, save_atomic};
use crate::data::{BatchPosition, Dataset};
use crate::nn::{Adam, Ema, ParamStore, UNet};
use crate::train::{TrainConfig, Trainer};
use crate::{Error, Result, Rng, Tensor};

/// The value of the `format` metadata key.
pub const FORMAT: &str = "ddpm-checkpoint-v1";

#[derive(Serialize, Deserialize)]
struct RngState {
    seed: [u8; 32],
    stream: u64,
    word_pos: String,
}

fn rng_state(rng: &Rng) -> RngState {
    RngState { seed: rng.get_seed(), stream: rng.get_stream(), word_pos: rng.get_word_pos().to_string() }
}

fn rng_restore(s: &RngState) -> Option<Rng> {
    let mut rng = Rng::from_seed(s.seed);
    rng.set_stream(s.stream);
    rng.set_word_pos(s.word_pos.parse().ok()?);
    Some(rng)
}

/// Writes the whole training state to `path` atomically.
///
/// # Errors
/// [`Error::Io`] if the file cannot be written.
pub fn save(path: &Path, t: &Trainer) -> Result<()> {
    let names = t.params.names();
    let mut tensors: Vec<(String, &Tensor)> = Vec::with_capacity(4 * names.len());
    for (name, value) in t.params.iter() {
        tensors.push((format!("model.{name}"), value));
    }
    for (name, value) in names.iter().zip(&t.ema.shadow) {
        tensors.push((format!("ema.{name}"), value));
    }
    for (name, value) in names.iter().zip(&t.adam.m) {
        tensors.push((format!("adam.m.{name}"), value));
    }
    for (name, value) in names.iter().zip(&t.adam.v) {
        tensors.push((format!("adam.v.{name}"), value));
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("config".into(), json(&t.config));
    meta.insert("step".into(), t.step.to_string());
    meta.insert("adam_step".into(), t.adam.step.to_string());
    meta.insert("ema_updates".into(), t.ema.updates.to_string());
    meta.insert("rng".into(), json(&rng_state(&t.rng)));
    meta.insert("batch_position".into(), json(&t.batches.position()));
    if let Some(imp) = &t.importance {
        meta.insert("importance".into(), json(imp));
    }
    let d = t.batches.dataset();
    meta.insert("data".into(), format!("{} {:?}", d.source().display(), d.shape()));
    save_atomic(path, &tensors, &meta)
}

/// Writes a checkpoint holding `params` as both the trained and the EMA weights, with a fresh
/// optimiser (zero moments, step 0), the RNG of `config.seed` and the data stream at its start:
/// weights from elsewhere (`ddpm import`) that `ddpm sample` reads and `ddpm train --resume`
/// continues from. `source` is recorded under `data`; `clip_x0`, when given, under `clip_x0`.
///
/// # Errors
/// [`Error::InvalidConfig`] if `config` is invalid or `params` does not match its U-Net (a
/// missing or extra name, another shape); [`Error::Io`] if the file cannot be written.
pub fn save_weights(
    path: &Path,
    config: &TrainConfig,
    params: &ParamStore,
    source: &str,
    clip_x0: Option<bool>,
) -> Result<()> {
    config.validate()?;
    let template = UNet::new(config.unet.clone())?.init_params(&mut crate::rng_from_seed(0));
    let same = template.len() == params.len()
        && template.iter().all(|(n, t)| params.get(n).is_some_and(|p| p.shape() == t.shape()));
    if !same {
        return Err(Error::config("checkpoint", "the weights do not match the U-Net of the configuration"));
    }
    let zeros: Vec<Tensor> = params.iter().map(|(_, t)| Tensor::zeros(t.raw_dim())).collect();
    let mut tensors: Vec<(String, &Tensor)> = Vec::with_capacity(4 * params.len());
    for (prefix, values) in
        [("model", None), ("ema", None), ("adam.m", Some(&zeros)), ("adam.v", Some(&zeros))]
    {
        for (i, (name, value)) in params.iter().enumerate() {
            tensors.push((format!("{prefix}.{name}"), values.map_or(value, |z| &z[i])));
        }
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("config".into(), json(config));
    for key in ["step", "adam_step", "ema_updates"] {
        meta.insert(key.into(), "0".into());
    }
    meta.insert("rng".into(), json(&rng_state(&crate::rng_from_seed(config.seed))));
    meta.insert("batch_position".into(), json(&BatchPosition::default()));
    meta.insert("data".into(), source.into());
    if let Some(clip) = clip_x0 {
        meta.insert("clip_x0".into(), clip.to_string());
    }
    save_atomic(path, &tensors, &meta)
}

/// A config struct as JSON (cannot fail: plain data with string keys).
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serialises")
}

/// A checkpoint's content, read and checked against itself.
pub struct Checkpoint {
    /// The run's configuration.
    pub config: TrainConfig,
    /// Steps taken.
    pub step: u64,
    /// The trained weights.
    pub params: ParamStore,
    /// The EMA weights.
    pub ema_params: ParamStore,
    tensors: BTreeMap<String, Tensor>,
    meta: BTreeMap<String, String>,
}

fn meta_get<'a>(path: &Path, meta: &'a BTreeMap<String, String>, key: &str) -> Result<&'a str> {
    meta.get(key).map(String::as_str).ok_or_else(|| {
        Error::bad_file(path, format!("checkpoint metadata lacks `{key}`; is this a ddpm checkpoint?"))
    })
}

fn parse<T: std::str::FromStr>(path: &Path, meta: &BTreeMap<String, String>, key: &str) -> Result<T> {
    meta_get(path, meta, key)?
        .parse()
        .map_err(|_| Error::bad_file(path, format!("checkpoint metadata `{key}` is not a valid number")))
}

fn parse_json<T: for<'de> Deserialize<'de>>(
    path: &Path,
    meta: &BTreeMap<String, String>,
    key: &str,
) -> Result<T> {
    serde_json::from_str(meta_get(path, meta, key)?)
        .map_err(|e| Error::bad_file(path, format!("checkpoint metadata `{key}` is malformed: {e}")))
}

impl Checkpoint {
    /// Reads `path`, refusing anything that is not a complete ddpm checkpoint whose tensors
    /// match its own configuration.
    ///
    /// # Errors
    /// [`Error::Io`] if unreadable; [`Error::BadFile`] naming the file and the problem if it is
    /// truncated, corrupt, not a ddpm checkpoint, or inconsistent.
    pub fn load(path: &Path) -> Result<Self> {
        let loaded = load(path)?;
        let meta = loaded.metadata;
        let format = meta_get(path, &meta, "format")?;
        if format != FORMAT {
            return Err(Error::bad_file(path, format!("checkpoint format {format:?}, expected {FORMAT:?}")));
        }
        let config: TrainConfig = parse_json(path, &meta, "config")?;
        config.validate().map_err(|e| Error::bad_file(path, format!("stored config is invalid: {e}")))?;
        let step: u64 = parse(path, &meta, "step")?;
        let net = UNet::new(config.unet.clone())?;
        // The expected names and shapes come from the configuration.
        let template = net.init_params(&mut crate::rng_from_seed(0));
        let mut tensors = loaded.tensors;
        let mut take = |prefix: &str| -> Result<ParamStore> {
            let mut store = ParamStore::new();
            for (name, want) in template.iter() {
                let key = format!("{prefix}.{name}");
                let t = tensors
                    .remove(&key)
                    .ok_or_else(|| Error::bad_file(path, format!("tensor `{key}` is missing")))?;
                if t.shape() != want.shape() {
                    return Err(Error::bad_file(
                        path,
                        format!(
                            "tensor `{key}` has shape {:?}, the config needs {:?}",
                            t.shape(),
                            want.shape()
                        ),
                    ));
                }
                store.insert(name, t);
            }
            Ok(store)
        };
        let params = take("model")?;
        let ema_params = take("ema")?;
        Ok(Self { config, step, params, ema_params, tensors, meta })
    }

    /// Whether sampling should clip x̂_0 by default, if the checkpoint says (`clip_x0`, written
    /// by `ddpm import` from the scheduler's `clip_sample`); `None` for trained checkpoints.
    pub fn clip_x0(&self) -> Option<bool> {
        self.meta.get("clip_x0").and_then(|v| v.parse().ok())
    }

    /// Rebuilds the full training state on `data` to continue the run.
    ///
    /// # Errors
    /// [`Error::BadFile`] if the optimiser or RNG state is missing or malformed, or the data
    /// does not fit the stored position or network.
    pub fn into_trainer(mut self, path: &Path, data: Arc<Dataset>) -> Result<Trainer> {
        let names: Vec<String> = self.params.names().to_vec();
        let mut moments = |prefix: &str| -> Result<Vec<Tensor>> {
            names
                .iter()
                .map(|n| {
                    let key = format!("{prefix}.{n}");
                    self.tensors
                        .remove(&key)
                        .ok_or_else(|| Error::bad_file(path, format!("tensor `{key}` is missing")))
                })
                .collect()
        };
        let m = moments("adam.m")?;
        let v = moments("adam.v")?;
        let o = &self.config.optim;
        let mut adam = Adam::new(&self.params, o.adam_config());
        adam.step = parse(path, &self.meta, "adam_step")?;
        adam.m = m;
        adam.v = v;
        let mut ema = Ema::new(&self.ema_params, o.ema_decay, o.ema_warmup);
        ema.updates = parse(path, &self.meta, "ema_updates")?;
        let rng_s: RngState = parse_json(path, &self.meta, "rng")?;
        let rng =
            rng_restore(&rng_s).ok_or_else(|| Error::bad_file(path, "checkpoint RNG state is malformed"))?;
        let position: BatchPosition = parse_json(path, &self.meta, "batch_position")?;
        let importance = if self.meta.contains_key("importance") {
            Some(parse_json(path, &self.meta, "importance")?)
        } else {
            None
        };
        let mut trainer =
            Trainer::from_parts(self.config, data, self.params, adam, ema, self.step, rng, position)?;
        if importance.is_some() {
            trainer.importance = importance;
        }
        Ok(trainer)
    }
}
