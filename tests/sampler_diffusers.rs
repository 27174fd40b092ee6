//! The samplers of `ddpm::diffusion::samplers` against diffusers 0.42.1's schedulers, one `step`
//! call at a time, on every case of tests/fixtures/samplers (written by
//! tests/fixtures/make_sampler_fixtures.py with torch 2.15.0 on the CPU; the fixtures' README lists
//! each array and each fact used below by its label, e.g. DDIM1, MS4, HE1). No Python is needed.
//!
//! # How a case is replayed
//!
//! ddpm's solver runs over a [`Grid`] of the points diffusers visited (built with [`Grid::new`]
//! from the recorded σ and timesteps, or from ᾱ at ddpm's own spaced timesteps for DDIM and PNDM,
//! which have no σ). At every call it is fed diffusers' recorded network output and, through
//! [`RecordedNoise`], the noise diffusers drew at that call (failing if ddpm draws where diffusers
//! did not, or skips a draw that mattered). Each call compares
//! - the network input ddpm asks for (`next_eval`'s x, and its `model_t` exactly) with diffusers'
//!   `model_input` and `t_model`;
//! - the state the call leaves (the next evaluation's input, or [`Solver::x`] after the last call)
//!   with diffusers' `x_out`;
//! - x̂_0 with `pred_original_sample`, and for DPM-Solver the converted output (x̂_0 or ε̂) with
//!   `converted_model_output`.
//!
//! ddpm's x is always the variance-preserving x_t. diffusers' DDIM, PNDM and DPM-Solver use that
//! too; its Euler, Euler-ancestral and Heun `sample` is x_t·√(σ² + 1) (variance exploding) while
//! their `model_input` is x_t, so `x_in`/`x_out` are divided by √(σ² + 1) at their σ first.
//!
//! # Tolerance: per call, from diffusers' own samples; accumulated over whole runs
//!
//! The bound is per call: max |ddpm − diffusers| ≤ 1e-6 · max(1, max |diffusers|). It is
//! applied as it stands to every call of every case, each started from diffusers' own sample
//! ([`Mode::Step`]):
//! - DDIM, Euler, Euler-ancestral: each call on a one-point grid from diffusers' `x_in`;
//! - Heun: each step (Euler call + correction call), singlestep DPM-Solver: each block (an
//!   order-1 call and the calls that build on it), PNDM: each Runge–Kutta step (4 calls), from
//!   diffusers' sample at its first call;
//! - multistep DPM-Solver and PNDM's linear multistep calls, which need earlier outputs: ddpm runs
//!   the calls before with the outputs held at diffusers' values and arrives on diffusers' sample
//!   at the measured call ([`land_on`]).
//!
//! Every case is also followed as a whole run from x_T, as the samplers are used ([`Mode::Run`]).
//! There diffusers' float32 rounding accumulates along its chain while ddpm computes in f64, and
//! the per-call bound alone does not hold: ddpm's state ends up to 10 times the bound away from
//! diffusers' (dpmsm_sdepp2_heun_k10 10.2, dpmss_dp2_k10 9.7, DDIM trailing η = 1 4.7; most cases
//! 1–3; the tables printed with `--nocapture`). That is diffusers' error, not ddpm's: re-running
//! diffusers' formulas (the README's facts, with the functions of section C of the fixture script)
//! in float64 as a chain from x_T on the same outputs and noise gives the same worst deviation from
//! diffusers, to the three digits printed, for every one of the 70 whole runs. So a whole run is
//! held to the bound each call adds, carried forward the way one update moves a state error when
//! the network's output is fixed: scaled by α′/α = √(ᾱ′/ᾱ) (exactly, for ε-prediction; at most,
//! for v and x_0). Every whole run stays within a quarter of that allowance (0.24 at most,
//! dpmsm_dp2_vpred_k10), so the test is far from its edge; x̂_0 = (x − σ_vp·pred)/α carries the
//! input's allowance divided by α.
//!
//! # Deliberate differences, tested on diffusers' own terms
//!
//! - **DDIM** steps from t to t − T div K whatever the spacing (DDIM1), not to the next timestep
//!   (linspace K = 10 steps 999 → 899 and then evaluates at 888; trailing K = 7 steps 999 → 857
//!   and evaluates at 856). ddpm steps to the next grid point. So every DDIM call is replayed on a
//!   one-point grid (the point t, ending at t′'s ᾱ, or at ᾱ = 1 / ᾱ_0 for t′ < 0 per
//!   `set_alpha_to_one`); whole runs are replayed where the two agree (the cases whose t − T div K
//!   is always the next timestep).
//! - **Euler churn**: diffusers evaluates the network at the un-churned x and σ and then applies
//!   the output at σ̂ (EU2); ddpm, like Karras et al. Algorithm 2 and k-diffusion, evaluates at the
//!   churned x̂ and σ̂. Given the same output both step identically (the ε-prediction update uses
//!   only σ̂), which the churn test shows together with the different evaluation point.
//! - **DPM-Solver 3M**: ddpm weighs the second difference D2 fully (third order); diffusers and
//!   Lu et al.'s code use half of it. The replays use `SamplerOptions::reference_3m` (diffusers'
//!   update); a test shows ddpm's default differs at exactly the order-3 multistep calls.
//! - **PNDM with v- or x_0-prediction** (ddpm converts each output to ε̂ at its own noise level,
//!   diffusers combines raw outputs): no fixture case, so not tested here.
//! - **PNDM's last call with `steps_offset = 0`**: the last timestep is 0 and diffusers steps from
//!   ᾱ_0 to `final_alpha_cumprod` = ᾱ_0, the identity (its coefficient ᾱ′ − ᾱ is 0). A ddpm grid's σ
//!   strictly decreases, so the replay ends one point earlier, at ᾱ_0, and the test checks that
//!   diffusers' last call left its sample unchanged.
//!
//! # Cases
//!
//! All 75 cases of index.json are replayed; none is skipped. Grid builders are checked where ddpm
//! claims to reproduce diffusers: `spaced_timesteps` (DDIM, PNDM `skip_prk_steps`, Euler and
//! Euler-ancestral `leading`/`trailing`), `dpm_spaced_timesteps` (every non-Karras DPM case),
//! `Grid::from_schedule` with `karras` and `dpm_layout` (every DPM Karras case), `karras_sigmas`
//! with `sigma_to_t` (every Euler/Heun Karras case). Not checked, because ddpm does not claim them:
//! Euler/Euler-ancestral/Heun `linspace` timesteps (diffusers keeps float32 fractions such as
//! 957.375 at K = 25; ddpm's spacings are integers) and PNDM's Runge–Kutta timestep layout (checked
//! instead through every evaluation's `model_t` in the replay).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use ddpm::diffusion::samplers::grid::{dpm_spaced_timesteps, sigma_to_t};
use ddpm::diffusion::samplers::{
    karras_sigmas, spaced_timesteps, Churn, Ddim, Denoised, DpmAlgorithm, DpmSolver, EulerAncestral,
    EulerHeun, Grid, GridEnd, GridPoint, GridSpec, NoiseSource, Pndm, SamplerOptions, Solver, SolverType,
    TimestepSpacing,
};
use ddpm::diffusion::{Conventions, MeanType, ModelOutput, NoiseSchedule};
use ddpm::io::npz::read_npz;
use ndarray::{ArrayD, Axis};
use serde_json::Value;

/// The bound: max |ddpm − diffusers| ≤ TOLERANCE · max(1, max |diffusers|), per call.
const TOLERANCE: f64 = 1e-6;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/samplers")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("fixture reads")).expect("fixture is JSON")
}

