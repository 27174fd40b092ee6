//! `ddpm train`: train a U-Net on a dataset, with checkpoints, metrics, plots and samples.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use ddpm::data::{DataSpec, Split};
use ddpm::diffusion::{
    BetaSchedule, Convention, LossType, LossWeighting, MeanType, TimestepSampling, VarianceType,
};
use ddpm::nn::{
    AttnHeads, DownsamplePadding, EmbeddingOrder, Preset, Resample, TimeConditioning, UNetConfig,
};
use ddpm::score::Scorer;
use ddpm::train::run::{
    Observer, Progress, ResumeData, Run, RunEvent, RunOptions, StopFlag, StopReason, LOSS_PLOT, METRICS,
};
use ddpm::train::{DecayShape, DiffusionConfig, LrDecay, OptimConfig, StepStats, TrainConfig, Trainer};
use indicatif::ProgressBar;

use super::common::{
    count, load_data, parse_list, parse_minutes, process_group, progress_bar, report_gpu_use, select_device,
    set_threads, DeviceArgs, SizeList,
};

/// Network presets.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PresetArg {
    /// The PyTorch peer's `mnist-small` (1.11M parameters at 1x28x28).
    Mnist,
    /// The paper's CIFAR-10 model (35.7M parameters at 3x32x32).
    Cifar10,
    /// A small network for tests and quick trials (8x8 inputs in the tests).
    Tiny,
    /// The demo's network: `mnist` at half width, attention only in the middle (267k parameters).
    Small,
}

impl From<PresetArg> for Preset {
    fn from(p: PresetArg) -> Self {
        match p {
            PresetArg::Mnist => Preset::Mnist,
            PresetArg::Cifar10 => Preset::Cifar10,
            PresetArg::Tiny => Preset::Tiny,
            PresetArg::Small => Preset::Small,
        }
    }
}

/// Downsampling padding conventions.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DownsampleArg {
    /// 0 before, 1 after (TensorFlow "SAME" at stride 2).
    TfSame,
    /// 1 on every side.
    Symmetric,
}

/// Timestep embedding orders.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EmbeddingArg {
    /// [sin, cos].
    SinCos,
    /// [cos, sin].
    CosSin,
}

/// What the network predicts.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum MeanArg {
    /// The noise ε (Ho et al.).
    Eps,
    /// The clean image x_0.
    X0,
    /// v = √ᾱ ε − √(1−ᾱ) x_0.
    V,
    /// The posterior mean μ̃ (the original code's `xprev`).
    PrevX,
}

/// The reverse-process variance.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum VarianceArg {
    /// σ² = β̃ (posterior variance).
    FixedSmall,
    /// σ² = β.
    FixedLarge,
    /// Learned log σ².
    Learned,
    /// Learned interpolation between log β̃ and log β (Nichol & Dhariwal).
    LearnedRange,
}

/// The learning rate after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LrDecayArg {
    /// Constant at --lr.
    None,
    /// Straight down to 0 at --lr-decay-steps.
    Linear,
    /// Half a cosine period down to 0 at --lr-decay-steps.
    Cosine,
}

/// The objective.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LossArg {
    /// L_simple (Ho et al. Eq. 14); fixed variances.
    Simple,
    /// L_simple + L_t with the mean's gradient stopped (learned variances; N&D's L_hybrid at T = 1000).
    Hybrid,
    /// L_simple + (T/1000)·L_t: N&D's L_hybrid (λ = 0.001) for any T (improved-diffusion RESCALED_MSE).
    RescaledHybrid,
    /// The bound term L_t alone, in bits/dim.
    Vlb,
    /// T·L_t, the one-sample estimate of the whole bound.
    RescaledVlb,
}

/// How t is drawn during training.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TimestepArg {
    /// Uniform on 0..T−1.
    Uniform,
    /// Importance sampling by loss history (Nichol & Dhariwal Eq. 18).
    Importance,
}

