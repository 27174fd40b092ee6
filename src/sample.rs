//! Generating images with a U-Net: any sampler of [`crate::diffusion::samplers`] (ancestral,
//! DDIM, PNDM, DPM-Solver(++), Euler/Heun) driven by the network, with snapshots of x_t along
//! the way (the x_T → x_0 strip of the paper's Figure 6), and [`trace`], which keeps every
//! intermediate of chosen evaluations.
//!
//! **Respacing** (Nichol & Dhariwal 2021, §4): K < T steps visit K of the T timesteps, chosen by
//! a [`TimestepSpacing`] (linspace by default: round(linspace(0, T−1, K)) with numpy's
//! round-half-to-even, always including T−1 and 0), or the Karras σ schedule. Ancestral sampling
//! runs the process whose cumulative products are ᾱ at the visited steps,
//! β'_i = 1 − ᾱ_{S_i}/ᾱ_{S_{i−1}} (ᾱ before S_0 is 1); the network is still given the original
//! timestep S_i. With K = T this is the original process.
//!
//! Sampling runs the network with no tape. The diffusion arithmetic is f64 (the network f32).

use ndarray::ArrayD;
use rand::Rng as _;
use rand_distr::StandardNormal;

use crate::diffusion::samplers::{
    self, Advance, Grid, GridPoint, GridSpec, SamplerKind, SamplerOptions, Solver, TimestepSpacing,
};
use crate::diffusion::{ModelOutput, NoiseSchedule, Parameterization};
use crate::nn::{ParamStore, UNet};
use crate::stop::StopFlag;
use crate::{Error, Result, Rng, Tensor, Var};

pub use crate::diffusion::samplers::respaced_schedule;

/// How to sample.
#[derive(Clone, Debug, PartialEq)]
pub struct SampleConfig {
    /// The sampler.
    pub sampler: SamplerKind,
    /// Number of grid points K (respaced); `None` runs all T. A sampler may evaluate the network
    /// more than once per point (Heun, PNDM's warm-up): [`Solver::num_evals`].
    pub steps: Option<usize>,
    /// Which K of the T timesteps are visited.
    pub spacing: TimestepSpacing,
    /// Visit the Karras et al. σ schedule (ρ = 7) instead of spaced timesteps.
    pub karras: bool,
    /// η, clipping of x̂_0, DPM-Solver's variant, churn.
    pub options: SamplerOptions,
    /// Keep this many snapshots of x_t, evenly spaced from x_T to x_0 (0 for none).
    pub trajectory_frames: usize,
    /// Checked before every evaluation: when raised, sampling ends with [`Error::Interrupted`].
    pub stop: Option<StopFlag>,
    /// The class of every image, for a class-conditional network (`None` for an unconditional
    /// one).
    pub class: Option<usize>,
}

impl SampleConfig {
    /// Ancestral sampling over all T steps with x̂_0 clipped (Ho et al.'s setting).
    pub fn ancestral() -> Self {
        SampleConfig {
            sampler: SamplerKind::Ancestral,
            steps: None,
            spacing: TimestepSpacing::Linspace,
            karras: false,
            options: SamplerOptions { clip_x0: true, ..SamplerOptions::default() },
            trajectory_frames: 0,
            stop: None,
            class: None,
        }
    }

    /// The grid this configuration visits on `schedule`.
    ///
    /// # Errors
    /// An invalid step count or spacing for this schedule ([`Grid::from_schedule`]).
    pub fn grid(&self, schedule: &NoiseSchedule) -> Result<Grid> {
        let spec = GridSpec {
            steps: self.steps.unwrap_or(schedule.num_timesteps()),
            spacing: self.spacing,
            steps_offset: 0,
            karras: self.karras,
            dpm_layout: matches!(
                self.sampler,
                SamplerKind::DpmSolver(_)
                    | SamplerKind::DpmSolverMultistep(_)
                    | SamplerKind::DpmPlusPlus2S
                    | SamplerKind::DpmPlusPlus2M
                    | SamplerKind::DpmPlusPlus3M
                    | SamplerKind::DpmPlusPlus2MSde
            ),
            end: self.sampler.default_end(),
        };
        Grid::from_schedule(schedule, &spec)
    }
}

/// One snapshot of the reverse process.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The network timestep of x_t; `None` for the final x_0.
    pub t: Option<f64>,
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

