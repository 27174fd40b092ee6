//! Where a sampler evaluates the network: the visited timesteps (linspace, leading, trailing, as
//! diffusers names them, rounded half to even as numpy does) or the σ schedule of Karras et al.
//! 2022 (arXiv:2206.00364, Eq. 5, ρ = 7), turned into a [`Grid`] of points with their ᾱ, σ and
//! network timestep.
//!
//! Every point is a noise level of the forward process q(x_t ∣ x_0) = N(√ᾱ x_0, (1 − ᾱ) I)
//! (Ho et al. Eq. 4). Samplers written in σ-space (Euler, Heun, DPM-Solver) use the
//! variance-exploding σ = √((1 − ᾱ)/ᾱ), so that x_t/√ᾱ = x_0 + σ ε (Karras et al. §2), and the
//! half log-SNR λ = ln(√ᾱ/√(1 − ᾱ)) = −ln σ (Lu et al. 2022, arXiv:2206.00927, §3.1).

use crate::diffusion::schedule::linspace;
use crate::diffusion::NoiseSchedule;
use crate::{Error, Result};

/// One noise level of the sampling grid.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GridPoint {
    alpha_bar: f64,
    sigma: f64,
    /// The number given to the network here (its timestep; fractional between table entries,
    /// NaN on a grid built for a closed-form model that ignores it).
    pub model_t: f64,
}

impl GridPoint {
    /// The point with cumulative product ᾱ (Eq. 4); σ = √((1 − ᾱ)/ᾱ).
    ///
    /// # Panics
    /// If ᾱ is not in (0, 1].
    pub fn from_alpha_bar(alpha_bar: f64, model_t: f64) -> Self {
        assert!(alpha_bar > 0.0 && alpha_bar <= 1.0, "GridPoint: alpha_bar {alpha_bar} outside (0, 1]");
        GridPoint { alpha_bar, sigma: ((1.0 - alpha_bar) / alpha_bar).sqrt(), model_t }
    }

    /// The point with variance-exploding noise level σ ≥ 0; ᾱ = 1/(1 + σ²).
    ///
    /// # Panics
    /// If σ is negative or not finite.
    pub fn from_sigma(sigma: f64, model_t: f64) -> Self {
        assert!(sigma >= 0.0 && sigma.is_finite(), "GridPoint: sigma {sigma} is not a finite σ ≥ 0");
        GridPoint { alpha_bar: 1.0 / (1.0 + sigma * sigma), sigma, model_t }
    }

    /// ᾱ.
    pub fn alpha_bar(&self) -> f64 {
        self.alpha_bar
    }

    /// The variance-exploding σ = √((1 − ᾱ)/ᾱ) (0 at the data).
    pub fn sigma(&self) -> f64 {
        self.sigma
    }

    /// α_t = √ᾱ, the signal scale of x_t (Lu et al.'s α_t).
    pub fn alpha(&self) -> f64 {
        self.alpha_bar.sqrt()
    }

    /// σ_t = √(1 − ᾱ), the noise scale of x_t (Lu et al.'s σ_t), computed as σ·√ᾱ so that it is
    /// exact near ᾱ = 1.
    pub fn sigma_vp(&self) -> f64 {
        self.sigma * self.alpha()
    }

    /// λ = ln(α_t/σ_t) = −ln σ (+∞ at the data).
    pub fn lambda(&self) -> f64 {
        -self.sigma.ln()
    }
}

/// The points a sampler visits, from the noisiest down, and the noise level it ends at.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    /// Where the network is evaluated, in stepping order (σ decreasing).
    pub points: Vec<GridPoint>,
    /// The point between `points[i]` and the next one (or `end`), used by PNDM's Runge–Kutta
    /// warm-up; the same length as `points`.
    pub mids: Vec<GridPoint>,
    /// Where the run ends: σ = 0 (the data, x_0) unless a sampler's convention stops at the first
    /// timestep.
    pub end: GridPoint,
    /// ln σ of the original T-step table, for the timestep of an arbitrary σ (empty for a
    /// closed-form model).
    log_sigmas: Vec<f64>,
    /// The network timestep of code index i is `i · model_t_scale`.
    model_t_scale: f64,
}

