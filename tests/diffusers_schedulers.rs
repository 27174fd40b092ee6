//! `ddpm::interop::diffusers::DiffusersScheduler` against diffusers 0.42.1's `DDPMScheduler` and
//! `DDIMScheduler`, on every `sched_*` fixture of tests/fixtures/diffusers_family (written by
//! tests/fixtures/make_diffusers_family_fixture.py with torch 2.15.0 on the CPU; the fixtures'
//! README documents each array and each formula). No Python is needed here.
//!
//! For each fixture listed in index.json (and the test fails if a `sched_*.npz` is not listed,
//! so a new fixture is covered without editing this file):
//! - its `scheduler_config.json` is read with `DiffusersSchedulerConfig::from_json` and written
//!   back by `to_json` unchanged;
//! - β and ᾱ equal diffusers' float32 tables bit for bit; the timesteps of `set_timesteps(K)`
//!   (or the full chain when the fixture never called it), each step's previous timestep, the ᾱ
//!   pair it uses and whether it draws noise are equal exactly;
//! - the whole run is replayed step by step from the recorded x_t, model output and noise:
//!   x_{t−1} and x̂_0 within 3e-7 absolute of diffusers', NaN exactly where diffusers gives NaN.
//!
//! Run with `--nocapture` for the measured error of each fixture.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ddpm::interop::diffusers::{DiffusersScheduler, DiffusersSchedulerConfig};
use ddpm::io::npz::read_npz;
use ddpm::Tensor;
use ndarray::{ArrayD, Axis};
use serde_json::{json, Value};

/// The acceptance bound: |ddpm − diffusers| for x_{t−1} and x̂_0, every element of every step.
const TOLERANCE: f64 = 3e-7;

/// The fixtures where diffusers itself returns NaN for every x_{t−1} (README, facts S10, S12).
/// - `sched_ddpm_fixed_large_log_k10`: `_get_variance` returns ln β'_t for `fixed_large_log` and
///   `step` takes its square root, √(negative) = NaN at every step with t > 0.
/// - `sched_ddim_zero_snr_trailing_eta1_k10`: with zero terminal SNR, ᾱ_49 = 0, so at the first
///   step σ² = 1 − ᾱ_prev exactly, but in f32 1 − ᾱ_prev − σ² = −6e-8 and its square root is NaN;
///   the NaN then runs through the whole chain.
///
/// ddpm computes what diffusers computes, so it gives NaN at the same places; the test asserts
/// that (and that these two are entirely NaN, so a change in diffusers' fixtures shows up).
const ALL_NAN: [&str; 2] = ["sched_ddpm_fixed_large_log_k10", "sched_ddim_zero_snr_trailing_eta1_k10"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers_family")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture reads")).expect("fixture is JSON")
}

fn npz(path: &Path) -> BTreeMap<String, ArrayD<f64>> {
    read_npz(path).expect("fixture reads").into_iter().map(|e| (e.name, e.values)).collect()
}

/// One fixture's entry of index.json: the scheduler loop's K (None: no `set_timesteps`) and η.
struct Variant {
    name: String,
    k: Option<usize>,
    eta: f64,
}

fn variants() -> Vec<Variant> {
    let index = read_json(&fixtures().join("index.json"));
    let list = index["schedulers"].as_array().expect("index.json lists the schedulers");
    list.iter()
        .map(|s| Variant {
            name: s["name"].as_str().expect("name").to_owned(),
            k: s["K"].as_u64().map(|k| k as usize),
            eta: s["eta"].as_f64().unwrap_or(0.0),
        })
        .collect()
}

/// Step i of a `[K, …]` array, as f32.
fn step_of(a: &ArrayD<f64>, i: usize) -> Tensor {
    a.index_axis(Axis(0), i).mapv(|v| v as f32)
}

/// Max |got − want| over the entries where `want` is finite, after checking that `got` is NaN
/// exactly where `want` is NaN and infinite with the same sign where `want` is.
fn compare(got: &Tensor, want: &ArrayD<f64>, what: &str) -> f64 {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let mut worst = 0.0f64;
    for (&g, &w) in got.iter().zip(want) {
        let g = f64::from(g);
        if w.is_nan() || !w.is_finite() {
            assert!(g.is_nan() == w.is_nan() && (w.is_nan() || g == w), "{what}: got {g}, diffusers {w}");
        } else {
            assert!(g.is_finite(), "{what}: got {g} where diffusers has {w}");
            worst = worst.max((g - w).abs());
        }
    }
    worst
}

