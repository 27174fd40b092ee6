//! `ddpm demo`: the README's main job. Trains on the embedded MNIST within a time budget, then
//! samples a grid of new digits with the trajectory strip. The recipe is the one chosen by
//! measurement for short CPU runs (docs/demo.md says what was tried).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use ddpm::data::Split;
use ddpm::diffusion::{BetaSchedule, Convention};

use super::common::{parse_minutes, set_threads, DeviceArg, DeviceArgs};
use super::sample::{sample_to_dir, SampleArgs};
use super::sampling::SamplerArgs;
use super::score::score_mnist_folder;
use super::train::{
    install_signal_handlers, signal_name, train, LossArg, LrDecayArg, MeanArg, PresetArg, TimestepArg,
    TrainArgs, VarianceArg,
};
use ddpm::diffusion::samplers::SamplerKind;

/// `ddpm demo` arguments.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Output directory (checkpoint, metrics.csv, loss.png, samples/).
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
    /// Training time budget in minutes (sampling and scoring 256 digits takes about a quarter
    /// of a minute more on 2 cores).
    #[arg(long, default_value_t = DEMO_MINUTES, value_parser = parse_minutes)]
    pub minutes: f64,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Continue an interrupted demo from its checkpoint.
    #[arg(long)]
    pub resume: bool,
}

/// Training minutes of the demo.
pub const DEMO_MINUTES: f64 = 15.0;

/// Digits the demo draws and scores.
pub const DEMO_SAMPLES: usize = 256;

/// `ddpm demo`.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    if super::common::launched_size().is_some_and(|p| p != 1) {
        bail!(
            "the demo runs in one process; to share training over MPI ranks use \
             `mpirun -n P ddpm train ...` (docs/distributed.md)"
        );
    }
    set_threads(args.threads)?;
    let start = Instant::now();
    let train_args = TrainArgs {
        data: None,
        split: Split::Train,
        image_size: None,
        channels: None,
        class_cond: false,
        out: args.out.clone(),
        resume: args.resume,
        preset: PresetArg::Small,
        ch: None,
        ch_mult: None,
        num_res_blocks: None,
        attn_res: None,
        gn_groups: None,
        downsample_padding: None,
        embedding_order: None,
        dropout: None,
        heads: None,
        head_width: None,
        scale_shift: false,
        resblock_updown: false,
        steps: None,
        minutes: Some(args.minutes),
        batch: 32,
        seed: args.seed,
        threads: args.threads,
        device: DeviceArgs { device: DeviceArg::Cpu },
        lr: 2e-3,
        warmup: 100,
        grad_clip: 1.0,
        ema_decay: 0.999,
        no_ema_warmup: false,
        ema_sigma_rel: None,
        lr_decay: LrDecayArg::None,
        lr_decay_steps: None,
        min_snr_gamma: None,
        random_flip: false,
        schedule: BetaSchedule::Linear,
        timesteps: 1000,
        convention: Convention::Ho2020,
        // v-prediction: at equal steps it scores like ε-prediction given twice the steps
        // (docs/demo.md).
        mean_type: MeanArg::V,
        variance: VarianceArg::FixedLarge,
        loss: LossArg::Simple,
        timestep_sampling: TimestepArg::Uniform,
        checkpoint_every: 250,
        sample_every: 0,
        sample_count: 0,
        sample_steps: 50,
        max_bad_steps: 3,
        score_every: 0,
        score_samples: 256,
        scorer: None,
        allow_different_data: false,
    };
    let stop = install_signal_handlers()?;
    let outcome = train(&train_args, &[], &stop).context("demo training")?;
    if let Some(sig) = outcome.signal {
        say!(
            "stopped by {} at step {} after saving; continue with `ddpm demo --resume --out {}`",
            signal_name(sig),
            outcome.steps,
            args.out.display()
        );
        std::process::exit(128 + sig);
    }
    let sample_args = SampleArgs {
        checkpoint: outcome.checkpoint,
        class: None,
        num: DEMO_SAMPLES,
        batch: 256,
        // DPM-Solver++(2M)-SDE with 20 steps: the statistics of 1000 ancestral steps at 1/50 of
        // the cost, and the best score of the stochastic samplers at 20 steps (docs/demo.md).
        sampling: SamplerArgs {
            sampler: SamplerKind::DpmPlusPlus2MSde,
            steps: Some(20),
            ..SamplerArgs::ancestral()
        },
        seed: args.seed,
        out: args.out.join("samples"),
        no_ema: false,
        no_clip: false,
        trajectory: true,
        trajectory_frames: 10,
        grid_only: false,
        threads: args.threads,
        device: DeviceArgs { device: DeviceArg::Cpu },
    };
    // Cannot be None: without `distributed` the one process is rank 0 and writes the files.
    let grid = sample_to_dir(&sample_args, false)
        .context("demo sampling")?
        .expect("a single process writes the samples");
    let report = score_mnist_folder(&sample_args.out).context("scoring the demo's samples")?;
    let json = serde_json::to_string_pretty(&report.to_json())?;
    let score_path = sample_args.out.join("score.json");
    ddpm::files::write_atomic(&score_path, json.as_bytes())?;
    let (s, f) = (&report.samples, &report.floor);
    say!(
        "score of the {} digits (docs/score.md): {:.1}% classified with ≥ 0.9 confidence (real digits: {:.1}%), \
         class entropy {:.3} nats (uniform: 2.303), FD {:.1} (real digits: {:.1}); in {}",
        report.n,
        100.0 * s.frac_conf90,
        100.0 * f.frac_conf90,
        s.class_entropy,
        s.fd,
        f.fd,
        score_path.display()
    );
    say!(
        "done in {:.1} min: samples {} (and one PNG per image beside it), trajectory {}, loss curve {}",
        start.elapsed().as_secs_f64() / 60.0,
        grid.display(),
        args.out.join("samples/trajectory.png").display(),
        args.out.join("loss.png").display()
    );
    Ok(())
}
