//! `ddpm sample`: new images from a trained checkpoint.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;
use ddpm::io::checkpoint;
use ddpm::nn::UNet;
use ddpm::sample::{sample, SampleConfig, Samples};
use ddpm::Tensor;
use ndarray::{Axis, Ix4};

use ddpm::distributed::{gather_pieces, my_pieces};

use super::common::{
    count, process_group, progress_bar, report_gpu_use, resolve_checkpoint, select_device, set_threads,
    DeviceArgs,
};
use super::sampling::SamplerArgs;

/// `ddpm sample` arguments.
#[derive(Args, Debug, Clone)]
pub struct SampleArgs {
    /// A checkpoint file, or a run directory holding checkpoint.safetensors.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The class of every image, for a class-conditional model (0-based label).
    #[arg(long)]
    pub class: Option<usize>,
    /// Number of images (1 to 1000000).
    #[arg(long, default_value_t = 64, value_parser = count(1..=1_000_000))]
    pub num: usize,
    /// Images sampled at once (1 to 4096): memory grows with it. Batch k draws from the seed's
    /// stream k, so the first --batch images do not depend on --num.
    #[arg(long, default_value_t = 256, value_parser = count(1..=4096))]
    pub batch: usize,
    #[command(flatten)]
    pub sampling: SamplerArgs,
    /// Seed of x_T and of the sampling noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory: grid.png, one NNNNNN.png per image, trajectory.png.
    #[arg(long)]
    pub out: PathBuf,
    /// Use the raw trained weights instead of their EMA.
    #[arg(long)]
    pub no_ema: bool,
    /// Do not clip the predicted x_0 to [-1, 1] during sampling.
    #[arg(long)]
    pub no_clip: bool,
    /// Also write trajectory.png: x_t from x_T to x_0 (rows = images, columns = time).
    #[arg(long)]
    pub trajectory: bool,
    /// Snapshots per trajectory row (2 to 1000, at most the network evaluations + 1).
    #[arg(long, default_value_t = 10, value_parser = count(2..=1000), requires = "trajectory")]
    pub trajectory_frames: usize,
    /// Skip the individual NNNNNN.png files.
    #[arg(long)]
    pub grid_only: bool,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// `ddpm sample`.
pub fn run(args: SampleArgs) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    select_device(args.device)?;
    let written = sample_to_dir(&args, true)?;
    report_gpu_use();
    if let Some(w) = written {
        say!("wrote {}", w.display());
    }
    Ok(())
}