/// The seven diffusers scheduler classes of the fixtures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Class {
    Ddim,
    Pndm,
    DpmMultistep,
    DpmSinglestep,
    Euler,
    EulerAncestral,
    Heun,
}

impl Class {
    fn from_diffusers(name: &str) -> Class {
        match name {
            "DDIMScheduler" => Class::Ddim,
            "PNDMScheduler" => Class::Pndm,
            "DPMSolverMultistepScheduler" => Class::DpmMultistep,
            "DPMSolverSinglestepScheduler" => Class::DpmSinglestep,
            "EulerDiscreteScheduler" => Class::Euler,
            "EulerAncestralDiscreteScheduler" => Class::EulerAncestral,
            "HeunDiscreteScheduler" => Class::Heun,
            other => panic!("index.json names a scheduler class this test does not know: {other}"),
        }
    }

    /// Whether diffusers' `sample` is x_t·√(σ² + 1) (variance exploding) rather than x_t.
    fn variance_exploding(self) -> bool {
        matches!(self, Class::Euler | Class::EulerAncestral | Class::Heun)
    }
}

/// One case of index.json with its arrays.
struct Case {
    name: String,
    class: Class,
    config: Value,
    step_kwargs: Value,
    /// `num_inference_steps`.
    k: usize,
    arrays: BTreeMap<String, ArrayD<f64>>,
}

fn cases() -> Vec<Case> {
    let index = read_json(&fixtures().join("index.json"));
    let list = index["cases"].as_array().expect("index.json lists the cases");
    list.iter()
        .map(|c| {
            let name = c["name"].as_str().expect("case name").to_owned();
            let path = fixtures().join(format!("{name}.npz"));
            let arrays = read_npz(&path)
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .into_iter()
                .map(|a| (a.name, a.values))
                .collect();
            Case {
                class: Class::from_diffusers(c["class_name"].as_str().expect("class_name")),
                config: c["config"].clone(),
                step_kwargs: c["step_kwargs"].clone(),
                k: c["num_inference_steps"].as_u64().expect("num_inference_steps") as usize,
                arrays,
                name,
            }
        })
        .collect()
}

fn cases_of(class: Class) -> Vec<Case> {
    let cases: Vec<Case> = cases().into_iter().filter(|c| c.class == class).collect();
    assert!(!cases.is_empty(), "no {class:?} case in index.json");
    cases
}

impl Case {
    fn array(&self, name: &str) -> &ArrayD<f64> {
        self.arrays.get(name).unwrap_or_else(|| panic!("{}: no array `{name}`", self.name))
    }

    /// Call e's entry of a `[E, …]` array.
    fn at_call(&self, name: &str, e: usize) -> ArrayD<f64> {
        self.array(name).index_axis(Axis(0), e).to_owned()
    }

    fn values(&self, name: &str) -> Vec<f64> {
        self.array(name).iter().copied().collect()
    }

    /// E, the number of `step` calls.
    fn calls(&self) -> usize {
        self.array("t_model").len()
    }

    fn config_str(&self, key: &str) -> &str {
        self.config[key].as_str().unwrap_or_else(|| panic!("{}: config `{key}` is not a string", self.name))
    }

    fn config_bool(&self, key: &str) -> bool {
        self.config[key].as_bool().unwrap_or_else(|| panic!("{}: config `{key}` is not a bool", self.name))
    }

    fn config_usize(&self, key: &str) -> usize {
        self.config[key].as_u64().unwrap_or_else(|| panic!("{}: config `{key}` is not an integer", self.name))
            as usize
    }

    /// `use_karras_sigmas` (Euler ancestral has no such key: never).
    fn karras(&self) -> bool {
        self.config.get("use_karras_sigmas").is_some() && self.config_bool("use_karras_sigmas")
    }

    /// T, `num_train_timesteps`.
    fn big_t(&self) -> usize {
        self.config_usize("num_train_timesteps")
    }

    fn steps_offset(&self) -> usize {
        self.config.get("steps_offset").and_then(Value::as_u64).unwrap_or(0) as usize
    }

    /// `timestep_spacing` (DPM singlestep has none: its rule is always `linspace`, G3).
    fn spacing(&self) -> TimestepSpacing {
        match self.config.get("timestep_spacing").and_then(Value::as_str).unwrap_or("linspace") {
            "linspace" => TimestepSpacing::Linspace,
            "leading" => TimestepSpacing::Leading,
            "trailing" => TimestepSpacing::Trailing,
            other => panic!("{}: timestep_spacing {other}", self.name),
        }
    }

    fn mean_type(&self) -> MeanType {
        match self.config_str("prediction_type") {
            "epsilon" => MeanType::Eps,
            "v_prediction" => MeanType::V,
            "sample" => MeanType::X0,
            other => panic!("{}: prediction_type {other}", self.name),
        }
    }

    fn alphas_cumprod(&self) -> Vec<f64> {
        self.values("alphas_cumprod")
    }

    /// The trained schedule with diffusers' ᾱ (β_i = 1 − ᾱ_i/ᾱ_{i−1}, f64 tables).
    fn schedule(&self) -> NoiseSchedule {
        let acp = self.alphas_cumprod();
        let betas: Vec<f64> =
            acp.iter().enumerate().map(|(i, &a)| 1.0 - a / if i == 0 { 1.0 } else { acp[i - 1] }).collect();
        let s = NoiseSchedule::from_betas(betas, Conventions::default()).expect("diffusers' ᾱ is a schedule");
        for (mine, theirs) in s.alpha_bar().iter().zip(&acp) {
            assert!(
                (mine - theirs).abs() <= 1e-12 * theirs,
                "{}: ᾱ rebuilt as {mine}, not {theirs}",
                self.name
            );
        }
        s
    }

    /// diffusers' `sample` at σ = `sigmas[sigma_index]` as ddpm's variance-preserving x_t.
    fn to_vp(&self, sample: ArrayD<f64>, sigma_index: usize) -> ArrayD<f64> {
        if self.class.variance_exploding() {
            let sigma = self.values("sigmas")[sigma_index];
            sample.mapv(|v| v / (sigma * sigma + 1.0).sqrt())
        } else {
            sample
        }
    }

    /// diffusers' input sample of call e, as VP x_t (it lies at σ = `sigmas[e]`).
    fn x_in_vp(&self, e: usize) -> ArrayD<f64> {
        self.to_vp(self.at_call("x_in", e), e)
    }

    /// diffusers' `prev_sample` of call e, as VP x_t (it lies at σ = `sigmas[e + 1]`: HE1 repeats
    /// each σ so that this holds for Heun's both stages too).
    fn x_out_vp(&self, e: usize) -> ArrayD<f64> {
        self.to_vp(self.at_call("x_out", e), e + 1)
    }

    /// α = √ᾱ of timestep t as diffusers indexes it, or of `final_alpha_cumprod` for t < 0.
    fn alpha_at_t(&self, t: f64) -> f64 {
        alpha_bar_or_final(self, t).alpha()
    }

    /// α = √ᾱ where diffusers' `x_in[e]` lies.
    fn alpha_in(&self, e: usize) -> f64 {
        match self.class {
            Class::Ddim => self.alpha_at_t(self.values("timesteps")[e]),
            Class::Pndm if e > 0 => self.alpha_at_t(self.values("pndm_t_prev")[e - 1]),
            Class::Pndm => self.alpha_at_t(self.values("timesteps")[0]),
            _ => GridPoint::from_sigma(self.values("sigmas")[e], f64::NAN).alpha(),
        }
    }

