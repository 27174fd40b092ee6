//! `ddpm bench`: times training and sampling steps of the real model, printing the same fields
//! as ../shared/bench/peer/ddpm_peer.py so the two can be compared line by line.

use std::time::Instant;

use clap::Args;
use ddpm::diffusion::{p_sample, ModelOutput, Parameterization};
use ddpm::nn::{Adam, AdamConfig, Preset, UNet};
use ddpm::train::DiffusionConfig;
use ddpm::{rng_from_seed, Tape, Tensor, Var};
use rand::Rng as _;
use rand_distr::StandardNormal;
use serde_json::json;

use super::common::{count, report_gpu_use, select_device, set_threads, DeviceArgs};
use super::train::PresetArg;

/// `ddpm bench` arguments.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Network preset (mnist = the peer's mnist-small; cifar10 = its cifar-ddpm).
    #[arg(long, value_enum, default_value = "mnist")]
    pub preset: PresetArg,
    /// Images per training step (1 to 4096).
    #[arg(long, default_value_t = 64, value_parser = count(1..=4096))]
    pub batch: usize,
    /// Images per sampling step (default: --batch; 1 to 4096).
    #[arg(long, value_parser = count(1..=4096))]
    pub sample_batch: Option<usize>,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Untimed steps first (0 to 10000).
    #[arg(long, default_value_t = 1, value_parser = count(0..=10_000))]
    pub warmup: usize,
    /// Timed steps; the median is reported (1 to 10000).
    #[arg(long, default_value_t = 5, value_parser = count(1..=10_000))]
    pub reps: usize,
    /// What to time.
    #[arg(long, value_parser = ["train", "sample", "both"], default_value = "both")]
    pub mode: String,
    /// Print JSON lines (the peer scripts' field names) instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// The instruction set of the kernels: avx512, avx2, neon or scalar, at most what this machine
    /// runs (default: DDPM_CPU if set, else the best it has). The JSON names the one used.
    #[arg(long, value_parser = parse_isa)]
    pub cpu: Option<ddpm::cpu::Isa>,
}

fn parse_isa(s: &str) -> Result<ddpm::cpu::Isa, String> {
    s.parse().map_err(|e: ddpm::Error| e.to_string())
}

fn rss_text() -> String {
    peak_rss_mib().map_or_else(|| "n/a".to_string(), |v| format!("{v} MiB"))
}

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib / 1024.0 * 10.0).round() / 10.0)
}

fn stats(ts: &mut [f64]) -> (f64, f64, f64) {
    ts.sort_by(f64::total_cmp);
    (ts[ts.len() / 2], ts[0], ts[ts.len() - 1])
}

fn ms(x: f64) -> f64 {
    (x * 1e5).round() / 100.0
}

