//! `ddpm import --diffusers` and `ddpm export --diffusers`: checkpoints to and from diffusers.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use ddpm::interop::diffusers::{self, SchedulerSettings};
use ddpm::io::checkpoint::{self, save_weights};
use ddpm::train::{OptimConfig, TrainConfig};

use super::common::{resolve_checkpoint, CHECKPOINT};

/// `ddpm import` arguments.
#[derive(Args, Debug, Clone)]
pub struct ImportArgs {
    /// A diffusers folder: config.json + diffusion_pytorch_model.safetensors (+ scheduler_config.json),
    /// flat or in unet/ and scheduler/ subfolders, as save_pretrained writes them.
    #[arg(long)]
    pub diffusers: PathBuf,
    /// The run directory to create; the checkpoint goes to OUT/checkpoint.safetensors.
    #[arg(long)]
    pub out: PathBuf,
    /// Seed recorded for a later `ddpm train --resume` from these weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace an existing checkpoint in OUT.
    #[arg(long)]
    pub force: bool,
}

/// `ddpm import --diffusers`.
pub fn run_import(args: ImportArgs) -> anyhow::Result<()> {
    let dir = &args.diffusers;
    let m = diffusers::load_folder(dir).with_context(|| format!("importing {}", dir.display()))?;
    let scheduler = match m.scheduler {
        Some(s) => s,
        None => {
            say!("note: no scheduler_config.json; using DDPMScheduler's defaults (linear, T = 1000, fixed_small, clip)");
            SchedulerSettings::from_json(&serde_json::json!({}), dir)?
        }
    };
    let config = TrainConfig {
        unet: m.unet,
        diffusion: scheduler.diffusion_config(),
        optim: OptimConfig::default(),
        batch_size: 128,
        random_flip: false,
        seed: args.seed,
    };
    config.validate().with_context(|| {
        format!("{}: the UNet2DModel and the scheduler do not fit together", dir.display())
    })?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    // A run may be training into OUT: its lock keeps the import from replacing its checkpoint.
    let _lock = ddpm::files::DirLock::acquire(&args.out, "ddpm import")?;
    let path = args.out.join(CHECKPOINT);
    if path.exists() && !args.force {
        bail!("{} exists; pass --force to replace it or choose another --out", path.display());
    }
    let source = format!("imported from diffusers {}", dir.display());
    save_weights(&path, &config, &m.params, &source, Some(scheduler.clip_sample))
        .with_context(|| format!("writing {}", path.display()))?;
    say!(
        "wrote {} ({} parameters; {} T = {}, {:?}, {:?}, clip {}; convention diffusers)",
        path.display(),
        m.params.num_scalars(),
        config.diffusion.schedule,
        config.diffusion.timesteps,
        config.diffusion.mean_type,
        config.diffusion.variance_type,
        scheduler.clip_sample
    );
    Ok(())
}

/// `ddpm export` arguments.
#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// The folder to write: config.json, diffusion_pytorch_model.safetensors,
    /// scheduler_config.json, model_index.json (UNet2DModel and DDPMPipeline load it).
    #[arg(long)]
    pub diffusers: PathBuf,
    /// A checkpoint file, or a run directory holding checkpoint.safetensors.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Export the raw trained weights instead of their EMA.
    #[arg(long)]
    pub no_ema: bool,
    /// Write clip_sample = false (default: the checkpoint's setting, else true as `ddpm sample`).
    #[arg(long)]
    pub no_clip: bool,
    /// Replace the files of an existing diffusers folder.
    #[arg(long)]
    pub force: bool,
}

/// `ddpm export --diffusers`.
pub fn run_export(args: ExportArgs) -> anyhow::Result<()> {
    if diffusers::is_diffusers_folder(&args.diffusers) && !args.force {
        bail!(
            "{} already holds a diffusers model; pass --force to replace it or choose another folder",
            args.diffusers.display()
        );
    }
    let path = resolve_checkpoint(&args.checkpoint)?;
    let ck = checkpoint::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let clip = !args.no_clip && ck.clip_x0.unwrap_or(true);
    let scheduler = SchedulerSettings::from_diffusion(&ck.config.diffusion, clip)
        .with_context(|| format!("exporting {}", path.display()))?;
    let params = &if args.no_ema { ck.params.clone() } else { ck.ema_params() };
    diffusers::write_folder(&args.diffusers, &ck.config.unet, params, &scheduler)
        .with_context(|| format!("exporting {} to {}", path.display(), args.diffusers.display()))?;
    let convention = ck.config.diffusion.convention;
    if convention != ddpm::diffusion::Convention::Diffusers {
        say!(
            "note: the checkpoint uses the {convention} convention; DDPMScheduler samples with diffusers' \
             (docs/conventions.md lists the differences)"
        );
    }
    say!("wrote {}", args.diffusers.display());
    Ok(())
}
