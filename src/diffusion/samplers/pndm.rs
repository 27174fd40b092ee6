//! PNDM (Liu et al. 2022, arXiv:2202.09778): pseudo numerical methods on the diffusion
//! manifold. The "transfer" φ moves x from noise level a to b as if ε̂ were constant, which is a
//! DDIM η = 0 step (their Eq. 11): φ(x, a → b, ε) = (α_b/α_a) x + (σ_b − α_b σ_a/α_a) ε.
//! PNDM feeds φ with an ε̂ combined like a classical method: fourth-order Runge–Kutta for the
//! first three steps (4 evaluations each, two at the midpoint; PRK), then the 4-step
//! Adams–Bashforth combination (55 ε_0 − 59 ε_1 + 37 ε_2 − 9 ε_3)/24 (PLMS, one evaluation a
//! step). `plms` replaces the warm-up by diffusers' `skip_prk_steps` start: one step with the
//! average of ε̂ at both ends (2 evaluations), then Adams–Bashforth of orders 2 and 3.
//!
//! The Adams–Bashforth weights assume evenly spaced steps in the grid's index, as the paper and
//! diffusers do; ε̂ is converted at each evaluation's own noise level before being combined
//! (diffusers combines raw outputs, which differs for v- and x_0-prediction).

use ndarray::ArrayD;

use super::{combine, no_pending, Advance, Denoised, Eval, Grid, GridPoint, NoiseSource, Solver};
use crate::diffusion::{MeanType, ModelOutput};
use crate::{Error, Result};

/// The transfer φ(x, a → b, ε) (Liu et al. Eq. 11).
pub fn transfer(x: &ArrayD<f64>, a: &GridPoint, b: &GridPoint, eps: &ArrayD<f64>) -> ArrayD<f64> {
    let ce = b.sigma_vp() - b.alpha() * a.sigma_vp() / a.alpha();
    combine(&[(b.alpha() / a.alpha(), x), (ce, eps)])
}

/// A PNDM or PLMS run.
pub struct Pndm {
    grid: Grid,
    mean_type: MeanType,
    prk: bool,
    clip_x0: bool,
    /// x at the current grid point (where the step starts).
    x: ArrayD<f64>,
    /// The network input of the pending evaluation and where.
    x_in: ArrayD<f64>,
    at: GridPoint,
    /// ε̂ at earlier grid points, latest last (at most 4).
    ets: Vec<ArrayD<f64>>,
    /// Evaluations within the current step (PRK: 0–3; PLMS start: 0–1).
    sub: usize,
    /// Runge–Kutta's running Σ w_i ε_i.
    rk_sum: Option<ArrayD<f64>>,
    step: usize,
}

impl Pndm {
    /// PNDM (`prk = true`) or PLMS over `grid` from x_T = `x_t`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for PNDM on fewer than 4 points (its warm-up covers 3 steps).
    pub fn new(grid: Grid, mean_type: MeanType, prk: bool, clip_x0: bool, x_t: ArrayD<f64>) -> Result<Self> {
        if prk && grid.len() < 4 {
            return Err(Error::config(
                "sampling steps (--steps)",
                format!(
                    "pndm warms up with 3 Runge-Kutta steps and needs at least 4 steps, not {}; use plms",
                    grid.len()
                ),
            ));
        }
        let at = grid.points[0];
        Ok(Pndm {
            grid,
            mean_type,
            prk,
            clip_x0,
            x_in: x_t.clone(),
            x: x_t,
            at,
            ets: Vec::new(),
            sub: 0,
            rk_sum: None,
            step: 0,
        })
    }

    fn point(&self, i: usize) -> GridPoint {
        *self.grid.points.get(i).unwrap_or(&self.grid.end)
    }

    /// Moves to the next grid point with x.
    fn land(&mut self, x: ArrayD<f64>) {
        self.x = x;
        self.step += 1;
        self.sub = 0;
        self.x_in = self.x.clone();
        self.at = self.point(self.step);
    }
}

