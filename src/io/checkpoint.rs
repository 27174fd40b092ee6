//! Training checkpoints: the whole state of a run as a plain record, [`TrainState`], and its
//! file, one safetensors file holding the model, the EMA weights, Adam's moments and (in the
//! metadata) everything else. [`save`] writes it atomically; [`load`] refuses anything that is
//! not a complete, self-consistent record, checking every field against the stored
//! configuration, so a run never starts from a state it would later panic on.
//!
//! This module knows nothing of training: [`crate::train`] turns a [`TrainState`] into a running
//! trainer and back.
//!
//! | tensor name        | content                          |
//! |--------------------|----------------------------------|
//! | `model.{param}`    | the trained weights              |
//! | `ema.{param}`      | their exponential moving average |
//! | `adam.m.{param}`   | Adam's first moment              |
//! | `adam.v.{param}`   | Adam's second moment             |
//!
//! | metadata key      | content                                                             |
//! |-------------------|---------------------------------------------------------------------|
//! | `format`          | `ddpm-checkpoint-v2` (`-v1`, without the keys marked v2, is still read) |
//! | `config`          | the [`TrainConfig`] as JSON; a `file:` schedule is stored as its β    |
//! | `step`            | optimiser steps taken                                                |
//! | `skipped_steps`   | (v2) steps skipped for a non-finite loss or gradient                 |
//! | `adam_step`, `ema_updates` | Adam's step count, EMA updates                              |
//! | `rng`             | JSON: the ChaCha seed, stream and word position                      |
//! | `batch_position`  | JSON: epoch and index of the batch stream                            |
//! | `importance`      | JSON: the loss history of importance-sampled timesteps (when used)   |
//! | `data`            | (v2) JSON [`DataRecord`]: where the training set came from and its fingerprint; v1 held a description |
//! | `source`          | (v2) free text: what made the weights (`ddpm import` names the folder) |
//! | `schedule_source` | (v2) the file a `file:` schedule was read from, and its xxh3-128     |
//! | `clip_x0`         | `true`/`false`: whether sampling clips x̂_0 unless told otherwise (`ddpm import`) |

use std::collections::BTreeMap;
use std::path::Path;

use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::safetensors::{from_bytes, to_bytes};
use crate::config::TrainConfig;
use crate::data::{BatchPosition, DataRecord};
use crate::diffusion::ImportanceSampler;
use crate::nn::{all_finite, Adam, Ema, ParamStore, UNet};
use crate::{Error, Result, Rng, Tensor};

/// The value of the `format` metadata key written now.
pub const FORMAT: &str = "ddpm-checkpoint-v2";
/// The previous format, still read (sampling, and resuming with `--data` given).
pub const FORMAT_V1: &str = "ddpm-checkpoint-v1";

/// The complete state of a training run: exactly what a checkpoint holds.
#[derive(Clone, Debug)]
pub struct TrainState {
    /// The run's configuration.
    pub config: TrainConfig,
    /// Optimiser steps taken.
    pub step: u64,
    /// Steps skipped because their loss or gradient norm was not finite.
    pub skipped_steps: u64,
    /// The weights being trained.
    pub params: ParamStore,
    /// Adam's moments and step count.
    pub adam: Adam,
    /// The averaged weights.
    pub ema: Ema,
    /// Timesteps, noise and dropout.
    pub rng: Rng,
    /// Where the batch stream stands.
    pub batch_position: BatchPosition,
    /// Per-timestep loss history (importance sampling only).
    pub importance: Option<ImportanceSampler>,
    /// The training set: where it came from and its fingerprint (`None` for imported weights and
    /// v1 checkpoints).
    pub data: Option<DataRecord>,
    /// Free text saying what made the weights (e.g. the folder `ddpm import` read).
    pub source: String,
    /// For a schedule read from a file: the file and its hash.
    pub schedule_source: Option<String>,
    /// Whether sampling clips x̂_0 unless told otherwise, when the checkpoint says.
    pub clip_x0: Option<bool>,
}

