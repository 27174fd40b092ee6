//! DPM-Solver (Lu et al. 2022a, arXiv:2206.00927) and DPM-Solver++ (Lu et al. 2022b,
//! arXiv:2211.01095): exponential integrators of the probability-flow ODE in the half log-SNR
//! λ = ln(α/σ), singlestep and multistep, orders 1–3, and the SDE variant of DPM-Solver++ 2M.
//!
//! With α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t) and h = λ_t − λ_s, the first-order updates are
//! - noise prediction (DPM-Solver-1, = DDIM η = 0): x_t = (α_t/α_s) x_s − σ_t (e^h − 1) ε̂_s,
//! - data prediction (DPM-Solver++ 1): x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) x̂_0,s,
//! - SDE (SDE-DPM-Solver++ 1): x_t = (σ_t/σ_s) e^{−h} x_s + α_t (1 − e^{−2h}) x̂_0,s
//!   + σ_t √(1 − e^{−2h}) z.
//!
//! Higher orders add the first (and second) λ-derivative of the prediction, estimated by finite
//! differences of earlier outputs (multistep) or of outputs at the intermediate grid points of a
//! block (singlestep); docs/sampling.md writes out each, in diffusers' arrangement (which is
//! reproduced, block layout and `lower_order_final` rule included).

use ndarray::ArrayD;

use super::{
    combine, no_pending, Advance, Denoised, Eval, Grid, GridPoint, NoiseSource, SamplerOptions, Solver,
};
use crate::diffusion::{MeanType, ModelOutput};
use crate::{Error, Result};

/// Which quantity the solver integrates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpmAlgorithm {
    /// ε̂ (DPM-Solver; diffusers' `dpmsolver`).
    Noise,
    /// x̂_0 (DPM-Solver++; diffusers' `dpmsolver++`).
    Data,
    /// x̂_0, solving the reverse SDE (diffusers' `sde-dpmsolver++`).
    DataSde,
}

/// How the second-order term is formed (diffusers' `solver_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SolverType {
    /// Lu et al.'s choice: the derivative term scaled by ½ (or, at order 3 singlestep, only the
    /// last intermediate point's difference).
    Midpoint,
    /// The exponential-integrator coefficients of a linear (quadratic) interpolant.
    Heun,
}

/// A DPM-Solver run over a grid.
pub struct DpmSolver {
    grid: Grid,
    mean_type: MeanType,
    algorithm: DpmAlgorithm,
    order: u8,
    multistep: bool,
    options: SamplerOptions,
    /// Order of each step (singlestep: diffusers' `get_order_list`).
    orders: Vec<u8>,
    x: ArrayD<f64>,
    /// x at the start of the current singlestep block.
    block_start: ArrayD<f64>,
    /// Converted outputs (ε̂ or x̂_0) with their points, latest last.
    history: Vec<(GridPoint, ArrayD<f64>)>,
    step: usize,
}

impl DpmSolver {
    /// A DPM-Solver of `order` (1–3; the SDE variant 1–2) over `grid`, from x_T = `x_t`.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for an order out of range.
    pub fn new(
        grid: Grid,
        mean_type: MeanType,
        algorithm: DpmAlgorithm,
        order: u8,
        multistep: bool,
        options: SamplerOptions,
        x_t: ArrayD<f64>,
    ) -> Result<Self> {
        let max = if algorithm == DpmAlgorithm::DataSde { 2 } else { 3 };
        if !(1..=max).contains(&order) {
            return Err(Error::config(
                "sampler",
                format!("DPM-Solver order {order}; this variant has orders 1..={max}"),
            ));
        }
        let k = grid.len();
        let to_zero = grid.end.sigma() == 0.0;
        let orders = if multistep {
            multistep_orders(order, k, options.lower_order_final, to_zero)
        } else {
            singlestep_orders(order, k, options.lower_order_final, to_zero)
        };
        Ok(DpmSolver {
            grid,
            mean_type,
            algorithm,
            order,
            multistep,
            options,
            orders,
            block_start: x_t.clone(),
            x: x_t,
            history: Vec::new(),
            step: 0,
        })
    }

    /// The order used at each step.
    pub fn orders(&self) -> &[u8] {
        &self.orders
    }

    /// The order the solver was asked for.
    pub fn order(&self) -> u8 {
        self.order
    }
}