/// The measured result of one fixture.
struct Replay {
    steps: usize,
    prev_sample: f64,
    pred_original_sample: f64,
    nan_prev_sample: usize,
    /// Elements of all x_{t−1} together.
    len_prev_sample: usize,
}

fn replay(v: &Variant) -> Replay {
    let dir = fixtures();
    let json_path = dir.join(format!("{}.json", v.name));
    let cfg_json = read_json(&json_path);
    let config = DiffusersSchedulerConfig::from_json(&cfg_json, &json_path)
        .unwrap_or_else(|e| panic!("{}: config refused: {e}", v.name));
    assert_eq!(config.to_json(), cfg_json, "{}: to_json differs from diffusers' save_config", v.name);
    let mut s = DiffusersScheduler::new(config);
    if let Some(k) = v.k {
        s.set_timesteps(k).unwrap_or_else(|e| panic!("{}: set_timesteps({k}): {e}", v.name));
    }
    let f = npz(&dir.join(format!("{}.npz", v.name)));

    // Tables and timesteps, exactly.
    let widen = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>();
    assert_eq!(widen(s.betas()), f["betas"].iter().copied().collect::<Vec<_>>(), "{}: betas", v.name);
    let acp: Vec<f64> = f["alphas_cumprod"].iter().copied().collect();
    assert_eq!(widen(s.alphas_cumprod()), acp, "{}: alphas_cumprod", v.name);
    let timesteps: Vec<usize> = f["timesteps"].iter().map(|&t| t as usize).collect();
    assert_eq!(s.timesteps(), &timesteps[..], "{}: timesteps", v.name);

    let (mut worst_prev, mut worst_x0, mut nan_prev) = (0.0f64, 0.0f64, 0usize);
    for (i, &t) in timesteps.iter().enumerate() {
        let at = format!("{} step {i} (t = {t})", v.name);
        let prev_t = s.previous_timestep(t).unwrap();
        assert_eq!(prev_t as f64, f["prev_timesteps"][i], "{at}: previous timestep");
        assert_eq!(f64::from(s.alphas_cumprod()[t]), f["alpha_prod_t"][i], "{at}: ᾱ_t");
        let ab_prev = usize::try_from(prev_t).map_or(s.final_alpha_cumprod(), |p| s.alphas_cumprod()[p]);
        assert_eq!(f64::from(ab_prev), f["alpha_prod_t_prev"][i], "{at}: ᾱ_prev");
        assert_eq!(s.draws_noise(t, v.eta), f["noise_drawn"][i] != 0.0, "{at}: noise drawn");

        let out = s
            .step(&step_of(&f["model_output"], i), t, &step_of(&f["x_t"], i), &step_of(&f["noise"], i), v.eta)
            .unwrap_or_else(|e| panic!("{at}: {e}"));
        let want_prev = f["prev_sample"].index_axis(Axis(0), i).to_owned();
        let want_x0 = f["pred_original_sample"].index_axis(Axis(0), i).to_owned();
        worst_prev = worst_prev.max(compare(&out.prev_sample, &want_prev, &format!("{at}: prev_sample")));
        worst_x0 = worst_x0.max(compare(&out.pred_original_sample, &want_x0, &format!("{at}: x̂_0")));
        nan_prev += want_prev.iter().filter(|x| x.is_nan()).count();
    }
    Replay {
        steps: timesteps.len(),
        prev_sample: worst_prev,
        pred_original_sample: worst_x0,
        nan_prev_sample: nan_prev,
        len_prev_sample: f["prev_sample"].len(),
    }
}

#[test]
fn every_fixture_is_listed_in_the_index() {
    let listed: Vec<String> = variants().into_iter().map(|v| v.name).collect();
    let mut on_disk = 0;
    for entry in std::fs::read_dir(fixtures()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_prefix("sched_").and_then(|n| n.strip_suffix(".npz")) {
            assert!(listed.contains(&format!("sched_{stem}")), "{name} is not in index.json");
            on_disk += 1;
        }
    }
    assert_eq!(on_disk, listed.len());
    assert!(on_disk >= 46, "expected the 46 scheduler fixtures, found {on_disk}");
}