impl TrainState {
    /// A state holding `params` as both the trained and the EMA weights, with a fresh optimiser
    /// (zero moments, step 0), the RNG of `config.seed` and the batch stream at its start:
    /// weights from elsewhere (`ddpm import`) that `ddpm sample` reads and `ddpm train --resume`
    /// continues from.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if `config` is invalid or `params` does not match its U-Net (a
    /// missing or extra name, another shape).
    pub fn from_weights(
        config: TrainConfig,
        params: ParamStore,
        source: &str,
        clip_x0: Option<bool>,
    ) -> Result<Self> {
        config.validate()?;
        let shapes = shapes(&config)?;
        let same = shapes.len() == params.len()
            && shapes.iter().all(|(n, shape)| params.get(n).is_some_and(|p| p.shape() == shape.as_slice()));
        if !same {
            return Err(Error::config(
                "checkpoint",
                "the weights do not match the U-Net of the configuration",
            ));
        }
        let o = &config.optim;
        let adam = Adam::new(&params, o.adam_config());
        let ema = o.new_ema(&params);
        let mut rng = crate::rng_from_seed(config.seed);
        rng.set_stream(1);
        Ok(TrainState {
            importance: None,
            step: 0,
            skipped_steps: 0,
            adam,
            ema,
            rng,
            batch_position: BatchPosition::default(),
            params,
            config,
            data: None,
            source: source.to_string(),
            schedule_source: None,
            clip_x0,
        })
    }

    /// The EMA weights as a store (what sampling uses by default).
    pub fn ema_params(&self) -> ParamStore {
        self.ema.to_store(&self.params)
    }

    /// A 64-bit hash (xxh3) of the step and every weight, Adam moment and EMA value: the ranks
    /// of a data-parallel run compare it to check that they hold the same state.
    pub fn weights_hash(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&self.step.to_le_bytes());
        let groups = [
            self.params.iter().map(|(_, v)| v).collect::<Vec<_>>(),
            self.adam.m.iter().collect(),
            self.adam.v.iter().collect(),
            self.ema.shadow.iter().collect(),
        ];
        for t in groups.iter().flatten() {
            let bytes: Vec<u8> = t.iter().flat_map(|x| x.to_le_bytes()).collect();
            h.update(&bytes);
        }
        h.digest()
    }

    /// The first tensor (weights, EMA or Adam moment) holding a NaN or an infinity, named as
    /// in the file, or `None` if every value is finite. [`save`] refuses a state for which
    /// this is `Some`.
    pub fn first_non_finite(&self) -> Option<String> {
        let names = self.params.names();
        let groups: [(&str, Vec<&Tensor>); 4] = [
            ("model", self.params.iter().map(|(_, t)| t).collect()),
            ("ema", self.ema.shadow.iter().collect()),
            ("adam.m", self.adam.m.iter().collect()),
            ("adam.v", self.adam.v.iter().collect()),
        ];
        for (prefix, tensors) in groups {
            for (name, t) in names.iter().zip(tensors) {
                if !all_finite(t) {
                    return Some(format!("{prefix}.{name}"));
                }
            }
        }
        None
    }
}

#[derive(Serialize, Deserialize)]
struct RngState {
    seed: [u8; 32],
    stream: u64,
    word_pos: String,
}

fn rng_state(rng: &Rng) -> RngState {
    RngState { seed: rng.get_seed(), stream: rng.get_stream(), word_pos: rng.get_word_pos().to_string() }
}

/// The RNG of a saved state; `None` if the word position is not a number below 2^68, the
/// length of a ChaCha stream (beyond it, the position would wrap).
fn rng_restore(s: &RngState) -> Option<Rng> {
    let word_pos: u128 = s.word_pos.parse().ok().filter(|&w: &u128| w < 1 << 68)?;
    let mut rng = Rng::from_seed(s.seed);
    rng.set_stream(s.stream);
    rng.set_word_pos(word_pos);
    Some(rng)
}

