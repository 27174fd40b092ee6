//! Generating images: ancestral sampling (Ho et al. 2020, Algorithm 2) and DDIM (Song et al.
//! 2021, arXiv:2010.02502, Eq. 12), on the full schedule or a respaced one, with snapshots of
//! x_t along the way (the x_T → x_0 strip of the paper's Figure 6).
//!
//! **Respacing** (Nichol & Dhariwal 2021, §4): for K < T steps the sampler visits the code
//! timesteps `S = round(k·(T−1)/(K−1))`, k = 0 … K−1 (always including 0 and T−1), and runs
//! the process whose cumulative products are ᾱ at those steps: β'_i = 1 − ᾱ_{S_i}/ᾱ_{S_{i−1}}
//! (ᾱ before S_0 is 1). The network is still given the original timestep S_i. With K = T this
//! is the original process.
//!
//! Sampling runs the network with no tape. The diffusion arithmetic is f64 (the network f32).

use ndarray::ArrayD;
use rand::Rng as _;
use rand_distr::StandardNormal;

use crate::diffusion::gaussian::predict_eps_from_x0;
use crate::diffusion::{p_mean_variance, p_sample, ModelOutput, NoiseSchedule, Parameterization, Table};
use crate::nn::{ParamStore, UNet};
use crate::stop::StopFlag;
use crate::{Error, Result, Rng, Tensor, Var};

/// Which reverse process to run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    /// x_{t−1} ~ p_θ(x_{t−1} | x_t) with the model's variance (Algorithm 2).
    Ancestral,
    /// DDIM with noise scale η (0: deterministic; 1: ancestral-like variance).
    Ddim {
        /// η of Song et al. Eq. (16).
        eta: f64,
    },
}

/// How to sample.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleConfig {
    /// The reverse process.
    pub sampler: Sampler,
    /// Number of steps K (respaced); `None` runs all T.
    pub steps: Option<usize>,
    /// Clip the predicted x_0 to [−1, 1] at every step (Ho et al.'s code does).
    pub clip_x0: bool,
    /// Keep this many snapshots of x_t, evenly spaced from x_T to x_0 (0 for none).
    pub trajectory_frames: usize,
    /// Checked before every step: when raised, sampling ends with [`Error::Interrupted`].
    pub stop: Option<StopFlag>,
    /// The class of every image, for a class-conditional network (`None` for an unconditional
    /// one).
    pub class: Option<usize>,
}

/// One snapshot of the reverse process.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The original (code) timestep of x_t; `None` for the final x_0.
    pub t: Option<usize>,
    /// x_t, `[N, C, H, W]`.
    pub x: Tensor,
}

/// The result of a sampling run.
#[derive(Clone, Debug)]
pub struct Samples {
    /// x_0, `[N, C, H, W]`, not clipped (clip to [−1, 1] to display).
    pub images: Tensor,
    /// Snapshots from x_T to x_0, if asked for.
    pub trajectory: Vec<Frame>,
}

/// The visited timesteps for K steps out of T, increasing: `round(k·(T−1)/(K−1))`.
///
/// # Errors
/// [`Error::InvalidConfig`] unless 2 ≤ K ≤ T: a respaced process of one step has no β̃ at its
/// first step for the variance conventions to borrow, so one step is refused with that advice.
pub fn respaced_timesteps(big_t: usize, k: usize) -> Result<Vec<usize>> {
    if k < 2 || k > big_t {
        let why = if k == 1 { "a respaced process needs at least 2 steps" } else { "out of range" };
        return Err(Error::config(
            "sampling steps (--steps)",
            format!("{k} steps for a process of T = {big_t}: {why}; use a value in 2..={big_t}"),
        ));
    }
    let mut s: Vec<usize> =
        (0..k).map(|i| ((i as f64) * (big_t - 1) as f64 / (k - 1) as f64).round() as usize).collect();
    s.dedup();
    Ok(s)
}