/// `ddpm train` arguments.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Training images: a folder of PNG/JPEG, an IDX file (or a folder with the MNIST file names),
    /// or CIFAR-10-style binary batches. Default: the MNIST copy embedded in ddpm.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Dataset split to train on, for folders holding both.
    #[arg(long, default_value = "train")]
    pub split: Split,
    /// Resize/crop image folders to this size (required for image folders).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Channels to load image folders as (1 = grayscale, 3 = RGB).
    #[arg(long)]
    pub channels: Option<usize>,
    /// Class-conditional training: load each image's class label (the IDX *-labels-idx1-ubyte
    /// file next to the images, the CIFAR-10 label bytes, or the embedded MNIST's labels) and
    /// condition the network on it, with as many classes as the largest label + 1. Sample grids
    /// then show one class per row; sample with `ddpm sample --class N`.
    #[arg(long)]
    pub class_cond: bool,
    /// Output directory: checkpoint.safetensors (and the one before it,
    /// checkpoint.prev.safetensors), metrics.csv, loss.png, samples/; locked while a run uses it.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its checkpoint: architecture, recipe and data come from
    /// the checkpoint (without --data, the data it recorded is reloaded and checked).
    #[arg(long)]
    pub resume: bool,
    /// With --resume and --data: train on this data even if it is not the data the checkpoint
    /// was trained on (by default that is refused).
    #[arg(long, requires = "data")]
    pub allow_different_data: bool,
    /// Network architecture.
    #[arg(long, value_enum, default_value = "mnist")]
    pub preset: PresetArg,
    /// Override the preset's base width.
    #[arg(long)]
    pub ch: Option<usize>,
    /// Override the preset's width multipliers, e.g. 1,2,2.
    #[arg(long, value_parser = parse_list)]
    pub ch_mult: Option<SizeList>,
    /// Override the residual blocks per level.
    #[arg(long)]
    pub num_res_blocks: Option<usize>,
    /// Override the attention resolutions, e.g. 14 (empty for none besides the middle block).
    #[arg(long, value_parser = parse_list)]
    pub attn_res: Option<SizeList>,
    /// Downsampling padding: tf-same (Ho et al.'s code, the default) or symmetric
    /// (improved-diffusion, diffusers with downsample_padding=1).
    #[arg(long)]
    pub downsample_padding: Option<DownsampleArg>,
    /// Timestep embedding order: sin-cos (Ho et al., the default) or cos-sin (improved-diffusion,
    /// diffusers with flip_sin_to_cos=True).
    #[arg(long)]
    pub embedding_order: Option<EmbeddingArg>,
    /// Group norm uses min(this, channels) groups (the preset's 32 by default).
    #[arg(long)]
    pub gn_groups: Option<usize>,
    /// Override the dropout rate.
    #[arg(long)]
    pub dropout: Option<f32>,
    /// Attention heads per block (improved-diffusion's --num_heads; the presets have 1).
    #[arg(long, value_parser = count(1..=65_536), conflicts_with = "head_width")]
    pub heads: Option<usize>,
    /// Attention heads of this many channels each (guided-diffusion's --num_head_channels,
    /// diffusers' attention_head_dim).
    #[arg(long, value_parser = count(1..=65_536))]
    pub head_width: Option<usize>,
    /// Scale-shift ("FiLM") timestep conditioning in the residual blocks: norm2(h)·(1 + s) + b
    /// (improved-diffusion's --use_scale_shift_norm, diffusers' "scale_shift").
    #[arg(long)]
    pub scale_shift: bool,
    /// Resample between levels with residual blocks (2x2 average pool down, nearest up) instead
    /// of convolutions (guided-diffusion's --resblock_updown, diffusers' "resnet").
    #[arg(long)]
    pub resblock_updown: bool,
    /// Stop after this many steps in total (counting steps before a resume).
    #[arg(long, conflicts_with = "minutes")]
    pub steps: Option<u64>,
    /// Stop after this many minutes of this invocation (a checkpoint is written at the end).
    #[arg(long, value_parser = parse_minutes)]
    pub minutes: Option<f64>,
    /// Images per step (1 to 65536, and at most the number of training images).
    #[arg(long, default_value_t = 64, value_parser = count(1..=65_536))]
    pub batch: usize,
    /// Seed of the weights, timesteps, noise, dropout and batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// Linear learning-rate warm-up steps.
    #[arg(long, default_value_t = 5000)]
    pub warmup: u64,
    /// Clip gradients to this global norm (0 disables).
    #[arg(long, default_value_t = 1.0, value_parser = parse_grad_clip)]
    pub grad_clip: f64,
    /// EMA decay of the weights used for sampling.
    #[arg(long, default_value_t = 0.9999)]
    pub ema_decay: f64,
    /// Use the EMA decay as given from the first step (no (1+k)/(10+k) warm-up).
    #[arg(long)]
    pub no_ema_warmup: bool,
    /// EDM2's power-function EMA (Karras et al. 2024) of relative length σ_rel in (0, 0.2887],
    /// e.g. 0.05 or 0.10: the average spans that fraction of the run, however long it gets.
    /// Replaces --ema-decay.
    #[arg(long, value_parser = parse_sigma_rel, conflicts_with_all = ["ema_decay", "no_ema_warmup"])]
    pub ema_sigma_rel: Option<f64>,
    /// Learning rate after the warm-up: constant (none), or falling to 0 at --lr-decay-steps.
    #[arg(long, value_enum, default_value = "none")]
    pub lr_decay: LrDecayArg,
    /// The step at which --lr-decay reaches 0 (default: --steps).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub lr_decay_steps: Option<u64>,
    /// Min-SNR-γ loss weighting (Hang et al. 2023; they use γ = 5): each example's error on x_0
    /// weighted by min(SNR(t), γ), whatever --mean-type predicts. Simple loss only.
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// Random horizontal flips (off for digits).
    #[arg(long)]
    pub random_flip: bool,
    /// β schedule: linear, cosine, quadratic, sigmoid, constant, or file:PATH.
    #[arg(long, default_value = "linear")]
    pub schedule: BetaSchedule,
    /// Diffusion steps T (2 to 1000000).
    #[arg(long, default_value_t = 1000, value_parser = count(2..=1_000_000))]
    pub timesteps: usize,
    /// Conventions where references disagree: ho2020, improved-diffusion, guided-diffusion, diffusers.
    #[arg(long, default_value = "ho2020")]
    pub convention: Convention,
    /// What the network predicts.
    #[arg(long, value_enum, default_value = "eps")]
    pub mean_type: MeanArg,
    /// Reverse-process variance.
    #[arg(long, value_enum, default_value = "fixed-large")]
    pub variance: VarianceArg,
    /// Training objective.
    #[arg(long, value_enum, default_value = "simple")]
    pub loss: LossArg,
    /// How t is drawn.
    #[arg(long, value_enum, default_value = "uniform")]
    pub timestep_sampling: TimestepArg,
    /// Write a checkpoint every N steps (and always at the end); the previous one is kept as
    /// checkpoint.prev.safetensors.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_every: u64,
    /// Write a grid of samples (EMA weights, DDIM) every N steps; 0 for only at the end.
    #[arg(long, default_value_t = 0)]
    pub sample_every: u64,
    /// Images in the periodic sample grids (0 for none; at most 4096). With --class-cond, one row
    /// per class (classes 0..min(K, N)), the count rounded up to fill the rows.
    #[arg(long, default_value_t = 16, value_parser = count(0..=4096))]
    pub sample_count: usize,
    /// DDIM steps for the periodic sample grids (at least 2; capped at T).
    #[arg(long, default_value_t = 50, value_parser = count(2..=1_000_000))]
    pub sample_steps: usize,
    /// Every N steps, draw --score-samples images with the EMA weights (DPM-Solver++(2M)-SDE, 20
    /// steps) and score them against the training images with `ddpm score`'s figures: FD, KID,
    /// precision, recall, class entropy and the confident fraction go into metrics.csv and
    /// score.png. 0: never.
    #[arg(long, default_value_t = 0)]
    pub score_every: u64,
    /// Images drawn for each --score-every score (4 to 10000).
    #[arg(long, default_value_t = 256, value_parser = count(4..=10_000))]
    pub score_samples: usize,
    /// The scorer of --score-every (from `ddpm score --train-scorer`). Default: the shipped MNIST
    /// scorer, for 1×28×28 images.
    #[arg(long, requires = "score_every")]
    pub scorer: Option<PathBuf>,
    /// Stop (exit code 3) after this many steps in a row whose loss or gradient norm is NaN or
    /// infinite; each is skipped without touching the weights, and nothing is saved after the
    /// last good checkpoint.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_bad_steps: u64,
}

