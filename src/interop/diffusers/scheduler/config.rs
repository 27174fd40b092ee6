//! `scheduler_config.json` of a `DDPMScheduler` or `DDIMScheduler`, every key typed, with
//! diffusers' defaults; what ddpm cannot reproduce is refused naming the key.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::super::keys::Keys;
use super::super::DIFFUSERS_VERSION;
#[cfg(doc)]
use super::DiffusersScheduler;
use crate::diffusion::NoiseSchedule;
use crate::Result;

/// The scheduler class (`_class_name`) with the keys only that class has.
#[derive(Clone, Debug, PartialEq)]
pub enum SchedulerClass {
    /// `DDPMScheduler`: ancestral sampling, Ho et al. 2020 Algorithm 2 on the (respaced) chain.
    Ddpm {
        /// `variance_type`: the σ_t of the noise added at each step.
        variance_type: DdpmVarianceType,
    },
    /// `DDIMScheduler`: Song et al. 2021 (arXiv:2010.02502) Eq. (12), with η given to each step.
    Ddim {
        /// `set_alpha_to_one`: ᾱ_prev past the last step is 1 (true) or ᾱ_0 (false).
        set_alpha_to_one: bool,
    },
}

impl SchedulerClass {
    /// diffusers' class name.
    pub fn name(&self) -> &'static str {
        match self {
            SchedulerClass::Ddpm { .. } => "DDPMScheduler",
            SchedulerClass::Ddim { .. } => "DDIMScheduler",
        }
    }
}

/// `DDPMScheduler`'s `variance_type`, under diffusers' names. With β'_t = 1 − ᾱ_t/ᾱ_prev (the
/// respaced β) and β̃_t = max((1 − ᾱ_prev)/(1 − ᾱ_t)·β'_t, 1e-20) (Ho et al. Eq. 7):
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DdpmVarianceType {
    /// `fixed_small`: σ = √β̃_t.
    FixedSmall,
    /// `fixed_small_log`: σ = exp(½ ln β̃_t) (the same value, rounded differently).
    FixedSmallLog,
    /// `fixed_large`: σ = √β'_t.
    FixedLarge,
    /// `fixed_large_log`: diffusers computes σ = √(ln β'_t), the square root of a negative
    /// number, so every step with t > 0 returns NaN; reproduced as such.
    FixedLargeLog,
    /// `learned`: the second half of the model output is σ² itself (not its log), σ = √v.
    Learned,
    /// `learned_range`: the second half v ∈ [−1, 1] interpolates the log-variance,
    /// ln σ² = f ln β'_t + (1 − f) ln β̃_t with f = (v + 1)/2 (Nichol & Dhariwal 2021, Eq. 15).
    LearnedRange,
}

impl DdpmVarianceType {
    const ALL: [(DdpmVarianceType, &'static str); 6] = [
        (DdpmVarianceType::FixedSmall, "fixed_small"),
        (DdpmVarianceType::FixedSmallLog, "fixed_small_log"),
        (DdpmVarianceType::FixedLarge, "fixed_large"),
        (DdpmVarianceType::FixedLargeLog, "fixed_large_log"),
        (DdpmVarianceType::Learned, "learned"),
        (DdpmVarianceType::LearnedRange, "learned_range"),
    ];

    /// diffusers' name for it.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(v, _)| *v == self).map(|(_, n)| *n).expect("every variant is listed")
    }

    /// Whether the model output carries a second half of channels for the variance.
    pub fn is_learned(self) -> bool {
        matches!(self, DdpmVarianceType::Learned | DdpmVarianceType::LearnedRange)
    }
}