/// `ddpm bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(isa) = args.cpu {
        ddpm::cpu::force(isa)?;
    }
    let cpu = ddpm::cpu::active().name();
    set_threads(args.threads)?;
    select_device(args.device)?;
    let device = match ddpm::device::current() {
        ddpm::device::Device::Cpu => "cpu",
        ddpm::device::Device::Gpu => "gpu",
    };
    let threads = rayon::current_num_threads();
    let (preset, c, r, name) = match args.preset {
        PresetArg::Mnist => (Preset::Mnist, 1, 28, "mnist-small"),
        PresetArg::Cifar10 => (Preset::Cifar10, 3, 32, "cifar-ddpm"),
        PresetArg::Tiny => (Preset::Tiny, 1, 8, "tiny"),
        PresetArg::Small => (Preset::Small, 1, 28, "small"),
    };
    let cfg = preset.config(c, r);
    let net = UNet::new(cfg.clone())?;
    let mut rng = rng_from_seed(0);
    let mut params = net.init_params(&mut rng);
    let base =
        json!({"impl": "ddpm", "config": name, "params": params.num_scalars(), "device": device, "cpu": cpu});
    let emit = |v: serde_json::Value| -> anyhow::Result<()> {
        let mut m = base.as_object().cloned().unwrap_or_default();
        m.extend(v.as_object().cloned().unwrap_or_default());
        out!("{}", serde_json::Value::Object(m));
        Ok(())
    };
    let d = DiffusionConfig::default();
    let schedule = d.schedule()?;
    let reps = args.reps.max(1);
    if args.mode != "sample" {
        let b = args.batch;
        let mut adam = Adam::new(&params, AdamConfig::default());
        let x0 = Tensor::from_shape_simple_fn(vec![b, c, r, r], || rng.random_range(-1.0f32..1.0));
        let mut times = vec![];
        for i in 0..args.warmup + reps {
            let start = Instant::now();
            // L_simple step as the peer times it: random t, q_sample, predict ε, MSE, backward, Adam.
            let t: Vec<usize> = (0..b).map(|_| rng.random_range(0..d.timesteps)).collect();
            let eps = Tensor::from_shape_simple_fn(x0.shape(), || rng.sample::<f32, _>(StandardNormal));
            let x_t = ddpm::diffusion::gaussian::q_sample_f32(&schedule, &x0, &t, &eps);
            let mt: Vec<f32> = t.iter().map(|&v| v as f32).collect();
            let tape = Tape::new();
            let p = params.bind(&tape);
            let loss = net.forward(&p, &Var::constant(x_t), &mt, Some(&mut rng)).mse(&Var::constant(eps));
            let grads = p.grads(&loss.backward());
            drop(p);
            adam.update(&mut params, &grads, 2e-4);
            if i >= args.warmup {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        let (med, min, max) = stats(&mut times);
        let flops = cfg.train_flops_per_image() as f64 * b as f64;
        let v = json!({"bench": "train_step", "threads": threads, "batch": b, "reps": reps,
            "median_ms": ms(med), "min_ms": ms(min), "max_ms": ms(max),
            "images_per_s": (b as f64 / med * 100.0).round() / 100.0, "train_flops_per_step": flops,
            "gflops_achieved": (flops / med / 1e7).round() / 100.0, "maxrss_mib": peak_rss_mib()});
        if args.json {
            emit(v)?;
        } else {
            say!("train step  {name} batch {b} threads {threads} {device} ({cpu}): {:.1} ms median ({:.1}-{:.1}), {:.1} images/s, {:.1} GFLOP/s, peak RSS {}",
                med * 1e3, min * 1e3, max * 1e3, b as f64 / med, flops / med / 1e9, rss_text());
        }
    }
    if args.mode != "train" {
        let b = args.sample_batch.unwrap_or(args.batch);
        let param = Parameterization { mean_type: d.mean_type, variance_type: d.variance_type };
        let bound = params.bind_constant();
        let mut x = ndarray::ArrayD::<f64>::from_shape_simple_fn(vec![b, c, r, r], || {
            rng.sample::<f64, _>(StandardNormal)
        });
        let mut times = vec![];
        let mut t = d.timesteps - 1;
        for i in 0..args.warmup + reps {
            let start = Instant::now();
            let out = net.forward(&bound, &Var::constant(x.mapv(|v| v as f32)), &vec![t as f32; b], None);
            let output = ModelOutput::split(out.value().mapv(|v| v as f64), param.variance_type);
            x = p_sample(&schedule, &param, &x, &vec![t; b], &output, true, &mut rng).x_prev;
            t = t.saturating_sub(1);
            if i >= args.warmup {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        let (med, min, max) = stats(&mut times);
        let flops = cfg.forward_flops_per_image() as f64 * b as f64;
        let v = json!({"bench": "sample_step", "threads": threads, "batch": b, "reps": reps,
            "median_ms": ms(med), "min_ms": ms(min), "max_ms": ms(max), "fwd_flops_per_step": flops,
            "gflops_achieved": (flops / med / 1e7).round() / 100.0,
            "projected_sample_1000_steps_s": (med * 1000.0 * 10.0).round() / 10.0, "maxrss_mib": peak_rss_mib()});
        if args.json {
            emit(v)?;
        } else {
            say!("sample step {name} batch {b} threads {threads} {device} ({cpu}): {:.1} ms median ({:.1}-{:.1}), {:.1} GFLOP/s, 1000 steps ≈ {:.0} s",
                med * 1e3, min * 1e3, max * 1e3, flops / med / 1e9, med * 1000.0);
        }
    }
    report_gpu_use();
    Ok(())
}
