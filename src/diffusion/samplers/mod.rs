//! The reverse process, solved: every sampler as a state machine that asks for the network's
//! output at a point of a [`Grid`] and advances x, independent of what computes that output
//! (a U-Net, a closed-form ε* in the tests, a Python callable).
//!
//! | file        | owns                                                                          |
//! |-------------|-------------------------------------------------------------------------------|
//! | [`grid`]    | timestep spacings (linspace, leading, trailing), Karras σ, σ ↔ t, [`Grid`]   |
//! | `ddim`      | ancestral sampling (Ho et al. Algorithm 2) and DDIM (Song et al. 2021, Eq. 12) |
//! | `dpm`       | DPM-Solver 1–3 (Lu et al. 2022a) and DPM-Solver++ 2S/2M/3M/2M-SDE (2022b)     |
//! | `edm`       | Euler, Heun and Euler-ancestral in σ-space with churn (Karras et al. 2022)    |
//! | `pndm`      | PNDM: pseudo Runge–Kutta warm-up, then pseudo linear multistep (Liu et al. 2022) |
//!
//! The state x is always the variance-preserving x_t of Ho et al. Eq. (4); σ-space samplers
//! work on x_t/√ᾱ internally and convert back, so every sampler hands the network the same
//! input. docs/sampling.md gives each update with its order and source.
//!
//! Driving one: `while let Some(eval) = solver.next_eval(rng) { let out = net(eval.x, eval.at);
//! solver.advance(out, rng)?; }` then [`Solver::x`] is x_0 (see [`run`]).

use ndarray::ArrayD;

use crate::diffusion::gaussian::standard_normal;
use crate::diffusion::{MeanType, ModelOutput, NoiseSchedule, Parameterization};
use crate::{Error, Result, Rng};

mod ddim;
mod dpm;
mod edm;
pub mod grid;
mod pndm;

pub use ddim::{respaced_schedule, Ancestral, Ddim};
pub use dpm::{DpmAlgorithm, DpmSolver, SolverType};
pub use edm::{Churn, EulerAncestral, EulerHeun};
pub use grid::{karras_sigmas, spaced_timesteps, Grid, GridEnd, GridPoint, GridSpec, TimestepSpacing};
pub use pndm::Pndm;

/// The samplers `ddpm sample --sampler NAME` offers, by their CLI names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    /// `ddpm`: ancestral sampling, Ho et al. Algorithm 2 (stochastic).
    Ancestral,
    /// `ddim`: Song et al. 2021 Eq. (12) with noise scale η (deterministic at η = 0).
    Ddim,
    /// `pndm`: Liu et al. 2022: 3 pseudo Runge–Kutta steps (4 evaluations each), then PLMS.
    Pndm,
    /// `plms`: PNDM's linear multistep part alone, started as diffusers' `skip_prk_steps`.
    Plms,
    /// `dpm-solver-1|2|3`: singlestep DPM-Solver of that order (noise prediction).
    DpmSolver(u8),
    /// `dpm-solver-2m|3m`: multistep DPM-Solver (noise prediction).
    DpmSolverMultistep(u8),
    /// `dpm++2s`: singlestep DPM-Solver++ of order 2 (data prediction).
    DpmPlusPlus2S,
    /// `dpm++2m`: multistep DPM-Solver++ of order 2.
    DpmPlusPlus2M,
    /// `dpm++3m`: multistep DPM-Solver++ of order 3.
    DpmPlusPlus3M,
    /// `dpm++2m-sde`: the stochastic (SDE) variant of DPM-Solver++ 2M.
    DpmPlusPlus2MSde,
    /// `euler`: Euler in σ-space (Karras et al. Algorithm 2 without the correction).
    Euler,
    /// `heun`: Heun's second-order method in σ-space (Karras et al. Algorithm 1/2).
    Heun,
    /// `euler-ancestral`: Euler to σ_down plus fresh noise of σ_up (k-diffusion).
    EulerAncestral,
}