/// The schedule of the process restricted to `timesteps` (increasing code indices), see the
/// module docs.
///
/// # Errors
/// As [`NoiseSchedule::from_betas`].
pub fn respace(schedule: &NoiseSchedule, timesteps: &[usize]) -> Result<NoiseSchedule> {
    let ab = schedule.alpha_bar();
    let mut prev = 1.0;
    let betas: Vec<f64> = timesteps
        .iter()
        .map(|&s| {
            let b = 1.0 - ab[s] / prev;
            prev = ab[s];
            b
        })
        .collect();
    NoiseSchedule::from_betas(betas, *schedule.conventions())
}

/// Draws `n` images of `shape = [C, H, W]` from the model.
///
/// `progress(done, total)` is called after every step.
///
/// # Errors
/// An invalid step count for this schedule; a class missing for a class-conditional network or
/// given to an unconditional one ([`crate::nn::UNetConfig::check_class`]); [`Error::Interrupted`]
/// if `config.stop` is raised.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    net: &UNet,
    params: &ParamStore,
    schedule: &NoiseSchedule,
    param: &Parameterization,
    n: usize,
    config: &SampleConfig,
    rng: &mut Rng,
    mut progress: impl FnMut(usize, usize),
) -> Result<Samples> {
    let big_t = schedule.num_timesteps();
    let steps = respaced_timesteps(big_t, config.steps.unwrap_or(big_t))?;
    let sched = if steps.len() == big_t { schedule.clone() } else { respace(schedule, &steps)? };
    let c = &net.config;
    let shape = [n, c.in_channels, c.resolution, c.resolution];
    let mut x: ArrayD<f64> =
        ArrayD::from_shape_simple_fn(shape.as_slice(), || rng.sample::<f64, _>(StandardNormal));
    net.config.check_class(config.class)?;
    let labels = config.class.map(|c| vec![c; n]);
    let bound = params.bind_constant();
    let k = steps.len();
    let frame_at: Vec<usize> = match config.trajectory_frames {
        0 => vec![],
        1 => vec![k],
        f => (0..f).map(|i| (i as f64 * k as f64 / (f - 1) as f64).round() as usize).collect(),
    };
    let mut trajectory = vec![];
    for (done, i) in (0..k).rev().enumerate() {
        if config.stop.as_ref().is_some_and(|s| s.requested().is_some()) {
            return Err(Error::Interrupted);
        }
        if frame_at.contains(&done) {
            trajectory.push(Frame { t: Some(steps[i]), x: x.mapv(|v| v as f32) });
        }
        let t_orig = steps[i];
        let model_t = vec![schedule.model_timestep(t_orig) as f32; n];
        let out = net.forward_labelled(
            &bound,
            &Var::constant(x.mapv(|v| v as f32)),
            &model_t,
            labels.as_deref(),
            None,
        );
        let output = ModelOutput::split(out.value().mapv(|v| v as f64), param.variance_type);
        let t = vec![i; n];
        x = match config.sampler {
            Sampler::Ancestral => p_sample(&sched, param, &x, &t, &output, config.clip_x0, rng).x_prev,
            Sampler::Ddim { eta } => ddim_step(&sched, param, &x, &t, &output, config.clip_x0, eta, rng),
        };
        progress(done + 1, k);
    }
    let images = x.mapv(|v| v as f32);
    if frame_at.contains(&k) {
        trajectory.push(Frame { t: None, x: images.clone() });
    }
    Ok(Samples { images, trajectory })
}

/// One ancestral step of a [`trace`]: everything that went into x_{t−1}, each `[N, C, H, W]`.
#[derive(Clone, Debug)]
pub struct TraceStep {
    /// The code timestep t (0-based).
    pub t: usize,
    /// x_t, the input of the step.
    pub x_t: ArrayD<f64>,
    /// The network's raw output (ε_θ(x_t, t) for ε-prediction; `[N, 2C, H, W]` when the
    /// variance is learned).
    pub eps: ArrayD<f64>,
    /// x̂_0 implied by the output (clipped when sampling clips).
    pub x0_pred: ArrayD<f64>,
    /// μ_θ(x_t, t).
    pub mean: ArrayD<f64>,
    /// σ_t² of p_θ(x_{t−1} ∣ x_t).
    pub variance: ArrayD<f64>,
    /// z ~ N(0, I) of x_{t−1} = μ_θ + σ_t z; zeros at t = 0, where no noise is added.
    pub noise: ArrayD<f64>,
    /// x_{t−1}, the output of the step.
    pub x_prev: ArrayD<f64>,
}

