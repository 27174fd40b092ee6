//! The flag strings of openai/improved-diffusion's and openai/guided-diffusion's scripts
//! (`--image_size 64 --num_channels 128 --learn_sigma True ...`), read as their `argparse` parser
//! reads them, and mapped to ddpm's U-Net and diffusion settings.
//!
//! Parsing follows `script_util.add_dict_to_argparser`: every flag is typed by its default (an
//! integer flag refuses `64.0`, a boolean takes `str2bool`'s words and nothing else, a bare
//! `--learn_sigma` is an error), `--flag value` and `--flag=value` both work, the last repeat
//! wins, and a unique prefix names a flag (argparse's abbreviations). The flags of the training
//! and sampling scripts that do not change the model (`--batch_size`, `--model_path`, …) are
//! accepted and ignored; any other flag is refused by name.

use std::collections::BTreeMap;

use crate::diffusion::{BetaSchedule, Convention, LossType, MeanType, TimestepSampling, VarianceType};
use crate::nn::{
    AttnHeads, AttnNorm, DownsamplePadding, EmbeddingOrder, Resample, TimeConditioning, UNetConfig,
};
use crate::train::DiffusionConfig;
use crate::{Error, Result};

/// Which repository's scripts the flags are for (their defaults and flag sets differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// openai/improved-diffusion (Nichol & Dhariwal 2021).
    Improved,
    /// openai/guided-diffusion (Dhariwal & Nichol 2021).
    Guided,
}

impl Family {
    /// The repository's name.
    pub fn name(self) -> &'static str {
        match self {
            Family::Improved => "improved-diffusion",
            Family::Guided => "guided-diffusion",
        }
    }
}

/// The number of classes of both repositories' class-conditional models (`NUM_CLASSES`,
/// ImageNet's).
pub const NUM_CLASSES: usize = 1000;

#[derive(Clone, Debug, PartialEq)]
enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

/// `(name, default)` of `model_and_diffusion_defaults()` in each repository's `script_util.py`.
fn defaults(family: Family) -> Vec<(&'static str, Value)> {
    use Value::*;
    let mut d = vec![
        ("image_size", Int(64)),
        ("num_channels", Int(128)),
        ("num_res_blocks", Int(2)),
        ("num_heads", Int(4)),
        ("num_heads_upsample", Int(-1)),
        ("attention_resolutions", Str("16,8".into())),
        ("dropout", Float(0.0)),
        ("learn_sigma", Bool(false)),
        ("class_cond", Bool(false)),
        ("diffusion_steps", Int(1000)),
        ("noise_schedule", Str("linear".into())),
        ("timestep_respacing", Str(String::new())),
        ("use_kl", Bool(false)),
        ("predict_xstart", Bool(false)),
        ("use_checkpoint", Bool(false)),
        ("use_scale_shift_norm", Bool(true)),
    ];
    match family {
        Family::Improved => d.extend([
            ("sigma_small", Bool(false)),
            ("rescale_timesteps", Bool(true)),
            ("rescale_learned_sigmas", Bool(true)),
        ]),
        Family::Guided => d.extend([
            ("num_head_channels", Int(-1)),
            ("channel_mult", Str(String::new())),
            ("resblock_updown", Bool(false)),
            ("use_fp16", Bool(false)),
            ("use_new_attention_order", Bool(false)),
            ("rescale_timesteps", Bool(false)),
            ("rescale_learned_sigmas", Bool(false)),
        ]),
    }
    d
}

/// Flags of the repositories' training, sampling and evaluation scripts that say nothing about
/// the model or its diffusion; accepted and ignored.
const SCRIPT_FLAGS: [&str; 25] = [
    "data_dir",
    "schedule_sampler",
    "lr",
    "weight_decay",
    "lr_anneal_steps",
    "batch_size",
    "microbatch",
    "ema_rate",
    "log_interval",
    "save_interval",
    "resume_checkpoint",
    "fp16_scale_growth",
    "clip_denoised",
    "num_samples",
    "use_ddim",
    "model_path",
    "classifier_path",
    "classifier_scale",
    "classifier_use_fp16",
    "classifier_width",
    "classifier_depth",
    "classifier_attention_resolutions",
    "classifier_use_scale_shift_norm",
    "classifier_resblock_updown",
    "classifier_pool",
];

/// The parsed flags: every model and diffusion flag with its value (given or default).
#[derive(Clone, Debug)]
pub struct Flags {
    family: Family,
    values: BTreeMap<&'static str, Value>,
}

