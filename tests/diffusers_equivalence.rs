//! ddpm against huggingface/diffusers 0.42.1 (UNet2DModel + DDPMScheduler), on the fixtures that
//! tests/fixtures/make_diffusers_fixture.py wrote (torch 2.15.0, float32 on CPU; see
//! tests/fixtures/README.md). No Python is needed here: every expected value is a committed
//! diffusers output.
//!
//! - a small UNet2DModel of the DDPM family, its folder as save_pretrained wrote it: ε ≤ 1e-4;
//! - a UNet2DModel shaped like the `cifar10` preset (35.7M parameters), whose counter weights
//!   (`ddpm::interop::counter`) are rebuilt here: ε ≤ 1e-4;
//! - DDPMScheduler.step (fixed_small, fixed_small_log, fixed_large; clip on and off) with the
//!   same model output and noise: the `diffusers` convention's p_θ (f64) gives x_{t−1} ≤ 1e-6,
//!   `ddpm_scheduler_step_f32` gives diffusers' bits;
//! - a ddpm checkpoint exported with `ddpm export --diffusers` and run by diffusers: ε ≤ 1e-4,
//!   and the export / import round trip is exact.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ddpm::diffusion::{
    p_mean_variance, BetaSchedule, Convention, MeanType, ModelOutput, NoiseSchedule, Parameterization,
    VarianceType,
};
use ddpm::interop::counter::counter_params;
use ddpm::interop::diffusers::{
    ddpm_scheduler_step_f32, diffusers_name, load_folder, unet_config_from_json, StepVariance,
};
use ddpm::io::npz::read_npz;
use ddpm::nn::{ParamStore, UNet};
use ddpm::{Tensor, Var};
use ndarray::{ArrayD, Axis};

#[allow(dead_code)]
#[path = "../examples/counter_checkpoint.rs"]
mod counter_checkpoint;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers")
}

fn npz(name: &str) -> BTreeMap<String, ArrayD<f64>> {
    read_npz(&fixtures().join(name)).expect("fixture reads").into_iter().map(|e| (e.name, e.values)).collect()
}