impl SamplerKind {
    /// Every sampler with its name and one line of help.
    pub const ALL: [(SamplerKind, &'static str, &'static str); 16] = [
        (
            SamplerKind::Ancestral,
            "ddpm",
            "ancestral, Ho et al. Algorithm 2 (stochastic; all T steps by default)",
        ),
        (
            SamplerKind::Ddim,
            "ddim",
            "DDIM, Song et al. 2021; --eta 0 deterministic (order 1), 1 ancestral-like",
        ),
        (
            SamplerKind::Pndm,
            "pndm",
            "PNDM, Liu et al. 2022: Runge-Kutta warm-up then linear multistep (order 2)",
        ),
        (SamplerKind::Plms, "plms", "PNDM's linear multistep alone (diffusers' skip_prk_steps)"),
        (
            SamplerKind::DpmSolver(1),
            "dpm-solver-1",
            "DPM-Solver order 1 (DDIM eta 0's update on the DPM grid), Lu et al. 2022",
        ),
        (SamplerKind::DpmSolver(2), "dpm-solver-2", "DPM-Solver order 2, singlestep"),
        (SamplerKind::DpmSolver(3), "dpm-solver-3", "DPM-Solver order 3, singlestep"),
        (SamplerKind::DpmSolverMultistep(2), "dpm-solver-2m", "DPM-Solver order 2, multistep"),
        (SamplerKind::DpmSolverMultistep(3), "dpm-solver-3m", "DPM-Solver order 3, multistep"),
        (SamplerKind::DpmPlusPlus2S, "dpm++2s", "DPM-Solver++ order 2, singlestep (data prediction)"),
        (SamplerKind::DpmPlusPlus2M, "dpm++2m", "DPM-Solver++ order 2, multistep"),
        (SamplerKind::DpmPlusPlus3M, "dpm++3m", "DPM-Solver++ order 3, multistep"),
        (SamplerKind::DpmPlusPlus2MSde, "dpm++2m-sde", "DPM-Solver++ 2M, SDE variant (stochastic)"),
        (
            SamplerKind::Euler,
            "euler",
            "Euler in sigma-space, Karras et al. 2022 (order 1; --s-churn adds noise)",
        ),
        (
            SamplerKind::Heun,
            "heun",
            "Heun in sigma-space, Karras et al. 2022 (order 2, 2 evaluations a step)",
        ),
        (SamplerKind::EulerAncestral, "euler-ancestral", "Euler ancestral in sigma-space (stochastic)"),
    ];

    /// The number of grid points used when none is asked for, on a process of T = `big_t`
    /// steps: all T for ancestral sampling, else 25 (at most T − 1 for the DPM-Solvers).
    pub fn default_steps(self, big_t: usize) -> usize {
        match self {
            SamplerKind::Ancestral => big_t,
            // The DPM-Solvers' grid has at most T − 1 points (grid::dpm_spaced_timesteps).
            SamplerKind::DpmSolver(_)
            | SamplerKind::DpmSolverMultistep(_)
            | SamplerKind::DpmPlusPlus2S
            | SamplerKind::DpmPlusPlus2M
            | SamplerKind::DpmPlusPlus3M
            | SamplerKind::DpmPlusPlus2MSde => 25.min(big_t - 1).max(1),
            _ => 25.min(big_t),
        }
    }

