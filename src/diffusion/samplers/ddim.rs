//! Ancestral sampling (Ho et al. 2020, Algorithm 2) on the respaced chain of a grid, and DDIM
//! (Song et al. 2021, arXiv:2010.02502, Eq. 12) between any two grid points.

use ndarray::ArrayD;

use super::{no_pending, Advance, AncestralParts, Denoised, Eval, Grid, GridPoint, NoiseSource, Solver};
use crate::diffusion::{
    p_mean_variance, MeanType, ModelOutput, NoiseSchedule, PMeanVariance, Parameterization,
};
use crate::{Error, Result};

/// The schedule of the process restricted to the grid's points (Nichol & Dhariwal 2021 §4): its
/// cumulative products are ᾱ at the points, β'_i = 1 − ᾱ_i/ᾱ_{i−1} (ᾱ before the first is 1),
/// in increasing order of noise, with the trained schedule's conventions.
///
/// # Errors
/// As [`NoiseSchedule::from_betas`].
pub fn respaced_schedule(points: &[GridPoint], schedule: &NoiseSchedule) -> Result<NoiseSchedule> {
    let mut prev = 1.0;
    let betas: Vec<f64> = points
        .iter()
        .rev()
        .map(|p| {
            let b = 1.0 - p.alpha_bar() / prev;
            prev = p.alpha_bar();
            b
        })
        .collect();
    NoiseSchedule::from_betas(betas, *schedule.conventions())
}

/// Ancestral sampling: x_{t−1} = μ_θ(x_t, t) + σ_t z on the respaced chain, with the model's
/// variance (fixed small β̃', fixed large β', or learned), no noise at the last step. z is drawn
/// for the whole batch at every step, the last included, so a run draws the same numbers
/// whatever is kept of it.
pub struct Ancestral {
    points: Vec<GridPoint>,
    /// The respaced chain; `None` for a run of one step (t = 0 alone), which is μ̃ = x̂_0 with
    /// no noise and needs no table.
    chain: Option<NoiseSchedule>,
    param: Parameterization,
    clip_x0: bool,
    x: ArrayD<f64>,
    step: usize,
}

impl Ancestral {
    /// Ancestral sampling over `grid` from x_T = `x_t`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] unless the grid ends at the data (σ = 0) and its points are
    /// table entries of the trained schedule (not a Karras grid).
    pub fn new(
        grid: Grid,
        schedule: &NoiseSchedule,
        param: Parameterization,
        clip_x0: bool,
        x_t: ArrayD<f64>,
    ) -> Result<Self> {
        if grid.end.sigma() != 0.0 {
            return Err(Error::config("sampler", "ancestral sampling ends at x_0 (σ = 0)"));
        }
        let ab = schedule.alpha_bar();
        if !grid.points.iter().all(|p| ab.iter().any(|&a| a == p.alpha_bar())) {
            return Err(Error::config(
                "sampler (--sampler ddpm)",
                "ancestral sampling runs on the trained chain's timesteps, not on Karras σ; drop --karras",
            ));
        }
        let full = grid.points.len() == schedule.num_timesteps();
        if param.mean_type == MeanType::PrevX && !full {
            return Err(Error::config(
                "sampling steps (--steps)",
                "this model predicts x_(t-1) of its own chain (mean type prev-x), which a respaced chain \
                 cannot use; sample all T steps (drop --steps)",
            ));
        }
        // All T steps: the trained schedule itself, so the run is the reference code's to the bit
        // (re-deriving β from ᾱ would move the tables by rounding).
        let chain = if full {
            Some(schedule.clone())
        } else if grid.points.len() > 1 {
            Some(respaced_schedule(&grid.points, schedule)?)
        } else {
            None
        };
        Ok(Ancestral { points: grid.points, chain, param, clip_x0, x: x_t, step: 0 })
    }
}