fn max_abs_diff(a: &ArrayD<f64>, b: &ArrayD<f64>) -> f64 {
    assert_eq!(a.shape(), b.shape());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// ddpm's ε for the fixture's x and per-image t.
fn eps(net: &UNet, params: &ParamStore, f: &BTreeMap<String, ArrayD<f64>>) -> ArrayD<f64> {
    let x: Tensor = f["x"].mapv(|v| v as f32);
    let t: Vec<f32> = f["t"].iter().map(|&t| t as f32).collect();
    net.forward(&params.bind_constant(), &Var::constant(x), &t, None).value().mapv(f64::from)
}

#[test]
fn small_diffusers_model_gives_diffusers_eps() {
    let m = load_folder(&fixtures().join("small")).expect("the save_pretrained folder imports");
    let net = UNet::new(m.unet).unwrap();
    let f = npz("small_eps.npz");
    let got = eps(&net, &m.params, &f);
    let err = max_abs_diff(&got, &f["eps"]);
    eprintln!(
        "small: max |ddpm - diffusers f32| = {err:.2e}, vs diffusers f64 = {:.2e}",
        max_abs_diff(&got, &f["eps_f64"])
    );
    assert!(err <= 1e-4, "max abs error {err}");
    let s = m.scheduler.expect("the folder has scheduler_config.json");
    assert_eq!((s.variance_type, s.clip_sample, s.timesteps), (VarianceType::FixedLarge, true, 1000));
}

#[test]
fn cifar10_shaped_diffusers_model_gives_diffusers_eps() {
    let path = fixtures().join("cifar10/config.json");
    let json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let config = unet_config_from_json(&json, &path).expect("the config maps");
    assert_eq!(config, ddpm::nn::UNetConfig { dropout: 0.0, ..ddpm::nn::Preset::Cifar10.config(3, 32) });
    let net = UNet::new(config).unwrap();
    let template = net.init_params(&mut ddpm::rng_from_seed(0));
    assert_eq!(template.num_scalars(), 35_746_307);
    // The counter numbers tensors by their diffusers names, as the fixture script does.
    let names: Vec<String> = template.names().iter().map(|n| diffusers_name(n, 4)).collect();
    let params = counter_params(&template, &names);
    let f = npz("cifar10_eps.npz");
    let got = eps(&net, &params, &f);
    let err = max_abs_diff(&got, &f["eps"]);
    eprintln!(
        "cifar10: max |ddpm - diffusers f32| = {err:.2e}, vs diffusers f64 = {:.2e}",
        max_abs_diff(&got, &f["eps_f64"])
    );
    assert!(err <= 1e-4, "max abs error {err}");
}

/// DDPMScheduler.step through ddpm's p_θ: x̂_0, and x_{t−1} = μ_θ + exp(½ log σ²) z (z at t > 0).
fn step(
    s: &NoiseSchedule,
    variance: VarianceType,
    clip: bool,
    t: usize,
    f: &BTreeMap<String, ArrayD<f64>>,
    key: &str,
) -> (ArrayD<f64>, ArrayD<f64>) {
    let param = Parameterization { mean_type: MeanType::Eps, variance_type: variance };
    let x_t = &f[&format!("{key}.sample")];
    let out = ModelOutput::split(f[&format!("{key}.model_output")].clone(), variance);
    let ts = vec![t; x_t.len_of(Axis(0))];
    let p = p_mean_variance(s, &param, x_t, &ts, &out, clip);
    let noise = &f[&format!("{key}.noise")];
    let prev = if t > 0 { &p.mean + &(&p.log_variance.mapv(|l| (0.5 * l).exp()) * noise) } else { p.mean };
    (prev, p.x0_pred)
}

#[test]
fn diffusers_convention_reproduces_ddpm_scheduler_steps() {
    let f = npz("scheduler_steps.npz");
    let diffusers =
        NoiseSchedule::new(&BetaSchedule::Linear, 1000, Convention::Diffusers.settings()).unwrap();
    let ho = NoiseSchedule::new(&BetaSchedule::Linear, 1000, Convention::Ho2020.settings()).unwrap();
    // β and ᾱ are diffusers' float32 tables, bit for bit.
    assert_eq!(diffusers.alpha_bar().to_vec(), f["alphas_cumprod"].iter().copied().collect::<Vec<_>>());
    let linspace = ddpm::diffusion::schedule::torch_linspace_f32(1e-4, 0.02, 1000);
    assert_eq!(linspace, f["betas"].iter().copied().collect::<Vec<_>>());
    let acp_rel_ho =
        ho.alpha_bar().iter().zip(&f["alphas_cumprod"]).map(|(a, b)| (a - b).abs() / b).fold(0.0, f64::max);
    eprintln!("alphas_cumprod max rel difference of the ho2020 (float64) tables: {acp_rel_ho:.2e}");
    let acp32: Vec<f32> = diffusers.alpha_bar().iter().map(|&a| a as f32).collect();
    let (mut worst, mut worst_f32) = (0.0f64, 0.0f64);
    for (name, variance, step_variance) in [
        ("fixed_small", VarianceType::FixedSmall, StepVariance::FixedSmall),
        ("fixed_small_log", VarianceType::FixedSmall, StepVariance::FixedSmallLog),
        ("fixed_large", VarianceType::FixedLarge, StepVariance::FixedLarge),
    ] {
        for clip in [true, false] {
            for t in [999, 500, 1, 0] {
                let key = format!("{name}.{}.t{t}", if clip { "clip" } else { "noclip" });
                let want_prev = &f[&format!("{key}.prev_sample")];
                let want_x0 = &f[&format!("{key}.pred_original_sample")];
                let (prev, x0) = step(&diffusers, variance, clip, t, &f, &key);
                let err = max_abs_diff(&prev, want_prev);
                // diffusers forms x̂_0 = (x_t − √(1−ᾱ) ε)/√ᾱ in f32: the rounding of the two terms
                // (|·| · 2⁻²⁴ each) is amplified by 1/√ᾱ (156 at t = 999). The bound allows that
                // rounding, and 1e-6 relative on top; `x0_rel` is the error over that bound.
                let ab = diffusers.alpha_bar()[t];
                let (xs, mo) = (&f[&format!("{key}.sample")], &f[&format!("{key}.model_output")]);
                let x0_rel =
                    ndarray::Zip::from(&x0).and(want_x0).and(xs).and(mo).fold(0.0f64, |m, &a, &b, &x, &e| {
                        let rounding = 2f64.powi(-24) * (x.abs() + (1.0 - ab).sqrt() * e.abs()) / ab.sqrt();
                        m.max((a - b).abs() / (rounding + 1e-6 * b.abs().max(1.0)))
                    });
                let (ho_prev, _) = step(&ho, variance, clip, t, &f, &key);
                let f32_of = |k: &str| f[&format!("{key}.{k}")].mapv(|v| v as f32);
                let s32 = ddpm_scheduler_step_f32(
                    &acp32,
                    MeanType::Eps,
                    step_variance,
                    clip,
                    t,
                    &f32_of("model_output"),
                    &f32_of("sample"),
                    &f32_of("noise"),
                );
                let err32 = max_abs_diff(&s32.prev_sample.mapv(f64::from), want_prev);
                let err32_x0 = max_abs_diff(&s32.pred_original_sample.mapv(f64::from), want_x0);
                eprintln!("{key:28} f32 step: x_prev max abs err {err32:.2e}  x0 max abs err {err32_x0:.2e}");
                assert!(err32 <= 1e-6, "{key}: f32 step x_prev max abs error {err32}");
                worst_f32 = worst_f32.max(err32);
                eprintln!(
                    "{key:28} x_prev max abs err {err:.2e}  x0 err / f32 bound {x0_rel:.2}  (ho2020 convention: {:.2e})",
                    max_abs_diff(&ho_prev, want_prev)
                );
                assert!(err <= 1e-6, "{key}: x_prev max abs error {err}");
                assert!(x0_rel <= 1.0, "{key}: x0 error {x0_rel} times its f32 bound");
                worst = worst.max(err);
            }
        }
    }
    eprintln!("scheduler steps: worst x_prev max abs error: f32 step {worst_f32:.2e}, diffusers convention (f64) {worst:.2e}");
}

fn ddpm_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ddpm")).args(args).output().expect("the ddpm binary runs")
}