/// Where β_1 … β_T come from.
#[derive(Clone, Debug, PartialEq)]
pub enum BetaSource {
    /// `beta_schedule` from `beta_start` to `beta_end`.
    Schedule {
        /// `beta_schedule`.
        schedule: DiffusersBetaSchedule,
        /// `beta_start` (unused by `squaredcos_cap_v2`).
        beta_start: f64,
        /// `beta_end` (unused by `squaredcos_cap_v2`).
        beta_end: f64,
    },
    /// `trained_betas`: the T values themselves (rounded to f32, as diffusers stores them);
    /// `beta_schedule`, `beta_start` and `beta_end` are then ignored, as diffusers ignores them.
    Trained(Vec<f64>),
}

/// `beta_schedule`. [`DiffusersScheduler::betas`] holds the table exactly as diffusers builds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffusersBetaSchedule {
    /// `linear`: torch's float32 `linspace(beta_start, beta_end, T)` (Ho et al. §4).
    Linear,
    /// `scaled_linear`: float32 `linspace(√beta_start, √beta_end, T)` squared (latent diffusion).
    ScaledLinear,
    /// `squaredcos_cap_v2`: Nichol & Dhariwal 2021 Eq. (17), β capped at 0.999.
    SquaredcosCapV2,
}

impl DiffusersBetaSchedule {
    /// diffusers' name for it.
    pub fn name(self) -> &'static str {
        match self {
            DiffusersBetaSchedule::Linear => "linear",
            DiffusersBetaSchedule::ScaledLinear => "scaled_linear",
            DiffusersBetaSchedule::SquaredcosCapV2 => "squaredcos_cap_v2",
        }
    }
}

/// `prediction_type`: what the model output predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// `epsilon`: ε; x̂_0 = (x_t − √(1−ᾱ_t) ε)/√ᾱ_t (Ho et al. Eq. 15).
    Epsilon,
    /// `sample`: x̂_0 itself.
    Sample,
    /// `v_prediction`: v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (Salimans & Ho 2022, §4);
    /// x̂_0 = √ᾱ_t x_t − √(1−ᾱ_t) v.
    VPrediction,
}

impl PredictionType {
    /// diffusers' name for it.
    pub fn name(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::Sample => "sample",
            PredictionType::VPrediction => "v_prediction",
        }
    }
}

/// `timestep_spacing`: which K of the T training steps `set_timesteps(K)` visits; the sampler's
/// own type, whose names are diffusers'.
pub use crate::diffusion::samplers::TimestepSpacing;

/// Every key of a diffusers 0.42.1 `DDPMScheduler` / `DDIMScheduler` config.
///
/// Clipping and thresholding of x̂_0 keep diffusers' three plus two flat keys (rather than an
/// enum) so that a config round-trips through [`Self::to_json`] unchanged: diffusers stores
/// `clip_sample_range` and the thresholding values whether or not they are used. Thresholding
/// wins over clipping when both are on, as in diffusers.
#[derive(Clone, Debug, PartialEq)]
pub struct DiffusersSchedulerConfig {
    /// The class, with its own keys.
    pub class: SchedulerClass,
    /// `num_train_timesteps`, T.
    pub num_train_timesteps: usize,
    /// β: a named schedule or `trained_betas`.
    pub betas: BetaSource,
    /// `prediction_type`.
    pub prediction_type: PredictionType,
    /// `clip_sample`: clamp x̂_0 to ±`clip_sample_range` at every step.
    pub clip_sample: bool,
    /// `clip_sample_range`.
    pub clip_sample_range: f64,
    /// `thresholding`: dynamic thresholding of x̂_0 (Saharia et al. 2022, arXiv:2205.11487, §2.3).
    pub thresholding: bool,
    /// `dynamic_thresholding_ratio`: the quantile of |x̂_0| taken as the threshold s.
    pub dynamic_thresholding_ratio: f64,
    /// `sample_max_value`: the largest s.
    pub sample_max_value: f64,
    /// `timestep_spacing`.
    pub timestep_spacing: TimestepSpacing,
    /// `steps_offset`: added to every `leading` timestep (ignored by the other spacings).
    pub steps_offset: usize,
    /// `rescale_betas_zero_snr`: rescale √ᾱ so that ᾱ_{T−1} = 0 (Lin et al. 2024, Algorithm 1).
    pub rescale_betas_zero_snr: bool,
}

