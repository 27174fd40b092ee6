//! `ddpm import` (diffusers folders; improved-/guided-diffusion `.pt` files with their flags)
//! and `ddpm export --diffusers`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use ddpm::interop::diffusers::{self, SchedulerSettings};
use ddpm::interop::openai::{self, Family};
use ddpm::io::checkpoint::{self, save_weights};
use ddpm::train::{OptimConfig, TrainConfig};

use super::common::{resolve_checkpoint, CHECKPOINT};

/// `ddpm import` arguments.
#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["diffusers", "improved_diffusion", "guided_diffusion"])))]
pub struct ImportArgs {
    /// A diffusers folder: config.json + diffusion_pytorch_model.safetensors (+ scheduler_config.json),
    /// flat or in unet/ and scheduler/ subfolders, as save_pretrained writes them.
    #[arg(long, value_name = "DIR")]
    pub diffusers: Option<PathBuf>,
    /// An openai/improved-diffusion checkpoint (`model*.pt` or `ema_*.pt`, a torch.save'd state
    /// dict); needs --flags.
    #[arg(long, value_name = "MODEL.pt", requires = "flags")]
    pub improved_diffusion: Option<PathBuf>,
    /// An openai/guided-diffusion checkpoint (a torch.save'd state dict); needs --flags.
    #[arg(long, value_name = "MODEL.pt", requires = "flags")]
    pub guided_diffusion: Option<PathBuf>,
    /// The flags the model was trained and sampled with, as one string, e.g. "--image_size 64
    /// --num_channels 128 --num_res_blocks 3 --learn_sigma True --diffusion_steps 4000
    /// --noise_schedule cosine". Read with the repository's own defaults and argparse rules;
    /// training-only flags (--lr, --batch_size, …) are ignored.
    #[arg(long, value_name = "FLAGS", allow_hyphen_values = true, conflicts_with = "diffusers")]
    pub flags: Option<String>,
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

/// `ddpm import`.
pub fn run_import(args: ImportArgs) -> anyhow::Result<()> {
    let (pt, family) = match (&args.improved_diffusion, &args.guided_diffusion) {
        (Some(p), _) => (p, Family::Improved),
        (None, Some(p)) => (p, Family::Guided),
        (None, None) => return import_diffusers(&args),
    };
    let flags = args.flags.as_deref().unwrap_or_default();
    let m = openai::load(pt, flags, family).with_context(|| format!("importing {}", pt.display()))?;
    for note in &m.notes {
        say!("note: {note}");
    }
    let config = TrainConfig {
        unet: m.unet,
        diffusion: m.diffusion,
        optim: OptimConfig::default(),
        batch_size: 128,
        random_flip: false,
        seed: args.seed,
        draws: ddpm::config::Draws::Keyed,
    };
    config
        .validate()
        .with_context(|| format!("{}: the flags describe no model ddpm can run", pt.display()))?;
    let (path, _lock) = prepare_out(&args)?;
    let source = format!("imported from {} {} with flags {flags:?}", family.name(), pt.display());
    // Their samplers clip x̂_0 (clip_denoised=True in their sampling script).
    save_imported(&path, &config, &m.params, &source, true)?;
    if !m.timestep_respacing.is_empty() {
        say!(
            "note: --timestep_respacing {:?} chose their sampler's steps; it is not part of the model (sample with `ddpm sample --steps K`)",
            m.timestep_respacing
        );
    }
    if let Some(k) = config.unet.num_classes {
        say!("note: the model is class-conditional ({k} classes): give `--class` to predict and sample");
    }
    Ok(())
}

/// Writes an imported model's checkpoint and says what it holds.
fn save_imported(
    path: &std::path::Path,
    config: &TrainConfig,
    params: &ddpm::nn::ParamStore,
    source: &str,
    clip: bool,
) -> anyhow::Result<()> {
    save_weights(path, config, params, source, Some(clip))
        .with_context(|| format!("writing {}", path.display()))?;
    let d = &config.diffusion;
    say!(
        "wrote {} ({} parameters; {} T = {}, {:?}, {:?}, clip {clip}; convention {})",
        path.display(),
        params.num_scalars(),
        d.schedule,
        d.timesteps,
        d.mean_type,
        d.variance_type,
        d.convention
    );
    Ok(())
}

/// Creates OUT, takes its lock (a run may be training into it: the lock keeps the import from
/// replacing its checkpoint) and returns the checkpoint path to write.
fn prepare_out(args: &ImportArgs) -> anyhow::Result<(PathBuf, ddpm::files::DirLock)> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let lock = ddpm::files::DirLock::acquire(&args.out, "ddpm import")?;
    let path = args.out.join(CHECKPOINT);
    if path.exists() && !args.force {
        bail!("{} exists; pass --force to replace it or choose another --out", path.display());
    }
    Ok((path, lock))
}

/// `ddpm import --diffusers`.
fn import_diffusers(args: &ImportArgs) -> anyhow::Result<()> {
    let Some(dir) = &args.diffusers else {
        bail!("give --diffusers, --improved-diffusion or --guided-diffusion")
    };
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
        draws: ddpm::config::Draws::Keyed,
    };
    config.validate().with_context(|| {
        format!("{}: the UNet2DModel and the scheduler do not fit together", dir.display())
    })?;
    let (path, _lock) = prepare_out(args)?;
    let source = format!("imported from diffusers {}", dir.display());
    save_imported(&path, &config, &m.params, &source, scheduler.clip_sample)?;
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