impl TrainArgs {
    /// The configuration for data of `channels` × `resolution`², conditioned on `num_classes`
    /// classes if given.
    fn config(&self, channels: usize, resolution: usize, num_classes: Option<usize>) -> TrainConfig {
        let variance = match self.variance {
            VarianceArg::FixedSmall => VarianceType::FixedSmall,
            VarianceArg::FixedLarge => VarianceType::FixedLarge,
            VarianceArg::Learned => VarianceType::Learned,
            VarianceArg::LearnedRange => VarianceType::LearnedRange,
        };
        let mut unet: UNetConfig = Preset::from(self.preset).config(channels, resolution);
        unet.num_classes = num_classes;
        if variance.is_learned() {
            unet.out_channels = 2 * channels;
        }
        if let Some(ch) = self.ch {
            unet.ch = ch;
        }
        if let Some(m) = &self.ch_mult {
            unet.ch_mult = m.0.clone();
        }
        if let Some(n) = self.num_res_blocks {
            unet.num_res_blocks = n;
        }
        if let Some(a) = &self.attn_res {
            unet.attn_resolutions = a.0.clone();
        }
        if let Some(d) = self.downsample_padding {
            unet.downsample_padding = match d {
                DownsampleArg::TfSame => DownsamplePadding::TfSame,
                DownsampleArg::Symmetric => DownsamplePadding::Symmetric,
            };
        }
        if let Some(e) = self.embedding_order {
            unet.embedding_order = match e {
                EmbeddingArg::SinCos => EmbeddingOrder::SinCos,
                EmbeddingArg::CosSin => EmbeddingOrder::CosSin,
            };
        }
        if let Some(g) = self.gn_groups {
            unet.gn_groups = g;
        }
        if let Some(d) = self.dropout {
            unet.dropout = d;
        }
        if let Some(h) = self.heads {
            unet.attn_heads = AttnHeads::Count(h);
        }
        if let Some(w) = self.head_width {
            unet.attn_heads = AttnHeads::Width(w);
        }
        if self.scale_shift {
            unet.time_conditioning = TimeConditioning::ScaleShift;
        }
        if self.resblock_updown {
            unet.downsample = Resample::ResBlock;
            unet.upsample = Resample::ResBlock;
        }
        TrainConfig {
            unet,
            diffusion: DiffusionConfig {
                schedule: self.schedule.clone(),
                timesteps: self.timesteps,
                convention: self.convention,
                mean_type: match self.mean_type {
                    MeanArg::Eps => MeanType::Eps,
                    MeanArg::X0 => MeanType::X0,
                    MeanArg::V => MeanType::V,
                    MeanArg::PrevX => MeanType::PrevX,
                },
                variance_type: variance,
                loss: match self.loss {
                    LossArg::Simple => LossType::Simple,
                    LossArg::Hybrid => LossType::Hybrid,
                    LossArg::RescaledHybrid => LossType::RescaledHybrid,
                    LossArg::Vlb => LossType::Vlb,
                    LossArg::RescaledVlb => LossType::RescaledVlb,
                },
                timestep_sampling: match self.timestep_sampling {
                    TimestepArg::Uniform => TimestepSampling::Uniform,
                    TimestepArg::Importance => TimestepSampling::Importance,
                },
                loss_weighting: self
                    .min_snr_gamma
                    .map_or(LossWeighting::Uniform, |gamma| LossWeighting::MinSnr { gamma }),
            },
            optim: OptimConfig {
                lr: self.lr,
                warmup_steps: self.warmup,
                grad_clip: (self.grad_clip > 0.0).then_some(self.grad_clip),
                ema_decay: self.ema_decay,
                ema_warmup: !self.no_ema_warmup,
                ema_power: self.ema_sigma_rel.and_then(ddpm::nn::power_ema_gamma),
                lr_decay: self.lr_decay_config(),
                ..OptimConfig::default()
            },
            batch_size: self.batch,
            random_flip: self.random_flip,
            seed: self.seed,
            draws: ddpm::config::Draws::Keyed,
        }
    }
}