    /// The CLI name.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(k, _, _)| *k == self).map(|(_, n, _)| *n).expect("every sampler is listed")
    }

    /// Whether the sampler draws noise as it goes (an SDE solver), rather than solving the
    /// probability-flow ODE. DDIM and Euler are stochastic only with η > 0 or churn.
    pub fn is_stochastic(self) -> bool {
        matches!(self, SamplerKind::Ancestral | SamplerKind::DpmPlusPlus2MSde | SamplerKind::EulerAncestral)
    }

    /// The theoretical order of convergence of the deterministic samplers in the step size
    /// (global error O(h^p)); `None` for the stochastic ones.
    pub fn ode_order(self) -> Option<u8> {
        match self {
            SamplerKind::Ddim | SamplerKind::Euler | SamplerKind::DpmSolver(1) => Some(1),
            SamplerKind::DpmSolver(p) | SamplerKind::DpmSolverMultistep(p) => Some(p),
            SamplerKind::DpmPlusPlus2S | SamplerKind::DpmPlusPlus2M | SamplerKind::Heun => Some(2),
            SamplerKind::DpmPlusPlus3M => Some(3),
            // The Adams–Bashforth weights assume steps of equal length in σ; on other grids
            // (every spacing ddpm and diffusers offer) both are second order; on grids evenly
            // spaced in σ PNDM is fourth order and PLMS third (its start), as
            // tests/sampler_order.rs measures.
            SamplerKind::Pndm | SamplerKind::Plms => Some(2),
            SamplerKind::Ancestral | SamplerKind::DpmPlusPlus2MSde | SamplerKind::EulerAncestral => None,
        }
    }

    /// How this sampler lays out its grid by default: Karras σ for the σ-space samplers is an
    /// option, not the default (as in diffusers); the noise-prediction DPM-Solvers end at σ_min
    /// as diffusers requires.
    pub fn default_end(self) -> GridEnd {
        match self {
            SamplerKind::DpmSolver(_) | SamplerKind::DpmSolverMultistep(_) => GridEnd::SigmaMin,
            _ => GridEnd::Zero,
        }
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let k = s.trim().to_ascii_lowercase();
        let alias = match k.as_str() {
            "ancestral" => "ddpm",
            "dpm-solver-2s" => "dpm-solver-2",
            "dpm-solver-3s" => "dpm-solver-3",
            other => other,
        };
        Self::ALL.iter().find(|(_, n, _)| *n == alias).map(|(k, _, _)| *k).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|(_, n, _)| *n).collect();
            Error::config(
                "sampler (--sampler)",
                format!("unknown sampler {s:?}; one of {}", names.join(", ")),
            )
        })
    }
}

/// Options shared by the samplers (each reads those that apply to it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerOptions {
    /// DDIM's η (Song et al. Eq. 16).
    pub eta: f64,
    /// Clip x̂_0 to [−1, 1] at every evaluation, and recompute ε̂ from the clipped x̂_0.
    pub clip_x0: bool,
    /// DPM-Solver's second-order update: `midpoint` (diffusers' default) or `heun`.
    pub solver_type: SolverType,
    /// Lower the DPM-Solvers' order at the last steps of short runs (< 15 steps), as diffusers'
    /// `lower_order_final`; the step onto σ = 0 is always first order.
    pub lower_order_final: bool,
    /// Euler's stochastic churn (Karras et al. Algorithm 2); no churn when `s_churn` is 0.
    pub churn: Churn,
    /// The third-order multistep DPM-Solver(++) update as Lu et al.'s reference code and
    /// diffusers write it, with the second difference D2 at half its weight (second order
    /// overall); by default ddpm uses the exact weight (third order). For reproducing them.
    pub reference_3m: bool,
}

impl Default for SamplerOptions {
    fn default() -> Self {
        SamplerOptions {
            eta: 0.0,
            clip_x0: false,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            churn: Churn::default(),
            reference_3m: false,
        }
    }
}

/// What a sampler asks the network for: its output at `x` (the variance-preserving x_t) and the
/// noise level `at` (whose `model_t` the network takes as timestep).
#[derive(Debug)]
pub struct Eval<'a> {
    /// The network's input x_t, `[N, C, H, W]`.
    pub x: &'a ArrayD<f64>,
    /// The noise level.
    pub at: GridPoint,
}