    /// α = √ᾱ where diffusers' `x_out[e]` lies.
    fn alpha_out(&self, e: usize) -> f64 {
        match self.class {
            Class::Ddim => self.alpha_at_t(self.values("prev_timestep")[e]),
            Class::Pndm => self.alpha_at_t(self.values("pndm_t_prev")[e]),
            _ => GridPoint::from_sigma(self.values("sigmas")[e + 1], f64::NAN).alpha(),
        }
    }

    /// Euler's `s_churn` (0 for every other case).
    fn s_churn(&self) -> f64 {
        self.step_kwargs.get("s_churn").and_then(Value::as_f64).unwrap_or(0.0)
    }

    /// ddpm's [`Churn`] from the step kwargs (`"inf"` is how index.json writes s_tmax = ∞).
    fn churn(&self) -> Churn {
        let number = |key: &str, default: f64| match self.step_kwargs.get(key) {
            None => default,
            Some(Value::String(s)) if s == "inf" => f64::INFINITY,
            Some(v) => v.as_f64().unwrap_or_else(|| panic!("{}: step kwarg {key} = {v}", self.name)),
        };
        Churn {
            s_churn: number("s_churn", 0.0),
            s_tmin: number("s_tmin", 0.0),
            s_tmax: number("s_tmax", f64::INFINITY),
            s_noise: number("s_noise", 1.0),
        }
    }

    /// The x̂ and σ̂ diffusers' Euler `step` forms inside call e (EU2), as VP x̂ at σ̂:
    /// x̂ = x + s_noise·z·√(σ̂² − σ²), σ̂ = σ(γ + 1).
    fn churned_input(&self, e: usize) -> (ArrayD<f64>, f64) {
        let sigma = self.values("sigmas")[e];
        let sigma_hat = sigma * (self.values("gamma")[e] + 1.0);
        let std = self.churn().s_noise * (sigma_hat * sigma_hat - sigma * sigma).sqrt();
        let x_hat = &self.at_call("x_in", e) + &self.at_call("noise", e).mapv(|z| z * std);
        (x_hat.mapv(|v| v / (sigma_hat * sigma_hat + 1.0).sqrt()), sigma_hat)
    }

    /// The grid diffusers' σ-based schedulers visit, from the recorded σ and timesteps; Heun's
    /// repeated entries (HE1: timesteps t0, t1, t1, t2, t2, …; sigmas σ0, σ1, σ1, …, 0) once.
    fn sigma_grid(&self) -> Grid {
        let sigmas = self.values("sigmas");
        let timesteps = self.values("timesteps");
        let index: Vec<usize> = match self.class {
            Class::Heun => std::iter::once(0).chain((1..timesteps.len()).step_by(2)).collect(),
            _ => (0..timesteps.len()).collect(),
        };
        let points: Vec<GridPoint> =
            index.iter().map(|&i| GridPoint::from_sigma(sigmas[i], timesteps[i])).collect();
        let end = GridPoint::from_sigma(*sigmas.last().expect("sigmas"), f64::NAN);
        Grid::new(points.clone(), points, end).unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// A DPM-Solver as the config says (`lower_order_final` as given, for windows of a run), with
    /// diffusers' third-order multistep update when `reference_3m` (ddpm's own doubles D2).
    fn dpm_solver(
        &self,
        grid: Grid,
        lower_order_final: bool,
        reference_3m: bool,
        x_t: ArrayD<f64>,
    ) -> DpmSolver {
        for key in ["thresholding", "use_lu_lambdas", "euler_at_final"] {
            if self.config.get(key).is_some() {
                assert!(!self.config_bool(key), "{}: `{key}` is not replayed", self.name);
            }
        }
        let algorithm = match self.config_str("algorithm_type") {
            "dpmsolver" => DpmAlgorithm::Noise,
            "dpmsolver++" => DpmAlgorithm::Data,
            "sde-dpmsolver++" => DpmAlgorithm::DataSde,
            other => panic!("{}: algorithm_type {other}", self.name),
        };
        let solver_type = match self.config_str("solver_type") {
            "midpoint" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => panic!("{}: solver_type {other}", self.name),
        };
        let options =
            SamplerOptions { solver_type, lower_order_final, reference_3m, ..SamplerOptions::default() };
        let order = self.config_usize("solver_order") as u8;
        let multistep = self.class == Class::DpmMultistep;
        DpmSolver::new(grid, self.mean_type(), algorithm, order, multistep, options, x_t)
            .unwrap_or_else(|e| panic!("{}: {e}", self.name))
    }

    /// The DPM-Solver of a whole run, with diffusers' 3M update.
    fn dpm_run(&self) -> DpmSolver {
        self.dpm_solver(self.sigma_grid(), self.config_bool("lower_order_final"), true, self.x_in_vp(0))
    }
}

/// Points `range` of `grid`, ending where the grid goes next (its next point, or its end).
fn window(grid: &Grid, range: Range<usize>) -> Grid {
    let end = grid.points.get(range.end).copied().unwrap_or(grid.end);
    Grid::new(grid.points[range.clone()].to_vec(), grid.mids[range].to_vec(), end).expect("a part of a grid")
}

/// diffusers' noise, replayed: `draw` during call `call` returns the noise diffusers used at that
/// call, and fails if diffusers drew none there or ddpm draws twice in one call.
struct RecordedNoise<'a> {
    case: &'a Case,
    call: usize,
    /// The calls at which ddpm drew.
    draws: Vec<usize>,
}

impl NoiseSource for RecordedNoise<'_> {
    fn draw(&mut self, shape: &[usize]) -> ArrayD<f64> {
        let c = self.case;
        assert!(
            c.values("noise_drawn")[self.call] != 0.0,
            "{} call {}: ddpm draws noise where diffusers drew none",
            c.name,
            self.call
        );
        assert!(self.draws.last() != Some(&self.call), "{} call {}: ddpm draws twice", c.name, self.call);
        self.draws.push(self.call);
        let z = c.at_call("noise", self.call);
        assert_eq!(z.shape(), shape, "{} call {}: noise shape", c.name, self.call);
        z
    }
}

/// max(1, max |a|): the scale of the relative bound.
fn scale(a: &ArrayD<f64>) -> f64 {
    a.iter().fold(1.0f64, |m, v| m.max(v.abs()))
}

/// max |got − want|.
fn max_diff(got: &ArrayD<f64>, want: &ArrayD<f64>, what: &str) -> f64 {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let diff = got.iter().zip(want).fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
    assert!(diff.is_finite(), "{what}: not finite");
    diff
}

/// max |got − want| / (TOLERANCE · max(1, max |want|)): 1 is at the bound.
fn ratio(got: &ArrayD<f64>, want: &ArrayD<f64>, what: &str) -> f64 {
    max_diff(got, want, what) / (TOLERANCE * scale(want))
}

/// How a replay is held to the bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The calls form one step started from diffusers' own sample: each call within the per-call
    /// bound.
    Step,
    /// A whole run: each call within its own bound plus the bounds of the calls before it, each
    /// carried forward by α′/α (the float32 drift of diffusers' chain; see the module
    /// documentation).
    Run,
}