/// A traced ancestral sampling run.
#[derive(Clone, Debug)]
pub struct Trace {
    /// x_T ~ N(0, I), the start, `[N, C, H, W]`.
    pub x_start: ArrayD<f64>,
    /// The kept steps, from the largest t down.
    pub steps: Vec<TraceStep>,
    /// The final x_0, `[N, C, H, W]`.
    pub x0: ArrayD<f64>,
}

/// Ancestral sampling (Algorithm 2) over all T steps, keeping every intermediate of the steps for
/// which `keep(t)` holds. It draws exactly what [`sample`] with [`Sampler::Ancestral`] and all
/// steps draws from `rng`, so its x_0 equals that of `ddpm sample` with the same seed. `class`
/// labels every image of a class-conditional network.
///
/// # Panics
/// If `class` does not fit the network ([`crate::nn::UNetConfig::check_class`] says why).
#[allow(clippy::too_many_arguments)]
pub fn trace(
    net: &UNet,
    params: &ParamStore,
    schedule: &NoiseSchedule,
    param: &Parameterization,
    n: usize,
    clip_x0: bool,
    class: Option<usize>,
    keep: impl Fn(usize) -> bool,
    rng: &mut Rng,
    mut progress: impl FnMut(usize, usize),
) -> Trace {
    let c = &net.config;
    let shape = [n, c.in_channels, c.resolution, c.resolution];
    let x_start: ArrayD<f64> =
        ArrayD::from_shape_simple_fn(shape.as_slice(), || rng.sample::<f64, _>(StandardNormal));
    let bound = params.bind_constant();
    let labels = class.map(|c| vec![c; n]);
    let big_t = schedule.num_timesteps();
    let mut x = x_start.clone();
    let mut steps = vec![];
    for (done, i) in (0..big_t).rev().enumerate() {
        let model_t = vec![schedule.model_timestep(i) as f32; n];
        let out = net.forward_labelled(
            &bound,
            &Var::constant(x.mapv(|v| v as f32)),
            &model_t,
            labels.as_deref(),
            None,
        );
        let eps = out.value().mapv(|v| v as f64);
        let output = ModelOutput::split(eps.clone(), param.variance_type);
        let t = vec![i; n];
        let p = p_mean_variance(schedule, param, &x, &t, &output, clip_x0);
        // The same draw as p_sample's, so the run is the one `sample` makes.
        let z = crate::diffusion::gaussian::standard_normal(x.shape(), rng);
        let noise = if i > 0 { z } else { ArrayD::zeros(x.raw_dim()) };
        let x_prev = &p.mean + &(&p.log_variance.mapv(|l| (0.5 * l).exp()) * &noise);
        if keep(i) {
            steps.push(TraceStep {
                t: i,
                x_t: x.clone(),
                eps,
                x0_pred: p.x0_pred,
                mean: p.mean,
                variance: p.variance,
                noise,
                x_prev: x_prev.clone(),
            });
        }
        x = x_prev;
        progress(done + 1, big_t);
    }
    Trace { x_start, steps, x0: x }
}

