//! `ddpm trace`: every intermediate of an ancestral sampling run at chosen steps, as an npz.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use ddpm::io::npz::{write_npz, NpzArray};
use ddpm::sample::trace;
use ndarray::Array1;

use super::common::{check_out_folder, count, load_model, progress_bar, set_threads};

/// Write the intermediates of one seeded ancestral sampling run (Ho et al. Algorithm 2, all T
/// steps) to an .npz, for comparing another implementation step by step with `ddpm compare`.
///
/// For each kept step t (0-based, as diffusers numbers it) the file holds `tTTTT.x_t`,
/// `tTTTT.eps` (the network's raw output), `tTTTT.x0_pred`, `tTTTT.mean`, `tTTTT.variance`,
/// `tTTTT.noise` (z of x_(t-1) = mean + sqrt(variance) z; zeros at t = 0) and `tTTTT.x_prev`, all
/// float64 [N, C, H, W]; plus `timesteps` (int64, the kept steps), `x_T` and `x_0`. The run is
/// the one `ddpm sample --sampler ddpm` draws with the same seed, weights and clipping.
#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    /// A ddpm checkpoint (file or run directory) or a diffusers UNet2DModel folder.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The class of every image, for a class-conditional model (0-based label).
    #[arg(long)]
    pub class: Option<usize>,
    /// Seed of x_T and of the sampling noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Number of images N.
    #[arg(long, default_value_t = 1, value_parser = count(1..=1024))]
    pub num: usize,
    /// Steps to keep: comma-separated 0-based timesteps (e.g. 999,500,0), or `all`.
    #[arg(long)]
    pub steps: String,
    /// Output .npz (its folder must exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Use a ddpm checkpoint's raw trained weights instead of their EMA.
    #[arg(long)]
    pub no_ema: bool,
    /// Do not clip the predicted x_0 to [-1, 1] (default: the checkpoint's setting, else clip).
    #[arg(long)]
    pub no_clip: bool,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// `ddpm trace`.
pub fn run(args: TraceArgs) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    check_out_folder(&args.out)?;
    let model = load_model(&args.checkpoint, args.no_ema)?;
    let d = &model.diffusion;
    let big_t = d.timesteps;
    let keep: Vec<usize> = if args.steps.trim() == "all" {
        (0..big_t).collect()
    } else {
        args.steps
            .split(',')
            .map(|s| s.trim().parse::<usize>().with_context(|| format!("--steps: {s:?} is not a timestep")))
            .collect::<anyhow::Result<_>>()?
    };
    if let Some(t) = keep.iter().find(|&&t| t >= big_t) {
        bail!("--steps: timestep {t} is out of range; this model has T = {big_t} (steps 0..={})", big_t - 1);
    }
    let schedule = d.schedule()?;
    model.net.config.check_class(args.class)?;
    let clip = !args.no_clip && model.clip_x0;
    let bar = progress_bar(big_t as u64, "trace");
    let mut rng = ddpm::rng_from_seed(args.seed);
    let tr = trace(
        &model.net,
        &model.params,
        &schedule,
        &d.parameterization(),
        args.num,
        clip,
        args.class,
        |t| keep.contains(&t),
        &mut rng,
        |done, _| bar.set_position(done as u64),
    );
    bar.finish_and_clear();
    let timesteps = Array1::from_iter(tr.steps.iter().map(|s| s.t as i64));
    let names: Vec<[String; 7]> = tr
        .steps
        .iter()
        .map(|s| {
            ["x_t", "eps", "x0_pred", "mean", "variance", "noise", "x_prev"]
                .map(|a| format!("t{:04}.{a}", s.t))
        })
        .collect();
    let mut arrays: Vec<(&str, NpzArray)> = vec![
        ("timesteps", timesteps.view().into()),
        ("x_T", tr.x_start.view().into()),
        ("x_0", tr.x0.view().into()),
    ];
    for (s, n) in tr.steps.iter().zip(&names) {
        for (name, a) in n.iter().zip([&s.x_t, &s.eps, &s.x0_pred, &s.mean, &s.variance, &s.noise, &s.x_prev])
        {
            arrays.push((name.as_str(), a.view().into()));
        }
    }
    write_npz(&args.out, &arrays).with_context(|| format!("writing {}", args.out.display()))?;
    say!(
        "wrote {} ({} steps kept of {big_t}, {} image(s), clip {clip}, {} convention)",
        args.out.display(),
        tr.steps.len(),
        args.num,
        d.convention
    );
    Ok(())
}
