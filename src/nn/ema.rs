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
#[derive(Clone, Debug)]
pub struct Ema {
    /// Target decay d.
    pub decay: f64,
    /// Use the `(1 + k)/(10 + k)` warm-up of the decay.
    pub warmup: bool,
    /// Updates applied so far.
    pub updates: u64,
    /// The averaged parameters, in store order.
    pub shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts the average at the current parameters.
    pub fn new(params: &ParamStore, decay: f64, warmup: bool) -> Self {
        Self { decay, warmup, updates: 0, shadow: params.iter().map(|(_, p)| p.clone()).collect() }
    }

    /// The decay the next update will use.
    pub fn next_decay(&self) -> f64 {
        let k = (self.updates + 1) as f64;
        if self.warmup {
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
}