impl TrainArgs {
    /// The decay the flags ask for; its end defaults to --steps (`train` refuses a decay with
    /// neither).
    fn lr_decay_config(&self) -> Option<LrDecay> {
        let shape = match self.lr_decay {
            LrDecayArg::None => return None,
            LrDecayArg::Linear => DecayShape::Linear,
            LrDecayArg::Cosine => DecayShape::Cosine,
        };
        Some(LrDecay { shape, end_step: self.lr_decay_steps.or(self.steps).unwrap_or(0) })
    }
}

/// Parses `--ema-sigma-rel`: a σ_rel that a power profile with γ ≥ 0 has.
fn parse_sigma_rel(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if ddpm::nn::power_ema_gamma(v).is_none() {
        return Err(format!(
            "{s}: σ_rel must be in (0, {:.4}] (EDM2 uses 0.05 to 0.15)",
            ddpm::nn::MAX_SIGMA_REL
        ));
    }
    Ok(v)
}

/// What a finished (or interrupted) run reports.
pub struct TrainOutcome {
    /// The checkpoint written last.
    pub checkpoint: PathBuf,
    /// Steps taken in total.
    pub steps: u64,
    /// The signal that stopped the run (after saving), if one did.
    pub signal: Option<i32>,
}

/// A second request sooner than this after the first is the same request delivered twice: GNU
/// `timeout` sends SIGTERM to the process and then to its process group, and a terminal's Ctrl-C
/// reaches every process of the foreground group.
const REPEAT_WINDOW: Duration = Duration::from_secs(1);

