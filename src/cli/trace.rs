//! `ddpm trace`: every intermediate of a sampling run at chosen evaluations, as an npz.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use ddpm::diffusion::samplers::SamplerKind;
use ddpm::io::npz::{write_npz, NpzArray};
use ddpm::sample::trace;
use ndarray::Array1;

use super::common::{check_out_folder, count, load_model, progress_bar, set_threads};
use super::sampling::SamplerArgs;

/// Write the intermediates of one seeded sampling run to an .npz, for comparing another
/// implementation step by step with `ddpm compare`.
///
/// With the default sampler (ddpm: ancestral, Ho et al. Algorithm 2, all T steps) each kept
/// step t (0-based, as diffusers numbers it) gives `tTTTT.x_t`, `tTTTT.eps` (the network's raw
/// output), `tTTTT.x0_pred`, `tTTTT.mean`, `tTTTT.variance`, `tTTTT.noise` (z of x_(t-1) = mean +
/// sqrt(variance) z; zeros at t = 0) and `tTTTT.x_prev`, all float64 [N, C, H, W]; plus
/// `timesteps` (int64, the kept steps), `x_T` and `x_0`.
///
/// With any other sampler (--sampler, --steps) each kept network evaluation e gives
/// `eEEEE.x_t` (the network's input), `.eps` (raw output), `.x0_pred`, `.eps_pred`, `.x_next`
/// (the sampler's state after the update) and `.noise` where the update drew noise; plus
/// `evals` (int64), `timesteps` (float64, the network timestep of each kept evaluation),
/// `sigmas`, `x_T` and `x_0`. The run is the one `ddpm sample` draws with the same seed, weights,
/// sampler and clipping.
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
    /// What to keep, comma-separated, or `all`: 0-based timesteps (e.g. 999,500,0) for ddpm,
    /// 0-based evaluation indices for the other samplers.
    #[arg(long)]
    pub keep: String,
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
    #[command(flatten)]
    pub sampling: SamplerArgs,
}

/// `ddpm trace`.
pub fn run(args: TraceArgs) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    check_out_folder(&args.out)?;
    let model = load_model(&args.checkpoint, args.no_ema)?;
    let d = &model.diffusion;
    let big_t = d.timesteps;
    let all = args.keep.trim() == "all";
    let keep: Vec<usize> = if all {
        vec![]
    } else {
        args.keep
            .split(',')
            .map(|s| s.trim().parse::<usize>().with_context(|| format!("--keep: {s:?} is not a number")))
            .collect::<anyhow::Result<_>>()?
    };
    let ancestral = args.sampling.sampler == SamplerKind::Ancestral;
    if ancestral {
        if let Some(t) = keep.iter().find(|&&t| t >= big_t) {
            bail!(
                "--keep: timestep {t} is out of range; this model has T = {big_t} (steps 0..={})",
                big_t - 1
            );
        }
    }
    let schedule = d.schedule()?;
    model.net.config.check_class(args.class)?;
    let clip = !args.no_clip && model.clip_x0;
    let mut cfg = args.sampling.config(big_t, clip)?;
    cfg.class = args.class;
    let param = d.parameterization();
    let evals =
        ddpm::sample::start(&schedule, &param, &[1, 1, 1, 1], &cfg, &mut ddpm::rng_from_seed(0))?.num_evals();
    if !ancestral {
        if let Some(e) = keep.iter().find(|&&e| e >= evals) {
            bail!("--keep: evaluation {e} is out of range; this run makes {evals} (0..={})", evals - 1);
        }
    }
    let bar = progress_bar(evals as u64, "trace");
    let mut rng = ddpm::rng_from_seed(args.seed);
    let tr = trace(
        &model.net,
        &model.params,
        &schedule,
        &param,
        args.num,
        &cfg,
        |e, t| all || if ancestral { t.is_some_and(|t| keep.contains(&t)) } else { keep.contains(&e) },
        &mut rng,
        |done, _| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    let mut entries: Vec<(String, &ndarray::ArrayD<f64>)> = vec![];
    for s in &tr.steps {
        let prefix =
            if ancestral { format!("t{:04}", s.index.unwrap_or(0)) } else { format!("e{:04}", s.eval) };
        let mut kept: Vec<(&str, &ndarray::ArrayD<f64>)> =
            vec![("x_t", &s.x_t), ("eps", &s.eps), ("x0_pred", &s.x0_pred)];
        if ancestral {
            for (name, a) in [("mean", &s.mean), ("variance", &s.variance), ("noise", &s.noise)] {
                if let Some(a) = a {
                    kept.push((name, a));
                }
            }
            kept.push(("x_prev", &s.x_prev));
        } else {
            kept.extend([("eps_pred", &s.eps_pred), ("x_next", &s.x_prev)]);
            if let Some(z) = &s.noise {
                kept.push(("noise", z));
            }
        }
        entries.extend(kept.into_iter().map(|(name, a)| (format!("{prefix}.{name}"), a)));
    }
    let kept_t: Array1<i64> = Array1::from_iter(tr.steps.iter().map(|s| s.index.unwrap_or(0) as i64));
    let kept_e: Array1<i64> = Array1::from_iter(tr.steps.iter().map(|s| s.eval as i64));
    let model_t: Array1<f64> = Array1::from_iter(tr.steps.iter().map(|s| s.t));
    let sigmas: Array1<f64> = Array1::from_iter(tr.steps.iter().map(|s| s.sigma));
    let mut arrays: Vec<(&str, NpzArray)> = if ancestral {
        vec![("timesteps", kept_t.view().into())]
    } else {
        vec![
            ("evals", kept_e.view().into()),
            ("timesteps", model_t.view().into()),
            ("sigmas", sigmas.view().into()),
        ]
    };
    arrays.push(("x_T", tr.x_start.view().into()));
    arrays.push(("x_0", tr.x0.view().into()));
    for (name, a) in &entries {
        arrays.push((name.as_str(), a.view().into()));
    }
    write_npz(&args.out, &arrays).with_context(|| format!("writing {}", args.out.display()))?;
    say!(
        "wrote {} ({} of {evals} evaluations kept, sampler {}, {} image(s), clip {clip}, {} convention)",
        args.out.display(),
        tr.steps.len(),
        cfg.sampler.name(),
        args.num,
        d.convention
    );
    Ok(())
}