/// What one evaluation did, for `ddpm trace`.
#[derive(Clone, Debug)]
pub struct Advance {
    /// x̂_0 implied by the output (clipped when sampling clips).
    pub x0_pred: ArrayD<f64>,
    /// ε̂ implied by the output (recomputed from the clipped x̂_0 when clipping).
    pub eps_pred: ArrayD<f64>,
    /// The noise this step drew, if any (z ~ N(0, I), before scaling).
    pub noise: Option<ArrayD<f64>>,
    /// For ancestral sampling: μ_θ and σ_t² of p_θ(x_{t−1} ∣ x_t).
    pub ancestral: Option<AncestralParts>,
}

/// μ_θ(x_t, t) and σ_t² of an ancestral step, each `[N, C, H, W]`.
#[derive(Clone, Debug)]
pub struct AncestralParts {
    /// μ_θ(x_t, t).
    pub mean: ArrayD<f64>,
    /// σ_t².
    pub variance: ArrayD<f64>,
}

/// Where a sampler's fresh noise z ~ N(0, I) comes from: an [`Rng`], or recorded draws (another
/// implementation's, to follow it step by step).
pub trait NoiseSource {
    /// z of `shape`, drawn in row-major order.
    fn draw(&mut self, shape: &[usize]) -> ArrayD<f64>;
}

impl NoiseSource for Rng {
    fn draw(&mut self, shape: &[usize]) -> ArrayD<f64> {
        standard_normal(shape, self)
    }
}

/// A sampler: asks for evaluations until the run is over.
pub trait Solver {
    /// The next evaluation, or `None` when x is final. May draw noise (Euler's churn).
    fn next_eval(&mut self, noise: &mut dyn NoiseSource) -> Option<Eval<'_>>;
    /// Takes the network's output at the point [`Solver::next_eval`] named, and advances.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if called with no evaluation pending.
    fn advance(&mut self, output: ModelOutput, noise: &mut dyn NoiseSource) -> Result<Advance>;
    /// The current x: x_T before the first evaluation, x_0 (or x at the grid's end) after the last.
    fn x(&self) -> &ArrayD<f64>;
    /// The number of network evaluations of a whole run.
    fn num_evals(&self) -> usize;
}

/// x̂_0 and ε̂ from a network output at one noise level.
#[derive(Clone, Debug)]
pub struct Denoised {
    /// x̂_0.
    pub x0: ArrayD<f64>,
    /// ε̂, with x = α x̂_0 + σ_vp ε̂.
    pub eps: ArrayD<f64>,
}

impl Denoised {
    /// Converts the prediction of `mean_type` at `at` for input `x` (Eq. 4 solved for what is
    /// missing; v as in Salimans & Ho 2022 §4): ε: x̂_0 = (x − σ_vp ε̂)/α; x_0: ε̂ = (x − α x̂_0)/σ_vp;
    /// v: x̂_0 = α x − σ_vp v, ε̂ = σ_vp x + α v. With `clip`, x̂_0 is clamped to [−1, 1] and ε̂
    /// recomputed from it (at σ = 0 ε̂ is kept).
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for [`MeanType::PrevX`], whose output is a step of the original
    /// chain and has no meaning on another grid (only `ddpm` sampling takes it).
    pub fn new(
        mean_type: MeanType,
        x: &ArrayD<f64>,
        at: &GridPoint,
        pred: &ArrayD<f64>,
        clip: bool,
    ) -> Result<Self> {
        assert_eq!(x.shape(), pred.shape(), "Denoised: x {:?} and prediction {:?}", x.shape(), pred.shape());
        let (a, s) = (at.alpha(), at.sigma_vp());
        let (mut x0, eps) =
            match mean_type {
                MeanType::Eps => {
                    (ndarray::Zip::from(x).and(pred).map_collect(|&x, &e| (x - s * e) / a), pred.clone())
                }
                MeanType::X0 => {
                    let eps = if s > 0.0 {
                        ndarray::Zip::from(x).and(pred).map_collect(|&x, &x0| (x - a * x0) / s)
                    } else {
                        ArrayD::zeros(x.raw_dim())
                    };
                    (pred.clone(), eps)
                }
                MeanType::V => (
                    ndarray::Zip::from(x).and(pred).map_collect(|&x, &v| a * x - s * v),
                    ndarray::Zip::from(x).and(pred).map_collect(|&x, &v| s * x + a * v),
                ),
                MeanType::PrevX => return Err(Error::config(
                    "sampler (--sampler)",
                    "this model predicts x_(t-1) of its own chain (mean type prev-x), which only ancestral \
                     sampling on that chain can use; use --sampler ddpm",
                )),
            };
        if !clip {
            return Ok(Denoised { x0, eps });
        }
        x0.mapv_inplace(|v| v.clamp(-1.0, 1.0));
        let eps = if s > 0.0 {
            ndarray::Zip::from(x).and(&x0).map_collect(|&x, &x0| (x - a * x0) / s)
        } else {
            eps
        };
        Ok(Denoised { x0, eps })
    }
}

