//! Exponential moving average of the parameters (the weights sampling uses by default).

use ndarray::Zip;

use super::ParamStore;
use crate::Tensor;

/// `θ_ema ← d·θ_ema + (1 − d)·θ` after every optimiser step.
///
/// With `warmup` on, the decay used at update number k (1-based) is
/// `d_k = min(decay, (1 + k)/(10 + k))`, TensorFlow's `ExponentialMovingAverage` rule with
/// `num_updates`: early on the average follows the weights closely, so a short run (a few
/// thousand steps, where 0.9999 would still be mostly the random initialisation) gets a useful
/// average. Ho et al. use decay 0.9999 for long runs.
///
/// With `power` γ set (EDM2's power-function EMA, Karras et al. 2024, "Analyzing and Improving
/// the Training Dynamics of Diffusion Models", section 3.1), the decay at update k is
/// `(1 − 1/k)^(γ+1)` instead: the average then weights step τ ≤ k about in proportion to τ^γ
/// (exactly: `power_ema_weights_each_step_by_its_power`), so its length grows with the run
/// as a fixed fraction of it (σ_rel, [`power_ema_gamma`]) and needs no choice of decay to fit the
/// run's length. `decay` and `warmup` are ignored then.
#[derive(Clone, Debug)]
pub struct Ema {
    /// Target decay d.
    pub decay: f64,
    /// Use the `(1 + k)/(10 + k)` warm-up of the decay.
    pub warmup: bool,
    /// The power-function profile's γ, if used (instead of `decay`).
    pub power: Option<f64>,
    /// Updates applied so far.
    pub updates: u64,
    /// The averaged parameters, in store order.
    pub shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts the average at the current parameters.
    pub fn new(params: &ParamStore, decay: f64, warmup: bool) -> Self {
        Self {
            decay,
            warmup,
            power: None,
            updates: 0,
            shadow: params.iter().map(|(_, p)| p.clone()).collect(),
        }
    }

    /// The same average with EDM2's power-function decay of exponent γ (or the plain one).
    #[must_use]
    pub fn with_power(mut self, gamma: Option<f64>) -> Self {
        self.power = gamma;
        self
    }

    /// The decay the next update will use.
    pub fn next_decay(&self) -> f64 {
        let k = (self.updates + 1) as f64;
        if let Some(gamma) = self.power {
            (1.0 - 1.0 / k).powf(gamma + 1.0)
        } else if self.warmup {
            self.decay.min((1.0 + k) / (10.0 + k))
        } else {
            self.decay
        }
    }

    /// Folds the current parameters into the average.
    ///
    /// # Panics
    /// If the store does not match the average (count or shapes).
    pub fn update(&mut self, params: &ParamStore) {
        let d = self.next_decay() as f32;
        assert_eq!(params.len(), self.shadow.len(), "ema: parameter count changed");
        for (s, (_, p)) in self.shadow.iter_mut().zip(params.iter()) {
            Zip::from(s).and(p).par_for_each(|s, &p| *s = d * *s + (1.0 - d) * p);
        }
        self.updates += 1;
    }

    /// A store with the same names holding the averaged values.
    pub fn to_store(&self, params: &ParamStore) -> ParamStore {
        let mut out = ParamStore::new();
        for ((name, _), s) in params.iter().zip(&self.shadow) {
            out.insert(name, s.clone());
        }
        out
    }
}

/// σ_rel of EDM2's power-function EMA of exponent γ: the standard deviation of its weight
/// profile ∝ τ^γ over [0, 1], relative to the run's length (Karras et al. 2024, section 3.1):
/// σ_rel = ((γ+1) / ((γ+2)²(γ+3)))^½.
pub fn power_ema_sigma_rel(gamma: f64) -> f64 {
    ((gamma + 1.0) / ((gamma + 2.0).powi(2) * (gamma + 3.0))).sqrt()
}

/// The largest σ_rel a power profile with γ ≥ 0 has (γ = 0, a plain running mean): 1/√12.
pub const MAX_SIGMA_REL: f64 = 0.288_675_134_594_812_9;