/// What a replay measured: the worst ratio to the per-call bound of each compared quantity, and
/// the worst fraction of the allowance used (the per-call bound for [`Mode::Step`], the
/// accumulated one for [`Mode::Run`]).
#[derive(Clone, Debug, Default)]
struct Measured {
    /// The network input x of each evaluation vs `model_input` (or, for churned Euler calls, the
    /// churned x̂ diffusers forms inside `step`).
    input: f64,
    /// The state each call leaves vs `x_out` (VP).
    state: f64,
    /// x̂_0 vs `pred_original_sample`, and DPM's converted output vs `converted_model_output`.
    prediction: f64,
    /// The worst |ddpm − diffusers| / allowance; above 1 is a failure.
    used: f64,
    /// The comparisons over their allowance.
    over: Vec<String>,
}

impl Measured {
    fn merge(&mut self, o: Measured) {
        self.input = self.input.max(o.input);
        self.state = self.state.max(o.state);
        self.prediction = self.prediction.max(o.prediction);
        self.used = self.used.max(o.used);
        self.over.extend(o.over);
    }

    /// Records one comparison: `got` against `want`, allowed the per-call bound of `want` plus
    /// `carried` (absolute, what earlier calls may have left); returns the ratio to the per-call
    /// bound alone.
    fn compare(&mut self, got: &ArrayD<f64>, want: &ArrayD<f64>, carried: f64, what: &str) -> f64 {
        let diff = max_diff(got, want, what);
        let own = TOLERANCE * scale(want);
        let used = diff / (own + carried);
        self.used = self.used.max(used);
        if used > 1.0 {
            self.over.push(format!("{what}: {diff:.3e} > {own:.3e} + {carried:.3e}"));
        }
        diff / own
    }
}

/// Runs `solver` over the calls `calls` of `case` (its state must be diffusers' `x_in` of the
/// first of them), feeding diffusers' outputs and noise, and measures every call.
///
/// # Panics
/// If an evaluation's `model_t` differs from diffusers' `t_model`, if ddpm evaluates fewer (or,
/// over a whole run, more) times than diffusers, or draws noise where diffusers drew none or does
/// not draw where diffusers' draw mattered.
fn follow(case: &Case, solver: &mut dyn Solver, calls: Range<usize>, mode: Mode) -> Measured {
    let mut noise = RecordedNoise { case, call: calls.start, draws: Vec::new() };
    let mut m = Measured::default();
    let churns = case.s_churn() > 0.0;
    let gamma = if churns { case.values("gamma") } else { Vec::new() };
    let t_model = case.values("t_model");
    // Mode::Run: the allowance of the state the previous call left (`carried`) and that state's
    // α; the state of call e is allowed its own bound plus `carried`·α_out/α_in (`moved`).
    let (mut carried, mut moved) = (0.0, 0.0);
    for e in calls.clone() {
        let at = format!("{} call {e}", case.name);
        if let Some(step_index) = case.arrays.get("step_index") {
            // The recorded calls run over the σ table in order (G8); the replay relies on it.
            assert_eq!(step_index[e], e as f64, "{at}: diffusers' step_index");
        }
        noise.call = e;
        let eval = solver.next_eval(&mut noise).unwrap_or_else(|| panic!("{at}: ddpm's run has ended"));
        let (x, point) = (eval.x.clone(), eval.at);
        if churns && gamma[e] > 0.0 {
            // x̂ = x + noise in VE: the carried error of x, scaled by α̂/α < 1 in VP.
            let (want, sigma_hat) = case.churned_input(e);
            assert!((point.sigma() - sigma_hat).abs() <= TOLERANCE * sigma_hat, "{at}: σ̂ {}", point.sigma());
            let q = m.compare(&x, &want, carried, &format!("{at}: churned input"));
            m.input = m.input.max(q);
        } else {
            assert_eq!(point.model_t, t_model[e], "{at}: the network's timestep");
            let q = m.compare(&x, &case.at_call("model_input", e), carried, &format!("{at}: input"));
            m.input = m.input.max(q);
        }
        if e > calls.start && !churns {
            // The sample diffusers' previous call returned is where this call evaluates.
            let q = m.compare(&x, &case.x_out_vp(e - 1), moved, &format!("{at}: state of call {}", e - 1));
            m.state = m.state.max(q);
        }
        let output = ModelOutput { prediction: case.at_call("model_output", e), variance_values: None };
        let adv = solver.advance(output, &mut noise).unwrap_or_else(|err| panic!("{at}: {err}"));
        // x̂_0 = (x − σ_vp·pred)/α: the input's error divided by α.
        let into_prediction = carried / point.alpha();
        if case.arrays.contains_key("pred_original_sample") {
            let want = case.at_call("pred_original_sample", e);
            let q = m.compare(&adv.x0_pred, &want, into_prediction, &format!("{at}: x̂_0"));
            m.prediction = m.prediction.max(q);
        }
        if case.arrays.contains_key("converted_model_output") {
            let got =
                if case.config_str("algorithm_type") == "dpmsolver" { &adv.eps_pred } else { &adv.x0_pred };
            let want = case.at_call("converted_model_output", e);
            let q = m.compare(got, &want, into_prediction, &format!("{at}: converted output"));
            m.prediction = m.prediction.max(q);
        }
        let want = case.x_out_vp(e);
        if mode == Mode::Run {
            moved = carried * case.alpha_out(e) / case.alpha_in(e);
            carried = moved + TOLERANCE * scale(&want);
        }
        if e + 1 == calls.end || churns {
            let q = m.compare(solver.x(), &want, moved, &format!("{at}: state"));
            m.state = m.state.max(q);
        }
    }
    if calls.end == case.calls() {
        noise.call = calls.end;
        assert!(
            solver.next_eval(&mut noise).is_none(),
            "{}: ddpm evaluates more often than diffusers",
            case.name
        );
    }
    // Where diffusers drew and ddpm did not, diffusers' draw must not have mattered: only DDIM
    // with η > 0 onto ᾱ' = 1 (set_alpha_to_one, t' < 0), whose σ_t is 0, is expected to do that.
    let drawn = case.values("noise_drawn");
    for e in calls.filter(|&e| drawn[e] != 0.0 && !noise.draws.contains(&e)) {
        let onto_one = case.class == Class::Ddim
            && case.values("prev_timestep")[e] < 0.0
            && case.config_bool("set_alpha_to_one");
        assert!(onto_one, "{} call {e}: diffusers drew noise and ddpm did not", case.name);
    }
    m
}

/// What each case of a table measured.
type Rows = Vec<(String, Measured)>;

/// Prints one row per case and the worst of all, and returns the comparisons over their
/// allowance.
fn report(title: &str, rows: Rows) -> Vec<String> {
    eprintln!("{title}: worst |ddpm − diffusers| / (1e-6·max(1, max|diffusers|)) per call; allowance used");
    eprintln!("  {:32} {:>8} {:>8} {:>8} {:>8}", "case", "input", "state", "x̂0/conv", "used");
    let mut worst = Measured::default();
    for (name, m) in rows {
        eprintln!("  {name:32} {:>8.3} {:>8.3} {:>8.3} {:>8.3}", m.input, m.state, m.prediction, m.used);
        worst.merge(m);
    }
    eprintln!(
        "  {:32} {:>8.3} {:>8.3} {:>8.3} {:>8.3}",
        "worst", worst.input, worst.state, worst.prediction, worst.used
    );
    worst.over
}

/// ᾱ of timestep `t` as diffusers indexes it, or `final_alpha_cumprod` for t < 0 (DDIM1, PNDM2).
fn alpha_bar_or_final(case: &Case, t: f64) -> GridPoint {
    let acp = case.alphas_cumprod();
    if t >= 0.0 {
        GridPoint::from_alpha_bar(acp[t as usize], t)
    } else if case.config_bool("set_alpha_to_one") {
        GridPoint::from_sigma(0.0, f64::NAN)
    } else {
        GridPoint::from_alpha_bar(acp[0], f64::NAN)
    }
}