fn ok(out: std::process::Output) {
    assert!(out.status.success(), "ddpm failed: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn exported_checkpoint_runs_in_diffusers_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck.safetensors");
    let (config, params) = counter_checkpoint::fixture_checkpoint();
    ddpm::io::checkpoint::save_weights(&ck, &config, &params, "test", None).unwrap();
    let export = dir.path().join("export");
    ok(ddpm_cli(&["export", "--diffusers", export.to_str().unwrap(), "--checkpoint", ck.to_str().unwrap()]));

    // The same config.json as the one diffusers loaded for the fixture.
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(read(&export.join("config.json")), read(&fixtures().join("export_config.json")));
    for file in ["model_index.json", "scheduler_config.json", "diffusion_pytorch_model.safetensors"] {
        assert!(export.join(file).is_file(), "{file}");
    }

    // diffusers' ε on the exported folder = ddpm's ε on the checkpoint.
    let net = UNet::new(config.unet.clone()).unwrap();
    let f = npz("export_eps.npz");
    let got = eps(&net, &params, &f);
    let err = max_abs_diff(&got, &f["eps"]);
    eprintln!(
        "export: max |ddpm - diffusers f32| = {err:.2e}, vs diffusers f64 = {:.2e}",
        max_abs_diff(&got, &f["eps_f64"])
    );
    assert!(err <= 1e-4, "max abs error {err}");

    // Import gives back the same weights bit for bit, with diffusers' scheduler settings.
    let run = dir.path().join("run");
    ok(ddpm_cli(&["import", "--diffusers", export.to_str().unwrap(), "--out", run.to_str().unwrap()]));
    let back = ddpm::io::checkpoint::load(&run.join("checkpoint.safetensors")).unwrap();
    assert_eq!(back.config.unet, config.unet);
    assert_eq!(back.config.diffusion.convention, Convention::Diffusers);
    assert_eq!(back.config.diffusion.variance_type, VarianceType::FixedLarge);
    assert_eq!(back.clip_x0, Some(true));
    let back_ema = back.ema_params();
    for (name, t) in params.iter() {
        assert_eq!(back_ema.get(name).unwrap(), t, "{name}");
        assert_eq!(back.params.get(name).unwrap(), t, "{name}");
    }

    // `ddpm predict` on the diffusers folder = the library forward on the checkpoint.
    let x: Tensor = f["x"].mapv(|v| v as f32);
    let x_path = dir.path().join("x.npy");
    ddpm::io::npz::write_npy_f32(&x_path, &x).unwrap();
    let out_path = dir.path().join("eps.npy");
    let (xs, outs) = (x_path.to_str().unwrap(), out_path.to_str().unwrap());
    ok(ddpm_cli(&["predict", "--model", export.to_str().unwrap(), "--x", xs, "--t", "500", "--out", outs]));
    let predicted = ddpm::io::npz::read_npy_f32(&out_path).unwrap();
    let direct = net.forward(&params.bind_constant(), &Var::constant(x), &[500.0; 3], None);
    assert_eq!(&predicted, direct.value());
}
