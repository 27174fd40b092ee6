//! Euler, Heun and Euler-ancestral in σ-space (Karras et al. 2022, arXiv:2206.00364, Algorithms
//! 1 and 2; k-diffusion's `sample_euler_ancestral`).
//!
//! In the variance-exploding variable y = x_t/√ᾱ = x_0 + σ ε, the probability-flow ODE is
//! dy/dσ = (y − D(y; σ))/σ = ε̂(y; σ) (Karras et al. Eq. 3 with s(t) = 1, σ(t) = t): an Euler
//! step is y_next = y + (σ_next − σ) ε̂, which is DDIM at η = 0 written in y. Heun averages ε̂ at
//! both ends (order 2); the step onto σ = 0 stays Euler, where ε̂ has no meaning.

use ndarray::ArrayD;

use super::{no_pending, Advance, Denoised, Eval, Grid, GridPoint, NoiseSource, Solver};
use crate::diffusion::{MeanType, ModelOutput};
use crate::Result;

/// Stochastic churn (Karras et al. Algorithm 2, lines 4–6): at each σ_i in [S_tmin, S_tmax],
/// γ = min(S_churn/K, √2 − 1), σ̂ = σ_i (1 + γ), and y gains noise of standard deviation
/// S_noise √(σ̂² − σ_i²) before the network is evaluated at σ̂.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Churn {
    /// S_churn (0: no churn, a deterministic sampler).
    pub s_churn: f64,
    /// S_tmin.
    pub s_tmin: f64,
    /// S_tmax.
    pub s_tmax: f64,
    /// S_noise.
    pub s_noise: f64,
}

impl Default for Churn {
    fn default() -> Self {
        Churn { s_churn: 0.0, s_tmin: 0.0, s_tmax: f64::INFINITY, s_noise: 1.0 }
    }
}

enum Stage {
    /// Evaluate at (x_in, at): the churned current point.
    First { x_in: ArrayD<f64>, at: GridPoint, noise: Option<ArrayD<f64>> },
    /// Heun's corrector: evaluate at the Euler prediction at the next point.
    Second { y_hat: ArrayD<f64>, sigma_hat: f64, eps: ArrayD<f64>, x_in: ArrayD<f64> },
    /// Nothing prepared for the current step yet.
    Idle,
}

/// Euler (`heun = false`) or Heun (`heun = true`) in σ-space, with optional churn.
pub struct EulerHeun {
    grid: Grid,
    mean_type: MeanType,
    heun: bool,
    churn: Churn,
    clip_x0: bool,
    x: ArrayD<f64>,
    step: usize,
    stage: Stage,
}

impl EulerHeun {
    /// The sampler over `grid` from x_T = `x_t`.
    pub fn new(
        grid: Grid,
        mean_type: MeanType,
        heun: bool,
        churn: Churn,
        clip_x0: bool,
        x_t: ArrayD<f64>,
    ) -> Self {
        EulerHeun { grid, mean_type, heun, churn, clip_x0, x: x_t, step: 0, stage: Stage::Idle }
    }

    fn next_point(&self) -> GridPoint {
        *self.grid.points.get(self.step + 1).unwrap_or(&self.grid.end)
    }
}