/// SIGINT, SIGTERM and SIGHUP raise the returned flag (the run finishes its step, saves and
/// stops). A second one, more than [`REPEAT_WINDOW`] after the first, ends the process at once
/// without saving, with 128 + its number. The signals are received on a thread of their own
/// (`signal_hook::iterator`), so the handling itself is ordinary code.
pub fn install_signal_handlers() -> anyhow::Result<StopFlag> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let stop = StopFlag::new();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing the signal handlers")?;
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut first: Option<Instant> = None;
            for sig in signals.forever() {
                match first {
                    None => {
                        first = Some(Instant::now());
                        flag.request(usize::try_from(sig).unwrap_or(1));
                    }
                    Some(t) if t.elapsed() < REPEAT_WINDOW => {}
                    Some(_) => {
                        let _ = writeln!(
                            std::io::stderr(),
                            "\n{} again: exiting at once, without saving",
                            signal_name(sig)
                        );
                        std::process::exit(128 + sig);
                    }
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(stop)
}

/// The name of a signal the handlers catch.
pub fn signal_name(sig: i32) -> &'static str {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    match sig {
        SIGINT => "Ctrl-C (SIGINT)",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "a stop request",
    }
}

/// The ids of the arguments given on the command line itself (not defaults or environment).
pub fn explicit_flags(m: &clap::ArgMatches) -> Vec<String> {
    m.ids()
        .filter(|id| m.value_source(id.as_str()) == Some(clap::parser::ValueSource::CommandLine))
        .map(|id| id.as_str().to_string())
        .collect()
}