fn bad(what: String) -> Error {
    Error::config("flags", what)
}

/// Splits a flag string into words: whitespace separates, and a word may be quoted with `'` or
/// `"` (as a shell would, without escapes).
fn words(s: &str) -> Result<Vec<String>> {
    let mut out = vec![];
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in s.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => cur.push(c),
            None if c == '"' || c == '\'' => {
                quote = Some(c);
                any = true;
            }
            None if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            None => cur.push(c),
        }
    }
    if quote.is_some() {
        return Err(bad(format!("unclosed quote in {s:?}")));
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

fn str2bool(flag: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "yes" | "true" | "t" | "y" | "1" => Ok(true),
        "no" | "false" | "f" | "n" | "0" => Ok(false),
        _ => Err(bad(format!("--{flag} {v:?}: a boolean is one of true/false, yes/no, t/f, y/n, 1/0"))),
    }
}

impl Flags {
    /// Parses `flags` as `family`'s scripts do.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the flag: unknown (with the other repository's name when
    /// it is one of its flags), ambiguous, without a value, or a value of the wrong type.
    pub fn parse(flags: &str, family: Family) -> Result<Flags> {
        let own = defaults(family);
        let mut values: BTreeMap<&'static str, Value> = own.iter().cloned().collect();
        // improved-diffusion's image_train.py has --use_fp16 as a training flag (the model is
        // the same); guided-diffusion's is a model flag with a default.
        let extra: &[&'static str] = if family == Family::Improved { &["use_fp16"] } else { &[] };
        let known: Vec<&'static str> = own
            .iter()
            .map(|(n, _)| *n)
            .chain(SCRIPT_FLAGS.iter().copied())
            .chain(extra.iter().copied())
            .collect();
        let words = words(flags)?;
        let mut i = 0;
        while i < words.len() {
            let word = &words[i];
            let Some(body) = word.strip_prefix("--") else {
                return Err(bad(format!("{word:?} is not a --flag (flags are --name value)")));
            };
            if body.is_empty() || body.starts_with('=') {
                return Err(bad(format!(
                    "{word:?} names no flag (a bare -- ends argparse's options; give flags only)"
                )));
            }
            let (given, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (body, None),
            };
            let name = match known.iter().find(|k| **k == given) {
                Some(k) => *k,
                None => {
                    let matches: Vec<&'static str> =
                        known.iter().copied().filter(|k| k.starts_with(given)).collect();
                    match matches.as_slice() {
                        [one] => *one,
                        [] if given == "large_size" || given == "small_size" => {
                            return Err(bad(format!(
                                "--{given} is a flag of the super-resolution scripts; ddpm imports image models (unconditional or class-conditional), not super-resolution ones"
                            )))
                        }
                        [] => {
                            let other = match family {
                                Family::Improved => Family::Guided,
                                Family::Guided => Family::Improved,
                            };
                            let hint = if defaults(other).iter().any(|(n, _)| *n == given) {
                                format!(" (it is a {} flag: import with --{})", other.name(), other.name())
                            } else {
                                String::new()
                            };
                            return Err(bad(format!(
                                "--{given} is not a flag of {}'s scripts{hint}",
                                family.name()
                            )));
                        }
                        many => {
                            return Err(bad(format!(
                                "--{given} is ambiguous: it could be --{}",
                                many.join(", --")
                            )))
                        }
                    }
                }
            };
            let value = match inline {
                Some(v) => v,
                None => {
                    i += 1;
                    match words.get(i) {
                        Some(v) if !v.starts_with("--") => v.clone(),
                        _ => return Err(bad(format!("--{name} needs a value"))),
                    }
                }
            };
            i += 1;
            let Some(default) = values.get(name) else { continue }; // a script flag: ignored
            let typed = match default {
                Value::Int(_) => Value::Int(
                    value.trim().parse().map_err(|_| bad(format!("--{name} {value:?} is not an integer")))?,
                ),
                Value::Float(_) => {
                    let f: f64 = value
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("--{name} {value:?} is not a number")))?;
                    Value::Float(f)
                }
                Value::Bool(_) => Value::Bool(str2bool(name, value.trim())?),
                Value::Str(_) => Value::Str(value),
            };
            values.insert(name, typed);
        }
        Ok(Flags { family, values })
    }

    fn int(&self, name: &str) -> i64 {
        match self.values.get(name) {
            Some(Value::Int(v)) => *v,
            other => unreachable!("--{name} is an integer flag of every family, got {other:?}"),
        }
    }

    fn boolean(&self, name: &str) -> bool {
        matches!(self.values.get(name), Some(Value::Bool(true)))
    }

    fn string(&self, name: &str) -> &str {
        match self.values.get(name) {
            Some(Value::Str(s)) => s,
            _ => "",
        }
    }

    fn float(&self, name: &str) -> f64 {
        match self.values.get(name) {
            Some(Value::Float(v)) => *v,
            _ => 0.0,
        }
    }

    /// A positive integer flag as usize.
    fn positive(&self, name: &str) -> Result<usize> {
        let v = self.int(name);
        usize::try_from(v)
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| bad(format!("--{name} {v} must be at least 1")))
    }

    /// The repository these flags are read for.
    pub fn family(&self) -> Family {
        self.family
    }

    /// `--timestep_respacing` as given ("" when the model samples all T steps).
    pub fn timestep_respacing(&self) -> &str {
        self.string("timestep_respacing")
    }

    /// The timesteps their sampler visits for `--timestep_respacing` (respace.py's
    /// `space_timesteps`), increasing: all T when it is empty; `ddimN`: every s-th from 0 for
    /// the smallest stride s giving N steps; `"K1,K2,…"`: T split into that many sections (the
    /// first T mod n one step longer), each visited K_i times at the fractional stride
    /// (size−1)/(K_i−1) accumulated and rounded half to even, as Python's `round` does.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming `--timestep_respacing` for a value their code refuses.
    pub fn kept_timesteps(&self, big_t: usize) -> Result<Vec<usize>> {
        let spec = self.timestep_respacing().trim();
        let refuse = |why: String| bad(format!("--timestep_respacing {spec:?}: {why}"));
        if spec.is_empty() {
            return Ok((0..big_t).collect());
        }
        if let Some(n) = spec.strip_prefix("ddim") {
            let n: usize = n.parse().map_err(|_| refuse("ddimN needs an integer N".into()))?;
            return (1..big_t)
                .find(|&s| big_t.div_ceil(s) == n)
                .map(|s| (0..big_t).step_by(s).collect())
                .ok_or_else(|| refuse(format!("no stride gives exactly {n} steps of {big_t}")));
        }
        let counts: Vec<usize> = spec
            .split(',')
            .map(|c| c.trim().parse().ok())
            .collect::<Option<_>>()
            .ok_or_else(|| refuse("not a comma-separated list of step counts".into()))?;
        let sections = counts.len();
        let (size_per, extra) = (big_t / sections, big_t % sections);
        let mut start = 0;
        let mut kept = vec![];
        for (i, &count) in counts.iter().enumerate() {
            let size = size_per + usize::from(i < extra);
            if size < count {
                return Err(refuse(format!("a section of {size} steps cannot visit {count}")));
            }
            let stride = if count <= 1 { 1.0 } else { (size - 1) as f64 / (count - 1) as f64 };
            let mut at = 0.0f64;
            for _ in 0..count {
                kept.push(start + at.round_ties_even() as usize);
                at += stride;
            }
            start += size;
        }
        kept.sort_unstable();
        kept.dedup();
        Ok(kept)
    }

    /// Whether the attention's fused `qkv` projection lists all queries, then all keys, then all
    /// values (`use_new_attention_order`), rather than q, k, v per head (the legacy order).
    pub fn new_attention_order(&self) -> bool {
        self.boolean("use_new_attention_order")
    }

    /// The U-Net `create_model` builds for these flags, in ddpm's terms.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the flag for a model ddpm cannot build: an image size
    /// without a default `channel_mult`, a fractional or leading multiplier other than 1, or
    /// anything [`UNetConfig::validate`] refuses.
    pub fn unet_config(&self) -> Result<UNetConfig> {
        let image_size = self.positive("image_size")?;
        let ch = self.positive("num_channels")?;
        let ch_mult: Vec<usize> = match (self.family, self.string("channel_mult")) {
            (Family::Guided, s) if !s.is_empty() => s
                .split(',')
                .map(|m| m.trim().parse::<usize>().ok().filter(|&m| m > 0))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad(format!("--channel_mult {s:?} is not a list of positive integers")))?,
            (Family::Improved, _) => match image_size {
                256 => vec![1, 1, 2, 2, 4, 4],
                64 => vec![1, 2, 3, 4],
                32 => vec![1, 2, 2, 2],
                other => {
                    return Err(bad(format!(
                        "--image_size {other}: improved-diffusion's create_model has channel multipliers for 32, 64 and 256 only"
                    )))
                }
            },
            (Family::Guided, _) => match image_size {
                256 => vec![1, 1, 2, 2, 4, 4],
                128 => vec![1, 1, 2, 3, 4],
                64 => vec![1, 2, 3, 4],
                512 => {
                    return Err(bad(
                        "--image_size 512: its channel_mult (0.5, 1, 1, 2, 2, 4, 4) has a fractional first multiplier, which ddpm's U-Net (first level as wide as the stem) cannot build".into(),
                    ))
                }
                other => {
                    return Err(bad(format!(
                        "--image_size {other}: guided-diffusion needs --channel_mult for sizes other than 64, 128, 256 and 512"
                    )))
                }
            },
        };
        if ch_mult[0] != 1 {
            return Err(bad(format!(
                "--channel_mult {ch_mult:?}: guided-diffusion widens the stem to channel_mult[0]·num_channels; ddpm's U-Net needs a first multiplier of 1"
            )));
        }
        // attention_resolutions are image sizes; the network keeps the downsampling rates
        // image_size // r and attends where a level runs at one of them. Rates that no level has
        // do nothing, in their code and here.
        let levels = ch_mult.len();
        let mut attn_resolutions = vec![];
        for r in self.string("attention_resolutions").split(',').filter(|r| !r.trim().is_empty()) {
            let r: usize =
                r.trim().parse().ok().filter(|&r| r > 0).ok_or_else(|| {
                    bad(format!("--attention_resolutions: {r:?} is not a positive integer"))
                })?;
            let ds = image_size / r;
            if let Some(level) = (0..levels).find(|&i| ds == 1 << i) {
                let res = image_size >> level;
                if !attn_resolutions.contains(&res) {
                    attn_resolutions.push(res);
                }
            }
        }
        let heads = |count: &str| -> Result<AttnHeads> {
            if self.family == Family::Guided && self.int("num_head_channels") != -1 {
                let w = self.int("num_head_channels");
                return usize::try_from(w)
                    .ok()
                    .filter(|&w| w > 0)
                    .map(AttnHeads::Width)
                    .ok_or_else(|| bad(format!("--num_head_channels {w} must be -1 or at least 1")));
            }
            let h = match self.int(count) {
                -1 => self.int("num_heads"),
                h => h,
            };
            usize::try_from(h)
                .ok()
                .filter(|&h| h > 0)
                .map(AttnHeads::Count)
                .ok_or_else(|| bad(format!("--{count} {h} must be at least 1")))
        };
        let (attn_heads, up_heads) = (heads("num_heads")?, heads("num_heads_upsample")?);
        let resample = if self.boolean("resblock_updown") { Resample::ResBlock } else { Resample::Conv };
        let dropout = self.float("dropout");
        let config = UNetConfig {
            in_channels: 3,
            out_channels: if self.boolean("learn_sigma") { 6 } else { 3 },
            resolution: image_size,
            ch,
            ch_mult,
            num_res_blocks: usize::try_from(self.int("num_res_blocks")).map_err(|_| {
                bad(format!("--num_res_blocks {} must be 0 or more", self.int("num_res_blocks")))
            })?,
            attn_resolutions,
            dropout: dropout as f32,
            gn_groups: 32,
            gn_eps: 1e-5,
            downsample_padding: DownsamplePadding::Symmetric,
            embedding_order: EmbeddingOrder::CosSin,
            embedding_freq_shift: 0.0,
            attn_heads,
            attn_heads_up: (up_heads != attn_heads).then_some(up_heads),
            time_conditioning: if self.boolean("use_scale_shift_norm") {
                TimeConditioning::ScaleShift
            } else {
                TimeConditioning::Add
            },
            downsample: resample,
            upsample: resample,
            mid_attention: true,
            mid_attn_norm: AttnNorm::Inherit,
            num_classes: self.boolean("class_cond").then_some(NUM_CLASSES),
        };
        config.validate().map_err(|e| bad(format!("the flags describe a U-Net ddpm cannot build: {e}")))?;
        // GroupNorm32 has exactly 32 groups; ddpm's min(32, C) is the same only for C ≥ 32.
        if ch < 32 {
            return Err(bad(format!("--num_channels {ch}: their GroupNorm32 needs at least 32 channels")));
        }
        Ok(config)
    }

    /// The diffusion `create_gaussian_diffusion` builds for these flags, before any respacing
    /// (`--timestep_respacing` is a choice of sampler steps; [`Flags::timestep_respacing`]).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] naming the flag for an unknown noise schedule or a step count
    /// below 2.
    pub fn diffusion_config(&self) -> Result<DiffusionConfig> {
        let timesteps = self.positive("diffusion_steps")?;
        let schedule = match self.string("noise_schedule") {
            "linear" => BetaSchedule::Linear,
            "cosine" => BetaSchedule::Cosine,
            other => {
                return Err(bad(format!("--noise_schedule {other:?}: their code knows linear and cosine")))
            }
        };
        let learned = self.boolean("learn_sigma");
        let variance_type = match (learned, self.boolean("sigma_small")) {
            (true, _) => VarianceType::LearnedRange,
            (false, true) => VarianceType::FixedSmall,
            (false, false) => VarianceType::FixedLarge,
        };
        let loss = match (self.boolean("use_kl"), self.boolean("rescale_learned_sigmas"), learned) {
            (true, _, _) => LossType::RescaledVlb,
            (false, true, true) => LossType::RescaledHybrid,
            (false, false, true) => LossType::Hybrid,
            (false, _, false) => LossType::Simple,
        };
        let config = DiffusionConfig {
            schedule,
            timesteps,
            convention: if self.boolean("rescale_timesteps") {
                Convention::ImprovedDiffusion
            } else {
                Convention::GuidedDiffusion
            },
            mean_type: if self.boolean("predict_xstart") { MeanType::X0 } else { MeanType::Eps },
            variance_type,
            loss,
            timestep_sampling: TimestepSampling::Uniform,
            loss_weighting: crate::diffusion::LossWeighting::Uniform,
        };
        config.validate().map_err(|e| bad(format!("the flags describe a diffusion ddpm cannot run: {e}")))?;
        Ok(config)
    }

    /// Whether `--use_fp16` is set (guided-diffusion's checkpoints then still hold float32
    /// master weights; a float16 tensor in the file means they are missing).
    pub fn use_fp16(&self) -> bool {
        self.boolean("use_fp16")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argparse_rules_types_prefixes_repeats_and_script_flags() {
        let f = Flags::parse(
            "--image_size 32 --num_chan=64 --learn_sigma True --learn_sigma f --batch_size 128 --attention_resolutions '16,8'",
            Family::Improved,
        )
        .unwrap();
        let c = f.unet_config().unwrap();
        assert_eq!((c.resolution, c.ch, c.out_channels), (32, 64, 3), "last repeat wins");
        assert_eq!(c.ch_mult, vec![1, 2, 2, 2]);
        assert_eq!(c.attn_resolutions, vec![16, 8]);
        assert_eq!(c.attn_heads, AttnHeads::Count(4));
        assert_eq!(f.diffusion_config().unwrap().convention, Convention::ImprovedDiffusion);
        for (flags, needle) in [
            ("--num_channels 64.0", "not an integer"),
            ("--learn_sigma", "needs a value"),
            ("--learn_sigma maybe", "boolean"),
            ("--num_head_channels 32", "guided-diffusion flag"),
            ("--frobnicate 1", "not a flag"),
            ("--num 3", "ambiguous"),
            ("image_size 32", "not a --flag"),
            ("-- 3", "names no flag"),
            ("--timestep_respacing=x --", "names no flag"),
            ("--image_size '32", "unclosed quote"),
        ] {
            let e = Flags::parse(flags, Family::Improved).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(needle), "{flags}: {e}");
        }
        let e = Flags::parse("--sigma_small True", Family::Guided).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("improved-diffusion flag"), "{e}");
    }

    #[test]
    fn respacing_keeps_the_steps_their_space_timesteps_keeps() {
        let kept = |spec: &str, t: usize| {
            Flags::parse(&format!("--timestep_respacing={spec}"), Family::Improved).unwrap().kept_timesteps(t)
        };
        // T = 1000, 25 steps: stride 999/24 = 41.625, accumulated; 16·41.625 = 666.0 exactly,
        // 20·41.625 = 832.5 rounds to 832 (half to even), not 833.
        let k = kept("25", 1000).unwrap();
        assert_eq!(k.len(), 25);
        assert!(k.contains(&666) && k.contains(&832) && !k.contains(&833), "{k:?}");
        assert_eq!((k[0], k[24]), (0, 999));
        // Sections: 1000 = 334 + 333 + 333; 10 steps in the first, 15, 20.
        let k = kept("10,15,20", 1000).unwrap();
        assert_eq!(k.len(), 45);
        assert_eq!((k[9], k[10], k[24], k[25]), (333, 334, 666, 667));
        // ddim50: stride 20 gives 50 steps 0, 20, …, 980.
        let k = kept("ddim50", 1000).unwrap();
        assert_eq!((k.len(), k[49]), (50, 980));
        assert_eq!(kept("", 7).unwrap(), (0..7).collect::<Vec<_>>());
        for bad in ["ddim7x", "ddim999", "1001", "a,b"] {
            assert!(kept(bad, 1000).unwrap_err().to_string().contains("timestep_respacing"), "{bad}");
        }
    }

    #[test]
    fn guided_flags_map_heads_by_width_resblock_resampling_and_no_timestep_rescaling() {
        let f = Flags::parse(
            "--image_size 16 --channel_mult 1,2 --num_channels 32 --num_head_channels 32 --resblock_updown True \
             --use_new_attention_order True --class_cond True --learn_sigma True --attention_resolutions 8",
            Family::Guided,
        )
        .unwrap();
        let c = f.unet_config().unwrap();
        assert_eq!((c.ch_mult.clone(), c.attn_resolutions.clone()), (vec![1, 2], vec![8]));
        assert_eq!((c.attn_heads, c.attn_heads_up), (AttnHeads::Width(32), None));
        assert_eq!((c.downsample, c.upsample), (Resample::ResBlock, Resample::ResBlock));
        assert_eq!((c.num_classes, c.out_channels), (Some(1000), 6));
        assert!(f.new_attention_order());
        let d = f.diffusion_config().unwrap();
        assert_eq!(
            (d.convention, d.variance_type, d.loss),
            (Convention::GuidedDiffusion, VarianceType::LearnedRange, LossType::Hybrid)
        );
        for (flags, needle) in [
            ("--image_size 32", "--channel_mult"),
            ("--image_size 512", "fractional"),
            ("--image_size 16 --channel_mult 2,4", "first multiplier"),
            ("--image_size 16 --channel_mult 1,x", "positive integers"),
            ("--noise_schedule sqrt", "linear and cosine"),
        ] {
            let f = Flags::parse(flags, Family::Guided).unwrap();
            let e = f
                .unet_config()
                .map(|_| ())
                .and_then(|_| f.diffusion_config().map(|_| ()))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{flags}: {e}");
        }
    }
}