#[test]
fn every_fixture_case_is_listed_and_of_a_replayed_class() {
    let cases = cases();
    let listed: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    let mut on_disk = 0;
    for entry in std::fs::read_dir(fixtures()).expect("fixtures folder") {
        let name = entry.expect("entry").file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".npz") {
            assert!(listed.contains(&stem), "{name} is not in index.json");
            on_disk += 1;
        }
    }
    assert_eq!(on_disk, listed.len());
    assert_eq!(on_disk, 75, "the README describes 75 cases");
    // Every class is replayed by a test below; `Class::from_diffusers` refuses any other.
    let mut per_class = BTreeMap::new();
    for c in &cases {
        *per_class.entry(c.class).or_insert(0) += 1;
        assert_eq!(c.calls(), c.array("x_out").shape()[0], "{}: calls", c.name);
    }
    let counts: Vec<usize> = per_class.values().copied().collect();
    assert_eq!(counts, [13, 5, 26, 15, 10, 3, 3], "cases per class, as the README's table");
}

#[test]
fn ddim_steps_match_diffusers_each_onto_its_own_target() {
    let mut rows = Vec::new();
    for case in cases_of(Class::Ddim) {
        let (timesteps, prev) = (case.values("timesteps"), case.values("prev_timestep"));
        let eta = case.step_kwargs["eta"].as_f64().expect("eta");
        let mut m = Measured::default();
        for e in 0..case.calls() {
            // DDIM1: t' = t − T div K, whatever the spacing.
            assert_eq!(prev[e], timesteps[e] - (case.big_t() / case.k) as f64, "{}: t'", case.name);
            let point = alpha_bar_or_final(&case, timesteps[e]);
            let grid = Grid::new(vec![point], vec![point], alpha_bar_or_final(&case, prev[e]))
                .unwrap_or_else(|err| panic!("{} call {e}: {err}", case.name));
            let mut ddim =
                Ddim::new(grid, case.mean_type(), eta, false, case.x_in_vp(e)).expect("η in [0, 1]");
            m.merge(follow(&case, &mut ddim, e..e + 1, Mode::Step));
        }
        rows.push((case.name.clone(), m));
    }
    let over = report("DDIM, each call from diffusers' sample", rows);
    assert!(over.is_empty(), "over the bound: {over:#?}");
}

#[test]
fn ddim_runs_match_diffusers_where_t_minus_t_div_k_is_the_next_grid_point() {
    let mut rows = Vec::new();
    let mut elsewhere = Vec::new();
    for case in cases_of(Class::Ddim) {
        let (timesteps, prev) = (case.values("timesteps"), case.values("prev_timestep"));
        let on_grid =
            (0..case.calls()).all(|e| timesteps.get(e + 1).map_or(prev[e] < 0.0, |&next| next == prev[e]));
        if !on_grid {
            elsewhere.push(case.name.clone());
            continue;
        }
        let end = if case.config_bool("set_alpha_to_one") { GridEnd::Zero } else { GridEnd::AlphaBar0 };
        let spec = GridSpec {
            steps: case.k,
            spacing: case.spacing(),
            steps_offset: case.steps_offset(),
            karras: false,
            dpm_layout: false,
            end,
        };
        let grid =
            Grid::from_schedule(&case.schedule(), &spec).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let eta = case.step_kwargs["eta"].as_f64().expect("eta");
        let mut ddim = Ddim::new(grid, case.mean_type(), eta, false, case.x_in_vp(0)).expect("η in [0, 1]");
        rows.push((case.name.clone(), follow(&case, &mut ddim, 0..case.calls(), Mode::Run)));
    }
    assert_eq!(rows.len(), 8);
    let over = report("DDIM, whole runs on ddpm's grid", rows);
    assert!(over.is_empty(), "over the bound: {over:#?}");
    // The others step off the grid (DDIM1): linspace spacing and trailing with T mod K ≠ 0.
    elsewhere.sort();
    assert_eq!(
        elsewhere,
        [
            "ddim_linspace_eta0_k10",
            "ddim_linspace_eta0_k7",
            "ddim_linspace_eta1_k10",
            "ddim_linspace_eta1_k7",
            "ddim_trailing_eta0_k7"
        ]
    );
}

#[test]
fn pndm_steps_and_runs_match_diffusers() {
    let (mut steps, mut plms, mut runs) = (Vec::new(), Vec::new(), Vec::new());
    for case in cases_of(Class::Pndm) {
        assert!(!case.config_bool("set_alpha_to_one"), "{}: every PNDM case ends at ᾱ_0", case.name);
        assert_eq!(case.spacing(), TimestepSpacing::Leading, "{}", case.name);
        let spec = GridSpec {
            steps: case.k,
            spacing: TimestepSpacing::Leading,
            steps_offset: case.steps_offset(),
            karras: false,
            dpm_layout: false,
            end: GridEnd::Zero,
        };
        let full =
            Grid::from_schedule(&case.schedule(), &spec).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let acp = case.alphas_cumprod();
        let end = GridPoint::from_alpha_bar(acp[0], f64::NAN);
        let mut calls = case.calls();
        let grid = if full.points.last().expect("points").model_t == 0.0 {
            // steps_offset 0: the last timestep is 0 and diffusers' last call goes from ᾱ_0 to
            // ᾱ_0, the identity; ddpm's grid stops at the point before it, at ᾱ_0.
            let e = calls - 1;
            assert_eq!(
                case.at_call("x_out", e),
                case.at_call("x_in", e),
                "{}: the last call is the identity",
                case.name
            );
            calls -= 1;
            let n = full.len() - 1;
            Grid::new(full.points[..n].to_vec(), full.mids[..n].to_vec(), end)
        } else {
            Grid::new(full.points.clone(), full.mids.clone(), end)
        }
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let prk = !case.config_bool("skip_prk_steps");
        if prk {
            // PNDM3: each of the 3 Runge–Kutta steps (4 calls) starts from its group's first
            // sample and uses only its own outputs, so it can start from diffusers' sample.
            let mut m = Measured::default();
            for g in 0..3 {
                let part = window(&grid, g..grid.len());
                let mut pndm =
                    Pndm::new(part, case.mean_type(), true, false, case.x_in_vp(4 * g)).expect("4 points");
                m.merge(follow(&case, &mut pndm, 4 * g..4 * g + 4, Mode::Step));
            }
            steps.push((case.name.clone(), m));
        }
        // PNDM4: a linear multistep call needs the ε of earlier calls. With ε-prediction these are
        // diffusers' outputs whatever ddpm's state, so ddpm runs from x_T and lands on diffusers'
        // sample at that call ([`land_on`]). The calls before (warm-up, or the skip_prk_steps
        // start, which redoes the first step from x_T) are steps of their own.
        assert_eq!(case.mean_type(), MeanType::Eps, "{}: PNDM is replayed with ε-prediction only", case.name);
        let make = |start: ArrayD<f64>| {
            Pndm::new(grid.clone(), MeanType::Eps, prk, false, start).expect("enough points")
        };
        let multistep = if prk { 12..calls } else { 2..calls };
        let mut m = Measured::default();
        if !prk {
            m.merge(follow(&case, &mut make(case.x_in_vp(0)), 0..2, Mode::Step));
        }
        for e in multistep {
            let mut pndm = land_on(&case, make, 0, e, |j, _, _| case.at_call("model_output", j));
            m.merge(follow(&case, &mut pndm, e..e + 1, Mode::Step));
        }
        plms.push((case.name.clone(), m));
        let mut pndm = make(case.x_in_vp(0));
        assert_eq!(pndm.num_evals(), calls, "{}: evaluations", case.name);
        runs.push((case.name.clone(), follow(&case, &mut pndm, 0..calls, Mode::Run)));
    }
    let mut over = report("PNDM Runge-Kutta steps, each from diffusers' sample", steps);
    over.extend(report(
        "PNDM linear multistep calls (and the PLMS start), each from diffusers' sample",
        plms,
    ));
    over.extend(report("PNDM, whole runs", runs));
    assert!(over.is_empty(), "over the bound: {over:#?}");
}