impl Solver for EulerHeun {
    fn next_eval(&mut self, noise: &mut dyn NoiseSource) -> Option<Eval<'_>> {
        let p = *self.grid.points.get(self.step)?;
        if let Stage::Idle = self.stage {
            let c = &self.churn;
            let k = self.grid.len() as f64;
            let gamma = if c.s_churn > 0.0 && c.s_tmin <= p.sigma() && p.sigma() <= c.s_tmax {
                (c.s_churn / k).min(std::f64::consts::SQRT_2 - 1.0)
            } else {
                0.0
            };
            self.stage = if gamma > 0.0 {
                let sigma_hat = p.sigma() * (1.0 + gamma);
                let z = noise.draw(self.x.shape());
                let y = self.x.mapv(|v| v / p.alpha());
                let at = GridPoint::from_sigma(sigma_hat, self.grid.model_t_at(sigma_hat));
                let std = c.s_noise * (sigma_hat * sigma_hat - p.sigma() * p.sigma()).sqrt();
                let y_hat = super::combine(&[(1.0, &y), (std, &z)]);
                Stage::First { x_in: y_hat.mapv(|v| v * at.alpha()), at, noise: Some(z) }
            } else {
                Stage::First { x_in: self.x.clone(), at: p, noise: None }
            };
        }
        match &self.stage {
            Stage::First { x_in, at, .. } => Some(Eval { x: x_in, at: *at }),
            Stage::Second { x_in, .. } => Some(Eval { x: x_in, at: self.next_point() }),
            Stage::Idle => None,
        }
    }

    fn advance(&mut self, output: ModelOutput, _noise: &mut dyn NoiseSource) -> Result<Advance> {
        let next = self.next_point();
        match std::mem::replace(&mut self.stage, Stage::Idle) {
            Stage::Idle => Err(no_pending()),
            Stage::First { x_in, at, noise } => {
                let d = Denoised::new(self.mean_type, &x_in, &at, &output.prediction, self.clip_x0)?;
                let y_hat = x_in.mapv(|v| v / at.alpha());
                let y_next = super::combine(&[(1.0, &y_hat), (next.sigma() - at.sigma(), &d.eps)]);
                if self.heun && next.sigma() > 0.0 {
                    let x_in = y_next.mapv(|v| v * next.alpha());
                    self.stage = Stage::Second { y_hat, sigma_hat: at.sigma(), eps: d.eps.clone(), x_in };
                } else {
                    self.x = y_next.mapv(|v| v * next.alpha());
                    self.step += 1;
                }
                Ok(Advance { x0_pred: d.x0, eps_pred: d.eps, noise, ancestral: None })
            }
            Stage::Second { y_hat, sigma_hat, eps, x_in } => {
                let d = Denoised::new(self.mean_type, &x_in, &next, &output.prediction, self.clip_x0)?;
                let dt = next.sigma() - sigma_hat;
                let y_next = super::combine(&[(1.0, &y_hat), (0.5 * dt, &eps), (0.5 * dt, &d.eps)]);
                self.x = y_next.mapv(|v| v * next.alpha());
                self.step += 1;
                Ok(Advance { x0_pred: d.x0, eps_pred: d.eps, noise: None, ancestral: None })
            }
        }
    }

    fn x(&self) -> &ArrayD<f64> {
        &self.x
    }

    fn num_evals(&self) -> usize {
        let k = self.grid.len();
        if !self.heun {
            k
        } else if self.grid.end.sigma() == 0.0 {
            2 * k - 1
        } else {
            2 * k
        }
    }
}

/// Euler-ancestral: from σ to σ_next, σ_up = min(σ_next, √(σ_next²(σ² − σ_next²)/σ²)),
/// σ_down = √(σ_next² − σ_up²); y_next = y + (σ_down − σ) ε̂ + σ_up z (k-diffusion, diffusers).
/// This is ancestral sampling of the reverse SDE; z is drawn at every step, the last included.
pub struct EulerAncestral {
    grid: Grid,
    mean_type: MeanType,
    clip_x0: bool,
    x: ArrayD<f64>,
    step: usize,
}

impl EulerAncestral {
    /// The sampler over `grid` from x_T = `x_t`.
    pub fn new(grid: Grid, mean_type: MeanType, clip_x0: bool, x_t: ArrayD<f64>) -> Self {
        EulerAncestral { grid, mean_type, clip_x0, x: x_t, step: 0 }
    }
}

impl Solver for EulerAncestral {
    fn next_eval(&mut self, _noise: &mut dyn NoiseSource) -> Option<Eval<'_>> {
        let at = *self.grid.points.get(self.step)?;
        Some(Eval { x: &self.x, at })
    }

    fn advance(&mut self, output: ModelOutput, noise: &mut dyn NoiseSource) -> Result<Advance> {
        let at = *self.grid.points.get(self.step).ok_or_else(no_pending)?;
        let next = *self.grid.points.get(self.step + 1).unwrap_or(&self.grid.end);
        let d = Denoised::new(self.mean_type, &self.x, &at, &output.prediction, self.clip_x0)?;
        let (s, sn) = (at.sigma(), next.sigma());
        let sigma_up = sn.min((sn * sn * (s * s - sn * sn) / (s * s)).max(0.0).sqrt());
        let sigma_down = (sn * sn - sigma_up * sigma_up).max(0.0).sqrt();
        let z = noise.draw(self.x.shape());
        let y = self.x.mapv(|v| v / at.alpha());
        let y_next = super::combine(&[(1.0, &y), (sigma_down - s, &d.eps), (sigma_up, &z)]);
        self.x = y_next.mapv(|v| v * next.alpha());
        self.step += 1;
        Ok(Advance { x0_pred: d.x0, eps_pred: d.eps, noise: Some(z), ancestral: None })
    }

    fn x(&self) -> &ArrayD<f64> {
        &self.x
    }

    fn num_evals(&self) -> usize {
        self.grid.len()
    }
}