/// The part of a configuration that each recipe flag sets, as text to compare: a resume may
/// repeat the original command, but a flag that would change the checkpoint's recipe is refused.
fn recipe_value(flag: &str, c: &TrainConfig) -> Option<String> {
    let (u, d, o) = (&c.unet, &c.diffusion, &c.optim);
    Some(match flag {
        // The whole network: repeating the original flags gives the same one.
        "preset" => format!("{u:?}"),
        "ch" => u.ch.to_string(),
        "ch_mult" => format!("{:?}", u.ch_mult),
        "num_res_blocks" => u.num_res_blocks.to_string(),
        "attn_res" => format!("{:?}", u.attn_resolutions),
        "downsample_padding" => format!("{:?}", u.downsample_padding),
        "embedding_order" => format!("{:?}", u.embedding_order),
        "gn_groups" => u.gn_groups.to_string(),
        "dropout" => u.dropout.to_string(),
        "heads" | "head_width" => format!("{:?}", u.attn_heads),
        "scale_shift" => format!("{:?}", u.time_conditioning),
        "resblock_updown" => format!("{:?}", (u.downsample, u.upsample)),
        "class_cond" => u.num_classes.is_some().to_string(),
        "batch" => c.batch_size.to_string(),
        "seed" => c.seed.to_string(),
        "random_flip" => c.random_flip.to_string(),
        "lr" => o.lr.to_string(),
        "warmup" => o.warmup_steps.to_string(),
        "grad_clip" => o.grad_clip.map_or_else(|| "0 (off)".into(), |c| c.to_string()),
        "ema_decay" => o.ema_decay.to_string(),
        "no_ema_warmup" => (!o.ema_warmup).to_string(),
        "ema_sigma_rel" => format!("{:?}", o.ema_power),
        "lr_decay" | "lr_decay_steps" => format!("{:?}", o.lr_decay),
        "min_snr_gamma" => format!("{:?}", d.loss_weighting),
        // A file schedule is stored as its values; the file itself is never read again.
        "schedule" => match &d.schedule {
            BetaSchedule::File(_) | BetaSchedule::Custom(_) => "a schedule from a file".into(),
            other => other.to_string(),
        },
        "timesteps" => d.timesteps.to_string(),
        "convention" => d.convention.to_string(),
        "mean_type" => format!("{:?}", d.mean_type),
        "variance" => format!("{:?}", d.variance_type),
        "loss" => format!("{:?}", d.loss),
        "timestep_sampling" => format!("{:?}", d.timestep_sampling),
        _ => return None,
    })
}

/// On --resume, the recipe flags given on the command line whose values differ from the
/// checkpoint's (`flag: given vs stored`).
fn changed_recipe(args: &TrainArgs, given: &[String], stored: &TrainConfig) -> Vec<String> {
    // The number of classes comes from the data: a flag can only say whether there are any.
    let classes = if args.class_cond { stored.unet.num_classes.or(Some(1)) } else { stored.unet.num_classes };
    let wanted = args.config(stored.unet.in_channels, stored.unet.resolution, classes);
    given
        .iter()
        .filter_map(|id| {
            let (a, b) = (recipe_value(id, &wanted)?, recipe_value(id, stored)?);
            let flag = id.replace('_', "-");
            (a != b).then(|| match id.as_str() {
                "preset" => format!("--{flag} (a network other than the checkpoint's)"),
                _ => format!("--{flag} ({a}, the checkpoint has {b})"),
            })
        })
        .collect()
}

/// Parses `--grad-clip`: 0 (no clipping) or a finite norm above 0.
fn parse_grad_clip(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !(v == 0.0 || (v.is_finite() && v > 0.0)) {
        return Err(format!("{s}: give 0 (no clipping) or a finite norm above 0"));
    }
    Ok(v)
}

/// `ddpm train`; `given` lists the flags given on the command line.
pub fn run(args: TrainArgs, given: &[String]) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    select_device(args.device)?;
    let stop = install_signal_handlers()?;
    let outcome = train(&args, given, &stop)?;
    report_gpu_use();
    if let Some(sig) = outcome.signal {
        say!(
            "stopped by {} at step {} after saving {}; resume with the same command plus --resume",
            signal_name(sig),
            outcome.steps,
            outcome.checkpoint.display()
        );
        std::process::exit(128 + sig);
    }
    Ok(())
}