/// The prediction that ddpm, at its own state `x` at `at`, converts to the same x̂_0 (DPM-Solver++)
/// or ε̂ (DPM-Solver) as diffusers' output of call `j` at diffusers' sample (Eq. 4 rearranged:
/// x = α x̂_0 + σ_vp ε̂, v = α ε̂ − σ_vp x̂_0).
fn same_conversion(case: &Case, x: &ArrayD<f64>, at: &GridPoint, j: usize) -> ArrayD<f64> {
    let mt = case.mean_type();
    let theirs =
        Denoised::new(mt, &case.x_in_vp(j), at, &case.at_call("model_output", j), false).expect("ε, x0 or v");
    let (a, s) = (at.alpha(), at.sigma_vp());
    let (x0, eps) = if case.config_str("algorithm_type") == "dpmsolver" {
        ((x - &theirs.eps.mapv(|v| s * v)).mapv(|v| v / a), theirs.eps)
    } else {
        let eps = (x - &theirs.x0.mapv(|v| a * v)).mapv(|v| v / s);
        (theirs.x0, eps)
    };
    match mt {
        MeanType::Eps => eps,
        MeanType::X0 => x0,
        _ => &eps.mapv(|v| a * v) - &x0.mapv(|v| s * v),
    }
}

/// A solver `make(start)` that has taken calls `first..e`, fed `predict(j, x, at)` at call j, and
/// now stands at call e on diffusers' sample `x_in[e]`.
///
/// When the outputs fed do not depend on ddpm's state (diffusers' own ε for PNDM, or predictions
/// that convert to diffusers' values, [`same_conversion`]), every update is affine in the state
/// with a scalar coefficient, so the state at call e is x̃_e + p·(start − x_s) for one number p
/// (the product of those coefficients). A probe run from x_s + 1 measures p, and the run from
/// x_s + (x_in[e] − x̃_e)/p arrives on x_in[e]. This is how a call whose update needs earlier
/// outputs is started from diffusers' own sample.
fn land_on<S, M, P>(case: &Case, make: M, first: usize, e: usize, predict: P) -> S
where
    S: Solver,
    M: Fn(ArrayD<f64>) -> S,
    P: Fn(usize, &ArrayD<f64>, &GridPoint) -> ArrayD<f64>,
{
    let run = |start: ArrayD<f64>| -> (S, ArrayD<f64>) {
        let mut solver = make(start);
        let mut noise = RecordedNoise { case, call: first, draws: Vec::new() };
        for j in first..e {
            noise.call = j;
            let prediction = {
                let eval = solver.next_eval(&mut noise).expect("a call before e");
                predict(j, eval.x, &eval.at)
            };
            solver.advance(ModelOutput { prediction, variance_values: None }, &mut noise).expect("pending");
        }
        noise.call = e;
        let x_e = solver.next_eval(&mut noise).expect("call e").x.clone();
        (solver, x_e)
    };
    let x_s = case.x_in_vp(first);
    if first == e {
        return make(x_s);
    }
    let (_, from_x_s) = run(x_s.clone());
    let (_, from_shifted) = run(x_s.mapv(|v| v + 1.0));
    let slope = &from_shifted - &from_x_s;
    let p = slope.iter().copied().next().expect("a sample");
    assert!(slope.iter().all(|&q| (q - p).abs() <= 1e-9 * p.abs()), "{} call {e}: not one slope", case.name);
    let start = &x_s + &(&case.x_in_vp(e) - &from_x_s).mapv(|d| d / p);
    run(start).0
}

/// DPM-Solver multistep's call e from diffusers' own samples and outputs. Order o = `order[e]`
/// needs the converted outputs of calls e − o + 1 … e − 1, so ddpm runs the window of those o
/// points (orders 1, …, o without `lower_order_final`), fed at each earlier call the prediction
/// that converts to diffusers' value there, and lands on diffusers' sample at call e
/// ([`land_on`]); that call is measured as a [`Mode::Step`]. `reference_3m` as
/// [`SamplerOptions::reference_3m`].
fn dpm_multistep_call(case: &Case, grid: &Grid, e: usize, reference_3m: bool) -> Measured {
    let order = case.values("order")[e] as usize;
    let first = e + 1 - order;
    let part = window(grid, first..e + 1);
    let make = |start: ArrayD<f64>| {
        let solver = case.dpm_solver(part.clone(), false, reference_3m, start);
        let want: Vec<u8> = (1..=order as u8).collect();
        assert_eq!(solver.orders(), &want[..], "{} call {e}: the window's orders", case.name);
        solver
    };
    let mut solver = land_on(case, make, first, e, |j, x, at| same_conversion(case, x, at, j));
    follow(case, &mut solver, e..e + 1, Mode::Step)
}

#[test]
fn dpm_solver_multistep_calls_and_runs_match_diffusers() {
    let (mut steps, mut runs) = (Vec::new(), Vec::new());
    for case in cases_of(Class::DpmMultistep) {
        let grid = case.sigma_grid();
        let mut m = Measured::default();
        for e in 0..case.calls() {
            m.merge(dpm_multistep_call(&case, &grid, e, true));
        }
        steps.push((case.name.clone(), m));
        let mut solver = case.dpm_run();
        runs.push((case.name.clone(), follow(&case, &mut solver, 0..case.calls(), Mode::Run)));
    }
    let mut over = report("DPM-Solver multistep, each call from diffusers' samples", steps);
    over.extend(report("DPM-Solver multistep, whole runs", runs));
    assert!(over.is_empty(), "over the bound: {over:#?}");
}

#[test]
fn dpm_solver_3m_by_default_weighs_d2_fully_and_differs_from_diffusers_only_at_third_order_calls() {
    // ddpm's default 3M update doubles diffusers' D2 term (its third order; docs/sampling.md),
    // so only the calls diffusers runs at order 3 may differ, and those by far more than the
    // bound; every other call of the same runs matches.
    let mut third_order_calls = 0;
    for case in cases_of(Class::DpmMultistep).into_iter().filter(|c| c.config_usize("solver_order") == 3) {
        let grid = case.sigma_grid();
        for (e, &order) in case.values("order").iter().enumerate() {
            let m = dpm_multistep_call(&case, &grid, e, false);
            if order == 3.0 {
                third_order_calls += 1;
                assert!(
                    m.state > 100.0,
                    "{} call {e}: full-weight D2 moves x by only {:.1}",
                    case.name,
                    m.state
                );
            } else {
                assert!(m.over.is_empty(), "{} call {e}: {:?}", case.name, m.over);
            }
        }
    }
    // pp3/dp3 at K = 10 (6 calls of order 3 each), pp3/dp3 at K = 20 (17 and 18), pp3 Karras K = 10.
    assert_eq!(third_order_calls, 6 + 6 + 17 + 18 + 6);
}