/// The bytes of the checkpoint file for `state` (deterministic: the same state gives the same
/// bytes).
///
/// # Errors
/// [`Error::InvalidConfig`] if a weight, EMA value or moment is not finite (naming it): a
/// checkpoint never holds a state that cannot be trained on.
pub fn to_file_bytes(state: &TrainState) -> Result<Vec<u8>> {
    if let Some(name) = state.first_non_finite() {
        return Err(Error::config(
            "checkpoint",
            format!(
                "`{name}` holds a NaN or an infinity; a checkpoint is never written with non-finite values"
            ),
        ));
    }
    let names = state.params.names();
    let mut tensors: Vec<(String, &Tensor)> = Vec::with_capacity(4 * names.len());
    for (name, value) in state.params.iter() {
        tensors.push((format!("model.{name}"), value));
    }
    for (prefix, values) in [("ema", &state.ema.shadow), ("adam.m", &state.adam.m), ("adam.v", &state.adam.v)]
    {
        for (name, value) in names.iter().zip(values) {
            tensors.push((format!("{prefix}.{name}"), value));
        }
    }
    let mut meta = BTreeMap::new();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("config".into(), json(&state.config));
    meta.insert("step".into(), state.step.to_string());
    meta.insert("skipped_steps".into(), state.skipped_steps.to_string());
    meta.insert("adam_step".into(), state.adam.step.to_string());
    meta.insert("ema_updates".into(), state.ema.updates.to_string());
    meta.insert("rng".into(), json(&rng_state(&state.rng)));
    meta.insert("batch_position".into(), json(&state.batch_position));
    if let Some(imp) = &state.importance {
        meta.insert("importance".into(), json(imp));
    }
    if let Some(data) = &state.data {
        meta.insert("data".into(), json(data));
    }
    meta.insert("source".into(), state.source.clone());
    if let Some(s) = &state.schedule_source {
        meta.insert("schedule_source".into(), s.clone());
    }
    if let Some(clip) = state.clip_x0 {
        meta.insert("clip_x0".into(), clip.to_string());
    }
    to_bytes(&tensors, &meta)
}

/// Writes `state` to `path` atomically ([`crate::files::write_atomic`]).
///
/// # Errors
/// As [`to_file_bytes`]; [`Error::Io`] if the file cannot be written.
pub fn save(path: &Path, state: &TrainState) -> Result<()> {
    crate::files::write_atomic(path, &to_file_bytes(state)?)
}

/// Writes `state` to `path` atomically, keeping the file it replaces as `previous`
/// ([`crate::files::write_atomic_keeping_previous`]).
///
/// # Errors
/// As [`save`].
pub fn save_keeping_previous(path: &Path, previous: &Path, state: &TrainState) -> Result<()> {
    crate::files::write_atomic_keeping_previous(path, previous, &to_file_bytes(state)?)
}

/// Writes a checkpoint of weights from elsewhere ([`TrainState::from_weights`]).
///
/// # Errors
/// As [`TrainState::from_weights`] and [`save`].
pub fn save_weights(
    path: &Path,
    config: &TrainConfig,
    params: &ParamStore,
    source: &str,
    clip_x0: Option<bool>,
) -> Result<()> {
    save(path, &TrainState::from_weights(config.clone(), params.clone(), source, clip_x0)?)
}

/// A config struct as JSON (cannot fail: plain data with string keys and finite numbers, or
/// `null` for a non-finite one).
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data with string keys serialises")
}

/// Reads the checkpoint at `path` ([`from_file_bytes`]).
///
/// # Errors
/// [`Error::Io`] if unreadable; otherwise as [`from_file_bytes`].
pub fn load(path: &Path) -> Result<TrainState> {
    let bytes = crate::files::read_capped(path, crate::files::memory_cap())?;
    from_file_bytes(&bytes, path)
}