#[test]
fn steps_equal_diffusers_over_every_fixture_run() {
    let mut failures = Vec::new();
    eprintln!("{:40} {:>5} {:>12} {:>12}  NaN x_(t-1)", "fixture", "steps", "x_(t-1)", "x̂_0");
    for v in variants() {
        let r = replay(&v);
        eprintln!(
            "{:40} {:>5} {:>12.2e} {:>12.2e}  {}",
            v.name, r.steps, r.prev_sample, r.pred_original_sample, r.nan_prev_sample
        );
        if r.prev_sample > TOLERANCE || r.pred_original_sample > TOLERANCE {
            failures.push(format!("{}: {:.2e} / {:.2e}", v.name, r.prev_sample, r.pred_original_sample));
        }
        if ALL_NAN.contains(&v.name.as_str()) {
            // Every x_{t−1} of the run is NaN in diffusers, and (asserted in `compare`) in ddpm.
            assert_eq!(r.nan_prev_sample, r.len_prev_sample, "{}: diffusers is all NaN", v.name);
        } else {
            assert_eq!(r.nan_prev_sample, 0, "{}: unexpected NaN in diffusers' output", v.name);
        }
    }
    assert!(failures.is_empty(), "above {TOLERANCE:e}: {failures:?}");
}

#[test]
fn unknown_keys_and_values_are_refused_naming_the_key() {
    let p = Path::new("scheduler_config.json");
    let ddpm = DiffusersSchedulerConfig::ddpm().to_json();
    let ddim = DiffusersSchedulerConfig::ddim().to_json();
    let cases = [
        (&ddpm, "use_karras_sigmas", json!(true)),
        (&ddpm, "variance_type", json!("fixed_medium")),
        (&ddpm, "prediction_type", json!("score")),
        (&ddpm, "timestep_spacing", json!("uniform")),
        (&ddpm, "beta_schedule", json!("sigmoid")),
        (&ddpm, "beta_schedule", json!("cubic")),
        (&ddpm, "trained_betas", json!([0.1, 0.2])),
        (&ddpm, "num_train_timesteps", json!(0)),
        (&ddpm, "steps_offset", json!(-1)),
        (&ddpm, "clip_sample", json!("yes")),
        (&ddpm, "_class_name", json!("EulerDiscreteScheduler")),
        (&ddim, "variance_type", json!("fixed_small")),
        (&ddim, "set_alpha_to_one", json!(1)),
        (&ddim, "beta_schedule", json!("sigmoid")),
    ];
    for (base, key, value) in cases {
        let mut bad = base.clone();
        bad[key] = value.clone();
        let err = DiffusersSchedulerConfig::from_json(&bad, p)
            .map(|_| ())
            .expect_err(&format!("{key} = {value} is accepted"))
            .to_string();
        assert!(err.contains(&format!("`{key}`")), "{key} = {value}: {err}");
    }
    // A ratio outside [0, 1] only matters (torch.quantile raises) when thresholding is on.
    let mut bad = ddpm.clone();
    bad["dynamic_thresholding_ratio"] = json!(1.5);
    assert!(DiffusersSchedulerConfig::from_json(&bad, p).is_ok());
    bad["thresholding"] = json!(true);
    let err = DiffusersSchedulerConfig::from_json(&bad, p).unwrap_err().to_string();
    assert!(err.contains("`dynamic_thresholding_ratio`"), "{err}");
}

#[test]
fn import_settings_refuse_what_the_sampler_lacks_and_point_to_the_scheduler() {
    use ddpm::interop::diffusers::SchedulerSettings;
    let p = Path::new("scheduler_config.json");
    for (name, key) in [
        ("sched_ddpm_thresholding_k10", "thresholding"),
        ("sched_ddpm_clip_range_0.5_k10", "clip_sample_range"),
        ("sched_ddpm_steps_offset1_k10", "steps_offset"),
        ("sched_ddpm_zero_snr_trailing_k10", "rescale_betas_zero_snr"),
        ("sched_ddpm_scaled_linear_k10", "beta_schedule"),
        ("sched_ddpm_learned_k10", "variance_type"),
        ("sched_ddim_base_eta0_k10", "_class_name"),
    ] {
        let v = read_json(&fixtures().join(format!("{name}.json")));
        assert!(DiffusersSchedulerConfig::from_json(&v, p).is_ok(), "{name}: the full config reads");
        let err = SchedulerSettings::from_json(&v, p).unwrap_err().to_string();
        assert!(err.contains(&format!("`{key}`")), "{name}: {err}");
        assert!(err.contains("DiffusersScheduler"), "{name}: {err}");
    }
    for name in ["sched_ddpm_base_k10", "sched_ddpm_v_prediction_k10", "sched_ddpm_squaredcos_k10"] {
        let v = read_json(&fixtures().join(format!("{name}.json")));
        SchedulerSettings::from_json(&v, p).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