#[test]
fn dpm_solver_singlestep_blocks_and_runs_match_diffusers() {
    let (mut steps, mut runs) = (Vec::new(), Vec::new());
    for case in cases_of(Class::DpmSinglestep) {
        // SS3: a block starts at an order-1 call, from that call's sample; the later calls of the
        // block feed only their outputs. Each block, from diffusers' sample, is one step.
        let orders = case.values("order_list");
        let starts: Vec<usize> = (0..case.calls()).filter(|&e| orders[e] == 1.0).collect();
        let grid = case.sigma_grid();
        let mut m = Measured::default();
        for (i, &b) in starts.iter().enumerate() {
            let end = starts.get(i + 1).copied().unwrap_or(case.calls());
            let solver_window = window(&grid, b..end);
            // Without lower_order_final a window of L ≤ order points is one block 1, …, L.
            let mut solver = case.dpm_solver(solver_window, false, true, case.x_in_vp(b));
            let want: Vec<u8> = orders[b..end].iter().map(|&o| o as u8).collect();
            assert_eq!(solver.orders(), &want[..], "{}: block at call {b}", case.name);
            m.merge(follow(&case, &mut solver, b..end, Mode::Step));
        }
        steps.push((case.name.clone(), m));
        let mut solver = case.dpm_run();
        runs.push((case.name.clone(), follow(&case, &mut solver, 0..case.calls(), Mode::Run)));
    }
    let mut over = report("DPM-Solver singlestep blocks, each from diffusers' sample", steps);
    over.extend(report("DPM-Solver singlestep, whole runs", runs));
    assert!(over.is_empty(), "over the bound: {over:#?}");
}

#[test]
fn dpm_solver_orders_follow_diffusers_rules() {
    for case in cases().into_iter().filter(|c| matches!(c.class, Class::DpmMultistep | Class::DpmSinglestep))
    {
        let solver = case.dpm_run();
        let used: Vec<u8> = case.values("order").iter().map(|&o| o as u8).collect();
        assert_eq!(solver.orders(), &used[..], "{}: the order of each step (MS4, SS2)", case.name);
        if case.class == Class::DpmSinglestep {
            let list: Vec<u8> = case.values("order_list").iter().map(|&o| o as u8).collect();
            assert_eq!(solver.orders(), &list[..], "{}: order_list (SS2)", case.name);
        }
    }
}

/// Euler or Euler-ancestral, one step from diffusers' sample of each call, then whole runs.
fn euler_like(class: Class, with_churn: bool) -> (Rows, Rows) {
    let (mut steps, mut runs) = (Vec::new(), Vec::new());
    for case in cases_of(class).into_iter().filter(|c| (c.s_churn() > 0.0) == with_churn) {
        let grid = case.sigma_grid();
        let solver = |grid: Grid, churn: Churn, x_t: ArrayD<f64>| -> Box<dyn Solver> {
            match class {
                Class::EulerAncestral => Box::new(EulerAncestral::new(grid, case.mean_type(), false, x_t)),
                _ => Box::new(EulerHeun::new(grid, case.mean_type(), false, churn, false, x_t)),
            }
        };
        let mut m = Measured::default();
        for e in 0..case.calls() {
            // γ = S_churn/K on ddpm's K-point grid; a one-point grid needs S_churn/K to match.
            let churn = Churn { s_churn: case.churn().s_churn / case.k as f64, ..case.churn() };
            let mut one = solver(window(&grid, e..e + 1), churn, case.x_in_vp(e));
            m.merge(follow(&case, one.as_mut(), e..e + 1, Mode::Step));
        }
        steps.push((case.name.clone(), m));
        let mut run = solver(grid, case.churn(), case.x_in_vp(0));
        runs.push((case.name.clone(), follow(&case, run.as_mut(), 0..case.calls(), Mode::Run)));
    }
    (steps, runs)
}

#[test]
fn euler_steps_and_runs_without_churn_match_diffusers() {
    let (steps, runs) = euler_like(Class::Euler, false);
    assert_eq!(steps.len(), 8);
    let mut over = report("Euler (no churn), each call from diffusers' sample", steps);
    over.extend(report("Euler (no churn), whole runs", runs));
    assert!(over.is_empty(), "over the bound: {over:#?}");
}

#[test]
fn euler_churn_evaluates_at_the_churned_point_and_otherwise_steps_as_diffusers() {
    // Given diffusers' outputs, ddpm's states and x̂_0 agree with diffusers' at every call, and its
    // network input is diffusers' churned x̂ at σ̂ (`follow` compares both).
    let (steps, runs) = euler_like(Class::Euler, true);
    assert_eq!(steps.len(), 2);
    let mut over = report("Euler with churn (inputs vs the churned x̂), each call", steps);
    over.extend(report("Euler with churn, whole runs", runs));
    assert!(over.is_empty(), "over the bound: {over:#?}");
    for case in cases_of(Class::Euler).into_iter().filter(|c| c.s_churn() > 0.0) {
        let gamma = case.values("gamma");
        let c = case.churn();
        // The same γ (EU2): min(s_churn/K, √2 − 1) where s_tmin ≤ σ ≤ s_tmax, else 0.
        for (e, &sigma) in case.values("sigmas")[..case.k].iter().enumerate() {
            let inside = c.s_tmin <= sigma && sigma <= c.s_tmax;
            let want = if inside { (c.s_churn / case.k as f64).min(2f64.sqrt() - 1.0) } else { 0.0 };
            assert!((gamma[e] - want).abs() < 1e-7, "{} call {e}: γ {} vs {want}", case.name, gamma[e]);
        }
        // The churned x̂ ddpm evaluates at is not diffusers' model input, the un-churned x: the
        // churn moves it by over 100 times the bound at every churned call.
        for e in (0..case.calls()).filter(|&e| gamma[e] > 0.0) {
            let (churned, _) = case.churned_input(e);
            let apart = ratio(&churned, &case.at_call("model_input", e), "churned vs un-churned");
            assert!(apart > 100.0, "{} call {e}: the churn moves x by only {apart:.1} bounds", case.name);
        }
        // On a grid with the trained table, ddpm also tells the network σ̂'s timestep, above the
        // t diffusers passes (clamped at T − 1 at the top). linspace K = 10 is 999, 888, …, 0, the
        // fixture's timesteps exactly.
        let spec = GridSpec {
            steps: case.k,
            spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            karras: false,
            dpm_layout: false,
            end: GridEnd::Zero,
        };
        let grid = Grid::from_schedule(&case.schedule(), &spec).expect("linspace grid");
        let t_model = case.values("t_model");
        let at_t: Vec<f64> = grid.points.iter().map(|p| p.model_t).collect();
        assert_eq!(at_t, t_model, "{}: the table grid has diffusers' timesteps", case.name);
        let mut on_table = EulerHeun::new(grid, case.mean_type(), false, c, false, case.x_in_vp(0));
        let mut noise = RecordedNoise { case: &case, call: 0, draws: Vec::new() };
        for (e, &t) in t_model.iter().enumerate() {
            noise.call = e;
            let eval = on_table.next_eval(&mut noise).expect("an evaluation per call");
            if gamma[e] > 0.0 {
                let mt = eval.at.model_t;
                assert!(
                    mt > t || (t == 999.0 && mt == 999.0),
                    "{} call {e}: σ̂'s timestep {mt}, t {t}",
                    case.name
                );
            } else {
                assert_eq!(eval.at.model_t, t, "{} call {e}", case.name);
            }
            let output = ModelOutput { prediction: case.at_call("model_output", e), variance_values: None };
            on_table.advance(output, &mut noise).expect("pending");
        }
    }
}