/// Trains per `args` until done or `stop` is raised; the demo calls this too. `given` lists the
/// flags given on the command line: on --resume, those that would change the checkpoint's
/// recipe are refused.
pub fn train(args: &TrainArgs, given: &[String], stop: &StopFlag) -> anyhow::Result<TrainOutcome> {
    let options = RunOptions {
        steps: args.steps,
        duration: args.minutes.map(|m| Duration::from_secs_f64(m * 60.0)),
        checkpoint_every: args.checkpoint_every,
        sample_every: args.sample_every,
        sample_count: args.sample_count,
        sample_steps: args.sample_steps,
        max_bad_steps: args.max_bad_steps,
        score_every: args.score_every,
        score_samples: args.score_samples,
    };
    if args.steps.is_none() && args.minutes.is_none() {
        bail!("say how long to train: --steps N or --minutes M");
    }
    if args.lr_decay != LrDecayArg::None && args.lr_decay_steps.is_none() && args.steps.is_none() {
        bail!("--lr-decay needs the step where the rate reaches 0: give --lr-decay-steps N (or --steps N)");
    }
    if let (Some(n), Some(end), false) = (args.steps, args.lr_decay_steps, args.lr_decay == LrDecayArg::None)
    {
        if n > end {
            bail!("--steps {n} goes past --lr-decay-steps {end}, where the learning rate reaches 0; raise --lr-decay-steps");
        }
    }
    let spec = DataSpec {
        path: args.data.clone(),
        split: args.split,
        image_size: args.image_size,
        channels: args.channels,
        labels: args.class_cond,
    };
    let mut run = if args.resume {
        let data = match &args.data {
            None => ResumeData::Recorded,
            Some(_) => ResumeData::Given {
                dataset: Arc::new(load_data(&spec)?),
                spec,
                allow_different: args.allow_different_data,
            },
        };
        let run = Run::resume_in(&args.out, data, options, process_group()?)
            .with_context(|| format!("cannot resume the run in {}", args.out.display()))?;
        let changed = changed_recipe(args, given, run.trainer().config());
        if !changed.is_empty() {
            bail!(
                "{} cannot change when resuming: the architecture and recipe come from the checkpoint; \
                 drop the flag or start a new run in another --out",
                changed.join(", ")
            );
        }
        run
    } else {
        let data = load_data(&spec)?;
        let [_, c, h, w] = data.shape();
        if h != w {
            bail!(
                "{}: images are {h}x{w}; the U-Net needs square images (use --image-size)",
                data.source().display()
            );
        }
        let classes = match (args.class_cond, data.num_classes()) {
            (false, _) => None,
            (true, Some(k)) => Some(k),
            (true, None) => {
                bail!("{}: --class-cond needs class labels and none were loaded", data.source().display())
            }
        };
        Run::create_in(&args.out, args.config(c, h, classes), spec, Arc::new(data), options, process_group()?)
            .with_context(|| format!("cannot start training in {}", args.out.display()))?
    };
    if args.score_every > 0 {
        let scorer = match &args.scorer {
            Some(p) => Scorer::load(p).with_context(|| format!("--scorer: loading {}", p.display()))?,
            None => Scorer::mnist().context("loading the shipped MNIST scorer")?,
        };
        run.enable_scoring(scorer).with_context(|| match &args.scorer {
            Some(p) => format!("--score-every: cannot score with {}", p.display()),
            None => "--score-every: the shipped scorer is for 1x28x28 digits; for other images train one \
                     with `ddpm score --train-scorer` and pass it with --scorer"
                .to_string(),
        })?;
    }
    if let (Some(n), Some(d)) = (args.steps, run.trainer().config().optim.lr_decay) {
        if n > d.end_step {
            bail!(
                "--steps {n} goes past step {}, where this run's learning-rate decay reaches 0 (the checkpoint's \
                 recipe); train a new run with a later --lr-decay-steps",
                d.end_step
            );
        }
    }
    let start = Instant::now();
    let mut observer = BarObserver::new(args);
    let outcome = run.run(stop, &mut observer);
    observer.bar.finish_and_clear();
    let outcome = outcome?;
    if let Some(p) = &outcome.final_samples {
        say!("wrote {}", p.display());
    }
    say!(
        "step {} in {:.1} min{}; checkpoint {}, metrics {}, loss curve {}",
        outcome.steps,
        start.elapsed().as_secs_f64() / 60.0,
        match outcome.skipped_steps {
            0 => String::new(),
            n => format!(" ({n} non-finite steps skipped)"),
        },
        outcome.checkpoint.display(),
        args.out.join(METRICS).display(),
        args.out.join(LOSS_PLOT).display()
    );
    let signal = match outcome.reason {
        StopReason::Requested(code) => Some(i32::try_from(code).unwrap_or(1)),
        StopReason::StepsReached | StopReason::TimeUp => None,
    };
    Ok(TrainOutcome { checkpoint: outcome.checkpoint, steps: outcome.steps, signal })
}

