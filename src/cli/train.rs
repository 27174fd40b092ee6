//! `ddpm train`: train a U-Net on a dataset, with checkpoints, metrics, plots and samples.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use ddpm::data::Split;
use ddpm::diffusion::{BetaSchedule, Convention, LossType, MeanType, TimestepSampling, VarianceType};
use ddpm::io::checkpoint::{self, Checkpoint};
use ddpm::nn::{DownsamplePadding, EmbeddingOrder, Preset, UNetConfig};
use ddpm::sample::{sample, SampleConfig, Sampler};
use ddpm::train::{DiffusionConfig, OptimConfig, TrainConfig, Trainer};

use super::common::{
    load_data, parse_list, progress_bar, report_gpu_use, select_device, set_threads, DeviceArgs, SizeList,
    CHECKPOINT,
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
    /// Output directory: checkpoint, metrics.csv, loss.png, samples/.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the run in --out from its checkpoint (same data; architecture and recipe come
    /// from the checkpoint).
    #[arg(long)]
    pub resume: bool,
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
    /// Stop after this many steps in total (counting steps before a resume).
    #[arg(long, conflicts_with = "minutes")]
    pub steps: Option<u64>,
    /// Stop after this many minutes of this invocation (a checkpoint is written at the end).
    #[arg(long)]
    pub minutes: Option<f64>,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
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
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// EMA decay of the weights used for sampling.
    #[arg(long, default_value_t = 0.9999)]
    pub ema_decay: f64,
    /// Use the EMA decay as given from the first step (no (1+k)/(10+k) warm-up).
    #[arg(long)]
    pub no_ema_warmup: bool,
    /// Random horizontal flips (off for digits).
    #[arg(long)]
    pub random_flip: bool,
    /// β schedule: linear, cosine, quadratic, sigmoid, constant, or file:PATH.
    #[arg(long, default_value = "linear")]
    pub schedule: BetaSchedule,
    /// Diffusion steps T.
    #[arg(long, default_value_t = 1000)]
    pub timesteps: usize,
    /// Conventions where references disagree: ho2020, improved-diffusion, diffusers.
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
    /// Write a checkpoint every N steps (and always at the end).
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: u64,
    /// Write a grid of samples (EMA weights, DDIM) every N steps; 0 for only at the end.
    #[arg(long, default_value_t = 0)]
    pub sample_every: u64,
    /// Images in the periodic sample grids (0 for none).
    #[arg(long, default_value_t = 16)]
    pub sample_count: usize,
    /// DDIM steps for the periodic sample grids.
    #[arg(long, default_value_t = 50)]
    pub sample_steps: usize,
}

impl TrainArgs {
    fn config(&self, channels: usize, resolution: usize) -> TrainConfig {
        let variance = match self.variance {
            VarianceArg::FixedSmall => VarianceType::FixedSmall,
            VarianceArg::FixedLarge => VarianceType::FixedLarge,
            VarianceArg::Learned => VarianceType::Learned,
            VarianceArg::LearnedRange => VarianceType::LearnedRange,
        };
        let mut unet: UNetConfig = Preset::from(self.preset).config(channels, resolution);
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
            },
            optim: OptimConfig {
                lr: self.lr,
                warmup_steps: self.warmup,
                grad_clip: (self.grad_clip > 0.0).then_some(self.grad_clip),
                ema_decay: self.ema_decay,
                ema_warmup: !self.no_ema_warmup,
                ..OptimConfig::default()
            },
            batch_size: self.batch,
            random_flip: self.random_flip,
            seed: self.seed,
        }
    }
}

/// What a finished (or interrupted) run reports.
pub struct TrainOutcome {
    /// The checkpoint written last.
    pub checkpoint: PathBuf,
    /// Steps taken in total.
    pub steps: u64,
    /// True when Ctrl-C stopped the run.
    pub interrupted: bool,
}