/// Builds the sampler `kind` over `grid` for x_T = `x_t`.
///
/// `schedule` is the trained schedule (ancestral sampling takes its variance conventions);
/// `param` says what the network predicts.
///
/// # Errors
/// [`Error::InvalidConfig`] for an invalid grid ([`Grid::validate`]) or a combination that does
/// not exist (e.g. ancestral sampling on a Karras grid or not ending at the data, a PNDM run of
/// fewer than 4 points, a prev-x model with any sampler but ancestral on its own chain).
pub fn build(
    kind: SamplerKind,
    grid: Grid,
    schedule: &NoiseSchedule,
    param: Parameterization,
    options: SamplerOptions,
    x_t: ArrayD<f64>,
) -> Result<Box<dyn Solver>> {
    grid.validate()?;
    if !matches!(kind, SamplerKind::Ancestral) && param.mean_type == MeanType::PrevX {
        return Err(Error::config(
            "sampler (--sampler)",
            format!(
                "{} cannot use a model that predicts x_(t-1) (mean type prev-x); use --sampler ddpm",
                kind.name()
            ),
        ));
    }
    let p = param.mean_type;
    Ok(match kind {
        SamplerKind::Ancestral => Box::new(Ancestral::new(grid, schedule, param, options.clip_x0, x_t)?),
        SamplerKind::Ddim => Box::new(Ddim::new(grid, p, options.eta, options.clip_x0, x_t)?),
        SamplerKind::Pndm => Box::new(Pndm::new(grid, p, true, options.clip_x0, x_t)?),
        SamplerKind::Plms => Box::new(Pndm::new(grid, p, false, options.clip_x0, x_t)?),
        SamplerKind::DpmSolver(order) => {
            Box::new(DpmSolver::new(grid, p, DpmAlgorithm::Noise, order, false, options, x_t)?)
        }
        SamplerKind::DpmSolverMultistep(order) => {
            Box::new(DpmSolver::new(grid, p, DpmAlgorithm::Noise, order, true, options, x_t)?)
        }
        SamplerKind::DpmPlusPlus2S => {
            Box::new(DpmSolver::new(grid, p, DpmAlgorithm::Data, 2, false, options, x_t)?)
        }
        SamplerKind::DpmPlusPlus2M => {
            Box::new(DpmSolver::new(grid, p, DpmAlgorithm::Data, 2, true, options, x_t)?)
        }
        SamplerKind::DpmPlusPlus3M => {
            Box::new(DpmSolver::new(grid, p, DpmAlgorithm::Data, 3, true, options, x_t)?)
        }
        SamplerKind::DpmPlusPlus2MSde => {
            Box::new(DpmSolver::new(grid, p, DpmAlgorithm::DataSde, 2, true, options, x_t)?)
        }
        SamplerKind::Euler => Box::new(EulerHeun::new(grid, p, false, options.churn, options.clip_x0, x_t)),
        SamplerKind::Heun => Box::new(EulerHeun::new(grid, p, true, options.churn, options.clip_x0, x_t)),
        SamplerKind::EulerAncestral => Box::new(EulerAncestral::new(grid, p, options.clip_x0, x_t)),
    })
}