impl Solver for Pndm {
    fn next_eval(&mut self, _noise: &mut dyn NoiseSource) -> Option<Eval<'_>> {
        if self.step >= self.grid.len() {
            return None;
        }
        Some(Eval { x: &self.x_in, at: self.at })
    }

    fn advance(&mut self, output: ModelOutput, _noise: &mut dyn NoiseSource) -> Result<Advance> {
        if self.step >= self.grid.len() {
            return Err(no_pending());
        }
        let d = Denoised::new(self.mean_type, &self.x_in, &self.at, &output.prediction, self.clip_x0)?;
        let (p, q, m) = (self.point(self.step), self.point(self.step + 1), self.grid.mids[self.step]);
        let e = &d.eps;
        if self.prk && self.step < 3 {
            // Runge–Kutta: ε_1 at p, ε_2 and ε_3 at the midpoint, ε_4 at q.
            match self.sub {
                0 => {
                    self.ets.push(e.clone());
                    self.rk_sum = Some(e.mapv(|v| v / 6.0));
                    self.x_in = transfer(&self.x, &p, &m, e);
                    self.at = m;
                }
                1 | 2 => {
                    if let Some(s) = self.rk_sum.as_mut() {
                        s.scaled_add(1.0 / 3.0, e);
                    }
                    let to = if self.sub == 1 { m } else { q };
                    self.x_in = transfer(&self.x, &p, &to, e);
                    self.at = to;
                }
                _ => {
                    let mut s = self.rk_sum.take().ok_or_else(no_pending)?;
                    s.scaled_add(1.0 / 6.0, e);
                    let x = transfer(&self.x, &p, &q, &s);
                    self.land(x);
                    return Ok(Advance { x0_pred: d.x0, eps_pred: d.eps, noise: None, ancestral: None });
                }
            }
            self.sub += 1;
            return Ok(Advance { x0_pred: d.x0, eps_pred: d.eps, noise: None, ancestral: None });
        }
        if !self.prk && self.step == 0 && self.grid.len() > 1 {
            // diffusers' start: an Euler step to q, then ε̂ averaged over both ends.
            if self.sub == 0 {
                self.ets.push(e.clone());
                self.x_in = transfer(&self.x, &p, &q, e);
                self.at = q;
                self.sub = 1;
            } else {
                let avg = combine(&[(0.5, e), (0.5, &self.ets[0])]);
                let x = transfer(&self.x, &p, &q, &avg);
                self.land(x);
            }
            return Ok(Advance { x0_pred: d.x0, eps_pred: d.eps, noise: None, ancestral: None });
        }
        self.ets.push(e.clone());
        if self.ets.len() > 4 {
            self.ets.remove(0);
        }
        let n = self.ets.len();
        let et = |k: usize| &self.ets[n - 1 - k];
        let combined = match n {
            1 => et(0).clone(),
            2 => combine(&[(1.5, et(0)), (-0.5, et(1))]),
            3 => combine(&[(23.0 / 12.0, et(0)), (-16.0 / 12.0, et(1)), (5.0 / 12.0, et(2))]),
            _ => combine(&[
                (55.0 / 24.0, et(0)),
                (-59.0 / 24.0, et(1)),
                (37.0 / 24.0, et(2)),
                (-9.0 / 24.0, et(3)),
            ]),
        };
        let x = transfer(&self.x, &p, &q, &combined);
        self.land(x);
        Ok(Advance { x0_pred: d.x0, eps_pred: d.eps, noise: None, ancestral: None })
    }

    fn x(&self) -> &ArrayD<f64> {
        &self.x
    }

    fn num_evals(&self) -> usize {
        let k = self.grid.len();
        match (self.prk, k) {
            (true, _) => 12 + (k - 3),
            (false, 1) => 1,
            (false, _) => k + 1,
        }
    }
}