/// How the visited timesteps are chosen from T (diffusers' `timestep_spacing`; Lin et al. 2024,
/// arXiv:2305.08891, Table 2), or the Karras σ schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TimestepSpacing {
    /// `leading`: i·(T div K) + `steps_offset`, i = K−1 … 0.
    Leading,
    /// `trailing`: round(T − i·T/K) − 1, i = 0 … K−1 (round half to even); starts at T − 1.
    Trailing,
    /// `linspace`: round(linspace(0, T−1, K)), descending (round half to even): starts at T − 1,
    /// ends at 0. K = 1 visits t = 0 alone, as improved-diffusion's respacing does.
    Linspace,
}

impl TimestepSpacing {
    /// Every spacing, with its name.
    pub const ALL: [(TimestepSpacing, &'static str); 3] = [
        (TimestepSpacing::Linspace, "linspace"),
        (TimestepSpacing::Leading, "leading"),
        (TimestepSpacing::Trailing, "trailing"),
    ];

    /// diffusers' name for it.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(s, _)| *s == self).map(|(_, n)| *n).expect("every variant is listed")
    }
}

/// The timesteps `set_timesteps(K)` chooses, in stepping order (descending), as numpy computes
/// them.
///
/// # Errors
/// [`Error::InvalidConfig`] if K is 0 or above T, if `leading` with `steps_offset` reaches past
/// T − 1, or for a `trailing` (T, K) where numpy's float `arange` overshoots and gives K + 1
/// timesteps, the last −1 (e.g. T = 1000, K = 61).
pub fn spaced_timesteps(
    spacing: TimestepSpacing,
    timesteps: usize,
    k: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    if k == 0 || k > timesteps {
        return Err(Error::config(
            "sampling steps (--steps)",
            format!("{k} steps of a {timesteps}-step diffusion; use a value in 1..={timesteps}"),
        ));
    }
    let t = timesteps as f64;
    let out: Vec<i64> = match spacing {
        TimestepSpacing::Leading => {
            let ratio = timesteps / k;
            (0..k).rev().map(|i| (i * ratio + steps_offset) as i64).collect()
        }
        TimestepSpacing::Trailing => numpy_arange_descending(t, -t / k as f64)
            .into_iter()
            .map(|x| x.round_ties_even() as i64 - 1)
            .collect(),
        TimestepSpacing::Linspace => {
            linspace(0.0, t - 1.0, k).into_iter().rev().map(|x| x.round_ties_even() as i64).collect()
        }
    };
    if out.len() != k || out.iter().any(|&x| x < 0) {
        return Err(Error::config(
            "sampling steps (--steps)",
            format!(
                "with trailing spacing, numpy's arange({timesteps}, 0, -{timesteps}/{k}) overshoots and gives {} \
                 timesteps ending at {}, a negative index; choose another K",
                out.len(),
                out.last().copied().unwrap_or(0)
            ),
        ));
    }
    if let Some(&first) = out.first() {
        if first >= timesteps as i64 {
            return Err(Error::config(
                "steps_offset",
                format!(
                    "steps_offset = {steps_offset} puts the first of {k} timesteps at {first}, past T − 1 = {}",
                    timesteps - 1
                ),
            ));
        }
    }
    Ok(out.into_iter().map(|x| x as usize).collect())
}

/// The timesteps diffusers' DPM-Solver schedulers choose for K steps: `linspace` and `leading`
/// lay out K + 1 points and drop the last (t = 0), so the grid never visits t = 0 and its last
/// step goes from about T/K straight to the end (σ = 0, or σ_min); `trailing` is as
/// [`spaced_timesteps`].
///
/// # Errors
/// As [`spaced_timesteps`].
pub fn dpm_spaced_timesteps(
    spacing: TimestepSpacing,
    timesteps: usize,
    k: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    let out: Vec<usize> = match spacing {
        TimestepSpacing::Trailing => return spaced_timesteps(spacing, timesteps, k, steps_offset),
        _ if k == 0 || k > timesteps => return spaced_timesteps(spacing, timesteps, k, steps_offset),
        // K + 1 points of T, t = 0 dropped: at K = T two would round to one timestep.
        _ if k >= timesteps => {
            return Err(Error::config(
                "sampling steps (--steps)",
                format!(
                    "{k} steps of a {timesteps}-step diffusion: the DPM-Solvers lay out K + 1 timesteps \
                     without t = 0, so K is at most T − 1 = {} here (or use --spacing trailing)",
                    timesteps - 1
                ),
            ))
        }
        TimestepSpacing::Linspace => linspace(0.0, (timesteps - 1) as f64, k + 1)
            .into_iter()
            .rev()
            .take(k)
            .map(|x| x.round_ties_even() as usize)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = timesteps / (k + 1);
            (1..=k).rev().map(|i| i * ratio + steps_offset).collect()
        }
    };
    if out.first().is_some_and(|&t| t >= timesteps) {
        return Err(Error::config(
            "steps_offset",
            format!(
                "steps_offset = {steps_offset} puts the first of {k} timesteps past T − 1 = {}",
                timesteps - 1
            ),
        ));
    }
    Ok(out)
}