/// The keys both classes read; each class adds one.
const COMMON_KEYS: [&str; 14] = [
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "clip_sample",
    "prediction_type",
    "thresholding",
    "dynamic_thresholding_ratio",
    "clip_sample_range",
    "sample_max_value",
    "timestep_spacing",
    "steps_offset",
    "rescale_betas_zero_snr",
];

impl DiffusersSchedulerConfig {
    /// `DDPMScheduler()` with every argument at its default (T = 1000, linear 1e-4 … 0.02,
    /// ε, `fixed_small`, clipping to ±1, `leading`).
    pub fn ddpm() -> Self {
        Self::with_class(SchedulerClass::Ddpm { variance_type: DdpmVarianceType::FixedSmall })
    }

    /// `DDIMScheduler()` with every argument at its default (as [`Self::ddpm`], with
    /// `set_alpha_to_one` true).
    pub fn ddim() -> Self {
        Self::with_class(SchedulerClass::Ddim { set_alpha_to_one: true })
    }

    fn with_class(class: SchedulerClass) -> Self {
        DiffusersSchedulerConfig {
            class,
            num_train_timesteps: 1000,
            betas: BetaSource::Schedule {
                schedule: DiffusersBetaSchedule::Linear,
                beta_start: 1e-4,
                beta_end: 0.02,
            },
            prediction_type: PredictionType::Epsilon,
            clip_sample: true,
            clip_sample_range: 1.0,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }

    /// Reads a `scheduler_config.json` value. `_class_name` picks the class (`DDPMScheduler` when
    /// absent, as ddpm's import assumes); every missing key takes that class's default.
    ///
    /// # Errors
    /// [`crate::Error::BadFile`] naming `path` and the key for: another class; a key the class
    /// does not have (diffusers would warn and ignore it); a value of the wrong type; an unknown
    /// `variance_type`, `prediction_type` or `timestep_spacing`; `beta_schedule` `sigmoid` or
    /// `laplace` (torch's vectorised sigmoid and an unchecked formula, not reproduced bit for
    /// bit; give the β as `trained_betas` instead) or any other name; `trained_betas` whose
    /// length is not T; T = 0 or above [`NoiseSchedule::MAX_TIMESTEPS`]; a
    /// `dynamic_thresholding_ratio` outside [0, 1] with thresholding on (torch.quantile raises);
    /// a non-finite number.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let keys = Keys::new(v, path, "scheduler config")?;
        let class_name = match keys.map.get("_class_name") {
            None => "DDPMScheduler",
            Some(Value::String(s)) => s.as_str(),
            Some(other) => return Err(keys.bad("_class_name", &format!("{other} is not a string"))),
        };
        let own_key = match class_name {
            "DDPMScheduler" => "variance_type",
            "DDIMScheduler" => "set_alpha_to_one",
            other => {
                return Err(keys.bad(
                    "_class_name",
                    &format!("{other:?}; ddpm reproduces DDPMScheduler and DDIMScheduler only"),
                ))
            }
        };
        let known: Vec<&str> = COMMON_KEYS.iter().copied().chain([own_key]).collect();
        keys.refuse_unknown(&known)?;
        let class = if class_name == "DDPMScheduler" {
            let name = keys.str_or("variance_type", "fixed_small")?;
            let variance_type = DdpmVarianceType::ALL
                .iter()
                .find(|(_, n)| *n == name)
                .map(|(v, _)| *v)
                .ok_or_else(|| keys.bad("variance_type", &format!("unknown value {name:?}")))?;
            SchedulerClass::Ddpm { variance_type }
        } else {
            SchedulerClass::Ddim { set_alpha_to_one: keys.bool_or("set_alpha_to_one", true)? }
        };

        let num_train_timesteps = keys.usize_or("num_train_timesteps", 1000)?;
        if num_train_timesteps == 0 || num_train_timesteps > NoiseSchedule::MAX_TIMESTEPS {
            return Err(keys.bad(
                "num_train_timesteps",
                &format!("{num_train_timesteps} is outside 1 ..= {}", NoiseSchedule::MAX_TIMESTEPS),
            ));
        }
        let finite = |key: &str, default: f64| -> Result<f64> {
            let x = keys.f64_or(key, default)?;
            if x.is_finite() {
                Ok(x)
            } else {
                Err(keys.bad(key, &format!("{x} is not finite")))
            }
        };
        let betas = if !keys.is_null_or_absent("trained_betas") {
            let values = keys
                .get("trained_betas")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                .filter(|b| b.iter().all(|x| x.is_finite()))
                .ok_or_else(|| keys.bad("trained_betas", "not a list of finite numbers"))?;
            if values.len() != num_train_timesteps {
                return Err(keys.bad(
                        "trained_betas",
                        &format!(
                            "{} values for num_train_timesteps = {num_train_timesteps}; diffusers' β table and timesteps would disagree",
                            values.len()
                        ),
                    ));
            }
            BetaSource::Trained(values)
        } else {
            let schedule = match keys.str_or("beta_schedule", "linear")? {
                "linear" => DiffusersBetaSchedule::Linear,
                "scaled_linear" => DiffusersBetaSchedule::ScaledLinear,
                "squaredcos_cap_v2" => DiffusersBetaSchedule::SquaredcosCapV2,
                "sigmoid" if own_key == "set_alpha_to_one" => {
                    return Err(keys.bad("beta_schedule", "\"sigmoid\" is not implemented by DDIMScheduler"))
                }
                "sigmoid" | "laplace" => {
                    return Err(keys.bad(
                        "beta_schedule",
                        "torch computes these β through kernels ddpm does not replicate bit for bit, and \
                             the steps near t = 0 depend on the last bit of ᾱ; give the β as trained_betas",
                    ))
                }
                other => {
                    return Err(keys.bad(
                        "beta_schedule",
                        &format!("unknown value {other:?} (linear, scaled_linear, squaredcos_cap_v2)"),
                    ))
                }
            };
            BetaSource::Schedule {
                schedule,
                beta_start: finite("beta_start", 1e-4)?,
                beta_end: finite("beta_end", 0.02)?,
            }
        };
        let prediction_type = match keys.str_or("prediction_type", "epsilon")? {
            "epsilon" => PredictionType::Epsilon,
            "sample" => PredictionType::Sample,
            "v_prediction" => PredictionType::VPrediction,
            other => return Err(keys.bad("prediction_type", &format!("unknown value {other:?}"))),
        };
        let thresholding = keys.bool_or("thresholding", false)?;
        let dynamic_thresholding_ratio = finite("dynamic_thresholding_ratio", 0.995)?;
        if thresholding && !(0.0..=1.0).contains(&dynamic_thresholding_ratio) {
            return Err(keys.bad(
                "dynamic_thresholding_ratio",
                &format!("{dynamic_thresholding_ratio} is outside [0, 1] (torch.quantile refuses it)"),
            ));
        }
        let timestep_spacing = match keys.str_or("timestep_spacing", "leading")? {
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            "linspace" => TimestepSpacing::Linspace,
            other => return Err(keys.bad("timestep_spacing", &format!("unknown value {other:?}"))),
        };
        Ok(DiffusersSchedulerConfig {
            class,
            num_train_timesteps,
            betas,
            prediction_type,
            clip_sample: keys.bool_or("clip_sample", true)?,
            clip_sample_range: finite("clip_sample_range", 1.0)?,
            thresholding,
            dynamic_thresholding_ratio,
            sample_max_value: finite("sample_max_value", 1.0)?,
            timestep_spacing,
            steps_offset: keys.usize_or("steps_offset", 0)?,
            rescale_betas_zero_snr: keys.bool_or("rescale_betas_zero_snr", false)?,
        })
    }