/// Prints a line on stderr above the bar, or plainly when the bar is hidden (stderr is not a
/// terminal: a log file, a batch scheduler), where `ProgressBar::println` would drop it.
fn println_above(bar: &ProgressBar, line: String) {
    bar.suspend(|| say!("{line}"));
}

/// Shows a run on the terminal: a progress bar with the smoothed loss and the rate, and one
/// line per notable event.
struct BarObserver {
    bar: ProgressBar,
    smooth_loss: Option<f64>,
    by_steps: bool,
}

impl BarObserver {
    fn new(args: &TrainArgs) -> Self {
        let bar = match (args.steps, args.minutes) {
            (Some(n), _) => progress_bar(n, "train"),
            (None, m) => progress_bar(m.map_or(0, |m| (m * 60.0) as u64), "train (s)"),
        };
        BarObserver { bar, smooth_loss: None, by_steps: args.steps.is_some() }
    }
}

impl Observer for BarObserver {
    fn started(&mut self, t: &Trainer) {
        let cfg = t.config();
        let data = t.dataset();
        println_above(
            &self.bar,
            format!(
                "training on {} ({} images of {}x{}x{}{}), {} parameters, batch {}, T = {}, from step {}",
                data.source().display(),
                data.len(),
                cfg.unet.in_channels,
                cfg.unet.resolution,
                cfg.unet.resolution,
                cfg.unet.num_classes.map_or_else(String::new, |k| format!(", {k} classes")),
                t.state().params.num_scalars(),
                cfg.batch_size,
                cfg.diffusion.timesteps,
                t.step_count()
            ),
        );
        if self.by_steps {
            self.bar.set_position(t.step_count());
        }
    }

    fn stepped(&mut self, s: &StepStats, p: &Progress) {
        let smooth = self.smooth_loss.map_or(s.loss, |e| 0.98 * e + 0.02 * s.loss);
        self.smooth_loss = Some(smooth);
        self.bar.set_message(format!("step {} loss {smooth:.4} {:.1} img/s", s.step, p.images_per_sec));
        self.bar.set_position(if self.by_steps { s.step } else { p.elapsed.as_secs() });
    }

    fn event(&mut self, e: &RunEvent) {
        match e {
            RunEvent::DataNotice(m) => println_above(&self.bar, format!("note: {m}")),
            RunEvent::Skipped { step, loss, grad_norm, consecutive } => println_above(&self.bar, format!(
                "warning: step {step} skipped: loss {loss}, gradient norm {grad_norm} ({consecutive} in a row); \
                 the weights were not changed"
            )),
            RunEvent::Stopping(sig) => println_above(&self.bar, format!(
                "{}: saving a checkpoint at this step, then exiting (send it again, a second or more later, to exit at once without saving)",
                signal_name(i32::try_from(*sig).unwrap_or(0))
            )),
            RunEvent::Scored { step, score } => println_above(&self.bar, format!(
                "step {step}: FD {:.2}, KID {:.4}, precision {:.3}, recall {:.3}, class entropy {:.3}, {:.1}% confident",
                score.fd, score.kid, score.precision, score.recall, score.class_entropy, 100.0 * score.frac_conf90
            )),
            RunEvent::Saved { .. } | RunEvent::Sampled(_) => {}
        }
    }
}