/// The γ ≥ 0 whose profile has this σ_rel (the inverse of [`power_ema_sigma_rel`], which
/// decreases on γ ≥ 0), by bisection to full precision; `None` outside (0, 1/√12].
pub fn power_ema_gamma(sigma_rel: f64) -> Option<f64> {
    if !(sigma_rel > 0.0 && sigma_rel <= MAX_SIGMA_REL) {
        return None;
    }
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    while power_ema_sigma_rel(hi) > sigma_rel {
        hi *= 2.0;
        if hi > 1e12 {
            return None;
        }
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if power_ema_sigma_rel(mid) > sigma_rel {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(0.5 * (lo + hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_follows_the_closed_form() {
        // With a constant target θ = 1 from θ_ema = 0 and fixed d, after k updates
        // θ_ema = 1 − d^k.
        let mut store = ParamStore::new();
        store.insert("w", ndarray::arr1(&[0.0f32]).into_dyn());
        let mut ema = Ema::new(&store, 0.9, false);
        store.set("w", ndarray::arr1(&[1.0f32]).into_dyn());
        for _ in 0..5 {
            ema.update(&store);
        }
        let want = 1.0 - 0.9f64.powi(5);
        assert!((ema.shadow[0][0] as f64 - want).abs() < 1e-6);
    }

    #[test]
    fn warmup_decay_starts_small_and_reaches_the_target() {
        let store = ParamStore::new();
        let mut ema = Ema::new(&store, 0.999, true);
        assert!((ema.next_decay() - 2.0 / 11.0).abs() < 1e-12);
        ema.updates = 1_000_000;
        assert_eq!(ema.next_decay(), 0.999);
    }

    /// The power profile's closed form: with β_k = (1 − 1/k)^(γ+1) the average after n updates
    /// is Σ_τ w_τ θ_τ with w_τ = (1 − β_τ)·Π_{k>τ} β_k = (1 − β_τ)·(τ/n)^(γ+1) (the product
    /// telescopes), ≈ (γ+1)·τ^γ / n^(γ+1) for large τ. Checked on a ramp θ_τ = τ.
    #[test]
    fn power_ema_weights_each_step_by_its_power() {
        let mut store = ParamStore::new();
        store.insert("w", ndarray::arr1(&[0.0f32]).into_dyn());
        let gamma = 1.5;
        let mut ema = Ema::new(&store, 0.0, false).with_power(Some(gamma));
        let n = 50;
        for tau in 1..=n {
            store.set("w", ndarray::arr1(&[tau as f32]).into_dyn());
            ema.update(&store);
        }
        let beta = |k: f64| (1.0 - 1.0 / k).powf(gamma + 1.0);
        let weights: Vec<f64> =
            (1..=n).map(|t| (1.0 - beta(t as f64)) * (t as f64 / n as f64).powf(gamma + 1.0)).collect();
        assert!((weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let want: f64 = weights.iter().enumerate().map(|(i, w)| w * (i + 1) as f64).sum();
        let got = ema.shadow[0][0] as f64;
        assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
        // The first update takes the weights as they are.
        let mut first = Ema::new(&store, 0.5, true).with_power(Some(6.94));
        assert_eq!(first.next_decay(), 0.0);
        first.updates = 9;
        assert!((first.next_decay() - 0.9f64.powf(7.94)).abs() < 1e-15);
    }

    #[test]
    fn sigma_rel_and_gamma_invert_each_other() {
        // EDM2's two published profiles: σ_rel 0.05 ↔ γ ≈ 16.97, σ_rel 0.10 ↔ γ ≈ 6.94.
        let g05 = power_ema_gamma(0.05).expect("in range");
        let g10 = power_ema_gamma(0.10).expect("in range");
        assert!((g05 - 16.97).abs() < 0.01, "{g05}");
        assert!((g10 - 6.94).abs() < 0.01, "{g10}");
        for s in [1e-4, 0.01, 0.2, MAX_SIGMA_REL] {
            let g = power_ema_gamma(s).expect("in range");
            assert!((power_ema_sigma_rel(g) - s).abs() < 1e-12, "{s}");
        }
        assert!((power_ema_sigma_rel(0.0) - MAX_SIGMA_REL).abs() < 1e-15);
        for bad in [0.0, -0.1, 0.29, f64::NAN] {
            assert_eq!(power_ema_gamma(bad), None, "{bad}");
        }
    }
}