impl Solver for Ancestral {
    fn next_eval(&mut self, _noise: &mut dyn NoiseSource) -> Option<Eval<'_>> {
        let at = *self.points.get(self.step)?;
        Some(Eval { x: &self.x, at })
    }

    fn advance(&mut self, output: ModelOutput, noise: &mut dyn NoiseSource) -> Result<Advance> {
        if self.step >= self.points.len() {
            return Err(no_pending());
        }
        let i = self.points.len() - 1 - self.step;
        let p = match &self.chain {
            Some(chain) => p_mean_variance(
                chain,
                &self.param,
                &self.x,
                &vec![i; self.x.shape()[0]],
                &output,
                self.clip_x0,
            ),
            None => {
                // One step onto ᾱ = 1: the posterior mean is x̂_0 itself (c₁ = 1, c₂ = 0), the
                // variance 0.
                let at = self.points[0];
                let (mean, x0_pred) = if self.param.mean_type == MeanType::PrevX {
                    let x0 = output.prediction.mapv(|v| if self.clip_x0 { v.clamp(-1.0, 1.0) } else { v });
                    (output.prediction.clone(), x0)
                } else {
                    let d =
                        Denoised::new(self.param.mean_type, &self.x, &at, &output.prediction, self.clip_x0)?;
                    (d.x0.clone(), d.x0)
                };
                let zeros = ArrayD::zeros(self.x.raw_dim());
                PMeanVariance { mean, variance: zeros.clone(), log_variance: zeros, x0_pred }
            }
        };
        let at = self.points[self.step];
        // The ε̂ the step used: x_t = α x̂_0 + σ ε̂ with x̂_0 as clipped (for ε-prediction
        // without clipping, the output itself).
        let (a, s) = (at.alpha(), at.sigma_vp());
        let eps_pred = if s > 0.0 {
            ndarray::Zip::from(&self.x).and(&p.x0_pred).map_collect(|&x, &x0| (x - a * x0) / s)
        } else {
            ArrayD::zeros(self.x.raw_dim())
        };
        let z = noise.draw(self.x.shape());
        let z = if i > 0 { z } else { ArrayD::zeros(self.x.raw_dim()) };
        self.x = &p.mean + &(&p.log_variance.mapv(|l| (0.5 * l).exp()) * &z);
        self.step += 1;
        Ok(Advance {
            x0_pred: p.x0_pred,
            eps_pred,
            noise: Some(z),
            ancestral: Some(AncestralParts { mean: p.mean, variance: p.variance }),
        })
    }

    fn x(&self) -> &ArrayD<f64> {
        &self.x
    }

    fn num_evals(&self) -> usize {
        self.points.len()
    }
}

/// DDIM: x_s = √ᾱ_s x̂_0 + √(1 − ᾱ_s − σ²) ε̂ + σ z with
/// σ = η √((1 − ᾱ_s)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_s) (Song et al. Eqs. 12 and 16), from each grid point
/// t to the next point s (or the grid's end). η = 0 is deterministic and is the first-order
/// DPM-Solver (Lu et al. 2022, §4.1); noise is drawn only where σ > 0.
pub struct Ddim {
    grid: Grid,
    mean_type: MeanType,
    eta: f64,
    clip_x0: bool,
    x: ArrayD<f64>,
    step: usize,
}

impl Ddim {
    /// DDIM with noise scale η over `grid` from x_T = `x_t`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for η outside [0, 1] or not finite.
    pub fn new(grid: Grid, mean_type: MeanType, eta: f64, clip_x0: bool, x_t: ArrayD<f64>) -> Result<Self> {
        if !(0.0..=1.0).contains(&eta) {
            return Err(Error::config("--eta", format!("η = {eta}; DDIM takes 0 ≤ η ≤ 1")));
        }
        Ok(Ddim { grid, mean_type, eta, clip_x0, x: x_t, step: 0 })
    }

    /// σ_t of the step from `t` to `s` (Song et al. Eq. 16).
    pub fn sigma(eta: f64, t: &GridPoint, s: &GridPoint) -> f64 {
        let (ab, ab_s) = (t.alpha_bar(), s.alpha_bar());
        eta * ((1.0 - ab_s) / (1.0 - ab)).sqrt() * (1.0 - ab / ab_s).sqrt()
    }
}