/// diffusers' multistep rule: order min(p, steps so far + 1); with `lower_order_final` and fewer
/// than 15 steps, the last step is first order and the one before at most second; the step onto
/// σ = 0 is always first order.
fn multistep_orders(p: u8, k: usize, lower_order_final: bool, to_zero: bool) -> Vec<u8> {
    let short = lower_order_final && k < 15;
    (0..k)
        .map(|i| {
            // In usize: a run of more than 255 steps must not wrap the warm-up count.
            let mut o = (p as usize).min(i + 1) as u8;
            if i + 1 == k && (short || to_zero) {
                o = 1;
            }
            if i + 2 == k && short {
                o = o.min(2);
            }
            o
        })
        .collect()
}

/// diffusers' singlestep `get_order_list`: blocks [1, 2, …, p]; with `lower_order_final` the
/// tail is shortened as diffusers does; without it a remainder of r steps is one block of
/// order r. The step onto σ = 0 is first order.
fn singlestep_orders(p: u8, k: usize, lower_order_final: bool, to_zero: bool) -> Vec<u8> {
    let block: Vec<u8> = (1..=p).collect();
    let pk = p as usize;
    let mut orders: Vec<u8> = if lower_order_final && p == 3 {
        match k % 3 {
            0 if k >= 3 => [block.repeat(k / 3 - 1), vec![1, 2, 1]].concat(),
            1 => [block.repeat(k / 3), vec![1]].concat(),
            _ => [block.repeat(k / 3), (1..=(k % 3) as u8).collect()].concat(),
        }
    } else if lower_order_final && p == 2 {
        if k.is_multiple_of(2) {
            [block.repeat(k / 2 - 1), vec![1, 1]].concat()
        } else {
            [block.repeat(k / 2), vec![1]].concat()
        }
    } else {
        [block.repeat(k / pk), (1..=(k % pk) as u8).collect()].concat()
    };
    if to_zero {
        if let Some(last) = orders.last_mut() {
            *last = 1;
        }
    }
    orders
}

impl Solver for DpmSolver {
    fn next_eval(&mut self, _noise: &mut dyn NoiseSource) -> Option<Eval<'_>> {
        let at = *self.grid.points.get(self.step)?;
        Some(Eval { x: &self.x, at })
    }

    fn advance(&mut self, output: ModelOutput, noise: &mut dyn NoiseSource) -> Result<Advance> {
        let s0 = *self.grid.points.get(self.step).ok_or_else(no_pending)?;
        let t = *self.grid.points.get(self.step + 1).unwrap_or(&self.grid.end);
        let d = Denoised::new(self.mean_type, &self.x, &s0, &output.prediction, self.options.clip_x0)?;
        let m = match self.algorithm {
            DpmAlgorithm::Noise => d.eps.clone(),
            DpmAlgorithm::Data | DpmAlgorithm::DataSde => d.x0.clone(),
        };
        let order = self.orders[self.step];
        if !self.multistep && order == 1 {
            self.block_start = self.x.clone();
            self.history.clear();
        }
        self.history.push((s0, m));
        let keep = if self.multistep { 3 } else { self.order as usize };
        if self.history.len() > keep {
            self.history.remove(0);
        }
        let z = (self.algorithm == DpmAlgorithm::DataSde).then(|| noise.draw(self.x.shape()));
        let x = if self.multistep {
            let n = self.history.len();
            let h: Vec<&(GridPoint, ArrayD<f64>)> = self.history[n - order as usize..].iter().rev().collect();
            self.multistep_update(order, &h, &t, z.as_ref())
        } else {
            let n = self.history.len();
            let h: Vec<&(GridPoint, ArrayD<f64>)> = self.history[n - order as usize..].iter().collect();
            self.singlestep_update(order, &h, &t, z.as_ref())
        };
        self.x = x;
        self.step += 1;
        Ok(Advance { x0_pred: d.x0, eps_pred: d.eps, noise: z, ancestral: None })
    }

    fn x(&self) -> &ArrayD<f64> {
        &self.x
    }

    fn num_evals(&self) -> usize {
        self.grid.len()
    }
}

/// The coefficients of one update: x_t = c_x x_s + c0 D0 + c1 D1 + c2 D2 + c_z z.
struct Coefs {
    cx: f64,
    c0: f64,
    c1: f64,
    c2: f64,
    cz: f64,
}

