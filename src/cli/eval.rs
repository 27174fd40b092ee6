//! `ddpm eval`: the variational bound in bits/dim of a checkpoint on a dataset.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use ddpm::data::Split;
use ddpm::diffusion::calc_bpd_loop;
use ddpm::io::checkpoint;
use ddpm::nn::UNet;
use ddpm::Var;
use serde::Serialize;

use ddpm::distributed::{gather_pieces, my_pieces};

use super::common::{load_data, process_group, progress_bar, resolve_checkpoint, set_threads};

/// `ddpm eval` arguments.
#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// A checkpoint file, or a run directory holding checkpoint.safetensors.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// The evaluation images (same formats as `train --data`). Default: the embedded MNIST.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Which split of the data.
    #[arg(long, default_value = "test")]
    pub split: Split,
    /// Evaluate the first N images only (each costs T network evaluations).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Images per network call.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Seed of the noise used to form each x_t.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use the raw trained weights instead of their EMA.
    #[arg(long)]
    pub no_ema: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

/// The bound's breakdown, averaged over the images, in bits/dim.
#[derive(Serialize)]
struct Report {
    checkpoint: String,
    data: String,
    images: usize,
    timesteps: usize,
    /// L_T: KL(q(x_T | x_0) ‖ N(0, I)).
    prior_bpd: f64,
    /// Σ_{t>1} L_{t−1}.
    kl_sum_bpd: f64,
    /// L_0: −log p_θ(x_0 | x_1), discretized decoder.
    decoder_bpd: f64,
    /// L_T + Σ L_{t−1} + L_0.
    total_bpd: f64,
}

/// `ddpm eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    set_threads(args.threads)?;
    let path = resolve_checkpoint(&args.checkpoint)?;
    let ck = checkpoint::load(&path).with_context(|| format!("loading {}", path.display()))?;
    let classes = ck.config.unet.num_classes;
    // A class-conditional model is evaluated on each image with its own label.
    let data = load_data(&ddpm::data::DataSpec {
        path: args.data.clone(),
        split: args.split,
        image_size: Some(ck.config.unet.resolution),
        channels: Some(ck.config.unet.in_channels),
        labels: classes.is_some(),
    })
    .with_context(|| match classes {
        Some(k) => {
            format!("{} is conditioned on {k} classes, so the data needs a label per image", path.display())
        }
        None => format!("evaluating {}", path.display()),
    })?;
    if let (Some(k), Some(found)) = (classes, data.num_classes()) {
        if found > k {
            bail!(
                "{}: the labels go up to {} but {} is conditioned on {k} classes (0..={})",
                data.source().display(),
                found - 1,
                path.display(),
                k - 1
            );
        }
    }
    let [_, c, h, w] = data.shape();
    let u = &ck.config.unet;
    if c != u.in_channels || h != u.resolution || w != u.resolution {
        bail!(
            "{}: images are {c}x{h}x{w}, the model takes {}x{}x{}",
            data.source().display(),
            u.in_channels,
            u.resolution,
            u.resolution
        );
    }
    let n = args.limit.unwrap_or(data.len()).min(data.len());
    if n == 0 || args.batch == 0 {
        bail!("nothing to evaluate: --limit and --batch must be at least 1");
    }
    let net = UNet::new(ck.config.unet.clone())?;
    let schedule = ck.config.diffusion.schedule()?;
    let param = ck.config.diffusion.parameterization();
    let params = &if args.no_ema { ck.params.clone() } else { ck.ema_params() };
    let bound = params.bind_constant();
    let big_t = schedule.num_timesteps();
    // Batches are dealt to the ranks of a distributed run round-robin; batch k draws its noise
    // from stream k of the seed, so the figures do not depend on how many ranks share the work.
    let group = process_group()?;
    let batches = n.div_ceil(args.batch);
    let mine: Vec<usize> = my_pieces(batches, group.rank(), group.size()).collect();
    let batch_len = |k: usize| args.batch.min(n - k * args.batch);
    let bar = progress_bar(
        (mine.iter().map(|&k| batch_len(k)).sum::<usize>() * big_t) as u64,
        "eval (image-steps)",
    );
    let mut pieces = Vec::with_capacity(mine.len());
    for &k in &mine {
        let idx: Vec<usize> = (k * args.batch..k * args.batch + batch_len(k)).collect();
        let x0 = data.to_tensor(&idx).mapv(|v| v as f64);
        let labels = data.labels_at(&idx).filter(|_| classes.is_some());
        let b = idx.len();
        let model = |x_t: &ndarray::ArrayD<f64>, t: &[usize]| {
            let mt: Vec<f32> = t.iter().map(|&ti| schedule.model_timestep(ti) as f32).collect();
            let x_t = Var::constant(x_t.mapv(|v| v as f32));
            let y = net.forward_labelled(&bound, &x_t, &mt, labels.as_deref(), None);
            bar.inc(b as u64);
            y.value().mapv(|v| v as f64)
        };
        let mut rng = ddpm::rng_from_seed(args.seed);
        rng.set_stream(k as u64);
        let r = calc_bpd_loop(&schedule, &param, &x0, true, model, &mut rng);
        let piece: Vec<f64> = [&r.prior_bpd, &r.kl_sum_bpd, &r.decoder_bpd, &r.total_bpd]
            .iter()
            .flat_map(|a| a.iter().copied())
            .collect();
        pieces.push((k, piece));
    }
    bar.finish_and_clear();
    // Every image's terms, summed in image order whatever the number of ranks.
    let (mut prior, mut kl, mut dec, mut total) = (0.0, 0.0, 0.0, 0.0);
    for piece in gather_pieces(&*group, &pieces, batches)? {
        let b = piece.len() / 4;
        prior += piece[..b].iter().sum::<f64>();
        kl += piece[b..2 * b].iter().sum::<f64>();
        dec += piece[2 * b..3 * b].iter().sum::<f64>();
        total += piece[3 * b..].iter().sum::<f64>();
    }
    if group.rank() != 0 {
        return Ok(());
    }
    let k = n as f64;
    let report = Report {
        checkpoint: path.display().to_string(),
        data: data.source().display().to_string(),
        images: n,
        timesteps: big_t,
        prior_bpd: prior / k,
        kl_sum_bpd: kl / k,
        decoder_bpd: dec / k,
        total_bpd: total / k,
    };
    if args.json {
        // Cannot fail: Report holds strings, integers and floats only (a non-finite float
        // serialises as null), no map with non-string keys.
        out!("{}", serde_json::to_string_pretty(&report).expect("plain data serialises"));
    } else {
        out!("bits/dim of {} on {} images of {}", report.checkpoint, n, report.data);
        out!("  L_T (prior)        {:>10.5}", report.prior_bpd);
        out!("  sum L_(t-1) (KL)   {:>10.5}", report.kl_sum_bpd);
        out!("  L_0 (decoder)      {:>10.5}", report.decoder_bpd);
        out!("  total              {:>10.5}", report.total_bpd);
    }
    Ok(())
}