/// The schedule of the process restricted to `timesteps` (increasing code indices), see the
/// module docs.
///
/// # Errors
/// As [`NoiseSchedule::from_betas`].
pub fn respace(schedule: &NoiseSchedule, timesteps: &[usize]) -> Result<NoiseSchedule> {
    let ab = schedule.alpha_bar();
    let points: Vec<GridPoint> = timesteps
        .iter()
        .rev()
        .map(|&s| GridPoint::from_alpha_bar(ab[s], schedule.model_timestep(s)))
        .collect();
    respaced_schedule(&points, schedule)
}

/// The sampler of `config` on `schedule`, started from x_T ~ N(0, I) of `shape` drawn from `rng`.
///
/// # Errors
/// As [`SampleConfig::grid`] and [`samplers::build`]; a shape too large for memory
/// ([`crate::files::check_array_size`]).
pub fn start(
    schedule: &NoiseSchedule,
    param: &Parameterization,
    shape: &[usize],
    config: &SampleConfig,
    rng: &mut Rng,
) -> Result<Box<dyn Solver>> {
    let grid = config.grid(schedule)?;
    // x_T, and the few arrays of its size a solver keeps (history, noise, the model's output).
    crate::files::check_array_size("sampling shape", shape, 8, 8)?;
    let x: ArrayD<f64> = ArrayD::from_shape_simple_fn(shape, || rng.sample::<f64, _>(StandardNormal));
    samplers::build(config.sampler, grid, schedule, *param, config.options, x)
}

/// A solver set up for `n` images of a network's shape, with the class labels it conditions on.
struct Started {
    solver: Box<dyn Solver>,
    labels: Option<Vec<usize>>,
}

/// [`start`] for `n` images of `net`'s shape, with the class labels of `config` (checked against
/// the network).
fn start_for(
    net: &UNet,
    schedule: &NoiseSchedule,
    param: &Parameterization,
    n: usize,
    config: &SampleConfig,
    rng: &mut Rng,
) -> Result<Started> {
    net.config.check_class(config.class)?;
    let c = &net.config;
    let solver = start(schedule, param, &[n, c.in_channels, c.resolution, c.resolution], config, rng)?;
    Ok(Started { solver, labels: config.class.map(|c| vec![c; n]) })
}

/// The network as a sampler's model: its output at (x, point), split per the variance type.
fn network<'a>(
    net: &'a UNet,
    bound: &'a crate::nn::Bound,
    param: &'a Parameterization,
    labels: Option<&'a [usize]>,
) -> impl FnMut(&ArrayD<f64>, &GridPoint) -> Result<ModelOutput> + 'a {
    move |x, at| {
        let n = x.shape()[0];
        let model_t = vec![at.model_t as f32; n];
        let out = net.forward_labelled(bound, &Var::constant(x.mapv(|v| v as f32)), &model_t, labels, None);
        Ok(ModelOutput::split(out.value().mapv(|v| v as f64), param.variance_type))
    }
}

/// Draws `n` images of the network's shape from the model.
///
/// `progress(done, total)` is called after every network evaluation.
///
/// # Errors
/// An invalid step count or sampler for this schedule and model; a class missing for a
/// class-conditional network or given to an unconditional one
/// ([`crate::nn::UNetConfig::check_class`]); [`Error::Interrupted`] if `config.stop` is raised.
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
    let Started { mut solver, labels } = start_for(net, schedule, param, n, config, rng)?;
    let bound = params.bind_constant();
    let total = solver.num_evals();
    let frame_at: Vec<usize> = match config.trajectory_frames {
        0 => vec![],
        1 => vec![total],
        f => (0..f).map(|i| (i as f64 * total as f64 / (f - 1) as f64).round() as usize).collect(),
    };
    let mut trajectory = vec![];
    let mut model = network(net, &bound, param, labels.as_deref());
    let mut done = 0;
    loop {
        if config.stop.as_ref().is_some_and(|s| s.requested().is_some()) {
            return Err(Error::Interrupted);
        }
        let Some(eval) = solver.next_eval(rng) else { break };
        if frame_at.contains(&done) {
            trajectory.push(Frame { t: Some(eval.at.model_t), x: eval.x.mapv(|v| v as f32) });
        }
        let (x_in, at) = (eval.x.clone(), eval.at);
        let out = model(&x_in, &at)?;
        solver.advance(out, rng)?;
        done += 1;
        progress(done, total);
    }
    let images = solver.x().mapv(|v| v as f32);
    if frame_at.contains(&total) {
        trajectory.push(Frame { t: None, x: images.clone() });
    }
    Ok(Samples { images, trajectory })
}