impl DpmSolver {
    /// Exponential-integrator coefficients from point `s` to `t`: of D0 (the prediction), D1
    /// (its first λ-derivative times h) and D2 (second, times h²/2 as diffusers scales it).
    /// `mid` selects diffusers' midpoint form for D1 (½ of the first-order coefficient).
    fn coefs(&self, s: &GridPoint, t: &GridPoint, mid: bool) -> Coefs {
        let (a_t, s_t, a_s, s_s) = (t.alpha(), t.sigma_vp(), s.alpha(), s.sigma_vp());
        let h = t.lambda() - s.lambda();
        match self.algorithm {
            DpmAlgorithm::Noise => {
                // σ_t (e^h − 1) written as α_t σ_s/α_s − σ_t, finite at σ_t = 0 (h = ∞).
                let e1 = a_t * s_s / a_s - s_t;
                let phi1 = if h.is_finite() { s_t * (h.exp_m1() / h - 1.0) } else { 0.0 };
                let phi2 = if h.is_finite() { s_t * ((h.exp_m1() - h) / (h * h) - 0.5) } else { 0.0 };
                Coefs { cx: a_t / a_s, c0: -e1, c1: if mid { -0.5 * e1 } else { -phi1 }, c2: -phi2, cz: 0.0 }
            }
            DpmAlgorithm::Data => {
                let em = (-h).exp_m1(); // e^{−h} − 1
                let phi1 = if h.is_finite() { a_t * (em / h + 1.0) } else { a_t };
                let phi2 = if h.is_finite() { a_t * ((em + h) / (h * h) - 0.5) } else { -0.5 * a_t };
                Coefs {
                    cx: s_t / s_s,
                    c0: -a_t * em,
                    c1: if mid { -0.5 * a_t * em } else { phi1 },
                    c2: -phi2,
                    cz: 0.0,
                }
            }
            DpmAlgorithm::DataSde => {
                let one_m = -(-2.0 * h).exp_m1(); // 1 − e^{−2h}
                let phi1 = if h.is_finite() { a_t * (one_m / (-2.0 * h) + 1.0) } else { a_t };
                Coefs {
                    cx: s_t / s_s * (-h).exp(),
                    c0: a_t * one_m,
                    c1: if mid { 0.5 * a_t * one_m } else { phi1 },
                    c2: 0.0,
                    cz: s_t * one_m.sqrt(),
                }
            }
        }
    }

    /// `h[0]` the latest output (at the current point s0), `h[1]`, `h[2]` earlier ones.
    fn multistep_update(
        &self,
        order: u8,
        h: &[&(GridPoint, ArrayD<f64>)],
        t: &GridPoint,
        z: Option<&ArrayD<f64>>,
    ) -> ArrayD<f64> {
        let (s0, m0) = (&h[0].0, &h[0].1);
        let mid = self.options.solver_type == SolverType::Midpoint;
        let c = self.coefs(s0, t, mid);
        let hh = t.lambda() - s0.lambda();
        let mut x = match order {
            1 => combine(&[(c.cx, &self.x), (c.c0, m0)]),
            2 => {
                let (s1, m1) = (&h[1].0, &h[1].1);
                let r0 = (s0.lambda() - s1.lambda()) / hh;
                let d1 = combine(&[(1.0 / r0, m0), (-1.0 / r0, m1)]);
                combine(&[(c.cx, &self.x), (c.c0, m0), (c.c1, &d1)])
            }
            _ => {
                let (s1, m1, s2, m2) = (&h[1].0, &h[1].1, &h[2].0, &h[2].1);
                let c = self.coefs(s0, t, false);
                let r0 = (s0.lambda() - s1.lambda()) / hh;
                let r1 = (s1.lambda() - s2.lambda()) / hh;
                let d1_0 = combine(&[(1.0 / r0, m0), (-1.0 / r0, m1)]);
                let d1_1 = combine(&[(1.0 / r1, m1), (-1.0 / r1, m2)]);
                let d1 = combine(&[(1.0 + r0 / (r0 + r1), &d1_0), (-r0 / (r0 + r1), &d1_1)]);
                // (D1_0 − D1_1) ≈ h² x̂₀''·(r0 + r1)/2, so D2 ≈ h² x̂₀'' needs the factor 2 that
                // the singlestep update has. Lu et al.'s reference code and diffusers omit it,
                // which makes their 3M second order (docs/sampling.md); `reference_3m` keeps
                // their update.
                let w = if self.options.reference_3m { 1.0 } else { 2.0 };
                let d2 = combine(&[(w / (r0 + r1), &d1_0), (-w / (r0 + r1), &d1_1)]);
                combine(&[(c.cx, &self.x), (c.c0, m0), (c.c1, &d1), (c.c2, &d2)])
            }
        };
        if let Some(z) = z {
            x.scaled_add(c.cz, z);
        }
        x
    }

