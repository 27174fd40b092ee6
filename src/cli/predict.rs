//! `ddpm predict`: the network's raw output for a batch, the plainest forward-pass comparison.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use ddpm::diffusion::NoiseSchedule;
use ddpm::io::npz::{read_npy_f32, write_npy_f32};
use ddpm::Var;

use super::common::{check_out_folder, load_model, set_threads};

/// `ddpm predict` arguments.
#[derive(Args, Debug, Clone)]
pub struct PredictArgs {
    /// A ddpm checkpoint (file or run directory; `ddpm import` makes one from diffusers,
    /// improved-diffusion and guided-diffusion models) or a diffusers UNet2DModel folder.
    #[arg(long)]
    pub model: PathBuf,
    /// The input batch x_t: a float32 .npy of shape [N, C, H, W].
    #[arg(long)]
    pub x: PathBuf,
    /// The integer timestep (0-based code index, as diffusers numbers it) for every image. The
    /// network sees it unchanged except under the improved-diffusion convention (t·1000/T).
    #[arg(long)]
    pub t: u64,
    /// The class of every image, for a class-conditional model (0-based label).
    #[arg(long)]
    pub class: Option<usize>,
    /// Where to write the output, a float32 .npy [N, C_out, H, W] (ε_θ for ε-prediction, and
    /// the variance values in the second half of the channels when the variance is learned).
    #[arg(long)]
    pub out: PathBuf,
    /// Use a ddpm checkpoint's raw trained weights instead of their EMA.
    #[arg(long)]
    pub no_ema: bool,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// `ddpm predict`.
pub fn run(args: PredictArgs) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    check_out_folder(&args.out)?;
    let model = load_model(&args.model, args.no_ema)?;
    let x = read_npy_f32(&args.x).with_context(|| format!("reading --x {}", args.x.display()))?;
    let c = &model.net.config;
    let s = x.shape();
    if s.len() != 4 || s[1] != c.in_channels || s[2] != c.resolution || s[3] != c.resolution || s[0] == 0 {
        bail!(
            "{}: x has shape {s:?}; the model takes [N, {}, {}, {}] with N ≥ 1",
            args.x.display(),
            c.in_channels,
            c.resolution,
            c.resolution
        );
    }
    let d = &model.diffusion;
    if args.t >= d.timesteps as u64 {
        bail!("--t {}: this model has T = {}, so t runs over 0..={}", args.t, d.timesteps, d.timesteps - 1);
    }
    let schedule = NoiseSchedule::new(&d.schedule, d.timesteps, d.convention.settings())?;
    let model_t = schedule.model_timestep(args.t as usize) as f32;
    let n = s[0];
    model.net.config.check_class(args.class)?;
    let labels = args.class.map(|c| vec![c; n]);
    let out = model.net.forward_labelled(
        &model.params.bind_constant(),
        &Var::constant(x),
        &vec![model_t; n],
        labels.as_deref(),
        None,
    );
    write_npy_f32(&args.out, out.value()).with_context(|| format!("writing {}", args.out.display()))?;
    say!("wrote {} ({:?})", args.out.display(), out.shape());
    Ok(())
}