/// Runs `solver` to the end with `model(x, at)` giving the network output, calling
/// `on_eval(i, eval_input, at, output, advance, x_after)` after each evaluation i.
///
/// # Errors
/// What `model` or the solver return.
pub fn run<M, O>(
    solver: &mut dyn Solver,
    noise: &mut dyn NoiseSource,
    mut model: M,
    mut on_eval: O,
) -> Result<ArrayD<f64>>
where
    M: FnMut(&ArrayD<f64>, &GridPoint) -> Result<ModelOutput>,
    O: FnMut(usize, &ArrayD<f64>, &GridPoint, &ModelOutput, &Advance, &ArrayD<f64>) -> Result<()>,
{
    let mut i = 0;
    while let Some(eval) = solver.next_eval(noise) {
        let (x_in, at) = (eval.x.clone(), eval.at);
        let out = model(&x_in, &at)?;
        let adv = solver.advance(out.clone(), noise)?;
        on_eval(i, &x_in, &at, &out, &adv, solver.x())?;
        i += 1;
    }
    Ok(solver.x().clone())
}

/// ε̂ or x̂_0 combined linearly: Σ c_i a_i, elementwise.
pub(crate) fn combine(terms: &[(f64, &ArrayD<f64>)]) -> ArrayD<f64> {
    let mut out = ArrayD::zeros(terms[0].1.raw_dim());
    for (c, a) in terms {
        if *c != 0.0 {
            out.scaled_add(*c, a);
        }
    }
    out
}

pub(crate) fn no_pending() -> Error {
    Error::config("sampler", "advance called with no evaluation pending (call next_eval first)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sampler_name_parses_back() {
        for (k, name, help) in SamplerKind::ALL {
            assert_eq!(name.parse::<SamplerKind>().unwrap(), k);
            assert_eq!(k.name(), name);
            assert!(!help.is_empty());
        }
        let e = "dpm++9m".parse::<SamplerKind>().unwrap_err().to_string();
        assert!(e.contains("dpm++2m") && e.contains("euler-ancestral"), "{e}");
    }

    #[test]
    fn denoised_inverts_eq_4_for_every_parameterisation() {
        let at = GridPoint::from_alpha_bar(0.4, 0.0);
        let x0 = ArrayD::from_shape_vec(vec![1, 3], vec![0.3, -0.7, 1.5]).unwrap();
        let eps = ArrayD::from_shape_vec(vec![1, 3], vec![1.1, 0.2, -0.4]).unwrap();
        let x = &x0 * at.alpha() + &eps * at.sigma_vp();
        let v = &eps * at.alpha() - &x0 * at.sigma_vp();
        for (mt, pred) in [(MeanType::Eps, &eps), (MeanType::X0, &x0), (MeanType::V, &v)] {
            let d = Denoised::new(mt, &x, &at, pred, false).unwrap();
            for (a, b) in d.x0.iter().zip(x0.iter()).chain(d.eps.iter().zip(eps.iter())) {
                assert!((a - b).abs() < 1e-12, "{mt:?}");
            }
        }
        let c = Denoised::new(MeanType::X0, &x, &at, &x0, true).unwrap();
        assert_eq!(c.x0[[0, 2]], 1.0);
        // ε̂ is recomputed so that x = α x̂_0 + σ ε̂ still holds.
        assert!((at.alpha() * c.x0[[0, 2]] + at.sigma_vp() * c.eps[[0, 2]] - x[[0, 2]]).abs() < 1e-12);
        assert!(Denoised::new(MeanType::PrevX, &x, &at, &x0, false).is_err());
    }
}
