//! Adam (Kingma & Ba 2015) with bias correction and optional decoupled weight decay, gradient
//! clipping by global norm, and linear learning-rate warm-up.

use ndarray::Zip;

use super::ParamStore;
use crate::Tensor;

/// Adam's hyper-parameters. Defaults are the paper's and PyTorch's: β1 0.9, β2 0.999, ε 1e-8.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamConfig {
    /// Decay of the first-moment estimate.
    pub beta1: f64,
    /// Decay of the second-moment estimate.
    pub beta2: f64,
    /// Added to √v̂ in the denominator.
    pub eps: f64,
    /// Decoupled weight decay (AdamW, Loshchilov & Hutter 2019): `θ ← θ − lr·wd·θ` before the
    /// Adam step. 0 disables it (Ho et al. use none).
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Adam's state: the moment estimates of every parameter (in store order) and the step count.
#[derive(Clone, Debug)]
pub struct Adam {
    /// Hyper-parameters.
    pub config: AdamConfig,
    /// Steps taken so far (t in the paper; the first update uses t = 1).
    pub step: u64,
    /// First-moment estimates m, one per parameter.
    pub m: Vec<Tensor>,
    /// Second-moment estimates v, one per parameter.
    pub v: Vec<Tensor>,
}

impl Adam {
    /// Zero moments shaped like `params`.
    pub fn new(params: &ParamStore, config: AdamConfig) -> Self {
        let zeros: Vec<Tensor> = params.iter().map(|(_, p)| Tensor::zeros(p.raw_dim())).collect();
        Self { config, step: 0, m: zeros.clone(), v: zeros }
    }

    /// One update with learning rate `lr`:
    /// `m ← β1 m + (1−β1) g`, `v ← β2 v + (1−β2) g²`, `m̂ = m/(1−β1^t)`, `v̂ = v/(1−β2^t)`,
    /// `θ ← θ − lr · m̂ / (√v̂ + ε)`.
    ///
    /// # Panics
    /// If `grads` does not match the store (count or shapes).
    pub fn update(&mut self, params: &mut ParamStore, grads: &[Tensor], lr: f64) {
        assert_eq!(
            grads.len(),
            self.m.len(),
            "adam: {} gradients for {} parameters",
            grads.len(),
            self.m.len()
        );
        self.step = self.step.saturating_add(1);
        let c = &self.config;
        // β^t for t past i32::MAX is 0 to f64 precision for any β < 1: saturating is exact.
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        // 1 − β computed in f64: 1 − (0.999 as f32) would be off by 1.3e-5 relative.
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let (one_minus_b1, one_minus_b2) = ((1.0 - c.beta1) as f32, (1.0 - c.beta2) as f32);
        let (step_size, eps) = ((lr / bc1) as f32, c.eps as f32);
        let sqrt_bc2 = bc2.sqrt() as f32;
        let decay = (lr * c.weight_decay) as f32;
        for (((p, g), m), v) in params.values_mut().zip(grads).zip(&mut self.m).zip(&mut self.v) {
            assert_eq!(p.shape(), g.shape(), "adam: gradient shape differs from parameter");
            Zip::from(p).and(g).and(m).and(v).par_for_each(|p, &g, m, v| {
                *m = b1 * *m + one_minus_b1 * g;
                *v = b2 * *v + one_minus_b2 * g * g;
                if decay != 0.0 {
                    *p -= decay * *p;
                }
                // lr·m̂/(√v̂+ε) = (lr/bc1)·m / (√v/√bc2 + ε)
                *p -= step_size * *m / (v.sqrt() / sqrt_bc2 + eps);
            });
        }
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when the norm exceeds it). Returns the
/// norm before clipping, summed in f64.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> f64 {
    let norm = grads.iter().flat_map(|g| g.iter()).map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    if norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        for g in grads.iter_mut() {
            g.mapv_inplace(|x| x * scale);
        }
    }
    norm
}

/// Linear warm-up: `lr · min(1, step / warmup)` for 1-based `step` (Ho et al.'s TF code warms up
/// over 5000 steps). `warmup = 0` means none.
pub fn warmup_lr(lr: f64, step: u64, warmup: u64) -> f64 {
    if warmup == 0 {
        lr
    } else {
        lr * (step as f64 / warmup as f64).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tape;

    /// Reference: Adam by hand on f(θ) = θ², θ₀ = 1, lr = 0.1, default β/ε. Step 1: g = 2,
    /// m̂ = 2, v̂ = 4, θ₁ = 1 − 0.1·2/(2 + 1e-8) = 0.9000000005. Step 2: g = 1.8,
    /// m = 0.36, v = 0.007236, m̂ = 0.36/0.19, v̂ = 0.007236/0.001999, θ₂ = 0.8004122287.
    /// Step 3 continues the same way; all three values reproduced by this Python (float64):
    /// `th=1;m=v=0` / `for t in 1,2,3: g=2*th; m=.9*m+.1*g; v=.999*v+.001*g*g;`
    /// `th-=0.1*(m/(1-.9**t))/(math.sqrt(v/(1-.999**t))+1e-8)` → 0.9000000005,
    /// 0.8004122286917927, 0.70158627294603.
    #[test]
    fn adam_matches_hand_computed_steps() {
        let mut store = ParamStore::new();
        store.insert("theta", ndarray::arr1(&[1.0f32]).into_dyn());
        let mut adam = Adam::new(&store, AdamConfig::default());
        let expected = [0.9000000005f64, 0.8004122286917927, 0.70158627294603];
        for want in expected {
            let tape = Tape::new();
            let p = store.bind(&tape);
            let loss = p.get("theta").square().sum();
            let grads = p.grads(&loss.backward());
            adam.update(&mut store, &grads, 0.1);
            let got = store.get("theta").unwrap()[0] as f64;
            assert!((got - want).abs() < 1e-6, "step {}: {got} vs {want}", adam.step);
        }
    }

    #[test]
    fn decoupled_weight_decay_shrinks_with_zero_gradient() {
        let mut store = ParamStore::new();
        store.insert("w", ndarray::arr1(&[2.0f32]).into_dyn());
        let mut adam = Adam::new(&store, AdamConfig { weight_decay: 0.5, ..AdamConfig::default() });
        adam.update(&mut store, &[ndarray::arr1(&[0.0f32]).into_dyn()], 0.1);
        // θ ← θ − lr·wd·θ = 2 − 0.1·0.5·2 = 1.9, and the Adam step is 0 for g = 0.
        assert!((store.get("w").unwrap()[0] - 1.9).abs() < 1e-6);
    }

    #[test]
    fn clipping_bounds_the_global_norm_and_reports_the_original() {
        let mut g = vec![ndarray::arr1(&[3.0f32]).into_dyn(), ndarray::arr1(&[4.0f32]).into_dyn()];
        let norm = clip_grad_norm(&mut g, 1.0);
        assert!((norm - 5.0).abs() < 1e-9);
        assert!((g[0][0] - 0.6).abs() < 1e-5 && (g[1][0] - 0.8).abs() < 1e-5);
        let mut small = vec![ndarray::arr1(&[0.3f32]).into_dyn()];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small[0][0], 0.3);
    }

    #[test]
    fn warmup_ramps_linearly_then_holds() {
        assert_eq!(warmup_lr(1e-3, 1, 10), 1e-4);
        assert_eq!(warmup_lr(1e-3, 5, 10), 5e-4);
        assert_eq!(warmup_lr(1e-3, 50, 10), 1e-3);
        assert_eq!(warmup_lr(1e-3, 1, 0), 1e-3);
    }
}