/// Set by the Ctrl-C handler; checked between steps.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn install_ctrlc() {
    // A second registration (demo runs train once) is harmless to ignore.
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without saving");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: finishing this step, saving a checkpoint, then exiting (Ctrl-C again to abort)");
    });
}

/// `ddpm train`.
pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    select_device(args.device)?;
    let outcome = train(&args)?;
    report_gpu_use();
    if outcome.interrupted {
        eprintln!("interrupted at step {}; resume with the same command plus --resume", outcome.steps);
        std::process::exit(130);
    }
    Ok(())
}

/// Trains per `args`; the demo calls this too.
pub fn train(args: &TrainArgs) -> anyhow::Result<TrainOutcome> {
    if args.steps.is_none() && args.minutes.is_none() {
        bail!("say how long to train: --steps N or --minutes M");
    }
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let ckpt_path = args.out.join(CHECKPOINT);
    let data = Arc::new(load_data(args.data.as_deref(), args.split, args.image_size, args.channels)?);
    let mut trainer = if args.resume {
        let ck = Checkpoint::load(&ckpt_path)
            .with_context(|| format!("cannot resume from {}", ckpt_path.display()))?;
        ck.into_trainer(&ckpt_path, Arc::clone(&data))
            .with_context(|| format!("cannot resume from {}", ckpt_path.display()))?
    } else {
        if ckpt_path.exists() {
            bail!(
                "{} already exists: pass --resume to continue that run, or choose another --out",
                ckpt_path.display()
            );
        }
        let [_, c, h, w] = data.shape();
        if h != w {
            bail!(
                "{}: images are {h}x{w}; the U-Net needs square images (use --image-size)",
                data.source().display()
            );
        }
        Trainer::new(args.config(c, h), Arc::clone(&data)).context("cannot start training")?
    };
    let cfg = trainer.config.clone();
    eprintln!(
        "training on {} ({} images of {}x{}x{}), {} parameters, batch {}, T = {}",
        data.source().display(),
        data.len(),
        cfg.unet.in_channels,
        cfg.unet.resolution,
        cfg.unet.resolution,
        trainer.params.num_scalars(),
        cfg.batch_size,
        cfg.diffusion.timesteps
    );
    let metrics_path = args.out.join("metrics.csv");
    let mut history = prepare_metrics(&metrics_path, trainer.step)?;
    let mut metrics = OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;

    install_ctrlc();
    let start = Instant::now();
    let budget = args.minutes.map(|m| Duration::from_secs_f64(m * 60.0));
    let target = args.steps;
    let bar = match target {
        Some(n) => progress_bar(n, "train"),
        None => progress_bar(budget.map(|b| b.as_secs()).unwrap_or(0), "train (s)"),
    };
    bar.set_position(if target.is_some() { trainer.step } else { 0 });
    let mut interrupted = false;
    let mut last = Instant::now();
    let mut ema_loss: Option<f64> = None;
    loop {
        if target.is_some_and(|n| trainer.step >= n) || budget.is_some_and(|b| start.elapsed() >= b) {
            break;
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let stats = trainer.step();
        let dt = last.elapsed().as_secs_f64();
        last = Instant::now();
        let ips = cfg.batch_size as f64 / dt.max(1e-9);
        writeln!(
            metrics,
            "{},{:.6},{:.6},{:.6e},{:.2},{:.1}",
            stats.step,
            stats.loss,
            stats.grad_norm,
            stats.lr,
            ips,
            start.elapsed().as_secs_f64()
        )
        .with_context(|| format!("writing {}", metrics_path.display()))?;
        history.push((stats.step, stats.loss));
        let smooth = ema_loss.map_or(stats.loss, |e| 0.98 * e + 0.02 * stats.loss);
        ema_loss = Some(smooth);
        bar.set_message(format!("step {} loss {smooth:.4} {ips:.1} img/s", stats.step));
        match target {
            Some(_) => bar.set_position(trainer.step),
            None => bar.set_position(start.elapsed().as_secs()),
        }
        if stats.step % args.checkpoint_every.max(1) == 0 {
            save(&ckpt_path, &trainer, &args.out, &history)?;
        }
        if args.sample_every > 0 && stats.step % args.sample_every == 0 && args.sample_count > 0 {
            let path = args.out.join("samples").join(format!("step_{:06}.png", stats.step));
            sample_grid(&trainer, args.sample_count, args.sample_steps, &path)?;
        }
    }
    bar.finish_and_clear();
    save(&ckpt_path, &trainer, &args.out, &history)?;
    if args.sample_count > 0 && !interrupted {
        let path = args.out.join("samples").join(format!("step_{:06}.png", trainer.step));
        sample_grid(&trainer, args.sample_count, args.sample_steps, &path)?;
        eprintln!("wrote {}", path.display());
    }
    eprintln!(
        "step {} in {:.1} min; checkpoint {}, metrics {}, loss curve {}",
        trainer.step,
        start.elapsed().as_secs_f64() / 60.0,
        ckpt_path.display(),
        metrics_path.display(),
        args.out.join("loss.png").display()
    );
    Ok(TrainOutcome { checkpoint: ckpt_path, steps: trainer.step, interrupted })
}

/// Keeps the rows of metrics.csv up to `step` (a run killed after its last checkpoint wrote rows
/// that the resumed run will write again) and returns their (step, loss).
fn prepare_metrics(path: &Path, step: u64) -> anyhow::Result<Vec<(u64, f64)>> {
    const HEADER: &str = "step,loss,grad_norm,lr,images_per_sec,elapsed_s";
    let mut kept = vec![HEADER.to_string()];
    let mut history = vec![];
    if step > 0 {
        if let Ok(text) = fs::read_to_string(path) {
            for line in text.lines().skip(1) {
                let mut f = line.split(',');
                let (Some(s), Some(l)) = (f.next(), f.next()) else { continue };
                let (Ok(s), Ok(l)) = (s.parse::<u64>(), l.parse::<f64>()) else { continue };
                if s <= step {
                    kept.push(line.to_string());
                    history.push((s, l));
                }
            }
        }
    }
    let mut text = kept.join("\n");
    text.push('\n');
    ddpm::io::write_atomic(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(history)
}

fn save(ckpt: &Path, trainer: &Trainer, out: &Path, history: &[(u64, f64)]) -> anyhow::Result<()> {
    checkpoint::save(ckpt, trainer).with_context(|| format!("writing checkpoint {}", ckpt.display()))?;
    if history.len() >= 2 {
        let (steps, losses): (Vec<u64>, Vec<f64>) = history.iter().copied().unzip();
        let plot = out.join("loss.png");
        ddpm::io::plot::save_loss_curve(&plot, &steps, &losses)
            .with_context(|| format!("writing {}", plot.display()))?;
    }
    Ok(())
}

/// A grid of `n` samples from the EMA weights with DDIM (η = 0), seeded by the step.
fn sample_grid(trainer: &Trainer, n: usize, steps: usize, path: &Path) -> anyhow::Result<()> {
    let cfg = SampleConfig {
        sampler: Sampler::Ddim { eta: 0.0 },
        steps: Some(steps.min(trainer.config.diffusion.timesteps)),
        clip_x0: true,
        trajectory_frames: 0,
    };
    let mut rng = ddpm::rng_from_seed(trainer.step);
    let param = trainer.config.diffusion.parameterization();
    let s = sample(
        &trainer.net,
        &trainer.ema_params(),
        trainer.schedule(),
        &param,
        n,
        &cfg,
        &mut rng,
        |_, _| {},
    )?;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let cols = (n as f64).sqrt().ceil() as usize;
    let view = s.images.view().into_dimensionality::<ndarray::Ix4>().expect("samples are [N, C, H, W]");
    ddpm::io::png::save_grid(path, view, cols).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