/// Parses a checkpoint, refusing anything that is not a complete ddpm checkpoint whose every
/// part matches its own configuration: the weights, EMA and both Adam moments (names and
/// shapes), finite weights, the counters, the RNG, the batch position and the importance
/// sampler's history (one per timestep). `source` names the file in errors.
///
/// # Errors
/// [`Error::BadFile`] naming `source` and the part that is wrong.
pub fn from_file_bytes(bytes: &[u8], source: &Path) -> Result<TrainState> {
    let loaded = from_bytes(bytes, source)?;
    let meta = loaded.metadata;
    let mut tensors = loaded.tensors;
    let bad = |reason: String| Error::bad_file(source, reason);
    let format = meta_get(source, &meta, "format")?;
    let v2 = match format {
        FORMAT => true,
        FORMAT_V1 => false,
        other => return Err(bad(format!("checkpoint format {other:?}, expected {FORMAT:?}"))),
    };
    let config: TrainConfig = parse_json(source, &meta, "config")?;
    config.validate().map_err(|e| bad(format!("stored config is invalid: {e}")))?;
    let step: u64 = parse(source, &meta, "step")?;
    // The expected names and shapes come from the configuration.
    let shapes = shapes(&config).map_err(|e| bad(format!("stored config is invalid: {e}")))?;
    let mut take = |prefix: &str| -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(shapes.len());
        for (name, want) in &shapes {
            let key = format!("{prefix}.{name}");
            let t = tensors.remove(&key).ok_or_else(|| bad(format!("tensor `{key}` is missing")))?;
            if t.shape() != want.as_slice() {
                return Err(bad(format!(
                    "tensor `{key}` has shape {:?}, the config needs {want:?}",
                    t.shape()
                )));
            }
            out.push((name.to_string(), t));
        }
        Ok(out)
    };
    let model = take("model")?;
    let ema_values = take("ema")?;
    let m = take("adam.m")?;
    let v = take("adam.v")?;
    for (prefix, group) in [("model", &model), ("ema", &ema_values), ("adam.m", &m), ("adam.v", &v)] {
        if let Some((name, _)) = group.iter().find(|(_, t)| !all_finite(t)) {
            return Err(bad(format!(
                "tensor `{prefix}.{name}` holds NaN or infinite values; use another checkpoint (a \
                 run keeps the one before as checkpoint.prev.safetensors)"
            )));
        }
    }
    let mut params = ParamStore::new();
    for (name, t) in model {
        params.insert(name, t);
    }
    let o = &config.optim;
    let mut adam = Adam::new(&params, o.adam_config());
    adam.step = parse(source, &meta, "adam_step")?;
    adam.m = m.into_iter().map(|(_, t)| t).collect();
    adam.v = v.into_iter().map(|(_, t)| t).collect();
    let mut ema = o.new_ema(&params);
    ema.updates = parse(source, &meta, "ema_updates")?;
    ema.shadow = ema_values.into_iter().map(|(_, t)| t).collect();
    // Counters far beyond any run (2^48 steps is 9000 years at a million steps a second) come
    // only from corrupt files, and would wrap.
    const MAX_COUNT: u64 = 1 << 48;
    let skipped: u64 = if v2 { parse(source, &meta, "skipped_steps")? } else { 0 };
    for (key, value) in
        [("step", step), ("adam_step", adam.step), ("ema_updates", ema.updates), ("skipped_steps", skipped)]
    {
        if value > MAX_COUNT {
            return Err(bad(format!("checkpoint metadata `{key}` is {value}, beyond any run")));
        }
    }
    if adam.step > step || ema.updates > step {
        return Err(bad(format!(
            "Adam's step ({}) or the EMA's updates ({}) exceed the run's step ({step})",
            adam.step, ema.updates
        )));
    }
    let rng_s: RngState = parse_json(source, &meta, "rng")?;
    let rng = rng_restore(&rng_s).ok_or_else(|| bad("checkpoint RNG state is malformed".into()))?;
    let batch_position: BatchPosition = parse_json(source, &meta, "batch_position")?;
    if batch_position.epoch > MAX_COUNT {
        return Err(bad(format!("the batch stream's epoch {} is beyond any run", batch_position.epoch)));
    }
    let importance: Option<ImportanceSampler> =
        if meta.contains_key("importance") { Some(parse_json(source, &meta, "importance")?) } else { None };
    if let Some(imp) = &importance {
        if config.diffusion.timestep_sampling == crate::diffusion::TimestepSampling::Uniform {
            return Err(bad(
                "importance-sampling state in a checkpoint configured for uniform timesteps".into()
            ));
        }
        imp.validate(config.diffusion.timesteps).map_err(|e| bad(e.to_string()))?;
    }
    let (skipped_steps, data, source_text) = if v2 {
        let data: Option<DataRecord> =
            if meta.contains_key("data") { Some(parse_json(source, &meta, "data")?) } else { None };
        (skipped, data, meta.get("source").cloned().unwrap_or_default())
    } else {
        (skipped, None, meta.get("data").cloned().unwrap_or_default())
    };
    let clip_x0 = match meta.get("clip_x0").map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return Err(bad(format!("checkpoint metadata `clip_x0` is {other:?}, not true or false")))
        }
    };
    Ok(TrainState {
        config,
        step,
        skipped_steps,
        params,
        adam,
        ema,
        rng,
        batch_position,
        importance,
        data,
        source: source_text,
        schedule_source: meta.get("schedule_source").cloned(),
        clip_x0,
    })
}

/// The parameter names and shapes of the configuration's U-Net (nothing is allocated).
fn shapes(config: &TrainConfig) -> Result<Vec<(String, Vec<usize>)>> {
    Ok(UNet::new(config.unet.clone())?.param_shapes())
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