/// One network evaluation of a [`trace`]: everything that went into it and came out, each
/// `[N, C, H, W]`.
#[derive(Clone, Debug)]
pub struct TraceStep {
    /// 0-based index of the evaluation in the run.
    pub eval: usize,
    /// The network timestep it was given.
    pub t: f64,
    /// The code timestep (0-based) of the grid point, when it is one of the table's.
    pub index: Option<usize>,
    /// σ = √((1 − ᾱ)/ᾱ) of the point.
    pub sigma: f64,
    /// x_t, the network's input.
    pub x_t: ArrayD<f64>,
    /// The network's raw output (`[N, 2C, H, W]` when the variance is learned).
    pub eps: ArrayD<f64>,
    /// x̂_0 implied by the output (clipped when sampling clips).
    pub x0_pred: ArrayD<f64>,
    /// ε̂ implied by the output.
    pub eps_pred: ArrayD<f64>,
    /// μ_θ(x_t, t) (ancestral sampling only).
    pub mean: Option<ArrayD<f64>>,
    /// σ_t² of p_θ(x_{t−1} ∣ x_t) (ancestral sampling only).
    pub variance: Option<ArrayD<f64>>,
    /// The noise drawn by this evaluation's update (z ~ N(0, I); for ancestral sampling zeros
    /// at t = 0, where none is added), if any.
    pub noise: Option<ArrayD<f64>>,
    /// The sampler's state after the update (x_{t−1} for one-evaluation-a-step samplers).
    pub x_prev: ArrayD<f64>,
}

/// A traced sampling run.
#[derive(Clone, Debug)]
pub struct Trace {
    /// x_T ~ N(0, I), the start, `[N, C, H, W]`.
    pub x_start: ArrayD<f64>,
    /// The kept evaluations, in order.
    pub steps: Vec<TraceStep>,
    /// The final x_0, `[N, C, H, W]`.
    pub x0: ArrayD<f64>,
}