    /// `h[0]` the block start b0 (where `block_start` is), `h[1]`, `h[2]` the later points.
    fn singlestep_update(
        &self,
        order: u8,
        h: &[&(GridPoint, ArrayD<f64>)],
        t: &GridPoint,
        z: Option<&ArrayD<f64>>,
    ) -> ArrayD<f64> {
        let (b0, m_b0) = (&h[0].0, &h[0].1);
        let mid = self.options.solver_type == SolverType::Midpoint;
        let c = self.coefs(b0, t, mid);
        let hh = t.lambda() - b0.lambda();
        let x0 = &self.block_start;
        let mut x = match order {
            1 => combine(&[(c.cx, x0), (c.c0, m_b0)]),
            2 => {
                let (b1, m_b1) = (&h[1].0, &h[1].1);
                let r0 = (b1.lambda() - b0.lambda()) / hh;
                let d1 = combine(&[(1.0 / r0, m_b1), (-1.0 / r0, m_b0)]);
                combine(&[(c.cx, x0), (c.c0, m_b0), (c.c1, &d1)])
            }
            _ => {
                let (b1, m_b1, b2, m_b2) = (&h[1].0, &h[1].1, &h[2].0, &h[2].1);
                let r0 = (b2.lambda() - b0.lambda()) / hh;
                let r1 = (b1.lambda() - b0.lambda()) / hh;
                let d1_0 = combine(&[(1.0 / r1, m_b1), (-1.0 / r1, m_b0)]);
                let d1_1 = combine(&[(1.0 / r0, m_b2), (-1.0 / r0, m_b0)]);
                if mid {
                    // Lu et al.'s DPM-Solver-3: only the last point's difference, with the
                    // first-order φ coefficient (exact third order when r0 = 2/3).
                    let full = self.coefs(b0, t, false);
                    combine(&[(c.cx, x0), (c.c0, m_b0), (full.c1, &d1_1)])
                } else {
                    let d1 = combine(&[(r0 / (r0 - r1), &d1_0), (-r1 / (r0 - r1), &d1_1)]);
                    let d2 = combine(&[(2.0 / (r0 - r1), &d1_1), (-2.0 / (r0 - r1), &d1_0)]);
                    combine(&[(c.cx, x0), (c.c0, m_b0), (c.c1, &d1), (c.c2, &d2)])
                }
            }
        };
        if let Some(z) = z {
            x.scaled_add(c.cz, z);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_lists_follow_diffusers() {
        // DPMSolverSinglestepScheduler.get_order_list (diffusers 0.42.1), lower_order_final on.
        assert_eq!(singlestep_orders(2, 10, true, true), [1, 2, 1, 2, 1, 2, 1, 2, 1, 1]);
        assert_eq!(singlestep_orders(2, 11, true, true), [1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1]);
        assert_eq!(singlestep_orders(3, 9, true, false), [1, 2, 3, 1, 2, 3, 1, 2, 1]);
        assert_eq!(singlestep_orders(3, 10, true, false), [1, 2, 3, 1, 2, 3, 1, 2, 3, 1]);
        assert_eq!(singlestep_orders(3, 11, true, true), [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 1]);
        assert_eq!(singlestep_orders(3, 11, false, false), [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2]);
        // Multistep: warm-up 1, 2, 3; short runs lower the last two; σ = 0 ends first order.
        assert_eq!(multistep_orders(3, 6, true, false), [1, 2, 3, 3, 2, 1]);
        assert_eq!(multistep_orders(3, 16, true, false)[15], 3);
        assert_eq!(multistep_orders(3, 16, true, true)[15], 1);
        assert_eq!(multistep_orders(2, 16, false, false), [vec![1], vec![2; 15]].concat());
        // Past 255 steps the warm-up count does not wrap.
        assert!(multistep_orders(3, 300, true, false).iter().skip(2).all(|&o| o == 3));
    }
}