#[test]
fn euler_ancestral_steps_and_runs_match_diffusers() {
    let (steps, runs) = euler_like(Class::EulerAncestral, false);
    assert_eq!(steps.len(), 3);
    let mut over = report("Euler ancestral, each call from diffusers' sample", steps);
    over.extend(report("Euler ancestral, whole runs", runs));
    assert!(over.is_empty(), "over the bound: {over:#?}");
}

#[test]
fn heun_steps_and_runs_match_diffusers() {
    let (mut steps, mut runs) = (Vec::new(), Vec::new());
    for case in cases_of(Class::Heun) {
        let grid = case.sigma_grid();
        let heun = |grid: Grid, x_t: ArrayD<f64>| {
            EulerHeun::new(grid, case.mean_type(), true, Churn::default(), false, x_t)
        };
        // HE1/HE2: step j is calls 2j (Euler) and 2j + 1 (correction), from diffusers' sample of
        // call 2j; the last step, onto σ = 0, is call 2K − 2 alone.
        let mut m = Measured::default();
        for j in 0..grid.len() {
            let calls = 2 * j..(2 * j + 2).min(case.calls());
            let mut one = heun(window(&grid, j..j + 1), case.x_in_vp(2 * j));
            m.merge(follow(&case, &mut one, calls, Mode::Step));
        }
        steps.push((case.name.clone(), m));
        let mut run = heun(grid, case.x_in_vp(0));
        assert_eq!(run.num_evals(), case.calls(), "{}: 2K − 1 evaluations (HE1)", case.name);
        runs.push((case.name.clone(), follow(&case, &mut run, 0..case.calls(), Mode::Run)));
    }
    let mut over = report("Heun, each step from diffusers' sample", steps);
    over.extend(report("Heun, whole runs", runs));
    assert!(over.is_empty(), "over the bound: {over:#?}");
}

#[test]
fn spaced_timesteps_reproduce_diffusers_ddim_pndm_and_euler_timesteps() {
    let mut checked = 0;
    for case in cases() {
        let timesteps = case.values("timesteps");
        let want: Vec<f64> = match case.class {
            Class::Ddim => timesteps,
            // PNDM1, skip_prk_steps: b_{K−1}, b_{K−2}, b_{K−2}, b_{K−3}, …, b_0.
            Class::Pndm if case.config_bool("skip_prk_steps") => {
                let mut t = timesteps;
                t.dedup();
                t
            }
            // PNDM1, Runge–Kutta: b_{K−1} at call 0, b_{K−2}, b_{K−3}, b_{K−4} closing the three
            // steps (calls 3, 7, 11), then b_{K−4} again (call 12) and b_{K−5}, …, b_0.
            Class::Pndm => {
                [0, 3, 7, 11].iter().map(|&i| timesteps[i]).chain(timesteps[13..].iter().copied()).collect()
            }
            // leading/trailing are integers in float32; linspace is not claimed (see the top).
            Class::Euler | Class::EulerAncestral
                if !case.karras() && case.spacing() != TimestepSpacing::Linspace =>
            {
                timesteps
            }
            _ => continue,
        };
        let got = spaced_timesteps(case.spacing(), case.big_t(), case.k, case.steps_offset())
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let got: Vec<f64> = got.into_iter().map(|t| t as f64).collect();
        assert_eq!(got, want, "{}", case.name);
        checked += 1;
    }
    assert_eq!(checked, 13 + 5 + 3);
}

#[test]
fn dpm_spaced_timesteps_reproduce_diffusers_dpm_timesteps() {
    let mut checked = 0;
    for case in cases().into_iter().filter(|c| matches!(c.class, Class::DpmMultistep | Class::DpmSinglestep))
    {
        if case.karras() {
            continue; // the next test
        }
        // G3: L = T minus the timesteps whose λ is below `lambda_min_clipped` (−∞ unless set).
        // ddpm has no such option; the spacing is checked on the L diffusers computes.
        let clip = case.config["lambda_min_clipped"].as_f64().unwrap_or(f64::NEG_INFINITY);
        let clipped = case.alphas_cumprod().iter().filter(|&&a| 0.5 * (a / (1.0 - a)).ln() < clip).count();
        let l = case.big_t() - clipped;
        let got = dpm_spaced_timesteps(case.spacing(), l, case.k, case.steps_offset())
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let got: Vec<f64> = got.into_iter().map(|t| t as f64).collect();
        assert_eq!(got, case.values("timesteps"), "{} (L = {l})", case.name);
        checked += 1;
    }
    assert_eq!(checked, 26 + 15 - 4);
}

#[test]
fn karras_grids_reproduce_diffusers_dpm_karras_timesteps_and_sigmas() {
    let mut checked = 0;
    for case in cases().into_iter().filter(|c| matches!(c.class, Class::DpmMultistep | Class::DpmSinglestep))
    {
        if !case.karras() {
            continue;
        }
        assert_eq!(case.config_str("final_sigmas_type"), "zero", "{}", case.name);
        let spec = GridSpec {
            steps: case.k,
            spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            karras: true,
            dpm_layout: true,
            end: GridEnd::Zero,
        };
        let grid =
            Grid::from_schedule(&case.schedule(), &spec).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let t: Vec<f64> = grid.points.iter().map(|p| p.model_t).collect();
        assert_eq!(t, case.values("timesteps"), "{}: rounded Karras timesteps (G4)", case.name);
        let sigmas = case.values("sigmas");
        assert_eq!(grid.len() + 1, sigmas.len());
        for (p, &want) in grid.points.iter().chain([&grid.end]).zip(&sigmas) {
            assert!((p.sigma() - want).abs() <= TOLERANCE * want, "{}: σ {} vs {want}", case.name, p.sigma());
        }
        checked += 1;
    }
    assert_eq!(checked, 4);
}

#[test]
fn karras_sigmas_and_sigma_to_t_reproduce_euler_and_heun_karras_schedules() {
    let mut worst_t = 0.0f64;
    let mut checked = 0;
    for case in cases().into_iter().filter(|c| matches!(c.class, Class::Euler | Class::Heun)) {
        if !case.karras() {
            continue;
        }
        // G4: σ_min, σ_max of the K sigmas at the spaced timesteps, the table's ends for linspace.
        assert_eq!(case.spacing(), TimestepSpacing::Linspace, "{}", case.name);
        let log_sigmas: Vec<f64> =
            case.alphas_cumprod().iter().map(|&a| ((1.0 - a) / a).sqrt().ln()).collect();
        let (sigma_min, sigma_max) = (log_sigmas[0].exp(), log_sigmas[case.big_t() - 1].exp());
        let sigmas = karras_sigmas(sigma_min, sigma_max, case.k);
        let grid = case.sigma_grid();
        assert_eq!(grid.len(), case.k);
        for (i, (&s, p)) in sigmas.iter().zip(&grid.points).enumerate() {
            assert!(
                (s - p.sigma()).abs() <= TOLERANCE * s,
                "{} σ_{i}: {s} vs diffusers' {}",
                case.name,
                p.sigma()
            );
            // G4: diffusers' float32 log table moves fractional timesteps by up to ~6e-5.
            let t = sigma_to_t(&log_sigmas, s);
            worst_t = worst_t.max((t - p.model_t).abs());
            assert!((t - p.model_t).abs() <= 1e-4, "{} t_{i}: {t} vs diffusers' {}", case.name, p.model_t);
        }
        checked += 1;
    }
    eprintln!("Euler/Heun Karras timesteps: worst |ddpm − diffusers| = {worst_t:.2e}");
    assert_eq!(checked, 3);
}