impl Solver for Ddim {
    fn next_eval(&mut self, _noise: &mut dyn NoiseSource) -> Option<Eval<'_>> {
        let at = *self.grid.points.get(self.step)?;
        Some(Eval { x: &self.x, at })
    }

    fn advance(&mut self, output: ModelOutput, noise: &mut dyn NoiseSource) -> Result<Advance> {
        let t = *self.grid.points.get(self.step).ok_or_else(no_pending)?;
        let s = *self.grid.points.get(self.step + 1).unwrap_or(&self.grid.end);
        let d = Denoised::new(self.mean_type, &self.x, &t, &output.prediction, self.clip_x0)?;
        let sigma = Ddim::sigma(self.eta, &t, &s);
        let dir = (1.0 - s.alpha_bar() - sigma * sigma).max(0.0).sqrt();
        let mut x = super::combine(&[(s.alpha(), &d.x0), (dir, &d.eps)]);
        let z = if sigma > 0.0 {
            let z = noise.draw(x.shape());
            x.scaled_add(sigma, &z);
            Some(z)
        } else {
            None
        };
        self.x = x;
        self.step += 1;
        Ok(Advance { x0_pred: d.x0, eps_pred: d.eps, noise: z, ancestral: None })
    }

    fn x(&self) -> &ArrayD<f64> {
        &self.x
    }

    fn num_evals(&self) -> usize {
        self.grid.points.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::gaussian::{p_sample_loop, standard_normal};
    use crate::diffusion::samplers::{
        build, GridEnd, GridSpec, SamplerKind, SamplerOptions, TimestepSpacing,
    };
    use crate::diffusion::{BetaSchedule, Convention, VarianceType};

    fn spec(steps: usize) -> GridSpec {
        GridSpec {
            steps,
            spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            karras: false,
            dpm_layout: false,
            end: GridEnd::Zero,
        }
    }

    #[test]
    fn all_t_steps_are_the_trained_chain_to_the_bit() {
        // diffusers' convention rebuilds its tables in f32 from β, so a chain re-derived from ᾱ
        // would differ by rounding; over all T steps ancestral sampling must be p_sample_loop on
        // the trained schedule exactly.
        for convention in [Convention::Ho2020, Convention::Diffusers] {
            let s = NoiseSchedule::new(&BetaSchedule::Linear, 40, convention.settings()).unwrap();
            let param =
                Parameterization { mean_type: MeanType::Eps, variance_type: VarianceType::FixedLarge };
            let f = |x: &ArrayD<f64>, t: f64| x.mapv(|v| 0.3 * v + 0.05 * (v + t / 7.0).sin());
            let want = p_sample_loop(
                &s,
                &param,
                &[2, 3],
                true,
                |x, t| f(x, t[0] as f64),
                &mut crate::rng_from_seed(5),
            );
            let mut rng = crate::rng_from_seed(5);
            let x_t = standard_normal(&[2, 3], &mut rng);
            let grid = Grid::from_schedule(&s, &spec(40)).unwrap();
            let opts = SamplerOptions { clip_x0: true, ..SamplerOptions::default() };
            let mut solver = build(SamplerKind::Ancestral, grid, &s, param, opts, x_t).unwrap();
            while let Some(e) = solver.next_eval(&mut rng) {
                let out = f(e.x, e.at.model_t);
                solver.advance(ModelOutput { prediction: out, variance_values: None }, &mut rng).unwrap();
            }
            assert_eq!(solver.x(), &want, "{convention:?}");
        }
    }

    #[test]
    fn a_prev_x_model_is_refused_on_a_respaced_chain() {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 40, Convention::Ho2020.settings()).unwrap();
        let param = Parameterization { mean_type: MeanType::PrevX, variance_type: VarianceType::FixedSmall };
        let x = ArrayD::zeros(vec![1, 2]);
        let opts = SamplerOptions::default();
        let grid = |k| Grid::from_schedule(&s, &spec(k)).unwrap();
        assert!(build(SamplerKind::Ancestral, grid(40), &s, param, opts, x.clone()).is_ok());
        for k in [1, 10] {
            let e =
                build(SamplerKind::Ancestral, grid(k), &s, param, opts, x.clone()).err().unwrap().to_string();
            assert!(e.contains("prev-x") && e.contains("--steps"), "{e}");
        }
    }
}