/// A sampling run per `config`, keeping every intermediate of the evaluations for which
/// `keep(eval_index, code_timestep)` holds. It draws exactly what [`sample`] draws from `rng`,
/// so its x_0 equals that of `ddpm sample` with the same seed and settings.
///
/// # Errors
/// As [`sample`].
#[allow(clippy::too_many_arguments)]
pub fn trace(
    net: &UNet,
    params: &ParamStore,
    schedule: &NoiseSchedule,
    param: &Parameterization,
    n: usize,
    config: &SampleConfig,
    keep: impl Fn(usize, Option<usize>) -> bool,
    rng: &mut Rng,
    mut progress: impl FnMut(usize, usize),
) -> Result<Trace> {
    let Started { mut solver, labels } = start_for(net, schedule, param, n, config, rng)?;
    let x_start = solver.x().clone();
    let bound = params.bind_constant();
    let total = solver.num_evals();
    let ab = schedule.alpha_bar();
    let model = network(net, &bound, param, labels.as_deref());
    let mut steps = vec![];
    let on_eval =
        |i: usize, x_in: &ArrayD<f64>, at: &GridPoint, out: &ModelOutput, adv: &Advance, x: &ArrayD<f64>| {
            let index = ab.iter().position(|&a| a == at.alpha_bar());
            if keep(i, index) {
                let raw = out.joined()?;
                steps.push(TraceStep {
                    eval: i,
                    t: at.model_t,
                    index,
                    sigma: at.sigma(),
                    x_t: x_in.clone(),
                    eps: raw,
                    x0_pred: adv.x0_pred.clone(),
                    eps_pred: adv.eps_pred.clone(),
                    mean: adv.ancestral.as_ref().map(|a| a.mean.clone()),
                    variance: adv.ancestral.as_ref().map(|a| a.variance.clone()),
                    noise: adv.noise.clone(),
                    x_prev: x.clone(),
                });
            }
            progress(i + 1, total);
            Ok(())
        };
    let x0 = samplers::run(solver.as_mut(), rng, model, on_eval)?;
    Ok(Trace { x_start, steps, x0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::{BetaSchedule, Conventions, MeanType, VarianceType};

    #[test]
    fn respacing_keeps_alpha_bar() {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 1000, Conventions::default()).unwrap();
        let mut steps = samplers::spaced_timesteps(TimestepSpacing::Linspace, 1000, 50, 0).unwrap();
        steps.reverse();
        assert_eq!((steps[0], *steps.last().unwrap(), steps.len()), (0, 999, 50));
        let r = respace(&s, &steps).unwrap();
        // ᾱ of the respaced process at step i is ᾱ of the original at S_i.
        for (i, &si) in steps.iter().enumerate() {
            assert!(
                (r.alpha_bar()[i] - s.alpha_bar()[si]).abs() < 1e-12 * s.alpha_bar()[si].max(1e-300) + 1e-15
            );
        }
    }

    fn tiny() -> (UNet, ParamStore, Parameterization) {
        let net = UNet::new(crate::nn::Preset::Tiny.config(1, 8)).unwrap();
        let params = net.init_params(&mut crate::rng_from_seed(4));
        let param = Parameterization { mean_type: MeanType::Eps, variance_type: VarianceType::FixedSmall };
        (net, params, param)
    }

    #[test]
    fn trace_follows_the_same_run_as_sample() {
        let (net, params, param) = tiny();
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 6, Conventions::default()).unwrap();
        let cfg = SampleConfig::ancestral();
        let sampled =
            sample(&net, &params, &s, &param, 2, &cfg, &mut crate::rng_from_seed(9), |_, _| {}).unwrap();
        let tr = trace(
            &net,
            &params,
            &s,
            &param,
            2,
            &cfg,
            |_, t| t != Some(3),
            &mut crate::rng_from_seed(9),
            |_, _| {},
        )
        .unwrap();
        assert_eq!(tr.x0.mapv(|v| v as f32), sampled.images);
        assert_eq!(tr.steps.iter().map(|st| st.index.unwrap()).collect::<Vec<_>>(), vec![5, 4, 2, 1, 0]);
        let last = tr.steps.last().unwrap();
        assert!(last.noise.as_ref().unwrap().iter().all(|&z| z == 0.0));
        assert!(last.variance.as_ref().unwrap().iter().all(|&v| v == 0.0));
        // Each kept step: x_{t−1} = mean + σ z.
        let st = &tr.steps[1];
        let sigma = s.beta_tilde()[4].sqrt();
        let want = st.mean.as_ref().unwrap() + &(st.noise.as_ref().unwrap().mapv(|z| z * sigma));
        assert!(st.x_prev.iter().zip(want.iter()).all(|(a, b)| (a - b).abs() < 1e-12));
    }

    #[test]
    fn every_sampler_runs_the_network_and_trace_agrees_with_sample() {
        let (net, params, param) = tiny();
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 50, Conventions::default()).unwrap();
        for (kind, name, _) in SamplerKind::ALL {
            for karras in [false, true] {
                if karras && kind == SamplerKind::Ancestral {
                    continue;
                }
                let cfg = SampleConfig { sampler: kind, steps: Some(6), karras, ..SampleConfig::ancestral() };
                let mut calls = 0;
                let a =
                    sample(&net, &params, &s, &param, 2, &cfg, &mut crate::rng_from_seed(3), |d, total| {
                        calls += 1;
                        assert!(d <= total);
                    })
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                let tr = trace(
                    &net,
                    &params,
                    &s,
                    &param,
                    2,
                    &cfg,
                    |_, _| true,
                    &mut crate::rng_from_seed(3),
                    |_, _| {},
                )
                .unwrap();
                assert_eq!(tr.steps.len(), calls, "{name}");
                assert_eq!(tr.x0.mapv(|v| v as f32), a.images, "{name} karras {karras}");
                assert!(a.images.iter().all(|v| v.is_finite()), "{name}");
            }
        }
    }

    #[test]
    fn one_step_visits_t_0_alone_and_ancestral_returns_its_x0_prediction() {
        let (net, params, param) = tiny();
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 50, Conventions::default()).unwrap();
        let cfg = SampleConfig { steps: Some(1), ..SampleConfig::ancestral() };
        let tr =
            trace(&net, &params, &s, &param, 1, &cfg, |_, _| true, &mut crate::rng_from_seed(1), |_, _| {})
                .unwrap();
        assert_eq!(tr.steps.len(), 1);
        assert_eq!(tr.steps[0].index, Some(0));
        // One step onto ᾱ = 1 with no noise: μ̃ = x̂_0.
        for (a, b) in tr.x0.iter().zip(tr.steps[0].x0_pred.iter()) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}