/// numpy's `arange(start, 0, step)` for float64 with step < 0: length ⌈(0 − start)/step⌉, entry
/// 0 = start, entry 1 = start + step, entry i = start + i·δ with δ = entry 1 − entry 0 (numpy's
/// `DOUBLE_fill`).
fn numpy_arange_descending(start: f64, step: f64) -> Vec<f64> {
    let len = ((0.0 - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let next = start + step;
    let delta = next - start;
    (0..len as usize)
        .map(|i| match i {
            0 => start,
            1 => next,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// The Karras et al. 2022 σ schedule (Eq. 5) with ρ = 7:
/// σ_i = (σ_max^{1/ρ} + i/(K−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, i = 0 … K−1 (σ_max alone for K = 1).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, k: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let (lo, hi) = (sigma_min.powf(1.0 / RHO), sigma_max.powf(1.0 / RHO));
    linspace(0.0, 1.0, k).into_iter().map(|r| (hi + r * (lo - hi)).powf(RHO)).collect()
}

/// Where the sampled chain ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GridEnd {
    /// σ = 0: the last update lands on the data (x_0).
    Zero,
    /// σ at the first timestep (code index 0): diffusers' `final_sigmas_type="sigma_min"`, the
    /// end of its noise-prediction DPM-Solvers (whose update has no limit form at σ = 0 there).
    SigmaMin,
    /// ᾱ at index 0 (σ_min) without a network timestep: PNDM's and DDIM's `set_alpha_to_one=False`.
    AlphaBar0,
}

/// How to build a grid from a trained schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GridSpec {
    /// Number of points K (network evaluations for a one-evaluation-per-step sampler).
    pub steps: usize,
    /// The timestep spacing; ignored with `karras`.
    pub spacing: TimestepSpacing,
    /// Added to every `leading` timestep (diffusers' `steps_offset`).
    pub steps_offset: usize,
    /// The Karras σ schedule between σ at index 0 and σ at T − 1 instead of timesteps.
    pub karras: bool,
    /// diffusers' DPM-Solver layout: Karras timesteps rounded to integers, and `linspace` /
    /// `leading` grids of K + 1 points without t = 0 ([`dpm_spaced_timesteps`]).
    pub dpm_layout: bool,
    /// Where the chain ends.
    pub end: GridEnd,
}

impl Grid {
    /// A grid over an explicit list of points (e.g. a continuous-time schedule for a closed-form
    /// model); `mids[i]` is the midpoint used by PNDM's warm-up.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] unless there is at least one point, σ strictly decreases along
    /// `points` and down to `end`, and `mids` has one entry per point.
    pub fn new(points: Vec<GridPoint>, mids: Vec<GridPoint>, end: GridPoint) -> Result<Self> {
        let grid = Grid { points, mids, end, log_sigmas: Vec::new(), model_t_scale: f64::NAN };
        grid.check()?;
        Ok(grid)
    }

    fn check(&self) -> Result<()> {
        let bad = |why: String| Err(Error::config("sampling grid", why));
        if self.points.is_empty() {
            return bad("no points".into());
        }
        if self.mids.len() != self.points.len() {
            return bad(format!("{} midpoints for {} points", self.mids.len(), self.points.len()));
        }
        let sig: Vec<f64> = self.points.iter().chain([&self.end]).map(GridPoint::sigma).collect();
        if let Some(w) = sig.windows(2).find(|w| w[1] >= w[0]) {
            return bad(format!(
                "σ must strictly decrease, but {} is followed by {}; use fewer steps or another spacing",
                w[0], w[1]
            ));
        }
        Ok(())
    }

    /// The grid a sampler visits on a trained schedule of T steps.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] for a step count out of 1..=T (see [`spaced_timesteps`]), or a
    /// grid whose σ does not strictly decrease (a Karras grid of more points than distinct
    /// rounded timesteps).
    pub fn from_schedule(schedule: &NoiseSchedule, spec: &GridSpec) -> Result<Self> {
        let big_t = schedule.num_timesteps();
        let ab = schedule.alpha_bar();
        let model_t_scale = schedule.model_timestep(1) - schedule.model_timestep(0);
        let log_sigmas: Vec<f64> = ab.iter().map(|&a| ((1.0 - a) / a).sqrt().ln()).collect();
        let at_index = |i: usize| GridPoint::from_alpha_bar(ab[i], schedule.model_timestep(i));
        let points: Vec<GridPoint> = if spec.karras {
            if spec.steps == 0 || spec.steps > big_t {
                return Err(Error::config(
                    "sampling steps (--steps)",
                    format!("{} steps of a {big_t}-step diffusion; use a value in 1..={big_t}", spec.steps),
                ));
            }
            let (lo, hi) = (log_sigmas[0].exp(), log_sigmas[big_t - 1].exp());
            // A grid that ends at σ_min lays out K + 1 points down to it and drops the last, which
            // the end replaces (else the last point and the end are one σ computed two ways).
            let ending_at_min = spec.end == GridEnd::SigmaMin;
            let mut sigmas = karras_sigmas(lo, hi, spec.steps + usize::from(ending_at_min));
            if ending_at_min {
                sigmas.pop();
            }
            sigmas
                .into_iter()
                .map(|s| {
                    let t = sigma_to_t(&log_sigmas, s);
                    if spec.dpm_layout {
                        GridPoint::from_sigma(s, t.round_ties_even() * model_t_scale)
                    } else {
                        GridPoint::from_sigma(s, t * model_t_scale)
                    }
                })
                .collect()
        } else if spec.dpm_layout {
            dpm_spaced_timesteps(spec.spacing, big_t, spec.steps, spec.steps_offset)?
                .into_iter()
                .map(at_index)
                .collect()
        } else {
            spaced_timesteps(spec.spacing, big_t, spec.steps, spec.steps_offset)?
                .into_iter()
                .map(at_index)
                .collect()
        };
        let end = match spec.end {
            GridEnd::Zero => GridPoint::from_sigma(0.0, f64::NAN),
            GridEnd::SigmaMin => at_index(0),
            GridEnd::AlphaBar0 => GridPoint::from_alpha_bar(ab[0], f64::NAN),
        };
        let mut grid = Grid { points, mids: Vec::new(), end, log_sigmas, model_t_scale };
        grid.mids = (0..grid.points.len()).map(|i| grid.discrete_midpoint(i, ab)).collect();
        grid.check()?;
        Ok(grid)
    }

    /// PNDM's half step on a discrete schedule: the timestep t − (t − t_next) div 2 (diffusers
    /// uses T div K div 2 for its evenly spaced `leading` grid, the same number there).
    fn discrete_midpoint(&self, i: usize, ab: &ndarray::Array1<f64>) -> GridPoint {
        let t = self.point_t(&self.points[i]);
        let next = self.points.get(i + 1).map_or(0.0, |p| self.point_t(p));
        if self.end.sigma() == 0.0 && i + 1 == self.points.len() || !t.is_finite() {
            // Past the last timestep there is no table entry between: the midpoint in σ.
            let s = 0.5 * (self.points[i].sigma() + self.end.sigma());
            return GridPoint::from_sigma(s, self.model_t_at(s));
        }
        let mid = (t - ((t - next) / 2.0).floor()).round().clamp(0.0, (ab.len() - 1) as f64) as usize;
        GridPoint::from_alpha_bar(ab[mid], mid as f64 * self.model_t_scale)
    }

    fn point_t(&self, p: &GridPoint) -> f64 {
        p.model_t / self.model_t_scale
    }

    /// The network timestep for an arbitrary σ: ln σ interpolated linearly between the table's
    /// two neighbouring entries (diffusers' `_sigma_to_t`), times the timestep scale; NaN on a
    /// grid without a table.
    pub fn model_t_at(&self, sigma: f64) -> f64 {
        if self.log_sigmas.len() < 2 {
            return f64::NAN;
        }
        sigma_to_t(&self.log_sigmas, sigma) * self.model_t_scale
    }

    /// Checks a grid built by hand (its fields are public): at least one point, σ strictly
    /// decreasing down to `end`, one midpoint per point.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] saying what is wrong.
    pub fn validate(&self) -> Result<()> {
        self.check()
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Whether the grid has no points (never, once built).
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// The fractional code index whose σ is `sigma`: ln σ interpolated between the two table entries
/// around it (diffusers' `_sigma_to_t`), clamped to 0 … T − 1. `log_sigmas` increases with t.
pub fn sigma_to_t(log_sigmas: &[f64], sigma: f64) -> f64 {
    let n = log_sigmas.len();
    let ls = sigma.max(1e-10).ln();
    // The last index whose ln σ is ≤ ls, at most n − 2.
    let low = log_sigmas.iter().rposition(|&l| l <= ls).unwrap_or(0).min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - ls) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffusion::{BetaSchedule, Conventions};

    #[test]
    fn spacings_match_the_values_numpy_gives() {
        // T = 50, K = 7 and 10: numpy 2.4.6, as in tests/fixtures/diffusers_family/README.md.
        let s = |kind, k, off| spaced_timesteps(kind, 50, k, off).unwrap();
        assert_eq!(s(TimestepSpacing::Leading, 7, 0), [42, 35, 28, 21, 14, 7, 0]);
        assert_eq!(s(TimestepSpacing::Leading, 10, 1), [46, 41, 36, 31, 26, 21, 16, 11, 6, 1]);
        assert_eq!(s(TimestepSpacing::Trailing, 7, 0), [49, 42, 35, 28, 20, 13, 6]);
        assert_eq!(s(TimestepSpacing::Linspace, 7, 0), [49, 41, 33, 24, 16, 8, 0]);
        assert_eq!(s(TimestepSpacing::Linspace, 10, 0), [49, 44, 38, 33, 27, 22, 16, 11, 5, 0]);
        assert_eq!(s(TimestepSpacing::Linspace, 1, 0), [0]);
    }

    #[test]
    fn linspace_rounds_halves_to_even_as_numpy() {
        // T = 1000, K = 7: 999·k/6 hits x.5 at k = 1, 3, 5 (166.5, 499.5, 832.5), which numpy
        // rounds to 166, 500, 832; rounding halves away from zero would give 167, 500, 833.
        let s = spaced_timesteps(TimestepSpacing::Linspace, 1000, 7, 0).unwrap();
        assert_eq!(s, [999, 832, 666, 500, 333, 166, 0]);
    }

    #[test]
    fn spacings_that_would_index_past_the_table_are_refused() {
        assert!(spaced_timesteps(TimestepSpacing::Trailing, 1000, 61, 0).is_err());
        assert!(spaced_timesteps(TimestepSpacing::Leading, 50, 10, 5).is_err());
        assert!(spaced_timesteps(TimestepSpacing::Linspace, 50, 0, 0).is_err());
        assert!(spaced_timesteps(TimestepSpacing::Linspace, 50, 51, 0).is_err());
    }

    #[test]
    fn dpm_grids_refuse_k_of_t_and_karras_grids_end_at_sigma_min_exactly() {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 50, Conventions::default()).unwrap();
        let spec = |steps, karras| GridSpec {
            steps,
            spacing: TimestepSpacing::Linspace,
            steps_offset: 0,
            karras,
            dpm_layout: true,
            end: GridEnd::SigmaMin,
        };
        assert_eq!(Grid::from_schedule(&s, &spec(49, false)).unwrap().len(), 49);
        let e = Grid::from_schedule(&s, &spec(50, false)).unwrap_err().to_string();
        assert!(e.contains("--steps") && e.contains("49"), "{e}");
        assert!(dpm_spaced_timesteps(TimestepSpacing::Leading, 50, 50, 0).is_err());
        for k in [1, 2, 10, 49] {
            let g = Grid::from_schedule(&s, &spec(k, true)).unwrap();
            assert_eq!(g.len(), k);
            assert_eq!(g.end.alpha_bar(), s.alpha_bar()[0]);
            assert!(g.points[k - 1].sigma() > g.end.sigma());
        }
    }

    #[test]
    fn karras_sigmas_run_from_max_to_min_with_rho_7() {
        let s = karras_sigmas(0.01, 80.0, 5);
        assert!((s[0] - 80.0).abs() < 1e-12 && (s[4] - 0.01).abs() < 1e-15);
        // Eq. 5 at i = 2 of 5: the midpoint of σ^(1/7), raised to 7.
        let mid = (0.5 * (80f64.powf(1.0 / 7.0) + 0.01f64.powf(1.0 / 7.0))).powi(7);
        assert!((s[2] - mid).abs() < 1e-12 * mid);
    }

    #[test]
    fn sigma_to_t_inverts_the_table_and_interpolates_log_sigma() {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 1000, Conventions::default()).unwrap();
        let ls: Vec<f64> = s.alpha_bar().iter().map(|&a| ((1.0 - a) / a).sqrt().ln()).collect();
        for i in [0usize, 1, 17, 500, 998, 999] {
            assert!((sigma_to_t(&ls, ls[i].exp()) - i as f64).abs() < 1e-9, "t = {i}");
        }
        let between = (0.25 * ls[10] + 0.75 * ls[11]).exp();
        assert!((sigma_to_t(&ls, between) - 10.75).abs() < 1e-9);
        assert_eq!(sigma_to_t(&ls, 1e6), 999.0);
        assert_eq!(sigma_to_t(&ls, 0.0), 0.0);
    }

    #[test]
    fn grid_points_carry_alpha_bar_sigma_and_lambda_consistently() {
        let p = GridPoint::from_alpha_bar(0.3, 5.0);
        let q = GridPoint::from_sigma(p.sigma(), 5.0);
        assert!((q.alpha_bar() - 0.3).abs() < 1e-15);
        assert!((p.sigma_vp() - 0.7f64.sqrt()).abs() < 1e-15 && (p.alpha() - 0.3f64.sqrt()).abs() < 1e-15);
        assert!((p.lambda() - (0.3f64 / 0.7).sqrt().ln()).abs() < 1e-15);
        let zero = GridPoint::from_sigma(0.0, f64::NAN);
        assert_eq!((zero.alpha_bar(), zero.sigma_vp(), zero.lambda()), (1.0, 0.0, f64::INFINITY));
    }

    #[test]
    fn grids_from_a_schedule_decrease_and_end_where_asked() {
        let s = NoiseSchedule::new(&BetaSchedule::Linear, 1000, Conventions::default()).unwrap();
        let spec = GridSpec {
            steps: 10,
            spacing: TimestepSpacing::Leading,
            steps_offset: 1,
            karras: false,
            dpm_layout: false,
            end: GridEnd::Zero,
        };
        let g = Grid::from_schedule(&s, &spec).unwrap();
        assert_eq!(g.points.iter().map(|p| p.model_t).collect::<Vec<_>>()[..3], [901.0, 801.0, 701.0]);
        assert_eq!(g.mids[0].model_t, 851.0);
        assert_eq!(g.end.sigma(), 0.0);
        let k = Grid::from_schedule(&s, &GridSpec { karras: true, ..spec }).unwrap();
        assert!((k.points[0].alpha_bar() - s.alpha_bar()[999]).abs() < 1e-12);
        assert!((k.points[9].model_t - 0.0).abs() < 1e-9 && (k.points[0].model_t - 999.0).abs() < 1e-9);
        let m = Grid::from_schedule(&s, &GridSpec { end: GridEnd::SigmaMin, ..spec }).unwrap();
        assert_eq!(m.end.alpha_bar(), s.alpha_bar()[0]);
        // 1000 Karras points crowd below σ(t = 1) and repeat a rounded timestep, but σ still
        // decreases, so the grid stands; a repeated σ is refused.
        assert!(Grid::new(
            vec![GridPoint::from_sigma(1.0, 0.0); 2],
            vec![GridPoint::from_sigma(1.0, 0.0); 2],
            m.end
        )
        .is_err());
    }
}