    /// The `scheduler_config.json` value, every key written as diffusers' `save_config` writes
    /// it (with `trained_betas`, `beta_schedule`/`beta_start`/`beta_end` take their defaults).
    pub fn to_json(&self) -> Value {
        let (schedule, beta_start, beta_end, trained) = match &self.betas {
            BetaSource::Schedule { schedule, beta_start, beta_end } => {
                (schedule.name(), *beta_start, *beta_end, Value::Null)
            }
            BetaSource::Trained(b) => ("linear", 1e-4, 0.02, json!(b)),
        };
        let mut m = Map::new();
        m.insert("_class_name".into(), json!(self.class.name()));
        m.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
        m.insert("beta_end".into(), json!(beta_end));
        m.insert("beta_schedule".into(), json!(schedule));
        m.insert("beta_start".into(), json!(beta_start));
        m.insert("clip_sample".into(), json!(self.clip_sample));
        m.insert("clip_sample_range".into(), json!(self.clip_sample_range));
        m.insert("dynamic_thresholding_ratio".into(), json!(self.dynamic_thresholding_ratio));
        m.insert("num_train_timesteps".into(), json!(self.num_train_timesteps));
        m.insert("prediction_type".into(), json!(self.prediction_type.name()));
        m.insert("rescale_betas_zero_snr".into(), json!(self.rescale_betas_zero_snr));
        m.insert("sample_max_value".into(), json!(self.sample_max_value));
        m.insert("steps_offset".into(), json!(self.steps_offset));
        m.insert("thresholding".into(), json!(self.thresholding));
        m.insert("timestep_spacing".into(), json!(self.timestep_spacing.name()));
        m.insert("trained_betas".into(), trained);
        match &self.class {
            SchedulerClass::Ddpm { variance_type } => {
                m.insert("variance_type".into(), json!(variance_type.name()));
            }
            SchedulerClass::Ddim { set_alpha_to_one } => {
                m.insert("set_alpha_to_one".into(), json!(set_alpha_to_one));
            }
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_an_empty_config_is_a_default_ddpm_scheduler() {
        let p = Path::new("s");
        for c in [DiffusersSchedulerConfig::ddpm(), DiffusersSchedulerConfig::ddim()] {
            assert_eq!(DiffusersSchedulerConfig::from_json(&c.to_json(), p).unwrap(), c);
        }
        assert_eq!(
            DiffusersSchedulerConfig::from_json(&json!({}), p).unwrap(),
            DiffusersSchedulerConfig::ddpm()
        );
        let trained = DiffusersSchedulerConfig {
            num_train_timesteps: 3,
            betas: BetaSource::Trained(vec![0.1, 0.2, 0.3]),
            ..DiffusersSchedulerConfig::ddim()
        };
        assert_eq!(DiffusersSchedulerConfig::from_json(&trained.to_json(), p).unwrap(), trained);
    }

    #[test]
    fn each_class_refuses_the_other_class_key_by_name() {
        let p = Path::new("s");
        let mut ddim = DiffusersSchedulerConfig::ddim().to_json();
        ddim["variance_type"] = json!("fixed_small");
        let err = DiffusersSchedulerConfig::from_json(&ddim, p).unwrap_err().to_string();
        assert!(err.contains("`variance_type`"), "{err}");
        let mut ddpm = DiffusersSchedulerConfig::ddpm().to_json();
        ddpm["set_alpha_to_one"] = json!(false);
        let err = DiffusersSchedulerConfig::from_json(&ddpm, p).unwrap_err().to_string();
        assert!(err.contains("`set_alpha_to_one`"), "{err}");
    }
}