/// Samples per `args` and writes the files; returns the grid's path (`None` on the ranks other
/// than 0 of a distributed run, which write nothing). With `distributed`, the ranks of an MPI
/// launch share the batches.
pub fn sample_to_dir(args: &SampleArgs, distributed: bool) -> anyhow::Result<Option<PathBuf>> {
    let path = resolve_checkpoint(&args.checkpoint)?;
    let ck = checkpoint::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let net = UNet::new(ck.config.unet.clone())?;
    let schedule = ck.config.diffusion.schedule()?;
    let param = ck.config.diffusion.parameterization();
    let params = &if args.no_ema { ck.params.clone() } else { ck.ema_params() };
    let big_t = ck.config.diffusion.timesteps;
    // An imported checkpoint carries its scheduler's clip_sample.
    let mut cfg = args.sampling.config(big_t, !args.no_clip && ck.clip_x0.unwrap_or(true))?;
    cfg.trajectory_frames = if args.trajectory { args.trajectory_frames } else { 0 };
    cfg.class = args.class;
    net.config.check_class(args.class)?;
    // Checks the grid (step count, spacing) before any work, and counts the evaluations.
    let evals =
        ddpm::sample::start(&schedule, &param, &[1, 1, 1, 1], &cfg, &mut ddpm::rng_from_seed(0))?.num_evals();
    if args.trajectory && args.trajectory_frames > evals + 1 {
        bail!(
            "--trajectory-frames {} is more than the {} states of {evals} network evaluations",
            args.trajectory_frames,
            evals + 1
        );
    }
    let chunks = args.num.div_ceil(args.batch);
    // Batches are dealt to the ranks of a distributed run round-robin; batch k is drawn from
    // stream k of the seed, so the images do not depend on how many ranks share the work.
    let group = if distributed { process_group()? } else { Box::new(ddpm::distributed::SingleProcess) };
    let mine: Vec<usize> = my_pieces(chunks, group.rank(), group.size()).collect();
    let bar = progress_bar((evals * mine.len()) as u64, "sample (evaluations)");
    let mut parts = Vec::with_capacity(mine.len());
    for (done_chunks, &chunk) in mine.iter().enumerate() {
        let n = args.batch.min(args.num - chunk * args.batch);
        let mut rng = ddpm::rng_from_seed(args.seed);
        rng.set_stream(chunk as u64);
        // The trajectory is drawn from the first batch only.
        let cfg = SampleConfig {
            trajectory_frames: if chunk == 0 { cfg.trajectory_frames } else { 0 },
            ..cfg.clone()
        };
        let s = sample(&net, params, &schedule, &param, n, &cfg, &mut rng, |done, _| {
            bar.set_position((done_chunks * evals + done) as u64)
        })
        .context("sampling")?;
        parts.push((chunk, s));
    }
    bar.finish_and_clear();
    if group.size() > 1 {
        // Rank 0 gathers every batch's images and writes them all.
        let pieces: Vec<(usize, Vec<f64>)> =
            parts.iter().map(|(k, s)| (*k, s.images.iter().map(|&v| f64::from(v)).collect())).collect();
        let all = gather_pieces(&*group, &pieces, chunks)?;
        if group.rank() != 0 {
            return Ok(None);
        }
        let [_, c, h, w] = [0, net.config.in_channels, net.config.resolution, net.config.resolution];
        let trajectory =
            parts.into_iter().find(|(k, _)| *k == 0).map(|(_, s)| s.trajectory).unwrap_or_default();
        let mut joined = Vec::with_capacity(chunks);
        for (k, piece) in all.into_iter().enumerate() {
            let n = args.batch.min(args.num - k * args.batch);
            let images =
                Tensor::from_shape_vec(vec![n, c, h, w], piece.into_iter().map(|v| v as f32).collect())
                    .map_err(|_| anyhow::anyhow!("rank data for batch {k} has the wrong size"))?;
            joined.push(Samples { images, trajectory: vec![] });
        }
        joined[0].trajectory = trajectory;
        return write_samples(&join_batches(joined), &args.out, !args.grid_only).map(Some);
    }
    let s = join_batches(parts.into_iter().map(|(_, s)| s).collect());
    write_samples(&s, &args.out, !args.grid_only).map(Some)
}

/// The batches' images in order, with the first batch's trajectory.
fn join_batches(mut parts: Vec<Samples>) -> Samples {
    if parts.len() == 1 {
        return parts.remove(0);
    }
    let views: Vec<_> = parts.iter().map(|p| p.images.view()).collect();
    let images = ndarray::concatenate(Axis(0), &views).expect("every batch is [n, C, H, W] of the one model");
    Samples { images, trajectory: std::mem::take(&mut parts[0].trajectory) }
}

/// Writes grid.png (and NNNNNN.png per image, trajectory.png if present) into `out`.
pub fn write_samples(s: &Samples, out: &Path, individual: bool) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let images = s.images.view().into_dimensionality::<Ix4>().expect("samples are [N, C, H, W]");
    let n = images.shape()[0];
    let grid = out.join("grid.png");
    let cols = (n as f64).sqrt().ceil() as usize;
    ddpm::io::png::save_grid(&grid, images, cols).with_context(|| format!("writing {}", grid.display()))?;
    if individual {
        for (i, img) in images.axis_iter(Axis(0)).enumerate() {
            let p = out.join(format!("{i:06}.png"));
            ddpm::io::png::save_image(&p, img).with_context(|| format!("writing {}", p.display()))?;
        }
    }
    if !s.trajectory.is_empty() {
        let rows = n.min(8);
        let frames = s.trajectory.len();
        let [_, c, h, w] = [n, images.shape()[1], images.shape()[2], images.shape()[3]];
        let mut strip = Tensor::zeros(vec![rows * frames, c, h, w]);
        for r in 0..rows {
            for (f, frame) in s.trajectory.iter().enumerate() {
                strip.index_axis_mut(Axis(0), r * frames + f).assign(&frame.x.index_axis(Axis(0), r));
            }
        }
        let p = out.join("trajectory.png");
        let v = strip.view().into_dimensionality::<Ix4>().expect("built as 4-D");
        ddpm::io::png::save_grid(&p, v, frames).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(grid)
}