/// One DDIM step (Song et al. 2021, Eq. 12): with x̂_0 and ε̂ from the model,
/// `x_{t−1} = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂ + σ_t z`,
/// `σ_t = η √((1 − ᾱ_{t−1})/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t−1})` (Eq. 16); no noise at the last step.
#[allow(clippy::too_many_arguments)]
pub fn ddim_step(
    schedule: &NoiseSchedule,
    param: &Parameterization,
    x_t: &ArrayD<f64>,
    t: &[usize],
    output: &ModelOutput,
    clip_x0: bool,
    eta: f64,
    rng: &mut Rng,
) -> ArrayD<f64> {
    let x0 = p_mean_variance(schedule, param, x_t, t, output, clip_x0).x0_pred;
    let eps = predict_eps_from_x0(schedule, x_t, t, &x0);
    let mut out = ArrayD::zeros(x_t.raw_dim());
    for (n, &ti) in t.iter().enumerate() {
        let ab = schedule.table(Table::AlphaBar)[ti];
        let ab_prev = schedule.table(Table::AlphaBarPrev)[ti];
        let sigma = eta * ((1.0 - ab_prev) / (1.0 - ab)).sqrt() * (1.0 - ab / ab_prev).sqrt();
        let dir = (1.0 - ab_prev - sigma * sigma).max(0.0).sqrt();
        let mut row = out.index_axis_mut(ndarray::Axis(0), n);
        let (x0n, epsn) = (x0.index_axis(ndarray::Axis(0), n), eps.index_axis(ndarray::Axis(0), n));
        ndarray::Zip::from(&mut row).and(&x0n).and(&epsn).for_each(|o, &a, &e| {
            let z = if ti > 0 && sigma > 0.0 { rng.sample::<f64, _>(StandardNormal) } else { 0.0 };
            *o = ab_prev.sqrt() * a + dir * e + sigma * z;
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::{BetaSchedule, Conventions};

    #[test]
    fn respacing_keeps_the_ends_and_alpha_bar() {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 1000, Conventions::default()).unwrap();
        let steps = respaced_timesteps(1000, 50).unwrap();
        assert_eq!((steps[0], *steps.last().unwrap(), steps.len()), (0, 999, 50));
        let r = respace(&s, &steps).unwrap();
        // ᾱ of the respaced process at step i is ᾱ of the original at S_i.
        for (i, &si) in steps.iter().enumerate() {
            assert!(
                (r.alpha_bar()[i] - s.alpha_bar()[si]).abs() < 1e-12 * s.alpha_bar()[si].max(1e-300) + 1e-15
            );
        }
        assert!(respaced_timesteps(1000, 0).is_err() && respaced_timesteps(10, 11).is_err());
        let one = respaced_timesteps(1000, 1).expect_err("one step").to_string();
        assert!(one.contains("--steps") && one.contains("2..=1000"), "{one}");
    }

    #[test]
    fn trace_follows_the_same_run_as_sample() {
        use crate::diffusion::{MeanType, VarianceType};
        let net = UNet::new(crate::nn::Preset::Tiny.config(1, 8)).unwrap();
        let params = net.init_params(&mut crate::rng_from_seed(4));
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 6, Conventions::default()).unwrap();
        let param = Parameterization { mean_type: MeanType::Eps, variance_type: VarianceType::FixedSmall };
        let cfg = SampleConfig {
            sampler: Sampler::Ancestral,
            steps: None,
            clip_x0: true,
            trajectory_frames: 0,
            stop: None,
            class: None,
        };
        let sampled =
            sample(&net, &params, &s, &param, 2, &cfg, &mut crate::rng_from_seed(9), |_, _| {}).unwrap();
        let tr = trace(
            &net,
            &params,
            &s,
            &param,
            2,
            true,
            None,
            |t| t != 3,
            &mut crate::rng_from_seed(9),
            |_, _| {},
        );
        assert_eq!(tr.x0.mapv(|v| v as f32), sampled.images);
        assert_eq!(tr.steps.iter().map(|st| st.t).collect::<Vec<_>>(), vec![5, 4, 2, 1, 0]);
        let last = tr.steps.last().unwrap();
        assert!(last.noise.iter().all(|&z| z == 0.0) && last.variance.iter().all(|&v| v == 0.0));
        // Each kept step: x_{t−1} = mean + σ z.
        let st = &tr.steps[1];
        let sigma = s.beta_tilde()[4].sqrt();
        let want = &st.mean + &(st.noise.mapv(|z| z * sigma));
        assert!(st.x_prev.iter().zip(want.iter()).all(|(a, b)| (a - b).abs() < 1e-12));
    }

    #[test]
    fn full_respacing_is_the_original_schedule() {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 100, Conventions::default()).unwrap();
        let r = respace(&s, &respaced_timesteps(100, 100).unwrap()).unwrap();
        for (a, b) in r.betas().iter().zip(s.betas().iter()) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}