#[cfg(test)]
mod hostile {
    use super::*;
    use proptest::prelude::*;

    /// Words a hostile or careless flag string is made of.
    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "--image_size",
                "--num_channels",
                "--num_res_blocks",
                "--num_heads",
                "--num_heads_upsample",
                "--num_head_channels",
                "--attention_resolutions",
                "--channel_mult",
                "--learn_sigma",
                "--class_cond",
                "--diffusion_steps",
                "--noise_schedule",
                "--timestep_respacing",
                "--resblock_updown",
                "--use_scale_shift_norm",
                "--dropout",
                "--num",
                "--",
                "--=",
            ])
            .prop_map(String::from),
            prop::sample::select(vec![
                "0",
                "1",
                "-1",
                "2",
                "8",
                "16",
                "32",
                "64",
                "True",
                "false",
                "ddim0",
                "ddim3",
                "1,0",
                "4294967296",
                "18446744073709551616",
                "-9223372036854775808",
                "nan",
                "1e308",
                ",",
                "cosine",
                "'",
                "\"\"",
                "1,2,2,2",
            ])
            .prop_map(String::from),
            "[ -~]{0,8}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        /// Any flag string is parsed, mapped and respaced without a panic or an absurd
        /// allocation: an error or a configuration that validates.
        #[test]
        fn any_flag_string_is_an_error_or_a_valid_model(words in prop::collection::vec(word(), 0..12), guided in any::<bool>()) {
            let family = if guided { Family::Guided } else { Family::Improved };
            if let Ok(f) = Flags::parse(&words.join(" "), family) {
                if let Ok(c) = f.unet_config() {
                    prop_assert!(c.validate().is_ok());
                    prop_assert!(c.num_params() <= UNetConfig::MAX_PARAMS);
                }
                if let Ok(d) = f.diffusion_config() {
                    if let Ok(kept) = f.kept_timesteps(d.timesteps) {
                        prop_assert!(kept.windows(2).all(|w| w[0] < w[1]) && kept.iter().all(|&k| k < d.timesteps));
                    }
                }
            }
        }
    }
}
